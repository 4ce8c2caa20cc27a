//! Live fork: a running vm-tier sandbox copied into children that go on from the same
//! instant — processes, memory, files — each with its own identity.
//!
//! The source is paused only while its VMM saves the VM into its save directory and the
//! manager takes the files and a sparse copy of the writable layer (`snapshot::take_copy`),
//! then resumed, with the least share of a contended CPU until the children answer. A paused
//! source is saved the same way and stays paused; a saved one is not saved again: its
//! children restore its own saved VM, which stays its. Each
//! child is then made like any sandbox (quota, network, jail) but restores
//! the saved VM instead of booting, or takes a VMM of the template's fork pool and loads it
//! there (see `pool`); its agent gives it its own host name, MAC, address, entropy and
//! clock. Children share the saved memory file's page cache until they write.

use super::cgroups::{CpuShare, LimitCgroups};
use super::create::Origin;
use super::lock::BusyLock;
use super::tier::vm;
use super::{blocking, snapshot, Manager};
use crate::db::Tenant;
use crate::error::{Error, Result};
use crate::model::{CreateSandbox, Isolation, Sandbox, SandboxState};

/// Most children one fork makes.
pub const MAX_FORK_CHILDREN: u32 = 16;

impl Manager {
    /// Forks sandbox `id` of `tenant` into `count` children (counted in the tenant's quota),
    /// which continue from this instant (a saved sandbox's: from its save); the source goes
    /// on as it was, running, paused or saved. A sandbox of another tenant is not found; only
    /// a vm-tier sandbox made from a template forks. The children start concurrently; if one
    /// cannot be made, the others are destroyed and its error returned.
    pub async fn fork(&self, tenant: &Tenant, id: &str, count: u32) -> Result<Vec<Sandbox>> {
        if !(1..=MAX_FORK_CHILDREN).contains(&count) {
            return Err(Error::Invalid(format!(
                "count must be 1 to {MAX_FORK_CHILDREN}, got {count}"
            )));
        }
        // Its turn until its save is taken: nothing pauses, saves or resumes it meanwhile.
        let turn = self.transition(id).await;
        let row = self.row(&tenant.name, id)?;
        let source = &row.sandbox;
        if source.isolation != Isolation::Vm {
            return Err(Error::Invalid(format!(
                "sandbox {id} is in the jail tier: a fork copies a running micro-VM, so only \
                 vm-tier sandboxes fork (create it with --isolation vm)"
            )));
        }
        let template = self.template_of(source, "fork")?;
        let started = std::time::Instant::now();
        let own = source.state == SandboxState::Saved;
        let saved = match source.state {
            SandboxState::Running | SandboxState::Paused => {
                let dir = self.inner.cfg.fork_dir(id);
                self.save_copy(&row, dir).await?
            }
            SandboxState::Saved => self.saved_source(id, &template.rootfs, "fork").await?,
            SandboxState::Creating | SandboxState::Stopping => {
                return Err(Error::Conflict(format!(
                    "sandbox {id} is {}: only a running, paused or saved sandbox forks",
                    source.state.as_str()
                )))
            }
        };
        // A saved source keeps its turn until its children are made: its saved VM, which
        // they restore, is not resumed (moved and removed) meanwhile. Another's goes now.
        let _turn = own.then_some(turn);
        let _yielding = match source.state {
            SandboxState::Running => self.yield_to_children(id).await,
            _ => None,
        };
        // The children start at once, each in a task of its own.
        let mut starting = tokio::task::JoinSet::new();
        for _ in 0..count {
            let req = CreateSandbox {
                template: Some(source.template.clone()),
                isolation: Some(Isolation::Vm),
                vcpus: Some(source.vcpus),
                memory_mib: Some(source.memory_mib),
                timeout_s: Some(source.timeout_s),
                lifecycle: source.lifecycle,
                env: source.env.clone(),
                network: Some(source.network.spec()),
                metadata: source.metadata.clone(),
                // Host ports are unique on the host: they stay with the source.
                ports: Vec::new(),
                image: None,
                // A child gets no secrets: their values are kept nowhere to give it (its
                // copies of the placeholders reach no proxy).
                secrets: Default::default(),
                snapshot: None,
            };
            let (manager, tenant, origin) =
                (self.clone(), tenant.clone(), Origin::Fork(saved.clone()));
            starting.spawn(async move { manager.create_from(&tenant, req, origin).await });
        }
        let mut children = Vec::with_capacity(count as usize);
        let mut failed = None;
        while let Some(started) = starting.join_next().await {
            match started {
                Ok(Ok(child)) => children.push(child),
                Ok(Err(e)) => failed = failed.or(Some(e)),
                Err(e) => failed = failed.or(Some(Error::Host(format!("a fork's child: {e}")))),
            }
        }
        // The children's jails hold the saved files; a saved source's stay its own.
        let removed = match own {
            true => Ok(()),
            false => blocking(move || saved.remove()).await,
        };
        if let Some(e) = failed {
            for child in &children {
                if let Err(undo) = self.destroy(&tenant.name, &child.id).await {
                    tracing::error!(id = %child.id, "removing a child of a failed fork: {undo}");
                }
            }
            return Err(e);
        }
        removed?;
        tracing::info!(%id, children = children.len(), took = ?started.elapsed(), "sandbox forked");
        Ok(children)
    }

    /// Gives the resumed source of a fork the least share of a contended CPU (as a pool's
    /// fills) until the returned guard goes, however the fork ends: its children are what
    /// the fork's caller waits for, and on one CPU the source's workload would otherwise slow
    /// each step of theirs. Where there is CPU to spare, nothing changes for the source.
    async fn yield_to_children(&self, id: &str) -> Option<Yielding> {
        let (parent, source) = (self.inner.cfg.cgroup_parent.clone(), id.to_owned());
        let yielded = blocking(move || {
            let cgroups = LimitCgroups::of(&parent, &source)?;
            cgroups.set_cpu_share(CpuShare::Background)?;
            Ok(cgroups)
        })
        .await;
        match yielded {
            Ok(cgroups) => Some(Yielding(cgroups)),
            Err(e) => {
                tracing::warn!(%id, "a fork's source keeps its CPU share: {e}");
                None
            }
        }
    }

    /// Saved sandbox `id`'s own saved VM, for its children or a snapshot (`verb` says which
    /// in a refusal: "cannot {verb}"): whole, and its template's base image at `base` the one
    /// it ran on.
    pub(super) async fn saved_source(
        &self,
        id: &str,
        base: &str,
        verb: &str,
    ) -> Result<snapshot::SavedVm> {
        let saved = snapshot::saved_of(&self.inner.cfg, id).ok_or_else(|| {
            Error::Host(format!(
                "sandbox {id} is saved, but its saved VM is missing or incomplete; destroy it"
            ))
        })?;
        let (checked, base) = (saved.clone(), std::path::PathBuf::from(base));
        blocking(move || checked.check_base(&base))
            .await
            .map_err(|e| match e {
                Error::Conflict(why) => {
                    Error::Conflict(format!("sandbox {id} cannot {verb}: {why}"))
                }
                other => other,
            })?;
        Ok(saved)
    }

    /// Saves the VM of `row` with a copy of its writable layer into the new directory `dir`
    /// (a fork's, a snapshot's), paused meanwhile if it runs (and resumed then, whatever
    /// happened). Holds the sandbox's busy lock: it is not destroyed halfway.
    pub(super) async fn save_copy(
        &self,
        row: &crate::db::SandboxRow,
        dir: std::path::PathBuf,
    ) -> Result<snapshot::SavedVm> {
        let id = row.sandbox.id.clone();
        let running = row.sandbox.state == SandboxState::Running;
        let started = std::time::Instant::now();
        let _busy = BusyLock::acquire(&self.inner.cfg.lock_path(&id))?;
        // The socket's path is valid while `socket` lives.
        let socket = self.vmm_api(row)?;
        let api = socket.path();
        if running {
            vm::set_paused(&api, true).await?;
        }
        let paused = started.elapsed();
        let saving = vm::save_snapshot(&api).await;
        let dumped = started.elapsed();
        let saved = match saving {
            Ok(()) => {
                let (cfg, id) = (self.inner.cfg.clone(), id.clone());
                blocking(move || {
                    let layer = cfg.sandbox_dir(&id).join(vm::LAYER_NAME);
                    snapshot::take_copy(&cfg, &id, dir, &layer)
                })
                .await
            }
            Err(e) => Err(e),
        };
        let copied = started.elapsed();
        let resumed = match running {
            true => vm::set_paused(&api, false).await,
            false => Ok(()),
        };
        let saved = saved?;
        if let Err(e) = resumed {
            let _ = blocking(move || saved.remove()).await;
            return Err(e);
        }
        tracing::debug!(%id, ?paused, ?dumped, ?copied, saved = ?started.elapsed(), "fork source saved");
        Ok(saved)
    }
}

/// A fork's source yielding the CPU to its children (see [`Manager::yield_to_children`]);
/// the default share is back when it is dropped.
struct Yielding(LimitCgroups);

impl Drop for Yielding {
    fn drop(&mut self) {
        // One small write to the cgroup file system, where a drop cannot await.
        if let Err(e) = self.0.set_cpu_share(CpuShare::Normal) {
            tracing::warn!("a fork's source did not get its CPU share back: {e}");
        }
    }
}
