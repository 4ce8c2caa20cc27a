//! `mvm-agent`: the process that runs inside every mvm sandbox (as the guest's PID 1, or
//! as a plain host process for the `jail` tier) and executes the host's requests, plus the
//! host-side [`client`] library that talks to it.
//!
//! The wire protocol is in [`protocol`] and documented in `agent/PROTOCOL.md`.

pub mod client;
mod flow;
pub mod init;
pub mod protocol;
pub mod server;

pub use client::{
    AgentClient, ClientError, ExecControl, ExecSession, ExecStdin, Output, OutputStream,
};
pub use protocol::{
    DirEntry, ErrorKind, ExecRequest, ExitStatus, FileKind, FileStat, Health, Identity, IpConfig,
    MountRequest, RemoteError, ShutdownAction, Termination,
};

/// Writes a line to the agent's stderr (the console when it is the guest's init),
/// ignoring write errors: logging must never take the agent down.
#[doc(hidden)]
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "mvm-agent: {}", format_args!($($arg)*));
    }};
}
