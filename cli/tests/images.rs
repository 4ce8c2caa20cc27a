//! `mvm pull`, `mvm images` and `mvm run IMAGE` against a real registry (Debian's
//! docker-registry on a loopback port, filled by the test), daemonless and through mvmd
//! (`mvm serve`), jail tier: the image's Entrypoint, Cmd, Env and WorkingDir are honoured.

use std::io::Write as _;
use std::process::Stdio;

mod common;

use common::{serve, Env};
use mvm_testkit::registry::{busybox_layer, config_blob, oci_archive, Auth, Registry};
use mvm_testkit::{root_or_skip, skip_or_fail_in_ci, text};

fn check(env: &Env, host: Option<&str>, registry: &Registry, digest: &str) {
    let reference = format!("{}/test/app:v1", registry.host);
    let out = env
        .mvm_at(host)
        .args(["pull", &reference])
        .output()
        .expect("mvm pull");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), digest);
    let out = env
        .mvm_at(host)
        .args(["images"])
        .output()
        .expect("mvm images");
    assert!(
        text(&out.stdout).contains(&reference),
        "{}",
        text(&out.stdout)
    );
    // The image's Entrypoint (`sh -c`) and Cmd.
    let run = |args: &[&str]| {
        env.mvm_at(host)
            .args(["run", "--rm", "--isolation", "jail"])
            .args(args)
            .output()
            .expect("mvm run")
    };
    let out = run(&[&reference]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "default command in /work\n");
    // A command replaces Cmd and goes after the Entrypoint; -e overrides the image's Env.
    let out = run(&[
        "-e",
        "GREETING=overridden",
        &reference,
        "--",
        "echo $GREETING $FROM_IMAGE; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "overridden yes\n");
    // By digest.
    let by_digest = format!("{}/test/app@{digest}", registry.host);
    let out = run(&[&by_digest, "--", "pwd"]);
    assert_eq!(text(&out.stdout), "/work\n", "{}", text(&out.stderr));
    // An image nobody pulled.
    let out = run(&["nothere:1", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("mvm pull"),
        "{}",
        text(&out.stderr)
    );
    // rmi: the image goes (docker's Untagged/Deleted lines), then it is unknown.
    let rmi = || {
        env.mvm_at(host)
            .args(["rmi", &reference])
            .output()
            .expect("mvm rmi")
    };
    let out = rmi();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!("Untagged: {reference}\nDeleted: {digest}\n")
    );
    let out = rmi();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("mvm pull"),
        "{}",
        text(&out.stderr)
    );
    // images prune: pulled again and used by nothing, it goes with its reference.
    let mvm = |args: &[&str]| env.mvm_at(host).args(args).output().expect("mvm");
    let out = mvm(&["pull", &reference]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = mvm(&["images", "prune"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.starts_with(&format!(
            "Untagged: {reference}\nDeleted: {digest}\nTotal reclaimed space: "
        )),
        "{said}"
    );
    let out = mvm(&["-o", "json", "images"]);
    assert_eq!(text(&out.stdout).trim(), "[]", "{}", text(&out.stderr));
}

#[test]
fn pull_and_run_images_daemonless_and_through_mvmd() {
    let test = "pull_and_run_images_daemonless_and_through_mvmd";
    if !root_or_skip(test) {
        return;
    }
    let registry = match Registry::start(Auth::Anonymous) {
        Ok(r) => r,
        Err(why) => return skip_or_fail_in_ci(test, &why),
    };
    let config = config_blob(
        serde_json::json!({
            "Env": ["PATH=/bin", "GREETING=hello", "FROM_IMAGE=yes"],
            "WorkingDir": "/work",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo default command in $(pwd)"],
        }),
        "amd64",
    );
    let app = registry.push_image("test/app", "v1", &[busybox_layer()], config);
    let env = Env::new();
    check(&env, None, &registry, &app.digest);
    env.assert_empty();
    let served = serve(&env);
    check(
        &env,
        Some(&format!("unix:{}", served.socket.display())),
        &registry,
        &app.digest,
    );
    drop(served);
    env.assert_empty();
}

#[test]
fn pull_with_credentials_from_stdin() {
    let test = "pull_with_credentials_from_stdin";
    if !root_or_skip(test) {
        return;
    }
    for auth in [Auth::Basic("mvm", "s3cret"), Auth::Token("mvm", "s3cret")] {
        let registry = match Registry::start(auth) {
            Ok(r) => r,
            Err(why) => return skip_or_fail_in_ci(test, &why),
        };
        let config = config_blob(serde_json::json!({"Env": ["PATH=/bin"]}), "amd64");
        let app = registry.push_image("private/app", "v1", &[busybox_layer()], config);
        let env = Env::new();
        let reference = format!("{}/private/app:v1", registry.host);
        let out = env.run(&["pull", &reference]);
        assert_eq!(out.status.code(), Some(125));
        assert!(
            text(&out.stderr).contains("needs credentials"),
            "{auth:?}: {}",
            text(&out.stderr)
        );
        for (password, code) in [("wrong-password", 125), ("s3cret", 0)] {
            let out = pull_with_password(&env, &reference, password);
            assert_eq!(
                out.status.code(),
                Some(code),
                "{auth:?}: {}",
                text(&out.stderr)
            );
            if code == 0 {
                assert_eq!(text(&out.stdout).trim(), app.digest);
            } else {
                let stderr = text(&out.stderr);
                assert!(
                    stderr.contains("refused the credentials") && stderr.contains(&registry.host),
                    "{auth:?}: {stderr}"
                );
                assert!(!stderr.contains(password), "{stderr}");
            }
        }
    }
}

/// `mvm pull -u mvm REFERENCE` with `password` on its stdin.
fn pull_with_password(env: &Env, reference: &str, password: &str) -> std::process::Output {
    let mut child = env
        .mvm()
        .args(["pull", "-u", "mvm", reference])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mvm pull -u");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{password}\n").as_bytes())
        .expect("password");
    child.wait_with_output().expect("mvm pull -u")
}

#[test]
fn load_an_oci_archive_daemonless_and_through_mvmd() {
    let test = "load_an_oci_archive_daemonless_and_through_mvmd";
    if !root_or_skip(test) {
        return;
    }
    let config = config_blob(
        serde_json::json!({"Env": ["PATH=/bin", "LOADED=yes"], "Cmd": ["sh", "-c", "echo loaded=$LOADED"]}),
        "amd64",
    );
    let archive = oci_archive("example.com/loaded/app:v2", &[busybox_layer()], &config);
    let env = Env::new();
    let file = env.dir.path().join("app.tar");
    std::fs::write(&file, &archive).expect("archive");
    let served = serve(&env);
    let daemon = format!("unix:{}", served.socket.display());
    for host in [None, Some(daemon.as_str())] {
        let out = env
            .mvm_at(host)
            .args(["load"])
            .arg(&file)
            .output()
            .expect("mvm load");
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains("example.com/loaded/app:v2"),
            "{}",
            text(&out.stdout)
        );
        let out = env
            .mvm_at(host)
            .args([
                "run",
                "--rm",
                "--isolation",
                "jail",
                "example.com/loaded/app:v2",
            ])
            .output()
            .expect("mvm run");
        assert_eq!(text(&out.stdout), "loaded=yes\n", "{}", text(&out.stderr));
    }
    // A damaged archive: a blob that is not what its name says.
    let mut damaged = archive.clone();
    let at = damaged
        .windows(5)
        .position(|w| w == b"root:")
        .expect("the passwd in the layer");
    damaged[at] = b'R';
    std::fs::write(&file, &damaged).expect("archive");
    let out = env
        .mvm_at(Some(&daemon))
        .args(["load"])
        .arg(&file)
        .output()
        .expect("mvm load");
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("digest mismatch"),
        "{}",
        text(&out.stderr)
    );
    drop(served);
    env.assert_empty();
}
