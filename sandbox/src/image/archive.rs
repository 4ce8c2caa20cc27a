//! `mvm load`: images from a `docker save` tarball (`manifest.json`: each image's config,
//! layers and `RepoTags`) or an OCI image layout archive (`index.json` and
//! `blobs/sha256/*`, each blob checked against its name). The archive's files are copied out
//! (regular files at relative paths without `..`; symbolic links resolved inside the archive
//! only) into a private staging directory, then each image is committed like a pulled one.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::unpack::relative;
use super::{hex_of, mkdir_private, read_metadata, sha256_hex, Fetched, ImageStore, Layer};
use crate::error::{Error, Result};
use crate::model::Image;

/// An entry of a `docker save` `manifest.json`.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SavedImage {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
    #[serde(default)]
    annotations: HashMap<String, String>,
}

#[derive(Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

/// An OCI manifest or index (the fields mvm reads).
#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// The archive's files, copied out.
struct Extracted {
    dir: PathBuf,
    /// In-archive symbolic links: path → target path (both relative to the archive's root).
    links: HashMap<PathBuf, PathBuf>,
}

impl Extracted {
    /// The file at `rel` in the archive (links followed inside the archive, at most 8).
    fn path(&self, rel: &str) -> Result<PathBuf> {
        let mut p = relative(rel.as_bytes())
            .map_err(|why| Error::Invalid(format!("archive path {rel:?} {why}")))?;
        for _ in 0..8 {
            match self.links.get(&p) {
                Some(target) => p = target.clone(),
                None => {
                    let full = self.dir.join(&p);
                    return if full.is_file() {
                        Ok(full)
                    } else {
                        Err(Error::Invalid(format!("the archive has no file {rel}")))
                    };
                }
            }
        }
        Err(Error::Invalid(format!(
            "archive path {rel} is a loop of links"
        )))
    }

    /// Whether the archive has a file at `rel`.
    fn has(&self, rel: &str) -> bool {
        self.path(rel).is_ok()
    }

    /// The JSON document at `rel` (at most [`super::METADATA_LIMIT`] bytes).
    fn read(&self, rel: &str) -> Result<Vec<u8>> {
        read_metadata(&self.path(rel)?, &format!("the archive's {rel}"))
    }

    /// The blob `digest` of an OCI layout, checked against its digest.
    fn blob(&self, digest: &str) -> Result<PathBuf> {
        let hex = hex_of(digest)?;
        let p = self.path(&format!("blobs/sha256/{hex}"))?;
        if file_sha256(&p)? != hex {
            return Err(Error::Invalid(format!(
                "digest mismatch: the archive's blob {digest} has other content; nothing was loaded"
            )));
        }
        Ok(p)
    }
}

fn file_sha256(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::host(format!("opening {}", path.display()), e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(|e| Error::host(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Copies the regular files and links of `archive` under `dir`.
fn extract(archive: impl Read, dir: &Path) -> Result<Extracted> {
    let mut links = HashMap::new();
    let mut tar = tar::Archive::new(archive);
    let bad = |e: std::io::Error| Error::Invalid(format!("the archive is not a tar file: {e}"));
    for entry in tar.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let raw = entry.path_bytes().into_owned();
        let rel = relative(&raw).map_err(|why| {
            Error::Invalid(format!(
                "archive entry {:?} {why}",
                String::from_utf8_lossy(&raw)
            ))
        })?;
        if rel.as_os_str().is_empty() {
            continue;
        }
        match entry.header().entry_type() {
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let dest = dir.join(&rel);
                if let Some(parent) = dest.parent() {
                    mkdir_private(parent)?;
                }
                let mut out = std::fs::File::create(&dest)
                    .map_err(|e| Error::host(format!("writing {}", dest.display()), e))?;
                std::io::copy(&mut entry, &mut out).map_err(|e| {
                    Error::host(format!("writing {} (is the disk full?)", dest.display()), e)
                })?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().unwrap_or_default().into_owned();
                let joined = rel
                    .parent()
                    .unwrap_or(Path::new(""))
                    .join(std::ffi::OsStr::from_bytes(&target));
                links.insert(rel, normalize(&joined)?);
            }
            _ => {}
        }
    }
    Ok(Extracted {
        dir: dir.to_owned(),
        links,
    })
}

/// `..` resolved lexically inside the archive; climbing above its root is refused.
fn normalize(p: &Path) -> Result<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::ParentDir => {
                if !out.pop() {
                    return Err(Error::Invalid(format!(
                        "archive link {} points out of the archive",
                        p.display()
                    )));
                }
            }
            std::path::Component::CurDir => {}
            _ => {
                return Err(Error::Invalid(format!(
                    "archive link {} is absolute",
                    p.display()
                )))
            }
        }
    }
    Ok(out)
}

impl ImageStore {
    /// [`ImageStore::load`] of an archive read from `reader` (an upload), which is first
    /// written to the cache's disk.
    pub async fn load_stream(
        &self,
        mut reader: impl tokio::io::AsyncRead + Unpin,
    ) -> Result<Vec<Image>> {
        let upload = self.partial_blob()?;
        let written = async {
            let mut file = tokio::fs::File::create(&upload)
                .await
                .map_err(|e| Error::host(format!("creating {}", upload.display()), e))?;
            tokio::io::copy(&mut reader, &mut file)
                .await
                .map_err(|e| Error::host("receiving the image archive", e))?;
            Ok::<_, Error>(())
        }
        .await;
        let store = self.clone();
        let path = upload.clone();
        let loaded = match written {
            Ok(()) => {
                crate::manager::blocking(move || {
                    let file = std::fs::File::open(&path)
                        .map_err(|e| Error::host(format!("opening {}", path.display()), e))?;
                    store.load(file)
                })
                .await
            }
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&upload);
        loaded
    }

    /// Loads every image of the `docker save` or OCI layout archive `archive` (gzip or not)
    /// and returns them.
    pub fn load(&self, archive: impl Read) -> Result<Vec<Image>> {
        let lock = self.lock()?;
        let staging = self
            .root
            .join(format!(".tmp-load-{}", crate::db::random_hex(8)?));
        mkdir_private(&staging)?;
        let loaded = self.load_from(archive, &staging);
        let _ = crate::manager::host::remove_tree(&staging);
        drop(lock);
        loaded
    }

    fn load_from(&self, archive: impl Read, staging: &Path) -> Result<Vec<Image>> {
        let mut archive = std::io::BufReader::new(archive);
        let magic = std::io::BufRead::fill_buf(&mut archive)
            .map_err(|e| Error::host("reading the archive", e))?;
        let extracted = if magic.starts_with(&[0x1f, 0x8b]) {
            extract(flate2::read::GzDecoder::new(archive), staging)?
        } else {
            extract(archive, staging)?
        };
        let mut images = Vec::new();
        let mut fetched = Vec::new();
        if extracted.has("manifest.json") {
            let text = extracted.read("manifest.json")?;
            let saved: Vec<SavedImage> = serde_json::from_slice(&text).map_err(|e| {
                Error::Invalid(format!(
                    "the archive's manifest.json is not docker save's: {e}"
                ))
            })?;
            for image in saved {
                let config = extracted.read(&image.config)?;
                let mut layers = Vec::new();
                for l in &image.layers {
                    layers.push(extracted.path(l)?);
                }
                let refs = image.repo_tags.unwrap_or_default();
                fetched.push((config, layers, refs));
            }
        } else if extracted.has("index.json") {
            let text = extracted.read("index.json")?;
            let index: Manifest = serde_json::from_slice(&text)
                .map_err(|e| Error::Invalid(format!("the archive's index.json: {e}")))?;
            for entry in &index.manifests {
                let refs: Vec<String> = entry
                    .annotations
                    .get("io.containerd.image.name")
                    .into_iter()
                    .cloned()
                    .collect();
                let manifest = self.platform_manifest(&extracted, entry)?;
                let config_digest = &manifest
                    .config
                    .as_ref()
                    .ok_or_else(|| Error::Invalid("an archive manifest without a config".into()))?
                    .digest;
                let config = read_metadata(
                    &extracted.blob(config_digest)?,
                    &format!("the image config {config_digest}"),
                )?;
                let mut layers = Vec::new();
                for l in &manifest.layers {
                    layers.push(extracted.blob(&l.digest)?);
                }
                fetched.push((config, layers, refs));
            }
        } else {
            return Err(Error::Invalid(
                "the archive has neither manifest.json (docker save) nor index.json (OCI image \
                 layout)"
                    .into(),
            ));
        }
        for (config, layer_files, refs) in fetched {
            let refs = refs
                .iter()
                .map(|r| super::parse_reference(r).map(|p| p.whole()))
                .collect::<Result<Vec<_>>>()?;
            let mut layers = Vec::new();
            let mut descriptors = Vec::new();
            for file in layer_files {
                let hex = file_sha256(&file)?;
                let digest = format!("sha256:{hex}");
                let size = file.metadata().map(|m| m.len()).unwrap_or(0);
                let blob = self.blob_path(&digest)?;
                if !blob.is_file() {
                    mkdir_private(blob.parent().expect("blobs dir"))?;
                    std::fs::copy(&file, &blob)
                        .map_err(|e| Error::host(format!("storing {}", blob.display()), e))?;
                }
                descriptors.push(serde_json::json!({
                    "mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": digest, "size": size,
                }));
                layers.push(Layer { digest, size });
            }
            // The image's identity: the digest of an OCI manifest of its config and layers.
            let manifest = serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": format!("sha256:{}", sha256_hex(&config)), "size": config.len(),
                },
                "layers": descriptors,
            });
            let digest = format!("sha256:{}", sha256_hex(manifest.to_string().as_bytes()));
            images.push(self.commit_locked(
                Fetched {
                    digest,
                    config,
                    layers,
                },
                &refs,
            )?);
        }
        Ok(images)
    }

    /// The linux/amd64 image manifest `entry` names (itself, or its index's entry).
    fn platform_manifest(&self, extracted: &Extracted, entry: &Descriptor) -> Result<Manifest> {
        let read = |digest: &str| -> Result<Manifest> {
            let text = read_metadata(
                &extracted.blob(digest)?,
                &format!("archive manifest {digest}"),
            )?;
            serde_json::from_slice(&text)
                .map_err(|e| Error::Invalid(format!("archive manifest {digest}: {e}")))
        };
        let manifest = read(&entry.digest)?;
        if manifest.manifests.is_empty() {
            return Ok(manifest);
        }
        let chosen = manifest
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == "linux" && p.architecture == "amd64")
            })
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unsupported platform: the archive's image {} has no linux/amd64 variant",
                    entry.digest
                ))
            })?;
        if chosen.media_type.contains("index") || chosen.media_type.contains("list") {
            return Err(Error::Invalid(
                "the archive nests image indexes more than one deep".into(),
            ));
        }
        read(&chosen.digest)
    }
}
