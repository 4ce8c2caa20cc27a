//! Exec sessions: starting a process, its stdin, its output streams, its exit.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::error::unexpected;
use super::routes::{Chunk, Expect, Shared, Sink};
use super::{AgentClient, ClientError, DEFAULT_OUTPUT_LIMIT};
use crate::flow::{RecvBudget, SendWindow};
use crate::protocol::{Channel, ClientMessage, ExecRequest, ExitStatus, Reply, Request, MAX_CHUNK};

impl AgentClient {
    pub(super) fn output_stream(&self, id: u64, channel: Channel) -> (Sink, OutputStream) {
        let (tx, rx) = mpsc::unbounded_channel();
        let budget = Arc::new(RecvBudget::new());
        let stream = OutputStream {
            shared: Arc::clone(&self.shared),
            id,
            channel,
            rx,
            budget: Arc::clone(&budget),
        };
        (Sink { tx, budget }, stream)
    }

    /// Starts a process. Its stdout and stderr must be read (or dropped) for it to make
    /// progress: the agent stops reading a stream whose credit is used up.
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecSession, ClientError> {
        let id = self.next_id();
        let (stdout_sink, stdout) = self.output_stream(id, Channel::Stdout);
        let (stderr_sink, stderr) = self.output_stream(id, Channel::Stderr);
        let (exit_tx, exit) = oneshot::channel();
        let window = request.stdin.then(|| Arc::new(SendWindow::new()));
        let mut pending = self.begin(
            id,
            Request::Exec(request),
            Expect::Replies(1),
            vec![
                (Channel::Stdout, stdout_sink),
                (Channel::Stderr, stderr_sink),
            ],
            Some(exit_tx),
            window.clone().map(|w| (Channel::Stdin, w)),
        )?;
        let pid = match pending.next().await? {
            Reply::ExecStarted { pid } => pid,
            other => return Err(unexpected(other, "Exec")),
        };
        pending.detach();
        Ok(ExecSession {
            control: ExecControl {
                client: self.clone(),
                id,
            },
            pid,
            stdin: window.map(|window| ExecStdin {
                shared: Arc::clone(&self.shared),
                id,
                window,
                closed: false,
            }),
            stdout: Some(stdout),
            stderr: Some(stderr),
            exit,
            status: None,
        })
    }
}

/// A running process started by [`AgentClient::exec`].
///
/// Take `stdin`, `stdout` and `stderr` to stream them, or use [`wait_with_output`].
/// Dropping the session does not kill the process; its untaken output is discarded.
/// [`control`] gives a cloneable handle for signalling or resizing from other tasks.
///
/// [`wait_with_output`]: ExecSession::wait_with_output
/// [`control`]: ExecSession::control
pub struct ExecSession {
    control: ExecControl,
    pid: u32,
    /// The process's stdin, when the request enabled it.
    pub stdin: Option<ExecStdin>,
    /// The process's stdout (the terminal output with a pty).
    pub stdout: Option<OutputStream>,
    /// The process's stderr (empty with a pty).
    pub stderr: Option<OutputStream>,
    exit: oneshot::Receiver<ExitStatus>,
    status: Option<ExitStatus>,
}

/// What an exec produced, up to a limit per stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// Stdout, or its first `limit` bytes.
    pub stdout: Vec<u8>,
    /// Stderr, or its first `limit` bytes.
    pub stderr: Vec<u8>,
    /// Stdout went on past the limit; the rest was discarded.
    pub stdout_truncated: bool,
    /// Stderr went on past the limit; the rest was discarded.
    pub stderr_truncated: bool,
}

/// Signals and resizes an exec; cheap to clone and usable while another task waits.
#[derive(Clone, Debug)]
pub struct ExecControl {
    client: AgentClient,
    id: u64,
}

impl ExecControl {
    /// The exec's request id on its connection.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the exec's process group. Fails with
    /// `NoSuchExec` once the exec has finished.
    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.client
            .call_done(
                Request::Signal {
                    exec: self.id,
                    signal,
                },
                "Signal",
            )
            .await
    }

    /// Resizes the pty (fails for an exec without one).
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.client
            .call_done(
                Request::Resize {
                    exec: self.id,
                    size: crate::protocol::PtySize { rows, cols },
                },
                "Resize",
            )
            .await
    }
}

impl ExecSession {
    /// The exec's request id on its connection.
    pub fn id(&self) -> u64 {
        self.control.id
    }

    /// The process id in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// A handle to signal or resize this exec from elsewhere.
    pub fn control(&self) -> ExecControl {
        self.control.clone()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process group.
    pub async fn signal(&self, signal: i32) -> Result<(), ClientError> {
        self.control.signal(signal).await
    }

    /// Resizes the pty (fails for an exec without one).
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.control.resize(rows, cols).await
    }

    /// Closes stdin, discards output not taken, and waits for the exit status. Can be
    /// called again (or raced in `select!`) and returns the same status.
    pub async fn wait(&mut self) -> Result<ExitStatus, ClientError> {
        self.stdin.take();
        self.stdout.take();
        self.stderr.take();
        self.exit_status().await
    }

    /// [`wait_with_output_limited`](Self::wait_with_output_limited) to
    /// [`DEFAULT_OUTPUT_LIMIT`] bytes per stream.
    pub async fn wait_with_output(self) -> Result<Output, ClientError> {
        self.wait_with_output_limited(DEFAULT_OUTPUT_LIMIT).await
    }

    /// Closes stdin, collects at most `limit` bytes of stdout and of stderr (those not
    /// taken), and waits for the exit. Output past the limit is still read, so the process
    /// runs on as it would into a pipe, and discarded; `Output` says which stream was cut.
    pub async fn wait_with_output_limited(mut self, limit: usize) -> Result<Output, ClientError> {
        self.stdin.take();
        let (out, err) = tokio::join!(
            read_limited(self.stdout.take(), limit),
            read_limited(self.stderr.take(), limit)
        );
        let status = self.exit_status().await?;
        let ((stdout, stdout_truncated), (stderr, stderr_truncated)) = (out?, err?);
        Ok(Output {
            status,
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
        })
    }

    async fn exit_status(&mut self) -> Result<ExitStatus, ClientError> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        let status = (&mut self.exit)
            .await
            .map_err(|_| self.control.client.shared.disconnected())?;
        self.status = Some(status);
        Ok(status)
    }
}

async fn read_limited(
    stream: Option<OutputStream>,
    limit: usize,
) -> Result<(Vec<u8>, bool), ClientError> {
    match stream {
        Some(mut stream) => stream.read_limited(limit).await,
        None => Ok((Vec::new(), false)),
    }
}

/// The stdin of an exec. Dropping it closes the process's stdin.
pub struct ExecStdin {
    shared: Arc<Shared>,
    id: u64,
    window: Arc<SendWindow>,
    closed: bool,
}

impl ExecStdin {
    /// Writes all of `data`, waiting while the agent's window is full (the process does
    /// not read).
    pub async fn write(&mut self, mut data: &[u8]) -> Result<(), ClientError> {
        while !data.is_empty() {
            let Some(n) = self.window.take(data.len().min(MAX_CHUNK)).await else {
                return Err(if self.shared.state().closed.is_some() {
                    self.shared.disconnected()
                } else {
                    ClientError::StdinClosed
                });
            };
            self.shared.send(ClientMessage::Data {
                id: self.id,
                channel: Channel::Stdin,
                data: data[..n].to_vec(),
            })?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Writes all of `data`, then closes stdin. A process that ends without reading all of
    /// it is no error (as with a pipe into a process that exits).
    pub async fn feed(mut self, data: &[u8]) -> Result<(), ClientError> {
        match self.write(data).await {
            Ok(()) => self.close(),
            Err(ClientError::StdinClosed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Closes the process's stdin (with a pty: sends ^D).
    pub fn close(mut self) -> Result<(), ClientError> {
        self.closed = true;
        self.shared.send(ClientMessage::Eof {
            id: self.id,
            channel: Channel::Stdin,
        })
    }
}

impl Drop for ExecStdin {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self.shared.out.send(ClientMessage::Eof {
                id: self.id,
                channel: Channel::Stdin,
            });
        }
    }
}

/// An output stream of an exec (or a file being fetched). Dropping it discards the rest.
pub struct OutputStream {
    shared: Arc<Shared>,
    id: u64,
    channel: Channel,
    rx: mpsc::UnboundedReceiver<Chunk>,
    budget: Arc<RecvBudget>,
}

impl OutputStream {
    /// Next chunk, or `None` at the end of the stream. Receiving a chunk lets the agent
    /// send that many more bytes.
    pub async fn recv(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        match self.rx.recv().await {
            Some(Ok(chunk)) => {
                self.shared
                    .credit(self.id, self.channel, &self.budget, chunk.len());
                Ok(Some(chunk))
            }
            Some(Err(e)) => Err(e),
            None => Ok(None),
        }
    }

    /// Reads the stream to its end, keeping all of it: only for output known to be small
    /// (see [`read_limited`](Self::read_limited)).
    pub async fn read_to_end(&mut self) -> Result<Vec<u8>, ClientError> {
        let mut all = Vec::new();
        while let Some(chunk) = self.recv().await? {
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }

    /// Reads the stream to its end, keeping its first `limit` bytes; `true` when there was
    /// more (read and discarded).
    pub async fn read_limited(&mut self, limit: usize) -> Result<(Vec<u8>, bool), ClientError> {
        let mut kept = Vec::new();
        let mut truncated = false;
        while let Some(chunk) = self.recv().await? {
            let room = limit - kept.len();
            truncated |= chunk.len() > room;
            kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        Ok((kept, truncated))
    }
}

impl Drop for OutputStream {
    fn drop(&mut self) {
        // From now on the reader credits new data itself; credit what is queued.
        self.rx.close();
        let mut queued = 0;
        while let Ok(chunk) = self.rx.try_recv() {
            if let Ok(chunk) = chunk {
                queued += chunk.len();
            }
        }
        self.shared
            .credit(self.id, self.channel, &self.budget, queued);
    }
}
