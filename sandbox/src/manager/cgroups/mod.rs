//! The sandboxes' cgroups, on the host's version (v1 or v2, detected once): the mode and its
//! hierarchies, the jail's settings, usage counters, the freezer, reaping every process of a
//! sandbox, and ([`limits`]) the limits of a live sandbox.

mod limits;

pub use limits::{CpuQuota, CpuShare, LimitCgroups};

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use jailer::{CgroupSetting, CgroupVersion};
use mvm_sys::cgroup::Hierarchies;

use limits::{cpu_quota_values, cpu_share_value, memory_limit_key};

use super::host::jailer_pids;
use crate::error::{Error, Result};

/// Env var that forces the cgroup version sandboxes use (`1` or `2`) instead of detecting it.
pub const CGROUP_VERSION_ENV: &str = "MVM_CGROUP_VERSION";

/// Controllers a sandbox needs on cgroup v1, each on a mounted legacy hierarchy.
const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];
/// Controllers a sandbox needs on cgroup v2 (CPU accounting and the freezer are built in).
const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];
/// CFS period of a new sandbox, µs; its quota is one period per vCPU.
const CPU_PERIOD_US: u64 = 100_000;
/// Most processes and threads a sandbox may have.
const PIDS_MAX: u64 = 4096;

/// Mount point of the v1 hierarchy carrying `controller`.
fn v1_mount(controller: &str) -> Option<PathBuf> {
    let mounted = Hierarchies::read().ok()?;
    mounted.v1(controller).map(|h| h.mount_point.clone())
}

/// The cgroup mode of a host with cgroup hierarchies `mounted`: the version `forced` (`1` or
/// `2`) or else the first usable one, v1 then v2. `controllers` reads a cgroup2 root's
/// `cgroup.controllers`.
fn detect(
    mounted: &Hierarchies,
    forced: Option<&str>,
    controllers: impl Fn(&Path) -> Option<String>,
) -> std::result::Result<CgroupMode, String> {
    let v1 = || {
        let missing: Vec<&str> = V1_CONTROLLERS
            .into_iter()
            .filter(|c| mounted.v1(c).is_none())
            .collect();
        if missing.is_empty() {
            Ok(CgroupMode::V1)
        } else {
            Err(format!(
                "cgroup v1: no legacy hierarchy carries {}",
                missing.join(", ")
            ))
        }
    };
    let v2 = || {
        let root = mounted
            .unified()
            .map(|h| h.mount_point.clone())
            .ok_or_else(|| "cgroup v2: no cgroup2 file system is mounted".to_string())?;
        let listed = controllers(&root).unwrap_or_default();
        let missing: Vec<&str> = V2_CONTROLLERS
            .into_iter()
            .filter(|c| !listed.split_whitespace().any(|l| l == *c))
            .collect();
        if missing.is_empty() {
            Ok(CgroupMode::V2 { root })
        } else {
            Err(format!(
                "cgroup v2: {} lists {:?}, without {} (bound to v1 hierarchies?)",
                root.join("cgroup.controllers").display(),
                listed.trim(),
                missing.join(", ")
            ))
        }
    };
    match forced {
        Some("1") => v1().map_err(|e| format!("{CGROUP_VERSION_ENV}=1, but {e}")),
        Some("2") => v2().map_err(|e| format!("{CGROUP_VERSION_ENV}=2, but {e}")),
        Some(other) => Err(format!(
            "{CGROUP_VERSION_ENV} is {other:?}; it takes 1 or 2 (or unset it to detect)"
        )),
        None => v1().or_else(|e1| {
            v2().map_err(|e2| {
                format!(
                    "this host's cgroups cannot hold sandboxes: {e1}; {e2}. Mount the v1 \
                     controllers, or cgroup2 with {} enabled (see /proc/self/mountinfo)",
                    V2_CONTROLLERS.join(", ")
                )
            })
        }),
    }
}

/// A number in a cgroup file: the whole file (`key` `None`) or the value of `key` in a
/// flat-keyed file (`key value` lines, e.g. `memory.events`).
fn read_counter(path: &Path, key: Option<&str>) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    match key {
        None => text.trim().parse().ok(),
        Some(key) => keyed_value(&text, key)?.parse().ok(),
    }
}

/// The value of `key` in a flat-keyed cgroup file.
fn keyed_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|l| match l.split_once(' ') {
        Some((k, v)) if k == key => Some(v.trim()),
        _ => None,
    })
}

/// Where a usage counter is: its controller's cgroup, file and key (see [`read_counter`]),
/// and the factor to the unit reported.
struct Counter {
    controller: &'static str,
    file: &'static str,
    key: Option<&'static str>,
    scale: u64,
}

/// A sandbox's freezer: writing `values[1]` to `control` freezes, `values[0]` thaws; the
/// value of `key` in `state` (see [`read_counter`]) becomes the one written when it is done.
struct Freezer {
    control: PathBuf,
    state: PathBuf,
    key: Option<&'static str>,
    values: [&'static str; 2],
}

impl Freezer {
    /// What `state` says now.
    fn state(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.state).ok()?;
        match self.key {
            None => Some(text.trim().to_owned()),
            Some(key) => keyed_value(&text, key).map(str::to_owned),
        }
    }
}

/// Which cgroup hierarchies hold the sandboxes on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupMode {
    /// The legacy (v1) hierarchies, one mount per controller or group of controllers.
    V1,
    /// The unified (v2) hierarchy.
    V2 {
        /// Mount point of the cgroup2 file system.
        root: PathBuf,
    },
}

impl CgroupMode {
    /// This host's mode, detected once per process: v1 when every controller a sandbox needs
    /// (cpu, cpuacct, memory, pids, freezer) is on a mounted legacy hierarchy (hybrid hosts
    /// included), else v2 when the cgroup2 mount offers cpu, memory and pids.
    /// `MVM_CGROUP_VERSION` (`1` or `2`) forces one, which must be usable all the same.
    pub fn host() -> Result<&'static CgroupMode> {
        static MODE: OnceLock<std::result::Result<CgroupMode, String>> = OnceLock::new();
        MODE.get_or_init(|| {
            let mounted = Hierarchies::read().map_err(|e| e.to_string())?;
            let forced = std::env::var(CGROUP_VERSION_ENV).ok();
            detect(
                &mounted,
                forced.as_deref().filter(|v| !v.is_empty()),
                |root| std::fs::read_to_string(root.join("cgroup.controllers")).ok(),
            )
        })
        .as_ref()
        .map_err(|e| Error::Host(e.clone()))
    }

    /// The jailer's `--cgroup-version` for this mode.
    pub fn version(&self) -> CgroupVersion {
        match self {
            CgroupMode::V1 => CgroupVersion::V1,
            CgroupMode::V2 { .. } => CgroupVersion::V2,
        }
    }

    /// The parent cgroups `parent` (v1: one per hierarchy a sandbox uses; v2: one), whether
    /// they exist or not.
    pub fn parent_dirs(&self, parent: &str) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = match self {
            CgroupMode::V1 => V1_CONTROLLERS.iter().filter_map(|c| v1_mount(c)).collect(),
            CgroupMode::V2 { root } => vec![root.clone()],
        };
        dirs.sort();
        dirs.dedup();
        dirs.into_iter().map(|d| d.join(parent)).collect()
    }

    /// The cgroups of sandbox `id` under `parent`, whether they exist or not.
    pub fn sandbox_dirs(&self, parent: &str, id: &str) -> Vec<PathBuf> {
        self.parent_dirs(parent)
            .into_iter()
            .map(|d| d.join(id))
            .collect()
    }

    /// The cgroup with `controller`'s files of sandbox `id` under `parent` (v2: its one cgroup).
    fn dir(&self, controller: &str, parent: &str, id: &str) -> Option<PathBuf> {
        match self {
            CgroupMode::V1 => v1_mount(controller),
            CgroupMode::V2 { root } => Some(root.clone()),
        }
        .map(|m| m.join(parent).join(id))
    }

    /// The `--cgroup` values a new sandbox's jail gets: memory limit (swap stays off: the
    /// jailer caps it with the memory limit), CPU quota of `vcpus` cores and, when not the
    /// default, its `share` of a contended CPU, a pids limit and (v1) a thawed freezer and zeroed CPU accounting.
    pub fn sandbox_settings(
        &self,
        vcpus: u32,
        memory_bytes: u64,
        share: CpuShare,
    ) -> Vec<CgroupSetting> {
        let version = self.version();
        let quota = CpuQuota {
            quota_us: u64::from(vcpus) * CPU_PERIOD_US,
            period_us: CPU_PERIOD_US,
        };
        let mut settings = vec![(memory_limit_key(version), memory_bytes.to_string())];
        settings.extend(cpu_quota_values(version, quota));
        // A new cgroup has the default share already: only a background one is written.
        if share == CpuShare::Background {
            settings.push(cpu_share_value(version, share));
        }
        settings.push(("pids.max", PIDS_MAX.to_string()));
        if version == CgroupVersion::V1 {
            settings.push(("cpuacct.usage", "0".into()));
            settings.push(("freezer.state", "THAWED".into()));
        }
        settings
            .into_iter()
            .map(|(key, value)| CgroupSetting {
                key: key.into(),
                value,
            })
            .collect()
    }

    /// The usage counters: CPU time (ns), memory charged (bytes), processes and threads.
    fn counters(&self) -> [Counter; 3] {
        let counter = |controller, file, key, scale| Counter {
            controller,
            file,
            key,
            scale,
        };
        let pids = counter("pids", "pids.current", None, 1);
        match self {
            CgroupMode::V1 => [
                counter("cpuacct", "cpuacct.usage", None, 1),
                counter("memory", "memory.usage_in_bytes", None, 1),
                pids,
            ],
            CgroupMode::V2 { .. } => [
                counter("cpu", "cpu.stat", Some("usage_usec"), 1000),
                counter("memory", "memory.current", None, 1),
                pids,
            ],
        }
    }

    /// (cpu ns, memory bytes, pids) of sandbox `id`; 0 for what cannot be read.
    pub fn usage(&self, parent: &str, id: &str) -> (u64, u64, u64) {
        let read = |c: &Counter| {
            self.dir(c.controller, parent, id)
                .and_then(|d| read_counter(&d.join(c.file), c.key))
                .map_or(0, |v| v.saturating_mul(c.scale))
        };
        let [cpu, memory, pids] = self.counters();
        (read(&cpu), read(&memory), read(&pids))
    }

    /// Pids in any of sandbox `id`'s cgroups.
    pub fn pids(&self, parent: &str, id: &str) -> Vec<i32> {
        let mut pids: Vec<i32> = self
            .sandbox_dirs(parent, id)
            .iter()
            .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
            .flat_map(|s| {
                s.lines()
                    .filter_map(|l| l.trim().parse().ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// Whether any task is still in sandbox `id`'s cgroups, exiting ones included: a killed
    /// process can leave `cgroup.procs` while its other threads still tear down (a VMM's
    /// vCPU thread releasing its VM), and until they are gone the cgroup cannot be removed.
    /// v1: a thread in `tasks`; v2: `populated 1` in `cgroup.events`.
    pub fn populated(&self, parent: &str, id: &str) -> bool {
        self.sandbox_dirs(parent, id).iter().any(|d| match self {
            CgroupMode::V1 => {
                std::fs::read_to_string(d.join("tasks")).is_ok_and(|t| !t.trim().is_empty())
            }
            CgroupMode::V2 { .. } => std::fs::read_to_string(d.join("cgroup.events"))
                .is_ok_and(|e| keyed_value(&e, "populated") == Some("1")),
        })
    }

    /// Sandbox `id`'s freezer: v1 `freezer.state`, v2 `cgroup.freeze` and `cgroup.events`.
    fn freezer(&self, parent: &str, id: &str) -> Option<Freezer> {
        let dir = self.dir("freezer", parent, id)?;
        Some(match self {
            CgroupMode::V1 => Freezer {
                control: dir.join("freezer.state"),
                state: dir.join("freezer.state"),
                key: None,
                values: ["THAWED", "FROZEN"],
            },
            CgroupMode::V2 { .. } => Freezer {
                control: dir.join("cgroup.freeze"),
                state: dir.join("cgroup.events"),
                key: Some("frozen"),
                values: ["0", "1"],
            },
        })
    }

    /// Freezes (`true`) or thaws sandbox `id` and waits (up to 5 s) until it is done.
    pub fn set_frozen(&self, parent: &str, id: &str, frozen: bool) -> Result<()> {
        let f = self
            .freezer(parent, id)
            .ok_or_else(|| Error::Host("no freezer cgroup hierarchy is mounted".into()))?;
        let want = f.values[usize::from(frozen)];
        std::fs::write(&f.control, want)
            .map_err(|e| Error::host(format!("writing {want} to {}", f.control.display()), e))?;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = f.state().unwrap_or_default();
            if now == want {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(Error::Host(format!(
                    "{} says {}{now} instead of {want} 5 s after writing {want} to {}",
                    f.state.display(),
                    f.key.map(|k| format!("{k} ")).unwrap_or_default(),
                    f.control.display()
                )));
            }
            if frozen {
                // v1 FREEZING: writing again retries tasks that could not be frozen yet (v2
                // keeps freezing by itself; the repeat is a no-op there).
                let _ = std::fs::write(&f.control, want);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The cgroups holding sandbox `id`'s limits, if it has them.
    fn limit_cgroups(&self, parent: &str, id: &str) -> Option<LimitCgroups> {
        let dir = |c| self.dir(c, parent, id).filter(|d| d.is_dir());
        match self {
            CgroupMode::V1 => Some(LimitCgroups::V1 {
                memory: dir("memory")?,
                cpu: dir("cpu")?,
            }),
            CgroupMode::V2 { .. } => dir("memory").map(LimitCgroups::V2),
        }
    }
}

/// (cpu ns, memory bytes, pids) of the sandbox's cgroups; zeros where there are none.
pub fn cgroup_usage(parent: &str, id: &str) -> (u64, u64, u64) {
    CgroupMode::host().map_or((0, 0, 0), |m| m.usage(parent, id))
}

/// Resident anonymous memory of the sandbox's cgroup, bytes: its processes' RSS without the
/// page cache that `cgroup_usage`'s memory includes (v1 `memory.stat` `total_rss`, which
/// counts transparent huge pages too; v2 `anon`). 0 where it cannot be read.
pub fn cgroup_rss(parent: &str, id: &str) -> u64 {
    let Ok(mode) = CgroupMode::host() else {
        return 0;
    };
    let key = match mode {
        CgroupMode::V1 => "total_rss",
        CgroupMode::V2 { .. } => "anon",
    };
    mode.dir("memory", parent, id)
        .and_then(|d| read_counter(&d.join("memory.stat"), Some(key)))
        .unwrap_or(0)
}

/// Pids in any of the sandbox's cgroups; none where this host's cgroups are unusable.
pub fn cgroup_pids(parent: &str, id: &str) -> Vec<i32> {
    CgroupMode::host().map_or_else(|_| Vec::new(), |m| m.pids(parent, id))
}

/// Freezes (`true`) or thaws the sandbox's cgroup and waits until it is done.
pub fn set_frozen(parent: &str, id: &str, frozen: bool) -> Result<()> {
    CgroupMode::host()?.set_frozen(parent, id, frozen)
}

/// SIGKILLs every process of sandbox `id` until none is left for two consecutive scans and
/// its cgroups hold no exiting task either, thawing a frozen sandbox first: everything in its
/// cgroups, plus its jailer. Pass the jailer's pid only for a sandbox that finished starting
/// (its jail processes are all in the cgroups then); otherwise /proc is scanned for jailer
/// processes and their forks.
pub fn kill_all(parent: &str, id: &str, jailer: Option<i32>) -> Result<()> {
    let mode = CgroupMode::host().ok();
    if let Some(f) = mode.and_then(|m| m.freezer(parent, id)) {
        if f.control.exists() {
            let _ = std::fs::write(&f.control, f.values[0]);
        }
    }
    if let Some(pid) = jailer {
        // SAFETY: kill takes plain integers; the pid is the caller's unreaped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut quiet = 0;
    while quiet < 2 {
        let mut pids = cgroup_pids(parent, id);
        if jailer.is_none() {
            pids.extend(jailer_pids(id));
        }
        if pids.is_empty() {
            if !mode.is_some_and(|m| m.populated(parent, id)) {
                quiet += 1;
            }
        } else {
            quiet = 0;
            for pid in pids {
                // SAFETY: kill takes plain integers; a pid that just exited yields ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Host(format!(
                "processes of sandbox {id} survive SIGKILL for 10 s, or have not finished \
                 exiting (stuck in the kernel?)"
            )));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This development host: v1 controllers plus an empty cgroup2.
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 31 0:34 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    /// A fresh Debian 12 host.
    const UNIFIED: &str = "\
22 21 0:20 / /sys rw,nosuid - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    fn controllers(listed: &'static str) -> impl Fn(&Path) -> Option<String> {
        move |_| Some(listed.to_string())
    }

    #[test]
    fn cgroup_mode_detection() {
        let hybrid = Hierarchies::parse(HYBRID);
        let unified = Hierarchies::parse(UNIFIED);
        assert_eq!(detect(&hybrid, None, controllers("")), Ok(CgroupMode::V1));
        let v2 = CgroupMode::V2 {
            root: "/sys/fs/cgroup".into(),
        };
        let all = controllers("cpuset cpu io memory hugetlb pids rdma misc\n");
        assert_eq!(detect(&unified, None, &all), Ok(v2.clone()));
        assert_eq!(detect(&unified, Some("2"), &all), Ok(v2));
        // v2 without pids (bound to a v1 hierarchy, say), and no usable v1 either.
        let e = detect(&unified, None, controllers("cpu memory")).unwrap_err();
        assert!(e.contains("without pids"), "{e}");
        assert!(e.contains("cpuacct, memory, pids, freezer"), "{e}");
        // A hybrid host forced to v2: its cgroup2 has no controllers.
        let e = detect(&hybrid, Some("2"), controllers("")).unwrap_err();
        assert!(e.starts_with("MVM_CGROUP_VERSION=2, but"), "{e}");
        assert!(e.contains("without cpu, memory, pids"), "{e}");
        let e = detect(&unified, Some("1"), &all).unwrap_err();
        assert!(
            e.contains("no legacy hierarchy carries cpu, cpuacct"),
            "{e}"
        );
        assert!(detect(&hybrid, Some("v2"), &all)
            .unwrap_err()
            .contains("takes 1 or 2"));
    }

    #[test]
    fn sandbox_settings_per_version() {
        let keys = |mode: CgroupMode| -> Vec<String> {
            mode.sandbox_settings(2, 64 << 20, CpuShare::Background)
                .into_iter()
                .map(|s| format!("{}={}", s.key, s.value))
                .collect()
        };
        assert_eq!(
            keys(CgroupMode::V1),
            [
                "memory.limit_in_bytes=67108864",
                "cpu.cfs_period_us=100000",
                "cpu.cfs_quota_us=200000",
                "cpu.shares=2",
                "pids.max=4096",
                "cpuacct.usage=0",
                "freezer.state=THAWED"
            ]
        );
        assert_eq!(
            keys(CgroupMode::V2 { root: "/x".into() }),
            [
                "memory.max=67108864",
                "cpu.max=200000 100000",
                "cpu.weight=1",
                "pids.max=4096"
            ]
        );
        // The default share is the new cgroup's own: nothing to write.
        let normal = CgroupMode::V1.sandbox_settings(2, 64 << 20, CpuShare::Normal);
        assert!(normal.iter().all(|s| s.key != "cpu.shares"));
    }

    #[test]
    fn v2_usage_pids_and_freezer_files() {
        let root = tempfile::tempdir().unwrap();
        let mode = CgroupMode::V2 {
            root: root.path().to_path_buf(),
        };
        let dir = root.path().join("p/sb");
        std::fs::create_dir_all(&dir).unwrap();
        let write = |f: &str, v: &str| std::fs::write(dir.join(f), v).unwrap();
        assert_eq!(mode.usage("p", "sb"), (0, 0, 0));
        assert_eq!(mode.limit_cgroups("p", "other"), None);
        assert_eq!(
            mode.limit_cgroups("p", "sb"),
            Some(LimitCgroups::V2(dir.clone()))
        );
        write(
            "cpu.stat",
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        );
        write("memory.current", "8192\n");
        write("pids.current", "3\n");
        write("cgroup.procs", "42\n7\n");
        assert_eq!(mode.usage("p", "sb"), (1_500_000, 8192, 3));
        assert_eq!(mode.pids("p", "sb"), [7, 42]);
        assert_eq!(mode.sandbox_dirs("p", "sb"), std::slice::from_ref(&dir));
        // The kernel reports the state in cgroup.events; here it already says so.
        write("cgroup.events", "populated 1\nfrozen 1\n");
        assert!(mode.populated("p", "sb"));
        mode.set_frozen("p", "sb", true).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.freeze")).unwrap(),
            "1"
        );
        write("cgroup.events", "populated 0\nfrozen 0\n");
        assert!(!mode.populated("p", "sb"));
        mode.set_frozen("p", "sb", false).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.freeze")).unwrap(),
            "0"
        );
    }
}
