//! Sandbox snapshots: a vm-tier sandbox's VM at one instant (memory, devices, writable layer),
//! kept apart from the sandbox under an id (and a name) of its tenant's, for new sandboxes to
//! start from (`snapshot` of a create): E2B's `create_snapshot`.
//!
//! Taking one is a fork's save: a running source is paused only while its VMM saves and the
//! manager copies its layer, then goes on; a paused one stays paused; a saved one is not
//! saved again, its own saved VM is linked and its layer copied. The files lie in the state
//! directory (`snapshot::sandbox_snapshot`) until the snapshot is deleted, whatever becomes of
//! the source. A create from one restores it as a fork's child does, from links to its files
//! made for that create, so a deletion meanwhile takes nothing from under it. A tenant keeps
//! at most as many snapshots as it may have sandboxes, and they hold, with its saved
//! sandboxes, at most its memory quota in guest memory (each holds a memory file on the
//! host's disk).

use super::create::Origin;
use super::lock::BusyLock;
use super::{blocking, snapshot, Manager};
use crate::db::{self, Tenant};
use crate::error::{Error, Result};
use crate::model::{CreateSandbox, CreateSnapshot, Isolation, Sandbox, SandboxState, Snapshot};

impl Manager {
    /// Takes a snapshot of sandbox `id` of `tenant` (vm tier, made from a template), which
    /// goes on as it was: running, paused or saved. A name the tenant gave another snapshot
    /// moves to this one, and that one is deleted.
    pub async fn snapshot_sandbox(
        &self,
        tenant: &Tenant,
        id: &str,
        req: CreateSnapshot,
    ) -> Result<Snapshot> {
        if let Some(name) = &req.name {
            db::validate_name("snapshot", name)?;
            if name.starts_with(snapshot::SNAPSHOT_ID_PREFIX) {
                return Err(Error::Invalid(format!(
                    "snapshot name {name:?}: names starting with {:?} are snapshot ids",
                    snapshot::SNAPSHOT_ID_PREFIX
                )));
            }
        }
        // Its turn while it is saved: nothing pauses, saves or resumes it meanwhile.
        let turn = self.transition(id).await;
        let row = self.row(&tenant.name, id)?;
        let source = &row.sandbox;
        if source.isolation != Isolation::Vm {
            return Err(Error::Invalid(format!(
                "sandbox {id} is in the jail tier: a snapshot keeps a micro-VM's memory, so \
                 only vm-tier sandboxes are snapshotted (create it with --isolation vm)"
            )));
        }
        let template = self.template_of(source, "are snapshotted")?;
        if !matches!(
            source.state,
            SandboxState::Running | SandboxState::Paused | SandboxState::Saved
        ) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is {}: only a running, paused or saved sandbox is snapshotted",
                source.state.as_str()
            )));
        }
        let mut taken = Snapshot {
            id: format!("{}{}", snapshot::SNAPSHOT_ID_PREFIX, db::random_hex(8)?),
            name: None,
            source: id.to_owned(),
            template: source.template.clone(),
            vcpus: source.vcpus,
            memory_mib: source.memory_mib,
            created_at: db::now(),
        };
        // Held while it is taken: another manager's reconciliation leaves it alone.
        let _busy = BusyLock::acquire(&self.inner.cfg.lock_path(&taken.id))?;
        let db = &self.inner.db;
        db.insert_snapshot(&tenant.name, &taken, &tenant.quota)?;
        let kept = self.keep_vm(&row, &taken.id, &template.rootfs).await;
        drop(turn);
        let replaced =
            kept.and_then(|()| db.commit_snapshot(&tenant.name, &taken.id, req.name.as_deref()));
        match replaced {
            Ok(replaced) => {
                if let Some(old) = replaced {
                    self.remove_snapshot_files(&old).await?;
                }
                taken.name = req.name;
                tracing::info!(%id, snapshot = %taken.id, "sandbox snapshotted");
                Ok(taken)
            }
            Err(e) => {
                if let Err(undo) = self.remove_snapshot_files(&taken.id).await {
                    tracing::error!(snapshot = %taken.id, "removing a failed snapshot: {undo}");
                }
                db.delete_snapshot(&taken.id)?;
                Err(e)
            }
        }
    }

    /// Keeps the VM of `row` (on the base image `base`) as snapshot `snapshot`'s: saved with
    /// a copy of its layer if it runs or is paused, its own saved VM linked if it is saved.
    async fn keep_vm(&self, row: &db::SandboxRow, snapshot: &str, base: &str) -> Result<()> {
        let dir = {
            let (cfg, snapshot) = (self.inner.cfg.clone(), snapshot.to_owned());
            blocking(move || snapshot::sandbox_snapshot_dir(&cfg, &snapshot)).await?
        };
        if row.sandbox.state == SandboxState::Saved {
            let own = self
                .saved_source(&row.sandbox.id, base, "be snapshotted")
                .await?;
            return blocking(move || own.copy_as_snapshot(dir).map(drop)).await;
        }
        let saved = self.save_copy(row, dir).await?;
        let base = std::path::PathBuf::from(base);
        blocking(move || saved.record_base(&base)).await
    }

    /// The snapshots of `tenant`, oldest first.
    pub fn snapshots(&self, tenant: &str) -> Result<Vec<Snapshot>> {
        self.inner.db.snapshots(tenant)
    }

    /// Snapshot `key` (its id or name) of `tenant`; another tenant's is not found.
    pub fn snapshot(&self, tenant: &str, key: &str) -> Result<Snapshot> {
        self.inner
            .db
            .snapshot(tenant, key)?
            .ok_or_else(|| Error::NotFound(format!("no snapshot {key:?}")))
    }

    /// Deletes snapshot `key` (its id or name) of `tenant`: sandboxes made from it go on,
    /// and a create from it under way finishes.
    pub async fn delete_snapshot(&self, tenant: &str, key: &str) -> Result<Snapshot> {
        let snap = self.snapshot(tenant, key)?;
        self.inner.db.delete_snapshot(&snap.id)?;
        self.remove_snapshot_files(&snap.id).await?;
        tracing::info!(snapshot = %snap.id, "snapshot deleted");
        Ok(snap)
    }

    /// Removes snapshot `id`'s files in its turn: not while a create links them.
    async fn remove_snapshot_files(&self, id: &str) -> Result<()> {
        let _turn = self.transition(id).await;
        let (cfg, id) = (self.inner.cfg.clone(), id.to_owned());
        blocking(move || snapshot::remove_sandbox_snapshot(&cfg, &id)).await
    }

    /// Creates a sandbox of `tenant` from its snapshot `key` (`req.snapshot`): the
    /// snapshot's template, tier and size, unless `req` asks for others (refused), and the
    /// rest of `req` (timeout, lifecycle, env, network, metadata, ports) as at any create.
    pub(super) async fn create_from_snapshot(
        &self,
        tenant: &Tenant,
        mut req: CreateSandbox,
        key: &str,
    ) -> Result<Sandbox> {
        let snap = self.snapshot(&tenant.name, key)?;
        let differs = [
            (
                "isolation",
                req.isolation.is_some_and(|i| i != Isolation::Vm),
            ),
            (
                "template",
                req.template.as_ref().is_some_and(|t| *t != snap.template),
            ),
            ("vcpus", req.vcpus.is_some_and(|v| v != snap.vcpus)),
            (
                "memory_mib",
                req.memory_mib.is_some_and(|m| m != snap.memory_mib),
            ),
        ];
        if let Some((field, _)) = differs.iter().find(|(_, differs)| *differs) {
            return Err(Error::Invalid(format!(
                "{field}: a sandbox made from snapshot {} has its VM's (vm tier, template {}, \
                 {} vCPUs, {} MiB); leave {field} out",
                snap.id, snap.template, snap.vcpus, snap.memory_mib
            )));
        }
        if req.image.is_some() || !req.secrets.is_empty() {
            return Err(Error::Invalid(format!(
                "image and secrets: a sandbox made from snapshot {} has the snapshot's file \
                 system and trust store",
                snap.id
            )));
        }
        let template = self.requested_template(Some(snap.template.clone()))?;
        // The links' name, held while they are used: another manager's reconciliation leaves
        // them alone.
        let name = format!("{}.{}", snap.id, db::random_hex(8)?);
        let _using = BusyLock::acquire(&self.inner.cfg.lock_path(&name))?;
        let links = {
            let _turn = self.transition(&snap.id).await;
            // Deleted meanwhile (its row goes first, its files in this turn): not found.
            self.snapshot(&tenant.name, &snap.id)?;
            let (cfg, id) = (self.inner.cfg.clone(), snap.id.clone());
            blocking(move || {
                let kept = snapshot::sandbox_snapshot(&cfg, &id).ok_or_else(|| {
                    Error::Host(format!(
                        "snapshot {id}'s files are missing or incomplete; delete it"
                    ))
                })?;
                kept.link_for_create(&cfg, &name)
            })
            .await?
        };
        let (checked, base) = (links.clone(), std::path::PathBuf::from(&template.rootfs));
        let made = match blocking(move || checked.check_base(&base)).await {
            Ok(()) => {
                req.isolation = Some(Isolation::Vm);
                req.template = Some(snap.template.clone());
                req.vcpus = Some(snap.vcpus);
                req.memory_mib = Some(snap.memory_mib);
                req.snapshot = Some(snap.id.clone());
                self.create_from(tenant, req, Origin::Fork(links.clone()))
                    .await
            }
            Err(Error::Conflict(why)) => Err(Error::Conflict(format!(
                "snapshot {} cannot be restored: {why}",
                snap.id
            ))),
            Err(e) => Err(e),
        };
        // The new sandbox's jail holds the files it restored.
        let removed = blocking(move || links.remove()).await;
        let made = made?;
        removed?;
        Ok(made)
    }

    /// Drops what a stopped mvmd left of snapshots being taken (their rows and files) and
    /// of creates from snapshots (their links). Snapshots another manager is taking stay.
    pub(super) async fn reconcile_snapshots(&self) -> Result<()> {
        let (cfg, db) = (&self.inner.cfg, &self.inner.db);
        let mut keep = Vec::new();
        for (id, ready) in db.snapshot_ids()? {
            if ready || BusyLock::held_elsewhere(&cfg.lock_path(&id)) {
                keep.push(id);
                continue;
            }
            tracing::info!(snapshot = %id, "reconcile: removing a snapshot left half-taken");
            db.delete_snapshot(&id)?;
        }
        let cfg = cfg.clone();
        blocking(move || {
            let in_use = |name: &str| BusyLock::held_elsewhere(&cfg.lock_path(name));
            snapshot::sweep_sandbox_snapshots(&cfg, &keep, in_use)
        })
        .await
    }
}
