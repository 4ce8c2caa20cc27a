//! The tools' parameters and results: their JSON schemas (with descriptions, for the client)
//! and their text renderings (the `content` next to `structuredContent`).

use mvm_sandbox::model::{ExecResult, Isolation, Sandbox};
use rmcp::schemars::{self, JsonSchema};
use serde::{Deserialize, Serialize};

/// The isolation tier a client can ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Tier {
    /// A micro-VM with its own kernel (the default).
    Vm,
    /// A jailed host process, for hosts without hardware virtualization (only when asked).
    Jail,
}

impl From<Tier> for Isolation {
    fn from(t: Tier) -> Isolation {
        match t {
            Tier::Vm => Isolation::Vm,
            Tier::Jail => Isolation::Jail,
        }
    }
}

impl From<Isolation> for Tier {
    fn from(i: Isolation) -> Tier {
        match i {
            Isolation::Vm => Tier::Vm,
            Isolation::Jail => Tier::Jail,
        }
    }
}

/// `sandbox_create`'s parameters.
#[derive(Debug, Default, Deserialize, JsonSchema)]
pub struct CreateParams {
    /// Template (root filesystem and kernel) to start from [default: `default`].
    pub template: Option<String>,
    /// Isolation tier: `vm` (a micro-VM) or `jail` (a jailed process, only when asked for)
    /// [default: mvm's, `vm` unless MVM_ISOLATION or mvmd says otherwise].
    pub isolation: Option<Tier>,
    /// vCPUs (vm tier) or CPU quota in cores (jail tier).
    pub vcpus: Option<u32>,
    /// Memory in MiB.
    pub memory_mib: Option<u64>,
}

/// `sandbox_create`'s result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Created {
    /// The new sandbox's id, for the other tools.
    pub sandbox_id: String,
    /// Its isolation tier.
    pub isolation: Tier,
    /// Its template.
    pub template: String,
}

impl Created {
    pub fn new(s: &Sandbox) -> Created {
        Created {
            sandbox_id: s.id.clone(),
            isolation: s.isolation.into(),
            template: s.template.clone(),
        }
    }
}

/// A parameter set naming only the sandbox.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct SandboxParams {
    /// The sandbox, as `sandbox_create` returned it (only this session's).
    pub sandbox_id: String,
}

/// `sandbox_exec`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ExecParams {
    /// The sandbox, as `sandbox_create` returned it (only this session's).
    pub sandbox_id: String,
    /// A shell command line, run as `sh -c COMMAND` in the sandbox.
    pub command: String,
    /// Kill the command after this many seconds [default: none].
    pub timeout_s: Option<u64>,
}

/// `sandbox_exec`'s result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Executed {
    /// Standard output (UTF-8, invalid bytes replaced).
    pub stdout: String,
    /// Standard error (UTF-8, invalid bytes replaced).
    pub stderr: String,
    /// Exit code, or 128 + the signal that killed it (shell style).
    pub exit_code: i32,
    /// The command was killed because `timeout_s` expired.
    pub timed_out: bool,
}

impl From<ExecResult> for Executed {
    fn from(r: ExecResult) -> Executed {
        Executed {
            exit_code: r.exit.shell_code(),
            timed_out: r.exit.timed_out,
            stdout: r.stdout,
            stderr: r.stderr,
        }
    }
}

/// `sandbox_write_file`'s parameters.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct WriteParams {
    /// The sandbox, as `sandbox_create` returned it (only this session's).
    pub sandbox_id: String,
    /// Absolute path of the file in the sandbox (created or replaced, mode 0644).
    pub path: String,
    /// The file's whole content (UTF-8 text).
    pub content: String,
}

/// `sandbox_write_file`'s result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Written {
    /// The file's path in the sandbox.
    pub path: String,
    /// Bytes written.
    pub bytes: u64,
}

/// `sandbox_read_file`'s and `sandbox_list_files`' parameters.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct PathParams {
    /// The sandbox, as `sandbox_create` returned it (only this session's).
    pub sandbox_id: String,
    /// Absolute path in the sandbox.
    pub path: String,
}

/// `sandbox_read_file`'s result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct FileContent {
    /// The file's path in the sandbox.
    pub path: String,
    /// Its content (UTF-8, invalid bytes replaced).
    pub content: String,
    /// Its size in bytes.
    pub bytes: u64,
}

/// One entry of a directory.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Entry {
    /// The entry's name.
    pub name: String,
    /// It is a directory.
    pub is_dir: bool,
}

/// `sandbox_list_files`' result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Listing {
    /// The directory's path in the sandbox.
    pub path: String,
    /// Its entries (`.` and `..` left out), sorted by name.
    pub entries: Vec<Entry>,
}

/// `sandbox_destroy`'s result.
#[derive(Debug, Serialize, JsonSchema)]
pub struct Destroyed {
    /// The destroyed sandbox.
    pub sandbox_id: String,
}

/// What a tool result says in `content`, for clients (and models) that read text.
pub trait Render {
    /// The text rendering.
    fn render(&self) -> String;
}

impl Render for Created {
    fn render(&self) -> String {
        format!(
            "sandbox {} created ({} tier, template {})",
            self.sandbox_id,
            Isolation::from(self.isolation).as_str(),
            self.template
        )
    }
}

impl Render for Executed {
    fn render(&self) -> String {
        let end = if self.timed_out {
            format!("timed out and killed (exit code {})", self.exit_code)
        } else {
            format!("exit code {}", self.exit_code)
        };
        format!(
            "{end}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

impl Render for Written {
    fn render(&self) -> String {
        format!("wrote {} bytes to {}", self.bytes, self.path)
    }
}

impl Render for FileContent {
    fn render(&self) -> String {
        self.content.clone()
    }
}

impl Render for Listing {
    fn render(&self) -> String {
        self.entries
            .iter()
            .map(|e| format!("{}{}\n", e.name, if e.is_dir { "/" } else { "" }))
            .collect()
    }
}

impl Render for Destroyed {
    fn render(&self) -> String {
        format!("sandbox {} destroyed", self.sandbox_id)
    }
}
