//! Init duties run for real, as root, inside fresh namespaces made with `unshare(1)`: the
//! test binary re-executes itself in the namespace, where the `*_CHILD` branch runs.

use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use agent::init::{
    configure_network, keep_identity_files_in_memory, mount_base, pivot_to_disk, pivot_to_overlay,
    quiesce_file_systems, reconfigure_network, set_hostname, write_resolv_conf, IpConfig,
    OverlayUpper,
};

const OVERLAY_CHILD: &str = "MVM_AGENT_TEST_OVERLAY_CHILD";
const DISK_CHILD: &str = "MVM_AGENT_TEST_DISK_CHILD";
const NETWORK_CHILD: &str = "MVM_AGENT_TEST_NETWORK_CHILD";
const SHUTDOWN_CHILD: &str = "MVM_AGENT_TEST_SHUTDOWN_CHILD";

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

/// Builds a lower directory and a staging directory in `dir`, runs the overlay child in a
/// fresh mount namespace with `upper` ("tmpfs" or a device path), and checks that the
/// base stayed untouched and nothing stayed mounted.
fn run_overlay_child(dir: &Path, upper: &str, test: &str) {
    let lower = dir.join("lower");
    let staging = dir.join("staging");
    std::fs::create_dir_all(lower.join("etc")).unwrap();
    std::fs::create_dir(&staging).unwrap();
    std::fs::write(lower.join("etc/base"), "from the base image\n").unwrap();
    // The identity files: the image's machine id, its resolver a link to one it would run.
    std::fs::write(lower.join("etc/machine-id"), "from the image\n").unwrap();
    std::os::unix::fs::symlink("../run/resolver.conf", lower.join("etc/resolv.conf")).unwrap();
    let env = format!("{}:{}:{upper}", lower.display(), staging.display());
    let stdout = run_in_namespace(
        &["--mount", "--propagation", "private"],
        "",
        test,
        (OVERLAY_CHILD, &env),
    );
    assert!(stdout.contains("OVERLAY-OK"), "child output:\n{stdout}");
    assert_eq!(
        std::fs::read_to_string(lower.join("etc/base")).unwrap(),
        "from the base image\n"
    );
    let mut entries: Vec<_> = walk(&lower);
    entries.sort();
    assert_eq!(
        entries,
        ["etc", "etc/base", "etc/machine-id", "etc/resolv.conf"]
    );
    assert_eq!(
        std::fs::read_to_string(lower.join("etc/machine-id")).unwrap(),
        "from the image\n"
    );
    assert!(std::fs::read_dir(&staging).unwrap().next().is_none());
}

/// In the namespace child: `MVM_AGENT_TEST_OVERLAY_CHILD=lower:staging:upper`.
fn overlay_child_from_env() -> bool {
    let Ok(spec) = std::env::var(OVERLAY_CHILD) else {
        return false;
    };
    let mut parts = spec.splitn(3, ':');
    let (Some(lower), Some(staging), Some(upper)) = (parts.next(), parts.next(), parts.next())
    else {
        panic!("bad {OVERLAY_CHILD}: {spec}");
    };
    let upper = match upper {
        "tmpfs" => OverlayUpper::Tmpfs,
        dev => OverlayUpper::Device(dev.into()),
    };
    overlay_child(Path::new(lower), &upper, Path::new(staging));
    true
}

#[test]
fn overlay_root_and_pivot_root_in_a_mount_namespace() {
    if overlay_child_from_env() {
        return;
    }
    if let Some(reason) = missing_prerequisite() {
        mvm_testkit::skip_or_fail_in_ci(
            "overlay_root_and_pivot_root_in_a_mount_namespace",
            &reason,
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    run_overlay_child(
        dir.path(),
        "tmpfs",
        "overlay_root_and_pivot_root_in_a_mount_namespace",
    );
}

/// A 16 MiB ext4 `image` (holding a copy of `content`, if given) on a loop device; `None`, said
/// loudly, where mkfs.ext4 or loop devices are missing.
fn ext4_on_loop(image: &Path, content: Option<&Path>, test: &str) -> Option<LoopDevice> {
    let mut mkfs = Command::new("mkfs.ext4");
    mkfs.args(["-q", "-F"]);
    if let Some(dir) = content {
        mkfs.arg("-d").arg(dir);
    }
    if !matches!(mkfs.arg(image).arg("16M").status(), Ok(s) if s.success()) {
        mvm_testkit::skip_or_fail_in_ci(test, "mkfs.ext4 unavailable or failed");
        return None;
    }
    LoopDevice::attach(image)
        .map_err(|e| mvm_testkit::skip_or_fail_in_ci(test, &format!("no loop device ({e})")))
        .ok()
}

/// A loop device over an image file, detached when dropped.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(image: &Path) -> Result<Self, String> {
        let out = Command::new("losetup")
            .args(["--find", "--show"])
            .arg(image)
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self(String::from_utf8_lossy(&out.stdout).trim().to_owned()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["--detach", &self.0]).status();
    }
}

fn debugfs_cat(image: &Path, path: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", &format!("cat {path}")])
        .arg(image)
        .output()
        .expect("running debugfs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn overlay_root_on_a_persistent_disk() {
    if overlay_child_from_env() {
        return;
    }
    if let Some(reason) = missing_prerequisite() {
        mvm_testkit::skip_or_fail_in_ci("overlay_root_on_a_persistent_disk", &reason);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("upper.ext4");
    let Some(device) = ext4_on_loop(&image, None, "overlay_root_on_a_persistent_disk") else {
        return;
    };
    run_overlay_child(dir.path(), &device.0, "overlay_root_on_a_persistent_disk");
    drop(device);
    // The sandbox's changes persist on the disk, in upper/.
    assert_eq!(debugfs_cat(&image, "/upper/new-file"), "new\n");
    assert_eq!(
        debugfs_cat(&image, "/upper/etc/base"),
        "changed in the sandbox\n"
    );
}

/// `mvm.root`: a container's own file system, on a disk of its own, becomes the root.
#[test]
fn container_root_on_its_own_disk() {
    if let Ok(spec) = std::env::var(DISK_CHILD) {
        let (device, staging) = spec.split_once(':').expect("DEVICE:STAGING");
        disk_child(Path::new(device), Path::new(staging));
        return;
    }
    if let Some(reason) = missing_prerequisite() {
        mvm_testkit::skip_or_fail_in_ci("container_root_on_its_own_disk", &reason);
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("container");
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/os-release"), "ID=container\n").unwrap();
    let image = dir.path().join("container.ext4");
    let Some(device) = ext4_on_loop(&image, Some(&tree), "container_root_on_its_own_disk") else {
        return;
    };
    let staging = dir.path().join("staging");
    std::fs::create_dir(&staging).unwrap();
    let env = format!("{}:{}", device.0, staging.display());
    let stdout = run_in_namespace(
        &["--mount", "--propagation", "private"],
        "",
        "container_root_on_its_own_disk",
        (DISK_CHILD, &env),
    );
    assert!(stdout.contains("DISK-OK"), "child output:\n{stdout}");
    drop(device);
    assert!(std::fs::read_dir(&staging).unwrap().next().is_none());
    // What the container wrote is on its disk.
    assert_eq!(debugfs_cat(&image, "/written-inside"), "by the container\n");
}

fn disk_child(device: &Path, staging: &Path) {
    pivot_to_disk(device, staging).expect("pivot onto the container disk");
    assert!(!staging.exists(), "old root still visible");
    assert_eq!(
        std::fs::read_to_string("/etc/os-release").unwrap(),
        "ID=container\n"
    );
    std::fs::write("/written-inside", "by the container\n").expect("the root is writable");
    mount_base().expect("mounting /proc, /sys, /dev, /tmp, /run in the container root");
    assert!(Path::new("/proc/self/stat").exists());
    assert!(Path::new("/dev/null").exists());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let root = mounts
        .lines()
        .find(|l| l.split(' ').nth(1) == Some("/"))
        .expect("a / mount");
    assert!(root.contains(" / ext4 "), "root mount: {root}");
    println!("DISK-OK");
}

/// Power-down's file system step, while the namespace (the guest) still lives: the overlay's
/// upper disk, which the pivot detached from every namespace, and a data disk mounted later (as
/// a `Mount` request does) are left clean for e2fsck, with what was written on them.
#[test]
fn power_down_leaves_the_disks_clean() {
    if let Ok(spec) = std::env::var(SHUTDOWN_CHILD) {
        shutdown_child(&spec);
        return;
    }
    const TEST: &str = "power_down_leaves_the_disks_clean";
    if let Some(reason) = missing_prerequisite() {
        mvm_testkit::skip_or_fail_in_ci(TEST, &reason);
        return;
    }
    if Command::new("e2fsck").arg("-V").output().is_err() {
        mvm_testkit::skip_or_fail_in_ci(TEST, "needs e2fsck(8)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    let staging = dir.path().join("staging");
    std::fs::create_dir_all(lower.join("etc")).unwrap();
    std::fs::create_dir(&staging).unwrap();
    let upper_image = dir.path().join("upper.ext4");
    let data_image = dir.path().join("data.ext4");
    let Some(upper) = ext4_on_loop(&upper_image, None, TEST) else {
        return;
    };
    let Some(data) = ext4_on_loop(&data_image, None, TEST) else {
        return;
    };
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "--"])
        .arg(exe)
        .args(["--exact", TEST, "--nocapture", "--test-threads=1"])
        .env(
            SHUTDOWN_CHILD,
            format!(
                "{}:{}:{}:{}",
                lower.display(),
                staging.display(),
                upper.0,
                data.0
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running unshare");
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let quiesced = loop {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break false;
        }
        seen.push_str(&line);
        if line.trim_end().ends_with("QUIESCED") {
            break true;
        }
    };
    if !quiesced {
        let out = child.wait_with_output().unwrap();
        panic!(
            "the namespace child stopped before quiescing: {}\nstdout:\n{seen}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The child still holds its mounts (and the upper disk, read-only, under the overlay).
    for device in [&upper.0, &data.0] {
        let header = Command::new("dumpe2fs")
            .arg("-h")
            .arg(device)
            .output()
            .unwrap();
        let header = String::from_utf8_lossy(&header.stdout);
        let line = |key: &str| {
            header
                .lines()
                .find(|l| l.starts_with(key))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(
            !line("Filesystem features:").contains("needs_recovery"),
            "{device}: the journal still needs recovery: {}",
            line("Filesystem features:")
        );
        assert!(
            line("Filesystem state:").ends_with(" clean"),
            "{device}: {}",
            line("Filesystem state:")
        );
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(device)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "e2fsck -fn {device}: {}\n{}{}",
            fsck.status,
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "namespace child: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    drop((upper, data));
    assert_eq!(
        debugfs_cat(&upper_image, "/upper/new-file"),
        "written before power-down\n"
    );
    assert_eq!(debugfs_cat(&data_image, "/file"), "on the data disk\n");
}

/// In the namespace child: `MVM_AGENT_TEST_SHUTDOWN_CHILD=lower:staging:upper:data`.
fn shutdown_child(spec: &str) {
    let parts: Vec<&str> = spec.split(':').collect();
    let [lower, staging, upper, data] = parts[..] else {
        panic!("bad {SHUTDOWN_CHILD}: {spec}");
    };
    pivot_to_overlay(
        Path::new(lower),
        &OverlayUpper::Device(upper.into()),
        Path::new(staging),
    )
    .expect("pivot into the overlay");
    mount_base().expect("mounting /proc, /sys, /dev, /tmp, /run");
    // Bound over /etc as the guest's init binds them: quiesced with the rest. This image has
    // no machine id: the guest gets a new one.
    keep_identity_files_in_memory().expect("binding the identity files");
    let id = std::fs::read_to_string("/etc/machine-id").unwrap();
    assert!(
        id.len() == 33
            && id
                .trim_end()
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "machine id {id:?}"
    );
    assert_eq!(std::fs::read_to_string("/etc/resolv.conf").unwrap(), "");
    std::fs::create_dir("/data").unwrap();
    nix::mount::mount(
        Some(data),
        "/data",
        Some("ext4"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .expect("mounting the data disk");
    std::fs::write("/new-file", "written before power-down\n").unwrap();
    std::fs::write("/data/file", "on the data disk\n").unwrap();

    let errors = quiesce_file_systems();
    assert!(errors.is_empty(), "quiesce failed: {errors:?}");
    let mounts: Vec<PathBuf> = std::fs::read_dir("/data")
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(mounts.is_empty(), "/data still shows the disk: {mounts:?}");
    let refused = std::fs::write("/late", "x").expect_err("the root is still writable");
    assert_eq!(refused.raw_os_error(), Some(libc::EROFS), "{refused}");
    println!("QUIESCED");
    std::io::stdout().flush().unwrap();
    // Hold the mounts until the parent has looked at the disks.
    std::io::copy(&mut std::io::stdin(), &mut std::io::sink()).unwrap();
}

/// In the namespace child, with the root and /run mounted: the identity files are bound from
/// copies on the /run tmpfs (the image's machine id kept, its resolver link an empty file), and
/// what the agent writes to them lands in those copies, not on the root.
fn identity_files_child(mounts_before: &str) {
    assert!(
        !mounts_before.contains(" /etc/machine-id "),
        "bound before: {mounts_before}"
    );
    keep_identity_files_in_memory().expect("binding the identity files");
    assert_eq!(
        std::fs::read_to_string("/etc/machine-id").unwrap(),
        "from the image\n"
    );
    assert_eq!(std::fs::read_to_string("/etc/resolv.conf").unwrap(), "");
    write_resolv_conf(Ipv4Addr::new(10, 211, 7, 53)).expect("writing the resolver");
    std::fs::write("/etc/machine-id", "0123456789abcdef0123456789abcdef\n").unwrap();
    assert!(std::fs::read_to_string("/run/mvm/resolv.conf")
        .unwrap()
        .contains("nameserver 10.211.7.53\n"));
    assert_eq!(
        std::fs::read_to_string("/run/mvm/machine-id").unwrap(),
        "0123456789abcdef0123456789abcdef\n"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    for path in ["/etc/resolv.conf", "/etc/machine-id"] {
        let fstype = mounts
            .lines()
            .find_map(|l| {
                let fields: Vec<&str> = l.split(' ').collect();
                (fields.get(1) == Some(&path)).then(|| fields[2].to_owned())
            })
            .unwrap_or_else(|| panic!("{path} is not bound: {mounts}"));
        assert_eq!(fstype, "tmpfs", "{path}");
    }
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

fn overlay_child(lower: &Path, upper: &OverlayUpper, staging: &Path) {
    pivot_to_overlay(lower, upper, staging).expect("pivot into the overlay");
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
    identity_files_child(&mounts);
    println!("OVERLAY-OK");
}

#[test]
fn network_and_hostname_in_fresh_namespaces() {
    if std::env::var(NETWORK_CHILD).is_ok() {
        network_child();
        return;
    }
    if let Some(reason) = missing_prerequisite() {
        mvm_testkit::skip_or_fail_in_ci("network_and_hostname_in_fresh_namespaces", &reason);
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

    // A restored guest's new identity: the old address, route and neighbours go, the MAC
    // changes with the link up, the new address and route come.
    ip(&[
        "neigh",
        "add",
        "10.211.7.1",
        "lladdr",
        "02:00:00:00:00:01",
        "dev",
        "eth0",
    ]);
    let moved = IpConfig {
        address: Ipv4Addr::new(10, 212, 9, 6),
        prefix_len: 30,
        gateway: Some(Ipv4Addr::new(10, 212, 9, 5)),
    };
    let mac = [0x06, 0x11, 0x22, 0x33, 0x44, 0x55];
    reconfigure_network("eth0", Some(mac), Some(&moved)).expect("reconfiguring eth0");
    let addr = ip(&["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.contains("inet 10.212.9.6/30"), "eth0: {addr}");
    assert!(
        !addr.contains("10.211.7.2"),
        "eth0 kept its old address: {addr}"
    );
    let link = ip(&["-o", "link", "show", "eth0"]);
    assert!(
        link.contains(",UP") && link.contains("link/ether 06:11:22:33:44:55"),
        "eth0: {link}"
    );
    let route = ip(&["route", "show", "default"]);
    assert_eq!(
        route.trim(),
        "default via 10.212.9.5 dev eth0",
        "routes: {route}"
    );
    let neighbours = ip(&["neigh", "show", "dev", "eth0"]);
    assert!(
        !neighbours.contains("10.211.7.1"),
        "the old gateway's MAC stayed: {neighbours}"
    );
    // Given the address it has (a guest restored from its own snapshot's address): the same.
    reconfigure_network("eth0", Some(mac), Some(&moved)).expect("reconfiguring eth0 again");
    let route = ip(&["route", "show", "default"]);
    assert_eq!(
        route.trim(),
        "default via 10.212.9.5 dev eth0",
        "routes: {route}"
    );
    // Without a network: no address, and the link down.
    reconfigure_network("eth0", None, None).expect("taking eth0's network away");
    let addr = ip(&["-o", "-4", "addr", "show", "dev", "eth0"]);
    assert!(addr.trim().is_empty(), "eth0: {addr}");
    let link = ip(&["-o", "link", "show", "eth0"]);
    assert!(!link.contains(",UP"), "eth0: {link}");

    set_hostname("sbx-test").expect("sethostname");
    assert_eq!(
        nix::unistd::gethostname().unwrap().to_str(),
        Some("sbx-test")
    );
    println!("NETWORK-OK");
}

/// The real PID 1 path: the agent as init of a fresh PID namespace (plus private mount,
/// network and UTS namespaces) runs its init duties, serves, reaps orphans, and on
/// `Shutdown` kills everything and calls reboot(2), which ends the namespace.
#[test]
fn agent_as_pid_1_of_a_pid_namespace() {
    if let Some(reason) = missing_prerequisite() {
        mvm_testkit::skip_or_fail_in_ci("agent_as_pid_1_of_a_pid_namespace", &reason);
        return;
    }
    // Not under /tmp or /run (the agent mounts fresh ones in its namespace), wherever the
    // checkout lives.
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let socket = dir.path().join("agent.sock");
    let mut child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            "--mount",
            "--propagation",
            "private",
        ])
        .args(["--net", "--uts", "--"])
        .arg(env!("CARGO_BIN_EXE_mvm-agent"))
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .spawn()
        .expect("running unshare");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let client = loop {
            match agent::AgentClient::connect_unix(&socket).await {
                Ok(client) => break client,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "agent never listened: {e}"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                }
            }
        };
        assert!(client.health().await.unwrap().init, "agent is not init");
        let run = |script: &str| {
            let client = client.clone();
            let request = agent::ExecRequest::new(["sh", "-c", script]);
            async move {
                let out = client
                    .exec(request)
                    .await
                    .unwrap()
                    .wait_with_output()
                    .await
                    .unwrap();
                assert!(out.status.success(), "{out:?}");
                String::from_utf8(out.stdout).unwrap()
            }
        };
        // PID 1 is the agent.
        assert_eq!(run("cat /proc/1/comm").await.trim(), "mvm-agent");
        // Orphans are re-parented to PID 1 and reaped when they exit.
        run("(sleep 0.2 &); exit 0").await;
        tokio::time::sleep(std::time::Duration::from_millis(600)).await;
        let states = run("cat /proc/[0-9]*/stat").await;
        assert!(
            !states.lines().any(|l| l
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.starts_with(" Z"))),
            "zombies in the namespace:\n{states}"
        );
        // Init duties ran: lo is up, /run and /tmp are tmpfs.
        let lo = run("cat /sys/class/net/lo/flags").await;
        let flags = u32::from_str_radix(lo.trim().trim_start_matches("0x"), 16).unwrap();
        assert_eq!(
            flags & libc::IFF_UP as u32,
            libc::IFF_UP as u32,
            "lo is down"
        );
        let mounts = run("cat /proc/self/mounts").await;
        for target in ["/tmp", "/run"] {
            assert!(
                mounts
                    .lines()
                    .any(|l| l.starts_with(&format!("tmpfs {target} tmpfs"))),
                "{target} not mounted:\n{mounts}"
            );
        }
        client
            .shutdown(agent::ShutdownAction::PowerOff)
            .await
            .unwrap();
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            eprintln!("namespace ended after Shutdown: {status}");
            break;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("the PID namespace survived Shutdown");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
