//! Counters of the virtio devices, shared by all instances of a device type (Firecracker keeps
//! per-type device metrics the same way). Guest mistakes are counted here, never logged per
//! event, so a hostile guest cannot flood the log.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Value};

/// Counters of one device type.
#[derive(Default)]
pub struct DeviceMetrics {
    /// Requests or frames completed.
    pub completed: AtomicU64,
    /// Bytes moved from the guest to the backend.
    pub bytes_out: AtomicU64,
    /// Bytes moved from the backend to the guest.
    pub bytes_in: AtomicU64,
    /// Descriptor chains refused as malformed.
    pub bad_chains: AtomicU64,
    /// Requests answered with an error status (block) or dropped (net, vsock).
    pub failed: AtomicU64,
    /// Backend I/O errors.
    pub backend_errors: AtomicU64,
    /// Times a rate limiter held a queue back.
    pub rate_limited: AtomicU64,
}

impl DeviceMetrics {
    const fn new() -> Self {
        DeviceMetrics {
            completed: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bad_chains: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            backend_errors: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
        }
    }

    /// Adds `n` to `counter`.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// The counters as a JSON object.
    pub fn to_json(&self) -> Value {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        json!({
            "completed": get(&self.completed),
            "bytes_out": get(&self.bytes_out),
            "bytes_in": get(&self.bytes_in),
            "bad_chains": get(&self.bad_chains),
            "failed": get(&self.failed),
            "backend_errors": get(&self.backend_errors),
            "rate_limited": get(&self.rate_limited),
        })
    }
}

/// virtio-blk counters.
pub static BLOCK: DeviceMetrics = DeviceMetrics::new();
/// virtio-net counters.
pub static NET: DeviceMetrics = DeviceMetrics::new();
/// virtio-vsock counters.
pub static VSOCK: DeviceMetrics = DeviceMetrics::new();
/// virtio-balloon counters (`bytes_in`: free guest memory given back to the host).
pub static BALLOON: DeviceMetrics = DeviceMetrics::new();

/// All virtio counters, for the metrics flush: `{"block": {...}, "net": {...}, "vsock": {...},
/// "balloon": {...}}`.
pub fn to_json() -> Value {
    json!({
        "block": BLOCK.to_json(),
        "net": NET.to_json(),
        "vsock": VSOCK.to_json(),
        "balloon": BALLOON.to_json(),
    })
}
