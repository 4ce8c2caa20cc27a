//! Virtio device benchmark: `cargo run -p vmm --example virtio_bench`.
//!
//! Boots the `virtio_bench` test guest through /dev/kvm once per device and times its phases
//! from the host: virtio-blk sequential 64 KiB reads (MB/s) and random 4 KiB reads (IOPS), both
//! 8 requests in flight; virtio-vsock 64-byte round trips through a host echo server (round
//! trips/s); virtio-net 64-byte TX frames into a tap (packets/s, needs root).
//!
//! On a kvm_pvm host the guest's ring-0 code is emulated, so these figures are ceilings set by
//! the guest side, not by the VMM: they show what the VMM sustains at least, per vCPU.

#[path = "../tests/virtio_support/mod.rs"]
mod virtio_support;

use std::io::{Read, Write};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use mvm_testkit::{config_for, guest, kvm, ScratchDir};
use serde_json::json;
use virtio_support::{LiveVmm, PacketSocket, TestTap};

const TIMEOUT: Duration = Duration::from_secs(600);

/// Seconds between the `<phase> start` and `<phase> done` console lines.
fn phase(vmm: &mut LiveVmm, name: &str) -> f64 {
    let (start, _) = vmm.expect_line_at(&format!("{name} start"), TIMEOUT);
    let (done, _) = vmm.expect_line_at(&format!("{name} done"), TIMEOUT);
    done.duration_since(start).as_secs_f64()
}

fn finish(vmm: LiveVmm) {
    let (code, console, stderr) = vmm.finish(TIMEOUT);
    assert_eq!(
        code,
        Some(0),
        "the bench guest failed: {console:?} {stderr}"
    );
}

fn block() {
    let dir = ScratchDir::new("bench-blk");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    let mut config = config_for(&guest("virtio_bench"), "console=ttyS0", 1, 64);
    config["drives"] =
        json!([{"drive_id": "bench", "path_on_host": image, "is_root_device": false}]);
    let mut vmm = LiveVmm::start(&config);
    let seq = phase(&mut vmm, "seq");
    let iops = phase(&mut vmm, "iops");
    finish(vmm);
    println!(
        "virtio-blk  sequential read, 64 KiB x 2048, QD 8:  {:8.1} MB/s",
        2048.0 * 65536.0 / seq / 1e6
    );
    println!(
        "virtio-blk  random read, 4 KiB x 8192, QD 8:       {:8.0} IOPS",
        8192.0 / iops
    );
}

fn vsock() {
    let dir = ScratchDir::new("bench-vsock");
    let uds = dir.path().join("v.sock");
    let echo = UnixListener::bind(format!("{}_5001", uds.display())).unwrap();
    std::thread::spawn(move || {
        let Ok((mut stream, _)) = echo.accept() else {
            return;
        };
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 || stream.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let mut config = config_for(&guest("virtio_bench"), "console=ttyS0", 1, 64);
    config["vsock"] = json!({"guest_cid": 3, "uds_path": uds});
    let mut vmm = LiveVmm::start(&config);
    let rt = phase(&mut vmm, "rt");
    finish(vmm);
    println!(
        "virtio-vsock round trips, 64 B x 4096:             {:8.0} round trips/s",
        4096.0 / rt
    );
}

fn net() {
    let Some(tap) = TestTap::create("virtio_bench net", "b") else {
        return;
    };
    let packets = PacketSocket::open(&tap.name);
    let counter = std::thread::spawn(move || {
        let mut seen = 0u32;
        while packets
            .recv_ethertype(0x88b5, Duration::from_secs(5))
            .is_some()
        {
            seen += 1;
        }
        seen
    });
    let mut config = config_for(&guest("virtio_bench"), "console=ttyS0", 1, 64);
    config["network-interfaces"] = json!([{"iface_id": "eth0", "host_dev_name": tap.name}]);
    let mut vmm = LiveVmm::start(&config);
    let tx = phase(&mut vmm, "tx");
    finish(vmm);
    let seen = counter.join().unwrap();
    println!("virtio-net  TX, 64 B frames x 16384, 8 in flight:  {:8.0} packets/s ({seen} seen on the tap)", 16384.0 / tx);
}

fn main() {
    match kvm() {
        Ok(kind) => println!("mvm virtio benchmark on /dev/kvm ({kind:?}), 1 vCPU, dev profile"),
        Err(why) => {
            eprintln!("SKIP virtio_bench: {why}");
            return;
        }
    }
    println!("VMM-side ceilings measured with an emulated-ring-0 test guest on kvm_pvm: the guest");
    println!("driver, not the device, is the bottleneck here.");
    block();
    vsock();
    net();
}
