//! The manager's side of mvmd's port proxy: a connection to a port of a tenant's own running
//! sandbox, whether or not the sandbox publishes it.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::{blocking, net, pod_netns_of, Manager};
use crate::error::{Error, Result};
use crate::model::Isolation;

impl Manager {
    /// A TCP connection to port `port` of `tenant`'s running sandbox `id`, opened inside the
    /// sandbox's network namespace (see [`net::connect`]): jail tier to its loopback (servers
    /// bound to 0.0.0.0 or 127.0.0.1 answer), vm tier to the guest's address behind the tap.
    /// Another tenant's sandbox is 404, one not running 409, as is a vm-tier sandbox without
    /// a network (its guest has no address); port 0 is 422, a port that does not take the
    /// connection [`Error::PortUnreachable`].
    pub async fn connect_port(
        &self,
        tenant: &str,
        id: &str,
        port: u16,
    ) -> Result<tokio::net::TcpStream> {
        if port == 0 {
            return Err(Error::Invalid("port must be 1 to 65535, got 0".into()));
        }
        let s = self.running(tenant, id)?.sandbox;
        let addr = match s.isolation {
            Isolation::Jail => Ipv4Addr::LOCALHOST,
            Isolation::Vm => s
                .network
                .address
                .as_deref()
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| {
                    Error::Conflict(format!(
                        "sandbox {id} is a vm-tier sandbox without a network (egress \"none\" \
                         and no published port): its guest has no address to connect to; \
                         create it with a published port or another egress mode"
                    ))
                })?,
        };
        let netns = pod_netns_of(&s).unwrap_or_else(|| self.inner.cfg.netns(id));
        let stream =
            blocking(move || net::connect::connect(&netns, SocketAddrV4::new(addr, port))).await?;
        tokio::net::TcpStream::from_std(stream)
            .map_err(|e| Error::host("registering the proxied connection", e))
    }
}
