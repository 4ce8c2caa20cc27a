//! Exec: buffered JSON, streamed NDJSON, or an interactive websocket with stdin.

use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;

use super::{ApiJson, ApiPath, AppState, Auth};
use crate::error::{Error, ErrorBody, Result};
use crate::model::{ExecEvent, ExecRequest, ExecResult, WsControl};

/// First byte of a websocket binary frame from the server: which stream the rest is.
pub const WS_STDOUT: u8 = 1;
/// See [`WS_STDOUT`].
pub const WS_STDERR: u8 = 2;

fn line(event: &ExecEvent) -> Bytes {
    let mut v = serde_json::to_vec(event).expect("events serialize");
    v.push(b'\n');
    Bytes::from(v)
}

/// A piece of exec output.
enum Chunk {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// Forwards stdout and stderr chunks into `emit` until both end; `Err` when a stream failed.
/// Stops early (with `Ok`) when `emit` returns false.
async fn pump(
    mut stdout: Option<agent::OutputStream>,
    mut stderr: Option<agent::OutputStream>,
    mut emit: impl FnMut(Chunk) -> bool,
) -> Result<()> {
    while stdout.is_some() || stderr.is_some() {
        let chunk = tokio::select! {
            c = async { stdout.as_mut().expect("checked").recv().await }, if stdout.is_some() => match c? {
                Some(c) => Chunk::Stdout(c),
                None => { stdout = None; continue }
            },
            c = async { stderr.as_mut().expect("checked").recv().await }, if stderr.is_some() => match c? {
                Some(c) => Chunk::Stderr(c),
                None => { stderr = None; continue }
            },
        };
        if !emit(chunk) {
            break;
        }
    }
    Ok(())
}

/// Pumps a whole session into NDJSON events: output chunks, then `exit` or `error`.
async fn pump_ndjson(mut session: agent::ExecSession, emit: mpsc::UnboundedSender<Bytes>) {
    let b64 = |c: &[u8]| base64::engine::general_purpose::STANDARD.encode(c);
    let streams = pump(session.stdout.take(), session.stderr.take(), |c| {
        let event = match c {
            Chunk::Stdout(c) => ExecEvent::Stdout { data: b64(&c) },
            Chunk::Stderr(c) => ExecEvent::Stderr { data: b64(&c) },
        };
        emit.send(line(&event)).is_ok()
    })
    .await;
    let end = match streams {
        Ok(()) => match session.wait().await {
            Ok(status) => ExecEvent::Exit(status.into()),
            Err(e) => ExecEvent::Error(Error::from(e).body()),
        },
        Err(e) => ExecEvent::Error(e.body()),
    };
    let _ = emit.send(line(&end));
}

/// Run a command. With `"stream": true` the answer is `application/x-ndjson`, one
/// [`ExecEvent`] per line (output base64); otherwise one [`ExecResult`].
#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "exec", params(("id" = String, Path)),
    request_body = ExecRequest,
    responses((status = 200, body = ExecResult, description = "buffered result, or NDJSON ExecEvents with stream: true"),
        (status = 404, body = ErrorBody), (status = 409, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn exec(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<Response> {
    if req.tty {
        return Err(Error::Invalid(
            "tty needs the interactive websocket: GET /v1/sandboxes/{id}/exec/ws".into(),
        ));
    }
    if !req.stream {
        return Ok(Json(state.manager.exec(&tenant.name, &id, &req).await?).into_response());
    }
    let mut session = state.manager.start_exec(&tenant.name, &id, &req).await?;
    if let Some(mut stdin) = session.stdin.take() {
        if let Some(data) = &req.stdin {
            stdin.write(data.as_bytes()).await?;
        }
        stdin.close()?;
    }
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    tokio::spawn(pump_ndjson(session, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// The JSON answer to a request for `exec/ws` that is no websocket handshake: 426 with
/// `Upgrade: websocket` when it does not ask for the upgrade, else the status of what is
/// wrong in the handshake (400 for a bad version or a missing key).
fn not_a_handshake(id: &str, rejection: WebSocketUpgradeRejection) -> Response {
    let status = match rejection {
        WebSocketUpgradeRejection::InvalidConnectionHeader(_)
        | WebSocketUpgradeRejection::InvalidUpgradeHeader(_)
        | WebSocketUpgradeRejection::InvalidProtocolPseudoheader(_) => StatusCode::UPGRADE_REQUIRED,
        ref other => other.status(),
    };
    let code = match status {
        StatusCode::UPGRADE_REQUIRED => "upgrade_required",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        _ => "bad_request",
    };
    let body = ErrorBody {
        code: code.into(),
        message: format!(
            "{}: /v1/sandboxes/{id}/exec/ws is a websocket; open it with GET and the headers \
             `Connection: Upgrade`, `Upgrade: websocket`, `Sec-WebSocket-Version: 13` and \
             `Sec-WebSocket-Key` (RFC 6455), or run a command without stdin with \
             POST /v1/sandboxes/{id}/exec",
            rejection.body_text()
        ),
    };
    let mut resp = (status, Json(body)).into_response();
    if status == StatusCode::UPGRADE_REQUIRED {
        resp.headers_mut()
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    resp
}

/// Interactive exec over a websocket. The client's first (text) message is an
/// [`ExecRequest`]; then binary frames are stdin and text frames [`WsControl`]s. The server sends
/// binary frames whose first byte is 1 (stdout) or 2 (stderr), and a last text frame with an
/// [`ExecEvent`] (`exit` or `error`). The sandbox is looked up before the handshake: another
/// tenant's is 404 however the request looks.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/exec/ws", tag = "exec", params(("id" = String, Path)),
    responses((status = 101, description = "switching to the websocket protocol"),
        (status = 400, body = ErrorBody, description = "a malformed websocket handshake"),
        (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
        (status = 426, body = ErrorBody, description = "not a websocket handshake")))]
pub async fn exec_ws(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
    ws: std::result::Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response> {
    // Fail before the upgrade when the sandbox is not there.
    state.manager.get(&tenant.name, &id)?;
    let ws = match ws {
        Ok(ws) => ws,
        Err(rejection) => return Ok(not_a_handshake(&id, rejection)),
    };
    Ok(ws.on_upgrade(move |socket| async move {
        if let Err(e) = serve_ws(state, tenant.name, id, socket).await {
            tracing::debug!("exec websocket: {e}");
        }
    }))
}

async fn serve_ws(state: AppState, tenant: String, id: String, socket: WebSocket) -> Result<()> {
    let (mut sink, mut stream) = socket.split();
    let fail = |e: Error| {
        Message::Text(
            serde_json::to_string(&ExecEvent::Error(e.body()))
                .expect("serializes")
                .into(),
        )
    };
    let req: ExecRequest = loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => match serde_json::from_str(&t) {
                Ok(r) => break r,
                Err(e) => {
                    let _ = sink
                        .send(fail(Error::Invalid(format!(
                            "first message must be an ExecRequest: {e}"
                        ))))
                        .await;
                    return Ok(());
                }
            },
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return Ok(()),
        }
    };
    let mut session = match state.manager.start_exec(&tenant, &id, &req).await {
        Ok(s) => s,
        Err(e) => {
            let _ = sink.send(fail(e)).await;
            return Ok(());
        }
    };
    let mut stdin = session.stdin.take();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Message>();
    let (stdout, stderr) = (session.stdout.take(), session.stderr.take());
    let pump_task = tokio::spawn(async move {
        pump(stdout, stderr, |c| {
            let (kind, data) = match c {
                Chunk::Stdout(d) => (WS_STDOUT, d),
                Chunk::Stderr(d) => (WS_STDERR, d),
            };
            let mut v = Vec::with_capacity(data.len() + 1);
            v.push(kind);
            v.extend_from_slice(&data);
            out_tx.send(Message::Binary(v.into())).is_ok()
        })
        .await
    });
    // Output until both streams end; meanwhile stdin and controls from the client.
    let mut client_open = true;
    loop {
        tokio::select! {
            out = out_rx.recv() => match out {
                Some(msg) => {
                    if client_open && sink.send(msg).await.is_err() {
                        client_open = false;
                    }
                }
                None => break,
            },
            msg = stream.next(), if client_open => match msg {
                Some(Ok(Message::Binary(data))) => {
                    if let Some(s) = stdin.as_mut() {
                        if s.write(&data).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                Some(Ok(Message::Text(t))) => {
                    let result = match serde_json::from_str::<WsControl>(&t) {
                        Ok(WsControl::Eof) => stdin.take().map_or(Ok(()), |s| s.close()).map_err(Error::from),
                        Ok(WsControl::Signal { signal }) => session.signal(signal).await.map_err(Error::from),
                        Ok(WsControl::Resize { rows, cols }) => session.resize(rows, cols).await.map_err(Error::from),
                        Err(e) => Err(Error::Invalid(format!("bad control message: {e}"))),
                    };
                    if let Err(e) = result {
                        let _ = sink.send(fail(e)).await;
                    }
                }
                Some(Ok(_)) => {}
                // The client went away: the process loses stdin and is killed.
                Some(Err(_)) | None => {
                    client_open = false;
                    stdin = None;
                    let _ = session.signal(libc::SIGKILL).await;
                }
            },
        }
    }
    drop(stdin);
    let end = match pump_task.await {
        Ok(Ok(())) => match session.wait().await {
            Ok(status) => ExecEvent::Exit(status.into()),
            Err(e) => ExecEvent::Error(Error::from(e).body()),
        },
        Ok(Err(e)) => ExecEvent::Error(e.body()),
        Err(e) => ExecEvent::Error(Error::host("exec output task", e).body()),
    };
    if client_open {
        let _ = sink
            .send(Message::Text(
                serde_json::to_string(&end).expect("serializes").into(),
            ))
            .await;
        let _ = sink.close().await;
    }
    Ok(())
}
