//! mvm's Model Context Protocol server, transport-independent: the tools (`sandbox_create`,
//! `sandbox_exec`, `sandbox_write_file`, `sandbox_read_file`, `sandbox_list_files`,
//! `sandbox_destroy`) over a [`SandboxBackend`], each session owning the sandboxes it created
//! until it ends. `mvm mcp` serves it over stdio, mvmd over streamable HTTP at `/mcp`.

mod backend;
mod session;
mod tools;
mod types;

pub use backend::{BackendError, SandboxBackend, TenantManager};
pub use session::Owned;
pub use tools::SandboxTools;
