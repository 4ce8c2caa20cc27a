//! The manager's side of a sandbox's resolver (egress `allow`): it binds the resolver's
//! sockets on the sandbox's gateway, writes the policy file the resolver reads, starts the
//! resolver (`mvm-dns`, see [`super::resolver`]) and stops it with the sandbox.
//!
//! The resolver is a process of its own per sandbox, like the jailer: a sandbox outlives the
//! process that made it (daemonless `mvm run -d` exits; `mvmd` may restart), and its DNS has
//! to go on as long as it lives. It runs in its own session, so the exit of the process that
//! started it does not touch it, and the teardown (destroy, rollback, reconciliation) stops it
//! by its `--sandbox` argument.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use mvm_sys::flock;
use socket2::{Domain, Protocol, Socket, Type};

use super::rules::DnsListen;
pub use super::rules::RESOLVER_ADDR;
use crate::error::{Error, Result};
use crate::manager::beneath::TreeDir;
use crate::manager::host;

/// The resolver's program name in the manager's binary directory.
pub const RESOLVER_BIN: &str = "mvm-dns";
/// How many times a free port for both the UDP and the TCP socket is looked for.
const BIND_TRIES: usize = 16;

/// The upstream DNS servers of the sandboxes' resolvers: `configured` (`mvmd --dns-upstream`,
/// `MVM_DNS_UPSTREAM`: comma-separated `ADDR[:PORT]`, IPv6 as `[ADDR]:PORT`) or else the
/// host's `/etc/resolv.conf` nameservers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsUpstream(pub Vec<SocketAddr>);

impl DnsUpstream {
    /// Parses `ADDR[:PORT]` entries, comma-separated.
    pub fn parse(list: &str) -> Result<Self> {
        let servers = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                s.parse::<SocketAddr>()
                    .or_else(|_| s.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
                    .map_err(|_| {
                        Error::Invalid(format!(
                            "DNS upstream {s:?} is not ADDR or ADDR:PORT (IPv6 as [ADDR]:PORT)"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        if servers.is_empty() {
            return Err(Error::Invalid("the DNS upstream list is empty".into()));
        }
        Ok(DnsUpstream(servers))
    }

    /// The nameservers of a resolv.conf text.
    fn from_resolv_conf(text: &str) -> Vec<SocketAddr> {
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|a| a.trim().split('%').next()?.parse::<std::net::IpAddr>().ok())
            .map(|ip| (ip, 53).into())
            .collect()
    }

    /// The configured servers, else the host's (none when it has none: then the resolvers
    /// answer SERVFAIL, and the sandboxes' address entries work all the same).
    pub fn resolve(configured: Option<&str>) -> Result<Self> {
        if let Some(list) = configured.filter(|l| !l.trim().is_empty()) {
            return Self::parse(list).map_err(|e| {
                Error::Host(format!(
                    "{e} (set by mvmd --dns-upstream or MVM_DNS_UPSTREAM)"
                ))
            });
        }
        // Without any, the sandboxes still get their address entries; names then get
        // SERVFAIL.
        let servers = std::fs::read_to_string("/etc/resolv.conf")
            .map(|text| Self::from_resolv_conf(&text))
            .unwrap_or_default();
        if servers.is_empty() {
            tracing::warn!(
                "/etc/resolv.conf names no nameserver: names in the sandboxes' allow lists \
                 will not resolve; set mvmd --dns-upstream ADDR[:PORT] or MVM_DNS_UPSTREAM"
            );
        }
        Ok(DnsUpstream(servers))
    }
}

/// The resolver's sockets, bound on the sandbox's gateway before the gateway's address
/// exists (IP_FREEBIND), on one port free for both UDP and TCP.
pub(super) struct Listener {
    udp: Socket,
    tcp: Socket,
    pub listen: DnsListen,
}

/// A socket of `kind` bound on `addr`, which need not exist yet (IP_FREEBIND).
pub(super) fn bound(kind: Type, protocol: Protocol, addr: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV4, kind, Some(protocol))?;
    s.set_freebind_v4(true)?;
    s.bind(&addr.into())?;
    Ok(s)
}

impl Listener {
    /// Binds both sockets on `gateway`.
    pub(super) fn bind(gateway: Ipv4Addr) -> Result<Self> {
        let err = |e| Error::host(format!("binding the sandbox's resolver on {gateway}"), e);
        for _ in 0..BIND_TRIES {
            let udp = bound(Type::DGRAM, Protocol::UDP, (gateway, 0).into()).map_err(err)?;
            let port = udp
                .local_addr()
                .map_err(err)?
                .as_socket()
                .map_or(0, |a| a.port());
            match bound(Type::STREAM, Protocol::TCP, (gateway, port).into()) {
                Ok(tcp) => {
                    tcp.listen(16).map_err(err)?;
                    return Ok(Listener {
                        udp,
                        tcp,
                        listen: DnsListen { port, proxy: None },
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(err(e)),
            }
        }
        Err(Error::Host(format!(
            "no port free for both UDP and TCP on {gateway} for the sandbox's resolver after \
             {BIND_TRIES} tries"
        )))
    }
}

/// A sandbox's resolver: its files and how it is started.
pub(super) struct Resolver<'a> {
    /// Sandbox id.
    pub id: &'a str,
    /// The directory of `mvm-dns`.
    pub bin_dir: &'a Path,
    /// The sandbox's network namespace (pinned file).
    pub netns: &'a Path,
    /// The sandbox's address: queries from any other are ignored.
    pub client: Ipv4Addr,
    /// Upstream servers.
    pub upstream: &'a DnsUpstream,
}

/// The policy file of sandbox `id`'s resolver: its allow list, one entry a line, rewritten
/// under an exclusive flock (the resolver reads it under a shared one).
pub fn policy_path(netns: &Path, id: &str) -> PathBuf {
    // Beside the namespace pins: <run dir>/dns/<id>.
    netns
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("/"))
        .join("dns")
        .join(id)
}

/// Writes `allow` into the policy file at `path` and, while holding its exclusive lock, runs
/// `then` (which flushes what the resolver added for the old list), so that no answer by the
/// old list lands after it.
pub(super) fn write_policy(
    path: &Path,
    allow: &[String],
    then: impl FnOnce() -> Result<()>,
) -> Result<()> {
    use std::io::Write;
    let err = |e| Error::host(format!("writing the resolver policy {}", path.display()), e);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(err)?;
    flock::lock(&file, flock::Kind::Exclusive).map_err(err)?;
    file.set_len(0).map_err(err)?;
    let mut text = allow.join("\n");
    text.push('\n');
    file.write_all(text.as_bytes()).map_err(err)?;
    file.sync_data().map_err(err)?;
    then()
}

impl Resolver<'_> {
    /// Starts the resolver on `listener`'s sockets with the allow list `allow`, in a session
    /// of its own; it answers the hosts of `secrets` with the egress proxy's address.
    pub(super) fn start(
        &self,
        listener: Listener,
        allow: &[String],
        secrets: Option<&[super::Secret]>,
    ) -> Result<()> {
        let policy = policy_path(self.netns, self.id);
        write_policy(&policy, allow, || Ok(()))?;
        let bin = self.bin_dir.join(RESOLVER_BIN);
        if !bin.is_file() {
            return Err(Error::Host(crate::install::helper_missing(
                self.bin_dir,
                RESOLVER_BIN,
            )));
        }
        let mut cmd = std::process::Command::new(&bin);
        cmd.arg("--sandbox")
            .arg(self.id)
            .arg("--netns")
            .arg(self.netns)
            .arg("--policy")
            .arg(&policy)
            .arg("--client")
            .arg(self.client.to_string());
        for u in &self.upstream.0 {
            cmd.arg("--upstream").arg(u.to_string());
        }
        for host in secrets.unwrap_or_default().iter().flat_map(|s| &s.hosts) {
            cmd.arg("--proxied").arg(host);
        }
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null());
        let (udp, tcp) = (listener.udp.as_raw_fd(), listener.tcp.as_raw_fd());
        // SAFETY: between fork and exec only async-signal-safe calls (dup2, setsid,
        // sched_setscheduler) on descriptors this process owns; dup2 onto 3 and 4 clears
        // close-on-exec on them.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(move || {
                if libc::setsid() == -1
                    || libc::dup2(udp, super::resolver::UDP_FD) == -1
                    || libc::dup2(tcp, super::resolver::TCP_FD) == -1
                {
                    return Err(std::io::Error::last_os_error());
                }
                host::normal_priority()
            });
        }
        // The handle is dropped: `stop` reaps it while we are its parent, init once we exit.
        cmd.spawn().map(|_child| ()).map_err(|e| {
            Error::host(
                format!("starting the sandbox's resolver {}", bin.display()),
                format!("{e} (set MVM_BIN_DIR to the directory of mvm-jailer and mvm-dns)"),
            )
        })?;
        Ok(())
    }
}

/// Makes `/etc/resolv.conf` of the sandbox tree `root` (before anything runs in it) name the
/// sandbox's resolver ([`RESOLVER_ADDR`]); a link or file of the image there is replaced,
/// through `etc`'s descriptor (see [`TreeDir`]).
pub fn write_resolv_conf(root: &Path) -> Result<()> {
    TreeDir::open_or_make(root, "etc")?.replace_file(
        "resolv.conf",
        0o644,
        format!("# mvm: the sandbox's resolver (egress allow)\nnameserver {RESOLVER_ADDR}\n")
            .as_bytes(),
    )
}

/// Pids of sandbox `id`'s resolver processes.
pub fn resolver_pids(id: &str) -> Vec<i32> {
    host::pids_of(RESOLVER_BIN, "--sandbox", id)
}

/// Stops sandbox `id`'s resolver and removes its policy file (both may be gone already).
pub(super) fn stop(netns: &Path, id: &str) -> Result<()> {
    stop_helper("resolver", id, resolver_pids)?;
    match std::fs::remove_file(policy_path(netns, id)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::host(
            format!("removing the resolver policy of {id}"),
            e,
        )),
        _ => Ok(()),
    }
}

/// Kills sandbox `id`'s helper processes (`what`, found by `pids`) and waits until they are
/// gone.
pub(super) fn stop_helper(what: &str, id: &str, pids: fn(&str) -> Vec<i32>) -> Result<()> {
    for pid in pids(id) {
        // SAFETY: kill(2) with a pid read from /proc; a reused pid would not match the
        // helper's arguments, which were just read.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !pids(id).iter().all(|p| reaped_or_zombie(*p)) {
        if std::time::Instant::now() > deadline {
            return Err(Error::Host(format!(
                "the {what} of sandbox {id} did not end after SIGKILL"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(())
}

/// Whether process `pid` is gone or dead: reaped here when it is our child (the manager that
/// started it), else a zombie its own parent reaps.
fn reaped_or_zombie(pid: i32) -> bool {
    // SAFETY: waitpid on one pid without status storage; ECHILD when it is not our child.
    if unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) } == pid {
        return true;
    }
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_are_parsed() {
        assert_eq!(
            DnsUpstream::parse("10.0.0.1, 10.0.0.2:5353,[::1]:53")
                .unwrap()
                .0,
            [
                "10.0.0.1:53".parse::<SocketAddr>().unwrap(),
                "10.0.0.2:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        DnsUpstream::parse("x").unwrap_err();
        DnsUpstream::parse(" ,").unwrap_err();
        assert_eq!(
            DnsUpstream::from_resolv_conf(
                "# c\nsearch x\nnameserver 127.0.0.53\nnameserver fe80::1%eth0\noptions edns0\n"
            ),
            [
                "127.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse().unwrap()
            ]
        );
    }
}
