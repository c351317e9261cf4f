//! The `Wallet` aggregate: a server-held key's public identity and its owner. The key itself
//! lives encrypted outside the event log (auditors read events; secrets never go there).

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::types::Address;

#[derive(Debug, Clone, PartialEq)]
pub enum WalletCommand {
    Create {
        wallet_address: Address,
        owner_user_id: String,
        chain_id: u64,
        now: OffsetDateTime,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum WalletEvent {
    WalletCreated {
        wallet_address: Address,
        owner_user_id: String,
        chain_id: u64,
        #[serde(with = "time::serde::rfc3339")]
        created_at: OffsetDateTime,
    },
}

impl DomainEvent for WalletEvent {
    fn event_type(&self) -> String {
        match self {
            Self::WalletCreated { .. } => "WalletCreated".to_owned(),
        }
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalletError {
    #[error("wallet already exists")]
    AlreadyExists,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Wallet {
    owner_user_id: Option<String>,
}

impl Aggregate for Wallet {
    const TYPE: &'static str = "Wallet";
    type Command = WalletCommand;
    type Event = WalletEvent;
    type Error = WalletError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        match command {
            WalletCommand::Create {
                wallet_address,
                owner_user_id,
                chain_id,
                now,
            } => {
                if self.owner_user_id.is_some() {
                    return Err(WalletError::AlreadyExists);
                }
                let event = WalletEvent::WalletCreated {
                    wallet_address,
                    owner_user_id,
                    chain_id,
                    created_at: now,
                };
                sink.write(event, self).await;
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            WalletEvent::WalletCreated { owner_user_id, .. } => {
                self.owner_user_id = Some(owner_user_id)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;
    use time::macros::datetime;

    use super::*;

    #[test]
    fn a_wallet_is_created_once() {
        let now = datetime!(2026-01-01 12:00 UTC);
        let address: Address = "0x5aAeb6053F3E94C9b9A09f33669435E7Ef1BeAed"
            .parse()
            .unwrap();
        let cmd = WalletCommand::Create {
            wallet_address: address,
            owner_user_id: "u1".into(),
            chain_id: 31337,
            now,
        };
        let created = WalletEvent::WalletCreated {
            wallet_address: address,
            owner_user_id: "u1".into(),
            chain_id: 31337,
            created_at: now,
        };
        TestFramework::<Wallet>::with(())
            .given_no_previous_events()
            .when(cmd.clone())
            .then_expect_events(vec![created.clone()]);
        TestFramework::<Wallet>::with(())
            .given(vec![created])
            .when(cmd)
            .then_expect_error(WalletError::AlreadyExists);
    }
}
