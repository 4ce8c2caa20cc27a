//! [`LimitCgroups`]: the files holding a live sandbox's memory and CPU limits.

use std::path::{Path, PathBuf};

use jailer::CgroupVersion;

use super::{keyed_value, read_counter, CgroupMode};
use crate::error::{Error, Result};

/// The file holding a memory limit.
pub(super) fn memory_limit_key(version: CgroupVersion) -> &'static str {
    match version {
        CgroupVersion::V1 => "memory.limit_in_bytes",
        CgroupVersion::V2 => "memory.max",
    }
}

/// The files and values setting CFS limit `q`, in the order to write them.
pub(super) fn cpu_quota_values(version: CgroupVersion, q: CpuQuota) -> Vec<(&'static str, String)> {
    match version {
        CgroupVersion::V1 => vec![
            ("cpu.cfs_period_us", q.period_us.to_string()),
            ("cpu.cfs_quota_us", q.quota_us.to_string()),
        ],
        CgroupVersion::V2 => vec![("cpu.max", format!("{} {}", q.quota_us, q.period_us))],
    }
}

/// How much of a contended CPU a sandbox's processes get against other sandboxes'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuShare {
    /// The kernel's default (v1 `cpu.shares` 1024, v2 `cpu.weight` 100).
    Normal,
    /// The least the kernel gives (v1 2, v2 1): background work, such as filling a warm
    /// pool, that runs only where live sandboxes leave the CPU idle.
    Background,
}

/// The file and value setting `share`.
pub(super) fn cpu_share_value(version: CgroupVersion, share: CpuShare) -> (&'static str, String) {
    let (v1, v2) = match share {
        CpuShare::Normal => (1024, 100),
        CpuShare::Background => (2, 1),
    };
    match version {
        CgroupVersion::V1 => ("cpu.shares", v1.to_string()),
        CgroupVersion::V2 => ("cpu.weight", v2.to_string()),
    }
}

/// A CFS bandwidth limit: `quota_us` of CPU time in every `period_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuQuota {
    /// CPU time per period, µs.
    pub quota_us: u64,
    /// Length of the period, µs.
    pub period_us: u64,
}

/// The cgroups that hold a sandbox's memory and CPU limits and count its OOM kills, on the
/// hierarchies of this host's [`CgroupMode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitCgroups {
    /// cgroup v1: the sandbox's cgroups in the memory and cpu hierarchies.
    V1 {
        /// `<memory mount>/<parent>/<id>`.
        memory: PathBuf,
        /// `<cpu mount>/<parent>/<id>`.
        cpu: PathBuf,
    },
    /// cgroup v2: the sandbox's cgroup, `<cgroup2 mount>/<parent>/<id>`.
    V2(PathBuf),
}

impl LimitCgroups {
    /// The cgroups of sandbox `id` under `parent`.
    pub fn of(parent: &str, id: &str) -> Result<LimitCgroups> {
        let mode = CgroupMode::host()?;
        mode.limit_cgroups(parent, id).ok_or_else(|| {
            Error::NotFound(format!(
                "sandbox {id} has no memory and cpu cgroups under {parent:?} (cgroup v{}); it is \
                 not running on this host",
                match mode.version() {
                    CgroupVersion::V1 => 1,
                    CgroupVersion::V2 => 2,
                }
            ))
        })
    }

    /// The cgroup version these cgroups are on.
    fn version(&self) -> CgroupVersion {
        match self {
            LimitCgroups::V1 { .. } => CgroupVersion::V1,
            LimitCgroups::V2(_) => CgroupVersion::V2,
        }
    }

    /// Sets the memory limit (v1 `memory.limit_in_bytes`, v2 `memory.max`), swap staying off
    /// as the jailer set it: v1's memory+swap limit (where swap is accounted) moves with it,
    /// v2's `memory.swap.max` stays 0. v1 refuses a limit below what the sandbox uses and
    /// cannot reclaim; v2 reclaims and OOM-kills instead.
    pub fn set_memory_limit(&self, bytes: u64) -> Result<()> {
        let files = match self {
            LimitCgroups::V1 { memory, .. } => {
                let limit = memory.join(memory_limit_key(CgroupVersion::V1));
                let memsw = memory.join("memory.memsw.limit_in_bytes");
                if !memsw.exists() {
                    vec![limit]
                } else if bytes > read_counter(&limit, None).unwrap_or(0) {
                    // The kernel refuses memsw < memory at every step.
                    vec![memsw, limit]
                } else {
                    vec![limit, memsw]
                }
            }
            LimitCgroups::V2(dir) => vec![dir.join(memory_limit_key(CgroupVersion::V2))],
        };
        for file in files {
            std::fs::write(&file, bytes.to_string()).map_err(|e| {
                if e.raw_os_error() == Some(libc::EBUSY) {
                    Error::Conflict(format!(
                        "cannot lower the memory limit to {bytes} bytes: the sandbox uses more \
                         than that and the kernel could not reclaim enough ({}); free memory in \
                         the sandbox or choose a higher limit",
                        file.display()
                    ))
                } else {
                    Error::host(format!("writing {bytes} to {}", file.display()), e)
                }
            })?;
        }
        Ok(())
    }

    /// The current CFS limit: quota (`None`: unlimited) and period, µs.
    pub fn cpu_quota(&self) -> Result<(Option<u64>, u64)> {
        let read = |file: PathBuf| {
            std::fs::read_to_string(&file)
                .map_err(|e| Error::host(format!("reading {}", file.display()), e))
                .map(|s| (file, s))
        };
        let bad = |file: &Path, s: &str| {
            Error::Host(format!(
                "{} holds {:?}, not a CFS limit",
                file.display(),
                s.trim()
            ))
        };
        match self {
            LimitCgroups::V1 { cpu, .. } => {
                let (qf, q) = read(cpu.join("cpu.cfs_quota_us"))?;
                let (pf, p) = read(cpu.join("cpu.cfs_period_us"))?;
                let quota: i64 = q.trim().parse().map_err(|_| bad(&qf, &q))?;
                let period = p.trim().parse().map_err(|_| bad(&pf, &p))?;
                Ok((u64::try_from(quota).ok(), period))
            }
            LimitCgroups::V2(dir) => {
                let (f, s) = read(dir.join("cpu.max"))?;
                let (q, p) = s.trim().split_once(' ').ok_or_else(|| bad(&f, &s))?;
                let quota = match q {
                    "max" => None,
                    q => Some(q.parse().map_err(|_| bad(&f, &s))?),
                };
                Ok((quota, p.parse().map_err(|_| bad(&f, &s))?))
            }
        }
    }

    /// The cgroup holding the CPU controller's files.
    fn cpu_dir(&self) -> &Path {
        match self {
            LimitCgroups::V1 { cpu, .. } => cpu,
            LimitCgroups::V2(dir) => dir,
        }
    }

    /// Sets the CFS limit (v1 `cpu.cfs_period_us` then `cpu.cfs_quota_us`, v2 `cpu.max`).
    pub fn set_cpu_quota(&self, q: CpuQuota) -> Result<()> {
        let dir = self.cpu_dir();
        for (key, value) in cpu_quota_values(self.version(), q) {
            let file = dir.join(key);
            std::fs::write(&file, &value)
                .map_err(|e| Error::host(format!("writing {value} to {}", file.display()), e))?;
        }
        Ok(())
    }

    /// Sets the sandbox's share of a contended CPU (v1 `cpu.shares`, v2 `cpu.weight`).
    pub fn set_cpu_share(&self, share: CpuShare) -> Result<()> {
        let dir = self.cpu_dir();
        let (key, value) = cpu_share_value(self.version(), share);
        let file = dir.join(key);
        std::fs::write(&file, &value)
            .map_err(|e| Error::host(format!("writing {value} to {}", file.display()), e))
    }

    /// How many processes the kernel's OOM killer has killed in the sandbox's memory cgroup
    /// (the `oom_kill` counter of v1 `memory.oom_control`, v2 `memory.events`).
    pub fn oom_kills(&self) -> Result<u64> {
        let file = match self {
            LimitCgroups::V1 { memory, .. } => memory.join("memory.oom_control"),
            LimitCgroups::V2(dir) => dir.join("memory.events"),
        };
        let text = std::fs::read_to_string(&file)
            .map_err(|e| Error::host(format!("reading {}", file.display()), e))?;
        keyed_value(&text, "oom_kill")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| {
                Error::Host(format!(
                    "{} has no oom_kill counter (it needs Linux 4.13 or later)",
                    file.display()
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_limit_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| dir.path().join(name);
        std::fs::write(file("memory.max"), "max\n").unwrap();
        std::fs::write(file("cpu.max"), "max 100000\n").unwrap();
        std::fs::write(
            file("memory.events"),
            "low 0\nhigh 0\nmax 7\noom 2\noom_kill 3\noom_group_kill 0\n",
        )
        .unwrap();
        let cg = LimitCgroups::V2(dir.path().to_path_buf());
        assert_eq!(cg.cpu_quota().unwrap(), (None, 100_000));
        assert_eq!(cg.oom_kills().unwrap(), 3);
        cg.set_memory_limit(32 << 20).unwrap();
        assert_eq!(
            std::fs::read_to_string(file("memory.max")).unwrap(),
            "33554432"
        );
        cg.set_cpu_quota(CpuQuota {
            quota_us: 50_000,
            period_us: 200_000,
        })
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(file("cpu.max")).unwrap(),
            "50000 200000"
        );
        assert_eq!(cg.cpu_quota().unwrap(), (Some(50_000), 200_000));
        std::fs::write(file("cpu.max"), "garbage").unwrap();
        cg.cpu_quota().unwrap_err();
        std::fs::write(file("memory.events"), "oom 1\n").unwrap();
        cg.oom_kills().unwrap_err();
    }
}
