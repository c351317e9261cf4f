//! More servers and real faults for the concurrency and fault specifications: a second node on
//! the same store (in this process), the `countersign` binary as a child process that can be
//! SIGKILLed, and a TCP proxy that cuts, refuses or silently swallows connections to a real
//! PostgreSQL or anvil.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use countersign::{Application, Config};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::helpers::{Auth, TestApp};

/// For tests that run several servers or bursts on one PostgreSQL: a pool of 8 per server
/// (as an operator would size it) leaves room for the other tests running at the same time.
pub fn small_pool(config: &mut Config) {
    config.db_max_connections = 8;
}

/// A server running in this process on `config`, next to (or instead of) the `TestApp`'s own.
pub struct Node {
    pub address: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Node {
    pub async fn start(config: Config) -> Self {
        let app = Application::build(config).await.expect("node builds");
        let address = format!("http://127.0.0.1:{}", app.port());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            app.run_until(async {
                let _ = rx.await;
            })
            .await
            .expect("node runs");
        });
        Self {
            address,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            let _ = handle.await;
        }
    }
}

/// The `countersign serve` binary on the `TestApp`'s store, chain and secrets.
pub struct ServerProcess {
    child: Child,
    pub address: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ServerProcess {
    pub async fn start(app: &TestApp) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let log = dir.path().join("server.log");
        let config = app.config();
        let child = Command::new(env!("CARGO_BIN_EXE_countersign"))
            .arg("serve")
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "warn")
            .current_dir(dir.path())
            .env("DATABASE_URL", &app.store.url)
            .env("WEB3_PROVIDER_URI", &app.anvil.url)
            .env("JWT_SECRET_KEY", app.jwt_secret())
            .env(
                "COUNTERSIGN_MASTER_KEY",
                config.master_key.to_base64().as_str(),
            )
            .env("COUNTERSIGN_ADDR", format!("127.0.0.1:{port}"))
            .env("COUNTERSIGN_POLL_INTERVAL_MS", "100")
            .env(
                "COUNTERSIGN_DB_MAX_CONNECTIONS",
                config.db_max_connections.to_string(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn countersign");
        let mut server = Self {
            child,
            address: format!("http://127.0.0.1:{port}"),
            log,
            _dir: dir,
        };
        let health = format!("{}/healthz", server.address);
        let client = reqwest::Client::new();
        for _ in 0..300 {
            if let Ok(r) = client.get(&health).send().await {
                if r.status() == 200 {
                    return server;
                }
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("server exited with {status}:\n{}", server.log_text());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = server.child.kill();
        panic!("server never became healthy:\n{}", server.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the proxy does with connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Pass bytes both ways.
    None,
    /// Accept and close at once: the peer sees its connection reset, as from a server that
    /// is down or restarting.
    Reset,
    /// Accept and never answer: a peer that hangs.
    Blackhole,
    /// New connections pass bytes; each connection open when this is set stays open but
    /// closes, unanswered, on the next bytes the client writes on it: a server that closed its
    /// idle keep-alive connections just as the client reused them (the client finds out only
    /// by writing).
    Stale,
}

/// A TCP proxy in front of a real server. Changing the fault cuts every open connection.
pub struct FaultProxy {
    pub port: u16,
    fault: watch::Sender<Fault>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().unwrap().port();
        let (fault, _) = watch::channel(Fault::None);
        let task = tokio::spawn({
            let fault = fault.subscribe();
            async move {
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(serve(client, target, fault.clone()));
                }
            }
        });
        Self { port, fault, task }
    }

    /// The proxy's address for `url`: same scheme, path and credentials, proxy host and port.
    pub fn url_for(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).expect("URL");
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(self.port)).unwrap();
        url.to_string()
    }

    pub fn set(&self, fault: Fault) {
        self.fault.send_replace(fault);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut client: TcpStream, target: SocketAddr, mut fault: watch::Receiver<Fault>) {
    let current = *fault.borrow_and_update();
    match current {
        Fault::Reset => {}
        Fault::Blackhole => {
            let mut sink = [0u8; 4096];
            tokio::select! {
                _ = fault.changed() => {}
                _ = async { while matches!(client.read(&mut sink).await, Ok(n) if n > 0) {} } => {}
            }
        }
        Fault::None | Fault::Stale => {
            let Ok(mut upstream) = TcpStream::connect(target).await else {
                return;
            };
            tokio::select! {
                _ = fault.changed() => {}
                _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => return,
            }
            if *fault.borrow_and_update() == Fault::Stale {
                // An answer already on its way still arrives; the next request gets none.
                let (mut from_upstream, _) = upstream.split();
                let (mut from_client, mut to_client) = client.split();
                let mut byte = [0u8; 1];
                tokio::select! {
                    _ = from_client.read(&mut byte) => {}
                    _ = tokio::io::copy(&mut from_upstream, &mut to_client) => {}
                }
            }
        }
    }
    // Dropping both sockets closes them: the cut.
}

/// `app`'s server replaced by a node that reaches the chain only through a [`FaultProxy`]
/// (passing bytes until told otherwise); `chain_timeout`, if given, bounds its chain calls.
pub async fn behind_chain_proxy(
    app: &mut TestApp,
    chain_timeout: Option<Duration>,
) -> (FaultProxy, Node) {
    app.stop().await;
    let proxy = FaultProxy::start(socket_addr(&app.anvil.url)).await;
    let mut config = app.config();
    config.chain_url = proxy.url_for(&app.anvil.url).parse().unwrap();
    if let Some(timeout) = chain_timeout {
        config.chain_timeout = timeout;
    }
    let node = Node::start(config).await;
    app.address = node.address.clone();
    (proxy, node)
}

/// The host and port of a URL, resolved.
pub fn socket_addr(url: &str) -> SocketAddr {
    let url = url::Url::parse(url).expect("URL");
    let host = url.host_str().expect("host");
    let port = url.port_or_known_default().unwrap_or(5432);
    std::net::ToSocketAddrs::to_socket_addrs(&(host, port))
        .expect("resolve")
        .next()
        .expect("an address")
}

/// A client whose requests give up after `timeout`, so a hanging server fails the test
/// instead of hanging it.
pub fn client_with_timeout(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .expect("client")
}

fn with_auth(req: reqwest::RequestBuilder, auth: &Auth) -> reqwest::RequestBuilder {
    match auth {
        Auth::None => req,
        Auth::Bearer(token) => req.bearer_auth(token),
        Auth::ApiKey(key) => req.header("X-API-KEY", key),
    }
}

/// Send one request to the server at `base`; `Err` if no HTTP answer came (connection
/// refused or reset, timeout). Every answer must be JSON (or empty).
pub async fn try_request(
    client: &reqwest::Client,
    method: reqwest::Method,
    base: &str,
    path: &str,
    auth: &Auth,
    body: Option<&Value>,
) -> Result<(StatusCode, Value), String> {
    let mut req = with_auth(client.request(method, format!("{base}{path}")), auth);
    if let Some(body) = body {
        req = req.json(body);
    }
    // With the causes: "error sending request" alone does not say what went wrong.
    let resp = req.send().await.map_err(|e| {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        text
    })?;
    let status = resp.status();
    let text = resp.text().await.map_err(|e| e.to_string())?;
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("non-JSON response {status} from {path}: {text}"))
    };
    Ok((status, body))
}

/// POST to the server at `base` (which must answer).
pub async fn post_at(base: &str, path: &str, auth: &Auth, body: Value) -> (StatusCode, Value) {
    let client = client_with_timeout(Duration::from_secs(60));
    try_request(
        &client,
        reqwest::Method::POST,
        base,
        path,
        auth,
        Some(&body),
    )
    .await
    .unwrap_or_else(|e| panic!("POST {path} to {base}: {e}"))
}

/// GET from the server at `base` (which must answer).
pub async fn get_at(base: &str, path: &str, auth: &Auth) -> (StatusCode, Value) {
    let client = client_with_timeout(Duration::from_secs(60));
    try_request(&client, reqwest::Method::GET, base, path, auth, None)
        .await
        .unwrap_or_else(|e| panic!("GET {path} from {base}: {e}"))
}

/// A PostgreSQL server of the test's own (`initdb` in a temporary directory, on a free port),
/// so that it can really be stopped, crashed and started while a server uses it. Run as the
/// `postgres` user when the tests run as root (PostgreSQL refuses to run as root).
pub struct PrivatePostgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    as_postgres: bool,
    _dir: tempfile::TempDir,
}

impl PrivatePostgres {
    /// `None` where no PostgreSQL server binaries are installed (`PG_BINDIR`, or the newest
    /// `/usr/lib/postgresql/*/bin`).
    pub fn start() -> Option<Self> {
        let bin = std::env::var_os("PG_BINDIR")
            .map(PathBuf::from)
            .or_else(|| {
                let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
                    .ok()?
                    .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                    .filter(|b| b.join("initdb").exists())
                    .collect();
                found.sort_by_key(|b| {
                    b.parent()
                        .and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok())
                        .unwrap_or(0)
                });
                found.pop()
            })?;
        let dir = tempfile::tempdir().expect("tempdir");
        let as_postgres = running_as_root();
        if as_postgres {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown");
            assert!(status.success(), "chown the data directory to postgres");
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let cluster = Self {
            data: dir.path().join("data"),
            bin,
            port,
            as_postgres,
            _dir: dir,
        };
        let data = cluster.data.clone();
        cluster.run("initdb", |c| {
            c.arg("-D")
                .arg(&data)
                .args(["-A", "trust", "-U", "postgres", "--no-sync"]);
        });
        cluster.pg_ctl(&["start", "-w"]);
        Some(cluster)
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stop: `fast` (clients disconnected, a clean shutdown) or `immediate` (a crash: no
    /// shutdown checkpoint, recovery from the WAL at the next start).
    pub fn stop(&self, mode: &str) {
        self.pg_ctl(&["stop", "-w", "-m", mode]);
    }

    pub fn start_again(&self) {
        self.pg_ctl(&["start", "-w"]);
    }

    fn pg_ctl(&self, args: &[&str]) {
        let (ok, out) = self.try_pg_ctl(args);
        assert!(ok, "pg_ctl {args:?} failed: {out}");
    }

    fn try_pg_ctl(&self, args: &[&str]) -> (bool, String) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=40",
            self.port,
            self._dir.path().display()
        );
        let data = self.data.clone();
        let log = self._dir.path().join("postgres.log");
        self.try_run("pg_ctl", |c| {
            c.arg("-D")
                .arg(&data)
                .arg("-o")
                .arg(&options)
                .arg("-l")
                .arg(&log)
                .args(args);
        })
    }

    fn run(&self, tool: &str, args: impl FnOnce(&mut Command)) {
        let (ok, out) = self.try_run(tool, args);
        assert!(ok, "{tool} failed: {out}");
    }

    fn try_run(&self, tool: &str, args: impl FnOnce(&mut Command)) -> (bool, String) {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        args(&mut command);
        match command.stdin(Stdio::null()).output() {
            Ok(out) => (
                out.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            ),
            Err(e) => (false, e.to_string()),
        }
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        // Already stopped is fine.
        let _ = self.try_pg_ctl(&["stop", "-w", "-m", "immediate"]);
    }
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}
