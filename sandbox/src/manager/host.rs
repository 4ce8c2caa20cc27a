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

    #[test]
    fn vm_tier_force_overrides() {
        assert_eq!(vm_tier_unavailable(true), None);
    }

    #[test]
    fn run_reports_stderr() {
        let e = run("sh", &["-c", "echo oops >&2; exit 3"], None).unwrap_err();
        assert!(e.to_string().contains("oops"), "{e}");
        assert_eq!(run("cat", &[], Some("hi")).unwrap(), "hi");
    }
}
