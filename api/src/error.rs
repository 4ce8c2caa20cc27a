//! The daemon's side of the manager's errors: each answers with an HTTP status and the
//! `{code, message}` body ([`ErrorBody`]).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mvm_sandbox::{Error, ErrorBody};

/// Result of the daemon's handlers.
pub type Result<T, E = ApiError> = std::result::Result<T, E>;

/// A manager error on its way to an HTTP answer.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct ApiError(pub Error);

impl<E: Into<Error>> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError(e.into())
    }
}

impl ApiError {
    /// HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match &self.0 {
            Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Invalid(_) | Error::TierUnavailable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::PortUnreachable(_) => StatusCode::BAD_GATEWAY,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Quota(_) => StatusCode::TOO_MANY_REQUESTS,
            Error::TooLarge(_) | Error::Agent(agent::ClientError::RequestTooLarge { .. }) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Error::Agent(e) => match e.remote_kind() {
                Some(agent::protocol::ErrorKind::NotFound) => StatusCode::NOT_FOUND,
                Some(agent::protocol::ErrorKind::InvalidInput) => StatusCode::UNPROCESSABLE_ENTITY,
                Some(agent::protocol::ErrorKind::PermissionDenied) => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_GATEWAY,
            },
            Error::Host(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> ErrorBody {
        self.0.body()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::error!(code = self.0.code(), "{}", self.0);
        }
        (self.status(), axum::Json(self.body())).into_response()
    }
}
