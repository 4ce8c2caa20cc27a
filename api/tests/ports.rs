//! Published ports end to end, as root with a real mvmd and jail-tier sandboxes: an HTTP
//! server in a sandbox answers on its host port, a UDP server on its UDP port (the TCP port of
//! the same number going elsewhere), nothing of it is left after the delete,
//! conflicting or malformed ports are refused, and another tenant's sandbox cannot reach it
//! through the sandbox network.

mod common;

use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{api_error, block_on, jail, sh, Daemon};
use mvm_sandbox::model::{CreateSandbox, Egress, NetworkSpec, PortMapping, PortProtocol, Sandbox};
use mvm_testkit::ports::{
    assert_serves, free_local_port as free_port, http_get, httpd_command, ports_table_exists,
    udp_answer,
};
use mvm_testkit::root_or_skip;

/// What the sandbox's server answers.
const GREETING: &str = "hello-from-the-sandbox";

fn root_with_nft(test: &str) -> bool {
    if !root_or_skip(test) {
        return false;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        mvm_testkit::skip_or_fail_in_ci(test, "nft is missing: apt-get install nftables");
        return false;
    }
    true
}

fn published(host_port: u16, guest_port: u16) -> PortMapping {
    PortMapping {
        host_ip: Ipv4Addr::LOCALHOST,
        host_port,
        guest_port,
        protocol: PortProtocol::Tcp,
    }
}

fn published_udp(host_port: u16, guest_port: u16) -> PortMapping {
    PortMapping {
        protocol: PortProtocol::Udp,
        ..published(host_port, guest_port)
    }
}

/// A UDP server in a sandbox (`mvm-udp-echo`, copied in) answers datagrams sent to its
/// published UDP port, while the TCP port of the same number reaches its HTTP server; a UDP
/// port another sandbox publishes, or a host process has bound, is refused (409) and leaves
/// nothing; after the delete nothing answers and no table is left.
#[test]
fn a_udp_server_in_a_sandbox_answers_on_its_published_udp_port() {
    if !root_with_nft("a_udp_server_in_a_sandbox_answers_on_its_published_udp_port") {
        return;
    }
    let d = Daemon::start();
    let before = d.host_state();
    let port = free_port();
    let ports = vec![published(port, 8080), published_udp(port, 5353)];
    let s = block_on(d.client().create(&with_ports(ports.clone())))
        .expect("create with a TCP and a UDP port of one number");
    d.track(&s.id);
    assert_eq!(s.network.ports, ports);
    let echo = std::fs::read(mvm_testkit::binary("mvm-udp-echo")).expect("mvm-udp-echo");
    block_on(d.client().put_file(&s.id, "/tmp/udp-echo", 0o755, echo)).expect("copy it in");
    common::detach(&d.client(), &s.id, "exec /tmp/udp-echo 5353");
    serve_in(&d, &s);
    assert_eq!(
        udp_answer(port, "ping", Duration::from_secs(15)).as_deref(),
        Some("echo:ping")
    );
    assert_serves(port, GREETING);

    let refused = |req: CreateSandbox| {
        let (e, _) =
            d.watching_ids(|| block_on(d.client().create(&req)).expect_err("a refused create"));
        api_error(&e)
    };
    let (status, _, msg) = refused(with_ports(vec![published_udp(port, 53)]));
    assert_eq!(status, 409, "{msg}");
    assert!(
        msg.contains("already published") && msg.contains("/udp"),
        "{msg}"
    );
    let taken = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let bound = taken.local_addr().expect("addr").port();
    let (status, _, msg) = refused(with_ports(vec![published_udp(bound, 53)]));
    assert_eq!(status, 409, "{msg}");
    assert!(msg.contains("in use on the host"), "{msg}");

    block_on(d.client().delete(&s.id)).expect("delete");
    assert!(!ports_table_exists(&s.id));
    assert_eq!(udp_answer(port, "ping", Duration::from_secs(2)), None);
    d.assert_no_leaks(&before);
}

fn with_ports(ports: Vec<PortMapping>) -> CreateSandbox {
    CreateSandbox { ports, ..jail() }
}

/// A shell line that prints `TARGET: ` and what `GET /` on `ADDR:PORT` answers (nothing when
/// no connection is made within 2 s).
fn fetch(target: &str) -> String {
    let (addr, port) = target.split_once(':').expect("ADDR:PORT");
    format!("echo {target}: $(printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {addr} {port} 2>&1); ")
}

fn serve_in(d: &Daemon, s: &Sandbox) {
    common::detach(&d.client(), &s.id, &httpd_command(GREETING, 8080));
}

#[test]
fn an_http_server_in_a_sandbox_answers_on_its_published_port_until_the_delete() {
    if !root_with_nft("an_http_server_in_a_sandbox_answers_on_its_published_port_until_the_delete")
    {
        return;
    }
    let d = Daemon::start();
    let before = d.host_state();
    let port = free_port();
    // `egress: none`: the port gives the sandbox a veth, its egress stays dropped.
    let s = block_on(d.client().create(&with_ports(vec![published(port, 8080)])))
        .expect("create with a published port");
    d.track(&s.id);
    assert_eq!(s.network.ports, [published(port, 8080)]);
    assert_eq!(s.network.egress, Egress::None);
    let gateway = s
        .network
        .gateway
        .clone()
        .expect("a published port has a veth");
    assert!(ports_table_exists(&s.id));
    serve_in(&d, &s);
    assert_serves(port, GREETING);
    assert_serves(port, GREETING);
    // The sandbox still sends nothing of its own: not even to its gateway.
    block_on(async {
        let out = d
            .client()
            .exec(
                &s.id,
                &sh(&format!(
                    "wget -q -T 2 -O- http://{gateway}:{port}/; echo rc=$?"
                )),
            )
            .await
            .expect("exec");
        assert!(!out.stdout.contains(GREETING), "{out:?}");
        let got = d.client().get(&s.id).await.expect("get");
        assert_eq!(got.network.ports, [published(port, 8080)]);
    });
    block_on(d.client().delete(&s.id)).expect("delete");
    assert!(!ports_table_exists(&s.id));
    assert!(http_get(port).is_err(), "the port answers after the delete");
    d.assert_no_leaks(&before);
}

#[test]
fn conflicting_and_malformed_ports_are_refused_and_leave_nothing() {
    if !root_with_nft("conflicting_and_malformed_ports_are_refused_and_leave_nothing") {
        return;
    }
    let d = Daemon::start();
    let port = free_port();
    let first =
        block_on(d.client().create(&with_ports(vec![published(port, 80)]))).expect("first create");
    d.track(&first.id);
    let before = d.host_state();
    let refused = |req: CreateSandbox| {
        let (e, _) =
            d.watching_ids(|| block_on(d.client().create(&req)).expect_err("a refused create"));
        api_error(&e)
    };
    // Published by another sandbox.
    let (status, code, msg) = refused(with_ports(vec![published(port, 8080)]));
    assert_eq!((status, code.as_str()), (409, "conflict"), "{msg}");
    assert!(msg.contains("already published"), "{msg}");
    // Bound by a host process.
    let taken = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let bound = taken.local_addr().expect("addr").port();
    let (status, _, msg) = refused(with_ports(vec![published(bound, 8080)]));
    assert_eq!(status, 409, "{msg}");
    assert!(msg.contains("in use on the host"), "{msg}");
    // Malformed.
    let other = free_port();
    for (ports, says) in [
        (vec![published(0, 80)], "1 to 65535"),
        (vec![published(other, 0)], "1 to 65535"),
        (
            vec![PortMapping {
                host_ip: Ipv4Addr::new(224, 0, 0, 1),
                ..published(other, 80)
            }],
            "not an address of this host",
        ),
        (
            vec![PortMapping {
                host_ip: Ipv4Addr::new(198, 51, 100, 77),
                ..published(other, 80)
            }],
            "not an address of this host",
        ),
        (
            vec![
                published(other, 80),
                PortMapping {
                    host_ip: Ipv4Addr::UNSPECIFIED,
                    ..published(other, 81)
                },
            ],
            "published twice",
        ),
        (
            vec![published(other, 80), published(other, 81)],
            "published twice",
        ),
        (
            (1..=17).map(|p| published(other, p)).collect(),
            "at most 16",
        ),
    ] {
        let (status, code, msg) = refused(with_ports(ports));
        assert_eq!((status, code.as_str()), (422, "invalid_argument"), "{msg}");
        assert!(msg.contains(says), "{says} in {msg}");
    }
    // An out-of-range port is not a u16: the body is refused, never a 500.
    let body = br#"{"isolation": "jail", "ports": [{"host_port": 70000, "guest_port": 80}]}"#;
    let e = block_on(
        d.client()
            .raw("POST", "/v1/sandboxes", "application/json", body.to_vec()),
    )
    .expect_err("an out-of-range port");
    let (status, _, msg) = api_error(&e);
    assert!((400..500).contains(&status), "{status} {msg}");
    d.assert_no_leaks(&before);
    drop(taken);
    block_on(d.client().delete(&first.id)).expect("delete");
}

/// Another tenant's sandbox, with every egress it can get (`all`, and the private and
/// loopback ranges opened), reaches neither the published port (through its gateway, the
/// host's addresses) nor the guest port at the first sandbox's address; the host still does.
#[test]
fn another_tenants_sandbox_cannot_reach_a_published_port() {
    if !root_with_nft("another_tenants_sandbox_cannot_reach_a_published_port") {
        return;
    }
    let d = Daemon::start();
    let other_token = d.tenant("neighbour", &[]);
    let port = free_port();
    let victim = block_on(d.client().create(&with_ports(vec![published(port, 8080)])))
        .expect("victim create");
    d.track(&victim.id);
    serve_in(&d, &victim);
    assert_serves(port, GREETING);
    let neighbour = d.client_with(Some(&other_token));
    let attacker = block_on(neighbour.create(&CreateSandbox {
        network: Some(NetworkSpec {
            egress: Egress::All,
            allow: vec!["10.0.0.0/8".into(), "127.0.0.0/8".into()],
        }),
        ..jail()
    }))
    .expect("attacker create");
    d.track(&attacker.id);
    let victim_addr = victim.network.address.clone().expect("victim address");
    let gateway = attacker.network.gateway.clone().expect("attacker gateway");
    let victim_gateway = victim.network.gateway.clone().expect("victim gateway");
    let targets = [
        format!("{victim_addr}:8080"),
        format!("{gateway}:{port}"),
        format!("{victim_gateway}:{port}"),
        format!("{victim_gateway}:8080"),
    ];
    let script: String = targets.iter().map(|t| fetch(t)).collect();
    let out = block_on(neighbour.exec(&attacker.id, &sh(&script))).expect("attacker exec");
    for t in &targets {
        assert!(
            out.stdout.contains(&format!("{t}:")),
            "{t} not tried: {out:?}"
        );
    }
    assert!(
        !out.stdout.contains(GREETING),
        "the neighbour reached the published port: {out:?}"
    );
    // The same fetch does reach the server from inside the victim.
    let own = block_on(d.client().exec(&victim.id, &sh(&fetch("127.0.0.1:8080")))).expect("exec");
    assert!(own.stdout.contains(GREETING), "{own:?}");
    // The victim's port still answers the host.
    assert_serves(port, GREETING);
    block_on(neighbour.delete(&attacker.id)).expect("delete attacker");
    block_on(d.client().delete(&victim.id)).expect("delete victim");
}

/// The port needs no mvmd: it serves on while mvmd is dead, and when the sandbox died too, the
/// restarted mvmd's reconciliation removes it with the rest.
#[test]
fn a_port_outlives_a_killed_mvmd_and_goes_with_its_dead_sandbox() {
    if !root_with_nft("a_port_outlives_a_killed_mvmd_and_goes_with_its_dead_sandbox") {
        return;
    }
    let mut d = Daemon::start();
    let before = d.host_state();
    let port = free_port();
    let s = block_on(d.client().create(&with_ports(vec![published(port, 8080)]))).expect("create");
    d.track(&s.id);
    serve_in(&d, &s);
    d.kill9();
    assert_serves(port, GREETING);
    for pid in common::cgroup_mode().pids(&d.cgroup_parent, &s.id) {
        // SAFETY: plain kill of a sandbox process this test made.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !common::cgroup_mode()
        .pids(&d.cgroup_parent, &s.id)
        .is_empty()
    {
        assert!(Instant::now() < deadline, "the sandbox's processes live on");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.spawn();
    assert!(d.log().contains(&s.id), "{}", d.log());
    assert!(!ports_table_exists(&s.id), "{}", d.log());
    assert!(
        http_get(port).is_err(),
        "the port answers after the reconcile"
    );
    d.assert_no_leaks(&before);
}

/// `GET /` on `addr:port` from a thread in the network namespace at `netns` (another host).
fn get_from(netns: &std::path::Path, addr: Ipv4Addr, port: u16) -> std::io::Result<String> {
    let ns = std::fs::File::open(netns)?;
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        mvm_testkit::enter_netns(&ns)?;
        let mut s =
            std::net::TcpStream::connect_timeout(&(addr, port).into(), Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        Ok(answer)
    })
    .join()
    .expect("the client thread")
}

/// Ports published on a host address and on `0.0.0.0` (an admin's: a tenant's create is a
/// 403) are reached by another host (a network namespace behind a veth) as well as by the host
/// itself, with the host forwarding while the sandbox lives; after the delete they are gone,
/// and so is the sandbox's forwarding table.
#[test]
fn ports_on_host_addresses_are_reached_from_other_hosts() {
    if !root_with_nft("ports_on_host_addresses_are_reached_from_other_hosts") {
        return;
    }
    let n = std::process::id() % 1000;
    let (lan, host_end) = (format!("mvm-lan-{n}"), format!("lanp{n}"));
    let (host_addr, lan_addr) = (Ipv4Addr::new(203, 0, 113, 1), "203.0.113.2/30");
    /// Removes the other host on drop, whatever the test's outcome.
    struct OtherHost(String, String);
    impl Drop for OtherHost {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.1]).output();
            let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
        }
    }
    let other_host = OtherHost(lan.clone(), host_end.clone());
    let ip = |args: &str| {
        let out = Command::new("ip")
            .args(args.split_whitespace())
            .output()
            .expect("ip");
        assert!(
            out.status.success(),
            "ip {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let forward_before = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("read");
    ip(&format!("netns add {lan}"));
    ip(&format!(
        "link add {host_end} type veth peer name eth0 netns {lan}"
    ));
    ip(&format!("addr add {host_addr}/30 dev {host_end}"));
    ip(&format!("link set {host_end} up"));
    ip(&format!("-n {lan} addr add {lan_addr} dev eth0"));
    ip(&format!("-n {lan} link set eth0 up"));
    let netns = std::path::Path::new("/run/netns").join(&lan);
    let d = Daemon::start();
    let before = d.host_state();
    let (on_addr, on_all) = (free_port(), free_port());
    let ports = vec![
        PortMapping {
            host_ip: host_addr,
            ..published(on_addr, 8080)
        },
        PortMapping {
            host_ip: Ipv4Addr::UNSPECIFIED,
            ..published(on_all, 8080)
        },
    ];
    // A tenant's sandbox may not take the host's network-facing ports: admins only.
    let tenant = d.client_with(Some(&d.tenant("tenant", &[])));
    let (e, _) = d.watching_ids(|| {
        block_on(tenant.create(&with_ports(ports.clone()))).expect_err("a tenant's create")
    });
    let (status, code, msg) = api_error(&e);
    assert_eq!((status, code.as_str()), (403, "forbidden"), "{msg}");
    assert!(msg.contains("admin"), "{msg}");
    let s = block_on(d.client().create(&with_ports(ports))).expect("create");
    d.track(&s.id);
    serve_in(&d, &s);
    let deadline = Instant::now() + Duration::from_secs(10);
    for port in [on_addr, on_all] {
        loop {
            match get_from(&netns, host_addr, port) {
                Ok(a) if a.contains(GREETING) => break,
                other => assert!(
                    Instant::now() < deadline,
                    "{host_addr}:{port} from another host: {other:?}"
                ),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // The host itself: on the address, and on 127.0.0.1 for 0.0.0.0's port.
    let local =
        std::net::TcpStream::connect_timeout(&(host_addr, on_addr).into(), Duration::from_secs(2));
    assert!(local.is_ok(), "{local:?}");
    assert_serves(on_all, GREETING);
    let forward = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("read");
    assert_eq!(forward.trim(), "1");
    let tables = || {
        let out = Command::new("nft")
            .args(["list", "tables", "ip"])
            .output()
            .expect("nft");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(
        tables().contains(&format!("mvm-egress-{}", s.id)),
        "{}",
        tables()
    );
    block_on(d.client().delete(&s.id)).expect("delete");
    for port in [on_addr, on_all] {
        assert!(
            get_from(&netns, host_addr, port).is_err(),
            "{port} after the delete"
        );
    }
    assert!(
        !tables().contains(&format!("mvm-egress-{}", s.id)),
        "{}",
        tables()
    );
    d.assert_no_leaks(&before);
    drop(other_host);
    // Another test's `egress: all` sandbox may keep forwarding on meanwhile; alone, the
    // setting from before is back.
    if !tables().contains("mvm-egress") {
        let after = std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").expect("read");
        assert_eq!(after, forward_before);
    }
}
