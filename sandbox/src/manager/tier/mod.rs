//! What differs between the isolation tiers, behind one door. Each operation here dispatches
//! once on the tier, to [`jail`] (`mvm-agent` jailed on the host kernel) or [`vm`] (`mvm-vmm`
//! booting a micro-VM from a config file, in the same jail). The rest of the manager does not
//! ask which tier a sandbox has, but for its network (`net`: a veth for a jail, a tap for a VM).
//!
//! A tier's start, in order: [`jail_spec`] prepares what the jail binds in (the jail tier's
//! overlay; the vm tier's disks and config file, or a warm template's snapshot) and describes
//! the jail; the jailer is spawned (`create`); [`Manager::await_agent`] loads the snapshot if
//! the VM restores one and waits until the agent answers (and takes the restored guest's new
//! identity).

pub(super) mod jail;
pub(super) mod vm;
mod wait;

use std::path::{Path, PathBuf};

use agent::AgentClient;
use jailer::JailConfig;
use vmm::devices::legacy::console::ConsoleLimit;

use super::{blocking, cgroups, console, Live, Manager, ManagerConfig, AGENT_SOCKET};
use crate::db::SandboxRow;
use crate::error::{Error, Result};
use crate::model::{Isolation, Sandbox, Template};

/// Where a sandbox's file system comes from.
#[derive(Clone)]
pub(super) enum Userland {
    /// A registered template's image.
    Template(Template),
    /// A host directory (jail tier).
    Dir(PathBuf),
    /// A read-only tree under a per-sandbox overlay (jail tier): an OCI image's.
    Base(PathBuf),
    /// The template's kernel and agent, with a disk made from a host directory as the root
    /// (vm tier).
    DiskFromDir {
        /// Boots the guest.
        template: Template,
        /// Content of the root disk.
        dir: PathBuf,
    },
}

/// What a start needs besides the sandbox and its userland.
pub(super) struct Start {
    /// Empty drive slots for the containers of a pod (vm tier; 0 for a plain sandbox).
    pub container_slots: u8,
    /// The guest's address and NIC (vm tier), when the sandbox has a network.
    pub guest_net: Option<vm::GuestNet>,
    /// How the VM starts (vm tier; a jail always starts [`vm::Boot::Cold`]).
    pub boot: vm::Boot,
    /// The sandbox's share of a contended CPU (vm tier: a warm pool's entry is filled in the
    /// background).
    pub share: cgroups::CpuShare,
}

/// The program a tier's jail runs, which also names the tier's directory under the jail base.
pub(super) fn exec_name(isolation: Isolation) -> &'static str {
    match isolation {
        Isolation::Jail => "mvm-agent",
        Isolation::Vm => "mvm-vmm",
    }
}

/// The console log of a sandbox of tier `isolation` whose directory is `sandbox_dir`.
pub(super) fn console(isolation: Isolation, sandbox_dir: &Path) -> console::Console {
    match isolation {
        Isolation::Jail => console::Console::jail(sandbox_dir),
        Isolation::Vm => console::Console::vm(sandbox_dir),
    }
}

/// Creates the console log of a new sandbox, which the jailer's output goes to. A jail-tier
/// agent writes its programs' output straight into the file, so it lies on a tmpfs of `limit`;
/// the VMM caps its own log (`--console-limit`).
pub(super) fn create_console(
    isolation: Isolation,
    sandbox_dir: &Path,
    limit: ConsoleLimit,
) -> Result<std::fs::File> {
    let console = console(isolation, sandbox_dir);
    match isolation {
        Isolation::Jail => console.create_bounded(limit),
        Isolation::Vm => console.create(),
    }
}

/// The sockets in a tier's jail that the manager connects to.
pub(super) fn sockets(isolation: Isolation) -> &'static [&'static str] {
    match isolation {
        Isolation::Jail => &[AGENT_SOCKET],
        Isolation::Vm => &[vm::API_SOCK, vm::VSOCK_SOCK],
    }
}

/// Whether a live change of limits is the sandbox's new size (jail tier: its cgroups are all
/// it has) or only caps the VMM's process (vm tier: vCPUs and memory are the guest's, fixed
/// at boot).
pub(super) fn limits_are_size(isolation: Isolation) -> bool {
    isolation == Isolation::Jail
}

/// Prepares what the jail of sandbox `s` binds in and describes the jail (steps 3-4 of a
/// create, on a blocking thread).
pub(super) fn jail_spec(
    cfg: &ManagerConfig,
    s: &Sandbox,
    uid: u32,
    userland: &Userland,
    start: Start,
) -> Result<JailConfig> {
    let dir = cfg.sandbox_dir(&s.id);
    match (s.isolation, userland) {
        (Isolation::Jail, Userland::Template(template)) => {
            jail::template_jail(cfg, s, uid, template, &dir)
        }
        (Isolation::Jail, Userland::Dir(tree)) => jail::jail_config(cfg, s, uid, tree, None),
        (Isolation::Jail, Userland::Base(base)) => jail::overlay_jail(cfg, s, uid, base, &dir),
        (Isolation::Vm, Userland::Template(template)) => {
            vm::vm_jail(cfg, s, uid, template, &dir, None, start)
        }
        (
            Isolation::Vm,
            Userland::DiskFromDir {
                template,
                dir: tree,
            },
        ) => vm::vm_jail(cfg, s, uid, template, &dir, Some(tree), start),
        (Isolation::Jail, Userland::DiskFromDir { .. })
        | (Isolation::Vm, Userland::Dir(_) | Userland::Base(_)) => {
            unreachable!("plan() picks the userland by tier")
        }
    }
}

/// The jail every sandbox gets: its namespaces, and cgroups on this host's version holding
/// `memory_bytes`, the sandbox's vCPUs as CPU quota, its `share` of a contended CPU and a
/// pids limit.
fn base_jail(
    cfg: &ManagerConfig,
    s: &Sandbox,
    uid: u32,
    exec: PathBuf,
    memory_bytes: u64,
    share: cgroups::CpuShare,
) -> Result<JailConfig> {
    let cgroups = cgroups::CgroupMode::host()?;
    let mut j = JailConfig::new(s.id.clone(), exec, uid, uid);
    j.chroot_base_dir = cfg.jail_base();
    j.netns = Some(cfg.netns(&s.id));
    j.new_pid_ns = true;
    j.cgroup_version = cgroups.version();
    j.cgroups = cgroups.sandbox_settings(s.vcpus, memory_bytes, share);
    j.parent_cgroup = cfg.cgroup_parent.clone();
    Ok(j)
}

impl Manager {
    /// Waits until the agent of a sandbox whose jailer was just spawned answers. A VM that
    /// restores a snapshot loads it first, and its agent then gives the guest the sandbox's
    /// own identity (`guest_net`, host name, entropy, clock) before anything runs in it.
    pub(super) async fn await_agent(
        &self,
        row: &SandboxRow,
        live: &Live,
        boot: &vm::Boot,
        guest_net: Option<&vm::GuestNet>,
    ) -> Result<AgentClient> {
        match row.sandbox.isolation {
            Isolation::Jail => self.await_jail_agent(row, live).await,
            Isolation::Vm => {
                let restore = boot.loads_snapshot();
                let started = std::time::Instant::now();
                if restore {
                    let api = self.await_vmm_api(row, live).await?;
                    let api_up = started.elapsed();
                    vm::load_snapshot(&api.path()).await?;
                    tracing::debug!(id = %row.sandbox.id, ?api_up, loaded = ?started.elapsed(), "snapshot loaded");
                }
                let becoming = restore.then_some(vm::Becoming {
                    id: &row.sandbox.id,
                    net: guest_net,
                    egress: row.sandbox.network.egress,
                    resumed: matches!(boot, vm::Boot::Resume(_)),
                });
                let client = self
                    .wait_agent(live, row, patience(row, vm::READY_TIMEOUT), becoming)
                    .await?;
                if restore {
                    tracing::debug!(id = %row.sandbox.id, reidentified = ?started.elapsed(), "restored guest reidentified");
                }
                Ok(client)
            }
        }
    }

    /// Connects to the sandbox's agent: its unix socket (jail tier) or the VMM's hybrid vsock
    /// socket (vm tier), each reached without following the sandbox's links.
    pub(super) async fn connect_agent(&self, row: &SandboxRow) -> Result<AgentClient> {
        self.connect_agent_giving(row, None).await
    }

    /// [`connect_agent`](Self::connect_agent), giving a vm-tier guest restored from a
    /// snapshot `identity` in the same exchange (one round trip fewer than after it).
    pub(super) async fn connect_agent_giving(
        &self,
        row: &SandboxRow,
        identity: Option<agent::Identity>,
    ) -> Result<AgentClient> {
        let cfg = &self.inner.cfg;
        let (id, uid) = (&row.sandbox.id, cfg.uid(row));
        Ok(match (row.sandbox.isolation, identity) {
            (Isolation::Jail, None) => {
                let socket = jail::agent_socket(cfg, id, uid)?;
                AgentClient::connect_unix(socket.path()).await?
            }
            (Isolation::Jail, Some(_)) => {
                return Err(Error::Invalid(format!(
                    "sandbox {id} is in the jail tier: only a restored VM takes a new identity"
                )))
            }
            (Isolation::Vm, identity) => {
                let socket = cfg.jail_socket(Isolation::Vm, id, uid, vm::VSOCK_SOCK)?;
                let (path, port) = (socket.path(), agent::protocol::DEFAULT_VSOCK_PORT);
                match identity {
                    Some(identity) => {
                        AgentClient::connect_hybrid_vsock_reidentified(path, port, identity).await?
                    }
                    None => AgentClient::connect_hybrid_vsock(path, port).await?,
                }
            }
        })
    }

    /// Freezes (`true`) or thaws a running sandbox: its cgroups (jail tier) or its vCPUs
    /// through the VMM's API (vm tier).
    pub(super) async fn pause_tier(&self, row: &SandboxRow, paused: bool) -> Result<()> {
        match row.sandbox.isolation {
            Isolation::Jail => {
                let parent = self.inner.cfg.cgroup_parent.clone();
                let id = row.sandbox.id.clone();
                blocking(move || cgroups::set_frozen(&parent, &id, paused)).await
            }
            Isolation::Vm => vm::set_paused(&self.vmm_api(row)?.path(), paused).await,
        }
    }
}

/// How long a start-up step of sandbox `row` may take where one a client waits for may take
/// `normal`: a pool's entry, made with what CPU live sandboxes leave idle (which a busy host
/// may leave little of for a while), may take ten times as long.
pub(super) fn patience(row: &SandboxRow, normal: std::time::Duration) -> std::time::Duration {
    match row.sandbox.tenant == super::pool::POOL_TENANT {
        true => normal * 10,
        false => normal,
    }
}

/// The memory limit to write when sandbox `s` (within the sandbox bounds) is asked for
/// `bytes`: that (jail tier), or none when it is the guest's size already (vm tier, whose
/// guest memory is fixed at boot; any other size is refused).
pub(super) fn memory_limit(s: &Sandbox, bytes: u64) -> Result<Option<u64>> {
    match s.isolation {
        Isolation::Jail => Ok(Some(bytes)),
        Isolation::Vm if bytes.div_ceil(1 << 20) == s.memory_mib => Ok(None),
        Isolation::Vm => Err(crate::error::Error::Invalid(format!(
            "sandbox {} is in the vm tier, whose guest memory ({} MiB) is fixed when the \
             micro-VM boots: mvm-vmm's balloon only gives back memory the guest frees and \
             there is no memory hot-plug, so it can neither grow nor shrink; make a new sandbox \
             with the memory it needs (CPU quota changes do work)",
            s.id, s.memory_mib
        ))),
    }
}
