//! The shim (start/delete actions) and the Task service.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ::api::db::Tenant;
use ::api::manager::cgroups::LimitCgroups;
use ::api::manager::{ContainerSandbox, LimitsUpdate};
use ::api::model::{Isolation, Sandbox};
use ::api::{Manager, ManagerConfig};
use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::event::Event;
use containerd_shim::protos::api;
use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::shim_async::Task;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;
use containerd_shim::protos::types::task::ProcessInfo;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::{convert_to_any, timestamp};
use containerd_shim::{Config, Flags, StartOpts, TtrpcResult};
use tokio::sync::{oneshot, watch, Mutex, OnceCell};

use crate::error::{Error, Result};
use crate::{io, mounts, spec};

/// Where the shims keep their sandbox managers' state, `<dir>/<namespace>/<id>`, unless
/// `MVM_SHIM_STATE_DIR` says otherwise.
const STATE_ROOT: &str = "/run/mvm-shim";
/// Parent cgroup of the shims' sandboxes, unless `MVM_CGROUP_PARENT` says otherwise.
const CGROUP_PARENT: &str = "mvm-shim";
/// The tenant of every shim sandbox.
const TENANT: &str = "containerd";
/// Exit status reported for a process whose end the shim did not see.
const UNKNOWN_EXIT: u32 = 255;
/// How often the sandbox's OOM kill counter is read.
const OOM_POLL: Duration = Duration::from_millis(100);
/// `type_url` suffix of the OCI `LinuxResources` that containerd sends in an Update.
const LINUX_RESOURCES: &str = "/LinuxResources";

/// 64-bit FNV-1a of `bytes`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// The state directory of the shim of container `id` in `namespace`: named by a hash of the
/// id, which may be 64 characters (Kubernetes), so the sandboxes' unix sockets below it stay
/// within the socket path limit.
fn state_dir(namespace: &str, id: &str) -> PathBuf {
    std::env::var_os("MVM_SHIM_STATE_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| STATE_ROOT.into())
        .join(namespace)
        .join(format!("{:016x}", fnv1a(id.as_bytes())))
}

/// A sandbox manager of its own for one shim: own state and run dirs, so shims never see
/// (or reconcile away) each other's sandboxes. The sandbox user ids are spread by a hash of
/// the directory so concurrent pods do not share one.
fn manager_config(dir: &Path) -> ManagerConfig {
    let mut cfg = ManagerConfig::from_env();
    cfg.state_dir = dir.join("state");
    cfg.run_dir = dir.join("run");
    if std::env::var_os("MVM_CGROUP_PARENT").is_none_or(|p| p.is_empty()) {
        cfg.cgroup_parent = CGROUP_PARENT.into();
    }
    let h = fnv1a(dir.as_os_str().as_encoded_bytes());
    cfg.uid_base = 300_000 + (h % 100_000) as u32 * 16;
    cfg
}

/// Opens the shim's manager and its tenant.
async fn open_manager(dir: &Path) -> Result<(Manager, Tenant)> {
    let (manager, _) = Manager::open(manager_config(dir)).await?;
    manager.db().ensure_tenant(TENANT)?;
    let tenant = manager
        .db()
        .tenant(TENANT)?
        .ok_or_else(|| Error::Host(format!("tenant {TENANT} missing from the shim's state")))?;
    Ok((manager, tenant))
}

/// Destroys every sandbox of a shim's manager, unmounts `rootfs` and removes the state dir.
async fn cleanup(dir: &Path, rootfs: Option<&Path>) -> Result<()> {
    if dir.is_dir() {
        let (manager, tenant) = open_manager(dir).await?;
        for s in manager.list(Some(&tenant.name))? {
            manager.destroy(&tenant.name, &s.id).await?;
        }
    }
    if let Some(rootfs) = rootfs {
        unmount(rootfs)?;
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(Error::host(format!("removing {}", dir.display()), e))
        }
        _ => {}
    }
    // The namespace directory goes with its last shim.
    if let Some(parent) = dir.parent() {
        let _ = std::fs::remove_dir(parent);
    }
    Ok(())
}

/// Detaches whatever is mounted on `path` (nothing mounted is fine).
fn unmount(path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::Invalid(format!("path {} contains NUL", path.display())))?;
    loop {
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) } == 0 {
            // Stacked mounts (e.g. a retried create): take them all.
            continue;
        }
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
            _ => Err(Error::host(format!("unmounting {}", path.display()), e)),
        };
    }
}

/// How a process ended.
#[derive(Clone, Copy, Debug)]
struct Exit {
    status: u32,
    at: (i64, i32),
}

impl Exit {
    fn now(status: u32) -> Exit {
        let t = timestamp().unwrap_or_default();
        Exit {
            status,
            at: (t.seconds, t.nanos),
        }
    }

    fn timestamp(&self) -> MessageField<Timestamp> {
        let mut t = Timestamp::new();
        t.seconds = self.at.0;
        t.nanos = self.at.1;
        MessageField::some(t)
    }
}

/// The stdio FIFOs of a process.
#[derive(Clone, Default)]
struct Stdio {
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
}

/// A process of the container: the init process (exec id "") or an exec.
struct Process {
    request: agent::ExecRequest,
    stdio: Stdio,
    pid: u32,
    control: Option<agent::ExecControl>,
    close_stdin: Option<oneshot::Sender<()>>,
    exit: watch::Sender<Option<Exit>>,
}

impl Process {
    fn new(request: agent::ExecRequest, stdio: Stdio) -> Process {
        Process {
            request,
            stdio,
            pid: 0,
            control: None,
            close_stdin: None,
            exit: watch::channel(None).0,
        }
    }

    fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    fn status(&self) -> api::Status {
        match (self.exited(), &self.control) {
            (Some(_), _) => api::Status::STOPPED,
            (None, Some(_)) => api::Status::RUNNING,
            (None, None) => api::Status::CREATED,
        }
    }
}

/// A container of this shim and its sandbox.
struct Container {
    id: String,
    bundle: String,
    rootfs: PathBuf,
    sandbox: Sandbox,
    /// Where a pod's further container has its root in the pod's sandbox; `None` for the
    /// container the sandbox was made for.
    root: Option<String>,
    paused: bool,
    init: Process,
    execs: HashMap<String, Process>,
    /// The sandbox's OOM kills, watched by the container the sandbox was made for.
    oom: Option<OomWatch>,
}

/// A sandbox's OOM kill reports and the task polling them while the container exists.
struct OomWatch {
    reports: Arc<OomReports>,
    task: tokio::task::AbortHandle,
}

/// The OOM kills of a container's sandbox, and how many of them containerd has heard of.
struct OomReports {
    container_id: String,
    sandbox: String,
    /// The sandbox's cgroups and their OOM kill counter as last seen (`None` until the first
    /// look); held while a report is published, so each kill is reported once.
    seen: Mutex<Option<(LimitCgroups, u64)>>,
}

impl Container {
    fn process(&mut self, exec_id: &str) -> Result<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| Error::NotFound(format!("no exec {exec_id:?} in container {}", self.id)))
    }
}

/// The shim: one per pod (or per container outside a pod).
pub struct MvmShim {
    namespace: String,
    id: String,
    /// containerd's address: with namespace and id it names this shim's socket.
    address: String,
    exit: Arc<ExitSignal>,
}

impl MvmShim {
    /// Removes this shim's socket (the containerd-shim crate leaves it behind).
    fn remove_socket(&self) {
        let address = containerd_shim::socket_address(&self.address, &self.namespace, &self.id);
        let path = address.trim_start_matches("unix://");
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                log::warn!("removing the shim socket {path}: {e}")
            }
            _ => {}
        }
    }
}

#[async_trait]
impl Shim for MvmShim {
    type T = TaskService;

    /// The reaper settings are main's: the crate reads them before calling this.
    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        MvmShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            address: args.address.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd runs this in the bundle. The containers of a pod share the shim of its
        // first container: a second spawn finds that shim's socket taken and answers with it.
        let bundle = std::env::current_dir().unwrap_or_default();
        let grouping = match spec::load(&bundle) {
            Ok(oci) => spec::shim_grouping(&oci, &opts.id),
            Err(e) => {
                log::warn!("container {}: {e}; it gets a shim of its own", opts.id);
                opts.id.clone()
            }
        };
        spawn(opts, &grouping, Vec::new()).await
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<api::DeleteResponse> {
        // containerd calls this after a shim died: remove whatever it left.
        let bundle = std::env::current_dir().unwrap_or_default();
        let oci = spec::load(&bundle).ok();
        let rootfs = oci
            .as_ref()
            .map(|s| spec::rootfs(s, &bundle))
            .unwrap_or_else(|| bundle.join("rootfs"));
        let outcome = match oci.as_ref().map(spec::pod_role) {
            // The pod's shim state goes with the pod's first container.
            Some(spec::PodRole::Member { .. }) => unmount(&rootfs),
            _ => {
                self.remove_socket();
                cleanup(&state_dir(&self.namespace, &self.id), Some(&rootfs)).await
            }
        };
        outcome.map_err(|e| containerd_shim::Error::Other(e.to_string()))?;
        let mut resp = api::DeleteResponse::new();
        resp.exit_status = 128 + libc::SIGKILL as u32;
        resp.exited_at = Exit::now(resp.exit_status).timestamp();
        Ok(resp)
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // Connected clients keep their connections; nobody new finds a dead shim.
        self.remove_socket();
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService {
            inner: Arc::new(Inner {
                namespace: self.namespace.clone(),
                dir: state_dir(&self.namespace, &self.id),
                publisher,
                exit: Arc::clone(&self.exit),
                manager: OnceCell::new(),
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }
}

struct Inner {
    namespace: String,
    dir: PathBuf,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    manager: OnceCell<(Manager, Tenant)>,
    containers: Mutex<HashMap<String, Container>>,
}

/// containerd's Task service for the containers of one pod (or one container).
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl TaskService {
    async fn manager(&self) -> Result<&(Manager, Tenant)> {
        self.inner
            .manager
            .get_or_try_init(|| open_manager(&self.inner.dir))
            .await
    }

    async fn publish(&self, topic: &str, event: Box<dyn Event>) {
        if let Err(e) = self
            .inner
            .publisher
            .publish(Context::default(), topic, &self.inner.namespace, event)
            .await
        {
            log::error!("publishing {topic}: {e}");
        }
    }

    async fn create(&self, req: &api::CreateTaskRequest) -> Result<u32> {
        let mut containers = self.inner.containers.lock().await;
        if containers.contains_key(&req.id) {
            return Err(Error::State(format!("container {} exists already", req.id)));
        }
        let bundle = PathBuf::from(&req.bundle);
        let oci = spec::load(&bundle)?;
        let (manager, tenant) = self.manager().await?;
        let isolation = spec::isolation(&oci, manager.config().default_isolation)?;
        let process = oci
            .process()
            .as_ref()
            .ok_or_else(|| Error::Invalid("the OCI spec has no process".into()))?;
        let rootfs = spec::rootfs(&oci, &bundle);
        for m in &req.rootfs {
            containerd_shim::asynchronous::util::mount_rootfs(m, &rootfs)
                .await
                .map_err(|e| {
                    Error::host(format!("mounting the rootfs at {}", rootfs.display()), e)
                })?;
        }
        // Kubernetes' /etc/hosts, secrets, volumes...: under the root before the sandbox is
        // made from it.
        match mounts::bind_spec_mounts(&oci, &rootfs) {
            Ok(skipped) if !skipped.is_empty() => log::debug!(
                "container {}: mounts the sandbox provides itself, not applied: {}",
                req.id,
                skipped.join(", ")
            ),
            Ok(_) => {}
            Err(e) => {
                if let Err(u) = unmount(&rootfs) {
                    log::error!("{u}");
                }
                return Err(e);
            }
        }
        let pod = match spec::pod_role(&oci) {
            spec::PodRole::Member { sandbox } => Some(sandbox),
            spec::PodRole::Own => None,
        };
        let joined = match pod.as_deref().map(|p| pod_sandbox(&containers, p)) {
            Some(Some(sandbox)) if sandbox.isolation == Isolation::Vm => Some(sandbox),
            // Jail-tier pods: each container in a jail of its own.
            Some(Some(_)) | None => None,
            Some(None) => {
                let _ = unmount(&rootfs);
                return Err(Error::State(format!(
                    "container {} joins pod {}, whose sandbox container this shim does not                      run",
                    req.id,
                    pod.unwrap_or_default()
                )));
            }
        };
        let tier = joined.as_ref().map_or(isolation, |s| s.isolation);
        let mut request = match spec::exec_request(process, tier, !req.stdin.is_empty()) {
            Ok(r) => r,
            Err(e) => {
                let _ = unmount(&rootfs);
                return Err(e);
            }
        };
        let made = match &joined {
            Some(sandbox) => manager
                .add_container(&tenant.name, &sandbox.id, &req.id, &rootfs)
                .await
                .map(|root| (sandbox.clone(), Some(root))),
            None => {
                let sandbox_req = spec::sandbox_request(&oci, isolation, &req.id);
                // Jail tier: the mounted snapshot is the jail's root. Vm tier: the guest's
                // root is an ext4 copy of it, made before this call returns; a pod's first
                // container gets drive slots for the others.
                let container = ContainerSandbox {
                    rootfs: rootfs.clone(),
                    pod: spec::is_pod_sandbox(&oci) && isolation == Isolation::Vm,
                    netns: spec::network_namespace(&oci),
                };
                manager
                    .create_for_container(tenant, sandbox_req, container)
                    .await
                    .map(|s| (s, None))
            }
        };
        let (sandbox, root) = match made {
            Ok(made) => made,
            Err(e) => {
                if let Err(u) = unmount(&rootfs) {
                    log::error!("{u}");
                }
                log::error!(
                    "container {}: {}-tier sandbox: {e}",
                    req.id,
                    isolation.as_str()
                );
                return Err(match e {
                    ::api::Error::TierUnavailable(why) => ::api::Error::TierUnavailable(format!(
                        "{why}. Use the jail tier: annotate the container with {}=jail, \
                             or give containerd MVM_ISOLATION=jail",
                        spec::ISOLATION_ANNOTATION
                    )),
                    e => e,
                }
                .into());
            }
        };
        match &root {
            Some(root) => log::info!(
                "container {} joins pod sandbox {} with its root at {root}",
                req.id,
                sandbox.id
            ),
            None => log::info!(
                "container {} runs in sandbox {} ({} tier)",
                req.id,
                sandbox.id,
                sandbox.isolation.as_str()
            ),
        }
        request.root = root.clone();
        let pid = self.sandbox_pid(&sandbox.id);
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut init = Process::new(request, stdio.clone());
        init.pid = pid;
        // One OOM watch per sandbox: a pod's further containers share their pod's.
        let oom = root.is_none().then(|| {
            let reports = Arc::new(OomReports {
                container_id: req.id.clone(),
                seen: Mutex::new(None),
                sandbox: sandbox.id.clone(),
            });
            OomWatch {
                task: self.watch_oom(Arc::clone(&reports)),
                reports,
            }
        });
        containers.insert(
            req.id.clone(),
            Container {
                id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs,
                sandbox,
                root,
                paused: false,
                init,
                execs: HashMap::new(),
                oom,
            },
        );
        drop(containers);
        self.publish(
            containerd_shim::protos::topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: stdio.stdin,
                    stdout: stdio.stdout,
                    stderr: stdio.stderr,
                    terminal: stdio.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(pid)
    }

    /// The host pid of the sandbox (its jailer).
    fn sandbox_pid(&self, id: &str) -> u32 {
        self.inner
            .manager
            .get()
            .and_then(|(m, _)| m.db().sandbox(id).ok().flatten())
            .map(|row| row.pid)
            .unwrap_or(0)
    }

    /// Publishes a `/tasks/oom` event when the OOM killer has struck in the sandbox since the
    /// last look (the first look only takes the count).
    async fn report_ooms(&self, oom: &OomReports) -> Result<()> {
        let mut seen = oom.seen.lock().await;
        let Some((cgroups, reported)) = seen.as_mut() else {
            let (manager, tenant) = self.manager().await?;
            let cgroups = manager.limit_cgroups(&tenant.name, &oom.sandbox)?;
            let kills = cgroups.oom_kills()?;
            *seen = Some((cgroups, kills));
            return Ok(());
        };
        let kills = cgroups.oom_kills()?;
        if kills > *reported {
            log::info!(
                "container {}: the OOM killer struck in sandbox {}",
                oom.container_id,
                oom.sandbox
            );
            self.publish(
                containerd_shim::protos::topics::TASK_OOM_EVENT_TOPIC,
                Box::new(TaskOOM {
                    container_id: oom.container_id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        }
        *reported = kills;
        Ok(())
    }

    /// Reports the sandbox's OOM kills every [`OOM_POLL`] until aborted (Delete) or the
    /// sandbox's cgroups are gone.
    fn watch_oom(&self, oom: Arc<OomReports>) -> tokio::task::AbortHandle {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(OOM_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = this.report_ooms(&oom).await {
                    log::warn!("container {}: no more OOM events: {e}", oom.container_id);
                    return;
                }
            }
        })
        .abort_handle()
    }

    async fn start(&self, id: &str, exec_id: &str) -> Result<u32> {
        let (manager, tenant) = self.manager().await?;
        let mut slot = self.inner.containers.lock().await;
        let c = container(&mut slot, id)?;
        let sandbox = c.sandbox.id.clone();
        let container_id = c.id.clone();
        let init_pid = c.init.pid;
        let oom = c.oom.as_ref().map(|w| Arc::clone(&w.reports));
        let p = c.process(exec_id)?;
        if p.control.is_some() || p.exited().is_some() {
            return Err(Error::State(format!(
                "process {exec_id:?} was already started"
            )));
        }
        let stdin = io::open_input(&p.stdio.stdin)?;
        let stdout = io::open_output(&p.stdio.stdout)?;
        let stderr = io::open_output(&p.stdio.stderr)?;
        let session = match manager.agent(&tenant.name, &sandbox).await {
            Ok(client) => client.exec(p.request.clone()).await.map_err(Error::from),
            Err(e) => Err(e.into()),
        };
        let mut session = match session {
            Ok(s) => s,
            Err(e) => {
                // It never ran: Wait and State report it as ended, and Delete can go ahead.
                p.exit.send_replace(Some(Exit::now(UNKNOWN_EXIT)));
                log::error!("starting process {exec_id:?} of container {container_id}: {e}");
                return Err(e);
            }
        };
        // The init process is known to containerd by the sandbox's host pid.
        let pid = if exec_id.is_empty() {
            init_pid
        } else {
            session.pid()
        };
        p.pid = pid;
        p.control = Some(session.control());
        if let (Some(from), Some(to)) = (stdin, session.stdin.take()) {
            let (tx, rx) = oneshot::channel();
            p.close_stdin = Some(tx);
            tokio::spawn(io::pump_input(from, to, rx));
        }
        let out = session
            .stdout
            .take()
            .map(|s| tokio::spawn(io::pump_output(s, stdout)));
        let err = session
            .stderr
            .take()
            .map(|s| tokio::spawn(io::pump_output(s, stderr)));
        let exit = p.exit.clone();
        let this = self.clone();
        let exec = exec_id.to_owned();
        tokio::spawn(async move {
            let status = match session.wait().await {
                Ok(s) => api_exit_code(s),
                Err(e) => {
                    log::error!("lost process {exec:?} of container {container_id}: {e}");
                    UNKNOWN_EXIT
                }
            };
            // All output reaches the FIFOs before containerd hears of the exit.
            for pump in [out, err].into_iter().flatten() {
                let _ = pump.await;
            }
            // An OOM kill is reported before the exit it caused.
            if let Some(oom) = &oom {
                if let Err(e) = this.report_ooms(oom).await {
                    log::debug!("OOM check at the exit of {exec:?}: {e}");
                }
            }
            let e = Exit::now(status);
            // Delete may have recorded the end already (the sandbox went first).
            if !exit.send_if_modified(|x| x.is_none() && x.replace(e).is_none()) {
                return;
            }
            this.publish(
                containerd_shim::protos::topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(TaskExit {
                    container_id: container_id.clone(),
                    id: if exec.is_empty() { container_id } else { exec },
                    pid,
                    exit_status: e.status,
                    exited_at: e.timestamp(),
                    ..Default::default()
                }),
            )
            .await;
        });
        let container_id = c.id.clone();
        drop(slot);
        if exec_id.is_empty() {
            self.publish(
                containerd_shim::protos::topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id,
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        } else {
            self.publish(
                containerd_shim::protos::topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id,
                    exec_id: exec_id.to_owned(),
                    pid,
                    ..Default::default()
                }),
            )
            .await;
        }
        Ok(pid)
    }

    /// Freezes (jail tier: the cgroup freezer) or pauses (vm tier: the vCPUs) the whole
    /// sandbox, or thaws it.
    async fn set_paused(&self, id: &str, paused: bool) -> Result<()> {
        let sandbox = {
            let mut slot = self.inner.containers.lock().await;
            own_sandbox(container(&mut slot, id)?, "paused")?
        };
        let (manager, tenant) = self.manager().await?;
        manager.set_paused(&tenant.name, &sandbox, paused).await?;
        if let Some(c) = self.inner.containers.lock().await.get_mut(id) {
            c.paused = paused;
        }
        let event: Box<dyn Event> = if paused {
            Box::new(TaskPaused {
                container_id: id.to_owned(),
                ..Default::default()
            })
        } else {
            Box::new(TaskResumed {
                container_id: id.to_owned(),
                ..Default::default()
            })
        };
        let topic = if paused {
            containerd_shim::protos::topics::TASK_PAUSED_EVENT_TOPIC
        } else {
            containerd_shim::protos::topics::TASK_RESUMED_EVENT_TOPIC
        };
        self.publish(topic, event).await;
        Ok(())
    }

    /// Applies the memory limit and CPU quota/period of an Update to the sandbox.
    async fn update(&self, req: &api::UpdateTaskRequest) -> Result<()> {
        let update = limits_update(&req.resources)?;
        let sandbox = {
            let mut slot = self.inner.containers.lock().await;
            own_sandbox(container(&mut slot, &req.id)?, "given other limits")?
        };
        let (manager, tenant) = self.manager().await?;
        let resized = manager
            .update_limits(&tenant.name, &sandbox, update)
            .await?;
        log::info!(
            "container {}: limits updated ({update:?}): sandbox {} now {} MiB, {} vCPUs",
            req.id,
            resized.id,
            resized.memory_mib,
            resized.vcpus
        );
        if let Some(c) = self.inner.containers.lock().await.get_mut(&req.id) {
            c.sandbox = resized;
        }
        Ok(())
    }

    async fn kill(&self, req: &api::KillRequest) -> Result<()> {
        let signal = i32::try_from(req.signal)
            .ok()
            .filter(|s| (1..=64).contains(s))
            .ok_or_else(|| Error::Invalid(format!("signal {} is out of range", req.signal)))?;
        let mut slot = self.inner.containers.lock().await;
        let c = container(&mut slot, &req.id)?;
        c.process(&req.exec_id)?;
        let mut ids = vec![req.exec_id.clone()];
        if req.all && req.exec_id.is_empty() {
            ids.extend(c.execs.keys().cloned());
        }
        let mut unstarted = None;
        for id in ids {
            let p = c.process(&id)?;
            match (&p.control, p.exited()) {
                (_, Some(_)) => {
                    if id == req.exec_id {
                        return Err(Error::NotFound(format!(
                            "process {id:?} has already exited"
                        )));
                    }
                }
                (Some(control), None) => {
                    if let Err(e) = control.signal(signal).await {
                        // It ended meanwhile; its exit is on its way.
                        log::debug!("signal {signal} to {id:?}: {e}");
                    }
                }
                (None, None) => {
                    // Killed before it started: it never will.
                    let e = Exit::now(128 + signal as u32);
                    p.exit.send_replace(Some(e));
                    unstarted = Some((id.clone(), p.pid, e));
                }
            }
        }
        let container_id = c.id.clone();
        drop(slot);
        if let Some((id, pid, e)) = unstarted {
            self.publish(
                containerd_shim::protos::topics::TASK_EXIT_EVENT_TOPIC,
                Box::new(TaskExit {
                    container_id: container_id.clone(),
                    id: if id.is_empty() { container_id } else { id },
                    pid,
                    exit_status: e.status,
                    exited_at: e.timestamp(),
                    ..Default::default()
                }),
            )
            .await;
        }
        Ok(())
    }

    async fn delete(&self, req: &api::DeleteRequest) -> Result<api::DeleteResponse> {
        let mut containers = self.inner.containers.lock().await;
        let c = container(&mut containers, &req.id)?;
        let mut resp = api::DeleteResponse::new();
        if !req.exec_id.is_empty() {
            let p = c.process(&req.exec_id)?;
            if p.status() == api::Status::RUNNING {
                return Err(Error::State(format!(
                    "exec {:?} is still running; kill it first",
                    req.exec_id
                )));
            }
            let e = p.exited().unwrap_or_else(|| Exit::now(0));
            resp.pid = p.pid;
            resp.exit_status = e.status;
            resp.exited_at = e.timestamp();
            c.execs.remove(&req.exec_id);
            return Ok(resp);
        }
        let (manager, tenant) = self.manager().await?;
        match &c.root {
            Some(_) => {
                // A pod's further container: its processes go, the pod's sandbox stays.
                for p in std::iter::once(&c.init).chain(c.execs.values()) {
                    if let (Some(control), None) = (&p.control, p.exited()) {
                        if let Err(e) = control.signal(libc::SIGKILL).await {
                            log::debug!("container {}: SIGKILL: {e}", c.id);
                        }
                    }
                }
                match manager
                    .remove_container(&tenant.name, &c.sandbox.id, &c.id)
                    .await
                {
                    // The pod's sandbox went first.
                    Err(::api::Error::NotFound(_)) | Ok(()) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            None => {
                // The last OOM kills, while the sandbox's cgroups still count them.
                if let Some(oom) = &c.oom {
                    oom.task.abort();
                    if let Err(e) = self.report_ooms(&oom.reports).await {
                        log::warn!("container {}: last OOM check: {e}", c.id);
                    }
                }
                // Whatever still runs goes with the sandbox, a pod's other containers too.
                manager.destroy(&tenant.name, &c.sandbox.id).await?;
            }
        }
        unmount(&c.rootfs)?;
        let sandbox = c.sandbox.id.clone();
        let c = containers.remove(&req.id).expect("looked up above");
        let killed = || Exit::now(128 + libc::SIGKILL as u32);
        let mark_killed = |p: &Process| {
            p.exit.send_if_modified(|x| {
                let unset = x.is_none();
                if unset {
                    *x = Some(killed());
                }
                unset
            });
        };
        let gone_with_sandbox = containers
            .values()
            .filter(|other| c.root.is_none() && other.sandbox.id == sandbox);
        for p in std::iter::once(&c.init)
            .chain(c.execs.values())
            .chain(gone_with_sandbox.flat_map(|o| std::iter::once(&o.init).chain(o.execs.values())))
        {
            mark_killed(p);
        }
        let e = c.init.exited().unwrap_or_else(killed);
        resp.pid = c.init.pid;
        resp.exit_status = e.status;
        resp.exited_at = e.timestamp();
        drop(containers);
        self.publish(
            containerd_shim::protos::topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: c.id.clone(),
                id: c.id,
                pid: resp.pid,
                exit_status: resp.exit_status,
                exited_at: resp.exited_at.clone(),
                ..Default::default()
            }),
        )
        .await;
        Ok(resp)
    }

    async fn shutdown(&self) -> Result<()> {
        if !self.inner.containers.lock().await.is_empty() {
            // containerd asks again after Delete.
            return Ok(());
        }
        cleanup(&self.inner.dir, None).await?;
        self.inner.exit.signal();
        Ok(())
    }
}

/// The sandbox of pod `pod` (its first container's id) when this shim runs that container
/// in a sandbox that holds further containers.
fn pod_sandbox(containers: &HashMap<String, Container>, pod: &str) -> Option<Sandbox> {
    containers
        .get(pod)
        .filter(|c| c.root.is_none())
        .map(|c| c.sandbox.clone())
}

/// The sandbox of `c` for an operation on the whole sandbox (`what` it would be), refused
/// for a pod's further containers, which share their pod's.
fn own_sandbox(c: &Container, what: &str) -> Result<String> {
    match c.root {
        None => Ok(c.sandbox.id.clone()),
        Some(_) => Err(Error::Invalid(format!(
            "container {} shares the sandbox of its pod, which is {what} as a whole through \
             the pod's first container",
            c.id
        ))),
    }
}

fn container<'a>(
    containers: &'a mut HashMap<String, Container>,
    id: &str,
) -> Result<&'a mut Container> {
    containers
        .get_mut(id)
        .ok_or_else(|| Error::NotFound(format!("no container {id:?} in this shim")))
}

/// The limits of an Update's `resources`: OCI `LinuxResources` as JSON, as containerd sends
/// them. The memory limit and the CPU quota and period apply; zero or absent values keep the
/// current ones; the other resources (shares, cpusets, pids, block I/O, ...) are not applied.
fn limits_update(
    resources: &MessageField<containerd_shim::protos::protobuf::well_known_types::any::Any>,
) -> Result<LimitsUpdate> {
    let any = resources
        .as_ref()
        .ok_or_else(|| Error::Invalid("the update has no resources".into()))?;
    if !any.type_url.ends_with(LINUX_RESOURCES) {
        return Err(Error::Invalid(format!(
            "resources of type {:?} cannot be applied: containerd-shim-mvm-v2 takes OCI \
             LinuxResources",
            any.type_url
        )));
    }
    let r: oci_spec::runtime::LinuxResources = serde_json::from_slice(&any.value)
        .map_err(|e| Error::Invalid(format!("update resources (OCI LinuxResources): {e}")))?;
    let unlimited = |what: &str| {
        Error::Invalid(format!(
            "an mvm sandbox cannot have an unlimited {what}: give a positive value"
        ))
    };
    let limit = |v: Option<i64>, what: &str| match v {
        Some(v) if v < 0 => Err(unlimited(what)),
        Some(v) if v > 0 => Ok(Some(v as u64)),
        _ => Ok(None),
    };
    let cpu = r.cpu().as_ref();
    Ok(LimitsUpdate {
        memory_bytes: limit(r.memory().as_ref().and_then(|m| m.limit()), "memory limit")?,
        cpu_quota_us: limit(cpu.and_then(|c| c.quota()), "CPU quota")?,
        cpu_period_us: cpu.and_then(|c| c.period()).filter(|&p| p > 0),
    })
}

/// containerd's exit status: the code, or 128 + the signal.
fn api_exit_code(s: agent::ExitStatus) -> u32 {
    match (s.code(), s.signal()) {
        (Some(code), _) => code as u32 & 0xff,
        (None, Some(sig)) => 128 + sig as u32,
        (None, None) => UNKNOWN_EXIT,
    }
}

#[async_trait]
impl Task for TaskService {
    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let pid = TaskService::create(self, &req).await?;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let pid = TaskService::start(self, &req.id, &req.exec_id).await?;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let mut slot = self.inner.containers.lock().await;
        let c = container(&mut slot, &req.id)?;
        let bundle = c.bundle.clone();
        let paused = c.paused;
        let p = c.process(&req.exec_id)?;
        let mut resp = api::StateResponse {
            id: req.id.clone(),
            bundle,
            pid: p.pid,
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exec_id: req.exec_id.clone(),
            ..Default::default()
        };
        resp.status = match p.status() {
            api::Status::RUNNING if paused => api::Status::PAUSED,
            s => s,
        }
        .into();
        if let Some(e) = p.exited() {
            resp.exit_status = e.status;
            resp.exited_at = e.timestamp();
        }
        Ok(resp)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let (manager, _) = self.manager().await?;
        let mut slot = self.inner.containers.lock().await;
        let c = container(&mut slot, &req.id)?;
        let pids =
            ::api::manager::cgroups::cgroup_pids(&manager.config().cgroup_parent, &c.sandbox.id);
        Ok(api::PidsResponse {
            processes: pids
                .into_iter()
                .map(|pid| ProcessInfo {
                    pid: pid as u32,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<api::Empty> {
        TaskService::set_paused(self, &req.id, true).await?;
        Ok(api::Empty::new())
    }

    async fn resume(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResumeRequest,
    ) -> TtrpcResult<api::Empty> {
        TaskService::set_paused(self, &req.id, false).await?;
        Ok(api::Empty::new())
    }

    async fn update(
        &self,
        _ctx: &TtrpcContext,
        req: api::UpdateTaskRequest,
    ) -> TtrpcResult<api::Empty> {
        TaskService::update(self, &req).await?;
        Ok(api::Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        TaskService::kill(self, &req).await?;
        Ok(api::Empty::new())
    }

    async fn exec(
        &self,
        _ctx: &TtrpcContext,
        req: api::ExecProcessRequest,
    ) -> TtrpcResult<api::Empty> {
        let mut slot = self.inner.containers.lock().await;
        let c = container(&mut slot, &req.id)?;
        if req.exec_id.is_empty() || c.execs.contains_key(&req.exec_id) {
            return Err(Error::Invalid(format!(
                "exec id {:?} is empty or already used",
                req.exec_id
            ))
            .into());
        }
        let process: oci_spec::runtime::Process = serde_json::from_slice(&req.spec.value)
            .map_err(|e| Error::Invalid(format!("exec process spec: {e}")))?;
        let mut request = spec::exec_request(&process, c.sandbox.isolation, !req.stdin.is_empty())?;
        request.root = c.root.clone();
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        c.execs
            .insert(req.exec_id.clone(), Process::new(request, stdio));
        let container_id = c.id.clone();
        drop(slot);
        self.publish(
            containerd_shim::protos::topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id,
                exec_id: req.exec_id,
                ..Default::default()
            }),
        )
        .await;
        Ok(api::Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let (rows, cols) = match (u16::try_from(req.height), u16::try_from(req.width)) {
            (Ok(r), Ok(c)) if r > 0 && c > 0 => (r, c),
            _ => {
                return Err(Error::Invalid(format!(
                    "terminal size {}x{} is out of range",
                    req.width, req.height
                ))
                .into())
            }
        };
        let control = {
            let mut slot = self.inner.containers.lock().await;
            let p = container(&mut slot, &req.id)?.process(&req.exec_id)?;
            if !p.stdio.terminal {
                return Err(Error::Invalid("the process has no terminal".into()).into());
            }
            p.control.clone()
        };
        match control {
            Some(control) => control.resize(rows, cols).await.map_err(Error::from)?,
            None => {
                let mut slot = self.inner.containers.lock().await;
                let p = container(&mut slot, &req.id)?.process(&req.exec_id)?;
                p.request = p.request.clone().pty(rows, cols);
            }
        }
        Ok(api::Empty::new())
    }

    async fn close_io(
        &self,
        _ctx: &TtrpcContext,
        req: api::CloseIORequest,
    ) -> TtrpcResult<api::Empty> {
        let mut slot = self.inner.containers.lock().await;
        let p = container(&mut slot, &req.id)?.process(&req.exec_id)?;
        if req.stdin {
            if let Some(tx) = p.close_stdin.take() {
                let _ = tx.send(());
            }
        }
        Ok(api::Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let mut exit = {
            let mut slot = self.inner.containers.lock().await;
            container(&mut slot, &req.id)?
                .process(&req.exec_id)?
                .exit
                .subscribe()
        };
        let e = exit
            .wait_for(Option::is_some)
            .await
            .map(|e| e.expect("waited for Some"))
            .map_err(|_| Error::NotFound(format!("process {:?} went away", req.exec_id)))?;
        Ok(api::WaitResponse {
            exit_status: e.status,
            exited_at: e.timestamp(),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        let sandbox = {
            let mut slot = self.inner.containers.lock().await;
            container(&mut slot, &req.id)?.sandbox.id.clone()
        };
        let (manager, tenant) = self.manager().await?;
        let s = manager.stats(&tenant.name, &sandbox).map_err(Error::from)?;
        let mut m = Metrics::new();
        m.memory = MessageField::some(MemoryStat {
            usage: MessageField::some(MemoryEntry {
                usage: s.memory_bytes,
                ..Default::default()
            }),
            ..Default::default()
        });
        m.cpu = MessageField::some(CPUStat {
            usage: MessageField::some(CPUUsage {
                total: s.cpu_ns,
                ..Default::default()
            }),
            ..Default::default()
        });
        m.pids = MessageField::some(PidsStat {
            current: s.pids,
            ..Default::default()
        });
        let stats = convert_to_any(Box::new(m)).map_err(|e| Error::host("encoding stats", e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let mut slot = self.inner.containers.lock().await;
        let task_pid = container(&mut slot, &req.id)
            .map(|c| c.init.pid)
            .unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        Ok(TaskService::delete(self, &req).await?)
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<api::Empty> {
        TaskService::shutdown(self).await?;
        Ok(api::Empty::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::well_known_types::any::Any;

    fn resources(type_url: &str, json: &str) -> MessageField<Any> {
        MessageField::some(Any {
            type_url: type_url.into(),
            value: json.as_bytes().to_vec(),
            ..Default::default()
        })
    }

    const URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

    #[test]
    fn update_resources_from_containerd() {
        let r = resources(
            URL,
            r#"{"devices":[{"allow":false,"access":"rwm"}],"memory":{"limit":33554432},
                "cpu":{"shares":1024,"quota":50000,"period":100000}}"#,
        );
        assert_eq!(
            limits_update(&r).unwrap(),
            LimitsUpdate {
                memory_bytes: Some(32 << 20),
                cpu_quota_us: Some(50_000),
                cpu_period_us: Some(100_000),
            }
        );
        // Zero and absent keep the current values.
        let r = resources(URL, r#"{"memory":{"limit":0},"cpu":{"shares":512}}"#);
        assert_eq!(limits_update(&r).unwrap(), LimitsUpdate::default());
    }

    #[test]
    fn update_resources_refused() {
        let unlimited = resources(URL, r#"{"memory":{"limit":-1}}"#);
        let err = limits_update(&unlimited).unwrap_err().to_string();
        assert!(err.contains("unlimited memory limit"), "{err}");
        let unlimited = resources(URL, r#"{"cpu":{"quota":-1}}"#);
        assert!(limits_update(&unlimited).is_err());
        let windows = resources("types.containerd.io/WindowsResources", "{}");
        let err = limits_update(&windows).unwrap_err().to_string();
        assert!(err.contains("LinuxResources"), "{err}");
        assert!(limits_update(&resources(URL, "{not json")).is_err());
        assert!(limits_update(&MessageField::none()).is_err());
    }
}
