//! Connections the manager opens to a port of a sandbox (mvmd's port proxy). The socket is
//! made inside the sandbox's network namespace, so it reaches what the sandbox itself reaches
//! from within and nothing else: the namespace's loopback is not the host's, and the host's
//! addresses and other sandboxes stay behind the namespace's rules. No veth is needed.
//!
//! Only the socket is made on a thread in the namespace (a socket keeps the namespace it was
//! made in); the connect waits on the runtime, so a sandbox that never accepts holds no
//! thread of the daemon's.

use std::io::ErrorKind;
use std::net::SocketAddrV4;
use std::path::Path;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::pod::in_netns;
use crate::error::{Error, Result};
use crate::manager::blocking;

/// How long a sandbox's port has to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP connection to `to`, made in the network namespace at `netns`. A port that refuses
/// it or does not accept within [`CONNECT_TIMEOUT`] is [`Error::PortUnreachable`], naming
/// the port.
pub async fn connect(netns: &Path, to: SocketAddrV4) -> Result<tokio::net::TcpStream> {
    let netns = netns.to_owned();
    let socket = blocking(move || {
        in_netns(&netns, || {
            Socket::new(
                Domain::IPV4,
                Type::STREAM.nonblocking().cloexec(),
                Some(Protocol::TCP),
            )
            .map_err(|e| Error::host("making a socket in the sandbox's network namespace", e))
        })
    })
    .await?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    let port = to.port();
    let unreachable = |why: String| Error::PortUnreachable(why);
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(to.into())).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) if e.kind() == ErrorKind::ConnectionRefused => Err(unreachable(format!(
            "nothing listens on port {port} in the sandbox (connection refused)"
        ))),
        Ok(Err(e)) => Err(unreachable(format!(
            "connecting to port {port} of the sandbox: {e}"
        ))),
        Err(_) => Err(unreachable(format!(
            "port {port} of the sandbox did not accept a connection within {} s",
            CONNECT_TIMEOUT.as_secs()
        ))),
    }
}
