//! From an OCI bundle to mvm requests: the sandbox's tier and size, and the processes' argv,
//! environment, working directory and user.

use std::path::{Path, PathBuf};

use mvm_sandbox::model::{CreateSandbox, Isolation};
use oci_spec::runtime::{Process, Spec};

use crate::error::{Error, Result};

/// The annotation that picks a container's isolation tier (`vm` or `jail`).
pub const ISOLATION_ANNOTATION: &str = "io.mvm.isolation";

/// CRI's annotation naming what a container is: `sandbox` (the pod's first, "pause"
/// container) or `container`.
pub const CONTAINER_TYPE_ANNOTATION: &str = "io.kubernetes.cri.container-type";
/// CRI's annotation naming the pod sandbox (its first container's id) a container joins.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// A container's place in a pod, from CRI's annotations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodRole {
    /// Not part of a pod (e.g. `ctr run`), or a pod's first container: it gets a sandbox.
    Own,
    /// A further container of the pod whose first container is `sandbox`.
    Member {
        /// The pod's sandbox id (its first container's id).
        sandbox: String,
    },
}

/// The container's [`PodRole`].
pub fn pod_role(spec: &Spec) -> PodRole {
    let annotations = spec.annotations().as_ref();
    let get = |key| annotations.and_then(|a| a.get(key)).map(String::as_str);
    match (get(CONTAINER_TYPE_ANNOTATION), get(SANDBOX_ID_ANNOTATION)) {
        (Some("container"), Some(sandbox)) if !sandbox.is_empty() => PodRole::Member {
            sandbox: sandbox.to_owned(),
        },
        _ => PodRole::Own,
    }
}

/// The network namespace the spec names by path (a pod's, made by the runtime's CNI
/// plugins), which the sandbox joins instead of getting one of its own.
pub fn network_namespace(spec: &Spec) -> Option<PathBuf> {
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|ns| ns.typ() == oci_spec::runtime::LinuxNamespaceType::Network)?
        .path()
        .clone()
}

/// Whether the container is a pod's first ("pause") container, whose sandbox the pod's
/// other containers join.
pub fn is_pod_sandbox(spec: &Spec) -> bool {
    spec.annotations()
        .as_ref()
        .and_then(|a| a.get(CONTAINER_TYPE_ANNOTATION))
        .is_some_and(|t| t == "sandbox")
}

/// The shim that serves a container: its pod's (named by the pod's sandbox id), so that one
/// shim process and one sandbox hold the whole pod, or its own.
pub fn shim_grouping(spec: &Spec, id: &str) -> String {
    match pod_role(spec) {
        PodRole::Member { sandbox } => sandbox,
        PodRole::Own => id.to_owned(),
    }
}

/// Smallest sandbox the manager makes, in MiB.
const MIN_MEMORY_MIB: u64 = 16;
/// Most vCPUs (vm) or cores of CPU quota (jail) of a sandbox.
const MAX_VCPUS: u32 = 32;

/// Reads `config.json` of `bundle`.
pub fn load(bundle: &Path) -> Result<Spec> {
    let path = bundle.join("config.json");
    Spec::load(&path).map_err(|e| Error::Invalid(format!("OCI spec {}: {e}", path.display())))
}

/// The container's root directory on the host (`root.path`, relative to the bundle).
pub fn rootfs(spec: &Spec, bundle: &Path) -> PathBuf {
    let root = spec
        .root()
        .as_ref()
        .map(|r| r.path().clone())
        .unwrap_or_else(|| "rootfs".into());
    bundle.join(root)
}

/// The tier: the `io.mvm.isolation` annotation, else `default` (the shim's `MVM_ISOLATION`).
pub fn isolation(spec: &Spec, default: Isolation) -> Result<Isolation> {
    match spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(ISOLATION_ANNOTATION))
    {
        Some(v) => v
            .parse()
            .map_err(|e| Error::Invalid(format!("annotation {ISOLATION_ANNOTATION}: {e}"))),
        None => Ok(default),
    }
}

/// The sandbox for `spec`: its tier, vCPUs from the CPU quota (rounded up, at least 1) and
/// memory from the memory limit (rounded up to MiB, at least 16); no timeout.
pub fn sandbox_request(spec: &Spec, isolation: Isolation, container_id: &str) -> CreateSandbox {
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let memory_mib = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
        .filter(|&l| l > 0)
        .map(|l| (l as u64).div_ceil(1 << 20).max(MIN_MEMORY_MIB));
    let vcpus =
        resources
            .and_then(|r| r.cpu().as_ref())
            .and_then(|c| match (c.quota(), c.period()) {
                (Some(q), Some(p)) if q > 0 && p > 0 => {
                    Some((q as u64).div_ceil(p).clamp(1, u64::from(MAX_VCPUS)) as u32)
                }
                _ => None,
            });
    CreateSandbox {
        vcpus,
        memory_mib,
        timeout_s: Some(0),
        isolation: Some(isolation),
        metadata: [("containerd.id".to_owned(), container_id.to_owned())].into(),
        ..Default::default()
    }
}

/// The agent request that runs `process`. The user is honoured in the vm tier, where the
/// agent is root in the guest; in the jail tier every process runs as the jail's user.
pub fn exec_request(
    process: &Process,
    isolation: Isolation,
    stdin: bool,
) -> Result<agent::ExecRequest> {
    let args = process.args().clone().unwrap_or_default();
    if args.first().is_none_or(|a| a.is_empty()) {
        return Err(Error::Invalid(
            "the OCI process has no args: give the image a command or pass one".into(),
        ));
    }
    let mut req = agent::ExecRequest::new(args);
    for kv in process.env().iter().flatten() {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => req = req.env(k, v),
            _ => {
                return Err(Error::Invalid(format!(
                    "environment entry {kv:?} is not NAME=VALUE"
                )))
            }
        }
    }
    let cwd = process.cwd();
    if !cwd.as_os_str().is_empty() {
        req = req.cwd(cwd.to_string_lossy().into_owned());
    }
    if isolation == Isolation::Vm {
        req.uid = Some(process.user().uid());
        req.gid = Some(process.user().gid());
    }
    if process.terminal().unwrap_or(false) {
        let size = process.console_size();
        let (rows, cols) = size
            .as_ref()
            .map(|b| (b.height() as u16, b.width() as u16))
            .filter(|&(r, c)| r > 0 && c > 0)
            .unwrap_or((24, 80));
        req = req.pty(rows, cols);
    }
    req.stdin = stdin;
    Ok(req)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oci_spec::runtime::{
        LinuxBuilder, LinuxCpuBuilder, LinuxMemoryBuilder, LinuxResourcesBuilder, ProcessBuilder,
        SpecBuilder,
    };

    fn spec(annotation: Option<&str>, memory: Option<i64>, cpu: Option<(i64, u64)>) -> Spec {
        let mut res = LinuxResourcesBuilder::default();
        if let Some(m) = memory {
            res = res.memory(LinuxMemoryBuilder::default().limit(m).build().unwrap());
        }
        if let Some((q, p)) = cpu {
            res = res.cpu(
                LinuxCpuBuilder::default()
                    .quota(q)
                    .period(p)
                    .build()
                    .unwrap(),
            );
        }
        let linux = LinuxBuilder::default()
            .resources(res.build().unwrap())
            .build()
            .unwrap();
        let mut b = SpecBuilder::default().linux(linux);
        if let Some(a) = annotation {
            b = b.annotations(
                [(ISOLATION_ANNOTATION.to_owned(), a.to_owned())]
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>(),
            );
        }
        b.build().unwrap()
    }

    #[test]
    fn tier_from_annotation_or_default() {
        assert_eq!(
            isolation(&spec(None, None, None), Isolation::Vm).unwrap(),
            Isolation::Vm
        );
        assert_eq!(
            isolation(&spec(None, None, None), Isolation::Jail).unwrap(),
            Isolation::Jail
        );
        assert_eq!(
            isolation(&spec(Some("jail"), None, None), Isolation::Vm).unwrap(),
            Isolation::Jail
        );
        let err = isolation(&spec(Some("kvm"), None, None), Isolation::Vm).unwrap_err();
        assert!(err.to_string().contains("io.mvm.isolation"), "{err}");
    }

    #[test]
    fn limits_round_up() {
        let r = sandbox_request(
            &spec(None, Some(33 << 20 | 1), Some((150_000, 100_000))),
            Isolation::Jail,
            "c",
        );
        assert_eq!(r.memory_mib, Some(34));
        assert_eq!(r.vcpus, Some(2));
        let r = sandbox_request(
            &spec(None, Some(4096), Some((-1, 100_000))),
            Isolation::Jail,
            "c",
        );
        assert_eq!(r.memory_mib, Some(MIN_MEMORY_MIB));
        assert_eq!(r.vcpus, None);
        let r = sandbox_request(
            &spec(None, None, Some((100_000_000, 1000))),
            Isolation::Vm,
            "c",
        );
        assert_eq!(r.memory_mib, None);
        assert_eq!(r.vcpus, Some(MAX_VCPUS));
        assert_eq!(r.timeout_s, Some(0));
    }

    #[test]
    fn process_to_exec() {
        let p = ProcessBuilder::default()
            .args(vec!["sh".to_owned(), "-c".to_owned(), "true".to_owned()])
            .env(vec!["A=1".to_owned(), "B=x=y".to_owned()])
            .cwd("/tmp")
            .build()
            .unwrap();
        let r = exec_request(&p, Isolation::Jail, true).unwrap();
        assert_eq!(r.argv, ["sh", "-c", "true"]);
        assert_eq!(
            r.env,
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(r.cwd.as_deref(), Some("/tmp"));
        assert_eq!(r.uid, None);
        assert!(r.stdin && r.pty.is_none());
        assert_eq!(exec_request(&p, Isolation::Vm, false).unwrap().uid, Some(0));
        let bad = ProcessBuilder::default()
            .args(Vec::<String>::new())
            .cwd("/")
            .build()
            .unwrap();
        exec_request(&bad, Isolation::Jail, false).unwrap_err();
        let bad = ProcessBuilder::default()
            .args(vec!["x".to_owned()])
            .env(vec!["NOEQUALS".to_owned()])
            .cwd("/")
            .build()
            .unwrap();
        exec_request(&bad, Isolation::Jail, false).unwrap_err();
    }

    #[test]
    fn pod_roles_from_cri_annotations() {
        let with = |pairs: &[(&str, &str)]| {
            SpecBuilder::default()
                .annotations(
                    pairs
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect::<std::collections::HashMap<_, _>>(),
                )
                .build()
                .unwrap()
        };
        let plain = with(&[]);
        assert_eq!(pod_role(&plain), PodRole::Own);
        assert_eq!(shim_grouping(&plain, "c1"), "c1");
        let first = with(&[
            (CONTAINER_TYPE_ANNOTATION, "sandbox"),
            (SANDBOX_ID_ANNOTATION, "pod1"),
        ]);
        assert_eq!(pod_role(&first), PodRole::Own);
        assert!(is_pod_sandbox(&first) && !is_pod_sandbox(&plain));
        assert_eq!(shim_grouping(&first, "pod1"), "pod1");
        let member = with(&[
            (CONTAINER_TYPE_ANNOTATION, "container"),
            (SANDBOX_ID_ANNOTATION, "pod1"),
        ]);
        assert_eq!(
            pod_role(&member),
            PodRole::Member {
                sandbox: "pod1".into()
            }
        );
        assert_eq!(shim_grouping(&member, "c2"), "pod1");
        assert_eq!(network_namespace(&plain), None);
        let orphan = with(&[(CONTAINER_TYPE_ANNOTATION, "container")]);
        assert_eq!(pod_role(&orphan), PodRole::Own);
    }
}
