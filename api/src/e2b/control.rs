//! E2B's REST control plane (`spec/openapi.yml` of e2b-dev/E2B) on the sandbox manager:
//! create (v1 and v2), list (v1 and v2 with metadata and state filters and paging), get,
//! kill, set timeout, refresh, pause, resume, connect, fork (vm tier), metrics and the allow
//! list's update. Errors are E2B's `{code, message}`.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::time::rfc3339;
use super::{Caller, E2bError, E2bQuery, E2bState};
use mvm_sandbox::db::Tenant;
use mvm_sandbox::model::{
    CreateSandbox, Egress, Isolation, Lifecycle, NetworkSpec, NetworkUpdate, OnTimeout, Sandbox,
    SandboxState, UsageSample,
};

/// The envd version mvm reports: the SDK enables stdin, close-stdin, default users and the
/// octet-stream upload from it, and refuses file metadata (0.6.2) with its own message.
pub const ENVD_VERSION: &str = "0.5.7";

/// `clientID` of every sandbox (E2B's cluster node; mvm has one).
const CLIENT_ID: &str = "mvm";

/// Most sandboxes on one page of `GET /v2/sandboxes`, and named in one `GET
/// /sandboxes/metrics`.
pub(super) const MAX_PAGE: usize = 100;

pub fn routes() -> Router<E2bState> {
    Router::new()
        .route("/sandboxes", post(create).get(list_v1))
        .route("/v2/sandboxes", post(create).get(list_v2))
        .route("/sandboxes/{id}", get(detail).delete(kill))
        .route("/sandboxes/{id}/timeout", post(set_timeout))
        .route("/sandboxes/{id}/refreshes", post(refresh))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/connect", post(connect))
        .route("/v2/sandboxes/{id}/connect", post(connect))
        .route("/sandboxes/{id}/fork", post(fork))
        .route("/sandboxes/{id}/network", put(update_network))
        .route("/sandboxes/{id}/metrics", get(metrics))
        .route("/sandboxes/metrics", get(latest_metrics))
}

type Result<T> = std::result::Result<T, E2bError>;

pub(super) fn bad_request(message: String) -> E2bError {
    E2bError::new(StatusCode::BAD_REQUEST, message)
}

/// A JSON body; anything wrong in it is a 400 in E2B's shape.
pub(super) fn body<T: for<'de> Deserialize<'de> + Default>(bytes: &[u8]) -> Result<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| bad_request(format!("bad request body: {e}")))
}

/// `NewSandbox` / `NewSandboxV2`.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSandbox {
    #[serde(rename = "templateID")]
    template_id: String,
    timeout: Option<u64>,
    metadata: Option<BTreeMap<String, String>>,
    env_vars: Option<BTreeMap<String, String>>,
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
    network: Option<NetworkConfig>,
    auto_pause: Option<bool>,
    auto_pause_memory: Option<bool>,
    auto_resume: Option<AutoResume>,
    mcp: Option<serde_json::Value>,
    iam: Option<serde_json::Value>,
    volume_mounts: Option<Vec<serde_json::Value>>,
}

/// `SandboxAutoResumeConfig`.
#[derive(Debug, Default, Deserialize)]
struct AutoResume {
    enabled: bool,
}

/// `SandboxNetworkConfig` (and the egress part of `SandboxNetworkUpdateConfig`): what maps
/// onto mvm's egress policy, and what does not, refused when set
/// ([`unsupported`](Self::unsupported)). `allowPublicTraffic` is ignored: mvm's E2B endpoint
/// serves no sandbox host names.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NetworkConfig {
    #[serde(default)]
    allow_out: Vec<String>,
    #[serde(default)]
    deny_out: Vec<String>,
    rules: Option<serde_json::Value>,
    egress_proxy: Option<serde_json::Value>,
    dns_servers: Option<serde_json::Value>,
    https_ports: Option<serde_json::Value>,
    mask_request_host: Option<serde_json::Value>,
}

impl NetworkConfig {
    /// The first field set that mvm does not do, with what it is.
    fn unsupported(&self) -> Option<&'static str> {
        [
            (
                "rules (per-host request transforms; mvm's secrets do this, see its README)",
                &self.rules,
            ),
            ("egressProxy", &self.egress_proxy),
            ("dnsServers", &self.dns_servers),
            ("httpsPorts", &self.https_ports),
            ("maskRequestHost", &self.mask_request_host),
        ]
        .into_iter()
        .find(|(_, value)| value.as_ref().is_some_and(|v| !v.is_null()))
        .map(|(field, _)| field)
    }
}

/// `SandboxNetworkUpdateConfig`: a new egress configuration, replacing the sandbox's.
#[derive(Debug, Default, Deserialize)]
struct NetworkUpdateConfig {
    #[serde(flatten)]
    network: NetworkConfig,
    allow_internet_access: Option<bool>,
}

/// E2B's template name as an mvm template: `base` is mvm's `default`.
fn template_alias(e2b: &str) -> &str {
    match e2b {
        "base" | "" => "default",
        other => other,
    }
}

/// The mvm create request of an E2B one, for mvmd's default tier `isolation`; features mvm
/// lacks are refused naming them.
fn create_request(req: NewSandbox, isolation: Isolation) -> Result<CreateSandbox> {
    let auto_pause = req.auto_pause == Some(true);
    let unsupported = [
        (
            "autoPauseMemory false (a pause that keeps only the file system)",
            auto_pause && req.auto_pause_memory == Some(false),
        ),
        ("mcp", req.mcp.as_ref().is_some_and(|v| !v.is_null())),
        ("iam", req.iam.as_ref().is_some_and(|v| !v.is_null())),
        (
            "volumeMounts",
            req.volume_mounts.is_some_and(|v| !v.is_empty()),
        ),
    ];
    if let Some((field, _)) = unsupported.iter().find(|(_, used)| *used) {
        return Err(bad_request(format!("{field} is not supported by mvm")));
    }
    // E2B's pause at the timeout: saved to disk in the vm tier, as its pause call saves.
    let on_timeout = match (auto_pause, isolation) {
        (false, _) => OnTimeout::Destroy,
        (true, Isolation::Vm) => OnTimeout::Save,
        (true, Isolation::Jail) => OnTimeout::Pause,
    };
    Ok(CreateSandbox {
        template: Some(template_alias(&req.template_id).to_owned()),
        timeout_s: req.timeout,
        lifecycle: Lifecycle {
            on_timeout,
            auto_resume: req.auto_resume.is_some_and(|a| a.enabled),
        },
        env: req.env_vars.unwrap_or_default(),
        network: Some(network(req.allow_internet_access, req.network)?),
        metadata: req.metadata.unwrap_or_default(),
        ..CreateSandbox::default()
    })
}

/// mvm's egress for E2B's `allow_internet_access` and `network`: internet access is `all`
/// (default `none`, mvm's); `allowOut` entries are `allow` entries; `denyOut` only as
/// `0.0.0.0/0` (deny everything but `allowOut`), as mvm has no deny lists.
fn network(internet: Option<bool>, net: Option<NetworkConfig>) -> Result<NetworkSpec> {
    let net = net.unwrap_or_default();
    if let Some(field) = net.unsupported() {
        return Err(bad_request(format!(
            "network.{field} is not supported by mvm"
        )));
    }
    if let Some(d) = net.deny_out.iter().find(|d| *d != "0.0.0.0/0") {
        return Err(bad_request(format!(
            "network.denyOut {d:?}: mvm denies all but allowOut (denyOut [\"0.0.0.0/0\"]), \
             it has no per-destination deny list"
        )));
    }
    let everything = internet == Some(true) && net.deny_out.is_empty();
    let egress = match (everything, net.allow_out.is_empty()) {
        (true, _) => Egress::All,
        (false, false) => Egress::Allow,
        (false, true) => Egress::None,
    };
    Ok(NetworkSpec {
        egress,
        allow: net.allow_out,
    })
}

/// E2B's `Sandbox` (the answer to create, resume and connect).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Created {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    envd_version: &'static str,
    envd_access_token: Option<String>,
    domain: Option<String>,
}

/// E2B's `templateID` of `s`: the snapshot it was made from (E2B's snapshots are templates
/// a create names), else its template.
fn template_id(s: &Sandbox) -> String {
    s.snapshot.clone().unwrap_or_else(|| s.template.clone())
}

fn created(s: &Sandbox, caller: &Caller) -> Created {
    Created {
        template_id: template_id(s),
        sandbox_id: s.id.clone(),
        client_id: CLIENT_ID,
        envd_version: ENVD_VERSION,
        envd_access_token: Some(caller.token.clone()),
        domain: None,
    }
}

/// E2B's `ListedSandbox` and, with the token, `SandboxDetail`.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Listed {
    #[serde(rename = "templateID")]
    template_id: String,
    #[serde(rename = "sandboxID")]
    sandbox_id: String,
    #[serde(rename = "clientID")]
    client_id: &'static str,
    started_at: String,
    end_at: String,
    cpu_count: u32,
    #[serde(rename = "memoryMB")]
    memory_mb: u64,
    #[serde(rename = "diskSizeMB")]
    disk_size_mb: u64,
    state: &'static str,
    envd_version: &'static str,
    metadata: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    envd_access_token: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    allow_internet_access: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lifecycle: Option<LifecycleInfo>,
}

/// E2B's `SandboxLifecycle` (in `SandboxDetail`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LifecycleInfo {
    on_timeout: &'static str,
    auto_resume: bool,
}

impl LifecycleInfo {
    fn of(l: Lifecycle) -> LifecycleInfo {
        LifecycleInfo {
            on_timeout: match l.on_timeout {
                OnTimeout::Destroy => "kill",
                OnTimeout::Pause | OnTimeout::Save => "pause",
            },
            auto_resume: l.auto_resume,
        }
    }
}

/// E2B's state of an mvm sandbox: only running and paused ones are shown.
fn e2b_state(s: &Sandbox) -> Option<&'static str> {
    match s.state {
        SandboxState::Running => Some("running"),
        SandboxState::Paused | SandboxState::Saved => Some("paused"),
        SandboxState::Creating | SandboxState::Stopping => None,
    }
}

fn listed(s: &Sandbox, state: &'static str) -> Listed {
    Listed {
        template_id: template_id(s),
        sandbox_id: s.id.clone(),
        client_id: CLIENT_ID,
        started_at: rfc3339(s.created_at),
        // No timeout: a hundred years.
        end_at: rfc3339(s.expires_at.unwrap_or(s.created_at + 100 * 365 * 86_400)),
        cpu_count: s.vcpus,
        memory_mb: s.memory_mib,
        disk_size_mb: mvm_sandbox::manager::rootfs::jail_disk_mib_from_env(),
        state,
        envd_version: ENVD_VERSION,
        metadata: s.metadata.clone(),
        envd_access_token: None,
        allow_internet_access: None,
        lifecycle: None,
    }
}

/// Records which sandbox a create (or fork) made, next to the middleware's record of the call.
fn audit_created(state: &E2bState, tenant: &Tenant, id: &str) {
    let db = state.manager.db();
    if let Err(e) = db.audit(&tenant.name, "created (e2b)", id, 200, "") {
        tracing::error!("writing the audit log: {e}");
    }
}

async fn create(
    State(state): State<E2bState>,
    caller: Caller,
    bytes: axum::body::Bytes,
) -> Result<(StatusCode, Json<Created>)> {
    let tenant = &caller.tenant;
    let isolation = state.manager.config().default_isolation;
    let new: NewSandbox = body(&bytes)?;
    let snapshot = super::snapshots::snapshot_of_template(&state, tenant, &new.template_id)?;
    let mut req = create_request(new, isolation)?;
    if let Some(snapshot) = snapshot {
        // Its template, tier and size are the snapshot's.
        req.template = None;
        req.snapshot = Some(snapshot.id);
    }
    let sandbox = state.manager.create(tenant, req).await?;
    audit_created(&state, tenant, &sandbox.id);
    Ok((StatusCode::CREATED, Json(created(&sandbox, &caller))))
}

/// Query of the list calls.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ListQuery {
    /// `k1=v1&k2=v2`, each key and value percent-encoded (the SDK's encoding).
    metadata: Option<String>,
    /// Comma-separated states (v2).
    state: Option<String>,
    limit: Option<usize>,
    next_token: Option<String>,
}

/// The caller's sandboxes that match `q`, oldest first.
fn matching(state: &E2bState, tenant: &Tenant, q: &ListQuery) -> Result<Vec<Listed>> {
    let wanted: BTreeMap<String, String> = match &q.metadata {
        Some(m) => serde_urlencoded::from_str::<Vec<(String, String)>>(m)
            .map_err(|e| bad_request(format!("metadata filter {m:?}: {e}")))?
            .into_iter()
            .collect(),
        None => BTreeMap::new(),
    };
    let states: Option<Vec<&str>> = q.state.as_deref().map(|s| s.split(',').collect());
    Ok(state
        .manager
        .list(Some(&tenant.name))?
        .iter()
        .filter(|s| wanted.iter().all(|(k, v)| s.metadata.get(k) == Some(v)))
        .filter_map(|s| Some(listed(s, e2b_state(s)?)))
        .filter(|l| states.as_ref().is_none_or(|st| st.contains(&l.state)))
        .collect())
}

async fn list_v1(
    State(state): State<E2bState>,
    caller: Caller,
    E2bQuery(q): E2bQuery<ListQuery>,
) -> Result<Json<Vec<Listed>>> {
    let mut all = matching(&state, &caller.tenant, &q)?;
    all.retain(|l| l.state == "running");
    Ok(Json(all))
}

/// One page; `x-next-token` (the offset of the next page) when more follow.
async fn list_v2(
    State(state): State<E2bState>,
    caller: Caller,
    E2bQuery(q): E2bQuery<ListQuery>,
) -> Result<Response> {
    let all = matching(&state, &caller.tenant, &q)?;
    paged(all, q.limit, q.next_token.as_deref())
}

/// The page of `all` that a list call's `limit` (at most [`MAX_PAGE`]) and `nextToken` ask
/// for, with the next page's token in `x-next-token` when there is one.
pub(super) fn paged<T: Serialize>(
    all: Vec<T>,
    limit: Option<usize>,
    next_token: Option<&str>,
) -> Result<Response> {
    let from = match next_token {
        Some(t) => t
            .parse::<usize>()
            .map_err(|_| bad_request(format!("nextToken {t:?} is not one mvm gave")))?,
        None => 0,
    };
    let limit = limit.unwrap_or(MAX_PAGE).clamp(1, MAX_PAGE);
    let page: Vec<T> = all.into_iter().skip(from).collect();
    let more = page.len() > limit;
    let page: Vec<T> = page.into_iter().take(limit).collect();
    let mut resp = Json(page).into_response();
    if more {
        resp.headers_mut().insert(
            HeaderName::from_static("x-next-token"),
            HeaderValue::from_str(&(from + limit).to_string()).expect("digits"),
        );
    }
    Ok(resp)
}

async fn detail(
    State(state): State<E2bState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Listed>> {
    let tenant = &caller.tenant;
    let s = state.manager.get(&tenant.name, &id)?;
    let e2b = e2b_state(&s).ok_or_else(|| {
        E2bError::new(
            StatusCode::NOT_FOUND,
            format!("sandbox {id} is {}", s.state.as_str()),
        )
    })?;
    let mut l = listed(&s, e2b);
    l.envd_access_token = Some(caller.token.clone());
    l.allow_internet_access = Some(s.network.egress == Egress::All);
    l.lifecycle = Some(LifecycleInfo::of(s.lifecycle));
    Ok(Json(l))
}

async fn kill(
    State(state): State<E2bState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let tenant = &caller.tenant;
    state.manager.destroy(&tenant.name, &id).await?;
    state.processes.forget(&id);
    state.watchers.forget(&id);
    Ok(StatusCode::NO_CONTENT)
}

/// `SandboxTimeoutRequest`, `SandboxRefreshRequest`, `ResumedSandbox`, `ConnectSandbox`.
#[derive(Debug, Default, Deserialize)]
struct Timeout {
    #[serde(alias = "duration")]
    timeout: Option<u64>,
}

/// Sets the sandbox's timeout to `timeout` seconds from now (E2B's own default: 300).
fn extend(state: &E2bState, tenant: &Tenant, id: &str, t: &Timeout) -> Result<Sandbox> {
    Ok(state
        .manager
        .keepalive(&tenant.name, id, Some(t.timeout.unwrap_or(300)))?)
}

async fn set_timeout(
    State(state): State<E2bState>,
    caller: Caller,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<StatusCode> {
    let tenant = &caller.tenant;
    let t: Timeout = body(&bytes)?;
    if t.timeout.is_none() {
        return Err(bad_request("timeout is required".into()));
    }
    extend(&state, tenant, &id, &t)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn refresh(
    State(state): State<E2bState>,
    caller: Caller,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<StatusCode> {
    let tenant = &caller.tenant;
    extend(&state, tenant, &id, &body(&bytes)?)?;
    Ok(StatusCode::NO_CONTENT)
}

/// E2B's pause: a sandbox that can be saved (vm tier, from a template) is saved to disk, its
/// memory and CPU freed until it is resumed, as E2B's own (a 429 past the guest memory its
/// tenant may keep on the disk); any other is frozen (its state kept all the same).
async fn pause(
    State(state): State<E2bState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode> {
    let tenant = &caller.tenant;
    let sandbox = state.manager.get(&tenant.name, &id)?;
    match state.manager.can_save(&sandbox) {
        true => state.manager.save(&tenant.name, &id).await?,
        false => state.manager.set_paused(&tenant.name, &id, true).await?,
    };
    Ok(StatusCode::NO_CONTENT)
}

async fn resume(
    State(state): State<E2bState>,
    caller: Caller,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<(StatusCode, Json<Created>)> {
    let tenant = &caller.tenant;
    let t: Timeout = body(&bytes)?;
    state.manager.set_paused(&tenant.name, &id, false).await?;
    let s = extend(&state, tenant, &id, &t)?;
    Ok((StatusCode::CREATED, Json(created(&s, &caller))))
}

/// Resumes a paused sandbox (201) or takes a running one (200), with the new timeout.
async fn connect(
    State(state): State<E2bState>,
    caller: Caller,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<(StatusCode, Json<Created>)> {
    let tenant = &caller.tenant;
    let t: Timeout = body(&bytes)?;
    let paused = matches!(
        state.manager.get(&tenant.name, &id)?.state,
        SandboxState::Paused | SandboxState::Saved
    );
    let status = if paused {
        state.manager.set_paused(&tenant.name, &id, false).await?;
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let s = extend(&state, tenant, &id, &t)?;
    Ok((status, Json(created(&s, &caller))))
}

/// `SandboxForkRequest`.
#[derive(Debug, Default, Deserialize)]
struct Fork {
    timeout: Option<u64>,
    count: Option<u32>,
}

/// `SandboxForkResult`: mvm makes all children or none, so each has its sandbox.
#[derive(Serialize)]
struct Forked {
    sandbox: Created,
}

/// Forks a running, paused or saved vm-tier sandbox into `count` children (the manager's
/// fork), each with the given timeout (default: the manager's); the jail tier is refused
/// (400).
async fn fork(
    State(state): State<E2bState>,
    caller: Caller,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<(StatusCode, Json<Vec<Forked>>)> {
    let tenant = &caller.tenant;
    let req: Fork = body(&bytes)?;
    let children = state
        .manager
        .fork(tenant, &id, req.count.unwrap_or(1))
        .await?;
    let mut forked = Vec::with_capacity(children.len());
    for child in children {
        audit_created(&state, tenant, &child.id);
        let child = match req.timeout {
            Some(t) => extend(&state, tenant, &child.id, &Timeout { timeout: Some(t) })?,
            None => child,
        };
        forked.push(Forked {
            sandbox: created(&child, &caller),
        });
    }
    Ok((StatusCode::CREATED, Json(forked)))
}

/// Replaces the allow list of a sandbox made with `allowOut` (mvm's egress `allow`) by the
/// update's `allowOut` (`denyOut` empty or `["0.0.0.0/0"]`, as at a create); the egress mode
/// itself is set when a sandbox is made, so internet access is refused (400), as is an
/// update of a sandbox made without an allow list (409).
async fn update_network(
    State(state): State<E2bState>,
    caller: Caller,
    Path(id): Path<String>,
    bytes: axum::body::Bytes,
) -> Result<StatusCode> {
    let update: NetworkUpdateConfig = body(&bytes)?;
    if update.allow_internet_access == Some(true) {
        return Err(bad_request(
            "allow_internet_access: mvm sets a sandbox's egress mode when it is made; make a \
             new sandbox with internet access"
                .into(),
        ));
    }
    let spec = network(None, Some(update.network))?;
    state
        .manager
        .update_network(
            &caller.tenant.name,
            &id,
            NetworkUpdate { allow: spec.allow },
        )
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_and_networks_map_onto_mvm() {
        let req: NewSandbox = serde_json::from_str(
            r#"{"templateID":"base","timeout":60,"metadata":{"a":"b"},"envVars":{"X":"1"},
                "allow_internet_access":false,"autoPause":false}"#,
        )
        .unwrap();
        let c = create_request(req, Isolation::Vm).unwrap();
        assert_eq!(c.template.as_deref(), Some("default"));
        assert!(c.lifecycle.is_default());
        assert_eq!(c.timeout_s, Some(60));
        assert_eq!(c.network.unwrap().egress, Egress::None);
        let allow = network(
            None,
            Some(NetworkConfig {
                allow_out: vec!["1.1.1.1".into()],
                deny_out: vec!["0.0.0.0/0".into()],
                ..NetworkConfig::default()
            }),
        )
        .unwrap();
        assert_eq!(allow.egress, Egress::Allow);
        assert_eq!(network(Some(true), None).unwrap().egress, Egress::All);
        network(
            None,
            Some(NetworkConfig {
                allow_out: vec![],
                deny_out: vec!["8.8.8.8".into()],
                ..NetworkConfig::default()
            }),
        )
        .unwrap_err();
        // What mvm does not do is refused, naming it, not ignored.
        let req: NewSandbox = serde_json::from_str(
            r#"{"templateID":"base","network":{"allowOut":["api.example.com"],
                "rules":{"api.example.com":[{"transform":{"headers":{"X":"y"}}}]}}}"#,
        )
        .unwrap();
        let refused = create_request(req, Isolation::Vm).unwrap_err();
        assert!(
            refused.message.contains("network.rules"),
            "{}",
            refused.message
        );
        let req: NewSandbox = serde_json::from_str(
            r#"{"templateID":"base","network":{"allowPublicTraffic":false,"rules":null}}"#,
        )
        .unwrap();
        assert_eq!(
            create_request(req, Isolation::Vm)
                .unwrap()
                .network
                .unwrap()
                .egress,
            Egress::None
        );
        // An update's internet access is inside its network configuration.
        let update: NetworkUpdateConfig = serde_json::from_str(
            r#"{"allowOut":["1.1.1.1"],"denyOut":["0.0.0.0/0"],"allow_internet_access":false}"#,
        )
        .unwrap();
        assert_eq!(update.allow_internet_access, Some(false));
        assert_eq!(update.network.allow_out, ["1.1.1.1"]);
    }

    #[test]
    fn unsupported_features_are_refused() {
        let req: NewSandbox =
            serde_json::from_str(r#"{"templateID":"base","volumeMounts":[{"name":"v"}]}"#).unwrap();
        assert_eq!(
            create_request(req, Isolation::Vm).unwrap_err().status,
            StatusCode::BAD_REQUEST
        );
        // A pause at the timeout that keeps only the file system.
        let req: NewSandbox = serde_json::from_str(
            r#"{"templateID":"base","autoPause":true,"autoPauseMemory":false}"#,
        )
        .unwrap();
        let refused = create_request(req, Isolation::Vm).unwrap_err();
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
        assert!(
            refused.message.contains("autoPauseMemory"),
            "{}",
            refused.message
        );
    }

    /// E2B's `autoPause` saves at the timeout in the vm tier and freezes in the jail tier
    /// (as its pause call does); `autoResume` is kept.
    #[test]
    fn auto_pause_is_the_tiers_pause_at_the_timeout() {
        let body = r#"{"templateID":"base","timeout":5,"autoPause":true,"autoPauseMemory":true,
                       "autoResume":{"enabled":true}}"#;
        for (isolation, on_timeout) in [
            (Isolation::Vm, OnTimeout::Save),
            (Isolation::Jail, OnTimeout::Pause),
        ] {
            let c = create_request(serde_json::from_str(body).unwrap(), isolation).unwrap();
            assert_eq!(
                c.lifecycle,
                Lifecycle {
                    on_timeout,
                    auto_resume: true
                }
            );
        }
        assert_eq!(LifecycleInfo::of(Lifecycle::default()).on_timeout, "kill");
    }
}

/// `SandboxMetric`: one sample of a sandbox's usage, as the host sees it (see
/// [`UsageSample`]).
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Metric {
    timestamp: String,
    timestamp_unix: i64,
    cpu_count: u32,
    cpu_used_pct: f64,
    mem_used: u64,
    mem_total: u64,
    mem_cache: u64,
    disk_used: u64,
    disk_total: u64,
}

impl Metric {
    fn of(s: &UsageSample) -> Metric {
        let secs = s.at_ms.div_euclid(1000);
        Metric {
            timestamp: rfc3339(secs),
            timestamp_unix: secs,
            cpu_count: s.vcpus,
            cpu_used_pct: s.cpu_used_pct,
            mem_used: s.memory_used_bytes,
            mem_total: s.memory_total_bytes,
            mem_cache: s.memory_cache_bytes,
            disk_used: s.disk_used_bytes,
            disk_total: s.disk_total_bytes,
        }
    }
}

/// `GET /sandboxes/{id}/metrics` query: a window in Unix seconds.
#[derive(Debug, Default, Deserialize)]
struct MetricsQuery {
    start: Option<i64>,
    end: Option<i64>,
}

/// The samples of a sandbox's usage from `start` to `end` (every 5 s while it runs, the
/// last hour kept), oldest first; none yet for a sandbox just made.
async fn metrics(
    State(state): State<E2bState>,
    caller: Caller,
    Path(id): Path<String>,
    E2bQuery(q): E2bQuery<MetricsQuery>,
) -> Result<Json<Vec<Metric>>> {
    let samples = state
        .manager
        .usage_history(&caller.tenant.name, &id, q.start, q.end)?;
    Ok(Json(samples.iter().map(Metric::of).collect()))
}

/// `GET /sandboxes/metrics` query: sandbox ids, comma-separated.
#[derive(Debug, Deserialize)]
struct LatestMetricsQuery {
    sandbox_ids: String,
}

/// `SandboxesWithMetrics`: the latest sample of each sandbox named that is the caller's and
/// was sampled.
#[derive(Debug, Serialize)]
struct LatestMetrics {
    sandboxes: BTreeMap<String, Metric>,
}

async fn latest_metrics(
    State(state): State<E2bState>,
    caller: Caller,
    E2bQuery(q): E2bQuery<LatestMetricsQuery>,
) -> Result<Json<LatestMetrics>> {
    let ids: Vec<&str> = q
        .sandbox_ids
        .split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .collect();
    if ids.len() > MAX_PAGE {
        return Err(bad_request(format!(
            "sandbox_ids names {} sandboxes; ask for at most {MAX_PAGE} at once",
            ids.len()
        )));
    }
    let mut sandboxes = BTreeMap::new();
    for id in ids {
        match state
            .manager
            .usage_history(&caller.tenant.name, id, None, None)
        {
            Ok(samples) => {
                if let Some(last) = samples.last() {
                    sandboxes.insert(id.to_owned(), Metric::of(last));
                }
            }
            Err(mvm_sandbox::Error::NotFound(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Json(LatestMetrics { sandboxes }))
}
