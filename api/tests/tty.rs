//! Terminals in the jail tier, end to end as root: a real mvmd, a jail-tier sandbox whose jail
//! has its own devpts, and tty execs over the websocket.

mod common;

use common::{block_on, Daemon};
use futures_util::{SinkExt, StreamExt};
use mvm_sandbox::model::{
    CreateSandbox, ExecEvent, ExecRequest, ExitInfo, Isolation, TtySize, WsControl,
};
use mvm_testkit::root_or_skip;
use tokio_tungstenite::tungstenite::Message;

fn tty_cmd(script: &str) -> ExecRequest {
    ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        tty: true,
        ..ExecRequest::default()
    }
}

/// Runs `req` over `GET /v1/sandboxes/{id}/exec/ws`, sending `controls` and then `stdin`,
/// and returns everything the terminal showed and how the process ended. The API client has
/// no resize call, so this speaks the websocket protocol itself.
async fn ws_exec(
    d: &Daemon,
    id: &str,
    req: &ExecRequest,
    controls: &[WsControl],
    stdin: &[u8],
) -> (String, ExitInfo) {
    let (mut sink, mut source) = common::ws_exec(d, id, req).await.split();
    let text = |v: String| Message::Text(v.into());
    for c in controls {
        sink.send(text(serde_json::to_string(c).unwrap()))
            .await
            .unwrap();
    }
    sink.send(Message::Binary(stdin.to_vec().into()))
        .await
        .unwrap();
    let mut shown = Vec::new();
    loop {
        match source.next().await {
            Some(Ok(Message::Binary(data))) => {
                let (stream, rest) = data.split_first().expect("a stream byte");
                assert_eq!(*stream, 1, "a terminal has no separate stderr");
                shown.extend_from_slice(rest);
            }
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<ExecEvent>(&t).unwrap() {
                ExecEvent::Exit(exit) => return (String::from_utf8_lossy(&shown).into(), exit),
                other => panic!(
                    "{other:?}; the terminal showed {:?}",
                    String::from_utf8_lossy(&shown)
                ),
            },
            Some(Ok(_)) => {}
            other => panic!("websocket ended without an exit event: {other:?}"),
        }
    }
}

#[test]
fn tty_exec_in_a_jail_sandbox() {
    if !root_or_skip("tty_exec_in_a_jail_sandbox") {
        return;
    }
    let d = Daemon::start();
    let before = d.host_state();
    block_on(async {
        let c = d.client();
        let s = c
            .create(&CreateSandbox {
                isolation: Some(Isolation::Jail),
                ..CreateSandbox::default()
            })
            .await
            .expect("create");

        // The API client's interactive exec: the default 24x80 terminal; the jail's devpts lists
        // only the exec's own pty; /dev/tty is the controlling terminal.
        let mut shown = Vec::new();
        let exit = c
            .exec_interactive(
                &s.id,
                &tty_cmd(
                    "test -t 0 && test -t 1 && echo on-a-tty; stty size; tty; ls /dev/pts | tr '\\n' ' '; \
                     echo; echo via-dev-tty > /dev/tty",
                ),
                &b""[..],
                |_, data| shown.extend_from_slice(data),
            )
            .await
            .expect("tty exec");
        let shown = String::from_utf8_lossy(&shown);
        assert_eq!(exit.exit_code, Some(0), "{shown}");
        let lines: Vec<&str> = shown.lines().map(str::trim_end).collect();
        assert_eq!(
            lines,
            ["on-a-tty", "24 80", "/dev/pts/0", "0 ptmx", "via-dev-tty"],
            "{shown:?}"
        );

        // A resize before the input arrives: the process sees the requested size; the terminal
        // echoes the input and turns the line ends into CR-LF.
        let (shown, exit) = ws_exec(
            &d,
            &s.id,
            &tty_cmd("read line; test -t 0 && echo on-a-tty; stty size; exit 3"),
            &[WsControl::Resize {
                rows: 50,
                cols: 132,
            }],
            b"go\n",
        )
        .await;
        assert_eq!(exit.exit_code, Some(3), "{shown:?}");
        assert_eq!(shown, "go\r\non-a-tty\r\n50 132\r\n");

        // A size in the request holds from the start: no resize needed, no race.
        let sized = ExecRequest {
            tty_size: Some(TtySize { rows: 17, cols: 91 }),
            ..tty_cmd("stty size")
        };
        let (shown, exit) = ws_exec(&d, &s.id, &sized, &[], b"").await;
        assert_eq!(exit.exit_code, Some(0), "{shown:?}");
        assert_eq!(shown, "17 91\r\n");
        // A size without a tty is refused naming the field.
        let bad = ExecRequest {
            cmd: vec!["true".into()],
            tty_size: Some(TtySize { rows: 24, cols: 80 }),
            ..ExecRequest::default()
        };
        let err = c.exec(&s.id, &bad).await.expect_err("tty_size without tty");
        assert!(err.to_string().contains("tty_size"), "{err}");

        // Without a tty the same sandbox still gets pipes.
        let out = c
            .exec(
                &s.id,
                &ExecRequest {
                    cmd: vec!["sh".into(), "-c".into(), "test -t 0 || echo no-tty".into()],
                    ..ExecRequest::default()
                },
            )
            .await
            .expect("exec");
        assert_eq!(out.stdout, "no-tty\n");
        c.delete(&s.id).await.expect("delete");
    });
    // The devpts lived in the jail's mount namespace: nothing of it is left on the host.
    d.assert_no_leaks(&before);
}
