//! The sandboxes of one MCP session: the only ones its tools may touch, all destroyed when it
//! ends.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use crate::backend::{BackendError, SandboxBackend};

/// Why a tool refused a sandbox id.
#[derive(Debug, thiserror::Error)]
#[error(
    "sandbox {id} is not this MCP session's: a session can only use the sandboxes it created \
     with sandbox_create (this one has: {owned})"
)]
pub struct NotOwned {
    id: String,
    owned: String,
}

/// The sandboxes this session created and has not destroyed.
#[derive(Debug, Default)]
pub struct Owned(Mutex<BTreeSet<String>>);

impl Owned {
    fn ids(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        // A panicking tool leaves the set as it was: keep using it.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a sandbox this session created.
    pub fn add(&self, id: &str) {
        self.ids().insert(id.to_owned());
    }

    /// Ok when `id` is one of this session's.
    pub fn check(&self, id: &str) -> Result<(), NotOwned> {
        let ids = self.ids();
        if ids.contains(id) {
            return Ok(());
        }
        let owned = if ids.is_empty() {
            "none yet".to_owned()
        } else {
            ids.iter().cloned().collect::<Vec<_>>().join(", ")
        };
        Err(NotOwned {
            id: id.to_owned(),
            owned,
        })
    }

    /// Forgets a sandbox that was destroyed.
    pub fn remove(&self, id: &str) {
        self.ids().remove(id);
    }

    /// Destroys every sandbox of the session; returns those that could not be, with why.
    pub async fn destroy_all(&self, backend: &dyn SandboxBackend) -> Vec<(String, BackendError)> {
        let ids = std::mem::take(&mut *self.ids());
        let mut failed = Vec::new();
        for id in ids {
            if let Err(e) = backend.destroy(&id).await {
                failed.push((id, e));
            }
        }
        failed
    }
}

/// Destroys a session's sandboxes when the last handle on it is dropped: how a transport that
/// drops a session's server when the session ends (streamable HTTP) cleans up after it.
pub struct DestroyOnDrop {
    backend: Arc<dyn SandboxBackend>,
    owned: Arc<Owned>,
}

impl DestroyOnDrop {
    /// A guard over `owned`, destroying through `backend`.
    pub fn new(backend: Arc<dyn SandboxBackend>, owned: Arc<Owned>) -> DestroyOnDrop {
        DestroyOnDrop { backend, owned }
    }
}

impl Drop for DestroyOnDrop {
    fn drop(&mut self) {
        let (backend, owned) = (self.backend.clone(), self.owned.clone());
        // Without a runtime (the process is ending) there is nothing to destroy with.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                for (id, e) in owned.destroy_all(&*backend).await {
                    tracing::warn!("destroying sandbox {id} at the MCP session's end: {e}");
                }
            });
        }
    }
}

/// A tool's failure: a tool result with `isError`, not a protocol error.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The sandbox is not this session's.
    #[error(transparent)]
    NotOwned(#[from] NotOwned),
    /// mvm refused or failed.
    #[error("{0}")]
    Mvm(#[from] BackendError),
    /// A file of the sandbox could not be written or read.
    #[error("{doing} {path} in the sandbox: {source}{hint}")]
    File {
        /// `writing` or `reading`.
        doing: &'static str,
        /// The path in the sandbox.
        path: String,
        /// What the client can do about it, if anything general.
        hint: &'static str,
        source: BackendError,
    },
    /// A command the tool ran in the sandbox failed.
    #[error("{0}")]
    Command(String),
}
