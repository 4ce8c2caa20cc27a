//! `mvm-egress`: the egress proxy of one sandbox with secrets, started by the sandbox manager
//! with its listening socket as descriptor 3 and its configuration (the secrets' values
//! included) as JSON on standard input; see `mvm_sandbox::manager::net::proxy`.
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
    if let Err(e) = read_config().and_then(serve) {
        eprintln!("mvm-egress {}: {e}", args[1]);
        std::process::exit(1);
    }
}
