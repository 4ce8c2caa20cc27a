//! `mvm-bench vmm`: start-up (release and debug builds) and memory figures of mvm-vmm with the
//! assembly test guests; `mvm-bench start [MVM_VMM...]`: only the start-up figures, of the given
//! binaries (before and after a change, interleaved) or the built ones; `mvm-bench snapshot`:
//! snapshot create and restore figures (File and Uffd backends); `mvm-bench jailer`: the jailer's cost. Prints figures;
//! asserts nothing (performance is tracked, not tested).

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mvm_testkit::page_server::PageServer;
use mvm_testkit::{binary, config_for, guest, http_unix, target_dir, wait_for_socket, ScratchDir};
use serde_json::{json, Value};

const RUNS: usize = 30;
/// Runs of the start-up figure per binary: a start takes about a millisecond.
const START_RUNS: usize = 100;

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

fn ms_since(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// Writes a config booting test guest `name` with one vCPU and `mem_mib` into `dir`.
fn write_config(dir: &Path, name: &str, mem_mib: u64) -> PathBuf {
    let config = dir.join(format!("{name}.json"));
    std::fs::write(
        &config,
        config_for(&guest(name), "console=ttyS0", 1, mem_mib).to_string(),
    )
    .expect("write config");
    config
}

/// `mvm-vmm` serving its API on `socket`.
fn vmm_with_api(socket: &Path) -> Command {
    let mut command = Command::new(binary("mvm-vmm"));
    command.arg("--api-sock").arg(socket);
    command
}

/// `mvm-vmm --no-api` booting `config`, its console piped.
fn vmm_without_api(config: &Path) -> Command {
    let mut command = Command::new(binary("mvm-vmm"));
    command
        .args(["--no-api", "--config-file"])
        .arg(config)
        .stdout(Stdio::piped());
    command
}

/// Blocks until `child`'s piped console prints a byte; returns the ms since `start`.
fn first_console_byte(child: &mut Child, start: Instant) -> f64 {
    let mut byte = [0u8; 1];
    child
        .stdout
        .as_mut()
        .expect("piped console")
        .read_exact(&mut byte)
        .expect("a console byte");
    ms_since(start)
}

/// Sends one API request and panics unless it is answered `204 No Content`.
fn api_ok(socket: &Path, method: &str, path: &str, body: Value) {
    let (status, answer) =
        http_unix(socket, method, path, Some(&body.to_string())).expect("API call");
    assert_eq!(status, 204, "{method} {path}: {answer}");
}

/// The release build of mvm-vmm, if there is one (`cargo build --release -p vmm`).
fn release_vmm() -> Option<PathBuf> {
    let path = target_dir().join("x86_64-unknown-linux-gnu/release/mvm-vmm");
    path.exists().then_some(path)
}

/// The release (if built) and debug mvm-vmm, named by profile.
fn built_vmms() -> Vec<(String, PathBuf)> {
    let mut binaries = Vec::new();
    match release_vmm() {
        Some(release) => binaries.push(("release".to_string(), release)),
        None => println!("(no release build: `cargo build --release -p vmm` adds its figures)"),
    }
    binaries.push(("debug".to_string(), binary("mvm-vmm")));
    binaries
}

/// Connects to `socket` as soon as it accepts connections, polling every 20 µs (a 1 ms poll
/// would round sub-millisecond figures up).
fn connect_when_ready(socket: &Path) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(stream) = UnixStream::connect(socket) {
            return stream;
        }
        assert!(
            Instant::now() < deadline,
            "{} never came up",
            socket.display()
        );
        std::thread::sleep(Duration::from_micros(20));
    }
}

/// exec → the API socket accepts connections, and exec → the answer to the first request
/// (`GET /`), for each `(name, binary)`: START_RUNS starts each, interleaved so that changes of
/// load hit every binary alike.
fn start_figures(binaries: &[(String, PathBuf)]) {
    let dir = ScratchDir::new("bench-start");
    let socket = dir.path().join("api.sock");
    let mut samples = vec![(Vec::new(), Vec::new()); binaries.len()];
    for _ in 0..START_RUNS {
        for ((_, vmm), (ready, answered)) in binaries.iter().zip(&mut samples) {
            let _ = std::fs::remove_file(&socket);
            let start = Instant::now();
            let mut child = Command::new(vmm)
                .arg("--api-sock")
                .arg(&socket)
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn mvm-vmm");
            let mut stream = connect_when_ready(&socket);
            ready.push(ms_since(start));
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .expect("send GET /");
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).expect("read the answer");
            answered.push(ms_since(start));
            assert!(
                answer.starts_with(b"HTTP/1.1 200"),
                "GET /: {}",
                String::from_utf8_lossy(&answer)
            );
            let _ = child.kill();
            let _ = child.wait();
        }
    }
    for ((name, _), (ready, answered)) in binaries.iter().zip(samples) {
        report(&format!("{name}: exec → API socket ready"), ready);
        report(&format!("{name}: exec → first API answer"), answered);
    }
}

/// exec → the API socket accepts connections.
fn api_ready() -> Vec<f64> {
    (0..RUNS)
        .map(|_| {
            let dir = ScratchDir::new("bench-api");
            let socket = dir.path().join("api.sock");
            let start = Instant::now();
            let mut child = vmm_with_api(&socket)
                .stdout(Stdio::null())
                .spawn()
                .expect("spawn mvm-vmm");
            assert!(wait_for_socket(&socket, Duration::from_secs(10)));
            let ms = ms_since(start);
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
            let ms = ms_since(start);
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

/// Cold boots `config` once: the running VMM, when it was spawned and exec → first console byte.
fn cold_boot(config: &Path) -> (Child, Instant, f64) {
    let start = Instant::now();
    let mut child = vmm_without_api(config).spawn().expect("spawn mvm-vmm");
    let first = first_console_byte(&mut child, start);
    (child, start, first)
}

/// exec → first console byte, and exec → process exit after the guest's reset.
fn serial_and_exit() -> (Vec<f64>, Vec<f64>) {
    let dir = ScratchDir::new("bench-boot");
    let config = write_config(dir.path(), "hello", 128);
    (0..RUNS)
        .map(|_| {
            let (mut child, start, first) = cold_boot(&config);
            let status = child.wait().expect("wait");
            assert!(status.success());
            (first, ms_since(start))
        })
        .unzip()
}

/// Guest memory of the snapshot benchmark, as in the `vmm` figures.
const SNAPSHOT_MIB: u64 = 128;

/// What the echo guest prints once it polls its serial port.
const ECHO_READY: &str = "echo guest ready\n";

/// Boots the echo guest (it echoes every serial byte) with its API on, waits until it is
/// ready, pauses it and saves it RUNS times into `dir`. Returns the last (snapshot, memory
/// file) and the create times.
fn save_echo_guest(dir: &Path) -> (PathBuf, PathBuf, Vec<f64>) {
    let socket = dir.join("source.sock");
    let console = dir.join("source.console");
    let mut source = vmm_with_api(&socket)
        .arg("--config-file")
        .arg(write_config(dir, "echo", SNAPSHOT_MIB))
        .stdout(std::fs::File::create(&console).expect("console file"))
        .spawn()
        .expect("spawn mvm-vmm");
    assert!(wait_for_socket(&socket, Duration::from_secs(10)));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(&console).unwrap_or_default() != ECHO_READY {
        assert!(Instant::now() < deadline, "the echo guest never got ready");
        std::thread::sleep(Duration::from_millis(10));
    }
    api_ok(&socket, "PATCH", "/vm", json!({"state": "Paused"}));
    let mut files = (PathBuf::new(), PathBuf::new());
    let create: Vec<f64> = (0..RUNS)
        .map(|n| {
            files = (dir.join(format!("vm{n}.snap")), dir.join(format!("vm{n}.mem")));
            let start = Instant::now();
            api_ok(
                &socket,
                "PUT",
                "/snapshot/create",
                json!({"snapshot_type": "Full", "snapshot_path": files.0, "mem_file_path": files.1}),
            );
            ms_since(start)
        })
        .collect();
    let _ = source.kill();
    let _ = source.wait();
    (files.0, files.1, create)
}

/// Where a benchmarked restore takes guest memory from.
#[derive(Clone, Copy, PartialEq)]
enum Backend {
    /// The memory file, mapped copy-on-write.
    File,
    /// A page server thread of this process (`mvm_testkit::page_server`).
    Uffd,
}

/// Restore figures of one backend: exec → API socket ready, exec → `PUT /snapshot/load`
/// answered, exec → a console byte echoed, and the page faults served (Uffd).
#[derive(Default)]
struct RestoreFigures {
    ready: Vec<f64>,
    loaded: Vec<f64>,
    echoed: Vec<f64>,
    faults: Vec<f64>,
}

/// Restores `snapshot` RUNS times from `backend`, each in a fresh VMM: exec → API socket
/// ready, exec → `PUT /snapshot/load` answered (resumed), exec → the restored guest echoes a
/// byte written to its console after the load.
fn restore(dir: &Path, snapshot: &Path, mem: &Path, backend: Backend) -> RestoreFigures {
    let mut figures = RestoreFigures::default();
    for n in 0..RUNS {
        let socket = dir.join(format!("restore{n}.sock"));
        let pages = dir.join(format!("pages{n}.sock"));
        let (server, mem_backend) = match backend {
            Backend::File => (None, json!({"backend_type": "File", "backend_path": mem})),
            Backend::Uffd => (
                Some(PageServer::start(&pages, mem)),
                json!({"backend_type": "Uffd", "backend_path": pages}),
            ),
        };
        let start = Instant::now();
        let mut child = vmm_with_api(&socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn mvm-vmm");
        assert!(wait_for_socket(&socket, Duration::from_secs(10)));
        figures.ready.push(ms_since(start));
        api_ok(
            &socket,
            "PUT",
            "/snapshot/load",
            json!({"snapshot_path": snapshot, "mem_backend": mem_backend, "resume_vm": true}),
        );
        figures.loaded.push(ms_since(start));
        child
            .stdin
            .as_mut()
            .expect("piped stdin")
            .write_all(b"x")
            .expect("write to the console");
        figures.echoed.push(first_console_byte(&mut child, start));
        let _ = child.kill();
        let _ = child.wait();
        if let Some(server) = server {
            figures
                .faults
                .push(server.join().expect("the page server served the restore") as f64);
        }
    }
    figures
}

/// Snapshot create and restore of the echo guest, next to its cold boot.
fn snapshot_figures() {
    let dir = ScratchDir::new("bench-snap");
    let (snapshot, mem, create) = save_echo_guest(dir.path());
    report("PUT /snapshot/create (paused, Full)", create);
    let meta = std::fs::metadata(&mem).expect("memory file");
    println!(
        "{:<44} {:>7.2} MiB on disk of {:.0} MiB",
        "memory file (sparse)",
        (meta.blocks() * 512) as f64 / (1 << 20) as f64,
        meta.len() as f64 / (1 << 20) as f64
    );
    for (name, backend) in [("File", Backend::File), ("Uffd", Backend::Uffd)] {
        let figures = restore(dir.path(), &snapshot, &mem, backend);
        report(
            &format!("{name} restore: exec → API socket ready"),
            figures.ready,
        );
        report(
            &format!("{name} restore: exec → load answered"),
            figures.loaded,
        );
        report(
            &format!("{name} restore: exec → byte echoed"),
            figures.echoed,
        );
        if backend == Backend::Uffd {
            let mut faults = figures.faults;
            println!(
                "{:<44} p50 {:>7.0}      max {:>7.0}         (n={})",
                "Uffd restore: pages the page server filled",
                percentile(&mut faults, 0.5),
                percentile(&mut faults, 1.0),
                faults.len()
            );
        }
    }
    let config = write_config(dir.path(), "echo", SNAPSHOT_MIB);
    let cold = (0..RUNS)
        .map(|_| {
            let (mut child, _, first) = cold_boot(&config);
            let _ = child.kill();
            let _ = child.wait();
            first
        })
        .collect();
    report("cold boot: exec → first serial byte", cold);
}

/// Resident and proportional memory of a VMM running a 128 MiB guest, and how much of it is
/// not guest memory.
fn memory() {
    let dir = ScratchDir::new("bench-mem");
    let mut child = vmm_without_api(&write_config(dir.path(), "spin", 128))
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

/// Exits with a message when benchmark `what` cannot open /dev/kvm.
fn exit_without_kvm(what: &str) {
    if let Err(why) = mvm_testkit::kvm() {
        eprintln!("mvm-bench {what} needs /dev/kvm: {why}");
        std::process::exit(1);
    }
}

fn main() {
    let what = std::env::args().nth(1).unwrap_or_else(|| "vmm".into());
    match what.as_str() {
        "vmm" => {
            exit_without_kvm(&what);
            println!(
                "mvm-vmm start-up, static binaries (kvm: {:?})",
                mvm_testkit::kvm().unwrap()
            );
            start_figures(&built_vmms());
            println!("debug-profile binary (opt-level 1):");
            let (first, exit) = serial_and_exit();
            report("exec → first guest serial byte", first);
            report("exec → exit after guest reset", exit);
            memory();
        }
        "start" => {
            // Given binaries (say, before and after a change) or the built ones.
            let given: Vec<(String, PathBuf)> = std::env::args()
                .skip(2)
                .map(|path| (path.clone(), PathBuf::from(path)))
                .collect();
            start_figures(&if given.is_empty() {
                built_vmms()
            } else {
                given
            });
        }
        "snapshot" => {
            exit_without_kvm(&what);
            println!(
                "mvm-vmm snapshot of the echo guest, {SNAPSHOT_MIB} MiB, 1 vCPU (kvm: {:?})",
                mvm_testkit::kvm().unwrap()
            );
            snapshot_figures();
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
            eprintln!(
                "unknown benchmark {other:?}: use `mvm-bench vmm`, `start [MVM_VMM...]`, \
                 `snapshot` or `jailer`"
            );
            std::process::exit(2);
        }
    }
}
