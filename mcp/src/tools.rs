//! The MCP tools: each a thin translation onto a [`SandboxBackend`], confined to the session's
//! own sandboxes.

use std::collections::BTreeMap;
use std::sync::Arc;

use mvm_sandbox::model::{CreateSandbox, ExecRequest};
use rmcp::handler::server::common::schema_for_output;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, ContentBlock, Implementation, ServerCapabilities, ServerConfig};
use rmcp::{tool, tool_handler, tool_router, ServerHandler};
use serde::Serialize;

use crate::backend::SandboxBackend;
use crate::session::{DestroyOnDrop, Owned, ToolError};
use crate::types::{
    CreateParams, Created, Destroyed, Entry, ExecParams, Executed, FileContent, Listing,
    PathParams, Render, SandboxParams, WriteParams, Written,
};

/// Mode of the files `sandbox_write_file` writes.
const FILE_MODE: u32 = 0o644;

/// One MCP session's server: the backend, and the sandboxes the session owns.
#[derive(Clone)]
pub struct SandboxTools {
    backend: Arc<dyn SandboxBackend>,
    owned: Arc<Owned>,
    /// Set when the server's end is the session's (streamable HTTP): its sandboxes go with it.
    _end: Option<Arc<DestroyOnDrop>>,
    tool_router: ToolRouter<SandboxTools>,
}

/// A tool's answer: its result as structured content with a text rendering, or an error
/// result (`isError`) whose text says what to do.
fn answer<T: Serialize + Render>(result: Result<T, ToolError>) -> CallToolResult {
    match result {
        Ok(value) => {
            let mut r = CallToolResult::success(vec![ContentBlock::text(value.render())]);
            r.structured_content =
                Some(serde_json::to_value(&value).expect("tool results serialize"));
            r
        }
        Err(e) => CallToolResult::error(vec![ContentBlock::text(e.to_string())]),
    }
}

#[tool_router]
impl SandboxTools {
    /// A server over `backend`, with no sandboxes yet; `owned` outlives it for the caller's
    /// clean-up ([`Owned::destroy_all`] when the session ends).
    pub fn new(backend: Arc<dyn SandboxBackend>, owned: Arc<Owned>) -> SandboxTools {
        SandboxTools {
            backend,
            owned,
            _end: None,
            tool_router: Self::tool_router(),
        }
    }

    /// A server over `backend` that destroys its session's sandboxes when it is dropped (the
    /// transport drops it when the session ends).
    pub fn owning(backend: Arc<dyn SandboxBackend>) -> SandboxTools {
        let owned = Arc::new(Owned::default());
        let end = DestroyOnDrop::new(backend.clone(), owned.clone());
        SandboxTools {
            _end: Some(Arc::new(end)),
            ..SandboxTools::new(backend, owned)
        }
    }

    /// Create a sandbox for this session; it is destroyed when the session ends.
    #[tool(output_schema = schema_for_output::<Created>())]
    async fn sandbox_create(&self, Parameters(p): Parameters<CreateParams>) -> CallToolResult {
        answer(self.create(p).await)
    }

    /// Run a shell command line (`sh -c COMMAND`) in one of this session's sandboxes and
    /// return its stdout, stderr and exit code.
    #[tool(output_schema = schema_for_output::<Executed>())]
    async fn sandbox_exec(&self, Parameters(p): Parameters<ExecParams>) -> CallToolResult {
        answer(self.exec(p).await)
    }

    /// Write a text file in one of this session's sandboxes (created or replaced).
    #[tool(output_schema = schema_for_output::<Written>())]
    async fn sandbox_write_file(&self, Parameters(p): Parameters<WriteParams>) -> CallToolResult {
        answer(self.write_file(p).await)
    }

    /// Read a file of one of this session's sandboxes.
    #[tool(output_schema = schema_for_output::<FileContent>())]
    async fn sandbox_read_file(&self, Parameters(p): Parameters<PathParams>) -> CallToolResult {
        answer(self.read_file(p).await)
    }

    /// List a directory of one of this session's sandboxes.
    #[tool(output_schema = schema_for_output::<Listing>())]
    async fn sandbox_list_files(&self, Parameters(p): Parameters<PathParams>) -> CallToolResult {
        answer(self.list_files(p).await)
    }

    /// Destroy one of this session's sandboxes.
    #[tool(output_schema = schema_for_output::<Destroyed>())]
    async fn sandbox_destroy(&self, Parameters(p): Parameters<SandboxParams>) -> CallToolResult {
        answer(self.destroy(p).await)
    }
}

impl SandboxTools {
    async fn create(&self, p: CreateParams) -> Result<Created, ToolError> {
        let req = CreateSandbox {
            template: p.template,
            vcpus: p.vcpus,
            memory_mib: p.memory_mib,
            isolation: p.isolation.map(Into::into),
            metadata: BTreeMap::from([("created-by".to_owned(), "mvm mcp".to_owned())]),
            ..CreateSandbox::default()
        };
        let sandbox = self.backend.create(req).await?;
        self.owned.add(&sandbox.id);
        Ok(Created::new(&sandbox))
    }

    async fn exec(&self, p: ExecParams) -> Result<Executed, ToolError> {
        self.owned.check(&p.sandbox_id)?;
        let req = ExecRequest {
            cmd: vec!["sh".into(), "-c".into(), p.command],
            timeout_s: p.timeout_s,
            ..ExecRequest::default()
        };
        Ok(self.backend.exec(&p.sandbox_id, &req).await?.into())
    }

    async fn write_file(&self, p: WriteParams) -> Result<Written, ToolError> {
        self.owned.check(&p.sandbox_id)?;
        let bytes = self
            .backend
            .put_file(&p.sandbox_id, &p.path, FILE_MODE, p.content.into_bytes())
            .await
            .map_err(|source| ToolError::File {
                doing: "writing",
                path: p.path.clone(),
                hint: " (its directory must exist: create it with sandbox_exec `mkdir -p DIR`)",
                source,
            })?;
        Ok(Written {
            path: p.path,
            bytes,
        })
    }

    async fn read_file(&self, p: PathParams) -> Result<FileContent, ToolError> {
        self.owned.check(&p.sandbox_id)?;
        let data = self
            .backend
            .get_file(&p.sandbox_id, &p.path)
            .await
            .map_err(|source| ToolError::File {
                doing: "reading",
                path: p.path.clone(),
                hint: "",
                source,
            })?;
        Ok(FileContent {
            bytes: data.len() as u64,
            content: String::from_utf8_lossy(&data).into_owned(),
            path: p.path,
        })
    }

    /// Lists with the sandbox's `ls` (mvmd has no directory route), so both backends go the
    /// same way.
    async fn list_files(&self, p: PathParams) -> Result<Listing, ToolError> {
        self.owned.check(&p.sandbox_id)?;
        let req = ExecRequest {
            cmd: ["ls", "-1Ap", "--", &p.path].map(String::from).to_vec(),
            ..ExecRequest::default()
        };
        let r = self.backend.exec(&p.sandbox_id, &req).await?;
        if r.exit.shell_code() != 0 {
            return Err(ToolError::Command(format!(
                "listing {} failed: {} (give the absolute path of an existing directory)",
                p.path,
                r.stderr.trim()
            )));
        }
        let mut entries: Vec<Entry> = r
            .stdout
            .lines()
            .map(|line| match line.strip_suffix('/') {
                Some(dir) => Entry {
                    name: dir.to_owned(),
                    is_dir: true,
                },
                None => Entry {
                    name: line.to_owned(),
                    is_dir: false,
                },
            })
            .collect();
        entries.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Listing {
            path: p.path,
            entries,
        })
    }

    async fn destroy(&self, p: SandboxParams) -> Result<Destroyed, ToolError> {
        self.owned.check(&p.sandbox_id)?;
        self.backend.destroy(&p.sandbox_id).await?;
        self.owned.remove(&p.sandbox_id);
        Ok(Destroyed {
            sandbox_id: p.sandbox_id,
        })
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for SandboxTools {
    fn get_info(&self) -> ServerConfig {
        let mut info = ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_instructions(
                "mvm sandboxes (micro-VMs, or jailed processes with isolation \"jail\"): create \
                 one with sandbox_create, run shell command lines with sandbox_exec, move text \
                 with the file tools. A session only sees the sandboxes it created; they are \
                 all destroyed when the session ends.",
            );
        info.server_info = Implementation::new("mvm", env!("CARGO_PKG_VERSION"));
        info
    }
}
