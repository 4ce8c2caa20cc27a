//! Request body limits: every route has one, and a body that announces more is refused with
//! 413 before a byte of it is read. JSON bodies are also cut at the limit while read
//! (`DefaultBodyLimit`); file uploads stream into the sandbox and count as they go
//! ([`UploadLimit`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};

use super::AppState;
use crate::error::ApiError;
use mvm_sandbox::bounds::{Bounds, REQUEST_BODY_LIMIT_ENV, UPLOAD_LIMIT_ENV};
use mvm_sandbox::Error;

/// Whether a call is an upload, whose body is a file (`PUT /v1/sandboxes/{id}/files`), an
/// image archive (`POST /v1/images/load`) or passed on to a sandbox's server (the port
/// proxy, any method).
fn is_upload(method: &Method, path: &str) -> bool {
    let parts = path.split('/').collect::<Vec<_>>();
    (*method == Method::PUT && matches!(parts.as_slice(), ["", "v1", "sandboxes", _, "files"]))
        || (*method == Method::POST && path == "/v1/images/load")
        || matches!(parts.as_slice(), ["", "v1", "sandboxes", _, "ports", _, ..])
}

/// The error for a body of more than `limit` bytes on a call of that kind.
fn too_large(upload: bool, limit: u64) -> Error {
    let (what, var) = if upload {
        ("a file upload", UPLOAD_LIMIT_ENV)
    } else {
        ("a request body", REQUEST_BODY_LIMIT_ENV)
    };
    Error::TooLarge(format!(
        "{what} may have at most {limit} bytes (mvmd's {var})"
    ))
}

/// The error for a JSON body cut at the limit while it was read.
pub fn json_too_large(bounds: &Bounds) -> Error {
    too_large(false, bounds.request_body as u64)
}

/// Middleware: 413 for a body whose `Content-Length` is past its route's limit.
pub async fn limit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let bounds = state.manager.config().bounds;
    let upload = is_upload(req.method(), req.uri().path());
    let limit = if upload {
        bounds.upload
    } else {
        bounds.request_body as u64
    };
    match content_length(req.headers()) {
        Some(len) if len > limit => ApiError::from(too_large(upload, limit)).into_response(),
        _ => next.run(req).await,
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Counts an upload's bytes as they stream and cuts it past the limit (a chunked body has no
/// `Content-Length` to check first).
#[derive(Clone)]
pub struct UploadLimit {
    limit: u64,
    exceeded: Arc<AtomicBool>,
}

impl UploadLimit {
    /// The limit of `bounds`.
    pub fn new(bounds: &Bounds) -> Self {
        Self {
            limit: bounds.upload,
            exceeded: Arc::default(),
        }
    }

    /// `body` cut with an error once it passes the limit.
    pub fn apply<S, E>(&self, body: S) -> impl Stream<Item = std::io::Result<Bytes>>
    where
        S: Stream<Item = Result<Bytes, E>>,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let this = self.clone();
        let mut seen = 0u64;
        body.map(move |chunk| {
            let chunk = chunk.map_err(std::io::Error::other)?;
            seen += chunk.len() as u64;
            if seen > this.limit {
                this.exceeded.store(true, Ordering::Relaxed);
                return Err(std::io::Error::other(too_large(true, this.limit)));
            }
            Ok(chunk)
        })
    }

    /// `err`, or the 413 when the upload failed because it passed the limit.
    pub fn error(&self, err: impl Into<Error>) -> Error {
        if self.exceeded.load(Ordering::Relaxed) {
            too_large(true, self.limit)
        } else {
            err.into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_told_apart() {
        assert!(is_upload(&Method::PUT, "/v1/sandboxes/abc/files"));
        assert!(!is_upload(&Method::GET, "/v1/sandboxes/abc/files"));
        assert!(!is_upload(&Method::PUT, "/v1/sandboxes/abc/exec"));
        assert!(!is_upload(&Method::PUT, "/v1/sandboxes/files"));
        assert!(is_upload(&Method::POST, "/v1/sandboxes/abc/ports/80/x"));
        assert!(is_upload(&Method::GET, "/v1/sandboxes/abc/ports/80"));
    }

    #[tokio::test]
    async fn uploads_are_cut_at_the_limit() {
        let limit = UploadLimit::new(&Bounds {
            upload: 5,
            ..Bounds::default()
        });
        let chunks = ["abc", "de", "f"].map(|c| Ok::<_, std::io::Error>(Bytes::from(c)));
        let got: Vec<_> = limit
            .apply(futures_util::stream::iter(chunks))
            .collect()
            .await;
        assert!(
            got[0].is_ok() && got[1].is_ok() && got[2].is_err(),
            "{got:?}"
        );
        let err = ApiError(limit.error(Error::Host("put".into())));
        assert_eq!(err.status(), axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        assert!(err.to_string().contains(UPLOAD_LIMIT_ENV), "{err}");
    }
}
