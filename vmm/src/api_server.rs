//! Firecracker's HTTP API on a unix socket: a small HTTP/1.1 server ([`http`]) whose requests
//! [`router`] turns into [`VmmAction`]s, handed to the VMM thread
//! over the [`channel`].

pub mod channel;
pub mod http;
pub mod router;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use self::channel::{ApiChannel, VmmClient};
use self::http::{HttpResponse, RequestParser};
use self::router::{respond, route};
use crate::controller::VmmAction;
use crate::seccomp::Filters;

/// Errors while starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The socket path is taken by a live server.
    #[error("API socket {0} is in use by another process; pick another --api-sock path")]
    InUse(String),
    /// The socket could not be created.
    #[error("cannot create API socket {0}: {1}")]
    Bind(String, std::io::Error),
}

/// The VMM thread's answer to `action`, as an HTTP response.
fn answer(vmm: &VmmClient, action: VmmAction) -> HttpResponse {
    match vmm.call(action) {
        Some(result) => respond(result),
        None => HttpResponse::fault(503, "the VMM is shutting down"),
    }
}

/// Most API connections served at once; a client beyond them waits in the listen backlog until
/// one closes, so idle clients cannot make the API thread hold unbounded state.
pub const MAX_CONNECTIONS: usize = 32;
/// The listener's token in the epoll set (connections use their descriptor, never negative).
const LISTENER_TOKEN: u64 = u64::MAX;

/// One client connection, served by the API thread without blocking: bytes are read while the
/// parser has room and no response is pending, and a pending response is written as the
/// client takes it, so a slow or stuck client holds at most one request and one response.
struct Connection {
    stream: UnixStream,
    parser: RequestParser,
    /// Response bytes the client has not taken yet.
    out: Vec<u8>,
    /// `out` holds the VMM's answer to a call, counted in flight until written.
    answers_call: bool,
    /// The connection closes once `out` is written.
    closing: bool,
    /// The client has closed its side.
    eof: bool,
}

/// What the API thread does with a connection after serving it.
enum Next {
    /// Wait until it is readable (or writable, while a response is pending).
    Wait,
    /// Close it.
    Close,
}

impl Connection {
    fn new(stream: UnixStream) -> Self {
        Connection {
            stream,
            parser: RequestParser::new(),
            out: Vec::new(),
            answers_call: false,
            closing: false,
            eof: false,
        }
    }

    /// The events to wait for.
    fn interest(&self) -> EventSet {
        if self.out.is_empty() {
            EventSet::IN | EventSet::READ_HANG_UP
        } else {
            EventSet::OUT
        }
    }

    /// Queues `response` for the client.
    fn queue(&mut self, response: &HttpResponse, close: bool, answers_call: bool) {
        // Writing to memory cannot fail.
        let _ = response.write_to(&mut self.out, close);
        self.closing |= close;
        self.answers_call = answers_call;
    }

    /// Serves what the client has sent and takes what it can without blocking: writes the
    /// pending response, answers the requests already received, reads once.
    fn serve(&mut self, vmm: &VmmClient) -> Next {
        let mut read_once = false;
        loop {
            if !self.out.is_empty() {
                match (&self.stream).write(&self.out) {
                    Ok(n) => {
                        self.out.drain(..n);
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Wait,
                    Err(_) => return Next::Close,
                }
                if !self.out.is_empty() {
                    continue;
                }
                self.response_written(vmm);
                if self.closing {
                    return Next::Close;
                }
            }
            match self.parser.next_request() {
                Ok(Some(request)) => {
                    match route(&request) {
                        Ok(action) => self.queue(&answer(vmm, action), request.close, true),
                        Err(response) => self.queue(&response, request.close, false),
                    }
                    continue;
                }
                // After a malformed request the stream position is unknown: close.
                Err(response) => {
                    self.queue(&response, true, false);
                    continue;
                }
                Ok(None) => {}
            }
            if self.eof {
                match self.parser.finish() {
                    Ok(()) => return Next::Close,
                    Err(response) => {
                        self.queue(&response, true, false);
                        continue;
                    }
                }
            }
            // One read per wake-up, so that a client streaming requests cannot starve others.
            if read_once {
                return Next::Wait;
            }
            read_once = true;
            let mut chunk = [0u8; 16 * 1024];
            let room = self.parser.room().min(chunk.len());
            match (&self.stream).read(&mut chunk[..room]) {
                Ok(0) => self.eof = true,
                Ok(n) => self.parser.push(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => read_once = false,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Wait,
                Err(_) => return Next::Close,
            }
        }
    }

    /// The pending answer has been written (or will never be): the VMM may exit.
    fn response_written(&mut self, vmm: &VmmClient) {
        if std::mem::take(&mut self.answers_call) {
            vmm.response_written();
        }
    }
}

/// Sets O_NONBLOCK on `fd` with fcntl(2) (std's `set_nonblocking` uses an ioctl the `api`
/// filter does not allow).
fn set_nonblocking(fd: &impl AsRawFd) -> std::io::Result<()> {
    let fd = fd.as_raw_fd();
    // SAFETY: F_GETFL and F_SETFL on a descriptor the caller owns; no memory is passed.
    let set = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) >= 0
    };
    if set {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The API thread's loop: one thread, non-blocking sockets, epoll (as Firecracker's API
/// server), so that no client can hold up another or the VMM.
fn serve(epoll: &Epoll, listener: &UnixListener, vmm: &VmmClient) -> std::io::Result<()> {
    set_nonblocking(listener)?;
    let watch_listener = || {
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )
    };
    watch_listener()?;
    let mut connections: HashMap<RawFd, Connection> = HashMap::new();
    let mut events = vec![EpollEvent::default(); MAX_CONNECTIONS + 1];
    loop {
        let ready = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for event in &events[..ready] {
            if event.data() == LISTENER_TOKEN {
                accept_all(epoll, listener, &mut connections)?;
                continue;
            }
            let fd = event.data() as RawFd;
            let Some(connection) = connections.get_mut(&fd) else {
                continue;
            };
            let before = connection.interest();
            let next = connection.serve(vmm);
            let after = connection.interest();
            let watched = match next {
                Next::Wait if before == after => true,
                Next::Wait => epoll
                    .ctl(
                        ControlOperation::Modify,
                        fd,
                        EpollEvent::new(after, fd as u64),
                    )
                    .is_ok(),
                Next::Close => false,
            };
            if !watched {
                if let Some(mut connection) = connections.remove(&fd) {
                    connection.response_written(vmm);
                    // Closing the descriptor removes it from the epoll set.
                    drop(connection);
                    if connections.len() == MAX_CONNECTIONS - 1 {
                        watch_listener()?;
                    }
                }
            }
        }
    }
}

/// Accepts waiting connections up to [`MAX_CONNECTIONS`]; at the cap the listener is no longer
/// watched, so further clients wait in the listen backlog until a connection closes.
fn accept_all(
    epoll: &Epoll,
    listener: &UnixListener,
    connections: &mut HashMap<RawFd, Connection>,
) -> std::io::Result<()> {
    while connections.len() < MAX_CONNECTIONS {
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // WouldBlock: none left; anything else (EMFILE...): try again at the next wake-up.
            Err(_) => return Ok(()),
        };
        if set_nonblocking(&stream).is_err() {
            continue;
        }
        let fd = stream.as_raw_fd();
        let connection = Connection::new(stream);
        let added = epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(connection.interest(), fd as u64),
        );
        if added.is_ok() {
            connections.insert(fd, connection);
        }
    }
    match epoll.ctl(
        ControlOperation::Delete,
        listener.as_raw_fd(),
        EpollEvent::default(),
    ) {
        // Already unwatched.
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        result => result,
    }
}

/// Binds `path`, replacing a stale socket file nobody listens on.
pub fn bind(path: &Path) -> Result<UnixListener, ApiServerError> {
    let shown = path.display().to_string();
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ApiServerError::InUse(shown));
        }
        std::fs::remove_file(path).map_err(|e| ApiServerError::Bind(shown.clone(), e))?;
    }
    UnixListener::bind(path).map_err(|e| ApiServerError::Bind(shown, e))
}

/// The API server thread, waiting for its socket: it is started before the socket is bound so
/// that its start (thread creation, seccomp filter) overlaps the rest of the VMM's set-up.
pub struct ApiServer {
    listener: SyncSender<UnixListener>,
}

impl ApiServer {
    /// Serves the API on `listener`.
    pub fn listen(self, listener: UnixListener) {
        // Fails only when the thread has ended because its filter could not be installed,
        // which it logged.
        let _ = self.listener.send(listener);
    }
}

/// Starts the API server thread, confined by the `api` seccomp filter; it serves once given its
/// socket ([`ApiServer::listen`]) and ends if the server is dropped instead. Returns the server
/// and the VMM side of its channel.
pub fn start(seccomp: Filters) -> std::io::Result<(ApiServer, ApiChannel)> {
    let (client, api) = channel::open()?;
    let (listener_tx, listener_rx) = sync_channel::<UnixListener>(1);
    std::thread::Builder::new()
        .name("fc_api".into())
        .spawn(move || {
            let epoll = match Epoll::new() {
                Ok(epoll) => epoll,
                Err(e) => return log::error!("API server not started: epoll: {e}"),
            };
            if let Err(e) = seccomp.apply("api") {
                return log::error!("API server not started: {e}");
            }
            let Ok(listener) = listener_rx.recv() else {
                return;
            };
            if let Err(e) = serve(&epoll, &listener, &client) {
                log::error!("API server stopped: {e}");
            }
        })?;
    Ok((
        ApiServer {
            listener: listener_tx,
        },
        api,
    ))
}
