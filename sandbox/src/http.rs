//! A small HTTP/1.1 client over a unix socket or TCP: how the manager talks to mvm-vmm's API
//! socket and how the CLI talks to mvmd.

use std::path::PathBuf;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path.
    Unix(PathBuf),
    /// `host:port`.
    Tcp(String),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;
    /// `unix:PATH`, `/abs/path`, `tcp:HOST:PORT`, `http://HOST:PORT` or `HOST:PORT`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Endpoint::Unix(p.into()));
        }
        if s.starts_with('/') {
            return Ok(Endpoint::Unix(s.into()));
        }
        let addr = s
            .strip_prefix("tcp:")
            .or_else(|| s.strip_prefix("http://"))
            .unwrap_or(s)
            .trim_end_matches('/');
        if addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok())
        {
            Ok(Endpoint::Tcp(addr.to_owned()))
        } else {
            Err(format!(
                "{s:?} is not unix:PATH, /PATH, tcp:HOST:PORT or http://HOST:PORT"
            ))
        }
    }
}

/// Errors of the HTTP client.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The server could not be reached.
    #[error("connecting to {endpoint}: {source}")]
    Connect {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The exchange failed.
    #[error("HTTP exchange with {endpoint}: {source}")]
    Exchange {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: hyper::Error,
    },
}

/// Sends one request on a fresh connection and returns the response with a streaming body.
pub async fn send(
    endpoint: &Endpoint,
    req: Request<Full<Bytes>>,
) -> Result<Response<Incoming>, HttpError> {
    let connect_err = |source| HttpError::Connect {
        endpoint: endpoint.to_string(),
        source,
    };
    let exchange_err = |source| HttpError::Exchange {
        endpoint: endpoint.to_string(),
        source,
    };
    macro_rules! over {
        ($stream:expr) => {{
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new($stream))
                .await
                .map_err(exchange_err)?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            sender.send_request(req).await.map_err(exchange_err)
        }};
    }
    match endpoint {
        Endpoint::Unix(path) => over!(tokio::net::UnixStream::connect(path)
            .await
            .map_err(connect_err)?),
        Endpoint::Tcp(addr) => over!(tokio::net::TcpStream::connect(addr)
            .await
            .map_err(connect_err)?),
    }
}

/// Sends a request and reads the whole answer: (status, body).
pub async fn send_collect(
    endpoint: &Endpoint,
    req: Request<Full<Bytes>>,
) -> Result<(u16, Bytes), HttpError> {
    let resp = send(endpoint, req).await?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|source| HttpError::Exchange {
            endpoint: endpoint.to_string(),
            source,
        })?
        .to_bytes();
    Ok((status, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!("unix:/a/b".parse(), Ok(Endpoint::Unix("/a/b".into())));
        assert_eq!("/a/b".parse(), Ok(Endpoint::Unix("/a/b".into())));
        assert_eq!(
            "http://127.0.0.1:8080/".parse(),
            Ok(Endpoint::Tcp("127.0.0.1:8080".into()))
        );
        assert_eq!(
            "tcp:localhost:1".parse(),
            Ok(Endpoint::Tcp("localhost:1".into()))
        );
        "nonsense".parse::<Endpoint>().unwrap_err();
        "host:notaport".parse::<Endpoint>().unwrap_err();
    }
}
