//! The export format: JSON Lines, verifiable offline with the same verifier as the database.
//!
//! ```text
//! {"type":"header","format":"countersign-audit","version":1,"exported_at":…,"public_keys":[{"key_id","public_key"}]}
//! {"type":"event","position":…,"aggregate_type":…,…,"recorded_at":…,"seal":{"hash",…}|null}
//! {"type":"seal","position":…,"seal":{…}}            a seal whose event row is gone
//! {"type":"checkpoint","seq":…,"position":…,…,"signature":…}
//! {"type":"end","records":…}
//! ```
//!
//! Records appear in verification order: each checkpoint right after the last event it covers
//! (so a verifier reads the file once, in constant memory). Hashes, keys and signatures are
//! hex. The header's keys are informational: offline verification trusts only the public keys
//! given on the command line. The end line catches a file cut short.

use std::io::{BufRead, Write};

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::canonical::Hash;
use super::store::DbRecords;
use super::verify::{AuditEvent, Checkpoint, Problem, Record, Report, Seal, Verifier};
use super::AuditError;
use crate::store::Db;

pub const FORMAT: &str = "countersign-audit";
pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublicKeyInfo {
    pub key_id: String,
    pub public_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    Header {
        format: String,
        version: u32,
        exported_at: String,
        public_keys: Vec<PublicKeyInfo>,
    },
    /// Read as an [`EventLine`] instead: a flattened struct is read through serde's buffer,
    /// which costs more than the event and cannot hold raw JSON.
    #[serde(skip_deserializing)]
    Event {
        #[serde(flatten)]
        event: AuditEvent,
        seal: Option<Seal>,
    },
    Seal {
        position: i64,
        seal: Seal,
    },
    Checkpoint(Checkpoint),
    End {
        records: u64,
    },
}

/// An event line as read: [`AuditEvent`]'s fields and the seal (`type` is known already).
#[derive(Deserialize)]
struct EventLine {
    position: i64,
    aggregate_type: String,
    aggregate_id: String,
    sequence: i64,
    event_type: String,
    event_version: String,
    payload: Box<RawValue>,
    metadata: Box<RawValue>,
    recorded_at: String,
    seal: Option<Seal>,
}

impl From<EventLine> for Line {
    fn from(l: EventLine) -> Self {
        Line::Event {
            event: AuditEvent {
                position: l.position,
                aggregate_type: l.aggregate_type,
                aggregate_id: l.aggregate_id,
                sequence: l.sequence,
                event_type: l.event_type,
                event_version: l.event_version,
                payload: Box::<str>::from(l.payload).into_string(),
                metadata: Box::<str>::from(l.metadata).into_string(),
                recorded_at: l.recorded_at,
            },
            seal: l.seal,
        }
    }
}

/// The type of a line, for lines that do not start the way `export` writes event lines.
#[derive(Deserialize)]
struct LineType {
    #[serde(rename = "type")]
    kind: String,
}

/// How `export` starts every event line: such a line is read once, as an [`EventLine`].
const EVENT_LINE_START: &str = r#"{"type":"event","#;

/// Write every audit record of `db` to `out`. Returns the number of records.
pub async fn export(
    db: &Db,
    public_keys: Vec<PublicKeyInfo>,
    out: &mut impl Write,
) -> Result<u64, AuditError> {
    let header = Line::Header {
        format: FORMAT.to_owned(),
        version: VERSION,
        exported_at: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
        public_keys,
    };
    write_line(out, &header)?;
    let mut records = DbRecords::new(db.clone());
    let mut count = 0u64;
    while let Some(record) = records.next().await? {
        let line = match record {
            Record::Event {
                event: Some(event),
                seal,
                ..
            } => Line::Event { event, seal },
            Record::Event {
                position,
                event: None,
                seal: Some(seal),
            } => Line::Seal { position, seal },
            Record::Event { .. } => continue,
            Record::Checkpoint(cp) => Line::Checkpoint(cp),
        };
        write_line(out, &line).map_err(|e| match (e, &line) {
            // An event's stored JSON that is not JSON (edited into something else): say which.
            (AuditError::Corrupt(e), Line::Event { event, .. }) => AuditError::Corrupt(format!(
                "event at position {}: payload or metadata is not JSON: {e}",
                event.position
            )),
            (e, _) => e,
        })?;
        count += 1;
    }
    write_line(out, &Line::End { records: count })?;
    out.flush()?;
    Ok(count)
}

fn write_line(out: &mut impl Write, line: &Line) -> Result<(), AuditError> {
    serde_json::to_writer(&mut *out, line).map_err(|e| {
        if e.is_io() {
            AuditError::Io(e.to_string())
        } else {
            AuditError::Corrupt(e.to_string())
        }
    })?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Verify an export against the trusted `keys`, without a database.
pub fn verify_file(
    input: impl BufRead,
    keys: Vec<VerifyingKey>,
    anchor: Option<(i64, Hash)>,
) -> Report {
    let mut verifier = Verifier::new(keys, anchor);
    let mut seen_header = false;
    let mut seen_end = false;
    let mut records = 0u64;
    for (index, line) in input.lines().enumerate() {
        let n = index + 1;
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                verifier.fail(Problem::malformed(format!("line {n}: unreadable: {e}")));
                break;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        if seen_end {
            verifier.fail(Problem::malformed(format!(
                "line {n}: data after the end line"
            )));
            break;
        }
        let is_event = line.starts_with(EVENT_LINE_START)
            || serde_json::from_str::<LineType>(&line).is_ok_and(|l| l.kind == "event");
        let parsed = if is_event {
            serde_json::from_str::<EventLine>(&line).map(Line::from)
        } else {
            serde_json::from_str::<Line>(&line)
        };
        let parsed = match parsed {
            Ok(l) => l,
            Err(e) => {
                verifier.fail(Problem::malformed(format!(
                    "line {n}: not a valid record: {e}"
                )));
                break;
            }
        };
        let record = match parsed {
            Line::Header {
                format, version, ..
            } => {
                if seen_header || n != 1 || format != FORMAT || version != VERSION {
                    verifier.fail(Problem::malformed(format!(
                        "line {n}: expected one header of format {FORMAT} version {VERSION} first"
                    )));
                    break;
                }
                seen_header = true;
                continue;
            }
            _ if !seen_header => {
                verifier.fail(Problem::malformed("the file does not start with a header"));
                break;
            }
            Line::End { records: expected } => {
                if expected != records {
                    verifier.fail(Problem::malformed(format!(
                        "the end line counts {expected} records, the file has {records}"
                    )));
                    break;
                }
                seen_end = true;
                continue;
            }
            Line::Event { event, seal } => Record::Event {
                position: event.position,
                event: Some(event),
                seal,
            },
            Line::Seal { position, seal } => Record::Event {
                position,
                event: None,
                seal: Some(seal),
            },
            Line::Checkpoint(cp) => Record::Checkpoint(cp),
        };
        records += 1;
        if !verifier.feed(record) {
            break;
        }
    }
    if !verifier.failed() && !seen_end {
        verifier.fail(Problem::malformed(
            "the file ends without its end line (cut short?)",
        ));
    }
    verifier.finish()
}
