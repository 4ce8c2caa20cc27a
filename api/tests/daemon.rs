//! mvmd end to end, as root, with the jail tier: a real daemon on a temporary socket and SQLite
//! file, real jails, namespaces, cgroups and overlays.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{block_on, cgroup_mode, is_sandbox_id, Daemon};
use mvm_client::{ClientError, Stream};
use mvm_sandbox::manager::cgroups::CgroupMode;
use mvm_sandbox::model::{
    CreateSandbox, Egress, ExecRequest, Isolation, NetworkSpec, OnTimeout, SandboxState,
};
use mvm_testkit::root_or_skip;

fn jail() -> CreateSandbox {
    CreateSandbox {
        isolation: Some(Isolation::Jail),
        ..CreateSandbox::default()
    }
}

fn cmd(args: &[&str]) -> ExecRequest {
    ExecRequest {
        cmd: args.iter().map(|s| s.to_string()).collect(),
        ..ExecRequest::default()
    }
}

fn api_status(e: &ClientError) -> (u16, String) {
    match e {
        ClientError::Api { status, body } => (*status, body.code.clone()),
        other => panic!("expected an API error, got {other}"),
    }
}

#[test]
fn create_exec_delete_leaves_nothing() {
    if !root_or_skip("create_exec_delete_leaves_nothing") {
        return;
    }
    let d = Daemon::start();
    let before = d.host_state();
    block_on(async {
        let c = d.client();
        let mut req = jail();
        req.env = BTreeMap::from([("GREETING".into(), "hello".into())]);
        req.metadata = BTreeMap::from([("owner".into(), "test".into())]);
        let s = c.create(&req).await.expect("create");
        assert_eq!(s.state, SandboxState::Running);
        assert_eq!(s.isolation, Isolation::Jail);
        assert_eq!(s.metadata["owner"], "test");
        let out = c
            .exec(
                &s.id,
                &cmd(&["sh", "-c", "echo $GREETING; echo oops >&2; exit 4"]),
            )
            .await
            .expect("exec");
        assert_eq!(out.stdout, "hello\n");
        assert_eq!(out.stderr, "oops\n");
        assert_eq!(out.exit.exit_code, Some(4));
        // The sandbox user is unprivileged and owns its home; the host is out of reach.
        let out = c
            .exec(&s.id, &cmd(&["sh", "-c", "id -u; touch /root/x && echo home-ok; ls /dev/kvm 2>&1; cat /proc/1/cmdline | tr '\\0' ' '"]))
            .await
            .expect("exec");
        let uid: u32 = out.stdout.lines().next().unwrap().parse().unwrap();
        assert!(uid >= 200_000, "{}", out.stdout);
        assert!(out.stdout.contains("home-ok"), "{}", out.stdout);
        assert!(
            out.stdout.contains("No such file"),
            "/dev/kvm must not be in a jail-tier sandbox: {}",
            out.stdout
        );
        assert_eq!(c.get(&s.id).await.expect("get").id, s.id);
        assert_eq!(c.list().await.expect("list").len(), 1);
        let logs = c.logs(&s.id).await.expect("logs");
        assert!(
            String::from_utf8_lossy(&logs).contains("listening"),
            "{logs:?}"
        );
        let stats = c.stats(&s.id).await.expect("stats");
        assert!(
            stats.stats.pids >= 1 && stats.stats.memory_bytes > 0,
            "{stats:?}"
        );
        assert_eq!(stats.isolation, Isolation::Jail);
        c.delete(&s.id).await.expect("delete");
        assert_eq!(
            api_status(&c.get(&s.id).await.unwrap_err()),
            (404, "not_found".into())
        );
        assert_eq!(api_status(&c.delete(&s.id).await.unwrap_err()).0, 404);
    });
    d.assert_no_leaks(&before);
    // Every mutating call is in the audit log.
    let db = mvm_sandbox::db::Db::open(&d.state_dir().join("mvm.db")).expect("db");
    let audit = db.audit_tail(50).expect("audit");
    let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
    assert!(actions.contains(&"POST /v1/sandboxes"), "{actions:?}");
    assert!(
        actions
            .iter()
            .any(|a| a.starts_with("DELETE /v1/sandboxes/")),
        "{actions:?}"
    );
    assert!(
        audit
            .iter()
            .all(|a| a.tenant == "default" || a.tenant == "-"),
        "{audit:?}"
    );
}

#[test]
fn streaming_exec_with_stdin() {
    if !root_or_skip("streaming_exec_with_stdin") {
        return;
    }
    let d = Daemon::start();
    let id = block_on(async {
        let c = d.client();
        let s = c.create(&jail()).await.expect("create");
        // NDJSON: stdin given whole, output streamed as it comes.
        let mut req = cmd(&["sh", "-c", "tr a-z A-Z; echo done >&2; exit 7"]);
        req.stdin = Some("streamed input\n".into());
        let mut seen = Vec::new();
        let exit = c
            .exec_streamed(&s.id, &req, |stream, data| {
                seen.push((stream, data.to_vec()))
            })
            .await
            .expect("streamed exec");
        assert_eq!(exit.exit_code, Some(7));
        let out: Vec<u8> = seen
            .iter()
            .filter(|(s, _)| *s == Stream::Stdout)
            .flat_map(|(_, d)| d.clone())
            .collect();
        let err: Vec<u8> = seen
            .iter()
            .filter(|(s, _)| *s == Stream::Stderr)
            .flat_map(|(_, d)| d.clone())
            .collect();
        assert_eq!(out, b"STREAMED INPUT\n");
        assert_eq!(err, b"done\n");
        // Websocket: stdin streamed from a reader, larger than any single frame.
        let input: Vec<u8> = (0..300_000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let mut got = Vec::new();
        let exit = c
            .exec_interactive(
                &s.id,
                &cmd(&["sh", "-c", "wc -c; exit 5"]),
                input.as_slice(),
                |stream, data| {
                    assert_eq!(stream, Stream::Stdout);
                    got.extend_from_slice(data);
                },
            )
            .await
            .expect("websocket exec");
        assert_eq!(exit.exit_code, Some(5));
        assert_eq!(String::from_utf8_lossy(&got).trim(), "300000");
        // A websocket exec of a sandbox of nobody's is refused before the upgrade.
        let e = c
            .exec_interactive("000000000000", &cmd(&["true"]), &b""[..], |_, _| {})
            .await
            .unwrap_err();
        assert_eq!(api_status(&e).0, 404);
        c.delete(&s.id).await.expect("delete");
        s.id
    });
    // A websocket exec runs a command: it is audited like the POST one, refused or not.
    let db = mvm_sandbox::db::Db::open(&d.state_dir().join("mvm.db")).expect("db");
    let audit = db.audit_tail(50).expect("audit");
    let ws: Vec<_> = audit
        .iter()
        .filter(|a| a.action.starts_with("GET ") && a.action.ends_with("/exec/ws"))
        .map(|a| (a.tenant.as_str(), a.target.as_str(), a.status))
        .collect();
    assert_eq!(
        ws,
        [
            ("default", id.as_str(), 101),
            ("default", "000000000000", 404)
        ],
        "{audit:?}"
    );
}

#[test]
fn files_round_trip() {
    if !root_or_skip("files_round_trip") {
        return;
    }
    let d = Daemon::start();
    block_on(async {
        let c = d.client();
        let s = c.create(&jail()).await.expect("create");
        let data: Vec<u8> = (0..(3 << 20))
            .map(|i: u32| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let w = c
            .put_file(&s.id, "/tmp/blob.bin", 0o600, data.clone())
            .await
            .expect("put");
        assert_eq!(w.bytes, data.len() as u64);
        let back = c.get_file(&s.id, "/tmp/blob.bin").await.expect("get");
        assert!(back.as_ref() == data.as_slice(), "round trip differs");
        let ls = c
            .exec(&s.id, &cmd(&["stat", "-c", "%a %s", "/tmp/blob.bin"]))
            .await
            .expect("stat");
        assert_eq!(ls.stdout.trim(), format!("600 {}", data.len()));
        // The file is in the sandbox's own layer only.
        let other = c.create(&jail()).await.expect("create second");
        let e = c.get_file(&other.id, "/tmp/blob.bin").await.unwrap_err();
        assert_eq!(api_status(&e), (404, "not_found".into()));
        let e = c
            .raw(
                "PUT",
                &format!("/v1/sandboxes/{}/files?path=relative", s.id),
                "application/octet-stream",
                b"x".to_vec(),
            )
            .await
            .unwrap_err();
        assert_eq!(api_status(&e).0, 400);
        let e = c.get_file(&s.id, "/tmp").await.unwrap_err();
        assert_eq!(api_status(&e).0, 422);
        c.delete(&s.id).await.expect("delete");
        c.delete(&other.id).await.expect("delete");
    });
}

#[test]
fn quotas_answer_429() {
    if !root_or_skip("quotas_answer_429") {
        return;
    }
    let d = Daemon::start();
    let token = d.tenant(
        "small",
        &[
            "--max-sandboxes",
            "1",
            "--max-vcpus",
            "2",
            "--max-memory-mib",
            "512",
        ],
    );
    block_on(async {
        let c = d.client_with(Some(&token));
        let mut big = jail();
        big.vcpus = Some(3);
        let e = c.create(&big).await.unwrap_err();
        let ClientError::Api { status, body } = &e else {
            panic!("{e}")
        };
        assert_eq!((*status, body.code.as_str()), (429, "quota_exceeded"));
        assert!(body.message.contains("vCPUs"), "{}", body.message);
        let mut fat = jail();
        fat.memory_mib = Some(1024);
        assert_eq!(
            api_status(&c.create(&fat).await.unwrap_err()),
            (429, "quota_exceeded".into())
        );
        let s = c.create(&jail()).await.expect("first sandbox fits");
        let e = c.create(&jail()).await.unwrap_err();
        let ClientError::Api { status, body } = &e else {
            panic!("{e}")
        };
        assert_eq!(*status, 429);
        assert!(
            body.message.contains("1 of its 1 sandboxes"),
            "{}",
            body.message
        );
        // Another tenant is not limited by this one.
        let other = d.client().create(&jail()).await.expect("default tenant");
        c.delete(&s.id).await.expect("delete");
        let again = c.create(&jail()).await.expect("fits again after a delete");
        c.delete(&again.id).await.expect("delete");
        d.client().delete(&other.id).await.expect("delete");
    });
}

#[test]
fn auth_401_and_foreign_sandboxes_404() {
    if !root_or_skip("auth_401_and_foreign_sandboxes_404") {
        return;
    }
    let d = Daemon::start();
    let other_token = d.tenant("other", &[]);
    block_on(async {
        let none = d.client_with(None);
        assert_eq!(
            api_status(&none.list().await.unwrap_err()),
            (401, "unauthorized".into())
        );
        assert_eq!(api_status(&none.create(&jail()).await.unwrap_err()).0, 401);
        let wrong = d.client_with(Some("mvm_not-a-token"));
        assert_eq!(api_status(&wrong.templates().await.unwrap_err()).0, 401);
        let owner = d.client();
        let s = owner.create(&jail()).await.expect("create");
        let other = d.client_with(Some(&other_token));
        assert_eq!(api_status(&other.get(&s.id).await.unwrap_err()).0, 404);
        assert_eq!(
            api_status(&other.exec(&s.id, &cmd(&["true"])).await.unwrap_err()).0,
            404
        );
        assert_eq!(
            api_status(&other.get_file(&s.id, "/etc/passwd").await.unwrap_err()).0,
            404
        );
        assert_eq!(api_status(&other.delete(&s.id).await.unwrap_err()).0, 404);
        // The websocket exec too, with or without a websocket handshake.
        let e = other
            .exec_interactive(&s.id, &cmd(&["true"]), &b""[..], |_, _| {})
            .await
            .unwrap_err();
        assert_eq!(api_status(&e), (404, "not_found".into()));
        let ws = format!("/v1/sandboxes/{}/exec/ws", s.id);
        let e = other.raw("GET", &ws, "application/json", Vec::new()).await;
        assert_eq!(api_status(&e.unwrap_err()), (404, "not_found".into()));
        assert!(other.list().await.expect("list").is_empty());
        // Unauthenticated: health and the API document.
        assert_eq!(none.health().await.expect("healthz").status, "ok");
        owner.delete(&s.id).await.expect("delete");
    });
}

#[test]
fn malformed_input_is_400_or_422_never_500() {
    if !root_or_skip("malformed_input_is_400_or_422_never_500") {
        return;
    }
    let d = Daemon::start();
    block_on(async {
        let c = d.client();
        let s = c.create(&jail()).await.expect("create");
        let exec = format!("/v1/sandboxes/{}/exec", s.id);
        let cases: Vec<(&str, String, &str, &str, u16)> = vec![
            (
                "POST",
                "/v1/sandboxes".into(),
                "application/json",
                "{not json",
                400,
            ),
            ("POST", "/v1/sandboxes".into(), "application/json", "", 400),
            ("POST", "/v1/sandboxes".into(), "text/plain", "{}", 400),
            (
                "POST",
                "/v1/sandboxes".into(),
                "application/json",
                "[]",
                422,
            ),
            (
                "POST",
                "/v1/sandboxes".into(),
                "application/json",
                r#"{"vcpus": "two"}"#,
                422,
            ),
            (
                "POST",
                "/v1/sandboxes".into(),
                "application/json",
                r#"{"vcpus": -1}"#,
                422,
            ),
            (
                "POST",
                "/v1/sandboxes".into(),
                "application/json",
                r#"{"vcpus": 0, "isolation": "jail"}"#,
                422,
            ),
            (
                "POST",
                "/v1/sandboxes".into(),
                "application/json",
                r#"{"memory_mib": 1, "isolation": "jail"}"#,
                422,
            ),
            (
                "POST",
                "/v1/sandboxes".into(),
                "application/json",
                r#"{"isolation": "container"}"#,
                422,
            ),
            (
                "POST",
                "/v1/sandboxes".into(),
                "application/json",
                r#"{"unknown": 1}"#,
                422,
            ),
            (
                "POST",
                "/v1/sandboxes".into(),
                "application/json",
                r#"{"isolation": "jail", "template": "../etc"}"#,
                422,
            ),
            (
                "POST",
                "/v1/sandboxes".into(),
                "application/json",
                r#"{"isolation": "jail", "template": "nope"}"#,
                404,
            ),
            (
                "POST",
                "/v1/sandboxes".into(),
                "application/json",
                r#"{"isolation": "jail", "env": {"A=B": "x"}}"#,
                422,
            ),
            (
                "POST",
                "/v1/sandboxes".into(),
                "application/json",
                r#"{"isolation": "jail", "network": {"egress": "allow"}}"#,
                422,
            ),
            (
                "POST",
                "/v1/sandboxes".into(),
                "application/json",
                r#"{"isolation": "jail", "network": {"egress": "allow", "allow": ["300.1.1.1"]}}"#,
                422,
            ),
            (
                "POST",
                "/v1/sandboxes".into(),
                "application/json",
                r#"{"isolation": "jail", "timeout_s": 99999999999}"#,
                422,
            ),
            (
                "POST",
                exec.clone(),
                "application/json",
                r#"{"cmd": []}"#,
                422,
            ),
            (
                "POST",
                exec.clone(),
                "application/json",
                r#"{"cmd": "ls"}"#,
                422,
            ),
            (
                "POST",
                exec.clone(),
                "application/json",
                r#"{"cmd": ["/no/such/program"]}"#,
                404,
            ),
            (
                "POST",
                exec.clone(),
                "application/json",
                r#"{"cmd": ["true"], "tty": true}"#,
                422,
            ),
            ("POST", exec.clone(), "application/json", "\u{0}\u{1}", 400),
            (
                "PUT",
                format!("/v1/sandboxes/{}/files", s.id),
                "application/octet-stream",
                "x",
                400,
            ),
            (
                "PUT",
                format!("/v1/sandboxes/{}/files?path=/tmp/x&mode=9z", s.id),
                "application/octet-stream",
                "x",
                400,
            ),
            (
                "GET",
                format!("/v1/sandboxes/{}/files?path=/no/such", s.id),
                "application/json",
                "",
                404,
            ),
            (
                "POST",
                format!("/v1/sandboxes/{}/keepalive", s.id),
                "application/json",
                r#"{"timeout_s": "soon"}"#,
                422,
            ),
            (
                "POST",
                format!("/v1/sandboxes/{}/resume", s.id),
                "application/json",
                "",
                409,
            ),
            (
                "POST",
                "/v1/templates".into(),
                "application/json",
                r#"{"name": "x", "kernel": "/nope", "rootfs": "/nope"}"#,
                422,
            ),
            (
                "POST",
                "/v1/templates".into(),
                "application/json",
                r#"{"name": "x"}"#,
                422,
            ),
            (
                "GET",
                "/v1/nothing-here".into(),
                "application/json",
                "",
                404,
            ),
            (
                "PATCH",
                "/v1/sandboxes".into(),
                "application/json",
                "{}",
                405,
            ),
            (
                "GET",
                "/v1/sandboxes/%ff%fe".into(),
                "application/json",
                "",
                400,
            ),
            (
                "GET",
                "/v1/sandboxes/no-such-sandbox".into(),
                "application/json",
                "",
                404,
            ),
            // The websocket exec without a websocket handshake: JSON like the rest, after
            // the sandbox lookup.
            (
                "GET",
                format!("/v1/sandboxes/{}/exec/ws", s.id),
                "application/json",
                "",
                426,
            ),
            (
                "GET",
                "/v1/sandboxes/no-such-sandbox/exec/ws".into(),
                "application/json",
                "",
                404,
            ),
        ];
        for (method, path, ctype, body, want) in cases {
            let e = c
                .raw(method, &path, ctype, body.as_bytes().to_vec())
                .await
                .expect_err(&format!("{method} {path} {body:?} must fail"));
            let ClientError::Api { status, body: err } = &e else {
                panic!("{method} {path}: {e}")
            };
            assert_eq!(*status, want, "{method} {path} {body:?}: {err:?}");
            assert!(
                !err.code.is_empty() && !err.message.is_empty() && err.code != "http_error",
                "{method} {path}: not a JSON error body: {err:?}"
            );
        }
        // The sandbox survived all of it.
        assert_eq!(
            c.exec(&s.id, &cmd(&["echo", "ok"]))
                .await
                .expect("exec")
                .stdout,
            "ok\n"
        );
        c.delete(&s.id).await.expect("delete");
    });
}

#[test]
fn vm_tier_refused_on_this_host() {
    if !root_or_skip("vm_tier_refused_on_this_host") {
        return;
    }
    if mvm_sandbox::manager::vm_tier_unavailable(false).is_none() {
        eprintln!("SKIPPED vm_tier_refused_on_this_host: this host has hardware KVM, so the vm tier is allowed");
        return;
    }
    let d = Daemon::start();
    block_on(async {
        let c = d.client();
        for req in [
            CreateSandbox::default(),
            CreateSandbox {
                isolation: Some(Isolation::Vm),
                ..CreateSandbox::default()
            },
        ] {
            let e = c.create(&req).await.unwrap_err();
            let ClientError::Api { status, body } = &e else {
                panic!("{e}")
            };
            assert_eq!(
                (*status, body.code.as_str()),
                (422, "isolation_unavailable")
            );
            assert!(
                body.message.contains("--isolation jail"),
                "{}",
                body.message
            );
        }
        assert!(
            c.health()
                .await
                .expect("health")
                .vm_tier
                .contains("kvm_pvm")
                || !std::path::Path::new("/dev/kvm").exists()
        );
        assert!(c.list().await.expect("list").is_empty());
    });
}

/// Checks the kernel's freezer state of sandbox `id`: v1 `freezer.state`, v2 `cgroup.events`.
fn assert_frozen(d: &Daemon, id: &str, frozen: bool) {
    let read = |dir: &Path, file: &str| {
        std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("{}/{file}: {e}", dir.display()))
    };
    match cgroup_mode() {
        CgroupMode::V1 => {
            let freezer = cgroup_mode()
                .sandbox_dirs(&d.cgroup_parent, id)
                .into_iter()
                .find(|dir| dir.join("freezer.state").exists())
                .expect("a freezer cgroup");
            let want = if frozen { "FROZEN" } else { "THAWED" };
            assert_eq!(read(&freezer, "freezer.state").trim(), want);
        }
        CgroupMode::V2 { root } => {
            let dir = root.join(&d.cgroup_parent).join(id);
            let events = read(&dir, "cgroup.events");
            let want = format!("frozen {}", u8::from(frozen));
            assert!(events.lines().any(|l| l == want), "{events}");
        }
    }
}

#[test]
fn pause_and_resume_freeze_the_sandbox() {
    if !root_or_skip("pause_and_resume_freeze_the_sandbox") {
        return;
    }
    let d = Daemon::start();
    block_on(async {
        let c = d.client();
        let s = c.create(&jail()).await.expect("create");
        let p = c.set_paused(&s.id, true).await.expect("pause");
        assert_eq!(p.state, SandboxState::Paused);
        assert_frozen(&d, &s.id, true);
        assert_eq!(
            api_status(&c.exec(&s.id, &cmd(&["true"])).await.unwrap_err()),
            (409, "conflict".into())
        );
        assert_eq!(
            api_status(&c.set_paused(&s.id, true).await.unwrap_err()).0,
            409
        );
        c.set_paused(&s.id, false).await.expect("resume");
        assert_frozen(&d, &s.id, false);
        assert_eq!(
            c.exec(&s.id, &cmd(&["echo", "awake"]))
                .await
                .expect("exec")
                .stdout,
            "awake\n"
        );
        // A paused sandbox can be destroyed.
        c.set_paused(&s.id, true).await.expect("pause");
        c.delete(&s.id).await.expect("delete paused");
    });
}

#[test]
fn timeout_expiry_and_keepalive() {
    if !root_or_skip("timeout_expiry_and_keepalive") {
        return;
    }
    let d = Daemon::start();
    let before = d.host_state();
    block_on(async {
        let c = d.client();
        let mut short = jail();
        short.timeout_s = Some(1);
        let dies = c.create(&short).await.expect("create");
        let mut kept = jail();
        kept.timeout_s = Some(2);
        let lives = c.create(&kept).await.expect("create");
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(4) {
            c.keepalive(&lives.id, Some(3)).await.expect("keepalive");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        assert_eq!(
            api_status(&c.get(&dies.id).await.unwrap_err()).0,
            404,
            "expired sandbox still there"
        );
        // The new timeout is the sandbox's own from then on.
        assert_eq!(c.get(&lives.id).await.expect("get").timeout_s, 3);
        assert_eq!(
            c.exec(&lives.id, &cmd(&["echo", "alive"]))
                .await
                .expect("kept alive")
                .stdout,
            "alive\n"
        );
        // Without keepalive it expires too.
        let deadline = Instant::now() + Duration::from_secs(8);
        while c.get(&lives.id).await.is_ok() {
            assert!(Instant::now() < deadline, "sandbox outlived its timeout");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    d.assert_no_leaks(&before);
    let metrics = block_on(async {
        d.client()
            .raw("GET", "/metrics", "text/plain", Vec::new())
            .await
            .expect("metrics")
    });
    let metrics = String::from_utf8_lossy(&metrics);
    assert!(
        metrics.contains("mvm_sandboxes_destroyed_total 2"),
        "{metrics}"
    );
}

/// A lifecycle whose timeout pauses: the sandbox is frozen (not destroyed) when its timeout
/// passes, its timeout stopped; without `auto_resume` an exec is a 409 until it is resumed,
/// which starts its timeout again; with it, an exec resumes it. Lifecycles a sandbox cannot
/// follow are refused: a save in the jail tier (naming the vm tier), a resume on demand of one
/// destroyed at its timeout.
#[test]
fn a_timeout_that_pauses_and_the_resume_on_demand() {
    if !root_or_skip("a_timeout_that_pauses_and_the_resume_on_demand") {
        return;
    }
    let d = Daemon::start();
    let before = d.host_state();
    block_on(async {
        let c = d.client();
        let with = common::jail_timing_out;
        for (refused, names) in [
            (with(OnTimeout::Save, false), "vm tier"),
            (with(OnTimeout::Destroy, true), "on_timeout"),
        ] {
            let e = c.create(&refused).await.unwrap_err();
            let ClientError::Api { status, body } = &e else {
                panic!("expected an API error, got {e}");
            };
            assert_eq!(*status, 422, "{e}");
            assert!(body.message.contains(names), "{}", body.message);
        }
        let manual = c
            .create(&with(OnTimeout::Pause, false))
            .await
            .expect("create");
        assert_eq!(manual.lifecycle.on_timeout, OnTimeout::Pause);
        c.exec(&manual.id, &cmd(&["sh", "-c", "echo kept > /tmp/kept"]))
            .await
            .expect("exec");
        let paused = common::paused_at_timeout(&c, &manual.id).await;
        assert_eq!(paused.expires_at, None, "a paused sandbox's timeout stops");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            c.get(&manual.id).await.expect("kept").state,
            SandboxState::Paused
        );
        let refused = c.exec(&manual.id, &cmd(&["true"])).await.unwrap_err();
        assert_eq!(api_status(&refused).0, 409, "{refused}");
        let resumed = c.set_paused(&manual.id, false).await.expect("resume");
        assert!(
            resumed.expires_at.is_some(),
            "its timeout starts again: {resumed:?}"
        );
        assert_eq!(
            c.exec(&manual.id, &cmd(&["cat", "/tmp/kept"]))
                .await
                .expect("exec after the resume")
                .stdout,
            "kept\n"
        );

        let on_demand = c
            .create(&with(OnTimeout::Pause, true))
            .await
            .expect("create");
        common::paused_at_timeout(&c, &on_demand.id).await;
        // Two at once: one resumes it, the other waits for that and runs.
        let awake = cmd(&["echo", "awake"]);
        let (a, b) = tokio::join!(c.exec(&on_demand.id, &awake), c.exec(&on_demand.id, &awake));
        for ran in [a, b] {
            assert_eq!(ran.expect("an exec resumes it").stdout, "awake\n");
        }
        let s = c.get(&on_demand.id).await.expect("get");
        assert!(
            s.state == SandboxState::Running && s.expires_at.is_some()
                || s.state == SandboxState::Paused,
            "resumed with its timeout running again: {s:?}"
        );
        // And paused again when that timeout passes.
        common::paused_at_timeout(&c, &on_demand.id).await;
        for id in [&manual.id, &on_demand.id] {
            c.delete(id).await.expect("delete");
        }
    });
    d.assert_no_leaks(&before);
    let audit = mvm_sandbox::db::Db::open(&d.state_dir().join("mvm.db"))
        .expect("db")
        .audit_tail(1000)
        .expect("audit");
    assert!(audit.iter().any(|a| a.action == "expire"), "{audit:?}");
}

#[test]
fn egress_none_vs_allowed() {
    if !root_or_skip("egress_none_vs_allowed") {
        return;
    }
    if std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("nft is missing: apt-get install nftables (CI installs it)");
    }
    let d = Daemon::start();
    let before = d.host_state();
    block_on(async {
        let c = d.client();
        let net = |egress, allow: &[&str]| {
            let mut r = jail();
            r.network = Some(NetworkSpec {
                egress,
                allow: allow.iter().map(|s| s.to_string()).collect(),
            });
            r
        };
        // Allowed: the whole sandbox /16 (its gateway is the host end of its veth).
        let subnet = format!("{}0.0/16", d.subnet_prefix);
        let allowed = c
            .create(&net(Egress::Allow, &[&subnet]))
            .await
            .expect("create allowed");
        let denied = c
            .create(&net(Egress::Allow, &["192.0.2.1/32"]))
            .await
            .expect("create denied");
        let none = c
            .create(&net(Egress::None, &[]))
            .await
            .expect("create none");
        assert!(none.network.address.is_none() && none.network.gateway.is_none());
        for s in [&allowed, &denied] {
            // A listener on the host end of this sandbox's own veth: traffic never leaves the machine.
            let gw = s.network.gateway.clone().expect("gateway");
            assert!(gw.starts_with(&d.subnet_prefix), "{gw}");
            let listener = tokio::net::TcpListener::bind((gw.as_str(), 0))
                .await
                .expect("listen on the veth");
            let port = listener.local_addr().unwrap().port();
            let server = tokio::spawn(async move {
                if let Ok(Ok((mut sock, _))) =
                    tokio::time::timeout(Duration::from_secs(5), listener.accept()).await
                {
                    use tokio::io::AsyncWriteExt;
                    let _ = sock.write_all(b"reached-host\n").await;
                }
            });
            let mut req = cmd(&[
                "sh",
                "-c",
                &format!("nc -w 2 {gw} {port} </dev/null; echo rc=$?"),
            ]);
            req.timeout_s = Some(10);
            let out = c.exec(&s.id, &req).await.expect("exec nc");
            if s.id == allowed.id {
                assert!(
                    out.stdout.contains("reached-host"),
                    "allowed sandbox could not connect: {out:?}"
                );
            } else {
                assert!(
                    !out.stdout.contains("reached-host"),
                    "egress policy let traffic through: {out:?}"
                );
                assert!(!out.stdout.contains("rc=0"), "{out:?}");
            }
            server.abort();
        }
        let out = c
            .exec(&none.id, &cmd(&["sh", "-c", &format!("nc -w 1 {}1 80 </dev/null; echo rc=$?; ls /sys/class/net 2>/dev/null; cat /proc/net/dev", d.subnet_prefix)]))
            .await
            .expect("exec");
        assert!(!out.stdout.contains("rc=0"), "{out:?}");
        assert!(
            !out.stdout.contains("eth0"),
            "a sandbox without egress has only lo: {out:?}"
        );
        for s in [allowed, denied, none] {
            c.delete(&s.id).await.expect("delete");
        }
    });
    d.assert_no_leaks(&before);
}

/// The id of a sandbox other than `known` with an entry under `run/sub`, once one appears.
fn wait_for_new_entry(d: &Daemon, sub: &str, known: &[&str]) -> String {
    let dir = d.run_dir().join(sub);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|n| is_sandbox_id(n) && !known.contains(&n.as_str()));
        if let Some(id) = found {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "no new entry under {} within 20 s\n{}",
            dir.display(),
            d.log()
        );
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The `adopted` and `cleaned` lists of the last "reconciled" line in `log`.
fn last_reconcile(log: &str) -> (String, String) {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("reconciled"))
        .unwrap_or_else(|| panic!("no reconcile report in the log:\n{log}"));
    // Without the terminal colours of the log format.
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| *c == 'm');
        } else {
            plain.push(c);
        }
    }
    let line = plain;
    let list = |key: &str| {
        let at = line
            .find(&format!("{key}=["))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"));
        let rest = &line[at..];
        rest[..=rest.find(']').expect("closing ]")].to_owned()
    };
    (list("adopted"), list("cleaned"))
}

#[test]
fn kill9_mid_create_then_restart_reconciles_without_leaks() {
    if !root_or_skip("kill9_mid_create_then_restart_reconciles_without_leaks") {
        return;
    }
    let mut d = Daemon::start();
    let before = d.host_state();
    let survivor = block_on(async { d.client().create(&jail()).await.expect("create survivor") });
    let survivor_state = d.host_state();
    // Kill mvmd once each create step has begun, in creation order: busy lock (the state row
    // follows), network namespace and veth, sandbox directory and overlay, jail (the jailer runs).
    for step in ["locks", "netns", "sandboxes", "jail/mvm-agent"] {
        let client = d.client();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let pending = rt.spawn(async move {
            let mut r = jail();
            r.network = Some(NetworkSpec {
                egress: Egress::All,
                allow: Vec::new(),
            });
            client.create(&r).await
        });
        let id = wait_for_new_entry(&d, step, &[survivor.id.as_str()]);
        d.kill9();
        d.track(&id);
        let outcome = rt.block_on(pending).expect("create task");
        drop(rt);
        let row = mvm_sandbox::db::Db::open(&d.state_dir().join("mvm.db"))
            .expect("state db")
            .sandbox(&id)
            .expect("read the row");
        // The create was caught half-way: it had no row yet, or one still Creating.
        let state = row.map(|r| r.sandbox.state);
        assert!(
            matches!(state, None | Some(SandboxState::Creating)),
            "step {step}: the create of {id} had finished ({state:?}, {outcome:?}) before the kill"
        );
        assert!(outcome.is_err(), "step {step}: {outcome:?}");
        d.spawn();
        let (adopted, cleaned) = last_reconcile(&d.log());
        assert!(
            cleaned.contains(&id) && !adopted.contains(&id),
            "step {step}: {id} not reported cleaned: {adopted} {cleaned}\n{}",
            d.log()
        );
        assert!(adopted.contains(&survivor.id), "{adopted}");
        let listed = block_on(async { d.client().list().await.expect("list") });
        let ids: Vec<&str> = listed.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(ids, [survivor.id.as_str()], "step {step}\n{}", d.log());
        d.assert_no_leaks(&survivor_state);
    }
    // The adopted survivor still works and goes away cleanly.
    block_on(async {
        let c = d.client();
        assert_eq!(
            c.exec(&survivor.id, &cmd(&["echo", "adopted"]))
                .await
                .expect("exec")
                .stdout,
            "adopted\n"
        );
        c.delete(&survivor.id).await.expect("delete");
    });
    d.assert_no_leaks(&before);
}

#[test]
fn two_hundred_cycles_four_in_parallel() {
    if !root_or_skip("two_hundred_cycles_four_in_parallel") {
        return;
    }
    let d = Daemon::start();
    let before = d.host_state();
    let failures = block_on(async {
        let c = d.client();
        let next = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let mut workers = Vec::new();
        for _ in 0..4 {
            let (c, next) = (c.clone(), next.clone());
            workers.push(tokio::spawn(async move {
                let mut failures = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= 200 {
                        break;
                    }
                    let result = async {
                        let s = c.create(&jail()).await?;
                        let out = c
                            .exec(&s.id, &cmd(&["echo", &format!("cycle-{i}")]))
                            .await?;
                        c.delete(&s.id).await?;
                        Ok::<_, ClientError>(out.stdout)
                    }
                    .await;
                    match result {
                        Ok(out) if out == format!("cycle-{i}\n") => {}
                        other => failures.push(format!("cycle {i}: {other:?}")),
                    }
                }
                failures
            }));
        }
        let mut all = Vec::new();
        for w in workers {
            all.extend(w.await.expect("worker"));
        }
        all
    });
    assert!(
        failures.is_empty(),
        "{} failures: {failures:#?}",
        failures.len()
    );
    d.assert_no_leaks(&before);
}

#[test]
fn openapi_document_validates_and_lists_every_route() {
    if !root_or_skip("openapi_document_validates_and_lists_every_route") {
        return;
    }
    let d = Daemon::start();
    let doc = block_on(async {
        d.client_with(None)
            .raw("GET", "/openapi.json", "application/json", Vec::new())
            .await
            .expect("openapi.json")
    });
    let spec =
        oas3::from_json(String::from_utf8_lossy(&doc)).expect("a valid OpenAPI 3.1 document");
    spec.validate_version()
        .expect("a supported OpenAPI version");
    let routes = [
        ("POST", "/v1/sandboxes"),
        ("GET", "/v1/sandboxes"),
        ("GET", "/v1/sandboxes/{id}"),
        ("DELETE", "/v1/sandboxes/{id}"),
        ("POST", "/v1/sandboxes/{id}/exec"),
        ("GET", "/v1/sandboxes/{id}/exec/ws"),
        ("PUT", "/v1/sandboxes/{id}/files"),
        ("GET", "/v1/sandboxes/{id}/files"),
        ("POST", "/v1/sandboxes/{id}/pause"),
        ("POST", "/v1/sandboxes/{id}/resume"),
        ("POST", "/v1/sandboxes/{id}/keepalive"),
        ("POST", "/v1/sandboxes/{id}/fork"),
        ("POST", "/v1/sandboxes/{id}/snapshots"),
        ("GET", "/v1/snapshots"),
        ("GET", "/v1/snapshots/{id}"),
        ("DELETE", "/v1/snapshots/{id}"),
        ("PATCH", "/v1/sandboxes/{id}/network"),
        ("GET", "/v1/sandboxes/{id}/logs"),
        ("GET", "/v1/sandboxes/{id}/stats"),
        ("GET", "/v1/sandboxes/{id}/ports/{port}/{path}"),
        ("POST", "/v1/sandboxes/{id}/ports/{port}/{path}"),
        ("PUT", "/v1/sandboxes/{id}/ports/{port}/{path}"),
        ("PATCH", "/v1/sandboxes/{id}/ports/{port}/{path}"),
        ("DELETE", "/v1/sandboxes/{id}/ports/{port}/{path}"),
        ("GET", "/v1/templates"),
        ("POST", "/v1/templates"),
        ("POST", "/v1/templates/{name}/warm"),
        ("GET", "/v1/images"),
        ("POST", "/v1/images"),
        ("POST", "/v1/images/load"),
        ("POST", "/v1/images/prune"),
        ("DELETE", "/v1/images/{name}"),
        ("GET", "/metrics"),
        ("GET", "/healthz"),
        ("GET", "/openapi.json"),
    ];
    let documented: Vec<(String, String)> = spec
        .operations()
        .map(|(path, method, op)| {
            assert!(
                op.responses.as_ref().is_some_and(|r| !r.is_empty()),
                "{method} {path} has no responses"
            );
            (method.to_string(), path)
        })
        .collect();
    for (method, path) in &documented {
        assert!(
            routes.contains(&(method.as_str(), path.as_str())),
            "documented route {method} {path} is not in the test's list"
        );
    }
    for (method, path) in routes {
        assert!(
            documented.iter().any(|(m, p)| m == method && p == path),
            "{method} {path} missing from the document"
        );
    }
    assert_eq!(documented.len(), routes.len());
    // Every reference resolves.
    let components = spec.components.as_ref().expect("components");
    let raw: serde_json::Value = serde_json::from_slice(&doc).expect("json");
    let mut refs = Vec::new();
    collect_refs(&raw, &mut refs);
    assert!(!refs.is_empty());
    for r in refs {
        let name = r
            .strip_prefix("#/components/schemas/")
            .unwrap_or_else(|| panic!("unexpected $ref {r}"));
        assert!(
            components.schemas.contains_key(name),
            "$ref {r} does not resolve"
        );
    }
    // Every documented route is served (a route the router lacks would answer the JSON 404
    // with code not_found and "no such route").
    block_on(async {
        let c = d.client();
        for (method, path) in routes {
            let path = path.replace("{id}", "000000000000");
            if let Err(ClientError::Api { body, .. }) =
                c.raw(method, &path, "application/json", Vec::new()).await
            {
                assert!(
                    !body.message.contains("no such route"),
                    "{method} {path} is documented but not served"
                );
            }
        }
    });
    let schemas = &components.schemas;
    for s in [
        "CreateSandbox",
        "Sandbox",
        "ExecRequest",
        "ExecResult",
        "ErrorBody",
        "Template",
    ] {
        assert!(schemas.contains_key(s), "schema {s} missing");
    }
}

fn collect_refs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("$ref", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_refs(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[test]
fn metrics_and_health() {
    if !root_or_skip("metrics_and_health") {
        return;
    }
    let d = Daemon::start();
    let other_token = d.tenant("other", &[]);
    block_on(async {
        let c = d.client();
        let s = c.create(&jail()).await.expect("create");
        let m = c
            .raw("GET", "/metrics", "text/plain", Vec::new())
            .await
            .expect("metrics");
        let m = String::from_utf8_lossy(&m);
        assert!(m.contains("mvm_sandboxes{state=\"running\"} 1"), "{m}");
        assert!(m.contains("mvm_sandbox_create_seconds_count 1"), "{m}");
        assert!(
            m.contains(&format!("mvm_sandbox_memory_bytes{{id=\"{}\"", s.id)),
            "{m}"
        );
        assert!(
            m.contains(&format!("mvm_sandbox_cpu_seconds_total{{id=\"{}\"", s.id)),
            "{m}"
        );
        assert_eq!(c.health().await.expect("health").status, "ok");
        // Without a token nothing; another tenant sees its own sandboxes only, and none of the
        // daemon-wide counters.
        let none = d.client_with(None);
        let e = none.raw("GET", "/metrics", "text/plain", Vec::new()).await;
        assert_eq!(api_status(&e.unwrap_err()).0, 401);
        let other = d.client_with(Some(&other_token));
        let own = other
            .create(&jail())
            .await
            .expect("create as the other tenant");
        let m = other
            .raw("GET", "/metrics", "text/plain", Vec::new())
            .await
            .expect("a tenant's metrics");
        let m = String::from_utf8_lossy(&m);
        assert!(m.contains(&own.id) && !m.contains(&s.id), "{m}");
        assert!(m.contains("mvm_sandboxes{state=\"running\"} 1"), "{m}");
        assert!(!m.contains("mvm_sandboxes_created_total"), "{m}");
        other.delete(&own.id).await.expect("delete");
        let t = c.templates().await.expect("templates");
        assert!(t.iter().any(|t| t.name == "default"), "{t:?}");
        c.delete(&s.id).await.expect("delete");
    });
}

#[test]
fn optional_tcp_listener_with_the_same_auth() {
    if !root_or_skip("optional_tcp_listener_with_the_same_auth") {
        return;
    }
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
        l.local_addr().unwrap().port()
    };
    let addr = format!("127.0.0.1:{port}");
    let d = Daemon::start_with(&["--tcp", &addr]);
    block_on(async {
        let tcp = mvm_client::Client::new(
            mvm_sandbox::http::Endpoint::Tcp(addr.clone()),
            Some(d.token()),
        );
        let s = tcp.create(&jail()).await.expect("create over TCP");
        assert_eq!(
            tcp.exec(&s.id, &cmd(&["echo", "tcp"]))
                .await
                .expect("exec")
                .stdout,
            "tcp\n"
        );
        let anonymous = mvm_client::Client::new(mvm_sandbox::http::Endpoint::Tcp(addr), None);
        assert_eq!(api_status(&anonymous.get(&s.id).await.unwrap_err()).0, 401);
        tcp.delete(&s.id).await.expect("delete");
    });
}

#[test]
fn stats_report_rss_apart_from_the_page_cache() {
    if !root_or_skip("stats_report_rss_apart_from_the_page_cache") {
        return;
    }
    let d = Daemon::start();
    block_on(async {
        let c = d.client();
        let s = c.create(&jail()).await.expect("create");
        const MB: u64 = 1 << 20;
        // 40 MiB written to a file: page cache, charged to the sandbox but not resident in
        // its processes.
        let out = c
            .exec(
                &s.id,
                &cmd(&[
                    "sh",
                    "-c",
                    "head -c 41943040 /dev/zero > /root/cached; sync",
                ]),
            )
            .await
            .expect("write a file");
        assert_eq!(out.exit.exit_code, Some(0), "{}", out.stderr);
        let u = c.stats(&s.id).await.expect("stats");
        assert!(
            u.stats.memory_bytes >= u.rss_bytes + 30 * MB,
            "the page cache must count in memory_bytes only: {u:?}"
        );
        // 48 MiB held by a shell: resident.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let holder = {
            let (c, id) = (c.clone(), s.id.clone());
            tokio::spawn(async move {
                // Not `sleep` last: the shell would exec it and drop its memory.
                let hold = "x=$(head -c 50331648 /dev/zero | tr '\\0' a); echo held; sleep 600; :";
                c.exec_streamed(&id, &cmd(&["sh", "-c", hold]), move |_, data| {
                    let _ = tx.send(data.to_vec());
                })
                .await
            })
        };
        let said = tokio::time::timeout(Duration::from_secs(60), rx.recv())
            .await
            .expect("the shell holds its memory within a minute");
        assert_eq!(said.as_deref(), Some(&b"held\n"[..]));
        let held = c.stats(&s.id).await.expect("stats");
        assert!(
            held.rss_bytes >= u.rss_bytes + 45 * MB,
            "{u:?} then {held:?}"
        );
        assert!(held.stats.memory_bytes >= held.rss_bytes, "{held:?}");
        c.delete(&s.id).await.expect("delete");
        holder.abort();
    });
}
