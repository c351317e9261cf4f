//! Agents' `transaction_status` polls served from memory: the API key's view (found by its
//! credential hash) and the transaction's view, both as of the push hub's cursor.
//!
//! Exactness comes from the hub, which sees every committed event in commit order (this
//! node's commits from the writer, others' by `NOTIFY` or its fallback tick). Each event marks
//! its aggregate's document as changed at its position; a document read from the database
//! after the hub reached position `r` is stored only if nothing marked it after `r`. Any event
//! the read may have missed is above `r` (positions are commit-ordered), so its mark either
//! comes first and the fill is refused, or comes later and evicts the copy.
//!
//! So on the node that commits, a read after the response always sees the commit: the writer
//! hands its events to the hub before it answers. On another node a copy is stale for as long
//! as that node's hub lags, milliseconds with `NOTIFY`. The cache answers only while the hub
//! has confirmed within [`MAX_LAG`] that it is current, so a node cut off from the database
//! stops using it.
//!
//! Agents' prepares take their API key and wallet from here too ([`ReadCache::api_key`],
//! [`ReadCache::wallet`]), but never on trust: a copy held at cursor `c` is the document as of
//! `c`, and the command commits only if the document is still unchanged after `c` when it does
//! (`writer::Unchanged`, checked under the commit's lock). Every other endpoint still checks
//! the key in the database.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use projections::{ApiKeyView, TransactionView, WalletView};

/// How long the hub may go without confirming it has read up to the checkpoint before the
/// cache stops answering (the hub's fallback tick is 1 s).
pub const MAX_LAG: Duration = Duration::from_secs(2);
/// Copies kept per kind (a transaction's is ~2.5 KB, decoded and encoded); past this all go
/// at once.
const MAX_COPIES: usize = 10_000;
/// Marks of recent changes kept per kind (an id and a position each); likewise.
const MAX_MARKS: usize = 20_000;

/// A transaction's view with its JSON encoding, which is the response body.
pub struct CachedTransaction {
    pub view: TransactionView,
    pub body: Bytes,
}

impl CachedTransaction {
    pub fn new(view: TransactionView) -> Result<Self, serde_json::Error> {
        let body = Bytes::from(serde_json::to_vec(&view)?);
        Ok(Self { view, body })
    }
}

struct Documents<T> {
    /// Copies, each as read by a read that no event marked since it began.
    held: HashMap<String, Arc<T>>,
    /// The latest mark of each document changed lately, against which reads still in flight
    /// are checked.
    marks: HashMap<String, i64>,
}

impl<T> Default for Documents<T> {
    fn default() -> Self {
        Self {
            held: HashMap::new(),
            marks: HashMap::new(),
        }
    }
}

impl<T> Documents<T> {
    fn get(&self, id: &str) -> Option<Arc<T>> {
        self.held.get(id).cloned()
    }

    fn changed(&mut self, id: &str, position: i64) {
        self.held.remove(id);
        match self.marks.get_mut(id) {
            Some(mark) => *mark = (*mark).max(position),
            None => {
                self.marks.insert(id.to_owned(), position);
            }
        }
    }

    fn fill(&mut self, id: &str, value: Arc<T>, read_at: i64) {
        if self.marks.get(id).is_none_or(|mark| *mark <= read_at) {
            self.held.insert(id.to_owned(), value);
        }
    }
}

#[derive(Default)]
struct Inner {
    /// Every event up to here has been marked.
    cursor: i64,
    /// When the hub last confirmed that `cursor` was the checkpoint.
    confirmed: Option<Instant>,
    /// Bumped when everything is dropped: reads begun before are refused, as the marks they
    /// would be checked against are gone.
    epoch: u64,
    /// Credential hash → API key id. Never changes once issued.
    key_ids: HashMap<String, String>,
    api_keys: Documents<ApiKeyView>,
    transactions: Documents<CachedTransaction>,
    /// By checksummed address.
    wallets: Documents<WalletView>,
}

/// When a database read began, for [`ReadCache::fill`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadTicket {
    position: i64,
    epoch: u64,
}

#[derive(Default)]
pub struct ReadCache {
    inner: Mutex<Inner>,
    hits: AtomicU64,
    misses: AtomicU64,
    /// Commands' lookups of keys and wallets.
    command_hits: AtomicU64,
    command_misses: AtomicU64,
}

impl ReadCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What a database read started now will be filed under, or `None` when the cache is not
    /// to be used (the hub has not confirmed it is current within [`MAX_LAG`]).
    pub fn begin_read(&self) -> Option<ReadTicket> {
        let inner = self.lock();
        inner.is_current().then_some(ReadTicket {
            position: inner.cursor,
            epoch: inner.epoch,
        })
    }

    /// The key with credential hash `key_hash` and transaction `id`, if both are held and the
    /// cache is current.
    pub fn status(
        &self,
        key_hash: &str,
        id: &str,
    ) -> Option<(Arc<ApiKeyView>, Arc<CachedTransaction>)> {
        let found = {
            let inner = self.lock();
            inner.is_current().then(|| {
                let key = inner.api_keys.get(inner.key_ids.get(key_hash)?)?;
                Some((key, inner.transactions.get(id)?))
            })
        }
        .flatten();
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// The key with credential hash `key_hash`, for a command, and the position it is known
    /// current at (the cursor), if held and the cache is current.
    pub fn api_key(&self, key_hash: &str) -> Option<(Arc<ApiKeyView>, i64)> {
        self.command_lookup(|inner| inner.api_keys.get(inner.key_ids.get(key_hash)?))
    }

    /// The wallet at checksummed address `id`, likewise.
    pub fn wallet(&self, id: &str) -> Option<(Arc<WalletView>, i64)> {
        self.command_lookup(|inner| inner.wallets.get(id))
    }

    fn command_lookup<T>(
        &self,
        get: impl FnOnce(&Inner) -> Option<Arc<T>>,
    ) -> Option<(Arc<T>, i64)> {
        let found = {
            let inner = self.lock();
            inner
                .is_current()
                .then(|| get(&inner).map(|doc| (doc, inner.cursor)))
                .flatten()
        };
        let counter = if found.is_some() {
            &self.command_hits
        } else {
            &self.command_misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// `(hits, misses, documents held)` of status reads, for `/metrics`.
    pub fn stats(&self) -> (u64, u64, usize) {
        let held = {
            let inner = self.lock();
            inner.api_keys.held.len() + inner.transactions.held.len() + inner.wallets.held.len()
        };
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
            held,
        )
    }

    /// `(hits, misses)` of commands' key and wallet lookups, for `/metrics`.
    pub fn command_stats(&self) -> (u64, u64) {
        (
            self.command_hits.load(Ordering::Relaxed),
            self.command_misses.load(Ordering::Relaxed),
        )
    }

    /// Keep a wallet a database read begun with `ticket` returned, unless it changed since.
    pub fn fill_wallet(&self, ticket: ReadTicket, wallet: Arc<WalletView>) {
        let mut inner = self.lock();
        inner.make_room();
        if ticket.epoch == inner.epoch {
            let id = wallet.wallet_address.to_checksum();
            inner.wallets.fill(&id, wallet, ticket.position);
        }
    }

    /// Keep what a database read begun with `ticket` ([`Self::begin_read`]) returned, unless
    /// a document changed since.
    pub fn fill(
        &self,
        ticket: ReadTicket,
        key_hash: &str,
        key: Arc<ApiKeyView>,
        transaction: Option<Arc<CachedTransaction>>,
    ) {
        let mut inner = self.lock();
        inner.make_room();
        if ticket.epoch != inner.epoch {
            return;
        }
        let read_at = ticket.position;
        if !inner.key_ids.contains_key(key_hash) {
            inner
                .key_ids
                .insert(key_hash.to_owned(), key.api_key_id.clone());
        }
        let key_id = key.api_key_id.clone();
        inner.api_keys.fill(&key_id, key, read_at);
        if let Some(transaction) = transaction {
            let id = transaction.view.transaction_id.clone();
            inner.transactions.fill(&id, transaction, read_at);
        }
    }

    /// Each event `(aggregate_type, aggregate_id, position)` changed its aggregate's document.
    /// Events may be marked more than once and ahead of the cursor (the writer's own commits,
    /// before it answers).
    pub fn changed<'a>(&self, events: impl IntoIterator<Item = (&'a str, &'a str, i64)>) {
        self.lock().mark_all(events);
    }

    /// Mark a run of events, then move the cursor to `upto` (all events up to it are marked)
    /// and, with `confirmed`, record when the hub knew that to be the checkpoint.
    pub fn advance<'a>(
        &self,
        events: impl IntoIterator<Item = (&'a str, &'a str, i64)>,
        upto: i64,
        confirmed: Option<Instant>,
    ) {
        let mut inner = self.lock();
        inner.mark_all(events);
        inner.cursor = inner.cursor.max(upto);
        if let Some(at) = confirmed {
            inner.confirmed = Some(inner.confirmed.map_or(at, |c| c.max(at)));
        }
    }
}

impl Inner {
    fn is_current(&self) -> bool {
        self.confirmed.is_some_and(|at| at.elapsed() < MAX_LAG)
    }

    fn mark_all<'a>(&mut self, events: impl IntoIterator<Item = (&'a str, &'a str, i64)>) {
        for (aggregate_type, aggregate_id, position) in events {
            match aggregate_type {
                "ApiKey" => self.api_keys.changed(aggregate_id, position),
                "Transaction" => self.transactions.changed(aggregate_id, position),
                "Wallet" => self.wallets.changed(aggregate_id, position),
                _ => continue,
            }
            self.make_room();
        }
    }

    /// Past [`MAX_COPIES`] copies or [`MAX_MARKS`] marks of a kind, forget them. Copies can go
    /// at any time; without the marks, reads begun before cannot be checked and are refused.
    fn make_room(&mut self) {
        if self.api_keys.held.len() > MAX_COPIES
            || self.transactions.held.len() > MAX_COPIES
            || self.wallets.held.len() > MAX_COPIES
        {
            self.api_keys.held.clear();
            self.transactions.held.clear();
            self.wallets.held.clear();
        }
        if self.key_ids.len() > MAX_COPIES {
            self.key_ids.clear();
        }
        if self.api_keys.marks.len() > MAX_MARKS
            || self.transactions.marks.len() > MAX_MARKS
            || self.wallets.marks.len() > MAX_MARKS
        {
            self.api_keys.marks.clear();
            self.transactions.marks.clear();
            self.wallets.marks.clear();
            self.epoch += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, revoked: bool) -> Arc<ApiKeyView> {
        Arc::new(ApiKeyView {
            api_key_id: id.into(),
            owner_user_id: "owner".into(),
            name: "agent".into(),
            wallet_addresses: None,
            created_at: "2026-12-03T00:00:00Z".into(),
            revoked_at: revoked.then(|| "2026-12-03T00:00:01Z".into()),
        })
    }

    /// A cache the hub has confirmed at `cursor`.
    fn current_at(cursor: i64) -> ReadCache {
        let cache = ReadCache::default();
        cache.advance([], cursor, Some(Instant::now()));
        cache
    }

    fn held(cache: &ReadCache, id: &str) -> Option<Arc<ApiKeyView>> {
        cache.lock().api_keys.get(id)
    }

    #[test]
    fn a_read_is_kept_while_nothing_changes() {
        let cache = current_at(10);
        let ticket = cache.begin_read().unwrap();
        cache.fill(ticket, "hash", key("k1", false), None);
        assert!(held(&cache, "k1").is_some());
        assert_eq!(cache.lock().key_ids.get("hash").unwrap(), "k1");
    }

    #[test]
    fn a_change_marked_after_the_read_began_refuses_the_fill() {
        let cache = current_at(10);
        let ticket = cache.begin_read().unwrap();
        // The revocation commits at 11 while the read is in flight; the read saw the old view.
        cache.changed([("ApiKey", "k1", 11)]);
        cache.fill(ticket, "hash", key("k1", false), None);
        assert!(held(&cache, "k1").is_none());
        // A read begun after the hub passed the mark is kept.
        cache.advance([], 11, Some(Instant::now()));
        cache.fill(cache.begin_read().unwrap(), "hash", key("k1", true), None);
        assert!(held(&cache, "k1").unwrap().is_revoked());
    }

    #[test]
    fn a_change_after_the_fill_evicts_the_copy_for_good() {
        let cache = current_at(10);
        let before = cache.begin_read().unwrap();
        cache.fill(before, "hash", key("k1", false), None);
        cache.advance([("ApiKey", "k1", 12), ("Wallet", "w", 13)], 13, None);
        assert!(held(&cache, "k1").is_none());
        // A slow read from before that change cannot put the old copy back.
        cache.fill(before, "hash", key("k1", false), None);
        assert!(held(&cache, "k1").is_none());
    }

    #[test]
    fn nothing_is_served_unless_the_hub_confirmed_recently() {
        let cache = ReadCache::default();
        assert_eq!(cache.begin_read(), None, "never confirmed");
        let long_ago = Instant::now().checked_sub(MAX_LAG + Duration::from_millis(10));
        cache.advance([], 5, long_ago);
        assert_eq!(cache.begin_read(), None, "confirmed too long ago");
        cache.fill(
            ReadTicket {
                position: 5,
                epoch: 0,
            },
            "hash",
            key("k1", false),
            None,
        );
        assert!(cache.status("hash", "t").is_none());
        cache.advance([], 5, Some(Instant::now()));
        assert!(cache.begin_read().is_some());
    }

    #[test]
    fn when_marks_overflow_they_are_dropped_and_reads_begun_before_are_refused() {
        let cache = current_at(100);
        cache.fill(cache.begin_read().unwrap(), "hash", key("k1", false), None);
        let before = cache.begin_read().unwrap();
        for i in 0..=MAX_MARKS {
            cache.changed([("Transaction", format!("t{i}").as_str(), 101)]);
        }
        assert!(cache.lock().transactions.marks.is_empty());
        // The copies stay; a read from before the drop cannot be checked any more.
        assert!(held(&cache, "k1").is_some());
        cache.fill(before, "hash2", key("k2", false), None);
        assert!(held(&cache, "k2").is_none());
        // No new event is needed for reads begun after the drop.
        cache.fill(cache.begin_read().unwrap(), "hash2", key("k2", false), None);
        assert!(held(&cache, "k2").is_some());
    }

    #[test]
    fn when_copies_overflow_they_are_dropped_and_reads_go_on() {
        let cache = current_at(100);
        // The fill after the one that went past the capacity finds it full.
        for i in 0..MAX_COPIES + 2 {
            let ticket = cache.begin_read().unwrap();
            cache.fill(
                ticket,
                &format!("hash{i}"),
                key(&format!("k{i}"), false),
                None,
            );
        }
        assert_eq!(cache.lock().api_keys.held.len(), 1);
        let ticket = cache.begin_read().unwrap();
        cache.fill(ticket, "hash", key("k", false), None);
        assert!(held(&cache, "k").is_some());
    }
}
