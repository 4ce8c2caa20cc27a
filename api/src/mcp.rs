//! MCP over streamable HTTP at `/mcp`: mvm's Model Context Protocol server ([`mvm_mcp`]) with
//! rmcp's streamable HTTP transport. A request's bearer token picks its tenant (no or a bad
//! token is a 401); each tenant has its own session manager, so a session acts as the tenant
//! that opened it, its sandboxes are that tenant's, and another tenant's token cannot reach it.
//! A session's sandboxes are destroyed when it ends (its DELETE, or its expiry).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Request, State};
use axum::response::Response;
use axum::routing::any;
use axum::{Extension, Router};
use mvm_mcp::{SandboxTools, TenantManager};
use mvm_sandbox::db::Tenant;
use mvm_sandbox::manager::Manager;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};

use crate::server::{AppState, Auth};

/// One tenant's MCP endpoint: its sessions, each a server acting as that tenant.
type TenantService = StreamableHttpService<SandboxTools, LocalSessionManager>;

/// The endpoint of each tenant that has called `/mcp`.
#[derive(Clone, Default)]
struct Endpoints(Arc<Mutex<HashMap<String, TenantService>>>);

impl Endpoints {
    /// The endpoint of `tenant`, made on its first call.
    fn of(&self, manager: &Manager, tenant: Tenant) -> TenantService {
        let mut tenants = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let manager = manager.clone();
        tenants
            .entry(tenant.name.clone())
            .or_insert_with(move || {
                let backend = Arc::new(TenantManager {
                    manager,
                    tenant: tenant.name,
                });
                StreamableHttpService::new(
                    move || Ok(SandboxTools::owning(backend.clone())),
                    Arc::default(),
                    // The bearer token, not the Host header, is what admits a caller: mvmd is
                    // reached under whatever name its operator gives it.
                    StreamableHttpServerConfig::default().disable_allowed_hosts(),
                )
            })
            .clone()
    }
}

/// The `/mcp` route.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/mcp", any(serve))
        .layer(Extension(Endpoints::default()))
        .with_state(state)
}

/// Hands an authenticated request (a 401 otherwise) to its tenant's endpoint.
async fn serve(
    State(state): State<AppState>,
    Auth(tenant): Auth,
    Extension(endpoints): Extension<Endpoints>,
    req: Request,
) -> Response {
    endpoints
        .of(&state.manager, tenant)
        .handle(req)
        .await
        .map(axum::body::Body::new)
}
