//! virtio-net through real KVM and a real tap: the `virtio_net` test guest sends a frame on TX
//! that the test reads from the tap's interface, and receives a frame the test injects, into
//! small (2 KiB) RX buffers that Firecracker would not fill. Needs root; skips loudly otherwise.

mod virtio_support;

use std::time::Duration;

use mvm_testkit::{config_for, guest, require_kvm};
use serde_json::json;
use virtio_support::{LiveVmm, PacketSocket, TestTap};

const TIMEOUT: Duration = Duration::from_secs(60);
const ETHERTYPE: u16 = 0x88b5;

#[test]
fn frames_cross_the_tap_in_both_directions() {
    let test = "frames_cross_the_tap_in_both_directions";
    if !require_kvm(test) {
        return;
    }
    let Some(tap) = TestTap::create(test, "n") else {
        return;
    };
    let packets = PacketSocket::open(&tap.name);
    let mut config = config_for(&guest("virtio_net"), "console=ttyS0", 1, 32);
    config["network-interfaces"] =
        json!([{"iface_id": "eth0", "host_dev_name": tap.name, "guest_mac": "06:00:AC:10:00:02"}]);
    let mut vmm = LiveVmm::start(&config);
    assert_eq!(
        vmm.expect_line("mac:", TIMEOUT),
        "mac::06:00:ac:10:00:02 link=1"
    );
    vmm.expect_line("tx done", TIMEOUT);
    let frame = packets
        .recv_ethertype(ETHERTYPE, TIMEOUT)
        .expect("the guest's frame reaches the tap");
    assert_eq!(&frame[0..6], &[0xff; 6]);
    assert_eq!(
        &frame[6..12],
        &[6, 0, 0xac, 0x10, 0, 2],
        "source is the configured MAC"
    );
    assert_eq!(&frame[14..], b"hello from the guest");

    vmm.expect_line("rx ready", TIMEOUT);
    let mut reply = vec![6, 0, 0xac, 0x10, 0, 2, 2, 0, 0, 0, 0, 1];
    reply.extend_from_slice(&ETHERTYPE.to_be_bytes());
    reply.extend_from_slice(b"hello from the host");
    packets.send(&reply);
    let line = vmm.expect_line("rx:", TIMEOUT);
    assert_eq!(
        line,
        format!(
            "rx: len={} num_buffers=1 payload=hello from the host",
            12 + reply.len()
        )
    );
    let (code, _, stderr) = vmm.finish(TIMEOUT);
    assert_eq!(code, Some(0), "{stderr}");
}

#[test]
fn a_missing_tap_or_bad_mac_is_refused_before_boot() {
    if !require_kvm("a_missing_tap_or_bad_mac_is_refused_before_boot") {
        return;
    }
    let mut config = config_for(&guest("virtio_net"), "console=ttyS0", 1, 32);
    config["network-interfaces"] =
        json!([{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00"}]);
    let run = mvm_testkit::run_vmm_config(&config, TIMEOUT);
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(
        run.stderr
            .contains("guest_mac \"06:00:AC:10:00\" is not a MAC address"),
        "{run:#?}"
    );
    config["network-interfaces"] =
        json!([{"iface_id": "eth0", "host_dev_name": "much-too-long-tap-name"}]);
    let run = mvm_testkit::run_vmm_config(&config, TIMEOUT);
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(
        run.stderr
            .contains("tap name \"much-too-long-tap-name\" is invalid"),
        "{run:#?}"
    );
}
