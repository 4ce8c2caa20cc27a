//! Stdio between the FIFOs containerd hands over and an agent exec.

use std::path::Path;

use agent::{ExecStdin, OutputStream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::oneshot;

use crate::error::{Error, Result};

/// Opens the FIFO `path` (empty: none) for writing. Read-write, so the open does not wait for
/// containerd's reader and a reader that comes and goes does not break the pipe.
pub fn open_output(path: &str) -> Result<Option<pipe::Sender>> {
    if path.is_empty() {
        return Ok(None);
    }
    pipe::OpenOptions::new()
        .read_write(true)
        .open_sender(Path::new(path))
        .map(Some)
        .map_err(|e| Error::host(format!("opening the stdio FIFO {path}"), e))
}

/// Opens the stdin FIFO `path` (empty: none) for reading. Read-write, so it gives no early EOF
/// before containerd's writer opens it; the end of stdin comes with CloseIO.
pub fn open_input(path: &str) -> Result<Option<pipe::Receiver>> {
    if path.is_empty() {
        return Ok(None);
    }
    pipe::OpenOptions::new()
        .read_write(true)
        .open_receiver(Path::new(path))
        .map(Some)
        .map_err(|e| Error::host(format!("opening the stdin FIFO {path}"), e))
}

/// Copies an agent output stream to a FIFO until the stream ends. Output without a FIFO is
/// drained (the agent's flow control would otherwise stall the process).
pub async fn pump_output(mut from: OutputStream, mut to: Option<pipe::Sender>) {
    loop {
        match from.recv().await {
            Ok(Some(chunk)) => {
                if let Some(fifo) = to.as_mut() {
                    if let Err(e) = fifo.write_all(&chunk).await {
                        log::warn!("writing process output to its FIFO: {e}; dropping the rest");
                        to = None;
                    }
                }
            }
            Ok(None) => return,
            Err(e) => {
                log::warn!("process output stream: {e}");
                return;
            }
        }
    }
}

/// Copies the stdin FIFO to the process until `close` fires (CloseIO) or the process's stdin
/// goes away, then closes the process's stdin.
pub async fn pump_input(
    mut from: pipe::Receiver,
    mut to: ExecStdin,
    mut close: oneshot::Receiver<()>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        tokio::select! {
            _ = &mut close => {
                // Forward what containerd wrote before it asked to close.
                while let Ok(n) = from.try_read(&mut buf) {
                    if n == 0 || to.write(&buf[..n]).await.is_err() {
                        break;
                    }
                }
                break;
            }
            r = from.read(&mut buf) => match r {
                Ok(n) if n > 0 => {
                    if to.write(&buf[..n]).await.is_err() {
                        return;
                    }
                }
                _ => break,
            },
        }
    }
    if let Err(e) = to.close() {
        log::debug!("closing process stdin: {e}");
    }
}
