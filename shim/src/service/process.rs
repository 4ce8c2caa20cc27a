//! The processes of a container (init and execs): starting them through the sandbox's agent,
//! pumping their stdio, signalling them and publishing their exits.

use std::sync::Arc;

use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{TaskExecAdded, TaskExecStarted, TaskExit, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::util::timestamp;
use tokio::sync::{oneshot, watch};

use super::container::container;
use super::TaskService;
use crate::error::{Error, Result};
use crate::{io, spec};

/// Exit status reported for a process whose end the shim did not see.
const UNKNOWN_EXIT: u32 = 255;

/// How a process ended.
#[derive(Clone, Copy, Debug)]
pub(super) struct Exit {
    pub(super) status: u32,
    pub(super) at: (i64, i32),
}

impl Exit {
    pub(super) fn now(status: u32) -> Exit {
        let t = timestamp().unwrap_or_default();
        Exit {
            status,
            at: (t.seconds, t.nanos),
        }
    }

    pub(super) fn timestamp(&self) -> MessageField<Timestamp> {
        let mut t = Timestamp::new();
        t.seconds = self.at.0;
        t.nanos = self.at.1;
        MessageField::some(t)
    }
}

/// The stdio FIFOs of a process.
#[derive(Clone, Default)]
pub(super) struct Stdio {
    pub(super) stdin: String,
    pub(super) stdout: String,
    pub(super) stderr: String,
    pub(super) terminal: bool,
}

/// A process of the container: the init process (exec id "") or an exec.
pub(super) struct Process {
    pub(super) request: agent::ExecRequest,
    pub(super) stdio: Stdio,
    pub(super) pid: u32,
    pub(super) control: Option<agent::ExecControl>,
    pub(super) close_stdin: Option<oneshot::Sender<()>>,
    pub(super) exit: watch::Sender<Option<Exit>>,
}

impl Process {
    pub(super) fn new(request: agent::ExecRequest, stdio: Stdio) -> Process {
        Process {
            request,
            stdio,
            pid: 0,
            control: None,
            close_stdin: None,
            exit: watch::channel(None).0,
        }
    }

    pub(super) fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    pub(super) fn status(&self) -> api::Status {
        match (self.exited(), &self.control) {
            (Some(_), _) => api::Status::STOPPED,
            (None, Some(_)) => api::Status::RUNNING,
            (None, None) => api::Status::CREATED,
        }
    }
}

/// containerd's exit status: the code, or 128 + the signal.
fn api_exit_code(s: agent::ExitStatus) -> u32 {
    match (s.code(), s.signal()) {
        (Some(code), _) => code as u32 & 0xff,
        (None, Some(sig)) => 128 + sig as u32,
        (None, None) => UNKNOWN_EXIT,
    }
}

impl TaskService {
    /// Task.Start: runs the init process or an exec through the sandbox's agent, with its
    /// stdio pumped to and from containerd's FIFOs, and publishes its exit when it ends.
    pub(super) async fn start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let (manager, tenant) = self.manager().await?;
        let mut slot = self.inner.containers.lock().await;
        let c = container(&mut slot, id)?;
        let sandbox = c.sandbox.id.clone();
        let container_id = c.id.clone();
        let init_pid = c.init.pid;
        let oom = c.oom.as_ref().map(|w| Arc::clone(&w.reports));
        let p = c.process(exec_id)?;
        if p.control.is_some() || p.exited().is_some() {
            return Err(Error::State(format!(
                "process {exec_id:?} was already started"
            )));
        }
        let stdin = io::open_input(&p.stdio.stdin)?;
        let stdout = io::open_output(&p.stdio.stdout)?;
        let stderr = io::open_output(&p.stdio.stderr)?;
        let session = match manager.agent(&tenant.name, &sandbox).await {
            Ok(client) => client.exec(p.request.clone()).await.map_err(Error::from),
            Err(e) => Err(e.into()),
        };
        let mut session = match session {
            Ok(s) => s,
            Err(e) => {
                // It never ran: Wait and State report it as ended, and Delete can go ahead.
                p.exit.send_replace(Some(Exit::now(UNKNOWN_EXIT)));
                log::error!("starting process {exec_id:?} of container {container_id}: {e}");
                return Err(e);
            }
        };
        // The init process is known to containerd by the sandbox's host pid.
        let pid = if exec_id.is_empty() {
            init_pid
        } else {
            session.pid()
        };
        p.pid = pid;
        p.control = Some(session.control());
        if let (Some(from), Some(to)) = (stdin, session.stdin.take()) {
            let (tx, rx) = oneshot::channel();
            p.close_stdin = Some(tx);
            tokio::spawn(io::pump_input(from, to, rx));
        }
        let out = session
            .stdout
            .take()
            .map(|s| tokio::spawn(io::pump_output(s, stdout)));
        let err = session
            .stderr
            .take()
            .map(|s| tokio::spawn(io::pump_output(s, stderr)));
        let exit = p.exit.clone();
        let this = self.clone();
        let exec = exec_id.to_owned();
        tokio::spawn(async move {
            let status = match session.wait().await {
                Ok(s) => api_exit_code(s),
                Err(e) => {
                    log::error!("lost process {exec:?} of container {container_id}: {e}");
                    UNKNOWN_EXIT
                }
            };
            // All output reaches the FIFOs before containerd hears of the exit.
            for pump in [out, err].into_iter().flatten() {
                let _ = pump.await;
            }
            // An OOM kill is reported before the exit it caused.
            if let Some(oom) = &oom {
                if let Err(e) = this.report_ooms(oom).await {
                    log::debug!("OOM check at the exit of {exec:?}: {e}");
                }
            }
            let e = Exit::now(status);
            // Delete may have recorded the end already (the sandbox went first).
            if !exit.send_if_modified(|x| x.is_none() && x.replace(e).is_none()) {
                return;
            }
            this.publish_exit(container_id, exec, pid, e).await;
        });
        let container_id = c.id.clone();
        drop(slot);
        if exec_id.is_empty() {
            self.publish(
                containerd_shim::protos::topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id,
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        } else {
            self.publish(
                containerd_shim::protos::topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id,
                    exec_id: exec_id.to_owned(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        }
        Ok(pid)
    }

    /// Task.Kill: signals a process (with `all`, the init process's execs too); a process
    /// not started yet ends at once.
    pub(super) async fn kill(&self, req: &api::KillRequest) -> Result<()> {
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| Error::Invalid(format!("signal {} is out of range", req.signal)))?;
        let mut slot = self.inner.containers.lock().await;
        let c = container(&mut slot, &req.id)?;
        c.process(&req.exec_id)?;
        let mut ids = vec![req.exec_id.clone()];
        if req.all && req.exec_id.is_empty() {
            ids.extend(c.execs.keys().cloned());
        }
        let mut unstarted = None;
        for id in ids {
            let p = c.process(&id)?;
            match (&p.control, p.exited()) {
                (_, Some(_)) => {
                    if id == req.exec_id {
                        return Err(Error::NotFound(format!(
                            "process {id:?} has already exited"
                        )));
                    }
                }
                (Some(control), None) => {
                    if let Err(e) = control.signal(signal).await {
                        // It ended meanwhile; its exit is on its way.
                        log::debug!("signal {signal} to {id:?}: {e}");
                    }
                }
                (None, None) => {
                    // Killed before it started: it never will.
                    let e = Exit::now(128 + signal as u32);
                    p.exit.send_replace(Some(e));
                    unstarted = Some((id.clone(), p.pid, e));
                }
            }
        }
        let container_id = c.id.clone();
        drop(slot);
        if let Some((id, pid, e)) = unstarted {
            self.publish_exit(container_id, id, pid, e).await;
        }
        Ok(())
    }

    /// Task.Exec: registers an exec process of a container, started by a later Start.
    pub(super) async fn add_exec(&self, req: api::ExecProcessRequest) -> Result<()> {
        let mut slot = self.inner.containers.lock().await;
        let c = container(&mut slot, &req.id)?;
        if req.exec_id.is_empty() || c.execs.contains_key(&req.exec_id) {
            return Err(Error::Invalid(format!(
                "exec id {:?} is empty or already used",
                req.exec_id
            )));
        }
        let process: oci_spec::runtime::Process = serde_json::from_slice(&req.spec.value)
            .map_err(|e| Error::Invalid(format!("exec process spec: {e}")))?;
        let mut request = spec::exec_request(&process, c.sandbox.isolation, !req.stdin.is_empty())?;
        request.root = c.root.clone();
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        c.execs
            .insert(req.exec_id.clone(), Process::new(request, stdio));
        let container_id = c.id.clone();
        drop(slot);
        self.publish(
            containerd_shim::protos::topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id,
                exec_id: req.exec_id,
                ..Default::default()
            }),
        )
        .await;
        Ok(())
    }

    /// Publishes the `/tasks/exit` event of process `exec_id` ("" for the init process,
    /// which containerd knows by the container's id).
    async fn publish_exit(&self, container_id: String, exec_id: String, pid: u32, e: Exit) {
        self.publish(
            containerd_shim::protos::topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: container_id.clone(),
                id: if exec_id.is_empty() {
                    container_id
                } else {
                    exec_id
                },
                pid,
                exit_status: e.status,
                exited_at: e.timestamp(),
                ..Default::default()
            }),
        )
        .await;
    }
}
