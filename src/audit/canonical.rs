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

use std::borrow::Cow;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
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
    /// Payload and metadata as stored JSON text, encoded by [`write_canonical_text`].
    pub payload: &'a str,
    pub metadata: &'a str,
    pub recorded_at: &'a str,
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

/// Append the canonical JSON of the JSON text `text` to `out`: the same bytes as parsing it
/// into a `Value` and [`write_canonical_json`], or the same error. The sealer hashes every
/// event as it is stored, and a `Value` costs an allocation per node and per key: this walks
/// the parser's events instead, writing each object's members after `out`'s end and then
/// putting them in key order.
pub fn write_canonical_text(out: &mut Vec<u8>, text: &str) -> serde_json::Result<()> {
    let start = out.len();
    let mut de = serde_json::Deserializer::from_str(text);
    let fast = Canonical { out: &mut *out }
        .deserialize(&mut de)
        .and_then(|()| de.end());
    if fast.is_ok() {
        return Ok(());
    }
    // Malformed text, or an object whose first key is one of serde_json's private tokens
    // (which `Value` reads as a number or raw value, not as a member): do what `Value` does.
    out.truncate(start);
    let v: Value = serde_json::from_str(text)?;
    write_canonical_json(out, &v);
    Ok(())
}

/// Keys `Value` does not read as object members when they come first (serde_json's
/// `arbitrary_precision` and `raw_value` tokens): such objects take the `Value` path.
const PRIVATE_KEYS: [&str; 2] = [
    "$serde_json::private::Number",
    "$serde_json::private::RawValue",
];

/// Writes the canonical encoding of whatever the deserializer yields into `out`.
struct Canonical<'o> {
    out: &'o mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for Canonical<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Canonical<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.out
            .extend_from_slice(if v { b"true" } else { b"false" });
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        write_number(self.out, v.into());
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        write_number(self.out, v.into());
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        // As `Value` does: a float with no JSON form is null.
        match serde_json::Number::from_f64(v) {
            Some(n) => write_number(self.out, n),
            None => self.out.extend_from_slice(b"null"),
        }
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        write_string(self.out, v);
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        self.out.extend_from_slice(b"null");
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let out = self.out;
        out.push(b'[');
        let mut first = true;
        loop {
            let comma = out.len();
            if !first {
                out.push(b',');
            }
            if seq
                .next_element_seed(Canonical { out: &mut *out })?
                .is_none()
            {
                out.truncate(comma);
                break;
            }
            first = false;
        }
        out.push(b']');
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let out = self.out;
        let start = out.len();
        // Each member's value is encoded after `start`; its key and byte range are kept.
        let mut members: Vec<(Cow<'de, str>, usize, usize)> = Vec::new();
        while let Some(key) = map.next_key_seed(Key)? {
            if members.is_empty() && PRIVATE_KEYS.contains(&key.as_ref()) {
                return Err(de::Error::custom("serde_json private token as first key"));
            }
            let from = out.len();
            map.next_value_seed(Canonical { out: &mut *out })?;
            members.push((key, from, out.len()));
        }
        // Stable, so that of equal keys the last one read stays last: a map keeps that one.
        members.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let values = out.split_off(start);
        out.push(b'{');
        let mut first = true;
        for (i, (key, from, to)) in members.iter().enumerate() {
            if members.get(i + 1).is_some_and(|next| next.0 == *key) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            write_string(out, key);
            out.push(b':');
            out.extend_from_slice(&values[from - start..to - start]);
        }
        out.push(b'}');
        Ok(())
    }
}

fn write_number(out: &mut Vec<u8>, n: serde_json::Number) {
    use std::io::Write;
    // `Number`'s `Display` is what `write_canonical_json` prints; writing to a Vec cannot fail.
    let _ = write!(out, "{n}");
}

/// An object key, borrowed from the text when it has no escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// The bytes an event's hash is taken over; exposed for tests. Fails only on text that is not
/// JSON.
pub fn event_preimage(
    e: &EventFields<'_>,
    prev_hash: &Hash,
    out: &mut Vec<u8>,
) -> serde_json::Result<()> {
    write_preimage(e, prev_hash, out, None)
}

/// [`event_preimage`], and the [`payload_hash`] from the same canonical encoding if asked.
fn write_preimage(
    e: &EventFields<'_>,
    prev_hash: &Hash,
    out: &mut Vec<u8>,
    payload_hash: Option<&mut Hash>,
) -> serde_json::Result<()> {
    out.clear();
    out.extend_from_slice(EVENT_TAG);
    put_i64(out, e.position);
    put_bytes(out, e.aggregate_type.as_bytes());
    put_bytes(out, e.aggregate_id.as_bytes());
    put_i64(out, e.sequence);
    put_bytes(out, e.event_type.as_bytes());
    put_bytes(out, e.event_version.as_bytes());
    let mut json = Vec::with_capacity(512);
    write_canonical_text(&mut json, e.payload)?;
    if let Some(hash) = payload_hash {
        *hash = Sha256::digest(&json).into();
    }
    put_bytes(out, &json);
    json.clear();
    write_canonical_text(&mut json, e.metadata)?;
    put_bytes(out, &json);
    put_bytes(out, e.recorded_at.as_bytes());
    out.extend_from_slice(prev_hash);
    Ok(())
}

/// Hashes events, reusing one buffer.
#[derive(Default)]
pub struct EventHasher {
    buf: Vec<u8>,
}

impl EventHasher {
    /// Fails only on text that is not JSON.
    pub fn hash(&mut self, e: &EventFields<'_>, prev_hash: &Hash) -> serde_json::Result<Hash> {
        event_preimage(e, prev_hash, &mut self.buf)?;
        Ok(Sha256::digest(&self.buf).into())
    }

    /// The event's hash and its payload's ([`payload_hash`]), encoding the payload once.
    pub fn hash_with_payload(
        &mut self,
        e: &EventFields<'_>,
        prev_hash: &Hash,
    ) -> serde_json::Result<(Hash, Hash)> {
        let mut payload = ZERO;
        write_preimage(e, prev_hash, &mut self.buf, Some(&mut payload))?;
        Ok((Sha256::digest(&self.buf).into(), payload))
    }
}

/// SHA-256 of a payload's canonical JSON: lets a verifier say *what* changed in an event.
/// Fails only on text that is not JSON.
pub fn payload_hash(payload: &str) -> serde_json::Result<Hash> {
    let mut json = Vec::with_capacity(512);
    write_canonical_text(&mut json, payload)?;
    Ok(Sha256::digest(&json).into())
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

    fn fields<'a>(payload: &'a str, metadata: &'a str) -> EventFields<'a> {
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

    fn hash(h: &mut EventHasher, e: &EventFields<'_>, prev: &Hash) -> Hash {
        h.hash(e, prev).unwrap()
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

    /// String contents: plain, escaped, astral, and serde_json's private tokens.
    const PIECES: [&str; 15] = [
        "a",
        "B",
        "to",
        "é",
        "😀",
        "\\\"",
        "\\\\",
        "\\n",
        "\\/",
        "\\u00e9",
        "\\ud83d\\ude00",
        "\\u0000",
        "\\t",
        "$serde_json::private::Number",
        "$serde_json::private::RawValue",
    ];

    /// JSON text as stores and exports may hold it: any key order, whitespace, escapes,
    /// duplicate keys, number spellings, serde_json's private tokens as keys.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            // xorshift64*: deterministic, so a failure names its seed.
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[(self.next() % items.len() as u64) as usize]
        }

        fn space(&mut self, out: &mut String) {
            out.push_str(self.pick(&["", "", " ", "\n  ", "\t"]));
        }

        fn string(&mut self, out: &mut String) {
            out.push('"');
            for _ in 0..self.next() % 4 {
                out.push_str(self.pick(&PIECES));
            }
            out.push('"');
        }

        fn value(&mut self, out: &mut String, depth: u32) {
            self.space(out);
            match self.next() % if depth > 4 { 4 } else { 7 } {
                0 => out.push_str(self.pick(&["null", "true", "false"])),
                1 => out.push_str(self.pick(&[
                    "0",
                    "-0",
                    "7",
                    "-12",
                    "18446744073709551615",
                    "18446744073709551616",
                    "-9223372036854775808",
                    "-9223372036854775809",
                    "1.0",
                    "0.1",
                    "-2.5e-3",
                    "1E+2",
                    "1e308",
                    "123456789012345678901234567890",
                    "4.0e0",
                ])),
                2 | 3 => self.string(out),
                4 => {
                    out.push('[');
                    for i in 0..self.next() % 4 {
                        if i > 0 {
                            out.push(',');
                        }
                        self.value(out, depth + 1);
                    }
                    self.space(out);
                    out.push(']');
                }
                _ => {
                    out.push('{');
                    for i in 0..self.next() % 5 {
                        if i > 0 {
                            out.push(',');
                        }
                        self.space(out);
                        // Few distinct keys, so that duplicates are common.
                        if self.next() % 3 == 0 {
                            self.string(out);
                        } else {
                            out.push_str(self.pick(&["\"a\"", "\"b\"", "\"\\u0061\"", "\"B\""]));
                        }
                        self.space(out);
                        out.push(':');
                        self.value(out, depth + 1);
                    }
                    self.space(out);
                    out.push('}');
                }
            }
            self.space(out);
        }
    }

    fn via_value(text: &str) -> Result<Vec<u8>, String> {
        serde_json::from_str::<Value>(text)
            .map(|v| canonical_json(&v))
            .map_err(|e| e.to_string())
    }

    fn via_text(text: &str) -> Result<Vec<u8>, String> {
        let mut out = b"kept".to_vec();
        write_canonical_text(&mut out, text).map_err(|e| e.to_string())?;
        assert_eq!(&out[..4], b"kept", "what was in the buffer stays");
        Ok(out.split_off(4))
    }

    #[test]
    fn text_encodes_to_the_same_bytes_as_its_value() {
        let mut gen = Gen(0x9E37_79B9_7F4A_7C15);
        for seed in 0..20_000 {
            let mut text = String::new();
            gen.value(&mut text, 0);
            assert_eq!(via_text(&text), via_value(&text), "seed {seed}: {text}");
            // Cut short or with trailing bytes: the same error as `Value`'s.
            let cut = &text[..text.floor_char_boundary(text.len() * 2 / 3)];
            assert_eq!(via_text(cut), via_value(cut), "seed {seed}, cut: {cut}");
            let trailing = format!("{text} x");
            assert_eq!(
                via_text(&trailing),
                via_value(&trailing),
                "seed {seed}, trailing"
            );
        }
        for text in [
            r#"{"b":1,"a":2,"b":3}"#,
            r#"{"$serde_json::private::RawValue":"[1, 2]"}"#,
            r#"{"$serde_json::private::Number":"1.50"}"#,
            r#"{"x":{"$serde_json::private::RawValue":"{\"b\":1,\"a\":0}"}}"#,
            r#"{"a":1,"$serde_json::private::RawValue":"2"}"#,
            "[1e400]",
            "\"\\ud800\"",
            "",
        ] {
            assert_eq!(via_text(text), via_value(text), "{text}");
        }
        assert_eq!(
            via_text(r#"{"b":1,"a":2,"b":3}"#).unwrap(),
            br#"{"a":2,"b":3}"#
        );
    }

    #[test]
    fn the_sealers_one_pass_gives_both_hashes() {
        let payload = json!({"TransactionPrepared": {"b": 1, "a": [true, null]}}).to_string();
        let metadata = json!({"actor": "u1"}).to_string();
        let prev = [7u8; 32];
        let mut h = EventHasher::default();
        let both = h
            .hash_with_payload(&fields(&payload, &metadata), &prev)
            .unwrap();
        assert_eq!(
            both,
            (
                hash(&mut h, &fields(&payload, &metadata), &prev),
                payload_hash(&payload).unwrap()
            )
        );
    }

    #[test]
    fn every_field_and_the_previous_link_change_the_hash() {
        let payload = json!({"TransactionAuthorized": {"authorized_by": "u1"}}).to_string();
        let metadata = json!({"actor": "u1"}).to_string();
        let mut h = EventHasher::default();
        let base = hash(&mut h, &fields(&payload, &metadata), &ZERO);
        assert_eq!(
            base,
            hash(&mut h, &fields(&payload, &metadata), &ZERO),
            "deterministic"
        );
        let other_payload = json!({"TransactionAuthorized": {"authorized_by": "u2"}}).to_string();
        let other_meta = json!({"actor": "u2"}).to_string();
        let variants: Vec<Hash> = vec![
            hash(
                &mut h,
                &EventFields {
                    position: 8,
                    ..fields(&payload, &metadata)
                },
                &ZERO,
            ),
            hash(
                &mut h,
                &EventFields {
                    aggregate_type: "User",
                    ..fields(&payload, &metadata)
                },
                &ZERO,
            ),
            hash(
                &mut h,
                &EventFields {
                    aggregate_id: "t2",
                    ..fields(&payload, &metadata)
                },
                &ZERO,
            ),
            hash(
                &mut h,
                &EventFields {
                    sequence: 3,
                    ..fields(&payload, &metadata)
                },
                &ZERO,
            ),
            hash(
                &mut h,
                &EventFields {
                    event_type: "X",
                    ..fields(&payload, &metadata)
                },
                &ZERO,
            ),
            hash(
                &mut h,
                &EventFields {
                    event_version: "1.1",
                    ..fields(&payload, &metadata)
                },
                &ZERO,
            ),
            hash(&mut h, &fields(&other_payload, &metadata), &ZERO),
            hash(&mut h, &fields(&payload, &other_meta), &ZERO),
            hash(
                &mut h,
                &EventFields {
                    recorded_at: "2026-01-01T00:00:00.000001Z",
                    ..fields(&payload, &metadata)
                },
                &ZERO,
            ),
            hash(&mut h, &fields(&payload, &metadata), &[1u8; 32]),
        ];
        for (i, v) in variants.iter().enumerate() {
            assert_ne!(*v, base, "variant {i} did not change the hash");
        }
    }

    #[test]
    fn length_prefixes_keep_fields_apart() {
        let p = json!({}).to_string();
        let m = json!({}).to_string();
        let mut h = EventHasher::default();
        let a = hash(
            &mut h,
            &EventFields {
                aggregate_type: "ab",
                aggregate_id: "c",
                ..fields(&p, &m)
            },
            &ZERO,
        );
        let b = hash(
            &mut h,
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
