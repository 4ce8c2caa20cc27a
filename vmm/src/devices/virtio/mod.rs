//! Virtio devices on the virtio-mmio transport (virtio 1.x, split rings).
//!
//! A device implements [`VirtioDevice`]; the [`mmio::MmioTransport`] owns its register file and
//! queue state and hands the device its queues, their notification eventfds and its interrupt
//! when the driver sets DRIVER_OK. Each activated device serves its queues on its own thread.

pub mod balloon;
pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod update;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::IrqLine;
use crate::vstate::memory::GuestMemory;

/// Feature bit every mvm device offers: virtio 1.x (no legacy interface).
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: a used buffer notification.
pub const VIRTIO_INT_USED_RING: u32 = 0x1;
/// Interrupt status bit: the configuration changed.
pub const VIRTIO_INT_CONFIG: u32 = 0x2;

/// A device's interrupt: the status register the driver reads and acknowledges, plus the line.
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: IrqLine,
}

impl VirtioInterrupt {
    /// An interrupt raising `line`.
    pub fn new(line: IrqLine) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Tells the driver that a queue has used buffers.
    pub fn signal_used_queue(&self) -> std::io::Result<()> {
        self.status.fetch_or(VIRTIO_INT_USED_RING, Ordering::SeqCst);
        self.line.trigger()
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) -> std::io::Result<()> {
        self.status.fetch_or(VIRTIO_INT_CONFIG, Ordering::SeqCst);
        self.line.trigger()
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets the InterruptStatus register as a snapshot saved it, without raising the line
    /// (the restored irqchip holds whatever the guest had not taken yet).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The line, for registering its irqfd with KVM.
    pub fn line(&self) -> &IrqLine {
        &self.line
    }
}

/// Everything a device needs to start serving its queues.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The queues as the driver configured them, in index order.
    pub queues: Vec<Queue>,
    /// One notification eventfd per queue (written by KVM's ioeventfd or by the transport).
    pub queue_evts: Vec<EventFd>,
    /// The device's interrupt.
    pub interrupt: Arc<VirtioInterrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// The device is re-activated by a snapshot restore, not by the driver: its host-side
    /// state (connections) is gone and the driver must be told if it kept any.
    pub restored: bool,
}

impl ActivateContext {
    /// Takes the first `N` queues with their notification eventfds, or fails naming `device`
    /// when the driver set up fewer.
    pub fn take_queues<const N: usize>(
        &mut self,
        device: &str,
    ) -> Result<[(Queue, EventFd); N], ActivateError> {
        if self.queues.len() < N || self.queue_evts.len() < N {
            return Err(ActivateError::BadConfig(format!(
                "{device} needs {N} queues, the driver set up {}",
                self.queues.len().min(self.queue_evts.len())
            )));
        }
        let pairs: Vec<(Queue, EventFd)> = self
            .queues
            .drain(..N)
            .zip(self.queue_evts.drain(..N))
            .collect();
        pairs
            .try_into()
            .map_err(|_| ActivateError::BadConfig(format!("{device}: queue bookkeeping broke")))
    }
}

/// Why a device refused to activate.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured the device in a way it cannot work with.
    #[error("bad device configuration from the driver: {0}")]
    BadConfig(String),
    /// A host resource could not be set up.
    #[error("cannot start the device's I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// A virtio device's own behaviour, independent of the transport.
pub trait VirtioDevice: Send {
    /// Virtio device id (2 = block, 1 = net, 19 = vsock, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver (must include [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts serving the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops serving the queues (the driver reset the device); the transport resets queue state.
    fn reset(&mut self);
    /// Holds the device's thread still for a snapshot and reports its queues (see
    /// [`worker::Frozen`]).
    fn freeze(&self) -> Result<worker::Frozen, worker::DeviceBroken>;
    /// The concrete device, for runtime updates through the API (PATCH /drives, ...).
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any;
}

/// Copies the window `[offset, offset + data.len())` of a device's config space into `data`;
/// reads past the end return zeros, as the virtio spec lets devices do.
pub fn read_config_window(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if let Some(src) = config.get(start..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}
