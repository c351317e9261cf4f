//! In-memory rate limits for the HTTP layer: failed logins per username and per source
//! address, failed API-key authentications per address, and the request rate of each API key.
//!
//! Every limit is a GCRA (the "generic cell rate algorithm", a token bucket kept as one
//! timestamp per key): `burst` events at once, then one more every `period / burst`, so at most
//! `burst` per `period` sustained. A blocked caller costs no password hash and no database
//! lookup. Logins take their attempt *before* the password is checked and a correct password
//! gives it back, so concurrent guesses cannot all slip past the check; failed API-key
//! authentications are checked first and recorded when they happen (a burst of concurrent
//! ones can overshoot by what is in flight: the keys are 256 random bits, so that limit is
//! about load, not guessing).
//!
//! State is per process (several nodes each count separately) and bounded: a key whose bucket
//! is full again carries no information and is dropped, and at `max_entries` keys the ones
//! closest to full are evicted first, so spraying usernames or addresses cannot grow memory
//! without bound and mostly evicts its own entries. MFA lockout is not here: it is recorded as
//! events on the `User` aggregate and holds across nodes.
//!
//! Nothing here reads a clock except through [`Clock`], so tests drive time by hand.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Where the limits get the time.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The monotonic system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// `burst` events per `period`; `burst == 0` disables the limit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub burst: u32,
    pub period: Duration,
}

impl Rate {
    pub fn new(burst: u32, period: Duration) -> Self {
        Self { burst, period }
    }

    /// `per_second` sustained, up to `burst` at once.
    pub fn per_second(per_second: u32, burst: u32) -> Self {
        if per_second == 0 {
            return Self::new(0, Duration::ZERO);
        }
        let interval = Duration::from_secs(1) / per_second;
        Self::new(burst.max(1), interval * burst.max(1))
    }
}

/// The limits and how much state they may keep (see the README's configuration table).
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// Failed logins per (case-folded) username.
    pub login_per_username: Rate,
    /// Failed logins per source address.
    pub login_per_ip: Rate,
    /// Failed API-key authentications per source address.
    pub api_key_failures_per_ip: Rate,
    /// Requests per API key.
    pub api_key_requests: Rate,
    /// Keys each limit remembers at most.
    pub max_entries: usize,
}

pub const DEFAULT_MAX_ENTRIES: usize = 100_000;
/// Requests per second per API key: high enough for the load tool's read benchmark (about
/// 850 requests/s per key on two cores); deployments set what their agents need.
pub const DEFAULT_API_KEY_RATE: u32 = 1000;
pub const DEFAULT_API_KEY_BURST: u32 = 2000;

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            login_per_username: Rate::new(10, Duration::from_secs(15 * 60)),
            login_per_ip: Rate::new(30, Duration::from_secs(15 * 60)),
            api_key_failures_per_ip: Rate::new(20, Duration::from_secs(60)),
            api_key_requests: Rate::per_second(DEFAULT_API_KEY_RATE, DEFAULT_API_KEY_BURST),
            max_entries: DEFAULT_MAX_ENTRIES,
        }
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    LoginUsername,
    LoginAddress,
    ApiKeyFailures,
    ApiKeyRequests,
}

/// A refusal: which limit, and when one more attempt will be allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimited {
    pub limit: Limit,
    pub retry_after: Duration,
}

impl RateLimited {
    /// Whole seconds to wait (rounded up, at least 1), for `Retry-After`.
    pub fn retry_after_secs(&self) -> u64 {
        let d = self.retry_after;
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

impl std::fmt::Display for RateLimited {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.limit {
            Limit::LoginUsername => "too many failed logins for this username",
            Limit::LoginAddress => "too many failed logins from this address",
            Limit::ApiKeyFailures => "too many failed API key authentications from this address",
            Limit::ApiKeyRequests => "request rate limit of this API key exceeded",
        };
        write!(f, "{what}; retry in {} seconds", self.retry_after_secs())
    }
}

/// One GCRA limit over keys `K`, remembering at most `max_entries` keys.
pub struct RateLimiter<K> {
    /// Time one event "costs": `period / burst`.
    interval: Duration,
    /// How far ahead of now the theoretical arrival time may run: `period`.
    tolerance: Duration,
    max_entries: usize,
    /// Per key, the theoretical arrival time: the bucket is full again at that instant.
    tats: Mutex<HashMap<K, Instant>>,
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// `None` when `rate` is disabled.
    pub fn new(rate: Rate, max_entries: usize) -> Option<Self> {
        if rate.burst == 0 || rate.period.is_zero() {
            return None;
        }
        Some(Self {
            interval: rate.period / rate.burst,
            tolerance: rate.period,
            max_entries: max_entries.max(1),
            tats: Mutex::new(HashMap::new()),
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<K, Instant>> {
        // A panic while holding the lock cannot leave a map inconsistent: use it anyway.
        self.tats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether an event would be allowed at `now`, without recording it.
    pub fn check(&self, key: &K, now: Instant) -> Result<(), Duration> {
        let tat = self.map().get(key).copied();
        self.decide(tat, now).map(drop)
    }

    /// Record an event at `now` (a failure that happened; never refused).
    pub fn record(&self, key: K, now: Instant) {
        let mut map = self.map();
        let tat = map.get(&key).copied().unwrap_or(now).max(now) + self.interval;
        // Events recorded past the limit (concurrent checks) do not extend the wait further.
        let tat = tat.min(now + self.tolerance);
        self.insert(&mut map, key, tat, now);
    }

    /// Check and record in one step: the request rate.
    pub fn acquire(&self, key: K, now: Instant) -> Result<(), Duration> {
        let mut map = self.map();
        let tat = self.decide(map.get(&key).copied(), now)?;
        self.insert(&mut map, key, tat, now);
        Ok(())
    }

    /// Give back one event taken by [`acquire`](Self::acquire) (it turned out not to count).
    pub fn refund(&self, key: &K, now: Instant) {
        let mut map = self.map();
        if let Some(tat) = map.get_mut(key) {
            *tat = tat.checked_sub(self.interval).unwrap_or(now);
            if *tat <= now {
                map.remove(key);
            }
        }
    }

    /// Forget `key` (e.g. a successful login clears its username's failures).
    pub fn reset(&self, key: &K) {
        self.map().remove(key);
    }

    #[cfg(test)]
    fn remembers(&self, key: &K) -> bool {
        self.map().contains_key(key)
    }

    /// Keys currently remembered.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The new theoretical arrival time if an event at `now` is allowed, else how long until
    /// it would be.
    fn decide(&self, tat: Option<Instant>, now: Instant) -> Result<Instant, Duration> {
        let next = tat.unwrap_or(now).max(now) + self.interval;
        let allowed_until = now + self.tolerance;
        if next <= allowed_until {
            Ok(next)
        } else {
            Err(next - allowed_until)
        }
    }

    fn insert(&self, map: &mut HashMap<K, Instant>, key: K, tat: Instant, now: Instant) {
        if map.len() >= self.max_entries && !map.contains_key(&key) {
            Self::evict(map, self.max_entries, now);
        }
        map.insert(key, tat);
    }

    /// Make room: drop keys whose bucket is full again (they say nothing), then, if that is
    /// not enough, the keys closest to full, down to 90 % of the capacity so this runs rarely.
    fn evict(map: &mut HashMap<K, Instant>, max_entries: usize, now: Instant) {
        map.retain(|_, tat| *tat > now);
        let target = max_entries - max_entries / 10 - 1;
        if map.len() <= target {
            return;
        }
        let mut tats: Vec<Instant> = map.values().copied().collect();
        let mut excess = map.len() - target;
        let (_, threshold, _) = tats.select_nth_unstable(excess - 1);
        let threshold = *threshold;
        // Fewer than `excess` are below the threshold; ties at it go until enough are gone.
        map.retain(|_, tat| {
            let drop = *tat < threshold || (*tat == threshold && excess > 0);
            excess -= usize::from(drop);
            !drop
        });
    }
}

/// A source address as limits count it: IPv4 as is, IPv6 by its /64 (what one host or
/// customer usually gets, so rotating addresses inside it gains nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpKey(IpAddr);

impl From<IpAddr> for IpKey {
    fn from(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Self(IpAddr::V4(v4)),
                None => {
                    let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                    Self(IpAddr::V6(prefix.into()))
                }
            },
        }
    }
}

/// The server's limits, read by the HTTP layer.
pub struct Limits {
    clock: Arc<dyn Clock>,
    login_username: Option<RateLimiter<String>>,
    login_ip: Option<RateLimiter<IpKey>>,
    api_key_failures_ip: Option<RateLimiter<IpKey>>,
    api_key_requests: Option<RateLimiter<String>>,
}

/// Usernames are unique case-insensitively and at most 64 characters: count them so.
fn username_key(username: &str) -> String {
    username.chars().take(64).collect::<String>().to_lowercase()
}

fn refused(limit: Limit) -> impl Fn(Duration) -> RateLimited {
    move |retry_after| RateLimited { limit, retry_after }
}

impl Limits {
    pub fn new(config: &LimitsConfig) -> Self {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    pub fn with_clock(config: &LimitsConfig, clock: Arc<dyn Clock>) -> Self {
        let n = config.max_entries;
        Self {
            clock,
            login_username: RateLimiter::new(config.login_per_username, n),
            login_ip: RateLimiter::new(config.login_per_ip, n),
            api_key_failures_ip: RateLimiter::new(config.api_key_failures_per_ip, n),
            api_key_requests: RateLimiter::new(config.api_key_requests, n),
        }
    }

    /// Before checking a password: take one failure from the username's and the address's
    /// allowance, as if the attempt will fail. Refused while either is used up, even for the
    /// right password (else the limit would be an oracle).
    pub fn begin_login(&self, username: &str, ip: Option<IpAddr>) -> Result<(), RateLimited> {
        let now = self.clock.now();
        let username = username_key(username);
        if let Some(limiter) = &self.login_username {
            limiter
                .acquire(username.clone(), now)
                .map_err(refused(Limit::LoginUsername))?;
        }
        if let (Some(limiter), Some(ip)) = (&self.login_ip, ip) {
            if let Err(wait) = limiter.acquire(ip.into(), now) {
                if let Some(by_name) = &self.login_username {
                    by_name.refund(&username, now);
                }
                return Err(refused(Limit::LoginAddress)(wait));
            }
        }
        Ok(())
    }

    /// The password was right: the username's failures are cleared and the address gets its
    /// attempt back (its earlier failures stay: an attacker could log in to their own
    /// account between guesses).
    pub fn login_succeeded(&self, username: &str, ip: Option<IpAddr>) {
        let now = self.clock.now();
        if let Some(limiter) = &self.login_username {
            limiter.reset(&username_key(username));
        }
        if let (Some(limiter), Some(ip)) = (&self.login_ip, ip) {
            limiter.refund(&ip.into(), now);
        }
    }

    /// Before looking an API key up: refused while the address has failed too often.
    pub fn check_api_key_auth(&self, ip: Option<IpAddr>) -> Result<(), RateLimited> {
        match (&self.api_key_failures_ip, ip) {
            (Some(limiter), Some(ip)) => limiter
                .check(&ip.into(), self.clock.now())
                .map_err(refused(Limit::ApiKeyFailures)),
            _ => Ok(()),
        }
    }

    pub fn api_key_auth_failed(&self, ip: Option<IpAddr>) {
        if let (Some(limiter), Some(ip)) = (&self.api_key_failures_ip, ip) {
            limiter.record(ip.into(), self.clock.now());
        }
    }

    /// One request by the API key `api_key_id`.
    pub fn api_key_request(&self, api_key_id: &str) -> Result<(), RateLimited> {
        match &self.api_key_requests {
            Some(limiter) => limiter
                .acquire(api_key_id.to_owned(), self.clock.now())
                .map_err(refused(Limit::ApiKeyRequests)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A clock moved by hand.
    struct ManualClock(Mutex<Instant>);

    impl ManualClock {
        fn new() -> Arc<Self> {
            Arc::new(Self(Mutex::new(Instant::now())))
        }

        fn advance(&self, by: Duration) {
            *self.0.lock().unwrap() += by;
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Instant {
            *self.0.lock().unwrap()
        }
    }

    const MIN: Duration = Duration::from_secs(60);

    fn limits(config: LimitsConfig) -> (Limits, Arc<ManualClock>) {
        let clock = ManualClock::new();
        (Limits::with_clock(&config, clock.clone()), clock)
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn a_burst_is_allowed_then_one_event_per_interval() {
        let limiter = RateLimiter::new(Rate::new(3, Duration::from_secs(30)), 10).unwrap();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.acquire("k", t0), Ok(()));
        }
        assert_eq!(limiter.acquire("k", t0), Err(Duration::from_secs(10)));
        assert_eq!(
            limiter.acquire("k", t0 + Duration::from_secs(4)),
            Err(Duration::from_secs(6))
        );
        let later = t0 + Duration::from_secs(10);
        assert_eq!(limiter.acquire("k", later), Ok(()));
        assert!(limiter.acquire("k", later).is_err());
        // Other keys have their own bucket.
        assert_eq!(limiter.acquire("other", later), Ok(()));
    }

    #[test]
    fn check_does_not_consume_and_record_never_refuses() {
        let limiter = RateLimiter::new(Rate::new(2, MIN), 10).unwrap();
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(limiter.check(&"k", t0), Ok(()));
        }
        limiter.record("k", t0);
        limiter.record("k", t0);
        assert_eq!(limiter.check(&"k", t0), Err(Duration::from_secs(30)));
        // Failures recorded past the limit do not push the wait further out.
        for _ in 0..100 {
            limiter.record("k", t0);
        }
        assert_eq!(limiter.check(&"k", t0), Err(Duration::from_secs(30)));
        assert_eq!(limiter.check(&"k", t0 + Duration::from_secs(30)), Ok(()));
    }

    #[test]
    fn disabled_rates_build_no_limiter() {
        assert!(RateLimiter::<u8>::new(Rate::new(0, MIN), 10).is_none());
        assert!(RateLimiter::<u8>::new(Rate::per_second(0, 100), 10).is_none());
        let (limits, _) = limits(LimitsConfig {
            api_key_requests: Rate::per_second(0, 0),
            ..LimitsConfig::default()
        });
        for _ in 0..10_000 {
            assert_eq!(limits.api_key_request("k"), Ok(()));
        }
    }

    #[test]
    fn login_failures_block_the_username_and_then_the_address() {
        let (limits, clock) = limits(LimitsConfig::default());
        let attacker = ip("203.0.113.7");
        for _ in 0..10 {
            assert_eq!(limits.begin_login("alice", attacker), Ok(()));
        }
        let refused = limits.begin_login("Alice", ip("198.51.100.1")).unwrap_err();
        assert_eq!(refused.limit, Limit::LoginUsername);
        assert_eq!(refused.retry_after_secs(), 90);
        assert!(refused.to_string().contains("retry in 90 seconds"));
        // Other usernames from the same address are fine until the address limit (30).
        for i in 0..19 {
            assert_eq!(limits.begin_login(&format!("user{i}"), attacker), Ok(()));
        }
        assert_eq!(limits.begin_login("bob", attacker), Ok(()));
        let refused = limits.begin_login("carol", attacker).unwrap_err();
        assert_eq!(refused.limit, Limit::LoginAddress);
        // The refusal by address took nothing from carol's own allowance.
        for _ in 0..10 {
            assert_eq!(limits.begin_login("carol", ip("198.51.100.1")), Ok(()));
        }
        // After a sustained interval one more attempt per username is allowed.
        clock.advance(Duration::from_secs(90));
        assert_eq!(limits.begin_login("alice", ip("198.51.100.2")), Ok(()));
        assert!(limits.begin_login("alice", ip("198.51.100.2")).is_err());
    }

    #[test]
    fn a_successful_login_clears_its_username_but_not_its_address() {
        let (limits, _) = limits(LimitsConfig {
            login_per_ip: Rate::new(5, MIN),
            ..LimitsConfig::default()
        });
        let from = ip("192.0.2.1");
        for _ in 0..4 {
            assert_eq!(limits.begin_login("alice", from), Ok(()));
        }
        // The fifth attempt is the right password: it gives its attempt back.
        assert_eq!(limits.begin_login("alice", from), Ok(()));
        limits.login_succeeded("alice", from);
        assert_eq!(limits.begin_login("alice", from), Ok(()));
        assert_eq!(
            limits.begin_login("alice", from).unwrap_err().limit,
            Limit::LoginAddress
        );
        // The username's count was cleared: only the address is used up.
        for _ in 0..9 {
            assert_eq!(limits.begin_login("alice", None), Ok(()));
        }
    }

    #[test]
    fn api_key_failures_are_counted_per_address() {
        let (limits, clock) = limits(LimitsConfig::default());
        let from = ip("192.0.2.9");
        for _ in 0..20 {
            assert_eq!(limits.check_api_key_auth(from), Ok(()));
            limits.api_key_auth_failed(from);
        }
        let refused = limits.check_api_key_auth(from).unwrap_err();
        assert_eq!(refused.limit, Limit::ApiKeyFailures);
        assert_eq!(refused.retry_after_secs(), 3);
        assert_eq!(limits.check_api_key_auth(ip("192.0.2.10")), Ok(()));
        // Without a known address (no socket peer) there is nothing to count by.
        assert_eq!(limits.check_api_key_auth(None), Ok(()));
        clock.advance(Duration::from_secs(3));
        assert_eq!(limits.check_api_key_auth(from), Ok(()));
    }

    #[test]
    fn the_request_rate_is_a_token_bucket_per_key() {
        let (limits, clock) = limits(LimitsConfig {
            api_key_requests: Rate::per_second(5, 10),
            ..LimitsConfig::default()
        });
        for _ in 0..10 {
            assert_eq!(limits.api_key_request("k1"), Ok(()));
        }
        let refused = limits.api_key_request("k1").unwrap_err();
        assert_eq!(refused.limit, Limit::ApiKeyRequests);
        assert_eq!(refused.retry_after, Duration::from_millis(200));
        assert_eq!(refused.retry_after_secs(), 1);
        assert_eq!(limits.api_key_request("k2"), Ok(()));
        clock.advance(Duration::from_secs(1));
        for _ in 0..5 {
            assert_eq!(limits.api_key_request("k1"), Ok(()));
        }
        assert!(limits.api_key_request("k1").is_err());
    }

    #[test]
    fn ipv6_addresses_count_by_their_64_prefix() {
        let (limits, _) = limits(LimitsConfig {
            api_key_failures_per_ip: Rate::new(2, MIN),
            ..LimitsConfig::default()
        });
        limits.api_key_auth_failed(ip("2001:db8:1:2::1"));
        limits.api_key_auth_failed(ip("2001:db8:1:2:ffff::9"));
        assert!(limits.check_api_key_auth(ip("2001:db8:1:2::77")).is_err());
        assert_eq!(limits.check_api_key_auth(ip("2001:db8:1:3::1")), Ok(()));
        // An IPv4-mapped address is the IPv4 address.
        limits.api_key_auth_failed(ip("192.0.2.1"));
        limits.api_key_auth_failed(ip("::ffff:192.0.2.1"));
        assert!(limits.check_api_key_auth(ip("192.0.2.1")).is_err());
    }

    #[test]
    fn memory_stays_bounded_and_spraying_evicts_the_least_informative_keys() {
        let limiter = RateLimiter::new(Rate::new(10, MIN), 1000).unwrap();
        let t0 = Instant::now();
        // The victim's key is deep into its limit...
        for _ in 0..10 {
            limiter.record("victim".to_owned(), t0);
        }
        // ...while an attacker sprays fresh keys, one failure each.
        for i in 0..100_000u32 {
            limiter.record(format!("spray{i}"), t0 + Duration::from_micros(i.into()));
            assert!(limiter.len() <= 1000);
        }
        assert!(limiter.check(&"victim".to_owned(), t0).is_err());
        assert!(limiter.remembers(&"spray99999".to_owned()));
        assert!(!limiter.remembers(&"spray0".to_owned()));
        // Keys whose bucket is full again go first, whatever their number.
        let later = t0 + 2 * MIN;
        for i in 0..200u32 {
            limiter.record(format!("late{i}"), later);
        }
        assert_eq!(limiter.len(), 200);
        assert!(!limiter.remembers(&"victim".to_owned()));
        // Equal keys: exactly enough are dropped, not all of them.
        let tied = RateLimiter::new(Rate::new(10, MIN), 100).unwrap();
        for i in 0..150u32 {
            tied.record(i, t0);
            assert!(tied.len() <= 100);
        }
        assert!(tied.len() >= 89);
    }
}
