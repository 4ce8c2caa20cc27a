//! mvm-jailer: the second wall around every VMM process.
//!
//! Modelled on Firecracker's jailer, with a compatible command line. In order, failing closed and
//! rolling back what it made at any step:
//! 1. validate the [`JailConfig`]; close inherited fds, clear the environment ([`sanitize_process`]);
//! 2. build `<chroot-base>/<exec-name>/<id>/root`: the exec file (bound read-only, or copied),
//!    `/dev/kvm`, `/dev/net/tun`, `/dev/urandom` owned by the jail uid/gid, bind-mount points (and, with
//!    `--mount-devpts`, `/dev/pts` and a `/dev/ptmx` symlink into it);
//! 3. make the per-jail cgroups (v1 or v2) and write the requested values ([`Jail::prepare`]);
//! 4. join them and the network namespace, unshare mount/ipc/uts (and pid) namespaces,
//!    `pivot_root` into the jail and detach the old root; mount procfs and a new devpts instance
//!    if asked;
//! 5. rlimits, drop to uid/gid with no capabilities and `no_new_privs`, optional Landlock;
//! 6. daemonize if asked, install the seccomp policy if asked ([`SeccompPolicy`]) and exec the
//!    target ([`Jail::enter`]).
//!
//! A multi-threaded program (such as the API daemon) must not call [`Jail::enter`] itself:
//! it spawns the `mvm-jailer` binary with [`JailConfig::to_args`] and removes a finished jail
//! with [`cleanup`].

mod cgroup;
mod chroot;
mod config;
mod error;
mod jail;
mod privileges;
mod process;
mod seccomp;

pub use cgroup::CgroupDir;
pub use chroot::{DeviceNode, DEVICE_NODES};
pub use config::{
    validate_id, validate_parent_cgroup, BindMount, CgroupSetting, CgroupVersion, JailConfig,
    JailSymlink, ResourceLimit, DEFAULT_CHROOT_BASE, DEFAULT_NO_FILE, DEFAULT_PARENT_CGROUP,
    DEVPTS_DIR, DEVPTS_MAX_PTYS, PTMX, RUN_DIR,
};
pub use error::{Error, Result};
pub use jail::{cleanup, CleanupConfig, Jail, DEFAULT_EXEC_FILE_NAME};
pub use process::{hold_relayed_signals, sanitize_process};
pub use seccomp::SeccompPolicy;

/// Runs a whole jailer invocation in the calling (single-threaded) process: sanitizes it,
/// prepares the jail and enters it. Returns only on failure or, with `new_pid_ns`, with the exit
/// code the supervising process should leave with.
pub fn run(config: JailConfig) -> Result<i32> {
    hold_relayed_signals().map_err(|e| Error::io("block the signals relayed to the jail", e))?;
    sanitize_process()?;
    Jail::prepare(config)?.enter()
}
