//! A model of one transaction's life: its owner and a stranger (`User` aggregates with TOTP),
//! the `Transaction` aggregate and a signer. [`World::step`] runs one [`Step`] the way the
//! server would (a code is spent on the caller's `User` before an authorization is recorded)
//! and then checks every invariant, panicking with the history on a violation:
//!
//! - each command's outcome is what an independent statement of the rules predicts;
//! - a failed command emits no events and leaves the aggregate as it was;
//! - replaying the events (through their JSON form) onto a fresh aggregate gives the same state;
//! - a transaction is signed at most once, only after its owner authorized exactly that payload
//!   before the deadline, and only by the principal that prepared it;
//! - status moves only along the lifecycle, and terminal states never change;
//! - per user, accepted TOTP steps strictly increase (a step is accepted once; earlier steps are
//!   refused), and no code is accepted during a lockout.
//!
//! Shared by the property tests (`tests/properties.rs`) and the `transaction_commands` fuzz
//! target (`fuzz/`, which includes this file by path), so it depends only on what both have.

#![allow(dead_code)]

use std::fmt::Debug;
use std::future::Future;
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use aggregates::user::{mfa_verdict, MFA_LOCKOUT, MFA_MAX_FAILURES};
use aggregates::{
    Address, Amount, FeeParams, HexBytes, Initiator, PrepareTransaction, PreparedSimulation,
    ReceiptOutcome, SignedTransaction, SigningRequest, SimulationOutcome, Transaction,
    TransactionCommand, TransactionError, TransactionEvent, TransactionKind, TransactionServices,
    TransactionSigner, TransactionStatus, TxPayload, User, UserCommand, UserError, UserEvent,
    UserServices,
};
use async_trait::async_trait;
use cqrs_es::event_sink::EventSink;
use cqrs_es::Aggregate;
use serde::de::DeserializeOwned;
use serde::Serialize;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

pub const START: OffsetDateTime = datetime!(2026-01-01 12:00 UTC);
const TOTP_PERIOD: i64 = 30;
const OWNER: &str = "user-owner";
const STRANGER: &str = "user-stranger";
const TX_ID: &str = "tx-1";
const NONCE: u64 = 7;
const FEES: FeeParams = FeeParams {
    gas_limit: 21_000,
    max_fee_per_gas: 2_000_000_000,
    max_priority_fee_per_gas: 1_000_000_000,
};

/// Which user acts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    Owner,
    Stranger,
}

/// Which TOTP code the user types, relative to the clock and the secret the command checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// The current step.
    Current,
    /// One step back or ahead: inside the accepted window.
    Previous,
    Next,
    /// Two steps back: outside the window.
    Stale,
    /// Exactly the last code this user had accepted.
    Replayed,
    /// A current code of the other user's secret.
    OtherSecret,
    Garbage,
}

/// Who asks to execute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Executor {
    /// The principal that prepared it.
    Initiator,
    /// The same API key under another display name (same principal).
    InitiatorRenamed,
    OtherAgent,
    OwnerUser,
    StrangerUser,
}

/// The operator's fee cap at execution, relative to the fees asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cap {
    None,
    /// Equal to the fee: allowed.
    AtFee,
    /// One wei below: refused before signing.
    BelowFee,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Advance {
        secs: u32,
    },
    /// Prepare, by an agent or (a user-initiated transfer) by the owner; `expires_in` ≤ 0 is an
    /// invalid expiry.
    Prepare {
        by_owner: bool,
        expires_in: i32,
    },
    /// Spend `code` on `who`'s account, then (if accepted) authorize as `who`.
    Authorize {
        who: Who,
        code: Code,
    },
    Reject {
        who: Who,
    },
    Expire,
    Execute {
        by: Executor,
        cap: Cap,
        signer_fails: bool,
    },
    Confirm,
    Revert,
    Fail,
    /// An MFA-protected action other than authorizing (e.g. issuing an API key).
    UseCode {
        who: Who,
        code: Code,
    },
    /// Start replacing the owner's TOTP secret (needs a current code from the active one).
    StartMfaReplacement {
        code: Option<Code>,
    },
    /// Confirm the owner's pending secret with a code from it.
    ConfirmMfa {
        code: Code,
    },
}

/// Runs a future that never waits (the domain does no IO): one poll must finish it.
fn run_now<F: Future>(future: F) -> F::Output {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a command waited: the domain must not do IO"),
    }
}

fn step_of(now: OffsetDateTime) -> u64 {
    (now.unix_timestamp() / TOTP_PERIOD) as u64
}

fn code_for(step: u64, secret: &str) -> String {
    format!("s{step}-{secret}")
}

/// TOTP without keys: code `s<step>-<secret>` is valid for that step of that secret, within
/// one step of the clock (the server's window).
struct FakeVerifier;

#[async_trait]
impl aggregates::MfaVerifier for FakeVerifier {
    async fn matching_steps(
        &self,
        _user_id: &str,
        secret_id: &str,
        code: &str,
        now: OffsetDateTime,
    ) -> Result<Vec<u64>, String> {
        let current = step_of(now);
        Ok((current - 1..=current + 1)
            .filter(|s| code == code_for(*s, secret_id))
            .collect())
    }
}

/// Records every signing request; can be told to fail (a key that cannot be unsealed).
#[derive(Default)]
struct RecordingSigner {
    requests: Mutex<Vec<SigningRequest>>,
    fail: Mutex<bool>,
}

#[async_trait]
impl TransactionSigner for RecordingSigner {
    async fn sign(&self, request: SigningRequest) -> Result<SignedTransaction, String> {
        if *self.fail.lock().unwrap() {
            return Err("key unavailable".into());
        }
        let tx_hash = format!("0x{}{:02x}", request.payload.digest(), request.nonce);
        self.requests.lock().unwrap().push(request);
        Ok(SignedTransaction {
            tx_hash,
            raw: HexBytes::new(vec![0x02, NONCE as u8]),
        })
    }
}

/// One aggregate, its event log and a count of the commands it refused.
struct Tracked<A: Aggregate> {
    state: A,
    events: Vec<A::Event>,
}

impl<A> Tracked<A>
where
    A: Aggregate + Serialize + DeserializeOwned,
    A::Event: Clone + Debug + Serialize + DeserializeOwned,
    A::Error: Debug,
{
    fn new() -> Self {
        Self {
            state: A::default(),
            events: Vec::new(),
        }
    }

    /// Handle `command` and check the outcome-independent invariants: a refusal emits nothing
    /// and changes nothing; the log replays (through JSON, as stored) to the same state.
    fn handle(
        &mut self,
        command: A::Command,
        services: &A::Services,
    ) -> Result<Vec<A::Event>, A::Error> {
        let before = json(&self.state);
        let sink = EventSink::default();
        let result = run_now(self.state.handle(command, services, &sink));
        let emitted = run_now(sink.collect());
        if let Err(e) = result {
            assert!(emitted.is_empty(), "{e:?} emitted events: {emitted:?}");
            assert_eq!(json(&self.state), before, "{e:?} changed the state");
            return Err(e);
        }
        self.events.extend(emitted.iter().cloned());
        let mut replayed = A::default();
        for event in &self.events {
            let stored: A::Event = serde_json::from_value(json(event)).expect("event loads");
            replayed.apply(stored);
        }
        assert_eq!(json(&replayed), json(&self.state), "replay differs");
        Ok(emitted)
    }
}

fn json<T: Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).expect("serializes")
}

/// What the rules say about one user's TOTP, kept apart from the aggregate's own state.
#[derive(Debug, Clone)]
struct MfaModel {
    user_id: &'static str,
    active: Option<String>,
    pending: Option<String>,
    secrets_issued: u32,
    last_step: Option<u64>,
    last_code: Option<String>,
    failures: u32,
    locked_until: Option<OffsetDateTime>,
}

/// What checking a code should do.
#[derive(Debug, PartialEq)]
enum CodeOutcome {
    Accepted(u64),
    /// Recorded as a wrong code; `locks` if it is one too many.
    Wrong {
        locks: bool,
    },
    Refused(UserError),
}

impl MfaModel {
    fn new(user_id: &'static str) -> Self {
        Self {
            user_id,
            active: None,
            pending: None,
            secrets_issued: 0,
            last_step: None,
            last_code: None,
            failures: 0,
            locked_until: None,
        }
    }

    fn next_secret(&mut self) -> String {
        self.secrets_issued += 1;
        format!("{}-secret-{}", self.user_id, self.secrets_issued)
    }

    fn check(&self, code: &str, secret: &str, now: OffsetDateTime) -> CodeOutcome {
        if let Some(until) = self.locked_until.filter(|until| now < *until) {
            return CodeOutcome::Refused(UserError::MfaLocked { until });
        }
        let current = step_of(now);
        let step = (current - 1..=current + 1).find(|s| code == code_for(*s, secret));
        match step {
            None => CodeOutcome::Wrong {
                locks: self.failures + 1 >= MFA_MAX_FAILURES,
            },
            Some(step) if self.last_step.is_some_and(|last| step <= last) => {
                CodeOutcome::Refused(UserError::MfaCodeReplayed)
            }
            Some(step) => CodeOutcome::Accepted(step),
        }
    }

    fn accept(&mut self, step: u64, code: String) {
        self.last_step = Some(step);
        self.last_code = Some(code);
        self.failures = 0;
    }

    fn reject(&mut self, locks: bool, now: OffsetDateTime) {
        if locks {
            self.failures = 0;
            self.locked_until = Some(now + MFA_LOCKOUT);
        } else {
            self.failures += 1;
        }
    }
}

/// What the rules say about the transaction.
#[derive(Debug, Clone)]
struct TxModel {
    initiator: Initiator,
    expires_at: OffsetDateTime,
    status: TransactionStatus,
    tx_hash: Option<String>,
}

pub struct World {
    now: OffsetDateTime,
    signer: Arc<RecordingSigner>,
    signer_services: TransactionServices,
    verifier: UserServices,
    owner: Tracked<User>,
    stranger: Tracked<User>,
    owner_mfa: MfaModel,
    stranger_mfa: MfaModel,
    transaction: Tracked<Transaction>,
    tx: Option<TxModel>,
    history: Vec<String>,
}

fn agent(name: &str) -> Initiator {
    Initiator::Agent {
        api_key_id: "key-1".into(),
        api_key_name: name.into(),
    }
}

fn payload() -> TxPayload {
    TxPayload {
        chain_id: 31337,
        from: Address::from_bytes([0x5a; 20]),
        to: Address::from_bytes([0xfb; 20]),
        value: Amount::from(1_500_000_000_000_000_000),
        data: HexBytes::default(),
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    /// Both users registered with MFA enabled, no transaction yet.
    pub fn new() -> Self {
        let signer = Arc::new(RecordingSigner::default());
        let mut world = Self {
            now: START,
            signer_services: signer.clone(),
            signer,
            verifier: Arc::new(FakeVerifier),
            owner: Tracked::new(),
            stranger: Tracked::new(),
            owner_mfa: MfaModel::new(OWNER),
            stranger_mfa: MfaModel::new(STRANGER),
            transaction: Tracked::new(),
            tx: None,
            history: Vec::new(),
        };
        for who in [Who::Owner, Who::Stranger] {
            let now = world.now;
            let verifier = world.verifier.clone();
            let (user, mfa) = world.user(who);
            let user_id = mfa.user_id;
            let secret = mfa.next_secret();
            let code = code_for(step_of(now), &secret);
            let commands = [
                UserCommand::Register {
                    user_id: user_id.into(),
                    username: user_id.into(),
                    now,
                },
                UserCommand::StartMfaSetup {
                    secret_id: secret.clone(),
                    code: None,
                    now,
                },
                UserCommand::ConfirmMfa {
                    code: code.clone(),
                    now,
                },
            ];
            for command in commands {
                user.handle(command, &verifier).expect("enrolment");
            }
            mfa.active = Some(secret);
            mfa.accept(step_of(now), code);
        }
        world
    }

    /// The transaction's status as the aggregate has it (checked against the model).
    pub fn status(&self) -> Option<TransactionStatus> {
        self.transaction.state.status()
    }

    fn user(&mut self, who: Who) -> (&mut Tracked<User>, &mut MfaModel) {
        match who {
            Who::Owner => (&mut self.owner, &mut self.owner_mfa),
            Who::Stranger => (&mut self.stranger, &mut self.stranger_mfa),
        }
    }

    fn code(&self, who: Who, kind: Code, secret: Option<&str>) -> String {
        let (mfa, other) = match who {
            Who::Owner => (&self.owner_mfa, &self.stranger_mfa),
            Who::Stranger => (&self.stranger_mfa, &self.owner_mfa),
        };
        let secret = secret.or(mfa.active.as_deref()).unwrap_or("none");
        let current = step_of(self.now);
        match kind {
            Code::Current => code_for(current, secret),
            Code::Previous => code_for(current - 1, secret),
            Code::Next => code_for(current + 1, secret),
            Code::Stale => code_for(current - 2, secret),
            Code::Replayed => mfa
                .last_code
                .clone()
                .unwrap_or_else(|| code_for(current, secret)),
            Code::OtherSecret => code_for(current, other.active.as_deref().unwrap_or("none")),
            Code::Garbage => "000000".into(),
        }
    }

    /// Spend `code` against `secret` (the active one unless given) through `command`, and
    /// check the outcome against the model. True if the code was accepted.
    fn spend(&mut self, who: Who, command: UserCommand, code: &str, secret: &str) -> bool {
        let now = self.now;
        let verifier = self.verifier.clone();
        let (user, mfa) = self.user(who);
        let expected = mfa.check(code, secret, now);
        let result = user.handle(command, &verifier);
        let accepted = match (&expected, result) {
            (CodeOutcome::Refused(e), Err(got)) => {
                assert_eq!(&got, e, "code {code} refused for the wrong reason");
                return false;
            }
            (_, Err(got)) => panic!("expected {expected:?} for code {code}, got {got:?}"),
            (_, Ok(events)) => {
                let steps: Vec<u64> = events
                    .iter()
                    .filter_map(|e| match e {
                        UserEvent::MfaCodeAccepted { step, .. }
                        | UserEvent::MfaEnabled { step, .. } => Some(*step),
                        _ => None,
                    })
                    .collect();
                let locked = events
                    .iter()
                    .any(|e| matches!(e, UserEvent::MfaLockedOut { .. }));
                match expected {
                    CodeOutcome::Accepted(step) => {
                        assert_eq!(steps, [step], "code {code}: {events:?}");
                        assert_eq!(mfa_verdict(&events), Ok(()));
                        mfa.accept(step, code.to_owned());
                        true
                    }
                    CodeOutcome::Wrong { locks } => {
                        assert!(steps.is_empty(), "wrong code {code} accepted: {events:?}");
                        assert_eq!(locked, locks, "lockout after {events:?}");
                        assert!(mfa_verdict(&events).is_err(), "{events:?}");
                        mfa.reject(locks, now);
                        false
                    }
                    CodeOutcome::Refused(e) => panic!("expected {e:?}, got {events:?}"),
                }
            }
        };
        check_steps_increase(&user.events);
        accepted
    }

    fn prepare_command(&self, by_owner: bool, expires_in: i32) -> TransactionCommand {
        let payload = payload();
        TransactionCommand::Prepare(Box::new(PrepareTransaction {
            transaction_id: TX_ID.into(),
            wallet_address: payload.from,
            owner_user_id: OWNER.into(),
            initiator: if by_owner {
                Initiator::User {
                    user_id: OWNER.into(),
                }
            } else {
                agent("trading bot")
            },
            kind: TransactionKind::Native,
            to: payload.to,
            token_address: None,
            amount: None,
            memo: Some("rent".into()),
            summary: "Send 1.5 ETH".into(),
            payload,
            simulation: PreparedSimulation {
                outcome: SimulationOutcome::Success,
                gas_estimate: Some(21_000),
                max_fee_per_gas: Some(FEES.max_fee_per_gas),
                max_fee_wei: None,
            },
            now: self.now,
            expires_at: self.now + Duration::seconds(expires_in.into()),
        }))
    }

    /// The checks authorize and reject share.
    fn expect_decision(&self, user_id: &str, action: &'static str) -> Result<(), TransactionError> {
        let tx = self.tx.as_ref().ok_or(TransactionError::NotFound)?;
        if user_id != OWNER {
            return Err(TransactionError::NotOwner);
        }
        let overdue =
            tx.status == TransactionStatus::PendingAuthorization && self.now >= tx.expires_at;
        if tx.status == TransactionStatus::Expired || overdue {
            return Err(TransactionError::Expired);
        }
        if tx.status != TransactionStatus::PendingAuthorization {
            return Err(TransactionError::InvalidState {
                action,
                status: tx.status,
            });
        }
        Ok(())
    }

    fn executor(&self, by: Executor) -> Initiator {
        let initiator = self
            .tx
            .as_ref()
            .map_or_else(|| agent("trading bot"), |tx| tx.initiator.clone());
        match by {
            Executor::Initiator => initiator,
            Executor::InitiatorRenamed => match initiator {
                Initiator::Agent { api_key_id, .. } => Initiator::Agent {
                    api_key_id,
                    api_key_name: "renamed bot".into(),
                },
                user => user,
            },
            Executor::OtherAgent => Initiator::Agent {
                api_key_id: "key-2".into(),
                api_key_name: "trading bot".into(),
            },
            Executor::OwnerUser => Initiator::User {
                user_id: OWNER.into(),
            },
            Executor::StrangerUser => Initiator::User {
                user_id: STRANGER.into(),
            },
        }
    }

    fn expect_execute(
        &self,
        actor: &Initiator,
        cap: Option<u128>,
        signer_fails: bool,
    ) -> Result<TransactionStatus, TransactionError> {
        let tx = self.tx.as_ref().ok_or(TransactionError::NotFound)?;
        if !tx.initiator.same_principal(actor) {
            return Err(TransactionError::NotInitiator);
        }
        match (tx.status, &tx.tx_hash) {
            (TransactionStatus::Authorized, _) => {}
            (TransactionStatus::Executed | TransactionStatus::Confirmed, hash)
            | (TransactionStatus::Failed, hash @ Some(_)) => {
                return Err(TransactionError::AlreadyExecuted {
                    tx_hash: hash.clone().unwrap_or_default(),
                })
            }
            (status, _) => {
                return Err(TransactionError::InvalidState {
                    action: "execute",
                    status,
                })
            }
        }
        if let Some(cap) = cap.filter(|cap| FEES.max_fee_per_gas > *cap) {
            return Err(TransactionError::FeeAboveCap {
                max_fee_per_gas: FEES.max_fee_per_gas,
                cap,
            });
        }
        if signer_fails {
            return Err(TransactionError::Signing("key unavailable".into()));
        }
        Ok(TransactionStatus::Executed)
    }

    /// Expected outcome of `command` on the transaction: the new status, or the error.
    fn expect(
        &self,
        command: &TransactionCommand,
        signer_fails: bool,
    ) -> Result<TransactionStatus, TransactionError> {
        use TransactionStatus as S;
        let status = |action: &'static str, allowed: &[S]| {
            let tx = self.tx.as_ref().ok_or(TransactionError::NotFound)?;
            if allowed.contains(&tx.status) {
                Ok(tx)
            } else {
                Err(TransactionError::InvalidState {
                    action,
                    status: tx.status,
                })
            }
        };
        match command {
            TransactionCommand::Prepare(cmd) => match self.tx {
                Some(_) => Err(TransactionError::AlreadyExists),
                None if cmd.expires_at <= cmd.now => Err(TransactionError::InvalidExpiry),
                None => Ok(S::PendingAuthorization),
            },
            TransactionCommand::Authorize { user_id, .. } => self
                .expect_decision(user_id, "authorize")
                .map(|()| S::Authorized),
            TransactionCommand::Reject { user_id, .. } => self
                .expect_decision(user_id, "reject")
                .map(|()| S::Rejected),
            TransactionCommand::Expire { .. } => {
                let tx = status("expire", &[S::PendingAuthorization])?;
                if self.now < tx.expires_at {
                    return Err(TransactionError::NotDue);
                }
                Ok(S::Expired)
            }
            TransactionCommand::Execute {
                actor,
                max_fee_per_gas_cap,
                ..
            } => self.expect_execute(actor, *max_fee_per_gas_cap, signer_fails),
            TransactionCommand::RecordReceipt { outcome, .. } => {
                status("confirm", &[S::Executed])?;
                Ok(match outcome {
                    ReceiptOutcome::Confirmed { .. } => S::Confirmed,
                    ReceiptOutcome::Reverted { .. } => S::Failed,
                })
            }
            TransactionCommand::Fail { .. } => {
                status("fail", &[S::Authorized, S::Executed])?;
                Ok(S::Failed)
            }
        }
    }

    /// Send `command` to the transaction and check it against the model and the invariants.
    fn command(&mut self, command: TransactionCommand, signer_fails: bool) {
        let expected = self.expect(&command, signer_fails);
        let before = self.transaction.state.status();
        *self.signer.fail.lock().unwrap() = signer_fails;
        let result = self
            .transaction
            .handle(command.clone(), &self.signer_services);
        match (expected, result) {
            (Err(want), Err(got)) => assert_eq!(got, want, "refused for the wrong reason"),
            (Ok(want), Ok(events)) => {
                assert_eq!(events.len(), 1, "one event per command: {events:?}");
                assert_eq!(self.transaction.state.status(), Some(want));
                let tx = self.tx.get_or_insert_with(|| TxModel {
                    initiator: match &command {
                        TransactionCommand::Prepare(cmd) => cmd.initiator.clone(),
                        _ => unreachable!("only a prepare creates it"),
                    },
                    expires_at: match &command {
                        TransactionCommand::Prepare(cmd) => cmd.expires_at,
                        _ => unreachable!("only a prepare creates it"),
                    },
                    status: want,
                    tx_hash: None,
                });
                tx.status = want;
                if let TransactionEvent::TransactionExecuted { tx_hash, .. } = &events[0] {
                    tx.tx_hash = Some(tx_hash.clone());
                }
            }
            (want, got) => panic!("expected {want:?}, got {got:?}"),
        }
        if before.is_some_and(|s| s.is_terminal()) {
            assert_eq!(
                self.transaction.state.status(),
                before,
                "left a terminal state"
            );
        }
        self.check_transaction();
    }

    /// Run one step and check every invariant. Panics (with the steps so far) on a violation.
    pub fn step(&mut self, step: &Step) {
        self.history.push(format!("{step:?}"));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(step)));
        if let Err(panic) = outcome {
            eprintln!("invariant violated after:\n  {}", self.history.join("\n  "));
            std::panic::resume_unwind(panic);
        }
    }

    fn run(&mut self, step: &Step) {
        let now = self.now;
        match *step {
            Step::Advance { secs } => self.now += Duration::seconds(secs.into()),
            Step::Prepare {
                by_owner,
                expires_in,
            } => self.command(self.prepare_command(by_owner, expires_in), false),
            Step::Authorize { who, code } => {
                let code = self.code(who, code, None);
                let user_id = match who {
                    Who::Owner => OWNER,
                    Who::Stranger => STRANGER,
                };
                let secret = self.user(who).1.active.clone().unwrap_or_default();
                let spend = UserCommand::UseMfaCode {
                    code: code.clone(),
                    purpose: format!("authorize_transaction:{TX_ID}"),
                    now,
                };
                if self.spend(who, spend, &code, &secret) {
                    let authorize = TransactionCommand::Authorize {
                        user_id: user_id.into(),
                        now,
                    };
                    self.command(authorize, false);
                }
            }
            Step::Reject { who } => {
                let user_id = match who {
                    Who::Owner => OWNER,
                    Who::Stranger => STRANGER,
                };
                let reject = TransactionCommand::Reject {
                    user_id: user_id.into(),
                    reason: Some("not today".into()),
                    now,
                };
                self.command(reject, false);
            }
            Step::Expire => self.command(TransactionCommand::Expire { now }, false),
            Step::Execute {
                by,
                cap,
                signer_fails,
            } => {
                let execute = TransactionCommand::Execute {
                    actor: self.executor(by),
                    nonce: NONCE,
                    fees: FEES,
                    max_fee_per_gas_cap: match cap {
                        Cap::None => None,
                        Cap::AtFee => Some(FEES.max_fee_per_gas),
                        Cap::BelowFee => Some(FEES.max_fee_per_gas - 1),
                    },
                    now,
                };
                self.command(execute, signer_fails);
            }
            Step::Confirm | Step::Revert => {
                let outcome = if *step == Step::Confirm {
                    ReceiptOutcome::Confirmed {
                        block_number: 12,
                        gas_used: 21_000,
                        effective_gas_price: 1_500_000_000,
                    }
                } else {
                    ReceiptOutcome::Reverted { block_number: 12 }
                };
                self.command(TransactionCommand::RecordReceipt { outcome, now }, false);
            }
            Step::Fail => {
                let fail = TransactionCommand::Fail {
                    reason: "broadcast refused".into(),
                    now,
                };
                self.command(fail, false);
            }
            Step::UseCode { who, code } => {
                let code = self.code(who, code, None);
                let secret = self.user(who).1.active.clone().unwrap_or_default();
                let spend = UserCommand::UseMfaCode {
                    code: code.clone(),
                    purpose: "issue_api_key".into(),
                    now,
                };
                self.spend(who, spend, &code, &secret);
            }
            Step::StartMfaReplacement { code } => {
                let secret_id = self.owner_mfa.next_secret();
                let typed = code.map(|c| self.code(Who::Owner, c, None));
                let start = UserCommand::StartMfaSetup {
                    secret_id: secret_id.clone(),
                    code: typed.clone(),
                    now,
                };
                let started = match typed {
                    None => {
                        let got = self.owner.handle(start, &self.verifier);
                        assert_eq!(got.unwrap_err(), UserError::MfaCodeRequired);
                        false
                    }
                    Some(typed) => {
                        let active = self.owner_mfa.active.clone().unwrap_or_default();
                        self.spend(Who::Owner, start, &typed, &active)
                    }
                };
                if started {
                    let last = self.owner.events.last();
                    assert!(
                        matches!(last, Some(UserEvent::MfaSetupStarted { secret_id: s, .. }) if *s == secret_id),
                        "no setup started after an accepted code: {last:?}"
                    );
                    self.owner_mfa.pending = Some(secret_id);
                }
            }
            Step::ConfirmMfa { code } => {
                let Some(pending) = self.owner_mfa.pending.clone() else {
                    let confirm = UserCommand::ConfirmMfa {
                        code: self.code(Who::Owner, code, None),
                        now,
                    };
                    let got = self.owner.handle(confirm, &self.verifier);
                    assert_eq!(got.unwrap_err(), UserError::NoPendingMfa);
                    return;
                };
                let typed = self.code(Who::Owner, code, Some(&pending));
                let confirm = UserCommand::ConfirmMfa {
                    code: typed.clone(),
                    now,
                };
                if self.spend(Who::Owner, confirm, &typed, &pending) {
                    self.owner_mfa.active = Some(pending);
                    self.owner_mfa.pending = None;
                }
            }
        }
        assert!(
            self.owner.state.mfa_enabled() && self.stranger.state.mfa_enabled(),
            "MFA was switched off"
        );
    }

    /// The transaction's invariants, from its event log and the signer's record.
    fn check_transaction(&self) {
        use TransactionStatus as S;
        let mut status: Option<S> = None;
        let mut prepared = None;
        let mut owner_authorized = false;
        let mut executions = 0;
        for event in &self.transaction.events {
            let next = match event {
                TransactionEvent::TransactionPrepared(p) => {
                    assert_eq!(p.payload_digest, p.payload.digest(), "digest of the prompt");
                    prepared = Some(p);
                    S::PendingAuthorization
                }
                TransactionEvent::TransactionAuthorized {
                    authorized_by,
                    payload_digest,
                    authorized_at,
                } => {
                    let p = prepared.expect("authorized before prepared");
                    assert_eq!(authorized_by, &p.owner_user_id, "authorized by a non-owner");
                    assert_eq!(
                        payload_digest, &p.payload_digest,
                        "authorized another payload"
                    );
                    assert!(
                        *authorized_at < p.expires_at,
                        "authorized after the deadline"
                    );
                    owner_authorized = true;
                    S::Authorized
                }
                TransactionEvent::TransactionRejected { rejected_by, .. } => {
                    let p = prepared.expect("rejected before prepared");
                    assert_eq!(rejected_by, &p.owner_user_id, "rejected by a non-owner");
                    S::Rejected
                }
                TransactionEvent::TransactionExpired { expired_at } => {
                    let p = prepared.expect("expired before prepared");
                    assert!(*expired_at >= p.expires_at, "expired early");
                    S::Expired
                }
                TransactionEvent::TransactionExecuted { executed_by, .. } => {
                    let p = prepared.expect("executed before prepared");
                    assert!(
                        owner_authorized,
                        "executed without the owner's authorization"
                    );
                    assert!(
                        p.initiator.same_principal(executed_by),
                        "executed by {executed_by:?}, not the initiator"
                    );
                    executions += 1;
                    S::Executed
                }
                TransactionEvent::TransactionConfirmed { .. } => S::Confirmed,
                TransactionEvent::TransactionFailed { .. } => S::Failed,
            };
            let allowed = match status {
                None => next == S::PendingAuthorization,
                Some(S::PendingAuthorization) => {
                    matches!(next, S::Authorized | S::Rejected | S::Expired)
                }
                Some(S::Authorized) => matches!(next, S::Executed | S::Failed),
                Some(S::Executed) => matches!(next, S::Confirmed | S::Failed),
                Some(terminal) => {
                    assert!(terminal.is_terminal());
                    false
                }
            };
            assert!(allowed, "{status:?} -> {next:?} is not in the lifecycle");
            status = Some(next);
        }
        assert_eq!(status, self.transaction.state.status());
        assert!(executions <= 1, "executed {executions} times");
        let signed = self.signer.requests.lock().unwrap();
        assert!(signed.len() <= 1, "signed {} times", signed.len());
        assert_eq!(signed.len(), executions, "a signature without its event");
        if let (Some(request), Some(p)) = (signed.first(), prepared) {
            assert_eq!(request.payload, p.payload, "signed something else");
            assert_eq!(request.wallet_address, p.wallet_address);
            assert_eq!(request.owner_user_id, p.owner_user_id);
        }
    }
}

/// Accepted steps only ever increase: each is used once, and none earlier than the last.
fn check_steps_increase(events: &[UserEvent]) {
    let mut last: Option<u64> = None;
    let mut locked_until: Option<OffsetDateTime> = None;
    for event in events {
        let (step, at) = match event {
            UserEvent::MfaCodeAccepted {
                step, accepted_at, ..
            } => (*step, *accepted_at),
            UserEvent::MfaEnabled {
                step, enabled_at, ..
            } => (*step, *enabled_at),
            UserEvent::MfaLockedOut { until, .. } => {
                locked_until = Some(*until);
                continue;
            }
            _ => continue,
        };
        assert!(
            last.is_none_or(|last| step > last),
            "step {step} accepted after step {last:?}"
        );
        assert!(
            locked_until.is_none_or(|until| at >= until),
            "a code accepted during a lockout"
        );
        last = Some(step);
    }
}
