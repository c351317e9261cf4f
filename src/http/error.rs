//! The one HTTP error type. Every failure becomes `{"error": {"code", "message", "field"?}}`;
//! domain and storage errors are mapped here, once. 500 bodies are generic; causes go to the log.

use aggregates::{ApiKeyError, TransactionError, UserError, WalletError};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use cqrs_es::AggregateError;
use serde_json::json;

use crate::abi::AbiError;
use crate::chain::ChainError;
use crate::crypto::PasswordError;
use crate::projector::ProjectorError;
use crate::store::{caused_by_unavailable, is_unavailable_message, StoreError};
use crate::wallet_lock::LockError;
use crate::writer::DocumentChanged;

/// The code of a command refused because a document it was decided on changed meanwhile
/// (see `writer::Unchanged`).
pub const DOCUMENT_CHANGED: &str = "changed_concurrently";

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// Seconds for a `Retry-After` header (429s).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    /// 429 with `Retry-After` (whole seconds, at least 1); the message says when to retry.
    pub fn too_many_requests(code: &'static str, message: impl Into<String>, secs: u64) -> Self {
        Self {
            retry_after: Some(secs.max(1)),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, code, message)
        }
    }

    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_field", message).with_field(field)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, code, message)
    }

    /// Unknown *or not yours*: the two are deliberately indistinguishable.
    pub fn not_found(what: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn chain_unavailable(e: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %e, "chain RPC unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "chain_unavailable",
            "the blockchain node is unreachable; retry later",
        )
    }

    /// The database is unreachable or restarting: the request may be retried. (A command
    /// answered this way may or may not have been recorded; one answered 2xx was.)
    pub fn unavailable(cause: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %cause, "database unavailable");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the database is unreachable; retry later",
        )
    }

    /// Log the cause, answer generically.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "internal server error",
        )
    }

    pub fn wrong_password() -> Self {
        Self::forbidden("invalid_password", "password is incorrect")
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"code": self.code, "message": self.message});
        if let Some(field) = self.field {
            body["field"] = json!(field);
        }
        let mut response = (self.status, Json(json!({ "error": body }))).into_response();
        if let Some(secs) = self.retry_after {
            response
                .headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_unavailable() {
            Self::unavailable(e)
        } else {
            Self::internal(e)
        }
    }
}

impl From<ProjectorError> for ApiError {
    fn from(e: ProjectorError) -> Self {
        if caused_by_unavailable(&e) {
            Self::unavailable(e)
        } else {
            Self::internal(e)
        }
    }
}

impl From<LockError> for ApiError {
    fn from(e: LockError) -> Self {
        match e {
            LockError::Busy => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "wallet_busy",
                e.to_string(),
            ),
            LockError::Store(e) => e.into(),
        }
    }
}

impl From<PasswordError> for ApiError {
    fn from(e: PasswordError) -> Self {
        Self::internal(e)
    }
}

impl From<ChainError> for ApiError {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::Unavailable(_) => Self::chain_unavailable(e),
            ChainError::Rejected(msg) => {
                tracing::warn!(error = %msg, "chain node refused a request");
                Self::new(StatusCode::BAD_GATEWAY, "chain_error", msg)
            }
        }
    }
}

impl<E: std::error::Error + Into<ApiError>> From<AggregateError<E>> for ApiError {
    fn from(e: AggregateError<E>) -> Self {
        match e {
            AggregateError::UserError(e) => e.into(),
            AggregateError::AggregateConflict => Self::conflict(
                "conflict",
                "the resource was modified concurrently; retry the request",
            ),
            AggregateError::DatabaseConnectionError(e) => Self::unavailable(e),
            AggregateError::UnexpectedError(e) if e.is::<DocumentChanged>() => Self::conflict(
                DOCUMENT_CHANGED,
                "the API key or wallet changed while the request ran; retry the request",
            ),
            AggregateError::UnexpectedError(e) if caused_by_unavailable(&*e) => {
                Self::unavailable(e)
            }
            other => Self::internal(other),
        }
    }
}

impl From<TransactionError> for ApiError {
    fn from(e: TransactionError) -> Self {
        let msg = e.to_string();
        match e {
            TransactionError::NotFound | TransactionError::NotOwner => {
                Self::not_found("transaction")
            }
            TransactionError::AlreadyExists => Self::conflict("already_exists", msg),
            TransactionError::NotInitiator => Self::not_found("transaction"),
            TransactionError::Expired => Self::conflict("transaction_expired", msg),
            TransactionError::InvalidExpiry => Self::invalid("expires_in", msg),
            TransactionError::InvalidState { .. } => Self::conflict("invalid_state", msg),
            TransactionError::AlreadyExecuted { .. } => Self::conflict("already_executed", msg),
            TransactionError::NotDue => Self::conflict("invalid_state", msg),
            TransactionError::FeeAboveCap { .. } => Self::conflict("fee_above_cap", msg),
            TransactionError::Signing(m) if is_unavailable_message(&m) => Self::unavailable(msg),
            TransactionError::Signing(_) => Self::internal(msg),
        }
    }
}

impl From<AbiError> for ApiError {
    fn from(e: AbiError) -> Self {
        Self::invalid(&e.field, e.message)
    }
}

impl From<UserError> for ApiError {
    fn from(e: UserError) -> Self {
        let msg = e.to_string();
        match e {
            UserError::NotFound => Self::unauthorized("unknown user"),
            UserError::AlreadyRegistered => Self::conflict("username_taken", msg),
            UserError::MfaNotEnabled => Self::forbidden("mfa_not_enabled", msg),
            UserError::MfaCodeRequired => Self::forbidden("mfa_code_required", msg),
            UserError::NoPendingMfa => Self::conflict("no_pending_mfa", msg),
            UserError::InvalidMfaCode { .. } => Self::forbidden("invalid_mfa_code", msg),
            UserError::MfaLocked { until } => {
                let left = until - time::OffsetDateTime::now_utc();
                let secs = u64::try_from(left.whole_seconds()).unwrap_or(0)
                    + u64::from(left.subsec_nanoseconds() > 0);
                let until = until
                    .format(&time::format_description::well_known::Rfc3339)
                    .unwrap_or_default();
                Self::too_many_requests(
                    "mfa_locked",
                    format!(
                        "too many wrong MFA codes: MFA-protected actions are locked until \
                         {until}; retry in {} seconds",
                        secs.max(1)
                    ),
                    secs,
                )
            }
            UserError::MfaCodeReplayed => Self::forbidden("mfa_code_replayed", msg),
            UserError::Verifier(m) if is_unavailable_message(&m) => Self::unavailable(msg),
            UserError::Verifier(_) => Self::internal(msg),
            UserError::RoleAlreadyGranted(_) | UserError::RoleNotGranted(_) => {
                Self::conflict("role_unchanged", msg)
            }
        }
    }
}

impl From<crate::limits::RateLimited> for ApiError {
    fn from(e: crate::limits::RateLimited) -> Self {
        Self::too_many_requests("rate_limited", e.to_string(), e.retry_after_secs())
    }
}

impl From<aggregates::SecurityLogError> for ApiError {
    fn from(e: aggregates::SecurityLogError) -> Self {
        Self::internal(e)
    }
}

impl From<WalletError> for ApiError {
    fn from(e: WalletError) -> Self {
        Self::conflict("already_exists", e.to_string())
    }
}

impl From<ApiKeyError> for ApiError {
    fn from(e: ApiKeyError) -> Self {
        match e {
            ApiKeyError::NotFound => Self::not_found("API key"),
            ApiKeyError::AlreadyExists => Self::conflict("already_exists", e.to_string()),
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
