//! Password hashing with argon2id (OWASP: m=19 MiB, t=2, p=1) on the blocking pool.
//! Unknown users are verified against a dummy hash so both failure paths take the same time.

use std::sync::LazyLock;

use argon2::password_hash::{
    self, Decimal, Ident, Output, ParamsString, PasswordHash, PasswordHasher, PasswordVerifier,
    Salt, SaltString,
};
use argon2::{Algorithm, Argon2, Block, Params, Version};
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

fn argon2() -> ReturningArgon2 {
    ReturningArgon2(Params::new(19 * 1024, 2, 1, None).expect("valid argon2 parameters"))
}

/// argon2id whose 19 MiB of working memory goes back to the OS after every hash.
///
/// The `argon2` crate allocates it as a plain `Vec`. glibc raises its mmap threshold to the
/// size of the first such block freed, so later ones come from per-thread arenas and stay
/// resident for good: a few concurrent logins left the server at ~96 MB instead of ~18 MB.
/// Reserving more than glibc's largest adaptive threshold (32 MiB) keeps every block a
/// mapping of its own, unmapped on drop; only the 19 MiB argon2 touches is ever resident.
/// The password-derived contents leave the address space with it.
struct ReturningArgon2(Params);

/// Above glibc's `DEFAULT_MMAP_THRESHOLD_MAX` (32 MiB on 64-bit), in 1 KiB blocks.
const RESERVED_BLOCKS: usize = 33 * 1024;

impl PasswordHasher for ReturningArgon2 {
    type Params = Params;

    fn hash_password<'a>(
        &self,
        password: &[u8],
        salt: impl Into<Salt<'a>>,
    ) -> password_hash::Result<PasswordHash<'a>> {
        self.hash_password_customized(password, None, None, self.0.clone(), salt)
    }

    fn hash_password_customized<'a>(
        &self,
        password: &[u8],
        algorithm: Option<Ident<'a>>,
        version: Option<Decimal>,
        params: Params,
        salt: impl Into<Salt<'a>>,
    ) -> password_hash::Result<PasswordHash<'a>> {
        let algorithm = algorithm
            .map(Algorithm::try_from)
            .transpose()?
            .unwrap_or(Algorithm::Argon2id);
        let version = version
            .map(Version::try_from)
            .transpose()?
            .unwrap_or(Version::V0x13);
        let salt = salt.into();
        let mut salt_buf = [0u8; 64];
        let salt_bytes = salt.decode_b64(&mut salt_buf)?;
        let output_len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let mut memory: Vec<Block> = Vec::with_capacity(params.block_count().max(RESERVED_BLOCKS));
        memory.resize(params.block_count(), Block::new());
        let hasher = Argon2::new(algorithm, version, params.clone());
        let hash = Output::init_with(output_len, |out| {
            Ok(hasher.hash_password_into_with_memory(password, salt_bytes, out, &mut memory)?)
        })?;
        Ok(PasswordHash {
            algorithm: algorithm.ident(),
            version: Some(version.into()),
            params: ParamsString::try_from(&params)?,
            salt: Some(salt),
            hash: Some(hash),
        })
    }
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

    /// Hashes stored before the memory change, and any other argon2id implementation's, still
    /// verify, and ours verify with the reference implementation.
    #[test]
    fn hashes_match_the_argon2_crate_both_ways() {
        let params = Params::new(19 * 1024, 2, 1, None).unwrap();
        let stock = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let salt = SaltString::generate(&mut rand::rngs::OsRng);
        let ours = argon2().hash_password(b"pass phrase", &salt).unwrap();
        let theirs = stock.hash_password(b"pass phrase", &salt).unwrap();
        assert_eq!(ours.to_string(), theirs.to_string());
        assert!(stock.verify_password(b"pass phrase", &ours).is_ok());
        assert!(argon2().verify_password(b"pass phrase", &theirs).is_ok());
        assert!(argon2().verify_password(b"pass phrasE", &theirs).is_err());
        // Other parameters stored in the hash are honoured, not replaced by ours.
        let light = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8, 1, 1, None).unwrap(),
        )
        .hash_password(b"pass phrase", &salt)
        .unwrap();
        assert!(argon2().verify_password(b"pass phrase", &light).is_ok());
    }
}
