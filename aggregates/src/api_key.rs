//! The `ApiKey` aggregate: an agent credential's lifecycle. The key's secret is shown once
//! and stored only as a hash outside the event log; events carry the id, name and scope.

use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::types::Address;

#[derive(Debug, Clone, PartialEq)]
pub enum ApiKeyCommand {
    Issue {
        api_key_id: String,
        owner_user_id: String,
        name: String,
        /// `None`: every wallet the owner has, now or later.
        wallet_addresses: Option<Vec<Address>>,
        now: OffsetDateTime,
    },
    Revoke {
        user_id: String,
        now: OffsetDateTime,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ApiKeyEvent {
    ApiKeyIssued {
        api_key_id: String,
        owner_user_id: String,
        name: String,
        wallet_addresses: Option<Vec<Address>>,
        #[serde(with = "time::serde::rfc3339")]
        issued_at: OffsetDateTime,
    },
    ApiKeyRevoked {
        revoked_by: String,
        #[serde(with = "time::serde::rfc3339")]
        revoked_at: OffsetDateTime,
    },
}

impl DomainEvent for ApiKeyEvent {
    fn event_type(&self) -> String {
        match self {
            Self::ApiKeyIssued { .. } => "ApiKeyIssued",
            Self::ApiKeyRevoked { .. } => "ApiKeyRevoked",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiKeyError {
    #[error("API key already exists")]
    AlreadyExists,
    /// Unknown or someone else's: indistinguishable at the edge.
    #[error("API key not found")]
    NotFound,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ApiKey {
    owner_user_id: Option<String>,
    revoked: bool,
}

impl Aggregate for ApiKey {
    const TYPE: &'static str = "ApiKey";
    type Command = ApiKeyCommand;
    type Event = ApiKeyEvent;
    type Error = ApiKeyError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Self::Command,
        _: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        match command {
            ApiKeyCommand::Issue {
                api_key_id,
                owner_user_id,
                name,
                wallet_addresses,
                now,
            } => {
                if self.owner_user_id.is_some() {
                    return Err(ApiKeyError::AlreadyExists);
                }
                let event = ApiKeyEvent::ApiKeyIssued {
                    api_key_id,
                    owner_user_id,
                    name,
                    wallet_addresses,
                    issued_at: now,
                };
                sink.write(event, self).await;
            }
            ApiKeyCommand::Revoke { user_id, now } => {
                if self.owner_user_id.as_deref() != Some(user_id.as_str()) {
                    return Err(ApiKeyError::NotFound);
                }
                // Revoking twice changes nothing and records nothing.
                if !self.revoked {
                    let event = ApiKeyEvent::ApiKeyRevoked {
                        revoked_by: user_id,
                        revoked_at: now,
                    };
                    sink.write(event, self).await;
                }
            }
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        match event {
            ApiKeyEvent::ApiKeyIssued { owner_user_id, .. } => {
                self.owner_user_id = Some(owner_user_id)
            }
            ApiKeyEvent::ApiKeyRevoked { .. } => self.revoked = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use cqrs_es::test::TestFramework;
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2026-01-01 12:00 UTC);

    fn issued() -> ApiKeyEvent {
        ApiKeyEvent::ApiKeyIssued {
            api_key_id: "k1".into(),
            owner_user_id: "u1".into(),
            name: "bot".into(),
            wallet_addresses: None,
            issued_at: NOW,
        }
    }

    fn revoke(user: &str) -> ApiKeyCommand {
        ApiKeyCommand::Revoke {
            user_id: user.into(),
            now: NOW,
        }
    }

    #[test]
    fn owner_revokes_once_and_repeats_record_nothing() {
        let revoked = ApiKeyEvent::ApiKeyRevoked {
            revoked_by: "u1".into(),
            revoked_at: NOW,
        };
        TestFramework::<ApiKey>::with(())
            .given(vec![issued()])
            .when(revoke("u1"))
            .then_expect_events(vec![revoked.clone()]);
        TestFramework::<ApiKey>::with(())
            .given(vec![issued(), revoked])
            .when(revoke("u1"))
            .then_expect_events(vec![]);
    }

    #[test]
    fn others_cannot_revoke_and_learn_nothing() {
        TestFramework::<ApiKey>::with(())
            .given(vec![issued()])
            .when(revoke("u2"))
            .then_expect_error(ApiKeyError::NotFound);
        TestFramework::<ApiKey>::with(())
            .given_no_previous_events()
            .when(revoke("u1"))
            .then_expect_error(ApiKeyError::NotFound);
    }
}
