//! How much data from a sandbox or a client mvmd holds at once, as data.
//!
//! mvmd is a root daemon shared by every tenant, and both the sandboxes (their agent and
//! processes) and the API clients are untrusted with its memory: every path that holds their
//! data has a bound here, or streams with backpressure (the agent protocol's credit, HTTP and
//! websocket flow control) so that a party that does not read stalls its own data, never the
//! daemon's memory.

use std::pin::Pin;
use std::str::FromStr;
use std::task::{Context, Poll};

/// Environment variable overriding [`DEFAULT_EXEC_OUTPUT_LIMIT`].
pub const EXEC_OUTPUT_LIMIT_ENV: &str = "MVM_EXEC_OUTPUT_LIMIT";
/// Bytes of stdout, and of stderr, a buffered exec keeps: 16 MiB.
pub const DEFAULT_EXEC_OUTPUT_LIMIT: usize = agent::client::DEFAULT_OUTPUT_LIMIT;
/// Environment variable overriding [`DEFAULT_REQUEST_BODY_LIMIT`].
pub const REQUEST_BODY_LIMIT_ENV: &str = "MVM_REQUEST_BODY_LIMIT";
/// Largest body of a JSON request: 2 MiB.
pub const DEFAULT_REQUEST_BODY_LIMIT: usize = 2 << 20;
/// Environment variable overriding [`DEFAULT_UPLOAD_LIMIT`].
pub const UPLOAD_LIMIT_ENV: &str = "MVM_UPLOAD_LIMIT";
/// Largest file `PUT /v1/sandboxes/{id}/files` takes: 1 GiB. The body streams into the
/// sandbox (it is never held whole); the bound is on what one request may write.
pub const DEFAULT_UPLOAD_LIMIT: u64 = 1 << 30;
/// Environment variable overriding [`DEFAULT_PROXIED_CONNECTIONS`].
pub const PROXIED_CONNECTIONS_ENV: &str = "MVM_PORT_PROXY_CONNECTIONS";
/// Connections one tenant may have open (or opening) through mvmd's port proxy at once.
pub const DEFAULT_PROXIED_CONNECTIONS: usize = 64;
/// Environment variable overriding [`DEFAULT_PROXIED_IDLE_SECS`].
pub const PROXIED_IDLE_ENV: &str = "MVM_PORT_PROXY_IDLE";
/// Seconds a connection through mvmd's port proxy may carry no byte either way before mvmd
/// closes it.
pub const DEFAULT_PROXIED_IDLE_SECS: u64 = 300;
/// Largest websocket message the exec websocket takes (stdin comes in messages of any size
/// up to this; the protocol library's default is 64 MiB, held whole).
pub const WS_MESSAGE_LIMIT: usize = 1 << 20;

/// The bounds of one manager and its daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Bytes of stdout, and of stderr, a buffered exec keeps; the rest is read and
    /// discarded, and the answer says `stdout_truncated` / `stderr_truncated`.
    pub exec_output: usize,
    /// Largest body of a JSON request (413 past it).
    pub request_body: usize,
    /// Largest file upload (413 past it).
    pub upload: u64,
    /// Port proxy connections of one tenant at once (429 past it).
    pub proxied_connections: usize,
    /// Seconds a port proxy connection may stay idle.
    pub proxied_idle_secs: u64,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            exec_output: DEFAULT_EXEC_OUTPUT_LIMIT,
            request_body: DEFAULT_REQUEST_BODY_LIMIT,
            upload: DEFAULT_UPLOAD_LIMIT,
            proxied_connections: DEFAULT_PROXIED_CONNECTIONS,
            proxied_idle_secs: DEFAULT_PROXIED_IDLE_SECS,
        }
    }
}

impl Bounds {
    /// The defaults, overridden by `MVM_EXEC_OUTPUT_LIMIT`, `MVM_REQUEST_BODY_LIMIT`,
    /// `MVM_UPLOAD_LIMIT` (bytes), `MVM_PORT_PROXY_CONNECTIONS` and `MVM_PORT_PROXY_IDLE`
    /// (seconds); an invalid value is ignored with a warning naming it.
    pub fn from_env() -> Self {
        let d = Self::default();
        Self {
            exec_output: number_from_env(EXEC_OUTPUT_LIMIT_ENV, d.exec_output, 0),
            request_body: number_from_env(REQUEST_BODY_LIMIT_ENV, d.request_body, 1),
            upload: number_from_env(UPLOAD_LIMIT_ENV, d.upload, 1),
            proxied_connections: number_from_env(PROXIED_CONNECTIONS_ENV, d.proxied_connections, 1),
            proxied_idle_secs: number_from_env(PROXIED_IDLE_ENV, d.proxied_idle_secs, 1),
        }
    }
}

/// An in-memory sink of at most `limit` bytes for what a party sends (a registry's blob, a
/// guest's file): a write past the limit fails, and the rest of what arrives is only counted.
pub struct CappedBuffer {
    /// What was kept.
    pub data: Vec<u8>,
    /// Bytes offered, kept or not.
    pub received: u64,
    /// A write went past the limit.
    pub overflowed: bool,
    limit: u64,
}

impl CappedBuffer {
    /// An empty buffer that keeps at most `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            data: Vec::new(),
            received: 0,
            overflowed: false,
            limit,
        }
    }
}

impl tokio::io::AsyncWrite for CappedBuffer {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.received += buf.len() as u64;
        if this.data.len() as u64 + buf.len() as u64 > this.limit {
            this.overflowed = true;
            return Poll::Ready(Err(std::io::Error::other(format!(
                "over the limit of {} bytes",
                this.limit
            ))));
        }
        this.data.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// A number (bytes, connections, seconds) of at least `min` from `var`; `default` when unset or invalid.
fn number_from_env<T>(var: &str, default: T, min: T) -> T
where
    T: FromStr + PartialOrd + std::fmt::Display + Copy,
{
    let Ok(value) = std::env::var(var) else {
        return default;
    };
    match value.trim().parse::<T>() {
        Ok(v) if v >= min => v,
        _ if value.is_empty() => default,
        _ => {
            tracing::warn!("{var}={value:?} is not a number of at least {min}; using {default}");
            default
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_from_the_environment() {
        let var = "MVM_TEST_BOUNDS_BYTES";
        for (value, want) in [("4096", 4096), ("", 7), ("x", 7), ("0", 7), ("-1", 7)] {
            std::env::set_var(var, value);
            assert_eq!(number_from_env(var, 7u64, 1), want, "{value:?}");
        }
        std::env::remove_var(var);
        assert_eq!(number_from_env(var, 7usize, 0), 7);
    }
}
