//! The VMM's per-thread seccomp filters: every thread of a running VMM is filtered, and a
//! syscall outside a filter kills the VMM with a report naming it.

use std::process::{Command, Stdio};
use std::time::Duration;

use mvm_testkit::{binary, config_for, guest, require_kvm, ScratchDir};
use vmm::seccomp::{Filters, SECCOMP_EXIT_CODE};

/// Runs `body` in a forked child and returns its exit status.
fn in_child(body: impl FnOnce()) -> i32 {
    // SAFETY: the child only runs `body` (async-signal-safe enough for a single-threaded test
    // body that installs a filter and makes syscalls) and then _exits.
    match unsafe { libc::fork() } {
        0 => {
            body();
            // SAFETY: leaving the child without running the parent's destructors.
            unsafe { libc::_exit(0) }
        }
        pid => {
            let mut status = 0;
            // SAFETY: waiting for our own child.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            assert!(
                libc::WIFEXITED(status),
                "child died by signal {}",
                libc::WTERMSIG(status)
            );
            libc::WEXITSTATUS(status)
        }
    }
}

#[test]
fn a_syscall_outside_the_vcpu_filter_ends_the_process_with_148() {
    let filters = Filters::builtin().expect("built-in filters compile");
    let status = in_child(|| {
        filters.apply("vcpu").expect("install the vcpu filter");
        // A vCPU thread never opens sockets.
        // SAFETY: plain syscall; the filter traps it before it runs.
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
    });
    assert_eq!(status, SECCOMP_EXIT_CODE);
}

#[test]
fn allowed_syscalls_pass_every_filter() {
    let filters = Filters::builtin().expect("built-in filters compile");
    for kind in vmm::seccomp::THREAD_KINDS {
        let status = in_child(|| {
            filters.apply(kind).expect("install filter");
            // write(2) on a valid fd is allowed everywhere.
            // SAFETY: writing zero bytes to stderr.
            unsafe { libc::write(2, std::ptr::null(), 0) };
        });
        assert_eq!(status, 0, "filter {kind}");
    }
}

#[test]
fn a_bad_filter_file_is_refused() {
    let dir = ScratchDir::new("seccomp");
    let path = dir.path().join("f.json");
    std::fs::write(&path, r#"{"vmm": {"default_action": "trap", "filter_action": "allow", "filter": [{"syscall": "read"}]}}"#).unwrap();
    let err = Filters::from_file(path.to_str().unwrap())
        .err()
        .expect("missing filters refused");
    assert!(err.to_string().contains("no `api` filter"), "{err}");
}

#[test]
fn every_thread_of_a_running_vmm_is_filtered() {
    if !require_kvm("every_thread_of_a_running_vmm_is_filtered") {
        return;
    }
    let dir = ScratchDir::new("seccomp-threads");
    let config = dir.path().join("vm.json");
    std::fs::write(
        &config,
        config_for(&guest("spin"), "console=ttyS0", 2, 32).to_string(),
    )
    .unwrap();
    let mut child = Command::new(binary("mvm-vmm"))
        .arg("--api-sock")
        .arg(dir.path().join("api.sock"))
        .arg("--config-file")
        .arg(&config)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let tasks = std::fs::read_dir(format!("/proc/{}/task", child.id())).unwrap();
    let mut seen = Vec::new();
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap();
        let name = status
            .lines()
            .next()
            .unwrap()
            .trim_start_matches("Name:")
            .trim()
            .to_string();
        let mode = status
            .lines()
            .find(|l| l.starts_with("Seccomp:"))
            .unwrap()
            .to_string();
        seen.push((name, mode));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.len() >= 4, "main, API and two vCPU threads: {seen:?}");
    assert!(seen.iter().all(|(_, mode)| mode.ends_with('2')), "{seen:?}");
}
