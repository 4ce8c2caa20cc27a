//! `Reidentify`: a guest restored from a snapshot becomes its own — host name, the guest
//! interface's MAC and address, its resolver, a reseeded kernel RNG, the wall clock and a
//! machine id — before the host lets anything else run in it. A sandbox's own VM resumed
//! keeps its MAC and machine id (the same machine), and gets the clock and entropy.

use std::io;
use std::os::fd::AsRawFd;

use crate::init::{
    machine_id_line, reconfigure_network, set_hostname, write_resolv_conf, GUEST_INTERFACE,
    MACHINE_ID,
};
use crate::protocol::{ErrorKind, Identity, RemoteError};

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])` (linux/random.h).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)` (linux/random.h).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
/// Most entropy bytes taken at once (the kernel's own limit per ioctl is far above).
const MAX_ENTROPY: usize = 512;

/// Applies `identity`; only the guest's init agent may (a host-process agent has no machine
/// of its own to change).
pub fn reidentify(init: bool, identity: Identity) -> Result<(), RemoteError> {
    if !init {
        return Err(RemoteError::new(
            ErrorKind::InvalidInput,
            "only a VM's agent takes a new identity: this agent runs as a host process (jail tier)"
                .to_string(),
        ));
    }
    if identity.entropy.len() < 32 || identity.entropy.len() > MAX_ENTROPY {
        return Err(RemoteError::new(
            ErrorKind::InvalidInput,
            format!(
                "entropy must be 32 to {MAX_ENTROPY} bytes, got {}",
                identity.entropy.len()
            ),
        ));
    }
    // The RNG first: what follows may draw from it.
    reseed(&identity.entropy).map_err(|e| RemoteError::from_io("reseeding the RNG", &e))?;
    set_clock(identity.realtime_ns).map_err(|e| RemoteError::from_io("setting the clock", &e))?;
    set_hostname(&identity.hostname).map_err(init_error)?;
    let has_interface = std::path::Path::new("/sys/class/net")
        .join(GUEST_INTERFACE)
        .exists();
    match (has_interface, identity.ip) {
        (true, ip) => {
            reconfigure_network(GUEST_INTERFACE, identity.mac, ip.as_ref()).map_err(init_error)?
        }
        // A VM saved without a NIC has nothing to reconfigure, unless asked for an address.
        (false, None) => {}
        (false, Some(ip)) => {
            return Err(RemoteError::new(
                ErrorKind::NotFound,
                format!("the guest has no {GUEST_INTERFACE} to give {ip}"),
            ))
        }
    }
    if let Some(nameserver) = identity.dns {
        write_resolv_conf(nameserver).map_err(init_error)?;
    }
    if identity.keep_machine_id {
        return Ok(());
    }
    write_machine_id(&identity.entropy)
        .map_err(|e| RemoteError::from_io(format!("writing {MACHINE_ID}"), &e))
}

fn init_error(e: crate::init::InitError) -> RemoteError {
    match e {
        crate::init::InitError::Sys { what, source } => RemoteError::from_io(what, &source),
        other => RemoteError::new(ErrorKind::InvalidInput, other.to_string()),
    }
}

/// Credits `entropy` to the kernel's input pool and reseeds the CRNG from it, so the guest's
/// random numbers part from every other guest restored from the same snapshot.
fn reseed(entropy: &[u8]) -> io::Result<()> {
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/random")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + entropy.len());
    let bits = i32::try_from(entropy.len() * 8).expect("MAX_ENTROPY bits fit in i32");
    let len = i32::try_from(entropy.len()).expect("MAX_ENTROPY fits in i32");
    info.extend_from_slice(&bits.to_ne_bytes());
    info.extend_from_slice(&len.to_ne_bytes());
    info.extend_from_slice(entropy);
    // SAFETY: `info` is a rand_pool_info of `buf_size` bytes of data, alive for the call; the
    // kernel only reads it.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets CLOCK_REALTIME to `realtime_ns` since the epoch.
fn set_clock(realtime_ns: u64) -> io::Result<()> {
    let now = libc::timespec {
        tv_sec: (realtime_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (realtime_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `now` is a valid timespec the kernel only reads.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &now) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes a machine id made from the host's entropy (its last 16 bytes).
fn write_machine_id(entropy: &[u8]) -> io::Result<()> {
    std::fs::write(MACHINE_ID, machine_id_line(&entropy[entropy.len() - 16..]))
}
