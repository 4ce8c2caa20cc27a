//! virtio-vsock through real KVM: the `virtio_vsock` test guest opens a connection to a host
//! unix socket (`<uds_path>_5000`), accepts one the test opens through `uds_path` with
//! `CONNECT 6000`, and checks RST for a port nobody listens on and for an unknown connection.

mod virtio_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use mvm_testkit::{config_for, guest, require_kvm, ScratchDir};
use serde_json::json;
use virtio_support::LiveVmm;

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn streams_flow_both_ways_through_the_unix_socket() {
    if !require_kvm("streams_flow_both_ways_through_the_unix_socket") {
        return;
    }
    let dir = ScratchDir::new("vsock");
    let uds = dir.path().join("v.sock");
    let g2h = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let host_side = std::thread::spawn(move || {
        let (mut stream, _) = g2h.accept().unwrap();
        stream.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut ping = [0u8; 16];
        stream.read_exact(&mut ping).unwrap();
        assert_eq!(&ping, b"ping from guest\n");
        stream.write_all(b"pong from host\n").unwrap();
        // The guest's SHUTDOWN ends the stream.
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).unwrap();
        rest
    });

    let mut config = config_for(&guest("virtio_vsock"), "console=ttyS0", 1, 32);
    config["vsock"] = json!({"guest_cid": 3, "uds_path": uds});
    let mut vmm = LiveVmm::start(&config);
    vmm.expect_line("h2g: listening", TIMEOUT);
    let mut h2g = UnixStream::connect(&uds).unwrap();
    h2g.set_read_timeout(Some(TIMEOUT)).unwrap();
    h2g.write_all(b"CONNECT 6000\n").unwrap();
    let mut reader = BufReader::new(h2g.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    let port: u32 = ok
        .strip_prefix("OK ")
        .and_then(|p| p.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("{ok:?}"));
    assert!(
        port >= 1 << 30,
        "host ports are handed out from 2^30: {port}"
    );
    h2g.write_all(b"hello guest\n").unwrap();
    let mut echo = [0u8; 12];
    reader.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"hello guest\n");
    vmm.expect_line("done", TIMEOUT);
    let (code, console, stderr) = vmm.finish(TIMEOUT);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        console,
        [
            "cid: 3",
            "g2h: connected",
            "g2h: got pong from host",
            "h2g: listening",
            "h2g: request for port 6000",
            "h2g: got hello guest",
            "refused: rst from port 7777",
            "unknown: rst from port 8888",
            "g2h: closed",
            "done",
        ]
    );
    assert!(
        host_side.join().unwrap().is_empty(),
        "nothing after the pong"
    );
}

#[test]
fn bad_vsock_configs_are_refused_before_boot() {
    if !require_kvm("bad_vsock_configs_are_refused_before_boot") {
        return;
    }
    let dir = ScratchDir::new("vsock-bad");
    let mut config = config_for(&guest("virtio_vsock"), "console=ttyS0", 1, 32);
    config["vsock"] = json!({"guest_cid": 2, "uds_path": dir.path().join("v.sock")});
    let run = mvm_testkit::run_vmm_config(&config, TIMEOUT);
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(
        run.stderr
            .contains("invalid `vsock.guest_cid`: 2 is reserved"),
        "{run:#?}"
    );
    let file = dir.path().join("plain-file");
    std::fs::write(&file, "x").unwrap();
    config["vsock"] = json!({"guest_cid": 3, "uds_path": file});
    let run = mvm_testkit::run_vmm_config(&config, TIMEOUT);
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(
        run.stderr.contains("exists and is not a socket"),
        "{run:#?}"
    );
    let busy = dir.path().join("busy.sock");
    let _listener = UnixListener::bind(&busy).unwrap();
    config["vsock"] = json!({"guest_cid": 3, "uds_path": busy});
    let run = mvm_testkit::run_vmm_config(&config, TIMEOUT);
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(
        run.stderr.contains("is in use by another process"),
        "{run:#?}"
    );
}
