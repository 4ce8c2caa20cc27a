//! Each running sandbox's usage over time (E2B's sandbox metrics): CPU, memory and disk
//! sampled every [`SAMPLE_EVERY`] by [`Manager::sample_usage`], the last hour of samples of
//! each sandbox kept in memory, gone with the sandbox (and with mvmd: nothing is stored).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use super::{blocking, cgroups, lock, pool, tier, Manager, ManagerConfig};
use crate::error::Result;
use crate::model::{Isolation, Sandbox, SandboxState, UsageSample};

/// How often [`Manager::sample_usage`] is meant to run (mvmd's sampler).
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Samples kept per sandbox: an hour's at [`SAMPLE_EVERY`].
const KEPT: usize = 720;

/// The samples of every sandbox sampled, by id.
#[derive(Default)]
pub(super) struct UsageHistory(Mutex<HashMap<String, Series>>);

/// One sandbox's samples, oldest first, and its CPU time at the last one.
#[derive(Default)]
struct Series {
    cpu_ns: u64,
    samples: VecDeque<UsageSample>,
}

/// What is read of a sandbox at a sample.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Reading {
    cpu_ns: u64,
    memory_bytes: u64,
    rss_bytes: u64,
    disk_used_bytes: u64,
    disk_total_bytes: u64,
}

impl Manager {
    /// Samples the usage of every running sandbox of a tenant once, and forgets the samples of
    /// sandboxes that are gone. A paused or saved sandbox keeps its samples and gets none.
    pub async fn sample_usage(&self) -> Result<()> {
        let rows = self.inner.db.sandboxes(None)?;
        let alive: HashSet<String> = rows.iter().map(|r| r.sandbox.id.clone()).collect();
        let sampled: Vec<Sandbox> = rows
            .into_iter()
            .map(|r| r.sandbox)
            .filter(|s| s.state == SandboxState::Running && s.tenant != pool::POOL_TENANT)
            .collect();
        let cfg = self.inner.cfg.clone();
        let read = blocking(move || {
            Ok(sampled
                .into_iter()
                .map(|s| (read(&cfg, &s.id, s.isolation), s))
                .collect::<Vec<_>>())
        })
        .await?;
        let at_ms = now_ms();
        let mut history = lock(&self.inner.usage.0);
        history.retain(|id, _| alive.contains(id));
        for (reading, s) in read {
            history.entry(s.id).or_default().push(
                reading,
                at_ms,
                s.vcpus,
                s.memory_mib << 20,
                s.created_at * 1000,
            );
        }
        Ok(())
    }

    /// The usage samples of `tenant`'s sandbox `id` taken from `start` to `end` (Unix s, both
    /// included; either open), oldest first. Another tenant's sandbox is not found.
    pub fn usage_history(
        &self,
        tenant: &str,
        id: &str,
        start: Option<i64>,
        end: Option<i64>,
    ) -> Result<Vec<UsageSample>> {
        self.row(tenant, id)?;
        let history = lock(&self.inner.usage.0);
        Ok(history.get(id).map_or_else(Vec::new, |series| {
            series.between(start.map(|s| s * 1000), end.map(|e| e * 1000 + 999))
        }))
    }
}

impl Series {
    /// Adds `reading`, taken at `at_ms`, of a sandbox of `vcpus` and `memory_total` bytes made
    /// at `created_ms`: its CPU use is over the time since the sample before, or since
    /// `created_ms` for the first. The oldest sample goes past [`KEPT`].
    fn push(
        &mut self,
        reading: Reading,
        at_ms: i64,
        vcpus: u32,
        memory_total: u64,
        created_ms: i64,
    ) {
        let since_ms = self.samples.back().map_or(created_ms, |last| last.at_ms);
        let vcpus = vcpus.max(1);
        let available_ns = (at_ms - since_ms).max(1) as f64 * 1e6 * f64::from(vcpus);
        let used_ns = reading.cpu_ns.saturating_sub(self.cpu_ns) as f64;
        self.cpu_ns = reading.cpu_ns;
        if self.samples.len() == KEPT {
            self.samples.pop_front();
        }
        self.samples.push_back(UsageSample {
            at_ms,
            vcpus,
            cpu_used_pct: (used_ns / available_ns * 100.0).clamp(0.0, 100.0),
            memory_used_bytes: reading.rss_bytes,
            memory_cache_bytes: reading.memory_bytes.saturating_sub(reading.rss_bytes),
            memory_total_bytes: memory_total,
            disk_used_bytes: reading.disk_used_bytes,
            disk_total_bytes: reading.disk_total_bytes,
        });
    }

    /// Its samples from `start_ms` to `end_ms` (both included; either open).
    fn between(&self, start_ms: Option<i64>, end_ms: Option<i64>) -> Vec<UsageSample> {
        self.samples
            .iter()
            .filter(|s| {
                start_ms.is_none_or(|t| s.at_ms >= t) && end_ms.is_none_or(|t| s.at_ms <= t)
            })
            .copied()
            .collect()
    }
}

/// Reads sandbox `id`'s CPU time and memory (its cgroups) and its writable layer's use: the
/// vm tier's layer image (allocated blocks of its size), the jail tier's tmpfs. What cannot
/// be read is 0.
fn read(cfg: &ManagerConfig, id: &str, isolation: Isolation) -> Reading {
    let parent = &cfg.cgroup_parent;
    let (cpu_ns, memory_bytes, _) = cgroups::cgroup_usage(parent, id);
    let dir = cfg.sandbox_dir(id);
    let (disk_used_bytes, disk_total_bytes) = match isolation {
        Isolation::Vm => std::fs::symlink_metadata(dir.join(tier::vm::LAYER_NAME))
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                ((m.blocks() * 512).min(m.len()), m.len())
            })
            .unwrap_or_default(),
        Isolation::Jail => mvm_sys::mount::statvfs(super::rootfs::Overlay::at(&dir).layer())
            .map(|fs| {
                let block = fs.f_frsize;
                ((fs.f_blocks - fs.f_bfree) * block, fs.f_blocks * block)
            })
            .unwrap_or_default(),
    };
    Reading {
        cpu_ns,
        memory_bytes,
        rss_bytes: cgroups::cgroup_rss(parent, id),
        disk_used_bytes,
        disk_total_bytes,
    }
}

/// Now, Unix time in ms.
fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(cpu_ns: u64) -> Reading {
        Reading {
            cpu_ns,
            memory_bytes: 30 << 20,
            rss_bytes: 20 << 20,
            disk_used_bytes: 1 << 20,
            disk_total_bytes: 64 << 20,
        }
    }

    /// CPU use is over the time since the sample before (the first: since the creation), per
    /// vCPU, within 0 to 100; the cache is what the cgroup holds beyond the RSS; an hour of
    /// samples is kept; a window picks the samples within it.
    #[test]
    fn samples_measure_cpu_between_them_and_keep_an_hour() {
        let mut series = Series::default();
        // 2 vCPUs, made 10 s before: 5 s of CPU is 25 %.
        series.push(reading(5_000_000_000), 10_000, 2, 256 << 20, 0);
        // 5 s later, 5 s more of CPU on 2 vCPUs: 50 %.
        series.push(reading(10_000_000_000), 15_000, 2, 256 << 20, 0);
        // A counter that went back (a cgroup made again) is no negative use.
        series.push(reading(1_000), 20_000, 2, 256 << 20, 0);
        let pct: Vec<f64> = series.samples.iter().map(|s| s.cpu_used_pct).collect();
        assert_eq!(pct, [25.0, 50.0, 0.0]);
        let first = series.samples[0];
        assert_eq!(
            (
                first.memory_used_bytes,
                first.memory_cache_bytes,
                first.memory_total_bytes
            ),
            (20 << 20, 10 << 20, 256 << 20)
        );
        assert_eq!(series.between(Some(15_000), None).len(), 2);
        assert_eq!(series.between(Some(11_000), Some(19_999)).len(), 1);
        assert!(series.between(Some(20_001), None).is_empty());
        for n in 0..KEPT as i64 {
            series.push(reading(2_000), 25_000 + n * 5_000, 1, 256 << 20, 0);
        }
        assert_eq!(series.samples.len(), KEPT);
        assert_eq!(series.samples[0].at_ms, 25_000);
    }
}
