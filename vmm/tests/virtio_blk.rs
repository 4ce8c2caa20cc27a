//! virtio-blk through real KVM: the `virtio_blk` test guest is the driver (queue setup, MMIO
//! notifications, polling the used ring) and prints every request's status byte and data.

mod virtio_support;

use std::time::Duration;

use mvm_testkit::{config_for, guest, require_kvm, run_vmm_config, ScratchDir};
use serde_json::json;
use virtio_support::{api_request, disk_image, LiveVmm};

const TIMEOUT: Duration = Duration::from_secs(120);

fn run_blk(drive: serde_json::Value) -> String {
    let mut config = config_for(&guest("virtio_blk"), "console=ttyS0", 1, 32);
    config["drives"] = json!([drive]);
    let run = run_vmm_config(&config, TIMEOUT);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(!run.stderr.contains("panicked"), "{run:#?}");
    run.stdout
}

#[test]
fn guest_reads_writes_and_gets_errors_for_bad_requests() {
    if !require_kvm("guest_reads_writes_and_gets_errors_for_bad_requests") {
        return;
    }
    let dir = ScratchDir::new("blk-rw");
    let image = disk_image(dir.path(), 64);
    let out = run_blk(
        json!({"drive_id": "scratch", "path_on_host": image, "is_root_device": true, "is_read_only": false}),
    );
    assert_eq!(
        out,
        "capacity: 64 features: 00000000\n\
         read0: status=00 len=513 data=MVM test disk, sector 0\n\
         id: status=00 len=21 id=scratch\n\
         write1: status=00 len=1\n\
         read1: status=00 len=513 data=written by the guest\n\
         past-end: status=01 len=1\n\
         across-end: status=01 len=1\n\
         flush: status=02 len=1\n\
         unknown: status=02 len=1\n\
         loop: status=01 len=1\n\
         outside-ram: status=01 len=1\n\
         after: status=00 len=513\n\
         reactivated: status=00 len=513 data=MVM test disk, sector 0\n"
    );
    let bytes = std::fs::read(&image).unwrap();
    assert_eq!(
        &bytes[512..532],
        b"written by the guest",
        "the write reached the image file"
    );
    assert_eq!(bytes.len(), 64 * 512, "nothing was written past the end");
}

#[test]
fn read_only_drive_refuses_writes_and_offers_ro() {
    if !require_kvm("read_only_drive_refuses_writes_and_offers_ro") {
        return;
    }
    let dir = ScratchDir::new("blk-ro");
    let image = disk_image(dir.path(), 16);
    let before = std::fs::read(&image).unwrap();
    let out = run_blk(
        json!({"drive_id": "ro-disk", "path_on_host": image, "is_root_device": false, "is_read_only": true}),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "capacity: 16 features: 00000020",
        "VIRTIO_BLK_F_RO is offered: {out}"
    );
    assert_eq!(lines[3], "write1: status=01 len=1", "{out}");
    assert!(
        lines[4].starts_with("read1: status=00 len=513 data=MVM filler"),
        "{out}"
    );
    assert_eq!(
        std::fs::read(&image).unwrap(),
        before,
        "the image is unchanged"
    );
}

#[test]
fn writeback_drive_offers_and_honours_flush() {
    if !require_kvm("writeback_drive_offers_and_honours_flush") {
        return;
    }
    let dir = ScratchDir::new("blk-wb");
    let image = disk_image(dir.path(), 8);
    let out = run_blk(
        json!({"drive_id": "wb", "path_on_host": image, "is_root_device": false, "cache_type": "Writeback"}),
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0], "capacity: 8 features: 00000200",
        "VIRTIO_BLK_F_FLUSH is offered: {out}"
    );
    assert_eq!(lines[7], "flush: status=00 len=1", "{out}");
}

#[test]
fn guest_reads_the_identity_registers_of_every_window() {
    if !require_kvm("guest_reads_the_identity_registers_of_every_window") {
        return;
    }
    let dir = ScratchDir::new("blk-ids");
    let a = disk_image(dir.path(), 8);
    let b = dir.path().join("b.img");
    std::fs::copy(&a, &b).unwrap();
    let mut config = config_for(&guest("virtio_ids"), "console=ttyS0", 1, 32);
    config["drives"] = json!([
        {"drive_id": "data", "path_on_host": b, "is_root_device": false, "is_read_only": true},
        {"drive_id": "root", "path_on_host": a, "is_root_device": true},
    ]);
    config["vsock"] = json!({"guest_cid": 7, "uds_path": dir.path().join("v.sock")});
    let run = run_vmm_config(&config, TIMEOUT);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(
        run.stdout,
        "window c0001000: magic=74726976 version=2 device=2 vendor=004d564d features=0000000100000000\n\
         window c0002000: magic=74726976 version=2 device=2 vendor=004d564d features=0000000100000020\n\
         window c0003000: magic=74726976 version=2 device=19 vendor=004d564d features=0000000100000000\n\
         end\n"
    );
}

#[test]
fn missing_or_unsupported_drives_are_refused_before_boot() {
    if !require_kvm("missing_or_unsupported_drives_are_refused_before_boot") {
        return;
    }
    let mut config = config_for(&guest("virtio_blk"), "console=ttyS0", 1, 32);
    config["drives"] = json!([{"drive_id": "gone", "path_on_host": "/nonexistent/disk.img", "is_root_device": false}]);
    let run = run_vmm_config(&config, TIMEOUT);
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(
        run.stderr
            .contains("drive gone: cannot open path_on_host /nonexistent/disk.img"),
        "{run:#?}"
    );
    let dir = ScratchDir::new("blk-engine");
    config["drives"] = json!([{"drive_id": "x", "path_on_host": disk_image(dir.path(), 8), "is_root_device": false, "io_engine": "Async"}]);
    let run = run_vmm_config(&config, TIMEOUT);
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(
        run.stderr.contains("io_engine \"Async\" is not available"),
        "{run:#?}"
    );
}

#[test]
fn patch_lifts_a_rate_limit_and_swaps_the_image_of_a_running_drive() {
    if !require_kvm("patch_lifts_a_rate_limit_and_swaps_the_image_of_a_running_drive") {
        return;
    }
    let dir = ScratchDir::new("blk-patch");
    let first = disk_image(dir.path(), 64);
    let second = dir.path().join("second.img");
    std::fs::write(&second, vec![0u8; 64 * 512]).unwrap();
    let api = dir.path().join("api.sock");
    let mut config = config_for(&guest("virtio_blk"), "console=ttyS0", 1, 32);
    // One operation per 100 s: the guest's first read passes, the second waits.
    config["drives"] = json!([{"drive_id": "scratch", "path_on_host": first, "is_root_device": false,
        "rate_limiter": {"ops": {"size": 1, "refill_time": 100000}}}]);
    let mut vmm = LiveVmm::start_with_api(&config, &api);
    vmm.expect_line("read0: status=00", TIMEOUT);
    let (status, body) = api_request(&api, "PATCH", "/drives/nope", &json!({"drive_id": "nope"}));
    assert_eq!(status, 400);
    assert!(body.contains("no drive with drive_id"), "{body}");
    let (status, body) = api_request(
        &api,
        "PATCH",
        "/drives/scratch",
        &json!({"drive_id": "scratch", "path_on_host": second,
        "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}),
    );
    if status != 204 {
        let (code, console, stderr) = vmm.finish(TIMEOUT);
        panic!(
            "PATCH failed: {status} {body}; exit {code:?}, console {console:?}, stderr {stderr}"
        );
    }
    // The waiting GET_ID request completes once the limit is gone.
    assert_eq!(
        vmm.expect_line("id:", TIMEOUT),
        "id: status=00 len=21 id=scratch"
    );
    assert_eq!(
        vmm.expect_line("read1:", TIMEOUT),
        "read1: status=00 len=513 data=written by the guest"
    );
    vmm.expect_line("after: status=00", TIMEOUT);
    // The guest resets the VM after its last line.
    let (code, _, stderr) = vmm.finish(TIMEOUT);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        &std::fs::read(&second).unwrap()[512..532],
        b"written by the guest",
        "writes went to the new image"
    );
    assert!(
        !std::fs::read(&first)
            .unwrap()
            .windows(20)
            .any(|w| w == b"written by the guest"),
        "not to the old one"
    );
}
