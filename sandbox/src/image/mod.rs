//! OCI images as sandbox file systems: pulled from a registry ([`ImageStore::pull`]) or loaded
//! from a `docker save`/OCI archive ([`ImageStore::load`]), cached by digest under
//! `<state dir>/images`, and unpacked once into a read-only tree that sandboxes of both tiers
//! use like a template's base.
//!
//! Layout (all root's, 0700 above it):
//! - `blobs/sha256/<hex>`: layers as pulled, each checked against its digest, shared between
//!   images;
//! - `images/<hex of the manifest digest>/`: `image.json` (the record) and `rootfs/` (the
//!   unpacked tree). Made under `images/.tmp-*` and renamed into place whole, so an image is
//!   either complete or absent: a failed pull (bad digest, full disk, refused layer) leaves
//!   nothing;
//! - `refs/<sha256 of the reference>.json`: which digest a reference names, written last.
//!
//! Pulls and loads commit under a lock (`lock`), which also lets them remove what a killed
//! one left behind.
//!
//! Removal ([`ImageStore::remove`], docker's `rmi`) untags a reference, and removes an image
//! no reference names any more, unless a sandbox uses it, then the layers no image uses. It
//! holds `pins.lock` exclusively; what must not lose an image or a blob under it holds it
//! shared ([`Pin`]): a pull, whose blobs are in the cache before its image is, and a create
//! from an image, from finding the image to recording the sandbox that uses it.

mod archive;
mod pull;
pub mod unpack;

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use oci_client::Reference;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use pull::{plain_http, Credentials};

use crate::error::{Error, Result};
use crate::model::{Image, ImageConfig, PrunedImages, RemovedImage, SandboxImage};

/// Environment variable with registries reached over plain HTTP besides loopback ones
/// (comma-separated `host` or `host:port`), like docker's `--insecure-registry`.
pub const INSECURE_REGISTRIES_ENV: &str = "MVM_INSECURE_REGISTRIES";

/// The largest config blob, manifest or archive index mvm reads into memory (4 MiB, like
/// registries' manifest limits): they are small JSON documents, and a hostile registry or
/// archive must not make the daemon hold gigabytes.
pub const METADATA_LIMIT: u64 = 4 << 20;

/// The error for a document of `size` bytes over [`METADATA_LIMIT`].
fn metadata_too_large(what: &str, size: u64) -> Error {
    Error::Invalid(format!(
        "{what} is {size} bytes, over mvm's limit of {METADATA_LIMIT} bytes for an image's \
         config and manifests; nothing was cached"
    ))
}

/// Reads the file `path` (`what`, for errors), refusing one over [`METADATA_LIMIT`].
fn read_metadata(path: &Path, what: &str) -> Result<Vec<u8>> {
    use std::io::Read as _;
    let file = std::fs::File::open(path).map_err(|e| Error::host(format!("opening {what}"), e))?;
    let mut data = Vec::new();
    file.take(METADATA_LIMIT + 1)
        .read_to_end(&mut data)
        .map_err(|e| Error::host(format!("reading {what}"), e))?;
    if data.len() as u64 > METADATA_LIMIT {
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        return Err(metadata_too_large(what, size));
    }
    Ok(data)
}

/// How long a partial blob stays untouched before the next pull or load removes it.
const STALE_PARTIAL: std::time::Duration = std::time::Duration::from_secs(600);

/// The image cache of a state directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
    insecure: Vec<String>,
}

/// A layer of a fetched image.
pub(crate) struct Layer {
    digest: String,
    size: u64,
}

/// What a pull or load brings to [`ImageStore::commit`].
pub(crate) struct Fetched {
    /// Manifest digest.
    digest: String,
    /// The config blob.
    config: Vec<u8>,
    /// Layers in order, their blobs in the cache.
    layers: Vec<Layer>,
}

/// `image.json`: an image's record.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Record {
    digest: String,
    size_bytes: u64,
    created_at: i64,
    config: ImageConfig,
    /// Digests of its layers (their blobs stay while it does; records written before this
    /// field keep none).
    #[serde(default)]
    layers: Vec<String>,
}

/// A shared hold on the image cache: no removal runs while it is held (see the module docs).
pub struct Pin {
    _held: std::fs::File,
}

/// `refs/*.json`: the digest a reference names.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RefEntry {
    reference: String,
    digest: String,
}

/// The parts of an image config blob mvm uses.
#[derive(Deserialize)]
struct ConfigBlob {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    config: Option<RunConfig>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
}

fn hex_of(digest: &str) -> Result<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        })
        .ok_or_else(|| {
            Error::Invalid(format!(
                "{digest:?} is not a sha256 digest (sha256:<64 hex>)"
            ))
        })
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Parses `name` as an image reference (Docker Hub and `:latest` by default).
pub fn parse_reference(name: &str) -> Result<Reference> {
    name.parse::<Reference>().map_err(|e| {
        Error::Invalid(format!(
            "{name:?} is not an image reference ([REGISTRY/]REPOSITORY[:TAG][@sha256:DIGEST]): {e}"
        ))
    })
}

fn mkdir_private(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::host(format!("creating {}", dir.display()), e))
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", crate::db::random_hex(4)?));
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            Error::host(format!("writing {}", path.display()), e)
        })
}

impl ImageStore {
    /// The cache under `state_dir`; plain-HTTP registries from [`INSECURE_REGISTRIES_ENV`].
    pub fn new(state_dir: &Path) -> Self {
        let insecure = std::env::var(INSECURE_REGISTRIES_ENV)
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        ImageStore {
            root: state_dir.join("images"),
            insecure,
        }
    }

    /// Adds registries reached over plain HTTP (`host` or `host:port`).
    pub fn with_insecure(mut self, registries: impl IntoIterator<Item = String>) -> Self {
        self.insecure.extend(registries);
        self
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("blobs/sha256").join(hex_of(digest)?))
    }

    fn partial_blob(&self) -> Result<PathBuf> {
        let dir = self.root.join("blobs/sha256");
        mkdir_private(&dir)?;
        Ok(dir.join(format!(".partial-{}", crate::db::random_hex(8)?)))
    }

    fn image_dir(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.root.join("images").join(hex_of(digest)?))
    }

    fn ref_path(&self, reference: &str) -> PathBuf {
        self.root
            .join("refs")
            .join(format!("{}.json", &sha256_hex(reference.as_bytes())[..32]))
    }

    /// Pulls `reference` from its registry (unless its digest is cached already) and returns
    /// the image.
    pub async fn pull(&self, reference: &str, credentials: Option<&Credentials>) -> Result<Image> {
        let parsed = parse_reference(reference)?;
        let pin = self.pinned().await?;
        let fetched = self.fetch(&parsed, credentials).await?;
        let store = self.clone();
        let whole = parsed.whole();
        let image = crate::manager::blocking(move || store.commit(fetched, &[whole])).await;
        drop(pin);
        image
    }

    /// The cache's file `name`, made when missing and locked as `kind` (waiting for the
    /// holders that exclude it).
    fn locked(&self, name: &str, kind: mvm_sys::flock::Kind) -> Result<std::fs::File> {
        mkdir_private(&self.root)?;
        let path = self.root.join(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| Error::host(format!("opening {}", path.display()), e))?;
        mvm_sys::flock::lock(&file, kind)
            .map_err(|e| Error::host(format!("locking {}", path.display()), e))?;
        Ok(file)
    }

    /// `pins.lock`, locked as `kind`.
    fn pins(&self, kind: mvm_sys::flock::Kind) -> Result<std::fs::File> {
        self.locked("pins.lock", kind)
    }

    /// A [`Pin`] (waits while a removal runs).
    pub fn pin(&self) -> Result<Pin> {
        self.pins(mvm_sys::flock::Kind::Shared)
            .map(|held| Pin { _held: held })
    }

    /// [`ImageStore::pin`] from async code.
    pub async fn pinned(&self) -> Result<Pin> {
        let store = self.clone();
        crate::manager::blocking(move || store.pin()).await
    }

    /// Removes `name` as docker's `rmi` does: a reference is untagged, and its image removed
    /// when no other reference names it; a digest (`sha256:…` or `REPO@sha256:…`) loses all
    /// its references and is removed. An image `users` (its digest → the sandboxes using it)
    /// names is kept and the removal refused (409) with nothing changed. Then the layers no
    /// image uses go.
    pub fn remove(
        &self,
        name: &str,
        users: impl FnOnce(&str) -> Result<Vec<String>>,
    ) -> Result<RemovedImage> {
        let _pins = self.pins(mvm_sys::flock::Kind::Exclusive)?;
        let _lock = self.lock()?;
        let by_digest = name.starts_with("sha256:") || name.contains("@sha256:");
        let (image, _) = self.resolve(name)?;
        let untag: Vec<String> = if by_digest {
            image.references.clone()
        } else {
            vec![parse_reference(name)?.whole()]
        };
        let delete = untag.len() >= image.references.len();
        if delete {
            let using = users(&image.digest)?;
            if !using.is_empty() {
                return Err(Error::Conflict(format!(
                    "image {} is used by sandbox{} {}; remove {} first",
                    image.digest,
                    if using.len() == 1 { "" } else { "es" },
                    using.join(", "),
                    if using.len() == 1 { "it" } else { "them" }
                )));
            }
        }
        self.untag(&untag)?;
        let mut removed = RemovedImage {
            untagged: untag,
            deleted: None,
            freed_bytes: 0,
        };
        if delete {
            self.delete_tree(&image.digest)?;
            removed.deleted = Some(image.digest);
        }
        removed.freed_bytes = self.collect_blobs()?;
        Ok(removed)
    }

    /// Removes every image no sandbox uses (`used` gives the digests of those sandboxes use,
    /// asked under the locks), with all its references, then the layers no image uses, as
    /// `docker image prune -a` does.
    pub fn prune(
        &self,
        used: impl FnOnce() -> Result<std::collections::HashSet<String>>,
    ) -> Result<PrunedImages> {
        let _pins = self.pins(mvm_sys::flock::Kind::Exclusive)?;
        let _lock = self.lock()?;
        let used = used()?;
        let mut pruned = PrunedImages::default();
        for image in self.list()? {
            if used.contains(&image.digest) {
                continue;
            }
            self.untag(&image.references)?;
            self.delete_tree(&image.digest)?;
            pruned.untagged.extend(image.references);
            pruned.deleted.push(image.digest);
        }
        pruned.freed_bytes = self.collect_blobs()?;
        Ok(pruned)
    }

    /// Removes `references` (those gone already too). Under both locks.
    fn untag(&self, references: &[String]) -> Result<()> {
        for r in references {
            match std::fs::remove_file(self.ref_path(r)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::host(format!("untagging {r}"), e))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Removes the unpacked tree and record of image `digest`. Under both locks.
    fn delete_tree(&self, digest: &str) -> Result<()> {
        // Out of sight first (a name the next lock() sweeps), then removed.
        let dir = self.image_dir(digest)?;
        let doomed = self
            .root
            .join("images")
            .join(format!(".tmp-rm-{}", crate::db::random_hex(8)?));
        std::fs::rename(&dir, &doomed)
            .map_err(|e| Error::host(format!("removing {}", dir.display()), e))?;
        crate::manager::host::remove_tree(&doomed)
    }

    /// Removes the layer blobs no image's record names; returns their bytes. Under both
    /// locks.
    fn collect_blobs(&self) -> Result<u64> {
        let used: std::collections::HashSet<String> = std::fs::read_dir(self.root.join("images"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                self.record(&format!("sha256:{name}")).ok()
            })
            .flat_map(|r| r.layers)
            .filter_map(|d| hex_of(&d).ok().map(str::to_owned))
            .collect();
        let mut freed = 0;
        for entry in std::fs::read_dir(self.root.join("blobs/sha256"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || used.contains(&name) {
                continue;
            }
            let size = entry.metadata().map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(entry.path())
                .map_err(|e| Error::host(format!("removing {}", entry.path().display()), e))?;
            freed += size;
        }
        Ok(freed)
    }

    /// Unpacks a fetched image into place (unless it is there already) and points
    /// `references` at it.
    fn commit(&self, fetched: Fetched, references: &[String]) -> Result<Image> {
        let lock = self.lock()?;
        let image = self.commit_locked(fetched, references);
        drop(lock);
        image
    }

    /// [`ImageStore::commit`] under the cache's lock, which the caller holds.
    fn commit_locked(&self, fetched: Fetched, references: &[String]) -> Result<Image> {
        let config = parse_config(&fetched.config, &fetched.digest)?;
        let images = self.root.join("images");
        mkdir_private(&images)?;
        mkdir_private(&self.root.join("refs"))?;
        let dir = self.image_dir(&fetched.digest)?;
        if !dir.join("image.json").is_file() {
            let staging = images.join(format!(".tmp-{}", crate::db::random_hex(8)?));
            let made = self.unpack_into(&staging, &fetched, config).and_then(|()| {
                std::fs::rename(&staging, &dir).map_err(|e| {
                    Error::host(format!("renaming {} into place", staging.display()), e)
                })
            });
            if let Err(e) = made {
                let _ = crate::manager::host::remove_tree(&staging);
                return Err(e);
            }
        }
        for r in references {
            let entry = RefEntry {
                reference: r.clone(),
                digest: fetched.digest.clone(),
            };
            write_atomic(
                &self.ref_path(r),
                &serde_json::to_vec(&entry).expect("plain data"),
            )?;
        }
        self.image(&fetched.digest)
    }

    fn unpack_into(&self, staging: &Path, fetched: &Fetched, config: ImageConfig) -> Result<()> {
        let rootfs = staging.join("rootfs");
        mkdir_private(staging)?;
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&rootfs)
            .map_err(|e| Error::host(format!("creating {}", rootfs.display()), e))?;
        let mut devices = 0;
        for layer in &fetched.layers {
            let path = self.blob_path(&layer.digest)?;
            let file = std::fs::File::open(&path)
                .map_err(|e| Error::host(format!("opening {}", path.display()), e))?;
            let what = format!("layer {}", layer.digest);
            devices +=
                unpack::apply_layer(&rootfs, unpack::layer_reader(file)?, &what)?.devices_skipped;
        }
        if devices > 0 {
            tracing::info!(digest = %fetched.digest, devices, "image device nodes left out");
        }
        // The tree's root is the sandbox's /: 0755 whatever the layers said.
        std::fs::set_permissions(&rootfs, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| Error::host("chmod the image root", e))?;
        let record = Record {
            digest: fetched.digest.clone(),
            size_bytes: fetched.layers.iter().map(|l| l.size).sum(),
            created_at: crate::db::now(),
            config,
            layers: fetched.layers.iter().map(|l| l.digest.clone()).collect(),
        };
        write_atomic(
            &staging.join("image.json"),
            &serde_json::to_vec(&record).expect("plain data"),
        )
    }

    /// Takes the cache's lock and removes what killed pulls and loads left (their staging
    /// directories; a partial blob is replaced by the next pull of it).
    fn lock(&self) -> Result<std::fs::File> {
        let file = self.locked("lock", mvm_sys::flock::Kind::Exclusive)?;
        let staging = [self.root.join("images"), self.root.clone()];
        for entry in staging
            .iter()
            .flat_map(std::fs::read_dir)
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = crate::manager::host::remove_tree(&entry.path());
            }
        }
        // A blob being pulled is written to all the time; one untouched for long is a dead
        // pull's.
        for entry in std::fs::read_dir(self.root.join("blobs/sha256"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let stale = entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().unwrap_or_default() > STALE_PARTIAL);
            if stale && entry.file_name().to_string_lossy().starts_with(".partial-") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(file)
    }

    fn record(&self, digest: &str) -> Result<Record> {
        let path = self.image_dir(digest)?.join("image.json");
        let text = std::fs::read(&path).map_err(|_| {
            Error::NotFound(format!(
                "image {digest} is not in mvm's image cache: pull it (`mvm pull`) or load it \
                 (`mvm load`) first"
            ))
        })?;
        serde_json::from_slice(&text)
            .map_err(|e| Error::host(format!("reading {}", path.display()), e))
    }

    fn refs(&self) -> Vec<RefEntry> {
        let mut refs: Vec<RefEntry> = std::fs::read_dir(self.root.join("refs"))
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| std::fs::read(e.path()).ok())
            .filter_map(|t| serde_json::from_slice(&t).ok())
            .collect();
        refs.sort_by(|a, b| a.reference.cmp(&b.reference));
        refs
    }

    fn image(&self, digest: &str) -> Result<Image> {
        let record = self.record(digest)?;
        Ok(Image {
            references: self
                .refs()
                .into_iter()
                .filter(|r| r.digest == digest)
                .map(|r| r.reference)
                .collect(),
            digest: record.digest,
            size_bytes: record.size_bytes,
            created_at: record.created_at,
            config: record.config,
        })
    }

    /// The cached images, newest first.
    pub fn list(&self) -> Result<Vec<Image>> {
        let mut images = Vec::new();
        for entry in std::fs::read_dir(self.root.join("images"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Ok(image) = self.image(&format!("sha256:{name}")) {
                images.push(image);
            }
        }
        images.sort_by(|a, b| {
            b.created_at
                .cmp(&a.created_at)
                .then(a.digest.cmp(&b.digest))
        });
        Ok(images)
    }

    /// The image `name` names (a reference pulled or loaded before, `REPO@sha256:...`, or a
    /// bare digest) and its unpacked tree.
    pub fn resolve(&self, name: &str) -> Result<(Image, PathBuf)> {
        let digest = if name.starts_with("sha256:") {
            hex_of(name)?;
            name.to_owned()
        } else {
            let parsed = parse_reference(name)?;
            match parsed.digest() {
                Some(d) => d.to_owned(),
                None => {
                    let whole = parsed.whole();
                    let text = std::fs::read(self.ref_path(&whole)).map_err(|_| {
                        Error::NotFound(format!(
                            "no image {whole} in mvm's image cache: pull it first (`mvm pull \
                             {name}`, POST /v1/images) or load it (`mvm load`)"
                        ))
                    })?;
                    let entry: RefEntry = serde_json::from_slice(&text)
                        .map_err(|e| Error::host("reading the image reference", e))?;
                    entry.digest
                }
            }
        };
        let image = self.image(&digest)?;
        Ok((image, self.image_dir(&digest)?.join("rootfs")))
    }

    /// What a sandbox made from image `name` records: the image, and the uid and gid of its
    /// `User` from its own /etc/passwd and /etc/group.
    pub fn sandbox_image(&self, name: &str) -> Result<(SandboxImage, PathBuf)> {
        let (image, tree) = self.resolve(name)?;
        let (uid, gid) = resolve_user(&tree, image.config.user.as_deref().unwrap_or(""))?;
        let reference = if name.starts_with("sha256:") {
            image
                .references
                .first()
                .cloned()
                .unwrap_or_else(|| image.digest.clone())
        } else {
            parse_reference(name)?.whole()
        };
        Ok((
            SandboxImage {
                reference,
                digest: image.digest,
                config: image.config,
                uid,
                gid,
            },
            tree,
        ))
    }
}

/// The run configuration of a config blob; an image for another platform is refused.
fn parse_config(blob: &[u8], digest: &str) -> Result<ImageConfig> {
    let parsed: ConfigBlob = serde_json::from_slice(blob).map_err(|e| {
        Error::Invalid(format!("image {digest}: its config is not valid JSON: {e}"))
    })?;
    if (!parsed.os.is_empty() && parsed.os != "linux")
        || (!parsed.architecture.is_empty() && parsed.architecture != "amd64")
    {
        return Err(Error::Invalid(format!(
            "image {digest}: unsupported platform {}/{}: mvm runs linux/amd64 images",
            parsed.os, parsed.architecture
        )));
    }
    let c = parsed.config.unwrap_or_default();
    Ok(ImageConfig {
        env: c.env.unwrap_or_default(),
        working_dir: c.working_dir.filter(|w| !w.is_empty()),
        user: c.user.filter(|u| !u.is_empty()),
        entrypoint: c.entrypoint.unwrap_or_default(),
        cmd: c.cmd.unwrap_or_default(),
    })
}

/// Reads `rel` of the image tree `tree` when neither it nor a directory on the way is a
/// symbolic link (an image's /etc/passwd must not make mvm read a host file).
fn read_in_tree(tree: &Path, rel: &str) -> Option<String> {
    let mut path = tree.to_path_buf();
    for c in Path::new(rel).components() {
        path.push(c);
        if path.symlink_metadata().ok()?.file_type().is_symlink() {
            return None;
        }
    }
    let meta = path.symlink_metadata().ok()?;
    (meta.is_file() && meta.len() < (4 << 20))
        .then(|| std::fs::read_to_string(&path).ok())
        .flatten()
}

/// The uid and gid of an image's `User` (`name`, `uid`, `name:group`, `uid:gid`).
pub fn resolve_user(tree: &Path, user: &str) -> Result<(u32, u32)> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (who, group) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let passwd = read_in_tree(tree, "etc/passwd").unwrap_or_default();
    let field = |line: &str, i: usize| line.split(':').nth(i).map(str::to_owned);
    let entry = passwd
        .lines()
        .find(|l| field(l, 0).as_deref() == Some(who) || field(l, 2).as_deref() == Some(who));
    let uid = match who.parse::<u32>() {
        Ok(n) => n,
        Err(_) => entry
            .and_then(|l| field(l, 2))
            .and_then(|u| u.parse().ok())
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "the image's user {who:?} is not in its /etc/passwd"
                ))
            })?,
    };
    let gid = match group {
        None => entry
            .and_then(|l| field(l, 3))
            .and_then(|g| g.parse().ok())
            .unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => read_in_tree(tree, "etc/group")
                .unwrap_or_default()
                .lines()
                .find(|l| field(l, 0).as_deref() == Some(g))
                .and_then(|l| field(l, 2))
                .and_then(|g| g.parse().ok())
                .ok_or_else(|| {
                    Error::Invalid(format!("the image's group {g:?} is not in its /etc/group"))
                })?,
        },
    };
    Ok((uid, gid))
}
