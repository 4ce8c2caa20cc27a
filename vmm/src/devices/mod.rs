//! Emulated devices: legacy PC devices and virtio devices, placed on the [`crate::vstate::bus`]
//! buses by the builder, and the interrupt lines they raise.

pub mod legacy;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: an eventfd registered with KVM as an irqfd for one GSI.
pub struct IrqLine {
    evt: EventFd,
    gsi: u32,
}

impl IrqLine {
    /// Creates an unregistered line for `gsi`.
    pub fn new(gsi: u32) -> std::io::Result<Self> {
        Ok(IrqLine {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            gsi,
        })
    }

    /// The eventfd KVM listens on.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// The GSI (IOAPIC pin) this line raises.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }

    /// Raises the interrupt (edge).
    pub fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        IrqLine::trigger(self)
    }
}
