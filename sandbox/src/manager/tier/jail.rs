//! The jail tier: `mvm-agent` in the jailer's namespaces, chroot and cgroups, running the
//! sandbox's programs on the host kernel behind the jailer's `sandbox` seccomp policy and
//! Landlock. Its root is an overlay over the template's unpacked base (or a caller's
//! directory); its agent listens on a unix socket in the jail's `/run`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agent::AgentClient;
use jailer::{BindMount, JailConfig, SeccompPolicy};

use super::base_jail;
use crate::db::SandboxRow;
use crate::error::{Error, Result};
use crate::manager::cgroups::CpuShare;
use crate::manager::{beneath, rootfs, Live, Manager, ManagerConfig, AGENT_SOCKET};
use crate::model::{Isolation, Sandbox, Template};

/// How long a new jail-tier sandbox may take to answer.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Device nodes the jail tier adds to the jail's /dev for the sandbox's programs (`tty` is the
/// calling process's controlling terminal: a pty of the jail's own devpts, or none).
const JAIL_DEVICES: [(&str, u32, u32); 5] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("tty", 5, 0),
];

fn make_device(path: &Path, major: u32, minor: u32) -> Result<()> {
    let c = mvm_sys::cstr::from_path(path)?;
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

/// The jail tier's program: the agent, copied into each jail's root as `/mvm-agent`.
const AGENT_BIN: &str = "mvm-agent";

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
        cfg.bin_dir.join(AGENT_BIN),
        s.memory_mib << 20,
        CpuShare::Normal,
    )?;
    j.mount_proc = true;
    // Ptys for `tty` execs, from a devpts instance of the jail's own.
    j.mount_devpts = true;
    let run = run.map(|r| (r.to_owned(), PathBuf::from(jailer::RUN_DIR)));
    let top = rootfs::jail_top(tree, AGENT_BIN)?;
    let bind = |(host, jail): (PathBuf, PathBuf)| BindMount {
        host,
        jail,
        read_only: false,
    };
    j.landlock = true;
    // Writable: the directories (a top-level file is bound, read-only under Landlock).
    j.landlock_write = top
        .dirs
        .iter()
        .chain(run.iter())
        .map(|(_, jail)| jail.clone())
        .chain([PathBuf::from(jailer::RUN_DIR)])
        .collect();
    j.mounts = top
        .dirs
        .into_iter()
        .chain(run)
        .chain(top.files)
        .map(bind)
        .collect();
    j.symlinks = top
        .links
        .into_iter()
        .map(|(jail, target)| jailer::JailSymlink { jail, target })
        .collect();
    // /run is one of the mounts when bound from the layer.
    j.landlock_write.sort();
    j.landlock_write.dedup();
    j.seccomp = Some(SeccompPolicy::Sandbox);
    j.args = vec!["--listen".into(), format!("unix:{AGENT_SOCKET}").into()];
    Ok(j)
}

/// The jail of a template's sandbox: the template's base, unpacked once per host, under an
/// overlay whose upper layer lies on a tmpfs of [`ManagerConfig::jail_disk_mib`] in the
/// sandbox directory `dir`, which also holds the jail's `/run`.
pub(super) fn template_jail(
    cfg: &ManagerConfig,
    s: &Sandbox,
    uid: u32,
    template: &Template,
    dir: &Path,
) -> Result<JailConfig> {
    let base = rootfs::base_tree(&cfg.state_dir.join("bases"), Path::new(&template.rootfs))?;
    overlay_jail(cfg, s, uid, &base, dir)
}

/// The jail of a sandbox whose read-only base is the tree `base` (a template's unpacked image,
/// or an OCI image's): an overlay whose upper layer lies on a tmpfs of
/// [`ManagerConfig::jail_disk_mib`] in the sandbox directory `dir`, which also holds the
/// jail's `/run`.
pub(super) fn overlay_jail(
    cfg: &ManagerConfig,
    s: &Sandbox,
    uid: u32,
    base: &Path,
    dir: &Path,
) -> Result<JailConfig> {
    let overlay = rootfs::Overlay::at(dir);
    overlay.mount(base, uid, cfg.jail_disk_mib)?;
    jail_config(cfg, s, uid, &overlay.merged, Some(&overlay.run))
}

/// The agent's socket: in the jail's `/run`, which for a template's sandbox is bound from its
/// writable layer ([`rootfs::Overlay::run`]), where it is reached.
pub(super) fn agent_socket(cfg: &ManagerConfig, id: &str, uid: u32) -> Result<beneath::JailSocket> {
    let dir = cfg.sandbox_dir(id);
    let run = rootfs::Overlay::at(&dir).run;
    // Root's directories up to the layer's run: a sandbox cannot make or remove it.
    if run.symlink_metadata().is_ok_and(|m| m.is_dir()) {
        let rel =
            Path::new(rootfs::RUN_IN_SANDBOX_DIR).join(AGENT_SOCKET.trim_start_matches("/run/"));
        beneath::JailSocket::open(&dir, &rel, uid)
    } else {
        cfg.jail_socket(Isolation::Jail, id, uid, AGENT_SOCKET)
    }
}

impl Manager {
    /// Waits for the agent's socket, gives the jail the device nodes its programs use, and
    /// waits until the agent answers.
    pub(super) async fn await_jail_agent(
        &self,
        row: &SandboxRow,
        live: &Live,
    ) -> Result<AgentClient> {
        let cfg = &self.inner.cfg;
        let id = &row.sandbox.id;
        self.wait_for(live, &row.sandbox, READY_TIMEOUT, || {
            agent_socket(cfg, id, cfg.uid(row)).is_ok()
        })
        .await?;
        let dev = cfg.in_jail(Isolation::Jail, id, "/dev");
        for (name, major, minor) in JAIL_DEVICES {
            make_device(&dev.join(name), major, minor)?;
        }
        // The jailer makes these for a VMM; sandboxed programs get neither.
        for node in ["kvm", "net/tun"] {
            let path = dev.join(node);
            std::fs::remove_file(&path)
                .map_err(|e| Error::host(format!("removing {}", path.display()), e))?;
        }
        self.wait_agent(live, row, READY_TIMEOUT, None).await
    }
}
