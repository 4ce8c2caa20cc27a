//! `mvm-dns`, the resolver of one sandbox with egress `allow` (started by the manager, see
//! `dns.rs`): it answers the sandbox's DNS on its gateway, passes only the names its allow list
//! opens on to the upstream servers, and puts the IPv4 addresses of the answers into the nft
//! sets of the sandbox's namespace for their TTL, so that exactly those addresses (on the
//! entry's port, when it has one) are reachable. Every other name is NXDOMAIN without a query
//! upstream, so a sandbox cannot tunnel data out through DNS either.
//!
//! - TTLs are clamped to [`MIN_TTL`]..=[`MAX_TTL`] in the answer and in the sets alike: a
//!   0 or 1 s TTL would lapse before the client connects; a day-long one would keep an
//!   address open long after the name moved.
//! - AAAA records are removed from the answers (a sandbox has no IPv6 route; all its IPv6 is
//!   dropped in its namespace and on the host), so clients use IPv4 at once.
//! - Bounds: queries only from the sandbox's own address, at most [`RATE`] a second (burst
//!   [`BURST`]; the rest are dropped), [`MAX_PENDING`] upstream at once, [`MAX_TCP`] TCP
//!   clients with an idle timeout, messages of at most [`MAX_MESSAGE`] bytes.
//! - The policy file is read for every query under a shared flock; the manager rewrites it
//!   and flushes the sets under the exclusive one, so nothing an old list allowed is added
//!   after a change.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::PathBuf;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{RData, RecordType};
use mvm_sys::flock;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::policy::AllowEntry;
use super::rules::{DNS_PORT_SET, DNS_SET, PROXY_ADDR};

/// The descriptor of the UDP socket the manager passes.
pub const UDP_FD: i32 = 3;
/// The descriptor of the listening TCP socket the manager passes.
pub const TCP_FD: i32 = 4;
/// Shortest TTL given to the sandbox and to the set elements, seconds.
pub const MIN_TTL: u32 = 10;
/// Longest TTL, seconds.
pub const MAX_TTL: u32 = 3600;
/// Queries a second a sandbox may send on average.
pub const RATE: f64 = 100.0;
/// Queries a sandbox may send at once.
pub const BURST: f64 = 200.0;
/// Queries waiting for an upstream answer at once.
pub const MAX_PENDING: usize = 64;
/// TCP clients at once.
pub const MAX_TCP: usize = 4;
/// Largest DNS message taken or passed on.
pub const MAX_MESSAGE: usize = 4096;
/// How long one upstream server has to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a TCP client may stay idle.
const TCP_IDLE: Duration = Duration::from_secs(10);

/// What the resolver serves.
#[derive(Debug, Clone)]
pub struct Config {
    /// Sandbox id (for messages).
    pub sandbox: String,
    /// The sandbox's network namespace (pinned file), where the sets are.
    pub netns: PathBuf,
    /// The policy file (the allow list, one entry a line).
    pub policy: PathBuf,
    /// The sandbox's address: queries from anyone else are ignored.
    pub client: Ipv4Addr,
    /// Upstream servers, tried in order.
    pub upstream: Vec<SocketAddr>,
    /// The hosts of the sandbox's secrets (lowercase, no final dot): answered with
    /// [`PROXY_ADDR`], the egress proxy's address, whatever the allow list says.
    pub proxied: Vec<String>,
}

/// Runs the resolver on the sockets at [`UDP_FD`] and [`TCP_FD`] until it is killed.
pub fn serve(cfg: Config) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        // SAFETY: the manager passes these two descriptors to this process and nothing else
        // owns them.
        let (udp, tcp) = unsafe {
            (
                std::net::UdpSocket::from_raw_fd(UDP_FD),
                std::net::TcpListener::from_raw_fd(TCP_FD),
            )
        };
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        let server = Rc::new(Server {
            cfg,
            udp: UdpSocket::from_std(udp)?,
            bucket: std::cell::RefCell::new(Bucket::new()),
            pending: std::cell::Cell::new(0),
            tcp_clients: std::cell::Cell::new(0),
        });
        tokio::task::spawn_local(Rc::clone(&server).serve_tcp(TcpListener::from_std(tcp)?));
        server.serve_udp().await
    })
}

/// A token bucket: [`RATE`] a second up to [`BURST`].
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn new() -> Self {
        Bucket {
            tokens: BURST,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * RATE).min(BURST);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct Server {
    cfg: Config,
    udp: UdpSocket,
    bucket: std::cell::RefCell<Bucket>,
    pending: std::cell::Cell<usize>,
    tcp_clients: std::cell::Cell<usize>,
}

/// Decrements a counter when dropped.
struct Slot<'a>(&'a std::cell::Cell<usize>);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

fn take_slot(counter: &std::cell::Cell<usize>, max: usize) -> Option<Slot<'_>> {
    (counter.get() < max).then(|| {
        counter.set(counter.get() + 1);
        Slot(counter)
    })
}

impl Server {
    fn is_its_sandbox(&self, peer: SocketAddr) -> bool {
        peer.ip() == IpAddr::V4(self.cfg.client)
    }

    async fn serve_udp(self: Rc<Self>) -> std::io::Result<()> {
        let mut buf = vec![0u8; MAX_MESSAGE];
        loop {
            let (n, peer) = self.udp.recv_from(&mut buf).await?;
            if !self.is_its_sandbox(peer) || !self.bucket.borrow_mut().take() {
                continue;
            }
            let query = buf[..n].to_vec();
            let server = Rc::clone(&self);
            tokio::task::spawn_local(async move {
                let Some(_slot) = take_slot(&server.pending, MAX_PENDING) else {
                    return;
                };
                if let Some(reply) = server.answer(&query).await {
                    let _ = server.udp.send_to(&reply, peer).await;
                }
            });
        }
    }

    async fn serve_tcp(self: Rc<Self>, listener: TcpListener) {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            if !self.is_its_sandbox(peer) {
                continue;
            }
            let server = Rc::clone(&self);
            tokio::task::spawn_local(async move {
                if let Some(_slot) = take_slot(&server.tcp_clients, MAX_TCP) {
                    let _ = server.serve_tcp_client(stream).await;
                }
            });
        }
    }

    async fn serve_tcp_client(&self, mut stream: TcpStream) -> std::io::Result<()> {
        loop {
            let mut len = [0u8; 2];
            match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut len)).await {
                Ok(Ok(_)) => {}
                _ => return Ok(()),
            }
            let len = u16::from_be_bytes(len) as usize;
            if len > MAX_MESSAGE {
                return Ok(());
            }
            let mut query = vec![0u8; len];
            tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut query))
                .await
                .map_err(|_| std::io::ErrorKind::TimedOut)??;
            if !self.bucket.borrow_mut().take() {
                return Ok(());
            }
            let reply = {
                let Some(_slot) = take_slot(&self.pending, MAX_PENDING) else {
                    return Ok(());
                };
                self.answer(&query).await
            };
            let Some(reply) = reply else { return Ok(()) };
            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            stream.write_all(&framed).await?;
        }
    }

    /// The reply to one query, or none when it is to be dropped (not a DNS query at all).
    async fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let request = Message::from_vec(query).ok()?;
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let refuse = |code| error_reply(&request, code);
        if request.metadata.op_code != OpCode::Query || request.queries.len() != 1 {
            return refuse(ResponseCode::NotImp);
        }
        let qname = request.queries[0].name.to_ascii().to_ascii_lowercase();
        let qname = qname.trim_end_matches('.');
        if self.cfg.proxied.iter().any(|h| h == qname) {
            return proxied_reply(&request);
        }
        if self.matching(qname).is_empty() {
            return refuse(ResponseCode::NXDomain);
        }
        let Some(mut response) = self.ask_upstream(query, &request).await else {
            return refuse(ResponseCode::ServFail);
        };
        let addresses = clamp_and_filter(&mut response);
        // Again under the policy's lock: the list may have changed meanwhile.
        let lock = self.policy_lock();
        let entries = lock.as_ref().map(|(_, e)| e.as_slice()).unwrap_or_default();
        let entries: Vec<&AllowEntry> = entries.iter().filter(|e| e.matches_name(qname)).collect();
        if entries.is_empty() {
            return refuse(ResponseCode::NXDomain);
        }
        if !addresses.is_empty() {
            if let Err(e) = self.open(&entries, &addresses).await {
                eprintln!(
                    "mvm-dns {}: adding the addresses of {qname}: {e}",
                    self.cfg.sandbox
                );
                return refuse(ResponseCode::ServFail);
            }
        }
        drop(lock);
        response.metadata.id = request.metadata.id;
        response.to_vec().ok()
    }

    /// The policy file, locked shared while the value lives, and its entries.
    fn policy_lock(&self) -> Option<(std::fs::File, Vec<AllowEntry>)> {
        let file = std::fs::File::open(&self.cfg.policy).ok()?;
        flock::lock(&file, flock::Kind::Shared).ok()?;
        let text = std::io::read_to_string(&file).ok()?;
        let entries = text
            .lines()
            .filter_map(|l| AllowEntry::parse(l.trim()).ok())
            .collect();
        Some((file, entries))
    }

    /// The allow entries that open `qname`.
    fn matching(&self, qname: &str) -> Vec<AllowEntry> {
        self.policy_lock()
            .map(|(_, entries)| {
                entries
                    .into_iter()
                    .filter(|e| e.matches_name(qname))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Passes `query` to the upstream servers in turn (over TCP when a UDP answer is
    /// truncated) and returns the first answer to it.
    async fn ask_upstream(&self, query: &[u8], request: &Message) -> Option<Message> {
        let id = random_id();
        let mut outgoing = query.to_vec();
        outgoing[..2].copy_from_slice(&id.to_be_bytes());
        for server in &self.cfg.upstream {
            let answer = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
                let reply = udp_exchange(*server, &outgoing, id).await?;
                if reply.metadata.truncation {
                    tcp_exchange(*server, &outgoing).await
                } else {
                    Some(reply)
                }
            })
            .await;
            if let Ok(Some(reply)) = answer {
                if reply.metadata.id == id && reply.queries == request.queries {
                    return Some(reply);
                }
            }
        }
        None
    }

    /// Adds `addresses` (with their TTLs) to the namespace's sets for `entries`.
    async fn open(
        &self,
        entries: &[&AllowEntry],
        addresses: &[(Ipv4Addr, u32)],
    ) -> std::io::Result<()> {
        let mut batch = String::new();
        for (addr, ttl) in addresses {
            if entries.iter().any(|e| e.port.is_none()) {
                batch.push_str(&format!(
                    "add element inet mvm {DNS_SET} {{ {addr} timeout {ttl}s }}\n"
                ));
            }
            for port in entries.iter().filter_map(|e| e.port) {
                batch.push_str(&format!(
                    "add element inet mvm {DNS_PORT_SET} {{ {addr} . {port} timeout {ttl}s }}\n"
                ));
            }
        }
        let ns = std::fs::File::open(&self.cfg.netns)?;
        let ns_fd = ns.as_raw_fd();
        let mut cmd = tokio::process::Command::new("nft");
        cmd.args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        // SAFETY: between fork and exec only setns(2), async-signal-safe, on a descriptor this
        // process holds open until the command ends.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(ns_fd, libc::CLONE_NEWNET) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(batch.as_bytes()).await?;
        }
        let out = child.wait_with_output().await?;
        drop(ns);
        if out.status.success() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "nft: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }
}

/// A reply to `request` with `code` and nothing else.
fn error_reply(request: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut reply = Message::error_msg(request.metadata.id, request.metadata.op_code, code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.queries = request.queries.clone();
    reply.to_vec().ok()
}

/// The answer for a secret host: [`PROXY_ADDR`] for A (no upstream query: the proxy finds
/// the real address itself), nothing for other types.
fn proxied_reply(request: &Message) -> Option<Vec<u8>> {
    let mut reply = Message::response(request.metadata.id, request.metadata.op_code);
    reply.metadata.recursion_desired = request.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    reply.queries = request.queries.clone();
    let query = &request.queries[0];
    if query.query_type == RecordType::A {
        reply.add_answer(hickory_proto::rr::Record::from_rdata(
            query.name.clone(),
            PROXIED_TTL,
            RData::A(PROXY_ADDR.into()),
        ));
    }
    reply.to_vec().ok()
}

/// TTL of the answers for secret hosts (they never change).
const PROXIED_TTL: u32 = 300;

/// Removes AAAA records, clamps every TTL to [`MIN_TTL`]..=[`MAX_TTL`] and returns the IPv4
/// addresses of the answer with their TTLs.
fn clamp_and_filter(response: &mut Message) -> Vec<(Ipv4Addr, u32)> {
    let mut addresses = Vec::new();
    for section in [
        &mut response.answers,
        &mut response.authorities,
        &mut response.additionals,
    ] {
        section.retain(|r| r.record_type() != RecordType::AAAA);
        for r in section.iter_mut() {
            r.ttl = r.ttl.clamp(MIN_TTL, MAX_TTL);
        }
    }
    for r in &response.answers {
        if let RData::A(a) = &r.data {
            addresses.push((a.0, r.ttl));
        }
    }
    addresses
}

/// A random 16-bit query id.
pub(super) fn random_id() -> u16 {
    let mut id = [0u8; 2];
    // SAFETY: getrandom(2) writes at most the 2 bytes of `id`.
    unsafe { libc::getrandom(id.as_mut_ptr().cast(), 2, 0) };
    u16::from_ne_bytes(id)
}

/// Sends `query` (id `id`) to `server` over UDP and returns its answer.
pub(super) async fn udp_exchange(server: SocketAddr, query: &[u8], id: u16) -> Option<Message> {
    let bind: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).await.ok()?;
    socket.connect(server).await.ok()?;
    socket.send(query).await.ok()?;
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        let n = socket.recv(&mut buf).await.ok()?;
        if let Ok(m) = Message::from_vec(&buf[..n]) {
            if m.metadata.id == id && m.metadata.message_type == MessageType::Response {
                return Some(m);
            }
        }
    }
}

async fn tcp_exchange(server: SocketAddr, query: &[u8]) -> Option<Message> {
    let mut stream = TcpStream::connect(server).await.ok()?;
    let mut framed = (query.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(query);
    stream.write_all(&framed).await.ok()?;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len).await.ok()?;
    let len = u16::from_be_bytes(len) as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await.ok()?;
    Message::from_vec(&buf).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::{Name, Record};

    #[test]
    fn answers_lose_aaaa_and_ttls_are_clamped() {
        let name = Name::from_ascii("api.example.com.").unwrap();
        let mut m = Message::response(7, OpCode::Query);
        m.add_query(Query::query(name.clone(), RecordType::A));
        let cdn = Name::from_ascii("x.cdn.net.").unwrap();
        m.add_answer(Record::from_rdata(
            name.clone(),
            0,
            RData::CNAME(CNAME(cdn.clone())),
        ));
        m.add_answer(Record::from_rdata(
            cdn.clone(),
            1,
            RData::A(A::new(1, 2, 3, 4)),
        ));
        m.add_answer(Record::from_rdata(
            cdn.clone(),
            86400,
            RData::A(A::new(5, 6, 7, 8)),
        ));
        m.add_answer(Record::from_rdata(
            cdn,
            60,
            RData::AAAA(AAAA::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
        ));
        let addrs = clamp_and_filter(&mut m);
        assert_eq!(
            addrs,
            [
                (Ipv4Addr::new(1, 2, 3, 4), MIN_TTL),
                (Ipv4Addr::new(5, 6, 7, 8), MAX_TTL)
            ]
        );
        assert_eq!(m.answers.len(), 3);
        assert!(m
            .answers
            .iter()
            .all(|r| (MIN_TTL..=MAX_TTL).contains(&r.ttl)));
    }

    #[test]
    fn the_bucket_empties_and_refills() {
        let mut b = Bucket::new();
        let taken = (0..1000).filter(|_| b.take()).count();
        assert!(
            (BURST as usize..BURST as usize + 10).contains(&taken),
            "{taken}"
        );
        b.at -= Duration::from_secs(1);
        assert!(b.take());
    }
}
