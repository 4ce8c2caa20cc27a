//! Request multiplexing: the connection's shared state, one route per request in flight,
//! and the reader's delivery of the agent's messages along those routes.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::error::reply_name;
use super::{ClientError, MAX_LIST_BYTES, MAX_LIST_ENTRIES};
use crate::flow::{RecvBudget, SendWindow};
use crate::protocol::{AgentMessage, Channel, ClientMessage, ExitStatus, Reply, MAX_CHUNK};

pub(super) type Chunk = Result<Vec<u8>, ClientError>;

/// Where the reader delivers an agent-to-host stream.
pub(super) struct Sink {
    pub(super) tx: mpsc::UnboundedSender<Chunk>,
    pub(super) budget: Arc<RecvBudget>,
}

type Answer = Result<Reply, ClientError>;

/// The replies a request may still get. The reader enforces it, so that an agent cannot make
/// the client queue replies nobody asked for.
#[derive(Debug, Clone, Copy)]
pub(super) enum Expect {
    /// At most this many `Reply` frames (an exec's `ExecStarted`, a get's `GetStarted`, a
    /// put's `PutReady` and `PutDone`, ...).
    Replies(u8),
    /// A listing: `Entries` within these bounds, then `Done`.
    Listing { entries: usize, bytes: usize },
    /// The agent failed the request: nothing more may come for it.
    Ended,
}

/// What the reader does with a reply.
enum Admit {
    Deliver,
    /// A listing past its bounds: fail the request, keep the connection.
    TooLarge(String),
    /// A reply the request cannot have: the agent breaks the protocol.
    Unsolicited,
}

impl Expect {
    fn admit(&mut self, reply: &Reply, frame_len: usize) -> Admit {
        match self {
            Expect::Replies(0) | Expect::Ended => Admit::Unsolicited,
            Expect::Replies(n) => {
                *n -= 1;
                Admit::Deliver
            }
            Expect::Listing { entries, bytes } => match reply {
                Reply::Entries(batch) => {
                    match (
                        entries.checked_sub(batch.len()),
                        bytes.checked_sub(frame_len),
                    ) {
                        (Some(e), Some(b)) => {
                            (*entries, *bytes) = (e, b);
                            Admit::Deliver
                        }
                        (None, _) => Admit::TooLarge(format!(
                            "directory listing exceeds {MAX_LIST_ENTRIES} entries"
                        )),
                        (_, None) => Admit::TooLarge(format!(
                            "directory listing exceeds {MAX_LIST_BYTES} bytes"
                        )),
                    }
                }
                Reply::Done => {
                    *self = Expect::Replies(0);
                    Admit::Deliver
                }
                _ => Admit::Unsolicited,
            },
        }
    }
}

/// Where the reader delivers everything about one request.
pub(super) struct Route {
    pub(super) replies: mpsc::UnboundedSender<Answer>,
    pub(super) expect: Expect,
    pub(super) sinks: Vec<(Channel, Sink)>,
    pub(super) exit: Option<oneshot::Sender<ExitStatus>>,
}

/// The requests in flight and the state of the connection.
#[derive(Default)]
pub(super) struct State {
    pub(super) routes: HashMap<u64, Route>,
    pub(super) windows: HashMap<(u64, Channel), Arc<SendWindow>>,
    /// Why the connection closed, once it has.
    pub(super) closed: Option<String>,
}

impl State {
    fn remove_route(&mut self, id: u64) {
        self.routes.remove(&id);
        for channel in [Channel::Stdin, Channel::File] {
            if let Some(window) = self.windows.remove(&(id, channel)) {
                window.close();
            }
        }
    }
}

/// The connection, as every clone of the client and every handle derived from it sees it.
pub(super) struct Shared {
    pub(super) out: mpsc::UnboundedSender<ClientMessage>,
    pub(super) state: Arc<Mutex<State>>,
    pub(super) next_id: AtomicU64,
    pub(super) agent_version: String,
    pub(super) tasks: [JoinHandle<()>; 2],
}

impl Drop for Shared {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    // Every update is a single insert or remove: a panic cannot leave the maps half-done.
    state.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub(super) fn disconnected(&self) -> ClientError {
        let reason = self.state().closed.clone();
        ClientError::Disconnected(reason.unwrap_or_else(|| "connection closed".to_owned()))
    }

    pub(super) fn send(&self, msg: ClientMessage) -> Result<(), ClientError> {
        if self.state().closed.is_some() {
            return Err(self.disconnected());
        }
        self.out.send(msg).map_err(|_| self.disconnected())
    }

    pub(super) fn credit(&self, id: u64, channel: Channel, budget: &RecvBudget, bytes: usize) {
        if bytes == 0 {
            return;
        }
        // Chunks are at most MAX_CHUNK bytes; sums of a drained queue are bounded by the window.
        let bytes = bytes as u32;
        budget.replenish(bytes);
        // A closed connection needs no credit.
        let _ = self.out.send(ClientMessage::Credit { id, channel, bytes });
    }
}

/// An in-flight request: its replies, and cleanup when dropped.
pub(super) struct Pending {
    pub(super) shared: Arc<Shared>,
    pub(super) id: u64,
    /// Unbounded, but the reader admits only the replies [`Expect`] allows.
    pub(super) replies: mpsc::UnboundedReceiver<Answer>,
    /// Send `Cancel` if dropped before the request completed.
    pub(super) cancel_on_drop: bool,
    /// Remove the route when dropped (an exec's route lives on until `Exited`).
    pub(super) owns_route: bool,
}

impl Pending {
    pub(super) async fn next(&mut self) -> Result<Reply, ClientError> {
        match self.replies.recv().await {
            Some(answer) => answer,
            None => Err(self.shared.disconnected()),
        }
    }

    pub(super) fn complete(&mut self) {
        self.cancel_on_drop = false;
    }

    /// Leaves the route to the reader, which removes it on `Exited`.
    pub(super) fn detach(mut self) {
        self.cancel_on_drop = false;
        self.owns_route = false;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.owns_route {
            self.shared.state().remove_route(self.id);
        }
        if self.cancel_on_drop {
            let _ = self.shared.out.send(ClientMessage::Cancel { id: self.id });
        }
    }
}

/// Marks the connection closed and fails everything in flight.
pub(super) fn close(state: &Mutex<State>, reason: String) {
    let mut state = lock(state);
    if state.closed.is_some() {
        return;
    }
    for (_, route) in state.routes.drain() {
        for (_, sink) in route.sinks {
            let _ = sink.tx.send(Err(ClientError::Disconnected(reason.clone())));
        }
        // Dropping `replies` and `exit` wakes their waiters, who read `closed`.
    }
    for (_, window) in state.windows.drain() {
        window.close();
    }
    state.closed = Some(reason);
}

/// Routes one message (a frame of `frame_len` bytes) from the agent; `Err` closes the
/// connection with that reason. Nothing is queued that the protocol does not allow: replies
/// beyond what a request expects close the connection, output beyond its credit too, and
/// frames for no live request are dropped.
pub(super) fn deliver(
    state: &Mutex<State>,
    out: &mpsc::UnboundedSender<ClientMessage>,
    msg: AgentMessage,
    frame_len: usize,
) -> Result<(), String> {
    let mut state = lock(state);
    match msg {
        AgentMessage::Hello { .. } => return Err("agent sent a second Hello".to_owned()),
        AgentMessage::Fatal(e) => return Err(format!("agent closed the connection: {e}")),
        AgentMessage::Reply { id, reply } => {
            if let Some(route) = state.routes.get_mut(&id) {
                match route.expect.admit(&reply, frame_len) {
                    Admit::Deliver => {
                        let _ = route.replies.send(Ok(reply));
                    }
                    Admit::TooLarge(why) => {
                        // The requester sees this error, then cancels; what else arrives
                        // for `id` finds no route and is dropped.
                        let _ = route.replies.send(Err(ClientError::AnswerTooLarge(why)));
                        state.remove_route(id);
                    }
                    Admit::Unsolicited => {
                        return Err(format!(
                            "agent sent an unsolicited reply to request {id}: {}",
                            reply_name(&reply)
                        ))
                    }
                }
            }
        }
        AgentMessage::Failed { id, error } => {
            if let Some(route) = state.routes.get_mut(&id) {
                if matches!(route.expect, Expect::Ended) {
                    return Err(format!("agent failed request {id} a second time: {error}"));
                }
                route.expect = Expect::Ended;
                for (_, sink) in route.sinks.drain(..) {
                    let _ = sink.tx.send(Err(ClientError::Remote(error.clone())));
                }
                let _ = route.replies.send(Err(ClientError::Remote(error)));
                if route.exit.is_some() {
                    state.remove_route(id);
                }
            }
        }
        AgentMessage::Data { id, channel, data } => {
            if data.len() > MAX_CHUNK {
                return Err(format!("data chunk of {} bytes", data.len()));
            }
            // Leftovers of a finished or cancelled request are dropped.
            let Some(route) = state.routes.get(&id) else {
                return Ok(());
            };
            let Some((_, sink)) = route.sinks.iter().find(|(c, _)| *c == channel) else {
                return Err(format!(
                    "agent sent {channel:?} data for request {id}, which has no such open stream"
                ));
            };
            if !sink.budget.consume(data.len()) {
                return Err(format!(
                    "{channel:?} data of request {id} beyond its credit"
                ));
            }
            let len = data.len();
            if sink.tx.send(Ok(data)).is_err() {
                // Nobody reads this stream any more: keep the agent going.
                // The chunk size was checked against MAX_CHUNK above.
                sink.budget.replenish(len as u32);
                let _ = out.send(ClientMessage::Credit {
                    id,
                    channel,
                    bytes: len as u32,
                });
            }
        }
        AgentMessage::Eof { id, channel } => {
            if let Some(route) = state.routes.get_mut(&id) {
                route.sinks.retain(|(c, _)| *c != channel);
            }
        }
        AgentMessage::Credit { id, channel, bytes } => {
            if let Some(window) = state.windows.get(&(id, channel)) {
                window.grant(u64::from(bytes));
            }
        }
        AgentMessage::Exited { id, status } => {
            if let Some(exit) = state.routes.get_mut(&id).and_then(|r| r.exit.take()) {
                let _ = exit.send(status);
                state.remove_route(id);
            }
        }
    }
    Ok(())
}
