//! The ttrpc Task service (`containerd.task.v2.Task`): the façade that hands each call to
//! the module doing it.

use async_trait::async_trait;
use containerd_shim::protos::api;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::TtrpcResult;

use super::container::container;
use super::TaskService;
use crate::error::Error;

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = TaskService::create(self, &req).await?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = TaskService::start(self, &req.id, &req.exec_id).await?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let mut slot = self.inner.containers.lock().await;
        let c = container(&mut slot, &req.id)?;
        let bundle = c.bundle.clone();
        let paused = c.paused;
        let p = c.process(&req.exec_id)?;
        let mut resp = api::StateResponse {
            id: req.id.clone(),
            bundle,
            pid: p.pid,
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        resp.status = match p.status() {
            api::Status::RUNNING if paused => api::Status::PAUSED,
            s => s,
        }
        .into();
        if let Some(e) = p.exited() {
            resp.exit_status = e.status;
            resp.exited_at = e.timestamp();
        }
        Ok(resp)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let (manager, tenant) = self.manager().await?;
        let mut slot = self.inner.containers.lock().await;
        let c = container(&mut slot, &req.id)?;
        let pids = manager
            .pids(&tenant.name, &c.sandbox.id)
            .map_err(Error::from)?;
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid: pid as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        TaskService::set_paused(self, &req.id, true).await?;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        TaskService::set_paused(self, &req.id, false).await?;
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        TaskService::update(self, &req).await?;
        Ok(api::Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        TaskService::kill(self, &req).await?;
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        TaskService::add_exec(self, req).await?;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let (rows, cols) = match (u16::try_from(req.height), u16::try_from(req.width)) {
            (Ok(r), Ok(c)) if r > 0 && c > 0 => (r, c),
            _ => {
                return Err(Error::Invalid(format!(
                    "terminal size {}x{} is out of range",
                    req.width, req.height
                ))
                .into())
            }
        };
        let control = {
            let mut slot = self.inner.containers.lock().await;
            let p = container(&mut slot, &req.id)?.process(&req.exec_id)?;
            if !p.stdio.terminal {
                return Err(Error::Invalid("the process has no terminal".into()).into());
            }
            p.control.clone()
        };
        match control {
            Some(control) => control.resize(rows, cols).await.map_err(Error::from)?,
            None => {
                let mut slot = self.inner.containers.lock().await;
                let p = container(&mut slot, &req.id)?.process(&req.exec_id)?;
                p.request = p.request.clone().pty(rows, cols);
            }
        }
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let mut slot = self.inner.containers.lock().await;
        let p = container(&mut slot, &req.id)?.process(&req.exec_id)?;
        if req.stdin {
            if let Some(tx) = p.close_stdin.take() {
                let _ = tx.send(());
            }
        }
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut exit = {
            let mut slot = self.inner.containers.lock().await;
            container(&mut slot, &req.id)?
                .process(&req.exec_id)?
                .exit
                .subscribe()
        };
        let e = exit
            .wait_for(Option::is_some)
            .await
            .map(|e| e.expect("waited for Some"))
            .map_err(|_| Error::NotFound(format!("process {:?} went away", req.exec_id)))?;
        Ok(api::WaitResponse {
            exit_status: e.status,
            exited_at: e.timestamp(),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        Ok(TaskService::stats(self, &req.id).await?)
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let mut slot = self.inner.containers.lock().await;
        let task_pid = container(&mut slot, &req.id)
            .map(|c| c.init.pid)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Ok(TaskService::delete(self, &req).await?)
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        TaskService::shutdown(self).await?;
        Ok(api::Empty::new())
    }
}
