//! The nftables rulesets of a sandbox's network: the egress policy inside its namespace and
//! the guard on the host for what only the host can judge.

use std::net::Ipv4Addr;

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
pub(super) fn host_guard(id: &str, spec: &NetworkSpec, a: &Addresses) -> String {
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

/// The nftables ruleset loaded in the namespace. A sandbox publishing `ports` has a veth
/// whatever its egress: with `egress: none` nothing but the replies of the published
/// connections leaves it.
pub(super) fn ruleset(
    spec: &NetworkSpec,
    ports: &[PortMapping],
    isolation: Isolation,
    a: &Addresses,
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
    if spec.egress == Egress::Allow || (spec.egress == Egress::None && !ports.is_empty()) {
        let allowed = |rule: &str| {
            if spec.allow.is_empty() {
                String::new()
            } else {
                format!(
                    "    {rule}ip daddr {{ {} }} accept\n",
                    spec.allow.join(", ")
                )
            }
        };
        let published = if isolation == Isolation::Vm && !ports.is_empty() {
            namespace_forward_accept()
        } else {
            String::new()
        };
        rules.push_str(&format!(
            "table inet mvm {{
  chain output {{ type filter hook output priority 0; policy drop;
    oifname \"lo\" accept
    ct state established,related accept
{}    reject
  }}
  chain forward {{ type filter hook forward priority 0; policy drop;
    ct state established,related accept
{published}{}    reject
  }}
}}
",
            allowed(""),
            allowed(&format!("iifname \"{TAP_IF}\" ")),
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
    fn sandboxes_are_kept_apart_and_forwarding_is_remembered() {
        let a = Addresses::of(Ipv4Addr::new(10, 213, 0, 0), 1);
        let spec = |egress| NetworkSpec {
            egress,
            allow: Vec::new(),
        };
        let rules = ruleset(&spec(Egress::All), &[], Isolation::Jail, &a);
        assert!(
            rules.contains("ip saddr 10.213.0.0/16 ip saddr != 10.213.0.9 drop"),
            "{rules}"
        );
        assert!(!ruleset(&spec(Egress::None), &[], Isolation::Jail, &a).contains("mvm-peers"));
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
        let jail = ruleset(&spec(Egress::All, &[]), &[], Isolation::Jail, &a);
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
        );
        for rule in [
            "iifname \"tap0\" ip saddr != 10.213.0.14 drop",
            "iifname \"tap0\" meta nfproto ipv6 drop",
            "iifname \"tap0\" drop",
        ] {
            assert!(vm.contains(rule), "{rule} in {vm}");
        }
        assert!(!ruleset(&spec(Egress::None, &[]), &[], Isolation::Vm, &a).contains("mvm-guard"));
    }
}
