//! A container runtime's pod network namespace, which a sandbox joins instead of getting its
//! own: the jail tier enters it; the vm tier takes over its interface for the guest.

use std::net::Ipv4Addr;
use std::path::Path;

use super::TAP_IF;
use crate::error::{Error, Result};
use crate::manager::host;
use crate::model::{Egress, Isolation, NetworkInfo};

/// The interface of a pod's network namespace (made by the container runtime's CNI
/// plugins) that a vm-tier sandbox takes over: the guest gets its address and MAC, and tc
/// redirects its frames to and from the VM's tap, as Kata Containers does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodUplink {
    /// Interface name in the namespace (usually `eth0`).
    pub ifname: String,
    /// Its IPv4 address.
    pub address: Ipv4Addr,
    /// Its prefix length.
    pub prefix: u8,
    /// The namespace's default gateway, if it has one.
    pub gateway: Option<Ipv4Addr>,
    /// Its MAC address, which the guest's NIC takes.
    pub mac: String,
}

impl PodUplink {
    /// The guest's address: the interface's.
    pub fn guest_ip(&self) -> agent::IpConfig {
        agent::IpConfig {
            address: self.address,
            prefix_len: self.prefix,
            gateway: self.gateway,
        }
    }
}

/// Runs `f` on a thread inside the network namespace pinned at `netns`.
pub(super) fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let ns = std::fs::File::open(netns).map_err(|e| {
        Error::Invalid(format!(
            "network namespace {}: {e}; give the path of a pinned namespace (e.g. \
             /var/run/netns/NAME)",
            netns.display()
        ))
    })?;
    let path = netns.display().to_string();
    std::thread::spawn(move || {
        // SAFETY: setns on a descriptor we own with a flag constant; it moves only this
        // thread, which ends after `f`.
        if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) } != 0 {
            return Err(Error::host(
                format!("entering network namespace {path}"),
                std::io::Error::last_os_error(),
            ));
        }
        f()
    })
    .join()
    .map_err(|_| Error::Host("the network namespace thread panicked".into()))?
}

/// Finds the pod's interface in `ip -j addr` and `ip -j route show default` output: the
/// first one besides loopback and the tap with an IPv4 address.
fn find_uplink(addrs: &str, routes: &str) -> Result<PodUplink> {
    let bad = |e: serde_json::Error| Error::Host(format!("reading `ip -j` output: {e}"));
    let links: Vec<serde_json::Value> = serde_json::from_str(addrs).map_err(bad)?;
    let routes: Vec<serde_json::Value> = serde_json::from_str(routes).map_err(bad)?;
    let gateway = routes
        .iter()
        .find_map(|r| r["gateway"].as_str()?.parse().ok());
    links
        .iter()
        .filter(|l| !matches!(l["ifname"].as_str(), None | Some("lo") | Some(TAP_IF)))
        .find_map(|l| {
            let inet = l["addr_info"]
                .as_array()?
                .iter()
                .find(|a| a["family"] == "inet")?;
            Some(PodUplink {
                ifname: l["ifname"].as_str()?.to_owned(),
                address: inet["local"].as_str()?.parse().ok()?,
                prefix: u8::try_from(inet["prefixlen"].as_u64()?).ok()?,
                gateway,
                mac: l["address"].as_str()?.to_owned(),
            })
        })
        .ok_or_else(|| {
            Error::Invalid(
                "the pod's network namespace has no interface with an IPv4 address (did the \
                 CNI plugins run?)"
                    .into(),
            )
        })
}

/// Joins the pod network namespace `netns` that a container runtime made: the jail tier
/// runs in it as it is; the vm tier gets a tap (owned by `uid`) there, bridged to the pod's
/// interface by tc, and the guest takes over that interface's address. The namespace stays
/// the runtime's: [`leave_pod_netns`] undoes only what this added.
pub fn join_pod_netns(
    netns: &Path,
    isolation: Isolation,
    uid: u32,
) -> Result<(NetworkInfo, PodUplink)> {
    let uplink = in_netns(netns, move || {
        let uplink = find_uplink(
            &host::run("ip", &["-j", "addr", "show"], None)?,
            &host::run("ip", &["-j", "-4", "route", "show", "default"], None)?,
        )?;
        if isolation == Isolation::Vm {
            let ifname = &uplink.ifname;
            let redirect = |from: &str, to: &str| {
                format!(
                    "qdisc add dev {from} ingress
\
                     filter add dev {from} parent ffff: protocol all u32 match u8 0 0 \
                     action mirred egress redirect dev {to}\n"
                )
            };
            host::run(
                "ip",
                &["-batch", "-"],
                Some(&format!(
                    "tuntap add dev {TAP_IF} mode tap user {uid}\nlink set {TAP_IF} up\n"
                )),
            )?;
            let tc = format!("{}{}", redirect(ifname, TAP_IF), redirect(TAP_IF, ifname));
            if let Err(e) = host::run("tc", &["-batch", "-"], Some(&tc)) {
                let _ = undo_redirect(ifname);
                return Err(e);
            }
        }
        Ok(uplink)
    })?;
    let info = NetworkInfo {
        egress: Egress::All,
        allow: Vec::new(),
        address: Some(uplink.address.to_string()),
        gateway: uplink.gateway.map(|g| g.to_string()),
        netns: Some(netns.display().to_string()),
        ports: Vec::new(),
        secrets: Vec::new(),
    };
    Ok((info, uplink))
}

/// Removes the tap and the pod interface's ingress redirect (in the current namespace; not
/// looked up in /sys/class/net, which shows the namespace sysfs was mounted in).
fn undo_redirect(ifname: &str) -> Result<()> {
    if let Err(e) = host::run("ip", &["link", "del", TAP_IF], None) {
        // Only an error while the tap is still there.
        if host::run("ip", &["link", "show", "dev", TAP_IF], None).is_ok() {
            return Err(e);
        }
    }
    // Gone with an interface the runtime already removed, or never added.
    let _ = host::run("tc", &["qdisc", "del", "dev", ifname, "ingress"], None);
    Ok(())
}

/// Undoes [`join_pod_netns`] for a vm-tier sandbox; a namespace the runtime has removed
/// already is fine.
pub fn leave_pod_netns(netns: &Path) -> Result<()> {
    if !netns.exists() {
        return Ok(());
    }
    in_netns(netns, || {
        let links = host::run("ip", &["-j", "addr", "show"], None)?;
        let routes = host::run("ip", &["-j", "-4", "route", "show", "default"], None)?;
        match find_uplink(&links, &routes) {
            Ok(uplink) => undo_redirect(&uplink.ifname),
            // The pod's interface is gone: only the tap can be left.
            Err(_) => undo_redirect("eth0"),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_uplink_from_ip_json() {
        let addrs = r#"[{"ifindex":1,"ifname":"lo","address":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
            {"ifindex":3,"ifname":"eth0","address":"0a:58:0a:f4:01:05","mtu":1450,"addr_info":[{"family":"inet","local":"10.244.1.5","prefixlen":24}]}]"#;
        let routes = r#"[{"dst":"default","gateway":"10.244.1.1","dev":"eth0"}]"#;
        let up = find_uplink(addrs, routes).unwrap();
        assert_eq!(up.ifname, "eth0");
        assert_eq!(up.mac, "0a:58:0a:f4:01:05");
        assert_eq!(up.guest_ip().to_string(), "10.244.1.5/24,10.244.1.1");
        let up = find_uplink(addrs, "[]").unwrap();
        assert_eq!(up.guest_ip().to_string(), "10.244.1.5/24");
        let only_lo = r#"[{"ifname":"lo","address":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]}]"#;
        let err = find_uplink(only_lo, "[]").unwrap_err().to_string();
        assert!(err.contains("CNI"), "{err}");
        find_uplink("not json", "[]").unwrap_err();
    }
}
