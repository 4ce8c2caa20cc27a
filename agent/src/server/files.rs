//! File requests: `Put`, `Get`, `Stat`, `List` and `Remove`.

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{pump, ChunkSource, Conn, InboundItem, InboundStream};
use crate::protocol::{Channel, DirEntry, ErrorKind, FileKind, FileStat, RemoteError, Reply};

/// Directory entries per `Entries` reply (names are at most 255 bytes, so a batch stays
/// far below the frame limit).
const LIST_BATCH: usize = 512;

fn absolute(path: &str) -> Result<&Path, RemoteError> {
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(RemoteError::new(
            ErrorKind::InvalidInput,
            format!("path must be absolute: {path:?}"),
        ));
    }
    Ok(p)
}

fn file_stat(meta: &std::fs::Metadata) -> FileStat {
    let ft = meta.file_type();
    let kind = if ft.is_file() {
        FileKind::File
    } else if ft.is_dir() {
        FileKind::Dir
    } else if ft.is_symlink() {
        FileKind::Symlink
    } else {
        FileKind::Other
    };
    FileStat {
        kind,
        size: meta.size(),
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        mtime_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
    }
}

/// `Stat`: metadata of `path`, following symlinks.
pub(super) async fn stat(path: &str) -> Result<FileStat, RemoteError> {
    let p = absolute(path)?;
    tokio::fs::metadata(p)
        .await
        .map(|m| file_stat(&m))
        .map_err(|e| RemoteError::from_io(path, &e))
}

/// `Remove`: deletes a file, symlink or directory.
pub(super) async fn remove(path: &str, recursive: bool) -> Result<(), RemoteError> {
    let p = absolute(path)?;
    if p.parent().is_none() {
        return Err(RemoteError::new(
            ErrorKind::InvalidInput,
            "refusing to remove /",
        ));
    }
    let meta = tokio::fs::symlink_metadata(p)
        .await
        .map_err(|e| RemoteError::from_io(path, &e))?;
    let result = if !meta.is_dir() {
        tokio::fs::remove_file(p).await
    } else if recursive {
        tokio::fs::remove_dir_all(p).await
    } else {
        tokio::fs::remove_dir(p).await
    };
    result.map_err(|e| RemoteError::from_io(format!("removing {path}"), &e))
}

/// `List`: sends the entries of directory `path` in batches, then `Done`.
pub(super) async fn list(conn: &Conn, id: u64, path: &str) {
    let result = match absolute(path) {
        Ok(p) => {
            let p = p.to_owned();
            tokio::task::spawn_blocking(move || read_dir(&p))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)))
                .map_err(|e| RemoteError::from_io(format!("listing {path}"), &e))
        }
        Err(e) => Err(e),
    };
    match result {
        Ok(entries) => {
            for batch in entries.chunks(LIST_BATCH) {
                if !conn.out.reply(id, Reply::Entries(batch.to_vec())).await {
                    return;
                }
            }
            conn.out.reply(id, Reply::Done).await;
        }
        Err(error) => {
            conn.out.fail(id, error).await;
        }
    }
}

fn read_dir(path: &Path) -> io::Result<Vec<DirEntry>> {
    let mut entries = Vec::new();
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        let meta = match entry.metadata() {
            Ok(meta) => meta,
            // Removed between readdir and lstat.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        entries.push(DirEntry {
            name: entry.file_name().to_string_lossy().into_owned(),
            stat: file_stat(&meta),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(entries)
}

/// `Put`: creates a temporary file next to `path`, replies `PutReady` and starts the
/// task that fills it and renames it into place.
pub(super) async fn start_put(
    conn: &Conn,
    id: u64,
    path: &str,
    mode: u32,
) -> Result<(), RemoteError> {
    let target = absolute(path)?;
    let (Some(dir), Some(name)) = (target.parent(), target.file_name()) else {
        return Err(RemoteError::new(
            ErrorKind::InvalidInput,
            format!("not a file path: {path:?}"),
        ));
    };
    let mode = mode & 0o7777;
    let temp = dir.join(format!(
        ".{}.mvm-put-{}-{id}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&temp)
        .await
        .map_err(|e| RemoteError::from_io(format!("creating {}", temp.display()), &e))?;
    let stream = conn.open_inbound(id, Channel::File);
    conn.out.reply(id, Reply::PutReady).await;
    let conn = conn.clone();
    let target = target.to_owned();
    tokio::spawn(async move {
        let outcome = receive_file(file, stream, &temp, &target, mode).await;
        conn.tables().inbound.remove(&(id, Channel::File));
        match outcome {
            Ok(Some(bytes)) => {
                conn.out.reply(id, Reply::PutDone { bytes }).await;
            }
            Ok(None) => {
                let _ = tokio::fs::remove_file(&temp).await;
            }
            Err(error) => {
                let _ = tokio::fs::remove_file(&temp).await;
                conn.out.fail(id, error).await;
            }
        }
    });
    Ok(())
}

/// Writes the stream to `temp` and renames it to `target` on `Eof`. `Ok(None)` when the
/// transfer was cancelled.
async fn receive_file(
    mut file: tokio::fs::File,
    mut stream: InboundStream,
    temp: &PathBuf,
    target: &Path,
    mode: u32,
) -> Result<Option<u64>, RemoteError> {
    let write_error =
        |e: io::Error| RemoteError::from_io(format!("writing {}", temp.display()), &e);
    let mut written = 0u64;
    loop {
        match stream.next().await {
            Some(InboundItem::Data(data)) => {
                file.write_all(&data).await.map_err(write_error)?;
                written += data.len() as u64;
                stream.consumed(data.len()).await;
            }
            Some(InboundItem::Eof) => break,
            None => return Ok(None),
        }
    }
    file.flush().await.map_err(write_error)?;
    // The umask may have cut bits at creation.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .await
        .map_err(write_error)?;
    drop(file);
    tokio::fs::rename(temp, target)
        .await
        .map_err(|e| RemoteError::from_io(format!("renaming into {}", target.display()), &e))?;
    Ok(Some(written))
}

impl ChunkSource for tokio::fs::File {
    async fn read_chunk(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf).await
    }
}

/// `Get`: opens the regular file `path` and starts the task that replies `GetStarted`
/// and streams it.
pub(super) async fn start_get(conn: &Conn, id: u64, path: &str) -> Result<(), RemoteError> {
    let p = absolute(path)?;
    let file = tokio::fs::File::open(p)
        .await
        .map_err(|e| RemoteError::from_io(path, &e))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| RemoteError::from_io(path, &e))?;
    if !meta.is_file() {
        return Err(RemoteError::new(
            ErrorKind::InvalidInput,
            format!("{path} is not a regular file"),
        ));
    }
    let window = conn.open_outbound(id, Channel::File);
    let conn = conn.clone();
    let path = path.to_owned();
    tokio::spawn(async move {
        let stat = file_stat(&meta);
        if conn.out.reply(id, Reply::GetStarted { stat }).await {
            if let Err(e) = pump(&conn.out, id, Channel::File, &window, file).await {
                conn.out
                    .fail(id, RemoteError::from_io(format!("reading {path}"), &e))
                    .await;
            }
        }
        conn.tables().outbound.remove(&(id, Channel::File));
    });
    Ok(())
}
