//! Published-port checks shared by the api and cli tests and the nested suite: a plain HTTP
//! `GET /` on a host port, a UDP datagram's answer, and the host nftables table of a
//! sandbox's ports.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

/// A shell command that serves `page` as `/` with busybox httpd on `port`, in the foreground.
pub fn httpd_command(page: &str, port: u16) -> String {
    format!(
        "mkdir -p /tmp/www && echo {page} > /tmp/www/index.html && \
         exec httpd -f -p {port} -h /tmp/www"
    )
}

/// What a datagram `sent` to 127.0.0.1:`port` gets back within `patience` (sent again every
/// 0.5 s: the server may still be starting), if anything.
pub fn udp_answer(port: u16, sent: &str, patience: Duration) -> Option<String> {
    let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("a UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("a read timeout");
    let deadline = Instant::now() + patience;
    let mut answer = [0u8; 2048];
    while Instant::now() < deadline {
        let _ = socket.send_to(sent.as_bytes(), (Ipv4Addr::LOCALHOST, port));
        if let Ok(n) = socket.recv(&mut answer) {
            return Some(String::from_utf8_lossy(&answer[..n]).into_owned());
        }
    }
    None
}

/// A port of 127.0.0.1 that nothing listens on now.
pub fn free_local_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// `GET /` on 127.0.0.1:`port` (HTTP/1.0): the whole answer, or the error.
pub fn http_get(port: u16) -> std::io::Result<String> {
    let mut s =
        TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

/// Polls [`http_get`] until its answer contains `page` (a server needs a moment to
/// listen); panics after 10 s.
pub fn assert_serves(port: u16, page: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match http_get(port) {
            Ok(a) if a.contains(page) => return,
            other => assert!(
                Instant::now() < deadline,
                "127.0.0.1:{port} did not serve {page:?}: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the host has sandbox `id`'s table of published ports (`ip mvm-ports-<id>`).
pub fn ports_table_exists(id: &str) -> bool {
    let out = Command::new("nft")
        .args(["list", "tables", "ip"])
        .output()
        .expect("nft list tables");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.trim() == format!("table ip mvm-ports-{id}"))
}
