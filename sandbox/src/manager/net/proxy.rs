//! `mvm-egress`, the egress proxy of one sandbox with secrets (started by the manager, see
//! [`super::secrets`]): it takes the sandbox's HTTPS connections to the secrets' hosts (the
//! sandbox's resolver answers those names with [`super::PROXY_ADDR`]), terminates TLS with a
//! leaf for the host the client names (SNI) signed by the sandbox's own CA, and forwards each
//! HTTP/1.1 request to the real host over TLS verified against the host's roots (and the
//! operator's extra CA), with each placeholder of a secret for that host replaced by its value
//! in the request headers — never in bodies, never for another host. Connections naming any
//! other host fail the handshake: no certificate. Each use is one audit line, without the
//! value.
//!
//! Bounds: connections only from the sandbox's own address, [`MAX_CONNECTIONS`] at once,
//! [`IDLE`] to finish a handshake or send a request's head.

use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::HeaderValue;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::secrets::{ca_params, ProxyConfig, Secret, PROXY_FD};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a client has for its TLS handshake and each request head.
const IDLE: Duration = Duration::from_secs(30);
/// How long the real host has to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An error of the proxy's setup.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The configuration on standard input.
    #[error("reading the configuration from stdin: {0}")]
    Config(String),
    /// Certificates and keys.
    #[error("{0}")]
    Tls(String),
    /// Sockets, files.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// The leaves of the secret hosts, chosen by SNI.
#[derive(Debug)]
struct Leaves(HashMap<String, Arc<CertifiedKey>>);

impl ResolvesServerCert for Leaves {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = hello.server_name()?.to_ascii_lowercase();
        self.0.get(name.trim_end_matches('.')).cloned()
    }
}

/// A leaf for each secret host, signed by the sandbox's CA.
fn leaves(cfg: &ProxyConfig) -> Result<Leaves, ProxyError> {
    let tls = |e: rcgen::Error| ProxyError::Tls(format!("the sandbox's CA: {e}"));
    let ca_key = rcgen::KeyPair::from_pem(&cfg.ca_key_pem).map_err(tls)?;
    let issuer = rcgen::Issuer::new(ca_params(&cfg.sandbox), ca_key);
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let mut leaves = HashMap::new();
    for host in cfg.secrets.iter().flat_map(|s| &s.hosts) {
        let key = rcgen::KeyPair::generate().map_err(tls)?;
        let mut params = rcgen::CertificateParams::new(vec![host.clone()]).map_err(tls)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, host.clone());
        let cert = params.signed_by(&key, &issuer).map_err(tls)?;
        let der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let signing = provider
            .key_provider
            .load_private_key(der)
            .map_err(|e| ProxyError::Tls(format!("a leaf key: {e}")))?;
        leaves.insert(
            host.clone(),
            Arc::new(CertifiedKey::new(vec![cert.der().clone()], signing)),
        );
    }
    Ok(Leaves(leaves))
}

/// The roots the real hosts' certificates must chain to: the host's, and `extra`'s.
fn roots(extra: Option<&std::path::Path>) -> Result<rustls::RootCertStore, ProxyError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(path) = extra {
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ProxyError::Tls(format!("the extra CA file {}: {e}", path.display())))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| ProxyError::Tls(format!("{}: {e}", path.display())))?;
        }
    }
    Ok(roots)
}

/// What every connection shares.
struct Shared {
    cfg: ProxyConfig,
    connector: tokio_rustls::TlsConnector,
    audit: std::sync::Mutex<std::fs::File>,
    connections: AtomicUsize,
}

/// Runs the proxy on the listening socket at [`PROXY_FD`] with `cfg` until it is killed.
pub fn serve(cfg: ProxyConfig) -> Result<(), ProxyError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxyError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(leaves(&cfg)?));
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ProxyError::Tls(e.to_string()))?
        .with_root_certificates(roots(cfg.extra_ca.as_deref())?)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let audit = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&cfg.audit)?
    };
    let shared = Arc::new(Shared {
        cfg,
        connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        audit: std::sync::Mutex::new(audit),
        connections: AtomicUsize::new(0),
    });
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        // SAFETY: the manager passes this descriptor to this process and nothing else owns it.
        let listener = unsafe { std::net::TcpListener::from_raw_fd(PROXY_FD) };
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            if peer.ip() != std::net::IpAddr::V4(shared.cfg.client) {
                continue;
            }
            if shared.connections.fetch_add(1, Ordering::Relaxed) >= MAX_CONNECTIONS {
                shared.connections.fetch_sub(1, Ordering::Relaxed);
                continue;
            }
            let (shared, acceptor) = (Arc::clone(&shared), acceptor.clone());
            tokio::spawn(async move {
                let _ = connection(&shared, acceptor, stream).await;
                shared.connections.fetch_sub(1, Ordering::Relaxed);
            });
        }
    })
}

/// Serves one connection of the sandbox.
async fn connection(
    shared: &Arc<Shared>,
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
) -> std::io::Result<()> {
    let tls = tokio::time::timeout(IDLE, acceptor.accept(stream))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)??;
    // The handshake succeeded, so the client named one of the secret hosts.
    let Some(host) = tls.get_ref().1.server_name().map(str::to_owned) else {
        return Ok(());
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let service = {
        let shared = Arc::clone(shared);
        hyper::service::service_fn(move |req| {
            let (shared, host) = (Arc::clone(&shared), host.clone());
            async move { Ok::<_, std::convert::Infallible>(forward(&shared, &host, req).await) }
        })
    };
    hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(IDLE)
        .serve_connection(TokioIo::new(tls), service)
        .await
        .map_err(std::io::Error::other)
}

type Body = BoxBody<Bytes, hyper::Error>;

/// A response of the proxy's own, for a request it could not pass on.
fn failure(status: StatusCode, why: String) -> Response<Body> {
    let mut resp = Response::new(
        Full::new(Bytes::from(format!("mvm egress proxy: {why}\n")))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp
}

/// Passes `req` (which came for `host`) on to `host` with its secrets in place.
async fn forward(shared: &Shared, host: &str, mut req: Request<Incoming>) -> Response<Body> {
    let used = substitute(&shared.cfg.secrets, host, req.headers_mut());
    for name in used {
        let line = format!(
            "{} sandbox={} secret={name} host={host} method={} path={}\n",
            unix_time(),
            shared.cfg.sandbox,
            req.method(),
            req.uri().path()
        );
        let mut audit = shared.audit.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = audit.write_all(line.as_bytes()) {
            // No use without its record.
            return failure(
                StatusCode::BAD_GATEWAY,
                format!("writing the audit log: {e}"),
            );
        }
    }
    match send(shared, host, req).await {
        Ok(resp) => resp.map(BodyExt::boxed),
        Err(why) => failure(StatusCode::BAD_GATEWAY, format!("{host}: {why}")),
    }
}

/// Sends `req` to `host` over a new verified TLS connection.
async fn send(
    shared: &Shared,
    host: &str,
    req: Request<Incoming>,
) -> Result<Response<Incoming>, String> {
    let addr = resolve(&shared.cfg.upstream, host)
        .await
        .ok_or("no public address found (upstream DNS)")?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect((addr, 443)))
        .await
        .map_err(|_| format!("connecting to {addr}:443 timed out"))?
        .map_err(|e| format!("connecting to {addr}:443: {e}"))?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let tls = shared
        .connector
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// Replaces in `headers` the placeholder of each secret of `host` with its value; returns the
/// names of the secrets used. Other secrets' placeholders stay as they are.
fn substitute(secrets: &[Secret], host: &str, headers: &mut hyper::HeaderMap) -> Vec<String> {
    let mut used = Vec::new();
    for secret in secrets.iter().filter(|s| s.hosts.iter().any(|h| h == host)) {
        for value in headers.values_mut() {
            let Ok(text) = value.to_str() else { continue };
            if text.contains(&secret.placeholder) {
                let replaced = text.replace(&secret.placeholder, &secret.value);
                if let Ok(v) = HeaderValue::from_str(&replaced) {
                    *value = v;
                    if !used.contains(&secret.name) {
                        used.push(secret.name.clone());
                    }
                }
            }
        }
    }
    used
}

/// The first IPv4 address of `host` from the upstream servers that a sandbox's guard lets it
/// reach anyway: the proxy runs on the host, so a name answered with a private address, the
/// metadata address or one of the host's own must not take the sandbox there.
async fn resolve(upstream: &[SocketAddr], host: &str) -> Option<Ipv4Addr> {
    use hickory_proto::op::{Message, Query};
    use hickory_proto::rr::{Name, RData, RecordType};
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(
        Name::from_ascii(format!("{host}.")).ok()?,
        RecordType::A,
    ));
    for server in upstream {
        let id = super::resolver::random_id();
        query.metadata.id = id;
        let bytes = query.to_vec().ok()?;
        let answer = tokio::time::timeout(
            Duration::from_secs(3),
            super::resolver::udp_exchange(*server, &bytes, id),
        )
        .await;
        if let Ok(Some(reply)) = answer {
            if let Some(a) = reply.answers.iter().find_map(|r| match &r.data {
                RData::A(a) if !super::rules::guarded(a.0) => Some(a.0),
                _ => None,
            }) {
                return Some(a);
            }
        }
    }
    None
}

fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Reads the proxy's configuration (JSON) from standard input to its end.
pub fn read_config() -> Result<ProxyConfig, ProxyError> {
    let mut text = Vec::new();
    std::io::Read::read_to_end(&mut std::io::stdin(), &mut text)?;
    serde_json::from_slice(&text).map_err(|e| ProxyError::Config(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_hosts_secrets_are_put_in_and_only_in_headers() {
        let secrets = vec![
            Secret {
                name: "A".into(),
                placeholder: "mvm-secret-a-1".into(),
                value: "VALUE-A".into(),
                hosts: vec!["a.test".into()],
            },
            Secret {
                name: "B".into(),
                placeholder: "mvm-secret-b-2".into(),
                value: "VALUE-B".into(),
                hosts: vec!["b.test".into()],
            },
        ];
        let mut headers = hyper::HeaderMap::new();
        headers.insert("authorization", "Bearer mvm-secret-a-1".parse().unwrap());
        headers.insert("x-other", "mvm-secret-b-2".parse().unwrap());
        let used = substitute(&secrets, "a.test", &mut headers);
        assert_eq!(used, ["A"]);
        assert_eq!(headers["authorization"], "Bearer VALUE-A");
        assert_eq!(headers["x-other"], "mvm-secret-b-2");
        let mut headers = hyper::HeaderMap::new();
        headers.insert("authorization", "Bearer mvm-secret-a-1".parse().unwrap());
        assert!(substitute(&secrets, "c.test", &mut headers).is_empty());
        assert_eq!(headers["authorization"], "Bearer mvm-secret-a-1");
    }
}
