//! Host plumbing of the manager: tier availability, processes, mounts, network namespaces and
//! helper commands (cgroups are in [`super::cgroups`]).

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

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

/// Pids of `mvm-jailer` processes (and their not-yet-exec'd forks) started for jail `id`.
pub fn jailer_pids(id: &str) -> Vec<i32> {
    pids_of("mvm-jailer", "--id", id)
}

/// Pids of the processes whose program name ends with `program` and whose arguments hold
/// `flag value`.
pub fn pids_of(program: &str, flag: &str, value: &str) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first()
                .is_some_and(|a0| a0.ends_with(program.as_bytes()))
                && args
                    .windows(2)
                    .any(|w| w[0] == flag.as_bytes() && w[1] == value.as_bytes())
        })
        .collect()
}

/// mount(2); the error names the mount.
pub fn mount(
    src: &Path,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    mvm_sys::mount::mount(Some(src), target, fstype, flags, data).map_err(Error::from)
}

/// Detaches whatever is mounted on `target`; nothing mounted is not an error.
pub fn umount(target: &Path) -> Result<()> {
    match mvm_sys::mount::umount(target, libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.source.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => Ok(()),
        Err(e) => Err(e.into()),
    }
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
    interface_up("lo", None)
}

/// Whether this host runs two threads at once (more than one CPU for this process): only
/// then do independent steps of a create gain by running side by side.
pub fn parallel() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
}

/// Runs `work` on a thread of its own scheduled as background work (`SCHED_IDLE`: it runs
/// only where nothing else wants the CPU), as are the processes and threads it starts; a
/// helper that outlives it sets itself back with [`normal_priority`].
pub fn in_background<T: Send>(work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                set_policy(libc::SCHED_IDLE)
                    .map_err(|e| Error::host("scheduling background work (SCHED_IDLE)", e))?;
                work()
            })
            .join()
            .unwrap_or_else(|_| Err(Error::Host("background work panicked".into())))
    })
}

/// Schedules the calling thread as normal work (`SCHED_OTHER`): a long-lived helper's first
/// step, so that one started by background work ([`in_background`]) does not stay there.
/// Async-signal-safe (one system call), for `pre_exec`.
pub fn normal_priority() -> std::io::Result<()> {
    set_policy(libc::SCHED_OTHER)
}

/// Sets the calling thread's scheduling policy (priority 0, as both policies take).
fn set_policy(policy: libc::c_int) -> std::io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sched_setscheduler(2) on the calling thread (pid 0) with a valid sched_param
    // that outlives the call.
    match unsafe { libc::sched_setscheduler(0, policy, &param) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// Gives interface `name` of the calling thread's network namespace the IPv4 `address`
/// (with its prefix length; the kernel adds the prefix's route) and brings it up, by ioctls
/// (no `ip` process on a create's path).
pub fn interface_up(name: &str, address: Option<(std::net::Ipv4Addr, u8)>) -> std::io::Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{name:?} is not an interface name"),
        ));
    }
    // SAFETY: plain socket call; the descriptor is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    let request = || {
        // SAFETY: ifreq is plain data; zeroed is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        req
    };
    let ioctl = |op: libc::Ioctl, req: &mut libc::ifreq| {
        // SAFETY: `req` is a valid ifreq for `op` on our socket, named and filled as `op` needs.
        match unsafe { libc::ioctl(socket.as_raw_fd(), op, req as *mut libc::ifreq) } {
            -1 => Err(std::io::Error::last_os_error()),
            _ => Ok(()),
        }
    };
    if let Some((address, prefix_len)) = address {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix_len.min(32)))
            .unwrap_or(0);
        for (op, value) in [
            (libc::SIOCSIFADDR, u32::from(address)),
            (libc::SIOCSIFNETMASK, mask),
        ] {
            let mut req = request();
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: value.to_be(),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: the ifreq's address member is a 16-byte sockaddr, the size of a
            // sockaddr_in, which the kernel reads for these requests.
            unsafe {
                std::ptr::addr_of_mut!(req.ifr_ifru.ifru_addr)
                    .cast::<libc::sockaddr_in>()
                    .write_unaligned(sin)
            };
            ioctl(op, &mut req)?;
        }
    }
    let mut req = request();
    ioctl(libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl(libc::SIOCSIFFLAGS, &mut req)
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
    if let Some(m) = mvm_sys::mountinfo::mount_points_under(dir).first() {
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

    /// The processes background work starts run as SCHED_IDLE, unless set back with
    /// `normal_priority`; the caller's thread is untouched.
    #[test]
    fn background_work_and_its_processes_run_idle() {
        let policy = || run("sh", &["-c", "chrt -p $$"], None);
        let started = in_background(policy).unwrap();
        assert!(started.contains("SCHED_IDLE"), "{started}");
        let reset = in_background(|| {
            normal_priority().map_err(|e| Error::host("normal_priority", e))?;
            policy()
        })
        .unwrap();
        assert!(reset.contains("SCHED_OTHER"), "{reset}");
        let own = policy().unwrap();
        assert!(own.contains("SCHED_OTHER"), "{own}");
    }

    #[test]
    fn vm_tier_force_overrides() {
        assert_eq!(vm_tier_unavailable(true), None);
    }

    /// A veth in a namespace of the test's own gets its address, prefix route
    /// and the up flag as `ip` would give them.
    #[test]
    fn an_interface_gets_its_address_and_comes_up() {
        if !mvm_testkit::root_or_skip("an_interface_gets_its_address_and_comes_up") {
            return;
        }
        let shown = std::thread::spawn(|| {
            // SAFETY: unshare with a flag constant; it moves only this thread, which ends here.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            run(
                "ip",
                &["link", "add", "d0", "type", "veth", "peer", "name", "d1"],
                None,
            )
            .unwrap();
            interface_up("d0", Some(("10.1.2.1".parse().unwrap(), 30))).unwrap();
            let bad = interface_up("no-such-if", None).unwrap_err();
            assert_eq!(bad.raw_os_error(), Some(libc::ENODEV));
            [
                run("ip", &["-o", "-4", "addr", "show", "dev", "d0"], None).unwrap(),
                run("ip", &["-o", "link", "show", "dev", "d0"], None).unwrap(),
                run("ip", &["-4", "route", "show", "dev", "d0"], None).unwrap(),
            ]
        })
        .join()
        .unwrap();
        assert!(shown[0].contains("inet 10.1.2.1/30"), "{}", shown[0]);
        assert!(shown[1].contains(",UP"), "{}", shown[1]);
        assert!(shown[2].contains("10.1.2.0/30"), "{}", shown[2]);
    }

    #[test]
    fn run_reports_stderr() {
        let e = run("sh", &["-c", "echo oops >&2; exit 3"], None).unwrap_err();
        assert!(e.to_string().contains("oops"), "{e}");
        assert_eq!(run("cat", &[], Some("hi")).unwrap(), "hi");
    }
}
