//! The shim process (containerd's `start` and `delete` actions) and the Task service it
//! serves, as containerd's runc shim `manager` does.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use containerd_shim::asynchronous::{spawn, ExitSignal, Shim};
use containerd_shim::protos::api;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Flags, StartOpts};
use tokio::sync::{Mutex, OnceCell};

use super::process::Exit;
use super::state::{cleanup, state_dir, unmount};
use super::{Inner, TaskService};
use crate::spec;

/// The shim: one per pod (or per container outside a pod).
pub struct MvmShim {
    namespace: String,
    id: String,
    /// containerd's address: with namespace and id it names this shim's socket.
    address: String,
    exit: Arc<ExitSignal>,
}

impl MvmShim {
    /// Removes this shim's socket (the containerd-shim crate leaves it behind).
    fn remove_socket(&self) {
        let address = containerd_shim::socket_address(&self.address, &self.namespace, &self.id);
        let path = address.trim_start_matches("unix://");
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                log::warn!("removing the shim socket {path}: {e}")
            }
            _ => {}
        }
    }
}

#[async_trait]
impl Shim for MvmShim {
    type T = TaskService;

    /// The reaper settings are main's: the crate reads them before calling this.
    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        MvmShim {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            address: args.address.clone(),
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        // containerd runs this in the bundle. The containers of a pod share the shim of its
        // first container: a second spawn finds that shim's socket taken and answers with it.
        let bundle = std::env::current_dir().unwrap_or_default();
        let grouping = match spec::load(&bundle) {
            Ok(oci) => spec::shim_grouping(&oci, &opts.id),
            Err(e) => {
                log::warn!("container {}: {e}; it gets a shim of its own", opts.id);
                opts.id.clone()
            }
        };
        spawn(opts, &grouping, Vec::new()).await
    }

    async fn delete_shim(&mut self) -> containerd_shim::Result<api::DeleteResponse> {
        // containerd calls this after a shim died: remove whatever it left.
        let bundle = std::env::current_dir().unwrap_or_default();
        let oci = spec::load(&bundle).ok();
        let rootfs = oci
            .as_ref()
            .map(|s| spec::rootfs(s, &bundle))
            .unwrap_or_else(|| bundle.join("rootfs"));
        let outcome = match oci.as_ref().map(spec::pod_role) {
            // The pod's shim state goes with the pod's first container.
            Some(spec::PodRole::Member { .. }) => unmount(&rootfs),
            _ => {
                self.remove_socket();
                cleanup(&state_dir(&self.namespace, &self.id), Some(&rootfs)).await
            }
        };
        outcome.map_err(|e| containerd_shim::Error::Other(e.to_string()))?;
        let mut resp = api::DeleteResponse::new();
        resp.exit_status = 128 + libc::SIGKILL as u32;
        resp.exited_at = Exit::now(resp.exit_status).timestamp();
        Ok(resp)
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // Connected clients keep their connections; nobody new finds a dead shim.
        self.remove_socket();
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        TaskService {
            inner: Arc::new(Inner {
                namespace: self.namespace.clone(),
                dir: state_dir(&self.namespace, &self.id),
                publisher,
                exit: Arc::clone(&self.exit),
                manager: OnceCell::new(),
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }
}
