//! OCI images from a real registry (Debian's docker-registry on a loopback port, filled by the
//! test) as jail-tier sandboxes' file systems through mvmd: pulled by tag and by digest,
//! anonymously and with htpasswd basic auth; a sandbox honours the image's Env, WorkingDir and
//! whiteouts; refusals (not an admin, unknown image or tag, digest mismatch, unsupported
//! platform, a hostile layer, a full disk) leave nothing in the cache.

mod common;

use std::path::Path;

use common::{api_error, block_on, jail, sh, Daemon};
use mvm_client::Client;
use mvm_sandbox::image::METADATA_LIMIT;
use mvm_sandbox::model::{CreateSandbox, PullImage};
use mvm_testkit::registry::{
    busybox_layer, config_blob, gzip, layer, oci_archive, sha256_digest, Auth, Entry, Pushed,
    Registry,
};
use mvm_testkit::{root_or_skip, skip_or_fail_in_ci};

/// A registry for `test` (root's: its sandboxes are), or `None` when the test is skipped.
fn registry_or_skip(test: &str, auth: Auth<'_>) -> Option<Registry> {
    if !root_or_skip(test) {
        return None;
    }
    match Registry::start(auth) {
        Ok(r) => Some(r),
        Err(why) => {
            skip_or_fail_in_ci(test, &why);
            None
        }
    }
}

fn pull(reference: &str) -> PullImage {
    PullImage {
        reference: reference.into(),
        ..PullImage::default()
    }
}

fn app_config() -> Vec<u8> {
    config_blob(
        serde_json::json!({
            "Env": ["PATH=/bin", "GREETING=from-the-image", "OVERRIDDEN=image"],
            "WorkingDir": "/work",
            "User": "app",
            "Entrypoint": ["/bin/sh", "-c"],
            "Cmd": ["echo default command"],
        }),
        "amd64",
    )
}

/// Everything under the image cache but the lock: what a refused pull must not add to.
fn cache_entries(state: &Path) -> Vec<String> {
    let root = state.join("images");
    let mut out = Vec::new();
    for sub in ["images", "refs"] {
        for e in std::fs::read_dir(root.join(sub))
            .into_iter()
            .flatten()
            .flatten()
        {
            out.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
        }
    }
    for e in std::fs::read_dir(root.join("blobs/sha256"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "a partial blob was left: {name}");
    }
    out.sort();
    out
}

async fn run(c: &Client, req: CreateSandbox, script: &str) -> (String, i32) {
    let s = c.create(&req).await.expect("create from the image");
    let r = c.exec(&s.id, &sh(script)).await.expect("exec");
    c.delete(&s.id).await.expect("destroy");
    (r.stdout, r.exit.shell_code())
}

#[test]
fn images_pulled_from_a_registry_run_in_jail_sandboxes() {
    let test = "images_pulled_from_a_registry_run_in_jail_sandboxes";
    let Some(registry) = registry_or_skip(test, Auth::Anonymous) else {
        return;
    };
    let host = &registry.host;
    let base = busybox_layer();
    let top = layer(&[
        Entry::Dir("work/", 0o755),
        Entry::File("work/hello.txt", 0o644, b"hello from layer 2\n"),
        Entry::Hardlink("work/hello-link.txt", "work/hello.txt"),
        Entry::File("etc/.wh.group", 0o644, b""),
    ]);
    let app = registry.push_image("test/app", "v1", &[base.clone(), top], app_config());
    let d = Daemon::start();
    let before = d.host_state();
    let admin = d.client();
    let other = d.client_with(Some(&d.tenant("other", &[])));
    block_on(async {
        // Images are shared: only an admin adds them; everyone lists and uses them.
        let (status, code, _) = api_error(
            &other
                .pull_image(&pull(&format!("{host}/test/app:v1")))
                .await
                .expect_err("a tenant pull"),
        );
        assert_eq!((status, code.as_str()), (403, "forbidden"));
        let by_tag = admin
            .pull_image(&pull(&format!("{host}/test/app:v1")))
            .await
            .expect("pull by tag");
        assert_eq!(by_tag.digest, app.digest);
        assert_eq!(by_tag.references, vec![format!("{host}/test/app:v1")]);
        assert_eq!(by_tag.config.working_dir.as_deref(), Some("/work"));
        let by_digest = admin
            .pull_image(&pull(&format!("{host}/test/app@{}", app.digest)))
            .await
            .expect("pull by digest");
        assert_eq!(by_digest.digest, app.digest);
        let listed = other.images().await.expect("list");
        assert_eq!(listed.len(), 1, "{listed:?}");

        let mut req = CreateSandbox {
            image: Some(format!("{host}/test/app:v1")),
            ..jail()
        };
        req.env.insert("OVERRIDDEN".into(), "request".into());
        let s = other.create(&req).await.expect("create from the image");
        let image = s.image.clone().expect("the sandbox's image");
        assert_eq!(image.digest, app.digest);
        assert_eq!((image.uid, image.gid), (1000, 1000));
        assert_eq!(s.template, format!("{host}/test/app@{}", app.digest));
        let r = other
            .exec(
                &s.id,
                &sh("echo $GREETING $OVERRIDDEN; pwd; cat hello.txt; \
                     stat -c %h hello.txt; test -e /etc/group || echo no-group; \
                     echo written > /tmp/new; cat /tmp/new"),
            )
            .await
            .expect("exec");
        assert_eq!(
            r.stdout, "from-the-image request\n/work\nhello from layer 2\n2\nno-group\nwritten\n",
            "{r:?}"
        );
        other.delete(&s.id).await.expect("destroy");
        // A sandbox's writes stay in its own layer: the next one starts from the image.
        let by_digest_req = CreateSandbox {
            image: Some(app.digest.clone()),
            ..jail()
        };
        let (out, code) = run(&other, by_digest_req, "test -e /tmp/new || echo clean").await;
        assert_eq!((out.as_str(), code), ("clean\n", 0));

        // A second image sharing the first layer fetches only its own.
        let shared = registry.push_image(
            "test/shared",
            "latest",
            std::slice::from_ref(&base),
            config_blob(serde_json::json!({"Env": ["PATH=/bin"]}), "amd64"),
        );
        let pulled = admin
            .pull_image(&pull(&format!("{host}/test/shared")))
            .await
            .expect("pull :latest by default");
        assert_eq!(pulled.digest, shared.digest);
        let blobs = std::fs::read_dir(d.state_dir().join("images/blobs/sha256"))
            .expect("blobs")
            .count();
        assert_eq!(blobs, 2, "the shared layer is cached once");

        // A manifest list resolves to its linux/amd64 entry.
        let index = registry.push_index(
            "test/app",
            "multi",
            &[
                (&app.digest, app.size, "arm64"),
                (&app.digest, app.size, "amd64"),
            ],
        );
        let multi = admin
            .pull_image(&pull(&format!("{host}/test/app:multi")))
            .await
            .expect("pull a manifest list");
        assert_eq!(multi.digest, app.digest, "index {index}");
    });
    drop(admin);
    d.assert_no_leaks(&before);
}

#[test]
fn refused_pulls_and_images_leave_nothing_in_the_cache() {
    let test = "refused_pulls_and_images_leave_nothing_in_the_cache";
    let Some(registry) = registry_or_skip(test, Auth::Anonymous) else {
        return;
    };
    let host = &registry.host;
    let d = Daemon::start();
    let admin = d.client();
    let state = d.state_dir();
    let config = || config_blob(serde_json::json!({"Env": ["PATH=/bin"]}), "amd64");
    // An image for another platform, alone and as a manifest list's only entry.
    let arm = registry.push_image(
        "test/arm",
        "v1",
        &[busybox_layer()],
        config_blob(serde_json::json!({}), "arm64"),
    );
    registry.push_index("test/arm", "list", &[(&arm.digest, arm.size, "arm64")]);
    // Layers a tenant could craft to reach host files.
    let climb = layer(&[Entry::File("../../../../tmp/mvm-image-escape", 0o644, b"x")]);
    registry.push_image("test/climb", "v1", &[climb], config());
    let through = layer(&[
        Entry::Symlink("escape", "/tmp"),
        Entry::File("escape/mvm-image-escape", 0o644, b"x"),
    ]);
    registry.push_image("test/through", "v1", &[through], config());
    let steal = layer(&[
        Entry::Symlink("escape", "/etc"),
        Entry::Hardlink("shadow", "escape/shadow"),
    ]);
    registry.push_image("test/steal", "v1", &[steal], config());
    // A registry serving a layer that is not what the manifest says (its storage damaged). The
    // layer is its own: the registry stores blobs by digest, shared between repositories.
    let own = layer(&[Entry::File("damaged", 0o644, b"a layer of its own\n")]);
    let damaged = registry.push_image("test/damaged", "v1", &[own], config());
    let data = registry.blob_data(&damaged.layers[0]);
    let mut bytes = std::fs::read(&data).expect("stored layer");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).expect("damaging the layer");

    block_on(async {
        let cases = [
            (
                format!("{host}/test/app:v1"),
                404,
                "not_found",
                "no such image or tag",
            ),
            (
                format!("{host}/test/climb:nope"),
                404,
                "not_found",
                "no such image or tag",
            ),
            (
                format!("{host}/test/arm:v1"),
                422,
                "invalid_argument",
                "unsupported platform",
            ),
            (
                format!("{host}/test/arm:list"),
                422,
                "invalid_argument",
                "unsupported platform",
            ),
            (
                format!("{host}/test/climb:v1"),
                422,
                "invalid_argument",
                "`..`",
            ),
            (
                format!("{host}/test/through:v1"),
                422,
                "invalid_argument",
                "symbolic link",
            ),
            (
                format!("{host}/test/steal:v1"),
                422,
                "invalid_argument",
                "symbolic link",
            ),
            (
                format!("{host}/test/damaged:v1"),
                422,
                "invalid_argument",
                "digest mismatch",
            ),
            (
                "Not A Reference".into(),
                422,
                "invalid_argument",
                "not an image reference",
            ),
        ];
        for (reference, status, code, says) in cases {
            let e = admin
                .pull_image(&pull(&reference))
                .await
                .expect_err(&reference);
            let (s, c, message) = api_error(&e);
            assert_eq!((s, c.as_str()), (status, code), "{reference}: {message}");
            assert!(message.contains(says), "{reference}: {message}");
            assert!(
                cache_entries(&state).is_empty(),
                "{reference}: {:?}",
                cache_entries(&state)
            );
        }
        assert!(!Path::new("/tmp/mvm-image-escape").exists());
        let e = admin
            .create(&CreateSandbox {
                image: Some("nothere:1".into()),
                ..jail()
            })
            .await
            .expect_err("unknown image");
        let (s, c, message) = api_error(&e);
        assert_eq!((s, c.as_str()), (404, "not_found"), "{message}");
        assert!(message.contains("mvm pull"), "{message}");
    });
}

#[test]
fn a_full_disk_while_unpacking_leaves_no_image() {
    let test = "a_full_disk_while_unpacking_leaves_no_image";
    let Some(registry) = registry_or_skip(test, Auth::Anonymous) else {
        return;
    };
    let host = &registry.host;
    // 3 MiB that gzip cannot shrink: the blob fits on a 4 MiB disk, blob and tree do not.
    let noise: Vec<u8> = (0u32..3 << 18)
        .flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes())
        .collect();
    let big = layer(&[Entry::File("noise", 0o644, &noise)]);
    registry.push_image(
        "test/big",
        "v1",
        &[big],
        config_blob(serde_json::json!({}), "amd64"),
    );
    let d = Daemon::start();
    let images = d.state_dir().join("images");
    std::fs::create_dir_all(&images).expect("images dir");
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"])
        .arg(&images)
        .status()
        .expect("mount");
    assert!(mounted.success());
    let result = block_on(d.client().pull_image(&pull(&format!("{host}/test/big:v1"))));
    let listed = block_on(d.client().images());
    let leftovers: Vec<_> = std::fs::read_dir(images.join("images"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    let _ = std::process::Command::new("umount").arg(&images).status();
    let (status, code, message) = api_error(&result.expect_err("a pull onto a full disk"));
    assert_eq!((status, code.as_str()), (500, "host_error"), "{message}");
    assert!(message.contains("disk is full"), "{message}");
    assert!(listed.expect("list").is_empty());
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn registries_with_basic_or_token_auth_need_credentials() {
    let test = "registries_with_basic_or_token_auth_need_credentials";
    for auth in [Auth::Basic("mvm", "s3cret"), Auth::Token("mvm", "s3cret")] {
        let Some(registry) = registry_or_skip(test, auth) else {
            return;
        };
        needs_credentials(&registry, auth);
    }
}

/// Pulls from a registry that lets only user `mvm` with password `s3cret` in: refused
/// anonymously and with a wrong password (a 403 naming the registry, an empty cache, the
/// password nowhere in mvmd's state or log), then pulled and run.
fn needs_credentials(registry: &Registry, auth: Auth<'_>) {
    let host = &registry.host;
    let app = registry.push_image("private/app", "v1", &[busybox_layer()], app_config());
    let d = Daemon::start();
    let admin = d.client();
    block_on(async {
        let reference = format!("{host}/private/app:v1");
        let e = admin
            .pull_image(&pull(&reference))
            .await
            .expect_err("anonymous");
        let (s, c, message) = api_error(&e);
        assert_eq!((s, c.as_str()), (403, "forbidden"), "{auth:?}: {message}");
        assert!(
            message.contains(host.as_str()) && message.contains("needs credentials"),
            "{auth:?}: {message}"
        );
        let wrong = PullImage {
            reference: reference.clone(),
            username: Some("mvm".into()),
            password: Some("wrong-password".into()),
        };
        let (s, c, message) = api_error(&admin.pull_image(&wrong).await.expect_err("wrong"));
        assert_eq!((s, c.as_str()), (403, "forbidden"), "{auth:?}: {message}");
        assert!(
            message.contains(host.as_str()) && message.contains("refused the credentials"),
            "{auth:?}: {message}"
        );
        assert!(cache_entries(&d.state_dir()).is_empty());
        let right = PullImage {
            password: Some("s3cret".into()),
            ..wrong
        };
        let image = admin
            .pull_image(&right)
            .await
            .expect("pull with credentials");
        assert_eq!(image.digest, app.digest);
        let req = CreateSandbox {
            image: Some(reference),
            ..jail()
        };
        let (out, _) = run(&admin, req, "echo $GREETING").await;
        assert_eq!(out, "from-the-image\n");
    });
    for password in ["s3cret", "wrong-password"] {
        assert!(
            !d.log().contains(password),
            "{auth:?}: mvmd logged a password"
        );
        assert_eq!(
            grep_tree(&d.state_dir(), password.as_bytes()),
            Vec::<String>::new(),
            "{auth:?}: a password was stored"
        );
    }
}

/// The files under `dir` that contain `needle`.
fn grep_tree(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            todo.extend(
                std::fs::read_dir(&p)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path()),
            );
        } else if meta.is_file()
            && std::fs::read(&p).is_ok_and(|data| data.windows(needle.len()).any(|w| w == needle))
        {
            hits.push(p.display().to_string());
        }
    }
    hits
}

#[test]
fn an_image_config_over_the_limit_is_refused() {
    let test = "an_image_config_over_the_limit_is_refused";
    let Some(registry) = registry_or_skip(test, Auth::Anonymous) else {
        return;
    };
    let host = &registry.host;
    // A valid config, padded past the limit.
    let padding = "x".repeat(METADATA_LIMIT as usize);
    let big = config_blob(
        serde_json::json!({"Env": ["PATH=/bin"], "Labels": {"padding": padding}}),
        "amd64",
    );
    registry.push_image("big/config", "v1", &[busybox_layer()], big.clone());
    // The same blobs under a manifest that says the config is 2 bytes long.
    let busybox = gzip(&busybox_layer());
    let understated = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": sha256_digest(&big), "size": 2,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": sha256_digest(&busybox), "size": busybox.len(),
        }],
    });
    registry.push_raw(
        "big/config",
        "understated",
        Vec::new(),
        understated,
        "application/vnd.oci.image.manifest.v1+json",
    );
    let d = Daemon::start();
    let admin = d.client();
    block_on(async {
        for tag in ["v1", "understated"] {
            let e = admin
                .pull_image(&pull(&format!("{host}/big/config:{tag}")))
                .await
                .expect_err("a config over the limit");
            let (s, c, message) = api_error(&e);
            assert_eq!(
                (s, c.as_str()),
                (422, "invalid_argument"),
                "{tag}: {message}"
            );
            assert!(message.contains("over mvm's limit"), "{tag}: {message}");
        }
        let archive = oci_archive("example.com/big/config:v1", &[busybox_layer()], &big);
        let e = admin.load_images(archive).await.expect_err("load");
        let (s, _, message) = api_error(&e);
        assert_eq!(s, 422, "{message}");
        assert!(message.contains("over mvm's limit"), "{message}");
        assert!(admin.images().await.expect("list").is_empty());
    });
    assert!(cache_entries(&d.state_dir()).is_empty());
}

/// Pushes the images of the removal tests: `test/app` under the tags v1 and v2 (busybox and a
/// layer of its own) and `test/shared:latest` (busybox only); returns both and the size of
/// the app's own (compressed) layer.
fn push_app_and_shared(registry: &Registry) -> (Pushed, Pushed, u64) {
    let base = busybox_layer();
    let top = layer(&[
        Entry::Dir("srv/", 0o755),
        Entry::File("srv/app.txt", 0o644, b"the app\n"),
    ]);
    let top_size = gzip(&top).len() as u64;
    let app = registry.push_image("test/app", "v1", &[base.clone(), top.clone()], app_config());
    let again = registry.push_image("test/app", "v2", &[base.clone(), top], app_config());
    assert_eq!(again.digest, app.digest);
    let shared = registry.push_image(
        "test/shared",
        "latest",
        std::slice::from_ref(&base),
        config_blob(serde_json::json!({"Env": ["PATH=/bin"]}), "amd64"),
    );
    (app, shared, top_size)
}

/// The layer blobs in `d`'s image cache.
fn blob_count(d: &Daemon) -> usize {
    std::fs::read_dir(d.state_dir().join("images/blobs/sha256"))
        .expect("blobs")
        .count()
}

/// `DELETE /v1/images/{name}` as docker's rmi: a tag is untagged while another names the
/// image; an image a sandbox (another tenant's) uses is kept with a 409 naming it and nothing
/// changed; the last tag removes the image and the layers only it used, while a layer another
/// image shares stays; unknown names are 404, bad ones 422, tenants 403.
#[test]
fn images_are_removed_like_docker_rmi() {
    let test = "images_are_removed_like_docker_rmi";
    let Some(registry) = registry_or_skip(test, Auth::Anonymous) else {
        return;
    };
    let host = &registry.host;
    let (app, _, top_size) = push_app_and_shared(&registry);
    let d = Daemon::start();
    let before = d.host_state();
    let admin = d.client();
    let other = d.client_with(Some(&d.tenant("other", &[])));
    let blobs = || blob_count(&d);
    block_on(async {
        for r in ["test/app:v1", "test/app:v2", "test/shared"] {
            admin
                .pull_image(&pull(&format!("{host}/{r}")))
                .await
                .expect("pull");
        }
        assert_eq!(blobs(), 2);
        let (v1, v2) = (format!("{host}/test/app:v1"), format!("{host}/test/app:v2"));
        let e = other.remove_image(&v1).await.expect_err("a tenant's rmi");
        assert_eq!(api_error(&e).0, 403);
        let s = other
            .create(&CreateSandbox {
                image: Some(v1.clone()),
                ..jail()
            })
            .await
            .expect("create from the image");
        // Another tag names the image: untagged only.
        let removed = admin.remove_image(&v1).await.expect("rmi v1");
        assert_eq!(
            (removed.untagged, removed.deleted, removed.freed_bytes),
            (vec![v1.clone()], None, 0)
        );
        // In use: kept, nothing changed.
        for name in [v2.clone(), app.digest.clone()] {
            let e = admin.remove_image(&name).await.expect_err("in use");
            let (status, code, msg) = api_error(&e);
            assert_eq!((status, code.as_str()), (409, "conflict"), "{msg}");
            assert!(msg.contains(&s.id), "{msg}");
        }
        let listed = admin.images().await.expect("list");
        let image = listed
            .iter()
            .find(|i| i.digest == app.digest)
            .expect("kept");
        assert_eq!(image.references, vec![v2.clone()]);
        let r = other
            .exec(&s.id, &sh("cat /srv/app.txt"))
            .await
            .expect("exec");
        assert_eq!(r.stdout, "the app\n", "{r:?}");
        other.delete(&s.id).await.expect("destroy");
        // The last tag: the image goes, and its own layer; the shared one stays.
        let removed = admin.remove_image(&v2).await.expect("rmi v2");
        assert_eq!(removed.deleted.as_deref(), Some(app.digest.as_str()));
        assert_eq!(removed.freed_bytes, top_size);
        assert_eq!(blobs(), 1);
        let e = other
            .create(&CreateSandbox {
                image: Some(v2.clone()),
                ..jail()
            })
            .await
            .expect_err("a removed image");
        assert_eq!(api_error(&e).0, 404);
        let e = admin.remove_image(&v2).await.expect_err("again");
        assert_eq!(api_error(&e).0, 404);
        let e = admin
            .remove_image("Not A Reference!")
            .await
            .expect_err("bad");
        assert_eq!(api_error(&e).0, 422);
        // By digest: every reference and the last layer.
        let shared = admin.images().await.expect("list").remove(0);
        let removed = admin.remove_image(&shared.digest).await.expect("rmi");
        assert_eq!(removed.untagged, shared.references);
        assert_eq!(blobs(), 0);
        assert!(cache_entries(&d.state_dir()).is_empty());
    });
    drop(admin);
    d.assert_no_leaks(&before);
}

/// `POST /v1/images/prune` removes every image no sandbox uses, with all its references, and
/// the layers only they used; an image a sandbox uses stays whole (its references too, and
/// the layer it shares with a pruned one) and the sandbox runs on; a tenant's prune is a 403
/// that changes nothing; a prune of a cache with nothing unused removes nothing.
#[test]
fn unused_images_are_pruned() {
    let test = "unused_images_are_pruned";
    let Some(registry) = registry_or_skip(test, Auth::Anonymous) else {
        return;
    };
    let host = &registry.host;
    let (unused, used, top_size) = push_app_and_shared(&registry);
    let d = Daemon::start();
    let before = d.host_state();
    let admin = d.client();
    let other = d.client_with(Some(&d.tenant("other", &[])));
    let blobs = || blob_count(&d);
    block_on(async {
        let (used_ref, unused_ref) = (
            format!("{host}/test/shared:latest"),
            format!("{host}/test/app:v1"),
        );
        for r in [&used_ref, &unused_ref, &format!("{host}/test/app:v2")] {
            admin.pull_image(&pull(r)).await.expect("pull");
        }
        assert_eq!(blobs(), 2);
        let s = other
            .create(&CreateSandbox {
                image: Some(used_ref.clone()),
                ..jail()
            })
            .await
            .expect("create from the image");
        let e = other.prune_images().await.expect_err("a tenant's prune");
        assert_eq!(api_error(&e).0, 403);
        assert_eq!(admin.images().await.expect("list").len(), 2);

        let pruned = admin.prune_images().await.expect("prune");
        assert_eq!(pruned.deleted, vec![unused.digest.clone()]);
        let mut untagged = pruned.untagged.clone();
        untagged.sort();
        assert_eq!(
            untagged,
            vec![unused_ref.clone(), format!("{host}/test/app:v2")]
        );
        assert_eq!(
            pruned.freed_bytes, top_size,
            "only the unused image's own layer"
        );
        assert_eq!(blobs(), 1);
        let listed = admin.images().await.expect("list");
        assert_eq!(
            listed
                .iter()
                .map(|i| (i.digest.clone(), i.references.clone()))
                .collect::<Vec<_>>(),
            vec![(used.digest.clone(), vec![used_ref.clone()])]
        );
        let r = other.exec(&s.id, &sh("echo runs")).await.expect("exec");
        assert_eq!(r.stdout, "runs\n", "{r:?}");
        // Nothing unused left: nothing removed.
        let again = admin.prune_images().await.expect("prune again");
        assert!(
            again.deleted.is_empty() && again.untagged.is_empty(),
            "{again:?}"
        );
        assert_eq!(again.freed_bytes, 0);
        other.delete(&s.id).await.expect("destroy");
        let pruned = admin.prune_images().await.expect("prune the last");
        assert_eq!(pruned.deleted, vec![used.digest.clone()]);
        assert_eq!(blobs(), 0);
        assert!(cache_entries(&d.state_dir()).is_empty());
    });
    drop(admin);
    d.assert_no_leaks(&before);
}

/// A merged-/usr image (Debian's, Ubuntu's, python's: `/bin -> usr/bin`) runs in the jail
/// tier: its top-level links are made in the jail and its top-level files are there.
#[test]
fn a_merged_usr_image_runs_in_the_jail_tier() {
    let test = "a_merged_usr_image_runs_in_the_jail_tier";
    let Some(registry) = registry_or_skip(test, Auth::Anonymous) else {
        return;
    };
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static at /bin/busybox");
    let merged = layer(&[
        Entry::Dir("usr/", 0o755),
        Entry::Dir("usr/bin/", 0o755),
        Entry::Dir("tmp/", 0o1777),
        Entry::File("usr/bin/busybox", 0o755, &busybox),
        Entry::Symlink("usr/bin/sh", "busybox"),
        Entry::Symlink("usr/bin/cat", "busybox"),
        Entry::Symlink("usr/bin/readlink", "busybox"),
        Entry::Symlink("bin", "usr/bin"),
        Entry::Symlink("sbin", "/usr/bin"),
        Entry::File("VERSION", 0o644, b"merged-usr 1\n"),
    ]);
    let image = registry.push_image(
        "test/merged",
        "v1",
        &[merged],
        config_blob(serde_json::json!({"Env": ["PATH=/bin"]}), "amd64"),
    );
    let d = Daemon::start();
    let before = d.host_state();
    let c = d.client();
    block_on(async {
        c.pull_image(&pull(&format!("{}/test/merged:v1", registry.host)))
            .await
            .expect("pull");
        let req = CreateSandbox {
            image: Some(image.digest.clone()),
            ..jail()
        };
        let (out, code) = run(
            &c,
            req,
            "cat /VERSION; readlink /bin; readlink /sbin; /sbin/cat /VERSION",
        )
        .await;
        assert_eq!(
            (out.as_str(), code),
            ("merged-usr 1\nusr/bin\n/usr/bin\nmerged-usr 1\n", 0)
        );
    });
    drop(c);
    d.assert_no_leaks(&before);
}
