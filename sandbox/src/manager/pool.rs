//! The warm pool: vm-tier sandboxes restored from a template's snapshot ahead of any request,
//! owned by no tenant, so that a create of the snapshot's size takes one instead of
//! restoring (`mvmd --warm-pool N`, `MVM_WARM_POOL`: N per warm snapshot, so per size a
//! template was warmed at; kept by mvmd and `mvm serve` only, never by daemonless `mvm` or
//! the shim).
//!
//! An entry is made like any sandbox (a restore, with its own identity and network) by the
//! internal tenant [`POOL_TENANT`], which no request can name or see, in the background: its
//! cgroup has the least share of a contended CPU until it is taken. A create that fits (a
//! template's snapshot size, no image, no secrets) takes one: in one transaction the
//! tenant's quota and ports are checked and the row becomes the tenant's; an entry with the
//! create's network policy (and no ports asked) is ready as it is, any other is reconnected
//! ([`net::disconnect`], then [`net::connect`] as any create's); then its agent gives the
//! guest its address, fresh entropy and the clock. The pool is filled again in the
//! background with the network the take asked for, so the entries follow what creates ask.
//! An entry is used once: nothing a tenant ran ever returns to the pool. A new snapshot of
//! the template at that size replaces its entries; mvmd's stop destroys them, and a start
//! destroys any an earlier mvmd left.
//!
//! Beside them a pool keeps the fork pool (`mvmd --fork-pool N`, `MVM_FORK_POOL`): VMMs
//! started without a VM ([`vm::Boot::Standby`]), jailed and networked alike, made after the
//! restored entries. A fork's child of the snapshot's size takes one the same way, and the
//! fork's saved VM is handed to it ([`SavedVm::hand_to`]) and loaded: the child skips its
//! namespace, network, jail and the VMM's start.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::cgroups::CpuShare;
use super::create::{connect_namespace, guest_nic, Origin};
use super::lock::BusyLock;
use super::snapshot::{SavedVm, WarmSize};
use super::tier::{vm, Userland};
use super::{blocking, lock, net, snapshot, Manager, ManagerConfig};
use crate::db::{Quota, SandboxRow, Tenant};
use crate::error::{Error, Result};
use crate::model::{CreateSandbox, Isolation, NetworkSpec, Sandbox, SandboxState};

/// The tenant that owns the pool's entries: not a valid tenant name (see `db::validate_name`),
/// so no token, request or listing reaches them.
pub const POOL_TENANT: &str = "@pool";

/// The pools of a manager.
#[derive(Default)]
pub(super) struct Pools {
    /// Whether this manager keeps pools (mvmd with a pool size, between its start and stop).
    enabled: AtomicBool,
    /// Per warm snapshot: a template's at a size.
    snapshots: Mutex<HashMap<PoolKey, Pool>>,
    /// The fills started (a stop waits for them).
    fills: Mutex<Vec<tokio::task::JoinHandle<()>>>,
}

/// Which snapshot a pool restores: a template's, at a size.
type PoolKey = (String, WarmSize);

/// One warm snapshot's pool.
#[derive(Default)]
struct Pool {
    /// Sandboxes restored from the snapshot, for creates.
    restored: Reserve,
    /// VMMs started without a VM, for the children of forks (the fork pool).
    forks: Reserve,
    /// The snapshot they were made for (its `created_at`).
    snapshot: i64,
    /// Whether a fill is running.
    filling: bool,
}

/// The two kinds of entries a pool keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Restored from the snapshot (`--warm-pool`).
    Restored,
    /// A VMM started without a VM (`--fork-pool`).
    Fork,
}

impl Kind {
    /// How many of this kind a pool keeps.
    fn size(self, cfg: &ManagerConfig) -> u32 {
        match self {
            Kind::Restored => cfg.warm_pool,
            Kind::Fork => cfg.fork_pool,
        }
    }

    /// How an entry of this kind starts.
    fn origin(self) -> Origin {
        match self {
            Kind::Restored => Origin::Pooled,
            Kind::Fork => Origin::ForkPooled,
        }
    }
}

impl Pool {
    /// Takes every entry ready, of both kinds.
    fn take_all(&mut self) -> Vec<Entry> {
        let mut all = std::mem::take(&mut self.restored.ready);
        all.append(&mut self.forks.ready);
        all
    }

    /// The kind of entry a fill makes next, with its network: restored ones first, then
    /// started VMMs for forks; none when both are full.
    fn next(&mut self, cfg: &ManagerConfig) -> Option<(Kind, NetworkSpec)> {
        let kind = [Kind::Restored, Kind::Fork]
            .into_iter()
            .find(|&kind| (self.reserve(kind).ready.len() as u32) < kind.size(cfg))?;
        let network = self.reserve(kind).wanted.pop_front().unwrap_or_default();
        Some((kind, network))
    }

    fn reserve(&mut self, kind: Kind) -> &mut Reserve {
        match kind {
            Kind::Restored => &mut self.restored,
            Kind::Fork => &mut self.forks,
        }
    }
}

/// The entries of one kind ready in a pool, and the networks the next ones are made with.
#[derive(Default)]
struct Reserve {
    /// Entries ready to be taken, oldest first.
    ready: Vec<Entry>,
    /// The networks the next entries are made with (those of the latest takes), at most the
    /// pool's size; with none, no network (egress `none`).
    wanted: VecDeque<NetworkSpec>,
}

/// An entry ready to be taken.
struct Entry {
    /// The sandbox.
    id: String,
    /// The network it is connected for.
    network: NetworkSpec,
}

impl Reserve {
    /// Takes the oldest entry connected for `network` (when it is all a create asks), else
    /// the oldest. Whether the entry's network is the one asked comes with it.
    fn take(&mut self, network: &NetworkSpec, has_ports: bool) -> Option<(Entry, bool)> {
        let fitting = self
            .ready
            .iter()
            .position(|e| !has_ports && e.network == *network);
        let entry = match fitting {
            Some(i) => self.ready.remove(i),
            None if self.ready.is_empty() => return None,
            None => self.ready.remove(0),
        };
        Some((entry, fitting.is_some()))
    }

    /// Has a coming fill make an entry for `network` (a taken entry's new owner's), keeping
    /// the latest `size` such wishes.
    fn want(&mut self, network: NetworkSpec, size: u32) {
        if self.wanted.len() as u32 >= size {
            self.wanted.pop_front();
        }
        self.wanted.push_back(network);
    }
}

impl Pools {
    /// How many entries of `template`'s snapshot of `size` are ready: restored ones, and
    /// started VMMs for forks.
    pub(super) fn ready(&self, template: &str, size: WarmSize) -> (u32, u32) {
        let key = (template.to_owned(), size);
        lock(&self.snapshots).get(&key).map_or((0, 0), |p| {
            (p.restored.ready.len() as u32, p.forks.ready.len() as u32)
        })
    }
}

/// The tenant the entries are made for: quota enough for the pool of every template.
fn pool_tenant() -> Tenant {
    Tenant {
        name: POOL_TENANT.into(),
        quota: Quota {
            max_sandboxes: super::MAX_SLOTS,
            max_vcpus: u32::MAX,
            max_memory_mib: u64::MAX,
        },
        admin: false,
        allowed_isolation: None,
    }
}

impl Manager {
    /// Starts keeping `warm_pool` and `fork_pool` entries of every warm snapshot (mvmd calls
    /// it once it serves): entries an earlier mvmd left are destroyed first, kept pools or
    /// not.
    pub async fn start_pools(&self) -> Result<()> {
        for row in self.inner.db.sandboxes(Some(POOL_TENANT))? {
            self.destroy_entry(&row.sandbox.id).await;
        }
        if self.inner.cfg.warm_pool == 0 && self.inner.cfg.fork_pool == 0 {
            return Ok(());
        }
        self.inner.pools.enabled.store(true, Ordering::SeqCst);
        for t in self.inner.db.templates()? {
            self.refill(&t.name, WarmSize::DEFAULT);
            for other in snapshot::find_other_sizes(&self.inner.cfg, &t) {
                self.refill(&t.name, other.size());
            }
        }
        Ok(())
    }

    /// Stops the pools and destroys their entries once the fills running have stopped
    /// (mvmd's stop).
    pub async fn drain_pools(&self) {
        self.inner.pools.enabled.store(false, Ordering::SeqCst);
        let fills = std::mem::take(&mut *lock(&self.inner.pools.fills));
        for fill in fills {
            let _ = fill.await;
        }
        let ready: Vec<String> = lock(&self.inner.pools.snapshots)
            .values_mut()
            .flat_map(|p| p.take_all())
            .map(|e| e.id)
            .collect();
        for id in ready {
            self.destroy_entry(&id).await;
        }
    }

    /// Fills the pool of template `name`'s snapshot of `size` in the background, unless a
    /// fill runs or the pools are off; entries of an older snapshot are replaced.
    pub(super) fn refill(&self, name: &str, size: WarmSize) {
        let pools = &self.inner.pools;
        if !pools.enabled.load(Ordering::SeqCst) {
            return;
        }
        let key: PoolKey = (name.to_owned(), size);
        {
            let mut snapshots = lock(&pools.snapshots);
            let pool = snapshots.entry(key.clone()).or_default();
            if pool.filling {
                return;
            }
            pool.filling = true;
        }
        let manager = self.clone();
        let fill = tokio::spawn(async move {
            if let Err(e) = manager.fill(&key).await {
                manager.fill_stopped(&key);
                tracing::warn!(template = %key.0, size = ?key.1, "filling the warm pool: {e}");
            }
        });
        let mut fills = lock(&pools.fills);
        fills.retain(|f| !f.is_finished());
        fills.push(fill);
    }

    /// Makes entries of the snapshot `key` names until its pool is full (or the pools stop):
    /// restored ones first, then started VMMs for forks. Ends the fill (the pool's
    /// `filling`) itself when it returns `Ok`: a full pool is found so under the same lock as
    /// a take's, so no take falls between the check and the end.
    async fn fill(&self, key: &PoolKey) -> Result<()> {
        let pools = &self.inner.pools;
        let cfg = &self.inner.cfg;
        let (name, size) = (&key.0, key.1);
        loop {
            let template = self.requested_template(Some(name.to_owned()))?;
            let Some(warm) = snapshot::find(cfg, &template, size) else {
                self.fill_stopped(key);
                return Ok(());
            };
            let current = warm.describe();
            let (stale, next) = {
                let mut snapshots = lock(&pools.snapshots);
                let pool = snapshots.entry(key.clone()).or_default();
                let stale = match pool.snapshot == current.created_at {
                    true => Vec::new(),
                    false => pool.take_all(),
                };
                pool.snapshot = current.created_at;
                let next = pool.next(cfg);
                if next.is_none() {
                    pool.filling = false;
                }
                (stale, next)
            };
            for entry in stale {
                self.destroy_entry(&entry.id).await;
            }
            let Some((kind, network)) = next else {
                return Ok(());
            };
            if !pools.enabled.load(Ordering::SeqCst) {
                self.fill_stopped(key);
                return Ok(());
            }
            let req = CreateSandbox {
                template: Some(name.to_owned()),
                isolation: Some(Isolation::Vm),
                vcpus: Some(current.vcpus),
                memory_mib: Some(current.memory_mib),
                // An entry lives until it is taken; the taker's timeout starts then.
                timeout_s: Some(0),
                network: Some(network.clone()),
                ..CreateSandbox::default()
            };
            let entry = self.create_from(&pool_tenant(), req, kind.origin()).await?;
            let kept = pools.enabled.load(Ordering::SeqCst) && {
                let mut snapshots = lock(&pools.snapshots);
                let pool = snapshots.entry(key.clone()).or_default();
                let kept = pool.snapshot == current.created_at;
                if kept {
                    pool.reserve(kind).ready.push(Entry {
                        id: entry.id.clone(),
                        network,
                    });
                }
                kept
            };
            if !kept {
                self.destroy_entry(&entry.id).await;
            } else if kind == Kind::Restored {
                tracing::debug!(template = %name, ?size, id = %entry.id, "warm pool entry ready");
            } else {
                tracing::debug!(template = %name, ?size, id = %entry.id, "fork pool entry ready");
            }
        }
    }

    /// Marks the fill of snapshot `key`'s pool ended (the next take starts another).
    fn fill_stopped(&self, key: &PoolKey) {
        if let Some(pool) = lock(&self.inner.pools.snapshots).get_mut(key) {
            pool.filling = false;
        }
    }

    /// Destroys entry `id` (logged, not returned: nobody waits for it).
    async fn destroy_entry(&self, id: &str) {
        if let Err(e) = self.destroy(POOL_TENANT, id).await {
            tracing::warn!(%id, "destroying a warm pool entry: {e}");
        }
    }

    /// Gives `planned` (a checked create of `tenant` from `userland`) an entry of the warm
    /// pool when it fits one: the entry becomes the tenant's sandbox with the request's
    /// environment, metadata, timeout and network. `None` when no entry fits or is ready (or
    /// one failed to connect: it is destroyed), and the create goes on as usual.
    pub(super) async fn take_pooled(
        &self,
        tenant: &Tenant,
        planned: &Sandbox,
        userland: &Userland,
        has_secrets: bool,
    ) -> Result<Option<Sandbox>> {
        if has_secrets {
            return Ok(None);
        }
        self.take(Kind::Restored, tenant, planned, userland, None)
            .await
    }

    /// Gives `planned` (a fork's child, a checked create of `tenant` from `userland`) a VMM
    /// of the fork pool when one fits: the entry becomes the tenant's sandbox as a warm pool's
    /// does (see [`Manager::take_pooled`]), then `saved` (the fork's source) is handed to its
    /// VMM and loaded. `None` when none fits or is ready (or one failed: it is destroyed), and
    /// the child is created as usual.
    pub(super) async fn take_fork_pooled(
        &self,
        tenant: &Tenant,
        planned: &Sandbox,
        userland: &Userland,
        saved: &SavedVm,
    ) -> Result<Option<Sandbox>> {
        self.take(Kind::Fork, tenant, planned, userland, Some(saved))
            .await
    }

    /// An entry of `kind` for `planned` (see [`Manager::take_pooled`]); a fork pool's loads
    /// `saved`.
    async fn take(
        &self,
        kind: Kind,
        tenant: &Tenant,
        planned: &Sandbox,
        userland: &Userland,
        saved: Option<&SavedVm>,
    ) -> Result<Option<Sandbox>> {
        let pools = &self.inner.pools;
        let Userland::Template(template) = userland else {
            return Ok(None);
        };
        if !pools.enabled.load(Ordering::SeqCst)
            || planned.isolation != Isolation::Vm
            || planned.image.is_some()
        {
            return Ok(None);
        }
        let size = WarmSize {
            vcpus: planned.vcpus,
            memory_mib: planned.memory_mib,
        };
        let Some(warm) = snapshot::find(&self.inner.cfg, template, size) else {
            return Ok(None);
        };
        let current = warm.describe();
        let key: PoolKey = (template.name.clone(), size);
        let network = planned.network.spec();
        let has_ports = !planned.network.ports.is_empty();
        let taken = {
            let mut snapshots = lock(&pools.snapshots);
            snapshots
                .get_mut(&key)
                .filter(|p| p.snapshot == current.created_at)
                .and_then(|p| p.reserve(kind).take(&network, has_ports))
        };
        let Some((entry, connected)) = taken else {
            self.refill(&template.name, size);
            return Ok(None);
        };
        let id = entry.id.clone();
        let started = Instant::now();
        let _busy = BusyLock::acquire(&self.inner.cfg.lock_path(&id))?;
        let mut row = match self
            .inner
            .db
            .adopt_pooled(&id, POOL_TENANT, planned, &tenant.quota)
        {
            Ok(row) => row,
            Err(e) => {
                // The entry is as it was: back to the pool (a quota or port refusal is the
                // create's answer).
                if let Some(pool) = lock(&pools.snapshots).get_mut(&key) {
                    pool.reserve(kind).ready.insert(0, entry);
                }
                return Err(e);
            }
        };
        // Only a create that got its entry asks the pool for its network.
        if let Some(pool) = lock(&pools.snapshots).get_mut(&key) {
            pool.reserve(kind).want(network, kind.size(&self.inner.cfg));
        }
        let made = self
            .connect_taken(&mut row, &entry.network, connected, saved)
            .await;
        // The pool fills again once the entry is connected (in the background: its share of
        // a contended CPU is the least).
        self.refill(&template.name, size);
        let network = if connected { "ready" } else { "reconnected" };
        let (tenant, ready) = (&tenant.name, started.elapsed());
        match (made, kind) {
            (Ok(networked), Kind::Restored) => {
                self.inner
                    .metrics
                    .pool_taken
                    .fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%id, %tenant, network, ?networked, ?ready, "warm pool entry taken");
                Ok(Some(row.sandbox))
            }
            (Ok(networked), Kind::Fork) => {
                let metrics = &self.inner.metrics;
                metrics.fork_pool_taken.fetch_add(1, Ordering::Relaxed);
                metrics.restored.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%id, %tenant, network, ?networked, ?ready, "fork pool entry taken");
                Ok(Some(row.sandbox))
            }
            (Err(e), _) => {
                tracing::warn!(%id, ?kind, "a pool entry failed to connect, creating anew: {e}");
                self.roll_back(&row.sandbox).await?;
                Ok(None)
            }
        }
    }

    /// Makes the taken entry `row` what its new owner asked: its full share of the CPU, the
    /// network (unless `connected` for it already: else the entry's, `was`, is replaced),
    /// and, side by side with it (the VMM's tap is the namespace's own, which a reconnect
    /// keeps), the guest's address, resolver, entropy and clock through its agent: a fork
    /// pool's VMM is first handed the VM `load` and loads it, and its agent gets the identity
    /// with its first answer. Returns when the network was done (since the call).
    async fn connect_taken(
        &self,
        row: &mut SandboxRow,
        was: &NetworkSpec,
        connected: bool,
        load: Option<&SavedVm>,
    ) -> Result<Duration> {
        let started = Instant::now();
        let addrs = net::Addresses::of(self.inner.cfg.subnet, row.slot);
        let (cfg, id) = (self.inner.cfg.clone(), row.sandbox.id.clone());
        self.set_cpu_share(&id, CpuShare::Normal).await?;
        let info = net::info(
            &row.sandbox.network.spec(),
            &row.sandbox.network.ports,
            &[],
            Isolation::Vm,
            addrs,
        );
        let guest_net = info.address.is_some().then(|| guest_nic(addrs));
        let taken: &SandboxRow = row;
        let becoming = vm::Becoming {
            id: &id,
            net: guest_net.as_ref(),
            egress: info.egress,
            resumed: false,
        };
        let network = async {
            if !connected {
                // An entry without a veth has only the namespace's rules, which a connect
                // replaces.
                if net::has_veth(was, &[]) {
                    let (cfg, id) = (cfg.clone(), id.clone());
                    blocking(move || net::disconnect(&cfg.netns(&id), &id)).await?;
                }
                let s = &taken.sandbox;
                connect_namespace(cfg.clone(), s, addrs, Vec::new(), None, CpuShare::Normal)
                    .await?;
            }
            Ok::<_, Error>(started.elapsed())
        };
        let vm = async {
            let live = self.live(&id);
            let Some(saved) = load else {
                // A warm pool's entry: its agent answered when it was restored.
                let connected = live.agent.lock().await.clone();
                let agent = match connected {
                    Some(agent) => agent,
                    None => self.connect_agent(taken).await?,
                };
                agent.reidentify(becoming.identity()?).await?;
                return Ok::<_, Error>(agent);
            };
            let (cfg, to, saved) = (cfg.clone(), id.clone(), saved.clone());
            blocking(move || saved.hand_to(&cfg, &to, &cfg.sandbox_dir(&to).join(vm::LAYER_NAME)))
                .await?;
            let handed = started.elapsed();
            vm::load_snapshot(&self.vmm_api(taken)?.path()).await?;
            let loaded = started.elapsed();
            let agent = self
                .wait_agent(&live, taken, vm::READY_TIMEOUT, Some(becoming))
                .await?;
            *live.agent.lock().await = Some(agent.clone());
            let reidentified = started.elapsed();
            tracing::debug!(%id, ?handed, ?loaded, ?reidentified, "fork pool entry loaded");
            Ok(agent)
        };
        let (networked, _agent) = tokio::try_join!(network, vm)?;
        row.sandbox.network = info;
        row.sandbox.state = SandboxState::Running;
        self.inner.db.update_sandbox(row)?;
        Ok(networked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Egress;

    fn spec(egress: Egress, allow: &[&str]) -> NetworkSpec {
        NetworkSpec {
            egress,
            allow: allow.iter().map(|a| a.to_string()).collect(),
        }
    }

    fn reserve(entries: &[(&str, NetworkSpec)]) -> Reserve {
        Reserve {
            ready: entries
                .iter()
                .map(|(id, network)| Entry {
                    id: id.to_string(),
                    network: network.clone(),
                })
                .collect(),
            ..Reserve::default()
        }
    }

    /// A take prefers the oldest entry connected for its network, else takes the oldest
    /// (reconnected); one that asks for ports never counts as connected; the fills make the
    /// networks of the latest `size` takes.
    #[test]
    fn a_take_prefers_an_entry_connected_for_its_network() {
        let allow = spec(Egress::Allow, &["10.9.9.9/32"]);
        let all = spec(Egress::All, &[]);
        let none = NetworkSpec::default();
        let mut p = reserve(&[
            ("a", none.clone()),
            ("b", allow.clone()),
            ("c", allow.clone()),
        ]);
        let (e, connected) = p.take(&allow, false).unwrap();
        assert_eq!((e.id.as_str(), connected), ("b", true));
        let (e, connected) = p.take(&allow, true).unwrap();
        assert_eq!((e.id.as_str(), connected), ("a", false));
        let (e, connected) = p.take(&all, false).unwrap();
        assert_eq!((e.id.as_str(), connected), ("c", false));
        assert!(p.take(&allow, false).is_none());
        for network in [none, allow.clone(), all.clone()] {
            p.want(network, 2);
        }
        assert_eq!(p.wanted, [allow, all]);
    }

    /// A fill makes the restored entries first, then the fork pool's started VMMs (with the
    /// networks its takes asked for), and stops when both are full.
    #[test]
    fn a_fill_makes_restored_entries_then_started_vmms() {
        let cfg = ManagerConfig {
            warm_pool: 1,
            fork_pool: 2,
            ..ManagerConfig::from_env()
        };
        let allow = spec(Egress::Allow, &["10.9.9.9/32"]);
        let none = NetworkSpec::default();
        let mut p = Pool::default();
        p.forks.want(allow.clone(), 2);
        assert_eq!(p.next(&cfg), Some((Kind::Restored, none.clone())));
        p.restored = reserve(&[("r", none.clone())]);
        assert_eq!(p.next(&cfg), Some((Kind::Fork, allow.clone())));
        p.forks = reserve(&[("f", allow)]);
        assert_eq!(p.next(&cfg), Some((Kind::Fork, none.clone())));
        p.forks.ready.push(Entry {
            id: "g".into(),
            network: none,
        });
        assert_eq!(p.next(&cfg), None);
        assert_eq!(p.take_all().len(), 3);
        assert_eq!(p.next(&cfg).map(|(kind, _)| kind), Some(Kind::Restored));
    }
}
