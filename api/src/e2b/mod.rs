//! E2B compatibility: the official `e2b` SDKs drive mvmd when `E2B_API_URL` and
//! `E2B_SANDBOX_URL` are both `http://HOST:PORT/e2b` and `E2B_API_KEY` is an mvm token.
//!
//! Two surfaces share the `/e2b` prefix: E2B's REST control plane ([`control`]: create,
//! list, get, kill, timeout, pause/resume/connect, fork, metrics, network, and snapshots in
//! [`snapshots`]) and the in-sandbox daemon's protocol
//! ([`envd`]: Connect RPC `process.Process` and `filesystem.Filesystem`, `/files`,
//! `/health`), which the SDK sends to the same base URL with the sandbox in the
//! `E2b-Sandbox-Id` header. Both are translated onto the sandbox manager and the agent; no
//! daemon runs in the guest.

mod audit;
mod connect;
mod control;
mod envd;
mod snapshots;
mod time;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;

use crate::error::ApiError;
use mvm_sandbox::db::Tenant;
use mvm_sandbox::manager::Manager;

/// The router of everything under `/e2b` (nested there by [`crate::server::router`]).
pub fn router(manager: Manager) -> Router {
    let state = E2bState {
        manager,
        processes: std::sync::Arc::default(),
        watchers: std::sync::Arc::default(),
    };
    control::routes()
        .merge(snapshots::routes())
        .merge(envd::routes())
        .fallback(|| async {
            E2bError::new(
                StatusCode::BAD_REQUEST,
                "mvm's E2B endpoint does not serve this route (templates, volumes and logs \
                 are not supported; see the README's E2B section)",
            )
        })
        .method_not_allowed_fallback(|| async {
            E2bError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this E2B route does not take that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::record,
        ))
        .with_state(state)
}

/// Shared state of the E2B handlers.
#[derive(Clone)]
struct E2bState {
    manager: Manager,
    /// The processes started through `process.Process`, per sandbox.
    processes: std::sync::Arc<envd::process::Processes>,
    /// The directory watchers made through `filesystem.Filesystem`, per sandbox.
    watchers: std::sync::Arc<envd::watch::Watchers>,
}

/// An error in E2B's REST shape: `{code: <HTTP status>, message}`.
#[derive(Debug)]
struct E2bError {
    status: StatusCode,
    message: String,
}

impl E2bError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

impl<E: Into<ApiError>> From<E> for E2bError {
    fn from(e: E) -> Self {
        let e = e.into();
        // E2B answers invalid input with 400.
        let status = match e.status() {
            StatusCode::UNPROCESSABLE_ENTITY => StatusCode::BAD_REQUEST,
            other => other,
        };
        Self::new(status, e.body().message)
    }
}

impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(status = %self.status, "e2b: {}", self.message);
        }
        let body = serde_json::json!({"code": self.status.as_u16(), "message": self.message});
        (self.status, axum::Json(body)).into_response()
    }
}

/// The caller of an E2B call: the tenant its mvm token names (E2B's `X-API-Key` on the
/// control plane, `X-Access-Token` on the data plane, or a bearer token), and that token.
struct Caller {
    tenant: Tenant,
    token: String,
}

impl Caller {
    fn of(manager: &Manager, headers: &HeaderMap) -> Result<Caller, mvm_sandbox::Error> {
        let token = presented_token(headers)
            .filter(|t| !t.is_empty())
            .ok_or(mvm_sandbox::Error::Unauthorized)?;
        let tenant = manager
            .db()
            .tenant_for_token(&token)?
            .ok_or(mvm_sandbox::Error::Unauthorized)?;
        Ok(Caller { tenant, token })
    }
}

impl FromRequestParts<E2bState> for Caller {
    type Rejection = E2bError;

    async fn from_request_parts(parts: &mut Parts, state: &E2bState) -> Result<Self, E2bError> {
        Ok(Caller::of(&state.manager, &parts.headers)?)
    }
}

/// A query string; anything wrong in it is a 400 in E2B's shape.
struct E2bQuery<T>(T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for E2bQuery<T> {
    type Rejection = E2bError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, E2bError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| E2bQuery(q.0))
            .map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, e.body_text()))
    }
}

/// The token a request authenticated with, handed back as the sandbox's `envdAccessToken`
/// so that the SDK's data-plane calls (which carry no API key) carry it as `X-Access-Token`.
fn presented_token(headers: &HeaderMap) -> Option<String> {
    ["x-api-key", "x-access-token"]
        .iter()
        .find_map(|h| headers.get(*h)?.to_str().ok())
        .map(|t| t.trim().to_owned())
        .or_else(|| crate::server::token(headers).map(str::to_owned))
}
