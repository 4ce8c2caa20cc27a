//! Task.Update and Task.Stats: the sandbox's limits changed live, and its usage.

use containerd_shim::protos::api;
use containerd_shim::protos::cgroups::metrics::{
    CPUStat, CPUUsage, MemoryEntry, MemoryStat, Metrics, PidsStat,
};
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::util::convert_to_any;
use mvm_sandbox::manager::LimitsUpdate;

use super::container::{container, own_sandbox};
use super::TaskService;
use crate::error::{Error, Result};

/// `type_url` suffix of the OCI `LinuxResources` that containerd sends in an Update.
const LINUX_RESOURCES: &str = "/LinuxResources";

impl TaskService {
    /// Applies the memory limit and CPU quota/period of an Update to the sandbox.
    pub(super) async fn update(&self, req: &api::UpdateTaskRequest) -> Result<()> {
        let update = limits_update(&req.resources)?;
        let sandbox = {
            let mut slot = self.inner.containers.lock().await;
            own_sandbox(container(&mut slot, &req.id)?, "given other limits")?
        };
        let (manager, tenant) = self.manager().await?;
        let resized = manager
            .update_limits(&tenant.name, &sandbox, update)
            .await?;
        log::info!(
            "container {}: limits updated ({update:?}): sandbox {} now {} MiB, {} vCPUs",
            req.id,
            resized.id,
            resized.memory_mib,
            resized.vcpus
        );
        if let Some(c) = self.inner.containers.lock().await.get_mut(&req.id) {
            c.sandbox = resized;
        }
        Ok(())
    }

    /// Task.Stats: the sandbox's memory, CPU time and pids, as cgroup v1 `Metrics`.
    pub(super) async fn stats(&self, id: &str) -> Result<api::StatsResponse> {
        let sandbox = {
            let mut slot = self.inner.containers.lock().await;
            container(&mut slot, id)?.sandbox.id.clone()
        };
        let (manager, tenant) = self.manager().await?;
        let s = manager.stats(&tenant.name, &sandbox)?;
        let mut m = Metrics::new();
        m.memory = MessageField::some(MemoryStat {
            usage: MessageField::some(MemoryEntry {
                usage: s.memory_bytes,
                ..Default::default()
            }),
            ..Default::default()
        });
        m.cpu = MessageField::some(CPUStat {
            usage: MessageField::some(CPUUsage {
                total: s.cpu_ns,
                ..Default::default()
            }),
            ..Default::default()
        });
        m.pids = MessageField::some(PidsStat {
            current: s.pids,
            ..Default::default()
        });
        let stats = convert_to_any(Box::new(m)).map_err(|e| Error::host("encoding stats", e))?;
        Ok(api::StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }
}

/// The limits of an Update's `resources`: OCI `LinuxResources` as JSON, as containerd sends
/// them. The memory limit and the CPU quota and period apply; zero or absent values keep the
/// current ones; the other resources (shares, cpusets, pids, block I/O, ...) are not applied.
fn limits_update(
    resources: &MessageField<containerd_shim::protos::protobuf::well_known_types::any::Any>,
) -> Result<LimitsUpdate> {
    let any = resources
        .as_ref()
        .ok_or_else(|| Error::Invalid("the update has no resources".into()))?;
    if !any.type_url.ends_with(LINUX_RESOURCES) {
        return Err(Error::Invalid(format!(
            "resources of type {:?} cannot be applied: containerd-shim-mvm-v2 takes OCI \
             LinuxResources",
            any.type_url
        )));
    }
    let r: oci_spec::runtime::LinuxResources = serde_json::from_slice(&any.value)
        .map_err(|e| Error::Invalid(format!("update resources (OCI LinuxResources): {e}")))?;
    let unlimited = |what: &str| {
        Error::Invalid(format!(
            "an mvm sandbox cannot have an unlimited {what}: give a positive value"
        ))
    };
    let limit = |v: Option<i64>, what: &str| match v {
        Some(v) if v < 0 => Err(unlimited(what)),
        Some(v) if v > 0 => Ok(Some(v as u64)),
        _ => Ok(None),
    };
    let cpu = r.cpu().as_ref();
    Ok(LimitsUpdate {
        memory_bytes: limit(r.memory().as_ref().and_then(|m| m.limit()), "memory limit")?,
        cpu_quota_us: limit(cpu.and_then(|c| c.quota()), "CPU quota")?,
        cpu_period_us: cpu.and_then(|c| c.period()).filter(|&p| p > 0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_shim::protos::protobuf::well_known_types::any::Any;

    fn resources(type_url: &str, json: &str) -> MessageField<Any> {
        MessageField::some(Any {
            type_url: type_url.into(),
            value: json.as_bytes().to_vec(),
            ..Default::default()
        })
    }

    const URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources";

    #[test]
    fn update_resources_from_containerd() {
        let r = resources(
            URL,
            r#"{"devices":[{"allow":false,"access":"rwm"}],"memory":{"limit":33554432},
                "cpu":{"shares":1024,"quota":50000,"period":100000}}"#,
        );
        assert_eq!(
            limits_update(&r).unwrap(),
            LimitsUpdate {
                memory_bytes: Some(32 << 20),
                cpu_quota_us: Some(50_000),
                cpu_period_us: Some(100_000),
            }
        );
        // Zero and absent keep the current values.
        let r = resources(URL, r#"{"memory":{"limit":0},"cpu":{"shares":512}}"#);
        assert_eq!(limits_update(&r).unwrap(), LimitsUpdate::default());
    }

    #[test]
    fn update_resources_refused() {
        let unlimited = resources(URL, r#"{"memory":{"limit":-1}}"#);
        let err = limits_update(&unlimited).unwrap_err().to_string();
        assert!(err.contains("unlimited memory limit"), "{err}");
        let unlimited = resources(URL, r#"{"cpu":{"quota":-1}}"#);
        limits_update(&unlimited).unwrap_err();
        let windows = resources("types.containerd.io/WindowsResources", "{}");
        let err = limits_update(&windows).unwrap_err().to_string();
        assert!(err.contains("LinuxResources"), "{err}");
        limits_update(&resources(URL, "{not json")).unwrap_err();
        limits_update(&MessageField::none()).unwrap_err();
    }
}
