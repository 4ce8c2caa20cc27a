//! The manager's side of mvmd's port proxy: a connection to a port of a tenant's own running
//! sandbox, whether or not the sandbox publishes it. Each tenant has at most
//! [`Bounds::proxied_connections`](crate::bounds::Bounds) of them open or opening at once,
//! and one on which no byte moves either way for
//! [`Bounds::proxied_idle_secs`](crate::bounds::Bounds) ends: a sandbox that stalls its
//! server, or a client that opens connections and leaves them, holds a bounded share of the
//! daemon.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use super::{lock, net, pod_netns_of, Manager};
use crate::error::{Error, Result};
use crate::model::Isolation;

/// Each tenant's share of port proxy connections.
#[derive(Default)]
pub(super) struct ProxiedShares(Mutex<HashMap<String, Arc<Semaphore>>>);

impl ProxiedShares {
    /// A connection of `tenant`'s, of at most `most` at once; a quota error past it.
    fn take(&self, tenant: &str, most: usize) -> Result<OwnedSemaphorePermit> {
        let share = Arc::clone(
            lock(&self.0)
                .entry(tenant.to_owned())
                .or_insert_with(|| Arc::new(Semaphore::new(most))),
        );
        share.try_acquire_owned().map_err(|_| {
            Error::Quota(format!(
                "{most} port proxy connections of tenant {tenant} are open; close one (or \
                 raise MVM_PORT_PROXY_CONNECTIONS)"
            ))
        })
    }
}

/// A connection to a sandbox's port: it holds its tenant's share until dropped, and a read
/// or write fails with [`io::ErrorKind::TimedOut`] once nothing has moved either way for its
/// idle time.
pub struct ProxiedStream {
    stream: TcpStream,
    idle: Duration,
    deadline: Pin<Box<Sleep>>,
    _share: OwnedSemaphorePermit,
}

impl ProxiedStream {
    fn new(stream: TcpStream, idle: Duration, share: OwnedSemaphorePermit) -> Self {
        Self {
            stream,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            _share: share,
        }
    }

    /// Moves the deadline after progress; past the deadline, a pending call fails.
    fn watch<T>(
        &mut self,
        cx: &mut Context<'_>,
        poll: Poll<io::Result<T>>,
        moved: bool,
    ) -> Poll<io::Result<T>> {
        match poll {
            Poll::Ready(result) => {
                if moved {
                    let idle = self.idle;
                    self.deadline.as_mut().reset(Instant::now() + idle);
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no byte moved for {} s", self.idle.as_secs()),
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncRead for ProxiedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.stream).poll_read(cx, buf);
        let moved = buf.filled().len() > before;
        this.watch(cx, poll, moved)
    }
}

impl AsyncWrite for ProxiedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, data);
        let moved = matches!(poll, Poll::Ready(Ok(n)) if n > 0);
        this.watch(cx, poll, moved)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Manager {
    /// A TCP connection to port `port` of `tenant`'s running sandbox `id`, opened inside the
    /// sandbox's network namespace (see [`net::connect`]): jail tier to its loopback (servers
    /// bound to 0.0.0.0 or 127.0.0.1 answer), vm tier to the guest's address behind the tap.
    /// A paused or saved sandbox whose lifecycle says so is resumed first. Another tenant's
    /// sandbox is 404, one not running 409, as is a vm-tier sandbox without
    /// a network (its guest has no address); port 0 is 422, a port that does not take the
    /// connection [`Error::PortUnreachable`], a tenant with all its connections open a quota
    /// error.
    pub async fn connect_port(&self, tenant: &str, id: &str, port: u16) -> Result<ProxiedStream> {
        if port == 0 {
            return Err(Error::Invalid("port must be 1 to 65535, got 0".into()));
        }
        let s = self.awake(tenant, id).await?.sandbox;
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
        let bounds = self.inner.cfg.bounds;
        let share = self
            .inner
            .proxied
            .take(tenant, bounds.proxied_connections)?;
        let netns = pod_netns_of(&s).unwrap_or_else(|| self.inner.cfg.netns(id));
        let stream = net::connect::connect(&netns, SocketAddrV4::new(addr, port)).await?;
        Ok(ProxiedStream::new(
            stream,
            Duration::from_secs(bounds.proxied_idle_secs),
            share,
        ))
    }
}
