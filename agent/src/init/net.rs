//! The guest's identity on the network: host name, loopback, the address of the guest
//! interface and the default route.

use std::io;
use std::net::Ipv4Addr;

use super::error::{sys, sys_io, InitError};
use super::identity_files::make_regular_file;

/// Interface configured by `mvm.ip`.
pub const GUEST_INTERFACE: &str = "eth0";

pub use crate::protocol::IpConfig;

/// Sets the host name.
pub fn set_hostname(name: &str) -> Result<(), InitError> {
    nix::unistd::sethostname(name).map_err(sys(format!("setting hostname {name}")))
}

/// The resolver file.
pub(super) const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Makes `/etc/resolv.conf` name `nameserver` only (see [`write_nameserver`]).
pub fn write_resolv_conf(nameserver: Ipv4Addr) -> Result<(), InitError> {
    write_nameserver(std::path::Path::new(RESOLV_CONF), nameserver)
}

/// Makes the resolver file `path` name `nameserver` only. A plain file is rewritten in place:
/// removing and creating it again costs a guest busy with its disk far more (on an overlay,
/// a whiteout and a rename over it). Anything else there, e.g. a link to a resolver the
/// image would run, is replaced by a plain file.
fn write_nameserver(path: &std::path::Path, nameserver: Ipv4Addr) -> Result<(), InitError> {
    use std::os::unix::fs::OpenOptionsExt;
    let text = format!("# mvm: the sandbox's resolver\nnameserver {nameserver}\n");
    make_regular_file(path)?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(sys_io(format!("opening {}", path.display())))?;
    std::io::Write::write_all(&mut file, text.as_bytes())
        .map_err(sys_io(format!("writing {}", path.display())))
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
        self.set_up(name, true)
    }

    /// Brings `name` up or down.
    fn set_up(&self, name: &str, up: bool) -> Result<(), InitError> {
        let mut req = Self::ifreq(name)?;
        self.ioctl(
            libc::SIOCGIFFLAGS,
            &mut req,
            format!("reading the flags of {name}"),
        )?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { req.ifr_ifru.ifru_flags };
        let up_flags = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        req.ifr_ifru.ifru_flags = if up {
            flags | up_flags
        } else {
            flags & !up_flags
        };
        let what = format!("bringing {name} {}", if up { "up" } else { "down" });
        self.ioctl(libc::SIOCSIFFLAGS, &mut req, what)
    }

    fn set_mac(&self, name: &str, mac: [u8; 6]) -> Result<(), InitError> {
        let mut req = Self::ifreq(name)?;
        let mut hwaddr = libc::sockaddr {
            sa_family: libc::ARPHRD_ETHER,
            sa_data: [0; 14],
        };
        for (dst, src) in hwaddr.sa_data.iter_mut().zip(mac) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = hwaddr;
        self.ioctl(
            libc::SIOCSIFHWADDR,
            &mut req,
            format!("setting the MAC of {name}"),
        )
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
        sock.address(interface, ip)?;
    }
    Ok(())
}

impl IfSocket {
    /// Sets `ip` on `interface`, brings it up and adds the default route.
    fn address(&self, interface: &str, ip: &IpConfig) -> Result<(), InitError> {
        self.set_addr(interface, libc::SIOCSIFADDR, ip.address)?;
        self.set_addr(interface, libc::SIOCSIFNETMASK, ip.netmask())?;
        self.up(interface)?;
        if let Some(gateway) = ip.gateway {
            self.add_default_route(gateway)?;
        }
        Ok(())
    }
}

/// Gives `interface` a new identity without taking it down (virtio-net changes its MAC
/// live, and a link taken down and up again costs a busy guest a good part of a second): its
/// address removed, which drops the routes through it and its neighbours, a new `mac`, then
/// `ip` with the default route, or with no `ip` no address and the link down.
pub fn reconfigure_network(
    interface: &str,
    mac: Option<[u8; 6]>,
    ip: Option<&IpConfig>,
) -> Result<(), InitError> {
    let sock = IfSocket::new()?;
    // Address 0.0.0.0 deletes the interface's address; with the last one go the routes
    // through the interface and its neighbours (the old gateway's MAC among them).
    sock.set_addr(interface, libc::SIOCSIFADDR, Ipv4Addr::UNSPECIFIED)?;
    if let Some(mac) = mac {
        sock.set_mac(interface, mac)?;
    }
    match ip {
        Some(ip) => sock.address(interface, ip),
        None => sock.set_up(interface, false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A plain resolver file is rewritten in place (the same inode); a link is replaced by a
    /// plain file and what it pointed to is left as it was.
    #[test]
    fn the_resolver_file_is_rewritten_in_place_and_a_link_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(
            &path,
            "nameserver 192.0.2.1\nsearch a-much-longer-line-than-ours\n",
        )
        .unwrap();
        let inode = std::fs::metadata(&path).unwrap().ino();
        write_nameserver(&path, Ipv4Addr::new(10, 0, 0, 1)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "# mvm: the sandbox's resolver\nnameserver 10.0.0.1\n"
        );

        let target = dir.path().join("stub-resolv.conf");
        std::fs::write(&target, "nameserver 127.0.0.53\n").unwrap();
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        write_nameserver(&path, Ipv4Addr::new(10, 0, 0, 2)).unwrap();
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .ends_with("nameserver 10.0.0.2\n"));
        assert_eq!(
            std::fs::read_to_string(&target).unwrap(),
            "nameserver 127.0.0.53\n"
        );
    }
}
