//! A persistent tap device with an IPv4 address, for micro-VM network tests. Busybox `ip` has
//! no `tuntap`, so the device is made with TUNSETIFF + TUNSETPERSIST; the VMM then opens it by
//! name. Dropping the [`Tap`] removes the device.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags member of the union.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Why a tap could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("tap name {0:?} is longer than 15 bytes or holds a NUL")]
    Name(String),
    /// A tun ioctl or open failed.
    #[error("{what} for tap {name}: {source} (needs root or CAP_NET_ADMIN and the tun module)")]
    Tun {
        /// The failing step.
        what: &'static str,
        /// The tap.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// `ip` failed to configure the device.
    #[error("`ip {args}` failed: {detail}")]
    Ip {
        /// The arguments.
        args: String,
        /// Exit status and stderr, or the spawn error.
        detail: String,
    },
}

/// A persistent tap, up, with an address; removed on drop.
pub struct Tap {
    name: String,
}

fn tun_ioctl(name: &str, persist: bool) -> Result<(), TapError> {
    let tun_err = |what, source| TapError::Tun {
        what,
        name: name.to_string(),
        source,
    };
    let c_name = CString::new(name).map_err(|_| TapError::Name(name.to_string()))?;
    let bytes = c_name.as_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        return Err(TapError::Name(name.to_string()));
    }
    // SAFETY: a NUL-terminated path and plain flags; the result is checked.
    let fd = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(tun_err(
            "opening /dev/net/tun",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd was just opened and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    for (dst, src) in req.name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads a struct ifreq, which IfReq lays out (40 bytes, C layout).
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(tun_err("TUNSETIFF", std::io::Error::last_os_error()));
    }
    // SAFETY: TUNSETPERSIST takes an integer argument by value.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETPERSIST, libc::c_ulong::from(persist)) } < 0 {
        return Err(tun_err("TUNSETPERSIST", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<(), TapError> {
    let joined = args.join(" ");
    match Command::new("ip").args(args).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(TapError::Ip {
            args: joined,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }),
        Err(e) => Err(TapError::Ip {
            args: joined,
            detail: e.to_string(),
        }),
    }
}

impl Tap {
    /// Creates tap `name` with address `cidr` (e.g. `10.0.0.1/30`) and brings it up.
    /// A leftover persistent tap of the same name (from an aborted run) is removed first.
    pub fn create(name: &str, cidr: &str) -> Result<Self, TapError> {
        if Self::exists(name) {
            tun_ioctl(name, false)?;
        }
        tun_ioctl(name, true)?;
        let tap = Tap {
            name: name.to_string(),
        };
        ip(&["addr", "add", cidr, "dev", name])?;
        ip(&["link", "set", name, "up"])?;
        Ok(tap)
    }

    /// Whether a network interface of this name exists.
    pub fn exists(name: &str) -> bool {
        std::path::Path::new("/sys/class/net").join(name).exists()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Err(e) = tun_ioctl(&self.name, false) {
            eprintln!("nested: cannot remove tap {}: {e}", self.name);
        }
    }
}
