//! The vm tier: `mvm-vmm` in the jail, booting a micro-VM at once from a Firecracker-style
//! config file that the manager derives from the sandbox ([`vm_config`], a pure function) and
//! binds read-only into the jail; the agent answers over the VMM's hybrid vsock socket. The
//! VMM's API socket (Firecracker's HTTP API, types from the `vmm` crate) serves only runtime
//! changes: a pod's drive swaps and pause/resume, and snapshots: every VM can save itself
//! into its save directory ([`save_snapshot`], for a warm template or a fork), and a sandbox
//! restored from a saved VM starts `mvm-vmm` with no config and loads it
//! ([`Boot::Restore`], [`load_snapshot`]); the agent then gives the guest its own identity
//! ([`identity`]).

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::Request;
use jailer::{BindMount, JailConfig};
use serde::Serialize;
use vmm::config::{
    BalloonConfig, BootSource, CacheType, DriveConfig, MachineConfig, NetworkInterfaceConfig,
    VmConfig, VsockConfig,
};
use vmm::devices::legacy::console::ConsoleLimit;

use super::{base_jail, Start};
use crate::db::SandboxRow;
use crate::error::{Error, Result};
use crate::http::{send_collect, Endpoint};
use crate::manager::snapshot::{self, SavedVm};
use crate::manager::{beneath, net, rootfs, Live, Manager, ManagerConfig};
use crate::model::{Isolation, Sandbox, Template};

/// How long a new vm-tier sandbox may take to answer (the guest kernel's boot).
pub(in crate::manager) const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Jail paths the VMM sees: the guest kernel.
pub const KERNEL: &str = "/kernel";
/// The shared read-only base image in the jail.
pub const ROOTFS: &str = "/rootfs.ext4";
/// The per-sandbox writable layer in the jail.
pub const LAYER: &str = "/layer.ext4";
/// The VMM's API socket in the jail.
pub const API_SOCK: &str = "/run/api.sock";
/// The hybrid vsock socket in the jail.
pub const VSOCK_SOCK: &str = "/run/vsock.sock";
/// The VM's configuration file in the jail (`mvm-vmm --config-file`).
pub const CONFIG: &str = "/vm.json";
/// The configuration file's name in the sandbox directory.
const CONFIG_NAME: &str = "vm.json";
/// The writable disk's name in the sandbox directory.
pub(in crate::manager) const LAYER_NAME: &str = "layer.ext4";
/// The jail directory a VMM saves snapshots into (the sandbox's save directory).
pub const SAVE_DIR: &str = "/snapshot";
/// The jail directory of the saved VM a restoring VMM loads.
pub const RESTORE_DIR: &str = "/restore";
/// How long a restored VMM's API socket may take to appear.
const API_TIMEOUT: Duration = Duration::from_secs(10);
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

/// How a vm-tier sandbox's VM starts.
#[derive(Debug, Clone)]
pub(in crate::manager) enum Boot {
    /// Boots the template's kernel.
    Cold,
    /// Loads a saved VM (a warm template's, or a fork's source) instead of booting.
    Restore(SavedVm),
    /// Loads the sandbox's own saved VM (a resume of a `saved` sandbox): its writable layer
    /// and console log are the sandbox's already.
    Resume(SavedVm),
    /// Starts the VMM without a VM (a fork pool's): the VM saved by a fork is handed to it
    /// later ([`SavedVm::hand_to`]) and loaded.
    Standby,
}

impl Boot {
    /// Whether the VM is loaded from a snapshot (and its guest then given its identity).
    pub(in crate::manager) fn loads_snapshot(&self) -> bool {
        matches!(self, Boot::Restore(_) | Boot::Resume(_))
    }
}

/// The `mvm-vmm` command line of sandbox `id` inside its jail: boot from [`CONFIG`] at once
/// (`boot_now`) or wait for a snapshot to load, and serve the API for runtime changes.
fn vmm_args(id: &str, console_limit: ConsoleLimit, boot_now: bool) -> Vec<OsString> {
    let config: [OsString; 2] = ["--config-file".into(), CONFIG.into()];
    let rest: [OsString; 6] = [
        "--api-sock".into(),
        API_SOCK.into(),
        "--id".into(),
        id.into(),
        "--console-limit".into(),
        console_limit.bytes().to_string().into(),
    ];
    config
        .into_iter()
        .filter(|_| boot_now)
        .chain(rest)
        .collect()
}

/// What one VM is made of.
struct VmSpec<'a> {
    /// Sandbox id (hostname).
    pub id: &'a str,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory.
    pub memory_mib: u64,
    /// The guest's address and NIC, when the sandbox has a network.
    pub net: Option<GuestNet>,
    /// The guest's root file system.
    pub root: GuestRoot,
    /// Empty drive slots for the containers of a pod (0 for a plain sandbox).
    pub container_slots: u8,
    /// The guest's nameserver (`mvm.dns`): the sandbox's resolver, with egress `allow`.
    pub dns: Option<std::net::Ipv4Addr>,
}

/// The guest's side of a sandbox's network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    /// The guest interface's address and default route (the agent's `mvm.ip`).
    pub ip: agent::IpConfig,
    /// The NIC's MAC, when it takes over a pod interface's (else the VMM picks one).
    pub mac: Option<String>,
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

/// The VM's configuration: kernel and command line, vCPUs and memory, the drives (read-only
/// base, writable disk, a pod's empty slots), the NIC on the jail's tap and the vsock device.
fn vm_config(spec: &VmSpec<'_>) -> VmConfig {
    let mut boot_args = format!(
        "console=ttyS0 reboot=k panic=1 pci=off quiet {} mvm.hostname={}",
        spec.root.kernel_param(),
        spec.id
    );
    if let Some(net) = &spec.net {
        boot_args.push_str(&format!(" mvm.ip={}", net.ip));
    }
    if let Some(dns) = spec.dns {
        boot_args.push_str(&format!(" mvm.dns={dns}"));
    }
    let drive =
        |drive_id: String, path: String, is_root_device: bool, read_only: bool| DriveConfig {
            drive_id,
            path_on_host: Some(path),
            is_root_device,
            is_read_only: Some(read_only),
            partuuid: None,
            // No FLUSH (an fsync of the host file per guest sync): a guest's writes are in the
            // host's page cache once answered, and a disk outlives neither its sandbox's VMM
            // nor the host (after a host crash a restarted mvmd removes the sandbox), so a
            // flush has nothing to keep. Nor does a fork's save then wait for one in flight.
            cache_type: CacheType::Unsafe,
            io_engine: None,
            rate_limiter: None,
            socket: None,
        };
    let slots = (0..spec.container_slots)
        .map(Slot)
        .map(|slot| drive(slot.drive_id(), slot.image(), false, false));
    VmConfig {
        boot_source: Some(BootSource {
            kernel_image_path: KERNEL.into(),
            boot_args: Some(boot_args),
            initrd_path: None,
        }),
        machine_config: MachineConfig {
            vcpu_count: spec.vcpus,
            mem_size_mib: spec.memory_mib,
            ..MachineConfig::default()
        },
        drives: [
            drive("rootfs".into(), ROOTFS.into(), true, true),
            drive("layer".into(), LAYER.into(), false, false),
        ]
        .into_iter()
        .chain(slots)
        .collect(),
        network_interfaces: spec
            .net
            .iter()
            .map(|net| NetworkInterfaceConfig {
                iface_id: "eth0".into(),
                host_dev_name: net::TAP_IF.into(),
                guest_mac: net.mac.clone(),
                rx_rate_limiter: None,
                tx_rate_limiter: None,
            })
            .collect(),
        vsock: Some(VsockConfig {
            guest_cid: GUEST_CID,
            uds_path: VSOCK_SOCK.into(),
            vsock_id: None,
        }),
        // The guest gives back the memory it frees: the host holds its working set, and a
        // save (fork, warm) writes only that.
        balloon: Some(BalloonConfig {
            free_page_reporting: true,
            ..BalloonConfig::default()
        }),
        ..VmConfig::default()
    }
}

/// The host files a VM's jail binds in besides the template's kernel and base image.
struct Disks {
    /// The writable disk.
    layer: PathBuf,
    /// A pod's directory of container images, one per drive slot.
    containers: Option<PathBuf>,
}

/// Makes the writable disk in the sandbox directory `dir`, blank (the overlay's upper layer)
/// or a copy of `root_content` (the guest's root), and a pod's `container_slots` empty images.
fn prepare_disks(
    dir: &Path,
    uid: u32,
    root_content: Option<&Path>,
    container_slots: u8,
) -> Result<Disks> {
    let layer = dir.join(LAYER_NAME);
    rootfs::make_layer(&layer, uid, root_content)?;
    let containers = (container_slots > 0)
        .then(|| container_dir(dir, uid, container_slots))
        .transpose()?;
    Ok(Disks { layer, containers })
}

/// Writes `config` into the sandbox directory `dir` as a new root-owned file the VMM may only
/// read; returns its path.
fn write_config(dir: &Path, config: &VmConfig) -> Result<PathBuf> {
    let json = serde_json::to_vec_pretty(config).expect("config types serialize");
    let mut file = beneath::create_new_file(dir, CONFIG_NAME, 0o444)?;
    let path = dir.join(CONFIG_NAME);
    file.write_all(&json)
        .map_err(|e| Error::host(format!("writing {}", path.display()), e))?;
    Ok(path)
}

/// The jail of the vm tier: mvm-vmm booting template `t` from its config file, with the
/// kernel, the base image, the disks made in the sandbox directory `dir` (see
/// [`prepare_disks`]) and the config bound in; or, restoring the template's snapshot, the base
/// image, a copy of the snapshot's layer and the snapshot's files.
pub(super) fn vm_jail(
    cfg: &ManagerConfig,
    s: &Sandbox,
    uid: u32,
    t: &Template,
    dir: &Path,
    root_content: Option<&Path>,
    start: Start,
) -> Result<JailConfig> {
    let bind = |host: PathBuf, jail: &str, read_only: bool| BindMount {
        host,
        jail: jail.into(),
        read_only,
    };
    let mut mounts = vec![
        bind(t.rootfs.clone().into(), ROOTFS, true),
        bind(snapshot::make_save_dir(cfg, &s.id, uid)?, SAVE_DIR, false),
    ];
    match &start.boot {
        Boot::Restore(saved) | Boot::Resume(saved) => {
            let layer = dir.join(LAYER_NAME);
            if let Boot::Restore(_) = start.boot {
                saved.copy_layer(&layer, uid)?;
            }
            mounts.extend([
                bind(layer, LAYER, false),
                bind(saved.state(), &in_dir(RESTORE_DIR, snapshot::STATE), true),
                bind(saved.memory(), &in_dir(RESTORE_DIR, snapshot::MEMORY), true),
            ]);
        }
        Boot::Standby => {
            // An empty layer, filled in place once a fork's VM is handed over.
            let layer = dir.join(LAYER_NAME);
            beneath::create_new_file(dir, LAYER_NAME, 0o600)?;
            std::os::unix::fs::chown(&layer, Some(uid), Some(uid)).map_err(|e| {
                Error::host(format!("handing {} to the sandbox", layer.display()), e)
            })?;
            mounts.extend([
                bind(layer, LAYER, false),
                bind(snapshot::make_restore_dir(cfg, &s.id)?, RESTORE_DIR, true),
            ]);
        }
        Boot::Cold => {
            if !Path::new(&t.kernel).is_file() {
                return Err(Error::Invalid(format!(
                    "template {} has no kernel at {}; build it with `mvm build` (guest-kernel/build.sh)",
                    t.name, t.kernel
                )));
            }
            let disks = prepare_disks(dir, uid, root_content, start.container_slots)?;
            let config = write_config(
                dir,
                &vm_config(&VmSpec {
                    id: &s.id,
                    vcpus: s.vcpus as u8,
                    memory_mib: s.memory_mib,
                    net: start.guest_net,
                    root: match root_content {
                        Some(_) => GuestRoot::Disk,
                        None => GuestRoot::Overlay,
                    },
                    container_slots: start.container_slots,
                    dns: guest_resolver(s.network.egress),
                }),
            )?;
            mounts.extend([
                bind(t.kernel.clone().into(), KERNEL, true),
                bind(disks.layer, LAYER, false),
                bind(config, CONFIG, true),
            ]);
            mounts.extend(disks.containers.map(|dir| bind(dir, CONTAINER_DIR, false)));
        }
    }
    // Guest memory plus the VMM's own.
    let mut j = base_jail(
        cfg,
        s,
        uid,
        cfg.bin_dir.join("mvm-vmm"),
        (s.memory_mib + 128) << 20,
        start.share,
    )?;
    j.mounts = mounts;
    // Its own pid namespace's procfs: a save reads the VMM's page map there to skip the guest
    // memory never touched.
    j.mount_proc = true;
    j.args = vmm_args(&s.id, cfg.console_limit, matches!(start.boot, Boot::Cold));
    Ok(j)
}

/// Jail path of file `name` in jail directory `dir`.
fn in_dir(dir: &str, name: &str) -> String {
    format!("{dir}/{name}")
}

/// Saves the paused VM behind `api_sock` into its save directory (`PUT /snapshot/create`).
pub async fn save_snapshot(api_sock: &Path) -> Result<()> {
    let api = Endpoint::Unix(api_sock.to_path_buf());
    call(
        &api,
        "PUT",
        "/snapshot/create",
        &serde_json::json!({
            "snapshot_type": "Full",
            "snapshot_path": in_dir(SAVE_DIR, snapshot::STATE),
            "mem_file_path": in_dir(SAVE_DIR, snapshot::MEMORY),
        }),
    )
    .await
}

/// Makes the fresh VMM behind `api_sock` the VM saved in its jail's [`RESTORE_DIR`], running
/// (`PUT /snapshot/load`).
pub async fn load_snapshot(api_sock: &Path) -> Result<()> {
    let api = Endpoint::Unix(api_sock.to_path_buf());
    call(
        &api,
        "PUT",
        "/snapshot/load",
        &serde_json::json!({
            "snapshot_path": in_dir(RESTORE_DIR, snapshot::STATE),
            "mem_backend": {
                "backend_type": "File",
                "backend_path": in_dir(RESTORE_DIR, snapshot::MEMORY),
            },
            "resume_vm": true,
        }),
    )
    .await
}

/// The nameserver a guest with `egress` is given: the sandbox's resolver with egress
/// `allow`; otherwise none (the image's resolv.conf stays).
pub fn guest_resolver(egress: crate::model::Egress) -> Option<std::net::Ipv4Addr> {
    (egress == crate::model::Egress::Allow).then_some(crate::manager::net::RESOLVER_ADDR)
}

/// Whom a guest restored from a snapshot becomes: sandbox `id`, with `net` and the resolver
/// of `egress`. Its [`identity`](Becoming::identity) is made afresh for each attempt to
/// reach the guest's agent, so that the clock it carries is the host's at that moment.
#[derive(Debug, Clone, Copy)]
pub struct Becoming<'a> {
    /// The sandbox.
    pub id: &'a str,
    /// Its guest's side of the network, if it has one.
    pub net: Option<&'a GuestNet>,
    /// Its egress (the resolver with `allow`).
    pub egress: crate::model::Egress,
    /// The sandbox's own VM resumed ([`Boot::Resume`]): the same machine, which keeps its
    /// MAC (its network namespace's neighbours know it) and machine id.
    pub resumed: bool,
}

impl Becoming<'_> {
    /// What makes the guest sandbox `id`'s own: its host name, a MAC of its own (a pod's
    /// interface's, or one made from the id; kept when resumed), its address, its resolver
    /// (as `mvm.dns` at a cold boot), fresh entropy and the host's clock.
    pub fn identity(&self) -> Result<agent::Identity> {
        identity(self.id, self.net, guest_resolver(self.egress), self.resumed)
    }
}

fn identity(
    id: &str,
    net: Option<&GuestNet>,
    dns: Option<std::net::Ipv4Addr>,
    resumed: bool,
) -> Result<agent::Identity> {
    let mac = match net.and_then(|n| n.mac.as_deref()) {
        _ if resumed => None,
        Some(mac) => Some(parse_mac(mac)?),
        None => Some(mac_of(id)?),
    };
    Ok(agent::Identity {
        hostname: id.to_string(),
        mac,
        ip: net.map(|n| n.ip),
        entropy: crate::db::random_bytes(64)?,
        realtime_ns: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        dns,
        keep_machine_id: resumed,
    })
}

/// A locally administered unicast MAC made from sandbox id `id` (12 hex digits).
fn mac_of(id: &str) -> Result<[u8; 6]> {
    let bytes = (0..id.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(id.get(i..i + 2).unwrap_or("-"), 16))
        .collect::<std::result::Result<Vec<u8>, _>>()
        .ok()
        .filter(|b| b.len() >= 5)
        .ok_or_else(|| Error::Host(format!("sandbox id {id:?} is not 12 hex digits")))?;
    let mut mac = [0x02, 0, 0, 0, 0, 0];
    mac[1..].copy_from_slice(&bytes[bytes.len() - 5..]);
    Ok(mac)
}

fn parse_mac(mac: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = mac
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| Error::Host(format!("{mac:?} is not a MAC address")))?;
    bytes
        .try_into()
        .map_err(|_| Error::Host(format!("{mac:?} is not a MAC address")))
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

impl Manager {
    /// The VMM API socket of vm-tier sandbox `row`, reached without following its links.
    pub(in crate::manager) fn vmm_api(&self, row: &SandboxRow) -> Result<beneath::JailSocket> {
        let cfg = &self.inner.cfg;
        cfg.jail_socket(Isolation::Vm, &row.sandbox.id, cfg.uid(row), API_SOCK)
    }

    /// Waits until the just-spawned VMM of `row` (`live`) serves its API socket; fails when
    /// its jailer exits first.
    pub(in crate::manager) async fn await_vmm_api(
        &self,
        row: &SandboxRow,
        live: &Live,
    ) -> Result<beneath::JailSocket> {
        let timeout = super::patience(row, API_TIMEOUT);
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let listening = match self.vmm_api(row) {
                Ok(socket) => tokio::net::UnixStream::connect(socket.path())
                    .await
                    .map(|_| socket)
                    .map_err(|e| Error::host("connecting to the VMM's API socket", e)),
                Err(e) => Err(e),
            };
            match listening {
                Ok(socket) => return Ok(socket),
                Err(e) => {
                    if let Some(e) = self.start_up_failure(live, &row.sandbox, deadline, || {
                        format!("mvm-vmm did not serve its API within {timeout:?}: {e}")
                    }) {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }
}

/// Pauses or resumes the VM.
pub async fn set_paused(api_sock: &Path, paused: bool) -> Result<()> {
    let api = Endpoint::Unix(api_sock.to_path_buf());
    let state = if paused { "Paused" } else { "Resumed" };
    call(&api, "PATCH", "/vm", &serde_json::json!({ "state": state })).await
}

/// Makes the host directory of a pod's container images, `<sandbox dir>/ctr`, with an empty
/// image per slot owned by the sandbox's `uid`; bound into the jail at [`CONTAINER_DIR`].
/// The directory itself stays root's (mode 0755): the VMM opens the images but can plant
/// nothing beside them for root to follow when it swaps an image.
fn container_dir(sandbox_dir: &Path, uid: u32, slots: u8) -> Result<PathBuf> {
    let dir = sandbox_dir.join("ctr");
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&dir)
        .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)))
        .map_err(|e| Error::host(format!("creating {}", dir.display()), e))?;
    for slot in (0..slots).map(Slot) {
        put_image(&dir, slot, uid, None)?;
    }
    Ok(dir)
}

/// Replaces the image of `slot` in `dir` at once (write aside, then rename): with a copy of
/// the directory `content`, or empty.
pub(in crate::manager) fn put_image(
    dir: &Path,
    slot: Slot,
    uid: u32,
    content: Option<&Path>,
) -> Result<()> {
    let image = dir.join(slot.file_name());
    let staged_name = format!(".{}.new", slot.file_name());
    let staged = dir.join(&staged_name);
    let made = match content {
        Some(content) => rootfs::make_layer(&staged, uid, Some(content)),
        None => beneath::create_new_file(dir, &staged_name, 0o600).and_then(|file| {
            std::os::unix::fs::fchown(&file, Some(uid), Some(uid))
                .map_err(|e| Error::host(format!("chown {}", staged.display()), e))
        }),
    };
    made.and_then(|()| {
        std::fs::rename(&staged, &image)
            .map_err(|e| Error::host(format!("renaming {}", staged.display()), e))
    })
    .inspect_err(|_| {
        let _ = std::fs::remove_file(&staged);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ip(address: [u8; 4], prefix_len: u8, gateway: [u8; 4]) -> agent::IpConfig {
        agent::IpConfig {
            address: address.into(),
            prefix_len,
            gateway: Some(gateway.into()),
        }
    }

    /// The config as the VMM reads it: serialized, parsed and validated by `mvm-vmm`'s own code.
    fn as_read_by_vmm(spec: &VmSpec<'_>) -> (VmConfig, serde_json::Value) {
        let text = serde_json::to_string_pretty(&vm_config(spec)).unwrap();
        let parsed = VmConfig::from_json(&text).expect("mvm-vmm accepts the config");
        (parsed, serde_json::from_str(&text).unwrap())
    }

    #[test]
    fn a_sandbox_with_a_network() {
        let spec = VmSpec {
            id: "0123456789ab",
            vcpus: 2,
            memory_mib: 512,
            net: Some(GuestNet {
                ip: ip([10, 213, 0, 6], 30, [10, 213, 0, 5]),
                mac: None,
            }),
            root: GuestRoot::Overlay,
            container_slots: 0,
            dns: Some(std::net::Ipv4Addr::new(169, 254, 53, 53)),
        };
        let (config, json) = as_read_by_vmm(&spec);
        assert_eq!(config, vm_config(&spec));
        assert_eq!(
            json,
            json!({
                "boot-source": {
                    "kernel_image_path": "/kernel",
                    "boot_args": "console=ttyS0 reboot=k panic=1 pci=off quiet mvm.overlay=/dev/vdb \
                                  mvm.hostname=0123456789ab mvm.ip=10.213.0.6/30,10.213.0.5 \
                                  mvm.dns=169.254.53.53",
                },
                "machine-config": config.machine_config,
                "drives": [
                    {"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": true,
                     "is_read_only": true, "cache_type": "Unsafe"},
                    {"drive_id": "layer", "path_on_host": "/layer.ext4", "is_root_device": false,
                     "is_read_only": false, "cache_type": "Unsafe"},
                ],
                "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}],
                "vsock": {"guest_cid": 3, "uds_path": "/run/vsock.sock"},
                "balloon": {"amount_mib": 0, "deflate_on_oom": false,
                            "stats_polling_interval_s": 0, "free_page_reporting": true},
            })
        );
        assert_eq!(config.machine_config.vcpu_count, 2);
        assert_eq!(config.machine_config.mem_size_mib, 512);
    }

    #[test]
    fn a_pod_sandbox_without_a_network() {
        let spec = VmSpec {
            id: "0123456789ab",
            vcpus: 1,
            memory_mib: 256,
            net: None,
            root: GuestRoot::Disk,
            container_slots: POD_SLOTS,
            dns: None,
        };
        let (config, _) = as_read_by_vmm(&spec);
        let boot_args = config.boot_source.unwrap().boot_args.unwrap();
        assert!(boot_args.contains(" mvm.root=/dev/vdb "), "{boot_args}");
        assert!(!boot_args.contains("mvm.ip"), "{boot_args}");
        assert!(config.network_interfaces.is_empty());
        let drives: Vec<_> = config
            .drives
            .iter()
            .map(|d| (d.drive_id.as_str(), d.path_on_host.as_deref().unwrap()))
            .collect();
        assert_eq!(drives.len(), 2 + POD_SLOTS as usize);
        assert_eq!(drives[2], ("ctr0", "/ctr/0.ext4"));
        assert_eq!(drives[9], ("ctr7", "/ctr/7.ext4"));
        assert!(config.drives[2..]
            .iter()
            .all(|d| d.is_read_only == Some(false) && !d.is_root_device));
    }

    #[test]
    fn a_pod_network_keeps_the_interface_mac() {
        let spec = VmSpec {
            id: "0123456789ab",
            vcpus: 1,
            memory_mib: 256,
            net: Some(GuestNet {
                ip: ip([10, 88, 0, 7], 16, [10, 88, 0, 1]),
                mac: Some("02:42:0a:58:00:07".into()),
            }),
            root: GuestRoot::Disk,
            container_slots: 0,
            dns: None,
        };
        let (config, _) = as_read_by_vmm(&spec);
        assert_eq!(
            config.network_interfaces[0].guest_mac.as_deref(),
            Some("02:42:0a:58:00:07")
        );
    }

    #[test]
    fn the_vmm_boots_from_the_config_and_serves_its_api() {
        let args: Vec<String> = vmm_args("0123456789ab", ConsoleLimit::new(1 << 20).unwrap(), true)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--config-file",
                CONFIG,
                "--api-sock",
                API_SOCK,
                "--id",
                "0123456789ab",
                "--console-limit",
                "1048576"
            ]
        );
    }

    #[test]
    fn a_restoring_vmm_waits_for_the_snapshot() {
        let args: Vec<String> = vmm_args("0123456789ab", ConsoleLimit::new(4096).unwrap(), false)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--api-sock",
                API_SOCK,
                "--id",
                "0123456789ab",
                "--console-limit",
                "4096"
            ]
        );
    }

    #[test]
    fn a_restored_guest_gets_its_own_identity() {
        let net = GuestNet {
            ip: ip([10, 213, 0, 14], 30, [10, 213, 0, 13]),
            mac: None,
        };
        let a = identity("0123456789ab", Some(&net), None, false).unwrap();
        let b = identity("0123456789ac", Some(&net), None, false).unwrap();
        assert_eq!(a.hostname, "0123456789ab");
        assert_eq!(a.mac, Some([0x02, 0x23, 0x45, 0x67, 0x89, 0xab]));
        assert_ne!(a.mac, b.mac);
        assert_ne!(a.entropy, b.entropy);
        assert_eq!(a.entropy.len(), 64);
        assert_eq!(a.ip, Some(net.ip));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        assert!(now.abs_diff(a.realtime_ns) < 5_000_000_000);
        // A pod keeps its interface's MAC; no network, no address.
        let pod = GuestNet {
            mac: Some("02:42:0a:58:00:07".into()),
            ..net
        };
        assert_eq!(
            identity("0123456789ab", Some(&pod), None, false)
                .unwrap()
                .mac,
            Some([0x02, 0x42, 0x0a, 0x58, 0x00, 0x07])
        );
        assert_eq!(
            identity("0123456789ab", None, None, false).unwrap().ip,
            None
        );
        identity("not-hex", None, None, false).unwrap_err();
        // Egress `allow` names the sandbox's resolver, as `mvm.dns` does at a cold boot.
        let allow = guest_resolver(crate::model::Egress::Allow);
        let dns = identity("0123456789ab", Some(&net), allow, false)
            .unwrap()
            .dns;
        assert_eq!(dns, Some(crate::manager::net::RESOLVER_ADDR));
        for other in [crate::model::Egress::None, crate::model::Egress::All] {
            assert_eq!(guest_resolver(other), None);
        }
        // A sandbox's own VM resumed keeps its MAC and machine id; a copy gets new ones.
        let resumed = identity("0123456789ab", Some(&pod), None, true).unwrap();
        assert_eq!((resumed.mac, resumed.keep_machine_id), (None, true));
        assert_eq!(resumed.ip, Some(net.ip));
        assert!(!a.keep_machine_id);
    }
}
