//! `mvm mcp` driven by a real MCP client, the official Python `mcp` package (installed by
//! scripts/deps.sh into /opt/mvm-test-venv), as root with the jail tier, daemonless and through
//! mvmd.

mod common;

use std::path::Path;

use common::{serve, Env};
use mvm_testkit::{mcp_python_or_skip, report_step, root_or_skip, text};
use serde_json::Value;

#[test]
fn a_real_mcp_client_drives_sandboxes_and_the_session_end_removes_them() {
    let test = "a_real_mcp_client_drives_sandboxes_and_the_session_end_removes_them";
    if !root_or_skip(test) {
        return;
    }
    let Some(python) = mcp_python_or_skip(test) else {
        return;
    };
    let env = Env::new();
    check_client(&env, &python, None);
    let served = serve(&env);
    check_client(
        &env,
        &python,
        Some(&format!("unix:{}", served.socket.display())),
    );
    drop(served);
    env.assert_empty();
}

/// Runs mcp_client.py against `mvm mcp` daemonless or through the mvmd at `host`, and checks
/// its report and that the session's end left nothing.
fn check_client(env: &Env, python: &Path, host: Option<&str>) {
    // The client starts `mvm mcp` with its own environment: the test environment's.
    let mvm = env.mvm_at(host);
    let mut client = std::process::Command::new(python);
    client
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp_client.py"))
        .arg(mvm.get_program())
        .arg("mcp");
    for (k, v) in mvm.get_envs() {
        match v {
            Some(v) => client.env(k, v),
            None => client.env_remove(k),
        };
    }
    let out = client.output().expect("running the MCP client");
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "the MCP client failed ({host:?}): {}\nstdout: {stdout}\nstderr: {}",
        out.status,
        text(&out.stderr)
    );
    let steps: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();

    let tools = report_step(&steps, "tools");
    assert_eq!(
        tools["names"],
        serde_json::json!([
            "sandbox_create",
            "sandbox_destroy",
            "sandbox_exec",
            "sandbox_list_files",
            "sandbox_read_file",
            "sandbox_write_file"
        ])
    );
    assert_eq!(tools["described"], true, "{tools}");

    let created = report_step(&steps, "created");
    assert_eq!(created["isolation"], "jail", "{created}");
    let id = created["sandbox_id"].as_str().expect("a sandbox id");

    let exec = report_step(&steps, "exec");
    assert_eq!(exec["is_error"], false, "{exec}");
    assert_eq!(exec["result"]["stdout"], "out\n", "{exec}");
    assert_eq!(exec["result"]["stderr"], "err\n", "{exec}");
    assert_eq!(exec["result"]["exit_code"], 3, "{exec}");
    let rendered = exec["text"].as_str().expect("a text rendering");
    assert!(
        rendered.contains("exit code 3") && rendered.contains("out") && rendered.contains("err"),
        "{rendered}"
    );
    assert_eq!(report_step(&steps, "exec_loop")["result"]["stdout"], "a|b|");

    let write = report_step(&steps, "write");
    assert_eq!(write["is_error"], false, "{write}");
    assert_eq!(write["result"]["bytes"], "héllo\nworld\n".len(), "{write}");
    let read = report_step(&steps, "read");
    assert_eq!(read["result"]["content"], "héllo\nworld\n", "{read}");
    let list = report_step(&steps, "list");
    assert_eq!(
        list["result"]["entries"],
        serde_json::json!([
            {"name": "hello.txt", "is_dir": false},
            {"name": "sub", "is_dir": true}
        ]),
        "{list}"
    );

    for (name, says) in [
        ("exec_too_large", "make its argv and environment smaller"),
        ("write_no_dir", "/tmp/mcp/hello.txt"),
        ("read_missing", "/no/such/file"),
        ("list_missing", "/no/such/dir"),
        ("bad_id", "not this MCP session's"),
        ("destroyed_gone", "not this MCP session's"),
    ] {
        let s = report_step(&steps, name);
        assert_eq!(s["is_error"], true, "{s}");
        let message = s["text"].as_str().expect("an error message");
        assert!(message.contains(says), "{name}: {message}");
    }
    assert_eq!(report_step(&steps, "destroyed")["is_error"], false);
    report_step(&steps, "ended");

    // The session's end destroyed its sandbox: gone from mvm and from the host.
    let ps = env.run(&["ps", "-o", "json"]);
    let left: Value = serde_json::from_slice(&ps.stdout).expect("mvm ps -o json");
    assert_eq!(
        left,
        serde_json::json!([]),
        "sandbox {id} outlived its session"
    );
    env.assert_empty();
}

/// Sends one JSON-RPC message to `mvm mcp` and, for a request, returns its answer.
fn rpc(
    stdin: &mut impl std::io::Write,
    stdout: &mut impl std::io::BufRead,
    message: Value,
) -> Option<Value> {
    writeln!(stdin, "{message}").expect("writing to mvm mcp");
    stdin.flush().expect("flushing to mvm mcp");
    message.get("id")?;
    let mut line = String::new();
    stdout.read_line(&mut line).expect("reading mvm mcp");
    Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
}

#[test]
fn sigterm_ends_the_session_and_removes_its_sandboxes() {
    if !root_or_skip("sigterm_ends_the_session_and_removes_its_sandboxes") {
        return;
    }
    let env = Env::new();
    let mut server = env
        .mvm()
        .arg("mcp")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("starting mvm mcp");
    let mut stdin = server.stdin.take().expect("piped");
    let mut stdout = std::io::BufReader::new(server.stdout.take().expect("piped"));
    let init = rpc(
        &mut stdin,
        &mut stdout,
        serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "mcp.rs", "version": "0"}}}),
    );
    assert!(init.is_some_and(|i| i["result"]["serverInfo"]["name"] == "mvm"));
    rpc(
        &mut stdin,
        &mut stdout,
        serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"}),
    );
    let created = rpc(
        &mut stdin,
        &mut stdout,
        serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {
            "name": "sandbox_create", "arguments": {"isolation": "jail"}}}),
    )
    .expect("an answer");
    let id = created["result"]["structuredContent"]["sandbox_id"].clone();
    assert!(id.is_string(), "{created}");
    assert!(!env.sandbox_cgroups().is_empty(), "the sandbox {id} runs");

    let pid = libc::pid_t::try_from(server.id()).expect("a pid");
    // SAFETY: a signal to the child process this test spawned and still owns.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = server.wait().expect("waiting for mvm mcp");
    assert!(status.success(), "mvm mcp after SIGTERM: {status}");
    let ps = env.run(&["ps", "-o", "json"]);
    let left: Value = serde_json::from_slice(&ps.stdout).expect("mvm ps -o json");
    assert_eq!(left, serde_json::json!([]), "sandbox {id} outlived SIGTERM");
    env.assert_empty();
}
