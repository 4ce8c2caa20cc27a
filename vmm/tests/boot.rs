//! Boots the assembly test guests through the real /dev/kvm with `mvm-vmm --config-file`, and
//! feeds it bad configurations. Every test skips loudly where /dev/kvm is unusable.

use std::time::Duration;

use mvm_testkit::{config_for, guest, require_kvm, run_vmm_config, ScratchDir};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn hello_guest_prints_and_reset_exits_zero() {
    if !require_kvm("hello_guest_prints_and_reset_exits_zero") {
        return;
    }
    let run = run_vmm_config(
        &config_for(&guest("hello"), "console=ttyS0", 1, 32),
        TIMEOUT,
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(run.stdout, "Hello from the mvm test guest\n");
}

/// The vCPU stops at the reset pulse: nothing the guest would do after it runs (here a line and
/// a triple fault, which would end the VMM with status 2).
#[test]
fn a_reset_stops_the_guest_at_once() {
    if !require_kvm("a_reset_stops_the_guest_at_once") {
        return;
    }
    for _ in 0..5 {
        let run = run_vmm_config(
            &config_for(&guest("reset_then_more"), "console=ttyS0", 1, 32),
            TIMEOUT,
        );
        assert_eq!(run.code(), 0, "{run:#?}");
        assert_eq!(run.stdout, "before the reset\n");
    }
}

#[test]
fn guest_reads_cmdline_and_memory_map_from_the_zero_page() {
    if !require_kvm("guest_reads_cmdline_and_memory_map_from_the_zero_page") {
        return;
    }
    let args = "console=ttyS0 mvm.test=zero-page answer=42";
    let run = run_vmm_config(&config_for(&guest("bootinfo"), args, 1, 96), TIMEOUT);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(
        run.stdout,
        format!("cmdline: {args}\ne820 entries: 3\nram end MiB: 96\n")
    );
}

#[test]
fn default_boot_args_are_firecrackers_with_a_console() {
    if !require_kvm("default_boot_args_are_firecrackers_with_a_console") {
        return;
    }
    let config = json!({
        "boot-source": {"kernel_image_path": guest("bootinfo")},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
    });
    let run = run_vmm_config(&config, TIMEOUT);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(
        run.stdout
            .starts_with(&format!("cmdline: {}\n", vmm::config::DEFAULT_BOOT_ARGS)),
        "{}",
        run.stdout
    );
}

#[test]
fn pvh_note_selects_the_pvh_entry() {
    if !require_kvm("pvh_note_selects_the_pvh_entry") {
        return;
    }
    let run = run_vmm_config(
        &config_for(&guest("pvh"), "console=ttyS0 via=pvh", 1, 32),
        TIMEOUT,
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(run.stdout, "PVH boot ok, cmdline: console=ttyS0 via=pvh\n");
}

fn smp(vcpus: u8) {
    let run = run_vmm_config(
        &config_for(&guest("smp"), "console=ttyS0", vcpus, 64),
        TIMEOUT,
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    let mut lines: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(
        lines.first().copied(),
        Some(format!("mptable cpus: {vcpus}").as_str()),
        "{}",
        run.stdout
    );
    assert_eq!(
        lines.last().copied(),
        Some(format!("all {vcpus} up").as_str()),
        "{}",
        run.stdout
    );
    let mut reported: Vec<String> = lines.drain(1..lines.len() - 1).map(String::from).collect();
    reported.sort_by_key(|l| {
        l.split_whitespace()
            .nth(1)
            .and_then(|n| n.parse::<u32>().ok())
    });
    let expected: Vec<String> = (0..vcpus).map(|id| format!("vCPU {id} up")).collect();
    assert_eq!(reported, expected);
}

#[test]
fn every_vcpu_of_a_four_way_guest_reports_in() {
    if require_kvm("every_vcpu_of_a_four_way_guest_reports_in") {
        smp(4);
    }
}

#[test]
fn thirty_two_vcpus_boot_and_report_in() {
    if require_kvm("thirty_two_vcpus_boot_and_report_in") {
        smp(32);
    }
}

#[test]
fn a_failing_guest_ends_the_vmm_with_a_clear_error() {
    if !require_kvm("a_failing_guest_ends_the_vmm_with_a_clear_error") {
        return;
    }
    let run = run_vmm_config(
        &config_for(&guest("fault"), "console=ttyS0", 1, 32),
        TIMEOUT,
    );
    assert_ne!(run.code(), 0, "{run:#?}");
    assert!(
        run.stderr.contains("vCPU 0 failed") || run.stderr.contains("triple-faulted"),
        "{run:#?}"
    );
}

/// Runs a configuration that must be refused before any guest code runs.
fn refused(config: serde_json::Value, expected: &str) {
    let run = run_vmm_config(&config, TIMEOUT);
    assert_eq!(run.code(), 1, "{run:#?}");
    assert!(
        run.stderr.contains(expected),
        "expected {expected:?} in {run:#?}"
    );
    assert!(!run.stderr.contains("panicked"), "{run:#?}");
}

#[test]
fn bad_kernels_are_refused_with_the_path_and_the_reason() {
    if !require_kvm("bad_kernels_are_refused_with_the_path_and_the_reason") {
        return;
    }
    let dir = ScratchDir::new("bad-kernels");
    refused(
        config_for(std::path::Path::new("/nonexistent/vmlinux"), "", 1, 32),
        "cannot open kernel /nonexistent/vmlinux",
    );
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "just some text, not a kernel\n".repeat(100)).unwrap();
    refused(
        config_for(&text, "", 1, 32),
        "is neither an ELF vmlinux nor a bzImage",
    );
    let mut corrupt = std::fs::read(guest("hello")).unwrap();
    corrupt.truncate(40); // ELF magic, but the program headers are gone
    let corrupt_path = dir.path().join("corrupt.elf");
    std::fs::write(&corrupt_path, &corrupt).unwrap();
    refused(config_for(&corrupt_path, "", 1, 32), "is corrupt");
    let empty = dir.path().join("empty");
    std::fs::write(&empty, b"").unwrap();
    refused(
        config_for(&empty, "", 1, 32),
        "neither an ELF vmlinux nor a bzImage",
    );
}

#[test]
fn bad_machine_configs_are_refused_naming_the_field() {
    if !require_kvm("bad_machine_configs_are_refused_naming_the_field") {
        return;
    }
    let hello = guest("hello");
    refused(config_for(&hello, "", 0, 32), "machine-config.vcpu_count");
    refused(config_for(&hello, "", 33, 32), "use 1 to 32");
    refused(config_for(&hello, "", 1, 0), "machine-config.mem_size_mib");
    refused(config_for(&hello, "", 1, 1 << 30), "larger than this host");
    let machine = |vcpus: serde_json::Value, mem: serde_json::Value| json!({"boot-source": {"kernel_image_path": hello}, "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem}});
    refused(
        machine(json!(300), json!(32)),
        "invalid `machine-config.vcpu_count`: 300 is out of range: use 1 to 32",
    );
    refused(
        machine(json!(-1), json!(32)),
        "invalid `machine-config.vcpu_count`: -1 is out of range",
    );
    refused(
        machine(json!("2"), json!(32)),
        "invalid `machine-config.vcpu_count`: invalid type: string \"2\"",
    );
    refused(
        machine(json!(1), json!(-64)),
        "invalid `machine-config.mem_size_mib`: -64 is negative",
    );
    refused(
        machine(json!(1), json!("64")),
        "invalid `machine-config.mem_size_mib`: invalid type: string \"64\"",
    );
    refused(
        json!({"boot-source": {"kernel_image_path": hello}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 32, "cpu_template": "T2"}}),
        "machine-config.cpu_template",
    );
    refused(
        json!({"boot-source": {"kernel_image_path": hello}, "bogus": 1}),
        "unknown field `bogus`",
    );
    refused(
        json!({"machine-config": {"vcpu_count": 1, "mem_size_mib": 32}}),
        "`boot-source` must be configured",
    );
}

#[test]
fn memory_above_the_mmio_gap_is_usable() {
    if !require_kvm("memory_above_the_mmio_gap_is_usable") {
        return;
    }
    // 3.5 GiB: 3 GiB below the gap, 512 MiB above 4 GiB; the guest sees the e820 end at 4.5 GiB.
    let run = run_vmm_config(
        &config_for(&guest("bootinfo"), "console=ttyS0", 1, 3584),
        TIMEOUT,
    );
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(
        run.stdout.contains("e820 entries: 4\nram end MiB: 4608\n"),
        "{}",
        run.stdout
    );
}
