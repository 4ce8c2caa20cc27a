//! The cgroup hierarchies mounted in this mount namespace: legacy (v1) hierarchies, each with
//! its controllers, and the unified (v2) one. A hybrid host has both.

use std::path::PathBuf;

use crate::mountinfo::{self, MountInfo};
use crate::Result;

/// cgroup v1 mount options that are not controller names.
const V1_MOUNT_OPTIONS: [&str; 6] = [
    "rw",
    "ro",
    "xattr",
    "noprefix",
    "clone_children",
    "cpuset_v2_mode",
];

/// A mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Mount point.
    pub mount_point: PathBuf,
    /// `true` for the unified (cgroup2) hierarchy.
    pub unified: bool,
    /// v1: controllers bound to it (from the mount options); v2: empty (read `cgroup.controllers`).
    pub controllers: Vec<String>,
}

/// All cgroup hierarchies of a mount table, in its order, one per mount point.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hierarchies(Vec<Hierarchy>);

impl Hierarchies {
    /// The hierarchies mounted in this mount namespace.
    pub fn read() -> Result<Self> {
        Ok(Self::from_mounts(&mountinfo::read()?))
    }

    /// The hierarchies of a mount table in mountinfo's format.
    pub fn parse(mountinfo: &str) -> Self {
        Self::from_mounts(&mountinfo::parse(mountinfo))
    }

    /// The hierarchies among `mounts` (a bind mount of one is a hierarchy of its own).
    pub fn from_mounts(mounts: &[MountInfo]) -> Self {
        let mut out: Vec<Hierarchy> = Vec::new();
        for m in mounts {
            let unified = match m.fs_type.as_str() {
                "cgroup" => false,
                "cgroup2" => true,
                _ => continue,
            };
            let controllers = if unified {
                Vec::new()
            } else {
                m.super_options
                    .iter()
                    .filter(|o| !V1_MOUNT_OPTIONS.contains(&o.as_str()) && !o.contains('='))
                    .cloned()
                    .collect()
            };
            if out.iter().all(|h| h.mount_point != m.mount_point) {
                out.push(Hierarchy {
                    mount_point: m.mount_point.clone(),
                    unified,
                    controllers,
                });
            }
        }
        Hierarchies(out)
    }

    /// Every hierarchy, v1 and v2.
    pub fn all(&self) -> &[Hierarchy] {
        &self.0
    }

    /// The first legacy (v1) hierarchy that `controller` is bound to.
    pub fn v1(&self, controller: &str) -> Option<&Hierarchy> {
        self.0
            .iter()
            .find(|h| !h.unified && h.controllers.iter().any(|c| c == controller))
    }

    /// The first unified (v2) hierarchy.
    pub fn unified(&self) -> Option<&Hierarchy> {
        self.0.iter().find(|h| h.unified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// A hybrid host: v1 controllers, a named hierarchy and cgroup2 (mounted twice).
    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
42 31 0:38 / /mnt/with\\040space rw,relatime - cgroup2 cgroup2 rw
43 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
";
    /// A v2-only host.
    const UNIFIED: &str = "\
22 21 0:20 / /sys rw,nosuid - sysfs sysfs rw
30 22 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn hybrid_hierarchies() {
        let all = Hierarchies::parse(HYBRID);
        let h = all.all();
        assert_eq!(h.len(), 5);
        assert_eq!(h[0].mount_point, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(h[0].controllers, ["cpu", "cpuacct"]);
        assert_eq!(h[2].controllers, Vec::<String>::new());
        assert!(h[3].unified);
        assert_eq!(h[4].mount_point, Path::new("/mnt/with space"));
        assert_eq!(all.v1("cpuacct"), Some(&h[0]));
        assert_eq!(
            all.v1("memory").unwrap().mount_point,
            Path::new("/sys/fs/cgroup/memory")
        );
        assert_eq!(all.v1("pids"), None);
        assert_eq!(all.v1("rw"), None);
        assert_eq!(all.unified(), Some(&h[3]));
    }

    #[test]
    fn unified_only() {
        let all = Hierarchies::parse(UNIFIED);
        assert_eq!(all.all().len(), 1);
        assert_eq!(
            all.unified().unwrap().mount_point,
            Path::new("/sys/fs/cgroup")
        );
        assert_eq!(all.v1("memory"), None);
        assert_eq!(Hierarchies::default().unified(), None);
    }
}
