//! System code shared by the jailer, the guest agent and the manager: the mount table
//! ([`mountinfo`]), mount(2) and pivot_root(2) ([`mount`]), the cgroup hierarchies
//! ([`cgroup`]), flock(2) ([`flock`]), paths as C strings ([`cstr`]), persistent tap devices
//! ([`tap`]), userfaultfd(2) ([`uffd`]: the VMM's `Uffd` snapshot backend and page servers),
//! the data ranges of sparse files ([`sparse`]) and helper processes that restart their worker
//! when it dies ([`supervise`]).
//!
//! The agent links this crate into its static init binary: it depends on libc and thiserror
//! only.

pub mod cgroup;
pub mod cstr;
pub mod flock;
pub mod mount;
pub mod mountinfo;
pub mod sparse;
pub mod supervise;
pub mod tap;
pub mod uffd;

use std::io;

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// A system call or read that failed, with what was being done (paths included).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct Error {
    /// What was being done.
    pub what: String,
    /// The underlying error; its `raw_os_error` is the errno.
    pub source: io::Error,
}

impl Error {
    /// An error of `what` from `source`.
    pub fn new(what: impl Into<String>, source: io::Error) -> Self {
        Error {
            what: what.into(),
            source,
        }
    }

    /// An error of `what` from the calling thread's `errno`.
    pub(crate) fn last_os_error(what: impl Into<String>) -> Self {
        Self::new(what, io::Error::last_os_error())
    }
}
