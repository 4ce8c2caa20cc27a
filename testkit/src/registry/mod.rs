//! A real OCI registry for image tests: Debian's `docker-registry` (the Docker Distribution
//! server) on a loopback port with its own storage directory, optionally behind htpasswd
//! basic auth or token auth (a token server of the test's own, [`token`]), filled with images the test builds here (layers made with the `tar` crate,
//! pushed with `oci-client`).

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest, Sha256};

pub mod token;

/// Debian's Docker Distribution server.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running registry, stopped on drop.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub host: String,
    /// Its storage and config.
    dir: tempfile::TempDir,
    child: Child,
    auth: RegistryAuth,
    /// The token server of a registry with token auth.
    _token_server: Option<token::TokenServer>,
}

/// How a [`Registry`] lets clients in.
#[derive(Clone, Copy, Debug)]
pub enum Auth<'a> {
    /// Anyone, anonymously.
    Anonymous,
    /// Basic auth (htpasswd, bcrypt) for this user and password.
    Basic(&'a str, &'a str),
    /// Bearer tokens from a token server that gives them to this user and password.
    Token(&'a str, &'a str),
}

/// An image pushed to a [`Registry`].
pub struct Pushed {
    /// Its manifest's digest.
    pub digest: String,
    /// Its manifest's size.
    pub size: u64,
    /// Its (compressed) layers' digests.
    pub layers: Vec<String>,
}

/// A layer entry of a test image.
pub enum Entry<'a> {
    /// A directory.
    Dir(&'a str, u32),
    /// A regular file.
    File(&'a str, u32, &'a [u8]),
    /// A symbolic link to the target.
    Symlink(&'a str, &'a str),
    /// A hard link to the target.
    Hardlink(&'a str, &'a str),
    /// A character device (major, minor).
    Char(&'a str, u32, u32),
    /// A regular file with uid and gid.
    Owned(&'a str, u32, u32, u32, &'a [u8]),
}

/// A layer (an uncompressed tar) of `entries`; `path` strings go in as they are (`..`
/// included), so tests can build hostile layers.
pub fn layer(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        let (path, kind, mode, data, link, owner): (&str, _, u32, &[u8], Option<&str>, (u32, u32)) =
            match *e {
                Entry::Dir(p, m) => (p, tar::EntryType::Directory, m, &[], None, (0, 0)),
                Entry::File(p, m, d) => (p, tar::EntryType::Regular, m, d, None, (0, 0)),
                Entry::Symlink(p, t) => (p, tar::EntryType::Symlink, 0o777, &[], Some(t), (0, 0)),
                Entry::Hardlink(p, t) => (p, tar::EntryType::Link, 0o644, &[], Some(t), (0, 0)),
                Entry::Char(p, major, minor) => {
                    h.set_device_major(major).expect("major");
                    h.set_device_minor(minor).expect("minor");
                    (p, tar::EntryType::Char, 0o666, &[], None, (0, 0))
                }
                Entry::Owned(p, m, uid, gid, d) => {
                    (p, tar::EntryType::Regular, m, d, None, (uid, gid))
                }
            };
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(owner.0 as u64);
        h.set_gid(owner.1 as u64);
        h.set_mtime(1_700_000_000);
        h.set_size(data.len() as u64);
        // Set raw, unchecked: hostile names must reach the archive as written.
        let name = &mut h.as_old_mut().name;
        name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(target) = link {
            let l = &mut h.as_old_mut().linkname;
            l[..target.len()].copy_from_slice(target.as_bytes());
        }
        h.set_cksum();
        tar.append(&h, data).expect("appending to a layer");
    }
    tar.into_inner().expect("finishing a layer")
}

/// Gzip of `data`.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

/// The first layer of the test images: busybox (static) as `/bin/busybox` with `sh`, `echo`,
/// `cat`, `id`, `pwd`, `ls` and `stat` links to it, `/etc/passwd` with `app` (uid 1000),
/// `/etc/group`, `/tmp`, and `/work`.
pub fn busybox_layer() -> Vec<u8> {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static at /bin/busybox");
    let mut entries = vec![
        Entry::Dir("bin/", 0o755),
        Entry::Dir("etc/", 0o755),
        Entry::Dir("tmp/", 0o1777),
        Entry::Dir("work/", 0o755),
        Entry::File("bin/busybox", 0o755, &busybox),
        Entry::File(
            "etc/passwd",
            0o644,
            b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/work:/bin/sh\n",
        ),
        Entry::File("etc/group", 0o644, b"root:x:0:\napp:x:1000:\n"),
    ];
    let applets = [
        "sh", "echo", "cat", "id", "pwd", "ls", "stat", "env", "sleep", "test",
    ];
    let paths: Vec<String> = applets.iter().map(|a| format!("bin/{a}")).collect();
    entries.extend(paths.iter().map(|p| Entry::Symlink(p, "busybox")));
    layer(&entries)
}

/// The config blob of a linux/amd64 image whose run configuration is `config` (`Env`,
/// `WorkingDir`, `User`, `Entrypoint`, `Cmd`).
pub fn config_blob(config: serde_json::Value, architecture: &str) -> Vec<u8> {
    serde_json::json!({
        "architecture": architecture,
        "os": "linux",
        "config": config,
        "rootfs": { "type": "layers", "diff_ids": [] },
    })
    .to_string()
    .into_bytes()
}

/// `sha256:HEX` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    let hex: String = Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("sha256:{hex}")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Runs `f` on a runtime of its own in a thread of its own (tests may already be in one).
fn on_runtime<T: Send + 'static>(
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send>> + Send + 'static,
) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
    .join()
    .expect("push thread")
}

impl Registry {
    /// Starts a registry that lets clients in as `auth` says (refusing anonymous ones unless
    /// it is [`Auth::Anonymous`]).
    pub fn start(auth: Auth<'_>) -> Result<Registry, String> {
        if !Path::new(REGISTRY_BIN).exists() {
            return Err(format!(
                "{REGISTRY_BIN} is missing: install Debian's docker-registry (scripts/deps.sh)"
            ));
        }
        let dir = tempfile::Builder::new()
            .prefix("mvm-registry")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let mut auth_yaml = String::new();
        let mut token_server = None;
        let client_auth = match auth {
            Auth::Anonymous => RegistryAuth::Anonymous,
            Auth::Basic(user, password) => {
                let hash = bcrypt::hash(password, 5).map_err(|e| e.to_string())?;
                let htpasswd = dir.path().join("htpasswd");
                std::fs::write(&htpasswd, format!("{user}:{hash}\n")).map_err(|e| e.to_string())?;
                auth_yaml = format!(
                    "auth:\n  htpasswd:\n    realm: mvm-test\n    path: {}\n",
                    htpasswd.display()
                );
                RegistryAuth::Basic(user.into(), password.into())
            }
            Auth::Token(user, password) => {
                let server = token::TokenServer::start(user, password)?;
                let bundle = dir.path().join("token-cert.pem");
                std::fs::write(&bundle, &server.certificate).map_err(|e| e.to_string())?;
                auth_yaml = format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    \
                     rootcertbundle: {}\n",
                    server.realm,
                    token::SERVICE,
                    token::ISSUER,
                    bundle.display()
                );
                token_server = Some(server);
                RegistryAuth::Basic(user.into(), password.into())
            }
        };
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  \
                 delete:\n    enabled: true\nhttp:\n  addr: {host}\n{auth_yaml}",
                dir.path().join("storage").display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let log =
            std::fs::File::create(dir.path().join("registry.log")).map_err(|e| e.to_string())?;
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {REGISTRY_BIN}: {e}"))?;
        let registry = Registry {
            host,
            dir,
            child,
            auth: client_auth,
            _token_server: token_server,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(&registry.host).is_err() {
            if Instant::now() > deadline {
                return Err(format!(
                    "docker-registry did not listen on {}: {}",
                    registry.host,
                    registry.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(registry)
    }

    /// The registry's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Where the registry keeps blob `digest` (its filesystem storage driver's layout).
    pub fn blob_data(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    fn client() -> Client {
        Client::new(ClientConfig {
            protocol: ClientProtocol::Http,
            ..ClientConfig::default()
        })
    }

    /// Pushes blobs and a raw manifest (any media type) as `repo:tag`; returns the manifest's
    /// digest and size.
    pub fn push_raw(
        &self,
        repo: &str,
        tag: &str,
        blobs: Vec<Vec<u8>>,
        manifest: serde_json::Value,
        media_type: &str,
    ) -> (String, u64) {
        let reference: Reference = format!("{}/{repo}:{tag}", self.host)
            .parse()
            .expect("reference");
        let auth = self.auth.clone();
        let body = serde_json::to_vec(&manifest).expect("manifest");
        let (digest, size) = (sha256_digest(&body), body.len() as u64);
        let media_type = media_type.to_owned();
        on_runtime(move || {
            Box::pin(async move {
                let client = Self::client();
                client
                    .auth(&reference, &auth, oci_client::RegistryOperation::Push)
                    .await
                    .expect("registry auth");
                for blob in blobs {
                    let d = sha256_digest(&blob);
                    client
                        .push_blob(&reference, blob, &d)
                        .await
                        .expect("pushing a blob");
                }
                let ct = media_type.parse().expect("media type");
                client
                    .push_manifest_raw(&reference, body, ct)
                    .await
                    .expect("pushing a manifest");
            })
        });
        (digest, size)
    }

    /// Pushes an image of `layers` (each gzip-compressed here) and `config` (a config blob)
    /// as `repo:tag`.
    pub fn push_image(&self, repo: &str, tag: &str, layers: &[Vec<u8>], config: Vec<u8>) -> Pushed {
        let compressed: Vec<Vec<u8>> = layers.iter().map(|l| gzip(l)).collect();
        let layer_digests: Vec<String> = compressed.iter().map(|l| sha256_digest(l)).collect();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": sha256_digest(&config), "size": config.len(),
            },
            "layers": compressed.iter().zip(&layer_digests).map(|(l, d)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": d, "size": l.len(),
            })).collect::<Vec<_>>(),
        });
        let mut blobs = compressed;
        blobs.push(config);
        let (digest, size) = self.push_raw(
            repo,
            tag,
            blobs,
            manifest,
            "application/vnd.oci.image.manifest.v1+json",
        );
        Pushed {
            digest,
            size,
            layers: layer_digests,
        }
    }

    /// Pushes an image index of manifests pushed before (digest, size, linux architecture)
    /// as `repo:tag`; returns the index's digest.
    pub fn push_index(&self, repo: &str, tag: &str, entries: &[(&str, u64, &str)]) -> String {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": entries.iter().map(|(digest, size, arch)| serde_json::json!({
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": digest, "size": size,
                "platform": { "os": "linux", "architecture": arch },
            })).collect::<Vec<_>>(),
        });
        self.push_raw(
            repo,
            tag,
            Vec::new(),
            index,
            "application/vnd.oci.image.index.v1+json",
        )
        .0
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An OCI image layout archive (`oci-layout`, `index.json`, `blobs/sha256/*`) of one image of
/// `layers` (uncompressed) and `config`, named `name` (`io.containerd.image.name`), as
/// `docker save` (25+) and `ctr export` write them; `mvm load` takes it.
pub fn oci_archive(name: &str, layers: &[Vec<u8>], config: &[u8]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut add = |path: &str, data: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_path(path).expect("archive path");
        h.set_cksum();
        tar.append(&h, data).expect("archive entry");
    };
    let mut blob = |data: &[u8]| {
        let digest = sha256_digest(data);
        add(
            &format!("blobs/sha256/{}", digest.trim_start_matches("sha256:")),
            data,
        );
        serde_json::json!({"digest": digest, "size": data.len()})
    };
    let mut layer_descs = Vec::new();
    for l in layers {
        let mut d = blob(l);
        d["mediaType"] = "application/vnd.oci.image.layer.v1.tar".into();
        layer_descs.push(d);
    }
    let mut config_desc = blob(config);
    config_desc["mediaType"] = "application/vnd.oci.image.config.v1+json".into();
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config_desc,
        "layers": layer_descs,
    });
    let mut manifest_desc = blob(manifest.to_string().as_bytes());
    manifest_desc["mediaType"] = "application/vnd.oci.image.manifest.v1+json".into();
    manifest_desc["annotations"] = serde_json::json!({ "io.containerd.image.name": name });
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [manifest_desc]});
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", index.to_string().as_bytes());
    tar.into_inner().expect("archive")
}
