//! The OOM watch: the OOM kills in a sandbox's host cgroup become `/tasks/oom` events.

use std::sync::Arc;
use std::time::Duration;

use containerd_shim::protos::events::task::TaskOOM;
use mvm_sandbox::manager::cgroups::LimitCgroups;
use tokio::sync::Mutex;

use super::TaskService;
use crate::error::Result;

/// How often the sandbox's OOM kill counter is read.
const OOM_POLL: Duration = Duration::from_millis(100);

/// A sandbox's OOM kill reports and the task polling them while the container exists.
pub(super) struct OomWatch {
    pub(super) reports: Arc<OomReports>,
    pub(super) task: tokio::task::AbortHandle,
}

/// The OOM kills of a container's sandbox, and how many of them containerd has heard of.
pub(super) struct OomReports {
    container_id: String,
    sandbox: String,
    /// The sandbox's cgroups and their OOM kill counter as last seen (`None` until the first
    /// look); held while a report is published, so each kill is reported once.
    seen: Mutex<Option<(LimitCgroups, u64)>>,
}

impl TaskService {
    /// Publishes a `/tasks/oom` event when the OOM killer has struck in the sandbox since the
    /// last look (the first look only takes the count).
    pub(super) async fn report_ooms(&self, oom: &OomReports) -> Result<()> {
        let mut seen = oom.seen.lock().await;
        let Some((cgroups, reported)) = seen.as_mut() else {
            let (manager, tenant) = self.manager().await?;
            let cgroups = manager.limit_cgroups(&tenant.name, &oom.sandbox)?;
            let kills = cgroups.oom_kills()?;
            *seen = Some((cgroups, kills));
            return Ok(());
        };
        let kills = cgroups.oom_kills()?;
        if kills > *reported {
            log::info!(
                "container {}: the OOM killer struck in sandbox {}",
                oom.container_id,
                oom.sandbox
            );
            self.publish(
                containerd_shim::protos::topics::TASK_OOM_EVENT_TOPIC,
                Box::new(TaskOOM {
                    container_id: oom.container_id.clone(),
                    ..Default::default()
                }),
            )
            .await;
        }
        *reported = kills;
        Ok(())
    }

    /// Watches the OOM kills of `sandbox`, reported as container `container_id`'s.
    pub(super) fn watch_oom(&self, container_id: &str, sandbox: &str) -> OomWatch {
        let reports = Arc::new(OomReports {
            container_id: container_id.to_owned(),
            seen: Mutex::new(None),
            sandbox: sandbox.to_owned(),
        });
        OomWatch {
            task: self.poll_ooms(Arc::clone(&reports)),
            reports,
        }
    }

    /// Reports the sandbox's OOM kills every [`OOM_POLL`] until aborted (Delete) or the
    /// sandbox's cgroups are gone.
    fn poll_ooms(&self, oom: Arc<OomReports>) -> tokio::task::AbortHandle {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(OOM_POLL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = this.report_ooms(&oom).await {
                    log::warn!("container {}: no more OOM events: {e}", oom.container_id);
                    return;
                }
            }
        })
        .abort_handle()
    }
}
