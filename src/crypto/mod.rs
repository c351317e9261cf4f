//! Cryptography: envelope encryption of secrets at rest, password hashing, TOTP, tokens.
//! Every secret type here zeroizes on drop and has no `Debug` that prints it.

mod envelope;
mod passwords;
mod tokens;
mod totp;

pub use envelope::{KeyId, MasterKey, Purpose, SealError};
pub use passwords::{
    hash_password, init as init_passwords, verify_password, PasswordError, MAX_PASSWORD_LEN,
    MIN_PASSWORD_LEN,
};
pub use tokens::{ApiKeySecret, Claims, JwtKeys, TokenError};
pub use totp::{TotpEnrollment, TotpSecret};
