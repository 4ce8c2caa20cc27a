//! virtio-net backed by a tap (virtio 1.x, 5.1): one RX and one TX queue served by thread
//! `fc_net<N>`, MAC in the config space, no offloads and no mergeable RX buffers.
//!
//! Unlike Firecracker, a frame is delivered into any RX buffer it fits in: a driver posting small
//! buffers still receives small frames; a frame larger than the next buffer is dropped (counted)
//! and the buffer stays available.

mod tap;

use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

pub use tap::{Tap, TapError, VNET_HDR_LEN};

use super::chain::{read_segments, total_len, write_segments, Chain};
use super::worker::{signal_used, DeviceBroken, DeviceThread, EpollSet, EventHandler, Frozen};
use super::{
    read_config_window, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::config::NetworkInterfaceConfig;
use crate::metrics::virtio::{DeviceMetrics, NET as METRICS};
use crate::rate_limiter::{RateLimiter, RateLimiterUpdate};
use crate::vstate::memory::GuestMemory;

/// Virtio device id of network devices.
pub const VIRTIO_ID_NET: u32 = 1;
/// Feature: the config space holds the MAC address.
pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// Feature: the config space holds the link status.
pub const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// Largest Ethernet frame carried (without the vnet header), as Firecracker.
pub const MAX_FRAME_LEN: usize = 65562;
/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const TAP_TOKEN: u64 = 2;
const RX_LIMITER_TOKEN: u64 = 3;
const TX_LIMITER_TOKEN: u64 = 4;
const LINK_UP: u16 = 1;

/// Errors setting up a network interface.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The MAC address does not parse.
    #[error("interface {0}: guest_mac {1:?} is not a MAC address like 06:00:ac:10:00:02")]
    BadMac(String, String),
    /// The tap cannot be opened.
    #[error("interface {0}: {1}")]
    Tap(String, TapError),
    /// A host resource could not be created.
    #[error("interface {0}: {1}")]
    Io(String, std::io::Error),
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in mac.iter_mut() {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Frame processing for one interface, independent of threads (the fuzz targets drive it).
pub struct NetEngine {
    tap: Tap,
    rx_limiter: RateLimiter,
    tx_limiter: RateLimiter,
    /// A frame read from the tap that waits for an RX buffer: header + frame.
    rx_frame: Box<[u8]>,
    rx_pending: Option<usize>,
    tx_frame: Box<[u8]>,
}

impl NetEngine {
    /// An engine moving frames between the rings and `tap`.
    pub fn new(tap: Tap, rx_limiter: RateLimiter, tx_limiter: RateLimiter) -> Self {
        NetEngine {
            tap,
            rx_limiter,
            tx_limiter,
            // One byte more than the largest frame, so a longer one shows as too long instead
            // of arriving cut short.
            rx_frame: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN + 1].into_boxed_slice(),
            rx_pending: None,
            tx_frame: vec![0u8; VNET_HDR_LEN + MAX_FRAME_LEN].into_boxed_slice(),
        }
    }

    /// Sends every available TX chain to the tap; returns whether any buffer was used.
    pub fn process_tx(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            match Chain::parse(chain, mem, (VNET_HDR_LEN + MAX_FRAME_LEN) as u64) {
                Ok(chain)
                    if chain.writable.is_empty()
                        && total_len(&chain.readable) >= VNET_HDR_LEN as u64 =>
                {
                    let len = total_len(&chain.readable) as usize;
                    if !self.tx_limiter.consume((len - VNET_HDR_LEN) as u64) {
                        DeviceMetrics::add(&METRICS.rate_limited, 1);
                        queue.go_to_previous_position();
                        break;
                    }
                    self.transmit(mem, &chain, len);
                }
                _ => DeviceMetrics::add(&METRICS.bad_chains, 1),
            }
            if queue.add_used(mem, head, 0).is_err() {
                DeviceMetrics::add(&METRICS.bad_chains, 1);
            }
            used = true;
        }
        used
    }

    fn transmit(&mut self, mem: &GuestMemory, chain: &Chain, len: usize) {
        // The guest negotiated no offloads: whatever its header says, the tap gets a plain one.
        self.tx_frame[..VNET_HDR_LEN].fill(0);
        let frame = &mut self.tx_frame[VNET_HDR_LEN..len];
        if read_segments(mem, &chain.readable, VNET_HDR_LEN as u64, frame) != frame.len() {
            DeviceMetrics::add(&METRICS.bad_chains, 1);
            return;
        }
        match self.tap.write_frame(&self.tx_frame[..len]) {
            Ok(_) => {
                DeviceMetrics::add(&METRICS.completed, 1);
                DeviceMetrics::add(&METRICS.bytes_out, (len - VNET_HDR_LEN) as u64);
            }
            // The tap's queue is full (or the frame is malformed for the host): drop it, as a
            // NIC would.
            Err(_) => DeviceMetrics::add(&METRICS.failed, 1),
        }
    }

    /// Moves frames from the tap into RX buffers while both are available; returns whether any
    /// buffer was used.
    pub fn process_rx(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        loop {
            let len = match self.rx_pending {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_frame) {
                    Ok(len) if len > VNET_HDR_LEN && len <= VNET_HDR_LEN + MAX_FRAME_LEN => len,
                    // Empty, or longer than any frame the guest was promised.
                    Ok(_) => {
                        DeviceMetrics::add(&METRICS.failed, 1);
                        continue;
                    }
                    Err(e) => {
                        if e.kind() != std::io::ErrorKind::WouldBlock {
                            DeviceMetrics::add(&METRICS.backend_errors, 1);
                        }
                        break;
                    }
                },
            };
            self.rx_pending = Some(len);
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let chain = match Chain::parse(chain, mem, u64::from(u32::MAX)) {
                Ok(chain) if chain.readable.is_empty() => chain,
                _ => {
                    DeviceMetrics::add(&METRICS.bad_chains, 1);
                    if queue.add_used(mem, head, 0).is_err() {
                        DeviceMetrics::add(&METRICS.bad_chains, 1);
                    }
                    used = true;
                    continue;
                }
            };
            if total_len(&chain.writable) < len as u64 {
                // Too big for this buffer: drop the frame, keep the buffer for the next one.
                DeviceMetrics::add(&METRICS.failed, 1);
                queue.go_to_previous_position();
                self.rx_pending = None;
                continue;
            }
            if !self.rx_limiter.consume((len - VNET_HDR_LEN) as u64) {
                DeviceMetrics::add(&METRICS.rate_limited, 1);
                queue.go_to_previous_position();
                break;
            }
            // A plain header: no checksum or GSO state, one buffer.
            self.rx_frame[..VNET_HDR_LEN].fill(0);
            self.rx_frame[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = write_segments(mem, &chain.writable, 0, &self.rx_frame[..len]);
            if queue.add_used(mem, head, written as u32).is_err() {
                DeviceMetrics::add(&METRICS.bad_chains, 1);
            }
            DeviceMetrics::add(&METRICS.completed, 1);
            DeviceMetrics::add(&METRICS.bytes_in, (len - VNET_HDR_LEN) as u64);
            self.rx_pending = None;
            used = true;
        }
        used
    }

    /// Whether the tap should be polled: no frame is waiting and RX is not rate limited.
    pub fn wants_tap_reads(&self) -> bool {
        self.rx_pending.is_none() && !self.rx_limiter.is_blocked()
    }
}

/// Changes applied to a running interface.
pub enum NetUpdate {
    /// New RX and TX rate limiter buckets.
    RateLimiters(Option<RateLimiterUpdate>, Option<RateLimiterUpdate>),
}

/// The `fc_net<N>` thread's state.
pub struct NetHandler {
    engine: NetEngine,
    mem: GuestMemory,
    rxq: Queue,
    txq: Queue,
    rx_evt: EventFd,
    tx_evt: EventFd,
    interrupt: Arc<VirtioInterrupt>,
    tap_polled: bool,
}

impl NetHandler {
    fn rx(&mut self, epoll: &EpollSet) {
        if self.engine.process_rx(&self.mem, &mut self.rxq) {
            signal_used(&mut self.rxq, &self.mem, &self.interrupt);
        }
        self.poll_tap(epoll);
    }

    fn tx(&mut self) {
        if self.engine.process_tx(&self.mem, &mut self.txq) {
            signal_used(&mut self.txq, &self.mem, &self.interrupt);
        }
    }

    /// Watches the tap only while frames can be taken from it (level-triggered epoll would spin
    /// on a readable tap otherwise).
    fn poll_tap(&mut self, epoll: &EpollSet) {
        let want = self.engine.wants_tap_reads();
        if want != self.tap_polled {
            let events = if want {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            match epoll.modify(self.engine.tap.as_raw_fd(), events, TAP_TOKEN) {
                Ok(()) => self.tap_polled = want,
                Err(e) => log::error!("cannot change tap polling: {e}"),
            }
        }
    }
}

impl EventHandler for NetHandler {
    type Update = NetUpdate;
    type Backend = NetEngine;

    fn into_backend(self) -> NetEngine {
        self.engine
    }

    fn update_backend(engine: &mut NetEngine, update: NetUpdate) {
        let NetUpdate::RateLimiters(rx, tx) = update;
        if let Some(rx) = rx {
            engine.rx_limiter.update(&rx);
        }
        if let Some(tx) = tx {
            engine.tx_limiter.update(&tx);
        }
    }

    fn register(&mut self, epoll: &EpollSet) -> std::io::Result<()> {
        epoll.add(self.rx_evt.as_raw_fd(), EventSet::IN, RX_TOKEN)?;
        epoll.add(self.tx_evt.as_raw_fd(), EventSet::IN, TX_TOKEN)?;
        epoll.add(self.engine.tap.as_raw_fd(), EventSet::IN, TAP_TOKEN)?;
        self.tap_polled = true;
        epoll.add(
            self.engine.rx_limiter.as_raw_fd(),
            EventSet::IN,
            RX_LIMITER_TOKEN,
        )?;
        epoll.add(
            self.engine.tx_limiter.as_raw_fd(),
            EventSet::IN,
            TX_LIMITER_TOKEN,
        )
    }

    fn handle_event(&mut self, epoll: &EpollSet, token: u64, _events: EventSet) {
        match token {
            RX_TOKEN => {
                // Reading resets the counter; all new buffers are looked at below.
                let _ = self.rx_evt.read();
                self.rx(epoll);
            }
            TAP_TOKEN => self.rx(epoll),
            TX_TOKEN => {
                let _ = self.tx_evt.read();
                if !self.engine.tx_limiter.is_blocked() {
                    self.tx();
                }
            }
            RX_LIMITER_TOKEN => {
                self.engine.rx_limiter.on_timer();
                self.rx(epoll);
            }
            TX_LIMITER_TOKEN => {
                self.engine.tx_limiter.on_timer();
                self.tx();
            }
            _ => {}
        }
    }

    fn handle_update(&mut self, epoll: &EpollSet, update: NetUpdate) {
        let NetUpdate::RateLimiters(rx, tx) = update;
        if let Some(rx) = rx {
            self.engine.rx_limiter.update(&rx);
        }
        if let Some(tx) = tx {
            self.engine.tx_limiter.update(&tx);
        }
        self.rx(epoll);
        self.tx();
    }

    fn queue_states(&self) -> Vec<QueueState> {
        vec![self.rxq.state(), self.txq.state()]
    }
}

/// A virtio-net device.
pub struct Net {
    iface_id: String,
    features: u64,
    config: [u8; 8],
    thread: DeviceThread<NetHandler>,
}

impl Net {
    /// Opens the interface's tap; `index` numbers the device thread (`fc_net<index>`).
    pub fn new(
        config: &NetworkInterfaceConfig,
        index: usize,
        seccomp: &crate::seccomp::Filters,
    ) -> Result<Net, NetError> {
        let id = &config.iface_id;
        let mac = config
            .guest_mac
            .as_deref()
            .map(|m| parse_mac(m).ok_or_else(|| NetError::BadMac(id.clone(), m.to_string())))
            .transpose()?;
        let tap = Tap::open(&config.host_dev_name).map_err(|e| NetError::Tap(id.clone(), e))?;
        Self::with_tap(id, mac, tap, config, index, seccomp)
    }

    /// Builds the device around an open tap (or a stand-in fd).
    pub fn with_tap(
        id: &str,
        mac: Option<[u8; 6]>,
        tap: Tap,
        config: &NetworkInterfaceConfig,
        index: usize,
        seccomp: &crate::seccomp::Filters,
    ) -> Result<Net, NetError> {
        let io = |e| NetError::Io(id.to_string(), e);
        let rx = RateLimiter::new(config.rx_rate_limiter.as_ref()).map_err(io)?;
        let tx = RateLimiter::new(config.tx_rate_limiter.as_ref()).map_err(io)?;
        let mut features = VIRTIO_F_VERSION_1 | VIRTIO_NET_F_STATUS;
        let mut space = [0u8; 8];
        if let Some(mac) = mac {
            features |= VIRTIO_NET_F_MAC;
            space[..6].copy_from_slice(&mac);
        }
        space[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        Ok(Net {
            iface_id: id.to_string(),
            features,
            config: space,
            thread: DeviceThread::spawn(
                format!("fc_net{index}"),
                NetEngine::new(tap, rx, tx),
                seccomp,
            )
            .map_err(io)?,
        })
    }

    /// The interface id.
    pub fn iface_id(&self) -> &str {
        &self.iface_id
    }

    /// Applies PATCH /network-interfaces/{id}: new rate limiters, live if running.
    pub fn update(
        &mut self,
        rx: Option<RateLimiterUpdate>,
        tx: Option<RateLimiterUpdate>,
    ) -> Result<(), NetError> {
        self.thread
            .update(NetUpdate::RateLimiters(rx, tx))
            .map_err(|e| NetError::Io(self.iface_id.clone(), std::io::Error::other(e)))
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_window(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only unless VIRTIO_NET_F_CTRL_MAC_ADDR, which is not offered.
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let [(rxq, rx_evt), (txq, tx_evt)] = ctx.take_queues("virtio-net")?;
        let ActivateContext { mem, interrupt, .. } = ctx;
        self.thread.start(move |engine| NetHandler {
            engine,
            mem,
            rxq,
            txq,
            rx_evt,
            tx_evt,
            interrupt,
            tap_polled: false,
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
    use super::*;
    use crate::devices::virtio::chain::tests::{desc, test_memory};
    use std::os::unix::net::UnixDatagram;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn engine() -> (NetEngine, UnixDatagram) {
        let (ours, theirs) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs.set_nonblocking(true).unwrap();
        let engine = NetEngine::new(
            Tap::from_fd(ours.into()),
            RateLimiter::new(None).unwrap(),
            RateLimiter::new(None).unwrap(),
        );
        (engine, theirs)
    }

    #[test]
    fn macs_parse_strictly() {
        assert_eq!(
            parse_mac("06:00:AC:10:00:02"),
            Some([6, 0, 0xac, 0x10, 0, 2])
        );
        for bad in [
            "",
            "06:00:ac:10:00",
            "06:00:ac:10:00:02:03",
            "6:00:ac:10:00:02",
            "zz:00:ac:10:00:02",
            "06-00-ac-10-00-02",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn tx_sends_frames_with_a_clean_header_and_drops_bad_chains() {
        let mem = test_memory();
        let (mut e, peer) = engine();
        // Header claims GSO; the frame is split over two buffers.
        mem.write_slice(&[1, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], GuestAddress(0x10000))
            .unwrap();
        mem.write_slice(b"frame-part-1|", GuestAddress(0x11000))
            .unwrap();
        mem.write_slice(b"part-2", GuestAddress(0x12000)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(
            &[
                desc(0x10000, 12, false, Some(1)),
                desc(0x11000, 13, false, Some(2)),
                desc(0x12000, 6, false, None),
                // wrong direction
                desc(0x10000, 64, true, None),
                // shorter than a header
                desc(0x10000, 4, false, None),
                // outside memory
                desc(0x100000 - 8, 64, false, None),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(e.process_tx(&mem, &mut q));
        assert_eq!(q.next_used(), 4, "every chain is returned");
        let mut buf = [0u8; 128];
        let n = peer.recv(&mut buf).unwrap();
        assert_eq!(&buf[..12], &[0u8; 12]);
        assert_eq!(&buf[12..n], b"frame-part-1|part-2");
        assert!(peer.recv(&mut buf).is_err(), "bad chains send nothing");
    }

    #[test]
    fn rx_fills_small_buffers_and_drops_frames_that_do_not_fit() {
        let mem = test_memory();
        let (mut e, peer) = engine();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(
            &[desc(0x10000, 64, true, None), desc(0x11000, 64, true, None)],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut big = vec![0u8; 12 + 100];
        big[12..].fill(b'B');
        peer.send(&big).unwrap();
        let mut small = vec![0u8; 12];
        small.extend_from_slice(b"small frame");
        peer.send(&small).unwrap();
        peer.send(&small).unwrap();
        peer.send(&small).unwrap();
        assert!(e.process_rx(&mem, &mut q));
        assert_eq!(q.next_used(), 2);
        let used_len: u32 = mem.read_obj(vq.used_addr().unchecked_add(8)).unwrap();
        assert_eq!(used_len, 23);
        let mut buf = [0u8; 23];
        mem.read_slice(&mut buf, GuestAddress(0x10000)).unwrap();
        assert_eq!(&buf[10..12], &[1, 0], "num_buffers is 1");
        assert_eq!(&buf[12..], b"small frame");
        assert!(!e.wants_tap_reads(), "the third frame waits for a buffer");
        vq.add_desc_chains(&[desc(0x12000, 64, true, None)], 2)
            .unwrap();
        assert!(e.process_rx(&mem, &mut q));
        assert!(e.wants_tap_reads());
    }

    /// A rate limiter allowing one operation per 50 ms.
    fn one_op_per_50ms() -> RateLimiter {
        RateLimiter::new(Some(&crate::config::RateLimiterConfig {
            bandwidth: None,
            ops: Some(crate::config::TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: 50,
            }),
        }))
        .unwrap()
    }

    /// Waits (up to 5 s) for a blocked limiter's timer and lets it retry.
    fn wait_for_refill(limiter: &mut RateLimiter) {
        assert!(limiter.is_blocked());
        let mut fd = libc::pollfd {
            fd: limiter.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `fd` is one initialized pollfd, borrowed mutably for the call, and nfds is 1.
        let ready = unsafe { libc::poll(&mut fd, 1, 5000) };
        assert_eq!(ready, 1, "the timer never fired");
        limiter.on_timer();
    }

    /// A frame of `len` bytes behind a zero vnet header.
    fn frame(len: usize) -> Vec<u8> {
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend((0..len).map(|i| i as u8));
        frame
    }

    #[test]
    fn rx_rate_limiting_holds_frames_then_resumes() {
        let mem = test_memory();
        let (mut e, peer) = engine();
        e.rx_limiter = one_op_per_50ms();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(
            &[desc(0x10000, 64, true, None), desc(0x11000, 64, true, None)],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        peer.send(&frame(20)).unwrap();
        peer.send(&frame(30)).unwrap();
        let limited = METRICS
            .rate_limited
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(e.process_rx(&mem, &mut q));
        assert_eq!(q.next_used(), 1, "one frame, then the limiter says wait");
        assert!(!e.wants_tap_reads(), "no tap reads while blocked");
        assert!(
            METRICS
                .rate_limited
                .load(std::sync::atomic::Ordering::Relaxed)
                > limited
        );
        wait_for_refill(&mut e.rx_limiter);
        assert!(e.process_rx(&mem, &mut q));
        assert_eq!(q.next_used(), 2);
        let used_len: u32 = mem.read_obj(vq.used_addr().unchecked_add(16)).unwrap();
        assert_eq!(
            used_len as usize,
            VNET_HDR_LEN + 30,
            "the held frame, whole"
        );
        assert!(e.wants_tap_reads());
    }

    #[test]
    fn tx_rate_limiting_holds_chains_then_resumes() {
        let mem = test_memory();
        let (mut e, peer) = engine();
        e.tx_limiter = one_op_per_50ms();
        mem.write_slice(&frame(20), GuestAddress(0x10000)).unwrap();
        mem.write_slice(&frame(30), GuestAddress(0x11000)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(
            &[
                desc(0x10000, (VNET_HDR_LEN + 20) as u32, false, None),
                desc(0x11000, (VNET_HDR_LEN + 30) as u32, false, None),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let mut buf = [0u8; 128];
        assert!(e.process_tx(&mem, &mut q));
        assert_eq!(q.next_used(), 1);
        assert_eq!(peer.recv(&mut buf).unwrap(), VNET_HDR_LEN + 20);
        assert!(peer.recv(&mut buf).is_err(), "the second chain waits");
        wait_for_refill(&mut e.tx_limiter);
        assert!(e.process_tx(&mem, &mut q));
        assert_eq!(q.next_used(), 2);
        assert_eq!(peer.recv(&mut buf).unwrap(), VNET_HDR_LEN + 30);
    }

    #[test]
    fn tx_carries_the_largest_frame_and_drops_a_longer_one() {
        let mem = test_memory();
        let (mut e, peer) = engine();
        let largest = frame(MAX_FRAME_LEN);
        mem.write_slice(&largest, GuestAddress(0x10000)).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(
            &[
                desc(0x10000, largest.len() as u32, false, None),
                desc(0x10000, largest.len() as u32 + 1, false, None),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(e.process_tx(&mem, &mut q));
        assert_eq!(q.next_used(), 2, "both chains go back to the guest");
        let mut buf = vec![0u8; largest.len() + 16];
        assert_eq!(peer.recv(&mut buf).unwrap(), largest.len());
        assert_eq!(&buf[..largest.len()], &largest[..]);
        assert!(
            peer.recv(&mut buf).is_err(),
            "the 65563-byte frame is dropped"
        );
    }

    #[test]
    fn rx_carries_the_largest_frame_and_drops_a_longer_one() {
        let mem = test_memory();
        let (mut e, peer) = engine();
        let buffer = (VNET_HDR_LEN + MAX_FRAME_LEN + 1) as u32;
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(
            &[
                desc(0x10000, buffer, true, None),
                desc(0x30000, buffer, true, None),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        peer.send(&frame(MAX_FRAME_LEN + 1)).unwrap();
        peer.send(&frame(MAX_FRAME_LEN)).unwrap();
        assert!(e.process_rx(&mem, &mut q));
        assert_eq!(q.next_used(), 1, "only the 65562-byte frame arrives");
        let used_len: u32 = mem.read_obj(vq.used_addr().unchecked_add(8)).unwrap();
        assert_eq!(used_len as usize, VNET_HDR_LEN + MAX_FRAME_LEN);
        let mut delivered = vec![0u8; MAX_FRAME_LEN];
        mem.read_slice(&mut delivered, GuestAddress(0x10000 + VNET_HDR_LEN as u64))
            .unwrap();
        assert_eq!(delivered, frame(MAX_FRAME_LEN)[VNET_HDR_LEN..]);
    }
}
