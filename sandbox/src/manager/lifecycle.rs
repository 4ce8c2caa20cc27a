//! A sandbox's timeout and what it does when it passes (its [`Lifecycle`]: destroyed, frozen
//! or saved to disk), keepalive, and the resume on demand of a paused or saved sandbox whose
//! lifecycle asks for it. Pauses, saves and resumes of one sandbox take turns
//! ([`Manager::transition`]), so that a timeout, a resume on demand and a caller's own pause
//! or resume never act on a state another has just changed.

use std::sync::Arc;

use super::{lock, Manager, MAX_TIMEOUT_S};
use crate::db::{self, SandboxRow};
use crate::error::{Error, Result};
use crate::model::{Lifecycle, OnTimeout, Sandbox, SandboxState};

/// A sandbox's turn to change between running, paused and saved, until dropped. The last
/// turn of a sandbox that nobody waits for removes its entry, so that calls naming sandboxes
/// (any id, existing or not) leave nothing behind.
pub(super) struct Turn {
    manager: Manager,
    id: String,
    /// Released after [`Drop::drop`] has looked at the waiters.
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut turns = lock(&self.manager.inner.transitions);
        // Held by the map and by this turn only: nobody waits.
        if turns
            .get(&self.id)
            .is_some_and(|t| Arc::strong_count(t) == 2)
        {
            turns.remove(&self.id);
        }
    }
}

impl Manager {
    /// Waits for sandbox `id`'s turn to be paused, saved or resumed.
    pub(super) async fn transition(&self, id: &str) -> Turn {
        let turns = {
            let mut turns = lock(&self.inner.transitions);
            // Entries whose last waiter gave up (its call was cancelled) after the holder left.
            turns.retain(|_, t| Arc::strong_count(t) > 1);
            turns
                .entry(id.to_owned())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
                .clone()
        };
        Turn {
            manager: self.clone(),
            id: id.to_owned(),
            _held: turns.lock_owned().await,
        }
    }

    /// Extends a sandbox's life by `timeout_s` (default: its own timeout) from now.
    pub fn keepalive(&self, tenant: &str, id: &str, timeout_s: Option<u64>) -> Result<Sandbox> {
        let mut row = self.row(tenant, id)?;
        let t = timeout_s.unwrap_or(row.sandbox.timeout_s);
        if t > MAX_TIMEOUT_S {
            return Err(Error::Invalid(format!(
                "timeout_s must be at most {MAX_TIMEOUT_S}, got {t}"
            )));
        }
        row.sandbox.timeout_s = t;
        row.sandbox.expires_at = (t > 0).then(|| db::now() + t as i64);
        self.inner.db.update_sandbox(&row)?;
        Ok(row.sandbox)
    }

    /// Acts on every running or paused sandbox whose timeout has passed as its lifecycle says
    /// (a saved sandbox's timeout does not run); returns their ids.
    pub async fn reap_expired(&self) -> Result<Vec<String>> {
        let mut reaped = Vec::new();
        for row in self.inner.db.sandboxes(None)? {
            if !due(&row) {
                continue;
            }
            let s = &row.sandbox;
            match self.time_out(&s.id).await {
                Ok(Some(what)) => {
                    let _ = self.inner.db.audit(
                        &s.tenant,
                        "expire",
                        &s.id,
                        200,
                        &format!("timeout_s passed: {what}"),
                    );
                    reaped.push(s.id.clone());
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(id = %s.id, "acting on an expired sandbox: {e}"),
            }
        }
        Ok(reaped)
    }

    /// Does what sandbox `id`'s lifecycle says at its timeout, if it is still due: destroys
    /// it, or stops its timeout and saves it (where it can be saved) or freezes it. Returns
    /// what was done.
    async fn time_out(&self, id: &str) -> Result<Option<String>> {
        let _turn = self.transition(id).await;
        let Some(mut row) = self.inner.db.sandbox(id)?.filter(due) else {
            return Ok(None);
        };
        let tenant = row.sandbox.tenant.clone();
        let on_timeout = row.sandbox.lifecycle.on_timeout;
        if on_timeout == OnTimeout::Destroy {
            self.destroy(&tenant, id).await?;
            return Ok(Some("destroyed".into()));
        }
        row.sandbox.expires_at = None;
        let mut done = String::new();
        if on_timeout == OnTimeout::Save {
            match self.save_now(row.clone()).await {
                Ok(_) => return Ok(Some("saved".into())),
                // Frozen instead: its memory kept, its CPU the host's.
                Err(e) => {
                    tracing::warn!(%id, "saving a sandbox at its timeout: {e}; freezing it");
                    done = format!(" (its save failed: {e})");
                }
            }
        }
        if row.sandbox.state == SandboxState::Running {
            self.pause_tier(&row, true).await?;
            row.sandbox.state = SandboxState::Paused;
        }
        self.inner.db.update_sandbox(&row)?;
        Ok(Some(format!("paused{done}")))
    }

    /// The row of `tenant`'s sandbox `id` when it runs, resumed first when it is paused or
    /// saved and its lifecycle's `auto_resume` says so; 409 saying what it is otherwise.
    pub(super) async fn awake(&self, tenant: &str, id: &str) -> Result<SandboxRow> {
        let row = self.row(tenant, id)?;
        if !resumes_on_demand(&row.sandbox) {
            return Manager::running(row);
        }
        let _turn = self.transition(id).await;
        // Another call may have resumed it while this one waited.
        let row = self.row(tenant, id)?;
        if !resumes_on_demand(&row.sandbox) {
            return Manager::running(row);
        }
        self.set_paused_now(row, false).await?;
        tracing::info!(%id, "sandbox resumed on demand");
        Manager::running(self.row(tenant, id)?)
    }
}

/// Whether `row`'s timeout has passed while it runs or is frozen.
fn due(row: &SandboxRow) -> bool {
    let s = &row.sandbox;
    s.expires_at.is_some_and(|t| t <= db::now())
        && matches!(s.state, SandboxState::Running | SandboxState::Paused)
}

/// Whether sandbox `s` is paused or saved and resumes when a call needs it.
fn resumes_on_demand(s: &Sandbox) -> bool {
    let Lifecycle { auto_resume, .. } = s.lifecycle;
    auto_resume && matches!(s.state, SandboxState::Paused | SandboxState::Saved)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::ManagerConfig;
    use super::*;

    /// One turn at a time per sandbox; the map keeps entries only while turns are held or
    /// waited for, also when a waiter is cancelled after the holder left (an abandoned call).
    #[tokio::test]
    async fn turns_take_turns_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ManagerConfig::from_env();
        cfg.state_dir = dir.path().join("state");
        cfg.run_dir = dir.path().join("run");
        let (manager, _) = Manager::open(cfg).await.unwrap();
        let entries = || lock(&manager.inner.transitions).len();

        let first = manager.transition("a").await;
        let other = manager.transition("b").await;
        let waiter = tokio::spawn({
            let manager = manager.clone();
            async move {
                let _turn = manager.transition("a").await;
            }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished(), "two turns of one sandbox at once");
        drop(first);
        waiter.await.unwrap();
        drop(other);
        assert_eq!(entries(), 0);

        // The holder leaves while a waiter waits; the waiter is cancelled before it runs.
        let held = manager.transition("c").await;
        let cancelled = tokio::spawn({
            let manager = manager.clone();
            async move {
                let _turn = manager.transition("c").await;
            }
        });
        tokio::task::yield_now().await;
        drop(held);
        cancelled.abort();
        assert!(cancelled.await.unwrap_err().is_cancelled());
        let next = manager.transition("d").await;
        assert_eq!(entries(), 1, "only the turn held now");
        drop(next);
        assert_eq!(entries(), 0);
    }
}
