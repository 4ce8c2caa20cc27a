//! End-to-end tests: `mvm-jailer` runs `jail-probe` in a real jail on this host (root needed).

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use mvm_testkit::root_or_skip;

const ZERO_CAPS: &str = "0000000000000000";

fn assert_powerless(r: &std::collections::HashMap<String, String>, uid: u32) {
    let ids = format!("{uid}/{uid}");
    assert_eq!(r["uid"], ids);
    assert_eq!(r["gid"], ids);
    assert_eq!(r["groups"], "0");
    assert_eq!(r["no_new_privs"], "1");
    assert_eq!(r["bounding_caps"], "0");
    for denied in [
        "mount_tmpfs",
        "raw_socket",
        "packet_socket",
        "chroot",
        "setuid0",
        "mknod",
        "ptrace_parent",
        "write_root",
        "write_exec_copy",
    ] {
        assert!(
            matches!(r[denied].as_str(), "EPERM" | "EACCES"),
            "{denied} = {}",
            r[denied]
        );
    }
    // A kernel built without module support answers ENOSYS before any permission check.
    assert!(
        matches!(r["init_module"].as_str(), "EPERM" | "ENOSYS"),
        "init_module = {}",
        r["init_module"]
    );
    // The jail is its own world: only what the jailer put there.
    assert_eq!(r["host_passwd"], "false");
    assert_eq!(r["dotdot_is_root"], "true");
    assert_eq!(r["dotdot_passwd"], "false");
    assert_eq!(r["proc_root_passwd"], "false");
    assert_eq!(
        r["kvm_open"], "ok",
        "the jailed uid must be able to open its /dev/kvm"
    );
}

#[test]
fn jailed_probe_sees_only_the_jail_and_has_no_privileges() {
    if !root_or_skip("jailed_probe_sees_only_the_jail_and_has_no_privileges") {
        return;
    }
    let j = TestJail::new("escape");
    let r = ok_report(&j.run(
        &["--new-pid-ns", "--mount-proc", "--cgroup", "pids.max=32"],
        &["report"],
    ));
    assert_powerless(&r, j.uid);
    for caps in ["cap_eff", "cap_prm", "cap_bnd", "cap_inh", "cap_amb"] {
        assert_eq!(r[caps], ZERO_CAPS, "{caps}");
    }
    assert_eq!(r["status_no_new_privs"], "1");
    assert_eq!(r["root_entries"], "dev,jail-probe,proc,run");
    assert_eq!(r["hostname"], j.id);
    assert_eq!(r["write_run"], "ok");
    // pid 2 under the jail's init; the init (another identity once dropped) and every host
    // process are invisible.
    assert_eq!(r["pid"], "2");
    assert_eq!(r["proc_pids"], "2");
    assert_eq!(r["proc_self_root"], "/");
    assert!(
        r["cgroup"].contains(&format!("pids:/{PARENT_CGROUP}/{}", j.id)),
        "{}",
        r["cgroup"]
    );
    // The exec file, which every user may run, is the host's own bound read-only in the jail's
    // mount namespace (on the host, an empty root-owned mount point: no copy), and the device
    // nodes carry the jail's owner.
    assert_eq!(
        r["exec_ino"],
        std::fs::metadata(PROBE).unwrap().ino().to_string()
    );
    let root = j.jail_dir().join("root");
    let mount_point = std::fs::metadata(root.join("jail-probe")).unwrap();
    assert_eq!(
        (
            mount_point.len(),
            mount_point.uid(),
            mount_point.permissions().mode() & 0o7777
        ),
        (0, 0, 0o755)
    );
    for (dev, rdev) in [
        ("dev/kvm", (10, 232)),
        ("dev/net/tun", (10, 200)),
        ("dev/urandom", (1, 9)),
    ] {
        let m = std::fs::metadata(root.join(dev)).unwrap();
        assert_eq!(
            (m.uid(), m.gid(), m.permissions().mode() & 0o7777),
            (j.uid, j.uid, 0o600),
            "{dev}"
        );
        assert_eq!(
            (libc::major(m.rdev()), libc::minor(m.rdev())),
            rdev,
            "{dev}"
        );
    }
    j.cleanup();
}

#[test]
fn an_exec_file_others_may_not_run_is_copied_for_the_jailed_uid() {
    if !root_or_skip("an_exec_file_others_may_not_run_is_copied_for_the_jailed_uid") {
        return;
    }
    let j = TestJail::new("copy");
    let private = j.base.join("private/jail-probe");
    std::fs::create_dir(j.base.join("private")).unwrap();
    std::fs::copy(PROBE, &private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o750)).unwrap();
    let private_arg = private.to_str().unwrap();
    let r = ok_report(&j.run(&["--new-pid-ns", "--exec-file", private_arg], &["report"]));
    assert_powerless(&r, j.uid);
    // A bind of a 0750 file would be unrunnable for the jailed uid: the jail holds a root-owned
    // 0755 copy instead, with the source's content.
    let copy = std::fs::metadata(j.jail_dir().join("root/jail-probe")).unwrap();
    assert_ne!(
        r["exec_ino"],
        std::fs::metadata(&private).unwrap().ino().to_string()
    );
    assert_eq!(r["exec_ino"], copy.ino().to_string());
    assert_eq!(
        (copy.len(), copy.uid(), copy.permissions().mode() & 0o7777),
        (std::fs::metadata(PROBE).unwrap().len(), 0, 0o755)
    );
    j.cleanup();
}

#[test]
fn without_pid_ns_the_jailer_becomes_the_target() {
    if !root_or_skip("without_pid_ns_the_jailer_becomes_the_target") {
        return;
    }
    let j = TestJail::new("inplace");
    let child = j
        .command(&["--resource-limit", "nproc=64"], &["report"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    let r = ok_report(&out);
    assert_powerless(&r, j.uid);
    assert_eq!(
        r["pid"],
        pid.to_string(),
        "the jailer must exec the target in place"
    );
    assert_eq!(r["root_entries"], "dev,jail-probe,run");
    assert_eq!(r["rlimit_nproc"], "64");
    assert_eq!(r["rlimit_nofile"], jailer::DEFAULT_NO_FILE.to_string());
    j.cleanup();
}

/// An fd number the tests hand to mvm-jailer open and inheritable, as a careless parent would.
const INHERITED_FD: libc::c_int = 9;

/// `j`'s jailer command for `extra` flags with fd [`INHERITED_FD`] left open (not close-on-exec)
/// and an extra environment variable on top of the test's own environment.
fn leaky_command(j: &TestJail, extra: &[&str], inherited: &std::fs::File) -> Command {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let mut c = j.command(extra, &["report"]);
    c.env("MVM_JAILER_TEST_SECRET", "must-not-reach-the-target");
    let fd = inherited.as_raw_fd();
    // SAFETY: the closure runs in the forked child before exec and only calls dup2, which is
    // async-signal-safe; dup2 leaves the new fd without FD_CLOEXEC, so mvm-jailer inherits it.
    unsafe {
        c.pre_exec(move || {
            if libc::dup2(fd, INHERITED_FD) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    c
}

#[test]
fn inherited_fds_environment_and_ipc_namespace_stay_outside() {
    if !root_or_skip("inherited_fds_environment_and_ipc_namespace_stay_outside") {
        return;
    }
    let inherited = std::fs::File::open("/dev/null").unwrap();
    assert!(
        std::env::vars_os().next().is_some(),
        "the test's own environment is not empty"
    );
    let host_ipc = std::fs::read_link("/proc/self/ns/ipc").unwrap();
    let host_ipc = host_ipc.to_str().unwrap();

    // In a new pid namespace (the jailer stays outside and forks), and in place (it becomes the
    // target): only stdio reaches the target, with an empty environment (the jailer sets none).
    for extra in [&["--new-pid-ns", "--mount-proc"][..], &[]] {
        let j = TestJail::new("hygiene");
        let out = leaky_command(&j, extra, &inherited).output().unwrap();
        let r = ok_report(&out);
        assert_eq!(r["fds"], "0,1,2", "{extra:?}: fds open in the target");
        assert_eq!(r["env_vars"], "", "{extra:?}: environment of the target");
        if extra.is_empty() {
            // No procfs in the jail without --mount-proc.
            assert_eq!(r["ipc_ns"], "ENOENT");
        } else {
            assert!(r["ipc_ns"].starts_with("ipc:["), "{}", r["ipc_ns"]);
            assert_ne!(
                r["ipc_ns"], host_ipc,
                "the jail shares the host's ipc namespace"
            );
        }
        j.cleanup();
    }
}

#[test]
fn memory_limit_oom_kills_the_hog() {
    if !root_or_skip("memory_limit_oom_kills_the_hog") {
        return;
    }
    let j = TestJail::new("memhog");
    let limit = 64u64 << 20;
    let out = j.run(
        &["--cgroup", &format!("memory.limit_in_bytes={limit}")],
        &["memhog", "1024"],
    );
    assert_eq!(
        signal_of(&out),
        Some(libc::SIGKILL),
        "hog must be OOM-killed: {:?} {}",
        out.status,
        stderr(&out)
    );
    let r = report(&out);
    assert!(!r.contains_key("memhog_survived"));
    assert_eq!(
        j.cgroup_file("memory", "memory.limit_in_bytes").trim(),
        limit.to_string()
    );
    // Swap is off by default: memory+swap capped at the same value.
    if Path::new("/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes").exists() {
        assert_eq!(
            j.cgroup_file("memory", "memory.memsw.limit_in_bytes")
                .trim(),
            limit.to_string()
        );
    }
    let oom_kills: u64 = j
        .cgroup_file("memory", "memory.oom_control")
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(oom_kills >= 1);
    let peak: u64 = j
        .cgroup_file("memory", "memory.max_usage_in_bytes")
        .trim()
        .parse()
        .unwrap();
    assert!(peak <= limit, "peak {peak} above the limit");
    j.cleanup();
}

#[test]
fn cgroup_v1_values_are_applied_before_the_target_runs() {
    if !root_or_skip("cgroup_v1_values_are_applied_before_the_target_runs") {
        return;
    }
    // The whole disk under / (blkio throttling takes disks, not partitions).
    let root_dev = std::fs::metadata("/").unwrap().dev();
    let disk = format!("{}:0", libc::major(root_dev));
    let blkio = format!("blkio.throttle.read_bps_device={disk} 1048576");
    let j = TestJail::new("v1values");
    let settings = [
        "cpu.cfs_quota_us=50000",
        "cpu.shares=512",
        "cpuset.cpus=0",
        &blkio,
        "pids.max=32",
        "memory.limit_in_bytes=134217728",
    ];
    let mut args: Vec<&str> = settings.iter().flat_map(|s| ["--cgroup", *s]).collect();
    args.extend(["--new-pid-ns", "--mount-proc"]);
    let out = j.run(&args, &["report"]);
    if stderr(&out).contains("blkio.throttle.read_bps_device") {
        skip(&format!(
            "blkio check ({disk} is not a whole disk here): {}",
            stderr(&out).trim()
        ));
        j.assert_nothing_left();
        return;
    }
    let r = ok_report(&out);
    for (hierarchy, file, want) in [
        ("cpu", "cpu.cfs_quota_us", "50000"),
        ("cpu", "cpu.shares", "512"),
        ("cpuset", "cpuset.cpus", "0"),
        (
            "blkio",
            "blkio.throttle.read_bps_device",
            &format!("{disk} 1048576"),
        ),
        ("pids", "pids.max", "32"),
        ("memory", "memory.limit_in_bytes", "134217728"),
    ] {
        assert_eq!(
            j.cgroup_file(hierarchy, file).trim(),
            want,
            "{hierarchy}/{file}"
        );
        assert!(
            r["cgroup"].contains(&format!(":{hierarchy}:/{PARENT_CGROUP}/{}", j.id)),
            "{hierarchy}: {}",
            r["cgroup"]
        );
    }
    // cpuset.mems was empty in the new cpuset cgroup: inherited from the parent chain.
    assert!(!j.cgroup_file("cpuset", "cpuset.mems").trim().is_empty());
    j.cleanup();
}

#[test]
fn pids_limit_stops_a_fork_bomb() {
    if !root_or_skip("pids_limit_stops_a_fork_bomb") {
        return;
    }
    let j = TestJail::new("forkbomb");
    let r = ok_report(&j.run(
        &["--new-pid-ns", "--cgroup", "pids.max=16"],
        &["forkbomb", "10000"],
    ));
    let forked: u32 = r["forked"].parse().unwrap();
    // The init and the probe itself count too.
    assert!(forked <= 14, "forked {forked}");
    assert_eq!(r["fork_error"], "EAGAIN");
    let events = j.cgroup_file("pids", "pids.events");
    assert!(!events.contains("max 0"), "pids.events: {events}");
    j.cleanup();
}

#[test]
fn rlimits_hold() {
    if !root_or_skip("rlimits_hold") {
        return;
    }
    let j = TestJail::new("fsize");
    let r = ok_report(&j.run(
        &["--resource-limit", "fsize=4096"],
        &["fsize", "10000", "ignore"],
    ));
    assert_eq!(
        (r["written"].as_str(), r["write_error"].as_str()),
        ("4096", "EFBIG")
    );
    j.cleanup();

    let j = TestJail::new("fsizesig");
    let out = j.run(
        &["--resource-limit", "fsize=4096"],
        &["fsize", "10000", "signal"],
    );
    assert_eq!(signal_of(&out), Some(libc::SIGXFSZ));
    j.cleanup();

    let j = TestJail::new("nofile");
    let r = ok_report(&j.run(&["--resource-limit", "no-file=16"], &["nofile"]));
    let opened: u32 = r["opened"].parse().unwrap();
    assert!(
        opened <= 13,
        "opened {opened} files with no-file=16 (fds 0-2 are taken)"
    );
    assert_eq!(r["open_error"], "EMFILE");
    j.cleanup();
}

#[test]
fn seccomp_violation_kills_with_sigsys_and_is_reported() {
    if !root_or_skip("seccomp_violation_kills_with_sigsys_and_is_reported") {
        return;
    }
    let j = TestJail::new("seccomp");
    let out = j.run(&[], &["seccomp"]);
    assert_eq!(signal_of(&out), Some(libc::SIGSYS), "{:?}", out.status);
    assert_eq!(
        report(&out).get("filter_installed").map(String::as_str),
        Some("1")
    );
    assert!(!report(&out).contains_key("survived_forbidden_syscall"));
    j.cleanup();

    // Under --new-pid-ns the jailer supervises: it reports the death and exits 128 + SIGSYS.
    let j = TestJail::new("seccomppid");
    let out = j.run(&["--new-pid-ns"], &["seccomp"]);
    assert_eq!(out.status.code(), Some(128 + libc::SIGSYS));
    assert!(
        stderr(&out).contains("killed by signal 31 (SIGSYS"),
        "{}",
        stderr(&out)
    );
    j.cleanup();
}

#[test]
fn landlock_limits_writes_to_the_allowed_dirs() {
    if !root_or_skip("landlock_limits_writes_to_the_allowed_dirs") {
        return;
    }
    let shared = tempdir("landlock");
    std::fs::set_permissions(&*shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let mount = format!("{}:/data:rw", shared.display());
    let probe = ["report", "--write", "/data/x"];

    let j = TestJail::new("nolandlock");
    let r = ok_report(&j.run(&["--mount", &mount], &probe));
    assert_eq!(
        r["writes"], "/data/x:ok",
        "without Landlock the rw mount is writable"
    );
    j.cleanup();

    let j = TestJail::new("landlock");
    let out = j.run(&["--mount", &mount, "--landlock"], &probe);
    let r = ok_report(&out);
    if stderr(&out).contains("has no Landlock") {
        skip(&format!(
            "landlock enforcement checks: {}",
            stderr(&out).trim()
        ));
    } else {
        assert_eq!(
            r["writes"], "/data/x:EACCES",
            "Landlock must deny writes outside /run"
        );
        assert_eq!(r["reads"], "/data:ok", "reads stay allowed");
        assert_eq!(r["write_run"], "ok");
        assert_eq!(r["kvm_open"], "ok", "device nodes stay usable");
    }
    j.cleanup();

    let j = TestJail::new("landlockrw");
    // Another uid than the first jail's, which owns /data/x now.
    let r = ok_report(&j.run(
        &["--mount", &mount, "--landlock", "--landlock-write", "/data"],
        &["report", "--write", "/data/y"],
    ));
    assert_eq!(r["writes"], "/data/y:ok");
    assert_eq!(
        r["write_run"], "EACCES",
        "/run is writable only when listed"
    );
    j.cleanup();
}

#[test]
fn read_only_mounts_are_read_only() {
    if !root_or_skip("read_only_mounts_are_read_only") {
        return;
    }
    let shared = tempdir("romount");
    std::fs::set_permissions(&*shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::write(shared.join("kernel"), b"k").unwrap();
    let j = TestJail::new("romount");
    let dir_mount = format!("{}:/images", shared.display());
    let file_mount = format!("{}:/boot/vmlinux:ro", shared.join("kernel").display());
    let r = ok_report(&j.run(
        &["--mount", &dir_mount, "--mount", &file_mount],
        &["report", "--write", "/images/x", "--write", "/boot/vmlinux"],
    ));
    assert_eq!(r["writes"], "/images/x:EROFS,/boot/vmlinux:EROFS");
    assert_eq!(r["root_entries"], "boot,dev,images,jail-probe,run");
    // Bind mounts live only in the jail's mount namespace: on the host the mount points are plain.
    assert_eq!(
        std::fs::read_dir(j.jail_dir().join("root/images"))
            .unwrap()
            .count(),
        0
    );
    j.cleanup();
}

/// Links made at the top of the root resolve inside the jail: a write through `/bin`
/// (`-> usr/bin`) lands in the directory bound at `/usr`, an absolute target is the jail's.
#[test]
fn symlinks_at_the_root_resolve_inside_the_jail() {
    if !root_or_skip("symlinks_at_the_root_resolve_inside_the_jail") {
        return;
    }
    let usr = tempdir("symlinks");
    std::fs::create_dir(usr.join("bin")).unwrap();
    std::fs::set_permissions(usr.join("bin"), std::fs::Permissions::from_mode(0o777)).unwrap();
    let j = TestJail::new("symlinks");
    let mount = format!("{}:/usr:rw", usr.display());
    let r = ok_report(&j.run(
        &[
            "--mount",
            &mount,
            "--symlink",
            "/bin=usr/bin",
            "--symlink",
            "/sbin=/usr/bin",
        ],
        &["report", "--write", "/bin/a", "--write", "/sbin/b"],
    ));
    assert_eq!(r["writes"], "/bin/a:ok,/sbin/b:ok");
    assert_eq!(r["root_entries"], "bin,dev,jail-probe,run,sbin,usr");
    for name in ["a", "b"] {
        assert!(usr.join("bin").join(name).is_file(), "{name}");
    }
    j.cleanup();
}

/// `--dev-userfaultfd` gives the jail user a working `/dev/userfaultfd` (a jailed VMM's Uffd
/// snapshot backend); without it a jail has none.
#[test]
fn dev_userfaultfd_is_made_only_when_asked() {
    if !root_or_skip("dev_userfaultfd_is_made_only_when_asked") {
        return;
    }
    if !std::path::Path::new("/dev/userfaultfd").exists() {
        // Kernels before 6.1 have no such node: nothing to make.
        return skip("dev_userfaultfd_is_made_only_when_asked: the host has no /dev/userfaultfd");
    }
    let j = TestJail::new("nouffd");
    let r = ok_report(&j.run(&[], &["report"]));
    assert_eq!(r["userfaultfd_dev"], "ENOENT");
    j.cleanup();
    let j = TestJail::new("uffd");
    let r = ok_report(&j.run(&["--dev-userfaultfd"], &["report"]));
    assert_eq!(r["userfaultfd_dev"], "ok");
    j.cleanup();
}

/// A pty master opened on the host's /dev/ptmx, and its number in the host's /dev/pts.
fn host_pty() -> (std::os::fd::OwnedFd, u32) {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: posix_openpt takes flags only; the fd is checked before it is owned.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "host /dev/ptmx: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` was just opened and is owned by nothing else.
    let master = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let mut number: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int to a live local.
    let ret = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut number) };
    assert_eq!(ret, 0, "TIOCGPTN: {}", std::io::Error::last_os_error());
    (master, number)
}

#[test]
fn devpts_gives_the_jail_its_own_ptys_only() {
    if !root_or_skip("devpts_gives_the_jail_its_own_ptys_only") {
        return;
    }
    // Ptys open on the host meanwhile: two, so at least one has a number other than 0.
    let host = [host_pty(), host_pty()];
    let host_pts_dev = std::fs::metadata("/dev/pts").unwrap().dev();

    // Without the option a jail has no ptys at all.
    let j = TestJail::new("nodevpts");
    let r = ok_report(&j.run(&[], &["pty"]));
    assert_eq!(r["ptmx_open"], "ENOENT");
    j.cleanup();

    for extra in [
        &["--mount-devpts"][..],
        &[
            "--mount-devpts",
            "--new-pid-ns",
            "--mount-proc",
            "--landlock",
        ][..],
    ] {
        let j = TestJail::new("devpts");
        let r = ok_report(&j.run(extra, &["pty"]));
        assert_eq!(r["ptmx_link"], "pts/ptmx", "{extra:?}");
        assert_eq!(r["ptmx_open"], "ok", "{extra:?}");
        // The first pty of a fresh instance, owned by the jail's uid/gid, and a working one.
        assert_eq!(r["pty_number"], "0", "{extra:?}");
        assert_eq!(r["slave_open"], "ok", "{extra:?}");
        assert_eq!(r["slave_isatty"], "true", "{extra:?}");
        assert_eq!(r["slave_owner"], format!("{0}/{0}/620", j.uid), "{extra:?}");
        assert_eq!(r["pty_echo"], "ok", "{extra:?}");
        // Only its own pty is listed, never the host's, and it is another devpts.
        assert_eq!(r["pts_entries"], "0,ptmx", "{extra:?}");
        for (_, n) in &host {
            assert!(
                *n == 0 || !r["pts_entries"].split(',').any(|e| e == n.to_string()),
                "host pty {n} visible in the jail: {}",
                r["pts_entries"]
            );
        }
        let host_dev = format!(
            "{}:{}",
            libc::major(host_pts_dev),
            libc::minor(host_pts_dev)
        );
        assert_ne!(r["pts_dev"], host_dev, "{extra:?}: the host's devpts");
        // The mount lived in the jail's mount namespace only: removal is not refused.
        j.cleanup();
    }

    // The instance holds at most DEVPTS_MAX_PTYS: one jail cannot take everyone's ptys.
    let j = TestJail::new("devptsmax");
    let r = ok_report(&j.run(&["--mount-devpts"], &["ptys"]));
    assert_eq!(r["ptys_opened"], jailer::DEVPTS_MAX_PTYS.to_string());
    assert_eq!(r["ptys_error"], "ENOSPC");
    j.cleanup();
}

#[test]
fn netns_is_joined() {
    if !root_or_skip("netns_is_joined") {
        return;
    }
    let name = format!("mvmjt{}", std::process::id());
    let added = Command::new("ip").args(["netns", "add", &name]).status();
    if !matches!(added, Ok(s) if s.success()) {
        skip(&format!(
            "netns_is_joined: `ip netns add` is unavailable ({added:?})"
        ));
        return;
    }
    let j = TestJail::new("netns");
    let r = ok_report(&j.run(&["--netns", &format!("/var/run/netns/{name}")], &["report"]));
    assert_eq!(r["interfaces"], "lo");
    j.cleanup();
    Command::new("ip")
        .args(["netns", "delete", &name])
        .status()
        .unwrap();
}

/// Arguments the jailer refuses before it makes anything (exit status 1), each with what its
/// error says: added to the test jail's own (see [`TestJail::command`]).
const REFUSED: &[(&[&str], &str)] = &[
    (
        &["--cgroup", "memory.bogus_key=1"],
        "unknown cgroup key 'memory.bogus_key'",
    ),
    (
        &["--cgroup", "pids.max=16", "--cgroup", "nosuch.max=1"],
        "cgroup controller 'nosuch'",
    ),
    (
        &["--cgroup", "pids.max=lots"],
        "cannot set cgroup pids.max=lots",
    ),
    (
        &["--netns", "/var/run/netns/mvm-no-such-netns"],
        "open network namespace /var/run/netns/mvm-no-such-netns",
    ),
    // A file that is not a namespace: found only when joining, after the jail and cgroup exist.
    (
        &["--cgroup", "pids.max=16", "--netns", "/etc/hostname"],
        "join network namespace /etc/hostname",
    ),
    (
        &[
            "--new-pid-ns",
            "--cgroup",
            "pids.max=16",
            "--netns",
            "/etc/hostname",
        ],
        "join network namespace /etc/hostname",
    ),
    (
        &["--mount", "/nonexistent-mvm-path:/x"],
        "invalid --mount '/nonexistent-mvm-path'",
    ),
    (&["--mount", "/etc:/../x"], "jail path must be absolute"),
    (&["--mount-proc"], "needs --new-pid-ns"),
    (
        &["--mount-devpts", "--mount", "/etc:/dev/pts"],
        "managed by the jailer (--mount-devpts)",
    ),
    (
        &["--mount-devpts", "--mount", "/etc:/dev/pts/0"],
        "managed by the jailer (--mount-devpts)",
    ),
    (
        &["--mount-devpts", "--mount", "/etc/hostname:/dev/ptmx"],
        "managed by the jailer (--mount-devpts)",
    ),
    (
        &["--landlock", "--landlock-write", "/var"],
        "invalid --landlock-write '/var'",
    ),
    (
        &["--cgroup-version", "2", "--cgroup", "cgroup.procs=1"],
        "only cgroup.max.descendants",
    ),
    (
        &["--exec-file", "/nonexistent/vmm"],
        "invalid --exec-file /nonexistent/vmm",
    ),
    (&["--exec-file", "/tmp"], "not a regular file"),
    (
        &["--exec-file", "/usr/bin/true"],
        "needs the dynamic loader",
    ),
    (&["--id", "../etc"], "invalid --id '../etc'"),
    // -1 ("leave unchanged" to setresuid/setresgid) and root would keep the target root.
    (&["--uid", "4294967295"], "invalid --uid '4294967295'"),
    (&["--gid", "4294967295"], "invalid --gid '4294967295'"),
    (&["--uid", "0"], "invalid --uid '0': 0 is root"),
    (&["--gid", "0"], "invalid --gid '0': 0 is root"),
];

#[test]
fn bad_input_fails_clearly_and_leaves_nothing() {
    if !root_or_skip("bad_input_fails_clearly_and_leaves_nothing") {
        return;
    }
    let j = TestJail::new("bad");
    for (args, needle) in REFUSED {
        let out = j.run(args, &["report"]);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {:?}", out.status);
        assert!(
            stderr(&out).contains(needle),
            "{args:?}: expected '{needle}' in: {}",
            stderr(&out)
        );
        assert!(
            out.stdout.is_empty(),
            "{args:?}: the target must not have run"
        );
        j.assert_nothing_left();
    }
    // A uid that is no number is a usage error of the argument parser.
    let out = j.run(&["--uid", "root"], &["report"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--uid"), "{}", stderr(&out));

    // A chroot base on a nodev filesystem is refused (device nodes would not open there).
    let nodev = tempdir("nodev");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "nodev,size=64m", "tmpfs"])
        .arg(&*nodev)
        .status()
        .unwrap();
    assert!(mounted.success());
    let mut on_nodev = TestJail::new("nodev");
    std::fs::remove_dir(&on_nodev.base).unwrap();
    on_nodev.base = nodev.to_path_buf();
    let out = on_nodev.run(&["--cgroup", "pids.max=8"], &["report"]);
    let dir_left = on_nodev.jail_dir().exists();
    assert!(Command::new("umount")
        .arg(&*nodev)
        .status()
        .unwrap()
        .success());
    assert!(stderr(&out).contains("mounted nodev"), "{}", stderr(&out));
    assert!(!dir_left, "jail dir left on the nodev filesystem");
    on_nodev.assert_nothing_left();

    // A taken id: the first jail's directory stays (it is not this invocation's to remove).
    let first = ok_report(&j.run(&["--cgroup", "pids.max=16"], &["report"]));
    assert_eq!(first["hostname"], j.id);
    let out = j.run(&["--cgroup", "pids.max=16"], &["report"]);
    assert!(
        stderr(&out).contains("jail id already in use"),
        "{}",
        stderr(&out)
    );
    assert!(j.jail_dir().join("root/jail-probe").exists());
    assert_eq!(j.cgroups().len(), 1);
    j.cleanup();
}

#[test]
fn cleanup_refuses_while_running_and_removes_everything_after() {
    if !root_or_skip("cleanup_refuses_while_running_and_removes_everything_after") {
        return;
    }
    let j = TestJail::new("cleanup");
    let mut child = j
        .command(
            &[
                "--new-pid-ns",
                "--cgroup",
                "pids.max=8",
                "--cgroup",
                "memory.limit_in_bytes=33554432",
            ],
            &["pause"],
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    await_paused(&mut child);
    let cleanup = || {
        Command::new(JAILER)
            .args([
                "--cleanup",
                "--id",
                &j.id,
                "--exec-file-name",
                "jail-probe",
                "--parent-cgroup",
                PARENT_CGROUP,
            ])
            .arg("--chroot-base-dir")
            .arg(&j.base)
            .output()
            .unwrap()
    };
    let busy = cleanup();
    assert!(!busy.status.success());
    assert!(
        stderr(&busy).contains("still has processes"),
        "{}",
        stderr(&busy)
    );
    // SIGTERM to the jailer reaches the target through the jail's init.
    // SAFETY: plain kill of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    let deadline = Instant::now() + Duration::from_secs(5);
    while j.cgroups().iter().any(|c| {
        !std::fs::read_to_string(c.join("cgroup.procs"))
            .unwrap()
            .is_empty()
    }) {
        assert!(Instant::now() < deadline, "jailed processes did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = cleanup();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("removed "))
            .count(),
        3
    );
    j.assert_nothing_left();
    // Cleaning up a jail that is gone is not an error.
    assert!(cleanup().status.success());
}

#[test]
fn daemonize_detaches_and_runs_the_target() {
    if !root_or_skip("daemonize_detaches_and_runs_the_target") {
        return;
    }
    // A process-group leader cannot call setsid: the jailer forks for it.
    for (extra, group_leader) in [
        (&["--daemonize"][..], false),
        (&["--daemonize"][..], true),
        (&["--daemonize", "--new-pid-ns"][..], false),
    ] {
        let j = TestJail::new("daemon");
        let mut cmd = j.command(extra, &["report"]);
        if group_leader {
            std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
        assert!(
            out.stdout.is_empty() && out.stderr.is_empty(),
            "stdio must go to /dev/null"
        );
        // The probe's write to /run lands in the jail tree on the host.
        let marker = j.jail_dir().join("root/run/probe-file");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !marker.exists() {
            assert!(
                Instant::now() < deadline,
                "{extra:?}: the daemonized target never ran"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(50));
        j.cleanup();
    }
}

#[test]
fn cgroup_v2() {
    if !root_or_skip("cgroup_v2") {
        return;
    }
    let hierarchies = mvm_sys::cgroup::Hierarchies::read().expect("reading /proc/self/mountinfo");
    let Some(unified) = hierarchies.unified().map(|h| h.mount_point.clone()) else {
        skip("cgroup_v2: no cgroup2 hierarchy is mounted");
        return;
    };
    // The core interface works on any v2 hierarchy, with or without controllers.
    let j = TestJail::new("v2core");
    let r = ok_report(&j.run(
        &[
            "--cgroup-version",
            "2",
            "--new-pid-ns",
            "--mount-proc",
            "--cgroup",
            "cgroup.max.descendants=0",
        ],
        &["report"],
    ));
    assert!(
        r["cgroup"].contains(&format!("0::/{PARENT_CGROUP}/{}", j.id)),
        "{}",
        r["cgroup"]
    );
    let dir = unified.join(PARENT_CGROUP).join(&j.id);
    assert_eq!(
        std::fs::read_to_string(dir.join("cgroup.max.descendants"))
            .unwrap()
            .trim(),
        "0"
    );
    j.cleanup();

    let controllers = std::fs::read_to_string(unified.join("cgroup.controllers")).unwrap();
    let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
    let hugetlb_2mb = unified.join("hugetlb.2MB.max").exists()
        || Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists();
    if has("hugetlb") && hugetlb_2mb {
        // A controller that is on v2 here: the jailer enables it down the parent chain.
        let j = TestJail::new("v2hugetlb");
        ok_report(&j.run(
            &["--cgroup-version", "2", "--cgroup", "hugetlb.2MB.max=0"],
            &["report"],
        ));
        let parent = unified.join(PARENT_CGROUP);
        for dir in [&unified, &parent] {
            let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap();
            assert!(
                enabled.split_whitespace().any(|c| c == "hugetlb"),
                "{}: {enabled}",
                dir.display()
            );
        }
        assert_eq!(
            std::fs::read_to_string(parent.join(&j.id).join("hugetlb.2MB.max"))
                .unwrap()
                .trim(),
            "0"
        );
        j.cleanup();
        // A parent holding a process of its own cannot hand a controller to its children
        // (v2's "no internal processes" rule): the jailer says so and leaves nothing.
        let busy_parent = format!("{PARENT_CGROUP}-busy-{}", std::process::id());
        let busy = unified.join(&busy_parent);
        std::fs::create_dir(&busy).unwrap();
        let mut sleeper = Command::new("sleep").arg("600").spawn().unwrap();
        std::fs::write(busy.join("cgroup.procs"), sleeper.id().to_string()).unwrap();
        let j = TestJail::in_parent("v2busy", &busy_parent);
        let out = j.run(
            &["--cgroup-version", "2", "--cgroup", "hugetlb.2MB.max=0"],
            &["report"],
        );
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        std::fs::remove_dir(&busy).unwrap();
        assert!(!out.status.success(), "{}", stderr(&out));
        assert!(
            stderr(&out).contains(&format!(
                "cannot enable cgroup v2 controller 'hugetlb' in {}/cgroup.subtree_control",
                busy.display()
            )) && stderr(&out).contains("while it holds no processes itself"),
            "{}",
            stderr(&out)
        );
        j.assert_nothing_left();
    } else {
        skip("cgroup_v2 controller enabling check: hugetlb (2 MiB pages) is not available on the v2 hierarchy");
    }
    if !(has("memory") && has("pids")) {
        // A hybrid host binds memory and pids to v1 hierarchies: v2 must refuse, naming them.
        let j = TestJail::new("v2none");
        let out = j.run(
            &["--cgroup-version", "2", "--cgroup", "memory.max=64M"],
            &["report"],
        );
        assert!(
            stderr(&out)
                .contains("cgroup controller 'memory' (from key 'memory.max') is not available"),
            "{}",
            stderr(&out)
        );
        j.assert_nothing_left();
        skip(&format!("cgroup_v2 limit checks: {}/cgroup.controllers lists '{}' (memory and pids are bound to v1 on this hybrid host)",
            unified.display(),
            controllers.trim()
        ));
        return;
    }
    let j = TestJail::new("v2mem");
    let out = j.run(
        &["--cgroup-version", "2", "--cgroup", "memory.max=67108864"],
        &["memhog", "1024"],
    );
    assert_eq!(signal_of(&out), Some(libc::SIGKILL), "{}", stderr(&out));
    let dir = unified.join(PARENT_CGROUP).join(&j.id);
    if dir.join("memory.swap.max").exists() {
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.swap.max"))
                .unwrap()
                .trim(),
            "0"
        );
    }
    j.cleanup();
    let j = TestJail::new("v2pids");
    let r = ok_report(&j.run(
        &[
            "--cgroup-version",
            "2",
            "--new-pid-ns",
            "--cgroup",
            "pids.max=16",
        ],
        &["forkbomb", "10000"],
    ));
    assert!(r["forked"].parse::<u32>().unwrap() <= 14);
    j.cleanup();
}

#[test]
fn jailed_vmm_boots_a_test_guest() {
    if !root_or_skip("jailed_vmm_boots_a_test_guest") {
        return;
    }
    if !mvm_testkit::require_kvm("jailed_vmm_boots_a_test_guest") {
        return;
    }
    let vmm = Path::new(JAILER).with_file_name("mvm-vmm");
    assert!(
        vmm.exists(),
        "{} is not built: cargo build --workspace",
        vmm.display()
    );
    let j = TestJail::new("vmm");
    let uid = j.uid.to_string();
    // The guest and its configuration are bind-mounted read-only; paths are the jail's.
    let config_dir = tempdir("vmm-config");
    let config = config_dir.join("vm.json");
    std::fs::write(
        &config,
        r#"{"boot-source": {"kernel_image_path": "/guest.elf", "boot_args": "console=ttyS0"},
            "machine-config": {"vcpu_count": 2, "mem_size_mib": 64}}"#,
    )
    .unwrap();
    let guest = mvm_testkit::guest("hello");
    let out = Command::new(JAILER)
        .args(["--id", &j.id, "--uid", &uid, "--gid", &uid, "--new-pid-ns"])
        .args([
            "--parent-cgroup",
            PARENT_CGROUP,
            "--cgroup",
            "memory.limit_in_bytes=268435456",
        ])
        .arg("--exec-file")
        .arg(&vmm)
        .arg("--chroot-base-dir")
        .arg(&j.base)
        .arg("--mount")
        .arg(format!("{}:/guest.elf:ro", guest.display()))
        .arg("--mount")
        .arg(format!("{}:/vm.json:ro", config.display()))
        .args(["--", "--no-api", "--config-file", "/vm.json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "jailed mvm-vmm failed: {}",
        stderr(&out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Hello from the mvm test guest\n"
    );
    let cleaned = Command::new(JAILER)
        .args(["--cleanup", "--id", &j.id, "--parent-cgroup", PARENT_CGROUP])
        .arg("--chroot-base-dir")
        .arg(&j.base)
        .output()
        .unwrap();
    assert!(cleaned.status.success(), "{}", stderr(&cleaned));
    assert!(!j.base.join("mvm-vmm").join(&j.id).exists());
}

/// A host directory for a test, removed when dropped (also when the test panics).
struct TempDir(std::path::PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(name: &str) -> TempDir {
    let d = std::env::temp_dir().join(format!("mvm-jailer-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    TempDir(d)
}

#[test]
fn library_config_drives_the_binary() {
    if !root_or_skip("library_config_drives_the_binary") {
        return;
    }
    let shared = tempdir("library");
    std::fs::set_permissions(&*shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let j = TestJail::new("library");
    let mut config = jailer::JailConfig::new(j.id.clone(), PROBE, j.uid, j.uid);
    config.chroot_base_dir = j.base.clone();
    config.parent_cgroup = PARENT_CGROUP.into();
    config.new_pid_ns = true;
    config.mount_proc = true;
    config.landlock = true;
    config.landlock_write = vec!["/sock".into()];
    config.cgroups = vec!["pids.max=12".parse().unwrap()];
    config.resource_limits = vec!["no-file=64".parse().unwrap()];
    config.mounts = vec![format!("{}:/sock:rw", shared.display()).parse().unwrap()];
    config.args = vec!["report".into(), "--write".into(), "/sock/api.socket".into()];
    let r = ok_report(&config.command(JAILER).output().unwrap());
    assert_powerless(&r, j.uid);
    assert_eq!(r["rlimit_nofile"], "64");
    assert_eq!(r["writes"], "/sock/api.socket:ok");
    assert_eq!(r["write_run"], "EACCES", "Landlock: only /sock is writable");
    assert_eq!(j.cgroup_file("pids", "pids.max").trim(), "12");
    j.cleanup();
}

#[test]
fn a_prepared_jail_dropped_without_entering_is_removed() {
    if !root_or_skip("a_prepared_jail_dropped_without_entering_is_removed") {
        return;
    }
    let j = TestJail::new("prepared");
    let mut config = jailer::JailConfig::new(j.id.clone(), PROBE, j.uid, j.uid);
    config.chroot_base_dir = j.base.clone();
    config.parent_cgroup = PARENT_CGROUP.into();
    config.cgroups = vec![
        "pids.max=5".parse().unwrap(),
        "memory.limit_in_bytes=67108864".parse().unwrap(),
    ];
    let jail = jailer::Jail::prepare(config).unwrap();
    assert_eq!(jail.root_dir(), j.jail_dir().join("root"));
    assert!(jail.root_dir().join("jail-probe").is_file());
    let dirs: Vec<_> = jail.cgroups().iter().map(|c| c.path.clone()).collect();
    assert_eq!(dirs.len(), 2);
    assert!(dirs.iter().all(|d| d.is_dir()));
    drop(jail);
    j.assert_nothing_left();
}

#[test]
fn failures_after_the_privilege_drop() {
    if !root_or_skip("failures_after_the_privilege_drop") {
        return;
    }
    // With a pid namespace the jail's init cannot fork the target (nproc=1 counts the init
    // itself): the supervisor, still root outside, rolls everything back.
    let j = TestJail::new("nprocpid");
    let out = j.run(
        &[
            "--new-pid-ns",
            "--resource-limit",
            "nproc=1",
            "--cgroup",
            "pids.max=8",
        ],
        &["report"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("fork"), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("jail setup failed in the new pid namespace"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
    j.assert_nothing_left();

    // Without one, exec is refused once the jailer can no longer remove the jail: setuid to a
    // uid that already has more processes than nproc allows makes execve fail with EAGAIN.
    let busy = TestJail::new("nprocbusy");
    let mut paused = busy
        .command(&["--new-pid-ns"], &["pause"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    await_paused(&mut paused);
    let mut j = TestJail::new("nproc");
    j.uid = busy.uid;
    let out = j.run(
        &["--resource-limit", "nproc=1", "--cgroup", "pids.max=8"],
        &["report"],
    );
    // SAFETY: plain kill of our own child.
    unsafe { libc::kill(paused.id() as i32, libc::SIGTERM) };
    paused.wait().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("is left behind") && stderr(&out).contains("--cleanup"),
        "{}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty());
    assert!(j.jail_dir().join("root/jail-probe").exists());
    busy.cleanup();
    j.cleanup();
}

#[test]
fn sandbox_seccomp_policy_refuses_namespaces_and_kernel_attack_surface() {
    if !root_or_skip("sandbox_seccomp_policy_refuses_namespaces_and_kernel_attack_surface") {
        return;
    }
    // Both ways the jailer execs: as the pid namespace's init's child, and in place.
    for (name, extra) in [
        ("seccomppolicy", &["--new-pid-ns", "--mount-proc"][..]),
        ("seccompinplace", &[][..]),
    ] {
        let j = TestJail::new(name);
        let flags: Vec<&str> = extra
            .iter()
            .copied()
            .chain(["--seccomp-policy", "sandbox"])
            .collect();
        let r = ok_report(&j.run(&flags, &["syscalls"]));
        if extra.is_empty() {
            // No /proc in this jail: the filters are seen through their effect only.
            assert_eq!(r["seccomp_mode"], "unavailable");
        } else {
            assert_eq!(r["seccomp_mode"], "2", "{name}");
            assert_eq!(r["seccomp_filters"], "2", "{name}: sandbox + clone3");
        }
        for denied in [
            "unshare_user",
            "unshare_net",
            "clone_newuser",
            "setns",
            "keyctl",
            "io_uring_setup",
            "bpf",
            "userfaultfd",
            "mount",
            "ptrace",
            "process_vm_readv",
            "personality_norandom",
        ] {
            assert_eq!(r[denied], "EPERM", "{name}: {denied}");
        }
        assert_eq!(r["clone3"], "ENOSYS", "{name}: glibc falls back to clone");
        for works in ["fork", "thread", "exec", "personality_linux"] {
            assert_eq!(r[works], "ok", "{name}: {works}");
        }
        j.cleanup();
    }
}

/// `JailConfig::command` passes the caller's environment to no process of the jail: the
/// jailer processes that live as long as the jail (its pid namespace's reaper) keep their
/// initial environment in memory whatever they clear.
#[test]
fn the_callers_environment_reaches_no_jail_process() {
    if !root_or_skip("the_callers_environment_reaches_no_jail_process") {
        return;
    }
    const MARKER: &str = "MVM_JAILER_TEST_CREDENTIAL=never-in-a-jail";
    let (key, value) = MARKER.split_once('=').unwrap();
    let j = TestJail::new("noenv");
    let mut config = jailer::JailConfig::new(j.id.clone(), PROBE, j.uid, j.uid);
    config.chroot_base_dir = j.base.clone();
    config.parent_cgroup = PARENT_CGROUP.into();
    config.new_pid_ns = true;
    config.args = vec!["pause".into()];
    let mut cmd = config.command(JAILER);
    // As if set in the caller's own environment (the test process's stays as it is).
    let mut child = {
        std::env::set_var(key, value);
        let spawned = cmd.stdout(std::process::Stdio::piped()).spawn();
        std::env::remove_var(key);
        spawned.expect("spawn mvm-jailer")
    };
    await_paused(&mut child);
    let holders: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()))
        })
        .map(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default())
        .collect();
    // SAFETY: plain kill of our own child (the jailer passes SIGTERM on to the jail).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait().unwrap();
    j.cleanup();
    assert!(
        holders.is_empty(),
        "processes holding the caller's environment: {holders:?}"
    );
}

#[test]
fn seccomp_filter_file_from_the_library_config_reaches_the_jail() {
    if !root_or_skip("seccomp_filter_file_from_the_library_config_reaches_the_jail") {
        return;
    }
    let dir = tempdir("seccompfile");
    let policy = dir.join("policy.json");
    std::fs::write(
        &policy,
        r#"{"no_keys": {"default_action": "allow", "filter_action": {"errno": 1},
            "filter": [{"syscall": "keyctl"}]}}"#,
    )
    .unwrap();
    let j = TestJail::new("seccompfile");
    let mut config = jailer::JailConfig::new(j.id.clone(), PROBE, j.uid, j.uid);
    config.chroot_base_dir = j.base.clone();
    config.parent_cgroup = PARENT_CGROUP.into();
    config.new_pid_ns = true;
    config.mount_proc = true;
    config.seccomp = Some(jailer::SeccompPolicy::File(policy.clone()));
    config.args = vec!["syscalls".into()];
    let args = config.to_args();
    let at = args.iter().position(|a| a == "--seccomp-filter").unwrap();
    assert_eq!(args[at + 1], policy.as_os_str());
    let r = ok_report(&config.command(JAILER).output().unwrap());
    assert_eq!(r["seccomp_filters"], "1");
    assert_eq!(r["keyctl"], "EPERM");
    assert_eq!(r["clone3"], "ok", "only the file's filters are installed");
    j.cleanup();

    // A file that does not compile is refused before anything is made.
    std::fs::write(&policy, r#"{"x": {"default_action": "allow"}}"#).unwrap();
    let j = TestJail::new("seccompbad");
    let out = j.run(
        &["--seccomp-filter", &policy.to_string_lossy()],
        &["syscalls"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("invalid --seccomp-filter"),
        "{}",
        stderr(&out)
    );
    j.assert_nothing_left();
}

/// A SIGTERM to the jailer at any moment of its start (spawned as the library spawns it):
/// while it builds the jail, before the jail's init or its target exist, or after, ends it
/// one way: the target dies of it, the jailer leaves with 128 + SIGTERM, and the jail is left
/// for a cleanup that removes everything. Without the jailer holding the relayed signals until
/// it can pass them on, a signal in its set-up kills it halfway (no exit code) and one meant
/// for the jail's init before its handler is dropped (the target then never ends).
#[test]
fn a_sigterm_at_any_moment_of_the_start_reaches_the_target() {
    if !root_or_skip("a_sigterm_at_any_moment_of_the_start_reaches_the_target") {
        return;
    }
    let spawn = |j: &TestJail| {
        let mut config = jailer::JailConfig::new(j.id.clone(), PROBE, j.uid, j.uid);
        config.chroot_base_dir = j.base.clone();
        config.parent_cgroup = PARENT_CGROUP.into();
        config.new_pid_ns = true;
        config.cgroups = vec!["pids.max=8".parse().unwrap()];
        config.args = vec!["pause".into()];
        config
            .command(JAILER)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let terminate = |j: &TestJail, mut child: std::process::Child, after: Duration| {
        // SAFETY: plain kill of our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                // The jail's processes hold this test's output open: they go first.
                for cgroup in j.cgroups() {
                    let procs = std::fs::read_to_string(cgroup.join("cgroup.procs"));
                    for pid in procs.unwrap_or_default().lines() {
                        // SAFETY: plain kill of a process of this test's jail.
                        unsafe { libc::kill(pid.parse().unwrap_or(0), libc::SIGKILL) };
                    }
                }
                panic!("a SIGTERM {after:?} into the jailer's start was lost: it still runs");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(
            status.code(),
            Some(128 + libc::SIGTERM),
            "a SIGTERM {after:?} into the jailer's start: {status:?}"
        );
        j.cleanup();
    };
    // How long a start takes here, to spread the signals over it.
    let j = TestJail::new("term-start");
    let started = Instant::now();
    let mut child = spawn(&j);
    await_paused(&mut child);
    let start = started.elapsed();
    terminate(&j, child, start);
    const TRIES: u32 = 40;
    for n in 0..TRIES {
        let j = TestJail::new("term");
        let after = start * n / TRIES;
        let started = Instant::now();
        let child = spawn(&j);
        std::thread::sleep(after.saturating_sub(started.elapsed()));
        terminate(&j, child, after);
    }
}
