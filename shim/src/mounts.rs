//! The OCI spec's bind mounts (Kubernetes' /etc/hosts, /etc/resolv.conf, secrets, volumes),
//! made under the container's root on the host before its sandbox is created: the jail tier
//! binds that tree, mounts included, into the jail; the vm tier copies it, mounts included,
//! into the guest's disk (a snapshot taken at create).
//!
//! The root's content is the image's, so a destination is resolved inside the root
//! (`openat2` with `RESOLVE_IN_ROOT`), never through a symlink out of it, as runc does.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Component, Path};

use oci_spec::runtime::{Mount, Spec};

use crate::error::{Error, Result};

/// Destinations the sandbox itself provides: the OCI mounts there are not applied.
const SANDBOX_OWNED: [&str; 3] = ["/proc", "/sys", "/dev"];

/// Opens `rel` inside the directory `root` as if `root` were `/`.
fn open_in_root(root: &OwnedFd, rel: &Path, flags: i32) -> std::io::Result<OwnedFd> {
    let path = CString::new(rel.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: open_how is plain integers; all-zero is its "nothing asked" value.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads the NUL-terminated path and `how` (of the size passed), both
    // alive for the call; the result is a new descriptor or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel just gave us this descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes `rel` (and its missing parents) inside `root`: a directory, or an empty file when
/// `file`. Returns an `O_PATH` descriptor of it. Symlinks on the way are followed inside the
/// root; one that leads nowhere there makes this fail (ENOENT).
fn make_target(root: &OwnedFd, rel: &Path, file: bool) -> std::io::Result<OwnedFd> {
    let mut done = std::path::PathBuf::from(".");
    let names: Vec<_> = rel.components().collect();
    for (i, name) in names.iter().enumerate() {
        let Component::Normal(name) = name else {
            continue;
        };
        let parent = open_in_root(root, &done, libc::O_PATH | libc::O_DIRECTORY)?;
        done.push(name);
        let last = i + 1 == names.len();
        let c = CString::new(name.as_encoded_bytes())
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: *at calls on a descriptor we own and a NUL-terminated name; they create at
        // most one entry in that directory and follow nothing (O_NOFOLLOW, mkdir never does).
        let rc = unsafe {
            if last && file {
                let fd = libc::openat(
                    parent.as_raw_fd(),
                    c.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    0o644,
                );
                if fd >= 0 {
                    libc::close(fd);
                }
                fd
            } else {
                libc::mkdirat(parent.as_raw_fd(), c.as_ptr(), 0o755)
            }
        };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            // ELOOP: a symlink is there; it is followed inside the root below.
            if !matches!(e.raw_os_error(), Some(libc::EEXIST) | Some(libc::ELOOP)) {
                return Err(e);
            }
        }
    }
    open_in_root(root, rel, libc::O_PATH)
}

fn is_bind(m: &Mount) -> bool {
    m.typ().as_deref() == Some("bind")
        || m.options()
            .iter()
            .flatten()
            .any(|o| o == "bind" || o == "rbind")
}

fn mount_fd(source: &Path, target: &OwnedFd, flags: libc::c_ulong) -> std::io::Result<()> {
    let at =
        CString::new(format!("/proc/self/fd/{}", target.as_raw_fd())).expect("no NUL in a number");
    let source = CString::new(source.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: mount(2) with NUL-terminated paths that outlive the call and no data.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            at.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes one bind mount of the spec under `rootfs`.
fn bind(rootfs: &OwnedFd, m: &Mount) -> Result<()> {
    let dest = m.destination();
    let source = m
        .source()
        .as_deref()
        .ok_or_else(|| Error::Invalid(format!("bind mount {} has no source", dest.display())))?;
    let fail = |what: &str, e: std::io::Error| {
        Error::host(
            format!(
                "{what} for the bind mount of {} on {}",
                source.display(),
                dest.display()
            ),
            e,
        )
    };
    let meta = std::fs::metadata(source).map_err(|e| fail("its source", e))?;
    let rel = dest.strip_prefix("/").unwrap_or(dest);
    let target =
        make_target(rootfs, rel, !meta.is_dir()).map_err(|e| fail("its mount point", e))?;
    let options: Vec<&str> = m.options().iter().flatten().map(String::as_str).collect();
    let recursive = if options.contains(&"rbind") {
        libc::MS_REC
    } else {
        0
    };
    mount_fd(source, &target, libc::MS_BIND | recursive).map_err(|e| fail("mounting", e))?;
    if options.contains(&"ro") {
        // A bind mount takes its flags on a remount; the new mount is the target's now.
        let mounted = make_target(rootfs, rel, !meta.is_dir()).map_err(|e| fail("reopening", e))?;
        mount_fd(
            Path::new(""),
            &mounted,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | recursive,
        )
        .map_err(|e| fail("making it read-only", e))?;
    }
    Ok(())
}

/// Makes the spec's bind mounts under `rootfs`; other mounts (proc, sysfs, tmpfs, ...) and
/// destinations under /proc, /sys and /dev are the sandbox's own and are skipped. Returns
/// the destinations skipped, for the log. The mounts go when `rootfs` is unmounted
/// (recursively).
pub fn bind_spec_mounts(spec: &Spec, rootfs: &Path) -> Result<Vec<String>> {
    let root = std::fs::File::open(rootfs)
        .map(OwnedFd::from)
        .map_err(|e| Error::host(format!("opening the rootfs {}", rootfs.display()), e))?;
    let mut skipped = Vec::new();
    for m in spec.mounts().iter().flatten() {
        let dest = m.destination();
        if !dest.is_absolute() || dest.components().any(|c| c == Component::ParentDir) {
            return Err(Error::Invalid(format!(
                "mount destination {} must be an absolute path without '..'",
                dest.display()
            )));
        }
        let sandbox_owned = SANDBOX_OWNED.iter().any(|d| dest.starts_with(d));
        if !is_bind(m) || sandbox_owned {
            skipped.push(dest.display().to_string());
            continue;
        }
        bind(&root, m)?;
    }
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{MountBuilder, SpecBuilder};

    fn spec(mounts: Vec<Mount>) -> Spec {
        SpecBuilder::default().mounts(mounts).build().unwrap()
    }

    fn bind_mount(source: &Path, dest: &str, options: &[&str]) -> Mount {
        MountBuilder::default()
            .destination(dest)
            .typ("bind")
            .source(source)
            .options(options.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .build()
            .unwrap()
    }

    /// Lazily unmounts what a test mounted, also when it fails.
    struct Detach(std::path::PathBuf);

    impl Drop for Detach {
        fn drop(&mut self) {
            let c = CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: umount2 with a NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }

    #[test]
    fn binds_stay_inside_the_root() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            mvm_testkit::skip_or_fail_in_ci("binds_stay_inside_the_root", "mounting needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (root, outside, src) = (
            dir.path().join("root"),
            dir.path().join("outside"),
            dir.path().join("src"),
        );
        for d in [&root, &outside, &src] {
            std::fs::create_dir(d).unwrap();
        }
        // The root is a mount of its own, as a container's snapshot is.
        let _root_mount = Detach(root.clone());
        mount_fd(
            &root,
            &OwnedFd::from(std::fs::File::open(&root).unwrap()),
            libc::MS_BIND,
        )
        .unwrap();
        std::fs::write(src.join("hosts"), "127.0.0.1 pod\n").unwrap();
        std::fs::create_dir(src.join("vol")).unwrap();
        std::fs::write(src.join("vol/data"), "volume\n").unwrap();
        // The image's /etc is an absolute symlink: followed on the host it would leave the
        // root; inside the root it leads to the root's own copy of that path.
        std::os::unix::fs::symlink(&outside, root.join("etc")).unwrap();
        let inside_etc = root.join(outside.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside_etc).unwrap();
        let skipped = bind_spec_mounts(
            &spec(vec![
                bind_mount(&src.join("hosts"), "/etc/hosts", &["rbind", "rw"]),
                bind_mount(&src.join("vol"), "/data/vol", &["rbind", "ro"]),
                bind_mount(&src.join("hosts"), "/dev/termination-log", &["rbind"]),
                MountBuilder::default()
                    .destination("/proc")
                    .typ("proc")
                    .source("proc")
                    .build()
                    .unwrap(),
            ]),
            &root,
        )
        .unwrap();
        assert_eq!(skipped, ["/dev/termination-log", "/proc"]);
        assert_eq!(
            std::fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing may appear outside the root"
        );
        assert_eq!(
            std::fs::read_to_string(inside_etc.join("hosts")).unwrap(),
            "127.0.0.1 pod\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("data/vol/data")).unwrap(),
            "volume\n"
        );
        let err = std::fs::write(root.join("data/vol/new"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
        // Bad destinations are refused.
        for dest in ["relative", "/a/../b"] {
            let bad = spec(vec![bind_mount(&src, dest, &[])]);
            assert!(bind_spec_mounts(&bad, &root).is_err(), "{dest}");
        }
    }
}
