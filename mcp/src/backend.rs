//! What the tools drive: the few sandbox operations they need, from mvmd's client (`mvm mcp`
//! against a daemon) or from an in-process manager (mvmd itself, daemonless `mvm mcp`).

use async_trait::async_trait;
use mvm_sandbox::db::Tenant;
use mvm_sandbox::model::{CreateSandbox, ExecRequest, ExecResult, Sandbox};
use mvm_sandbox::Manager;

/// A backend's failure, shown to the client as it displays.
pub type BackendError = Box<dyn std::error::Error + Send + Sync>;

/// The sandbox operations of the MCP tools, all as one tenant.
#[async_trait]
pub trait SandboxBackend: Send + Sync {
    /// Creates a sandbox.
    async fn create(&self, req: CreateSandbox) -> Result<Sandbox, BackendError>;
    /// Runs `req` to completion and returns all of its output.
    async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult, BackendError>;
    /// Writes a file of the sandbox; returns the bytes written.
    async fn put_file(
        &self,
        id: &str,
        path: &str,
        mode: u32,
        data: Vec<u8>,
    ) -> Result<u64, BackendError>;
    /// Reads a file of the sandbox.
    async fn get_file(&self, id: &str, path: &str) -> Result<Vec<u8>, BackendError>;
    /// Destroys a sandbox.
    async fn destroy(&self, id: &str) -> Result<(), BackendError>;
}

/// An in-process manager acting as one tenant.
#[derive(Clone)]
pub struct TenantManager {
    /// The manager.
    pub manager: Manager,
    /// The name of the tenant every call acts as.
    pub tenant: String,
}

impl TenantManager {
    /// The tenant as it is now (its quota may have changed since the session began).
    fn tenant(&self) -> Result<Tenant, BackendError> {
        Ok(self
            .manager
            .db()
            .tenant(&self.tenant)?
            .ok_or(mvm_sandbox::Error::Unauthorized)?)
    }
}

#[async_trait]
impl SandboxBackend for TenantManager {
    async fn create(&self, req: CreateSandbox) -> Result<Sandbox, BackendError> {
        Ok(self.manager.create(&self.tenant()?, req).await?)
    }

    async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult, BackendError> {
        Ok(self.manager.exec(&self.tenant, id, req).await?)
    }

    async fn put_file(
        &self,
        id: &str,
        path: &str,
        mode: u32,
        data: Vec<u8>,
    ) -> Result<u64, BackendError> {
        let agent = self.manager.agent(&self.tenant, id).await?;
        Ok(agent.put_file(path, mode, data.as_slice()).await?)
    }

    async fn get_file(&self, id: &str, path: &str) -> Result<Vec<u8>, BackendError> {
        let mut buf = Vec::new();
        let agent = self.manager.agent(&self.tenant, id).await?;
        agent.get_file(path, &mut buf).await?;
        Ok(buf)
    }

    async fn destroy(&self, id: &str) -> Result<(), BackendError> {
        Ok(self.manager.destroy(&self.tenant, id).await?)
    }
}
