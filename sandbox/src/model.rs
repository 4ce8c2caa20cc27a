//! The JSON types of the versioned REST API (`/v1`), shared by the daemon, the client and the
//! daemonless CLI.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// How a sandbox is isolated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// A micro-VM (mvm-vmm under mvm-jailer) with the agent as the guest's init.
    #[default]
    Vm,
    /// The agent as a jailed host process (namespaces, cgroups, pivot_root, no capabilities),
    /// for hosts without hardware virtualization.
    Jail,
}

impl Isolation {
    /// Every tier.
    pub const ALL: [Isolation; 2] = [Isolation::Jail, Isolation::Vm];

    /// The name used in the API and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Vm => "vm",
            Isolation::Jail => "jail",
        }
    }
}

impl std::str::FromStr for Isolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "vm" => Ok(Isolation::Vm),
            "jail" => Ok(Isolation::Jail),
            _ => Err(format!("unknown isolation {s:?}: use vm or jail")),
        }
    }
}

/// The tiers an operator allows: a daemon's (`--allowed-isolation`) or a tenant's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AllowedIsolation {
    /// The vm tier may be used.
    pub vm: bool,
    /// The jail tier may be used.
    pub jail: bool,
}

impl Default for AllowedIsolation {
    /// Both tiers.
    fn default() -> Self {
        AllowedIsolation {
            vm: true,
            jail: true,
        }
    }
}

impl AllowedIsolation {
    /// Whether `tier` may be used.
    pub fn allows(self, tier: Isolation) -> bool {
        match tier {
            Isolation::Vm => self.vm,
            Isolation::Jail => self.jail,
        }
    }
}

impl std::fmt::Display for AllowedIsolation {
    /// `vm,jail`, `vm` or `jail`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tiers: Vec<&str> = [Isolation::Vm, Isolation::Jail]
            .into_iter()
            .filter(|t| self.allows(*t))
            .map(Isolation::as_str)
            .collect();
        f.write_str(&tiers.join(","))
    }
}

impl std::str::FromStr for AllowedIsolation {
    type Err = String;
    /// A comma-separated list of tiers, e.g. `vm` or `vm,jail`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut allowed = AllowedIsolation {
            vm: false,
            jail: false,
        };
        for tier in s.split(',').map(str::trim) {
            match tier.parse::<Isolation>()? {
                Isolation::Vm => allowed.vm = true,
                Isolation::Jail => allowed.jail = true,
            }
        }
        Ok(allowed)
    }
}

/// Outbound traffic a sandbox may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(rename_all = "lowercase")]
pub enum Egress {
    /// No network interface but loopback.
    #[default]
    None,
    /// Only to the addresses in `allow` (enforced with nftables in the sandbox's netns).
    Allow,
    /// Anywhere public (masqueraded behind the host); the host's own, private, link-local
    /// and other special addresses only when an `allow` entry names them.
    All,
}

/// Network of a sandbox, as requested.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct NetworkSpec {
    /// Egress policy (default `none`).
    #[serde(default)]
    pub egress: Egress,
    /// Destinations: IPv4 addresses or CIDRs, DNS names (`api.example.com`) and wildcards
    /// (`*.pypi.org`: names below it), each optionally `:PORT`. With `egress: allow` the only
    /// reachable ones (names through the sandbox's resolver, for their DNS TTL); with either
    /// `allow` or `all`, addresses also open a host, private or link-local destination.
    #[serde(default)]
    pub allow: Vec<String>,
}

/// `PATCH /v1/sandboxes/{id}/network` body: the new allow list of a sandbox with egress
/// `allow` (the entries as in [`NetworkSpec::allow`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct NetworkUpdate {
    /// Allowed destinations, replacing the sandbox's list.
    pub allow: Vec<String>,
}

/// `POST /v1/sandboxes` body. Every field is optional.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Template name (default `default`).
    #[serde(default)]
    pub template: Option<String>,
    /// vCPUs (vm) or CPU quota in cores (jail); default 1, at most 32.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Memory in MiB; default 256, 16 to 65536.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// Seconds until the sandbox's timeout passes (default 300; 0 = never): it is then
    /// destroyed, or paused or saved as `lifecycle` says; `keepalive` extends it.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Environment of every exec in the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Isolation tier (default `vm`).
    #[serde(default)]
    pub isolation: Option<Isolation>,
    /// Network (default: no egress).
    #[serde(default)]
    pub network: Option<NetworkSpec>,
    /// Free-form labels returned with the sandbox.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Host ports forwarded to the sandbox's ports (TCP), at most 16, for as long as it lives.
    #[serde(default)]
    pub ports: Vec<PortMapping>,
    /// An OCI image pulled or loaded before (`POST /v1/images`), by reference (`alpine:3.20`,
    /// `registry:5000/app@sha256:...`) or digest, as the sandbox's file system instead of
    /// the template's; its Env is added under `env`, its WorkingDir and User are the execs'
    /// defaults. `template` then only picks the vm tier's kernel.
    #[serde(default)]
    pub image: Option<String>,
    /// Secrets by environment variable name (needs `network.egress: allow`): the sandbox's
    /// env gets a random placeholder, and the sandbox's egress proxy puts the value in its
    /// place in the HTTPS request headers sent to the secret's hosts only. The value never
    /// enters the sandbox and is in no answer. At most 16.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, SecretSpec>,
    /// What happens when its timeout passes, and whether a call to a paused one resumes it
    /// (default: destroyed, no resume).
    #[serde(default, skip_serializing_if = "Lifecycle::is_default")]
    pub lifecycle: Lifecycle,
    /// A snapshot of the tenant's (`POST /v1/sandboxes/{id}/snapshots`), by id or name, to
    /// make the sandbox from: it restores the snapshot's VM (vm tier, its template, vCPUs
    /// and memory) and goes on from the snapshot's instant with its own identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// What happens to a sandbox when its timeout passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnTimeout {
    /// Destroyed.
    #[default]
    Destroy,
    /// Frozen (state `paused`), memory kept; its timeout starts again when it is resumed.
    Pause,
    /// Saved to disk (state `saved`, vm tier, made from a template): no process and no memory
    /// until it is resumed, and its timeout starts again then.
    Save,
}

impl std::str::FromStr for OnTimeout {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "destroy" => Ok(OnTimeout::Destroy),
            "pause" => Ok(OnTimeout::Pause),
            "save" => Ok(OnTimeout::Save),
            other => Err(format!(
                "on_timeout {other:?}: expected destroy, pause or save"
            )),
        }
    }
}

/// A sandbox's lifecycle policy (E2B's `lifecycle`: `onTimeout`, `autoResume`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Lifecycle {
    /// What its timeout does (default `destroy`).
    #[serde(default)]
    pub on_timeout: OnTimeout,
    /// A call that needs its agent (exec, files) or one of its ports resumes it when it is
    /// paused or saved, with its timeout started again (needs `on_timeout` `pause` or `save`).
    #[serde(default)]
    pub auto_resume: bool,
}

impl Lifecycle {
    /// Whether this is the default policy (destroyed at the timeout, no resume).
    pub fn is_default(&self) -> bool {
        *self == Lifecycle::default()
    }
}

/// One secret of a create request: its value and the hosts it may be sent to.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretSpec {
    /// The value (1-4096 bytes of visible ASCII or spaces: it goes into HTTP headers).
    pub value: String,
    /// DNS names (no wildcards, at most 8) whose HTTPS requests get the value.
    pub hosts: Vec<String>,
}

impl std::fmt::Debug for SecretSpec {
    /// Never the value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretSpec")
            .field("value", &"<redacted>")
            .field("hosts", &self.hosts)
            .finish()
    }
}

/// A secret of a sandbox as answers show it: its name and hosts, never its value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SecretInfo {
    /// The environment variable holding its placeholder.
    pub name: String,
    /// The hosts its value is sent to.
    pub hosts: Vec<String>,
}

/// A published port: TCP (or UDP) to `host_ip:host_port` on the host reaches the sandbox's
/// `guest_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortMapping {
    /// Host address the port is published on (default 127.0.0.1: the host alone); another
    /// address of the host lets other hosts reach it, `0.0.0.0` every address.
    #[serde(default = "PortMapping::loopback")]
    #[schema(value_type = String)]
    pub host_ip: std::net::Ipv4Addr,
    /// Host port, 1 to 65535; unique on the host.
    pub host_port: u16,
    /// Port in the sandbox, 1 to 65535.
    pub guest_port: u16,
    /// `tcp` (the default) or `udp`: a TCP and a UDP port of one number are two ports.
    #[serde(default)]
    pub protocol: PortProtocol,
}

impl PortMapping {
    fn loopback() -> std::net::Ipv4Addr {
        std::net::Ipv4Addr::LOCALHOST
    }
}

/// The transport protocol of a published port.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// TCP connections.
    #[default]
    Tcp,
    /// UDP datagrams (and their replies).
    Udp,
}

impl PortProtocol {
    /// `tcp` or `udp`, as nft and docker's `-p` write it.
    pub fn as_str(self) -> &'static str {
        match self {
            PortProtocol::Tcp => "tcp",
            PortProtocol::Udp => "udp",
        }
    }
}

/// Lifecycle state of a sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    /// Being built.
    Creating,
    /// Ready for execs.
    Running,
    /// Frozen (vm: VM paused; jail: cgroup freezer).
    Paused,
    /// Paused with its VM saved to disk (vm tier): no process and no memory of its own until
    /// it is resumed, and no timeout runs meanwhile.
    Saved,
    /// Being torn down.
    Stopping,
}

impl SandboxState {
    /// Name as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            SandboxState::Creating => "creating",
            SandboxState::Running => "running",
            SandboxState::Paused => "paused",
            SandboxState::Saved => "saved",
            SandboxState::Stopping => "stopping",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "creating" => SandboxState::Creating,
            "running" => SandboxState::Running,
            "paused" => SandboxState::Paused,
            "saved" => SandboxState::Saved,
            "stopping" => SandboxState::Stopping,
            _ => return None,
        })
    }
}

/// The network a sandbox got (the default: none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkInfo {
    /// Egress policy.
    pub egress: Egress,
    /// Allowed destinations with `egress: allow`.
    pub allow: Vec<String>,
    /// The sandbox's IPv4 address (none without egress).
    pub address: Option<String>,
    /// Its gateway on the host side (none without egress).
    pub gateway: Option<String>,
    /// The network namespace of the sandbox's pod, made by a container runtime (CNI) and
    /// joined as it is: then the pod's network decides what the sandbox reaches, not
    /// `egress`. None for the namespaces the manager makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    /// Published ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortMapping>,
    /// Its secrets (names and hosts; the values are in no answer).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretInfo>,
}

impl NetworkInfo {
    /// The policy part of it (egress and allow list), as a request asks for it.
    pub fn spec(&self) -> NetworkSpec {
        NetworkSpec {
            egress: self.egress,
            allow: self.allow.clone(),
        }
    }
}

/// A sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    /// Sandbox id.
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// Lifecycle state.
    pub state: SandboxState,
    /// Isolation tier.
    pub isolation: Isolation,
    /// Template it was made from.
    pub template: String,
    /// vCPUs / CPU quota.
    pub vcpus: u32,
    /// Memory in MiB.
    pub memory_mib: u64,
    /// Timeout in seconds (0 = none).
    pub timeout_s: u64,
    /// Unix time (s) at which its timeout passes, if one runs.
    pub expires_at: Option<i64>,
    /// Unix time (s) of creation.
    pub created_at: i64,
    /// Environment of every exec.
    pub env: BTreeMap<String, String>,
    /// Network.
    pub network: NetworkInfo,
    /// Labels.
    pub metadata: BTreeMap<String, String>,
    /// The OCI image it was made from, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<SandboxImage>,
    /// What its timeout does, and whether a call resumes it when paused.
    #[serde(default)]
    pub lifecycle: Lifecycle,
    /// The snapshot (its id) it was made from, if any (`snapshot` of its create; the snapshot
    /// may be gone since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
}

/// A snapshot of a sandbox: its VM (memory, devices, writable layer) at one instant, kept
/// apart from the sandbox (which may go on, or be destroyed), for new sandboxes to start from
/// (`snapshot` of a create).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    /// Its id (`snap-` and 16 hex digits).
    pub id: String,
    /// Its name, unique within the tenant (a later snapshot given the name takes it over).
    pub name: Option<String>,
    /// The sandbox it was taken from (which may be gone).
    pub source: String,
    /// The template its source was made from: its base image is its file system's.
    pub template: String,
    /// vCPUs of its VM (every sandbox made from it has as many).
    pub vcpus: u32,
    /// Guest memory of its VM, MiB (every sandbox made from it has as much).
    pub memory_mib: u64,
    /// When it was taken (Unix seconds).
    pub created_at: i64,
}

/// `POST /v1/sandboxes/{id}/snapshots` body.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    /// A name (1-64 of `a-z A-Z 0-9 - _ .`); a snapshot of the tenant's that has it already
    /// is replaced.
    #[serde(default)]
    pub name: Option<String>,
}

/// The image of a sandbox made from one, and what its execs get from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SandboxImage {
    /// The reference it was asked for by, as normalized (`docker.io/library/alpine:3.20`).
    pub reference: String,
    /// Digest of its manifest (`sha256:...`).
    pub digest: String,
    /// Its run configuration.
    pub config: ImageConfig,
    /// User id of the image's `User` (vm tier; the jail tier runs as the sandbox's own uid).
    pub uid: u32,
    /// Group id of the image's `User`.
    pub gid: u32,
}

impl SandboxImage {
    /// `REPOSITORY@DIGEST`: the reference pinned to the digest the sandbox got.
    pub fn pinned_reference(&self) -> String {
        let repo = match self.reference.split_once('@') {
            Some((repo, _)) => repo,
            // A tag's colon comes after the last slash (a registry's port before it).
            None => match self.reference.rsplit_once(':') {
                Some((repo, tag)) if !tag.contains('/') => repo,
                _ => &self.reference,
            },
        };
        format!("{repo}@{}", self.digest)
    }
}

/// The run configuration of an OCI image (`config` of its config blob).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct ImageConfig {
    /// `NAME=VALUE` entries of every exec's environment.
    #[serde(default)]
    pub env: Vec<String>,
    /// Default working directory of execs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// Default user (`name`, `uid`, `uid:gid`, `name:group`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Program `mvm run IMAGE` starts, its arguments before the command's.
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// Default command (the arguments of the entrypoint when it has one).
    #[serde(default)]
    pub cmd: Vec<String>,
}

/// An image in mvm's image cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Image {
    /// The references that name it (normalized), e.g. `docker.io/library/alpine:3.20`.
    pub references: Vec<String>,
    /// Digest of its manifest (`sha256:...`): `image` of a create may name it.
    pub digest: String,
    /// Bytes of its compressed layers.
    pub size_bytes: u64,
    /// When it was pulled or loaded (Unix seconds).
    pub created_at: i64,
    /// Its run configuration.
    pub config: ImageConfig,
}

/// What removing an image did (`DELETE /v1/images/{name}`, `mvm rmi`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RemovedImage {
    /// References removed.
    pub untagged: Vec<String>,
    /// Digest of the image removed, when no reference named it any more.
    pub deleted: Option<String>,
    /// Bytes of layers removed because no image uses them any more.
    pub freed_bytes: u64,
}

/// What pruning the image cache did (`POST /v1/images/prune`, `mvm images prune`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PrunedImages {
    /// References removed.
    pub untagged: Vec<String>,
    /// Digests of the images removed.
    pub deleted: Vec<String>,
    /// Bytes of layers removed because no image uses them any more.
    pub freed_bytes: u64,
}

/// `POST /v1/images` body: pull an image from its registry (admin only). Its `Debug` hides
/// the password.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PullImage {
    /// `[REGISTRY/]REPOSITORY[:TAG][@DIGEST]`; Docker Hub and `:latest` are the defaults.
    pub reference: String,
    /// User name for the registry (basic, or a token server's credentials).
    #[serde(default)]
    pub username: Option<String>,
    /// Password or access token for the registry; never stored.
    #[serde(default)]
    pub password: Option<String>,
}

impl std::fmt::Debug for PullImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PullImage")
            .field("reference", &self.reference)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "****"))
            .finish()
    }
}

/// `GET /v1/images` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ImageList {
    /// Cached images, newest first.
    pub images: Vec<Image>,
}

/// `GET /v1/sandboxes` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    /// The tenant's sandboxes, oldest first.
    pub sandboxes: Vec<Sandbox>,
}

/// `POST /v1/sandboxes/{id}/fork` body.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkRequest {
    /// Children to make (default 1, at most 16).
    #[serde(default)]
    pub count: Option<u32>,
}

/// `POST /v1/templates/{name}/warm` body (optional: without one, the defaults' size).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WarmRequest {
    /// vCPUs of the snapshot (default 1): creates of its size restore it.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Guest memory of the snapshot, MiB (default 256).
    #[serde(default)]
    pub memory_mib: Option<u64>,
}

/// `POST /v1/sandboxes/{id}/pause` body (optional: without one, a freeze).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseRequest {
    /// Save a vm-tier sandbox's VM to disk and stop its VMM (state `saved`): its memory and
    /// CPU are the host's again until it is resumed. Without it, the VM is only frozen.
    #[serde(default)]
    pub save: bool,
}

/// `POST /v1/sandboxes/{id}/fork` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ForkAnswer {
    /// The children, each running from the instant of the fork.
    pub sandboxes: Vec<Sandbox>,
}

/// `POST /v1/sandboxes/{id}/keepalive` body.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Keepalive {
    /// New timeout from now, in seconds (default: the sandbox's `timeout_s`).
    #[serde(default)]
    pub timeout_s: Option<u64>,
}

/// `POST /v1/sandboxes/{id}/exec` body (also the first websocket message of `exec/ws`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// Program and arguments (`cmd[0]` is looked up in PATH).
    pub cmd: Vec<String>,
    /// Extra environment (on top of the sandbox's).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Whole stdin of the process (UTF-8); without it stdin is empty.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Kill the process after this many seconds.
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// Stream the output as NDJSON [`ExecEvent`]s instead of one [`ExecResult`].
    #[serde(default)]
    pub stream: bool,
    /// Run on a pseudo-terminal (websocket only).
    #[serde(default)]
    pub tty: bool,
    /// Size of the pseudo-terminal from the start (default 24x80); needs `tty`.
    #[serde(default)]
    pub tty_size: Option<TtySize>,
}

/// Rows and columns of a pseudo-terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TtySize {
    /// Rows (at least 1).
    pub rows: u16,
    /// Columns (at least 1).
    pub cols: u16,
}

/// How an exec ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExitInfo {
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal, when one killed it.
    pub signal: Option<i32>,
    /// Killed because `timeout_s` expired.
    pub timed_out: bool,
}

impl ExitInfo {
    /// Shell-style status: the code, or 128 + signal.
    pub fn shell_code(&self) -> i32 {
        match (self.exit_code, self.signal) {
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            (None, None) => 1,
        }
    }
}

impl From<agent::ExitStatus> for ExitInfo {
    fn from(s: agent::ExitStatus) -> Self {
        ExitInfo {
            exit_code: s.code(),
            signal: s.signal(),
            timed_out: s.timed_out,
        }
    }
}

/// Buffered exec answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    /// How it ended.
    #[serde(flatten)]
    pub exit: ExitInfo,
    /// Standard output (UTF-8, invalid bytes replaced), at most mvmd's exec output limit
    /// (`MVM_EXEC_OUTPUT_LIMIT`, default 16 MiB) of it.
    pub stdout: String,
    /// Standard error, like `stdout`.
    pub stderr: String,
    /// Stdout went on past the limit: the rest was read and discarded (the process ran on).
    #[serde(default)]
    pub stdout_truncated: bool,
    /// Stderr went on past the limit, like `stdout_truncated`.
    #[serde(default)]
    pub stderr_truncated: bool,
}

/// One line of a streamed exec (`application/x-ndjson`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ExecEvent {
    /// A chunk of standard output, base64.
    Stdout {
        /// Base64 of the bytes.
        data: String,
    },
    /// A chunk of standard error, base64.
    Stderr {
        /// Base64 of the bytes.
        data: String,
    },
    /// The process ended; the last event.
    Exit(ExitInfo),
    /// The exec failed; the last event.
    Error(crate::error::ErrorBody),
}

/// Client control messages of `exec/ws` (text frames); binary frames are stdin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum WsControl {
    /// Close stdin.
    Eof,
    /// Send a signal to the process group.
    Signal {
        /// Signal number.
        signal: i32,
    },
    /// Resize the pty.
    Resize {
        /// Rows.
        rows: u16,
        /// Columns.
        cols: u16,
    },
}

/// `GET /v1/sandboxes/{id}/files` query and `PUT` query.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::IntoParams)]
pub struct FileQuery {
    /// Absolute path in the sandbox.
    pub path: String,
    /// Permission bits for `PUT`, octal (default 644).
    #[serde(default)]
    pub mode: Option<String>,
}

/// `PUT /v1/sandboxes/{id}/files` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileWritten {
    /// Path written.
    pub path: String,
    /// Bytes written.
    pub bytes: u64,
}

/// One sample of a running sandbox's usage, as the host sees it (see
/// `Manager::usage_history`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct UsageSample {
    /// When it was taken, Unix time (ms).
    pub at_ms: i64,
    /// The sandbox's vCPUs (jail tier: its CPU quota in cores, at least 1).
    pub vcpus: u32,
    /// Its CPU time since the sample before (or since its creation), in percent of what its
    /// vCPUs could have used meanwhile: 0 to 100.
    pub cpu_used_pct: f64,
    /// Resident anonymous memory of its processes, bytes (vm tier: the guest's RAM its VMM
    /// holds, the guest's own page cache included).
    pub memory_used_bytes: u64,
    /// Page cache charged to it on the host, bytes.
    pub memory_cache_bytes: u64,
    /// Its memory, bytes.
    pub memory_total_bytes: u64,
    /// Space its writes take on its writable layer, bytes (vm tier: the layer image's
    /// allocated blocks; jail tier: used in its layer's tmpfs).
    pub disk_used_bytes: u64,
    /// The size of its writable layer, bytes.
    pub disk_total_bytes: u64,
}

/// Resource usage of a sandbox.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxStats {
    /// Sandbox id.
    pub id: String,
    /// CPU time used, nanoseconds (cgroup cpuacct).
    pub cpu_ns: u64,
    /// Memory charged to the sandbox, bytes (cgroup memory; for vm: the VMM process).
    pub memory_bytes: u64,
    /// Processes and threads in the sandbox's cgroup.
    pub pids: u64,
}

/// `GET /v1/sandboxes/{id}/stats` answer: the sandbox's cgroup usage, its RSS and its tier.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxUsage {
    /// CPU, memory and processes.
    #[serde(flatten)]
    pub stats: SandboxStats,
    /// Isolation tier of the sandbox.
    pub isolation: Isolation,
    /// Resident anonymous memory, bytes: the RSS of its processes (vm: of the VMM) without
    /// the page cache that `memory_bytes` counts (cgroup v1 `memory.stat` `total_rss`, v2
    /// `anon`).
    pub rss_bytes: u64,
}

/// A template: a kernel plus a read-only base image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// Name (1-64 of a-z, 0-9, '-', '_', '.').
    pub name: String,
    /// Host path of the guest kernel (vmlinux or bzImage); used by the vm tier.
    pub kernel: String,
    /// Host path of the ext4 base image (read-only, shared).
    pub rootfs: String,
    /// The template's warm snapshot at a create's default size, which vm-tier creates of
    /// that size (and warm pools) restore instead of booting (`POST
    /// /v1/templates/{name}/warm`); mvm makes it, a registration may not name one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<TemplateSnapshot>,
    /// Its warm snapshots at other sizes (`POST /v1/templates/{name}/warm` with `vcpus` and
    /// `memory_mib`), smallest first: creates of each size restore their own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_snapshots: Vec<TemplateSnapshot>,
}

/// A template's warm snapshot: its VM booted once and saved with the agent answering.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TemplateSnapshot {
    /// vCPUs of the saved VM (creates of another size boot cold).
    pub vcpus: u32,
    /// Guest memory of the saved VM, MiB.
    pub memory_mib: u64,
    /// When it was made (Unix seconds).
    pub created_at: i64,
    /// Sandboxes restored from it ready now for creates to take (`mvmd --warm-pool`).
    #[serde(default)]
    pub pooled: u32,
    /// VMMs started without a VM ready now for the children of forks (`mvmd --fork-pool`).
    #[serde(default)]
    pub fork_pooled: u32,
}

/// `GET /v1/templates` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TemplateList {
    /// Registered templates.
    pub templates: Vec<Template>,
}

/// `GET /healthz` answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always "ok".
    pub status: String,
    /// mvmd version.
    pub version: String,
    /// Whether the vm tier can run on this host, and why not.
    pub vm_tier: String,
}
