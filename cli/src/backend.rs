//! Where the CLI's commands go: a running mvmd (when `MVM_HOST`/`--host` is set or the default
//! socket answers), or an in-process sandbox manager (daemonless, like podman).

use std::io::Write;
use std::path::Path;

use api::server::templates::TemplateDirs;
use api::server::{DEFAULT_SOCKET, TOKEN_FILE};
use mvm_client::{Client, ClientError, Stream};
use mvm_sandbox::db::Tenant;
use mvm_sandbox::image::Credentials;
use mvm_sandbox::model::{
    CreateSandbox, CreateSnapshot, ExecRequest, ExitInfo, Image, PrunedImages, PullImage,
    RemovedImage, Sandbox, SandboxUsage, Snapshot, Template, WarmRequest, WsControl,
};
use mvm_sandbox::{Manager, ManagerConfig};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;

/// Errors of the CLI.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// From mvmd.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// From the in-process manager.
    #[error(transparent)]
    Manager(#[from] mvm_sandbox::Error),
    /// From the agent, in daemonless mode.
    #[error("sandbox agent: {0}")]
    Agent(#[from] agent::ClientError),
    /// Local files or terminal.
    #[error("{0}")]
    Local(String),
}

impl CliError {
    /// The stable code of an mvmd or manager error (as in mvmd's `{code, message}`).
    pub fn code(&self) -> Option<&str> {
        match self {
            CliError::Client(ClientError::Api { body, .. }) => Some(&body.code),
            CliError::Manager(e) => Some(e.code()),
            _ => None,
        }
    }
}

/// The target of the commands.
pub enum Backend {
    /// A running mvmd.
    Daemon(Client),
    /// Daemonless: this process manages sandboxes itself (tenant `default`).
    Local {
        /// The manager.
        manager: Manager,
        /// The tenant every sandbox belongs to.
        tenant: Tenant,
    },
}

fn write_out(stream: Stream, data: &[u8]) {
    // A closed stdout/stderr (e.g. `| head`) must not abort the sandbox's command.
    let _ = match stream {
        Stream::Stdout => {
            let mut o = std::io::stdout().lock();
            o.write_all(data).and_then(|()| o.flush())
        }
        Stream::Stderr => {
            let mut e = std::io::stderr().lock();
            e.write_all(data).and_then(|()| e.flush())
        }
    };
}

/// Applies a control to a daemonless exec (mvmd does the same for the websocket's).
async fn apply(exec: &agent::ExecControl, control: WsControl) -> Result<(), CliError> {
    let done = match control {
        WsControl::Resize { rows, cols } => exec.resize(rows, cols).await,
        WsControl::Signal { signal } => exec.signal(signal).await,
        // The end of stdin is the local stdin's.
        WsControl::Eof => Ok(()),
    };
    match done {
        // The process ended meanwhile: its exit status is on its way.
        Err(e) if e.remote_kind() == Some(agent::protocol::ErrorKind::NoSuchExec) => Ok(()),
        done => Ok(done?),
    }
}

impl Backend {
    /// mvmd at `host` (or `MVM_HOST`, or the default socket if it answers), else daemonless.
    pub async fn connect(host: Option<String>, token: Option<String>) -> Result<Backend, CliError> {
        let cfg = ManagerConfig::from_env();
        let endpoint = match host {
            Some(h) => Some(h.parse().map_err(CliError::Local)?),
            None if tokio::net::UnixStream::connect(DEFAULT_SOCKET)
                .await
                .is_ok() =>
            {
                Some(mvm_sandbox::http::Endpoint::Unix(DEFAULT_SOCKET.into()))
            }
            None => None,
        };
        if let Some(endpoint) = endpoint {
            let token = token.or_else(|| {
                std::fs::read_to_string(cfg.state_dir.join(TOKEN_FILE))
                    .ok()
                    .map(|t| t.trim().to_owned())
            });
            return Ok(Backend::Daemon(Client::new(endpoint, token)));
        }
        let (manager, _) = Manager::open(cfg).await?;
        manager.db().ensure_tenant("default")?;
        let tenant = manager
            .db()
            .tenant("default")?
            .ok_or_else(|| CliError::Local("tenant default vanished".into()))?;
        manager.reap_expired().await?;
        Ok(Backend::Local { manager, tenant })
    }

    /// Creates a sandbox.
    pub async fn create(&self, req: CreateSandbox) -> Result<Sandbox, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.create(&req).await?,
            Backend::Local { manager, tenant } => manager.create(tenant, req).await?,
        })
    }

    /// The sandboxes.
    pub async fn list(&self) -> Result<Vec<Sandbox>, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.list().await?,
            Backend::Local { manager, tenant } => manager.list(Some(&tenant.name))?,
        })
    }

    /// One sandbox.
    pub async fn get(&self, id: &str) -> Result<Sandbox, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.get(id).await?,
            Backend::Local { manager, tenant } => manager.get(&tenant.name, id)?,
        })
    }

    /// Destroys a sandbox.
    pub async fn destroy(&self, id: &str) -> Result<(), CliError> {
        match self {
            Backend::Daemon(c) => c.delete(id).await?,
            Backend::Local { manager, tenant } => manager.destroy(&tenant.name, id).await?,
        }
        Ok(())
    }

    /// Runs `req`, streaming its output to ours; with `interactive`, our stdin goes to it. The
    /// `controls` (resizes, signals) go to it as they come; those queued before the call are
    /// applied before any of our stdin reaches it.
    pub async fn exec(
        &self,
        id: &str,
        req: &ExecRequest,
        interactive: bool,
        mut controls: Option<mpsc::UnboundedReceiver<WsControl>>,
    ) -> Result<ExitInfo, CliError> {
        match self {
            Backend::Daemon(c) if interactive => Ok(match controls {
                Some(controls) => {
                    c.exec_interactive_with_controls(
                        id,
                        req,
                        tokio::io::stdin(),
                        controls,
                        write_out,
                    )
                    .await?
                }
                None => {
                    c.exec_interactive(id, req, tokio::io::stdin(), write_out)
                        .await?
                }
            }),
            Backend::Daemon(c) => Ok(c.exec_streamed(id, req, write_out).await?),
            Backend::Local { manager, tenant } => {
                let mut session = manager.start_exec(&tenant.name, id, req).await?;
                let control = session.control();
                if let Some(controls) = controls.as_mut() {
                    while let Ok(c) = controls.try_recv() {
                        apply(&control, c).await?;
                    }
                }
                let stdin = session.stdin.take();
                let feeder = tokio::spawn(async move {
                    let Some(mut stdin) = stdin else { return };
                    if interactive {
                        let mut local = tokio::io::stdin();
                        let mut buf = vec![0u8; 32 * 1024];
                        while let Ok(n) = local.read(&mut buf).await {
                            if n == 0 || stdin.write(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                    let _ = stdin.close();
                });
                let (mut out, mut err) = (session.stdout.take(), session.stderr.take());
                while out.is_some() || err.is_some() {
                    tokio::select! {
                        c = async { out.as_mut().expect("checked").recv().await }, if out.is_some() => match c? {
                            Some(c) => write_out(Stream::Stdout, &c),
                            None => out = None,
                        },
                        c = async { err.as_mut().expect("checked").recv().await }, if err.is_some() => match c? {
                            Some(c) => write_out(Stream::Stderr, &c),
                            None => err = None,
                        },
                        c = async { controls.as_mut().expect("checked").recv().await }, if controls.is_some() => match c {
                            Some(c) => apply(&control, c).await?,
                            None => controls = None,
                        },
                    }
                }
                let status = session.wait().await?;
                feeder.abort();
                Ok(status.into())
            }
        }
    }

    /// Runs `req` to completion and returns all of its output.
    pub async fn exec_buffered(
        &self,
        id: &str,
        req: &ExecRequest,
    ) -> Result<mvm_sandbox::model::ExecResult, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.exec(id, req).await?,
            Backend::Local { manager, tenant } => manager.exec(&tenant.name, id, req).await?,
        })
    }

    /// Copies a local file into the sandbox.
    pub async fn put_file(
        &self,
        id: &str,
        path: &str,
        mode: u32,
        data: Vec<u8>,
    ) -> Result<u64, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.put_file(id, path, mode, data).await?.bytes,
            Backend::Local { manager, tenant } => {
                manager
                    .agent(&tenant.name, id)
                    .await?
                    .put_file(path, mode, data.as_slice())
                    .await?
            }
        })
    }

    /// Reads a file of the sandbox.
    pub async fn get_file(&self, id: &str, path: &str) -> Result<Vec<u8>, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.get_file(id, path).await?.to_vec(),
            Backend::Local { manager, tenant } => {
                let mut buf = Vec::new();
                manager
                    .agent(&tenant.name, id)
                    .await?
                    .get_file(path, &mut buf)
                    .await?;
                buf
            }
        })
    }

    /// The sandbox's console log.
    pub async fn logs(&self, id: &str) -> Result<Vec<u8>, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.logs(id).await?.to_vec(),
            Backend::Local { manager, tenant } => manager.logs(&tenant.name, id)?,
        })
    }

    /// CPU/memory of a sandbox, and its tier.
    pub async fn stats(&self, id: &str) -> Result<SandboxUsage, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.stats(id).await?,
            Backend::Local { manager, tenant } => api::server::usage(manager, &tenant.name, id)?,
        })
    }

    /// Pauses or resumes a sandbox.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<Sandbox, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.set_paused(id, paused).await?,
            Backend::Local { manager, tenant } => {
                manager.set_paused(&tenant.name, id, paused).await?
            }
        })
    }

    /// Saves a vm-tier sandbox to disk (its VMM stops until it is resumed).
    pub async fn save(&self, id: &str) -> Result<Sandbox, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.save(id).await?,
            Backend::Local { manager, tenant } => manager.save(&tenant.name, id).await?,
        })
    }

    /// Replaces the allow list of a sandbox with egress allow.
    pub async fn update_network(&self, id: &str, allow: Vec<String>) -> Result<Sandbox, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.update_network(id, allow).await?,
            Backend::Local { manager, tenant } => {
                manager
                    .update_network(
                        &tenant.name,
                        id,
                        mvm_sandbox::model::NetworkUpdate { allow },
                    )
                    .await?
            }
        })
    }

    /// Forks a running vm-tier sandbox into `count` children.
    pub async fn fork(&self, id: &str, count: u32) -> Result<Vec<Sandbox>, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.fork(id, count).await?,
            Backend::Local { manager, tenant } => manager.fork(tenant, id, count).await?,
        })
    }

    /// Takes a snapshot of a vm-tier sandbox.
    pub async fn snapshot(&self, id: &str, req: CreateSnapshot) -> Result<Snapshot, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.snapshot(id, &req).await?,
            Backend::Local { manager, tenant } => manager.snapshot_sandbox(tenant, id, req).await?,
        })
    }

    /// The tenant's snapshots.
    pub async fn snapshots(&self) -> Result<Vec<Snapshot>, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.snapshots().await?,
            Backend::Local { manager, tenant } => manager.snapshots(&tenant.name)?,
        })
    }

    /// Deletes a snapshot (by id or name).
    pub async fn delete_snapshot(&self, key: &str) -> Result<Snapshot, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.delete_snapshot(key).await?,
            Backend::Local { manager, tenant } => {
                manager.delete_snapshot(&tenant.name, key).await?
            }
        })
    }

    /// The templates.
    pub async fn templates(&self) -> Result<Vec<Template>, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.templates().await?,
            Backend::Local { manager, .. } => manager.templates()?,
        })
    }

    /// Warms a template at the size `req` asks: its VM booted once and kept as a snapshot
    /// that vm-tier creates of that size restore.
    pub async fn warm_template(&self, name: &str, req: &WarmRequest) -> Result<Template, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.warm_template(name, req).await?,
            Backend::Local { manager, tenant } => manager.warm_template(tenant, name, req).await?,
        })
    }

    /// Pulls an image into the cache (daemonless: also from `insecure` plain-HTTP registries).
    pub async fn pull_image(
        &self,
        reference: &str,
        credentials: Option<Credentials>,
        insecure: Vec<String>,
    ) -> Result<Image, CliError> {
        Ok(match self {
            Backend::Daemon(_) if !insecure.is_empty() => {
                return Err(CliError::Local(
                    "--insecure-registry is for daemonless pulls: mvmd reaches the registries \
                     named in its MVM_INSECURE_REGISTRIES over plain HTTP"
                        .into(),
                ))
            }
            Backend::Daemon(c) => {
                let (username, password) = credentials
                    .map(|c| (Some(c.username), Some(c.password)))
                    .unwrap_or_default();
                c.pull_image(&PullImage {
                    reference: reference.to_owned(),
                    username,
                    password,
                })
                .await?
            }
            Backend::Local { manager, .. } => {
                manager
                    .images()
                    .with_insecure(insecure)
                    .pull(reference, credentials.as_ref())
                    .await?
            }
        })
    }

    /// Loads the images of a `docker save` or OCI archive.
    pub async fn load_images(&self, path: &str) -> Result<Vec<Image>, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.load_images(read_local(path)?).await?,
            Backend::Local { manager, .. } => {
                let store = manager.images();
                let file = path.to_owned();
                tokio::task::spawn_blocking(move || -> Result<Vec<Image>, CliError> {
                    Ok(if file == "-" {
                        store.load(std::io::stdin().lock())?
                    } else {
                        let archive = std::fs::File::open(&file)
                            .map_err(|e| CliError::Local(format!("opening {file}: {e}")))?;
                        store.load(archive)?
                    })
                })
                .await
                .map_err(|e| CliError::Local(format!("loading {path}: {e}")))??
            }
        })
    }

    /// Removes an image (or untags a reference) from the cache.
    pub async fn remove_image(&self, name: &str) -> Result<RemovedImage, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.remove_image(name).await?,
            Backend::Local { manager, .. } => manager.remove_image(name).await?,
        })
    }

    /// Removes every cached image no sandbox uses.
    pub async fn prune_images(&self) -> Result<PrunedImages, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.prune_images().await?,
            Backend::Local { manager, .. } => manager.prune_images().await?,
        })
    }

    /// The cached images.
    pub async fn images(&self) -> Result<Vec<Image>, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.images().await?,
            Backend::Local { manager, .. } => manager.images().list()?,
        })
    }

    /// Registers a template (its files must lie in the template or artifacts directory).
    pub async fn add_template(&self, t: Template) -> Result<Template, CliError> {
        Ok(match self {
            Backend::Daemon(c) => c.add_template(&t).await?,
            Backend::Local { manager, .. } => {
                // The rules mvmd applies: the state (and so the template) is shared with it.
                let cfg = manager.config();
                TemplateDirs::new(&TemplateDirs::default_dir(cfg), cfg)?.register(manager, t)?
            }
        })
    }
}

/// Reads a local file, `-` being stdin.
pub fn read_local(path: &str) -> Result<Vec<u8>, CliError> {
    if path == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .map_err(|e| CliError::Local(format!("reading stdin: {e}")))?;
        return Ok(buf);
    }
    std::fs::read(Path::new(path)).map_err(|e| CliError::Local(format!("reading {path}: {e}")))
}
