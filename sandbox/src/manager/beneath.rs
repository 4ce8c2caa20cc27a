//! Paths a sandbox can write, reached by root without following the sandbox's links.
//!
//! A jail's `/run` belongs to the sandbox's uid, so the name `<jail root>/run/agent.sock` is
//! the tenant's to replace: with a symlink to another sandbox's socket, a plain host path
//! resolution by root (mvmd, the daemonless CLI, the shim) would connect to the victim's
//! agent. Every socket the manager reaches inside a jail is therefore opened here first:
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` from the run
//! directory, `O_PATH` so that nothing is opened for I/O, then `fstat` of what was reached (a
//! socket owned by the sandbox's uid), and the connection goes through `/proc/self/fd/N`,
//! which names exactly that inode: there is no window in which the name can be swapped.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// `openat2(dir, path, O_PATH | O_NOFOLLOW | O_CLOEXEC | extra, RESOLVE_BENEATH |
/// RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`: `path` (relative) must lie beneath `dir`
/// and no component of it may be a link.
fn open_beneath(dir: &Path, path: &Path, extra: libc::c_int) -> std::io::Result<OwnedFd> {
    let dir_c = mvm_sys::cstr::from_path(dir).map_err(|e| e.source)?;
    // SAFETY: a NUL-terminated path; the fd returned is owned below.
    let dirfd = unsafe {
        libc::open(
            dir_c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if dirfd == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `dirfd` was just opened and is owned by nothing else.
    let dirfd = unsafe { OwnedFd::from_raw_fd(dirfd) };
    open_beneath_fd(&dirfd, path, extra)
}

/// [`open_beneath`] from an open directory.
fn open_beneath_fd(dirfd: &OwnedFd, path: &Path, extra: libc::c_int) -> std::io::Result<OwnedFd> {
    let path_c = mvm_sys::cstr::from_path(path).map_err(|e| e.source)?;
    // SAFETY: `open_how` is plain integers, for which all zeroes is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC | extra) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 with a valid dirfd, a NUL-terminated path and an `open_how` of the size
    // passed; the fd returned is owned below.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dirfd.as_raw_fd(),
            path_c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd == -1 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// A unix socket inside a sandbox's jail, pinned: its path ([`Self::path`]) names the inode
/// that was checked, whatever happens to the name in the jail afterwards. Connect while the
/// value lives.
#[derive(Debug)]
pub struct JailSocket {
    fd: OwnedFd,
}

impl JailSocket {
    /// Opens `rel` (a path relative to `base`, e.g. `jail/mvm-agent/<id>/root/run/agent.sock`)
    /// without following any link, and checks it is a socket owned by `uid`.
    pub fn open(base: &Path, rel: &Path, uid: u32) -> Result<JailSocket> {
        let shown = base.join(rel);
        let through_a_link = || {
            Error::Host(format!(
                "{} is reached through a link, which a sandbox may have planted; refusing to \
                 follow it (destroy the sandbox: its jail was tampered with)",
                shown.display()
            ))
        };
        let fd = open_beneath(base, rel, 0).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::EXDEV) => through_a_link(),
            _ => Error::host(format!("opening {}", shown.display()), e),
        })?;
        // SAFETY: `stat` is plain integers, for which all zeroes is valid.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on an fd we own into a buffer of the right type.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } == -1 {
            return Err(Error::host(
                format!("stat {}", shown.display()),
                std::io::Error::last_os_error(),
            ));
        }
        // With O_PATH | O_NOFOLLOW a link as the last component is opened, not followed.
        if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            return Err(through_a_link());
        }
        if st.st_mode & libc::S_IFMT != libc::S_IFSOCK || st.st_uid != uid {
            return Err(Error::Host(format!(
                "{} is not a socket of the sandbox's user {uid} (mode {:o}, owner {}); refusing \
                 to connect (destroy the sandbox: its jail was tampered with)",
                shown.display(),
                st.st_mode,
                st.st_uid
            )));
        }
        Ok(JailSocket { fd })
    }

    /// A path that reaches exactly the checked socket (`/proc/self/fd/N`), valid while `self`
    /// lives.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// Creates the regular file `name` in directory `dir` (which must not be a link), refusing an
/// existing entry of any kind (`O_CREAT | O_EXCL` never follows a planted link), with `mode`.
pub fn create_new_file(dir: &Path, name: &str, mode: u32) -> Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| Error::host(format!("creating {}", path.display()), e))
}

/// Opens (making it, mode 0755, when missing) directory `name` beneath `parent`.
fn open_or_make_child(parent: &OwnedFd, name: &str, shown: &Path) -> Result<OwnedFd> {
    let open = || open_beneath_fd(parent, Path::new(name), libc::O_DIRECTORY);
    let fd = match open() {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let name_c = mvm_sys::cstr::from_path(Path::new(name))
                .map_err(|e| Error::host(format!("making {}", shown.display()), e.source))?;
            // SAFETY: mkdirat with a directory fd we own and a NUL-terminated name.
            if unsafe { libc::mkdirat(parent.as_raw_fd(), name_c.as_ptr(), 0o755) } == -1 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::AlreadyExists {
                    return Err(Error::host(format!("making {}", shown.display()), e));
                }
            }
            open()
        }
        other => other,
    };
    fd.map_err(|e| match e.raw_os_error() {
        Some(libc::ELOOP) | Some(libc::EXDEV) | Some(libc::ENOTDIR) => Error::Invalid(format!(
            "{} of the sandbox's tree is a link or not a directory; refusing to write there",
            shown.display()
        )),
        _ => Error::host(format!("opening {}", shown.display()), e),
    })
}

/// What [`TreeDir::read_regular`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Regular {
    /// The file's bytes.
    Contents(Vec<u8>),
    /// No regular file by that name (nothing, a link, a directory, a device...).
    Missing,
    /// A regular file of more bytes (at least this many) than asked for.
    TooLarge(u64),
}

/// A directory of a sandbox's tree, opened without following any link (a tenant may have
/// made any name in its tree a link), in which root replaces files by the directory's
/// descriptor: no name is resolved again, so no swap after the check can redirect a write.
#[derive(Debug)]
pub struct TreeDir {
    fd: OwnedFd,
    shown: PathBuf,
}

impl TreeDir {
    /// Opens directory `rel` (relative, e.g. `etc/ssl/certs`) of tree `root`, each component
    /// made (mode 0755) when missing and opened from its parent's descriptor. A link or a
    /// non-directory on the way is refused.
    pub fn open_or_make(root: &Path, rel: &str) -> Result<TreeDir> {
        let mut shown = root.to_path_buf();
        let mut fd = open_beneath(root, Path::new("."), libc::O_DIRECTORY)
            .map_err(|e| Error::host(format!("opening {}", root.display()), e))?;
        for part in rel.split('/').filter(|p| !p.is_empty()) {
            shown.push(part);
            fd = open_or_make_child(&fd, part, &shown)?;
        }
        Ok(TreeDir { fd, shown })
    }

    /// The contents of regular file `name` if it holds at most `limit` bytes; a link there is
    /// not followed (as if there were no file).
    pub fn read_regular(&self, name: &str, limit: u64) -> Result<Regular> {
        use std::io::Read;
        let shown = self.shown.join(name);
        let err = |e| Error::host(format!("reading {}", shown.display()), e);
        let name_c = mvm_sys::cstr::from_path(Path::new(name)).map_err(|e| err(e.source))?;
        // SAFETY: openat with a directory fd we own and a NUL-terminated name; O_NOFOLLOW
        // refuses a link as the name.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name_c.as_ptr(),
                libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd == -1 {
            let e = std::io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ENOENT | libc::ELOOP) => Ok(Regular::Missing),
                _ => Err(err(e)),
            };
        }
        // SAFETY: openat returned a new fd that nothing else owns.
        let file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let meta = file.metadata().map_err(err)?;
        if !meta.is_file() {
            return Ok(Regular::Missing);
        }
        let mut contents = Vec::new();
        file.take(limit + 1)
            .read_to_end(&mut contents)
            .map_err(err)?;
        if contents.len() as u64 > limit {
            return Ok(Regular::TooLarge(meta.len().max(limit + 1)));
        }
        Ok(Regular::Contents(contents))
    }

    /// Replaces entry `name` (a file or link; not a directory) with a new regular file of
    /// `mode` holding `contents`.
    pub fn replace_file(&self, name: &str, mode: u32, contents: &[u8]) -> Result<()> {
        use std::io::Write;
        let shown = self.shown.join(name);
        let err = |e| Error::host(format!("writing {}", shown.display()), e);
        let name_c = mvm_sys::cstr::from_path(Path::new(name)).map_err(|e| err(e.source))?;
        // SAFETY: unlinkat with a directory fd we own and a NUL-terminated name; it removes
        // the entry itself, never what a link names.
        if unsafe { libc::unlinkat(self.fd.as_raw_fd(), name_c.as_ptr(), 0) } == -1 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(err(e));
            }
        }
        // SAFETY: openat with a directory fd we own and a NUL-terminated name; O_EXCL |
        // O_NOFOLLOW create a new file and never follow a link planted meanwhile.
        let fd = unsafe {
            libc::openat(
                self.fd.as_raw_fd(),
                name_c.as_ptr(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                mode,
            )
        };
        if fd == -1 {
            return Err(err(std::io::Error::last_os_error()));
        }
        // SAFETY: openat returned a new fd that nothing else owns.
        let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.write_all(contents).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    #[test]
    fn a_socket_is_reached_through_its_pinned_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("run")).unwrap();
        let _listener = UnixListener::bind(dir.path().join("run/agent.sock")).unwrap();
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        let socket = JailSocket::open(dir.path(), Path::new("run/agent.sock"), uid).unwrap();
        UnixStream::connect(socket.path()).expect("connect through /proc/self/fd");
        // Another owner is refused.
        let err = JailSocket::open(dir.path(), Path::new("run/agent.sock"), uid + 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a socket of the sandbox's user"), "{err}");
    }

    #[test]
    fn links_planted_by_a_sandbox_are_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        let _listener = UnixListener::bind(victim.join("agent.sock")).unwrap();
        // SAFETY: getuid has no preconditions.
        let uid = unsafe { libc::getuid() };
        let tenant = dir.path().join("tenant");
        std::fs::create_dir(&tenant).unwrap();
        // The socket's name replaced with a link to another sandbox's socket ...
        std::fs::create_dir(tenant.join("run")).unwrap();
        std::os::unix::fs::symlink(victim.join("agent.sock"), tenant.join("run/agent.sock"))
            .unwrap();
        let err = JailSocket::open(&tenant, Path::new("run/agent.sock"), uid)
            .unwrap_err()
            .to_string();
        assert!(err.contains("through a link"), "{err}");
        // ... or a directory on the way replaced with one.
        std::fs::remove_dir_all(tenant.join("run")).unwrap();
        std::os::unix::fs::symlink(&victim, tenant.join("run")).unwrap();
        let err = JailSocket::open(&tenant, Path::new("run/agent.sock"), uid)
            .unwrap_err()
            .to_string();
        assert!(err.contains("through a link"), "{err}");
        // A regular file is no socket.
        std::fs::remove_file(tenant.join("run")).unwrap();
        std::fs::create_dir(tenant.join("run")).unwrap();
        std::fs::write(tenant.join("run/agent.sock"), "").unwrap();
        JailSocket::open(&tenant, Path::new("run/agent.sock"), uid).unwrap_err();
    }

    #[test]
    fn new_files_never_follow_a_planted_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("host-file");
        std::fs::write(&target, "precious").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join("staged")).unwrap();
        create_new_file(dir.path(), "staged", 0o600).unwrap_err();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious");
        create_new_file(dir.path(), "fresh", 0o600).unwrap();
    }

    #[test]
    fn tree_writes_stay_in_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let (root, host) = (dir.path().join("root"), dir.path().join("host"));
        std::fs::create_dir_all(&host).unwrap();
        std::fs::write(host.join("resolv.conf"), "precious").unwrap();
        std::fs::create_dir(&root).unwrap();
        // A missing directory is made; a file there, or a link, is replaced.
        let etc = TreeDir::open_or_make(&root, "etc").unwrap();
        etc.replace_file("resolv.conf", 0o644, b"one").unwrap();
        std::os::unix::fs::symlink(host.join("resolv.conf"), root.join("etc/hosts")).unwrap();
        etc.replace_file("hosts", 0o644, b"two").unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "two"
        );
        assert_eq!(
            std::fs::read_to_string(root.join("etc/resolv.conf")).unwrap(),
            "one"
        );
        // The directory swapped for a link after it was opened: the write lands in the
        // directory that was opened (now out of the tree's name space), never in the host's.
        std::fs::rename(root.join("etc"), dir.path().join("moved")).unwrap();
        std::os::unix::fs::symlink(&host, root.join("etc")).unwrap();
        etc.replace_file("resolv.conf", 0o644, b"three").unwrap();
        assert_eq!(
            std::fs::read_to_string(host.join("resolv.conf")).unwrap(),
            "precious"
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("moved/resolv.conf")).unwrap(),
            "three"
        );
        // A link in the directory's place is refused when opening, as is a file.
        let err = TreeDir::open_or_make(&root, "etc").unwrap_err().to_string();
        assert!(err.contains("a link or not a directory"), "{err}");
        std::fs::remove_file(root.join("etc")).unwrap();
        std::fs::write(root.join("etc"), "").unwrap();
        TreeDir::open_or_make(&root, "etc").unwrap_err();
        assert_eq!(
            std::fs::read_to_string(host.join("resolv.conf")).unwrap(),
            "precious"
        );
    }
}
