//! Create: plan, build (steps 2-5 of the module docs: network, the tier's jail spec, the
//! jailer's spawn, the wait for the agent).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::cgroups::CpuShare;
use super::exec::validate_env;
use super::lock::BusyLock;
use super::snapshot::{self, SavedVm};
use super::tier::{self, vm, Userland};
use super::{
    blocking, host, lock, net, pod_netns_of, ContainerSandbox, Live, Manager, ManagerConfig,
    DEFAULT_MEMORY_MIB, DEFAULT_TIMEOUT_S, DEFAULT_VCPUS, MAX_MEMORY_MIB, MAX_TIMEOUT_S, MAX_VCPUS,
    MIN_MEMORY_MIB,
};
use crate::db::{self, SandboxRow, Tenant};
use crate::error::{Error, Result};
use crate::model::{CreateSandbox, Egress, Isolation, Lifecycle, OnTimeout, Sandbox, SandboxState};

impl Manager {
    /// Checks a create request and fills in the defaults; `userland` replaces the template's
    /// file system.
    fn plan(
        &self,
        tenant: &Tenant,
        req: CreateSandbox,
        userland: Option<PathBuf>,
    ) -> Result<(Sandbox, Userland, Vec<net::Secret>)> {
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
        let vcpus = req.vcpus.unwrap_or(DEFAULT_VCPUS);
        if !(1..=MAX_VCPUS).contains(&vcpus) {
            return Err(Error::Invalid(format!(
                "vcpus must be 1 to {MAX_VCPUS}, got {vcpus}"
            )));
        }
        let memory_mib = req.memory_mib.unwrap_or(DEFAULT_MEMORY_MIB);
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
        net::validate_ports(&req.ports)?;
        // Other hosts reach a port on a non-loopback address: it would let a tenant take
        // a port of the host's own services from the network (one not bound at that moment).
        if let Some(p) = req.ports.iter().find(|p| !p.host_ip.is_loopback()) {
            if !tenant.admin {
                return Err(Error::Forbidden(format!(
                    "ports: publishing on {} lets other hosts reach the sandbox and takes the \
                     port on the host's network addresses: it needs an admin tenant's token; \
                     publish on 127.0.0.1 (the default), or ask the operator",
                    p.host_ip
                )));
            }
        }
        net::check_ports_unbound(&req.ports)?;
        let image = match req.image.as_deref() {
            Some(_) if userland.is_some() => {
                return Err(Error::Invalid(
                    "a container's sandbox takes its root from its runtime, not an image".into(),
                ))
            }
            Some(name) => Some(self.images().sandbox_image(name)?),
            None => None,
        };
        let (template_name, userland) = match (&image, userland) {
            (Some((image, tree)), _) => (
                image.pinned_reference(),
                match isolation {
                    Isolation::Jail => Userland::Base(tree.clone()),
                    // The guest's root is an ext4 copy of the tree, as a container's is.
                    Isolation::Vm => Userland::DiskFromDir {
                        template: self.requested_template(req.template)?,
                        dir: tree.clone(),
                    },
                },
            ),
            (None, Some(dir)) if !dir.is_absolute() || !dir.is_dir() => {
                return Err(Error::Invalid(format!(
                    "userland {} must be an absolute path to a directory",
                    dir.display()
                )))
            }
            (None, Some(dir)) if isolation == Isolation::Jail => {
                (dir.display().to_string(), Userland::Dir(dir))
            }
            (None, Some(dir)) => (
                dir.display().to_string(),
                Userland::DiskFromDir {
                    template: self.requested_template(req.template)?,
                    dir,
                },
            ),
            (None, None) => {
                let template = self.requested_template(req.template)?;
                (template.name.clone(), Userland::Template(template))
            }
        };
        check_lifecycle(req.lifecycle, isolation, &userland)?;
        // The image's Env under the request's own.
        let mut env = req.env;
        if let Some((image, _)) = &image {
            for kv in &image.config.env {
                if let Some((k, v)) = kv.split_once('=').filter(|(k, _)| !k.is_empty()) {
                    env.entry(k.to_owned()).or_insert_with(|| v.to_owned());
                }
            }
            validate_env(&env)?;
        }
        // Each secret's placeholder in the env, and the CA's trust store.
        let secrets = net::secrets::plan(&req.secrets, network.egress, &env)?;
        if !secrets.is_empty() {
            for s in &secrets {
                env.insert(s.name.clone(), s.placeholder.clone());
            }
            for (k, v) in net::secrets::trust_env() {
                env.entry(k.to_owned()).or_insert_with(|| v.to_owned());
            }
        }
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
            env,
            network: crate::model::NetworkInfo {
                egress: network.egress,
                allow: network.allow,
                address: None,
                gateway: None,
                netns: None,
                ports: req.ports,
                secrets: secrets.iter().map(net::Secret::info).collect(),
            },
            metadata: req.metadata,
            image: image.map(|(image, _)| image),
            lifecycle: req.lifecycle,
            snapshot: req.snapshot,
        };
        Ok((sandbox, userland, secrets))
    }

    /// Creates a sandbox for `tenant` and waits until its agent answers. A vm-tier sandbox
    /// of a warm template's size restores the template's snapshot instead of booting; one
    /// made from a snapshot of the tenant's (`snapshot`) restores that.
    pub async fn create(&self, tenant: &Tenant, mut req: CreateSandbox) -> Result<Sandbox> {
        match req.snapshot.take() {
            Some(key) => self.create_from_snapshot(tenant, req, &key).await,
            None => self.create_in(tenant, req, None, Origin::Request).await,
        }
    }

    /// Creates the sandbox of `tenant` that starts as `origin` says (a template's warm-up, a
    /// fork's child).
    pub(super) async fn create_from(
        &self,
        tenant: &Tenant,
        req: CreateSandbox,
        origin: Origin,
    ) -> Result<Sandbox> {
        self.create_in(tenant, req, None, origin).await
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
        if req.snapshot.is_some() {
            return Err(Error::Invalid(
                "snapshot: a container's sandbox is made from its runtime's file system".into(),
            ));
        }
        self.create_in(tenant, req, Some(container), Origin::Request)
            .await
    }

    async fn create_in(
        &self,
        tenant: &Tenant,
        req: CreateSandbox,
        container: Option<ContainerSandbox>,
        origin: Origin,
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
        if userland.is_some() && !req.secrets.is_empty() {
            return Err(Error::Invalid(
                "secrets: a container's sandbox gets none (its runtime's network and root \
                 decide its egress and trust store)"
                    .into(),
            ));
        }
        // An image stays while its sandbox is being recorded (a removal waits for this).
        let image_pin = match req.image {
            Some(_) => Some(self.images().pinned().await?),
            None => None,
        };
        let (sandbox, template, secrets) = self.plan(tenant, req, userland)?;
        if pod_netns.is_some() && !sandbox.network.ports.is_empty() {
            return Err(Error::Invalid(
                "ports: a sandbox in a pod's network namespace publishes none (the pod's \
                 network does)"
                    .into(),
            ));
        }
        if container_slots > 0 && sandbox.isolation != Isolation::Vm {
            return Err(Error::Invalid(
                "only a vm-tier sandbox holds the containers of a pod".into(),
            ));
        }
        if container_slots == 0 {
            let taken = match &origin {
                Origin::Request => {
                    self.take_pooled(tenant, &sandbox, &template, !secrets.is_empty())
                        .await?
                }
                Origin::Fork(saved) => {
                    self.take_fork_pooled(tenant, &sandbox, &template, saved)
                        .await?
                }
                Origin::Pooled | Origin::ForkPooled | Origin::Warming => None,
            };
            if let Some(taken) = taken {
                self.inner.metrics.create_seconds.observe(started.elapsed());
                return Ok(taken);
            }
        }
        // Taken before the row exists, so that another manager's reconciliation never sees
        // the row unlocked and removes it as dead; held until the sandbox is ready or rolled
        // back; the kernel drops it if we die.
        let _busy = BusyLock::acquire(&self.inner.cfg.lock_path(&sandbox.id))?;
        let slot = self.inner.db.insert_sandbox(&sandbox, &tenant.quota)?;
        drop(image_pin);
        let mut row = SandboxRow {
            sandbox,
            slot,
            pid: 0,
        };
        match self
            .build(
                &mut row,
                &template,
                container_slots,
                pod_netns,
                origin,
                secrets,
            )
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
                match self.roll_back(&row.sandbox).await {
                    Ok(()) => Err(e),
                    Err(undo) => Err(Error::Host(format!(
                        "{e}; rolling back also failed: {undo}"
                    ))),
                }
            }
        }
    }

    /// Removes what a create of sandbox `s` made, and its row, while the caller holds its busy
    /// lock (a failed create, a taken warm pool entry that could not be connected).
    pub(super) async fn roll_back(&self, s: &Sandbox) -> Result<()> {
        let id = s.id.clone();
        lock(&self.inner.live).remove(&id);
        if let Err(undo) = self
            .teardown(id.clone(), Some(s.isolation), pod_netns_of(s), false)
            .await
        {
            tracing::error!(%id, "rollback of a failed create: {undo}");
            return Err(undo);
        }
        self.inner.db.delete_sandbox(&id)
    }

    /// How the VM of a new sandbox `s` starts: a fork's child restores its source; a plain
    /// vm-tier create of a warm template's size restores the template's snapshot; the rest
    /// boot.
    fn boot(
        &self,
        s: &Sandbox,
        userland: &Userland,
        container_slots: u8,
        origin: &Origin,
    ) -> vm::Boot {
        match (origin, userland) {
            (Origin::Fork(saved), _) => vm::Boot::Restore(saved.clone()),
            (Origin::ForkPooled, _) => vm::Boot::Standby,
            (Origin::Request | Origin::Pooled, Userland::Template(t))
                if s.isolation == Isolation::Vm && container_slots == 0 =>
            {
                let size = snapshot::WarmSize {
                    vcpus: s.vcpus,
                    memory_mib: s.memory_mib,
                };
                snapshot::find(&self.inner.cfg, t, size)
                    .map(snapshot::WarmSnapshot::vm)
                    .map_or(vm::Boot::Cold, vm::Boot::Restore)
            }
            _ => vm::Boot::Cold,
        }
    }

    async fn build(
        &self,
        row: &mut SandboxRow,
        userland: &Userland,
        container_slots: u8,
        pod_netns: Option<PathBuf>,
        origin: Origin,
        secrets: Vec<net::Secret>,
    ) -> Result<()> {
        let cfg = self.inner.cfg.clone();
        let s = row.sandbox.clone();
        let uid = cfg.uid(row);
        let boot = self.boot(&s, userland, container_slots, &origin);
        // A warm pool's entry is made with what CPU the live sandboxes leave idle.
        let share = match origin {
            Origin::Pooled | Origin::ForkPooled => CpuShare::Background,
            _ => CpuShare::Normal,
        };
        // A saved VM has a NIC whatever its network: warmed with one, it is restored with one
        // (left down and address-less when the sandbox has no network).
        let needs_nic = matches!(origin, Origin::Warming)
            || boot.loads_snapshot()
            || matches!(boot, vm::Boot::Standby);
        let addrs = net::Addresses::of(cfg.subnet, row.slot);
        let spec = s.network.spec();
        let ports = s.network.ports.clone();
        let userland = userland.clone();
        // The sandbox's CA, when it has secrets: its key goes to the egress proxy, its
        // certificate into the sandbox's trust store.
        let ca = if secrets.is_empty() {
            None
        } else {
            Some(net::secrets::Ca::new(&s.id)?)
        };
        let ca_cert = ca.as_ref().map(|ca| ca.cert_pem.clone());
        // Step 2: the network namespace, which is all the jail needs to start (a pod's
        // namespace is joined whole); its connection to the host is made meanwhile.
        let started = Instant::now();
        let (network, uplink) = {
            let (cfg, s, spec, ports) = (cfg.clone(), s.clone(), spec.clone(), ports.clone());
            let (pod_netns, secrets) = (pod_netns.clone(), secrets.clone());
            blocking(move || match &pod_netns {
                Some(ns) => {
                    let (info, uplink) = net::join_pod_netns(ns, s.isolation, uid)?;
                    Ok((info, Some(uplink)))
                }
                None => {
                    make_namespace(&cfg, &s.id, s.isolation, addrs, uid)?;
                    let info = net::info(&spec, &ports, &secrets, s.isolation, addrs);
                    Ok((info, None))
                }
            })
            .await?
        };
        let namespace = started.elapsed();
        let joined_pod = pod_netns.is_some();
        let connecting = async {
            match joined_pod {
                true => Ok(Duration::ZERO),
                false => connect_namespace(
                    cfg.clone(),
                    &s,
                    addrs,
                    secrets,
                    ca.as_ref().map(|ca| ca.key_pem.clone()),
                    share,
                )
                .await
                .map(|()| started.elapsed()),
            }
        };
        let guest_net = match uplink {
            Some(uplink) => Some(vm::GuestNet {
                ip: uplink.guest_ip(),
                mac: Some(uplink.mac),
            }),
            // A snapshot's VM has a NIC whatever the network: warmed with one, it is
            // restored with one, left down and without an address when there is none.
            None if network.address.is_some() || needs_nic => Some(guest_nic(addrs)),
            None => None,
        };
        row.sandbox.network = network;
        // Steps 3-5 while the namespace is connected (on a host with more than one CPU);
        // both finish before the sandbox counts as made (a failure of either rolls back both).
        let start = tier::Start {
            container_slots,
            guest_net,
            boot,
            share,
        };
        let starting = self.start_sandbox(row, userland, start, pod_netns, ca_cert, started);
        let (networked, spawned) = match host::parallel() {
            true => tokio::join!(connecting, starting),
            // One CPU: the network's processes and the start would only take turns (and a
            // TCG-emulated CPU pays dearly for each switch), so the network comes first.
            false => match connecting.await {
                Ok(networked) => (Ok(networked), starting.await),
                Err(e) => {
                    drop(starting);
                    (Err(e), Ok(Duration::ZERO))
                }
            },
        };
        let (networked, spawned) = (networked?, spawned?);
        tracing::debug!(id = %row.sandbox.id, ?namespace, ?networked, ?spawned, ready = ?started.elapsed(), "sandbox built");
        row.sandbox.state = SandboxState::Running;
        self.inner.db.update_sandbox(row)?;
        Ok(())
    }

    /// Steps 3-5 of a create: the jail and its spawn (in the namespace made already), then the
    /// wait for the agent; the secrets' CA certificate `ca_cert` goes into the sandbox's trust
    /// store. Returns when the jailer was spawned (since `started`).
    pub(super) async fn start_sandbox(
        &self,
        row: &mut SandboxRow,
        userland: Userland,
        start: tier::Start,
        pod_netns: Option<PathBuf>,
        ca_cert: Option<String>,
        started: Instant,
    ) -> Result<Duration> {
        let cfg = self.inner.cfg.clone();
        let s = row.sandbox.clone();
        let uid = cfg.uid(row);
        let (container_slots, boot, guest_net) = (
            start.container_slots,
            start.boot.clone(),
            start.guest_net.clone(),
        );
        let trust_pem = ca_cert.clone();
        let child = blocking(move || {
            let spawned = spawn_jail(&cfg, &s, uid, &userland, start, pod_netns.as_deref())
                .and_then(|child| {
                    // The jail tier's DNS goes to the sandbox's resolver (the vm tier's guest
                    // is told by its kernel command line).
                    // A container's own tree (no overlay) keeps its runtime's resolv.conf.
                    let root = super::rootfs::Overlay::at(&cfg.sandbox_dir(&s.id)).merged;
                    if s.isolation == Isolation::Jail
                        && s.network.egress == Egress::Allow
                        && mvm_sys::mountinfo::mount_points_under(&root).contains(&root)
                    {
                        net::write_resolv_conf(&root)?;
                        if let Some(pem) = &trust_pem {
                            net::secrets::write_trust_store(&root, pem)?;
                        }
                    }
                    Ok(child)
                });
            if spawned.is_err() && s.isolation == Isolation::Vm {
                // The teardown after a failed create does not know of the pod's namespace yet.
                if let Some(ns) = &pod_netns {
                    let _ = net::leave_pod_netns(ns);
                }
            }
            spawned
        })
        .await?;
        row.pid = child.id().unwrap_or(0);
        let live = Arc::new(Live::default());
        *lock(&live.child) = Some(child);
        live.pod.lock().await.capacity = container_slots;
        lock(&self.inner.live).insert(row.sandbox.id.clone(), Arc::clone(&live));
        self.inner.db.update_sandbox(row)?;
        let spawned = started.elapsed();
        // A fork pool's VMM waits for a VM, and so for its agent.
        if matches!(boot, vm::Boot::Standby) {
            self.await_vmm_api(row, &live).await?;
            return Ok(spawned);
        }
        // Step 5: the agent.
        // A restored guest without a network keeps its NIC down and address-less.
        let identity_net = guest_net.filter(|_| row.sandbox.network.address.is_some());
        let client = self
            .await_agent(row, &live, &boot, identity_net.as_ref())
            .await?;
        if boot.loads_snapshot() {
            self.inner
                .metrics
                .restored
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        // A vm-tier guest's trust store is written through its agent once it answers.
        if let (Some(ca_pem), Isolation::Vm) = (ca_cert, row.sandbox.isolation) {
            net::secrets::install_trust_store(&client, &ca_pem).await?;
        }
        *live.agent.lock().await = Some(client);
        Ok(spawned)
    }
}

/// Where a new sandbox comes from besides its request.
#[derive(Debug, Clone)]
pub(super) enum Origin {
    /// A create (a vm-tier one of a warm template's size restores its snapshot, or takes a
    /// sandbox of its warm pool).
    Request,
    /// A warm pool's sandbox: restores its template's snapshot.
    Pooled,
    /// A fork pool's sandbox: its VMM started without a VM, for a fork's child to load into.
    ForkPooled,
    /// The sandbox that warms its template: booted cold, with a NIC.
    Warming,
    /// A fork's child: restores its source's saved VM.
    Fork(SavedVm),
}

/// The guest's NIC of a sandbox with addresses `addrs` (the tap is its gateway).
pub(super) fn guest_nic(addrs: net::Addresses) -> vm::GuestNet {
    vm::GuestNet {
        ip: agent::IpConfig {
            address: addrs.guest,
            prefix_len: 30,
            gateway: Some(addrs.tap),
        },
        mac: None,
    }
}

/// Makes sandbox `id`'s network namespace (of tier `isolation`, at `addrs`, its tap the
/// sandbox `uid`'s) in the manager's namespace directory.
pub(super) fn make_namespace(
    cfg: &ManagerConfig,
    id: &str,
    isolation: Isolation,
    addrs: net::Addresses,
    uid: u32,
) -> Result<()> {
    std::fs::create_dir_all(cfg.netns("")).map_err(|e| Error::host("creating the netns dir", e))?;
    net::create_namespace(&cfg.netns(id), isolation, addrs, uid)
}

/// Connects the network namespace of sandbox `s` (made already, at `addrs`) as its network
/// asks ([`net::connect`], on a blocking thread; as background work with the `Background`
/// share): with egress `allow` its resolver asks the configured upstream, and with
/// `secrets` their proxy holds the sandbox CA's `ca_key` (PEM).
pub(super) async fn connect_namespace(
    cfg: ManagerConfig,
    s: &Sandbox,
    addrs: net::Addresses,
    secrets: Vec<net::Secret>,
    ca_key: Option<String>,
    share: CpuShare,
) -> Result<()> {
    let spec = s.network.spec();
    let (id, ports, isolation) = (s.id.clone(), s.network.ports.clone(), s.isolation);
    blocking(move || {
        let upstream = match spec.egress {
            Egress::Allow => net::DnsUpstream::resolve(cfg.dns_upstream.as_deref())?,
            _ => net::DnsUpstream(Vec::new()),
        };
        let audit = cfg.state_dir.join(net::secrets::AUDIT_LOG);
        let dns = net::DnsSetup {
            bin_dir: &cfg.bin_dir,
            upstream: &upstream,
            proxy: ca_key.as_deref().map(|ca_key_pem| net::ProxySetup {
                secrets: &secrets,
                ca_key_pem,
                audit: &audit,
                extra_ca: cfg.egress_ca.as_deref(),
            }),
        };
        let connect = || net::connect(&cfg.netns(&id), &id, &spec, &ports, isolation, addrs, &dns);
        match share {
            CpuShare::Normal => connect(),
            CpuShare::Background => host::in_background(connect),
        }
    })
    .await
}

/// Steps 3-4 of a create: the sandbox's directory, its tier's jail, and the jailer process,
/// whose output goes to the console log. Joins `pod_netns` instead of the manager's own
/// namespace for the sandbox when given.
fn spawn_jail(
    cfg: &ManagerConfig,
    s: &Sandbox,
    uid: u32,
    userland: &Userland,
    start: tier::Start,
    pod_netns: Option<&Path>,
) -> Result<tokio::process::Child> {
    let dir = cfg.sandbox_dir(&s.id);
    std::fs::create_dir_all(&dir)
        .map_err(|e| Error::host(format!("creating {}", dir.display()), e))?;
    let console = match start.boot {
        vm::Boot::Resume(_) => tier::console(s.isolation, &dir).reopen()?,
        _ => tier::create_console(s.isolation, &dir, cfg.console_limit)?,
    };
    let mut jail = tier::jail_spec(cfg, s, uid, userland, start)?;
    if let Some(ns) = pod_netns {
        jail.netns = Some(ns.to_owned());
    }
    let tier_helper = match s.isolation {
        Isolation::Jail => "mvm-agent",
        Isolation::Vm => "mvm-vmm",
    };
    for helper in ["mvm-jailer", tier_helper] {
        if !cfg.bin_dir.join(helper).is_file() {
            return Err(Error::Host(crate::install::helper_missing(
                &cfg.bin_dir,
                helper,
            )));
        }
    }
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

/// Refuses a lifecycle a sandbox of `isolation` made from `userland` cannot follow: a save
/// at the timeout needs a vm-tier sandbox made from a template (what [`Manager::save`] saves),
/// and a resume on demand a timeout that pauses or saves.
fn check_lifecycle(lifecycle: Lifecycle, isolation: Isolation, userland: &Userland) -> Result<()> {
    if lifecycle.on_timeout == OnTimeout::Save {
        if isolation != Isolation::Vm {
            return Err(Error::Invalid(
                "lifecycle.on_timeout \"save\" writes a micro-VM's memory to disk, so it needs \
                 the vm tier; in the jail tier use \"pause\" (frozen at the timeout)"
                    .into(),
            ));
        }
        if !matches!(userland, Userland::Template(_)) {
            return Err(Error::Invalid(
                "lifecycle.on_timeout \"save\" needs a sandbox made from a template (its saved \
                 VM is loaded again over the template's image); a sandbox from an image or a \
                 directory can use \"pause\""
                    .into(),
            ));
        }
    }
    if lifecycle.auto_resume && lifecycle.on_timeout == OnTimeout::Destroy {
        return Err(Error::Invalid(
            "lifecycle.auto_resume needs lifecycle.on_timeout \"pause\" or \"save\" (a \
             sandbox destroyed at its timeout has nothing to resume)"
                .into(),
        ));
    }
    Ok(())
}
