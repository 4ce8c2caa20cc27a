//! Directory watching without inotify in the sandbox: a watcher keeps the last listing of its
//! directory (with its subdirectories when recursive) and reports the difference to the next
//! one: new names are `CREATE`, vanished ones `REMOVE`, files whose size or modification time
//! changed `WRITE`. `CreateWatcher`/`GetWatcherEvents`/`RemoveWatcher` (the sync SDK) list
//! when the client asks; `WatchDir` (the async SDK's stream) every [`POLL`]. Changes undone
//! between two listings are not seen, and a rename is a `REMOVE` and a `CREATE`.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use axum::body::Body;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Serialize;

use super::filesystem::{walk, Request};
use super::{absolute, rpc_request};
use crate::e2b::connect::{self, Code, RpcError};
use crate::e2b::E2bState;

/// How often a `WatchDir` stream lists its directory.
pub const POLL: Duration = Duration::from_millis(250);
/// How deep a recursive watch lists.
const RECURSIVE_DEPTH: u32 = 32;
/// Most watchers a sandbox may have at once.
const MAX_WATCHERS: usize = 16;
/// Most entries a watched listing may hold: what mvmd keeps per watcher.
const MAX_WATCHED: usize = 10_000;

/// A listing: path relative to the watched directory → (is a directory, size, mtime).
type Snapshot = BTreeMap<String, (bool, u64, i64)>;

/// `filesystem.FilesystemEvent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FsEvent {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
}

async fn snapshot(
    agent: &agent::AgentClient,
    dir: &str,
    recursive: bool,
) -> Result<Snapshot, RpcError> {
    let depth = if recursive { RECURSIVE_DEPTH } else { 1 };
    let prefix = format!("{}/", dir.trim_end_matches('/'));
    let entries = walk(agent, dir, depth).await?;
    if entries.len() > MAX_WATCHED {
        return Err(RpcError::new(
            Code::ResourceExhausted,
            format!("{dir} holds more than {MAX_WATCHED} entries: watch a smaller directory"),
        ));
    }
    Ok(entries
        .into_iter()
        .map(|(path, st)| {
            let name = path.strip_prefix(&prefix).unwrap_or(&path).to_owned();
            (
                name,
                (st.kind == agent::FileKind::Dir, st.size, st.mtime_ns),
            )
        })
        .collect())
}

/// What changed from `old` to `new`.
fn diff(old: &Snapshot, new: &Snapshot) -> Vec<FsEvent> {
    let event = |name: &str, kind| FsEvent {
        name: name.to_owned(),
        kind,
    };
    let mut events = Vec::new();
    for (name, now) in new {
        match old.get(name) {
            None => events.push(event(name, "EVENT_TYPE_CREATE")),
            Some(before) if before != now && !now.0 => events.push(event(name, "EVENT_TYPE_WRITE")),
            Some(_) => {}
        }
    }
    for name in old.keys().filter(|n| !new.contains_key(*n)) {
        events.push(event(name, "EVENT_TYPE_REMOVE"));
    }
    events
}

struct Watcher {
    dir: String,
    recursive: bool,
    seen: Snapshot,
}

/// The watchers made with `CreateWatcher`, per sandbox.
#[derive(Default)]
pub struct Watchers {
    by_sandbox: Mutex<HashMap<String, HashMap<String, Watcher>>>,
    next: AtomicU64,
}

impl Watchers {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<String, Watcher>>> {
        self.by_sandbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn not_found(id: &str) -> RpcError {
        RpcError::new(Code::NotFound, format!("watcher {id:?} not found"))
    }

    /// A new watcher of `dir` (which must exist); its id. The watchers of sandboxes that are
    /// gone (destroyed through mvm's own API, or timed out) go first.
    pub async fn create(
        &self,
        manager: &mvm_sandbox::manager::Manager,
        agent: &agent::AgentClient,
        sandbox: &str,
        dir: &str,
        recursive: bool,
    ) -> Result<String, RpcError> {
        let seen = snapshot(agent, dir, recursive).await?;
        let live: std::collections::HashSet<String> =
            manager.list(None)?.into_iter().map(|s| s.id).collect();
        let mut map = self.map();
        map.retain(|id, _| live.contains(id));
        let watchers = map.entry(sandbox.to_owned()).or_default();
        if watchers.len() >= MAX_WATCHERS {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("a sandbox may have {MAX_WATCHERS} watchers; remove one first"),
            ));
        }
        let id = format!("w{}", self.next.fetch_add(1, Ordering::Relaxed));
        let watcher = Watcher {
            dir: dir.to_owned(),
            recursive,
            seen,
        };
        watchers.insert(id.clone(), watcher);
        Ok(id)
    }

    /// What changed since the watcher's last listing.
    pub async fn events(
        &self,
        agent: &agent::AgentClient,
        sandbox: &str,
        id: &str,
    ) -> Result<Vec<FsEvent>, RpcError> {
        let (dir, recursive) = {
            let map = self.map();
            let w = map
                .get(sandbox)
                .and_then(|w| w.get(id))
                .ok_or_else(|| Self::not_found(id))?;
            (w.dir.clone(), w.recursive)
        };
        let now = snapshot(agent, &dir, recursive).await?;
        let mut map = self.map();
        let w = map
            .get_mut(sandbox)
            .and_then(|w| w.get_mut(id))
            .ok_or_else(|| Self::not_found(id))?;
        let events = diff(&w.seen, &now);
        w.seen = now;
        Ok(events)
    }

    /// Removes a watcher.
    pub fn remove(&self, sandbox: &str, id: &str) -> Result<(), RpcError> {
        let mut map = self.map();
        let watchers = map.get_mut(sandbox).ok_or_else(|| Self::not_found(id))?;
        watchers.remove(id).ok_or_else(|| Self::not_found(id))?;
        if watchers.is_empty() {
            map.remove(sandbox);
        }
        Ok(())
    }

    /// Forgets a destroyed sandbox's watchers.
    pub fn forget(&self, sandbox: &str) {
        self.map().remove(sandbox);
    }
}

/// `WatchDir`: a start event, then the changes of each listing every [`POLL`] until the
/// client goes away (or the directory cannot be listed any more: the stream's error).
pub async fn stream(state: &E2bState, headers: &HeaderMap, body: Body) -> Response {
    let setup = async {
        let (target, req): (_, Request) = rpc_request(state, headers, body).await?;
        let dir = absolute(&req.path)?;
        let agent = target.agent(state).await?;
        let seen = snapshot(&agent, &dir, req.recursive).await?;
        Ok::<_, RpcError>((agent, dir, req.recursive, seen))
    };
    let (agent, dir, recursive, seen) = match setup.await {
        Ok(s) => s,
        Err(e) => return connect::stream_error(e),
    };
    let start = connect::message(&serde_json::json!({ "start": {} }));
    let polls = futures_util::stream::unfold(Some((seen, VecDeque::new())), move |state| {
        let (agent, dir) = (agent.clone(), dir.clone());
        async move {
            let (mut seen, mut pending): (Snapshot, VecDeque<FsEvent>) = state?;
            loop {
                if let Some(e) = pending.pop_front() {
                    let msg = connect::message(&serde_json::json!({ "filesystem": e }));
                    return Some((msg, Some((seen, pending))));
                }
                tokio::time::sleep(POLL).await;
                match snapshot(&agent, &dir, recursive).await {
                    Ok(now) => {
                        pending.extend(diff(&seen, &now));
                        seen = now;
                    }
                    Err(e) => return Some((connect::end(Some(&e)), None)),
                }
            }
        }
    });
    connect::streaming(futures_util::StreamExt::chain(
        futures_util::stream::once(async move { start }),
        polls,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_differ_by_events() {
        let old: Snapshot = [
            ("a".into(), (false, 1, 1)),
            ("d".into(), (true, 0, 1)),
            ("gone".into(), (false, 1, 1)),
        ]
        .into();
        let new: Snapshot = [
            ("a".into(), (false, 2, 2)),
            ("d".into(), (true, 0, 2)),
            ("d/new".into(), (false, 0, 2)),
        ]
        .into();
        let events = diff(&old, &new);
        let kinds: Vec<(&str, &str)> = events.iter().map(|e| (e.name.as_str(), e.kind)).collect();
        assert_eq!(
            kinds,
            [
                ("a", "EVENT_TYPE_WRITE"),
                ("d/new", "EVENT_TYPE_CREATE"),
                ("gone", "EVENT_TYPE_REMOVE")
            ]
        );
    }
}
