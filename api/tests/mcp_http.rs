//! mvmd's `/mcp` (MCP over streamable HTTP) driven by a real MCP client, the official Python
//! `mcp` package's streamable HTTP client (installed by scripts/deps.sh into
//! /opt/mvm-test-venv), against mvmd's TCP listener as root with the jail tier; the client
//! script is `mvm mcp`'s (cli/tests/mcp_client.py), so both transports answer the same steps.

mod common;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{block_on, Daemon};
use mvm_testkit::{mcp_python_or_skip, root_or_skip};
use serde_json::Value;

/// The step named `name` of the client's report.
fn step<'a>(steps: &'a [Value], name: &str) -> &'a Value {
    steps
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("the client reported no step {name}: {steps:#?}"))
}

/// The status line of a POST of an MCP `initialize` to `addr`'s `/mcp` with `auth` headers.
fn initialize_status(addr: &str, auth: &str) -> String {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"mcp_http.rs","version":"0"}}}"#;
    let mut s = std::net::TcpStream::connect(addr).expect("connecting to mvmd");
    write!(
        s,
        "POST /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\n{auth}Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("writing the request");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("reading the answer");
    answer.lines().next().unwrap_or_default().to_owned()
}

#[test]
fn a_real_mcp_client_drives_mvmd_over_streamable_http() {
    let test = "a_real_mcp_client_drives_mvmd_over_streamable_http";
    if !root_or_skip(test) {
        return;
    }
    let Some(python) = mcp_python_or_skip(test) else {
        return;
    };
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    let d = Daemon::start_with(&["--tcp", &addr, "--isolation", "jail"]);
    let before = d.host_state();

    // No token, or one mvmd does not know: 401 before any MCP.
    assert!(initialize_status(&addr, "").contains(" 401 "));
    let bad = "Authorization: Bearer not-a-token\r\n";
    assert!(initialize_status(&addr, bad).contains(" 401 "));

    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../cli/tests/mcp_client.py"
        ))
        .arg(format!("http://{addr}/mcp"))
        .env("MVM_TOKEN", d.token())
        .output()
        .expect("running the MCP client");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the MCP client failed: {}\nstdout: {stdout}\nstderr: {}\nmvmd: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        d.log()
    );
    let steps: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();

    assert_eq!(
        step(&steps, "tools")["names"],
        serde_json::json!([
            "sandbox_create",
            "sandbox_destroy",
            "sandbox_exec",
            "sandbox_list_files",
            "sandbox_read_file",
            "sandbox_write_file"
        ])
    );
    let created = step(&steps, "created");
    assert_eq!(created["isolation"], "jail", "{created}");
    let id = created["sandbox_id"].as_str().expect("a sandbox id");
    d.track(id);

    let exec = step(&steps, "exec");
    assert_eq!(exec["is_error"], false, "{exec}");
    assert_eq!(exec["result"]["stdout"], "out\n", "{exec}");
    assert_eq!(exec["result"]["stderr"], "err\n", "{exec}");
    assert_eq!(exec["result"]["exit_code"], 3, "{exec}");

    let write = step(&steps, "write");
    assert_eq!(write["is_error"], false, "{write}");
    let read = step(&steps, "read");
    assert_eq!(read["result"]["content"], "héllo\nworld\n", "{read}");

    let bad_id = step(&steps, "bad_id");
    assert_eq!(bad_id["is_error"], true, "{bad_id}");
    let message = bad_id["text"].as_str().expect("an error message");
    assert!(message.contains("not this MCP session's"), "{message}");
    step(&steps, "ended");

    // The session's DELETE destroyed its sandboxes: gone from the tenant's REST list.
    let client = d.client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = block_on(client.list()).expect("listing sandboxes");
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sandboxes outlived their MCP session: {left:?}\nmvmd: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    d.assert_no_leaks(&before);
}
