//! Pulls an image from an OCI/Docker registry with `oci-client`: the manifest (a manifest list
//! or index resolved to linux/amd64; its digest checked against `Docker-Content-Digest` and a
//! reference's own digest by the client), the config and every layer not cached yet (each
//! blob's digest checked as it streams in).

use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};

use super::{metadata_too_large, Fetched, ImageStore, Layer, METADATA_LIMIT};
use crate::bounds::CappedBuffer;
use crate::error::{Error, Result};

/// Credentials for a registry: basic auth, or what a token server takes for a bearer token.
#[derive(Clone)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, ****)", self.username)
    }
}

/// Media types of layers mvm unpacks (tar, gzip-compressed or not).
const LAYER_TYPES: [&str; 4] = [
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.diff.tar",
];

/// Whether `registry` (`host[:port]`) is reached over plain HTTP: a loopback host, as docker
/// does, or one the operator named insecure (by host or by host and port).
pub fn plain_http(registry: &str, insecure: &[String]) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => registry.split(':').next().unwrap_or(""),
    };
    matches!(host, "localhost" | "::1")
        || host.starts_with("127.")
        || insecure.iter().any(|i| i == registry || i == host)
}

impl ImageStore {
    /// Downloads `reference`'s manifest, config and missing layers into the blob cache.
    pub(super) async fn fetch(
        &self,
        reference: &Reference,
        credentials: Option<&Credentials>,
    ) -> Result<Fetched> {
        let registry = reference.resolve_registry().to_owned();
        let protocol = if plain_http(&registry, &self.insecure) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let client = Client::new(ClientConfig {
            protocol,
            platform_resolver: Some(Box::new(oci_client::client::linux_amd64_resolver)),
            ..ClientConfig::default()
        });
        let auth = match credentials {
            Some(c) => RegistryAuth::Basic(c.username.clone(), c.password.clone()),
            None => RegistryAuth::Anonymous,
        };
        let whole = reference.whole();
        let failed = |e| registry_error(&whole, &registry, credentials.is_some(), e);
        // Authenticate first (a token server's answer, when the registry has one), so that
        // refused credentials are reported as such instead of as the anonymous request's 401.
        client
            .auth(reference, &auth, RegistryOperation::Pull)
            .await
            .map_err(failed)?;
        let (manifest, digest) = client
            .pull_image_manifest(reference, &auth)
            .await
            .map_err(failed)?;
        let what = format!("{whole}: the image config {}", manifest.config.digest);
        if manifest.config.size < 0 || manifest.config.size as u64 > METADATA_LIMIT {
            return Err(metadata_too_large(
                &what,
                manifest.config.size.max(0) as u64,
            ));
        }
        // The registry may send more than the manifest says: the buffer holds the limit only.
        let mut config = CappedBuffer::new(METADATA_LIMIT);
        let pulled = client
            .pull_blob(reference, &manifest.config, &mut config)
            .await;
        if config.overflowed {
            return Err(metadata_too_large(&what, config.received));
        }
        pulled.map_err(failed)?;
        let config = config.data;
        let mut layers = Vec::new();
        for descriptor in &manifest.layers {
            if !LAYER_TYPES.contains(&descriptor.media_type.as_str()) {
                return Err(Error::Invalid(format!(
                    "{whole}: layer {} has media type {}, which mvm does not unpack (it takes \
                     tar and tar+gzip layers)",
                    descriptor.digest, descriptor.media_type
                )));
            }
            let path = self.blob_path(&descriptor.digest)?;
            if !path.is_file() {
                let partial = self.partial_blob()?;
                let file = tokio::fs::File::create(&partial)
                    .await
                    .map_err(|e| Error::host(format!("creating {}", partial.display()), e))?;
                let pulled = client
                    .pull_blob(reference, descriptor, file)
                    .await
                    .map_err(failed);
                let placed = pulled.and_then(|()| {
                    std::fs::rename(&partial, &path)
                        .map_err(|e| Error::host(format!("storing {}", path.display()), e))
                });
                if let Err(e) = placed {
                    let _ = std::fs::remove_file(&partial);
                    return Err(e);
                }
            }
            layers.push(Layer {
                digest: descriptor.digest.clone(),
                size: descriptor.size.max(0) as u64,
            });
        }
        Ok(Fetched {
            digest,
            config,
            layers,
        })
    }
}

/// At most 200 characters of what a registry or token server said.
fn excerpt(text: &str) -> String {
    let t = text.trim();
    match t.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &t[..i]),
        None => t.to_owned(),
    }
}

/// The error for a registry's (or its token server's) refusal: `detail` is what it said.
fn refused(reference: &str, registry: &str, with_credentials: bool, detail: &str) -> Error {
    let detail = excerpt(detail);
    if with_credentials {
        Error::Forbidden(format!(
            "{reference}: the registry {registry} refused the credentials ({detail}): give a \
             user name and password that may pull it"
        ))
    } else {
        Error::Forbidden(format!(
            "{reference}: the registry {registry} needs credentials to pull it ({detail}): give \
             a user name and password (`mvm pull -u USER`, or `username` and `password` in \
             POST /v1/images)"
        ))
    }
}

/// A registry failure as an error a user can act on.
fn registry_error(
    reference: &str,
    registry: &str,
    with_credentials: bool,
    e: OciDistributionError,
) -> Error {
    match e {
        OciDistributionError::ImageManifestNotFoundError(why) => Error::Invalid(format!(
            "{reference}: unsupported platform: the image has no linux/amd64 variant ({why})"
        )),
        OciDistributionError::RegistryError { envelope, .. } => {
            let text = envelope.to_string();
            // The envelope prints the registry's messages ("manifest unknown", ...).
            let lower = text.to_lowercase();
            if lower.contains("manifest unknown") || lower.contains("name unknown") {
                Error::NotFound(format!(
                    "{reference}: the registry {registry} has no such image or tag ({text})"
                ))
            } else if lower.contains("unauthorized") || lower.contains("denied") {
                refused(reference, registry, with_credentials, &text)
            } else {
                Error::Host(format!("{reference}: registry {registry}: {text}"))
            }
        }
        OciDistributionError::AuthenticationFailure(said) => {
            refused(reference, registry, with_credentials, &said)
        }
        OciDistributionError::UnauthorizedError { .. } => {
            refused(reference, registry, with_credentials, &e.to_string())
        }
        OciDistributionError::DigestError(d) => Error::Invalid(format!(
            "{reference}: digest mismatch: what the registry {registry} sent is not what was \
             asked for ({d}); nothing was cached"
        )),
        OciDistributionError::ServerError { code: 404, .. } => Error::NotFound(format!(
            "{reference}: the registry {registry} has no such image or tag ({e})"
        )),
        OciDistributionError::RequestError(r) => Error::Host(format!(
            "{reference}: cannot reach the registry {registry}: {r} (a registry serving plain \
             HTTP must be named with --insecure-registry or MVM_INSECURE_REGISTRIES)"
        )),
        other => Error::Host(format!("{reference}: registry {registry}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_and_named_registries_are_plain_http() {
        let insecure = vec!["reg.lan:5000".to_owned(), "other.lan".to_owned()];
        for r in [
            "localhost:5000",
            "127.0.0.1:5000",
            "[::1]:5000",
            "reg.lan:5000",
            "other.lan:1",
        ] {
            assert!(plain_http(r, &insecure), "{r}");
        }
        for r in [
            "docker.io",
            "reg.lan:5001",
            "localhost.example.com",
            "10.0.0.1:5000",
        ] {
            assert!(!plain_http(r, &insecure), "{r}");
        }
    }
}
