//! Exec: buffered JSON, streamed NDJSON, or an interactive websocket with stdin.

use axum::body::{Body, Bytes};
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

use super::{ApiJson, ApiPath, AppState, Auth};
use crate::error::Result;
use mvm_sandbox::bounds::WS_MESSAGE_LIMIT;
use mvm_sandbox::model::{ExecEvent, ExecRequest, ExecResult, ExitInfo, WsControl};
use mvm_sandbox::{Error, ErrorBody};

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
pub(crate) enum Chunk {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
}

/// The output streams of an exec, read one chunk at a time. Taking a chunk returns its
/// credit to the agent, so callers take the next one only once the previous one is on its
/// way to the client: a client that does not read stops the sandbox's output, and mvmd
/// holds at most the agent protocol's window per stream.
pub(crate) struct Output {
    stdout: Option<agent::OutputStream>,
    stderr: Option<agent::OutputStream>,
}

impl Output {
    pub(crate) fn of(session: &mut agent::ExecSession) -> Self {
        Self {
            stdout: session.stdout.take(),
            stderr: session.stderr.take(),
        }
    }

    /// The next chunk of either stream; `Ok(None)` once both ended. Cancel-safe.
    pub(crate) async fn next(&mut self) -> Result<Option<Chunk>> {
        loop {
            let chunk = tokio::select! {
                c = async { self.stdout.as_mut().expect("checked").recv().await }, if self.stdout.is_some() => match c? {
                    Some(c) => Chunk::Stdout(c),
                    None => { self.stdout = None; continue }
                },
                c = async { self.stderr.as_mut().expect("checked").recv().await }, if self.stderr.is_some() => match c? {
                    Some(c) => Chunk::Stderr(c),
                    None => { self.stderr = None; continue }
                },
                else => return Ok(None),
            };
            return Ok(Some(chunk));
        }
    }
}

/// Kills an exec whose client went away before it ended (dropped with the response body).
struct KillOnDrop {
    control: Option<agent::ExecControl>,
}

impl KillOnDrop {
    fn ended(&mut self) {
        self.control = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let (Some(control), Ok(rt)) =
            (self.control.take(), tokio::runtime::Handle::try_current())
        {
            // The exec may end meanwhile: NoSuchExec is fine.
            rt.spawn(async move { control.signal(libc::SIGKILL).await });
        }
    }
}

/// A streamed exec as NDJSON events: output chunks, then `exit` or `error`. The body pulls
/// the output when the client takes the previous line (no queue between them); a client that
/// disconnects kills the process.
fn ndjson(mut session: agent::ExecSession) -> Body {
    let output = Output::of(&mut session);
    let guard = KillOnDrop {
        control: Some(session.control()),
    };
    let b64 = |c: &[u8]| base64::engine::general_purpose::STANDARD.encode(c);
    let events =
        futures_util::stream::unfold(Some((session, output, guard)), move |state| async move {
            let (mut session, mut output, mut guard) = state?;
            let event = match output.next().await {
                Ok(Some(Chunk::Stdout(c))) => ExecEvent::Stdout { data: b64(&c) },
                Ok(Some(Chunk::Stderr(c))) => ExecEvent::Stderr { data: b64(&c) },
                Ok(None) => {
                    let end = match session.wait().await {
                        Ok(status) => ExecEvent::Exit(status.into()),
                        Err(e) => ExecEvent::Error(Error::from(e).body()),
                    };
                    guard.ended();
                    return Some((Ok::<_, std::io::Error>(line(&end)), None));
                }
                Err(e) => return Some((Ok(line(&ExecEvent::Error(e.body()))), None)),
            };
            Some((Ok(line(&event)), Some((session, output, guard))))
        });
    Body::from_stream(events)
}

/// Output escaped into JSON per piece of this many bytes.
const JSON_PIECE: usize = 64 * 1024;

/// The pieces of a JSON string's content (no quotes), escaped one at a time when asked for.
struct JsonPieces {
    text: String,
    at: usize,
}

impl Iterator for JsonPieces {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if self.at == self.text.len() {
            return None;
        }
        let mut end = (self.at + JSON_PIECE).min(self.text.len());
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let quoted = serde_json::to_string(&self.text[self.at..end]).expect("strings serialize");
        self.at = end;
        Some(Bytes::copy_from_slice(
            &quoted.as_bytes()[1..quoted.len() - 1],
        ))
    }
}

/// A buffered exec's answer, written as the client reads it: JSON escapes a control byte into
/// six, so an answer made at once could take six times the output it holds.
fn buffered(result: ExecResult) -> Response {
    /// [`ExecResult`] but the output, which follows it.
    #[derive(serde::Serialize)]
    struct Head {
        #[serde(flatten)]
        exit: ExitInfo,
        stdout_truncated: bool,
        stderr_truncated: bool,
    }
    let ExecResult {
        exit,
        stdout,
        stderr,
        stdout_truncated,
        stderr_truncated,
    } = result;
    let mut head = serde_json::to_vec(&Head {
        exit,
        stdout_truncated,
        stderr_truncated,
    })
    .expect("serializes");
    head.pop(); // its closing brace
    head.extend_from_slice(b",\"stdout\":\"");
    let pieces = std::iter::once(Bytes::from(head))
        .chain(JsonPieces {
            text: stdout,
            at: 0,
        })
        .chain(std::iter::once(Bytes::from_static(b"\",\"stderr\":\"")))
        .chain(JsonPieces {
            text: stderr,
            at: 0,
        })
        .chain(std::iter::once(Bytes::from_static(b"\"}")))
        .map(Ok::<_, std::io::Error>);
    (
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(futures_util::stream::iter(pieces)),
    )
        .into_response()
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
        )
        .into());
    }
    if !req.stream {
        return Ok(buffered(state.manager.exec(&tenant.name, &id, &req).await?));
    }
    let mut session = state.manager.start_exec(&tenant.name, &id, &req).await?;
    if let Some(stdin) = session.stdin.take() {
        // Fed while the output streams, so that a process echoing its stdin does not stall.
        let data = req.stdin.unwrap_or_default();
        tokio::spawn(async move { stdin.feed(data.as_bytes()).await });
    }
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        ndjson(session),
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
    let ws = ws
        .max_message_size(WS_MESSAGE_LIMIT)
        .max_frame_size(WS_MESSAGE_LIMIT);
    Ok(ws.on_upgrade(move |socket| serve_ws(state, tenant.name, id, socket)))
}

/// How long the server waits, once it has sent the exit event and its Close frame, for the
/// client's Close before it closes the connection itself.
const WS_CLOSE_GRACE: Duration = Duration::from_secs(10);

/// One websocket exec. Output goes to the client as it takes it (a chunk is taken from the
/// agent only once the previous one is written); stdin and controls are read by a task of
/// their own, so a process blocked on its stdin never blocks its output. The end is the
/// websocket closing handshake: the exit event, the server's Close, then the client's Close
/// (or [`WS_CLOSE_GRACE`]); stdin that arrives meanwhile is discarded.
async fn serve_ws(state: AppState, tenant: String, id: String, socket: WebSocket) {
    let (mut sink, mut stream) = socket.split();
    let req: ExecRequest = loop {
        match stream.next().await {
            Some(Ok(Message::Text(t))) => match serde_json::from_str(&t) {
                Ok(r) => break r,
                Err(e) => {
                    let e = Error::Invalid(format!("first message must be an ExecRequest: {e}"));
                    let _ = sink.send(event(&ExecEvent::Error(e.body()))).await;
                    return close(sink, stream).await;
                }
            },
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            _ => return,
        }
    };
    let mut session = match state.manager.start_exec(&tenant, &id, &req).await {
        Ok(s) => s,
        Err(e) => {
            let _ = sink.send(event(&ExecEvent::Error(e.body()))).await;
            return close(sink, stream).await;
        }
    };
    let mut output = Output::of(&mut session);
    let (notes_tx, mut notes) = mpsc::channel::<Message>(1);
    let (ended_tx, ended) = watch::channel(false);
    let mut input = tokio::spawn(client_input(
        stream,
        session.stdin.take(),
        session.control(),
        notes_tx,
        ended,
    ));
    let mut client_open = true;
    let streams = loop {
        let msg = tokio::select! {
            chunk = output.next() => match chunk {
                Ok(Some(Chunk::Stdout(data))) => tagged(WS_STDOUT, &data),
                Ok(Some(Chunk::Stderr(data))) => tagged(WS_STDERR, &data),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            },
            Some(note) = notes.recv() => note,
        };
        // A client gone: the input task kills the process; its output is drained.
        if client_open && sink.send(msg).await.is_err() {
            client_open = false;
        }
    };
    let end = match streams {
        Ok(()) => match session.wait().await {
            Ok(status) => ExecEvent::Exit(status.into()),
            Err(e) => ExecEvent::Error(Error::from(e).body()),
        },
        Err(e) => ExecEvent::Error(e.body()),
    };
    let _ = ended_tx.send(true);
    drop(notes);
    if client_open {
        let _ = sink.send(event(&end)).await;
        let _ = sink.close().await;
    }
    // The client's Close (or its hang-up) ends the input task.
    if tokio::time::timeout(WS_CLOSE_GRACE, &mut input)
        .await
        .is_err()
    {
        input.abort();
    }
}

/// A text frame carrying `e`.
fn event(e: &ExecEvent) -> Message {
    Message::Text(serde_json::to_string(e).expect("serializes").into())
}

/// A binary frame: the stream byte, then the data.
fn tagged(stream: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(stream);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

/// Ends a websocket on which no exec ran: Close, then the client's Close or the grace period.
async fn close(mut sink: SplitSink<WebSocket, Message>, mut stream: SplitStream<WebSocket>) {
    let _ = sink.close().await;
    let _ = tokio::time::timeout(WS_CLOSE_GRACE, async {
        while let Some(Ok(_)) = stream.next().await {}
    })
    .await;
}

/// Reads the client's frames until it closes: stdin (discarded once the process has closed
/// it or ended) and controls (a failed one is reported through `notes` while the exec runs).
/// A client that goes away before the exec `ended` kills its process.
async fn client_input(
    mut stream: SplitStream<WebSocket>,
    mut stdin: Option<agent::ExecStdin>,
    control: agent::ExecControl,
    notes: mpsc::Sender<Message>,
    ended: watch::Receiver<bool>,
) {
    while let Some(Ok(msg)) = stream.next().await {
        let result = match msg {
            Message::Binary(data) => {
                if let Some(s) = stdin.as_mut() {
                    if s.write(&data).await.is_err() {
                        stdin = None;
                    }
                }
                continue;
            }
            Message::Text(t) => match serde_json::from_str::<WsControl>(&t) {
                Ok(WsControl::Eof) => stdin
                    .take()
                    .map_or(Ok(()), |s| s.close())
                    .map_err(Error::from),
                Ok(WsControl::Signal { signal }) => {
                    control.signal(signal).await.map_err(Error::from)
                }
                Ok(WsControl::Resize { rows, cols }) => {
                    control.resize(rows, cols).await.map_err(Error::from)
                }
                Err(e) => Err(Error::Invalid(format!("bad control message: {e}"))),
            },
            Message::Close(_) => break,
            _ => continue,
        };
        if let Err(e) = result {
            // Fails once the output has ended: nothing more is sent then.
            let _ = notes.send(event(&ExecEvent::Error(e.body()))).await;
        }
    }
    drop(stdin);
    if !*ended.borrow() {
        // The exec may end meanwhile: NoSuchExec is fine.
        let _ = control.signal(libc::SIGKILL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn buffered_answers_are_the_json_of_the_result() {
        // Control bytes (escaped 6 for 1) and multi-byte characters across piece boundaries.
        let stdout: String = "\0é\u{1F600}\"\\\n"
            .chars()
            .cycle()
            .take(3 * JSON_PIECE)
            .collect();
        let result = ExecResult {
            exit: ExitInfo {
                exit_code: Some(3),
                signal: None,
                timed_out: false,
            },
            stdout,
            stderr: String::new(),
            stdout_truncated: true,
            stderr_truncated: false,
        };
        let body = axum::body::to_bytes(buffered(result.clone()).into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(serde_json::from_slice::<ExecResult>(&body).unwrap(), result);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value, serde_json::to_value(&result).unwrap());
    }
}
