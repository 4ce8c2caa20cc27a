//! The containers of the shim: their sandboxes, pausing and deleting them.

use std::collections::HashMap;
use std::path::PathBuf;

use containerd_shim::event::Event;
use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{TaskDelete, TaskPaused, TaskResumed};
use mvm_sandbox::model::Sandbox;

use super::oom::OomWatch;
use super::process::{Exit, Process};
use super::state::{cleanup, unmount};
use super::TaskService;
use crate::error::{Error, Result};

/// A container of this shim and its sandbox.
pub(super) struct Container {
    pub(super) id: String,
    pub(super) bundle: String,
    pub(super) rootfs: PathBuf,
    pub(super) sandbox: Sandbox,
    /// Where a pod's further container has its root in the pod's sandbox; `None` for the
    /// container the sandbox was made for.
    pub(super) root: Option<String>,
    pub(super) paused: bool,
    pub(super) init: Process,
    pub(super) execs: HashMap<String, Process>,
    /// The sandbox's OOM kills, watched by the container the sandbox was made for.
    pub(super) oom: Option<OomWatch>,
}

impl Container {
    /// The init process (`exec_id` "") or exec `exec_id`.
    pub(super) fn process(&mut self, exec_id: &str) -> Result<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| Error::NotFound(format!("no exec {exec_id:?} in container {}", self.id)))
    }
}

/// The sandbox of pod `pod` (its first container's id) when this shim runs that container
/// in a sandbox that holds further containers.
pub(super) fn pod_sandbox(containers: &HashMap<String, Container>, pod: &str) -> Option<Sandbox> {
    containers
        .get(pod)
        .filter(|c| c.root.is_none())
        .map(|c| c.sandbox.clone())
}

/// The sandbox of `c` for an operation on the whole sandbox (`what` it would be), refused
/// for a pod's further containers, which share their pod's.
pub(super) fn own_sandbox(c: &Container, what: &str) -> Result<String> {
    match c.root {
        None => Ok(c.sandbox.id.clone()),
        Some(_) => Err(Error::Invalid(format!(
            "container {} shares the sandbox of its pod, which is {what} as a whole through \
             the pod's first container",
            c.id
        ))),
    }
}

/// Container `id` of this shim.
pub(super) fn container<'a>(
    containers: &'a mut HashMap<String, Container>,
    id: &str,
) -> Result<&'a mut Container> {
    containers
        .get_mut(id)
        .ok_or_else(|| Error::NotFound(format!("no container {id:?} in this shim")))
}

impl TaskService {
    /// Freezes (jail tier: the cgroup freezer) or pauses (vm tier: the vCPUs) the whole
    /// sandbox, or thaws it.
    pub(super) async fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        let sandbox = {
            let mut slot = self.inner.containers.lock().await;
            own_sandbox(container(&mut slot, id)?, "paused")?
        };
        let (manager, tenant) = self.manager().await?;
        manager.set_paused(&tenant.name, &sandbox, paused).await?;
        if let Some(c) = self.inner.containers.lock().await.get_mut(id) {
            c.paused = paused;
        }
        let event: Box<dyn Event> = if paused {
            Box::new(TaskPaused {
                container_id: id.to_owned(),
                ..Default::default()
            })
        } else {
            Box::new(TaskResumed {
                container_id: id.to_owned(),
                ..Default::default()
            })
        };
        let topic = if paused {
            containerd_shim::protos::topics::TASK_PAUSED_EVENT_TOPIC
        } else {
            containerd_shim::protos::topics::TASK_RESUMED_EVENT_TOPIC
        };
        self.publish(topic, event).await;
        Ok(())
    }

    /// Task.Delete: an exec's record, or the container with its sandbox (a pod's further
    /// container: its root in the pod's sandbox); what still runs in it is killed.
    pub(super) async fn delete(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse> {
        let mut containers = self.inner.containers.lock().await;
        let c = container(&mut containers, &req.id)?;
        let mut resp = api::DeleteResponse::new();
        if !req.exec_id.is_empty() {
            let p = c.process(&req.exec_id)?;
            if p.status() == api::Status::RUNNING {
                return Err(Error::State(format!(
                    "exec {:?} is still running; kill it first",
                    req.exec_id
                )));
            }
            let e = p.exited().unwrap_or_else(|| Exit::now(0));
            resp.pid = p.pid;
            resp.exit_status = e.status;
            resp.exited_at = e.timestamp();
            c.execs.remove(&req.exec_id);
            return Ok(resp);
        }
        let (manager, tenant) = self.manager().await?;
        match &c.root {
            Some(_) => {
                // A pod's further container: its processes go, the pod's sandbox stays.
                for p in std::iter::once(&c.init).chain(c.execs.values()) {
                    if let (Some(control), None) = (&p.control, p.exited()) {
                        if let Err(e) = control.signal(libc::SIGKILL).await {
                            log::debug!("container {}: SIGKILL: {e}", c.id);
                        }
                    }
                }
                match manager
                    .remove_container(&tenant.name, &c.sandbox.id, &c.id)
                    .await
                {
                    // The pod's sandbox went first.
                    Err(mvm_sandbox::Error::NotFound(_)) | Ok(()) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            None => {
                // The last OOM kills, while the sandbox's cgroups still count them.
                if let Some(oom) = &c.oom {
                    oom.task.abort();
                    if let Err(e) = self.report_ooms(&oom.reports).await {
                        log::warn!("container {}: last OOM check: {e}", c.id);
                    }
                }
                // Whatever still runs goes with the sandbox, a pod's other containers too.
                manager.destroy(&tenant.name, &c.sandbox.id).await?;
            }
        }
        unmount(&c.rootfs)?;
        let sandbox = c.sandbox.id.clone();
        let c = containers.remove(&req.id).expect("looked up above");
        let killed = || Exit::now(128 + libc::SIGKILL as u32);
        let mark_killed = |p: &Process| {
            p.exit.send_if_modified(|x| {
                let unset = x.is_none();
                if unset {
                    *x = Some(killed());
                }
                unset
            });
        };
        let gone_with_sandbox = containers
            .values()
            .filter(|other| c.root.is_none() && other.sandbox.id == sandbox);
        for p in std::iter::once(&c.init)
            .chain(c.execs.values())
            .chain(gone_with_sandbox.flat_map(|o| std::iter::once(&o.init).chain(o.execs.values())))
        {
            mark_killed(p);
        }
        let e = c.init.exited().unwrap_or_else(killed);
        resp.pid = c.init.pid;
        resp.exit_status = e.status;
        resp.exited_at = e.timestamp();
        drop(containers);
        self.publish(
            containerd_shim::protos::topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: c.id.clone(),
                id: c.id,
                pid: resp.pid,
                exit_status: resp.exit_status,
                exited_at: resp.exited_at.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(resp)
    }

    /// Task.Shutdown: once no container is left, removes the shim's state and lets it exit.
    pub(super) async fn shutdown(&self) -> Result<()> {
        if !self.inner.containers.lock().await.is_empty() {
            // containerd asks again after Delete.
            return Ok(());
        }
        cleanup(&self.inner.dir, None).await?;
        self.inner.exit.signal();
        Ok(())
    }
}
