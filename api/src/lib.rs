//! mvm's front door: the sandbox manager ([`manager`]), the `mvmd` REST daemon ([`server`]) and
//! its client ([`client`]), used by the `mvm` CLI.
//!
//! See `api/README.md` for the REST surface.

pub mod bounds;
pub mod client;
pub mod db;
pub mod error;
pub mod http;
pub mod manager;
pub mod metrics;
pub mod model;
pub mod server;

pub use error::{Error, ErrorBody, Result};
pub use manager::{Manager, ManagerConfig};
