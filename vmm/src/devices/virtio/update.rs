//! Runtime changes to drives and network interfaces (Firecracker's `PATCH /drives/{id}` and
//! `PATCH /network-interfaces/{id}`): new rate limiter buckets and, for drives, a new backing
//! image. Before boot they edit the configuration; after boot they also reach the live device.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::block::Block;
use super::mmio::MmioTransport;
use super::net::Net;
use crate::config::{RateLimiterConfig, TokenBucketConfig, VmConfig};
use crate::rate_limiter::RateLimiterUpdate;

/// Body of `PATCH /drives/{drive_id}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DrivePatch {
    /// The drive to change.
    pub drive_id: String,
    /// A new host image (same read-only mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Buckets to replace; a bucket with size or refill_time 0 removes the limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Body of `PATCH /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfacePatch {
    /// The interface to change.
    pub iface_id: String,
    /// Receive buckets to replace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Transmit buckets to replace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Why a PATCH failed.
#[derive(Debug, thiserror::Error)]
pub enum PatchError {
    /// No such drive.
    #[error("no drive with drive_id {0:?}: PUT it first")]
    NoDrive(String),
    /// No such interface.
    #[error("no network interface with iface_id {0:?}: PUT it first")]
    NoInterface(String),
    /// The live block device refused the change.
    #[error(transparent)]
    Block(#[from] super::block::BlockError),
    /// The live network device refused the change.
    #[error(transparent)]
    Net(#[from] super::net::NetError),
}

/// Merges `patch` into a configured limiter: present buckets replace, disabled ones vanish.
fn merge(current: &mut Option<RateLimiterConfig>, patch: &RateLimiterConfig) {
    let enabled = |b: &TokenBucketConfig| b.size != 0 && b.refill_time != 0;
    let limiter = current.get_or_insert_with(RateLimiterConfig::default);
    if let Some(b) = &patch.bandwidth {
        limiter.bandwidth = enabled(b).then(|| b.clone());
    }
    if let Some(b) = &patch.ops {
        limiter.ops = enabled(b).then(|| b.clone());
    }
    if limiter.bandwidth.is_none() && limiter.ops.is_none() {
        *current = None;
    }
}

/// Finds the live device of type `T` that `pick` selects and runs `f` on it (through its
/// transport, which moves ConfigGeneration on when `f` changes the config space).
fn with_device<T: 'static, R>(
    devices: &[Arc<Mutex<MmioTransport>>],
    pick: impl Fn(&T) -> bool,
    f: impl FnOnce(&mut T) -> R,
) -> Option<R> {
    let mut f = Some(f);
    for transport in devices {
        let mut transport = transport.lock().unwrap_or_else(|p| p.into_inner());
        let result = transport.update_device(|device| {
            let device = device
                .as_any_mut()
                .downcast_mut::<T>()
                .filter(|d| pick(d))?;
            f.take().map(|f| f(device))
        });
        if result.is_some() {
            return result;
        }
    }
    None
}

/// Applies `PATCH /drives/{id}` to `config` and, when running, to the live device in `devices`.
pub fn patch_drive(
    config: &mut VmConfig,
    devices: Option<&[Arc<Mutex<MmioTransport>>]>,
    patch: DrivePatch,
) -> Result<(), PatchError> {
    let drive = config
        .drives
        .iter_mut()
        .find(|d| d.drive_id == patch.drive_id)
        .ok_or_else(|| PatchError::NoDrive(patch.drive_id.clone()))?;
    if let Some(devices) = devices {
        let limiter = patch.rate_limiter.as_ref().map(RateLimiterUpdate::from);
        with_device(
            devices,
            |b: &Block| b.drive_id() == patch.drive_id,
            |b| b.update(patch.path_on_host.as_deref(), limiter),
        )
        .ok_or_else(|| PatchError::NoDrive(patch.drive_id.clone()))??;
    } else if let Some(path) = &patch.path_on_host {
        // Checked now rather than at boot, so the caller learns about a bad path at once.
        std::fs::metadata(path).map_err(|err| super::block::BlockError::Open {
            id: patch.drive_id.clone(),
            path: path.clone(),
            err,
        })?;
    }
    if let Some(path) = patch.path_on_host {
        drive.path_on_host = Some(path);
    }
    if let Some(limiter) = &patch.rate_limiter {
        merge(&mut drive.rate_limiter, limiter);
    }
    Ok(())
}

/// Applies `PATCH /network-interfaces/{id}` to `config` and, when running, to the live device.
pub fn patch_network_interface(
    config: &mut VmConfig,
    devices: Option<&[Arc<Mutex<MmioTransport>>]>,
    patch: NetworkInterfacePatch,
) -> Result<(), PatchError> {
    let iface = config
        .network_interfaces
        .iter_mut()
        .find(|i| i.iface_id == patch.iface_id)
        .ok_or_else(|| PatchError::NoInterface(patch.iface_id.clone()))?;
    if let Some(devices) = devices {
        let rx = patch.rx_rate_limiter.as_ref().map(RateLimiterUpdate::from);
        let tx = patch.tx_rate_limiter.as_ref().map(RateLimiterUpdate::from);
        with_device(
            devices,
            |n: &Net| n.iface_id() == patch.iface_id,
            |n| n.update(rx, tx),
        )
        .ok_or_else(|| PatchError::NoInterface(patch.iface_id.clone()))??;
    }
    if let Some(limiter) = &patch.rx_rate_limiter {
        merge(&mut iface.rx_rate_limiter, limiter);
    }
    if let Some(limiter) = &patch.tx_rate_limiter {
        merge(&mut iface.tx_rate_limiter, limiter);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DriveConfig, NetworkInterfaceConfig};

    fn bucket(size: u64) -> TokenBucketConfig {
        TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time: 100,
        }
    }

    fn config() -> VmConfig {
        let mut c = VmConfig::default();
        c.drives.push(DriveConfig {
            drive_id: "root".into(),
            path_on_host: Some("/dev/null".into()),
            is_root_device: true,
            is_read_only: None,
            partuuid: None,
            cache_type: Default::default(),
            io_engine: None,
            rate_limiter: None,
            socket: None,
        });
        c.network_interfaces.push(NetworkInterfaceConfig {
            iface_id: "eth0".into(),
            host_dev_name: "tap0".into(),
            guest_mac: None,
            rx_rate_limiter: None,
            tx_rate_limiter: Some(RateLimiterConfig {
                bandwidth: Some(bucket(5)),
                ops: None,
            }),
        });
        c
    }

    #[test]
    fn patches_before_boot_edit_the_configuration() {
        let mut c = config();
        let limiter = RateLimiterConfig {
            bandwidth: Some(bucket(1000)),
            ops: None,
        };
        patch_drive(
            &mut c,
            None,
            DrivePatch {
                drive_id: "root".into(),
                path_on_host: Some("/dev/zero".into()),
                rate_limiter: Some(limiter.clone()),
            },
        )
        .unwrap();
        assert_eq!(c.drives[0].path_on_host.as_deref(), Some("/dev/zero"));
        assert_eq!(c.drives[0].rate_limiter, Some(limiter));
        let off = RateLimiterConfig {
            bandwidth: Some(bucket(0)),
            ops: None,
        };
        patch_network_interface(
            &mut c,
            None,
            NetworkInterfacePatch {
                iface_id: "eth0".into(),
                rx_rate_limiter: None,
                tx_rate_limiter: Some(off),
            },
        )
        .unwrap();
        assert_eq!(
            c.network_interfaces[0].tx_rate_limiter, None,
            "a zero bucket removes the limit"
        );
    }

    #[test]
    fn unknown_ids_and_missing_images_are_refused() {
        let mut c = config();
        let e = patch_drive(
            &mut c,
            None,
            DrivePatch {
                drive_id: "nope".into(),
                path_on_host: None,
                rate_limiter: None,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("no drive with drive_id \"nope\""));
        let e = patch_drive(
            &mut c,
            None,
            DrivePatch {
                drive_id: "root".into(),
                path_on_host: Some("/nonexistent/x.img".into()),
                rate_limiter: None,
            },
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("cannot open path_on_host /nonexistent/x.img"),
            "{e}"
        );
        assert_eq!(
            c.drives[0].path_on_host.as_deref(),
            Some("/dev/null"),
            "unchanged after a failure"
        );
        let e = patch_network_interface(
            &mut c,
            None,
            NetworkInterfacePatch {
                iface_id: "eth9".into(),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("eth9"));
    }

    #[test]
    fn a_new_image_moves_the_config_generation_of_the_live_device() {
        use crate::devices::virtio::mmio::MMIO_CONFIG_START;
        use crate::devices::virtio::VirtioInterrupt;
        use crate::devices::IrqLine;
        use crate::vstate::bus::BusDevice;
        const REG_CONFIG_GENERATION: u64 = 0xfc;

        let dir = std::env::temp_dir().join(format!("mvm-update-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let small = dir.join("small.img");
        let big = dir.join("big.img");
        std::fs::write(&small, vec![0u8; 1 << 20]).unwrap();
        std::fs::write(&big, vec![0u8; 2 << 20]).unwrap();
        let mut c = config();
        c.drives[0].path_on_host = Some(small.to_str().unwrap().into());
        let block = Block::new(&c.drives[0], 0, &crate::seccomp::Filters::disabled()).unwrap();
        let transport = MmioTransport::new(
            Box::new(block),
            crate::vstate::memory::create_guest_memory(16).unwrap(),
            Arc::new(VirtioInterrupt::new(IrqLine::new(5).unwrap())),
        )
        .unwrap();
        let devices = [Arc::new(Mutex::new(transport))];
        let read = |offset: u64| {
            let mut word = [0u8; 4];
            devices[0].lock().unwrap().read(offset, &mut word);
            u32::from_le_bytes(word)
        };
        let generation = read(REG_CONFIG_GENERATION);
        assert_eq!(read(MMIO_CONFIG_START), 2048, "1 MiB in sectors");
        patch_drive(
            &mut c,
            Some(&devices),
            DrivePatch {
                drive_id: "root".into(),
                path_on_host: Some(big.to_str().unwrap().into()),
                rate_limiter: None,
            },
        )
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(read(MMIO_CONFIG_START), 4096, "2 MiB in sectors");
        assert_ne!(read(REG_CONFIG_GENERATION), generation);
    }
}
