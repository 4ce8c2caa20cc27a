//! userfaultfd(2): the kernel ABI (x86_64) that the VMM's `Uffd` snapshot backend and page
//! servers share — creating a userfaultfd, the API handshake, registering ranges for missing
//! page faults, reading fault messages and resolving them with `UFFDIO_COPY`.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

/// `UFFD_API`: the only API version.
const UFFD_API: u64 = 0xaa;
/// `UFFDIO_REGISTER_MODE_MISSING`: report faults on pages not yet populated.
const REGISTER_MODE_MISSING: u64 = 1;
/// `UFFD_EVENT_PAGEFAULT`.
const EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
const PAGEFAULT_FLAG_WRITE: u64 = 1;
/// The `/dev/userfaultfd` device (Linux 6.1+), whose file permissions stand in for
/// `vm.unprivileged_userfaultfd`.
const DEVICE: &str = "/dev/userfaultfd";

/// `_IOWR(0xAA, nr, size)`.
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xaa << 8) | nr
}

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffd_msg` with the page-fault member of its union.
#[repr(C)]
#[derive(Default)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u64,
}

const UFFDIO_API: u64 = iowr(0x3f, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = iowr(0x00, std::mem::size_of::<UffdioRegister>());
const UFFDIO_COPY: u64 = iowr(0x03, std::mem::size_of::<UffdioCopy>());
/// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0x00)` on `/dev/userfaultfd`.
const USERFAULTFD_IOC_NEW: u64 = 0xaa00;

/// A page fault read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The faulting address (not page-aligned).
    pub address: u64,
    /// Whether the access was a write.
    pub write: bool,
}

fn ioctl<T>(fd: &impl AsRawFd, request: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is the `#[repr(C)]` struct the kernel expects for `request`, valid and
    // writable for the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg as *mut T) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Creates a close-on-exec, non-blocking userfaultfd that also handles faults taken in the
/// kernel on the process's behalf (KVM's, when a vCPU touches guest memory: a
/// `UFFD_USER_MODE_ONLY` one would fail those). userfaultfd(2) allows that to callers with
/// CAP_SYS_PTRACE or when `vm.unprivileged_userfaultfd` is 1; otherwise `/dev/userfaultfd`
/// is tried, which anyone with read-write access to it may use. Then does the API handshake.
pub fn create() -> io::Result<OwnedFd> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes only flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    let fd = if fd >= 0 {
        // SAFETY: the syscall returned a new descriptor that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd as i32) }
    } else {
        let syscall_error = io::Error::last_os_error();
        if syscall_error.raw_os_error() != Some(libc::EPERM) {
            return Err(syscall_error);
        }
        let device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(DEVICE)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!(
                        "userfaultfd(2): {syscall_error} (vm.unprivileged_userfaultfd is 0 \
                         and the process lacks CAP_SYS_PTRACE), and {DEVICE}: {e}"
                    ),
                )
            })?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new descriptor.
        let fd = unsafe { libc::ioctl(device.as_raw_fd(), USERFAULTFD_IOC_NEW as _, flags) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the ioctl returned a new descriptor that nothing else owns.
        unsafe { OwnedFd::from_raw_fd(fd) }
    };
    let mut api = UffdioApi {
        api: UFFD_API,
        ..Default::default()
    };
    ioctl(&fd, UFFDIO_API, &mut api)?;
    Ok(fd)
}

/// Registers `len` bytes at `start` (page-aligned, mapped anonymous private) with `uffd`:
/// from now on a first touch of any of its pages waits for [`copy`].
pub fn register_missing(uffd: &OwnedFd, start: u64, len: u64) -> io::Result<()> {
    let mut register = UffdioRegister {
        range: UffdioRange { start, len },
        mode: REGISTER_MODE_MISSING,
        ioctls: 0,
    };
    ioctl(uffd, UFFDIO_REGISTER, &mut register)
}

/// Reads the next page fault of `uffd`: `None` when none is pending (the descriptor is
/// non-blocking). Other events (none are requested) are an error.
pub fn read_fault(uffd: &OwnedFd) -> io::Result<Option<Fault>> {
    let mut msg = UffdMsg::default();
    let size = std::mem::size_of::<UffdMsg>();
    // SAFETY: `msg` is a plain struct of `size` writable bytes.
    let n = unsafe { libc::read(uffd.as_raw_fd(), (&mut msg as *mut UffdMsg).cast(), size) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.kind() {
            io::ErrorKind::WouldBlock => Ok(None),
            _ => Err(e),
        };
    }
    if n as usize != size || msg.event != EVENT_PAGEFAULT {
        return Err(io::Error::other(format!(
            "unexpected userfaultfd message: {n} bytes, event {:#x}",
            msg.event
        )));
    }
    Ok(Some(Fault {
        address: msg.address,
        write: msg.flags & PAGEFAULT_FLAG_WRITE != 0,
    }))
}

/// Resolves a fault: copies `len` bytes from `src` (in this process) to `dst` (page-aligned,
/// in the process that registered the range) and wakes the waiting thread. `EEXIST` (another
/// fault already populated the page) is an error of kind `AlreadyExists` for the caller to
/// ignore.
pub fn copy(uffd: &OwnedFd, dst: u64, src: *const u8, len: u64) -> io::Result<()> {
    let mut copy = UffdioCopy {
        dst,
        src: src as u64,
        len,
        mode: 0,
        copy: 0,
    };
    ioctl(uffd, UFFDIO_COPY, &mut copy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
    }

    /// A thread reads a registered anonymous page; this thread serves the fault with a page
    /// of its own, and the reader sees that page's bytes.
    #[test]
    fn a_fault_on_a_registered_page_is_served_by_copy() {
        let uffd = match create() {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                eprintln!("SKIP: no userfaultfd for this user: {e}");
                return;
            }
            Err(e) => panic!("userfaultfd: {e}"),
        };
        const PAGE: usize = 4096;
        // SAFETY: a fresh anonymous private mapping of two pages, unmapped below.
        let area = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(area, libc::MAP_FAILED);
        let start = area as u64;
        register_missing(&uffd, start, 2 * PAGE as u64).unwrap();
        let reader = std::thread::spawn(move || {
            // SAFETY: the mapping stays until this thread is joined.
            unsafe { std::ptr::read_volatile((start + PAGE as u64 + 8) as *const u64) }
        });
        let fault = loop {
            if let Some(fault) = read_fault(&uffd).unwrap() {
                break fault;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        };
        assert_eq!(fault.address & !(PAGE as u64 - 1), start + PAGE as u64);
        assert!(!fault.write);
        let page: Vec<u8> = (0..PAGE).map(|i| (i % 251) as u8).collect();
        copy(&uffd, start + PAGE as u64, page.as_ptr(), PAGE as u64).unwrap();
        let word = reader.join().unwrap();
        assert_eq!(word, u64::from_ne_bytes(page[8..16].try_into().unwrap()));
        let again = copy(&uffd, start + PAGE as u64, page.as_ptr(), PAGE as u64).unwrap_err();
        assert_eq!(again.kind(), io::ErrorKind::AlreadyExists);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(area, 2 * PAGE) };
    }
}
