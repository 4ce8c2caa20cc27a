//! The jails' specs: what `mvm-jailer` is asked for, per tier.

use std::path::{Path, PathBuf};

use jailer::{BindMount, JailConfig, SeccompPolicy};

use super::{cgroups, pod, rootfs, vm, ManagerConfig, AGENT_SOCKET};
use crate::error::{Error, Result};
use crate::model::{Isolation, Sandbox, Template};

/// Device nodes the jail tier adds to the jail's /dev for the sandbox's programs (`tty` is the
/// calling process's controlling terminal: a pty of the jail's own devpts, or none).
pub(super) const JAIL_DEVICES: [(&str, u32, u32); 5] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("tty", 5, 0),
];

pub(super) fn exec_name(isolation: Isolation) -> &'static str {
    match isolation {
        Isolation::Jail => "mvm-agent",
        Isolation::Vm => "mvm-vmm",
    }
}

pub(super) fn make_device(path: &Path, major: u32, minor: u32) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid(format!("path {} contains NUL", path.display())))?;
    // SAFETY: `c` is a NUL-terminated path; mknod does not keep it.
    let ret = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(major, minor),
        )
    };
    if ret == -1 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(Error::host(format!("mknod {}", path.display()), e));
        }
    }
    // The umask filtered the mode.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .map_err(|e| Error::host(format!("chmod {}", path.display()), e))
}

/// The jail every sandbox gets: its namespaces, and cgroups on this host's version holding
/// `memory_bytes`, the sandbox's vCPUs as CPU quota and a pids limit.
fn base_jail(
    cfg: &ManagerConfig,
    s: &Sandbox,
    uid: u32,
    exec: PathBuf,
    memory_bytes: u64,
) -> Result<JailConfig> {
    let cgroups = cgroups::CgroupMode::host()?;
    let mut j = JailConfig::new(s.id.clone(), exec, uid, uid);
    j.chroot_base_dir = cfg.jail_base();
    j.netns = Some(cfg.netns(&s.id));
    j.new_pid_ns = true;
    j.cgroup_version = cgroups.version();
    j.cgroups = cgroups.sandbox_settings(s.vcpus, memory_bytes);
    j.parent_cgroup = cfg.cgroup_parent.clone();
    Ok(j)
}

/// The jail of the jail tier: mvm-agent on a unix socket, the directories of `tree` (the
/// overlay, or a caller's userland) bound in. Its programs run on the host kernel, so they get
/// the jailer's `sandbox` seccomp policy and, where the kernel has Landlock, may write only
/// beneath those directories and the jail's /run.
pub(super) fn jail_config(
    cfg: &ManagerConfig,
    s: &Sandbox,
    uid: u32,
    tree: &Path,
    run: Option<&Path>,
) -> Result<JailConfig> {
    let mut j = base_jail(
        cfg,
        s,
        uid,
        cfg.bin_dir.join("mvm-agent"),
        s.memory_mib << 20,
    )?;
    j.mount_proc = true;
    // Ptys for `tty` execs, from a devpts instance of the jail's own.
    j.mount_devpts = true;
    let run = run.map(|r| (r.to_owned(), PathBuf::from(jailer::RUN_DIR)));
    j.mounts = rootfs::jail_mounts(tree)?
        .into_iter()
        .chain(run)
        .map(|(host, jail)| BindMount {
            host,
            jail,
            read_only: false,
        })
        .collect();
    j.landlock = true;
    j.landlock_write = j
        .mounts
        .iter()
        .map(|m| m.jail.clone())
        .chain([PathBuf::from(jailer::RUN_DIR)])
        .collect();
    // /run is one of the mounts when bound from the layer.
    j.landlock_write.sort();
    j.landlock_write.dedup();
    j.seccomp = Some(SeccompPolicy::Sandbox);
    j.args = vec!["--listen".into(), format!("unix:{AGENT_SOCKET}").into()];
    Ok(j)
}

/// The jail of the vm tier: mvm-vmm booting template `t`, with the kernel, the base image and
/// the writable disk bound in. The disk is made in `dir`: blank (the overlay upper layer) or,
/// with `root_content`, a copy of that directory (the guest's root). With `container_slots`,
/// the directory of a pod's container images is bound in too.
pub(super) fn vm_jail_config(
    cfg: &ManagerConfig,
    s: &Sandbox,
    uid: u32,
    t: &Template,
    dir: &Path,
    root_content: Option<&Path>,
    container_slots: u8,
) -> Result<JailConfig> {
    if !Path::new(&t.kernel).is_file() {
        return Err(Error::Invalid(format!(
            "template {} has no kernel at {}; build it with `mvm build` (guest-kernel/build.sh)",
            t.name, t.kernel
        )));
    }
    let layer = dir.join("layer.ext4");
    rootfs::make_layer(&layer, uid, root_content)?;
    // Guest memory plus the VMM's own.
    let mut j = base_jail(
        cfg,
        s,
        uid,
        cfg.bin_dir.join("mvm-vmm"),
        (s.memory_mib + 128) << 20,
    )?;
    j.mounts = vec![
        BindMount {
            host: t.kernel.clone().into(),
            jail: vm::KERNEL.into(),
            read_only: true,
        },
        BindMount {
            host: t.rootfs.clone().into(),
            jail: vm::ROOTFS.into(),
            read_only: true,
        },
        BindMount {
            host: layer,
            jail: vm::LAYER.into(),
            read_only: false,
        },
    ];
    if container_slots > 0 {
        j.mounts.push(BindMount {
            host: pod::container_dir(dir, uid, container_slots)?,
            jail: vm::CONTAINER_DIR.into(),
            read_only: false,
        });
    }
    j.args = vm::vmm_args(&s.id, cfg.console_limit);
    Ok(j)
}
