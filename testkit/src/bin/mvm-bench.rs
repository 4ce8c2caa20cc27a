//! `mvm-bench vmm`: start-up and memory figures of mvm-vmm with the assembly test guests.
//! Prints figures; asserts nothing (performance is tracked, not tested).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mvm_testkit::{binary, config_for, guest, wait_for_socket, ScratchDir};

const RUNS: usize = 30;

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(|a, b| a.total_cmp(b));
    let index = ((samples.len() as f64 - 1.0) * p).round() as usize;
    samples[index]
}

fn report(name: &str, mut samples: Vec<f64>) {
    let p50 = percentile(&mut samples, 0.5);
    let p99 = percentile(&mut samples, 0.99);
    println!(
        "{name:<44} p50 {p50:>7.2} ms   p99 {p99:>7.2} ms   (n={})",
        samples.len()
    );
}

/// exec → the API socket accepts connections.
fn api_ready() -> Vec<f64> {
    (0..RUNS)
        .map(|_| {
            let dir = ScratchDir::new("bench-api");
            let socket = dir.path().join("api.sock");
            let start = Instant::now();
            let mut child = Command::new(binary("mvm-vmm"))
                .arg("--api-sock")
                .arg(&socket)
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn mvm-vmm");
            assert!(wait_for_socket(&socket, Duration::from_secs(10)));
            let ms = start.elapsed().as_secs_f64() * 1e3;
            let _ = child.kill();
            let _ = child.wait();
            ms
        })
        .collect()
}

/// mvm-jailer → the jailed VMM's API socket accepts connections (v1 cgroups, no pid namespace).
fn jailed_api_ready() -> Vec<f64> {
    let base = ScratchDir::new("bench-jail");
    (0..RUNS)
        .map(|n| {
            let id = format!("bench-{}-{n}", std::process::id());
            let socket = base
                .path()
                .join("mvm-vmm")
                .join(&id)
                .join("root/run/api.sock");
            let start = Instant::now();
            let mut child = Command::new(binary("mvm-jailer"))
                .args([
                    "--id",
                    &id,
                    "--uid",
                    "40999",
                    "--gid",
                    "40999",
                    "--exec-file",
                ])
                .arg(binary("mvm-vmm"))
                .arg("--chroot-base-dir")
                .arg(base.path())
                .args([
                    "--parent-cgroup",
                    "mvm-bench",
                    "--cgroup",
                    "memory.limit_in_bytes=268435456",
                ])
                .args([
                    "--cgroup",
                    "pids.max=64",
                    "--",
                    "--api-sock",
                    "/run/api.sock",
                ])
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn mvm-jailer");
            assert!(
                wait_for_socket(&socket, Duration::from_secs(10)),
                "jailed API never came up"
            );
            let ms = start.elapsed().as_secs_f64() * 1e3;
            let _ = child.kill();
            let _ = child.wait();
            let cleanup = Command::new(binary("mvm-jailer"))
                .args([
                    "--cleanup",
                    "--id",
                    &id,
                    "--parent-cgroup",
                    "mvm-bench",
                    "--chroot-base-dir",
                ])
                .arg(base.path())
                .output()
                .expect("mvm-jailer --cleanup");
            assert!(
                cleanup.status.success(),
                "{}",
                String::from_utf8_lossy(&cleanup.stderr)
            );
            ms
        })
        .collect()
}

/// exec → first console byte, and exec → process exit after the guest's reset.
fn serial_and_exit() -> (Vec<f64>, Vec<f64>) {
    let dir = ScratchDir::new("bench-boot");
    let config = dir.path().join("vm.json");
    std::fs::write(
        &config,
        config_for(&guest("hello"), "console=ttyS0", 1, 128).to_string(),
    )
    .unwrap();
    (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            let mut child = Command::new(binary("mvm-vmm"))
                .args(["--no-api", "--config-file"])
                .arg(&config)
                .stdout(Stdio::piped())
                .spawn()
                .expect("spawn mvm-vmm");
            let mut byte = [0u8; 1];
            child
                .stdout
                .as_mut()
                .unwrap()
                .read_exact(&mut byte)
                .expect("a console byte");
            let first = start.elapsed().as_secs_f64() * 1e3;
            let status = child.wait().expect("wait");
            assert!(status.success());
            (first, start.elapsed().as_secs_f64() * 1e3)
        })
        .unzip()
}

/// Resident and proportional memory of a VMM running a 128 MiB guest, and how much of it is
/// not guest memory.
fn memory() {
    let dir = ScratchDir::new("bench-mem");
    let config = dir.path().join("vm.json");
    std::fs::write(
        &config,
        config_for(&guest("spin"), "console=ttyS0", 1, 128).to_string(),
    )
    .unwrap();
    let mut child = Command::new(binary("mvm-vmm"))
        .args(["--no-api", "--config-file"])
        .arg(&config)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn mvm-vmm");
    std::thread::sleep(Duration::from_millis(500));
    let pid = child.id();
    let rollup =
        std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("smaps_rollup");
    let field = |text: &str, name: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    // The guest RAM is the one 128 MiB mapping: its header line, then its Rss line.
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps");
    let guest_rss = smaps
        .lines()
        .skip_while(|line| !is_guest_mapping(line))
        .find(|line| line.starts_with("Rss:"))
        .map_or(0, |line| field(line, "Rss:"));
    let rss = field(&rollup, "Rss:");
    let pss = field(&rollup, "Pss:");
    println!(
        "{:<44} {:>7.2} MiB",
        "VMM RSS, 128 MiB guest",
        rss as f64 / 1024.0
    );
    println!(
        "{:<44} {:>7.2} MiB",
        "VMM PSS, 128 MiB guest",
        pss as f64 / 1024.0
    );
    println!(
        "{:<44} {:>7.2} MiB",
        "  of which guest-touched pages",
        guest_rss as f64 / 1024.0
    );
    println!(
        "{:<44} {:>7.2} MiB",
        "VMM overhead beyond guest pages (RSS)",
        (rss - guest_rss) as f64 / 1024.0
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether an smaps header line describes a mapping of exactly the guest's 128 MiB.
fn is_guest_mapping(line: &str) -> bool {
    let Some((lo, hi)) = line
        .split_whitespace()
        .next()
        .and_then(|r| r.split_once('-'))
    else {
        return false;
    };
    match (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
        (Ok(lo), Ok(hi)) => hi - lo == 128 << 20,
        _ => false,
    }
}

fn main() {
    let what = std::env::args().nth(1).unwrap_or_else(|| "vmm".into());
    match what.as_str() {
        "vmm" => {
            if let Err(why) = mvm_testkit::kvm() {
                eprintln!("mvm-bench vmm needs /dev/kvm: {why}");
                std::process::exit(1);
            }
            println!(
                "mvm-vmm start-up (static debug-profile binary, opt-level 1; kvm: {:?})",
                mvm_testkit::kvm().unwrap()
            );
            report("exec → API socket ready", api_ready());
            let (first, exit) = serial_and_exit();
            report("exec → first guest serial byte", first);
            report("exec → exit after guest reset", exit);
            memory();
        }
        "jailer" => {
            if !mvm_testkit::is_root() {
                eprintln!("mvm-bench jailer needs root (namespaces, cgroups)");
                std::process::exit(1);
            }
            let mut bare = api_ready();
            let mut jailed = jailed_api_ready();
            let (bare_p50, jailed_p50) = (percentile(&mut bare, 0.5), percentile(&mut jailed, 0.5));
            report("bare mvm-vmm → API socket ready", bare);
            report("mvm-jailer → jailed mvm-vmm API ready", jailed);
            println!(
                "{:<44} {:>7.2} ms (p50 difference)",
                "jailer's added time",
                jailed_p50 - bare_p50
            );
        }
        other => {
            eprintln!("unknown benchmark {other:?}: use `mvm-bench vmm` or `mvm-bench jailer`");
            std::process::exit(2);
        }
    }
}
