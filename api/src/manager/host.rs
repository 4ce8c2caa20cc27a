//! Host plumbing of the manager: tier availability, cgroups (v1 or v2, detected), process
//! reaping, mounts, network namespaces and helper commands.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use jailer::{CgroupSetting, CgroupVersion};

use crate::error::{Error, Result};

/// Env var that overrides the vm-tier host check (`force`): only for nested test harnesses
/// whose /dev/kvm looks unusable from here but is not.
pub const VM_TIER_ENV: &str = "MVM_VM_TIER";

/// Why the `vm` tier cannot run on this host, or `None` when it can.
pub fn vm_tier_unavailable(force: bool) -> Option<String> {
    if force {
        return None;
    }
    if !Path::new("/dev/kvm").exists() {
        return Some("the vm tier needs /dev/kvm, which this host does not have".into());
    }
    if Path::new("/sys/module/kvm_pvm").exists() {
        return Some(
            "the vm tier cannot run on this host: /dev/kvm is kvm_pvm (no hardware virtualization), \
             whose guests cannot reach user space"
                .into(),
        );
    }
    None
}

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

/// Mount point of the first mount of type `fstype` in `mountinfo` whose super options
/// satisfy `opts`.
fn find_mount_in(mountinfo: &str, fstype: &str, opts: impl Fn(&str) -> bool) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split(' ');
        if r.next()? != fstype {
            return None;
        }
        let super_opts = r.nth(1)?;
        let mount_point = left.split(' ').nth(4)?;
        opts(super_opts).then(|| PathBuf::from(mount_point.replace("\\040", " ")))
    })
}

/// Mount point of the v1 hierarchy carrying `controller` in `mountinfo`.
fn v1_mount_in(mountinfo: &str, controller: &str) -> Option<PathBuf> {
    find_mount_in(mountinfo, "cgroup", |opts| {
        opts.split(',').any(|o| o == controller)
    })
}

/// Mount point of the v1 hierarchy carrying `controller`.
fn v1_mount(controller: &str) -> Option<PathBuf> {
    v1_mount_in(
        &std::fs::read_to_string("/proc/self/mountinfo").ok()?,
        controller,
    )
}

/// The cgroup mode of a host with mount table `mountinfo`: the version `forced` (`1` or `2`)
/// or else the first usable one, v1 then v2. `controllers` reads a cgroup2 root's
/// `cgroup.controllers`.
fn detect(
    mountinfo: &str,
    forced: Option<&str>,
    controllers: impl Fn(&Path) -> Option<String>,
) -> std::result::Result<CgroupMode, String> {
    let v1 = || {
        let missing: Vec<&str> = V1_CONTROLLERS
            .into_iter()
            .filter(|c| v1_mount_in(mountinfo, c).is_none())
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
        let root = find_mount_in(mountinfo, "cgroup2", |_| true)
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
            let info = std::fs::read_to_string("/proc/self/mountinfo")
                .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
            let forced = std::env::var(CGROUP_VERSION_ENV).ok();
            detect(&info, forced.as_deref().filter(|v| !v.is_empty()), |root| {
                std::fs::read_to_string(root.join("cgroup.controllers")).ok()
            })
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
    /// jailer caps it with the memory limit), CPU quota of `vcpus` cores, a pids limit and
    /// (v1) a thawed freezer and zeroed CPU accounting.
    pub fn sandbox_settings(&self, vcpus: u32, memory_bytes: u64) -> Vec<CgroupSetting> {
        let version = self.version();
        let quota = CpuQuota {
            quota_us: u64::from(vcpus) * CPU_PERIOD_US,
            period_us: CPU_PERIOD_US,
        };
        let mut settings = vec![(memory_limit_key(version), memory_bytes.to_string())];
        settings.extend(cpu_quota_values(version, quota));
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

/// The file holding a memory limit.
fn memory_limit_key(version: CgroupVersion) -> &'static str {
    match version {
        CgroupVersion::V1 => "memory.limit_in_bytes",
        CgroupVersion::V2 => "memory.max",
    }
}

/// The files and values setting CFS limit `q`, in the order to write them.
fn cpu_quota_values(version: CgroupVersion, q: CpuQuota) -> Vec<(&'static str, String)> {
    match version {
        CgroupVersion::V1 => vec![
            ("cpu.cfs_period_us", q.period_us.to_string()),
            ("cpu.cfs_quota_us", q.quota_us.to_string()),
        ],
        CgroupVersion::V2 => vec![("cpu.max", format!("{} {}", q.quota_us, q.period_us))],
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

    /// Sets the CFS limit (v1 `cpu.cfs_period_us` then `cpu.cfs_quota_us`, v2 `cpu.max`).
    pub fn set_cpu_quota(&self, q: CpuQuota) -> Result<()> {
        let dir = match self {
            LimitCgroups::V1 { cpu, .. } => cpu,
            LimitCgroups::V2(dir) => dir,
        };
        for (key, value) in cpu_quota_values(self.version(), q) {
            let file = dir.join(key);
            std::fs::write(&file, &value)
                .map_err(|e| Error::host(format!("writing {value} to {}", file.display()), e))?;
        }
        Ok(())
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

/// Pids of `mvm-jailer` processes (and their not-yet-exec'd forks) started for jail `id`.
pub fn jailer_pids(id: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first().is_some_and(|a0| a0.ends_with(b"mvm-jailer"))
                && args
                    .windows(2)
                    .any(|w| w[0] == b"--id" && w[1] == id.as_bytes())
        })
        .collect()
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

fn cstr(p: &Path) -> Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid(format!("path {} contains NUL", p.display())))
}

/// mount(2) with `what` in error messages.
pub fn mount(
    src: &Path,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let s = cstr(src)?;
    let t = cstr(target)?;
    let f = fstype.map(|f| CString::new(f).expect("fstype has no NUL"));
    let d = data
        .map(CString::new)
        .transpose()
        .map_err(|_| Error::Invalid("mount data contains NUL".into()))?;
    // SAFETY: all pointers are NUL-terminated strings (or null) living across the call.
    let ret = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ref().map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            d.as_ref().map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    };
    if ret == -1 {
        return Err(Error::host(
            format!("mounting {} on {}", src.display(), target.display()),
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Detaches whatever is mounted on `target`; nothing mounted is not an error.
pub fn umount(target: &Path) -> Result<()> {
    let t = cstr(target)?;
    // SAFETY: `t` is a NUL-terminated path.
    if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } == -1 {
        let e = std::io::Error::last_os_error();
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(Error::host(format!("unmounting {}", target.display()), e));
        }
    }
    Ok(())
}

/// Whether something is mounted exactly at `path` (in this mount namespace).
pub fn is_mounted(path: &Path) -> bool {
    mounts_under(path).iter().any(|m| m == path)
}

/// Mount points at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| PathBuf::from(m.replace("\\040", " ")))
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// Runs `program args` (stdin from `input`), failing with its stderr.
pub fn run(program: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            Error::host(
                format!("running {program}"),
                format!(
                    "{e} (is it installed? on Debian: apt-get install {})",
                    package_of(program)
                ),
            )
        })?;
    if let (Some(input), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin
            .write_all(input.as_bytes())
            .map_err(|e| Error::host(format!("writing to {program}"), e))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| Error::host(format!("waiting for {program}"), e))?;
    if !out.status.success() {
        return Err(Error::Host(format!(
            "{program} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            input.map(|i| format!("\ninput:\n{i}")).unwrap_or_default()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn package_of(program: &str) -> &'static str {
    match program {
        "ip" => "iproute2",
        "nft" => "nftables",
        "debugfs" | "mkfs.ext4" => "e2fsprogs",
        _ => "<package>",
    }
}

/// Brings the loopback interface of the calling thread's network namespace up.
fn loopback_up() -> std::io::Result<()> {
    // SAFETY: plain socket call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq for SIOCGIFFLAGS/SIOCSIFFLAGS on our socket.
    let result = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            if libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        }
    };
    // SAFETY: `fd` is ours.
    unsafe { libc::close(fd) };
    result
}

/// Creates a network namespace pinned by a bind mount at `path`, with loopback up, and runs
/// `setup` on a thread inside it (commands it spawns run in the namespace). On failure the
/// namespace is removed again.
pub fn create_netns<F>(path: &Path, setup: F) -> Result<()>
where
    F: FnOnce() -> Result<()> + Send + 'static,
{
    let path = path.to_path_buf();
    std::thread::spawn(move || -> Result<()> {
        // SAFETY: unshare with a flag constant; it changes only this thread's network namespace,
        // and this thread ends right after.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } == -1 {
            return Err(Error::host(
                "unshare(CLONE_NEWNET)",
                std::io::Error::last_os_error(),
            ));
        }
        std::fs::File::create(&path)
            .map_err(|e| Error::host(format!("creating {}", path.display()), e))?;
        let result = mount(
            Path::new("/proc/thread-self/ns/net"),
            &path,
            None,
            libc::MS_BIND,
            None,
        )
        .and_then(|()| {
            loopback_up().map_err(|e| Error::host("bringing lo up in the sandbox netns", e))
        })
        .and_then(|()| setup());
        if result.is_err() {
            let _ = umount(&path);
            let _ = std::fs::remove_file(&path);
        }
        result
    })
    .join()
    .map_err(|_| Error::Host("the network namespace thread panicked".into()))?
}

/// Removes a network namespace made by [`create_netns`] (its interfaces go with it).
pub fn remove_netns(path: &Path) -> Result<()> {
    umount(path)?;
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::host(format!("removing {}", path.display()), e)),
    }
}

/// Removes a directory tree; a missing one is fine. Refuses if anything is mounted below.
pub fn remove_tree(dir: &Path) -> Result<()> {
    if let Some(m) = mounts_under(dir).first() {
        return Err(Error::Host(format!(
            "{} is still mounted; not removing {}",
            m.display(),
            dir.display()
        )));
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::host(format!("removing {}", dir.display()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_tier_force_overrides() {
        assert_eq!(vm_tier_unavailable(true), None);
    }

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
        assert!(cg.cpu_quota().is_err());
        std::fs::write(file("memory.events"), "oom 1\n").unwrap();
        assert!(cg.oom_kills().is_err());
    }

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
        assert_eq!(detect(HYBRID, None, controllers("")), Ok(CgroupMode::V1));
        let v2 = CgroupMode::V2 {
            root: "/sys/fs/cgroup".into(),
        };
        let all = controllers("cpuset cpu io memory hugetlb pids rdma misc\n");
        assert_eq!(detect(UNIFIED, None, &all), Ok(v2.clone()));
        assert_eq!(detect(UNIFIED, Some("2"), &all), Ok(v2));
        // v2 without pids (bound to a v1 hierarchy, say), and no usable v1 either.
        let e = detect(UNIFIED, None, controllers("cpu memory")).unwrap_err();
        assert!(e.contains("without pids"), "{e}");
        assert!(e.contains("cpuacct, memory, pids, freezer"), "{e}");
        // A hybrid host forced to v2: its cgroup2 has no controllers.
        let e = detect(HYBRID, Some("2"), controllers("")).unwrap_err();
        assert!(e.starts_with("MVM_CGROUP_VERSION=2, but"), "{e}");
        assert!(e.contains("without cpu, memory, pids"), "{e}");
        let e = detect(UNIFIED, Some("1"), &all).unwrap_err();
        assert!(
            e.contains("no legacy hierarchy carries cpu, cpuacct"),
            "{e}"
        );
        assert!(detect(HYBRID, Some("v2"), &all)
            .unwrap_err()
            .contains("takes 1 or 2"));
    }

    #[test]
    fn sandbox_settings_per_version() {
        let keys = |mode: CgroupMode| -> Vec<String> {
            mode.sandbox_settings(2, 64 << 20)
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
                "pids.max=4096"
            ]
        );
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

    #[test]
    fn run_reports_stderr() {
        let e = run("sh", &["-c", "echo oops >&2; exit 3"], None).unwrap_err();
        assert!(e.to_string().contains("oops"), "{e}");
        assert_eq!(run("cat", &[], Some("hi")).unwrap(), "hi");
    }
}
