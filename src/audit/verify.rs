//! Verification of the sealed event log: one implementation, fed record by record in position
//! order, used by `countersign audit verify` (database or exported file) and `GET
//! /api/audit/verify`. It recomputes every per-aggregate chain and the global accumulator from
//! the events themselves, checks each checkpoint's signature and what it signed, and stops at
//! the first broken link, saying which event and what is wrong.
//!
//! The stored seal columns other than `hash` and `accumulator` (aggregate, sequence, payload
//! hash) are diagnostic hints: they let the report say "payload changed" or "reordered"
//! rather than "hash mismatch". Detection never relies on them; it relies on recomputation and,
//! for an attacker who also rewrites the seals, on the signed checkpoints.

use std::collections::HashMap;
use std::time::Instant;

use ed25519_dalek::{Signature, VerifyingKey};
use serde::{Deserialize, Serialize};

use super::canonical::{self, accumulate, CheckpointFields, EventFields, EventHasher, Hash, ZERO};

/// Hex (de)serialization of hashes and byte strings.
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer, T: AsRef<[u8]>>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: TryFrom<Vec<u8>>>(
        d: D,
    ) -> Result<T, D::Error> {
        let s = std::borrow::Cow::<str>::deserialize(d)?;
        let bytes = decode(s.as_bytes())
            .ok_or_else(|| serde::de::Error::custom("expected hex digits, two per byte"))?;
        T::try_from(bytes).map_err(|_| serde::de::Error::custom("wrong length"))
    }

    /// Hex to bytes. An offline verification decodes four hashes per event: the `hex` crate's
    /// decoder took a fifth of its time, mostly mispredicted branches on random digits; a
    /// table has none.
    fn decode(hex: &[u8]) -> Option<Vec<u8>> {
        const INVALID: u8 = 0xff;
        const NIBBLES: [u8; 256] = {
            let mut table = [INVALID; 256];
            let mut i = 0;
            while i < 10 {
                table[b'0' as usize + i] = i as u8;
                i += 1;
            }
            let mut i = 0;
            while i < 6 {
                table[b'a' as usize + i] = 10 + i as u8;
                table[b'A' as usize + i] = 10 + i as u8;
                i += 1;
            }
            table
        };
        if hex.len() % 2 != 0 {
            return None;
        }
        let mut bytes = Vec::with_capacity(hex.len() / 2);
        let mut invalid = 0u8;
        for pair in hex.chunks_exact(2) {
            let (high, low) = (NIBBLES[pair[0] as usize], NIBBLES[pair[1] as usize]);
            // Any invalid digit sets the high bit; checked once, after the loop.
            invalid |= (high | low) & 0x80;
            bytes.push(high << 4 | (low & 0x0f));
        }
        (invalid == 0).then_some(bytes)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn decode_reads_hex_of_either_case_and_rejects_anything_else() {
            assert_eq!(super::decode(b"00fFa9"), Some(vec![0x00, 0xff, 0xa9]));
            assert_eq!(super::decode(b""), Some(vec![]));
            let all: Vec<u8> = (0..=255).collect();
            assert_eq!(
                super::decode(hex::encode(&all).as_bytes()),
                Some(all.clone())
            );
            assert_eq!(super::decode(hex::encode_upper(&all).as_bytes()), Some(all));
            for bad in [
                &b"0"[..],
                b"0g",
                b"g0",
                b"-1",
                b" 0",
                b"0\xff",
                b"\xff0",
                b"zz",
            ] {
                assert_eq!(super::decode(bad), None, "{bad:?}");
            }
        }
    }
}

/// An event as the sealer, verification and export read it: payload and metadata stay the
/// JSON text they were stored as (`json` read as text on PostgreSQL), hashed straight from it
/// (`canonical::write_canonical_text`) and exported verbatim, never parsed into a `Value`.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct AuditEvent {
    pub position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    #[serde(with = "raw_json")]
    pub payload: String,
    #[serde(with = "raw_json")]
    pub metadata: String,
    pub recorded_at: String,
}

impl AuditEvent {
    pub fn fields(&self) -> EventFields<'_> {
        EventFields {
            position: self.position,
            aggregate_type: &self.aggregate_type,
            aggregate_id: &self.aggregate_id,
            sequence: self.sequence,
            event_type: &self.event_type,
            event_version: &self.event_version,
            payload: &self.payload,
            metadata: &self.metadata,
            recorded_at: &self.recorded_at,
        }
    }
}

/// JSON text (de)serialized as the JSON it holds, not as a string.
mod raw_json {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use serde_json::value::RawValue;

    pub fn serialize<S: Serializer>(text: &str, s: S) -> Result<S::Ok, S::Error> {
        let raw: &RawValue = serde_json::from_str(text).map_err(serde::ser::Error::custom)?;
        raw.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        Ok(Box::<str>::from(Box::<RawValue>::deserialize(d)?).into_string())
    }
}

/// What the sealer recorded for one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    #[serde(with = "hex_bytes")]
    pub payload_hash: Hash,
    #[serde(with = "hex_bytes")]
    pub hash: Hash,
    #[serde(with = "hex_bytes")]
    pub prev_hash: Hash,
    #[serde(with = "hex_bytes")]
    pub accumulator: Hash,
}

/// A signed checkpoint: the accumulator over every sealed event up to `position`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: i64,
    pub position: i64,
    pub event_count: i64,
    #[serde(with = "hex_bytes")]
    pub accumulator: Hash,
    #[serde(with = "hex_bytes")]
    pub prev_checkpoint_hash: Hash,
    pub key_id: String,
    #[serde(with = "hex_bytes")]
    pub signature: Vec<u8>,
    pub signed_at: String,
}

impl Checkpoint {
    pub fn fields(&self) -> CheckpointFields {
        CheckpointFields {
            seq: self.seq,
            position: self.position,
            event_count: self.event_count,
            accumulator: self.accumulator,
            prev_checkpoint_hash: self.prev_checkpoint_hash,
            key_id: self.key_id.clone(),
            signed_at: self.signed_at.clone(),
        }
    }

    pub fn hash(&self) -> Hash {
        self.fields().hash(&self.signature)
    }
}

/// One item of the verified stream, in position order: an event position (the event row, its
/// seal, or both) or a checkpoint (after the last event it covers).
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // transient, one at a time
pub enum Record {
    Event {
        position: i64,
        event: Option<AuditEvent>,
        seal: Option<Seal>,
    },
    Checkpoint(Checkpoint),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    /// The payload differs from the one sealed.
    PayloadChanged,
    /// Metadata, type, version or timestamp differ from what was sealed.
    EventChanged,
    /// A sealed event is gone.
    EventMissing,
    /// An event that was never sealed sits among sealed ones.
    ForgedEvent,
    /// The event at a position is not the one sealed there.
    EventReplaced,
    /// An aggregate's sequence jumps.
    SequenceGap,
    /// An aggregate's events are out of order.
    Reordered,
    /// The link to the aggregate's previous event is broken (an earlier event was rewritten
    /// together with its seal).
    ChainBroken,
    /// The global accumulator disagrees with the stored one.
    AccumulatorMismatch,
    /// A seal's own columns were edited.
    SealAltered,
    CheckpointSignatureInvalid,
    UnknownSigningKey,
    /// A checkpoint is missing or out of order.
    CheckpointChainBroken,
    /// The events under a checkpoint are not those it signed.
    CheckpointMismatch,
    /// Events a checkpoint covers are missing, and nothing follows them.
    TailTruncated,
    /// A checkpoint the verifier was told to expect is not there.
    AnchorMissing,
    /// The input is not a well-formed audit stream.
    Malformed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub kind: ProblemKind,
    pub message: String,
    pub position: Option<i64>,
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<String>,
    pub sequence: Option<i64>,
    pub checkpoint_seq: Option<i64>,
}

impl Problem {
    fn new(kind: ProblemKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            position: None,
            aggregate_type: None,
            aggregate_id: None,
            sequence: None,
            checkpoint_seq: None,
        }
    }

    fn at(mut self, position: i64) -> Self {
        self.position = Some(position);
        self
    }

    fn event(mut self, aggregate_type: &str, aggregate_id: &str, sequence: i64) -> Self {
        self.aggregate_type = Some(aggregate_type.to_owned());
        self.aggregate_id = Some(aggregate_id.to_owned());
        self.sequence = Some(sequence);
        self
    }

    fn checkpoint(mut self, seq: i64) -> Self {
        self.checkpoint_seq = Some(seq);
        self
    }

    pub fn malformed(message: impl Into<String>) -> Self {
        Self::new(ProblemKind::Malformed, message)
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointSummary {
    pub seq: i64,
    pub position: i64,
    pub event_count: i64,
    #[serde(with = "hex_bytes")]
    pub hash: Hash,
}

/// The outcome: OK with counts, or the first broken link.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub ok: bool,
    /// Event positions examined.
    pub events: i64,
    pub sealed_events: i64,
    /// Events after the last seal (committed, not yet sealed: the sealing window).
    pub unsealed_events: i64,
    pub aggregates: usize,
    pub checkpoints: i64,
    pub last_checkpoint: Option<CheckpointSummary>,
    pub head_position: i64,
    #[serde(with = "hex_bytes")]
    pub accumulator: Hash,
    pub problem: Option<Problem>,
    pub elapsed_seconds: f64,
    pub events_per_second: f64,
}

struct Head {
    sequence: i64,
    hash: Option<Hash>,
}

/// The verifier's state between records.
pub struct Verifier {
    keys: HashMap<String, VerifyingKey>,
    anchor: Option<(i64, Hash)>,
    anchor_seen: bool,
    hasher: EventHasher,
    heads: HashMap<(String, String), Head>,
    accumulator: Hash,
    sealed: i64,
    events: i64,
    unsealed: i64,
    last_position: i64,
    last_sealed_position: i64,
    first_unsealed: Option<(i64, String, String, i64)>,
    last_checkpoint: Option<CheckpointSummary>,
    checkpoints: i64,
    /// Events a checkpoint covers were not there; decided by what comes next.
    missing_before: Option<Problem>,
    problem: Option<Problem>,
    started: Instant,
}

/// The key id of a public key: the first 8 bytes of its SHA-256, in hex.
pub fn key_id(public_key: &VerifyingKey) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(public_key.as_bytes())[..8])
}

impl Verifier {
    /// A verifier trusting `keys` for checkpoint signatures and, if given, requiring the
    /// checkpoint `anchor` (seq, hash) — one the auditor saw before — to still be there.
    pub fn new(keys: impl IntoIterator<Item = VerifyingKey>, anchor: Option<(i64, Hash)>) -> Self {
        Self {
            keys: keys.into_iter().map(|k| (key_id(&k), k)).collect(),
            anchor,
            anchor_seen: false,
            hasher: EventHasher::default(),
            heads: HashMap::new(),
            accumulator: ZERO,
            sealed: 0,
            events: 0,
            unsealed: 0,
            last_position: i64::MIN,
            last_sealed_position: 0,
            first_unsealed: None,
            last_checkpoint: None,
            checkpoints: 0,
            missing_before: None,
            problem: None,
            started: Instant::now(),
        }
    }

    /// Whether verification already failed (further records are ignored).
    pub fn failed(&self) -> bool {
        self.problem.is_some()
    }

    /// Feed the next record. Returns `false` once a problem was found.
    pub fn feed(&mut self, record: Record) -> bool {
        if self.problem.is_some() {
            return false;
        }
        let result = match record {
            Record::Event {
                position,
                event,
                seal,
            } => self.event(position, event, seal),
            Record::Checkpoint(cp) => self.checkpoint(cp),
        };
        if let Err(p) = result {
            self.problem = Some(p);
            return false;
        }
        true
    }

    /// Record a problem found outside the stream (e.g. unreadable input).
    pub fn fail(&mut self, problem: Problem) {
        if self.problem.is_none() {
            self.problem = Some(problem);
        }
    }

    // A problem ends verification: its size does not matter.
    #[allow(clippy::result_large_err)]
    fn event(
        &mut self,
        position: i64,
        event: Option<AuditEvent>,
        seal: Option<Seal>,
    ) -> Result<(), Problem> {
        if let Some(missing) = self.missing_before.take() {
            return Err(missing);
        }
        if position <= self.last_position {
            return Err(Problem::malformed(format!(
                "position {position} follows position {}: records out of order or duplicated",
                self.last_position
            ))
            .at(position));
        }
        if let Some(cp) = &self.last_checkpoint {
            if position <= cp.position {
                return Err(Problem::malformed(format!(
                    "event at position {position} comes after checkpoint {} (position {})",
                    cp.seq, cp.position
                ))
                .at(position));
            }
        }
        self.last_position = position;
        let (event, seal) = match (event, seal) {
            (None, None) => return Err(Problem::malformed("empty record").at(position)),
            (None, Some(seal)) => {
                return Err(Problem::new(
                    ProblemKind::EventMissing,
                    format!(
                        "event missing: position {position} ({} {} sequence {}) was sealed but is no longer in the log",
                        seal.aggregate_type, seal.aggregate_id, seal.sequence
                    ),
                )
                .at(position)
                .event(&seal.aggregate_type, &seal.aggregate_id, seal.sequence))
            }
            (Some(e), seal) => (e, seal),
        };
        if event.position != position {
            return Err(
                Problem::malformed("event position disagrees with its record").at(position),
            );
        }
        self.events += 1;
        let key = (event.aggregate_type.clone(), event.aggregate_id.clone());
        let forged = |(p, t, id, s): &(i64, String, String, i64)| {
            Problem::new(
                ProblemKind::ForgedEvent,
                format!(
                    "forged event: position {p} ({t} {id} sequence {s}) was never sealed, yet later events were"
                ),
            )
            .at(*p)
            .event(t, id, *s)
        };
        let Some(seal) = seal else {
            // The sealing window: fine at the head of the log, forged anywhere below it.
            if self.first_unsealed.is_none() {
                self.first_unsealed = Some((
                    position,
                    event.aggregate_type.clone(),
                    event.aggregate_id.clone(),
                    event.sequence,
                ));
            }
            self.unsealed += 1;
            let head = self.heads.entry(key).or_insert(Head {
                sequence: 0,
                hash: None,
            });
            head.sequence = event.sequence;
            head.hash = None;
            return Ok(());
        };
        if let Some(first) = &self.first_unsealed {
            return Err(forged(first));
        }
        let here = |kind, message: String| {
            Problem::new(kind, message).at(position).event(
                &event.aggregate_type,
                &event.aggregate_id,
                event.sequence,
            )
        };
        // Same aggregate and payload under another sequence: reordered. Anything else in a
        // sealed position is not the event sealed there.
        let same_aggregate =
            seal.aggregate_type == event.aggregate_type && seal.aggregate_id == event.aggregate_id;
        // Only consulted when something is off: it costs a second encoding of the payload.
        let payload_hash = || canonical::payload_hash(&event.payload).ok();
        let same_content =
            seal.sequence == event.sequence || payload_hash() == Some(seal.payload_hash);
        if !same_aggregate || !same_content {
            return Err(here(
                ProblemKind::EventReplaced,
                format!(
                    "position {position} holds {} {} sequence {}, but the event sealed there was {} {} sequence {} (moved, replaced or forged)",
                    event.aggregate_type, event.aggregate_id, event.sequence,
                    seal.aggregate_type, seal.aggregate_id, seal.sequence
                ),
            ));
        }
        if seal.sequence != event.sequence {
            return Err(here(
                ProblemKind::Reordered,
                format!(
                    "reordered: position {position} of {} {} was sealed as sequence {} but now claims sequence {}",
                    event.aggregate_type, event.aggregate_id, seal.sequence, event.sequence
                ),
            ));
        }
        let (expected, prev) = match self.heads.get(&key) {
            None => (1, Some(ZERO)),
            Some(h) => (h.sequence + 1, h.hash),
        };
        if event.sequence > expected {
            return Err(here(
                ProblemKind::SequenceGap,
                format!(
                    "sequence gap: {} {} jumps from sequence {} to {} at position {position} (events missing)",
                    event.aggregate_type, event.aggregate_id, expected - 1, event.sequence
                ),
            ));
        }
        if event.sequence < expected {
            return Err(here(
                ProblemKind::Reordered,
                format!(
                    "reordered: {} {} sequence {} at position {position} comes after sequence {}",
                    event.aggregate_type,
                    event.aggregate_id,
                    event.sequence,
                    expected - 1
                ),
            ));
        }
        // An unsealed predecessor cannot happen here (it would have been reported as forged).
        let prev = prev.unwrap_or(ZERO);
        let hash = self.hasher.hash(&event.fields(), &prev).map_err(|e| {
            Problem::malformed(format!("event at position {position} is not JSON: {e}"))
                .at(position)
        })?;
        if hash != seal.hash {
            let problem = if payload_hash() != Some(seal.payload_hash) {
                here(
                    ProblemKind::PayloadChanged,
                    format!(
                        "payload changed: {} {} sequence {} at position {position} differs from what was sealed",
                        event.aggregate_type, event.aggregate_id, event.sequence
                    ),
                )
            } else if prev != seal.prev_hash {
                here(
                    ProblemKind::ChainBroken,
                    format!(
                        "chain broken at position {position}: the previous event of {} {} is not the one this event was sealed after",
                        event.aggregate_type, event.aggregate_id
                    ),
                )
            } else {
                here(
                    ProblemKind::EventChanged,
                    format!(
                        "event changed: metadata, type, version or timestamp of {} {} sequence {} at position {position} differ from what was sealed",
                        event.aggregate_type, event.aggregate_id, event.sequence
                    ),
                )
            };
            return Err(problem);
        }
        if prev != seal.prev_hash {
            return Err(here(
                ProblemKind::SealAltered,
                format!("the seal of position {position} was edited (previous-link column)"),
            ));
        }
        let accumulator = accumulate(&self.accumulator, &hash);
        if accumulator != seal.accumulator {
            return Err(here(
                ProblemKind::AccumulatorMismatch,
                format!(
                    "accumulator mismatch at position {position}: an event between positions {} and {position} was removed together with its seal, or seals were rewritten",
                    self.last_sealed_position
                ),
            ));
        }
        self.accumulator = accumulator;
        self.sealed += 1;
        self.last_sealed_position = position;
        self.heads.insert(
            key,
            Head {
                sequence: event.sequence,
                hash: Some(hash),
            },
        );
        Ok(())
    }

    #[allow(clippy::result_large_err)]
    fn checkpoint(&mut self, cp: Checkpoint) -> Result<(), Problem> {
        if self.missing_before.is_some() {
            // Later checkpoints over the same missing tail say nothing new.
            return Ok(());
        }
        let here = |kind, message: String| {
            Problem::new(kind, message)
                .at(cp.position)
                .checkpoint(cp.seq)
        };
        if let Some((p, t, id, s)) = &self.first_unsealed {
            if *p <= cp.position {
                return Err(Problem::new(
                    ProblemKind::ForgedEvent,
                    format!(
                        "forged event: position {p} ({t} {id} sequence {s}) was never sealed, yet checkpoint {} covers it",
                        cp.seq
                    ),
                )
                .at(*p)
                .event(t, id, *s)
                .checkpoint(cp.seq));
            }
        }
        let (expected_seq, expected_prev) = match &self.last_checkpoint {
            None => (1, ZERO),
            Some(last) => (last.seq + 1, last.hash),
        };
        if cp.seq != expected_seq || cp.prev_checkpoint_hash != expected_prev {
            return Err(here(
                ProblemKind::CheckpointChainBroken,
                format!(
                    "checkpoint chain broken: expected checkpoint {expected_seq} linked to the previous one, found checkpoint {} (checkpoints removed, reordered or forged)",
                    cp.seq
                ),
            ));
        }
        let Some(key) = self.keys.get(&cp.key_id) else {
            return Err(here(
                ProblemKind::UnknownSigningKey,
                format!(
                    "checkpoint {} is signed with key {}, which is not a trusted audit key",
                    cp.seq, cp.key_id
                ),
            ));
        };
        let valid = Signature::from_slice(&cp.signature)
            .is_ok_and(|sig| key.verify_strict(&cp.fields().message(), &sig).is_ok());
        if !valid {
            return Err(here(
                ProblemKind::CheckpointSignatureInvalid,
                format!("checkpoint {} has an invalid signature", cp.seq),
            ));
        }
        if self
            .last_checkpoint
            .as_ref()
            .is_some_and(|last| cp.position < last.position)
        {
            return Err(here(
                ProblemKind::CheckpointChainBroken,
                format!("checkpoint {} goes back in position", cp.seq),
            ));
        }
        if self.last_sealed_position > cp.position {
            return Err(here(
                ProblemKind::Malformed,
                format!(
                    "checkpoint {} arrives after events it does not cover",
                    cp.seq
                ),
            ));
        }
        if self.last_sealed_position < cp.position {
            // Decided by what follows: more events (missing in the middle) or none (the tail).
            let after = self.last_checkpoint.as_ref().map_or(0, |c| c.seq);
            self.missing_before = Some(
                Problem::new(
                    ProblemKind::EventMissing,
                    format!(
                        "events missing after position {}: checkpoint {} signed {} events up to position {}, the log has {} sealed events up to position {}",
                        self.last_sealed_position, cp.seq, cp.event_count, cp.position,
                        self.sealed, self.last_sealed_position
                    ),
                )
                .at(self.last_sealed_position + 1)
                .checkpoint(after),
            );
            return Ok(());
        }
        if cp.event_count != self.sealed || cp.accumulator != self.accumulator {
            return Err(here(
                ProblemKind::CheckpointMismatch,
                format!(
                    "checkpoint {} does not match the log: it signed {} events up to position {}, the log has {} with a different history (events or seals rewritten)",
                    cp.seq, cp.event_count, cp.position, self.sealed
                ),
            ));
        }
        let hash = cp.hash();
        if let Some((seq, anchor)) = self.anchor {
            if seq == cp.seq {
                if anchor != hash {
                    return Err(here(
                        ProblemKind::AnchorMissing,
                        format!(
                            "checkpoint {seq} is not the one you anchored: history was rewritten"
                        ),
                    ));
                }
                self.anchor_seen = true;
            }
        }
        self.checkpoints += 1;
        self.last_checkpoint = Some(CheckpointSummary {
            seq: cp.seq,
            position: cp.position,
            event_count: cp.event_count,
            hash,
        });
        Ok(())
    }

    /// The report, after the last record.
    pub fn finish(mut self) -> Report {
        if self.problem.is_none() {
            if let Some(mut missing) = self.missing_before.take() {
                let after = missing.checkpoint_seq.unwrap_or(0);
                missing.kind = ProblemKind::TailTruncated;
                missing.message = format!(
                    "tail truncated after checkpoint {after}: {}",
                    missing.message
                );
                self.problem = Some(missing);
            } else if let Some((seq, _)) = self.anchor {
                if !self.anchor_seen {
                    self.problem = Some(
                        Problem::new(
                            ProblemKind::AnchorMissing,
                            format!("anchored checkpoint {seq} is missing: history was truncated or rewritten"),
                        )
                        .checkpoint(seq),
                    );
                }
            }
        }
        let elapsed = self.started.elapsed().as_secs_f64();
        Report {
            ok: self.problem.is_none(),
            events: self.events,
            sealed_events: self.sealed,
            unsealed_events: self.unsealed,
            aggregates: self.heads.len(),
            checkpoints: self.checkpoints,
            last_checkpoint: self.last_checkpoint,
            head_position: self.last_position.max(0),
            accumulator: self.accumulator,
            problem: self.problem,
            elapsed_seconds: elapsed,
            events_per_second: if elapsed > 0.0 {
                self.events as f64 / elapsed
            } else {
                0.0
            },
        }
    }
}

/// Verify a whole stream of records.
pub fn verify_records(
    keys: impl IntoIterator<Item = VerifyingKey>,
    anchor: Option<(i64, Hash)>,
    records: impl IntoIterator<Item = Result<Record, Problem>>,
) -> Report {
    let mut verifier = Verifier::new(keys, anchor);
    for record in records {
        match record {
            Ok(r) => {
                if !verifier.feed(r) {
                    break;
                }
            }
            Err(p) => {
                verifier.fail(p);
                break;
            }
        }
    }
    verifier.finish()
}
