//! Sandbox benchmark, jail tier (and vm tier where it can run): create → first exec output
//! latency (p50/p99), create+destroy throughput, idle host memory (PSS) per sandbox.
//!
//! As root: `cargo run -p api --example api_bench [-- --iterations N]`. It needs mvm-jailer and
//! mvm-agent next to this binary's deps dir (`cargo build -p jailer -p agent`) and
//! target/mvm-artifacts/rootfs.ext4 (`rootfs/build.sh`). Measures both the library manager
//! (daemonless `mvm run`) and the REST path (mvmd on a unix socket).

mod common;

use std::time::{Duration, Instant};

use common::{arg, echo, report};

use mvm_client::Client;
use mvm_sandbox::db::Quota;
use mvm_sandbox::http::Endpoint;
use mvm_sandbox::model::{CreateSandbox, Isolation};
use mvm_sandbox::Manager;

/// PSS in KiB of `pid` (0 when it is gone).
fn pss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn jail() -> CreateSandbox {
    CreateSandbox {
        isolation: Some(Isolation::Jail),
        ..CreateSandbox::default()
    }
}

fn main() {
    if !mvm_testkit::is_root() {
        mvm_testkit::skip_or_fail_in_ci("api_bench", "needs root (namespaces, cgroups, mounts)");
        return;
    }
    let iterations: usize = arg("--iterations", 200);
    let (dir, cfg) = common::bench_manager("bench");
    let (cores, rt) = common::runtime();
    rt.block_on(async move {
        let (manager, _) = Manager::open(cfg.clone()).await.expect("manager");
        let quota = Quota { max_sandboxes: 1000, max_vcpus: 10_000, max_memory_mib: 1 << 30 };
        manager.db().create_tenant("bench", quota).expect("tenant");
        let tenant = manager.db().tenant("bench").unwrap().unwrap();
        // Warm-up: unpacks the base tree once.
        let s = manager.create(&tenant, jail()).await.expect("warm-up create");
        manager.destroy(&tenant.name, &s.id).await.expect("warm-up destroy");

        println!("mvm sandbox benchmark: jail tier, {cores} cores, {iterations} iterations, dev profile");
        // 1. Library path: create → first exec output.
        let mut lat = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let t = Instant::now();
            let s = manager.create(&tenant, jail()).await.expect("create");
            let out = manager.exec(&tenant.name, &s.id, &echo()).await.expect("exec");
            lat.push(t.elapsed());
            assert_eq!(out.stdout, "ready\n");
            manager.destroy(&tenant.name, &s.id).await.expect("destroy");
        }
        lat.sort();
        report("manager  create→first output", &lat);

        // 2. REST path through an in-process mvmd on a unix socket.
        let socket = dir.path().join("mvmd.sock");
        let served = tokio::spawn(api::server::serve(
            manager.clone(),
            api::server::ServeConfig {
                socket: socket.clone(),
                tcp: None,
                template_dir: dir.path().join("templates"),
            },
        ));
        while tokio::net::UnixStream::connect(&socket).await.is_err() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let token = manager.db().create_tenant("bench", quota).expect("token");
        let client = Client::new(Endpoint::Unix(socket), Some(token));
        let mut lat = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let t = Instant::now();
            let s = client.create(&jail()).await.expect("create");
            let out = client.exec(&s.id, &echo()).await.expect("exec");
            lat.push(t.elapsed());
            assert_eq!(out.stdout, "ready\n");
            client.delete(&s.id).await.expect("delete");
        }
        lat.sort();
        report("REST     create→first output", &lat);

        // 3. Throughput: create+destroy cycles, 2 per core in flight.
        let parallel = 2 * cores;
        let t = Instant::now();
        let mut tasks = Vec::new();
        for w in 0..parallel {
            let (manager, tenant) = (manager.clone(), tenant.clone());
            let n = iterations / parallel + usize::from(w < iterations % parallel);
            tasks.push(tokio::spawn(async move {
                for _ in 0..n {
                    let s = manager.create(&tenant, jail()).await.expect("create");
                    manager.destroy(&tenant.name, &s.id).await.expect("destroy");
                }
            }));
        }
        for task in tasks {
            task.await.expect("worker");
        }
        let rate = iterations as f64 / t.elapsed().as_secs_f64();
        println!(
            "create+destroy: {rate:.1} sandboxes/s with {parallel} in flight = {:.1} per core per s",
            rate / cores as f64
        );

        // 4. Idle memory: the processes of N idle sandboxes (jailer supervisor, pid-ns init, agent).
        let n = 20;
        let mut ids = Vec::new();
        for _ in 0..n {
            ids.push(manager.create(&tenant, jail()).await.expect("create").id);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut pss = 0;
        let mut procs = 0;
        for id in &ids {
            let mut pids: std::collections::BTreeSet<String> = std::fs::read_to_string(format!("/sys/fs/cgroup/pids/{}/{id}/cgroup.procs", cfg.cgroup_parent))
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect();
            pids.extend(mvm_sandbox::manager::jailer_pids(id).iter().map(|p| p.to_string()));
            // The pid-namespace init is in the cgroup and has the jailer's command line.
            procs += pids.len();
            pss += pids.iter().map(|p| pss_kib(p)).sum::<u64>();
        }
        println!(
            "idle sandbox host memory: {:.2} MiB PSS each ({} processes for {n} sandboxes; mvmd itself not counted)",
            pss as f64 / 1024.0 / n as f64,
            procs
        );
        for id in ids {
            manager.destroy(&tenant.name, &id).await.expect("destroy");
        }
        match manager.vm_tier_unavailable() {
            Some(why) => println!("vm tier: not measured: {why}"),
            None => println!("vm tier: available on this host; run the nested harness or this bench with isolation vm"),
        }
        served.abort();
    });
    for c in ["cpu", "cpuacct", "memory", "pids", "freezer"] {
        let _ = std::fs::remove_dir(format!(
            "/sys/fs/cgroup/{c}/mvm-bench-{}",
            std::process::id()
        ));
    }
}
