//! virtio-vsock with Firecracker's hybrid host side (virtio 1.x, 5.10): guest stream sockets
//! become host unix-socket connections, muxed by thread `fc_vsock` (see [`muxer`]).

pub mod connection;
pub mod muxer;
pub mod packet;

use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use self::muxer::{payload_room, Muxer};
use self::packet::{Header, HEADER_LEN};
use super::chain::{read_segments, total_len, write_segments, Chain};
use super::worker::{signal_used, DeviceBroken, DeviceThread, EpollSet, EventHandler, Frozen};
use super::{
    read_config_window, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::config::VsockConfig;
use crate::metrics::virtio::{DeviceMetrics, VSOCK as METRICS};
use crate::timer::Timer;

/// Virtio device id of vsock devices.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Largest payload moved in one packet.
pub const MAX_PAYLOAD: usize = 64 * 1024;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const EVENT_TOKEN: u64 = 2;
/// Epoll token of the [`RESET_TAKEN_WAIT`] timer.
const RESET_TIMER_TOKEN: u64 = 3;
/// virtio_vsock_event id: the device lost its connections (virtio 1.x, 5.10.6.7).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// Longest a restored device holds packets for the guest until the driver takes the transport
/// reset (see [`VsockEngine::hold_rx_until_reset_taken`]); well within the
/// [`muxer::CONNECT_TIMEOUT`] a host connection's request has to be answered in.
pub const RESET_TAKEN_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Errors setting up the vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The configuration is invalid (a reserved CID).
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Another process serves the socket path.
    #[error("vsock uds_path {0} is in use by another process; pick another path")]
    InUse(String),
    /// Something that is not a socket sits at the path.
    #[error("vsock uds_path {0} exists and is not a socket; remove it or pick another path")]
    NotASocket(String),
    /// The socket cannot be created.
    #[error("cannot bind vsock uds_path {0}: {1}")]
    Bind(String, std::io::Error),
    /// A host resource of the device (thread, timer) cannot be created.
    #[error("cannot set up the vsock device: {0}")]
    Setup(std::io::Error),
}

/// Binds `path`, replacing a stale socket nobody listens on.
fn bind(path: &str) -> Result<UnixListener, VsockError> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(VsockError::NotASocket(path.to_string()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(VsockError::InUse(path.to_string()));
        }
        std::fs::remove_file(path).map_err(|e| VsockError::Bind(path.to_string(), e))?;
    }
    let listener = UnixListener::bind(path).map_err(|e| VsockError::Bind(path.to_string(), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| VsockError::Bind(path.to_string(), e))?;
    Ok(listener)
}

/// Packet processing, independent of threads (the fuzz targets drive it).
pub struct VsockEngine {
    muxer: Muxer,
    payload: Box<[u8]>,
    tx_stalled: bool,
    /// While packets for the guest wait for the driver to take the transport reset of a
    /// restore: the event queue's available index when the reset was sent.
    held_since: Option<u16>,
    /// Ends the hold after [`RESET_TAKEN_WAIT`] whatever the guest does.
    reset_timer: Timer,
}

impl VsockEngine {
    /// An engine muxing guest `guest_cid` onto `listener` (bound at `uds_path`); fails only if
    /// the muxer's timer cannot be created.
    pub fn new(guest_cid: u64, uds_path: String, listener: UnixListener) -> std::io::Result<Self> {
        Ok(VsockEngine {
            muxer: Muxer::new(guest_cid, uds_path, listener)?,
            payload: vec![0u8; MAX_PAYLOAD].into_boxed_slice(),
            tx_stalled: false,
            held_since: None,
            reset_timer: Timer::new()?,
        })
    }

    /// Holds every packet for the guest (a host connection's REQUEST above all) until the
    /// driver has taken the transport reset just put on its event queue, whose available
    /// index was `posted` before the reset was used (see
    /// [`event_queue_notified`](Self::event_queue_notified)), or for [`RESET_TAKEN_WAIT`] at
    /// most. A Linux driver handles the event queue and RX in work items of their own: a
    /// connection that reached the guest first was accepted and then reset with the
    /// connections the snapshot held, and the host had to connect again.
    pub fn hold_rx_until_reset_taken(&mut self, posted: u16) {
        match self.reset_timer.arm(RESET_TAKEN_WAIT) {
            Ok(()) => self.held_since = Some(posted),
            Err(e) => log::warn!("vsock: packets for the restored guest are not held: {e}"),
        }
    }

    /// The driver notified the event queue, whose available index is now `posted`: once it
    /// has handled the reset it gives the event's buffer back and the index moves on, which
    /// ends the hold. (A notification alone says nothing: a restored device is notified of
    /// every queue once.)
    pub fn event_queue_notified(&mut self, posted: u16) {
        if self.held_since.is_some_and(|before| before != posted) {
            self.reset_taken();
        }
    }

    /// Packets for the guest flow again (the driver took the transport reset, reset the
    /// device, or [`RESET_TAKEN_WAIT`] passed).
    pub fn reset_taken(&mut self) {
        if self.held_since.take().is_some() {
            // A stale expiration only ends a hold that is over.
            let _ = self.reset_timer.disarm();
        }
    }

    /// [`RESET_TAKEN_WAIT`] passed (its timer fired): packets for the guest flow whether it
    /// took the transport reset or not.
    pub fn reset_wait_over(&mut self) {
        self.reset_timer.acknowledge();
        if self.rx_held() {
            log::warn!(
                "vsock: the guest did not take the transport reset within {RESET_TAKEN_WAIT:?}; \
                 packets for it go on"
            );
            self.reset_taken();
        }
    }

    /// Whether packets for the guest wait for it to take a transport reset.
    pub fn rx_held(&self) -> bool {
        self.held_since.is_some()
    }

    /// The connection table.
    pub fn muxer(&self) -> &Muxer {
        &self.muxer
    }

    /// Handles every available TX packet; returns whether any buffer was used. Stops while the
    /// answers waiting for RX buffers are at their limit.
    pub fn process_tx(
        &mut self,
        mem: &crate::vstate::memory::GuestMemory,
        queue: &mut Queue,
        epoll: &EpollSet,
    ) -> bool {
        let mut used = false;
        self.tx_stalled = false;
        loop {
            if !self.muxer.can_take_tx() {
                self.tx_stalled = true;
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            match Chain::parse(chain, mem, (HEADER_LEN + MAX_PAYLOAD) as u64) {
                Ok(chain) if chain.writable.is_empty() => self.tx_packet(mem, &chain, epoll),
                _ => DeviceMetrics::add(&METRICS.bad_chains, 1),
            }
            if queue.add_used(mem, head, 0).is_err() {
                DeviceMetrics::add(&METRICS.bad_chains, 1);
            }
            used = true;
        }
        used
    }

    fn tx_packet(
        &mut self,
        mem: &crate::vstate::memory::GuestMemory,
        chain: &Chain,
        epoll: &EpollSet,
    ) {
        let mut raw = [0u8; HEADER_LEN];
        if read_segments(mem, &chain.readable, 0, &mut raw) != HEADER_LEN {
            DeviceMetrics::add(&METRICS.bad_chains, 1);
            return;
        }
        let header = Header::decode(&raw);
        let len = header.len as usize;
        if len > MAX_PAYLOAD || total_len(&chain.readable) < (HEADER_LEN + len) as u64 {
            DeviceMetrics::add(&METRICS.bad_chains, 1);
            return;
        }
        let payload = &mut self.payload[..len];
        if read_segments(mem, &chain.readable, HEADER_LEN as u64, payload) != len {
            DeviceMetrics::add(&METRICS.bad_chains, 1);
            return;
        }
        DeviceMetrics::add(&METRICS.completed, 1);
        self.muxer
            .handle_guest_packet(epoll, &header, &self.payload[..len]);
    }

    /// Fills RX buffers with waiting packets; returns whether any buffer was used.
    pub fn process_rx(
        &mut self,
        mem: &crate::vstate::memory::GuestMemory,
        queue: &mut Queue,
        epoll: &EpollSet,
    ) -> bool {
        let mut used = false;
        while !self.rx_held() && self.muxer.has_rx() {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let chain = match Chain::parse(chain, mem, u64::from(u32::MAX)) {
                Ok(chain)
                    if chain.readable.is_empty()
                        && total_len(&chain.writable) >= HEADER_LEN as u64 =>
                {
                    chain
                }
                _ => {
                    DeviceMetrics::add(&METRICS.bad_chains, 1);
                    if queue.add_used(mem, head, 0).is_err() {
                        DeviceMetrics::add(&METRICS.bad_chains, 1);
                    }
                    used = true;
                    continue;
                }
            };
            let room = payload_room(total_len(&chain.writable));
            let Some(header) = self.muxer.next_rx_packet(epoll, &mut self.payload, room) else {
                // Nothing after all (a connection had no data): the buffer stays available.
                queue.go_to_previous_position();
                break;
            };
            let n = write_segments(mem, &chain.writable, 0, &header.encode())
                + write_segments(
                    mem,
                    &chain.writable,
                    HEADER_LEN as u64,
                    &self.payload[..header.len as usize],
                );
            if queue.add_used(mem, head, n as u32).is_err() {
                DeviceMetrics::add(&METRICS.bad_chains, 1);
            }
            used = true;
        }
        used
    }

    /// Handles an event on the listener or a host socket.
    pub fn handle_host_event(&mut self, epoll: &EpollSet, token: u64, events: EventSet) {
        self.muxer.handle_host_event(epoll, token, events);
    }

    /// Whether guest TX was left waiting for the RX backlog to drain.
    pub fn tx_stalled(&self) -> bool {
        self.tx_stalled
    }
}

/// The `fc_vsock` thread's state.
pub struct VsockHandler {
    engine: VsockEngine,
    mem: crate::vstate::memory::GuestMemory,
    rxq: Queue,
    txq: Queue,
    evq: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    event_evt: EventFd,
    interrupt: Arc<VirtioInterrupt>,
}

impl VsockHandler {
    /// How many buffers the driver has made available on the event queue (its available
    /// index); `None` where the ring cannot be read.
    fn event_buffers_posted(&self) -> Option<u16> {
        self.evq
            .avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
            .ok()
            .map(|posted| posted.0)
    }

    fn tx(&mut self, epoll: &EpollSet) {
        if self.engine.process_tx(&self.mem, &mut self.txq, epoll) {
            signal_used(&mut self.txq, &self.mem, &self.interrupt);
        }
    }

    fn rx(&mut self, epoll: &EpollSet) {
        if self.engine.process_rx(&self.mem, &mut self.rxq, epoll) {
            signal_used(&mut self.rxq, &self.mem, &self.interrupt);
        }
    }

    /// Tells the driver that every connection is gone (after a snapshot restore), in the first
    /// buffer of the event queue, and holds packets for it until it has taken that; without a
    /// buffer the driver never posted any and is not told.
    fn send_transport_reset(&mut self) {
        let Some(chain) = self.evq.pop_descriptor_chain(&self.mem) else {
            log::warn!("vsock: no event buffer for the transport reset");
            return;
        };
        let head = chain.head_index();
        // Before the event is used: the driver may take it (and give its buffer back) at once.
        let posted = self.event_buffers_posted();
        let event = VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le_bytes();
        let written = match Chain::parse(chain, &self.mem, u64::from(u32::MAX)) {
            Ok(chain) => write_segments(&self.mem, &chain.writable, 0, &event),
            Err(_) => {
                DeviceMetrics::add(&METRICS.bad_chains, 1);
                0
            }
        };
        if self.evq.add_used(&self.mem, head, written as u32).is_err() {
            DeviceMetrics::add(&METRICS.bad_chains, 1);
        }
        if let Some(posted) = posted {
            self.engine.hold_rx_until_reset_taken(posted);
        }
        signal_used(&mut self.evq, &self.mem, &self.interrupt);
    }
}

impl EventHandler for VsockHandler {
    type Update = ();
    type Backend = VsockEngine;

    fn into_backend(mut self) -> VsockEngine {
        // The driver reset the device: its connections are gone, and no transport reset is
        // waited for.
        self.engine.muxer.reset();
        self.engine.reset_taken();
        self.engine
    }

    fn register(&mut self, epoll: &EpollSet) -> std::io::Result<()> {
        epoll.add(self.rx_evt.as_raw_fd(), EventSet::IN, RX_TOKEN)?;
        epoll.add(self.tx_evt.as_raw_fd(), EventSet::IN, TX_TOKEN)?;
        epoll.add(self.event_evt.as_raw_fd(), EventSet::IN, EVENT_TOKEN)?;
        epoll.add(
            self.engine.reset_timer.as_raw_fd(),
            EventSet::IN,
            RESET_TIMER_TOKEN,
        )?;
        self.engine.muxer.register(epoll)
    }

    fn handle_event(&mut self, epoll: &EpollSet, token: u64, events: EventSet) {
        match token {
            // Reading resets the counters; the queues are looked at in full below.
            RX_TOKEN => {
                let _ = self.rx_evt.read();
            }
            TX_TOKEN => {
                let _ = self.tx_evt.read();
                self.tx(epoll);
            }
            // The event queue carries only device → driver transport resets, sent on restore;
            // the driver gives a handled event's buffer back and notifies it.
            EVENT_TOKEN => {
                let _ = self.event_evt.read();
                if let Some(posted) = self.event_buffers_posted() {
                    self.engine.event_queue_notified(posted);
                }
            }
            RESET_TIMER_TOKEN => self.engine.reset_wait_over(),
            token => self.engine.handle_host_event(epoll, token, events),
        }
        self.rx(epoll);
        if self.engine.tx_stalled() && self.engine.muxer.can_take_tx() {
            self.tx(epoll);
            self.rx(epoll);
        }
    }

    fn update_backend(_engine: &mut VsockEngine, _update: ()) {}

    fn handle_update(&mut self, _epoll: &EpollSet, _update: ()) {}

    fn queue_states(&self) -> Vec<QueueState> {
        vec![self.rxq.state(), self.txq.state(), self.evq.state()]
    }
}

/// A virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    thread: DeviceThread<VsockHandler>,
}

impl Vsock {
    /// Binds the host socket of `config`.
    pub fn new(
        config: &VsockConfig,
        seccomp: &crate::seccomp::Filters,
    ) -> Result<Vsock, VsockError> {
        config.validate()?;
        let listener = bind(&config.uds_path)?;
        let guest_cid = u64::from(config.guest_cid);
        Ok(Vsock {
            guest_cid,
            thread: DeviceThread::spawn(
                "fc_vsock".to_string(),
                VsockEngine::new(guest_cid, config.uds_path.clone(), listener)
                    .map_err(VsockError::Setup)?,
                seccomp,
            )
            .map_err(VsockError::Setup)?,
        })
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_window(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        // The event queue only carries the transport reset of a restore; its eventfd is drained.
        let [(rxq, rx_evt), (txq, tx_evt), (evq, event_evt)] = ctx.take_queues("virtio-vsock")?;
        let ActivateContext {
            mem,
            interrupt,
            restored,
            ..
        } = ctx;
        self.thread.start(move |engine| {
            let mut handler = VsockHandler {
                engine,
                mem,
                rxq,
                txq,
                evq,
                rx_evt,
                tx_evt,
                event_evt,
                interrupt,
            };
            if restored {
                // The restored VMM has none of the host connections the guest knew.
                handler.send_transport_reset();
            }
            handler
        })
    }

    fn reset(&mut self) {
        self.thread.stop();
    }

    fn freeze(&self) -> Result<Frozen, DeviceBroken> {
        self.thread.freeze()
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::packet::{op, HOST_CID, TYPE_STREAM};
    use super::*;
    use crate::devices::virtio::chain::tests::{desc, test_memory};
    use crate::vstate::memory::GuestMemory;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn engine(dir: &std::path::Path) -> VsockEngine {
        let path = dir.join("v.sock").to_str().unwrap().to_string();
        let listener = bind(&path).unwrap();
        VsockEngine::new(3, path, listener).unwrap()
    }

    fn scratch() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "mvm-vsock-unit-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn packet(op: u16, src_port: u32, dst_port: u32, len: u32) -> [u8; HEADER_LEN] {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 0,
        }
        .encode()
    }

    #[test]
    fn malformed_tx_chains_are_dropped_and_unknown_ports_get_rst() {
        let dir = scratch();
        let mem = test_memory();
        let epoll = EpollSet::new().unwrap();
        let mut e = engine(&dir);
        mem.write_slice(&packet(op::REQUEST, 1000, 4444, 0), GuestAddress(0x10000))
            .unwrap();
        mem.write_slice(&packet(op::RW, 1001, 4445, 500), GuestAddress(0x11000))
            .unwrap();
        let txq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        txq.add_desc_chains(
            &[
                desc(0x10000, 20, false, None),                     // short header
                desc(0x10000, HEADER_LEN as u32, true, None),       // wrong direction
                desc(0x11000, HEADER_LEN as u32 + 10, false, None), // len says 500, 10 present
                desc(0xffff0, HEADER_LEN as u32, false, None),      // outside memory
                desc(0x10000, HEADER_LEN as u32, false, None), // valid: REQUEST to 4444, nobody listens
                desc(0x10000, HEADER_LEN as u32, false, Some(6)), // a loop: 5 -> 6 -> 5
                desc(0x10000, HEADER_LEN as u32, false, Some(5)),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = txq.create_queue().unwrap();
        assert!(e.process_tx(&mem, &mut q, &epoll));
        assert_eq!(q.next_used(), 6, "every chain is returned");
        assert_eq!(e.muxer().connection_count(), 0);

        let rxq_mock = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        rxq_mock
            .add_desc_chains(
                &[
                    desc(0x20000, 16, true, None),
                    desc(0x21000, 4096, true, None),
                ],
                0,
            )
            .unwrap();
        let mut rxq: Queue = rxq_mock.create_queue().unwrap();
        assert!(e.process_rx(&mem, &mut rxq, &epoll));
        assert_eq!(
            rxq.next_used(),
            2,
            "the too-small buffer is returned empty, the next one used"
        );
        let used_len: u32 = mem
            .read_obj(rxq_mock.used_addr().unchecked_add(4 + 8 + 4))
            .unwrap();
        assert_eq!(used_len, HEADER_LEN as u32);
        let mut raw = [0u8; HEADER_LEN];
        mem.read_slice(&mut raw, GuestAddress(0x21000)).unwrap();
        let rst = Header::decode(&raw);
        assert_eq!(
            (rst.op, rst.src_port, rst.dst_port, rst.dst_cid),
            (op::RST, 4444, 1000, 3)
        );
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn guest_connections_reach_the_port_socket_and_respect_credit() {
        use std::io::{Read, Write};
        let dir = scratch();
        let mem = test_memory();
        let epoll = EpollSet::new().unwrap();
        let mut e = engine(&dir);
        let host = std::os::unix::net::UnixListener::bind(dir.join("v.sock_52")).unwrap();
        mem.write_slice(&packet(op::REQUEST, 700, 52, 0), GuestAddress(0x10000))
            .unwrap();
        let mut data = packet(op::RW, 700, 52, 5).to_vec();
        data.extend_from_slice(b"hello");
        mem.write_slice(&data, GuestAddress(0x11000)).unwrap();
        let txq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        txq.add_desc_chains(
            &[
                desc(0x10000, HEADER_LEN as u32, false, None),
                desc(0x11000, data.len() as u32, false, None),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = txq.create_queue().unwrap();
        e.process_tx(&mem, &mut q, &epoll);
        assert_eq!(e.muxer().connection_count(), 1);
        let (mut stream, _) = host.accept().unwrap();
        let mut buf = [0u8; 5];
        stream.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        // The guest advertised 4096 bytes: a larger host write arrives in credit-sized pieces.
        stream.write_all(&[7u8; 6000]).unwrap();
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 8];
        let rxq_mock = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let bufs: Vec<_> = (0..4)
            .map(|i| desc(0x20000 + i * 0x2000, 8192, true, None))
            .collect();
        rxq_mock.add_desc_chains(&bufs, 0).unwrap();
        let mut rxq: Queue = rxq_mock.create_queue().unwrap();
        // RESPONSE first.
        assert!(e.process_rx(&mem, &mut rxq, &epoll));
        let n = epoll_wait(&epoll, &mut events);
        for ev in &events[..n] {
            e.handle_host_event(&epoll, ev.data(), ev.event_set());
        }
        e.process_rx(&mem, &mut rxq, &epoll);
        assert_eq!(
            rxq.next_used(),
            2,
            "RESPONSE, then one RW limited by credit"
        );
        let mut raw = [0u8; HEADER_LEN];
        mem.read_slice(&mut raw, GuestAddress(0x22000)).unwrap();
        let rw = Header::decode(&raw);
        assert_eq!((rw.op, rw.len), (op::RW, 4096));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn many_guest_connections_are_served_at_once() {
        const CONNS: u32 = 200;
        let dir = scratch();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let epoll = EpollSet::new().unwrap();
        let mut e = engine(&dir);
        let host = std::os::unix::net::UnixListener::bind(dir.join("v.sock_80")).unwrap();
        let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = accepted.clone();
        let acceptor = std::thread::spawn(move || {
            (0..CONNS)
                .map(|_| {
                    let stream = host.accept().unwrap().0;
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    stream
                })
                .collect::<Vec<_>>()
        });
        let txq = MockSplitQueue::create(&mem, GuestAddress(0), 256);
        let rxq_mock = MockSplitQueue::create(&mem, GuestAddress(0x10000), 256);
        let mut tx: Queue = txq.create_queue().unwrap();
        let mut rx: Queue = rxq_mock.create_queue().unwrap();
        let mut responses = 0;
        // In batches of 50: the host side accepts while the guest keeps connecting.
        for batch in 0..CONNS / 50 {
            let mut descs = Vec::new();
            let mut bufs = Vec::new();
            for i in 0..50 {
                let n = batch * 50 + i;
                let addr = 0x100000 + u64::from(n) * 0x100;
                mem.write_slice(&packet(op::REQUEST, 10_000 + n, 80, 0), GuestAddress(addr))
                    .unwrap();
                descs.push(desc(addr, HEADER_LEN as u32, false, None));
                bufs.push(desc(0x200000 + u64::from(n) * 0x100, 0x100, true, None));
            }
            txq.add_desc_chains(&descs, (batch * 50) as u16).unwrap();
            rxq_mock
                .add_desc_chains(&bufs, (batch * 50) as u16)
                .unwrap();
            e.process_tx(&mem, &mut tx, &epoll);
            e.process_rx(&mem, &mut rx, &epoll);
            // Keep the listener's backlog (128) from filling: wait for the host to catch up.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while accepted.load(std::sync::atomic::Ordering::SeqCst) < (batch + 1) * 50 {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the host side stopped accepting"
                );
                std::thread::yield_now();
            }
        }
        for n in 0..CONNS {
            let mut raw = [0u8; HEADER_LEN];
            mem.read_slice(&mut raw, GuestAddress(0x200000 + u64::from(n) * 0x100))
                .unwrap();
            if Header::decode(&raw).op == op::RESPONSE {
                responses += 1;
            }
        }
        let streams = acceptor.join().unwrap();
        assert_eq!(responses, CONNS);
        assert_eq!(e.muxer().connection_count(), CONNS as usize);
        assert_eq!(streams.len(), CONNS as usize);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A restored device holds a host connection's REQUEST while the guest has not taken the
    /// transport reset (the event queue's available index where it was), and delivers it once
    /// it has (the index moved on); the hold ends by itself after [`RESET_TAKEN_WAIT`].
    #[test]
    fn packets_for_a_restored_guest_wait_until_it_takes_the_transport_reset() {
        use std::io::Write;
        let dir = scratch();
        let mem = test_memory();
        let epoll = EpollSet::new().unwrap();
        let mut e = engine(&dir);
        e.muxer().register(&epoll).unwrap();
        epoll
            .add(e.reset_timer.as_raw_fd(), EventSet::IN, RESET_TIMER_TOKEN)
            .unwrap();
        e.hold_rx_until_reset_taken(8);
        let mut host = UnixStream::connect(dir.join("v.sock")).unwrap();
        host.write_all(b"CONNECT 52\n").unwrap();
        let mut events = [vmm_sys_util::epoll::EpollEvent::default(); 8];
        while !e.muxer().has_rx() {
            let n = epoll_wait(&epoll, &mut events);
            for ev in &events[..n] {
                e.handle_host_event(&epoll, ev.data(), ev.event_set());
            }
        }
        let rxq_mock = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        rxq_mock
            .add_desc_chains(&[desc(0x20000, 4096, true, None)], 0)
            .unwrap();
        let mut rxq: Queue = rxq_mock.create_queue().unwrap();
        assert!(
            !e.process_rx(&mem, &mut rxq, &epoll),
            "held: no buffer used"
        );
        assert_eq!(rxq.next_used(), 0);
        // The restore's notification of every queue finds the event buffers as they were.
        e.event_queue_notified(8);
        assert!(!e.process_rx(&mem, &mut rxq, &epoll), "still held");
        // The driver gave the event's buffer back.
        e.event_queue_notified(9);
        assert!(e.process_rx(&mem, &mut rxq, &epoll));
        let mut raw = [0u8; HEADER_LEN];
        mem.read_slice(&mut raw, GuestAddress(0x20000)).unwrap();
        let request = Header::decode(&raw);
        assert_eq!((request.op, request.dst_port), (op::REQUEST, 52));

        // Unanswered, the hold ends when its timer fires.
        e.hold_rx_until_reset_taken(9);
        assert!(e.rx_held());
        let deadline = std::time::Instant::now() + RESET_TAKEN_WAIT * 5;
        loop {
            let n = epoll_wait(&epoll, &mut events);
            if events[..n].iter().any(|ev| ev.data() == RESET_TIMER_TOKEN) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the hold's timer never fired"
            );
        }
        e.reset_wait_over();
        assert!(!e.rx_held());
        let _ = std::fs::remove_dir_all(dir);
    }

    fn epoll_wait(epoll: &EpollSet, events: &mut [vmm_sys_util::epoll::EpollEvent]) -> usize {
        epoll.wait(1000, events).unwrap()
    }
}
