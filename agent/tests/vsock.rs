//! vsock transports: the client's hybrid vsock handshake (through a proxy speaking the
//! Firecracker `CONNECT`/`OK` convention in front of a real agent) and the agent's
//! AF_VSOCK listener.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use agent::{AgentClient, ClientError, ExecRequest};
use common::AgentProcess;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

const GUEST_PORT: u32 = 1024;

/// Accepts hybrid vsock connections: `CONNECT 1024` is spliced to the agent, `CONNECT 1`
/// gets an error line, any other port is closed without answer.
async fn run_proxy(listener: UnixListener, agent_socket: PathBuf) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let agent_socket = agent_socket.clone();
        tokio::spawn(async move {
            let mut stream = tokio::io::BufReader::new(stream);
            let mut line = String::new();
            if stream.read_line(&mut line).await.is_err() {
                return;
            }
            match line.as_str() {
                "CONNECT 1024\n" => {
                    let mut agent = UnixStream::connect(&agent_socket).await.unwrap();
                    stream
                        .get_mut()
                        .write_all(b"OK 1073741824\n")
                        .await
                        .unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut agent).await;
                }
                "CONNECT 1\n" => {
                    let _ = stream
                        .get_mut()
                        .write_all(b"ERR connection refused\n")
                        .await;
                }
                _ => {}
            }
        });
    }
}

#[tokio::test]
async fn hybrid_vsock_handshake() {
    let agent = AgentProcess::start();
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vsock.sock");
    let proxy = tokio::spawn(run_proxy(
        UnixListener::bind(&uds).unwrap(),
        agent.socket.clone(),
    ));

    let client = AgentClient::connect_hybrid_vsock(&uds, GUEST_PORT)
        .await
        .unwrap();
    let out = client
        .exec(ExecRequest::new(["echo", "through vsock"]))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"through vsock\n");

    let err = AgentClient::connect_hybrid_vsock(&uds, 1)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::VsockRefused { port: 1, reply, .. } if reply == "ERR connection refused"),
        "{err}"
    );
    let err = AgentClient::connect_hybrid_vsock(&uds, 7)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    let err = AgentClient::connect_hybrid_vsock(dir.path().join("missing.sock"), GUEST_PORT)
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Connect { .. }), "{err}");
    proxy.abort();
}

#[test]
fn agent_listens_on_af_vsock() {
    // Any free port: the listener binds to VMADDR_CID_ANY.
    let port = 40_000 + std::process::id() % 20_000;
    let mut child = Command::new(env!("CARGO_BIN_EXE_mvm-agent"))
        .args(["--listen", &format!("vsock:{port}")])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    if line
        .trim_end()
        .ends_with(&format!("listening on vsock:{port}"))
    {
        std::thread::sleep(Duration::from_millis(200));
        assert!(child.try_wait().unwrap().is_none(), "agent exited: {line}");
        child.kill().unwrap();
        child.wait().unwrap();
        return;
    }
    let status = child.wait().unwrap();
    assert!(!status.success());
    // Binding may fail only when the kernel has no AF_VSOCK at all.
    assert!(
        line.contains("Address family not supported"),
        "agent failed: {line}"
    );
    eprintln!(
        "SKIPPED agent_listens_on_af_vsock: this kernel has no AF_VSOCK ({})",
        line.trim()
    );
}
