//! The chain and verifier as a specification: an in-memory log sealed by the rules in
//! `canonical`, then tampered with in every way the issue lists.

use std::collections::HashMap;

use ed25519_dalek::{Signer, SigningKey};
use projections::StoredEvent;
use serde_json::json;

use super::canonical::{self, accumulate, CheckpointFields, EventFields, EventHasher, Hash, ZERO};
use super::verify::{
    key_id, verify_records, AuditEvent, Checkpoint, ProblemKind, Record, Report, Seal,
};

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

fn event(position: i64, aggregate: &str, sequence: i64) -> StoredEvent {
    StoredEvent {
        position,
        aggregate_type: "Transaction".into(),
        aggregate_id: aggregate.into(),
        sequence,
        event_type: "TransactionAuthorized".into(),
        event_version: "1.0".into(),
        payload: json!({"TransactionAuthorized": {"authorized_by": "u1", "n": position}}),
        metadata: json!({"actor": "u1", "actor_type": "user"}),
        recorded_at: format!("2026-01-01T00:00:{:02}.000000Z", position % 60),
    }
}

/// A log of three interleaved aggregates: a1 (1..=4), a2 (1..=3), a3 (1..=3).
fn log() -> Vec<StoredEvent> {
    let order = [
        ("a1", 1),
        ("a2", 1),
        ("a1", 2),
        ("a3", 1),
        ("a2", 2),
        ("a1", 3),
        ("a3", 2),
        ("a2", 3),
        ("a1", 4),
        ("a3", 3),
    ];
    order
        .iter()
        .enumerate()
        .map(|(i, (a, s))| event(i as i64 + 1, a, *s))
        .collect()
}

/// Seal `events` as the sealer does, with a checkpoint after every `every` events.
fn seal(events: &[StoredEvent], every: usize) -> (Vec<Seal>, Vec<Checkpoint>) {
    let key = key();
    let mut hasher = EventHasher::default();
    let mut heads: HashMap<String, Hash> = HashMap::new();
    let (mut acc, mut seals, mut cps) = (ZERO, vec![], vec![]);
    let mut prev_cp = ZERO;
    for (i, e) in events.iter().enumerate() {
        let prev = heads.get(&e.aggregate_id).copied().unwrap_or(ZERO);
        // Sealed from compact text, verified from `as_read`'s pretty-printed payload: the two
        // must hash alike.
        let (read, payload, metadata) = (as_read(e), e.payload.to_string(), e.metadata.to_string());
        let fields = EventFields {
            payload: &payload,
            metadata: &metadata,
            ..read.fields()
        };
        let hash = hasher.hash(&fields, &prev).unwrap();
        acc = accumulate(&acc, &hash);
        heads.insert(e.aggregate_id.clone(), hash);
        seals.push(Seal {
            aggregate_type: e.aggregate_type.clone(),
            aggregate_id: e.aggregate_id.clone(),
            sequence: e.sequence,
            payload_hash: canonical::payload_hash(&payload).unwrap(),
            hash,
            prev_hash: prev,
            accumulator: acc,
        });
        if (i + 1) % every == 0 || i + 1 == events.len() {
            let fields = CheckpointFields {
                seq: cps.len() as i64 + 1,
                position: e.position,
                event_count: i as i64 + 1,
                accumulator: acc,
                prev_checkpoint_hash: prev_cp,
                key_id: key_id(&key.verifying_key()),
                signed_at: "2026-01-01T00:01:00Z".into(),
            };
            let signature = key.sign(&fields.message()).to_bytes().to_vec();
            prev_cp = fields.hash(&signature);
            cps.push(Checkpoint {
                seq: fields.seq,
                position: fields.position,
                event_count: fields.event_count,
                accumulator: fields.accumulator,
                prev_checkpoint_hash: fields.prev_checkpoint_hash,
                key_id: fields.key_id,
                signature,
                signed_at: fields.signed_at,
            });
        }
    }
    (seals, cps)
}

/// Merge events and seals by position (each seal keyed by the position it was made for) and
/// place checkpoints after the last position they cover, as `DbRecords` does.
fn records(events: &[StoredEvent], seals: &[(i64, Seal)], cps: &[Checkpoint]) -> Vec<Record> {
    let mut positions: Vec<i64> = events
        .iter()
        .map(|e| e.position)
        .chain(seals.iter().map(|(p, _)| *p))
        .collect();
    positions.sort_unstable();
    positions.dedup();
    let mut out = vec![];
    let mut cps = cps.iter().peekable();
    for p in positions {
        while let Some(cp) = cps.next_if(|cp| cp.position < p) {
            out.push(Record::Checkpoint(cp.clone()));
        }
        out.push(Record::Event {
            position: p,
            event: events.iter().find(|e| e.position == p).map(as_read),
            seal: seals.iter().find(|(q, _)| *q == p).map(|(_, s)| s.clone()),
        });
    }
    out.extend(cps.cloned().map(Record::Checkpoint));
    out
}

/// An event as a store or an export gives it to the verifier: its JSON as text (here the
/// payload pretty-printed, so not the bytes it was sealed from: every test also checks that
/// two spellings of one document hash alike).
fn as_read(e: &StoredEvent) -> AuditEvent {
    AuditEvent {
        position: e.position,
        aggregate_type: e.aggregate_type.clone(),
        aggregate_id: e.aggregate_id.clone(),
        sequence: e.sequence,
        event_type: e.event_type.clone(),
        event_version: e.event_version.clone(),
        payload: serde_json::to_string_pretty(&e.payload).unwrap(),
        metadata: e.metadata.to_string(),
        recorded_at: e.recorded_at.clone(),
    }
}

fn keyed(events: &[StoredEvent], seals: Vec<Seal>) -> Vec<(i64, Seal)> {
    events.iter().map(|e| e.position).zip(seals).collect()
}

fn run(events: &[StoredEvent], seals: &[(i64, Seal)], cps: &[Checkpoint]) -> Report {
    verify_records(
        [key().verifying_key()],
        None,
        records(events, seals, cps).into_iter().map(Ok),
    )
}

fn problem(report: &Report) -> (ProblemKind, Option<i64>) {
    let p = report.problem.as_ref().expect("a problem was expected");
    (p.kind, p.position)
}

#[test]
fn an_untouched_log_verifies_with_counts() {
    let events = log();
    let (seals, cps) = seal(&events, 3);
    let report = run(&events, &keyed(&events, seals), &cps);
    assert!(report.ok, "{:?}", report.problem);
    assert_eq!(report.events, 10);
    assert_eq!(report.sealed_events, 10);
    assert_eq!(report.aggregates, 3);
    assert_eq!(report.checkpoints, 4);
    assert_eq!(report.last_checkpoint.unwrap().position, 10);
}

#[test]
fn unsealed_events_at_the_head_are_the_sealing_window_not_an_error() {
    let events = log();
    let (seals, cps) = seal(&events[..7], 7);
    let report = run(&events, &keyed(&events[..7], seals), &cps);
    assert!(report.ok, "{:?}", report.problem);
    assert_eq!((report.sealed_events, report.unsealed_events), (7, 3));
}

#[test]
fn a_changed_payload_is_reported_at_its_event() {
    let mut events = log();
    let (seals, cps) = seal(&events, 3);
    let seals = keyed(&events, seals);
    events[4].payload["TransactionAuthorized"]["authorized_by"] = json!("mallory");
    let report = run(&events, &seals, &cps);
    assert_eq!(problem(&report), (ProblemKind::PayloadChanged, Some(5)));
    let p = report.problem.unwrap();
    assert_eq!(p.aggregate_id.as_deref(), Some("a2"));
    assert_eq!(p.sequence, Some(2));
}

#[test]
fn changed_metadata_is_reported_as_an_event_change() {
    let mut events = log();
    let (seals, cps) = seal(&events, 3);
    let seals = keyed(&events, seals);
    events[2].metadata["actor"] = json!("someone-else");
    assert_eq!(
        problem(&run(&events, &seals, &cps)),
        (ProblemKind::EventChanged, Some(3))
    );
}

#[test]
fn a_deleted_event_is_reported_missing_at_its_position() {
    let events = log();
    let (seals, cps) = seal(&events, 3);
    let seals = keyed(&events, seals);
    let mut tampered = events.clone();
    tampered.remove(4);
    assert_eq!(
        problem(&run(&tampered, &seals, &cps)),
        (ProblemKind::EventMissing, Some(5))
    );
    // Deleting its seal too still breaks the accumulator at the next event.
    let mut fewer_seals = seals.clone();
    fewer_seals.remove(4);
    assert_eq!(
        problem(&run(&tampered, &fewer_seals, &cps)),
        (ProblemKind::AccumulatorMismatch, Some(6))
    );
    // The last event under a checkpoint, with its seal: the checkpoint names the position.
    let mut tampered = events.clone();
    tampered.remove(5);
    let mut fewer_seals = seals.clone();
    fewer_seals.remove(5);
    assert_eq!(
        problem(&run(&tampered, &fewer_seals, &cps)),
        (ProblemKind::EventMissing, Some(6))
    );
}

#[test]
fn a_forged_event_among_sealed_ones_is_reported() {
    let events = log();
    let (seals, cps) = seal(&events, 3);
    let seals = keyed(&events, seals);
    // Forged into a free position inside the sealed range.
    let mut tampered = events.clone();
    let mut forged = event(0, "a1", 0);
    forged.position = 0;
    tampered.insert(0, forged);
    assert_eq!(
        problem(&run(&tampered, &seals, &cps)),
        (ProblemKind::ForgedEvent, Some(0))
    );
}

#[test]
fn an_event_moved_to_another_position_is_reported() {
    let events = log();
    let (seals, cps) = seal(&events, 3);
    let seals = keyed(&events, seals);
    let mut tampered = events.clone();
    // Positions 2 (a2#1) and 3 (a1#2) swap places.
    tampered[1].position = 3;
    tampered[2].position = 2;
    assert_eq!(
        problem(&run(&tampered, &seals, &cps)),
        (ProblemKind::EventReplaced, Some(2))
    );
}

#[test]
fn swapped_sequences_are_reported_as_reordered() {
    let events = log();
    let (seals, cps) = seal(&events, 3);
    let seals = keyed(&events, seals);
    let mut tampered = events.clone();
    // a1's sequences 2 (position 3) and 3 (position 6) swap.
    tampered[2].sequence = 3;
    tampered[5].sequence = 2;
    assert_eq!(
        problem(&run(&tampered, &seals, &cps)),
        (ProblemKind::Reordered, Some(3))
    );
}

#[test]
fn a_sequence_gap_is_reported_even_with_matching_hints() {
    let events = log();
    let (seals, cps) = seal(&events, 3);
    let mut seals = keyed(&events, seals);
    let mut tampered = events.clone();
    tampered[5].sequence = 9;
    seals[5].1.sequence = 9;
    assert_eq!(
        problem(&run(&tampered, &seals, &cps)),
        (ProblemKind::SequenceGap, Some(6))
    );
}

#[test]
fn rewriting_events_and_all_their_seals_is_caught_by_the_signed_checkpoint() {
    let events = log();
    let (_, cps) = seal(&events, 5);
    let mut tampered = events.clone();
    tampered[1].payload = json!({"TransactionAuthorized": {"authorized_by": "mallory"}});
    // The attacker re-seals everything (no key needed for that) but cannot re-sign.
    let (forged_seals, _) = seal(&tampered, 5);
    let report = run(&tampered, &keyed(&tampered, forged_seals), &cps);
    let p = report.problem.unwrap();
    assert_eq!(
        (p.kind, p.checkpoint_seq),
        (ProblemKind::CheckpointMismatch, Some(1))
    );
}

#[test]
fn checkpoint_signatures_and_keys_are_checked() {
    let events = log();
    let (seals, mut cps) = seal(&events, 3);
    let seals = keyed(&events, seals);
    cps[1].event_count += 1;
    let report = run(&events, &seals, &cps);
    let p = report.problem.unwrap();
    assert_eq!(
        (p.kind, p.checkpoint_seq),
        (ProblemKind::CheckpointSignatureInvalid, Some(2))
    );

    let (_, cps) = seal(&events, 3);
    let other = SigningKey::from_bytes(&[9u8; 32]).verifying_key();
    let report = verify_records(
        [other],
        None,
        records(&events, &seals, &cps).into_iter().map(Ok),
    );
    assert_eq!(report.problem.unwrap().kind, ProblemKind::UnknownSigningKey);
}

#[test]
fn a_removed_checkpoint_breaks_the_checkpoint_chain() {
    let events = log();
    let (seals, mut cps) = seal(&events, 3);
    cps.remove(1);
    let report = run(&events, &keyed(&events, seals), &cps);
    let p = report.problem.unwrap();
    assert_eq!(
        (p.kind, p.checkpoint_seq),
        (ProblemKind::CheckpointChainBroken, Some(3))
    );
}

#[test]
fn a_truncated_tail_is_reported_after_the_last_intact_checkpoint() {
    let events = log();
    let (seals, cps) = seal(&events, 3);
    let seals = keyed(&events, seals);
    // Events 8..=10 and their seals are gone; the checkpoints over them remain.
    let report = run(&events[..7], &seals[..7], &cps);
    let p = report.problem.unwrap();
    assert_eq!(p.kind, ProblemKind::TailTruncated);
    assert_eq!(p.checkpoint_seq, Some(2));
    // The first missing position.
    assert_eq!(p.position, Some(8));
    assert!(
        p.message.contains("tail truncated after checkpoint 2"),
        "{}",
        p.message
    );
}

#[test]
fn an_anchor_catches_a_tail_truncated_with_its_checkpoints() {
    let events = log();
    let (seals, cps) = seal(&events, 3);
    let seals = keyed(&events, seals);
    let last = cps.last().unwrap();
    let anchor = (last.seq, last.hash());
    let full = verify_records(
        [key().verifying_key()],
        Some(anchor),
        records(&events, &seals, &cps).into_iter().map(Ok),
    );
    assert!(full.ok);
    let cut = verify_records(
        [key().verifying_key()],
        Some(anchor),
        records(&events[..6], &seals[..6], &cps[..2])
            .into_iter()
            .map(Ok),
    );
    assert_eq!(cut.problem.unwrap().kind, ProblemKind::AnchorMissing);
}
