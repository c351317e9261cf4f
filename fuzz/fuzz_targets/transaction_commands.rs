//! Arbitrary command sequences at arbitrary times against a transaction, its owner and a
//! stranger, with every invariant of the property tests checked after every step (the model
//! is shared: `aggregates/tests/model/mod.rs`). `cargo fuzz fmt` prints a crash's steps.

#![no_main]

#[path = "../../aggregates/tests/model/mod.rs"]
mod model;

use arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use model::{Cap, Code, Executor, Step, Who, World};

/// Long enough for any lifecycle with detours; bounded so that one input stays fast.
const MAX_STEPS: usize = 200;

#[derive(Debug)]
struct Steps(Vec<Step>);

impl<'a> Arbitrary<'a> for Steps {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let mut steps = Vec::new();
        while !u.is_empty() && steps.len() < MAX_STEPS {
            steps.push(step(u)?);
        }
        Ok(Self(steps))
    }
}

fn who(u: &mut Unstructured) -> Result<Who> {
    Ok(*u.choose(&[Who::Owner, Who::Owner, Who::Owner, Who::Stranger])?)
}

fn code(u: &mut Unstructured) -> Result<Code> {
    Ok(*u.choose(&[
        Code::Current,
        Code::Previous,
        Code::Next,
        Code::Stale,
        Code::Replayed,
        Code::OtherSecret,
        Code::Garbage,
    ])?)
}

fn step(u: &mut Unstructured) -> Result<Step> {
    Ok(match u.int_in_range(0u8..=11)? {
        0 => Step::Advance {
            secs: u.int_in_range(0..=1_200)?,
        },
        1 => Step::Prepare {
            by_owner: u.arbitrary()?,
            expires_in: u.int_in_range(-60..=900)?,
        },
        2 => Step::Authorize {
            who: who(u)?,
            code: code(u)?,
        },
        3 => Step::Reject { who: who(u)? },
        4 => Step::Expire,
        5 => Step::Execute {
            by: *u.choose(&[
                Executor::Initiator,
                Executor::InitiatorRenamed,
                Executor::OtherAgent,
                Executor::OwnerUser,
                Executor::StrangerUser,
            ])?,
            cap: *u.choose(&[Cap::None, Cap::AtFee, Cap::BelowFee])?,
            signer_fails: u.ratio(1u8, 8)?,
        },
        6 => Step::Confirm,
        7 => Step::Revert,
        8 => Step::Fail,
        9 => Step::UseCode {
            who: who(u)?,
            code: code(u)?,
        },
        10 => Step::StartMfaReplacement {
            code: if u.ratio(1u8, 8)? {
                None
            } else {
                Some(code(u)?)
            },
        },
        _ => Step::ConfirmMfa { code: code(u)? },
    })
}

fuzz_target!(|steps: Steps| {
    let mut world = World::new();
    for step in &steps.0 {
        world.step(step);
    }
});
