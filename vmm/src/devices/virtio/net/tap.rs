//! A tap device opened with IFF_VNET_HDR: every frame read or written starts with a 12-byte
//! `virtio_net_hdr_v1`.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use mvm_sys::tap::{set_iff, IFF_NO_PI, IFF_TAP};

/// Length of the virtio-net header on the tap and in the rings (virtio 1.x always has
/// `num_buffers`).
pub const VNET_HDR_LEN: usize = 12;

const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name does not fit an interface name.
    #[error("tap name {0:?} is invalid: use 1 to 15 bytes without '/' or NUL")]
    BadName(String),
    /// /dev/net/tun cannot be opened.
    #[error(
        "cannot open /dev/net/tun: {0} (is the tun module loaded and the device node present?)"
    )]
    OpenTun(std::io::Error),
    /// An ioctl failed.
    #[error("{what} on tap {name} failed: {err} (does the tap exist, and may this user open it?)")]
    Ioctl {
        /// Which ioctl.
        what: &'static str,
        /// Tap name.
        name: String,
        /// OS error.
        err: std::io::Error,
    },
}

/// An open, non-blocking tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
}

impl Tap {
    /// Opens (or creates, when privileged) tap `name` with IFF_VNET_HDR and no offloads.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty()
            || name.len() >= libc::IFNAMSIZ
            || name.bytes().any(|b| b == b'/' || b == 0)
        {
            return Err(TapError::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let ioctl_err = |what, err| TapError::Ioctl {
            what,
            name: name.to_string(),
            err,
        };
        set_iff(&file, name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
            .map_err(|e| ioctl_err("TUNSETIFF", e))?;
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer.
        let ret = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                TUNSETVNETHDRSZ as _,
                &hdr_len as *const libc::c_int,
            )
        };
        if ret < 0 {
            return Err(ioctl_err(
                "TUNSETVNETHDRSZ",
                std::io::Error::last_os_error(),
            ));
        }
        // No offloads: the guest is offered none, so the kernel must hand over plain frames.
        // SAFETY: TUNSETOFFLOAD takes its flags by value.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD as _, 0 as libc::c_ulong) };
        if ret < 0 {
            return Err(ioctl_err("TUNSETOFFLOAD", std::io::Error::last_os_error()));
        }
        Ok(Tap { file })
    }

    /// Wraps any non-blocking, message-preserving fd (a datagram socket in tests and fuzzing).
    pub fn from_fd(fd: OwnedFd) -> Tap {
        Tap {
            file: File::from(fd),
        }
    }

    /// Reads one frame (with its vnet header).
    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    /// Writes one frame (with its vnet header).
    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
