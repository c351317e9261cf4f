//! The chain: JSON-RPC through alloy, transaction signing with server-held keys, and the
//! per-wallet nonce manager. Private keys exist in memory only inside [`KeyringSigner::sign`],
//! zeroized when it returns.

use std::collections::HashMap;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use aggregates::{Address, SignedTransaction, SigningRequest, TransactionSigner};
use alloy::consensus::{SignableTransaction, TxEip1559, TxEnvelope};
use alloy::eips::eip2718::Encodable2718;
use alloy::network::{ReceiptResponse, TransactionBuilder};
use alloy::primitives::{self, Bytes, TxKind, B256, U256};
use alloy::providers::{Provider, RootProvider};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy::signers::SignerSync;
use alloy::transports::{RpcError, TransportErrorKind};
use async_trait::async_trait;
use tokio::sync::{Mutex, OnceCell};
use zeroize::Zeroizing;

use crate::crypto::{MasterKey, Purpose};
use crate::store::Db;

const RPC_TIMEOUT: Duration = Duration::from_secs(10);

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
            None => Self::Unavailable(e.to_string()),
        }
    }
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
    chain_id: Arc<OnceCell<u64>>,
}

async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, RpcError<TransportErrorKind>>>,
) -> Result<T, ChainError> {
    match tokio::time::timeout(RPC_TIMEOUT, fut).await {
        Ok(r) => r.map_err(ChainError::from),
        Err(_) => Err(ChainError::Unavailable("timed out".into())),
    }
}

impl Chain {
    pub fn new(url: url::Url) -> Self {
        Self {
            provider: RootProvider::new_http(url),
            chain_id: Arc::new(OnceCell::new()),
        }
    }

    /// The chain id, asked once and cached.
    pub async fn chain_id(&self) -> Result<u64, ChainError> {
        self.chain_id
            .get_or_try_init(|| timed(self.provider.get_chain_id().into_future()))
            .await
            .copied()
    }

    pub async fn balance(&self, address: &Address) -> Result<U256, ChainError> {
        timed(self.provider.get_balance(to_alloy(address)).into_future()).await
    }

    pub async fn pending_nonce(&self, address: &Address) -> Result<u64, ChainError> {
        timed(
            self.provider
                .get_transaction_count(to_alloy(address))
                .pending()
                .into_future(),
        )
        .await
    }

    pub async fn fees(&self) -> Result<(u128, u128), ChainError> {
        let est = timed(self.provider.estimate_eip1559_fees()).await?;
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
        timed(self.provider.estimate_gas(request).into_future()).await
    }

    /// Broadcast a signed transaction. "Already known" counts as success: rebroadcasting the
    /// same bytes after a crash is how execution recovers.
    pub async fn send_raw(&self, raw: &[u8]) -> Result<(), ChainError> {
        match timed(self.provider.send_raw_transaction(raw)).await {
            Ok(_) => Ok(()),
            Err(ChainError::Rejected(msg)) if msg.to_lowercase().contains("already known") => {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    pub async fn receipt(&self, tx_hash: &str) -> Result<Option<Receipt>, ChainError> {
        let hash: B256 = tx_hash
            .parse()
            .map_err(|_| ChainError::Rejected(format!("bad transaction hash {tx_hash}")))?;
        let receipt = timed(self.provider.get_transaction_receipt(hash).into_future()).await?;
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
        let tx = timed(self.provider.get_transaction_by_hash(hash).into_future()).await?;
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
            .map_err(|e| format!("key store unavailable: {e}"))?
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

/// Hands out nonces per wallet. Executions from one wallet are serialized through the wallet's
/// lock (held from nonce choice until the broadcast outcome is known), so concurrent executions
/// never collide; the next nonce is the larger of the chain's pending count and our own.
#[derive(Default)]
pub struct NonceManager {
    wallets: std::sync::Mutex<HashMap<Address, Arc<Mutex<Option<u64>>>>>,
}

impl NonceManager {
    pub fn lock_for(&self, wallet: &Address) -> Arc<Mutex<Option<u64>>> {
        self.wallets
            .lock()
            .expect("nonce map lock poisoned")
            .entry(*wallet)
            .or_default()
            .clone()
    }
}
