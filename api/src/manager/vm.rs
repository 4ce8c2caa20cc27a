//! The vm tier's conversation with one mvm-vmm over its API socket (Firecracker's HTTP API,
//! types from the `vmm` crate).

use std::ffi::OsString;
use std::path::Path;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Request;
use serde::Serialize;
use vmm::config::{
    BootSource, CacheType, DriveConfig, MachineConfig, NetworkInterfaceConfig, VsockConfig,
};
use vmm::devices::legacy::console::ConsoleLimit;

use crate::error::{Error, Result};
use crate::http::{send_collect, Endpoint};

/// Jail paths the VMM sees.
pub const KERNEL: &str = "/kernel";
/// The shared read-only base image in the jail.
pub const ROOTFS: &str = "/rootfs.ext4";
/// The per-sandbox writable layer in the jail.
pub const LAYER: &str = "/layer.ext4";
/// The VMM's API socket in the jail.
pub const API_SOCK: &str = "/run/api.sock";
/// The hybrid vsock socket in the jail.
pub const VSOCK_SOCK: &str = "/run/vsock.sock";
/// Guest CID of every VM.
pub const GUEST_CID: u32 = 3;
/// The jail directory holding a pod's container images, one per drive slot.
pub const CONTAINER_DIR: &str = "/ctr";
/// Drive slots of a pod sandbox: the containers it can hold besides its first one. Each
/// is a virtio device with an interrupt of its own (19 in all, 4 used by the base VM).
pub const POD_SLOTS: u8 = 8;

/// A pod's drive slot: an empty image until a container's root is swapped in (Firecracker's
/// drive `PATCH`), which the guest sees as a capacity change of the same disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Slot(pub u8);

impl Slot {
    /// The drive id.
    pub fn drive_id(self) -> String {
        format!("ctr{}", self.0)
    }

    /// The image file, as the jailed VMM sees it.
    pub fn image(self) -> String {
        format!("{CONTAINER_DIR}/{}.ext4", self.0)
    }

    /// The image's file name in the container directory.
    pub fn file_name(self) -> String {
        format!("{}.ext4", self.0)
    }

    /// The guest's block device: drives appear in order after the template (`vda`) and the
    /// writable disk (`vdb`).
    pub fn guest_device(self) -> String {
        format!("/dev/vd{}", char::from(b'c' + self.0))
    }
}

/// What the guest makes of its writable disk (the second drive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestRoot {
    /// The upper layer of an overlay over the template's read-only image.
    Overlay,
    /// The root itself: a container's own file system (the template image only boots the
    /// kernel and the agent).
    Disk,
}

impl GuestRoot {
    /// The guest agent's kernel parameter for this root.
    fn kernel_param(self) -> &'static str {
        match self {
            GuestRoot::Overlay => "mvm.overlay=/dev/vdb",
            GuestRoot::Disk => "mvm.root=/dev/vdb",
        }
    }
}

/// Environment variable overriding [`DEFAULT_CONSOLE_LIMIT`].
pub const CONSOLE_LIMIT_ENV: &str = "MVM_CONSOLE_LIMIT";
/// Default size cap of a VM's console log: 1 MiB.
pub const DEFAULT_CONSOLE_LIMIT: u64 = 1 << 20;

/// The console limit from `MVM_CONSOLE_LIMIT`; the default when unset, or when invalid (with
/// a warning naming the problem).
pub fn console_limit_from_env() -> ConsoleLimit {
    let default =
        ConsoleLimit::new(DEFAULT_CONSOLE_LIMIT).expect("the default is above the minimum");
    match std::env::var(CONSOLE_LIMIT_ENV) {
        Ok(value) if !value.is_empty() => value.parse().unwrap_or_else(|e| {
            tracing::warn!("{CONSOLE_LIMIT_ENV}: {e}; using {DEFAULT_CONSOLE_LIMIT}");
            default
        }),
        _ => default,
    }
}

/// The `mvm-vmm` command line of sandbox `id` inside its jail.
pub fn vmm_args(id: &str, console_limit: ConsoleLimit) -> Vec<OsString> {
    vec![
        "--api-sock".into(),
        API_SOCK.into(),
        "--id".into(),
        id.into(),
        "--console-limit".into(),
        console_limit.bytes().to_string().into(),
    ]
}

/// What one VM is made of.
pub struct VmSpec<'a> {
    /// Sandbox id (hostname).
    pub id: &'a str,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory.
    pub memory_mib: u64,
    /// `ADDR/PREFIX,GATEWAY` for `mvm.ip`, when the sandbox has a network.
    pub ip: Option<String>,
    /// The guest's root file system.
    pub root: GuestRoot,
    /// Empty drive slots for the containers of a pod (0 for a plain sandbox).
    pub container_slots: u8,
    /// The guest NIC's MAC, when it takes over a pod interface's (else the VMM picks one).
    pub guest_mac: Option<String>,
}

async fn call<T: Serialize>(api: &Endpoint, method: &str, path: &str, body: &T) -> Result<()> {
    let body = serde_json::to_vec(body).expect("config types serialize");
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .expect("static request parts are valid");
    let (status, answer) = send_collect(api, req)
        .await
        .map_err(|e| Error::host("mvm-vmm API", e))?;
    if !(200..300).contains(&status) {
        return Err(Error::Host(format!(
            "mvm-vmm API {method} {path} answered {status}: {}",
            String::from_utf8_lossy(&answer).trim()
        )));
    }
    Ok(())
}

/// Configures and starts the VM behind the API socket at `api_sock` (a host path).
pub async fn configure_and_start(api_sock: &Path, spec: &VmSpec<'_>) -> Result<()> {
    let api = Endpoint::Unix(api_sock.to_path_buf());
    let mut boot_args = format!(
        "console=ttyS0 reboot=k panic=1 pci=off quiet {} mvm.hostname={}",
        spec.root.kernel_param(),
        spec.id
    );
    if let Some(ip) = &spec.ip {
        boot_args.push_str(&format!(" mvm.ip={ip}"));
    }
    call(
        &api,
        "PUT",
        "/boot-source",
        &BootSource {
            kernel_image_path: KERNEL.into(),
            boot_args: Some(boot_args),
            initrd_path: None,
        },
    )
    .await?;
    call(
        &api,
        "PUT",
        "/machine-config",
        &MachineConfig {
            vcpu_count: spec.vcpus,
            mem_size_mib: spec.memory_mib,
            ..MachineConfig::default()
        },
    )
    .await?;
    let slots =
        (0..spec.container_slots).map(|n| (Slot(n).drive_id(), Slot(n).image(), false, false));
    for (drive_id, path, root, read_only) in [
        ("rootfs".to_owned(), ROOTFS.to_owned(), true, true),
        ("layer".to_owned(), LAYER.to_owned(), false, false),
    ]
    .into_iter()
    .chain(slots)
    {
        call(
            &api,
            "PUT",
            &format!("/drives/{drive_id}"),
            &DriveConfig {
                drive_id,
                path_on_host: Some(path),
                is_root_device: root,
                is_read_only: Some(read_only),
                partuuid: None,
                cache_type: if read_only {
                    CacheType::default()
                } else {
                    CacheType::Writeback
                },
                io_engine: None,
                rate_limiter: None,
                socket: None,
            },
        )
        .await?;
    }
    if spec.ip.is_some() {
        call(
            &api,
            "PUT",
            "/network-interfaces/eth0",
            &NetworkInterfaceConfig {
                iface_id: "eth0".into(),
                host_dev_name: super::net::TAP_IF.into(),
                guest_mac: spec.guest_mac.clone(),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            },
        )
        .await?;
    }
    call(
        &api,
        "PUT",
        "/vsock",
        &VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: VSOCK_SOCK.into(),
            vsock_id: None,
        },
    )
    .await?;
    call(
        &api,
        "PUT",
        "/actions",
        &serde_json::json!({"action_type": "InstanceStart"}),
    )
    .await
}

/// Makes the running VM reopen the image of `slot`, which the host has just replaced: the
/// guest sees the disk's new capacity.
pub async fn reopen_slot(api_sock: &Path, slot: Slot) -> Result<()> {
    let api = Endpoint::Unix(api_sock.to_path_buf());
    let drive_id = slot.drive_id();
    call(
        &api,
        "PATCH",
        &format!("/drives/{drive_id}"),
        &serde_json::json!({ "drive_id": drive_id, "path_on_host": slot.image() }),
    )
    .await
}

/// Pauses or resumes the VM.
pub async fn set_paused(api_sock: &Path, paused: bool) -> Result<()> {
    let api = Endpoint::Unix(api_sock.to_path_buf());
    let state = if paused { "Paused" } else { "Resumed" };
    call(&api, "PATCH", "/vm", &serde_json::json!({ "state": state })).await
}
