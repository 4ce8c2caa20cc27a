//! `mvm-vmm`: flags → configuration → builder → event loop; nothing else.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;

use vmm::config::VmConfig;
use vmm::controller::{Controller, VmmAction};
use vmm::devices::legacy::console::ConsoleLimit;
use vmm::event_loop::{self, Vmm};
use vmm::exit::VmExit;
use vmm::seccomp::Filters;

/// A micro-VM monitor with Firecracker's configuration file and HTTP API.
#[derive(Parser, Debug)]
#[command(name = "mvm-vmm", version)]
struct Args {
    /// Firecracker JSON configuration; the VM boots from it at once.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// Serve the HTTP API on this unix socket.
    #[arg(long, default_value = "/run/mvm-vmm.socket")]
    api_sock: PathBuf,
    /// Do not serve the API (needs --config-file).
    #[arg(long)]
    no_api: bool,
    /// Instance id reported by the API.
    #[arg(long, default_value = "anonymous-instance")]
    id: String,
    /// Custom seccomp filters (seccompiler JSON with `vmm`, `api` and `vcpu` filters).
    #[arg(long, conflicts_with = "no_seccomp")]
    seccomp_filter: Option<String>,
    /// Run without seccomp filters. For debugging only: never in production.
    #[arg(long)]
    no_seccomp: bool,
    /// Keep a guest console that is a regular file within BYTES: the first half, a marker
    /// line, then the newest output. Not enforced on a pipe or tty. Unlimited when absent.
    #[arg(long, value_name = "BYTES")]
    console_limit: Option<ConsoleLimit>,
}

fn main() -> ExitCode {
    vmm::logger::init();
    let args = Args::parse();
    match run(args) {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("mvm-vmm: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args) -> Result<u8, String> {
    if args.no_api && args.config_file.is_none() {
        return Err(
            "--no-api needs --config-file: without either there is no way to configure the VM"
                .into(),
        );
    }
    let seccomp = match (&args.seccomp_filter, args.no_seccomp) {
        (_, true) => Filters::disabled(),
        (Some(path), false) => Filters::from_file(path).map_err(|e| e.to_string())?,
        (None, false) => Filters::builtin().map_err(|e| e.to_string())?,
    };
    // The API thread starts first, so that its start overlaps the set-up below; it serves once
    // its socket is bound.
    let api = (!args.no_api)
        .then(|| vmm::api_server::start(seccomp.clone()))
        .transpose()
        .map_err(|e| format!("cannot start the API thread: {e}"))?;
    let config = args
        .config_file
        .as_ref()
        .map(|path| {
            let json = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --config-file {}: {e}", path.display()))?;
            VmConfig::from_json(&json).map_err(|e| format!("{}: {e}", path.display()))
        })
        .transpose()?;

    let exit = Arc::new(VmExit::new().map_err(|e| format!("cannot create an eventfd: {e}"))?);
    let controller = Controller::new(
        args.id.clone(),
        Box::new(vmm::builder::devices::create_virtio_devices),
        exit.clone(),
        seccomp.clone(),
    )
    .with_console_limit(args.console_limit);
    // Signal handlers first: once the socket exists, a client may already send SIGTERM.
    let mut vmm = Vmm::new(controller, exit, true).map_err(|e| e.to_string())?;
    if let Some((server, channel)) = api {
        server.listen(vmm::api_server::bind(&args.api_sock).map_err(|e| e.to_string())?);
        vmm.attach_api(channel);
    }
    if let Some(config) = config {
        let controller = vmm.controller();
        controller.apply_config(config).map_err(|e| e.to_string())?;
        controller
            .handle(VmmAction::InstanceStart)
            .map_err(|e| e.to_string())?;
    }
    let (reason, vmm) = event_loop::run(vmm).map_err(|e| e.to_string())?;
    // A guest may end right after the request that started it was answered.
    vmm.wait_for_api_responses(std::time::Duration::from_secs(1));
    vmm.shutdown();
    if !args.no_api {
        // Best effort: a leftover socket file is replaced by the next start anyway.
        let _ = std::fs::remove_file(&args.api_sock);
    }
    let code = reason.exit_code();
    if code == 0 {
        log::info!("{reason}");
    } else {
        eprintln!("mvm-vmm: {reason}");
    }
    Ok(code as u8)
}
