//! The virtio-mmio transport, version 2 ("modern") register layout.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::worker::{DeviceBroken, Frozen};
use super::{ActivateContext, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::vstate::bus::BusDevice;
use crate::vstate::memory::GuestMemory;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern (non-legacy) virtio-mmio version.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the driver ("MVM" in ASCII).
pub const MMIO_VENDOR_ID: u32 = 0x004d_564d;
/// Offset of the QueueNotify register, where KVM's ioeventfds are registered.
pub const MMIO_QUEUE_NOTIFY: u64 = 0x50;
/// Offset of the device configuration space.
pub const MMIO_CONFIG_START: u64 = 0x100;
/// Size of the device config space window (up to the end of the 4 KiB device window).
const MMIO_CONFIG_LEN: usize = 0x1000 - MMIO_CONFIG_START as usize;

const REG_MAGIC: u64 = 0x00;
const REG_VERSION: u64 = 0x04;
const REG_DEVICE_ID: u64 = 0x08;
const REG_VENDOR_ID: u64 = 0x0c;
const REG_DEVICE_FEATURES: u64 = 0x10;
const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
const REG_DRIVER_FEATURES: u64 = 0x20;
const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
const REG_QUEUE_SEL: u64 = 0x30;
const REG_QUEUE_NUM_MAX: u64 = 0x34;
const REG_QUEUE_NUM: u64 = 0x38;
const REG_QUEUE_READY: u64 = 0x44;
const REG_INTERRUPT_STATUS: u64 = 0x60;
const REG_INTERRUPT_ACK: u64 = 0x64;
const REG_STATUS: u64 = 0x70;
const REG_QUEUE_DESC_LOW: u64 = 0x80;
const REG_QUEUE_DESC_HIGH: u64 = 0x84;
const REG_QUEUE_AVAIL_LOW: u64 = 0x90;
const REG_QUEUE_AVAIL_HIGH: u64 = 0x94;
const REG_QUEUE_USED_LOW: u64 = 0xa0;
const REG_QUEUE_USED_HIGH: u64 = 0xa4;
const REG_CONFIG_GENERATION: u64 = 0xfc;

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready; the device goes live.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// One queue as a snapshot keeps it: what the driver configured and where the device was.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Queue size the driver chose.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// The next available ring entry the device takes.
    pub next_avail: u16,
    /// The next used ring entry the device fills.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX is in use.
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

/// A virtio-mmio window as a snapshot keeps it: the register file, the queues and whether
/// the device was live. The device itself is rebuilt from the VM's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// The virtio device id, checked against the rebuilt device.
    pub device_type: u32,
    /// The Status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The driver set DRIVER_OK and the device serves its queues.
    pub activated: bool,
    /// Every queue, in index order.
    pub queues: Vec<QueueSnapshot>,
}

/// Why a saved virtio-mmio window cannot be restored onto a device.
#[derive(Debug, thiserror::Error)]
pub enum MmioRestoreError {
    /// The configuration rebuilt another kind of device.
    #[error("the snapshot has virtio device type {saved} where the configuration makes {built}")]
    DeviceType {
        /// In the snapshot.
        saved: u32,
        /// Rebuilt.
        built: u32,
    },
    /// The queue count or a queue's size does not fit the device.
    #[error("virtio device type {0}: the snapshot's queues do not fit the device")]
    Queues(u32),
    /// The device did not come back live.
    #[error("virtio device type {0} could not be re-activated")]
    Activate(u32),
}

/// Register file and queue state of one virtio-mmio device window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_evts: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Wraps `device`; the queue eventfds it creates must be registered as ioeventfds (see
    /// [`MmioTransport::queue_evts`]) for fast notifications.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|max| Queue::new(*max).map_err(|e| std::io::Error::other(format!("{e:?}"))))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_evts = (0..queues.len())
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device,
            mem,
            interrupt,
            queues,
            queue_evts,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The window's state for a snapshot, with the device's thread held still: guest memory
    /// must be saved before the returned [`Frozen`] is dropped.
    pub fn save_state(&self) -> Result<(MmioState, Frozen), DeviceBroken> {
        let frozen = if self.activated {
            self.device.freeze()?
        } else {
            Frozen::idle()
        };
        // A live device's own copies know how far it got; the transport's were never used.
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| QueueSnapshot::from(frozen.queues.get(i).cloned().unwrap_or(q.state())))
            .collect();
        let state = MmioState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues,
        };
        Ok((state, frozen))
    }

    /// Puts a fresh window (made by [`MmioTransport::new`] around the device the VM's
    /// configuration rebuilt) back in the saved `state`; a device that was live is re-activated
    /// without the driver redoing the handshake.
    pub fn restore_state(&mut self, state: &MmioState) -> Result<(), MmioRestoreError> {
        let built = self.device.device_type();
        if state.device_type != built {
            return Err(MmioRestoreError::DeviceType {
                saved: state.device_type,
                built,
            });
        }
        if state.queues.len() != self.queues.len() {
            return Err(MmioRestoreError::Queues(built));
        }
        for (queue, saved) in self.queues.iter_mut().zip(&state.queues) {
            restore_queue(queue, saved).map_err(|_| MmioRestoreError::Queues(built))?;
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.config_generation = state.config_generation;
        self.interrupt.restore_status(state.interrupt_status);
        if state.activated {
            self.activate_device(true);
            if !self.activated {
                return Err(MmioRestoreError::Activate(built));
            }
        }
        Ok(())
    }

    /// The per-queue notification eventfds, in queue order.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The virtio device id behind this window.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Runs a runtime update (through the API) on the device behind this window. When the
    /// update changes the device's config space, ConfigGeneration changes with it, in the same
    /// critical section, so a driver reading a multi-word field across the update sees a new
    /// generation and reads again instead of using a torn value.
    pub fn update_device<R>(&mut self, update: impl FnOnce(&mut dyn VirtioDevice) -> R) -> R {
        let before = self.config_snapshot();
        let result = update(self.device.as_mut());
        if self.config_snapshot() != before {
            self.config_generation = self.config_generation.wrapping_add(1);
        }
        result
    }

    /// The whole config space window as the driver would read it.
    fn config_snapshot(&self) -> Vec<u8> {
        let mut config = vec![0; MMIO_CONFIG_LEN];
        self.device.read_config(0, &mut config);
        config
    }

    /// The current device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queues are only configurable between FEATURES_OK and DRIVER_OK.
        if self.activated {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn with_queue<R: Default>(&self, f: impl FnOnce(&Queue) -> R) -> R {
        self.queues
            .get(self.queue_sel as usize)
            .map(f)
            .unwrap_or_default()
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // The driver may only add bits (virtio 1.x, 3.1.1), except through a reset.
        if value & self.status != self.status {
            return;
        }
        let newly_set = value & !self.status;
        if newly_set & status::FEATURES_OK != 0
            && (self.acked_features & !self.device.features() != 0
                || self.acked_features & VIRTIO_F_VERSION_1 == 0)
        {
            // Refuse features we never offered, and legacy drivers (no VIRTIO_F_VERSION_1):
            // this is a modern-only (version 2) transport. FEATURES_OK stays clear.
            self.status = value & !status::FEATURES_OK;
            return;
        }
        self.status = value;
        if newly_set & status::DRIVER_OK != 0 && !self.activated {
            self.activate_device(false);
        }
    }

    /// Hands the device its queues (`restored`: by a snapshot restore, not the driver).
    fn activate_device(&mut self, restored: bool) {
        let ready = self.status & status::FEATURES_OK != 0
            && self
                .queues
                .iter()
                .all(|q| !q.ready() || q.is_valid(&self.mem));
        if !ready {
            self.status |= status::DEVICE_NEEDS_RESET;
            return;
        }
        let queue_evts = match self
            .queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
        {
            Ok(evts) => evts,
            Err(_) => {
                self.status |= status::DEVICE_NEEDS_RESET;
                return;
            }
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues: self.queues.iter().map(copy_queue).collect(),
            queue_evts,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
            restored,
        };
        match self.device.activate(ctx) {
            Ok(()) if restored => {
                self.activated = true;
                // A request the driver queued before the save may never have reached the
                // device thread (it froze before reading the notification) and the driver
                // sends none again while it waits: every queue is looked at once now.
                for evt in &self.queue_evts {
                    // A full counter already wakes the device.
                    let _ = evt.write(1);
                }
            }
            Ok(()) => self.activated = true,
            Err(_) => {
                self.status |= status::DEVICE_NEEDS_RESET;
                // Ignored: the driver sees DEVICE_NEEDS_RESET whether or not the IRQ lands.
                let _ = self.interrupt.signal_config_change();
            }
        }
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
            self.activated = false;
        }
        for queue in self.queues.iter_mut() {
            queue.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.acknowledge(u32::MAX);
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.with_queue(|q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.with_queue(|q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let features_phase = self.status & (status::DRIVER | status::FEATURES_OK) == status::DRIVER;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES if features_phase => match self.driver_features_sel {
                0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
                1 => {
                    self.acked_features =
                        (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_DESC_LOW => {
                self.set_queue_addr(|q| q.set_desc_table_address(Some(value), None))
            }
            REG_QUEUE_DESC_HIGH => {
                self.set_queue_addr(|q| q.set_desc_table_address(None, Some(value)))
            }
            REG_QUEUE_AVAIL_LOW => {
                self.set_queue_addr(|q| q.set_avail_ring_address(Some(value), None))
            }
            REG_QUEUE_AVAIL_HIGH => {
                self.set_queue_addr(|q| q.set_avail_ring_address(None, Some(value)))
            }
            REG_QUEUE_USED_LOW => {
                self.set_queue_addr(|q| q.set_used_ring_address(Some(value), None))
            }
            REG_QUEUE_USED_HIGH => {
                self.set_queue_addr(|q| q.set_used_ring_address(None, Some(value)))
            }
            MMIO_QUEUE_NOTIFY => {
                // Reached only when no ioeventfd caught the write.
                if let Some(evt) = self.queue_evts.get(value as usize) {
                    // A full eventfd already has a notification pending.
                    let _ = evt.write(1);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            REG_STATUS => self.set_status(value),
            _ => {}
        }
    }

    fn set_queue_addr(&mut self, set: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            set(q);
        }
    }
}

/// A copy of a configured queue for the device to own (virtio-queue's Queue is not Clone).
fn copy_queue(queue: &Queue) -> Queue {
    let mut copy = Queue::new(queue.max_size()).expect("the max size was valid for the original");
    restore_queue(&mut copy, &QueueSnapshot::from(queue.state()))
        .expect("the original accepted the same size");
    copy
}

/// Configures `queue` (with its max size) as `saved` describes, ring positions included.
fn restore_queue(queue: &mut Queue, saved: &QueueSnapshot) -> Result<(), virtio_queue::Error> {
    queue.try_set_size(saved.size)?;
    let split = |addr: u64| (Some(addr as u32), Some((addr >> 32) as u32));
    let (lo, hi) = split(saved.desc_table);
    queue.set_desc_table_address(lo, hi);
    let (lo, hi) = split(saved.avail_ring);
    queue.set_avail_ring_address(lo, hi);
    let (lo, hi) = split(saved.used_ring);
    queue.set_used_ring_address(lo, hi);
    queue.set_event_idx(saved.event_idx);
    queue.set_next_avail(saved.next_avail);
    queue.set_next_used(saved.next_used);
    queue.set_ready(saved.ready);
    Ok(())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= MMIO_CONFIG_START {
            self.device.read_config(offset - MMIO_CONFIG_START, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            // Registers are 32-bit; other widths read as zero.
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= MMIO_CONFIG_START {
            if self.status & status::DRIVER != 0 {
                self.device.write_config(offset - MMIO_CONFIG_START, data);
            }
        } else if let (Ok(bytes), true) = (<[u8; 4]>::try_from(data), offset % 4 == 0) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{read_config_window, ActivateError};
    use crate::devices::IrqLine;
    use crate::vstate::memory::create_guest_memory;
    use std::sync::atomic::{AtomicUsize, Ordering};

    struct Dummy {
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
        config: [u8; 4],
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            2
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_window(&self.config, offset, data);
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            assert_eq!(ctx.queues.len(), 2);
            assert_eq!(ctx.acked_features, VIRTIO_F_VERSION_1);
            self.activations.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
        fn freeze(&self) -> Result<Frozen, DeviceBroken> {
            Ok(Frozen::idle())
        }
        fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
            self
        }
    }

    fn transport() -> (MmioTransport, Arc<AtomicUsize>, Arc<AtomicUsize>) {
        let activations = Arc::new(AtomicUsize::new(0));
        let resets = Arc::new(AtomicUsize::new(0));
        let dev = Dummy {
            activations: activations.clone(),
            resets: resets.clone(),
            config: [1, 2, 3, 4],
        };
        let irq = Arc::new(VirtioInterrupt::new(IrqLine::new(5).unwrap()));
        let t = MmioTransport::new(Box::new(dev), create_guest_memory(16).unwrap(), irq).unwrap();
        (t, activations, resets)
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn identity_registers() {
        let (mut t, ..) = transport();
        assert_eq!(rd(&mut t, REG_MAGIC), MMIO_MAGIC_VALUE);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), 2);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1);
        let mut b = [0u8; 2];
        t.read(MMIO_CONFIG_START + 2, &mut b);
        assert_eq!(b, [3, 4]);
        t.read(MMIO_CONFIG_START + 3, &mut b);
        assert_eq!(b, [4, 0]);
    }

    fn setup_queues(t: &mut MmioTransport) {
        for (sel, base) in [(0u32, 0x1000u32), (1, 0x4000)] {
            wr(t, REG_QUEUE_SEL, sel);
            wr(t, REG_QUEUE_NUM, 8);
            wr(t, REG_QUEUE_DESC_LOW, base);
            wr(t, REG_QUEUE_AVAIL_LOW, base + 0x1000);
            wr(t, REG_QUEUE_USED_LOW, base + 0x2000);
            wr(t, REG_QUEUE_READY, 1);
        }
    }

    #[test]
    fn handshake_activates_then_reset_resets() {
        let (mut t, activations, resets) = transport();
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE);
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, REG_DRIVER_FEATURES, 1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        wr(&mut t, REG_STATUS, s);
        assert_eq!(rd(&mut t, REG_STATUS), s);
        setup_queues(&mut t);
        wr(&mut t, REG_STATUS, s | status::DRIVER_OK);
        assert_eq!(activations.load(Ordering::SeqCst), 1);
        // Queue registers are frozen while live.
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 1);
        wr(&mut t, REG_STATUS, 0);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
        assert_eq!(rd(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn unoffered_features_and_bad_queues_are_refused() {
        let (mut t, activations, _) = transport();
        wr(&mut t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, REG_DRIVER_FEATURES, 1 << 7);
        wr(
            &mut t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_eq!(rd(&mut t, REG_STATUS) & status::FEATURES_OK, 0);

        let (mut t, activations2, _) = transport();
        let s = negotiate(&mut t, VIRTIO_F_VERSION_1);
        assert_ne!(s & status::FEATURES_OK, 0);
        wr(&mut t, REG_QUEUE_SEL, 0);
        wr(&mut t, REG_QUEUE_NUM, 3); // not a power of two
        wr(&mut t, REG_QUEUE_DESC_LOW, 0xffff_f000); // outside guest memory
        wr(&mut t, REG_QUEUE_READY, 1);
        wr(&mut t, REG_STATUS, s | status::DRIVER_OK);
        assert_ne!(rd(&mut t, REG_STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(
            activations.load(Ordering::SeqCst) + activations2.load(Ordering::SeqCst),
            0
        );
        // Out-of-range queue selectors and odd widths are harmless.
        wr(&mut t, REG_QUEUE_SEL, 99);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0);
        t.write(REG_STATUS, &[1]);
        t.read(REG_MAGIC, &mut [0u8; 2]);
    }

    /// Drives the handshake up to FEATURES_OK with `acked` and returns the status read back.
    fn negotiate(t: &mut MmioTransport, acked: u64) -> u32 {
        wr(t, REG_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        for sel in 0..2 {
            wr(t, REG_DRIVER_FEATURES_SEL, sel);
            wr(t, REG_DRIVER_FEATURES, (acked >> (32 * sel)) as u32);
        }
        wr(
            t,
            REG_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        rd(t, REG_STATUS)
    }

    #[test]
    fn a_driver_without_version_1_gets_no_features_ok() {
        let (mut t, activations, _) = transport();
        // A legacy driver acking only an offered device feature.
        assert_eq!(negotiate(&mut t, 1) & status::FEATURES_OK, 0);
        setup_queues(&mut t);
        let s = rd(&mut t, REG_STATUS);
        wr(&mut t, REG_STATUS, s | status::DRIVER_OK);
        assert_eq!(activations.load(Ordering::SeqCst), 0);
        // After a reset the same device accepts a modern driver.
        wr(&mut t, REG_STATUS, 0);
        let s = negotiate(&mut t, VIRTIO_F_VERSION_1);
        assert_ne!(s & status::FEATURES_OK, 0);
    }

    #[test]
    fn a_saved_live_window_restores_live_without_a_handshake() {
        let (mut t, ..) = transport();
        let s = negotiate(&mut t, VIRTIO_F_VERSION_1);
        setup_queues(&mut t);
        wr(&mut t, REG_STATUS, s | status::DRIVER_OK);
        wr(&mut t, REG_QUEUE_SEL, 1);
        t.interrupt.signal_used_queue().unwrap();
        let (state, _frozen) = t.save_state().unwrap();
        assert!(state.activated);
        assert_eq!(state.queues[1].desc_table, 0x4000);

        let (mut fresh, activations, _) = transport();
        fresh.restore_state(&state).unwrap();
        assert_eq!(activations.load(Ordering::SeqCst), 1, "re-activated");
        // Each queue is notified once: what the driver queued before the save is served.
        for evt in fresh.queue_evts() {
            assert_eq!(evt.read().unwrap(), 1);
        }
        assert_eq!(fresh.save_state().unwrap().0, state);
        assert_eq!(rd(&mut fresh, REG_INTERRUPT_STATUS), 1);

        let mut foreign = state.clone();
        foreign.device_type = 19;
        let (mut other, ..) = transport();
        assert!(matches!(
            other.restore_state(&foreign).unwrap_err(),
            MmioRestoreError::DeviceType {
                saved: 19,
                built: 2
            }
        ));
        let mut bad = state;
        bad.queues[0].size = 3;
        let (mut other, ..) = transport();
        assert!(matches!(
            other.restore_state(&bad).unwrap_err(),
            MmioRestoreError::Queues(2)
        ));
    }

    fn dummy(device: &mut dyn VirtioDevice) -> &mut Dummy {
        device.as_any_mut().downcast_mut::<Dummy>().unwrap()
    }

    #[test]
    fn config_generation_changes_with_every_config_change() {
        let (mut t, ..) = transport();
        let generation = rd(&mut t, REG_CONFIG_GENERATION);
        t.update_device(|d| dummy(d).config = [9, 9, 3, 4]);
        let after_first = rd(&mut t, REG_CONFIG_GENERATION);
        assert_ne!(after_first, generation);
        let mut b = [0u8; 4];
        t.read(MMIO_CONFIG_START, &mut b);
        assert_eq!(b, [9, 9, 3, 4]);
        t.update_device(|d| dummy(d).config = [9, 9, 3, 5]);
        assert_ne!(rd(&mut t, REG_CONFIG_GENERATION), after_first);
        // An update that leaves the config space alone keeps the generation.
        let unchanged = rd(&mut t, REG_CONFIG_GENERATION);
        t.update_device(|d| dummy(d).resets.fetch_add(0, Ordering::SeqCst));
        assert_eq!(rd(&mut t, REG_CONFIG_GENERATION), unchanged);
    }
}
