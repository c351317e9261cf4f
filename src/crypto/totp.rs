//! TOTP (RFC 6238: SHA-1, 6 digits, 30 s steps, ±1 step) over totp-rs. This module only
//! computes; the one-use-per-step rule lives in the `User` aggregate.

use rand::RngCore;
use subtle::ConstantTimeEq;
use totp_rs::{Algorithm, TOTP};
use zeroize::Zeroizing;

const STEP_SECS: u64 = 30;
const DIGITS: usize = 6;
const SECRET_LEN: usize = 20;
const ISSUER: &str = "Countersign";

/// Raw TOTP secret bytes; zeroized on drop.
pub struct TotpSecret(Zeroizing<Vec<u8>>);

/// What a user needs to enrol an authenticator app. Contains the secret: send once, never log.
pub struct TotpEnrollment {
    pub secret_base32: Zeroizing<String>,
    pub otpauth_uri: Zeroizing<String>,
    pub qr_png_base64: Zeroizing<String>,
}

impl TotpSecret {
    pub fn generate() -> Self {
        let mut bytes = Zeroizing::new(vec![0u8; SECRET_LEN]);
        rand::rngs::OsRng.fill_bytes(bytes.as_mut_slice());
        Self(bytes)
    }

    pub fn from_bytes(bytes: Zeroizing<Vec<u8>>) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    fn totp(&self, account: &str) -> Result<TOTP, String> {
        TOTP::new(
            Algorithm::SHA1,
            DIGITS,
            1,
            STEP_SECS,
            self.0.to_vec(),
            Some(ISSUER.to_owned()),
            account.to_owned(),
        )
        .map_err(|e| e.to_string())
    }

    pub fn enrollment(&self, account: &str) -> Result<TotpEnrollment, String> {
        let totp = self.totp(account)?;
        Ok(TotpEnrollment {
            secret_base32: Zeroizing::new(totp.get_secret_base32()),
            otpauth_uri: Zeroizing::new(totp.get_url()),
            qr_png_base64: Zeroizing::new(totp.get_qr_base64()?),
        })
    }

    /// Code for a given time step (used by tests and by verification).
    pub fn code_at_step(&self, step: u64) -> String {
        // The account name does not enter the code; any valid one will do.
        self.totp("user")
            .map(|t| t.generate(step * STEP_SECS))
            .unwrap_or_default()
    }

    /// Steps within ±1 of `unix_time` whose code equals `code`, compared in constant time.
    pub fn matching_steps(&self, code: &str, unix_time: u64) -> Vec<u64> {
        if code.len() != DIGITS || !code.bytes().all(|b| b.is_ascii_digit()) {
            return vec![];
        }
        let now_step = unix_time / STEP_SECS;
        (now_step.saturating_sub(1)..=now_step + 1)
            .filter(|step| {
                let expected = Zeroizing::new(self.code_at_step(*step));
                bool::from(expected.as_bytes().ct_eq(code.as_bytes()))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc6238_sha1_vector() {
        // RFC 6238 appendix B: secret "12345678901234567890", T=59 → 94287082 (8 digits);
        // the 6-digit code is its last six digits.
        let s = TotpSecret::from_bytes(Zeroizing::new(b"12345678901234567890".to_vec()));
        assert_eq!(s.code_at_step(1), "287082");
        assert_eq!(s.matching_steps("287082", 59), vec![1]);
        assert_eq!(s.matching_steps("287082", 60 + 15), vec![1]);
        assert!(s.matching_steps("287082", 3 * 30 + 1).is_empty());
        assert!(s.matching_steps("28708", 59).is_empty());
    }

    #[test]
    fn enrollment_has_uri_and_qr() {
        let s = TotpSecret::generate();
        let e = s.enrollment("alice").unwrap();
        assert!(e
            .otpauth_uri
            .starts_with("otpauth://totp/Countersign:alice?"));
        assert!(!e.qr_png_base64.is_empty());
    }
}
