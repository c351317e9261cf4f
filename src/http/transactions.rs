//! The countersigned flow: an agent prepares, the owner authorizes (TOTP) or rejects, the agent
//! executes once; plus status, listings and per-transaction history.

use aggregates::{
    Address, Amount, FeeParams, HexBytes, Initiator, PrepareTransaction, TransactionCommand,
    TransactionKind, TxPayload,
};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use projections::{TransactionView, ViewKind};
use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;
use uuid::Uuid;

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiQuery, AuthAgent, AuthUser, Bounded, Caller, MfaCode, RequestId};
use super::users::use_mfa_code;
use super::wallets::visible_wallet;
use crate::app::AppState;
use crate::chain::{to_u256, ChainError};
use crate::projector::ViewColumn;

const ERC20_TRANSFER_SELECTOR: [u8; 4] = [0xa9, 0x05, 0x9c, 0xbb];
/// Headroom over the node's gas estimate.
const GAS_MARGIN_PERCENT: u64 = 20;

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum KindInput {
    #[default]
    Native,
    Erc20,
    ContractCall,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareRequest {
    #[serde(alias = "address")]
    wallet_address: Address,
    #[serde(default)]
    kind: KindInput,
    #[serde(alias = "to_address")]
    to: Option<Address>,
    value: Option<Amount>,
    token_address: Option<Address>,
    amount: Option<Amount>,
    data: Option<HexBytes>,
    memo: Option<Bounded<500>>,
    expires_in: Option<u64>,
    user_id: Option<String>,
}

fn required<T>(v: Option<T>, field: &str, kind: &str) -> ApiResult<T> {
    v.ok_or_else(|| ApiError::invalid(field, format!("{field} is required for kind {kind}")))
}

fn absent<T>(v: &Option<T>, field: &str, kind: &str) -> ApiResult<()> {
    match v {
        Some(_) => Err(ApiError::invalid(
            field,
            format!("{field} is not allowed for kind {kind}"),
        )),
        None => Ok(()),
    }
}

/// ABI-encode `transfer(recipient, amount)`.
fn erc20_transfer_calldata(recipient: &Address, amount: &Amount) -> HexBytes {
    let mut data = Vec::with_capacity(4 + 64);
    data.extend_from_slice(&ERC20_TRANSFER_SELECTOR);
    data.extend_from_slice(&[0u8; 12]);
    data.extend_from_slice(recipient.as_bytes());
    data.extend_from_slice(&amount.to_be_bytes());
    HexBytes::new(data)
}

struct Shape {
    kind: TransactionKind,
    to: Address,
    call_to: Address,
    value: Amount,
    data: HexBytes,
    token_address: Option<Address>,
    amount: Option<Amount>,
}

/// Check which fields each kind takes, and derive the exact payload to sign.
fn shape(body: &PrepareRequest) -> ApiResult<Shape> {
    match body.kind {
        KindInput::Native => {
            let k = "native";
            absent(&body.token_address, "token_address", k)?;
            absent(&body.amount, "amount", k)?;
            absent(&body.data, "data", k)?;
            let to = required(body.to, "to", k)?;
            Ok(Shape {
                kind: TransactionKind::Native,
                to,
                call_to: to,
                value: required(body.value.clone(), "value", k)?,
                data: HexBytes::default(),
                token_address: None,
                amount: None,
            })
        }
        KindInput::Erc20 => {
            let k = "erc20";
            absent(&body.value, "value", k)?;
            absent(&body.data, "data", k)?;
            let to = required(body.to, "to", k)?;
            let token = required(body.token_address, "token_address", k)?;
            let amount = required(body.amount.clone(), "amount", k)?;
            Ok(Shape {
                kind: TransactionKind::Erc20,
                to,
                call_to: token,
                value: Amount::zero(),
                data: erc20_transfer_calldata(&to, &amount),
                token_address: Some(token),
                amount: Some(amount),
            })
        }
        KindInput::ContractCall => {
            let k = "contract_call";
            absent(&body.token_address, "token_address", k)?;
            absent(&body.amount, "amount", k)?;
            let to = required(body.to, "to", k)?;
            let data = required(body.data.clone(), "data", k)?;
            if data.as_slice().len() < 4 {
                return Err(ApiError::invalid(
                    "data",
                    "calldata must hold at least a 4-byte function selector",
                ));
            }
            Ok(Shape {
                kind: TransactionKind::ContractCall,
                to,
                call_to: to,
                value: body.value.clone().unwrap_or_else(Amount::zero),
                data,
                token_address: None,
                amount: None,
            })
        }
    }
}

pub async fn prepare(
    State(state): State<AppState>,
    agent: AuthAgent,
    RequestId(request_id): RequestId,
    ApiJson(body): ApiJson<PrepareRequest>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    if let Some(user_id) = &body.user_id {
        if *user_id != agent.key.owner_user_id {
            return Err(ApiError::forbidden(
                "user_mismatch",
                "user_id does not match the API key's owner",
            )
            .with_field("user_id"));
        }
    }
    let max_expiry = state.default_expiry.as_secs();
    let expires_in = body.expires_in.unwrap_or(max_expiry);
    if expires_in == 0 || expires_in > max_expiry {
        return Err(ApiError::invalid(
            "expires_in",
            format!("expires_in must be between 1 and {max_expiry} seconds"),
        ));
    }
    let shape = shape(&body)?;
    let caller = Caller::Agent(agent);
    let wallet = visible_wallet(&state, &caller, &body.wallet_address).await?;
    let Caller::Agent(agent) = caller else {
        unreachable!("constructed as an agent above")
    };
    let payload = TxPayload {
        chain_id: wallet.chain_id,
        from: wallet.wallet_address,
        to: shape.call_to,
        value: shape.value,
        data: shape.data,
    };
    let summary = aggregates::transaction::summarize(
        shape.kind,
        &shape.to,
        &payload.value,
        shape.token_address.as_ref(),
        shape.amount.as_ref(),
        &payload.data,
    );
    let now = OffsetDateTime::now_utc();
    let expires_at = now + time::Duration::seconds(expires_in as i64);
    let transaction_id = Uuid::new_v4().to_string();
    let command = TransactionCommand::Prepare(Box::new(PrepareTransaction {
        transaction_id: transaction_id.clone(),
        wallet_address: wallet.wallet_address,
        owner_user_id: wallet.owner_user_id,
        initiator: Initiator::Agent {
            api_key_id: agent.key.api_key_id.clone(),
            api_key_name: agent.key.name.clone(),
        },
        kind: shape.kind,
        to: shape.to,
        token_address: shape.token_address,
        amount: shape.amount,
        memo: body.memo.map(|m| m.0),
        summary: summary.clone(),
        payload,
        now,
        expires_at,
    }));
    state
        .execute(
            &state.transactions,
            &transaction_id,
            command,
            &agent.actor(),
            &request_id,
        )
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "transaction_id": transaction_id,
            "status": "pending_authorization",
            "expires_at": expires_at.format(&time::format_description::well_known::Rfc3339)
                .map_err(ApiError::internal)?,
            "summary": summary,
        })),
    ))
}

/// The transaction if the caller may see it: the wallet's owner, or the agent that prepared it.
pub(super) async fn visible_transaction(
    state: &AppState,
    caller: &Caller,
    transaction_id: &str,
) -> ApiResult<TransactionView> {
    if Uuid::parse_str(transaction_id).is_err() {
        return Err(ApiError::not_found("transaction"));
    }
    let view: Option<TransactionView> =
        state.db.view(ViewKind::Transaction, transaction_id).await?;
    view.filter(|v| match caller {
        Caller::User(u) => v.owner_user_id == u.user_id,
        Caller::Agent(a) => matches!(&v.initiator,
            Initiator::Agent { api_key_id, .. } if *api_key_id == a.key.api_key_id),
    })
    .ok_or_else(|| ApiError::not_found("transaction"))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeRequest {
    transaction_id: Uuid,
    mfa_code: MfaCode,
}

pub async fn authorize(
    State(state): State<AppState>,
    user: AuthUser,
    RequestId(request_id): RequestId,
    ApiJson(body): ApiJson<AuthorizeRequest>,
) -> ApiResult<Json<Value>> {
    let id = body.transaction_id.to_string();
    let caller = Caller::User(user);
    let view = visible_transaction(&state, &caller, &id).await?;
    let Caller::User(user) = caller else {
        unreachable!("constructed as a user above")
    };
    // Refuse early (without spending the code) when the answer is already known; the
    // aggregate re-checks everything after the code is spent.
    if view.status != "pending_authorization" {
        let code = if view.status == "expired" {
            "transaction_expired"
        } else {
            "invalid_state"
        };
        return Err(ApiError::conflict(
            code,
            format!("cannot authorize a transaction that is {}", view.status),
        ));
    }
    use_mfa_code(
        &state,
        &user,
        body.mfa_code,
        &format!("authorize_transaction:{id}"),
        &request_id,
    )
    .await?;
    let command = TransactionCommand::Authorize {
        user_id: user.user_id.clone(),
        now: OffsetDateTime::now_utc(),
    };
    state
        .execute(
            &state.transactions,
            &id,
            command,
            &user.actor(),
            &request_id,
        )
        .await?;
    Ok(Json(json!({"transaction_id": id, "status": "authorized"})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejectRequest {
    transaction_id: Uuid,
    reason: Option<Bounded<500>>,
}

pub async fn reject(
    State(state): State<AppState>,
    user: AuthUser,
    RequestId(request_id): RequestId,
    ApiJson(body): ApiJson<RejectRequest>,
) -> ApiResult<Json<Value>> {
    let id = body.transaction_id.to_string();
    let command = TransactionCommand::Reject {
        user_id: user.user_id.clone(),
        reason: body.reason.map(|r| r.0),
        now: OffsetDateTime::now_utc(),
    };
    state
        .execute(
            &state.transactions,
            &id,
            command,
            &user.actor(),
            &request_id,
        )
        .await?;
    Ok(Json(json!({"transaction_id": id, "status": "rejected"})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExecuteRequest {
    transaction_id: Uuid,
}

fn executed_response(view: &TransactionView) -> Json<Value> {
    Json(json!({
        "transaction_id": view.transaction_id,
        "status": view.status,
        "tx_hash": view.tx_hash,
    }))
}

/// Execute an authorized transaction: simulate, choose fees and nonce, sign (recorded as
/// `TransactionExecuted` before anything leaves the server), broadcast. A repeat returns the
/// first hash and broadcasts nothing.
pub async fn execute(
    State(state): State<AppState>,
    agent: AuthAgent,
    RequestId(request_id): RequestId,
    ApiJson(body): ApiJson<ExecuteRequest>,
) -> ApiResult<Json<Value>> {
    let id = body.transaction_id.to_string();
    let caller = Caller::Agent(agent);
    let view = visible_transaction(&state, &caller, &id).await?;
    let Caller::Agent(agent) = caller else {
        unreachable!("constructed as an agent above")
    };
    if view.tx_hash.is_some() {
        return Ok(executed_response(&view));
    }
    if view.status != "authorized" {
        return Err(ApiError::conflict(
            "invalid_state",
            format!("cannot execute a transaction that is {}", view.status),
        ));
    }
    let payload = view.payload.clone();
    let wallet_lock = state.nonces.lock_for(&payload.from);
    let mut next_nonce = wallet_lock.lock().await;

    // The view may be stale by now (another request held the lock): re-read.
    let view = visible_transaction(&state, &Caller::Agent(agent.clone()), &id).await?;
    if view.tx_hash.is_some() {
        return Ok(executed_response(&view));
    }
    let actor = agent.actor();
    let now = OffsetDateTime::now_utc();
    let fail = |reason: String| TransactionCommand::Fail {
        reason,
        now: OffsetDateTime::now_utc(),
    };
    let value = to_u256(&payload.value);
    let gas = match state
        .chain
        .estimate_gas(&payload.from, &payload.to, value, payload.data.as_slice())
        .await
    {
        Ok(gas) => gas,
        Err(ChainError::Rejected(reason)) => {
            let reason = format!("simulation failed: {reason}");
            state
                .execute(
                    &state.transactions,
                    &id,
                    fail(reason.clone()),
                    &actor,
                    &request_id,
                )
                .await?;
            return Err(ApiError::conflict("simulation_failed", reason));
        }
        Err(e) => return Err(e.into()),
    };
    let gas_limit = gas + gas * GAS_MARGIN_PERCENT / 100;
    let (max_fee_per_gas, max_priority_fee_per_gas) = state.chain.fees().await?;
    let balance = state.chain.balance(&payload.from).await?;
    let max_cost = value.saturating_add(
        alloy::primitives::U256::from(gas_limit)
            .saturating_mul(alloy::primitives::U256::from(max_fee_per_gas)),
    );
    if balance < max_cost {
        let reason = format!(
            "insufficient funds: balance {balance} wei, value plus maximum gas cost {max_cost} wei"
        );
        state
            .execute(
                &state.transactions,
                &id,
                fail(reason.clone()),
                &actor,
                &request_id,
            )
            .await?;
        return Err(ApiError::conflict("insufficient_funds", reason));
    }
    let chain_nonce = state.chain.pending_nonce(&payload.from).await?;
    let nonce = next_nonce.map_or(chain_nonce, |n| n.max(chain_nonce));
    let command = TransactionCommand::Execute {
        actor: Initiator::Agent {
            api_key_id: agent.key.api_key_id.clone(),
            api_key_name: agent.key.name.clone(),
        },
        nonce,
        fees: FeeParams {
            gas_limit,
            max_fee_per_gas,
            max_priority_fee_per_gas,
        },
        now,
    };
    match state
        .execute(&state.transactions, &id, command, &actor, &request_id)
        .await
    {
        Ok(()) => *next_nonce = Some(nonce + 1),
        Err(e) if e.code == "already_executed" => {
            let view = visible_transaction(&state, &Caller::Agent(agent), &id).await?;
            return Ok(executed_response(&view));
        }
        Err(e) => return Err(e),
    }
    let raw = state
        .db
        .executed_event(&id)
        .await?
        .and_then(|e| e.get("raw_transaction")?.as_str()?.parse::<HexBytes>().ok())
        .ok_or_else(|| ApiError::internal("executed transaction has no raw bytes"))?;
    match state.chain.send_raw(raw.as_slice()).await {
        Ok(()) => {}
        Err(ChainError::Rejected(reason)) => {
            tracing::warn!(error = %reason, transaction_id = %id, "broadcast rejected");
            // Nothing was accepted: the nonce is free again; re-read it from the chain next time.
            *next_nonce = None;
            let reason = format!("broadcast rejected: {reason}");
            state
                .execute(
                    &state.transactions,
                    &id,
                    fail(reason.clone()),
                    &actor,
                    &request_id,
                )
                .await?;
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "broadcast_rejected",
                reason,
            ));
        }
        // Signed and recorded: the receipt worker rebroadcasts the same bytes when it can.
        Err(ChainError::Unavailable(e)) => {
            tracing::warn!(error = %e, transaction_id = %id, "broadcast deferred");
        }
    }
    drop(next_nonce);
    let view = visible_transaction(&state, &Caller::Agent(agent), &id).await?;
    Ok(executed_response(&view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    transaction_id: String,
}

pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<StatusQuery>,
) -> ApiResult<Json<TransactionView>> {
    visible_transaction(&state, &caller, &query.transaction_id)
        .await
        .map(Json)
}

const STATUSES: [&str; 7] = [
    "pending_authorization",
    "authorized",
    "rejected",
    "expired",
    "executed",
    "confirmed",
    "failed",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    status: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<Value>> {
    if let Some(s) = &query.status {
        if !STATUSES.contains(&s.as_str()) {
            return Err(ApiError::invalid(
                "status",
                format!("status must be one of {}", STATUSES.join(", ")),
            ));
        }
    }
    let (column, value) = match &caller {
        Caller::User(u) => (ViewColumn::Owner, u.user_id.as_str()),
        Caller::Agent(a) => (ViewColumn::ApiKey, a.key.api_key_id.as_str()),
    };
    let transactions: Vec<TransactionView> = state
        .db
        .views_by(
            ViewKind::Transaction,
            column,
            value,
            query.status.as_deref(),
        )
        .await?;
    Ok(Json(json!({ "transactions": transactions })))
}

pub async fn events(
    State(state): State<AppState>,
    caller: Caller,
    Path(transaction_id): Path<String>,
) -> ApiResult<Json<Value>> {
    visible_transaction(&state, &caller, &transaction_id).await?;
    let events = state.db.events_of("Transaction", &transaction_id).await?;
    let events: Vec<Value> = events
        .into_iter()
        .map(|e| {
            let data = e.payload.get(&e.event_type).cloned().unwrap_or(Value::Null);
            json!({
                "position": e.position,
                "sequence": e.sequence,
                "event_type": e.event_type,
                "recorded_at": e.recorded_at,
                "actor": e.actor(),
                "actor_type": e.metadata.get("actor_type"),
                "request_id": e.metadata.get("request_id"),
                "data": data,
            })
        })
        .collect();
    Ok(Json(json!({ "events": events })))
}
