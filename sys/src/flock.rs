//! flock(2): advisory whole-file locks, released when the last descriptor of the open file
//! closes (so a holder that dies drops its locks).

use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// What kind of lock to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Many holders at once (`LOCK_SH`).
    Shared,
    /// One holder (`LOCK_EX`).
    Exclusive,
}

impl Kind {
    fn operation(self) -> libc::c_int {
        match self {
            Kind::Shared => libc::LOCK_SH,
            Kind::Exclusive => libc::LOCK_EX,
        }
    }
}

/// Takes a `kind` lock on `file`, waiting while another open file holds a conflicting one
/// (a signal's interruption is retried).
pub fn lock(file: &impl AsFd, kind: Kind) -> io::Result<()> {
    loop {
        match flock(file, kind.operation()) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Takes a `kind` lock on `file` if no other open file holds a conflicting one: whether it
/// was taken.
pub fn try_lock(file: &impl AsFd, kind: Kind) -> io::Result<bool> {
    match flock(file, kind.operation() | libc::LOCK_NB) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Releases this open file's lock on `file`.
pub fn unlock(file: &impl AsFd) -> io::Result<()> {
    flock(file, libc::LOCK_UN)
}

fn flock(file: &impl AsFd, operation: libc::c_int) -> io::Result<()> {
    // SAFETY: flock on a descriptor borrowed for the call; no memory is passed.
    if unsafe { libc::flock(file.as_fd().as_raw_fd(), operation) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exclusive_lock_excludes_other_open_files_until_released() {
        let a = tempfile::NamedTempFile::new().unwrap();
        let b = a.reopen().unwrap();
        lock(&a, Kind::Exclusive).unwrap();
        assert!(!try_lock(&b, Kind::Shared).unwrap());
        assert!(!try_lock(&b, Kind::Exclusive).unwrap());
        unlock(&a).unwrap();
        assert!(try_lock(&b, Kind::Exclusive).unwrap());
    }

    #[test]
    fn shared_locks_coexist_and_a_closed_file_releases_its_lock() {
        let a = tempfile::NamedTempFile::new().unwrap();
        let (b, c) = (a.reopen().unwrap(), a.reopen().unwrap());
        assert!(try_lock(&a, Kind::Shared).unwrap());
        assert!(try_lock(&b, Kind::Shared).unwrap());
        assert!(!try_lock(&c, Kind::Exclusive).unwrap());
        drop(b);
        unlock(&a).unwrap();
        assert!(try_lock(&c, Kind::Exclusive).unwrap());
    }
}
