//! virtio-balloon (virtio 1.x, 5.5) for free page reporting only, served by thread `fc_balloon`.
//!
//! With VIRTIO_BALLOON_F_REPORTING the guest kernel hands back memory it has freed: each buffer
//! on the reporting queue *is* a free guest range (2 MiB blocks from Linux), and the device
//! discards its host pages ([`discard`]), so a guest gives back what it no longer uses: the host
//! holds only its working set, and a snapshot of it writes only that (the discarded pages are
//! holes). The guest owns the range again once the buffer is used; its contents are undefined
//! to the guest (the device offers no VIRTIO_BALLOON_F_PAGE_POISON, so a guest that poisons or
//! zeroes free pages turns reporting off itself).
//!
//! Unlike Firecracker's, this balloon never inflates: its target (`num_pages`) stays 0, so the
//! inflate and deflate queues carry nothing a driver needs; a chain put there is given back
//! unused.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::chain::Chain;
use super::worker::{signal_used, DeviceBroken, DeviceThread, EpollSet, EventHandler, Frozen};
use super::{
    read_config_window, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::metrics::virtio::{DeviceMetrics, BALLOON as METRICS};
use crate::vstate::memory::{discard, GuestMemory};

/// Virtio device id of memory balloons.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// Feature: the driver reports free pages on the reporting queue.
pub const VIRTIO_BALLOON_F_REPORTING: u64 = 1 << 5;
/// Size of each queue (Linux needs at least 32 descriptors on the reporting queue).
pub const QUEUE_SIZE: u16 = 256;
/// The queues: inflate, deflate and, with neither statistics nor hinting offered, reporting
/// at index 2.
const QUEUES: usize = 3;
/// Index of the reporting queue.
const REPORTING: usize = 2;

/// The balloon's thread state: its queues while the driver runs it.
pub struct BalloonHandler {
    mem: GuestMemory,
    queues: [Queue; QUEUES],
    evts: [EventFd; QUEUES],
    interrupt: Arc<VirtioInterrupt>,
}

/// Serves every chain on `queue`: a chain on the reporting queue (`reporting`) has its ranges
/// discarded, any other is given back as it came; every chain comes back used with length 0.
/// Returns whether any chain was used.
pub fn serve_queue(mem: &GuestMemory, queue: &mut Queue, reporting: bool) -> bool {
    let mut used = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = match Chain::parse(chain, mem, u64::MAX) {
            Ok(chain) => {
                if reporting {
                    discard_reported(mem, &chain);
                }
                DeviceMetrics::add(&METRICS.completed, 1);
                chain.head
            }
            Err(bad) => {
                DeviceMetrics::add(&METRICS.bad_chains, 1);
                bad.head
            }
        };
        if queue.add_used(mem, head, 0).is_err() {
            DeviceMetrics::add(&METRICS.bad_chains, 1);
        }
        used = true;
    }
    used
}

/// Discards every range of a reporting `chain` (Linux makes them device-writable; either
/// direction is taken). A range that is not whole host pages is left alone and counted, not
/// logged (a guest's mistakes must not flood the log).
fn discard_reported(mem: &GuestMemory, chain: &Chain) {
    for segment in chain.readable.iter().chain(&chain.writable) {
        match discard(mem, segment.addr, segment.len as usize) {
            Ok(()) => DeviceMetrics::add(&METRICS.bytes_in, u64::from(segment.len)),
            Err(_) => DeviceMetrics::add(&METRICS.failed, 1),
        }
    }
}

impl EventHandler for BalloonHandler {
    type Update = ();
    type Backend = ();

    fn into_backend(self) {}

    fn update_backend(_backend: &mut (), _update: ()) {}

    fn register(&mut self, epoll: &EpollSet) -> std::io::Result<()> {
        for (token, evt) in self.evts.iter().enumerate() {
            epoll.add(evt.as_raw_fd(), EventSet::IN, token as u64)?;
        }
        Ok(())
    }

    fn handle_event(&mut self, _epoll: &EpollSet, token: u64, _events: EventSet) {
        let Some(index) = usize::try_from(token).ok().filter(|i| *i < QUEUES) else {
            return;
        };
        // Reading resets the counter; every available chain is served below.
        let _ = self.evts[index].read();
        if serve_queue(&self.mem, &mut self.queues[index], index == REPORTING) {
            signal_used(&mut self.queues[index], &self.mem, &self.interrupt);
        }
    }

    fn handle_update(&mut self, _epoll: &EpollSet, _update: ()) {}

    fn queue_states(&self) -> Vec<QueueState> {
        self.queues.iter().map(|q| q.state()).collect()
    }
}

/// A virtio-balloon device to which the guest reports its free pages.
pub struct Balloon {
    /// The `actual` field of the config space, as the driver last wrote it.
    actual: u32,
    thread: DeviceThread<BalloonHandler>,
}

impl Balloon {
    /// The device of a `balloon` section, its thread confined by `seccomp`'s `device` filter.
    pub fn new(seccomp: &crate::seccomp::Filters) -> std::io::Result<Self> {
        Ok(Balloon {
            actual: 0,
            thread: DeviceThread::spawn("fc_balloon".into(), (), seccomp)?,
        })
    }

    /// `struct virtio_balloon_config`: `num_pages` (the target: always 0) and `actual`.
    fn config_space(&self) -> [u8; 8] {
        let mut space = [0u8; 8];
        space[4..].copy_from_slice(&self.actual.to_le_bytes());
        space
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; QUEUES]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_REPORTING
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_window(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            self.actual = u32::from_le_bytes(data.try_into().expect("4 bytes"));
        }
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let queues = ctx.take_queues::<QUEUES>("virtio-balloon")?;
        let ActivateContext { mem, interrupt, .. } = ctx;
        let [(q0, e0), (q1, e1), (q2, e2)] = queues;
        // Reports queued before DRIVER_OK (or before a save: the transport notifies a
        // restored device's queues) are served on the first notification.
        self.thread.start(move |()| BalloonHandler {
            mem,
            queues: [q0, q1, q2],
            evts: [e0, e1, e2],
            interrupt,
        })
    }

    fn reset(&mut self) {
        self.thread.stop();
        self.actual = 0;
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
    use crate::devices::virtio::chain::tests::desc;
    use crate::devices::IrqLine;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

    const PAGE: u64 = 4096;
    /// Free ranges start past the mock queue's structures.
    const FREE: u64 = 0x10_0000;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap()
    }

    fn resident(mem: &GuestMemory, addr: u64) -> bool {
        let host = mem.get_host_address(GuestAddress(addr)).unwrap();
        let mut vec = 0u8;
        // SAFETY: `host` is the page-aligned start of a mapped guest page; mincore writes one
        // byte for one page into `vec`.
        let rc = unsafe { libc::mincore(host.cast(), PAGE as usize, &mut vec) };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        vec & 1 == 1
    }

    /// Serves one chain of `descs` on queue `index` of a handler over `mem`; returns the used
    /// ring's (head, len) and whether the interrupt's status says "used".
    fn serve(
        mem: &GuestMemory,
        index: usize,
        descs: &[virtio_queue::desc::RawDescriptor],
    ) -> (u32, u32) {
        let vq = MockSplitQueue::new(mem, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let queue = |i: usize| -> Queue {
            if i == index {
                vq.create_queue().unwrap()
            } else {
                Queue::new(16).unwrap()
            }
        };
        let evt = || EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut handler = BalloonHandler {
            mem: mem.clone(),
            queues: [queue(0), queue(1), queue(2)],
            evts: [evt(), evt(), evt()],
            interrupt: Arc::new(VirtioInterrupt::new(IrqLine::new(5).unwrap())),
        };
        handler.evts[index].write(1).unwrap();
        let epoll = EpollSet::new().unwrap();
        handler.handle_event(&epoll, index as u64, EventSet::IN);
        assert_eq!(
            handler.interrupt.status() & super::super::VIRTIO_INT_USED_RING,
            1
        );
        let used = vq.used_addr();
        let head: u32 = mem.read_obj(used.unchecked_add(4)).unwrap();
        let len: u32 = mem.read_obj(used.unchecked_add(8)).unwrap();
        (head, len)
    }

    /// A reported range's pages are given back to the host (no longer resident, zero when the
    /// guest touches them again); the pages around it keep their data; the chain comes back
    /// used with length 0.
    #[test]
    fn reported_free_pages_are_given_back_to_the_host() {
        let mem = memory();
        for page in 0..4 {
            mem.write_slice(&[0xa5; PAGE as usize], GuestAddress(FREE + page * PAGE))
                .unwrap();
        }
        assert!((0..4).all(|p| resident(&mem, FREE + p * PAGE)));
        let (head, len) = serve(
            &mem,
            REPORTING,
            &[
                desc(FREE + PAGE, PAGE as u32, true, Some(1)),
                desc(FREE + 2 * PAGE, PAGE as u32, true, None),
            ],
        );
        assert_eq!((head, len), (0, 0));
        assert!(resident(&mem, FREE) && resident(&mem, FREE + 3 * PAGE));
        assert!(!resident(&mem, FREE + PAGE) && !resident(&mem, FREE + 2 * PAGE));
        let byte = |addr: u64| mem.read_obj::<u8>(GuestAddress(addr)).unwrap();
        assert_eq!(
            (
                byte(FREE),
                byte(FREE + PAGE),
                byte(FREE + 2 * PAGE + 17),
                byte(FREE + 3 * PAGE)
            ),
            (0xa5, 0, 0, 0xa5)
        );
    }

    /// A range that is not whole pages, or lies outside guest memory, discards nothing (the
    /// page it touches keeps its data) and the chain still comes back; chains on the inflate
    /// queue discard nothing either.
    #[test]
    fn bad_reports_and_inflate_chains_discard_nothing() {
        let mem = memory();
        mem.write_slice(&[0x5a; 2 * PAGE as usize], GuestAddress(FREE))
            .unwrap();
        let kept = |mem: &GuestMemory| {
            mem.read_obj::<u8>(GuestAddress(FREE)).unwrap() == 0x5a
                && mem.read_obj::<u8>(GuestAddress(FREE + PAGE)).unwrap() == 0x5a
        };
        for descs in [
            vec![desc(FREE + 512, PAGE as u32, true, None)],
            vec![desc(FREE, 100, true, None)],
            vec![desc(4 << 20, PAGE as u32, true, None)],
            vec![
                desc(FREE, PAGE as u32, true, Some(1)),
                desc(FREE, 8, false, None),
            ],
        ] {
            assert_eq!(serve(&mem, REPORTING, &descs), (0, 0));
        }
        // The last chain was refused whole (readable after writable): nothing discarded.
        assert!(kept(&mem));
        assert_eq!(
            serve(&mem, 0, &[desc(FREE, PAGE as u32, false, None)]),
            (0, 0)
        );
        assert!(kept(&mem));
    }
}
