//! The E2B surface's records in mvm's audit log.

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use super::{Caller, E2bState};

/// Records every E2B call but GET, HEAD and OPTIONS in mvm's audit log (each command start,
/// input, signal and file change included): tenant, method and path, the sandbox, status.
pub async fn record(State(state): State<E2bState>, req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        return next.run(req).await;
    }
    let tenant = Caller::of(&state.manager, req.headers())
        .map_or_else(|_| "-".to_owned(), |c| c.tenant.name);
    // Inside the nested router the path has lost its /e2b.
    let action = format!("{} /e2b{}", req.method(), req.uri().path());
    let target = req
        .headers()
        .get("e2b-sandbox-id")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            let mut segments = req.uri().path().split('/');
            segments.find(|s| *s == "sandboxes")?;
            segments.next()
        })
        .unwrap_or("")
        .to_owned();
    crate::server::run_audited(&state.manager, &tenant, &action, &target, req, next).await
}
