//! Templates are shared by every tenant: only an admin tenant registers or replaces them, and
//! only with files in mvmd's template directory (or its build artifacts directory).

mod common;

use std::path::Path;

use common::{block_on, Daemon};
use mvm_client::{Client, ClientError};
use mvm_sandbox::model::{CreateSandbox, ExecRequest, Isolation, Template};
use mvm_testkit::{artifacts_dir, root_or_skip};

fn template(name: &str, kernel: &Path, rootfs: &Path) -> Template {
    Template {
        name: name.into(),
        kernel: kernel.display().to_string(),
        rootfs: rootfs.display().to_string(),
        snapshot: None,
        other_snapshots: Vec::new(),
    }
}

/// Status and code of a refused registration.
async fn refused(c: &Client, t: &Template) -> (u16, String) {
    match c.add_template(t).await {
        Err(ClientError::Api { status, body }) => {
            assert!(!body.message.is_empty(), "{body:?}");
            (status, body.code)
        }
        other => panic!("registering {t:?} must fail, got {other:?}"),
    }
}

#[test]
fn only_admins_register_templates_and_only_from_the_template_dirs() {
    let test = "only_admins_register_templates_and_only_from_the_template_dirs";
    if !root_or_skip(test) {
        return;
    }
    let tpl_dir = tempfile::Builder::new()
        .prefix("mvm-templates")
        .tempdir()
        .expect("tempdir");
    let tpl = tpl_dir.path().canonicalize().expect("canonical");
    let d = Daemon::start_with(&["--template-dir", tpl.to_str().expect("utf-8 path")]);
    std::fs::copy(artifacts_dir().join("rootfs.ext4"), tpl.join("rootfs.ext4"))
        .expect("copy image");
    let kernel = tpl.join("vmlinux");
    // A host file a tenant wants to read, and ways to name it from the template directory.
    let secret = d.dir.path().join("secret.ext4");
    std::fs::copy(artifacts_dir().join("rootfs.ext4"), &secret).expect("copy image");
    std::os::unix::fs::symlink(&secret, tpl.join("link.ext4")).expect("symlink");
    let other = d.client_with(Some(&d.tenant("other", &[])));
    let admin = d.client();
    block_on(async {
        let before = admin.templates().await.expect("templates");
        assert!(before.iter().any(|t| t.name == "default"), "{before:?}");
        // A tenant that is not an admin can neither replace `default` nor add a template,
        // whatever the files; its token is checked before the body.
        for t in [
            template("default", &kernel, &tpl.join("rootfs.ext4")),
            template("mine", &kernel, &secret),
        ] {
            assert_eq!(refused(&other, &t).await, (403, "forbidden".into()));
        }
        let e = other
            .raw(
                "POST",
                "/v1/templates",
                "application/json",
                b"{oops".to_vec(),
            )
            .await
            .expect_err("garbage from a non-admin");
        assert!(
            matches!(&e, ClientError::Api { status: 403, body } if body.code == "forbidden"),
            "{e}"
        );
        assert_eq!(admin.templates().await.expect("templates"), before);
        // The admin may not name files outside the directories either: directly, by `..`
        // or through a symlink.
        for rootfs in [
            secret.clone(),
            tpl.join("../../../../../../../..")
                .join(secret.strip_prefix("/").expect("absolute")),
            tpl.join("link.ext4"),
            "/etc/passwd".into(),
        ] {
            let t = template("mine", &kernel, &rootfs);
            assert_eq!(
                refused(&admin, &t).await,
                (422, "invalid_argument".into()),
                "{}",
                rootfs.display()
            );
        }
        let t = template(
            "mine",
            &d.dir.path().join("vmlinux"),
            &tpl.join("rootfs.ext4"),
        );
        assert_eq!(refused(&admin, &t).await.0, 422, "a kernel outside");
        // From the template directory it works (a jail-tier template: no kernel yet), and a
        // sandbox runs on it.
        let mine = admin
            .add_template(&template("mine", &kernel, &tpl.join("rootfs.ext4")))
            .await
            .expect("register");
        assert_eq!(mine.rootfs, tpl.join("rootfs.ext4").display().to_string());
        let s = other
            .create(&CreateSandbox {
                isolation: Some(Isolation::Jail),
                template: Some("mine".into()),
                ..CreateSandbox::default()
            })
            .await
            .expect("create from the new template");
        let r = other
            .exec(
                &s.id,
                &ExecRequest {
                    cmd: vec!["echo".into(), "on mine".into()],
                    ..ExecRequest::default()
                },
            )
            .await
            .expect("exec");
        assert_eq!(r.stdout, "on mine\n");
        other.delete(&s.id).await.expect("delete");
    });
    // `mvmd tenant create --admin` grants the right, `--admin=false` takes it back.
    let ops = d.client_with(Some(&d.tenant("ops", &["--admin"])));
    block_on(async {
        let t = template("ops", &kernel, &tpl.join("rootfs.ext4"));
        assert_eq!(
            ops.add_template(&t).await.expect("admin registers").name,
            "ops"
        );
    });
    let ops = d.client_with(Some(&d.tenant("ops", &["--admin=false"])));
    block_on(async {
        let t = template("ops", &kernel, &tpl.join("rootfs.ext4"));
        assert_eq!(refused(&ops, &t).await, (403, "forbidden".into()));
    });
}
