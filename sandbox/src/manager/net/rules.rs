//! The nftables rulesets of a sandbox's network: the egress policy inside its namespace and
//! the guard on the host for what only the host can judge.

use std::net::Ipv4Addr;

use super::policy::{AllowEntry, Target};
use super::ports::{namespace_forward_accept, namespace_rules};
use super::{has_veth, host_veth, tables, Addresses, SANDBOX_IF, TAP_IF};
use crate::error::Result;
use crate::manager::host;
use crate::model::{Egress, Isolation, NetworkSpec, PortMapping};

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

/// Whether a sandbox's guard keeps a connection to `addr` unless the sandbox's policy names
/// it: an address in [`BLOCKED_V4`], or one of the host's own (one a socket can bind).
pub(super) fn guarded(addr: Ipv4Addr) -> bool {
    let in_blocked = BLOCKED_V4.iter().any(|cidr| {
        let (net, len) = cidr.split_once('/').expect("a CIDR");
        let (net, len): (Ipv4Addr, u32) = (
            net.parse().expect("an address"),
            len.parse().expect("a length"),
        );
        let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
        u32::from(addr) & mask == u32::from(net)
    });
    in_blocked || std::net::UdpSocket::bind((addr, 0)).is_ok()
}

/// The namespace's guard: nothing leaves with a source that is not the sandbox's own, no
/// IPv6 at all (a sandbox has no IPv6 address), and in the vm tier the guest cannot reach
/// the namespace itself (its gateway is only for routing); only the replies of connections
/// opened to it from the namespace (mvmd's port proxy) come back.
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
    iifname \"{TAP_IF}\" ct state established accept
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

/// The parsed entries of a validated allow list.
fn entries(spec: &NetworkSpec) -> Vec<AllowEntry> {
    // Validated when the sandbox was made or changed: every entry parses.
    spec.allow
        .iter()
        .filter_map(|e| AllowEntry::parse(e).ok())
        .collect()
}

/// The rules of an `allowed` chain: each address entry (on its port, when it has one) and,
/// with `names`, the addresses the resolver put in the namespace's sets.
fn allowed_rules(entries: &[AllowEntry], names: bool) -> Vec<String> {
    let any_port: Vec<&str> = entries
        .iter()
        .filter_map(|e| match (&e.target, e.port) {
            (Target::Cidr(c), None) => Some(c.as_str()),
            _ => None,
        })
        .collect();
    let mut rules = Vec::new();
    if !any_port.is_empty() {
        rules.push(format!("ip daddr {{ {} }} accept", any_port.join(", ")));
    }
    for e in entries {
        if let (Target::Cidr(c), Some(port)) = (&e.target, e.port) {
            rules.push(format!(
                "meta l4proto {{ tcp, udp }} ip daddr {c} th dport {port} accept"
            ));
        }
    }
    if names {
        rules.push(format!("ip daddr @{DNS_SET} accept"));
        rules.push(format!(
            "meta l4proto {{ tcp, udp }} ip daddr . th dport @{DNS_PORT_SET} accept"
        ));
    }
    rules
}

/// The chain `allowed` of `table` with `rules`, as a block inside the table's definition.
fn allowed_chain(rules: &[String]) -> String {
    let mut chain = String::from("  chain allowed {\n");
    for r in rules {
        chain.push_str(&format!("    {r}\n"));
    }
    chain.push_str("  }\n");
    chain
}

/// The namespace's set of the addresses the resolver answered for allowed names (open on every
/// port), each for its TTL.
pub const DNS_SET: &str = "dns4";
/// The namespace's set of address . port pairs the resolver answered for names allowed on one
/// port.
pub const DNS_PORT_SET: &str = "dns4_ports";

/// The address every sandbox with egress `allow` has as its nameserver (the same for all, so
/// that a VM restored or forked into another slot keeps a working resolv.conf): its namespace
/// maps port 53 there to its own resolver ([`DnsListen`]). Link-local, like the DNS address of
/// cloud VPCs; nothing else of 169.254/16 is reachable.
pub const RESOLVER_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 53, 53);

/// The address the resolver answers for the hosts of a sandbox's secrets: its namespace maps
/// port 443 there to the sandbox's egress proxy ([`DnsListen::proxy`]).
pub const PROXY_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 53, 54);

/// Where a sandbox's helpers listen on its gateway (the host end of its veth): the resolver
/// on `port`, which the namespace maps port 53 of [`RESOLVER_ADDR`] to, and the egress proxy
/// of a sandbox with secrets on `proxy`, which port 443 of [`PROXY_ADDR`] is mapped to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct DnsListen {
    pub port: u16,
    pub proxy: Option<u16>,
}

/// The rules that let DNS to the resolver at `a`'s gateway through `dns` (and HTTPS to its
/// egress proxy), for a chain, each prefixed with `prefix`.
fn dns_accept(a: &Addresses, dns: DnsListen, prefix: &str) -> String {
    let mut rules = format!(
        "    {prefix}ip daddr {} meta l4proto {{ tcp, udp }} th dport {} accept\n",
        a.host, dns.port
    );
    if let Some(proxy) = dns.proxy {
        rules.push_str(&format!(
            "    {prefix}ip daddr {} tcp dport {proxy} accept\n",
            a.host
        ));
    }
    rules
}

/// The host-side guard of sandbox `id`, for every egress mode with a veth: what comes in
/// from its veth is dropped when it is IPv6, has another source than the sandbox's address,
/// or goes to one of the host's own addresses (its gateway included) or to [`BLOCKED_V4`],
/// unless an address entry of `allow` names the destination (names never open these: a DNS
/// answer cannot open the host or its LAN) or it is the query of the sandbox's own resolver
/// (`dns`). Replies to connections the host opened pass. It hooks prerouting before
/// destination NAT, so a port the host forwards elsewhere is judged by the host address it
/// was sent to.
pub(super) fn host_guard(
    id: &str,
    spec: &NetworkSpec,
    a: &Addresses,
    dns: Option<DnsListen>,
) -> String {
    let dns = dns.map(|d| dns_accept(a, d, "")).unwrap_or_default();
    format!(
        "table inet {} {{
{}  chain prerouting {{ type filter hook prerouting priority -150;
    iifname \"{}\" jump from_sandbox
  }}
  chain from_sandbox {{
    meta nfproto ipv6 drop
    ip saddr != {} drop
    ct state established,related accept
    jump allowed
{dns}    fib daddr type {{ local, broadcast, multicast }} drop
    ip daddr {{ {} }} drop
  }}
}}
",
        guard_table(id),
        allowed_chain(&allowed_rules(&entries(spec), false)),
        host_veth(id),
        a.sandbox,
        BLOCKED_V4.join(", ")
    )
}

/// The nft batch that replaces the allow list of running sandbox `id` (egress `allow`) with
/// `spec`'s: the `allowed` chains of its namespace and of its host guard, and the addresses
/// of names answered before (the resolver answers anew by the new list). Returns the
/// namespace's batch and the host's.
pub(super) fn replace_allowed(id: &str, spec: &NetworkSpec) -> (String, String) {
    let entries = entries(spec);
    let batch = |table: &str, rules: Vec<String>| {
        let mut b = format!("flush chain {table} allowed\n");
        for r in rules {
            b.push_str(&format!("add rule {table} allowed {r}\n"));
        }
        b
    };
    let mut inside = batch("inet mvm", allowed_rules(&entries, true));
    inside.push_str(&format!(
        "flush set inet mvm {DNS_SET}\nflush set inet mvm {DNS_PORT_SET}\n"
    ));
    let host = batch(
        &format!("inet {}", guard_table(id)),
        allowed_rules(&entries, false),
    );
    (inside, host)
}

/// The nftables ruleset loaded in the namespace. A sandbox publishing `ports` has a veth
/// whatever its egress: with `egress: none` nothing but the replies of the published
/// connections leaves it. With `egress: allow` its DNS (port 53 of its gateway) goes to its
/// resolver (`dns`), and what the resolver answers for allowed names is in sets.
pub(super) fn ruleset(
    spec: &NetworkSpec,
    ports: &[PortMapping],
    isolation: Isolation,
    a: &Addresses,
    dns: Option<DnsListen>,
) -> String {
    let mut rules = String::from("flush ruleset\n");
    if has_veth(spec, ports) {
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
    let allow = spec.egress == Egress::Allow;
    if allow || (spec.egress == Egress::None && !ports.is_empty()) {
        let published = if isolation == Isolation::Vm && !ports.is_empty() {
            namespace_forward_accept()
        } else {
            String::new()
        };
        let (sets, allowed, jump, jump_forward) = if allow {
            (
                format!(
                    "  set {DNS_SET} {{ type ipv4_addr; flags timeout; }}
  set {DNS_PORT_SET} {{ type ipv4_addr . inet_service; flags timeout; }}
"
                ),
                allowed_chain(&allowed_rules(&entries(spec), true)),
                "    jump allowed\n".to_owned(),
                format!("    iifname \"{TAP_IF}\" jump allowed\n"),
            )
        } else {
            Default::default()
        };
        // mvmd's port proxy connects to the guest from the namespace.
        let proxy = if isolation == Isolation::Vm {
            format!(
                "    oifname \"{TAP_IF}\" ip daddr {} meta l4proto tcp accept\n",
                a.guest
            )
        } else {
            String::new()
        };
        let (dns, dns_forward) = match dns {
            Some(d) => (
                dns_accept(a, d, ""),
                dns_accept(a, d, &format!("iifname \"{TAP_IF}\" ")),
            ),
            None => Default::default(),
        };
        rules.push_str(&format!(
            "table inet mvm {{
{sets}{allowed}  chain output {{ type filter hook output priority 0; policy drop;
    oifname \"lo\" accept
    ct state established,related accept
{proxy}{dns}{jump}    reject
  }}
  chain forward {{ type filter hook forward priority 0; policy drop;
    ct state established,related accept
{published}{dns_forward}{jump_forward}    reject
  }}
}}
"
        ));
    }
    if let Some(d) = dns {
        // The resolver's port on the gateway (which the host chose free).
        // And the proxy's, for port 443 of the secret hosts' address.
        let to = |iif: &str| {
            let mut rules = ["udp", "tcp"]
                .map(|proto| {
                    format!(
                        "{iif}ip daddr {RESOLVER_ADDR} {proto} dport 53 dnat to {}:{}; ",
                        a.host, d.port
                    )
                })
                .concat();
            if let Some(proxy) = d.proxy {
                rules.push_str(&format!(
                    "{iif}ip daddr {PROXY_ADDR} tcp dport 443 dnat to {}:{proxy}; ",
                    a.host
                ));
            }
            rules
        };
        rules.push_str(&format!(
            "table ip mvm-dns {{
  chain output {{ type nat hook output priority -100; {}}}
  chain prerouting {{ type nat hook prerouting priority -100; {}}}
}}
",
            to(""),
            to(&format!("iifname \"{TAP_IF}\" "))
        ));
    }
    rules.push_str(&namespace_rules(isolation, a, ports));
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

/// Removes sandbox `id`'s host guard table, if it has one.
pub(super) fn remove_host_guard(id: &str) -> Result<()> {
    let table = guard_table(id);
    if tables("inet")?.contains(&table) {
        host::run("nft", &["delete", "table", "inet", &table], None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manager::net::egress::{masquerade_rules, saved_ip_forward};
    use crate::manager::net::validate;

    #[test]
    fn guarded_addresses_are_the_blocked_ranges_and_the_hosts_own() {
        for a in [
            "10.1.2.3",
            "127.0.0.1",
            "169.254.169.254",
            "172.20.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "224.0.0.1",
            "0.0.0.0",
        ] {
            assert!(guarded(a.parse().unwrap()), "{a}");
        }
        for a in ["1.1.1.1", "198.19.0.7", "172.32.0.1"] {
            assert!(!guarded(a.parse().unwrap()), "{a}");
        }
    }

    #[test]
    fn sandboxes_are_kept_apart_and_forwarding_is_remembered() {
        let a = Addresses::of(Ipv4Addr::new(10, 213, 0, 0), 1);
        let spec = |egress| NetworkSpec {
            egress,
            allow: Vec::new(),
        };
        let rules = ruleset(&spec(Egress::All), &[], Isolation::Jail, &a, None);
        assert!(
            rules.contains("ip saddr 10.213.0.0/16 ip saddr != 10.213.0.9 drop"),
            "{rules}"
        );
        assert!(
            !ruleset(&spec(Egress::None), &[], Isolation::Jail, &a, None).contains("mvm-peers")
        );
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
        let host = host_guard("0123456789ab", &spec(Egress::All, &[]), &a, None);
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
        let host = host_guard(
            "0123456789ab",
            &spec(Egress::All, &["10.0.0.0/8"]),
            &a,
            None,
        );
        let open = host
            .find("ip daddr { 10.0.0.0/8 } accept")
            .expect("allow rule");
        assert!(open < host.find("fib daddr").expect("fib rule"), "{host}");
        let jail = ruleset(&spec(Egress::All, &[]), &[], Isolation::Jail, &a, None);
        assert!(
            jail.contains("oifname \"eth0\" ip saddr != 10.213.0.10 drop"),
            "{jail}"
        );
        assert!(
            jail.contains("oifname \"eth0\" meta nfproto ipv6 drop"),
            "{jail}"
        );
        assert!(!jail.contains("tap0"), "{jail}");
        let vm = ruleset(
            &spec(Egress::Allow, &["1.2.3.4/32"]),
            &[],
            Isolation::Vm,
            &a,
            None,
        );
        for rule in [
            "iifname \"tap0\" ip saddr != 10.213.0.14 drop",
            "iifname \"tap0\" meta nfproto ipv6 drop",
            "iifname \"tap0\" drop",
            // The port proxy's connections from the namespace to the guest, and their replies.
            "oifname \"tap0\" ip daddr 10.213.0.14 meta l4proto tcp accept",
            "iifname \"tap0\" ct state established accept",
        ] {
            assert!(vm.contains(rule), "{rule} in {vm}");
        }
        assert!(
            vm.find("ct state established accept") < vm.find("iifname \"tap0\" drop"),
            "{vm}"
        );
        assert!(!jail.contains("ct state established accept"), "{jail}");
        assert!(
            !ruleset(&spec(Egress::None, &[]), &[], Isolation::Vm, &a, None).contains("mvm-guard")
        );
    }

    #[test]
    fn names_go_to_the_resolver_and_ports_restrict() {
        let a = Addresses::of(Ipv4Addr::new(10, 213, 0, 0), 1);
        let spec = NetworkSpec {
            egress: Egress::Allow,
            allow: vec!["api.example.com".into(), "10.0.0.0/8:443".into()],
        };
        let dns = Some(DnsListen {
            port: 40000,
            proxy: Some(40001),
        });
        let vm = ruleset(&spec, &[], Isolation::Vm, &a, dns);
        for rule in [
            "set dns4 { type ipv4_addr; flags timeout; }",
            "set dns4_ports { type ipv4_addr . inet_service; flags timeout; }",
            "ip daddr @dns4 accept",
            "meta l4proto { tcp, udp } ip daddr . th dport @dns4_ports accept",
            "meta l4proto { tcp, udp } ip daddr 10.0.0.0/8 th dport 443 accept",
            "ip daddr 10.213.0.9 meta l4proto { tcp, udp } th dport 40000 accept",
            "ip daddr 169.254.53.53 udp dport 53 dnat to 10.213.0.9:40000",
            "iifname \"tap0\" ip daddr 169.254.53.53 tcp dport 53 dnat to 10.213.0.9:40000",
            "iifname \"tap0\" jump allowed",
            "ip daddr 10.213.0.9 tcp dport 40001 accept",
            "iifname \"tap0\" ip daddr 10.213.0.9 tcp dport 40001 accept",
            "ip daddr 169.254.53.54 tcp dport 443 dnat to 10.213.0.9:40001",
            "iifname \"tap0\" ip daddr 169.254.53.54 tcp dport 443 dnat to 10.213.0.9:40001",
        ] {
            assert!(vm.contains(rule), "{rule} in {vm}");
        }
        // The host guard: the resolver's port on the gateway, before the host's addresses are
        // dropped; names open nothing there, the port-restricted CIDR only its port.
        let host = host_guard("0123456789ab", &spec, &a, dns);
        let resolver = host
            .find("ip daddr 10.213.0.9 meta l4proto { tcp, udp } th dport 40000 accept")
            .expect("the resolver rule");
        assert!(
            resolver < host.find("fib daddr").expect("fib rule"),
            "{host}"
        );
        assert!(!host.contains("@dns4"), "{host}");
        let proxy = host
            .find("ip daddr 10.213.0.9 tcp dport 40001 accept")
            .expect("the proxy rule");
        assert!(proxy < host.find("fib daddr").expect("fib rule"), "{host}");
        assert!(
            host.contains("ip daddr 10.0.0.0/8 th dport 443 accept"),
            "{host}"
        );
        assert!(!host.contains("ip daddr { 10.0.0.0/8 }"), "{host}");
        let (inside, host) = replace_allowed("0123456789ab", &spec);
        assert!(
            inside.starts_with("flush chain inet mvm allowed\n"),
            "{inside}"
        );
        assert!(
            inside.contains("add rule inet mvm allowed ip daddr @dns4 accept"),
            "{inside}"
        );
        assert!(inside.contains("flush set inet mvm dns4\n"), "{inside}");
        assert!(
            host.starts_with("flush chain inet mvm-guard-0123456789ab allowed\n"),
            "{host}"
        );
    }
}
