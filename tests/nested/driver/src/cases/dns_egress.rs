//! Egress `allow` by DNS name in the vm tier: the guest's resolv.conf names the sandbox's
//! resolver (`mvm.dns`), an allowed name resolves through it (to a DNS server of this case's
//! own, as `MVM_DNS_UPSTREAM`) and its address is reached; another name does not resolve and
//! its address is not reached even by address; `PATCH /v1/sandboxes/{id}/network` (through
//! `mvm network`) opens it on the running VM. And secrets in the vm tier: the guest's env
//! holds a placeholder, its trust store the sandbox's CA, its resolver sends the secret's host
//! to the egress proxy, which hands the real host the value; the VMM's memory (the guest's
//! RAM) never holds it.

use std::net::{Ipv4Addr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

use super::{ip, sandbox_id, Ctx, ManagerDirs, MvmdSession, Outcome, Verdict};

/// The "internet" namespace of this case and its addresses (TEST-NET-2).
const NETNS: &str = "mvm-dns-inet";
/// The host end of the veth to [`NETNS`]. Not `mv*`: mvm's masquerade and forward rules leave
/// sandbox veths (`mv<id>`) alone, so a sandbox's traffic to an `mv*` link is neither
/// masqueraded nor forwarded (this case's first run failed on exactly that).
const HOST_VETH: &str = "dnsinet0";
const HOST_END: &str = "198.51.100.1";
const FAR_END: &str = "198.51.100.2";
pub(super) const ALLOWED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 9);
const BLOCKED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
pub(super) const PORT: u16 = 8080;
pub(super) const GREETING: &str = "reached-by-name";
/// The host of the secrets case, serving HTTPS at [`SECRET_ADDR`].
const SECRET_HOST: &str = "api.secret.test";
const SECRET_ADDR: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 11);
/// The secret's value (mvm's environment variable `API_KEY`).
const SECRET_VALUE: &str = "sk-nested-5d1e8b2c7a904f63";
/// The address the sandbox's resolver gives for a secret's host.
const PROXY_ADDR: Ipv4Addr = Ipv4Addr::new(169, 254, 53, 54);

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
                    Some("api.secret.test.") => Some(SECRET_ADDR),
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

/// Runs `serve` on a thread in the network namespace at `ns` once `bind` has made its listener
/// there (non-blocking); `serve` gets it and the stop flag. Returns when the listener is bound.
fn serve_in_netns(
    ns: &Path,
    bind: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    serve: impl FnOnce(std::net::TcpListener, Arc<AtomicBool>) + Send + 'static,
) -> Result<(), String> {
    let ns = std::fs::File::open(ns).map_err(|e| format!("opening {}: {e}", ns.display()))?;
    let (ready_tx, ready) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let listener = mvm_testkit::enter_netns(&ns)
            .ok()
            .and_then(|()| std::net::TcpListener::bind(bind).ok())
            .filter(|l| l.set_nonblocking(true).is_ok());
        let _ = ready_tx.send(listener.is_some());
        if let Some(listener) = listener {
            serve(listener, stop);
        }
    });
    match ready.recv() {
        Ok(true) => Ok(()),
        _ => Err(format!("no server on {bind} in the internet namespace")),
    }
}

/// The "internet": a namespace behind a veth from this host, holding [`ALLOWED`],
/// [`BLOCKED`] and [`SECRET_ADDR`], each greeting on [`PORT`]. Removed on drop.
pub(super) struct Internet {
    stop: Arc<AtomicBool>,
}

impl Internet {
    /// Makes the namespace and serves the greeting.
    pub(super) fn start() -> Result<Self, String> {
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
        for a in [ALLOWED, BLOCKED, SECRET_ADDR] {
            ip(&format!("-n {NETNS} addr add {a}/32 dev lo"))?;
            ip(&format!("route add {a}/32 via {FAR_END}"))?;
        }
        ip(&format!("-n {NETNS} link set lo up"))?;
        serve_in_netns(
            &Self::netns(),
            (Ipv4Addr::UNSPECIFIED, PORT).into(),
            net.stop.clone(),
            |listener, stop| {
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
            },
        )?;
        Ok(net)
    }

    fn netns() -> PathBuf {
        Path::new("/run/netns").join(NETNS)
    }

    /// Serves HTTPS on port 443 with `tls`: every request is answered 200, and its
    /// `Authorization` header goes to `seen`.
    fn serve_https(
        &self,
        tls: Arc<rustls::ServerConfig>,
        seen: Arc<Mutex<Vec<String>>>,
    ) -> Result<(), String> {
        serve_in_netns(
            &Self::netns(),
            (Ipv4Addr::UNSPECIFIED, 443).into(),
            self.stop.clone(),
            move |listener, stop| {
                while !stop.load(Ordering::Relaxed) {
                    let Ok((sock, _)) = listener.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let _ = sock.set_nonblocking(false);
                    let _ = sock.set_read_timeout(Some(Duration::from_secs(30)));
                    let Ok(conn) = rustls::ServerConnection::new(tls.clone()) else {
                        continue;
                    };
                    let mut stream = rustls::StreamOwned::new(conn, sock);
                    if let Some(head) = read_head(&mut stream) {
                        let auth = head
                            .lines()
                            .find_map(|l| {
                                let (k, v) = l.split_once(':')?;
                                k.eq_ignore_ascii_case("authorization").then(|| v.trim())
                            })
                            .unwrap_or_default()
                            .to_owned();
                        seen.lock().unwrap_or_else(|e| e.into_inner()).push(auth);
                        let _ = std::io::Write::write_all(
                            &mut stream,
                            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n",
                        );
                        stream.conn.send_close_notify();
                        let _ = std::io::Write::flush(&mut stream);
                    }
                }
            },
        )
    }
}

/// An HTTP request's head from `stream` (up to the empty line; at most 16 KiB).
fn read_head(stream: &mut impl std::io::Read) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 << 10 {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return None,
        }
    }
    String::from_utf8(head).ok()
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

/// A CA for the internet's services and a leaf of it for [`SECRET_HOST`]: the CA's PEM and a
/// server configuration with the leaf.
fn internet_pki() -> Result<(String, Arc<rustls::ServerConfig>), String> {
    let err = |e: rcgen::Error| format!("the internet's certificates: {e}");
    let ca_key = rcgen::KeyPair::generate().map_err(err)?;
    let mut ca = rcgen::CertificateParams::default();
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "mvm nested internet CA");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    let ca_cert = ca.self_signed(&ca_key).map_err(err)?;
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().map_err(err)?;
    let leaf = rcgen::CertificateParams::new(vec![SECRET_HOST.to_owned()])
        .map_err(err)?
        .signed_by(&key, &issuer)
        .map_err(err)?;
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .and_then(|b| {
        b.with_no_client_auth()
            .with_single_cert(vec![leaf.der().clone()], key)
    })
    .map_err(|e| format!("the internet's TLS: {e}"))?;
    Ok((ca_cert.pem(), Arc::new(config)))
}

/// `GET /` to [`SECRET_HOST`] at `addr:443` from the network namespace at `netns`, over TLS
/// verified against `ca_pem`, with `Authorization: Bearer {token}`; returns the answer.
fn https_get_in(netns: &Path, addr: Ipv4Addr, ca_pem: &str, token: &str) -> Result<String, String> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        let cert = cert.map_err(|e| format!("the guest's CA file: {e}"))?;
        roots
            .add(cert)
            .map_err(|e| format!("the guest's CA: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let ns = std::fs::File::open(netns).map_err(|e| format!("{}: {e}", netns.display()))?;
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {SECRET_HOST}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\n\r\n"
    );
    std::thread::spawn(move || {
        mvm_testkit::enter_netns(&ns).map_err(|e| format!("setns: {e}"))?;
        let sock =
            std::net::TcpStream::connect_timeout(&(addr, 443).into(), Duration::from_secs(10))
                .map_err(|e| format!("connecting to {addr}:443: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let name =
            rustls::pki_types::ServerName::try_from(SECRET_HOST).map_err(|e| e.to_string())?;
        let conn =
            rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
        let mut stream = rustls::StreamOwned::new(conn, sock);
        std::io::Write::write_all(&mut stream, request.as_bytes())
            .map_err(|e| format!("TLS to {addr}:443: {e}"))?;
        let mut answer = Vec::new();
        match std::io::Read::read_to_end(&mut stream, &mut answer) {
            Ok(_) => {}
            // A server that closes without close_notify still answered.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !answer.is_empty() => {}
            Err(e) => return Err(format!("the answer from {addr}:443: {e}")),
        }
        Ok(String::from_utf8_lossy(&answer).into_owned())
    })
    .join()
    .map_err(|_| "the TLS client thread panicked".to_string())?
}

/// See the module docs.
pub(crate) fn secrets_vm_tier(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let dns = DnsServer::start()?;
    let inet = Internet::start()?;
    let (ca_pem, tls) = internet_pki()?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    inet.serve_https(tls, seen.clone())?;
    let mut dirs = ManagerDirs::new(ctx, "secrets")?;
    let ca_file = dirs.root.join("internet-ca.pem");
    std::fs::write(&ca_file, &ca_pem).map_err(|e| format!("{}: {e}", ca_file.display()))?;
    let run_dir = dirs.root.join("run");
    dirs.env.extend([
        ("MVM_DNS_UPSTREAM".into(), format!("127.0.0.1:{}", dns.port)),
        ("MVM_EGRESS_CA".into(), ca_file.display().to_string()),
    ]);
    let mut session = MvmdSession::start_in(ctx, dirs)?;
    // The value is in the environment of `mvm` (which reads it for --secret), not mvmd's:
    // mvmd gets it through the API, and processes it starts must not inherit it.
    session
        .dirs
        .env
        .push(("API_KEY".into(), SECRET_VALUE.into()));
    let ctx = &*ctx;
    let checked = (|| {
        let secret = format!("API_KEY@{SECRET_HOST}");
        let created = session.create_vm(
            ctx,
            &[
                "--egress",
                "allow",
                "--allow",
                "allowed.test",
                "--secret",
                &secret,
            ],
        )?;
        let id = sandbox_id(&created);
        let sh = |script: &str| session.mvm(ctx, &["exec", &id, "--", "sh", "-c", script], None);
        let placeholder = sh("printf %s \"$API_KEY\"")?;
        if !placeholder.starts_with("mvm-secret-api_key-") {
            return Err(format!("the guest's API_KEY is {placeholder:?}"));
        }
        let out = sh(&format!("nslookup {SECRET_HOST} 2>&1"))?;
        if !out.contains(&PROXY_ADDR.to_string()) {
            return Err(format!(
                "{SECRET_HOST} does not resolve to the proxy: {out:?}"
            ));
        }
        let guest_ca = sh("cat /etc/ssl/certs/mvm-egress-ca.pem")?;
        let bundle = sh("cat /etc/ssl/certs/ca-certificates.crt")?;
        if !guest_ca.contains("BEGIN CERTIFICATE")
            || !bundle.trim_end().ends_with(guest_ca.trim_end())
        {
            return Err(format!(
                "the guest's trust store lacks the sandbox's CA: {guest_ca:?} / bundle {bundle:?}"
            ));
        }
        // A TLS client in the sandbox's network trusting the guest's CA file, sending the
        // placeholder to the proxy: the host gets the value.
        let netns = run_dir.join("netns").join(&id);
        let answer = https_get_in(&netns, PROXY_ADDR, &guest_ca, &placeholder)?;
        if !answer.starts_with("HTTP/1.1 200") {
            return Err(format!("the proxy's answer: {answer:?}"));
        }
        let got = seen.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if got != [format!("Bearer {SECRET_VALUE}")] {
            return Err(format!("{SECRET_HOST} got {got:?}"));
        }
        // The guest's RAM (the VMM's memory) holds the placeholder (a process keeps it in
        // its env), never the value.
        sh("sleep 600 >/dev/null 2>&1 &")?;
        let pids = mvm_testkit::procs::pids_in_netns(&netns);
        if pids.is_empty() {
            return Err(format!("no process in {}", netns.display()));
        }
        let mut placeholder_seen = false;
        for pid in pids {
            if mvm_testkit::procs::memory_contains(pid, SECRET_VALUE.as_bytes()) {
                return Err(format!("process {pid} of the sandbox holds the value"));
            }
            placeholder_seen |= mvm_testkit::procs::memory_contains(pid, placeholder.as_bytes());
        }
        if !placeholder_seen {
            return Err("the memory scan did not find the placeholder".into());
        }
        session.mvm(ctx, &["rm", &id], None).map(drop)
    })();
    session.finish(ctx, checked)
}
