//! mvm's micro-VM monitor: one KVM guest per process, configured with Firecracker's JSON and
//! served over a Firecracker-compatible HTTP API on a unix socket.
//!
//! Layout (after Firecracker's `src/vmm` and rust-vmm's vmm-reference), in layers that depend
//! one way: each uses only the layers before it, never one after it.
//!
//! 1. [`arch`]: the x86_64 guest layout and boot state (zero page, PVH, MP table, registers).
//! 2. [`vstate`]: KVM: guest memory, the VM, its vCPUs and the buses their exits go to.
//! 3. [`devices`]: the emulated hardware (legacy PC devices, virtio) placed on those buses.
//!    [`snapshot`]: the state of those layers in a snapshot file, and guest memory in its own.
//! 4. [`builder`]: a configuration → a running VM (memory, kernel, devices, vCPUs).
//! 5. [`controller`]: the one narrow door the API and the config file use to reach the VM.
//! 6. [`api_server`]: HTTP requests → [`controller::VmmAction`]s, carried to the VMM thread
//!    over its [`api_server::channel`].
//! 7. [`event_loop`]: the VMM thread: exits, signals, requests from that channel, console
//!    input.
//! 8. `main.rs`: flags → configuration → controller → event loop.
//!
//! Utilities outside the layers: [`exit`], [`metrics`], [`seccomp`] and [`timer`] use no other
//! module and serve every layer; [`config`] (checked against [`arch`]'s limits and
//! [`vstate::memory`]'s size rule), and [`logger`] and [`rate_limiter`] (built from config),
//! serve the layers from [`devices`] up.
//!
//! The event loop takes the API server's channel, not the reverse (as Firecracker's API
//! adapter takes its `api_server` crate's channel): the HTTP side knows nothing of the loop
//! that answers it. No back-edge is kept.

pub mod api_server;
pub mod arch;
pub mod builder;
pub mod config;
pub mod controller;
pub mod devices;
pub mod event_loop;
pub mod exit;
pub mod logger;
pub mod metrics;
pub mod rate_limiter;
pub mod seccomp;
pub mod snapshot;
pub mod timer;
pub mod vstate;
