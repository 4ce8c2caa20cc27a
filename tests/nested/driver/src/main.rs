//! `mvm-nested`: the inner test driver of mvm's nested harness (`tests/nested/run.sh`).
//!
//! It runs where `/dev/kvm` is a real KVM — inside the QEMU TCG guest ("L1", emulated SVM with
//! Debian's kvm_amd) or directly on a hardware-KVM host — and boots micro-VMs ("L2") with
//! `mvm-vmm` from an assets directory:
//!
//! ```text
//! <assets>/bin/mvm-vmm          the VMM under test
//! <assets>/guest/vmlinux        the project's guest kernel (ELF, PVH entry)
//! <assets>/guest/bzImage        the same kernel as a bzImage
//! <assets>/guest/initrd.cpio    busybox initramfs whose /init acts on `mvmtest=<case>`
//! <assets>/guest/rootfs.ext4    the project's base image (rootfs/build.sh: busybox + mvm-agent)
//! ```
//!
//! Output, one line each, for the harness to collect from the serial console:
//! `nested: RUN <test>`, `nested: PASS <test> (<s> s)`, `nested: FAIL <test>: <why>`,
//! `nested: SKIP <test>: <why>`, `nested: BENCH <what> = <value> [<label>]`, and finally
//! `nested: <N> passed, <M> failed, <K> skipped`.
//! The exit status is 0 only when every selected test passed.

mod cases;
mod tap;
mod vm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, ValueEnum};

/// Where the driver runs, which decides what the figures mean and what the CPUID must show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Inside QEMU TCG with emulated SVM: functional results are real, times are not hardware.
    Nested,
    /// On a host whose /dev/kvm is hardware KVM.
    Direct,
}

impl Mode {
    /// Label printed next to every benchmark figure.
    pub fn bench_label(self) -> &'static str {
        match self {
            Mode::Nested => "nested TCG, not hardware",
            Mode::Direct => "hardware KVM",
        }
    }
}

/// Inner test driver of the nested harness: boots micro-VMs with mvm-vmm and checks them.
#[derive(Parser, Debug)]
#[command(name = "mvm-nested", version)]
pub struct Args {
    /// Directory with bin/mvm-vmm and guest/{vmlinux,bzImage,initrd.cpio,rootfs.ext4}.
    #[arg(long)]
    pub assets: PathBuf,
    /// Where the driver runs.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Run only the tests whose name contains one of these texts (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub filter: Vec<String>,
    /// Leave out these tests, by exact name, comma-separated (those an earlier L1 boot ran).
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
    /// Copy every micro-VM console line to stdout (by default only failures show the console).
    #[arg(long)]
    pub echo_console: bool,
    /// Extra text for every micro-VM kernel command line (e.g. `noxsave`).
    #[arg(long, default_value = "")]
    pub extra_cmdline: String,
    /// Ports of L1's user-mode NIC (10.0.2.15) that QEMU forwards from the same ports of L0's
    /// 127.0.0.1, comma-separated (run.sh passes them in nested mode; `e2b-sdk-vm-tier` listens
    /// on them for the SDK smoke run.sh runs on L0).
    #[arg(long, value_delimiter = ',')]
    pub l0_ports: Vec<u16>,
    /// Scratch directory for VM configs and API sockets.
    #[arg(long, default_value = "/tmp/mvm-nested")]
    pub scratch: PathBuf,
    /// List the tests and exit.
    #[arg(long)]
    pub list: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if args.list {
        for case in cases::CASES {
            println!("{}", case.name);
        }
        return ExitCode::SUCCESS;
    }
    let mut ctx = match cases::Ctx::new(&args) {
        Ok(ctx) => ctx,
        Err(why) => {
            println!("nested: FAIL setup: {why}");
            println!("nested: 0 passed, 1 failed, 0 skipped");
            return ExitCode::FAILURE;
        }
    };
    ctx.print_environment();
    let (mut passed, mut failed, mut skipped) = (0u32, 0u32, 0u32);
    for case in cases::CASES {
        if !(args.filter.is_empty() || args.filter.iter().any(|f| case.name.contains(f.as_str())))
            || args.skip.iter().any(|s| s == case.name)
        {
            continue;
        }
        println!("nested: RUN {}", case.name);
        let start = Instant::now();
        // A case that panics (a helper's `expect`) fails alone; the ones after it still run.
        let outcome =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (case.run)(&mut ctx)))
                .unwrap_or_else(|panic| {
                    let why = panic
                        .downcast_ref::<String>()
                        .map(String::as_str)
                        .or_else(|| panic.downcast_ref::<&str>().copied())
                        .unwrap_or("(no message)");
                    Err(format!("panicked: {why}"))
                });
        match outcome {
            Ok(cases::Verdict::Pass) => {
                passed += 1;
                println!(
                    "nested: PASS {} ({:.1} s)",
                    case.name,
                    start.elapsed().as_secs_f64()
                );
            }
            Ok(cases::Verdict::Skip(why)) => {
                skipped += 1;
                println!("nested: SKIP {}: {why}", case.name);
            }
            Err(why) => {
                failed += 1;
                println!(
                    "nested: FAIL {} ({:.1} s): {why}",
                    case.name,
                    start.elapsed().as_secs_f64()
                );
            }
        }
    }
    ctx.print_benchmarks();
    if passed + failed + skipped == 0 {
        println!(
            "nested: FAIL filter: no test matches {:?} (see --list)",
            args.filter.join(",")
        );
        failed = 1;
    }
    println!("nested: {passed} passed, {failed} failed, {skipped} skipped");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
