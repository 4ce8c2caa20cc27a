//! Connections the manager opens to a port of a sandbox (mvmd's port proxy). The socket is
//! made inside the sandbox's network namespace, so it reaches what the sandbox itself reaches
//! from within and nothing else: the namespace's loopback is not the host's, and the host's
//! addresses and other sandboxes stay behind the namespace's rules. No veth is needed.

use std::io::ErrorKind;
use std::net::{SocketAddrV4, TcpStream};
use std::path::Path;
use std::time::Duration;

use super::pod::in_netns;
use crate::error::{Error, Result};

/// How long a sandbox's port has to accept the connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP connection to `to`, made in the network namespace at `netns` (non-blocking, for
/// tokio). A port that refuses it or does not accept within [`CONNECT_TIMEOUT`] is
/// [`Error::PortUnreachable`], naming the port.
pub fn connect(netns: &Path, to: SocketAddrV4) -> Result<TcpStream> {
    let port = to.port();
    in_netns(netns, move || {
        let stream = TcpStream::connect_timeout(&to.into(), CONNECT_TIMEOUT).map_err(|e| {
            Error::PortUnreachable(match e.kind() {
                ErrorKind::ConnectionRefused => {
                    format!("nothing listens on port {port} in the sandbox (connection refused)")
                }
                ErrorKind::TimedOut | ErrorKind::WouldBlock => format!(
                    "port {port} of the sandbox did not accept a connection within {} s",
                    CONNECT_TIMEOUT.as_secs()
                ),
                _ => format!("connecting to port {port} of the sandbox: {e}"),
            })
        })?;
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::host("making the proxied connection non-blocking", e))?;
        Ok(stream)
    })
}
