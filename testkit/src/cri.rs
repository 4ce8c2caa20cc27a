//! Kubernetes' own path to the shim: a client of containerd's CRI plugin over its gRPC API
//! (CRI `runtime.v1`, the crate `k8s-cri`), called the way kubelet calls it, and a whole pod's
//! life through it ([`run_pod`]). crictl is not used: building it needs Go's module proxy.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{tail, Containerd, CRI_HANDLER, IMAGE};
use crate::text;

/// A connection to a CRI runtime's socket, with its own single-threaded async runtime so that
/// tests call it synchronously.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    channel: Channel,
}

/// A CRI call's failure: the RPC, its gRPC status and message.
fn rpc_error(rpc: &str, status: tonic::Status) -> String {
    format!("CRI {rpc}: {:?}: {}", status.code(), status.message())
}

impl Cri {
    /// Connects to the CRI runtime serving `socket` (containerd's own socket).
    pub fn connect(socket: &Path) -> Result<Cri, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let socket = socket.to_owned();
        let channel = rt
            .block_on(async {
                Endpoint::try_from("http://[::]:0")
                    .expect("a valid URI")
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let socket = socket.clone();
                        async move {
                            tokio::net::UnixStream::connect(socket)
                                .await
                                .map(TokioIo::new)
                        }
                    }))
                    .await
            })
            .map_err(|e| format!("connecting to the CRI socket: {e}"))?;
        Ok(Cri { rt, channel })
    }

    /// Calls RuntimeService's `rpc` through `call`; the gRPC status says why it failed.
    pub fn runtime<T, F, Fut>(&self, rpc: &str, call: F) -> Result<T, String>
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = RuntimeServiceClient::new(self.channel.clone());
        self.rt
            .block_on(call(client))
            .map(tonic::Response::into_inner)
            .map_err(|s| rpc_error(rpc, s))
    }

    /// Calls ImageService's `rpc` through `call`.
    pub fn image<T, F, Fut>(&self, rpc: &str, call: F) -> Result<T, String>
    where
        F: FnOnce(ImageServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = ImageServiceClient::new(self.channel.clone());
        self.rt
            .block_on(call(client))
            .map(tonic::Response::into_inner)
            .map_err(|s| rpc_error(rpc, s))
    }

    /// Waits (30 s at most) until the runtime reports itself and its pod network ready, as
    /// kubelet does before it runs pods.
    pub fn wait_ready(&self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = self.runtime("Status", |mut c| async move {
                c.status(cri::StatusRequest { verbose: false }).await
            });
            let conditions = status
                .as_ref()
                .ok()
                .and_then(|s| s.status.as_ref())
                .map(|s| s.conditions.clone())
                .unwrap_or_default();
            let ready = |kind: &str| conditions.iter().any(|c| c.r#type == kind && c.status);
            if ready("RuntimeReady") && ready("NetworkReady") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("the CRI runtime is not ready: {status:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// What [`run_pod`] saw of the pod.
#[derive(Debug)]
pub struct PodRun {
    /// The pod's address, as the CNI plugin gave it.
    pub ip: String,
    /// The kernel boot id that each of the two containers reads.
    pub boot_ids: (String, String),
    /// The first container's CRI log file, whole, once it stopped.
    pub log: String,
    /// The first container's stats: CPU time (ns) and memory working set (bytes).
    pub stats: (u64, u64),
    /// Time from RunPodSandbox to both containers running.
    pub start: Duration,
    /// Time from the first StopContainer to RemovePodSandbox returning.
    pub teardown: Duration,
}

/// The two containers of [`run_pod`]: name and shell script. The first writes to its log on
/// both streams; both then wait for SIGTERM, as a service does.
const CONTAINERS: [(&str, &str); 2] = [
    (
        "app",
        "echo \"hello from $POD_ROLE\"; echo warning-on-stderr >&2; \
         trap 'echo stopping; exit 0' TERM; while :; do sleep 3600 & wait $!; done",
    ),
    (
        "sidecar",
        "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done",
    ),
];

/// One line of a CRI container log: `<RFC 3339 time> <stdout|stderr> <F|P> <text>`.
#[derive(Debug, PartialEq, Eq)]
pub struct LogLine<'a> {
    /// `stdout` or `stderr`.
    pub stream: &'a str,
    /// `F` for a full line, `P` for a partial one (no newline yet).
    pub tag: &'a str,
    /// The line's text.
    pub text: &'a str,
}

/// Parses one line of a CRI log file; `None` when it is not in the CRI format.
pub fn parse_log_line(line: &str) -> Option<LogLine<'_>> {
    let mut fields = line.splitn(4, ' ');
    let time = fields.next()?;
    let stream = fields.next()?;
    let tag = fields.next()?;
    let text = fields.next().unwrap_or("");
    // RFC 3339 with nanoseconds in UTC or with an offset, as Go's time.RFC3339Nano prints.
    let rfc3339 = time.len() >= 20
        && time.as_bytes()[4] == b'-'
        && time.as_bytes()[10] == b'T'
        && (time.ends_with('Z') || time[19..].contains(['+', '-']));
    let ok = rfc3339 && matches!(stream, "stdout" | "stderr") && matches!(tag, "F" | "P");
    ok.then_some(LogLine { stream, tag, text })
}

/// A pod's network namespace and sandbox as containerd's CRI plugin made them: read from
/// PodSandboxStatus's verbose info (the sandbox container's OCI spec).
fn pod_netns(cri: &Cri, pod: &str) -> Result<PathBuf, String> {
    let pod = pod.to_owned();
    let status = cri.runtime("PodSandboxStatus", |mut c| async move {
        c.pod_sandbox_status(cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod,
            verbose: true,
        })
        .await
    })?;
    let info = status
        .info
        .get("info")
        .ok_or("PodSandboxStatus has no info")?;
    let info: serde_json::Value =
        serde_json::from_str(info).map_err(|e| format!("PodSandboxStatus info: {e}"))?;
    info["runtimeSpec"]["linux"]["namespaces"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|ns| ns["type"] == "network")
        .and_then(|ns| ns["path"].as_str())
        .map(PathBuf::from)
        .ok_or_else(|| format!("no network namespace path in the pod's spec: {info}"))
}

/// The pod config kubelet sends for pod `name` (namespace `default`) with the isolation tier
/// `tier` as its annotation.
fn pod_config(name: &str, tier: &str, log_dir: &Path) -> cri::PodSandboxConfig {
    cri::PodSandboxConfig {
        metadata: Some(cri::PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("{name}-uid"),
            namespace: "default".to_owned(),
            attempt: 0,
        }),
        hostname: name.to_owned(),
        log_directory: log_dir.display().to_string(),
        labels: HashMap::from([("app".to_owned(), name.to_owned())]),
        annotations: HashMap::from([("io.mvm.isolation".to_owned(), tier.to_owned())]),
        linux: Some(cri::LinuxPodSandboxConfig {
            security_context: Some(cri::LinuxSandboxSecurityContext {
                namespace_options: Some(cri::NamespaceOption {
                    network: cri::NamespaceMode::Pod as i32,
                    pid: cri::NamespaceMode::Container as i32,
                    ipc: cri::NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// `sh -c script` in container `id` through ExecSync: its exit code, stdout and stderr.
pub fn exec_sync(cri: &Cri, id: &str, script: &str) -> Result<(i32, String, String), String> {
    let req = cri::ExecSyncRequest {
        container_id: id.to_owned(),
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        timeout: 60,
    };
    let resp = cri.runtime("ExecSync", |mut c| async move { c.exec_sync(req).await })?;
    Ok((resp.exit_code, text(&resp.stdout), text(&resp.stderr)))
}

/// [`exec_sync`] that must exit 0: its trimmed stdout.
fn exec_ok(cri: &Cri, id: &str, script: &str) -> Result<String, String> {
    match exec_sync(cri, id, script)? {
        (0, out, _) => Ok(out.trim().to_owned()),
        (code, out, err) => Err(format!(
            "ExecSync sh -c {script:?} in {id}: exit {code}, stdout {out:?}, stderr {err:?}"
        )),
    }
}

/// Polls ContainerStatus until container `id` is in `state` (30 s at most); its status.
fn wait_container(
    cri: &Cri,
    id: &str,
    state: cri::ContainerState,
) -> Result<cri::ContainerStatus, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let req = cri::ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        };
        let status = cri
            .runtime("ContainerStatus", |mut c| async move {
                c.container_status(req).await
            })?
            .status
            .ok_or("ContainerStatus without a status")?;
        if status.state == state as i32 {
            return Ok(status);
        }
        if Instant::now() > deadline {
            return Err(format!("container {id} never became {state:?}: {status:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The pod sandbox (and so its containers) that [`run_pod`] made: stopped and removed when
/// dropped before the run removed it itself, so that a failing run leaves nothing behind.
struct PodGuard<'a> {
    cri: &'a Cri,
    id: Option<String>,
}

impl Drop for PodGuard<'_> {
    fn drop(&mut self) {
        let Some(id) = self.id.take() else { return };
        let stop = cri::StopPodSandboxRequest {
            pod_sandbox_id: id.clone(),
        };
        let _ = self.cri.runtime("StopPodSandbox", |mut c| async move {
            c.stop_pod_sandbox(stop).await
        });
        let remove = cri::RemovePodSandboxRequest { pod_sandbox_id: id };
        let _ = self.cri.runtime("RemovePodSandbox", |mut c| async move {
            c.remove_pod_sandbox(remove).await
        });
    }
}

/// A pod's whole life through the CRI plugin of `cd` as kubelet drives it, with runtime
/// handler `mvm` and the tier `tier` (`io.mvm.isolation`): RunPodSandbox; CreateContainer and
/// StartContainer of two containers of the test image; ExecSync (output, exit code, the pod's
/// address, a root each); the first container's CRI log file; ContainerStats;
/// StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox; then nothing of the pod
/// may be left (no shim, sandbox, mount, cgroup, network namespace or host route).
pub fn run_pod(cd: &Containerd, cri: &Cri, name: &str, tier: &str) -> Result<PodRun, String> {
    let log_dir = cd.dir().join("pods").join(name);
    let config = pod_config(name, tier, &log_dir);
    let started = Instant::now();
    let req = cri::RunPodSandboxRequest {
        config: Some(config.clone()),
        runtime_handler: CRI_HANDLER.to_owned(),
    };
    let pod = cri
        .runtime("RunPodSandbox", |mut c| async move {
            c.run_pod_sandbox(req).await
        })
        .map_err(|e| format!("{e}; containerd's log ends: {}", tail(&cd.log(), 3000)))?
        .pod_sandbox_id;
    let mut guard = PodGuard {
        cri,
        id: Some(pod.clone()),
    };
    let netns = pod_netns(cri, &pod)?;
    let status = {
        let req = cri::PodSandboxStatusRequest {
            pod_sandbox_id: pod.clone(),
            verbose: false,
        };
        cri.runtime("PodSandboxStatus", |mut c| async move {
            c.pod_sandbox_status(req).await
        })?
        .status
        .ok_or("PodSandboxStatus without a status")?
    };
    if status.state != cri::PodSandboxState::SandboxReady as i32 {
        return Err(format!("the pod is not ready: {status:?}"));
    }
    let ip = status
        .network
        .as_ref()
        .map(|n| n.ip.clone())
        .filter(|ip| !ip.is_empty())
        .ok_or_else(|| format!("the pod has no address from CNI: {status:?}"))?;

    let mut ids = Vec::new();
    for (role, script) in CONTAINERS {
        let req = cri::CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(cri::ContainerConfig {
                metadata: Some(cri::ContainerMetadata {
                    name: role.to_owned(),
                    attempt: 0,
                }),
                image: Some(cri::ImageSpec {
                    image: IMAGE.to_owned(),
                    ..Default::default()
                }),
                command: vec!["sh".into(), "-c".into(), script.into()],
                envs: vec![cri::KeyValue {
                    key: "POD_ROLE".into(),
                    value: role.into(),
                }],
                log_path: format!("{role}/0.log"),
                ..Default::default()
            }),
            sandbox_config: Some(config.clone()),
        };
        let id = cri
            .runtime("CreateContainer", |mut c| async move {
                c.create_container(req).await
            })
            .map_err(|e| format!("{e}; containerd's log ends: {}", tail(&cd.log(), 3000)))?
            .container_id;
        let req = cri::StartContainerRequest {
            container_id: id.clone(),
        };
        cri.runtime("StartContainer", |mut c| async move {
            c.start_container(req).await
        })
        .map_err(|e| format!("{e}; containerd's log ends: {}", tail(&cd.log(), 3000)))?;
        wait_container(cri, &id, cri::ContainerState::ContainerRunning)?;
        ids.push(id);
    }
    let start = started.elapsed();
    let (app, sidecar) = (&ids[0], &ids[1]);

    // ExecSync: output on both streams and the exit code come back.
    let (code, out, err) = exec_sync(cri, app, "echo exec-out; echo exec-err >&2; exit 3")?;
    if (code, out.as_str(), err.as_str()) != (3, "exec-out\n", "exec-err\n") {
        return Err(format!(
            "ExecSync: exit {code}, stdout {out:?}, stderr {err:?} (expected 3, \
             \"exec-out\\n\", \"exec-err\\n\")"
        ));
    }
    // Both containers are in the pod's network (CNI's address on eth0), each on its own root.
    for id in [app, sidecar] {
        let addrs = exec_ok(cri, id, "ip -4 -o addr show eth0")?;
        if !addrs.contains(&format!("inet {ip}/")) {
            return Err(format!(
                "container {id} is not in the pod's network (address {ip}): {addrs}"
            ));
        }
    }
    // The jail tier has no /proc/sys: `none` there.
    const BOOT_ID: &str = "cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo none";
    let app_boot = exec_ok(cri, app, &format!("touch /tmp/app-only && {BOOT_ID}"))?;
    let sidecar_boot = exec_ok(
        cri,
        sidecar,
        &format!("test ! -e /tmp/app-only && {BOOT_ID}"),
    )?;

    // ContainerStats: the sandbox's usage, as kubelet's summary API reads it.
    let req = cri::ContainerStatsRequest {
        container_id: app.clone(),
    };
    let stats = cri
        .runtime("ContainerStats", |mut c| async move {
            c.container_stats(req).await
        })?
        .stats
        .ok_or("ContainerStats without stats")?;
    let cpu_ns = stats
        .cpu
        .as_ref()
        .and_then(|c| c.usage_core_nano_seconds.as_ref())
        .map_or(0, |v| v.value);
    let working_set = stats
        .memory
        .as_ref()
        .and_then(|m| m.working_set_bytes.as_ref())
        .map_or(0, |v| v.value);
    if cpu_ns == 0 || working_set == 0 {
        return Err(format!(
            "ContainerStats of a running container shows no usage: {stats:?}"
        ));
    }
    let req = cri::ListContainerStatsRequest {
        filter: Some(cri::ContainerStatsFilter {
            pod_sandbox_id: pod.clone(),
            ..Default::default()
        }),
    };
    let listed = cri
        .runtime("ListContainerStats", |mut c| async move {
            c.list_container_stats(req).await
        })?
        .stats;
    if listed.len() != 2 {
        return Err(format!(
            "ListContainerStats of the pod: {} entries, expected 2: {listed:?}",
            listed.len()
        ));
    }

    // Teardown as kubelet does it: stop the containers (SIGTERM, then SIGKILL after the grace
    // period), remove them, stop the pod, remove it.
    let teardown_started = Instant::now();
    for id in &ids {
        let req = cri::StopContainerRequest {
            container_id: id.clone(),
            timeout: 10,
        };
        cri.runtime("StopContainer", |mut c| async move {
            c.stop_container(req).await
        })?;
    }
    let stopped = wait_container(cri, app, cri::ContainerState::ContainerExited)?;
    if stopped.exit_code != 0 {
        return Err(format!(
            "the first container did not exit 0 on SIGTERM: {stopped:?}"
        ));
    }
    let log_path = log_dir.join("app/0.log");
    let log = std::fs::read_to_string(&log_path)
        .map_err(|e| format!("the CRI log {}: {e}", log_path.display()))?;
    check_app_log(&log)?;
    for id in &ids {
        let req = cri::RemoveContainerRequest {
            container_id: id.clone(),
        };
        cri.runtime("RemoveContainer", |mut c| async move {
            c.remove_container(req).await
        })?;
    }
    let req = cri::StopPodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    };
    cri.runtime("StopPodSandbox", |mut c| async move {
        c.stop_pod_sandbox(req).await
    })?;
    let req = cri::RemovePodSandboxRequest {
        pod_sandbox_id: pod.clone(),
    };
    cri.runtime("RemovePodSandbox", |mut c| async move {
        c.remove_pod_sandbox(req).await
    })?;
    guard.id = None;
    let teardown = teardown_started.elapsed();

    let mut left: Vec<String> = cd.leftovers(&[&pod, app, sidecar]);
    let pods = cri
        .runtime("ListPodSandbox", |mut c| async move {
            c.list_pod_sandbox(cri::ListPodSandboxRequest::default())
                .await
        })?
        .items;
    left.extend(pods.iter().map(|p| format!("CRI pod sandbox {}", p.id)));
    let containers = cri
        .runtime("ListContainers", |mut c| async move {
            c.list_containers(cri::ListContainersRequest::default())
                .await
        })?
        .containers;
    left.extend(containers.iter().map(|c| format!("CRI container {}", c.id)));
    if netns.exists() {
        left.push(format!("the pod's network namespace {}", netns.display()));
    }
    let route = Command::new("ip")
        .args(["-o", "route", "show", &format!("{ip}/32")])
        .output()
        .map_err(|e| format!("ip route: {e}"))?;
    if !text(&route.stdout).trim().is_empty() {
        left.push(format!(
            "the host's route to the pod: {}",
            text(&route.stdout)
        ));
    }
    if !left.is_empty() {
        return Err(format!(
            "left behind: {left:#?}; containerd's log ends: {}",
            tail(&cd.log(), 3000)
        ));
    }
    Ok(PodRun {
        ip,
        boot_ids: (app_boot, sidecar_boot),
        log,
        stats: (cpu_ns, working_set),
        start,
        teardown,
    })
}

/// The first container's CRI log: every line in the CRI format, its output on the right
/// streams, the SIGTERM trap's line last.
fn check_app_log(log: &str) -> Result<(), String> {
    let lines: Vec<LogLine<'_>> = log
        .lines()
        .map(|l| parse_log_line(l).ok_or_else(|| format!("not a CRI log line: {l:?} in {log:?}")))
        .collect::<Result<_, _>>()?;
    let got: Vec<(&str, &str, &str)> = lines.iter().map(|l| (l.stream, l.tag, l.text)).collect();
    let stdout: Vec<_> = got.iter().filter(|l| l.0 == "stdout").copied().collect();
    let expected_stdout = [
        ("stdout", "F", "hello from app"),
        ("stdout", "F", "stopping"),
    ];
    if stdout != expected_stdout || !got.contains(&("stderr", "F", "warning-on-stderr")) {
        return Err(format!(
            "the CRI log holds {got:?}; expected stdout {expected_stdout:?} and stderr \
             \"warning-on-stderr\""
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines() {
        assert_eq!(
            parse_log_line("2026-12-05T04:40:01.123456789Z stdout F hello world"),
            Some(LogLine {
                stream: "stdout",
                tag: "F",
                text: "hello world"
            })
        );
        assert_eq!(
            parse_log_line("2026-12-05T04:40:01.1+01:00 stderr P ").map(|l| l.tag),
            Some("P")
        );
        assert_eq!(parse_log_line("hello world"), None);
        assert_eq!(parse_log_line("2026-12-05T04:40:01Z stdin F x"), None);
        assert_eq!(parse_log_line("2026-12-05T04:40:01Z stdout X x"), None);
    }
}
