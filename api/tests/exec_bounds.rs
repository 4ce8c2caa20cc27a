//! mvmd's memory is bounded whatever a sandbox or a client does (as root, a real mvmd and
//! jail-tier sandboxes): a gigabyte of output through buffered, NDJSON and websocket execs,
//! clients that stop reading, oversized bodies and execs too large for the agent protocol.
//! mvmd's growth is read from /proc/<pid>/status: VmHWM after resetting it (clear_refs 5),
//! minus VmRSS before (`mvm_testkit::rss`).

mod common;

use std::time::{Duration, Instant};

use common::{api_error, block_on, jail, sh, ws_exec, Daemon};
use futures_util::{SinkExt, StreamExt};
use mvm_client::Stream;
use mvm_sandbox::model::{ExecEvent, ExecRequest};
use mvm_testkit::root_or_skip;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// 1 GiB.
const GIB: u64 = 1 << 30;
/// What mvmd may grow by while a sandbox pushes a gigabyte or a client stalls.
const CEILING: u64 = 64 << 20;
/// A slow client's pause after each piece of output it takes (a blocking sleep on purpose:
/// the client's whole reading stops meanwhile): at most ~128 MB/s in 64 KiB pieces, slower
/// than a sandbox writes.
const SLOW_READER: Duration = Duration::from_micros(500);

/// Runs `f` and returns its value and how far mvmd's resident memory rose meanwhile.
async fn growth<T>(d: &Daemon, f: impl std::future::Future<Output = T>) -> (T, u64) {
    let growth = mvm_testkit::rss::PeakGrowth::start(d.pid());
    let value = f.await;
    (value, growth.bytes())
}

/// Sends `head` (a request line and headers, `Connection: close` added) and `body` on a
/// connection of its own, and returns the answer's status and body as text. The body is
/// written alongside reading, so that an answer before the body is read comes through.
async fn raw_http(d: &Daemon, head: &str, body: Vec<u8>) -> (u16, String) {
    let conn = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
    let (mut rx, mut tx) = conn.into_split();
    let head = format!(
        "{head}Host: mvmd\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
        d.token()
    );
    let writer = tokio::spawn(async move {
        tx.write_all(head.as_bytes()).await?;
        tx.write_all(&body).await?;
        // Keep the write half open: a closed one could end the exchange early.
        tokio::time::sleep(Duration::from_secs(30)).await;
        Ok::<_, std::io::Error>(())
    });
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), rx.read_to_end(&mut answer))
        .await
        .expect("mvmd did not answer (waiting for the body?)");
    match read {
        // mvmd answered and closed while the rest of the body was still unread on its side:
        // a unix socket then reports ECONNRESET once the answer has been read (as TCP sends
        // a reset), which ends the exchange like EOF does.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !answer.is_empty() => {}
        other => {
            other.expect("reading the answer");
        }
    }
    writer.abort();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, body.to_owned())
}

fn assert_bounded(what: &str, grown: u64) {
    eprintln!(
        "{what}: mvmd grew by {:.1} MiB",
        grown as f64 / (1 << 20) as f64
    );
    assert!(
        grown < CEILING,
        "{what}: mvmd grew by {grown} bytes (ceiling {CEILING})"
    );
}

/// Waits up to 10 s until no process of the sandbox has `marker` in its command line.
async fn wait_gone(d: &Daemon, id: &str, marker: &str) {
    let c = d.client();
    // `[x]yz` matches `xyz`, but not the probe's own command line.
    let (first, rest) = marker.split_at(1);
    let probe = sh(&format!(
        "for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done 2>/dev/null \
         | grep -c '[{first}]{rest}' || true"
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = c.exec(id, &probe).await.expect("probe");
        if out.stdout.trim() == "0" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the writer {marker} outlived its client"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `data` as an HTTP/1.1 chunked body, 64 KiB a chunk.
fn chunked(data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    for chunk in data.chunks(64 << 10) {
        body.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        body.extend_from_slice(chunk);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(b"0\r\n\r\n");
    body
}

/// Reads a websocket exec to its exit event, pausing `pace` after each piece of output:
/// (stdout bytes, exit code).
async fn ws_drain(
    ws: &mut WebSocketStream<tokio::net::UnixStream>,
    pace: Duration,
) -> (u64, Option<i32>) {
    let mut bytes = 0;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(data))) => {
                bytes += data.len() as u64 - 1;
                std::thread::sleep(pace);
            }
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ExecEvent>(&t).unwrap() {
                ExecEvent::Exit(exit) => return (bytes, exit.exit_code),
                other => panic!("{other:?}"),
            },
            Some(Ok(_)) => {}
            other => panic!("websocket ended without an exit event: {other:?}"),
        }
    }
}

#[test]
fn buffered_exec_keeps_its_limit_and_drains_the_rest() {
    if !root_or_skip("buffered_exec_keeps_its_limit_and_drains_the_rest") {
        return;
    }
    let d = Daemon::start();
    block_on(async {
        let c = d.client();
        let s = c.create(&jail()).await.expect("create");
        let limit = mvm_sandbox::bounds::DEFAULT_EXEC_OUTPUT_LIMIT;
        // The writer runs to its end (drained, not killed): its last words on stderr arrive.
        let flood = sh(&format!("head -c {GIB} /dev/zero; echo wrote-it-all >&2"));
        let (out, grown) = growth(&d, c.exec(&s.id, &flood)).await;
        let out = out.expect("buffered exec of 1 GiB");
        assert_bounded("buffered exec of 1 GiB", grown);
        assert_eq!(out.exit.exit_code, Some(0));
        assert_eq!(out.stdout.len(), limit);
        assert!(out.stdout.bytes().all(|b| b == 0));
        assert!(out.stdout_truncated && !out.stderr_truncated);
        assert_eq!(out.stderr, "wrote-it-all\n");

        // Stdin is fed while the output is read: a process echoing more than the agent's
        // windows hold does not stall.
        let stdin = "x".repeat(1536 << 10);
        let echo = ExecRequest {
            stdin: Some(stdin.clone()),
            ..sh("cat")
        };
        let out = tokio::time::timeout(Duration::from_secs(60), c.exec(&s.id, &echo))
            .await
            .expect("an exec echoing its stdin stalled")
            .expect("echo");
        assert_eq!(out.stdout, stdin);
        assert!(!out.stdout_truncated);
        c.delete(&s.id).await.expect("delete");
    });
}

#[test]
fn a_gigabyte_streams_to_a_slow_client_in_little_memory() {
    if !root_or_skip("a_gigabyte_streams_to_a_slow_client_in_little_memory") {
        return;
    }
    let d = Daemon::start();
    block_on(async {
        let c = d.client();
        let s = c.create(&jail()).await.expect("create");
        let flood = sh(&format!("head -c {GIB} /dev/zero"));

        let ((exit, bytes), grown) = growth(&d, async {
            let mut bytes = 0u64;
            let exit = c
                .exec_streamed(&s.id, &flood, |stream, data| {
                    assert!(matches!(stream, Stream::Stdout));
                    bytes += data.len() as u64;
                    std::thread::sleep(SLOW_READER);
                })
                .await
                .expect("NDJSON exec of 1 GiB");
            (exit, bytes)
        })
        .await;
        assert_bounded("NDJSON exec of 1 GiB to a slow client", grown);
        assert_eq!((exit.exit_code, bytes), (Some(0), GIB));

        let ((bytes, code), grown) = growth(&d, async {
            let mut ws = ws_exec(&d, &s.id, &flood).await;
            ws_drain(&mut ws, SLOW_READER).await
        })
        .await;
        assert_bounded("websocket exec of 1 GiB to a slow client", grown);
        assert_eq!((bytes, code), (GIB, Some(0)));
        c.delete(&s.id).await.expect("delete");
    });
}

#[test]
fn a_client_that_stops_reading_stalls_the_sandbox_not_mvmd() {
    if !root_or_skip("a_client_that_stops_reading_stalls_the_sandbox_not_mvmd") {
        return;
    }
    let d = Daemon::start();
    block_on(async {
        let c = d.client();
        let s = c.create(&jail()).await.expect("create");
        let stall = Duration::from_secs(3);

        // NDJSON: the request, the answer's head, then nothing read for a while.
        let writer = sh("exec yes ndjson-stalled-writer");
        let (_, grown) = growth(&d, async {
            let mut conn = tokio::net::UnixStream::connect(&d.socket).await.unwrap();
            let body = serde_json::to_vec(&ExecRequest {
                stream: true,
                ..writer.clone()
            })
            .unwrap();
            let head = format!(
                "POST /v1/sandboxes/{}/exec HTTP/1.1\r\nHost: mvmd\r\nAuthorization: Bearer {}\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                s.id,
                d.token(),
                body.len()
            );
            conn.write_all(head.as_bytes()).await.unwrap();
            conn.write_all(&body).await.unwrap();
            let mut first = [0u8; 12];
            conn.read_exact(&mut first).await.unwrap();
            assert_eq!(&first, b"HTTP/1.1 200");
            tokio::time::sleep(stall).await;
            // Hanging up kills the writer.
        })
        .await;
        assert_bounded("NDJSON client stalled for 3 s on an endless writer", grown);
        wait_gone(&d, &s.id, "ndjson-stalled-writer").await;

        // Websocket: the request, then nothing read.
        let writer = sh("exec yes ws-stalled-writer");
        let (_, grown) = growth(&d, async {
            let _ws = ws_exec(&d, &s.id, &writer).await;
            tokio::time::sleep(stall).await;
        })
        .await;
        assert_bounded(
            "websocket client stalled for 3 s on an endless writer",
            grown,
        );
        wait_gone(&d, &s.id, "ws-stalled-writer").await;
        c.delete(&s.id).await.expect("delete");
    });
}

#[test]
fn oversized_requests_are_refused_and_the_sandbox_stays_usable() {
    if !root_or_skip("oversized_requests_are_refused_and_the_sandbox_stays_usable") {
        return;
    }
    let upload_limit = 1u64 << 20;
    let d = Daemon::start_with_env(
        &[],
        &[(
            mvm_sandbox::bounds::UPLOAD_LIMIT_ENV,
            std::path::Path::new(&upload_limit.to_string()),
        )],
    );
    block_on(async {
        let c = d.client();
        let s = c.create(&jail()).await.expect("create");

        // A command that would take the agent connection down with it if it broke.
        let mut cat = ws_exec(&d, &s.id, &sh("cat")).await;

        // A JSON body past the limit: 413 from its Content-Length, before any of it is sent.
        let (status, body) = raw_http(
            &d,
            &format!(
                "POST /v1/sandboxes/{}/exec HTTP/1.1\r\nContent-Type: application/json\r\n\
                 Content-Length: {}\r\n",
                s.id,
                3 << 20
            ),
            Vec::new(),
        )
        .await;
        assert_eq!(status, 413, "{body}");
        assert!(body.contains("payload_too_large"), "{body}");
        assert!(
            body.contains(mvm_sandbox::bounds::REQUEST_BODY_LIMIT_ENV),
            "{body}"
        );
        // Without a Content-Length (chunked), cut while read.
        let json = serde_json::to_vec(&ExecRequest {
            stdin: Some("x".repeat(3 << 20)),
            ..sh("true")
        })
        .unwrap();
        let (status, body) = raw_http(
            &d,
            &format!(
                "POST /v1/sandboxes/{}/exec HTTP/1.1\r\nContent-Type: application/json\r\n\
                 Transfer-Encoding: chunked\r\n",
                s.id
            ),
            chunked(&json),
        )
        .await;
        assert_eq!(status, 413, "{body}");
        assert!(
            body.contains(mvm_sandbox::bounds::REQUEST_BODY_LIMIT_ENV),
            "{body}"
        );

        // An upload past its limit, announced or chunked: 413, and nothing written.
        let put = |name: &str| {
            format!(
                "PUT /v1/sandboxes/{}/files?path=/tmp/{name} HTTP/1.1\r\n\
                 Content-Type: application/octet-stream\r\n",
                s.id
            )
        };
        let (status, body) = raw_http(
            &d,
            &format!("{}Content-Length: {}\r\n", put("big"), upload_limit + 1),
            Vec::new(),
        )
        .await;
        assert_eq!(status, 413, "{body}");
        assert!(
            body.contains(mvm_sandbox::bounds::UPLOAD_LIMIT_ENV),
            "{body}"
        );
        let (status, body) = raw_http(
            &d,
            &format!("{}Transfer-Encoding: chunked\r\n", put("big")),
            chunked(&vec![7u8; upload_limit as usize + 1]),
        )
        .await;
        assert_eq!(status, 413, "{body}");
        assert!(
            body.contains(mvm_sandbox::bounds::UPLOAD_LIMIT_ENV),
            "{body}"
        );
        c.put_file(&s.id, "/tmp/fits", 0o644, vec![7u8; upload_limit as usize])
            .await
            .expect("an upload at the limit");

        // An exec whose environment does not fit in one agent frame: refused before it is
        // sent, naming the limit; the agent connection lives on (cat still echoes).
        let mut fat = sh("true");
        fat.env.insert("FAT".into(), "y".repeat(1536 << 10));
        let e = c.exec(&s.id, &fat).await.unwrap_err();
        let (status, code, message) = api_error(&e);
        assert_eq!(
            (status, code.as_str()),
            (413, "payload_too_large"),
            "{message}"
        );
        assert!(message.contains("1048576-byte frame"), "{message}");
        let out = c
            .exec(
                &s.id,
                &sh("test -e /tmp/big || echo no-big; wc -c < /tmp/fits"),
            )
            .await
            .expect("a normal exec after the refused one");
        assert_eq!(out.stdout, format!("no-big\n{upload_limit}\n"));
        cat.send(Message::Binary(b"still here\n".to_vec().into()))
            .await
            .expect("stdin to cat");
        cat.send(Message::Text(r#"{"type":"eof"}"#.into()))
            .await
            .expect("eof to cat");
        let mut echoed = Vec::new();
        let code = loop {
            match cat.next().await {
                Some(Ok(Message::Binary(data))) => echoed.extend_from_slice(&data[1..]),
                Some(Ok(Message::Text(t))) => {
                    match serde_json::from_str::<ExecEvent>(&t).unwrap() {
                        ExecEvent::Exit(exit) => break exit.exit_code,
                        other => panic!("cat: {other:?}"),
                    }
                }
                Some(Ok(_)) => {}
                other => panic!("cat's websocket ended without an exit event: {other:?}"),
            }
        };
        assert_eq!((echoed.as_slice(), code), (&b"still here\n"[..], Some(0)));
        c.delete(&s.id).await.expect("delete");
    });
}

#[test]
fn websocket_stdin_after_the_exit_is_discarded_not_a_reset() {
    if !root_or_skip("websocket_stdin_after_the_exit_is_discarded_not_a_reset") {
        return;
    }
    let d = Daemon::start();
    block_on(async {
        let c = d.client();
        let s = c.create(&jail()).await.expect("create");
        let mut ws = ws_exec(&d, &s.id, &sh("echo bye")).await;
        assert_eq!(ws_drain(&mut ws, Duration::ZERO).await, (4, Some(0)));
        // The exit event is in; a client's stdin may still be on its way. mvmd keeps the
        // connection until the closing handshake: late stdin is discarded, not reset.
        tokio::time::sleep(Duration::from_millis(300)).await;
        ws.send(Message::Binary(b"late stdin\n".to_vec().into()))
            .await
            .expect("stdin after the exit event");
        // mvmd's Close, then ours answers it.
        match ws.next().await {
            Some(Ok(Message::Close(_))) => {}
            other => panic!("no Close from mvmd after the exit: {other:?}"),
        }
        assert!(ws.next().await.is_none(), "the closing handshake completes");
        c.delete(&s.id).await.expect("delete");
    });
}
