//! Snapshots through mvmd on a host without the vm tier (this one): warming a template,
//! forking a sandbox and taking a sandbox's snapshot are refused with the answers a client can
//! act on, and leave nothing. The nested suite warms, restores, forks and snapshots for real
//! (`snapshot-warm-template-8-unique`, `snapshot-fork-live-3-children`,
//! `snapshot-save-resume`, `e2b-sdk-vm-tier`).

mod common;

use common::{block_on, Daemon};
use mvm_client::ClientError;
use mvm_sandbox::model::{
    CreateSandbox, CreateSnapshot, Isolation, SandboxState, Snapshot, Template, WarmRequest,
};
use mvm_testkit::root_or_skip;

/// Status, code and message of a refused call.
fn refusal<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (u16, String, String) {
    match r {
        Err(ClientError::Api { status, body }) => (status, body.code, body.message),
        other => panic!("the call must be refused, got {other:?}"),
    }
}

/// Whether this host runs the vm tier (then the nested suite's cases are the tests).
fn vm_tier_here(test: &str) -> bool {
    let here = mvm_sandbox::manager::vm_tier_unavailable(false).is_none();
    if here {
        eprintln!("{test}: this host runs the vm tier; the nested suite covers it");
    }
    here
}

/// Warming a template is an admin's call, names an existing template, and needs the vm tier:
/// on a host that cannot run it (this one, kvm_pvm, or none) the answer is a 422 naming the
/// tier, at the defaults' size (also asked without a body, as clients before sizes did) or
/// another, no sandbox is left and no snapshot appears; a bad size request is refused as
/// such; a snapshot field in a registration is refused (only mvm makes snapshots).
#[test]
fn warming_is_an_admins_call_and_needs_the_vm_tier() {
    let test = "warming_is_an_admins_call_and_needs_the_vm_tier";
    if !root_or_skip(test) {
        return;
    }
    if vm_tier_here(test) {
        return;
    }
    let d = Daemon::start();
    let other = d.client_with(Some(&d.tenant("other", &[])));
    let admin = d.client();
    block_on(async {
        let status_code = refusal::<Template>;
        let defaults = WarmRequest::default();
        let (status, code, _) = status_code(other.warm_template("default", &defaults).await);
        assert_eq!((status, code.as_str()), (403, "forbidden"));
        let (status, code, _) = status_code(admin.warm_template("nonesuch", &defaults).await);
        assert_eq!((status, code.as_str()), (404, "not_found"));
        let sized = WarmRequest {
            vcpus: Some(2),
            memory_mib: Some(512),
        };
        for req in [&defaults, &sized] {
            let (status, code, message) = status_code(admin.warm_template("default", req).await);
            assert_eq!(
                (status, code.as_str()),
                (422, "isolation_unavailable"),
                "{req:?}"
            );
            assert!(message.contains("vm tier"), "{message}");
        }
        let warm = "/v1/templates/default/warm";
        let bodiless = admin.raw("POST", warm, "", Vec::new()).await;
        assert!(
            matches!(&bodiless, Err(ClientError::Api { status: 422, body }) if body.code == "isolation_unavailable"),
            "a warm without a body: {bodiless:?}"
        );
        let unknown = br#"{"vcpus":2,"memory":512}"#.to_vec();
        let e = admin
            .raw("POST", warm, "application/json", unknown)
            .await
            .expect_err("an unknown field");
        assert!(
            matches!(&e, ClientError::Api { status: 422, body } if body.message.contains("memory")),
            "{e}"
        );
        let e = admin
            .raw("POST", warm, "", b"vcpus=2".to_vec())
            .await
            .expect_err("a body that is not JSON");
        assert!(matches!(&e, ClientError::Api { status: 400, .. }), "{e}");
        assert!(admin.list().await.expect("list").is_empty());
        let templates = admin.templates().await.expect("templates");
        assert!(
            templates
                .iter()
                .all(|t| t.snapshot.is_none() && t.other_snapshots.is_empty()),
            "{templates:?}"
        );
        let registrations = [
            r#"{"name":"x","kernel":"/k","rootfs":"/r","snapshot":{"vcpus":1,"memory_mib":256,"created_at":0}}"#,
            r#"{"name":"x","kernel":"/k","rootfs":"/r","other_snapshots":[{"vcpus":2,"memory_mib":512,"created_at":0}]}"#,
        ];
        for with_snapshot in registrations {
            let e = admin
                .raw(
                    "POST",
                    "/v1/templates",
                    "application/json",
                    with_snapshot.into(),
                )
                .await
                .expect_err("a snapshot in a registration");
            assert!(
                matches!(&e, ClientError::Api { status: 422, body } if body.message.contains("made by mvm")),
                "{with_snapshot}: {e}"
            );
        }
    });
}

/// A fork names a running vm-tier sandbox of the caller's: a jail-tier one is a 422 naming
/// the vm tier, another tenant's or a missing one a 404, a count outside 1-16 a 422; the
/// source runs on and no child appears.
#[test]
fn forks_are_refused_outside_the_vm_tier() {
    let test = "forks_are_refused_outside_the_vm_tier";
    if !root_or_skip(test) {
        return;
    }
    let d = Daemon::start();
    let other = d.client_with(Some(&d.tenant("other", &[])));
    let c = d.client();
    block_on(async {
        let s = c
            .create(&CreateSandbox {
                isolation: Some(Isolation::Jail),
                ..CreateSandbox::default()
            })
            .await
            .expect("create");
        let (status, code, message) = refusal(c.fork(&s.id, 2).await);
        assert_eq!((status, code.as_str()), (422, "invalid_argument"));
        assert!(message.contains("vm-tier"), "{message}");
        for count in [0, 17] {
            let (status, _, message) = refusal(c.fork(&s.id, count).await);
            assert_eq!(status, 422, "count {count}");
            assert!(message.contains("1 to 16"), "{message}");
        }
        let (status, code, _) = refusal(other.fork(&s.id, 1).await);
        assert_eq!((status, code.as_str()), (404, "not_found"));
        let (status, _, _) = refusal(c.fork("000000000000", 1).await);
        assert_eq!(status, 404);
        let list = c.list().await.expect("list");
        assert_eq!(list.len(), 1, "{list:?}");
        c.delete(&s.id).await.expect("delete");
    });
}

/// A snapshot is taken of a vm-tier sandbox of the caller's: a jail-tier one is a 422 naming
/// the vm tier (and runs on), another tenant's a 404, a bad name a 422 naming the rule; the
/// caller has no snapshot then; a create from, a get or a delete of one it does not have is a
/// 404, also for another tenant's sandbox's id.
#[test]
fn snapshots_are_refused_outside_the_vm_tier() {
    let test = "snapshots_are_refused_outside_the_vm_tier";
    if !root_or_skip(test) {
        return;
    }
    let d = Daemon::start();
    let other = d.client_with(Some(&d.tenant("other", &[])));
    let c = d.client();
    block_on(async {
        let s = c.create(&common::jail()).await.expect("create");
        let named = |name: &str| CreateSnapshot {
            name: Some(name.into()),
        };
        let (status, code, message) = refusal(c.snapshot(&s.id, &named("kept")).await);
        assert_eq!((status, code.as_str()), (422, "invalid_argument"));
        assert!(message.contains("vm-tier"), "{message}");
        for bad in ["../x", "snap-0011", ""] {
            let (status, _, message) = refusal(c.snapshot(&s.id, &named(bad)).await);
            assert_eq!(status, 422, "name {bad:?}: {message}");
        }
        let (status, code, _) = refusal(other.snapshot(&s.id, &CreateSnapshot::default()).await);
        assert_eq!((status, code.as_str()), (404, "not_found"));
        assert_eq!(c.snapshots().await.expect("list"), Vec::<Snapshot>::new());
        let (status, _, _) = refusal(c.delete_snapshot("kept").await);
        assert_eq!(status, 404);
        let (status, _, message) = refusal(
            c.create(&CreateSandbox {
                snapshot: Some("kept".into()),
                ..CreateSandbox::default()
            })
            .await,
        );
        assert_eq!(status, 404, "{message}");
        assert!(message.contains("no snapshot"), "{message}");
        assert_eq!(
            c.get(&s.id).await.expect("get").state,
            SandboxState::Running
        );
        c.delete(&s.id).await.expect("delete");
    });
}

/// What an earlier mvmd left of snapshots goes at the next start — one it was taking (its row
/// not ready, its files) and a create's links to one — while a ready snapshot stays: listed,
/// its tenant's alone (another tenant can neither delete it nor create from it by its id); a
/// create from it whose template's base image is not the one its VM ran on is a 409 saying so
/// and leaves nothing; its deletion removes its row and files.
#[test]
fn snapshot_leftovers_go_at_start_and_a_snapshot_goes_with_its_deletion() {
    let test = "snapshot_leftovers_go_at_start_and_a_snapshot_goes_with_its_deletion";
    if !root_or_skip(test) {
        return;
    }
    let mut d = Daemon::start();
    let before = d.host_state();
    let other = d.client_with(Some(&d.tenant("other", &[])));
    let c = d.client();
    d.kill9();
    let state = d.state_dir();
    let snapshot = |id: &str| Snapshot {
        id: id.into(),
        name: None,
        source: "0123456789ab".into(),
        template: "default".into(),
        vcpus: 1,
        memory_mib: 256,
        created_at: 1,
    };
    let db = mvm_sandbox::db::Db::open(&state.join("mvm.db")).expect("db");
    let (kept, half) = ("snap-00000000000000a1", "snap-00000000000000a2");
    for id in [kept, half] {
        db.insert_snapshot("default", &snapshot(id), &mvm_sandbox::db::Quota::default())
            .expect("row");
        let dir = state.join("sandbox-snapshots").join(id);
        std::fs::create_dir_all(&dir).expect("its directory");
        for file in ["vm.state", "vm.mem", "layer.ext4", "base.json"] {
            std::fs::write(dir.join(file), file).expect("its file");
        }
    }
    db.commit_snapshot("default", kept, Some("kept"))
        .expect("ready");
    let links = state.join("saves").join(format!("{kept}.00ff.use"));
    std::fs::create_dir_all(&links).expect("a create's links");
    d.spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while links.exists() || state.join("sandbox-snapshots").join(half).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "what the earlier mvmd left of snapshots is still there\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let ids: Vec<(String, bool)> = db.snapshot_ids().expect("ids");
    assert_eq!(ids, [(kept.to_owned(), true)]);
    block_on(async {
        let listed = c.snapshots().await.expect("list");
        assert_eq!(listed.len(), 1, "{listed:?}");
        assert_eq!(listed[0].name.as_deref(), Some("kept"));
        assert_eq!(
            other.snapshots().await.expect("list"),
            Vec::<Snapshot>::new()
        );
        let (status, _, _) = refusal(other.delete_snapshot(kept).await);
        assert_eq!(status, 404);
        let (status, _, message) = refusal(
            other
                .create(&CreateSandbox {
                    snapshot: Some(kept.into()),
                    ..CreateSandbox::default()
                })
                .await,
        );
        assert_eq!(status, 404, "another tenant's create from it: {message}");
        assert!(message.contains("no snapshot"), "{message}");
        let (status, code, message) = refusal(
            c.create(&CreateSandbox {
                snapshot: Some("kept".into()),
                ..CreateSandbox::default()
            })
            .await,
        );
        assert_eq!((status, code.as_str()), (409, "conflict"), "{message}");
        assert!(message.contains("cannot be restored"), "{message}");
        assert_eq!(c.list().await.expect("list"), Vec::new());
        let deleted = c.delete_snapshot("kept").await.expect("delete");
        assert_eq!(deleted.id, kept);
        assert_eq!(c.snapshots().await.expect("list"), Vec::<Snapshot>::new());
    });
    assert!(!state.join("sandbox-snapshots").join(kept).exists());
    let left: Vec<_> = std::fs::read_dir(state.join("saves"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left in saves: {left:?}");
    d.assert_no_leaks(&before);
}

/// A warm or fork pool's entry an earlier mvmd left (owned by the internal `@pool`) is
/// destroyed when mvmd starts, also by an mvmd that keeps no pool: nothing of it is left.
#[test]
fn pool_entries_an_earlier_mvmd_left_are_destroyed_at_start() {
    let test = "pool_entries_an_earlier_mvmd_left_are_destroyed_at_start";
    if !root_or_skip(test) {
        return;
    }
    let mut d = Daemon::start();
    let before = d.host_state();
    let made = block_on(async { d.client().create(&common::jail()).await.expect("create") });
    d.track(&made.id);
    // The sandbox becomes a running pool entry, as a pool's fill leaves one.
    removed_at_start(&mut d, &made.id, |db| {
        let pool = mvm_sandbox::manager::POOL_TENANT;
        let quota = mvm_sandbox::db::Quota {
            max_sandboxes: 64,
            max_vcpus: 64,
            max_memory_mib: 1 << 20,
        };
        let entry = mvm_sandbox::model::Sandbox {
            tenant: pool.to_owned(),
            ..made.clone()
        };
        let mut row = db
            .adopt_pooled(&made.id, &made.tenant, &entry, &quota)
            .expect("make the sandbox a pool entry");
        row.sandbox.state = SandboxState::Running;
        db.update_sandbox(&row).expect("running");
        assert_eq!(db.sandboxes(Some(pool)).expect("rows").len(), 1);
    });
    d.assert_no_leaks(&before);
}

/// A save (`pause` with `{"save": true}`) names a running or paused vm-tier sandbox of the
/// caller's: a jail-tier one is a 422 naming the vm tier and runs on, another tenant's a 404;
/// a pause without a body, or with `{"save": false}`, freezes as before, and a body with an
/// unknown field is refused; an exec in a paused sandbox is a 409 saying to resume it.
#[test]
fn saves_are_refused_outside_the_vm_tier() {
    let test = "saves_are_refused_outside_the_vm_tier";
    if !root_or_skip(test) {
        return;
    }
    let d = Daemon::start();
    let other = d.client_with(Some(&d.tenant("other", &[])));
    let c = d.client();
    block_on(async {
        let s = c.create(&common::jail()).await.expect("create");
        let (status, code, message) = refusal(c.save(&s.id).await);
        assert_eq!((status, code.as_str()), (422, "invalid_argument"));
        assert!(message.contains("vm-tier"), "{message}");
        let (status, code, _) = refusal(other.save(&s.id).await);
        assert_eq!((status, code.as_str()), (404, "not_found"));
        let ran = c
            .exec(&s.id, &common::sh("echo still"))
            .await
            .expect("exec");
        assert_eq!(ran.stdout, "still\n");
        let pause = format!("/v1/sandboxes/{}/pause", s.id);
        let e = c
            .raw(
                "POST",
                &pause,
                "application/json",
                br#"{"saved":true}"#.to_vec(),
            )
            .await
            .expect_err("an unknown field");
        assert!(
            matches!(&e, ClientError::Api { status: 422, body } if body.message.contains("saved")),
            "{e}"
        );
        for body in ["", r#"{"save":false}"#] {
            c.raw("POST", &pause, "application/json", body.into())
                .await
                .unwrap_or_else(|e| panic!("pause with {body:?}: {e}"));
            let paused = c.get(&s.id).await.expect("get");
            assert_eq!(paused.state, SandboxState::Paused, "{body:?}");
            let (status, _, message) = refusal(c.exec(&s.id, &common::sh("true")).await);
            assert_eq!(status, 409);
            assert!(message.contains("resume it first"), "{message}");
            c.set_paused(&s.id, false).await.expect("resume");
        }
        c.delete(&s.id).await.expect("delete");
    });
}

/// A saved sandbox whose saved VM is gone (its files removed while mvmd was down) cannot be
/// resumed: mvmd's start removes it whole, as a dead sandbox, and leaves nothing of it.
#[test]
fn a_saved_sandbox_without_its_saved_vm_is_removed_at_start() {
    let test = "a_saved_sandbox_without_its_saved_vm_is_removed_at_start";
    if !root_or_skip(test) {
        return;
    }
    let mut d = Daemon::start();
    let before = d.host_state();
    let made = block_on(async { d.client().create(&common::jail()).await.expect("create") });
    d.track(&made.id);
    removed_at_start(&mut d, &made.id, |db| {
        let mut row = db.sandbox(&made.id).expect("row").expect("its row");
        row.sandbox.state = SandboxState::Saved;
        db.update_sandbox(&row).expect("saved");
    });
    d.assert_no_leaks(&before);
}

/// Kills mvmd, has `change` rewrite sandbox `id`'s row in its database (as an earlier mvmd
/// could have left it), starts mvmd again and waits (at most 30 s) until its start has
/// removed the sandbox's row.
/// A resume that a dead mvmd left halfway — the row saved, the sandbox's writable layer moved
/// back to the run directory, a jail started — is settled by the next mvmd's start: the jail's
/// processes are stopped and the layer goes back to the saved VM (where a restart of the host,
/// whose run directory may be a tmpfs, does not take it); the sandbox stays saved, and its
/// removal leaves nothing.
#[test]
fn a_resume_left_halfway_is_settled_at_start() {
    let test = "a_resume_left_halfway_is_settled_at_start";
    if !root_or_skip(test) {
        return;
    }
    let mut d = Daemon::start();
    let before = d.host_state();
    let c = d.client();
    let made = block_on(async { c.create(&common::jail()).await.expect("create") });
    d.track(&made.id);
    let id = made.id.as_str();
    d.kill9();
    let saved = d.state_dir().join("saves").join(format!("{id}.saved"));
    std::fs::create_dir_all(&saved).expect("saved VM directory");
    for file in ["vm.state", "vm.mem"] {
        std::fs::write(saved.join(file), file).expect("saved VM file");
    }
    let layer = d.run_dir().join("sandboxes").join(id).join("layer.ext4");
    std::fs::write(&layer, "the layer of its instant").expect("layer");
    let db = mvm_sandbox::db::Db::open(&d.state_dir().join("mvm.db")).expect("db");
    let mut row = db.sandbox(id).expect("row").expect("its row");
    row.sandbox.state = SandboxState::Saved;
    db.update_sandbox(&row).expect("saved");
    let agent = row.pid;
    d.spawn();
    let kept = saved.join("layer.ext4");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !kept.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the layer of {id} did not go back to its saved VM\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        !layer.exists(),
        "{} is still in the run directory",
        layer.display()
    );
    assert_eq!(
        std::fs::read_to_string(&kept).expect("kept layer"),
        "the layer of its instant"
    );
    // Gone, or a zombie of this test's (a subreaper's) until it is reaped.
    let stat = std::fs::read_to_string(format!("/proc/{agent}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty()
            || stat
                .rsplit(')')
                .next()
                .is_some_and(|s| s.trim_start().starts_with('Z')),
        "the half-resumed jail's process {agent} still runs: {stat}"
    );
    block_on(async {
        assert_eq!(c.get(id).await.expect("get").state, SandboxState::Saved);
        c.delete(id).await.expect("delete");
    });
    assert!(!saved.exists(), "{} outlived its sandbox", saved.display());
    d.assert_no_leaks(&before);
}

fn removed_at_start(d: &mut Daemon, id: &str, change: impl FnOnce(&mvm_sandbox::db::Db)) {
    d.kill9();
    let db = mvm_sandbox::db::Db::open(&d.state_dir().join("mvm.db")).expect("db");
    change(&db);
    d.spawn();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while db.sandbox(id).expect("row").is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "sandbox {id} is still there\n{}",
            d.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
