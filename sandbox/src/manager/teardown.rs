//! Teardown (one idempotent removal for destroy, rollback and reconciliation) and destroy.

use std::path::PathBuf;

use jailer::CleanupConfig;

use super::lock::BusyLock;
use super::tier::exec_name;
use super::{blocking, cgroups, console, host, lock, net, pod_netns_of, rootfs, snapshot, Manager};
use crate::error::{Error, Result};
use crate::model::{Isolation, SandboxState};

impl Manager {
    /// Removes everything sandbox `id` may have on the host, in reverse creation order:
    /// processes, jail directory and cgroups, writable layer, network namespace. Idempotent.
    /// `started`: the sandbox had finished starting (all its processes are in its cgroups).
    pub(super) async fn teardown(
        &self,
        id: String,
        isolation: Option<Isolation>,
        pod_netns: Option<PathBuf>,
        started: bool,
    ) -> Result<()> {
        self.stop_jail(&id, isolation, started).await?;
        let cfg = self.inner.cfg.clone();
        blocking(move || {
            let dir = cfg.sandbox_dir(&id);
            rootfs::Overlay::at(&dir).unmount()?;
            console::Console::jail(&dir).unmount()?;
            host::remove_tree(&dir)?;
            snapshot::remove_saves(&cfg, &id)?;
            match pod_netns {
                // The pod's namespace is the runtime's: only the VM's tap and redirect go.
                Some(ns) if isolation == Some(Isolation::Vm) => net::leave_pod_netns(&ns)?,
                Some(_) => {}
                None => net::destroy(&cfg.netns(&id), &id)?,
            }
            // A crashed manager's stale lock (a live holder removes its own on drop).
            match std::fs::remove_file(cfg.lock_path(&id)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::host(format!("removing the lock of {id}"), e))
                }
                _ => Ok(()),
            }
        })
        .await
    }

    /// Stops sandbox `id`'s processes and removes its jail and cgroups (of tier `isolation`,
    /// or of any with `None`), leaving its directory, saves and network. Idempotent.
    /// `started`: the sandbox had finished starting (all its processes are in its cgroups).
    pub(super) async fn stop_jail(
        &self,
        id: &str,
        isolation: Option<Isolation>,
        started: bool,
    ) -> Result<()> {
        let child = lock(&self.inner.live)
            .get(id)
            .and_then(|l| lock(&l.child).take());
        let (parent, killed) = (self.inner.cfg.cgroup_parent.clone(), id.to_owned());
        let jailer = child
            .as_ref()
            .filter(|_| started)
            .and_then(|c| c.id())
            .map(|p| p as i32);
        blocking(move || cgroups::kill_all(&parent, &killed, jailer)).await?;
        if let Some(mut child) = child {
            // Already killed with the rest; reap it.
            let _ = child.kill().await;
        }
        let (cfg, id) = (self.inner.cfg.clone(), id.to_owned());
        blocking(move || {
            let tiers = match isolation {
                Some(i) => vec![i],
                None => Isolation::ALL.to_vec(),
            };
            for iso in tiers {
                jailer::cleanup(&CleanupConfig {
                    id: id.clone(),
                    exec_file_name: exec_name(iso).into(),
                    chroot_base_dir: cfg.jail_base(),
                    parent_cgroup: cfg.cgroup_parent.clone(),
                })
                .map_err(|e| Error::host(format!("removing the jail of {id}"), e))?;
            }
            Ok(())
        })
        .await
    }

    /// Destroys a sandbox of `tenant`.
    pub async fn destroy(&self, tenant: &str, id: &str) -> Result<()> {
        let mut row = self.row(tenant, id)?;
        match row.sandbox.state {
            SandboxState::Creating => {
                return Err(Error::Conflict(format!(
                    "sandbox {id} is still being created; retry shortly"
                )))
            }
            SandboxState::Stopping => {
                return Err(Error::Conflict(format!(
                    "sandbox {id} is already being destroyed"
                )))
            }
            _ => {}
        }
        let _busy = BusyLock::acquire(&self.inner.cfg.lock_path(id))?;
        row.sandbox.state = SandboxState::Stopping;
        self.inner.db.update_sandbox(&row)?;
        let live = lock(&self.inner.live).get(id).cloned();
        if let Some(live) = &live {
            live.agent.lock().await.take();
        }
        let result = self
            .teardown(
                id.to_owned(),
                Some(row.sandbox.isolation),
                pod_netns_of(&row.sandbox),
                true,
            )
            .await;
        lock(&self.inner.live).remove(id);
        result?;
        self.inner.db.delete_sandbox(id)?;
        self.inner
            .metrics
            .destroyed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
