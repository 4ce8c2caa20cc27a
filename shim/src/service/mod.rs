//! The shim (start/delete actions) and the Task service, laid out like containerd's runc
//! shim: [`shim`] (the process containerd starts), [`task`] (the ttrpc façade), [`create`]
//! and [`container`] (containers and their sandboxes), [`process`] (init and execs), [`oom`]
//! (OOM events), [`resources`] (Update and Stats) and [`state`] (the shim's directory and
//! sandbox manager).

mod container;
mod create;
mod oom;
mod process;
mod resources;
mod shim;
mod state;
mod task;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim::asynchronous::ExitSignal;
use containerd_shim::event::Event;
use containerd_shim::protos::ttrpc::context::Context;
use containerd_shim::publisher::RemotePublisher;
use mvm_sandbox::db::Tenant;
use mvm_sandbox::Manager;
use tokio::sync::{Mutex, OnceCell};

use crate::error::Result;
use container::Container;

pub use shim::MvmShim;

/// What the Task service's calls share: the shim's sandbox manager and containers.
struct Inner {
    namespace: String,
    dir: PathBuf,
    publisher: RemotePublisher,
    exit: Arc<ExitSignal>,
    manager: OnceCell<(Manager, Tenant)>,
    containers: Mutex<HashMap<String, Container>>,
}

/// containerd's Task service for the containers of one pod (or one container).
#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl TaskService {
    /// The shim's sandbox manager and tenant, opened at the first call that needs them.
    async fn manager(&self) -> Result<&(Manager, Tenant)> {
        self.inner
            .manager
            .get_or_try_init(|| state::open_manager(&self.inner.dir))
            .await
    }

    /// Publishes `event` to containerd under `topic` (a failure is logged).
    async fn publish(&self, topic: &str, event: Box<dyn Event>) {
        if let Err(e) = self
            .inner
            .publisher
            .publish(Context::default(), topic, &self.inner.namespace, event)
            .await
        {
            log::error!("publishing {topic}: {e}");
        }
    }
}
