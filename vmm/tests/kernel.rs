//! Boots the project's guest kernel (guest-kernel/build.sh) through the real /dev/kvm. On
//! kvm_pvm hosts Linux gets only through early boot (guest ring 0 is emulated and XSAVE/AVX
//! setup stops it), so the test waits for the kernel to print its version and parse the command
//! line; on hardware KVM it waits for the kernel to hand over to init.

use std::path::PathBuf;
use std::time::Duration;

use mvm_testkit::{
    artifacts_dir, config_for, kvm, require_kvm, run_vmm_until, skip_or_fail_in_ci, KvmKind,
};

/// The built kernel image, or None (with a loud SKIP) when it has not been built; in CI a
/// missing kernel is a failure, since .ci/run builds it first.
fn kernel_image(test: &str, name: &str) -> Option<PathBuf> {
    let path = artifacts_dir().join(name);
    if path.exists() {
        return Some(path);
    }
    skip_or_fail_in_ci(
        test,
        &format!("{} not built (run guest-kernel/build.sh)", path.display()),
    );
    None
}

fn boot(test: &str, image: &str) {
    if !require_kvm(test) {
        return;
    }
    let Some(kernel) = kernel_image(test, image) else {
        return;
    };
    let marker = match kvm() {
        Ok(KvmKind::Hardware) => "Freeing unused kernel image",
        _ => "Kernel command line: console=ttyS0 earlycon",
    };
    let args = "console=ttyS0 earlycon=uart8250,io,0x3f8 reboot=k panic=-1 pci=off noxsave";
    let config = config_for(&kernel, args, 2, 256);
    let (found, console) = run_vmm_until(&config, marker, Duration::from_secs(300));
    assert!(
        found,
        "{marker:?} never appeared on the console:\n{console}"
    );
    assert!(console.contains("Linux version 6."), "{console}");
    assert!(console.contains("found SMP MP-table"), "{console}");
}

#[test]
fn guest_kernel_vmlinux_boots_on_kvm() {
    boot("guest_kernel_vmlinux_boots_on_kvm", "vmlinux");
}

#[test]
fn guest_kernel_bzimage_boots_on_kvm() {
    // The bzImage's XZ decompressor runs in guest ring 0, which kvm_pvm emulates far too slowly
    // to finish; the nested harness (tests/nested) boots the bzImage on a real KVM instead.
    if let Ok(KvmKind::Pvm) = kvm() {
        eprintln!("SKIP guest_kernel_bzimage_boots_on_kvm: kvm_pvm emulates the decompressor too slowly; covered by tests/nested");
        return;
    }
    boot("guest_kernel_bzimage_boots_on_kvm", "bzImage");
}
