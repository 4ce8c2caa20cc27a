//! Helpers shared by the virtio device tests and the virtio benchmark.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

/// Writes a raw disk image of `sectors` sectors: sector 0 starts with "MVM test disk, sector 0",
/// every other sector with "MVM filler <n>".
pub fn disk_image(dir: &Path, sectors: usize) -> PathBuf {
    let mut bytes = vec![0u8; sectors * 512];
    for (n, sector) in bytes.chunks_mut(512).enumerate() {
        let text = if n == 0 {
            "MVM test disk, sector 0".to_string()
        } else {
            format!("MVM filler {n}")
        };
        sector[..text.len()].copy_from_slice(text.as_bytes());
    }
    let path = dir.join("disk.img");
    std::fs::write(&path, bytes).expect("write disk image");
    path
}

/// A running `mvm-vmm` whose console is read line by line while the test drives the host side.
pub struct LiveVmm {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<(std::time::Instant, String)>,
    seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    _dir: mvm_testkit::ScratchDir,
}

impl LiveVmm {
    /// Starts `mvm-vmm --no-api --config-file` with `config`.
    pub fn start(config: &serde_json::Value) -> LiveVmm {
        Self::spawn(config, None)
    }

    /// Starts `mvm-vmm --api-sock <api_sock> --config-file` with `config`.
    pub fn start_with_api(config: &serde_json::Value, api_sock: &Path) -> LiveVmm {
        Self::spawn(config, Some(api_sock))
    }

    fn spawn(config: &serde_json::Value, api_sock: Option<&Path>) -> LiveVmm {
        use std::io::{BufRead, Read};
        let dir = mvm_testkit::ScratchDir::new("live-vmm");
        let path = dir.path().join("vm.json");
        std::fs::write(&path, config.to_string()).expect("write config");
        let mut command = std::process::Command::new(mvm_testkit::binary("mvm-vmm"));
        match api_sock {
            Some(sock) => command.arg("--api-sock").arg(sock),
            None => command.arg("--no-api"),
        };
        let mut child = command
            .arg("--config-file")
            .arg(&path)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn mvm-vmm");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((std::time::Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr_pipe.read_to_string(&mut s);
            s
        });
        LiveVmm {
            child,
            lines,
            seen: Vec::new(),
            stderr: Some(stderr),
            _dir: dir,
        }
    }

    /// Waits for a console line starting with `prefix` and returns it; panics with everything
    /// seen so far after `timeout`.
    pub fn expect_line(&mut self, prefix: &str, timeout: std::time::Duration) -> String {
        self.expect_line_at(prefix, timeout).1
    }

    /// Like [`LiveVmm::expect_line`], also returning when the line was read from the VMM.
    pub fn expect_line_at(
        &mut self,
        prefix: &str,
        timeout: std::time::Duration,
    ) -> (std::time::Instant, String) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) => {
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return (at, line);
                    }
                }
                Err(_) => {
                    let _ = self.child.kill();
                    panic!(
                        "no console line starting with {prefix:?}; console so far: {:#?}",
                        self.seen
                    );
                }
            }
        }
    }

    /// Waits for the VMM to exit; returns its exit code, the whole console and stderr.
    pub fn finish(mut self, timeout: std::time::Duration) -> (Option<i32>, Vec<String>, String) {
        let deadline = std::time::Instant::now() + timeout;
        let code = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status.code(),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(5))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break None;
                }
            }
        };
        while let Ok((_, line)) = self
            .lines
            .recv_timeout(std::time::Duration::from_millis(200))
        {
            self.seen.push(line);
        }
        let stderr = self
            .stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        (code, std::mem::take(&mut self.seen), stderr)
    }
}

impl Drop for LiveVmm {
    fn drop(&mut self) {
        // Killing an exited child fails harmlessly.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tap created for one test (as root), deleted on drop.
pub struct TestTap {
    /// Interface name.
    pub name: String,
}

impl TestTap {
    /// Creates tap `mvmt<pid><tag>` with IPv6 off (no host chatter) and brings it up; None (after
    /// a loud SKIP line, or a failure in CI) when not root or when iproute2 fails.
    pub fn create(test: &str, tag: &str) -> Option<TestTap> {
        if !mvm_testkit::is_root() {
            mvm_testkit::skip_or_fail_in_ci(test, "creating a tap needs root");
            return None;
        }
        let name = format!("mvmt{}{tag}", std::process::id() % 100_000);
        let ip = |args: &[&str]| std::process::Command::new("ip").args(args).output();
        match ip(&["tuntap", "add", "dev", &name, "mode", "tap"]) {
            Ok(out) if out.status.success() => {}
            other => {
                mvm_testkit::skip_or_fail_in_ci(
                    test,
                    &format!("`ip tuntap add` failed: {other:?}"),
                );
                return None;
            }
        }
        let tap = TestTap { name };
        // Best effort: without it the guest just skips the host's IPv6 frames.
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", tap.name),
            "1",
        );
        let up = ip(&["link", "set", &tap.name, "up"]).expect("run ip link set up");
        assert!(up.status.success(), "ip link set up: {up:?}");
        Some(tap)
    }
}

impl Drop for TestTap {
    fn drop(&mut self) {
        // Best effort cleanup of a test interface.
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.name])
            .output();
    }
}

/// An AF_PACKET socket on one interface: sees every frame the interface receives (what the VMM
/// writes to the tap) and transmits frames on it (which the VMM reads from the tap).
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
}

impl PacketSocket {
    /// Opens a packet socket bound to `ifname`.
    pub fn open(ifname: &str) -> PacketSocket {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "socket(AF_PACKET): {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a fresh socket owned by nobody else.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex > 0, "no interface {ifname}");
        // SAFETY: sockaddr_ll is plain data; zero is a valid starting value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: addr is a valid sockaddr_ll of the size passed.
        let ret = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            ret,
            0,
            "bind AF_PACKET: {}",
            std::io::Error::last_os_error()
        );
        PacketSocket { fd }
    }

    /// The next frame whose ethertype is `ethertype`, within `timeout`.
    pub fn recv_ethertype(&self, ethertype: u16, timeout: std::time::Duration) -> Option<Vec<u8>> {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + timeout;
        let mut buf = vec![0u8; 70000];
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return None;
            }
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            if unsafe { libc::poll(&mut pfd, 1, left.as_millis().max(1) as i32) } <= 0 {
                continue;
            }
            // SAFETY: buf is writable for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 14 && buf[12..14] == ethertype.to_be_bytes() {
                return Some(buf[..n as usize].to_vec());
            }
        }
    }

    /// Transmits `frame` on the interface.
    pub fn send(&self, frame: &[u8]) {
        use std::os::fd::AsRawFd;
        // SAFETY: frame is readable for its length.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "send on packet socket: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Sends one HTTP request to an API socket (retrying the connection until it exists) and
/// returns the status code and body.
pub fn api_request(
    sock: &Path,
    method: &str,
    path: &str,
    body: &serde_json::Value,
) -> (u16, String) {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut stream = loop {
        match std::os::unix::net::UnixStream::connect(sock) {
            Ok(s) => break s,
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("cannot connect to {}: {e}", sock.display()),
        }
    };
    let body = body.to_string();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}
