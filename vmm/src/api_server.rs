//! Firecracker's HTTP API on a unix socket: a small HTTP/1.1 server ([`http`]) whose requests
//! [`router`] turns into [`VmmAction`]s, handed to the VMM thread
//! over the [`channel`].

pub mod channel;
pub mod http;
pub mod router;

use std::io::BufReader;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};

use self::channel::{ApiChannel, VmmClient};
use self::http::{read_request, HttpResponse};
use self::router::{respond, route};
use crate::controller::VmmAction;
use crate::seccomp::Filters;

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

/// The VMM thread's answer to `action`, as an HTTP response.
fn answer(vmm: &VmmClient, action: VmmAction) -> HttpResponse {
    match vmm.call(action) {
        Some(result) => respond(result),
        None => HttpResponse::fault(503, "the VMM is shutting down"),
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
                Ok(action) => (answer(&vmm, action), req.close, true),
                Err(response) => (response, req.close, false),
            },
            // After a malformed request the stream position is unknown: close.
            Err(response) => (response, true, false),
        };
        let written = response.write_to(&mut writer, close);
        if called {
            vmm.response_written();
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

/// The API server thread, waiting for its socket: it is started before the socket is bound so
/// that its start (thread creation, seccomp filter) overlaps the rest of the VMM's set-up.
pub struct ApiServer {
    listener: SyncSender<UnixListener>,
}

impl ApiServer {
    /// Serves the API on `listener`.
    pub fn listen(self, listener: UnixListener) {
        // Fails only when the thread has ended because its filter could not be installed,
        // which it logged.
        let _ = self.listener.send(listener);
    }
}

/// Starts the API server thread, confined by the `api` seccomp filter; it serves once given its
/// socket ([`ApiServer::listen`]) and ends if the server is dropped instead. Returns the server
/// and the VMM side of its channel.
pub fn start(seccomp: Filters) -> std::io::Result<(ApiServer, ApiChannel)> {
    let (client, api) = channel::open()?;
    let (listener_tx, listener_rx) = sync_channel::<UnixListener>(1);
    std::thread::Builder::new()
        .name("fc_api".into())
        .spawn(move || {
            if let Err(e) = seccomp.apply("api") {
                log::error!("API server not started: {e}");
                return;
            }
            let Ok(listener) = listener_rx.recv() else {
                return;
            };
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
    Ok((
        ApiServer {
            listener: listener_tx,
        },
        api,
    ))
}
