//! `mvm mcp`: mvm's Model Context Protocol server ([`mvm_mcp`]) over stdio, its tools creating
//! and using sandboxes through the CLI's [`Backend`] (daemonless or mvmd), each session owning
//! the sandboxes it created until it ends.

use std::sync::Arc;

use mvm_mcp::{BackendError, Owned, SandboxBackend, SandboxTools};
use mvm_sandbox::model::{CreateSandbox, ExecRequest, ExecResult, Sandbox};
use rmcp::ServiceExt as _;
use tokio::signal::unix::{signal, SignalKind};

use crate::backend::{Backend, CliError};

#[async_trait::async_trait]
impl SandboxBackend for Backend {
    async fn create(&self, req: CreateSandbox) -> Result<Sandbox, BackendError> {
        Ok(Backend::create(self, req).await?)
    }

    async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult, BackendError> {
        Ok(self.exec_buffered(id, req).await?)
    }

    async fn put_file(
        &self,
        id: &str,
        path: &str,
        mode: u32,
        data: Vec<u8>,
    ) -> Result<u64, BackendError> {
        Ok(Backend::put_file(self, id, path, mode, data).await?)
    }

    async fn get_file(&self, id: &str, path: &str) -> Result<Vec<u8>, BackendError> {
        Ok(Backend::get_file(self, id, path).await?)
    }

    async fn destroy(&self, id: &str) -> Result<(), BackendError> {
        Ok(Backend::destroy(self, id).await?)
    }
}

/// Serves one MCP session on stdin/stdout until the client disconnects (stdin EOF) or a
/// SIGTERM/SIGINT arrives, then destroys the session's sandboxes.
pub async fn serve(backend: Backend) -> Result<(), CliError> {
    let backend: Arc<dyn SandboxBackend> = Arc::new(backend);
    let owned = Arc::new(Owned::default());
    let mut term = signal(SignalKind::terminate()).map_err(signal_error)?;
    let mut int = signal(SignalKind::interrupt()).map_err(signal_error)?;
    let server = SandboxTools::new(backend.clone(), owned.clone());
    let served = tokio::select! {
        service = server.serve(rmcp::transport::stdio()) => match service {
            Ok(service) => {
                let cancel = service.cancellation_token();
                tokio::select! {
                    end = service.waiting() => end
                        .map(drop)
                        .map_err(|e| CliError::Local(format!("mcp session: {e}"))),
                    _ = term.recv() => { cancel.cancel(); Ok(()) }
                    _ = int.recv() => { cancel.cancel(); Ok(()) }
                }
            }
            Err(e) => Err(CliError::Local(format!("mcp session initialization: {e}"))),
        },
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    };
    // Failures go to stderr: stdout is the protocol's.
    for (id, e) in owned.destroy_all(&*backend).await {
        eprintln!("mvm mcp: destroying sandbox {id} at the session's end: {e}");
    }
    served
}

fn signal_error(e: std::io::Error) -> CliError {
    CliError::Local(format!("installing the signal handlers: {e}"))
}
