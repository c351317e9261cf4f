//! Property tests: random command sequences at random times against the `Transaction` and
//! `User` aggregates, every invariant checked after every step (the invariants are listed in
//! `model/mod.rs`). Failing cases are saved under `proptest-regressions/` and replayed first.

mod model;

use aggregates::TransactionStatus;
use model::{Cap, Code, Executor, Step, Who, World};
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![4 => Just(Who::Owner), 1 => Just(Who::Stranger)]
}

/// Codes a user might type; `wrong` weighs those that are simply wrong (not replays).
fn code_with(wrong: u32) -> impl Strategy<Value = Code> {
    prop_oneof![
        6 => Just(Code::Current),
        2 => Just(Code::Previous),
        2 => Just(Code::Next),
        wrong => Just(Code::Stale),
        3 => Just(Code::Replayed),
        wrong => Just(Code::OtherSecret),
        wrong => Just(Code::Garbage),
    ]
}

fn code() -> impl Strategy<Value = Code> {
    code_with(1)
}

/// Mostly seconds (codes age by 30 s steps), sometimes past a deadline or a lockout.
fn advance() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u32..=45).prop_map(|secs| Step::Advance { secs }),
        1 => (46u32..=1_200).prop_map(|secs| Step::Advance { secs }),
    ]
}

fn prepare() -> impl Strategy<Value = Step> {
    (any::<bool>(), prop_oneof![1 => -60i32..=0, 9 => 1i32..=900]).prop_map(
        |(by_owner, expires_in)| Step::Prepare {
            by_owner,
            expires_in,
        },
    )
}

fn execute() -> impl Strategy<Value = Step> {
    let by = prop_oneof![
        6 => Just(Executor::Initiator),
        1 => Just(Executor::InitiatorRenamed),
        1 => Just(Executor::OtherAgent),
        1 => Just(Executor::OwnerUser),
        1 => Just(Executor::StrangerUser),
    ];
    let cap = prop_oneof![
        4 => Just(Cap::None),
        1 => Just(Cap::AtFee),
        1 => Just(Cap::BelowFee),
    ];
    (by, cap, prop::bool::weighted(0.1)).prop_map(|(by, cap, signer_fails)| Step::Execute {
        by,
        cap,
        signer_fails,
    })
}

fn transaction_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => advance(),
        1 => prepare(),
        6 => (who(), code()).prop_map(|(who, code)| Step::Authorize { who, code }),
        1 => who().prop_map(|who| Step::Reject { who }),
        1 => Just(Step::Expire),
        5 => execute(),
        1 => Just(Step::Confirm),
        1 => Just(Step::Revert),
        1 => Just(Step::Fail),
        1 => (who(), code()).prop_map(|(who, code)| Step::UseCode { who, code }),
    ]
}

fn mfa_step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => advance(),
        // Often wrong, so that lockouts happen (5 wrong codes in a row).
        6 => (who(), code_with(4)).prop_map(|(who, code)| Step::UseCode { who, code }),
        2 => prop::option::weighted(0.9, code_with(4))
            .prop_map(|code| Step::StartMfaReplacement { code }),
        2 => code_with(4).prop_map(|code| Step::ConfirmMfa { code }),
    ]
}

fn run(steps: &[Step]) -> World {
    let mut world = World::new();
    for step in steps {
        world.step(step);
    }
    world
}

proptest! {
    // Failing cases are kept in the crate's `proptest-regressions/` (cargo runs tests from the
    // crate root) and replayed before new ones.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "proptest-regressions/properties.txt",
        ))),
        ..ProptestConfig::default()
    })]

    /// Never executed without the owner's authorization, never twice, only by the initiator;
    /// terminal states stay terminal; refusals emit nothing; replays reproduce the state.
    #[test]
    fn transaction_invariants_hold_for_any_command_sequence(
        first in prop::option::weighted(0.9, prepare()),
        steps in prop::collection::vec(transaction_step(), 0..60),
    ) {
        run(&first.into_iter().chain(steps).collect::<Vec<_>>());
    }

    /// A TOTP step is accepted at most once, earlier steps are refused, wrong codes lock MFA,
    /// also across replacements of the secret.
    #[test]
    fn totp_steps_are_single_use_and_increasing(
        steps in prop::collection::vec(mfa_step(), 0..60),
    ) {
        run(&steps);
    }
}

/// The happy path the generators aim at, spelled out: the model accepts a full life.
#[test]
fn a_full_life_passes_the_model() {
    let world = run(&[
        Step::Prepare {
            by_owner: false,
            expires_in: 900,
        },
        Step::Authorize {
            who: Who::Owner,
            code: Code::Replayed,
        },
        Step::Advance { secs: 30 },
        Step::Authorize {
            who: Who::Owner,
            code: Code::Current,
        },
        Step::Execute {
            by: Executor::Initiator,
            cap: Cap::AtFee,
            signer_fails: false,
        },
        Step::Execute {
            by: Executor::Initiator,
            cap: Cap::None,
            signer_fails: false,
        },
        Step::Confirm,
        Step::Fail,
    ]);
    assert_eq!(world.status(), Some(TransactionStatus::Confirmed));
}
