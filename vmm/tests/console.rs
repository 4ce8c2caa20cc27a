//! `--console-limit` with a guest that floods its serial console, through the real /dev/kvm.
//! Skips loudly where /dev/kvm is unusable.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mvm_testkit::{binary, config_for, guest, require_kvm, wait_with_timeout, ScratchDir, VmmRun};

const TIMEOUT: Duration = Duration::from_secs(120);
/// The limit the VMM runs with: the flood guest writes about 300 KiB.
const LIMIT: usize = 64 * 1024;
/// What `testkit/guests/flood.S` prints.
const BANNER: &str = "flood guest: start\n";
const LINES: usize = 20480;
const LAST: &str = "flood guest: done\n";

fn flood_output() -> String {
    let lines: String = (0..LINES).map(|i| format!("flood {i:08x}\n")).collect();
    format!("{BANNER}{lines}{LAST}")
}

/// Runs the flood guest under `mvm-vmm --console-limit LIMIT` with its console on `stdout`,
/// metrics to `metrics` when given; the config file goes to `dir`.
fn run_flood(dir: &ScratchDir, metrics: Option<&Path>, stdout: Stdio) -> VmmRun {
    let mut config = config_for(&guest("flood"), "console=ttyS0", 1, 32);
    if let Some(metrics) = metrics {
        config["metrics"] = serde_json::json!({ "metrics_path": metrics });
    }
    let config_path = dir.path().join("vm.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let child = Command::new(binary("mvm-vmm"))
        .args(["--no-api", "--console-limit", &LIMIT.to_string()])
        .arg("--config-file")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mvm-vmm");
    wait_with_timeout(child, TIMEOUT)
}

#[test]
fn a_flooding_guest_keeps_its_console_file_within_the_limit() {
    if !require_kvm("a_flooding_guest_keeps_its_console_file_within_the_limit") {
        return;
    }
    let dir = ScratchDir::new("console-flood");
    let console = dir.path().join("console.log");
    let metrics = dir.path().join("metrics.json");
    let started = Instant::now();
    let run = run_flood(
        &dir,
        Some(&metrics),
        std::fs::File::create(&console).unwrap().into(),
    );
    // The vCPU thread's seccomp filter must allow cutting the file back (148 otherwise).
    assert_eq!(run.code(), 0, "{run:#?}");
    let sent = flood_output();
    eprintln!(
        "flood guest: {} console bytes in {:.1?}",
        sent.len(),
        started.elapsed()
    );

    let kept = std::fs::read_to_string(&console).unwrap();
    assert!(kept.len() <= LIMIT, "console file is {} bytes", kept.len());
    let head = LIMIT / 2;
    assert_eq!(
        kept[..head],
        sent[..head],
        "the first half is the boot output"
    );
    let marker = format!("[mvm-vmm: console output over {LIMIT} bytes; older output dropped]\n");
    let at = kept.find(&marker).expect("the marker line");
    assert!(at == head || at == head + 1, "marker at {at}, head {head}");
    let tail = &kept[at + marker.len()..];
    assert!(tail.ends_with(LAST), "{tail}");
    assert!(sent.ends_with(tail), "the tail is the newest output");
    assert!(
        tail.len() >= LIMIT / 8,
        "only {} bytes of newest output",
        tail.len()
    );

    let flushed = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(flushed.lines().last().unwrap()).unwrap();
    let guest_bytes_kept = head + tail.len();
    assert_eq!(
        last["uart"]["bytes_dropped"],
        (sent.len() - guest_bytes_kept) as u64,
        "{last}"
    );
}

#[test]
fn a_console_pipe_is_not_capped() {
    if !require_kvm("a_console_pipe_is_not_capped") {
        return;
    }
    let dir = ScratchDir::new("console-pipe");
    let run = run_flood(&dir, None, Stdio::piped());
    assert_eq!(run.code(), 0, "{run:#?}");
    assert!(
        run.stdout == flood_output(),
        "{} bytes arrived",
        run.stdout.len()
    );
    assert!(run.stderr.contains("not a regular file"), "{}", run.stderr);
}

#[test]
fn a_console_limit_below_the_minimum_is_refused() {
    let out = Command::new(binary("mvm-vmm"))
        .args([
            "--no-api",
            "--console-limit",
            "100",
            "--config-file",
            "/nonexistent",
        ])
        .output()
        .expect("run mvm-vmm");
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("use at least 4096"), "{stderr}");
}

#[test]
fn host_stdin_reaches_the_guest_uart() {
    if !require_kvm("host_stdin_reaches_the_guest_uart") {
        return;
    }
    use std::io::{Read, Write};
    let dir = ScratchDir::new("stdin");
    let config_path = dir.path().join("vm.json");
    // The guest echoes every byte it receives on COM1 and resets after a 'q'.
    let config = config_for(&guest("echo"), "console=ttyS0", 1, 32);
    std::fs::write(&config_path, config.to_string()).unwrap();
    let mut child = Command::new(binary("mvm-vmm"))
        .arg("--no-api")
        .arg("--config-file")
        .arg(&config_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mvm-vmm");
    let mut stdout = child.stdout.take().unwrap();
    let mut console = Vec::new();
    let mut buf = [0u8; 256];
    while !console.ends_with(b"echo guest ready\n") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "console ended: {:?}",
            String::from_utf8_lossy(&console)
        );
        console.extend_from_slice(&buf[..n]);
    }
    // More than the UART's 64-byte FIFO, so the VMM must hold input back until the guest reads.
    let input: String = (0..40).map(|i| format!("line {i}\n")).collect::<String>() + "q";
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    // End of input: what was written still reaches the guest.
    drop(stdin);
    child.stdout = Some(stdout);
    let run = wait_with_timeout(child, TIMEOUT);
    assert_eq!(run.code(), 0, "{run:#?}");
    assert_eq!(
        format!("{}{}", String::from_utf8_lossy(&console), run.stdout),
        format!("echo guest ready\n{input}")
    );
}
