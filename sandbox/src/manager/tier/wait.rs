//! The waits of a sandbox's start-up: polling until the tier's agent is there, failing early
//! (with the console's tail) when the jailer exits or the deadline passes.

use std::time::{Duration, Instant};

use agent::{AgentClient, ClientError};

use super::vm;
use crate::db::SandboxRow;
use crate::error::{Error, Result};
use crate::manager::{lock, Live, Manager};
use crate::model::Sandbox;

impl Manager {
    /// Polls `ready` until it holds, failing early when the jailer exits.
    pub(super) async fn wait_for(
        &self,
        live: &Live,
        s: &Sandbox,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_micros(200);
        while !ready() {
            if let Some(e) = self.start_up_failure(live, s, deadline, || {
                format!("the sandbox did not come up within {timeout:?}")
            }) {
                return Err(e);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Connects to the agent of `row` once it answers, failing early when the jailer exits.
    /// A guest restored from a snapshot is given `becoming`'s identity in the handshake (see
    /// [`AgentClient::connect_hybrid_vsock_reidentified`]); an agent that refuses it is not
    /// asked again.
    pub(in crate::manager) async fn wait_agent(
        &self,
        live: &Live,
        row: &SandboxRow,
        timeout: Duration,
        becoming: Option<vm::Becoming<'_>>,
    ) -> Result<AgentClient> {
        let s = &row.sandbox;
        let deadline = Instant::now() + timeout;
        loop {
            let identity = becoming.map(|b| b.identity()).transpose()?;
            let attempt = self.connect_agent_giving(row, identity).await;
            match attempt {
                Ok(c) => return Ok(c),
                Err(e @ Error::Agent(ClientError::Remote(_))) => return Err(e),
                Err(e) => {
                    if let Some(e) = self.start_up_failure(live, s, deadline, || {
                        format!(
                            "the sandbox agent did not come up within {timeout:?} (last attempt: {e})"
                        )
                    }) {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }

    /// Why a start-up cannot go on, with the console's tail: the jailer exited, or `deadline`
    /// passed (`late` says what did not come up); `None` while it may.
    pub(super) fn start_up_failure(
        &self,
        live: &Live,
        s: &Sandbox,
        deadline: Instant,
        late: impl FnOnce() -> String,
    ) -> Option<Error> {
        let why = match exited(live) {
            Some(status) => format!("the sandbox exited during start-up ({status})"),
            None if Instant::now() > deadline => late(),
            None => return None,
        };
        Some(Error::Host(format!(
            "{why}; its console said: {}",
            self.console_tail(s, 2000)
        )))
    }

    fn console_tail(&self, s: &Sandbox, max: usize) -> String {
        let log =
            std::fs::read(self.inner.cfg.console(s.isolation, &s.id).path()).unwrap_or_default();
        let tail = &log[log.len().saturating_sub(max)..];
        let text = String::from_utf8_lossy(tail).trim().to_owned();
        if text.is_empty() {
            "(nothing)".into()
        } else {
            text
        }
    }
}

/// The jailer child's exit status, once it has exited.
fn exited(live: &Live) -> Option<std::process::ExitStatus> {
    lock(&live.child)
        .as_mut()
        .and_then(|c| c.try_wait().ok().flatten())
}
