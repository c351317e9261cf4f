//! Countersign's read side: views derived from the commit-ordered event log.
//!
//! Everything here is pure: [`apply`] folds one stored event into the view document it touches.
//! The server's projector feeds events strictly in global-position order and writes the
//! resulting documents together with its checkpoint in one database transaction, which is what
//! makes views exactly-once (never missed, never doubled) even across crashes and concurrent
//! writers. Nothing here knows about SQL.

mod views;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use views::{ApiKeyView, TransactionView, UserView, WalletView};

/// An event as read back from the store, with its global, commit-ordered position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub position: i64,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: Value,
    pub metadata: Value,
    pub recorded_at: String,
}

impl StoredEvent {
    /// The principal recorded in the command metadata (user or API key id).
    pub fn actor(&self) -> Option<&str> {
        self.metadata.get("actor").and_then(Value::as_str)
    }
}

/// What a fold reads of an event besides its payload: where it is in the log (views record
/// it) and its type (errors name both).
#[derive(Debug, Clone, Copy)]
pub struct EventHead<'a> {
    pub position: i64,
    pub event_type: &'a str,
}

impl<'a> EventHead<'a> {
    pub fn of(event: &'a StoredEvent) -> Self {
        Self {
            position: event.position,
            event_type: &event.event_type,
        }
    }
}

/// The kinds of view documents the projector maintains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViewKind {
    Transaction,
    Wallet,
    ApiKey,
    User,
}

impl ViewKind {
    pub const ALL: [ViewKind; 4] = [Self::Transaction, Self::Wallet, Self::ApiKey, Self::User];

    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Transaction => "transaction",
            Self::Wallet => "wallet",
            Self::ApiKey => "api_key",
            Self::User => "user",
        }
    }

    /// Which view kind an aggregate type feeds.
    pub fn for_aggregate(aggregate_type: &str) -> Option<Self> {
        match aggregate_type {
            "Transaction" => Some(Self::Transaction),
            "Wallet" => Some(Self::Wallet),
            "ApiKey" => Some(Self::ApiKey),
            "User" => Some(Self::User),
            _ => None,
        }
    }
}

/// A view document plus the columns the server indexes for lookups. The document is a `Value`,
/// or its JSON text where it goes straight to the database (rebuilds).
#[derive(Debug, Clone, PartialEq)]
pub struct ViewDoc<P = Value> {
    pub kind: ViewKind,
    pub id: String,
    pub owner_user_id: Option<String>,
    pub wallet_address: Option<String>,
    pub api_key_id: Option<String>,
    pub status: Option<String>,
    /// The deadline of a transaction waiting for its owner (its `expires_at`, as in the
    /// document), for the expiry worker's index; `None` for everything else. A column of its
    /// own, so the database never parses a document to index it.
    pub due_at: Option<String>,
    pub payload: P,
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectionError {
    #[error("event {position} ({event_type}) cannot be decoded: {source}")]
    Decode {
        position: i64,
        event_type: String,
        source: serde_json::Error,
    },
    #[error("event {position} ({event_type}) arrived before its view was created")]
    MissingView { position: i64, event_type: String },
}

/// The view an event touches, if any: its kind and id.
pub fn target(event: &StoredEvent) -> Option<(ViewKind, String)> {
    ViewKind::for_aggregate(&event.aggregate_type).map(|k| (k, event.aggregate_id.clone()))
}

/// A view document decoded, for folding many events without a JSON round trip each (the
/// projector's bulk path). [`apply`] is the same fold over stored JSON.
#[derive(Debug, Clone, PartialEq)]
pub enum ViewState {
    Transaction(Box<TransactionView>),
    Wallet(WalletView),
    ApiKey(ApiKeyView),
    User(UserView),
}

impl ViewState {
    /// Decode a stored document of `kind` from its JSON text (errors name `event`, the event
    /// being folded).
    pub fn decode(
        kind: ViewKind,
        payload: &str,
        event: EventHead<'_>,
    ) -> Result<Self, ProjectionError> {
        let err = |e| views::decode_error(event, e);
        Ok(match kind {
            ViewKind::Transaction => {
                Self::Transaction(Box::new(serde_json::from_str(payload).map_err(err)?))
            }
            ViewKind::Wallet => Self::Wallet(serde_json::from_str(payload).map_err(err)?),
            ViewKind::ApiKey => Self::ApiKey(serde_json::from_str(payload).map_err(err)?),
            ViewKind::User => Self::User(serde_json::from_str(payload).map_err(err)?),
        })
    }

    /// The stored form: the document and its indexed columns.
    pub fn to_doc(&self, id: String) -> Result<ViewDoc, serde_json::Error> {
        use views::View;
        Ok(match self {
            Self::Transaction(v) => v.doc(id, serde_json::to_value(v)?),
            Self::Wallet(v) => v.doc(id, serde_json::to_value(v)?),
            Self::ApiKey(v) => v.doc(id, serde_json::to_value(v)?),
            Self::User(v) => v.doc(id, serde_json::to_value(v)?),
        })
    }

    /// Whether no further event is expected for this document: a transaction in a terminal
    /// status (the aggregate refuses every command there). A rebuild writes such documents out
    /// as soon as it sees them settle; it must still handle a later event for one.
    pub fn settled(&self) -> bool {
        use aggregates::TransactionStatus as S;
        const ALL: [S; 7] = [
            S::PendingAuthorization,
            S::Authorized,
            S::Rejected,
            S::Expired,
            S::Executed,
            S::Confirmed,
            S::Failed,
        ];
        match self {
            Self::Transaction(v) => ALL
                .iter()
                .any(|s| s.is_terminal() && s.as_str() == v.status),
            Self::Wallet(_) | Self::ApiKey(_) | Self::User(_) => false,
        }
    }

    /// The indexed columns of [`to_doc`](Self::to_doc), without the document.
    pub fn columns(&self, id: String) -> ViewDoc<()> {
        use views::View;
        match self {
            Self::Transaction(v) => v.doc(id, ()),
            Self::Wallet(v) => v.doc(id, ()),
            Self::ApiKey(v) => v.doc(id, ()),
            Self::User(v) => v.doc(id, ()),
        }
    }

    /// Append the document's JSON text to `out` (the rebuild writes documents straight into
    /// its `COPY` buffer).
    pub fn write_json(&self, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
        match self {
            Self::Transaction(v) => serde_json::to_writer(out, &**v),
            Self::Wallet(v) => serde_json::to_writer(out, v),
            Self::ApiKey(v) => serde_json::to_writer(out, v),
            Self::User(v) => serde_json::to_writer(out, v),
        }
    }

    /// [`to_doc`](Self::to_doc) with the document as JSON text (no intermediate `Value`).
    pub fn to_doc_text(&self, id: String) -> Result<ViewDoc<String>, serde_json::Error> {
        use views::View;
        Ok(match self {
            Self::Transaction(v) => v.doc(id, serde_json::to_string(v)?),
            Self::Wallet(v) => v.doc(id, serde_json::to_string(v)?),
            Self::ApiKey(v) => v.doc(id, serde_json::to_string(v)?),
            Self::User(v) => v.doc(id, serde_json::to_string(v)?),
        })
    }
}

impl ViewState {
    /// Fold an event's stored JSON text into this document in place (the rebuild's path: a
    /// document is not moved per event). The event must be of the current shape (upcast older
    /// ones first) and for this document's kind. On error the document is unchanged.
    pub fn update_text(
        &mut self,
        head: EventHead<'_>,
        payload: &str,
    ) -> Result<(), ProjectionError> {
        self.update_json(head, payload)
    }

    /// [`update_text`](Self::update_text) from an event as the general path holds it.
    pub fn update_stored(&mut self, event: &StoredEvent) -> Result<(), ProjectionError> {
        self.update_json(EventHead::of(event), &event.payload)
    }

    fn update_json(
        &mut self,
        head: EventHead<'_>,
        payload: impl views::EventJson,
    ) -> Result<(), ProjectionError> {
        match self {
            Self::Transaction(v) => views::update_typed(&mut **v, head, payload),
            Self::Wallet(v) => views::update_typed(v, head, payload),
            Self::ApiKey(v) => views::update_typed(v, head, payload),
            Self::User(v) => views::update_typed(v, head, payload),
        }
    }
}

/// Fold `event` into a decoded view of `kind` (`None`: the event must create it).
pub fn fold(
    kind: ViewKind,
    current: Option<ViewState>,
    event: &StoredEvent,
) -> Result<ViewState, ProjectionError> {
    fold_json(kind, current, EventHead::of(event), &event.payload)
}

/// [`fold`] from an event's stored JSON text, decoded straight into its typed form (the
/// rebuild's path: no intermediate `Value`). The event must be of the current shape (upcast
/// older ones first).
pub fn fold_text(
    kind: ViewKind,
    current: Option<ViewState>,
    head: EventHead<'_>,
    payload: &str,
) -> Result<ViewState, ProjectionError> {
    fold_json(kind, current, head, payload)
}

fn fold_json(
    kind: ViewKind,
    current: Option<ViewState>,
    head: EventHead<'_>,
    payload: impl views::EventJson,
) -> Result<ViewState, ProjectionError> {
    let mismatch = || ProjectionError::MissingView {
        position: head.position,
        event_type: head.event_type.to_owned(),
    };
    Ok(match (kind, current) {
        (ViewKind::Transaction, None) => {
            ViewState::Transaction(Box::new(views::fold_typed(None, head, payload)?))
        }
        (ViewKind::Transaction, Some(ViewState::Transaction(v))) => {
            ViewState::Transaction(Box::new(views::fold_typed(Some(*v), head, payload)?))
        }
        (ViewKind::Wallet, None) => ViewState::Wallet(views::fold_typed(None, head, payload)?),
        (ViewKind::Wallet, Some(ViewState::Wallet(v))) => {
            ViewState::Wallet(views::fold_typed(Some(v), head, payload)?)
        }
        (ViewKind::ApiKey, None) => ViewState::ApiKey(views::fold_typed(None, head, payload)?),
        (ViewKind::ApiKey, Some(ViewState::ApiKey(v))) => {
            ViewState::ApiKey(views::fold_typed(Some(v), head, payload)?)
        }
        (ViewKind::User, None) => ViewState::User(views::fold_typed(None, head, payload)?),
        (ViewKind::User, Some(ViewState::User(v))) => {
            ViewState::User(views::fold_typed(Some(v), head, payload)?)
        }
        _ => return Err(mismatch()),
    })
}

/// Fold `event` into `current` (the stored document of [`target`], if it exists).
pub fn apply(
    kind: ViewKind,
    current: Option<Value>,
    event: &StoredEvent,
) -> Result<ViewDoc, ProjectionError> {
    match kind {
        ViewKind::Transaction => views::fold::<TransactionView>(current, event),
        ViewKind::Wallet => views::fold::<WalletView>(current, event),
        ViewKind::ApiKey => views::fold::<ApiKeyView>(current, event),
        ViewKind::User => views::fold::<UserView>(current, event),
    }
}
