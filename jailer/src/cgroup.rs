//! Per-jail cgroups on the legacy (v1) and unified (v2) hierarchies.
//!
//! Each `--cgroup KEY=VALUE` names its controller by the key prefix. The controller's hierarchy
//! is found in `/proc/self/mountinfo`; the jail gets `<hierarchy>/<parent-cgroup>/<id>`, the values
//! are written there, and the jailer moves itself in (writing `0` to `cgroup.procs`) right before
//! it enters the jail, so the target and everything it forks are accounted from the first
//! instruction.

use std::collections::BTreeSet;
use std::fs;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mvm_sys::cgroup::{Hierarchies, Hierarchy};

use crate::config::{CgroupSetting, CgroupVersion};
use crate::error::{Error, Result};

/// How long [`CgroupDir::remove`] waits for the threads of killed processes to finish exiting.
const EXITING_WAIT: Duration = Duration::from_secs(5);

/// One cgroup directory made for a jail, with the root of its hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupDir {
    /// Mount point of the hierarchy (e.g. `/sys/fs/cgroup/memory`).
    pub hierarchy_root: PathBuf,
    /// The per-jail cgroup (`<hierarchy_root>/<parent>/<id>`).
    pub path: PathBuf,
}

impl CgroupDir {
    /// Moves the calling process into this cgroup.
    pub fn attach_self(&self) -> Result<()> {
        write_file(&self.path.join("cgroup.procs"), "0")
    }

    /// Moves the calling process back to the hierarchy root (if it is in this cgroup) and removes
    /// the cgroup; fails with [`Error::CgroupBusy`] while other processes are in it.
    pub fn remove(&self) -> Result<()> {
        let procs = self.path.join("cgroup.procs");
        let mine = std::process::id().to_string();
        let members = match fs::read_to_string(&procs) {
            Ok(s) => s,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("read {}", procs.display()), e)),
        };
        if members.lines().any(|p| p == mine) {
            write_file(&self.hierarchy_root.join("cgroup.procs"), "0")?;
        }
        let others: Vec<&str> = members.lines().filter(|p| *p != mine).collect();
        if !others.is_empty() {
            return Err(Error::CgroupBusy {
                path: self.path.clone(),
                pids: others.join(" "),
            });
        }
        // Killed processes leave cgroup.procs while their other threads may still be exiting
        // (a VMM's vCPU thread releasing its VM); the kernel refuses the removal until then.
        let deadline = Instant::now() + EXITING_WAIT;
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => {
                    return Err(Error::io(
                        format!(
                            "remove cgroup {} (no process is listed in it; are its threads \
                             still exiting?)",
                            self.path.display()
                        ),
                        e,
                    ))
                }
            }
        }
    }
}

/// Where the per-jail cgroup(s) go and what is written there; resolved before anything is made.
#[derive(Debug)]
pub(crate) struct CgroupPlan {
    version: CgroupVersion,
    /// Hierarchies (v1: one per distinct mount used; v2: the unified one) and their settings.
    targets: Vec<(Hierarchy, Vec<CgroupSetting>)>,
    /// v2 controllers to enable in the ancestors' `cgroup.subtree_control`.
    v2_controllers: BTreeSet<String>,
}

/// Keys of the v2 core interface that a jail may set (everything else in `cgroup.*` is off limits).
const V2_CORE_KEYS: [&str; 2] = ["cgroup.max.descendants", "cgroup.max.depth"];

impl CgroupPlan {
    /// Maps every setting to its hierarchy; an unknown or unmounted controller is an error.
    pub(crate) fn resolve(version: CgroupVersion, settings: &[CgroupSetting]) -> Result<Self> {
        Self::resolve_in(&Hierarchies::read()?, version, settings)
    }

    fn resolve_in(
        all: &Hierarchies,
        version: CgroupVersion,
        settings: &[CgroupSetting],
    ) -> Result<Self> {
        let mut plan = CgroupPlan {
            version,
            targets: Vec::new(),
            v2_controllers: BTreeSet::new(),
        };
        let unavailable = |s: &CgroupSetting, reason: String| Error::ControllerUnavailable {
            controller: s.controller().to_string(),
            key: s.key.clone(),
            reason,
        };
        for s in ordered(settings) {
            let controller = s.controller();
            let hierarchy = match version {
                CgroupVersion::V1 => all.v1(controller).ok_or_else(|| {
                    unavailable(
                        s,
                        "no cgroup v1 hierarchy with it is mounted (see /proc/self/mountinfo)"
                            .into(),
                    )
                })?,
                CgroupVersion::V2 => {
                    let h = all.unified().ok_or_else(|| {
                        unavailable(
                            s,
                            "no cgroup2 hierarchy is mounted (see /proc/self/mountinfo)".into(),
                        )
                    })?;
                    if controller == "cgroup" {
                        if !V2_CORE_KEYS.contains(&s.key.as_str()) {
                            return Err(unavailable(
                                s,
                                format!(
                                    "only {} of the core interface may be set",
                                    V2_CORE_KEYS.join(", ")
                                ),
                            ));
                        }
                    } else {
                        let file = h.mount_point.join("cgroup.controllers");
                        let listed = fs::read_to_string(&file)
                            .map_err(|e| Error::io(format!("read {}", file.display()), e))?;
                        if !listed.split_whitespace().any(|c| c == controller) {
                            let listed = if listed.trim().is_empty() {
                                "none"
                            } else {
                                listed.trim()
                            };
                            return Err(unavailable(
                                s,
                                format!("not in {} (it lists: {listed}); on a host where it is bound to a v1 hierarchy use --cgroup-version 1", file.display()),
                            ));
                        }
                        plan.v2_controllers.insert(controller.to_string());
                    }
                    h
                }
            };
            match plan
                .targets
                .iter_mut()
                .find(|(h, _)| h.mount_point == hierarchy.mount_point)
            {
                Some((_, list)) => list.push(s.clone()),
                None => plan.targets.push((hierarchy.clone(), vec![s.clone()])),
            }
        }
        Ok(plan)
    }

    /// Creates `<hierarchy>/<parent>/<id>` in each hierarchy and writes the settings. Every
    /// directory made is pushed to `created` as soon as it exists, so the caller can roll back.
    pub(crate) fn create(
        &self,
        parent: &str,
        id: &str,
        created: &mut Vec<CgroupDir>,
    ) -> Result<()> {
        for (hierarchy, settings) in &self.targets {
            let root = &hierarchy.mount_point;
            let parent_dir = root.join(parent);
            let cpuset = hierarchy.controllers.iter().any(|c| c == "cpuset");
            // Make (or reuse) the shared parent chain; it is never removed.
            let mut dir = root.clone();
            for part in Path::new(parent).components() {
                if self.version == CgroupVersion::V2 {
                    self.enable_v2_controllers(&dir)?;
                }
                let child = dir.join(part);
                make_dir(&child, &dir, cpuset, true)?;
                dir = child;
            }
            if self.version == CgroupVersion::V2 {
                self.enable_v2_controllers(&parent_dir)?;
            }
            let path = parent_dir.join(id);
            make_dir(&path, &parent_dir, cpuset, false)?;
            created.push(CgroupDir {
                hierarchy_root: root.clone(),
                path: path.clone(),
            });
            for s in settings {
                write_setting(&path, s)?;
            }
            self.turn_swap_off(&path, settings)?;
        }
        Ok(())
    }

    /// Swap is off unless asked for: a memory limit without a swap setting also caps swap.
    fn turn_swap_off(&self, dir: &Path, settings: &[CgroupSetting]) -> Result<()> {
        let has = |key: &str| settings.iter().find(|s| s.key == key);
        let extra = match self.version {
            CgroupVersion::V1 => has("memory.limit_in_bytes")
                .filter(|_| has("memory.memsw.limit_in_bytes").is_none())
                .map(|m| ("memory.memsw.limit_in_bytes", m.value.clone())),
            CgroupVersion::V2 => has("memory.max")
                .filter(|_| has("memory.swap.max").is_none())
                .map(|_| ("memory.swap.max", "0".to_string())),
        };
        match extra {
            // Without swap accounting the file is absent and there is nothing to cap.
            Some((key, value)) if dir.join(key).exists() => write_setting(
                dir,
                &CgroupSetting {
                    key: key.into(),
                    value,
                },
            ),
            _ => Ok(()),
        }
    }

    fn enable_v2_controllers(&self, dir: &Path) -> Result<()> {
        let file = dir.join("cgroup.subtree_control");
        let enabled = fs::read_to_string(&file)
            .map_err(|e| Error::io(format!("read {}", file.display()), e))?;
        for c in &self.v2_controllers {
            if !enabled.split_whitespace().any(|e| e == c) {
                fs::write(&file, format!("+{c}")).map_err(|source| {
                    Error::ControllerNotEnabled {
                        controller: c.clone(),
                        path: file.clone(),
                        source,
                    }
                })?;
            }
        }
        Ok(())
    }
}

/// Settings in the order they can be applied to a fresh cgroup: the memory limit before the
/// memory+swap limit (the kernel refuses memsw < memory).
fn ordered(settings: &[CgroupSetting]) -> Vec<&CgroupSetting> {
    let mut v: Vec<&CgroupSetting> = settings.iter().collect();
    v.sort_by_key(|s| s.key.starts_with("memory.memsw."));
    v
}

fn make_dir(path: &Path, parent: &Path, cpuset: bool, may_exist: bool) -> Result<()> {
    match fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists && may_exist => return Ok(()),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            return Err(Error::CgroupInUse(path.to_path_buf()))
        }
        Err(e) => return Err(Error::io(format!("create cgroup {}", path.display()), e)),
    }
    if cpuset {
        // v1 cpuset cgroups start with no cpus/mems, and no task can join them until set.
        for f in ["cpuset.cpus", "cpuset.mems"] {
            let current = fs::read_to_string(path.join(f))
                .map_err(|e| Error::io(format!("read {}", path.join(f).display()), e))?;
            if current.trim().is_empty() {
                let inherited = fs::read_to_string(parent.join(f))
                    .map_err(|e| Error::io(format!("read {}", parent.join(f).display()), e))?;
                write_file(&path.join(f), inherited.trim())?;
            }
        }
    }
    Ok(())
}

fn write_setting(dir: &Path, s: &CgroupSetting) -> Result<()> {
    let path = dir.join(&s.key);
    if !path.exists() {
        return Err(Error::UnknownCgroupKey {
            key: s.key.clone(),
            path,
        });
    }
    fs::write(&path, &s.value).map_err(|source| Error::CgroupWrite {
        key: s.key.clone(),
        value: s.value.clone(),
        path,
        source,
    })
}

fn write_file(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value)
        .map_err(|e| Error::io(format!("write '{value}' to {}", path.display()), e))
}

/// The per-jail cgroups that exist for `<parent>/<id>` in every mounted hierarchy.
pub(crate) fn existing(parent: &str, id: &str) -> Result<Vec<CgroupDir>> {
    Ok(Hierarchies::read()?
        .all()
        .iter()
        .map(|h| CgroupDir {
            path: h.mount_point.join(parent).join(id),
            hierarchy_root: h.mount_point.clone(),
        })
        .filter(|d| d.path.is_dir())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
";

    fn setting(s: &str) -> CgroupSetting {
        s.parse().unwrap()
    }

    #[test]
    fn v1_resolution_groups_by_hierarchy() {
        let h = Hierarchies::parse(HYBRID);
        let plan = CgroupPlan::resolve_in(
            &h,
            CgroupVersion::V1,
            &[
                setting("memory.memsw.limit_in_bytes=2"),
                setting("cpu.shares=2"),
                setting("cpuacct.x=1"),
                setting("memory.limit_in_bytes=1"),
            ],
        )
        .unwrap();
        assert_eq!(plan.targets.len(), 2);
        assert_eq!(
            plan.targets[0].0.mount_point,
            Path::new("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(plan.targets[0].1.len(), 2);
        // The memory limit is applied before memsw whatever the command-line order.
        let keys: Vec<&str> = plan.targets[1].1.iter().map(|s| s.key.as_str()).collect();
        assert_eq!(
            keys,
            ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
        );
    }

    #[test]
    fn v1_unmounted_controller_is_named() {
        let h = Hierarchies::parse(HYBRID);
        let err =
            CgroupPlan::resolve_in(&h, CgroupVersion::V1, &[setting("pids.max=5")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("cgroup controller 'pids' (from key 'pids.max')"),
            "{err}"
        );
    }

    #[test]
    fn v2_core_keys_are_limited() {
        let h = Hierarchies::parse(HYBRID);
        CgroupPlan::resolve_in(&h, CgroupVersion::V2, &[setting("cgroup.max.depth=1")]).unwrap();
        let err = CgroupPlan::resolve_in(&h, CgroupVersion::V2, &[setting("cgroup.procs=1")])
            .unwrap_err();
        assert!(
            err.to_string().contains("only cgroup.max.descendants"),
            "{err}"
        );
        CgroupPlan::resolve_in(
            &Hierarchies::default(),
            CgroupVersion::V2,
            &[setting("cgroup.max.depth=1")],
        )
        .unwrap_err();
    }
}
