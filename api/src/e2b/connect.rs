//! The Connect protocol (connectrpc.com/docs/protocol) over HTTP/1.1 with its JSON codec, the
//! one E2B's SDKs use: unary calls are a plain JSON body each way (`application/json`);
//! streams are envelopes (a flag byte, a 4-byte big-endian length, the message) of
//! `application/connect+json`, a response stream ending with an envelope flagged
//! [`END_STREAM`] holding `{}` or `{"error": {code, message}}`. The protobuf codec is not
//! served (`415`).

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;

/// Flag of the envelope that ends a response stream.
pub const END_STREAM: u8 = 0x02;
/// Flag of a compressed envelope (never sent; refused when received).
const COMPRESSED: u8 = 0x01;
/// Largest request message taken (the agent's frames are 1 MiB).
const MESSAGE_LIMIT: usize = 4 << 20;

/// Connect's error codes (the subset mvm answers with).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    PermissionDenied,
    ResourceExhausted,
    FailedPrecondition,
    Unimplemented,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl Code {
    fn as_str(self) -> &'static str {
        match self {
            Code::InvalidArgument => "invalid_argument",
            Code::NotFound => "not_found",
            Code::AlreadyExists => "already_exists",
            Code::PermissionDenied => "permission_denied",
            Code::ResourceExhausted => "resource_exhausted",
            Code::FailedPrecondition => "failed_precondition",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
            Code::Unavailable => "unavailable",
            Code::Unauthenticated => "unauthenticated",
        }
    }

    /// The HTTP status of a unary error with this code (the protocol's table).
    fn status(self) -> StatusCode {
        match self {
            Code::InvalidArgument | Code::FailedPrecondition => StatusCode::BAD_REQUEST,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::AlreadyExists => StatusCode::CONFLICT,
            Code::PermissionDenied => StatusCode::FORBIDDEN,
            Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            // The protocol's 501 would be a 5xx for a client's mistake; connect-go answers an
            // unknown procedure with 404 too. The body's code is what clients read.
            Code::Unimplemented => StatusCode::NOT_FOUND,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        }
    }
}

/// A failed RPC.
#[derive(Debug, Clone)]
pub struct RpcError {
    pub code: Code,
    pub message: String,
}

impl RpcError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    fn json(&self) -> serde_json::Value {
        serde_json::json!({"code": self.code.as_str(), "message": self.message})
    }
}

impl<E: Into<ApiError>> From<E> for RpcError {
    fn from(e: E) -> Self {
        let e: ApiError = e.into();
        let code = match e.status() {
            StatusCode::BAD_REQUEST | StatusCode::UNPROCESSABLE_ENTITY => Code::InvalidArgument,
            StatusCode::UNAUTHORIZED => Code::Unauthenticated,
            StatusCode::FORBIDDEN => Code::PermissionDenied,
            StatusCode::NOT_FOUND => Code::NotFound,
            StatusCode::CONFLICT => Code::FailedPrecondition,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::PAYLOAD_TOO_LARGE => {
                Code::ResourceExhausted
            }
            StatusCode::BAD_GATEWAY => Code::Unavailable,
            _ => Code::Internal,
        };
        if code == Code::Internal {
            tracing::error!("e2b rpc: {}", e.0);
        }
        Self::new(code, e.body().message)
    }
}

/// The answer to a unary call.
pub fn unary<T: Serialize>(result: Result<T, RpcError>) -> Response {
    match result {
        Ok(msg) => axum::Json(msg).into_response(),
        Err(e) => (e.code.status(), axum::Json(e.json())).into_response(),
    }
}

/// Whether a request's body is enveloped (a streaming call) or a bare message (unary).
fn enveloped(headers: &HeaderMap) -> Result<bool, RpcError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/json");
    match ct.split(';').next().unwrap_or("").trim() {
        "application/json" => Ok(false),
        "application/connect+json" => Ok(true),
        other => Err(RpcError::new(
            Code::InvalidArgument,
            format!(
                "content type {other:?} is not served: mvm's envd speaks Connect with the \
                 JSON codec only"
            ),
        )),
    }
}

/// The request message of a unary or server-streaming call.
pub fn request<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, RpcError> {
    let json = if enveloped(headers)? {
        let mut reader = Envelopes::default();
        reader.buf.extend_from_slice(body);
        match reader.next_buffered()? {
            Some((_, msg)) => msg,
            None => return Err(bad("the request stream holds no message")),
        }
    } else {
        Bytes::copy_from_slice(body)
    };
    parse(&json)
}

/// A message of a request.
pub fn parse<T: DeserializeOwned>(json: &[u8]) -> Result<T, RpcError> {
    let json = if json.is_empty() { b"{}" } else { json };
    serde_json::from_slice(json).map_err(|e| bad(&format!("bad request message: {e}")))
}

fn bad(message: &str) -> RpcError {
    RpcError::new(Code::InvalidArgument, message)
}

/// Reads the envelopes of a request stream.
#[derive(Default)]
pub struct Envelopes {
    buf: Vec<u8>,
}

impl Envelopes {
    /// The next whole envelope in the buffer, if there is one.
    fn next_buffered(&mut self) -> Result<Option<(u8, Bytes)>, RpcError> {
        if self.buf.len() < 5 {
            return Ok(None);
        }
        let flags = self.buf[0];
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if flags & COMPRESSED != 0 {
            return Err(bad("compressed messages are not served"));
        }
        if len > MESSAGE_LIMIT {
            return Err(RpcError::new(
                Code::ResourceExhausted,
                format!("a message may have at most {MESSAGE_LIMIT} bytes"),
            ));
        }
        if self.buf.len() < 5 + len {
            return Ok(None);
        }
        let msg = Bytes::copy_from_slice(&self.buf[5..5 + len]);
        self.buf.drain(..5 + len);
        Ok(Some((flags, msg)))
    }

    /// The next message of `body`, `None` at its end.
    pub async fn next<S, E>(&mut self, body: &mut S) -> Result<Option<Bytes>, RpcError>
    where
        S: Stream<Item = Result<Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        loop {
            if let Some((flags, msg)) = self.next_buffered()? {
                if flags & END_STREAM != 0 {
                    return Ok(None);
                }
                return Ok(Some(msg));
            }
            match body.next().await {
                Some(Ok(chunk)) => self.buf.extend_from_slice(&chunk),
                Some(Err(e)) => return Err(bad(&format!("reading the request: {e}"))),
                None if self.buf.is_empty() => return Ok(None),
                None => return Err(bad("the request stream ends inside a message")),
            }
        }
    }
}

/// One envelope.
fn envelope(flags: u8, payload: &[u8]) -> Bytes {
    let mut v = Vec::with_capacity(5 + payload.len());
    v.push(flags);
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    Bytes::from(v)
}

/// A message envelope of a response stream.
pub fn message<T: Serialize>(msg: &T) -> Bytes {
    envelope(0, &serde_json::to_vec(msg).expect("messages serialize"))
}

/// The envelope ending a response stream: success, or the error.
pub fn end(error: Option<&RpcError>) -> Bytes {
    let trailer = match error {
        None => serde_json::json!({}),
        Some(e) => serde_json::json!({"error": e.json()}),
    };
    envelope(END_STREAM, trailer.to_string().as_bytes())
}

/// A streaming answer: `envelopes` (which end with [`end`]) as they come.
pub fn streaming<S>(envelopes: S) -> Response
where
    S: Stream<Item = Bytes> + Send + 'static,
{
    (
        [(header::CONTENT_TYPE, "application/connect+json")],
        Body::from_stream(envelopes.map(Ok::<_, std::io::Error>)),
    )
        .into_response()
}

/// A streaming answer that is only an error.
pub fn stream_error(e: RpcError) -> Response {
    streaming(futures_util::stream::iter([end(Some(&e))]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn envelopes_round_trip() {
        let mut wire = message(&serde_json::json!({"a": 1})).to_vec();
        wire.extend_from_slice(&message(&serde_json::json!({"b": 2})));
        wire.extend_from_slice(&end(None));
        // Split across chunk boundaries anywhere.
        let chunks: Vec<Result<Bytes, std::io::Error>> = wire
            .chunks(3)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let mut body = futures_util::stream::iter(chunks);
        let mut reader = Envelopes::default();
        assert_eq!(
            &reader.next(&mut body).await.unwrap().unwrap()[..],
            b"{\"a\":1}"
        );
        assert_eq!(
            &reader.next(&mut body).await.unwrap().unwrap()[..],
            b"{\"b\":2}"
        );
        assert!(reader.next(&mut body).await.unwrap().is_none());
    }

    #[test]
    fn errors_end_the_stream_with_a_trailer() {
        let e = RpcError::new(Code::NotFound, "gone");
        let bytes = end(Some(&e));
        assert_eq!(bytes[0], END_STREAM);
        let trailer: serde_json::Value = serde_json::from_slice(&bytes[5..]).unwrap();
        assert_eq!(trailer["error"]["code"], "not_found");
    }

    #[test]
    fn protobuf_is_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, "application/proto".parse().unwrap());
        assert_eq!(
            request::<serde_json::Value>(&h, b"").unwrap_err().code,
            Code::InvalidArgument
        );
    }
}
