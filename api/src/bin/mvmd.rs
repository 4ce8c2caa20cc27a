//! `mvmd`: the mvm REST daemon. See `api::server`.

use std::path::PathBuf;
use std::process::ExitCode;

use api::server::{ServeConfig, DEFAULT_SOCKET};
use clap::{Parser, Subcommand};
use mvm_sandbox::db::Quota;
use mvm_sandbox::model::{AllowedIsolation, Isolation};
use mvm_sandbox::{Manager, ManagerConfig};

/// mvm sandbox daemon: REST API on a unix socket (and optionally TCP).
#[derive(Debug, Parser)]
#[command(name = "mvmd", version)]
struct Cli {
    /// State directory (SQLite database, unpacked bases) [env: MVM_STATE_DIR, default /var/lib/mvm].
    #[arg(long, global = true)]
    state_dir: Option<PathBuf>,
    /// Runtime directory (jails, sandboxes, netns) [env: MVM_RUN_DIR, default /run/mvm].
    #[arg(long, global = true)]
    run_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Unix socket to serve on.
    #[arg(long, default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Also serve on this TCP address (e.g. 127.0.0.1:7070); bearer tokens still apply.
    #[arg(long)]
    tcp: Option<std::net::SocketAddr>,
    /// Isolation tier of requests that name none [env: MVM_ISOLATION].
    #[arg(long)]
    isolation: Option<Isolation>,
    /// Tiers any sandbox may use: `vm,jail`, `vm` or `jail` (a tenant's own setting narrows
    /// it) [env: MVM_ALLOWED_ISOLATION, default vm,jail].
    #[arg(long, value_name = "TIERS")]
    allowed_isolation: Option<AllowedIsolation>,
    /// Parent cgroup of the sandboxes [env: MVM_CGROUP_PARENT, default mvm].
    #[arg(long)]
    cgroup_parent: Option<String>,
    /// First address of the /16 cut into per-sandbox networks [default 10.213.0.0].
    #[arg(long)]
    subnet: Option<std::net::Ipv4Addr>,
    /// Directory the files of registered templates must lie in, besides the build artifacts
    /// directory; writable by the operator only [env: MVM_TEMPLATE_DIR, default
    /// <state dir>/templates].
    #[arg(long)]
    template_dir: Option<PathBuf>,
    /// DNS servers the resolvers of sandboxes with egress `allow` ask, `ADDR[:PORT]`,
    /// comma-separated [env: MVM_DNS_UPSTREAM, default: the nameservers of /etc/resolv.conf].
    #[arg(long, value_name = "ADDR[:PORT]")]
    dns_upstream: Option<String>,
    /// A CA file (PEM) the hosts of sandboxes' secrets may chain to, besides the host's roots
    /// [env: MVM_EGRESS_CA].
    #[arg(long, value_name = "FILE")]
    egress_ca: Option<PathBuf>,
    /// Sandboxes kept restored from each warm snapshot (a template's, per size it was warmed
    /// at), which vm-tier creates of its size take instead of restoring one [env:
    /// MVM_WARM_POOL, default 0].
    #[arg(long, value_name = "N")]
    warm_pool: Option<u32>,
    /// VMMs kept started, jailed and networked without a VM per warm snapshot, which the
    /// children of a fork of its template's sandboxes of its size load their source into
    /// [env: MVM_FORK_POOL, default 0].
    #[arg(long, value_name = "N")]
    fork_pool: Option<u32>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the API (the default).
    Serve(ServeArgs),
    /// Manage tenants.
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
}

#[derive(Debug, Subcommand)]
enum TenantCommand {
    /// Create a tenant (or update its quota) and print a new bearer token for it.
    Create {
        /// Let the tenant register and replace templates (shared by every tenant);
        /// `--admin=false` revokes it [default: new tenants are not admins, others keep it].
        #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
        admin: Option<bool>,
        /// Tenant name.
        name: String,
        /// Sandboxes at once.
        #[arg(long, default_value_t = Quota::default().max_sandboxes)]
        max_sandboxes: u32,
        /// Sum of vCPUs.
        #[arg(long, default_value_t = Quota::default().max_vcpus)]
        max_vcpus: u32,
        /// Sum of memory, MiB.
        #[arg(long, default_value_t = Quota::default().max_memory_mib)]
        max_memory_mib: u64,
        /// Tiers the tenant's sandboxes may use, within the daemon's: `vm`, `jail` or
        /// `vm,jail`; `daemon` leaves it to mvmd's --allowed-isolation [default: new tenants
        /// get the daemon's, others keep theirs].
        #[arg(long, value_name = "TIERS")]
        allowed_isolation: Option<TenantTiers>,
    },
}

/// A tenant's tiers on the command line: a list, or `daemon` for the daemon's.
#[derive(Debug, Clone, Copy)]
struct TenantTiers(Option<AllowedIsolation>);

impl std::str::FromStr for TenantTiers {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "daemon" => Ok(TenantTiers(None)),
            tiers => tiers.parse().map(|t| TenantTiers(Some(t))),
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mvmd: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mvmd: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> mvm_sandbox::Result<()> {
    let mut cfg = ManagerConfig::from_env();
    if let Some(d) = cli.state_dir {
        cfg.state_dir = d;
    }
    if let Some(d) = cli.run_dir {
        cfg.run_dir = d;
    }
    match cli.command {
        Some(Command::Tenant {
            command:
                TenantCommand::Create {
                    admin,
                    name,
                    max_sandboxes,
                    max_vcpus,
                    max_memory_mib,
                    allowed_isolation,
                },
        }) => {
            std::fs::create_dir_all(&cfg.state_dir).map_err(|e| {
                mvm_sandbox::Error::host(format!("creating {}", cfg.state_dir.display()), e)
            })?;
            let db = mvm_sandbox::db::Db::open(&cfg.state_dir.join("mvm.db"))?;
            let token = db.create_tenant(
                &name,
                Quota {
                    max_sandboxes,
                    max_vcpus,
                    max_memory_mib,
                },
            )?;
            if let Some(admin) = admin {
                db.set_admin(&name, admin)?;
            }
            if let Some(TenantTiers(tiers)) = allowed_isolation {
                db.set_allowed_isolation(&name, tiers)?;
            }
            println!("{token}");
            Ok(())
        }
        Some(Command::Serve(args)) => serve(cfg, args).await,
        None => serve(cfg, cli.serve).await,
    }
}

async fn serve(mut cfg: ManagerConfig, args: ServeArgs) -> mvm_sandbox::Result<()> {
    if let Some(i) = args.isolation {
        cfg.default_isolation = i;
    }
    if let Some(a) = args.allowed_isolation {
        cfg.allowed_isolation = a;
    }
    if let Some(p) = args.cgroup_parent {
        cfg.cgroup_parent = p;
    }
    if let Some(s) = args.subnet {
        cfg.subnet = s;
    }
    if let Some(d) = args.dns_upstream {
        mvm_sandbox::manager::net::DnsUpstream::parse(&d)?;
        cfg.dns_upstream = Some(d);
    }
    if let Some(ca) = args.egress_ca {
        cfg.egress_ca = Some(ca);
    }
    if let Some(n) = args.warm_pool {
        cfg.warm_pool = n;
    }
    if let Some(n) = args.fork_pool {
        cfg.fork_pool = n;
    }
    let template_dir = args
        .template_dir
        .unwrap_or_else(|| api::server::templates::TemplateDirs::default_dir(&cfg));
    let (manager, reconciled) = Manager::open(cfg).await?;
    tracing::info!(adopted = ?reconciled.adopted, cleaned = ?reconciled.cleaned, "reconciled");
    api::server::ensure_default_token(&manager)?;
    api::server::serve(
        manager,
        ServeConfig {
            socket: args.socket,
            tcp: args.tcp,
            template_dir,
        },
    )
    .await
}
