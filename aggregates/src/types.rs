//! Value types shared by every aggregate: they parse once at the edge and are valid afterwards.
//! Nothing here does IO; hashing is pure computation.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha3::{Digest, Keccak256};

/// Why a value could not be parsed. The HTTP layer names the field; this says what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("must be a 0x-prefixed 20-byte hex address")]
    AddressFormat,
    #[error("mixed-case address fails its EIP-55 checksum")]
    AddressChecksum,
    #[error("must be a non-negative integer amount in base units (a decimal string)")]
    AmountFormat,
    #[error("amount exceeds 2^256-1")]
    AmountOverflow,
    #[error("must be 0x-prefixed hex with an even number of digits")]
    HexFormat,
}

/// An EVM account address. Lower- or upper-case hex is accepted as is; mixed case must carry a
/// valid EIP-55 checksum. Always displayed and serialized in checksummed form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Address([u8; 20]);

impl Address {
    pub const fn from_bytes(bytes: [u8; 20]) -> Self {
        Self(bytes)
    }

    pub const fn as_bytes(&self) -> &[u8; 20] {
        &self.0
    }

    /// EIP-55 checksummed `0x…` form.
    pub fn to_checksum(&self) -> String {
        self.with_checksum(str::to_owned)
    }

    /// Call `f` with the EIP-55 form. The Keccak hash behind it is remembered per thread for
    /// the addresses seen last: the same few wallets and recipients are encoded over and over
    /// (every view document, every event), and a hash costs more than the rest of an encode.
    fn with_checksum<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        thread_local! {
            // foldhash, seeded per process: SipHash was most of a cache hit's cost.
            static CHECKSUMS: RefCell<HashMap<[u8; 20], [u8; 42], foldhash::fast::RandomState>> =
                RefCell::new(HashMap::default());
        }
        /// Addresses remembered per thread (62 bytes each): forgotten all at once when full.
        const REMEMBERED: usize = 4096;
        let text = CHECKSUMS.with(|cache| {
            if let Some(text) = cache.borrow().get(&self.0) {
                return *text;
            }
            let text = checksum(&self.0);
            let mut cache = cache.borrow_mut();
            if cache.len() >= REMEMBERED {
                cache.clear();
            }
            cache.insert(self.0, text);
            text
        });
        // Always ASCII: `0x` and hex digits.
        f(std::str::from_utf8(&text).unwrap_or_default())
    }

    /// `0xAbCd…1234`, for human-readable summaries.
    pub fn short(&self) -> String {
        let full = self.to_checksum();
        format!("{}…{}", &full[..6], &full[38..])
    }
}

/// EIP-55: a hex digit is upper case where the Keccak-256 of the lower-case hex has a nibble of
/// 8 or more.
fn checksum(bytes: &[u8; 20]) -> [u8; 42] {
    let mut out = [0u8; 42];
    out[..2].copy_from_slice(b"0x");
    hex::encode_to_slice(bytes, &mut out[2..]).expect("40 hex digits fit");
    let hash = Keccak256::digest(&out[2..]);
    for (i, c) in out[2..].iter_mut().enumerate() {
        let nibble = (hash[i / 2] >> (if i % 2 == 0 { 4 } else { 0 })) & 0x0f;
        if c.is_ascii_alphabetic() && nibble >= 8 {
            c.make_ascii_uppercase();
        }
    }
    out
}

impl FromStr for Address {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("0x").ok_or(ParseError::AddressFormat)?;
        if digits.len() != 40 || !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseError::AddressFormat);
        }
        let mut bytes = [0u8; 20];
        hex::decode_to_slice(digits, &mut bytes).map_err(|_| ParseError::AddressFormat)?;
        let address = Self(bytes);
        let has_lower = digits.bytes().any(|b| b.is_ascii_lowercase());
        let has_upper = digits.bytes().any(|b| b.is_ascii_uppercase());
        if has_lower && has_upper && !address.with_checksum(|c| c == s) {
            return Err(ParseError::AddressChecksum);
        }
        Ok(address)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.with_checksum(|c| f.write_str(c))
    }
}

impl fmt::Debug for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Address({})", self.to_checksum())
    }
}

impl Serialize for Address {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.with_checksum(|c| serializer.serialize_str(c))
    }
}

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Parsed from the borrowed text: no String per address.
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Address;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 0x-prefixed 20-byte hex address")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Address, E> {
                s.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// 2^256 - 1 in decimal: the largest amount an EVM word holds.
const U256_MAX_DECIMAL: &str =
    "115792089237316195423570985008687907853269984665640564039457584007913129639935";

/// A non-negative integer amount in base units (wei, or a token's smallest unit), at most
/// 2^256-1. Kept as its canonical decimal string (no sign, no leading zeros) so that it
/// round-trips through JSON without precision loss. Input may be a decimal string or a JSON
/// integer; floats, negatives, exponents and anything above 2^256-1 are rejected.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Amount(String);

impl Amount {
    pub fn zero() -> Self {
        Self("0".to_owned())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_zero(&self) -> bool {
        self.0 == "0"
    }

    /// 2^256-1, the largest amount (an "unlimited" ERC20 allowance).
    pub fn max() -> Self {
        Self(U256_MAX_DECIMAL.to_owned())
    }

    pub fn is_max(&self) -> bool {
        self.0 == U256_MAX_DECIMAL
    }

    /// From a big-endian 32-byte word (an ABI-encoded `uint256`).
    pub fn from_be_bytes(word: [u8; 32]) -> Self {
        let mut n = word;
        let mut digits = Vec::new();
        // Repeated division by ten, most significant byte first.
        while n.iter().any(|b| *b != 0) {
            let mut rem = 0u32;
            for byte in n.iter_mut() {
                let cur = (rem << 8) | u32::from(*byte);
                *byte = (cur / 10) as u8;
                rem = cur % 10;
            }
            digits.push(b'0' + rem as u8);
        }
        if digits.is_empty() {
            return Self::zero();
        }
        digits.reverse();
        Self(digits.into_iter().map(char::from).collect())
    }

    /// Big-endian 32-byte encoding, as in ABI words.
    pub fn to_be_bytes(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for digit in self.0.bytes().map(|b| u32::from(b - b'0')) {
            // out = out * 10 + digit; cannot overflow: the value was checked against 2^256-1.
            let mut carry = digit;
            for byte in out.iter_mut().rev() {
                let v = u32::from(*byte) * 10 + carry;
                *byte = (v & 0xff) as u8;
                carry = v >> 8;
            }
        }
        out
    }

    /// Format `self` as a decimal number of `decimals` fractional digits, trailing zeros
    /// trimmed (e.g. 1500000000000000000 with 18 decimals → "1.5").
    pub fn to_units(&self, decimals: u8) -> String {
        let decimals = usize::from(decimals);
        if decimals == 0 {
            return self.0.clone();
        }
        let padded = format!("{:0>width$}", self.0, width = decimals + 1);
        let (int, frac) = padded.split_at(padded.len() - decimals);
        let frac = frac.trim_end_matches('0');
        if frac.is_empty() {
            int.to_owned()
        } else {
            format!("{int}.{frac}")
        }
    }
}

impl FromStr for Amount {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(ParseError::AmountFormat);
        }
        let trimmed = s.trim_start_matches('0');
        let canonical = if trimmed.is_empty() { "0" } else { trimmed };
        let too_big = canonical.len() > U256_MAX_DECIMAL.len()
            || (canonical.len() == U256_MAX_DECIMAL.len() && canonical > U256_MAX_DECIMAL);
        if too_big {
            return Err(ParseError::AmountOverflow);
        }
        Ok(Self(canonical.to_owned()))
    }
}

impl From<u64> for Amount {
    fn from(v: u64) -> Self {
        Self(v.to_string())
    }
}

impl fmt::Display for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Amount({})", self.0)
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct AmountVisitor;
        impl serde::de::Visitor<'_> for AmountVisitor {
            type Value = Amount;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer amount as a decimal string or JSON integer")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Amount, E> {
                v.parse().map_err(E::custom)
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Amount, E> {
                Ok(Amount::from(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Amount, E> {
                u64::try_from(v)
                    .map(Amount::from)
                    .map_err(|_| E::custom(ParseError::AmountFormat))
            }
            fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<Amount, E> {
                Err(E::custom(ParseError::AmountFormat))
            }
        }
        deserializer.deserialize_any(AmountVisitor)
    }
}

/// Arbitrary bytes (calldata, raw signed transactions), serialized as `0x…` hex.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct HexBytes(Vec<u8>);

impl HexBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }

    pub fn as_slice(&self) -> &[u8] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn to_hex(&self) -> String {
        format!("0x{}", hex::encode(&self.0))
    }
}

impl FromStr for HexBytes {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.strip_prefix("0x").ok_or(ParseError::HexFormat)?;
        hex::decode(digits)
            .map(Self)
            .map_err(|_| ParseError::HexFormat)
    }
}

impl fmt::Debug for HexBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HexBytes({})", self.to_hex())
    }
}

impl Serialize for HexBytes {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for HexBytes {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksummed_address_round_trips() {
        // From the EIP-55 test vectors.
        let s = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed";
        let a: Address = s.parse().unwrap();
        assert_eq!(a.to_checksum(), s);
        let lower: Address = s.to_lowercase().parse().unwrap();
        assert_eq!(lower, a);
    }

    #[test]
    fn mixed_case_with_bad_checksum_is_rejected() {
        let bad = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAeD";
        assert_eq!(bad.parse::<Address>(), Err(ParseError::AddressChecksum));
        assert_eq!("0x1234".parse::<Address>(), Err(ParseError::AddressFormat));
        assert_eq!(
            "5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed".parse::<Address>(),
            Err(ParseError::AddressFormat)
        );
    }

    #[test]
    fn amounts_parse_strictly() {
        assert_eq!("0010".parse::<Amount>().unwrap().as_str(), "10");
        assert_eq!(
            U256_MAX_DECIMAL.parse::<Amount>().unwrap().as_str(),
            U256_MAX_DECIMAL
        );
        let over = "115792089237316195423570985008687907853269984665640564039457584007913129639936";
        assert_eq!(over.parse::<Amount>(), Err(ParseError::AmountOverflow));
        for bad in ["", "-1", "1.5", "1e18", " 1", "0x10"] {
            assert!(bad.parse::<Amount>().is_err(), "{bad:?} must be rejected");
        }
        let json: Result<Amount, _> = serde_json::from_str("1.5");
        assert!(json.is_err());
        let json: Result<Amount, _> = serde_json::from_str("-3");
        assert!(json.is_err());
        let json: Amount = serde_json::from_str("42").unwrap();
        assert_eq!(json.as_str(), "42");
    }

    #[test]
    fn amount_encodes_big_endian_and_formats_units() {
        let a: Amount = "258".parse().unwrap();
        let bytes = a.to_be_bytes();
        assert_eq!(&bytes[30..], &[1, 2]);
        assert_eq!(
            U256_MAX_DECIMAL.parse::<Amount>().unwrap().to_be_bytes(),
            [0xff; 32]
        );
        let eth: Amount = "1500000000000000000".parse().unwrap();
        assert_eq!(eth.to_units(18), "1.5");
        assert_eq!(Amount::from(5).to_units(2), "0.05");
        assert_eq!(Amount::from(500).to_units(2), "5");
    }

    #[test]
    fn amount_round_trips_through_a_big_endian_word() {
        for s in ["0", "1", "258", "1500000000000000000", U256_MAX_DECIMAL] {
            let a: Amount = s.parse().unwrap();
            assert_eq!(Amount::from_be_bytes(a.to_be_bytes()), a);
        }
        assert!(Amount::from_be_bytes([0xff; 32]).is_max());
        assert_eq!(Amount::max().to_be_bytes(), [0xff; 32]);
    }
}
