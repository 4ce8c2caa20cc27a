//! The root file system: the base mounts, and the switch to an overlay root or to a
//! writable disk as root.

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use nix::mount::{mount, MsFlags};

use super::error::{sys, sys_io, InitError};

/// Set once this init has mounted the root itself ([`pivot_to_overlay`], [`pivot_to_disk`]):
/// only then does [`super::quiesce_file_systems`] remount `/` read-only (the kernel mounts
/// the boot image read-only, and a root it did not mount may be shared with someone else).
static OWN_ROOT: AtomicBool = AtomicBool::new(false);

/// The roots of file systems mounted by this init that no path reaches any more and that
/// [`super::quiesce_file_systems`] makes read-only: the overlay's upper disk, detached with
/// the old root by [`pivot_to_overlay`].
static DETACHED_DISKS: Mutex<Vec<OwnedFd>> = Mutex::new(Vec::new());

/// Whether this init has mounted the root itself.
pub(super) fn owns_root() -> bool {
    OWN_ROOT.load(Ordering::Relaxed)
}

/// Hands over the upper disks detached by [`pivot_to_overlay`] (once: the list is emptied).
pub(super) fn take_detached_disks() -> Vec<OwnedFd> {
    std::mem::take(
        &mut *DETACHED_DISKS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    )
}

/// Upper layer of the overlay root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayUpper {
    /// A tmpfs: changes are lost when the VM stops.
    Tmpfs,
    /// An ext4 block device (the per-sandbox writable disk).
    Device(PathBuf),
}

/// True when `path` is the root of a mount (its device differs from its parent's).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), std::fs::metadata(path.join(".."))) {
        (Ok(me), Ok(parent)) => me.dev() != parent.dev() || me.ino() == parent.ino(),
        _ => false,
    }
}

/// Mounts `fstype` from `source` on `target` (made if missing), unless something is mounted
/// there already.
pub(super) fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    let target = Path::new(target);
    if is_mount_point(target) {
        return Ok(());
    }
    std::fs::create_dir_all(target).map_err(sys_io(format!("creating {}", target.display())))?;
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(sys(format!("mounting {fstype} on {}", target.display())))
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /tmp and /run (skipping those already
/// mounted).
pub fn mount_base() -> Result<(), InitError> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nodev, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nodev, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    )?;
    mount_fs(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    Ok(())
}

/// Makes `/` private and mounts a tmpfs on `staging` (an existing directory) to hold the
/// mount points of a new root; returns the directory to mount the new root on.
fn stage_new_root(staging: &Path) -> Result<PathBuf, InitError> {
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(sys("making / private"))?;
    mount(
        Some("tmpfs"),
        staging,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(sys(format!("mounting a tmpfs on {}", staging.display())))?;
    let new_root = staging.join("root");
    std::fs::create_dir(&new_root).map_err(sys_io(format!("creating {}", new_root.display())))?;
    Ok(new_root)
}

/// Mounts an overlay of `lower` (read-only) and `upper` (writable) and makes it the root
/// of this mount namespace. `staging` (an existing directory) gets a tmpfs holding the
/// mount points; it and the old root are detached afterwards. A persistent upper device
/// keeps its changes in `upper/` and `work/` at its top.
pub fn pivot_to_overlay(
    lower: &Path,
    upper: &OverlayUpper,
    staging: &Path,
) -> Result<(), InitError> {
    let none: Option<&str> = None;
    let new_root = stage_new_root(staging)?;
    let upper_mnt = staging.join("upper");
    std::fs::create_dir(&upper_mnt).map_err(sys_io(format!("creating {}", upper_mnt.display())))?;
    match upper {
        OverlayUpper::Tmpfs => mount(
            Some("tmpfs"),
            &upper_mnt,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0755"),
        ),
        OverlayUpper::Device(dev) => mount(
            Some(dev.as_path()),
            &upper_mnt,
            Some("ext4"),
            MsFlags::MS_NOATIME,
            none,
        ),
    }
    .map_err(sys(format!("mounting the overlay upper layer {upper:?}")))?;
    // Held to make the disk read-only at power-down, when the detached mount has no path.
    let upper_disk = match upper {
        OverlayUpper::Device(_) => Some(
            std::fs::File::open(&upper_mnt)
                .map_err(sys_io(format!("opening {}", upper_mnt.display())))?,
        ),
        OverlayUpper::Tmpfs => None,
    };
    let upper_dir = upper_mnt.join("upper");
    let work_dir = upper_mnt.join("work");
    for dir in [&upper_dir, &work_dir] {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(sys_io(format!("creating {}", dir.display()))(e)),
        }
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper_dir.display(),
        work_dir.display()
    );
    mount(
        Some("overlay"),
        &new_root,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(sys(format!("mounting overlay {options}")))?;
    enter_new_root(&new_root)?;
    if let Some(disk) = upper_disk {
        DETACHED_DISKS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(disk.into());
    }
    Ok(())
}

/// Makes the ext4 file system on `device` (writable) the root of this mount namespace: a
/// container's own root file system, in place of the image the agent booted from. The agent
/// keeps running from memory; `staging` is used as by [`pivot_to_overlay`].
pub fn pivot_to_disk(device: &Path, staging: &Path) -> Result<(), InitError> {
    let new_root = stage_new_root(staging)?;
    mount(
        Some(device),
        &new_root,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(sys(format!("mounting the root disk {}", device.display())))?;
    enter_new_root(&new_root)
}

/// Makes the file system mounted on `new_root` the root of this mount namespace and
/// detaches the old root (with the staging tmpfs in it).
fn enter_new_root(new_root: &Path) -> Result<(), InitError> {
    mvm_sys::mount::pivot_root(new_root)?;
    OWN_ROOT.store(true, Ordering::Relaxed);
    Ok(())
}
