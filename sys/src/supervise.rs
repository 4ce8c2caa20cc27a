//! A helper process that keeps its work going: the supervisor forks a worker and forks a new
//! one when the worker dies by a signal (a crash, the OOM killer) or fails, so that a
//! sandbox's resolver or egress proxy outlives such a death. The worker holds no state the
//! supervisor has not (its sockets and configuration are inherited by each fork), and it dies
//! with the supervisor, so that killing the supervisor (a sandbox's teardown kills both) ends
//! the service.

use std::time::{Duration, Instant};

/// A worker that lived less than this failed fast: five of those in a row end the supervisor.
const FAST_FAILURE: Duration = Duration::from_secs(1);
/// Fast failures in a row after which the supervisor gives up.
const MAX_FAST_FAILURES: u32 = 5;
/// The pause before the first restart; it doubles with each fast failure.
const FIRST_PAUSE: Duration = Duration::from_millis(50);

/// Runs `work` in a forked child and forks it again each time it dies by a signal or exits
/// non-zero (after a pause of 50 ms that doubles while the worker keeps failing within a
/// second of its start; five such failures in a row end the supervisor with status 1), and
/// exits with status 0 when the worker does. Each worker dies with the supervisor
/// (`PR_SET_PDEATHSIG`). `what` names the service in its messages (standard error). Call it
/// before any thread is started: a fork keeps only the calling thread.
pub fn supervise(what: &str, work: impl Fn() -> i32) -> ! {
    let supervisor = std::process::id() as libc::pid_t;
    let mut fast_failures = 0;
    loop {
        let started = Instant::now();
        // SAFETY: the process has a single thread (the caller's contract), so the child may
        // run Rust code after fork(2).
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: prctl(2) and getppid(2) on this process; the worker dies with its
            // supervisor, also when the supervisor died before the prctl took effect.
            unsafe {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0
                    || libc::getppid() != supervisor
                {
                    libc::_exit(1);
                }
            }
            std::process::exit(work());
        }
        if pid < 0 {
            eprintln!(
                "{what}: starting its worker: {}",
                std::io::Error::last_os_error()
            );
            std::process::exit(1);
        }
        let ended = wait(pid);
        if ended == Ended::Exited(0) {
            std::process::exit(0);
        }
        fast_failures = match started.elapsed() < FAST_FAILURE {
            true => fast_failures + 1,
            false => 1,
        };
        if fast_failures >= MAX_FAST_FAILURES {
            eprintln!(
                "{what}: its worker {ended} {fast_failures} times in a row at once; giving up"
            );
            std::process::exit(1);
        }
        eprintln!("{what}: its worker {ended}; starting another");
        std::thread::sleep(FIRST_PAUSE * 2u32.pow(fast_failures - 1));
    }
}

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    Exited(i32),
    Killed(i32),
}

impl std::fmt::Display for Ended {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ended::Exited(code) => write!(f, "exited with status {code}"),
            Ended::Killed(signal) => write!(f, "was killed by signal {signal}"),
        }
    }
}

/// Waits for child `pid` to end.
fn wait(pid: libc::pid_t) -> Ended {
    let mut status = 0;
    loop {
        // SAFETY: waitpid(2) on our own child, with a status the call writes.
        let got = unsafe { libc::waitpid(pid, &mut status, 0) };
        if got == pid {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // Not ours any more (cannot happen for a child we forked): as if it failed.
            return Ended::Exited(1);
        }
    }
    match libc::WIFSIGNALED(status) {
        true => Ended::Killed(libc::WTERMSIG(status)),
        false => Ended::Exited(libc::WEXITSTATUS(status)),
    }
}
