//! `/v1/images`: OCI images as sandbox file systems. Images are shared by every tenant, like
//! templates, so adding one (a pull, a load) is an admin's call: a reference names the same
//! image for everyone, so a tenant that could pull or load would choose what other tenants'
//! `alpine:3.20` is (a loaded archive names any reference it likes), would share an image its
//! private-registry credentials gave it with tenants that have none, and would fill the host's
//! disk. Every tenant may list the images and create sandboxes from them.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;

use super::{audit_event, body, Admin, ApiJson, AppState, Auth};
use crate::error::Result;
use mvm_sandbox::image::Credentials;
use mvm_sandbox::model::{Image, ImageList, PrunedImages, PullImage, RemovedImage};
use mvm_sandbox::{Error, ErrorBody};

/// Images in mvmd's cache, newest first.
#[utoipa::path(get, path = "/v1/images", tag = "images",
    responses((status = 200, body = ImageList), (status = 401, body = ErrorBody)))]
pub(super) async fn list_images(
    State(state): State<AppState>,
    Auth(_tenant): Auth,
) -> Result<Json<ImageList>> {
    Ok(Json(ImageList {
        images: state.manager.images().list()?,
    }))
}

/// Pull an image from its registry (HTTPS; plain HTTP for loopback registries and those in
/// `MVM_INSECURE_REGISTRIES`) into the cache: a manifest list is resolved to linux/amd64,
/// every digest is checked, layers already cached are not fetched again, and the layers are
/// unpacked once into the read-only tree sandboxes get (`image` in `POST /v1/sandboxes`).
/// Credentials are used for this pull only. Images are shared: this needs an admin token.
#[utoipa::path(post, path = "/v1/images", tag = "images", request_body = PullImage,
    responses((status = 201, body = Image), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "not an admin token, or the registry refused the credentials"),
        (status = 404, body = ErrorBody, description = "the registry has no such image or tag"),
        (status = 422, body = ErrorBody, description = "bad reference, digest mismatch, unsupported platform or layer"),
        (status = 500, body = ErrorBody, description = "the registry is unreachable, or the disk is full")))]
pub(super) async fn pull_image(
    State(state): State<AppState>,
    Admin(tenant): Admin,
    ApiJson(req): ApiJson<PullImage>,
) -> Result<(StatusCode, Json<Image>)> {
    let credentials = match (req.username, req.password) {
        (Some(username), Some(password)) => Some(Credentials { username, password }),
        (None, None) => None,
        _ => {
            return Err(Error::Invalid("give both username and password, or neither".into()).into())
        }
    };
    let image = state
        .manager
        .images()
        .pull(&req.reference, credentials.as_ref())
        .await?;
    audit_event(&state, &tenant, "image pulled", &image.digest);
    Ok((StatusCode::CREATED, Json(image)))
}

/// Load the images of a `docker save` tarball or an OCI image layout archive (gzip or not;
/// the request body, up to `MVM_UPLOAD_LIMIT`) into the cache under the references the
/// archive names (`RepoTags`, `io.containerd.image.name`); layers are unpacked like a pull's.
/// An archive names any reference it likes: this needs an admin token.
#[utoipa::path(post, path = "/v1/images/load", tag = "images",
    request_body(content = Vec<u8>, content_type = "application/x-tar"),
    responses((status = 201, body = ImageList), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "not an admin token"),
        (status = 413, body = ErrorBody),
        (status = 422, body = ErrorBody, description = "not an image archive, a digest mismatch, an unsupported platform or a hostile layer")))]
pub(super) async fn load_images(
    State(state): State<AppState>,
    Admin(tenant): Admin,
    archive: Body,
) -> Result<(StatusCode, Json<ImageList>)> {
    let limit = body::UploadLimit::new(&state.manager.config().bounds);
    let reader = tokio_util::io::StreamReader::new(limit.apply(archive.into_data_stream()));
    let images = state
        .manager
        .images()
        .load_stream(reader)
        .await
        .map_err(|e| limit.error(e))?;
    for image in &images {
        audit_event(&state, &tenant, "image loaded", &image.digest);
    }
    Ok((StatusCode::CREATED, Json(ImageList { images })))
}

/// Remove an image from the cache, as `docker rmi` does: a reference (`alpine:3.20`) is
/// untagged and its image removed when no other reference names it; a digest (`sha256:…`,
/// `REPO@sha256:…`) loses all its references and is removed. Layers no image uses any more
/// are removed too. An image any sandbox uses is kept: 409 naming the sandboxes. Images are
/// shared: this needs an admin token.
#[utoipa::path(delete, path = "/v1/images/{name}", tag = "images",
    params(("name" = String, Path, description = "a reference or digest; slashes as they are")),
    responses((status = 200, body = RemovedImage), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "not an admin token"),
        (status = 404, body = ErrorBody, description = "no such image in the cache"),
        (status = 409, body = ErrorBody, description = "a sandbox uses the image"),
        (status = 422, body = ErrorBody, description = "not a reference or digest")))]
pub(super) async fn remove_image(
    State(state): State<AppState>,
    Admin(tenant): Admin,
    Path(name): Path<String>,
) -> Result<Json<RemovedImage>> {
    let removed = state.manager.remove_image(&name).await?;
    let what = removed.deleted.clone().unwrap_or_else(|| name.clone());
    audit_event(&state, &tenant, "image removed", &what);
    Ok(Json(removed))
}

/// Remove every image of the cache that no sandbox uses, with all its references, and the
/// layers no image uses any more, as `docker image prune -a` does. Images are shared: this
/// needs an admin token.
#[utoipa::path(post, path = "/v1/images/prune", tag = "images",
    responses((status = 200, body = PrunedImages), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "not an admin token")))]
pub(super) async fn prune_images(
    State(state): State<AppState>,
    Admin(tenant): Admin,
) -> Result<Json<PrunedImages>> {
    let pruned = state.manager.prune_images().await?;
    for digest in &pruned.deleted {
        audit_event(&state, &tenant, "image removed", digest);
    }
    Ok(Json(pruned))
}
