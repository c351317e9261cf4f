//! Envelope encryption: each secret gets its own random data key (DEK); the secret is sealed
//! under the DEK and the DEK is wrapped under the master key (KEK), both with
//! XChaCha20-Poly1305. The associated data names the purpose and the owner (e.g. wallet address
//! and user id), so a ciphertext copied to another row or owner fails to open.
//!
//! Sealed layout (version 1): `0x01 | kek_nonce(24) | wrapped_dek(32+16) | dek_nonce(24) | ct`.

use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use zeroize::{Zeroize, Zeroizing};

const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const WRAPPED_LEN: usize = 32 + 16;
const HEADER_LEN: usize = 1 + NONCE_LEN + WRAPPED_LEN + NONCE_LEN;

/// What a sealed secret is for; part of the associated data.
#[derive(Debug, Clone, Copy)]
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

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealed secret is malformed")]
    Malformed,
    #[error("sealed secret failed authentication (wrong key, owner or purpose)")]
    Authentication,
}

/// The key-encryption key. Never printed; zeroized on drop.
pub struct MasterKey(Zeroizing<[u8; 32]>);

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
        Ok(Self(key))
    }

    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(key.as_mut_slice());
        Self(key)
    }

    pub fn to_base64(&self) -> Zeroizing<String> {
        Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0.as_slice()))
    }

    fn aad(purpose: Purpose, layer: &str, binding: &[&str]) -> Vec<u8> {
        let mut aad = format!("countersign/v1/{}/{layer}", purpose.label()).into_bytes();
        for part in binding {
            aad.push(0);
            aad.extend_from_slice(part.as_bytes());
        }
        aad
    }

    /// Seal `plaintext`, bound to `purpose` and `binding` (owner identifiers).
    pub fn seal(&self, purpose: Purpose, binding: &[&str], plaintext: &[u8]) -> Vec<u8> {
        let mut dek = Zeroizing::new([0u8; 32]);
        let mut kek_nonce = [0u8; NONCE_LEN];
        let mut dek_nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(dek.as_mut_slice());
        rand::rngs::OsRng.fill_bytes(&mut kek_nonce);
        rand::rngs::OsRng.fill_bytes(&mut dek_nonce);
        let kek = XChaCha20Poly1305::new(self.0.as_slice().into());
        let wrapped = kek
            .encrypt(
                XNonce::from_slice(&kek_nonce),
                Payload {
                    msg: dek.as_slice(),
                    aad: &Self::aad(purpose, "dek", binding),
                },
            )
            .expect("XChaCha20-Poly1305 encryption of 32 bytes cannot fail");
        let cipher = XChaCha20Poly1305::new(dek.as_slice().into());
        let ct = cipher
            .encrypt(
                XNonce::from_slice(&dek_nonce),
                Payload {
                    msg: plaintext,
                    aad: &Self::aad(purpose, "data", binding),
                },
            )
            .expect("XChaCha20-Poly1305 encryption cannot fail for in-memory data");
        let mut out = Vec::with_capacity(HEADER_LEN + ct.len());
        out.push(VERSION);
        out.extend_from_slice(&kek_nonce);
        out.extend_from_slice(&wrapped);
        out.extend_from_slice(&dek_nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Open a sealed secret; the result zeroizes on drop.
    pub fn open(
        &self,
        purpose: Purpose,
        binding: &[&str],
        sealed: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, SealError> {
        if sealed.len() < HEADER_LEN + 16 || sealed[0] != VERSION {
            return Err(SealError::Malformed);
        }
        let kek_nonce = &sealed[1..1 + NONCE_LEN];
        let wrapped = &sealed[1 + NONCE_LEN..1 + NONCE_LEN + WRAPPED_LEN];
        let dek_nonce = &sealed[1 + NONCE_LEN + WRAPPED_LEN..HEADER_LEN];
        let ct = &sealed[HEADER_LEN..];
        let kek = XChaCha20Poly1305::new(self.0.as_slice().into());
        let dek = Zeroizing::new(
            kek.decrypt(
                XNonce::from_slice(kek_nonce),
                Payload {
                    msg: wrapped,
                    aad: &Self::aad(purpose, "dek", binding),
                },
            )
            .map_err(|_| SealError::Authentication)?,
        );
        let cipher = XChaCha20Poly1305::new(dek.as_slice().into());
        cipher
            .decrypt(
                XNonce::from_slice(dek_nonce),
                Payload {
                    msg: ct,
                    aad: &Self::aad(purpose, "data", binding),
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SealError::Authentication)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_for_their_owner_and_purpose() {
        let key = MasterKey::generate();
        let sealed = key.seal(Purpose::WalletKey, &["0xabc", "user-1"], b"secret");
        let opened = key
            .open(Purpose::WalletKey, &["0xabc", "user-1"], &sealed)
            .unwrap();
        assert_eq!(opened.as_slice(), b"secret");
        assert!(key
            .open(Purpose::WalletKey, &["0xabc", "user-2"], &sealed)
            .is_err());
        assert!(key
            .open(Purpose::TotpSecret, &["0xabc", "user-1"], &sealed)
            .is_err());
        assert!(MasterKey::generate()
            .open(Purpose::WalletKey, &["0xabc", "user-1"], &sealed)
            .is_err());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(key
            .open(Purpose::WalletKey, &["0xabc", "user-1"], &tampered)
            .is_err());
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
}
