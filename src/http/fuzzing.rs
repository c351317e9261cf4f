//! Entry point for the `decode_request` fuzz target in `fuzz/` (not an API: hidden from the
//! docs). Bytes go through exactly the decoding a request gets before any state is read: the
//! JSON body of every endpoint that takes one, the query string of every endpoint that takes
//! one, and for a prepare the shaping into the call to sign (ABI encoding included) and its
//! description for the prompt. Chain answers an outsider controls are decoded too: revert data
//! and a token's decimals. Every input must end in a value or a 4xx [`ApiError`], never a
//! panic and never a 5xx.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use aggregates::transaction::summary::{self, Erc20Call, TokenInfo};
use aggregates::Address;
use axum::extract::FromRequestParts;
use axum::http::{Request, Uri};
use serde::de::DeserializeOwned;

use super::error::{ApiError, ApiResult};
use super::extract::{parse_json, ApiQuery};
use super::{api_keys, audit, sessions, transactions, transfers, users, wallets, ws};
use crate::abi::{decode_revert, describe_call};
use crate::explain::Call;

/// Feed `bytes` to every request decoder the server has. Panics only on a bug: a decoder
/// that panics, or one that answers a 5xx to bad input.
pub fn decode_any(bytes: &[u8]) {
    body::<users::RegisterRequest>(bytes);
    body::<users::LoginRequest>(bytes);
    body::<users::SetupMfaRequest>(bytes);
    body::<users::ConfirmMfaRequest>(bytes);
    body::<sessions::ChangePasswordRequest>(bytes);
    body::<wallets::CreateWalletRequest>(bytes);
    body::<wallets::LoadWalletRequest>(bytes);
    body::<api_keys::IssueRequest>(bytes);
    body::<transactions::AuthorizeRequest>(bytes);
    body::<transactions::AuthorizeManyRequest>(bytes);
    body::<transactions::RejectRequest>(bytes);
    body::<transactions::ExecuteRequest>(bytes);
    body::<transfers::TransferRequest>(bytes);
    body::<transfers::TransferErc20Request>(bytes);
    body::<transfers::ContractCallRequest>(bytes);
    if let Some(prepare) = body::<transactions::PrepareRequest>(bytes) {
        if let Some(call) = client_error(transactions::shape(&prepare)) {
            describe(&call, bytes);
        }
    }
    query::<transactions::StatusQuery>(bytes);
    query::<transactions::ListQuery>(bytes);
    query::<audit::EventsQuery>(bytes);
    query::<audit::VerifyQuery>(bytes);
    query::<ws::WsQuery>(bytes);
    query::<ws::WaitQuery>(bytes);
    // A contract chooses its revert data.
    let _ = decode_revert(bytes);
}

fn body<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    client_error(parse_json(bytes))
}

/// `bytes` as a query string, through the same extractor as the routes. Only what can reach
/// a handler is tried: a query that makes a valid URI.
fn query<T: DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    let uri: Uri = format!("/?{}", std::str::from_utf8(bytes).ok()?)
        .parse()
        .ok()?;
    let (mut parts, ()) = Request::builder().uri(uri).body(()).ok()?.into_parts();
    let extracted = run_now(ApiQuery::<T>::from_request_parts(&mut parts, &()));
    client_error(extracted).map(|ApiQuery(query)| query)
}

fn client_error<T>(result: ApiResult<T>) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(ApiError {
            status,
            code,
            message,
            ..
        }) => {
            assert!(
                status.is_client_error(),
                "bad input answered {status} {code}: {message}"
            );
            None
        }
    }
}

/// What the prompt shows for `call`, with token decimals and revert data taken from `bytes`
/// (a token contract answers `decimals()` and reverts as it likes).
fn describe(call: &Call, bytes: &[u8]) {
    let payload = call.payload(1, Address::from_bytes([0x11; 20]));
    let _ = payload.digest();
    let token = TokenInfo::new(Some("TOK"), bytes.last().copied());
    if let Some(erc20) = Erc20Call::decode(payload.data.as_slice()) {
        let _ = summary::erc20_call_with_value(&payload.to, &token, &erc20, &payload.value);
        let _ = summary::erc20_call(&payload.to, &token, &erc20);
    }
    if let Some((abi, function)) = &call.abi {
        if let Some(decoded) = describe_call(function, payload.data.as_slice()) {
            let _ = summary::decoded_call(&payload.to, &payload.value, &decoded);
        }
        let _ = abi.describe_error(bytes);
    }
    let _ = summary::raw_call(&payload.to, &payload.value, &payload.data);
    let _ = summary::native_transfer(&payload.to, &payload.value);
}

/// Extractors here never wait (no body, no IO): one poll finishes them.
fn run_now<F: Future>(future: F) -> F::Output {
    match pin!(future).poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(output) => output,
        Poll::Pending => panic!("a query extractor waited"),
    }
}
