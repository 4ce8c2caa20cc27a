//! mvm's sandbox manager: the one place that knows a sandbox's whole life ([`manager`]), its
//! SQLite state ([`db`]), the model the REST API speaks ([`model`]), limits on held data
//! ([`bounds`]), metrics and errors. No HTTP server: `mvmd` (crate `api`) serves it, the
//! daemonless `mvm` CLI and the containerd shim drive it directly.

pub mod bounds;
pub mod db;
pub mod error;
pub mod http;
pub mod image;
pub mod install;
pub mod manager;
pub mod metrics;
pub mod model;

pub use error::{Error, ErrorBody, Result};
pub use manager::{Manager, ManagerConfig};
