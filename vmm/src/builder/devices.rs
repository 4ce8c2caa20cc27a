//! The virtio devices a configuration asks for, created from the device layer's types.

use super::BuildError;
use crate::config::{DriveConfig, VmConfig};
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::net::Net;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::VirtioDevice;
use crate::seccomp::Filters;

/// Creates the virtio devices a configuration asks for: drives (root drive first, so it is
/// /dev/vda), then network interfaces, then vsock, then the balloon. Each device thread
/// confines itself with the `device` seccomp filter. This is the VMM's [`super::DeviceFactory`].
pub fn create_virtio_devices(
    config: &VmConfig,
    seccomp: &Filters,
) -> Result<Vec<Box<dyn VirtioDevice>>, BuildError> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut drives: Vec<&DriveConfig> = config.drives.iter().collect();
    drives.sort_by_key(|d| !d.is_root_device);
    for (index, drive) in drives.into_iter().enumerate() {
        let block = Block::new(drive, index, seccomp)
            .map_err(|e| BuildError::Device(format!("drive {}", drive.drive_id), e.to_string()))?;
        devices.push(Box::new(block));
    }
    for (index, iface) in config.network_interfaces.iter().enumerate() {
        let net = Net::new(iface, index, seccomp).map_err(|e| {
            BuildError::Device(
                format!("network interface {}", iface.iface_id),
                e.to_string(),
            )
        })?;
        devices.push(Box::new(net));
    }
    if let Some(vsock) = &config.vsock {
        let device = Vsock::new(vsock, seccomp)
            .map_err(|e| BuildError::Device("vsock".to_string(), e.to_string()))?;
        devices.push(Box::new(device));
    }
    if config.balloon.is_some() {
        let device = Balloon::new(seccomp)
            .map_err(|e| BuildError::Device("balloon".to_string(), e.to_string()))?;
        devices.push(Box::new(device));
    }
    Ok(devices)
}
