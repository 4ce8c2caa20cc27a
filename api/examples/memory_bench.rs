//! mvmd's memory while sandboxes flood it and clients stall (issue 14): starts an mvmd, makes
//! one jail-tier sandbox and prints how far mvmd's resident memory rises (its peak, VmHWM,
//! reset before each case) while a sandbox writes a gigabyte through a buffered, an NDJSON
//! and a websocket exec, and while an NDJSON or a websocket client stops reading an endless
//! writer.
//!
//! As root: `cargo build -p api -p jailer -p agent --bins && cargo run -p api --example
//! memory_bench [-- --bytes N --stall-s S]` (needs target/mvm-artifacts/rootfs.ext4).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use mvm_client::Client;
use mvm_sandbox::http::Endpoint;
use mvm_sandbox::model::{CreateSandbox, ExecRequest, Isolation};
use mvm_testkit::rss::PeakGrowth;

fn arg(name: &str, default: u64) -> u64 {
    std::env::args()
        .skip_while(|a| a != name)
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        ..ExecRequest::default()
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

/// One line of the table.
fn report(case: &str, growth: &PeakGrowth, started: Instant, moved: Option<u64>) {
    let rate = moved.map_or(String::new(), |b| {
        format!(", {:.0} MiB/s", mib(b) / started.elapsed().as_secs_f64())
    });
    println!("{case:<46} mvmd +{:>6.1} MiB{rate}", mib(growth.bytes()));
}

/// The mvmd under test, stopped however the benchmark ends.
struct Mvmd(std::process::Child, String);

impl Drop for Mvmd {
    /// Stops mvmd and removes its (by then empty) parent cgroups.
    fn drop(&mut self) {
        // SAFETY: plain kill of our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
        if let Ok(mode) = mvm_sandbox::manager::cgroups::CgroupMode::host() {
            for dir in mode.parent_dirs(&self.1) {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
}

fn main() {
    if !mvm_testkit::is_root() {
        mvm_testkit::skip_or_fail_in_ci("memory_bench", "needs root (namespaces, cgroups, mounts)");
        return;
    }
    let bytes = arg("--bytes", 1 << 30);
    let stall = Duration::from_secs(arg("--stall-s", 3));
    let exe = std::env::current_exe().expect("current exe");
    // target/<triple>/debug/examples/memory_bench → target/<triple>/debug
    let bin_dir = exe.parent().and_then(|p| p.parent()).expect("bin dir");
    for b in ["mvmd", "mvm-jailer", "mvm-agent"] {
        assert!(
            bin_dir.join(b).is_file(),
            "{} missing: cargo build -p api -p jailer -p agent --bins",
            bin_dir.join(b).display()
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("mvm-membench")
        .tempdir()
        .expect("tempdir");
    let socket = dir.path().join("mvmd.sock");
    let log = std::fs::File::create(dir.path().join("mvmd.log")).expect("log file");
    let cgroup_parent = format!("mvm-membench-{}", std::process::id());
    let mvmd = Command::new(bin_dir.join("mvmd"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .arg("--run-dir")
        .arg(dir.path().join("run"))
        .arg("--socket")
        .arg(&socket)
        .args(["--cgroup-parent", &cgroup_parent])
        .args(["--subnet", "10.251.0.0"])
        .env("MVM_BIN_DIR", bin_dir)
        .env("MVM_ARTIFACTS", mvm_testkit::artifacts_dir())
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("starting mvmd");
    let mvmd = Mvmd(mvmd, cgroup_parent);
    let pid = mvmd.0.id();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        while tokio::net::UnixStream::connect(&socket).await.is_err() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let token = std::fs::read_to_string(dir.path().join("state/token")).expect("token");
        let token = token.trim().to_owned();
        let endpoint = Endpoint::Unix(socket.clone());
        let client = Client::new(endpoint.clone(), Some(token.clone()));
        let s = client
            .create(&CreateSandbox {
                isolation: Some(Isolation::Jail),
                ..CreateSandbox::default()
            })
            .await
            .expect("create");
        let limit = mvm_sandbox::bounds::Bounds::from_env().exec_output;
        println!(
            "mvmd memory benchmark: jail tier, {:.0} MiB per flood, {} s stalls, exec output limit \
             {:.0} MiB, mvmd RSS {:.1} MiB at rest",
            mib(bytes),
            stall.as_secs(),
            mib(limit as u64),
            mib(mvm_testkit::rss::status_bytes(pid, "VmRSS"))
        );
        let flood = sh(&format!("head -c {bytes} /dev/zero"));

        let (t, g) = (Instant::now(), PeakGrowth::start(pid));
        let out = client.exec(&s.id, &flood).await.expect("buffered exec");
        assert!(out.stdout_truncated || out.stdout.len() as u64 == bytes);
        report(
            "buffered exec (answer: the limit, truncated)",
            &g,
            t,
            Some(bytes),
        );

        let (t, g) = (Instant::now(), PeakGrowth::start(pid));
        let mut moved = 0;
        client
            .exec_streamed(&s.id, &flood, |_, d| moved += d.len() as u64)
            .await
            .expect("NDJSON exec");
        assert_eq!(moved, bytes);
        report("NDJSON exec", &g, t, Some(bytes));

        let (t, g) = (Instant::now(), PeakGrowth::start(pid));
        let mut moved = 0;
        client
            .exec_interactive(&s.id, &flood, &b""[..], |_, d| moved += d.len() as u64)
            .await
            .expect("websocket exec");
        assert_eq!(moved, bytes);
        report("websocket exec", &g, t, Some(bytes));

        // A client that takes the answer's head, then reads nothing.
        let (t, g) = (Instant::now(), PeakGrowth::start(pid));
        let body = serde_json::to_vec(&ExecRequest {
            stream: true,
            ..sh("exec yes")
        })
        .expect("json");
        let req = hyper::Request::post(format!("http://mvmd/v1/sandboxes/{}/exec", s.id))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(body.into()))
            .expect("request");
        let answer = mvm_sandbox::http::send(&endpoint, req)
            .await
            .expect("NDJSON exec");
        tokio::time::sleep(stall).await;
        drop(answer);
        report("NDJSON client stalled on `yes`", &g, t, None);

        let (t, g) = (Instant::now(), PeakGrowth::start(pid));
        let mut request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://mvmd/v1/sandboxes/{}/exec/ws", s.id),
            )
            .expect("request");
        request.headers_mut().insert(
            "authorization",
            format!("Bearer {token}").parse().expect("header"),
        );
        let conn = tokio::net::UnixStream::connect(&socket)
            .await
            .expect("connect");
        let (mut ws, _) = tokio_tungstenite::client_async(request, conn)
            .await
            .expect("websocket");
        let exec = serde_json::to_string(&sh("exec yes")).expect("json");
        ws.send(exec.into()).await.expect("exec request");
        tokio::time::sleep(stall).await;
        drop(ws);
        report("websocket client stalled on `yes`", &g, t, None);

        client.delete(&s.id).await.expect("delete");
    });
    drop(mvmd);
}
