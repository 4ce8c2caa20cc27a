//! `filesystem.Filesystem` on the agent: Stat, ListDir (with depth) and Remove are agent
//! requests; MakeDir and Move run `mkdir -p` and `mv` in the sandbox; WatchDir and the
//! watcher calls compare listings ([`super::watch`]).

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::{Deserialize, Serialize};

use super::{absolute, rpc_request, run, unknown_method, Method};
use crate::e2b::connect::{self, Code, RpcError};
use crate::e2b::time::rfc3339;
use crate::e2b::E2bState;
use agent::{FileKind, FileStat};

/// Most entries a `ListDir` answers with (the agent caps one listing too).
const MAX_ENTRIES: usize = 100_000;

/// The fields of every request of the service.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct Request {
    pub path: String,
    depth: u32,
    source: String,
    destination: String,
    pub recursive: bool,
    #[serde(rename = "watcherId")]
    watcher_id: String,
}

/// `filesystem.EntryInfo`.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EntryInfo {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
    /// int64: a string in JSON.
    size: String,
    mode: u32,
    permissions: String,
    owner: String,
    group: String,
    modified_time: String,
    is_symlink: bool,
}

/// `ls -l`'s permission string of a kind and mode.
fn permissions(kind: FileKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        FileKind::File | FileKind::Other => '-',
    });
    for shift in [6, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn entry(path: &str, stat: &FileStat) -> EntryInfo {
    let name = path.rsplit('/').next().unwrap_or(path);
    EntryInfo {
        name: if name.is_empty() { "/" } else { name }.to_owned(),
        kind: match stat.kind {
            FileKind::Dir => "FILE_TYPE_DIRECTORY",
            FileKind::Symlink => "FILE_TYPE_SYMLINK",
            FileKind::File | FileKind::Other => "FILE_TYPE_FILE",
        },
        path: path.to_owned(),
        size: stat.size.to_string(),
        mode: stat.mode,
        permissions: permissions(stat.kind, stat.mode),
        owner: stat.uid.to_string(),
        group: stat.gid.to_string(),
        modified_time: rfc3339(stat.mtime_ns.div_euclid(1_000_000_000)),
        is_symlink: stat.kind == FileKind::Symlink,
    }
}

/// `dir/name` without a doubled slash.
fn join(dir: &str, name: &str) -> String {
    format!("{}/{name}", dir.trim_end_matches('/'))
}

/// `POST /filesystem.Filesystem/{method}`.
pub async fn call(
    State(state): State<E2bState>,
    axum::extract::Path(method): Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if method == "WatchDir" {
        return super::watch::stream(&state, &headers, body).await;
    }
    connect::unary(unary(&state, &method, &headers, body).await)
}

async fn unary(
    state: &E2bState,
    method: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<serde_json::Value, RpcError> {
    let (target, req): (_, Request) = rpc_request(state, headers, body).await?;
    let agent = target.agent(state).await?;
    let json = |v: &EntryInfo| serde_json::json!({ "entry": v });
    match method {
        "Stat" => {
            let path = absolute(&req.path)?;
            Ok(json(&entry(&path, &agent.stat(&path).await?)))
        }
        "ListDir" => {
            let path = absolute(&req.path)?;
            let entries: Vec<EntryInfo> = walk(&agent, &path, req.depth.max(1))
                .await?
                .iter()
                .map(|(path, stat)| entry(path, stat))
                .collect();
            Ok(serde_json::json!({ "entries": entries }))
        }
        "MakeDir" => {
            let path = absolute(&req.path)?;
            if agent.stat(&path).await.is_ok() {
                return Err(RpcError::new(
                    Code::AlreadyExists,
                    format!("{path} already exists"),
                ));
            }
            run(state, &target, &["mkdir", "-p", "--", &path]).await?;
            Ok(json(&entry(&path, &agent.stat(&path).await?)))
        }
        "Move" => {
            let (from, to) = (absolute(&req.source)?, absolute(&req.destination)?);
            agent.stat(&from).await?;
            run(state, &target, &["mv", "--", &from, &to]).await?;
            Ok(json(&entry(&to, &agent.stat(&to).await?)))
        }
        "Remove" => {
            let path = absolute(&req.path)?;
            agent.remove(&path, true).await?;
            Ok(serde_json::json!({}))
        }
        "CreateWatcher" => {
            let path = absolute(&req.path)?;
            let id = (state.watchers)
                .create(&state.manager, &agent, &target.id, &path, req.recursive)
                .await?;
            Ok(serde_json::json!({ "watcherId": id }))
        }
        "GetWatcherEvents" => {
            let events = (state.watchers)
                .events(&agent, &target.id, &req.watcher_id)
                .await?;
            Ok(serde_json::json!({ "events": events }))
        }
        "RemoveWatcher" => {
            state.watchers.remove(&target.id, &req.watcher_id)?;
            Ok(serde_json::json!({}))
        }
        other => Err(unknown_method("filesystem.Filesystem", other)),
    }
}

/// The paths and metadata under `dir`, down to `depth` levels (1: its own entries).
pub async fn walk(
    agent: &agent::AgentClient,
    dir: &str,
    depth: u32,
) -> Result<Vec<(String, FileStat)>, RpcError> {
    let mut out = Vec::new();
    let mut level = vec![dir.to_owned()];
    for _ in 0..depth {
        let mut next = Vec::new();
        for d in &level {
            for e in agent.list(d).await? {
                let path = join(d, &e.name);
                if e.stat.kind == FileKind::Dir {
                    next.push(path.clone());
                }
                out.push((path, e.stat));
                if out.len() > MAX_ENTRIES {
                    return Err(RpcError::new(
                        Code::ResourceExhausted,
                        format!("{dir} holds more than {MAX_ENTRIES} entries at that depth"),
                    ));
                }
            }
        }
        level = next;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_connect_json() {
        let stat = FileStat {
            kind: FileKind::Dir,
            size: 4096,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime_ns: 0,
        };
        let v = serde_json::to_value(entry("/tmp/d", &stat)).unwrap();
        assert_eq!(v["name"], "d");
        assert_eq!(v["type"], "FILE_TYPE_DIRECTORY");
        assert_eq!(v["size"], "4096");
        assert_eq!(v["permissions"], "drwxr-xr-x");
        assert_eq!(v["modifiedTime"], "1970-01-01T00:00:00Z");
        assert_eq!(join("/", "a"), "/a");
    }
}
