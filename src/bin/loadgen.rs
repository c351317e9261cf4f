//! `loadgen`: load scenarios against a running Countersign server, over its real HTTP and
//! WebSocket API. It sets up its own users, wallets and API keys through the API, sends traffic
//! only to the `--url` it is given (which must be a loopback address), and every scenario stops
//! by itself after its `--duration`.
//!
//! ```text
//! cargo run --release --bin loadgen -- ws      --url http://127.0.0.1:8080 [--subscribers 1000]
//! cargo run --release --bin loadgen -- idle    --url http://127.0.0.1:8080 --server-pid PID
//! cargo run --release --bin loadgen -- prepare --url http://127.0.0.1:8080 [--agents 8]
//! cargo run --release --bin loadgen -- status  --url http://127.0.0.1:8080 [--agents 8]
//! ```
//!
//! # Scenarios
//!
//! **`ws` — routed push latency.** Opens `--subscribers N` WebSocket connections (`GET /api/ws`
//! with `X-API-KEY`), one per API key, so every socket is a distinct principal. An agent socket
//! receives the events of the transactions *its own key* prepared, and no user socket is opened,
//! so each event is routed to exactly one of the N sockets (the "each event to one of 1,000
//! clients" measurement). The N keys belong to `--users U` users, each with MFA and one wallet;
//! issuing a key spends one TOTP step of its owner, and a user has three usable steps at once
//! (previous, current, next: one goes to confirming MFA) and one more every 30 s, so the default
//! is `U = ceil(N / 2)`: two keys per user, and no waiting for the clock. Setting `--users 50`
//! works too, but 20 keys per user take about nine minutes of TOTP steps.
//!
//! Once every socket has said `caught_up`, `--agents A` concurrent preparers call
//! `POST /api/prepare_transaction` (native, value 1, a random recipient) for `--duration`
//! seconds, round-robin over the N keys (each on its owner's wallet): back to back, or paced to
//! `--rate R` prepares per second in total (the k-th request not before k/R s). For every
//! event a socket receives, the latency is `now_utc − recorded_at`, taken as soon as the frame
//! is read:
//! `recorded_at` is stamped by the database when the event row is inserted (PostgreSQL:
//! `clock_timestamp()`, µs; SQLite: `strftime(… %f)`, ms), on the same machine's clock. So it
//! covers insert → commit → projector → hub → socket → client task: "commit to receipt" plus
//! the (small) time between the insert and its commit. After the last prepare the sockets get
//! `--drain` seconds to deliver what is still in flight, then the tool checks that every
//! transaction it prepared (201) had its `TransactionPrepared` event arrive exactly once, on the
//! socket of the key that prepared it: missing, duplicate, misrouted and unknown counts.
//! Reported: latency p50/p90/p99/p99.9/max, events/s, prepare req/s and latency, errors.
//! Also reported: each event's receipt minus the time its own prepare's 201 was read. The server
//! brings the views up to date, which wakes the hub, before it answers. So this isolates the
//! hub → socket → client part from the write pipeline before it. Negative: the push beat the
//! response.
//!
//! **`idle` — memory per idle connection.** One user, one API key, `--subscribers N` sockets of
//! that key that receive nothing. Reads `VmRSS` of `--server-pid` from `/proc/PID/status` before
//! opening them and `--settle` seconds after the last one said `caught_up`; reports the
//! difference divided by N (KiB per idle connection), and the RSS after closing them again.
//!
//! **`prepare` — write throughput.** `--agents N` concurrent agents, each with its own API key
//! (two keys per user), call `POST /api/prepare_transaction` back to back for `--duration`
//! seconds. Reports req/s, latency p50/p90/p99/max and errors (only 201 counts as success).
//!
//! **`status` — read throughput.** Same agents; each first prepares `--pool` transactions, then
//! calls `GET /api/transaction_status?transaction_id=` over its own pool, back to back, for
//! `--duration` seconds. A success is a 200 whose `transaction_id` is the one asked for.
//!
//! `ws`, `prepare` and `status` also take `--server-pid` to report the server process's CPU use
//! during the load (and every scenario reports this tool's own, since it shares the machine).
//! 1,000 sockets need more than the usual 1,024 open files: run `ulimit -n 65536` (or as high as
//! the hard limit allows) first; the server needs it too. Results and how they were taken:
//! `BENCHMARKS.md`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use countersign::crypto::TotpSecret;
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use zeroize::Zeroizing;

const PASSWORD: &str = "loadgen password, not a secret";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const TOTP_STEP_SECS: u64 = 30;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "Load scenarios against a running Countersign server"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Routed push: commit→receive latency with N subscribers, each event to exactly one.
    Ws(WsArgs),
    /// Server RSS per idle WebSocket connection.
    Idle(IdleArgs),
    /// Concurrent prepare_transaction: req/s and latency.
    Prepare(LoadArgs),
    /// Concurrent transaction_status reads: req/s and latency.
    Status(StatusArgs),
}

#[derive(Args)]
struct Common {
    /// Base URL of the server (loopback only).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Concurrent requests while setting up users, keys and sockets.
    #[arg(long, default_value_t = 16)]
    setup_concurrency: usize,
    /// Give up if setting up takes longer than this many seconds.
    #[arg(long, default_value_t = 900)]
    setup_timeout: u64,
}

#[derive(Args)]
struct WsArgs {
    #[command(flatten)]
    common: Common,
    /// WebSocket subscribers, one API key each.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Users owning the keys [default: ceil(subscribers / 2), i.e. two keys per user].
    #[arg(long)]
    users: Option<usize>,
    /// Concurrent preparers.
    #[arg(long, default_value_t = 8)]
    agents: usize,
    /// Seconds of preparing.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Pace the preparers to this many prepares per second in total (0: as fast as they go).
    #[arg(long, default_value_t = 0.0)]
    rate: f64,
    /// Seconds to wait after the last prepare for events still in flight.
    #[arg(long, default_value_t = 10)]
    drain: u64,
    /// Server process id, to report its CPU use.
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    /// Idle WebSocket connections to open.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// Server process id whose VmRSS is read.
    #[arg(long)]
    server_pid: u32,
    /// Seconds to let the server settle before each RSS reading.
    #[arg(long, default_value_t = 5)]
    settle: u64,
}

#[derive(Args)]
struct LoadArgs {
    #[command(flatten)]
    common: Common,
    /// Concurrent agents, one API key each.
    #[arg(long, default_value_t = 8)]
    agents: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    /// Server process id, to report its CPU use.
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(Args)]
struct StatusArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Transactions each agent prepares first and then reads.
    #[arg(long, default_value_t = 20)]
    pool: usize,
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().scenario {
        Scenario::Ws(args) => ws_scenario(args).await,
        Scenario::Idle(args) => idle_scenario(args).await,
        Scenario::Prepare(args) => prepare_scenario(args).await,
        Scenario::Status(args) => status_scenario(args).await,
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP client and set-up through the API
// ---------------------------------------------------------------------------------------------

/// Credentials of one request.
#[derive(Clone, Copy)]
enum Auth<'a> {
    None,
    Bearer(&'a str),
    Key(&'a str),
}

/// The server's API at a loopback base URL.
#[derive(Clone)]
struct Api {
    client: reqwest::Client,
    base: String,
}

impl Api {
    fn new(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url).with_context(|| format!("--url {url}"))?;
        let loopback = match parsed.host() {
            Some(url::Host::Domain(d)) => d == "localhost",
            Some(url::Host::Ipv4(a)) => a.is_loopback(),
            Some(url::Host::Ipv6(a)) => a.is_loopback(),
            None => false,
        };
        if parsed.scheme() != "http" || !loopback {
            bail!("--url must be http:// on a loopback address (127.0.0.0/8, localhost, [::1])");
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(256)
            .build()?;
        Ok(Self {
            client,
            base: url.trim_end_matches('/').to_owned(),
        })
    }

    fn ws_url(&self, query: &str) -> String {
        format!(
            "{}/api/ws{query}",
            self.base.replacen("http://", "ws://", 1)
        )
    }

    /// One request; `Err` only for transport failures (any HTTP status is `Ok`).
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: Auth<'_>,
        body: Option<&Value>,
    ) -> Result<(StatusCode, Value), reqwest::Error> {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        req = match auth {
            Auth::None => req,
            Auth::Bearer(token) => req.bearer_auth(token),
            Auth::Key(key) => req.header("X-API-KEY", key),
        };
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok((status, value))
    }

    /// A set-up request that must answer `want`.
    async fn expect(
        &self,
        method: reqwest::Method,
        path: &str,
        auth: Auth<'_>,
        body: Option<&Value>,
        want: StatusCode,
    ) -> Result<Value> {
        let (status, value) = self
            .call(method, path, auth, body)
            .await
            .with_context(|| path.to_owned())?;
        if status != want {
            bail!("{path}: expected {want}, got {status}: {value}");
        }
        Ok(value)
    }

    async fn post(
        &self,
        path: &str,
        auth: Auth<'_>,
        body: Value,
        want: StatusCode,
    ) -> Result<Value> {
        self.expect(reqwest::Method::POST, path, auth, Some(&body), want)
            .await
    }

    /// The newest committed event position (`GET /healthz`).
    async fn position(&self) -> Result<i64> {
        let v = self
            .expect(
                reqwest::Method::GET,
                "/healthz",
                Auth::None,
                None,
                StatusCode::OK,
            )
            .await?;
        v["position"].as_i64().context("healthz without position")
    }
}

/// An HTTP outcome as an error label (for the error table), or `None` when it is `want`.
fn error_label(
    result: &Result<(StatusCode, Value), reqwest::Error>,
    want: StatusCode,
) -> Option<String> {
    match result {
        Ok((status, _)) if *status == want => None,
        Ok((status, body)) => Some(format!(
            "HTTP {} {}",
            status.as_u16(),
            body["error"]["code"].as_str().unwrap_or("")
        )),
        Err(e) if e.is_timeout() => Some("timeout".into()),
        Err(e) if e.is_connect() => Some("connect error".into()),
        Err(_) => Some("transport error".into()),
    }
}

/// A user with MFA and one wallet. TOTP codes are computed from the enrolment secret.
struct User {
    token: String,
    totp: TotpSecret,
    last_step: u64,
    wallet: String,
}

/// An API key and the wallet it prepares on.
struct Key {
    secret: String,
    wallet: String,
}

fn unix_step() -> u64 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    secs / TOTP_STEP_SECS
}

fn base32_decode(s: &str) -> Result<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let (mut bits, mut n, mut out) = (0u64, 0u32, Vec::new());
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET
            .iter()
            .position(|a| *a == c)
            .context("MFA secret is not base32")? as u64;
        bits = (bits << 5) | v;
        n += 5;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    Ok(out)
}

impl User {
    /// A code for a time step this user has not spent. The server accepts steps within ±1 of
    /// now, each once and in increasing order; when all three are spent, wait for the clock.
    async fn fresh_code(&mut self) -> String {
        loop {
            let now = unix_step();
            let step = (self.last_step + 1).max(now.saturating_sub(1));
            if step <= now + 1 {
                self.last_step = step;
                return self.totp.code_at_step(step);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// POST `body` plus a fresh `mfa_code` as this user. A code is for the oldest step still
    /// accepted, so a slow request that crosses a step boundary can miss its window: then the
    /// step was not spent, and the next one is tried (a few times).
    async fn post_with_code(
        &mut self,
        api: &Api,
        path: &str,
        mut body: Value,
        want: StatusCode,
    ) -> Result<Value> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            body["mfa_code"] = self.fresh_code().await.into();
            let auth = Auth::Bearer(&self.token);
            let (status, value) = api
                .call(reqwest::Method::POST, path, auth, Some(&body))
                .await
                .with_context(|| path.to_owned())?;
            if status == want {
                return Ok(value);
            }
            if status != StatusCode::FORBIDDEN
                || value["error"]["code"] != "invalid_mfa_code"
                || attempts >= 4
            {
                bail!("{path}: expected {want}, got {status}: {value}");
            }
        }
    }

    /// Register, log in, enrol MFA (spends one TOTP step) and create a wallet.
    async fn create(api: &Api, username: &str) -> Result<Self> {
        let creds = json!({"username": username, "password": PASSWORD});
        api.post(
            "/api/register",
            Auth::None,
            creds.clone(),
            StatusCode::CREATED,
        )
        .await?;
        let login = api
            .post("/api/login", Auth::None, creds, StatusCode::OK)
            .await?;
        let token = login["access_token"]
            .as_str()
            .context("login without access_token")?
            .to_owned();
        let auth = Auth::Bearer(&token);
        let mfa = api
            .post(
                "/api/setup_mfa",
                auth,
                json!({"password": PASSWORD}),
                StatusCode::OK,
            )
            .await?;
        let secret = base32_decode(mfa["secret"].as_str().context("setup_mfa without secret")?)?;
        let mut user = Self {
            token: token.clone(),
            totp: TotpSecret::from_bytes(Zeroizing::new(secret)),
            last_step: 0,
            wallet: String::new(),
        };
        user.post_with_code(api, "/api/confirm_mfa", json!({}), StatusCode::OK)
            .await?;
        let wallet = api
            .post(
                "/api/create_wallet",
                auth,
                json!({"password": PASSWORD}),
                StatusCode::CREATED,
            )
            .await?;
        user.wallet = wallet["wallet_address"]
            .as_str()
            .context("create_wallet without address")?
            .to_owned();
        Ok(user)
    }

    /// Issue an API key for this user's wallet (spends one TOTP step).
    async fn issue_key(&mut self, api: &Api, name: &str) -> Result<Key> {
        let body = json!({"name": name, "wallet_addresses": [self.wallet]});
        let key = self
            .post_with_code(api, "/api/api_keys", body, StatusCode::CREATED)
            .await?;
        Ok(Key {
            secret: key["api_key"].as_str().context("no api_key")?.to_owned(),
            wallet: self.wallet.clone(),
        })
    }
}

/// `n_keys` API keys spread evenly over `n_users` fresh users. The order is stable: keys of
/// user 0 first. Each user issues its keys one after the other (codes must be spent in order).
async fn setup_keys(api: &Api, common: &Common, n_keys: usize, n_users: usize) -> Result<Vec<Key>> {
    let n_users = n_users.clamp(1, n_keys.max(1));
    let per_user = n_keys.div_ceil(n_users);
    // Confirming MFA takes one of the three steps usable at once; each key after the second
    // waits for the next 30-second step.
    let totp_wait = TOTP_STEP_SECS * per_user.saturating_sub(2) as u64;
    println!(
        "setup: {n_users} users (MFA + 1 wallet each), {n_keys} API keys (up to {per_user} per \
         user; TOTP steps alone need ≈ {totp_wait} s)"
    );
    let run = format!("{:08x}", rand::random::<u32>());
    let started = Instant::now();
    let done = Arc::new(AtomicUsize::new(0));
    let tasks = (0..n_users).map(|u| {
        let keys_here = n_keys / n_users + usize::from(u < n_keys % n_users);
        let (api, run, done) = (api.clone(), run.clone(), done.clone());
        async move {
            let mut user = User::create(&api, &format!("lg-{run}-{u}")).await?;
            let mut keys = Vec::with_capacity(keys_here);
            for k in 0..keys_here {
                keys.push(user.issue_key(&api, &format!("loadgen-{k}")).await?);
            }
            let d = done.fetch_add(1, Ordering::Relaxed) + 1;
            if d % 50 == 0 {
                println!(
                    "  {d}/{n_users} users ready ({:.0} s)",
                    started.elapsed().as_secs_f64()
                );
            }
            anyhow::Ok((u, keys))
        }
    });
    let mut results: Vec<(usize, Vec<Key>)> = tokio::time::timeout(
        Duration::from_secs(common.setup_timeout),
        futures::stream::iter(tasks)
            .buffer_unordered(common.setup_concurrency.max(1))
            .collect::<Vec<_>>(),
    )
    .await
    .context("set-up timed out (--setup-timeout)")?
    .into_iter()
    .collect::<Result<_>>()?;
    results.sort_by_key(|(u, _)| *u);
    println!("setup: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(results.into_iter().flat_map(|(_, keys)| keys).collect())
}

fn random_address() -> String {
    format!("0x{}", hex::encode(rand::random::<[u8; 20]>()))
}

fn prepare_body(wallet: &str) -> Value {
    json!({"wallet_address": wallet, "kind": "native", "to": random_address(), "value": "1"})
}

// ---------------------------------------------------------------------------------------------
// WebSocket subscribers
// ---------------------------------------------------------------------------------------------

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Open a socket for an API key, resuming after `after`, and wait for its `caught_up`.
async fn open_socket(api: &Api, key: &str, after: i64) -> Result<Socket> {
    let mut request = api
        .ws_url(&format!("?after={after}"))
        .into_client_request()?;
    request.headers_mut().insert("x-api-key", key.parse()?);
    // Small client buffers: a thousand sockets in this process should not cost 128 KiB each.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let connect = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    let (mut socket, _) = tokio::time::timeout(REQUEST_TIMEOUT, connect)
        .await
        .context("WebSocket connect timed out")??;
    let caught_up = async {
        while let Some(message) = socket.next().await {
            if let Message::Text(text) = message? {
                let v: Value = serde_json::from_str(text.as_str())?;
                if v["type"] == "caught_up" {
                    return Ok(());
                }
            }
        }
        bail!("socket closed before caught_up")
    };
    tokio::time::timeout(REQUEST_TIMEOUT, caught_up)
        .await
        .context("no caught_up in time")??;
    Ok(socket)
}

/// Open one socket per key, a bounded number at a time; the result is in key order.
async fn open_sockets(api: &Api, common: &Common, keys: &[&str]) -> Result<Vec<Socket>> {
    let after = api.position().await?;
    let started = Instant::now();
    let sockets = futures::stream::iter(keys.iter().map(|k| open_socket(api, k, after)))
        .buffered(common.setup_concurrency.max(1))
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    println!(
        "sockets: {} open and caught up in {:.1} s",
        sockets.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(sockets)
}

/// One `event` message as received.
struct Received {
    transaction_id: String,
    event_type: String,
    latency_us: i64,
    received_at: OffsetDateTime,
}

/// What one socket saw.
#[derive(Default)]
struct SocketLog {
    events: Vec<Received>,
    /// How the socket ended before it was asked to (server close code, or an error).
    ended_early: Option<String>,
}

/// Read events until `stop`, timestamping each one the moment it is read.
async fn subscribe(
    mut socket: Socket,
    mut stop: watch::Receiver<bool>,
    prepared_seen: Arc<AtomicU64>,
) -> SocketLog {
    let mut log = SocketLog::default();
    loop {
        tokio::select! {
            message = socket.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let now = OffsetDateTime::now_utc();
                    let Ok(v) = serde_json::from_str::<Value>(text.as_str()) else {
                        continue;
                    };
                    if v["type"] != "event" {
                        continue;
                    }
                    let latency_us = v["recorded_at"]
                        .as_str()
                        .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
                        .map_or(i64::MIN, |at| (now - at).whole_microseconds() as i64);
                    let event_type = v["event_type"].as_str().unwrap_or_default().to_owned();
                    if event_type == "TransactionPrepared" {
                        prepared_seen.fetch_add(1, Ordering::Relaxed);
                    }
                    log.events.push(Received {
                        transaction_id: v["transaction_id"].as_str().unwrap_or_default().to_owned(),
                        event_type,
                        latency_us,
                        received_at: now,
                    });
                }
                Some(Ok(Message::Close(frame))) => {
                    log.ended_early = Some(match frame {
                        Some(f) => format!("closed {} {}", u16::from(f.code), f.reason),
                        None => "closed".into(),
                    });
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    log.ended_early = Some(format!("error: {e}"));
                    break;
                }
                None => {
                    log.ended_early = Some("connection dropped".into());
                    break;
                }
            },
            _ = stop.changed() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
                break;
            }
        }
    }
    log
}

// ---------------------------------------------------------------------------------------------
// Closed-loop load and its report
// ---------------------------------------------------------------------------------------------

/// A transaction prepared with 201, and the key (= socket) index that prepared it.
struct Prepared {
    transaction_id: String,
    key: usize,
    /// When the 201 was read.
    responded_at: OffsetDateTime,
}

/// The result of one request: success (perhaps a prepared transaction) or an error label.
type Outcome = Result<Option<Prepared>, String>;

#[derive(Default)]
struct LoadReport {
    ok: u64,
    errors: BTreeMap<String, u64>,
    latencies_us: Vec<i64>,
    prepared: Vec<Prepared>,
    elapsed: Duration,
}

/// `workers` loops calling `op(worker, iteration)` until `duration` has passed: back to back,
/// or, with `rate` > 0, request number k (counted over all workers) not before k / `rate`
/// seconds after the start. A request in flight at the deadline finishes (bounded by the
/// request timeout) and counts. Latency is from sending to the complete response.
async fn run_load<F, Fut>(workers: usize, duration: Duration, rate: f64, op: F) -> LoadReport
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let deadline = started + duration;
    let tickets = Arc::new(AtomicU64::new(0));
    let handles: Vec<_> = (0..workers)
        .map(|w| {
            let (op, tickets) = (op.clone(), tickets.clone());
            tokio::spawn(async move {
                let mut report = LoadReport::default();
                let mut i = 0;
                while Instant::now() < deadline {
                    if rate > 0.0 {
                        let k = tickets.fetch_add(1, Ordering::Relaxed);
                        let due = started + Duration::from_secs_f64(k as f64 / rate);
                        if due >= deadline {
                            break;
                        }
                        tokio::time::sleep_until(due.into()).await;
                    }
                    let t = Instant::now();
                    let outcome = op(w, i).await;
                    report.latencies_us.push(t.elapsed().as_micros() as i64);
                    match outcome {
                        Ok(prepared) => {
                            report.ok += 1;
                            report.prepared.extend(prepared);
                        }
                        Err(label) => *report.errors.entry(label).or_default() += 1,
                    }
                    i += 1;
                }
                report
            })
        })
        .collect();
    let mut total = LoadReport::default();
    for handle in handles {
        let Ok(r) = handle.await else {
            *total.errors.entry("worker panicked".into()).or_default() += 1;
            continue;
        };
        total.ok += r.ok;
        for (k, v) in r.errors {
            *total.errors.entry(k).or_default() += v;
        }
        total.latencies_us.extend(r.latencies_us);
        total.prepared.extend(r.prepared);
    }
    total.elapsed = started.elapsed();
    total
}

/// Prepare one transaction with key `k`.
async fn prepare_one(api: &Api, keys: &[Key], k: usize) -> Outcome {
    let key = &keys[k];
    let result = api
        .call(
            reqwest::Method::POST,
            "/api/prepare_transaction",
            Auth::Key(&key.secret),
            Some(&prepare_body(&key.wallet)),
        )
        .await;
    if let Some(label) = error_label(&result, StatusCode::CREATED) {
        return Err(label);
    }
    let body = result.map_err(|e| e.to_string())?.1;
    match body["transaction_id"].as_str() {
        Some(id) => Ok(Some(Prepared {
            transaction_id: id.to_owned(),
            key: k,
            responded_at: OffsetDateTime::now_utc(),
        })),
        None => Err("201 without transaction_id".into()),
    }
}

/// Percentiles (nearest rank) of an already sorted slice.
fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn ms(us: Option<i64>) -> String {
    us.map_or("-".into(), |us| format!("{:.3} ms", us as f64 / 1000.0))
}

/// Latency rows: p50, p90, p99, p99.9, max.
fn latency_rows(prefix: &str, values: &mut [i64]) -> Vec<(String, String)> {
    values.sort_unstable();
    let mut rows: Vec<(String, String)> = [50.0, 90.0, 99.0, 99.9]
        .iter()
        .map(|p| (format!("{prefix} p{p}"), ms(percentile(values, *p))))
        .collect();
    rows.push((format!("{prefix} max"), ms(values.last().copied())));
    rows
}

fn error_rows(errors: &BTreeMap<String, u64>) -> Vec<(String, String)> {
    let total: u64 = errors.values().sum();
    let mut rows = vec![("errors".to_owned(), total.to_string())];
    rows.extend(
        errors
            .iter()
            .map(|(k, v)| (format!("  {k}"), v.to_string())),
    );
    rows
}

fn print_table(title: &str, rows: &[(String, String)]) {
    let width = rows
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    let vwidth = rows
        .iter()
        .map(|(_, v)| v.chars().count())
        .max()
        .unwrap_or(0);
    let rule = "-".repeat(width + vwidth + 7);
    println!("\n{title}\n{rule}");
    for (k, v) in rows {
        println!("| {k:<width$} | {v:>vwidth$} |");
    }
    println!("{rule}");
}

fn rate(count: u64, elapsed: Duration) -> String {
    format!("{:.1}/s", count as f64 / elapsed.as_secs_f64().max(1e-9))
}

/// CPU seconds (user + system) a process has used so far, from `/proc/PID/stat`.
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // USER_HZ is 100 on every Linux this runs on.
    Some(ticks as f64 / 100.0)
}

/// CPU use of this tool and (if given) the server over a measured interval.
struct CpuMeter {
    server: Option<u32>,
    start: Instant,
    server_cpu: Option<f64>,
    own_cpu: Option<f64>,
}

impl CpuMeter {
    fn start(server: Option<u32>) -> Self {
        Self {
            server,
            start: Instant::now(),
            server_cpu: server.and_then(|p| cpu_seconds(&p.to_string())),
            own_cpu: cpu_seconds("self"),
        }
    }

    fn rows(&self) -> Vec<(String, String)> {
        let wall = self.start.elapsed().as_secs_f64().max(1e-9);
        let pct = |before: Option<f64>, pid: &str| match (before, cpu_seconds(pid)) {
            (Some(b), Some(a)) => format!("{:.0} % of one core", (a - b) / wall * 100.0),
            _ => "-".into(),
        };
        let mut rows = vec![];
        if let Some(pid) = self.server {
            rows.push(("server CPU".into(), pct(self.server_cpu, &pid.to_string())));
        }
        rows.push(("loadgen CPU".into(), pct(self.own_cpu, "self")));
        rows
    }
}

/// This process's soft limit on open files must fit `needed` sockets.
fn check_open_files(needed: usize) -> Result<()> {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap_or_default();
    let soft = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse::<usize>().ok());
    if let Some(soft) = soft {
        if soft < needed + 64 {
            bail!("open-file limit {soft} is too low for {needed} sockets: run `ulimit -n 65536`");
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

async fn ws_scenario(args: WsArgs) -> Result<()> {
    let n = args.subscribers.max(1);
    check_open_files(n + args.agents)?;
    let api = Api::new(&args.common.url)?;
    let users = args.users.unwrap_or(n.div_ceil(2));
    let keys = Arc::new(setup_keys(&api, &args.common, n, users).await?);
    let secrets: Vec<&str> = keys.iter().map(|k| k.secret.as_str()).collect();
    let sockets = open_sockets(&api, &args.common, &secrets).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let prepared_seen = Arc::new(AtomicU64::new(0));
    let subscribers: Vec<_> = sockets
        .into_iter()
        .map(|s| tokio::spawn(subscribe(s, stop_rx.clone(), prepared_seen.clone())))
        .collect();

    let pace = if args.rate > 0.0 {
        format!("{} prepares/s", args.rate)
    } else {
        "none (back to back)".into()
    };
    println!(
        "load: {} preparers for {} s (pacing: {pace}), round-robin over {n} keys",
        args.agents, args.duration
    );
    let cpu = CpuMeter::start(args.server_pid);
    let next = Arc::new(AtomicUsize::new(0));
    let (api2, keys2) = (api.clone(), keys.clone());
    let mut load = run_load(
        args.agents.max(1),
        Duration::from_secs(args.duration),
        args.rate,
        move |_, _| {
            let (api, keys, next) = (api2.clone(), keys2.clone(), next.clone());
            async move {
                let k = next.fetch_add(1, Ordering::Relaxed) % keys.len();
                prepare_one(&api, &keys, k).await
            }
        },
    )
    .await;
    let cpu_rows = cpu.rows();

    // Let events still in flight arrive, then close every socket.
    let drain_started = Instant::now();
    let expected = load.prepared.len() as u64;
    while prepared_seen.load(Ordering::Relaxed) < expected
        && drain_started.elapsed() < Duration::from_secs(args.drain)
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained_in = drain_started.elapsed();
    let _ = stop_tx.send(true);
    let mut logs = Vec::with_capacity(n);
    for handle in subscribers {
        logs.push(handle.await.unwrap_or_default());
    }

    // Exactly once, on the right socket.
    let by_tx: HashMap<&str, &Prepared> = load
        .prepared
        .iter()
        .map(|p| (p.transaction_id.as_str(), p))
        .collect();
    let mut arrivals: HashMap<&str, u32> = HashMap::new();
    let (mut misrouted, mut unknown, mut other_events) = (0u64, 0u64, 0u64);
    let mut latencies = Vec::new();
    // Receipt relative to the prepare's own 201: the server brings the views up to date (and
    // so wakes the hub) before it answers, so this is roughly the hub → socket → client part.
    let mut after_response = Vec::new();
    let mut ended_early: BTreeMap<String, u64> = BTreeMap::new();
    for (socket, log) in logs.iter().enumerate() {
        if let Some(reason) = &log.ended_early {
            *ended_early.entry(reason.clone()).or_default() += 1;
        }
        for e in &log.events {
            if e.event_type != "TransactionPrepared" {
                other_events += 1;
                continue;
            }
            latencies.push(e.latency_us);
            match by_tx.get(e.transaction_id.as_str()) {
                Some(p) => {
                    *arrivals.entry(e.transaction_id.as_str()).or_default() += 1;
                    if p.key != socket {
                        misrouted += 1;
                    }
                    let delta = (e.received_at - p.responded_at).whole_microseconds();
                    after_response.push(delta as i64);
                }
                None => unknown += 1,
            }
        }
    }
    let missing = by_tx.keys().filter(|t| !arrivals.contains_key(*t)).count();
    let duplicates: u64 = arrivals.values().map(|c| u64::from(c - 1)).sum();
    let unparsable = latencies.iter().filter(|l| **l == i64::MIN).count();
    latencies.retain(|l| *l != i64::MIN);
    let received = latencies.len() as u64;

    let mut rows = vec![
        ("subscribers (distinct API keys)".into(), n.to_string()),
        ("users".into(), users.min(n).to_string()),
        ("preparers".into(), args.agents.to_string()),
        ("pacing".into(), pace),
        (
            "load duration".into(),
            format!("{:.1} s", load.elapsed.as_secs_f64()),
        ),
        ("prepared (201)".into(), load.ok.to_string()),
        ("prepare req/s".into(), rate(load.ok, load.elapsed)),
    ];
    rows.extend(latency_rows("prepare latency", &mut load.latencies_us));
    rows.extend(error_rows(&load.errors));
    rows.push(("events received".into(), received.to_string()));
    rows.push(("events/s".into(), rate(received, load.elapsed)));
    rows.extend(latency_rows("commit→receive", &mut latencies));
    rows.push(("min commit→receive".into(), ms(latencies.first().copied())));
    rows.extend(
        latency_rows("receive − own 201", &mut after_response)
            .into_iter()
            .filter(|(k, _)| k.ends_with("p50") || k.ends_with("p99") || k.ends_with("max")),
    );
    rows.push((
        "events before their 201".into(),
        after_response
            .iter()
            .filter(|d| **d < 0)
            .count()
            .to_string(),
    ));
    rows.extend([
        ("missing events".into(), missing.to_string()),
        ("duplicate events".into(), duplicates.to_string()),
        ("misrouted events".into(), misrouted.to_string()),
        ("unknown transactions".into(), unknown.to_string()),
        ("unparsable recorded_at".into(), unparsable.to_string()),
        ("other event types".into(), other_events.to_string()),
        (
            "drain after load".into(),
            format!("{:.2} s", drained_in.as_secs_f64()),
        ),
    ]);
    let early: u64 = ended_early.values().sum();
    rows.push(("sockets ended early".into(), early.to_string()));
    rows.extend(
        ended_early
            .iter()
            .map(|(k, v)| (format!("  {k}"), v.to_string())),
    );
    rows.extend(cpu_rows);
    print_table(
        "ws: routed push, each event to exactly one subscriber",
        &rows,
    );
    if missing > 0 || duplicates > 0 || misrouted > 0 {
        bail!("delivery was not exactly-once");
    }
    Ok(())
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("no process {pid}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

async fn idle_scenario(args: IdleArgs) -> Result<()> {
    let n = args.subscribers.max(1);
    check_open_files(n)?;
    let api = Api::new(&args.common.url)?;
    rss_kib(args.server_pid)?;
    let keys = setup_keys(&api, &args.common, 1, 1).await?;
    let settle = Duration::from_secs(args.settle);

    tokio::time::sleep(settle).await;
    let before = rss_kib(args.server_pid)?;
    let secrets = vec![keys[0].secret.as_str(); n];
    let sockets = open_sockets(&api, &args.common, &secrets).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let seen = Arc::new(AtomicU64::new(0));
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|s| tokio::spawn(subscribe(s, stop_rx.clone(), seen.clone())))
        .collect();
    tokio::time::sleep(settle).await;
    let with_sockets = rss_kib(args.server_pid)?;
    let _ = stop_tx.send(true);
    let mut early = 0;
    for r in readers {
        early += u64::from(r.await.map(|l| l.ended_early.is_some()).unwrap_or(true));
    }
    tokio::time::sleep(settle).await;
    let after_close = rss_kib(args.server_pid)?;

    let per_conn = (with_sockets as f64 - before as f64) / n as f64;
    let rows = vec![
        ("idle sockets (one API key)".into(), n.to_string()),
        ("server RSS before".into(), format!("{before} KiB")),
        (
            "server RSS with sockets open".into(),
            format!("{with_sockets} KiB"),
        ),
        (
            "server RSS after closing them".into(),
            format!("{after_close} KiB"),
        ),
        ("KiB per idle connection".into(), format!("{per_conn:.1}")),
        ("sockets ended early".into(), early.to_string()),
    ];
    print_table("idle: server memory per idle WebSocket connection", &rows);
    Ok(())
}

async fn prepare_scenario(args: LoadArgs) -> Result<()> {
    let api = Api::new(&args.common.url)?;
    let agents = args.agents.max(1);
    let keys = Arc::new(setup_keys(&api, &args.common, agents, agents.div_ceil(2)).await?);
    let cpu = CpuMeter::start(args.server_pid);
    let api2 = api.clone();
    let mut load = run_load(
        agents,
        Duration::from_secs(args.duration),
        0.0,
        move |w, _| {
            let (api, keys) = (api2.clone(), keys.clone());
            async move { prepare_one(&api, &keys, w).await }
        },
    )
    .await;
    let mut rows = vec![
        ("agents (one key each)".into(), agents.to_string()),
        (
            "duration".into(),
            format!("{:.1} s", load.elapsed.as_secs_f64()),
        ),
        ("prepared (201)".into(), load.ok.to_string()),
        ("req/s".into(), rate(load.ok, load.elapsed)),
    ];
    rows.extend(latency_rows("latency", &mut load.latencies_us));
    rows.extend(error_rows(&load.errors));
    rows.extend(cpu.rows());
    print_table("prepare: POST /api/prepare_transaction", &rows);
    Ok(())
}

async fn status_scenario(args: StatusArgs) -> Result<()> {
    let common = &args.load.common;
    let api = Api::new(&common.url)?;
    let agents = args.load.agents.max(1);
    let keys = Arc::new(setup_keys(&api, common, agents, agents.div_ceil(2)).await?);
    let pool = args.pool.max(1);

    // Each agent's own transactions (an agent sees what its key prepared).
    let mut pools: Vec<Vec<String>> = vec![Vec::with_capacity(pool); agents];
    for (k, ids) in pools.iter_mut().enumerate() {
        for _ in 0..pool {
            match prepare_one(&api, &keys, k).await {
                Ok(Some(p)) => ids.push(p.transaction_id),
                other => bail!("preparing the pool failed: {:?}", other.err()),
            }
        }
    }
    println!("setup: {} transactions prepared to read", agents * pool);

    let pools = Arc::new(pools);
    let cpu = CpuMeter::start(args.load.server_pid);
    let api2 = api.clone();
    let mut load = run_load(
        agents,
        Duration::from_secs(args.load.duration),
        0.0,
        move |w, i| {
            let (api, keys, pools) = (api2.clone(), keys.clone(), pools.clone());
            async move {
                let id = &pools[w][i % pools[w].len()];
                let path = format!("/api/transaction_status?transaction_id={id}");
                let result = api
                    .call(
                        reqwest::Method::GET,
                        &path,
                        Auth::Key(&keys[w].secret),
                        None,
                    )
                    .await;
                if let Some(label) = error_label(&result, StatusCode::OK) {
                    return Err(label);
                }
                match result {
                    Ok((_, body)) if body["transaction_id"] == id.as_str() => Ok(None),
                    _ => Err("wrong transaction in response".into()),
                }
            }
        },
    )
    .await;
    let mut rows = vec![
        ("readers (one key each)".into(), agents.to_string()),
        ("transactions per reader".into(), pool.to_string()),
        (
            "duration".into(),
            format!("{:.1} s", load.elapsed.as_secs_f64()),
        ),
        ("reads (200)".into(), load.ok.to_string()),
        ("req/s".into(), rate(load.ok, load.elapsed)),
    ];
    rows.extend(latency_rows("latency", &mut load.latencies_us));
    rows.extend(error_rows(&load.errors));
    rows.extend(cpu.rows());
    print_table("status: GET /api/transaction_status", &rows);
    Ok(())
}
