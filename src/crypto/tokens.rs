//! Bearer credentials: HS256 JWTs for users, random API keys for agents.

use hmac::{Hmac, Mac};
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

const ISSUER: &str = "countersign";
const AUDIENCE: &str = "countersign-api";
const API_KEY_PREFIX: &str = "csk_";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid or expired token")]
    Invalid,
    #[error("token could not be issued")]
    Issue,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
    /// Token id: a logout revokes this one token.
    pub jti: String,
    /// The user's token version at issue; tokens behind the current version (after a
    /// password change or MFA replacement) are refused by the HTTP layer.
    pub ver: u64,
}

/// Signing and verification keys for user access tokens.
pub struct JwtKeys {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    ttl_secs: i64,
    /// Keys request fingerprints (see [`JwtKeys::fingerprint`]); derived, never the secret.
    fingerprint_key: Zeroizing<[u8; 32]>,
}

impl JwtKeys {
    pub fn new(secret: &SecretString, ttl: std::time::Duration) -> Self {
        let bytes = secret.expose_secret().as_bytes();
        // Everything is pinned: algorithm, issuer, audience, required claims, no leeway.
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_issuer(&[ISSUER]);
        validation.set_audience(&[AUDIENCE]);
        // `jti` and `ver` are not spec claims; serde requires them (no defaults).
        validation.set_required_spec_claims(&["exp", "iat", "sub", "iss", "aud"]);
        validation.leeway = 0;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut derive = Hmac::<Sha256>::new_from_slice(bytes).expect("HMAC takes any key");
        derive.update(b"countersign/request-fingerprint-key/v1");
        let fingerprint_key = Zeroizing::new(derive.finalize().into_bytes().into());
        Self {
            encoding: EncodingKey::from_secret(bytes),
            decoding: DecodingKey::from_secret(bytes),
            validation,
            ttl_secs: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2),
            fingerprint_key,
        }
    }

    /// A keyed digest (HMAC-SHA256, hex) of length-prefixed `parts`, under a key derived from
    /// the server secret: stored request fingerprints may cover passwords and MFA codes, and
    /// a plain hash of those could be guessed offline by someone reading the database.
    pub fn fingerprint(&self, label: &str, parts: &[&[u8]]) -> String {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(self.fingerprint_key.as_slice()).expect("any key");
        for part in std::iter::once(label.as_bytes()).chain(parts.iter().copied()) {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        hex::encode(mac.finalize().into_bytes())
    }

    pub fn ttl_secs(&self) -> i64 {
        self.ttl_secs
    }

    /// A token for `user_id` under the user's current `token_version`.
    pub fn issue(&self, user_id: &str, token_version: u64) -> Result<SecretString, TokenError> {
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let claims = Claims {
            sub: user_id.to_owned(),
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
            iat: now,
            exp: now + self.ttl_secs,
            jti: uuid::Uuid::new_v4().to_string(),
            ver: token_version,
        };
        encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)
            .map(SecretString::from)
            .map_err(|_| TokenError::Issue)
    }

    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let data = decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|_| TokenError::Invalid)?;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        if data.claims.iat > now + 5 {
            return Err(TokenError::Invalid);
        }
        Ok(data.claims)
    }
}

/// A freshly generated agent API key: shown once, stored only as its SHA-256.
pub struct ApiKeySecret(Zeroizing<String>);

impl ApiKeySecret {
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut_slice());
        Self(Zeroizing::new(format!(
            "{API_KEY_PREFIX}{}",
            hex::encode(bytes.as_slice())
        )))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn hash(&self) -> String {
        Self::hash_presented(&self.0)
    }

    /// Hash of a key presented by a client. 256 random bits need no slow hash: a lookup by
    /// this digest reveals nothing useful through timing.
    pub fn hash_presented(key: &str) -> String {
        hex::encode(Sha256::digest(key.as_bytes()))
    }

    /// Cheap shape check before touching the database.
    pub fn looks_valid(key: &str) -> bool {
        key.strip_prefix(API_KEY_PREFIX)
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> JwtKeys {
        JwtKeys::new(
            &SecretString::from("a-test-secret-that-is-long-enough-for-hs256"),
            std::time::Duration::from_secs(60),
        )
    }

    #[test]
    fn issued_tokens_verify_and_tampered_ones_do_not() {
        let k = keys();
        let token = k.issue("user-1", 3).unwrap();
        let claims = k.verify(token.expose_secret()).unwrap();
        assert_eq!(claims.sub, "user-1");
        assert_eq!(claims.ver, 3);
        let other = k.verify(k.issue("user-1", 3).unwrap().expose_secret());
        assert_ne!(other.unwrap().jti, claims.jti, "every token has its own id");
        let mut forged = token.expose_secret().to_owned();
        forged.pop();
        assert!(k.verify(&forged).is_err());
        let other = JwtKeys::new(
            &SecretString::from("another-secret-that-is-long-enough-for-hs256"),
            std::time::Duration::from_secs(60),
        );
        assert!(other.verify(token.expose_secret()).is_err());
    }

    #[test]
    fn fingerprints_are_keyed_and_length_prefixed() {
        let k = keys();
        let a = k.fingerprint("t", &[b"POST", b"/x", b"ab"]);
        assert_eq!(a, k.fingerprint("t", &[b"POST", b"/x", b"ab"]));
        assert_ne!(a, k.fingerprint("t", &[b"POST", b"/xa", b"b"]));
        assert_ne!(a, k.fingerprint("u", &[b"POST", b"/x", b"ab"]));
        let other = JwtKeys::new(
            &SecretString::from("another-secret-that-is-long-enough-for-hs256"),
            std::time::Duration::from_secs(60),
        );
        assert_ne!(a, other.fingerprint("t", &[b"POST", b"/x", b"ab"]));
    }

    #[test]
    fn api_keys_are_random_and_hash_stably() {
        let a = ApiKeySecret::generate();
        let b = ApiKeySecret::generate();
        assert_ne!(a.expose(), b.expose());
        assert!(ApiKeySecret::looks_valid(a.expose()));
        assert_eq!(a.hash(), ApiKeySecret::hash_presented(a.expose()));
        assert!(!ApiKeySecret::looks_valid("csk_short"));
    }
}
