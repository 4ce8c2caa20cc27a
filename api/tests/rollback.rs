//! A create that fails at a middle step, as root with the jail tier: the error says what to
//! fix, and everything the earlier steps made (state row, lock, network namespace, veth,
//! masquerade table, sandbox directory, overlay mount, cgroups, processes) is gone again.

mod common;

use common::{block_on, Daemon};
use mvm_client::ClientError;
use mvm_sandbox::model::{CreateSandbox, Egress, Isolation, NetworkSpec, Template};
use mvm_testkit::root_or_skip;

/// Creates a jail-tier sandbox with `egress: all` (the steps before the failing one leave
/// the most behind: namespace, veth, masquerade table) from `template`, which must fail;
/// checks that the host is as before and returns the error's status, code and message.
fn failed_create(d: &Daemon, template: Option<&str>) -> (u16, String, String) {
    let before = d.host_state();
    let req = CreateSandbox {
        isolation: Some(Isolation::Jail),
        template: template.map(str::to_owned),
        network: Some(NetworkSpec {
            egress: Egress::All,
            allow: Vec::new(),
        }),
        ..CreateSandbox::default()
    };
    let (result, ids) = d.watching_ids(|| block_on(async { d.client().create(&req).await }));
    let err = match result {
        Err(ClientError::Api { status, body }) => (status, body.code, body.message),
        other => panic!("the create must fail with an API error, got {other:?}"),
    };
    assert_eq!(ids.len(), 1, "the create never began: {ids:?}\n{}", d.log());
    d.assert_no_leaks(&before);
    let listed = block_on(async { d.client().list().await.expect("list") });
    assert!(listed.is_empty(), "the state row stayed: {listed:?}");
    err
}

#[test]
fn unusable_template_image_fails_at_the_overlay_step() {
    if !root_or_skip("unusable_template_image_fails_at_the_overlay_step") {
        return;
    }
    let tpl = tempfile::Builder::new()
        .prefix("mvm-templates")
        .tempdir()
        .expect("tempdir");
    let dir = tpl.path().canonicalize().expect("canonical");
    // Not a file system at all; registration checks only that the files exist.
    std::fs::write(dir.join("junk.ext4"), vec![0u8; 1 << 20]).expect("junk image");
    std::fs::write(dir.join("vmlinux"), b"").expect("kernel");
    let d = Daemon::start_with(&["--template-dir", dir.to_str().expect("utf-8 path")]);
    block_on(async {
        d.client()
            .add_template(&Template {
                name: "junk".into(),
                kernel: dir.join("vmlinux").display().to_string(),
                rootfs: dir.join("junk.ext4").display().to_string(),
                snapshot: None,
                other_snapshots: Vec::new(),
            })
            .await
            .expect("register")
    });
    let (status, code, message) = failed_create(&d, Some("junk"));
    assert_eq!(
        (status, code.as_str()),
        (422, "invalid_argument"),
        "{message}"
    );
    assert!(
        message.contains("junk.ext4") && message.contains("root file system"),
        "{message}"
    );
    // Nothing half-unpacked stays in the cache of base trees either.
    let bases: Vec<_> = std::fs::read_dir(d.state_dir().join("bases"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(bases.is_empty(), "{bases:?}");
}

#[test]
fn bin_dir_without_the_jailer_fails_at_the_spawn_step() {
    if !root_or_skip("bin_dir_without_the_jailer_fails_at_the_spawn_step") {
        return;
    }
    let bins = tempfile::tempdir().expect("tempdir");
    let d = Daemon::start_with_env(&[], &[("MVM_BIN_DIR", bins.path())]);
    let (status, code, message) = failed_create(&d, None);
    assert_eq!((status, code.as_str()), (500, "host_error"), "{message}");
    assert!(
        message.contains(&bins.path().join("mvm-jailer").display().to_string())
            && message.contains("MVM_BIN_DIR"),
        "{message}"
    );
}
