//! The guest is untrusted: the client must survive an agent that breaks the protocol.
//! A scripted peer on a unix socket plays the misbehaving agent (the real agent never
//! misbehaves this way, which is the point).

use std::time::Duration;

use agent::client::{MAX_LIST_BYTES, MAX_LIST_ENTRIES};
use agent::protocol::{
    decode_payload, encode_frame, read_frame, AgentMessage, Channel, ClientMessage, Reply,
    AGENT_VERSION, MAGIC, MAX_CHUNK, MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use agent::{AgentClient, ClientError, DirEntry, ExecRequest, FileKind, FileStat};
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

/// Accepts one client, completes the handshake, answers its first request (an exec) with
/// `ExecStarted`, then runs `misbehave` and waits for the client to hang up.
async fn fake_agent<F, Fut>(listener: UnixListener, misbehave: F)
where
    F: FnOnce(UnixStream, u64) -> Fut,
    Fut: std::future::Future<Output = UnixStream>,
{
    fake_agent_answering(listener, Reply::ExecStarted { pid: 1 }, misbehave).await
}

/// [`fake_agent`] answering the first request with `first`.
async fn fake_agent_answering<F, Fut>(listener: UnixListener, first: Reply, misbehave: F)
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
    send(&mut stream, &AgentMessage::Reply { id, reply: first }).await;
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

/// Resident memory of this process, bytes.
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

fn stat(kind: FileKind) -> FileStat {
    FileStat {
        kind,
        size: 1,
        mode: 0o644,
        uid: 0,
        gid: 0,
        mtime_ns: 0,
    }
}

/// An entry whose name fills most of a frame.
fn fat_entry(i: usize) -> DirEntry {
    DirEntry {
        name: format!("{i:08}{}", "x".repeat(MAX_FRAME_LEN - 1024)),
        stat: stat(FileKind::File),
    }
}

/// Runs `get_file` against a fake agent that answers `GetStarted` and then `misbehave`s; the
/// client must fail (not wait or queue) within 20 s, with this process's memory growing by
/// less than 64 MiB. Returns the error.
async fn get_against<F, Fut>(misbehave: F) -> ClientError
where
    F: FnOnce(UnixStream, u64) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = UnixStream> + Send + 'static,
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let server = tokio::spawn(fake_agent_answering(
        UnixListener::bind(&path).unwrap(),
        Reply::GetStarted {
            stat: stat(FileKind::File),
        },
        misbehave,
    ));
    let client = AgentClient::connect_unix(&path).await.unwrap();
    let before = rss();
    let mut sink = Vec::new();
    let err = tokio::time::timeout(Duration::from_secs(20), client.get_file("/f", &mut sink))
        .await
        .expect("the client waited for a misbehaving agent instead of dropping it")
        .expect_err("a get from a misbehaving agent succeeded");
    let grown = rss().saturating_sub(before);
    assert!(grown < 64 << 20, "the client grew by {grown} bytes");
    drop(client);
    server.await.unwrap();
    err
}

#[tokio::test]
async fn client_drops_an_agent_that_floods_replies_during_a_get() {
    // 512 MiB of replies nobody asked for.
    let err = get_against(|mut stream, id| async move {
        for i in 0..512 {
            let reply = Reply::Entries(vec![fat_entry(i)]);
            send(&mut stream, &AgentMessage::Reply { id, reply }).await;
        }
        stream
    })
    .await;
    assert!(
        matches!(&err, ClientError::Disconnected(why) if why.contains("unsolicited reply to request")),
        "{err}"
    );
}

#[tokio::test]
async fn client_drops_an_agent_that_sends_foreign_frames_during_a_get() {
    let err = get_against(|mut stream, id| async move {
        let data = vec![0u8; MAX_CHUNK];
        let channel = Channel::Stdout;
        send(&mut stream, &AgentMessage::Data { id, channel, data }).await;
        stream
    })
    .await;
    assert!(
        matches!(&err, ClientError::Disconnected(why) if why.contains("no such open stream")),
        "{err}"
    );
}

#[tokio::test]
async fn listings_are_bounded_in_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    // One fat entry per frame: few entries, many bytes; then `Done`.
    let frames = MAX_LIST_BYTES / MAX_FRAME_LEN + 8;
    assert!(frames < MAX_LIST_ENTRIES);
    let server = tokio::spawn(fake_agent_answering(
        UnixListener::bind(&path).unwrap(),
        Reply::Entries(vec![fat_entry(0)]),
        move |mut stream, id| async move {
            for i in 1..frames {
                let reply = Reply::Entries(vec![fat_entry(i)]);
                send(&mut stream, &AgentMessage::Reply { id, reply }).await;
            }
            let reply = Reply::Done;
            send(&mut stream, &AgentMessage::Reply { id, reply }).await;
            stream
        },
    ));
    let client = AgentClient::connect_unix(&path).await.unwrap();
    let err = client.list("/").await.expect_err("an oversized listing");
    assert!(
        matches!(&err, ClientError::AnswerTooLarge(why) if why.contains(&MAX_LIST_BYTES.to_string())),
        "{err}"
    );
    drop(client);
    server.await.unwrap();
}
