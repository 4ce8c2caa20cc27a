//! What a jail is made of: the validated description shared by the CLI and the API daemon.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::seccomp::SeccompPolicy;

/// Default `--chroot-base-dir`, as in Firecracker's jailer.
pub const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";
/// Default `--parent-cgroup`.
pub const DEFAULT_PARENT_CGROUP: &str = "mvm";
/// Open-file limit applied when no `--resource-limit no-file=N` is given (Firecracker's default).
pub const DEFAULT_NO_FILE: u64 = 2048;
/// Writable directory inside the jail (owned by the jailed uid/gid), e.g. for the API socket.
pub const RUN_DIR: &str = "/run";
/// Where `--mount-devpts` mounts the jail's own devpts instance.
pub const DEVPTS_DIR: &str = "/dev/pts";
/// The pty multiplexer of the jail: a symlink to `pts/ptmx` of the jail's devpts instance.
pub const PTMX: &str = "/dev/ptmx";
/// Most ptys a jail's devpts instance holds at once (its `max=` mount option), so one jail
/// cannot take the ptys of the others: all non-initial devpts instances share
/// `kernel.pty.max - kernel.pty.reserve` (3072 by default).
pub const DEVPTS_MAX_PTYS: u32 = 256;

/// Longest accepted jail id.
const MAX_ID_LEN: usize = 64;

/// Which cgroup hierarchy the per-jail cgroup is made in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CgroupVersion {
    /// Legacy per-controller hierarchies (`cgroup` mounts).
    #[default]
    V1,
    /// The unified hierarchy (`cgroup2` mount).
    V2,
}

impl FromStr for CgroupVersion {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "1" => Ok(CgroupVersion::V1),
            "2" => Ok(CgroupVersion::V2),
            _ => Err(Error::InvalidArgument {
                flag: "--cgroup-version",
                value: s.to_string(),
                reason: "expected 1 or 2".into(),
            }),
        }
    }
}

/// One `--cgroup KEY=VALUE`: an interface file of the per-jail cgroup and the value written to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    /// Interface file name, e.g. `memory.limit_in_bytes`; its prefix names the controller.
    pub key: String,
    /// Value written verbatim, e.g. `268435456` or `8:0 rbps=1048576`.
    pub value: String,
}

impl CgroupSetting {
    /// The controller named by the key's prefix (`cpu` for `cpu.cfs_quota_us`).
    pub fn controller(&self) -> &str {
        self.key.split('.').next().unwrap_or_default()
    }
}

impl FromStr for CgroupSetting {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidArgument {
            flag: "--cgroup",
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let (key, value) = s.split_once('=').ok_or_else(|| bad("expected KEY=VALUE"))?;
        let key_ok = key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
        let parts: Vec<&str> = key.split('.').collect();
        if !key_ok || parts.len() < 2 || parts.iter().any(|p| p.is_empty()) {
            return Err(bad(
                "the key must look like <controller>.<file>, e.g. memory.limit_in_bytes",
            ));
        }
        if value.is_empty() || value.contains('\n') {
            return Err(bad("the value must be non-empty and one line"));
        }
        Ok(CgroupSetting {
            key: key.to_string(),
            value: value.to_string(),
        })
    }
}

/// One `--resource-limit NAME=N`, applied with setrlimit (soft = hard = N) before the privilege drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceLimit {
    /// `fsize`: largest file the jailed process may write (RLIMIT_FSIZE), bytes.
    Fsize(u64),
    /// `no-file`: highest fd number + 1 (RLIMIT_NOFILE).
    NoFile(u64),
    /// `nproc`: processes of the jailed uid (RLIMIT_NPROC).
    Nproc(u64),
}

impl ResourceLimit {
    /// The name used on the command line.
    pub fn name(&self) -> &'static str {
        match self {
            ResourceLimit::Fsize(_) => "fsize",
            ResourceLimit::NoFile(_) => "no-file",
            ResourceLimit::Nproc(_) => "nproc",
        }
    }

    /// The limit value.
    pub fn value(&self) -> u64 {
        match *self {
            ResourceLimit::Fsize(v) | ResourceLimit::NoFile(v) | ResourceLimit::Nproc(v) => v,
        }
    }
}

impl FromStr for ResourceLimit {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::InvalidArgument {
            flag: "--resource-limit",
            value: s.to_string(),
            reason: reason.to_string(),
        };
        let (name, value) = s.split_once('=').ok_or_else(|| bad("expected NAME=N"))?;
        let n: u64 = value
            .parse()
            .map_err(|_| bad("N must be a non-negative integer"))?;
        match name {
            "fsize" => Ok(ResourceLimit::Fsize(n)),
            "no-file" => Ok(ResourceLimit::NoFile(n)),
            "nproc" => Ok(ResourceLimit::Nproc(n)),
            _ => Err(bad("NAME must be fsize, no-file or nproc")),
        }
    }
}

/// One `--mount HOSTPATH:JAILPATH[:ro|rw]`: a host file or directory bind-mounted into the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Existing host file or directory.
    pub host: PathBuf,
    /// Absolute path inside the jail.
    pub jail: PathBuf,
    /// Mounted read-only (the default).
    pub read_only: bool,
}

impl FromStr for BindMount {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (rest, read_only) = if let Some(rest) = s.strip_suffix(":ro") {
            (rest, true)
        } else if let Some(rest) = s.strip_suffix(":rw") {
            (rest, false)
        } else {
            (s, true)
        };
        let (host, jail) = rest.split_once(':').ok_or_else(|| Error::InvalidArgument {
            flag: "--mount",
            value: s.to_string(),
            reason: "expected HOSTPATH:JAILPATH[:ro|rw]".into(),
        })?;
        Ok(BindMount {
            host: host.into(),
            jail: jail.into(),
            read_only,
        })
    }
}

/// One `--symlink JAILPATH=TARGET`: a symbolic link at the top of the jail's root, as an
/// image's merged `/usr` has them (`/bin -> usr/bin`, `/lib64 -> usr/lib64`). The target is
/// text, resolved only inside the jail once it is entered; the link is made after every mount
/// point, and no jail path the jailer uses may pass through it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSymlink {
    /// `/NAME`: one component under the jail's root.
    pub jail: PathBuf,
    /// What the link points to.
    pub target: PathBuf,
}

impl FromStr for JailSymlink {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (jail, target) = s.split_once('=').ok_or_else(|| Error::InvalidArgument {
            flag: "--symlink",
            value: s.to_string(),
            reason: "expected JAILPATH=TARGET".into(),
        })?;
        Ok(JailSymlink {
            jail: jail.into(),
            target: target.into(),
        })
    }
}

/// Complete description of one jail. Build it with [`JailConfig::new`], adjust the public fields,
/// then hand it to [`crate::Jail::prepare`] (in-process) or spawn `mvm-jailer` with
/// [`JailConfig::to_args`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// Jail id: 1–64 ASCII alphanumerics or '-'; also the UTS hostname and the cgroup name.
    pub id: String,
    /// Host binary copied into the jail and executed there (must be static).
    pub exec_file: PathBuf,
    /// User id the target runs as; [`JailConfig::validate`] refuses 0 and `u32::MAX` (-1).
    pub uid: u32,
    /// Group id the target runs as (supplementary groups are cleared); not 0 nor `u32::MAX`.
    pub gid: u32,
    /// Base of the jail tree: the jail root is `<base>/<exec-file-name>/<id>/root`.
    pub chroot_base_dir: PathBuf,
    /// Network namespace file to join (e.g. `/var/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    /// Detach from the terminal: new session, stdio on /dev/null.
    pub daemonize: bool,
    /// Run the target in a new pid namespace under a minimal reaping init.
    pub new_pid_ns: bool,
    /// Mount a fresh procfs (pid entries only) at /proc in the jail; needs `new_pid_ns`.
    pub mount_proc: bool,
    /// Mount a new devpts instance at /dev/pts in the jail, with /dev/ptmx pointing into it:
    /// the jailed process can open ptys, and sees only its own.
    pub mount_devpts: bool,
    /// Make `/dev/userfaultfd` in the jail (the host's node, Linux 6.1+), owned by the jail
    /// user: a jailed VMM's `Uffd` snapshot backend opens it where the userfaultfd syscall is
    /// not the unprivileged user's (`vm.unprivileged_userfaultfd = 0`). Never for programs the
    /// jail's seccomp policy keeps from the syscall: the node would be a way around it.
    pub dev_userfaultfd: bool,
    /// Hierarchy used for the per-jail cgroup.
    pub cgroup_version: CgroupVersion,
    /// Values written into the per-jail cgroup, in order.
    pub cgroups: Vec<CgroupSetting>,
    /// Parent cgroup (relative to each hierarchy root) under which `<id>` is created.
    pub parent_cgroup: String,
    /// Resource limits applied before the privilege drop.
    pub resource_limits: Vec<ResourceLimit>,
    /// Host paths bind-mounted into the jail; a directory bound at `/run` replaces the jail's
    /// own (its owner and mode are the host directory's).
    pub mounts: Vec<BindMount>,
    /// Symbolic links made at the top of the jail's root.
    pub symlinks: Vec<JailSymlink>,
    /// Apply a Landlock ruleset: read/execute everywhere in the jail, write only beneath
    /// `landlock_write` (default `/run`) and to the device nodes.
    pub landlock: bool,
    /// Jail directories that stay writable under Landlock.
    pub landlock_write: Vec<PathBuf>,
    /// Seccomp filters installed right before the exec, inherited by every process of the jail.
    pub seccomp: Option<SeccompPolicy>,
    /// Arguments passed to the target (after `--` on the command line).
    pub args: Vec<OsString>,
}

impl JailConfig {
    /// A configuration with the defaults of the command line for everything but the required
    /// flags (`--id`, `--exec-file`, `--uid`, `--gid`).
    pub fn new(id: impl Into<String>, exec_file: impl Into<PathBuf>, uid: u32, gid: u32) -> Self {
        JailConfig {
            id: id.into(),
            exec_file: exec_file.into(),
            uid,
            gid,
            chroot_base_dir: DEFAULT_CHROOT_BASE.into(),
            netns: None,
            daemonize: false,
            new_pid_ns: false,
            mount_proc: false,
            mount_devpts: false,
            dev_userfaultfd: false,
            cgroup_version: CgroupVersion::V1,
            cgroups: Vec::new(),
            parent_cgroup: DEFAULT_PARENT_CGROUP.into(),
            resource_limits: Vec::new(),
            mounts: Vec::new(),
            symlinks: Vec::new(),
            landlock: false,
            landlock_write: Vec::new(),
            seccomp: None,
            args: Vec::new(),
        }
    }

    /// File name of the exec file, as copied into the jail root.
    pub fn exec_file_name(&self) -> Result<&std::ffi::OsStr> {
        self.exec_file
            .file_name()
            .ok_or_else(|| Error::InvalidExecFile {
                path: self.exec_file.clone(),
                reason: "it has no file name".into(),
            })
    }

    /// `<base>/<exec-file-name>/<id>`: everything the jail owns on the host.
    pub fn jail_dir(&self) -> Result<PathBuf> {
        Ok(jail_dir(
            &self.chroot_base_dir,
            self.exec_file_name()?,
            &self.id,
        ))
    }

    /// `<base>/<exec-file-name>/<id>/root`: the jailed process's `/`.
    pub fn root_dir(&self) -> Result<PathBuf> {
        Ok(self.jail_dir()?.join("root"))
    }

    /// Directories writable under Landlock (jail paths).
    pub fn landlock_write_dirs(&self) -> Vec<PathBuf> {
        if self.landlock_write.is_empty() {
            vec![PathBuf::from(RUN_DIR)]
        } else {
            self.landlock_write.clone()
        }
    }

    /// Checks everything that can be checked without changing the system (step 1).
    pub fn validate(&self) -> Result<()> {
        validate_id(&self.id)?;
        validate_jail_id("--uid", self.uid)?;
        validate_jail_id("--gid", self.gid)?;
        self.validate_exec_file()?;
        if !self.chroot_base_dir.is_absolute() {
            return Err(invalid(
                "--chroot-base-dir",
                &self.chroot_base_dir,
                "must be an absolute path",
            ));
        }
        validate_parent_cgroup(&self.parent_cgroup)?;
        if self.mount_proc && !self.new_pid_ns {
            return Err(Error::InvalidArgument {
                flag: "--mount-proc",
                value: String::new(),
                reason: "needs --new-pid-ns (a procfs of the host pid namespace would show host processes)".into(),
            });
        }
        let exec_name = Path::new("/").join(self.exec_file_name()?);
        for m in &self.mounts {
            let meta = std::fs::metadata(&m.host)
                .map_err(|e| invalid("--mount", &m.host, &format!("host path: {e}")))?;
            if !(meta.is_dir()
                || meta.is_file()
                || meta.file_type().is_socket()
                || meta.file_type().is_block_device())
            {
                return Err(invalid(
                    "--mount",
                    &m.host,
                    "host path must be a directory, file, socket or block device",
                ));
            }
            check_jail_path("--mount", &m.jail)?;
            // A directory may replace the jail's /run (e.g. one on a size-limited tmpfs).
            let run_dir = m.jail == Path::new(RUN_DIR) && meta.is_dir();
            for reserved in ["/dev", "/proc", RUN_DIR] {
                if m.jail == Path::new(reserved) && !run_dir {
                    return Err(invalid(
                        "--mount",
                        &m.jail,
                        "this jail path is managed by the jailer",
                    ));
                }
            }
            if self.mount_devpts && (m.jail.starts_with(DEVPTS_DIR) || m.jail == Path::new(PTMX)) {
                return Err(invalid(
                    "--mount",
                    &m.jail,
                    "this jail path is managed by the jailer (--mount-devpts)",
                ));
            }
            if m.jail == exec_name {
                return Err(invalid(
                    "--mount",
                    &m.jail,
                    "this is where the exec file is copied",
                ));
            }
        }
        for link in &self.symlinks {
            self.check_symlink(link, &exec_name)?;
        }
        if self.dev_userfaultfd {
            crate::chroot::host_userfaultfd()?;
        }
        for dir in &self.landlock_write {
            check_jail_path("--landlock-write", dir)?;
            // Only directories the jailer makes exist in the jail: fail now, not after the drop.
            let made = dir == Path::new(RUN_DIR)
                || self
                    .mounts
                    .iter()
                    .any(|m| &m.jail == dir && m.host.is_dir());
            if !made {
                return Err(invalid(
                    "--landlock-write",
                    dir,
                    "must be /run or the jail path of a directory given with --mount",
                ));
            }
        }
        if let Some(policy) = &self.seccomp {
            // Compiled now to fail before anything is made; the jail compiles its own copy.
            policy.compile()?;
        }
        Ok(())
    }

    fn validate_exec_file(&self) -> Result<()> {
        let bad = |reason: String| Error::InvalidExecFile {
            path: self.exec_file.clone(),
            reason,
        };
        let meta = std::fs::metadata(&self.exec_file).map_err(|e| bad(e.to_string()))?;
        if !meta.is_file() {
            return Err(bad("not a regular file".into()));
        }
        self.exec_file_name()?;
        let mut file = File::open(&self.exec_file).map_err(|e| bad(e.to_string()))?;
        if let Some(interpreter) = interpreter_of(&mut file).map_err(|e| bad(e.to_string()))? {
            return Err(Error::NeedsInterpreter {
                path: self.exec_file.clone(),
                interpreter,
            });
        }
        Ok(())
    }

    /// A `Command` that runs `jailer_bin` (the `mvm-jailer` binary) with [`JailConfig::to_args`]:
    /// how a multi-threaded program such as the API daemon starts a jailed VMM.
    pub fn command(&self, jailer_bin: impl AsRef<Path>) -> std::process::Command {
        use std::os::unix::process::CommandExt;
        let mut c = std::process::Command::new(jailer_bin.as_ref());
        // No environment: the caller's (a daemon's, a user's shell's, which may hold
        // credentials) would stay in the memory of the jailer processes that live as long as
        // the jail, whatever the jailer then clears.
        c.env_clear().args(self.to_args());
        // A signal the jailer relays to its target is held from its first instruction on
        // (see `hold_relayed_signals`).
        // SAFETY: the hook makes async-signal-safe calls only.
        unsafe { c.pre_exec(crate::process::hold_relayed_signals) };
        c
    }

    /// The `mvm-jailer` command line that builds this jail (without the program name).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |flag: &str, value: OsString| {
            a.push(flag.into());
            a.push(value);
        };
        push("--id", self.id.clone().into());
        push("--exec-file", self.exec_file.clone().into());
        push("--uid", self.uid.to_string().into());
        push("--gid", self.gid.to_string().into());
        push("--chroot-base-dir", self.chroot_base_dir.clone().into());
        if let Some(netns) = &self.netns {
            push("--netns", netns.clone().into());
        }
        push(
            "--cgroup-version",
            match self.cgroup_version {
                CgroupVersion::V1 => "1",
                CgroupVersion::V2 => "2",
            }
            .into(),
        );
        for c in &self.cgroups {
            push("--cgroup", format!("{}={}", c.key, c.value).into());
        }
        push("--parent-cgroup", self.parent_cgroup.clone().into());
        for r in &self.resource_limits {
            push(
                "--resource-limit",
                format!("{}={}", r.name(), r.value()).into(),
            );
        }
        for m in &self.mounts {
            let mut spec = m.host.clone().into_os_string();
            spec.push(":");
            spec.push(&m.jail);
            spec.push(if m.read_only { ":ro" } else { ":rw" });
            push("--mount", spec);
        }
        for link in &self.symlinks {
            let mut spec = link.jail.clone().into_os_string();
            spec.push("=");
            spec.push(&link.target);
            push("--symlink", spec);
        }
        for dir in &self.landlock_write {
            push("--landlock-write", dir.clone().into());
        }
        if let Some(policy) = &self.seccomp {
            let (flag, value) = policy.flag();
            push(flag, value);
        }
        for (set, flag) in [
            (self.daemonize, "--daemonize"),
            (self.new_pid_ns, "--new-pid-ns"),
            (self.mount_proc, "--mount-proc"),
            (self.mount_devpts, "--mount-devpts"),
            (self.dev_userfaultfd, "--dev-userfaultfd"),
            (self.landlock, "--landlock"),
        ] {
            if set {
                a.push(flag.into());
            }
        }
        a.push("--".into());
        a.extend(self.args.iter().cloned());
        a
    }
}

/// `<base>/<exec-file-name>/<id>`.
pub(crate) fn jail_dir(base: &Path, exec_name: &std::ffi::OsStr, id: &str) -> PathBuf {
    base.join(exec_name).join(id)
}

fn invalid(flag: &'static str, value: &Path, reason: &str) -> Error {
    Error::InvalidArgument {
        flag,
        value: value.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Checks a jail id: 1–64 ASCII alphanumerics or '-'.
pub fn validate_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidId(id.to_string()))
    }
}

/// Checks the `--uid` or `--gid` value (`flag`) the target will run as: neither 0 (root: the
/// jail would keep the privileges it exists to drop) nor `u32::MAX` (-1, which setresuid and
/// setresgid read as "leave unchanged", so the target would stay root as well).
pub(crate) fn validate_jail_id(flag: &'static str, id: u32) -> Result<()> {
    let reason = match id {
        0 => "0 is root: the jailed process must run as an unprivileged user",
        u32::MAX => {
            "4294967295 is (uid_t)-1, which the kernel reads as 'leave unchanged': the jailed \
             process would stay root"
        }
        _ => return Ok(()),
    };
    Err(Error::InvalidArgument {
        flag,
        value: id.to_string(),
        reason: format!("{reason}; use an unused id between 1 and 4294967294"),
    })
}

/// Checks a parent cgroup: a relative path of plain names (no `.`, `..` or empty parts).
pub fn validate_parent_cgroup(parent: &str) -> Result<()> {
    let ok = !parent.is_empty()
        && parent.split('/').all(|part| {
            !part.is_empty()
                && part != "."
                && part != ".."
                && part
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidArgument {
            flag: "--parent-cgroup",
            value: parent.to_string(),
            reason: "use a relative path of names made of letters, digits, '-', '_' or '.'".into(),
        })
    }
}

/// A jail path must be absolute, not `/`, and made only of plain names.
impl JailConfig {
    /// A link's jail path is `/NAME`, free (no mount, device, exec file or other link there)
    /// and on no jail path the jailer makes or mounts on; its target is not empty.
    fn check_symlink(&self, link: &JailSymlink, exec_name: &Path) -> Result<()> {
        check_jail_path("--symlink", &link.jail)?;
        let bad = |why: &str| Err(invalid("--symlink", &link.jail, why));
        if link.jail.components().count() != 2 {
            return bad("a link is made only directly under the jail's root (/NAME)");
        }
        if link.target.as_os_str().is_empty() {
            return bad("the link needs a target");
        }
        let taken = ["/dev", "/proc", RUN_DIR]
            .iter()
            .map(Path::new)
            .chain([exec_name])
            .chain(self.mounts.iter().map(|m| m.jail.as_path()))
            .chain(self.landlock_write.iter().map(PathBuf::as_path))
            .any(|p| p.starts_with(&link.jail));
        let twice = self.symlinks.iter().filter(|l| l.jail == link.jail).count() > 1;
        if taken || twice {
            return bad("this jail path is used by the jailer, a mount or another link");
        }
        Ok(())
    }
}

fn check_jail_path(flag: &'static str, path: &Path) -> Result<()> {
    // `Path::components` silently drops inner "." parts: look at the raw parts too.
    let raw_plain = path
        .as_os_str()
        .as_bytes()
        .split(|&b| b == b'/')
        .skip(1)
        .all(|p| p != b"." && p != b"..");
    let mut components = path.components();
    let plain = raw_plain
        && components.next() == Some(Component::RootDir)
        && components.clone().next().is_some()
        && components.all(|c| matches!(c, Component::Normal(_)));
    if plain {
        Ok(())
    } else {
        Err(invalid(
            flag,
            path,
            "jail path must be absolute, not '/', without '.' or '..'",
        ))
    }
}

/// The interpreter an executable needs (ELF `PT_INTERP` or `#!` line), if any.
fn interpreter_of(file: &mut File) -> std::io::Result<Option<String>> {
    const PT_INTERP: u32 = 3;
    let mut header = [0u8; 64];
    let n = read_up_to(file, &mut header)?;
    if header.starts_with(b"#!") {
        file.seek(SeekFrom::Start(0))?;
        let mut line = String::new();
        BufReader::new(file).read_line(&mut line)?;
        return Ok(Some(format!(
            "the script interpreter '{}'",
            line[2..].trim()
        )));
    }
    let invalid =
        |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
    if n < 64 || &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err(invalid("not a 64-bit little-endian ELF executable"));
    }
    let u16_at = |o: usize| u16::from_le_bytes([header[o], header[o + 1]]) as u64;
    let phoff = u64::from_le_bytes(header[0x20..0x28].try_into().expect("8-byte slice"));
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    if phentsize < 56 {
        return Err(invalid("malformed ELF program header table"));
    }
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        file.seek(SeekFrom::Start(phoff + i * phentsize))?;
        if read_up_to(file, &mut ph)? != ph.len() {
            return Err(invalid("truncated ELF program header table"));
        }
        if u32::from_le_bytes(ph[0..4].try_into().expect("4-byte slice")) == PT_INTERP {
            let offset = u64::from_le_bytes(ph[8..16].try_into().expect("8-byte slice"));
            let size = u64::from_le_bytes(ph[32..40].try_into().expect("8-byte slice")).min(4096);
            let mut interp = vec![0u8; size as usize];
            file.seek(SeekFrom::Start(offset))?;
            let got = read_up_to(file, &mut interp)?;
            interp.truncate(got);
            let name = String::from_utf8_lossy(&interp)
                .trim_end_matches('\0')
                .to_string();
            return Ok(Some(format!("the dynamic loader {name}")));
        }
    }
    Ok(None)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        validate_id("a-1").unwrap();
        validate_id(&"x".repeat(64)).unwrap();
        for bad in ["", "a/b", "..", "a_b", "a b", &"x".repeat(65)] {
            assert!(
                matches!(validate_id(bad), Err(Error::InvalidId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn cgroup_settings() {
        let s: CgroupSetting = "memory.limit_in_bytes=64M".parse().unwrap();
        assert_eq!((s.controller(), s.value.as_str()), ("memory", "64M"));
        let s: CgroupSetting = "hugetlb.2MB.max=0".parse().unwrap();
        assert_eq!(s.controller(), "hugetlb");
        let s: CgroupSetting = "io.max=8:0 rbps=1048576".parse().unwrap();
        assert_eq!(
            (s.controller(), s.value.as_str()),
            ("io", "8:0 rbps=1048576")
        );
        for bad in [
            "memory",
            "memory=1",
            "../x.y=1",
            "a/b.c=1",
            "memory.x=",
            ".x=1",
            "x..y=1",
        ] {
            assert!(bad.parse::<CgroupSetting>().is_err(), "{bad}");
        }
    }

    #[test]
    fn resource_limits() {
        assert_eq!(
            "fsize=10".parse::<ResourceLimit>().unwrap(),
            ResourceLimit::Fsize(10)
        );
        assert_eq!(
            "no-file=3".parse::<ResourceLimit>().unwrap(),
            ResourceLimit::NoFile(3)
        );
        assert_eq!(
            "nproc=7".parse::<ResourceLimit>().unwrap(),
            ResourceLimit::Nproc(7)
        );
        for bad in ["fsize", "fsize=-1", "cpu=1", "no-file=x"] {
            assert!(bad.parse::<ResourceLimit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn mounts() {
        let m: BindMount = "/a/b:/c".parse().unwrap();
        assert_eq!(
            m,
            BindMount {
                host: "/a/b".into(),
                jail: "/c".into(),
                read_only: true
            }
        );
        let m: BindMount = "/a:/c/d:rw".parse().unwrap();
        assert!(!m.read_only);
        "/a".parse::<BindMount>().unwrap_err();
        for bad in ["/", "rel", "/a/../b", "/./a"] {
            assert!(check_jail_path("--mount", Path::new(bad)).is_err(), "{bad}");
        }
        check_jail_path("--mount", Path::new("/a/b")).unwrap();
    }

    #[test]
    fn symlinks_sit_directly_under_the_root_on_free_names() {
        let link: JailSymlink = "/bin=usr/bin".parse().unwrap();
        assert_eq!(
            link,
            JailSymlink {
                jail: "/bin".into(),
                target: "usr/bin".into()
            }
        );
        "/bin".parse::<JailSymlink>().unwrap_err();
        let mut c = JailConfig::new("vm-1", std::env::current_exe().unwrap(), 10, 10);
        c.mounts.push(BindMount {
            host: std::env::temp_dir(),
            jail: "/usr".into(),
            read_only: false,
        });
        let exec = format!("/{}", c.exec_file_name().unwrap().to_string_lossy());
        c.symlinks = vec![link, "/lib64=/usr/lib64".parse().unwrap()];
        c.validate().unwrap();
        for bad in [
            "/a/b=x",
            "/=x",
            "/a=",
            "/dev=x",
            "/proc=x",
            "/run=x",
            "/usr=x",
            "/bin=again",
            "/../x=y",
        ]
        .iter()
        .map(|b| b.to_string())
        .chain([format!("{exec}=x")])
        {
            let mut c = c.clone();
            c.symlinks.push(bad.parse().unwrap());
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with("invalid --symlink"), "{bad}: {e}");
        }
    }

    #[test]
    fn run_is_reserved_but_for_a_directory() {
        let mut c = JailConfig::new("vm-1", std::env::current_exe().unwrap(), 10, 10);
        c.mounts.push(BindMount {
            host: std::env::current_exe().unwrap(),
            jail: RUN_DIR.into(),
            read_only: false,
        });
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("managed by the jailer"), "{e}");
        c.mounts[0].host = std::env::temp_dir();
        c.landlock_write = vec![RUN_DIR.into()];
        c.validate().unwrap();
        c.mounts[0].jail = "/proc".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn jail_ids() {
        for ok in [1, 1000, 200_000, u32::MAX - 1] {
            assert!(validate_jail_id("--uid", ok).is_ok(), "{ok}");
        }
        for bad in [0, u32::MAX] {
            let e = validate_jail_id("--gid", bad).unwrap_err().to_string();
            assert!(e.starts_with(&format!("invalid --gid '{bad}'")), "{e}");
        }
        let mut c = JailConfig::new("vm-1", std::env::current_exe().unwrap(), 10, 10);
        c.validate().unwrap();
        c.uid = u32::MAX;
        assert!(c.validate().unwrap_err().to_string().contains("--uid"));
        c.uid = 10;
        c.gid = 0;
        assert!(c.validate().unwrap_err().to_string().contains("--gid"));
    }

    #[test]
    fn parent_cgroups() {
        validate_parent_cgroup("mvm").unwrap();
        validate_parent_cgroup("a/b-c").unwrap();
        for bad in ["", "/root", "a/../b", "a//b", "a/"] {
            assert!(validate_parent_cgroup(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn args_round_trip_shape() {
        let mut c = JailConfig::new("vm-1", "/bin/x", 10, 20);
        c.cgroups.push("pids.max=5".parse().unwrap());
        c.mounts.push("/k:/kernel".parse().unwrap());
        c.symlinks.push("/bin=usr/bin".parse().unwrap());
        c.new_pid_ns = true;
        c.mount_devpts = true;
        c.seccomp = Some(SeccompPolicy::Sandbox);
        c.args = vec!["--api-sock".into(), "/run/api.sock".into()];
        let joined = |c: &JailConfig| {
            c.to_args()
                .into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let args = joined(&c);
        assert!(args.starts_with("--id vm-1 --exec-file /bin/x --uid 10 --gid 20"));
        assert!(args.contains("--cgroup pids.max=5"));
        assert!(args.contains("--mount /k:/kernel:ro"));
        assert!(args.contains("--symlink /bin=usr/bin"));
        assert!(args.contains("--seccomp-policy sandbox"));
        assert!(args.ends_with("--new-pid-ns --mount-devpts -- --api-sock /run/api.sock"));
        c.seccomp = Some(SeccompPolicy::File("/etc/mvm/policy.json".into()));
        assert!(joined(&c).contains("--seccomp-filter /etc/mvm/policy.json"));
        // Checked with the rest of the configuration, before anything is made.
        let mut c = JailConfig::new("vm-1", std::env::current_exe().unwrap(), 10, 10);
        c.seccomp = Some(SeccompPolicy::File("/nonexistent/policy.json".into()));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.starts_with("invalid --seccomp-filter"), "{e}");
    }

    #[test]
    fn interpreters() {
        let dir = std::env::temp_dir().join(format!("jailer-interp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("s");
        std::fs::write(&script, "#!/bin/sh -e\necho\n").unwrap();
        let got = interpreter_of(&mut File::open(&script).unwrap()).unwrap();
        assert_eq!(got.as_deref(), Some("the script interpreter '/bin/sh -e'"));
        std::fs::write(
            &script,
            "plain text, long enough to fill an ELF header of sixty-four bytes",
        )
        .unwrap();
        interpreter_of(&mut File::open(&script).unwrap()).unwrap_err();
        // The test binary itself is static (workspace-wide crt-static): no interpreter.
        let me = std::env::current_exe().unwrap();
        assert_eq!(interpreter_of(&mut File::open(me).unwrap()).unwrap(), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
