//! mvmd's `/mcp` (MCP over streamable HTTP) driven by a real MCP client, the official Python
//! `mcp` package's streamable HTTP client (installed by scripts/deps.sh into
//! /opt/mvm-test-venv), against mvmd's TCP listener as root with the jail tier; the client
//! script is `mvm mcp`'s (cli/tests/mcp_client.py), so both transports answer the same steps.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{block_on, Daemon};
use mvm_testkit::{mcp_python_or_skip, report_step, root_or_skip};
use serde_json::Value;

/// An MCP `initialize` request.
const INITIALIZE: &str = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"mcp_http.rs","version":"0"}}}"#;

/// `Authorization` for `token`, as a header line.
fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

/// The whole answer (head and what came of the body within 5 s) of `method /mcp` on `addr`
/// with the `headers` lines and `body`.
fn call_mcp(addr: &str, method: &str, headers: &str, body: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connecting to mvmd");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    write!(
        s,
        "{method} /mcp HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Accept: application/json, text/event-stream\r\n{headers}Content-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("writing the request");
    let mut answer = Vec::new();
    // An event stream may stay open: what came until the timeout is the answer.
    let _ = s.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status line of an answer.
fn status(answer: &str) -> &str {
    answer.lines().next().unwrap_or_default()
}

/// Runs the Python MCP client against `url` with `token`; returns its report, one JSON object
/// per step.
fn run_client(python: &Path, d: &Daemon, url: &str, token: &str) -> Vec<Value> {
    let out = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../cli/tests/mcp_client.py"
        ))
        .arg(url)
        .env("MVM_TOKEN", token)
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
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// mvmd with its TCP listener on a free port of 127.0.0.1, and that address.
fn daemon() -> (Daemon, String) {
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .to_string();
    (
        Daemon::start_with(&["--tcp", &addr, "--isolation", "jail"]),
        addr,
    )
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
    let (d, addr) = daemon();
    let before = d.host_state();

    // No token, or one mvmd does not know: 401 before any MCP.
    let none = call_mcp(&addr, "POST", "", INITIALIZE);
    assert!(status(&none).contains(" 401 "), "{none}");
    let bad = call_mcp(&addr, "POST", &bearer("not-a-token"), INITIALIZE);
    assert!(status(&bad).contains(" 401 "), "{bad}");

    let steps = run_client(&python, &d, &format!("http://{addr}/mcp"), &d.token());
    assert_eq!(
        report_step(&steps, "tools")["names"],
        serde_json::json!([
            "sandbox_create",
            "sandbox_destroy",
            "sandbox_exec",
            "sandbox_list_files",
            "sandbox_read_file",
            "sandbox_write_file"
        ])
    );
    let created = report_step(&steps, "created");
    assert_eq!(created["isolation"], "jail", "{created}");
    d.track(created["sandbox_id"].as_str().expect("a sandbox id"));

    let exec = report_step(&steps, "exec");
    assert_eq!(exec["is_error"], false, "{exec}");
    assert_eq!(exec["result"]["stdout"], "out\n", "{exec}");
    assert_eq!(exec["result"]["stderr"], "err\n", "{exec}");
    assert_eq!(exec["result"]["exit_code"], 3, "{exec}");

    let write = report_step(&steps, "write");
    assert_eq!(write["is_error"], false, "{write}");
    let read = report_step(&steps, "read");
    assert_eq!(read["result"]["content"], "héllo\nworld\n", "{read}");

    let bad_id = report_step(&steps, "bad_id");
    assert_eq!(bad_id["is_error"], true, "{bad_id}");
    let message = bad_id["text"].as_str().expect("an error message");
    assert!(message.contains("not this MCP session's"), "{message}");
    report_step(&steps, "ended");

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

#[test]
fn an_mcp_session_is_its_tenants_alone() {
    if !root_or_skip("an_mcp_session_is_its_tenants_alone") {
        return;
    }
    let (d, addr) = daemon();
    let other = d.tenant("other", &[]);
    let opened = call_mcp(&addr, "POST", &bearer(&d.token()), INITIALIZE);
    assert!(status(&opened).contains(" 200 "), "{opened}");
    let session = opened
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("mcp-session-id")
                .then(|| value.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no Mcp-Session-Id: {opened}"));
    let in_session = |token: &str| format!("{}Mcp-Session-Id: {session}\r\n", bearer(token));

    // Another tenant's token does not find the session, nor end it.
    let list = r#"{"jsonrpc":"2.0","id":2,"method":"tools/list"}"#;
    let theirs = call_mcp(&addr, "POST", &in_session(&other), list);
    assert!(status(&theirs).contains(" 404 "), "{theirs}");
    // (rmcp answers a DELETE of a session it does not have with 202, like its own.)
    call_mcp(&addr, "DELETE", &in_session(&other), "");
    // The session's own tenant still reaches it, and ends it.
    let initialized = r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#;
    call_mcp(&addr, "POST", &in_session(&d.token()), initialized);
    let mine = call_mcp(&addr, "POST", &in_session(&d.token()), list);
    assert!(status(&mine).contains(" 200 "), "{mine}");
    assert!(mine.contains("sandbox_create"), "{mine}");
    let ended = call_mcp(&addr, "DELETE", &in_session(&d.token()), "");
    assert!(status(&ended).starts_with("HTTP/1.1 2"), "{ended}");
    let gone = call_mcp(&addr, "POST", &in_session(&d.token()), list);
    assert!(status(&gone).contains(" 404 "), "{gone}");
}
