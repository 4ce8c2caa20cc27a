//! The shim's state on the host: its directory, its own sandbox manager, and their cleanup.

use std::path::{Path, PathBuf};

use mvm_sandbox::db::Tenant;
use mvm_sandbox::{Manager, ManagerConfig};

use crate::error::{Error, Result};

/// Where the shims keep their sandbox managers' state, `<dir>/<namespace>/<id>`, unless
/// `MVM_SHIM_STATE_DIR` says otherwise.
const STATE_ROOT: &str = "/run/mvm-shim";
/// Parent cgroup of the shims' sandboxes, unless `MVM_CGROUP_PARENT` says otherwise.
const CGROUP_PARENT: &str = "mvm-shim";
/// The tenant of every shim sandbox.
const TENANT: &str = "containerd";

/// 64-bit FNV-1a of `bytes`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The state directory of the shim of container `id` in `namespace`: named by a hash of the
/// id, which may be 64 characters (Kubernetes), so the sandboxes' unix sockets below it stay
/// within the socket path limit.
pub(super) fn state_dir(namespace: &str, id: &str) -> PathBuf {
    std::env::var_os("MVM_SHIM_STATE_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| STATE_ROOT.into())
        .join(namespace)
        .join(format!("{:016x}", fnv1a(id.as_bytes())))
}

/// A sandbox manager of its own for one shim: own state and run dirs, so shims never see
/// (or reconcile away) each other's sandboxes. The sandbox user ids are spread by a hash of
/// the directory so concurrent pods do not share one.
fn manager_config(dir: &Path) -> ManagerConfig {
    let mut cfg = ManagerConfig::from_env();
    cfg.state_dir = dir.join("state");
    cfg.run_dir = dir.join("run");
    if std::env::var_os("MVM_CGROUP_PARENT").is_none_or(|p| p.is_empty()) {
        cfg.cgroup_parent = CGROUP_PARENT.into();
    }
    let h = fnv1a(dir.as_os_str().as_encoded_bytes());
    cfg.uid_base = 300_000 + (h % 100_000) as u32 * 16;
    cfg
}

/// Opens the shim's manager and its tenant.
pub(super) async fn open_manager(dir: &Path) -> Result<(Manager, Tenant)> {
    let (manager, _) = Manager::open(manager_config(dir)).await?;
    manager.db().ensure_tenant(TENANT)?;
    let tenant = manager
        .db()
        .tenant(TENANT)?
        .ok_or_else(|| Error::Host(format!("tenant {TENANT} missing from the shim's state")))?;
    Ok((manager, tenant))
}

/// Destroys every sandbox of a shim's manager, unmounts `rootfs` and removes the state dir.
pub(super) async fn cleanup(dir: &Path, rootfs: Option<&Path>) -> Result<()> {
    if dir.is_dir() {
        let (manager, tenant) = open_manager(dir).await?;
        for s in manager.list(Some(&tenant.name))? {
            manager.destroy(&tenant.name, &s.id).await?;
        }
    }
    if let Some(rootfs) = rootfs {
        unmount(rootfs)?;
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::host(format!("removing {}", dir.display()), e))
        }
        _ => {}
    }
    // The namespace directory goes with its last shim.
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}

/// Detaches whatever is mounted on `path` (nothing mounted is fine).
pub(super) fn unmount(path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid(format!("path {} contains NUL", path.display())))?;
    loop {
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } == 0 {
            // Stacked mounts (e.g. a retried create): take them all.
            continue;
        }
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
            _ => Err(Error::host(format!("unmounting {}", path.display()), e)),
        };
    }
}
