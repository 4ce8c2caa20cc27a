//! `mvm-udp-echo PORT`: answers every UDP datagram to 0.0.0.0:PORT with `echo:` and the
//! datagram, until it is killed. The published-port tests run it in a sandbox (busybox has
//! no UDP server); a static binary, so it runs in a jail and in a guest alike.

use std::net::{Ipv4Addr, UdpSocket};
use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(port) = std::env::args().nth(1).and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("usage: mvm-udp-echo PORT");
        return ExitCode::from(2);
    };
    let socket = match UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port)) {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("mvm-udp-echo: binding UDP port {port}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut datagram = [0u8; 2048];
    loop {
        // A failed receive or send (an ICMP error of an earlier one) ends nothing.
        if let Ok((n, from)) = socket.recv_from(&mut datagram) {
            let reply = [b"echo:", &datagram[..n]].concat();
            let _ = socket.send_to(&reply, from);
        }
    }
}
