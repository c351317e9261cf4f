//! Envelope encryption: each secret gets its own random data key (DEK); the secret is sealed
//! under the DEK and the DEK is wrapped under the master key (KEK), both with
//! XChaCha20-Poly1305. The associated data names the purpose and the owner (e.g. wallet address
//! and user id), so a ciphertext copied to another row or owner fails to open.
//!
//! Sealed layouts:
//! - version 2 (written now): `0x02 | key_id(8) | kek_nonce(24) | wrapped_dek(32+16) |
//!   dek_nonce(24) | ct`. `key_id` names the master key that wrapped the DEK, so a server
//!   holding several keys (during a rotation) picks the right one and `keys status` can count
//!   blobs per key without opening anything.
//! - version 1 (still read): the same without `key_id`; opened by trying each configured key.
//!
//! Rotation rewraps only the DEK ([`MasterKey::rewrap`]): the secret's ciphertext, its nonce
//! and the associated data are unchanged, and the secret itself is never decrypted.

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use sha2::{Digest, Sha256};
use zeroize::{Zeroize, Zeroizing};

const V1: u8 = 1;
const V2: u8 = 2;
const KEY_ID_LEN: usize = 8;
const NONCE_LEN: usize = 24;
const WRAPPED_LEN: usize = 32 + 16;
/// Everything after the version byte (and key id) up to the ciphertext.
const ENVELOPE_LEN: usize = NONCE_LEN + WRAPPED_LEN + NONCE_LEN;
const TAG_LEN: usize = 16;

/// What a sealed secret is for; part of the associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    WalletKey,
    TotpSecret,
    /// The Ed25519 key that signs audit checkpoints.
    AuditSigningKey,
}

impl Purpose {
    fn label(self) -> &'static str {
        match self {
            Self::WalletKey => "wallet-key",
            Self::TotpSecret => "totp-secret",
            Self::AuditSigningKey => "audit-signing-key",
        }
    }
}

/// A short public fingerprint of a master key: the first 8 bytes of
/// SHA-256("countersign/master-key-id/v1" ‖ key), shown as 16 hex digits. It names the key in
/// sealed blobs, errors and reports; it reveals nothing usable about the key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId([u8; KEY_ID_LEN]);

impl KeyId {
    fn of(key: &[u8; 32]) -> Self {
        let digest = Sha256::new()
            .chain_update(b"countersign/master-key-id/v1")
            .chain_update(key)
            .finalize();
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&digest[..KEY_ID_LEN]);
        Self(id)
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealed secret is malformed")]
    Malformed,
    #[error("sealed secret failed authentication (wrong key, owner or purpose)")]
    Authentication,
    #[error(
        "sealed under master key {key_id}, which this process does not have (it has {}): \
         configure that key in COUNTERSIGN_MASTER_KEY or COUNTERSIGN_PREVIOUS_MASTER_KEYS",
        list(configured)
    )]
    UnknownKey {
        key_id: KeyId,
        configured: Vec<KeyId>,
    },
}

fn list(ids: &[KeyId]) -> String {
    ids.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// One key-encryption key with its id. The bytes zeroize on drop.
struct Kek {
    id: KeyId,
    key: Zeroizing<[u8; 32]>,
}

impl Kek {
    fn new(key: Zeroizing<[u8; 32]>) -> Self {
        Self {
            id: KeyId::of(&key),
            key,
        }
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        // The cipher copies the key and zeroizes its copy on drop.
        XChaCha20Poly1305::new(self.key.as_slice().into())
    }

    /// Wrap a data key; returns `(nonce, wrapped)`.
    fn wrap(
        &self,
        purpose: Purpose,
        binding: &[&str],
        dek: &[u8; 32],
    ) -> ([u8; NONCE_LEN], Vec<u8>) {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let wrapped = self
            .cipher()
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: dek,
                    aad: &aad(purpose, "dek", binding),
                },
            )
            .expect("XChaCha20-Poly1305 encryption of 32 bytes cannot fail");
        (nonce, wrapped)
    }

    fn unwrap(
        &self,
        purpose: Purpose,
        binding: &[&str],
        parsed: &Parsed<'_>,
    ) -> Result<Zeroizing<[u8; 32]>, SealError> {
        let opened = Zeroizing::new(
            self.cipher()
                .decrypt(
                    XNonce::from_slice(parsed.kek_nonce),
                    Payload {
                        msg: parsed.wrapped,
                        aad: &aad(purpose, "dek", binding),
                    },
                )
                .map_err(|_| SealError::Authentication)?,
        );
        let mut dek = Zeroizing::new([0u8; 32]);
        if opened.len() != dek.len() {
            return Err(SealError::Malformed);
        }
        dek.copy_from_slice(&opened);
        Ok(dek)
    }
}

/// The associated data of either layer. Unchanged since version 1, so a rewrapped blob keeps
/// its ciphertext and old blobs still open.
fn aad(purpose: Purpose, layer: &str, binding: &[&str]) -> Vec<u8> {
    let mut aad = format!("countersign/v1/{}/{layer}", purpose.label()).into_bytes();
    for part in binding {
        aad.push(0);
        aad.extend_from_slice(part.as_bytes());
    }
    aad
}

/// A sealed blob split into its parts (borrowed).
struct Parsed<'a> {
    /// `None`: version 1, which did not record the key.
    key_id: Option<KeyId>,
    kek_nonce: &'a [u8],
    wrapped: &'a [u8],
    /// The data layer (`dek_nonce | ct`), kept verbatim by a rewrap.
    data: &'a [u8],
}

impl<'a> Parsed<'a> {
    fn parse(sealed: &'a [u8]) -> Result<Self, SealError> {
        let (key_id, rest) = match sealed.first() {
            Some(&V1) => (None, &sealed[1..]),
            Some(&V2) if sealed.len() > 1 + KEY_ID_LEN => {
                let mut id = [0u8; KEY_ID_LEN];
                id.copy_from_slice(&sealed[1..1 + KEY_ID_LEN]);
                (Some(KeyId(id)), &sealed[1 + KEY_ID_LEN..])
            }
            _ => return Err(SealError::Malformed),
        };
        if rest.len() < ENVELOPE_LEN + TAG_LEN {
            return Err(SealError::Malformed);
        }
        let (kek_nonce, rest) = rest.split_at(NONCE_LEN);
        let (wrapped, data) = rest.split_at(WRAPPED_LEN);
        Ok(Self {
            key_id,
            kek_nonce,
            wrapped,
            data,
        })
    }
}

fn assemble(key_id: KeyId, kek_nonce: &[u8], wrapped: &[u8], data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + KEY_ID_LEN + NONCE_LEN + WRAPPED_LEN + data.len());
    out.push(V2);
    out.extend_from_slice(&key_id.0);
    out.extend_from_slice(kek_nonce);
    out.extend_from_slice(wrapped);
    out.extend_from_slice(data);
    out
}

/// The master key (key-encryption key) that seals new secrets, plus any previous master keys
/// still accepted for opening during a rotation. Never printed; zeroized on drop.
pub struct MasterKey {
    current: Kek,
    previous: Vec<Kek>,
}

/// Shows key ids only.
impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey")
            .field("key_id", &self.current.id)
            .field("previous", &self.previous_key_ids())
            .finish()
    }
}

impl MasterKey {
    pub fn from_base64(s: &str) -> Result<Self, String> {
        let mut bytes = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(s.trim())
                .map_err(|_| "must be base64 (standard alphabet)".to_owned())?,
        );
        if bytes.len() != 32 {
            return Err(format!("must decode to 32 bytes, got {}", bytes.len()));
        }
        if bytes.iter().all(|b| *b == bytes[0]) {
            return Err("is not random (all bytes equal)".to_owned());
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&bytes);
        bytes.zeroize();
        Ok(Self::from_kek(Kek::new(key)))
    }

    /// Comma-separated base64 keys (`COUNTERSIGN_PREVIOUS_MASTER_KEYS`); blanks are skipped.
    pub fn list_from_base64(s: &str) -> Result<Vec<Self>, String> {
        s.split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .enumerate()
            .map(|(i, part)| Self::from_base64(part).map_err(|why| format!("key {}: {why}", i + 1)))
            .collect()
    }

    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut_slice());
        Self::from_kek(Kek::new(key))
    }

    fn from_kek(current: Kek) -> Self {
        Self {
            current,
            previous: Vec::new(),
        }
    }

    /// Also accept `previous` keys (and theirs) for opening; new seals still use this key.
    /// Duplicates, and the current key itself, are dropped.
    pub fn with_previous(mut self, previous: impl IntoIterator<Item = MasterKey>) -> Self {
        for old in previous {
            for kek in std::iter::once(old.current).chain(old.previous) {
                if !self.knows(kek.id) {
                    self.previous.push(kek);
                }
            }
        }
        self
    }

    /// The current key, base64 (no previous keys).
    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(
            base64::engine::general_purpose::STANDARD.encode(self.current.key.as_slice()),
        )
    }

    /// The id of the key new seals use.
    pub fn key_id(&self) -> KeyId {
        self.current.id
    }

    /// The ids of the previous keys accepted for opening.
    pub fn previous_key_ids(&self) -> Vec<KeyId> {
        self.previous.iter().map(|k| k.id).collect()
    }

    /// Whether a blob sealed under `id` can be opened here.
    pub fn knows(&self, id: KeyId) -> bool {
        self.keys().any(|k| k.id == id)
    }

    fn keys(&self) -> impl Iterator<Item = &Kek> {
        std::iter::once(&self.current).chain(&self.previous)
    }

    /// The master key a blob says it was sealed under; `Ok(None)` for the version-1 format,
    /// which does not record it.
    pub fn sealed_key_id(sealed: &[u8]) -> Result<Option<KeyId>, SealError> {
        Parsed::parse(sealed).map(|p| p.key_id)
    }

    /// Seal `plaintext` under the current key, bound to `purpose` and `binding` (owner
    /// identifiers).
    pub fn seal(&self, purpose: Purpose, binding: &[&str], plaintext: &[u8]) -> Vec<u8> {
        let mut dek = Zeroizing::new([0u8; 32]);
        let mut dek_nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(dek.as_mut_slice());
        rand::rngs::OsRng.fill_bytes(&mut dek_nonce);
        let (kek_nonce, wrapped) = self.current.wrap(purpose, binding, &dek);
        let cipher = XChaCha20Poly1305::new(dek.as_slice().into());
        let ct = cipher
            .encrypt(
                XNonce::from_slice(&dek_nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad(purpose, "data", binding),
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory data");
        let mut data = Vec::with_capacity(NONCE_LEN + ct.len());
        data.extend_from_slice(&dek_nonce);
        data.extend_from_slice(&ct);
        assemble(self.current.id, &kek_nonce, &wrapped, &data)
    }

    /// Unwrap a blob's data key with the key it names (version 2), or with whichever
    /// configured key opens it (version 1).
    fn unwrap_dek(
        &self,
        purpose: Purpose,
        binding: &[&str],
        parsed: &Parsed<'_>,
    ) -> Result<Zeroizing<[u8; 32]>, SealError> {
        match parsed.key_id {
            Some(id) => self
                .keys()
                .find(|k| k.id == id)
                .ok_or_else(|| SealError::UnknownKey {
                    key_id: id,
                    configured: self.keys().map(|k| k.id).collect(),
                })?
                .unwrap(purpose, binding, parsed),
            None => self
                .keys()
                .find_map(|k| k.unwrap(purpose, binding, parsed).ok())
                .ok_or(SealError::Authentication),
        }
    }

    /// Open a sealed secret; the result zeroizes on drop.
    pub fn open(
        &self,
        purpose: Purpose,
        binding: &[&str],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        let parsed = Parsed::parse(sealed)?;
        let dek = self.unwrap_dek(purpose, binding, &parsed)?;
        let (dek_nonce, ct) = parsed.data.split_at(NONCE_LEN);
        XChaCha20Poly1305::new(dek.as_slice().into())
            .decrypt(
                XNonce::from_slice(dek_nonce),
                Payload {
                    msg: ct,
                    aad: &aad(purpose, "data", binding),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SealError::Authentication)
    }

    /// Rewrap a blob's data key under the current key, for a rotation. `Ok(None)` if it already
    /// is (version 2 naming the current key). Only the data key is decrypted (and zeroized);
    /// the secret's ciphertext is kept byte for byte and the binding still applies: unwrapping
    /// checks `purpose` and `binding` like `open` does.
    pub fn rewrap(
        &self,
        purpose: Purpose,
        binding: &[&str],
        sealed: &[u8],
    ) -> Result<Option<Vec<u8>>, SealError> {
        let parsed = Parsed::parse(sealed)?;
        if parsed.key_id == Some(self.current.id) {
            return Ok(None);
        }
        let dek = self.unwrap_dek(purpose, binding, &parsed)?;
        let (kek_nonce, wrapped) = self.current.wrap(purpose, binding, &dek);
        Ok(Some(assemble(
            self.current.id,
            &kek_nonce,
            &wrapped,
            parsed.data,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWNER: [&str; 2] = ["0xabc", "user-1"];

    /// Written by the version-1 code (before key ids): key, then the sealed blob of
    /// `b"legacy secret"` as a wallet key bound to `OWNER`.
    const V1_KEY: &str = "XNdgE5OpMwIX2iY/PStW9AbHLKYc/J+q3O89me4Caiw=";
    const V1_SEALED: &str = "01e6fe92c1b718829891cfa48b943ee4a5fb748081ebd43266a059ecf964d62ef0273f0dd5102fd37196c1a41da7785eab011ef122ac7adc9092a8aa5befff4fcf6bc7134b453acafdacd9e6c1c66936942db752da963ecfecde0722c77250e3a21933c5e5383c5a5e8d8eed139e94a89c2e2f51b33be7a32bcbd8660aad";

    fn key_b64(key: &MasterKey) -> String {
        key.to_base64().as_str().to_owned()
    }

    fn copy(key: &MasterKey) -> MasterKey {
        MasterKey::from_base64(&key_b64(key)).unwrap()
    }

    #[test]
    fn sealed_secrets_open_only_for_their_owner_and_purpose() {
        let key = MasterKey::generate();
        let sealed = key.seal(Purpose::WalletKey, &OWNER, b"secret");
        let opened = key.open(Purpose::WalletKey, &OWNER, &sealed).unwrap();
        assert_eq!(opened.as_slice(), b"secret");
        assert!(key
            .open(Purpose::WalletKey, &["0xabc", "user-2"], &sealed)
            .is_err());
        assert!(key.open(Purpose::TotpSecret, &OWNER, &sealed).is_err());
        assert!(MasterKey::generate()
            .open(Purpose::WalletKey, &OWNER, &sealed)
            .is_err());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(key.open(Purpose::WalletKey, &OWNER, &tampered).is_err());
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
    }

    #[test]
    fn weak_master_keys_are_refused() {
        assert!(MasterKey::from_base64("AAAA").is_err());
        let zeros = base64::engine::general_purpose::STANDARD.encode([0u8; 32]);
        assert!(MasterKey::from_base64(&zeros).is_err());
        let good = MasterKey::generate().to_base64();
        assert!(MasterKey::from_base64(&good).is_ok());
    }

    #[test]
    fn new_seals_name_the_current_key() {
        let key = MasterKey::generate();
        let sealed = key.seal(Purpose::TotpSecret, &OWNER, b"secret");
        assert_eq!(sealed[0], V2);
        assert_eq!(
            MasterKey::sealed_key_id(&sealed).unwrap(),
            Some(key.key_id())
        );
        // The id is a stable fingerprint, distinct per key, 16 hex digits.
        assert_eq!(copy(&key).key_id(), key.key_id());
        assert_ne!(MasterKey::generate().key_id(), key.key_id());
        let shown = key.key_id().to_string();
        assert_eq!(shown.len(), 16);
        assert!(shown.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(!key_b64(&key).contains(&shown));
    }

    #[test]
    fn version_1_blobs_still_open_and_rewrap_to_version_2() {
        let key = MasterKey::from_base64(V1_KEY).unwrap();
        let legacy = hex::decode(V1_SEALED).unwrap();
        assert_eq!(MasterKey::sealed_key_id(&legacy).unwrap(), None);
        let opened = key.open(Purpose::WalletKey, &OWNER, &legacy).unwrap();
        assert_eq!(opened.as_slice(), b"legacy secret");
        // Found by trial among the configured keys, current or previous.
        let rotated = MasterKey::generate().with_previous([copy(&key)]);
        assert_eq!(
            rotated
                .open(Purpose::WalletKey, &OWNER, &legacy)
                .unwrap()
                .as_slice(),
            b"legacy secret"
        );
        // Rewrapping adds the key id even under the same key; the data layer is kept.
        let same = key
            .rewrap(Purpose::WalletKey, &OWNER, &legacy)
            .unwrap()
            .unwrap();
        assert_eq!(MasterKey::sealed_key_id(&same).unwrap(), Some(key.key_id()));
        let data_layer = &legacy[1 + NONCE_LEN + WRAPPED_LEN..];
        assert!(same.ends_with(data_layer));
        assert_eq!(
            key.open(Purpose::WalletKey, &OWNER, &same)
                .unwrap()
                .as_slice(),
            b"legacy secret"
        );
        // A legacy blob no configured key opens is an authentication failure.
        assert!(matches!(
            MasterKey::generate().open(Purpose::WalletKey, &OWNER, &legacy),
            Err(SealError::Authentication)
        ));
    }

    #[test]
    fn rotation_rewraps_the_data_key_under_the_new_key() {
        let old = MasterKey::generate();
        let new = MasterKey::generate();
        let sealed = old.seal(Purpose::WalletKey, &OWNER, b"wallet key");

        // During the rotation: new seals under the new key, everything opens.
        let both = copy(&new).with_previous([copy(&old)]);
        assert_eq!(both.key_id(), new.key_id());
        assert_eq!(both.previous_key_ids(), vec![old.key_id()]);
        assert!(both.knows(old.key_id()) && both.knows(new.key_id()));
        assert_eq!(
            both.open(Purpose::WalletKey, &OWNER, &sealed)
                .unwrap()
                .as_slice(),
            b"wallet key"
        );
        let fresh = both.seal(Purpose::WalletKey, &OWNER, b"other");
        assert_eq!(
            MasterKey::sealed_key_id(&fresh).unwrap(),
            Some(new.key_id())
        );

        let rewrapped = both
            .rewrap(Purpose::WalletKey, &OWNER, &sealed)
            .unwrap()
            .expect("under the old key, so rewrapped");
        assert_eq!(
            MasterKey::sealed_key_id(&rewrapped).unwrap(),
            Some(new.key_id())
        );
        // Only the wrapped data key changed: the secret's nonce and ciphertext are identical.
        let data_at = 1 + KEY_ID_LEN + NONCE_LEN + WRAPPED_LEN;
        assert_eq!(rewrapped[data_at..], sealed[data_at..]);
        assert_ne!(rewrapped[..data_at], sealed[..data_at]);
        // Idempotent: a blob already under the current key is left alone.
        assert!(both
            .rewrap(Purpose::WalletKey, &OWNER, &rewrapped)
            .unwrap()
            .is_none());

        // After the rotation the new key alone opens it; the binding still holds.
        assert_eq!(
            new.open(Purpose::WalletKey, &OWNER, &rewrapped)
                .unwrap()
                .as_slice(),
            b"wallet key"
        );
        assert!(matches!(
            new.open(Purpose::WalletKey, &["0xabc", "user-2"], &rewrapped),
            Err(SealError::Authentication)
        ));
        assert!(matches!(
            new.open(Purpose::TotpSecret, &OWNER, &rewrapped),
            Err(SealError::Authentication)
        ));
        // A rewrap under the wrong owner or purpose is refused, not laundered.
        assert!(both
            .rewrap(Purpose::WalletKey, &["0xabc", "user-2"], &sealed)
            .is_err());
        assert!(both.rewrap(Purpose::TotpSecret, &OWNER, &sealed).is_err());
    }

    #[test]
    fn a_blob_under_a_key_not_configured_names_both_keys() {
        let old = MasterKey::generate();
        let new = MasterKey::generate();
        let sealed = new.seal(Purpose::TotpSecret, &OWNER, b"secret");
        let err = old.open(Purpose::TotpSecret, &OWNER, &sealed).unwrap_err();
        assert!(
            matches!(&err, SealError::UnknownKey { key_id, configured }
                if *key_id == new.key_id() && configured == &vec![old.key_id()]),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(message.contains(&new.key_id().to_string()), "{message}");
        assert!(message.contains(&old.key_id().to_string()), "{message}");
        assert!(
            message.contains("COUNTERSIGN_PREVIOUS_MASTER_KEYS"),
            "{message}"
        );
        assert!(old.rewrap(Purpose::TotpSecret, &OWNER, &sealed).is_err());
    }

    #[test]
    fn previous_keys_parse_from_a_list_without_duplicates() {
        let a = MasterKey::generate();
        let b = MasterKey::generate();
        let list = format!(" {} ,{},, {} ", key_b64(&a), key_b64(&b), key_b64(&a));
        let parsed = MasterKey::list_from_base64(&list).unwrap();
        assert_eq!(parsed.len(), 3);
        let ring = copy(&a).with_previous(parsed);
        // The current key and the repeat are dropped from the previous keys.
        assert_eq!(ring.previous_key_ids(), vec![b.key_id()]);
        assert!(MasterKey::list_from_base64("").unwrap().is_empty());
        let err = MasterKey::list_from_base64(&format!("{},AAAA", key_b64(&a))).unwrap_err();
        assert!(err.starts_with("key 2:"), "{err}");
    }

    #[test]
    fn malformed_blobs_are_refused() {
        let key = MasterKey::generate();
        let sealed = key.seal(Purpose::WalletKey, &OWNER, b"x");
        for bad in [
            &[][..],
            &[V2][..],
            &[3u8; 200][..],
            &sealed[..sealed.len() - TAG_LEN - 1],
        ] {
            assert!(matches!(
                key.open(Purpose::WalletKey, &OWNER, bad),
                Err(SealError::Malformed)
            ));
            assert!(key.rewrap(Purpose::WalletKey, &OWNER, bad).is_err());
        }
    }
}
