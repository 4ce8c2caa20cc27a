//! `Mount` and `Unmount`: file systems the host attaches at run time, such as the root of a
//! pod's container on a drive the host has just swapped in.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::protocol::{ErrorKind, MountRequest, RemoteError};

/// How long a block device may take to show its new capacity after a drive swap.
const DEVICE_WAIT: Duration = Duration::from_secs(10);
/// How often the device's capacity is looked at meanwhile.
const DEVICE_POLL: Duration = Duration::from_millis(20);

fn absolute<'a>(what: &str, path: &'a str) -> Result<&'a Path, RemoteError> {
    let p = Path::new(path);
    if !p.is_absolute() || path.contains('\0') {
        return Err(RemoteError::new(
            ErrorKind::InvalidInput,
            format!("{what} must be an absolute path: {path:?}"),
        ));
    }
    Ok(p)
}

fn failed(what: String) -> impl FnOnce(nix::Error) -> RemoteError {
    move |e| RemoteError::from_io(what, &std::io::Error::from(e))
}

/// Size in sectors of block device `/dev/<name>` from sysfs; `None` when sysfs does not know
/// it (not a block device, or no sysfs).
fn sectors(device: &Path) -> Option<u64> {
    let name = device.file_name()?.to_str()?;
    std::fs::read_to_string(format!("/sys/class/block/{name}/size"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Waits until block device `device` has a capacity: after the host swaps a drive's image,
/// the guest kernel learns the new size from a config-change interrupt, a moment later.
async fn wait_for_capacity(device: &Path) -> Result<(), RemoteError> {
    let deadline = Instant::now() + DEVICE_WAIT;
    while sectors(device) == Some(0) {
        if Instant::now() > deadline {
            return Err(RemoteError::new(
                ErrorKind::Io,
                format!(
                    "{} still has no capacity after {DEVICE_WAIT:?}: the host did not attach an \
                     image to it",
                    device.display()
                ),
            ));
        }
        tokio::time::sleep(DEVICE_POLL).await;
    }
    Ok(())
}

/// `Mount`: creates the mount point and mounts `req.source` on it.
pub(super) async fn mount_request(req: MountRequest) -> Result<(), RemoteError> {
    let target = absolute("mount target", &req.target)?;
    if req.source.starts_with("/dev/") {
        wait_for_capacity(Path::new(&req.source)).await?;
    }
    std::fs::create_dir_all(target)
        .map_err(|e| RemoteError::from_io(format!("creating mount point {}", req.target), &e))?;
    let mut flags = MsFlags::MS_NOSUID;
    if req.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    match req.fstype.as_deref() {
        Some(fstype) => {
            if fstype.is_empty() || fstype.contains('\0') || req.source.contains('\0') {
                return Err(RemoteError::new(
                    ErrorKind::InvalidInput,
                    format!("invalid mount of {:?} type {fstype:?}", req.source),
                ));
            }
            mount(
                Some(req.source.as_str()),
                target,
                Some(fstype),
                flags,
                None::<&str>,
            )
            .map_err(failed(format!(
                "mounting {} ({fstype}) on {}",
                req.source, req.target
            )))
        }
        None => {
            let source = absolute("bind mount source", &req.source)?;
            let what = || format!("binding {} on {}", req.source, req.target);
            mount(
                Some(source),
                target,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(failed(what()))?;
            if req.read_only {
                // A bind mount takes its flags only on a remount.
                mount(
                    None::<&str>,
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REMOUNT | flags,
                    None::<&str>,
                )
                .map_err(failed(what()))?;
            }
            Ok(())
        }
    }
}

/// `Unmount`: detaches the mount at `target` with everything mounted below it.
pub(super) fn unmount_request(target: &str) -> Result<(), RemoteError> {
    let path = absolute("unmount target", target)?;
    umount2(path, MntFlags::MNT_DETACH).map_err(failed(format!("unmounting {target}")))
}
