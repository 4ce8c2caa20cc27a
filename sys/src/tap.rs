//! Persistent tap devices made and removed with the tun driver's ioctls (no `ip tuntap`
//! process): the manager makes a vm-tier sandbox's tap in its network namespace, the nested
//! harness its test taps. A VMM then opens the device by name.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::{Error, Result};

// The tun driver's requests (linux/if_tun.h): _IOW('T', 202, int), _IOW('T', 203, int),
// _IOW('T', 204, int).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
/// A tap (Ethernet frames), not a tun (IP packets).
pub const IFF_TAP: libc::c_short = 0x0002;
/// Frames without the tun driver's 4-byte packet information.
pub const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags member of the union.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Makes the persistent tap `name` (frames without packet information, as a VMM opens it) in
/// the calling thread's network namespace, which `owner` (a uid) may open unprivileged when
/// given. A tap of that name already there is taken over as it is.
pub fn create_persistent(name: &str, owner: Option<u32>) -> Result<()> {
    let tun = attach(name)?;
    if let Some(uid) = owner {
        tun_ioctl(
            &tun,
            TUNSETOWNER,
            libc::c_ulong::from(uid),
            "TUNSETOWNER",
            name,
        )?;
    }
    tun_ioctl(&tun, TUNSETPERSIST, 1, "TUNSETPERSIST", name)
}

/// Removes the persistent tap `name` of the calling thread's network namespace.
pub fn remove_persistent(name: &str) -> Result<()> {
    let tun = attach(name)?;
    tun_ioctl(&tun, TUNSETPERSIST, 0, "TUNSETPERSIST", name)
}

/// A descriptor of /dev/net/tun attached to tap `name` (made if missing, not persistent yet).
fn attach(name: &str) -> Result<OwnedFd> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(Error::new(
            format!("tap {name:?}"),
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "an interface name is 1 to 15 bytes without NUL",
            ),
        ));
    }
    // SAFETY: a NUL-terminated path and plain flags; the result is checked.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(Error::last_os_error(format!(
            "opening /dev/net/tun for tap {name} (needs CAP_NET_ADMIN and the tun module)"
        )));
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let tun = unsafe { OwnedFd::from_raw_fd(fd) };
    set_iff(&tun, name, IFF_TAP | IFF_NO_PI)
        .map_err(|e| Error::new(format!("TUNSETIFF for tap {name}"), e))?;
    Ok(tun)
}

/// Attaches the /dev/net/tun descriptor `tun` to interface `name` with `flags` (TUNSETIFF:
/// a tap is made when missing and the caller may make one).
pub fn set_iff(tun: &impl AsRawFd, name: &str, flags: libc::c_short) -> std::io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is no interface name (1 to 15 bytes without NUL)"),
        ));
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags,
        _pad: [0; 22],
    };
    for (dst, src) in req.name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads and writes a struct ifreq, which IfReq lays out (40 bytes, C
    // layout); the name is NUL-terminated (checked shorter than IFNAMSIZ above).
    match unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } {
        -1 => Err(std::io::Error::last_os_error()),
        _ => Ok(()),
    }
}

/// The tun request `op` (named `what`) with the integer argument `value`.
fn tun_ioctl(
    tun: &OwnedFd,
    op: libc::c_ulong,
    value: libc::c_ulong,
    what: &str,
    name: &str,
) -> Result<()> {
    // SAFETY: these tun requests take an integer argument by value.
    if unsafe { libc::ioctl(tun.as_raw_fd(), op, value) } < 0 {
        return Err(Error::last_os_error(format!("{what} for tap {name}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_are_no_interface_names_are_refused() {
        for name in ["", "a-name-of-16-byte", "nul\0"] {
            let e = create_persistent(name, None).unwrap_err();
            assert_eq!(
                e.source.kind(),
                std::io::ErrorKind::InvalidInput,
                "{name:?}: {e}"
            );
        }
    }
}
