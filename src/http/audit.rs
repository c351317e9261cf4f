//! `/api/audit/*`: the event history with its integrity fields, per-transaction re-derivation,
//! full verification, and the checkpoint-signing public key.
//!
//! Who may read what:
//! - auditors (users granted the `auditor` role by an operator) read every event, re-derive
//!   any transaction, and run verification. The role adds read access only; auditors act on
//!   wallets exactly as any user (their own, nobody else's).
//! - other users read the events of their own aggregates: their user, their wallets, their
//!   API keys and the transactions on their wallets (`/api/audit/events` and
//!   `/api/audit/transactions/{id}`); verification is for auditors (403).
//! - agents (API keys) get 403 everywhere here.
//! - `/api/audit/public_key` is public.

use aggregates::Role;
use axum::extract::{Path, State};
use axum::Json;
use projections::{TransactionView, UserView, ViewKind};
use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::error::{ApiError, ApiResult};
use super::extract::{ApiQuery, AuthUser, Bounded, Caller};
use crate::app::AppState;
use crate::audit::{self, EventFilter, SealedEvent};

const DEFAULT_LIMIT: i64 = 100;
const MAX_LIMIT: i64 = 1000;

/// A caller of the audit API: an auditor or a user reading their own history.
struct Reader {
    user: AuthUser,
    auditor: bool,
}

async fn reader(state: &AppState, caller: Caller) -> ApiResult<Reader> {
    let user = match caller {
        Caller::Agent(_) => {
            return Err(ApiError::forbidden(
                "forbidden",
                "agents cannot read the audit history",
            ))
        }
        Caller::User(u) => u,
    };
    let view: UserView = state
        .db
        .view(ViewKind::User, &user.user_id)
        .await?
        .ok_or_else(|| ApiError::unauthorized("unknown user"))?;
    Ok(Reader {
        auditor: view.has_role(Role::Auditor),
        user,
    })
}

fn hex_opt(h: &Option<audit::canonical::Hash>) -> Value {
    h.map_or(Value::Null, |h| Value::String(hex::encode(h)))
}

fn event_json(e: &SealedEvent) -> Value {
    let ev = &e.event;
    json!({
        "position": ev.position,
        "aggregate_type": ev.aggregate_type,
        "aggregate_id": ev.aggregate_id,
        "sequence": ev.sequence,
        "event_type": ev.event_type,
        "event_version": ev.event_version,
        "payload": ev.payload,
        "metadata": ev.metadata,
        "recorded_at": ev.recorded_at,
        "hash": hex_opt(&e.hash),
        "prev_hash": hex_opt(&e.prev_hash),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    after: Option<i64>,
    limit: Option<i64>,
    // Bounded: no control characters (a NUL is not even storable as PostgreSQL text).
    aggregate_type: Option<Bounded<128>>,
    aggregate_id: Option<Bounded<128>>,
    event_type: Option<Bounded<128>>,
    from: Option<String>,
    to: Option<String>,
}

fn parse_time(field: &str, value: Option<String>) -> ApiResult<Option<OffsetDateTime>> {
    value
        .map(|v| {
            OffsetDateTime::parse(&v, &time::format_description::well_known::Rfc3339).map_err(
                |_| ApiError::invalid(field, format!("{field} must be an RFC 3339 timestamp")),
            )
        })
        .transpose()
}

/// Events in commit order, keyset-paginated: pass the response's `next_after` as `after`.
pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> ApiResult<Json<Value>> {
    let reader = reader(&state, caller).await?;
    let after = query.after.unwrap_or(0);
    if after < 0 {
        return Err(ApiError::invalid("after", "after must be a position ≥ 0"));
    }
    let limit = query.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            format!("limit must be between 1 and {MAX_LIMIT}"),
        ));
    }
    let filter = EventFilter {
        after,
        limit,
        aggregate_type: query.aggregate_type.map(|b| b.0),
        aggregate_id: query.aggregate_id.map(|b| b.0),
        event_type: query.event_type.map(|b| b.0),
        from: parse_time("from", query.from)?,
        to: parse_time("to", query.to)?,
        owner_user_id: (!reader.auditor).then(|| reader.user.user_id.clone()),
    };
    let page = state
        .db
        .audit_events(&filter)
        .await
        .map_err(ApiError::internal)?;
    let next_after = page.last().map_or(after, |e| e.event.position);
    Ok(Json(json!({
        "events": page.iter().map(event_json).collect::<Vec<_>>(),
        "next_after": next_after,
    })))
}

/// A transaction's full history, its state re-derived from those events alone (through the
/// aggregate's `apply` and through the view's fold), and the stored view to compare with.
pub async fn transaction(
    State(state): State<AppState>,
    caller: Caller,
    Path(transaction_id): Path<String>,
) -> ApiResult<Json<Value>> {
    let reader = reader(&state, caller).await?;
    if uuid::Uuid::parse_str(&transaction_id).is_err() {
        return Err(ApiError::not_found("transaction"));
    }
    let view: Option<TransactionView> = state
        .db
        .view(ViewKind::Transaction, &transaction_id)
        .await?;
    if !reader.auditor
        && view
            .as_ref()
            .is_none_or(|v| v.owner_user_id != reader.user.user_id)
    {
        return Err(ApiError::not_found("transaction"));
    }
    let history = state
        .db
        .audit_events_of("Transaction", &transaction_id)
        .await
        .map_err(ApiError::internal)?;
    if history.is_empty() {
        return Err(ApiError::not_found("transaction"));
    }
    let events: Vec<_> = history.iter().map(|e| e.event.clone()).collect();
    let (derived, rederived_view) =
        audit::rederive_transaction(&events).map_err(ApiError::internal)?;
    let stored_view = view
        .map(serde_json::to_value)
        .transpose()
        .map_err(ApiError::internal)?;
    let view_matches = stored_view.is_some() && stored_view == rederived_view;
    Ok(Json(json!({
        "transaction_id": transaction_id,
        "events": history.iter().map(event_json).collect::<Vec<_>>(),
        "derived_state": derived,
        "rederived_view": rederived_view,
        "view": stored_view,
        "view_matches": view_matches,
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyQuery {
    /// `SEQ:HASH` of a checkpoint seen before, which must still be there.
    anchor: Option<String>,
}

/// Verify the whole log (auditors only).
pub async fn verify(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<VerifyQuery>,
) -> ApiResult<Json<Value>> {
    let reader = reader(&state, caller).await?;
    if !reader.auditor {
        return Err(ApiError::forbidden(
            "auditor_role_required",
            "verification is for auditors",
        ));
    }
    let anchor = query
        .anchor
        .as_deref()
        .map(audit::parse_anchor)
        .transpose()
        .map_err(|e| ApiError::invalid("anchor", e))?;
    let keys = audit::sealer::trusted_keys(&state.db, Some(&state.master_key))
        .await
        .map_err(ApiError::internal)?;
    let report = audit::verify_database(&state.db, keys, anchor)
        .await
        .map_err(ApiError::internal)?;
    let mut body = serde_json::to_value(&report).map_err(ApiError::internal)?;
    body["public_key"] = audit::public_key_json(&state.sealer.public_key());
    Ok(Json(body))
}

/// The key that signs checkpoints (public: exports are verified against it offline).
pub async fn public_key(State(state): State<AppState>) -> Json<Value> {
    Json(audit::public_key_json(&state.sealer.public_key()))
}
