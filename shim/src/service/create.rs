//! Task.Create: the container's root, its sandbox (or its pod's), and its init process.

use std::collections::HashMap;
use std::path::PathBuf;

use containerd_shim::protos::api;
use containerd_shim::protos::events::task::{TaskCreate, TaskIO};
use containerd_shim::protos::protobuf::MessageField;
use mvm_sandbox::manager::ContainerSandbox;
use mvm_sandbox::model::Isolation;

use super::container::{pod_sandbox, Container};
use super::process::{Process, Stdio};
use super::state::unmount;
use super::TaskService;
use crate::error::{Error, Result};
use crate::{mounts, spec};

impl TaskService {
    /// Task.Create: mounts the container's root and makes its sandbox (or adds it to its
    /// pod's); returns the init process's pid as containerd knows it (the sandbox's).
    pub(super) async fn create(&self, req: &api::CreateTaskRequest) -> Result<u32> {
        let mut containers = self.inner.containers.lock().await;
        if containers.contains_key(&req.id) {
            return Err(Error::State(format!("container {} exists already", req.id)));
        }
        let bundle = PathBuf::from(&req.bundle);
        let oci = spec::load(&bundle)?;
        let (manager, tenant) = self.manager().await?;
        let isolation = spec::isolation(&oci, manager.config().default_isolation)?;
        let process = oci
            .process()
            .as_ref()
            .ok_or_else(|| Error::Invalid("the OCI spec has no process".into()))?;
        let rootfs = spec::rootfs(&oci, &bundle);
        for m in &req.rootfs {
            containerd_shim::asynchronous::util::mount_rootfs(m, &rootfs)
                .await
                .map_err(|e| {
                    Error::host(format!("mounting the rootfs at {}", rootfs.display()), e)
                })?;
        }
        // Kubernetes' /etc/hosts, secrets, volumes...: under the root before the sandbox is
        // made from it.
        match mounts::bind_spec_mounts(&oci, &rootfs) {
            Ok(skipped) if !skipped.is_empty() => log::debug!(
                "container {}: mounts the sandbox provides itself, not applied: {}",
                req.id,
                skipped.join(", ")
            ),
            Ok(_) => {}
            Err(e) => {
                if let Err(u) = unmount(&rootfs) {
                    log::error!("{u}");
                }
                return Err(e);
            }
        }
        let pod = match spec::pod_role(&oci) {
            spec::PodRole::Member { sandbox } => Some(sandbox),
            spec::PodRole::Own => None,
        };
        let joined = match pod.as_deref().map(|p| pod_sandbox(&containers, p)) {
            Some(Some(sandbox)) if sandbox.isolation == Isolation::Vm => Some(sandbox),
            // Jail-tier pods: each container in a jail of its own.
            Some(Some(_)) | None => None,
            Some(None) => {
                let _ = unmount(&rootfs);
                return Err(Error::State(format!(
                    "container {} joins pod {}, whose sandbox container this shim does not run",
                    req.id,
                    pod.unwrap_or_default()
                )));
            }
        };
        // A jail-tier pod's further container joins the network namespace its pod's sandbox
        // container joined: CRI names it `/proc/<pid>/ns/net` by the pid this shim gave for
        // that container (the jailer's, which is not in it: the container would get the
        // host's network).
        let pod_netns = pod
            .as_deref()
            .and_then(|p| pod_sandbox(&containers, p))
            .and_then(|s| s.network.netns)
            .map(PathBuf::from);
        let tier = joined.as_ref().map_or(isolation, |s| s.isolation);
        let mut request = match spec::exec_request(process, tier, !req.stdin.is_empty()) {
            Ok(r) => r,
            Err(e) => {
                let _ = unmount(&rootfs);
                return Err(e);
            }
        };
        let made = match &joined {
            Some(sandbox) => manager
                .add_container(&tenant.name, &sandbox.id, &req.id, &rootfs)
                .await
                .map(|root| (sandbox.clone(), Some(root))),
            None => {
                let sandbox_req = spec::sandbox_request(&oci, isolation, &req.id);
                // Jail tier: the mounted snapshot is the jail's root. Vm tier: the guest's
                // root is an ext4 copy of it, made before this call returns; a pod's first
                // container gets drive slots for the others.
                let container = ContainerSandbox {
                    rootfs: rootfs.clone(),
                    pod: spec::is_pod_sandbox(&oci) && isolation == Isolation::Vm,
                    netns: pod_netns.or_else(|| spec::network_namespace(&oci)),
                };
                manager
                    .create_for_container(tenant, sandbox_req, container)
                    .await
                    .map(|s| (s, None))
            }
        };
        let (sandbox, root) = match made {
            Ok(made) => made,
            Err(e) => {
                if let Err(u) = unmount(&rootfs) {
                    log::error!("{u}");
                }
                log::error!(
                    "container {}: {}-tier sandbox: {e}",
                    req.id,
                    isolation.as_str()
                );
                return Err(match e {
                    mvm_sandbox::Error::TierUnavailable(why) => {
                        mvm_sandbox::Error::TierUnavailable(format!(
                            "{why}. Use the jail tier: annotate the container with {}=jail, \
                             or give containerd MVM_ISOLATION=jail",
                            spec::ISOLATION_ANNOTATION
                        ))
                    }
                    e => e,
                }
                .into());
            }
        };
        match &root {
            Some(root) => log::info!(
                "container {} joins pod sandbox {} with its root at {root}",
                req.id,
                sandbox.id
            ),
            None => log::info!(
                "container {} runs in sandbox {} ({} tier)",
                req.id,
                sandbox.id,
                sandbox.isolation.as_str()
            ),
        }
        request.root = root.clone();
        let pid = self.sandbox_pid(&sandbox.id);
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        let mut init = Process::new(request, stdio.clone());
        init.pid = pid;
        // One OOM watch per sandbox: a pod's further containers share their pod's.
        let oom = root.is_none().then(|| self.watch_oom(&req.id, &sandbox.id));
        containers.insert(
            req.id.clone(),
            Container {
                id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs,
                sandbox,
                root,
                paused: false,
                init,
                execs: HashMap::new(),
                oom,
            },
        );
        drop(containers);
        self.publish(
            containerd_shim::protos::topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: stdio.stdin,
                    stdout: stdio.stdout,
                    stderr: stdio.stderr,
                    terminal: stdio.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        )
        .await;
        Ok(pid)
    }

    /// The host pid of the sandbox (its jailer).
    fn sandbox_pid(&self, id: &str) -> u32 {
        self.inner
            .manager
            .get()
            .and_then(|(m, _)| m.db().sandbox(id).ok().flatten())
            .map(|row| row.pid)
            .unwrap_or(0)
    }
}
