//! Power-down: stopping every process, leaving the file systems clean, powering off or
//! rebooting.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

use super::error::{sys, InitError};
use super::root;
use crate::protocol::ShutdownAction;

/// How long [`power_down`] waits for the processes it killed to be gone.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// The mount points of this mount namespace, in the order of `/proc/self/mountinfo` (a
/// mount comes after the one it is mounted on).
fn mount_points() -> Result<Vec<PathBuf>, InitError> {
    Ok(mvm_sys::mountinfo::read()?
        .into_iter()
        .map(|m| m.mount_point)
        .collect())
}

/// Makes the file system whose root `disk` is open on read-only through the new mount API,
/// which (unlike `mount(MS_REMOUNT)`) also reaches a mount detached from every namespace.
fn reconfigure_read_only(disk: &OwnedFd) -> Result<(), InitError> {
    let err = |what: &str| InitError::Sys {
        what: format!("{what} of the overlay's upper disk, to make it read-only"),
        source: io::Error::last_os_error(),
    };
    // SAFETY: fspick with an open fd, an empty NUL-terminated path and flag constants; it
    // returns a new fd or -1.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fspick,
            disk.as_raw_fd(),
            c"".as_ptr(),
            libc::FSPICK_EMPTY_PATH | libc::FSPICK_CLOEXEC,
        )
    };
    if ret < 0 {
        return Err(err("fspick"));
    }
    // SAFETY: fspick returned a new fd that nothing else owns.
    let context = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(ret as i32) };
    let config = |cmd: libc::c_uint, key: Option<&std::ffi::CStr>| {
        // SAFETY: fsconfig on the context fd with a NUL-terminated key (or null) and no
        // value, as FSCONFIG_SET_FLAG and FSCONFIG_CMD_RECONFIGURE expect.
        unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                context.as_raw_fd(),
                cmd,
                key.map_or(std::ptr::null(), |k| k.as_ptr()),
                std::ptr::null::<libc::c_void>(),
                0,
            )
        }
    };
    if config(libc::FSCONFIG_SET_FLAG, Some(c"ro")) < 0 {
        return Err(err("fsconfig(ro)"));
    }
    if config(libc::FSCONFIG_CMD_RECONFIGURE, None) < 0 {
        return Err(err("fsconfig(reconfigure)"));
    }
    Ok(())
}

/// Leaves the file systems consistent for the power-off, once every other process is gone:
/// unmounts every mount of this namespace but `/`, innermost first (releasing the disks of
/// `Mount` requests; a busy one is detached lazily), remounts `/` read-only if this init
/// mounted it, and then the overlay's upper disk. Best effort: it carries on past failures
/// and returns them.
pub fn quiesce_file_systems() -> Vec<InitError> {
    let mut errors = Vec::new();
    match mount_points() {
        Ok(points) => {
            for point in points
                .iter()
                .rev()
                .filter(|p| p.as_path() != Path::new("/"))
            {
                let result = match umount2(point, MntFlags::empty()) {
                    Err(nix::Error::EBUSY) => umount2(point, MntFlags::MNT_DETACH),
                    other => other,
                };
                // EINVAL: already gone with a lazily detached parent.
                if let Err(e) = result.or_else(|e| match e {
                    nix::Error::EINVAL | nix::Error::ENOENT => Ok(()),
                    e => Err(e),
                }) {
                    errors.push(sys(format!("unmounting {}", point.display()))(e));
                }
            }
        }
        Err(e) => errors.push(e),
    }
    if root::owns_root() {
        let none: Option<&str> = None;
        if let Err(e) = mount(
            none,
            "/",
            none,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            none,
        ) {
            errors.push(sys("remounting / read-only")(e));
        }
    }
    let disks = root::take_detached_disks();
    errors.extend(disks.iter().filter_map(|d| reconfigure_read_only(d).err()));
    errors
}

/// Reaps children until none is left or `timeout` passes; returns whether none is left.
fn reap_all(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: waitpid with a null status pointer, integers otherwise.
        match unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } {
            -1 if io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) => return true,
            0 | -1 if Instant::now() >= deadline => return false,
            0 | -1 => std::thread::sleep(Duration::from_millis(10)),
            _ => {}
        }
    }
}

/// Stops every process, waits for them to be gone, unmounts or remounts read-only the file
/// systems ([`quiesce_file_systems`]), syncs and powers off or reboots. Never returns; if the
/// kernel refuses, it logs and sleeps forever (PID 1 must not exit).
pub fn power_down(action: ShutdownAction) -> ! {
    // SAFETY: kill(2) with pid -1 signals every process but ourselves; integers only.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // As PID 1, every orphan is our child: once all are reaped none holds a file open.
    if !reap_all(KILL_WAIT) {
        crate::log!("power-down: processes still running {KILL_WAIT:?} after SIGKILL");
    }
    nix::unistd::sync();
    for e in quiesce_file_systems() {
        crate::log!("power-down: {e}");
    }
    nix::unistd::sync();
    let mode = match action {
        ShutdownAction::PowerOff => RebootMode::RB_POWER_OFF,
        ShutdownAction::Reboot => RebootMode::RB_AUTOBOOT,
    };
    let Err(e) = reboot(mode);
    crate::log!("reboot({mode:?}) failed: {e}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
