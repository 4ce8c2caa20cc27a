//! mvm's micro-VM monitor: one KVM guest per process, configured with Firecracker's JSON and
//! served over a Firecracker-compatible HTTP API on a unix socket.
//!
//! Layout (after Firecracker's `src/vmm` and rust-vmm's vmm-reference): [`config`] holds the
//! JSON types, [`builder`] turns a configuration into a running VM, [`vstate`] wraps KVM,
//! [`arch`] writes the x86_64 boot state, [`devices`] emulates hardware, [`controller`] is the
//! one narrow door the API and the config file use to reach the VM, and [`event_loop`] runs it.

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
pub mod timer;
pub mod vstate;
