//! Test harness: the real server on port 0, a fresh database per test (SQLite always, Postgres
//! when `TEST_DATABASE_URL` is set), a private anvil chain per test, and HTTP/TOTP helpers.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use countersign::crypto::{MasterKey, TotpSecret};
use countersign::{Application, Config};
use reqwest::StatusCode;
use secrecy::SecretString;
use serde_json::{json, Value};
use zeroize::Zeroizing;

/// Anvil's first pre-funded development account (public test key material).
pub const ANVIL_ACCOUNT_0: &str = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266";
pub const RECIPIENT: &str = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8";
pub const PASSWORD: &str = "correct horse battery staple";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The backends to run a test on: SQLite always, Postgres when configured.
pub fn backends() -> Vec<Backend> {
    let mut b = vec![Backend::Sqlite];
    if std::env::var("TEST_DATABASE_URL").is_ok_and(|u| !u.is_empty()) {
        b.push(Backend::Postgres);
    } else {
        static WARN: Once = Once::new();
        WARN.call_once(|| eprintln!("TEST_DATABASE_URL not set: Postgres variants skipped"));
    }
    b
}

fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if std::env::var("TEST_LOG").is_ok() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
                .with_test_writer()
                .try_init();
        }
    });
}

/// A private anvil process, killed on drop.
pub struct Anvil {
    child: Child,
    pub url: String,
}

impl Anvil {
    pub async fn start() -> Self {
        let bin = std::env::var("ANVIL_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|_| {
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
            });
        assert!(
            bin.exists(),
            "anvil not found at {} — run `npm ci` (see README)",
            bin.display()
        );
        // Port 0: anvil picks a free port and says which, so parallel tests never collide.
        let mut child = Command::new(&bin)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn anvil");
        let stdout = child.stdout.take().expect("anvil stdout");
        let port = tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            let mut lines = std::io::BufReader::new(stdout).lines();
            let port = lines.by_ref().map_while(Result::ok).find_map(|line| {
                line.strip_prefix("Listening on 127.0.0.1:")
                    .and_then(|p| p.trim().parse::<u16>().ok())
            });
            // Keep draining so anvil never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            port
        })
        .await
        .expect("read anvil output");
        let mut anvil = Self {
            child,
            url: String::new(),
        };
        let Some(port) = port else {
            panic!("anvil did not report its port");
        };
        anvil.url = format!("http://127.0.0.1:{port}");
        for _ in 0..100 {
            if anvil.rpc_raw("eth_chainId", json!([])).await.is_ok() {
                return anvil;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("anvil did not start");
    }

    async fn rpc_raw(&self, method: &str, params: Value) -> Result<Value, String> {
        let resp = reqwest::Client::new()
            .post(&self.url)
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let body: Value = resp.json().await.map_err(|e| e.to_string())?;
        match body.get("error") {
            Some(e) => Err(e.to_string()),
            None => Ok(body["result"].clone()),
        }
    }

    pub async fn rpc(&self, method: &str, params: Value) -> Value {
        self.rpc_raw(method, params)
            .await
            .unwrap_or_else(|e| panic!("{method} failed: {e}"))
    }

    pub async fn balance(&self, address: &str) -> u128 {
        let hex = self.rpc("eth_getBalance", json!([address, "latest"])).await;
        u128::from_str_radix(hex.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
    }

    /// Send a transaction from an unlocked dev account and wait for its receipt.
    pub async fn send_from_dev(&self, tx: Value) -> Value {
        let hash = self.rpc("eth_sendTransaction", json!([tx])).await;
        for _ in 0..100 {
            let receipt = self.rpc("eth_getTransactionReceipt", json!([hash])).await;
            if !receipt.is_null() {
                assert_eq!(
                    receipt["status"], "0x1",
                    "dev transaction failed: {receipt}"
                );
                return receipt;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("dev transaction {hash} not mined");
    }

    pub async fn fund(&self, address: &str, wei: u128) {
        self.send_from_dev(json!({
            "from": ANVIL_ACCOUNT_0, "to": address, "value": format!("{wei:#x}")
        }))
        .await;
    }

    /// Deploy creation code (with encoded constructor arguments appended) from dev account 0.
    pub async fn deploy(&self, creation_code: &str) -> String {
        let receipt = self
            .send_from_dev(
                json!({"from": ANVIL_ACCOUNT_0, "data": creation_code, "gas": "0x500000"}),
            )
            .await;
        receipt["contractAddress"].as_str().unwrap().to_owned()
    }

    pub async fn call(&self, to: &str, data: &str) -> String {
        self.rpc("eth_call", json!([{"to": to, "data": data}, "latest"]))
            .await
            .as_str()
            .unwrap()
            .to_owned()
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where a test's data lives, kept so a restart can reopen it.
pub struct Store {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_admin: Option<(String, String)>,
}

impl Store {
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("sqlite://{}/countersign.db", dir.path().display());
                Self {
                    url,
                    _dir: Some(dir),
                    pg_admin: None,
                }
            }
            Backend::Postgres => {
                let admin = std::env::var("TEST_DATABASE_URL").expect("TEST_DATABASE_URL");
                let name = format!("countersign_test_{}", uuid::Uuid::new_v4().simple());
                let pool = sqlx::PgPool::connect(&admin)
                    .await
                    .expect("connect to Postgres");
                sqlx::query(&format!("CREATE DATABASE {name}"))
                    .execute(&pool)
                    .await
                    .expect("create test database");
                pool.close().await;
                let mut url = url::Url::parse(&admin).expect("TEST_DATABASE_URL is a URL");
                url.set_path(&name);
                Self {
                    url: url.to_string(),
                    _dir: None,
                    pg_admin: Some((admin, name)),
                }
            }
        }
    }

    /// Drop a Postgres test database (SQLite's temp dir goes by itself).
    pub async fn cleanup(&self) {
        if let Some((admin, name)) = &self.pg_admin {
            if let Ok(pool) = sqlx::PgPool::connect(admin).await {
                let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .execute(&pool)
                    .await;
                pool.close().await;
            }
        }
    }
}

/// A running server with its store and chain.
pub struct TestApp {
    pub address: String,
    pub client: reqwest::Client,
    pub anvil: Anvil,
    pub store: Store,
    pub backend: Backend,
    master_key_b64: Zeroizing<String>,
    jwt_secret: String,
    /// Applied to the configuration at every (re)start: set it, then `restart`, to run the
    /// same store and chain with a different configuration (e.g. a test hook).
    pub configure: Option<fn(&mut Config)>,
    server: Option<tokio::task::JoinHandle<()>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

pub fn test_config(database_url: &str, chain_url: &str, master_key_b64: &str, jwt: &str) -> Config {
    Config {
        database_url: database_url.to_owned(),
        // Many tests run at once against one PostgreSQL (max_connections = 100 here).
        db_max_connections: 6,
        chain_url: chain_url.parse().unwrap(),
        chain_timeout: Duration::from_secs(10),
        request_timeout: Duration::from_secs(60),
        header_timeout: Duration::from_secs(30),
        addr: "127.0.0.1:0".parse().unwrap(),
        jwt_secret: SecretString::from(jwt.to_owned()),
        jwt_ttl: Duration::from_secs(900),
        master_key: MasterKey::from_base64(master_key_b64).unwrap(),
        default_expiry: Duration::from_secs(900),
        poll_interval: Duration::from_millis(100),
        max_fee_per_gas_cap: None,
        idempotency_ttl: Duration::from_secs(86_400),
        crash_after_sign_for_tests: false,
        metrics: Default::default(),
        limits: Default::default(),
        cors_origins: Default::default(),
    }
}

impl TestApp {
    pub async fn spawn(backend: Backend) -> Self {
        Self::spawn_with(backend, None).await
    }

    /// Spawn with `configure` applied to the test configuration.
    pub async fn spawn_with(backend: Backend, configure: Option<fn(&mut Config)>) -> Self {
        init_tracing();
        let anvil = Anvil::start().await;
        let store = Store::new(backend).await;
        let master_key_b64 = MasterKey::generate().to_base64();
        let jwt_secret = format!("test-jwt-secret-{}", uuid::Uuid::new_v4());
        let mut app = Self {
            address: String::new(),
            client: reqwest::Client::new(),
            anvil,
            store,
            backend,
            master_key_b64,
            jwt_secret,
            configure,
            server: None,
            shutdown: None,
        };
        app.start().await;
        app
    }

    pub fn config(&self) -> Config {
        let mut config = test_config(
            &self.store.url,
            &self.anvil.url,
            &self.master_key_b64,
            &self.jwt_secret,
        );
        if let Some(configure) = self.configure {
            configure(&mut config);
        }
        config
    }

    pub fn jwt_secret(&self) -> &str {
        &self.jwt_secret
    }

    async fn start(&mut self) {
        let app = Application::build(self.config()).await.expect("app builds");
        self.address = format!("http://127.0.0.1:{}", app.port());
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        self.shutdown = Some(tx);
        self.server = Some(tokio::spawn(async move {
            app.run_until(async {
                let _ = rx.await;
            })
            .await
            .expect("server runs");
        }));
    }

    /// Stop the server (graceful) and start a new one on the same store and chain.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }

    pub async fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.server.take() {
            let _ = handle.await;
        }
    }

    pub async fn cleanup(mut self) {
        self.stop().await;
        self.store.cleanup().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.address, path)
    }

    pub async fn post(&self, path: &str, auth: &Auth, body: Value) -> (StatusCode, Value) {
        let req = auth.apply(self.client.post(self.url(path))).json(&body);
        send(req).await
    }

    pub async fn post_raw(
        &self,
        path: &str,
        auth: &Auth,
        body: &'static str,
    ) -> (StatusCode, Value) {
        let req = auth
            .apply(self.client.post(self.url(path)))
            .header("content-type", "application/json")
            .body(body);
        send(req).await
    }

    pub async fn get(&self, path: &str, auth: &Auth) -> (StatusCode, Value) {
        send(auth.apply(self.client.get(self.url(path)))).await
    }

    pub async fn delete(&self, path: &str, auth: &Auth) -> (StatusCode, Value) {
        send(auth.apply(self.client.delete(self.url(path)))).await
    }

    /// Register and log in a user (MFA not yet enrolled).
    pub async fn register(&self, username: &str) -> TestUser {
        let (status, body) = self
            .post(
                "/api/register",
                &Auth::None,
                json!({"username": username, "password": PASSWORD}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        let user_id = body["user_id"].as_str().unwrap().to_owned();
        let (status, body) = self
            .post(
                "/api/login",
                &Auth::None,
                json!({"username": username, "password": PASSWORD}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        TestUser {
            user_id,
            username: username.to_owned(),
            token: body["access_token"].as_str().unwrap().to_owned(),
            totp: None,
            last_step: 0,
        }
    }

    /// Enrol and confirm MFA for `user`; returns the base32 secret.
    pub async fn enroll_mfa(&self, user: &mut TestUser) -> String {
        let (status, body) = self
            .post(
                "/api/setup_mfa",
                &user.auth(),
                json!({"password": PASSWORD}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let secret = body["secret"].as_str().unwrap().to_owned();
        user.set_secret(&secret);
        let code = user.fresh_code().await;
        let (status, body) = self
            .post("/api/confirm_mfa", &user.auth(), json!({"mfa_code": code}))
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        secret
    }

    /// A user with MFA, one funded wallet and an API key for it.
    pub async fn user_with_wallet(
        &self,
        username: &str,
        fund_wei: u128,
    ) -> (TestUser, String, Agent) {
        let mut user = self.register(username).await;
        self.enroll_mfa(&mut user).await;
        let wallet = self.create_wallet(&user).await;
        if fund_wei > 0 {
            self.anvil.fund(&wallet, fund_wei).await;
        }
        let agent = self.issue_api_key(&mut user, "agent", None).await;
        (user, wallet, agent)
    }

    pub async fn create_wallet(&self, user: &TestUser) -> String {
        let (status, body) = self
            .post(
                "/api/create_wallet",
                &user.auth(),
                json!({"password": PASSWORD}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["wallet_address"].as_str().unwrap().to_owned()
    }

    pub async fn issue_api_key(
        &self,
        user: &mut TestUser,
        name: &str,
        wallets: Option<Vec<String>>,
    ) -> Agent {
        let code = user.fresh_code().await;
        let (status, body) = self
            .post(
                "/api/api_keys",
                &user.auth(),
                json!({"name": name, "mfa_code": code, "wallet_addresses": wallets}),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        Agent {
            id: body["api_key_id"].as_str().unwrap().to_owned(),
            key: body["api_key"].as_str().unwrap().to_owned(),
        }
    }

    pub async fn prepare(&self, agent: &Agent, body: Value) -> String {
        let (status, resp) = self
            .post("/api/prepare_transaction", &agent.auth(), body)
            .await;
        assert_eq!(status, StatusCode::CREATED, "{resp}");
        assert_eq!(resp["status"], "pending_authorization");
        resp["transaction_id"].as_str().unwrap().to_owned()
    }

    pub async fn authorize(&self, user: &mut TestUser, tx: &str) -> (StatusCode, Value) {
        let code = user.fresh_code().await;
        self.post(
            "/api/authorize_transaction",
            &user.auth(),
            json!({"transaction_id": tx, "mfa_code": code}),
        )
        .await
    }

    /// Authorize several transactions with one code.
    pub async fn authorize_all<S: AsRef<str>>(
        &self,
        user: &mut TestUser,
        ids: &[S],
    ) -> (StatusCode, Value) {
        let code = user.fresh_code().await;
        let ids: Vec<&str> = ids.iter().map(AsRef::as_ref).collect();
        self.post(
            "/api/authorize_transactions",
            &user.auth(),
            json!({"transaction_ids": ids, "mfa_code": code}),
        )
        .await
    }

    pub async fn status(&self, auth: &Auth, tx: &str) -> Value {
        let (status, body) = self
            .get(
                &format!("/api/transaction_status?transaction_id={tx}"),
                auth,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body
    }

    /// Poll the status until it is `want` (receipts are tracked in the background).
    pub async fn wait_for_status(&self, auth: &Auth, tx: &str, want: &str) -> Value {
        let mut last = Value::Null;
        for _ in 0..100 {
            last = self.status(auth, tx).await;
            if last["status"] == want {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("transaction {tx} never reached {want}: {last}");
    }
}

async fn send(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.expect("request sent");
    let status = resp.status();
    let text = resp.text().await.expect("body");
    let body = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("non-JSON response {status}: {text}"))
    };
    (status, body)
}

pub enum Auth {
    None,
    Bearer(String),
    ApiKey(String),
}

impl Auth {
    fn apply(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self {
            Auth::None => req,
            Auth::Bearer(t) => req.bearer_auth(t),
            Auth::ApiKey(k) => req.header("X-API-KEY", k),
        }
    }
}

pub struct Agent {
    pub id: String,
    pub key: String,
}

impl Agent {
    pub fn auth(&self) -> Auth {
        Auth::ApiKey(self.key.clone())
    }
}

pub struct TestUser {
    pub user_id: String,
    pub username: String,
    pub token: String,
    totp: Option<TotpSecret>,
    last_step: u64,
}

fn now_step() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        / 30
}

impl TestUser {
    pub fn auth(&self) -> Auth {
        Auth::Bearer(self.token.clone())
    }

    pub fn set_secret(&mut self, base32: &str) {
        let bytes = base32_decode(base32);
        self.totp = Some(TotpSecret::from_bytes(Zeroizing::new(bytes)));
        self.last_step = 0;
    }

    pub fn code_at(&self, step: u64) -> String {
        self.totp.as_ref().expect("MFA enrolled").code_at_step(step)
    }

    /// A code for a time step this user has not used yet. The server accepts steps within
    /// ±1 of now, each once; when all three are spent this waits for the clock.
    pub async fn fresh_code(&mut self) -> String {
        loop {
            let now = now_step();
            // The previous step's code stays valid for the rest of this step; near its end the
            // clock could tick before the server checks, so then start from the current step.
            let secs_into_step = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
                % 30;
            let earliest = if secs_into_step < 25 {
                now.saturating_sub(1)
            } else {
                now
            };
            let step = (self.last_step + 1).max(earliest);
            if step <= now + 1 {
                self.last_step = step;
                return self.code_at(step);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The last code handed out (for replay tests).
    pub fn last_code(&self) -> String {
        self.code_at(self.last_step)
    }
}

fn base32_decode(s: &str) -> Vec<u8> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut bits: u64 = 0;
    let mut n = 0;
    let mut out = vec![];
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c).expect("base32") as u64;
        bits = (bits << 5) | v;
        n += 5;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    out
}

/// A transfer amount and recipient distinct per test.
pub fn native_body(wallet: &str, to: &str, wei: u128) -> Value {
    json!({"wallet_address": wallet, "kind": "native", "to": to, "value": wei.to_string(),
           "memo": "test payment"})
}

pub fn random_address() -> String {
    let bytes: [u8; 20] = rand::random();
    format!("0x{}", hex::encode(bytes))
}

/// Assert a JSON error response: status, code and (optionally) field.
pub fn assert_error(resp: &(StatusCode, Value), status: StatusCode, code: &str) {
    assert_eq!(resp.0, status, "unexpected status, body: {}", resp.1);
    assert_eq!(
        resp.1["error"]["code"], code,
        "unexpected error: {}",
        resp.1
    );
    assert!(resp.1["error"]["message"].is_string(), "{}", resp.1);
}

pub fn assert_field(resp: &(StatusCode, Value), field: &str) {
    assert_eq!(
        resp.1["error"]["field"], field,
        "unexpected field: {}",
        resp.1
    );
}

// Helpers added for the negative-path and security specifications (negative.rs, security.rs).

/// The current TOTP time step (30 s since the epoch).
pub fn current_step() -> u64 {
    now_step()
}

/// Decode an RFC 4648 base32 TOTP secret to its raw bytes.
pub fn decode_base32(s: &str) -> Vec<u8> {
    base32_decode(s)
}

/// The TOTP code of a base32 secret at `step` (for a secret the test keeps aside).
pub fn totp_code(base32_secret: &str, step: u64) -> String {
    TotpSecret::from_bytes(Zeroizing::new(base32_decode(base32_secret))).code_at_step(step)
}

impl TestUser {
    /// Use a new TOTP secret from now on, keeping the record of the steps already spent: the
    /// server accepts each step once per user, whichever secret produced the code.
    pub fn switch_secret(&mut self, base32: &str) {
        let last = self.last_step;
        self.set_secret(base32);
        self.last_step = last;
    }

    /// A well-formed 6-digit code that matches none of the steps the server could accept now
    /// (±2 steps, to stay wrong even if the clock ticks during the request).
    pub fn wrong_code(&self) -> String {
        let now = now_step();
        let valid: Vec<String> = (now.saturating_sub(2)..=now + 2)
            .map(|s| self.code_at(s))
            .collect();
        (0u32..)
            .map(|n| format!("{:06}", (n * 111_111 + 123_456) % 1_000_000))
            .find(|c| !valid.contains(c))
            .expect("some code is wrong")
    }
}

impl TestApp {
    /// POST an owned raw body (any size) as `application/json`.
    pub async fn post_body(&self, path: &str, auth: &Auth, body: String) -> (StatusCode, Value) {
        let req = auth
            .apply(self.client.post(self.url(path)))
            .header("content-type", "application/json")
            .body(body);
        send(req).await
    }

    /// The wallet's transaction count on chain (`latest`): one per broadcast transaction mined.
    pub async fn onchain_nonce(&self, address: &str) -> u64 {
        let hex = self
            .anvil
            .rpc("eth_getTransactionCount", json!([address, "latest"]))
            .await;
        u64::from_str_radix(hex.as_str().unwrap().trim_start_matches("0x"), 16).unwrap()
    }
}
