//! Firecracker's HTTP API on a unix socket: a small HTTP/1.1 server whose requests become
//! [`VmmAction`]s for the VMM thread.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Condvar, Mutex};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use vmm_sys_util::eventfd::EventFd;

use crate::config::{
    BootSource, DriveConfig, LoggerConfig, MachineConfig, MetricsConfig, NetworkInterfaceConfig,
    VsockConfig,
};
use crate::controller::{VmmAction, VmmActionError, VmmResponse};
use crate::event_loop::{ApiChannel, ApiRequest};
use crate::seccomp::Filters;

/// Largest request head accepted.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest request body accepted.
const MAX_BODY_BYTES: usize = 64 * 1024;

/// Errors while starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// The socket path is taken by a live server.
    #[error("API socket {0} is in use by another process; pick another --api-sock path")]
    InUse(String),
    /// The socket could not be created.
    #[error("cannot create API socket {0}: {1}")]
    Bind(String, std::io::Error),
}

/// An HTTP response.
#[derive(Debug, PartialEq)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// JSON body, if any.
    pub body: Option<Value>,
}

impl HttpResponse {
    fn fault(status: u16, message: impl std::fmt::Display) -> Self {
        HttpResponse {
            status,
            body: Some(json!({ "fault_message": message.to_string() })),
        }
    }

    fn write_to(&self, out: &mut impl Write, close: bool) -> std::io::Result<()> {
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
        let mut head = format!("HTTP/1.1 {} {}\r\nServer: mvm-vmm\r\n", self.status, reason);
        if self.body.is_some() {
            head.push_str("Content-Type: application/json\r\n");
        }
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        if close {
            head.push_str("Connection: close\r\n");
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        out.write_all(body.as_bytes())?;
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

/// Reads one request; Ok(None) at a clean end of stream, Err(response) for malformed input.
fn read_request(reader: &mut impl BufRead) -> Result<Option<HttpRequest>, HttpResponse> {
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

/// Parses the body of a request to `section` (errors name the field, e.g.
/// `machine-config.vcpu_count`).
fn parse<T: DeserializeOwned>(section: &str, body: &[u8]) -> Result<T, HttpResponse> {
    crate::config::from_json_slice(Some(section), body).map_err(|e| HttpResponse::fault(400, e))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: String,
}

fn id_matches(path_id: &str, body_id: &str, field: &str) -> Result<(), HttpResponse> {
    if path_id == body_id {
        Ok(())
    } else {
        Err(HttpResponse::fault(
            400,
            format!(
                "the id in the path ({path_id}) does not match `{field}` in the body ({body_id})"
            ),
        ))
    }
}

/// Maps a request to a VMM action (or to an error response).
pub fn route(req: &HttpRequest) -> Result<VmmAction, HttpResponse> {
    let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let body = req.body.as_slice();
    Ok(match (req.method.as_str(), segments.as_slice()) {
        ("GET", [""]) => VmmAction::GetInstanceInfo,
        ("GET", ["version"]) => VmmAction::GetVersion,
        ("GET", ["vm", "config"]) => VmmAction::GetFullConfig,
        ("GET", ["machine-config"]) => VmmAction::GetMachineConfig,
        ("PUT", ["machine-config"]) => VmmAction::PutMachineConfig(parse::<MachineConfig>("machine-config", body)?),
        ("PATCH", ["machine-config"]) => VmmAction::PatchMachineConfig(parse::<Value>("machine-config", body)?),
        ("PUT", ["boot-source"]) => VmmAction::PutBootSource(parse::<BootSource>("boot-source", body)?),
        ("PUT", ["drives", id]) => {
            let drive: DriveConfig = parse("drives", body)?;
            id_matches(id, &drive.drive_id, "drive_id")?;
            VmmAction::PutDrive(drive)
        }
        ("PUT", ["network-interfaces", id]) => {
            let iface: NetworkInterfaceConfig = parse("network-interfaces", body)?;
            id_matches(id, &iface.iface_id, "iface_id")?;
            VmmAction::PutNetworkInterface(iface)
        }
        ("PATCH", ["drives", id]) => {
            let patch: crate::devices::virtio::update::DrivePatch = parse("drives", body)?;
            id_matches(id, &patch.drive_id, "drive_id")?;
            VmmAction::PatchDrive(patch)
        }
        ("PATCH", ["network-interfaces", id]) => {
            let patch: crate::devices::virtio::update::NetworkInterfacePatch =
                parse("network-interfaces", body)?;
            id_matches(id, &patch.iface_id, "iface_id")?;
            VmmAction::PatchNetworkInterface(patch)
        }
        ("PUT", ["vsock"]) => VmmAction::PutVsock(parse::<VsockConfig>("vsock", body)?),
        ("PUT", ["logger"]) => VmmAction::PutLogger(parse::<LoggerConfig>("logger", body)?),
        ("PUT", ["metrics"]) => VmmAction::PutMetrics(parse::<MetricsConfig>("metrics", body)?),
        ("PUT", ["actions"]) => match parse::<ActionBody>("actions", body)?.action_type.as_str() {
            "InstanceStart" => VmmAction::InstanceStart,
            "SendCtrlAltDel" => VmmAction::SendCtrlAltDel,
            "FlushMetrics" => VmmAction::FlushMetrics,
            other => {
                return Err(HttpResponse::fault(
                    400,
                    format!("unknown action_type {other:?}: use InstanceStart, SendCtrlAltDel or FlushMetrics"),
                ))
            }
        },
        ("PATCH", ["vm"]) => match parse::<VmStateBody>("vm", body)?.state.as_str() {
            "Paused" => VmmAction::Pause,
            "Resumed" => VmmAction::Resume,
            other => {
                return Err(HttpResponse::fault(400, format!("unknown vm state {other:?}: use Paused or Resumed")))
            }
        },
        (method, _) => {
            return Err(HttpResponse::fault(
                400,
                format!("Invalid request method and/or path: {method} {}", req.path),
            ))
        }
    })
}

/// Turns the VMM's answer into an HTTP response.
fn respond(result: Result<VmmResponse, VmmActionError>) -> HttpResponse {
    match result {
        Ok(VmmResponse::Empty) => HttpResponse {
            status: 204,
            body: None,
        },
        Ok(VmmResponse::Json(body)) => HttpResponse {
            status: 200,
            body: Some(body),
        },
        Err(e) => HttpResponse::fault(400, e),
    }
}

/// Requests taken by the VMM thread whose responses are not written yet, so that the VMM
/// does not exit between answering a request (e.g. InstanceStart of a guest that resets at
/// once) and the client receiving the answer.
#[derive(Clone, Default)]
pub struct InFlight(Arc<(Mutex<usize>, Condvar)>);

impl InFlight {
    fn change(&self, up: bool) {
        let (count, changed) = &*self.0;
        let mut count = count.lock().unwrap_or_else(|p| p.into_inner());
        if up {
            *count += 1;
        } else {
            *count = count.saturating_sub(1);
        }
        changed.notify_all();
    }

    /// Waits until every response taken has been written, up to `timeout`.
    pub fn wait_idle(&self, timeout: std::time::Duration) {
        let (count, changed) = &*self.0;
        let count = count.lock().unwrap_or_else(|p| p.into_inner());
        let _ = changed.wait_timeout_while(count, timeout, |n| *n > 0);
    }
}

/// The API thread's handle on the VMM thread.
#[derive(Clone)]
struct VmmClient {
    requests: Sender<ApiRequest>,
    evt: Arc<EventFd>,
    in_flight: InFlight,
}

impl VmmClient {
    /// Hands `action` to the VMM thread; counted in flight until the caller has written the
    /// response.
    fn call(&self, action: VmmAction) -> HttpResponse {
        self.in_flight.change(true);
        let (reply, answer) = channel();
        if self.requests.send((action, reply)).is_err() || self.evt.write(1).is_err() {
            return HttpResponse::fault(503, "the VMM is shutting down");
        }
        match answer.recv() {
            Ok(result) => respond(result),
            Err(_) => HttpResponse::fault(503, "the VMM is shutting down"),
        }
    }
}

fn serve_connection(stream: UnixStream, vmm: VmmClient) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(stream);
    loop {
        let (response, close, called) = match read_request(&mut reader) {
            Ok(None) => return,
            Ok(Some(req)) => match route(&req) {
                Ok(action) => (vmm.call(action), req.close, true),
                Err(response) => (response, req.close, false),
            },
            // After a malformed request the stream position is unknown: close.
            Err(response) => (response, true, false),
        };
        let written = response.write_to(&mut writer, close);
        if called {
            vmm.in_flight.change(false);
        }
        if written.is_err() || close {
            return;
        }
    }
}

/// Binds `path`, replacing a stale socket file nobody listens on.
pub fn bind(path: &Path) -> Result<UnixListener, ApiServerError> {
    let shown = path.display().to_string();
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(ApiServerError::InUse(shown));
        }
        std::fs::remove_file(path).map_err(|e| ApiServerError::Bind(shown.clone(), e))?;
    }
    UnixListener::bind(path).map_err(|e| ApiServerError::Bind(shown, e))
}

/// Starts the API server thread on `listener`, confined by the `api` seccomp filter; returns the
/// VMM side of its channel.
pub fn start(listener: UnixListener, seccomp: Filters) -> std::io::Result<ApiChannel> {
    let (requests_tx, requests) = channel();
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    let in_flight = InFlight::default();
    let client = VmmClient {
        requests: requests_tx,
        evt: Arc::new(evt.try_clone()?),
        in_flight: in_flight.clone(),
    };
    std::thread::Builder::new()
        .name("fc_api".into())
        .spawn(move || {
            if let Err(e) = seccomp.apply("api") {
                log::error!("API server not started: {e}");
                return;
            }
            for stream in listener.incoming().flatten() {
                let client = client.clone();
                // One thread per connection so an idle client cannot block others.
                let spawned = std::thread::Builder::new()
                    .name("fc_api_conn".into())
                    .spawn(move || serve_connection(stream, client));
                if let Err(e) = spawned {
                    log::error!("API connection dropped: {e}");
                }
            }
        })?;
    Ok(ApiChannel {
        requests,
        evt,
        in_flight,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn req(raw: &str) -> Result<Option<HttpRequest>, HttpResponse> {
        read_request(&mut BufReader::new(Cursor::new(raw.as_bytes().to_vec())))
    }

    #[test]
    fn parses_requests_and_routes_them() {
        let r = req("PUT /machine-config HTTP/1.1\r\nContent-Length: 37\r\n\r\n{\"vcpu_count\": 2, \"mem_size_mib\": 64}")
            .unwrap()
            .unwrap();
        assert!(matches!(route(&r), Ok(VmmAction::PutMachineConfig(m)) if m.vcpu_count == 2));
        let r = req("PUT /actions HTTP/1.1\r\nContent-Length: 33\r\n\r\n{\"action_type\": \"InstanceStart\"}\n").unwrap().unwrap();
        assert!(matches!(route(&r), Ok(VmmAction::InstanceStart)));
        let r = req("GET /?x=1 HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert!(matches!(route(&r), Ok(VmmAction::GetInstanceInfo)));
        assert!(req("").unwrap().is_none());
    }

    #[test]
    fn bad_requests_get_400s_naming_the_problem() {
        let fault = |raw: &str| match req(raw) {
            Err(r) => r,
            Ok(Some(r)) => route(&r).unwrap_err(),
            Ok(None) => panic!("no request"),
        };
        let msg = |r: HttpResponse| {
            r.body.unwrap()["fault_message"]
                .as_str()
                .unwrap()
                .to_string()
        };
        assert!(
            msg(fault("GET /nope HTTP/1.1\r\n\r\n")).contains("Invalid request method and/or path")
        );
        assert!(msg(fault(
            "PUT /machine-config HTTP/1.1\r\nContent-Length: 5\r\n\r\n{bad}"
        ))
        .contains("invalid configuration JSON"));
        assert!(msg(fault("PUT /drives/a HTTP/1.1\r\nContent-Length: 44\r\n\r\n{\"drive_id\":\"b\",\"is_root_device\":false}     ")).contains("does not match"));
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
        assert!(msg(fault(
            "PUT /actions HTTP/1.1\r\nContent-Length: 24\r\n\r\n{\"action_type\": \"Boom\"}\n"
        ))
        .contains("unknown action_type"));
        assert_eq!(fault("garbage\r\n\r\n").status, 400);
        assert!(
            msg(fault("PUT /vsock HTTP/1.1\r\nContent-Length: 10\r\n\r\n{}")).contains("shorter")
        );
    }
}
