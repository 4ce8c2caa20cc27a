//! The official `e2b` Python SDK (installed by scripts/deps.sh into /opt/mvm-test-venv,
//! pinned) against a real mvmd's `/e2b`, configured only by `E2B_API_URL`, `E2B_SANDBOX_URL`
//! and `E2B_API_KEY`, as root with the jail tier. The client (`e2b_client.py`) checks each
//! SDK call and reports a step per call.

mod common;

use std::path::{Path, PathBuf};

use common::Daemon;
use mvm_testkit::{root_or_skip, skip_or_fail_in_ci};
use serde_json::Value;

/// The Python with the `e2b` package: `MVM_TEST_PYTHON`, else scripts/deps.sh's venv.
fn python() -> PathBuf {
    std::env::var_os("MVM_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/mvm-test-venv/bin/python"))
}

fn has_e2b(python: &Path) -> bool {
    std::process::Command::new(python)
        .args(["-c", "import e2b"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn the_e2b_sdk_drives_mvmd() {
    let test = "the_e2b_sdk_drives_mvmd";
    if !root_or_skip(test) {
        return;
    }
    let python = python();
    if !has_e2b(&python) {
        skip_or_fail_in_ci(
            test,
            &format!(
                "{} cannot import the Python `e2b` package: run scripts/deps.sh (or set \
                 MVM_TEST_PYTHON)",
                python.display()
            ),
        );
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&["--tcp", &addr, "--isolation", "jail"]);
    let before = d.host_state();
    let url = format!("http://{addr}/e2b");
    let out = std::process::Command::new(&python)
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2b_client.py"))
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("E2B_API_URL", &url)
        .env("E2B_SANDBOX_URL", &url)
        .env("E2B_API_KEY", d.token())
        .output()
        .expect("running the e2b client");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the e2b client failed: {stderr}\n{}\nmvmd: {}",
        String::from_utf8_lossy(&out.stdout),
        d.log()
    );
    let steps: Vec<Value> = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("the client's report: {e}: {stderr}"));
    let failed: Vec<&Value> = steps.iter().filter(|s| s["ok"] != true).collect();
    for s in &steps {
        eprintln!(
            "{} {}",
            if s["ok"] == true { "ok  " } else { "FAIL" },
            s["step"]
        );
    }
    assert!(
        failed.is_empty(),
        "SDK calls failed: {failed:#?}\nmvmd: {}",
        d.log()
    );
    assert_eq!(steps.len(), 20, "{steps:#?}");
    d.assert_no_leaks(&before);
}
