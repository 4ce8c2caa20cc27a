//! REST client of `mvmd`, used by the `mvm` CLI (and the tests).

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use serde::de::DeserializeOwned;
use serde::Serialize;

use mvm_sandbox::error::ErrorBody;
use mvm_sandbox::http::{send, send_collect, Endpoint, HttpError};
use mvm_sandbox::model::*;

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// mvmd could not be reached or the exchange broke.
    #[error(transparent)]
    Http(#[from] HttpError),
    /// mvmd answered with an error.
    #[error("mvmd: {} ({status} {})", body.message, body.code)]
    Api {
        /// HTTP status.
        status: u16,
        /// The `{code, message}` body.
        body: ErrorBody,
    },
    /// mvmd answered something this client does not understand.
    #[error("unexpected answer from mvmd: {0}")]
    Decode(String),
}

/// A client of one mvmd.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    token: Option<String>,
}

fn decode_error(status: u16, body: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(body) => ClientError::Api { status, body },
        Err(_) => ClientError::Api {
            status,
            body: ErrorBody {
                code: "http_error".into(),
                message: String::from_utf8_lossy(body).trim().to_owned(),
            },
        },
    }
}

impl Client {
    /// A client of the mvmd at `endpoint`, authenticating with `token`.
    pub fn new(endpoint: Endpoint, token: Option<String>) -> Self {
        Client { endpoint, token }
    }

    /// The endpoint.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Request<Full<Bytes>> {
        let mut b = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "mvmd")
            .header("content-type", content_type);
        if let Some(t) = &self.token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        b.body(Full::new(Bytes::from(body)))
            .expect("request parts are valid")
    }

    /// Sends a request and returns the raw successful body.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Bytes, ClientError> {
        let (status, answer) = send_collect(
            &self.endpoint,
            self.request(method, path, content_type, body),
        )
        .await?;
        if !(200..300).contains(&status) {
            return Err(decode_error(status, &answer));
        }
        Ok(answer)
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body
            .map(|b| serde_json::to_vec(b).expect("request types serialize"))
            .unwrap_or_default();
        let answer = self.raw(method, path, "application/json", body).await?;
        serde_json::from_slice(&answer)
            .map_err(|e| ClientError::Decode(format!("{e}: {}", String::from_utf8_lossy(&answer))))
    }

    /// `POST /v1/sandboxes`.
    pub async fn create(&self, req: &CreateSandbox) -> Result<Sandbox, ClientError> {
        self.json("POST", "/v1/sandboxes", Some(req)).await
    }

    /// `GET /v1/sandboxes`.
    pub async fn list(&self) -> Result<Vec<Sandbox>, ClientError> {
        Ok(self
            .json::<SandboxList>("GET", "/v1/sandboxes", None::<&()>)
            .await?
            .sandboxes)
    }

    /// `GET /v1/sandboxes/{id}`.
    pub async fn get(&self, id: &str) -> Result<Sandbox, ClientError> {
        self.json("GET", &format!("/v1/sandboxes/{id}"), None::<&()>)
            .await
    }

    /// `DELETE /v1/sandboxes/{id}`.
    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        self.raw(
            "DELETE",
            &format!("/v1/sandboxes/{id}"),
            "application/json",
            Vec::new(),
        )
        .await
        .map(drop)
    }

    /// `POST /v1/sandboxes/{id}/exec`, buffered.
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult, ClientError> {
        let req = ExecRequest {
            stream: false,
            ..req.clone()
        };
        self.json("POST", &format!("/v1/sandboxes/{id}/exec"), Some(&req))
            .await
    }

    /// `POST /v1/sandboxes/{id}/exec` streamed: calls `on_event` for every NDJSON event and
    /// returns the last one (`exit` or `error`).
    pub async fn exec_stream(
        &self,
        id: &str,
        req: &ExecRequest,
        mut on_event: impl FnMut(&ExecEvent),
    ) -> Result<ExecEvent, ClientError> {
        let req = ExecRequest {
            stream: true,
            ..req.clone()
        };
        let body = serde_json::to_vec(&req).expect("request types serialize");
        let resp = send(
            &self.endpoint,
            self.request(
                "POST",
                &format!("/v1/sandboxes/{id}/exec"),
                "application/json",
                body,
            ),
        )
        .await?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut buf = Vec::new();
        let mut last = None;
        let exchange = |source| {
            ClientError::Http(HttpError::Exchange {
                endpoint: self.endpoint.to_string(),
                source,
            })
        };
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.map_err(exchange)?.into_data() {
                buf.extend_from_slice(&data);
            }
            if !(200..300).contains(&status) {
                continue;
            }
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                let event: ExecEvent = serde_json::from_slice(&line).map_err(|e| {
                    ClientError::Decode(format!("{e}: {}", String::from_utf8_lossy(&line)))
                })?;
                on_event(&event);
                last = Some(event);
            }
        }
        if !(200..300).contains(&status) {
            return Err(decode_error(status, &buf));
        }
        match last {
            Some(e @ (ExecEvent::Exit(_) | ExecEvent::Error(_))) => Ok(e),
            _ => Err(ClientError::Decode(
                "the exec stream ended without an exit event".into(),
            )),
        }
    }

    /// `PUT /v1/sandboxes/{id}/files?path=`.
    pub async fn put_file(
        &self,
        id: &str,
        path: &str,
        mode: u32,
        data: Vec<u8>,
    ) -> Result<FileWritten, ClientError> {
        let answer = self
            .raw(
                "PUT",
                &format!(
                    "/v1/sandboxes/{id}/files?path={}&mode={mode:o}",
                    encode(path)
                ),
                "application/octet-stream",
                data,
            )
            .await?;
        serde_json::from_slice(&answer).map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `GET /v1/sandboxes/{id}/files?path=`.
    pub async fn get_file(&self, id: &str, path: &str) -> Result<Bytes, ClientError> {
        self.raw(
            "GET",
            &format!("/v1/sandboxes/{id}/files?path={}", encode(path)),
            "application/json",
            Vec::new(),
        )
        .await
    }

    /// `METHOD /v1/sandboxes/{id}/ports/{port}{path}` (`path` with its leading `/` and
    /// query): a request to port `port` of sandbox `id`, through mvmd's port proxy. Returns
    /// the answer's status and body whatever the status: the sandbox server's, or mvmd's
    /// JSON error (404, 409, 422, 502).
    pub async fn port_request(
        &self,
        id: &str,
        port: u16,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> Result<(u16, Bytes), ClientError> {
        let request = self.request(
            method,
            &format!("/v1/sandboxes/{id}/ports/{port}{path}"),
            "application/octet-stream",
            body,
        );
        Ok(send_collect(&self.endpoint, request).await?)
    }

    /// `POST /v1/sandboxes/{id}/pause` or `/resume`.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<Sandbox, ClientError> {
        let verb = if paused { "pause" } else { "resume" };
        self.json("POST", &format!("/v1/sandboxes/{id}/{verb}"), None::<&()>)
            .await
    }

    /// `POST /v1/sandboxes/{id}/pause` with `{"save": true}`: the sandbox saved to disk.
    pub async fn save(&self, id: &str) -> Result<Sandbox, ClientError> {
        let body = PauseRequest { save: true };
        self.json("POST", &format!("/v1/sandboxes/{id}/pause"), Some(&body))
            .await
    }

    /// `POST /v1/sandboxes/{id}/fork`: the children.
    pub async fn fork(&self, id: &str, count: u32) -> Result<Vec<Sandbox>, ClientError> {
        Ok(self
            .json::<ForkAnswer>(
                "POST",
                &format!("/v1/sandboxes/{id}/fork"),
                Some(&ForkRequest { count: Some(count) }),
            )
            .await?
            .sandboxes)
    }

    /// `POST /v1/sandboxes/{id}/snapshots`: the snapshot taken.
    pub async fn snapshot(&self, id: &str, req: &CreateSnapshot) -> Result<Snapshot, ClientError> {
        self.json("POST", &format!("/v1/sandboxes/{id}/snapshots"), Some(req))
            .await
    }

    /// `GET /v1/snapshots`.
    pub async fn snapshots(&self) -> Result<Vec<Snapshot>, ClientError> {
        self.json("GET", "/v1/snapshots", None::<&()>).await
    }

    /// `DELETE /v1/snapshots/{key}` (an id or a name): the snapshot deleted.
    pub async fn delete_snapshot(&self, key: &str) -> Result<Snapshot, ClientError> {
        self.json("DELETE", &format!("/v1/snapshots/{key}"), None::<&()>)
            .await
    }

    /// `POST /v1/sandboxes/{id}/keepalive`.
    pub async fn keepalive(
        &self,
        id: &str,
        timeout_s: Option<u64>,
    ) -> Result<Sandbox, ClientError> {
        self.json(
            "POST",
            &format!("/v1/sandboxes/{id}/keepalive"),
            Some(&Keepalive { timeout_s }),
        )
        .await
    }

    /// `PATCH /v1/sandboxes/{id}/network`: replaces the allow list of a sandbox with egress
    /// `allow`.
    pub async fn update_network(
        &self,
        id: &str,
        allow: Vec<String>,
    ) -> Result<Sandbox, ClientError> {
        self.json(
            "PATCH",
            &format!("/v1/sandboxes/{id}/network"),
            Some(&NetworkUpdate { allow }),
        )
        .await
    }

    /// `GET /v1/sandboxes/{id}/logs`.
    pub async fn logs(&self, id: &str) -> Result<Bytes, ClientError> {
        self.raw(
            "GET",
            &format!("/v1/sandboxes/{id}/logs"),
            "application/json",
            Vec::new(),
        )
        .await
    }

    /// `GET /v1/sandboxes/{id}/stats`.
    pub async fn stats(&self, id: &str) -> Result<SandboxUsage, ClientError> {
        self.json("GET", &format!("/v1/sandboxes/{id}/stats"), None::<&()>)
            .await
    }

    /// `GET /v1/templates`.
    pub async fn templates(&self) -> Result<Vec<Template>, ClientError> {
        Ok(self
            .json::<TemplateList>("GET", "/v1/templates", None::<&()>)
            .await?
            .templates)
    }

    /// `POST /v1/templates`.
    pub async fn add_template(&self, t: &Template) -> Result<Template, ClientError> {
        self.json("POST", "/v1/templates", Some(t)).await
    }

    /// `GET /v1/images`.
    pub async fn images(&self) -> Result<Vec<Image>, ClientError> {
        Ok(self
            .json::<ImageList>("GET", "/v1/images", None::<&()>)
            .await?
            .images)
    }

    /// `POST /v1/images`: pulls an image into mvmd's cache.
    pub async fn pull_image(&self, req: &PullImage) -> Result<Image, ClientError> {
        self.json("POST", "/v1/images", Some(req)).await
    }

    /// `DELETE /v1/images/{name}`: removes an image (or untags a reference) from mvmd's cache.
    pub async fn remove_image(&self, name: &str) -> Result<RemovedImage, ClientError> {
        self.json(
            "DELETE",
            &format!("/v1/images/{}", encode(name)),
            None::<&()>,
        )
        .await
    }

    /// `POST /v1/images/prune`: removes every cached image no sandbox uses (admin).
    pub async fn prune_images(&self) -> Result<PrunedImages, ClientError> {
        self.json("POST", "/v1/images/prune", None::<&()>).await
    }

    /// `POST /v1/images/load`: loads a `docker save` or OCI archive into mvmd's cache.
    pub async fn load_images(&self, archive: Vec<u8>) -> Result<Vec<Image>, ClientError> {
        let answer = self
            .raw("POST", "/v1/images/load", "application/x-tar", archive)
            .await?;
        serde_json::from_slice::<ImageList>(&answer)
            .map(|l| l.images)
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// `POST /v1/templates/{name}/warm`, at the size `req` asks.
    pub async fn warm_template(
        &self,
        name: &str,
        req: &WarmRequest,
    ) -> Result<Template, ClientError> {
        self.json(
            "POST",
            &format!("/v1/templates/{}/warm", encode(name)),
            Some(req),
        )
        .await
    }

    /// `GET /healthz`.
    pub async fn health(&self) -> Result<Health, ClientError> {
        self.json("GET", "/healthz", None::<&()>).await
    }
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn query_encoding() {
        assert_eq!(super::encode("/tmp/a b&c"), "/tmp/a%20b%26c");
    }
}

/// Output of an interactive exec, as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Standard output.
    Stdout,
    /// Standard error.
    Stderr,
}

impl Client {
    /// Interactive exec over the websocket `GET /v1/sandboxes/{id}/exec/ws`: copies `stdin`
    /// to the process (closing it at EOF), hands output to `on_output` and returns how the
    /// process ended.
    pub async fn exec_interactive<R>(
        &self,
        id: &str,
        req: &ExecRequest,
        stdin: R,
        on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExitInfo, ClientError>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        let (_, no_controls) = tokio::sync::mpsc::unbounded_channel();
        self.exec_interactive_with_controls(id, req, stdin, no_controls, on_output)
            .await
    }

    /// [`Client::exec_interactive`] that also sends the [`WsControl`]s (resize, signal)
    /// received on `controls`; those queued before the call go before any stdin.
    pub async fn exec_interactive_with_controls<R>(
        &self,
        id: &str,
        req: &ExecRequest,
        mut stdin: R,
        mut controls: tokio::sync::mpsc::UnboundedReceiver<WsControl>,
        mut on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExitInfo, ClientError>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        use futures_util::{SinkExt, StreamExt};
        use tokio::io::AsyncReadExt;
        use tokio_tungstenite::tungstenite::Message;

        let uri = format!("ws://mvmd/v1/sandboxes/{id}/exec/ws");
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                uri.as_str(),
            )
            .map_err(|e| ClientError::Decode(e.to_string()))?;
        if let Some(t) = &self.token {
            request.headers_mut().insert(
                "authorization",
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| ClientError::Decode("token is not a valid header".into()))?,
            );
        }
        let ws_err = |e: tokio_tungstenite::tungstenite::Error| match e {
            tokio_tungstenite::tungstenite::Error::Http(resp) => {
                let status = resp.status().as_u16();
                decode_error(status, resp.body().as_deref().unwrap_or_default())
            }
            other => ClientError::Decode(format!("websocket: {other}")),
        };
        let connect_err = |source| {
            ClientError::Http(HttpError::Connect {
                endpoint: self.endpoint.to_string(),
                source,
            })
        };
        let ws = match &self.endpoint {
            Endpoint::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p)
                    .await
                    .map_err(connect_err)?;
                let (ws, _) = tokio_tungstenite::client_async(request, EitherStream::Unix(s))
                    .await
                    .map_err(ws_err)?;
                ws
            }
            Endpoint::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a)
                    .await
                    .map_err(connect_err)?;
                let (ws, _) = tokio_tungstenite::client_async(request, EitherStream::Tcp(s))
                    .await
                    .map_err(ws_err)?;
                ws
            }
        };
        let (mut sink, mut source) = ws.split();
        sink.send(Message::Text(
            serde_json::to_string(req).expect("serializes").into(),
        ))
        .await
        .map_err(ws_err)?;
        let control =
            |c: &WsControl| Message::Text(serde_json::to_string(c).expect("serializes").into());
        let mut buf = vec![0u8; 32 * 1024];
        let (mut stdin_open, mut controls_open, mut sending) = (true, true, true);
        let mut failed = None;
        loop {
            // Queued controls first: the terminal's size goes before any stdin.
            let outgoing = match controls.try_recv() {
                Ok(c) if sending => Some(control(&c)),
                _ => tokio::select! {
                    c = controls.recv(), if sending && controls_open => match c {
                        Some(c) => Some(control(&c)),
                        None => {
                            controls_open = false;
                            None
                        }
                    },
                    n = stdin.read(&mut buf), if sending && stdin_open => match n {
                        Ok(0) | Err(_) => {
                            stdin_open = false;
                            Some(control(&WsControl::Eof))
                        }
                        Ok(n) => Some(Message::Binary(buf[..n].to_vec().into())),
                    },
                    msg = source.next() => match msg {
                        Some(Ok(Message::Binary(data))) => match data.split_first() {
                            Some((1, rest)) => { on_output(Stream::Stdout, rest); None }
                            Some((2, rest)) => { on_output(Stream::Stderr, rest); None }
                            _ => return Err(ClientError::Decode("websocket frame without a stream byte".into())),
                        },
                        Some(Ok(Message::Text(t))) => match serde_json::from_str::<ExecEvent>(&t) {
                            Ok(ExecEvent::Exit(exit)) => return Ok(exit),
                            // The exec failed, or only a control did (e.g. a resize that raced
                            // the process's exit) and the exit follows: send nothing more, see.
                            Ok(ExecEvent::Error(body)) => {
                                sending = false;
                                failed = Some(ClientError::Api { status: 200, body });
                                None
                            }
                            Ok(other) => return Err(ClientError::Decode(format!("unexpected event {other:?}"))),
                            Err(e) => return Err(ClientError::Decode(format!("{e}: {t}"))),
                        },
                        Some(Ok(_)) => None,
                        Some(Err(e)) => return Err(failed.unwrap_or_else(|| ws_err(e))),
                        None => return Err(failed.unwrap_or_else(|| ClientError::Decode("the websocket closed before the exit event".into()))),
                    },
                },
            };
            if let Some(msg) = outgoing {
                if let Err(e) = sink.send(msg).await {
                    // mvmd may have finished and closed already: its exit may still be unread.
                    sending = false;
                    failed.get_or_insert(ws_err(e));
                }
            }
        }
    }
}

/// A unix or TCP stream, for the websocket client.
enum EitherStream {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl tokio::io::AsyncRead for EitherStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            EitherStream::Unix(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            EitherStream::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for EitherStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            EitherStream::Unix(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            EitherStream::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            EitherStream::Unix(s) => std::pin::Pin::new(s).poll_flush(cx),
            EitherStream::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            EitherStream::Unix(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            EitherStream::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl Client {
    /// Streamed exec (NDJSON) with output decoded and handed to `on_output`; returns how the
    /// process ended.
    pub async fn exec_streamed(
        &self,
        id: &str,
        req: &ExecRequest,
        mut on_output: impl FnMut(Stream, &[u8]),
    ) -> Result<ExitInfo, ClientError> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut bad = None;
        let last = self
            .exec_stream(id, req, |e| match e {
                ExecEvent::Stdout { data } | ExecEvent::Stderr { data } => match b64.decode(data) {
                    Ok(bytes) => on_output(
                        if matches!(e, ExecEvent::Stdout { .. }) {
                            Stream::Stdout
                        } else {
                            Stream::Stderr
                        },
                        &bytes,
                    ),
                    Err(err) => bad = Some(err.to_string()),
                },
                _ => {}
            })
            .await?;
        if let Some(err) = bad {
            return Err(ClientError::Decode(format!(
                "bad base64 in the exec stream: {err}"
            )));
        }
        match last {
            ExecEvent::Exit(exit) => Ok(exit),
            ExecEvent::Error(body) => Err(ClientError::Api { status: 200, body }),
            other => Err(ClientError::Decode(format!(
                "unexpected last event {other:?}"
            ))),
        }
    }
}
