//! VMM metrics (Firecracker's `metrics` section): counters flushed as one JSON object per line.
//! A leaf module: every layer counts here, and it imports none of them.

pub mod virtio;

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use serde_json::json;

/// Counters updated on hot paths with relaxed atomics.
#[derive(Default)]
pub struct Counters {
    /// API requests handled.
    pub api_requests: AtomicU64,
    /// API requests that failed.
    pub api_errors: AtomicU64,
    /// Port-I/O exits.
    pub vcpu_exits_io: AtomicU64,
    /// MMIO exits.
    pub vcpu_exits_mmio: AtomicU64,
    /// Bytes of host input given to the guest's serial console.
    pub serial_bytes_in: AtomicU64,
    /// Bytes of guest console output dropped to keep the console file within its limit.
    pub serial_bytes_dropped: AtomicU64,
}

/// The VMM's counters.
pub static METRICS: Counters = Counters {
    api_requests: AtomicU64::new(0),
    api_errors: AtomicU64::new(0),
    vcpu_exits_io: AtomicU64::new(0),
    vcpu_exits_mmio: AtomicU64::new(0),
    serial_bytes_in: AtomicU64::new(0),
    serial_bytes_dropped: AtomicU64::new(0),
};

/// Adds one to a counter.
pub fn inc(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Adds `n` to a counter.
pub fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Errors of the metrics sink.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The metrics file could not be opened.
    #[error("cannot open metrics_path {0}: {1}")]
    Open(String, std::io::Error),
    /// A flush failed.
    #[error("cannot write metrics: {0}")]
    Write(std::io::Error),
}

/// Where metrics go once configured.
pub struct MetricsSink {
    file: File,
    started: Instant,
}

impl MetricsSink {
    /// Opens `path` (file or FIFO) for appending.
    pub fn open(path: &str, started: Instant) -> Result<Self, MetricsError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| MetricsError::Open(path.to_string(), e))?;
        Ok(MetricsSink { file, started })
    }

    /// Writes the current counters as one JSON line.
    pub fn flush(&mut self) -> Result<(), MetricsError> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let m = &METRICS;
        let line = json!({
            "utc_timestamp_ms": std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            "uptime_ms": self.started.elapsed().as_millis() as u64,
            "api_server": {"requests": get(&m.api_requests), "errors": get(&m.api_errors)},
            "vcpu": {"exits_io": get(&m.vcpu_exits_io), "exits_mmio": get(&m.vcpu_exits_mmio)},
            "uart": {
                "bytes_in": get(&m.serial_bytes_in),
                "bytes_dropped": get(&m.serial_bytes_dropped),
            },
            "virtio": virtio::to_json(),
        });
        writeln!(self.file, "{line}").map_err(MetricsError::Write)
    }
}
