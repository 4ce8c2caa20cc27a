//! The sandbox manager: the one place that knows a sandbox's whole life.
//!
//! Create, in order: id and state row (quota checked in the same transaction) → network
//! namespace (veth, tap, nftables egress policy) → writable layer over the shared base →
//! `mvm-jailer` wrapping `mvm-agent` (jail tier) or `mvm-vmm` (vm tier, configured over its API
//! socket) → wait for the agent (unix socket / hybrid vsock) → ready. A failure at any step
//! runs [`Manager`]'s idempotent teardown, which removes every step's product in reverse order
//! and tolerates missing pieces — the same code that destroys sandboxes and cleans up after a
//! daemon killed mid-create.

mod beneath;
mod console;
pub mod host;
pub mod net;
mod pod;
pub mod rootfs;
pub mod vm;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agent::AgentClient;
use jailer::{BindMount, CleanupConfig, JailConfig, SeccompPolicy};
use vmm::devices::legacy::console::ConsoleLimit;

use crate::bounds::Bounds;
use crate::db::{self, Db, SandboxRow, Tenant};
use crate::error::{Error, Result};
use crate::metrics::{Metrics, Snapshot};
use crate::model::{
    AllowedIsolation, CreateSandbox, ExecRequest, ExecResult, Isolation, NetworkSpec, Sandbox,
    SandboxState, SandboxStats, Template, TtySize,
};

/// Most sandboxes one manager runs at once (slots of its /16 network, /29 each).
pub const MAX_SLOTS: u32 = 8192;
/// The agent's socket inside a jail.
const AGENT_SOCKET: &str = "/run/agent.sock";
/// How long a new sandbox may take to answer: jail tier.
const JAIL_READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a new sandbox may take to answer: vm tier (kernel boot).
const VM_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Most vCPUs (vm tier) or cores of CPU quota (jail tier) of a sandbox.
const MAX_VCPUS: u32 = 32;
/// Smallest sandbox memory, MiB.
const MIN_MEMORY_MIB: u64 = 16;
/// Largest sandbox memory, MiB.
const MAX_MEMORY_MIB: u64 = 65536;
/// Default sandbox timeout.
pub const DEFAULT_TIMEOUT_S: u64 = 300;
/// Longest sandbox timeout.
const MAX_TIMEOUT_S: u64 = 7 * 24 * 3600;
/// Name of the template made from the build artifacts.
pub const DEFAULT_TEMPLATE: &str = "default";
/// Largest part of a console log returned by [`Manager::logs`].
const MAX_LOG_BYTES: u64 = 1 << 20;
/// Device nodes the jail tier adds to the jail's /dev for the sandbox's programs (`tty` is the
/// calling process's controlling terminal: a pty of the jail's own devpts, or none).
const JAIL_DEVICES: [(&str, u32, u32); 5] = [
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("tty", 5, 0),
];

/// Where the manager keeps things and how it makes sandboxes.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    /// SQLite database and unpacked template bases (default `/var/lib/mvm`).
    pub state_dir: PathBuf,
    /// Jails, per-sandbox directories and network namespaces (default `/run/mvm`).
    pub run_dir: PathBuf,
    /// Directory holding `mvm-jailer`, `mvm-agent` and `mvm-vmm`.
    pub bin_dir: PathBuf,
    /// Parent cgroup of the sandboxes' cgroups.
    pub cgroup_parent: String,
    /// Sandbox processes run as uid/gid `uid_base + slot`.
    pub uid_base: u32,
    /// First address of the /16 the sandboxes' networks are cut from.
    pub subnet: Ipv4Addr,
    /// Run the vm tier even where the host check says it cannot (nested test harnesses).
    pub force_vm_tier: bool,
    /// Tier used when a request names none.
    pub default_isolation: Isolation,
    /// Tiers sandboxes may use at all (a tenant's own setting can narrow it further).
    pub allowed_isolation: AllowedIsolation,
    /// Directory with `vmlinux` and `rootfs.ext4` registered as template `default`.
    pub artifacts_dir: Option<PathBuf>,
    /// Largest size of a vm-tier sandbox's `console.log` (`mvm-vmm --console-limit`).
    pub console_limit: ConsoleLimit,
    /// Size of a jail-tier sandbox's writable layer, MiB (`MVM_JAIL_DISK_MIB`, default 1024).
    pub jail_disk_mib: u64,
    /// How much of a sandbox's or a client's data is held at once (exec output, bodies;
    /// `MVM_EXEC_OUTPUT_LIMIT`, ... see [`Bounds::from_env`]).
    pub bounds: Bounds,
}

impl ManagerConfig {
    /// Defaults, overridden by `MVM_STATE_DIR`, `MVM_RUN_DIR`, `MVM_BIN_DIR` (default: the
    /// directory of the running executable), `MVM_ARTIFACTS`, `MVM_ISOLATION` (vm|jail),
    /// `MVM_CGROUP_PARENT`, `MVM_VM_TIER=force`, `MVM_CONSOLE_LIMIT` (bytes, default 1 MiB) and
    /// `MVM_ALLOWED_ISOLATION` (`vm,jail`, the default, `vm` or `jail`; an invalid value
    /// allows only `vm` and says so).
    pub fn from_env() -> Self {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let bin_dir = var("MVM_BIN_DIR").unwrap_or_else(|| {
            std::env::current_exe()
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or_else(|| "/usr/local/bin".into())
        });
        let artifacts = var("MVM_ARTIFACTS").or_else(|| {
            // A development checkout: <repo>/target/<triple>/debug/mvmd → <repo>/target/mvm-artifacts.
            bin_dir
                .ancestors()
                .find(|a| a.file_name().is_some_and(|n| n == "target"))
                .map(|t| t.join("mvm-artifacts"))
                .filter(|p| p.is_dir())
                .or_else(|| Some("/var/lib/mvm/artifacts".into()))
        });
        ManagerConfig {
            state_dir: var("MVM_STATE_DIR").unwrap_or_else(|| "/var/lib/mvm".into()),
            run_dir: var("MVM_RUN_DIR").unwrap_or_else(|| "/run/mvm".into()),
            bin_dir,
            cgroup_parent: std::env::var("MVM_CGROUP_PARENT")
                .ok()
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| "mvm".into()),
            uid_base: 200_000,
            subnet: Ipv4Addr::new(10, 213, 0, 0),
            force_vm_tier: std::env::var(host::VM_TIER_ENV).is_ok_and(|v| v == "force"),
            default_isolation: std::env::var("MVM_ISOLATION")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or_default(),
            allowed_isolation: allowed_isolation_from_env(),
            artifacts_dir: artifacts,
            console_limit: vm::console_limit_from_env(),
            jail_disk_mib: rootfs::jail_disk_mib_from_env(),
            bounds: Bounds::from_env(),
        }
    }

    /// Whether `tenant` may make a sandbox of tier `tier`: the daemon's and the tenant's own
    /// settings must both allow it.
    fn check_tier_allowed(&self, tenant: &Tenant, tier: Isolation) -> Result<()> {
        if !self.allowed_isolation.allows(tier) {
            return Err(Error::Forbidden(format!(
                "the {} tier is not allowed on this host (allowed: {}); the operator sets this \
                 with mvmd --allowed-isolation or MVM_ALLOWED_ISOLATION",
                tier.as_str(),
                self.allowed_isolation
            )));
        }
        match tenant.allowed_isolation {
            Some(allowed) if !allowed.allows(tier) => Err(Error::Forbidden(format!(
                "tenant {} may not use the {} tier (allowed: {allowed}); the operator sets this \
                 with `mvmd tenant create {} --allowed-isolation TIERS`",
                tenant.name,
                tier.as_str(),
                tenant.name
            ))),
            _ => Ok(()),
        }
    }

    fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.run_dir.join("sandboxes").join(id)
    }

    fn netns(&self, id: &str) -> PathBuf {
        self.run_dir.join("netns").join(id)
    }

    fn lock_path(&self, id: &str) -> PathBuf {
        self.run_dir.join("locks").join(id)
    }

    fn jail_base(&self) -> PathBuf {
        self.run_dir.join("jail")
    }

    fn jail_root(&self, isolation: Isolation, id: &str) -> PathBuf {
        self.jail_base()
            .join(exec_name(isolation))
            .join(id)
            .join("root")
    }

    fn in_jail(&self, isolation: Isolation, id: &str, jail_path: &str) -> PathBuf {
        self.jail_root(isolation, id)
            .join(jail_path.trim_start_matches('/'))
    }

    /// The socket `jail_path` of sandbox `id`, owned by the sandbox's `uid`, reached without
    /// following any link the sandbox may have planted in its jail ([`beneath`]).
    fn jail_socket(
        &self,
        isolation: Isolation,
        id: &str,
        uid: u32,
        jail_path: &str,
    ) -> Result<beneath::JailSocket> {
        let rel = Path::new(exec_name(isolation))
            .join(id)
            .join("root")
            .join(jail_path.trim_start_matches('/'));
        beneath::JailSocket::open(&self.jail_base(), &rel, uid)
    }

    /// The jail-tier agent's socket: in the jail's `/run`, which for a template's sandbox is
    /// bound from its writable layer ([`rootfs::Overlay::run`]), where it is reached.
    fn agent_socket(&self, id: &str, uid: u32) -> Result<beneath::JailSocket> {
        let dir = self.sandbox_dir(id);
        let run = rootfs::Overlay::at(&dir).run;
        // Root's directories up to the layer's run: a sandbox cannot make or remove it.
        if run.symlink_metadata().is_ok_and(|m| m.is_dir()) {
            let rel = Path::new(rootfs::RUN_IN_SANDBOX_DIR)
                .join(AGENT_SOCKET.trim_start_matches("/run/"));
            beneath::JailSocket::open(&dir, &rel, uid)
        } else {
            self.jail_socket(Isolation::Jail, id, uid, AGENT_SOCKET)
        }
    }

    /// The console log of sandbox `id` of tier `isolation`.
    fn console(&self, isolation: Isolation, id: &str) -> console::Console {
        let dir = self.sandbox_dir(id);
        match isolation {
            Isolation::Jail => console::Console::jail(&dir),
            Isolation::Vm => console::Console::vm(&dir),
        }
    }

    /// The sandbox's uid: every process of slot `slot` runs as `uid_base + slot`.
    fn uid(&self, row: &SandboxRow) -> u32 {
        self.uid_base + row.slot
    }
}

/// The tiers allowed by `MVM_ALLOWED_ISOLATION`: both when unset; an invalid value fails
/// closed to the vm tier alone, with a warning.
fn allowed_isolation_from_env() -> AllowedIsolation {
    match std::env::var("MVM_ALLOWED_ISOLATION") {
        Ok(v) if !v.is_empty() => v.parse().unwrap_or_else(|e| {
            tracing::warn!("MVM_ALLOWED_ISOLATION: {e}; allowing only the vm tier");
            AllowedIsolation {
                vm: true,
                jail: false,
            }
        }),
        _ => AllowedIsolation::default(),
    }
}

/// The pty an exec asks for: none, `tty_size`, or 24x80.
fn pty_size(req: &ExecRequest) -> Result<Option<(u16, u16)>> {
    match (req.tty, req.tty_size) {
        (true, None) => Ok(Some((24, 80))),
        (true, Some(TtySize { rows, cols })) if rows > 0 && cols > 0 => Ok(Some((rows, cols))),
        (true, Some(_)) => Err(Error::Invalid(
            "tty_size: rows and cols must be at least 1".into(),
        )),
        (false, Some(_)) => Err(Error::Invalid("tty_size needs \"tty\": true".into())),
        (false, None) => Ok(None),
    }
}

/// Longest path a unix socket may have (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Refuses a run directory so deep that the sandboxes' sockets (agent, VMM API, vsock) would
/// not fit in a unix socket address.
fn check_socket_paths(cfg: &ManagerConfig) -> Result<()> {
    let sample_id = "0".repeat(12);
    let longest = [
        cfg.in_jail(Isolation::Jail, &sample_id, AGENT_SOCKET),
        cfg.in_jail(Isolation::Vm, &sample_id, vm::API_SOCK),
        cfg.in_jail(Isolation::Vm, &sample_id, vm::VSOCK_SOCK),
    ]
    .into_iter()
    .max_by_key(|p| p.as_os_str().len())
    .unwrap_or_default();
    if longest.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(Error::Invalid(format!(
            "run directory {} is too deep: sandbox sockets such as {} ({} bytes) would exceed \
             the {MAX_SOCKET_PATH}-byte limit of unix socket paths; set MVM_RUN_DIR to a shorter path",
            cfg.run_dir.display(),
            longest.display(),
            longest.as_os_str().len()
        )));
    }
    Ok(())
}

fn exec_name(isolation: Isolation) -> &'static str {
    match isolation {
        Isolation::Jail => "mvm-agent",
        Isolation::Vm => "mvm-vmm",
    }
}

/// What a container runtime asks of a sandbox besides its [`CreateSandbox`].
#[derive(Debug, Clone, Default)]
pub struct ContainerSandbox {
    /// The container's root file system on the host, made by the runtime's snapshotter.
    pub rootfs: PathBuf,
    /// The sandbox is a pod's (vm tier): it can take the pod's further containers with
    /// [`Manager::add_container`].
    pub pod: bool,
    /// The pod's network namespace (made by the runtime's CNI plugins) to join instead of
    /// one of the manager's.
    pub netns: Option<PathBuf>,
}

/// The pod network namespace a sandbox joined, if any.
fn pod_netns_of(s: &Sandbox) -> Option<PathBuf> {
    s.network.netns.as_ref().map(PathBuf::from)
}

/// A sandbox this manager runs: its agent connection and, if this process started it, the
/// jailer child.
#[derive(Default)]
struct Live {
    agent: tokio::sync::Mutex<Option<AgentClient>>,
    child: Mutex<Option<tokio::process::Child>>,
    /// The containers in a pod sandbox's drive slots.
    pod: tokio::sync::Mutex<pod::Slots>,
}

struct Inner {
    cfg: ManagerConfig,
    db: Db,
    live: Mutex<HashMap<String, Arc<Live>>>,
    metrics: Metrics,
}

/// The sandbox manager. Cheap to clone.
#[derive(Clone)]
pub struct Manager {
    inner: Arc<Inner>,
}

/// What [`Manager::open`] found and did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Reconciled {
    /// Live sandboxes adopted.
    pub adopted: Vec<String>,
    /// Dead or half-made sandboxes removed.
    pub cleaned: Vec<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::host("a host task panicked", e))?
}

impl Manager {
    /// Opens the state, registers the `default` template when the artifacts exist, and
    /// reconciles: live sandboxes are adopted, dead and half-made ones (and anything of ours on
    /// the host without a state row) are removed.
    pub async fn open(cfg: ManagerConfig) -> Result<(Manager, Reconciled)> {
        check_socket_paths(&cfg)?;
        if !cfg.allowed_isolation.allows(cfg.default_isolation) {
            return Err(Error::Invalid(format!(
                "the default isolation {} is not among the allowed tiers ({}): name an allowed \
                 one with --isolation or MVM_ISOLATION",
                cfg.default_isolation.as_str(),
                cfg.allowed_isolation
            )));
        }
        // mvm's own: no other local user reads anything below them (the database with every
        // sandbox's env and the audit log, writable layers, consoles, jails).
        for dir in [&cfg.state_dir, &cfg.run_dir] {
            std::fs::create_dir_all(dir)
                .and_then(|()| {
                    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                })
                .map_err(|e| Error::host(format!("creating {}", dir.display()), e))?;
        }
        let db = Db::open(&cfg.state_dir.join("mvm.db"))?;
        if let Some(art) = &cfg.artifacts_dir {
            // The jail tier needs only the base image; a missing kernel fails vm creates clearly.
            let kernel = ["vmlinux", "bzImage"]
                .iter()
                .map(|k| art.join(k))
                .find(|p| p.is_file())
                .unwrap_or_else(|| art.join("vmlinux"));
            let rootfs = art.join("rootfs.ext4");
            if rootfs.is_file() && !db.templates()?.iter().any(|t| t.name == DEFAULT_TEMPLATE) {
                db.put_template(&Template {
                    name: DEFAULT_TEMPLATE.into(),
                    kernel: kernel.display().to_string(),
                    rootfs: rootfs.display().to_string(),
                })?;
            }
        }
        let manager = Manager {
            inner: Arc::new(Inner {
                cfg,
                db,
                live: Mutex::new(HashMap::new()),
                metrics: Metrics::default(),
            }),
        };
        let reconciled = manager.reconcile().await?;
        Ok((manager, reconciled))
    }

    /// The configuration.
    pub fn config(&self) -> &ManagerConfig {
        &self.inner.cfg
    }

    /// The state database.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Why the vm tier cannot run here, if it cannot.
    pub fn vm_tier_unavailable(&self) -> Option<String> {
        host::vm_tier_unavailable(self.inner.cfg.force_vm_tier)
    }

    async fn reconcile(&self) -> Result<Reconciled> {
        let cfg = &self.inner.cfg;
        let mut out = Reconciled::default();
        let rows = self.inner.db.sandboxes(None)?;
        for row in &rows {
            let s = &row.sandbox;
            if BusyLock::held_elsewhere(&cfg.lock_path(&s.id)) {
                // Another manager (e.g. a concurrent daemonless `mvm run`) is creating or
                // destroying it right now.
                continue;
            }
            let alive = !host::cgroup_pids(&cfg.cgroup_parent, &s.id).is_empty();
            // A sandbox whose processes live stays, even if its agent does not answer now (a
            // loaded host): destroying it is its owner's call.
            let adopt = alive && matches!(s.state, SandboxState::Running | SandboxState::Paused);
            if adopt {
                if s.state == SandboxState::Running
                    && !tokio::time::timeout(Duration::from_secs(3), self.connect_agent(row))
                        .await
                        .is_ok_and(|r| r.is_ok())
                {
                    tracing::warn!(id = %s.id, "reconcile: adopted a sandbox whose agent does not answer");
                }
                lock(&self.inner.live).insert(s.id.clone(), Arc::new(Live::default()));
                out.adopted.push(s.id.clone());
                continue;
            }
            // Torn down under its lock, and only if its row is still what was seen: another
            // manager may be destroying it, or have finished creating it, right now.
            let _busy = match BusyLock::acquire(&cfg.lock_path(&s.id)) {
                Ok(busy) => busy,
                Err(Error::Conflict(_)) => continue,
                Err(e) => return Err(e),
            };
            if self.inner.db.sandbox(&s.id)?.map(|r| r.sandbox.state) != Some(s.state) {
                continue;
            }
            tracing::info!(id = %s.id, state = s.state.as_str(), "reconcile: removing a dead sandbox");
            self.teardown(s.id.clone(), Some(s.isolation), pod_netns_of(s), false)
                .await?;
            self.inner.db.delete_sandbox(&s.id)?;
            self.inner
                .metrics
                .destroyed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            out.cleaned.push(s.id.clone());
        }
        let bases = cfg.state_dir.join("bases");
        let keep: Vec<PathBuf> = self
            .inner
            .db
            .templates()?
            .iter()
            .filter_map(|t| rootfs::base_path(&bases, Path::new(&t.rootfs)).ok())
            .collect();
        for old in rootfs::gc_bases(&bases, &keep) {
            tracing::info!(base = %old.display(), "removed an unused unpacked base image");
        }
        // Anything of ours on the host that has no row: a crash between teardown and delete,
        // or state removed by hand.
        // Rows read again: another manager may have created sandboxes meanwhile.
        let rows = self.inner.db.sandboxes(None)?;
        let known: Vec<&str> = rows.iter().map(|r| r.sandbox.id.as_str()).collect();
        for id in self.host_ids() {
            if known.contains(&id.as_str()) {
                continue;
            }
            // Under its lock, and only if it still has no row: a manager creating it holds the
            // lock until its row exists.
            let _busy = match BusyLock::acquire(&cfg.lock_path(&id)) {
                Ok(busy) => busy,
                Err(Error::Conflict(_)) => continue,
                Err(e) => return Err(e),
            };
            if self.inner.db.sandbox(&id)?.is_some() {
                continue;
            }
            tracing::info!(%id, "reconcile: removing leftovers without a state row");
            self.teardown(id.clone(), None, None, false).await?;
            out.cleaned.push(id);
        }
        Ok(out)
    }

    /// Ids of sandboxes with anything under the run dir: directories, namespaces, locks, jails.
    /// (Cgroups are not scanned: another manager may share the parent; a sandbox's cgroups
    /// always go before its directories, so an orphan always has a directory.)
    fn host_ids(&self) -> Vec<String> {
        let cfg = &self.inner.cfg;
        let mut dirs = vec![
            cfg.run_dir.join("sandboxes"),
            cfg.netns(""),
            cfg.lock_path(""),
        ];
        for iso in [Isolation::Jail, Isolation::Vm] {
            dirs.push(cfg.jail_base().join(exec_name(iso)));
        }
        let mut ids: Vec<String> = dirs
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| is_sandbox_id(n))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    fn template(&self, name: &str) -> Result<Template> {
        self.inner
            .db
            .templates()?
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no template {name:?}; list them with `mvm templates`, build one with `mvm build`"
                ))
            })
    }

    /// The template `name` (default: [`DEFAULT_TEMPLATE`]).
    fn requested_template(&self, name: Option<String>) -> Result<Template> {
        let name = name.unwrap_or_else(|| DEFAULT_TEMPLATE.into());
        db::validate_name("template", &name)?;
        self.template(&name)
    }

    /// Checks a create request and fills in the defaults; `userland` replaces the template's
    /// file system.
    fn plan(
        &self,
        tenant: &Tenant,
        req: CreateSandbox,
        userland: Option<PathBuf>,
    ) -> Result<(Sandbox, Userland)> {
        let isolation = req.isolation.unwrap_or(self.inner.cfg.default_isolation);
        self.inner.cfg.check_tier_allowed(tenant, isolation)?;
        if isolation == Isolation::Vm {
            if let Some(why) = self.vm_tier_unavailable() {
                return Err(Error::TierUnavailable(format!(
                    "{why}. Use the jail tier instead: `mvm run --isolation jail ...` or \"isolation\": \"jail\" \
                     (set {}=force only in a nested harness where KVM does work)",
                    host::VM_TIER_ENV
                )));
            }
        }
        let vcpus = req.vcpus.unwrap_or(1);
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(Error::Invalid(format!(
                "vcpus must be 1 to {MAX_VCPUS}, got {vcpus}"
            )));
        }
        let memory_mib = req.memory_mib.unwrap_or(256);
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&memory_mib) {
            return Err(Error::Invalid(format!(
                "memory_mib must be {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB}, got {memory_mib}"
            )));
        }
        let timeout_s = req.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S);
        if timeout_s > MAX_TIMEOUT_S {
            return Err(Error::Invalid(format!(
                "timeout_s must be at most {MAX_TIMEOUT_S}, got {timeout_s}"
            )));
        }
        validate_env(&req.env)?;
        for (k, v) in &req.metadata {
            if k.is_empty() || k.len() > 128 || v.len() > 4096 {
                return Err(Error::Invalid(format!(
                    "metadata key {k:?}: keys must be 1-128 bytes, values at most 4096"
                )));
            }
        }
        let network = net::validate(&req.network.unwrap_or_default())?;
        let (template_name, userland) = match userland {
            Some(dir) if !dir.is_absolute() || !dir.is_dir() => {
                return Err(Error::Invalid(format!(
                    "userland {} must be an absolute path to a directory",
                    dir.display()
                )))
            }
            Some(dir) if isolation == Isolation::Jail => {
                (dir.display().to_string(), Userland::Dir(dir))
            }
            Some(dir) => (
                dir.display().to_string(),
                Userland::DiskFromDir {
                    template: self.requested_template(req.template)?,
                    dir,
                },
            ),
            None => {
                let template = self.requested_template(req.template)?;
                (template.name.clone(), Userland::Template(template))
            }
        };
        let now = db::now();
        let sandbox = Sandbox {
            id: db::random_hex(6)?,
            tenant: tenant.name.clone(),
            state: SandboxState::Creating,
            isolation,
            template: template_name,
            vcpus,
            memory_mib,
            timeout_s,
            expires_at: (timeout_s > 0).then(|| now + timeout_s as i64),
            created_at: now,
            env: req.env,
            network: crate::model::NetworkInfo {
                egress: network.egress,
                allow: network.allow,
                address: None,
                gateway: None,
                netns: None,
            },
            metadata: req.metadata,
        };
        Ok((sandbox, userland))
    }

    /// Creates a sandbox for `tenant` and waits until its agent answers.
    pub async fn create(&self, tenant: &Tenant, req: CreateSandbox) -> Result<Sandbox> {
        self.create_in(tenant, req, None).await
    }

    /// Creates a sandbox for a container runtime's container, whose file system is the host
    /// directory `container.rootfs` (made by the runtime's snapshotter) instead of a
    /// template's; its `template` field is that path. In the jail tier the directory is bound
    /// read-write into the jail (top-level directories but /dev, /proc, /run and /sys); in the
    /// vm tier the template (`req.template` or the default) boots the guest and its agent, and
    /// the guest's root is a writable ext4 disk made from a copy of the directory, so writes
    /// in the guest do not reach the host directory.
    pub async fn create_for_container(
        &self,
        tenant: &Tenant,
        req: CreateSandbox,
        container: ContainerSandbox,
    ) -> Result<Sandbox> {
        self.create_in(tenant, req, Some(container)).await
    }

    async fn create_in(
        &self,
        tenant: &Tenant,
        req: CreateSandbox,
        container: Option<ContainerSandbox>,
    ) -> Result<Sandbox> {
        let started = Instant::now();
        let (userland, container_slots, pod_netns) = match container {
            Some(c) => (
                Some(c.rootfs),
                if c.pod { vm::POD_SLOTS } else { 0 },
                c.netns,
            ),
            None => (None, 0, None),
        };
        let (sandbox, template) = self.plan(tenant, req, userland)?;
        if container_slots > 0 && sandbox.isolation != Isolation::Vm {
            return Err(Error::Invalid(
                "only a vm-tier sandbox holds the containers of a pod".into(),
            ));
        }
        // Taken before the row exists, so that another manager's reconciliation never sees
        // the row unlocked and removes it as dead; held until the sandbox is ready or rolled
        // back; the kernel drops it if we die.
        let _busy = BusyLock::acquire(&self.inner.cfg.lock_path(&sandbox.id))?;
        let slot = self.inner.db.insert_sandbox(&sandbox, &tenant.quota)?;
        let mut row = SandboxRow {
            sandbox,
            slot,
            pid: 0,
        };
        match self
            .build(&mut row, &template, container_slots, pod_netns)
            .await
        {
            Ok(()) => {
                self.inner.metrics.create_seconds.observe(started.elapsed());
                self.inner
                    .metrics
                    .created
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(row.sandbox)
            }
            Err(e) => {
                self.inner
                    .metrics
                    .create_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let id = row.sandbox.id.clone();
                lock(&self.inner.live).remove(&id);
                if let Err(undo) = self
                    .teardown(
                        id.clone(),
                        Some(row.sandbox.isolation),
                        pod_netns_of(&row.sandbox),
                        false,
                    )
                    .await
                {
                    tracing::error!(%id, "rollback of a failed create: {undo}");
                    return Err(Error::Host(format!(
                        "{e}; rolling back also failed: {undo}"
                    )));
                }
                self.inner.db.delete_sandbox(&id)?;
                Err(e)
            }
        }
    }

    async fn build(
        &self,
        row: &mut SandboxRow,
        userland: &Userland,
        container_slots: u8,
        pod_netns: Option<PathBuf>,
    ) -> Result<()> {
        let cfg = self.inner.cfg.clone();
        let s = row.sandbox.clone();
        let uid = cfg.uid(row);
        let addrs = net::Addresses::of(cfg.subnet, row.slot);
        let spec = NetworkSpec {
            egress: s.network.egress,
            allow: s.network.allow.clone(),
        };
        let guest_root = match userland {
            Userland::DiskFromDir { .. } => vm::GuestRoot::Disk,
            Userland::Template(_) | Userland::Dir(_) => vm::GuestRoot::Overlay,
        };
        let userland = userland.clone();
        // Steps 2-4 on a blocking thread: namespaces, mounts and the jailer spawn.
        let started = Instant::now();
        let (network, uplink, child) = blocking(move || {
            let (network, uplink) = match &pod_netns {
                Some(ns) => {
                    let (info, uplink) = net::join_pod_netns(ns, s.isolation, uid)?;
                    (info, Some(uplink))
                }
                None => {
                    std::fs::create_dir_all(cfg.netns(""))
                        .map_err(|e| Error::host("creating the netns dir", e))?;
                    let info =
                        net::create(&cfg.netns(&s.id), &s.id, &spec, s.isolation, addrs, uid)?;
                    (info, None)
                }
            };
            let spawned = spawn_jail(
                &cfg,
                &s,
                uid,
                &userland,
                container_slots,
                pod_netns.as_deref(),
            );
            if spawned.is_err() && s.isolation == Isolation::Vm {
                // The teardown after a failed create does not know of the pod's namespace yet.
                if let Some(ns) = &pod_netns {
                    let _ = net::leave_pod_netns(ns);
                }
            }
            Ok((network, uplink, spawned?))
        })
        .await?;
        row.sandbox.network = network;
        row.pid = child.id().unwrap_or(0);
        let live = Arc::new(Live::default());
        *lock(&live.child) = Some(child);
        live.pod.lock().await.capacity = container_slots;
        lock(&self.inner.live).insert(row.sandbox.id.clone(), Arc::clone(&live));
        self.inner.db.update_sandbox(row)?;
        let spawned = started.elapsed();
        // Step 5: the agent.
        let client = match row.sandbox.isolation {
            Isolation::Jail => self.wait_jail_agent(row, &live).await?,
            Isolation::Vm => {
                let s = &row.sandbox;
                let cfg = &self.inner.cfg;
                let api = || cfg.jail_socket(Isolation::Vm, &s.id, uid, vm::API_SOCK);
                // The socket file appears at bind(), before listen(): wait until it accepts.
                self.wait_for(&live, s, VM_READY_TIMEOUT, || {
                    api().is_ok_and(|api| {
                        std::os::unix::net::UnixStream::connect(api.path()).is_ok()
                    })
                })
                .await?;
                let api = api()?;
                let ip = match &uplink {
                    Some(uplink) => Some(uplink.guest_ip()),
                    None => s.network.address.as_ref().map(|a| {
                        format!(
                            "{a}/30,{}",
                            s.network.gateway.as_deref().unwrap_or_default()
                        )
                    }),
                };
                vm::configure_and_start(
                    &api.path(),
                    &vm::VmSpec {
                        id: &s.id,
                        vcpus: s.vcpus as u8,
                        memory_mib: s.memory_mib,
                        ip,
                        root: guest_root,
                        container_slots,
                        guest_mac: uplink.map(|u| u.mac),
                    },
                )
                .await?;
                self.wait_agent(&live, row, VM_READY_TIMEOUT).await?
            }
        };
        *live.agent.lock().await = Some(client);
        tracing::debug!(id = %row.sandbox.id, ?spawned, ready = ?started.elapsed(), "sandbox built");
        row.sandbox.state = SandboxState::Running;
        self.inner.db.update_sandbox(row)?;
        Ok(())
    }

    async fn wait_jail_agent(&self, row: &SandboxRow, live: &Live) -> Result<AgentClient> {
        let cfg = &self.inner.cfg;
        let id = &row.sandbox.id;
        self.wait_for(live, &row.sandbox, JAIL_READY_TIMEOUT, || {
            cfg.agent_socket(id, cfg.uid(row)).is_ok()
        })
        .await?;
        let dev = cfg.in_jail(Isolation::Jail, id, "/dev");
        for (name, major, minor) in JAIL_DEVICES {
            make_device(&dev.join(name), major, minor)?;
        }
        // The jailer makes these for a VMM; sandboxed programs get neither.
        for node in ["kvm", "net/tun"] {
            let path = dev.join(node);
            std::fs::remove_file(&path)
                .map_err(|e| Error::host(format!("removing {}", path.display()), e))?;
        }
        self.wait_agent(live, row, JAIL_READY_TIMEOUT).await
    }

    /// Polls `ready` until it holds, failing early when the jailer exits.
    async fn wait_for(
        &self,
        live: &Live,
        s: &Sandbox,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(200);
        while !ready() {
            if let Some(status) = exited(live) {
                return Err(Error::Host(format!(
                    "the sandbox exited during start-up ({status}); its console said: {}",
                    self.console_tail(s, 2000)
                )));
            }
            if Instant::now() > deadline {
                return Err(Error::Host(format!(
                    "the sandbox did not come up within {timeout:?}; its console said: {}",
                    self.console_tail(s, 2000)
                )));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(1));
        }
        Ok(())
    }

    async fn wait_agent(
        &self,
        live: &Live,
        row: &SandboxRow,
        timeout: Duration,
    ) -> Result<AgentClient> {
        let s = &row.sandbox;
        let deadline = Instant::now() + timeout;
        loop {
            match self.connect_agent(row).await {
                Ok(c) => return Ok(c),
                Err(e) => {
                    if let Some(status) = exited(live) {
                        return Err(Error::Host(format!(
                            "the sandbox exited during start-up ({status}); its console said: {}",
                            self.console_tail(s, 2000)
                        )));
                    }
                    if Instant::now() > deadline {
                        return Err(Error::Host(format!(
                            "the sandbox agent did not come up within {timeout:?} (last attempt: {e}); its console said: {}",
                            self.console_tail(s, 2000)
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }

    /// Connects to the sandbox's agent: its unix socket (jail tier) or the VMM's hybrid vsock
    /// socket (vm tier), each reached without following the sandbox's links.
    async fn connect_agent(&self, row: &SandboxRow) -> Result<AgentClient> {
        let cfg = &self.inner.cfg;
        let (isolation, id) = (row.sandbox.isolation, &row.sandbox.id);
        let uid = cfg.uid(row);
        Ok(match isolation {
            Isolation::Jail => {
                let socket = cfg.agent_socket(id, uid)?;
                AgentClient::connect_unix(socket.path()).await?
            }
            Isolation::Vm => {
                let socket = cfg.jail_socket(isolation, id, uid, vm::VSOCK_SOCK)?;
                AgentClient::connect_hybrid_vsock(
                    socket.path(),
                    agent::protocol::DEFAULT_VSOCK_PORT,
                )
                .await?
            }
        })
    }

    /// The VMM API socket of vm-tier sandbox `row`, reached without following its links.
    fn vmm_api(&self, row: &SandboxRow) -> Result<beneath::JailSocket> {
        let cfg = &self.inner.cfg;
        cfg.jail_socket(Isolation::Vm, &row.sandbox.id, cfg.uid(row), vm::API_SOCK)
    }

    fn console_tail(&self, s: &Sandbox, max: usize) -> String {
        let log =
            std::fs::read(self.inner.cfg.console(s.isolation, &s.id).path()).unwrap_or_default();
        let tail = &log[log.len().saturating_sub(max)..];
        let text = String::from_utf8_lossy(tail).trim().to_owned();
        if text.is_empty() {
            "(nothing)".into()
        } else {
            text
        }
    }

    /// Removes everything sandbox `id` may have on the host, in reverse creation order:
    /// processes, jail directory and cgroups, writable layer, network namespace. Idempotent.
    /// `started`: the sandbox had finished starting (all its processes are in its cgroups).
    async fn teardown(
        &self,
        id: String,
        isolation: Option<Isolation>,
        pod_netns: Option<PathBuf>,
        started: bool,
    ) -> Result<()> {
        let child = lock(&self.inner.live)
            .get(&id)
            .and_then(|l| lock(&l.child).take());
        let (parent, killed) = (self.inner.cfg.cgroup_parent.clone(), id.clone());
        let jailer = child
            .as_ref()
            .filter(|_| started)
            .and_then(|c| c.id())
            .map(|p| p as i32);
        blocking(move || host::kill_all(&parent, &killed, jailer)).await?;
        if let Some(mut child) = child {
            // Already killed with the rest; reap it.
            let _ = child.kill().await;
        }
        let cfg = self.inner.cfg.clone();
        blocking(move || {
            let tiers = match isolation {
                Some(i) => vec![i],
                None => vec![Isolation::Jail, Isolation::Vm],
            };
            for iso in tiers {
                jailer::cleanup(&CleanupConfig {
                    id: id.clone(),
                    exec_file_name: exec_name(iso).into(),
                    chroot_base_dir: cfg.jail_base(),
                    parent_cgroup: cfg.cgroup_parent.clone(),
                })
                .map_err(|e| Error::host(format!("removing the jail of {id}"), e))?;
            }
            let dir = cfg.sandbox_dir(&id);
            rootfs::Overlay::at(&dir).unmount()?;
            console::Console::jail(&dir).unmount()?;
            host::remove_tree(&dir)?;
            match pod_netns {
                // The pod's namespace is the runtime's: only the VM's tap and redirect go.
                Some(ns) if isolation == Some(Isolation::Vm) => net::leave_pod_netns(&ns)?,
                Some(_) => {}
                None => net::destroy(&cfg.netns(&id), &id)?,
            }
            // A crashed manager's stale lock (a live holder removes its own on drop).
            match std::fs::remove_file(cfg.lock_path(&id)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::host(format!("removing the lock of {id}"), e))
                }
                _ => Ok(()),
            }
        })
        .await
    }

    fn row(&self, tenant: &str, id: &str) -> Result<SandboxRow> {
        match self.inner.db.sandbox(id)? {
            Some(row) if row.sandbox.tenant == tenant => Ok(row),
            _ => Err(Error::NotFound(format!("no sandbox {id:?}"))),
        }
    }

    /// One sandbox of `tenant`.
    pub fn get(&self, tenant: &str, id: &str) -> Result<Sandbox> {
        Ok(self.row(tenant, id)?.sandbox)
    }

    /// The sandboxes of `tenant` (all tenants with `None`).
    pub fn list(&self, tenant: Option<&str>) -> Result<Vec<Sandbox>> {
        Ok(self
            .inner
            .db
            .sandboxes(tenant)?
            .into_iter()
            .map(|r| r.sandbox)
            .collect())
    }

    /// Destroys a sandbox of `tenant`.
    pub async fn destroy(&self, tenant: &str, id: &str) -> Result<()> {
        let mut row = self.row(tenant, id)?;
        match row.sandbox.state {
            SandboxState::Creating => {
                return Err(Error::Conflict(format!(
                    "sandbox {id} is still being created; retry shortly"
                )))
            }
            SandboxState::Stopping => {
                return Err(Error::Conflict(format!(
                    "sandbox {id} is already being destroyed"
                )))
            }
            _ => {}
        }
        let _busy = BusyLock::acquire(&self.inner.cfg.lock_path(id))?;
        row.sandbox.state = SandboxState::Stopping;
        self.inner.db.update_sandbox(&row)?;
        let live = lock(&self.inner.live).get(id).cloned();
        if let Some(live) = &live {
            live.agent.lock().await.take();
        }
        let result = self
            .teardown(
                id.to_owned(),
                Some(row.sandbox.isolation),
                pod_netns_of(&row.sandbox),
                true,
            )
            .await;
        lock(&self.inner.live).remove(id);
        result?;
        self.inner.db.delete_sandbox(id)?;
        self.inner
            .metrics
            .destroyed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Extends a sandbox's life by `timeout_s` (default: its own timeout) from now.
    pub fn keepalive(&self, tenant: &str, id: &str, timeout_s: Option<u64>) -> Result<Sandbox> {
        let mut row = self.row(tenant, id)?;
        let t = timeout_s.unwrap_or(row.sandbox.timeout_s);
        if t > MAX_TIMEOUT_S {
            return Err(Error::Invalid(format!(
                "timeout_s must be at most {MAX_TIMEOUT_S}, got {t}"
            )));
        }
        row.sandbox.timeout_s = t;
        row.sandbox.expires_at = (t > 0).then(|| db::now() + t as i64);
        self.inner.db.update_sandbox(&row)?;
        Ok(row.sandbox)
    }

    /// Destroys every sandbox whose timeout has passed; returns their ids.
    pub async fn reap_expired(&self) -> Result<Vec<String>> {
        let now = db::now();
        let mut reaped = Vec::new();
        for row in self.inner.db.sandboxes(None)? {
            let s = &row.sandbox;
            let due = s.expires_at.is_some_and(|t| t <= now);
            if due && matches!(s.state, SandboxState::Running | SandboxState::Paused) {
                match self.destroy(&s.tenant, &s.id).await {
                    Ok(()) => {
                        let _ = self.inner.db.audit(
                            &s.tenant,
                            "expire",
                            &s.id,
                            200,
                            "timeout_s passed",
                        );
                        reaped.push(s.id.clone());
                    }
                    Err(e) => tracing::warn!(id = %s.id, "destroying an expired sandbox: {e}"),
                }
            }
        }
        Ok(reaped)
    }

    /// The agent of a running sandbox, connecting (again) when needed.
    pub async fn agent(&self, tenant: &str, id: &str) -> Result<AgentClient> {
        let row = self.row(tenant, id)?;
        match row.sandbox.state {
            SandboxState::Running => {}
            SandboxState::Paused => {
                return Err(Error::Conflict(format!(
                    "sandbox {id} is paused; resume it first"
                )))
            }
            other => {
                return Err(Error::Conflict(format!(
                    "sandbox {id} is {}",
                    other.as_str()
                )))
            }
        }
        let live = self.live(id);
        let mut agent = live.agent.lock().await;
        if let Some(c) = agent.as_ref() {
            return Ok(c.clone());
        }
        let c = self.connect_agent(&row).await?;
        *agent = Some(c.clone());
        Ok(c)
    }

    /// The run-time state of sandbox `id`, made empty when this manager has none yet (an
    /// adopted sandbox).
    fn live(&self, id: &str) -> Arc<Live> {
        lock(&self.inner.live)
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(Live::default()))
            .clone()
    }

    /// Forgets a broken agent connection so the next call reconnects.
    async fn drop_agent(&self, id: &str) {
        let live = lock(&self.inner.live).get(id).cloned();
        if let Some(live) = live {
            live.agent.lock().await.take();
        }
    }

    /// Starts an exec; stdin is always a pipe (closed at once when the caller has none).
    pub async fn start_exec(
        &self,
        tenant: &str,
        id: &str,
        req: &ExecRequest,
    ) -> Result<agent::ExecSession> {
        if req.cmd.is_empty() || req.cmd[0].is_empty() {
            return Err(Error::Invalid(
                "cmd must name a program: [\"program\", \"arg\", ...]".into(),
            ));
        }
        validate_env(&req.env)?;
        let sandbox = self.get(tenant, id)?;
        let mut er = agent::ExecRequest::new(req.cmd.clone());
        for (k, v) in sandbox.env.iter().chain(&req.env) {
            er = er.env(k.clone(), v.clone());
        }
        if let Some(cwd) = &req.cwd {
            er = er.cwd(cwd.clone());
        }
        if let Some((rows, cols)) = pty_size(req)? {
            er = er.pty(rows, cols);
        }
        er.stdin = true;
        er.timeout_ms = req.timeout_s.map(|s| s.saturating_mul(1000));
        let client = self.agent(tenant, id).await?;
        self.inner
            .metrics
            .execs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match client.exec(er.clone()).await {
            Ok(session) => Ok(session),
            Err(agent::ClientError::Disconnected(_)) => {
                // A stale connection (e.g. the sandbox was resumed or adopted): once more.
                self.drop_agent(id).await;
                Ok(self.agent(tenant, id).await?.exec(er).await?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Runs a command to completion and returns its output: at most `bounds.exec_output`
    /// bytes of each stream, the rest drained and discarded (the process runs on as into a
    /// pipe, not killed) and flagged `*_truncated`. Stdin is fed while the output is read, so
    /// a process echoing a large stdin does not stall.
    pub async fn exec(&self, tenant: &str, id: &str, req: &ExecRequest) -> Result<ExecResult> {
        let mut session = self.start_exec(tenant, id, req).await?;
        let stdin = session.stdin.take();
        let feed = async {
            match stdin {
                Some(s) => s.feed(req.stdin.as_deref().unwrap_or("").as_bytes()).await,
                None => Ok(()),
            }
        };
        let limit = self.inner.cfg.bounds.exec_output;
        let (fed, out) = tokio::join!(feed, session.wait_with_output_limited(limit));
        let out = out?;
        fed?;
        let text = |bytes: Vec<u8>| {
            String::from_utf8(bytes)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        };
        Ok(ExecResult {
            exit: out.status.into(),
            stdout: text(out.stdout),
            stderr: text(out.stderr),
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
        })
    }

    /// Freezes (`true`) or thaws a sandbox.
    pub async fn set_paused(&self, tenant: &str, id: &str, paused: bool) -> Result<Sandbox> {
        let mut row = self.row(tenant, id)?;
        let (from, to) = if paused {
            (SandboxState::Running, SandboxState::Paused)
        } else {
            (SandboxState::Paused, SandboxState::Running)
        };
        if row.sandbox.state != from {
            return Err(Error::Conflict(format!(
                "sandbox {id} is {}; only a {} sandbox can be {}",
                row.sandbox.state.as_str(),
                from.as_str(),
                if paused { "paused" } else { "resumed" }
            )));
        }
        match row.sandbox.isolation {
            Isolation::Jail => {
                let parent = self.inner.cfg.cgroup_parent.clone();
                let id = id.to_owned();
                blocking(move || host::set_frozen(&parent, &id, paused)).await?
            }
            Isolation::Vm => vm::set_paused(&self.vmm_api(&row)?.path(), paused).await?,
        }
        row.sandbox.state = to;
        self.inner.db.update_sandbox(&row)?;
        Ok(row.sandbox)
    }

    /// Changes the memory limit and CPU quota of a running or paused sandbox: its cgroups at
    /// once, and the stored `memory_mib` (rounded up to MiB) and `vcpus` (the quota in cores,
    /// rounded up) within the tenant's quota. In the vm tier the CPU quota applies to the VMM's
    /// cgroup and the stored vCPUs stay the guest's; the guest's memory is fixed at boot, so a
    /// memory limit other than the current one is refused.
    pub async fn update_limits(
        &self,
        tenant: &str,
        id: &str,
        update: LimitsUpdate,
    ) -> Result<Sandbox> {
        let mut row = self.row(tenant, id)?;
        let s = &row.sandbox;
        if !matches!(s.state, SandboxState::Running | SandboxState::Paused) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is {}; only a running or paused sandbox's limits can change",
                s.state.as_str()
            )));
        }
        let memory = update
            .memory_bytes
            .map(|bytes| memory_change(s, bytes))
            .transpose()?
            .flatten();
        let parent = self.inner.cfg.cgroup_parent.clone();
        let sandbox = id.to_owned();
        let cgroups = blocking(move || host::LimitCgroups::of(&parent, &sandbox)).await?;
        // The new CFS limit, and the current one to put back should the memory limit fail.
        let (cpu, previous_cpu) = if update.cpu_quota_us.is_some() || update.cpu_period_us.is_some()
        {
            let cg = cgroups.clone();
            let (quota, period) = blocking(move || cg.cpu_quota()).await?;
            let new_quota = update.cpu_quota_us.or(quota).ok_or_else(|| {
                Error::Invalid(format!(
                    "sandbox {id} has no CPU quota to keep with a new period; give a quota too"
                ))
            })?;
            let new = validate_cpu_quota(host::CpuQuota {
                quota_us: new_quota,
                period_us: update.cpu_period_us.unwrap_or(period),
            })?;
            let previous = quota.map(|quota_us| host::CpuQuota {
                quota_us,
                period_us: period,
            });
            (Some(new), previous)
        } else {
            (None, None)
        };
        let resized = {
            let mut s = row.sandbox.clone();
            if s.isolation == Isolation::Jail {
                if let Some(bytes) = memory {
                    s.memory_mib = bytes.div_ceil(1 << 20);
                }
                if let Some(q) = cpu {
                    s.vcpus = q.quota_us.div_ceil(q.period_us) as u32;
                }
            }
            s
        };
        let quota = self
            .inner
            .db
            .tenant(tenant)?
            .ok_or_else(|| Error::NotFound(format!("no tenant {tenant:?}")))?
            .quota;
        // Stored (and checked against the quota) first; put back if the cgroups refuse.
        let resize = resized != row.sandbox;
        if resize {
            self.inner.db.resize_sandbox(&resized, Some(&quota))?;
        }
        let applied = blocking(move || {
            if let Some(q) = cpu {
                cgroups.set_cpu_quota(q)?;
            }
            if let Some(bytes) = memory {
                if let Err(e) = cgroups.set_memory_limit(bytes) {
                    if let Some(previous) = previous_cpu {
                        if let Err(undo) = cgroups.set_cpu_quota(previous) {
                            tracing::error!("putting the CPU quota back: {undo}");
                        }
                    }
                    return Err(e);
                }
            }
            Ok(())
        })
        .await;
        if let Err(e) = applied {
            if resize {
                self.inner.db.resize_sandbox(&row.sandbox, None)?;
            }
            return Err(e);
        }
        row.sandbox = resized;
        Ok(row.sandbox)
    }

    /// The cgroups holding sandbox `id`'s limits, e.g. to watch its OOM kills
    /// ([`host::LimitCgroups::oom_kills`]) without a look-up each time.
    pub fn limit_cgroups(&self, tenant: &str, id: &str) -> Result<host::LimitCgroups> {
        self.row(tenant, id)?;
        host::LimitCgroups::of(&self.inner.cfg.cgroup_parent, id)
    }

    /// The sandbox's console: the agent's log (and in the vm tier the guest kernel's), plus
    /// the jailer's and VMM's messages. At most the last MiB.
    pub fn logs(&self, tenant: &str, id: &str) -> Result<Vec<u8>> {
        let row = self.row(tenant, id)?;
        let path = self.inner.cfg.console(row.sandbox.isolation, id).path();
        let mut f = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::host(format!("reading {}", path.display()), e)),
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        use std::io::{Read, Seek};
        let _ = f.seek(std::io::SeekFrom::Start(len.saturating_sub(MAX_LOG_BYTES)));
        let mut buf = Vec::new();
        f.read_to_end(&mut buf)
            .map_err(|e| Error::host(format!("reading {}", path.display()), e))?;
        Ok(buf)
    }

    /// CPU, memory and process count of a sandbox.
    pub fn stats(&self, tenant: &str, id: &str) -> Result<SandboxStats> {
        self.row(tenant, id)?;
        let (cpu_ns, memory_bytes, pids) = host::cgroup_usage(&self.inner.cfg.cgroup_parent, id);
        Ok(SandboxStats {
            id: id.to_owned(),
            cpu_ns,
            memory_bytes,
            pids,
        })
    }

    /// The Prometheus exposition of the manager: of tenant `scope`'s sandboxes only, or of
    /// every sandbox plus the daemon-wide counters with `None`.
    pub fn render_metrics(&self, scope: Option<&str>) -> Result<String> {
        let rows = self.inner.db.sandboxes(scope)?;
        let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
        for st in [
            SandboxState::Creating,
            SandboxState::Running,
            SandboxState::Paused,
            SandboxState::Stopping,
        ] {
            by_state.insert(st.as_str(), 0);
        }
        let mut per_sandbox = Vec::new();
        for r in &rows {
            *by_state.entry(r.sandbox.state.as_str()).or_default() += 1;
            let (cpu, mem, _) = host::cgroup_usage(&self.inner.cfg.cgroup_parent, &r.sandbox.id);
            per_sandbox.push((
                r.sandbox.id.clone(),
                r.sandbox.tenant.clone(),
                r.sandbox.isolation.as_str(),
                cpu,
                mem,
            ));
        }
        Ok(self.inner.metrics.render(&Snapshot {
            by_state: by_state.into_iter().collect(),
            per_sandbox,
            daemon_wide: scope.is_none(),
        }))
    }

    /// Registered templates.
    pub fn templates(&self) -> Result<Vec<Template>> {
        self.inner.db.templates()
    }

    /// Registers a template after checking its files.
    pub fn add_template(&self, t: Template) -> Result<Template> {
        db::validate_name("template", &t.name)?;
        for (what, path) in [("kernel", &t.kernel), ("rootfs", &t.rootfs)] {
            let p = Path::new(path);
            if !p.is_absolute() || !p.is_file() {
                return Err(Error::Invalid(format!(
                    "{what} {path:?} must be an absolute path to an existing file"
                )));
            }
        }
        self.inner.db.put_template(&t)?;
        Ok(t)
    }
}

/// New resource limits for a live sandbox ([`Manager::update_limits`]); `None` keeps a value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitsUpdate {
    /// Memory limit of the sandbox's cgroup, bytes (16 MiB to 64 GiB; jail tier).
    pub memory_bytes: Option<u64>,
    /// CPU time per CFS period, µs (at least 1000, at most 32 periods).
    pub cpu_quota_us: Option<u64>,
    /// CFS period, µs (1000 to 1000000).
    pub cpu_period_us: Option<u64>,
}

/// The memory limit to write for a request of `bytes` on sandbox `s`: checked against the
/// sandbox bounds; `None` in the vm tier, where only the current size is accepted.
fn memory_change(s: &Sandbox, bytes: u64) -> Result<Option<u64>> {
    if !(MIN_MEMORY_MIB << 20..=MAX_MEMORY_MIB << 20).contains(&bytes) {
        return Err(Error::Invalid(format!(
            "memory limit must be {MIN_MEMORY_MIB} MiB to {MAX_MEMORY_MIB} MiB, got {bytes} bytes"
        )));
    }
    match s.isolation {
        Isolation::Jail => Ok(Some(bytes)),
        Isolation::Vm if bytes.div_ceil(1 << 20) == s.memory_mib => Ok(None),
        Isolation::Vm => Err(Error::Invalid(format!(
            "sandbox {} is in the vm tier, whose guest memory ({} MiB) is fixed when the \
             micro-VM boots: mvm-vmm has no balloon or memory hot-plug device, so it can neither \
             grow nor shrink; make a new sandbox with the memory it needs (CPU quota changes do \
             work)",
            s.id, s.memory_mib
        ))),
    }
}

/// Checks a CFS limit against the kernel's bounds and the sandbox's 32-core ceiling.
fn validate_cpu_quota(q: host::CpuQuota) -> Result<host::CpuQuota> {
    if !(1_000..=1_000_000).contains(&q.period_us) {
        return Err(Error::Invalid(format!(
            "CPU period must be 1000 to 1000000 µs, got {}",
            q.period_us
        )));
    }
    if q.quota_us < 1_000 || q.quota_us.div_ceil(q.period_us) > u64::from(MAX_VCPUS) {
        return Err(Error::Invalid(format!(
            "CPU quota must be at least 1000 µs and at most {MAX_VCPUS} periods ({} µs), got {}",
            u64::from(MAX_VCPUS) * q.period_us,
            q.quota_us
        )));
    }
    Ok(q)
}

/// Where a sandbox's file system comes from.
#[derive(Clone)]
enum Userland {
    /// A registered template's image.
    Template(Template),
    /// A host directory (jail tier).
    Dir(PathBuf),
    /// The template's kernel and agent, with a disk made from a host directory as the root
    /// (vm tier).
    DiskFromDir {
        /// Boots the guest.
        template: Template,
        /// Content of the root disk.
        dir: PathBuf,
    },
}

/// An exclusive flock on `<run>/locks/<id>` marking a sandbox as being created or destroyed by
/// a live manager, so that another manager's reconciliation leaves it alone. Released (and the
/// file removed) on drop, or by the kernel when the holder dies.
struct BusyLock {
    /// Holds the lock while open.
    _file: std::fs::File,
    path: PathBuf,
}

impl BusyLock {
    /// Takes the lock at `path`, or fails with a conflict when a live process holds it. The
    /// file appears at `path` already locked (made aside, locked, then linked in), so nobody
    /// ever finds it there unlocked; a file left by a dead holder is taken over.
    fn acquire(path: &Path) -> Result<BusyLock> {
        use std::os::unix::fs::MetadataExt;
        static STAGED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::host(format!("creating {}", dir.display()), e))?;
        let conflict = || {
            Error::Conflict(format!(
                "sandbox {} is being created or destroyed by another mvm process",
                path.file_name().unwrap_or_default().to_string_lossy()
            ))
        };
        // A name no sandbox id matches, unique to this process and call.
        let staged = dir.join(format!(
            ".lock-{}-{}",
            std::process::id(),
            STAGED.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let fresh = std::fs::File::create(&staged)
            .map_err(|e| Error::host(format!("creating {}", staged.display()), e))?;
        let taken = (|| loop {
            if try_flock_exclusive(&fresh)? {
                match std::fs::hard_link(&staged, path) {
                    Ok(()) => return Ok(fresh),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(Error::host(format!("creating {}", path.display()), e)),
                }
            }
            // A file is there: a live holder's, or a dead one's to take over.
            let Ok(existing) = std::fs::File::open(path) else {
                continue; // Gone meanwhile: link ours.
            };
            if !try_flock_exclusive(&existing)? {
                return Err(conflict());
            }
            // Ours only while it is still the file at `path` (its holder may have removed it
            // just before we locked it).
            let locked = existing
                .metadata()
                .map_err(|e| Error::host(format!("stat {}", path.display()), e))?;
            match std::fs::metadata(path) {
                Ok(now) if now.dev() == locked.dev() && now.ino() == locked.ino() => {
                    return Ok(existing)
                }
                _ => continue,
            }
        })();
        let _ = std::fs::remove_file(&staged);
        Ok(BusyLock {
            _file: taken?,
            path: path.to_path_buf(),
        })
    }

    /// Whether a live process holds the lock at `path` (a lock file is never there
    /// unlocked but for a dead holder's).
    fn held_elsewhere(path: &Path) -> bool {
        let Ok(file) = std::fs::File::open(path) else {
            return false;
        };
        // SAFETY: flock on an fd we own; a shared probe that is released right away.
        let fd = std::os::fd::AsRawFd::as_raw_fd(&file);
        if unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) } == -1 {
            return true;
        }
        // SAFETY: as above.
        unsafe { libc::flock(fd, libc::LOCK_UN) };
        false
    }
}

/// `flock(LOCK_EX | LOCK_NB)` on `file`: whether it was taken.
fn try_flock_exclusive(file: &std::fs::File) -> Result<bool> {
    // SAFETY: flock on an fd we own.
    if unsafe {
        libc::flock(
            std::os::fd::AsRawFd::as_raw_fd(file),
            libc::LOCK_EX | libc::LOCK_NB,
        )
    } == 0
    {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(Error::host("flock", e)),
    }
}

impl Drop for BusyLock {
    fn drop(&mut self) {
        // Closing the file right after this releases the lock.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The jailer child's exit status, once it has exited.
fn exited(live: &Live) -> Option<std::process::ExitStatus> {
    lock(&live.child)
        .as_mut()
        .and_then(|c| c.try_wait().ok().flatten())
}

fn validate_env(env: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(Error::Invalid(format!(
                "environment variable {k:?}: names must be non-empty without '=' or NUL, values without NUL"
            )));
        }
    }
    Ok(())
}

/// Sandbox ids are 12 lowercase hex digits.
fn is_sandbox_id(s: &str) -> bool {
    s.len() == 12
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn make_device(path: &Path, major: u32, minor: u32) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid(format!("path {} contains NUL", path.display())))?;
    // SAFETY: `c` is a NUL-terminated path; mknod does not keep it.
    let ret = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFCHR | 0o666,
            libc::makedev(major, minor),
        )
    };
    if ret == -1 {
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(Error::host(format!("mknod {}", path.display()), e));
        }
    }
    // The umask filtered the mode.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .map_err(|e| Error::host(format!("chmod {}", path.display()), e))
}

/// The jail every sandbox gets: its namespaces, and cgroups on this host's version holding
/// `memory_bytes`, the sandbox's vCPUs as CPU quota and a pids limit.
fn base_jail(
    cfg: &ManagerConfig,
    s: &Sandbox,
    uid: u32,
    exec: PathBuf,
    memory_bytes: u64,
) -> Result<JailConfig> {
    let cgroups = host::CgroupMode::host()?;
    let mut j = JailConfig::new(s.id.clone(), exec, uid, uid);
    j.chroot_base_dir = cfg.jail_base();
    j.netns = Some(cfg.netns(&s.id));
    j.new_pid_ns = true;
    j.cgroup_version = cgroups.version();
    j.cgroups = cgroups.sandbox_settings(s.vcpus, memory_bytes);
    j.parent_cgroup = cfg.cgroup_parent.clone();
    Ok(j)
}

/// The jail of the jail tier: mvm-agent on a unix socket, the directories of `tree` (the
/// overlay, or a caller's userland) bound in. Its programs run on the host kernel, so they get
/// the jailer's `sandbox` seccomp policy and, where the kernel has Landlock, may write only
/// beneath those directories and the jail's /run.
fn jail_config(
    cfg: &ManagerConfig,
    s: &Sandbox,
    uid: u32,
    tree: &Path,
    run: Option<&Path>,
) -> Result<JailConfig> {
    let mut j = base_jail(
        cfg,
        s,
        uid,
        cfg.bin_dir.join("mvm-agent"),
        s.memory_mib << 20,
    )?;
    j.mount_proc = true;
    // Ptys for `tty` execs, from a devpts instance of the jail's own.
    j.mount_devpts = true;
    let run = run.map(|r| (r.to_owned(), PathBuf::from(jailer::RUN_DIR)));
    j.mounts = rootfs::jail_mounts(tree)?
        .into_iter()
        .chain(run)
        .map(|(host, jail)| BindMount {
            host,
            jail,
            read_only: false,
        })
        .collect();
    j.landlock = true;
    j.landlock_write = j
        .mounts
        .iter()
        .map(|m| m.jail.clone())
        .chain([PathBuf::from(jailer::RUN_DIR)])
        .collect();
    // /run is one of the mounts when bound from the layer.
    j.landlock_write.sort();
    j.landlock_write.dedup();
    j.seccomp = Some(SeccompPolicy::Sandbox);
    j.args = vec!["--listen".into(), format!("unix:{AGENT_SOCKET}").into()];
    Ok(j)
}

/// Steps 3-4 of a create: the sandbox's directory, its userland and jail, and the jailer
/// process, whose output goes to the console log. Joins `pod_netns` instead of the
/// manager's own namespace for the sandbox when given.
fn spawn_jail(
    cfg: &ManagerConfig,
    s: &Sandbox,
    uid: u32,
    userland: &Userland,
    container_slots: u8,
    pod_netns: Option<&Path>,
) -> Result<tokio::process::Child> {
    let dir = cfg.sandbox_dir(&s.id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::host(format!("creating {}", dir.display()), e))?;
    let mut jail = match userland {
        Userland::Template(template) if s.isolation == Isolation::Jail => {
            let base =
                rootfs::base_tree(&cfg.state_dir.join("bases"), Path::new(&template.rootfs))?;
            let overlay = rootfs::Overlay::at(&dir);
            overlay.mount(&base, uid, cfg.jail_disk_mib)?;
            jail_config(cfg, s, uid, &overlay.merged, Some(&overlay.run))?
        }
        Userland::Template(template) => {
            vm_jail_config(cfg, s, uid, template, &dir, None, container_slots)?
        }
        Userland::Dir(tree) => jail_config(cfg, s, uid, tree, None)?,
        Userland::DiskFromDir {
            template,
            dir: tree,
        } => vm_jail_config(cfg, s, uid, template, &dir, Some(tree), container_slots)?,
    };
    if let Some(ns) = pod_netns {
        jail.netns = Some(ns.to_owned());
    }
    let console = match s.isolation {
        Isolation::Jail => console::Console::jail(&dir).create_bounded(cfg.console_limit)?,
        Isolation::Vm => console::Console::vm(&dir).create()?,
    };
    let mut cmd = tokio::process::Command::from(jail.command(cfg.bin_dir.join("mvm-jailer")));
    cmd.stdin(std::process::Stdio::null())
        .stdout(
            console
                .try_clone()
                .map_err(|e| Error::host("console log", e))?,
        )
        .stderr(console);
    cmd.spawn().map_err(|e| {
        Error::host(
            format!("starting {}", cfg.bin_dir.join("mvm-jailer").display()),
            format!("{e} (set MVM_BIN_DIR to the directory of mvm-jailer, mvm-agent and mvm-vmm)"),
        )
    })
}

/// The jail of the vm tier: mvm-vmm booting template `t`, with the kernel, the base image and
/// the writable disk bound in. The disk is made in `dir`: blank (the overlay upper layer) or,
/// with `root_content`, a copy of that directory (the guest's root). With `container_slots`,
/// the directory of a pod's container images is bound in too.
fn vm_jail_config(
    cfg: &ManagerConfig,
    s: &Sandbox,
    uid: u32,
    t: &Template,
    dir: &Path,
    root_content: Option<&Path>,
    container_slots: u8,
) -> Result<JailConfig> {
    if !Path::new(&t.kernel).is_file() {
        return Err(Error::Invalid(format!(
            "template {} has no kernel at {}; build it with `mvm build` (guest-kernel/build.sh)",
            t.name, t.kernel
        )));
    }
    let layer = dir.join("layer.ext4");
    rootfs::make_layer(&layer, uid, root_content)?;
    // Guest memory plus the VMM's own.
    let mut j = base_jail(
        cfg,
        s,
        uid,
        cfg.bin_dir.join("mvm-vmm"),
        (s.memory_mib + 128) << 20,
    )?;
    j.mounts = vec![
        BindMount {
            host: t.kernel.clone().into(),
            jail: vm::KERNEL.into(),
            read_only: true,
        },
        BindMount {
            host: t.rootfs.clone().into(),
            jail: vm::ROOTFS.into(),
            read_only: true,
        },
        BindMount {
            host: layer,
            jail: vm::LAYER.into(),
            read_only: false,
        },
    ];
    if container_slots > 0 {
        j.mounts.push(BindMount {
            host: pod::container_dir(dir, uid, container_slots)?,
            jail: vm::CONTAINER_DIR.into(),
            read_only: false,
        });
    }
    j.args = vm::vmm_args(&s.id, cfg.console_limit);
    Ok(j)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_locks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("locks/0123456789ab");
        let held = BusyLock::acquire(&path).unwrap();
        assert!(BusyLock::held_elsewhere(&path));
        let err = BusyLock::acquire(&path)
            .err()
            .expect("a held lock is refused");
        assert!(matches!(err, Error::Conflict(_)), "{err}");
        drop(held);
        assert!(!path.exists(), "the holder removes its file");
        // A dead holder's file is taken over.
        std::fs::write(&path, "").unwrap();
        assert!(!BusyLock::held_elsewhere(&path));
        let taken = BusyLock::acquire(&path).unwrap();
        assert!(BusyLock::held_elsewhere(&path));
        drop(taken);
        // Nothing staged is left behind.
        let left: Vec<_> = std::fs::read_dir(dir.path().join("locks"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn sandbox_ids() {
        assert!(is_sandbox_id("0123456789ab"));
        assert!(!is_sandbox_id("0123456789aB"));
        assert!(!is_sandbox_id("mvm"));
    }

    #[test]
    fn pty_sizes() {
        let req = |tty, tty_size| ExecRequest {
            tty,
            tty_size,
            ..ExecRequest::default()
        };
        let size = |rows, cols| Some(TtySize { rows, cols });
        assert_eq!(pty_size(&req(false, None)).unwrap(), None);
        assert_eq!(pty_size(&req(true, None)).unwrap(), Some((24, 80)));
        assert_eq!(pty_size(&req(true, size(17, 91))).unwrap(), Some((17, 91)));
        for bad in [
            req(true, size(0, 80)),
            req(true, size(24, 0)),
            req(false, size(24, 80)),
        ] {
            assert!(pty_size(&bad).unwrap_err().to_string().contains("tty_size"));
        }
    }

    #[test]
    fn deep_run_dirs_are_refused() {
        let mut cfg = ManagerConfig::from_env();
        cfg.run_dir = "/run/mvm".into();
        assert!(check_socket_paths(&cfg).is_ok());
        cfg.run_dir = PathBuf::from("/run").join("d".repeat(60));
        let err = check_socket_paths(&cfg).unwrap_err().to_string();
        assert!(err.contains("MVM_RUN_DIR") && err.contains("107"), "{err}");
    }

    #[test]
    fn cpu_quota_bounds() {
        let q = |quota_us, period_us| {
            validate_cpu_quota(host::CpuQuota {
                quota_us,
                period_us,
            })
        };
        assert!(q(50_000, 100_000).is_ok());
        assert!(q(1_000, 1_000).is_ok());
        assert!(q(32_000_000, 1_000_000).is_ok());
        let err = q(32_000_001, 1_000_000).unwrap_err().to_string();
        assert!(err.contains("32000000"), "{err}");
        assert!(q(999, 100_000).is_err());
        assert!(q(50_000, 999).is_err());
        assert!(q(50_000, 1_000_001).is_err());
    }

    #[test]
    fn memory_changes_by_tier() {
        let mut s = Sandbox {
            id: "0123456789ab".into(),
            tenant: "t".into(),
            state: SandboxState::Running,
            isolation: Isolation::Jail,
            template: DEFAULT_TEMPLATE.into(),
            vcpus: 1,
            memory_mib: 256,
            timeout_s: 0,
            expires_at: None,
            created_at: 0,
            env: BTreeMap::new(),
            network: crate::model::NetworkInfo {
                egress: crate::model::Egress::default(),
                allow: Vec::new(),
                address: None,
                gateway: None,
                netns: None,
            },
            metadata: BTreeMap::new(),
        };
        assert_eq!(memory_change(&s, 100 << 20).unwrap(), Some(100 << 20));
        assert!(memory_change(&s, (16 << 20) - 1).is_err());
        assert!(memory_change(&s, (65536 << 20) + 1).is_err());
        s.isolation = Isolation::Vm;
        // The current size is no change; anything else is refused, saying why.
        assert_eq!(memory_change(&s, 256 << 20).unwrap(), None);
        assert_eq!(memory_change(&s, (255 << 20) + 1).unwrap(), None);
        let err = memory_change(&s, 512 << 20).unwrap_err().to_string();
        assert!(err.contains("vm tier") && err.contains("balloon"), "{err}");
    }

    #[test]
    fn env_validation() {
        let env = |k: &str| BTreeMap::from([(k.to_owned(), "v".to_owned())]);
        assert!(validate_env(&env("A_B")).is_ok());
        assert!(validate_env(&env("")).is_err());
        assert!(validate_env(&env("A=B")).is_err());
    }
}
