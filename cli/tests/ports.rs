//! `mvm run -d -p`: the sandbox serves on its published host port after mvm has exited
//! (daemonless and through mvmd), and `mvm rm` closes the port and removes its table.

use std::process::Command;

mod common;

use common::{serve, Env};
use mvm_testkit::ports::{
    assert_serves, free_local_port, http_get, httpd_command, ports_table_exists,
};
use mvm_testkit::{root_or_skip, text};

/// The sandbox's page.
const GREETING: &str = "hello-through-a-published-port";

fn check_detached_server(env: &Env, host: Option<&str>) {
    let port = free_local_port();
    let publish = format!("{port}:8080");
    let serve = httpd_command(GREETING, 8080);
    let out = env
        .mvm_at(host)
        .args([
            "run",
            "-d",
            "--isolation",
            "jail",
            "-p",
            &publish,
            "--",
            "sh",
            "-c",
            &serve,
        ])
        .output()
        .expect("mvm run -d");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let id = text(&out.stdout).trim().to_owned();
    assert_eq!(id.len(), 12, "mvm run -d prints the sandbox id: {id:?}");
    assert!(ports_table_exists(&id));
    assert_serves(port, GREETING);
    let out = env.mvm_at(host).args(["rm", &id]).output().expect("mvm rm");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(!ports_table_exists(&id));
    assert!(http_get(port).is_err(), "the port answers after mvm rm");
}

#[test]
fn run_detached_with_a_published_port_serves_after_mvm_exits() {
    let test = "run_detached_with_a_published_port_serves_after_mvm_exits";
    if !root_or_skip(test) {
        return;
    }
    if Command::new("nft").arg("--version").output().is_err() {
        mvm_testkit::skip_or_fail_in_ci(test, "nft is missing: apt-get install nftables");
        return;
    }
    let env = Env::new();
    check_detached_server(&env, None);
    env.assert_empty();
    let served = serve(&env);
    check_detached_server(&env, Some(&format!("unix:{}", served.socket.display())));
    drop(served);
    env.assert_empty();
}
