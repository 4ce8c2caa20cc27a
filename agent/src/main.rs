//! `mvm-agent`: serves the mvm host inside a sandbox. See `agent/PROTOCOL.md`.

use std::process::ExitCode;
use std::time::Duration;

use agent::init;
use agent::protocol::DEFAULT_VSOCK_PORT;
use agent::server::{Agent, ListenAddr, Listener};
use clap::Parser;

/// mvm guest agent: runs commands and moves files for the host.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Where to listen: vsock:PORT (inside a VM) or unix:PATH (host process).
    #[arg(long, default_value_t = ListenAddr::Vsock(DEFAULT_VSOCK_PORT))]
    listen: ListenAddr,
    /// Perform the guest init duties (mounts, overlay root, hostname, network) even when
    /// not PID 1. Implied when running as PID 1.
    #[arg(long)]
    init: bool,
}

fn main() -> ExitCode {
    let pid1 = std::process::id() == 1;
    // As PID 1 the kernel may pass arguments meant for init; never exit over them.
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if !pid1 => e.exit(),
        Err(e) => {
            agent::log!("ignoring the command line: {e}");
            Args {
                listen: ListenAddr::Vsock(DEFAULT_VSOCK_PORT),
                init: true,
            }
        }
    };
    let init = pid1 || args.init;
    if init {
        init::run();
    }
    loop {
        // PID 1 must never exit (the kernel would panic): report failures, even panics,
        // and start over.
        let outcome = std::panic::catch_unwind(|| run(&args.listen, init))
            .unwrap_or_else(|_| Err("the agent panicked".to_owned()));
        match outcome {
            Ok(code) => return code,
            Err(e) if init => {
                agent::log!("{e}; restarting in 1 s");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => {
                agent::log!("{e}");
                return ExitCode::FAILURE;
            }
        }
    }
}

/// Serves until a shutdown request; in init mode that powers the guest down.
fn run(addr: &ListenAddr, init: bool) -> Result<ExitCode, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    let action = runtime.block_on(async {
        let agent = Agent::new(init).map_err(|e| format!("starting the agent: {e}"))?;
        let listener = Listener::bind(addr).map_err(|e| format!("listening on {addr}: {e}"))?;
        agent::log!(
            "agent {} listening on {addr}",
            agent::protocol::AGENT_VERSION
        );
        let action = agent.serve(listener).await;
        agent.kill_children();
        Ok::<_, String>(action)
    })?;
    drop(runtime);
    if init {
        init::power_down(action);
    }
    Ok(ExitCode::SUCCESS)
}
