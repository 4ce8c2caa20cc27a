//! What the manager benchmarks share: their manager's directories and helpers, percentiles.

use std::path::PathBuf;
use std::time::Duration;

use mvm_sandbox::model::ExecRequest;
use mvm_sandbox::ManagerConfig;

/// The value after `name` on the command line, or `default`.
pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The host's cores, and a multi-threaded runtime on them.
pub fn runtime() -> (usize, tokio::runtime::Runtime) {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    (cores, rt)
}

/// The `p` (0 to 1) percentile of `sorted`.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `WHAT: p50 … ms  p99 … ms  (min …, max …)` of `sorted`.
pub fn report(what: &str, sorted: &[Duration]) {
    println!(
        "{what}: p50 {:.1} ms  p99 {:.1} ms  (min {:.1}, max {:.1})",
        ms(percentile(sorted, 0.5)),
        ms(percentile(sorted, 0.99)),
        ms(sorted[0]),
        ms(sorted[sorted.len() - 1])
    );
}

/// `echo ready`: the first output a benchmark waits for.
pub fn echo() -> ExecRequest {
    ExecRequest {
        cmd: vec!["echo".into(), "ready".into()],
        ..ExecRequest::default()
    }
}

/// A manager configuration of its own in a new temporary directory (returned: the
/// directory goes when it is dropped), with the helpers next to this example's binary
/// (`cargo build -p jailer -p agent`) and the project's artifacts.
pub fn bench_manager(name: &str) -> (tempfile::TempDir, ManagerConfig) {
    let exe = std::env::current_exe().expect("current exe");
    // <target>/<profile>/examples/<name> → <target>/<profile>
    let bin_dir: PathBuf = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("bin dir")
        .to_path_buf();
    for b in ["mvm-jailer", "mvm-agent"] {
        assert!(
            bin_dir.join(b).is_file(),
            "{} missing: cargo build -p jailer -p agent",
            bin_dir.join(b).display()
        );
    }
    let dir = tempfile::Builder::new()
        .prefix(&format!("mvm-{name}"))
        .tempdir()
        .expect("tempdir");
    let mut cfg = ManagerConfig::from_env();
    cfg.state_dir = dir.path().join("state");
    cfg.run_dir = dir.path().join("run");
    cfg.bin_dir = bin_dir;
    cfg.cgroup_parent = format!("mvm-{name}-{}", std::process::id());
    cfg.artifacts_dir = Some(mvm_testkit::artifacts_dir());
    (dir, cfg)
}
