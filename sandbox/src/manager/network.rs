//! Changing the network policy of a running sandbox.

use super::{blocking, net, Manager};
use crate::error::{Error, Result};
use crate::model::{Egress, NetworkSpec, NetworkUpdate, Sandbox, SandboxState};

impl Manager {
    /// Replaces the allow list of `tenant`'s sandbox `id` (running, paused or saved, with egress
    /// `allow` in a namespace of the manager's): what the new list does not name is closed at
    /// once (connections already open stay open), the names it adds resolve from the next
    /// query on.
    pub async fn update_network(
        &self,
        tenant: &str,
        id: &str,
        update: NetworkUpdate,
    ) -> Result<Sandbox> {
        let mut row = self.row(tenant, id)?;
        let s = &row.sandbox;
        if !matches!(
            s.state,
            SandboxState::Running | SandboxState::Paused | SandboxState::Saved
        ) {
            return Err(Error::Conflict(format!(
                "sandbox {id} is {:?}; only a running, paused or saved sandbox's network changes",
                s.state
            )));
        }
        if s.network.egress != Egress::Allow || s.network.netns.is_some() {
            return Err(Error::Conflict(format!(
                "sandbox {id} has egress {:?}{}: only the allow list of a sandbox made with \
                 egress \"allow\" can be changed (make a new sandbox for another egress mode)",
                s.network.egress,
                if s.network.netns.is_some() {
                    " in its pod's network"
                } else {
                    ""
                }
            )));
        }
        let spec = net::validate(&NetworkSpec {
            egress: Egress::Allow,
            allow: update.allow,
        })?;
        let (netns, sandbox_id) = (self.inner.cfg.netns(id), id.to_owned());
        let applied = spec.clone();
        blocking(move || net::update_allow(&netns, &sandbox_id, &applied)).await?;
        row.sandbox.network.allow = spec.allow;
        self.inner.db.update_sandbox(&row)?;
        Ok(row.sandbox)
    }
}
