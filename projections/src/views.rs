//! The view documents and how each event changes them.

use aggregates::{
    Address, Amount, ApiKeyEvent, Initiator, SimulationOutcome, TransactionEvent, TransactionKind,
    TxPayload, UserEvent, WalletEvent,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{EventHead, ProjectionError, StoredEvent, ViewDoc, ViewKind};

/// The status of a transaction waiting for its owner: the only one with a deadline.
const PENDING: &str = "pending_authorization";

/// One kind of view: created by its aggregate's first event, updated by the rest.
pub(crate) trait View: Serialize + DeserializeOwned {
    const KIND: ViewKind;
    type Event: DeserializeOwned;

    /// Build the view from the aggregate's first event (`None` if that event cannot start one);
    /// `position` is the event's.
    fn create(event: Self::Event, position: i64) -> Option<Self>;
    fn update(&mut self, event: Self::Event, position: i64);
    /// The stored form: `payload` (the encoded view) with the columns indexed for lookups.
    fn doc<P>(&self, id: String, payload: P) -> ViewDoc<P>;
}

pub(crate) fn fold<V: View>(
    current: Option<Value>,
    stored: &StoredEvent,
) -> Result<ViewDoc, ProjectionError> {
    let head = EventHead::of(stored);
    let current = current
        .map(|doc| V::deserialize(&doc).map_err(|e| decode_error(head, e)))
        .transpose()?;
    let view = fold_typed::<V>(current, head, &stored.payload)?;
    let payload = serde_json::to_value(&view).map_err(|e| decode_error(head, e))?;
    Ok(view.doc(stored.aggregate_id.clone(), payload))
}

pub(crate) fn decode_error(head: EventHead<'_>, source: serde_json::Error) -> ProjectionError {
    ProjectionError::Decode {
        position: head.position,
        event_type: head.event_type.to_owned(),
        source,
    }
}

/// An event's stored JSON, in either of the forms the server has it in.
pub(crate) trait EventJson {
    fn decode<E: DeserializeOwned>(self) -> Result<E, serde_json::Error>;
}

impl EventJson for &Value {
    fn decode<E: DeserializeOwned>(self) -> Result<E, serde_json::Error> {
        E::deserialize(self)
    }
}

/// The text as stored: decoded straight into the typed event, no intermediate `Value`.
impl EventJson for &str {
    fn decode<E: DeserializeOwned>(self) -> Result<E, serde_json::Error> {
        serde_json::from_str(self)
    }
}

/// Fold one event into a decoded view (no JSON round trip of the document).
pub(crate) fn fold_typed<V: View>(
    current: Option<V>,
    head: EventHead<'_>,
    payload: impl EventJson,
) -> Result<V, ProjectionError> {
    let event = payload.decode().map_err(|e| decode_error(head, e))?;
    fold_decoded(current, head, event)
}

/// [`fold_typed`] into a view held elsewhere: decoded first, so an error changes nothing.
pub(crate) fn update_typed<V: View>(
    view: &mut V,
    head: EventHead<'_>,
    payload: impl EventJson,
) -> Result<(), ProjectionError> {
    let event = payload.decode().map_err(|e| decode_error(head, e))?;
    view.update(event, head.position);
    Ok(())
}

fn fold_decoded<V: View>(
    current: Option<V>,
    head: EventHead<'_>,
    event: V::Event,
) -> Result<V, ProjectionError> {
    match current {
        Some(mut view) => {
            view.update(event, head.position);
            Ok(view)
        }
        None => V::create(event, head.position).ok_or_else(|| ProjectionError::MissingView {
            position: head.position,
            event_type: head.event_type.to_owned(),
        }),
    }
}

/// What `/api/transaction_status` returns.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransactionView {
    pub transaction_id: String,
    pub status: String,
    pub wallet_address: Address,
    pub owner_user_id: String,
    pub initiator: Initiator,
    pub kind: TransactionKind,
    pub chain_id: u64,
    pub to: Address,
    pub value: Amount,
    pub token_address: Option<Address>,
    pub amount: Option<Amount>,
    pub data: String,
    pub memo: Option<String>,
    pub summary: String,
    /// Exactly what is signed on execution (for ERC20, `to` above is the token recipient).
    pub payload: TxPayload,
    pub payload_digest: String,
    /// What simulating the call showed at prepare time (`None`: prepared before simulation
    /// existed). The fields below default so that view documents stored earlier still load.
    #[serde(default)]
    pub simulation: Option<SimulationOutcome>,
    #[serde(default)]
    pub gas_estimate: Option<u64>,
    /// Wei, as a decimal string.
    #[serde(default)]
    pub max_fee_per_gas: Option<String>,
    /// The most the network fee could cost (gas limit × max fee per gas), wei.
    #[serde(default)]
    pub max_fee_wei: Option<Amount>,
    pub authorized_by: Option<String>,
    pub rejection_reason: Option<String>,
    pub tx_hash: Option<String>,
    pub nonce: Option<u64>,
    pub block_number: Option<u64>,
    pub gas_used: Option<u64>,
    pub effective_gas_price: Option<String>,
    pub failure_reason: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub expires_at: String,
    /// Global position of the last event folded in.
    pub position: i64,
    /// How many events were folded in: equals the aggregate's event count when the view is
    /// exact (no event missed, none applied twice).
    pub version: u64,
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl View for TransactionView {
    const KIND: ViewKind = ViewKind::Transaction;
    type Event = TransactionEvent;

    fn create(event: TransactionEvent, position: i64) -> Option<Self> {
        let TransactionEvent::TransactionPrepared(p) = event else {
            return None;
        };
        Some(Self {
            transaction_id: p.transaction_id,
            status: PENDING.to_owned(),
            wallet_address: p.wallet_address,
            owner_user_id: p.owner_user_id,
            initiator: p.initiator,
            kind: p.kind,
            chain_id: p.payload.chain_id,
            to: p.to,
            value: p.payload.value.clone(),
            token_address: p.token_address,
            amount: p.amount,
            data: p.payload.data.to_hex(),
            memo: p.memo,
            summary: p.summary,
            payload: p.payload,
            payload_digest: p.payload_digest,
            simulation: p.simulation,
            gas_estimate: p.gas_estimate,
            max_fee_per_gas: p.max_fee_per_gas.map(|f| f.to_string()),
            max_fee_wei: p.max_fee_wei,
            authorized_by: None,
            rejection_reason: None,
            tx_hash: None,
            nonce: None,
            block_number: None,
            gas_used: None,
            effective_gas_price: None,
            failure_reason: None,
            created_at: rfc3339(p.prepared_at),
            updated_at: rfc3339(p.prepared_at),
            expires_at: rfc3339(p.expires_at),
            position,
            version: 1,
        })
    }

    fn update(&mut self, event: TransactionEvent, position: i64) {
        self.position = position;
        self.version += 1;
        let (status, at) = match event {
            TransactionEvent::TransactionPrepared(_) => return,
            TransactionEvent::TransactionAuthorized {
                authorized_by,
                authorized_at,
                ..
            } => {
                self.authorized_by = Some(authorized_by);
                ("authorized", authorized_at)
            }
            TransactionEvent::TransactionRejected {
                reason,
                rejected_at,
                ..
            } => {
                self.rejection_reason = reason;
                ("rejected", rejected_at)
            }
            TransactionEvent::TransactionExpired { expired_at } => ("expired", expired_at),
            TransactionEvent::TransactionExecuted {
                tx_hash,
                nonce,
                executed_at,
                ..
            } => {
                self.tx_hash = Some(tx_hash);
                self.nonce = Some(nonce);
                ("executed", executed_at)
            }
            TransactionEvent::TransactionConfirmed {
                block_number,
                gas_used,
                effective_gas_price,
                confirmed_at,
            } => {
                self.block_number = Some(block_number);
                self.gas_used = Some(gas_used);
                self.effective_gas_price = Some(effective_gas_price.to_string());
                ("confirmed", confirmed_at)
            }
            TransactionEvent::TransactionFailed {
                reason,
                block_number,
                failed_at,
            } => {
                self.failure_reason = Some(reason);
                self.block_number = block_number.or(self.block_number);
                ("failed", failed_at)
            }
        };
        self.status = status.to_owned();
        self.updated_at = rfc3339(at);
    }

    fn doc<P>(&self, id: String, payload: P) -> ViewDoc<P> {
        let api_key_id = match &self.initiator {
            Initiator::Agent { api_key_id, .. } => Some(api_key_id.clone()),
            Initiator::User { .. } => None,
        };
        ViewDoc {
            kind: Self::KIND,
            id,
            owner_user_id: Some(self.owner_user_id.clone()),
            wallet_address: Some(self.wallet_address.to_checksum()),
            api_key_id,
            status: Some(self.status.clone()),
            due_at: (self.status == PENDING).then(|| self.expires_at.clone()),
            payload,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WalletView {
    pub wallet_address: Address,
    pub owner_user_id: String,
    pub chain_id: u64,
    pub created_at: String,
}

impl View for WalletView {
    const KIND: ViewKind = ViewKind::Wallet;
    type Event = WalletEvent;

    fn create(event: WalletEvent, _: i64) -> Option<Self> {
        let WalletEvent::WalletCreated {
            wallet_address,
            owner_user_id,
            chain_id,
            created_at,
        } = event;
        Some(Self {
            wallet_address,
            owner_user_id,
            chain_id,
            created_at: rfc3339(created_at),
        })
    }

    fn update(&mut self, _: WalletEvent, _: i64) {}

    fn doc<P>(&self, id: String, payload: P) -> ViewDoc<P> {
        ViewDoc {
            kind: Self::KIND,
            id,
            owner_user_id: Some(self.owner_user_id.clone()),
            wallet_address: Some(self.wallet_address.to_checksum()),
            api_key_id: None,
            status: None,
            due_at: None,
            payload,
        }
    }
}

/// An agent key as its owner sees it (never the secret).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKeyView {
    pub api_key_id: String,
    pub owner_user_id: String,
    pub name: String,
    /// `None`: all of the owner's wallets.
    pub wallet_addresses: Option<Vec<Address>>,
    pub created_at: String,
    pub revoked_at: Option<String>,
}

impl ApiKeyView {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }

    pub fn covers(&self, wallet: &Address) -> bool {
        self.wallet_addresses
            .as_ref()
            .is_none_or(|scope| scope.contains(wallet))
    }
}

impl View for ApiKeyView {
    const KIND: ViewKind = ViewKind::ApiKey;
    type Event = ApiKeyEvent;

    fn create(event: ApiKeyEvent, _: i64) -> Option<Self> {
        let ApiKeyEvent::ApiKeyIssued {
            api_key_id,
            owner_user_id,
            name,
            wallet_addresses,
            issued_at,
        } = event
        else {
            return None;
        };
        Some(Self {
            api_key_id,
            owner_user_id,
            name,
            wallet_addresses,
            created_at: rfc3339(issued_at),
            revoked_at: None,
        })
    }

    fn update(&mut self, event: ApiKeyEvent, _: i64) {
        if let ApiKeyEvent::ApiKeyRevoked { revoked_at, .. } = event {
            self.revoked_at = Some(rfc3339(revoked_at));
        }
    }

    fn doc<P>(&self, id: String, payload: P) -> ViewDoc<P> {
        ViewDoc {
            kind: Self::KIND,
            id,
            owner_user_id: Some(self.owner_user_id.clone()),
            wallet_address: None,
            api_key_id: Some(self.api_key_id.clone()),
            status: Some(
                if self.is_revoked() {
                    "revoked"
                } else {
                    "active"
                }
                .to_owned(),
            ),
            due_at: None,
            payload,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserView {
    pub user_id: String,
    pub username: String,
    pub mfa_enabled: bool,
    pub mfa_pending: bool,
    pub registered_at: String,
    /// Roles granted by an operator (e.g. `auditor`); absent in documents stored before roles
    /// existed.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Password changes plus MFA replacements so far: access tokens carry the version they
    /// were issued under and are refused once it is behind (absent in older documents).
    #[serde(default)]
    pub token_version: u64,
    /// Wrong MFA codes in a row (reset by an accepted code and by a lockout).
    #[serde(default)]
    pub mfa_failed_attempts: u32,
    /// The end of the latest MFA lockout (RFC 3339); in the past once it is over.
    #[serde(default)]
    pub mfa_locked_until: Option<String>,
}

impl UserView {
    pub fn has_role(&self, role: aggregates::Role) -> bool {
        self.roles.iter().any(|r| r == role.as_str())
    }
}

impl View for UserView {
    const KIND: ViewKind = ViewKind::User;
    type Event = UserEvent;

    fn create(event: UserEvent, _: i64) -> Option<Self> {
        let UserEvent::UserRegistered {
            user_id,
            username,
            registered_at,
            ..
        } = event
        else {
            return None;
        };
        Some(Self {
            user_id,
            username,
            mfa_enabled: false,
            mfa_pending: false,
            registered_at: rfc3339(registered_at),
            roles: vec![],
            token_version: 0,
            mfa_failed_attempts: 0,
            mfa_locked_until: None,
        })
    }

    fn update(&mut self, event: UserEvent, _: i64) {
        match event {
            UserEvent::MfaSetupStarted { .. } => self.mfa_pending = true,
            UserEvent::MfaEnabled {
                replaced_secret_id, ..
            } => {
                self.mfa_enabled = true;
                self.mfa_pending = false;
                self.mfa_failed_attempts = 0;
                if replaced_secret_id.is_some() {
                    self.token_version += 1;
                }
            }
            UserEvent::PasswordChanged { .. } => self.token_version += 1,
            UserEvent::LoggedOut { .. } => {}
            UserEvent::RoleGranted { role, .. } => {
                if !self.has_role(role) {
                    self.roles.push(role.as_str().to_owned());
                    self.roles.sort();
                }
            }
            UserEvent::RoleRevoked { role, .. } => self.roles.retain(|r| r != role.as_str()),
            UserEvent::MfaCodeAccepted { .. } => self.mfa_failed_attempts = 0,
            UserEvent::MfaCodeRejected { failures, .. } => self.mfa_failed_attempts = failures,
            UserEvent::MfaLockedOut { until, .. } => {
                self.mfa_failed_attempts = 0;
                self.mfa_locked_until = Some(rfc3339(until));
            }
            UserEvent::UserRegistered { .. } => {}
        }
    }

    fn doc<P>(&self, id: String, payload: P) -> ViewDoc<P> {
        ViewDoc {
            kind: Self::KIND,
            id,
            owner_user_id: Some(self.user_id.clone()),
            wallet_address: None,
            api_key_id: None,
            status: None,
            due_at: None,
            payload,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::apply;

    fn stored(position: i64, aggregate_type: &str, id: &str, payload: Value) -> StoredEvent {
        StoredEvent {
            position,
            aggregate_type: aggregate_type.into(),
            aggregate_id: id.into(),
            sequence: position,
            event_type: payload
                .as_object()
                .and_then(|o| o.keys().next().cloned())
                .unwrap_or_default(),
            event_version: "1.0".into(),
            payload,
            metadata: json!({"actor": "u1"}),
            recorded_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn user_view_counts_wrong_codes_and_shows_the_lockout() {
        let at = "2026-01-01T00:00:00Z";
        let rejected = |failures: u32| {
            json!({"MfaCodeRejected": {"purpose": "issue_api_key", "failures": failures,
                "rejected_at": at}})
        };
        let events = [
            json!({"UserRegistered": {"user_id": "u1", "username": "Alice",
                "username_key": "alice", "registered_at": at}}),
            rejected(1),
            json!({"MfaCodeAccepted": {"step": 1, "purpose": "issue_api_key", "accepted_at": at}}),
            rejected(1),
            rejected(2),
            json!({"MfaLockedOut": {"failures": 5, "locked_at": at,
                "until": "2026-01-01T00:15:00Z"}}),
        ];
        let mut doc = None;
        let mut seen = vec![];
        for (i, payload) in events.into_iter().enumerate() {
            let event = stored(i as i64 + 1, "User", "u1", payload);
            let next = apply(ViewKind::User, doc, &event).unwrap();
            let view: UserView = serde_json::from_value(next.payload.clone()).unwrap();
            seen.push((view.mfa_failed_attempts, view.mfa_locked_until));
            doc = Some(next.payload);
        }
        let locked = Some("2026-01-01T00:15:00Z".to_owned());
        assert_eq!(
            seen,
            [
                (0, None),
                (1, None),
                (0, None),
                (1, None),
                (2, None),
                (0, locked)
            ]
        );
    }

    #[test]
    fn api_key_view_follows_issue_and_revoke() {
        let issued = stored(
            1,
            "ApiKey",
            "k1",
            json!({"ApiKeyIssued": {"api_key_id": "k1", "owner_user_id": "u1", "name": "bot",
                "wallet_addresses": null, "issued_at": "2026-01-01T00:00:00Z"}}),
        );
        let doc = apply(ViewKind::ApiKey, None, &issued).unwrap();
        assert_eq!(doc.status.as_deref(), Some("active"));
        let revoked = stored(
            2,
            "ApiKey",
            "k1",
            json!({"ApiKeyRevoked": {"revoked_by": "u1", "revoked_at": "2026-01-01T00:01:00Z"}}),
        );
        let doc = apply(ViewKind::ApiKey, Some(doc.payload), &revoked).unwrap();
        assert_eq!(doc.status.as_deref(), Some("revoked"));
        let view: ApiKeyView = serde_json::from_value(doc.payload).unwrap();
        assert!(view.is_revoked());
    }

    #[test]
    fn password_changes_and_mfa_replacements_advance_the_token_version() {
        let at = "2026-01-01T00:00:00Z";
        let events = [
            json!({"UserRegistered": {"user_id": "u1", "username": "Alice",
                "username_key": "alice", "registered_at": at}}),
            json!({"MfaSetupStarted": {"secret_id": "A", "started_at": at}}),
            // The first enrolment replaces nothing: sessions continue.
            json!({"MfaEnabled": {"secret_id": "A", "step": 1, "replaced_secret_id": null,
                "enabled_at": at}}),
            json!({"LoggedOut": {"token_id": "j1", "token_expires_at": at, "logged_out_at": at}}),
            json!({"PasswordChanged": {"changed_at": at}}),
            json!({"MfaSetupStarted": {"secret_id": "B", "started_at": at}}),
            json!({"MfaEnabled": {"secret_id": "B", "step": 2, "replaced_secret_id": "A",
                "enabled_at": at}}),
        ];
        let mut doc = None;
        let mut versions = vec![];
        for (i, payload) in events.into_iter().enumerate() {
            let event = stored(i as i64 + 1, "User", "u1", payload);
            let next = apply(ViewKind::User, doc, &event).unwrap();
            let view: UserView = serde_json::from_value(next.payload.clone()).unwrap();
            versions.push(view.token_version);
            doc = Some(next.payload);
        }
        assert_eq!(versions, [0, 0, 0, 0, 1, 1, 2]);
    }

    #[test]
    fn an_update_without_a_view_is_an_error_not_a_silent_skip() {
        let revoked = stored(
            2,
            "ApiKey",
            "k1",
            json!({"ApiKeyRevoked": {"revoked_by": "u1", "revoked_at": "2026-01-01T00:01:00Z"}}),
        );
        assert!(matches!(
            apply(ViewKind::ApiKey, None, &revoked),
            Err(ProjectionError::MissingView { position: 2, .. })
        ));
    }

    #[test]
    fn transaction_views_fold_old_shapes_and_are_due_only_while_pending() {
        let payload = json!({
            "chain_id": 31337,
            "from": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
            "to": "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
            "value": "1",
            "data": "0x"
        });
        // An event and a view document in the shapes stored before simulation was added.
        let prepared = stored(
            1,
            "Transaction",
            "t1",
            json!({"TransactionPrepared": {
                "transaction_id": "t1",
                "wallet_address": "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed",
                "owner_user_id": "u1",
                "initiator": {"type": "user", "user_id": "u1"},
                "kind": "native",
                "to": "0xfB6916095ca1df60bB79Ce92cE3Ea74c37c5d359",
                "token_address": null, "amount": null, "memo": null,
                "summary": "Send 0.000000000000000001 ETH to 0xfB69…d359",
                "payload": payload,
                "payload_digest": "00",
                "prepared_at": "2026-01-01T00:00:00Z",
                "expires_at": "2026-01-01T00:15:00Z"
            }}),
        );
        let doc = apply(ViewKind::Transaction, None, &prepared).unwrap();
        // Waiting for its owner: the deadline column is the document's `expires_at`.
        assert_eq!(doc.due_at.as_deref(), Some("2026-01-01T00:15:00Z"));
        let mut old_doc = doc.payload.clone();
        for field in [
            "simulation",
            "gas_estimate",
            "max_fee_per_gas",
            "max_fee_wei",
        ] {
            assert_eq!(old_doc[field], Value::Null);
            old_doc.as_object_mut().unwrap().remove(field);
        }
        let authorized = stored(
            2,
            "Transaction",
            "t1",
            json!({"TransactionAuthorized": {"authorized_by": "u1", "payload_digest": "00",
                "authorized_at": "2026-01-01T00:01:00Z"}}),
        );
        let doc = apply(ViewKind::Transaction, Some(old_doc), &authorized).unwrap();
        // Decided: no longer due.
        assert_eq!(doc.due_at, None);
        let view: TransactionView = serde_json::from_value(doc.payload).unwrap();
        assert_eq!(view.status, "authorized");
        assert_eq!(view.simulation, None);
    }

    /// A document's indexed columns, whatever form the document itself is in.
    fn columns_of<P>(doc: &ViewDoc<P>) -> [Option<&str>; 7] {
        [
            Some(doc.kind.as_str()),
            Some(&doc.id),
            doc.owner_user_id.as_deref(),
            doc.wallet_address.as_deref(),
            doc.api_key_id.as_deref(),
            doc.status.as_deref(),
            doc.due_at.as_deref(),
        ]
    }

    #[test]
    fn folding_in_place_gives_what_apply_gives_and_a_bad_event_changes_nothing() {
        let at = "2026-01-01T00:00:00Z";
        let address = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed";
        let events = [
            json!({"TransactionPrepared": {
                "transaction_id": "t1", "wallet_address": address, "owner_user_id": "u1",
                "initiator": {"type": "agent", "api_key_id": "k1", "api_key_name": "bot"},
                "kind": "native", "to": address, "token_address": null, "amount": null,
                "memo": "rent \"May\"", "summary": "Send 1 wei",
                "payload": {"chain_id": 31337, "from": address, "to": address, "value": "1",
                    "data": "0x"},
                "payload_digest": "00", "prepared_at": at, "expires_at": at}}),
            json!({"TransactionAuthorized": {"authorized_by": "u1", "payload_digest": "00",
                "authorized_at": at}}),
            json!({"TransactionExecuted": {"tx_hash": "0x01", "nonce": 3, "gas_limit": 21000,
                "max_fee_per_gas": 2, "max_priority_fee_per_gas": 1, "raw_transaction": "0x02",
                "executed_by": {"type": "agent", "api_key_id": "k1", "api_key_name": "bot"},
                "executed_at": at}}),
            json!({"TransactionConfirmed": {"block_number": 9, "gas_used": 21000,
                "effective_gas_price": 1, "confirmed_at": at}}),
        ];
        let mut expected: Option<ViewDoc> = None;
        let mut state: Option<crate::ViewState> = None;
        for (i, payload) in events.iter().enumerate() {
            let event = stored(i as i64 + 1, "Transaction", "t1", payload.clone());
            expected =
                Some(apply(ViewKind::Transaction, expected.map(|d| d.payload), &event).unwrap());
            let text = payload.to_string();
            let head = EventHead::of(&event);
            match &mut state {
                None => {
                    state =
                        Some(crate::fold_text(ViewKind::Transaction, None, head, &text).unwrap())
                }
                Some(s) => s.update_text(head, &text).unwrap(),
            }
        }
        let (expected, state) = (expected.unwrap(), state.unwrap());
        let mut json = Vec::new();
        state.write_json(&mut json).unwrap();
        let columns = state.columns("t1".into());
        assert_eq!(
            serde_json::from_slice::<Value>(&json).unwrap(),
            expected.payload
        );
        assert_eq!(columns_of(&columns), columns_of(&expected));
        assert_eq!(columns.status.as_deref(), Some("confirmed"));

        // An event that does not decode: an error naming it, and the document as it was.
        let mut after = state.clone();
        let head = EventHead {
            position: 5,
            event_type: "TransactionFailed",
        };
        assert!(matches!(
            after.update_text(head, r#"{"TransactionFailed": {"reason": 7}}"#),
            Err(ProjectionError::Decode { position: 5, .. })
        ));
        assert_eq!(after, state);
    }

    #[test]
    fn undecodable_events_name_their_position() {
        let bad = stored(7, "Wallet", "w", json!({"Nope": {}}));
        assert!(matches!(
            apply(ViewKind::Wallet, None, &bad),
            Err(ProjectionError::Decode { position: 7, .. })
        ));
    }
}
