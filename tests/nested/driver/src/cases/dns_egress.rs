//! Egress `allow` by DNS name in the vm tier: the guest's resolv.conf names the sandbox's
//! resolver (`mvm.dns`), an allowed name resolves through it (to a DNS server of this case's
//! own, as `MVM_DNS_UPSTREAM`) and its address is reached; another name does not resolve and
//! its address is not reached even by address; `PATCH /v1/sandboxes/{id}/network` (through
//! `mvm network`) opens it on the running VM.

use std::net::{Ipv4Addr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

use super::{run_cli, sandbox_id, Ctx, ManagerDirs, MvmdSession, Outcome, Verdict};

/// The "internet" namespace of this case and its addresses (TEST-NET-2).
const NETNS: &str = "mvm-dns-inet";
/// The host end of the veth to [`NETNS`]. Not `mv*`: mvm's masquerade and forward rules leave
/// sandbox veths (`mv<id>`) alone, so a sandbox's traffic to an `mv*` link is neither
/// masqueraded nor forwarded (this case's first run failed on exactly that).
const HOST_VETH: &str = "dnsinet0";
const HOST_END: &str = "198.51.100.1";
const FAR_END: &str = "198.51.100.2";
const ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
const BLOCKED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const PORT: u16 = 8080;
const GREETING: &str = "reached-by-name";

/// An authoritative DNS server on 127.0.0.1 for `allowed.test` and `blocked.test`.
struct DnsServer {
    port: u16,
    stop: Arc<AtomicBool>,
}

impl DnsServer {
    fn start() -> Result<Self, String> {
        let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("dns socket: {e}"))?;
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| format!("dns socket: {e}"))?;
        let port = socket.local_addr().map_err(|e| e.to_string())?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while !done.load(Ordering::Relaxed) {
                let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                let Ok(query) = Message::from_vec(&buf[..n]) else {
                    continue;
                };
                let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
                reply.metadata.message_type = MessageType::Response;
                reply.metadata.authoritative = true;
                reply.metadata.recursion_desired = query.metadata.recursion_desired;
                reply.queries = query.queries.clone();
                let q = &query.queries[..];
                let name = q.first().map(|q| q.name.to_ascii().to_ascii_lowercase());
                let addr = match name.as_deref() {
                    Some("allowed.test.") => Some(ALLOWED),
                    Some("blocked.test.") => Some(BLOCKED),
                    _ => None,
                };
                match addr {
                    Some(a) => {
                        if q[0].query_type == RecordType::A {
                            reply.add_answer(Record::from_rdata(
                                q[0].name.clone(),
                                60,
                                RData::A(A(a)),
                            ));
                        }
                    }
                    None => reply.metadata.response_code = ResponseCode::NXDomain,
                }
                if let Ok(bytes) = reply.to_vec() {
                    let _ = socket.send_to(&bytes, peer);
                }
            }
        });
        Ok(DnsServer { port, stop })
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn ip(args: &str) -> Result<(), String> {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(args.split_whitespace());
    let (code, _, err) = run_cli(cmd, None)?;
    if code == 0 {
        Ok(())
    } else {
        Err(format!("ip {args}: exit {code}: {}", err.trim()))
    }
}

/// The "internet": a namespace behind a veth from this host, holding [`ALLOWED`] and
/// [`BLOCKED`], each greeting on [`PORT`]. Removed on drop.
struct Internet {
    stop: Arc<AtomicBool>,
}

impl Internet {
    fn start() -> Result<Self, String> {
        let _ = ip(&format!("netns del {NETNS}"));
        ip(&format!("netns add {NETNS}"))?;
        let net = Internet {
            stop: Arc::new(AtomicBool::new(false)),
        };
        ip(&format!(
            "link add {HOST_VETH} type veth peer name eth0 netns {NETNS}"
        ))?;
        ip(&format!("addr add {HOST_END}/30 dev {HOST_VETH}"))?;
        ip(&format!("link set {HOST_VETH} up"))?;
        ip(&format!("-n {NETNS} addr add {FAR_END}/30 dev eth0"))?;
        ip(&format!("-n {NETNS} link set eth0 up"))?;
        for a in [ALLOWED, BLOCKED] {
            ip(&format!("-n {NETNS} addr add {a}/32 dev lo"))?;
            ip(&format!("route add {a}/32 via {FAR_END}"))?;
        }
        ip(&format!("-n {NETNS} link set lo up"))?;
        let ns = std::fs::File::open(format!("/run/netns/{NETNS}"))
            .map_err(|e| format!("opening the namespace: {e}"))?;
        let stop = net.stop.clone();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // SAFETY: setns on a descriptor this thread owns; it moves only this thread.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) };
            let listener = (rc == 0)
                .then(|| std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).ok())
                .flatten();
            let Some(listener) = listener else {
                let _ = ready_tx.send(false);
                return;
            };
            let _ = listener.set_nonblocking(true);
            let _ = ready_tx.send(true);
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut sock, _)) => {
                        let _ = std::io::Write::write_all(
                            &mut sock,
                            format!("{GREETING}\n").as_bytes(),
                        );
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        match ready.recv() {
            Ok(true) => Ok(net),
            _ => Err("the greeter in the internet namespace did not start".into()),
        }
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = ip(&format!("link del {HOST_VETH}"));
        let _ = ip(&format!("netns del {NETNS}"));
    }
}

/// See the module docs.
pub(crate) fn egress_allow_by_name_vm_tier(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let dns = DnsServer::start()?;
    let _inet = Internet::start()?;
    let mut dirs = ManagerDirs::new(ctx, "dns")?;
    dirs.env
        .push(("MVM_DNS_UPSTREAM".into(), format!("127.0.0.1:{}", dns.port)));
    let session = MvmdSession::start_in(ctx, dirs)?;
    let ctx = &*ctx;
    let checked = (|| {
        let created = session.create_vm(ctx, &["--egress", "allow", "--allow", "allowed.test"])?;
        let id = sandbox_id(&created);
        let sh = |script: &str| session.mvm(ctx, &["exec", &id, "--", "sh", "-c", script], None);
        let conf = sh("cat /etc/resolv.conf")?;
        if !conf.contains("nameserver 169.254.53.53") {
            return Err(format!(
                "the guest's resolv.conf names no mvm resolver: {conf:?}"
            ));
        }
        let out = sh(&format!(
            "nc -w 3 allowed.test {PORT} </dev/null 2>&1; echo rc=$?"
        ))?;
        if !out.contains(GREETING) {
            return Err(format!("allowed.test was not reached by name: {out:?}"));
        }
        let out = sh("nslookup blocked.test 2>&1; echo rc=$?")?;
        if out.contains(&BLOCKED.to_string()) {
            return Err(format!("blocked.test resolved: {out:?}"));
        }
        let by_address = format!("nc -w 3 {BLOCKED} {PORT} </dev/null; echo rc=$?");
        let out = sh(&by_address)?;
        if out.contains(GREETING) || out.contains("rc=0") {
            return Err(format!("blocked.test's address was reached: {out:?}"));
        }
        session.mvm(
            ctx,
            &[
                "network",
                &id,
                "--allow",
                "allowed.test",
                "--allow",
                "blocked.test",
            ],
            None,
        )?;
        let out = sh(&format!(
            "nc -w 3 blocked.test {PORT} </dev/null 2>&1; echo rc=$?"
        ))?;
        if !out.contains(GREETING) {
            return Err(format!(
                "blocked.test was not reached after the PATCH: {out:?}"
            ));
        }
        session.mvm(ctx, &["rm", &id], None).map(drop)
    })();
    session.finish(ctx, checked)
}
