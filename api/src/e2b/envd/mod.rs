//! E2B's in-sandbox daemon (envd) served by mvmd: the SDK sends its data-plane calls to
//! `E2B_SANDBOX_URL` with the sandbox in `E2b-Sandbox-Id` and the token mvm handed out as
//! `envdAccessToken` in `X-Access-Token`; each is translated onto the sandbox's agent.

mod files;
mod filesystem;
pub mod process;
pub mod watch;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use super::connect::{Code, RpcError};
use super::E2bState;
use mvm_sandbox::Error;

pub fn routes() -> Router<E2bState> {
    Router::new()
        .route("/process.Process/{method}", post(process::call))
        .route("/filesystem.Filesystem/{method}", post(filesystem::call))
        // Uploads stream into the sandbox, counted against MVM_UPLOAD_LIMIT as they go.
        .route(
            "/files",
            get(files::download)
                .post(files::upload)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/health", get(health))
}

/// The sandbox a data-plane call is for, its owner authenticated.
pub struct Target {
    pub tenant: String,
    pub id: String,
}

impl Target {
    /// From `X-Access-Token` (or `X-API-Key`) and `E2b-Sandbox-Id`; the sandbox must be the
    /// tenant's.
    pub fn of(state: &E2bState, headers: &HeaderMap) -> Result<Target, Error> {
        let tenant = super::Caller::of(&state.manager, headers)?.tenant;
        let id = headers
            .get("e2b-sandbox-id")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                Error::BadRequest(
                    "no E2b-Sandbox-Id header: set E2B_SANDBOX_URL to mvmd's /e2b".into(),
                )
            })?
            .to_owned();
        state.manager.get(&tenant.name, &id)?;
        Ok(Target {
            tenant: tenant.name,
            id,
        })
    }

    /// The sandbox's agent.
    pub async fn agent(&self, state: &E2bState) -> Result<agent::AgentClient, Error> {
        state.manager.agent(&self.tenant, &self.id).await
    }
}

/// A path as envd takes it: relative paths are taken from `/` (the commands' default
/// working directory).
pub fn absolute(path: &str) -> Result<String, RpcError> {
    if path.contains('\0') {
        return Err(RpcError::new(
            Code::InvalidArgument,
            "a path has no NUL byte",
        ));
    }
    Ok(if path.starts_with('/') {
        path.to_owned()
    } else {
        format!("/{path}")
    })
}

/// The method name of an RPC route, for the unknown-method answer.
pub fn unknown_method(service: &str, method: &str) -> RpcError {
    RpcError::new(
        Code::Unimplemented,
        format!("{service}/{method} is not served by mvm"),
    )
}

/// Runs `argv` in the sandbox for a file-system change the agent has no request for; a
/// non-zero exit is an error with the command's stderr.
pub async fn run(state: &E2bState, target: &Target, argv: &[&str]) -> Result<(), RpcError> {
    let req = mvm_sandbox::model::ExecRequest {
        cmd: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    let result = state.manager.exec(&target.tenant, &target.id, &req).await?;
    match result.exit.exit_code {
        Some(0) => Ok(()),
        _ => Err(RpcError::new(
            Code::InvalidArgument,
            format!("{}: {}", argv[0], result.stderr.trim()),
        )),
    }
}

/// `GET /health`: 204 while the sandbox runs; a 502 the SDK reads as "not running" else.
async fn health(State(state): State<E2bState>, headers: HeaderMap) -> Response {
    match Target::of(&state, &headers) {
        Ok(_) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => {
            let id = headers
                .get("e2b-sandbox-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            let body = serde_json::json!({
                "code": 502,
                "message": format!("sandbox {id:?} was not found: {e}"),
            });
            (StatusCode::BAD_GATEWAY, axum::Json(body)).into_response()
        }
    }
}

/// The route parameter of the RPC routes.
pub type Method = Path<String>;

/// The sandbox and the request message of a unary or server-streaming call (one message,
/// the body read whole).
pub async fn rpc_request<T: serde::de::DeserializeOwned>(
    state: &E2bState,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Target, T), RpcError> {
    let target = Target::of(state, headers)?;
    let bytes = axum::body::to_bytes(body, 4 << 20)
        .await
        .map_err(|e| RpcError::new(Code::ResourceExhausted, format!("request body: {e}")))?;
    Ok((target, super::connect::request(headers, &bytes)?))
}
