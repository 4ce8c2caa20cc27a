//! Extractors that answer bad input with the API's JSON errors (400/401/422), never a bare
//! text body or a 500.

use axum::body::{Body, Bytes};
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use super::AppState;
use crate::error::ApiError;
use mvm_sandbox::db::Tenant;
use mvm_sandbox::{Error, ErrorBody};

/// The bearer token of a request, if it has one.
pub fn token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The tenant authenticated by `Authorization: Bearer <token>`.
pub struct Auth(pub Tenant);

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = token(&parts.headers).ok_or(ApiError(Error::Unauthorized))?;
        state
            .manager
            .db()
            .tenant_for_token(token)?
            .map(Auth)
            .ok_or(ApiError(Error::Unauthorized))
    }
}

/// An authenticated tenant with the `admin` flag, for calls that change what every tenant
/// shares (templates). No or a bad token is 401; another tenant's token is 403.
pub struct Admin(pub Tenant);

impl FromRequestParts<AppState> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Response> {
        let Auth(tenant) = Auth::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        if tenant.admin {
            return Ok(Admin(tenant));
        }
        let body = ErrorBody {
            code: "forbidden".into(),
            message: format!(
                "this call needs an admin tenant's token (templates are shared by every tenant); \
                 tenant '{}' is not an admin: use the token mvmd writes to its state directory, \
                 or one of a tenant made with `mvmd tenant create NAME --admin`",
                tenant.name
            ),
        };
        Err((StatusCode::FORBIDDEN, axum::Json(body)).into_response())
    }
}

/// A JSON body; syntax errors are 400, wrong fields or types 422, a body past mvmd's limit
/// 413.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(super::body::json_too_large(&state.manager.config().bounds).into())
            }
            Err(JsonRejection::JsonDataError(e)) => Err(Error::Invalid(e.body_text()).into()),
            Err(JsonRejection::JsonSyntaxError(e)) => Err(Error::BadRequest(e.body_text()).into()),
            Err(JsonRejection::MissingJsonContentType(_)) => Err(Error::BadRequest(
                "send the body as JSON with `Content-Type: application/json`".into(),
            )
            .into()),
            Err(e) => Err(Error::BadRequest(e.body_text()).into()),
        }
    }
}

/// A JSON body that may be left out: an empty body is `T::default()` (whatever its
/// `Content-Type`); anything else is read as [`ApiJson`].
pub struct ApiJsonOrDefault<T>(pub T);

impl<T: DeserializeOwned + Default> FromRequest<AppState> for ApiJsonOrDefault<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        let bytes = match Bytes::from_request(Request::from_parts(parts.clone(), body), state).await
        {
            Ok(bytes) => bytes,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                return Err(super::body::json_too_large(&state.manager.config().bounds).into())
            }
            Err(e) => return Err(Error::BadRequest(e.body_text()).into()),
        };
        if bytes.is_empty() {
            return Ok(ApiJsonOrDefault(T::default()));
        }
        ApiJson::from_request(Request::from_parts(parts, Body::from(bytes)), state)
            .await
            .map(|ApiJson(v)| ApiJsonOrDefault(v))
    }
}

/// A query string; anything wrong in it is 400.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| ApiQuery(q.0))
            .map_err(|e: QueryRejection| ApiError(Error::BadRequest(e.body_text())))
    }
}

/// A path parameter; anything wrong in it (e.g. invalid UTF-8) is 400.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| ApiError(Error::BadRequest(e.body_text())))
    }
}
