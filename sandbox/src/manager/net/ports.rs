//! Published ports: TCP (or UDP) to an address and port of the host reaches a port of the
//! sandbox, for as long as it lives.
//!
//! Each sandbox with ports has a host table `ip mvm-ports-<id>` whose `output` chain
//! destination-NATs the host's own connections to `host_ip:host_port` to the sandbox's veth
//! address and `guest_port`, and whose `postrouting` chain masquerades them behind the
//! sandbox's gateway (so the sandbox answers its gateway, the only peer its namespace admits).
//! A port on an address other hosts reach (`0.0.0.0`: every address of the host) is also
//! destination-NATed in `prerouting` for what arrives from outside (never from a sandbox
//! veth, whose guard drops host addresses anyway), and the host forwards it: forwarding is on
//! while such a sandbox lives, kept and restored like `egress: all`'s. A vm-tier namespace
//! forwards the port on to the guest. The kernel state alone does it: no proxy process, so a
//! daemonless `mvm run -d -p` may exit.
//!
//! A connection from 127.0.0.1 leaves through the sandbox's veth, which Linux allows only with
//! `route_localnet` on that interface: it is set on the sandbox's host veth alone (and goes
//! with it), only for ports on loopback addresses or `0.0.0.0`, and the table drops anything the sandbox sends to
//! 127.0.0.0/8 before routing, so the setting admits only the replies of the forwarded
//! connections.

use std::collections::BTreeSet;
use std::net::{TcpListener, UdpSocket};

use super::egress::enable_inbound_forwarding;
use super::{host_veth, tables, Addresses, SANDBOX_IF, TAP_IF};
use crate::error::{Error, Result};
use crate::manager::host;
use crate::model::{Isolation, PortMapping, PortProtocol};

/// Most ports one sandbox publishes.
pub const MAX_PORTS: usize = 16;

/// The host table of sandbox `id`'s published ports.
fn ports_table(id: &str) -> String {
    format!("mvm-ports-{id}")
}

/// Whether `a` and `b` take the same host port of one protocol on a common address
/// (`0.0.0.0` takes every address).
pub fn overlap(a: &PortMapping, b: &PortMapping) -> bool {
    a.protocol == b.protocol
        && a.host_port == b.host_port
        && (a.host_ip == b.host_ip || a.host_ip.is_unspecified() || b.host_ip.is_unspecified())
}

/// Checks the ports a create asks for: at most [`MAX_PORTS`], ports 1 to 65535 on a unicast
/// host address or `0.0.0.0`, no host port taken twice on a common address.
pub fn validate(ports: &[PortMapping]) -> Result<()> {
    if ports.len() > MAX_PORTS {
        return Err(Error::Invalid(format!(
            "ports: at most {MAX_PORTS} per sandbox, got {}",
            ports.len()
        )));
    }
    for (i, p) in ports.iter().enumerate() {
        if p.host_port == 0 || p.guest_port == 0 {
            return Err(Error::Invalid(format!(
                "ports: host_port and guest_port must be 1 to 65535, got {}:{}",
                p.host_port, p.guest_port
            )));
        }
        if p.host_ip.is_multicast() || p.host_ip.is_broadcast() {
            return Err(Error::Invalid(format!(
                "ports: host_ip {} is not an address of this host (give 127.0.0.1, the \
                 default, one of its addresses, or 0.0.0.0 for all of them)",
                p.host_ip
            )));
        }
        if ports[..i].iter().any(|q| overlap(p, q)) {
            return Err(Error::Invalid(format!(
                "ports: {}:{}/{} is published twice",
                p.host_ip,
                p.host_port,
                p.protocol.as_str()
            )));
        }
    }
    Ok(())
}

/// Refuses ports that a host process has bound (their connections would go to the sandbox)
/// and addresses the host does not have.
pub fn check_unbound(ports: &[PortMapping]) -> Result<()> {
    for p in ports {
        let bound = match p.protocol {
            PortProtocol::Tcp => TcpListener::bind((p.host_ip, p.host_port)).map(drop),
            PortProtocol::Udp => UdpSocket::bind((p.host_ip, p.host_port)).map(drop),
        };
        match bound {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
                return Err(Error::Invalid(format!(
                    "ports: host_ip {} is not an address of this host ({e}); give 127.0.0.1, \
                     one of its addresses, or 0.0.0.0 for all of them",
                    p.host_ip
                )))
            }
            Err(e) => {
                return Err(Error::Conflict(format!(
                    "ports: host port {}:{}/{} is in use on the host ({e}); choose another \
                     host_port",
                    p.host_ip,
                    p.host_port,
                    p.protocol.as_str()
                )))
            }
        }
    }
    Ok(())
}

/// The nft match of a port's host address (`0.0.0.0`: any address of the host).
fn host_match(p: &PortMapping) -> String {
    if p.host_ip.is_unspecified() {
        "fib daddr type local".into()
    } else {
        format!("ip daddr {}", p.host_ip)
    }
}

/// The host table of sandbox `id` (addresses `a`) publishing `ports`.
pub(super) fn host_rules(id: &str, a: &Addresses, ports: &[PortMapping]) -> String {
    let veth = host_veth(id);
    let dnat = |p: &PortMapping| {
        format!(
            "{} {} dport {} dnat to {}:{}",
            host_match(p),
            p.protocol.as_str(),
            p.host_port,
            a.sandbox,
            p.guest_port
        )
    };
    let output: String = ports.iter().map(|p| format!("    {}\n", dnat(p))).collect();
    let from_outside: String = ports
        .iter()
        .filter(|p| !p.host_ip.is_loopback())
        .map(|p| format!("    iifname != \"mv*\" {}\n", dnat(p)))
        .collect();
    let prerouting = if from_outside.is_empty() {
        String::new()
    } else {
        format!(
            "  chain prerouting {{ type nat hook prerouting priority -100;\n{from_outside}  }}\n"
        )
    };
    format!(
        "table ip {} {{
  chain from_sandbox {{ type filter hook prerouting priority -160;
    iifname \"{veth}\" ip daddr 127.0.0.0/8 drop
  }}
{prerouting}  chain output {{ type nat hook output priority -100;
{output}  }}
  chain postrouting {{ type nat hook postrouting priority 100;
    oifname \"{veth}\" ct status dnat masquerade
  }}
}}
",
        ports_table(id)
    )
}

/// The namespace's part of a vm-tier sandbox's ports: what arrives on the veth for a guest
/// port goes on to the guest, and is let through the forward policy of `egress: allow` and
/// `none`.
pub(super) fn namespace_rules(
    isolation: Isolation,
    a: &Addresses,
    ports: &[PortMapping],
) -> String {
    if isolation != Isolation::Vm || ports.is_empty() {
        return String::new();
    }
    let dnat: String = [PortProtocol::Tcp, PortProtocol::Udp]
        .into_iter()
        .filter_map(|protocol| {
            let guest_ports: BTreeSet<u16> = ports
                .iter()
                .filter(|p| p.protocol == protocol)
                .map(|p| p.guest_port)
                .collect();
            let set = guest_ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            (!guest_ports.is_empty()).then(|| {
                format!(
                    "    iifname \"{SANDBOX_IF}\" ip daddr {} {} dport {{ {set} }} dnat to {}\n",
                    a.sandbox,
                    protocol.as_str(),
                    a.guest
                )
            })
        })
        .collect();
    format!(
        "table ip mvm-ports {{
  chain prerouting {{ type nat hook prerouting priority -100;
{dnat}  }}
}}
"
    )
}

/// The forward rule that lets the published connections through a namespace whose forward
/// policy drops (`egress: allow` and `none`).
pub(super) fn namespace_forward_accept() -> String {
    format!("    iifname \"{SANDBOX_IF}\" oifname \"{TAP_IF}\" ct status dnat accept\n")
}

/// Publishes `ports` of sandbox `id`, whose host veth exists.
pub(super) fn publish(id: &str, a: &Addresses, ports: &[PortMapping]) -> Result<()> {
    if ports.is_empty() {
        return Ok(());
    }
    // 0.0.0.0 takes 127.0.0.1 too.
    if ports
        .iter()
        .any(|p| p.host_ip.is_loopback() || p.host_ip.is_unspecified())
    {
        let sysctl = format!("/proc/sys/net/ipv4/conf/{}/route_localnet", host_veth(id));
        std::fs::write(&sysctl, "1").map_err(|e| Error::host(format!("setting {sysctl}"), e))?;
    }
    host::run("nft", &["-f", "-"], Some(&host_rules(id, a, ports)))?;
    if ports.iter().any(|p| !p.host_ip.is_loopback()) {
        enable_inbound_forwarding(id)?;
    }
    Ok(())
}

/// Removes sandbox `id`'s published ports, if it has any.
pub(super) fn unpublish(id: &str) -> Result<()> {
    let table = ports_table(id);
    if tables("ip")?.contains(&table) {
        host::run("nft", &["delete", "table", "ip", &table], None)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn port(ip: [u8; 4], host_port: u16, guest_port: u16) -> PortMapping {
        PortMapping {
            host_ip: Ipv4Addr::from(ip),
            host_port,
            guest_port,
            protocol: PortProtocol::Tcp,
        }
    }

    fn udp(ip: [u8; 4], host_port: u16, guest_port: u16) -> PortMapping {
        PortMapping {
            protocol: PortProtocol::Udp,
            ..port(ip, host_port, guest_port)
        }
    }

    #[test]
    fn validation() {
        validate(&[
            port([127, 0, 0, 1], 18080, 8080),
            port([127, 0, 0, 2], 18080, 80),
        ])
        .unwrap();
        validate(&[port([127, 0, 0, 1], 0, 8080)]).unwrap_err();
        validate(&[port([127, 0, 0, 1], 1, 0)]).unwrap_err();
        validate(&[
            port([0, 0, 0, 0], 18080, 8080),
            port([192, 0, 2, 1], 18081, 80),
        ])
        .unwrap();
        for bad in [[224, 0, 0, 1], [255, 255, 255, 255]] {
            validate(&[port(bad, 18080, 8080)]).unwrap_err();
        }
        validate(&[port([127, 0, 0, 1], 1, 2), port([127, 0, 0, 1], 1, 3)]).unwrap_err();
        // 0.0.0.0 takes the port on every address.
        validate(&[port([0, 0, 0, 0], 1, 2), port([127, 0, 0, 1], 1, 3)]).unwrap_err();
        validate(&[port([127, 0, 0, 1], 1, 2), port([0, 0, 0, 0], 1, 3)]).unwrap_err();
        // A TCP and a UDP port of one number are two ports; two UDP ones are one.
        validate(&[port([0, 0, 0, 0], 53, 53), udp([0, 0, 0, 0], 53, 53)]).unwrap();
        validate(&[udp([127, 0, 0, 1], 53, 53), udp([0, 0, 0, 0], 53, 54)]).unwrap_err();
        let many: Vec<_> = (1..=17).map(|p| port([127, 0, 0, 1], p, 80)).collect();
        validate(&many[..16]).unwrap();
        validate(&many).unwrap_err();
    }

    #[test]
    fn rules() {
        let a = Addresses::of(Ipv4Addr::new(10, 213, 0, 0), 1);
        let ports = [port([127, 0, 0, 1], 18080, 8080)];
        let host = host_rules("0123456789ab", &a, &ports);
        for rule in [
            "table ip mvm-ports-0123456789ab",
            "ip daddr 127.0.0.1 tcp dport 18080 dnat to 10.213.0.10:8080",
            "oifname \"mv0123456789ab\" ct status dnat masquerade",
            "iifname \"mv0123456789ab\" ip daddr 127.0.0.0/8 drop",
        ] {
            assert!(host.contains(rule), "{rule} in {host}");
        }
        assert!(!host.contains("prerouting priority -100"), "{host}");
        let lan = host_rules(
            "0123456789ab",
            &a,
            &[
                port([0, 0, 0, 0], 18080, 8080),
                port([192, 0, 2, 1], 18081, 80),
            ],
        );
        for rule in [
            "fib daddr type local tcp dport 18080 dnat to 10.213.0.10:8080",
            "iifname != \"mv*\" fib daddr type local tcp dport 18080 dnat to 10.213.0.10:8080",
            "iifname != \"mv*\" ip daddr 192.0.2.1 tcp dport 18081 dnat to 10.213.0.10:80",
        ] {
            assert!(lan.contains(rule), "{rule} in {lan}");
        }
        assert!(namespace_rules(Isolation::Jail, &a, &ports).is_empty());
        let vm = namespace_rules(Isolation::Vm, &a, &ports);
        assert!(
            vm.contains(
                "iifname \"eth0\" ip daddr 10.213.0.10 tcp dport { 8080 } dnat to 10.213.0.14"
            ),
            "{vm}"
        );
        assert!(!vm.contains("udp"), "{vm}");
        let both = [
            port([127, 0, 0, 1], 5353, 53),
            udp([127, 0, 0, 1], 5353, 53),
        ];
        let host = host_rules("0123456789ab", &a, &both);
        for rule in [
            "ip daddr 127.0.0.1 tcp dport 5353 dnat to 10.213.0.10:53",
            "ip daddr 127.0.0.1 udp dport 5353 dnat to 10.213.0.10:53",
        ] {
            assert!(host.contains(rule), "{rule} in {host}");
        }
        let vm = namespace_rules(Isolation::Vm, &a, &both);
        for rule in [
            "iifname \"eth0\" ip daddr 10.213.0.10 tcp dport { 53 } dnat to 10.213.0.14",
            "iifname \"eth0\" ip daddr 10.213.0.10 udp dport { 53 } dnat to 10.213.0.14",
        ] {
            assert!(vm.contains(rule), "{rule} in {vm}");
        }
    }
}
