//! Templates: the registered kernels and base images sandboxes are made from, and their
//! warm-up into a snapshot that vm-tier creates restore.

use std::path::Path;

use super::create::Origin;
use super::snapshot::{self, Staging, WarmSize};
use super::tier::vm;
use super::{blocking, Manager, DEFAULT_TEMPLATE};
use crate::db::{self, Tenant};
use crate::error::{Error, Result};
use crate::model::{CreateSandbox, Isolation, Sandbox, Template, TemplateSnapshot, WarmRequest};

impl Manager {
    fn template(&self, name: &str) -> Result<Template> {
        self.inner
            .db
            .templates()?
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no template {name:?}; list them with `mvm templates`, build one with `mvm build`"
                ))
            })
    }

    /// The template `name` (default: [`DEFAULT_TEMPLATE`]).
    pub(super) fn requested_template(&self, name: Option<String>) -> Result<Template> {
        let name = name.unwrap_or_else(|| DEFAULT_TEMPLATE.into());
        db::validate_name("template", &name)?;
        self.template(&name)
    }

    /// The registered template sandbox `s` was made from; `which` completes "only template
    /// sandboxes ..." in the error for any other.
    pub(super) fn template_of(&self, s: &Sandbox, which: &str) -> Result<Template> {
        self.requested_template(Some(s.template.clone()))
            .map_err(|_| {
                Error::Invalid(format!(
                    "sandbox {} was not made from a registered template ({}): only template \
                     sandboxes {which}",
                    s.id, s.template
                ))
            })
    }

    /// Registered templates, each with its usable warm snapshots.
    pub fn templates(&self) -> Result<Vec<Template>> {
        Ok(self
            .inner
            .db
            .templates()?
            .into_iter()
            .map(|t| self.with_snapshots(t))
            .collect())
    }

    /// Template `t` with its usable warm snapshots, the defaults' size's and the others,
    /// each with its pools' ready entries.
    fn with_snapshots(&self, t: Template) -> Template {
        let cfg = &self.inner.cfg;
        let described = |warm: snapshot::WarmSnapshot| {
            let (pooled, fork_pooled) = self.inner.pools.ready(&t.name, warm.size());
            TemplateSnapshot {
                pooled,
                fork_pooled,
                ..warm.describe()
            }
        };
        Template {
            snapshot: snapshot::find(cfg, &t, WarmSize::DEFAULT).map(described),
            other_snapshots: snapshot::find_other_sizes(cfg, &t)
                .into_iter()
                .map(described)
                .collect(),
            ..t
        }
    }

    /// Registers a template after checking its files.
    pub fn add_template(&self, t: Template) -> Result<Template> {
        db::validate_name("template", &t.name)?;
        for (what, path) in [("kernel", &t.kernel), ("rootfs", &t.rootfs)] {
            let p = Path::new(path);
            if !p.is_absolute() || !p.is_file() {
                return Err(Error::Invalid(format!(
                    "{what} {path:?} must be an absolute path to an existing file"
                )));
            }
        }
        self.inner.db.put_template(&t)?;
        Ok(t)
    }

    /// Warms template `name` at the size `req` asks (a create's defaults for what it leaves
    /// out): boots it once in a vm-tier sandbox of that size of `tenant` (counted in its
    /// quota and held to its limits meanwhile), waits for the agent, pauses the VM and saves
    /// it with its writable layer, destroys the sandbox and keeps the snapshot with the
    /// template, replacing an earlier one of that size. Creates of the snapshot's size then
    /// restore it instead of booting.
    pub async fn warm_template(
        &self,
        tenant: &Tenant,
        name: &str,
        req: &WarmRequest,
    ) -> Result<Template> {
        let size = WarmSize {
            vcpus: req.vcpus.unwrap_or(WarmSize::DEFAULT.vcpus),
            memory_mib: req.memory_mib.unwrap_or(WarmSize::DEFAULT.memory_mib),
        };
        let template = self.requested_template(Some(name.to_string()))?;
        if let Some(why) = self.vm_tier_unavailable() {
            return Err(Error::TierUnavailable(format!(
                "warming template {name} saves a running micro-VM, which needs the vm tier: \
                 {why}. Jail-tier sandboxes start from the template's files and need no warm-up"
            )));
        }
        let req = CreateSandbox {
            template: Some(template.name.clone()),
            isolation: Some(Isolation::Vm),
            vcpus: Some(size.vcpus),
            memory_mib: Some(size.memory_mib),
            ..CreateSandbox::default()
        };
        let sandbox = self.create_from(tenant, req, Origin::Warming).await?;
        let staged = self
            .save_for_warming(&tenant.name, &template, &sandbox, size)
            .await;
        let destroyed = self.destroy(&tenant.name, &sandbox.id).await;
        let staging = staged?;
        destroyed?;
        let cfg = self.inner.cfg.clone();
        let name = template.name.clone();
        blocking(move || staging.commit(&cfg, &name)).await?;
        tracing::info!(template = %template.name, ?size, "template warmed");
        // The pool's entries of an earlier snapshot of that size are replaced.
        self.refill(&template.name, size);
        Ok(self.with_snapshots(template))
    }

    /// Pauses the warming sandbox's VM and saves it, with its writable layer, as template
    /// `t`'s staged snapshot of `size`.
    async fn save_for_warming(
        &self,
        tenant: &str,
        t: &Template,
        sandbox: &Sandbox,
        size: WarmSize,
    ) -> Result<Staging> {
        let row = self.row(tenant, &sandbox.id)?;
        // The socket's path is valid while `socket` lives.
        let socket = self.vmm_api(&row)?;
        let api = socket.path();
        vm::set_paused(&api, true).await?;
        vm::save_snapshot(&api).await?;
        let cfg = self.inner.cfg.clone();
        let (t, id) = (t.clone(), sandbox.id.clone());
        blocking(move || {
            let staging = Staging::new(&cfg, &t, &id, size)?;
            staging.take(&cfg, &id, &cfg.sandbox_dir(&id).join(vm::LAYER_NAME))?;
            Ok(staging)
        })
        .await
    }
}
