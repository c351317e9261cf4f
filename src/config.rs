//! Configuration from the environment (and `.env`). Secrets are checked for strength here, once,
//! so the rest of the server can assume they are sound. Dev mode may generate them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use rand::RngCore;
use secrecy::SecretString;

use crate::crypto::MasterKey;
use crate::metrics::MetricsAccess;

pub const DEFAULT_DATABASE_URL: &str = "sqlite://countersign.db";
pub const DEFAULT_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_CHAIN_URL: &str = "http://127.0.0.1:8545";
const MIN_JWT_SECRET_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{name} is not set (run `countersign serve --dev` for a local instance with generated secrets)")]
    Missing { name: &'static str },
    #[error("{name} is invalid: {why}")]
    Invalid { name: &'static str, why: String },
    #[error("dev secrets file {path}: {source}")]
    DevSecrets {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Everything the server needs to run.
pub struct Config {
    pub database_url: String,
    /// PostgreSQL connections per server process (the pool's size). With several nodes on one
    /// database, nodes × this must stay below the server's `max_connections`.
    pub db_max_connections: u32,
    pub chain_url: url::Url,
    /// Bound on every chain RPC (connect, send, answer): a node that accepts connections but
    /// never answers costs a request at most this, then 503 `chain_unavailable`.
    pub chain_timeout: Duration,
    /// Bound on handling one request once its headers are in: then 408 `request_timeout`.
    pub request_timeout: Duration,
    /// A connection must deliver a request's headers within this of opening, or of the
    /// previous response: slow or idle HTTP connections are closed (WebSockets are exempt).
    pub header_timeout: Duration,
    pub addr: SocketAddr,
    pub jwt_secret: SecretString,
    pub jwt_ttl: Duration,
    pub master_key: MasterKey,
    /// How long a prepared transaction waits for its human by default (and at most).
    pub default_expiry: Duration,
    /// How often background workers (expiry, receipts, projection catch-up) poll.
    pub poll_interval: Duration,
    /// The most an executed transaction may offer per gas (EIP-1559 `max_fee_per_gas`), wei.
    /// `None`: no cap. A transaction the network would charge more fails before signing.
    pub max_fee_per_gas_cap: Option<u128>,
    /// How long an `Idempotency-Key` is remembered (its response replayed) after first use.
    pub idempotency_ttl: Duration,
    /// Test hook, never set from the environment: emulate a crash right after a signed
    /// transaction is recorded and before it is broadcast. The execute request then answers
    /// 500 and the instance stops broadcasting (as a dead process would) until restarted.
    pub crash_after_sign_for_tests: bool,
    /// Who may read `GET /metrics` (`COUNTERSIGN_METRICS`, `COUNTERSIGN_METRICS_TOKEN`).
    pub metrics: MetricsAccess,
    /// Rate limits on logins and API keys (`COUNTERSIGN_LOGIN_*`, `COUNTERSIGN_API_KEY_*`).
    pub limits: crate::limits::LimitsConfig,
    /// Browser origins allowed to call the API (`COUNTERSIGN_CORS_ORIGINS`); empty: CORS off.
    pub cors_origins: CorsOrigins,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Secrets are deliberately absent.
        f.debug_struct("Config")
            .field("database_url", &redact_url(&self.database_url))
            .field("chain_url", &redact_chain_url(&self.chain_url))
            .field("chain_timeout", &self.chain_timeout)
            .field("db_max_connections", &self.db_max_connections)
            .field("addr", &self.addr)
            .field("jwt_ttl", &self.jwt_ttl)
            .field("max_fee_per_gas_cap", &self.max_fee_per_gas_cap)
            .field("metrics", &self.metrics)
            .field("limits", &self.limits)
            .field("cors_origins", &self.cors_origins)
            .finish_non_exhaustive()
    }
}

/// A database URL with any password removed, for logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        _ => url.to_owned(),
    }
}

/// A chain node's URL fit for logs and messages. Hosted nodes carry their API key in the path
/// (`…/v3/<key>`), the query or the user part, so only the scheme, host and port are shown.
pub fn redact_chain_url(url: &url::Url) -> String {
    let hidden = url.path() != "/"
        || url.query().is_some()
        || url.fragment().is_some()
        || !url.username().is_empty()
        || url.password().is_some();
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    format!(
        "{}://{}{port}/{}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        if hidden { "***" } else { "" }
    )
}

fn var(name: &'static str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn parse_var<T: std::str::FromStr>(name: &'static str, default: T) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match var(name) {
        None => Ok(default),
        Some(v) => v.trim().parse().map_err(|e: T::Err| ConfigError::Invalid {
            name,
            why: e.to_string(),
        }),
    }
}

/// A positive number of seconds from `name`, or `default`.
fn positive_secs(name: &'static str, default: u64) -> Result<Duration, ConfigError> {
    match parse_var(name, default)? {
        0 => Err(ConfigError::Invalid {
            name,
            why: "must be a positive number of seconds".into(),
        }),
        secs => Ok(Duration::from_secs(secs)),
    }
}

impl Config {
    /// Read the configuration. In dev mode, missing secrets are generated once and kept in
    /// `dev_dir/secrets.env` (mode 0600) so restarts keep access to existing wallets.
    pub fn from_env(dev_dir: Option<&Path>) -> Result<Self, ConfigError> {
        if let Some(dir) = dev_dir {
            load_or_create_dev_secrets(dir)?;
        }
        let jwt_secret = var("JWT_SECRET_KEY").ok_or(ConfigError::Missing {
            name: "JWT_SECRET_KEY",
        })?;
        if jwt_secret.len() < MIN_JWT_SECRET_BYTES {
            return Err(ConfigError::Invalid {
                name: "JWT_SECRET_KEY",
                why: format!("must be at least {MIN_JWT_SECRET_BYTES} bytes of random data"),
            });
        }
        let master_key = master_key_from_env()?.ok_or(ConfigError::Missing {
            name: "COUNTERSIGN_MASTER_KEY",
        })?;
        let chain_url = var("WEB3_PROVIDER_URI").unwrap_or_else(|| DEFAULT_CHAIN_URL.to_owned());
        let chain_url = url::Url::parse(&chain_url).map_err(|e| ConfigError::Invalid {
            name: "WEB3_PROVIDER_URI",
            why: e.to_string(),
        })?;
        let db_max_connections: u32 = parse_var(
            "COUNTERSIGN_DB_MAX_CONNECTIONS",
            crate::store::DEFAULT_MAX_CONNECTIONS,
        )?;
        if db_max_connections < crate::store::MIN_CONNECTIONS {
            return Err(ConfigError::Invalid {
                name: "COUNTERSIGN_DB_MAX_CONNECTIONS",
                why: format!("must be at least {}", crate::store::MIN_CONNECTIONS),
            });
        }
        let chain_timeout_secs: u64 = parse_var("COUNTERSIGN_CHAIN_TIMEOUT_SECS", 10)?;
        if chain_timeout_secs == 0 {
            return Err(ConfigError::Invalid {
                name: "COUNTERSIGN_CHAIN_TIMEOUT_SECS",
                why: "must be a positive number of seconds".into(),
            });
        }
        let request_timeout = positive_secs("COUNTERSIGN_REQUEST_TIMEOUT_SECS", 60)?;
        let header_timeout = positive_secs("COUNTERSIGN_HEADER_TIMEOUT_SECS", 30)?;
        let jwt_ttl: u64 = parse_var("JWT_ACCESS_TOKEN_EXPIRES", 900)?;
        if jwt_ttl == 0 {
            return Err(ConfigError::Invalid {
                name: "JWT_ACCESS_TOKEN_EXPIRES",
                why: "must be a positive number of seconds".into(),
            });
        }
        let expiry_secs: u64 = parse_var("COUNTERSIGN_TX_EXPIRY", 900)?;
        let poll_ms: u64 = parse_var("COUNTERSIGN_POLL_INTERVAL_MS", 500)?;
        let idempotency_ttl: u64 = parse_var("COUNTERSIGN_IDEMPOTENCY_TTL", 86_400)?;
        if idempotency_ttl == 0 {
            return Err(ConfigError::Invalid {
                name: "COUNTERSIGN_IDEMPOTENCY_TTL",
                why: "must be a positive number of seconds".into(),
            });
        }
        let max_fee_per_gas_cap = match var("COUNTERSIGN_MAX_FEE_PER_GAS_WEI") {
            None => None,
            Some(v) => match v.trim().parse::<u128>() {
                Ok(cap) if cap > 0 => Some(cap),
                _ => {
                    return Err(ConfigError::Invalid {
                        name: "COUNTERSIGN_MAX_FEE_PER_GAS_WEI",
                        why: "must be a positive integer number of wei".into(),
                    })
                }
            },
        };
        Ok(Self {
            database_url: var("DATABASE_URL").unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned()),
            chain_url,
            chain_timeout: Duration::from_secs(chain_timeout_secs),
            request_timeout,
            header_timeout,
            db_max_connections,
            addr: parse_var(
                "COUNTERSIGN_ADDR",
                DEFAULT_ADDR.parse().expect("valid default"),
            )?,
            jwt_secret: SecretString::from(jwt_secret),
            jwt_ttl: Duration::from_secs(jwt_ttl),
            master_key,
            default_expiry: Duration::from_secs(expiry_secs.max(1)),
            poll_interval: Duration::from_millis(poll_ms.max(10)),
            max_fee_per_gas_cap,
            idempotency_ttl: Duration::from_secs(idempotency_ttl),
            crash_after_sign_for_tests: false,
            metrics: metrics_access()?,
            limits: limits_from_env()?,
            cors_origins: match var("COUNTERSIGN_CORS_ORIGINS") {
                None => CorsOrigins::default(),
                Some(list) => CorsOrigins::parse(&list).map_err(|why| ConfigError::Invalid {
                    name: "COUNTERSIGN_CORS_ORIGINS",
                    why,
                })?,
            },
        })
    }
}

/// The browser origins allowed to call the API cross-origin, each as browsers serialize it in
/// the `Origin` header (`https://app.example.com`: lower-case host, default port left out), so
/// a request's origin is allowed exactly when it equals one of them. Empty: CORS is off.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CorsOrigins(Vec<String>);

impl CorsOrigins {
    /// A comma-separated list of exact origins. `*` is refused: every credential this API takes
    /// is a header a script sets (bearer token, API key), so "any origin" would let any site a
    /// user visits drive the API with a token it obtained; name the origins instead.
    pub fn parse(list: &str) -> Result<Self, String> {
        let mut origins = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let origin = parse_origin(entry)?;
            if !origins.contains(&origin) {
                origins.push(origin);
            }
        }
        if origins.is_empty() {
            return Err("lists no origin (unset it to turn CORS off)".into());
        }
        Ok(Self(origins))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether an `Origin` header value is on the list (exact match).
    pub fn allows(&self, origin: &str) -> bool {
        self.0.iter().any(|o| o == origin)
    }
}

/// One origin: `http` or `https`, a host, an optional port; nothing else.
fn parse_origin(entry: &str) -> Result<String, String> {
    if entry == "*" {
        return Err(
            "`*` (any origin) is not allowed: the API takes bearer tokens and API keys, \
                    so list the exact origins (like https://app.example.com) that may call it"
                .into(),
        );
    }
    if entry.contains('*') {
        return Err(format!(
            "`{entry}`: wildcards are not supported; list each origin exactly"
        ));
    }
    let not_an_origin =
        |why: &str| format!("`{entry}` is not an origin like https://app.example.com: {why}");
    let url = url::Url::parse(entry).map_err(|e| not_an_origin(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(not_an_origin("the scheme must be http or https"));
    }
    // `Url` turns a missing path into `/`, so look at the text itself for anything after the
    // host and port (also catches `https:host` without the slashes).
    let prefix = format!("{}://", url.scheme());
    let authority = entry
        .get(..prefix.len())
        .filter(|p| p.eq_ignore_ascii_case(&prefix))
        .map(|_| &entry[prefix.len()..])
        .ok_or_else(|| not_an_origin("expected scheme://host[:port]"))?;
    if authority.contains(['/', '?', '#', '\\']) {
        return Err(not_an_origin(
            "an origin has no path, query or fragment (not even `/`)",
        ));
    }
    if authority.contains('@') {
        return Err(not_an_origin("an origin has no user name or password"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(not_an_origin("it has no host"));
    }
    Ok(url.origin().ascii_serialization())
}

/// The rate limits; each count may be 0 to turn that limit off.
fn limits_from_env() -> Result<crate::limits::LimitsConfig, ConfigError> {
    use crate::limits::{LimitsConfig, Rate, DEFAULT_API_KEY_BURST, DEFAULT_API_KEY_RATE};
    let defaults = LimitsConfig::default();
    let window = |name: &'static str, default: Duration| -> Result<Duration, ConfigError> {
        match parse_var(name, default.as_secs())? {
            0 => Err(ConfigError::Invalid {
                name,
                why: "must be a positive number of seconds".into(),
            }),
            secs => Ok(Duration::from_secs(secs)),
        }
    };
    let login_window = window(
        "COUNTERSIGN_LOGIN_FAILURE_WINDOW",
        defaults.login_per_username.period,
    )?;
    let api_key_window = window(
        "COUNTERSIGN_API_KEY_FAILURE_WINDOW",
        defaults.api_key_failures_per_ip.period,
    )?;
    let rate: u32 = parse_var("COUNTERSIGN_API_KEY_RATE", DEFAULT_API_KEY_RATE)?;
    let burst: u32 = parse_var("COUNTERSIGN_API_KEY_BURST", DEFAULT_API_KEY_BURST)?;
    let max_entries: usize = parse_var("COUNTERSIGN_RATE_LIMIT_MAX_ENTRIES", defaults.max_entries)?;
    if max_entries == 0 {
        return Err(ConfigError::Invalid {
            name: "COUNTERSIGN_RATE_LIMIT_MAX_ENTRIES",
            why: "must be positive".into(),
        });
    }
    Ok(LimitsConfig {
        login_per_username: Rate::new(
            parse_var(
                "COUNTERSIGN_LOGIN_FAILURES_PER_USERNAME",
                defaults.login_per_username.burst,
            )?,
            login_window,
        ),
        login_per_ip: Rate::new(
            parse_var(
                "COUNTERSIGN_LOGIN_FAILURES_PER_IP",
                defaults.login_per_ip.burst,
            )?,
            login_window,
        ),
        api_key_failures_per_ip: Rate::new(
            parse_var(
                "COUNTERSIGN_API_KEY_FAILURES_PER_IP",
                defaults.api_key_failures_per_ip.burst,
            )?,
            api_key_window,
        ),
        api_key_requests: Rate::per_second(rate, burst),
        max_entries,
    })
}

/// `COUNTERSIGN_METRICS` (`on`, the default, or `off`) and `COUNTERSIGN_METRICS_TOKEN` (when
/// set, scrapes need it as a bearer token).
fn metrics_access() -> Result<MetricsAccess, ConfigError> {
    let enabled = match var("COUNTERSIGN_METRICS").map(|v| v.trim().to_ascii_lowercase()) {
        None => true,
        Some(v) if v == "on" => true,
        Some(v) if v == "off" => false,
        Some(_) => {
            return Err(ConfigError::Invalid {
                name: "COUNTERSIGN_METRICS",
                why: "must be `on` or `off`".into(),
            })
        }
    };
    let token = var("COUNTERSIGN_METRICS_TOKEN");
    match (enabled, token) {
        (false, Some(_)) => Err(ConfigError::Invalid {
            name: "COUNTERSIGN_METRICS_TOKEN",
            why: "is set while COUNTERSIGN_METRICS=off; unset one of them".into(),
        }),
        (false, None) => Ok(MetricsAccess::Disabled),
        (true, None) => Ok(MetricsAccess::Open),
        (true, Some(token)) if token.trim().len() < crate::metrics::MIN_TOKEN_LEN => {
            Err(ConfigError::Invalid {
                name: "COUNTERSIGN_METRICS_TOKEN",
                why: format!(
                    "must be at least {} characters of random data",
                    crate::metrics::MIN_TOKEN_LEN
                ),
            })
        }
        (true, Some(token)) => Ok(MetricsAccess::Token(SecretString::from(token.trim()))),
    }
}

/// `COUNTERSIGN_MASTER_KEY` (seals new secrets) with `COUNTERSIGN_PREVIOUS_MASTER_KEYS`
/// (comma-separated keys still accepted for opening, during a rotation); `None` if the master
/// key is not set.
pub fn master_key_from_env() -> Result<Option<MasterKey>, ConfigError> {
    let Some(current) = var("COUNTERSIGN_MASTER_KEY").map(zeroize::Zeroizing::new) else {
        return Ok(None);
    };
    let current = MasterKey::from_base64(&current).map_err(|why| ConfigError::Invalid {
        name: "COUNTERSIGN_MASTER_KEY",
        why,
    })?;
    let previous = match var("COUNTERSIGN_PREVIOUS_MASTER_KEYS").map(zeroize::Zeroizing::new) {
        None => Vec::new(),
        Some(list) => MasterKey::list_from_base64(&list).map_err(|why| ConfigError::Invalid {
            name: "COUNTERSIGN_PREVIOUS_MASTER_KEYS",
            why,
        })?,
    };
    Ok(Some(current.with_previous(previous)))
}

/// Generate random dev secrets into `dir/secrets.env` unless present, then export any that the
/// environment does not already set.
fn load_or_create_dev_secrets(dir: &Path) -> Result<(), ConfigError> {
    let path = dir.join("secrets.env");
    let io_err = |source| ConfigError::DevSecrets {
        path: path.clone(),
        source,
    };
    if !path.exists() {
        std::fs::create_dir_all(dir).map_err(io_err)?;
        let mut jwt = zeroize::Zeroizing::new([0u8; 48]);
        let mut master = zeroize::Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng.fill_bytes(jwt.as_mut_slice());
        rand::rngs::OsRng.fill_bytes(master.as_mut_slice());
        let b64 = base64::engine::general_purpose::STANDARD;
        let contents = zeroize::Zeroizing::new(format!(
            "# Generated by `countersign serve --dev`. NOT FOR PRODUCTION. Losing this file\n\
             # loses access to every wallet created with it.\n\
             JWT_SECRET_KEY={}\nCOUNTERSIGN_MASTER_KEY={}\n",
            b64.encode(jwt.as_slice()),
            b64.encode(master.as_slice()),
        ));
        write_private_file(&path, contents.as_bytes()).map_err(io_err)?;
        tracing::warn!(path = %path.display(), "DEV MODE: generated new secrets (do not use in production)");
    } else {
        tracing::warn!(path = %path.display(), "DEV MODE: using generated secrets (do not use in production)");
    }
    // Explicit environment variables win over the file.
    dotenvy::from_path(&path).map_err(|e| ConfigError::Invalid {
        name: "dev secrets file",
        why: e.to_string(),
    })?;
    Ok(())
}

#[cfg(unix)]
fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}

#[cfg(test)]
mod tests {
    use super::{redact_chain_url, CorsOrigins};

    #[test]
    fn chain_urls_show_where_the_node_is_not_its_key() {
        let shown = |u: &str| redact_chain_url(&u.parse().unwrap());
        assert_eq!(shown("http://127.0.0.1:8545"), "http://127.0.0.1:8545/");
        assert_eq!(
            shown("https://mainnet.infura.io/v3/0123abcd"),
            "https://mainnet.infura.io/***"
        );
        assert_eq!(
            shown("https://node.example/?key=0123abcd"),
            "https://node.example/***"
        );
        assert_eq!(
            shown("https://user:0123abcd@node.example"),
            "https://node.example/***"
        );
    }

    #[test]
    fn cors_origins_are_exact_origins_in_browser_form() {
        let origins = CorsOrigins::parse(
            " https://App.Example.com , http://localhost:5173,https://app.example.com:443,",
        )
        .unwrap();
        assert_eq!(
            origins,
            CorsOrigins(vec![
                "https://app.example.com".into(),
                "http://localhost:5173".into()
            ])
        );
        assert!(origins.allows("https://app.example.com"));
        assert!(origins.allows("http://localhost:5173"));
        assert!(!origins.allows("http://app.example.com"));
        assert!(!origins.allows("https://app.example.com.evil.example"));
        assert!(!origins.allows("http://localhost:5174"));
        assert!(!origins.allows("null"));
    }

    #[test]
    fn wildcard_and_non_origins_are_refused() {
        let any = CorsOrigins::parse("*").unwrap_err();
        assert!(any.contains("`*` (any origin) is not allowed"), "{any}");
        assert!(any.contains("bearer tokens and API keys"), "{any}");
        for (entry, why) in [
            ("https://app.example.com, *", "`*` (any origin)"),
            ("https://*.example.com", "wildcards are not supported"),
            ("https://app.example.com/", "no path"),
            ("https://app.example.com/api", "no path"),
            ("https://app.example.com?x=1", "no path, query"),
            ("https://app.example.com#x", "fragment"),
            ("https://user:pw@app.example.com", "no user name"),
            ("ftp://app.example.com", "http or https"),
            ("app.example.com", "not an origin"),
            ("https:app.example.com", "scheme://host"),
            ("null", "not an origin"),
            (" , ", "lists no origin"),
        ] {
            let err = CorsOrigins::parse(entry).unwrap_err();
            assert!(err.contains(why), "{entry}: {err}");
        }
    }
}
