//! [`BusyLock`]: the flock marking a sandbox as being created or destroyed by a live manager.

use std::path::{Path, PathBuf};

use mvm_sys::flock;

use crate::error::{Error, Result};

/// An exclusive flock on `<run>/locks/<id>` marking a sandbox as being created or destroyed by
/// a live manager, so that another manager's reconciliation leaves it alone. Released (and the
/// file removed) on drop, or by the kernel when the holder dies.
pub(super) struct BusyLock {
    /// Holds the lock while open.
    _file: std::fs::File,
    path: PathBuf,
}

impl BusyLock {
    /// Takes the lock at `path`, or fails with a conflict when a live process holds it. The
    /// file appears at `path` already locked (made aside, locked, then linked in), so nobody
    /// ever finds it there unlocked; a file left by a dead holder is taken over.
    pub(super) fn acquire(path: &Path) -> Result<BusyLock> {
        use std::os::unix::fs::MetadataExt;
        static STAGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::host(format!("creating {}", dir.display()), e))?;
        let conflict = || {
            Error::Conflict(format!(
                "sandbox {} is being created or destroyed by another mvm process",
                path.file_name().unwrap_or_default().to_string_lossy()
            ))
        };
        // A name no sandbox id matches, unique to this process and call.
        let staged = dir.join(format!(
            ".lock-{}-{}",
            std::process::id(),
            STAGED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let fresh = std::fs::File::create(&staged)
            .map_err(|e| Error::host(format!("creating {}", staged.display()), e))?;
        let taken = (|| loop {
            if try_flock_exclusive(&fresh)? {
                match std::fs::hard_link(&staged, path) {
                    Ok(()) => return Ok(fresh),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(Error::host(format!("creating {}", path.display()), e)),
                }
            }
            // A file is there: a live holder's, or a dead one's to take over.
            let Ok(existing) = std::fs::File::open(path) else {
                continue; // Gone meanwhile: link ours.
            };
            if !try_flock_exclusive(&existing)? {
                return Err(conflict());
            }
            // Ours only while it is still the file at `path` (its holder may have removed it
            // just before we locked it).
            let locked = existing
                .metadata()
                .map_err(|e| Error::host(format!("stat {}", path.display()), e))?;
            match std::fs::metadata(path) {
                Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => {
                    return Ok(existing)
                }
                _ => continue,
            }
        })();
        let _ = std::fs::remove_file(&staged);
        Ok(BusyLock {
            _file: taken?,
            path: path.to_path_buf(),
        })
    }

    /// Whether a live process holds the lock at `path` (a lock file is never there
    /// unlocked but for a dead holder's).
    pub(super) fn held_elsewhere(path: &Path) -> bool {
        let Ok(file) = std::fs::File::open(path) else {
            return false;
        };
        // A shared probe, released when `file` closes.
        !flock::try_lock(&file, flock::Kind::Shared).unwrap_or(false)
    }
}

/// `flock(LOCK_EX | LOCK_NB)` on `file`: whether it was taken.
fn try_flock_exclusive(file: &std::fs::File) -> Result<bool> {
    flock::try_lock(file, flock::Kind::Exclusive).map_err(|e| Error::host("flock", e))
}

impl Drop for BusyLock {
    fn drop(&mut self) {
        // Closing the file right after this releases the lock.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_locks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks/0123456789ab");
        let held = BusyLock::acquire(&path).unwrap();
        assert!(BusyLock::held_elsewhere(&path));
        let err = BusyLock::acquire(&path)
            .err()
            .expect("a held lock is refused");
        assert!(matches!(err, Error::Conflict(_)), "{err}");
        drop(held);
        assert!(!path.exists(), "the holder removes its file");
        // A dead holder's file is taken over.
        std::fs::write(&path, "").unwrap();
        assert!(!BusyLock::held_elsewhere(&path));
        let taken = BusyLock::acquire(&path).unwrap();
        assert!(BusyLock::held_elsewhere(&path));
        drop(taken);
        // Nothing staged is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path().join("locks"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
