//! `process.Process` on the agent's exec sessions: Start (a stream of start, data and end
//! events), Connect (the events of a running process), List, SendInput, StreamInput,
//! CloseStdin, SendSignal and Update (pty resize).
//!
//! Each started process has a pump task that takes its output from the agent and hands it to
//! the Start stream (one chunk at a time, so a client that does not read stops the process's
//! output as the agent's window fills) and to any Connect streams (best effort: a lagging one
//! misses chunks). Once the Start client has gone, the pump drains the output for the others.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use base64::Engine as _;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc};

use super::{rpc_request, unknown_method, Method, Target};
use crate::e2b::connect::{self, Code, RpcError};
use crate::e2b::E2bState;
use crate::server::exec::{Chunk, Output};

/// Shell that E2B's SDKs start commands with (`/bin/bash -l -c CMD`, `/bin/bash -i -l` for a
/// pty); a sandbox without bash runs them with its `sh`.
const BASH: &str = "/bin/bash";
const BASH_OR_SH: &str = "command -v bash >/dev/null 2>&1 && exec bash \"$@\"; exec sh \"$@\"";

/// Events kept for Connect streams that lag (each at most the agent's 64 KiB chunk).
const FANOUT: usize = 64;

/// `process.ProcessConfig`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
struct ProcessConfig {
    cmd: String,
    args: Vec<String>,
    envs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cwd: Option<String>,
}

/// `process.PTY`.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
struct Pty {
    size: Option<PtySize>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(default)]
struct PtySize {
    cols: u16,
    rows: u16,
}

/// `process.ProcessSelector`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StartRequest {
    process: ProcessConfig,
    pty: Option<Pty>,
    tag: Option<String>,
    stdin: Option<bool>,
}

/// A request naming a process, with the fields of every such request.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct ProcessRequest {
    process: Selector,
    input: Option<Input>,
    signal: Option<serde_json::Value>,
    pty: Option<Pty>,
}

/// `process.ProcessInput`: base64 bytes for stdin or the pty.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct Input {
    stdin: Option<String>,
    pty: Option<String>,
}

/// `process.StreamInputRequest`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct StreamInputRequest {
    start: Option<ProcessRequest>,
    data: Option<ProcessRequest>,
}

/// `process.ProcessEvent`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
enum Event {
    Start { pid: u32 },
    Data(Data),
    End(End),
    Keepalive {},
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "lowercase")]
enum Data {
    Stdout(String),
    Stderr(String),
    Pty(String),
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
struct End {
    exit_code: i32,
    exited: bool,
    status: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl End {
    fn of(status: agent::ExitStatus) -> Self {
        match status.termination {
            agent::protocol::Termination::Exited(code) => End {
                exit_code: code,
                exited: true,
                status: format!("exit status {code}"),
                error: None,
            },
            agent::protocol::Termination::Signaled(sig) => End {
                exit_code: -1,
                exited: false,
                status: format!("signal: {}", signal_name(sig)),
                error: None,
            },
        }
    }

    fn failed(e: &RpcError) -> Self {
        End {
            exit_code: -1,
            exited: false,
            status: "error".into(),
            error: Some(e.message.clone()),
        }
    }
}

fn signal_name(sig: i32) -> String {
    match sig {
        libc::SIGKILL => "killed".into(),
        libc::SIGTERM => "terminated".into(),
        libc::SIGINT => "interrupt".into(),
        libc::SIGHUP => "hangup".into(),
        other => format!("signal {other}"),
    }
}

/// `StartResponse` / `ConnectResponse`.
#[derive(Serialize)]
struct EventMessage<'a> {
    event: &'a Event,
}

/// `process.ProcessInfo`.
#[derive(Serialize)]
struct ProcessInfo {
    config: ProcessConfig,
    pid: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
}

/// A process started through `Start`.
struct Proc {
    config: ProcessConfig,
    tag: Option<String>,
    control: agent::ExecControl,
    stdin: tokio::sync::Mutex<Option<agent::ExecStdin>>,
    events: broadcast::Sender<Event>,
}

/// The processes started through `Start`, per sandbox, while they run.
#[derive(Default)]
pub struct Processes {
    by_sandbox: Mutex<HashMap<String, HashMap<u32, Arc<Proc>>>>,
}

impl Processes {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<u32, Arc<Proc>>>> {
        self.by_sandbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, sandbox: &str, pid: u32, proc: Arc<Proc>) {
        self.map()
            .entry(sandbox.to_owned())
            .or_default()
            .insert(pid, proc);
    }

    fn remove(&self, sandbox: &str, pid: u32) {
        let mut map = self.map();
        if let Some(procs) = map.get_mut(sandbox) {
            procs.remove(&pid);
            if procs.is_empty() {
                map.remove(sandbox);
            }
        }
    }

    /// Forgets a destroyed sandbox's processes.
    pub fn forget(&self, sandbox: &str) {
        self.map().remove(sandbox);
    }

    fn list(&self, sandbox: &str) -> Vec<(u32, Arc<Proc>)> {
        let mut procs: Vec<_> = self
            .map()
            .get(sandbox)
            .map(|p| p.iter().map(|(pid, p)| (*pid, p.clone())).collect())
            .unwrap_or_default();
        procs.sort_by_key(|(pid, _)| *pid);
        procs
    }

    /// The process `sel` names in `sandbox`.
    fn find(&self, sandbox: &str, sel: &Selector) -> Result<(u32, Arc<Proc>), RpcError> {
        let found = self.list(sandbox).into_iter().find(|(pid, p)| match sel {
            Selector {
                pid: Some(want), ..
            } => pid == want,
            Selector { tag: Some(tag), .. } => p.tag.as_ref() == Some(tag),
            _ => false,
        });
        found.ok_or_else(|| {
            let which = match sel {
                Selector { pid: Some(pid), .. } => format!("pid {pid}"),
                Selector { tag: Some(tag), .. } => format!("tag {tag:?}"),
                _ => return RpcError::new(Code::InvalidArgument, "name a process by pid or tag"),
            };
            RpcError::new(
                Code::NotFound,
                format!("no process with {which} started through mvm's E2B endpoint is running"),
            )
        })
    }
}

/// `POST /process.Process/{method}`.
pub async fn call(
    State(state): State<E2bState>,
    axum::extract::Path(method): Method,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match method.as_str() {
        "Start" => streamed(&headers, start(&state, &headers, body).await),
        "Connect" => streamed(&headers, connect_to(&state, &headers, body).await),
        "StreamInput" => stream_input(&state, &headers, body).await,
        _ => connect::unary(unary(&state, &method, &headers, body).await),
    }
}

/// A process's event stream, or the error that kept it from starting.
type Events = futures_util::stream::BoxStream<'static, Event>;

/// The answer to Start or Connect: the events, with a keepalive event whenever the process
/// has been silent for the `Keepalive-Ping-Interval` the client asked for (seconds).
fn streamed(headers: &HeaderMap, events: Result<Events, RpcError>) -> Response {
    let events = match events {
        Ok(e) => e,
        Err(e) => return connect::stream_error(e),
    };
    let every = headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.clamp(1, 3600)));
    let body = with_keepalives(events, every)
        .map(|e| connect::message(&EventMessage { event: &e }))
        .chain(futures_util::stream::once(async { connect::end(None) }));
    connect::streaming(body)
}

/// `events`, and a keepalive event after each silence of `every`.
fn with_keepalives(events: Events, every: Option<Duration>) -> Events {
    let Some(every) = every else {
        return events;
    };
    // Cancel-safe: an unfold stream keeps its pending step when `next()` is dropped.
    futures_util::stream::unfold(events, move |mut events| async move {
        match tokio::time::timeout(every, events.next()).await {
            Ok(Some(e)) => Some((e, events)),
            Ok(None) => None,
            Err(_) => Some((Event::Keepalive {}, events)),
        }
    })
    .boxed()
}

/// The agent exec for a `StartRequest`.
fn exec_request(req: &StartRequest) -> mvm_sandbox::model::ExecRequest {
    let p = &req.process;
    let cmd = if p.cmd == BASH {
        let mut argv = vec![
            "/bin/sh".into(),
            "-c".into(),
            BASH_OR_SH.into(),
            "sh".into(),
        ];
        argv.extend(p.args.iter().cloned());
        argv
    } else {
        std::iter::once(p.cmd.clone())
            .chain(p.args.iter().cloned())
            .collect()
    };
    let size = req.pty.and_then(|p| p.size);
    mvm_sandbox::model::ExecRequest {
        cmd,
        env: p.envs.clone(),
        cwd: p.cwd.clone(),
        tty: req.pty.is_some(),
        tty_size: size.map(|s| mvm_sandbox::model::TtySize {
            rows: s.rows.max(1),
            cols: s.cols.max(1),
        }),
        ..Default::default()
    }
}

async fn start(state: &E2bState, headers: &HeaderMap, body: Body) -> Result<Events, RpcError> {
    let (target, req): (_, StartRequest) = rpc_request(state, headers, body).await?;
    let pty = req.pty.is_some();
    let mut session = state
        .manager
        .start_exec(&target.tenant, &target.id, &exec_request(&req))
        .await?;
    let pid = session.pid();
    let stdin = session.stdin.take();
    // Without stdin a command reads EOF (a pty keeps its input for SendInput).
    let stdin = if req.stdin == Some(true) || pty {
        stdin
    } else {
        drop(stdin);
        None
    };
    let (events, _) = broadcast::channel(FANOUT);
    let proc = Arc::new(Proc {
        config: req.process,
        tag: req.tag,
        control: session.control(),
        stdin: tokio::sync::Mutex::new(stdin),
        events: events.clone(),
    });
    state.processes.insert(&target.id, pid, proc);
    let (primary, rx) = mpsc::channel(1);
    let output = Output::of(&mut session);
    tokio::spawn(pump(
        state.clone(),
        target.id,
        pid,
        pty,
        session,
        output,
        primary,
        events,
    ));
    let first = futures_util::stream::once(async move { Event::Start { pid } });
    let rest = receiver_stream(rx);
    Ok(first.chain(rest).boxed())
}

/// The events of an mpsc receiver, as a stream.
fn receiver_stream(rx: mpsc::Receiver<Event>) -> impl futures_util::Stream<Item = Event> {
    futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|e| (e, rx)) })
}

/// Takes a process's output and end from the agent and hands them to the Start stream
/// (`primary`, while its client reads) and the Connect streams (`events`).
#[allow(clippy::too_many_arguments)]
async fn pump(
    state: E2bState,
    sandbox: String,
    pid: u32,
    pty: bool,
    mut session: agent::ExecSession,
    mut output: Output,
    primary: mpsc::Sender<Event>,
    events: broadcast::Sender<Event>,
) {
    let b64 = |c: &[u8]| base64::engine::general_purpose::STANDARD.encode(c);
    let mut primary = Some(primary);
    let end = loop {
        let event = match output.next().await {
            Ok(Some(Chunk::Stdout(c))) if pty => Event::Data(Data::Pty(b64(&c))),
            Ok(Some(Chunk::Stdout(c))) => Event::Data(Data::Stdout(b64(&c))),
            Ok(Some(Chunk::Stderr(c))) => Event::Data(Data::Stderr(b64(&c))),
            Ok(None) => match session.wait().await {
                Ok(status) => break Event::End(End::of(status)),
                Err(e) => break Event::End(End::failed(&RpcError::from(e))),
            },
            Err(e) => break Event::End(End::failed(&RpcError::from(e.0))),
        };
        let _ = events.send(event.clone());
        if let Some(p) = &primary {
            if p.send(event).await.is_err() {
                primary = None;
            }
        }
    };
    state.processes.remove(&sandbox, pid);
    let _ = events.send(end.clone());
    if let Some(p) = primary {
        let _ = p.send(end).await;
    }
}

async fn connect_to(state: &E2bState, headers: &HeaderMap, body: Body) -> Result<Events, RpcError> {
    let (target, req): (_, ProcessRequest) = rpc_request(state, headers, body).await?;
    let (pid, proc) = state.processes.find(&target.id, &req.process)?;
    let rx = proc.events.subscribe();
    let rest = futures_util::stream::unfold(Some(rx), |rx| async move {
        let mut rx = rx?;
        loop {
            match rx.recv().await {
                Ok(e @ Event::End(_)) => return Some((e, None)),
                Ok(e) => return Some((e, Some(rx))),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    Ok(
        futures_util::stream::once(async move { Event::Start { pid } })
            .chain(rest)
            .boxed(),
    )
}

/// The unary methods of the service.
const UNARY: [&str; 5] = ["List", "SendInput", "CloseStdin", "SendSignal", "Update"];

/// A unary call.
async fn unary(
    state: &E2bState,
    method: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<serde_json::Value, RpcError> {
    if !UNARY.contains(&method) {
        return Err(unknown_method("process.Process", method));
    }
    let (target, req): (_, ProcessRequest) = rpc_request(state, headers, body).await?;
    if method == "List" {
        let processes: Vec<ProcessInfo> = state
            .processes
            .list(&target.id)
            .into_iter()
            .map(|(pid, p)| ProcessInfo {
                config: p.config.clone(),
                pid,
                tag: p.tag.clone(),
            })
            .collect();
        return Ok(serde_json::json!({ "processes": processes }));
    }
    let (_, proc) = state.processes.find(&target.id, &req.process)?;
    match method {
        "SendInput" => write_input(&proc, req.input.as_ref()).await?,
        "CloseStdin" => match proc.stdin.lock().await.take() {
            Some(stdin) => stdin.close()?,
            None => return Err(no_stdin()),
        },
        "SendSignal" => proc.control.signal(signal(req.signal.as_ref())?).await?,
        "Update" => {
            let size = req
                .pty
                .and_then(|p| p.size)
                .ok_or_else(|| RpcError::new(Code::InvalidArgument, "Update needs pty.size"))?;
            proc.control
                .resize(size.rows.max(1), size.cols.max(1))
                .await?
        }
        other => return Err(unknown_method("process.Process", other)),
    }
    Ok(serde_json::json!({}))
}

fn no_stdin() -> RpcError {
    RpcError::new(
        Code::FailedPrecondition,
        "the process has no stdin: start it with stdin=True (or it was closed)",
    )
}

/// Writes stdin or pty input to a process.
async fn write_input(proc: &Proc, input: Option<&Input>) -> Result<(), RpcError> {
    let data = input
        .and_then(|i| i.stdin.as_ref().or(i.pty.as_ref()))
        .ok_or_else(|| RpcError::new(Code::InvalidArgument, "input needs stdin or pty bytes"))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| RpcError::new(Code::InvalidArgument, format!("input is not base64: {e}")))?;
    let mut stdin = proc.stdin.lock().await;
    let s = stdin.as_mut().ok_or_else(no_stdin)?;
    Ok(s.write(&bytes).await?)
}

/// `process.Signal` (its name or number): SIGTERM or SIGKILL.
fn signal(v: Option<&serde_json::Value>) -> Result<i32, RpcError> {
    match v {
        Some(serde_json::Value::String(s)) if s == "SIGNAL_SIGKILL" => Ok(libc::SIGKILL),
        Some(serde_json::Value::String(s)) if s == "SIGNAL_SIGTERM" => Ok(libc::SIGTERM),
        Some(serde_json::Value::Number(n)) if n.as_i64() == Some(9) => Ok(libc::SIGKILL),
        Some(serde_json::Value::Number(n)) if n.as_i64() == Some(15) => Ok(libc::SIGTERM),
        other => Err(RpcError::new(
            Code::InvalidArgument,
            format!("signal {other:?}: use SIGNAL_SIGTERM or SIGNAL_SIGKILL"),
        )),
    }
}

/// `StreamInput`: a start message naming the process, then input messages, as they come.
async fn stream_input(state: &E2bState, headers: &HeaderMap, body: Body) -> Response {
    let result = async {
        let target = Target::of(state, headers)?;
        let mut body = body.into_data_stream();
        let mut reader = connect::Envelopes::default();
        let mut proc: Option<Arc<Proc>> = None;
        while let Some(msg) = reader.next(&mut body).await? {
            let req: StreamInputRequest = connect::parse(&msg)?;
            if let Some(start) = req.start {
                proc = Some(state.processes.find(&target.id, &start.process)?.1);
            } else if let Some(data) = req.data {
                let p = proc.as_ref().ok_or_else(|| {
                    RpcError::new(Code::InvalidArgument, "StreamInput: data before start")
                })?;
                write_input(p, data.input.as_ref()).await?;
            }
        }
        Ok::<_, RpcError>(())
    }
    .await;
    let envelopes = match result {
        Ok(()) => vec![connect::message(&serde_json::json!({})), connect::end(None)],
        Err(e) => vec![connect::end(Some(&e))],
    };
    connect::streaming(futures_util::stream::iter(envelopes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_connect_json() {
        let end = Event::End(End {
            exit_code: 3,
            exited: true,
            status: "exit status 3".into(),
            error: None,
        });
        assert_eq!(
            serde_json::to_value(EventMessage { event: &end }).unwrap(),
            serde_json::json!({"event": {"end": {
                "exitCode": 3, "exited": true, "status": "exit status 3"
            }}})
        );
        let data = Event::Data(Data::Stdout("aGk=".into()));
        assert_eq!(
            serde_json::to_value(EventMessage { event: &data }).unwrap(),
            serde_json::json!({"event": {"data": {"stdout": "aGk="}}})
        );
    }

    #[tokio::test]
    async fn silences_get_keepalives() {
        let silent = futures_util::stream::pending().boxed();
        let mut events = with_keepalives(silent, Some(Duration::from_millis(10)));
        let e = events.next().await.unwrap();
        assert_eq!(
            serde_json::to_value(EventMessage { event: &e }).unwrap(),
            serde_json::json!({"event": {"keepalive": {}}})
        );
    }

    #[test]
    fn bash_falls_back_to_sh() {
        let req: StartRequest = serde_json::from_str(
            r#"{"process": {"cmd": "/bin/bash", "args": ["-l", "-c", "echo hi"],
                "envs": {"A": "1"}, "cwd": "/tmp"}, "stdin": false}"#,
        )
        .unwrap();
        let exec = exec_request(&req);
        assert_eq!(exec.cmd[..2], ["/bin/sh", "-c"]);
        assert_eq!(exec.cmd[3..], ["sh", "-l", "-c", "echo hi"]);
        assert_eq!(exec.cwd.as_deref(), Some("/tmp"));
        assert!(!exec.tty);
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(
            signal(Some(&"SIGNAL_SIGKILL".into())).unwrap(),
            libc::SIGKILL
        );
        assert_eq!(signal(Some(&15.into())).unwrap(), libc::SIGTERM);
        signal(None).unwrap_err();
    }
}
