//! Live resource limits, end to end as root: a jail-tier sandbox's memory limit and CPU quota
//! changed while it runs (cgroup files, stored size, tenant quota), and the OOM killer at the
//! new limit, counted by the manager.

mod common;

use std::path::Path;

use common::{block_on, Daemon};
use mvm_sandbox::db::Quota;
use mvm_sandbox::manager::cgroups::LimitCgroups;
use mvm_sandbox::manager::LimitsUpdate;
use mvm_sandbox::model::{CreateSandbox, ExecRequest, Isolation};
use mvm_sandbox::{Error, Manager, ManagerConfig};
use mvm_testkit::{artifacts_dir, bin_dir, root_or_skip};

const TENANT: &str = "limits";
const MIB: u64 = 1 << 20;

/// A manager of this test process on mvmd's state: the two share sandboxes as a daemonless
/// `mvm` and mvmd do.
async fn manager_beside(d: &Daemon) -> Manager {
    let mut cfg = ManagerConfig::from_env();
    cfg.state_dir = d.state_dir();
    cfg.run_dir = d.run_dir();
    cfg.bin_dir = bin_dir();
    cfg.cgroup_parent = d.cgroup_parent.clone();
    cfg.subnet = format!("{}0.0", d.subnet_prefix).parse().expect("subnet");
    cfg.artifacts_dir = Some(artifacts_dir());
    Manager::open(cfg).await.expect("open the manager").0
}

fn limits(
    memory_bytes: Option<u64>,
    cpu_quota_us: Option<u64>,
    cpu_period_us: Option<u64>,
) -> LimitsUpdate {
    LimitsUpdate {
        memory_bytes,
        cpu_quota_us,
        cpu_period_us,
    }
}

/// Checks the memory limit and, where swap is accounted, that swap stays off (v1: memsw =
/// memory; v2: `memory.swap.max` 0).
fn assert_memory_limit(cgroups: &LimitCgroups, bytes: u64) {
    match cgroups {
        LimitCgroups::V1 { memory, .. } => {
            assert_eq!(read(memory, "memory.limit_in_bytes"), bytes.to_string());
            if memory.join("memory.memsw.limit_in_bytes").exists() {
                assert_eq!(
                    read(memory, "memory.memsw.limit_in_bytes"),
                    bytes.to_string()
                );
            }
        }
        LimitCgroups::V2(dir) => {
            assert_eq!(read(dir, "memory.max"), bytes.to_string());
            if dir.join("memory.swap.max").exists() {
                assert_eq!(read(dir, "memory.swap.max"), "0");
            }
        }
    }
}

/// Checks the CFS limit in the files of the cgroup version.
fn assert_cpu_quota(cgroups: &LimitCgroups, quota_us: u64, period_us: u64) {
    match cgroups {
        LimitCgroups::V1 { cpu, .. } => {
            assert_eq!(read(cpu, "cpu.cfs_quota_us"), quota_us.to_string());
            assert_eq!(read(cpu, "cpu.cfs_period_us"), period_us.to_string());
        }
        LimitCgroups::V2(dir) => {
            assert_eq!(read(dir, "cpu.max"), format!("{quota_us} {period_us}"));
        }
    }
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file))
        .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
        .trim()
        .to_owned()
}

/// `dd` of one `mib` MiB block: it holds the whole block in memory at once.
async fn dd(m: &Manager, id: &str, mib: u64) -> mvm_sandbox::model::ExecResult {
    let req = ExecRequest {
        cmd: vec![
            "dd".into(),
            "if=/dev/zero".into(),
            "of=/dev/null".into(),
            format!("bs={mib}M"),
            "count=1".into(),
        ],
        ..ExecRequest::default()
    };
    m.exec(TENANT, id, &req).await.expect("exec dd")
}

#[test]
fn limits_of_a_live_jail_sandbox_change_and_hold() {
    if !root_or_skip("limits_of_a_live_jail_sandbox_change_and_hold") {
        return;
    }
    let d = Daemon::start();
    let before = d.host_state();
    block_on(async {
        let m = manager_beside(&d).await;
        m.db()
            .create_tenant(
                TENANT,
                Quota {
                    max_sandboxes: 4,
                    max_vcpus: 2,
                    max_memory_mib: 128,
                },
            )
            .expect("tenant");
        let tenant = m.db().tenant(TENANT).unwrap().expect("tenant row");
        let s = m
            .create(
                &tenant,
                CreateSandbox {
                    isolation: Some(Isolation::Jail),
                    memory_mib: Some(64),
                    vcpus: Some(1),
                    ..CreateSandbox::default()
                },
            )
            .await
            .expect("create");
        let cgroups = m.limit_cgroups(TENANT, &s.id).expect("limit cgroups");
        assert_memory_limit(&cgroups, 64 * MIB);
        assert_cpu_quota(&cgroups, 100_000, 100_000);
        let out = dd(&m, &s.id, 32).await;
        assert_eq!(out.exit.exit_code, Some(0), "32 MiB in 64 MiB: {out:?}");
        assert_eq!(cgroups.oom_kills().unwrap(), 0);

        // Lower both: the files change, the stored size follows, a 32 MiB buffer is now
        // too much and the OOM killer takes it (and the manager counts it).
        let started = std::time::Instant::now();
        let low = m
            .update_limits(
                TENANT,
                &s.id,
                limits(Some(24 * MIB), Some(50_000), Some(200_000)),
            )
            .await
            .expect("lower the limits");
        let update_took = started.elapsed();
        assert_eq!((low.memory_mib, low.vcpus), (24, 1));
        assert_eq!(m.get(TENANT, &s.id).unwrap(), low, "stored as returned");
        assert_memory_limit(&cgroups, 24 * MIB);
        assert_cpu_quota(&cgroups, 50_000, 200_000);
        let out = dd(&m, &s.id, 32).await;
        assert_eq!(
            out.exit.signal,
            Some(libc::SIGKILL),
            "32 MiB in 24 MiB was not killed: {out:?}"
        );
        assert!(cgroups.oom_kills().unwrap() >= 1, "no OOM kill counted");
        // What the shim's OOM watcher costs per look (the cgroups are looked up once).
        let started = std::time::Instant::now();
        for _ in 0..1000 {
            cgroups.oom_kills().unwrap();
        }
        let look = started.elapsed() / 1000;
        let started = std::time::Instant::now();
        m.limit_cgroups(TENANT, &s.id).unwrap();
        eprintln!(
            "update_limits (memory and CPU): {update_took:?}; limit_cgroups look-up: {:?}; \
             oom_kills: {look:?} a look (mean of 1000)",
            started.elapsed()
        );

        // Raise them, the period kept: two cores of quota are stored as 2 vCPUs.
        let high = m
            .update_limits(TENANT, &s.id, limits(Some(96 * MIB), Some(250_000), None))
            .await
            .expect("raise the limits");
        assert_eq!((high.memory_mib, high.vcpus), (96, 2));
        assert_memory_limit(&cgroups, 96 * MIB);
        assert_cpu_quota(&cgroups, 250_000, 200_000);
        let out = dd(&m, &s.id, 32).await;
        assert_eq!(out.exit.exit_code, Some(0), "32 MiB in 96 MiB: {out:?}");

        // Refused, with nothing changed: beyond the tenant's quota, out of bounds.
        let refusals = [
            (Some(256 * MIB), None, None, "MiB of memory"),
            (None, Some(600_000), None, "vCPUs"),
            (Some(MIB), None, None, "16 MiB"),
            (None, None, Some(999), "period"),
            (None, Some(999), None, "quota"),
        ];
        for (memory_bytes, cpu_quota_us, cpu_period_us, says) in refusals {
            let update = limits(memory_bytes, cpu_quota_us, cpu_period_us);
            let err = m
                .update_limits(TENANT, &s.id, update)
                .await
                .expect_err("refused");
            assert!(
                matches!(err, Error::Quota(_) | Error::Invalid(_))
                    && err.to_string().contains(says),
                "{update:?}: {err}"
            );
        }
        assert_eq!(m.get(TENANT, &s.id).unwrap(), high);
        assert_memory_limit(&cgroups, 96 * MIB);
        assert_cpu_quota(&cgroups, 250_000, 200_000);
        let err = m
            .update_limits("someone-else", &s.id, LimitsUpdate::default())
            .await
            .expect_err("another tenant's sandbox");
        assert!(matches!(err, Error::NotFound(_)), "{err}");

        m.destroy(TENANT, &s.id).await.expect("destroy");
        let err = m
            .update_limits(TENANT, &s.id, LimitsUpdate::default())
            .await
            .expect_err("a destroyed sandbox");
        assert!(matches!(err, Error::NotFound(_)), "{err}");
    });
    d.assert_no_leaks(&before);
}
