//! Process plumbing: inherited state scrubbing, fork, the pid-namespace init, daemonizing, exec.

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::error::{check, Error, Result};

/// Step 1 process hygiene: closes every inherited fd above 2, empties the environment and sets a
/// known umask. Call it first thing in a single-threaded jailer process.
pub fn sanitize_process() -> Result<()> {
    // SAFETY: close_range takes integer arguments; closing fds we do not own is the point, and
    // no Rust object of this process owns an fd above 2 at this point (called before any is made).
    let ret = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        )
    };
    check(ret as libc::c_int, || {
        "close_range(3, ~0) to close inherited file descriptors".into()
    })?;
    // SAFETY: called from a single-threaded process (checked by the caller's contract), so no
    // other thread reads the environment concurrently.
    check(unsafe { libc::clearenv() }, || "clearenv".into())?;
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0o022) };
    Ok(())
}

/// Number of threads of the calling process (from /proc/self/status).
pub(crate) fn thread_count() -> Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(|e| Error::io("read /proc/self/status", e))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| {
            Error::io(
                "parse Threads: in /proc/self/status",
                std::io::ErrorKind::InvalidData.into(),
            )
        })
}

/// fork(2): `Ok(0)` in the child, the child's pid in the parent.
pub(crate) fn fork() -> Result<libc::pid_t> {
    // SAFETY: the jailer is single-threaded (checked before entering), so the child is a
    // complete copy and may allocate and run arbitrary code.
    check(unsafe { libc::fork() }, || "fork".into())
}

/// Pid that the forwarding handler relays signals to.
static FORWARD_TO: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward_signal(sig: libc::c_int) {
    let pid = FORWARD_TO.load(Ordering::Relaxed);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, sig) };
    }
}

/// The signals a jailer passes on to the jail's target: the usual termination and user ones.
const RELAYED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// Blocks the signals a jailer relays in the calling thread, from the jailer's first
/// instruction (call it in `pre_exec` of the jailer's spawn, as [`crate::JailConfig::command`]
/// does, and first thing in `main`) until a handler can pass them on. One sent while the jail
/// is being built, or before the jail's init or its target exist, is then delivered late
/// instead of killing the jailer halfway (its roll-back undone) or being dropped by the pid
/// namespace's init (which ignores signals it has no handler for; a blocked one is queued).
/// The target gets them back just before its exec ([`release_relayed_signals`]).
/// Async-signal-safe.
pub fn hold_relayed_signals() -> std::io::Result<()> {
    set_relayed_mask(libc::SIG_BLOCK)
}

/// Unblocks the signals [`hold_relayed_signals`] held (an exec keeps the signal mask, so the
/// target would start with them blocked); one pending is delivered now.
pub(crate) fn release_relayed_signals() -> Result<()> {
    set_relayed_mask(libc::SIG_UNBLOCK)
        .map_err(|e| Error::io("unblock the signals relayed to the jail", e))
}

fn set_relayed_mask(how: libc::c_int) -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data that sigemptyset initializes; sigemptyset, sigaddset and
    // sigprocmask are async-signal-safe and only read and write the set and the thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in RELAYED {
            libc::sigaddset(&mut set, sig);
        }
        if libc::sigprocmask(how, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Relays the [`RELAYED`] signals to `pid` (a pid-namespace init ignores signals it has no
/// handler for, so this is how `kill <jailer>` reaches the target), then lets those held
/// since the start through (see [`hold_relayed_signals`]).
pub(crate) fn forward_signals_to(pid: libc::pid_t) -> Result<()> {
    FORWARD_TO.store(pid, Ordering::Relaxed);
    for sig in RELAYED {
        // SAFETY: a zeroed sigaction is valid; we set a plain handler with SA_RESTART so waitpid
        // resumes after the relay.
        let ret = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = forward_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        check(ret, || format!("install a handler for signal {sig}"))?;
    }
    release_relayed_signals()
}

/// A readable name for the signals a jailed process typically dies of.
pub(crate) fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGSYS => "SIGSYS: a seccomp filter forbade a system call",
        libc::SIGKILL => "SIGKILL: killed, e.g. by the OOM killer at the cgroup memory limit",
        libc::SIGXFSZ => "SIGXFSZ: file size limit exceeded",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "see signal(7)",
    }
}

/// Waits for `pid` and turns its fate into an exit code (128 + signal when killed), reporting a
/// death by signal on stderr. Other children are reaped on the way when `reap_all` is set.
pub(crate) fn wait_for(pid: libc::pid_t, reap_all: bool, who: &str) -> Result<i32> {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer.
        let got = unsafe { libc::waitpid(if reap_all { -1 } else { pid }, &mut status, 0) };
        if got == -1 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(Error::io(format!("wait for {who}"), e));
        }
        if got != pid {
            continue;
        }
        if libc::WIFEXITED(status) {
            return Ok(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            let sig = libc::WTERMSIG(status);
            eprintln!(
                "mvm-jailer: {who} killed by signal {sig} ({})",
                signal_name(sig)
            );
            return Ok(128 + sig);
        }
    }
}

/// Opens /dev/null (before the jail is entered) for [`daemonize`].
pub(crate) fn open_dev_null() -> Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Error::io("open /dev/null", e))
}

/// Starts a new session and points stdio at `dev_null`. A process-group leader cannot start a
/// session, so it forks first and the parent exits 0.
pub(crate) fn daemonize(dev_null: &File) -> Result<()> {
    // SAFETY: setsid has no arguments.
    if unsafe { libc::setsid() } == -1 {
        if fork()? != 0 {
            // SAFETY: _exit skips the parent's destructors; the child carries on.
            unsafe { libc::_exit(0) };
        }
        // SAFETY: setsid has no arguments; the child is never a group leader.
        check(unsafe { libc::setsid() }, || "setsid".into())?;
    }
    for fd in 0..3 {
        // SAFETY: both fds are open; dup2 atomically replaces the stdio fd.
        check(unsafe { libc::dup2(dev_null.as_raw_fd(), fd) }, || {
            format!("redirect fd {fd} to /dev/null")
        })?;
    }
    Ok(())
}

/// Replaces the process with `path` (inside the jail), with an empty environment.
pub(crate) fn exec(path: &Path, args: &[OsString]) -> Error {
    let e = Command::new(path).args(args).env_clear().exec();
    Error::io(format!("exec {} in the jail", path.display()), e)
}
