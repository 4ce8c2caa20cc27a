//! `mvm-dns`: the resolver of one sandbox with egress `allow`, started by the sandbox manager
//! with its sockets as descriptors 3 (UDP) and 4 (TCP); see
//! `mvm_sandbox::manager::net::resolver`. It serves in a worker process it starts again
//! should the worker die ([`mvm_sys::supervise`]).
//!
//! `mvm-dns --sandbox ID --netns PATH --policy PATH --client ADDR [--upstream ADDR:PORT...] [--proxied NAME...]`

use std::path::PathBuf;

use mvm_sandbox::manager::net::resolver::{serve, Config};

fn usage(why: &str) -> ! {
    eprintln!(
        "mvm-dns: {why}\nusage: mvm-dns --sandbox ID --netns PATH --policy PATH --client ADDR \
         [--upstream ADDR:PORT ...] [--proxied NAME ...] (started by the mvm sandbox manager)"
    );
    std::process::exit(2)
}

fn main() {
    let (mut sandbox, mut netns, mut policy, mut client) = (None, None, None, None);
    let (mut upstream, mut proxied) = (Vec::new(), Vec::new());
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--sandbox" => sandbox = Some(value),
            "--netns" => netns = Some(PathBuf::from(value)),
            "--policy" => policy = Some(PathBuf::from(value)),
            "--client" => {
                client =
                    Some(value.parse().unwrap_or_else(|_| {
                        usage(&format!("--client {value:?} is no IPv4 address"))
                    }))
            }
            "--upstream" => upstream.push(
                value
                    .parse()
                    .unwrap_or_else(|_| usage(&format!("--upstream {value:?} is no ADDR:PORT"))),
            ),
            "--proxied" => proxied.push(value),
            _ => usage(&format!("unknown argument {flag:?}")),
        }
    }
    let cfg = Config {
        sandbox: sandbox.unwrap_or_else(|| usage("no --sandbox")),
        netns: netns.unwrap_or_else(|| usage("no --netns")),
        policy: policy.unwrap_or_else(|| usage("no --policy")),
        client: client.unwrap_or_else(|| usage("no --client")),
        upstream,
        proxied,
    };
    let what = format!("mvm-dns {}", cfg.sandbox);
    // A resolver that crashes or is killed (the OOM killer) comes back on the same sockets.
    mvm_sys::supervise::supervise(&what, || match serve(cfg.clone()) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{what}: {e}");
            1
        }
    })
}
