//! `mvm`: run commands in sandboxes. Daemonless by default (this process manages the sandbox,
//! like podman); a client of mvmd when `--host`/`MVM_HOST` is set or mvmd's default socket
//! answers.

mod backend;
mod build;
mod mcp;
mod tty;

use std::collections::BTreeMap;
use std::io::IsTerminal as _;
use std::process::ExitCode;

use backend::{read_local, Backend, CliError};
use clap::{Parser, Subcommand, ValueEnum};
use mvm_sandbox::model::{
    CreateSandbox, CreateSnapshot, Egress, ExecRequest, ExecResult, ImageConfig, Isolation,
    Lifecycle, NetworkSpec, OnTimeout, PortMapping, PortProtocol, Sandbox, SecretSpec, Template,
    WarmRequest,
};
use tty::Terminal;

/// Exit code for failures of mvm itself (as opposed to the sandboxed command's).
const EXIT_MVM_FAILED: u8 = 125;

/// How long a `-t` exec killed by a signal to the CLI gets to report its end.
const KILL_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// mvm: micro-VM (or jailed-process) sandboxes.
#[derive(Debug, Parser)]
#[command(name = "mvm", version)]
struct Cli {
    /// mvmd to talk to: unix:PATH, /PATH, tcp:HOST:PORT or http://HOST:PORT [default: daemonless,
    /// or /run/mvm/mvmd.sock when mvmd serves it].
    #[arg(long, global = true, env = "MVM_HOST")]
    host: Option<String>,
    /// Bearer token for mvmd [default: <state dir>/token].
    #[arg(long, global = true, env = "MVM_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Isolation tier [default: vm, or MVM_ISOLATION].
    #[arg(long)]
    isolation: Option<Isolation>,
    /// vCPUs (vm) or CPU quota in cores (jail).
    #[arg(long)]
    cpus: Option<u32>,
    /// Memory in MiB.
    #[arg(long)]
    memory: Option<u64>,
    /// Environment variable KEY=VALUE (repeatable).
    #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_kv)]
    env: Vec<(String, String)>,
    /// Remove the sandbox when the command ends.
    #[arg(long)]
    rm: bool,
    /// Start the command in the background (detached from mvm, its output discarded), leave
    /// the sandbox running and print its id.
    #[arg(short = 'd', long, conflicts_with_all = ["rm", "interactive", "tty"])]
    detach: bool,
    /// Publish a sandbox port on the host: [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp] (TCP by
    /// default; HOST_IP default 127.0.0.1, the host alone; 0.0.0.0 or another address of the
    /// host opens it to other hosts; repeatable).
    #[arg(short = 'p', long = "publish", value_name = "[HOST_IP:]HOST_PORT:GUEST_PORT[/PROTO]", value_parser = parse_port)]
    publish: Vec<PortMapping>,
    /// Keep stdin open and send it to the command.
    #[arg(short = 'i', long)]
    interactive: bool,
    /// Run the command on a pseudo-terminal (with stdin a terminal: its size, raw mode).
    #[arg(short = 't', long)]
    tty: bool,
    /// Sandbox timeout in seconds (0 = none).
    #[arg(long)]
    timeout: Option<u64>,
    /// What the timeout does: destroy the sandbox, pause it (frozen, memory kept) or save it
    /// to disk (vm tier: no process and no memory until `mvm resume`).
    #[arg(long, value_name = "destroy|pause|save", default_value = "destroy")]
    on_timeout: OnTimeout,
    /// Resume the sandbox when paused or saved by its timeout as soon as an exec, a file
    /// copy or a connection to one of its ports needs it (needs --on-timeout pause or save).
    #[arg(long)]
    auto_resume: bool,
    /// Egress policy.
    #[arg(long, value_parser = ["none", "allow", "all"], default_value = "none")]
    egress: String,
    /// Allowed destination (repeatable; IPv4 or CIDR, a DNS name or *.wildcard, each optionally
    /// :PORT): with --egress allow the only ones, with
    /// --egress all a host, private or link-local one to open.
    #[arg(long)]
    allow: Vec<String>,
    /// A secret NAME@HOST[,HOST...] (repeatable; needs --egress allow): its value
    /// is mvm's own environment variable NAME (so that it is in no command line or shell
    /// history); the sandbox's NAME holds a placeholder, which its egress proxy replaces by
    /// the value in the HTTPS request headers sent to those hosts only.
    #[arg(long = "secret", value_name = "NAME@HOST[,HOST...]", value_parser = parse_secret)]
    secrets: Vec<(String, Vec<String>)>,
    /// Tell on stderr which sandbox and isolation tier the command runs in (the default when
    /// stderr is a terminal; stdout is the command's alone either way).
    #[arg(long)]
    verbose: bool,
    /// Start from a snapshot (`mvm snapshot`, by id or name): its VM restored, going on from
    /// its instant (vm tier; its template and size).
    #[arg(long, conflicts_with_all = ["template", "isolation", "cpus", "memory", "secrets"])]
    snapshot: Option<String>,
    /// Template, or an OCI image pulled or loaded before (any name that is not a registered
    /// template's) [default: template default].
    #[arg(value_name = "TEMPLATE|IMAGE")]
    template: Option<String>,
    /// The command and its arguments (optional with -d, or with an image that has an
    /// Entrypoint or Cmd; an image's Entrypoint comes before them).
    #[arg(last = true, value_name = "CMD")]
    cmd: Vec<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a sandbox, run a command in it and print its output; exits with its exit code.
    Run(RunArgs),
    /// Start mvmd in the foreground.
    Serve {
        /// Unix socket.
        #[arg(long, default_value = api::server::DEFAULT_SOCKET)]
        socket: std::path::PathBuf,
        /// Also listen on this TCP address.
        #[arg(long)]
        tcp: Option<std::net::SocketAddr>,
        /// Directory the files of registered templates must lie in, besides the build
        /// artifacts directory [env: MVM_TEMPLATE_DIR, default: <state dir>/templates].
        #[arg(long)]
        template_dir: Option<std::path::PathBuf>,
    },
    /// List sandboxes.
    Ps,
    /// Run a command in an existing sandbox.
    Exec {
        /// Keep stdin open and send it to the command.
        #[arg(short = 'i', long)]
        interactive: bool,
        /// Run the command on a pseudo-terminal (with stdin a terminal: its size, raw mode).
        #[arg(short = 't', long)]
        tty: bool,
        /// Environment variable KEY=VALUE (repeatable).
        #[arg(short = 'e', long = "env", value_name = "KEY=VALUE", value_parser = parse_kv)]
        env: Vec<(String, String)>,
        /// Sandbox id.
        id: String,
        /// The command and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Destroy sandboxes.
    Rm {
        /// Sandbox ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Print a sandbox's console and agent log.
    Logs {
        /// Sandbox id.
        id: String,
    },
    /// Copy a file: `mvm cp LOCAL ID:/PATH` or `mvm cp ID:/PATH LOCAL` (`-` = stdin/stdout).
    Cp {
        /// Source.
        src: String,
        /// Destination.
        dst: String,
    },
    /// CPU time, memory (charged to the cgroup, page cache included), RSS and processes per
    /// sandbox, with its tier.
    Stats {
        /// Sandbox ids [default: all].
        ids: Vec<String>,
    },
    /// Pause (freeze) a sandbox, or save a vm-tier one to disk.
    Pause {
        /// Sandbox id.
        id: String,
        /// Save the VM to disk and stop its VMM (state `saved`): its memory and CPU are freed
        /// until `mvm resume` (vm tier, made from a template).
        #[arg(long)]
        save: bool,
    },
    /// Resume a paused or saved sandbox.
    Resume {
        /// Sandbox id.
        id: String,
    },
    /// Replace the allow list of a running sandbox with egress allow: what the new list does
    /// not name is closed at once.
    Network {
        /// Sandbox id.
        id: String,
        /// Allowed destination (repeatable): IPv4 or CIDR, a DNS name or *.wildcard, each
        /// optionally :PORT.
        #[arg(long, required = true)]
        allow: Vec<String>,
    },
    /// Fork a running, paused or saved vm-tier sandbox: children that go on from this instant
    /// (a saved one's: its save) with its processes, memory and files, each with its own host
    /// name, MAC, address, RNG seed and clock; the source stays as it was.
    Fork {
        /// Sandbox id.
        id: String,
        /// Children to make (at most 16).
        #[arg(short = 'n', long = "count", default_value_t = 1)]
        count: u32,
    },
    /// Take a snapshot of a running, paused or saved vm-tier sandbox: its VM (memory,
    /// processes, files) at this instant, kept until `mvm snapshots rm`, for `mvm run
    /// --snapshot` to start new sandboxes from; the sandbox stays as it was. Prints its id.
    Snapshot {
        /// Sandbox id.
        id: String,
        /// A name for it (a snapshot that has the name already is replaced).
        #[arg(long)]
        name: Option<String>,
    },
    /// List snapshots, or delete some.
    Snapshots {
        /// What to do (default: list).
        #[command(subcommand)]
        action: Option<SnapshotsAction>,
    },
    /// List templates, or warm one.
    Templates {
        /// What to do (default: list).
        #[command(subcommand)]
        action: Option<TemplatesAction>,
    },
    /// Pull an OCI image from its registry into the image cache (through mvmd: an admin's).
    Pull {
        /// `[REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]` (Docker Hub and :latest by default).
        reference: String,
        /// User name for the registry; the password is read from stdin.
        #[arg(long, short = 'u')]
        username: Option<String>,
        /// Registry reached over plain HTTP (repeatable; loopback registries always are);
        /// daemonless only: mvmd takes MVM_INSECURE_REGISTRIES.
        #[arg(long = "insecure-registry", value_name = "HOST[:PORT]")]
        insecure_registry: Vec<String>,
    },
    /// List the cached OCI images.
    Images {
        /// What to do (default: list).
        #[command(subcommand)]
        action: Option<ImagesAction>,
    },
    /// Remove images from the cache, as docker's rmi: a reference is untagged and its image
    /// removed when nothing else names it; a digest is removed with all its references. An
    /// image a sandbox uses is kept (through mvmd: an admin's).
    Rmi {
        /// References or digests.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Load the images of a `docker save` tarball or OCI image layout archive (`-` = stdin;
    /// through mvmd: an admin's).
    Load {
        /// The archive.
        file: String,
    },
    /// Build the guest kernel and base image and register them as a template.
    Build(build::BuildArgs),
    /// Serve the Model Context Protocol on stdin/stdout: tools to create sandboxes, run shell
    /// command lines and move files in them; the session's sandboxes go when it ends.
    Mcp,
}

/// `mvm templates` subcommands.
#[derive(Debug, Subcommand)]
enum ImagesAction {
    /// Remove every cached image no sandbox uses, with its references and the layers no
    /// other image shares, as `docker image prune -a` (through mvmd: an admin's).
    Prune,
}

/// `mvm snapshots` subcommands.
#[derive(Debug, Subcommand)]
enum SnapshotsAction {
    /// Delete snapshots (sandboxes made from them go on).
    Rm {
        /// Snapshot ids or names.
        #[arg(required = true)]
        keys: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum TemplatesAction {
    /// Boot the template once as a vm-tier sandbox and keep the VM as a snapshot: vm-tier
    /// creates of its size (by default 1 vCPU, 256 MiB) then restore it instead of booting.
    /// A template keeps one snapshot per size.
    Warm {
        /// Template name.
        name: String,
        /// vCPUs of the snapshot (vm-tier creates with this `--cpus` restore it) [default: 1].
        #[arg(long)]
        cpus: Option<u32>,
        /// Guest memory of the snapshot, MiB (creates with this `--memory` restore it)
        /// [default: 256].
        #[arg(long)]
        memory: Option<u64>,
    },
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// `NAME@HOST[,HOST...]`.
fn parse_secret(s: &str) -> Result<(String, Vec<String>), String> {
    match s.split_once('@') {
        Some((name, hosts)) if !name.is_empty() && !hosts.is_empty() => Ok((
            name.to_owned(),
            hosts.split(',').map(str::to_owned).collect(),
        )),
        _ => Err(format!("{s:?} is not NAME@HOST[,HOST...]")),
    }
}

/// The secrets of `--secret NAME@HOSTS` options, each value read from mvm's own environment
/// variable NAME.
fn secrets_from_env(
    secrets: Vec<(String, Vec<String>)>,
) -> Result<BTreeMap<String, SecretSpec>, CliError> {
    secrets
        .into_iter()
        .map(|(name, hosts)| match std::env::var(&name) {
            Ok(value) => Ok((name, SecretSpec { value, hosts })),
            Err(_) => Err(CliError::Local(format!(
                "--secret {name}@...: set the secret's value in mvm's environment variable \
                 {name} (e.g. read -rs {name}; export {name})"
            ))),
        })
        .collect()
}

/// `[HOST_IP:]HOST_PORT:GUEST_PORT`, as docker's `-p`.
fn parse_port(s: &str) -> Result<PortMapping, String> {
    let bad = || format!("{s:?} is not [HOST_IP:]HOST_PORT:GUEST_PORT[/tcp|/udp]");
    let (mapping, protocol) = match s.rsplit_once('/') {
        Some((mapping, "tcp")) => (mapping, PortProtocol::Tcp),
        Some((mapping, "udp")) => (mapping, PortProtocol::Udp),
        Some(_) => return Err(bad()),
        None => (s, PortProtocol::Tcp),
    };
    let (ip, ports) = match mapping.rsplitn(3, ':').collect::<Vec<_>>()[..] {
        [guest, host] => (std::net::Ipv4Addr::LOCALHOST, [host, guest]),
        [guest, host, ip] => (ip.parse().map_err(|_| bad())?, [host, guest]),
        _ => return Err(bad()),
    };
    let [host_port, guest_port] = ports.map(|p| p.parse::<u16>().map_err(|_| bad()));
    Ok(PortMapping {
        host_ip: ip,
        host_port: host_port?,
        guest_port: guest_port?,
        protocol,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mvm: starting the runtime: {e}");
            return ExitCode::from(EXIT_MVM_FAILED);
        }
    };
    let result = runtime.block_on(run(cli));
    // A read of the local stdin may still block in the runtime's pool (it cannot be
    // cancelled): exit without waiting for a key press.
    runtime.shutdown_background();
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("mvm: error: {e}");
            ExitCode::from(EXIT_MVM_FAILED)
        }
    }
}

/// What `-o json` prints for `run` and `exec`: the sandbox, with its tier, and the result.
#[derive(serde::Serialize)]
struct ExecOutput<'a> {
    sandbox: &'a Sandbox,
    exec: &'a ExecResult,
}

/// What `-o json` prints per sandbox for `rm`.
#[derive(serde::Serialize)]
struct Removed {
    id: String,
    /// Its tier, when it was found.
    #[serde(skip_serializing_if = "Option::is_none")]
    isolation: Option<Isolation>,
    removed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// What `-o json` prints for `cp`.
#[derive(serde::Serialize)]
struct Copied<'a> {
    sandbox: &'a str,
    isolation: Isolation,
    /// The path in the sandbox.
    path: &'a str,
    /// `in` (to the sandbox) or `out`.
    direction: &'a str,
    bytes: u64,
    /// The local file, for a copy out to a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    local: Option<&'a str>,
    /// The content, for a copy out to `-` (stdout carries the JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    content_base64: Option<String>,
}

/// `<id> (<tier> tier)`, how text output names a sandbox.
fn named(s: &Sandbox) -> String {
    format!("{} ({} tier)", s.id, s.isolation.as_str())
}

fn print_json<T: serde::Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("API types serialize")
    );
}

fn exit_byte(code: i32) -> u8 {
    u8::try_from(code.clamp(0, 255)).unwrap_or(EXIT_MVM_FAILED)
}

fn split_remote(spec: &str) -> Option<(&str, &str)> {
    spec.split_once(':')
        .filter(|(id, path)| !id.is_empty() && !id.contains('/') && path.starts_with('/'))
}

async fn run(cli: Cli) -> Result<u8, CliError> {
    let json = cli.output == Output::Json;
    if let Command::Serve {
        socket,
        tcp,
        template_dir,
    } = cli.command
    {
        let (manager, reconciled) =
            mvm_sandbox::Manager::open(mvm_sandbox::ManagerConfig::from_env()).await?;
        let template_dir = template_dir
            .unwrap_or_else(|| api::server::templates::TemplateDirs::default_dir(manager.config()));
        eprintln!(
            "mvm serve: adopted {:?}, cleaned {:?}",
            reconciled.adopted, reconciled.cleaned
        );
        api::server::ensure_default_token(&manager)?;
        api::server::serve(
            manager,
            api::server::ServeConfig {
                socket,
                tcp,
                template_dir,
            },
        )
        .await?;
        return Ok(0);
    }
    if let Command::Build(args) = &cli.command {
        let t = build::build(args)?;
        let backend = Backend::connect(cli.host, cli.token).await?;
        let t = backend.add_template(t).await?;
        let has_kernel = std::path::Path::new(&t.kernel).is_file();
        // Warmed where the vm tier runs, so that vm-tier creates restore from the start.
        let warmed = match has_kernel && !args.no_warm {
            true => Some(
                backend
                    .warm_template(&t.name, &WarmRequest::default())
                    .await,
            ),
            false => None,
        };
        let (t, warm_note) = match warmed {
            None => (t, String::new()),
            Some(Ok(warm)) => {
                let note = format!("; warm ({})", warm_column(&warm));
                (warm, note)
            }
            Some(Err(e)) if e.code() == Some("isolation_unavailable") => {
                (t, "; not warmed: this host cannot run the vm tier".into())
            }
            Some(Err(e)) => {
                return Err(CliError::Local(format!(
                    "template {} registered, but warming it failed: {e} (vm-tier creates boot \
                     cold; retry with `mvm templates warm {}`, or build with --no-warm)",
                    t.name, t.name
                )))
            }
        };
        if json {
            print_json(&t);
        } else {
            let kernel = if has_kernel {
                t.kernel.clone()
            } else {
                format!("{} (not built: jail tier only)", t.kernel)
            };
            println!(
                "template {} registered: kernel {kernel}, rootfs {}{warm_note}",
                t.name, t.rootfs
            );
        }
        return Ok(0);
    }
    let backend = Backend::connect(cli.host, cli.token).await?;
    match cli.command {
        Command::Run(args) => run_command(&backend, args, json).await,
        Command::Exec {
            interactive,
            tty,
            env,
            id,
            cmd,
        } => {
            let req = ExecRequest {
                cmd,
                env: env.into_iter().collect(),
                tty,
                ..ExecRequest::default()
            };
            exec(&backend, &id, None, req, interactive, json).await
        }
        Command::Ps => {
            let list = backend.list().await?;
            if json {
                print_json(&list);
            } else {
                println!(
                    "{:<14} {:<9} {:<5} {:<10} {:>4} {:>7} {:<10} EXPIRES",
                    "ID", "STATE", "TIER", "TEMPLATE", "CPUS", "MEM", "TENANT"
                );
                for s in list {
                    println!(
                        "{:<14} {:<9} {:<5} {:<10} {:>4} {:>6}M {:<10} {}",
                        s.id,
                        s.state.as_str(),
                        s.isolation.as_str(),
                        s.template,
                        s.vcpus,
                        s.memory_mib,
                        s.tenant,
                        s.expires_at.map_or("never".into(), |t| format!(
                            "in {}s",
                            t - mvm_sandbox::db::now()
                        ))
                    );
                }
            }
            Ok(0)
        }
        Command::Rm { ids } => {
            let mut results = Vec::new();
            for id in ids {
                // JSON names the tier of what was removed: look it up first.
                let found = if json {
                    backend.get(&id).await.map(|s| Some(s.isolation))
                } else {
                    Ok(None)
                };
                let done = match found {
                    Ok(isolation) => backend.destroy(&id).await.map(|()| isolation),
                    Err(e) => Err(e),
                };
                match &done {
                    Ok(_) if !json => println!("{id}"),
                    Err(e) => eprintln!("mvm: rm {id}: {e}"),
                    Ok(_) => {}
                }
                results.push(match done {
                    Ok(isolation) => Removed {
                        id,
                        isolation,
                        removed: true,
                        error: None,
                    },
                    Err(e) => Removed {
                        id,
                        isolation: None,
                        removed: false,
                        error: Some(e.to_string()),
                    },
                });
            }
            if json {
                print_json(&results);
            }
            Ok(if results.iter().all(|r| r.removed) {
                0
            } else {
                1
            })
        }
        Command::Logs { id } => {
            let log = backend.logs(&id).await?;
            if json {
                let isolation = backend.get(&id).await?.isolation;
                print_json(&serde_json::json!({
                    "id": id,
                    "isolation": isolation,
                    "log": String::from_utf8_lossy(&log),
                }));
            } else {
                use std::io::Write;
                let _ = std::io::stdout().write_all(&log);
            }
            Ok(0)
        }
        Command::Cp { src, dst } => {
            match (split_remote(&src), split_remote(&dst)) {
                (None, Some((id, path))) => {
                    let data = read_local(&src)?;
                    let bytes = backend.put_file(id, path, 0o644, data).await?;
                    if json {
                        print_json(&Copied {
                            sandbox: id,
                            isolation: backend.get(id).await?.isolation,
                            path,
                            direction: "in",
                            bytes,
                            local: (src != "-").then_some(src.as_str()),
                            content_base64: None,
                        });
                    }
                }
                (Some((id, path)), None) => {
                    let data = backend.get_file(id, path).await?;
                    if dst != "-" {
                        std::fs::write(&dst, &data)
                            .map_err(|e| CliError::Local(format!("writing {dst}: {e}")))?;
                    }
                    if json {
                        use base64::Engine as _;
                        print_json(&Copied {
                            sandbox: id,
                            isolation: backend.get(id).await?.isolation,
                            path,
                            direction: "out",
                            bytes: data.len() as u64,
                            local: (dst != "-").then_some(dst.as_str()),
                            content_base64: (dst == "-")
                                .then(|| base64::engine::general_purpose::STANDARD.encode(&data)),
                        });
                    } else if dst == "-" {
                        use std::io::Write;
                        let _ = std::io::stdout().write_all(&data);
                    }
                }
                _ => {
                    return Err(CliError::Local(
                        "exactly one of SRC and DST must be ID:/ABSOLUTE/PATH in a sandbox".into(),
                    ))
                }
            }
            Ok(0)
        }
        Command::Stats { ids } => {
            let ids = if ids.is_empty() {
                backend.list().await?.into_iter().map(|s| s.id).collect()
            } else {
                ids
            };
            let mut all = Vec::new();
            for id in ids {
                all.push(backend.stats(&id).await?);
            }
            if json {
                print_json(&all);
            } else {
                // MEM is what the cgroup is charged, page cache included; RSS what the
                // processes hold.
                println!(
                    "{:<14} {:<5} {:>10} {:>10} {:>10} {:>5}",
                    "ID", "TIER", "CPU(s)", "MEM(MiB)", "RSS(MiB)", "PIDS"
                );
                let mib = |b: u64| b as f64 / 1048576.0;
                for u in all {
                    println!(
                        "{:<14} {:<5} {:>10.3} {:>10.1} {:>10.1} {:>5}",
                        u.stats.id,
                        u.isolation.as_str(),
                        u.stats.cpu_ns as f64 / 1e9,
                        mib(u.stats.memory_bytes),
                        mib(u.rss_bytes),
                        u.stats.pids
                    );
                }
            }
            Ok(0)
        }
        Command::Pause { id, save: false } => show(&backend.set_paused(&id, true).await?, json),
        Command::Pause { id, save: true } => show(&backend.save(&id).await?, json),
        Command::Resume { id } => show(&backend.set_paused(&id, false).await?, json),
        Command::Network { id, allow } => show(&backend.update_network(&id, allow).await?, json),
        Command::Fork { id, count } => {
            let children = backend.fork(&id, count).await?;
            if json {
                print_json(&children);
            } else {
                for child in children {
                    println!("{} ({})", child.id, child.isolation.as_str());
                }
            }
            Ok(0)
        }
        Command::Snapshot { id, name } => {
            let snapshot = backend.snapshot(&id, CreateSnapshot { name }).await?;
            match json {
                true => print_json(&snapshot),
                false => println!("{}", snapshot.id),
            }
            Ok(0)
        }
        Command::Snapshots { action: None } => {
            let list = backend.snapshots().await?;
            if json {
                print_json(&list);
            } else {
                println!(
                    "{:<22} {:<20} {:<14} {:<16} {:>5} {:>9}",
                    "ID", "NAME", "SOURCE", "TEMPLATE", "CPUS", "MEM(MiB)"
                );
                for s in list {
                    println!(
                        "{:<22} {:<20} {:<14} {:<16} {:>5} {:>9}",
                        s.id,
                        s.name.as_deref().unwrap_or("-"),
                        s.source,
                        s.template,
                        s.vcpus,
                        s.memory_mib
                    );
                }
            }
            Ok(0)
        }
        Command::Snapshots {
            action: Some(SnapshotsAction::Rm { keys }),
        } => {
            for key in keys {
                println!("{}", backend.delete_snapshot(&key).await?.id);
            }
            Ok(0)
        }
        Command::Mcp => {
            mcp::serve(backend).await?;
            Ok(0)
        }
        Command::Templates {
            action: Some(TemplatesAction::Warm { name, cpus, memory }),
        } => {
            let req = WarmRequest {
                vcpus: cpus,
                memory_mib: memory,
            };
            let t = backend.warm_template(&name, &req).await?;
            if json {
                print_json(&t);
            } else {
                println!("{}: warm ({})", t.name, warm_column(&t));
            }
            Ok(0)
        }
        Command::Templates { action: None } => {
            let list = backend.templates().await?;
            if json {
                print_json(&list);
            } else {
                println!("{:<16} {:<40} {:<40} WARM", "NAME", "KERNEL", "ROOTFS");
                for t in list {
                    let warm = warm_column(&t);
                    println!("{:<16} {:<40} {:<40} {warm}", t.name, t.kernel, t.rootfs);
                }
            }
            Ok(0)
        }
        Command::Pull {
            reference,
            username,
            insecure_registry,
        } => {
            let credentials = match username {
                Some(username) => {
                    let mut password = String::new();
                    std::io::stdin()
                        .read_line(&mut password)
                        .map_err(|e| CliError::Local(format!("reading the password: {e}")))?;
                    Some(mvm_sandbox::image::Credentials {
                        username,
                        password: password.trim_end_matches(['\r', '\n']).to_owned(),
                    })
                }
                None => None,
            };
            let image = backend
                .pull_image(&reference, credentials, insecure_registry)
                .await?;
            if json {
                print_json(&image);
            } else {
                println!("{}", image.digest);
            }
            Ok(0)
        }
        Command::Load { file } => {
            let images = backend.load_images(&file).await?;
            if json {
                print_json(&images);
            } else {
                for i in images {
                    let names = i.references.join(" ");
                    println!("{} {names}", i.digest);
                }
            }
            Ok(0)
        }
        Command::Rmi { names } => {
            let mut failed = false;
            let mut results = Vec::new();
            for name in &names {
                match backend.remove_image(name).await {
                    Ok(removed) => {
                        if !json {
                            for r in &removed.untagged {
                                println!("Untagged: {r}");
                            }
                            if let Some(d) = &removed.deleted {
                                println!("Deleted: {d}");
                            }
                        }
                        results.push(serde_json::json!({"name": name, "removed": removed}));
                    }
                    Err(e) => {
                        failed = true;
                        eprintln!("mvm: rmi {name}: {e}");
                        results.push(serde_json::json!({"name": name, "error": e.to_string()}));
                    }
                }
            }
            if json {
                print_json(&results);
            }
            Ok(u8::from(failed))
        }
        Command::Images {
            action: Some(ImagesAction::Prune),
        } => {
            let pruned = backend.prune_images().await?;
            if json {
                print_json(&pruned);
            } else {
                for r in &pruned.untagged {
                    println!("Untagged: {r}");
                }
                for d in &pruned.deleted {
                    println!("Deleted: {d}");
                }
                println!(
                    "Total reclaimed space: {:.1} MiB of layers",
                    pruned.freed_bytes as f64 / (1 << 20) as f64
                );
            }
            Ok(0)
        }
        Command::Images { action: None } => {
            let list = backend.images().await?;
            if json {
                print_json(&list);
            } else {
                println!("{:<50} {:<20} {:>10}", "REFERENCE", "DIGEST", "SIZE");
                for i in list {
                    let short = &i.digest[..i.digest.len().min(19)];
                    let size = format!("{:.1} MiB", i.size_bytes as f64 / (1 << 20) as f64);
                    for r in i
                        .references
                        .iter()
                        .map(String::as_str)
                        .chain(i.references.is_empty().then_some("<none>"))
                    {
                        println!("{r:<50} {short:<20} {size:>10}");
                    }
                }
            }
            Ok(0)
        }
        Command::Serve { .. } | Command::Build(_) => unreachable!("handled above"),
    }
}

/// What `mvm templates` says of a template's snapshots: each one's size, with the sandboxes
/// of mvmd's warm pool and the VMMs of its fork pool ready for the defaults' one, or `-`
/// (vm-tier creates boot cold).
fn warm_column(t: &Template) -> String {
    let mut sizes: Vec<String> = t
        .snapshot
        .iter()
        .map(|snap| {
            let mut column = format!("{} vCPU, {} MiB", snap.vcpus, snap.memory_mib);
            if snap.pooled > 0 {
                column.push_str(&format!(", {} pooled", snap.pooled));
            }
            if snap.fork_pooled > 0 {
                column.push_str(&format!(", {} fork-pooled", snap.fork_pooled));
            }
            column
        })
        .collect();
    sizes.extend(
        t.other_snapshots
            .iter()
            .map(|snap| format!("{} vCPU, {} MiB", snap.vcpus, snap.memory_mib)),
    );
    match sizes.is_empty() {
        true => "-".into(),
        false => sizes.join("; "),
    }
}

fn show(s: &Sandbox, json: bool) -> Result<u8, CliError> {
    if json {
        print_json(s);
    } else {
        println!("{} {}", named(s), s.state.as_str());
    }
    Ok(0)
}

/// Runs `req` in sandbox `id` (`sandbox` when the caller has it). Text: the command's output
/// on ours; JSON: an [`ExecOutput`].
async fn exec(
    backend: &Backend,
    id: &str,
    sandbox: Option<&Sandbox>,
    req: ExecRequest,
    interactive: bool,
    json: bool,
) -> Result<u8, CliError> {
    if json {
        let fetched;
        let sandbox = match sandbox {
            Some(s) => s,
            None => {
                fetched = backend.get(id).await?;
                &fetched
            }
        };
        let r = backend.exec_buffered(id, &req).await?;
        print_json(&ExecOutput { sandbox, exec: &r });
        return Ok(exit_byte(r.exit.shell_code()));
    }
    let terminal = if req.tty { Terminal::attach()? } else { None };
    let req = ExecRequest {
        tty_size: terminal.as_ref().and_then(|(t, _)| t.size),
        ..req
    };
    let exit = match terminal {
        None => backend.exec(id, &req, interactive || req.tty, None).await?,
        Some((mut terminal, controls)) => {
            let run = backend.exec(id, &req, true, Some(controls));
            tokio::pin!(run);
            tokio::select! {
                biased;
                signo = terminal.terminated() => {
                    // The exec has been sent a SIGKILL: let its end arrive, then restore the
                    // terminal and exit like a process killed by `signo`.
                    let _ = tokio::time::timeout(KILL_GRACE, &mut run).await;
                    drop(terminal);
                    eprintln!("mvm: terminated by signal {signo}; the command was killed");
                    return Ok(exit_byte(128 + signo));
                }
                exit = &mut run => exit?,
            }
        }
    };
    if exit.timed_out {
        eprintln!("mvm: the command timed out and was killed");
    }
    Ok(exit_byte(exit.shell_code()))
}

async fn run_command(backend: &Backend, a: RunArgs, json: bool) -> Result<u8, CliError> {
    let egress = match a.egress.as_str() {
        "allow" => Egress::Allow,
        "all" => Egress::All,
        _ => Egress::None,
    };
    // A registered template's name, else an image's.
    let (template, image) = match a.template {
        Some(name) if !backend.templates().await?.iter().any(|t| t.name == name) => {
            (None, Some(name))
        }
        template => (template, None),
    };
    if image.is_none() && a.cmd.is_empty() && !a.detach {
        return Err(CliError::Local(
            "give the command to run after `--` (mvm run [TEMPLATE|IMAGE] -- CMD...)".into(),
        ));
    }
    let req = CreateSandbox {
        template,
        image,
        vcpus: a.cpus,
        memory_mib: a.memory,
        timeout_s: a.timeout,
        lifecycle: Lifecycle {
            on_timeout: a.on_timeout,
            auto_resume: a.auto_resume,
        },
        env: a.env.into_iter().collect::<BTreeMap<_, _>>(),
        isolation: a.isolation,
        network: Some(NetworkSpec {
            egress,
            allow: a.allow,
        }),
        metadata: BTreeMap::from([("created-by".to_owned(), "mvm run".to_owned())]),
        ports: a.publish,
        secrets: secrets_from_env(a.secrets)?,
        snapshot: a.snapshot,
    };
    let sandbox = backend.create(req).await?;
    let cmd = match &sandbox.image {
        Some(image) => image_command(&image.config, a.cmd),
        None => a.cmd,
    };
    if cmd.is_empty() && !a.detach {
        let _ = backend.destroy(&sandbox.id).await;
        return Err(CliError::Local(format!(
            "image {} has no Entrypoint or Cmd: give the command after `--`",
            sandbox.template
        )));
    }
    if a.detach {
        return start_detached(backend, &sandbox, cmd, json).await;
    }
    // mvm's own lines go to a person (stderr a terminal, or -v), never into a script's stderr.
    let tell = !json && (a.verbose || std::io::stderr().is_terminal());
    if tell {
        eprintln!("mvm: running in sandbox {}", named(&sandbox));
    }
    let exec_req = ExecRequest {
        cmd,
        tty: a.tty,
        ..ExecRequest::default()
    };
    let result = exec(
        backend,
        &sandbox.id,
        Some(&sandbox),
        exec_req,
        a.interactive,
        json,
    )
    .await;
    if a.rm {
        if let Err(e) = backend.destroy(&sandbox.id).await {
            eprintln!("mvm: removing sandbox {}: {e}", sandbox.id);
            return result.and(Ok(EXIT_MVM_FAILED));
        }
    } else if tell {
        eprintln!(
            "mvm: sandbox {} keeps running (remove it with `mvm rm {}`)",
            named(&sandbox),
            sandbox.id
        );
    }
    result
}

/// What `mvm run IMAGE -- CMD` runs, as docker does: the image's Entrypoint followed by `cmd`,
/// or by the image's Cmd when `cmd` is empty.
fn image_command(config: &ImageConfig, cmd: Vec<String>) -> Vec<String> {
    let args = if cmd.is_empty() {
        config.cmd.clone()
    } else {
        cmd
    };
    config.entrypoint.iter().cloned().chain(args).collect()
}

/// `mvm run -d`: starts `cmd` (if any) in its own session in `sandbox`, detached from the
/// exec and with its output discarded, and prints the sandbox (its id, or JSON).
async fn start_detached(
    backend: &Backend,
    sandbox: &Sandbox,
    cmd: Vec<String>,
    json: bool,
) -> Result<u8, CliError> {
    if !cmd.is_empty() {
        let mut argv: Vec<String> = [
            "sh",
            "-c",
            "setsid \"$@\" </dev/null >/dev/null 2>&1 &",
            "mvm-run",
        ]
        .map(str::to_owned)
        .into();
        argv.extend(cmd);
        let started = backend
            .exec_buffered(
                &sandbox.id,
                &ExecRequest {
                    cmd: argv,
                    ..ExecRequest::default()
                },
            )
            .await?;
        if started.exit.shell_code() != 0 {
            eprintln!(
                "mvm: starting the command in sandbox {} failed: {}",
                sandbox.id,
                started.stderr.trim()
            );
            return Ok(EXIT_MVM_FAILED);
        }
    }
    if json {
        print_json(sandbox);
    } else {
        println!("{}", sandbox.id);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `-p` takes docker's forms: an optional host address, and `/tcp` (the default) or
    /// `/udp`; anything else is refused, saying the form.
    #[test]
    fn published_ports_parse_as_docker_writes_them() {
        let port = |s: &str| {
            parse_port(s).map(|p| (p.host_ip.to_string(), p.host_port, p.guest_port, p.protocol))
        };
        assert_eq!(
            port("8080:80"),
            Ok(("127.0.0.1".into(), 8080, 80, PortProtocol::Tcp))
        );
        assert_eq!(
            port("0.0.0.0:53:53/udp"),
            Ok(("0.0.0.0".into(), 53, 53, PortProtocol::Udp))
        );
        assert_eq!(
            port("5353:53/tcp"),
            Ok(("127.0.0.1".into(), 5353, 53, PortProtocol::Tcp))
        );
        for bad in ["53:53/sctp", "53/udp", "x:53:53", "53:53/"] {
            let e = port(bad).unwrap_err();
            assert!(e.contains("[/tcp|/udp]"), "{bad}: {e}");
        }
    }
}
