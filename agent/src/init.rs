//! Init duties of the agent when it is the guest's PID 1: kernel command-line parameters,
//! the base file systems, the overlay root, hostname, network and power-off.
//!
//! Kernel command-line parameters read from `/proc/cmdline`:
//! - `mvm.overlay=tmpfs` or `mvm.overlay=/dev/vdb`: the read-only root becomes the lower
//!   layer of an overlay whose upper layer is a tmpfs or that ext4 disk.
//! - `mvm.root=/dev/vdb`: the writable ext4 disk becomes the root instead (a container's
//!   own file system); excludes `mvm.overlay`.
//! - `mvm.hostname=NAME`
//! - `mvm.ip=ADDR/PREFIX[,GATEWAY]`: IPv4 configuration of `eth0`.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::reboot::{reboot, RebootMode};

use crate::protocol::ShutdownAction;

/// Interface configured by `mvm.ip`.
pub const GUEST_INTERFACE: &str = "eth0";

/// How long [`power_down`] waits for the processes it killed to be gone.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// Set once this init has mounted the root itself ([`pivot_to_overlay`], [`pivot_to_disk`]):
/// only then does [`quiesce_file_systems`] remount `/` read-only (the kernel mounts the boot
/// image read-only, and a root it did not mount may be shared with someone else).
static OWN_ROOT: AtomicBool = AtomicBool::new(false);

/// The roots of file systems mounted by this init that no path reaches any more and that
/// [`quiesce_file_systems`] makes read-only: the overlay's upper disk, detached with the old
/// root by [`pivot_to_overlay`].
static DETACHED_DISKS: Mutex<Vec<OwnedFd>> = Mutex::new(Vec::new());

/// Errors of the init duties.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A kernel command-line parameter is malformed.
    #[error("kernel parameter {param}: {reason}")]
    BadParam {
        /// The parameter as written.
        param: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A system call failed.
    #[error("{what}: {source}")]
    Sys {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(nix::Error) -> InitError {
    let what = what.into();
    move |e| InitError::Sys {
        what,
        source: e.into(),
    }
}

fn sys_io(what: impl Into<String>) -> impl FnOnce(io::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Sys { what, source }
}

/// Upper layer of the overlay root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverlayUpper {
    /// A tmpfs: changes are lost when the VM stops.
    Tmpfs,
    /// An ext4 block device (the per-sandbox writable disk).
    Device(PathBuf),
}

/// IPv4 configuration of the guest interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpConfig {
    /// Interface address.
    pub address: Ipv4Addr,
    /// Prefix length (0..=32).
    pub prefix_len: u8,
    /// Default gateway.
    pub gateway: Option<Ipv4Addr>,
}

impl IpConfig {
    /// The netmask of `prefix_len`.
    pub fn netmask(&self) -> Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        Ipv4Addr::from(bits)
    }
}

/// The `mvm.*` parameters of the kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelParams {
    /// `mvm.overlay`.
    pub overlay: Option<OverlayUpper>,
    /// `mvm.root`.
    pub root: Option<PathBuf>,
    /// `mvm.hostname`.
    pub hostname: Option<String>,
    /// `mvm.ip`.
    pub ip: Option<IpConfig>,
}

/// Splits a kernel command line into parameters; double quotes group words (the kernel's
/// own rule), and are removed.
fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    params.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started {
        params.push(current);
    }
    params
}

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn parse_ip(value: &str) -> Result<IpConfig, String> {
    let (cidr, gateway) = match value.split_once(',') {
        Some((cidr, gw)) => (cidr, Some(gw)),
        None => (value, None),
    };
    let (addr, prefix) = cidr
        .split_once('/')
        .ok_or("expected ADDR/PREFIX[,GATEWAY]")?;
    let address: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
    let prefix_len: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("{prefix:?} is not a prefix length (0-32)"))?;
    let gateway = gateway
        .map(|gw| {
            gw.parse::<Ipv4Addr>()
                .map_err(|_| format!("{gw:?} is not an IPv4 gateway"))
        })
        .transpose()?;
    Ok(IpConfig {
        address,
        prefix_len,
        gateway,
    })
}

impl KernelParams {
    /// Parses the `mvm.*` parameters of `cmdline`; other parameters are ignored.
    pub fn parse(cmdline: &str) -> Result<Self, InitError> {
        let mut params = Self::default();
        for param in split_cmdline(cmdline) {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            let bad = |reason: String| InitError::BadParam {
                param: param.clone(),
                reason,
            };
            match key {
                "mvm.overlay" => {
                    params.overlay = Some(match value {
                        "tmpfs" => OverlayUpper::Tmpfs,
                        dev => OverlayUpper::Device(
                            device_path(dev)
                                .ok_or_else(|| bad("expected tmpfs or /dev/DEVICE".to_owned()))?,
                        ),
                    });
                }
                "mvm.root" => {
                    params.root = Some(
                        device_path(value).ok_or_else(|| bad("expected /dev/DEVICE".to_owned()))?,
                    );
                }
                "mvm.hostname" => {
                    if !valid_hostname(value) {
                        return Err(bad("not a valid host name".to_owned()));
                    }
                    params.hostname = Some(value.to_owned());
                }
                "mvm.ip" => params.ip = Some(parse_ip(value).map_err(bad)?),
                _ => {}
            }
        }
        if params.root.is_some() && params.overlay.is_some() {
            return Err(InitError::BadParam {
                param: "mvm.root".to_owned(),
                reason: "mvm.root and mvm.overlay exclude each other".to_owned(),
            });
        }
        Ok(params)
    }
}

/// `value` as a device path, when it names one under /dev.
fn device_path(value: &str) -> Option<PathBuf> {
    (value.starts_with("/dev/") && value.len() > 5).then(|| PathBuf::from(value))
}

/// True when `path` is the root of a mount (its device differs from its parent's).
fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(path), std::fs::metadata(path.join(".."))) {
        (Ok(me), Ok(parent)) => me.dev() != parent.dev() || me.ino() == parent.ino(),
        _ => false,
    }
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), InitError> {
    let target = Path::new(target);
    if is_mount_point(target) {
        return Ok(());
    }
    std::fs::create_dir_all(target).map_err(sys_io(format!("creating {}", target.display())))?;
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(sys(format!("mounting {fstype} on {}", target.display())))
}

/// Mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /tmp and /run (skipping those already
/// mounted).
pub fn mount_base() -> Result<(), InitError> {
    let nodev = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nodev, None)?;
    mount_fs("sysfs", "/sys", "sysfs", nodev, None)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    )?;
    mount_fs(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    )?;
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    )?;
    Ok(())
}

/// Makes `/` private and mounts a tmpfs on `staging` (an existing directory) to hold the
/// mount points of a new root; returns the directory to mount the new root on.
fn stage_new_root(staging: &Path) -> Result<PathBuf, InitError> {
    let none: Option<&str> = None;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(sys("making / private"))?;
    mount(
        Some("tmpfs"),
        staging,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0700"),
    )
    .map_err(sys(format!("mounting a tmpfs on {}", staging.display())))?;
    let new_root = staging.join("root");
    std::fs::create_dir(&new_root).map_err(sys_io(format!("creating {}", new_root.display())))?;
    Ok(new_root)
}

/// Mounts an overlay of `lower` (read-only) and `upper` (writable) and makes it the root
/// of this mount namespace. `staging` (an existing directory) gets a tmpfs holding the
/// mount points; it and the old root are detached afterwards. A persistent upper device
/// keeps its changes in `upper/` and `work/` at its top.
pub fn pivot_to_overlay(
    lower: &Path,
    upper: &OverlayUpper,
    staging: &Path,
) -> Result<(), InitError> {
    let none: Option<&str> = None;
    let new_root = stage_new_root(staging)?;
    let upper_mnt = staging.join("upper");
    std::fs::create_dir(&upper_mnt).map_err(sys_io(format!("creating {}", upper_mnt.display())))?;
    match upper {
        OverlayUpper::Tmpfs => mount(
            Some("tmpfs"),
            &upper_mnt,
            Some("tmpfs"),
            MsFlags::empty(),
            Some("mode=0755"),
        ),
        OverlayUpper::Device(dev) => mount(
            Some(dev.as_path()),
            &upper_mnt,
            Some("ext4"),
            MsFlags::MS_NOATIME,
            none,
        ),
    }
    .map_err(sys(format!("mounting the overlay upper layer {upper:?}")))?;
    // Held to make the disk read-only at power-down, when the detached mount has no path.
    let upper_disk = match upper {
        OverlayUpper::Device(_) => Some(
            std::fs::File::open(&upper_mnt)
                .map_err(sys_io(format!("opening {}", upper_mnt.display())))?,
        ),
        OverlayUpper::Tmpfs => None,
    };
    let upper_dir = upper_mnt.join("upper");
    let work_dir = upper_mnt.join("work");
    for dir in [&upper_dir, &work_dir] {
        match std::fs::create_dir(dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(sys_io(format!("creating {}", dir.display()))(e)),
        }
    }
    let options = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper_dir.display(),
        work_dir.display()
    );
    mount(
        Some("overlay"),
        &new_root,
        Some("overlay"),
        MsFlags::empty(),
        Some(options.as_str()),
    )
    .map_err(sys(format!("mounting overlay {options}")))?;
    enter_new_root(&new_root)?;
    if let Some(disk) = upper_disk {
        DETACHED_DISKS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(disk.into());
    }
    Ok(())
}

/// Makes the ext4 file system on `device` (writable) the root of this mount namespace: a
/// container's own root file system, in place of the image the agent booted from. The agent
/// keeps running from memory; `staging` is used as by [`pivot_to_overlay`].
pub fn pivot_to_disk(device: &Path, staging: &Path) -> Result<(), InitError> {
    let new_root = stage_new_root(staging)?;
    mount(
        Some(device),
        &new_root,
        Some("ext4"),
        MsFlags::MS_NOATIME,
        None::<&str>,
    )
    .map_err(sys(format!("mounting the root disk {}", device.display())))?;
    enter_new_root(&new_root)
}

/// Makes the file system mounted on `new_root` the root of this mount namespace and
/// detaches the old root (with the staging tmpfs in it).
fn enter_new_root(new_root: &Path) -> Result<(), InitError> {
    nix::unistd::chdir(new_root).map_err(sys("entering the new root"))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; unmounting "."
    // then removes it without needing a directory for it in the new root.
    nix::unistd::pivot_root(".", ".").map_err(sys("pivot_root into the new root"))?;
    umount2(".", MntFlags::MNT_DETACH).map_err(sys("detaching the old root"))?;
    nix::unistd::chdir("/").map_err(sys("entering /"))?;
    OWN_ROOT.store(true, Ordering::Relaxed);
    Ok(())
}

/// Sets the host name.
pub fn set_hostname(name: &str) -> Result<(), InitError> {
    nix::unistd::sethostname(name).map_err(sys(format!("setting hostname {name}")))
}

/// The kernel's `struct rtentry` (linux/route.h), absent from the libc crate for glibc.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

fn sockaddr_v4(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and sockaddr has no
    // invalid bit patterns; this is the cast the socket API is designed around.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// An AF_INET datagram socket used for interface ioctls.
struct IfSocket(std::os::fd::OwnedFd);

impl IfSocket {
    fn new() -> Result<Self, InitError> {
        use nix::sys::socket::{socket, AddressFamily, SockFlag, SockType};
        socket(
            AddressFamily::Inet,
            SockType::Datagram,
            SockFlag::SOCK_CLOEXEC,
            None,
        )
        .map(Self)
        .map_err(sys("creating an AF_INET socket"))
    }

    fn ioctl<T>(&self, request: libc::c_ulong, arg: &mut T, what: String) -> Result<(), InitError> {
        use std::os::fd::AsRawFd;
        // SAFETY: `arg` is a live, exclusively borrowed struct of the type `request`
        // expects (ifreq or rtentry); the kernel reads and writes within it only.
        if unsafe { libc::ioctl(self.0.as_raw_fd(), request, arg as *mut T) } != 0 {
            return Err(InitError::Sys {
                what,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    fn ifreq(name: &str) -> Result<libc::ifreq, InitError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(InitError::Sys {
                what: format!("interface name {name:?}"),
                source: io::Error::from(io::ErrorKind::InvalidInput),
            });
        }
        // SAFETY: ifreq is plain data (a name array and a union of plain data); all zeroes
        // is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
            *dst = src as libc::c_char;
        }
        Ok(req)
    }

    fn set_addr(
        &self,
        name: &str,
        request: libc::c_ulong,
        addr: Ipv4Addr,
    ) -> Result<(), InitError> {
        let mut req = Self::ifreq(name)?;
        req.ifr_ifru.ifru_addr = sockaddr_v4(addr);
        self.ioctl(request, &mut req, format!("setting {addr} on {name}"))
    }

    fn up(&self, name: &str) -> Result<(), InitError> {
        let mut req = Self::ifreq(name)?;
        self.ioctl(
            libc::SIOCGIFFLAGS,
            &mut req,
            format!("reading the flags of {name}"),
        )?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut req, format!("bringing {name} up"))
    }

    fn add_default_route(&self, gateway: Ipv4Addr) -> Result<(), InitError> {
        let mut route = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_v4(gateway),
            rt_genmask: sockaddr_v4(Ipv4Addr::UNSPECIFIED),
            rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        self.ioctl(
            libc::SIOCADDRT,
            &mut route,
            format!("adding the default route via {gateway}"),
        )
    }
}

/// Brings `lo` up and, with `ip`, configures `interface` and the default route.
pub fn configure_network(interface: &str, ip: Option<&IpConfig>) -> Result<(), InitError> {
    let sock = IfSocket::new()?;
    sock.up("lo")?;
    if let Some(ip) = ip {
        sock.set_addr(interface, libc::SIOCSIFADDR, ip.address)?;
        sock.set_addr(interface, libc::SIOCSIFNETMASK, ip.netmask())?;
        sock.up(interface)?;
        if let Some(gateway) = ip.gateway {
            sock.add_default_route(gateway)?;
        }
    }
    Ok(())
}

/// Points stdin, stdout and stderr at /dev/console.
fn reopen_console() -> Result<(), InitError> {
    use std::os::fd::AsRawFd;
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .map_err(sys_io("opening /dev/console"))?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors; `console` stays open during the call.
        if unsafe { libc::dup2(console.as_raw_fd(), fd) } < 0 {
            return Err(sys_io("redirecting stdio to /dev/console")(
                io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

/// Runs every init duty, logging (not stopping at) failures: PID 1 must keep going.
pub fn run() {
    let report = |result: Result<(), InitError>| {
        if let Err(e) = result {
            crate::log!("init: {e}");
        }
    };
    report(mount_fs("proc", "/proc", "proc", MsFlags::empty(), None));
    report(mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    ));
    let params = match std::fs::read_to_string("/proc/cmdline") {
        Ok(cmdline) => KernelParams::parse(&cmdline).unwrap_or_else(|e| {
            crate::log!("init: {e}; ignoring the mvm.* parameters");
            KernelParams::default()
        }),
        Err(e) => {
            crate::log!("init: reading /proc/cmdline: {e}");
            KernelParams::default()
        }
    };
    if let Some(upper) = &params.overlay {
        report(pivot_to_overlay(Path::new("/"), upper, Path::new("/run")));
    } else if let Some(device) = &params.root {
        report(pivot_to_disk(device, Path::new("/run")));
    }
    report(mount_base());
    report(reopen_console());
    if let Some(name) = &params.hostname {
        report(set_hostname(name));
    }
    report(configure_network(GUEST_INTERFACE, params.ip.as_ref()));
}

/// The mount points of this mount namespace, in the order of `/proc/self/mountinfo` (a
/// mount comes after the one it is mounted on).
fn mount_points() -> Result<Vec<PathBuf>, InitError> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(sys_io("reading /proc/self/mountinfo"))?;
    Ok(info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_mountinfo(field)))
        .collect())
}

/// Undoes the octal escapes (`\040` for a space) of a mountinfo path field.
fn unescape_mountinfo(field: &str) -> String {
    use std::os::unix::ffi::OsStringExt;
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| {
            bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    std::ffi::OsString::from_vec(out)
        .to_string_lossy()
        .into_owned()
}

/// Makes the file system whose root `disk` is open on read-only through the new mount API,
/// which (unlike `mount(MS_REMOUNT)`) also reaches a mount detached from every namespace.
fn reconfigure_read_only(disk: &OwnedFd) -> Result<(), InitError> {
    let err = |what: &str| InitError::Sys {
        what: format!("{what} of the overlay's upper disk, to make it read-only"),
        source: io::Error::last_os_error(),
    };
    // SAFETY: fspick with an open fd, an empty NUL-terminated path and flag constants; it
    // returns a new fd or -1.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_fspick,
            disk.as_raw_fd(),
            c"".as_ptr(),
            libc::FSPICK_EMPTY_PATH | libc::FSPICK_CLOEXEC,
        )
    };
    if ret < 0 {
        return Err(err("fspick"));
    }
    // SAFETY: fspick returned a new fd that nothing else owns.
    let context = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(ret as i32) };
    let config = |cmd: libc::c_uint, key: Option<&std::ffi::CStr>| {
        // SAFETY: fsconfig on the context fd with a NUL-terminated key (or null) and no
        // value, as FSCONFIG_SET_FLAG and FSCONFIG_CMD_RECONFIGURE expect.
        unsafe {
            libc::syscall(
                libc::SYS_fsconfig,
                context.as_raw_fd(),
                cmd,
                key.map_or(std::ptr::null(), |k| k.as_ptr()),
                std::ptr::null::<libc::c_void>(),
                0,
            )
        }
    };
    if config(libc::FSCONFIG_SET_FLAG, Some(c"ro")) < 0 {
        return Err(err("fsconfig(ro)"));
    }
    if config(libc::FSCONFIG_CMD_RECONFIGURE, None) < 0 {
        return Err(err("fsconfig(reconfigure)"));
    }
    Ok(())
}

/// Leaves the file systems consistent for the power-off, once every other process is gone:
/// unmounts every mount of this namespace but `/`, innermost first (releasing the disks of
/// `Mount` requests; a busy one is detached lazily), remounts `/` read-only if this init
/// mounted it, and then the overlay's upper disk. Best effort: it carries on past failures
/// and returns them.
pub fn quiesce_file_systems() -> Vec<InitError> {
    let mut errors = Vec::new();
    match mount_points() {
        Ok(points) => {
            for point in points
                .iter()
                .rev()
                .filter(|p| p.as_path() != Path::new("/"))
            {
                let result = match umount2(point, MntFlags::empty()) {
                    Err(nix::Error::EBUSY) => umount2(point, MntFlags::MNT_DETACH),
                    other => other,
                };
                // EINVAL: already gone with a lazily detached parent.
                if let Err(e) = result.or_else(|e| match e {
                    nix::Error::EINVAL | nix::Error::ENOENT => Ok(()),
                    e => Err(e),
                }) {
                    errors.push(sys(format!("unmounting {}", point.display()))(e));
                }
            }
        }
        Err(e) => errors.push(e),
    }
    if OWN_ROOT.load(Ordering::Relaxed) {
        let none: Option<&str> = None;
        if let Err(e) = mount(
            none,
            "/",
            none,
            MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
            none,
        ) {
            errors.push(sys("remounting / read-only")(e));
        }
    }
    let disks = std::mem::take(
        &mut *DETACHED_DISKS
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    errors.extend(disks.iter().filter_map(|d| reconfigure_read_only(d).err()));
    errors
}

/// Reaps children until none is left or `timeout` passes; returns whether none is left.
fn reap_all(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        // SAFETY: waitpid with a null status pointer, integers otherwise.
        match unsafe { libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) } {
            -1 if io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) => return true,
            0 | -1 if Instant::now() >= deadline => return false,
            0 | -1 => std::thread::sleep(Duration::from_millis(10)),
            _ => {}
        }
    }
}

/// Stops every process, waits for them to be gone, unmounts or remounts read-only the file
/// systems ([`quiesce_file_systems`]), syncs and powers off or reboots. Never returns; if the
/// kernel refuses, it logs and sleeps forever (PID 1 must not exit).
pub fn power_down(action: ShutdownAction) -> ! {
    // SAFETY: kill(2) with pid -1 signals every process but ourselves; integers only.
    unsafe { libc::kill(-1, libc::SIGTERM) };
    std::thread::sleep(Duration::from_millis(500));
    // SAFETY: as above.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    // As PID 1, every orphan is our child: once all are reaped none holds a file open.
    if !reap_all(KILL_WAIT) {
        crate::log!("power-down: processes still running {KILL_WAIT:?} after SIGKILL");
    }
    nix::unistd::sync();
    for e in quiesce_file_systems() {
        crate::log!("power-down: {e}");
    }
    nix::unistd::sync();
    let mode = match action {
        ShutdownAction::PowerOff => RebootMode::RB_POWER_OFF,
        ShutdownAction::Reboot => RebootMode::RB_AUTOBOOT,
    };
    let Err(e) = reboot(mode);
    crate::log!("reboot({mode:?}) failed: {e}");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mvm_parameters() {
        let params = KernelParams::parse(
            "console=ttyS0 reboot=k panic=1 root=/dev/vda ro mvm.overlay=/dev/vdb \
             mvm.hostname=sbx-1.local mvm.ip=10.0.0.2/30,10.0.0.1 init=/sbin/mvm-agent\n",
        )
        .unwrap();
        assert_eq!(
            params.overlay,
            Some(OverlayUpper::Device("/dev/vdb".into()))
        );
        assert_eq!(params.hostname.as_deref(), Some("sbx-1.local"));
        let ip = params.ip.unwrap();
        assert_eq!(ip.address, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(ip.prefix_len, 30);
        assert_eq!(ip.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(ip.gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn defaults_and_quotes() {
        assert_eq!(KernelParams::parse("").unwrap(), KernelParams::default());
        let params =
            KernelParams::parse("a=\"x y\" mvm.overlay=tmpfs \"mvm.ip=192.168.1.5/24\"").unwrap();
        assert_eq!(params.overlay, Some(OverlayUpper::Tmpfs));
        assert_eq!(params.root, None);
        assert_eq!(
            KernelParams::parse("mvm.root=/dev/vdb").unwrap().root,
            Some(PathBuf::from("/dev/vdb"))
        );
        let ip = params.ip.unwrap();
        assert_eq!(ip.gateway, None);
        assert_eq!(ip.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(split_cmdline(" a=\"x y\"  b "), ["a=x y", "b"]);
        let zero = IpConfig {
            address: Ipv4Addr::LOCALHOST,
            prefix_len: 0,
            gateway: None,
        };
        assert_eq!(zero.netmask(), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_mountinfo("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        // Not an escape: left as is.
        assert_eq!(unescape_mountinfo("/x\\9y\\04"), "/x\\9y\\04");
        assert_eq!(unescape_mountinfo("/"), "/");
    }

    #[test]
    fn rejects_malformed_parameters() {
        for bad in [
            "mvm.overlay=disk",
            "mvm.overlay=/dev/",
            "mvm.root=vdb",
            "mvm.root=/dev/vdb mvm.overlay=tmpfs",
            "mvm.hostname=",
            "mvm.hostname=-bad",
            "mvm.hostname=a_b",
            "mvm.ip=10.0.0.2",
            "mvm.ip=10.0.0.2/33",
            "mvm.ip=10.0.0/24",
            "mvm.ip=10.0.0.2/24,gw",
        ] {
            assert!(
                matches!(KernelParams::parse(bad), Err(InitError::BadParam { .. })),
                "{bad}"
            );
        }
    }
}
