//! `egress: all` end to end, as root, with the jail tier and without traffic leaving the
//! machine: a second network namespace plays everything beyond the host (the internet, a LAN
//! host, a cloud metadata service), reachable only through the host's routing. Its own test
//! binary: it owns the host's `net.ipv4.ip_forward` while it runs (its tests take turns).

mod common;

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6, TcpListener};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use common::{block_on, Daemon};
use mvm_sandbox::model::{CreateSandbox, Egress, ExecRequest, Isolation, NetworkSpec, Sandbox};
use mvm_testkit::root_or_skip;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// Runs `program` with whitespace-separated `args` and returns its stdout; panics on failure.
fn run(program: &str, args: &str) -> String {
    let out = Command::new(program)
        .args(args.split_whitespace())
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip(args: &str) {
    run("ip", args);
}

/// Serializes this binary's tests: they share ip_forward and the host's egress tables.
fn own_the_host(test: &str) -> Option<MutexGuard<'static, ()>> {
    static HOST: Mutex<()> = Mutex::new(());
    if !root_or_skip(test) {
        return None;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        mvm_testkit::skip_or_fail_in_ci(test, "nft is missing: apt-get install nftables");
        return None;
    }
    let guard = HOST.lock().unwrap_or_else(|e| e.into_inner());
    assert!(
        egress_tables().is_empty(),
        "an mvm on this host has `egress: all` sandboxes ({:?}): this test owns ip_forward, \
         run it alone",
        egress_tables()
    );
    Some(guard)
}

fn ip_forward() -> String {
    std::fs::read_to_string(IP_FORWARD)
        .expect("ip_forward")
        .trim()
        .to_owned()
}

fn egress_tables() -> Vec<String> {
    let out = Command::new("nft")
        .args(["list", "tables", "ip"])
        .output()
        .expect("nft list tables");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().strip_prefix("table ip "))
        .filter(|t| t.starts_with("mvm-egress"))
        .map(str::to_owned)
        .collect()
}

/// A network namespace with a TCP service on port 80 of each of its addresses that answers
/// each connection with the address it came from: `service` (the internet), `lan` (a private
/// host) and [`METADATA`]. The host reaches it through a veth (`host_addr` on the host end)
/// and a route to `service`; `lan` and [`METADATA`] only from the sandboxes (see
/// [`Internet::route_from`]). It has no route back to anything else, so only masqueraded
/// traffic gets answers, and it counts what arrives unmasqueraded.
struct Internet {
    name: String,
    veth: String,
    host_addr: Ipv4Addr,
    service: Ipv4Addr,
    lan: Ipv4Addr,
    /// Policy routing table and rule priority of [`Internet::route_from`].
    table: u32,
    stop: Arc<AtomicBool>,
}

/// The cloud metadata address.
const METADATA: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);

impl Internet {
    fn start() -> Internet {
        let n = std::process::id() % 250;
        let net = Internet {
            name: format!("mvmtest-inet-{}", std::process::id()),
            // Not `mv*`: the masquerade rules leave sandbox veths alone.
            veth: format!("inet{n}h"),
            host_addr: Ipv4Addr::new(198, 18, n as u8, 1),
            service: Ipv4Addr::new(198, 19, n as u8, 1),
            lan: Ipv4Addr::new(172, 31, n as u8, 1),
            table: 31000 + n,
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (ns, veth) = (&net.name, &net.veth);
        ip(&format!("netns add {ns}"));
        ip(&format!(
            "link add {veth} type veth peer name eth0 netns {ns}"
        ));
        ip(&format!("addr add {}/30 dev {veth}", net.host_addr));
        ip(&format!("link set {veth} up"));
        ip(&format!("-n {ns} addr add 198.18.{n}.2/30 dev eth0"));
        ip(&format!("-n {ns} link set eth0 up"));
        for addr in [net.service, net.lan, METADATA] {
            ip(&format!("-n {ns} addr add {addr}/32 dev lo"));
        }
        ip(&format!("-n {ns} link set lo up"));
        ip(&format!("route add {}/32 via 198.18.{n}.2", net.service));
        // Counts what arrives from anywhere but the host's end, i.e. unmasqueraded.
        run(
            "ip",
            &format!(
                "netns exec {ns} nft add table ip watch {{ chain pre {{ type filter hook \
                 prerouting priority raw ; ip saddr != {} counter ; }} ; }}",
                net.host_addr
            ),
        );
        serve_in(ns, 80, &net.stop);
        net
    }
}

/// A TCP service on `port` of every address of network namespace `ns` that answers each
/// connection with the address it came from, until `stop`.
fn serve_in(ns: &str, port: u16, stop: &Arc<AtomicBool>) {
    let ns_file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
    let stop = Arc::clone(stop);
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        mvm_testkit::enter_netns(&ns_file).expect("setns");
        let listener = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind the service");
        listener.set_nonblocking(true).expect("nonblocking");
        ready_tx.send(()).expect("ready");
        while !stop.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut sock, peer)) => {
                    use std::io::Write;
                    let _ = sock.set_nonblocking(false);
                    let _ = writeln!(sock, "peer={}", peer.ip());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
    });
    ready.recv().expect("service thread");
}

impl Internet {
    /// Routes `lan` and [`METADATA`] here for traffic from `subnet` (the sandboxes') only:
    /// the host's own traffic to those addresses is left alone.
    fn route_from(&self, subnet: &str) {
        let t = self.table;
        ip(&format!("rule add from {subnet} lookup {t} pref {t}"));
        for addr in [self.lan, METADATA] {
            ip(&format!(
                "route add {addr}/32 via {} dev {} table {t}",
                Ipv4Addr::from(u32::from(self.host_addr) + 1),
                self.veth
            ));
        }
    }

    /// Packets that reached this namespace with another source than the host's end.
    fn unmasqueraded(&self) -> u64 {
        let out = run(
            "ip",
            &format!("netns exec {} nft list table ip watch", self.name),
        );
        out.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no counter in {out}"))
    }

    /// The "far" network 198.19.N.0/24 behind this namespace, routed from the host until the
    /// returned guard drops (its addresses go on the namespace's loopback).
    fn far_network(&self) -> FarNetwork {
        let n = self.service.octets()[2];
        ip(&format!("route add 198.19.{n}.0/24 via 198.18.{n}.2"));
        FarNetwork(n)
    }
}

/// See [`Internet::far_network`].
struct FarNetwork(u8);

impl FarNetwork {
    /// Address `last` of the far network.
    fn addr(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, self.0, last)
    }
}

impl Drop for FarNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["route", "del", &format!("198.19.{}.0/24", self.0)])
            .output();
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.table.to_string();
        // Output, not status: quiet when `route_from` was not called.
        let _ = Command::new("ip")
            .args(["rule", "del", "pref", &t])
            .output();
        let _ = Command::new("ip")
            .args(["route", "flush", "table", &t])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Restores the host's forwarding setting however the test ends.
struct RestoreForwarding(String);

impl Drop for RestoreForwarding {
    fn drop(&mut self) {
        let _ = std::fs::write(IP_FORWARD, &self.0);
    }
}

fn sandbox(egress: Egress, allow: &[&str]) -> CreateSandbox {
    CreateSandbox {
        isolation: Some(Isolation::Jail),
        network: Some(NetworkSpec {
            egress,
            allow: allow.iter().map(|s| s.to_string()).collect(),
        }),
        ..CreateSandbox::default()
    }
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        timeout_s: Some(10),
        ..ExecRequest::default()
    }
}

#[test]
fn egress_all_masquerades_isolates_sandboxes_and_restores_the_host() {
    let Some(_host) =
        own_the_host("egress_all_masquerades_isolates_sandboxes_and_restores_the_host")
    else {
        return;
    };
    // Forwarding off to start with, so that turning it back off is visible.
    let _restore = RestoreForwarding(ip_forward());
    std::fs::write(IP_FORWARD, "0").expect("ip_forward=0");
    let inet = Internet::start();
    let d = Daemon::start();
    let before = d.host_state();
    let subnet = format!("{}0.0/16", d.subnet_prefix);
    let reach = |s: &Sandbox, host: String, port: u16| {
        let c = d.client();
        let id = s.id.clone();
        async move {
            c.exec(
                &id,
                &sh(&format!("nc -w 2 {host} {port} </dev/null; echo rc=$?")),
            )
            .await
            .expect("exec nc")
            .stdout
        }
    };
    block_on(async {
        let c = d.client();
        let all_a = c.create(&sandbox(Egress::All, &[])).await.expect("all a");
        assert_eq!(ip_forward(), "1");
        let all_b = c.create(&sandbox(Egress::All, &[])).await.expect("all b");
        // The whole sandbox /16 allowed, the internet not.
        let allow = c
            .create(&sandbox(Egress::Allow, &[&subnet]))
            .await
            .expect("allow");
        let none = c.create(&sandbox(Egress::None, &[])).await.expect("none");

        // Masqueraded: the far side sees the host's address, not the sandbox's.
        let out = reach(&all_a, inet.service.to_string(), 80).await;
        assert!(
            out.contains(&format!("peer={}", inet.host_addr)),
            "egress all did not reach the internet masqueraded: {out:?}"
        );
        for s in [&allow, &none] {
            let out = reach(s, inet.service.to_string(), 80).await;
            assert!(
                !out.contains("peer=") && !out.contains("rc=0"),
                "{:?} reached the internet: {out:?}",
                s.network
            );
        }

        // Sandboxes cannot reach each other, even when the policy would allow the address.
        let b_addr = all_b.network.address.clone().expect("b address");
        let listener = sh("echo peer-reached | timeout 4 nc -l -p 8080; true");
        for from in [&all_a, &allow] {
            let listen = c.exec(&all_b.id, &listener);
            let connect = async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                reach(from, b_addr.clone(), 8080).await
            };
            let (listened, out) = tokio::join!(listen, connect);
            listened.expect("exec the listener");
            assert!(
                !out.contains("peer-reached") && !out.contains("rc=0"),
                "{:?} reached sandbox {b_addr}: {out:?}",
                from.network
            );
        }
        // The listener does work for what may reach it: the host (from the sandbox's gateway).
        let listen = c.exec(&all_b.id, &listener);
        let connect = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let b_addr = b_addr.clone();
            tokio::task::spawn_blocking(move || {
                let addr = (b_addr.parse::<Ipv4Addr>().expect("address"), 8080).into();
                let mut sock = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    .expect("the host connects to the sandbox");
                let mut got = String::new();
                std::io::Read::read_to_string(&mut sock, &mut got).expect("read");
                got
            })
            .await
            .expect("connect task")
        };
        let (listened, got) = tokio::join!(listen, connect);
        listened.expect("exec the listener");
        assert_eq!(got, "peer-reached\n");

        c.delete(&all_a.id).await.expect("delete all a");
        // Another `all` sandbox and the `allow` one (masqueraded too, to what it allows)
        // remain: forwarding stays on.
        assert_eq!(ip_forward(), "1");
        assert_eq!(egress_tables().len(), 3, "{:?}", egress_tables());
        for s in [all_b, allow, none] {
            c.delete(&s.id).await.expect("delete");
        }
    });
    d.assert_no_leaks(&before);
    assert!(egress_tables().is_empty(), "{:?}", egress_tables());
    assert_eq!(ip_forward(), "0", "ip_forward was not restored");
}

/// A TCP listener on one of the host's own addresses that greets and counts connections.
struct HostListener {
    port: u16,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl HostListener {
    const GREETING: &'static str = "host-reached";

    fn bind(addr: SocketAddr) -> HostListener {
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("listening on {addr}: {e}"));
        listener.set_nonblocking(true).expect("nonblocking");
        let l = HostListener {
            port: listener.local_addr().expect("local addr").port(),
            accepted: Arc::new(AtomicUsize::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
        };
        let (stop, accepted) = (Arc::clone(&l.stop), Arc::clone(&l.accepted));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut sock, _)) => {
                        use std::io::Write;
                        accepted.fetch_add(1, Ordering::Relaxed);
                        let _ = sock.set_nonblocking(false);
                        let _ = writeln!(sock, "{}", HostListener::GREETING);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        l
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `script` as root in sandbox `id`'s network namespace (what its processes cannot do).
fn in_sandbox_netns(d: &Daemon, id: &str, script: &str) -> String {
    let ns = d.run_dir().join("netns").join(id);
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.display()))
        .args(["sh", "-c", script])
        .output()
        .expect("running nsenter");
    assert!(
        out.status.success(),
        "{script} in {}: {}",
        ns.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The IPv6 link-local address that `show` (an `ip -6 -o addr show … scope link` in the
/// right namespace) prints, once duplicate address detection is done with it.
fn link_local(show: impl Fn() -> String) -> Ipv6Addr {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = show();
        let ready = out
            .lines()
            .filter(|l| !l.contains("tentative"))
            .find_map(|l| {
                l.split_whitespace()
                    .skip_while(|w| *w != "inet6")
                    .nth(1)?
                    .split('/')
                    .next()?
                    .parse()
                    .ok()
            });
        match ready {
            Some(addr) => return addr,
            None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            None => panic!("no usable IPv6 link-local address: {out:?}"),
        }
    }
}

/// `egress: all` reaches the internet but, unless an allow entry names them, none of the
/// host's own addresses (its gateway included), the cloud metadata address, private (LAN)
/// addresses or the host over IPv6; and nothing leaves with a source that is not the
/// sandbox's, even with the namespace's own rules gone (the host's guard holds alone).
#[test]
fn egress_all_keeps_off_the_host_its_neighbours_and_spoofing() {
    let Some(_host) = own_the_host("egress_all_keeps_off_the_host_its_neighbours_and_spoofing")
    else {
        return;
    };
    let _restore = RestoreForwarding(ip_forward());
    let inet = Internet::start();
    let d = Daemon::start();
    let subnet = format!("{}0.0/16", d.subnet_prefix);
    inet.route_from(&subnet);
    let before = d.host_state();
    let reach = |s: &Sandbox, host: String, port: u16| {
        let c = d.client();
        let id = s.id.clone();
        async move {
            c.exec(
                &id,
                &sh(&format!("nc -w 2 {host} {port} </dev/null; echo rc=$?")),
            )
            .await
            .expect("exec nc")
            .stdout
        }
    };
    let blocked = |what: &str, out: &str| {
        assert!(
            !out.contains("peer=")
                && !out.contains(HostListener::GREETING)
                && !out.contains("rc=0"),
            "egress all reached {what}: {out:?}"
        );
    };
    block_on(async {
        let c = d.client();
        let all = c.create(&sandbox(Egress::All, &[])).await.expect("all");
        let lan_allowed = c
            .create(&sandbox(Egress::All, &["172.16.0.0/12"]))
            .await
            .expect("all with the LAN allowed");
        let masqueraded = format!("peer={}", inet.host_addr);

        // The internet, and with an allow entry the LAN: reached, masqueraded.
        let out = reach(&all, inet.service.to_string(), 80).await;
        assert!(out.contains(&masqueraded), "the internet: {out:?}");
        let out = reach(&lan_allowed, inet.lan.to_string(), 80).await;
        assert!(out.contains(&masqueraded), "the allowed LAN: {out:?}");

        // Not reached: the LAN without an allow entry, the metadata service either way.
        blocked("the LAN", &reach(&all, inet.lan.to_string(), 80).await);
        for s in [&all, &lan_allowed] {
            blocked(
                "the metadata address",
                &reach(s, METADATA.to_string(), 80).await,
            );
        }

        // The host's own addresses: a public-looking one, and the sandbox's own gateway.
        let gateway: Ipv4Addr = all
            .network
            .gateway
            .clone()
            .expect("gateway")
            .parse()
            .unwrap();
        for addr in [inet.host_addr, gateway] {
            let listener = HostListener::bind((addr, 0).into());
            blocked(
                &format!("the host at {addr}"),
                &reach(&all, addr.to_string(), listener.port).await,
            );
            assert_eq!(listener.accepted(), 0, "the host at {addr} was reached");
        }

        // The host over IPv6: the link-local address of the host end of the sandbox's veth.
        let veth = mvm_sandbox::manager::net::host_veth(&all.id);
        let host_ll = link_local(|| run("ip", &format!("-6 -o addr show dev {veth} scope link")));
        link_local(|| in_sandbox_netns(&d, &all.id, "ip -6 -o addr show dev eth0 scope link"));
        let ifindex = std::fs::read_to_string(format!("/sys/class/net/{veth}/ifindex"))
            .expect("ifindex")
            .trim()
            .parse()
            .expect("ifindex number");
        let listener = HostListener::bind(SocketAddrV6::new(host_ll, 0, 0, ifindex).into());
        blocked(
            &format!("the host at {host_ll}"),
            &reach(&all, format!("{host_ll}%eth0"), listener.port).await,
        );
        assert_eq!(listener.accepted(), 0, "the host at {host_ll} was reached");

        // A foreign source address. A process can take one with IP_FREEBIND; busybox's nc
        // cannot, so the namespace gets the address and a default route that prefers it.
        let spoofed = Ipv4Addr::new(203, 0, 113, inet.host_addr.octets()[2]);
        in_sandbox_netns(
            &d,
            &all.id,
            &format!(
                "ip addr add {spoofed}/32 dev lo && \
                 ip route replace default via {gateway} dev eth0 src {spoofed}"
            ),
        );
        assert_eq!(inet.unmasqueraded(), 0);
        blocked(
            "the internet spoofed",
            &reach(&all, inet.service.to_string(), 80).await,
        );
        assert_eq!(inet.unmasqueraded(), 0, "a spoofed packet left the host");
        // Without the namespace's rules, the host's guard alone still holds.
        in_sandbox_netns(&d, &all.id, "nft flush ruleset");
        blocked(
            "the internet spoofed",
            &reach(&all, inet.service.to_string(), 80).await,
        );
        assert_eq!(inet.unmasqueraded(), 0, "a spoofed packet left the host");
        in_sandbox_netns(
            &d,
            &all.id,
            &format!(
                "ip route replace default via {gateway} dev eth0 src {}",
                all.network.address.clone().expect("address")
            ),
        );
        blocked("the LAN", &reach(&all, inet.lan.to_string(), 80).await);
        let out = reach(&all, inet.service.to_string(), 80).await;
        assert!(out.contains(&masqueraded), "the internet: {out:?}");

        for s in [all, lan_allowed] {
            c.delete(&s.id).await.expect("delete");
        }
    });
    d.assert_no_leaks(&before);
    assert!(egress_tables().is_empty(), "{:?}", egress_tables());
}

/// A DNS server (dnsmasq) in the test's "internet", authoritative for the names of
/// [`egress_allow_by_dns_name`], with a TTL per name.
struct DnsServer(std::process::Child);

impl DnsServer {
    fn start(ns: &str, listen: Ipv4Addr, records: &[(&str, Ipv4Addr, u32)]) -> Option<DnsServer> {
        let Some(program) = which("dnsmasq") else {
            mvm_testkit::skip_or_fail_in_ci(
                "egress_allow_by_dns_name",
                "dnsmasq is missing: scripts/deps.sh installs dnsmasq-base",
            );
            return None;
        };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(program)
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--pid-file=",
                "--user=root",
                "--port=53",
            ])
            .arg(format!("--listen-address={listen}"));
        for (name, addr, ttl) in records {
            // Also an AAAA record, which the sandbox's resolver must not pass on.
            cmd.arg(format!("--host-record={name},{addr},2001:db8::1,{ttl}"));
        }
        // Killed and reaped on drop, whatever happens below.
        let server = DnsServer(
            cmd.stdout(std::process::Stdio::null())
                .spawn()
                .expect("starting dnsmasq"),
        );
        // Ready once it answers.
        let deadline = Instant::now() + Duration::from_secs(10);
        let probe = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp");
        probe
            .set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        // A query for records[0] (id 1, recursion desired).
        let mut query = vec![0, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in records[0].0.split('.') {
            query.push(label.len() as u8);
            query.extend_from_slice(label.as_bytes());
        }
        query.extend_from_slice(&[0, 0, 1, 0, 1]);
        loop {
            probe.send_to(&query, (listen, 53)).expect("send probe");
            let mut buf = [0u8; 512];
            if probe.recv(&mut buf).is_ok() {
                return Some(server);
            }
            assert!(Instant::now() < deadline, "dnsmasq does not answer");
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The path of `program` in the usual system directories.
fn which(program: &str) -> Option<String> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin"]
        .iter()
        .map(|dir| format!("{dir}/{program}"))
        .find(|p| Path::new(p).exists())
}

/// Egress `allow` by DNS name, through the sandbox's resolver and a real DNS server: an
/// allowed name and a wildcard's resolve and are reached; other names do not resolve and
/// their addresses are not reached even by address; a name allowed on one port is reached on
/// it only; AAAA answers are dropped; another sandbox cannot use this one's resolver; a PATCH
/// opens and closes names on the running sandbox; an address lapses with its (clamped) TTL;
/// no resolver outlives its sandbox.
#[test]
fn egress_allow_by_dns_name() {
    let Some(_host) = own_the_host("egress_allow_by_dns_name") else {
        return;
    };
    let _restore = RestoreForwarding(ip_forward());
    let inet = Internet::start();
    let far = inet.far_network();
    let addr = |last: u8| far.addr(last);
    for last in [2, 3, 4, 5, 6, 53] {
        ip(&format!(
            "-n {} addr add {}/32 dev lo",
            inet.name,
            addr(last)
        ));
    }
    serve_in(&inet.name, 8080, &inet.stop);
    let (api, pypi, blocked, short, ported) = (addr(2), addr(3), addr(4), addr(5), addr(6));
    let Some(_dns) = DnsServer::start(
        &inet.name,
        addr(53),
        &[
            ("api.example.test", api, 300),
            ("files.pypi.test", pypi, 300),
            ("blocked.test", blocked, 300),
            ("short.test", short, 1),
            ("ported.test", ported, 300),
        ],
    ) else {
        return;
    };
    let upstream = format!("{}:53", addr(53));
    let d = Daemon::start_with_env(&[], &[("MVM_DNS_UPSTREAM", Path::new(&upstream))]);
    let before = d.host_state();
    let masqueraded = format!("peer={}", inet.host_addr);
    let run_in = |s: &Sandbox, script: String| {
        let c = d.client();
        let id = s.id.clone();
        async move { c.exec(&id, &sh(&script)).await.expect("exec").stdout }
    };
    let reach = |s: &Sandbox, host: String, port: u16| {
        run_in(s, format!("nc -w 2 {host} {port} </dev/null; echo rc=$?"))
    };
    let resolve = |s: &Sandbox, name: &str| run_in(s, format!("nslookup {name} 2>&1; echo rc=$?"));
    let reached = |out: &str| out.contains(&masqueraded);
    let ids = block_on(async {
        let c = d.client();
        let s = c
            .create(&sandbox(
                Egress::Allow,
                &[
                    "api.example.test",
                    "*.pypi.test",
                    "ported.test:8080",
                    "short.test",
                ],
            ))
            .await
            .expect("create");
        let gateway = s.network.gateway.clone().expect("gateway");
        assert!(!resolver_of(&s.id).is_empty(), "no resolver runs");
        let conf = run_in(&s, "cat /etc/resolv.conf".into()).await;
        assert!(conf.contains("nameserver 169.254.53.53"), "{conf}");

        // Allowed names resolve and are reached by name; AAAA answers are dropped.
        let out = resolve(&s, "api.example.test").await;
        assert!(out.contains(&api.to_string()), "api.example.test: {out}");
        assert!(
            !out.contains("2001:db8"),
            "an AAAA answer came through: {out}"
        );
        assert!(reached(&reach(&s, "api.example.test".into(), 80).await));
        assert!(reached(&reach(&s, "files.pypi.test".into(), 8080).await));

        // Its resolver's worker dies (a crash, the OOM killer): another one answers.
        replace_worker("mvm-dns", &s.id);
        let out = resolve(&s, "files.pypi.test").await;
        assert!(
            out.contains(&pypi.to_string()),
            "after its worker died: {out}"
        );

        // Other names do not resolve, and their addresses are not reached by address.
        let out = resolve(&s, "blocked.test").await;
        assert!(
            !out.contains(&blocked.to_string()) && !out.contains("rc=0"),
            "{out}"
        );
        let out = reach(&s, blocked.to_string(), 80).await;
        assert!(
            !reached(&out) && !out.contains("rc=0"),
            "blocked.test by address: {out}"
        );

        // A name allowed on one port: that port only.
        assert!(reached(&reach(&s, "ported.test".into(), 8080).await));
        let out = reach(&s, ported.to_string(), 80).await;
        assert!(
            !reached(&out) && !out.contains("rc=0"),
            "ported.test:80: {out}"
        );

        // Another sandbox cannot ask this one's resolver at its port on the gateway (nor its
        // own for this list); this sandbox can (the same query, straight to that port).
        // (busybox nslookup takes SERVER:PORT; busybox nc has no UDP.)
        let rules = in_sandbox_netns(&d, &s.id, "nft list table ip mvm-dns");
        let target = rules
            .split_whitespace()
            .skip_while(|w| *w != "to")
            .nth(1)
            .expect("the resolver's DNAT target")
            .trim_end_matches(';')
            .to_owned();
        let (resolver_addr, _port) = target.split_once(':').expect("ADDR:PORT");
        assert_eq!(resolver_addr, gateway);
        let direct = format!("nslookup api.example.test {target} 2>&1; echo rc=$?");
        let out = run_in(&s, direct.clone()).await;
        assert!(
            out.contains(&api.to_string()),
            "the resolver did not answer its own sandbox at {target}: {out}"
        );
        let other = c
            .create(&sandbox(Egress::Allow, &["files.pypi.test"]))
            .await
            .expect("create the other");
        let theirs = run_in(&other, direct).await;
        assert!(
            !theirs.contains(&api.to_string()),
            "another sandbox got an answer from {target}: {theirs}"
        );
        let out = resolve(&other, "api.example.test").await;
        assert!(!out.contains(&api.to_string()), "{out}");
        c.delete(&other.id).await.expect("delete the other");

        // PATCH: blocked.test opened, api.example.test closed, on the running sandbox.
        let updated = c
            .update_network(
                &s.id,
                vec![
                    "blocked.test".into(),
                    "*.pypi.test".into(),
                    "ported.test:8080".into(),
                    "short.test".into(),
                ],
            )
            .await
            .expect("patch the network");
        assert_eq!(updated.network.allow[0], "blocked.test");
        assert!(reached(&reach(&s, "blocked.test".into(), 80).await));
        let out = reach(&s, api.to_string(), 80).await;
        assert!(
            !reached(&out) && !out.contains("rc=0"),
            "closed api by address: {out}"
        );
        let out = resolve(&s, "api.example.test").await;
        assert!(
            !out.contains(&api.to_string()),
            "closed api resolved: {out}"
        );
        assert_eq!(
            c.get(&s.id).await.expect("get").network.allow,
            updated.network.allow
        );
        // Bad entries are refused with nothing changed.
        let err = c
            .update_network(&s.id, vec!["bad name!".into()])
            .await
            .expect_err("a bad entry");
        assert!(err.to_string().contains("not a valid DNS name"), "{err}");
        assert!(reached(&reach(&s, "blocked.test".into(), 80).await));

        // short.test's TTL (1 s, clamped to 10 s) lapses: its address is closed again
        // without a new query. (A generous bound: the lapse is the kernel's set timeout.)
        assert!(reached(&reach(&s, "short.test".into(), 80).await));
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = reach(&s, short.to_string(), 80).await;
            if !reached(&out) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "short.test's address stayed open: {out}"
            );
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        // Resolving it again opens it again.
        assert!(reached(&reach(&s, "short.test".into(), 80).await));

        c.delete(&s.id).await.expect("delete");
        [s.id, other.id]
    });
    drop(far);
    d.assert_no_leaks(&before);
    assert!(egress_tables().is_empty(), "{:?}", egress_tables());
    for id in ids {
        let left = resolver_of(&id);
        assert!(left.is_empty(), "a resolver outlived its sandbox: {left}");
    }
}

/// The resolver processes of sandbox `id` (`pgrep -a`; their command line starts with
/// `--sandbox ID`).
fn resolver_of(id: &str) -> String {
    helper_of("mvm-dns", id)
}

/// Kills the worker of helper `bin` of sandbox `id` (SIGKILL) and waits until its supervisor
/// has started another.
fn replace_worker(bin: &str, id: &str) {
    let worker = || {
        let pids: Vec<i32> = helper_of(bin, id)
            .lines()
            .filter_map(|l| l.split_whitespace().next()?.parse().ok())
            .collect();
        let parent = |pid: i32| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        // The one whose parent is the other (its supervisor).
        pids.iter()
            .copied()
            .find(|p| parent(*p).is_some_and(|pp| pids.contains(&pp)))
    };
    let killed = worker().unwrap_or_else(|| {
        panic!(
            "{bin} of {id} has no worker under a supervisor: {}",
            helper_of(bin, id)
        )
    });
    // SAFETY: kill(2) of a process just found by its command line.
    assert_eq!(unsafe { libc::kill(killed, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while worker().is_none_or(|w| w == killed) {
        assert!(
            Instant::now() < deadline,
            "no new worker of {bin} of {id}: {}",
            helper_of(bin, id)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The processes of helper `bin` of sandbox `id` (`pgrep -a`; their command line starts
/// with `--sandbox ID`).
fn helper_of(bin: &str, id: &str) -> String {
    let out = Command::new("pgrep")
        .args(["-af", &format!("{bin} --sandbox {id}")])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An HTTPS service (python3's http.server) on `addr`:443 in network namespace `ns`, with the
/// certificate and key at `cert` and `key`: it answers "ok" and appends each request's
/// Authorization header to `log`.
struct HttpsService(std::process::Child);

impl HttpsService {
    const SCRIPT: &'static str = r#"
import http.server, ssl, sys
addr, cert, key, log = sys.argv[1:5]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        with open(log, "a") as f:
            f.write("auth=%s\n" % self.headers.get("Authorization"))
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *a):
        pass
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
s = http.server.ThreadingHTTPServer((addr, 443), H)
s.socket = ctx.wrap_socket(s.socket, server_side=True)
print("ready", flush=True)
s.serve_forever()
"#;

    fn start(ns: &str, addr: Ipv4Addr, cert: &Path, key: &Path, log: &Path) -> HttpsService {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "/usr/bin/python3", "-c", Self::SCRIPT])
            .arg(addr.to_string())
            .args([cert, key, log])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("starting python3 (scripts/deps.sh installs it)");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().expect("stdout")),
            &mut line,
        )
        .expect("the service's first line");
        assert_eq!(line.trim(), "ready", "the HTTPS service did not start");
        HttpsService(child)
    }
}

impl Drop for HttpsService {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A test CA and a leaf for `names` signed by it, written into `dir` as ca.pem, leaf.pem and
/// leaf.key.
fn test_pki(dir: &Path, names: &[&str]) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "mvm test internet CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key).expect("CA cert");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .expect("leaf params")
            .signed_by(&key, &issuer)
            .expect("leaf cert");
    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).expect("ca.pem");
    std::fs::write(dir.join("leaf.pem"), leaf.pem()).expect("leaf.pem");
    std::fs::write(dir.join("leaf.key"), key.serialize_pem()).expect("leaf.key");
}

/// The first file under `dir` that holds `needle` (links not followed).
fn tree_contains(dir: &Path, needle: &str) -> Option<std::path::PathBuf> {
    let out = Command::new("grep")
        .args(["-r", "-D", "skip", "-l", "-F", "-a", "-e", needle])
        .arg(dir)
        .output()
        .expect("grep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(Into::into)
}

/// Secrets: the sandbox's env holds a placeholder, and only an HTTPS request to the secret's
/// host (through the sandbox's egress proxy, verified by the CA in the sandbox's trust store)
/// carries the value; another host gets the placeholder, over TLS not intercepted. The value
/// is nowhere in the sandbox (its processes' env and memory, its files) nor in any answer; its
/// use is audited without it; another sandbox cannot reach the proxy; the proxy goes with its
/// sandbox.
#[test]
fn secrets_reach_only_their_hosts() {
    const VALUE: &str = "sk-live-7f3c9a1e5b2d4608";
    let Some(_host) = own_the_host("secrets_reach_only_their_hosts") else {
        return;
    };
    let _restore = RestoreForwarding(ip_forward());
    let inet = Internet::start();
    let far = inet.far_network();
    let addr = |last: u8| far.addr(last);
    let (secret_addr, other_addr, dns_addr) = (addr(7), addr(8), addr(53));
    for a in [secret_addr, other_addr, dns_addr] {
        ip(&format!("-n {} addr add {a}/32 dev lo", inet.name));
    }
    let pki = tempfile::tempdir().expect("tempdir");
    test_pki(pki.path(), &["api.secret.test", "other.test"]);
    let (cert, key) = (pki.path().join("leaf.pem"), pki.path().join("leaf.key"));
    let (secret_log, other_log) = (pki.path().join("secret.log"), pki.path().join("other.log"));
    let _secret_service = HttpsService::start(&inet.name, secret_addr, &cert, &key, &secret_log);
    let _other_service = HttpsService::start(&inet.name, other_addr, &cert, &key, &other_log);
    let Some(_dns) = DnsServer::start(
        &inet.name,
        dns_addr,
        &[
            ("api.secret.test", secret_addr, 300),
            ("other.test", other_addr, 300),
        ],
    ) else {
        return;
    };
    let upstream = format!("{dns_addr}:53");
    let ca = pki.path().join("ca.pem");
    let d = Daemon::start_with_env(
        &[],
        &[
            ("MVM_DNS_UPSTREAM", Path::new(&upstream)),
            ("MVM_EGRESS_CA", &ca),
        ],
    );
    let before = d.host_state();
    let logged = |log: &Path| std::fs::read_to_string(log).unwrap_or_default();
    let ids = block_on(async {
        let c = d.client();
        let mut req = sandbox(Egress::Allow, &["other.test"]);
        req.secrets = [(
            "API_KEY".to_string(),
            mvm_sandbox::model::SecretSpec {
                value: VALUE.into(),
                hosts: vec!["api.secret.test".into()],
            },
        )]
        .into();
        let s = c.create(&req).await.expect("create");
        let placeholder = s.env["API_KEY"].clone();
        assert!(
            placeholder.starts_with("mvm-secret-api_key-"),
            "{placeholder}"
        );
        assert_eq!(s.network.secrets[0].name, "API_KEY");
        assert_eq!(s.network.secrets[0].hosts, ["api.secret.test"]);
        let got = c.get(&s.id).await.expect("get");
        let answers = format!(
            "{}{}",
            serde_json::to_string(&s).expect("json"),
            serde_json::to_string(&got).expect("json")
        );
        assert!(
            !answers.contains(VALUE),
            "an answer holds the value: {answers}"
        );
        let run_in = |script: String| {
            let (c, id) = (d.client(), s.id.clone());
            async move { c.exec(&id, &sh(&script)).await.expect("exec").stdout }
        };
        // The sandbox's env holds the placeholder; its resolver sends the secret host to the
        // proxy and the other host to its own address.
        let env_value = run_in("printf %s \"$API_KEY\"".into()).await;
        assert_eq!(env_value, placeholder);
        let out = run_in("nslookup api.secret.test 2>&1".into()).await;
        assert!(out.contains("169.254.53.54"), "{out}");
        let out = run_in("nslookup other.test 2>&1".into()).await;
        assert!(out.contains(&other_addr.to_string()), "{out}");

        // A TLS client in the sandbox's network, trusting the sandbox's own trust store,
        // sends the placeholder: the secret host gets the value, the other the placeholder.
        // (curl from the host, in the sandbox's namespace, at the addresses the sandbox's
        // resolver gave: the jail image's busybox wget cannot speak to the proxy, as it
        // sends no signature_algorithms and verifies no certificate.)
        let root = d.run_dir().join("sandboxes").join(&s.id).join("rootfs");
        let bundle = root.join("etc/ssl/certs/ca-certificates.crt");
        let curl = |args: String| {
            in_sandbox_netns(
                &d,
                &s.id,
                &format!("curl -s -o /dev/null -w '%{{http_code}}' {args}; echo \" rc=$?\""),
            )
        };
        let fetch = |host: &str, addr: &str, cafile: &Path| {
            curl(format!(
                "--cacert {} -H 'Authorization: Bearer {placeholder}' \
                 --resolve {host}:443:{addr} https://{host}/",
                cafile.display()
            ))
        };
        let out = fetch("api.secret.test", "169.254.53.54", &bundle);
        assert!(out.starts_with("200 rc=0"), "{out}");
        assert_eq!(logged(&secret_log), format!("auth=Bearer {VALUE}\n"));
        // Its proxy's worker dies (a crash, the OOM killer): another one, with the same
        // secrets and CA, serves the next request.
        replace_worker("mvm-egress", &s.id);
        let out = fetch("api.secret.test", "169.254.53.54", &bundle);
        assert!(out.starts_with("200 rc=0"), "after its worker died: {out}");
        assert_eq!(
            logged(&secret_log),
            format!("auth=Bearer {VALUE}\nauth=Bearer {VALUE}\n")
        );
        // The sandbox's CA alone verifies the proxy (the bundle is the image's plus it).
        let out = fetch(
            "api.secret.test",
            "169.254.53.54",
            &root.join("etc/ssl/certs/mvm-egress-ca.pem"),
        );
        assert!(out.starts_with("200 rc=0"), "{out}");
        // The other host's TLS is its own (the test CA verifies it at its own address).
        let out = fetch("other.test", &other_addr.to_string(), &ca);
        assert!(out.starts_with("200 rc=0"), "{out}");
        assert_eq!(logged(&other_log), format!("auth=Bearer {placeholder}\n"));
        // The proxy has no certificate for any other name.
        let out = curl("-k --resolve other.test:443:169.254.53.54 https://other.test/".into());
        assert!(
            !out.contains("rc=0"),
            "the proxy served another name: {out}"
        );

        // Nothing of the sandbox holds the value: its processes' env and memory (a process
        // started with the env shows the scan finds the placeholder), its files.
        run_in("sleep 600 >/dev/null 2>&1 &".into()).await;
        let netns = d.run_dir().join("netns").join(&s.id);
        let pids = mvm_testkit::procs::pids_in_netns(&netns);
        assert!(!pids.is_empty(), "no process in {}", netns.display());
        let mut placeholder_seen = false;
        for pid in &pids {
            assert!(
                !mvm_testkit::procs::environ_contains(*pid, VALUE.as_bytes()),
                "pid {pid}'s env"
            );
            assert!(
                !mvm_testkit::procs::memory_contains(*pid, VALUE.as_bytes()),
                "pid {pid}'s memory holds the value"
            );
            placeholder_seen |= mvm_testkit::procs::memory_contains(*pid, placeholder.as_bytes());
        }
        assert!(
            placeholder_seen,
            "the memory scan did not find the placeholder"
        );
        let dir = d.run_dir().join("sandboxes").join(&s.id);
        assert_eq!(
            tree_contains(&dir, VALUE),
            None,
            "a sandbox file holds the value"
        );

        // One audit line for each use, without the value.
        let audit =
            std::fs::read_to_string(d.state_dir().join("egress-audit.log")).expect("the audit log");
        assert!(
            audit.contains(&format!(
                "sandbox={} secret=API_KEY host=api.secret.test method=GET path=/",
                s.id
            )),
            "{audit}"
        );
        // (Three uses: the bundle's, the worker's after its predecessor died, the CA's.)
        assert_eq!(audit.lines().count(), 3, "{audit}");
        assert!(!audit.contains(VALUE), "{audit}");

        // Another sandbox reaches neither this one's proxy (at its port on this one's
        // gateway) nor a proxy of its own, and does not resolve the secret host.
        let rules = in_sandbox_netns(&d, &s.id, "nft list table ip mvm-dns");
        let target = rules
            .split("169.254.53.54 tcp dport 443 dnat to ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .expect("the proxy's DNAT target")
            .to_owned();
        let other = c
            .create(&sandbox(Egress::Allow, &["other.test"]))
            .await
            .expect("create the other");
        let theirs = |script: String| {
            let (c, id) = (d.client(), other.id.clone());
            async move { c.exec(&id, &sh(&script)).await.expect("exec").stdout }
        };
        let (gw, port) = target.split_once(':').expect("ADDR:PORT");
        let out = theirs(format!("nc -w 2 {gw} {port} </dev/null; echo rc=$?")).await;
        assert!(
            !out.contains("rc=0"),
            "another sandbox reached the proxy: {out}"
        );
        let out = theirs("nc -w 2 169.254.53.54 443 </dev/null; echo rc=$?".into()).await;
        assert!(!out.contains("rc=0"), "{out}");
        let out = theirs("nslookup api.secret.test 2>&1".into()).await;
        assert!(
            !out.contains("169.254.53.54") && !out.contains(&secret_addr.to_string()),
            "{out}"
        );

        assert!(!proxy_of(&s.id).is_empty(), "no proxy runs");
        for id in [&s.id, &other.id] {
            c.delete(id).await.expect("delete");
        }
        s.id.clone()
    });
    drop(far);
    d.assert_no_leaks(&before);
    let left = proxy_of(&ids);
    assert!(left.is_empty(), "a proxy outlived its sandbox: {left}");
}

/// The egress proxy processes of sandbox `id`.
fn proxy_of(id: &str) -> String {
    helper_of("mvm-egress", id)
}
