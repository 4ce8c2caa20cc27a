//! Firecracker's hybrid vsock model: guest stream connections mapped onto host unix sockets.
//!
//! - Host → guest: a host process connects to `uds_path` and writes `CONNECT <port>\n`; the muxer
//!   sends the guest a REQUEST for `<port>` from a fresh host port and, once the guest answers
//!   RESPONSE, writes `OK <host port>\n` back; from then on the socket carries the stream.
//!   A guest that does not answer within [`CONNECT_TIMEOUT`] (Firecracker's 2 s) gets an RST and
//!   the host socket is closed.
//! - Guest → host: a REQUEST for port P connects to `<uds_path>_P`; RESPONSE on success, RST if
//!   nobody listens.
//! - Flow control (virtio 1.x, 5.10.6.3), kept per [`Connection`]: the muxer never sends the
//!   guest more than the guest's advertised free space, buffers at most [`CONN_BUF_SIZE`] bytes
//!   of guest data per connection (and resets a guest that sends more), and tells the guest
//!   about freed space with CREDIT_UPDATE.
//!
//! This module keeps the connection table, the host listener and the CONNECT handshake, the
//! request timer and the queue of packets for the guest; [`super::connection`] is one
//! connection's state machine.
//! - Packets for unknown connections get RST; packets not addressed host-wards from the guest's
//!   own CID are dropped and counted.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::num::Wrapping;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::EventSet;

use super::connection::{Connection, HostRead, Key, Verdict, CONN_BUF_SIZE};
use super::packet::{op, Header, HEADER_LEN, HOST_CID, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};
use crate::devices::virtio::worker::EpollSet;
use crate::metrics::virtio::{DeviceMetrics, VSOCK as METRICS};
use crate::timer::Timer;

/// Most connections at once (established or being set up).
pub const MAX_CONNECTIONS: usize = 1024;
/// Most accepted host sockets still sending their CONNECT line.
pub const MAX_PENDING_ACCEPTS: usize = 64;
/// Most control packets waiting for RX buffers; guest TX stalls beyond this.
pub const MAX_CONTROL_BACKLOG: usize = 1024;
/// Longest CONNECT line.
const MAX_CONNECT_LINE: usize = 32;
/// First host port handed out for host-initiated connections (as Firecracker).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// How long the guest has to answer a host-initiated REQUEST (Firecracker's 2 s).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Epoll token of the host listener.
pub const LISTENER_TOKEN: u64 = 16;
/// Epoll token of the [`CONNECT_TIMEOUT`] timer.
pub const TIMER_TOKEN: u64 = 17;
/// Tokens from here on are host sockets: token = TOKEN_BASE + fd.
const TOKEN_BASE: u64 = 32;

/// The epoll token of a host socket.
fn token(stream: &UnixStream) -> u64 {
    TOKEN_BASE + stream.as_raw_fd() as u64
}

/// An accepted host socket still sending `CONNECT <port>\n`.
struct PendingAccept {
    stream: UnixStream,
    line: Vec<u8>,
}

/// The connection table and the packets waiting for the guest.
pub struct Muxer {
    guest_cid: u64,
    uds_path: String,
    listener: UnixListener,
    conns: HashMap<Key, Connection>,
    by_token: HashMap<u64, Key>,
    pending: HashMap<u64, PendingAccept>,
    /// Control packets for the guest, in order.
    control: VecDeque<Header>,
    /// Connections whose host socket has data for the guest.
    data_ready: VecDeque<Key>,
    next_local_port: u32,
    /// Host-initiated connections by response deadline, oldest first (all share
    /// [`CONNECT_TIMEOUT`]); entries of connections answered or gone since are skipped.
    awaiting: VecDeque<(Instant, Key)>,
    /// Armed for the front of `awaiting` whenever it is not empty.
    timer: Timer,
}

impl Muxer {
    /// A muxer for guest `guest_cid`, accepting host connections on `listener` (bound at
    /// `uds_path`); fails only if its timer cannot be created.
    pub fn new(guest_cid: u64, uds_path: String, listener: UnixListener) -> std::io::Result<Self> {
        Ok(Muxer {
            guest_cid,
            uds_path,
            listener,
            conns: HashMap::new(),
            by_token: HashMap::new(),
            pending: HashMap::new(),
            control: VecDeque::new(),
            data_ready: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            awaiting: VecDeque::new(),
            timer: Timer::new()?,
        })
    }

    /// Registers the listener and the timer.
    pub fn register(&self, epoll: &EpollSet) -> std::io::Result<()> {
        epoll.add(self.listener.as_raw_fd(), EventSet::IN, LISTENER_TOKEN)?;
        epoll.add(self.timer.as_raw_fd(), EventSet::IN, TIMER_TOKEN)
    }

    /// Drops every connection (device reset): their host sockets close.
    pub fn reset(&mut self) {
        self.conns.clear();
        self.by_token.clear();
        self.pending.clear();
        self.control.clear();
        self.data_ready.clear();
        self.awaiting.clear();
        // A stale expiration would only find nothing to expire.
        let _ = self.timer.disarm();
    }

    /// Number of live connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Whether guest TX may be processed (the control backlog has room for answers).
    pub fn can_take_tx(&self) -> bool {
        self.control.len() < MAX_CONTROL_BACKLOG
    }

    /// Whether packets wait for RX buffers.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.data_ready.is_empty()
    }

    fn header(&self, key: Key, op: u16, flags: u32, fwd_cnt: Wrapping<u32>) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: fwd_cnt.0,
        }
    }

    fn queue_control(&mut self, header: Header) {
        if self.control.len() >= MAX_CONTROL_BACKLOG * 2 {
            // Only host-side events can push past the TX stall limit; drop rather than grow.
            DeviceMetrics::add(&METRICS.failed, 1);
            return;
        }
        self.control.push_back(header);
    }

    fn queue_conn_control(&mut self, key: Key, op: u16, flags: u32) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let fwd = conn.fwd_cnt_to_tell();
        let header = self.header(key, op, flags, fwd);
        self.queue_control(header);
    }

    fn rst(&mut self, key: Key) {
        let header = self.header(key, op::RST, 0, Wrapping(0));
        self.queue_control(header);
    }

    fn remove(&mut self, epoll: &EpollSet, key: Key) {
        if let Some(conn) = self.conns.remove(&key) {
            self.by_token.remove(&token(&conn.stream));
            if !conn.interest.is_empty() {
                // The fd closes right after; epoll forgets it either way.
                let _ = epoll.remove(conn.stream.as_raw_fd());
            }
        }
    }

    fn update_interest(&mut self, epoll: &EpollSet, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        let wanted = conn.wanted_interest();
        if wanted == conn.interest {
            return;
        }
        let fd = conn.stream.as_raw_fd();
        let token = token(&conn.stream);
        let result = match (conn.interest.is_empty(), wanted.is_empty()) {
            (true, false) => epoll.add(fd, wanted, token),
            (false, true) => epoll.remove(fd),
            _ => epoll.modify(fd, wanted, token),
        };
        match result {
            Ok(()) => conn.interest = wanted,
            Err(e) => {
                log::error!("vsock: cannot watch a host socket: {e}");
                self.rst(key);
                self.remove(epoll, key);
            }
        }
    }

    fn insert(&mut self, epoll: &EpollSet, conn: Connection) {
        let key = conn.key;
        self.by_token.insert(token(&conn.stream), key);
        self.conns.insert(key, conn);
        self.update_interest(epoll, key);
    }

    /// Handles one packet from the guest (header plus payload).
    pub fn handle_guest_packet(&mut self, epoll: &EpollSet, hdr: &Header, payload: &[u8]) {
        if hdr.dst_cid != HOST_CID || hdr.src_cid != self.guest_cid {
            DeviceMetrics::add(&METRICS.failed, 1);
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != op::RST {
                self.rst(key);
            }
            return;
        }
        if hdr.op == op::REQUEST {
            self.guest_connect(epoll, hdr, key);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            if hdr.op != op::RST {
                self.rst(key);
            }
            return;
        };
        let verdict = conn.handle_guest_packet(hdr, payload);
        if self.apply(epoll, key, verdict) {
            self.update_interest(epoll, key);
        }
    }

    /// Carries out a connection's verdict; false when the connection is gone.
    fn apply(&mut self, epoll: &EpollSet, key: Key, verdict: Verdict) -> bool {
        match verdict {
            Verdict::Keep => true,
            Verdict::CreditUpdate => {
                self.queue_conn_control(key, op::CREDIT_UPDATE, 0);
                true
            }
            Verdict::Reset => {
                self.rst(key);
                self.remove(epoll, key);
                false
            }
            Verdict::Close => {
                self.remove(epoll, key);
                false
            }
        }
    }

    fn guest_connect(&mut self, epoll: &EpollSet, hdr: &Header, key: Key) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            DeviceMetrics::add(&METRICS.failed, 1);
            self.rst(key);
            return;
        }
        let path = format!("{}_{}", self.uds_path, hdr.dst_port);
        let Ok(conn) = Connection::guest_initiated(&path, key, hdr) else {
            self.rst(key);
            return;
        };
        self.insert(epoll, conn);
        self.queue_conn_control(key, op::RESPONSE, 0);
    }

    /// Handles an event on the listener, the timer or a host socket.
    pub fn handle_host_event(&mut self, epoll: &EpollSet, token: u64, events: EventSet) {
        if token == LISTENER_TOKEN {
            self.accept(epoll);
        } else if token == TIMER_TOKEN {
            self.expire_requests(epoll);
        } else if self.pending.contains_key(&token) {
            self.read_connect_line(epoll, token);
        } else if let Some(&key) = self.by_token.get(&token) {
            let Some(conn) = self.conns.get_mut(&key) else {
                return;
            };
            if events.contains(EventSet::OUT) {
                let verdict = conn.forward_to_host();
                if !self.apply(epoll, key, verdict) {
                    return;
                }
            }
            let Some(conn) = self.conns.get_mut(&key) else {
                return;
            };
            if events.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) && !conn.ready
            {
                conn.ready = true;
                self.data_ready.push_back(key);
            }
            self.update_interest(epoll, key);
        }
    }

    fn accept(&mut self, epoll: &EpollSet) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            if self.pending.len() >= MAX_PENDING_ACCEPTS || stream.set_nonblocking(true).is_err() {
                // Dropping the stream refuses the connection.
                DeviceMetrics::add(&METRICS.failed, 1);
                continue;
            }
            let token = token(&stream);
            if epoll.add(stream.as_raw_fd(), EventSet::IN, token).is_ok() {
                self.pending.insert(
                    token,
                    PendingAccept {
                        stream,
                        line: Vec::new(),
                    },
                );
            }
        }
    }

    fn read_connect_line(&mut self, epoll: &EpollSet, token: u64) {
        let Some(p) = self.pending.get_mut(&token) else {
            return;
        };
        // Byte by byte: whatever follows the line is stream data for the guest.
        let mut byte = [0u8; 1];
        let done = loop {
            match p.stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte[0] == b'\n' => break Ok(()),
                Ok(_) if p.line.len() < MAX_CONNECT_LINE => p.line.push(byte[0]),
                Ok(_) => break Err(()),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break Err(()),
            }
        };
        let p = self.pending.remove(&token).expect("present above");
        // Unregistered before the socket moves on (or closes).
        let _ = epoll.remove(p.stream.as_raw_fd());
        let port = done.ok().and_then(|()| parse_connect(&p.line));
        let Some(port) = port else {
            DeviceMetrics::add(&METRICS.failed, 1);
            return;
        };
        if self.conns.len() >= MAX_CONNECTIONS {
            DeviceMetrics::add(&METRICS.failed, 1);
            return;
        }
        let local_port = self.allocate_local_port(port);
        let key = (local_port, port);
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        self.insert(epoll, Connection::host_initiated(p.stream, key, deadline));
        self.awaiting.push_back((deadline, key));
        if self.awaiting.len() == 1 {
            self.arm_timer();
        }
        self.queue_conn_control(key, op::REQUEST, 0);
    }

    /// Arms the timer for the oldest response deadline, if any.
    fn arm_timer(&mut self) {
        let Some(&(deadline, _)) = self.awaiting.front() else {
            return;
        };
        if let Err(e) = self
            .timer
            .arm(deadline.saturating_duration_since(Instant::now()))
        {
            // Unanswered requests then wait for the guest or the host to give up.
            log::error!("vsock: cannot arm the connection request timer: {e}");
        }
    }

    /// The timer fired: resets host-initiated connections the guest left unanswered past their
    /// deadline (RST to the guest, host socket closed), as Firecracker does.
    fn expire_requests(&mut self, epoll: &EpollSet) {
        self.timer.acknowledge();
        let now = Instant::now();
        while let Some(&(deadline, key)) = self.awaiting.front() {
            if deadline > now {
                break;
            }
            self.awaiting.pop_front();
            let unanswered = self
                .conns
                .get(&key)
                .is_some_and(|conn| conn.unanswered_by(deadline));
            if unanswered {
                log::debug!("vsock: guest port {} did not answer in time", key.1);
                DeviceMetrics::add(&METRICS.failed, 1);
                self.rst(key);
                self.remove(epoll, key);
            }
        }
        self.arm_timer();
    }

    fn allocate_local_port(&mut self, peer_port: u32) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return port;
            }
        }
    }

    /// The next packet for the guest, with its payload in `payload` (at most `room` bytes), or
    /// None when nothing is ready.
    pub fn next_rx_packet(
        &mut self,
        epoll: &EpollSet,
        payload: &mut [u8],
        room: usize,
    ) -> Option<Header> {
        if let Some(header) = self.control.pop_front() {
            return Some(header);
        }
        while let Some(key) = self.data_ready.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.ready = false;
            match conn.read_for_guest(payload, room) {
                HostRead::Nothing => self.update_interest(epoll, key),
                HostRead::Eof => {
                    let fwd = conn.fwd_cnt();
                    self.update_interest(epoll, key);
                    return Some(self.header(key, op::SHUTDOWN, SHUTDOWN_RCV | SHUTDOWN_SEND, fwd));
                }
                HostRead::Data(n) => {
                    // More may be waiting: stay in line behind the others.
                    conn.ready = true;
                    self.data_ready.push_back(key);
                    let fwd = conn.fwd_cnt();
                    let mut header = self.header(key, op::RW, 0, fwd);
                    header.len = n as u32;
                    self.update_interest(epoll, key);
                    return Some(header);
                }
                HostRead::Broken => {
                    self.remove(epoll, key);
                    return Some(self.header(key, op::RST, 0, Wrapping(0)));
                }
            }
        }
        None
    }
}

/// Parses `CONNECT <port>` (an optional trailing '\r' is accepted).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = text.strip_prefix("CONNECT ")?;
    port.parse().ok()
}

/// Length of what [`Muxer::next_rx_packet`] puts in an RX buffer of `buffer_len` bytes: the
/// payload room after the header.
pub fn payload_room(buffer_len: u64) -> usize {
    buffer_len
        .saturating_sub(HEADER_LEN as u64)
        .min(usize::MAX as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A muxer for guest CID 3 on a fresh socket in its own directory, registered with `epoll`.
    fn muxer(tag: &str, epoll: &EpollSet) -> (Muxer, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("mvm-vsock-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let muxer = Muxer::new(3, path.to_str().unwrap().to_string(), listener).unwrap();
        muxer.register(epoll).unwrap();
        (muxer, dir)
    }

    /// Waits up to `timeout_ms` for events and hands each to the muxer; returns their tokens.
    fn pump(muxer: &mut Muxer, epoll: &EpollSet, timeout_ms: i32) -> Vec<u64> {
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 16];
        let n = epoll.wait(timeout_ms, &mut events).unwrap();
        let mut tokens = Vec::new();
        for event in &events[..n] {
            muxer.handle_host_event(epoll, event.data(), event.event_set());
            tokens.push(event.data());
        }
        tokens
    }

    /// Connects to the muxer's socket as a host process and sends `CONNECT 52`; returns the
    /// stream and the REQUEST the muxer queued for the guest.
    fn host_connects(
        muxer: &mut Muxer,
        epoll: &EpollSet,
        dir: &std::path::Path,
    ) -> (UnixStream, Header) {
        let mut host = UnixStream::connect(dir.join("v.sock")).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        let mut payload = [0u8; 64];
        for _ in 0..100 {
            pump(muxer, epoll, 1000);
            if let Some(request) = muxer.next_rx_packet(epoll, &mut payload, 64) {
                assert_eq!((request.op, request.dst_port), (op::REQUEST, 52));
                return (host, request);
            }
        }
        panic!("no REQUEST for the host's CONNECT");
    }

    #[test]
    fn an_unanswered_host_connection_is_reset_after_the_timeout() {
        let epoll = EpollSet::new().unwrap();
        let (mut muxer, dir) = muxer("timeout", &epoll);
        let (mut host, request) = host_connects(&mut muxer, &epoll, &dir);
        let connected = Instant::now();
        assert_eq!(muxer.connection_count(), 1);
        // The guest stays silent: the next event is the timer, once the timeout has passed.
        let tokens = pump(&mut muxer, &epoll, 10_000);
        assert_eq!(tokens, [TIMER_TOKEN]);
        assert!(connected.elapsed() >= CONNECT_TIMEOUT);
        let rst = muxer.next_rx_packet(&epoll, &mut [0u8; 64], 64).unwrap();
        assert_eq!(
            (rst.op, rst.src_port, rst.dst_port, rst.dst_cid),
            (op::RST, request.src_port, 52, 3)
        );
        assert!(muxer.next_rx_packet(&epoll, &mut [0u8; 64], 64).is_none());
        assert_eq!(muxer.connection_count(), 0);
        // The host side is closed: EOF, no "OK" line.
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut reply = Vec::new();
        host.read_to_end(&mut reply).unwrap();
        assert_eq!(reply, b"");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn an_answered_host_connection_outlives_the_timeout() {
        let epoll = EpollSet::new().unwrap();
        let (mut muxer, dir) = muxer("answered", &epoll);
        let (mut host, request) = host_connects(&mut muxer, &epoll, &dir);
        let response = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 52,
            dst_port: request.src_port,
            type_: TYPE_STREAM,
            op: op::RESPONSE,
            buf_alloc: 4096,
            ..Default::default()
        };
        muxer.handle_guest_packet(&epoll, &response, &[]);
        let mut ok = [0u8; 16];
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = host.read(&mut ok).unwrap();
        assert_eq!(&ok[..n], format!("OK {}\n", request.src_port).as_bytes());
        // The timer still fires for the old deadline, and leaves the connection alone.
        let tokens = pump(&mut muxer, &epoll, 10_000);
        assert_eq!(tokens, [TIMER_TOKEN]);
        assert!(muxer.next_rx_packet(&epoll, &mut [0u8; 64], 64).is_none());
        assert_eq!(muxer.connection_count(), 1);
        // Nothing is left to time out: the timer stays quiet.
        assert!(pump(&mut muxer, &epoll, 100).is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn connect_lines_parse_strictly() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
        for bad in [
            &b"connect 52"[..],
            b"CONNECT",
            b"CONNECT -1",
            b"CONNECT 99999999999",
            b"CONNECT 5 2",
            b"\xff",
        ] {
            assert_eq!(parse_connect(bad), None, "{bad:?}");
        }
    }

    /// A host-initiated connection the guest (port 52, advertising `guest_buf` bytes) has
    /// accepted; returns the host stream and the guest's header template for it.
    fn established(
        muxer: &mut Muxer,
        epoll: &EpollSet,
        dir: &std::path::Path,
        guest_buf: u32,
    ) -> (UnixStream, Header) {
        let (mut host, request) = host_connects(muxer, epoll, dir);
        let guest = Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 52,
            dst_port: request.src_port,
            type_: TYPE_STREAM,
            op: op::RESPONSE,
            buf_alloc: guest_buf,
            ..Default::default()
        };
        muxer.handle_guest_packet(epoll, &guest, &[]);
        let mut ok = [0u8; 16];
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = host.read(&mut ok).unwrap();
        assert_eq!(&ok[..n], format!("OK {}\n", request.src_port).as_bytes());
        (host, guest)
    }

    /// Sends `payload` from the guest as one RW packet.
    fn guest_writes(muxer: &mut Muxer, epoll: &EpollSet, guest: &Header, payload: &[u8]) {
        let header = Header {
            op: op::RW,
            len: payload.len() as u32,
            ..*guest
        };
        muxer.handle_guest_packet(epoll, &header, payload);
    }

    /// Every packet queued for the guest right now.
    fn drain_rx(muxer: &mut Muxer, epoll: &EpollSet) -> Vec<Header> {
        let mut payload = vec![0u8; 64 * 1024];
        std::iter::from_fn(|| muxer.next_rx_packet(epoll, &mut payload, 64 * 1024)).collect()
    }

    /// Shrinks the send buffer of the muxer's side of every connection, so little guest data
    /// fits in the host socket until the host process reads.
    fn shrink_host_socket_buffers(muxer: &Muxer) {
        for conn in muxer.conns.values() {
            let size: libc::c_int = 1;
            // SAFETY: setsockopt on a live socket with a c_int option value; the kernel rounds
            // the size up to its minimum.
            let ret = unsafe {
                libc::setsockopt(
                    conn.stream.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_SNDBUF,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(ret, 0);
        }
    }

    #[test]
    fn freed_space_reaches_the_guest_as_credit_updates_once_the_host_reads() {
        let epoll = EpollSet::new().unwrap();
        let (mut muxer, dir) = muxer("credit-update", &epoll);
        let (mut host, guest) = established(&mut muxer, &epoll, &dir, 4096);
        shrink_host_socket_buffers(&muxer);
        // The guest uses 200 KiB of its 256 KiB credit; the host reads nothing yet.
        let sent = 200 * 1024;
        for chunk in 0..sent / 4096 {
            guest_writes(&mut muxer, &epoll, &guest, &[chunk as u8; 4096]);
        }
        let before: Vec<_> = drain_rx(&mut muxer, &epoll);
        assert!(
            before.iter().all(|h| h.op == op::CREDIT_UPDATE),
            "{before:?}"
        );
        let told_before = before.last().map_or(0, |h| h.fwd_cnt);
        assert!(
            told_before < 64 * 1024,
            "the host socket held at most a few KiB: {told_before}"
        );
        // The host consumes everything; the muxer flushes as the socket drains.
        host.set_nonblocking(true).unwrap();
        let mut received = Vec::new();
        let mut updates = Vec::new();
        let mut buf = [0u8; 65536];
        while received.len() < sent {
            match host.read(&mut buf) {
                Ok(n) => received.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    pump(&mut muxer, &epoll, 1000);
                }
                Err(e) => panic!("{e}"),
            }
            updates.extend(drain_rx(&mut muxer, &epoll));
        }
        assert!(received
            .chunks(4096)
            .enumerate()
            .all(|(i, c)| c == [i as u8; 4096]));
        assert!(!updates.is_empty(), "no CREDIT_UPDATE after the host read");
        for update in &updates {
            assert_eq!(
                (
                    update.op,
                    update.src_port,
                    update.dst_port,
                    update.buf_alloc
                ),
                (op::CREDIT_UPDATE, guest.dst_port, 52, CONN_BUF_SIZE)
            );
        }
        let told = updates.last().unwrap().fwd_cnt;
        assert!(told > told_before && told as usize <= sent);
        // The guest's view of its credit is back above a quarter of the buffer.
        assert!(CONN_BUF_SIZE - (sent as u32 - told) >= CONN_BUF_SIZE / 4);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_credit_request_is_answered_with_the_current_credit() {
        let epoll = EpollSet::new().unwrap();
        let (mut muxer, dir) = muxer("credit-request", &epoll);
        let (mut host, guest) = established(&mut muxer, &epoll, &dir, 4096);
        guest_writes(&mut muxer, &epoll, &guest, b"0123456789");
        let mut ten = [0u8; 10];
        host.read_exact(&mut ten).unwrap();
        assert!(
            drain_rx(&mut muxer, &epoll).is_empty(),
            "no update needed yet"
        );
        let request = Header {
            op: op::CREDIT_REQUEST,
            ..guest
        };
        muxer.handle_guest_packet(&epoll, &request, &[]);
        let reply = drain_rx(&mut muxer, &epoll);
        assert_eq!(reply.len(), 1, "{reply:?}");
        assert_eq!(
            (
                reply[0].op,
                reply[0].src_port,
                reply[0].dst_port,
                reply[0].buf_alloc,
                reply[0].fwd_cnt
            ),
            (op::CREDIT_UPDATE, guest.dst_port, 52, CONN_BUF_SIZE, 10)
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_guest_sending_past_its_credit_is_reset() {
        let epoll = EpollSet::new().unwrap();
        let (mut muxer, dir) = muxer("over-credit", &epoll);
        let (mut host, guest) = established(&mut muxer, &epoll, &dir, 4096);
        shrink_host_socket_buffers(&muxer);
        // The host reads nothing: the muxer's 256 KiB buffer plus the socket fill, then the
        // guest goes on past the credit it was given.
        let mut sent = 0;
        while muxer.connection_count() == 1 {
            guest_writes(&mut muxer, &epoll, &guest, &[7u8; 4096]);
            sent += 4096;
            assert!(sent <= 2 * CONN_BUF_SIZE as usize, "never reset");
        }
        assert!(sent > CONN_BUF_SIZE as usize);
        let rx = drain_rx(&mut muxer, &epoll);
        let rst = rx.last().unwrap();
        assert_eq!(
            (rst.op, rst.src_port, rst.dst_port, rst.dst_cid),
            (op::RST, guest.dst_port, 52, 3)
        );
        // The host socket closes after what did fit.
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut delivered = Vec::new();
        host.read_to_end(&mut delivered).unwrap();
        assert!(delivered.len() < CONN_BUF_SIZE as usize);
        assert!(delivered.iter().all(|b| *b == 7));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn the_host_never_sends_more_than_the_guests_credit() {
        let epoll = EpollSet::new().unwrap();
        let (mut muxer, dir) = muxer("peer-credit", &epoll);
        let (mut host, guest) = established(&mut muxer, &epoll, &dir, 4096);
        host.write_all(&[1u8; 10_000]).unwrap();
        let mut delivered = 0;
        for _ in 0..50 {
            pump(&mut muxer, &epoll, 100);
            delivered += drain_rx(&mut muxer, &epoll)
                .iter()
                .map(|h| h.len as usize)
                .sum::<usize>();
        }
        assert_eq!(delivered, 4096, "exactly the guest's buffer");
        // The guest consumed it all: the rest flows.
        let update = Header {
            op: op::CREDIT_UPDATE,
            fwd_cnt: 4096,
            ..guest
        };
        muxer.handle_guest_packet(&epoll, &update, &[]);
        for _ in 0..50 {
            pump(&mut muxer, &epoll, 100);
            delivered += drain_rx(&mut muxer, &epoll)
                .iter()
                .map(|h| h.len as usize)
                .sum::<usize>();
            if delivered >= 8192 {
                break;
            }
        }
        assert_eq!(delivered, 8192);
        let _ = std::fs::remove_dir_all(dir);
    }
}
