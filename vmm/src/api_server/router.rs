//! Firecracker's API routes: an [`HttpRequest`] becomes a [`VmmAction`] (or a 400 naming the
//! problem), and the VMM's answer becomes an [`HttpResponse`]. Pure functions: no socket, no VM.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::http::{HttpRequest, HttpResponse};
use crate::config::{
    BalloonConfig, BootSource, DriveConfig, LoggerConfig, MachineConfig, MetricsConfig,
    NetworkInterfaceConfig, SnapshotCreateParams, SnapshotLoadParams, VsockConfig,
};
use crate::controller::{VmmAction, VmmActionError, VmmResponse};
use crate::devices::virtio::update::{DrivePatch, NetworkInterfacePatch};

/// Parses the body of a request to `section` (errors name the field, e.g.
/// `machine-config.vcpu_count`).
fn parse<T: DeserializeOwned>(section: &str, body: &[u8]) -> Result<T, HttpResponse> {
    crate::config::from_json_slice(Some(section), body).map_err(|e| HttpResponse::fault(400, e))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    action_type: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VmStateBody {
    state: String,
}

fn id_matches(path_id: &str, body_id: &str, field: &str) -> Result<(), HttpResponse> {
    if path_id == body_id {
        Ok(())
    } else {
        Err(HttpResponse::fault(
            400,
            format!(
                "the id in the path ({path_id}) does not match `{field}` in the body ({body_id})"
            ),
        ))
    }
}

/// Maps a request to a VMM action (or to an error response).
pub fn route(req: &HttpRequest) -> Result<VmmAction, HttpResponse> {
    let segments: Vec<&str> = req.path.trim_matches('/').split('/').collect();
    let body = req.body.as_slice();
    Ok(match (req.method.as_str(), segments.as_slice()) {
        ("GET", [""]) => VmmAction::GetInstanceInfo,
        ("GET", ["version"]) => VmmAction::GetVersion,
        ("GET", ["vm", "config"]) => VmmAction::GetFullConfig,
        ("GET", ["machine-config"]) => VmmAction::GetMachineConfig,
        ("PUT", ["machine-config"]) => VmmAction::PutMachineConfig(parse::<MachineConfig>("machine-config", body)?),
        ("PATCH", ["machine-config"]) => VmmAction::PatchMachineConfig(parse::<Value>("machine-config", body)?),
        ("PUT", ["boot-source"]) => VmmAction::PutBootSource(parse::<BootSource>("boot-source", body)?),
        ("PUT", ["drives", id]) => {
            let drive: DriveConfig = parse("drives", body)?;
            id_matches(id, &drive.drive_id, "drive_id")?;
            VmmAction::PutDrive(drive)
        }
        ("PUT", ["network-interfaces", id]) => {
            let iface: NetworkInterfaceConfig = parse("network-interfaces", body)?;
            id_matches(id, &iface.iface_id, "iface_id")?;
            VmmAction::PutNetworkInterface(iface)
        }
        ("PATCH", ["drives", id]) => {
            let patch: DrivePatch = parse("drives", body)?;
            id_matches(id, &patch.drive_id, "drive_id")?;
            VmmAction::PatchDrive(patch)
        }
        ("PATCH", ["network-interfaces", id]) => {
            let patch: NetworkInterfacePatch = parse("network-interfaces", body)?;
            id_matches(id, &patch.iface_id, "iface_id")?;
            VmmAction::PatchNetworkInterface(patch)
        }
        ("PUT", ["vsock"]) => VmmAction::PutVsock(parse::<VsockConfig>("vsock", body)?),
        ("GET", ["balloon"]) => VmmAction::GetBalloon,
        ("PUT", ["balloon"]) => VmmAction::PutBalloon(parse::<BalloonConfig>("balloon", body)?),
        ("PATCH", ["balloon", ..]) => {
            return Err(HttpResponse::fault(
                400,
                "the balloon cannot change: mvm's balloon never inflates and has no statistics",
            ))
        }
        ("PUT", ["logger"]) => VmmAction::PutLogger(parse::<LoggerConfig>("logger", body)?),
        ("PUT", ["metrics"]) => VmmAction::PutMetrics(parse::<MetricsConfig>("metrics", body)?),
        ("PUT", ["actions"]) => match parse::<ActionBody>("actions", body)?.action_type.as_str() {
            "InstanceStart" => VmmAction::InstanceStart,
            "SendCtrlAltDel" => VmmAction::SendCtrlAltDel,
            "FlushMetrics" => VmmAction::FlushMetrics,
            other => {
                return Err(HttpResponse::fault(
                    400,
                    format!("unknown action_type {other:?}: use InstanceStart, SendCtrlAltDel or FlushMetrics"),
                ))
            }
        },
        ("PATCH", ["vm"]) => match parse::<VmStateBody>("vm", body)?.state.as_str() {
            "Paused" => VmmAction::Pause,
            "Resumed" => VmmAction::Resume,
            other => {
                return Err(HttpResponse::fault(400, format!("unknown vm state {other:?}: use Paused or Resumed")))
            }
        },
        ("PUT", ["snapshot", "create"]) => VmmAction::CreateSnapshot(parse::<SnapshotCreateParams>("snapshot/create", body)?),
        ("PUT", ["snapshot", "load"]) => VmmAction::LoadSnapshot(parse::<SnapshotLoadParams>("snapshot/load", body)?),
        (method, _) => {
            return Err(HttpResponse::fault(
                400,
                format!("Invalid request method and/or path: {method} {}", req.path),
            ))
        }
    })
}

/// Turns the VMM's answer into an HTTP response.
pub fn respond(result: Result<VmmResponse, VmmActionError>) -> HttpResponse {
    match result {
        Ok(VmmResponse::Empty) => HttpResponse {
            status: 204,
            body: None,
        },
        Ok(VmmResponse::Json(body)) => HttpResponse {
            status: 200,
            body: Some(body),
        },
        Err(e) => HttpResponse::fault(400, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api_server::http::tests::{message, req};

    /// Parses and routes `raw`.
    fn routed(raw: &str) -> Result<VmmAction, HttpResponse> {
        route(&req(raw).unwrap().unwrap())
    }

    #[test]
    fn routes_requests_to_actions() {
        assert!(matches!(
            routed("PUT /machine-config HTTP/1.1\r\nContent-Length: 37\r\n\r\n{\"vcpu_count\": 2, \"mem_size_mib\": 64}"),
            Ok(VmmAction::PutMachineConfig(m)) if m.vcpu_count == 2
        ));
        assert!(matches!(
            routed("PUT /actions HTTP/1.1\r\nContent-Length: 33\r\n\r\n{\"action_type\": \"InstanceStart\"}\n"),
            Ok(VmmAction::InstanceStart)
        ));
        assert!(matches!(
            routed("GET /?x=1 HTTP/1.1\r\n\r\n"),
            Ok(VmmAction::GetInstanceInfo)
        ));
        let balloon = r#"{"amount_mib": 0, "deflate_on_oom": false, "free_page_reporting": true}"#;
        assert!(matches!(
            routed(&format!("PUT /balloon HTTP/1.1\r\nContent-Length: {}\r\n\r\n{balloon}", balloon.len())),
            Ok(VmmAction::PutBalloon(b)) if b.free_page_reporting && b.amount_mib == 0
        ));
    }

    #[test]
    fn bad_requests_get_400s_naming_the_problem() {
        let fault = |raw: &str| message(routed(raw).unwrap_err());
        assert!(fault("GET /nope HTTP/1.1\r\n\r\n").contains("Invalid request method and/or path"));
        assert!(
            fault("PUT /machine-config HTTP/1.1\r\nContent-Length: 5\r\n\r\n{bad}")
                .contains("invalid configuration JSON")
        );
        assert!(fault("PUT /drives/a HTTP/1.1\r\nContent-Length: 44\r\n\r\n{\"drive_id\":\"b\",\"is_root_device\":false}     ").contains("does not match"));
        assert!(fault(
            "PUT /actions HTTP/1.1\r\nContent-Length: 24\r\n\r\n{\"action_type\": \"Boom\"}\n"
        )
        .contains("unknown action_type"));
        assert!(
            fault("PATCH /balloon HTTP/1.1\r\nContent-Length: 16\r\n\r\n{\"amount_mib\": 8}")
                .contains("never inflates")
        );
    }
}
