//! `loadgen`: load scenarios against a running Countersign server, over its real HTTP and
//! WebSocket API. It sets up its own users, wallets and API keys through the API, sends traffic
//! only to the `--url` it is given (which must be a loopback address; so must `--chain-url` and
//! `--database-url`), and every scenario stops by itself after its `--duration`.
//!
//! ```text
//! cargo run --release --bin loadgen -- ws      --url http://127.0.0.1:8080 [--subscribers 1000]
//! cargo run --release --bin loadgen -- idle    --url http://127.0.0.1:8080 --server-pid PID
//! cargo run --release --bin loadgen -- prepare --url http://127.0.0.1:8080 [--agents 8] --database-url URL
//! cargo run --release --bin loadgen -- status  --url http://127.0.0.1:8080 [--agents 8]
//! cargo run --release --bin loadgen -- flow    --url http://127.0.0.1:8080 --chain-url http://127.0.0.1:8545
//! cargo run --release --bin loadgen -- login   --url http://127.0.0.1:8080 [--agents 8] [--logins 8]
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
//! the time between the insert and its commit (the rest of its batch transaction, and the
//! commit's WAL flush), reported as `insert→receive`. `commit→receive` is `now_utc −
//! committed_at`: the server stamps `committed_at` when its writer sees the commit
//! acknowledged, just before handing the events to the hub. After the last prepare the sockets get
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
//! **Baseline (`prepare`; `flow` with `--baseline true`).** In the same run, after the load:
//! the database's own rate for a one-row INSERT into a table shaped like `events` (its columns,
//! types, primary key and unique position index; no position trigger) at the same concurrency,
//! with a ~700-byte `TransactionPrepared`-like payload. PostgreSQL: `pgbench -n -c N -j 2 -T D
//! -f insert.sql` in a scratch database on the server's PostgreSQL (created and dropped by the
//! tool). SQLite: N tasks inserting through an sqlx pool with the server's options (WAL,
//! `synchronous=FULL`, 10 s busy timeout, 8 connections; `src/store.rs`) into a scratch file
//! next to the server's database (removed afterwards). Printed: the baseline's tps and
//! `ratio = prepare req/s / baseline tps`. It needs `--database-url` (or `DATABASE_URL`), the
//! server's own; `--baseline false` skips it.
//!
//! **`flow` — end to end.** `--users U` users (default 8 per worker), each with MFA, one wallet
//! funded on the dev chain (`anvil_setBalance` at `--chain-url`) and one API key, shared out
//! among `--agents N` workers (no two workers share a user). A worker loops: take the user
//! whose next TOTP step comes first (waiting for the clock if all of its users spent theirs),
//! prepare `--batch B` (default 20) transactions with that user's key, authorize all of them
//! with one code (`/api/authorize_transactions`; `--batch 1`: `/api/authorize_transaction`),
//! then execute each (simulated, signed and broadcast to the chain by the server). A user may
//! spend one code per 30-s step (three at once at first, two of which set-up takes), so the
//! rate is bounded by `U × B / 30 s` in the long run: the time workers wait for a step is
//! reported, and a large
//! share means the run measured the TOTP budget rather than the server. Reported: flows/s (a
//! flow counts when its execute answers 200 with a `tx_hash`), flow latency (its prepare sent →
//! its execute answered, batching included), per-stage latency, errors by stage, and after the
//! load how many executed transactions reached `confirmed` within `--drain` seconds.
//!
//! **`login` — logins next to other traffic.** The `status` set-up, plus one registered user.
//! Phase 1: the readers alone for `--duration`. Phase 2: the readers again while `--logins L`
//! loops call `POST /api/login` back to back (argon2id, ~20–25 ms of one core each, at most one
//! per core at a time on the server's blocking pool). Reported: the reads' req/s and latency in
//! each phase, the logins' rate and latency, and CPU per phase: what logins cost other requests.
//!
//! `ws`, `prepare`, `status`, `flow` and `login` also take `--server-pid` to report the server
//! process's CPU use during the load (and every scenario reports this tool's own, since it
//! shares the machine).
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
    /// Concurrent prepare_transaction: req/s and latency, and the database's own INSERT rate.
    Prepare(PrepareArgs),
    /// Concurrent transaction_status reads: req/s and latency.
    Status(StatusArgs),
    /// End to end: prepare → authorize with TOTP → execute on anvil: flows/s, per-stage latency.
    Flow(FlowArgs),
    /// Logins (argon2id) next to transaction_status reads: the reads' latency with and without.
    Login(LoginArgs),
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

/// The database's own write rate, measured in the same run (see the module doc).
#[derive(Args)]
struct BaselineArgs {
    /// Also measure a one-row INSERT into an events-shaped scratch table at the same
    /// concurrency (pgbench on PostgreSQL, an sqlx pool on SQLite) and print the ratio
    /// [default: true for prepare, false for flow].
    #[arg(long, action = clap::ArgAction::Set)]
    baseline: Option<bool>,
    /// The server's database (its DATABASE_URL): the baseline runs on the same PostgreSQL
    /// server (in a scratch database) or next to the SQLite file (in a scratch file).
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Seconds of baseline [default: the load's duration].
    #[arg(long)]
    baseline_duration: Option<u64>,
}

#[derive(Args)]
struct PrepareArgs {
    #[command(flatten)]
    load: LoadArgs,
    #[command(flatten)]
    baseline: BaselineArgs,
}

#[derive(Args)]
struct FlowArgs {
    #[command(flatten)]
    common: Common,
    /// Concurrent flow workers.
    #[arg(long, default_value_t = 8)]
    agents: usize,
    /// Users, each with MFA, one funded wallet and one API key, shared out among the workers
    /// [default: 8 per worker].
    #[arg(long)]
    users: Option<usize>,
    /// Transactions per authorization: one TOTP code authorizes the whole batch
    /// (`/api/authorize_transactions`, at most 50); 1 uses `/api/authorize_transaction`.
    #[arg(long, default_value_t = 20)]
    batch: usize,
    /// Seconds of load.
    #[arg(long, default_value_t = 30)]
    duration: u64,
    /// The chain the server uses (anvil, loopback): wallets are funded with `anvil_setBalance`.
    #[arg(
        long,
        env = "WEB3_PROVIDER_URI",
        default_value = "http://127.0.0.1:8545"
    )]
    chain_url: String,
    /// Seconds to wait after the load for the receipts of the executed transactions.
    #[arg(long, default_value_t = 20)]
    drain: u64,
    /// Server process id, to report its CPU use.
    #[arg(long)]
    server_pid: Option<u32>,
    #[command(flatten)]
    baseline: BaselineArgs,
}

#[derive(Args)]
struct LoginArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Transactions each reader prepares first and then reads.
    #[arg(long, default_value_t = 20)]
    pool: usize,
    /// Concurrent login loops (back to back) in the second phase.
    #[arg(long, default_value_t = 8)]
    logins: usize,
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
        Scenario::Flow(args) => flow_scenario(args).await,
        Scenario::Login(args) => login_scenario(args).await,
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
    /// Keep-alive connections for the measured requests (see [`Api::send`]).
    idle: Arc<std::sync::Mutex<Vec<Conn>>>,
    addr: String,
}

/// One keep-alive HTTP/1.1 connection of the load itself.
struct Conn {
    stream: tokio::net::TcpStream,
    buffer: Vec<u8>,
}

/// Why a measured request got no answer.
#[derive(Debug)]
enum SendError {
    Timeout,
    Connect(std::io::Error),
    Transport(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout => write!(f, "timed out"),
            Self::Connect(e) => write!(f, "connect: {e}"),
            Self::Transport(e) => write!(f, "{e}"),
        }
    }
}

impl Conn {
    /// Write one request and read its response: `(status, body)`, and whether the connection
    /// may be used again.
    async fn exchange(&mut self, request: &[u8]) -> Result<(u16, Vec<u8>, bool), String> {
        use tokio::io::AsyncWriteExt;
        self.stream
            .write_all(request)
            .await
            .map_err(|e| e.to_string())?;
        self.buffer.clear();
        let head_end = loop {
            if let Some(i) = find(&self.buffer, b"\r\n\r\n") {
                break i + 4;
            }
            self.read_more().await?;
        };
        let head = std::str::from_utf8(&self.buffer[..head_end]).map_err(|e| e.to_string())?;
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .ok_or("malformed status line")?;
        let mut length = 0;
        let mut reusable = true;
        for line in head.split("\r\n").skip(1) {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().map_err(|_| "bad content-length")?;
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(format!("unexpected transfer-encoding {value}"));
            } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close")
            {
                reusable = false;
            }
        }
        while self.buffer.len() < head_end + length {
            self.read_more().await?;
        }
        let body = self.buffer[head_end..head_end + length].to_vec();
        Ok((status, body, reusable))
    }

    async fn read_more(&mut self) -> Result<(), String> {
        use tokio::io::AsyncReadExt;
        let mut chunk = [0u8; 8192];
        let n = self
            .stream
            .read(&mut chunk)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        self.buffer.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

impl Api {
    fn new(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url).with_context(|| format!("--url {url}"))?;
        if parsed.scheme() != "http" || !is_loopback(&parsed) {
            bail!("--url must be http:// on a loopback address (127.0.0.0/8, localhost, [::1])");
        }
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(256)
            .build()?;
        let addr = format!(
            "{}:{}",
            parsed.host_str().unwrap_or("127.0.0.1"),
            parsed.port_or_known_default().unwrap_or(80)
        );
        Ok(Self {
            client,
            base: url.trim_end_matches('/').to_owned(),
            idle: Arc::default(),
            addr,
        })
    }

    /// One measured request, on a keep-alive connection of its own (taken from and returned to
    /// a small pool): the request is written in one piece and the response read straight off
    /// the socket, so the tool spends as little of the machine it shares with the server as it
    /// can (`reqwest`'s pool and connection tasks cost more than the request). Any HTTP status
    /// is `Ok`.
    async fn send(
        &self,
        method: &str,
        path: &str,
        api_key: &str,
        body: Option<&str>,
    ) -> Result<(StatusCode, Vec<u8>), SendError> {
        let mut request = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\nx-api-key: {api_key}\r\n",
            self.addr
        );
        match body {
            Some(body) => {
                request.push_str("content-type: application/json\r\ncontent-length: ");
                request.push_str(&body.len().to_string());
                request.push_str("\r\n\r\n");
                request.push_str(body);
            }
            None => request.push_str("\r\n"),
        }
        let taken = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let exchange = async {
            let mut conn = match taken {
                Some(conn) => conn,
                None => {
                    let stream = tokio::net::TcpStream::connect(&self.addr)
                        .await
                        .map_err(SendError::Connect)?;
                    let _ = stream.set_nodelay(true);
                    Conn {
                        stream,
                        buffer: Vec::with_capacity(4096),
                    }
                }
            };
            let (status, body, reusable) = conn
                .exchange(request.as_bytes())
                .await
                .map_err(SendError::Transport)?;
            if reusable {
                self.idle
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(conn);
            }
            let status =
                StatusCode::from_u16(status).map_err(|e| SendError::Transport(e.to_string()))?;
            Ok((status, body))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| SendError::Timeout)?
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
            // The previous step's code expires with this step: in its last seconds the clock
            // could tick before the server checks it (a refused code counts towards the MFA
            // lockout), so then start from the current step.
            let secs_into_step = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() % TOTP_STEP_SECS);
            let earliest = if secs_into_step < TOTP_STEP_SECS - 5 {
                now.saturating_sub(1)
            } else {
                now
            };
            let step = (self.last_step + 1).max(earliest);
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
    let owners = setup_owners(api, common, n_keys, n_users).await?;
    Ok(owners.into_iter().flat_map(|(_, keys)| keys).collect())
}

/// [`setup_keys`], keeping each user (to authorize with its TOTP codes) with its keys.
async fn setup_owners(
    api: &Api,
    common: &Common,
    n_keys: usize,
    n_users: usize,
) -> Result<Vec<(User, Vec<Key>)>> {
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
            anyhow::Ok((u, user, keys))
        }
    });
    let mut results: Vec<(usize, User, Vec<Key>)> = tokio::time::timeout(
        Duration::from_secs(common.setup_timeout),
        futures::stream::iter(tasks)
            .buffer_unordered(common.setup_concurrency.max(1))
            .collect::<Vec<_>>(),
    )
    .await
    .context("set-up timed out (--setup-timeout)")?
    .into_iter()
    .collect::<Result<_>>()?;
    results.sort_by_key(|(u, _, _)| *u);
    println!("setup: done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(results
        .into_iter()
        .map(|(_, user, keys)| (user, keys))
        .collect())
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
    /// `now − committed_at` (`i64::MIN` when the server sent none: a replay).
    after_commit_us: i64,
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
                    let since = |field: &str| {
                        v[field]
                            .as_str()
                            .and_then(|s| OffsetDateTime::parse(s, &Rfc3339).ok())
                            .map_or(i64::MIN, |at| (now - at).whole_microseconds() as i64)
                    };
                    let latency_us = since("recorded_at");
                    let after_commit_us = since("committed_at");
                    let event_type = v["event_type"].as_str().unwrap_or_default().to_owned();
                    if event_type == "TransactionPrepared" {
                        prepared_seen.fetch_add(1, Ordering::Relaxed);
                    }
                    log.events.push(Received {
                        transaction_id: v["transaction_id"].as_str().unwrap_or_default().to_owned(),
                        event_type,
                        latency_us,
                        after_commit_us,
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
    #[derive(serde::Deserialize)]
    struct Created {
        transaction_id: String,
    }
    let key = &keys[k];
    let body = format!(
        r#"{{"wallet_address":"{}","kind":"native","to":"{}","value":"1"}}"#,
        key.wallet,
        random_address()
    );
    let result = api
        .send("POST", "/api/prepare_transaction", &key.secret, Some(&body))
        .await;
    let body = answer(result, StatusCode::CREATED)?;
    match serde_json::from_slice::<Created>(&body) {
        Ok(created) => Ok(Some(Prepared {
            transaction_id: created.transaction_id,
            key: k,
            responded_at: OffsetDateTime::now_utc(),
        })),
        Err(_) => Err("201 without transaction_id".into()),
    }
}

/// The body of a measured request that answered `want`, else its error label.
fn answer(
    result: Result<(StatusCode, Vec<u8>), SendError>,
    want: StatusCode,
) -> Result<Vec<u8>, String> {
    match result {
        Ok((status, body)) if status == want => Ok(body),
        Ok((status, body)) => {
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            Err(format!(
                "HTTP {} {}",
                status.as_u16(),
                body["error"]["code"].as_str().unwrap_or("")
            ))
        }
        Err(SendError::Timeout) => Err("timeout".into()),
        Err(SendError::Connect(_)) => Err("connect error".into()),
        Err(SendError::Transport(_)) => Err("transport error".into()),
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
    let mut after_commit = Vec::new();
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
            if e.after_commit_us != i64::MIN {
                after_commit.push(e.after_commit_us);
            }
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
    rows.extend(latency_rows("insert→receive", &mut latencies));
    rows.push(("min insert→receive".into(), ms(latencies.first().copied())));
    rows.extend(latency_rows("commit→receive", &mut after_commit));
    rows.push((
        "events without committed_at".into(),
        received
            .saturating_sub(after_commit.len() as u64)
            .to_string(),
    ));
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

async fn prepare_scenario(args: PrepareArgs) -> Result<()> {
    let PrepareArgs {
        load: args,
        baseline,
    } = args;
    let database = baseline_database(&baseline, true)?;
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
    if let Some(database) = database {
        let seconds = baseline.baseline_duration.unwrap_or(args.duration);
        let measured = run_baseline(&database, agents, seconds).await?;
        let req_s = load.ok as f64 / load.elapsed.as_secs_f64().max(1e-9);
        rows.extend(measured.rows(req_s, "prepare req/s"));
    }
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
                status_read(&api, &keys[w], id).await
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

// ---------------------------------------------------------------------------------------------
// Baselines: the database's own one-row INSERT rate, in the same run
// ---------------------------------------------------------------------------------------------

/// A `TransactionPrepared`-sized payload and metadata (about 700 bytes together). Every colon
/// is followed by a space: pgbench reads `:name` in a script as a variable.
const BASELINE_PAYLOAD: &str = r#"{"TransactionPrepared": {"transaction_id": "5b0e9c1e-8a51-4c3e-9a43-2f7f4f3c1d2a", "wallet_address": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", "owner_user_id": "0d6f5b8e-3c1a-4a59-8f67-1c2d3e4f5a6b", "api_key_id": "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a", "kind": "native", "payload": {"chain_id": 31337, "from": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed", "to": "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359", "value": "1", "data": "0x"}, "payload_digest": "3f0c1e2d4b5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0", "summary": "Send 0.000000000000000001 ETH to 0xfB69…d359", "memo": null, "expires_at": "2026-11-29T10:15:00Z", "simulation": {"outcome": {"status": "success"}, "gas_estimate": 21000, "max_fee_per_gas": 2000000000, "max_fee_wei": "50400000000000"}}}"#;
const BASELINE_METADATA: &str = r#"{"actor": "9f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a", "actor_type": "api_key", "request_id": "1c9d2f6e-7b3a-4e58-a1d0-3b2c1d0e9f8a", "time": "2026-11-29T10:00:00.123456Z", "source_ip": "127.0.0.1"}"#;

/// The server's database, for the baseline.
enum BaselineDb {
    Postgres(String),
    Sqlite(std::path::PathBuf),
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        // Non-http schemes (postgres://) leave IP addresses unparsed.
        Some(url::Host::Domain(d)) => {
            d == "localhost"
                || d.trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|a| a.is_loopback())
        }
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback(),
        None => false,
    }
}

/// Which baseline to run, if any (`default_on` when `--baseline` is not given).
fn baseline_database(args: &BaselineArgs, default_on: bool) -> Result<Option<BaselineDb>> {
    if !args.baseline.unwrap_or(default_on) {
        return Ok(None);
    }
    let Some(url) = args.database_url.as_deref() else {
        bail!(
            "the baseline needs the server's database: pass --database-url (or set \
             DATABASE_URL), or --baseline false"
        );
    };
    let (scheme, rest) = url
        .split_once("://")
        .context("--database-url is not a URL")?;
    match scheme {
        "postgres" | "postgresql" => {
            let parsed = url::Url::parse(url).context("--database-url")?;
            if !is_loopback(&parsed) {
                bail!("--database-url must name a PostgreSQL server on a loopback address");
            }
            Ok(Some(BaselineDb::Postgres(url.to_owned())))
        }
        "sqlite" => {
            let path = rest.split('?').next().unwrap_or_default();
            if path.is_empty() || path == ":memory:" {
                bail!("--database-url must name the server's SQLite file");
            }
            Ok(Some(BaselineDb::Sqlite(path.into())))
        }
        other => bail!("--database-url: unsupported scheme {other:?}"),
    }
}

/// What the baseline measured.
struct Baseline {
    what: String,
    tps: f64,
    latency_avg_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
}

impl Baseline {
    fn rows(&self, req_s: f64, label: &str) -> Vec<(String, String)> {
        let mut rows = vec![
            ("baseline".to_owned(), self.what.clone()),
            (
                "baseline INSERT tps".to_owned(),
                format!("{:.1}/s", self.tps),
            ),
        ];
        if let Some(avg) = self.latency_avg_ms {
            rows.push(("baseline latency avg".into(), format!("{avg:.3} ms")));
        }
        if let Some(p99) = self.latency_p99_ms {
            rows.push(("baseline latency p99".into(), format!("{p99:.3} ms")));
        }
        rows.push((
            format!("ratio = {label} / baseline tps"),
            format!("{:.3}", req_s / self.tps.max(1e-9)),
        ));
        rows
    }
}

async fn run_baseline(db: &BaselineDb, concurrency: usize, seconds: u64) -> Result<Baseline> {
    let concurrency = concurrency.max(1);
    let seconds = seconds.max(1);
    println!("baseline: one-row INSERTs, {concurrency} concurrent, {seconds} s");
    match db {
        BaselineDb::Postgres(url) => pgbench_baseline(url, concurrency, seconds).await,
        BaselineDb::Sqlite(path) => sqlite_baseline(path, concurrency, seconds).await,
    }
}

/// pgbench with a one-row INSERT into an events-shaped table (the events table's columns,
/// types, primary key and position index; no position trigger) in a scratch database on the
/// server's PostgreSQL, dropped afterwards.
async fn pgbench_baseline(url: &str, clients: usize, seconds: u64) -> Result<Baseline> {
    let name = format!("loadgen_baseline_{:08x}", rand::random::<u32>());
    let admin = sqlx::PgPool::connect(url)
        .await
        .context("connecting to --database-url")?;
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&admin)
        .await
        .context("creating the scratch database")?;
    let mut scratch_url = url::Url::parse(url)?;
    scratch_url.set_path(&name);
    let result = async {
        let scratch = sqlx::PgPool::connect(scratch_url.as_str()).await?;
        sqlx::raw_sql(
            "CREATE SEQUENCE events_position_seq AS bigint;
             CREATE TABLE events
             (
                 aggregate_type text                         NOT NULL,
                 aggregate_id   text                         NOT NULL,
                 sequence       bigint CHECK (sequence >= 0) NOT NULL,
                 event_type     text                         NOT NULL,
                 event_version  text                         NOT NULL,
                 payload        json                         NOT NULL,
                 metadata       json                         NOT NULL,
                 position       bigint NOT NULL DEFAULT nextval('events_position_seq'),
                 recorded_at    timestamptz                  NOT NULL DEFAULT clock_timestamp(),
                 PRIMARY KEY (aggregate_type, aggregate_id, sequence)
             );
             CREATE UNIQUE INDEX events_position_idx ON events (position);",
        )
        .execute(&scratch)
        .await?;
        scratch.close().await;
        let dir = tempfile_dir()?;
        let script = dir.join("insert.sql");
        std::fs::write(
            &script,
            format!(
                "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, \
                 event_version, payload, metadata) VALUES ('Transaction', \
                 CAST(gen_random_uuid() AS text), 0, 'TransactionPrepared', '1.0', \
                 '{BASELINE_PAYLOAD}', '{BASELINE_METADATA}');\n"
            ),
        )?;
        let threads = clients.min(2);
        let output = tokio::process::Command::new("pgbench")
            .args(["-n", "-c", &clients.to_string(), "-j", &threads.to_string()])
            .args(["-T", &seconds.to_string(), "-f"])
            .arg(&script)
            .arg(scratch_url.as_str())
            .output()
            .await
            .context("running pgbench (it comes with PostgreSQL; is it on PATH?)");
        let _ = std::fs::remove_dir_all(&dir);
        let output = output?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            bail!(
                "pgbench failed: {}{}",
                stdout,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let number_after = |prefix: &str| {
            stdout
                .lines()
                .find_map(|l| l.trim().strip_prefix(prefix))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<f64>().ok())
        };
        let tps = number_after("tps = ").context("no tps in pgbench's output")?;
        let failed = number_after("number of failed transactions: ").unwrap_or(0.0);
        if failed > 0.0 {
            bail!("pgbench: {failed} failed transactions:\n{stdout}");
        }
        Ok(Baseline {
            what: format!("pgbench -n -c {clients} -j {threads} -T {seconds}"),
            tps,
            latency_avg_ms: number_after("latency average = "),
            latency_p99_ms: None,
        })
    }
    .await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&admin)
        .await;
    admin.close().await;
    result
}

/// A private scratch directory under the system temp dir.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("loadgen-{:08x}", rand::random::<u32>()));
    std::fs::create_dir(&dir)?;
    Ok(dir)
}

/// The same one-row INSERT through an sqlx pool with the server's SQLite options (WAL,
/// synchronous=FULL, 10 s busy timeout, 8 connections: see `src/store.rs`) into an
/// events-shaped table in a scratch file next to the server's database, removed afterwards.
async fn sqlite_baseline(
    server_db: &std::path::Path,
    tasks: usize,
    seconds: u64,
) -> Result<Baseline> {
    use sqlx::sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
    };
    let dir = match server_db.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let file = dir.join(format!("loadgen-baseline-{:08x}.db", rand::random::<u32>()));
    let options = SqliteConnectOptions::new()
        .filename(&file)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(8)
        .connect_with(options)
        .await
        .with_context(|| format!("creating {}", file.display()))?;
    let result = async {
        sqlx::raw_sql(
            "CREATE TABLE events
             (
                 aggregate_type text                          NOT NULL,
                 aggregate_id   text                          NOT NULL,
                 sequence       integer CHECK (sequence >= 0) NOT NULL,
                 event_type     text                          NOT NULL,
                 event_version  text                          NOT NULL,
                 payload        text                          NOT NULL,
                 metadata       text                          NOT NULL,
                 position       integer UNIQUE,
                 recorded_at    text NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                 PRIMARY KEY (aggregate_type, aggregate_id, sequence)
             ) STRICT;",
        )
        .execute(&pool)
        .await?;
        let position = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let deadline = started + Duration::from_secs(seconds);
        let handles: Vec<_> = (0..tasks)
            .map(|_| {
                let (pool, position) = (pool.clone(), position.clone());
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        sqlx::query(
                            "INSERT INTO events (aggregate_type, aggregate_id, sequence, \
                             event_type, event_version, payload, metadata, position) \
                             VALUES ('Transaction', $1, 0, 'TransactionPrepared', '1.0', $2, $3, \
                             $4)",
                        )
                        .bind(uuid::Uuid::new_v4().to_string())
                        .bind(BASELINE_PAYLOAD)
                        .bind(BASELINE_METADATA)
                        .bind(position.fetch_add(1, Ordering::Relaxed) as i64 + 1)
                        .execute(&pool)
                        .await?;
                        latencies.push(t.elapsed().as_micros() as i64);
                    }
                    anyhow::Ok(latencies)
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for h in handles {
            latencies.extend(h.await??);
        }
        let elapsed = started.elapsed();
        latencies.sort_unstable();
        let avg = latencies.iter().sum::<i64>() as f64 / latencies.len().max(1) as f64 / 1000.0;
        Ok(Baseline {
            what: format!("sqlx pool (WAL, sync=FULL), {tasks} tasks, {seconds} s"),
            tps: latencies.len() as f64 / elapsed.as_secs_f64(),
            latency_avg_ms: Some(avg),
            latency_p99_ms: percentile(&latencies, 99.0).map(|us| us as f64 / 1000.0),
        })
    }
    .await;
    pool.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let mut name = file.clone().into_os_string();
        name.push(suffix);
        let _ = std::fs::remove_file(name);
    }
    result
}

// ---------------------------------------------------------------------------------------------
// flow: prepare → authorize (TOTP) → execute, end to end
// ---------------------------------------------------------------------------------------------

/// A user with its wallet's API key.
struct Owner {
    user: User,
    key: Key,
}

impl User {
    /// Wait until a code for an unspent step is accepted, without spending it.
    async fn wait_for_code(&self) {
        while self.last_step + 1 > unix_step() + 1 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[derive(Default)]
struct FlowReport {
    flow_us: Vec<i64>,
    prepare_us: Vec<i64>,
    authorize_us: Vec<i64>,
    execute_us: Vec<i64>,
    totp_wait: Duration,
    errors: BTreeMap<String, u64>,
    /// Executed transactions and the key that may read them.
    executed: Vec<(String, String)>,
}

/// Authorize `ids` with one fresh code of `user` (one id: the single endpoint). A request that
/// crosses a step boundary can miss its window; then the next step is tried (a few times).
async fn authorize_batch(api: &Api, user: &mut User, ids: &[String]) -> Result<(), String> {
    let (path, mut body) = match ids {
        [id] => ("/api/authorize_transaction", json!({"transaction_id": id})),
        _ => (
            "/api/authorize_transactions",
            json!({"transaction_ids": ids}),
        ),
    };
    for _ in 0..3 {
        body["mfa_code"] = user.fresh_code().await.into();
        let result = api
            .call(
                reqwest::Method::POST,
                path,
                Auth::Bearer(&user.token),
                Some(&body),
            )
            .await;
        match error_label(&result, StatusCode::OK) {
            None => return Ok(()),
            Some(label) if label == "HTTP 403 invalid_mfa_code" => continue,
            Some(label) => return Err(label),
        }
    }
    Err("HTTP 403 invalid_mfa_code".into())
}

async fn flow_worker(
    api: Api,
    mut owners: Vec<Owner>,
    batch: usize,
    deadline: Instant,
) -> FlowReport {
    let mut report = FlowReport::default();
    let error = |report: &mut FlowReport, label: String| {
        *report.errors.entry(label).or_default() += 1;
    };
    while Instant::now() < deadline && !owners.is_empty() {
        // The owner whose next TOTP step comes first.
        let i = (0..owners.len())
            .min_by_key(|i| owners[*i].user.last_step)
            .unwrap_or(0);
        let owner = &mut owners[i];
        let waited = Instant::now();
        owner.user.wait_for_code().await;
        report.totp_wait += waited.elapsed();
        if Instant::now() >= deadline {
            break;
        }
        let mut prepared: Vec<(String, Instant)> = Vec::with_capacity(batch);
        for _ in 0..batch {
            let t = Instant::now();
            let result = api
                .call(
                    reqwest::Method::POST,
                    "/api/prepare_transaction",
                    Auth::Key(&owner.key.secret),
                    Some(&prepare_body(&owner.key.wallet)),
                )
                .await;
            report.prepare_us.push(t.elapsed().as_micros() as i64);
            if let Some(label) = error_label(&result, StatusCode::CREATED) {
                error(&mut report, format!("prepare: {label}"));
                continue;
            }
            match result
                .ok()
                .and_then(|(_, b)| b["transaction_id"].as_str().map(str::to_owned))
            {
                Some(id) => prepared.push((id, t)),
                None => error(&mut report, "prepare: 201 without transaction_id".into()),
            }
        }
        if prepared.is_empty() {
            continue;
        }
        let ids: Vec<String> = prepared.iter().map(|(id, _)| id.clone()).collect();
        let t = Instant::now();
        let authorized = authorize_batch(&api, &mut owner.user, &ids).await;
        report.authorize_us.push(t.elapsed().as_micros() as i64);
        if let Err(label) = authorized {
            error(&mut report, format!("authorize: {label}"));
            continue;
        }
        for (id, started) in prepared {
            let t = Instant::now();
            let result = api
                .call(
                    reqwest::Method::POST,
                    "/api/execute_transaction",
                    Auth::Key(&owner.key.secret),
                    Some(&json!({"transaction_id": id})),
                )
                .await;
            report.execute_us.push(t.elapsed().as_micros() as i64);
            if let Some(label) = error_label(&result, StatusCode::OK) {
                error(&mut report, format!("execute: {label}"));
                continue;
            }
            let hashed = result.is_ok_and(|(_, b)| b["tx_hash"].as_str().is_some());
            if !hashed {
                error(&mut report, "execute: 200 without tx_hash".into());
                continue;
            }
            report.flow_us.push(started.elapsed().as_micros() as i64);
            report.executed.push((id, owner.key.secret.clone()));
        }
    }
    report
}

/// Give `wallet` 1,000 ETH on the dev chain.
async fn fund(client: &reqwest::Client, chain_url: &str, wallet: &str) -> Result<()> {
    let body = json!({"jsonrpc": "2.0", "id": 1, "method": "anvil_setBalance",
                      "params": [wallet, "0x3635C9ADC5DEA00000"]});
    let resp: Value = client
        .post(chain_url)
        .json(&body)
        .send()
        .await
        .context("--chain-url unreachable")?
        .json()
        .await?;
    if resp.get("error").is_some() {
        bail!("anvil_setBalance failed (is --chain-url an anvil node?): {resp}");
    }
    Ok(())
}

async fn flow_scenario(args: FlowArgs) -> Result<()> {
    let database = baseline_database(&args.baseline, false)?;
    let api = Api::new(&args.common.url)?;
    let chain = url::Url::parse(&args.chain_url).context("--chain-url")?;
    if !is_loopback(&chain) {
        bail!("--chain-url must be on a loopback address");
    }
    let workers = args.agents.max(1);
    let batch = args.batch.clamp(1, 50);
    let n_users = args.users.unwrap_or(workers * 8).max(workers);
    let owners = setup_owners(&api, &args.common, n_users, n_users).await?;
    let client = reqwest::Client::builder().no_proxy().build()?;
    for (user, _) in &owners {
        fund(&client, chain.as_str(), &user.wallet).await?;
    }
    println!("setup: {n_users} wallets funded on {chain}");
    // Owner u works for worker u % workers, so no two workers share a user's TOTP steps.
    let mut shares: Vec<Vec<Owner>> = (0..workers).map(|_| Vec::new()).collect();
    for (u, (user, mut keys)) in owners.into_iter().enumerate() {
        let key = keys.pop().context("a user without a key")?;
        shares[u % workers].push(Owner { user, key });
    }
    println!(
        "load: {workers} workers for {} s, batches of {batch} (one TOTP code each), \
         {n_users} users",
        args.duration
    );
    let cpu = CpuMeter::start(args.server_pid);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.duration);
    let handles: Vec<_> = shares
        .into_iter()
        .map(|share| tokio::spawn(flow_worker(api.clone(), share, batch, deadline)))
        .collect();
    let mut total = FlowReport::default();
    for h in handles {
        let r = h.await.context("flow worker panicked")?;
        total.flow_us.extend(r.flow_us);
        total.prepare_us.extend(r.prepare_us);
        total.authorize_us.extend(r.authorize_us);
        total.execute_us.extend(r.execute_us);
        total.totp_wait += r.totp_wait;
        for (k, v) in r.errors {
            *total.errors.entry(k).or_default() += v;
        }
        total.executed.extend(r.executed);
    }
    let elapsed = started.elapsed();
    let cpu_rows = cpu.rows();

    // The receipts: every executed transaction should be mined and confirmed.
    let drain_started = Instant::now();
    let mut pending: Vec<(String, String)> = total.executed.clone();
    let mut final_status: BTreeMap<String, u64> = BTreeMap::new();
    while !pending.is_empty() {
        let checks = futures::stream::iter(pending.into_iter().map(|(id, key)| {
            let api = api.clone();
            async move {
                let path = format!("/api/transaction_status?transaction_id={id}");
                let status = api
                    .call(reqwest::Method::GET, &path, Auth::Key(&key), None)
                    .await
                    .ok()
                    .and_then(|(_, b)| b["status"].as_str().map(str::to_owned));
                (id, key, status)
            }
        }))
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
        let timed_out = drain_started.elapsed() > Duration::from_secs(args.drain);
        pending = Vec::new();
        for (id, key, status) in checks {
            match status.as_deref() {
                Some("confirmed") | Some("failed") => {
                    *final_status.entry(status.unwrap_or_default()).or_default() += 1
                }
                other if timed_out => {
                    *final_status
                        .entry(other.unwrap_or("unreadable").to_owned())
                        .or_default() += 1
                }
                _ => pending.push((id, key)),
            }
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    let flows = total.flow_us.len() as u64;
    let worker_time = elapsed.as_secs_f64() * workers as f64;
    let mut rows = vec![
        ("workers".into(), workers.to_string()),
        (
            "users (MFA, funded wallet, key)".into(),
            n_users.to_string(),
        ),
        ("transactions per TOTP code".into(), batch.to_string()),
        ("duration".into(), format!("{:.1} s", elapsed.as_secs_f64())),
        (
            "flows (executed, 200 with tx_hash)".into(),
            flows.to_string(),
        ),
        ("flows/s".into(), rate(flows, elapsed)),
    ];
    rows.extend(latency_rows(
        "flow (prepare sent → executed)",
        &mut total.flow_us,
    ));
    rows.push((
        "prepare requests".into(),
        total.prepare_us.len().to_string(),
    ));
    rows.extend(latency_rows("prepare", &mut total.prepare_us));
    rows.push((
        format!("authorize requests ({batch} per request)"),
        total.authorize_us.len().to_string(),
    ));
    rows.extend(latency_rows("authorize", &mut total.authorize_us));
    rows.push((
        "execute requests".into(),
        total.execute_us.len().to_string(),
    ));
    rows.extend(latency_rows("execute", &mut total.execute_us));
    rows.push((
        "waiting for a TOTP step".into(),
        format!(
            "{:.1} s ({:.0} % of worker time)",
            total.totp_wait.as_secs_f64(),
            total.totp_wait.as_secs_f64() / worker_time.max(1e-9) * 100.0
        ),
    ));
    rows.extend(error_rows(&total.errors));
    rows.push((
        "receipts after load".into(),
        format!("{:.1} s", drain_started.elapsed().as_secs_f64()),
    ));
    for (status, n) in &final_status {
        rows.push((format!("  {status}"), n.to_string()));
    }
    rows.extend(cpu_rows);
    if let Some(database) = database {
        let seconds = args.baseline.baseline_duration.unwrap_or(args.duration);
        let measured = run_baseline(&database, workers, seconds).await?;
        rows.extend(measured.rows(flows as f64 / elapsed.as_secs_f64(), "flows/s"));
    }
    print_table(
        "flow: prepare → authorize (TOTP) → execute on the chain",
        &rows,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// login: argon2id logins next to other traffic
// ---------------------------------------------------------------------------------------------

/// One `transaction_status` read of `id` by `key`: a 200 naming the transaction asked for.
async fn status_read(api: &Api, key: &Key, id: &str) -> Outcome {
    #[derive(serde::Deserialize)]
    struct Status<'a> {
        transaction_id: &'a str,
    }
    let path = format!("/api/transaction_status?transaction_id={id}");
    let result = api.send("GET", &path, &key.secret, None).await;
    let body = answer(result, StatusCode::OK)?;
    match serde_json::from_slice::<Status>(&body) {
        Ok(status) if status.transaction_id == id => Ok(None),
        _ => Err("wrong transaction in response".into()),
    }
}

async fn login_scenario(args: LoginArgs) -> Result<()> {
    let common = &args.load.common;
    let api = Api::new(&common.url)?;
    let agents = args.load.agents.max(1);
    let keys = Arc::new(setup_keys(&api, common, agents, agents.div_ceil(2)).await?);
    let pool = args.pool.max(1);
    let mut pools: Vec<Vec<String>> = vec![Vec::with_capacity(pool); agents];
    for (k, ids) in pools.iter_mut().enumerate() {
        for _ in 0..pool {
            match prepare_one(&api, &keys, k).await {
                Ok(Some(p)) => ids.push(p.transaction_id),
                other => bail!("preparing the pool failed: {:?}", other.err()),
            }
        }
    }
    let pools = Arc::new(pools);
    let username = format!("lg-{:08x}-login", rand::random::<u32>());
    let creds = json!({"username": username, "password": PASSWORD});
    api.post(
        "/api/register",
        Auth::None,
        creds.clone(),
        StatusCode::CREATED,
    )
    .await?;
    let duration = Duration::from_secs(args.load.duration);
    let reads = |api: Api| {
        let (keys, pools) = (keys.clone(), pools.clone());
        move |w: usize, i: usize| {
            let (api, keys, pools) = (api.clone(), keys.clone(), pools.clone());
            async move {
                let id = &pools[w][i % pools[w].len()];
                status_read(&api, &keys[w], id).await
            }
        }
    };

    println!(
        "phase 1: {agents} readers alone for {} s",
        duration.as_secs()
    );
    let cpu = CpuMeter::start(args.load.server_pid);
    let mut alone = run_load(agents, duration, 0.0, reads(api.clone())).await;
    let cpu_alone = cpu.rows();

    println!(
        "phase 2: {agents} readers and {} login loops for {} s",
        args.logins,
        duration.as_secs()
    );
    let cpu = CpuMeter::start(args.load.server_pid);
    let login_api = api.clone();
    let login_creds = creds.clone();
    let logins = run_load(args.logins.max(1), duration, 0.0, move |_, _| {
        let (api, creds) = (login_api.clone(), login_creds.clone());
        async move {
            let result = api
                .call(
                    reqwest::Method::POST,
                    "/api/login",
                    Auth::None,
                    Some(&creds),
                )
                .await;
            match error_label(&result, StatusCode::OK) {
                None => Ok(None),
                Some(label) => Err(label),
            }
        }
    });
    let (mut with, mut logins) =
        tokio::join!(run_load(agents, duration, 0.0, reads(api.clone())), logins);
    let cpu_with = cpu.rows();

    let mut rows = vec![
        ("readers (one key each)".into(), agents.to_string()),
        (
            "login loops (back to back)".into(),
            args.logins.max(1).to_string(),
        ),
        ("phase duration".into(), format!("{} s", duration.as_secs())),
        ("reads/s, alone".into(), rate(alone.ok, alone.elapsed)),
    ];
    rows.extend(latency_rows("read alone", &mut alone.latencies_us));
    rows.extend(
        error_rows(&alone.errors)
            .into_iter()
            .map(|(k, v)| (format!("read alone {k}"), v)),
    );
    rows.extend(
        cpu_alone
            .into_iter()
            .map(|(k, v)| (format!("{k}, alone"), v)),
    );
    rows.push(("reads/s, with logins".into(), rate(with.ok, with.elapsed)));
    rows.extend(latency_rows("read with logins", &mut with.latencies_us));
    rows.extend(
        error_rows(&with.errors)
            .into_iter()
            .map(|(k, v)| (format!("read with logins {k}"), v)),
    );
    rows.push(("logins (200)".into(), logins.ok.to_string()));
    rows.push(("logins/s".into(), rate(logins.ok, logins.elapsed)));
    rows.extend(latency_rows("login", &mut logins.latencies_us));
    rows.extend(
        error_rows(&logins.errors)
            .into_iter()
            .map(|(k, v)| (format!("login {k}"), v)),
    );
    rows.extend(
        cpu_with
            .into_iter()
            .map(|(k, v)| (format!("{k}, with logins"), v)),
    );
    print_table(
        "login: transaction_status reads alone, then next to argon2id logins",
        &rows,
    );
    Ok(())
}
