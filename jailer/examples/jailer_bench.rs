//! Jailer overhead benchmark (root needed):
//! `cargo build -p jailer --bins --examples && target/x86_64-unknown-linux-gnu/debug/examples/jailer_bench [ITERATIONS [CHROOT_BASE]]`.
//!
//! Prints, in milliseconds (median and p90 over the iterations):
//! - start latency: from spawning the command to the first instruction of the target
//!   (`jail-probe stamp` prints CLOCK_MONOTONIC at start), bare and through `mvm-jailer`
//!   (no cgroups; v1 cgroups; v1 cgroups + new pid namespace; that + procfs and devpts, the
//!   jail tier's set), and the jailer's added time;
//! - round trip: spawn to exit status collected (includes namespace teardown);
//! - the cost of v1 cgroup setup alone, in process: `Jail::prepare` with minus without cgroups.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use jailer::{CleanupConfig, Jail, JailConfig};

const PARENT: &str = "mvm-bench";
const CGROUPS: [&str; 4] = [
    "memory.limit_in_bytes=268435456",
    "pids.max=64",
    "cpu.cfs_quota_us=50000",
    "cpu.shares=512",
];

fn monotonic_ns() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

/// (min, median, p90) in milliseconds. The minimum is the cost on an idle machine; the median
/// and p90 show the noise of whatever else runs on the (2 shared) cores.
fn stats(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p90 = (v.len() * 9 / 10).min(v.len() - 1);
    (ms(v[0]), ms(v[v.len() / 2]), ms(v[p90]))
}

fn bin(name: &str) -> PathBuf {
    std::env::current_exe()
        .expect("current exe")
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .join(name)
}

/// Runs `cmd` (whose target is `jail-probe stamp`): (spawn → target start, spawn → exit).
fn time_stamp(cmd: &mut Command) -> (Duration, Duration) {
    let t0 = monotonic_ns();
    let out = cmd.output().expect("spawn");
    let t_end = monotonic_ns();
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let started: u128 = text
        .lines()
        .find_map(|l| l.strip_prefix("monotonic_ns="))
        .and_then(|v| v.parse().ok())
        .expect("probe stamp");
    let ns = |n: u128| Duration::from_nanos(n as u64);
    (ns(started - t0), ns(t_end - t0))
}

fn row(
    name: &str,
    start: Vec<Duration>,
    total: Vec<Duration>,
    bare: Option<(f64, f64)>,
) -> (f64, f64) {
    let (s_min, s_med, s_p90) = stats(start);
    let (_, t_med, _) = stats(total);
    let added = bare.map_or(String::new(), |(b_min, b_med)| {
        format!(
            "  added: min {:5.2} median {:5.2} ms",
            s_min - b_min,
            s_med - b_med
        )
    });
    println!(
        "{name:<40} start: min {s_min:5.2} median {s_med:6.2} p90 {s_p90:6.2} ms  round trip median {t_med:6.2} ms{added}"
    );
    (s_min, s_med)
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED jailer bench: needs root");
        return;
    }
    let iterations: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let (jailer, probe) = (bin("mvm-jailer"), bin("jail-probe"));
    for b in [&jailer, &probe] {
        assert!(
            b.exists(),
            "{} missing: cargo build -p jailer --bins first",
            b.display()
        );
    }
    // Optional second argument: the chroot base dir (e.g. on a tmpfs); default under /tmp.
    let base = std::env::args()
        .nth(2)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("mvm-jailer-bench-{}", std::process::id()));
    let probe_kib = std::fs::metadata(&probe).expect("probe").len() / 1024;
    println!("jailer bench: {iterations} iterations; target = jail-probe ({probe_kib} KiB static binary, copied into every jail)");

    let (start, total): (Vec<_>, Vec<_>) = (0..iterations)
        .map(|_| time_stamp(Command::new(&probe).arg("stamp")))
        .unzip();
    let bare = row("bare exec of the target", start, total, None);

    let with_cgroups = |flags: &[&'static str]| -> Vec<&'static str> {
        CGROUPS
            .iter()
            .flat_map(|c| ["--cgroup", c])
            .chain(flags.iter().copied())
            .collect()
    };
    let variants: [(&str, Vec<&str>); 5] = [
        ("jailed, no cgroups", vec![]),
        ("jailed, v1 cgroups (memory, pids, cpu)", with_cgroups(&[])),
        (
            "jailed, v1 cgroups + --new-pid-ns",
            with_cgroups(&["--new-pid-ns"]),
        ),
        (
            "  ... + --mount-proc",
            with_cgroups(&["--new-pid-ns", "--mount-proc"]),
        ),
        (
            "  ... + --mount-proc --mount-devpts",
            with_cgroups(&["--new-pid-ns", "--mount-proc", "--mount-devpts"]),
        ),
    ];
    for (name, extra) in variants {
        let (start, total): (Vec<_>, Vec<_>) = (0..iterations)
            .map(|i| {
                let id = format!("bench-{i}");
                let timing = time_stamp(
                    Command::new(&jailer)
                        .args([
                            "--id",
                            &id,
                            "--uid",
                            "40999",
                            "--gid",
                            "40999",
                            "--parent-cgroup",
                            PARENT,
                        ])
                        .arg("--exec-file")
                        .arg(&probe)
                        .arg("--chroot-base-dir")
                        .arg(&base)
                        .args(&extra)
                        .args(["--", "stamp"]),
                );
                jailer::cleanup(&CleanupConfig {
                    id,
                    exec_file_name: "jail-probe".into(),
                    chroot_base_dir: base.clone(),
                    parent_cgroup: PARENT.into(),
                })
                .expect("cleanup");
                timing
            })
            .unzip();
        row(name, start, total, Some(bare));
    }

    // Cgroup v1 setup alone: prepare (dir tree + exec copy [+ cgroups]); dropping rolls it back.
    let prepare = |with_cgroups: bool| -> Vec<Duration> {
        (0..iterations)
            .map(|i| {
                let mut c = JailConfig::new(format!("prep-{i}"), &probe, 40999, 40999);
                c.chroot_base_dir = base.clone();
                c.parent_cgroup = PARENT.into();
                if with_cgroups {
                    c.cgroups = CGROUPS
                        .iter()
                        .map(|s| s.parse().expect("setting"))
                        .collect();
                }
                let t = std::time::Instant::now();
                let jail = Jail::prepare(c).expect("prepare");
                let took = t.elapsed();
                drop(jail);
                took
            })
            .collect()
    };
    let (plain_min, plain_med, _) = stats(prepare(false));
    let (cg_min, cg_med, _) = stats(prepare(true));
    println!(
        "{:<40} min {:5.2} median {:5.2} ms  (Jail::prepare min/median: {plain_min:.2}/{plain_med:.2} ms without cgroups, {cg_min:.2}/{cg_med:.2} ms with)",
        "cgroup v1 setup (4 keys, 3 hierarchies)",
        cg_min - plain_min,
        cg_med - plain_med,
    );
    let _ = std::fs::remove_dir_all(&base);
}
