//! One hybrid-vsock stream connection: its host unix socket, its state (waiting for the guest's
//! RESPONSE, or established), the guest data not yet written to the host, and the credit
//! accounting of virtio 1.x flow control (5.10.6.3) in both directions. The [`super::muxer`]
//! owns the connection table and routes guest packets and host socket events here; a connection
//! answers with a [`Verdict`] and the muxer does the rest (RST, CREDIT_UPDATE, epoll).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use vmm_sys_util::epoll::EventSet;

use super::packet::{op, Header, SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::metrics::virtio::{DeviceMetrics, VSOCK as METRICS};

/// Receive buffer the muxer advertises to the guest per connection.
pub const CONN_BUF_SIZE: u32 = 256 * 1024;

/// A connection's (host port, guest port).
pub type Key = (u32, u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ConnState {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    AwaitingResponse,
    /// Data may flow.
    Established,
}

/// What the muxer does with a connection after it handled a packet or an event.
#[derive(Debug)]
pub enum Verdict {
    /// Keep it.
    Keep,
    /// Keep it, and tell the guest its credit (CREDIT_UPDATE).
    CreditUpdate,
    /// Tell the guest RST and drop it.
    Reset,
    /// Drop it without a word: the guest reset it.
    Close,
}

/// What a read of the host socket gave for the guest.
pub enum HostRead {
    /// Nothing now: no credit, the host already closed, or the socket would block.
    Nothing,
    /// The host closed its side (the guest gets SHUTDOWN).
    Eof,
    /// This many bytes of stream data in the payload buffer (the guest gets RW).
    Data(usize),
    /// The socket failed (the guest gets RST).
    Broken,
}

/// One connection between a guest stream socket and a host unix socket.
pub struct Connection {
    /// The host side.
    pub(super) stream: UnixStream,
    /// Its (host port, guest port).
    pub(super) key: Key,
    state: ConnState,
    /// Guest data not yet written to the host socket.
    to_host: VecDeque<u8>,
    /// Bytes of guest data written to the host socket.
    fwd_cnt: Wrapping<u32>,
    /// fwd_cnt as last told to the guest.
    fwd_cnt_sent: Wrapping<u32>,
    /// Bytes of guest data received.
    rx_from_guest: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_to_guest: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// The guest will send no more: shut the host socket's write side once drained.
    guest_done_sending: bool,
    /// The host socket reached EOF (SHUTDOWN sent to the guest).
    host_eof: bool,
    /// Queued in the muxer's list of connections with data for the guest.
    pub(super) ready: bool,
    /// Events currently registered with epoll.
    pub(super) interest: EventSet,
    /// When an AwaitingResponse connection times out.
    response_deadline: Option<Instant>,
}

impl Connection {
    fn new(stream: UnixStream, key: Key, state: ConnState, peer: &Header) -> Self {
        Connection {
            stream,
            key,
            state,
            to_host: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_sent: Wrapping(0),
            rx_from_guest: Wrapping(0),
            tx_to_guest: Wrapping(0),
            peer_buf_alloc: peer.buf_alloc,
            peer_fwd_cnt: Wrapping(peer.fwd_cnt),
            guest_done_sending: false,
            host_eof: false,
            ready: false,
            interest: EventSet::empty(),
            response_deadline: None,
        }
    }

    /// A guest-initiated connection: the guest's REQUEST (`request`) to the host socket at
    /// `path`, established once connected.
    pub fn guest_initiated(path: &str, key: Key, request: &Header) -> std::io::Result<Self> {
        let stream = connect_nonblocking(path)?;
        Ok(Self::new(stream, key, ConnState::Established, request))
    }

    /// A host-initiated connection on `stream`: a REQUEST goes to the guest, whose RESPONSE is
    /// due by `deadline`. The guest gets no data before it answers with its credit.
    pub fn host_initiated(stream: UnixStream, key: Key, deadline: Instant) -> Self {
        let no_credit = Header {
            buf_alloc: 0,
            ..Default::default()
        };
        let mut conn = Self::new(stream, key, ConnState::AwaitingResponse, &no_credit);
        conn.response_deadline = Some(deadline);
        conn
    }

    /// Whether the guest still has not answered the REQUEST whose RESPONSE was due at
    /// `deadline`.
    pub fn unanswered_by(&self, deadline: Instant) -> bool {
        self.state == ConnState::AwaitingResponse && self.response_deadline == Some(deadline)
    }

    /// Bytes of guest data written to the host, for a packet to the guest.
    pub fn fwd_cnt(&self) -> Wrapping<u32> {
        self.fwd_cnt
    }

    /// [`Self::fwd_cnt`] for a packet that tells the guest its credit; remembered as told.
    pub fn fwd_cnt_to_tell(&mut self) -> Wrapping<u32> {
        self.fwd_cnt_sent = self.fwd_cnt;
        self.fwd_cnt
    }

    /// Bytes the guest can take now.
    fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_to_guest - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// The epoll events this connection waits for: IN while the guest can take host data, OUT
    /// while guest data waits for the host socket.
    pub fn wanted_interest(&self) -> EventSet {
        let mut events = EventSet::empty();
        if self.state == ConnState::Established
            && !self.ready
            && !self.host_eof
            && self.peer_credit() > 0
        {
            events |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            events |= EventSet::OUT;
        }
        events
    }

    /// Handles a guest packet (header plus payload) addressed to this connection.
    pub fn handle_guest_packet(&mut self, hdr: &Header, payload: &[u8]) -> Verdict {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        match (hdr.op, self.state) {
            (op::RESPONSE, ConnState::AwaitingResponse) => {
                self.state = ConnState::Established;
                let ok = format!("OK {}\n", self.key.0);
                // A fresh socket's send buffer takes a few bytes at once.
                if self.stream.write_all(ok.as_bytes()).is_err() {
                    return Verdict::Reset;
                }
                Verdict::Keep
            }
            (op::RW, ConnState::Established) => {
                let buffered = self.to_host.len() as u64 + payload.len() as u64;
                if buffered > u64::from(CONN_BUF_SIZE) {
                    // The guest ignored our credit.
                    DeviceMetrics::add(&METRICS.failed, 1);
                    return Verdict::Reset;
                }
                self.to_host.extend(payload);
                self.rx_from_guest += Wrapping(payload.len() as u32);
                DeviceMetrics::add(&METRICS.bytes_out, payload.len() as u64);
                self.forward_to_host()
            }
            (op::CREDIT_REQUEST, ConnState::Established) => Verdict::CreditUpdate,
            (op::CREDIT_UPDATE, _) => Verdict::Keep,
            (op::SHUTDOWN, _) => {
                if hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND) == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    // Full close: deliver what we can, then confirm with RST.
                    let _ = self.flush();
                    return Verdict::Reset;
                }
                if hdr.flags & SHUTDOWN_SEND != 0 {
                    self.guest_done_sending = true;
                    if self.flush().is_err() {
                        return Verdict::Reset;
                    }
                }
                Verdict::Keep
            }
            (op::RST, _) => Verdict::Close,
            _ => {
                // An operation that makes no sense in this state.
                DeviceMetrics::add(&METRICS.failed, 1);
                Verdict::Reset
            }
        }
    }

    /// Writes buffered guest data to the host socket (it was writable, or new data came):
    /// Reset on a broken socket, CreditUpdate once the guest's view of its credit runs low.
    pub fn forward_to_host(&mut self) -> Verdict {
        if self.flush().is_err() {
            return Verdict::Reset;
        }
        let unacked = (self.rx_from_guest - self.fwd_cnt_sent).0;
        if self.fwd_cnt != self.fwd_cnt_sent
            && CONN_BUF_SIZE.saturating_sub(unacked) < CONN_BUF_SIZE / 4
        {
            Verdict::CreditUpdate
        } else {
            Verdict::Keep
        }
    }

    /// Writes buffered guest data to the host socket; Err on a broken socket.
    fn flush(&mut self) -> std::io::Result<()> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_host.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if self.to_host.is_empty() && self.guest_done_sending {
            // The peer may already be gone; nothing else to do about it.
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// Reads host data for the guest into `payload`: at most `room` bytes and never more than
    /// the guest's credit.
    pub fn read_for_guest(&mut self, payload: &mut [u8], room: usize) -> HostRead {
        let credit = self.peer_credit() as usize;
        let want = credit.min(room).min(payload.len());
        if want == 0 || self.host_eof {
            return HostRead::Nothing;
        }
        match self.stream.read(&mut payload[..want]) {
            Ok(0) => {
                self.host_eof = true;
                HostRead::Eof
            }
            Ok(n) => {
                self.tx_to_guest += Wrapping(n as u32);
                self.fwd_cnt_sent = self.fwd_cnt;
                DeviceMetrics::add(&METRICS.bytes_in, n as u64);
                HostRead::Data(n)
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                HostRead::Nothing
            }
            Err(_) => HostRead::Broken,
        }
    }
}

/// Connects to the unix socket at `path` without blocking: a listener whose backlog is full
/// refuses (EAGAIN) instead of stalling the device thread.
fn connect_nonblocking(path: &str) -> std::io::Result<UnixStream> {
    // SAFETY: zero is a valid sockaddr_un (an empty path), filled in below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(ErrorKind::InvalidInput.into());
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2); the result is checked before use.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket owned by nothing else; the stream closes it on every path.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un and the length passed is its size.
    let ret = unsafe {
        libc::connect(
            fd,
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn connecting_to_a_full_backlog_fails_instead_of_blocking() {
        let dir = std::env::temp_dir().join(format!("mvm-vsock-backlog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("full.sock");
        let _ = std::fs::remove_file(&path);
        let _listener = UnixListener::bind(&path).unwrap();
        let path = path.to_str().unwrap();
        let mut held = Vec::new();
        let err = loop {
            match connect_nonblocking(path) {
                Ok(stream) => held.push(stream),
                Err(e) => break e,
            }
            assert!(held.len() < 100_000, "the backlog never filled");
        };
        assert_eq!(err.kind(), ErrorKind::WouldBlock, "{err}");
        connect_nonblocking(&format!("{path}.missing")).unwrap_err();
        assert_eq!(
            connect_nonblocking(&"x".repeat(200)).unwrap_err().kind(),
            ErrorKind::InvalidInput
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
