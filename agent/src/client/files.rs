//! Files and mounts in the sandbox: put, get, stat, list, remove, mount, unmount.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::error::unexpected;
use super::routes::Expect;
use super::{AgentClient, ClientError, MAX_LIST_BYTES, MAX_LIST_ENTRIES};
use crate::flow::SendWindow;
use crate::protocol::{
    Channel, ClientMessage, DirEntry, FileStat, MountRequest, Reply, Request, MAX_CHUNK,
};

impl AgentClient {
    /// Writes `data` to `path` in the guest with permission bits `mode`, atomically (a
    /// temporary file renamed into place). Returns the bytes written.
    pub async fn put_file<R>(&self, path: &str, mode: u32, mut data: R) -> Result<u64, ClientError>
    where
        R: AsyncRead + Unpin,
    {
        let window = Arc::new(SendWindow::new());
        let mut pending = self.begin(
            self.next_id(),
            Request::Put {
                path: path.to_owned(),
                mode,
            },
            Expect::Replies(2),
            Vec::new(),
            None,
            Some((Channel::File, Arc::clone(&window))),
        )?;
        match pending.next().await? {
            Reply::PutReady => {}
            other => return Err(unexpected(other, "Put")),
        }
        let id = pending.id;
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let credit = tokio::select! {
                credit = window.take(MAX_CHUNK) => credit.ok_or_else(|| self.shared.disconnected())?,
                // The agent failed the transfer (disk full, ...) while we wait for credit.
                reply = pending.next() => return Err(match reply {
                    Ok(other) => unexpected(other, "Put data"),
                    Err(e) => e,
                }),
            };
            let n = data.read(&mut buf[..credit]).await?;
            window.grant((credit - n) as u64);
            if n == 0 {
                break;
            }
            self.shared.send(ClientMessage::Data {
                id,
                channel: Channel::File,
                data: buf[..n].to_vec(),
            })?;
        }
        self.shared.send(ClientMessage::Eof {
            id,
            channel: Channel::File,
        })?;
        let reply = pending.next().await?;
        pending.complete();
        match reply {
            Reply::PutDone { bytes } => Ok(bytes),
            other => Err(unexpected(other, "Put")),
        }
    }

    /// Copies the regular file `path` from the guest into `sink`; returns its metadata.
    pub async fn get_file<W>(&self, path: &str, sink: &mut W) -> Result<FileStat, ClientError>
    where
        W: AsyncWrite + Unpin,
    {
        let id = self.next_id();
        let (file_sink, mut stream) = self.output_stream(id, Channel::File);
        let mut pending = self.begin(
            id,
            Request::Get {
                path: path.to_owned(),
            },
            Expect::Replies(1),
            vec![(Channel::File, file_sink)],
            None,
            None,
        )?;
        let stat = match pending.next().await? {
            Reply::GetStarted { stat } => stat,
            other => return Err(unexpected(other, "Get")),
        };
        while let Some(chunk) = stream.recv().await? {
            sink.write_all(&chunk).await?;
        }
        sink.flush().await?;
        pending.complete();
        Ok(stat)
    }

    /// Metadata of `path`, following symlinks.
    pub async fn stat(&self, path: &str) -> Result<FileStat, ClientError> {
        match self
            .call(Request::Stat {
                path: path.to_owned(),
            })
            .await?
        {
            Reply::Stat(stat) => Ok(stat),
            other => Err(unexpected(other, "Stat")),
        }
    }

    /// Entries of directory `path`, sorted by name (symlinks not followed); at most
    /// [`MAX_LIST_ENTRIES`] in at most [`MAX_LIST_BYTES`] (else `AnswerTooLarge`).
    pub async fn list(&self, path: &str) -> Result<Vec<DirEntry>, ClientError> {
        let mut pending = self.begin(
            self.next_id(),
            Request::List {
                path: path.to_owned(),
            },
            Expect::Listing {
                entries: MAX_LIST_ENTRIES,
                bytes: MAX_LIST_BYTES,
            },
            Vec::new(),
            None,
            None,
        )?;
        let mut entries = Vec::new();
        loop {
            match pending.next().await? {
                Reply::Entries(batch) => entries.extend(batch),
                Reply::Done => break,
                other => return Err(unexpected(other, "List")),
            }
        }
        pending.complete();
        Ok(entries)
    }

    /// Removes a file, symlink or directory (with its content when `recursive`).
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), ClientError> {
        self.call_done(
            Request::Remove {
                path: path.to_owned(),
                recursive,
            },
            "Remove",
        )
        .await
    }

    /// Mounts a file system in the sandbox (see [`Request::Mount`]).
    pub async fn mount(&self, request: MountRequest) -> Result<(), ClientError> {
        self.call_done(Request::Mount(request), "Mount").await
    }

    /// Detaches the mount at `target` and everything below it.
    pub async fn unmount(&self, target: &str) -> Result<(), ClientError> {
        self.call_done(
            Request::Unmount {
                target: target.to_owned(),
            },
            "Unmount",
        )
        .await
    }
}
