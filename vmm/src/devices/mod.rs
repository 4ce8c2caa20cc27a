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

/// Creates the virtio devices a configuration asks for: drives (root drive first, so it is
/// /dev/vda), then network interfaces, then vsock. Each device thread confines itself with the
/// `device` seccomp filter.
pub fn create_virtio_devices(
    config: &crate::config::VmConfig,
    seccomp: &crate::seccomp::Filters,
) -> Result<Vec<Box<dyn virtio::VirtioDevice>>, crate::builder::BuildError> {
    use crate::builder::BuildError;
    let mut devices: Vec<Box<dyn virtio::VirtioDevice>> = Vec::new();
    let mut drives: Vec<&crate::config::DriveConfig> = config.drives.iter().collect();
    drives.sort_by_key(|d| !d.is_root_device);
    for (index, drive) in drives.into_iter().enumerate() {
        let block = virtio::block::Block::new(drive, index, seccomp)
            .map_err(|e| BuildError::Device(format!("drive {}", drive.drive_id), e.to_string()))?;
        devices.push(Box::new(block));
    }
    for (index, iface) in config.network_interfaces.iter().enumerate() {
        let net = virtio::net::Net::new(iface, index, seccomp).map_err(|e| {
            BuildError::Device(
                format!("network interface {}", iface.iface_id),
                e.to_string(),
            )
        })?;
        devices.push(Box::new(net));
    }
    if let Some(vsock) = &config.vsock {
        let device = virtio::vsock::Vsock::new(vsock, seccomp)
            .map_err(|e| BuildError::Device("vsock".to_string(), e.to_string()))?;
        devices.push(Box::new(device));
    }
    Ok(devices)
}
