//! Prometheus counters and histograms of the manager, rendered in the text exposition format.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds (seconds) of the create-latency histogram buckets.
const BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// A cumulative histogram of durations.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if s <= *bound {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                self.counts[i].load(Ordering::Relaxed)
            );
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_us.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {count}");
    }
}

/// The manager's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Sandbox create → ready latency.
    pub create_seconds: Histogram,
    /// Sandboxes created.
    pub created: AtomicU64,
    /// Of those, vm-tier sandboxes restored from a warm template's snapshot.
    pub restored: AtomicU64,
    /// Creates answered with a sandbox of a warm pool (made and counted as created and
    /// restored before).
    pub pool_taken: AtomicU64,
    /// Fork children loaded into a VMM of a fork pool (counted as created and restored).
    pub fork_pool_taken: AtomicU64,
    /// Creates that failed (and were rolled back).
    pub create_failures: AtomicU64,
    /// Sandboxes destroyed (by request, timeout or reconciliation).
    pub destroyed: AtomicU64,
    /// Execs started.
    pub execs: AtomicU64,
}

/// Point-in-time facts rendered next to the counters.
pub struct Snapshot {
    /// (state, count).
    pub by_state: Vec<(&'static str, u64)>,
    /// (id, tenant, isolation, cpu ns, memory bytes).
    pub per_sandbox: Vec<(String, String, &'static str, u64, u64)>,
    /// Render the counters of the whole daemon too (admin only: they count every tenant).
    pub daemon_wide: bool,
}

fn counter(out: &mut String, name: &str, help: &str, v: &AtomicU64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
        v.load(Ordering::Relaxed)
    );
}

impl Metrics {
    /// The Prometheus text of the metrics plus `snap`.
    pub fn render(&self, snap: &Snapshot) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP mvm_sandboxes Sandboxes by state.\n# TYPE mvm_sandboxes gauge"
        );
        for (state, n) in &snap.by_state {
            let _ = writeln!(out, "mvm_sandboxes{{state=\"{state}\"}} {n}");
        }
        if snap.daemon_wide {
            self.render_daemon_wide(&mut out);
        }
        let _ = writeln!(out, "# HELP mvm_sandbox_cpu_seconds_total CPU time of a sandbox.\n# TYPE mvm_sandbox_cpu_seconds_total counter");
        for (id, tenant, iso, cpu, _) in &snap.per_sandbox {
            let _ = writeln!(
                out,
                "mvm_sandbox_cpu_seconds_total{{id=\"{id}\",tenant=\"{tenant}\",isolation=\"{iso}\"}} {}",
                *cpu as f64 / 1e9
            );
        }
        let _ = writeln!(out, "# HELP mvm_sandbox_memory_bytes Memory charged to a sandbox.\n# TYPE mvm_sandbox_memory_bytes gauge");
        for (id, tenant, iso, _, mem) in &snap.per_sandbox {
            let _ = writeln!(out, "mvm_sandbox_memory_bytes{{id=\"{id}\",tenant=\"{tenant}\",isolation=\"{iso}\"}} {mem}");
        }
        out
    }

    /// The counters of the whole daemon: creates, their latency, failures, destroys, execs.
    fn render_daemon_wide(&self, out: &mut String) {
        self.create_seconds.render(
            out,
            "mvm_sandbox_create_seconds",
            "Time from create request to a ready agent.",
        );
        counter(
            out,
            "mvm_sandboxes_created_total",
            "Sandboxes created.",
            &self.created,
        );
        counter(
            out,
            "mvm_sandboxes_restored_total",
            "Sandboxes created by restoring a warm template's snapshot.",
            &self.restored,
        );
        counter(
            out,
            "mvm_warm_pool_taken_total",
            "Creates answered with a warm pool's sandbox (counted as created when it was made).",
            &self.pool_taken,
        );
        counter(
            out,
            "mvm_fork_pool_taken_total",
            "Fork children loaded into a fork pool's started VMM.",
            &self.fork_pool_taken,
        );
        counter(
            out,
            "mvm_sandbox_create_failures_total",
            "Failed (rolled back) creates.",
            &self.create_failures,
        );
        counter(
            out,
            "mvm_sandboxes_destroyed_total",
            "Sandboxes destroyed.",
            &self.destroyed,
        );
        counter(out, "mvm_execs_total", "Execs started.", &self.execs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let m = Metrics::default();
        m.create_seconds.observe(Duration::from_millis(7));
        m.create_seconds.observe(Duration::from_millis(300));
        let text = m.render(&Snapshot {
            by_state: vec![("running", 2)],
            per_sandbox: vec![],
            daemon_wide: true,
        });
        assert!(
            text.contains("mvm_sandbox_create_seconds_bucket{le=\"0.005\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("mvm_sandbox_create_seconds_bucket{le=\"0.01\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("mvm_sandbox_create_seconds_bucket{le=\"0.5\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("mvm_sandbox_create_seconds_count 2"),
            "{text}"
        );
        assert!(
            text.contains("mvm_sandboxes{state=\"running\"} 2"),
            "{text}"
        );
    }
}
