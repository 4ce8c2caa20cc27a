//! virtio-vsock packet parsing and the muxer's state machine on guest-controlled rings.
#![no_main]

mod common;

use std::os::unix::net::UnixListener;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vmm::devices::virtio::vsock::VsockEngine;
use vmm::devices::virtio::worker::EpollSet;

/// A private directory for the host sockets, made once per process.
fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mvm-fuzz-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        // A listener for guest connections to port 1024, so REQUESTs can succeed.
        let listener = UnixListener::bind(dir.join("v.sock_1024")).expect("port listener");
        listener.set_nonblocking(true).expect("nonblocking");
        std::mem::forget(listener);
        dir
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((mem, mut queue)) = common::setup(data) else {
        return;
    };
    let path = dir().join("v.sock");
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let epoll = EpollSet::new().expect("epoll");
    let mut engine = VsockEngine::new(3, path.to_string_lossy().into_owned(), listener)
        .expect("create the vsock engine");
    // The same ring as TX then as RX: every chain shape meets both parsers.
    engine.process_tx(&mem, &mut queue, &epoll);
    let Some((mem, mut queue)) = common::setup(data) else {
        return;
    };
    engine.process_rx(&mem, &mut queue, &epoll);
    engine.process_tx(&mem, &mut queue, &epoll);
});
