//! Password hashing with argon2id (OWASP: m=19 MiB, t=2, p=1) on the blocking pool.
//! Unknown users are verified against a dummy hash so both failure paths take the same time.

use std::sync::LazyLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use secrecy::{ExposeSecret, SecretString};

pub const MIN_PASSWORD_LEN: usize = 12;
pub const MAX_PASSWORD_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password hashing failed")]
    Hash,
    #[error("blocking task failed")]
    Join,
}

fn argon2() -> Argon2<'static> {
    Argon2::new(
        Algorithm::Argon2id,
        Version::V0x13,
        Params::new(19 * 1024, 2, 1, None).expect("valid argon2 parameters"),
    )
}

/// A hash of a random password, used when the user does not exist.
static DUMMY_HASH: LazyLock<String> = LazyLock::new(|| {
    let salt = SaltString::generate(&mut rand::rngs::OsRng);
    argon2()
        .hash_password(b"countersign-dummy-password-for-timing", &salt)
        .expect("hashing a constant cannot fail")
        .to_string()
});

/// At most one argon2 computation per core at a time: each needs 19 MiB and a core for ~20 ms,
/// so an unbounded burst of logins would exhaust memory and starve every other request.
static HASHING: LazyLock<tokio::sync::Semaphore> = LazyLock::new(|| {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    tokio::sync::Semaphore::new(cores)
});

/// Run `work` on the blocking pool once a hashing slot is free.
async fn hashing<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, PasswordError> + Send + 'static,
) -> Result<T, PasswordError> {
    let _slot = HASHING.acquire().await.map_err(|_| PasswordError::Join)?;
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|_| PasswordError::Join)?
}

pub async fn hash_password(password: SecretString) -> Result<String, PasswordError> {
    hashing(move || {
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        argon2()
            .hash_password(password.expose_secret().as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|_| PasswordError::Hash)
    })
    .await
}

/// True only if `stored` exists and matches. Takes the same time when `stored` is `None`.
pub async fn verify_password(
    password: SecretString,
    stored: Option<String>,
) -> Result<bool, PasswordError> {
    hashing(move || {
        let exists = stored.is_some();
        let hash = stored.unwrap_or_else(|| DUMMY_HASH.clone());
        let parsed = PasswordHash::new(&hash).map_err(|_| PasswordError::Hash)?;
        let ok = argon2()
            .verify_password(password.expose_secret().as_bytes(), &parsed)
            .is_ok();
        Ok(exists && ok)
    })
    .await
}

/// Warm the dummy hash so the first unknown-user login is not faster than later ones.
pub fn init() {
    LazyLock::force(&DUMMY_HASH);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_verify_and_use_argon2id_owasp_parameters() {
        let hash = hash_password(SecretString::from("correct horse battery"))
            .await
            .unwrap();
        assert!(hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
        assert!(verify_password(
            SecretString::from("correct horse battery"),
            Some(hash.clone())
        )
        .await
        .unwrap());
        assert!(
            !verify_password(SecretString::from("wrong password!!"), Some(hash))
                .await
                .unwrap()
        );
        assert!(
            !verify_password(SecretString::from("correct horse battery"), None)
                .await
                .unwrap()
        );
    }
}
