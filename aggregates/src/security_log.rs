//! The `SecurityLog` aggregate: security events that belong to no other aggregate — login
//! attempts, including those for usernames that do not exist, and master-key rotations by the
//! operator.
//!
//! Each attempt is its own aggregate instance (a fresh id, one event). So recording never
//! contends with anything (no hot "log of the day" aggregate whose history grows with every
//! attempt, which a password-guessing run would make ever slower), and it costs the same
//! whether or not the user exists — a successful or failed login for a real user, and a
//! failed one for an unknown name, each append exactly one event to a new instance.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

#[derive(Debug, Clone, PartialEq)]
pub enum SecurityLogCommand {
    RecordLogin {
        /// The user the name belongs to, if it exists.
        user_id: Option<String>,
        /// The name as typed (bounded by the caller).
        username: String,
        success: bool,
        now: OffsetDateTime,
    },
    /// `countersign keys rotate` rewrapped sealed secrets under a new master key.
    RecordKeyRotation {
        /// Master-key ids (public fingerprints) rotated away from.
        from_key_ids: Vec<String>,
        to_key_id: String,
        rewrapped: u64,
        /// Secrets that could not be rewrapped (still under an old key).
        failed: u64,
        now: OffsetDateTime,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum SecurityLogEvent {
    LoginSucceeded {
        user_id: String,
        username: String,
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// Wrong password, or no such user (`user_id` is then `None`).
    LoginFailed {
        username: String,
        user_id: Option<String>,
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// Sealed secrets were rewrapped from `from_key_ids` to `to_key_id`. Key ids only: no key
    /// material, not even encrypted.
    MasterKeyRotated {
        from_key_ids: Vec<String>,
        to_key_id: String,
        rewrapped: u64,
        failed: u64,
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
}

impl DomainEvent for SecurityLogEvent {
    fn event_type(&self) -> String {
        match self {
            Self::LoginSucceeded { .. } => "LoginSucceeded",
            Self::LoginFailed { .. } => "LoginFailed",
            Self::MasterKeyRotated { .. } => "MasterKeyRotated",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecurityLogError {
    #[error("this security log entry is already recorded")]
    AlreadyRecorded,
    #[error("a successful login needs a user")]
    MissingUser,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct SecurityLog {
    recorded: bool,
}

impl Aggregate for SecurityLog {
    const TYPE: &'static str = "SecurityLog";
    type Command = SecurityLogCommand;
    type Event = SecurityLogEvent;
    type Error = SecurityLogError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        if self.recorded {
            return Err(SecurityLogError::AlreadyRecorded);
        }
        let event = match command {
            SecurityLogCommand::RecordLogin {
                user_id,
                username,
                success: true,
                now,
            } => SecurityLogEvent::LoginSucceeded {
                user_id: user_id.ok_or(SecurityLogError::MissingUser)?,
                username,
                at: now,
            },
            SecurityLogCommand::RecordLogin {
                user_id,
                username,
                success: false,
                now,
            } => SecurityLogEvent::LoginFailed {
                username,
                user_id,
                at: now,
            },
            SecurityLogCommand::RecordKeyRotation {
                from_key_ids,
                to_key_id,
                rewrapped,
                failed,
                now,
            } => SecurityLogEvent::MasterKeyRotated {
                from_key_ids,
                to_key_id,
                rewrapped,
                failed,
                at: now,
            },
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, _: Self::Event) {
        self.recorded = true;
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2026-01-01 12:00 UTC);

    #[test]
    fn a_login_attempt_is_recorded_once() {
        let cmd = SecurityLogCommand::RecordLogin {
            user_id: None,
            username: "mallory".into(),
            success: false,
            now: NOW,
        };
        let failed = SecurityLogEvent::LoginFailed {
            username: "mallory".into(),
            user_id: None,
            at: NOW,
        };
        TestFramework::<SecurityLog>::with(())
            .given_no_previous_events()
            .when(cmd.clone())
            .then_expect_events(vec![failed.clone()]);
        TestFramework::<SecurityLog>::with(())
            .given(vec![failed])
            .when(cmd)
            .then_expect_error(SecurityLogError::AlreadyRecorded);
    }

    #[test]
    fn a_successful_login_names_its_user() {
        TestFramework::<SecurityLog>::with(())
            .given_no_previous_events()
            .when(SecurityLogCommand::RecordLogin {
                user_id: None,
                username: "alice".into(),
                success: true,
                now: NOW,
            })
            .then_expect_error(SecurityLogError::MissingUser);
    }

    #[test]
    fn a_key_rotation_is_recorded_with_key_ids_only() {
        let cmd = SecurityLogCommand::RecordKeyRotation {
            from_key_ids: vec!["00112233aabbccdd".into()],
            to_key_id: "8899aabbccddeeff".into(),
            rewrapped: 7,
            failed: 0,
            now: NOW,
        };
        let rotated = SecurityLogEvent::MasterKeyRotated {
            from_key_ids: vec!["00112233aabbccdd".into()],
            to_key_id: "8899aabbccddeeff".into(),
            rewrapped: 7,
            failed: 0,
            at: NOW,
        };
        assert_eq!(rotated.event_type(), "MasterKeyRotated");
        TestFramework::<SecurityLog>::with(())
            .given_no_previous_events()
            .when(cmd.clone())
            .then_expect_events(vec![rotated.clone()]);
        TestFramework::<SecurityLog>::with(())
            .given(vec![rotated])
            .when(cmd)
            .then_expect_error(SecurityLogError::AlreadyRecorded);
    }
}
