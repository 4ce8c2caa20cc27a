//! The agent of a sandbox and the commands run through it.

use std::collections::BTreeMap;
use std::sync::Arc;

use agent::AgentClient;

use super::{lock, Live, Manager};
use crate::error::{Error, Result};
use crate::model::{ExecRequest, ExecResult, Isolation, TtySize};

impl Manager {
    /// The agent of a running sandbox (one paused or saved is resumed first when its
    /// lifecycle says so), connecting (again) when needed.
    pub async fn agent(&self, tenant: &str, id: &str) -> Result<AgentClient> {
        let row = self.awake(tenant, id).await?;
        let live = self.live(id);
        let mut agent = live.agent.lock().await;
        if let Some(c) = agent.as_ref() {
            return Ok(c.clone());
        }
        let c = self.connect_agent(&row).await?;
        *agent = Some(c.clone());
        Ok(c)
    }

    /// The run-time state of sandbox `id`, made empty when this manager has none yet (an
    /// adopted sandbox).
    pub(super) fn live(&self, id: &str) -> Arc<Live> {
        lock(&self.inner.live)
            .entry(id.to_owned())
            .or_insert_with(|| Arc::new(Live::default()))
            .clone()
    }

    /// Forgets a broken agent connection so the next call reconnects.
    async fn drop_agent(&self, id: &str) {
        let live = lock(&self.inner.live).get(id).cloned();
        if let Some(live) = live {
            live.agent.lock().await.take();
        }
    }

    /// Starts an exec; stdin is always a pipe (closed at once when the caller has none).
    pub async fn start_exec(
        &self,
        tenant: &str,
        id: &str,
        req: &ExecRequest,
    ) -> Result<agent::ExecSession> {
        if req.cmd.is_empty() || req.cmd[0].is_empty() {
            return Err(Error::Invalid(
                "cmd must name a program: [\"program\", \"arg\", ...]".into(),
            ));
        }
        validate_env(&req.env)?;
        let sandbox = self.get(tenant, id)?;
        let mut er = agent::ExecRequest::new(req.cmd.clone());
        for (k, v) in sandbox.env.iter().chain(&req.env) {
            er = er.env(k.clone(), v.clone());
        }
        // An image's WorkingDir and User are the defaults (its user only in the vm tier: a
        // jail's processes run as the sandbox's own uid, without the capability to switch).
        let image = sandbox.image.as_ref();
        if let Some(cwd) = req
            .cwd
            .as_ref()
            .or(image.and_then(|i| i.config.working_dir.as_ref()))
        {
            er = er.cwd(cwd.clone());
        }
        if let Some(image) = image.filter(|_| sandbox.isolation == Isolation::Vm) {
            er.uid = Some(image.uid);
            er.gid = Some(image.gid);
        }
        if let Some((rows, cols)) = pty_size(req)? {
            er = er.pty(rows, cols);
        }
        er.stdin = true;
        er.timeout_ms = req.timeout_s.map(|s| s.saturating_mul(1000));
        let client = self.agent(tenant, id).await?;
        self.inner
            .metrics
            .execs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match client.exec(er.clone()).await {
            Ok(session) => Ok(session),
            Err(agent::ClientError::Disconnected(_)) => {
                // A stale connection (e.g. the sandbox was resumed or adopted): once more.
                self.drop_agent(id).await;
                Ok(self.agent(tenant, id).await?.exec(er).await?)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Runs a command to completion and returns its output: at most `bounds.exec_output`
    /// bytes of each stream, the rest drained and discarded (the process runs on as into a
    /// pipe, not killed) and flagged `*_truncated`. Stdin is fed while the output is read, so
    /// a process echoing a large stdin does not stall.
    pub async fn exec(&self, tenant: &str, id: &str, req: &ExecRequest) -> Result<ExecResult> {
        let mut session = self.start_exec(tenant, id, req).await?;
        let stdin = session.stdin.take();
        let feed = async {
            match stdin {
                Some(s) => s.feed(req.stdin.as_deref().unwrap_or("").as_bytes()).await,
                None => Ok(()),
            }
        };
        let limit = self.inner.cfg.bounds.exec_output;
        let (fed, out) = tokio::join!(feed, session.wait_with_output_limited(limit));
        let out = out?;
        fed?;
        let text = |bytes: Vec<u8>| {
            String::from_utf8(bytes)
                .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        };
        Ok(ExecResult {
            exit: out.status.into(),
            stdout: text(out.stdout),
            stderr: text(out.stderr),
            stdout_truncated: out.stdout_truncated,
            stderr_truncated: out.stderr_truncated,
        })
    }
}

/// The pty an exec asks for: none, `tty_size`, or 24x80.
fn pty_size(req: &ExecRequest) -> Result<Option<(u16, u16)>> {
    match (req.tty, req.tty_size) {
        (true, None) => Ok(Some((24, 80))),
        (true, Some(TtySize { rows, cols })) if rows > 0 && cols > 0 => Ok(Some((rows, cols))),
        (true, Some(_)) => Err(Error::Invalid(
            "tty_size: rows and cols must be at least 1".into(),
        )),
        (false, Some(_)) => Err(Error::Invalid("tty_size needs \"tty\": true".into())),
        (false, None) => Ok(None),
    }
}

pub(super) fn validate_env(env: &BTreeMap<String, String>) -> Result<()> {
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(Error::Invalid(format!(
                "environment variable {k:?}: names must be non-empty without '=' or NUL, values without NUL"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pty_sizes() {
        let req = |tty, tty_size| ExecRequest {
            tty,
            tty_size,
            ..ExecRequest::default()
        };
        let size = |rows, cols| Some(TtySize { rows, cols });
        assert_eq!(pty_size(&req(false, None)).unwrap(), None);
        assert_eq!(pty_size(&req(true, None)).unwrap(), Some((24, 80)));
        assert_eq!(pty_size(&req(true, size(17, 91))).unwrap(), Some((17, 91)));
        for bad in [
            req(true, size(0, 80)),
            req(true, size(24, 0)),
            req(false, size(24, 80)),
        ] {
            assert!(pty_size(&bad).unwrap_err().to_string().contains("tty_size"));
        }
    }

    #[test]
    fn env_validation() {
        let env = |k: &str| BTreeMap::from([(k.to_owned(), "v".to_owned())]);
        validate_env(&env("A_B")).unwrap();
        assert!(validate_env(&env("")).is_err());
        assert!(validate_env(&env("A=B")).is_err());
    }
}
