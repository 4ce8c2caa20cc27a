//! `mvmd`: the REST daemon in front of mvm's sandbox manager ([`mvm_sandbox`]): routes, bearer
//! tokens, body limits, exec streams and websockets, OpenAPI ([`server`]), and the HTTP side of
//! the manager's errors ([`error`]). Its client is the `mvm-client` crate.
//!
//! See `api/README.md` for the REST surface.

mod e2b;
pub mod error;
mod mcp;
pub mod server;

pub use error::{ApiError, Result};
