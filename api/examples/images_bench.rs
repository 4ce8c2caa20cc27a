//! Image benchmark (issue 18 §1): pull+unpack throughput from a local registry (Debian's
//! `docker-registry` on loopback) into a cold cache, and create → first exec output of a
//! sandbox from that image (cached) vs from the default template, interleaved in one run.
//!
//! As root: `cargo run -p api --example images_bench [-- --isolation jail|vm] [--pulls N]
//! [--iterations N] [--mib N]`. It needs mvm-jailer and mvm-agent next to this binary's deps
//! dir (`cargo build -p jailer -p agent`), the base image (`rootfs/build.sh`; the vm tier also
//! the guest kernel) and /usr/bin/docker-registry. The image is busybox plus three layers of
//! generated files (`--mib` in all, default 64: half incompressible, half text-like), so the
//! gzip ratio is near a real image's. Prints figures only.

mod common;

use std::time::Instant;

use common::{arg, echo, ms, percentile, report};

use mvm_sandbox::db::Quota;
use mvm_sandbox::image::ImageStore;
use mvm_sandbox::model::{CreateSandbox, Isolation};
use mvm_sandbox::Manager;
use mvm_testkit::registry::{busybox_layer, config_blob, layer, Auth, Entry, Registry};

/// Generated layers besides busybox's.
const LAYERS: usize = 3;
/// Size of a generated file.
const FILE_SIZE: usize = 256 << 10;

/// `n` bytes: incompressible (xorshift) for odd `seed`s, words repeated with variation for
/// even ones.
fn content(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    if seed % 2 == 1 {
        (0..n).map(|_| next() as u8).collect()
    } else {
        const WORDS: [&str; 8] = [
            "sandbox ", "image ", "layer ", "config ", "return ", "struct ", "{\n", "}\n",
        ];
        let mut out = Vec::with_capacity(n + 16);
        while out.len() < n {
            out.extend_from_slice(WORDS[(next() % 8) as usize].as_bytes());
            if next() % 16 == 0 {
                out.extend_from_slice(format!("{} ", next() % 100_000).as_bytes());
            }
        }
        out.truncate(n);
        out
    }
}

/// The generated layers: `mib` MiB of files in all.
fn data_layers(mib: usize) -> Vec<Vec<u8>> {
    let files_per_layer = (mib << 20) / FILE_SIZE / LAYERS;
    (0..LAYERS)
        .map(|l| {
            let files: Vec<(String, Vec<u8>)> = (0..files_per_layer)
                .map(|f| {
                    let seed = (l * files_per_layer + f) as u64;
                    (format!("data/l{l}/f{f}"), content(seed, FILE_SIZE))
                })
                .collect();
            let dir = format!("data/l{l}/");
            let mut entries = vec![Entry::Dir("data/", 0o755), Entry::Dir(&dir, 0o755)];
            entries.extend(files.iter().map(|(p, d)| Entry::File(p, 0o644, d)));
            layer(&entries)
        })
        .collect()
}

fn main() {
    if !mvm_testkit::is_root() {
        mvm_testkit::skip_or_fail_in_ci("images_bench", "needs root (namespaces, cgroups)");
        return;
    }
    let isolation = match arg("--isolation", "jail".to_owned()).as_str() {
        "vm" => Isolation::Vm,
        _ => Isolation::Jail,
    };
    let pulls: usize = arg("--pulls", 5).max(1);
    let iterations: usize = arg("--iterations", 50).max(1);
    let mib: usize = arg("--mib", 64);
    let registry = Registry::start(Auth::Anonymous).expect("docker-registry");
    let mut layers = vec![busybox_layer()];
    layers.extend(data_layers(mib));
    let unpacked: usize = layers.iter().map(Vec::len).sum();
    let config = config_blob(serde_json::json!({"Env": ["PATH=/bin"]}), "amd64");
    let pushed = registry.push_image("bench/app", "v1", &layers, config);
    let reference = format!("{}/bench/app:v1", registry.host);
    let compressed: u64 = layers
        .iter()
        .map(|l| mvm_testkit::registry::gzip(l).len() as u64)
        .sum();

    let (dir, cfg) = common::bench_manager("images-bench");
    let (cores, rt) = common::runtime();
    rt.block_on(async move {
        println!(
            "mvm image benchmark: {isolation:?} tier, {cores} cores, image of {} layers: \
             {:.1} MiB unpacked tar, {:.1} MiB gzip; {pulls} cold pulls, {iterations} creates \
             of each kind, dev profile",
            layers.len(),
            unpacked as f64 / (1 << 20) as f64,
            compressed as f64 / (1 << 20) as f64,
        );
        // 1. Pull+unpack, cold cache each time (a fresh cache directory).
        let mut times = Vec::with_capacity(pulls);
        for i in 0..pulls {
            let state = dir.path().join(format!("pull-{i}"));
            let store = ImageStore::new(&state);
            let t = Instant::now();
            let image = store.pull(&reference, None).await.expect("pull");
            times.push(t.elapsed());
            assert_eq!(image.digest, pushed.digest);
            std::fs::remove_dir_all(&state).expect("removing a cache");
        }
        times.sort();
        let p50 = percentile(&times, 0.5).as_secs_f64();
        println!(
            "pull+unpack (cold cache): p50 {:.0} ms, {:.1} MB/s of layers (gzip), {:.1} MB/s \
             unpacked (min {:.0} ms, max {:.0} ms)",
            p50 * 1e3,
            compressed as f64 / 1e6 / p50,
            unpacked as f64 / 1e6 / p50,
            ms(times[0]),
            ms(times[times.len() - 1]),
        );

        // 2. create → first output: the default template vs the cached image, interleaved.
        let (manager, _) = Manager::open(cfg).await.expect("manager");
        manager
            .images()
            .pull(&reference, None)
            .await
            .expect("pull into the manager's cache");
        let quota = Quota {
            max_sandboxes: 1000,
            max_vcpus: 10_000,
            max_memory_mib: 1 << 30,
        };
        manager.db().create_tenant("bench", quota).expect("tenant");
        let tenant = manager.db().tenant("bench").unwrap().unwrap();
        let template = CreateSandbox {
            isolation: Some(isolation),
            ..CreateSandbox::default()
        };
        let from_image = CreateSandbox {
            image: Some(reference.clone()),
            ..template.clone()
        };
        let mut lat = [Vec::new(), Vec::new()];
        // One warm-up round (the template's base tree is unpacked on first use), then the
        // measured ones.
        for round in 0..=iterations {
            for (kind, req) in [&template, &from_image].into_iter().enumerate() {
                let t = Instant::now();
                let s = manager.create(&tenant, req.clone()).await.expect("create");
                let out = manager
                    .exec(&tenant.name, &s.id, &echo())
                    .await
                    .expect("exec");
                let took = t.elapsed();
                assert_eq!(out.stdout, "ready\n");
                manager.destroy(&tenant.name, &s.id).await.expect("destroy");
                if round > 0 {
                    lat[kind].push(took);
                }
            }
        }
        for l in &mut lat {
            l.sort();
        }
        report("create→first output, default template", &lat[0]);
        report("create→first output, cached image   ", &lat[1]);
        println!(
            "image / template: p50 {:.2}×, p99 {:.2}×",
            percentile(&lat[1], 0.5).as_secs_f64() / percentile(&lat[0], 0.5).as_secs_f64(),
            percentile(&lat[1], 0.99).as_secs_f64() / percentile(&lat[0], 0.99).as_secs_f64(),
        );
    });
}
