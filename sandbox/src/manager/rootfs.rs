//! Disk layers: the shared read-only base of a template and a per-sandbox writable layer.
//!
//! - jail tier: the template's ext4 image is unpacked once (debugfs rdump, no mount) into a
//!   base tree; each sandbox gets an overlayfs of that tree whose upper and work directories
//!   lie on a tmpfs of its own, of a fixed size ([`JAIL_DISK_ENV`]), and the overlay's
//!   top-level directories and the jail's `/run` (a directory of that tmpfs) are bind-mounted
//!   into the jail.
//! - vm tier: the image itself is the VM's read-only root drive; each sandbox gets a sparse
//!   blank ext4 file as its second drive, which the guest agent uses as the overlay upper,
//!   or, for a container, an ext4 copy of the container's root directory that the agent
//!   makes the guest's root.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use mvm_sys::mountinfo::MountInfo;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::manager::host;

/// Top-level directories of the base that are not bind-mounted into a jail (the jailer manages
/// /dev, /proc and /run; the others are guest-init internals).
const NOT_IN_JAIL: [&str; 6] = ["dev", "proc", "run", "sys", "lost+found", "overlay"];

/// Size of the sparse writable layer of a VM.
pub const LAYER_SIZE_MIB: u64 = 2048;

/// Environment variable with the size of a jail-tier sandbox's writable layer, MiB.
pub const JAIL_DISK_ENV: &str = "MVM_JAIL_DISK_MIB";
/// Default size of a jail-tier sandbox's writable layer, MiB.
pub const DEFAULT_JAIL_DISK_MIB: u64 = 1024;
/// Bytes of the writable layer per inode it can hold (ext4's default ratio), so that empty
/// files cannot take more memory than the size says either.
const JAIL_DISK_BYTES_PER_INODE: u64 = 16 << 10;

/// [`JAIL_DISK_ENV`] (a whole number of MiB, at least 1), else [`DEFAULT_JAIL_DISK_MIB`].
pub fn jail_disk_mib_from_env() -> u64 {
    match std::env::var(JAIL_DISK_ENV) {
        Ok(value) if !value.is_empty() => match value.parse::<u64>() {
            Ok(mib) if mib >= 1 => mib,
            _ => {
                tracing::warn!(
                    "{JAIL_DISK_ENV}={value:?} is not a number of MiB of at least 1; \
                     using {DEFAULT_JAIL_DISK_MIB}"
                );
                DEFAULT_JAIL_DISK_MIB
            }
        },
        _ => DEFAULT_JAIL_DISK_MIB,
    }
}

/// The unpacked base tree of image `rootfs` under `cache`, made on first use. The directory name
/// depends on the image's path, size and mtime, so a rebuilt image is unpacked again.
pub fn base_tree(cache: &Path, rootfs: &Path) -> Result<PathBuf> {
    let tree = base_path(cache, rootfs)?;
    if tree.is_dir() {
        return Ok(tree);
    }
    std::fs::create_dir_all(cache)
        .map_err(|e| Error::host(format!("creating {}", cache.display()), e))?;
    let staging = cache.join(format!(".unpack-{}", crate::db::random_hex(6)?));
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&staging)
        .map_err(|e| Error::host(format!("creating {}", staging.display()), e))?;
    let unpack = || -> Result<()> {
        let out = host::run(
            "debugfs",
            &[
                "-R",
                &format!("rdump / {}", staging.display()),
                &rootfs.to_string_lossy(),
            ],
            None,
        )?;
        if !staging.join("bin").exists() && !staging.join("usr").exists() {
            return Err(Error::Invalid(format!(
                "{} does not look like a root file system (no /bin or /usr): {out}",
                rootfs.display()
            )));
        }
        // rdump does not restore the sticky bit.
        let tmp = staging.join("tmp");
        if tmp.is_dir() {
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o1777))
                .map_err(|e| Error::host("chmod 1777 /tmp of the base", e))?;
        }
        Ok(())
    };
    let result = unpack().and_then(|()| match std::fs::rename(&staging, &tree) {
        Ok(()) => Ok(()),
        // Another sandbox unpacked the same image meanwhile.
        Err(_) if tree.is_dir() => host::remove_tree(&staging),
        Err(e) => Err(Error::host(
            format!("renaming {} into place", staging.display()),
            e,
        )),
    });
    if result.is_err() {
        let _ = host::remove_tree(&staging);
    }
    result.map(|()| tree)
}

/// Where [`base_tree`] unpacks `rootfs` (whether or not it has).
pub fn base_path(cache: &Path, rootfs: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(rootfs)
        .map_err(|e| Error::Invalid(format!("template base image {}: {e}", rootfs.display())))?;
    let mut h = Sha256::new();
    h.update(rootfs.as_os_str().as_encoded_bytes());
    h.update(meta.len().to_le_bytes());
    h.update(meta.mtime().to_le_bytes());
    h.update(meta.mtime_nsec().to_le_bytes());
    let key: String = h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(cache.join(key))
}

/// Removes unpacked bases under `cache` that no mounted overlay uses and that are not in
/// `keep` (the current bases of the templates): images rebuilt since. Returns what it removed.
pub fn gc_bases(cache: &Path, keep: &[PathBuf]) -> Vec<PathBuf> {
    let mounts = mvm_sys::mountinfo::read().unwrap_or_default();
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(cache).into_iter().flatten().flatten() {
        let path = entry.path();
        let in_use = mounts.iter().any(|m| is_lower_layer(m, &path));
        let unpacking = entry.file_name().to_string_lossy().starts_with('.');
        if !in_use && !unpacking && !keep.contains(&path) && host::remove_tree(&path).is_ok() {
            removed.push(path);
        }
    }
    removed
}

/// Whether `dir` is a lower layer of the overlay `mount`.
fn is_lower_layer(mount: &MountInfo, dir: &Path) -> bool {
    mount.fs_type == "overlay"
        && mount.super_options.iter().any(|o| {
            o.strip_prefix("lowerdir=")
                .is_some_and(|dirs| dirs.split(':').any(|d| Path::new(d) == dir))
        })
}

/// [`Overlay::run`] relative to the sandbox directory.
pub const RUN_IN_SANDBOX_DIR: &str = "layer/run";

/// The directories of the per-sandbox overlay under `sandbox_dir`.
pub struct Overlay {
    /// Where the merged tree is mounted.
    pub merged: PathBuf,
    /// The jail's `/run`, bound in from the layer so that it is bounded too.
    pub run: PathBuf,
    /// The tmpfs holding `upper`, `work` and `run`: its size bounds what the sandbox can write.
    layer: PathBuf,
    upper: PathBuf,
    work: PathBuf,
}

impl Overlay {
    /// The overlay layout of `sandbox_dir`.
    pub fn at(sandbox_dir: &Path) -> Self {
        let layer = sandbox_dir.join("layer");
        Overlay {
            merged: sandbox_dir.join("rootfs"),
            upper: layer.join("upper"),
            work: layer.join("work"),
            run: sandbox_dir.join(RUN_IN_SANDBOX_DIR),
            layer,
        }
    }

    /// The tmpfs that holds what the sandbox writes (its size bounds it).
    pub fn layer(&self) -> &Path {
        &self.layer
    }

    /// Mounts base + a fresh upper layer of `size_mib` MiB (a write past it fails with ENOSPC
    /// in the sandbox); `/root` of the sandbox and [`Overlay::run`] belong to `uid`. What it
    /// mounted before a
    /// failure is removed by [`Overlay::unmount`].
    pub fn mount(&self, base: &Path, uid: u32, size_mib: u64) -> Result<()> {
        for d in [&self.merged, &self.layer] {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(d)
                .map_err(|e| Error::host(format!("creating {}", d.display()), e))?;
        }
        let bytes = size_mib << 20;
        host::mount(
            Path::new("tmpfs"),
            &self.layer,
            Some("tmpfs"),
            libc::MS_NODEV | libc::MS_NOSUID,
            Some(&format!(
                "size={bytes},nr_inodes={},mode=0755",
                (bytes / JAIL_DISK_BYTES_PER_INODE).max(1024)
            )),
        )?;
        for d in [&self.upper, &self.work] {
            std::fs::DirBuilder::new()
                .mode(0o755)
                .create(d)
                .map_err(|e| Error::host(format!("creating {}", d.display()), e))?;
        }
        // The sandbox user's home (upper-layer directories take precedence) and its /run.
        for d in [self.upper.join("root"), self.run.clone()] {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&d)
                .map_err(|e| Error::host(format!("creating {}", d.display()), e))?;
            std::os::unix::fs::chown(&d, Some(uid), Some(uid))
                .map_err(|e| Error::host(format!("chown {}", d.display()), e))?;
        }
        host::mount(
            Path::new("overlay"),
            &self.merged,
            Some("overlay"),
            libc::MS_NODEV | libc::MS_NOSUID,
            Some(&format!(
                "lowerdir={},upperdir={},workdir={}",
                base.display(),
                self.upper.display(),
                self.work.display()
            )),
        )
    }

    /// Unmounts the overlay and its layer (their directories go with the sandbox directory);
    /// what is not mounted is skipped.
    pub fn unmount(&self) -> Result<()> {
        host::umount(&self.merged)?;
        host::umount(&self.layer)
    }
}

/// What of a tree's top level a jail gets: directories and regular files bound in, symbolic
/// links made anew (an image's merged `/usr`: `/bin -> usr/bin`, `/lib64 -> usr/lib64`).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct JailTop {
    /// (host path, jail path) of each directory.
    pub dirs: Vec<(PathBuf, PathBuf)>,
    /// (host path, jail path) of each regular file.
    pub files: Vec<(PathBuf, PathBuf)>,
    /// (jail path, target) of each symbolic link.
    pub links: Vec<(PathBuf, PathBuf)>,
}

/// The top level of `tree` for a jail whose program is `/exec_name`; the jail's own entries
/// (`/dev`, `/proc`, `/run`, ...), the program's name and other kinds (sockets, devices) are
/// left out.
pub fn jail_top(tree: &Path, exec_name: &str) -> Result<JailTop> {
    let entries = std::fs::read_dir(tree)
        .map_err(|e| Error::host(format!("reading {}", tree.display()), e))?;
    let mut top = JailTop::default();
    for entry in entries {
        let entry = entry.map_err(|e| Error::host(format!("reading {}", tree.display()), e))?;
        let name = entry.file_name();
        let shown = name.to_string_lossy();
        if NOT_IN_JAIL.contains(&shown.as_ref()) || shown == exec_name {
            continue;
        }
        let jail = Path::new("/").join(&name);
        let kind = entry
            .file_type()
            .map_err(|e| Error::host(format!("reading {}", entry.path().display()), e))?;
        if kind.is_dir() {
            top.dirs.push((entry.path(), jail));
        } else if kind.is_file() {
            top.files.push((entry.path(), jail));
        } else if kind.is_symlink() {
            let target = std::fs::read_link(entry.path())
                .map_err(|e| Error::host(format!("reading {}", entry.path().display()), e))?;
            top.links.push((jail, target));
        }
    }
    top.dirs.sort();
    top.files.sort();
    top.links.sort();
    Ok(top)
}

/// Bytes the files under `dir` occupy (allocated blocks; symbolic links not followed).
fn tree_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = std::fs::read_dir(&d)
            .map_err(|e| Error::host(format!("reading {}", d.display()), e))?;
        for entry in entries {
            let entry = entry.map_err(|e| Error::host(format!("reading {}", d.display()), e))?;
            let meta = entry
                .metadata()
                .map_err(|e| Error::host(format!("stat {}", entry.path().display()), e))?;
            total += meta.blocks() * 512;
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// Makes the vm tier's writable disk, a sparse ext4 file owned by `uid`: blank (the overlay
/// upper layer), or holding a copy of the directory `content` (a container's root) with
/// [`LAYER_SIZE_MIB`] free on top of it. It has no journal: the disk never outlives its VM
/// (no sandbox boots again after an unclean stop), so a journal would only double the
/// guest's metadata writes and, cycled through by a busy guest, add up to its size (64 MiB)
/// to every copy a snapshot or fork takes of the layer.
pub fn make_layer(path: &Path, uid: u32, content: Option<&Path>) -> Result<()> {
    let content_bytes = content.map(tree_bytes).transpose()?.unwrap_or(0);
    // Room for the metadata of a populated file system too (inodes, directories).
    let size = (LAYER_SIZE_MIB << 20) + content_bytes + content_bytes / 8;
    let file = std::fs::File::create(path)
        .map_err(|e| Error::host(format!("creating {}", path.display()), e))?;
    file.set_len(size.next_multiple_of(1 << 20))
        .map_err(|e| Error::host(format!("sizing {}", path.display()), e))?;
    drop(file);
    let mut args: Vec<String> = ["-q", "-F", "-O", "^has_journal", "-E", "lazy_itable_init=1"]
        .map(String::from)
        .into();
    if let Some(dir) = content {
        args.extend(["-d".to_owned(), dir.to_string_lossy().into_owned()]);
    }
    args.push(path.to_string_lossy().into_owned());
    host::run(
        "mkfs.ext4",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
        None,
    )?;
    std::os::unix::fs::chown(path, Some(uid), Some(uid))
        .map_err(|e| Error::host(format!("chown {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A layer, blank or with content, is a clean ext4 file system without a journal.
    #[test]
    fn a_layer_is_a_clean_file_system_without_a_journal() {
        let dir = tempfile::tempdir().unwrap();
        let content = dir.path().join("content");
        std::fs::create_dir(&content).unwrap();
        std::fs::write(content.join("hello"), "world").unwrap();
        // SAFETY: geteuid has no preconditions.
        let uid = unsafe { libc::geteuid() };
        for (name, content) in [("blank.ext4", None), ("root.ext4", Some(content.as_path()))] {
            let layer = dir.path().join(name);
            make_layer(&layer, uid, content).unwrap();
            let header = std::process::Command::new("dumpe2fs")
                .arg("-h")
                .arg(&layer)
                .output()
                .unwrap();
            let header = String::from_utf8_lossy(&header.stdout);
            let features = header
                .lines()
                .find(|l| l.starts_with("Filesystem features:"))
                .unwrap_or_else(|| panic!("dumpe2fs printed no features for {name}: {header}"));
            assert!(!features.contains("has_journal"), "{name}: {features}");
            let fsck = std::process::Command::new("e2fsck")
                .arg("-fn")
                .arg(&layer)
                .output()
                .unwrap();
            assert!(
                fsck.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&fsck.stdout)
            );
        }
    }
}
