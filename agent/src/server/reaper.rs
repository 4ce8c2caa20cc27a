//! Child process bookkeeping: the agent reaps every child (it is init in the guest and a
//! child subreaper on the host) and hands exit statuses to whoever spawned the process.

use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard};

use nix::errno::Errno;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use crate::protocol::Termination;

/// Reaps all children and routes the statuses of spawned processes.
#[derive(Debug, Default)]
pub(crate) struct Reaper {
    waiters: Mutex<HashMap<i32, oneshot::Sender<Termination>>>,
}

impl Reaper {
    /// Starts reaping on SIGCHLD. Must be called inside a tokio runtime.
    pub(crate) fn start() -> io::Result<Arc<Self>> {
        let mut sigchld = signal(SignalKind::child())?;
        let reaper = Arc::new(Self::default());
        let weak = Arc::downgrade(&reaper);
        tokio::spawn(async move {
            loop {
                match weak.upgrade() {
                    Some(reaper) => reaper.reap(),
                    None => return,
                }
                if sigchld.recv().await.is_none() {
                    return;
                }
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, oneshot::Sender<Termination>>> {
        // A map of senders stays consistent even if a holder panicked.
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawns `cmd`; the receiver gets the process's termination once it is reaped.
    pub(crate) fn spawn(
        &self,
        cmd: &mut Command,
    ) -> io::Result<(Child, oneshot::Receiver<Termination>)> {
        let (tx, rx) = oneshot::channel();
        // Holding the lock across the spawn keeps `reap` from seeing the pid before it is
        // registered.
        let mut waiters = self.lock();
        let child = cmd.spawn()?;
        let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("pid out of range"))?;
        waiters.insert(pid, tx);
        Ok((child, rx))
    }

    /// Collects every exited child without blocking.
    fn reap(&self) {
        loop {
            let mut status = 0;
            // SAFETY: waitpid only writes the status word to `status`, a valid local.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid == 0 {
                return;
            }
            if pid < 0 {
                match Errno::last() {
                    Errno::EINTR => continue,
                    Errno::ECHILD => return,
                    e => {
                        crate::log!("waitpid failed: {e}");
                        return;
                    }
                }
            }
            let termination = if libc::WIFEXITED(status) {
                Termination::Exited(libc::WEXITSTATUS(status))
            } else if libc::WIFSIGNALED(status) {
                Termination::Signaled(libc::WTERMSIG(status))
            } else {
                continue;
            };
            if let Some(tx) = self.lock().remove(&pid) {
                // The exec may have been abandoned (connection closed); nothing to tell then.
                let _ = tx.send(termination);
            }
        }
    }

    /// Sends `signal` to the process group of every spawned process still running.
    pub(crate) fn kill_all(&self, signal: i32) {
        for pid in self.lock().keys() {
            // SAFETY: kill(2) takes plain integers and touches no memory of ours.
            unsafe { libc::kill(-pid, signal) };
        }
    }
}
