//! Pausing, live resource limits and usage of a sandbox.

use super::{blocking, cgroups, tier, Manager, MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB};
use crate::db::{self, SandboxRow};
use crate::error::{Error, Result};
use crate::model::{Sandbox, SandboxState, SandboxStats};

impl Manager {
    /// Freezes (`true`) or thaws a sandbox; a saved one is resumed from its saved VM (see
    /// [`save`](Self::save)). A timeout stopped while it was paused starts again.
    pub async fn set_paused(&self, tenant: &str, id: &str, paused: bool) -> Result<Sandbox> {
        let _turn = self.transition(id).await;
        self.set_paused_now(self.row(tenant, id)?, paused).await
    }

    /// [`set_paused`](Self::set_paused) of sandbox `row`, in its turn.
    pub(super) async fn set_paused_now(
        &self,
        mut row: SandboxRow,
        paused: bool,
    ) -> Result<Sandbox> {
        let id = row.sandbox.id.clone();
        if row.sandbox.state == SandboxState::Saved && !paused {
            return self.resume_saved(row).await;
        }
        let (from, to) = if paused {
            (SandboxState::Running, SandboxState::Paused)
        } else {
            (SandboxState::Paused, SandboxState::Running)
        };
        if row.sandbox.state != from {
            return Err(Error::Conflict(format!(
                "sandbox {id} is {}; only a {} sandbox can be {}",
                row.sandbox.state.as_str(),
                from.as_str(),
                if paused { "paused" } else { "resumed" }
            )));
        }
        self.pause_tier(&row, paused).await?;
        row.sandbox.state = to;
        let timeout_s = row.sandbox.timeout_s;
        if !paused && row.sandbox.expires_at.is_none() && timeout_s > 0 {
            row.sandbox.expires_at = Some(db::now() + timeout_s as i64);
        }
        self.inner.db.update_sandbox(&row)?;
        Ok(row.sandbox)
    }

    /// Gives sandbox `id`'s processes `share` of a contended CPU against other sandboxes'.
    pub(super) async fn set_cpu_share(&self, id: &str, share: cgroups::CpuShare) -> Result<()> {
        let (parent, id) = (self.inner.cfg.cgroup_parent.clone(), id.to_owned());
        blocking(move || cgroups::LimitCgroups::of(&parent, &id)?.set_cpu_share(share)).await
    }

    /// Changes the memory limit and CPU quota of a running or paused sandbox: its cgroups at
    /// once, and the stored `memory_mib` (rounded up to MiB) and `vcpus` (the quota in cores,
    /// rounded up) within the tenant's quota. In the vm tier the CPU quota applies to the VMM's
    /// cgroup and the stored vCPUs stay the guest's; the guest's memory is fixed at boot, so a
    /// memory limit other than the current one is refused.
    pub async fn update_limits(
        &self,
        tenant: &str,
        id: &str,
        update: LimitsUpdate,
    ) -> Result<Sandbox> {
        let mut row = self.row(tenant, id)?;
        let s = &row.sandbox;
        if !matches!(s.state, SandboxState::Running | SandboxState::Paused) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is {}; only a running or paused sandbox's limits can change",
                s.state.as_str()
            )));
        }
        let memory = update
            .memory_bytes
            .map(|bytes| memory_change(s, bytes))
            .transpose()?
            .flatten();
        let parent = self.inner.cfg.cgroup_parent.clone();
        let sandbox = id.to_owned();
        let cgroups = blocking(move || cgroups::LimitCgroups::of(&parent, &sandbox)).await?;
        // The new CFS limit, and the current one to put back should the memory limit fail.
        let (cpu, previous_cpu) = if update.cpu_quota_us.is_some() || update.cpu_period_us.is_some()
        {
            let cg = cgroups.clone();
            let (quota, period) = blocking(move || cg.cpu_quota()).await?;
            let new_quota = update.cpu_quota_us.or(quota).ok_or_else(|| {
                Error::Invalid(format!(
                    "sandbox {id} has no CPU quota to keep with a new period; give a quota too"
                ))
            })?;
            let new = validate_cpu_quota(cgroups::CpuQuota {
                quota_us: new_quota,
                period_us: update.cpu_period_us.unwrap_or(period),
            })?;
            let previous = quota.map(|quota_us| cgroups::CpuQuota {
                quota_us,
                period_us: period,
            });
            (Some(new), previous)
        } else {
            (None, None)
        };
        let resized = {
            let mut s = row.sandbox.clone();
            if tier::limits_are_size(s.isolation) {
                if let Some(bytes) = memory {
                    s.memory_mib = bytes.div_ceil(1 << 20);
                }
                if let Some(q) = cpu {
                    s.vcpus = q.quota_us.div_ceil(q.period_us) as u32;
                }
            }
            s
        };
        let quota = self
            .inner
            .db
            .tenant(tenant)?
            .ok_or_else(|| Error::NotFound(format!("no tenant {tenant:?}")))?
            .quota;
        // Stored (and checked against the quota) first; put back if the cgroups refuse.
        let resize = resized != row.sandbox;
        if resize {
            self.inner.db.resize_sandbox(&resized, Some(&quota))?;
        }
        let applied = blocking(move || {
            if let Some(q) = cpu {
                cgroups.set_cpu_quota(q)?;
            }
            if let Some(bytes) = memory {
                if let Err(e) = cgroups.set_memory_limit(bytes) {
                    if let Some(previous) = previous_cpu {
                        if let Err(undo) = cgroups.set_cpu_quota(previous) {
                            tracing::error!("putting the CPU quota back: {undo}");
                        }
                    }
                    return Err(e);
                }
            }
            Ok(())
        })
        .await;
        if let Err(e) = applied {
            if resize {
                self.inner.db.resize_sandbox(&row.sandbox, None)?;
            }
            return Err(e);
        }
        row.sandbox = resized;
        Ok(row.sandbox)
    }

    /// The cgroups holding sandbox `id`'s limits, e.g. to watch its OOM kills
    /// ([`cgroups::LimitCgroups::oom_kills`]) without a look-up each time.
    pub fn limit_cgroups(&self, tenant: &str, id: &str) -> Result<cgroups::LimitCgroups> {
        self.row(tenant, id)?;
        cgroups::LimitCgroups::of(&self.inner.cfg.cgroup_parent, id)
    }

    /// The host pids of the processes in a sandbox's cgroups.
    pub fn pids(&self, tenant: &str, id: &str) -> Result<Vec<i32>> {
        self.row(tenant, id)?;
        Ok(cgroups::cgroup_pids(&self.inner.cfg.cgroup_parent, id))
    }

    /// CPU, memory and process count of a sandbox.
    pub fn stats(&self, tenant: &str, id: &str) -> Result<SandboxStats> {
        self.row(tenant, id)?;
        let (cpu_ns, memory_bytes, pids) = cgroups::cgroup_usage(&self.inner.cfg.cgroup_parent, id);
        Ok(SandboxStats {
            id: id.to_owned(),
            cpu_ns,
            memory_bytes,
            pids,
        })
    }
}

/// New resource limits for a live sandbox ([`Manager::update_limits`]); `None` keeps a value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsUpdate {
    /// Memory limit of the sandbox's cgroup, bytes (16 MiB to 64 GiB; jail tier).
    pub memory_bytes: Option<u64>,
    /// CPU time per CFS period, µs (at least 1000, at most 32 periods).
    pub cpu_quota_us: Option<u64>,
    /// CFS period, µs (1000 to 1000000).
    pub cpu_period_us: Option<u64>,
}

/// The memory limit to write for a request of `bytes` on sandbox `s`: checked against the
/// sandbox bounds; `None` in the vm tier, where only the current size is accepted.
fn memory_change(s: &Sandbox, bytes: u64) -> Result<Option<u64>> {
    if !(MIN_MEMORY_MIB << 20..=MAX_MEMORY_MIB << 20).contains(&bytes) {
        return Err(Error::Invalid(format!(
            "memory limit must be {MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB, got {bytes} bytes"
        )));
    }
    tier::memory_limit(s, bytes)
}

/// Checks a CFS limit against the kernel's bounds and the sandbox's 32-core ceiling.
fn validate_cpu_quota(q: cgroups::CpuQuota) -> Result<cgroups::CpuQuota> {
    if !(1_000..=1_000_000).contains(&q.period_us) {
        return Err(Error::Invalid(format!(
            "CPU period must be 1000 to 1000000 µs, got {}",
            q.period_us
        )));
    }
    if q.quota_us < 1_000 || q.quota_us.div_ceil(q.period_us) > u64::from(MAX_VCPUS) {
        return Err(Error::Invalid(format!(
            "CPU quota must be at least 1000 µs and at most {MAX_VCPUS} periods ({} µs), got {}",
            u64::from(MAX_VCPUS) * q.period_us,
            q.quota_us
        )));
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::manager::DEFAULT_TEMPLATE;
    use crate::model::Isolation;

    #[test]
    fn cpu_quota_bounds() {
        let q = |quota_us, period_us| {
            validate_cpu_quota(cgroups::CpuQuota {
                quota_us,
                period_us,
            })
        };
        q(50_000, 100_000).unwrap();
        q(1_000, 1_000).unwrap();
        q(32_000_000, 1_000_000).unwrap();
        let err = q(32_000_001, 1_000_000).unwrap_err().to_string();
        assert!(err.contains("32000000"), "{err}");
        q(999, 100_000).unwrap_err();
        q(50_000, 999).unwrap_err();
        q(50_000, 1_000_001).unwrap_err();
    }

    #[test]
    fn memory_changes_by_tier() {
        let mut s = Sandbox {
            id: "0123456789ab".into(),
            tenant: "t".into(),
            state: SandboxState::Running,
            isolation: Isolation::Jail,
            template: DEFAULT_TEMPLATE.into(),
            image: None,
            vcpus: 1,
            memory_mib: 256,
            timeout_s: 0,
            expires_at: None,
            created_at: 0,
            env: BTreeMap::new(),
            network: Default::default(),
            metadata: BTreeMap::new(),
            lifecycle: Default::default(),
            snapshot: None,
        };
        assert_eq!(memory_change(&s, 100 << 20).unwrap(), Some(100 << 20));
        memory_change(&s, (16 << 20) - 1).unwrap_err();
        memory_change(&s, (65536 << 20) + 1).unwrap_err();
        s.isolation = Isolation::Vm;
        // The current size is no change; anything else is refused, saying why.
        assert_eq!(memory_change(&s, 256 << 20).unwrap(), None);
        assert_eq!(memory_change(&s, (255 << 20) + 1).unwrap(), None);
        let err = memory_change(&s, 512 << 20).unwrap_err().to_string();
        assert!(err.contains("vm tier") && err.contains("balloon"), "{err}");
    }
}
