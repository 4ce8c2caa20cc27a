//! E2B's snapshots: `POST /sandboxes/{id}/snapshots` (the SDKs' `create_snapshot`),
//! `GET /snapshots` (`list_snapshots`) and `DELETE /templates/{id}` (`delete_snapshot`) onto
//! mvm's sandbox snapshots; a create whose `templateID` names one of the caller's snapshots
//! (by id or name) starts from it (see [`snapshot_of_template`]).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::control::{bad_request, body, paged};
use super::{Caller, E2bQuery, E2bState};
use mvm_sandbox::db::Tenant;
use mvm_sandbox::model::{CreateSnapshot, Snapshot};

/// The tag E2B gives a snapshot's name when none is asked for (`my-snapshot:default`).
const DEFAULT_TAG: &str = ":default";

pub fn routes() -> axum::Router<E2bState> {
    Router::new()
        .route("/sandboxes/{id}/snapshots", post(create))
        .route("/snapshots", get(list))
        .route("/templates/{id}", delete(remove))
}

type Result<T> = std::result::Result<T, super::E2bError>;

/// `SandboxSnapshotRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SnapshotRequest {
    name: Option<String>,
    /// `false`: a snapshot of the file system alone (the SDKs' `mode="filesystem"`).
    memory: Option<bool>,
}

/// `SnapshotInfo`.
#[derive(Serialize)]
struct SnapshotInfo {
    #[serde(rename = "snapshotID")]
    snapshot_id: String,
    names: Vec<String>,
}

impl SnapshotInfo {
    fn of(s: Snapshot) -> SnapshotInfo {
        SnapshotInfo {
            snapshot_id: s.id,
            names: s.name.into_iter().collect(),
        }
    }
}

/// `name` without E2B's default tag.
fn untagged(name: &str) -> &str {
    name.strip_suffix(DEFAULT_TAG).unwrap_or(name)
}

/// The snapshot of `tenant`'s that E2B's `templateID` `key` names, by id or name, with or
/// without E2B's default tag; none when it names none (a template, then).
pub fn snapshot_of_template(
    state: &E2bState,
    tenant: &Tenant,
    key: &str,
) -> Result<Option<Snapshot>> {
    match state.manager.snapshot(&tenant.name, untagged(key)) {
        Ok(snapshot) => Ok(Some(snapshot)),
        Err(mvm_sandbox::Error::NotFound(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Takes a snapshot of the sandbox (mvm's: memory and files, the sandbox going on as it
/// was); a file-system-only one is refused (400), as E2B refuses it where it is not enabled.
async fn create(
    State(state): State<E2bState>,
    caller: Caller,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<(StatusCode, Json<SnapshotInfo>)> {
    let req: SnapshotRequest = body(&bytes)?;
    if req.memory == Some(false) {
        return Err(bad_request(
            "a file-system-only snapshot (mode \"filesystem\") is not supported by mvm: its \
             snapshots keep memory and files (mode \"full\")"
                .into(),
        ));
    }
    let name = req.name.as_deref().map(|n| untagged(n).to_owned());
    let snapshot = state
        .manager
        .snapshot_sandbox(&caller.tenant, &id, CreateSnapshot { name })
        .await?;
    Ok((StatusCode::CREATED, Json(SnapshotInfo::of(snapshot))))
}

/// Query of `GET /snapshots`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    #[serde(rename = "sandboxID")]
    sandbox_id: Option<String>,
    name: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
}

/// The caller's snapshots, oldest first, of one sandbox or by name if asked, a page at a
/// time (`x-next-token`).
async fn list(
    State(state): State<E2bState>,
    caller: Caller,
    E2bQuery(q): E2bQuery<ListQuery>,
) -> Result<Response> {
    let name = q.name.as_deref().map(untagged);
    let all: Vec<SnapshotInfo> = state
        .manager
        .snapshots(&caller.tenant.name)?
        .into_iter()
        .filter(|s| q.sandbox_id.as_ref().is_none_or(|id| *id == s.source))
        .filter(|s| name.is_none_or(|n| n == s.id || s.name.as_deref() == Some(n)))
        .map(SnapshotInfo::of)
        .collect();
    paged(all, q.limit, q.next_token.as_deref())
}

/// Deletes the caller's snapshot `id` (by id or name); mvm's templates are not removed
/// through E2B (404, as for a template the caller does not have).
async fn remove(
    State(state): State<E2bState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    state
        .manager
        .delete_snapshot(&caller.tenant.name, untagged(&id))
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
