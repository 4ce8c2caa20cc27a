//! `mvmd`'s HTTP surface: the versioned JSON API under `/v1`, `/healthz`, `/metrics` and the
//! OpenAPI document at `/openapi.json`, generated from the handlers below.

pub(crate) mod body;
pub(crate) mod exec;
mod extract;
mod images;
mod port_proxy;
pub mod templates;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, delete};
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{ApiError, Result};
pub(crate) use extract::token;
pub use extract::{Admin, ApiJson, ApiJsonOrDefault, ApiPath, ApiQuery, Auth};
use mvm_sandbox::db::Tenant;
use mvm_sandbox::manager::Manager;
use mvm_sandbox::model::*;
use mvm_sandbox::{Error, ErrorBody};
use templates::TemplateDirs;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    /// The sandbox manager.
    pub manager: Manager,
    /// Where registered templates' files must lie.
    pub templates: Arc<TemplateDirs>,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "mvmd", description = "mvm sandbox API: micro-VM (vm) or jailed-process (jail) sandboxes."),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    components(schemas(ErrorBody, ExecEvent, WsControl)),
    paths(port_proxy::proxy, images::remove_image)
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The router and the OpenAPI document describing exactly its routes.
pub fn router(manager: Manager, templates: TemplateDirs) -> (Router, utoipa::openapi::OpenApi) {
    let state = AppState {
        manager,
        templates: Arc::new(templates),
    };
    let (router, mut doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(create_sandbox, list_sandboxes))
        .routes(routes!(get_sandbox, delete_sandbox))
        .routes(routes!(exec::exec))
        .routes(routes!(exec::exec_ws))
        .routes(routes!(put_file, get_file))
        .routes(routes!(pause))
        .routes(routes!(resume))
        .routes(routes!(keepalive))
        .routes(routes!(update_network))
        .routes(routes!(fork))
        .routes(routes!(create_snapshot))
        .routes(routes!(list_snapshots))
        .routes(routes!(get_snapshot, delete_snapshot))
        .routes(routes!(logs))
        .routes(routes!(stats))
        .routes(routes!(list_templates, create_template))
        .routes(routes!(warm_template))
        .routes(routes!(images::list_images, images::pull_image))
        .routes(routes!(images::load_images))
        .routes(routes!(images::prune_images))
        // A reference has slashes (`docker.io/library/alpine:3.20`).
        .route("/v1/images/{*name}", delete(images::remove_image))
        // Any method, any path after the port (the document names it `{path}`).
        .route("/v1/sandboxes/{id}/ports/{port}", any(port_proxy::proxy))
        .route("/v1/sandboxes/{id}/ports/{port}/", any(port_proxy::proxy))
        .route(
            "/v1/sandboxes/{id}/ports/{port}/{*path}",
            any(port_proxy::proxy),
        )
        .routes(routes!(metrics))
        .routes(routes!(healthz))
        .routes(routes!(openapi_json))
        .with_state(state.clone())
        .split_for_parts();
    doc.info.version = env!("CARGO_PKG_VERSION").into();
    let shared = Arc::new(doc.clone());
    let router = router
        .layer(axum::Extension(shared))
        .fallback(|| async {
            ApiError::from(Error::NotFound("no such route; see /openapi.json".into()))
        })
        .method_not_allowed_fallback(|| async {
            (
                StatusCode::METHOD_NOT_ALLOWED,
                Json(ErrorBody {
                    code: "method_not_allowed".into(),
                    message: "this route does not take that method; see /openapi.json".into(),
                }),
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(
            state.manager.config().bounds.request_body,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            body::limit,
        ))
        .layer(axum::middleware::from_fn_with_state(state.clone(), audit))
        // MCP over streamable HTTP: rmcp's transport with its own body limit.
        .merge(crate::mcp::router(state.clone()))
        // E2B's surface: its own error shape, body limits and audit records.
        .nest("/e2b", crate::e2b::router(state.manager));
    (router, doc)
}

/// Whether a call goes in the audit log: every method but GET, HEAD and OPTIONS, and the
/// websocket exec, a GET that runs a command.
fn audited(method: &Method, path: &str) -> bool {
    let ws_exec = matches!(
        path.split('/').collect::<Vec<_>>().as_slice(),
        ["", "v1", "sandboxes", _, "exec", "ws"]
    );
    ws_exec || !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Records every mutating call in the audit log: who, what, on which target, with what result
/// (a websocket exec that started: 101).
async fn audit(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if !audited(req.method(), req.uri().path()) {
        return next.run(req).await;
    }
    let tenant = extract::token(req.headers())
        .and_then(|t| state.manager.db().tenant_for_token(t).ok().flatten())
        .map_or_else(|| "-".to_owned(), |t| t.name);
    let action = format!("{} {}", req.method(), req.uri().path());
    let target = req.uri().path().split('/').nth(3).unwrap_or("").to_owned();
    // A sandbox create answers with the new id only in its body; the path has no target.
    run_audited(&state.manager, &tenant, &action, &target, req, next).await
}

/// Runs `req` and records it in the audit log: `tenant` did `action` to `target`, with the
/// answer's status.
pub(crate) async fn run_audited(
    manager: &Manager,
    tenant: &str,
    action: &str,
    target: &str,
    req: Request,
    next: Next,
) -> Response {
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    if let Err(e) = manager.db().audit(tenant, action, target, status, "") {
        tracing::error!("writing the audit log: {e}");
    }
    resp
}

/// Records what a call did to `target`, next to the middleware's record of the call.
fn audit_event(state: &AppState, tenant: &Tenant, action: &str, id: &str) {
    if let Err(e) = state.manager.db().audit(&tenant.name, action, id, 200, "") {
        tracing::error!("writing the audit log: {e}");
    }
}

/// Create a sandbox and wait until it is ready.
#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", request_body = CreateSandbox,
    responses((status = 201, body = Sandbox), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
        (status = 422, body = ErrorBody), (status = 429, body = ErrorBody)))]
async fn create_sandbox(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiJson(req): ApiJson<CreateSandbox>,
) -> Result<(StatusCode, Json<Sandbox>)> {
    let sandbox = state.manager.create(&tenant, req).await?;
    audit_event(&state, &tenant, "created", &sandbox.id);
    Ok((StatusCode::CREATED, Json(sandbox)))
}

/// List the caller's sandboxes.
#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes",
    responses((status = 200, body = SandboxList), (status = 401, body = ErrorBody)))]
async fn list_sandboxes(
    State(state): State<AppState>,
    Auth(tenant): Auth,
) -> Result<Json<SandboxList>> {
    Ok(Json(SandboxList {
        sandboxes: state.manager.list(Some(&tenant.name))?,
    }))
}

/// One sandbox.
#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path)),
    responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody)))]
async fn get_sandbox(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Sandbox>> {
    Ok(Json(state.manager.get(&tenant.name, &id)?))
}

/// Destroy a sandbox and everything it had on the host.
#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn delete_sandbox(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    state.manager.destroy(&tenant.name, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn file_mode(q: &FileQuery) -> mvm_sandbox::Result<u32> {
    match &q.mode {
        None => Ok(0o644),
        Some(m) => u32::from_str_radix(m, 8)
            .ok()
            .filter(|m| *m <= 0o7777)
            .ok_or_else(|| {
                Error::BadRequest(format!("mode {m:?} is not octal permission bits like 644"))
            }),
    }
}

fn check_path(path: &str) -> mvm_sandbox::Result<()> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(Error::BadRequest(format!("path {path:?} must be absolute")));
    }
    Ok(())
}

/// Write a file in the sandbox (the request body is its content; atomic replace).
#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path), FileQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 200, body = FileWritten), (status = 404, body = ErrorBody), (status = 400, body = ErrorBody)))]
async fn put_file(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<FileQuery>,
    body: Body,
) -> Result<Json<FileWritten>> {
    check_path(&q.path)?;
    let mode = file_mode(&q)?;
    let client = state.manager.agent(&tenant.name, &id).await?;
    let limit = body::UploadLimit::new(&state.manager.config().bounds);
    let reader = tokio_util::io::StreamReader::new(limit.apply(body.into_data_stream()));
    let bytes = client
        .put_file(&q.path, mode, reader)
        .await
        .map_err(|e| limit.error(e))?;
    Ok(Json(FileWritten {
        path: q.path,
        bytes,
    }))
}

/// Read a file from the sandbox (streamed).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files", params(("id" = String, Path), FileQuery),
    responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 404, body = ErrorBody)))]
async fn get_file(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<FileQuery>,
) -> Result<Response> {
    check_path(&q.path)?;
    let client = state.manager.agent(&tenant.name, &id).await?;
    Ok(download(client, q.path).await?)
}

/// A regular file of a sandbox as an `application/octet-stream` answer, read from the agent
/// while the client takes it; any other kind of file is refused (422).
pub(crate) async fn download(
    client: agent::AgentClient,
    path: String,
) -> mvm_sandbox::Result<Response> {
    let stat = client.stat(&path).await?;
    if stat.kind != agent::FileKind::File {
        return Err(Error::Invalid(format!("{path} is not a regular file")));
    }
    let (mut writer, reader) = tokio::io::duplex(256 * 1024);
    tokio::spawn(async move {
        if let Err(e) = client.get_file(&path, &mut writer).await {
            tracing::warn!("streaming {path}: {e}");
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, stat.size.to_string()),
        ],
        Body::from_stream(tokio_util::io::ReaderStream::new(reader)),
    )
        .into_response())
}

/// Pause a sandbox (vm: the VM's vCPUs; jail: cgroup freezer), or with `{"save": true}` save
/// a vm-tier sandbox's VM to disk and stop its VMM (state `saved`: no memory or CPU held). A
/// tenant's saved sandboxes and snapshots hold at most its memory quota in guest memory on
/// the host's disk: a save past it is a 429, the sandbox going on as it was.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes", params(("id" = String, Path)),
    request_body(content = Option<PauseRequest>), responses((status = 200, body = Sandbox),
    (status = 409, body = ErrorBody), (status = 422, body = ErrorBody),
    (status = 429, body = ErrorBody, description = "a save past the guest memory its tenant may keep on the disk")))]
async fn pause(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
    ApiJsonOrDefault(req): ApiJsonOrDefault<PauseRequest>,
) -> Result<Json<Sandbox>> {
    Ok(Json(match req.save {
        true => state.manager.save(&tenant.name, &id).await?,
        false => state.manager.set_paused(&tenant.name, &id, true).await?,
    }))
}

/// Resume a paused or saved sandbox.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes", params(("id" = String, Path)),
    responses((status = 200, body = Sandbox), (status = 409, body = ErrorBody)))]
async fn resume(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Sandbox>> {
    Ok(Json(
        state.manager.set_paused(&tenant.name, &id, false).await?,
    ))
}

/// Extend a sandbox's timeout from now.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/keepalive", tag = "sandboxes", params(("id" = String, Path)),
    request_body = Keepalive, responses((status = 200, body = Sandbox), (status = 404, body = ErrorBody)))]
async fn keepalive(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
    ApiJson(k): ApiJson<Keepalive>,
) -> Result<Json<Sandbox>> {
    Ok(Json(state.manager.keepalive(
        &tenant.name,
        &id,
        k.timeout_s,
    )?))
}

/// Replace the allow list of a running sandbox with egress `allow` (addresses, DNS names,
/// wildcards, each optionally `:PORT`): what it no longer names is closed at once, open
/// connections stay; other egress modes answer 409.
#[utoipa::path(patch, path = "/v1/sandboxes/{id}/network", tag = "sandboxes", params(("id" = String, Path)),
    request_body = NetworkUpdate, responses((status = 200, body = Sandbox), (status = 400, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)))]
async fn update_network(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
    ApiJson(update): ApiJson<NetworkUpdate>,
) -> Result<Json<Sandbox>> {
    Ok(Json(
        state
            .manager
            .update_network(&tenant.name, &id, update)
            .await?,
    ))
}

/// Fork a running, paused or saved vm-tier sandbox into `count` children (default 1, at most
/// 16) that go on from this instant (a saved one's: from its save): its processes, memory and
/// files, each child with its own host name, MAC, address, RNG seed and clock. A running
/// source is paused only while it is saved; the source stays as it was. Children count in the
/// quota; the jail tier answers 422.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", tag = "sandboxes", params(("id" = String, Path)),
    request_body = ForkRequest,
    responses((status = 201, body = ForkAnswer), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the sandbox is being created or destroyed"),
        (status = 422, body = ErrorBody, description = "a jail-tier sandbox, or a bad count"),
        (status = 429, body = ErrorBody)))]
async fn fork(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ForkRequest>,
) -> Result<(StatusCode, Json<ForkAnswer>)> {
    let sandboxes = state
        .manager
        .fork(&tenant, &id, req.count.unwrap_or(1))
        .await?;
    Ok((StatusCode::CREATED, Json(ForkAnswer { sandboxes })))
}

/// Take a snapshot of a running, paused or saved vm-tier sandbox: its VM (memory, devices,
/// writable layer) at this instant, kept until deleted, whatever becomes of the sandbox, for
/// new sandboxes to start from (`snapshot` of a create). A running sandbox is paused only
/// while it is saved; it stays as it was. A `name` the tenant gave another snapshot moves to
/// this one, which replaces it. A tenant keeps at most as many snapshots as its quota's
/// sandboxes, and they hold, with its saved sandboxes, at most its memory quota in guest
/// memory on the host's disk (429); the jail tier answers 422.
#[utoipa::path(post, path = "/v1/sandboxes/{id}/snapshots", tag = "snapshots", params(("id" = String, Path)),
    request_body = CreateSnapshot,
    responses((status = 201, body = Snapshot), (status = 404, body = ErrorBody),
        (status = 409, body = ErrorBody, description = "the sandbox is being created or destroyed"),
        (status = 422, body = ErrorBody, description = "a jail-tier sandbox, or a bad name"),
        (status = 429, body = ErrorBody)))]
async fn create_snapshot(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<CreateSnapshot>,
) -> Result<(StatusCode, Json<Snapshot>)> {
    let snapshot = state.manager.snapshot_sandbox(&tenant, &id, req).await?;
    Ok((StatusCode::CREATED, Json(snapshot)))
}

/// The caller's snapshots, oldest first.
#[utoipa::path(get, path = "/v1/snapshots", tag = "snapshots",
    responses((status = 200, body = Vec<Snapshot>)))]
async fn list_snapshots(
    State(state): State<AppState>,
    Auth(tenant): Auth,
) -> Result<Json<Vec<Snapshot>>> {
    Ok(Json(state.manager.snapshots(&tenant.name)?))
}

/// One of the caller's snapshots, by id or name.
#[utoipa::path(get, path = "/v1/snapshots/{id}", tag = "snapshots", params(("id" = String, Path)),
    responses((status = 200, body = Snapshot), (status = 404, body = ErrorBody)))]
async fn get_snapshot(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Snapshot>> {
    Ok(Json(state.manager.snapshot(&tenant.name, &id)?))
}

/// Delete one of the caller's snapshots, by id or name: sandboxes made from it go on.
#[utoipa::path(delete, path = "/v1/snapshots/{id}", tag = "snapshots", params(("id" = String, Path)),
    responses((status = 200, body = Snapshot), (status = 404, body = ErrorBody)))]
async fn delete_snapshot(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Snapshot>> {
    Ok(Json(
        state.manager.delete_snapshot(&tenant.name, &id).await?,
    ))
}

/// The sandbox's console and agent log (last MiB).
#[utoipa::path(get, path = "/v1/sandboxes/{id}/logs", tag = "sandboxes", params(("id" = String, Path)),
    responses((status = 200, content_type = "text/plain", body = String), (status = 404, body = ErrorBody)))]
async fn logs(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Response> {
    let log = state.manager.logs(&tenant.name, &id)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], log).into_response())
}

/// CPU, memory (charged, and resident without the page cache) and processes of a sandbox,
/// and its tier.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/stats", tag = "sandboxes", params(("id" = String, Path)),
    responses((status = 200, body = SandboxUsage), (status = 404, body = ErrorBody)))]
async fn stats(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<SandboxUsage>> {
    Ok(Json(usage(&state.manager, &tenant.name, &id)?))
}

/// What `GET /v1/sandboxes/{id}/stats` answers for sandbox `id` of `tenant`.
pub fn usage(manager: &Manager, tenant: &str, id: &str) -> mvm_sandbox::Result<SandboxUsage> {
    let sandbox = manager.get(tenant, id)?;
    Ok(SandboxUsage {
        stats: manager.stats(tenant, id)?,
        isolation: sandbox.isolation,
        rss_bytes: mvm_sandbox::manager::cgroups::cgroup_rss(&manager.config().cgroup_parent, id),
    })
}

/// Registered templates.
#[utoipa::path(get, path = "/v1/templates", tag = "templates",
    responses((status = 200, body = TemplateList), (status = 401, body = ErrorBody)))]
async fn list_templates(
    State(state): State<AppState>,
    Auth(_tenant): Auth,
) -> Result<Json<TemplateList>> {
    Ok(Json(TemplateList {
        templates: state.manager.templates()?,
    }))
}

/// Register a template, or replace the one of its name: a kernel and a base image already in
/// mvmd's template directory (`--template-dir`, default `<state dir>/templates`) or its build
/// artifacts directory, writable by their owner only. Templates are shared by every tenant:
/// this needs an admin token. The answer has the paths resolved (no symlink, no `..`).
#[utoipa::path(post, path = "/v1/templates", tag = "templates", request_body = Template,
    responses((status = 201, body = Template), (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "the token is not an admin tenant's"),
        (status = 422, body = ErrorBody, description = "bad name, or a file missing or outside the template directories")))]
async fn create_template(
    State(state): State<AppState>,
    Admin(tenant): Admin,
    ApiJson(t): ApiJson<Template>,
) -> Result<(StatusCode, Json<Template>)> {
    let t = state.templates.register(&state.manager, t)?;
    audit_event(&state, &tenant, "template registered", &t.name);
    Ok((StatusCode::CREATED, Json(t)))
}

/// Warm a template: boot it once as a vm-tier sandbox of the body's size (without a body, a
/// create's defaults: 1 vCPU, 256 MiB; counted in the caller's quota and held to its limits
/// meanwhile), wait for its agent, and keep the paused VM as a snapshot with the template,
/// replacing an earlier one of that size. vm-tier creates of that size then restore the
/// snapshot instead of booting, each guest given its own host name, MAC, address, RNG seed
/// and clock. Templates are shared: this needs an admin token. 422 where the host cannot
/// run the vm tier.
#[utoipa::path(post, path = "/v1/templates/{name}/warm", tag = "templates",
    params(("name" = String, Path)),
    request_body(content = Option<WarmRequest>, description = "the snapshot's size (default: a create's defaults)"),
    responses((status = 200, body = Template, description = "the template with its new snapshot"),
        (status = 401, body = ErrorBody),
        (status = 403, body = ErrorBody, description = "the token is not an admin tenant's"),
        (status = 404, body = ErrorBody),
        (status = 422, body = ErrorBody, description = "the host cannot run the vm tier")))]
async fn warm_template(
    State(state): State<AppState>,
    Admin(tenant): Admin,
    ApiPath(name): ApiPath<String>,
    ApiJsonOrDefault(req): ApiJsonOrDefault<WarmRequest>,
) -> Result<Json<Template>> {
    let t = state.manager.warm_template(&tenant, &name, &req).await?;
    audit_event(&state, &tenant, "template warmed", &t.name);
    Ok(Json(t))
}

/// Prometheus metrics: sandboxes by state, per-sandbox CPU and memory. An admin token sees
/// every tenant's sandboxes and the daemon-wide counters (creates, create latency, failures,
/// destroys, execs); another tenant's token sees its own sandboxes only.
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, content_type = "text/plain", body = String), (status = 401, body = ErrorBody)))]
async fn metrics(State(state): State<AppState>, Auth(tenant): Auth) -> Result<Response> {
    let scope = (!tenant.admin).then_some(tenant.name.as_str());
    let text = state.manager.render_metrics(scope)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response())
}

/// Liveness, version and whether the vm tier can run here.
#[utoipa::path(get, path = "/healthz", tag = "service", security(()), responses((status = 200, body = Health)))]
async fn healthz(State(state): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        vm_tier: state
            .manager
            .vm_tier_unavailable()
            .unwrap_or_else(|| "available".into()),
    })
}

/// This OpenAPI 3 document.
#[utoipa::path(get, path = "/openapi.json", tag = "service", security(()),
    responses((status = 200, content_type = "application/json", body = Object)))]
async fn openapi_json(doc: axum::Extension<Arc<utoipa::openapi::OpenApi>>) -> Response {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("static header"),
    );
    (headers, doc.to_json().unwrap_or_default()).into_response()
}

/// Where `mvmd` listens.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Unix socket (mode 0600).
    pub socket: std::path::PathBuf,
    /// Optional TCP address, e.g. 127.0.0.1:7070.
    pub tcp: Option<std::net::SocketAddr>,
    /// Directory registered templates' files must lie in (besides the artifacts directory).
    pub template_dir: std::path::PathBuf,
}

/// Default unix socket of mvmd.
pub const DEFAULT_SOCKET: &str = "/run/mvm/mvmd.sock";

/// File under the state dir holding the `default` tenant's token (mode 0600).
pub const TOKEN_FILE: &str = "token";

/// Makes sure tenant `default` exists and its token is in `<state_dir>/token`; returns the token.
/// A tenant `default` made here is an admin.
pub fn ensure_default_token(manager: &Manager) -> mvm_sandbox::Result<String> {
    let path = manager.config().state_dir.join(TOKEN_FILE);
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_owned();
        if manager.db().tenant_for_token(&t)?.is_some() {
            return Ok(t);
        }
    }
    let token = manager
        .db()
        .create_tenant("default", mvm_sandbox::db::Quota::default())?;
    // The operator's token (the file is root's alone): it may register templates.
    manager.db().set_admin("default", true)?;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| Error::host(format!("writing {}", path.display()), e))?;
    writeln!(f, "{token}").map_err(|e| Error::host(format!("writing {}", path.display()), e))?;
    Ok(token)
}

/// Serves the API until SIGINT or SIGTERM, destroying sandboxes whose timeout passed and
/// keeping the warm pools (destroyed at the stop).
pub async fn serve(manager: Manager, cfg: ServeConfig) -> mvm_sandbox::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    if let Some(dir) = cfg.socket.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::host(format!("creating {}", dir.display()), e))?;
    }
    if tokio::net::UnixStream::connect(&cfg.socket).await.is_ok() {
        return Err(Error::Conflict(format!(
            "another mvmd already serves {}",
            cfg.socket.display()
        )));
    }
    // TCP first: once the unix socket answers, every listener is up.
    let tcp = match cfg.tcp {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::host(format!("listening on {addr}"), e))?,
        ),
        None => None,
    };
    let _ = std::fs::remove_file(&cfg.socket);
    let unix = tokio::net::UnixListener::bind(&cfg.socket)
        .map_err(|e| Error::host(format!("listening on {}", cfg.socket.display()), e))?;
    std::fs::set_permissions(&cfg.socket, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::host(format!("chmod {}", cfg.socket.display()), e))?;
    let templates = TemplateDirs::new(&cfg.template_dir, manager.config())?;
    let (app, _) = router(manager.clone(), templates);
    let shutdown = async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
    };
    let reaper = {
        let manager = manager.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Err(e) = manager.reap_expired().await {
                    tracing::warn!("timeout reaper: {e}");
                }
            }
        })
    };
    let sampler = {
        let manager = manager.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(mvm_sandbox::manager::SAMPLE_EVERY);
            loop {
                tick.tick().await;
                if let Err(e) = manager.sample_usage().await {
                    tracing::warn!("sampling the sandboxes' usage: {e}");
                }
            }
        })
    };
    let pools = {
        let manager = manager.clone();
        tokio::spawn(async move {
            if let Err(e) = manager.start_pools().await {
                tracing::warn!("starting the warm pools: {e}");
            }
        })
    };
    tracing::info!(socket = %cfg.socket.display(), tcp = ?cfg.tcp, "mvmd serving");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tcp_task = match tcp {
        Some(listener) => {
            let app = app.clone();
            let mut rx = stop_rx.clone();
            Some(tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.changed().await;
                    })
                    .await
            }))
        }
        None => None,
    };
    let result = axum::serve(unix, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await;
    reaper.abort();
    sampler.abort();
    if let Some(t) = tcp_task {
        let _ = t.await;
    }
    // The warm pools' entries are nobody's: they go with the daemon.
    let _ = pools.await;
    manager.drain_pools().await;
    let _ = std::fs::remove_file(&cfg.socket);
    drop(stop_rx);
    result.map_err(|e| Error::host("serving", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audited_calls() {
        for (method, path) in [
            (Method::POST, "/v1/sandboxes"),
            (Method::DELETE, "/v1/sandboxes/abc"),
            (Method::PUT, "/v1/sandboxes/abc/files"),
            (Method::POST, "/v1/templates"),
            (Method::POST, "/v1/templates/default/warm"),
            (Method::POST, "/v1/images"),
            (Method::DELETE, "/v1/images/docker.io/library/alpine:3.20"),
            (Method::POST, "/v1/sandboxes/abc/fork"),
            (Method::PATCH, "/v1/sandboxes/abc/network"),
            (Method::GET, "/v1/sandboxes/abc/exec/ws"),
        ] {
            assert!(audited(&method, path), "{method} {path}");
        }
        for (method, path) in [
            (Method::GET, "/v1/sandboxes"),
            (Method::GET, "/v1/sandboxes/abc"),
            (Method::GET, "/v1/sandboxes/abc/files"),
            (Method::GET, "/v1/sandboxes/exec/ws"),
            (Method::HEAD, "/metrics"),
        ] {
            assert!(!audited(&method, path), "{method} {path}");
        }
    }
}
