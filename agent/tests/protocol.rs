//! End-to-end protocol tests: a real `mvm-agent` host process on a unix socket, real
//! child processes, the real client library.

mod common;

use std::time::Duration;

use agent::protocol::{
    decode_payload, encode_frame, AgentMessage, ClientMessage, ErrorKind, Reply, Request, MAGIC,
    MAX_FRAME_LEN, PROTOCOL_VERSION,
};
use agent::{ClientError, ExecRequest, FileKind, ShutdownAction, Termination};
use common::{process_state, random_bytes, wait_until, AgentProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

/// An agent started by a test, killed however the test ends (it holds the test's output
/// open).
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent binary serving a socket in `dir`, with `prepare` run in its process before
/// exec, and a client of it once it answers (within 10 s).
///
/// # Safety
/// `prepare` runs between fork and exec: it may only make async-signal-safe calls.
async unsafe fn agent_prepared_by(
    dir: &std::path::Path,
    prepare: fn() -> std::io::Result<()>,
) -> (Killed, agent::AgentClient) {
    use std::os::unix::process::CommandExt;
    let socket = dir.join("agent.sock");
    let mut daemon = std::process::Command::new(env!("CARGO_BIN_EXE_mvm-agent"));
    daemon
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()));
    // SAFETY: the caller's promise.
    unsafe { daemon.pre_exec(prepare) };
    let daemon = Killed(daemon.spawn().unwrap());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match agent::AgentClient::connect_unix(&socket).await {
            Ok(client) => return (daemon, client),
            Err(_) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await
            }
            Err(e) => panic!("the agent never answered: {e}"),
        }
    }
}

/// Whether the test runs as root; if not it is skipped (failed under CI) saying `why`.
fn as_root(test: &str, why: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    mvm_testkit::skip_or_fail_in_ci(test, why);
    false
}

/// An exec starts with every signal's default action even where the agent was started
/// with signals ignored (as `nohup` and a shell's `&` start a daemon): its SIGINT, SIGQUIT
/// and SIGHUP are not ignored (^C on its terminal interrupts it).
#[tokio::test]
async fn an_exec_does_not_inherit_the_agents_ignored_signals() {
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: the hook only calls signal(2), async-signal-safe.
    let (daemon, client) = unsafe {
        agent_prepared_by(dir.path(), || {
            for signal in [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT] {
                libc::signal(signal, libc::SIG_IGN);
            }
            Ok(())
        })
        .await
    };
    let ignored_by = |status: &str| {
        let line = status
            .lines()
            .find(|l| l.starts_with("SigIgn:"))
            .unwrap()
            .to_owned();
        u64::from_str_radix(line.trim_start_matches("SigIgn:").trim(), 16).unwrap()
    };
    let agent_ignores =
        ignored_by(&std::fs::read_to_string(format!("/proc/{}/status", daemon.0.id())).unwrap());
    assert_eq!(
        agent_ignores & 0b111,
        0b111,
        "the agent ignores SIGHUP, SIGINT and SIGQUIT"
    );
    let out = client
        .exec(sh("cat /proc/self/status"))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    // Standard signals (1-31; bit n-1): none ignored.
    let exec_ignores = ignored_by(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        exec_ignores & 0x7fff_ffff,
        0,
        "the exec ignores {exec_ignores:#x}"
    );
}

/// An agent raised above its workload (the guest's runs at nice -20) starts every exec at
/// nice 0: a workload never inherits the agent's priority.
#[tokio::test]
async fn an_exec_does_not_inherit_the_agents_priority() {
    let test = "an_exec_does_not_inherit_the_agents_priority";
    if !as_root(test, "only root lowers a nice value") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: the hook only calls setpriority(2), async-signal-safe.
    let (daemon, client) = unsafe {
        agent_prepared_by(dir.path(), || {
            match libc::setpriority(libc::PRIO_PROCESS, 0, -7) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        })
        .await
    };
    // Field 19 of /proc/PID/stat, counted after the command name's closing parenthesis.
    let nice_of = |stat: &str| -> i32 {
        let fields = stat.rsplit_once(')').unwrap().1;
        fields.split_whitespace().nth(16).unwrap().parse().unwrap()
    };
    let agent_stat = std::fs::read_to_string(format!("/proc/{}/stat", daemon.0.id())).unwrap();
    assert_eq!(nice_of(&agent_stat), -7, "the agent's own nice value");
    let out = client
        .exec(sh("cat /proc/self/stat"))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(nice_of(&String::from_utf8_lossy(&out.stdout)), 0);
}

#[tokio::test]
async fn echo_round_trip_and_health() {
    let agent = AgentProcess::start();
    let client = agent.client().await;
    assert_eq!(client.agent_version(), env!("CARGO_PKG_VERSION"));
    let out = client
        .exec(ExecRequest::new(["echo", "hello", "world"]))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"hello world\n");
    assert!(out.stderr.is_empty());
    assert!(out.status.success());

    let out = client
        .exec(
            sh("echo out; echo err >&2; pwd; echo $FOO")
                .env("FOO", "bar")
                .cwd("/tmp"),
        )
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"out\n/tmp\nbar\n");
    assert_eq!(out.stderr, b"err\n");

    let health = client.health().await.unwrap();
    assert_eq!(health.protocol_version, PROTOCOL_VERSION);
    assert!(!health.init);
}

#[tokio::test]
async fn exit_codes_and_spawn_errors() {
    let agent = AgentProcess::start();
    let client = agent.client().await;
    let status = client
        .exec(sh("exit 7"))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert_eq!(status.code(), Some(7));
    assert!(!status.success() && !status.timed_out);

    let err = client
        .exec(ExecRequest::new(["/nonexistent/program"]))
        .await
        .err()
        .expect("spawning a missing program fails");
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");
    let err = client
        .exec(ExecRequest::new(["true"]).cwd("/nonexistent"))
        .await
        .err()
        .expect("a missing cwd fails");
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");
    let err = client
        .exec(ExecRequest::new(Vec::<String>::new()))
        .await
        .err()
        .expect("an empty argv fails");
    assert_eq!(err.remote_kind(), Some(ErrorKind::InvalidInput), "{err}");
    // The connection survives request errors.
    assert!(client
        .exec(ExecRequest::new(["true"]))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap()
        .success());
}

#[tokio::test]
async fn large_stdout_streams_in_bounded_memory() {
    const TOTAL: u64 = 100 << 20;
    let agent = AgentProcess::start();
    let client = agent.client().await;
    let rss_before = agent.rss_kib();
    let mut session = client
        .exec(ExecRequest::new([
            "head",
            "-c",
            &TOTAL.to_string(),
            "/dev/zero",
        ]))
        .await
        .unwrap();
    let mut stdout = session.stdout.take().unwrap();
    let mut received = 0u64;
    let mut rss_max = rss_before;
    let mut chunks = 0u64;
    while let Some(chunk) = stdout.recv().await.unwrap() {
        assert!(chunk.iter().all(|b| *b == 0));
        received += chunk.len() as u64;
        chunks += 1;
        if chunks % 64 == 0 {
            rss_max = rss_max.max(agent.rss_kib());
        }
    }
    assert_eq!(received, TOTAL);
    assert!(session.wait().await.unwrap().success());
    eprintln!("agent VmRSS: {rss_before} KiB before, {rss_max} KiB max while streaming 100 MiB");
    assert!(
        rss_max < rss_before + 16 * 1024,
        "agent RSS grew from {rss_before} KiB to {rss_max} KiB"
    );
}

#[tokio::test]
async fn slow_reader_blocks_the_child() {
    let agent = AgentProcess::start();
    let client = agent.client().await;
    // 8 MiB is far more than the credit window plus a pipe buffer.
    let mut session = client
        .exec(sh("head -c 8388608 /dev/zero; echo finished >&2"))
        .await
        .unwrap();
    let mut stdout = session.stdout.take().unwrap();
    let mut stderr = session.stderr.take().unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Nothing read yet: the writer must be stuck, so stderr has nothing.
    let early = tokio::time::timeout(Duration::from_millis(100), stderr.recv()).await;
    assert!(
        early.is_err(),
        "child finished without its output being read: {early:?}"
    );
    let (out, err) = tokio::join!(stdout.read_to_end(), stderr.read_to_end());
    assert_eq!(out.unwrap().len(), 8 << 20);
    assert_eq!(err.unwrap(), b"finished\n");
    assert!(session.wait().await.unwrap().success());
}

#[tokio::test]
async fn stdin_is_piped() {
    let agent = AgentProcess::start();
    let client = agent.client().await;
    let data = random_bytes(3 << 20, 7);

    let mut session = client
        .exec(ExecRequest::new(["cat"]).stdin(true))
        .await
        .unwrap();
    let mut stdin = session.stdin.take().unwrap();
    let mut stdout = session.stdout.take().unwrap();
    let input = data.clone();
    let writer = tokio::spawn(async move {
        stdin.write(&input).await.unwrap();
        stdin.close().unwrap();
    });
    let echoed = stdout.read_to_end().await.unwrap();
    writer.await.unwrap();
    assert!(
        echoed == data,
        "cat echoed {} bytes, expected {}",
        echoed.len(),
        data.len()
    );
    assert!(session.wait().await.unwrap().success());

    let mut session = client
        .exec(ExecRequest::new(["wc", "-c"]).stdin(true))
        .await
        .unwrap();
    session.stdin.as_mut().unwrap().write(&data).await.unwrap();
    let out = session.wait_with_output().await.unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        data.len().to_string()
    );

    // A process that ignores stdin still exits; writes after that are refused cleanly.
    let mut session = client.exec(sh("exit 3").stdin(true)).await.unwrap();
    let mut stdin = session.stdin.take().unwrap();
    assert_eq!(session.wait().await.unwrap().code(), Some(3));
    let err = stdin.write(&data).await.unwrap_err();
    assert!(matches!(err, ClientError::StdinClosed), "{err}");
}

#[tokio::test]
async fn signal_kills_the_child() {
    let agent = AgentProcess::start();
    let client = agent.client().await;
    let mut session = client
        .exec(ExecRequest::new(["sleep", "30"]))
        .await
        .unwrap();
    // Signal from another task while this one waits.
    let control = session.control();
    let waiter = tokio::spawn(async move { session.wait().await });
    control.signal(libc::SIGTERM).await.unwrap();
    let status = waiter.await.unwrap().unwrap();
    assert_eq!(status.termination, Termination::Signaled(libc::SIGTERM));
    assert_eq!(status.code(), None);
    assert!(!status.timed_out);
    let err = control.signal(libc::SIGTERM).await.unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::NoSuchExec), "{err}");

    let mut session = client.exec(ExecRequest::new(["sleep", "5"])).await.unwrap();
    let err = session.resize(10, 10).await.unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::InvalidInput), "{err}");
    session.signal(libc::SIGKILL).await.unwrap();
    assert_eq!(session.wait().await.unwrap().signal(), Some(libc::SIGKILL));
    // The status stays available.
    assert_eq!(session.wait().await.unwrap().signal(), Some(libc::SIGKILL));
}

#[tokio::test]
async fn timeout_kills_and_is_reported() {
    let agent = AgentProcess::start();
    let client = agent.client().await;
    let started = std::time::Instant::now();
    // The grandchild `sleep` is in the same process group and dies too.
    let out = client
        .exec(sh("sleep 30; echo never").timeout(Duration::from_millis(300)))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal(), Some(libc::SIGKILL));
    assert!(out.stdout.is_empty());
    assert!(started.elapsed() < Duration::from_secs(10));
    let status = client
        .exec(ExecRequest::new(["true"]).timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap();
    assert!(status.success());
}

async fn read_until(stream: &mut agent::OutputStream, needle: &str, seen: &mut String) {
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while !seen.contains(needle) {
            match stream.recv().await.unwrap() {
                Some(chunk) => seen.push_str(&String::from_utf8_lossy(&chunk)),
                None => return false,
            }
        }
        true
    })
    .await;
    assert!(
        matches!(found, Ok(true)),
        "{needle:?} not in pty output {seen:?}"
    );
}

#[tokio::test]
async fn pty_exec_and_resize() {
    let agent = AgentProcess::start();
    let client = agent.client().await;
    let out = client
        .exec(ExecRequest::new(["tty"]).pty(24, 80))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    let tty = String::from_utf8_lossy(&out.stdout);
    assert!(tty.starts_with("/dev/pts/"), "tty printed {tty:?}");
    assert!(out.status.success());

    let mut session = client
        .exec(
            sh("stty size; read line; stty size; echo \"got $line\"")
                .pty(24, 80)
                .stdin(true),
        )
        .await
        .unwrap();
    let mut stdout = session.stdout.take().unwrap();
    let mut seen = String::new();
    read_until(&mut stdout, "24 80", &mut seen).await;
    session.resize(50, 132).await.unwrap();
    session
        .stdin
        .as_mut()
        .unwrap()
        .write(b"ping\n")
        .await
        .unwrap();
    read_until(&mut stdout, "50 132", &mut seen).await;
    read_until(&mut stdout, "got ping", &mut seen).await;
    assert!(session.wait().await.unwrap().success());

    // Closing stdin on a pty sends end-of-file to the reader.
    let mut session = client
        .exec(ExecRequest::new(["cat"]).pty(24, 80).stdin(true))
        .await
        .unwrap();
    session.stdin.take().unwrap().close().unwrap();
    assert!(session.wait().await.unwrap().success());
}

#[tokio::test]
async fn files_up_and_down() {
    let agent = AgentProcess::start();
    let client = agent.client().await;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap().to_owned();
    let path = format!("{base}/blob.bin");
    let data = random_bytes(5 << 20, 42);

    assert_eq!(
        client.put_file(&path, 0o640, &data[..]).await.unwrap(),
        data.len() as u64
    );
    assert!(std::fs::read(&path).unwrap() == data);
    let mut fetched = Vec::new();
    let stat = client.get_file(&path, &mut fetched).await.unwrap();
    assert!(fetched == data, "fetched {} bytes", fetched.len());
    assert_eq!(stat.size, data.len() as u64);
    assert_eq!(stat.mode, 0o640);
    assert_eq!(stat.kind, FileKind::File);

    // Overwrite in place, empty file, stat.
    client
        .put_file(&path, 0o755, &b"#!/bin/sh\necho hi\n"[..])
        .await
        .unwrap();
    let out = client
        .exec(ExecRequest::new([path.as_str()]))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(out.stdout, b"hi\n");
    client
        .put_file(&format!("{base}/empty"), 0o600, &b""[..])
        .await
        .unwrap();
    let mut empty = Vec::new();
    assert_eq!(
        client
            .get_file(&format!("{base}/empty"), &mut empty)
            .await
            .unwrap()
            .size,
        0
    );
    assert!(empty.is_empty());
    let stat = client.stat(&path).await.unwrap();
    assert_eq!(
        (stat.kind, stat.mode, stat.size),
        (FileKind::File, 0o755, 18)
    );

    std::fs::create_dir(format!("{base}/sub")).unwrap();
    std::fs::write(format!("{base}/sub/x"), b"x").unwrap();
    let names: Vec<_> = client
        .list(&base)
        .await
        .unwrap()
        .into_iter()
        .map(|e| (e.name, e.stat.kind))
        .collect();
    assert_eq!(
        names,
        [
            ("blob.bin".to_owned(), FileKind::File),
            ("empty".to_owned(), FileKind::File),
            ("sub".to_owned(), FileKind::Dir)
        ]
    );

    // Errors.
    let missing = format!("{base}/missing");
    for err in [
        client.stat(&missing).await.unwrap_err(),
        client
            .get_file(&missing, &mut Vec::new())
            .await
            .unwrap_err(),
        client.list(&missing).await.unwrap_err(),
        client.remove(&missing, false).await.unwrap_err(),
        client
            .put_file(&format!("{missing}/f"), 0o644, &b"x"[..])
            .await
            .unwrap_err(),
    ] {
        assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");
    }
    let err = client.stat("relative/path").await.unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::InvalidInput), "{err}");
    let err = client.get_file(&base, &mut Vec::new()).await.unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::InvalidInput), "{err}");
    assert!(client.remove(&format!("{base}/sub"), false).await.is_err());

    client.remove(&format!("{base}/sub"), true).await.unwrap();
    client.remove(&path, false).await.unwrap();
    let names: Vec<_> = client
        .list(&base)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["empty"], "no temporary files are left behind");
}

#[tokio::test]
async fn many_concurrent_execs_on_one_connection() {
    let agent = AgentProcess::start();
    let client = agent.client().await;
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let out = client
                    .exec(sh(&format!(
                        "head -c {} /dev/zero | tr '\\0' x; echo; exit {}",
                        1000 * i,
                        i % 5
                    )))
                    .await
                    .unwrap()
                    .wait_with_output()
                    .await
                    .unwrap();
                (i, out)
            })
        })
        .collect();
    for task in tasks {
        let (i, out) = task.await.unwrap();
        assert_eq!(out.stdout.len(), 1000 * i + 1);
        assert_eq!(out.status.code(), Some((i % 5) as i32));
    }
    // A second connection works alongside.
    let other = agent.client().await;
    assert!(other
        .exec(ExecRequest::new(["true"]))
        .await
        .unwrap()
        .wait()
        .await
        .unwrap()
        .success());
}

/// Reads one frame from a raw connection.
async fn read_message(stream: &mut UnixStream) -> Option<AgentMessage> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await.ok()?;
    let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
    stream.read_exact(&mut payload).await.ok()?;
    Some(decode_payload(&payload).expect("agent frames decode"))
}

async fn expect_fatal(stream: &mut UnixStream, kind: ErrorKind) {
    match read_message(stream).await {
        Some(AgentMessage::Fatal(e)) => assert_eq!(e.kind, kind, "{e}"),
        other => panic!("expected a Fatal frame, got {other:?}"),
    }
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("agent closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing follows the Fatal frame");
}

async fn hello(stream: &mut UnixStream) {
    let mut frame = Vec::new();
    encode_frame(
        &ClientMessage::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
        },
        &mut frame,
    )
    .unwrap();
    stream.write_all(&frame).await.unwrap();
    assert!(matches!(
        read_message(stream).await,
        Some(AgentMessage::Hello { .. })
    ));
}

#[tokio::test]
async fn malformed_and_oversized_frames_close_only_that_connection() {
    let agent = AgentProcess::start();
    let bystander = agent.client().await;
    let mut long_running = bystander
        .exec(ExecRequest::new(["sleep", "30"]))
        .await
        .unwrap();

    // Not our protocol at all: the length prefix is absurd.
    let mut raw = UnixStream::connect(&agent.socket).await.unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    expect_fatal(&mut raw, ErrorKind::FrameTooLarge).await;

    // Oversized frame after a good handshake.
    let mut raw = UnixStream::connect(&agent.socket).await.unwrap();
    hello(&mut raw).await;
    raw.write_all(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes())
        .await
        .unwrap();
    expect_fatal(&mut raw, ErrorKind::FrameTooLarge).await;

    // A well-sized frame with garbage inside.
    let mut raw = UnixStream::connect(&agent.socket).await.unwrap();
    hello(&mut raw).await;
    raw.write_all(&[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    expect_fatal(&mut raw, ErrorKind::Protocol).await;

    // Wrong version in the handshake.
    let mut raw = UnixStream::connect(&agent.socket).await.unwrap();
    let mut frame = Vec::new();
    encode_frame(
        &ClientMessage::Hello {
            magic: MAGIC,
            version: 99,
        },
        &mut frame,
    )
    .unwrap();
    raw.write_all(&frame).await.unwrap();
    expect_fatal(&mut raw, ErrorKind::VersionMismatch).await;

    // Data beyond the granted credit.
    let mut raw = UnixStream::connect(&agent.socket).await.unwrap();
    hello(&mut raw).await;
    let mut frames = Vec::new();
    let request = agent::protocol::Request::Exec(ExecRequest::new(["sleep", "30"]).stdin(true));
    encode_frame(&ClientMessage::Request { id: 1, request }, &mut frames).unwrap();
    // The pipe to `sleep` absorbs one chunk; twelve overrun the window whatever it took.
    for _ in 0..12 {
        let data = vec![0u8; agent::protocol::MAX_CHUNK];
        encode_frame(
            &ClientMessage::Data {
                id: 1,
                channel: agent::protocol::Channel::Stdin,
                data,
            },
            &mut frames,
        )
        .unwrap();
    }
    // The agent may close the connection before taking all of it.
    let _ = raw.write_all(&frames).await;
    // The exec's start and credits may come before or after the Fatal frame.
    loop {
        match read_message(&mut raw).await {
            Some(AgentMessage::Fatal(e)) => {
                assert_eq!(e.kind, ErrorKind::Protocol, "{e}");
                break;
            }
            Some(AgentMessage::Reply { id: 1, .. }) => continue,
            Some(AgentMessage::Credit { .. }) => continue,
            other => panic!("expected credits then Fatal, got {other:?}"),
        }
    }

    // The agent and its other connections are unaffected.
    agent.client().await.health().await.unwrap();
    bystander.health().await.unwrap();
    long_running.signal(libc::SIGKILL).await.unwrap();
    assert_eq!(
        long_running.wait().await.unwrap().signal(),
        Some(libc::SIGKILL)
    );
}

/// Reads past the replies and credits of requests already sent, expects a `Fatal` protocol
/// error whose message contains `needle`, then the agent closing the connection.
async fn expect_protocol_violation(stream: &mut UnixStream, needle: &str) {
    loop {
        match read_message(stream).await {
            Some(AgentMessage::Fatal(e)) => {
                assert_eq!(e.kind, ErrorKind::Protocol, "{e}");
                assert!(e.message.contains(needle), "expected {needle:?} in: {e}");
                break;
            }
            Some(AgentMessage::Reply { .. } | AgentMessage::Credit { .. }) => continue,
            Some(AgentMessage::Data { id, channel, data }) => panic!(
                "expected a Fatal frame about {needle:?}, got {} bytes of {channel:?} data for {id}",
                data.len()
            ),
            other => panic!("expected a Fatal frame about {needle:?}, got {other:?}"),
        }
    }
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("agent closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing follows the Fatal frame");
}

/// Sends `messages` (the client's, or the agent's in a test playing the agent) as frames, in
/// one write.
async fn send<M: serde::Serialize>(stream: &mut UnixStream, messages: &[M]) {
    let mut frames = Vec::new();
    for m in messages {
        encode_frame(m, &mut frames).unwrap();
    }
    stream.write_all(&frames).await.unwrap();
}

/// The handshake and request-id rules: each violation ends that connection only.
#[tokio::test]
async fn handshake_and_request_id_violations_close_only_that_connection() {
    let agent = AgentProcess::start();
    let bystander = agent.client().await;
    let health = |id| ClientMessage::Request {
        id,
        request: agent::protocol::Request::Health,
    };

    // A request before the handshake.
    let mut raw = UnixStream::connect(&agent.socket).await.unwrap();
    send(&mut raw, &[health(1)]).await;
    expect_protocol_violation(&mut raw, "the first message must be Hello").await;

    // A Hello with another magic is no Hello.
    let mut raw = UnixStream::connect(&agent.socket).await.unwrap();
    let wrong_magic = ClientMessage::Hello {
        magic: *b"MVMX",
        version: PROTOCOL_VERSION,
    };
    send(&mut raw, &[wrong_magic]).await;
    expect_protocol_violation(&mut raw, "the first message must be Hello").await;

    // A second Hello.
    let mut raw = UnixStream::connect(&agent.socket).await.unwrap();
    hello(&mut raw).await;
    let again = ClientMessage::Hello {
        magic: MAGIC,
        version: PROTOCOL_VERSION,
    };
    send(&mut raw, &[again]).await;
    expect_protocol_violation(&mut raw, "duplicate Hello").await;

    // An id reused while its exec still runs; the exec dies with the connection.
    let mut raw = UnixStream::connect(&agent.socket).await.unwrap();
    hello(&mut raw).await;
    let exec = ClientMessage::Request {
        id: 7,
        request: agent::protocol::Request::Exec(ExecRequest::new(["sleep", "30"])),
    };
    send(&mut raw, &[exec]).await;
    let pid = match read_message(&mut raw).await {
        Some(AgentMessage::Reply {
            id: 7,
            reply: agent::protocol::Reply::ExecStarted { pid },
        }) => pid,
        other => panic!("expected ExecStarted, got {other:?}"),
    };
    send(&mut raw, &[health(7)]).await;
    expect_protocol_violation(&mut raw, "request id 7 is still in use").await;
    assert!(
        wait_until(Duration::from_secs(5), || process_state(pid).is_none()).await,
        "the exec of the closed connection still runs"
    );

    // A Data chunk over MAX_CHUNK, in a frame well under MAX_FRAME_LEN, for a live stdin
    // with credit to spare (so only the chunk size is wrong).
    let mut raw = UnixStream::connect(&agent.socket).await.unwrap();
    hello(&mut raw).await;
    let exec = ClientMessage::Request {
        id: 1,
        request: agent::protocol::Request::Exec(ExecRequest::new(["cat"]).stdin(true)),
    };
    send(&mut raw, &[exec]).await;
    assert!(matches!(
        read_message(&mut raw).await,
        Some(AgentMessage::Reply {
            id: 1,
            reply: agent::protocol::Reply::ExecStarted { .. }
        })
    ));
    let chunk = ClientMessage::Data {
        id: 1,
        channel: agent::protocol::Channel::Stdin,
        data: vec![0u8; agent::protocol::MAX_CHUNK + 1],
    };
    let mut frame = Vec::new();
    encode_frame(&chunk, &mut frame).unwrap();
    assert!(frame.len() < MAX_FRAME_LEN / 2, "the frame itself is fine");
    assert!(agent::protocol::MAX_CHUNK + 1 < agent::protocol::INITIAL_WINDOW as usize);
    send(&mut raw, &[chunk]).await;
    expect_protocol_violation(
        &mut raw,
        &format!(
            "data chunk of {} bytes exceeds {}",
            agent::protocol::MAX_CHUNK + 1,
            agent::protocol::MAX_CHUNK
        ),
    )
    .await;

    // The agent and its other connections are unaffected.
    agent.client().await.health().await.unwrap();
    bystander.health().await.unwrap();
}

#[tokio::test]
async fn disconnect_mid_stream_kills_children_and_leaks_nothing() {
    let agent = AgentProcess::start();
    let fds_before = agent.fd_count();

    let client = agent.client().await;
    // `yes` streams forever; its shell parent and a backgrounded sleep share the group.
    let mut session = client
        .exec(sh("sleep 1000 & exec yes").stdin(true))
        .await
        .unwrap();
    let pid = session.pid();
    let mut stdout = session.stdout.take().unwrap();
    let mut got = 0;
    while got < (1 << 20) {
        got += stdout.recv().await.unwrap().unwrap().len();
    }
    let family: Vec<u32> = common::children_of(agent.pid())
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert!(family.contains(&pid));
    let grandchildren = common::children_of(pid);
    assert!(!grandchildren.is_empty(), "the backgrounded sleep runs");

    drop(stdout);
    drop(session);
    drop(client);

    let all_gone = wait_until(Duration::from_secs(10), || {
        process_state(pid).is_none()
            && grandchildren
                .iter()
                .all(|(p, _)| process_state(*p).is_none())
    })
    .await;
    assert!(
        all_gone,
        "exec processes survive the disconnect: pid {pid} {:?}, group {grandchildren:?}, agent children {:?}",
        process_state(pid),
        common::children_of(agent.pid())
    );
    assert!(
        wait_until(Duration::from_secs(5), || agent.children().is_empty()).await,
        "agent still has children (zombies?): {:?}",
        agent.children()
    );
    assert!(
        wait_until(Duration::from_secs(5), || agent.fd_count() <= fds_before).await,
        "agent fds: {} before, {} after",
        fds_before,
        agent.fd_count()
    );
    agent.client().await.health().await.unwrap();
}

#[tokio::test]
async fn shutdown_stops_a_host_agent() {
    let mut agent = AgentProcess::start();
    let client = agent.client().await;
    let _sleeper = client
        .exec(ExecRequest::new(["sleep", "30"]))
        .await
        .unwrap();
    let sleeper_pid = _sleeper.pid();
    client.shutdown(ShutdownAction::PowerOff).await.unwrap();
    let exited = wait_until(Duration::from_secs(10), || {
        matches!(agent.child.try_wait(), Ok(Some(_)))
    })
    .await;
    assert!(exited, "agent still running after Shutdown");
    assert!(agent.child.try_wait().unwrap().unwrap().success());
    assert!(
        wait_until(Duration::from_secs(5), || process_state(sleeper_pid)
            .is_none_or(|s| s == 'Z'))
        .await
    );
    let err = client.health().await.unwrap_err();
    assert!(matches!(err, ClientError::Disconnected(_)), "{err}");
}

#[tokio::test]
async fn exec_as_another_user() {
    if !as_root(
        "exec_as_another_user",
        "the agent must run as root to switch users",
    ) {
        return;
    }
    let agent = AgentProcess::start();
    let client = agent.client().await;
    let out = client
        .exec(sh("id -u; id -g; id -G; echo $HOME").user(65534, 65534))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "65534\n65534\n65534\n/\n"
    );
    assert!(out.status.success());
}

/// Yields `prefix`, then fails: a local source breaking in the middle of a put.
struct FailingReader(Vec<u8>);

impl tokio::io::AsyncRead for FailingReader {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.0.is_empty() {
            return std::task::Poll::Ready(Err(std::io::Error::other("source broke")));
        }
        let n = self.0.len().min(buf.remaining());
        buf.put_slice(&self.0[..n]);
        self.0.drain(..n);
        std::task::Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn failed_put_leaves_nothing_behind() {
    let agent = AgentProcess::start();
    let client = agent.client().await;
    let dir = tempfile::tempdir().unwrap();
    let path = format!("{}/target", dir.path().display());
    std::fs::write(&path, b"old content").unwrap();
    let err = client
        .put_file(&path, 0o644, FailingReader(random_bytes(1 << 20, 3)))
        .await
        .unwrap_err();
    assert!(matches!(err, ClientError::Io(_)), "{err}");
    // The agent discards the partial upload; the old file is intact.
    let dir_path = dir.path().to_owned();
    assert!(
        wait_until(Duration::from_secs(5), || std::fs::read_dir(&dir_path)
            .unwrap()
            .count()
            == 1)
        .await,
        "temporary file left behind"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"old content");
    // The connection is still usable.
    client.put_file(&path, 0o600, &b"new"[..]).await.unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), b"new");
}

/// Lazily detaches whatever the test mounted, even when it fails half-way.
struct Unmounted(Vec<std::path::PathBuf>);

impl Drop for Unmounted {
    fn drop(&mut self) {
        for path in self.0.iter().rev() {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(path)
                .status();
        }
    }
}

/// The containers of a pod: roots mounted at run time (`Mount`), processes chrooted into
/// them (`ExecRequest::root`), detached again (`Unmount`).
#[tokio::test]
async fn containers_with_their_own_roots() {
    if !as_root(
        "containers_with_their_own_roots",
        "mounting and chroot need root",
    ) {
        return;
    }
    let busybox = std::path::Path::new("/bin/busybox");
    if !busybox.is_file() {
        mvm_testkit::skip_or_fail_in_ci(
            "containers_with_their_own_roots",
            "/bin/busybox (busybox-static) is missing",
        );
        return;
    }
    let pod = tempfile::tempdir().unwrap();
    let a = pod.path().join("a");
    let b = pod.path().join("b");
    let (a_str, b_str) = (a.to_str().unwrap(), b.to_str().unwrap());
    let _guard = Unmounted(vec![a.clone(), b.clone()]);
    let agent = AgentProcess::start();
    let client = agent.client().await;

    // Container a: a fresh file system with a static busybox in it.
    client
        .mount(agent::MountRequest {
            source: "tmpfs".into(),
            target: a_str.into(),
            fstype: Some("tmpfs".into()),
            read_only: false,
        })
        .await
        .unwrap();
    std::fs::create_dir_all(a.join("bin")).unwrap();
    std::fs::create_dir_all(a.join("work")).unwrap();
    std::fs::copy(busybox, a.join("bin/busybox")).unwrap();
    let in_root = |root: &str, script: &str| {
        ExecRequest::new(["/bin/busybox", "sh", "-c", script]).root(root)
    };
    let out = client
        .exec(in_root(a_str, "echo a > /only-a; busybox pwd; busybox ls /").cwd("/work"))
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "/work\nbin\nonly-a\nwork\n",
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(a.join("only-a")).unwrap(), "a\n");

    // Container b sees a's tree through a read-only bind mount, as another user.
    client
        .mount(agent::MountRequest {
            source: a_str.into(),
            target: b_str.into(),
            fstype: None,
            read_only: true,
        })
        .await
        .unwrap();
    let out = client
        .exec(
            in_root(b_str, "busybox id -u; busybox cat /only-a; echo x > /new").user(65534, 65534),
        )
        .await
        .unwrap()
        .wait_with_output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "65534\na\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success());

    // Bad roots and mounts are refused with the reason.
    let err = client
        .exec(ExecRequest::new(["true"]).root("relative"))
        .await
        .err()
        .expect("a relative root is refused");
    assert_eq!(err.remote_kind(), Some(ErrorKind::InvalidInput), "{err}");
    let err = client
        .exec(ExecRequest::new(["true"]).root(pod.path().join("missing").to_str().unwrap()))
        .await
        .err()
        .expect("a missing root is refused");
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");
    let err = client
        .exec(in_root(a_str, "true").cwd("/nowhere"))
        .await
        .err()
        .expect("a cwd missing from the root is refused");
    assert_eq!(err.remote_kind(), Some(ErrorKind::NotFound), "{err}");
    let err = client
        .mount(agent::MountRequest {
            source: "tmpfs".into(),
            target: "mnt".into(),
            fstype: Some("tmpfs".into()),
            read_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.remote_kind(), Some(ErrorKind::InvalidInput), "{err}");

    // Unmount detaches b, then a: the mount points are empty directories again.
    client.unmount(b_str).await.unwrap();
    client.unmount(a_str).await.unwrap();
    assert_eq!(std::fs::read_dir(&a).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&b).unwrap().count(), 0);
    let err = client.unmount(a_str).await.unwrap_err();
    assert!(err.to_string().contains("unmounting"), "{err}");
}

fn identity() -> agent::Identity {
    agent::Identity {
        hostname: "restored".into(),
        mac: Some([2, 0, 0, 0, 0, 1]),
        ip: None,
        entropy: vec![7; 64],
        realtime_ns: 0,
        dns: None,
        keep_machine_id: false,
    }
}

fn assert_refused_identity(err: ClientError) {
    match err {
        ClientError::Remote(e) => {
            assert_eq!(e.kind, ErrorKind::InvalidInput, "{e}");
            assert!(e.message.contains("jail tier"), "{e}");
        }
        other => panic!("expected a refusal, got {other}"),
    }
}

/// A host-process agent (jail tier) has no machine of its own: it refuses a new identity,
/// asked for on a connection or with its handshake, and the host's name stays.
#[tokio::test]
async fn a_host_process_agent_refuses_a_new_identity() {
    let agent = AgentProcess::start();
    let client = agent.client().await;
    let hostname = nix::unistd::gethostname().unwrap();
    assert_refused_identity(client.reidentify(identity()).await.unwrap_err());
    let stream = UnixStream::connect(&agent.socket).await.unwrap();
    assert_refused_identity(
        agent::AgentClient::from_stream_reidentified(stream, identity())
            .await
            .unwrap_err(),
    );
    assert_eq!(nix::unistd::gethostname().unwrap(), hostname);
    client.health().await.unwrap();
}

/// Reads one client frame from a raw connection (the agent's side of it).
async fn read_client_message(stream: &mut UnixStream) -> ClientMessage {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).await.unwrap();
    let mut payload = vec![0u8; u32::from_be_bytes(header) as usize];
    stream.read_exact(&mut payload).await.unwrap();
    decode_payload(&payload).expect("client frames decode")
}

/// An identity given with the handshake goes out behind the client's `Hello` before the
/// agent has answered anything (a round trip saved for a restored guest), and the
/// connection's later requests take other ids.
#[tokio::test]
async fn an_identity_given_with_the_handshake_does_not_wait_for_the_agents_hello() {
    let (client_end, mut agent_end) = UnixStream::pair().unwrap();
    let connecting = tokio::spawn(agent::AgentClient::from_stream_reidentified(
        client_end,
        identity(),
    ));
    let (hello, request) = tokio::time::timeout(Duration::from_secs(10), async {
        let hello = read_client_message(&mut agent_end).await;
        (hello, read_client_message(&mut agent_end).await)
    })
    .await
    .expect("the client sends Reidentify without waiting for the agent's Hello");
    assert!(
        matches!(hello, ClientMessage::Hello { magic: MAGIC, .. }),
        "{hello:?}"
    );
    let ClientMessage::Request {
        id,
        request: Request::Reidentify(sent),
    } = request
    else {
        panic!("expected Reidentify, got {request:?}");
    };
    assert_eq!(sent, identity());
    send(
        &mut agent_end,
        &[
            AgentMessage::Hello {
                magic: MAGIC,
                version: PROTOCOL_VERSION,
                agent_version: "test".into(),
            },
            AgentMessage::Reply {
                id,
                reply: Reply::Done,
            },
        ],
    )
    .await;
    let client = connecting.await.unwrap().unwrap();
    assert_eq!(client.agent_version(), "test");
    let removing = tokio::spawn(async move { client.remove("/gone", false).await });
    let ClientMessage::Request { id: next, .. } = read_client_message(&mut agent_end).await else {
        panic!("expected a request");
    };
    assert_ne!(
        next, id,
        "a later request reuses the handshake's request id"
    );
    send(
        &mut agent_end,
        &[AgentMessage::Reply {
            id: next,
            reply: Reply::Done,
        }],
    )
    .await;
    removing.await.unwrap().unwrap();
}
