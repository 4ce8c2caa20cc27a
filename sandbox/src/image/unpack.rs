//! Applies image layers (tar, optionally gzip) to a tree on the host, as the OCI image spec's
//! changeset rules say: whiteouts (`.wh.NAME`, `.wh..wh..opq`), hard links, ownership,
//! permission bits (setuid, sticky), modification times and the `user.*` and
//! `security.capability` extended attributes.
//!
//! A layer is the tenant's data, not mvm's, so nothing in it reaches outside the tree: an
//! entry or link target with `..` or through a symbolic link of the tree is refused (symbolic
//! links are only ever created, never followed), and device nodes are not made (a sandbox
//! gets its devices from its tier: the jail's own /dev, the guest kernel's devtmpfs).
//! The tree is root's and private while it is made (nobody else changes it meanwhile), so what
//! is checked is what is used.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Prefix of a whiteout entry's name.
const WHITEOUT: &str = ".wh.";
/// Name of an opaque-directory whiteout.
const OPAQUE: &str = ".wh..wh..opq";

/// What applying a layer skipped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// Device nodes left out.
    pub devices_skipped: u64,
}

/// A layer blob's reader: gunzipped when it starts with gzip's magic.
pub fn layer_reader(mut file: std::fs::File) -> Result<Box<dyn Read>> {
    let mut magic = [0u8; 2];
    let n = file
        .read(&mut magic)
        .map_err(|e| Error::host("reading a layer", e))?;
    std::io::Seek::rewind(&mut file).map_err(|e| Error::host("reading a layer", e))?;
    Ok(if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(std::io::BufReader::new(file)))
    } else {
        Box::new(std::io::BufReader::new(file))
    })
}

/// Applies the layer `layer` (named `what` in errors) to `root`.
pub fn apply_layer(root: &Path, layer: impl Read, what: &str) -> Result<Applied> {
    let mut archive = tar::Archive::new(layer);
    let mut applied = Applied::default();
    // Paths this layer made: an opaque whiteout hides only the lower layers' entries.
    let mut made = HashSet::new();
    let entries = archive
        .entries()
        .map_err(|e| Error::Invalid(format!("{what} is not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad_layer(what, e))?;
        let raw = entry.path_bytes().into_owned();
        let rel = relative(&raw).map_err(|why| {
            Error::Invalid(format!(
                "{what}: entry {:?} {why}",
                String::from_utf8_lossy(&raw)
            ))
        })?;
        let Some(name) = rel.file_name().map(OsStr::to_owned) else {
            continue; // the root itself
        };
        let name_str = name.to_string_lossy();
        let parent_rel = rel.parent().unwrap_or(Path::new(""));
        let entry_err =
            |why: String| Error::Invalid(format!("{what}: entry {}: {why}", rel.display()));
        let parent = dir_in(root, parent_rel).map_err(entry_err)?;
        if name_str == OPAQUE {
            clear_dir(&parent, &made).map_err(|e| io_err(what, &rel, e))?;
            continue;
        }
        if let Some(hidden) = name_str.strip_prefix(WHITEOUT) {
            remove_any(&parent.join(hidden)).map_err(|e| io_err(what, &rel, e))?;
            continue;
        }
        let dest = parent.join(&name);
        let header = entry.header().clone();
        let kind = header.entry_type();
        let mode = header.mode().map_err(|e| bad_layer(what, e))? & 0o7777;
        let existing = dest.symlink_metadata().ok();
        match kind {
            tar::EntryType::Directory => {
                if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    remove_any(&dest).map_err(|e| io_err(what, &rel, e))?;
                    std::fs::create_dir(&dest).map_err(|e| io_err(what, &rel, e))?;
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                remove_any(&dest).map_err(|e| io_err(what, &rel, e))?;
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&dest)
                    .map_err(|e| io_err(what, &rel, e))?;
                std::io::copy(&mut entry, &mut file).map_err(|e| io_err(what, &rel, e))?;
            }
            tar::EntryType::Symlink => {
                let target = header
                    .link_name()
                    .map_err(|e| bad_layer(what, e))?
                    .ok_or_else(|| entry_err("a symbolic link without a target".into()))?;
                remove_any(&dest).map_err(|e| io_err(what, &rel, e))?;
                std::os::unix::fs::symlink(&target, &dest).map_err(|e| io_err(what, &rel, e))?;
            }
            tar::EntryType::Link => {
                let raw_target = header
                    .link_name_bytes()
                    .ok_or_else(|| entry_err("a hard link without a target".into()))?;
                let target_rel = relative(&raw_target).map_err(|why| {
                    entry_err(format!(
                        "hard link target {:?} {why}",
                        String::from_utf8_lossy(&raw_target)
                    ))
                })?;
                let target = file_in(root, &target_rel).map_err(entry_err)?;
                if target == dest {
                    continue;
                }
                remove_any(&dest).map_err(|e| io_err(what, &rel, e))?;
                std::fs::hard_link(&target, &dest).map_err(|e| io_err(what, &rel, e))?;
                made.insert(dest);
                // A hard link shares its target's owner, mode and times.
                continue;
            }
            tar::EntryType::Fifo => {
                remove_any(&dest).map_err(|e| io_err(what, &rel, e))?;
                mknod(&dest, libc::S_IFIFO).map_err(|e| io_err(what, &rel, e))?;
            }
            tar::EntryType::Char | tar::EntryType::Block => {
                applied.devices_skipped += 1;
                continue;
            }
            // Metadata entries (PAX, GNU long names) are read by the tar crate itself.
            _ => continue,
        }
        let uid = header.uid().map_err(|e| bad_layer(what, e))? as u32;
        let gid = header.gid().map_err(|e| bad_layer(what, e))? as u32;
        std::os::unix::fs::lchown(&dest, Some(uid), Some(gid))
            .map_err(|e| io_err(what, &rel, e))?;
        if kind != tar::EntryType::Symlink {
            // After the chown, which clears setuid and setgid.
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode))
                .map_err(|e| io_err(what, &rel, e))?;
        }
        if let Some(extensions) = entry.pax_extensions().map_err(|e| bad_layer(what, e))? {
            for ext in extensions {
                let ext = ext.map_err(|e| bad_layer(what, e))?;
                let Some(attr) = ext
                    .key_bytes()
                    .strip_prefix(b"SCHILY.xattr.")
                    .map(OsStr::from_bytes)
                else {
                    continue;
                };
                if kept_xattr(attr) {
                    xattr::set(&dest, attr, ext.value_bytes())
                        .map_err(|e| io_err(what, &rel, e))?;
                }
            }
        }
        let mtime = header.mtime().unwrap_or(0);
        set_mtime(&dest, mtime as i64).map_err(|e| io_err(what, &rel, e))?;
        made.insert(dest);
    }
    Ok(applied)
}

/// Extended attributes a layer may set: the user namespace and file capabilities (inert on
/// the nosuid mounts of the jail tier). `trusted.*` (overlayfs' own, which would steer the
/// sandbox's overlay) and the other security modules' labels are not kept.
fn kept_xattr(name: &OsStr) -> bool {
    let name = name.as_bytes();
    name.starts_with(b"user.") || name == b"security.capability"
}

fn bad_layer(what: &str, e: std::io::Error) -> Error {
    Error::Invalid(format!("{what} is not a valid tar layer: {e}"))
}

/// An I/O failure while writing `rel`; a full disk says so.
fn io_err(what: &str, rel: &Path, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) || e.raw_os_error() == Some(libc::EDQUOT) {
        Error::Host(format!(
            "unpacking {what}: the image cache's disk is full at {} ({e}): free space under \
             the state directory and pull again",
            rel.display()
        ))
    } else {
        Error::host(format!("unpacking {what}: {}", rel.display()), e)
    }
}

/// The path of a layer entry relative to the root: `/` and `.` dropped, `..` refused.
pub fn relative(raw: &[u8]) -> std::result::Result<PathBuf, &'static str> {
    let mut rel = PathBuf::new();
    for c in Path::new(OsStr::from_bytes(raw)).components() {
        match c {
            Component::Normal(n) => rel.push(n),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir => return Err("climbs out of the image's root with `..`"),
            Component::Prefix(_) => return Err("is not a Unix path"),
        }
    }
    Ok(rel)
}

/// The directory `rel` of `root`, made (0755, root's) where missing; none of its components
/// may be a symbolic link or a non-directory.
fn dir_in(root: &Path, rel: &Path) -> std::result::Result<PathBuf, String> {
    let mut dir = root.to_path_buf();
    for c in rel.components() {
        dir.push(c);
        match dir.symlink_metadata() {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!(
                    "its directory {} is a symbolic link in the image: mvm does not write \
                     through links",
                    dir.strip_prefix(root).unwrap_or(&dir).display()
                ))
            }
            Ok(_) => {
                return Err(format!(
                    "{} is not a directory",
                    dir.strip_prefix(root).unwrap_or(&dir).display()
                ))
            }
            Err(_) => std::fs::DirBuilder::new()
                .create(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?,
        }
    }
    Ok(dir)
}

/// The existing non-directory `rel` of `root` (a hard link's target), reached without
/// following a symbolic link.
fn file_in(root: &Path, rel: &Path) -> std::result::Result<PathBuf, String> {
    let name = rel
        .file_name()
        .ok_or_else(|| "a hard link to the root".to_owned())?;
    let mut path = root.to_path_buf();
    for c in rel.parent().unwrap_or(Path::new("")).components() {
        path.push(c);
        match path.symlink_metadata() {
            Ok(m) if m.is_dir() => {}
            _ => {
                return Err(format!(
                    "hard link target {} does not lie in a directory of the image (or passes \
                     through a symbolic link)",
                    rel.display()
                ))
            }
        }
    }
    path.push(name);
    match path.symlink_metadata() {
        Ok(m) if !m.is_dir() => Ok(path),
        Ok(_) => Err(format!("hard link target {} is a directory", rel.display())),
        Err(_) => Err(format!(
            "hard link target {} is not in the image",
            rel.display()
        )),
    }
}

/// Removes whatever is at `path` (a whole directory tree; links are removed, not followed).
fn remove_any(path: &Path) -> std::io::Result<()> {
    match path.symlink_metadata() {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path),
        Ok(_) => std::fs::remove_file(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Empties `dir` but for what the current layer made (`made`).
fn clear_dir(dir: &Path, made: &HashSet<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !made.contains(&path) {
            remove_any(&path)?;
        }
    }
    Ok(())
}

fn mknod(path: &Path, kind: libc::mode_t) -> std::io::Result<()> {
    let c = mvm_sys::cstr::from_path(path).map_err(|e| e.source)?;
    // SAFETY: `c` is a NUL-terminated path; mknod does not keep it.
    if unsafe { libc::mknod(c.as_ptr(), kind | 0o600, 0) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the modification (and access) time of `path` itself, links not followed.
fn set_mtime(path: &Path, secs: i64) -> std::io::Result<()> {
    let c = mvm_sys::cstr::from_path(path).map_err(|e| e.source)?;
    let t = libc::timespec {
        tv_sec: secs,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: `c` is a NUL-terminated path and `times` two timespecs; neither is kept.
    let ret = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_testkit::registry::{layer, Entry};
    use std::os::unix::fs::MetadataExt;

    fn tree() -> tempfile::TempDir {
        tempfile::tempdir().expect("tempdir")
    }

    fn apply(root: &Path, entries: &[Entry<'_>]) -> Result<Applied> {
        apply_layer(root, std::io::Cursor::new(layer(entries)), "layer test")
    }

    #[test]
    fn entries_ownership_links_and_whiteouts() {
        let t = tree();
        let root = t.path();
        apply(
            root,
            &[
                Entry::Dir("etc/", 0o755),
                Entry::Owned("etc/owned", 0o4755, 1000, 1001, b"x"),
                Entry::File("etc/gone", 0o644, b"gone"),
                Entry::Dir("opaque/", 0o755),
                Entry::File("opaque/old", 0o644, b"old"),
                Entry::Symlink("etc/link", "/etc/shadow"),
                Entry::Hardlink("etc/hard", "etc/owned"),
            ],
        )
        .expect("first layer");
        let owned = root.join("etc/owned").symlink_metadata().expect("owned");
        assert_eq!(
            (owned.uid(), owned.gid(), owned.mode() & 0o7777),
            (1000, 1001, 0o4755)
        );
        assert_eq!(owned.mtime(), 1_700_000_000);
        assert_eq!(
            root.join("etc/hard")
                .symlink_metadata()
                .expect("hard")
                .ino(),
            owned.ino()
        );
        // The link is made as it is, never followed.
        assert_eq!(
            std::fs::read_link(root.join("etc/link")).expect("link"),
            Path::new("/etc/shadow")
        );
        apply(
            root,
            &[
                Entry::File("etc/.wh.gone", 0o644, b""),
                Entry::File("opaque/.wh..wh..opq", 0o644, b""),
                Entry::File("opaque/new", 0o644, b"new"),
                // Replacing the link with a file writes the tree, not what the link named.
                Entry::File("etc/link", 0o644, b"mine"),
            ],
        )
        .expect("second layer");
        assert!(!root.join("etc/gone").exists());
        assert!(!root.join("opaque/old").exists());
        assert_eq!(std::fs::read(root.join("opaque/new")).expect("new"), b"new");
        assert_eq!(std::fs::read(root.join("etc/link")).expect("file"), b"mine");
    }

    #[test]
    fn hostile_entries_are_refused_and_reach_nothing_outside() {
        let outside = tree();
        let target = outside.path().join("target");
        std::fs::create_dir(&target).expect("target dir");
        std::fs::write(target.join("secret"), b"host secret").expect("secret");
        let target_str = target.display().to_string();
        let climb = "../".repeat(20) + target_str.trim_start_matches('/');
        let cases: Vec<(&str, Vec<Entry<'_>>)> = vec![
            ("`..` in a path", vec![Entry::File(&climb, 0o644, b"x")]),
            (
                "`..` in a hard link",
                vec![Entry::Hardlink("steal", "../../../../etc/passwd")],
            ),
            (
                "a write through an absolute symlink",
                vec![
                    Entry::Symlink("escape", &target_str),
                    Entry::File("escape/planted", 0o644, b"x"),
                ],
            ),
            (
                "a hard link through a symlink",
                vec![
                    Entry::Symlink("escape", &target_str),
                    Entry::Hardlink("stolen", "escape/secret"),
                ],
            ),
            (
                "a whiteout through a symlink",
                vec![
                    Entry::Symlink("escape", &target_str),
                    Entry::File("escape/.wh.secret", 0o644, b""),
                ],
            ),
        ];
        for (what, entries) in cases {
            let t = tree();
            let err = apply(t.path(), &entries).expect_err(what).to_string();
            assert!(err.contains("layer test"), "{what}: {err}");
            assert_eq!(
                std::fs::read(target.join("secret")).expect("secret"),
                b"host secret",
                "{what}"
            );
            assert!(!target.join("planted").exists(), "{what}");
            assert!(!t.path().join("stolen").exists(), "{what}");
        }
        // An absolute hard link target names the image's file, not the host's.
        let t = tree();
        let err = apply(t.path(), &[Entry::Hardlink("passwd", "/etc/passwd")]).expect_err("absent");
        assert!(
            err.to_string().contains("hard link target etc/passwd"),
            "{err}"
        );
        assert!(!t.path().join("passwd").exists());
    }

    #[test]
    fn device_nodes_are_left_out() {
        let t = tree();
        let applied = apply(
            t.path(),
            &[Entry::Dir("dev/", 0o755), Entry::Char("dev/mem", 1, 1)],
        )
        .expect("layer");
        assert_eq!(applied.devices_skipped, 1);
        t.path().join("dev/mem").symlink_metadata().unwrap_err();
    }
}
