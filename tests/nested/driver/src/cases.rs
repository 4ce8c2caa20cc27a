//! The inner test cases. Each boots its own micro-VM and returns why it failed; the micro-VM's
//! console and the VMM's stderr are printed with the failure.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;

mod cgroup_v2;
mod containerd;
mod dns_egress;
mod e2b;
mod images;
mod ports;
mod save_resume;
mod snapshot_bench;
mod snapshots;

use crate::tap::Tap;
use crate::vm::{MicroVm, Stopped};
use crate::{Args, Mode};

/// Upper bound for any micro-VM to reach userspace (nested exits make L2 slow; CI cores are busy).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Upper bound from a guest's last words (reboot, panic) to the VMM's exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a guest that does nothing is watched before the driver gives up on it.
const IDLE_WATCH: Duration = Duration::from_secs(3);
/// Console lines shown with a failure.
const DIAG_LINES: usize = 40;

/// First line the guest's /init prints: the micro-VM reached userspace.
const USERSPACE_MARKER: &str = "mvm-guest: userspace";

/// How a test that did not fail ended.
pub enum Verdict {
    /// Everything it checks held.
    Pass,
    /// It could not run here; the reason is printed loudly.
    Skip(String),
}

/// A test's outcome; Err carries the one-line reason it failed.
pub type Outcome = Result<Verdict, String>;

/// A named test.
pub struct Case {
    /// Name printed in the result line.
    pub name: &'static str,
    /// The test.
    pub run: fn(&mut Ctx) -> Outcome,
}

/// Every test, in the order they run. The first one boots the first micro-VM of this L1, so
/// its timing is the one comparable across runs (later boots in one L1 are ~1 s slower).
pub const CASES: &[Case] = &[
    Case {
        name: "boot-vmlinux-initrd-uname",
        run: boot_vmlinux_initrd_uname,
    },
    Case {
        name: "boot-bzimage",
        run: boot_bzimage,
    },
    Case {
        name: "smp-2-vcpus",
        run: smp_two_vcpus,
    },
    Case {
        name: "guest-panic-exits",
        run: guest_panic_exits,
    },
    Case {
        name: "guest-console-flood-capped",
        run: guest_console_flood_capped,
    },
    Case {
        name: "mvmd-console-flood-capped",
        run: mvmd_console_flood_capped,
    },
    Case {
        name: "idle-guest-killed-at-timeout",
        run: idle_guest_killed_at_timeout,
    },
    Case {
        name: "virtio-blk-rootfs-ro-and-scratch-rw",
        run: virtio_blk_rootfs_and_scratch,
    },
    Case {
        name: "virtio-net-tap-ping-both-ways",
        run: virtio_net_tap_ping,
    },
    Case {
        name: "jailed-vmm-seccomp-unprivileged",
        run: jailed_vmm_seccomp,
    },
    Case {
        name: "agent-over-vsock-rootfs",
        run: agent_over_vsock,
    },
    Case {
        name: "mvm-run-vm-daemonless",
        run: mvm_run_daemonless,
    },
    Case {
        name: "mvmd-vm-create-exec-delete-20-cycles",
        run: mvmd_cycles,
    },
    Case {
        name: "files-in-and-out-byte-exact",
        run: files_in_and_out,
    },
    Case {
        name: "writable-layer-isolation",
        run: writable_layer_isolation,
    },
    Case {
        name: "egress-none-vs-allow",
        run: egress_none_vs_allow,
    },
    Case {
        name: "egress-allow-by-dns-name-vm-tier",
        run: dns_egress::egress_allow_by_name_vm_tier,
    },
    Case {
        name: "secrets-vm-tier",
        run: dns_egress::secrets_vm_tier,
    },
    Case {
        name: "published-port-vm-tier",
        run: ports::published_port_vm_tier,
    },
    Case {
        name: "guest-without-agent-fails-cleanly",
        run: guest_without_agent,
    },
    Case {
        name: "cgroup-v2-limits-freeze-teardown",
        run: cgroup_v2::cgroup_v2_limits,
    },
    Case {
        name: "vm-freed-guest-memory-goes-back",
        run: freed_guest_memory_goes_back,
    },
    Case {
        name: "snapshot-warm-template-8-unique",
        run: snapshots::warm_template_restore,
    },
    Case {
        name: "snapshot-warm-pool",
        run: snapshots::warm_pool_take,
    },
    Case {
        name: "snapshot-fork-live-3-children",
        run: snapshots::fork_live_sandbox,
    },
    Case {
        name: "snapshot-save-resume",
        run: save_resume::save_and_resume,
    },
    Case {
        name: "snapshot-bench-16-concurrent",
        run: snapshot_bench::snapshot_bench,
    },
    Case {
        name: "image-from-oci-archive-vm-tier",
        run: images::image_in_the_vm_tier,
    },
    Case {
        name: "e2b-sdk-vm-tier",
        run: e2b::e2b_sdk_vm_tier,
    },
    // Last: it loads the tc modules for its pod network (see run.sh's on-demand modules).
    Case {
        name: "containerd-shim-vm-tier",
        run: containerd::shim_vm_tier,
    },
    // After it: the tc modules are loaded (it loads them too when run alone).
    Case {
        name: "containerd-cri-pod-vm-tier",
        run: containerd::cri_vm_tier,
    },
];

/// Paths and settings shared by the tests, plus the benchmark figures they collect.
pub struct Ctx {
    mode: Mode,
    vmm: PathBuf,
    jailer: PathBuf,
    mvm: PathBuf,
    mvmd: PathBuf,
    vmlinux: PathBuf,
    bzimage: PathBuf,
    initrd: PathBuf,
    rootfs: PathBuf,
    release: String,
    scratch: PathBuf,
    echo: bool,
    extra_cmdline: String,
    l0_ports: Vec<u16>,
    bench: Vec<(String, String)>,
}

impl Ctx {
    /// Checks the assets directory and reads the guest kernel's release from its vmlinux.
    pub fn new(args: &Args) -> Result<Self, String> {
        let need = |rel: &str| {
            let path = args.assets.join(rel);
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "{} is missing: tests/nested/run.sh builds the assets directory",
                    path.display()
                ))
            }
        };
        let vmlinux = need("guest/vmlinux")?;
        let release = kernel_release(&vmlinux)?;
        std::fs::create_dir_all(&args.scratch)
            .map_err(|e| format!("cannot create scratch dir {}: {e}", args.scratch.display()))?;
        Ok(Ctx {
            mode: args.mode,
            vmm: need("bin/mvm-vmm")?,
            jailer: need("bin/mvm-jailer")?,
            mvm: need("bin/mvm")?,
            mvmd: need("bin/mvmd")?,
            vmlinux,
            bzimage: need("guest/bzImage")?,
            initrd: need("guest/initrd.cpio")?,
            rootfs: need("guest/rootfs.ext4")?,
            release,
            scratch: args.scratch.clone(),
            echo: args.echo_console,
            extra_cmdline: args.extra_cmdline.clone(),
            l0_ports: args.l0_ports.clone(),
            bench: Vec::new(),
        })
    }

    /// Prints what the results depend on: kernels, KVM module, hypervisor CPUID leaf.
    pub fn print_environment(&self) {
        let host_release =
            std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        println!(
            "nested: INFO mode {:?}; this host's kernel {}",
            self.mode,
            host_release.trim()
        );
        println!(
            "nested: INFO guest kernel {} (release {})",
            self.vmlinux.display(),
            self.release
        );
        let (max_leaf, vendor) = hypervisor_cpuid();
        println!(
            "nested: INFO CPUID 0x40000000: vendor {vendor:?}, max leaf {max_leaf:#x}; mvm-vmm hides XSAVE from \
             its guests when the vendor is \"TCGTCGTCGTCG\""
        );
        for module in ["kvm_amd", "kvm_intel"] {
            let params = Path::new("/sys/module").join(module).join("parameters");
            if params.is_dir() {
                let read = |p: &str| {
                    std::fs::read_to_string(params.join(p))
                        .map(|s| s.trim().to_string())
                        .unwrap_or_else(|_| "?".into())
                };
                println!(
                    "nested: INFO {module} loaded: nested={} npt={}",
                    read("nested"),
                    read("npt")
                );
            }
        }
    }

    /// Prints the figures the tests collected.
    pub fn print_benchmarks(&self) {
        for (what, value) in &self.bench {
            println!(
                "nested: BENCH {what} = {value} [{}]",
                self.mode.bench_label()
            );
        }
    }

    fn record(&mut self, what: &str, value: String) {
        self.bench.push((what.to_string(), value));
    }

    fn cmdline(&self, case: &str) -> String {
        let mut cmdline = format!("console=ttyS0 reboot=k panic=1 pci=off quiet mvmtest={case}");
        if !self.extra_cmdline.trim().is_empty() {
            cmdline.push(' ');
            cmdline.push_str(self.extra_cmdline.trim());
        }
        cmdline
    }

    fn boot_source(&self, kernel: &Path, case: &str) -> serde_json::Value {
        json!({
            "kernel_image_path": kernel,
            "initrd_path": self.initrd,
            "boot_args": self.cmdline(case),
        })
    }

    /// A configuration booting `kernel` with the test initramfs acting as `case`.
    fn config(&self, kernel: &Path, case: &str, vcpus: u8) -> serde_json::Value {
        json!({
            "boot-source": self.boot_source(kernel, case),
            "machine-config": {"vcpu_count": vcpus, "mem_size_mib": 256},
        })
    }

    fn launch(&self, name: &str, config: &serde_json::Value) -> Result<MicroVm, String> {
        MicroVm::from_config(&self.vmm, &self.scratch, name, config, self.echo)
            .map_err(|e| e.to_string())
    }

    fn start(&self, name: &str, kernel: &Path, case: &str, vcpus: u8) -> Result<MicroVm, String> {
        self.launch(name, &self.config(kernel, case, vcpus))
    }
}

/// Prints the micro-VM's console and stderr and returns `why` as the failure.
fn fail(vm: &MicroVm, why: impl Into<String>) -> String {
    print!("{}", vm.diagnostics(DIAG_LINES));
    why.into()
}

/// Waits for the userspace marker; returns the time from VMM start to it.
fn reach_userspace(vm: &mut MicroVm) -> Result<Duration, String> {
    match vm.wait_for_line(USERSPACE_MARKER, BOOT_TIMEOUT) {
        Some((_, at)) => Ok(at),
        None => match vm.wait_exit(Duration::ZERO) {
            Some(status) => Err(fail(
                vm,
                format!("mvm-vmm exited ({status}) before the guest reached userspace"),
            )),
            None => Err(fail(
                vm,
                format!(
                    "the guest did not reach userspace within {} s",
                    BOOT_TIMEOUT.as_secs()
                ),
            )),
        },
    }
}

/// The value of `mvm-guest: <key>=<value>` on the console.
fn guest_fact(vm: &mut MicroVm, key: &str) -> Result<String, String> {
    let prefix = format!("mvm-guest: {key}=");
    match vm.wait_for_line(&prefix, Duration::from_secs(10)) {
        Some((line, _)) => Ok(line[line.find(&prefix).unwrap_or(0) + prefix.len()..]
            .trim()
            .to_string()),
        None => Err(fail(vm, format!("the guest did not report {key}"))),
    }
}

/// Waits for the VMM to exit on its own after the guest reset the machine; requires status 0.
fn expect_clean_exit(vm: &mut MicroVm, after: &str) -> Result<(), String> {
    match vm.wait_exit(EXIT_TIMEOUT) {
        Some(status) if status.success() => Ok(()),
        Some(status) => Err(fail(
            vm,
            format!("mvm-vmm exited with {status} after {after}; expected 0"),
        )),
        None => Err(fail(
            vm,
            format!(
                "mvm-vmm still runs {} s after {after}",
                EXIT_TIMEOUT.as_secs()
            ),
        )),
    }
}

fn ms(d: Duration) -> String {
    format!("{} ms", d.as_millis())
}

/// The project's kernel (ELF, PVH entry) boots with the busybox initramfs to userspace; the
/// release printed by the guest is the built kernel's, not this host's; `reboot -f` (reboot=k:
/// i8042 reset) ends the VMM with status 0. Under QEMU TCG the guest must not see XSAVE.
fn boot_vmlinux_initrd_uname(ctx: &mut Ctx) -> Outcome {
    let mut vm = ctx.start("uname", &ctx.vmlinux.clone(), "hello", 1)?;
    let to_userspace = reach_userspace(&mut vm)?;
    let release = guest_fact(&mut vm, "uname-r")?;
    if release != ctx.release {
        return Err(fail(
            &vm,
            format!(
                "guest says uname -r = {release:?}, the built kernel is {:?}",
                ctx.release
            ),
        ));
    }
    let xsave = guest_fact(&mut vm, "xsave")?;
    expect_clean_exit(&mut vm, "the guest rebooted")?;
    ctx.record(
        "vmm start -> guest userspace (vmlinux, 1 vCPU, first VM of this boot)",
        ms(to_userspace),
    );
    ctx.record("vmm start -> vmm exit after guest reboot", ms(vm.elapsed()));
    let (_, vendor) = hypervisor_cpuid();
    if ctx.mode == Mode::Nested && vendor == "TCGTCGTCGTCG" && xsave != "0" {
        return Err(fail(
            &vm,
            "the guest's /proc/cpuinfo lists xsave although this host runs under QEMU TCG",
        ));
    }
    Ok(Verdict::Pass)
}

/// The same kernel as a bzImage (Linux boot protocol, not PVH) boots to userspace.
fn boot_bzimage(ctx: &mut Ctx) -> Outcome {
    let mut vm = ctx.start("bzimage", &ctx.bzimage.clone(), "hello", 1)?;
    let to_userspace = reach_userspace(&mut vm)?;
    let release = guest_fact(&mut vm, "uname-r")?;
    if release != ctx.release {
        return Err(fail(
            &vm,
            format!(
                "guest says uname -r = {release:?}, the built kernel is {:?}",
                ctx.release
            ),
        ));
    }
    expect_clean_exit(&mut vm, "the guest rebooted")?;
    ctx.record(
        "vmm start -> guest userspace (bzImage, 1 vCPU)",
        ms(to_userspace),
    );
    Ok(Verdict::Pass)
}

/// A 2-vCPU micro-VM brings both CPUs online.
fn smp_two_vcpus(ctx: &mut Ctx) -> Outcome {
    let mut vm = ctx.start("smp", &ctx.vmlinux.clone(), "hello", 2)?;
    let to_userspace = reach_userspace(&mut vm)?;
    let cpus = guest_fact(&mut vm, "cpus")?;
    let online = guest_fact(&mut vm, "online")?;
    if cpus != "2" || online != "0-1" {
        return Err(fail(
            &vm,
            format!("guest sees {cpus} processors, online {online:?}; expected 2 and \"0-1\""),
        ));
    }
    expect_clean_exit(&mut vm, "the guest rebooted")?;
    ctx.record(
        "vmm start -> guest userspace (vmlinux, 2 vCPUs)",
        ms(to_userspace),
    );
    Ok(Verdict::Pass)
}

/// Init exits, the kernel panics; with panic=1 it resets after a second and the VMM ends.
fn guest_panic_exits(ctx: &mut Ctx) -> Outcome {
    let mut vm = ctx.start("panic", &ctx.vmlinux.clone(), "panic", 1)?;
    reach_userspace(&mut vm)?;
    if vm
        .wait_for_line("Kernel panic - not syncing", BOOT_TIMEOUT)
        .is_none()
    {
        return Err(fail(
            &vm,
            "the guest's init exited but no kernel panic appeared on the console",
        ));
    }
    match vm.wait_exit(EXIT_TIMEOUT) {
        Some(status) if status.code().is_some() => {
            println!("nested: INFO after the guest panicked, mvm-vmm exited with {status}");
            Ok(Verdict::Pass)
        }
        Some(status) => Err(fail(
            &vm,
            format!("mvm-vmm died by {status} after the guest panicked"),
        )),
        None => Err(fail(
            &vm,
            format!(
                "mvm-vmm still runs {} s after the guest panicked",
                EXIT_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Lines the flooding guest writes: `mvm-flood NNNNNN` plus CR LF from the tty, 18 bytes each,
/// about 35 KiB in all (each byte is a nested exit in L2, ~100 µs at the rate measured there).
/// Kept small: QEMU TCG's SVM emulation hangs L1 now and then during such floods, the more
/// often the longer they last.
const FLOOD_LINES: usize = 2000;
/// Bytes per flood line on the console.
const FLOOD_LINE_BYTES: usize = 18;
/// The console limit of the flood cases: the flood exceeds it twice.
const FLOOD_LIMIT: usize = 16 * 1024;
/// Upper bound for a flooding guest to boot, flood and reset.
const FLOOD_TIMEOUT: Duration = Duration::from_secs(120);

/// The flood line numbered `i`.
fn flood_line(i: usize) -> String {
    format!("mvm-flood {i:06}")
}

/// Checks a console file capped at FLOOD_LIMIT after a flood: at most the limit, its first
/// half as written (starting with `head_start` when given), one marker line after it, then the
/// newest output, whose flood lines are consecutive and end with the last one. Returns the
/// tail (after the marker).
fn check_capped_console(content: &[u8], head_start: Option<&[u8]>) -> Result<String, String> {
    let shown = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join(" | ")
    };
    if content.len() > FLOOD_LIMIT {
        return Err(format!(
            "the console file is {} bytes, over the {FLOOD_LIMIT}-byte limit",
            content.len()
        ));
    }
    let head = FLOOD_LIMIT / 2;
    if let Some(start) = head_start {
        let n = start.len().min(head);
        if content.get(..n) != Some(&start[..n]) {
            return Err(format!(
                "the console file does not start with the guest's first {n} bytes: it starts {:?}",
                String::from_utf8_lossy(&content[..n.min(content.len())])
            ));
        }
    }
    let marker =
        format!("[mvm-vmm: console output over {FLOOD_LIMIT} bytes; older output dropped]\n");
    let text = String::from_utf8_lossy(content);
    let at: Vec<usize> = text.match_indices(&marker).map(|(at, _)| at).collect();
    let at = match at[..] {
        [at] if at == head || at == head + 1 => at,
        _ => {
            return Err(format!(
                "expected one marker line at byte {head} of the console file, found it at {at:?}; \
                 the file ends: {}",
                shown(content)
            ))
        }
    };
    let tail = &text[at + marker.len()..];
    let numbers: Vec<usize> = tail
        .lines()
        .filter_map(|l| l.trim_end_matches('\r').strip_prefix("mvm-flood "))
        .filter_map(|n| n.parse().ok())
        .collect();
    let consecutive = numbers.windows(2).all(|w| w[1] == w[0] + 1);
    if numbers.last() != Some(&(FLOOD_LINES - 1)) || !consecutive || numbers.len() < 50 {
        return Err(format!(
            "after the marker the console file should hold the newest flood lines, consecutive \
             up to {:?}; it holds {} of them ({}consecutive), ending: {}",
            flood_line(FLOOD_LINES - 1),
            numbers.len(),
            if consecutive { "" } else { "not " },
            shown(tail.as_bytes())
        ));
    }
    Ok(tail.to_string())
}

/// A guest floods its serial console (~35 KiB) with `mvm-vmm --console-limit 16384` and the
/// console in a file (`serial_out_path`): the file stays within the limit with the boot output,
/// one marker line and the newest output (the guest's last line), the VMM exits 0 on the
/// guest's reset, and `uart.bytes_dropped` counts what was cut.
fn guest_console_flood_capped(ctx: &mut Ctx) -> Outcome {
    let tag = format!("flood-{}", std::process::id());
    let console = ctx.scratch.join(format!("{tag}-console.log"));
    let metrics = ctx.scratch.join(format!("{tag}-metrics.json"));
    let outcome = flood_through_the_vmm(ctx, &console, &metrics);
    let _ = std::fs::remove_file(&console);
    let _ = std::fs::remove_file(&metrics);
    outcome
}

fn flood_through_the_vmm(ctx: &mut Ctx, console: &Path, metrics: &Path) -> Outcome {
    let mut config = ctx.config(&ctx.vmlinux.clone(), "flood", 1);
    config["boot-source"]["boot_args"] = json!(format!(
        "{} mvmfloodlines={FLOOD_LINES}",
        ctx.cmdline("flood")
    ));
    config["serial"] = json!({"serial_out_path": console});
    config["metrics"] = json!({"metrics_path": metrics});
    let vmm = ctx.vmm.clone();
    let mut vm = MicroVm::from_command(&ctx.scratch, "flood", &config, ctx.echo, |path| {
        let mut cmd = std::process::Command::new(&vmm);
        cmd.args(["--no-api", "--console-limit", &FLOOD_LIMIT.to_string()])
            .arg("--config-file")
            .arg(path);
        cmd
    })
    .map_err(|e| e.to_string())?;
    // The console goes to the file, not to the VMM's stdout: wait for the guest's reset.
    let status = vm.wait_exit(FLOOD_TIMEOUT);
    let elapsed = vm.elapsed();
    let content = std::fs::read(console)
        .map_err(|e| fail(&vm, format!("cannot read the console file: {e}")))?;
    match status {
        Some(status) if status.success() => {}
        other => {
            let text = String::from_utf8_lossy(&content);
            let lines: Vec<&str> = text.lines().collect();
            return Err(fail(
                &vm,
                format!(
                    "mvm-vmm {} within {} s of a console flood; the console file ({} bytes) ends: {}",
                    match other {
                        Some(status) => format!("exited with {status}"),
                        None => "did not exit".into(),
                    },
                    FLOOD_TIMEOUT.as_secs(),
                    content.len(),
                    lines[lines.len().saturating_sub(8)..].join(" | ")
                ),
            ));
        }
    }
    let tail = check_capped_console(&content, None).map_err(|why| fail(&vm, why))?;
    let head = String::from_utf8_lossy(&content[..FLOOD_LIMIT / 2]);
    if !head.contains(USERSPACE_MARKER) || !head.contains(&flood_line(0)) {
        return Err(fail(
            &vm,
            "the first half of the console file lacks the guest's first lines (userspace marker, \
             first flood line)",
        ));
    }
    if !tail.contains(&format!("mvm-guest: flood-done lines={FLOOD_LINES}")) {
        return Err(fail(
            &vm,
            "the guest's last line (flood-done) is not in the console file",
        ));
    }
    let flushed = std::fs::read_to_string(metrics)
        .map_err(|e| fail(&vm, format!("cannot read the metrics file: {e}")))?;
    let dropped = flushed
        .lines()
        .last()
        .and_then(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .and_then(|m| m["uart"]["bytes_dropped"].as_u64());
    let least = (FLOOD_LINES * FLOOD_LINE_BYTES - FLOOD_LIMIT) as u64;
    if dropped.is_none_or(|d| d < least) {
        return Err(fail(
            &vm,
            format!("uart.bytes_dropped is {dropped:?} in the last metrics line; expected at least {least}"),
        ));
    }
    println!(
        "nested: INFO console flood: {} bytes kept in the console file, uart.bytes_dropped {}",
        content.len(),
        dropped.unwrap_or_default()
    );
    ctx.record(
        &format!(
            "vmm start -> exit, guest flooding {} KiB into a {} KiB console limit",
            FLOOD_LINES * FLOOD_LINE_BYTES / 1024,
            FLOOD_LIMIT / 1024
        ),
        ms(elapsed),
    );
    Ok(Verdict::Pass)
}

/// Through mvmd with `MVM_CONSOLE_LIMIT=16384`: a command in a vm sandbox floods
/// /dev/console (~35 KiB); the sandbox's console.log stays within the limit with its start,
/// the marker and the newest output, `mvm logs` shows the same, and the sandbox still answers.
fn mvmd_console_flood_capped(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let mut dirs = ManagerDirs::new(ctx, "flood")?;
    dirs.env
        .push(("MVM_CONSOLE_LIMIT".into(), FLOOD_LIMIT.to_string()));
    let session = MvmdSession::start_in(ctx, dirs)?;
    let ctx = &*ctx;
    let checked = (|| {
        let id = sandbox_id(&session.create_vm(ctx, &[])?);
        let log_path = session
            .dirs
            .root
            .join("run/sandboxes")
            .join(&id)
            .join("console.log");
        let before =
            std::fs::read(&log_path).map_err(|e| format!("reading {}: {e}", log_path.display()))?;
        let flood = format!(
            "awk 'BEGIN {{ for (i = 0; i < {FLOOD_LINES}; i++) printf \"mvm-flood %06d\\n\", i }}' \
             > /dev/console && echo flooded"
        );
        let out = session.mvm(ctx, &["exec", &id, "--", "sh", "-c", &flood], None)?;
        if out.trim() != "flooded" {
            return Err(format!(
                "the flood command in the sandbox printed {:?}",
                out.trim()
            ));
        }
        let content =
            std::fs::read(&log_path).map_err(|e| format!("reading {}: {e}", log_path.display()))?;
        check_capped_console(&content, Some(&before))
            .map_err(|why| format!("sandbox console.log: {why}"))?;
        let logs = session.mvm(ctx, &["logs", &id], None)?;
        check_capped_console(logs.as_bytes(), Some(&before))
            .map_err(|why| format!("mvm logs: {why}"))?;
        let alive = session.mvm(ctx, &["exec", &id, "--", "echo", "still-here"], None)?;
        if alive.trim() != "still-here" {
            return Err(format!(
                "after the flood the sandbox answered {:?}",
                alive.trim()
            ));
        }
        session.mvm(ctx, &["rm", &id], None).map(drop)
    })();
    session.finish(ctx, checked)
}

/// A guest whose init only sleeps, booted through the API socket, keeps the VMM alive; the
/// driver's timeout stops it with SIGTERM: it exits 0 within the grace period and leaves no
/// API socket behind. Measures the VMM's resident memory while the guest idles.
fn idle_guest_killed_at_timeout(ctx: &mut Ctx) -> Outcome {
    let boot_source = ctx.boot_source(&ctx.vmlinux.clone(), "idle");
    let machine = json!({"vcpu_count": 1, "mem_size_mib": 256});
    let mut vm = MicroVm::from_api(
        &ctx.vmm,
        &ctx.scratch,
        "idle",
        &boot_source,
        &machine,
        ctx.echo,
    )
    .map_err(|e| e.to_string())?;
    reach_userspace(&mut vm)?;
    if vm
        .wait_for_line("mvm-guest: idle", Duration::from_secs(10))
        .is_none()
    {
        return Err(fail(&vm, "the guest did not announce that it idles"));
    }
    if let Some(status) = vm.wait_exit(IDLE_WATCH) {
        return Err(fail(
            &vm,
            format!("mvm-vmm exited ({status}) while its guest idled"),
        ));
    }
    if let Some((rss, hwm)) = vm.memory_kib() {
        ctx.record(
            "mvm-vmm VmRSS with an idle 256 MiB guest",
            format!("{} KiB", rss),
        );
        ctx.record(
            "mvm-vmm VmHWM with an idle 256 MiB guest",
            format!("{} KiB", hwm),
        );
    }
    let pid = vm.pid();
    let socket = vm.api_socket();
    match vm.stop() {
        Stopped::Terminated(status) if status.success() => {}
        Stopped::Terminated(status) => {
            return Err(fail(
                &vm,
                format!("mvm-vmm exited with {status} on SIGTERM; expected 0"),
            ))
        }
        Stopped::Killed => {
            return Err(fail(
                &vm,
                "mvm-vmm ignored SIGTERM for 10 s and had to be killed",
            ))
        }
        Stopped::AlreadyExited(status) => {
            return Err(fail(&vm, format!("mvm-vmm had already exited ({status})")))
        }
    }
    if Path::new(&format!("/proc/{pid}")).exists() {
        return Err(fail(
            &vm,
            format!("process {pid} still exists after mvm-vmm was reaped"),
        ));
    }
    if socket.exists() {
        return Err(fail(
            &vm,
            format!("mvm-vmm left its API socket {} behind", socket.display()),
        ));
    }
    let dir = vm.dir().to_path_buf();
    drop(vm);
    if dir.exists() {
        return Err(format!(
            "scratch dir {} survived the micro-VM",
            dir.display()
        ));
    }
    Ok(Verdict::Pass)
}

/// The project's rootfs image as a read-only virtio-blk disk: the guest mounts its ext4 and finds
/// the agent and busybox, and cannot write the disk; a writable raw scratch disk: the guest
/// copies its first MiB (pseudo-random, written here) to its second MiB, which must come back
/// byte-exact. The rootfs image is unchanged afterwards.
fn virtio_blk_rootfs_and_scratch(ctx: &mut Ctx) -> Outcome {
    const MIB: usize = 1 << 20;
    let scratch_disk = ctx
        .scratch
        .join(format!("blk-scratch-{}.img", std::process::id()));
    let mut pattern = vec![0u8; 2 * MIB];
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in pattern[..MIB].chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(&scratch_disk, &pattern)
        .map_err(|e| format!("cannot write {}: {e}", scratch_disk.display()))?;
    let result = (|| {
        let rootfs_before = fingerprint(&ctx.rootfs)?;
        let mut config = ctx.config(&ctx.vmlinux, "blk", 1);
        config["drives"] = json!([
            {"drive_id": "rootfs", "path_on_host": ctx.rootfs, "is_root_device": true, "is_read_only": true},
            {"drive_id": "scratch", "path_on_host": scratch_disk, "is_root_device": false, "is_read_only": false},
        ]);
        let mut vm = ctx.launch("blk", &config)?;
        reach_userspace(&mut vm)?;
        for (key, want) in [("rootfs", "ok"), ("ro-write", "refused"), ("copy", "ok")] {
            let got = guest_fact(&mut vm, key)?;
            if got != want {
                return Err(fail(
                    &vm,
                    format!("guest reports {key}={got}, expected {want}"),
                ));
            }
        }
        expect_clean_exit(&mut vm, "the guest rebooted")?;
        let disk = std::fs::read(&scratch_disk)
            .map_err(|e| format!("cannot read {}: {e}", scratch_disk.display()))?;
        if disk.len() != 2 * MIB || disk[..MIB] != pattern[..MIB] {
            return Err(fail(
                &vm,
                "the scratch disk's first MiB changed although the guest only read it",
            ));
        }
        if let Some(offset) = disk[MIB..]
            .iter()
            .zip(&pattern[..MIB])
            .position(|(a, b)| a != b)
        {
            return Err(fail(
                &vm,
                format!(
                    "the guest's copy differs from the source at byte {offset} of the second MiB"
                ),
            ));
        }
        if fingerprint(&ctx.rootfs)? != rootfs_before {
            return Err(fail(
                &vm,
                format!(
                    "{} changed although it was attached read-only",
                    ctx.rootfs.display()
                ),
            ));
        }
        Ok(Verdict::Pass)
    })();
    let _ = std::fs::remove_file(&scratch_disk);
    result
}

/// A persistent tap in this host with 10.231.117.1/30, the guest's virtio-net eth0 with
/// 10.231.117.2/30: the guest pings the host, then the host pings the guest. The tap is
/// removed afterwards.
fn virtio_net_tap_ping(ctx: &mut Ctx) -> Outcome {
    const TAP: &str = "mvmnest0";
    const HOST_CIDR: &str = "10.231.117.1/30";
    const HOST_IP: &str = "10.231.117.1";
    const GUEST_CIDR: &str = "10.231.117.2/30";
    const GUEST_IP: &str = "10.231.117.2";
    let tap = match Tap::create(TAP, HOST_CIDR) {
        Ok(tap) => tap,
        Err(e) if !mvm_testkit::is_root() => return Ok(Verdict::Skip(format!("not root: {e}"))),
        Err(e) => return Err(e.to_string()),
    };
    let mut config = ctx.config(&ctx.vmlinux, "net", 1);
    config["boot-source"]["boot_args"] = json!(format!(
        "{} mvmip={GUEST_CIDR} mvmpeer={HOST_IP}",
        ctx.cmdline("net")
    ));
    config["network-interfaces"] =
        json!([{"iface_id": "eth0", "host_dev_name": TAP, "guest_mac": "06:00:0a:e7:75:02"}]);
    let mut vm = ctx.launch("net", &config)?;
    reach_userspace(&mut vm)?;
    let guest_ping = guest_fact(&mut vm, "ping-host")?;
    if guest_ping != "ok" {
        return Err(fail(
            &vm,
            format!("the guest could not ping {HOST_IP} over virtio-net and the tap"),
        ));
    }
    if vm
        .wait_for_line("mvm-guest: net-ready", Duration::from_secs(10))
        .is_none()
    {
        return Err(fail(&vm, "the guest did not announce net-ready"));
    }
    let ping = std::process::Command::new("ping")
        .args(["-c", "3", "-W", "5", GUEST_IP])
        .output()
        .map_err(|e| format!("cannot run ping: {e}"))?;
    if !ping.status.success() {
        return Err(fail(
            &vm,
            format!(
                "this host could not ping the guest at {GUEST_IP}: {}",
                String::from_utf8_lossy(&ping.stdout).trim()
            ),
        ));
    }
    match vm.stop() {
        Stopped::Terminated(status) if status.success() => {}
        other => {
            return Err(fail(
                &vm,
                format!("mvm-vmm did not end cleanly on SIGTERM: {other:?}"),
            ))
        }
    }
    drop(vm);
    drop(tap);
    if Tap::exists(TAP) {
        return Err(format!("tap {TAP} still exists after the test removed it"));
    }
    Ok(Verdict::Pass)
}

/// The production path: mvm-jailer wraps mvm-vmm (chroot, new pid/mount namespaces, a cgroup,
/// an unprivileged uid) and the guest boots from files bind-mounted into the jail. While the
/// guest idles, every thread of the VMM runs under a seccomp filter and as the jail's uid; the
/// VMM ends cleanly on SIGTERM, the jailer passes its status on, and `--cleanup` leaves neither
/// the jail directory nor the cgroup behind.
fn jailed_vmm_seccomp(ctx: &mut Ctx) -> Outcome {
    const ID: &str = "mvm-nested-jail";
    const PARENT_CGROUP: &str = "mvm-nested";
    const UID: u32 = 64123;
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvm-jailer needs root".into()));
    }
    let unified = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
    let cgroup_dir = if unified {
        PathBuf::from(format!("/sys/fs/cgroup/{PARENT_CGROUP}/{ID}"))
    } else {
        PathBuf::from(format!("/sys/fs/cgroup/pids/{PARENT_CGROUP}/{ID}"))
    };
    let base = ctx.scratch.join("jails");
    let guest_dir = ctx
        .vmlinux
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let file_name = |p: &Path| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    let config = json!({
        "boot-source": {
            "kernel_image_path": format!("/guest/{}", file_name(&ctx.vmlinux)),
            "initrd_path": format!("/guest/{}", file_name(&ctx.initrd)),
            "boot_args": ctx.cmdline("idle"),
        },
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
    });
    let jailer = ctx.jailer.clone();
    let vmm = ctx.vmm.clone();
    let cleanup = || {
        std::process::Command::new(&jailer)
            .args(["--cleanup", "--id", ID, "--parent-cgroup", PARENT_CGROUP])
            .arg("--chroot-base-dir")
            .arg(&base)
            .output()
    };
    let mut vm = MicroVm::from_command(&ctx.scratch, "jailed", &config, ctx.echo, |config_path| {
        let config_dir = config_path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let mut cmd = std::process::Command::new(&jailer);
        cmd.args([
            "--id",
            ID,
            "--uid",
            &UID.to_string(),
            "--gid",
            &UID.to_string(),
            "--new-pid-ns",
        ])
        .args([
            "--cgroup-version",
            if unified { "2" } else { "1" },
            "--cgroup",
            "pids.max=64",
        ])
        .args(["--parent-cgroup", PARENT_CGROUP])
        .arg("--exec-file")
        .arg(&vmm)
        .arg("--chroot-base-dir")
        .arg(&base)
        .arg("--mount")
        .arg(format!("{}:/guest:ro", guest_dir.display()))
        .arg("--mount")
        .arg(format!("{}:/cfg:ro", config_dir.display()))
        .args(["--", "--no-api", "--config-file", "/cfg/vm.json"]);
        cmd
    })
    .map_err(|e| e.to_string())?;
    let checked = (|| {
        reach_userspace(&mut vm)?;
        let release = guest_fact(&mut vm, "uname-r")?;
        if release != ctx.release {
            return Err(fail(
                &vm,
                format!(
                    "jailed guest says uname -r = {release:?}, expected {:?}",
                    ctx.release
                ),
            ));
        }
        if vm
            .wait_for_line("mvm-guest: idle", Duration::from_secs(10))
            .is_none()
        {
            return Err(fail(&vm, "the jailed guest did not announce that it idles"));
        }
        let vmm_pid = match descendants_named(vm.pid(), "mvm-vmm").as_slice() {
            [pid] => *pid,
            other => {
                return Err(fail(
                    &vm,
                    format!("expected one mvm-vmm below the jailer, found {other:?}"),
                ))
            }
        };
        let threads = std::fs::read_dir(format!("/proc/{vmm_pid}/task"))
            .map_err(|e| format!("/proc/{vmm_pid}/task: {e}"))?;
        let mut seen = 0;
        for tid in threads.flatten() {
            let status = std::fs::read_to_string(tid.path().join("status")).unwrap_or_default();
            let comm = std::fs::read_to_string(tid.path().join("comm")).unwrap_or_default();
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
                    .unwrap_or("?")
                    .to_string()
            };
            if field("Seccomp:") != "2" {
                return Err(fail(
                    &vm,
                    format!(
                        "VMM thread {:?} runs without a seccomp filter (Seccomp: {})",
                        comm.trim(),
                        field("Seccomp:")
                    ),
                ));
            }
            let uids = field("Uid:");
            if uids.split_whitespace().any(|u| u != UID.to_string()) {
                return Err(fail(
                    &vm,
                    format!(
                        "VMM thread {:?} runs with uids {uids}, expected {UID}",
                        comm.trim()
                    ),
                ));
            }
            seen += 1;
        }
        println!("nested: INFO jailed mvm-vmm (pid {vmm_pid}): {seen} threads, all in seccomp filter mode as uid {UID}");
        // SAFETY: kill(2) with a pid just read from /proc; at worst it names an exited process.
        if unsafe { libc::kill(vmm_pid as libc::pid_t, libc::SIGTERM) } != 0 {
            return Err(fail(
                &vm,
                format!(
                    "cannot signal the jailed VMM: {}",
                    std::io::Error::last_os_error()
                ),
            ));
        }
        match vm.wait_exit(EXIT_TIMEOUT) {
            Some(status) if status.success() => Ok(Verdict::Pass),
            Some(status) => Err(fail(
                &vm,
                format!("the jailer exited with {status} after its VMM got SIGTERM"),
            )),
            None => Err(fail(&vm, "the jailer still runs after its VMM got SIGTERM")),
        }
    })();
    drop(vm);
    let cleaned = cleanup();
    let verdict = checked?;
    match cleaned {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            return Err(format!(
                "mvm-jailer --cleanup failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
        Err(e) => return Err(format!("cannot run mvm-jailer --cleanup: {e}")),
    }
    for leftover in [base.join("mvm-vmm").join(ID), cgroup_dir] {
        if leftover.exists() {
            return Err(format!(
                "{} is left after mvm-jailer --cleanup",
                leftover.display()
            ));
        }
    }
    Ok(verdict)
}

/// Processes below `root` (by parent pid, transitively) whose comm is `name`.
fn descendants_named(root: u32, name: &str) -> Vec<u32> {
    let mut parents: Vec<(u32, u32, String)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // comm is in parentheses and may hold spaces; the fields after the last ')' are fixed.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or(0);
        parents.push((pid, ppid, comm));
    }
    let mut below = vec![root];
    let mut grew = true;
    while grew {
        grew = false;
        for (pid, ppid, _) in &parents {
            if below.contains(ppid) && !below.contains(pid) {
                below.push(*pid);
                grew = true;
            }
        }
    }
    parents
        .iter()
        .filter(|(pid, _, comm)| *pid != root && below.contains(pid) && comm == name)
        .map(|(pid, _, _)| *pid)
        .collect()
}

/// The production guest: the project's rootfs as the read-only root with a tmpfs overlay and
/// mvm-agent as init, reached over hybrid vsock with the agent client. `uname -r` through the
/// agent prints the guest kernel's release, `sh -c 'exit 3'` exits 3, and the agent's reboot
/// ends the VMM with status 0. Measures VMM start → first exec output.
fn agent_over_vsock(ctx: &mut Ctx) -> Outcome {
    let mut vm = ctx.launch("agent", &json!({
        "boot-source": {
            "kernel_image_path": ctx.vmlinux,
            "boot_args": format!("console=ttyS0 reboot=k panic=1 pci=off quiet mvm.overlay=tmpfs {}", ctx.extra_cmdline),
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
        "drives": [{"drive_id": "rootfs", "path_on_host": ctx.rootfs, "is_root_device": true, "is_read_only": true}],
        "vsock": {"vsock_id": "vsock0", "guest_cid": 3, "uds_path": ctx.scratch.join(format!("agent-{}.vsock", std::process::id()))},
    }))?;
    let uds = ctx
        .scratch
        .join(format!("agent-{}.vsock", std::process::id()));
    let outcome = agent_session(ctx, &mut vm, &uds);
    let _ = std::fs::remove_file(&uds);
    outcome
}

fn agent_session(ctx: &mut Ctx, vm: &mut MicroVm, uds: &Path) -> Outcome {
    use agent::{AgentClient, ExecRequest, ShutdownAction};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start a tokio runtime: {e}"))?;
    // Connect as soon as the agent listens; give up when the VMM ends or at the boot timeout.
    let client = loop {
        if let Some(status) = vm.wait_exit(Duration::from_millis(100)) {
            let stderr = vm.stderr();
            if !status.success() && stderr.contains("not built into mvm-vmm yet") {
                return Ok(Verdict::Skip(format!(
                    "mvm-vmm has no vsock device yet: {}",
                    stderr.lines().last().unwrap_or_default().trim()
                )));
            }
            return Err(fail(
                vm,
                format!("mvm-vmm exited ({status}) before the agent answered"),
            ));
        }
        match runtime.block_on(AgentClient::connect_hybrid_vsock(
            uds,
            agent::protocol::DEFAULT_VSOCK_PORT,
        )) {
            Ok(client) => break client,
            Err(_) if vm.elapsed() < BOOT_TIMEOUT => {}
            Err(e) => {
                return Err(fail(
                    vm,
                    format!("no agent on vsock within {} s: {e}", BOOT_TIMEOUT.as_secs()),
                ))
            }
        }
    };
    let run = |argv: &[&str]| {
        runtime.block_on(async {
            client
                .exec(ExecRequest::new(argv.iter().copied()))
                .await?
                .wait_with_output()
                .await
        })
    };
    let uname = run(&["uname", "-r"])
        .map_err(|e| fail(vm, format!("exec uname -r through the agent: {e}")))?;
    let first_output = vm.elapsed();
    let release = String::from_utf8_lossy(&uname.stdout).trim().to_string();
    if !uname.status.success() || release != ctx.release {
        return Err(fail(
            vm,
            format!(
                "uname -r through the agent: {:?}, output {release:?}; expected success and {:?}",
                uname.status, ctx.release
            ),
        ));
    }
    let exit3 =
        run(&["sh", "-c", "exit 3"]).map_err(|e| fail(vm, format!("exec sh -c 'exit 3': {e}")))?;
    if exit3.status.code() != Some(3) {
        return Err(fail(
            vm,
            format!(
                "sh -c 'exit 3' through the agent ended with {:?}",
                exit3.status
            ),
        ));
    }
    ctx.record(
        "vmm start -> first exec output through the agent (rootfs on virtio-blk, vsock)",
        ms(first_output),
    );
    if let Err(e) = runtime.block_on(client.shutdown(ShutdownAction::Reboot)) {
        return Err(fail(vm, format!("agent shutdown request failed: {e}")));
    }
    drop(client);
    expect_clean_exit(vm, "the agent rebooted the guest")?;
    Ok(Verdict::Pass)
}

/// Upper bound for one `mvm` command that boots a micro-VM.
const CLI_TIMEOUT: Duration = Duration::from_secs(120);

/// State and runtime directories of one sandbox-manager instance (daemonless `mvm` or `mvmd`),
/// under the scratch directory, with its own cgroup parent; removed on drop.
struct ManagerDirs {
    root: PathBuf,
    cgroup_parent: String,
    /// More environment for `mvm` and `mvmd` (e.g. MVM_CONSOLE_LIMIT).
    env: Vec<(String, String)>,
    /// More arguments for `mvmd` (e.g. `--tcp ADDR`).
    mvmd_args: Vec<String>,
}

impl ManagerDirs {
    fn new(ctx: &Ctx, tag: &str) -> Result<Self, String> {
        let root = ctx.scratch.join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root)
            .map_err(|e| format!("cannot create {}: {e}", root.display()))?;
        Ok(ManagerDirs {
            root,
            cgroup_parent: format!("mvm-nested-{tag}"),
            env: Vec::new(),
            mvmd_args: Vec::new(),
        })
    }

    /// mvmd's API socket.
    fn socket(&self) -> PathBuf {
        self.root.join("mvmd.sock")
    }

    /// mvmd's log (its stdout and stderr).
    fn log(&self) -> PathBuf {
        self.root.join("mvmd.log")
    }

    /// The environment `mvm` and `mvmd` read: directories, binaries, the default template.
    fn apply(&self, ctx: &Ctx, cmd: &mut std::process::Command) {
        let bin_dir = ctx.vmm.parent().map(Path::to_path_buf).unwrap_or_default();
        let artifacts = ctx
            .vmlinux
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default();
        cmd.env("MVM_STATE_DIR", self.root.join("state"))
            .env("MVM_RUN_DIR", self.root.join("run"))
            .env("MVM_BIN_DIR", bin_dir)
            .env("MVM_ARTIFACTS", artifacts)
            .env("MVM_CGROUP_PARENT", &self.cgroup_parent)
            .env_remove("MVM_VM_TIER")
            .env_remove("MVM_HOST")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
    }

    /// What a finished sandbox left behind: processes, cgroups, namespaces, jails, mounts, links.
    fn leftovers(&self, before: &Baseline) -> Vec<String> {
        let mut left: Vec<String> = mvm_processes()
            .into_iter()
            .filter(|p| !before.processes.contains(p))
            .map(|p| format!("process {p}"))
            .collect();
        // cgroup v2: /sys/fs/cgroup/<parent>; v1: the same below each controller's hierarchy.
        for hierarchy in ["", "cpu", "cpuacct", "memory", "pids", "freezer"] {
            let parent = Path::new("/sys/fs/cgroup")
                .join(hierarchy)
                .join(&self.cgroup_parent);
            for child in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                if child.path().is_dir() {
                    left.push(format!("cgroup {}", child.path().display()));
                }
            }
        }
        let run = self.root.join("run");
        for dir in ["sandboxes", "netns", "jail/mvm-vmm", "jail/mvm-agent"] {
            for entry in std::fs::read_dir(run.join(dir))
                .into_iter()
                .flatten()
                .flatten()
            {
                left.push(format!("{}", entry.path().display()));
            }
        }
        for point in mvm_testkit::mount_points_under(&self.root) {
            left.push(format!("mount {}", point.display()));
        }
        for link in net_links() {
            if !before.links.contains(&link) {
                left.push(format!("network interface {link}"));
            }
        }
        left
    }
}

impl Drop for ManagerDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Network interfaces and mvm processes that existed before a test, so that its leak check
/// reports only what the test itself left.
struct Baseline {
    links: Vec<String>,
    processes: Vec<String>,
}

impl Baseline {
    fn now() -> Self {
        Baseline {
            links: net_links(),
            processes: mvm_processes(),
        }
    }
}

/// `pid (comm)` of every mvm-vmm, mvm-jailer and mvm-agent process on this host.
fn mvm_processes() -> Vec<String> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let comm = std::fs::read_to_string(entry.path().join("comm")).ok()?;
            ["mvm-vmm", "mvm-jailer", "mvm-agent"]
                .contains(&comm.trim())
                .then(|| format!("{} ({})", entry.file_name().to_string_lossy(), comm.trim()))
        })
        .collect()
}

fn net_links() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Runs `cmd` with `stdin`, up to CLI_TIMEOUT; returns (exit code, stdout, stderr).
fn run_cli(
    mut cmd: std::process::Command,
    stdin: Option<&[u8]>,
) -> Result<(i32, String, String), String> {
    use std::io::Write;
    use std::process::Stdio;
    let shown = format!("{cmd:?}");
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {shown}: {e}"))?;
    if let (Some(data), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(data)
            .map_err(|e| format!("writing stdin of {shown}: {e}"))?;
    }
    let run = mvm_testkit::wait_with_timeout(child, CLI_TIMEOUT);
    match run.status.and_then(|s| s.code()) {
        Some(code) => Ok((code, run.stdout, run.stderr)),
        None => Err(format!(
            "{shown} did not finish within {} s (or died by a signal); stderr: {}",
            CLI_TIMEOUT.as_secs(),
            run.stderr.trim()
        )),
    }
}

/// Daemonless `mvm run --rm --isolation vm`: each command gets its own micro-VM (jailer, VMM, agent)
/// on the project's kernel and rootfs. `uname -r` prints the guest kernel's release;
/// `sh -c 'exit 3'` exits 3; stdin reaches the command byte-exact; nothing is left behind.
fn mvm_run_daemonless(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("the vm tier of mvm needs root".into()));
    }
    let dirs = ManagerDirs::new(ctx, "cli")?;
    let before = Baseline::now();
    let mvm = |args: &[&str]| {
        let mut cmd = std::process::Command::new(&ctx.mvm);
        dirs.apply(ctx, &mut cmd);
        cmd.args(args);
        cmd
    };
    let checked = (|| {
        let started = std::time::Instant::now();
        let (code, out, err) = run_cli(
            mvm(&["run", "--rm", "--isolation", "vm", "--", "uname", "-r"]),
            None,
        )?;
        let elapsed = started.elapsed();
        if code != 0 || out.trim() != ctx.release {
            return Err(format!(
                "mvm run --rm --isolation vm -- uname -r: exit {code}, stdout {:?} (expected {:?}), stderr: {}",
                out.trim(),
                ctx.release,
                err.trim()
            ));
        }
        let (code, _, err) = run_cli(
            mvm(&[
                "run",
                "--rm",
                "--isolation",
                "vm",
                "--",
                "sh",
                "-c",
                "exit 3",
            ]),
            None,
        )?;
        if code != 3 {
            return Err(format!(
                "mvm run --rm --isolation vm -- sh -c 'exit 3' exited {code}; stderr: {}",
                err.trim()
            ));
        }
        let input: Vec<u8> = (0..=255u8).cycle().take(100_000).collect();
        let cat = mvm(&[
            "run",
            "--rm",
            "-i",
            "--isolation",
            "vm",
            "--",
            "sh",
            "-c",
            "cat | md5sum",
        ]);
        let (code, out, err) = run_cli(cat, Some(&input))?;
        let mut md5 = std::process::Command::new("md5sum");
        md5.arg("-");
        let (local_code, local_md5, _) = run_cli(md5, Some(&input))?;
        if code != 0
            || local_code != 0
            || out.split_whitespace().next() != local_md5.split_whitespace().next()
        {
            return Err(format!(
                "100000 bytes piped through mvm run --rm -i: exit {code}, guest md5 {:?}, expected {:?}; stderr: {}",
                out.trim(),
                local_md5.trim(),
                err.trim()
            ));
        }
        Ok(elapsed)
    })();
    let left = dirs.leftovers(&before);
    let leak =
        (!left.is_empty()).then(|| format!("daemonless mvm run left behind: {}", left.join(", ")));
    match (checked, leak) {
        (Ok(elapsed), None) => {
            ctx.record(
                "mvm run --rm --isolation vm -- uname -r, daemonless, start -> exit",
                ms(elapsed),
            );
            Ok(Verdict::Pass)
        }
        (Ok(_), Some(leak)) => Err(leak),
        (Err(why), None) => Err(why),
        (Err(why), Some(leak)) => Err(format!("{why}; and {leak}")),
    }
}

/// `mvmd` with the vm tier (no override: this host's /dev/kvm is real KVM): 20 times
/// `mvm --host -o json run` (create → exec) printing the guest kernel's release, then
/// `mvm --host rm`; then three idle sandboxes for their host memory; then no process, cgroup,
/// namespace, jail, mount or link is left. Records the vm tier's benchmark figures (nested TCG,
/// not hardware): create → first exec output p50/p99, destroy p50, create+destroy per second,
/// and the PSS of an idle sandbox's VMM.
fn mvmd_cycles(ctx: &mut Ctx) -> Outcome {
    const CYCLES: usize = 20;
    const IDLE: usize = 3;
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let dirs = ManagerDirs::new(ctx, "mvmd")?;
    let before = Baseline::now();
    let (daemon, host) = start_mvmd(ctx, &dirs)?;
    let mvm = |args: &[&str]| {
        let mut cmd = std::process::Command::new(&ctx.mvm);
        dirs.apply(ctx, &mut cmd);
        cmd.args(["--host", &host]).args(args);
        run_cli(cmd, None)
    };
    // Creates a vm sandbox running `uname -r`; its id once the output was right.
    let create = |what: &str| -> Result<String, String> {
        let (code, out, err) = mvm(&[
            "-o",
            "json",
            "run",
            "--isolation",
            "vm",
            "--",
            "uname",
            "-r",
        ])?;
        let answer: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        let stdout = answer["exec"]["stdout"].as_str().unwrap_or_default();
        match answer["sandbox"]["id"].as_str() {
            Some(id) if code == 0 && stdout.trim() == ctx.release => Ok(id.to_owned()),
            _ => Err(format!(
                "{what}: mvm --host -o json run --isolation vm -- uname -r: exit {code}, stdout {out:?} \
                 (expected the sandbox and {:?}), stderr: {}",
                ctx.release,
                err.trim()
            )),
        }
    };
    let remove = |id: &str| -> Result<(), String> {
        match mvm(&["rm", id])? {
            (0, _, _) => Ok(()),
            (code, _, err) => Err(format!("mvm --host rm {id}: exit {code}: {}", err.trim())),
        }
    };
    /// Create and destroy times of each cycle, and the PSS (KiB) of each idle sandbox's VMM.
    type Measured = (Vec<Duration>, Vec<Duration>, Vec<u64>);
    let measured = (|| -> Result<Measured, String> {
        let (mut up, mut down) = (Vec::with_capacity(CYCLES), Vec::with_capacity(CYCLES));
        for cycle in 1..=CYCLES {
            let started = Instant::now();
            let id = create(&format!("cycle {cycle}"))?;
            up.push(started.elapsed());
            let started = Instant::now();
            remove(&id)?;
            down.push(started.elapsed());
            // A heartbeat: the harness takes a long-silent console for a hung L1.
            println!("nested: INFO cycle {cycle}/{CYCLES} done");
        }
        let idle: Vec<String> = (1..=IDLE)
            .map(|n| create(&format!("idle sandbox {n}")))
            .collect::<Result<_, _>>()?;
        std::thread::sleep(Duration::from_secs(1));
        let pss = idle.iter().map(|id| vmm_pss_kib(id)).collect::<Vec<_>>();
        for id in &idle {
            remove(id)?;
        }
        Ok((up, down, pss))
    })();
    let log = daemon.finish();
    let (mut up, mut down, pss) = measured.map_err(|why| format!("{why}; mvmd: {log}"))?;
    let left = dirs.leftovers(&before);
    if !left.is_empty() {
        return Err(format!(
            "after {CYCLES} cycles mvmd left behind: {}; mvmd: {log}",
            left.join(", ")
        ));
    }
    if pss.contains(&0) {
        return Err(format!(
            "an idle sandbox's mvm-vmm was not found (PSS {pss:?} KiB); mvmd: {log}"
        ));
    }
    let total: Duration = up.iter().chain(&down).sum();
    up.sort();
    down.sort();
    ctx.record(
        "vm tier via mvmd: sandbox create -> first exec output, p50 of 20",
        ms(up[CYCLES / 2]),
    );
    ctx.record(
        "vm tier via mvmd: sandbox create -> first exec output, p99 (max of 20)",
        ms(up[CYCLES - 1]),
    );
    ctx.record(
        "vm tier via mvmd: sandbox destroy, p50 of 20",
        ms(down[CYCLES / 2]),
    );
    ctx.record(
        "vm tier via mvmd: create+destroy per second, one at a time",
        format!("{:.2}/s", CYCLES as f64 / total.as_secs_f64()),
    );
    ctx.record(
        "vm tier: PSS of an idle sandbox's mvm-vmm (256 MiB guest, touched pages included), mean of 3",
        format!("{:.1} MiB", pss.iter().sum::<u64>() as f64 / IDLE as f64 / 1024.0),
    );
    Ok(Verdict::Pass)
}

/// PSS in KiB of the mvm-vmm of sandbox `id` (its command line names the id), 0 if not found.
fn vmm_pss_kib(id: &str) -> u64 {
    vmm_kib(id, "smaps_rollup", "Pss:")
}

/// The field `field` (kB) of `/proc/<pid>/<file>` of sandbox `id`'s mvm-vmm, or 0 when there
/// is no such process.
pub(crate) fn vmm_kib(id: &str, file: &str, field: &str) -> u64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().parse::<u32>().is_ok())
        .find(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"mvm-vmm"))
                && args
                    .windows(2)
                    .any(|w| w[0] == b"--id" && w[1] == id.as_bytes())
        })
        .and_then(|e| std::fs::read_to_string(e.path().join(file)).ok())
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// An `mvmd` of its own for one test, driven with `mvm --host`; [`MvmdSession::finish`] removes
/// what the test left running, stops the daemon and checks that nothing is left behind.
struct MvmdSession {
    dirs: ManagerDirs,
    before: Baseline,
    daemon: Daemon,
    host: String,
}

impl MvmdSession {
    fn start(ctx: &Ctx, tag: &str) -> Result<Self, String> {
        Self::start_in(ctx, ManagerDirs::new(ctx, tag)?)
    }

    /// An mvmd on `dirs` (with their extra environment).
    fn start_in(ctx: &Ctx, dirs: ManagerDirs) -> Result<Self, String> {
        let before = Baseline::now();
        let (daemon, host) = start_mvmd(ctx, &dirs)?;
        Ok(MvmdSession {
            dirs,
            before,
            daemon,
            host,
        })
    }

    /// Runs `mvm --host <this mvmd> ARGS` with `stdin`; returns its stdout, or why it did not
    /// exit 0.
    fn mvm(&self, ctx: &Ctx, args: &[&str], stdin: Option<&[u8]>) -> Result<String, String> {
        let mut cmd = std::process::Command::new(&ctx.mvm);
        self.dirs.apply(ctx, &mut cmd);
        cmd.arg("--host").arg(&self.host).args(args);
        let (code, out, err) = run_cli(cmd, stdin)?;
        if code != 0 {
            return Err(format!(
                "mvm {}: exit {code}, stdout {:?}, stderr: {}",
                args.join(" "),
                out.trim(),
                err.trim()
            ));
        }
        Ok(out)
    }

    /// Stops mvmd and starts it again on the same directories (its log starts anew): what
    /// it keeps of its sandboxes is what a new mvmd finds.
    fn restart(&mut self, ctx: &Ctx) -> Result<(), String> {
        self.restart_after(ctx, || Ok(()))
    }

    /// [`restart`](Self::restart), doing `between` while mvmd is stopped.
    fn restart_after(
        &mut self,
        ctx: &Ctx,
        between: impl FnOnce() -> Result<(), String>,
    ) -> Result<(), String> {
        let log = self.dirs.log();
        std::mem::replace(&mut self.daemon, Daemon { child: None, log }).finish();
        between()?;
        let (daemon, host) = start_mvmd(ctx, &self.dirs)?;
        (self.daemon, self.host) = (daemon, host);
        Ok(())
    }

    /// mvmd's API socket.
    fn socket(&self) -> PathBuf {
        self.dirs.socket()
    }

    /// What mvmd has logged so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dirs.log()).unwrap_or_default()
    }

    /// The token mvmd wrote to its state directory (its default tenant's).
    fn token(&self) -> Result<String, String> {
        let path = self.dirs.root.join("state/token");
        std::fs::read_to_string(&path)
            .map(|t| t.trim().to_owned())
            .map_err(|e| format!("mvmd's token {}: {e}", path.display()))
    }

    /// `GET path` on mvmd's socket with its token; returns the whole answer (status line,
    /// headers and body, at most 4 MiB).
    fn get(&self, path: &str) -> Result<String, String> {
        self.exchange("GET", path, None)
    }

    /// `METHOD path` with a JSON `body` on mvmd's socket with its token: the answer's status
    /// and body (at most 4 MiB; a chunked one put together).
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<(u16, String), String> {
        let answer = self.exchange(method, path, body)?;
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("{method} {path}: no HTTP answer: {answer:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("{method} {path}: no status in {head:?}"))?;
        match head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            true => dechunked(body)
                .map(|body| (status, body))
                .ok_or_else(|| format!("{method} {path}: a bad chunked answer: {answer:?}")),
            false => Ok((status, body.to_owned())),
        }
    }

    /// Sends `METHOD path` (with a JSON `body`) on mvmd's socket with its token and returns
    /// the whole answer (status line, headers and body, at most 4 MiB).
    fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<String, String> {
        use std::io::{Read as _, Write as _};
        let socket = self.socket();
        let mut conn = std::os::unix::net::UnixStream::connect(&socket)
            .map_err(|e| format!("{}: {e}", socket.display()))?;
        conn.set_read_timeout(Some(CLI_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let body = body.map(ToString::to_string).unwrap_or_default();
        write!(
            conn,
            "{method} {path} HTTP/1.1\r\nHost: mvmd\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.token()?,
            body.len()
        )
        .map_err(|e| format!("{method} {path}: {e}"))?;
        let mut answer = String::new();
        conn.take(4 << 20)
            .read_to_string(&mut answer)
            .map_err(|e| format!("the answer to {method} {path}: {e}"))?;
        Ok(answer)
    }

    /// The sandboxes this mvmd lists (`mvm ps -o json`).
    fn list(&self, ctx: &Ctx) -> Result<Vec<serde_json::Value>, String> {
        let out = self.mvm(ctx, &["-o", "json", "ps"], None)?;
        match serde_json::from_str(&out) {
            Ok(serde_json::Value::Array(list)) => Ok(list),
            _ => Err(format!("mvm ps -o json printed no JSON array: {out:?}")),
        }
    }

    /// Creates a running vm-tier sandbox with `mvm run --isolation vm EXTRA -- true` (no
    /// `--rm`); returns its record as `mvm ps -o json` shows it.
    fn create_vm(&self, ctx: &Ctx, extra: &[&str]) -> Result<serde_json::Value, String> {
        let known: Vec<serde_json::Value> = self
            .list(ctx)?
            .into_iter()
            .map(|s| s["id"].clone())
            .collect();
        let mut args = vec!["run", "--isolation", "vm"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "true"]);
        self.mvm(ctx, &args, None)?;
        let mut new: Vec<serde_json::Value> = self
            .list(ctx)?
            .into_iter()
            .filter(|s| !known.contains(&s["id"]))
            .collect();
        match (new.pop(), new.is_empty()) {
            (Some(sandbox), true) if sandbox["id"].is_string() => Ok(sandbox),
            _ => Err(format!(
                "after mvm {} mvm ps does not show exactly one new sandbox",
                args.join(" ")
            )),
        }
    }

    /// Removes every sandbox still listed (a failed test's), stops mvmd and checks for
    /// leftovers; folds all of it into the test's outcome.
    fn finish(self, ctx: &Ctx, checked: Result<(), String>) -> Outcome {
        let mut cleanup = Vec::new();
        match self.list(ctx) {
            Ok(list) => {
                for sandbox in list {
                    let id = sandbox["id"].as_str().unwrap_or_default().to_string();
                    if let Err(why) = self.mvm(ctx, &["rm", &id], None) {
                        cleanup.push(why);
                    }
                }
            }
            Err(why) => cleanup.push(why),
        }
        let log = self.daemon.finish();
        let left = self.dirs.leftovers(&self.before);
        if !left.is_empty() {
            cleanup.push(format!("mvmd left behind: {}", left.join(", ")));
        }
        match (checked, cleanup.is_empty()) {
            (Ok(()), true) => Ok(Verdict::Pass),
            (Ok(()), false) => Err(format!("{}; mvmd: {log}", cleanup.join("; "))),
            (Err(why), _) => Err(format!(
                "{why}{}; mvmd: {log}",
                cleanup
                    .iter()
                    .map(|c| format!("; and {c}"))
                    .collect::<String>()
            )),
        }
    }
}

/// The id of a sandbox record from `mvm ps -o json`.
/// The body of an HTTP/1.1 chunked `body` (chunks of hexadecimal length, each line ending in
/// CRLF, up to the last chunk of length 0); `None` when it is cut short or malformed.
fn dechunked(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size..)?.strip_prefix("\r\n")?;
    }
}

fn sandbox_id(sandbox: &serde_json::Value) -> String {
    sandbox["id"].as_str().unwrap_or_default().to_string()
}

/// The hex MD5 of `data`, by this host's `md5sum`.
fn local_md5(data: &[u8]) -> Result<String, String> {
    let mut md5 = std::process::Command::new("md5sum");
    md5.arg("-");
    match run_cli(md5, Some(data))? {
        (0, out, _) => out
            .split_whitespace()
            .next()
            .map(str::to_string)
            .ok_or_else(|| "md5sum printed nothing".to_string()),
        (code, _, err) => Err(format!("md5sum exited {code}: {}", err.trim())),
    }
}

/// Through mvmd: `mvm cp` a random 1 MiB file into a running vm sandbox and back out; the copy
/// back is byte-identical, and `md5sum` inside the guest prints the host file's digest.
fn files_in_and_out(ctx: &mut Ctx) -> Outcome {
    const SIZE: usize = 1 << 20;
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let session = MvmdSession::start(ctx, "cp")?;
    let ctx = &*ctx;
    let checked = (|| {
        let mut data = vec![0u8; SIZE];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut data))
            .map_err(|e| format!("reading /dev/urandom: {e}"))?;
        let want = local_md5(&data)?;
        let inside = session.dirs.root.join("blob.in");
        let outside = session.dirs.root.join("blob.out");
        std::fs::write(&inside, &data).map_err(|e| format!("writing {}: {e}", inside.display()))?;
        let id = sandbox_id(&session.create_vm(ctx, &[])?);
        let remote = format!("{id}:/root/blob");
        session.mvm(ctx, &["cp", &inside.to_string_lossy(), &remote], None)?;
        let guest = session.mvm(ctx, &["exec", &id, "--", "md5sum", "/root/blob"], None)?;
        if guest.split_whitespace().next() != Some(want.as_str()) {
            return Err(format!(
                "md5sum in the guest printed {:?}; the host file's md5 is {want}",
                guest.trim()
            ));
        }
        session.mvm(ctx, &["cp", &remote, &outside.to_string_lossy()], None)?;
        let back =
            std::fs::read(&outside).map_err(|e| format!("reading {}: {e}", outside.display()))?;
        if back != data {
            return Err(format!(
                "the file copied back out differs: {} bytes, md5 {}; sent {SIZE} bytes, md5 {want}",
                back.len(),
                local_md5(&back)?
            ));
        }
        session.mvm(ctx, &["rm", &id], None).map(drop)
    })();
    session.finish(ctx, checked)
}

/// A vm-tier sandbox gives back the memory its guest frees (the balloon's free page reporting):
/// 64 MiB written to a file in the guest grow its VMM's anonymous memory; once the file is
/// removed, the guest reports the freed blocks and the VMM's anonymous memory falls by at
/// least half of that again within 30 s.
fn freed_guest_memory_goes_back(ctx: &mut Ctx) -> Outcome {
    const FILL_MIB: u64 = 64;
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let session = MvmdSession::start(ctx, "balloon")?;
    let checked = (|| {
        let id = sandbox_id(&session.create_vm(ctx, &[])?);
        let anon = || vmm_kib(&id, "status", "RssAnon:");
        let fill = format!("dd if=/dev/zero of=/tmp/fill bs=1048576 count={FILL_MIB} 2>&1");
        session.mvm(ctx, &["exec", &id, "--", "sh", "-c", &fill], None)?;
        let filled = anon();
        session.mvm(ctx, &["exec", &id, "--", "rm", "/tmp/fill"], None)?;
        let started = Instant::now();
        let mut now = anon();
        while filled.saturating_sub(now) < FILL_MIB * 1024 / 2
            && started.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(250));
            now = anon();
        }
        if filled == 0 || filled.saturating_sub(now) < FILL_MIB * 1024 / 2 {
            return Err(format!(
                "the VMM's anonymous memory went from {filled} kB with a {FILL_MIB} MiB file in \
                 the guest to {now} kB 30 s after its removal: the freed memory did not come back"
            ));
        }
        let given_back = started.elapsed();
        session.mvm(ctx, &["rm", &id], None)?;
        Ok((filled, now, given_back))
    })();
    let figures = checked.as_ref().ok().copied();
    let outcome = session.finish(ctx, checked.map(drop));
    if let (Ok(Verdict::Pass), Some((filled, now, given_back))) = (&outcome, figures) {
        ctx.record(
            &format!("vm tier: VMM anonymous memory with a {FILL_MIB} MiB guest file / after its removal"),
            format!(
                "{} / {} MiB (given back in {} ms)",
                filled / 1024,
                now / 1024,
                given_back.as_millis()
            ),
        );
    }
    outcome
}

/// Two vm sandboxes from the default template: a file sandbox A writes over the base image's
/// /etc is visible in A only, not in B; the template's read-only base image on the host is
/// byte-identical before and after.
fn writable_layer_isolation(ctx: &mut Ctx) -> Outcome {
    const PROBE: &str = "/etc/mvm-isolation-probe";
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let session = MvmdSession::start(ctx, "layer")?;
    let ctx = &*ctx;
    let checked = (|| {
        let base_before = fingerprint(&ctx.rootfs)?;
        let a = sandbox_id(&session.create_vm(ctx, &[])?);
        let b = sandbox_id(&session.create_vm(ctx, &[])?);
        let write = format!("echo written-by-{a} > {PROBE} && sync && cat {PROBE}");
        let out = session.mvm(ctx, &["exec", &a, "--", "sh", "-c", &write], None)?;
        if out.trim() != format!("written-by-{a}") {
            return Err(format!(
                "sandbox A could not write {PROBE}: it printed {:?}",
                out.trim()
            ));
        }
        let probe = format!("if [ -e {PROBE} ]; then cat {PROBE}; else echo absent; fi");
        let seen_in_b = session.mvm(ctx, &["exec", &b, "--", "sh", "-c", &probe], None)?;
        if seen_in_b.trim() != "absent" {
            return Err(format!(
                "sandbox B sees the file sandbox A wrote to {PROBE}: {:?}",
                seen_in_b.trim()
            ));
        }
        let seen_in_a = session.mvm(ctx, &["exec", &a, "--", "sh", "-c", &probe], None)?;
        if seen_in_a.trim() != format!("written-by-{a}") {
            return Err(format!(
                "sandbox A lost its own {PROBE}: {:?}",
                seen_in_a.trim()
            ));
        }
        session.mvm(ctx, &["rm", &a, &b], None)?;
        let base_after = fingerprint(&ctx.rootfs)?;
        if base_after != base_before {
            return Err(format!(
                "the template's base image {} changed: (length, FNV-1a) {base_before:?} before, \
                 {base_after:?} after",
                ctx.rootfs.display()
            ));
        }
        Ok(())
    })();
    session.finish(ctx, checked)
}

/// The sandbox manager's fixed sandbox subnet (`ManagerConfig::subnet`): every sandbox's host
/// end lies in it.
const SANDBOX_SUBNET: &str = "10.213.0.0/16";

/// A TCP listener on `addr` in this host that greets every connection and counts them.
struct Greeter {
    port: u16,
    accepted: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Greeter {
    const GREETING: &'static str = "reached-host";

    fn listen(addr: &str) -> Result<Self, String> {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let listener = std::net::TcpListener::bind((addr, 0))
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("listener on {addr}: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("listener on {addr}: {e}"))?
            .port();
        let accepted = std::sync::Arc::new(AtomicUsize::new(0));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let (count, done) = (accepted.clone(), stop.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut sock, _)) => {
                        count.fetch_add(1, Ordering::SeqCst);
                        let _ = std::io::Write::write_all(
                            &mut sock,
                            format!("{}\n", Self::GREETING).as_bytes(),
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(Greeter {
            port,
            accepted,
            stop,
        })
    }

    fn accepted(&self) -> usize {
        self.accepted.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for Greeter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Runs `ip ARGS` (whitespace-separated); an error names the command and its stderr.
fn ip(args: &str) -> Result<(), String> {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(args.split_whitespace());
    let (code, _, err) = run_cli(cmd, None)?;
    if code == 0 {
        Ok(())
    } else {
        Err(format!("ip {args}: exit {code}: {}", err.trim()))
    }
}

/// The IPv4 address of this host's end of a sandbox's network: the host-side veth of sandbox `id`.
fn host_end(id: &str) -> Result<String, String> {
    let veth = format!("mv{}", &id[..id.len().min(13)]);
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["-o", "-4", "addr", "show", "dev", &veth]);
    let (code, out, err) = run_cli(cmd, None)?;
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|cidr| cidr.split('/').next())
        .filter(|_| code == 0)
        .map(str::to_string)
        .ok_or_else(|| {
            format!(
                "no IPv4 address on the host veth {veth} of sandbox {id}: exit {code}, {out:?} {}",
                err.trim()
            )
        })
}

/// Egress policy of the vm tier, all traffic inside this host: a sandbox with `--egress allow
/// --allow <sandbox subnet>` connects to a listener on the host end of its own network; from
/// one with `--egress none` (no NIC) and one with `--egress allow` for another address, the
/// same listener sees no connection.
fn egress_none_vs_allow(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let session = MvmdSession::start(ctx, "egress")?;
    let ctx = &*ctx;
    let checked = (|| {
        let allowed = session.create_vm(ctx, &["--egress", "allow", "--allow", SANDBOX_SUBNET])?;
        let allowed = sandbox_id(&allowed);
        let other = session.create_vm(ctx, &["--egress", "allow", "--allow", "192.0.2.1/32"])?;
        let other = sandbox_id(&other);
        let none = session.create_vm(ctx, &["--egress", "none"])?;
        let none_net = &none["network"];
        if !none_net["address"].is_null() || !none_net["gateway"].is_null() {
            return Err(format!(
                "a sandbox with egress none has a network: {none_net}"
            ));
        }
        let none = sandbox_id(&none);
        let host = host_end(&allowed)?;
        let greeter = Greeter::listen(&host)?;
        let connect = format!("nc -w 3 {host} {} </dev/null; echo rc=$?", greeter.port);
        let out = session.mvm(ctx, &["exec", &allowed, "--", "sh", "-c", &connect], None)?;
        if !out.contains(Greeter::GREETING) || greeter.accepted() != 1 {
            return Err(format!(
                "the sandbox allowed {SANDBOX_SUBNET} could not reach {host}:{}: it printed {:?}, \
                 the listener accepted {} connections",
                greeter.port,
                out.trim(),
                greeter.accepted()
            ));
        }
        for (what, id) in [
            ("egress none", &none),
            ("egress allow 192.0.2.1/32", &other),
        ] {
            let out = session.mvm(ctx, &["exec", id, "--", "sh", "-c", &connect], None)?;
            if out.contains(Greeter::GREETING) || out.contains("rc=0") || greeter.accepted() != 1 {
                return Err(format!(
                    "the sandbox with {what} reached {host}:{}: it printed {:?}, the listener \
                     accepted {} connections in all",
                    greeter.port,
                    out.trim(),
                    greeter.accepted()
                ));
            }
        }
        session
            .mvm(ctx, &["rm", &allowed, &other, &none], None)
            .map(drop)
    })();
    session.finish(ctx, checked)
}

/// A default template whose base image boots but never starts the agent: its /sbin/init only
/// sleeps (so the guest neither answers nor exits). Daemonless `mvm run --rm --isolation vm`
/// fails once the manager's start-up timeout (30 s) expires, with exit 125 and an error naming
/// the sandbox agent, and leaves nothing behind (VMM, jail, cgroups, netns, mounts, links).
/// The error is the last vsock connect error; it does not carry the guest's console.
fn guest_without_agent(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("the vm tier of mvm needs root".into()));
    }
    let dirs = ManagerDirs::new(ctx, "noagent")?;
    let artifacts = dirs.root.join("artifacts");
    let tree = dirs.root.join("tree");
    let prepare = || -> std::io::Result<()> {
        std::fs::create_dir_all(&artifacts)?;
        for dir in ["bin", "sbin", "dev", "proc", "tmp"] {
            std::fs::create_dir_all(tree.join(dir))?;
        }
        std::fs::copy(&ctx.vmlinux, artifacts.join("vmlinux"))?;
        std::fs::copy("/bin/busybox", tree.join("bin/busybox"))?;
        std::os::unix::fs::symlink("busybox", tree.join("bin/sh"))?;
        let init = tree.join("sbin/init");
        std::fs::write(
            &init,
            "#!/bin/sh\necho no-agent-init-sleeps\nexec /bin/busybox sleep 1000\n",
        )?;
        std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))
    };
    prepare().map_err(|e| {
        format!(
            "preparing the agent-less template under {}: {e}",
            dirs.root.display()
        )
    })?;
    let image = artifacts.join("rootfs.ext4");
    let mut mkfs = std::process::Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(&image)
        .arg("16M");
    match run_cli(mkfs, None)? {
        (0, _, _) => {}
        (code, _, err) => return Err(format!("mkfs.ext4 -d exited {code}: {}", err.trim())),
    }
    let before = Baseline::now();
    let mut cmd = std::process::Command::new(&ctx.mvm);
    dirs.apply(ctx, &mut cmd);
    cmd.env("MVM_ARTIFACTS", &artifacts)
        .args(["run", "--rm", "--isolation", "vm", "--", "true"]);
    let started = std::time::Instant::now();
    let (code, out, err) = run_cli(cmd, None)?;
    let elapsed = started.elapsed();
    let checked = if code != i32::from(EXIT_MVM_FAILED) || !err.contains("sandbox agent") {
        Err(format!(
            "mvm run with a guest that never starts its agent: exit {code} (expected \
             {EXIT_MVM_FAILED}), stdout {:?}, stderr (expected an error naming the sandbox \
             agent): {}",
            out.trim(),
            err.trim()
        ))
    } else {
        println!(
            "nested: INFO a guest without agent fails the create with: {}",
            err.trim()
        );
        Ok(())
    };
    let left = dirs.leftovers(&before);
    match (checked, left.is_empty()) {
        (Ok(()), true) => {
            ctx.record(
                "mvm run, guest without agent: start -> create error (vm, daemonless)",
                ms(elapsed),
            );
            Ok(Verdict::Pass)
        }
        (Ok(()), false) => Err(format!(
            "the failed create left behind: {}",
            left.join(", ")
        )),
        (Err(why), true) => Err(why),
        (Err(why), false) => Err(format!("{why}; and it left behind: {}", left.join(", "))),
    }
}

/// Loads a group of kernel modules run.sh unpacked into L1 without loading them at boot
/// (listed in `/lib/modules/on-demand-<group>`, dependencies first): `tc` (tc's ingress qdisc,
/// u32 filter and mirred action) and `net` (virtio-net for L1's user-mode NIC). Nothing to do
/// without the list (direct mode: the host's tools load what they need).
fn load_on_demand_modules(group: &str) -> Result<(), String> {
    let Ok(list) = std::fs::read_to_string(format!("/lib/modules/on-demand-{group}")) else {
        return Ok(());
    };
    for module in list.lines().filter(|l| !l.is_empty()) {
        let loaded = Path::new("/sys/module")
            .join(module.trim_end_matches(".ko").replace('-', "_"))
            .exists();
        if loaded {
            continue;
        }
        let status = std::process::Command::new("insmod")
            .arg(Path::new("/lib/modules").join(module))
            .status()
            .map_err(|e| format!("insmod {module}: {e}"))?;
        if !status.success() {
            return Err(format!("insmod {module}: {status}"));
        }
    }
    Ok(())
}

/// Exit status of `mvm` when mvm itself (not the sandboxed command) failed.
const EXIT_MVM_FAILED: u8 = 125;

/// Starts `mvmd` on a socket in `dirs`; returns it and the `--host` value that reaches it.
fn start_mvmd(ctx: &Ctx, dirs: &ManagerDirs) -> Result<(Daemon, String), String> {
    let socket = dirs.socket();
    // A file, not a pipe: nobody reads a pipe while the daemon runs, and a full one would
    // stop it at its next log line.
    let log = dirs.log();
    let output = std::fs::File::create(&log)
        .and_then(|file| Ok((file.try_clone()?, file)))
        .map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let mut daemon = std::process::Command::new(&ctx.mvmd);
    dirs.apply(ctx, &mut daemon);
    daemon
        .arg("--socket")
        .arg(&socket)
        .args(&dirs.mvmd_args)
        .stdin(std::process::Stdio::null())
        .stdout(output.0)
        .stderr(output.1);
    let daemon = Daemon {
        child: Some(
            daemon
                .spawn()
                .map_err(|e| format!("cannot start mvmd: {e}"))?,
        ),
        log,
    };
    if !mvm_testkit::wait_for_socket(&socket, Duration::from_secs(30)) {
        return Err(format!(
            "mvmd did not serve {} within 30 s: {}",
            socket.display(),
            daemon.finish()
        ));
    }
    Ok((daemon, format!("unix:{}", socket.display())))
}

/// A running mvmd writing its log to `log`; stopped with SIGTERM (SIGKILL after 10 s) by
/// [`Daemon::finish`] or on drop.
struct Daemon {
    child: Option<std::process::Child>,
    log: PathBuf,
}

impl Daemon {
    /// Stops the daemon; returns the last lines of its log, for a failure report.
    fn finish(mut self) -> String {
        let Some(child) = self.child.take() else {
            return String::new();
        };
        let status = stop_daemon(child);
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join(" | ");
        match status {
            Some(status) => format!("mvmd exited with {status}; its log ends: {tail}"),
            None => format!("mvmd ignored SIGTERM for 10 s and was killed; its log ends: {tail}"),
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            if stop_daemon(child).is_none() {
                eprintln!("nested: mvmd ignored SIGTERM for 10 s and was killed");
            }
        }
    }
}

/// SIGTERM, then SIGKILL after 10 s; the exit status unless it had to be killed.
fn stop_daemon(child: std::process::Child) -> Option<std::process::ExitStatus> {
    // SAFETY: kill(2) on our own unreaped child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    mvm_testkit::wait_with_timeout(child, Duration::from_secs(10)).status
}

/// (length, FNV-1a 64) of a file's contents.
fn fingerprint(path: &Path) -> Result<(usize, u64), String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    Ok((bytes.len(), hash))
}

/// The release in the `Linux version <release> (...)` banner of a vmlinux.
fn kernel_release(vmlinux: &Path) -> Result<String, String> {
    let image =
        std::fs::read(vmlinux).map_err(|e| format!("cannot read {}: {e}", vmlinux.display()))?;
    let needle = b"Linux version ";
    image
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| w == needle)
        .map(|(i, _)| &image[i + needle.len()..])
        .find(|rest| rest.first().is_some_and(u8::is_ascii_digit))
        .map(|rest| {
            let end = rest
                .iter()
                .position(|&b| b == b' ' || b == 0)
                .unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end]).into_owned()
        })
        .ok_or_else(|| {
            format!(
                "{} has no \"Linux version\" banner: is it a Linux vmlinux?",
                vmlinux.display()
            )
        })
}

/// (max leaf, vendor) of this CPU's hypervisor leaf 0x40000000, as mvm-vmm's TCG check reads it.
fn hypervisor_cpuid() -> (u32, String) {
    let leaf = std::arch::x86_64::__cpuid(0x4000_0000);
    let mut vendor = Vec::with_capacity(12);
    for reg in [leaf.ebx, leaf.ecx, leaf.edx] {
        vendor.extend_from_slice(&reg.to_le_bytes());
    }
    (
        leaf.eax,
        String::from_utf8_lossy(&vendor)
            .trim_end_matches('\0')
            .to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::dechunked;

    #[test]
    fn a_chunked_body_is_put_together_and_a_cut_one_refused() {
        let body = "7\r\n{\"a\": 1\r\n1;ext=1\r\n}\r\n0\r\n\r\n";
        assert_eq!(dechunked(body).as_deref(), Some("{\"a\": 1}"));
        assert_eq!(dechunked("7\r\n{\"a\""), None);
        assert_eq!(dechunked("zz\r\n"), None);
    }
}
