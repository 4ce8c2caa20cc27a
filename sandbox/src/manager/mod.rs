//! The sandbox manager: the one place that knows a sandbox's whole life.
//!
//! Create, in order: id and state row (quota checked in the same transaction) → network
//! namespace (veth, tap, nftables egress policy) → writable layer over the shared base →
//! `mvm-jailer` wrapping `mvm-agent` (jail tier) or `mvm-vmm` (vm tier, booting from the config
//! file bound into its jail) → wait for the agent (unix socket / hybrid vsock) → ready. A failure at any step
//! runs [`Manager`]'s idempotent teardown, which removes every step's product in reverse order
//! and tolerates missing pieces — the same code that destroys sandboxes and cleans up after a
//! daemon killed mid-create.
//!
//! This module is the façade: [`ManagerConfig`], [`Manager`] and the public types. Each verb
//! extends `Manager` in a file of its own: `create` (plan, build, the waits, the jailer's
//! spawn), `teardown` (teardown, destroy), `lifecycle` (keepalive, what a timeout does, the
//! resume on demand), `reconcile`, `exec` (the agent and commands), `limits` (pause, live
//! limits, stats), `templates` (and their warm-up),
//! `fork` (live fork; the saved VMs of both are `snapshot`'s), `save` (a sandbox saved to
//! disk and resumed), `sandbox_snapshot` (a sandbox's VM kept for new sandboxes) and `pod`; `tier` is the
//! one place that knows how the tiers differ (`tier/jail.rs`, `tier/vm.rs`: jail specs, start,
//! agent connection, pause, memory), `lock` holds the sandboxes' busy locks, `cgroups` their
//! cgroups and `host` the rest of the host plumbing (mounts, processes, commands).

mod beneath;
pub mod cgroups;
mod console;
mod create;
mod exec;
mod fork;
pub(crate) mod host;
mod lifecycle;
mod limits;
mod lock;
pub mod net;
mod network;
mod pod;
mod pool;
mod port_proxy;
pub use port_proxy::ProxiedStream;
mod reconcile;
pub mod rootfs;
mod sandbox_snapshot;
mod save;
mod snapshot;
mod teardown;
mod templates;
mod tier;
mod usage;

pub use fork::MAX_FORK_CHILDREN;
pub use host::{jailer_pids, vm_tier_unavailable};
pub use limits::LimitsUpdate;
pub use pool::POOL_TENANT;
pub use usage::SAMPLE_EVERY;

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use agent::AgentClient;
use vmm::devices::legacy::console::ConsoleLimit;

use crate::bounds::Bounds;
use crate::db::{Db, SandboxRow, Tenant};
use crate::error::{Error, Result};
use crate::metrics::{Metrics, Snapshot};
use crate::model::{AllowedIsolation, Isolation, Sandbox, SandboxState, Template};

use tier::{exec_name, vm};

/// Most sandboxes one manager runs at once (slots of its /16 network, /29 each).
pub const MAX_SLOTS: u32 = 8192;
/// The agent's socket inside a jail.
const AGENT_SOCKET: &str = "/run/agent.sock";

/// vCPUs (vm tier) or cores of CPU quota (jail tier) of a sandbox whose create names none.
const DEFAULT_VCPUS: u32 = 1;
/// Memory of a sandbox whose create names none, MiB.
const DEFAULT_MEMORY_MIB: u64 = 256;
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
    /// Upstream DNS servers of the resolvers of sandboxes with egress `allow`
    /// (`ADDR[:PORT],...`; `mvmd --dns-upstream`, `MVM_DNS_UPSTREAM`); none: the host's
    /// `/etc/resolv.conf`.
    pub dns_upstream: Option<String>,
    /// A CA file the hosts of sandboxes' secrets may chain to besides the host's roots
    /// (`mvmd --egress-ca`, `MVM_EGRESS_CA`).
    pub egress_ca: Option<PathBuf>,
    /// How much of a sandbox's or a client's data is held at once (exec output, bodies;
    /// `MVM_EXEC_OUTPUT_LIMIT`, ... see [`Bounds::from_env`]).
    pub bounds: Bounds,
    /// Sandboxes kept restored from each warm snapshot (a template's, per size it was warmed
    /// at) for creates of its size to take
    /// (`mvmd --warm-pool`, `MVM_WARM_POOL`, default 0; kept only where the API is served:
    /// [`Manager::start_pools`]).
    pub warm_pool: u32,
    /// VMMs kept started without a VM (jailed, networked) per warm snapshot, into which the
    /// children of forks of its template's sandboxes of its size load their source (`mvmd --fork-pool`,
    /// `MVM_FORK_POOL`, default 0; kept with the warm pool).
    pub fork_pool: u32,
}

impl ManagerConfig {
    /// Defaults, overridden by `MVM_STATE_DIR`, `MVM_RUN_DIR`, `MVM_BIN_DIR` (default: next to
    /// the running executable, else its prefix's libexec/mvm: [`crate::install::helper_dir`]),
    /// `MVM_ARTIFACTS`, `MVM_ISOLATION` (vm|jail),
    /// `MVM_CGROUP_PARENT`, `MVM_VM_TIER=force`, `MVM_CONSOLE_LIMIT` (bytes, default 1 MiB) and
    /// `MVM_ALLOWED_ISOLATION` (`vm,jail`, the default, `vm` or `jail`; an invalid value
    /// allows only `vm` and says so).
    pub fn from_env() -> Self {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        let bin_dir = crate::install::helper_dir();
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
            console_limit: console::console_limit_from_env(),
            jail_disk_mib: rootfs::jail_disk_mib_from_env(),
            bounds: Bounds::from_env(),
            dns_upstream: std::env::var("MVM_DNS_UPSTREAM")
                .ok()
                .filter(|v| !v.trim().is_empty()),
            egress_ca: var("MVM_EGRESS_CA"),
            warm_pool: pool_size_from_env("MVM_WARM_POOL"),
            fork_pool: pool_size_from_env("MVM_FORK_POOL"),
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

    /// The console log of sandbox `id` of tier `isolation`.
    fn console(&self, isolation: Isolation, id: &str) -> console::Console {
        tier::console(isolation, &self.sandbox_dir(id))
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

/// The pool size variable `name` (`MVM_WARM_POOL`, `MVM_FORK_POOL`) asks for: none when
/// unset; an invalid value keeps none, with a warning.
fn pool_size_from_env(name: &str) -> u32 {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().unwrap_or_else(|e| {
            tracing::warn!("{name}={v:?} is not a number of sandboxes ({e}); keeping none");
            0
        }),
        _ => 0,
    }
}

/// Longest path a unix socket may have (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Refuses a run directory so deep that the sandboxes' sockets (agent, VMM API, vsock) would
/// not fit in a unix socket address.
fn check_socket_paths(cfg: &ManagerConfig) -> Result<()> {
    let sample_id = &"0".repeat(12);
    let longest = Isolation::ALL
        .into_iter()
        .flat_map(|iso| {
            tier::sockets(iso)
                .iter()
                .map(move |socket| cfg.in_jail(iso, sample_id, socket))
        })
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

/// What a container runtime asks of a sandbox besides its
/// [`CreateSandbox`](crate::model::CreateSandbox).
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
    proxied: port_proxy::ProxiedShares,
    pools: pool::Pools,
    /// Each sandbox's turn to be paused, saved or resumed ([`Manager::transition`]).
    transitions: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Each running sandbox's usage over time ([`Manager::sample_usage`]).
    usage: usage::UsageHistory,
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

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
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
                    snapshot: None,
                    other_snapshots: Vec::new(),
                })?;
            }
        }
        let manager = Manager {
            inner: Arc::new(Inner {
                cfg,
                db,
                live: Mutex::new(HashMap::new()),
                metrics: Metrics::default(),
                proxied: Default::default(),
                pools: Default::default(),
                transitions: Default::default(),
                usage: Default::default(),
            }),
        };
        let reconciled = manager.reconcile().await?;
        Ok((manager, reconciled))
    }

    /// The configuration.
    pub fn config(&self) -> &ManagerConfig {
        &self.inner.cfg
    }

    /// The image cache of the state directory (shared by every tenant, like templates).
    pub fn images(&self) -> crate::image::ImageStore {
        crate::image::ImageStore::new(&self.inner.cfg.state_dir)
    }

    /// Removes image `name` from the cache ([`crate::image::ImageStore::remove`]); one that
    /// any tenant's sandbox uses is kept (409 naming the sandboxes).
    pub async fn remove_image(&self, name: &str) -> Result<crate::model::RemovedImage> {
        let (manager, name) = (self.clone(), name.to_owned());
        blocking(move || {
            manager.images().remove(&name, |digest| {
                Ok(manager
                    .image_users()?
                    .filter(|(_, used)| used == digest)
                    .map(|(id, _)| id)
                    .collect())
            })
        })
        .await
    }

    /// Removes every image of the cache that no sandbox uses (see
    /// [`ImageStore::prune`](crate::image::ImageStore::prune)).
    pub async fn prune_images(&self) -> Result<crate::model::PrunedImages> {
        let manager = self.clone();
        blocking(move || {
            manager
                .images()
                .prune(|| Ok(manager.image_users()?.map(|(_, digest)| digest).collect()))
        })
        .await
    }

    /// Each sandbox made from an image, with its image's digest.
    fn image_users(&self) -> Result<impl Iterator<Item = (String, String)>> {
        Ok(self
            .inner
            .db
            .sandboxes(None)?
            .into_iter()
            .filter_map(|r| Some((r.sandbox.id, r.sandbox.image?.digest))))
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

    fn row(&self, tenant: &str, id: &str) -> Result<SandboxRow> {
        match self.inner.db.sandbox(id)? {
            Some(row) if row.sandbox.tenant == tenant => Ok(row),
            _ => Err(Error::NotFound(format!("no sandbox {id:?}"))),
        }
    }

    /// `row` when its sandbox runs; 409 saying what it is otherwise.
    fn running(row: SandboxRow) -> Result<SandboxRow> {
        let id = &row.sandbox.id;
        match row.sandbox.state {
            SandboxState::Running => Ok(row),
            SandboxState::Paused => Err(Error::Conflict(format!(
                "sandbox {id} is paused; resume it first"
            ))),
            SandboxState::Saved => Err(Error::Conflict(format!(
                "sandbox {id} is saved to disk; resume it first"
            ))),
            other => Err(Error::Conflict(format!(
                "sandbox {id} is {}",
                other.as_str()
            ))),
        }
    }

    /// One sandbox of `tenant`.
    pub fn get(&self, tenant: &str, id: &str) -> Result<Sandbox> {
        Ok(self.row(tenant, id)?.sandbox)
    }

    /// The sandboxes of `tenant` (all tenants with `None`; the warm pool's entries are
    /// nobody's yet).
    pub fn list(&self, tenant: Option<&str>) -> Result<Vec<Sandbox>> {
        Ok(self
            .tenants_rows(tenant)?
            .into_iter()
            .map(|r| r.sandbox)
            .collect())
    }

    /// The rows of `tenant`'s sandboxes, or of every tenant's with `None` (not the warm
    /// pool's entries).
    fn tenants_rows(&self, tenant: Option<&str>) -> Result<Vec<SandboxRow>> {
        let mut rows = self.inner.db.sandboxes(tenant)?;
        rows.retain(|r| r.sandbox.tenant != pool::POOL_TENANT);
        Ok(rows)
    }

    /// The sandbox's console: the agent's log (and in the vm tier the guest kernel's), plus
    /// the jailer's and VMM's messages. At most the last MiB.
    pub fn logs(&self, tenant: &str, id: &str) -> Result<Vec<u8>> {
        let row = self.row(tenant, id)?;
        let path = match row.sandbox.state {
            SandboxState::Saved => self.saved_console(id),
            _ => None,
        }
        .unwrap_or_else(|| self.inner.cfg.console(row.sandbox.isolation, id).path());
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

    /// The Prometheus exposition of the manager: of tenant `scope`'s sandboxes only, or of
    /// every sandbox plus the daemon-wide counters with `None`.
    pub fn render_metrics(&self, scope: Option<&str>) -> Result<String> {
        let rows = self.tenants_rows(scope)?;
        let mut by_state: BTreeMap<&'static str, u64> = BTreeMap::new();
        for st in [
            SandboxState::Creating,
            SandboxState::Running,
            SandboxState::Paused,
            SandboxState::Saved,
            SandboxState::Stopping,
        ] {
            by_state.insert(st.as_str(), 0);
        }
        let mut per_sandbox = Vec::new();
        for r in &rows {
            *by_state.entry(r.sandbox.state.as_str()).or_default() += 1;
            let (cpu, mem, _) = cgroups::cgroup_usage(&self.inner.cfg.cgroup_parent, &r.sandbox.id);
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_run_dirs_are_refused() {
        let mut cfg = ManagerConfig::from_env();
        cfg.run_dir = "/run/mvm".into();
        check_socket_paths(&cfg).unwrap();
        cfg.run_dir = PathBuf::from("/run").join("d".repeat(60));
        let err = check_socket_paths(&cfg).unwrap_err().to_string();
        assert!(err.contains("MVM_RUN_DIR") && err.contains("107"), "{err}");
    }
}
