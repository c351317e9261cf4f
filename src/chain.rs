//! The chain: JSON-RPC through alloy (simulation, fees, token metadata, broadcast, receipts),
//! transaction signing with server-held keys, and nonce choice (executions are serialized per
//! wallet by [`crate::wallet_lock`]). Private keys
//! exist in memory only inside [`KeyringSigner::sign`], zeroized when it returns.

use std::collections::BTreeSet;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use aggregates::transaction::summary::TokenInfo;
use aggregates::{Address, SignedTransaction, SigningRequest, TransactionSigner};
use alloy::consensus::{SignableTransaction, TxEip1559, TxEnvelope};
use alloy::eips::eip2718::Encodable2718;
use alloy::network::{ReceiptResponse, TransactionBuilder};
use alloy::primitives::{self, Bytes, TxKind, B256, U256};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::signers::SignerSync;
use alloy::sol_types::SolValue;
use alloy::transports::{RpcError, TransportErrorKind};
use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, OnceCell};
use zeroize::Zeroizing;

use crate::crypto::{MasterKey, Purpose};
use crate::metrics::{ChainMetrics, RpcMethod, RpcOutcome};
use crate::store::Db;

/// Headroom over the node's gas estimate.
const GAS_MARGIN_PERCENT: u64 = 20;
/// `symbol()` and `decimals()`, the ERC20 metadata a summary needs.
const ERC20_SYMBOL: [u8; 4] = [0x95, 0xd8, 0x9b, 0x41];
const ERC20_DECIMALS: [u8; 4] = [0x31, 0x3c, 0xe5, 0x67];

/// The gas limit to sign for a call the node estimated at `estimate`.
pub fn gas_limit_for(estimate: u64) -> u64 {
    estimate.saturating_add(estimate * GAS_MARGIN_PERCENT / 100)
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The node could not be reached or did not answer in time: retry later.
    #[error("chain RPC unavailable: {0}")]
    Unavailable(String),
    /// The node answered with an error (revert, rejected transaction, ...).
    #[error("{0}")]
    Rejected(String),
}

impl From<RpcError<TransportErrorKind>> for ChainError {
    fn from(e: RpcError<TransportErrorKind>) -> Self {
        match e.as_error_resp() {
            Some(payload) => Self::Rejected(payload.message.to_string()),
            None => Self::Unavailable(failure_text(&e)),
        }
    }
}

/// The text of a failure to reach the node, without the node's URL: the HTTP client names the
/// URL, which may carry the node's API key, and this text reaches logs and API responses (the
/// reason a prompt was not simulated).
fn failure_text(e: &RpcError<TransportErrorKind>) -> String {
    let mut text = e.to_string();
    if let RpcError::Transport(TransportErrorKind::Custom(inner)) = e {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(inner.as_ref());
        while let Some(err) = cause {
            if let Some(url) = err
                .downcast_ref::<alloy::transports::http::reqwest::Error>()
                .and_then(|r| r.url())
            {
                text = text.replace(url.as_str(), &crate::config::redact_chain_url(url));
            }
            cause = err.source();
        }
    }
    text
}

pub fn to_alloy(a: &Address) -> primitives::Address {
    primitives::Address::from(*a.as_bytes())
}

pub fn from_alloy(a: primitives::Address) -> Address {
    Address::from_bytes(a.into_array())
}

pub fn to_u256(amount: &aggregates::Amount) -> U256 {
    U256::from_be_bytes(amount.to_be_bytes())
}

/// What simulating a call as the wallet would send it showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallOutcome {
    /// The call succeeds; the node's gas estimate.
    Success { gas: u64 },
    /// The call would fail: a readable reason (the decoded `Error(string)` when the contract
    /// gave one, else the node's message) and the raw revert data (empty if none).
    Reverted { reason: String, data: Vec<u8> },
}

/// Run one simulation step: a node error answer means the call fails (`Ok(Err(..))`); no
/// answer means the chain is unavailable.
async fn simulation_step<T>(
    timeout: Duration,
    metrics: &ChainMetrics,
    method: RpcMethod,
    fut: impl std::future::Future<Output = Result<T, RpcError<TransportErrorKind>>>,
) -> Result<Result<T, CallOutcome>, ChainError> {
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(timeout, fut).await;
    let outcome = match &result {
        Ok(Ok(_)) => RpcOutcome::Ok,
        Ok(Err(e)) if e.as_error_resp().is_some() => RpcOutcome::Rejected,
        _ => RpcOutcome::Unavailable,
    };
    metrics.observe(method, outcome, started.elapsed());
    match result {
        Err(_) => Err(ChainError::Unavailable("timed out".into())),
        Ok(Ok(v)) => Ok(Ok(v)),
        Ok(Err(e)) => match e.as_error_resp() {
            Some(payload) => {
                let data = payload
                    .as_revert_data()
                    .map(|b| b.to_vec())
                    .unwrap_or_default();
                let reason =
                    crate::abi::decode_revert(&data).unwrap_or_else(|| payload.message.to_string());
                Ok(Err(CallOutcome::Reverted { reason, data }))
            }
            None => Err(ChainError::Unavailable(failure_text(&e))),
        },
    }
}

/// What a mined receipt says.
#[derive(Debug, Clone, Copy)]
pub struct Receipt {
    pub success: bool,
    pub block_number: u64,
    pub gas_used: u64,
    pub effective_gas_price: u128,
}

/// A JSON-RPC client with every call bounded by a timeout.
#[derive(Clone)]
pub struct Chain {
    provider: RootProvider,
    /// The same node through a client that keeps no idle connections: resends go through it,
    /// so a resend never lands on another pooled connection the node closed.
    fresh: RootProvider,
    timeout: Duration,
    chain_id: Arc<OnceCell<u64>>,
    metrics: Arc<ChainMetrics>,
    recent_fees: Arc<std::sync::Mutex<Option<(std::time::Instant, Fees)>>>,
    estimates: Arc<Estimates>,
}

/// Most gas estimates in one JSON-RPC batch.
const MAX_ESTIMATES_PER_BATCH: usize = 32;
/// Batches of gas estimates on their way to the node at once. One: under load the batches
/// are larger and the node (and this process) spend less per estimate, which on a busy
/// machine more than pays for the wait (measured in BENCHMARKS.md).
const ESTIMATE_BATCHES_IN_FLIGHT: usize = 1;

/// Gas estimates (every simulation) sent as JSON-RPC batches: while a batch is in flight, the
/// estimates asked for meanwhile queue up and go together in the next one. Under load the
/// node then parses, schedules and answers one HTTP request for many estimates, and this
/// process sends one; when idle, an estimate goes out at once, alone. Each estimate still gets
/// its own answer or error (a revert of one does not touch the others).
struct Estimates {
    client: alloy::rpc::client::RpcClient,
    fresh: alloy::rpc::client::RpcClient,
    queue: OnceCell<mpsc::UnboundedSender<Estimate>>,
}

struct Estimate {
    request: TransactionRequest,
    reply: oneshot::Sender<Result<primitives::U64, RpcError<TransportErrorKind>>>,
}

impl Estimates {
    /// `eth_estimateGas` of `request` at the pending block, as alloy's provider asks it.
    async fn estimate(
        &self,
        request: TransactionRequest,
        timeout: Duration,
    ) -> Result<u64, RpcError<TransportErrorKind>> {
        let queue = self
            .queue
            .get_or_init(|| async { self.start(timeout) })
            .await;
        let (reply, answer) = oneshot::channel();
        let stopped = || TransportErrorKind::custom_str("the gas estimator has stopped");
        queue
            .send(Estimate { request, reply })
            .map_err(|_| stopped())?;
        let gas = answer.await.map_err(|_| stopped())??;
        Ok(gas.to::<u64>())
    }

    /// The task that batches the queue (on the runtime of the first estimate).
    fn start(&self, timeout: Duration) -> mpsc::UnboundedSender<Estimate> {
        let (sender, mut queue) = mpsc::unbounded_channel::<Estimate>();
        let (client, fresh) = (self.client.clone(), self.fresh.clone());
        let in_flight = Arc::new(tokio::sync::Semaphore::new(ESTIMATE_BATCHES_IN_FLIGHT));
        tokio::spawn(async move {
            loop {
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    return;
                };
                let Some(first) = queue.recv().await else {
                    return;
                };
                let mut estimates = vec![first];
                while estimates.len() < MAX_ESTIMATES_PER_BATCH {
                    match queue.try_recv() {
                        Ok(next) => estimates.push(next),
                        Err(_) => break,
                    }
                }
                let (client, fresh) = (client.clone(), fresh.clone());
                tokio::spawn(async move {
                    send_estimates(&client, &fresh, estimates, timeout).await;
                    drop(permit);
                });
            }
        });
        sender
    }
}

/// Send one batch and hand each estimate its answer. (A batch that does not complete in time
/// drops its answers: each caller's own timeout reports that.)
///
/// A batch the transport could not send (no answer at all, as opposed to the node's error
/// answers) is sent once more, on a new connection (`fresh`): a pooled keep-alive connection
/// the node or a proxy closed is only found dead by writing on it, and an estimate is safe to
/// repeat.
async fn send_estimates(
    client: &alloy::rpc::client::RpcClient,
    fresh: &alloy::rpc::client::RpcClient,
    estimates: Vec<Estimate>,
    timeout: Duration,
) {
    let (requests, replies): (Vec<_>, Vec<_>) =
        estimates.into_iter().map(|e| (e.request, e.reply)).unzip();
    let answers = async {
        let mut answers = estimate_batch(client, &requests).await;
        if answers
            .iter()
            .any(|a| matches!(a, Err(e) if e.is_transport_error()))
        {
            answers = estimate_batch(fresh, &requests).await;
        }
        answers
    };
    if let Ok(answers) = tokio::time::timeout(timeout, answers).await {
        for (answer, reply) in answers.into_iter().zip(replies) {
            let _ = reply.send(answer);
        }
    }
}

/// `eth_estimateGas` of each request at the pending block, in one JSON-RPC batch: each answer,
/// in order.
async fn estimate_batch(
    client: &alloy::rpc::client::RpcClient,
    requests: &[TransactionRequest],
) -> Vec<Result<primitives::U64, RpcError<TransportErrorKind>>> {
    let mut batch = client.new_batch();
    let waiters: Vec<_> = requests
        .iter()
        .map(|request| {
            let params = (request, alloy::eips::BlockNumberOrTag::Pending);
            batch.add_call::<_, primitives::U64>("eth_estimateGas", &params)
        })
        .collect();
    // Once the batch is answered, each waiter holds its own answer.
    let sent = batch.send().await;
    let mut answers = Vec::with_capacity(waiters.len());
    for waiter in waiters {
        answers.push(match (waiter, &sent) {
            (Err(e), _) => Err(e),
            (Ok(waiter), Ok(())) => waiter.await,
            (Ok(_), Err(e)) => Err(TransportErrorKind::custom_str(&failure_text(e))),
        });
    }
    answers
}

/// `(max_fee_per_gas, max_priority_fee_per_gas)`, wei.
type Fees = (u128, u128);

/// How long a fee estimate serves approval prompts.
const RECENT_FEES: Duration = Duration::from_secs(1);

impl Chain {
    /// A client for the node at `url`; every call gives up after `timeout` (connecting,
    /// sending and waiting for the answer together), as a node that accepts connections and
    /// never answers must not hold requests.
    pub fn new(url: url::Url, timeout: Duration) -> Self {
        let is_local = alloy::transports::utils::guess_local_url(url.as_str());
        let client = |pooled: bool| {
            let mut builder = alloy::transports::http::reqwest::Client::builder()
                .connect_timeout(timeout)
                .timeout(timeout);
            if !pooled {
                builder = builder.pool_max_idle_per_host(0);
            }
            let http = builder
                .build()
                .map(|client| alloy::transports::http::Http::with_client(client, url.clone()))
                .unwrap_or_else(|e| {
                    // Only a broken TLS backend fails here; the outer timeout still bounds calls.
                    tracing::warn!(error = %e, "HTTP client with timeouts unavailable; using default");
                    alloy::transports::http::Http::new(url.clone())
                });
            alloy::rpc::client::RpcClient::new(http, is_local)
        };
        let (pooled, fresh) = (client(true), client(false));
        Self {
            provider: RootProvider::new(pooled.clone()),
            fresh: RootProvider::new(fresh.clone()),
            estimates: Arc::new(Estimates {
                client: pooled,
                fresh,
                queue: OnceCell::new(),
            }),
            timeout,
            chain_id: Arc::new(OnceCell::new()),
            metrics: Arc::default(),
            recent_fees: Arc::default(),
        }
    }

    /// Latency and errors of every call, per method (rendered by `/metrics`).
    pub fn metrics(&self) -> &ChainMetrics {
        &self.metrics
    }

    /// One RPC bounded by the timeout, counted in the metrics. A call that got no answer at
    /// all (the transport failed, typically on a pooled keep-alive connection the node or a
    /// proxy closed, found dead only by writing on it) is sent once more, on a new connection,
    /// within the same bound. Every call here is safe to repeat: reads, and a broadcast of the
    /// same signed bytes, which [`Chain::send_raw`] recognises.
    async fn timed<'a, T, F>(
        &'a self,
        method: RpcMethod,
        call: impl Fn(&'a RootProvider) -> F,
    ) -> Result<T, ChainError>
    where
        F: std::future::Future<Output = Result<T, RpcError<TransportErrorKind>>>,
    {
        let started = std::time::Instant::now();
        let attempts = async {
            match call(&self.provider).await {
                Err(e) if e.is_transport_error() => call(&self.fresh).await,
                answered => answered,
            }
        };
        let result = match tokio::time::timeout(self.timeout, attempts).await {
            Ok(r) => r.map_err(ChainError::from),
            Err(_) => Err(ChainError::Unavailable("timed out".into())),
        };
        let outcome = match &result {
            Ok(_) => RpcOutcome::Ok,
            Err(ChainError::Rejected(_)) => RpcOutcome::Rejected,
            Err(ChainError::Unavailable(_)) => RpcOutcome::Unavailable,
        };
        self.metrics.observe(method, outcome, started.elapsed());
        result
    }

    /// The chain id, asked once and cached.
    pub async fn chain_id(&self) -> Result<u64, ChainError> {
        self.chain_id
            .get_or_try_init(|| self.timed(RpcMethod::ChainId, |p| p.get_chain_id().into_future()))
            .await
            .copied()
    }

    pub async fn balance(&self, address: &Address) -> Result<U256, ChainError> {
        self.timed(RpcMethod::GetBalance, |p| {
            p.get_balance(to_alloy(address)).into_future()
        })
        .await
    }

    /// How many transactions from `address` are mined (the next nonce, if none is pending).
    pub async fn mined_nonce(&self, address: &Address) -> Result<u64, ChainError> {
        self.timed(RpcMethod::GetTransactionCount, |p| {
            p.get_transaction_count(to_alloy(address))
                .latest()
                .into_future()
        })
        .await
    }

    pub async fn pending_nonce(&self, address: &Address) -> Result<u64, ChainError> {
        self.timed(RpcMethod::GetTransactionCount, |p| {
            p.get_transaction_count(to_alloy(address))
                .pending()
                .into_future()
        })
        .await
    }

    /// [`Chain::fees`], reused for up to a second: for approval prompts, which show an
    /// estimate, not for signing.
    pub async fn recent_fees(&self) -> Result<(u128, u128), ChainError> {
        if let Some((at, fees)) = *self.recent_fees.lock().unwrap_or_else(|e| e.into_inner()) {
            if at.elapsed() < RECENT_FEES {
                return Ok(fees);
            }
        }
        let fees = self.fees().await?;
        *self.recent_fees.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), fees));
        Ok(fees)
    }

    pub async fn fees(&self) -> Result<(u128, u128), ChainError> {
        let est = self
            .timed(RpcMethod::FeeHistory, |p| p.estimate_eip1559_fees())
            .await?;
        Ok((est.max_fee_per_gas, est.max_priority_fee_per_gas))
    }

    /// Gas for the call as the wallet would send it; a revert comes back as `Rejected`.
    pub async fn estimate_gas(
        &self,
        from: &Address,
        to: &Address,
        value: U256,
        data: &[u8],
    ) -> Result<u64, ChainError> {
        let request = TransactionRequest::default()
            .with_from(to_alloy(from))
            .with_to(to_alloy(to))
            .with_value(value)
            .with_input(Bytes::copy_from_slice(data));
        self.timed(RpcMethod::EstimateGas, |p| {
            p.estimate_gas(request.clone()).into_future()
        })
        .await
    }

    /// Simulate the call exactly as the wallet would send it: its gas, or why it reverts.
    pub async fn simulate(
        &self,
        from: &Address,
        to: &Address,
        value: U256,
        data: &[u8],
    ) -> Result<CallOutcome, ChainError> {
        let request = TransactionRequest::default()
            .with_from(to_alloy(from))
            .with_to(to_alloy(to))
            .with_value(value)
            .with_input(Bytes::copy_from_slice(data));
        // One round trip: a reverting call fails its gas estimate with the same revert data
        // and reason as `eth_call` would.
        Ok(
            match simulation_step(
                self.timeout,
                &self.metrics,
                RpcMethod::EstimateGas,
                self.estimates.estimate(request, self.timeout),
            )
            .await?
            {
                Ok(gas) => CallOutcome::Success { gas },
                Err(reverted) => reverted,
            },
        )
    }

    /// A read-only call's return data.
    async fn read(&self, to: &Address, data: &[u8]) -> Result<Bytes, ChainError> {
        let request = TransactionRequest::default()
            .with_to(to_alloy(to))
            .with_input(Bytes::copy_from_slice(data));
        self.timed(RpcMethod::Call, |p| p.call(request.clone()).into_future())
            .await
    }

    /// A token's `symbol()` and `decimals()`, each `None` if the token does not answer it in a
    /// usable form (`symbol` may be a `string` or, in old tokens, a `bytes32`).
    pub async fn token_info(&self, token: &Address) -> TokenInfo {
        let (symbol, decimals) = tokio::join!(
            self.read(token, &ERC20_SYMBOL),
            self.read(token, &ERC20_DECIMALS)
        );
        let symbol = symbol.ok().and_then(|out| {
            String::abi_decode(&out).ok().or_else(|| {
                (out.len() == 32)
                    .then(|| out.iter().take_while(|b| **b != 0).copied().collect())
                    .and_then(|bytes| String::from_utf8(bytes).ok())
            })
        });
        let decimals = decimals.ok().and_then(|out| {
            let word: [u8; 32] = out.as_ref().try_into().ok()?;
            word[..31].iter().all(|b| *b == 0).then_some(word[31])
        });
        TokenInfo::new(symbol.as_deref(), decimals)
    }

    /// Broadcast a signed transaction. A refusal because the node already has these very bytes
    /// (in its pool, or mined: "already known", "already imported", or "nonce too low" once it
    /// is mined) counts as success: the same bytes may be sent twice, by the execution and by
    /// the receipt worker's rebroadcast, which is also how a crash before broadcast recovers.
    pub async fn send_raw(&self, raw: &[u8]) -> Result<(), ChainError> {
        match self
            .timed(RpcMethod::SendRawTransaction, |p| {
                p.send_raw_transaction(raw)
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(ChainError::Rejected(msg)) => {
                let tx_hash = format!("{:#x}", primitives::keccak256(raw));
                if self.is_known(&tx_hash).await? {
                    Ok(())
                } else {
                    Err(ChainError::Rejected(msg))
                }
            }
            Err(e) => Err(e),
        }
    }

    pub async fn receipt(&self, tx_hash: &str) -> Result<Option<Receipt>, ChainError> {
        let hash: B256 = tx_hash
            .parse()
            .map_err(|_| ChainError::Rejected(format!("bad transaction hash {tx_hash}")))?;
        let receipt = self
            .timed(RpcMethod::GetTransactionReceipt, |p| {
                p.get_transaction_receipt(hash).into_future()
            })
            .await?;
        Ok(receipt.map(|r| Receipt {
            success: r.status(),
            block_number: r.block_number().unwrap_or_default(),
            gas_used: r.gas_used(),
            effective_gas_price: r.effective_gas_price(),
        }))
    }

    pub async fn is_known(&self, tx_hash: &str) -> Result<bool, ChainError> {
        let hash: B256 = tx_hash
            .parse()
            .map_err(|_| ChainError::Rejected(format!("bad transaction hash {tx_hash}")))?;
        let tx = self
            .timed(RpcMethod::GetTransactionByHash, |p| {
                p.get_transaction_by_hash(hash).into_future()
            })
            .await?;
        Ok(tx.is_some())
    }
}

/// Signs with wallet keys sealed in the database. Implements the domain's signer trait, so the
/// `Transaction` aggregate decides *what* is signed and this only decides *how*.
pub struct KeyringSigner {
    db: Db,
    master_key: Arc<MasterKey>,
}

impl KeyringSigner {
    pub fn new(db: Db, master_key: Arc<MasterKey>) -> Self {
        Self { db, master_key }
    }

    /// Generate a wallet key, seal it bound to its address and owner, and store it.
    pub async fn create_key(
        &self,
        owner_user_id: &str,
    ) -> Result<Address, crate::store::StoreError> {
        let signer = PrivateKeySigner::random();
        let address = from_alloy(signer.address());
        let secret = Zeroizing::new(signer.to_bytes().0);
        drop(signer);
        let sealed = self.master_key.seal(
            Purpose::WalletKey,
            &[&address.to_checksum(), owner_user_id],
            secret.as_slice(),
        );
        self.db
            .insert_wallet_key(&address.to_checksum(), owner_user_id, &sealed)
            .await?;
        Ok(address)
    }
}

#[async_trait]
impl TransactionSigner for KeyringSigner {
    async fn sign(&self, request: SigningRequest) -> Result<SignedTransaction, String> {
        let wallet = request.wallet_address.to_checksum();
        let (owner, sealed) = self
            .db
            .wallet_key(&wallet)
            .await
            .map_err(|e| e.service_message())?
            .ok_or_else(|| "no key for this wallet".to_owned())?;
        if owner != request.owner_user_id {
            return Err("wallet key belongs to another user".to_owned());
        }
        let secret = self
            .master_key
            .open(Purpose::WalletKey, &[&wallet, &owner], &sealed)
            .map_err(|e| e.to_string())?;
        let signer = PrivateKeySigner::from_slice(&secret).map_err(|_| "corrupt wallet key")?;
        drop(secret);
        if from_alloy(signer.address()) != request.wallet_address {
            return Err("wallet key does not match its address".to_owned());
        }
        let payload = &request.payload;
        let tx = TxEip1559 {
            chain_id: payload.chain_id,
            nonce: request.nonce,
            gas_limit: request.fees.gas_limit,
            max_fee_per_gas: request.fees.max_fee_per_gas,
            max_priority_fee_per_gas: request.fees.max_priority_fee_per_gas,
            to: TxKind::Call(to_alloy(&payload.to)),
            value: to_u256(&payload.value),
            access_list: Default::default(),
            input: Bytes::copy_from_slice(payload.data.as_slice()),
        };
        let signature = signer
            .sign_hash_sync(&tx.signature_hash())
            .map_err(|e| format!("signing failed: {e}"))?;
        drop(signer);
        let envelope = TxEnvelope::from(tx.into_signed(signature));
        Ok(SignedTransaction {
            tx_hash: format!("{:#x}", envelope.tx_hash()),
            raw: aggregates::HexBytes::new(envelope.encoded_2718()),
        })
    }
}

/// The nonce for a wallet's next transaction: the lowest at or above `mined` (the chain's
/// count of mined transactions from the wallet) that none of its live signed transactions
/// (`held`: nonces of transactions recorded as executed, neither confirmed nor failed) holds.
///
/// This heals gaps. When a broadcast is rejected, that transaction is recorded as failed and
/// its nonce is free again; later transactions already signed with higher nonces stay live
/// (queued in the node's pool behind the gap, or rebroadcast by the receipt worker) and the
/// next execution takes the freed nonce, after which they can all be mined. The node's own
/// "pending" count cannot be used: it counts transactions queued behind a gap, so it would
/// hand out nonces past the gap forever. Deliberately never done: re-signing a stuck
/// transaction under another nonce (both versions could end up mined) or signing a filler
/// transaction nobody authorized.
pub fn next_nonce(mined: u64, held: impl IntoIterator<Item = u64>) -> u64 {
    let held: BTreeSet<u64> = held.into_iter().filter(|n| *n >= mined).collect();
    let mut nonce = mined;
    while held.contains(&nonce) {
        nonce += 1;
    }
    nonce
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_nonce_follows_the_chain_when_nothing_is_in_flight() {
        assert_eq!(next_nonce(0, []), 0);
        assert_eq!(next_nonce(7, [3, 5, 6]), 7, "mined ones are ignored");
    }

    #[test]
    fn next_nonce_skips_signed_transactions_not_yet_mined() {
        // Signed and recorded but unknown to the node (crash before broadcast): not reused.
        assert_eq!(next_nonce(4, [4, 5]), 6);
    }

    #[test]
    fn next_nonce_fills_the_gap_a_failed_broadcast_left() {
        // Nonce 4 was rejected (recorded as failed, so not held); 5 and 6 wait behind it.
        assert_eq!(next_nonce(4, [5, 6]), 4);
        // Once 4 is taken again, the next one goes past the queued ones.
        assert_eq!(next_nonce(4, [4, 5, 6]), 7);
    }

    #[test]
    fn gas_limit_has_headroom() {
        assert_eq!(gas_limit_for(21_000), 25_200);
    }

    /// A hosted node's URL carries its API key; a node that cannot be reached must not put it
    /// into the error, which reaches logs and API responses.
    #[tokio::test]
    async fn failures_to_reach_the_node_do_not_name_its_url() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let url = format!("http://127.0.0.1:{port}/v3/k3y-in-the-path?apikey=k3y-in-the-query");
        let chain = Chain::new(url.parse().unwrap(), Duration::from_secs(5));
        let address: Address = "0x70997970C51812dc3A010C7d01b50e0d17dc79C8"
            .parse()
            .unwrap();
        let failures = [
            chain.balance(&address).await.map(|_| ()),
            chain
                .simulate(&address, &address, U256::from(1), &[])
                .await
                .map(|_| ()),
        ];
        for failure in failures {
            let Err(ChainError::Unavailable(text)) = failure else {
                panic!("expected the node to be unreachable: {failure:?}");
            };
            assert!(!text.contains("k3y"), "{text}");
            assert!(text.contains(&format!("127.0.0.1:{port}/***")), "{text}");
        }
    }
}
