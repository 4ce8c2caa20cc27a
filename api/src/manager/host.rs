//! Host plumbing of the manager: tier availability, cgroup v1 files, process reaping, mounts,
//! network namespaces and helper commands.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Cgroup v1 controllers every sandbox gets.
pub const CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];

/// Mount point of the first mount of type `fstype` whose super options satisfy `opts`.
fn find_mount(fstype: &str, opts: impl Fn(&str) -> bool) -> Option<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut r = right.split(' ');
        if r.next()? != fstype {
            return None;
        }
        let super_opts = r.nth(1)?;
        let mount_point = left.split(' ').nth(4)?;
        opts(super_opts).then(|| PathBuf::from(mount_point))
    })
}

/// Mount point of the v1 hierarchy carrying `controller`.
pub fn cgroup_mount(controller: &str) -> Option<PathBuf> {
    find_mount("cgroup", |opts| opts.split(',').any(|o| o == controller))
}

/// Mount point of the unified (cgroup2) hierarchy.
fn unified_mount() -> Option<PathBuf> {
    find_mount("cgroup2", |_| true)
}

/// `<mount of controller>/<parent>/<id>`.
pub fn cgroup_dir(controller: &str, parent: &str, id: &str) -> Option<PathBuf> {
    cgroup_mount(controller).map(|m| m.join(parent).join(id))
}

fn read_u64(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// (cpu ns, memory bytes, pids) of the sandbox's cgroups.
pub fn cgroup_usage(parent: &str, id: &str) -> (u64, u64, u64) {
    let file = |c: &str, f: &str| {
        cgroup_dir(c, parent, id)
            .map(|d| read_u64(&d.join(f)))
            .unwrap_or(0)
    };
    (
        file("cpuacct", "cpuacct.usage"),
        file("memory", "memory.usage_in_bytes"),
        file("pids", "pids.current"),
    )
}

/// A CFS bandwidth limit: `quota_us` of CPU time in every `period_us`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuQuota {
    /// CPU time per period, µs.
    pub quota_us: u64,
    /// Length of the period, µs.
    pub period_us: u64,
}

/// The cgroups that hold a sandbox's memory and CPU limits and count its OOM kills: on the
/// legacy hierarchies where the sandbox has a memory cgroup there, else on the unified one.
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
        if let (Some(memory), Some(cpu)) = (
            cgroup_dir("memory", parent, id),
            cgroup_dir("cpu", parent, id),
        ) {
            if memory.is_dir() && cpu.is_dir() {
                return Ok(LimitCgroups::V1 { memory, cpu });
            }
        }
        if let Some(dir) = unified_mount().map(|m| m.join(parent).join(id)) {
            if dir.join("memory.max").is_file() && dir.join("cpu.max").is_file() {
                return Ok(LimitCgroups::V2(dir));
            }
        }
        Err(Error::NotFound(format!(
            "sandbox {id} has no memory and cpu cgroups under {parent:?} (neither cgroup v1 nor \
             v2); it is not running on this host"
        )))
    }

    /// Sets the memory limit (v1 `memory.limit_in_bytes`, v2 `memory.max`), swap staying off
    /// as the jailer set it: v1's memory+swap limit (where swap is accounted) moves with it,
    /// v2's `memory.swap.max` stays 0. v1 refuses a limit below what the sandbox uses and
    /// cannot reclaim; v2 reclaims and OOM-kills instead.
    pub fn set_memory_limit(&self, bytes: u64) -> Result<()> {
        let files = match self {
            LimitCgroups::V1 { memory, .. } => {
                let limit = memory.join("memory.limit_in_bytes");
                let memsw = memory.join("memory.memsw.limit_in_bytes");
                if !memsw.exists() {
                    vec![limit]
                } else if bytes > read_u64(&limit) {
                    // The kernel refuses memsw < memory at every step.
                    vec![memsw, limit]
                } else {
                    vec![limit, memsw]
                }
            }
            LimitCgroups::V2(dir) => vec![dir.join("memory.max")],
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
        let writes = match self {
            LimitCgroups::V1 { cpu, .. } => vec![
                (cpu.join("cpu.cfs_period_us"), q.period_us.to_string()),
                (cpu.join("cpu.cfs_quota_us"), q.quota_us.to_string()),
            ],
            LimitCgroups::V2(dir) => {
                vec![(
                    dir.join("cpu.max"),
                    format!("{} {}", q.quota_us, q.period_us),
                )]
            }
        };
        for (file, value) in writes {
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
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
            .ok_or_else(|| {
                Error::Host(format!(
                    "{} has no oom_kill counter (it needs Linux 4.13 or later)",
                    file.display()
                ))
            })
    }
}

/// Pids in any of the sandbox's cgroups.
pub fn cgroup_pids(parent: &str, id: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = CONTROLLERS
        .iter()
        .filter_map(|c| cgroup_dir(c, parent, id))
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

/// Freezes (`true`) or thaws the sandbox's freezer cgroup and waits until it is done.
pub fn set_frozen(parent: &str, id: &str, frozen: bool) -> Result<()> {
    let dir = cgroup_dir("freezer", parent, id)
        .ok_or_else(|| Error::Host("no freezer cgroup hierarchy is mounted".into()))?;
    let state = dir.join("freezer.state");
    let want = if frozen { "FROZEN" } else { "THAWED" };
    std::fs::write(&state, want)
        .map_err(|e| Error::host(format!("writing {}", state.display()), e))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = std::fs::read_to_string(&state).unwrap_or_default();
        if now.trim() == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(Error::Host(format!(
                "{} stays {} instead of {want}",
                state.display(),
                now.trim()
            )));
        }
        if frozen {
            // FREEZING: writing again retries tasks that could not be frozen yet.
            let _ = std::fs::write(&state, want);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// SIGKILLs every process of sandbox `id` until none is left for two consecutive scans,
/// thawing a frozen sandbox first: everything in its cgroups, plus its jailer. Pass the
/// jailer's pid only for a sandbox that finished starting (its jail processes are all in the
/// cgroups then); otherwise /proc is scanned for jailer processes and their forks.
pub fn kill_all(parent: &str, id: &str, jailer: Option<i32>) -> Result<()> {
    if let Some(dir) = cgroup_dir("freezer", parent, id) {
        if dir.exists() {
            let _ = std::fs::write(dir.join("freezer.state"), "THAWED");
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
            quiet += 1;
        } else {
            quiet = 0;
            for pid in pids {
                // SAFETY: kill takes plain integers; a pid that just exited yields ESRCH.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if Instant::now() > deadline {
            return Err(Error::Host(format!(
                "processes of sandbox {id} survive SIGKILL for 10 s (stuck in the kernel?)"
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

    #[test]
    fn run_reports_stderr() {
        let e = run("sh", &["-c", "echo oops >&2; exit 3"], None).unwrap_err();
        assert!(e.to_string().contains("oops"), "{e}");
        assert_eq!(run("cat", &[], Some("hi")).unwrap(), "hi");
    }
}
