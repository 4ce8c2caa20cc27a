//! The HTTP/1.1 subset the API speaks: one request at a time with a `Content-Length` body, and
//! JSON responses. Requests are parsed incrementally ([`RequestParser`]: bytes accumulate per
//! connection until a whole request is there) and bounded: headers at [`MAX_HEAD_BYTES`] (431
//! beyond), bodies at [`MAX_BODY_BYTES`] (413 beyond), so no client makes the VMM hold more.

use std::io::Write;

use serde_json::{json, Value};

/// Largest request head accepted.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// An HTTP response.
#[derive(Debug, PartialEq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// JSON body, if any.
    pub body: Option<Value>,
}

impl HttpResponse {
    /// An error response: Firecracker's `{"fault_message": ...}` body.
    pub fn fault(status: u16, message: impl std::fmt::Display) -> Self {
        HttpResponse {
            status,
            body: Some(json!({ "fault_message": message.to_string() })),
        }
    }

    /// Writes the response; `close` announces that the connection ends after it.
    pub fn write_to(&self, out: &mut impl Write, close: bool) -> std::io::Result<()> {
        let reason = match self.status {
            200 => "OK",
            204 => "No Content",
            400 => "Bad Request",
            404 => "Not Found",
            413 => "Payload Too Large",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "Error",
        };
        let body = self
            .body
            .as_ref()
            .map(|b| b.to_string())
            .unwrap_or_default();
        let mut response = format!("HTTP/1.1 {} {}\r\nServer: mvm-vmm\r\n", self.status, reason);
        if self.body.is_some() {
            response.push_str("Content-Type: application/json\r\n");
        }
        response.push_str(&format!("Content-Length: {}\r\n", body.len()));
        if close {
            response.push_str("Connection: close\r\n");
        }
        response.push_str("\r\n");
        // One write: the client gets the whole response at once, in one syscall.
        response.push_str(&body);
        out.write_all(response.as_bytes())?;
        out.flush()
    }
}

/// A parsed request.
#[derive(Debug)]
pub struct HttpRequest {
    /// Method, upper case.
    pub method: String,
    /// Path without query string.
    pub path: String,
    /// Body bytes.
    pub body: Vec<u8>,
    /// Whether the client asked to close the connection.
    pub close: bool,
}

/// One connection's request parser: it accumulates the bytes received (at most
/// [`MAX_BUFFERED_BYTES`]) until a whole request is there, so a client that sends a request in
/// pieces, or stops halfway, holds no thread and no more memory than that.
#[derive(Debug, Default)]
pub struct RequestParser {
    buf: Vec<u8>,
    /// Where the search for the end of the head resumes: the start of the first line not yet
    /// whole (so bytes trickling in are scanned once, not once per arrival).
    scanned: usize,
    /// The head of the request being received, once it is all there, and its length.
    head: Option<(usize, RequestHead)>,
}

/// Most bytes a connection's parser holds: one request head and body at their limits.
pub const MAX_BUFFERED_BYTES: usize = MAX_HEAD_BYTES + MAX_BODY_BYTES;

impl RequestParser {
    /// A parser at the start of a connection.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many more bytes the parser takes now; 0 only while it holds a whole request (take
    /// it with [`Self::next_request`] first).
    pub fn room(&self) -> usize {
        MAX_BUFFERED_BYTES.saturating_sub(self.buf.len())
    }

    /// Appends received bytes (no more than [`Self::room`]).
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole request: Ok(None) while more bytes are needed, Err(response) for
    /// malformed or oversized input (after which the connection must close).
    pub fn next_request(&mut self) -> Result<Option<HttpRequest>, HttpResponse> {
        if self.head.is_none() {
            let Some(head_len) = self.head_end() else {
                return if self.buf.len() > MAX_HEAD_BYTES {
                    Err(head_too_large())
                } else {
                    Ok(None)
                };
            };
            if head_len > MAX_HEAD_BYTES {
                return Err(head_too_large());
            }
            self.head = Some((head_len, parse_head(&self.buf[..head_len])?));
        }
        let Some((head_len, head)) = &self.head else {
            return Ok(None);
        };
        let request_len = head_len + head.content_length;
        if self.buf.len() < request_len {
            return Ok(None);
        }
        let body = self.buf[*head_len..request_len].to_vec();
        let Some((_, head)) = self.head.take() else {
            return Ok(None);
        };
        self.buf.drain(..request_len);
        self.scanned = 0;
        Ok(Some(HttpRequest {
            method: head.method,
            path: head.path,
            body,
            close: head.close,
        }))
    }

    /// The length of the head (through its empty line) once it is all there. Stray empty lines
    /// before a request are dropped (RFC 9112, 2.2).
    fn head_end(&mut self) -> Option<usize> {
        if self.scanned == 0 {
            let mut stray = 0;
            loop {
                let rest = &self.buf[stray..];
                stray += if rest.starts_with(b"\r\n") {
                    2
                } else if rest.starts_with(b"\n") {
                    1
                } else {
                    break;
                };
            }
            self.buf.drain(..stray);
        }
        while let Some(newline) = self.buf[self.scanned..].iter().position(|b| *b == b'\n') {
            let line = &self.buf[self.scanned..=self.scanned + newline];
            self.scanned += newline + 1;
            if line == b"\r\n" || line == b"\n" {
                return Some(self.scanned);
            }
        }
        None
    }

    /// At the end of the client's stream: Ok when no request was left half sent.
    pub fn finish(&self) -> Result<(), HttpResponse> {
        if self.buf.is_empty() {
            Ok(())
        } else if self.head.is_none() {
            Err(HttpResponse::fault(
                400,
                "the request ended before its headers did",
            ))
        } else {
            Err(HttpResponse::fault(
                400,
                "the request body is shorter than its Content-Length",
            ))
        }
    }
}

fn head_too_large() -> HttpResponse {
    HttpResponse::fault(431, "request headers are larger than 16 KiB")
}

/// What a request head says.
#[derive(Debug)]
struct RequestHead {
    method: String,
    path: String,
    content_length: usize,
    close: bool,
}

fn parse_head(head: &[u8]) -> Result<RequestHead, HttpResponse> {
    let head = std::str::from_utf8(head)
        .map_err(|_| HttpResponse::fault(400, "request headers are not UTF-8"))?;
    let mut lines = head.lines();
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpResponse::fault(
            400,
            format!("malformed request line: {request_line:?}"),
        ));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpResponse::fault(
            400,
            format!("unsupported HTTP version {version}"),
        ));
    }
    let mut content_length = 0usize;
    let mut close = version == "HTTP/1.0";
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Err(HttpResponse::fault(
                400,
                format!("malformed header line: {line:?}"),
            ));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                content_length = value.parse().map_err(|_| {
                    HttpResponse::fault(400, format!("invalid Content-Length: {value:?}"))
                })?
            }
            "transfer-encoding" => {
                return Err(HttpResponse::fault(
                    400,
                    "Transfer-Encoding is not supported; send Content-Length",
                ))
            }
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    if content_length > MAX_BODY_BYTES {
        return Err(HttpResponse::fault(
            413,
            format!("request body is larger than {MAX_BODY_BYTES} bytes"),
        ));
    }
    Ok(RequestHead {
        method: method.to_ascii_uppercase(),
        path: target.split('?').next().unwrap_or(target).to_string(),
        content_length,
        close,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Parses `raw` as a connection's whole byte stream up to its first request, fed one byte
    /// at a time: Ok(None) when the stream ends cleanly before any request.
    pub(in crate::api_server) fn req(raw: &str) -> Result<Option<HttpRequest>, HttpResponse> {
        let mut parser = RequestParser::new();
        for byte in raw.as_bytes() {
            assert!(
                parser.room() > 0,
                "the parser held {} bytes",
                parser.buf.len()
            );
            parser.push(&[*byte]);
            if let Some(request) = parser.next_request()? {
                return Ok(Some(request));
            }
        }
        parser.finish().map(|()| None)
    }

    /// The fault message of an error response.
    pub(in crate::api_server) fn message(response: HttpResponse) -> String {
        response.body.unwrap()["fault_message"]
            .as_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn parses_method_path_body_and_connection() {
        let r = req("put /vsock?x=1 HTTP/1.0\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap()
            .unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("PUT", "/vsock"));
        assert_eq!((r.body.as_slice(), r.close), (&b"{}"[..], true));
        let r = req("\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((r.path.as_str(), r.close), ("/", true));
        assert!(req("").unwrap().is_none());
    }

    #[test]
    fn pipelined_requests_come_out_one_at_a_time_and_a_partial_one_waits() {
        let mut parser = RequestParser::new();
        parser.push(b"GET / HTTP/1.1\r\n\r\nPUT /vsock HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"a");
        let first = parser.next_request().unwrap().unwrap();
        assert_eq!((first.method.as_str(), first.path.as_str()), ("GET", "/"));
        assert!(parser.next_request().unwrap().is_none(), "half a body");
        assert!(parser.room() > 0);
        assert!(message(parser.finish().unwrap_err()).contains("shorter"));
        parser.push(b"\"}");
        let second = parser.next_request().unwrap().unwrap();
        assert_eq!(
            (second.path.as_str(), second.body.as_slice()),
            ("/vsock", &b"{\"a\"}"[..])
        );
        assert!(parser.next_request().unwrap().is_none());
        parser.finish().unwrap();
        // A head that is over the limit before it ends is refused without waiting for its end.
        parser.push(&vec![b'a'; MAX_HEAD_BYTES + 1]);
        assert_eq!(parser.next_request().unwrap_err().status, 431);
    }

    #[test]
    fn malformed_or_oversized_requests_get_4xx_before_any_large_allocation() {
        let fault = |raw: &str| req(raw).unwrap_err();
        assert_eq!(
            fault("PUT /vsock HTTP/1.1\r\nContent-Length: 999999\r\n\r\n").status,
            413
        );
        assert_eq!(
            fault(&format!(
                "GET / HTTP/1.1\r\nX: {}\r\n\r\n",
                "a".repeat(20000)
            ))
            .status,
            431
        );
        // Many short lines count together against the same limit.
        let many = "X: y\r\n".repeat(MAX_HEAD_BYTES / 6 + 1);
        assert_eq!(fault(&format!("GET / HTTP/1.1\r\n{many}\r\n")).status, 431);
        assert_eq!(fault("garbage\r\n\r\n").status, 400);
        assert!(
            message(fault("PUT /vsock HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}"))
                .contains("shorter")
        );
        assert!(message(fault(
            "PUT /vsock HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ))
        .contains("Content-Length"));
    }
}
