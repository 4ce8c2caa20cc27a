//! A page server for the VMM's `Uffd` snapshot backend, speaking Firecracker's protocol: it
//! listens on a unix socket, takes one VMM's message (the JSON array of
//! `GuestRegionUffdMapping`s with the userfaultfd as `SCM_RIGHTS`), then fills each faulting
//! page from the snapshot's memory file with `UFFDIO_COPY`, counting the faults, until the
//! VMM exits. The VMM closes the socket once it has sent its message (as Firecracker does),
//! so the server watches the VMM's process, found with `SO_PEERCRED`, as Firecracker's
//! documentation suggests.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde_json::Value;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const PAGE: u64 = 4096;

/// One region of the VMM's guest memory, from its message.
#[derive(Debug, Clone, Copy)]
struct Region {
    base: u64,
    size: u64,
    offset: u64,
}

impl Region {
    fn from_json(entry: &Value) -> Result<Self, String> {
        let field = |name: &str| {
            entry[name]
                .as_u64()
                .ok_or_else(|| format!("mapping without a numeric {name}: {entry}"))
        };
        if field("page_size")? != PAGE {
            return Err(format!("unexpected page size: {entry}"));
        }
        Ok(Region {
            base: field("base_host_virt_addr")?,
            size: field("size")?,
            offset: field("offset")?,
        })
    }
}

/// What the server saw, readable while it runs.
#[derive(Default)]
struct Seen {
    faults: AtomicU64,
    mappings: Mutex<Option<Value>>,
}

/// A page server thread serving one VMM.
pub struct PageServer {
    seen: Arc<Seen>,
    thread: JoinHandle<Result<(), String>>,
}

impl PageServer {
    /// Binds `socket` (so a load may name it once this returns) and serves the first VMM
    /// that connects from `mem_file` on a thread.
    pub fn start(socket: &Path, mem_file: &Path) -> Self {
        let listener = UnixListener::bind(socket).expect("bind the page server's socket");
        let file = File::open(mem_file).expect("open the memory file");
        let seen = Arc::new(Seen::default());
        let shared = seen.clone();
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().map_err(|e| format!("accept: {e}"))?;
            serve(&stream, &file, &shared)
        });
        PageServer { seen, thread }
    }

    /// The page faults served so far.
    pub fn faults(&self) -> u64 {
        self.seen.faults.load(Ordering::Relaxed)
    }

    /// The mappings the VMM sent, once it has.
    pub fn mappings(&self) -> Option<Value> {
        self.seen.mappings.lock().unwrap().clone()
    }

    /// Waits until the VMM exits; the faults served, or why serving failed.
    pub fn join(self) -> Result<u64, String> {
        let PageServer { seen, thread } = self;
        thread.join().expect("the page server panicked")?;
        Ok(seen.faults.load(Ordering::Relaxed))
    }
}

/// The file mapped read-only, unmapped on drop.
struct Mapped {
    ptr: *const u8,
    len: usize,
}

impl Mapped {
    fn new(file: &File) -> Result<Self, String> {
        let len = file.metadata().map_err(|e| e.to_string())?.len() as usize;
        // SAFETY: a new private read-only mapping of the whole file; unmapped on drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        Ok(Mapped {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, no longer used.
        unsafe { libc::munmap(self.ptr as *mut _, self.len) };
    }
}

/// A pidfd of the process at the other end of `stream`: readable once it has exited.
fn peer_process(stream: &UnixStream) -> Result<OwnedFd, String> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for SO_PEERCRED's answer.
    let ret = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if ret < 0 {
        return Err(format!("SO_PEERCRED: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, cred.pid, 0) };
    if fd < 0 {
        return Err(format!("pidfd_open: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Receives the VMM's message on `stream`, then serves faults until the VMM exits.
fn serve(stream: &UnixStream, file: &File, seen: &Seen) -> Result<(), String> {
    let mut buf = vec![0u8; 64 << 10];
    let (n, uffd) = stream
        .recv_with_fd(&mut buf)
        .map_err(|e| format!("recvmsg: {e}"))?;
    let uffd: OwnedFd = uffd.ok_or("no userfaultfd in the VMM's message")?.into();
    let mappings: Value = serde_json::from_slice(&buf[..n]).map_err(|e| e.to_string())?;
    *seen.mappings.lock().unwrap() = Some(mappings.clone());
    let regions = mappings
        .as_array()
        .ok_or("the mappings are not a JSON array")?
        .iter()
        .map(Region::from_json)
        .collect::<Result<Vec<_>, _>>()?;
    let vmm = peer_process(stream)?;
    let memory = Mapped::new(file)?;
    if regions.iter().map(|r| r.size).sum::<u64>() != memory.len as u64 {
        return Err(format!(
            "{regions:?} do not cover the {} byte file",
            memory.len
        ));
    }
    loop {
        let mut fds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: vmm.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            return Err(format!("poll: {}", std::io::Error::last_os_error()));
        }
        if fds[1].revents != 0 || fds[0].revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            return Ok(());
        }
        while let Some(fault) = mvm_sys::uffd::read_fault(&uffd).map_err(|e| e.to_string())? {
            let page = fault.address & !(PAGE - 1);
            let region = regions
                .iter()
                .find(|r| (r.base..r.base + r.size).contains(&page))
                .ok_or_else(|| format!("fault at {page:#x} outside guest memory"))?;
            let at = (region.offset + page - region.base) as usize;
            // SAFETY: `at + PAGE` lies within the mapping: the regions cover the file.
            let src = unsafe { memory.ptr.add(at) };
            match mvm_sys::uffd::copy(&uffd, page, src, PAGE) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("UFFDIO_COPY at {page:#x}: {e}")),
            }
            seen.faults.fetch_add(1, Ordering::Relaxed);
        }
    }
}
