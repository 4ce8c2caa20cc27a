//! virtio-blk request parsing and execution on guest-controlled rings and buffers.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::block::{BlockEngine, Disk};
use vmm::rate_limiter::RateLimiter;

fuzz_target!(|data: &[u8]| {
    let Some((mem, mut queue)) = common::setup(data) else {
        return;
    };
    let disk = Disk::from_file(memfd(64 * 512)).expect("memfd disk");
    let read_only = data.len() % 2 == 0;
    let limiter = RateLimiter::new(None).expect("timerfd");
    let mut engine = BlockEngine::new(disk, "fuzz", read_only, data.len() % 3 == 0, limiter);
    // Twice: the second pass sees what the first left in the rings.
    engine.process_queue(&mem, &mut queue);
    engine.process_queue(&mem, &mut queue);
});

/// A memfd-backed file of `len` bytes.
pub fn memfd(len: u64) -> std::fs::File {
    let name = std::ffi::CString::new("fuzz").expect("no NUL");
    // SAFETY: memfd_create with a valid C string; the result is checked and then owned.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    file.set_len(len).expect("size the memfd");
    file
}
