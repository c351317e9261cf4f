//! Event schema evolution, in one place.
//!
//! Stored events are never rewritten (they are sealed: see `audit`). When an event's shape
//! changes, its `event_version` (from `DomainEvent::event_version`) is raised and an upcaster
//! registered here turns older stored JSON into the current shape *on load*. The same list is
//! used everywhere events are decoded into domain types: by cqrs-es when it loads an aggregate
//! ([`crate::store::cqrs`]), by the projector, and by the audit re-derivation. Hashing and
//! verification always work on the stored bytes, never on upcast ones.
//!
//! To change an event: bump its version in the aggregate, add a `SemanticVersionEventUpcaster`
//! for the new version below (it applies to every stored version lower than it; list
//! upcasters of one event type oldest first), and add a test that loads the old shape.
//!
//! History:
//! - `UserRegistered` 1.1 adds `username_key`, the case-folded name that makes usernames
//!   unique, so the uniqueness rule can be checked from events alone. 1.0 events get it
//!   derived from `username`.

use cqrs_es::persist::{EventUpcaster, SemanticVersionEventUpcaster, SerializedEvent};
use projections::StoredEvent;
use serde_json::Value;

/// Every upcaster, in the order they apply.
pub fn upcasters() -> Vec<Box<dyn EventUpcaster>> {
    vec![Box::new(SemanticVersionEventUpcaster::new(
        "UserRegistered",
        "1.1",
        Box::new(user_registered_1_1),
    ))]
}

fn user_registered_1_1(mut payload: Value) -> Value {
    if let Some(body) = payload
        .get_mut("UserRegistered")
        .and_then(Value::as_object_mut)
    {
        if !body.contains_key("username_key") {
            let key = body
                .get("username")
                .and_then(Value::as_str)
                .map(str::to_lowercase)
                .unwrap_or_default();
            body.insert("username_key".to_owned(), Value::String(key));
        }
    }
    payload
}

/// Bring a stored event to the current shape of its type (a no-op for current events).
pub fn upcast(event: StoredEvent, upcasters: &[Box<dyn EventUpcaster>]) -> StoredEvent {
    if !upcasters
        .iter()
        .any(|u| u.can_upcast(&event.event_type, &event.event_version))
    {
        return event;
    }
    let StoredEvent {
        position,
        aggregate_type,
        aggregate_id,
        sequence,
        event_type,
        event_version,
        payload,
        metadata,
        recorded_at,
    } = event;
    let mut serialized = SerializedEvent {
        aggregate_id,
        sequence: usize::try_from(sequence).unwrap_or_default(),
        aggregate_type,
        event_type,
        event_version,
        payload,
        metadata,
    };
    for u in upcasters {
        if u.can_upcast(&serialized.event_type, &serialized.event_version) {
            serialized = u.upcast(serialized);
        }
    }
    StoredEvent {
        position,
        aggregate_type: serialized.aggregate_type,
        aggregate_id: serialized.aggregate_id,
        sequence,
        event_type: serialized.event_type,
        event_version: serialized.event_version,
        payload: serialized.payload,
        metadata: serialized.metadata,
        recorded_at,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn stored(version: &str, payload: Value) -> StoredEvent {
        StoredEvent {
            position: 1,
            aggregate_type: "User".into(),
            aggregate_id: "u1".into(),
            sequence: 1,
            event_type: "UserRegistered".into(),
            event_version: version.into(),
            payload,
            metadata: json!({}),
            recorded_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn user_registered_1_0_gains_its_username_key() {
        let old = stored(
            "1.0",
            json!({"UserRegistered": {"user_id": "u1", "username": "Alice",
                   "registered_at": "2026-01-01T00:00:00Z"}}),
        );
        let new = upcast(old, &upcasters());
        assert_eq!(new.event_version, "1.1.0");
        assert_eq!(new.payload["UserRegistered"]["username_key"], "alice");
        let event: aggregates::UserEvent = serde_json::from_value(new.payload).unwrap();
        assert!(matches!(
            event,
            aggregates::UserEvent::UserRegistered { .. }
        ));
    }

    #[test]
    fn current_events_are_left_alone() {
        let current = stored(
            "1.1",
            json!({"UserRegistered": {"user_id": "u1", "username": "Alice", "username_key": "alice",
                   "registered_at": "2026-01-01T00:00:00Z"}}),
        );
        assert_eq!(upcast(current.clone(), &upcasters()), current);
    }
}
