//! `mvm run -d -p`: the sandbox serves on its published host port after mvm has exited
//! (daemonless and through mvmd), and `mvm rm` closes the port and removes its table.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::{serve, Env};
use mvm_testkit::{root_or_skip, text};

/// The sandbox's page.
const GREETING: &str = "hello-through-a-published-port";

/// `GET /` on 127.0.0.1:`port`.
fn http_get(port: u16) -> std::io::Result<String> {
    let mut s =
        TcpStream::connect_timeout(&(Ipv4Addr::LOCALHOST, port).into(), Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    Ok(answer)
}

fn ports_table_exists(id: &str) -> bool {
    let out = Command::new("nft")
        .args(["list", "tables", "ip"])
        .output()
        .expect("nft list tables");
    text(&out.stdout)
        .lines()
        .any(|l| l.trim() == format!("table ip mvm-ports-{id}"))
}

fn check_detached_server(env: &Env, host: Option<&str>) {
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let publish = format!("{port}:8080");
    let serve = format!(
        "mkdir -p /tmp/www && echo {GREETING} > /tmp/www/index.html && \
         exec httpd -f -p 8080 -h /tmp/www"
    );
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
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match http_get(port) {
            Ok(a) if a.contains(GREETING) => break,
            other => assert!(
                Instant::now() < deadline,
                "127.0.0.1:{port} did not serve the sandbox's page: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
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
