//! envd's `/files`: `GET ?path=` streams a file out of the sandbox; `POST ?path=` writes one
//! from an `application/octet-stream` body or each `file` part of a `multipart/form-data`
//! body (the part's file name is its path when the query has none), making missing parent
//! directories. Both go through the agent's file requests, uploads counted against
//! `MVM_UPLOAD_LIMIT` as they stream.

use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use futures_util::Stream;
use serde::{Deserialize, Serialize};

use super::Target;
use crate::e2b::{E2bError, E2bQuery, E2bState};
use crate::server::body::UploadLimit;

/// Query of both routes (`username` is accepted and ignored: every file operation acts as
/// the sandbox's user).
#[derive(Debug, Deserialize)]
pub struct FilesQuery {
    path: Option<String>,
}

/// One written file, as envd answers.
#[derive(Serialize)]
pub struct Written {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    path: String,
}

fn path_of(path: Option<&str>) -> Result<String, E2bError> {
    let path = path.ok_or_else(|| E2bError::new(StatusCode::BAD_REQUEST, "no path given"))?;
    super::absolute(path).map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, e.message))
}

/// `GET /files?path=`.
pub async fn download(
    State(state): State<E2bState>,
    headers: HeaderMap,
    E2bQuery(q): E2bQuery<FilesQuery>,
) -> Result<Response, E2bError> {
    let target = Target::of(&state, &headers)?;
    let path = path_of(q.path.as_deref())?;
    let client = target.agent(&state).await?;
    Ok(crate::server::download(client, path).await?)
}

/// `POST /files?path=`.
pub async fn upload(
    State(state): State<E2bState>,
    E2bQuery(q): E2bQuery<FilesQuery>,
    req: Request,
) -> Result<axum::Json<Vec<Written>>, E2bError> {
    let target = Target::of(&state, req.headers())?;
    let client = target.agent(&state).await?;
    let limit = UploadLimit::new(&state.manager.config().bounds);
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("multipart/form-data"));
    if !multipart {
        let path = path_of(q.path.as_deref())?;
        let body = req.into_body().into_data_stream();
        return Ok(axum::Json(vec![
            write(&state, &target, &client, &limit, &path, body).await?,
        ]));
    }
    let mut form = axum::extract::Multipart::from_request(req, &state)
        .await
        .map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, e.body_text()))?;
    let mut written = Vec::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, e.body_text()))?
    {
        let path = match &q.path {
            Some(p) => path_of(Some(p))?,
            None => path_of(field.file_name())?,
        };
        written.push(write(&state, &target, &client, &limit, &path, field).await?);
    }
    if written.is_empty() {
        return Err(E2bError::new(
            StatusCode::BAD_REQUEST,
            "no file in the form",
        ));
    }
    Ok(axum::Json(written))
}

/// Writes `data` to `path` (mode 0644), making its parent directories.
async fn write<S, E>(
    state: &E2bState,
    target: &Target,
    client: &agent::AgentClient,
    limit: &UploadLimit,
    path: &str,
    data: S,
) -> Result<Written, E2bError>
where
    S: Stream<Item = Result<axum::body::Bytes, E>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let parent = match path.rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((dir, _)) => dir,
    };
    if client.stat(parent).await.is_err() {
        super::run(state, target, &["mkdir", "-p", "--", parent])
            .await
            .map_err(|e| E2bError::new(StatusCode::BAD_REQUEST, e.message))?;
    }
    let reader = tokio_util::io::StreamReader::new(Box::pin(limit.apply(data)));
    client
        .put_file(path, 0o644, reader)
        .await
        .map_err(|e| E2bError::from(limit.error(e)))?;
    Ok(Written {
        name: path.rsplit('/').next().unwrap_or(path).to_owned(),
        kind: "file",
        path: path.to_owned(),
    })
}
