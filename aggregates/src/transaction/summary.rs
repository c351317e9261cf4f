//! The one-line, human-readable summary on an approval prompt ("Send 1.5 ETH to 0xAb…12").
//!
//! Pure formatting of facts the shell gathered beforehand (token symbol and decimals read from
//! the chain, call arguments decoded with a contract's ABI, the simulation outcome), plus the
//! fixed ERC20 calls every wallet must recognise. No IO here: whatever needed the chain was read
//! before these functions are called.

use super::SimulationOutcome;
use crate::types::{Address, Amount, HexBytes};

/// `transfer(address,uint256)`
pub const ERC20_TRANSFER: [u8; 4] = [0xa9, 0x05, 0x9c, 0xbb];
/// `approve(address,uint256)`
pub const ERC20_APPROVE: [u8; 4] = [0x09, 0x5e, 0xa7, 0xb3];
/// `transferFrom(address,address,uint256)`
pub const ERC20_TRANSFER_FROM: [u8; 4] = [0x23, 0xb8, 0x72, 0xdd];

/// Longest revert reason (in characters) quoted in a summary; the rest is cut.
const MAX_REASON_CHARS: usize = 200;
/// Calldata bytes shown in full before a summary abbreviates them.
const MAX_SHOWN_CALLDATA: usize = 68;

/// The ERC20 calls a human must recognise whatever ABI (if any) came with them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Erc20Call {
    Transfer {
        to: Address,
        amount: Amount,
    },
    Approve {
        spender: Address,
        amount: Amount,
    },
    TransferFrom {
        from: Address,
        to: Address,
        amount: Amount,
    },
}

fn address_word(word: &[u8]) -> Option<Address> {
    // An ABI-encoded address is left-padded with exactly twelve zero bytes.
    let (padding, bytes) = word.split_at(12);
    if padding.iter().any(|b| *b != 0) {
        return None;
    }
    Some(Address::from_bytes(bytes.try_into().ok()?))
}

fn amount_word(word: &[u8]) -> Option<Amount> {
    Some(Amount::from_be_bytes(word.try_into().ok()?))
}

impl Erc20Call {
    /// Recognise canonical calldata for one of the three calls (exact length, clean padding).
    pub fn decode(data: &[u8]) -> Option<Self> {
        let (selector, args) = data.split_at_checked(4)?;
        let words: Vec<&[u8]> = args.chunks(32).collect();
        if args.len() % 32 != 0 {
            return None;
        }
        match (<[u8; 4]>::try_from(selector).ok()?, words.as_slice()) {
            (ERC20_TRANSFER, [to, amount]) => Some(Self::Transfer {
                to: address_word(to)?,
                amount: amount_word(amount)?,
            }),
            (ERC20_APPROVE, [spender, amount]) => Some(Self::Approve {
                spender: address_word(spender)?,
                amount: amount_word(amount)?,
            }),
            (ERC20_TRANSFER_FROM, [from, to, amount]) => Some(Self::TransferFrom {
                from: address_word(from)?,
                to: address_word(to)?,
                amount: amount_word(amount)?,
            }),
            _ => None,
        }
    }

    /// The canonical calldata.
    pub fn encode(&self) -> HexBytes {
        fn push_address(out: &mut Vec<u8>, a: &Address) {
            out.extend_from_slice(&[0u8; 12]);
            out.extend_from_slice(a.as_bytes());
        }
        let mut out = Vec::with_capacity(4 + 96);
        match self {
            Self::Transfer { to, amount } => {
                out.extend_from_slice(&ERC20_TRANSFER);
                push_address(&mut out, to);
                out.extend_from_slice(&amount.to_be_bytes());
            }
            Self::Approve { spender, amount } => {
                out.extend_from_slice(&ERC20_APPROVE);
                push_address(&mut out, spender);
                out.extend_from_slice(&amount.to_be_bytes());
            }
            Self::TransferFrom { from, to, amount } => {
                out.extend_from_slice(&ERC20_TRANSFER_FROM);
                push_address(&mut out, from);
                push_address(&mut out, to);
                out.extend_from_slice(&amount.to_be_bytes());
            }
        }
        HexBytes::new(out)
    }
}

/// What the chain said about a token. Either part may be missing (the token did not answer, or
/// answered something unfit to show); amounts are then shown in base units.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenInfo {
    symbol: Option<String>,
    decimals: Option<u8>,
}

impl TokenInfo {
    /// Keeps only what is safe to put in front of a human: a short ASCII symbol (a token
    /// chooses its own symbol, so no control characters, look-alike letters or essays) and a
    /// decimals value an amount can have.
    pub fn new(symbol: Option<&str>, decimals: Option<u8>) -> Self {
        let symbol = symbol.map(str::trim).filter(|s| {
            (1..=16).contains(&s.len())
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.$+".contains(&b))
        });
        Self {
            symbol: symbol.map(str::to_owned),
            decimals: decimals.filter(|d| *d <= 77),
        }
    }

    pub fn symbol(&self) -> Option<&str> {
        self.symbol.as_deref()
    }

    pub fn decimals(&self) -> Option<u8> {
        self.decimals
    }

    /// "250 TUSD" when symbol and decimals are known, else "250000000 base units".
    pub fn format(&self, amount: &Amount) -> String {
        match (&self.symbol, self.decimals) {
            (Some(symbol), Some(decimals)) => format!("{} {symbol}", amount.to_units(decimals)),
            (Some(symbol), None) => format!("{amount} base units of {symbol}"),
            _ => format!("{amount} base units"),
        }
    }
}

fn sending(value: &Amount) -> String {
    if value.is_zero() {
        String::new()
    } else {
        format!(", sending {} ETH", value.to_units(18))
    }
}

/// "Send 1.5 ETH to 0xAbCd…1234".
pub fn native_transfer(to: &Address, value: &Amount) -> String {
    format!("Send {} ETH to {}", value.to_units(18), to.short())
}

/// A recognised ERC20 call on `token_address`, amounts in the token's units when known.
pub fn erc20_call(token_address: &Address, token: &TokenInfo, call: &Erc20Call) -> String {
    let token_ref = format!("(token {})", token_address.short());
    match call {
        Erc20Call::Transfer { to, amount } => format!(
            "Transfer {} {token_ref} to {}",
            token.format(amount),
            to.short()
        ),
        Erc20Call::TransferFrom { from, to, amount } => format!(
            "Transfer {} {token_ref} from {} to {}",
            token.format(amount),
            from.short(),
            to.short()
        ),
        Erc20Call::Approve { spender, amount } => {
            let allowance = if amount.is_max() {
                format!("an UNLIMITED amount of {}", token.symbol().unwrap_or("it"))
            } else {
                token.format(amount)
            };
            format!(
                "Approve {} to spend {allowance} {token_ref}",
                spender.short()
            )
        }
    }
}

/// An ERC20 call that also carries ETH (unusual, so it is spelled out).
pub fn erc20_call_with_value(
    token_address: &Address,
    token: &TokenInfo,
    call: &Erc20Call,
    value: &Amount,
) -> String {
    format!(
        "{}{}",
        erc20_call(token_address, token, call),
        sending(value)
    )
}

/// A call whose function and arguments were decoded with its ABI: "Call increment(by: 5) on
/// 0xAbCd…1234".
pub fn decoded_call(to: &Address, value: &Amount, call: &str) -> String {
    format!("Call {call} on {}{}", to.short(), sending(value))
}

/// A call nothing is known about: its selector and (abbreviated) raw calldata.
pub fn raw_call(to: &Address, value: &Amount, data: &HexBytes) -> String {
    let bytes = data.as_slice();
    let Some(selector) = bytes.get(..4) else {
        return format!("Send {} ETH to contract {}", value.to_units(18), to.short());
    };
    let shown = if bytes.len() <= MAX_SHOWN_CALLDATA {
        data.to_hex()
    } else {
        format!("0x{}…", hex::encode(&bytes[..MAX_SHOWN_CALLDATA]))
    };
    format!(
        "Call unknown function 0x{} on {} (calldata {shown}, {} bytes){}",
        hex::encode(selector),
        to.short(),
        bytes.len(),
        sending(value)
    )
}

/// Add what the simulation found, when it is something the human must know before deciding.
pub fn with_simulation(summary: String, outcome: &SimulationOutcome) -> String {
    match outcome {
        SimulationOutcome::Success => summary,
        SimulationOutcome::Reverted { reason } => {
            let cleaned: String = reason
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect();
            let cleaned = cleaned.trim();
            let mut shown: String = cleaned.chars().take(MAX_REASON_CHARS).collect();
            if cleaned.chars().count() > MAX_REASON_CHARS {
                shown.push('…');
            }
            format!("{summary} — WARNING: simulation reverts: \"{shown}\"")
        }
        SimulationOutcome::Unavailable { .. } => {
            format!("{summary} — not simulated (chain node unreachable)")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Address {
        s.parse().unwrap()
    }

    const TOKEN: &str = "0x5FbDB2315678afecb367f032d93F642f64180aa3";
    const BOB: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
    const CAROL: &str = "0x3C44CdDdB6a900fa2b585dd299e03d12FA4293BC";

    #[test]
    fn native_transfers_read_in_ether() {
        let value: Amount = "1500000000000000000".parse().unwrap();
        assert_eq!(
            native_transfer(&addr(BOB), &value),
            "Send 1.5 ETH to 0x7099…79C8"
        );
    }

    #[test]
    fn erc20_calls_round_trip_through_calldata() {
        let calls = [
            Erc20Call::Transfer {
                to: addr(BOB),
                amount: Amount::from(250_000_000),
            },
            Erc20Call::Approve {
                spender: addr(BOB),
                amount: Amount::max(),
            },
            Erc20Call::TransferFrom {
                from: addr(BOB),
                to: addr(CAROL),
                amount: Amount::from(5),
            },
        ];
        for call in calls {
            assert_eq!(Erc20Call::decode(call.encode().as_slice()), Some(call));
        }
    }

    #[test]
    fn non_canonical_calldata_is_not_taken_for_an_erc20_call() {
        let mut data = Erc20Call::Transfer {
            to: addr(BOB),
            amount: Amount::from(1),
        }
        .encode()
        .as_slice()
        .to_vec();
        data.push(0);
        assert_eq!(Erc20Call::decode(&data), None, "trailing byte");
        data.pop();
        data[4] = 1; // dirty address padding
        assert_eq!(Erc20Call::decode(&data), None);
        assert_eq!(Erc20Call::decode(&[0xd0, 0xe3, 0x0d, 0xb0]), None);
        assert_eq!(Erc20Call::decode(&[0xa9]), None);
    }

    #[test]
    fn token_amounts_use_symbol_and_decimals_when_the_token_gives_them() {
        let token = TokenInfo::new(Some("TUSD"), Some(6));
        let call = Erc20Call::Transfer {
            to: addr(BOB),
            amount: Amount::from(250_000_000),
        };
        assert_eq!(
            erc20_call(&addr(TOKEN), &token, &call),
            "Transfer 250 TUSD (token 0x5FbD…0aa3) to 0x7099…79C8"
        );
        assert_eq!(
            erc20_call(&addr(TOKEN), &TokenInfo::default(), &call),
            "Transfer 250000000 base units (token 0x5FbD…0aa3) to 0x7099…79C8"
        );
    }

    #[test]
    fn unfit_token_symbols_are_not_shown() {
        for bad in ["", "USD\nC", "A VERY LONG SYMBOL NAME", "ＵＳＤＣ"] {
            assert_eq!(TokenInfo::new(Some(bad), Some(6)).symbol(), None, "{bad:?}");
        }
        assert_eq!(TokenInfo::new(Some("USDC"), Some(200)).decimals(), None);
    }

    #[test]
    fn approvals_and_transfer_from_are_spelled_out() {
        let token = TokenInfo::new(Some("TUSD"), Some(6));
        let unlimited = Erc20Call::Approve {
            spender: addr(BOB),
            amount: Amount::max(),
        };
        assert_eq!(
            erc20_call(&addr(TOKEN), &token, &unlimited),
            "Approve 0x7099…79C8 to spend an UNLIMITED amount of TUSD (token 0x5FbD…0aa3)"
        );
        let from = Erc20Call::TransferFrom {
            from: addr(BOB),
            to: addr(CAROL),
            amount: Amount::from(1_500_000),
        };
        assert_eq!(
            erc20_call(&addr(TOKEN), &token, &from),
            "Transfer 1.5 TUSD (token 0x5FbD…0aa3) from 0x7099…79C8 to 0x3C44…93BC"
        );
    }

    #[test]
    fn unknown_calls_show_selector_and_calldata() {
        let data: HexBytes = "0xd0e30db0".parse().unwrap();
        assert_eq!(
            raw_call(&addr(TOKEN), &Amount::from(10u64.pow(18)), &data),
            "Call unknown function 0xd0e30db0 on 0x5FbD…0aa3 (calldata 0xd0e30db0, 4 bytes), \
             sending 1 ETH"
        );
        let long = HexBytes::new(vec![0xab; 100]);
        assert!(raw_call(&addr(TOKEN), &Amount::zero(), &long).ends_with("…, 100 bytes)"));
    }

    #[test]
    fn a_revert_found_by_simulation_is_shown_with_the_summary() {
        let warned = with_simulation(
            "Call increment(by: 1) on 0x5FbD…0aa3".into(),
            &SimulationOutcome::Reverted {
                reason: "Target: paused\n".into(),
            },
        );
        assert_eq!(
            warned,
            "Call increment(by: 1) on 0x5FbD…0aa3 — WARNING: simulation reverts: \"Target: paused\""
        );
        assert_eq!(
            with_simulation("x".into(), &SimulationOutcome::Success),
            "x"
        );
    }
}
