//! Errors of the manager, each with a stable code (`mvmd` maps them to HTTP statuses, the
//! shim to ttrpc codes).

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Result of manager and daemon operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Body of every error answer: `{"code": "...", "message": "..."}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ErrorBody {
    /// Stable machine-readable code, e.g. `not_found`, `quota_exceeded`.
    pub code: String,
    /// What went wrong and what to do about it.
    pub message: String,
}

/// An error a caller can act on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is syntactically wrong (bad JSON, bad query).
    #[error("{0}")]
    BadRequest(String),
    /// The request is well-formed but its values are not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// No or an unknown bearer token.
    #[error("missing or invalid bearer token: send `Authorization: Bearer <token>` (see `mvmd tenant create`)")]
    Unauthorized,
    /// No such sandbox or template (for this tenant).
    #[error("{0}")]
    NotFound(String),
    /// The sandbox is not in a state that allows the operation.
    #[error("{0}")]
    Conflict(String),
    /// A tenant quota would be exceeded.
    #[error("{0}")]
    Quota(String),
    /// The requested isolation tier cannot run on this host.
    #[error("{0}")]
    TierUnavailable(String),
    /// A request (body, or an exec too large for the agent protocol) exceeds a limit.
    #[error("{0}")]
    TooLarge(String),
    /// The operator does not allow this caller what it asked for (e.g. a tier).
    #[error("{0}")]
    Forbidden(String),
    /// A port of a sandbox did not take the port proxy's connection (nothing listens, or
    /// it did not accept in time).
    #[error("{0}")]
    PortUnreachable(String),
    /// The sandbox's agent failed or is unreachable.
    #[error("sandbox agent: {0}")]
    Agent(#[from] agent::ClientError),
    /// A host operation failed (jailer, network, mounts, database).
    #[error("{0}")]
    Host(String),
}

impl Error {
    /// A host failure with context: `<what>: <source>`.
    pub fn host(what: impl std::fmt::Display, source: impl std::fmt::Display) -> Self {
        Error::Host(format!("{what}: {source}"))
    }

    /// Stable code of this error.
    pub fn code(&self) -> &'static str {
        match self {
            Error::BadRequest(_) => "bad_request",
            Error::Invalid(_) => "invalid_argument",
            Error::TierUnavailable(_) => "isolation_unavailable",
            Error::Unauthorized => "unauthorized",
            Error::Forbidden(_) => "forbidden",
            Error::PortUnreachable(_) => "port_unreachable",
            Error::NotFound(_) => "not_found",
            Error::Conflict(_) => "conflict",
            Error::Quota(_) => "quota_exceeded",
            Error::TooLarge(_) | Error::Agent(agent::ClientError::RequestTooLarge { .. }) => {
                "payload_too_large"
            }
            Error::Agent(e) => match e.remote_kind() {
                Some(agent::protocol::ErrorKind::NotFound) => "not_found",
                Some(agent::protocol::ErrorKind::InvalidInput) => "invalid_argument",
                Some(agent::protocol::ErrorKind::PermissionDenied) => "permission_denied",
                _ => "agent_error",
            },
            Error::Host(_) => "host_error",
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code().to_owned(),
            message: self.to_string(),
        }
    }
}

/// A failed system call of [`mvm_sys`], naming what was being done.
impl From<mvm_sys::Error> for Error {
    fn from(e: mvm_sys::Error) -> Self {
        Error::host(e.what, e.source)
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::host("state database", e)
    }
}
