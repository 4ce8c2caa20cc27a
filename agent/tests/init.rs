//! Init duties run for real, as root, inside fresh namespaces made with `unshare(1)`: the
//! test binary re-executes itself in the namespace, where the `*_CHILD` branch runs.

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use agent::init::{
    configure_network, mount_base, pivot_to_overlay, set_hostname, IpConfig, OverlayUpper,
};

const OVERLAY_CHILD: &str = "MVM_AGENT_TEST_OVERLAY_CHILD";
const NETWORK_CHILD: &str = "MVM_AGENT_TEST_NETWORK_CHILD";

/// Why the namespace tests cannot run here, if they cannot.
fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root".to_owned());
    }
    for tool in ["unshare", "ip"] {
        let found = Command::new(tool).arg("--help").output().is_ok();
        if !found {
            return Some(format!("needs {tool}(8)"));
        }
    }
    None
}

/// Runs this test alone in a child of `unshare ARGS...`, with `env` set.
fn run_in_namespace(
    unshare_args: &[&str],
    shell_prefix: &str,
    test: &str,
    env: (&str, &str),
) -> String {
    let exe = std::env::current_exe().expect("test binary path");
    let command = format!(
        "{shell_prefix}exec '{}' --exact {test} --nocapture --test-threads=1",
        exe.display()
    );
    let output = Command::new("unshare")
        .args(unshare_args)
        .args(["--", "sh", "-c", &command])
        .env(env.0, env.1)
        .output()
        .expect("running unshare");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "namespace child failed: {}\nstdout:\n{stdout}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[test]
fn overlay_root_and_pivot_root_in_a_mount_namespace() {
    if let Ok(paths) = std::env::var(OVERLAY_CHILD) {
        let (lower, staging) = paths.split_once(':').expect("lower:staging");
        overlay_child(Path::new(lower), Path::new(staging));
        return;
    }
    if let Some(reason) = missing_prerequisite() {
        eprintln!("SKIPPED overlay_root_and_pivot_root_in_a_mount_namespace: {reason}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(lower.join("etc")).unwrap();
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(lower.join("etc/base"), "from the base image\n").unwrap();
    let env = format!("{}:{}", lower.display(), staging.display());
    let stdout = run_in_namespace(
        &["--mount", "--propagation", "private"],
        "",
        "overlay_root_and_pivot_root_in_a_mount_namespace",
        (OVERLAY_CHILD, &env),
    );
    assert!(stdout.contains("OVERLAY-OK"), "child output:\n{stdout}");
    // The base stayed untouched.
    assert_eq!(
        std::fs::read_to_string(lower.join("etc/base")).unwrap(),
        "from the base image\n"
    );
    let mut entries: Vec<_> = walk(&lower);
    entries.sort();
    assert_eq!(entries, ["etc", "etc/base"]);
    // Nothing stayed mounted on the host.
    assert!(std::fs::read_dir(&staging).unwrap().next().is_none());
}

fn walk(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).unwrap().flatten() {
        let path = entry.path();
        out.push(path.strip_prefix(root).unwrap().display().to_string());
        if path.is_dir() {
            for sub in walk(&path) {
                out.push(format!(
                    "{}/{sub}",
                    path.strip_prefix(root).unwrap().display()
                ));
            }
        }
    }
    out
}

fn overlay_child(lower: &Path, staging: &Path) {
    pivot_to_overlay(lower, &OverlayUpper::Tmpfs, staging).expect("pivot into the overlay");
    // The old root is gone: the lower directory's host path no longer resolves.
    assert!(!lower.exists(), "old root still visible");
    assert_eq!(
        std::fs::read_to_string("/etc/base").unwrap(),
        "from the base image\n"
    );
    std::fs::write("/etc/base", "changed in the sandbox\n").expect("writing over the base");
    std::fs::write("/new-file", "new\n").expect("creating a file");
    assert_eq!(
        std::fs::read_to_string("/etc/base").unwrap(),
        "changed in the sandbox\n"
    );
    mount_base().expect("mounting /proc, /sys, /dev, /tmp, /run");
    assert!(Path::new("/proc/self/stat").exists());
    assert!(Path::new("/sys/kernel").exists());
    assert!(Path::new("/dev/null").exists());
    assert!(Path::new("/dev/pts/ptmx").exists());
    std::fs::write("/tmp/scratch", "x").expect("/tmp is writable");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let root = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some("/"))
        .expect("a / mount");
    assert!(root.starts_with("overlay / overlay"), "root mount: {root}");
    // Idempotent: a second call finds everything mounted.
    mount_base().expect("mount_base twice");
    println!("OVERLAY-OK");
}

#[test]
fn network_and_hostname_in_fresh_namespaces() {
    if std::env::var(NETWORK_CHILD).is_ok() {
        network_child();
        return;
    }
    if let Some(reason) = missing_prerequisite() {
        eprintln!("SKIPPED network_and_hostname_in_fresh_namespaces: {reason}");
        return;
    }
    let stdout = run_in_namespace(
        &["--net", "--uts"],
        // eth0 stands for the guest's virtio-net device.
        "ip link add eth0 type veth peer name eth1 && ip link set eth1 up && ",
        "network_and_hostname_in_fresh_namespaces",
        (NETWORK_CHILD, "1"),
    );
    assert!(stdout.contains("NETWORK-OK"), "child output:\n{stdout}");
}

fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(out.status.success(), "ip {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn network_child() {
    let config = IpConfig {
        address: Ipv4Addr::new(10, 211, 7, 2),
        prefix_len: 24,
        gateway: Some(Ipv4Addr::new(10, 211, 7, 1)),
    };
    configure_network("eth0", Some(&config)).expect("configuring eth0");
    let lo = ip(&["-o", "link", "show", "lo"]);
    assert!(lo.contains("UP"), "lo: {lo}");
    let addr = ip(&["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains("inet 10.211.7.2/24"), "eth0: {addr}");
    let link = ip(&["-o", "link", "show", "eth0"]);
    assert!(link.contains(",UP"), "eth0: {link}");
    let route = ip(&["route", "show", "default"]);
    assert!(
        route.contains("default via 10.211.7.1 dev eth0"),
        "routes: {route}"
    );
    assert!(configure_network("nosuchif0", Some(&config)).is_err());

    set_hostname("sbx-test").expect("sethostname");
    assert_eq!(
        nix::unistd::gethostname().unwrap().to_str(),
        Some("sbx-test")
    );
    println!("NETWORK-OK");
}
