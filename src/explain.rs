//! What the human sees before countersigning: the call simulated on the chain as the wallet
//! would send it (revert reason, gas estimate, maximum fee) and summarized in one line, with
//! token symbols and decimals read from the chain and arguments decoded with the contract's ABI.
//!
//! The chain reads live here; the wording lives in the domain
//! (`aggregates::transaction::summary`). Explaining never fails: an unreachable node makes the
//! simulation "unavailable" and amounts fall back to base units.

use std::time::Duration;

use aggregates::transaction::summary::{self, Erc20Call, TokenInfo};
use aggregates::{
    Address, Amount, HexBytes, PreparedSimulation, SimulationOutcome, TransactionKind, TxPayload,
};
use alloy::json_abi::Function;
use alloy::primitives::U256;

use crate::abi::{describe_call, ContractAbi};
use crate::chain::{gas_limit_for, to_u256, CallOutcome, Chain, ChainError};

/// The most the chain reads behind one explanation may take before it gives up on them (the
/// prompt goes out regardless).
const EXPLAIN_BUDGET: Duration = Duration::from_secs(5);

/// A call to prepare, before it is bound to a wallet: what the request asked for, the exact
/// `to`/`value`/`data` to sign, and the ABI it was encoded with (if any), to explain it.
#[derive(Debug, Clone)]
pub struct Call {
    pub kind: TransactionKind,
    /// For ERC20 transfers, the token recipient; otherwise the same as `call_to`.
    pub to: Address,
    pub call_to: Address,
    pub value: Amount,
    pub data: HexBytes,
    pub token_address: Option<Address>,
    pub amount: Option<Amount>,
    pub abi: Option<(ContractAbi, Function)>,
}

impl Call {
    pub fn native(to: Address, value: Amount) -> Self {
        Self {
            kind: TransactionKind::Native,
            to,
            call_to: to,
            value,
            data: HexBytes::default(),
            token_address: None,
            amount: None,
            abi: None,
        }
    }

    pub fn erc20_transfer(token: Address, to: Address, amount: Amount) -> Self {
        let data = Erc20Call::Transfer {
            to,
            amount: amount.clone(),
        }
        .encode();
        Self {
            kind: TransactionKind::Erc20,
            to,
            call_to: token,
            value: Amount::zero(),
            data,
            token_address: Some(token),
            amount: Some(amount),
            abi: None,
        }
    }

    pub fn contract(
        contract: Address,
        value: Amount,
        data: HexBytes,
        abi: Option<(ContractAbi, Function)>,
    ) -> Self {
        Self {
            kind: TransactionKind::ContractCall,
            to: contract,
            call_to: contract,
            value,
            data,
            token_address: None,
            amount: None,
            abi,
        }
    }

    /// The exact payload to sign from `wallet` on `chain_id`.
    pub fn payload(&self, chain_id: u64, wallet: Address) -> TxPayload {
        TxPayload {
            chain_id,
            from: wallet,
            to: self.call_to,
            value: self.value.clone(),
            data: self.data.clone(),
        }
    }
}

/// The summary and the simulation facts recorded with the prompt.
#[derive(Debug, Clone)]
pub struct Explained {
    pub summary: String,
    pub simulation: PreparedSimulation,
}

/// Simulate `call` as `payload` and summarize it.
pub async fn explain(chain: &Chain, call: &Call, payload: &TxPayload) -> Explained {
    let erc20 = Erc20Call::decode(payload.data.as_slice());
    let reads = async {
        let token = async {
            match &erc20 {
                Some(_) => Some(chain.token_info(&payload.to).await),
                None => None,
            }
        };
        tokio::join!(
            chain.simulate(
                &payload.from,
                &payload.to,
                to_u256(&payload.value),
                payload.data.as_slice()
            ),
            chain.recent_fees(),
            token
        )
    };
    let (simulated, fees, token) = match tokio::time::timeout(EXPLAIN_BUDGET, reads).await {
        Ok(results) => results,
        Err(_) => {
            chain.metrics().explain_budget_exceeded();
            (
                Err(ChainError::Unavailable("timed out".into())),
                Err(ChainError::Unavailable("timed out".into())),
                None,
            )
        }
    };
    let max_fee_per_gas = fees.ok().map(|(max_fee, _)| max_fee);
    let (outcome, gas_estimate) = match simulated {
        Ok(CallOutcome::Success { gas }) => (SimulationOutcome::Success, Some(gas)),
        Ok(CallOutcome::Reverted { reason, data }) => {
            let reason = call
                .abi
                .as_ref()
                .and_then(|(abi, _)| abi.describe_error(&data))
                .unwrap_or(reason);
            (SimulationOutcome::Reverted { reason }, None)
        }
        Err(e) => (
            SimulationOutcome::Unavailable {
                reason: e.to_string(),
            },
            None,
        ),
    };
    let max_fee_wei = gas_estimate.zip(max_fee_per_gas).and_then(|(gas, fee)| {
        let total = U256::from(gas_limit_for(gas)).saturating_mul(U256::from(fee));
        total.to_string().parse().ok()
    });
    let summary = summarize(call, payload, erc20.as_ref(), token.unwrap_or_default());
    Explained {
        summary: summary::with_simulation(summary, &outcome),
        simulation: PreparedSimulation {
            outcome,
            gas_estimate,
            max_fee_per_gas,
            max_fee_wei,
        },
    }
}

fn summarize(
    call: &Call,
    payload: &TxPayload,
    erc20: Option<&Erc20Call>,
    token: TokenInfo,
) -> String {
    if let Some(erc20) = erc20 {
        return summary::erc20_call_with_value(&payload.to, &token, erc20, &payload.value);
    }
    if payload.data.is_empty() {
        return summary::native_transfer(&payload.to, &payload.value);
    }
    let decoded = call
        .abi
        .as_ref()
        .and_then(|(_, function)| describe_call(function, payload.data.as_slice()));
    match decoded {
        Some(decoded) => summary::decoded_call(&payload.to, &payload.value, &decoded),
        None => summary::raw_call(&payload.to, &payload.value, &payload.data),
    }
}
