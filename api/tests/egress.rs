//! `egress: all` end to end, as root, with the jail tier and without traffic leaving the
//! machine: a second network namespace plays "the internet", reachable only through the host's
//! routing. Its own test binary: it owns the host's `net.ipv4.ip_forward` while it runs.

mod common;

use std::net::{Ipv4Addr, TcpListener};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use api::model::{CreateSandbox, Egress, ExecRequest, Isolation, NetworkSpec, Sandbox};
use common::{block_on, root_or_skip, Daemon};

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

fn ip(args: &str) {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("running ip");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
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

/// A network namespace with a TCP service at `service:80` that answers each connection with
/// the address it came from. The host reaches it through a veth (`host_addr` on the host
/// end) and a route to `service`; it has no route back to anything else, so only
/// masqueraded traffic gets answers.
struct Internet {
    name: String,
    veth: String,
    host_addr: Ipv4Addr,
    service: Ipv4Addr,
    stop: Arc<AtomicBool>,
}

impl Internet {
    fn start() -> Internet {
        let n = std::process::id() % 250;
        let net = Internet {
            name: format!("mvmtest-inet-{}", std::process::id()),
            // Not `mv*`: the masquerade rules leave sandbox veths alone.
            veth: format!("inet{n}h"),
            host_addr: Ipv4Addr::new(198, 18, n as u8, 1),
            service: Ipv4Addr::new(198, 19, n as u8, 1),
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
        ip(&format!("-n {ns} addr add {}/32 dev lo", net.service));
        ip(&format!("-n {ns} link set lo up"));
        ip(&format!("route add {}/32 via 198.18.{n}.2", net.service));
        let ns_file = std::fs::File::open(format!("/run/netns/{ns}")).expect("netns file");
        let (stop, service) = (Arc::clone(&net.stop), net.service);
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: setns on a descriptor this thread owns; it moves only this thread.
            let rc = unsafe {
                libc::setns(
                    std::os::fd::AsRawFd::as_raw_fd(&ns_file),
                    libc::CLONE_NEWNET,
                )
            };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let listener = TcpListener::bind((service, 80)).expect("bind the service");
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
        net
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
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
    if !root_or_skip("egress_all_masquerades_isolates_sandboxes_and_restores_the_host") {
        return;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        mvm_testkit::skip_or_fail_in_ci(
            "egress_all_masquerades_isolates_sandboxes_and_restores_the_host",
            "nft is missing: apt-get install nftables",
        );
        return;
    }
    assert!(
        egress_tables().is_empty(),
        "an mvm on this host has `egress: all` sandboxes ({:?}): this test owns ip_forward, \
         run it alone",
        egress_tables()
    );
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
        // Another `all` sandbox remains: forwarding stays on.
        assert_eq!(ip_forward(), "1");
        assert_eq!(egress_tables().len(), 2, "{:?}", egress_tables());
        for s in [all_b, allow, none] {
            c.delete(&s.id).await.expect("delete");
        }
    });
    d.assert_no_leaks(&before);
    assert!(egress_tables().is_empty(), "{:?}", egress_tables());
    assert_eq!(ip_forward(), "0", "ip_forward was not restored");
}
