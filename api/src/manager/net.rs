//! Per-sandbox networking: a network namespace pinned under the manager's run dir, with a veth
//! pair to the host when the sandbox has egress, a tap for the VM in the vm tier, the egress
//! policy as an nftables ruleset inside the namespace, and a guard table on the host for the
//! destinations only the host can judge (its own addresses). A sandbox can change neither: a
//! jail-tier process has no CAP_NET_ADMIN, a vm guest owns only its own kernel.

use std::net::Ipv4Addr;
use std::path::Path;

use mvm_sys::flock;

use crate::error::{Error, Result};
use crate::manager::host;
use crate::model::{Egress, Isolation, NetworkInfo, NetworkSpec};

/// Name of the sandbox side of the veth pair (and the guest NIC in the vm tier).
pub const SANDBOX_IF: &str = "eth0";
/// Name of the tap in the namespace (vm tier).
pub const TAP_IF: &str = "tap0";

/// Addresses of one sandbox: slot `n` owns the /29 at `subnet + 8n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addresses {
    /// Host side of the veth (the sandbox's gateway).
    pub host: Ipv4Addr,
    /// Sandbox side of the veth.
    pub sandbox: Ipv4Addr,
    /// The tap in the namespace (the guest's gateway, vm tier).
    pub tap: Ipv4Addr,
    /// The guest (vm tier).
    pub guest: Ipv4Addr,
}

impl Addresses {
    /// Addresses of slot `slot` in the /16 starting at `subnet`.
    pub fn of(subnet: Ipv4Addr, slot: u32) -> Self {
        let base = u32::from(subnet) + slot * 8;
        Addresses {
            host: Ipv4Addr::from(base + 1),
            sandbox: Ipv4Addr::from(base + 2),
            tap: Ipv4Addr::from(base + 5),
            guest: Ipv4Addr::from(base + 6),
        }
    }
}

/// Host-side veth name of sandbox `id`.
pub fn host_veth(id: &str) -> String {
    format!("mv{}", &id[..id.len().min(13)])
}

/// Validates and normalizes an allow-list entry (`A.B.C.D` or `A.B.C.D/N`).
pub fn parse_cidr(s: &str) -> Result<String> {
    let bad = || {
        Error::Invalid(format!(
            "network.allow entry {s:?} is not an IPv4 address or CIDR like 10.0.0.0/8"
        ))
    };
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (
            a,
            p.parse::<u8>().ok().filter(|p| *p <= 32).ok_or_else(bad)?,
        ),
        None => (s, 32),
    };
    let addr: Ipv4Addr = addr.parse().map_err(|_| bad())?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Ok(format!(
        "{}/{prefix}",
        Ipv4Addr::from(u32::from(addr) & mask)
    ))
}

/// Checks a requested network and returns it normalized.
pub fn validate(spec: &NetworkSpec) -> Result<NetworkSpec> {
    let allow = spec
        .allow
        .iter()
        .map(|a| parse_cidr(a))
        .collect::<Result<Vec<_>>>()?;
    match spec.egress {
        Egress::Allow if allow.is_empty() => {
            return Err(Error::Invalid(
                "network.egress \"allow\" needs at least one network.allow entry".into(),
            ))
        }
        Egress::None if !allow.is_empty() => {
            return Err(Error::Invalid(
                "network.allow is only used with network.egress \"allow\" or \"all\"".into(),
            ))
        }
        _ => {}
    }
    Ok(NetworkSpec {
        egress: spec.egress,
        allow,
    })
}

/// The manager's /16 that slot addresses `a` belong to.
fn manager_subnet(a: &Addresses) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(a.host) & 0xffff_0000)
}

/// IPv4 destinations that no sandbox reaches unless one of its `allow` entries names them:
/// "this" network, private (RFC 1918), shared (CGNAT), loopback, link-local (cloud metadata at
/// 169.254.169.254), multicast, reserved and broadcast. The host's own addresses, whatever
/// they are, are found by a route lookup ([`host_guard`]).
const BLOCKED_V4: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "224.0.0.0/4",
    "240.0.0.0/4",
];

/// The namespace's guard: nothing leaves with a source that is not the sandbox's own, no
/// IPv6 at all (a sandbox has no IPv6 address), and in the vm tier the guest cannot reach
/// the namespace itself (its gateway is only for routing).
fn namespace_guard(isolation: Isolation, a: &Addresses) -> String {
    let mut rules = format!(
        "table inet mvm-guard {{
  chain output {{ type filter hook output priority -10;
    oifname \"{SANDBOX_IF}\" meta nfproto ipv6 drop
    oifname \"{SANDBOX_IF}\" ip saddr != {} drop
  }}
",
        a.sandbox
    );
    if isolation == Isolation::Vm {
        rules.push_str(&format!(
            "  chain input {{ type filter hook input priority -10;
    iifname \"{TAP_IF}\" drop
  }}
  chain forward {{ type filter hook forward priority -10;
    iifname \"{TAP_IF}\" meta nfproto ipv6 drop
    iifname \"{TAP_IF}\" ip saddr != {} drop
  }}
",
            a.guest
        ));
    }
    rules.push_str("}\n");
    rules
}

/// The host table of sandbox `id`'s guard (see [`host_guard`]).
fn guard_table(id: &str) -> String {
    format!("mvm-guard-{id}")
}

/// The host-side guard of sandbox `id`, for every egress mode with a veth: what comes in
/// from its veth is dropped when it is IPv6, has another source than the sandbox's address,
/// or goes to one of the host's own addresses (its gateway included) or to [`BLOCKED_V4`],
/// unless an `allow` entry names the destination. Replies to connections the host opened
/// pass. It hooks prerouting before destination NAT, so a port the host forwards elsewhere
/// is judged by the host address it was sent to.
fn host_guard(id: &str, spec: &NetworkSpec, a: &Addresses) -> String {
    let allowed = if spec.allow.is_empty() {
        String::new()
    } else {
        format!("    ip daddr {{ {} }} accept\n", spec.allow.join(", "))
    };
    format!(
        "table inet {} {{
  chain prerouting {{ type filter hook prerouting priority -150;
    iifname \"{}\" jump from_sandbox
  }}
  chain from_sandbox {{
    meta nfproto ipv6 drop
    ip saddr != {} drop
    ct state established,related accept
{allowed}    fib daddr type {{ local, broadcast, multicast }} drop
    ip daddr {{ {} }} drop
  }}
}}
",
        guard_table(id),
        host_veth(id),
        a.sandbox,
        BLOCKED_V4.join(", ")
    )
}

/// The nftables ruleset loaded in the namespace.
fn ruleset(spec: &NetworkSpec, isolation: Isolation, a: &Addresses) -> String {
    let mut rules = String::from("flush ruleset\n");
    if spec.egress != Egress::None {
        rules.push_str(&namespace_guard(isolation, a));
        // Other sandboxes are not reachable, whatever the host forwards: from the manager's
        // /16 only the sandbox's own gateway (the host) gets in.
        let subnet = manager_subnet(a);
        let peers = format!(
            "iifname \"{SANDBOX_IF}\" ip saddr {subnet}/16 ip saddr != {} drop",
            a.host
        );
        rules.push_str(&format!(
            "table ip mvm-peers {{
  chain input {{ type filter hook input priority 0; {peers}; }}
  chain forward {{ type filter hook forward priority 0; {peers}; }}
}}
"
        ));
    }
    if spec.egress == Egress::Allow {
        let set = spec.allow.join(", ");
        rules.push_str(&format!(
            "table inet mvm {{
  chain output {{ type filter hook output priority 0; policy drop;
    oifname \"lo\" accept
    ct state established,related accept
    ip daddr {{ {set} }} accept
    reject
  }}
  chain forward {{ type filter hook forward priority 0; policy drop;
    ct state established,related accept
    iifname \"{TAP_IF}\" ip daddr {{ {set} }} accept
    reject
  }}
}}
"
        ));
    }
    if isolation == Isolation::Vm {
        rules.push_str(&format!(
            "table ip mvm-nat {{
  chain postrouting {{ type nat hook postrouting priority 100;
    oifname \"{SANDBOX_IF}\" ip saddr {}/30 masquerade
  }}
}}
",
            Ipv4Addr::from(u32::from(a.tap) - 1)
        ));
    }
    rules
}

/// Builds the namespace at `netns` for sandbox `id` and returns what the sandbox got. On
/// failure nothing is left behind.
pub fn create(
    netns: &Path,
    id: &str,
    spec: &NetworkSpec,
    isolation: Isolation,
    addrs: Addresses,
    uid: u32,
) -> Result<NetworkInfo> {
    let veth = host_veth(id);
    let inside = spec.clone();
    let mvmd_pid = std::process::id().to_string();
    let veth_inside = veth.clone();
    host::create_netns(netns, move || {
        let mut batch = String::new();
        if isolation == Isolation::Vm {
            batch.push_str(&format!(
                "tuntap add dev {TAP_IF} mode tap user {uid}\n\
                 addr add {}/30 dev {TAP_IF}\nlink set {TAP_IF} up\n",
                addrs.tap
            ));
        }
        if inside.egress != Egress::None {
            batch.push_str(&format!(
                "link add {SANDBOX_IF} type veth peer name {veth_inside} netns {mvmd_pid}\n\
                 addr add {}/30 dev {SANDBOX_IF}\nlink set {SANDBOX_IF} up\n\
                 route add default via {}\n",
                addrs.sandbox, addrs.host
            ));
        }
        if !batch.is_empty() {
            host::run("ip", &["-batch", "-"], Some(&batch))?;
        }
        if isolation == Isolation::Vm && inside.egress != Egress::None {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .map_err(|e| Error::host("enabling forwarding in the sandbox netns", e))?;
        }
        let rules = ruleset(&inside, isolation, &addrs);
        if rules.lines().count() > 1 {
            host::run("nft", &["-f", "-"], Some(&rules))?;
        }
        Ok(())
    })?;
    let info = NetworkInfo {
        netns: None,
        egress: spec.egress,
        allow: spec.allow.clone(),
        address: (spec.egress != Egress::None).then(|| match isolation {
            Isolation::Jail => addrs.sandbox.to_string(),
            Isolation::Vm => addrs.guest.to_string(),
        }),
        gateway: (spec.egress != Egress::None).then(|| match isolation {
            Isolation::Jail => addrs.host.to_string(),
            Isolation::Vm => addrs.tap.to_string(),
        }),
    };
    if spec.egress != Egress::None {
        let host_side = format!(
            "addr add {}/30 dev {veth}\nlink set {veth} up\n",
            addrs.host
        );
        // The guard first: the veth carries nothing before it is loaded.
        if let Err(e) = host::run("nft", &["-f", "-"], Some(&host_guard(id, spec, &addrs)))
            .and_then(|_| host::run("ip", &["-batch", "-"], Some(&host_side)))
        {
            let _ = destroy(netns, id);
            return Err(e);
        }
        if spec.egress == Egress::All {
            if let Err(e) = enable_host_masquerade(id, &addrs) {
                let _ = destroy(netns, id);
                return Err(e);
            }
        }
    }
    Ok(info)
}

/// The host-wide nftables table that exists while any manager has an `egress: all` sandbox:
/// its comment keeps the host's IPv4 forwarding setting from before the first one, and it drops
/// forwarding between sandbox veths. Each such sandbox has its own masquerade table named
/// after it (see [`egress_table`]).
const EGRESS_TABLE: &str = "mvm-egress";
/// The host's IPv4 forwarding switch.
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// The masquerade table of `egress: all` sandbox `id`.
fn egress_table(id: &str) -> String {
    format!("{EGRESS_TABLE}-{id}")
}

/// An exclusive flock on the host's ip_forward sysctl file, held while the egress tables and
/// forwarding are changed: it serializes every mvm manager on the host (threads and
/// processes alike), as they share both. Released on drop.
struct ForwardingLock {
    _file: std::fs::File,
}

impl ForwardingLock {
    fn acquire() -> Result<Self> {
        let file = std::fs::File::open(IP_FORWARD)
            .map_err(|e| Error::host(format!("opening {IP_FORWARD}"), e))?;
        flock::lock(&file, flock::Kind::Exclusive)
            .map_err(|e| Error::host(format!("locking {IP_FORWARD}"), e))?;
        Ok(ForwardingLock { _file: file })
    }
}

/// Names of the host's nftables tables of `family` (`ip`, `inet`); none when nft is not
/// installed (then none of ours can exist).
fn tables(family: &str) -> Result<Vec<String>> {
    let prefix = format!("table {family} ");
    match std::process::Command::new("nft")
        .args(["list", "tables", family])
        .stdin(std::process::Stdio::null())
        .output()
    {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(Error::host("running nft list tables", e)),
        Ok(out) if !out.status.success() => Err(Error::Host(format!(
            "nft list tables failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
        Ok(out) => Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix(prefix.as_str()))
            .map(str::to_owned)
            .collect()),
    }
}

fn read_ip_forward() -> Result<String> {
    let v = std::fs::read_to_string(IP_FORWARD)
        .map_err(|e| Error::host(format!("reading {IP_FORWARD}"), e))?;
    Ok(v.trim().to_owned())
}

fn write_ip_forward(value: &str) -> Result<()> {
    std::fs::write(IP_FORWARD, value)
        .map_err(|e| Error::host(format!("setting {IP_FORWARD} to {value}"), e))
}

/// The forwarding setting saved in the comment of [`EGRESS_TABLE`] (`nft list table` text).
fn saved_ip_forward(listing: &str) -> Option<&str> {
    listing
        .lines()
        .find_map(|l| l.trim().strip_prefix("comment \"ip_forward="))
        .and_then(|v| v.strip_suffix('"'))
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
}

/// The nft batch that turns `egress: all` on for sandbox `id` with addresses `a`. Adding
/// [`EGRESS_TABLE`] again keeps the comment it got first, i.e. the setting from before any
/// sandbox had `egress: all`.
fn masquerade_rules(id: &str, a: &Addresses, ip_forward: &str) -> String {
    let slot = Ipv4Addr::from(u32::from(a.host) - 1);
    let table = egress_table(id);
    format!(
        "add table ip {EGRESS_TABLE} {{ comment \"ip_forward={ip_forward}\"; }}
add chain ip {EGRESS_TABLE} forward {{ type filter hook forward priority 0; }}
flush chain ip {EGRESS_TABLE} forward
add rule ip {EGRESS_TABLE} forward iifname \"mv*\" oifname \"mv*\" drop
table ip {table} {{
  chain postrouting {{ type nat hook postrouting priority 100;
    ip saddr {slot}/29 oifname != \"mv*\" masquerade
  }}
}}
"
    )
}

/// `egress: all` for sandbox `id`: host forwarding plus a masquerade rule for its /29.
fn enable_host_masquerade(id: &str, a: &Addresses) -> Result<()> {
    let _lock = ForwardingLock::acquire()?;
    let before = read_ip_forward()?;
    host::run("nft", &["-f", "-"], Some(&masquerade_rules(id, a, &before)))?;
    write_ip_forward("1")
}

/// Undoes [`enable_host_masquerade`] for sandbox `id` (nothing if it had none); when no
/// `egress: all` sandbox is left on the host, restores the forwarding setting from before the
/// first one and removes [`EGRESS_TABLE`].
fn disable_host_masquerade(id: &str) -> Result<()> {
    let ours = |tables: &[String]| {
        tables
            .iter()
            .any(|t| t == EGRESS_TABLE || t.starts_with(&format!("{EGRESS_TABLE}-")))
    };
    if !ours(&tables("ip")?) {
        return Ok(());
    }
    let _lock = ForwardingLock::acquire()?;
    let tables = tables("ip")?;
    let mine = egress_table(id);
    let mut batch = String::new();
    if tables.contains(&mine) {
        batch.push_str(&format!("delete table ip {mine}\n"));
    }
    let others = tables
        .iter()
        .any(|t| *t != mine && t.starts_with(&format!("{EGRESS_TABLE}-")));
    if !others && tables.iter().any(|t| t == EGRESS_TABLE) {
        let listing = host::run("nft", &["list", "table", "ip", EGRESS_TABLE], None)?;
        match saved_ip_forward(&listing) {
            Some(v) => write_ip_forward(v)?,
            None => tracing::warn!(
                "nft table {EGRESS_TABLE} has no saved ip_forward setting (made by an older \
                 mvm); leaving net.ipv4.ip_forward as it is"
            ),
        }
        batch.push_str(&format!("delete table ip {EGRESS_TABLE}\n"));
    }
    if !batch.is_empty() {
        host::run("nft", &["-f", "-"], Some(&batch))?;
    }
    Ok(())
}

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
    /// `ADDR/PREFIX[,GATEWAY]` for the guest agent's `mvm.ip`.
    pub fn guest_ip(&self) -> String {
        match self.gateway {
            Some(gw) => format!("{}/{},{gw}", self.address, self.prefix),
            None => format!("{}/{}", self.address, self.prefix),
        }
    }
}

/// Runs `f` on a thread inside the network namespace pinned at `netns`.
fn in_netns<T: Send + 'static>(
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

/// Removes sandbox `id`'s host guard table, if it has one.
fn remove_host_guard(id: &str) -> Result<()> {
    let table = guard_table(id);
    if tables("inet")?.contains(&table) {
        host::run("nft", &["delete", "table", "inet", &table], None)?;
    }
    Ok(())
}

/// Removes the namespace, the host side of the veth, the sandbox's host guard and its
/// `egress: all` rules (the last such sandbox also restores the host's forwarding setting).
/// Missing pieces are fine.
pub fn destroy(netns: &Path, id: &str) -> Result<()> {
    let veth = host_veth(id);
    if Path::new("/sys/class/net").join(&veth).exists() {
        // Deleting one end removes the pair; the namespace may already have taken it along.
        if let Err(e) = host::run("ip", &["link", "del", &veth], None) {
            if Path::new("/sys/class/net").join(&veth).exists() {
                return Err(e);
            }
        }
    }
    host::remove_netns(netns)?;
    remove_host_guard(id)?;
    disable_host_masquerade(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_per_slot() {
        let a = Addresses::of(Ipv4Addr::new(10, 213, 0, 0), 1);
        assert_eq!(a.host, Ipv4Addr::new(10, 213, 0, 9));
        assert_eq!(a.sandbox, Ipv4Addr::new(10, 213, 0, 10));
        assert_eq!(a.tap, Ipv4Addr::new(10, 213, 0, 13));
        assert_eq!(a.guest, Ipv4Addr::new(10, 213, 0, 14));
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.1.2.3").unwrap(), "10.1.2.3/32");
        assert_eq!(parse_cidr("10.1.2.3/8").unwrap(), "10.0.0.0/8");
        for bad in ["10.1.2", "10.1.2.3/33", "x", "10.1.2.3/", "::1"] {
            assert!(parse_cidr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn policy_validation() {
        let spec = |egress, allow: &[&str]| NetworkSpec {
            egress,
            allow: allow.iter().map(|s| s.to_string()).collect(),
        };
        assert!(validate(&spec(Egress::Allow, &[])).is_err());
        assert!(validate(&spec(Egress::None, &["1.2.3.4"])).is_err());
        assert_eq!(
            validate(&spec(Egress::Allow, &["1.2.3.4"])).unwrap().allow,
            ["1.2.3.4/32"]
        );
        let rules = ruleset(
            &spec(Egress::Allow, &["1.2.3.4/32"]),
            Isolation::Jail,
            &Addresses::of(Ipv4Addr::new(10, 0, 0, 0), 0),
        );
        assert!(rules.contains("ip daddr { 1.2.3.4/32 } accept"), "{rules}");
        assert!(!rules.contains("masquerade"));
    }

    #[test]
    fn sandboxes_are_kept_apart_and_forwarding_is_remembered() {
        let a = Addresses::of(Ipv4Addr::new(10, 213, 0, 0), 1);
        let spec = |egress| NetworkSpec {
            egress,
            allow: Vec::new(),
        };
        let rules = ruleset(&spec(Egress::All), Isolation::Jail, &a);
        assert!(
            rules.contains("ip saddr 10.213.0.0/16 ip saddr != 10.213.0.9 drop"),
            "{rules}"
        );
        assert!(!ruleset(&spec(Egress::None), Isolation::Jail, &a).contains("mvm-peers"));
        let batch = masquerade_rules("0123456789ab", &a, "0");
        assert!(batch.contains("comment \"ip_forward=0\""), "{batch}");
        assert!(
            batch.contains("table ip mvm-egress-0123456789ab"),
            "{batch}"
        );
        assert!(batch.contains("ip saddr 10.213.0.8/29"), "{batch}");
        let listing = "table ip mvm-egress {\n\tcomment \"ip_forward=0\"\n\tchain forward {\n";
        assert_eq!(saved_ip_forward(listing), Some("0"));
        assert_eq!(saved_ip_forward("table ip mvm-egress {\n}"), None);
        assert_eq!(saved_ip_forward("\tcomment \"ip_forward=1; x\"\n"), None);
    }

    #[test]
    fn guards_drop_spoofed_ipv6_and_private_unless_allowed() {
        let a = Addresses::of(Ipv4Addr::new(10, 213, 0, 0), 1);
        let spec = |egress, allow: &[&str]| NetworkSpec {
            egress,
            allow: allow.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(
            validate(&spec(Egress::All, &["10.1.2.3"])).unwrap().allow,
            ["10.1.2.3/32"]
        );
        let host = host_guard("0123456789ab", &spec(Egress::All, &[]), &a);
        for rule in [
            "iifname \"mv0123456789ab\" jump from_sandbox",
            "meta nfproto ipv6 drop",
            "ip saddr != 10.213.0.10 drop",
            "fib daddr type { local, broadcast, multicast } drop",
            "169.254.0.0/16, 172.16.0.0/12, 192.168.0.0/16",
        ] {
            assert!(host.contains(rule), "{rule} in {host}");
        }
        assert!(host.contains("table inet mvm-guard-0123456789ab"), "{host}");
        // Without allow entries only replies to the host's own connections are accepted.
        assert_eq!(host.matches("accept").count(), 1, "{host}");
        // An allow entry opens its destination before anything is dropped for it.
        let host = host_guard("0123456789ab", &spec(Egress::All, &["10.0.0.0/8"]), &a);
        let open = host
            .find("ip daddr { 10.0.0.0/8 } accept")
            .expect("allow rule");
        assert!(open < host.find("fib daddr").expect("fib rule"), "{host}");
        let jail = ruleset(&spec(Egress::All, &[]), Isolation::Jail, &a);
        assert!(
            jail.contains("oifname \"eth0\" ip saddr != 10.213.0.10 drop"),
            "{jail}"
        );
        assert!(
            jail.contains("oifname \"eth0\" meta nfproto ipv6 drop"),
            "{jail}"
        );
        assert!(!jail.contains("tap0"), "{jail}");
        let vm = ruleset(&spec(Egress::Allow, &["1.2.3.4/32"]), Isolation::Vm, &a);
        for rule in [
            "iifname \"tap0\" ip saddr != 10.213.0.14 drop",
            "iifname \"tap0\" meta nfproto ipv6 drop",
            "iifname \"tap0\" drop",
        ] {
            assert!(vm.contains(rule), "{rule} in {vm}");
        }
        assert!(!ruleset(&spec(Egress::None, &[]), Isolation::Vm, &a).contains("mvm-guard"));
    }

    #[test]
    fn pod_uplink_from_ip_json() {
        let addrs = r#"[{"ifindex":1,"ifname":"lo","address":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]},
            {"ifindex":3,"ifname":"eth0","address":"0a:58:0a:f4:01:05","mtu":1450,"addr_info":[{"family":"inet","local":"10.244.1.5","prefixlen":24}]}]"#;
        let routes = r#"[{"dst":"default","gateway":"10.244.1.1","dev":"eth0"}]"#;
        let up = find_uplink(addrs, routes).unwrap();
        assert_eq!(up.ifname, "eth0");
        assert_eq!(up.mac, "0a:58:0a:f4:01:05");
        assert_eq!(up.guest_ip(), "10.244.1.5/24,10.244.1.1");
        let up = find_uplink(addrs, "[]").unwrap();
        assert_eq!(up.guest_ip(), "10.244.1.5/24");
        let only_lo = r#"[{"ifname":"lo","address":"00:00:00:00:00:00","addr_info":[{"family":"inet","local":"127.0.0.1","prefixlen":8}]}]"#;
        let err = find_uplink(only_lo, "[]").unwrap_err().to_string();
        assert!(err.contains("CNI"), "{err}");
        assert!(find_uplink("not json", "[]").is_err());
    }
}
