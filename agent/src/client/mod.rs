//! Host-side async client for `mvm-agent`.
//!
//! One [`AgentClient`] owns one connection; it is cheap to clone and every clone
//! multiplexes its requests (any number of concurrent execs and file transfers) over that
//! connection. Dropping the last clone (and every [`ExecSession`], [`ExecStdin`] and
//! [`OutputStream`] derived from it) closes the connection, which makes the agent kill the
//! processes it started for it.
//!
//! ```no_run
//! # async fn demo() -> Result<(), agent::ClientError> {
//! use agent::{AgentClient, ExecRequest};
//! let client = AgentClient::connect_unix("/run/mvm/agent.sock").await?;
//! let out = client.exec(ExecRequest::new(["uname", "-a"])).await?.wait_with_output().await?;
//! assert!(out.status.success());
//! # Ok(()) }
//! ```

mod connection;
mod error;
mod exec;
mod files;
mod routes;

pub use error::ClientError;
pub use exec::{ExecControl, ExecSession, ExecStdin, Output, OutputStream};

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use crate::flow::SendWindow;
use crate::protocol::{
    encode_frame, Channel, ClientMessage, ExitStatus, FrameError, Health, Identity, Reply, Request,
    ShutdownAction,
};
use error::unexpected;
use routes::{Expect, Pending, Route, Shared, Sink};

/// How long `connect_*` waits for the agent's `Hello` (and the vsock proxy's `OK`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most directory entries `list` accepts (the guest is not trusted with host memory).
pub const MAX_LIST_ENTRIES: usize = 1 << 18;
/// Most bytes of `Entries` frames `list` accepts, so that long names cannot stand in for
/// many entries.
pub const MAX_LIST_BYTES: usize = 16 << 20;
/// Most bytes of each stream [`ExecSession::wait_with_output`] keeps.
pub const DEFAULT_OUTPUT_LIMIT: usize = 16 << 20;

/// A connection to one agent. Clones share the connection.
#[derive(Clone)]
pub struct AgentClient {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("agent_version", &self.shared.agent_version)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Version of the agent (from the handshake).
    pub fn agent_version(&self) -> &str {
        &self.shared.agent_version
    }

    fn next_id(&self) -> u64 {
        self.shared.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers route `id` and sends `request`, which gets the replies `expect` allows. A
    /// request too large for one frame is refused here, before anything is sent.
    fn begin(
        &self,
        id: u64,
        request: Request,
        expect: Expect,
        sinks: Vec<(Channel, Sink)>,
        exit: Option<oneshot::Sender<ExitStatus>>,
        window: Option<(Channel, Arc<SendWindow>)>,
    ) -> Result<Pending, ClientError> {
        let msg = ClientMessage::Request { id, request };
        if let Err(FrameError::TooLarge(bytes)) = encode_frame(&msg, &mut Vec::new()) {
            return Err(ClientError::RequestTooLarge { bytes });
        }
        let (tx, replies) = mpsc::unbounded_channel();
        {
            let mut state = self.shared.state();
            if state.closed.is_none() {
                state.routes.insert(
                    id,
                    Route {
                        replies: tx,
                        expect,
                        sinks,
                        exit,
                    },
                );
                if let Some((channel, window)) = window {
                    state.windows.insert((id, channel), window);
                }
            }
        }
        let pending = Pending {
            shared: Arc::clone(&self.shared),
            id,
            replies,
            cancel_on_drop: true,
            owns_route: true,
        };
        self.shared.send(msg)?;
        Ok(pending)
    }

    /// Sends a request that gets exactly one reply.
    async fn call(&self, request: Request) -> Result<Reply, ClientError> {
        let mut pending = self.begin(
            self.next_id(),
            request,
            Expect::Replies(1),
            Vec::new(),
            None,
            None,
        )?;
        let reply = pending.next().await;
        pending.complete();
        reply
    }

    async fn call_done(&self, request: Request, what: &str) -> Result<(), ClientError> {
        match self.call(request).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(other, what)),
        }
    }

    /// Agent version, protocol version and uptime.
    pub async fn health(&self) -> Result<Health, ClientError> {
        match self.call(Request::Health).await? {
            Reply::Health(health) => Ok(health),
            other => Err(unexpected(other, "Health")),
        }
    }

    /// Asks the agent to power off or reboot the guest (a host-process agent exits). The
    /// connection closes soon after this returns.
    pub async fn shutdown(&self, action: ShutdownAction) -> Result<(), ClientError> {
        self.call_done(Request::Shutdown { action }, "Shutdown")
            .await
    }

    /// Gives a guest restored from a snapshot its own identity (see [`Request::Reidentify`]).
    pub async fn reidentify(&self, identity: Identity) -> Result<(), ClientError> {
        self.call_done(Request::Reidentify(identity), "Reidentify")
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ExecRequest;

    fn assert_send<T: Send>(_: T) {}

    /// The API daemon, CLI and shim run these futures on multi-threaded runtimes.
    #[test]
    fn client_futures_are_send() {
        fn check(
            client: &AgentClient,
            session: &mut ExecSession,
            stdin: &mut ExecStdin,
            stream: &mut OutputStream,
            sink: &mut Vec<u8>,
        ) {
            assert_send(client.exec(ExecRequest::new(["true"])));
            assert_send(client.put_file("/f", 0o644, &b""[..]));
            assert_send(client.get_file("/f", sink));
            assert_send(client.stat("/f"));
            assert_send(client.list("/"));
            assert_send(client.remove("/f", false));
            assert_send(client.health());
            assert_send(client.shutdown(ShutdownAction::Reboot));
            assert_send(session.wait());
            assert_send(session.control().signal(15));
            assert_send(stdin.write(b"x"));
            assert_send(stream.recv());
        }
        // Type-checking `check` is the test.
        let _ = check;
        assert_send(AgentClient::connect_unix("/nonexistent"));
    }
}
