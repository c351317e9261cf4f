//! User-initiated transactions, the Flask project's `transfer`, `transfer_erc20` and
//! `contract_call` kept compatible: the wallet's owner prepares, authorizes and executes in one
//! request, proving presence with the password and a fresh TOTP code. They go through the same
//! `Transaction` aggregate as agents' (initiator: the user; Prepared, Authorized and Executed
//! recorded with the user as actor), so history and push look the same.

use aggregates::{Address, Amount, HexBytes, Initiator, SimulationOutcome, TransactionCommand};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use projections::{TransactionView, ViewKind};
use serde::Deserialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

use super::error::{ApiError, ApiResult};
use super::extract::{AuthUser, Bounded, Caller, MfaCode, Password, RequestId};
use super::idempotency::{Idempotent, Scope};
use super::transactions::{not_zero, record_authorization, record_prepared, CallData, Prompt};
use super::users::{require_password, use_mfa_code};
use super::wallets::visible_wallet;
use crate::app::AppState;
use crate::execution::{execute_authorized, Executor};
use crate::explain::{explain, Call};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferRequest {
    password: Password,
    mfa_code: MfaCode,
    #[serde(alias = "address")]
    wallet_address: Address,
    #[serde(alias = "to")]
    to_address: Address,
    /// Wei.
    amount: Amount,
    memo: Option<Bounded<500>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransferErc20Request {
    password: Password,
    mfa_code: MfaCode,
    #[serde(alias = "address")]
    wallet_address: Address,
    token_address: Address,
    #[serde(alias = "to")]
    to_address: Address,
    /// The token's base units.
    amount: Amount,
    memo: Option<Bounded<500>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContractCallRequest {
    password: Password,
    mfa_code: MfaCode,
    #[serde(alias = "address")]
    wallet_address: Address,
    #[serde(alias = "to")]
    contract_address: Address,
    contract_abi: Option<Value>,
    function_name: Option<Bounded<256>>,
    function_args: Option<Vec<Value>>,
    data: Option<HexBytes>,
    value: Option<Amount>,
    memo: Option<Bounded<500>>,
}

/// What every user-initiated request carries besides the call itself.
struct Request {
    user: AuthUser,
    request_id: String,
    wallet_address: Address,
    password: Password,
    mfa_code: MfaCode,
    memo: Option<Bounded<500>>,
    purpose: &'static str,
}

pub async fn transfer(
    State(state): State<AppState>,
    user: AuthUser,
    RequestId(request_id): RequestId,
    Idempotent { key, body }: Idempotent<TransferRequest>,
) -> ApiResult<Response> {
    let scope = Scope::user(&user);
    let call = Call::native(not_zero(body.to_address, "to_address")?, body.amount);
    let request = Request {
        user,
        request_id,
        wallet_address: body.wallet_address,
        password: body.password,
        mfa_code: body.mfa_code,
        memo: body.memo,
        purpose: "transfer",
    };
    Ok(key.run(&state, scope, run(&state, request, call)).await)
}

pub async fn transfer_erc20(
    State(state): State<AppState>,
    user: AuthUser,
    RequestId(request_id): RequestId,
    Idempotent { key, body }: Idempotent<TransferErc20Request>,
) -> ApiResult<Response> {
    let scope = Scope::user(&user);
    let call = Call::erc20_transfer(
        not_zero(body.token_address, "token_address")?,
        not_zero(body.to_address, "to_address")?,
        body.amount,
    );
    let request = Request {
        user,
        request_id,
        wallet_address: body.wallet_address,
        password: body.password,
        mfa_code: body.mfa_code,
        memo: body.memo,
        purpose: "transfer_erc20",
    };
    Ok(key.run(&state, scope, run(&state, request, call)).await)
}

pub async fn contract_call(
    State(state): State<AppState>,
    user: AuthUser,
    RequestId(request_id): RequestId,
    Idempotent { key, body }: Idempotent<ContractCallRequest>,
) -> Response {
    let scope = Scope::user(&user);
    key.run(
        &state,
        scope,
        contract_call_once(&state, user, request_id, body),
    )
    .await
}

async fn contract_call_once(
    state: &AppState,
    user: AuthUser,
    request_id: String,
    body: ContractCallRequest,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let (data, abi) = CallData {
        data: body.data.as_ref(),
        contract_abi: body.contract_abi.as_ref(),
        function_name: body.function_name.as_ref().map(|n| n.0.as_str()),
        function_args: body.function_args.as_deref(),
    }
    .encode()?;
    let value = body.value.unwrap_or_else(Amount::zero);
    let call = Call::contract(
        not_zero(body.contract_address, "contract_address")?,
        value,
        data,
        abi,
    );
    let request = Request {
        user,
        request_id,
        wallet_address: body.wallet_address,
        password: body.password,
        mfa_code: body.mfa_code,
        memo: body.memo,
        purpose: "contract_call",
    };
    run(state, request, call).await
}

/// Check the wallet, the password and the simulation (nothing recorded and no code spent if
/// any fails), spend the code, then record Prepared and Authorized and execute.
async fn run(
    state: &AppState,
    request: Request,
    call: Call,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Request {
        user,
        request_id,
        wallet_address,
        password,
        mfa_code,
        memo,
        purpose,
    } = request;
    let caller = Caller::User(user);
    let wallet = visible_wallet(state, &caller, &wallet_address).await?;
    let Caller::User(user) = caller else {
        unreachable!("constructed as a user above")
    };
    require_password(state, &user.user_id, password).await?;
    let payload = call.payload(wallet.chain_id, wallet.wallet_address);
    let explained = explain(&state.chain, &call, &payload).await;
    match &explained.simulation.outcome {
        SimulationOutcome::Success => {}
        SimulationOutcome::Reverted { reason } => {
            return Err(ApiError::conflict(
                "simulation_failed",
                format!("simulation failed: {reason} (nothing was recorded or signed)"),
            ))
        }
        SimulationOutcome::Unavailable { reason } => {
            return Err(ApiError::chain_unavailable(reason));
        }
    }
    use_mfa_code(state, &user, mfa_code, purpose, &request_id).await?;

    let initiator = Initiator::User {
        user_id: user.user_id.clone(),
    };
    let actor = user.actor();
    let summary = explained.summary.clone();
    let prompt = Prompt {
        initiator: initiator.clone(),
        call,
        explained,
        memo: memo.map(|m| m.0),
        expires_in: time::Duration::seconds(state.default_expiry.as_secs() as i64),
    };
    let (transaction_id, _) =
        record_prepared(state, &wallet, prompt, &actor, &request_id, Vec::new()).await?;
    record_authorization(state, &user, &transaction_id, &request_id).await?;
    let executor = Executor {
        initiator,
        actor: &actor,
        request_id: &request_id,
    };
    let view = match execute_authorized(state, &transaction_id, &executor).await {
        Ok(view) => view,
        Err(e) => {
            abandon_if_unsigned(state, &transaction_id, &e, &executor).await;
            return Err(ApiError {
                message: format!("{} (transaction {transaction_id})", e.message),
                ..e
            });
        }
    };
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "transaction_id": transaction_id,
            "tx_hash": view.tx_hash,
            "status": view.status,
            "summary": summary,
        })),
    ))
}

/// Only the user could execute their own transaction, and they cannot retry this request with
/// the same id: one that could not even be signed (e.g. the node went away) is failed rather
/// than left authorized forever.
async fn abandon_if_unsigned(
    state: &AppState,
    transaction_id: &str,
    error: &ApiError,
    executor: &Executor<'_>,
) {
    let view: Option<TransactionView> = state
        .db
        .view(ViewKind::Transaction, transaction_id)
        .await
        .ok()
        .flatten();
    if view.is_none_or(|v| v.status != "authorized") {
        return;
    }
    let command = TransactionCommand::Fail {
        reason: format!("execution could not start: {}", error.message),
        now: OffsetDateTime::now_utc(),
    };
    if let Err(e) = state
        .execute(
            &state.transactions,
            transaction_id,
            command,
            executor.actor,
            executor.request_id,
        )
        .await
    {
        tracing::warn!(error = %e.message, transaction_id, "could not record the failed execution");
    }
}
