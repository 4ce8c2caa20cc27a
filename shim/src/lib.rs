//! `containerd-shim-mvm-v2`: containerd's runtime v2 Task service backed by mvm sandboxes.
//!
//! One shim process per pod (or per container outside a pod); one sandbox per pod in the vm
//! tier (the pod's further containers get their own roots in it), one per container in the
//! jail tier; managed in-process through [`mvm_sandbox::Manager`] (daemonless, like `mvm run`) with
//! state under `/run/mvm-shim/<namespace>/<hash of the pod's id>`. The container's processes (init and execs) run through
//! the sandbox's agent; their stdio is pumped between the agent and the FIFOs containerd hands
//! over, and their exits are published to containerd as `/tasks/exit` events.

pub mod error;
mod io;
mod mounts;
pub mod service;
pub mod spec;

pub use service::MvmShim;
