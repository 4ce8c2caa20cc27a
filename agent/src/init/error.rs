//! Errors of the init duties.

use std::io;

/// Errors of the init duties.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A kernel command-line parameter is malformed.
    #[error("kernel parameter {param}: {reason}")]
    BadParam {
        /// The parameter as written.
        param: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

impl From<mvm_sys::Error> for InitError {
    fn from(e: mvm_sys::Error) -> Self {
        InitError::Sys {
            what: e.what,
            source: e.source,
        }
    }
}

/// Maps a failed nix call to [`InitError::Sys`] that says it failed doing `what`.
pub(super) fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> InitError {
    let what = what.into();
    move |e| InitError::Sys {
        what,
        source: e.into(),
    }
}

/// Maps a failed std call to [`InitError::Sys`] that says it failed doing `what`.
pub(super) fn sys_io(what: impl Into<String>) -> impl FnOnce(io::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Sys { what, source }
}
