//! Given/when/then specifications of every `Transaction` invariant.

use std::sync::Arc;

use async_trait::async_trait;
use cqrs_es::test::TestFramework;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use super::*;

const OWNER: &str = "user-owner";
const STRANGER: &str = "user-stranger";
const NOW: OffsetDateTime = datetime!(2026-01-01 12:00 UTC);

/// Deterministic signer: the "hash" encodes what it was asked to sign, so a test can check
/// that the authorized payload is exactly what gets signed.
struct FakeSigner;

#[async_trait]
impl TransactionSigner for FakeSigner {
    async fn sign(&self, request: SigningRequest) -> Result<SignedTransaction, String> {
        Ok(SignedTransaction {
            tx_hash: format!("0xhash-{}-{}", request.payload.digest(), request.nonce),
            raw: HexBytes::new(vec![0x02, request.nonce as u8]),
        })
    }
}

fn framework() -> TestFramework<Transaction> {
    TestFramework::with(Arc::new(FakeSigner) as TransactionServices)
}

fn agent() -> Initiator {
    Initiator::Agent {
        api_key_id: "key-1".into(),
        api_key_name: "trading bot".into(),
    }
}

fn payload() -> TxPayload {
    TxPayload {
        chain_id: 31337,
        from: "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
            .parse()
            .unwrap(),
        to: "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359"
            .parse()
            .unwrap(),
        value: "1500000000000000000".parse().unwrap(),
        data: HexBytes::default(),
    }
}

fn prepare_command() -> PrepareTransaction {
    let payload = payload();
    PrepareTransaction {
        transaction_id: "tx-1".into(),
        wallet_address: payload.from,
        owner_user_id: OWNER.into(),
        initiator: agent(),
        kind: TransactionKind::Native,
        to: payload.to,
        token_address: None,
        amount: None,
        memo: Some("rent".into()),
        summary: "Send 1.5 ETH".into(),
        payload,
        simulation: simulated(),
        now: NOW,
        expires_at: NOW + Duration::minutes(15),
    }
}

fn simulated() -> PreparedSimulation {
    PreparedSimulation {
        outcome: SimulationOutcome::Success,
        gas_estimate: Some(21_000),
        max_fee_per_gas: Some(2_000_000_000),
        max_fee_wei: Some(Amount::from(50_400_000_000_000)),
    }
}

fn prepared() -> TransactionEvent {
    let cmd = prepare_command();
    TransactionEvent::TransactionPrepared(Box::new(TransactionPrepared {
        transaction_id: cmd.transaction_id,
        wallet_address: cmd.wallet_address,
        owner_user_id: cmd.owner_user_id,
        initiator: cmd.initiator,
        kind: cmd.kind,
        to: cmd.to,
        token_address: None,
        amount: None,
        memo: cmd.memo,
        summary: cmd.summary,
        payload_digest: cmd.payload.digest(),
        payload: cmd.payload,
        prepared_at: NOW,
        expires_at: NOW + Duration::minutes(15),
        simulation: Some(SimulationOutcome::Success),
        gas_estimate: Some(21_000),
        max_fee_per_gas: Some(2_000_000_000),
        max_fee_wei: Some(Amount::from(50_400_000_000_000)),
    }))
}

fn authorized() -> TransactionEvent {
    TransactionEvent::TransactionAuthorized {
        authorized_by: OWNER.into(),
        payload_digest: payload().digest(),
        authorized_at: NOW,
    }
}

fn fees() -> FeeParams {
    FeeParams {
        gas_limit: 21_000,
        max_fee_per_gas: 2_000_000_000,
        max_priority_fee_per_gas: 1_000_000_000,
    }
}

fn execute(actor: Initiator) -> TransactionCommand {
    TransactionCommand::Execute {
        actor,
        nonce: 7,
        fees: fees(),
        max_fee_per_gas_cap: None,
        now: NOW,
    }
}

fn executed() -> TransactionEvent {
    TransactionEvent::TransactionExecuted {
        tx_hash: format!("0xhash-{}-7", payload().digest()),
        nonce: 7,
        gas_limit: 21_000,
        max_fee_per_gas: 2_000_000_000,
        max_priority_fee_per_gas: 1_000_000_000,
        raw_transaction: "0x0207".into(),
        executed_by: agent(),
        executed_at: NOW,
    }
}

#[test]
fn prepare_records_the_prompt_with_a_digest_of_the_exact_payload() {
    framework()
        .given_no_previous_events()
        .when(TransactionCommand::Prepare(Box::new(prepare_command())))
        .then_expect_events(vec![prepared()]);
}

#[test]
fn preparing_twice_is_rejected() {
    framework()
        .given(vec![prepared()])
        .when(TransactionCommand::Prepare(Box::new(prepare_command())))
        .then_expect_error(TransactionError::AlreadyExists);
}

#[test]
fn expiry_must_be_in_the_future() {
    let mut cmd = prepare_command();
    cmd.expires_at = NOW;
    framework()
        .given_no_previous_events()
        .when(TransactionCommand::Prepare(Box::new(cmd)))
        .then_expect_error(TransactionError::InvalidExpiry);
}

#[test]
fn owner_authorizes_a_pending_transaction() {
    framework()
        .given(vec![prepared()])
        .when(TransactionCommand::Authorize {
            user_id: OWNER.into(),
            now: NOW,
        })
        .then_expect_events(vec![authorized()]);
}

#[test]
fn only_the_owner_may_authorize() {
    framework()
        .given(vec![prepared()])
        .when(TransactionCommand::Authorize {
            user_id: STRANGER.into(),
            now: NOW,
        })
        .then_expect_error(TransactionError::NotOwner);
}

#[test]
fn authorizing_an_unknown_transaction_is_not_found() {
    framework()
        .given_no_previous_events()
        .when(TransactionCommand::Authorize {
            user_id: OWNER.into(),
            now: NOW,
        })
        .then_expect_error(TransactionError::NotFound);
}

#[test]
fn authorizing_after_the_deadline_fails_even_before_expiry_is_recorded() {
    framework()
        .given(vec![prepared()])
        .when(TransactionCommand::Authorize {
            user_id: OWNER.into(),
            now: NOW + Duration::minutes(15),
        })
        .then_expect_error(TransactionError::Expired);
}

#[test]
fn authorizing_twice_is_a_state_error() {
    framework()
        .given(vec![prepared(), authorized()])
        .when(TransactionCommand::Authorize {
            user_id: OWNER.into(),
            now: NOW,
        })
        .then_expect_error(TransactionError::InvalidState {
            action: "authorize",
            status: TransactionStatus::Authorized,
        });
}

#[test]
fn authorize_after_reject_is_refused() {
    framework()
        .given(vec![
            prepared(),
            TransactionEvent::TransactionRejected {
                rejected_by: OWNER.into(),
                reason: None,
                rejected_at: NOW,
            },
        ])
        .when(TransactionCommand::Authorize {
            user_id: OWNER.into(),
            now: NOW,
        })
        .then_expect_error(TransactionError::InvalidState {
            action: "authorize",
            status: TransactionStatus::Rejected,
        });
}

#[test]
fn authorize_after_recorded_expiry_is_refused() {
    framework()
        .given(vec![
            prepared(),
            TransactionEvent::TransactionExpired {
                expired_at: NOW + Duration::minutes(15),
            },
        ])
        .when(TransactionCommand::Authorize {
            user_id: OWNER.into(),
            now: NOW,
        })
        .then_expect_error(TransactionError::Expired);
}

#[test]
fn owner_rejects_a_pending_transaction_with_a_reason() {
    framework()
        .given(vec![prepared()])
        .when(TransactionCommand::Reject {
            user_id: OWNER.into(),
            reason: Some("too much".into()),
            now: NOW,
        })
        .then_expect_events(vec![TransactionEvent::TransactionRejected {
            rejected_by: OWNER.into(),
            reason: Some("too much".into()),
            rejected_at: NOW,
        }]);
}

#[test]
fn reject_only_while_pending() {
    framework()
        .given(vec![prepared(), authorized()])
        .when(TransactionCommand::Reject {
            user_id: OWNER.into(),
            reason: None,
            now: NOW,
        })
        .then_expect_error(TransactionError::InvalidState {
            action: "reject",
            status: TransactionStatus::Authorized,
        });
}

#[test]
fn stranger_cannot_reject() {
    framework()
        .given(vec![prepared()])
        .when(TransactionCommand::Reject {
            user_id: STRANGER.into(),
            reason: None,
            now: NOW,
        })
        .then_expect_error(TransactionError::NotOwner);
}

#[test]
fn expire_records_expiry_once_due() {
    let at = NOW + Duration::minutes(15);
    framework()
        .given(vec![prepared()])
        .when(TransactionCommand::Expire { now: at })
        .then_expect_events(vec![TransactionEvent::TransactionExpired {
            expired_at: at,
        }]);
}

#[test]
fn expire_before_deadline_is_refused() {
    framework()
        .given(vec![prepared()])
        .when(TransactionCommand::Expire { now: NOW })
        .then_expect_error(TransactionError::NotDue);
}

#[test]
fn authorized_transactions_do_not_expire() {
    framework()
        .given(vec![prepared(), authorized()])
        .when(TransactionCommand::Expire {
            now: NOW + Duration::hours(1),
        })
        .then_expect_error(TransactionError::InvalidState {
            action: "expire",
            status: TransactionStatus::Authorized,
        });
}

#[test]
fn execute_signs_exactly_the_authorized_payload() {
    framework()
        .given(vec![prepared(), authorized()])
        .when(execute(agent()))
        .then_expect_events(vec![executed()]);
}

#[test]
fn execute_before_authorization_is_refused() {
    framework()
        .given(vec![prepared()])
        .when(execute(agent()))
        .then_expect_error(TransactionError::InvalidState {
            action: "execute",
            status: TransactionStatus::PendingAuthorization,
        });
}

#[test]
fn execute_after_rejection_is_refused() {
    framework()
        .given(vec![
            prepared(),
            TransactionEvent::TransactionRejected {
                rejected_by: OWNER.into(),
                reason: None,
                rejected_at: NOW,
            },
        ])
        .when(execute(agent()))
        .then_expect_error(TransactionError::InvalidState {
            action: "execute",
            status: TransactionStatus::Rejected,
        });
}

#[test]
fn only_the_initiator_may_execute() {
    let other_agent = Initiator::Agent {
        api_key_id: "key-2".into(),
        api_key_name: "trading bot".into(),
    };
    framework()
        .given(vec![prepared(), authorized()])
        .when(execute(other_agent))
        .then_expect_error(TransactionError::NotInitiator);
    framework()
        .given(vec![prepared(), authorized()])
        .when(execute(Initiator::User {
            user_id: OWNER.into(),
        }))
        .then_expect_error(TransactionError::NotInitiator);
}

#[test]
fn executing_twice_returns_the_first_hash_and_signs_nothing() {
    framework()
        .given(vec![prepared(), authorized(), executed()])
        .when(execute(agent()))
        .then_expect_error(TransactionError::AlreadyExecuted {
            tx_hash: format!("0xhash-{}-7", payload().digest()),
        });
}

#[test]
fn receipt_confirms_an_executed_transaction() {
    framework()
        .given(vec![prepared(), authorized(), executed()])
        .when(TransactionCommand::RecordReceipt {
            outcome: ReceiptOutcome::Confirmed {
                block_number: 3,
                gas_used: 21_000,
                effective_gas_price: 1_500_000_000,
            },
            now: NOW,
        })
        .then_expect_events(vec![TransactionEvent::TransactionConfirmed {
            block_number: 3,
            gas_used: 21_000,
            effective_gas_price: 1_500_000_000,
            confirmed_at: NOW,
        }]);
}

#[test]
fn reverted_receipt_fails_the_transaction() {
    framework()
        .given(vec![prepared(), authorized(), executed()])
        .when(TransactionCommand::RecordReceipt {
            outcome: ReceiptOutcome::Reverted { block_number: 4 },
            now: NOW,
        })
        .then_expect_events(vec![TransactionEvent::TransactionFailed {
            reason: "reverted on chain".into(),
            block_number: Some(4),
            failed_at: NOW,
        }]);
}

#[test]
fn terminal_states_stay_terminal() {
    let confirmed = TransactionEvent::TransactionConfirmed {
        block_number: 3,
        gas_used: 21_000,
        effective_gas_price: 1,
        confirmed_at: NOW,
    };
    framework()
        .given(vec![
            prepared(),
            authorized(),
            executed(),
            confirmed.clone(),
        ])
        .when(TransactionCommand::Fail {
            reason: "late".into(),
            now: NOW,
        })
        .then_expect_error(TransactionError::InvalidState {
            action: "fail",
            status: TransactionStatus::Confirmed,
        });
    framework()
        .given(vec![prepared(), authorized(), executed(), confirmed])
        .when(TransactionCommand::RecordReceipt {
            outcome: ReceiptOutcome::Reverted { block_number: 9 },
            now: NOW,
        })
        .then_expect_error(TransactionError::InvalidState {
            action: "confirm",
            status: TransactionStatus::Confirmed,
        });
}

#[test]
fn digest_changes_with_every_signed_field() {
    let base = payload();
    let mut variants = vec![];
    let mut p = base.clone();
    p.chain_id = 1;
    variants.push(p);
    let mut p = base.clone();
    p.to = base.from;
    variants.push(p);
    let mut p = base.clone();
    p.value = Amount::from(1);
    variants.push(p);
    let mut p = base.clone();
    p.data = HexBytes::new(vec![0]);
    variants.push(p);
    for v in variants {
        assert_ne!(v.digest(), base.digest());
    }
}

fn user_initiated() -> (PrepareTransaction, TransactionEvent) {
    let mut cmd = prepare_command();
    cmd.initiator = Initiator::User {
        user_id: OWNER.into(),
    };
    let TransactionEvent::TransactionPrepared(mut event) = prepared() else {
        unreachable!()
    };
    event.initiator = cmd.initiator.clone();
    (cmd, TransactionEvent::TransactionPrepared(event))
}

#[test]
fn a_prepare_that_would_revert_is_recorded_with_the_reason_and_can_still_be_decided() {
    let mut cmd = prepare_command();
    let reverted = SimulationOutcome::Reverted {
        reason: "Target: paused".into(),
    };
    cmd.simulation = PreparedSimulation {
        outcome: reverted.clone(),
        gas_estimate: None,
        max_fee_per_gas: Some(2_000_000_000),
        max_fee_wei: None,
    };
    let TransactionEvent::TransactionPrepared(mut expected) = prepared() else {
        unreachable!()
    };
    expected.simulation = Some(reverted);
    expected.gas_estimate = None;
    expected.max_fee_wei = None;
    let expected = TransactionEvent::TransactionPrepared(expected);
    framework()
        .given_no_previous_events()
        .when(TransactionCommand::Prepare(Box::new(cmd)))
        .then_expect_events(vec![expected.clone()]);
    framework()
        .given(vec![expected])
        .when(TransactionCommand::Authorize {
            user_id: OWNER.into(),
            now: NOW,
        })
        .then_expect_events(vec![authorized()]);
}

#[test]
fn prepared_events_recorded_before_simulation_existed_still_load() {
    // The exact shape stored before `simulation`, `gas_estimate`, `max_fee_per_gas` and
    // `max_fee_wei` were added.
    let old = serde_json::json!({"TransactionPrepared": {
        "transaction_id": "tx-1",
        "wallet_address": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
        "owner_user_id": OWNER,
        "initiator": {"type": "agent", "api_key_id": "key-1", "api_key_name": "trading bot"},
        "kind": "native",
        "to": "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
        "token_address": null,
        "amount": null,
        "memo": "rent",
        "summary": "Send 1.5 ETH",
        "payload": {
            "chain_id": 31337,
            "from": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
            "to": "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
            "value": "1500000000000000000",
            "data": "0x"
        },
        "payload_digest": payload().digest(),
        "prepared_at": "2026-01-01T12:00:00Z",
        "expires_at": "2026-01-01T12:15:00Z"
    }});
    let event: TransactionEvent = serde_json::from_value(old).expect("old shape loads");
    let TransactionEvent::TransactionPrepared(p) = &event else {
        panic!("wrong variant: {event:?}")
    };
    assert_eq!(p.simulation, None);
    assert_eq!(p.gas_estimate, None);
    assert_eq!(p.max_fee_per_gas, None);
    assert_eq!(p.max_fee_wei, None);
    // And an aggregate built from it behaves as before.
    framework()
        .given(vec![event])
        .when(TransactionCommand::Authorize {
            user_id: OWNER.into(),
            now: NOW,
        })
        .then_expect_events(vec![authorized()]);
}

#[test]
fn simulation_outcomes_serialize_as_tagged_objects() {
    let json = serde_json::to_value(SimulationOutcome::Reverted {
        reason: "Target: paused".into(),
    })
    .unwrap();
    assert_eq!(
        json,
        serde_json::json!({"status": "reverted", "reason": "Target: paused"})
    );
    let json = serde_json::to_value(SimulationOutcome::Success).unwrap();
    assert_eq!(json, serde_json::json!({"status": "success"}));
}

#[test]
fn execute_refuses_fees_above_the_cap_and_signs_nothing() {
    let capped = |cap| TransactionCommand::Execute {
        actor: agent(),
        nonce: 7,
        fees: fees(),
        max_fee_per_gas_cap: Some(cap),
        now: NOW,
    };
    framework()
        .given(vec![prepared(), authorized()])
        .when(capped(1_999_999_999))
        .then_expect_error(TransactionError::FeeAboveCap {
            max_fee_per_gas: 2_000_000_000,
            cap: 1_999_999_999,
        });
    // At the cap is fine.
    framework()
        .given(vec![prepared(), authorized()])
        .when(capped(2_000_000_000))
        .then_expect_events(vec![executed()]);
}

#[test]
fn a_call_that_now_reverts_fails_before_signing_and_can_never_be_executed() {
    let failed = TransactionEvent::TransactionFailed {
        reason: "simulation failed: Target: paused".into(),
        block_number: None,
        failed_at: NOW,
    };
    framework()
        .given(vec![prepared(), authorized()])
        .when(TransactionCommand::Fail {
            reason: "simulation failed: Target: paused".into(),
            now: NOW,
        })
        .then_expect_events(vec![failed.clone()]);
    framework()
        .given(vec![prepared(), authorized(), failed])
        .when(execute(agent()))
        .then_expect_error(TransactionError::InvalidState {
            action: "execute",
            status: TransactionStatus::Failed,
        });
}

#[test]
fn failing_is_refused_before_authorization() {
    framework()
        .given(vec![prepared()])
        .when(TransactionCommand::Fail {
            reason: "simulation failed".into(),
            now: NOW,
        })
        .then_expect_error(TransactionError::InvalidState {
            action: "fail",
            status: TransactionStatus::PendingAuthorization,
        });
}

#[test]
fn a_user_initiated_transaction_is_authorized_and_executed_by_that_user_only() {
    let (cmd, prepared_by_user) = user_initiated();
    framework()
        .given_no_previous_events()
        .when(TransactionCommand::Prepare(Box::new(cmd)))
        .then_expect_events(vec![prepared_by_user.clone()]);
    let user = Initiator::User {
        user_id: OWNER.into(),
    };
    let TransactionEvent::TransactionExecuted {
        tx_hash,
        raw_transaction,
        ..
    } = executed()
    else {
        unreachable!()
    };
    framework()
        .given(vec![prepared_by_user.clone(), authorized()])
        .when(execute(user.clone()))
        .then_expect_events(vec![TransactionEvent::TransactionExecuted {
            tx_hash,
            nonce: 7,
            gas_limit: 21_000,
            max_fee_per_gas: 2_000_000_000,
            max_priority_fee_per_gas: 1_000_000_000,
            raw_transaction,
            executed_by: user,
            executed_at: NOW,
        }]);
    // An agent of the same owner cannot execute what the user started.
    framework()
        .given(vec![prepared_by_user, authorized()])
        .when(execute(agent()))
        .then_expect_error(TransactionError::NotInitiator);
}

#[test]
fn a_broadcast_rejected_after_signing_fails_the_transaction_but_keeps_its_hash() {
    let failed = TransactionEvent::TransactionFailed {
        reason: "broadcast rejected: nonce too low".into(),
        block_number: None,
        failed_at: NOW,
    };
    framework()
        .given(vec![prepared(), authorized(), executed()])
        .when(TransactionCommand::Fail {
            reason: "broadcast rejected: nonce too low".into(),
            now: NOW,
        })
        .then_expect_events(vec![failed.clone()]);
    // Never signed a second time: the first hash is the answer.
    framework()
        .given(vec![prepared(), authorized(), executed(), failed])
        .when(execute(agent()))
        .then_expect_error(TransactionError::AlreadyExecuted {
            tx_hash: format!("0xhash-{}-7", payload().digest()),
        });
}
