//! The countersigned flow: an agent prepares (simulated and summarized for the human), the
//! owner authorizes (TOTP; one code may authorize a burst) or rejects, the agent executes once;
//! plus status, listings and per-transaction history.

use aggregates::{Address, Amount, HexBytes, Initiator, PrepareTransaction, TransactionCommand};
use alloy::json_abi::Function;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use projections::{TransactionView, ViewKind};
use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::error::DOCUMENT_CHANGED;
use super::error::{ApiError, ApiResult};
use super::extract::{
    agent_with_transaction, api_key_header, ApiJson, ApiQuery, AuthAgent, AuthUser, Bounded,
    Caller, CommandAgent, MfaCode, RequestId,
};
use super::idempotency::{Idempotent, Scope};
use super::users::use_mfa_code;
use super::wallets::command_wallet;
use crate::abi::{encode_call, ContractAbi};
use crate::app::AppState;
use crate::execution::{execute_authorized, Executor};
use crate::explain::{explain, Call, Explained};
use crate::projector::ViewColumn;
use crate::store::Actor;
use crate::writer::Unchanged;

/// The most transactions one `authorize_transactions` call may cover.
const MAX_BATCH: usize = 50;

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
    contract_abi: Option<Value>,
    function_name: Option<Bounded<256>>,
    function_args: Option<Vec<Value>>,
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

/// The calldata of a contract call: raw `data`, or encoded from `contract_abi`,
/// `function_name` and `function_args` (kept, with the ABI, to explain the call).
pub(super) struct CallData<'a> {
    pub data: Option<&'a HexBytes>,
    pub contract_abi: Option<&'a Value>,
    pub function_name: Option<&'a str>,
    pub function_args: Option<&'a [Value]>,
}

impl CallData<'_> {
    pub(super) fn encode(self) -> ApiResult<(HexBytes, Option<(ContractAbi, Function)>)> {
        let encoded_form = self.contract_abi.is_some()
            || self.function_name.is_some()
            || self.function_args.is_some();
        if self.data.is_some() && encoded_form {
            return Err(ApiError::invalid(
                "data",
                "give either data or contract_abi with function_name and function_args, not both",
            ));
        }
        match (self.data, self.contract_abi) {
            (Some(data), _) => {
                if data.as_slice().len() < 4 {
                    return Err(ApiError::invalid(
                        "data",
                        "calldata must hold at least a 4-byte function selector",
                    ));
                }
                Ok((data.clone(), None))
            }
            (None, None) if encoded_form => Err(ApiError::invalid(
                "contract_abi",
                "contract_abi is required with function_name and function_args",
            )),
            (None, None) => Err(ApiError::invalid(
                "data",
                "a contract call needs data, or contract_abi, function_name and function_args",
            )),
            (None, Some(abi)) => {
                let abi = ContractAbi::parse(abi)?;
                let name = self.function_name.ok_or_else(|| {
                    ApiError::invalid(
                        "function_name",
                        "function_name is required with contract_abi",
                    )
                })?;
                let args = self.function_args.unwrap_or_default();
                let function = abi.function(name, args.len())?.clone();
                let data = encode_call(&function, args)?;
                Ok((HexBytes::new(data), Some((abi, function))))
            }
        }
    }
}

/// The zero address has no key and no code: whatever is sent there, or "transferred" by a
/// token "contract" there, is lost. No kind has a use for it as recipient, token or contract.
pub(super) fn not_zero(address: Address, field: &str) -> ApiResult<Address> {
    if address.as_bytes() == &[0u8; 20] {
        return Err(ApiError::invalid(
            field,
            format!("{field} must not be the zero address: anything sent there is lost"),
        ));
    }
    Ok(address)
}

/// Check which fields each kind takes, and derive the exact call to sign.
pub(super) fn shape(body: &PrepareRequest) -> ApiResult<Call> {
    match body.kind {
        KindInput::Native | KindInput::Erc20 => {
            let k = match body.kind {
                KindInput::Erc20 => "erc20",
                _ => "native",
            };
            absent(&body.data, "data", k)?;
            absent(&body.contract_abi, "contract_abi", k)?;
            absent(&body.function_name, "function_name", k)?;
            absent(&body.function_args, "function_args", k)?;
            let to = not_zero(required(body.to, "to", k)?, "to")?;
            if matches!(body.kind, KindInput::Native) {
                absent(&body.token_address, "token_address", k)?;
                absent(&body.amount, "amount", k)?;
                Ok(Call::native(to, required(body.value.clone(), "value", k)?))
            } else {
                absent(&body.value, "value", k)?;
                let token = not_zero(
                    required(body.token_address, "token_address", k)?,
                    "token_address",
                )?;
                let amount = required(body.amount.clone(), "amount", k)?;
                Ok(Call::erc20_transfer(token, to, amount))
            }
        }
        KindInput::ContractCall => {
            let k = "contract_call";
            absent(&body.token_address, "token_address", k)?;
            absent(&body.amount, "amount", k)?;
            let to = not_zero(required(body.to, "to", k)?, "to")?;
            let (data, abi) = CallData {
                data: body.data.as_ref(),
                contract_abi: body.contract_abi.as_ref(),
                function_name: body.function_name.as_ref().map(|n| n.0.as_str()),
                function_args: body.function_args.as_deref(),
            }
            .encode()?;
            Ok(Call::contract(
                to,
                body.value.clone().unwrap_or_else(Amount::zero),
                data,
                abi,
            ))
        }
    }
}

/// A prompt for the wallet's owner: the call, how it was explained, who asked and why.
#[derive(Clone)]
pub(super) struct Prompt {
    pub initiator: Initiator,
    pub call: Call,
    pub explained: Explained,
    pub memo: Option<String>,
    pub expires_in: time::Duration,
}

/// Record `prompt` for a call from `wallet` (`TransactionPrepared`), if the documents it was
/// decided on are `unchanged` when it commits. Returns the new transaction's id and deadline.
pub(super) async fn record_prepared(
    state: &AppState,
    wallet: &projections::WalletView,
    prompt: Prompt,
    actor: &Actor,
    request_id: &str,
    unchanged: Vec<Unchanged>,
) -> ApiResult<(String, OffsetDateTime)> {
    let Prompt {
        initiator,
        call,
        explained,
        memo,
        expires_in,
    } = prompt;
    let payload = call.payload(wallet.chain_id, wallet.wallet_address);
    let now = OffsetDateTime::now_utc();
    let expires_at = now + expires_in;
    let transaction_id = Uuid::new_v4().to_string();
    let command = TransactionCommand::Prepare(Box::new(PrepareTransaction {
        transaction_id: transaction_id.clone(),
        wallet_address: wallet.wallet_address,
        owner_user_id: wallet.owner_user_id.clone(),
        initiator,
        kind: call.kind,
        to: call.to,
        token_address: call.token_address,
        amount: call.amount,
        memo,
        summary: explained.summary,
        payload,
        simulation: explained.simulation,
        now,
        expires_at,
    }));
    let new = transaction_id.clone();
    let execute = state.execute(
        &state.transactions,
        &transaction_id,
        command,
        actor,
        request_id,
    );
    let execute = crate::writer::UNCHANGED.scope(unchanged, execute);
    crate::writer::NEW_AGGREGATE.scope(new, execute).await?;
    Ok((transaction_id, expires_at))
}

pub(super) fn rfc3339(t: OffsetDateTime) -> ApiResult<String> {
    t.format(&time::format_description::well_known::Rfc3339)
        .map_err(ApiError::internal)
}

pub async fn prepare(
    State(state): State<AppState>,
    agent: CommandAgent,
    RequestId(request_id): RequestId,
    Idempotent { key, body }: Idempotent<PrepareRequest>,
) -> Response {
    let scope = Scope::agent(&agent.agent);
    let work = prepare_once(state.clone(), agent, request_id, body);
    key.run(&state, scope, work).await
}

/// The key and wallet a prepare is decided on, as read.
async fn prepare_access(
    state: &AppState,
    agent: &CommandAgent,
    address: &Address,
    cached: bool,
) -> ApiResult<(projections::WalletView, Vec<Unchanged>)> {
    let (wallet, wallet_read) = command_wallet(state, &agent.agent, address, cached).await?;
    Ok((wallet, vec![agent.read.clone(), wallet_read]))
}

async fn prepare_once(
    state: AppState,
    agent: CommandAgent,
    request_id: String,
    body: PrepareRequest,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let CommandAgent { agent: key, .. } = &agent;
    if let Some(user_id) = &body.user_id {
        if *user_id != key.key.owner_user_id {
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
    let call = shape(&body)?;
    let (wallet, unchanged) = prepare_access(&state, &agent, &body.wallet_address, true).await?;
    let payload = call.payload(wallet.chain_id, wallet.wallet_address);
    let explained = explain(&state.chain, &call, &payload).await;
    let summary = explained.summary.clone();
    let simulation = explained.simulation.clone();
    let prompt = Prompt {
        initiator: Initiator::Agent {
            api_key_id: key.key.api_key_id.clone(),
            api_key_name: key.key.name.clone(),
        },
        call,
        explained,
        memo: body.memo.map(|m| m.0),
        expires_in: time::Duration::seconds(expires_in as i64),
    };
    let actor = key.actor();
    let recorded = record_prepared(
        &state,
        &wallet,
        prompt.clone(),
        &actor,
        &request_id,
        unchanged,
    )
    .await;
    let (transaction_id, expires_at) = match recorded {
        Err(e) if e.code == DOCUMENT_CHANGED => {
            // The key or wallet changed after it was read (a copy in this node's cache may
            // lag another node's commit): decide again on the database's copies.
            let agent = agent.reread(&state).await?;
            let (wallet, unchanged) =
                prepare_access(&state, &agent, &body.wallet_address, false).await?;
            record_prepared(&state, &wallet, prompt, &actor, &request_id, unchanged).await?
        }
        recorded => recorded?,
    };
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "transaction_id": transaction_id,
            "status": "pending_authorization",
            "expires_at": rfc3339(expires_at)?,
            "summary": summary,
            "simulation": simulation.outcome,
            "gas_estimate": simulation.gas_estimate,
            "max_fee_wei": simulation.max_fee_wei,
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
        Caller::Agent(a) => agent_may_see(a, v),
    })
    .ok_or_else(|| ApiError::not_found("transaction"))
}

/// An agent sees the transactions its own key prepared.
fn agent_may_see(agent: &AuthAgent, view: &TransactionView) -> bool {
    matches!(&view.initiator,
        Initiator::Agent { api_key_id, .. } if *api_key_id == agent.key.api_key_id)
}

/// Refuse (before any code is spent) what cannot be authorized any more; the aggregate
/// re-checks everything after the code is spent.
fn check_pending(view: &TransactionView, now: OffsetDateTime) -> ApiResult<()> {
    let past_deadline = OffsetDateTime::parse(
        &view.expires_at,
        &time::format_description::well_known::Rfc3339,
    )
    .is_ok_and(|at| at <= now);
    match view.status.as_str() {
        "pending_authorization" if !past_deadline => Ok(()),
        "pending_authorization" | "expired" => Err(ApiError::conflict(
            "transaction_expired",
            "the transaction expired before it was authorized",
        )),
        status => Err(ApiError::conflict(
            "invalid_state",
            format!("cannot authorize a transaction that is {status}"),
        )),
    }
}

pub(super) async fn record_authorization(
    state: &AppState,
    user: &AuthUser,
    transaction_id: &str,
    request_id: &str,
) -> ApiResult<()> {
    let command = TransactionCommand::Authorize {
        user_id: user.user_id.clone(),
        now: OffsetDateTime::now_utc(),
    };
    state
        .execute(
            &state.transactions,
            transaction_id,
            command,
            &user.actor(),
            request_id,
        )
        .await
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
    check_pending(&view, OffsetDateTime::now_utc())?;
    use_mfa_code(
        &state,
        &user,
        body.mfa_code,
        &format!("authorize_transaction:{id}"),
        &request_id,
    )
    .await?;
    record_authorization(&state, &user, &id, &request_id).await?;
    Ok(Json(json!({"transaction_id": id, "status": "authorized"})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeManyRequest {
    transaction_ids: Vec<Uuid>,
    mfa_code: MfaCode,
}

/// Authorize a burst of pending transactions with one TOTP code (a code's time step is
/// accepted once per user, so one prompt per code does not scale). All or nothing as far as
/// the server can tell: every listed transaction is checked (the caller's, pending, not past
/// its deadline) before the code is spent; each is then recorded as its own
/// `TransactionAuthorized`. Only a race after the checks (a concurrent reject, a deadline
/// passing mid-request) can leave some unauthorized; the error then names the first of them.
pub async fn authorize_many(
    State(state): State<AppState>,
    user: AuthUser,
    RequestId(request_id): RequestId,
    ApiJson(body): ApiJson<AuthorizeManyRequest>,
) -> ApiResult<Json<Value>> {
    let ids: Vec<String> = body.transaction_ids.iter().map(Uuid::to_string).collect();
    if ids.is_empty() || ids.len() > MAX_BATCH {
        return Err(ApiError::invalid(
            "transaction_ids",
            format!("transaction_ids must list 1 to {MAX_BATCH} transactions"),
        ));
    }
    for (i, id) in ids.iter().enumerate() {
        if let Some(first) = ids[..i].iter().position(|earlier| earlier == id) {
            return Err(ApiError::invalid(
                &format!("transaction_ids[{i}]"),
                format!("transaction_ids[{i}] repeats transaction_ids[{first}]"),
            ));
        }
    }
    let caller = Caller::User(user);
    let now = OffsetDateTime::now_utc();
    for (i, id) in ids.iter().enumerate() {
        let field = format!("transaction_ids[{i}]");
        let view = visible_transaction(&state, &caller, id)
            .await
            .map_err(|e| e.with_field(&field))?;
        check_pending(&view, now).map_err(|e| {
            let message = format!("{field}: {}", e.message);
            ApiError::conflict(e.code, message).with_field(&field)
        })?;
    }
    let Caller::User(user) = caller else {
        unreachable!("constructed as a user above")
    };
    use_mfa_code(
        &state,
        &user,
        body.mfa_code,
        &format!("authorize_transactions:{}", ids.len()),
        &request_id,
    )
    .await?;
    // All at once: the writer commits them together (one transaction, not one per id).
    let outcomes = futures::future::join_all(
        ids.iter()
            .map(|id| record_authorization(&state, &user, id, &request_id)),
    )
    .await;
    let refused: Vec<(usize, ApiError)> = outcomes
        .into_iter()
        .enumerate()
        .filter_map(|(i, outcome)| outcome.err().map(|e| (i, e)))
        .collect();
    if let Some((i, e)) = refused.first() {
        let field = format!("transaction_ids[{i}]");
        let message = format!(
            "{field}: {}; {} of the {} transactions were authorized, {} were not",
            e.message,
            ids.len() - refused.len(),
            ids.len(),
            refused.len()
        );
        return Err(ApiError::new(e.status, e.code, message).with_field(field));
    }
    let transactions: Vec<Value> = ids
        .iter()
        .map(|id| json!({"transaction_id": id, "status": "authorized"}))
        .collect();
    Ok(Json(json!({
        "status": "authorized",
        "transactions": transactions,
    })))
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

/// Execute an authorized transaction (see [`crate::execution`]): simulated again, signed and
/// recorded before the broadcast. A repeat returns the first hash and broadcasts nothing.
pub async fn execute(
    State(state): State<AppState>,
    agent: AuthAgent,
    RequestId(request_id): RequestId,
    Idempotent { key, body }: Idempotent<ExecuteRequest>,
) -> Response {
    let scope = Scope::agent(&agent);
    let work = execute_once(state.clone(), agent, request_id, body);
    key.run(&state, scope, work).await
}

async fn execute_once(
    state: AppState,
    agent: AuthAgent,
    request_id: String,
    body: ExecuteRequest,
) -> ApiResult<Json<Value>> {
    let id = body.transaction_id.to_string();
    let caller = Caller::Agent(agent);
    visible_transaction(&state, &caller, &id).await?;
    let Caller::Agent(agent) = caller else {
        unreachable!("constructed as an agent above")
    };
    let executor = Executor {
        initiator: Initiator::Agent {
            api_key_id: agent.key.api_key_id.clone(),
            api_key_name: agent.key.name.clone(),
        },
        actor: &agent.actor(),
        request_id: &request_id,
    };
    let view = execute_authorized(&state, &id, &executor).await?;
    Ok(executed_response(&view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusQuery {
    transaction_id: String,
}

pub async fn status(State(state): State<AppState>, mut parts: Parts) -> ApiResult<Response> {
    // Agents poll this: their key and the transaction come from the read cache, or from one
    // database round trip.
    if let Some(key) = api_key_header(&parts).map(|k| Zeroizing::new(k.to_owned())) {
        let query = ApiQuery::<StatusQuery>::from_request_parts(&mut parts, &state).await;
        let id = match &query {
            Ok(ApiQuery(q)) if Uuid::parse_str(&q.transaction_id).is_ok() => &q.transaction_id,
            // Credentials are judged before the query, as on every other endpoint.
            _ => {
                let caller = Caller::from_request_parts(&mut parts, &state).await?;
                let ApiQuery(query) = query?;
                return visible_transaction(&state, &caller, &query.transaction_id)
                    .await
                    .map(|v| Json(v).into_response());
            }
        };
        let (agent, view) = agent_with_transaction(&state, &key, id).await?;
        return view
            .filter(|v| agent_may_see(&agent, &v.view))
            .map(|v| ([(header::CONTENT_TYPE, "application/json")], v.body.clone()).into_response())
            .ok_or_else(|| ApiError::not_found("transaction"));
    }
    let caller = Caller::from_request_parts(&mut parts, &state).await?;
    let ApiQuery(query) = ApiQuery::<StatusQuery>::from_request_parts(&mut parts, &state).await?;
    visible_transaction(&state, &caller, &query.transaction_id)
        .await
        .map(|v| Json(v).into_response())
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
