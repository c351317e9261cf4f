//! The one canonical encoding of events and checkpoints, and the hashes built on it. Everything
//! that hashes or signs audit data goes through here, so the sealer, the online verifier and
//! the offline verifier cannot disagree.
//!
//! Encoding (version 1), all integers big-endian:
//! - `i64(n)`: 8 bytes, two's complement.
//! - `bytes(b)`: `u64(len(b)) || b` (length-prefixed, so no field can run into the next).
//! - `json(v)`: `bytes(canonical_json(v))` where canonical JSON is compact (no whitespace),
//!   object keys sorted by their UTF-8 bytes at every depth, strings escaped as serde_json
//!   escapes them, numbers as serde_json prints them. It is written here rather than by
//!   `serde_json::to_vec`, whose key order depends on a crate feature (`preserve_order`).
//!   Key order in storage therefore does not matter (PostgreSQL `jsonb` reorders keys).
//!
//! ```text
//! event_hash  = SHA-256("countersign/event/v1" || i64(position) || bytes(aggregate_type)
//!                       || bytes(aggregate_id) || i64(sequence) || bytes(event_type)
//!                       || bytes(event_version) || json(payload) || json(metadata)
//!                       || bytes(recorded_at) || prev_hash)
//! prev_hash   = event_hash of the previous event of the same aggregate, or 32 zero bytes
//! accumulator = SHA-256(previous accumulator || event_hash)      (starts from 32 zero bytes)
//! checkpoint message = "countersign/checkpoint/v1" || i64(seq) || i64(position)
//!                       || i64(event_count) || accumulator || prev_checkpoint_hash
//!                       || bytes(key_id) || bytes(signed_at)
//! checkpoint signature = Ed25519(checkpoint message)
//! checkpoint_hash = SHA-256("countersign/checkpoint-hash/v1" || message || signature)
//! ```

use serde_json::Value;
use sha2::{Digest, Sha256};

pub type Hash = [u8; 32];
pub const ZERO: Hash = [0u8; 32];

const EVENT_TAG: &[u8] = b"countersign/event/v1";
const CHECKPOINT_TAG: &[u8] = b"countersign/checkpoint/v1";
const CHECKPOINT_HASH_TAG: &[u8] = b"countersign/checkpoint-hash/v1";

/// The fields of a stored event that its hash covers.
#[derive(Debug, Clone, Copy)]
pub struct EventFields<'a> {
    pub position: i64,
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub sequence: i64,
    pub event_type: &'a str,
    pub event_version: &'a str,
    pub payload: &'a Value,
    pub metadata: &'a Value,
    pub recorded_at: &'a str,
}

impl<'a> From<&'a projections::StoredEvent> for EventFields<'a> {
    fn from(e: &'a projections::StoredEvent) -> Self {
        Self {
            position: e.position,
            aggregate_type: &e.aggregate_type,
            aggregate_id: &e.aggregate_id,
            sequence: e.sequence,
            event_type: &e.event_type,
            event_version: &e.event_version,
            payload: &e.payload,
            metadata: &e.metadata,
            recorded_at: &e.recorded_at,
        }
    }
}

fn put_i64(out: &mut Vec<u8>, n: i64) {
    out.extend_from_slice(&n.to_be_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u64).to_be_bytes());
    out.extend_from_slice(b);
}

/// Append the canonical JSON text of `v` to `out`.
pub fn write_canonical_json(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(n) => out.extend_from_slice(n.to_string().as_bytes()),
        Value::String(s) => write_string(out, s),
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical_json(out, item);
            }
            out.push(b']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_string(out, k);
                out.push(b':');
                write_canonical_json(out, v);
            }
            out.push(b'}');
        }
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping is fixed: `"`, `\`, and control characters; everything else raw.
    serde_json::to_writer(&mut *out, s).expect("writing a string to a Vec cannot fail");
}

pub fn canonical_json(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical_json(&mut out, v);
    out
}

/// The bytes an event's hash is taken over (without the tag and `prev_hash`); exposed for tests.
pub fn event_preimage(e: &EventFields<'_>, prev_hash: &Hash, out: &mut Vec<u8>) {
    write_preimage(e, prev_hash, out, None);
}

/// [`event_preimage`], and the [`payload_hash`] from the same canonical encoding if asked.
fn write_preimage(
    e: &EventFields<'_>,
    prev_hash: &Hash,
    out: &mut Vec<u8>,
    payload_hash: Option<&mut Hash>,
) {
    out.clear();
    out.extend_from_slice(EVENT_TAG);
    put_i64(out, e.position);
    put_bytes(out, e.aggregate_type.as_bytes());
    put_bytes(out, e.aggregate_id.as_bytes());
    put_i64(out, e.sequence);
    put_bytes(out, e.event_type.as_bytes());
    put_bytes(out, e.event_version.as_bytes());
    let mut json = Vec::with_capacity(512);
    write_canonical_json(&mut json, e.payload);
    if let Some(hash) = payload_hash {
        *hash = Sha256::digest(&json).into();
    }
    put_bytes(out, &json);
    json.clear();
    write_canonical_json(&mut json, e.metadata);
    put_bytes(out, &json);
    put_bytes(out, e.recorded_at.as_bytes());
    out.extend_from_slice(prev_hash);
}

/// Hashes events, reusing one buffer.
#[derive(Default)]
pub struct EventHasher {
    buf: Vec<u8>,
}

impl EventHasher {
    pub fn hash(&mut self, e: &EventFields<'_>, prev_hash: &Hash) -> Hash {
        event_preimage(e, prev_hash, &mut self.buf);
        Sha256::digest(&self.buf).into()
    }

    /// The event's hash and its payload's ([`payload_hash`]), encoding the payload once.
    pub fn hash_with_payload(&mut self, e: &EventFields<'_>, prev_hash: &Hash) -> (Hash, Hash) {
        let mut payload = ZERO;
        write_preimage(e, prev_hash, &mut self.buf, Some(&mut payload));
        (Sha256::digest(&self.buf).into(), payload)
    }
}

/// SHA-256 of a payload's canonical JSON: lets a verifier say *what* changed in an event.
pub fn payload_hash(payload: &Value) -> Hash {
    Sha256::digest(canonical_json(payload)).into()
}

pub fn accumulate(accumulator: &Hash, event_hash: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update(accumulator);
    h.update(event_hash);
    h.finalize().into()
}

/// The signed fields of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointFields {
    pub seq: i64,
    pub position: i64,
    pub event_count: i64,
    pub accumulator: Hash,
    pub prev_checkpoint_hash: Hash,
    pub key_id: String,
    pub signed_at: String,
}

impl CheckpointFields {
    /// The message the Ed25519 signature covers.
    pub fn message(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        out.extend_from_slice(CHECKPOINT_TAG);
        put_i64(&mut out, self.seq);
        put_i64(&mut out, self.position);
        put_i64(&mut out, self.event_count);
        out.extend_from_slice(&self.accumulator);
        out.extend_from_slice(&self.prev_checkpoint_hash);
        put_bytes(&mut out, self.key_id.as_bytes());
        put_bytes(&mut out, self.signed_at.as_bytes());
        out
    }

    /// The hash the next checkpoint links to.
    pub fn hash(&self, signature: &[u8]) -> Hash {
        let mut h = Sha256::new();
        h.update(CHECKPOINT_HASH_TAG);
        h.update(self.message());
        h.update(signature);
        h.finalize().into()
    }
}

/// Parse 64 hex characters into a hash.
pub fn parse_hash(hex_str: &str) -> Option<Hash> {
    let bytes = hex::decode(hex_str).ok()?;
    bytes.try_into().ok()
}

/// A hash from a database column (exactly 32 bytes).
pub fn hash_from_slice(bytes: &[u8]) -> Option<Hash> {
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fields<'a>(payload: &'a Value, metadata: &'a Value) -> EventFields<'a> {
        EventFields {
            position: 7,
            aggregate_type: "Transaction",
            aggregate_id: "t1",
            sequence: 2,
            event_type: "TransactionAuthorized",
            event_version: "1.0",
            payload,
            metadata,
            recorded_at: "2026-01-01T00:00:00.000000Z",
        }
    }

    #[test]
    fn canonical_json_sorts_keys_at_every_depth_and_has_no_whitespace() {
        let a: Value = serde_json::from_str(
            r#"{"b": 1, "a": {"y": [1, {"d": null, "c": true}], "x": "é\n"}}"#,
        )
        .unwrap();
        assert_eq!(
            String::from_utf8(canonical_json(&a)).unwrap(),
            r#"{"a":{"x":"é\n","y":[1,{"c":true,"d":null}]},"b":1}"#
        );
        // Key order in the source (e.g. jsonb's) does not matter.
        let b: Value = serde_json::from_str(
            r#"{"a": {"x": "é\n", "y": [1, {"c": true, "d": null}]}, "b": 1}"#,
        )
        .unwrap();
        assert_eq!(canonical_json(&a), canonical_json(&b));
        // Keys sort by bytes: uppercase before lowercase, shorter prefix first.
        let c = json!({"b": 0, "B": 0, "bb": 0, "": 0});
        assert_eq!(
            String::from_utf8(canonical_json(&c)).unwrap(),
            r#"{"":0,"B":0,"b":0,"bb":0}"#
        );
    }

    #[test]
    fn the_sealers_one_pass_gives_both_hashes() {
        let payload = json!({"TransactionPrepared": {"b": 1, "a": [true, null]}});
        let metadata = json!({"actor": "u1"});
        let prev = [7u8; 32];
        let mut h = EventHasher::default();
        let both = h.hash_with_payload(&fields(&payload, &metadata), &prev);
        assert_eq!(
            both,
            (
                h.hash(&fields(&payload, &metadata), &prev),
                payload_hash(&payload)
            )
        );
    }

    #[test]
    fn every_field_and_the_previous_link_change_the_hash() {
        let payload = json!({"TransactionAuthorized": {"authorized_by": "u1"}});
        let metadata = json!({"actor": "u1"});
        let mut h = EventHasher::default();
        let base = h.hash(&fields(&payload, &metadata), &ZERO);
        assert_eq!(
            base,
            h.hash(&fields(&payload, &metadata), &ZERO),
            "deterministic"
        );
        let other_payload = json!({"TransactionAuthorized": {"authorized_by": "u2"}});
        let other_meta = json!({"actor": "u2"});
        let variants: Vec<Hash> = vec![
            h.hash(
                &EventFields {
                    position: 8,
                    ..fields(&payload, &metadata)
                },
                &ZERO,
            ),
            h.hash(
                &EventFields {
                    aggregate_type: "User",
                    ..fields(&payload, &metadata)
                },
                &ZERO,
            ),
            h.hash(
                &EventFields {
                    aggregate_id: "t2",
                    ..fields(&payload, &metadata)
                },
                &ZERO,
            ),
            h.hash(
                &EventFields {
                    sequence: 3,
                    ..fields(&payload, &metadata)
                },
                &ZERO,
            ),
            h.hash(
                &EventFields {
                    event_type: "X",
                    ..fields(&payload, &metadata)
                },
                &ZERO,
            ),
            h.hash(
                &EventFields {
                    event_version: "1.1",
                    ..fields(&payload, &metadata)
                },
                &ZERO,
            ),
            h.hash(&fields(&other_payload, &metadata), &ZERO),
            h.hash(&fields(&payload, &other_meta), &ZERO),
            h.hash(
                &EventFields {
                    recorded_at: "2026-01-01T00:00:00.000001Z",
                    ..fields(&payload, &metadata)
                },
                &ZERO,
            ),
            h.hash(&fields(&payload, &metadata), &[1u8; 32]),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(*v, base, "variant {i} did not change the hash");
        }
    }

    #[test]
    fn length_prefixes_keep_fields_apart() {
        let p = json!({});
        let m = json!({});
        let mut h = EventHasher::default();
        let a = h.hash(
            &EventFields {
                aggregate_type: "ab",
                aggregate_id: "c",
                ..fields(&p, &m)
            },
            &ZERO,
        );
        let b = h.hash(
            &EventFields {
                aggregate_type: "a",
                aggregate_id: "bc",
                ..fields(&p, &m)
            },
            &ZERO,
        );
        assert_ne!(a, b);
    }

    #[test]
    fn the_accumulator_depends_on_order() {
        let (x, y) = ([1u8; 32], [2u8; 32]);
        assert_ne!(
            accumulate(&accumulate(&ZERO, &x), &y),
            accumulate(&accumulate(&ZERO, &y), &x)
        );
    }

    #[test]
    fn checkpoint_messages_cover_every_field() {
        let cp = CheckpointFields {
            seq: 1,
            position: 10,
            event_count: 9,
            accumulator: [3u8; 32],
            prev_checkpoint_hash: ZERO,
            key_id: "k".into(),
            signed_at: "2026-01-01T00:00:00Z".into(),
        };
        let m = cp.message();
        for changed in [
            CheckpointFields {
                seq: 2,
                ..cp.clone()
            },
            CheckpointFields {
                position: 11,
                ..cp.clone()
            },
            CheckpointFields {
                event_count: 10,
                ..cp.clone()
            },
            CheckpointFields {
                accumulator: [4u8; 32],
                ..cp.clone()
            },
            CheckpointFields {
                prev_checkpoint_hash: [5u8; 32],
                ..cp.clone()
            },
            CheckpointFields {
                key_id: "j".into(),
                ..cp.clone()
            },
            CheckpointFields {
                signed_at: "2026-01-01T00:00:01Z".into(),
                ..cp.clone()
            },
        ] {
            assert_ne!(changed.message(), m);
        }
        assert_ne!(cp.hash(b"sig1"), cp.hash(b"sig2"));
    }
}
