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

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;

use crate::flow::{RecvBudget, SendWindow};
use crate::protocol::{
    decode_payload, encode_frame, read_frame, AgentMessage, Channel, ClientMessage, DirEntry,
    ErrorKind, ExecRequest, ExitStatus, FileStat, FrameError, Health, MountRequest, RemoteError,
    Reply, Request, ShutdownAction, MAGIC, MAX_CHUNK, MAX_FRAME_LEN, PROTOCOL_VERSION,
};

/// How long `connect_*` waits for the agent's `Hello` (and the vsock proxy's `OK`).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes the writer gathers from queued frames into one write.
const WRITE_BATCH: usize = 256 * 1024;
/// Longest accepted reply line from a hybrid vsock proxy.
const MAX_PROXY_LINE: usize = 64;
/// Most directory entries `list` accepts (the guest is not trusted with host memory).
pub const MAX_LIST_ENTRIES: usize = 1 << 18;
/// Most bytes of `Entries` frames `list` accepts, so that long names cannot stand in for
/// many entries.
pub const MAX_LIST_BYTES: usize = 16 << 20;
/// Most bytes of each stream [`ExecSession::wait_with_output`] keeps.
pub const DEFAULT_OUTPUT_LIMIT: usize = 16 << 20;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("connecting to {target}: {source}")]
    Connect {
        /// What was being connected to.
        target: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The VMM's hybrid vsock socket did not accept `CONNECT <port>` (is the agent up?).
    #[error("vsock proxy {path} refused CONNECT {port}: {reply:?}")]
    VsockRefused {
        /// The VMM's unix socket.
        path: String,
        /// Guest port.
        port: u32,
        /// What the proxy answered.
        reply: String,
    },
    /// The agent did not answer the handshake in time.
    #[error("agent did not complete the handshake within {0:?}")]
    HandshakeTimeout(Duration),
    /// The agent speaks another protocol version.
    #[error("protocol version mismatch: client speaks {client}, agent speaks {agent}")]
    VersionMismatch {
        /// Our version.
        client: u32,
        /// The agent's.
        agent: u32,
    },
    /// The agent reported an error for the request.
    #[error("agent: {0}")]
    Remote(#[from] RemoteError),
    /// The connection is gone; no further request can succeed on this client.
    #[error("connection to the agent lost: {0}")]
    Disconnected(String),
    /// The agent sent something the protocol does not allow.
    #[error("agent broke the protocol: {0}")]
    Protocol(String),
    /// Writing stdin after the exec finished.
    #[error("the exec has finished; its stdin is closed")]
    StdinClosed,
    /// A local reader or writer (the source of `put_file`, the sink of `get_file`) failed.
    #[error("local I/O: {0}")]
    Io(#[from] io::Error),
    /// A request does not fit in one protocol frame; it was not sent and the connection is
    /// still usable.
    #[error(
        "the request takes {bytes} bytes encoded, more than the agent protocol's \
         {MAX_FRAME_LEN}-byte frame: make its argv and environment smaller"
    )]
    RequestTooLarge {
        /// Encoded size of the request.
        bytes: u64,
    },
    /// The agent's answer is larger than the client accepts (the request was cancelled).
    #[error("{0}")]
    AnswerTooLarge(String),
}

impl ClientError {
    /// The kind of the agent's error, when the agent reported one.
    pub fn remote_kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Remote(e) => Some(e.kind),
            _ => None,
        }
    }
}

type Chunk = Result<Vec<u8>, ClientError>;

/// Where the reader delivers an agent-to-host stream.
struct Sink {
    tx: mpsc::UnboundedSender<Chunk>,
    budget: Arc<RecvBudget>,
}

type Answer = Result<Reply, ClientError>;

/// The replies a request may still get. The reader enforces it, so that an agent cannot make
/// the client queue replies nobody asked for.
#[derive(Debug, Clone, Copy)]
enum Expect {
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
struct Route {
    replies: mpsc::UnboundedSender<Answer>,
    expect: Expect,
    sinks: Vec<(Channel, Sink)>,
    exit: Option<oneshot::Sender<ExitStatus>>,
}

#[derive(Default)]
struct State {
    routes: HashMap<u64, Route>,
    windows: HashMap<(u64, Channel), Arc<SendWindow>>,
    /// Why the connection closed, once it has.
    closed: Option<String>,
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

struct Shared {
    out: mpsc::UnboundedSender<ClientMessage>,
    state: Arc<Mutex<State>>,
    next_id: AtomicU64,
    agent_version: String,
    tasks: [JoinHandle<()>; 2],
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
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn disconnected(&self) -> ClientError {
        let reason = self.state().closed.clone();
        ClientError::Disconnected(reason.unwrap_or_else(|| "connection closed".to_owned()))
    }

    fn send(&self, msg: ClientMessage) -> Result<(), ClientError> {
        if self.state().closed.is_some() {
            return Err(self.disconnected());
        }
        self.out.send(msg).map_err(|_| self.disconnected())
    }

    fn credit(&self, id: u64, channel: Channel, budget: &RecvBudget, bytes: usize) {
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
struct Pending {
    shared: Arc<Shared>,
    id: u64,
    /// Unbounded, but the reader admits only the replies [`Expect`] allows.
    replies: mpsc::UnboundedReceiver<Answer>,
    /// Send `Cancel` if dropped before the request completed.
    cancel_on_drop: bool,
    /// Remove the route when dropped (an exec's route lives on until `Exited`).
    owns_route: bool,
}

impl Pending {
    async fn next(&mut self) -> Result<Reply, ClientError> {
        match self.replies.recv().await {
            Some(answer) => answer,
            None => Err(self.shared.disconnected()),
        }
    }

    fn complete(&mut self) {
        self.cancel_on_drop = false;
    }

    /// Leaves the route to the reader, which removes it on `Exited`.
    fn detach(mut self) {
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

/// The variant of `reply`, for messages that must not print what an agent stuffed into it.
fn reply_name(reply: &Reply) -> &'static str {
    match reply {
        Reply::ExecStarted { .. } => "ExecStarted",
        Reply::Done => "Done",
        Reply::PutReady => "PutReady",
        Reply::PutDone { .. } => "PutDone",
        Reply::GetStarted { .. } => "GetStarted",
        Reply::Stat(_) => "Stat",
        Reply::Entries(_) => "Entries",
        Reply::Health(_) => "Health",
    }
}

fn unexpected(reply: Reply, what: &str) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {} to {what}", reply_name(&reply)))
}

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
    /// Connects to an agent listening on a unix socket (host process, `jail` tier).
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                target: path.display().to_string(),
                source,
            })?;
        Self::from_stream(stream).await
    }

    /// Connects to the agent in a VM through the VMM's hybrid vsock unix socket
    /// (Firecracker convention): sends `CONNECT <port>\n`, expects `OK <host port>\n`,
    /// then speaks the protocol on the same stream.
    pub async fn connect_hybrid_vsock(
        uds_path: impl AsRef<Path>,
        port: u32,
    ) -> Result<Self, ClientError> {
        let path = uds_path.as_ref();
        let target = path.display().to_string();
        let mut stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                target: target.clone(),
                source,
            })?;
        let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
            stream
                .write_all(format!("CONNECT {port}\n").as_bytes())
                .await?;
            read_proxy_line(&mut stream).await
        })
        .await
        .map_err(|_| ClientError::HandshakeTimeout(HANDSHAKE_TIMEOUT))?
        .map_err(|source| ClientError::Connect {
            target: target.clone(),
            source,
        })?;
        if !reply.starts_with("OK ") {
            return Err(ClientError::VsockRefused {
                path: target,
                port,
                reply,
            });
        }
        Self::from_stream(stream).await
    }

    /// Speaks the protocol over an already connected stream.
    pub async fn from_stream<S>(stream: S) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let agent_version =
            tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut reader, &mut writer))
                .await
                .map_err(|_| ClientError::HandshakeTimeout(HANDSHAKE_TIMEOUT))??;
        let (out, rx) = mpsc::unbounded_channel();
        let state = Arc::new(Mutex::new(State::default()));
        let hang_up = Arc::new(Notify::new());
        let write_task = tokio::spawn(write_loop(
            writer,
            rx,
            Arc::clone(&state),
            Arc::clone(&hang_up),
        ));
        let read_task = tokio::spawn(read_loop(reader, Arc::clone(&state), out.clone(), hang_up));
        Ok(Self {
            shared: Arc::new(Shared {
                out,
                state,
                next_id: AtomicU64::new(1),
                agent_version,
                tasks: [write_task, read_task],
            }),
        })
    }

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

    fn output_stream(&self, id: u64, channel: Channel) -> (Sink, OutputStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(RecvBudget::new());
        let stream = OutputStream {
            shared: Arc::clone(&self.shared),
            id,
            channel,
            rx,
            budget: Arc::clone(&budget),
        };
        (Sink { tx, budget }, stream)
    }

    /// Starts a process. Its stdout and stderr must be read (or dropped) for it to make
    /// progress: the agent stops reading a stream whose credit is used up.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecSession, ClientError> {
        let id = self.next_id();
        let (stdout_sink, stdout) = self.output_stream(id, Channel::Stdout);
        let (stderr_sink, stderr) = self.output_stream(id, Channel::Stderr);
        let (exit_tx, exit) = oneshot::channel();
        let window = request.stdin.then(|| Arc::new(SendWindow::new()));
        let mut pending = self.begin(
            id,
            Request::Exec(request),
            Expect::Replies(1),
            vec![
                (Channel::Stdout, stdout_sink),
                (Channel::Stderr, stderr_sink),
            ],
            Some(exit_tx),
            window.clone().map(|w| (Channel::Stdin, w)),
        )?;
        let pid = match pending.next().await? {
            Reply::ExecStarted { pid } => pid,
            other => return Err(unexpected(other, "Exec")),
        };
        pending.detach();
        Ok(ExecSession {
            control: ExecControl {
                client: self.clone(),
                id,
            },
            pid,
            stdin: window.map(|window| ExecStdin {
                shared: Arc::clone(&self.shared),
                id,
                window,
                closed: false,
            }),
            stdout: Some(stdout),
            stderr: Some(stderr),
            exit,
            status: None,
        })
    }

    /// Writes `data` to `path` in the guest with permission bits `mode`, atomically (a
    /// temporary file renamed into place). Returns the bytes written.
    pub async fn put_file<R>(&self, path: &str, mode: u32, mut data: R) -> Result<u64, ClientError>
    where
        R: AsyncRead + Unpin,
    {
        let window = Arc::new(SendWindow::new());
        let mut pending = self.begin(
            self.next_id(),
            Request::Put {
                path: path.to_owned(),
                mode,
            },
            Expect::Replies(2),
            Vec::new(),
            None,
            Some((Channel::File, Arc::clone(&window))),
        )?;
        match pending.next().await? {
            Reply::PutReady => {}
            other => return Err(unexpected(other, "Put")),
        }
        let id = pending.id;
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let credit = tokio::select! {
                credit = window.take(MAX_CHUNK) => credit.ok_or_else(|| self.shared.disconnected())?,
                // The agent failed the transfer (disk full, ...) while we wait for credit.
                reply = pending.next() => return Err(match reply {
                    Ok(other) => unexpected(other, "Put data"),
                    Err(e) => e,
                }),
            };
            let n = data.read(&mut buf[..credit]).await?;
            window.grant((credit - n) as u64);
            if n == 0 {
                break;
            }
            self.shared.send(ClientMessage::Data {
                id,
                channel: Channel::File,
                data: buf[..n].to_vec(),
            })?;
        }
        self.shared.send(ClientMessage::Eof {
            id,
            channel: Channel::File,
        })?;
        let reply = pending.next().await?;
        pending.complete();
        match reply {
            Reply::PutDone { bytes } => Ok(bytes),
            other => Err(unexpected(other, "Put")),
        }
    }

    /// Copies the regular file `path` from the guest into `sink`; returns its metadata.
    pub async fn get_file<W>(&self, path: &str, sink: &mut W) -> Result<FileStat, ClientError>
    where
        W: AsyncWrite + Unpin,
    {
        let id = self.next_id();
        let (file_sink, mut stream) = self.output_stream(id, Channel::File);
        let mut pending = self.begin(
            id,
            Request::Get {
                path: path.to_owned(),
            },
            Expect::Replies(1),
            vec![(Channel::File, file_sink)],
            None,
            None,
        )?;
        let stat = match pending.next().await? {
            Reply::GetStarted { stat } => stat,
            other => return Err(unexpected(other, "Get")),
        };
        while let Some(chunk) = stream.recv().await? {
            sink.write_all(&chunk).await?;
        }
        sink.flush().await?;
        pending.complete();
        Ok(stat)
    }

    /// Metadata of `path`, following symlinks.
    pub async fn stat(&self, path: &str) -> Result<FileStat, ClientError> {
        match self
            .call(Request::Stat {
                path: path.to_owned(),
            })
            .await?
        {
            Reply::Stat(stat) => Ok(stat),
            other => Err(unexpected(other, "Stat")),
        }
    }

    /// Entries of directory `path`, sorted by name (symlinks not followed); at most
    /// [`MAX_LIST_ENTRIES`] in at most [`MAX_LIST_BYTES`] (else `AnswerTooLarge`).
    pub async fn list(&self, path: &str) -> Result<Vec<DirEntry>, ClientError> {
        let mut pending = self.begin(
            self.next_id(),
            Request::List {
                path: path.to_owned(),
            },
            Expect::Listing {
                entries: MAX_LIST_ENTRIES,
                bytes: MAX_LIST_BYTES,
            },
            Vec::new(),
            None,
            None,
        )?;
        let mut entries = Vec::new();
        loop {
            match pending.next().await? {
                Reply::Entries(batch) => entries.extend(batch),
                Reply::Done => break,
                other => return Err(unexpected(other, "List")),
            }
        }
        pending.complete();
        Ok(entries)
    }

    /// Removes a file, symlink or directory (with its content when `recursive`).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), ClientError> {
        self.call_done(
            Request::Remove {
                path: path.to_owned(),
                recursive,
            },
            "Remove",
        )
        .await
    }

    /// Mounts a file system in the sandbox (see [`Request::Mount`]).
    pub async fn mount(&self, request: MountRequest) -> Result<(), ClientError> {
        self.call_done(Request::Mount(request), "Mount").await
    }

    /// Detaches the mount at `target` and everything below it.
    pub async fn unmount(&self, target: &str) -> Result<(), ClientError> {
        self.call_done(
            Request::Unmount {
                target: target.to_owned(),
            },
            "Unmount",
        )
        .await
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
}

async fn read_proxy_line<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<String> {
    // Byte by byte: whatever follows the newline belongs to the agent connection.
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() == MAX_PROXY_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "vsock proxy reply line too long",
            ));
        }
        line.push(byte);
    }
}

async fn handshake<R, W>(reader: &mut R, writer: &mut W) -> Result<String, ClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frame = Vec::new();
    encode_frame(
        &ClientMessage::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
        },
        &mut frame,
    )
    .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let io_error = |e: io::Error| ClientError::Disconnected(format!("during handshake: {e}"));
    writer.write_all(&frame).await.map_err(io_error)?;
    let mut buf = Vec::new();
    match read_frame(reader, &mut buf).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(ClientError::Disconnected(
                "agent closed the connection during the handshake".to_owned(),
            ))
        }
        Err(FrameError::Io(e)) => return Err(io_error(e)),
        Err(e) => return Err(ClientError::Protocol(e.to_string())),
    }
    match decode_payload(&buf).map_err(|e| ClientError::Protocol(e.to_string()))? {
        AgentMessage::Hello {
            magic,
            version,
            agent_version,
        } if magic == MAGIC => {
            if version != PROTOCOL_VERSION {
                return Err(ClientError::VersionMismatch {
                    client: PROTOCOL_VERSION,
                    agent: version,
                });
            }
            Ok(agent_version)
        }
        AgentMessage::Fatal(e) if e.kind == ErrorKind::VersionMismatch => {
            Err(ClientError::Remote(e))
        }
        other => Err(ClientError::Protocol(format!(
            "expected Hello, got {other:?}"
        ))),
    }
}

/// Marks the connection closed and fails everything in flight.
fn close(state: &Mutex<State>, reason: String) {
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

/// Writes queued messages until the queue closes or the reader hangs up (dropping the
/// write half then closes the connection).
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<ClientMessage>,
    state: Arc<Mutex<State>>,
    hang_up: Arc<Notify>,
) {
    let mut buf = Vec::with_capacity(WRITE_BATCH + MAX_CHUNK);
    loop {
        let first = tokio::select! {
            msg = rx.recv() => match msg {
                Some(msg) => msg,
                None => return,
            },
            () = hang_up.notified() => return,
        };
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            if let Err(e) = encode_frame(&msg, &mut buf) {
                close(&state, format!("encoding a request: {e}"));
                return;
            }
            if buf.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = writer.write_all(&buf).await {
            close(&state, format!("writing to the agent: {e}"));
            return;
        }
        buf.clear();
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    state: Arc<Mutex<State>>,
    out: mpsc::UnboundedSender<ClientMessage>,
    hang_up: Arc<Notify>,
) {
    let mut buf = Vec::new();
    let reason = loop {
        match read_frame(&mut reader, &mut buf).await {
            Ok(true) => {}
            Ok(false) => break "agent closed the connection".to_owned(),
            Err(e) => break e.to_string(),
        }
        let msg: AgentMessage = match decode_payload(&buf) {
            Ok(msg) => msg,
            Err(e) => break format!("agent sent a bad frame: {e}"),
        };
        if let Err(reason) = deliver(&state, &out, msg, buf.len()) {
            break reason;
        }
    };
    close(&state, reason);
    hang_up.notify_one();
}

/// Routes one message (a frame of `frame_len` bytes) from the agent; `Err` closes the
/// connection with that reason. Nothing is queued that the protocol does not allow: replies
/// beyond what a request expects close the connection, output beyond its credit too, and
/// frames for no live request are dropped.
fn deliver(
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

/// A running process started by [`AgentClient::exec`].
///
/// Take `stdin`, `stdout` and `stderr` to stream them, or use [`wait_with_output`].
/// Dropping the session does not kill the process; its untaken output is discarded.
/// [`control`] gives a cloneable handle for signalling or resizing from other tasks.
///
/// [`wait_with_output`]: ExecSession::wait_with_output
/// [`control`]: ExecSession::control
pub struct ExecSession {
    control: ExecControl,
    pid: u32,
    /// The process's stdin, when the request enabled it.
    pub stdin: Option<ExecStdin>,
    /// The process's stdout (the terminal output with a pty).
    pub stdout: Option<OutputStream>,
    /// The process's stderr (empty with a pty).
    pub stderr: Option<OutputStream>,
    exit: oneshot::Receiver<ExitStatus>,
    status: Option<ExitStatus>,
}

/// What an exec produced, up to a limit per stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// Stdout, or its first `limit` bytes.
    pub stdout: Vec<u8>,
    /// Stderr, or its first `limit` bytes.
    pub stderr: Vec<u8>,
    /// Stdout went on past the limit; the rest was discarded.
    pub stdout_truncated: bool,
    /// Stderr went on past the limit; the rest was discarded.
    pub stderr_truncated: bool,
}

/// Signals and resizes an exec; cheap to clone and usable while another task waits.
#[derive(Clone, Debug)]
pub struct ExecControl {
    client: AgentClient,
    id: u64,
}

impl ExecControl {
    /// The exec's request id on its connection.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the exec's process group. Fails with
    /// `NoSuchExec` once the exec has finished.
    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.client
            .call_done(
                Request::Signal {
                    exec: self.id,
                    signal,
                },
                "Signal",
            )
            .await
    }

    /// Resizes the pty (fails for an exec without one).
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.client
            .call_done(
                Request::Resize {
                    exec: self.id,
                    size: crate::protocol::PtySize { rows, cols },
                },
                "Resize",
            )
            .await
    }
}

impl ExecSession {
    /// The exec's request id on its connection.
    pub fn id(&self) -> u64 {
        self.control.id
    }

    /// The process id in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle to signal or resize this exec from elsewhere.
    pub fn control(&self) -> ExecControl {
        self.control.clone()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process group.
    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.control.signal(signal).await
    }

    /// Resizes the pty (fails for an exec without one).
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.control.resize(rows, cols).await
    }

    /// Closes stdin, discards output not taken, and waits for the exit status. Can be
    /// called again (or raced in `select!`) and returns the same status.
    pub async fn wait(&mut self) -> Result<ExitStatus, ClientError> {
        self.stdin.take();
        self.stdout.take();
        self.stderr.take();
        self.exit_status().await
    }

    /// [`wait_with_output_limited`](Self::wait_with_output_limited) to
    /// [`DEFAULT_OUTPUT_LIMIT`] bytes per stream.
    pub async fn wait_with_output(self) -> Result<Output, ClientError> {
        self.wait_with_output_limited(DEFAULT_OUTPUT_LIMIT).await
    }

    /// Closes stdin, collects at most `limit` bytes of stdout and of stderr (those not
    /// taken), and waits for the exit. Output past the limit is still read, so the process
    /// runs on as it would into a pipe, and discarded; `Output` says which stream was cut.
    pub async fn wait_with_output_limited(mut self, limit: usize) -> Result<Output, ClientError> {
        self.stdin.take();
        let (out, err) = tokio::join!(
            read_limited(self.stdout.take(), limit),
            read_limited(self.stderr.take(), limit)
        );
        let status = self.exit_status().await?;
        let ((stdout, stdout_truncated), (stderr, stderr_truncated)) = (out?, err?);
        Ok(Output {
            status,
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
        })
    }

    async fn exit_status(&mut self) -> Result<ExitStatus, ClientError> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = (&mut self.exit)
            .await
            .map_err(|_| self.control.client.shared.disconnected())?;
        self.status = Some(status);
        Ok(status)
    }
}

async fn read_limited(
    stream: Option<OutputStream>,
    limit: usize,
) -> Result<(Vec<u8>, bool), ClientError> {
    match stream {
        Some(mut stream) => stream.read_limited(limit).await,
        None => Ok((Vec::new(), false)),
    }
}

/// The stdin of an exec. Dropping it closes the process's stdin.
pub struct ExecStdin {
    shared: Arc<Shared>,
    id: u64,
    window: Arc<SendWindow>,
    closed: bool,
}

impl ExecStdin {
    /// Writes all of `data`, waiting while the agent's window is full (the process does
    /// not read).
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), ClientError> {
        while !data.is_empty() {
            let Some(n) = self.window.take(data.len().min(MAX_CHUNK)).await else {
                return Err(if self.shared.state().closed.is_some() {
                    self.shared.disconnected()
                } else {
                    ClientError::StdinClosed
                });
            };
            self.shared.send(ClientMessage::Data {
                id: self.id,
                channel: Channel::Stdin,
                data: data[..n].to_vec(),
            })?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Writes all of `data`, then closes stdin. A process that ends without reading all of
    /// it is no error (as with a pipe into a process that exits).
    pub async fn feed(mut self, data: &[u8]) -> Result<(), ClientError> {
        match self.write(data).await {
            Ok(()) => self.close(),
            Err(ClientError::StdinClosed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Closes the process's stdin (with a pty: sends ^D).
    pub fn close(mut self) -> Result<(), ClientError> {
        self.closed = true;
        self.shared.send(ClientMessage::Eof {
            id: self.id,
            channel: Channel::Stdin,
        })
    }
}

impl Drop for ExecStdin {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self.shared.out.send(ClientMessage::Eof {
                id: self.id,
                channel: Channel::Stdin,
            });
        }
    }
}

/// An output stream of an exec (or a file being fetched). Dropping it discards the rest.
pub struct OutputStream {
    shared: Arc<Shared>,
    id: u64,
    channel: Channel,
    rx: mpsc::UnboundedReceiver<Chunk>,
    budget: Arc<RecvBudget>,
}

impl OutputStream {
    /// Next chunk, or `None` at the end of the stream. Receiving a chunk lets the agent
    /// send that many more bytes.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        match self.rx.recv().await {
            Some(Ok(chunk)) => {
                self.shared
                    .credit(self.id, self.channel, &self.budget, chunk.len());
                Ok(Some(chunk))
            }
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }

    /// Reads the stream to its end, keeping all of it: only for output known to be small
    /// (see [`read_limited`](Self::read_limited)).
    pub async fn read_to_end(&mut self) -> Result<Vec<u8>, ClientError> {
        let mut all = Vec::new();
        while let Some(chunk) = self.recv().await? {
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }

    /// Reads the stream to its end, keeping its first `limit` bytes; `true` when there was
    /// more (read and discarded).
    pub async fn read_limited(&mut self, limit: usize) -> Result<(Vec<u8>, bool), ClientError> {
        let mut kept = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = self.recv().await? {
            let room = limit - kept.len();
            truncated |= chunk.len() > room;
            kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        Ok((kept, truncated))
    }
}

impl Drop for OutputStream {
    fn drop(&mut self) {
        // From now on the reader credits new data itself; credit what is queued.
        self.rx.close();
        let mut queued = 0;
        while let Ok(chunk) = self.rx.try_recv() {
            if let Ok(chunk) = chunk {
                queued += chunk.len();
            }
        }
        self.shared
            .credit(self.id, self.channel, &self.budget, queued);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
