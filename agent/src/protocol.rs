//! Wire protocol between the host (client) and `mvm-agent`.
//!
//! Every message travels in a frame: a big-endian `u32` payload length followed by the
//! payload, a [postcard](https://docs.rs/postcard) encoding of [`ClientMessage`] (host to
//! agent) or [`AgentMessage`] (agent to host). `agent/PROTOCOL.md` describes the exchange.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol version spoken by this crate; both sides must agree exactly.
pub const PROTOCOL_VERSION: u32 = 4;
/// Magic bytes carried by both `Hello` messages.
pub const MAGIC: [u8; 4] = *b"MVMA";
/// Largest accepted frame payload, in bytes.
pub const MAX_FRAME_LEN: usize = 1 << 20;
/// Largest data chunk a sender puts in one `Data` message.
pub const MAX_CHUNK: usize = 64 * 1024;
/// Credit every data stream starts with, in bytes (see `Credit`).
pub const INITIAL_WINDOW: u32 = 256 * 1024;
/// vsock port the agent listens on inside the guest unless told otherwise.
pub const DEFAULT_VSOCK_PORT: u32 = 1024;
/// Version of this crate, reported by `Health`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A data stream belonging to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Channel {
    /// Standard input of an exec (host to agent).
    Stdin,
    /// Standard output of an exec, or the pty output (agent to host).
    Stdout,
    /// Standard error of an exec (agent to host).
    Stderr,
    /// File content of a `Put` (host to agent) or `Get` (agent to host).
    File,
}

/// Messages sent by the host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ClientMessage {
    /// First message on a connection.
    Hello {
        /// Must be [`MAGIC`].
        magic: [u8; 4],
        /// Must be [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// Starts request `id`; ids are chosen by the client and unique per connection.
    Request {
        /// Request id.
        id: u64,
        /// What to do.
        request: Request,
    },
    /// Bytes on a host-to-agent stream, within the credit the agent granted.
    Data {
        /// Request the stream belongs to.
        id: u64,
        /// Which stream.
        channel: Channel,
        /// At most [`MAX_CHUNK`] bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// End of a host-to-agent stream (closes an exec's stdin, commits a `Put`).
    Eof {
        /// Request the stream belongs to.
        id: u64,
        /// Which stream.
        channel: Channel,
    },
    /// The host consumed `bytes` of an agent-to-host stream: the agent may send that many more.
    Credit {
        /// Request the stream belongs to.
        id: u64,
        /// Which stream.
        channel: Channel,
        /// Bytes granted.
        bytes: u32,
    },
    /// Abandons request `id`: a `Put` is discarded, a `Get` stops, an exec is killed.
    Cancel {
        /// Request id.
        id: u64,
    },
}

/// Messages sent by the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    /// Answer to the client's `Hello`.
    Hello {
        /// [`MAGIC`].
        magic: [u8; 4],
        /// [`PROTOCOL_VERSION`] of the agent.
        version: u32,
        /// Agent build version.
        agent_version: String,
    },
    /// A successful answer to request `id` (some requests get several, see [`Reply`]).
    Reply {
        /// Request id.
        id: u64,
        /// The answer.
        reply: Reply,
    },
    /// Request `id` failed; nothing more is sent for it.
    Failed {
        /// Request id.
        id: u64,
        /// Why.
        error: RemoteError,
    },
    /// Bytes on an agent-to-host stream, within the credit the host granted.
    Data {
        /// Request the stream belongs to.
        id: u64,
        /// Which stream.
        channel: Channel,
        /// At most [`MAX_CHUNK`] bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// End of an agent-to-host stream.
    Eof {
        /// Request the stream belongs to.
        id: u64,
        /// Which stream.
        channel: Channel,
    },
    /// The agent consumed `bytes` of a host-to-agent stream.
    Credit {
        /// Request the stream belongs to.
        id: u64,
        /// Which stream.
        channel: Channel,
        /// Bytes granted.
        bytes: u32,
    },
    /// Exec `id` finished; sent after the `Eof` of its output streams.
    Exited {
        /// Exec request id.
        id: u64,
        /// How it ended.
        status: ExitStatus,
    },
    /// Connection-level error; the agent closes the connection right after it.
    Fatal(RemoteError),
}

/// Operations the host can request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Runs a process. Replies `ExecStarted`, then streams output, then `Exited`.
    Exec(ExecRequest),
    /// Sends `signal` to the process group of exec `exec`. Replies `Done`.
    Signal {
        /// Id of the exec request.
        exec: u64,
        /// Signal number (e.g. 15 for SIGTERM).
        signal: i32,
    },
    /// Changes the pty size of exec `exec`. Replies `Done`.
    Resize {
        /// Id of the exec request.
        exec: u64,
        /// New size.
        size: PtySize,
    },
    /// Writes a file: replies `PutReady`, takes `File` data until `Eof`, replies `PutDone`.
    /// The content is written to a temporary file renamed over `path` on success.
    Put {
        /// Absolute path in the guest.
        path: String,
        /// Permission bits (e.g. 0o644).
        mode: u32,
    },
    /// Reads a regular file: replies `GetStarted`, then streams `File` data and `Eof`.
    Get {
        /// Absolute path in the guest.
        path: String,
    },
    /// Metadata of a path, following symlinks. Replies `Stat`.
    Stat {
        /// Absolute path in the guest.
        path: String,
    },
    /// Lists a directory: replies `Entries` zero or more times, then `Done`.
    List {
        /// Absolute path in the guest.
        path: String,
    },
    /// Removes a file, symlink or (empty, unless `recursive`) directory. Replies `Done`.
    Remove {
        /// Absolute path in the guest.
        path: String,
        /// Remove directories with their content.
        recursive: bool,
    },
    /// Agent liveness and version. Replies `Health`.
    Health,
    /// Stops the guest. Replies `Done`, then the agent powers off or reboots the VM
    /// (a host-process agent exits instead).
    Shutdown {
        /// Power-off or reboot.
        action: ShutdownAction,
    },
    /// Mounts a file system. A block device that has no capacity yet (a drive the host has
    /// just swapped in) is waited for, up to 10 s. Replies `Done`.
    Mount(MountRequest),
    /// Detaches the mount at `target` and every mount below it (lazily: busy mounts go
    /// when their last user does). Replies `Done`.
    Unmount {
        /// Absolute mount point.
        target: String,
    },
    /// Gives a guest restored from a snapshot its own identity (host name, network,
    /// entropy, wall clock) before anything else runs in it. Only the guest's init agent
    /// takes it. Replies `Done`.
    Reidentify(Identity),
}

/// What makes a guest restored from a snapshot its own, not a copy of the snapshot's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// The host name.
    pub hostname: String,
    /// The guest interface's new MAC, set while the interface is down.
    pub mac: Option<[u8; 6]>,
    /// The guest interface's address and default route; `None` takes the address away and
    /// leaves the interface down (a sandbox without a network).
    pub ip: Option<IpConfig>,
    /// Fresh random bytes from the host, credited to the kernel's entropy pool, which is
    /// then reseeded: the snapshot's RNG state is shared by every guest restored from it.
    #[serde(with = "serde_bytes")]
    pub entropy: Vec<u8>,
    /// The host's wall clock, nanoseconds since the Unix epoch (the guest's stopped when the
    /// snapshot was taken).
    pub realtime_ns: u64,
    /// The nameserver `/etc/resolv.conf` is to name (the sandbox's resolver, egress `allow`);
    /// `None` leaves the file as the snapshot had it.
    pub dns: Option<std::net::Ipv4Addr>,
    /// Keeps `/etc/machine-id` (the sandbox's own VM resumed: the same machine); otherwise
    /// a new one is written from `entropy`.
    #[serde(default)]
    pub keep_machine_id: bool,
}

/// IPv4 configuration of the guest interface (`mvm.ip`, or a new [`Identity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// Interface address.
    pub address: std::net::Ipv4Addr,
    /// Prefix length (0..=32).
    pub prefix_len: u8,
    /// Default gateway.
    pub gateway: Option<std::net::Ipv4Addr>,
}

impl std::fmt::Display for IpConfig {
    /// `ADDR/PREFIX[,GATEWAY]`, as in the agent's `mvm.ip` kernel parameter.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix_len)?;
        match self.gateway {
            Some(gateway) => write!(f, ",{gateway}"),
            None => Ok(()),
        }
    }
}

impl IpConfig {
    /// The netmask of `prefix_len`.
    pub fn netmask(&self) -> std::net::Ipv4Addr {
        let bits = u32::MAX
            .checked_shl(32 - u32::from(self.prefix_len))
            .unwrap_or(0);
        std::net::Ipv4Addr::from(bits)
    }
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Reply {
    /// The exec's process runs.
    ExecStarted {
        /// Its pid in the guest.
        pid: u32,
    },
    /// The request completed.
    Done,
    /// The agent is ready for the content of a `Put`.
    PutReady,
    /// The `Put` file is in place.
    PutDone {
        /// Bytes written.
        bytes: u64,
    },
    /// A `Get` starts; its content follows.
    GetStarted {
        /// Metadata of the file being sent.
        stat: FileStat,
    },
    /// Answer to `Stat`.
    Stat(FileStat),
    /// A batch of directory entries for `List`.
    Entries(Vec<DirEntry>),
    /// Answer to `Health`.
    Health(Health),
}

/// Parameters of an exec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH` when it has no `/`.
    pub argv: Vec<String>,
    /// Environment on top of the defaults (`PATH`, `HOME`, `TERM` with a pty).
    pub env: Vec<(String, String)>,
    /// Working directory (default: `/`).
    pub cwd: Option<String>,
    /// User id to run as (default: the agent's).
    pub uid: Option<u32>,
    /// Group id to run as (default: the agent's).
    pub gid: Option<u32>,
    /// Run on a pseudo-terminal of this size; stdout carries the terminal output and
    /// stderr is empty.
    pub pty: Option<PtySize>,
    /// Pipe stdin from the host; when false the process reads `/dev/null`.
    pub stdin: bool,
    /// Kill the process group with SIGKILL after this many milliseconds.
    pub timeout_ms: Option<u64>,
    /// Run chrooted into this directory (absolute, in the agent's view); `cwd` is then
    /// inside it. For the containers of a pod, each with its own root in one sandbox.
    pub root: Option<String>,
}

impl ExecRequest {
    /// An exec of `argv` with no stdin, no pty and no timeout.
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            argv: argv.into_iter().map(Into::into).collect(),
            env: Vec::new(),
            cwd: None,
            uid: None,
            gid: None,
            pty: None,
            stdin: false,
            timeout_ms: None,
            root: None,
        }
    }

    /// Adds an environment variable.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets the working directory.
    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    /// Runs as `uid`:`gid`.
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.uid = Some(uid);
        self.gid = Some(gid);
        self
    }

    /// Runs on a pty of `rows` x `cols`.
    pub fn pty(mut self, rows: u16, cols: u16) -> Self {
        self.pty = Some(PtySize { rows, cols });
        self
    }

    /// Pipes stdin from the host.
    pub fn stdin(mut self, enabled: bool) -> Self {
        self.stdin = enabled;
        self
    }

    /// Kills the process group after `timeout`.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }

    /// Runs chrooted into `root`.
    pub fn root(mut self, root: impl Into<String>) -> Self {
        self.root = Some(root.into());
        self
    }
}

/// A mount the host asks the agent to make (see [`Request::Mount`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountRequest {
    /// A block device (e.g. `/dev/vdc`), a file system name (`proc`), or, for a bind
    /// mount, an absolute path.
    pub source: String,
    /// Absolute mount point; created (with its parents) when missing.
    pub target: String,
    /// File system type (`ext4`, `proc`, ...); `None` makes a recursive bind mount.
    pub fstype: Option<String>,
    /// Mount read-only.
    pub read_only: bool,
}

/// Size of a pseudo-terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    /// Rows.
    pub rows: u16,
    /// Columns.
    pub cols: u16,
}

/// How an exec's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Termination {
    /// It exited with this code.
    Exited(i32),
    /// It was killed by this signal.
    Signaled(i32),
}

/// Final status of an exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code or signal.
    pub termination: Termination,
    /// The agent killed the process because its timeout expired.
    pub timed_out: bool,
}

impl ExitStatus {
    /// Exit code, when the process exited normally.
    pub fn code(&self) -> Option<i32> {
        match self.termination {
            Termination::Exited(code) => Some(code),
            Termination::Signaled(_) => None,
        }
    }

    /// Signal number, when a signal killed the process.
    pub fn signal(&self) -> Option<i32> {
        match self.termination {
            Termination::Exited(_) => None,
            Termination::Signaled(signal) => Some(signal),
        }
    }

    /// Exit code 0 and no timeout.
    pub fn success(&self) -> bool {
        self.termination == Termination::Exited(0) && !self.timed_out
    }
}

/// Type of a file system object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Device, FIFO or socket.
    Other,
}

/// Metadata of a file system object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    /// Type.
    pub kind: FileKind,
    /// Size in bytes.
    pub size: u64,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
}

/// One entry of a directory listing (symlinks are not followed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    /// File name (lossily converted to UTF-8).
    pub name: String,
    /// Its metadata.
    pub stat: FileStat,
}

/// Answer to `Health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Agent build version.
    pub agent_version: String,
    /// Protocol version.
    pub protocol_version: u32,
    /// Milliseconds since the agent started.
    pub uptime_ms: u64,
    /// The agent is the guest's init (PID 1).
    pub init: bool,
}

/// What `Shutdown` does to the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShutdownAction {
    /// `reboot(RB_POWER_OFF)`.
    PowerOff,
    /// `reboot(RB_AUTOBOOT)`; with `reboot=k` on the guest command line mvm's VMM ends the VM.
    Reboot,
}

/// Category of a [`RemoteError`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// Path or program does not exist.
    NotFound,
    /// Permission denied.
    PermissionDenied,
    /// Path exists already.
    AlreadyExists,
    /// A parameter is invalid (bad path, empty argv, not a directory...).
    InvalidInput,
    /// The exec named by a request does not exist (any more).
    NoSuchExec,
    /// The peer broke the protocol.
    Protocol,
    /// The peer speaks another protocol version.
    VersionMismatch,
    /// A frame exceeded [`MAX_FRAME_LEN`].
    FrameTooLarge,
    /// Another I/O error.
    Io,
}

/// An error reported by the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct RemoteError {
    /// Category.
    pub kind: ErrorKind,
    /// `errno` when the error came from a system call.
    pub errno: Option<i32>,
    /// Human-readable description.
    pub message: String,
}

impl RemoteError {
    /// An error of `kind` without errno.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            errno: None,
            message: message.into(),
        }
    }

    /// Converts an I/O error, prefixing its message with `context`.
    pub fn from_io(context: impl std::fmt::Display, err: &std::io::Error) -> Self {
        let kind = match err.kind() {
            std::io::ErrorKind::NotFound => ErrorKind::NotFound,
            std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
            std::io::ErrorKind::AlreadyExists => ErrorKind::AlreadyExists,
            std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData => {
                ErrorKind::InvalidInput
            }
            _ => ErrorKind::Io,
        };
        Self {
            kind,
            errno: err.raw_os_error(),
            message: format!("{context}: {err}"),
        }
    }
}

/// Errors reading or decoding a frame.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// Reading the stream failed.
    #[error("reading frame: {0}")]
    Io(#[from] std::io::Error),
    /// The length prefix exceeds [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    TooLarge(u64),
    /// The stream ended inside a frame.
    #[error("connection closed inside a frame")]
    Truncated,
    /// The payload is not a valid message.
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes `msg` as a frame (length prefix included) appended to `out`.
pub fn encode_frame<T: Serialize>(msg: &T, out: &mut Vec<u8>) -> Result<(), FrameError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    let mut out_buf = std::mem::take(out);
    out_buf =
        postcard::to_extend(msg, out_buf).map_err(|e| FrameError::Malformed(e.to_string()))?;
    *out = out_buf;
    let len = out.len() - start - 4;
    if len > MAX_FRAME_LEN {
        out.truncate(start);
        return Err(FrameError::TooLarge(len as u64));
    }
    // The check above bounds `len` by MAX_FRAME_LEN, which fits in a u32.
    out[start..start + 4].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(())
}

/// Decodes one frame payload; trailing bytes make the frame malformed.
pub fn decode_payload<'de, T: Deserialize<'de>>(payload: &'de [u8]) -> Result<T, FrameError> {
    match postcard::take_from_bytes(payload) {
        Ok((msg, [])) => Ok(msg),
        Ok((_, rest)) => Err(FrameError::Malformed(format!(
            "{} trailing bytes after the message",
            rest.len()
        ))),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// Reads one frame payload into `buf`. Returns `Ok(false)` on a clean end of stream
/// before a frame starts.
pub async fn read_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<bool, FrameError> {
    let mut header = [0u8; 4];
    let mut got = 0;
    while got < header.len() {
        let n = reader.read(&mut header[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(false)
            } else {
                Err(FrameError::Truncated)
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge(len as u64));
    }
    buf.clear();
    buf.resize(len, 0);
    match reader.read_exact(buf).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(FrameError::Truncated),
        Err(e) => Err(FrameError::Io(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip<T>(msg: &T) -> T
    where
        T: Serialize + for<'de> Deserialize<'de>,
    {
        let mut out = Vec::new();
        encode_frame(msg, &mut out).unwrap();
        let len = u32::from_be_bytes(out[..4].try_into().unwrap()) as usize;
        assert_eq!(len, out.len() - 4);
        decode_payload(&out[4..]).unwrap()
    }

    #[test]
    fn messages_roundtrip() {
        let req = ClientMessage::Request {
            id: 7,
            request: Request::Exec(
                ExecRequest::new(["sh", "-c", "echo hi"])
                    .env("A", "B")
                    .pty(24, 80)
                    .timeout(Duration::from_millis(1500)),
            ),
        };
        assert_eq!(roundtrip(&req), req);
        let data = AgentMessage::Data {
            id: u64::MAX,
            channel: Channel::Stderr,
            data: vec![0, 1, 2, 255],
        };
        assert_eq!(roundtrip(&data), data);
        let exited = AgentMessage::Exited {
            id: 3,
            status: ExitStatus {
                termination: Termination::Signaled(9),
                timed_out: true,
            },
        };
        assert_eq!(roundtrip(&exited), exited);
    }

    #[test]
    fn data_chunks_are_encoded_compactly() {
        let mut out = Vec::new();
        let msg = ClientMessage::Data {
            id: 1,
            channel: Channel::Stdin,
            data: vec![7; MAX_CHUNK],
        };
        encode_frame(&msg, &mut out).unwrap();
        assert!(out.len() < MAX_CHUNK + 16, "frame is {} bytes", out.len());
    }

    #[test]
    fn oversized_message_is_refused() {
        let mut out = vec![1, 2, 3];
        let msg = ClientMessage::Data {
            id: 1,
            channel: Channel::File,
            data: vec![0; MAX_FRAME_LEN + 1],
        };
        assert!(matches!(
            encode_frame(&msg, &mut out),
            Err(FrameError::TooLarge(_))
        ));
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn garbage_and_trailing_bytes_are_malformed() {
        assert!(matches!(
            decode_payload::<ClientMessage>(&[0xff, 0xff, 0xff]),
            Err(FrameError::Malformed(_))
        ));
        let mut out = Vec::new();
        encode_frame(&ClientMessage::Cancel { id: 1 }, &mut out).unwrap();
        out.push(0);
        assert!(matches!(
            decode_payload::<ClientMessage>(&out[4..]),
            Err(FrameError::Malformed(_))
        ));
    }

    #[tokio::test]
    async fn read_frame_limits_and_truncation() {
        let mut big = &(u32::try_from(MAX_FRAME_LEN).unwrap() + 1).to_be_bytes()[..];
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut big, &mut buf).await,
            Err(FrameError::TooLarge(_))
        ));
        let mut empty: &[u8] = &[];
        assert!(!read_frame(&mut empty, &mut buf).await.unwrap());
        let mut cut: &[u8] = &[0, 0, 0, 9, 1, 2];
        assert!(matches!(
            read_frame(&mut cut, &mut buf).await,
            Err(FrameError::Truncated)
        ));
    }
}
