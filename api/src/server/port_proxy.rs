//! The port proxy: `ANY /v1/sandboxes/{id}/ports/{port}/{path}` forwards an HTTP request to
//! port `port` of the caller's own running sandbox, published or not, and streams the answer
//! back. The connection is opened inside the sandbox's network namespace
//! ([`Manager::connect_port`](mvm_sandbox::manager::Manager::connect_port)), so nothing but
//! that sandbox is reachable through it. The request keeps its method, path after the port,
//! query and end-to-end headers; hop-by-hop headers and the caller's `Authorization` (its
//! mvmd token) are not passed on, and `Host` is `localhost:PORT`. The body streams both ways,
//! the request's counted against mvmd's upload limit. An `Upgrade` (WebSocket) answered with
//! 101 joins the two connections. A connection on which no byte moves for
//! `MVM_PORT_PROXY_IDLE` seconds ends (a server that has not begun its answer by then: 502),
//! and a tenant has at most `MVM_PORT_PROXY_CONNECTIONS` open at once (429 past them).

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::body::UploadLimit;
use super::{AppState, Auth};
use crate::error::Result;
use mvm_sandbox::{Error, ErrorBody};

/// Headers of one connection, never passed on (RFC 9110 §7.6.1), and the caller's token.
static NOT_FORWARDED: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::AUTHORIZATION,
];

/// The sandbox id, the port and the path after it (with its leading `/`) of a port proxy
/// path; `None` for another path.
fn split(path: &str) -> Option<(&str, &str, &str)> {
    let rest = path.strip_prefix("/v1/sandboxes/")?;
    let (id, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("ports/")?;
    Some(match rest.find('/') {
        Some(i) => (id, &rest[..i], &rest[i..]),
        None => (id, rest, "/"),
    })
}

/// Port `raw` of a proxy path: 1 to 65535, or 422.
fn port(raw: &str) -> mvm_sandbox::Result<u16> {
    raw.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Error::Invalid(format!("port must be 1 to 65535, got {raw:?}")))
}

/// `headers` without the hop-by-hop ones (those [`NOT_FORWARDED`] and those `Connection`
/// names); with `upgrade`, `Connection: upgrade` and `Upgrade` stay.
fn end_to_end(headers: &HeaderMap, upgrade: bool) -> HeaderMap {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .collect();
    let mut out = HeaderMap::new();
    for (name, value) in headers {
        let kept_for_upgrade = upgrade && (name == header::UPGRADE || name == header::CONNECTION);
        if kept_for_upgrade
            || (!NOT_FORWARDED.contains(name) && !named.iter().any(|n| n == name.as_str()))
        {
            out.append(name, value.clone());
        }
    }
    out
}

/// Whether `headers` ask to switch protocols (`Connection: upgrade` and an `Upgrade`).
fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

/// Forward a request to a port of your sandbox (published or not): `{path}` and the query go
/// to the sandbox's server as they are, the answer comes back as it is. 502 when nothing
/// listens there or the server does not answer.
#[utoipa::path(method(get, post, put, patch, delete), path = "/v1/sandboxes/{id}/ports/{port}/{path}",
    tag = "sandboxes",
    params(("id" = String, Path), ("port" = u16, Path, description = "1 to 65535"),
        ("path" = String, Path, description = "the rest of the path, passed on")),
    request_body(content = Vec<u8>, content_type = "*/*", description = "passed on"),
    responses((status = 200, description = "the sandbox server's answer, whatever its status"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody, description = "the sandbox is not running"),
        (status = 422, body = ErrorBody, description = "a port outside 1-65535"),
        (status = 429, body = ErrorBody, description = "all the tenant's port proxy connections are open"),
        (status = 502, body = ErrorBody, description = "nothing listens on the port, or no answer")))]
pub(crate) async fn proxy(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    mut req: Request,
) -> Result<Response> {
    let path = req.uri().path().to_owned();
    let (id, raw_port, rest) =
        split(&path).ok_or_else(|| Error::NotFound("no such route; see /openapi.json".into()))?;
    let port = port(raw_port)?;
    let stream = state.manager.connect_port(&tenant.name, id, port).await?;
    let upgrade = wants_upgrade(req.headers());
    let client_upgrade = upgrade
        .then(|| req.extensions_mut().remove::<OnUpgrade>())
        .flatten();
    let target = match req.uri().query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_owned(),
    };
    let limit = UploadLimit::new(&state.manager.config().bounds);
    let mut out = axum::http::Request::builder()
        .method(req.method().clone())
        .uri(&target)
        .body(Body::from_stream(
            limit.apply(std::mem::take(req.body_mut()).into_data_stream()),
        ))
        .map_err(|e| Error::BadRequest(format!("path {target:?}: {e}")))?;
    *out.headers_mut() = end_to_end(req.headers(), upgrade);
    out.headers_mut().insert(
        header::HOST,
        HeaderValue::from_str(&format!("localhost:{port}")).expect("a valid header value"),
    );
    let unreachable =
        |what: String| Error::PortUnreachable(format!("port {port} of sandbox {id}: {what}"));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("port proxy connection: {e}");
        }
    });
    let answer = sender
        .send_request(out)
        .await
        .map_err(|e| limit.error(unreachable(format!("no answer: {e}"))))?;
    let (mut parts, body) = answer.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client) = client_upgrade else {
            return Err(unreachable("switched protocols unasked".into()).into());
        };
        let headers = end_to_end(&parts.headers, true);
        let mut server_answer = axum::http::Response::from_parts(parts, body);
        let server = hyper::upgrade::on(&mut server_answer);
        tokio::spawn(async move {
            match tokio::try_join!(client, server) {
                Ok((c, s)) => {
                    let (mut c, mut s) = (TokioIo::new(c), TokioIo::new(s));
                    if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut s).await {
                        tracing::debug!("port proxy upgraded connection: {e}");
                    }
                }
                Err(e) => tracing::debug!("port proxy upgrade: {e}"),
            }
        });
        let mut switched = Response::new(Body::empty());
        *switched.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *switched.headers_mut() = headers;
        return Ok(switched);
    }
    parts.headers = end_to_end(&parts.headers, false);
    Ok(Response::from_parts(parts, Body::new(body)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_at_the_port() {
        assert_eq!(
            split("/v1/sandboxes/abc/ports/8080/a/b"),
            Some(("abc", "8080", "/a/b"))
        );
        assert_eq!(
            split("/v1/sandboxes/abc/ports/80/"),
            Some(("abc", "80", "/"))
        );
        assert_eq!(
            split("/v1/sandboxes/abc/ports/80"),
            Some(("abc", "80", "/"))
        );
        assert_eq!(split("/v1/sandboxes/abc/files"), None);
        port("65535").unwrap();
        for bad in ["0", "65536", "-1", "x", ""] {
            port(bad).unwrap_err();
        }
    }

    #[test]
    fn hop_by_hop_headers_and_the_token_stay_behind() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "1"),
            ("keep-alive", "5"),
            ("transfer-encoding", "chunked"),
            ("authorization", "Bearer secret"),
            ("upgrade", "websocket"),
            ("content-length", "3"),
            ("x-end", "2"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let out = end_to_end(&h, false);
        let names: Vec<_> = out.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-length", "x-end"]);
        assert!(!wants_upgrade(&h));
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        assert!(wants_upgrade(&h));
        let out = end_to_end(&h, true);
        assert!(out.contains_key(header::UPGRADE) && out.contains_key(header::CONNECTION));
        assert!(!out.contains_key(header::AUTHORIZATION));
    }
}
