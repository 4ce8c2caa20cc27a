//! The guest is untrusted: the client must survive an agent that breaks the protocol.
//! A scripted peer on a unix socket plays the misbehaving agent (the real agent never
//! misbehaves this way, which is the point).

use std::time::Duration;

use agent::protocol::{
    decode_payload, encode_frame, read_frame, AgentMessage, Channel, ClientMessage, Reply,
    AGENT_VERSION, MAGIC, MAX_CHUNK, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use agent::{AgentClient, ClientError, ExecRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

async fn send(stream: &mut UnixStream, msg: &AgentMessage) {
    let mut frame = Vec::new();
    encode_frame(msg, &mut frame).unwrap();
    // The client may already have closed; what it saw is what the test checks.
    let _ = stream.write_all(&frame).await;
}

async fn receive(stream: &mut UnixStream) -> ClientMessage {
    let mut buf = Vec::new();
    assert!(read_frame(stream, &mut buf).await.unwrap());
    decode_payload(&buf).unwrap()
}

/// Accepts one client, completes the handshake, answers its first request (an exec)
/// with `ExecStarted`, then runs `misbehave` and waits for the client to hang up.
async fn fake_agent<F, Fut>(listener: UnixListener, misbehave: F)
where
    F: FnOnce(UnixStream, u64) -> Fut,
    Fut: std::future::Future<Output = UnixStream>,
{
    let (mut stream, _) = listener.accept().await.unwrap();
    assert!(matches!(
        receive(&mut stream).await,
        ClientMessage::Hello { .. }
    ));
    send(
        &mut stream,
        &AgentMessage::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            agent_version: AGENT_VERSION.to_owned(),
        },
    )
    .await;
    let ClientMessage::Request { id, .. } = receive(&mut stream).await else {
        panic!("expected a request");
    };
    send(
        &mut stream,
        &AgentMessage::Reply {
            id,
            reply: Reply::ExecStarted { pid: 1 },
        },
    )
    .await;
    let mut stream = misbehave(stream, id).await;
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut sink)).await;
}

async fn expect_disconnect(stdout: &mut agent::OutputStream, reason: &str) {
    loop {
        match stdout.recv().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("stream ended cleanly; expected a disconnect"),
            Err(ClientError::Disconnected(why)) => {
                assert!(why.contains(reason), "disconnect reason: {why}");
                return;
            }
            Err(e) => panic!("unexpected error {e}"),
        }
    }
}

#[tokio::test]
async fn client_drops_an_agent_that_overruns_its_credit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let server = tokio::spawn(fake_agent(
        UnixListener::bind(&path).unwrap(),
        |mut stream, id| async move {
            for _ in 0..5 {
                let data = vec![0u8; MAX_CHUNK];
                let channel = Channel::Stdout;
                send(&mut stream, &AgentMessage::Data { id, channel, data }).await;
            }
            stream
        },
    ));
    let client = AgentClient::connect_unix(&path).await.unwrap();
    let mut session = client.exec(ExecRequest::new(["x"])).await.unwrap();
    let mut stdout = session.stdout.take().unwrap();
    // Read nothing until everything arrived: the fifth chunk is beyond the window.
    tokio::time::sleep(Duration::from_millis(200)).await;
    expect_disconnect(&mut stdout, "beyond its credit").await;
    let err = session.wait().await.unwrap_err();
    assert!(matches!(err, ClientError::Disconnected(_)), "{err}");
    assert!(matches!(
        client.health().await,
        Err(ClientError::Disconnected(_))
    ));
    drop((session, client));
    server.await.unwrap();
}

#[tokio::test]
async fn client_drops_an_agent_that_sends_an_oversized_frame() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let server = tokio::spawn(fake_agent(
        UnixListener::bind(&path).unwrap(),
        |mut stream, _| async move {
            let _ = stream
                .write_all(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes())
                .await;
            stream
        },
    ));
    let client = AgentClient::connect_unix(&path).await.unwrap();
    let mut session = client.exec(ExecRequest::new(["x"])).await.unwrap();
    let mut stdout = session.stdout.take().unwrap();
    expect_disconnect(&mut stdout, "exceeds").await;
    drop((session, client));
    server.await.unwrap();
}
