//! The `mvm` binary as a user runs it, as root with the jail tier: daemonless, and through a
//! daemon started with `mvm serve`.

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use common::{serve, Env};
use mvm_testkit::{bin_dir, root_or_skip, text};

#[test]
fn daemonless_run_propagates_the_exit_code() {
    if !root_or_skip("daemonless_run_propagates_the_exit_code") {
        return;
    }
    let env = Env::new();
    let out = env.run(&[
        "run",
        "--rm",
        "--isolation",
        "jail",
        "--",
        "sh",
        "-c",
        "echo to-out; echo to-err >&2; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "to-out\n");
    assert!(text(&out.stderr).contains("to-err"));
    let out = env.run(&[
        "run",
        "--rm",
        "--isolation",
        "jail",
        "-e",
        "X=42",
        "--",
        "sh",
        "-c",
        "echo $X",
    ]);
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "42\n".into()),
        "{}",
        text(&out.stderr)
    );
    // Killed by a signal: 128 + signal, like a shell.
    let out = env.run(&[
        "run",
        "--rm",
        "--isolation",
        "jail",
        "--",
        "sh",
        "-c",
        "kill -9 $$",
    ]);
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    // -i feeds stdin.
    let mut child = env
        .mvm()
        .args([
            "run",
            "--rm",
            "-i",
            "--isolation",
            "jail",
            "--",
            "tr",
            "a-z",
            "A-Z",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("mvm run -i");
    child.stdin.take().unwrap().write_all(b"shout\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(text(&out.stdout), "SHOUT\n");
    // Without --rm the sandbox stays; a script's stderr gets only the command's, while -v (or
    // a terminal) also says how to remove it.
    let out = env.run(&[
        "run",
        "--isolation",
        "jail",
        "--",
        "sh",
        "-c",
        "echo kept >&2",
    ]);
    assert_eq!(
        (out.status.code(), text(&out.stderr)),
        (Some(0), "kept\n".into())
    );
    let out = env.run(&["run", "--verbose", "--isolation", "jail", "--", "true"]);
    let said = text(&out.stderr);
    assert!(
        said.contains("keeps running (remove it with `mvm rm "),
        "{said}"
    );
    // A person, whose stderr is a terminal, is told once without asking.
    let term = Term::open(24, 80);
    let out = env
        .mvm()
        .args(["run", "--isolation", "jail", "--", "true"])
        .stderr(term.slave.try_clone().unwrap())
        .output()
        .expect("mvm run");
    assert!(out.status.success());
    let shown = term.finish();
    assert_eq!(
        shown
            .matches("keeps running (remove it with `mvm rm ")
            .count(),
        1,
        "{shown}"
    );
    let out = env.run(&["-o", "json", "ps"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 3, "the three sandboxes run without --rm: {list}");
    let out = env.run(&[&["rm"][..], &ids].concat());
    assert!(out.status.success(), "{}", text(&out.stderr));
    env.assert_empty();
}

#[test]
fn tty_runs_on_a_pseudo_terminal_in_the_jail_tier() {
    if !root_or_skip("tty_runs_on_a_pseudo_terminal_in_the_jail_tier") {
        return;
    }
    let env = Env::new();
    let script = "test -t 0 && test -t 1 && echo on-a-tty; stty size; ls /dev/pts | tr '\\n' ' '";
    // The terminal turns the line ends into CR-LF; the jail's devpts lists only this pty.
    let want = "on-a-tty\r\n24 80\r\n0 ptmx ";
    let run_t = |mvm: &mut Command| {
        mvm.args(["run", "--rm", "-t", "--isolation", "jail", "--", "sh", "-c"])
            .arg(script)
            .stdin(Stdio::null())
            .output()
            .expect("mvm run -t")
    };
    let out = run_t(&mut env.mvm());
    assert_eq!(
        (out.status.code(), text(&out.stdout).as_str()),
        (Some(0), want),
        "daemonless: {}",
        text(&out.stderr)
    );
    let served = serve(&env);
    let out = run_t(
        env.mvm()
            .env("MVM_HOST", format!("unix:{}", served.socket.display())),
    );
    assert_eq!(
        (out.status.code(), text(&out.stdout).as_str()),
        (Some(0), want),
        "through mvmd: {}",
        text(&out.stderr)
    );
    drop(served);
    env.assert_empty();
}

#[test]
fn daemonless_vm_request_names_the_jail_tier() {
    if !root_or_skip("daemonless_vm_request_names_the_jail_tier") {
        return;
    }
    if mvm_sandbox::manager::vm_tier_unavailable(false).is_none() {
        eprintln!("SKIPPED daemonless_vm_request_names_the_jail_tier: this host has hardware KVM");
        return;
    }
    let env = Env::new();
    let out = env.run(&["run", "--rm", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("--isolation jail"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn through_mvmd() {
    if !root_or_skip("through_mvmd") {
        return;
    }
    let env = Env::new();
    let served = serve(&env);
    let host = format!("unix:{}", served.socket.display());
    let mvm = |args: &[&str]| {
        env.mvm()
            .env("MVM_HOST", &host)
            .args(args)
            .output()
            .expect("mvm")
    };
    let out = mvm(&[
        "run",
        "--rm",
        "--isolation",
        "jail",
        "--",
        "sh",
        "-c",
        "echo via-daemon; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "via-daemon\n");
    // A sandbox that stays: ps, exec, cp both ways, stats, logs, rm.
    let out = mvm(&["-o", "json", "run", "--isolation", "jail", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = mvm(&["-o", "json", "ps"]);
    let list: Vec<mvm_sandbox::model::Sandbox> =
        serde_json::from_slice(&out.stdout).expect("ps json");
    assert_eq!(list.len(), 1);
    let id = list[0].id.clone();
    let local = env.dir.path().join("payload");
    std::fs::write(&local, b"copied in\n").unwrap();
    let out = mvm(&["cp", local.to_str().unwrap(), &format!("{id}:/tmp/payload")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = mvm(&["exec", &id, "--", "cat", "/tmp/payload"]);
    assert_eq!(text(&out.stdout), "copied in\n");
    let out = mvm(&["cp", &format!("{id}:/tmp/payload"), "-"]);
    assert_eq!(text(&out.stdout), "copied in\n");
    let mut child = env
        .mvm()
        .env("MVM_HOST", &host)
        .args(["exec", "-i", &id, "--", "sh", "-c", "cat; exit 9"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("mvm exec -i");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"over websocket\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(9), "over websocket\n".into())
    );
    let out = mvm(&["-o", "json", "stats", &id]);
    let stats: Vec<mvm_sandbox::model::SandboxStats> =
        serde_json::from_slice(&out.stdout).expect("stats json");
    assert!(stats[0].pids >= 1, "{stats:?}");
    let out = mvm(&["logs", &id]);
    assert!(
        text(&out.stdout).contains("listening"),
        "{}",
        text(&out.stdout)
    );
    let out = mvm(&["templates"]);
    assert!(
        text(&out.stdout).contains("default"),
        "{}",
        text(&out.stdout)
    );
    let out = mvm(&["rm", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = mvm(&["exec", &id, "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("not_found"),
        "{}",
        text(&out.stderr)
    );
    // Without a token mvmd refuses.
    let out = env
        .mvm()
        .env("MVM_HOST", &host)
        .env("MVM_STATE_DIR", "/nonexistent")
        .args(["ps"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("unauthorized"),
        "{}",
        text(&out.stderr)
    );
    drop(served);
    env.assert_empty();
}

#[test]
fn concurrent_daemonless_runs_leave_each_other_alone() {
    if !root_or_skip("concurrent_daemonless_runs_leave_each_other_alone") {
        return;
    }
    let env = Env::new();
    // Each `mvm` reconciles the shared state on start while the others are mid-create.
    for round in 0..3 {
        let children: Vec<_> = (0..4)
            .map(|i| {
                env.mvm()
                    .args([
                        "run",
                        "--rm",
                        "--isolation",
                        "jail",
                        "--",
                        "echo",
                        &format!("run-{round}-{i}"),
                    ])
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("mvm run")
            })
            .collect();
        for (i, c) in children.into_iter().enumerate() {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "run {round}-{i}: {}",
                text(&out.stderr)
            );
            assert_eq!(text(&out.stdout), format!("run-{round}-{i}\n"));
        }
    }
    env.assert_empty();
}

/// A pseudo-terminal driven like a user's terminal emulator: the test types on the master
/// and reads what the terminal shows; `mvm` runs on the slave as its controlling terminal.
struct Term {
    master: std::fs::File,
    slave: std::fs::File,
    shown: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    reader: std::thread::JoinHandle<()>,
}

impl Term {
    /// A new pseudo-terminal of `rows` x `cols`, both ends close-on-exec from the start (a
    /// child another test spawns meanwhile must not hold this terminal open: its reader would
    /// never see the end).
    fn open(rows: u16, cols: u16) -> Term {
        use std::os::fd::FromRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC;
        // SAFETY: posix_openpt takes flags only; the fd is checked before it is owned.
        let fd = unsafe { libc::posix_openpt(flags) };
        assert!(fd >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let master = unsafe { std::fs::File::from_raw_fd(fd) };
        let mut name = [0 as libc::c_char; 64];
        // SAFETY: grantpt and unlockpt take the master's fd; ptsname_r writes at most
        // `name.len()` bytes, NUL-terminated, into `name`.
        let r = unsafe {
            if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
                -1
            } else {
                libc::ptsname_r(fd, name.as_mut_ptr(), name.len())
            }
        };
        assert_eq!(r, 0, "the pty's slave: {}", std::io::Error::last_os_error());
        // SAFETY: ptsname_r succeeded: `name` holds a NUL-terminated path.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) };
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(path.to_str().expect("a pty's name is ASCII"))
            .expect("opening the pty's slave");
        let shown = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut from_master = master.try_clone().expect("dup master");
        let sink = shown.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // EIO once every slave fd is closed.
            while let Ok(n @ 1..) = std::io::Read::read(&mut from_master, &mut buf) {
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        let term = Term {
            master,
            slave,
            shown,
            reader,
        };
        term.resize(rows, cols);
        term
    }

    /// Starts `cmd` (dropping it: it holds slave fds) in a session of its own with this terminal as its controlling terminal,
    /// stdin and stdout (stderr stays a pipe, for the diagnostics).
    fn spawn(&self, mut cmd: Command) -> Child {
        use std::os::unix::process::CommandExt;
        cmd.stdin(self.slave.try_clone().unwrap())
            .stdout(self.slave.try_clone().unwrap())
            .stderr(Stdio::piped());
        // SAFETY: the closure only makes async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn().expect("spawning mvm on the pty")
    }

    /// `stty ARG` of the terminal, as seen from its slave side.
    fn stty(&self, arg: &str) -> String {
        let out = Command::new("stty")
            .arg(arg)
            .stdin(self.slave.try_clone().unwrap())
            .output()
            .expect("stty");
        assert!(out.status.success(), "stty {arg}: {}", text(&out.stderr));
        text(&out.stdout)
    }

    fn type_in(&self, keys: &[u8]) {
        (&self.master).write_all(keys).expect("typing on the pty");
    }

    fn resize(&self, rows: u16, cols: u16) {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        use std::os::fd::AsRawFd;
        // SAFETY: TIOCSWINSZ reads one winsize, which outlives the call. The kernel sends
        // SIGWINCH to the terminal's foreground process group: mvm's.
        let r = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(r, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    fn shown(&self) -> String {
        text(&self.shown.lock().unwrap())
    }

    /// Waits until the terminal shows `want`, typing `keys` every 200 ms meanwhile.
    fn wait_for(&self, want: &str, keys: &[u8], child: &mut Child) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.shown().contains(want) {
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "mvm ended ({status}) before showing {want:?}; the terminal shows {:?}",
                    self.shown()
                );
            }
            assert!(
                Instant::now() < deadline,
                "waiting for {want:?}; the terminal shows {:?}",
                self.shown()
            );
            self.type_in(keys);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Waits (30 s at most) for `child`, started on this terminal, to exit; a child that
    /// does not is killed and the test fails with what the terminal shows.
    fn wait_exit(&self, mut child: Child) -> std::process::Output {
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().unwrap();
                panic!(
                    "mvm did not exit within 30 s; it said {:?}; the terminal shows {:?}",
                    text(&out.stderr),
                    self.shown()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        child.wait_with_output().unwrap()
    }

    /// Waits until `child` made the terminal raw (keys typed before would be echoed locally).
    fn wait_raw(&self, child: &mut Child) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !is_raw(&self.stty("-a")) {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("mvm ended ({status}) before making the terminal raw");
            }
            assert!(Instant::now() < deadline, "the terminal never went raw");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the terminal showed, once all is closed.
    fn finish(self) -> String {
        drop(self.slave);
        self.reader.join().expect("pty reader");
        text(&self.shown.lock().unwrap())
    }
}

/// Whether `stty -a` says the terminal is raw (no line editing, echo or signal keys).
fn is_raw(stty_a: &str) -> bool {
    let words: Vec<&str> = stty_a.split([' ', ';', '\n']).collect();
    ["-icanon", "-echo", "-isig"]
        .iter()
        .all(|w| words.contains(w))
}

/// `mvm run -t` on a 17x91 terminal (from `host`'s env): the sandbox's pty is 17x91 from the
/// start (a command that asks at once sees it) and follows a resize to 33x120; the terminal is raw meanwhile (the sandbox echoes input once,
/// ^C interrupts the sandbox's command, not mvm) and restored after.
fn check_raw_tty_exec(env: &Env, host: Option<&str>) {
    let term = Term::open(17, 91);
    let before = term.stty("-g");
    assert!(!is_raw(&term.stty("-a")));
    let mut mvm = env.mvm_at(host);
    mvm.args(["run", "--rm", "-t", "--isolation", "jail", "--", "sh", "-c"])
        .arg("stty size; while read line; do stty size; done");
    let mut child = term.spawn(mvm);
    term.wait_raw(&mut child);
    term.wait_for("17 91\r\n", b"", &mut child);
    // Each line typed makes the sandbox print its terminal's size.
    term.type_in(b"one\r");
    term.wait_for("one\r\n17 91\r\n", b"", &mut child);
    term.resize(33, 120);
    term.wait_for("33 120\r\n", b"again\r", &mut child);
    term.type_in(b"\x03");
    let out = term.wait_exit(child);
    // sh died of the SIGINT that ^C raised on the sandbox's terminal: 128 + 2.
    assert_eq!(out.status.code(), Some(130), "{}", text(&out.stderr));
    assert_eq!(term.stty("-g"), before, "the terminal was not restored");
    let shown = term.finish();
    // Echoed once, by the sandbox's terminal (a cooked local one would echo it too).
    assert!(shown.starts_with("17 91\r\none\r\n17 91\r\n"), "{shown:?}");
    assert!(shown.ends_with("^C"), "{shown:?}");
}

/// Runs `check` daemonless, then through `mvm serve`, in one environment left empty.
fn on_both_backends(test: &str, check: fn(&Env, Option<&str>)) {
    if !root_or_skip(test) {
        return;
    }
    let env = Env::new();
    check(&env, None);
    let served = serve(&env);
    check(&env, Some(&format!("unix:{}", served.socket.display())));
    drop(served);
    env.assert_empty();
}

#[test]
fn tty_on_a_terminal_is_raw_sized_and_resized() {
    on_both_backends(
        "tty_on_a_terminal_is_raw_sized_and_resized",
        check_raw_tty_exec,
    );
}

/// `mvm exec -t` on a terminal, ended by SIGTERM to mvm: mvm exits 143, the sandbox's command
/// is killed, the terminal is restored; short `-t` execs exit with their code; a failing `-t`
/// exec restores the terminal too.
fn check_tty_exec_terminated(env: &Env, host: Option<&str>) {
    let mvm = || env.mvm_at(host);
    let out = mvm()
        .args(["-o", "json", "run", "--isolation", "jail", "--", "true"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = mvm().args(["-o", "json", "ps"]).output().unwrap();
    let list: Vec<mvm_sandbox::model::Sandbox> =
        serde_json::from_slice(&out.stdout).expect("ps json");
    assert_eq!(list.len(), 1, "{list:?}");
    let id = list[0].id.clone();
    // A command that would run for long after the first line.
    let term = Term::open(20, 60);
    let before = term.stty("-g");
    let mut exec = mvm();
    exec.args([
        "exec",
        "-t",
        &id,
        "--",
        "sh",
        "-c",
        "read line; echo started; sleep 1000",
    ]);
    let mut child = term.spawn(exec);
    term.wait_raw(&mut child);
    term.wait_for("started", b"go\r", &mut child);
    // SAFETY: plain kill of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = term.wait_exit(child);
    assert_eq!(out.status.code(), Some(143), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("terminated by signal 15"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(term.stty("-g"), before, "the terminal was not restored");
    let out = mvm()
        .args(["exec", &id, "--", "sh", "-c", "cat /proc/[0-9]*/comm"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stdout).contains("sleep"),
        "{}",
        text(&out.stdout)
    );
    // Commands that end at once: their exit code, even when the terminal's size reaches the
    // sandbox after their end.
    for _ in 0..10 {
        let mut exec = mvm();
        exec.args(["exec", "-t", &id, "--", "sh", "-c", "exit 7"]);
        let out = term.wait_exit(term.spawn(exec));
        assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    }
    // An exec that fails (no such sandbox) after the terminal went raw.
    let mut exec = mvm();
    exec.args(["exec", "-t", "nosuchsandbox", "--", "true"]);
    let child = term.spawn(exec);
    let out = term.wait_exit(child);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert_eq!(term.stty("-g"), before, "the terminal was not restored");
    term.finish();
    let out = mvm().args(["rm", &id]).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn tty_exec_ended_by_a_signal_restores_the_terminal() {
    on_both_backends(
        "tty_exec_ended_by_a_signal_restores_the_terminal",
        check_tty_exec_terminated,
    );
}

/// Runs `mvm ARGS` (against `host`, or daemonless) and parses its stdout as JSON.
fn mvm_json(env: &Env, host: Option<&str>, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let out = env.mvm_at(host).args(args).output().expect("mvm");
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "mvm {args:?}: stdout is not JSON ({e}): {:?}; stderr: {}",
            text(&out.stdout),
            text(&out.stderr)
        )
    });
    (out.status.code(), v)
}

/// Every answer about a sandbox names its isolation tier, and `-o json` is JSON everywhere;
/// a text `run`'s stdout stays the command's alone.
fn check_tiers_and_json(env: &Env, host: Option<&str>) {
    let mvm = |args: &[&str]| env.mvm_at(host).args(args).output().expect("mvm");
    // stderr is a pipe here: the tier is told on it with --verbose only.
    let out = mvm(&["run", "--rm", "--isolation", "jail", "--", "echo", "hi"]);
    assert_eq!(text(&out.stdout), "hi\n");
    assert!(!text(&out.stderr).contains("tier"), "{}", text(&out.stderr));
    let out = mvm(&[
        "run",
        "--rm",
        "--verbose",
        "--isolation",
        "jail",
        "--",
        "echo",
        "hi",
    ]);
    assert_eq!(text(&out.stdout), "hi\n");
    assert!(
        text(&out.stderr).contains("(jail tier)"),
        "{}",
        text(&out.stderr)
    );
    // A kept sandbox: the run's JSON has it and the exec's result.
    let (code, v) = mvm_json(
        env,
        host,
        &[
            "-o",
            "json",
            "run",
            "--isolation",
            "jail",
            "--",
            "sh",
            "-c",
            "echo out; exit 3",
        ],
    );
    assert_eq!(code, Some(3), "{v}");
    assert_eq!(v["sandbox"]["isolation"], "jail", "{v}");
    assert_eq!(
        (&v["exec"]["stdout"], &v["exec"]["exit_code"]),
        (&"out\n".into(), &3.into())
    );
    let id = v["sandbox"]["id"].as_str().expect("sandbox id").to_owned();
    let (code, v) = mvm_json(
        env,
        host,
        &["-o", "json", "exec", &id, "--", "echo", "again"],
    );
    assert_eq!(code, Some(0));
    assert_eq!(
        (&v["sandbox"]["id"], &v["sandbox"]["isolation"]),
        (&id.as_str().into(), &"jail".into())
    );
    assert_eq!(v["exec"]["stdout"], "again\n");
    // Text answers name the tier.
    let out = mvm(&["pause", &id]);
    assert_eq!(
        text(&out.stdout),
        format!("{id} (jail tier) paused\n"),
        "{}",
        text(&out.stderr)
    );
    let out = mvm(&["resume", &id]);
    assert_eq!(
        text(&out.stdout),
        format!("{id} (jail tier) running\n"),
        "{}",
        text(&out.stderr)
    );
    let out = mvm(&["stats", &id]);
    let lines: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    assert!(
        lines[0].contains("TIER") && lines[0].contains("RSS(MiB)"),
        "{lines:?}"
    );
    let row: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&row[..2], [id.as_str(), "jail"], "{lines:?}");
    let (_, v) = mvm_json(env, host, &["-o", "json", "stats", &id]);
    assert_eq!(
        (&v[0]["id"], &v[0]["isolation"]),
        (&id.as_str().into(), &"jail".into()),
        "{v}"
    );
    let (_, v) = mvm_json(env, host, &["-o", "json", "logs", &id]);
    assert_eq!(
        (&v["id"], &v["isolation"]),
        (&id.as_str().into(), &"jail".into())
    );
    assert!(
        v["log"].as_str().is_some_and(|l| l.contains("listening")),
        "{v}"
    );
    // cp, both ways.
    let local = env.dir.path().join("to-copy");
    std::fs::write(&local, b"copied\n").unwrap();
    let remote = format!("{id}:/tmp/copied");
    let (code, v) = mvm_json(
        env,
        host,
        &["-o", "json", "cp", local.to_str().unwrap(), &remote],
    );
    assert_eq!(code, Some(0));
    assert_eq!(
        (&v["isolation"], &v["direction"], &v["bytes"]),
        (&"jail".into(), &"in".into(), &7.into()),
        "{v}"
    );
    let (_, v) = mvm_json(env, host, &["-o", "json", "cp", &remote, "-"]);
    assert_eq!(
        (&v["direction"], &v["content_base64"]),
        (&"out".into(), &"Y29waWVkCg==".into()),
        "{v}"
    );
    let back = env.dir.path().join("copied-back");
    let (_, v) = mvm_json(
        env,
        host,
        &["-o", "json", "cp", &remote, back.to_str().unwrap()],
    );
    assert_eq!(v["local"], back.to_str().unwrap(), "{v}");
    assert_eq!(std::fs::read(&back).unwrap(), b"copied\n");
    // rm: one result per id, the failed one too.
    let (code, v) = mvm_json(env, host, &["-o", "json", "rm", &id, "nosuchsandbox"]);
    assert_eq!(code, Some(1), "{v}");
    assert_eq!(
        (&v[0]["id"], &v[0]["isolation"], &v[0]["removed"]),
        (&id.as_str().into(), &"jail".into(), &true.into()),
        "{v}"
    );
    assert_eq!(
        (&v[1]["id"], &v[1]["removed"]),
        (&"nosuchsandbox".into(), &false.into()),
        "{v}"
    );
    assert!(
        v[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("nosuchsandbox")),
        "{v}"
    );
}

#[test]
fn answers_name_the_tier_and_json_is_json_everywhere() {
    on_both_backends(
        "answers_name_the_tier_and_json_is_json_everywhere",
        check_tiers_and_json,
    );
}

#[test]
fn build_skip_kernel_makes_a_jail_template_without_any_kernel() {
    if !root_or_skip("build_skip_kernel_makes_a_jail_template_without_any_kernel") {
        return;
    }
    let env = Env::new();
    // Artifacts of their own: no kernel was ever built there.
    let artifacts = env.dir.path().join("artifacts");
    let mvm = |args: &[&str]| {
        env.mvm()
            .env("MVM_ARTIFACTS", &artifacts)
            .args(args)
            .output()
            .expect("mvm")
    };
    let agent = format!("--agent {}", bin_dir().join("mvm-agent").display());
    let out = mvm(&[
        "build",
        "--skip-kernel",
        "--name",
        "jailonly",
        "--rootfs-args",
        &agent,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(!artifacts.join("vmlinux").exists());
    let kernel = artifacts.join("vmlinux");
    assert_eq!(
        text(&out.stdout),
        format!(
            "template jailonly registered: kernel {} (not built: jail tier only), rootfs {}\n",
            kernel.display(),
            artifacts.join("rootfs.ext4").display()
        )
    );
    let out = mvm(&[
        "run",
        "--rm",
        "--isolation",
        "jail",
        "jailonly",
        "--",
        "echo",
        "jail only",
    ]);
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "jail only\n".into()),
        "{}",
        text(&out.stderr)
    );
    env.assert_empty();
}

/// `mvm build` warms a template that has a kernel where the host runs the vm tier; where it
/// cannot (this host: kvm_pvm or no /dev/kvm) the template is registered and the answer says it
/// was not warmed. The kernel comes from the build cache (the suite's kernel stage built it).
#[test]
fn build_says_whether_the_template_was_warmed() {
    if !root_or_skip("build_says_whether_the_template_was_warmed") {
        return;
    }
    if mvm_sandbox::manager::vm_tier_unavailable(false).is_none() {
        eprintln!("build_says_whether_the_template_was_warmed: this host runs the vm tier; the nested suite warms");
        return;
    }
    let env = Env::new();
    let artifacts = env.dir.path().join("artifacts");
    let agent = format!("--agent {}", bin_dir().join("mvm-agent").display());
    let out = env
        .mvm()
        .env("MVM_ARTIFACTS", &artifacts)
        .args(["build", "--name", "built", "--rootfs-args", &agent])
        .output()
        .expect("mvm");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(artifacts.join("vmlinux").is_file(), "{said}");
    assert!(
        said.starts_with("template built registered: kernel ")
            && said.ends_with("; not warmed: this host cannot run the vm tier\n"),
        "{said}"
    );
    let out = env
        .mvm()
        .args(["-o", "json", "templates"])
        .output()
        .expect("mvm");
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let built = listed
        .as_array()
        .and_then(|l| l.iter().find(|t| t["name"] == "built"))
        .expect("the built template is listed");
    assert!(built.get("snapshot").is_none(), "{built}");
    env.assert_empty();
}

#[test]
fn the_env_cgroup_parent_holds_its_sandboxes_and_goes_with_it() {
    if !root_or_skip("the_env_cgroup_parent_holds_its_sandboxes_and_goes_with_it") {
        return;
    }
    let env = Env::new();
    let out = env.run(&["-o", "json", "run", "--isolation", "jail", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")["sandbox"]
        ["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let cgroups = env.sandbox_cgroups();
    assert!(
        !cgroups.is_empty() && cgroups.iter().all(|c| c.ends_with(&id)),
        "the sandbox's cgroups must be under {}: {cgroups:?}",
        env.cgroup_parent
    );
    assert!(env.leftovers().iter().any(|l| l.starts_with("process ")));
    let out = env.run(&["rm", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    env.assert_empty();
    let parents = env.cgroup_parents();
    assert!(parents.iter().any(|p| p.is_dir()), "{parents:?}");
    drop(env);
    for p in parents {
        assert!(!p.exists(), "{} outlived the test environment", p.display());
    }
}

/// The id of the only sandbox of `env` (`mvm -o json ps`).
fn only_sandbox(env: &Env) -> mvm_sandbox::model::Sandbox {
    let out = env.run(&["-o", "json", "ps"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mut list: Vec<mvm_sandbox::model::Sandbox> =
        serde_json::from_slice(&out.stdout).expect("ps json");
    assert_eq!(list.len(), 1, "{list:?}");
    list.remove(0)
}

#[test]
fn daemonless_cp_both_ways() {
    if !root_or_skip("daemonless_cp_both_ways") {
        return;
    }
    let env = Env::new();
    let out = env.run(&["run", "--isolation", "jail", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = only_sandbox(&env).id;
    // In: every byte value, from a file and from stdin.
    let payload: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    let local = env.dir.path().join("payload");
    std::fs::write(&local, &payload).expect("payload");
    let remote = format!("{id}:/tmp/payload");
    let out = env.run(&["cp", local.to_str().expect("utf-8"), &remote]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = env.run(&["exec", &id, "--", "wc", "-c", "/tmp/payload"]);
    assert_eq!(text(&out.stdout).split_whitespace().next(), Some("70000"));
    let mut child = env
        .mvm()
        .args(["cp", "-", &format!("{id}:/tmp/from-stdin")])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mvm cp -");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"from stdin\n")
        .expect("write");
    let out = child.wait_with_output().expect("mvm cp -");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = env.run(&["exec", &id, "--", "cat", "/tmp/from-stdin"]);
    assert_eq!(text(&out.stdout), "from stdin\n");
    // Out: to a file and to stdout, byte for byte, including a file made inside.
    let back = env.dir.path().join("back");
    let out = env.run(&["cp", &remote, back.to_str().expect("utf-8")]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(std::fs::read(&back).expect("copied out") == payload);
    let out = env.run(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo made inside > /tmp/inside",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = env.run(&["cp", &format!("{id}:/tmp/inside"), "-"]);
    assert_eq!(text(&out.stdout), "made inside\n");
    // Missing files on either side: exit 125 naming the path.
    let out = env.run(&["cp", &format!("{id}:/tmp/nothing"), "-"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("/tmp/nothing"),
        "{}",
        text(&out.stderr)
    );
    let missing = env.dir.path().join("nothing");
    let out = env.run(&["cp", missing.to_str().expect("utf-8"), &remote]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains(missing.to_str().expect("utf-8")),
        "{}",
        text(&out.stderr)
    );
    let out = env.run(&["rm", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    env.assert_empty();
}

/// CPU time of sandbox `id` of `env` so far, ns (its cgroups, as the manager reads them).
fn cpu_ns(env: &Env, id: &str) -> u64 {
    mvm_sandbox::manager::cgroups::cgroup_usage(&env.cgroup_parent, id).0
}

/// Polls until sandbox `id` has used `more` ns of CPU time beyond `from`.
fn wait_cpu_beyond(env: &Env, id: &str, from: u64, more: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while cpu_ns(env, id) < from + more {
        assert!(
            Instant::now() < deadline,
            "sandbox {id} does not run: {} ns of CPU time",
            cpu_ns(env, id)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `--on-timeout pause --auto-resume`: the next mvm after the timeout finds the sandbox
/// frozen, not removed, and an exec resumes it; lifecycles a sandbox cannot follow are refused
/// before anything is made.
#[test]
fn daemonless_timeout_pauses_and_an_exec_resumes() {
    if !root_or_skip("daemonless_timeout_pauses_and_an_exec_resumes") {
        return;
    }
    let env = Env::new();
    for (args, names) in [
        (&["--on-timeout", "save"][..], "vm tier"),
        (&["--auto-resume"][..], "on_timeout"),
    ] {
        let out = env.run(&[&["run", "--isolation", "jail"], args, &["--", "true"]].concat());
        assert!(!out.status.success());
        assert!(text(&out.stderr).contains(names), "{}", text(&out.stderr));
    }
    let out = env.run(&["-o", "json", "ps"]);
    assert_eq!(
        text(&out.stdout).trim(),
        "[]",
        "a refused lifecycle made a sandbox"
    );
    let out = env.run(&[
        "run",
        "--isolation",
        "jail",
        "--timeout",
        "1",
        "--on-timeout",
        "pause",
        "--auto-resume",
        "-d",
        "--",
        "sh",
        "-c",
        "echo kept > /tmp/kept; sleep 1000",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    std::thread::sleep(Duration::from_millis(2500));
    let paused = only_sandbox(&env);
    assert_eq!(paused.state, mvm_sandbox::model::SandboxState::Paused);
    let out = env.run(&["exec", &paused.id, "--", "cat", "/tmp/kept"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "kept\n");
    let out = env.run(&["rm", &paused.id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[test]
fn daemonless_pause_freezes_and_resume_thaws() {
    if !root_or_skip("daemonless_pause_freezes_and_resume_thaws") {
        return;
    }
    let env = Env::new();
    let out = env.run(&["run", "--isolation", "jail", "--", "true"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = only_sandbox(&env).id;
    // A busy loop, for as long as its exec lasts.
    let mut spin = env
        .mvm()
        .args(["exec", &id, "--", "sh", "-c", "while :; do :; done"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mvm exec");
    wait_cpu_beyond(&env, &id, cpu_ns(&env, &id), 50_000_000);
    // Only a micro-VM is saved to disk: the jail tier's answer says so, and it runs on.
    let out = env.run(&["pause", "--save", &id]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("vm-tier"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        only_sandbox(&env).state,
        mvm_sandbox::model::SandboxState::Running
    );
    let out = env.run(&["pause", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("paused"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        only_sandbox(&env).state,
        mvm_sandbox::model::SandboxState::Paused
    );
    // Frozen: not a millisecond of CPU time in 300 ms (the loop would use all of them).
    let frozen = cpu_ns(&env, &id);
    std::thread::sleep(Duration::from_millis(300));
    let later = cpu_ns(&env, &id);
    assert!(
        later - frozen < 1_000_000,
        "a paused sandbox used {} ns of CPU time",
        later - frozen
    );
    let out = env.run(&["resume", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("running"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(
        only_sandbox(&env).state,
        mvm_sandbox::model::SandboxState::Running
    );
    wait_cpu_beyond(&env, &id, later, 50_000_000);
    let out = env.run(&["rm", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let _ = spin.kill();
    let _ = spin.wait();
    env.assert_empty();
}

#[test]
fn daemonless_cpus_and_memory_reach_the_cgroups() {
    if !root_or_skip("daemonless_cpus_and_memory_reach_the_cgroups") {
        return;
    }
    let env = Env::new();
    let out = env.run(&[
        "run",
        "--isolation",
        "jail",
        "--cpus",
        "2",
        "--memory",
        "96",
        "--",
        "true",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = only_sandbox(&env);
    assert_eq!((s.vcpus, s.memory_mib), (2, 96));
    let cgroups = mvm_sandbox::manager::cgroups::LimitCgroups::of(&env.cgroup_parent, &s.id)
        .expect("the sandbox's cgroups");
    let (quota, period) = cgroups.cpu_quota().expect("cpu quota");
    assert_eq!(quota, Some(2 * period), "2 cores of CFS bandwidth");
    let (dir, file) = match &cgroups {
        mvm_sandbox::manager::cgroups::LimitCgroups::V1 { memory, .. } => {
            (memory, "memory.limit_in_bytes")
        }
        mvm_sandbox::manager::cgroups::LimitCgroups::V2(dir) => (dir, "memory.max"),
    };
    let limit = std::fs::read_to_string(dir.join(file)).expect("memory limit");
    assert_eq!(limit.trim(), (96u64 << 20).to_string(), "{}", dir.display());
    let out = env.run(&["rm", &s.id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    env.assert_empty();
}
