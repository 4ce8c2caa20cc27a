//! Errors of every jail setup step, each with enough context for the operator to act on.

use std::io;
use std::path::PathBuf;

/// Result alias for the jailer.
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can make the jailer refuse to start the target.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The jail id has a character other than ASCII alphanumerics and '-', or a bad length.
    #[error("invalid --id '{0}': use 1 to 64 ASCII letters, digits or '-'")]
    InvalidId(String),
    /// The exec file is missing, not a regular file, or has no file name.
    #[error("invalid --exec-file {path}: {reason}")]
    InvalidExecFile {
        /// Path given by the user.
        path: PathBuf,
        /// Why it was rejected.
        reason: String,
    },
    /// A numeric flag could not be parsed.
    #[error("invalid {flag} '{value}': {reason}")]
    InvalidArgument {
        /// Flag name, e.g. `--uid`.
        flag: &'static str,
        /// Value given by the user.
        value: String,
        /// What was expected.
        reason: String,
    },
    /// The jail directory already exists: the id is taken by another (or a stale) jail.
    #[error(
        "jail id already in use: {0} exists (run `mvm-jailer --cleanup --id ...` if it is stale)"
    )]
    IdInUse(PathBuf),
    /// The per-id cgroup already exists.
    #[error("cgroup {0} already exists (another jail with this id, or a stale one: run `mvm-jailer --cleanup`)")]
    CgroupInUse(PathBuf),
    /// A `--cgroup` key names a controller with no mounted hierarchy.
    #[error("cgroup controller '{controller}' (from key '{key}') is not available: {reason}")]
    ControllerUnavailable {
        /// Controller name taken from the key prefix.
        controller: String,
        /// The full key.
        key: String,
        /// What was looked at.
        reason: String,
    },
    /// A `--cgroup` key is not a file of its controller.
    #[error("unknown cgroup key '{key}': {path} does not exist")]
    UnknownCgroupKey {
        /// The key as given.
        key: String,
        /// Where the interface file was expected.
        path: PathBuf,
    },
    /// The kernel rejected a cgroup value.
    #[error("cannot set cgroup {key}={value} ({path}): {source}")]
    CgroupWrite {
        /// Key written.
        key: String,
        /// Value written.
        value: String,
        /// Interface file.
        path: PathBuf,
        /// Kernel error.
        source: io::Error,
    },
    /// cgroup v2 refused to enable a controller for a cgroup's children.
    #[error("cannot enable cgroup v2 controller '{controller}' in {path}: {source}{hint}", hint = if .source.raw_os_error() == Some(libc::EBUSY) {
        " (a cgroup other than the root can hand controllers to its children only while it holds \
         no processes itself: choose a --parent-cgroup whose ancestors hold no processes, e.g. not \
         the cgroup of the service running mvm-jailer)"
    } else {
        ""
    })]
    ControllerNotEnabled {
        /// The controller.
        controller: String,
        /// The `cgroup.subtree_control` file written.
        path: PathBuf,
        /// Kernel error.
        source: io::Error,
    },
    /// A cgroup still holds processes and cannot be removed.
    #[error("cgroup {path} still has processes ({pids}); stop the jailed process first")]
    CgroupBusy {
        /// The cgroup directory.
        path: PathBuf,
        /// Pids found in `cgroup.procs`.
        pids: String,
    },
    /// The jail directory has something mounted beneath it on the host; it is never removed then.
    #[error("refusing to remove {jail}: {mount} is mounted beneath it")]
    MountedInJail {
        /// Jail directory.
        jail: PathBuf,
        /// Offending mount point.
        mount: PathBuf,
    },
    /// The exec file cannot run in an empty jail (dynamic loader or script interpreter missing).
    #[error("--exec-file {path} cannot run inside the jail: it needs {interpreter}, which the jail does not contain; use a static binary")]
    NeedsInterpreter {
        /// Exec file.
        path: PathBuf,
        /// ELF interpreter or `#!` interpreter it needs.
        interpreter: String,
    },
    /// `Jail::enter` was called from a process with more than one thread.
    #[error("the jail must be entered from a single-threaded process ({0} threads running); spawn `mvm-jailer` instead")]
    NotSingleThreaded(usize),
    /// The jail setup failed inside the new pid namespace; the child printed why.
    #[error("jail setup failed in the new pid namespace (reason printed above); everything it made was removed")]
    SetupFailedInPidNs,
    /// A step after the privilege drop failed: the process can no longer remove the jail.
    #[error("{source}; the jail at {jail_dir} is left behind (the privileges to remove it are gone): run `mvm-jailer --cleanup`")]
    AfterPrivilegeDrop {
        /// What failed.
        source: Box<Error>,
        /// The jail directory left behind.
        jail_dir: PathBuf,
    },
    /// A filesystem or process operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the paths involved.
        what: String,
        /// Underlying error.
        source: io::Error,
    },
    /// The devpts mounted in the jail lists ptys already: it is not a private instance.
    #[error("the devpts mounted at /dev/pts in the jail is not a new instance (it lists {0}); refusing to expose shared ptys")]
    DevptsShared(String),
    /// A Landlock ruleset could not be built or applied.
    #[error("landlock: {0}")]
    Landlock(String),
    /// The kernel refused a seccomp filter.
    #[error("seccomp: cannot install a filter: {0}")]
    Seccomp(String),
    /// The real, effective or saved uid/gid, or the supplementary groups, are not what the
    /// privilege drop asked for (fail closed).
    #[error("after the privilege drop the process has uids {uids:?} and gids {gids:?} (real, effective, saved) and {groups} supplementary groups, not uid {uid}, gid {gid} and none; refusing to start the target")]
    IdsNotDropped {
        /// Requested uid.
        uid: u32,
        /// Requested gid.
        gid: u32,
        /// Real, effective and saved uid found.
        uids: [u32; 3],
        /// Real, effective and saved gid found.
        gids: [u32; 3],
        /// Number of supplementary groups found.
        groups: i32,
    },
    /// Capabilities were still present after dropping them (fail closed).
    #[error("capabilities still present after dropping them (effective {effective:#x}, permitted {permitted:#x})")]
    CapabilitiesLeft {
        /// Remaining effective set.
        effective: u64,
        /// Remaining permitted set.
        permitted: u64,
    },
}

impl Error {
    /// Wraps an `io::Error` with a description of what was being done.
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// Wraps the last OS error (`errno`) with a description of what was being done.
    pub(crate) fn last_os(what: impl Into<String>) -> Self {
        Self::io(what, io::Error::last_os_error())
    }
}

impl From<mvm_sys::Error> for Error {
    fn from(e: mvm_sys::Error) -> Self {
        Error::io(e.what, e.source)
    }
}

/// Turns a libc return value (`-1` on failure) into a `Result`, describing the call on failure.
pub(crate) fn check(ret: libc::c_int, what: impl FnOnce() -> String) -> Result<libc::c_int> {
    if ret == -1 {
        Err(Error::last_os(what()))
    } else {
        Ok(ret)
    }
}
