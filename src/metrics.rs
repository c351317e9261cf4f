//! Prometheus metrics (`GET /metrics`, text format 0.0.4): a small hand-written registry of
//! atomic counters and fixed-bucket histograms, and the rendering of the scrape.
//!
//! The hot path is lock-free: a request or command finds its series in an insert-only table of
//! `OnceLock` slots (one hash and one string compare once the series exists) and bumps relaxed
//! atomics. Gauges that the server already knows (WebSocket subscribers, positions, pool sizes,
//! process figures) are read when scraped, not maintained.
//!
//! Nothing here may identify a person or a transaction: labels are route *templates*, methods
//! from a fixed set, status classes, aggregate types and RPC method names, so the number of
//! series is bounded whatever clients send (every unmatched path is one `route="unmatched"`).

use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cqrs_es::AggregateError;
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::app::AppState;
use crate::http::ApiError;
use crate::store::{with_pool, Db, StoreError};

/// The scrape's content type (Prometheus text exposition format).
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A token shorter than this is refused at start-up.
pub const MIN_TOKEN_LEN: usize = 16;

/// Upper bounds of the latency buckets, in microseconds (100 µs … 60 s), shared by every
/// histogram so dashboards can compare them.
const BUCKETS_US: [u64; 18] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000, 60_000_000,
];

/// Who may read `/metrics` (`COUNTERSIGN_METRICS`, `COUNTERSIGN_METRICS_TOKEN`).
#[derive(Clone, Default)]
pub enum MetricsAccess {
    /// Anyone who can reach the listener (the default listener is loopback only).
    #[default]
    Open,
    /// Only with `Authorization: Bearer <token>`.
    Token(SecretString),
    /// Not served: `/metrics` answers 404 like any unknown path.
    Disabled,
}

impl std::fmt::Debug for MetricsAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Open => "Open",
            Self::Token(_) => "Token(***)",
            Self::Disabled => "Disabled",
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Primitives
// ---------------------------------------------------------------------------------------------

/// A fixed-bucket latency histogram. `_count` is the sum of the buckets, so a scrape racing an
/// observation never shows a count that disagrees with the buckets.
#[derive(Default)]
pub struct Histogram {
    /// Per-bucket (not cumulative) counts; the last one is `+Inf`.
    buckets: [AtomicU64; BUCKETS_US.len() + 1],
    sum_us: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let i = BUCKETS_US.partition_point(|bound| *bound < us);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = match BUCKETS_US.get(i) {
                Some(us) => format!("{}", *us as f64 / 1e6),
                None => "+Inf".to_owned(),
            };
            let _ = writeln!(
                out,
                "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}"
            );
        }
        let sum = self.sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let braces = |labels: &str| {
            if labels.is_empty() {
                String::new()
            } else {
                format!("{{{labels}}}")
            }
        };
        let _ = writeln!(out, "{name}_sum{} {sum}", braces(labels));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

/// An insert-only hash table of series with lock-free lookups. Each slot is written once; a
/// thread that loses the race for an empty slot to a different key probes on. When every slot is
/// taken the caller gets `None` and counts into its overflow series instead.
struct Table<K, V> {
    slots: Box<[Slot<K, V>]>,
}

/// A series and its key, written once.
type Slot<K, V> = OnceLock<Box<(K, V)>>;

impl<K, V: Default> Table<K, V> {
    fn new(capacity: usize) -> Self {
        Self {
            slots: (0..capacity).map(|_| OnceLock::new()).collect(),
        }
    }

    fn get_or_insert(
        &self,
        hash: u64,
        matches: impl Fn(&K) -> bool,
        make: impl Fn() -> K,
    ) -> Option<&V> {
        let n = self.slots.len();
        for probe in 0..n {
            let slot = &self.slots[(hash as usize).wrapping_add(probe) % n];
            let entry = match slot.get() {
                Some(entry) => entry,
                None => slot.get_or_init(|| Box::new((make(), V::default()))),
            };
            if matches(&entry.0) {
                return Some(&entry.1);
            }
        }
        None
    }

    fn iter(&self) -> impl Iterator<Item = &(K, V)> {
        self.slots.iter().filter_map(|s| s.get().map(|b| &**b))
    }
}

fn hash_of(value: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// A label value in the exposition format's escaping.
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A family with one sample per value of `label`.
fn labelled(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    label: &str,
    samples: &[(&str, u64)],
) {
    family(out, name, kind, help);
    for (value, sample) in samples {
        let _ = writeln!(out, "{name}{{{label}=\"{value}\"}} {sample}");
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP requests
// ---------------------------------------------------------------------------------------------

/// The route label of requests no route matched.
pub const UNMATCHED_ROUTE: &str = "unmatched";
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "other",
];
const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn method_index(method: &Method) -> u8 {
    match *method {
        Method::GET => 0,
        Method::POST => 1,
        Method::PUT => 2,
        Method::DELETE => 3,
        Method::PATCH => 4,
        Method::HEAD => 5,
        Method::OPTIONS => 6,
        _ => 7,
    }
}

fn status_class(status: StatusCode) -> u8 {
    (status.as_u16() / 100).clamp(1, 5) as u8 - 1
}

struct HttpKey {
    route: Box<str>,
    method: u8,
    class: u8,
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// How a command attempt ended (one per cqrs-es execute call, so a lost race that is retried
/// counts as one `conflict` and then its retry's outcome).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandOutcome {
    /// Events appended.
    Ok,
    /// Lost an optimistic-concurrency race.
    Conflict,
    /// The aggregate refused the command (a domain error: wrong state, wrong code, ...).
    Rejected,
    /// The store failed or stored data did not decode.
    Error,
}

const OUTCOMES: [(CommandOutcome, &str); 4] = [
    (CommandOutcome::Ok, "ok"),
    (CommandOutcome::Conflict, "conflict"),
    (CommandOutcome::Rejected, "rejected"),
    (CommandOutcome::Error, "error"),
];

impl CommandOutcome {
    pub fn of<E: std::error::Error>(result: &Result<(), AggregateError<E>>) -> Self {
        match result {
            Ok(()) => Self::Ok,
            Err(AggregateError::AggregateConflict) => Self::Conflict,
            Err(AggregateError::UserError(_)) => Self::Rejected,
            Err(_) => Self::Error,
        }
    }
}

#[derive(Default)]
struct CommandSeries {
    outcomes: [AtomicU64; OUTCOMES.len()],
    /// Duration of the execute calls that appended (load, decide, append, commit).
    append: Histogram,
}

// ---------------------------------------------------------------------------------------------
// Chain RPC
// ---------------------------------------------------------------------------------------------

/// The JSON-RPC methods the server calls (a fixed set: no per-call allocation or lookup).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcMethod {
    ChainId,
    GetBalance,
    GetTransactionCount,
    /// alloy's EIP-1559 fee estimate: `eth_feeHistory` (and `eth_getBlockByNumber` when the
    /// history carries no base fee), timed as one call.
    FeeHistory,
    EstimateGas,
    Call,
    SendRawTransaction,
    GetTransactionReceipt,
    GetTransactionByHash,
}

impl RpcMethod {
    const ALL: [Self; 9] = [
        Self::ChainId,
        Self::GetBalance,
        Self::GetTransactionCount,
        Self::FeeHistory,
        Self::EstimateGas,
        Self::Call,
        Self::SendRawTransaction,
        Self::GetTransactionReceipt,
        Self::GetTransactionByHash,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::ChainId => "eth_chainId",
            Self::GetBalance => "eth_getBalance",
            Self::GetTransactionCount => "eth_getTransactionCount",
            Self::FeeHistory => "eth_feeHistory",
            Self::EstimateGas => "eth_estimateGas",
            Self::Call => "eth_call",
            Self::SendRawTransaction => "eth_sendRawTransaction",
            Self::GetTransactionReceipt => "eth_getTransactionReceipt",
            Self::GetTransactionByHash => "eth_getTransactionByHash",
        }
    }
}

/// How a chain RPC ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RpcOutcome {
    Ok,
    /// The node answered with an error (including a simulated revert).
    Rejected,
    /// No answer: transport error or timeout.
    Unavailable,
}

#[derive(Default)]
struct RpcSeries {
    latency: Histogram,
    rejected: AtomicU64,
    unavailable: AtomicU64,
}

/// Chain RPC counters, owned by [`crate::chain::Chain`] (clones share them).
#[derive(Default)]
pub struct ChainMetrics {
    methods: [RpcSeries; RpcMethod::ALL.len()],
    explain_budget_exceeded: AtomicU64,
}

impl ChainMetrics {
    pub fn observe(&self, method: RpcMethod, outcome: RpcOutcome, elapsed: Duration) {
        let series = &self.methods[method as usize];
        series.latency.observe(elapsed);
        match outcome {
            RpcOutcome::Ok => {}
            RpcOutcome::Rejected => {
                series.rejected.fetch_add(1, Ordering::Relaxed);
            }
            RpcOutcome::Unavailable => {
                series.unavailable.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A prompt went out without its simulation because the chain reads took too long.
    pub fn explain_budget_exceeded(&self) {
        self.explain_budget_exceeded.fetch_add(1, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String) {
        family(
            out,
            "countersign_chain_rpc_requests_total",
            "counter",
            "JSON-RPC calls to the chain node that completed (answered, refused or failed), by \
             method.",
        );
        for m in RpcMethod::ALL {
            let n = self.methods[m as usize].latency.count();
            let _ = writeln!(
                out,
                "countersign_chain_rpc_requests_total{{method=\"{}\"}} {n}",
                m.name()
            );
        }
        family(
            out,
            "countersign_chain_rpc_errors_total",
            "counter",
            "Chain RPC calls that failed, by method and kind: rejected (the node answered with an \
             error, e.g. a simulated revert) or unavailable (no answer in time).",
        );
        for m in RpcMethod::ALL {
            let s = &self.methods[m as usize];
            for (kind, n) in [("rejected", &s.rejected), ("unavailable", &s.unavailable)] {
                let _ = writeln!(
                    out,
                    "countersign_chain_rpc_errors_total{{method=\"{}\",kind=\"{kind}\"}} {}",
                    m.name(),
                    n.load(Ordering::Relaxed)
                );
            }
        }
        family(
            out,
            "countersign_chain_rpc_duration_seconds",
            "histogram",
            "Chain RPC latency, by method.",
        );
        for m in RpcMethod::ALL {
            self.methods[m as usize].latency.render(
                out,
                "countersign_chain_rpc_duration_seconds",
                &format!("method=\"{}\"", m.name()),
            );
        }
        family(
            out,
            "countersign_explain_budget_exceeded_total",
            "counter",
            "Prompts whose simulation was given up because the chain reads exceeded their budget.",
        );
        let _ = writeln!(
            out,
            "countersign_explain_budget_exceeded_total {}",
            self.explain_budget_exceeded.load(Ordering::Relaxed)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The registry
// ---------------------------------------------------------------------------------------------

/// Room for route × method × status-class series; far more than the router can produce.
const HTTP_SERIES: usize = 2048;
const AGGREGATE_TYPES: usize = 32;

/// The server's metrics, one per [`AppState`] (tests run several servers in one process).
pub struct Metrics {
    access: MetricsAccess,
    started: Instant,
    http: Table<HttpKey, Histogram>,
    http_overflow: Histogram,
    commands: Table<&'static str, CommandSeries>,
    commands_overflow: CommandSeries,
}

impl Metrics {
    pub fn new(access: MetricsAccess) -> Self {
        Self {
            access,
            started: Instant::now(),
            http: Table::new(HTTP_SERIES),
            http_overflow: Histogram::default(),
            commands: Table::new(AGGREGATE_TYPES),
            commands_overflow: CommandSeries::default(),
        }
    }

    /// One answered request. `route` is the matched route template (`None`: nothing matched).
    pub fn observe_request(
        &self,
        route: Option<&str>,
        method: &Method,
        status: StatusCode,
        elapsed: Duration,
    ) {
        let route = route.unwrap_or(UNMATCHED_ROUTE);
        let (method, class) = (method_index(method), status_class(status));
        let series = self
            .http
            .get_or_insert(
                hash_of((route, method, class)),
                |k| k.method == method && k.class == class && &*k.route == route,
                || HttpKey {
                    route: route.into(),
                    method,
                    class,
                },
            )
            .unwrap_or(&self.http_overflow);
        series.observe(elapsed);
    }

    /// One cqrs-es execute call of an `aggregate` command that started at `started`.
    pub fn record_command<E: std::error::Error>(
        &self,
        aggregate: &'static str,
        result: &Result<(), AggregateError<E>>,
        started: Instant,
    ) {
        let elapsed = started.elapsed();
        let outcome = CommandOutcome::of(result);
        let series = self
            .commands
            .get_or_insert(hash_of(aggregate), |k| *k == aggregate, || aggregate)
            .unwrap_or(&self.commands_overflow);
        series.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
        if outcome == CommandOutcome::Ok {
            series.append.observe(elapsed);
        }
    }

    fn render_http(&self, out: &mut String) {
        let mut series: Vec<(String, &Histogram)> = self
            .http
            .iter()
            .map(|(k, h)| {
                let labels = format!(
                    "route=\"{}\",method=\"{}\",status=\"{}\"",
                    escape(&k.route),
                    METHODS[k.method as usize],
                    STATUS_CLASSES[k.class as usize]
                );
                (labels, h)
            })
            .collect();
        if self.http_overflow.count() > 0 {
            let labels = "route=\"overflow\",method=\"other\",status=\"5xx\"".to_owned();
            series.push((labels, &self.http_overflow));
        }
        series.sort_by(|a, b| a.0.cmp(&b.0));
        family(
            out,
            "countersign_http_requests_total",
            "counter",
            "HTTP requests answered, by matched route template, method and status class \
             (route=\"unmatched\": no route matched).",
        );
        for (labels, h) in &series {
            let _ = writeln!(
                out,
                "countersign_http_requests_total{{{labels}}} {}",
                h.count()
            );
        }
        family(
            out,
            "countersign_http_request_duration_seconds",
            "histogram",
            "Time from receiving a request to its response head, by route, method and status \
             class.",
        );
        for (labels, h) in &series {
            h.render(out, "countersign_http_request_duration_seconds", labels);
        }
    }

    fn render_commands(&self, out: &mut String) {
        let mut series: Vec<(&str, &CommandSeries)> =
            self.commands.iter().map(|(k, s)| (*k, s)).collect();
        series.push(("overflow", &self.commands_overflow));
        series.sort_by_key(|(k, _)| *k);
        family(
            out,
            "countersign_commands_total",
            "counter",
            "Command executions against the event store, by aggregate type and outcome (ok: \
             events appended; conflict: lost an optimistic-concurrency race, retried up to 3 \
             times; rejected: refused by the aggregate; error: store failure).",
        );
        for (aggregate, s) in &series {
            if *aggregate == "overflow" && s.outcomes.iter().all(|o| o.load(Ordering::Relaxed) == 0)
            {
                continue;
            }
            for (outcome, name) in OUTCOMES {
                let _ = writeln!(
                    out,
                    "countersign_commands_total{{aggregate=\"{}\",outcome=\"{name}\"}} {}",
                    escape(aggregate),
                    s.outcomes[outcome as usize].load(Ordering::Relaxed)
                );
            }
        }
        family(
            out,
            "countersign_event_append_seconds",
            "histogram",
            "Duration of command executions that appended events (load the aggregate, decide, \
             append and commit), by aggregate type.",
        );
        for (aggregate, s) in &series {
            if *aggregate == "overflow" && s.append.count() == 0 {
                continue;
            }
            s.append.render(
                out,
                "countersign_event_append_seconds",
                &format!("aggregate=\"{}\"", escape(aggregate)),
            );
        }
    }

    /// The whole scrape: counters kept here, plus gauges read now from the hub, the store, the
    /// chain client and `/proc`.
    pub async fn render(&self, state: &AppState) -> String {
        let mut out = String::with_capacity(32 * 1024);
        self.render_http(&mut out);
        self.render_commands(&mut out);
        state.chain.metrics().render(&mut out);

        let gauge = |out: &mut String, name: &str, help: &str, value: String| {
            family(out, name, "gauge", help);
            let _ = writeln!(out, "{name} {value}");
        };
        gauge(
            &mut out,
            "countersign_ws_connections",
            "Open WebSocket connections subscribed to live events.",
            state.hub.subscriber_count().to_string(),
        );
        let (queued, deepest) = state.hub.queued_messages();
        gauge(
            &mut out,
            "countersign_ws_send_queue_messages",
            "Events routed to sockets and not yet written, over all sockets.",
            queued.to_string(),
        );
        gauge(
            &mut out,
            "countersign_ws_send_queue_max_messages",
            &format!(
                "The deepest single socket's queue (a socket reaching {} is closed as too slow).",
                crate::push::SUBSCRIBER_BUFFER
            ),
            deepest.to_string(),
        );

        let (hits, misses, held) = state.hub.cache.stats();
        labelled(
            &mut out,
            "countersign_read_cache_lookups_total",
            "counter",
            "Agents' transaction_status reads answered from memory (hit) or the database (miss).",
            "result",
            &[("hit", hits), ("miss", misses)],
        );
        gauge(
            &mut out,
            "countersign_read_cache_documents",
            "API key, transaction and wallet views held by the read cache.",
            held.to_string(),
        );
        let (hits, misses) = state.hub.cache.command_stats();
        labelled(
            &mut out,
            "countersign_read_cache_command_lookups_total",
            "counter",
            "Agents' prepares: API keys and wallets found in memory (hit) or read from the \
             database (miss). Either way the command commits only if they are unchanged.",
            "result",
            &[("hit", hits), ("miss", misses)],
        );

        let (fast, general) = state.projector.batches();
        labelled(
            &mut out,
            "countersign_writer_batches_total",
            "counter",
            "Group commits by the writer's path: one statement (fast) or the general transaction.",
            "path",
            &[("fast", fast), ("general", general)],
        );

        let routed = *state.hub.watch_position().borrow();
        let positions = positions(&state.db).await;
        gauge(
            &mut out,
            "countersign_store_up",
            "1 if the event store answered this scrape's queries.",
            u8::from(positions.is_ok()).to_string(),
        );
        match positions {
            Ok((head, checkpoint)) => {
                gauge(
                    &mut out,
                    "countersign_events_head_position",
                    "The newest committed event position.",
                    head.to_string(),
                );
                gauge(
                    &mut out,
                    "countersign_projection_checkpoint_position",
                    "The position up to which the views are current.",
                    checkpoint.to_string(),
                );
                gauge(
                    &mut out,
                    "countersign_projection_lag_events",
                    "Newest event position minus the projection checkpoint.",
                    (head - checkpoint).max(0).to_string(),
                );
                gauge(
                    &mut out,
                    "countersign_ws_push_lag_events",
                    "Newest event position minus the position this node's push hub has routed.",
                    (head - routed).max(0).to_string(),
                );
            }
            Err(e) => tracing::warn!(error = %e, "metrics: the store did not answer"),
        }
        let (size, idle) = with_pool!(&state.db, |pool| (pool.size(), pool.num_idle()));
        let in_use = (size as usize).saturating_sub(idle);
        labelled(
            &mut out,
            "countersign_db_pool_connections",
            "gauge",
            "Database pool connections, by state.",
            "state",
            &[("idle", idle as u64), ("in_use", in_use as u64)],
        );
        gauge(
            &mut out,
            "countersign_uptime_seconds",
            "Seconds since this server started.",
            format!("{:.3}", self.started.elapsed().as_secs_f64()),
        );
        render_process(&mut out);
        out
    }
}

/// `(newest event position, projection checkpoint)`.
async fn positions(db: &Db) -> Result<(i64, i64), StoreError> {
    let head: i64 = with_pool!(db, |pool| sqlx::query_scalar(
        "SELECT COALESCE(MAX(position), 0) FROM events"
    )
    .fetch_one(pool)
    .await?);
    Ok((head, db.projection_checkpoint().await?))
}

/// Process figures from `/proc/self` (Linux; absent elsewhere).
fn render_process(out: &mut String) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
    };
    let mut gauge = |name: &str, kind: &str, help: &str, value: Option<String>| {
        if let Some(value) = value {
            family(out, name, kind, help);
            let _ = writeln!(out, "{name} {value}");
        }
    };
    gauge(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        field("VmRSS:").map(|kib| (kib * 1024).to_string()),
    );
    gauge(
        "process_threads",
        "gauge",
        "OS threads in the process.",
        field("Threads:").map(|n| n.to_string()),
    );
    gauge(
        "process_open_fds",
        "gauge",
        "Open file descriptors (sockets included).",
        std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count().to_string()),
    );
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<u64>().ok())
        });
    gauge(
        "process_max_fds",
        "gauge",
        "The soft limit on open file descriptors.",
        max_fds.map(|n| n.to_string()),
    );
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|stat| {
            // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let ticks =
                fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
            // USER_HZ is 100 on every Linux this runs on.
            Some(format!("{:.2}", ticks as f64 / 100.0))
        });
    gauge(
        "process_cpu_seconds_total",
        "counter",
        "User and system CPU time spent, seconds.",
        cpu,
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP glue
// ---------------------------------------------------------------------------------------------

/// Middleware: count and time every request by its matched route template.
pub async fn track_requests(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().cloned();
    let method = req.method().clone();
    let started = Instant::now();
    let response = next.run(req).await;
    state.metrics.observe_request(
        route.as_ref().map(MatchedPath::as_str),
        &method,
        response.status(),
        started.elapsed(),
    );
    response
}

fn bearer_matches(headers: &HeaderMap, token: &SecretString) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    // Compare digests so neither the length nor a prefix of the token leaks through timing.
    let given = Sha256::digest(given.trim().as_bytes());
    let expected = Sha256::digest(token.expose_secret().as_bytes());
    bool::from(given.as_slice().ct_eq(expected.as_slice()))
}

/// `GET /metrics`.
pub async fn scrape(State(state): State<AppState>, headers: HeaderMap) -> Response {
    match &state.metrics.access {
        MetricsAccess::Disabled => {
            return ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
                .into_response()
        }
        MetricsAccess::Token(token) if !bearer_matches(&headers, token) => {
            let mut response =
                ApiError::unauthorized("metrics need the metrics bearer token").into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return response;
        }
        _ => {}
    }
    let body = state.metrics.render(&state).await;
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_matches() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(50));
        h.observe(Duration::from_micros(100));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(120));
        let mut out = String::new();
        h.render(&mut out, "x", "a=\"b\"");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.0001\"} 2\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"0.005\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"60\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{a=\"b\",le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_count{a=\"b\"} 4\n"), "{out}");
        assert_eq!(h.count(), 4);
    }

    #[test]
    fn full_table_overflows_instead_of_growing() {
        let t: Table<u32, AtomicU64> = Table::new(4);
        for k in 0..4u32 {
            assert!(t.get_or_insert(hash_of(k), |x| *x == k, || k).is_some());
        }
        assert!(t.get_or_insert(hash_of(9u32), |x| *x == 9, || 9).is_none());
        // Existing keys are still found.
        for k in 0..4u32 {
            assert!(t.get_or_insert(hash_of(k), |x| *x == k, || k).is_some());
        }
        assert_eq!(t.iter().count(), 4);
    }

    #[test]
    fn unknown_methods_and_odd_statuses_stay_in_fixed_label_sets() {
        assert_eq!(
            METHODS[method_index(&Method::from_bytes(b"BREW").unwrap()) as usize],
            "other"
        );
        assert_eq!(
            STATUS_CLASSES[status_class(StatusCode::SWITCHING_PROTOCOLS) as usize],
            "1xx"
        );
        assert_eq!(
            STATUS_CLASSES[status_class(StatusCode::IM_A_TEAPOT) as usize],
            "4xx"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
