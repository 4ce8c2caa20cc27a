//! The sandboxes of one MCP session: the only ones its tools may touch, all destroyed when it
//! ends.

use std::collections::BTreeSet;
use std::sync::Mutex;

use crate::backend::{Backend, CliError};

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

    /// Destroys every sandbox of the session, reporting failures on stderr (stdout is the
    /// protocol's).
    pub async fn destroy_all(&self, backend: &Backend) {
        let ids = std::mem::take(&mut *self.ids());
        for id in ids {
            if let Err(e) = backend.destroy(&id).await {
                eprintln!("mvm mcp: destroying sandbox {id} at the session's end: {e}");
            }
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
    Mvm(#[from] CliError),
    /// A file of the sandbox could not be written or read.
    #[error("{doing} {path} in the sandbox: {source}{hint}")]
    File {
        /// `writing` or `reading`.
        doing: &'static str,
        /// The path in the sandbox.
        path: String,
        /// What the client can do about it, if anything general.
        hint: &'static str,
        source: CliError,
    },
    /// A command the tool ran in the sandbox failed.
    #[error("{0}")]
    Command(String),
}
