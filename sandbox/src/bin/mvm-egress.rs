//! `mvm-egress`: the egress proxy of one sandbox with secrets, started by the sandbox manager
//! with its listening socket as descriptor 3 and its configuration (the secrets' values
//! included) as JSON on standard input; see `mvm_sandbox::manager::net::proxy`. It serves in
//! a worker process it starts again should the worker die ([`mvm_sys::supervise`]).
//!
//! `mvm-egress --sandbox ID` (the argument only names it, for the teardown)

use mvm_sandbox::manager::net::proxy::{read_config, serve};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() != 2 || args[0] != "--sandbox" {
        eprintln!(
            "usage: mvm-egress --sandbox ID (started by the mvm sandbox manager, with its \
             configuration on stdin)"
        );
        std::process::exit(2);
    }
    let what = format!("mvm-egress {}", args[1]);
    let config = read_config().unwrap_or_else(|e| {
        eprintln!("{what}: {e}");
        std::process::exit(1)
    });
    // A proxy that crashes or is killed (the OOM killer) comes back with the configuration it
    // read once (its standard input is consumed) on the same socket.
    mvm_sys::supervise::supervise(&what, || match serve(config.clone()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{what}: {e}");
            1
        }
    })
}
