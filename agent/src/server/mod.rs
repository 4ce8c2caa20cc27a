//! The agent side: listeners, connections and request dispatch.

mod exec;
mod fdio;
mod files;
mod identity;
mod mounts;
mod reaper;

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::AbortHandle;

use crate::flow::{RecvBudget, SendWindow};
use crate::protocol::{
    decode_payload, encode_frame, read_frame, AgentMessage, Channel, ClientMessage, ErrorKind,
    FrameError, Health, RemoteError, Reply, Request, ShutdownAction, AGENT_VERSION, MAGIC,
    MAX_CHUNK, PROTOCOL_VERSION,
};
use reaper::Reaper;

/// Frames queued for a connection's writer before producers wait.
const OUTBOX_DEPTH: usize = 256;
/// Bytes the writer gathers from queued frames into one write.
const WRITE_BATCH: usize = 256 * 1024;
/// After a `Fatal` frame, how long and how much input is drained before closing.
const LINGER_TIME: Duration = Duration::from_millis(200);
const LINGER_BYTES: usize = 4 << 20;

/// Where the agent listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// AF_VSOCK on this port, any CID (inside a guest).
    Vsock(u32),
    /// A unix socket at this path (host process, `jail` tier, tests).
    Unix(PathBuf),
}

/// Errors parsing a [`ListenAddr`].
#[derive(Debug, thiserror::Error)]
#[error("invalid listen address {0:?}: expected vsock:PORT or unix:PATH")]
pub struct ListenAddrError(String);

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(port) = s.strip_prefix("vsock:") {
            return port
                .parse()
                .map(Self::Vsock)
                .map_err(|_| ListenAddrError(s.to_owned()));
        }
        match s.strip_prefix("unix:") {
            Some(path) if !path.is_empty() => Ok(Self::Unix(PathBuf::from(path))),
            _ => Err(ListenAddrError(s.to_owned())),
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Vsock(port) => write!(f, "vsock:{port}"),
            Self::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A bound listening socket.
#[derive(Debug)]
pub enum Listener {
    /// vsock listener.
    Vsock(tokio_vsock::VsockListener),
    /// Unix socket listener.
    Unix(tokio::net::UnixListener),
}

trait Connection: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Connection for T {}

impl Listener {
    /// Binds `addr`. A stale unix socket file at the path is replaced.
    pub fn bind(addr: &ListenAddr) -> io::Result<Self> {
        match addr {
            ListenAddr::Vsock(port) => Ok(Self::Vsock(tokio_vsock::VsockListener::bind(
                tokio_vsock::VsockAddr::new(tokio_vsock::VMADDR_CID_ANY, *port),
            )?)),
            ListenAddr::Unix(path) => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    if meta.file_type().is_socket() {
                        std::fs::remove_file(path)?;
                    }
                }
                Ok(Self::Unix(tokio::net::UnixListener::bind(path)?))
            }
        }
    }

    async fn accept(&self) -> io::Result<Box<dyn Connection>> {
        Ok(match self {
            Self::Vsock(l) => Box::new(l.accept().await?.0),
            Self::Unix(l) => Box::new(l.accept().await?.0),
        })
    }
}

/// The agent: serves connections until a `Shutdown` request.
#[derive(Debug)]
pub struct Agent {
    reaper: Arc<Reaper>,
    started: Instant,
    init: bool,
    shutdown: watch::Sender<Option<ShutdownAction>>,
}

impl Agent {
    /// Creates the agent; `init` tells whether it is the guest's init. Must be called
    /// inside a tokio runtime (it starts reaping children on SIGCHLD).
    pub fn new(init: bool) -> io::Result<Arc<Self>> {
        // Orphaned grandchildren of execs are re-parented to the agent and reaped by it
        // (PID 1 gets them anyway; a host-process or tiny-init-started agent needs this).
        // SAFETY: prctl(PR_SET_CHILD_SUBREAPER) takes integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // The programs the agent runs share its uid in the jail tier: non-dumpable, its
        // /proc/<pid>/fd (its stdout is the host's console log), mem, environ... are closed to
        // them and ptrace is refused. Their execve makes them dumpable again.
        // SAFETY: prctl(PR_SET_DUMPABLE) takes integer arguments only.
        if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Arc::new(Self {
            reaper: Reaper::start()?,
            started: Instant::now(),
            init,
            shutdown: watch::channel(None).0,
        }))
    }

    /// Accepts and serves connections until a client requests a shutdown, which is
    /// returned. Every connection runs in its own task.
    pub async fn serve(self: &Arc<Self>, listener: Listener) -> ShutdownAction {
        let mut shutdown = self.shutdown.subscribe();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(stream) => {
                        let agent = Arc::clone(self);
                        tokio::spawn(async move { agent.serve_connection(stream).await });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        crate::log!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                changed = shutdown.changed() => {
                    if changed.is_ok() {
                        if let Some(action) = *shutdown.borrow() {
                            return action;
                        }
                    }
                }
            }
        }
    }

    /// Kills the process group of every process the agent spawned.
    pub fn kill_children(&self) {
        self.reaper.kill_all(libc::SIGKILL);
    }

    fn health(&self) -> Health {
        Health {
            agent_version: AGENT_VERSION.to_owned(),
            protocol_version: PROTOCOL_VERSION,
            uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            init: self.init,
        }
    }

    async fn serve_connection(self: Arc<Self>, stream: Box<dyn Connection>) {
        let (mut reader, writer) = tokio::io::split(stream);
        let (tx, rx) = mpsc::channel(OUTBOX_DEPTH);
        let conn = Conn {
            agent: self,
            out: Outbox(tx),
            tables: Arc::default(),
        };
        let write_task = write_loop(writer, rx);
        tokio::pin!(write_task);
        tokio::select! {
            () = conn.read_loop(&mut reader) => {}
            result = &mut write_task => {
                if let Err(e) = result {
                    crate::log!("connection write failed: {e}");
                }
            }
        }
        conn.teardown();
    }
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::Receiver<Outgoing>,
) -> io::Result<()> {
    let mut buf = Vec::with_capacity(WRITE_BATCH + MAX_CHUNK);
    let mut flushed = Vec::new();
    // Nothing follows a `Fatal` frame, though tasks of the connection may still queue some.
    let mut fatal_sent = false;
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Outgoing::Message(_) if fatal_sent => {}
                Outgoing::Message(msg) => {
                    fatal_sent = matches!(msg, AgentMessage::Fatal(_));
                    if let Err(e) = encode_frame(&msg, &mut buf) {
                        crate::log!("dropping unencodable message: {e}");
                    }
                }
                Outgoing::Flush(done) => flushed.push(done),
            }
            if buf.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        writer.write_all(&buf).await?;
        buf.clear();
        for done in flushed.drain(..) {
            let _ = done.send(());
        }
    }
    Ok(())
}

enum Outgoing {
    Message(AgentMessage),
    Flush(oneshot::Sender<()>),
}

/// Queue of frames to one connection.
#[derive(Clone)]
struct Outbox(mpsc::Sender<Outgoing>);

impl Outbox {
    /// Queues `msg`; `false` once the connection is gone.
    async fn send(&self, msg: AgentMessage) -> bool {
        self.0.send(Outgoing::Message(msg)).await.is_ok()
    }

    async fn reply(&self, id: u64, reply: Reply) -> bool {
        self.send(AgentMessage::Reply { id, reply }).await
    }

    async fn fail(&self, id: u64, error: RemoteError) -> bool {
        self.send(AgentMessage::Failed { id, error }).await
    }

    /// Waits until everything queued so far is written.
    async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.0.send(Outgoing::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// A message for the task consuming a host-to-agent stream.
enum InboundItem {
    Data(Vec<u8>),
    Eof,
}

/// The reader's end of a host-to-agent stream.
struct InboundEntry {
    tx: mpsc::UnboundedSender<InboundItem>,
    budget: Arc<RecvBudget>,
}

/// The consumer's end of a host-to-agent stream; it returns credit as it goes.
struct InboundStream {
    rx: mpsc::UnboundedReceiver<InboundItem>,
    budget: Arc<RecvBudget>,
    out: Outbox,
    id: u64,
    channel: Channel,
}

impl InboundStream {
    /// Next item; `None` when the stream was cancelled or the connection closed.
    async fn next(&mut self) -> Option<InboundItem> {
        self.rx.recv().await
    }

    /// Gives `bytes` of credit back to the host.
    async fn consumed(&self, bytes: usize) {
        // Data chunks are at most MAX_CHUNK bytes.
        let bytes = bytes as u32;
        self.budget.replenish(bytes);
        self.out
            .send(AgentMessage::Credit {
                id: self.id,
                channel: self.channel,
                bytes,
            })
            .await;
    }
}

/// A running exec, as seen by its connection.
struct ExecEntry {
    pgid: i32,
    pty: Option<Arc<fdio::AsyncFile>>,
    task: AbortHandle,
}

/// Per-connection state shared by the reader and the request tasks.
#[derive(Default)]
struct Tables {
    execs: HashMap<u64, ExecEntry>,
    inbound: HashMap<(u64, Channel), InboundEntry>,
    outbound: HashMap<(u64, Channel), Arc<SendWindow>>,
}

/// One client connection.
#[derive(Clone)]
struct Conn {
    agent: Arc<Agent>,
    out: Outbox,
    tables: Arc<Mutex<Tables>>,
}

fn protocol_error(message: impl Into<String>) -> RemoteError {
    RemoteError::new(ErrorKind::Protocol, message)
}

impl Conn {
    fn tables(&self) -> MutexGuard<'_, Tables> {
        // Every table update is a single insert or remove: a panic cannot leave one half-done.
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a host-to-agent stream and returns its consumer.
    fn open_inbound(&self, id: u64, channel: Channel) -> InboundStream {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(RecvBudget::new());
        self.tables().inbound.insert(
            (id, channel),
            InboundEntry {
                tx,
                budget: Arc::clone(&budget),
            },
        );
        InboundStream {
            rx,
            budget,
            out: self.out.clone(),
            id,
            channel,
        }
    }

    /// Registers an agent-to-host stream and returns its send window.
    fn open_outbound(&self, id: u64, channel: Channel) -> Arc<SendWindow> {
        let window = Arc::new(SendWindow::new());
        self.tables()
            .outbound
            .insert((id, channel), Arc::clone(&window));
        window
    }

    /// Reads and dispatches frames until the peer leaves or breaks the protocol; a
    /// protocol error is reported with a `Fatal` frame before returning.
    async fn read_loop<R: AsyncRead + Unpin>(&self, reader: &mut R) {
        let mut buf = Vec::new();
        let mut greeted = false;
        let fatal = loop {
            match read_frame(reader, &mut buf).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(FrameError::Io(e)) => {
                    crate::log!("connection read failed: {e}");
                    return;
                }
                Err(FrameError::TooLarge(len)) => {
                    break RemoteError::new(
                        ErrorKind::FrameTooLarge,
                        FrameError::TooLarge(len).to_string(),
                    )
                }
                Err(e) => break protocol_error(e.to_string()),
            }
            let msg: ClientMessage = match decode_payload(&buf) {
                Ok(msg) => msg,
                Err(e) => break protocol_error(e.to_string()),
            };
            let result = if greeted {
                self.dispatch(msg).await
            } else {
                greeted = true;
                self.greet(msg).await
            };
            if let Err(e) = result {
                break e;
            }
        };
        crate::log!("closing connection: {fatal}");
        self.out.send(AgentMessage::Fatal(fatal)).await;
        self.out.flush().await;
        // Closing a unix socket with unread input resets it, and the peer may lose the
        // Fatal frame: swallow what is in flight first (bounded in time and bytes).
        let _ = tokio::time::timeout(LINGER_TIME, async {
            let mut scratch = vec![0u8; 64 * 1024];
            let mut drained = 0;
            while drained < LINGER_BYTES {
                match reader.read(&mut scratch).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => drained += n,
                }
            }
        })
        .await;
    }

    async fn greet(&self, msg: ClientMessage) -> Result<(), RemoteError> {
        match msg {
            ClientMessage::Hello { magic, version } if magic == MAGIC => {
                if version != PROTOCOL_VERSION {
                    return Err(RemoteError::new(
                        ErrorKind::VersionMismatch,
                        format!(
                            "client speaks protocol version {version}, agent {AGENT_VERSION} speaks {PROTOCOL_VERSION}"
                        ),
                    ));
                }
                self.out
                    .send(AgentMessage::Hello {
                        magic: MAGIC,
                        version: PROTOCOL_VERSION,
                        agent_version: AGENT_VERSION.to_owned(),
                    })
                    .await;
                Ok(())
            }
            _ => Err(protocol_error("the first message must be Hello")),
        }
    }

    async fn dispatch(&self, msg: ClientMessage) -> Result<(), RemoteError> {
        match msg {
            ClientMessage::Hello { .. } => Err(protocol_error("duplicate Hello")),
            ClientMessage::Request { id, request } => self.request(id, request).await,
            ClientMessage::Data { id, channel, data } => {
                if data.len() > MAX_CHUNK {
                    return Err(protocol_error(format!(
                        "data chunk of {} bytes exceeds {MAX_CHUNK}",
                        data.len()
                    )));
                }
                let tables = self.tables();
                // Data for a stream that already ended (exec exited, put failed) is dropped.
                if let Some(entry) = tables.inbound.get(&(id, channel)) {
                    if !entry.budget.consume(data.len()) {
                        return Err(protocol_error(format!(
                            "request {id} sent {channel:?} data beyond its credit"
                        )));
                    }
                    let _ = entry.tx.send(InboundItem::Data(data));
                }
                Ok(())
            }
            ClientMessage::Eof { id, channel } => {
                if let Some(entry) = self.tables().inbound.remove(&(id, channel)) {
                    let _ = entry.tx.send(InboundItem::Eof);
                }
                Ok(())
            }
            ClientMessage::Credit { id, channel, bytes } => {
                if let Some(window) = self.tables().outbound.get(&(id, channel)) {
                    window.grant(u64::from(bytes));
                }
                Ok(())
            }
            ClientMessage::Cancel { id } => {
                self.cancel(id);
                Ok(())
            }
        }
    }

    fn cancel(&self, id: u64) {
        let mut tables = self.tables();
        if let Some(exec) = tables.execs.get(&id) {
            exec::kill_group(exec.pgid, libc::SIGKILL);
        }
        // Dropping the sender tells a Put task to discard its file.
        tables.inbound.remove(&(id, Channel::File));
        if let Some(window) = tables.outbound.remove(&(id, Channel::File)) {
            window.close();
        }
    }

    fn id_in_use(&self, id: u64) -> bool {
        let tables = self.tables();
        tables.execs.contains_key(&id)
            || tables.inbound.contains_key(&(id, Channel::File))
            || tables.outbound.contains_key(&(id, Channel::File))
    }

    async fn request(&self, id: u64, request: Request) -> Result<(), RemoteError> {
        if self.id_in_use(id) {
            return Err(protocol_error(format!("request id {id} is still in use")));
        }
        // `Ok(None)`: the request's own task replies (Exec, Put, Get and List do, so that
        // the reply precedes their stream data).
        let outcome = match request {
            Request::Exec(req) => exec::start(self, id, req).map(|()| None),
            Request::Signal { exec, signal } => {
                self.signal(exec, signal).map(|()| Some(Reply::Done))
            }
            Request::Resize { exec, size } => self.resize(exec, size).map(|()| Some(Reply::Done)),
            Request::Put { path, mode } => {
                files::start_put(self, id, &path, mode).await.map(|()| None)
            }
            Request::Get { path } => files::start_get(self, id, &path).await.map(|()| None),
            Request::Stat { path } => files::stat(&path).await.map(|s| Some(Reply::Stat(s))),
            Request::List { path } => {
                let conn = self.clone();
                tokio::spawn(async move { files::list(&conn, id, &path).await });
                Ok(None)
            }
            Request::Remove { path, recursive } => files::remove(&path, recursive)
                .await
                .map(|()| Some(Reply::Done)),
            Request::Health => Ok(Some(Reply::Health(self.agent.health()))),
            Request::Mount(req) => mounts::mount_request(req).await.map(|()| Some(Reply::Done)),
            Request::Unmount { target } => {
                mounts::unmount_request(&target).map(|()| Some(Reply::Done))
            }
            Request::Reidentify(identity) => {
                identity::reidentify(self.agent.init, identity).map(|()| Some(Reply::Done))
            }
            Request::Shutdown { action } => {
                self.out.reply(id, Reply::Done).await;
                self.out.flush().await;
                crate::log!("shutdown requested: {action:?}");
                self.agent.shutdown.send_replace(Some(action));
                Ok(None)
            }
        };
        match outcome {
            Ok(None) => {}
            Ok(Some(reply)) => {
                self.out.reply(id, reply).await;
            }
            Err(error) => {
                self.out.fail(id, error).await;
            }
        }
        Ok(())
    }

    fn with_exec<T>(
        &self,
        exec: u64,
        f: impl FnOnce(&ExecEntry) -> Result<T, RemoteError>,
    ) -> Result<T, RemoteError> {
        match self.tables().execs.get(&exec) {
            Some(entry) => f(entry),
            None => Err(RemoteError::new(
                ErrorKind::NoSuchExec,
                format!("exec {exec} is not running on this connection"),
            )),
        }
    }

    fn signal(&self, exec: u64, signal: i32) -> Result<(), RemoteError> {
        self.with_exec(exec, |entry| {
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            if unsafe { libc::kill(-entry.pgid, signal) } != 0 {
                let err = io::Error::last_os_error();
                return Err(RemoteError::from_io(
                    format!("sending signal {signal} to exec {exec}"),
                    &err,
                ));
            }
            Ok(())
        })
    }

    fn resize(&self, exec: u64, size: crate::protocol::PtySize) -> Result<(), RemoteError> {
        self.with_exec(exec, |entry| match &entry.pty {
            Some(master) => exec::set_window_size(master.raw_fd(), size)
                .map_err(|e| RemoteError::from_io(format!("resizing the pty of exec {exec}"), &e)),
            None => Err(RemoteError::new(
                ErrorKind::InvalidInput,
                format!("exec {exec} has no pty"),
            )),
        })
    }

    /// Kills what the connection started and releases its streams.
    fn teardown(&self) {
        let mut tables = self.tables();
        for (_, exec) in tables.execs.drain() {
            exec::kill_group(exec.pgid, libc::SIGKILL);
            exec.task.abort();
        }
        tables.inbound.clear();
        for (_, window) in tables.outbound.drain() {
            window.close();
        }
    }
}

/// Reads chunks for [`pump`].
trait ChunkSource {
    /// Reads at most `buf.len()` bytes; `Ok(0)` at end of stream.
    async fn read_chunk(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// Sends everything `source` yields as `Data` on (`id`, `channel`), within the credit of
/// `window`, then `Eof`. Returns early without `Eof` when the window is closed (cancelled).
async fn pump(
    out: &Outbox,
    id: u64,
    channel: Channel,
    window: &SendWindow,
    mut source: impl ChunkSource,
) -> io::Result<()> {
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let Some(credit) = window.take(MAX_CHUNK).await else {
            return Ok(());
        };
        let n = match source.read_chunk(&mut buf[..credit]).await {
            Ok(n) => n,
            Err(e) => {
                window.grant(credit as u64);
                return Err(e);
            }
        };
        if n == 0 {
            break;
        }
        window.grant((credit - n) as u64);
        let data = buf[..n].to_vec();
        if !out.send(AgentMessage::Data { id, channel, data }).await {
            return Ok(());
        }
    }
    out.send(AgentMessage::Eof { id, channel }).await;
    Ok(())
}

/// Aborts a spawned task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addr_parsing() {
        assert_eq!(
            "vsock:1024".parse::<ListenAddr>().unwrap(),
            ListenAddr::Vsock(1024)
        );
        assert_eq!(
            "unix:/run/a.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/a.sock".into())
        );
        for bad in ["vsock:", "vsock:-1", "unix:", "tcp:1", "1024"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad}");
        }
        assert_eq!(ListenAddr::Vsock(5).to_string(), "vsock:5");
    }

    #[tokio::test]
    async fn nothing_is_written_after_a_fatal_frame() {
        let (tx, rx) = mpsc::channel(8);
        let out = Outbox(tx);
        // An exec's task replying just after the reader reported a protocol error.
        out.send(AgentMessage::Fatal(protocol_error("bad frame")))
            .await;
        out.reply(7, Reply::ExecStarted { pid: 42 }).await;
        // The writer ends once every sender is gone.
        drop(out);
        let mut written = Vec::new();
        write_loop(&mut written, rx).await.unwrap();
        let mut reader = &written[..];
        let mut buf = Vec::new();
        assert!(read_frame(&mut reader, &mut buf).await.unwrap());
        let first: AgentMessage = decode_payload(&buf).unwrap();
        assert!(matches!(first, AgentMessage::Fatal(_)), "{first:?}");
        assert!(
            reader.is_empty(),
            "{} more bytes after the Fatal frame",
            reader.len()
        );
    }
}
