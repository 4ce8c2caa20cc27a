//! Per-sandbox networking: a network namespace pinned under the manager's run dir, with a veth
//! pair to the host when the sandbox has egress, a tap for the VM in the vm tier, the egress
//! policy as an nftables ruleset inside the namespace, and a guard table on the host for the
//! destinations only the host can judge (its own addresses). A sandbox can change neither: a
//! jail-tier process has no CAP_NET_ADMIN, a vm guest owns only its own kernel.
//!
//! This file makes and removes a sandbox's network; [`rules`] writes the nftables rulesets
//! (namespace policy, host guard), [`egress`] keeps the host-wide `egress: all` state (forwarding,
//! masquerade), [`ports`] publishes host ports to the sandbox, [`connect`] opens the port proxy's
//! connections from inside it and [`pod`] joins a container runtime's pod namespace instead.

pub mod connect;
mod dns;
mod egress;
mod pod;
pub mod policy;
mod ports;
pub mod proxy;
pub mod resolver;
mod rules;
pub mod secrets;

pub use dns::{resolver_pids, write_resolv_conf, DnsUpstream, RESOLVER_ADDR};
pub use pod::{join_pod_netns, leave_pod_netns, PodUplink};
pub use ports::{
    check_unbound as check_ports_unbound, overlap as ports_overlap, validate as validate_ports,
    MAX_PORTS,
};
pub use rules::PROXY_ADDR;
pub use secrets::{proxy_pids, Secret};

use std::net::Ipv4Addr;
use std::path::Path;

use crate::error::{Error, Result};
use crate::manager::host;
use crate::model::{Egress, Isolation, NetworkInfo, NetworkSpec, PortMapping};
use egress::{disable_forwarding, enable_host_masquerade};
use policy::AllowEntry;
use ports::{publish, unpublish};
use rules::{host_guard, remove_host_guard, replace_allowed, ruleset};

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

/// Checks a requested network and returns it normalized.
pub fn validate(spec: &NetworkSpec) -> Result<NetworkSpec> {
    let entries = policy::parse_list(&spec.allow)?;
    match spec.egress {
        Egress::Allow if entries.is_empty() => {
            return Err(Error::Invalid(
                "network.egress \"allow\" needs at least one network.allow entry".into(),
            ))
        }
        Egress::None if !entries.is_empty() => {
            return Err(Error::Invalid(
                "network.allow is only used with network.egress \"allow\" or \"all\"".into(),
            ))
        }
        Egress::All if entries.iter().any(AllowEntry::is_name) => {
            return Err(Error::Invalid(
                "network.allow names (like api.example.com) are used with network.egress \
                 \"allow\"; with \"all\" every public name is reachable already, and a name \
                 never opens a private or host address (list its CIDR for that)"
                    .into(),
            ))
        }
        _ => {}
    }
    Ok(NetworkSpec {
        egress: spec.egress,
        allow: entries.iter().map(ToString::to_string).collect(),
    })
}

/// Whether a sandbox has a veth to the host: with egress, or to reach its published ports.
pub fn has_veth(spec: &NetworkSpec, ports: &[PortMapping]) -> bool {
    spec.egress != Egress::None || !ports.is_empty()
}

/// What a sandbox with egress `allow` needs for its resolver.
pub struct DnsSetup<'a> {
    /// The directory of `mvm-dns`.
    pub bin_dir: &'a Path,
    /// Where the resolver sends queries.
    pub upstream: &'a DnsUpstream,
    /// The sandbox's egress proxy, when it has secrets.
    pub proxy: Option<ProxySetup<'a>>,
}

/// What the egress proxy of a sandbox with secrets needs.
pub struct ProxySetup<'a> {
    /// The secrets (values included).
    pub secrets: &'a [Secret],
    /// The sandbox's CA key (PEM).
    pub ca_key_pem: &'a str,
    /// The audit log of the secrets' uses.
    pub audit: &'a Path,
    /// Another CA file the secret hosts' certificates may chain to.
    pub extra_ca: Option<&'a Path>,
}

/// Makes the namespace at `netns`: loopback up and, in the vm tier, the tap the VMM opens
/// (owned by the sandbox's `uid`) with its address, up. This is all a jail or a VMM needs to
/// start; [`connect`] gives the namespace its way out and its rules meanwhile. Nothing leaves
/// the namespace before that: it has no other link. On failure nothing is left behind.
pub fn create_namespace(
    netns: &Path,
    isolation: Isolation,
    addrs: Addresses,
    uid: u32,
) -> Result<()> {
    host::create_netns(netns, move || {
        if isolation == Isolation::Vm {
            mvm_sys::tap::create_persistent(TAP_IF, Some(uid))
                .map_err(|e| Error::host("making the sandbox's tap", e))?;
            host::interface_up(TAP_IF, Some((addrs.tap, 30)))
                .map_err(|e| Error::host(format!("bringing the sandbox's tap {TAP_IF} up"), e))?;
        }
        Ok(())
    })
}

/// What sandbox `id` gets of its network: its policy, ports, secrets, and its address and
/// gateway when it has a veth.
pub fn info(
    spec: &NetworkSpec,
    ports: &[PortMapping],
    secrets: &[Secret],
    isolation: Isolation,
    addrs: Addresses,
) -> NetworkInfo {
    let veth_wanted = has_veth(spec, ports);
    NetworkInfo {
        netns: None,
        ports: ports.to_vec(),
        egress: spec.egress,
        allow: spec.allow.clone(),
        secrets: secrets.iter().map(Secret::info).collect(),
        address: veth_wanted.then(|| match isolation {
            Isolation::Jail => addrs.sandbox.to_string(),
            Isolation::Vm => addrs.guest.to_string(),
        }),
        gateway: veth_wanted.then(|| match isolation {
            Isolation::Jail => addrs.host.to_string(),
            Isolation::Vm => addrs.tap.to_string(),
        }),
    }
}

/// Connects the namespace at `netns` (made by [`create_namespace`]) of sandbox `id`: its
/// rules, and with egress or `ports` a veth to the host behind the host's guard, the
/// published ports, and with egress `allow` its resolver (`dns`). It may run while the
/// sandbox starts: the host's end of the veth comes up only once both sides' rules are
/// loaded, and the namespace forwards only then. On failure the caller removes the network
/// ([`destroy`]).
pub fn connect(
    netns: &Path,
    id: &str,
    spec: &NetworkSpec,
    ports: &[PortMapping],
    isolation: Isolation,
    addrs: Addresses,
    dns: &DnsSetup,
) -> Result<()> {
    let veth = host_veth(id);
    let veth_wanted = has_veth(spec, ports);
    let resolver = if spec.egress == Egress::Allow {
        Some(dns::Listener::bind(addrs.host)?)
    } else {
        None
    };
    let proxy = match (&resolver, &dns.proxy) {
        (Some(_), Some(_)) => Some(secrets::ProxyListener::bind(addrs.host)?),
        _ => None,
    };
    let listen = resolver.as_ref().map(|r| rules::DnsListen {
        proxy: proxy.as_ref().map(|p| p.port),
        ..r.listen
    });
    let rules = ruleset(spec, ports, isolation, &addrs, listen);
    let mvmd_pid = std::process::id().to_string();
    let veth_inside = veth.clone();
    let inside = move || {
        let batch = match veth_wanted {
            true => format!(
                "link add {SANDBOX_IF} type veth peer name {veth_inside} netns {mvmd_pid}\n\
                 addr add {}/30 dev {SANDBOX_IF}\nlink set {SANDBOX_IF} up\n\
                 route add default via {}\n",
                addrs.sandbox, addrs.host
            ),
            false => String::new(),
        };
        // The rules name interfaces, so they load while `ip` makes them (a thread made here
        // is in the namespace too).
        std::thread::scope(|scope| {
            let loaded = scope.spawn(|| match rules.lines().count() > 1 {
                true => host::run("nft", &["-f", "-"], Some(&rules)).map(drop),
                false => Ok(()),
            });
            let linked = match batch.is_empty() {
                true => Ok(()),
                false => host::run("ip", &["-batch", "-"], Some(&batch)).map(drop),
            };
            let loaded = joined(loaded, "loading the sandbox's rules");
            linked.and(loaded)
        })?;
        if isolation == Isolation::Vm && veth_wanted {
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
                .map_err(|e| Error::host("enabling forwarding in the sandbox netns", e))?;
        }
        Ok(())
    };
    // The host's guard (and masquerade: both egress modes leave the host masqueraded, `allow`
    // only to what it allows) loads while the namespace is wired; the host's end of the veth
    // comes up only after both, so it carries nothing unguarded.
    let guard = veth_wanted.then(|| host_guard(id, spec, &addrs, listen));
    std::thread::scope(|scope| {
        let guarded = guard.as_deref().map(|guard| {
            scope.spawn(move || match spec.egress {
                Egress::None => host::run("nft", &["-f", "-"], Some(guard)).map(drop),
                _ => enable_host_masquerade(id, &addrs, guard),
            })
        });
        let made = pod::in_netns(netns, inside);
        let guarded = guarded.map_or(Ok(()), |g| joined(g, "loading the host's guard"));
        made.and(guarded)
    })?;
    if veth_wanted {
        host::interface_up(&veth, Some((addrs.host, 30)))
            .map_err(|e| Error::host(format!("bringing the sandbox's veth {veth} up"), e))?;
        publish(id, &addrs, ports)?;
    }
    let Some(listener) = resolver else {
        return Ok(());
    };
    dns::Resolver {
        id,
        bin_dir: dns.bin_dir,
        netns,
        client: addrs.sandbox,
        upstream: dns.upstream,
    }
    .start(listener, &spec.allow, dns.proxy.as_ref().map(|p| p.secrets))?;
    match (proxy, &dns.proxy) {
        (Some(listener), Some(setup)) => secrets::start(
            dns.bin_dir,
            listener,
            &secrets::ProxyConfig {
                sandbox: id.to_owned(),
                client: addrs.sandbox,
                upstream: dns.upstream.0.clone(),
                audit: setup.audit.to_owned(),
                extra_ca: setup.extra_ca.map(Path::to_owned),
                ca_key_pem: setup.ca_key_pem.to_owned(),
                secrets: setup.secrets.to_vec(),
            },
        ),
        _ => Ok(()),
    }
}

/// The result of a scoped thread doing `what`; its panic is an error.
fn joined(thread: std::thread::ScopedJoinHandle<'_, Result<()>>, what: &str) -> Result<()> {
    thread
        .join()
        .unwrap_or_else(|_| Err(Error::Host(format!("{what}: the thread panicked"))))
}

/// Replaces the allow list of running sandbox `id` (egress `allow`, namespace at `netns`) with
/// `spec`'s: the rules in its namespace and its host guard, its resolver's policy, and the
/// addresses of names answered by the old list (the next answers fill them again).
/// Connections already open stay open.
pub fn update_allow(netns: &Path, id: &str, spec: &NetworkSpec) -> Result<()> {
    let (inside, host_side) = replace_allowed(id, spec);
    dns::write_policy(&dns::policy_path(netns, id), &spec.allow, || {
        pod::in_netns(netns, move || {
            host::run("nft", &["-f", "-"], Some(&inside)).map(drop)
        })?;
        host::run("nft", &["-f", "-"], Some(&host_side)).map(drop)
    })
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

/// Removes the namespace and what [`disconnect`] removes. Missing pieces are fine.
pub fn destroy(netns: &Path, id: &str) -> Result<()> {
    disconnect(netns, id)?;
    host::remove_netns(netns)
}

/// Undoes [`connect`] but for the namespace's own rules, which the next [`connect`]
/// replaces whole: the veth, the resolver and the egress proxy, the host's guard, the
/// published ports and the `egress: all` rules (the last such sandbox also restores the
/// host's forwarding setting). Missing pieces are fine.
pub fn disconnect(netns: &Path, id: &str) -> Result<()> {
    let veth = host_veth(id);
    if Path::new("/sys/class/net").join(&veth).exists() {
        // Deleting one end removes the pair; the namespace may already have taken it along.
        if let Err(e) = host::run("ip", &["link", "del", &veth], None) {
            if Path::new("/sys/class/net").join(&veth).exists() {
                return Err(e);
            }
        }
    }
    dns::stop(netns, id)?;
    secrets::stop(id)?;
    remove_host_guard(id)?;
    unpublish(id)?;
    disable_forwarding(id)
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

    /// A vm-tier namespace holds the VMM's tap, persistent, for the sandbox's uid only, with
    /// the gateway's address, up; it goes with the namespace.
    #[test]
    fn a_vm_namespace_has_its_tap_for_the_sandbox_uid() {
        if !mvm_testkit::root_or_skip("a_vm_namespace_has_its_tap_for_the_sandbox_uid") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let netns = dir.path().join("ns");
        let addrs = Addresses::of(Ipv4Addr::new(10, 213, 0, 0), 3);
        create_namespace(&netns, Isolation::Vm, addrs, 4321).unwrap();
        let shown = pod::in_netns(&netns, || {
            Ok([
                host::run("ip", &["-d", "-o", "link", "show", "dev", TAP_IF], None)?,
                host::run("ip", &["-o", "-4", "addr", "show", "dev", TAP_IF], None)?,
            ])
        });
        host::remove_netns(&netns).unwrap();
        let [link, addr] = shown.unwrap();
        assert!(link.contains("tun type tap pi off"), "{link}");
        assert!(link.contains("persist on user 4321"), "{link}");
        assert!(link.contains(",UP"), "{link}");
        assert!(addr.contains(&format!("inet {}/30", addrs.tap)), "{addr}");
        assert!(!netns.exists());
    }

    #[test]
    fn policy_validation() {
        let spec = |egress, allow: &[&str]| NetworkSpec {
            egress,
            allow: allow.iter().map(|s| s.to_string()).collect(),
        };
        validate(&spec(Egress::Allow, &[])).unwrap_err();
        validate(&spec(Egress::None, &["1.2.3.4"])).unwrap_err();
        // A name never opens anything with `all` (everything public is open already).
        validate(&spec(Egress::All, &["api.example.com"])).unwrap_err();
        assert_eq!(
            validate(&spec(
                Egress::Allow,
                &["API.example.com.:443", "10.1.2.3/8"]
            ))
            .unwrap()
            .allow,
            ["api.example.com:443", "10.0.0.0/8"]
        );
        assert_eq!(
            validate(&spec(Egress::Allow, &["1.2.3.4"])).unwrap().allow,
            ["1.2.3.4/32"]
        );
        let rules = ruleset(
            &spec(Egress::Allow, &["1.2.3.4/32"]),
            &[],
            Isolation::Jail,
            &Addresses::of(Ipv4Addr::new(10, 0, 0, 0), 0),
            None,
        );
        assert!(rules.contains("ip daddr { 1.2.3.4/32 } accept"), "{rules}");
        assert!(!rules.contains("masquerade"));
    }
}
