//! Save and resume: a vm-tier sandbox paused with its VM saved to disk (state `saved`), as
//! E2B's pause does. Its VMM saves the VM (the same save as a fork's source, taken as the
//! sandbox's own by `snapshot::take_for_resume`) and stops, and its writable layer and
//! console log move from the sandbox directory (the run directory, often a tmpfs) to the saved
//! VM on the state directory's disk; what stays is its row, network namespace and saved VM:
//! no process, and none of its memory, until it is resumed. A resume moves the files back,
//! starts a jail as a create does, loads the saved VM into it with the writable layer in
//! place, and gives the guest the host's clock and fresh entropy with its (unchanged)
//! identity; a network namespace a restart of the host took is made again first. Its
//! timeout stops while it is saved and starts again at the resume. A resume that fails
//! leaves the sandbox saved as it was.

use std::path::PathBuf;
use std::time::Instant;

use super::cgroups::CpuShare;
use super::create::{connect_namespace, guest_nic, make_namespace};
use super::lock::BusyLock;
use super::tier::{self, vm, Userland};
use super::{blocking, console, lock, net, snapshot, Manager, ManagerConfig};
use crate::db::{self, SandboxRow};
use crate::error::{Error, Result};
use crate::model::{Isolation, Sandbox, SandboxState};

impl Manager {
    /// Saves `tenant`'s running or paused vm-tier sandbox `id` to disk and stops its VMM
    /// (state `saved`); [`set_paused`](Self::set_paused) resumes it. Only a sandbox made from
    /// a registered template is saved (its VM is loaded again over the template's base image),
    /// and only while its memory fits next to the guest memory its tenant keeps on the host's
    /// disk (its snapshots and saved sandboxes hold at most its memory quota together; past
    /// it, a quota error and the sandbox goes on as it was).
    pub async fn save(&self, tenant: &str, id: &str) -> Result<Sandbox> {
        let _turn = self.transition(id).await;
        self.save_now(self.row(tenant, id)?).await
    }

    /// [`save`](Self::save) of sandbox `row`, in its turn.
    pub(super) async fn save_now(&self, mut row: SandboxRow) -> Result<Sandbox> {
        let id = &row.sandbox.id.clone();
        let s = &row.sandbox;
        if s.isolation != Isolation::Vm {
            return Err(Error::Invalid(format!(
                "sandbox {id} is in the jail tier: a save writes a micro-VM's memory to disk, \
                 so only vm-tier sandboxes are saved (pause it without saving to freeze it)"
            )));
        }
        if !matches!(s.state, SandboxState::Running | SandboxState::Paused) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is {}; only a running or paused sandbox is saved",
                s.state.as_str()
            )));
        }
        let template = self.template_of(s, "are saved")?;
        let quota = self
            .inner
            .db
            .tenant(&s.tenant)?
            .ok_or_else(|| Error::NotFound(format!("tenant '{}' is gone", s.tenant)))?
            .quota;
        self.inner.db.check_save(s, &quota)?;
        let _busy = BusyLock::acquire(&self.inner.cfg.lock_path(id))?;
        let was_running = s.state == SandboxState::Running;
        let started = Instant::now();
        let saved = {
            // The socket's path is valid while `socket` lives.
            let socket = self.vmm_api(&row)?;
            let api = socket.path();
            if was_running {
                vm::set_paused(&api, true).await?;
            }
            let saved = match vm::save_snapshot(&api).await {
                Ok(()) => {
                    let (cfg, id) = (self.inner.cfg.clone(), id.to_owned());
                    let base = PathBuf::from(&template.rootfs);
                    blocking(move || snapshot::take_for_resume(&cfg, &id, &base)).await
                }
                Err(e) => Err(e),
            };
            // Saved in the row before the VMM goes (a manager that dies in between finds the
            // saved VM, and its reconciliation stops what is left of the jail), if its memory
            // fits on the disk next to the tenant's snapshots and saved sandboxes.
            let saved = match saved {
                Ok(saved) => match self.inner.db.mark_saved(&row, &quota) {
                    Ok(()) => Ok(saved),
                    Err(e) => {
                        if let Err(undo) = blocking(move || saved.remove()).await {
                            tracing::error!(%id, "removing a save that was refused: {undo}");
                        }
                        Err(e)
                    }
                },
                Err(e) => Err(e),
            };
            match saved {
                Ok(saved) => saved,
                Err(e) => {
                    // Nothing was lost: the VM goes on as it was.
                    if was_running {
                        if let Err(undo) = vm::set_paused(&api, false).await {
                            tracing::error!(%id, "resuming a VM whose save failed: {undo}");
                        }
                    }
                    return Err(e);
                }
            }
        };
        row.sandbox.state = SandboxState::Saved;
        self.stop_saved(id).await?;
        let (cfg, sandbox) = (self.inner.cfg.clone(), id.to_owned());
        blocking(move || keep_files(&cfg, &saved, &sandbox)).await?;
        tracing::info!(%id, took = ?started.elapsed(), "sandbox saved");
        Ok(row.sandbox)
    }

    /// Whether sandbox `s` can be saved: a vm-tier sandbox made from a registered template.
    pub fn can_save(&self, s: &Sandbox) -> bool {
        s.isolation == Isolation::Vm && self.template_of(s, "are saved").is_ok()
    }

    /// Makes saved sandbox `row`'s network again as a create makes it, after a restart of the
    /// host took its namespace (and the host's side of it, whatever is left of which goes
    /// first). Not for a sandbox with secrets: their values and its CA's key were kept
    /// nowhere, so their proxy cannot be made again.
    async fn remake_network(&self, row: &SandboxRow) -> Result<()> {
        let s = &row.sandbox;
        if !s.network.secrets.is_empty() {
            return Err(Error::Conflict(format!(
                "sandbox {} cannot be resumed: its network namespace is gone (the host \
                 restarted), and its secrets' proxy cannot be made again (their values and its \
                 CA's key were kept nowhere); destroy it",
                s.id
            )));
        }
        let cfg = self.inner.cfg.clone();
        let addrs = net::Addresses::of(cfg.subnet, row.slot);
        let (made, id, uid) = (cfg.clone(), s.id.clone(), cfg.uid(row));
        blocking(move || {
            net::destroy(&made.netns(&id), &id)?;
            make_namespace(&made, &id, Isolation::Vm, addrs, uid)
        })
        .await?;
        let connected =
            connect_namespace(cfg.clone(), s, addrs, Vec::new(), None, CpuShare::Normal).await;
        if let Err(e) = connected {
            // Gone again, so that the next resume makes it whole.
            let id = s.id.clone();
            if let Err(undo) = blocking(move || net::destroy(&cfg.netns(&id), &id)).await {
                tracing::error!(id = %s.id, "removing a half-made network: {undo}");
            }
            return Err(e);
        }
        tracing::info!(id = %s.id, "saved sandbox's network made again");
        Ok(())
    }

    /// Stops the VMM of saved sandbox `id` and removes its jail and its save directory
    /// (made again, empty, by the jail that resumes it).
    pub(super) async fn stop_saved(&self, id: &str) -> Result<()> {
        let live = lock(&self.inner.live).get(id).cloned();
        if let Some(live) = &live {
            live.agent.lock().await.take();
        }
        self.stop_jail(id, Some(Isolation::Vm), true).await?;
        lock(&self.inner.live).remove(id);
        let (cfg, id) = (self.inner.cfg.clone(), id.to_owned());
        blocking(move || snapshot::remove_save_dir(&cfg, &id)).await
    }

    /// Makes saved sandbox `id` whole as it was before a resume that did not finish (it
    /// failed, or a manager died in it): no jail, its files with its `saved` VM, so that
    /// they outlive a restart of the host, whose run directory may be a tmpfs.
    pub(super) async fn settle_saved(&self, id: &str, saved: &snapshot::SavedVm) -> Result<()> {
        self.stop_saved(id).await?;
        let (cfg, saved, id) = (self.inner.cfg.clone(), saved.clone(), id.to_owned());
        blocking(move || keep_files(&cfg, &saved, &id)).await
    }

    /// Resumes saved sandbox `row` (its caller checked the state): a new jail loads its saved
    /// VM, whose guest gets the host's clock and fresh entropy. Its timeout starts again. The
    /// vCPUs and memory its tenant's quota did not count while it was saved are claimed
    /// first: a resume that does not fit is refused (429) and leaves it saved.
    pub(super) async fn resume_saved(&self, row: SandboxRow) -> Result<Sandbox> {
        let id = row.sandbox.id.clone();
        let _busy = BusyLock::acquire(&self.inner.cfg.lock_path(&id))?;
        let db = &self.inner.db;
        let quota = db
            .tenant(&row.sandbox.tenant)?
            .map(|t| t.quota)
            .unwrap_or_default();
        db.claim_resume(&row.sandbox, &quota)?;
        let resumed = self.resume_claimed(row).await;
        if resumed.is_err() {
            if let Err(e) = db.end_resume(&id) {
                tracing::error!(%id, "giving back the claim of a failed resume: {e}");
            }
        }
        resumed
    }

    /// [`resume_saved`](Self::resume_saved) once its resources are claimed, under its lock.
    async fn resume_claimed(&self, mut row: SandboxRow) -> Result<Sandbox> {
        let id = row.sandbox.id.clone();
        let cfg = &self.inner.cfg;
        let saved = snapshot::saved_of(cfg, &id).ok_or_else(|| {
            Error::Host(format!(
                "sandbox {id} is saved, but its saved VM is missing or incomplete; destroy it"
            ))
        })?;
        let template = self.template_of(&row.sandbox, "are saved")?;
        {
            let (saved, base) = (saved.clone(), PathBuf::from(&template.rootfs));
            blocking(move || saved.check_base(&base))
                .await
                .map_err(|e| match e {
                    Error::Conflict(why) => {
                        Error::Conflict(format!("sandbox {id} cannot be resumed: {why}"))
                    }
                    other => other,
                })?;
        }
        let started = Instant::now();
        if !cfg.netns(&id).exists() {
            self.remake_network(&row).await?;
        }
        {
            let (cfg, saved, id, uid) = (cfg.clone(), saved.clone(), id.clone(), cfg.uid(&row));
            blocking(move || give_back_files(&cfg, &saved, &id, uid)).await?;
        }
        let addrs = net::Addresses::of(cfg.subnet, row.slot);
        let start = tier::Start {
            container_slots: 0,
            guest_net: row
                .sandbox
                .network
                .address
                .is_some()
                .then(|| guest_nic(addrs)),
            boot: vm::Boot::Resume(saved.clone()),
            share: CpuShare::Normal,
        };
        let resumed = self
            .start_sandbox(
                &mut row,
                Userland::Template(template),
                start,
                None,
                None,
                started,
            )
            .await;
        if let Err(e) = resumed {
            return Err(match self.settle_saved(&id, &saved).await {
                Ok(()) => e,
                Err(undo) => Error::Host(format!("{e}; undoing the attempt also failed: {undo}")),
            });
        }
        row.sandbox.state = SandboxState::Running;
        let timeout_s = row.sandbox.timeout_s;
        row.sandbox.expires_at = (timeout_s > 0).then(|| db::now() + timeout_s as i64);
        self.inner.db.update_sandbox(&row)?;
        // Its jail holds the files it loaded.
        if let Err(e) = blocking(move || saved.remove()).await {
            tracing::warn!(%id, "removing the saved VM of a resumed sandbox: {e}");
        }
        tracing::info!(%id, took = ?started.elapsed(), "saved sandbox resumed");
        Ok(row.sandbox)
    }
}

/// The files of sandbox `id` that lie in its sandbox directory while it runs and with its
/// saved VM while it is saved: its writable layer and console log, each with its name there.
fn sandbox_files(cfg: &ManagerConfig, id: &str) -> [(PathBuf, &'static str); 2] {
    let dir = cfg.sandbox_dir(id);
    [
        (dir.join(vm::LAYER_NAME), vm::LAYER_NAME),
        (tier::console(Isolation::Vm, &dir).path(), console::LOG_NAME),
    ]
}

/// Moves saved sandbox `id`'s files from its sandbox directory to its saved VM.
fn keep_files(cfg: &ManagerConfig, saved: &snapshot::SavedVm, id: &str) -> Result<()> {
    sandbox_files(cfg, id)
        .iter()
        .try_for_each(|(path, name)| saved.keep_file(path, name))
}

/// Moves saved sandbox `id`'s files from its saved VM back into its sandbox directory (made
/// if missing), the layer its `uid`'s again.
fn give_back_files(
    cfg: &ManagerConfig,
    saved: &snapshot::SavedVm,
    id: &str,
    uid: u32,
) -> Result<()> {
    let dir = cfg.sandbox_dir(id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::host(format!("creating {}", dir.display()), e))?;
    for (path, name) in sandbox_files(cfg, id) {
        saved.return_file(name, &path)?;
    }
    let layer = dir.join(vm::LAYER_NAME);
    std::os::unix::fs::lchown(&layer, Some(uid), Some(uid))
        .map_err(|e| Error::host(format!("handing {} to the sandbox", layer.display()), e))
}

impl Manager {
    /// Where saved sandbox `id`'s console log lies (with its saved VM).
    pub(super) fn saved_console(&self, id: &str) -> Option<PathBuf> {
        snapshot::saved_of(&self.inner.cfg, id).map(|saved| saved.file(console::LOG_NAME))
    }
}
