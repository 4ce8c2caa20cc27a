//! Reconciliation when a manager opens: adopting live sandboxes, removing dead ones.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::lock::BusyLock;
use super::tier::exec_name;
use super::{cgroups, lock, pod_netns_of, rootfs, snapshot, Live, Manager, Reconciled};
use crate::error::{Error, Result};
use crate::model::{Isolation, SandboxState};

impl Manager {
    pub(super) async fn reconcile(&self) -> Result<Reconciled> {
        let cfg = &self.inner.cfg;
        let mut out = Reconciled::default();
        let rows = self.inner.db.sandboxes(None)?;
        for row in &rows {
            let s = &row.sandbox;
            if BusyLock::held_elsewhere(&cfg.lock_path(&s.id)) {
                // Another manager (e.g. a concurrent daemonless `mvm run`) is creating or
                // destroying it right now.
                continue;
            }
            if let Some(saved) =
                snapshot::saved_of(cfg, &s.id).filter(|_| s.state == SandboxState::Saved)
            {
                // Saved: nothing of it runs, unless a manager died while its VMM stopped (the
                // save directory goes last) or while it was resumed (its files moved back to
                // the run directory, a jail maybe started); what is left of the jail goes
                // now, its files go back to its saved VM, and a resume's claim on its
                // tenant's quota ends.
                let _busy = match BusyLock::acquire(&cfg.lock_path(&s.id)) {
                    Ok(busy) => busy,
                    Err(Error::Conflict(_)) => continue,
                    Err(e) => return Err(e),
                };
                self.settle_saved(&s.id, &saved).await?;
                self.inner.db.end_resume(&s.id)?;
                out.adopted.push(s.id.clone());
                continue;
            }
            let alive = !cgroups::cgroup_pids(&cfg.cgroup_parent, &s.id).is_empty();
            // A sandbox whose processes live stays, even if its agent does not answer now (a
            // loaded host): destroying it is its owner's call.
            let adopt = alive && matches!(s.state, SandboxState::Running | SandboxState::Paused);
            if adopt {
                if s.state == SandboxState::Running
                    && !tokio::time::timeout(Duration::from_secs(3), self.connect_agent(row))
                        .await
                        .is_ok_and(|r| r.is_ok())
                {
                    tracing::warn!(id = %s.id, "reconcile: adopted a sandbox whose agent does not answer");
                }
                lock(&self.inner.live).insert(s.id.clone(), Arc::new(Live::default()));
                out.adopted.push(s.id.clone());
                continue;
            }
            // Torn down under its lock, and only if its row is still what was seen: another
            // manager may be destroying it, or have finished creating it, right now.
            let _busy = match BusyLock::acquire(&cfg.lock_path(&s.id)) {
                Ok(busy) => busy,
                Err(Error::Conflict(_)) => continue,
                Err(e) => return Err(e),
            };
            if self.inner.db.sandbox(&s.id)?.map(|r| r.sandbox.state) != Some(s.state) {
                continue;
            }
            tracing::info!(id = %s.id, state = s.state.as_str(), "reconcile: removing a dead sandbox");
            self.teardown(s.id.clone(), Some(s.isolation), pod_netns_of(s), false)
                .await?;
            self.inner.db.delete_sandbox(&s.id)?;
            self.inner
                .metrics
                .destroyed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            out.cleaned.push(s.id.clone());
        }
        let bases = cfg.state_dir.join("bases");
        let keep: Vec<PathBuf> = self
            .inner
            .db
            .templates()?
            .iter()
            .filter_map(|t| rootfs::base_path(&bases, Path::new(&t.rootfs)).ok())
            .collect();
        for old in rootfs::gc_bases(&bases, &keep) {
            tracing::info!(base = %old.display(), "removed an unused unpacked base image");
        }
        // Anything of ours on the host that has no row: a crash between teardown and delete,
        // or state removed by hand.
        // Rows read again: another manager may have created sandboxes meanwhile.
        let rows = self.inner.db.sandboxes(None)?;
        let known: Vec<&str> = rows.iter().map(|r| r.sandbox.id.as_str()).collect();
        for id in self.host_ids() {
            if known.contains(&id.as_str()) {
                continue;
            }
            // Under its lock, and only if it still has no row: a manager creating it holds the
            // lock until its row exists.
            let _busy = match BusyLock::acquire(&cfg.lock_path(&id)) {
                Ok(busy) => busy,
                Err(Error::Conflict(_)) => continue,
                Err(e) => return Err(e),
            };
            if self.inner.db.sandbox(&id)?.is_some() {
                continue;
            }
            tracing::info!(%id, "reconcile: removing leftovers without a state row");
            self.teardown(id.clone(), None, None, false).await?;
            out.cleaned.push(id);
        }
        self.reconcile_snapshots().await?;
        Ok(out)
    }

    /// Ids of sandboxes with anything under the run dir: directories, namespaces, locks, jails.
    /// (Cgroups are not scanned: another manager may share the parent; a sandbox's cgroups
    /// always go before its directories, so an orphan always has a directory.)
    fn host_ids(&self) -> Vec<String> {
        let cfg = &self.inner.cfg;
        let mut dirs = vec![
            cfg.run_dir.join("sandboxes"),
            cfg.netns(""),
            cfg.lock_path(""),
        ];
        for iso in Isolation::ALL {
            dirs.push(cfg.jail_base().join(exec_name(iso)));
        }
        let mut ids: Vec<String> = dirs
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| is_sandbox_id(n))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// Sandbox ids are 12 lowercase hex digits.
fn is_sandbox_id(s: &str) -> bool {
    s.len() == 12
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_ids() {
        assert!(is_sandbox_id("0123456789ab"));
        assert!(!is_sandbox_id("0123456789aB"));
        assert!(!is_sandbox_id("mvm"));
    }
}
