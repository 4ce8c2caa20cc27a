//! Emulated devices and the buses that route guest port-I/O and MMIO accesses to them.

pub mod bus;
pub mod legacy;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};

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

/// Creates the virtio devices a configuration asks for, root drive first.
pub fn create_virtio_devices(
    config: &crate::config::VmConfig,
) -> Result<Vec<Box<dyn virtio::VirtioDevice>>, crate::builder::BuildError> {
    use crate::config::ConfigError;
    let unsupported = |field: &str| {
        crate::builder::BuildError::Config(ConfigError::Unsupported {
            field: field.to_string(),
            why: "this device is not built into mvm-vmm yet".to_string(),
        })
    };
    if !config.drives.is_empty() {
        return Err(unsupported("drives"));
    }
    if !config.network_interfaces.is_empty() {
        return Err(unsupported("network-interfaces"));
    }
    if config.vsock.is_some() {
        return Err(unsupported("vsock"));
    }
    Ok(Vec::new())
}
