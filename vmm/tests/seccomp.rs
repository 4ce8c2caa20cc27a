//! The VMM's per-thread seccomp filters: every thread of a running VMM is filtered, and a
//! syscall outside a filter kills the VMM with a report naming it.

use std::process::{Command, Stdio};
use std::time::Duration;

use mvm_testkit::{binary, config_for, guest, require_kvm, ScratchDir};
use vmm::seccomp::{Filters, SECCOMP_EXIT_CODE};

/// Runs `body` in a forked child and returns its exit status.
fn in_child(body: impl FnOnce()) -> i32 {
    let status = in_child_raw(body);
    assert!(
        libc::WIFEXITED(status),
        "child died by signal {}",
        libc::WTERMSIG(status)
    );
    libc::WEXITSTATUS(status)
}

/// Runs `body` in a forked child and returns its wait status.
fn in_child_raw(body: impl FnOnce()) -> i32 {
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
            status
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

/// The built-in filters as JSON, with `syscall` taken out of the `kind` filter.
fn builtin_without(kind: &str, syscall: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/seccomp/x86_64.json");
    let mut filters: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let rules = filters[kind]["filter"].as_array_mut().unwrap();
    let before = rules.len();
    rules.retain(|rule| rule["syscall"] != syscall);
    assert!(rules.len() < before, "the `{kind}` filter allows {syscall}");
    filters.to_string()
}

#[test]
fn a_main_thread_violation_is_reported_with_the_syscall_and_the_filter() {
    if !require_kvm("a_main_thread_violation_is_reported_with_the_syscall_and_the_filter") {
        return;
    }
    let dir = ScratchDir::new("seccomp-report");
    // The event loop waits in epoll_wait(2) (syscall 232) as soon as the VM runs.
    let filter = dir.path().join("filters.json");
    std::fs::write(&filter, builtin_without("vmm", "epoll_wait")).unwrap();
    let config = dir.path().join("vm.json");
    std::fs::write(
        &config,
        config_for(&guest("spin"), "console=ttyS0", 1, 32).to_string(),
    )
    .unwrap();
    let child = Command::new(binary("mvm-vmm"))
        .arg("--no-api")
        .arg("--config-file")
        .arg(&config)
        .arg("--seccomp-filter")
        .arg(&filter)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let run = mvm_testkit::wait_with_timeout(child, Duration::from_secs(30));
    assert_eq!(run.code(), SECCOMP_EXIT_CODE, "{run:#?}");
    assert_eq!(
        run.stderr,
        "mvm-vmm: seccomp violation: syscall 232 in a thread under the `vmm` filter\n"
    );
}

/// A pipe whose buffer is full, so the next write(2) to its write end blocks.
fn full_pipe() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds were just created and are owned by nobody else.
    let (read, write) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    };
    // SAFETY: fcntl on an fd we own; the smallest pipe buffer keeps the fill short.
    unsafe {
        libc::fcntl(fds[1], libc::F_SETPIPE_SZ, 4096);
        libc::fcntl(fds[1], libc::F_SETFL, libc::O_NONBLOCK);
    }
    let chunk = [b'x'; 4096];
    // SAFETY: writing from a live buffer to our own pipe until it is full (EAGAIN).
    while unsafe { libc::write(fds[1], chunk.as_ptr().cast(), chunk.len()) } > 0 {}
    // Back to blocking: the flag belongs to the pipe end the VMM inherits.
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(fds[1], libc::F_SETFL, 0) };
    (read, write)
}

/// The main thread's `Seccomp:` mode (0 none, 2 filter) from /proc.
fn main_thread_seccomp_mode(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn the_main_thread_is_filtered_before_the_guest_runs() {
    if !require_kvm("the_main_thread_is_filtered_before_the_guest_runs") {
        return;
    }
    use std::io::Read;
    let dir = ScratchDir::new("seccomp-order");
    let config = dir.path().join("vm.json");
    let mut document = config_for(&guest("hello"), "console=ttyS0", 1, 32);
    // The VMM logs "microVM ... started" to stderr at Info level; a full stderr pipe stops the
    // main thread at that line and holds it there while the guest prints.
    document["logger"] = serde_json::json!({"level": "Info"});
    std::fs::write(&config, document.to_string()).unwrap();
    let (mut stderr, stderr_write) = full_pipe();
    let mut child = Command::new(binary("mvm-vmm"))
        .arg("--no-api")
        .arg("--config-file")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr_write))
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut console = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&console).contains("Hello from the mvm test guest") {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "the guest console ended early: {console:?}");
        console.extend_from_slice(&buf[..n]);
    }
    // The guest ran: whatever the main thread is doing now, it must already be confined.
    let mode = main_thread_seccomp_mode(child.id());
    let mut logged = Vec::new();
    stderr.read_to_end(&mut logged).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        mode, "2",
        "the guest ran while the main thread was unfiltered"
    );
    assert_eq!(status.code(), Some(0));
    assert!(
        String::from_utf8_lossy(&logged).contains("microVM anonymous-instance started"),
        "{}",
        String::from_utf8_lossy(logged.get(4096..).unwrap_or_default())
    );
}

/// The API thread serves every connection on its own epoll loop: under its filter no thread,
/// process or namespace can be made.
#[test]
fn under_the_api_filter_threads_forks_and_new_namespaces_end_the_process() {
    let filters = Filters::builtin().expect("built-in filters compile");
    let fork = || {
        // SAFETY: fork in a single-threaded child; the new process (if any) exits at once.
        unsafe { libc::fork() as libc::c_long }
    };
    let new_user_namespace = || {
        let flags = (libc::CLONE_NEWUSER | libc::SIGCHLD) as libc::c_ulong;
        // SAFETY: a fork-like clone (no CLONE_VM, so the child runs on a copy of this stack);
        // the new process (if any) exits at once.
        unsafe { libc::syscall(libc::SYS_clone, flags, 0usize, 0usize, 0usize, 0usize) }
    };
    let thread = || {
        // pthread_create: clone3, or clone(2) with the thread flags where clone3 fails.
        std::thread::spawn(|| ()).join().map_or(-1, |()| 1) as libc::c_long
    };
    for (what, attempt) in [
        ("a thread", &thread as &dyn Fn() -> libc::c_long),
        ("fork", &fork),
        ("clone(CLONE_NEWUSER)", &new_user_namespace),
    ] {
        let status = in_child_raw(|| {
            filters.apply("api").expect("install the api filter");
            let pid = attempt();
            // SAFETY: leaving the new process (pid 0) or the child without destructors.
            unsafe {
                libc::_exit(if pid > 0 {
                    1
                } else if pid == 0 {
                    0
                } else {
                    2
                })
            };
        });
        // The handler reports and exits with 148; glibc's pthread_create blocks every signal
        // around clone, and a blocked SIGSYS kills the process outright.
        let trapped = (libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == SECCOMP_EXIT_CODE)
            || (libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS);
        assert!(trapped, "{what} was not trapped: wait status {status:#x}");
    }
}
