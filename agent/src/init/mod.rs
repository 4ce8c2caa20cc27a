//! Init duties of the agent when it is the guest's PID 1, one module each: the kernel
//! command-line parameters (`cmdline`), the base file systems and the overlay root (`root`),
//! the console (`console`), hostname and network (`net`), the identity files in /etc kept in
//! memory (`identity_files`), and power-off (`shutdown`).

mod cmdline;
mod console;
mod error;
mod identity_files;
mod net;
mod root;
mod shutdown;

use std::path::Path;

use nix::mount::MsFlags;

use console::reopen_console;
use root::mount_fs;

pub use cmdline::KernelParams;
pub use error::InitError;
pub use identity_files::{keep_identity_files_in_memory, machine_id_line, MACHINE_ID};
pub use net::{
    configure_network, reconfigure_network, set_hostname, write_resolv_conf, IpConfig,
    GUEST_INTERFACE,
};
pub use root::{mount_base, pivot_to_disk, pivot_to_overlay, OverlayUpper};
pub use shutdown::{power_down, quiesce_file_systems};

/// Runs every init duty, logging (not stopping at) failures: PID 1 must keep going.
pub fn run() {
    let report = |result: Result<(), InitError>| {
        if let Err(e) = result {
            crate::log!("init: {e}");
        }
    };
    report(prioritize());
    report(mount_fs("proc", "/proc", "proc", MsFlags::empty(), None));
    report(mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    ));
    let params = match std::fs::read_to_string("/proc/cmdline") {
        Ok(cmdline) => KernelParams::parse(&cmdline).unwrap_or_else(|e| {
            crate::log!("init: {e}; ignoring the mvm.* parameters");
            KernelParams::default()
        }),
        Err(e) => {
            crate::log!("init: reading /proc/cmdline: {e}");
            KernelParams::default()
        }
    };
    if let Some(upper) = &params.overlay {
        report(pivot_to_overlay(Path::new("/"), upper, Path::new("/run")));
    } else if let Some(device) = &params.root {
        report(pivot_to_disk(device, Path::new("/run")));
    }
    report(mount_base());
    report(keep_identity_files_in_memory());
    report(reopen_console());
    if let Some(name) = &params.hostname {
        report(set_hostname(name));
    }
    report(configure_network(GUEST_INTERFACE, params.ip.as_ref()));
    if let Some(nameserver) = params.dns {
        report(write_resolv_conf(nameserver));
    }
}

/// The nice value of the guest's agent: its requests come before the workload's CPU, so a
/// guest busy to the last cycle still answers, execs and takes a new identity at once. Every
/// process it starts is reset to 0 ([`crate::server`]'s exec).
const AGENT_NICE: libc::c_int = -20;

/// Gives this thread, and the threads it starts, [`AGENT_NICE`].
fn prioritize() -> Result<(), InitError> {
    // SAFETY: setpriority takes plain integers.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, AGENT_NICE) } != 0 {
        return Err(InitError::Sys {
            what: format!("setting the agent's nice value to {AGENT_NICE}"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}
