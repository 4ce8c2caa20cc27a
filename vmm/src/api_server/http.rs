//! The HTTP/1.1 subset the API speaks: one request at a time with a `Content-Length` body, and
//! JSON responses. Requests are bounded: headers at [`MAX_HEAD_BYTES`] (431 beyond), bodies at
//! [`MAX_BODY_BYTES`] (413 beyond), so no client makes the VMM allocate more.

use std::io::{BufRead, Read, Write};

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

/// Reads one request; Ok(None) at a clean end of stream, Err(response) for malformed or
/// oversized input.
pub fn read_request(reader: &mut impl BufRead) -> Result<Option<HttpRequest>, HttpResponse> {
    let mut head = Vec::new();
    loop {
        let mut line = Vec::new();
        let n = reader
            .by_ref()
            .take((MAX_HEAD_BYTES + 1 - head.len().min(MAX_HEAD_BYTES)) as u64)
            .read_until(b'\n', &mut line)
            .map_err(|e| HttpResponse::fault(400, format!("cannot read the request: {e}")))?;
        if n == 0 {
            return if head.is_empty() {
                Ok(None)
            } else {
                Err(HttpResponse::fault(
                    400,
                    "the request ended before its headers did",
                ))
            };
        }
        if head.len() + line.len() > MAX_HEAD_BYTES {
            return Err(HttpResponse::fault(
                431,
                "request headers are larger than 16 KiB",
            ));
        }
        let blank = line == b"\r\n" || line == b"\n";
        head.extend_from_slice(&line);
        if blank && head.len() > line.len() {
            break;
        }
        if blank {
            // Stray empty lines before a request are allowed (RFC 9112, 2.2).
            head.clear();
        }
    }
    let head = String::from_utf8(head)
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
    let mut body = vec![0u8; content_length];
    reader.read_exact(&mut body).map_err(|_| {
        HttpResponse::fault(400, "the request body is shorter than its Content-Length")
    })?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    Ok(Some(HttpRequest {
        method: method.to_ascii_uppercase(),
        path,
        body,
        close,
    }))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// Parses `raw` as the start of a connection's byte stream.
    pub(in crate::api_server) fn req(raw: &str) -> Result<Option<HttpRequest>, HttpResponse> {
        read_request(&mut raw.as_bytes())
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
