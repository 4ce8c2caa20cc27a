//! The jail lifecycle: [`Jail::prepare`] builds it on the host, [`Jail::enter`] moves the calling
//! process in and execs the target, [`cleanup`] removes what a jail left on the host.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use crate::cgroup::{self, CgroupDir, CgroupPlan};
use crate::chroot;
use crate::config::{jail_dir, validate_id, validate_parent_cgroup, JailConfig};
use crate::error::{check, Error, Result};
use crate::privileges::{self, LandlockOutcome};
use crate::process;
use crate::seccomp;

/// A jail built on the host (directory tree and cgroups), not yet entered. Dropping it without
/// entering removes everything it made.
#[derive(Debug)]
pub struct Jail {
    config: JailConfig,
    root: PathBuf,
    /// How the exec file was put into the root (bound at the pivot, or already copied).
    exec: chroot::ExecPlacement,
    netns: Option<File>,
    /// The compiled seccomp policy, installed right before the exec.
    seccomp: Vec<seccompiler::BpfProgram>,
    undo: Undo,
}

/// What to remove if the jail cannot be completed.
#[derive(Debug)]
struct Undo {
    armed: bool,
    jail_dir: Option<PathBuf>,
    cgroups: Vec<CgroupDir>,
    /// The mount namespace the jail was prepared in, to return to before removing host paths.
    host_mnt_ns: Option<File>,
}

impl Undo {
    fn run(&mut self) {
        if !self.armed {
            return;
        }
        self.armed = false;
        if let Some(ns) = &self.host_mnt_ns {
            // SAFETY: `ns` is an open namespace fd; setns only changes this process's mount ns.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) } == -1 {
                eprintln!(
                    "mvm-jailer: rollback: cannot return to the host mount namespace: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        for cg in self.cgroups.iter().rev() {
            if let Err(e) = cg.remove() {
                eprintln!("mvm-jailer: rollback: {e}; run `mvm-jailer --cleanup`");
            }
        }
        if let Some(dir) = &self.jail_dir {
            if let Err(e) = chroot::remove_jail_dir(dir) {
                eprintln!("mvm-jailer: rollback: {e}; run `mvm-jailer --cleanup`");
            }
        }
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        self.run();
    }
}

impl Jail {
    /// Steps 1–3 on the host: validates `config`, opens the network namespace, creates
    /// `<base>/<exec-name>/<id>/root` with the exec file (or its mount point), device nodes and mount points, and
    /// the per-jail cgroups with their values. On any error, everything made is removed again.
    pub fn prepare(config: JailConfig) -> Result<Jail> {
        config.validate()?;
        // Resolve the cgroup controllers before making anything: an unmounted one is an error.
        let plan = CgroupPlan::resolve(config.cgroup_version, &config.cgroups)?;
        let netns = config
            .netns
            .as_ref()
            .map(|p| {
                File::open(p)
                    .map_err(|e| Error::io(format!("open network namespace {}", p.display()), e))
            })
            .transpose()?;
        let host_mnt_ns =
            File::open("/proc/self/ns/mnt").map_err(|e| Error::io("open /proc/self/ns/mnt", e))?;
        let root = config.root_dir()?;
        let seccomp = match &config.seccomp {
            Some(policy) => policy.compile()?,
            None => Vec::new(),
        };
        let exec = chroot::ExecPlacement::for_exec_file(&config.exec_file)?;
        let mut jail = Jail {
            exec,
            netns,
            seccomp,
            root,
            undo: Undo {
                armed: true,
                jail_dir: None,
                cgroups: Vec::new(),
                host_mnt_ns: Some(host_mnt_ns),
            },
            config,
        };
        jail.undo.jail_dir = Some(chroot::create_jail_dir(&jail.config)?);
        chroot::populate_root(&jail.config, &jail.root, jail.exec)?;
        plan.create(
            &jail.config.parent_cgroup,
            &jail.config.id,
            &mut jail.undo.cgroups,
        )?;
        Ok(jail)
    }

    /// The jail root on the host (`<base>/<exec-name>/<id>/root`).
    pub fn root_dir(&self) -> &Path {
        &self.root
    }

    /// The per-jail cgroups made by [`Jail::prepare`].
    pub fn cgroups(&self) -> &[CgroupDir] {
        &self.undo.cgroups
    }

    /// Steps 3–6: joins the cgroups and network namespace, enters new mount/ipc/uts (and
    /// optionally pid) namespaces, pivots into the jail root, mounts procfs and devpts if asked,
    /// applies rlimits, drops to the jail uid/gid without capabilities, applies Landlock if
    /// asked, daemonizes if asked, installs the seccomp policy if asked and execs the target.
    ///
    /// Must be called from a single-threaded process (the `mvm-jailer` binary, or a child forked
    /// for it) after [`crate::sanitize_process`]. Without `new_pid_ns` it never returns on
    /// success. With `new_pid_ns` the calling process stays outside as the supervisor and returns
    /// the exit code to leave with: the target's (128 + signal when killed), or 0 right after the
    /// target started when `daemonize` is set. On failure before the privilege drop, everything
    /// the jail made is removed.
    pub fn enter(mut self) -> Result<i32> {
        let threads = process::thread_count()?;
        if threads != 1 {
            return Err(Error::NotSingleThreaded(threads));
        }
        let dev_null = if self.config.daemonize {
            Some(process::open_dev_null()?)
        } else {
            None
        };
        if !self.config.new_pid_ns {
            let e = self.enter_in_place(None, dev_null.as_ref());
            return Err(e);
        }
        // New pid namespace: this process stays outside; its first child is pid 1 inside.
        // SAFETY: unshare with a flag constant; affects only children forked from now on.
        check(unsafe { libc::unshare(libc::CLONE_NEWPID) }, || {
            "unshare(CLONE_NEWPID)".into()
        })?;
        let (status_rd, status_wr) = cloexec_pipe()?;
        let child = process::fork()?;
        if child == 0 {
            drop(status_rd);
            // The supervisor rolls back if this side fails: it is still root on the host.
            self.undo.armed = false;
            let e = self.enter_in_place(Some(status_wr), dev_null.as_ref());
            eprintln!("mvm-jailer: error: {e}");
            // SAFETY: _exit skips destructors; nothing of this half-built jail may be undone here.
            unsafe { libc::_exit(1) };
        }
        drop(status_wr);
        process::forward_signals_to(child)?;
        let mut byte = [0u8; 1];
        let failed = (&status_rd)
            .read(&mut byte)
            .map_err(|e| Error::io("read the jail status pipe", e))?
            != 0;
        if failed {
            process::wait_for(child, false, "the jail init")?;
            return Err(Error::SetupFailedInPidNs);
        }
        // The target has exec'd: the jail is complete and now belongs to it.
        self.undo.armed = false;
        if self.config.daemonize {
            return Ok(0);
        }
        process::wait_for(child, false, "the jail init")
    }

    /// Everything from the cgroup attach to the exec, in the calling process. Returns only on
    /// failure. `status` is the pid-namespace status pipe: the target inherits it close-on-exec,
    /// so the supervisor reads EOF once the target runs, or the `!` written here on failure.
    fn enter_in_place(&mut self, mut status: Option<File>, dev_null: Option<&File>) -> Error {
        match self.setup_in_place(&mut status, dev_null) {
            Ok(never) => match never {},
            Err(e) => {
                // Only the non-pid-ns path rolls back here (the pid-ns child is disarmed and
                // its supervisor rolls back when it reads the failure).
                let could_undo = self.undo.armed;
                self.undo.run();
                match status {
                    Some(mut pipe) => {
                        let _ = pipe.write_all(b"!");
                        e
                    }
                    None if !could_undo => Error::AfterPrivilegeDrop {
                        source: Box::new(e),
                        jail_dir: self.root.parent().unwrap_or(&self.root).to_path_buf(),
                    },
                    None => e,
                }
            }
        }
    }

    fn setup_in_place(
        &mut self,
        status: &mut Option<File>,
        dev_null: Option<&File>,
    ) -> Result<std::convert::Infallible> {
        let c = &self.config;
        for cg in &self.undo.cgroups {
            cg.attach_self()?;
        }
        if let Some(ns) = &self.netns {
            // SAFETY: `ns` is an open fd; setns checks that it is a network namespace.
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            check(ret, || {
                format!(
                    "join network namespace {} (is it one?)",
                    c.netns.as_ref().expect("netns set").display()
                )
            })?;
        }
        // SAFETY: unshare with flag constants.
        let ret =
            unsafe { libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS) };
        check(ret, || "unshare(mount, ipc, uts namespaces)".into())?;
        let host = CString::new(c.id.as_str()).expect("validated id has no NUL");
        // SAFETY: `host` holds the `c.id.len()` bytes passed and outlives the call.
        let ret = unsafe { libc::sethostname(host.as_ptr(), c.id.len()) };
        check(ret, || "sethostname".into())?;
        chroot::pivot_into(c, &self.root, self.exec)?;
        if c.mount_proc {
            chroot::mount_proc()?;
        }
        if c.mount_devpts {
            chroot::mount_devpts(c.gid)?;
        }
        privileges::apply_rlimits(&c.resource_limits)?;
        privileges::drop_privileges(c.uid, c.gid)?;
        // From here on this process cannot remove the host-side jail any more.
        self.undo.armed = false;
        let c = &self.config;
        let exec_path = Path::new("/").join(c.exec_file_name()?);
        if status.is_some() {
            // pid 1 of the new namespace: fork the target, then reap everything until it exits.
            if let Some(null) = dev_null {
                process::daemonize(null)?;
            }
            let target = process::fork()?;
            if target != 0 {
                // Only the target may hold the status pipe, or the supervisor never reads EOF.
                status.take();
                process::forward_signals_to(target)?;
                let code = process::wait_for(target, true, "jailed process").unwrap_or(1);
                std::process::exit(code);
            }
            process::release_relayed_signals()?;
            apply_landlock(c)?;
            seccomp::install(&self.seccomp)?;
            return Err(process::exec(&exec_path, &c.args));
        }
        apply_landlock(c)?;
        if let Some(null) = dev_null {
            process::daemonize(null)?;
        }
        process::release_relayed_signals()?;
        // Last: nothing of the jailer's own runs under the target's filters.
        seccomp::install(&self.seccomp)?;
        Err(process::exec(&exec_path, &c.args))
    }
}

fn apply_landlock(c: &JailConfig) -> Result<()> {
    if !c.landlock {
        return Ok(());
    }
    match privileges::apply_landlock(&c.landlock_write_dirs())? {
        LandlockOutcome::Enforced => {}
        LandlockOutcome::Partial => {
            eprintln!(
                "mvm-jailer: notice: this kernel enforces Landlock only partially (older ABI)"
            )
        }
        LandlockOutcome::Unsupported => {
            eprintln!("mvm-jailer: notice: this kernel has no Landlock; continuing without it")
        }
    }
    Ok(())
}

fn cloexec_pipe() -> Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two fds pipe2 writes.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    check(ret, || "pipe2".into())?;
    // SAFETY: both fds were just created and are owned by nothing else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(rd), File::from(wr)))
}

/// What `mvm-jailer --cleanup` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CleanupConfig {
    /// Jail id.
    pub id: String,
    /// File name the exec file had in the jail (default `mvm-vmm`).
    pub exec_file_name: String,
    /// Base directory the jail was made under.
    pub chroot_base_dir: PathBuf,
    /// Parent cgroup the jail's cgroups were made under.
    pub parent_cgroup: String,
}

/// Default `--exec-file-name` for `--cleanup`.
pub const DEFAULT_EXEC_FILE_NAME: &str = "mvm-vmm";

/// Removes the jail directory and the per-jail cgroups in every mounted hierarchy (v1 and v2).
/// Refuses while processes remain in a cgroup. Returns what was removed; removing a jail that is
/// already gone is not an error.
pub fn cleanup(c: &CleanupConfig) -> Result<Vec<PathBuf>> {
    validate_id(&c.id)?;
    validate_parent_cgroup(&c.parent_cgroup)?;
    let name = OsStr::new(&c.exec_file_name);
    if c.exec_file_name.is_empty()
        || c.exec_file_name.contains('/')
        || c.exec_file_name == ".."
        || c.exec_file_name == "."
    {
        return Err(Error::InvalidArgument {
            flag: "--exec-file-name",
            value: c.exec_file_name.clone(),
            reason: "must be a plain file name".into(),
        });
    }
    let mut removed = Vec::new();
    for cg in cgroup::existing(&c.parent_cgroup, &c.id)? {
        cg.remove()?;
        removed.push(cg.path);
    }
    let dir = jail_dir(&c.chroot_base_dir, name, &c.id);
    if dir.exists() {
        chroot::remove_jail_dir(&dir)?;
        removed.push(dir);
    }
    Ok(removed)
}
