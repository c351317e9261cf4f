//! The adversarial suite: hostile requests against the running server (real app on port 0,
//! real SQLite / PostgreSQL, real anvil), one table of cases run against one app per backend.
//!
//! Every case asserts the HTTP status, the JSON error code (and field where one input is to
//! blame), and that *nothing changed*: the event log's head, every application table's row
//! count, every view's position, the chain (block number and balances) and the target
//! transactions are compared before and after. The only tolerated changes are named by the
//! case: the `LoginFailed` / `MfaCodeRejected` events that record an attack by design (each
//! checked to carry the attacker's real address), or a WebSocket ticket used up.
//!
//! Each case comes from its own loopback address, so per-address limits treat every case as
//! a different attacker, and rate-limit cases can exhaust a limit without touching the rest.
//!
//! Cases that already exist elsewhere are not repeated here: token validation basics
//! (security.rs), a wrong or replayed code on `authorize_transaction`, cross-tenant status,
//! authorize, reject, events, load_wallet and prepare, revoked keys on prepare/status/wallets,
//! bad amounts and addresses on `prepare_transaction` (negative.rs).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use futures::StreamExt;
use reqwest::header::{HeaderName, HeaderValue};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::helpers::*;
use crate::on_both_backends;

on_both_backends!(adversarial_suite);

/// Removing cases below this fails the suite.
const MIN_CASES: usize = 100;
const ETH: u128 = 1_000_000_000_000_000_000;
const ZERO_ADDRESS: &str = "0x0000000000000000000000000000000000000000";
/// 2^256: one more than any EVM word holds.
const TWO_POW_256: &str =
    "115792089237316195423570985008687907853269984665640564039457584007913129639936";

// ---------------------------------------------------------------------------------------------
// The world the attackers live in

/// Alice and Bob are tenants with MFA, a funded wallet, an agent key and a pending
/// transaction each. Alice also has a revoked key; Bob a key that a case revokes. Dave takes
/// the wrong codes (so brute-force cases never lock anyone else out); Carol has no MFA.
struct Fixture {
    alice: TestUser,
    alice_wallet: String,
    alice_agent: Agent,
    alice_revoked: Agent,
    ta: String,
    bob: TestUser,
    bob_wallet: String,
    bob_agent: Agent,
    bob_doomed: Agent,
    tb: String,
    dave: TestUser,
    td: String,
    carol: TestUser,
}

impl Fixture {
    async fn new(app: &TestApp) -> Self {
        let (mut alice, alice_wallet, alice_agent) = app.user_with_wallet("alice", ETH).await;
        let ta = app
            .prepare(&alice_agent, native_body(&alice_wallet, RECIPIENT, 1000))
            .await;
        let alice_revoked = app.issue_api_key(&mut alice, "revoked", None).await;
        let (status, body) = app
            .delete(
                &format!("/api/api_keys/{}", alice_revoked.id),
                &alice.auth(),
            )
            .await;
        assert_eq!(status.as_u16(), 204, "{body}");

        let (mut bob, bob_wallet, bob_agent) = app.user_with_wallet("bob", ETH).await;
        let tb = app
            .prepare(&bob_agent, native_body(&bob_wallet, RECIPIENT, 2000))
            .await;
        let bob_doomed = app.issue_api_key(&mut bob, "doomed", None).await;

        let (dave, dave_wallet, dave_agent) = app.user_with_wallet("dave", 0).await;
        let td = app
            .prepare(&dave_agent, native_body(&dave_wallet, RECIPIENT, 3000))
            .await;
        let carol = app.register("carol").await;
        Self {
            alice,
            alice_wallet,
            alice_agent,
            alice_revoked,
            ta,
            bob,
            bob_wallet,
            bob_agent,
            bob_doomed,
            tb,
            dave,
            td,
            carol,
        }
    }

    fn user(&self, who: Who) -> &TestUser {
        match who {
            Who::Alice => &self.alice,
            Who::Bob => &self.bob,
            Who::Dave => &self.dave,
        }
    }

    fn user_mut(&mut self, who: Who) -> &mut TestUser {
        match who {
            Who::Alice => &mut self.alice,
            Who::Bob => &mut self.bob,
            Who::Dave => &mut self.dave,
        }
    }

    /// Everything of Alice's (and Carol's and Dave's) that Bob must never see.
    fn not_bobs(&self) -> Vec<String> {
        vec![
            self.alice.user_id.clone(),
            self.alice_wallet.clone(),
            self.alice_agent.id.clone(),
            self.alice_revoked.id.clone(),
            self.ta.clone(),
            self.carol.user_id.clone(),
            self.dave.user_id.clone(),
            self.td.clone(),
        ]
    }
}

#[derive(Clone, Copy, Debug)]
enum Who {
    Alice,
    Bob,
    Dave,
}

/// The step of the user's last spent code (the helper keeps it private; a code identifies it).
fn last_step(user: &TestUser) -> Option<u64> {
    let now = current_step();
    let last = user.last_code();
    (now.saturating_sub(8)..=now + 1)
        .rev()
        .find(|s| user.code_at(*s) == last)
}

/// A code the server would accept now and has not seen: for cases that must be refused
/// *before* the code is looked at (a spent or rejected code would show up as a new event).
fn unspent_code(user: &TestUser) -> String {
    let now = current_step();
    let step = last_step(user).map_or(now, |l| (l + 1).max(now.saturating_sub(1)));
    user.code_at(step.min(now + 1))
}

// ---------------------------------------------------------------------------------------------
// Cases

enum Setup {
    None,
    /// Make sure `{spent:who}` is a code the server has accepted within the last step.
    SpentCode(Who),
    /// `{ticket}`: a fresh WebSocket ticket issued to these headers.
    Ticket(Vec<(String, Vec<u8>)>),
    /// `{ticket}`: a ticket already used once to open a socket.
    SpentTicket(Vec<(String, Vec<u8>)>),
    /// `{ticket}`: issued to Bob's doomed key, which is then revoked.
    TicketThenRevoke,
    /// This request sent first, `times` times from the case's address (`{n}` in it counts),
    /// each answered `status`; the last answer is what [`Expect::AsSetup`] compares with.
    Send(Http, usize, u16),
    /// `{token}`: a fresh access token of Bob's, then logged out.
    LoggedOut,
    /// `{ticket}`: issued for a fresh token of Bob's, which is then logged out.
    TicketThenLogout,
    /// `{token}`: Carol's access token from before she changed her password.
    PasswordChanged,
}

#[derive(Clone)]
struct Http {
    method: Method,
    path: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Option<Vec<u8>>,
}

impl Http {
    fn new(method: Method, path: impl Into<String>) -> Self {
        Self {
            method,
            path: path.into(),
            headers: vec![],
            body: None,
        }
    }

    fn auth(mut self, cred: &Cred) -> Self {
        self.headers.extend(cred.headers());
        self
    }

    fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    fn json(self, body: Value) -> Self {
        self.raw(body.to_string())
    }

    /// A body sent as `application/json` whatever it holds.
    fn raw(self, body: impl Into<Vec<u8>>) -> Self {
        self.typed("application/json", body)
    }

    fn typed(mut self, content_type: &str, body: impl Into<Vec<u8>>) -> Self {
        self.headers
            .push(("content-type".into(), content_type.as_bytes().to_vec()));
        self.body = Some(body.into());
        self
    }
}

fn get(path: impl Into<String>) -> Http {
    Http::new(Method::GET, path)
}

fn post(path: impl Into<String>) -> Http {
    Http::new(Method::POST, path)
}

fn delete(path: impl Into<String>) -> Http {
    Http::new(Method::DELETE, path)
}

enum Request {
    Http(Http),
    /// Bytes written to a raw TCP connection (what no well-behaved client would send).
    Tcp(Vec<u8>),
    /// A WebSocket upgrade to `/api/ws{query}`.
    Ws {
        query: String,
        headers: Vec<(String, Vec<u8>)>,
    },
}

impl From<Http> for Request {
    fn from(h: Http) -> Self {
        Request::Http(h)
    }
}

fn ws(query: impl Into<String>, cred: &Cred) -> Request {
    Request::Ws {
        query: query.into(),
        headers: cred.headers(),
    }
}

type Check = Box<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;

enum Expect {
    /// A JSON error: status, code and (when given) the field named.
    Error {
        status: u16,
        code: &'static str,
        field: Option<String>,
    },
    /// Refused below the application (the HTTP parser): a bare status, no JSON possible.
    Bare(u16),
    /// Answered, but what it shows must pass the check (no other tenant's data).
    Json(u16, Check),
    /// A socket opened; the replayed events (up to `caught_up`) must pass the check.
    Replay(Check),
    /// Exactly the setup's last answer again (an idempotent replay).
    AsSetup,
}

fn err(status: u16, code: &'static str) -> Expect {
    Expect::Error {
        status,
        code,
        field: None,
    }
}

fn err_at(status: u16, code: &'static str, field: &str) -> Expect {
    Expect::Error {
        status,
        code,
        field: Some(field.to_owned()),
    }
}

fn invalid(field: &str) -> Expect {
    err_at(400, "invalid_field", field)
}

/// What a case may change: nothing, or exactly these events appended (a refused login's
/// `LoginFailed`, a wrong code's `MfaCodeRejected`: the history of attacks is kept), each
/// recording the attacker's real address, with no other table, chain or transaction change.
#[derive(Clone, Copy, PartialEq)]
enum Effect {
    Nothing,
    Records(&'static [&'static str]),
    /// The case's WebSocket ticket is used up (by the socket it opened, or the refused try).
    ConsumesTicket,
}

const LOGIN_FAILED: Effect = Effect::Records(&["LoginFailed"]);
const CODE_REJECTED: Effect = Effect::Records(&["MfaCodeRejected"]);

struct Case {
    name: &'static str,
    setup: Setup,
    send: Request,
    expect: Expect,
    effect: Effect,
    /// Sent this many times, each answer checked (brute force).
    repeat: usize,
}

fn case(name: &'static str, send: impl Into<Request>, expect: Expect) -> Case {
    Case {
        name,
        setup: Setup::None,
        send: send.into(),
        expect,
        effect: Effect::Nothing,
        repeat: 1,
    }
}

impl Case {
    fn setup(mut self, setup: Setup) -> Self {
        self.setup = setup;
        self
    }

    fn effect(mut self, effect: Effect) -> Self {
        self.effect = effect;
        self
    }

    fn repeat(mut self, n: usize) -> Self {
        self.repeat = n;
        self
    }
}

/// Credentials as headers (anything, including what a real client would never send).
#[derive(Clone)]
enum Cred {
    None,
    Bearer(String),
    Key(String),
    Headers(Vec<(String, Vec<u8>)>),
}

impl Cred {
    fn headers(&self) -> Vec<(String, Vec<u8>)> {
        match self {
            Cred::None => vec![],
            Cred::Bearer(t) => vec![("authorization".into(), format!("Bearer {t}").into())],
            Cred::Key(k) => vec![("x-api-key".into(), k.clone().into())],
            Cred::Headers(h) => h.clone(),
        }
    }
}

fn user_cred(u: &TestUser) -> Cred {
    Cred::Bearer(u.token.clone())
}

fn key_cred(a: &Agent) -> Cred {
    Cred::Key(a.key.clone())
}

// ---------------------------------------------------------------------------------------------
// Forged tokens

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(message);
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// A JWT with any header and claims, signed HMAC-SHA256 with `key` whatever the header says.
fn forge(header: &Value, claims: &Value, key: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = hmac_sha256(key, input.as_bytes());
    format!("{input}.{}", b64(&signature))
}

fn hs256() -> Value {
    json!({"alg": "HS256", "typ": "JWT"})
}

/// The claims of a real token (whatever the server puts there), to alter one at a time.
fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

fn with(mut value: Value, key: &str, v: Value) -> Value {
    value[key] = v;
    value
}

fn without(mut value: Value, key: &str) -> Value {
    value.as_object_mut().unwrap().remove(key);
    value
}

fn unix_now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Replace one segment of a real token, keeping the other two (so its signature is genuine).
fn splice(token: &str, index: usize, segment: &str) -> String {
    let mut parts: Vec<&str> = token.split('.').collect();
    parts[index] = segment;
    parts.join(".")
}

// ---------------------------------------------------------------------------------------------
// The table

/// A body with one key changed.
fn set(body: &Value, key: &str, v: Value) -> Value {
    with(body.clone(), key, v)
}

/// Flip the case of the first letter of a checksummed address (a broken EIP-55 checksum).
fn bad_checksum(address: &str) -> String {
    let hex = &address[2..];
    let i = hex.find(|c: char| c.is_ascii_alphabetic()).unwrap();
    let mut chars: Vec<char> = hex.chars().collect();
    chars[i] = if chars[i].is_ascii_uppercase() {
        chars[i].to_ascii_lowercase()
    } else {
        chars[i].to_ascii_uppercase()
    };
    format!("0x{}", chars.into_iter().collect::<String>())
}

fn nested(depth: usize, open: &str, close: &str) -> String {
    format!("{}{}", open.repeat(depth), close.repeat(depth))
}

/// A check that an answer's list at `pointer` holds exactly `ids` under `key`.
fn exactly(pointer: &'static str, key: &'static str, ids: Vec<String>) -> Check {
    Box::new(move |body| {
        let got: BTreeSet<String> = body
            .pointer(pointer)
            .and_then(Value::as_array)
            .ok_or_else(|| format!("no list at {pointer}"))?
            .iter()
            .map(|v| v[key].as_str().unwrap_or_default().to_owned())
            .collect();
        let want: BTreeSet<String> = ids.iter().cloned().collect();
        (got == want)
            .then_some(())
            .ok_or_else(|| format!("{pointer}: expected {want:?}, got {got:?}"))
    })
}

/// A check that none of `secrets` occurs anywhere in the answer, and `must` does (so an
/// empty answer cannot pass for a safe one).
fn none_of(secrets: Vec<String>, must: Option<String>) -> Check {
    Box::new(move |body| {
        let text = body.to_string();
        if let Some(leak) = secrets.iter().find(|s| text.contains(s.as_str())) {
            return Err(format!("leaked {leak}"));
        }
        match &must {
            Some(m) if !text.contains(m.as_str()) => Err(format!("{m} missing: vacuous answer")),
            _ => Ok(()),
        }
    })
}

fn cases(fx: &Fixture, jwt_secret: &str) -> Vec<Case> {
    let alice = user_cred(&fx.alice);
    let bob = user_cred(&fx.bob);
    let dave = user_cred(&fx.dave);
    let carol = user_cred(&fx.carol);
    let alice_agent = key_cred(&fx.alice_agent);
    let bob_agent = key_cred(&fx.bob_agent);
    let revoked = key_cred(&fx.alice_revoked);
    let (ta, tb, td) = (fx.ta.as_str(), fx.tb.as_str(), fx.td.as_str());
    let (aw, bw) = (fx.alice_wallet.as_str(), fx.bob_wallet.as_str());
    let secret = jwt_secret.as_bytes();
    let claims = claims_of(&fx.alice.token);
    let now = unix_now();
    let not_bobs = fx.not_bobs();
    let forged = |claims: &Value| Cred::Bearer(forge(&hs256(), claims, secret));
    let alice_with = |segment: usize, value: &Value| {
        Cred::Bearer(splice(
            &fx.alice.token,
            segment,
            &b64(value.to_string().as_bytes()),
        ))
    };

    let reject_ta = json!({"transaction_id": ta, "reason": "forged"});
    let authorize_ta = json!({"transaction_id": ta, "mfa_code": "{code:alice}"});
    let native_a = native_body(aw, RECIPIENT, 1);
    let native_b = native_body(bw, RECIPIENT, 1);
    let erc20_b = json!({"wallet_address": bw, "kind": "erc20", "token_address": RECIPIENT,
                         "to": RECIPIENT, "amount": "1"});
    let call_b = json!({"wallet_address": bw, "kind": "contract_call", "to": RECIPIENT,
                        "data": "0xd0e30db0"});
    let transfer_b = json!({"password": PASSWORD, "mfa_code": "{code:bob}", "wallet_address": bw,
                            "to_address": RECIPIENT, "amount": "1"});
    let transfer_erc20_b = json!({"password": PASSWORD, "mfa_code": "{code:bob}",
                                  "wallet_address": bw, "token_address": RECIPIENT,
                                  "to_address": RECIPIENT, "amount": "1"});
    let contract_call_b = json!({"password": PASSWORD, "mfa_code": "{code:bob}",
                                 "wallet_address": bw, "contract_address": RECIPIENT,
                                 "data": "0xd0e30db0"});
    let prepare_b = |body: Value| post("/api/prepare_transaction").auth(&bob_agent).json(body);
    let bob_native = |key: &str, v: Value| prepare_b(set(&native_b, key, v));
    let bob_raw_native = |tail: &str| {
        post("/api/prepare_transaction")
            .auth(&bob_agent)
            .raw(format!(
                r#"{{"wallet_address":"{bw}","kind":"native","to":"{RECIPIENT}",{tail}}}"#
            ))
    };
    let bob_transfer = |key: &str, v: Value| {
        post("/api/transfer")
            .auth(&bob)
            .json(set(&transfer_b, key, v))
    };
    let big = "x".repeat(64 * 1024);

    let mut cases = vec![
        // ---- Replayed and brute-forced TOTP (first: the spent codes are fresh) ------------
        case(
            "replayed code on api key issuance",
            post("/api/api_keys").auth(&alice)
                .json(json!({"name": "replay", "mfa_code": "{spent:alice}"})),
            err_at(403, "mfa_code_replayed", "mfa_code"),
        )
        .setup(Setup::SpentCode(Who::Alice)),
        case(
            "replayed code on authorize_transactions",
            post("/api/authorize_transactions").auth(&alice)
                .json(json!({"transaction_ids": [ta], "mfa_code": "{spent:alice}"})),
            err_at(403, "mfa_code_replayed", "mfa_code"),
        )
        .setup(Setup::SpentCode(Who::Alice)),
        case(
            "replayed code on a user transfer",
            post("/api/transfer").auth(&alice).json(json!({"password": PASSWORD,
                "mfa_code": "{spent:alice}", "wallet_address": aw, "to_address": RECIPIENT,
                "amount": "1"})),
            err_at(403, "mfa_code_replayed", "mfa_code"),
        )
        .setup(Setup::SpentCode(Who::Alice)),
        case(
            "replayed code to replace MFA",
            post("/api/setup_mfa").auth(&alice)
                .json(json!({"password": PASSWORD, "mfa_code": "{spent:alice}"})),
            err_at(403, "mfa_code_replayed", "mfa_code"),
        )
        .setup(Setup::SpentCode(Who::Alice)),
        case(
            "brute-forced codes on authorize (below the lockout)",
            post("/api/authorize_transaction").auth(&dave)
                .json(json!({"transaction_id": td, "mfa_code": "{wrong:dave}"})),
            err_at(403, "invalid_mfa_code", "mfa_code"),
        )
        .repeat(3)
        .effect(Effect::Records(&["MfaCodeRejected"; 3])),
        case(
            "another user's valid code to replace MFA",
            post("/api/setup_mfa").auth(&dave)
                .json(json!({"password": PASSWORD, "mfa_code": "{code:bob}"})),
            err_at(403, "invalid_mfa_code", "mfa_code"),
        )
        .effect(CODE_REJECTED),
        case(
            "MFA replacement with a null code",
            post("/api/setup_mfa").auth(&alice)
                .json(json!({"password": PASSWORD, "mfa_code": null})),
            err_at(403, "mfa_code_required", "mfa_code"),
        ),
        case(
            "MFA replacement with a valid code but the wrong password spends nothing",
            post("/api/setup_mfa").auth(&alice)
                .json(json!({"password": "not the password at all", "mfa_code": "{code:alice}"})),
            err_at(403, "invalid_password", "password"),
        ),
        case(
            "MFA enrolment choosing its own secret",
            post("/api/setup_mfa").auth(&carol)
                .json(json!({"password": PASSWORD, "secret": "JBSWY3DPEHPK3PXP"})),
            invalid("secret"),
        ),
        case(
            "confirm_mfa naming another user",
            post("/api/confirm_mfa").auth(&carol)
                .json(json!({"mfa_code": "123456", "user_id": fx.alice.user_id})),
            invalid("user_id"),
        ),
        case("code of five digits",
            post("/api/authorize_transaction").auth(&alice).json(set(&authorize_ta, "mfa_code", json!("12345"))),
            invalid("mfa_code")),
        case("code of seven digits",
            post("/api/authorize_transaction").auth(&alice).json(set(&authorize_ta, "mfa_code", json!("1234567"))),
            invalid("mfa_code")),
        case("code with a letter",
            post("/api/authorize_transaction").auth(&alice).json(set(&authorize_ta, "mfa_code", json!("12345a"))),
            invalid("mfa_code")),
        case("code as a JSON number",
            post("/api/authorize_transaction").auth(&alice).json(set(&authorize_ta, "mfa_code", json!(123456))),
            invalid("mfa_code")),
        case("code padded with a space",
            post("/api/authorize_transaction").auth(&alice).json(set(&authorize_ta, "mfa_code", json!(" 12345"))),
            invalid("mfa_code")),
        case("code in full-width digits",
            post("/api/authorize_transaction").auth(&alice).json(set(&authorize_ta, "mfa_code", json!("１２３４５６"))),
            invalid("mfa_code")),
        case("empty code",
            post("/api/authorize_transaction").auth(&alice).json(set(&authorize_ta, "mfa_code", json!(""))),
            invalid("mfa_code")),
        case("null code",
            post("/api/authorize_transaction").auth(&alice).json(set(&authorize_ta, "mfa_code", json!(null))),
            invalid("mfa_code")),

        // ---- Forged tokens (each against a state-changing endpoint) -------------------------
        case("token signed with another secret",
            post("/api/reject_transaction")
                .auth(&Cred::Bearer(forge(&hs256(), &claims, b"guessed-secret-guessed-secret-123")))
                .json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("alg none with an empty signature",
            post("/api/authorize_transaction")
                .auth(&Cred::Bearer(format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#),
                    b64(claims.to_string().as_bytes()))))
                .json(authorize_ta.clone()),
            err(401, "unauthorized")),
        case("alg nOnE keeping the genuine signature",
            post("/api/reject_transaction").auth(&alice_with(0, &json!({"alg": "nOnE", "typ": "JWT"})))
                .json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("RS256 header, HMAC-signed with the server secret (key confusion)",
            post("/api/create_wallet")
                .auth(&Cred::Bearer(forge(&json!({"alg": "RS256", "typ": "JWT"}), &claims, secret)))
                .json(json!({"password": PASSWORD})),
            err(401, "unauthorized")),
        case("ES256 header, HMAC-signed with the server secret",
            post("/api/api_keys")
                .auth(&Cred::Bearer(forge(&json!({"alg": "ES256", "typ": "JWT"}), &claims, secret)))
                .json(json!({"name": "forged", "mfa_code": "{code:alice}"})),
            err(401, "unauthorized")),
        case("HS512 header over an HS256 signature",
            post("/api/reject_transaction").auth(&alice_with(0, &json!({"alg": "HS512", "typ": "JWT"})))
                .json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("expired one second ago (no leeway)",
            post("/api/reject_transaction").auth(&forged(&with(claims.clone(), "exp", json!(now - 1))))
                .json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("token expiry as a string",
            post("/api/reject_transaction").auth(&forged(&with(claims.clone(), "exp", json!("9999999999"))))
                .json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("not valid for another ten minutes",
            get("/api/transactions").auth(&forged(&with(claims.clone(), "nbf", json!(now + 600)))),
            err(401, "unauthorized")),
        case("audience list without ours",
            post("/api/reject_transaction").auth(&forged(&with(claims.clone(), "aud", json!(["evil", "other"]))))
                .json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("issuer differing only in case",
            post("/api/reject_transaction").auth(&forged(&with(claims.clone(), "iss", json!("Countersign"))))
                .json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("payload swapped to Bob under Alice's genuine signature",
            post("/api/reject_transaction").auth(&alice_with(1, &with(claims.clone(), "sub", json!(fx.bob.user_id))))
                .json(json!({"transaction_id": tb})),
            err(401, "unauthorized")),
        case("expiry extended under the genuine signature",
            post("/api/reject_transaction").auth(&alice_with(1, &with(claims.clone(), "exp", json!(now + 86_400 * 365))))
                .json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("subject of the wrong type",
            get("/api/me").auth(&forged(&with(claims.clone(), "sub", json!(1)))),
            err(401, "unauthorized")),
        case("empty subject",
            post("/api/ws_ticket").auth(&forged(&with(claims.clone(), "sub", json!("")))),
            err(401, "unauthorized")),
        case("Bob's id signed with a guessed secret",
            post("/api/reject_transaction")
                .auth(&Cred::Bearer(forge(&hs256(), &with(claims.clone(), "sub", json!(fx.bob.user_id)), b"secret")))
                .json(json!({"transaction_id": tb})),
            err(401, "unauthorized")),
        case("missing token id",
            post("/api/reject_transaction").auth(&forged(&without(claims.clone(), "jti"))).json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("kid header pointing at /dev/null, signed with an empty key",
            post("/api/reject_transaction")
                .auth(&Cred::Bearer(forge(&json!({"alg": "HS256", "kid": "../../../../dev/null"}), &claims, b"")))
                .json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("embedded jwk header with the attacker's key",
            post("/api/reject_transaction")
                .auth(&Cred::Bearer(forge(&json!({"alg": "HS256", "jwk": {"kty": "oct", "k": b64(b"attacker")}}),
                    &claims, b"attacker")))
                .json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("four segments",
            post("/api/reject_transaction").auth(&Cred::Bearer(format!("{}.extra", fx.alice.token)))
                .json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("dots only", get("/api/me").auth(&Cred::Bearer("....".into())), err(401, "unauthorized")),
        case("a valid user token presented as an API key",
            post("/api/prepare_transaction").auth(&Cred::Key(fx.alice.token.clone())).json(native_a.clone()),
            err(401, "unauthorized")),
        case("Bearer scheme twice",
            post("/api/reject_transaction")
                .auth(&Cred::Headers(vec![("authorization".into(), format!("Bearer Bearer {}", fx.alice.token).into())]))
                .json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("token in the query string",
            get(format!("/api/me?access_token={}", fx.alice.token)),
            err(401, "unauthorized")),
        case("forged token first among two Authorization headers",
            post("/api/reject_transaction")
                .auth(&Cred::Headers(vec![
                    ("authorization".into(), format!("Bearer {}", forge(&hs256(), &claims, b"nope")).into()),
                    ("authorization".into(), format!("Bearer {}", fx.alice.token).into()),
                ]))
                .json(reject_ta.clone()),
            err(401, "unauthorized")),

        // ---- Cross-tenant: Bob (and his agent) with Alice's ids, on every endpoint ----------
        case("Bob batch-authorizes Alice's transaction",
            post("/api/authorize_transactions").auth(&bob)
                .json(json!({"transaction_ids": [ta], "mfa_code": "{code:bob}"})),
            err_at(404, "not_found", "transaction_ids[0]")),
        case("Bob slips Alice's transaction into a batch with his own",
            post("/api/authorize_transactions").auth(&bob)
                .json(json!({"transaction_ids": [tb, ta], "mfa_code": "{code:bob}"})),
            err_at(404, "not_found", "transaction_ids[1]")),
        case("Bob rejects Alice's transaction by its upper-case id",
            post("/api/reject_transaction").auth(&bob).json(json!({"transaction_id": ta.to_uppercase()})),
            err(404, "not_found")),
        case("Bob transfers from Alice's wallet",
            post("/api/transfer").auth(&bob).json(set(&transfer_b, "wallet_address", json!(aw))),
            err_at(404, "not_found", "wallet_address")),
        case("Bob transfers tokens from Alice's wallet",
            post("/api/transfer_erc20").auth(&bob).json(set(&transfer_erc20_b, "wallet_address", json!(aw))),
            err_at(404, "not_found", "wallet_address")),
        case("Bob calls a contract from Alice's wallet (through the `address` alias)",
            post("/api/contract_call").auth(&bob)
                .json(with(without(contract_call_b.clone(), "wallet_address"), "address", json!(aw))),
            err_at(404, "not_found", "wallet_address")),
        case("Bob long-polls Alice's transaction",
            get(format!("/api/transactions/{ta}/wait?timeout=0")).auth(&bob),
            err(404, "not_found")),
        case("Bob's agent long-polls Alice's transaction",
            get(format!("/api/transactions/{ta}/wait?timeout=0")).auth(&bob_agent),
            err(404, "not_found")),
        case("Bob's agent reads Alice's transaction history",
            get(format!("/api/transactions/{ta}/events")).auth(&bob_agent),
            err(404, "not_found")),
        case("Bob re-derives Alice's transaction through the audit API",
            get(format!("/api/audit/transactions/{ta}")).auth(&bob),
            err(404, "not_found")),
        case("Bob filters the audit log by Alice's transaction",
            get(format!("/api/audit/events?aggregate_id={ta}")).auth(&bob),
            Expect::Json(200, exactly("/events", "aggregate_id", vec![]))),
        case("Bob filters the audit log by Alice's user",
            get(format!("/api/audit/events?aggregate_type=User&aggregate_id={}", fx.alice.user_id)).auth(&bob),
            Expect::Json(200, exactly("/events", "aggregate_id", vec![]))),
        case("Bob reads the whole audit log",
            get("/api/audit/events?limit=1000").auth(&bob),
            Expect::Json(200, none_of(not_bobs.clone(), Some(fx.bob.user_id.clone())))),
        case("Bob's approval inbox",
            get("/api/transactions?status=pending_authorization").auth(&bob),
            Expect::Json(200, exactly("/transactions", "transaction_id", vec![tb.to_owned()]))),
        case("Bob's agent lists wallets",
            get("/api/wallets").auth(&bob_agent),
            Expect::Json(200, exactly("/wallets", "wallet_address", vec![bw.to_owned()]))),
        case("Bob's agent lists transactions",
            get("/api/transactions").auth(&bob_agent),
            Expect::Json(200, exactly("/transactions", "transaction_id", vec![tb.to_owned()]))),
        case("Bob scopes a key to his wallet and Alice's",
            post("/api/api_keys").auth(&bob)
                .json(json!({"name": "both", "mfa_code": "{code:bob}", "wallet_addresses": [bw, aw]})),
            err_at(404, "not_found", "wallet_addresses[1]")),
        case("Bob's agent prepares on Alice's wallet through the `address` alias",
            prepare_b(json!({"address": aw, "kind": "native", "to": RECIPIENT, "value": "1"})),
            err_at(404, "not_found", "wallet_address")),
        case("Bob's agent loads Alice's wallet through the `address` alias",
            post("/api/load_wallet").auth(&bob_agent).json(json!({"address": aw})),
            err_at(404, "not_found", "wallet_address")),
        case("Alice's agent executes Bob's transaction",
            post("/api/execute_transaction").auth(&alice_agent).json(json!({"transaction_id": tb})),
            err(404, "not_found")),
        case("Bob revokes Alice's agent key",
            delete(format!("/api/api_keys/{}", fx.alice_agent.id)).auth(&bob),
            err(404, "not_found")),
        case("Bob lists API keys",
            get("/api/api_keys").auth(&bob),
            Expect::Json(200, exactly("/api_keys", "api_key_id",
                vec![fx.bob_agent.id.clone(), fx.bob_doomed.id.clone()]))),
        case("Bob lists wallets",
            get("/api/wallets").auth(&bob),
            Expect::Json(200, exactly("/wallets", "wallet_address", vec![bw.to_owned()]))),
        case("Bob's agent puts SQL in a memo for Alice's wallet",
            post("/api/prepare_transaction").auth(&bob_agent)
                .json(set(&native_a, "memo", json!("'); DELETE FROM events; --"))),
            err_at(404, "not_found", "wallet_address")),
        case("Bob runs verification without the auditor role",
            get("/api/audit/verify").auth(&bob),
            err(403, "auditor_role_required")),
        case("Bob's agent reads the audit log",
            get("/api/audit/events").auth(&bob_agent),
            err(403, "forbidden")),
        case("Bob's agent re-derives even its own transaction",
            get(format!("/api/audit/transactions/{tb}")).auth(&bob_agent),
            err(403, "forbidden")),
        case("Bob's ticket replays only Bob's events",
            ws("?ticket={ticket}&after=0", &Cred::None),
            Expect::Replay(none_of(not_bobs.clone(), Some(tb.to_owned()))))
            .setup(Setup::Ticket(bob.headers()))
            .effect(Effect::ConsumesTicket),
        case("Bob's agent's socket replays only its transactions",
            ws("?after=0", &bob_agent),
            Expect::Replay(none_of(not_bobs.clone(), Some(tb.to_owned())))),
        case("Bob's socket with his token replays only his events",
            ws("?after=0", &bob),
            Expect::Replay(none_of(not_bobs.clone(), Some(tb.to_owned())))),

        // ---- Revoked and unknown keys --------------------------------------------------------
        case("revoked key executes",
            post("/api/execute_transaction").auth(&revoked).json(json!({"transaction_id": ta})),
            err(401, "unauthorized")),
        case("revoked key loads a wallet",
            post("/api/load_wallet").auth(&revoked).json(json!({"wallet_address": aw})),
            err(401, "unauthorized")),
        case("revoked key lists transactions",
            get("/api/transactions").auth(&revoked),
            err(401, "unauthorized")),
        case("revoked key reads a history",
            get(format!("/api/transactions/{ta}/events")).auth(&revoked),
            err(401, "unauthorized")),
        case("revoked key long-polls",
            get(format!("/api/transactions/{ta}/wait?timeout=0")).auth(&revoked),
            err(401, "unauthorized")),
        case("revoked key asks for a socket ticket",
            post("/api/ws_ticket").auth(&revoked),
            err(401, "unauthorized")),
        case("revoked key reads the audit log (401, not 403)",
            get("/api/audit/events").auth(&revoked),
            err(401, "unauthorized")),
        case("revoked key does not fall back to a valid token sent alongside",
            post("/api/prepare_transaction")
                .auth(&Cred::Headers([revoked.headers(), alice.headers()].concat()))
                .json(native_a.clone()),
            err(401, "unauthorized")),
        case("ticket issued, then its key revoked",
            ws("?ticket={ticket}", &Cred::None),
            err(401, "unauthorized"))
            .setup(Setup::TicketThenRevoke)
            .effect(Effect::ConsumesTicket),
        case("well-formed key that was never issued",
            post("/api/prepare_transaction")
                .auth(&Cred::Key(format!("csk_{}", hex::encode(rand::random::<[u8; 32]>()))))
                .json(native_a.clone()),
            err(401, "unauthorized")),
        case("a real key with its hex upper-cased",
            post("/api/prepare_transaction")
                .auth(&Cred::Key(format!("csk_{}", fx.alice_agent.key["csk_".len()..].to_uppercase())))
                .json(native_a.clone()),
            err(401, "unauthorized")),
        case("key of SQL",
            post("/api/prepare_transaction").auth(&Cred::Key("csk_' OR '1'='1' --".into())).json(native_a.clone()),
            err(401, "unauthorized")),
        case("key with bytes that are not UTF-8",
            post("/api/prepare_transaction")
                .auth(&Cred::Headers(vec![("x-api-key".into(), b"csk_\xff\xfe".to_vec())]))
                .json(native_a.clone()),
            err(401, "unauthorized")),
        case("revoked key first among two X-API-KEY headers",
            post("/api/prepare_transaction")
                .auth(&Cred::Headers([revoked.headers(), alice_agent.headers()].concat()))
                .json(native_a.clone()),
            err(401, "unauthorized")),

        // ---- Injection strings in every string field -------------------------------------------
        case("username with a quote",
            post("/api/register").json(json!({"username": "alice' OR '1'='1", "password": PASSWORD})),
            invalid("username")),
        case("username with a statement",
            post("/api/register").json(json!({"username": "x\"); DROP TABLE events; --", "password": PASSWORD})),
            invalid("username")),
        case("username with a NUL byte",
            post("/api/register").json(json!({"username": "mallory\u{0}", "password": PASSWORD})),
            invalid("username")),
        case("username as an operator object",
            post("/api/login").json(json!({"username": {"$gt": ""}, "password": PASSWORD})),
            invalid("username")),
        case("login with SQL for a name",
            post("/api/login").json(json!({"username": "' OR 1=1 --", "password": PASSWORD})),
            err(401, "unauthorized")).effect(LOGIN_FAILED),
        case("login with a NUL byte in the name",
            post("/api/login").json(json!({"username": "alice\u{0}", "password": PASSWORD})),
            err(401, "unauthorized")).effect(LOGIN_FAILED),
        case("login with terminal escapes in the name (and a spoofed X-Forwarded-For)",
            post("/api/login").header("x-forwarded-for", "203.0.113.7")
                .json(json!({"username": "\u{1b}[2Jalice", "password": PASSWORD})),
            err(401, "unauthorized")).effect(LOGIN_FAILED),
        case("transaction id of SQL",
            post("/api/authorize_transaction").auth(&alice)
                .json(set(&authorize_ta, "transaction_id", json!("' OR '1'='1"))),
            invalid("transaction_id")),
        case("status query of SQL",
            get("/api/transaction_status?transaction_id=%27%20OR%20%271%27%3D%271").auth(&alice),
            err(404, "not_found")),
        case("Alice's id with SQL appended, as Bob",
            get(format!("/api/transaction_status?transaction_id={ta}%27%20OR%20%271%27%3D%271")).auth(&bob),
            err(404, "not_found")),
        case("history path of SQL",
            get("/api/transactions/%27%20OR%20%271%27%3D%271/events").auth(&alice),
            err(404, "not_found")),
        case("status filter of SQL",
            get("/api/transactions?status=pending_authorization%27%20OR%20%271%27%3D%271").auth(&bob),
            invalid("status")),
        case("audit filter by an aggregate id of SQL",
            get("/api/audit/events?aggregate_id=%27%20OR%20%271%27%3D%271").auth(&bob),
            Expect::Json(200, exactly("/events", "aggregate_id", vec![]))),
        case("audit filter by an event type of SQL",
            get("/api/audit/events?event_type=x%27%3B%20DROP%20TABLE%20events%3B%20--").auth(&bob),
            Expect::Json(200, exactly("/events", "aggregate_id", vec![]))),
        case("audit filter with a NUL byte",
            get("/api/audit/events?aggregate_id=%00").auth(&bob),
            invalid("aggregate_id")),
        case("audit event type with a NUL byte",
            get("/api/audit/events?event_type=Login%00").auth(&bob),
            invalid("event_type")),
        case("audit page position of SQL",
            get("/api/audit/events?after=1%20OR%201%3D1").auth(&bob),
            invalid("after")),
        case("audit page size of SQL",
            get("/api/audit/events?limit=1%3BDROP%20TABLE%20events").auth(&bob),
            invalid("limit")),
        case("audit time range of SQL",
            get("/api/audit/events?from=%27%20OR%201%3D1").auth(&bob),
            invalid("from")),
        case("audit owner override",
            get(format!("/api/audit/events?owner_user_id={}", fx.alice.user_id)).auth(&bob),
            invalid("owner_user_id")),
        case("audit transaction id with a NUL byte",
            get("/api/audit/transactions/%00").auth(&bob),
            err(404, "not_found")),
        case("revoke a key id of SQL",
            delete("/api/api_keys/%27%20OR%20%271%27%3D%271").auth(&bob),
            err(404, "not_found")),
        case("revoke a key id with a NUL byte",
            delete("/api/api_keys/%00").auth(&bob),
            err(404, "not_found")),
        case("key name with a NUL byte",
            post("/api/api_keys").auth(&bob).json(json!({"name": "a\u{0}b", "mfa_code": "{code:bob}"})),
            invalid("name")),
        case("key name with terminal escapes",
            post("/api/api_keys").auth(&bob).json(json!({"name": "\u{1b}[31mred", "mfa_code": "{code:bob}"})),
            invalid("name")),
        case("memo with a NUL byte", bob_native("memo", json!("pay\u{0}now")), invalid("memo")),
        case("reject reason with a NUL byte",
            post("/api/reject_transaction").auth(&bob).json(json!({"transaction_id": tb, "reason": "no\u{0}"})),
            invalid("reason")),
        case("prototype pollution key", bob_native("__proto__", json!({"admin": true})), invalid("__proto__")),
        case("kind with JSON smuggled in", bob_native("kind", json!("native\", \"value\": \"1")), invalid("kind")),
        case("transfer from a wallet of SQL", bob_transfer("wallet_address", json!("' OR '1'='1")), invalid("wallet_address")),
        case("transfer to an address of SQL", bob_transfer("to_address", json!("' OR '1'='1")), invalid("to_address")),
        case("transfer with a code of SQL", bob_transfer("mfa_code", json!("' OR 1")), invalid("mfa_code")),
        case("ticket of SQL", ws("?ticket=%27%20OR%20%271%27%3D%271", &Cred::None), err(401, "unauthorized")),

        // ---- Oversized and deeply nested bodies -------------------------------------------------
        case("login body over 64 KiB",
            post("/api/login").json(json!({"username": "alice", "password": big})),
            err(413, "payload_too_large")),
        case("authorize body over 64 KiB",
            post("/api/authorize_transaction").auth(&alice)
                .json(json!({"transaction_id": ta, "mfa_code": "{code:alice}", "pad": big})),
            err(413, "payload_too_large")),
        case("transfer body over 64 KiB", bob_transfer("memo", json!(big)), err(413, "payload_too_large")),
        case("chunked body over 64 KiB (no Content-Length)",
            Request::Tcp(chunked_request("/api/register",
                format!(r#"{{"username":"mallory","password":"{big}"}}"#).as_bytes())),
            err(413, "payload_too_large")),
        case("password of 5000 characters",
            post("/api/register").json(json!({"username": "mallory", "password": "p".repeat(5000)})),
            invalid("password")),
        case("ABI nested 5000 deep",
            post("/api/prepare_transaction").auth(&bob_agent).raw(format!(
                r#"{{"wallet_address":"{bw}","kind":"contract_call","to":"{RECIPIENT}","contract_abi":{},"function_name":"f"}}"#,
                nested(5000, "[", "]"))),
            err(400, "invalid_json")),
        case("login body of 5000 nested arrays",
            post("/api/login").raw(nested(5000, "[", "]")),
            err(400, "invalid_json")),
        case("memo of 5000 nested objects",
            bob_raw_native(&format!(r#""value":"1","memo":{}"#, nested(5000, r#"{"a":"#, "}"))),
            invalid("memo")),
        case("function arguments of 5000 nested objects",
            prepare_b(json!({"wallet_address": bw, "kind": "contract_call", "to": RECIPIENT,
                "contract_abi": [{"type": "function", "name": "f", "inputs": [], "outputs": []}],
                "function_name": "f", "function_args": ["{deep}"]}))
                .replace_body("\"{deep}\"", &nested(5000, r#"{"a":"#, "}")),
            err(400, "invalid_json")),
        case("function arguments nested 120 deep",
            post("/api/prepare_transaction").auth(&bob_agent).raw(format!(
                r#"{{"wallet_address":"{bw}","kind":"contract_call","to":"{RECIPIENT}","contract_abi":[{{"type":"function","name":"f","inputs":[{{"name":"x","type":"uint256[]"}}],"outputs":[]}}],"function_name":"f","function_args":[{}]}}"#,
                nested(120, "[", "]"))),
            invalid("function_args[0][0]")),
        case("function arguments: ten thousand of them",
            prepare_b(json!({"wallet_address": bw, "kind": "contract_call", "to": RECIPIENT,
                "contract_abi": [{"type": "function", "name": "f", "inputs": [], "outputs": []}],
                "function_name": "f", "function_args": vec![0; 10_000]})),
            invalid("function_args")),
        case("a batch of 51 transactions",
            post("/api/authorize_transactions").auth(&bob)
                .json(json!({"transaction_ids": (0..51).map(|_| uuid::Uuid::new_v4().to_string()).collect::<Vec<_>>(),
                             "mfa_code": "{code:bob}"})),
            invalid("transaction_ids")),
        case("a key scoped to 101 wallets",
            post("/api/api_keys").auth(&bob).json(json!({"name": "wide", "mfa_code": "{code:bob}",
                "wallet_addresses": (0..101).map(|_| random_address()).collect::<Vec<_>>()})),
            invalid("wallet_addresses")),

        // ---- Invalid UTF-8, encodings and content types -----------------------------------------
        case("memo with bytes that are not UTF-8",
            post("/api/prepare_transaction").auth(&bob_agent).raw([
                format!(r#"{{"wallet_address":"{bw}","kind":"native","to":"{RECIPIENT}","value":"1","memo":""#).into_bytes(),
                b"\xff\xfe\xfd\"}".to_vec()].concat()),
            err(400, "invalid_json")),
        case("body with a byte-order mark",
            post("/api/reject_transaction").auth(&bob)
                .raw([b"\xef\xbb\xbf".to_vec(), json!({"transaction_id": tb}).to_string().into_bytes()].concat()),
            err(400, "invalid_json")),
        case("reject body with junk after the object",
            post("/api/reject_transaction").auth(&bob)
                .raw(format!("{}junk", json!({"transaction_id": tb}))),
            err(400, "invalid_json")),
        case("reject body of two objects",
            post("/api/reject_transaction").auth(&bob)
                .raw(format!("{0} {0}", json!({"transaction_id": tb}))),
            err(400, "invalid_json")),
        case("body in UTF-16",
            post("/api/reject_transaction").auth(&bob).raw(
                json!({"transaction_id": tb}).to_string().encode_utf16().flat_map(u16::to_le_bytes).collect::<Vec<u8>>()),
            err(400, "invalid_json")),
        case("lone surrogate escape in a username",
            post("/api/register").raw(format!(r#"{{"username":"\ud800abc","password":"{PASSWORD}"}}"#)),
            err(400, "invalid_json")),
        case("form-encoded login",
            post("/api/login").typed("application/x-www-form-urlencoded",
                "username=alice&password=correct+horse+battery+staple"),
            err(400, "invalid_json")),
        case("multipart registration",
            post("/api/register").typed("multipart/form-data; boundary=XyZ",
                "--XyZ\r\nContent-Disposition: form-data; name=\"username\"\r\n\r\nmallory\r\n--XyZ--\r\n"),
            err(400, "invalid_json")),
        case("XML transfer",
            post("/api/transfer").auth(&bob).typed("application/xml", "<transfer><amount>1</amount></transfer>"),
            err(400, "invalid_json")),
        case("JSON null body",
            post("/api/execute_transaction").auth(&bob_agent).raw("null"),
            err(400, "invalid_json")),
        case("positional JSON array for an object",
            post("/api/reject_transaction").auth(&bob).json(json!([tb, "positional"])),
            err(400, "invalid_json")),

        // ---- Huge, negative, fractional and confused numbers ------------------------------------
        case("value 1e400", bob_raw_native(r#""value":1e400"#), err(400, "invalid_json")),
        case("value 2^256 as a JSON integer", bob_raw_native(&format!(r#""value":{TWO_POW_256}"#)), invalid("value")),
        case("value \"2^256\"", bob_native("value", json!("2^256")), invalid("value")),
        case("value in hex", bob_native("value", json!("0x10")), invalid("value")),
        case("value in binary", bob_native("value", json!("0b101")), invalid("value")),
        case("value with a plus sign", bob_native("value", json!("+1")), invalid("value")),
        case("value with a leading space", bob_native("value", json!(" 1")), invalid("value")),
        case("value with digit separators", bob_native("value", json!("1_000")), invalid("value")),
        case("value in Arabic-Indic digits", bob_native("value", json!("١٢٣")), invalid("value")),
        case("value NaN", bob_native("value", json!("NaN")), invalid("value")),
        case("value Infinity", bob_native("value", json!("Infinity")), invalid("value")),
        case("empty value", bob_native("value", json!("")), invalid("value")),
        case("value true", bob_native("value", json!(true)), invalid("value")),
        case("value as an object", bob_native("value", json!({"wei": 1})), invalid("value")),
        case("value -0", bob_raw_native(r#""value":-0"#), invalid("value")),
        case("negative token amount", prepare_b(set(&erc20_b, "amount", json!("-1"))), invalid("amount")),
        case("token amount 2^256", prepare_b(set(&erc20_b, "amount", json!(TWO_POW_256))), invalid("amount")),
        case("negative contract-call value", prepare_b(set(&call_b, "value", json!(-1))), invalid("value")),
        case("transfer amount -1", bob_transfer("amount", json!(-1)), invalid("amount")),
        case("transfer amount 0.5", bob_transfer("amount", json!(0.5)), invalid("amount")),
        case("transfer amount \"1.0\"", bob_transfer("amount", json!("1.0")), invalid("amount")),
        case("transfer amount 1e18 as a float", bob_transfer("amount", json!(1e18)), invalid("amount")),
        case("transfer amount \"1e18\"", bob_transfer("amount", json!("1e18")), invalid("amount")),
        case("transfer amount 2^256", bob_transfer("amount", json!(TWO_POW_256)), invalid("amount")),
        case("expiry 2^64", bob_raw_native(r#""value":"1","expires_in":18446744073709551616"#), invalid("expires_in")),
        case("transaction expiry as a string", bob_native("expires_in", json!("60")), invalid("expires_in")),
        case("long poll for 2^64 seconds",
            get(format!("/api/transactions/{tb}/wait?timeout=18446744073709551616")).auth(&bob),
            invalid("timeout")),
        case("long poll for -1 seconds",
            get(format!("/api/transactions/{tb}/wait?timeout=-1")).auth(&bob),
            invalid("timeout")),
        case("long poll for 56 seconds",
            get(format!("/api/transactions/{tb}/wait?timeout=56")).auth(&bob),
            invalid("timeout")),
        case("audit page size 2^63", get("/api/audit/events?limit=9223372036854775808").auth(&bob), invalid("limit")),
        case("audit position -1", get("/api/audit/events?after=-1").auth(&bob), invalid("after")),
        case("socket resume from -1", ws("?after=-1", &bob), invalid("after")),
        case("socket resume from a word", ws("?after=start", &bob), invalid("after")),

        // ---- Addresses: checksums, shapes, the zero address -------------------------------------
        case("transfer to a bad checksum", bob_transfer("to_address", json!(bad_checksum(RECIPIENT))), invalid("to_address")),
        case("token transfer with a bad token checksum",
            post("/api/transfer_erc20").auth(&bob).json(set(&transfer_erc20_b, "token_address", json!(bad_checksum(RECIPIENT)))),
            invalid("token_address")),
        case("contract call with a bad contract checksum",
            post("/api/contract_call").auth(&bob).json(set(&contract_call_b, "contract_address", json!(bad_checksum(RECIPIENT)))),
            invalid("contract_address")),
        case("key scoped with a bad checksum",
            post("/api/api_keys").auth(&bob)
                .json(json!({"name": "k", "mfa_code": "{code:bob}", "wallet_addresses": [bad_checksum(bw)]})),
            invalid("wallet_addresses[0]")),
        case("load a wallet with a bad checksum",
            post("/api/load_wallet").auth(&bob).json(json!({"wallet_address": bad_checksum(bw)})),
            invalid("wallet_address")),
        case("address with an upper-case 0X", bob_native("to", json!(RECIPIENT.replacen("0x", "0X", 1))), invalid("to")),
        case("address of 41 digits", bob_native("to", json!(format!("{RECIPIENT}0"))), invalid("to")),
        case("address with a non-hex digit", bob_native("to", json!(format!("0xg{}", &RECIPIENT[3..]))), invalid("to")),
        case("address as a number", bob_native("to", json!(1234)), invalid("to")),
        case("address as an ENS name", bob_native("to", json!("vitalik.eth")), invalid("to")),
        case("native transfer to the zero address", bob_native("to", json!(ZERO_ADDRESS)), invalid("to")),
        case("token transfer to the zero address", prepare_b(set(&erc20_b, "to", json!(ZERO_ADDRESS))), invalid("to")),
        case("token at the zero address", prepare_b(set(&erc20_b, "token_address", json!(ZERO_ADDRESS))), invalid("token_address")),
        case("contract call to the zero address", prepare_b(set(&call_b, "to", json!(ZERO_ADDRESS))), invalid("to")),
        case("user transfer to the zero address", bob_transfer("to_address", json!(ZERO_ADDRESS)), invalid("to_address")),
        case("user token transfer of the zero-address token",
            post("/api/transfer_erc20").auth(&bob).json(set(&transfer_erc20_b, "token_address", json!(ZERO_ADDRESS))),
            invalid("token_address")),
        case("user contract call to the zero address",
            post("/api/contract_call").auth(&bob).json(set(&contract_call_b, "contract_address", json!(ZERO_ADDRESS))),
            invalid("contract_address")),

        // ---- Duplicate keys and nulls -------------------------------------------------------------
        case("transaction id given twice (his, then Alice's)",
            post("/api/reject_transaction").auth(&bob)
                .raw(format!(r#"{{"transaction_id":"{tb}","transaction_id":"{ta}"}}"#)),
            invalid("transaction_id")),
        case("wallet given twice", bob_raw_native(&format!(r#""value":"1","wallet_address":"{aw}""#)), invalid("wallet_address")),
        case("wallet given under both of its names",
            post("/api/load_wallet").auth(&bob).json(json!({"wallet_address": bw, "address": aw})),
            invalid("wallet_address")),
        case("password given twice",
            post("/api/create_wallet").auth(&bob)
                .raw(format!(r#"{{"password":"wrong password!","password":"{PASSWORD}"}}"#)),
            invalid("password")),
        case("null transaction id",
            post("/api/execute_transaction").auth(&bob_agent).json(json!({"transaction_id": null})),
            invalid("transaction_id")),
        case("null wallet", bob_native("wallet_address", json!(null)), invalid("wallet_address")),
        case("null value", bob_native("value", json!(null)), invalid("value")),
        case("null recipient", bob_native("to", json!(null)), invalid("to")),
        case("null password", post("/api/create_wallet").auth(&bob).json(json!({"password": null})), invalid("password")),
        case("missing password", post("/api/create_wallet").auth(&bob).json(json!({})), invalid("password")),

        // ---- Path traversal in ids ------------------------------------------------------------------
        case("history of ../../audit/verify",
            get("/api/transactions/..%2F..%2Faudit%2Fverify/events").auth(&bob),
            err(404, "not_found")),
        case("revoke ../<Bob's key>",
            delete(format!("/api/api_keys/..%2F{}", fx.bob_agent.id)).auth(&bob),
            err(404, "not_found")),
        case("audit of ../../etc/passwd",
            get("/api/audit/transactions/..%2F..%2F..%2Fetc%2Fpasswd").auth(&bob),
            err(404, "not_found")),
        case("long poll of ..%2F<Alice's transaction>",
            get(format!("/api/transactions/..%2F{ta}/wait?timeout=0")).auth(&bob),
            err(404, "not_found")),
        case("raw dot segments are not resolved",
            Request::Tcp(raw_request("GET", &format!("/api/transactions/{tb}/../../audit/verify"), &bob, b"")),
            err(404, "not_found")),
        case("raw dot segment into /api/me",
            Request::Tcp(raw_request("GET", "/api/../api/me", &bob, b"")),
            err(404, "not_found")),

        // ---- Header tricks ----------------------------------------------------------------------------
        case("Authorization that is not UTF-8",
            post("/api/reject_transaction")
                .auth(&Cred::Headers(vec![("authorization".into(), b"Bearer \xff\xfe".to_vec())]))
                .json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("Authorization of 300 KB",
            post("/api/reject_transaction").auth(&Cred::Bearer("A".repeat(300_000))).json(reject_ta.clone()),
            err(401, "unauthorized")),
        case("X-API-KEY of 100 KB",
            post("/api/prepare_transaction").auth(&Cred::Key(format!("csk_{}", "a".repeat(100_000))))
                .json(native_a.clone()),
            err(401, "unauthorized")),
        case("200 headers",
            Request::Tcp(raw_request_with("GET", "/api/me", &bob,
                &(0..200).map(|i| format!("X-Junk-{i}: j\r\n")).collect::<String>(), b"")),
            Expect::Bare(431)),
        case("obsolete header folding to smuggle a key",
            Request::Tcp(raw_request_with("GET", "/api/wallets", &Cred::None,
                &format!("X-Api-Key: csk_junk\r\n {}\r\n", fx.alice_agent.key), b"")),
            Expect::Bare(400)),
        case("two Content-Length headers",
            Request::Tcp(raw_request_with("POST", "/api/reject_transaction", &bob, "Content-Length: 2\r\n", b"{}")),
            Expect::Bare(400)),

        // ---- Unknown fields (denied, naming the field) ---------------------------------------------
        case("register as an auditor",
            post("/api/register").json(json!({"username": "mallory", "password": PASSWORD, "role": "auditor"})),
            invalid("role")),
        case("register as an admin",
            post("/api/register").json(json!({"username": "mallory", "password": PASSWORD, "is_admin": true})),
            invalid("is_admin")),
        case("authorize with `approved`",
            post("/api/authorize_transaction").auth(&alice).json(set(&authorize_ta, "approved", json!(true))),
            invalid("approved")),
        case("key with `scopes: *`",
            post("/api/api_keys").auth(&bob).json(json!({"name": "k", "mfa_code": "{code:bob}", "scopes": "*"})),
            invalid("scopes")),
        case("execute with a new recipient",
            post("/api/execute_transaction").auth(&bob_agent).json(json!({"transaction_id": tb, "to": random_address()})),
            invalid("to")),
        case("transfer with a gas price", bob_transfer("gas_price", json!("1")), invalid("gas_price")),
        case("reject with a status",
            post("/api/reject_transaction").auth(&bob).json(json!({"transaction_id": tb, "status": "authorized"})),
            invalid("status")),
        case("load a wallet for its owner",
            post("/api/load_wallet").auth(&bob).json(json!({"wallet_address": bw, "owner_user_id": fx.alice.user_id})),
            invalid("owner_user_id")),
        case("list transactions of an owner",
            get(format!("/api/transactions?owner={}", fx.alice.user_id)).auth(&bob),
            invalid("owner")),
        case("status naming a user",
            get(format!("/api/transaction_status?transaction_id={tb}&user_id={}", fx.alice.user_id)).auth(&bob),
            invalid("user_id")),
        case("long poll with `force`",
            get(format!("/api/transactions/{tb}/wait?timeout=0&force=1")).auth(&bob),
            invalid("force")),
        case("socket for a user", ws(format!("?user={}", fx.alice.user_id), &bob), invalid("user")),

        // ---- Wrong methods ---------------------------------------------------------------------------
        case("PUT authorize",
            Http::new(Method::PUT, "/api/authorize_transaction").auth(&alice).json(authorize_ta.clone()),
            err(405, "method_not_allowed")),
        case("DELETE a history", delete(format!("/api/transactions/{tb}/events")).auth(&bob), err(405, "method_not_allowed")),
        case("PATCH a key",
            Http::new(Method::PATCH, format!("/api/api_keys/{}", fx.bob_agent.id)).auth(&bob).json(json!({"revoked": false})),
            err(405, "method_not_allowed")),
        case("POST to a key",
            post(format!("/api/api_keys/{}", fx.alice_revoked.id)).auth(&alice).json(json!({})),
            err(405, "method_not_allowed")),
        case("GET a key", get(format!("/api/api_keys/{}", fx.bob_agent.id)).auth(&bob), err(405, "method_not_allowed")),
        case("DELETE me", delete("/api/me").auth(&bob), err(405, "method_not_allowed")),
        case("DELETE all keys", delete("/api/api_keys").auth(&bob), err(405, "method_not_allowed")),
        case("POST verify", post("/api/audit/verify").auth(&bob).json(json!({})), err(405, "method_not_allowed")),
        case("GET execute", get("/api/execute_transaction").auth(&bob_agent), err(405, "method_not_allowed")),
        case("TRACE me", Http::new(Method::TRACE, "/api/me").auth(&bob), err(405, "method_not_allowed")),
        case("cross-origin preflight",
            Http::new(Method::OPTIONS, "/api/prepare_transaction")
                .header("origin", "https://evil.example")
                .header("access-control-request-method", "POST"),
            err(405, "method_not_allowed")),

        // ---- WebSocket tickets --------------------------------------------------------------------------
        case("socket with a made-up ticket",
            ws(format!("?ticket={}", hex::encode(rand::random::<[u8; 32]>())), &Cred::None),
            err(401, "unauthorized")),
        case("socket with a used ticket", ws("?ticket={ticket}", &Cred::None), err(401, "unauthorized"))
            .setup(Setup::SpentTicket(bob.headers())),
        case("a plain GET with a ticket does not use it up",
            get("/api/ws?ticket={ticket}"),
            err(400, "websocket_required"))
            .setup(Setup::Ticket(bob.headers())),
        case("socket as Bob with a token signed by a guessed secret",
            ws("", &Cred::Bearer(forge(&hs256(), &with(claims.clone(), "sub", json!(fx.bob.user_id)), b"nope"))),
            err(401, "unauthorized")),
        case("socket with a 10 KB ticket", ws(format!("?ticket={}", "a".repeat(10_000)), &Cred::None), err(401, "unauthorized")),
    ];
    cases.extend(later_cases(fx));
    cases
}

/// Rate limits, the MFA lockout, sessions and idempotency keys: cases that need their own
/// preparation (and that change the fixture for later cases, so they run last).
fn later_cases(fx: &Fixture) -> Vec<Case> {
    let alice = user_cred(&fx.alice);
    let bob = user_cred(&fx.bob);
    let dave = user_cred(&fx.dave);
    let bob_agent = key_cred(&fx.bob_agent);
    let (tb, td, bw) = (fx.tb.as_str(), fx.td.as_str(), fx.bob_wallet.as_str());
    let token = Cred::Bearer("{token}".into());
    let login = |username: &str, password: &str| {
        post("/api/login").json(json!({"username": username, "password": password}))
    };
    let unknown_key = Cred::Key(format!("csk_{}", hex::encode([7u8; 32])));
    let change_password = |body: Value| post("/api/change_password").auth(&bob).json(body);
    let prepare_with_key = |key: &str, value: u64| {
        post("/api/prepare_transaction")
            .auth(&bob_agent)
            .header("idempotency-key", key)
            .json(native_body(bw, RECIPIENT, value.into()))
    };
    let transfer_with_key = |key: &str, password: &str| {
        post("/api/transfer")
            .auth(&bob)
            .header("idempotency-key", key)
            .json(json!({"password": password, "mfa_code": "{code:bob}",
                         "wallet_address": bw, "to_address": RECIPIENT, "amount": "7"}))
    };
    vec![
        // ---- MFA lockout: Dave has four wrong codes behind him ---------------------------------
        case(
            "the fifth wrong code in a row locks MFA",
            post("/api/authorize_transaction")
                .auth(&dave)
                .json(json!({"transaction_id": td, "mfa_code": "{wrong:dave}"})),
            err(429, "mfa_locked"),
        )
        .effect(Effect::Records(&["MfaCodeRejected", "MfaLockedOut"])),
        case(
            "during the lockout even the right code is refused",
            post("/api/authorize_transaction")
                .auth(&dave)
                .json(json!({"transaction_id": td, "mfa_code": "{code:dave}"})),
            err(429, "mfa_locked"),
        ),
        case(
            "during the lockout no key is issued",
            post("/api/api_keys")
                .auth(&dave)
                .json(json!({"name": "k", "mfa_code": "{code:dave}"})),
            err(429, "mfa_locked"),
        ),
        case(
            "during the lockout MFA cannot be replaced",
            post("/api/setup_mfa")
                .auth(&dave)
                .json(json!({"password": PASSWORD, "mfa_code": "{code:dave}"})),
            err(429, "mfa_locked"),
        ),
        // ---- Rate limits (each case from its own address) ----------------------------------------
        case(
            "a username under password guessing is throttled, even with its password",
            login("dave", PASSWORD),
            err(429, "rate_limited"),
        )
        .setup(Setup::Send(
            login("dave", "guess number {n} of many"),
            10,
            401,
        )),
        case(
            "an address guessing many usernames is throttled",
            login("alice", PASSWORD),
            err(429, "rate_limited"),
        )
        .setup(Setup::Send(
            login("nobody{n}", "a guess that is long enough"),
            30,
            401,
        )),
        case(
            "an address presenting bad keys is throttled, even with a good one",
            post("/api/prepare_transaction")
                .auth(&bob_agent)
                .json(native_body(bw, RECIPIENT, 5)),
            err(429, "rate_limited"),
        )
        .setup(Setup::Send(get("/api/wallets").auth(&unknown_key), 20, 401)),
        // ---- Password changes that must not happen ------------------------------------------------
        case(
            "password change with a wrong current password",
            change_password(json!({"current_password": "not my password at all",
                "new_password": NEW_PASSWORD, "mfa_code": "{code:bob}"})),
            err_at(403, "invalid_password", "current_password"),
        ),
        case(
            "password change without the MFA code",
            change_password(json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD})),
            err_at(403, "mfa_code_required", "mfa_code"),
        ),
        case(
            "password change with a replayed code",
            post("/api/change_password")
                .auth(&alice)
                .json(json!({"current_password": PASSWORD,
                "new_password": NEW_PASSWORD, "mfa_code": "{spent:alice}"})),
            err_at(403, "mfa_code_replayed", "mfa_code"),
        )
        .setup(Setup::SpentCode(Who::Alice)),
        case(
            "password change to a short password",
            change_password(
                json!({"current_password": PASSWORD, "new_password": "short",
                "mfa_code": "{code:bob}"}),
            ),
            invalid("new_password"),
        ),
        case(
            "password change to the same password",
            change_password(
                json!({"current_password": PASSWORD, "new_password": PASSWORD,
                "mfa_code": "{code:bob}"}),
            ),
            invalid("new_password"),
        ),
        case(
            "password change naming the user",
            change_password(
                json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD,
                "mfa_code": "{code:bob}", "user_id": fx.alice.user_id}),
            ),
            invalid("user_id"),
        ),
        case(
            "password change by an agent key",
            post("/api/change_password")
                .auth(&bob_agent)
                .json(json!({"current_password": PASSWORD,
                "new_password": NEW_PASSWORD})),
            err(401, "unauthorized"),
        ),
        case(
            "logout with an agent key",
            post("/api/logout").auth(&bob_agent),
            err(401, "unauthorized"),
        ),
        case(
            "logout with a token signed by a guessed secret",
            post("/api/logout").auth(&Cred::Bearer(forge(
                &hs256(),
                &claims_of(&fx.bob.token),
                b"guess",
            ))),
            err(401, "unauthorized"),
        ),
        case(
            "a batch naming one transaction twice",
            post("/api/authorize_transactions")
                .auth(&bob)
                .json(json!({"transaction_ids": [tb, tb], "mfa_code": "{code:bob}"})),
            invalid("transaction_ids[1]"),
        ),
        // ---- Sessions: logout and password change end tokens -------------------------------------
        case(
            "a logged-out token rejects Bob's transaction",
            post("/api/reject_transaction")
                .auth(&token)
                .json(json!({"transaction_id": tb})),
            err(401, "token_revoked"),
        )
        .setup(Setup::LoggedOut),
        case(
            "a logged-out token asks for a socket ticket",
            post("/api/ws_ticket").auth(&token),
            err(401, "token_revoked"),
        )
        .setup(Setup::LoggedOut),
        case(
            "a logged-out token opens a socket",
            ws("?after=0", &token),
            err(401, "token_revoked"),
        )
        .setup(Setup::LoggedOut),
        case(
            "a ticket of a token logged out since",
            ws("?ticket={ticket}&after=0", &Cred::None),
            err(401, "token_revoked"),
        )
        .setup(Setup::TicketThenLogout)
        .effect(Effect::ConsumesTicket),
        case(
            "a token from before a password change",
            post("/api/create_wallet")
                .auth(&token)
                .json(json!({"password": NEW_PASSWORD})),
            err(401, "token_revoked"),
        )
        .setup(Setup::PasswordChanged),
        // ---- Idempotency keys -----------------------------------------------------------------------
        case(
            "an idempotency key replayed with another body",
            prepare_with_key("adv-prepare", 2),
            err_at(409, "idempotency_key_reused", "Idempotency-Key"),
        )
        .setup(Setup::Send(prepare_with_key("adv-prepare", 1), 1, 201)),
        case(
            "an idempotency key replayed with the same body prepares nothing new",
            prepare_with_key("adv-same", 3),
            Expect::AsSetup,
        )
        .setup(Setup::Send(prepare_with_key("adv-same", 3), 1, 201)),
        case(
            "an idempotency key of a prepare replayed on execute",
            post("/api/execute_transaction")
                .auth(&bob_agent)
                .header("idempotency-key", "adv-cross")
                .json(json!({"transaction_id": tb})),
            err_at(409, "idempotency_key_reused", "Idempotency-Key"),
        )
        .setup(Setup::Send(prepare_with_key("adv-cross", 4), 1, 201)),
        case(
            "an idempotency key of a refused transfer replayed with the right password",
            transfer_with_key("adv-transfer", PASSWORD),
            err_at(409, "idempotency_key_reused", "Idempotency-Key"),
        )
        .setup(Setup::Send(
            transfer_with_key("adv-transfer", "a wrong password here"),
            1,
            403,
        )),
        case(
            "an idempotency key of 256 characters",
            prepare_with_key(&"k".repeat(256), 5),
            invalid("Idempotency-Key"),
        ),
        case(
            "an idempotency key with a space",
            prepare_with_key("two words", 5),
            invalid("Idempotency-Key"),
        ),
        case(
            "an idempotency key sent twice",
            prepare_with_key("adv-twice", 5).header("idempotency-key", "adv-twice-2"),
            invalid("Idempotency-Key"),
        ),
        case(
            "an idempotency key that is not ASCII",
            prepare_with_key("adv-", 5).header_replace("idempotency-key", "clé".as_bytes()),
            invalid("Idempotency-Key"),
        ),
    ]
    .into_iter()
    .chain(std::iter::once(case(
        "Alice's session survives all of it",
        get("/api/me").auth(&alice),
        Expect::Json(200, none_of(vec![], Some(fx.alice.user_id.clone()))),
    )))
    .collect()
}

/// Carol's password after `Setup::PasswordChanged`.
const NEW_PASSWORD: &str = "a completely different passphrase";

impl Http {
    /// Splice raw text into the JSON body (what `json!` cannot build, e.g. 5000 levels).
    fn replace_body(mut self, from: &str, to: &str) -> Self {
        let body = String::from_utf8(self.body.take().unwrap_or_default()).unwrap();
        self.body = Some(body.replace(from, to).into_bytes());
        self
    }

    fn header_replace(mut self, name: &str, value: &[u8]) -> Self {
        self.headers.retain(|(n, _)| n != name);
        self.header(name, value.to_vec())
    }
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP

fn raw_request(method: &str, path: &str, cred: &Cred, body: &[u8]) -> Vec<u8> {
    raw_request_with(method, path, cred, "", body)
}

fn raw_request_with(method: &str, path: &str, cred: &Cred, extra: &str, body: &[u8]) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    for (name, value) in cred.headers() {
        head.push_str(&format!(
            "{name}: {}\r\n",
            String::from_utf8(value).unwrap()
        ));
    }
    head.push_str(extra);
    if !body.is_empty() {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    head.push_str("\r\n");
    [head.into_bytes(), body.to_vec()].concat()
}

fn chunked_request(path: &str, body: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for chunk in body.chunks(8192) {
        out.extend(format!("{:x}\r\n", chunk.len()).into_bytes());
        out.extend(chunk);
        out.extend(b"\r\n");
    }
    out.extend(b"0\r\n\r\n");
    out
}

// ---------------------------------------------------------------------------------------------
// Running a case

/// Where a case comes from: its own loopback address (127.1.x.y), so per-address limits see
/// each case as a separate attacker and the recorded source address can be checked.
struct Origin {
    ip: std::net::IpAddr,
    client: reqwest::Client,
}

impl Origin {
    fn new(index: usize) -> Self {
        let ip = std::net::IpAddr::V4(std::net::Ipv4Addr::new(
            127,
            1,
            (index / 250) as u8,
            (index % 250 + 1) as u8,
        ));
        let client = reqwest::Client::builder()
            .local_address(ip)
            .build()
            .expect("client");
        Self { ip, client }
    }

    async fn connect(&self, app: &TestApp) -> Result<tokio::net::TcpStream, String> {
        let addr: std::net::SocketAddr = app.address.trim_start_matches("http://").parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().map_err(|e| e.to_string())?;
        socket
            .bind(std::net::SocketAddr::new(self.ip, 0))
            .map_err(|e| e.to_string())?;
        socket.connect(addr).await.map_err(|e| e.to_string())
    }
}

enum Outcome {
    Answer {
        status: u16,
        retry_after: Option<String>,
        body: String,
    },
    Socket(Vec<Value>),
}

/// What a setup leaves for the case: `{ticket}`, `{token}`, and its last answer.
#[derive(Default)]
struct Prepared {
    ticket: Option<String>,
    token: Option<String>,
    answer: Option<(u16, String)>,
}

async fn run_case(
    app: &TestApp,
    fx: &mut Fixture,
    db: &Db,
    case: &Case,
    origin: &Origin,
) -> Result<(), String> {
    let prepared = setup(app, fx, &case.setup, origin).await?;
    let before = Snapshot::take(app, fx, db).await;
    for attempt in 0..case.repeat {
        let outcome = send(app, fx, &case.send, &prepared, origin).await?;
        check(&case.expect, &outcome, &prepared)
            .map_err(|e| format!("attempt {}: {e}", attempt + 1))?;
    }
    let after = Snapshot::take(app, fx, db).await;
    match case.effect {
        Effect::Nothing => before.same_as(&after),
        Effect::ConsumesTicket => {
            let mut rows = after.rows.clone();
            *rows.entry("ws_tickets".into()).or_default() += 1;
            before.same_as(&Snapshot { rows, ..after })
        }
        Effect::Records(expected) => {
            let new = db.events_after(before.head).await;
            let types: Vec<&str> = new.iter().map(|(t, _)| t.as_str()).collect();
            if types != expected {
                return Err(format!("expected {expected:?} recorded, got {types:?}"));
            }
            for (event_type, metadata) in &new {
                let metadata: Value = serde_json::from_str(metadata).unwrap();
                if metadata["source_ip"] != origin.ip.to_string() {
                    return Err(format!(
                        "{event_type} does not record the real peer {}: {metadata}",
                        origin.ip
                    ));
                }
            }
            // Only the history (and the views folding it) may differ.
            before.same_as(&Snapshot {
                head: before.head,
                health: before.health.clone(),
                views: before.views.clone(),
                ..after
            })
        }
    }
}

async fn setup(
    app: &TestApp,
    fx: &mut Fixture,
    setup: &Setup,
    origin: &Origin,
) -> Result<Prepared, String> {
    let mut prepared = Prepared::default();
    match setup {
        Setup::None => {}
        Setup::SpentCode(who) => {
            // A code spent in the current step or later is still inside the window: replayed.
            if last_step(fx.user(*who)).is_none_or(|s| s < current_step()) {
                app.issue_api_key(fx.user_mut(*who), "spends-a-code", None)
                    .await;
            }
        }
        Setup::Ticket(headers) => prepared.ticket = Some(issue_ticket(app, headers).await?),
        Setup::SpentTicket(headers) => {
            let ticket = issue_ticket(app, headers).await?;
            let used = ws_connect(app, &format!("?ticket={ticket}"), &[], origin).await?;
            if let Outcome::Answer { status, body, .. } = used {
                return Err(format!("first use of a ticket refused: {status} {body}"));
            }
            prepared.ticket = Some(ticket);
        }
        Setup::TicketThenRevoke => {
            prepared.ticket = Some(issue_ticket(app, &key_cred(&fx.bob_doomed).headers()).await?);
            let (status, body) = app
                .delete(
                    &format!("/api/api_keys/{}", fx.bob_doomed.id),
                    &fx.bob.auth(),
                )
                .await;
            if status.as_u16() != 204 {
                return Err(format!("revocation failed: {status} {body}"));
            }
        }
        Setup::Send(http, times, want) => {
            for n in 0..*times {
                let mut http = http.clone();
                http.path = http.path.replace("{n}", &n.to_string());
                http.body = http.body.map(|b| {
                    String::from_utf8_lossy(&b)
                        .replace("{n}", &n.to_string())
                        .into()
                });
                let outcome = send(app, fx, &Request::Http(http), &prepared, origin).await?;
                let Outcome::Answer { status, body, .. } = outcome else {
                    unreachable!("an HTTP request")
                };
                if status != *want {
                    return Err(format!(
                        "setup request {n}: expected {want}, got {status} {body}"
                    ));
                }
                prepared.answer = Some((status, body));
            }
        }
        Setup::LoggedOut | Setup::TicketThenLogout => {
            let token = login(app, &fx.bob.username, PASSWORD).await?;
            if matches!(setup, Setup::TicketThenLogout) {
                let cred = Cred::Bearer(token.clone());
                prepared.ticket = Some(issue_ticket(app, &cred.headers()).await?);
            }
            let (status, body) = app
                .post("/api/logout", &Auth::Bearer(token.clone()), json!({}))
                .await;
            if status.as_u16() != 204 {
                return Err(format!("logout failed: {status} {body}"));
            }
            prepared.token = Some(token);
        }
        Setup::PasswordChanged => {
            let (status, body) = app
                .post(
                    "/api/change_password",
                    &fx.carol.auth(),
                    json!({"current_password": PASSWORD, "new_password": NEW_PASSWORD}),
                )
                .await;
            if status.as_u16() != 200 {
                return Err(format!("password change failed: {status} {body}"));
            }
            prepared.token = Some(std::mem::take(&mut fx.carol.token));
            fx.carol.token = body["access_token"].as_str().unwrap_or_default().to_owned();
        }
    }
    Ok(prepared)
}

async fn login(app: &TestApp, username: &str, password: &str) -> Result<String, String> {
    let (status, body) = app
        .post(
            "/api/login",
            &Auth::None,
            json!({"username": username, "password": password}),
        )
        .await;
    body["access_token"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("login failed: {status} {body}"))
}

async fn issue_ticket(app: &TestApp, headers: &[(String, Vec<u8>)]) -> Result<String, String> {
    let mut req = app.client.post(app.url("/api/ws_ticket"));
    for (name, value) in headers {
        req = req.header(name.as_str(), value.as_slice());
    }
    let resp = req.send().await.map_err(|e| e.to_string())?;
    let body: Value = resp.json().await.map_err(|e| e.to_string())?;
    body["ticket"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no ticket: {body}"))
}

/// Which code of a user a placeholder stands for.
type CodeOf = fn(&TestUser) -> String;

/// Fill `{code:who}`, `{spent:who}`, `{wrong:who}`, `{ticket}` and `{token}` at the moment of
/// sending.
fn fill(fx: &Fixture, text: &str, prepared: &Prepared) -> String {
    let mut out = text.to_owned();
    for (name, who) in [
        ("alice", Who::Alice),
        ("bob", Who::Bob),
        ("dave", Who::Dave),
    ] {
        let user = fx.user(who);
        let fillers: [(&str, CodeOf); 3] = [
            ("code", unspent_code),
            ("spent", TestUser::last_code),
            ("wrong", TestUser::wrong_code),
        ];
        for (kind, code) in fillers {
            let placeholder = format!("{{{kind}:{name}}}");
            if out.contains(&placeholder) {
                out = out.replace(&placeholder, &code(user));
            }
        }
    }
    if let Some(ticket) = &prepared.ticket {
        out = out.replace("{ticket}", ticket);
    }
    if let Some(token) = &prepared.token {
        out = out.replace("{token}", token);
    }
    out
}

fn fill_bytes(fx: &Fixture, bytes: &[u8], prepared: &Prepared) -> Vec<u8> {
    match std::str::from_utf8(bytes) {
        Ok(text) if text.contains('{') => fill(fx, text, prepared).into_bytes(),
        _ => bytes.to_vec(),
    }
}

fn fill_headers(
    fx: &Fixture,
    headers: &[(String, Vec<u8>)],
    prepared: &Prepared,
) -> Vec<(String, Vec<u8>)> {
    headers
        .iter()
        .map(|(name, value)| (name.clone(), fill_bytes(fx, value, prepared)))
        .collect()
}

async fn send(
    app: &TestApp,
    fx: &Fixture,
    send: &Request,
    prepared: &Prepared,
    origin: &Origin,
) -> Result<Outcome, String> {
    match send {
        Request::Http(h) => {
            let mut req = origin
                .client
                .request(h.method.clone(), app.url(&fill(fx, &h.path, prepared)));
            for (name, value) in fill_headers(fx, &h.headers, prepared) {
                let name = HeaderName::from_bytes(name.as_bytes()).unwrap();
                let value = HeaderValue::from_bytes(&value).map_err(|e| e.to_string())?;
                req = req.header(name, value);
            }
            if let Some(body) = &h.body {
                req = req.body(fill_bytes(fx, body, prepared));
            }
            let resp = req
                .send()
                .await
                .map_err(|e| format!("request failed: {e}"))?;
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap_or_default().to_owned());
            Ok(Outcome::Answer {
                status: resp.status().as_u16(),
                retry_after,
                body: resp.text().await.map_err(|e| e.to_string())?,
            })
        }
        Request::Tcp(bytes) => tcp(app, bytes, origin).await,
        Request::Ws { query, headers } => {
            let headers = fill_headers(fx, headers, prepared);
            ws_connect(app, &fill(fx, query, prepared), &headers, origin).await
        }
    }
}

async fn tcp(app: &TestApp, bytes: &[u8], origin: &Origin) -> Result<Outcome, String> {
    let mut stream = origin.connect(app).await?;
    stream.write_all(bytes).await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("not an HTTP answer: {text:?}"))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let retry_after = head
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: ").map(str::to_owned));
    Ok(Outcome::Answer {
        status,
        retry_after,
        body: body.to_owned(),
    })
}

async fn ws_connect(
    app: &TestApp,
    query: &str,
    headers: &[(String, Vec<u8>)],
    origin: &Origin,
) -> Result<Outcome, String> {
    let url = format!("{}/api/ws{query}", app.address.replace("http://", "ws://"));
    let mut request = url.into_client_request().map_err(|e| e.to_string())?;
    for (name, value) in headers {
        request.headers_mut().append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(value).unwrap(),
        );
    }
    let stream = origin.connect(app).await?;
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .map_err(|_| "WebSocket handshake timed out".to_owned())?;
    let mut socket = match connected {
        Ok((socket, _)) => socket,
        Err(tungstenite::Error::Http(resp)) => {
            return Ok(Outcome::Answer {
                status: resp.status().as_u16(),
                retry_after: None,
                body: String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default())
                    .into_owned(),
            })
        }
        Err(e) => return Err(format!("WebSocket failed: {e}")),
    };
    let mut events = vec![];
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .map_err(|_| "no caught_up within 5 s".to_owned())?
            .ok_or("socket closed before caught_up")?
            .map_err(|e| e.to_string())?;
        if let tungstenite::Message::Text(text) = msg {
            let v: Value = serde_json::from_str(text.as_str()).map_err(|e| e.to_string())?;
            if v["type"] == "caught_up" {
                break;
            }
            events.push(v);
        }
    }
    let _ = socket.close(None).await;
    Ok(Outcome::Socket(events))
}

fn check(expect: &Expect, outcome: &Outcome, prepared: &Prepared) -> Result<(), String> {
    let (status, retry_after, body) = match (expect, outcome) {
        (Expect::Replay(check), Outcome::Socket(events)) => {
            return check(&Value::Array(events.clone()))
        }
        (_, Outcome::Socket(events)) => {
            return Err(format!(
                "a socket opened (replayed {} events)",
                events.len()
            ))
        }
        (
            _,
            Outcome::Answer {
                status,
                retry_after,
                body,
            },
        ) => (*status, retry_after, body),
    };
    // Whoever is throttled is told when to come back.
    if status == 429
        && !retry_after
            .as_deref()
            .is_some_and(|s| s.parse::<u64>().is_ok_and(|n| n >= 1))
    {
        return Err(format!(
            "429 without a usable Retry-After ({retry_after:?})"
        ));
    }
    match expect {
        Expect::Replay(_) => Err(format!("socket refused: {status} {body}")),
        Expect::AsSetup => match &prepared.answer {
            Some((s, b)) if *s == status && b == body => Ok(()),
            other => Err(format!(
                "expected the first answer {other:?}, got {status} {body}"
            )),
        },
        Expect::Bare(want) => (status == *want)
            .then_some(())
            .ok_or_else(|| format!("expected {want}, got {status} {body}")),
        Expect::Json(want, check) => {
            if status != *want {
                return Err(format!("expected {want}, got {status} {body}"));
            }
            let json: Value =
                serde_json::from_str(body).map_err(|_| format!("not JSON: {body}"))?;
            check(&json)
        }
        Expect::Error {
            status: want,
            code,
            field,
        } => {
            let json: Value = serde_json::from_str(body)
                .map_err(|_| format!("{status}: error body is not JSON: {body:?}"))?;
            let error = &json["error"];
            if status != *want || error["code"] != *code {
                return Err(format!("expected {want} {code}, got {status} {json}"));
            }
            if !error["message"].is_string() {
                return Err(format!("no message: {json}"));
            }
            match field {
                Some(f) if error["field"] != f.as_str() => {
                    Err(format!("expected field {f}, got {json}"))
                }
                _ => Ok(()),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// "Nothing changed"

/// A database handle of the test's own, to look at the store the way an operator would.
enum Db {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

/// Tables maintained in the background (the sealer's), not about application state, or
/// compared another way (the event log, through its head).
const IGNORED_TABLES: [&str; 6] = [
    "_sqlx_migrations",
    "events",
    "event_seals",
    "audit_checkpoints",
    "audit_signing_keys",
    "projection_checkpoints",
];

impl Db {
    async fn connect(app: &TestApp) -> Self {
        match app.backend {
            Backend::Sqlite => Db::Sqlite(sqlx::SqlitePool::connect(&app.store.url).await.unwrap()),
            Backend::Postgres => Db::Postgres(sqlx::PgPool::connect(&app.store.url).await.unwrap()),
        }
    }

    async fn strings(&self, sql: &str) -> Vec<String> {
        match self {
            Db::Sqlite(p) => sqlx::query_scalar(sql).fetch_all(p).await,
            Db::Postgres(p) => sqlx::query_scalar(sql).fetch_all(p).await,
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    async fn number(&self, sql: &str) -> i64 {
        match self {
            Db::Sqlite(p) => sqlx::query_scalar(sql).fetch_one(p).await,
            Db::Postgres(p) => sqlx::query_scalar(sql).fetch_one(p).await,
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    async fn tables(&self) -> Vec<String> {
        let sql = match self {
            Db::Sqlite(_) => {
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            }
            Db::Postgres(_) => {
                "SELECT table_name::text FROM information_schema.tables \
                 WHERE table_schema = 'public' AND table_type = 'BASE TABLE'"
            }
        };
        let mut tables = self.strings(sql).await;
        tables.retain(|t| !IGNORED_TABLES.contains(&t.as_str()));
        tables.sort();
        tables
    }

    /// `(event_type, metadata)` of every event after `position`.
    async fn events_after(&self, position: i64) -> Vec<(String, String)> {
        let types = self
            .strings(&format!(
                "SELECT event_type FROM events WHERE position > {position} ORDER BY position"
            ))
            .await;
        let metadata = self
            .strings(&format!(
                "SELECT CAST(metadata AS TEXT) FROM events WHERE position > {position} \
                 ORDER BY position"
            ))
            .await;
        types.into_iter().zip(metadata).collect()
    }

    async fn close(self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }
}

#[derive(Debug, PartialEq)]
struct Snapshot {
    /// The event log's head (`MAX(position)`).
    head: i64,
    /// `GET /healthz`'s position (the projector's, after catching up).
    health: Value,
    /// Row count of every application table (credentials, secrets, keys, tickets, …).
    rows: BTreeMap<String, i64>,
    /// Every view and the position it was last folded at.
    views: Vec<String>,
    /// Block number and the tenants' balances.
    chain: Vec<String>,
    /// The target transactions, as their owners see them.
    transactions: Vec<Value>,
}

impl Snapshot {
    async fn take(app: &TestApp, fx: &Fixture, db: &Db) -> Self {
        let (_, health) = app.get("/healthz", &Auth::None).await;
        let mut rows = BTreeMap::new();
        for table in db.tables().await {
            let n = db.number(&format!("SELECT COUNT(*) FROM {table}")).await;
            rows.insert(table, n);
        }
        let block = app.anvil.rpc("eth_blockNumber", json!([])).await;
        let mut chain = vec![block.to_string()];
        for wallet in [&fx.alice_wallet, &fx.bob_wallet, RECIPIENT] {
            chain.push(app.anvil.balance(wallet).await.to_string());
        }
        let transactions = vec![
            app.status(&fx.alice.auth(), &fx.ta).await,
            app.status(&fx.bob.auth(), &fx.tb).await,
            app.status(&fx.dave.auth(), &fx.td).await,
        ];
        Self {
            head: db
                .number("SELECT COALESCE(MAX(position), 0) FROM events")
                .await,
            health: health["position"].clone(),
            rows,
            views: db
                .strings(
                    "SELECT kind || ':' || id || ':' || CAST(position AS TEXT) FROM views \
                     ORDER BY kind, id",
                )
                .await,
            chain,
            transactions,
        }
    }

    fn same_as(&self, after: &Snapshot) -> Result<(), String> {
        if self == after {
            return Ok(());
        }
        let mut diffs = vec![];
        if self.head != after.head {
            diffs.push(format!("event head {} → {}", self.head, after.head));
        }
        if self.health != after.health {
            diffs.push(format!(
                "healthz position {} → {}",
                self.health, after.health
            ));
        }
        for (table, n) in &self.rows {
            if after.rows.get(table) != Some(n) {
                diffs.push(format!("{table}: {n} rows → {:?}", after.rows.get(table)));
            }
        }
        if self.views != after.views {
            diffs.push("views changed".into());
        }
        if self.chain != after.chain {
            diffs.push(format!("chain {:?} → {:?}", self.chain, after.chain));
        }
        if self.transactions != after.transactions {
            diffs.push("a target transaction changed".into());
        }
        Err(format!("state changed: {}", diffs.join("; ")))
    }
}

// ---------------------------------------------------------------------------------------------
// The suite

async fn adversarial_suite(backend: Backend) {
    let app = TestApp::spawn(backend).await;
    let mut fx = Fixture::new(&app).await;
    let db = Db::connect(&app).await;

    // Control: the forging helper makes tokens the server accepts when nothing is wrong with
    // them, so the forged cases fail for the reason they name.
    let genuine = forge(
        &hs256(),
        &claims_of(&fx.alice.token),
        app.jwt_secret().as_bytes(),
    );
    let (status, body) = app.get("/api/me", &Auth::Bearer(genuine)).await;
    assert_eq!(status.as_u16(), 200, "control token refused: {body}");
    assert_eq!(body["user_id"], fx.alice.user_id.as_str());

    let cases = cases(&fx, app.jwt_secret());
    let mut names = BTreeSet::new();
    for case in &cases {
        assert!(names.insert(case.name), "two cases named {:?}", case.name);
    }
    let mut failures = vec![];
    for (index, case) in cases.iter().enumerate() {
        let origin = Origin::new(index);
        if let Err(e) = run_case(&app, &mut fx, &db, case, &origin).await {
            failures.push(format!("  {}: {e}", case.name));
        }
    }
    println!(
        "adversarial suite on {backend:?}: {} cases run, {} failed",
        cases.len(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} hostile cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert!(
        cases.len() >= MIN_CASES,
        "the suite must hold at least {MIN_CASES} cases, has {}",
        cases.len()
    );
    db.close().await;
    app.cleanup().await;
}
