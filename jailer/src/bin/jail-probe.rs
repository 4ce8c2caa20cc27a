//! jail-probe: a static test program run inside a jail by the jailer's tests and benchmark. It
//! reports, as `key=value` lines, what it can see and do, or exercises one limit.
//!
//! Usage: `jail-probe report [--write PATH]... | memhog MIB | forkbomb N | fsize BYTES ignore|signal
//! | nofile | seccomp | syscalls | pty | ptys | pause | stamp | connflood SOCKET N | true`.

use std::collections::BTreeMap;
use std::io::{Error, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::process::ExitCode;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

fn errno_name(e: &Error) -> String {
    let name = match e.raw_os_error() {
        Some(libc::EPERM) => "EPERM",
        Some(libc::EACCES) => "EACCES",
        Some(libc::ENOENT) => "ENOENT",
        Some(libc::EAGAIN) => "EAGAIN",
        Some(libc::EMFILE) => "EMFILE",
        Some(libc::EFBIG) => "EFBIG",
        Some(libc::EROFS) => "EROFS",
        Some(libc::EINVAL) => "EINVAL",
        Some(libc::ENOSYS) => "ENOSYS",
        Some(libc::ESRCH) => "ESRCH",
        Some(libc::ENOSPC) => "ENOSPC",
        _ => return format!("errno{}", e.raw_os_error().unwrap_or(0)),
    };
    name.to_string()
}

/// `ok` when the call returned >= 0, else the errno name.
fn outcome(ret: i64) -> String {
    if ret >= 0 {
        "ok".into()
    } else {
        errno_name(&Error::last_os_error())
    }
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "unavailable".into())
}

/// The names in `dir`, sorted and comma-separated (empty when it cannot be read).
fn sorted_entries(dir: &str) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.join(",")
}

/// The open file descriptors, comma-separated, found with fcntl (no /proc needed, and nothing
/// is opened to look).
fn open_fds() -> String {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out-pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    let highest = limit.rlim_cur.min(1 << 20) as libc::c_int;
    (0..highest)
        // SAFETY: F_GETFD only reads the flags of the descriptor number, open or not.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1)
        .map(|fd| fd.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

fn report(write_paths: &[String]) -> BTreeMap<&'static str, String> {
    let mut r = BTreeMap::new();
    // First, before the checks below open anything.
    r.insert("fds", open_fds());
    r.insert(
        "env_vars",
        std::env::vars_os()
            .map(|(k, _)| k.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(","),
    );
    r.insert(
        "ipc_ns",
        std::fs::read_link("/proc/self/ns/ipc")
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| errno_name(&e)),
    );
    // SAFETY: every libc call in this block is a plain syscall with integer arguments or
    // valid, NUL-terminated strings and buffers that outlive the call.
    unsafe {
        r.insert("uid", format!("{}/{}", libc::getuid(), libc::geteuid()));
        r.insert("gid", format!("{}/{}", libc::getgid(), libc::getegid()));
        r.insert(
            "groups",
            libc::getgroups(0, std::ptr::null_mut()).to_string(),
        );
        r.insert(
            "no_new_privs",
            libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0).to_string(),
        );
        let bounding = (0..64)
            .filter(|&c| libc::prctl(libc::PR_CAPBSET_READ, c, 0, 0, 0) == 1)
            .count();
        r.insert("bounding_caps", bounding.to_string());
        r.insert("pid", libc::getpid().to_string());
        r.insert(
            "ptrace_parent",
            outcome(libc::ptrace(libc::PTRACE_ATTACH, libc::getppid(), 0, 0)),
        );
        r.insert(
            "mount_tmpfs",
            outcome(libc::mount(
                c"none".as_ptr(),
                c"/run".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            ) as i64),
        );
        r.insert(
            "raw_socket",
            outcome(libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) as i64),
        );
        r.insert(
            "packet_socket",
            outcome(libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) as i64),
        );
        r.insert(
            "init_module",
            outcome(libc::syscall(
                libc::SYS_init_module,
                std::ptr::null::<u8>(),
                0,
                c"".as_ptr(),
            )),
        );
        r.insert("chroot", outcome(libc::chroot(c"/run".as_ptr()) as i64));
        r.insert("setuid0", outcome(libc::setuid(0) as i64));
        r.insert(
            "mknod",
            outcome(libc::mknod(
                c"/run/null".as_ptr(),
                libc::S_IFCHR | 0o600,
                libc::makedev(1, 3),
            ) as i64),
        );
        r.insert(
            "kvm_open",
            outcome(libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) as i64),
        );
        let mut host = [0u8; 65];
        libc::gethostname(host.as_mut_ptr().cast(), host.len() - 1);
        let end = host.iter().position(|&b| b == 0).unwrap_or(0);
        r.insert(
            "hostname",
            String::from_utf8_lossy(&host[..end]).into_owned(),
        );
        let ifs = libc::if_nameindex();
        let mut names = Vec::new();
        if !ifs.is_null() {
            let mut p = ifs;
            while (*p).if_index != 0 {
                names.push(
                    std::ffi::CStr::from_ptr((*p).if_name)
                        .to_string_lossy()
                        .into_owned(),
                );
                p = p.add(1);
            }
            libc::if_freenameindex(ifs);
        }
        r.insert("interfaces", names.join(","));
        for (key, res) in [
            ("rlimit_nofile", libc::RLIMIT_NOFILE),
            ("rlimit_fsize", libc::RLIMIT_FSIZE),
            ("rlimit_nproc", libc::RLIMIT_NPROC),
        ] {
            let mut l = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(res, &mut l);
            r.insert(
                key,
                if l.rlim_cur == libc::RLIM_INFINITY {
                    "unlimited".into()
                } else {
                    l.rlim_cur.to_string()
                },
            );
        }
    }
    r.insert("root_entries", sorted_entries("/"));
    r.insert("userfaultfd_dev", userfaultfd_dev());
    r.insert(
        "host_passwd",
        std::path::Path::new("/etc/passwd").exists().to_string(),
    );
    let same = |a: &str, b: &str| match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.ino() == y.ino() && x.dev() == y.dev(),
        _ => false,
    };
    r.insert("dotdot_is_root", same("/..", "/").to_string());
    r.insert(
        "dotdot_passwd",
        std::path::Path::new("/../../../../etc/passwd")
            .exists()
            .to_string(),
    );
    r.insert(
        "proc_root_passwd",
        (std::path::Path::new("/proc/self/root/etc/passwd").exists()
            || std::path::Path::new("/proc/1/root/etc/passwd").exists())
        .to_string(),
    );
    r.insert(
        "proc_self_root",
        std::fs::read_link("/proc/self/root")
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| errno_name(&e)),
    );
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort();
    r.insert(
        "proc_pids",
        pids.iter()
            .map(u32::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    for (key, field) in [
        ("cap_eff", "CapEff:"),
        ("cap_prm", "CapPrm:"),
        ("cap_bnd", "CapBnd:"),
        ("cap_inh", "CapInh:"),
        ("cap_amb", "CapAmb:"),
        ("status_no_new_privs", "NoNewPrivs:"),
        ("seccomp_mode", "Seccomp:"),
    ] {
        r.insert(key, status_field(&status, field));
    }
    r.insert(
        "cgroup",
        std::fs::read_to_string("/proc/self/cgroup")
            .unwrap_or_default()
            .trim()
            .replace('\n', ";"),
    );
    r.insert(
        "write_root",
        std::fs::write("/probe-file", b"x")
            .map(|_| "ok".into())
            .unwrap_or_else(|e| errno_name(&e)),
    );
    r.insert(
        "write_run",
        std::fs::write("/run/probe-file", b"x")
            .map(|_| "ok".into())
            .unwrap_or_else(|e| errno_name(&e)),
    );
    r.insert(
        "exec_ino",
        std::fs::metadata(std::env::args().next().unwrap_or_default())
            .map(|m| m.ino().to_string())
            .unwrap_or_else(|e| errno_name(&e)),
    );
    r.insert(
        "write_exec_copy",
        std::fs::OpenOptions::new()
            .append(true)
            .open(std::env::args().next().unwrap_or_default())
            .map(|_| "ok".into())
            .unwrap_or_else(|e| errno_name(&e)),
    );
    let writes: Vec<String> = write_paths
        .iter()
        .map(|p| {
            format!(
                "{p}:{}",
                std::fs::write(p, b"x")
                    .map(|_| "ok".into())
                    .unwrap_or_else(|e| errno_name(&e))
            )
        })
        .collect();
    r.insert("writes", writes.join(","));
    let reads: Vec<String> = write_paths
        .iter()
        .filter_map(|p| std::path::Path::new(p).parent())
        .map(|d| {
            format!(
                "{}:{}",
                d.display(),
                std::fs::read_dir(d)
                    .map(|_| "ok".into())
                    .unwrap_or_else(|e| errno_name(&e))
            )
        })
        .collect();
    r.insert("reads", reads.join(","));
    r
}

fn memhog(mib: usize) -> ExitCode {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    for i in 1..=mib {
        chunks.push(vec![0xa5; 1 << 20]);
        if i % 8 == 0 {
            println!("allocated_mib={i}");
            let _ = std::io::stdout().flush();
        }
    }
    println!("memhog_survived={mib}");
    ExitCode::SUCCESS
}

fn forkbomb(n: usize) -> ExitCode {
    let mut children = Vec::new();
    let mut error = String::from("none");
    for _ in 0..n {
        // SAFETY: single-threaded; the child only calls async-signal-safe pause/_exit.
        match unsafe { libc::fork() } {
            -1 => {
                error = errno_name(&Error::last_os_error());
                break;
            }
            0 => unsafe {
                // SAFETY: see above.
                libc::pause();
                libc::_exit(0)
            },
            pid => children.push(pid),
        }
    }
    println!("forked={}", children.len());
    println!("fork_error={error}");
    for pid in &children {
        // SAFETY: our own children.
        unsafe {
            libc::kill(*pid, libc::SIGKILL);
            libc::waitpid(*pid, std::ptr::null_mut(), 0);
        }
    }
    ExitCode::SUCCESS
}

fn fsize(bytes: usize, ignore_signal: bool) -> ExitCode {
    if ignore_signal {
        // SAFETY: setting SIG_IGN for SIGXFSZ is always valid.
        unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    }
    let mut f = match std::fs::File::create("/run/big") {
        Ok(f) => f,
        Err(e) => {
            println!("create_error={}", errno_name(&e));
            return ExitCode::FAILURE;
        }
    };
    let buf = vec![0u8; bytes];
    let mut written = 0;
    let mut error = String::from("none");
    while written < bytes {
        match f.write(&buf[written..]) {
            Ok(n) => written += n,
            Err(e) => {
                error = errno_name(&e);
                break;
            }
        }
    }
    println!("written={written}");
    println!("write_error={error}");
    ExitCode::SUCCESS
}

fn nofile() -> ExitCode {
    let mut opened = Vec::new();
    let error = loop {
        match std::fs::File::open("/dev/urandom") {
            Ok(f) => opened.push(f),
            Err(e) => break errno_name(&e),
        }
        if opened.len() > 1_000_000 {
            break "none".into();
        }
    };
    println!("opened={}", opened.len());
    println!("open_error={error}");
    ExitCode::SUCCESS
}

fn seccomp() -> ExitCode {
    // Allow list: only what the lines below need. getpid is not on it.
    let allowed = [
        libc::SYS_write,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
    ];
    let rules = allowed.iter().map(|&nr| (nr, Vec::new())).collect();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from);
    let program = match filter {
        Ok(p) => p,
        Err(e) => {
            println!("filter_error={e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = seccompiler::apply_filter(&program) {
        println!("filter_error={e}");
        return ExitCode::FAILURE;
    }
    let msg = b"filter_installed=1\n";
    // SAFETY: write(2) of a valid buffer to stdout, then a raw getpid.
    unsafe {
        libc::write(1, msg.as_ptr().cast(), msg.len());
        libc::syscall(libc::SYS_getpid);
    }
    let survived = b"survived_forbidden_syscall=1\n";
    // SAFETY: as above.
    unsafe { libc::write(1, survived.as_ptr().cast(), survived.len()) };
    ExitCode::FAILURE
}

/// Runs `call` in a forked child, so that what it changes (a new namespace, a tracee) stays
/// there, and returns its outcome: `ok` or the errno name.
fn in_child(call: impl FnOnce() -> i64) -> String {
    // SAFETY: the probe is single-threaded here; the child makes one syscall and leaves.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = if call() >= 0 {
            0
        } else {
            Error::last_os_error().raw_os_error().unwrap_or(255)
        };
        // SAFETY: leaves the child without running the probe's destructors.
        unsafe { libc::_exit(code.min(255)) };
    }
    wait_outcome(pid)
}

/// Reaps child `pid` (or reports why there is none): `ok` for exit 0, else the errno name of
/// its exit code.
fn wait_outcome(pid: libc::pid_t) -> String {
    if pid < 0 {
        return errno_name(&Error::last_os_error());
    }
    let mut status = 0;
    // SAFETY: waits for our own child with a valid out-pointer.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    match libc::WEXITSTATUS(status) {
        0 => "ok".into(),
        errno => errno_name(&Error::from_raw_os_error(errno)),
    }
}

/// Reaps the child of a fork-like clone: the child (return value 0) leaves at once.
fn clone_outcome(ret: i64) -> String {
    if ret == 0 {
        // SAFETY: the new child leaves without running the probe's destructors.
        unsafe { libc::_exit(0) };
    }
    if ret < 0 {
        return errno_name(&Error::last_os_error());
    }
    wait_outcome(ret as libc::pid_t)
}

/// What the syscalls a sandbox policy must refuse (and the ones it must keep) do here.
fn syscalls() -> BTreeMap<&'static str, String> {
    const UFFD_USER_MODE_ONLY: i64 = 1;
    const KEYCTL_GET_KEYRING_ID: i64 = 0;
    const KEY_SPEC_SESSION_KEYRING: i64 = -3;
    const PER_LINUX: libc::c_ulong = 0;
    const ADDR_NO_RANDOMIZE: libc::c_ulong = 0x0040000;
    let mut r = BTreeMap::new();
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    r.insert("seccomp_mode", status_field(&status, "Seccomp:"));
    r.insert("seccomp_filters", status_field(&status, "Seccomp_filters:"));
    // SAFETY: every call in this block is a raw syscall with integer arguments or pointers to
    // live, properly sized locals; children of fork-like calls leave at once.
    unsafe {
        r.insert(
            "unshare_user",
            in_child(|| libc::unshare(libc::CLONE_NEWUSER) as i64),
        );
        r.insert(
            "unshare_net",
            in_child(|| libc::unshare(libc::CLONE_NEWNET) as i64),
        );
        r.insert(
            "clone_newuser",
            clone_outcome(libc::syscall(
                libc::SYS_clone,
                libc::CLONE_NEWUSER | libc::SIGCHLD,
                0,
                0,
                0,
                0,
            )),
        );
        let mut args = [0u64; 11];
        args[4] = libc::SIGCHLD as u64; // exit_signal
        r.insert(
            "clone3",
            clone_outcome(libc::syscall(
                libc::SYS_clone3,
                args.as_mut_ptr(),
                std::mem::size_of_val(&args),
            )),
        );
        r.insert(
            "setns",
            outcome(libc::setns(
                libc::open(
                    c"/proc/self/ns/uts".as_ptr(),
                    libc::O_RDONLY | libc::O_CLOEXEC,
                ),
                0,
            ) as i64),
        );
        r.insert(
            "keyctl",
            outcome(libc::syscall(
                libc::SYS_keyctl,
                KEYCTL_GET_KEYRING_ID,
                KEY_SPEC_SESSION_KEYRING,
                0,
            )),
        );
        let mut params = [0u8; 120];
        r.insert(
            "io_uring_setup",
            outcome(libc::syscall(
                libc::SYS_io_uring_setup,
                1,
                params.as_mut_ptr(),
            )),
        );
        let mut attr = [0u32; 32];
        attr[0] = 2; // BPF_MAP_TYPE_ARRAY
        attr[1] = 4; // key_size
        attr[2] = 4; // value_size
        attr[3] = 1; // max_entries
        r.insert(
            "bpf",
            outcome(libc::syscall(
                libc::SYS_bpf,
                0, // BPF_MAP_CREATE
                attr.as_mut_ptr(),
                std::mem::size_of_val(&attr),
            )),
        );
        r.insert(
            "userfaultfd",
            outcome(libc::syscall(
                libc::SYS_userfaultfd,
                UFFD_USER_MODE_ONLY | libc::O_CLOEXEC as i64,
            )),
        );
        r.insert(
            "mount",
            outcome(libc::mount(
                c"none".as_ptr(),
                c"/run".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            ) as i64),
        );
        // A child of our own, which the kernel alone would let us trace.
        let child = libc::fork();
        if child == 0 {
            libc::pause();
            libc::_exit(0);
        }
        r.insert(
            "ptrace",
            outcome(libc::ptrace(libc::PTRACE_ATTACH, child, 0, 0)),
        );
        let mut word = 0u64;
        let local = libc::iovec {
            iov_base: (&mut word as *mut u64).cast(),
            iov_len: 8,
        };
        let remote = libc::iovec {
            iov_base: (&word as *const u64).cast_mut().cast(),
            iov_len: 8,
        };
        r.insert(
            "process_vm_readv",
            outcome(libc::process_vm_readv(child, &local, 1, &remote, 1, 0) as i64),
        );
        libc::kill(child, libc::SIGKILL);
        libc::waitpid(child, std::ptr::null_mut(), 0);
        r.insert(
            "personality_linux",
            outcome(libc::personality(PER_LINUX) as i64),
        );
        r.insert(
            "personality_norandom",
            outcome(libc::personality(ADDR_NO_RANDOMIZE) as i64),
        );
        r.insert("fork", in_child(|| 0));
    }
    r.insert(
        "thread",
        match std::thread::spawn(|| 7).join() {
            Ok(7) => "ok".into(),
            _ => "failed".into(),
        },
    );
    r.insert(
        "exec",
        match std::process::Command::new(std::env::args().next().unwrap_or_default())
            .arg("true")
            .status()
        {
            Ok(s) if s.success() => "ok".into(),
            Ok(s) => format!("{s}"),
            Err(e) => errno_name(&e),
        },
    );
    r
}

/// Opens a pty master on /dev/ptmx, unlocked, or the errno name.
fn open_pty_master() -> Result<std::os::fd::OwnedFd, String> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall wrappers with integer arguments; the fd is checked before use.
    unsafe {
        let fd = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(errno_name(&Error::last_os_error()));
        }
        let master = std::os::fd::OwnedFd::from_raw_fd(fd);
        if libc::grantpt(fd) != 0 || libc::unlockpt(fd) != 0 {
            return Err(errno_name(&Error::last_os_error()));
        }
        Ok(master)
    }
}

/// What a process in the jail gets from /dev/ptmx and /dev/pts.
fn pty() -> BTreeMap<&'static str, String> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::PermissionsExt;
    let mut r = BTreeMap::new();
    r.insert(
        "ptmx_link",
        std::fs::read_link("/dev/ptmx")
            .map(|p| p.display().to_string())
            .unwrap_or_else(|e| errno_name(&e)),
    );
    let pts_dev = std::fs::metadata("/dev/pts").map(|m| m.dev());
    r.insert(
        "pts_dev",
        pts_dev.map_or_else(
            |e| errno_name(&e),
            |d| format!("{}:{}", libc::major(d), libc::minor(d)),
        ),
    );
    let master = match open_pty_master() {
        Ok(m) => m,
        Err(e) => {
            r.insert("ptmx_open", e);
            return r;
        }
    };
    r.insert("ptmx_open", "ok".into());
    let mut number: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes one unsigned int to the pointer, which refers to a live local.
    let ret = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut number) };
    r.insert(
        "pty_number",
        if ret == 0 {
            number.to_string()
        } else {
            outcome(-1)
        },
    );
    let slave_path = format!("/dev/pts/{number}");
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&slave_path)
    {
        Ok(mut slave) => {
            r.insert("slave_open", "ok".into());
            // SAFETY: isatty takes a plain fd.
            let tty = unsafe { libc::isatty(slave.as_raw_fd()) } == 1;
            r.insert("slave_isatty", tty.to_string());
            if let Ok(m) = slave.metadata() {
                r.insert(
                    "slave_owner",
                    format!(
                        "{}/{}/{:o}",
                        m.uid(),
                        m.gid(),
                        m.permissions().mode() & 0o7777
                    ),
                );
            }
            // Through the line discipline: the master reads what the slave wrote, with the
            // newline mapped to CR-LF (onlcr).
            let echo = slave.write_all(b"ping\n").and_then(|()| {
                let mut got = [0u8; 16];
                let n = std::fs::File::from(master.try_clone()?).read(&mut got)?;
                Ok(String::from_utf8_lossy(&got[..n]).into_owned())
            });
            r.insert(
                "pty_echo",
                match echo {
                    Ok(s) if s == "ping\r\n" => "ok".into(),
                    Ok(s) => format!("{s:?}"),
                    Err(e) => errno_name(&e),
                },
            );
        }
        Err(e) => {
            r.insert("slave_open", errno_name(&e));
        }
    }
    r.insert("pts_entries", sorted_entries("/dev/pts"));
    r
}

/// Opens ptys until the jail's devpts instance refuses one.
fn ptys() -> ExitCode {
    let mut opened = Vec::new();
    let error = loop {
        match open_pty_master() {
            Ok(m) => opened.push(m),
            Err(e) => break e,
        }
        if opened.len() > 100_000 {
            break "none".into();
        }
    };
    println!("ptys_opened={}", opened.len());
    println!("ptys_error={error}");
    ExitCode::SUCCESS
}

/// Connects `n` times to the unix socket `path`, each time sending a malformed frame and
/// reading until the peer closes: makes a server that logs bad peers log `n` times.
fn connflood(path: &str, n: usize) -> ExitCode {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let mut done = 0;
    for _ in 0..n {
        let Ok(mut s) = UnixStream::connect(path) else {
            break;
        };
        let _ = s.write_all(&[0xff; 8]);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let _ = s.read_to_end(&mut Vec::new());
        done += 1;
    }
    println!("connections={done}");
    ExitCode::SUCCESS
}

fn print_report(r: BTreeMap<&'static str, String>) -> ExitCode {
    for (k, v) in r {
        println!("{k}={v}");
    }
    ExitCode::SUCCESS
}

/// A userfaultfd made through `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`): `ok`, or the errno
/// of the open or the ioctl (`ENOENT`: no node in the jail).
fn userfaultfd_dev() -> String {
    use std::os::fd::AsRawFd;
    /// `_IO(0xAA, 0x00)`.
    const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xAA00;
    let dev = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
    {
        Ok(f) => f,
        Err(e) => return errno_name(&e),
    };
    // SAFETY: an ioctl with an integer argument on a descriptor we own; the new descriptor
    // it returns is closed at once.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, libc::O_CLOEXEC) };
    if fd < 0 {
        return errno_name(&std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by the kernel and is ours.
    unsafe { libc::close(fd) };
    "ok".into()
}

fn usage() -> ExitCode {
    eprintln!("usage: jail-probe report [--write PATH]... | memhog MIB | forkbomb N | fsize BYTES ignore|signal | nofile | seccomp | syscalls | pty | ptys | pause | stamp | connflood SOCKET N | true");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let num = |i: usize| args.get(i).and_then(|s| s.parse::<usize>().ok());
    match args.first().map(String::as_str) {
        Some("report") => {
            let writes: Vec<String> = args[1..]
                .chunks(2)
                .filter(|c| c[0] == "--write" && c.len() == 2)
                .map(|c| c[1].clone())
                .collect();
            print_report(report(&writes))
        }
        Some("memhog") => num(1).map_or_else(usage, memhog),
        Some("forkbomb") => num(1).map_or_else(usage, forkbomb),
        Some("fsize") => match (num(1), args.get(2).map(String::as_str)) {
            (Some(n), Some("ignore")) => fsize(n, true),
            (Some(n), Some("signal")) => fsize(n, false),
            _ => usage(),
        },
        Some("nofile") => nofile(),
        Some("seccomp") => seccomp(),
        Some("syscalls") => print_report(syscalls()),
        Some("pty") => print_report(pty()),
        Some("ptys") => ptys(),
        Some("connflood") => match (args.get(1), num(2)) {
            (Some(path), Some(n)) => connflood(path, n),
            _ => usage(),
        },
        Some("true") => ExitCode::SUCCESS,
        Some("stamp") => {
            let mut ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `ts` is a valid out-pointer.
            unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
            println!(
                "monotonic_ns={}",
                ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
            );
            ExitCode::SUCCESS
        }
        Some("pause") => {
            println!("paused=1");
            let _ = std::io::stdout().flush();
            // SAFETY: pause has no arguments; the probe waits here until a signal kills it.
            unsafe { libc::pause() };
            ExitCode::SUCCESS
        }
        _ => usage(),
    }
}
