//! Where a sandbox's console log lives. The vm tier's VMM caps its own log
//! (`--console-limit`); a jail-tier agent writes its stdout and stderr straight into the file,
//! so there the file lies alone on a tmpfs of the console limit: past it writes fail with
//! ENOSPC (the agent ignores failed log writes) and the host's disk is never touched.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use vmm::devices::legacy::console::ConsoleLimit;

use crate::error::{Error, Result};
use crate::manager::{beneath, host};

/// Name of the log file in its directory (and with a saved sandbox's VM).
pub(super) const LOG_NAME: &str = "console.log";

/// The console log of a sandbox.
pub struct Console {
    /// The directory holding the log: the sandbox directory itself (vm tier) or the mount
    /// point of the log's own tmpfs (jail tier).
    dir: PathBuf,
}

impl Console {
    /// The vm tier's console, `<sandbox dir>/console.log`, capped by the VMM.
    pub fn vm(sandbox_dir: &Path) -> Self {
        Console {
            dir: sandbox_dir.to_owned(),
        }
    }

    /// The jail tier's console, `<sandbox dir>/console/console.log`, on its own tmpfs.
    pub fn jail(sandbox_dir: &Path) -> Self {
        Console {
            dir: sandbox_dir.join("console"),
        }
    }

    /// The log file.
    pub fn path(&self) -> PathBuf {
        self.dir.join(LOG_NAME)
    }

    /// Creates the jail tier's log on a fresh tmpfs of `limit` bytes (rounded up to pages),
    /// mode 0600 for root. What it mounted before a failure is removed by
    /// [`Console::unmount`].
    pub fn create_bounded(&self, limit: ConsoleLimit) -> Result<std::fs::File> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| Error::host(format!("creating {}", self.dir.display()), e))?;
        host::mount(
            Path::new("tmpfs"),
            &self.dir,
            Some("tmpfs"),
            libc::MS_NODEV | libc::MS_NOSUID | libc::MS_NOEXEC,
            Some(&format!("size={},nr_inodes=16,mode=0700", limit.bytes())),
        )?;
        self.create()
    }

    /// Creates the log file, 0600, refusing an existing entry.
    pub fn create(&self) -> Result<std::fs::File> {
        beneath::create_new_file(&self.dir, LOG_NAME, 0o600)
    }

    /// Opens the vm-tier log for a resumed VMM (made if missing, 0600), refusing a link, at
    /// its end: the jailer's and the VMM's output follow what is there (the VMM's cap counts
    /// it).
    pub fn reopen(&self) -> Result<std::fs::File> {
        use std::io::Seek;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.path();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| Error::host(format!("opening {}", path.display()), e))?;
        file.seek(std::io::SeekFrom::End(0))
            .map_err(|e| Error::host(format!("seeking to the end of {}", path.display()), e))?;
        Ok(file)
    }

    /// Unmounts the jail tier's tmpfs (its directory goes with the sandbox directory); nothing
    /// mounted is skipped.
    pub fn unmount(&self) -> Result<()> {
        host::umount(&self.dir)
    }
}

/// Environment variable overriding [`DEFAULT_CONSOLE_LIMIT`].
pub const CONSOLE_LIMIT_ENV: &str = "MVM_CONSOLE_LIMIT";
/// Default size cap of a sandbox's console log: 1 MiB.
pub const DEFAULT_CONSOLE_LIMIT: u64 = 1 << 20;

/// The console limit from `MVM_CONSOLE_LIMIT`; the default when unset, or when invalid (with
/// a warning naming the problem).
pub fn console_limit_from_env() -> ConsoleLimit {
    let default =
        ConsoleLimit::new(DEFAULT_CONSOLE_LIMIT).expect("the default is above the minimum");
    match std::env::var(CONSOLE_LIMIT_ENV) {
        Ok(value) if !value.is_empty() => value.parse().unwrap_or_else(|e| {
            tracing::warn!("{CONSOLE_LIMIT_ENV}: {e}; using {DEFAULT_CONSOLE_LIMIT}");
            default
        }),
        _ => default,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A resumed VMM's log goes on after what is there, also through a copy of the descriptor
    /// (the jailer's stdout and stderr share it); a link planted at the log is refused.
    #[test]
    fn a_reopened_log_is_written_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let console = Console::vm(dir.path());
        console.create().unwrap().write_all(b"boot\n").unwrap();
        let mut file = console.reopen().unwrap();
        let mut stderr = file.try_clone().unwrap();
        stderr.write_all(b"jailer\n").unwrap();
        file.write_all(b"resumed\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(console.path()).unwrap(),
            "boot\njailer\nresumed\n"
        );
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, b"host file").unwrap();
        std::fs::remove_file(console.path()).unwrap();
        std::os::unix::fs::symlink(&elsewhere, console.path()).unwrap();
        console.reopen().unwrap_err();
        assert_eq!(std::fs::read(&elsewhere).unwrap(), b"host file");
    }
}
