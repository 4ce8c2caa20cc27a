//! The jail tree on the host (step 2) and the switch into it inside a new mount namespace (step 4).

use std::fs::{self, DirBuilder, Permissions};
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use mvm_sys::cstr;
use mvm_sys::mount::{mount, pivot_root, statvfs};

use crate::config::{JailConfig, DEVPTS_DIR, DEVPTS_MAX_PTYS, PTMX, RUN_DIR};
use crate::error::{check, Error, Result};

/// A character device node the jailed VMM needs.
#[derive(Debug, Clone, Copy)]
pub struct DeviceNode {
    /// Path inside the jail.
    pub path: &'static str,
    /// Device major number.
    pub major: u32,
    /// Device minor number.
    pub minor: u32,
}

/// Device nodes made in every jail, owned by the jailed uid/gid, mode 0600.
pub const DEVICE_NODES: [DeviceNode; 3] = [
    DeviceNode {
        path: "/dev/kvm",
        major: 10,
        minor: 232,
    },
    DeviceNode {
        path: "/dev/net/tun",
        major: 10,
        minor: 200,
    },
    DeviceNode {
        path: "/dev/urandom",
        major: 1,
        minor: 9,
    },
];

/// The host's userfaultfd device (Linux 6.1+).
const USERFAULTFD: &str = "/dev/userfaultfd";

/// The device number of the host's [`USERFAULTFD`]; an error when it has none.
pub(crate) fn host_userfaultfd() -> Result<libc::dev_t> {
    let invalid = |why: String| Error::InvalidArgument {
        flag: "--dev-userfaultfd",
        value: USERFAULTFD.into(),
        reason: why,
    };
    let meta = fs::metadata(USERFAULTFD).map_err(|e| {
        invalid(format!(
            "the host has none ({e}; it needs Linux 6.1 or later)"
        ))
    })?;
    if !meta.file_type().is_char_device() {
        return Err(invalid("not a character device on the host".into()));
    }
    Ok(meta.rdev())
}

/// `root` joined with an absolute jail path.
pub(crate) fn in_root(root: &Path, jail_path: &Path) -> PathBuf {
    root.join(jail_path.strip_prefix("/").unwrap_or(jail_path))
}

fn mkdir(path: &Path, mode: u32) -> Result<()> {
    match DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists && path.is_dir() => {}
        Err(e) => return Err(Error::io(format!("create directory {}", path.display()), e)),
    }
    // The mode given to mkdir is filtered by the umask: set it exactly.
    fs::set_permissions(path, Permissions::from_mode(mode))
        .map_err(|e| Error::io(format!("chmod {}", path.display()), e))
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| Error::io(format!("chown {}", path.display()), e))
}

/// Makes `<base>/<exec-name>` (shared, kept) and then `<base>/<exec-name>/<id>` atomically: an
/// existing id directory means the id is taken. Returns the id directory, which the caller owns
/// from then on (and removes on failure).
pub(crate) fn create_jail_dir(config: &JailConfig) -> Result<PathBuf> {
    let jail_dir = config.jail_dir()?;
    let exec_dir = jail_dir.parent().expect("jail dir has a parent");
    DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(exec_dir)
        .map_err(|e| Error::io(format!("create {}", exec_dir.display()), e))?;
    match DirBuilder::new().mode(0o700).create(&jail_dir) {
        Ok(()) => Ok(jail_dir),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Err(Error::IdInUse(jail_dir)),
        Err(e) => Err(Error::io(format!("create {}", jail_dir.display()), e)),
    }
}

/// How the exec file gets into the jail root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExecPlacement {
    /// Bound read-only (nosuid, nodev) onto an empty file in the jail's own mount namespace: no
    /// copy, and the page cache of the binary is shared by every jail. For exec files every
    /// user may read and execute, which the jailed uid then can too.
    Bind,
    /// Copied, root-owned, mode 0755 (Firecracker's jailer does this for every exec file): for
    /// an exec file the jailed uid could not otherwise run.
    Copy,
}

impl ExecPlacement {
    /// Bind when every user may read and execute `exec_file`, copy otherwise.
    pub(crate) fn for_exec_file(exec_file: &Path) -> Result<ExecPlacement> {
        let meta = fs::metadata(exec_file)
            .map_err(|e| Error::io(format!("stat {}", exec_file.display()), e))?;
        Ok(if meta.permissions().mode() & 0o005 == 0o005 {
            ExecPlacement::Bind
        } else {
            ExecPlacement::Copy
        })
    }
}

/// Fills `<jail dir>/root`: the exec file (or, to bind it, its mount point), device
/// nodes, `/run` for the jailed user, mount points for the bind mounts, `/proc` and `/dev/pts`
/// (with the `/dev/ptmx` symlink) if asked for. Everything is root-owned and read-only for the
/// jailed user except the device nodes and `/run`.
pub(crate) fn populate_root(config: &JailConfig, root: &Path, exec: ExecPlacement) -> Result<()> {
    mkdir(root, 0o755)?;
    refuse_nodev(root)?;

    let exec_in_root = root.join(config.exec_file_name()?);
    match exec {
        ExecPlacement::Bind => {
            fs::File::create(&exec_in_root).map_err(|e| {
                Error::io(format!("create mount point {}", exec_in_root.display()), e)
            })?;
        }
        ExecPlacement::Copy => {
            fs::copy(&config.exec_file, &exec_in_root).map_err(|e| {
                Error::io(
                    format!(
                        "copy {} to {}",
                        config.exec_file.display(),
                        exec_in_root.display()
                    ),
                    e,
                )
            })?;
        }
    }
    fs::set_permissions(&exec_in_root, Permissions::from_mode(0o755))
        .map_err(|e| Error::io(format!("chmod {}", exec_in_root.display()), e))?;

    for dev in DEVICE_NODES {
        let path = in_root(root, Path::new(dev.path));
        make_parents(root, &path)?;
        let c = cstr::from_path(&path)?;
        // SAFETY: `c` is a valid NUL-terminated path; mknod does not retain it.
        let ret = unsafe {
            libc::mknod(
                c.as_ptr(),
                libc::S_IFCHR | 0o600,
                libc::makedev(dev.major, dev.minor),
            )
        };
        check(ret, || {
            format!("mknod {} c {} {}", path.display(), dev.major, dev.minor)
        })?;
        chown(&path, config.uid, config.gid)?;
    }

    if config.dev_userfaultfd {
        let path = in_root(root, Path::new(USERFAULTFD));
        let c = cstr::from_path(&path)?;
        let rdev = host_userfaultfd()?;
        // SAFETY: `c` is a valid NUL-terminated path; mknod does not retain it.
        let ret = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, rdev) };
        check(ret, || format!("mknod {}", path.display()))?;
        chown(&path, config.uid, config.gid)?;
    }

    let run = in_root(root, Path::new(RUN_DIR));
    mkdir(&run, 0o700)?;
    chown(&run, config.uid, config.gid)?;

    for m in &config.mounts {
        let target = in_root(root, &m.jail);
        make_parents(root, &target)?;
        if fs::metadata(&m.host).map(|md| md.is_dir()).unwrap_or(false) {
            mkdir(&target, 0o755)?;
        } else {
            fs::File::create(&target)
                .map_err(|e| Error::io(format!("create mount point {}", target.display()), e))?;
        }
    }
    if config.mount_proc {
        mkdir(&root.join("proc"), 0o555)?;
    }
    // Last, and each one component under the root (checked by validate): nothing made here
    // passes through a link.
    for link in &config.symlinks {
        let path = in_root(root, &link.jail);
        std::os::unix::fs::symlink(&link.target, &path).map_err(|e| {
            Error::io(
                format!("symlink {} -> {}", path.display(), link.target.display()),
                e,
            )
        })?;
    }
    if config.mount_devpts {
        let pts = in_root(root, Path::new(DEVPTS_DIR));
        make_parents(root, &pts)?;
        mkdir(&pts, 0o755)?;
        // Resolved inside the jail, so opening /dev/ptmx reaches the jail's devpts instance.
        let ptmx = in_root(root, Path::new(PTMX));
        std::os::unix::fs::symlink("pts/ptmx", &ptmx)
            .map_err(|e| Error::io(format!("symlink {} -> pts/ptmx", ptmx.display()), e))?;
    }
    // The jail dir stayed 0700 while being filled (e.g. the copy briefly has the source's mode
    // bits); open it up only now that the tree is complete.
    mkdir(root.parent().expect("root has a parent"), 0o755)
}

/// Device nodes on a `nodev` filesystem cannot be opened: refuse such a chroot base up front.
fn refuse_nodev(root: &Path) -> Result<()> {
    let st = statvfs(root)?;
    if st.f_flag & libc::ST_NODEV != 0 {
        return Err(Error::io(
            format!(
                "{} is on a filesystem mounted nodev, where /dev/kvm and /dev/net/tun cannot be opened; choose another --chroot-base-dir",
                root.display()
            ),
            ErrorKind::Unsupported.into(),
        ));
    }
    Ok(())
}

/// Creates the missing directories between `root` and `path` (exclusive), mode 0755.
fn make_parents(root: &Path, path: &Path) -> Result<()> {
    let rel = path
        .strip_prefix(root)
        .expect("path is inside the jail root");
    let mut dir = root.to_path_buf();
    let parts: Vec<Component> = rel.components().collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        dir.push(part);
        mkdir(&dir, 0o755)?;
    }
    Ok(())
}

/// Whether the mount at `path` is read-only (unknown counts as writable: the caller's own
/// flags decide then).
fn is_read_only(path: &Path) -> bool {
    let Ok(c) = cstr::from_path(path) else {
        return false;
    };
    // SAFETY: statvfs writes into the zeroed struct we pass; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        libc::statvfs(c.as_ptr(), &mut st) == 0 && st.f_flag & libc::ST_RDONLY != 0
    }
}

/// In a fresh mount namespace: stops mount propagation to and from the host, bind-mounts the
/// jail root, the exec file (if [`ExecPlacement::Bind`]) and the `--mount` paths, then makes the
/// jail root `/` with `pivot_root` and detaches the old root, so nothing of the host filesystem
/// stays reachable.
pub(crate) fn pivot_into(config: &JailConfig, root: &Path, exec: ExecPlacement) -> Result<()> {
    mount(
        None,
        Path::new("/"),
        None,
        libc::MS_REC | libc::MS_PRIVATE,
        None,
    )?;
    mount(Some(root), root, None, libc::MS_BIND | libc::MS_REC, None)?;
    mount(
        None,
        root,
        None,
        libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID,
        None,
    )?;
    if exec == ExecPlacement::Bind {
        let target = root.join(config.exec_file_name()?);
        mount(Some(&config.exec_file), &target, None, libc::MS_BIND, None)?;
        mount(
            None,
            &target,
            None,
            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV,
            None,
        )?;
    }
    for m in &config.mounts {
        let target = in_root(root, &m.jail);
        // Recursive: what is mounted below the path (a container's volumes) comes along.
        mount(
            Some(&m.host),
            &target,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )?;
        let is_dev = fs::metadata(&m.host)
            .map(|md| md.file_type().is_block_device())
            .unwrap_or(false);
        let mut flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID;
        if !is_dev {
            flags |= libc::MS_NODEV;
        }
        // A read-only source (a container's read-only volume) stays read-only: the remount
        // sets the flags anew.
        if m.read_only || is_read_only(&target) {
            flags |= libc::MS_RDONLY;
        }
        mount(None, &target, None, flags, None)?;
    }
    Ok(pivot_root(root)?)
}

/// Mounts a procfs that shows only this pid namespace's processes and no system files.
pub(crate) fn mount_proc() -> Result<()> {
    Ok(mount(
        Some(Path::new("proc")),
        Path::new("/proc"),
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("subset=pid,hidepid=invisible"),
    )?)
}

/// Mounts a new devpts instance at /dev/pts of the jail (after `pivot_root`): ptys made there
/// belong to the jail's `gid`, and the host's and other jails' ptys are not in it. Fails closed
/// if the new instance is not empty.
pub(crate) fn mount_devpts(gid: u32) -> Result<()> {
    let pts = Path::new(DEVPTS_DIR);
    mount(
        Some(Path::new("devpts")),
        pts,
        Some("devpts"),
        libc::MS_NOSUID | libc::MS_NOEXEC,
        Some(&format!(
            "newinstance,ptmxmode=0666,mode=0620,gid={gid},max={DEVPTS_MAX_PTYS}"
        )),
    )?;
    // Verify rather than trust: a shared instance would list someone's ptys.
    let entries: Vec<_> = fs::read_dir(pts)
        .map_err(|e| Error::io(format!("list {} in the jail", pts.display()), e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<std::io::Result<_>>()
        .map_err(|e| Error::io(format!("list {} in the jail", pts.display()), e))?;
    if entries != [std::ffi::OsStr::new("ptmx")] {
        return Err(Error::DevptsShared(format!("{entries:?}")));
    }
    Ok(())
}

/// Removes a jail directory; refuses if anything is mounted beneath it in this mount namespace
/// (removal would then reach into the mounted filesystem).
pub(crate) fn remove_jail_dir(jail_dir: &Path) -> Result<()> {
    if let Some(m) = mvm_sys::mountinfo::read()?
        .into_iter()
        .find(|m| m.mount_point.starts_with(jail_dir))
    {
        return Err(Error::MountedInJail {
            jail: jail_dir.to_path_buf(),
            mount: m.mount_point,
        });
    }
    match fs::remove_dir_all(jail_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("remove {}", jail_dir.display()), e)),
    }
}
