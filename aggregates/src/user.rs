//! The `User` aggregate: registration and TOTP enrolment, and the single-use rule for codes.
//! A TOTP time step is accepted at most once per user: the last accepted step is part of the
//! state and only later steps pass, so a code cannot be replayed, even by two concurrent
//! requests (the loser of the race hits an optimistic-concurrency conflict and re-checks).
//! TOTP secrets never appear here: events name a `secret_id`, and [`MfaVerifier`] resolves it.
//! Roles (e.g. `auditor`) are granted and revoked by an operator, as events on the user.
//! Sessions: a password change or an MFA replacement ends every session issued before it (the
//! read side counts them into a token version), and a logout ends one session by its token id.
//!
//! Wrong codes are counted: every command that checks a code records a wrong one as
//! `MfaCodeRejected` (the command *succeeds*, since cqrs-es stores nothing when `handle`
//! fails), and the [`MFA_MAX_FAILURES`]th in a row adds `MfaLockedOut`, after which every
//! code-checking command is refused until the lock ends, even with a correct code. Callers
//! read the outcome with [`mfa_verdict`]. Time comes from the command, never from a clock.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Wrong codes in a row (without an accepted one between them) that lock MFA.
pub const MFA_MAX_FAILURES: u32 = 5;
/// How long MFA-protected actions stay locked after [`MFA_MAX_FAILURES`] wrong codes.
pub const MFA_LOCKOUT: time::Duration = time::Duration::minutes(15);

#[derive(Debug, Clone, PartialEq)]
pub enum UserCommand {
    Register {
        user_id: String,
        username: String,
        now: OffsetDateTime,
    },
    /// Create a pending secret. Replacing an active MFA requires a current valid code.
    /// Like every code-checking command, a wrong code is recorded, not returned as an error:
    /// read the outcome with [`mfa_verdict`].
    StartMfaSetup {
        secret_id: String,
        code: Option<String>,
        now: OffsetDateTime,
    },
    /// Activate the pending secret with a code it generated (a wrong one counts too).
    ConfirmMfa { code: String, now: OffsetDateTime },
    /// Spend a code to authorize an MFA-protected action (`purpose` says which). A wrong
    /// code is recorded, not an error: read the outcome with [`mfa_verdict`].
    UseMfaCode {
        code: String,
        purpose: String,
        now: OffsetDateTime,
    },
    /// An operator grants a role.
    GrantRole { role: Role, now: OffsetDateTime },
    /// An operator revokes a role.
    RevokeRole { role: Role, now: OffsetDateTime },
    /// The password was changed (the new hash is stored outside events). With MFA enabled a
    /// current code is required and spent.
    ChangePassword {
        code: Option<String>,
        now: OffsetDateTime,
    },
    /// End one session: the access token `token_id` (its `jti`) is refused from now on.
    Logout {
        token_id: String,
        token_expires_at: OffsetDateTime,
        now: OffsetDateTime,
    },
}

/// Extra capabilities a user can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads the whole event history and its integrity proofs; no extra write rights.
    Auditor,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Auditor => "auditor",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum UserEvent {
    /// Version 1.1 added `username_key` (1.0 events are upcast on load, see the server's
    /// `upcast` module).
    UserRegistered {
        user_id: String,
        username: String,
        /// The case-folded username: what makes usernames unique.
        username_key: String,
        #[serde(with = "time::serde::rfc3339")]
        registered_at: OffsetDateTime,
    },
    MfaSetupStarted {
        secret_id: String,
        #[serde(with = "time::serde::rfc3339")]
        started_at: OffsetDateTime,
    },
    MfaEnabled {
        secret_id: String,
        step: u64,
        replaced_secret_id: Option<String>,
        #[serde(with = "time::serde::rfc3339")]
        enabled_at: OffsetDateTime,
    },
    MfaCodeAccepted {
        step: u64,
        purpose: String,
        #[serde(with = "time::serde::rfc3339")]
        accepted_at: OffsetDateTime,
    },
    /// A wrong code (never the code itself). `failures`: wrong codes in a row, this one
    /// included.
    MfaCodeRejected {
        purpose: String,
        failures: u32,
        #[serde(with = "time::serde::rfc3339")]
        rejected_at: OffsetDateTime,
    },
    /// Too many wrong codes: code-checking commands are refused until `until`.
    MfaLockedOut {
        failures: u32,
        #[serde(with = "time::serde::rfc3339")]
        locked_at: OffsetDateTime,
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    RoleGranted {
        role: Role,
        #[serde(with = "time::serde::rfc3339")]
        granted_at: OffsetDateTime,
    },
    RoleRevoked {
        role: Role,
        #[serde(with = "time::serde::rfc3339")]
        revoked_at: OffsetDateTime,
    },
    /// Every access token issued before this is refused (no secret material here).
    PasswordChanged {
        #[serde(with = "time::serde::rfc3339")]
        changed_at: OffsetDateTime,
    },
    /// The access token `token_id` is refused until it would have expired anyway.
    LoggedOut {
        token_id: String,
        #[serde(with = "time::serde::rfc3339")]
        token_expires_at: OffsetDateTime,
        #[serde(with = "time::serde::rfc3339")]
        logged_out_at: OffsetDateTime,
    },
}

impl DomainEvent for UserEvent {
    fn event_type(&self) -> String {
        match self {
            Self::UserRegistered { .. } => "UserRegistered",
            Self::MfaSetupStarted { .. } => "MfaSetupStarted",
            Self::MfaEnabled { .. } => "MfaEnabled",
            Self::MfaCodeAccepted { .. } => "MfaCodeAccepted",
            Self::MfaCodeRejected { .. } => "MfaCodeRejected",
            Self::MfaLockedOut { .. } => "MfaLockedOut",
            Self::RoleGranted { .. } => "RoleGranted",
            Self::RoleRevoked { .. } => "RoleRevoked",
            Self::PasswordChanged { .. } => "PasswordChanged",
            Self::LoggedOut { .. } => "LoggedOut",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        match self {
            Self::UserRegistered { .. } => "1.1",
            _ => "1.0",
        }
        .to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UserError {
    #[error("user not found")]
    NotFound,
    #[error("user already registered")]
    AlreadyRegistered,
    #[error("MFA is not enabled for this account")]
    MfaNotEnabled,
    #[error("MFA is enabled: a current code from it is required for this change")]
    MfaCodeRequired,
    #[error("no MFA setup is pending: call setup_mfa first")]
    NoPendingMfa,
    #[error("invalid MFA code ({attempts_left} more wrong codes lock MFA-protected actions for 15 minutes)")]
    InvalidMfaCode { attempts_left: u32 },
    #[error("too many wrong MFA codes: MFA-protected actions are locked until {until}")]
    MfaLocked { until: OffsetDateTime },
    #[error("this MFA code was already used: wait for the next one")]
    MfaCodeReplayed,
    #[error("MFA verification unavailable: {0}")]
    Verifier(String),
    #[error("the user already has the role {0}")]
    RoleAlreadyGranted(&'static str),
    #[error("the user does not have the role {0}")]
    RoleNotGranted(&'static str),
}

/// Resolves a secret id and checks a code against it.
#[async_trait]
pub trait MfaVerifier: Send + Sync {
    /// The time steps (within the accepted window around `now`) whose code equals `code`.
    async fn matching_steps(
        &self,
        user_id: &str,
        secret_id: &str,
        code: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<u64>, String>;
}

pub type UserServices = Arc<dyn MfaVerifier>;

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct User {
    user_id: Option<String>,
    active_secret_id: Option<String>,
    pending_secret_id: Option<String>,
    last_used_step: Option<u64>,
    #[serde(default)]
    roles: BTreeSet<Role>,
    /// Wrong codes since the last accepted one (or the last lockout).
    #[serde(default)]
    mfa_failures: u32,
    #[serde(default, with = "time::serde::rfc3339::option")]
    mfa_locked_until: Option<OffsetDateTime>,
}

/// The outcome of a code-checking command, from the events it recorded: `MfaLocked` if this
/// command's wrong code locked MFA, `InvalidMfaCode` if its code was wrong, else accepted.
/// (Refusals *during* a lockout are plain errors of the command and record nothing.)
pub fn mfa_verdict(events: &[UserEvent]) -> Result<(), UserError> {
    for event in events.iter().rev() {
        match event {
            UserEvent::MfaLockedOut { until, .. } => {
                return Err(UserError::MfaLocked { until: *until })
            }
            UserEvent::MfaCodeRejected { failures, .. } => {
                return Err(UserError::InvalidMfaCode {
                    attempts_left: MFA_MAX_FAILURES.saturating_sub(*failures),
                })
            }
            _ => {}
        }
    }
    Ok(())
}

/// What checking a code found: a usable step, or a wrong code (to be recorded).
enum CodeCheck {
    Accepted(u64),
    Wrong,
}

impl User {
    pub fn mfa_enabled(&self) -> bool {
        self.active_secret_id.is_some()
    }

    pub fn has_role(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// When MFA-protected actions are locked until, if they are at `now`.
    pub fn mfa_locked_until(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        self.mfa_locked_until.filter(|until| now < *until)
    }

    /// Refuse during a lockout, then verify `code` against `secret_id`: the earliest matching
    /// step not yet used, or `Wrong`. A replayed code is an error, not a wrong code: it was
    /// valid once, so it says nothing about guessing.
    async fn check_code(
        &self,
        verifier: &UserServices,
        secret_id: &str,
        code: &str,
        now: OffsetDateTime,
    ) -> Result<CodeCheck, UserError> {
        if let Some(until) = self.mfa_locked_until(now) {
            return Err(UserError::MfaLocked { until });
        }
        let user_id = self.user_id.as_deref().ok_or(UserError::NotFound)?;
        let steps = verifier
            .matching_steps(user_id, secret_id, code, now)
            .await
            .map_err(UserError::Verifier)?;
        if steps.is_empty() {
            return Ok(CodeCheck::Wrong);
        }
        steps
            .into_iter()
            .filter(|s| self.last_used_step.is_none_or(|last| *s > last))
            .min()
            .map(CodeCheck::Accepted)
            .ok_or(UserError::MfaCodeReplayed)
    }

    /// Record a wrong code, and the lockout if it is one too many.
    async fn reject_code(&mut self, purpose: String, now: OffsetDateTime, sink: &EventSink<Self>) {
        let failures = self.mfa_failures + 1;
        let rejected = UserEvent::MfaCodeRejected {
            purpose,
            failures,
            rejected_at: now,
        };
        sink.write(rejected, self).await;
        if failures >= MFA_MAX_FAILURES {
            let locked = UserEvent::MfaLockedOut {
                failures,
                locked_at: now,
                until: now + MFA_LOCKOUT,
            };
            sink.write(locked, self).await;
        }
    }
}

impl Aggregate for User {
    const TYPE: &'static str = "User";
    type Command = UserCommand;
    type Event = UserEvent;
    type Error = UserError;
    type Services = UserServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        verifier: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        if !matches!(command, UserCommand::Register { .. }) && self.user_id.is_none() {
            return Err(UserError::NotFound);
        }
        match command {
            UserCommand::Register {
                user_id,
                username,
                now,
            } => {
                if self.user_id.is_some() {
                    return Err(UserError::AlreadyRegistered);
                }
                let event = UserEvent::UserRegistered {
                    user_id,
                    username_key: username.to_lowercase(),
                    username,
                    registered_at: now,
                };
                sink.write(event, self).await;
            }
            UserCommand::StartMfaSetup {
                secret_id,
                code,
                now,
            } => {
                if let Some(active) = self.active_secret_id.clone() {
                    let code = code.ok_or(UserError::MfaCodeRequired)?;
                    let purpose = "replace_mfa".to_owned();
                    let step = match self.check_code(verifier, &active, &code, now).await? {
                        CodeCheck::Accepted(step) => step,
                        CodeCheck::Wrong => {
                            self.reject_code(purpose, now, sink).await;
                            return Ok(());
                        }
                    };
                    let accepted = UserEvent::MfaCodeAccepted {
                        step,
                        purpose,
                        accepted_at: now,
                    };
                    sink.write(accepted, self).await;
                }
                let started = UserEvent::MfaSetupStarted {
                    secret_id,
                    started_at: now,
                };
                sink.write(started, self).await;
            }
            UserCommand::ConfirmMfa { code, now } => {
                let pending = self
                    .pending_secret_id
                    .clone()
                    .ok_or(UserError::NoPendingMfa)?;
                let step = match self.check_code(verifier, &pending, &code, now).await? {
                    CodeCheck::Accepted(step) => step,
                    CodeCheck::Wrong => {
                        self.reject_code("confirm_mfa".to_owned(), now, sink).await;
                        return Ok(());
                    }
                };
                let event = UserEvent::MfaEnabled {
                    secret_id: pending,
                    step,
                    replaced_secret_id: self.active_secret_id.clone(),
                    enabled_at: now,
                };
                sink.write(event, self).await;
            }
            UserCommand::UseMfaCode { code, purpose, now } => {
                let active = self
                    .active_secret_id
                    .clone()
                    .ok_or(UserError::MfaNotEnabled)?;
                let step = match self.check_code(verifier, &active, &code, now).await? {
                    CodeCheck::Accepted(step) => step,
                    CodeCheck::Wrong => {
                        self.reject_code(purpose, now, sink).await;
                        return Ok(());
                    }
                };
                let event = UserEvent::MfaCodeAccepted {
                    step,
                    purpose,
                    accepted_at: now,
                };
                sink.write(event, self).await;
            }
            UserCommand::GrantRole { role, now } => {
                if self.roles.contains(&role) {
                    return Err(UserError::RoleAlreadyGranted(role.as_str()));
                }
                let event = UserEvent::RoleGranted {
                    role,
                    granted_at: now,
                };
                sink.write(event, self).await;
            }
            UserCommand::RevokeRole { role, now } => {
                if !self.roles.contains(&role) {
                    return Err(UserError::RoleNotGranted(role.as_str()));
                }
                let event = UserEvent::RoleRevoked {
                    role,
                    revoked_at: now,
                };
                sink.write(event, self).await;
            }
            UserCommand::ChangePassword { code, now } => {
                match (self.active_secret_id.clone(), code) {
                    (Some(active), Some(code)) => {
                        let purpose = "change_password".to_owned();
                        let step = match self.check_code(verifier, &active, &code, now).await? {
                            CodeCheck::Accepted(step) => step,
                            CodeCheck::Wrong => {
                                self.reject_code(purpose, now, sink).await;
                                return Ok(());
                            }
                        };
                        let accepted = UserEvent::MfaCodeAccepted {
                            step,
                            purpose,
                            accepted_at: now,
                        };
                        sink.write(accepted, self).await;
                    }
                    (Some(_), None) => return Err(UserError::MfaCodeRequired),
                    (None, Some(_)) => return Err(UserError::MfaNotEnabled),
                    (None, None) => {}
                }
                let event = UserEvent::PasswordChanged { changed_at: now };
                sink.write(event, self).await;
            }
            UserCommand::Logout {
                token_id,
                token_expires_at,
                now,
            } => {
                let event = UserEvent::LoggedOut {
                    token_id,
                    token_expires_at,
                    logged_out_at: now,
                };
                sink.write(event, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            UserEvent::UserRegistered { user_id, .. } => self.user_id = Some(user_id),
            UserEvent::MfaSetupStarted { secret_id, .. } => {
                self.pending_secret_id = Some(secret_id)
            }
            UserEvent::MfaEnabled {
                secret_id, step, ..
            } => {
                self.active_secret_id = Some(secret_id);
                self.pending_secret_id = None;
                self.last_used_step = Some(step);
                self.mfa_failures = 0;
            }
            UserEvent::MfaCodeAccepted { step, .. } => {
                self.last_used_step = Some(step);
                self.mfa_failures = 0;
            }
            UserEvent::MfaCodeRejected { failures, .. } => self.mfa_failures = failures,
            UserEvent::MfaLockedOut { until, .. } => {
                self.mfa_locked_until = Some(until);
                // After the lock the user gets a fresh set of attempts.
                self.mfa_failures = 0;
            }
            UserEvent::RoleGranted { role, .. } => {
                self.roles.insert(role);
            }
            UserEvent::RoleRevoked { role, .. } => {
                self.roles.remove(&role);
            }
            UserEvent::PasswordChanged { .. } | UserEvent::LoggedOut { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2026-01-01 12:00 UTC);

    /// Code "s<step>-<secret>" matches that step of that secret; steps 99..=101 are "current".
    struct FakeVerifier;

    #[async_trait]
    impl MfaVerifier for FakeVerifier {
        async fn matching_steps(
            &self,
            _user: &str,
            secret_id: &str,
            code: &str,
            _now: OffsetDateTime,
        ) -> Result<Vec<u64>, String> {
            Ok((99..=101)
                .filter(|s| code == format!("s{s}-{secret_id}"))
                .collect())
        }
    }

    fn framework() -> TestFramework<User> {
        TestFramework::with(Arc::new(FakeVerifier) as UserServices)
    }

    fn registered() -> UserEvent {
        UserEvent::UserRegistered {
            user_id: "u1".into(),
            username: "Alice".into(),
            username_key: "alice".into(),
            registered_at: NOW,
        }
    }

    fn started(secret: &str) -> UserEvent {
        UserEvent::MfaSetupStarted {
            secret_id: secret.into(),
            started_at: NOW,
        }
    }

    fn enabled(secret: &str, step: u64) -> UserEvent {
        UserEvent::MfaEnabled {
            secret_id: secret.into(),
            step,
            replaced_secret_id: None,
            enabled_at: NOW,
        }
    }

    fn use_code(code: &str) -> UserCommand {
        UserCommand::UseMfaCode {
            code: code.into(),
            purpose: "authorize_transaction".into(),
            now: NOW,
        }
    }

    #[test]
    fn registers_once() {
        let cmd = UserCommand::Register {
            user_id: "u1".into(),
            username: "Alice".into(),
            now: NOW,
        };
        framework()
            .given_no_previous_events()
            .when(cmd.clone())
            .then_expect_events(vec![registered()]);
        framework()
            .given(vec![registered()])
            .when(cmd)
            .then_expect_error(UserError::AlreadyRegistered);
    }

    #[test]
    fn setup_is_pending_until_confirmed_with_a_code_from_the_new_secret() {
        framework()
            .given(vec![registered()])
            .when(UserCommand::StartMfaSetup {
                secret_id: "A".into(),
                code: None,
                now: NOW,
            })
            .then_expect_events(vec![started("A")]);
        framework()
            .given(vec![registered(), started("A")])
            .when(use_code("s100-A"))
            .then_expect_error(UserError::MfaNotEnabled);
        framework()
            .given(vec![registered(), started("A")])
            .when(UserCommand::ConfirmMfa {
                code: "s100-A".into(),
                now: NOW,
            })
            .then_expect_events(vec![enabled("A", 100)]);
    }

    #[test]
    fn confirm_without_pending_setup_is_refused() {
        framework()
            .given(vec![registered()])
            .when(UserCommand::ConfirmMfa {
                code: "s100-A".into(),
                now: NOW,
            })
            .then_expect_error(UserError::NoPendingMfa);
    }

    fn rejected(failures: u32) -> UserEvent {
        UserEvent::MfaCodeRejected {
            purpose: "authorize_transaction".into(),
            failures,
            rejected_at: NOW,
        }
    }

    fn locked_out() -> UserEvent {
        UserEvent::MfaLockedOut {
            failures: MFA_MAX_FAILURES,
            locked_at: NOW,
            until: NOW + MFA_LOCKOUT,
        }
    }

    fn accepted(step: u64) -> UserEvent {
        UserEvent::MfaCodeAccepted {
            step,
            purpose: "authorize_transaction".into(),
            accepted_at: NOW,
        }
    }

    /// An enrolled user followed by `failures` wrong codes in a row.
    fn enrolled_with_failures(failures: u32) -> Vec<UserEvent> {
        let mut events = vec![registered(), started("A"), enabled("A", 99)];
        events.extend((1..=failures).map(rejected));
        events
    }

    fn use_code_at(code: &str, now: OffsetDateTime) -> UserCommand {
        UserCommand::UseMfaCode {
            code: code.into(),
            purpose: "authorize_transaction".into(),
            now,
        }
    }

    #[test]
    fn wrong_code_is_recorded_and_refused() {
        framework()
            .given(enrolled_with_failures(0))
            .when(use_code("s100-B"))
            .then_expect_events(vec![rejected(1)]);
        assert_eq!(
            mfa_verdict(&[rejected(1)]),
            Err(UserError::InvalidMfaCode { attempts_left: 4 })
        );
        assert_eq!(mfa_verdict(&[accepted(100)]), Ok(()));
    }

    #[test]
    fn the_fifth_wrong_code_in_a_row_locks_mfa_for_15_minutes() {
        framework()
            .given(enrolled_with_failures(3))
            .when(use_code("s100-B"))
            .then_expect_events(vec![rejected(4)]);
        framework()
            .given(enrolled_with_failures(4))
            .when(use_code("s100-B"))
            .then_expect_events(vec![rejected(5), locked_out()]);
        assert_eq!(
            mfa_verdict(&[rejected(5), locked_out()]),
            Err(UserError::MfaLocked {
                until: NOW + MFA_LOCKOUT
            })
        );
    }

    #[test]
    fn an_accepted_code_resets_the_count() {
        let mut given = enrolled_with_failures(4);
        given.push(accepted(100));
        framework()
            .given(given)
            .when(use_code("s101-A"))
            .then_expect_events(vec![accepted(101)]);
        let mut given = enrolled_with_failures(4);
        given.push(accepted(100));
        framework()
            .given(given)
            .when(use_code("s100-B"))
            .then_expect_events(vec![rejected(1)]);
    }

    #[test]
    fn during_a_lockout_even_a_correct_code_is_refused_and_nothing_is_recorded() {
        let mut given = enrolled_with_failures(5);
        given.push(locked_out());
        let last_second = NOW + MFA_LOCKOUT - time::Duration::seconds(1);
        framework()
            .given(given.clone())
            .when(use_code_at("s100-A", last_second))
            .then_expect_error(UserError::MfaLocked {
                until: NOW + MFA_LOCKOUT,
            });
        framework()
            .given(given.clone())
            .when(use_code_at("s100-B", NOW))
            .then_expect_error(UserError::MfaLocked {
                until: NOW + MFA_LOCKOUT,
            });
        // Every code-checking command: replacing MFA and confirming a new secret too.
        framework()
            .given(given.clone())
            .when(UserCommand::StartMfaSetup {
                secret_id: "B".into(),
                code: Some("s100-A".into()),
                now: NOW,
            })
            .then_expect_error(UserError::MfaLocked {
                until: NOW + MFA_LOCKOUT,
            });
        given.push(started("B"));
        framework()
            .given(given)
            .when(UserCommand::ConfirmMfa {
                code: "s100-B".into(),
                now: NOW,
            })
            .then_expect_error(UserError::MfaLocked {
                until: NOW + MFA_LOCKOUT,
            });
    }

    #[test]
    fn the_lock_ends_after_15_minutes_by_the_commands_time_with_fresh_attempts() {
        let mut given = enrolled_with_failures(5);
        given.push(locked_out());
        let unlocked = NOW + MFA_LOCKOUT;
        framework()
            .given(given.clone())
            .when(use_code_at("s100-A", unlocked))
            .then_expect_events(vec![UserEvent::MfaCodeAccepted {
                step: 100,
                purpose: "authorize_transaction".into(),
                accepted_at: unlocked,
            }]);
        framework()
            .given(given)
            .when(use_code_at("s100-B", unlocked))
            .then_expect_events(vec![UserEvent::MfaCodeRejected {
                purpose: "authorize_transaction".into(),
                failures: 1,
                rejected_at: unlocked,
            }]);
    }

    #[test]
    fn wrong_codes_count_across_purposes_and_a_replay_does_not_count() {
        let mut given = enrolled_with_failures(4);
        given.push(accepted(100));
        given.extend((1..=4).map(rejected));
        // A replayed step was a valid code once: refused, but not a guess.
        framework()
            .given(given.clone())
            .when(use_code("s100-A"))
            .then_expect_error(UserError::MfaCodeReplayed);
        framework()
            .given(given)
            .when(UserCommand::StartMfaSetup {
                secret_id: "B".into(),
                code: Some("s101-B".into()),
                now: NOW,
            })
            .then_expect_events(vec![
                UserEvent::MfaCodeRejected {
                    purpose: "replace_mfa".into(),
                    failures: 5,
                    rejected_at: NOW,
                },
                locked_out(),
            ]);
        framework()
            .given(vec![registered(), started("A")])
            .when(UserCommand::ConfirmMfa {
                code: "s100-B".into(),
                now: NOW,
            })
            .then_expect_events(vec![UserEvent::MfaCodeRejected {
                purpose: "confirm_mfa".into(),
                failures: 1,
                rejected_at: NOW,
            }]);
    }

    #[test]
    fn a_code_step_is_accepted_once() {
        framework()
            .given(vec![registered(), started("A"), enabled("A", 99)])
            .when(use_code("s100-A"))
            .then_expect_events(vec![UserEvent::MfaCodeAccepted {
                step: 100,
                purpose: "authorize_transaction".into(),
                accepted_at: NOW,
            }]);
        framework()
            .given(vec![
                registered(),
                started("A"),
                enabled("A", 99),
                UserEvent::MfaCodeAccepted {
                    step: 100,
                    purpose: "authorize_transaction".into(),
                    accepted_at: NOW,
                },
            ])
            .when(use_code("s100-A"))
            .then_expect_error(UserError::MfaCodeReplayed);
    }

    #[test]
    fn the_confirmation_code_cannot_be_reused() {
        framework()
            .given(vec![registered(), started("A"), enabled("A", 100)])
            .when(use_code("s100-A"))
            .then_expect_error(UserError::MfaCodeReplayed);
    }

    #[test]
    fn earlier_steps_than_the_last_used_are_refused() {
        framework()
            .given(vec![registered(), started("A"), enabled("A", 101)])
            .when(use_code("s99-A"))
            .then_expect_error(UserError::MfaCodeReplayed);
    }

    #[test]
    fn replacing_active_mfa_needs_a_current_code() {
        let base = vec![registered(), started("A"), enabled("A", 99)];
        framework()
            .given(base.clone())
            .when(UserCommand::StartMfaSetup {
                secret_id: "B".into(),
                code: None,
                now: NOW,
            })
            .then_expect_error(UserError::MfaCodeRequired);
        framework()
            .given(base.clone())
            .when(UserCommand::StartMfaSetup {
                secret_id: "B".into(),
                code: Some("s100-B".into()),
                now: NOW,
            })
            .then_expect_events(vec![UserEvent::MfaCodeRejected {
                purpose: "replace_mfa".into(),
                failures: 1,
                rejected_at: NOW,
            }]);
        framework()
            .given(base)
            .when(UserCommand::StartMfaSetup {
                secret_id: "B".into(),
                code: Some("s100-A".into()),
                now: NOW,
            })
            .then_expect_events(vec![
                UserEvent::MfaCodeAccepted {
                    step: 100,
                    purpose: "replace_mfa".into(),
                    accepted_at: NOW,
                },
                started("B"),
            ]);
    }

    #[test]
    fn roles_are_granted_once_and_revoked_only_when_held() {
        let grant = |role| UserCommand::GrantRole { role, now: NOW };
        let granted = UserEvent::RoleGranted {
            role: Role::Auditor,
            granted_at: NOW,
        };
        framework()
            .given(vec![registered()])
            .when(grant(Role::Auditor))
            .then_expect_events(vec![granted.clone()]);
        framework()
            .given(vec![registered(), granted.clone()])
            .when(grant(Role::Auditor))
            .then_expect_error(UserError::RoleAlreadyGranted("auditor"));
        framework()
            .given(vec![registered()])
            .when(UserCommand::RevokeRole {
                role: Role::Auditor,
                now: NOW,
            })
            .then_expect_error(UserError::RoleNotGranted("auditor"));
        framework()
            .given(vec![registered(), granted])
            .when(UserCommand::RevokeRole {
                role: Role::Auditor,
                now: NOW,
            })
            .then_expect_events(vec![UserEvent::RoleRevoked {
                role: Role::Auditor,
                revoked_at: NOW,
            }]);
        framework()
            .given_no_previous_events()
            .when(grant(Role::Auditor))
            .then_expect_error(UserError::NotFound);
    }

    #[test]
    fn changing_the_password_spends_a_code_when_mfa_is_enabled() {
        let change = |code: Option<&str>| UserCommand::ChangePassword {
            code: code.map(str::to_owned),
            now: NOW,
        };
        let changed = UserEvent::PasswordChanged { changed_at: NOW };
        framework()
            .given(vec![registered()])
            .when(change(None))
            .then_expect_events(vec![changed.clone()]);
        framework()
            .given(vec![registered()])
            .when(change(Some("s100-A")))
            .then_expect_error(UserError::MfaNotEnabled);
        let with_mfa = vec![registered(), started("A"), enabled("A", 99)];
        framework()
            .given(with_mfa.clone())
            .when(change(None))
            .then_expect_error(UserError::MfaCodeRequired);
        framework()
            .given(with_mfa.clone())
            .when(change(Some("s100-B")))
            .then_expect_events(vec![UserEvent::MfaCodeRejected {
                purpose: "change_password".into(),
                failures: 1,
                rejected_at: NOW,
            }]);
        framework()
            .given(with_mfa.clone())
            .when(change(Some("s99-A")))
            .then_expect_error(UserError::MfaCodeReplayed);
        framework()
            .given(with_mfa)
            .when(change(Some("s100-A")))
            .then_expect_events(vec![
                UserEvent::MfaCodeAccepted {
                    step: 100,
                    purpose: "change_password".into(),
                    accepted_at: NOW,
                },
                changed,
            ]);
    }

    #[test]
    fn a_logout_records_the_token_it_ends() {
        let expires = datetime!(2026-01-01 12:15 UTC);
        framework()
            .given(vec![registered()])
            .when(UserCommand::Logout {
                token_id: "jti-1".into(),
                token_expires_at: expires,
                now: NOW,
            })
            .then_expect_events(vec![UserEvent::LoggedOut {
                token_id: "jti-1".into(),
                token_expires_at: expires,
                logged_out_at: NOW,
            }]);
        framework()
            .given_no_previous_events()
            .when(UserCommand::Logout {
                token_id: "jti-1".into(),
                token_expires_at: expires,
                now: NOW,
            })
            .then_expect_error(UserError::NotFound);
    }

    #[test]
    fn commands_on_unknown_users_are_not_found() {
        framework()
            .given_no_previous_events()
            .when(use_code("s100-A"))
            .then_expect_error(UserError::NotFound);
    }
}
