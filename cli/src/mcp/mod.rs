//! `mvm mcp`: a Model Context Protocol server over stdio whose tools create and use sandboxes
//! through the CLI's [`Backend`] (daemonless or mvmd), each session owning the sandboxes it
//! created until it ends.

mod session;
mod tools;
mod types;

use std::sync::Arc;

use rmcp::ServiceExt as _;
use tokio::signal::unix::{signal, SignalKind};

use crate::backend::{Backend, CliError};
use session::Owned;
use tools::SandboxTools;

/// Serves one MCP session on stdin/stdout until the client disconnects (stdin EOF) or a
/// SIGTERM/SIGINT arrives, then destroys the session's sandboxes.
pub async fn serve(backend: Backend) -> Result<(), CliError> {
    let backend = Arc::new(backend);
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
    owned.destroy_all(&backend).await;
    served
}

fn signal_error(e: std::io::Error) -> CliError {
    CliError::Local(format!("installing the signal handlers: {e}"))
}
