//! Connecting: unix socket or the VMM's hybrid vsock, the handshake, and the tasks that
//! write and read the connection.

use std::io;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Notify};

use super::error::{message_name, unexpected};
use super::routes::{close, deliver, Shared, State};
use super::{AgentClient, ClientError, HANDSHAKE_TIMEOUT};
use crate::protocol::{
    decode_payload, encode_frame, read_frame, AgentMessage, ClientMessage, ErrorKind, FrameError,
    Identity, Reply, Request, MAGIC, MAX_CHUNK, PROTOCOL_VERSION,
};

/// Bytes the writer gathers from queued frames into one write.
const WRITE_BATCH: usize = 256 * 1024;
/// Longest accepted reply line from a hybrid vsock proxy.
const MAX_PROXY_LINE: usize = 64;
/// The id of a request sent with the handshake; later requests count on from it.
const HANDSHAKE_REQUEST_ID: u64 = 0;

impl AgentClient {
    /// Connects to an agent listening on a unix socket (host process, `jail` tier).
    pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Self, ClientError> {
        let path = path.as_ref();
        let stream = tokio::net::UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                target: path.display().to_string(),
                source,
            })?;
        Self::from_stream(stream).await
    }

    /// Connects to the agent in a VM through the VMM's hybrid vsock unix socket
    /// (Firecracker convention): sends `CONNECT <port>\n`, expects `OK <host port>\n`,
    /// then speaks the protocol on the same stream.
    pub async fn connect_hybrid_vsock(
        uds_path: impl AsRef<Path>,
        port: u32,
    ) -> Result<Self, ClientError> {
        Self::from_stream(hybrid_vsock(uds_path.as_ref(), port).await?).await
    }

    /// Connects as [`connect_hybrid_vsock`](Self::connect_hybrid_vsock) to the agent of a
    /// guest restored from a snapshot and gives the guest `identity` (see
    /// [`reidentify`](Self::reidentify)), sent with the handshake: the agent applies it as
    /// soon as it has answered, one round trip sooner than a `reidentify` after connecting.
    pub async fn connect_hybrid_vsock_reidentified(
        uds_path: impl AsRef<Path>,
        port: u32,
        identity: Identity,
    ) -> Result<Self, ClientError> {
        let stream = hybrid_vsock(uds_path.as_ref(), port).await?;
        Self::from_stream_reidentified(stream, identity).await
    }

    /// Speaks the protocol over an already connected stream.
    pub async fn from_stream<S>(stream: S) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::start(stream, None).await
    }

    /// [`from_stream`](Self::from_stream) with `identity` given to the guest in the
    /// handshake (see [`connect_hybrid_vsock_reidentified`](Self::connect_hybrid_vsock_reidentified)).
    pub async fn from_stream_reidentified<S>(
        stream: S,
        identity: Identity,
    ) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        Self::start(stream, Some(identity)).await
    }

    /// The handshake, with `Reidentify` written right behind the client's `Hello` when there
    /// is an `identity` (as request [`HANDSHAKE_REQUEST_ID`]: nothing else is in flight, so
    /// its answer is the frame after the agent's `Hello`), then the connection's tasks.
    async fn start<S>(stream: S, identity: Option<Identity>) -> Result<Self, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let pipelined = identity.map(|identity| ClientMessage::Request {
            id: HANDSHAKE_REQUEST_ID,
            request: Request::Reidentify(identity),
        });
        let agent_version = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            handshake(&mut reader, &mut writer, pipelined.as_ref()),
        )
        .await
        .map_err(|_| ClientError::HandshakeTimeout(HANDSHAKE_TIMEOUT))??;
        if pipelined.is_some() {
            handshake_request_done(&mut reader, "Reidentify").await?;
        }
        let (out, rx) = mpsc::unbounded_channel();
        let state = Arc::new(Mutex::new(State::default()));
        let hang_up = Arc::new(Notify::new());
        let write_task = tokio::spawn(write_loop(
            writer,
            rx,
            Arc::clone(&state),
            Arc::clone(&hang_up),
        ));
        let read_task = tokio::spawn(read_loop(reader, Arc::clone(&state), out.clone(), hang_up));
        Ok(Self {
            shared: Arc::new(Shared {
                out,
                state,
                next_id: AtomicU64::new(HANDSHAKE_REQUEST_ID + 1),
                agent_version,
                tasks: [write_task, read_task],
            }),
        })
    }
}

/// Connects to the VMM's hybrid vsock socket at `path` and asks for guest `port`; the
/// stream then leads to the agent.
async fn hybrid_vsock(path: &Path, port: u32) -> Result<tokio::net::UnixStream, ClientError> {
    let target = path.display().to_string();
    let mut stream = tokio::net::UnixStream::connect(path)
        .await
        .map_err(|source| ClientError::Connect {
            target: target.clone(),
            source,
        })?;
    let reply = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await?;
        read_proxy_line(&mut stream).await
    })
    .await
    .map_err(|_| ClientError::HandshakeTimeout(HANDSHAKE_TIMEOUT))?
    .map_err(|source| ClientError::Connect {
        target: target.clone(),
        source,
    })?;
    if !reply.starts_with("OK ") {
        return Err(ClientError::VsockRefused {
            path: target,
            port,
            reply,
        });
    }
    Ok(stream)
}

async fn read_proxy_line<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<String> {
    // Byte by byte: whatever follows the newline belongs to the agent connection.
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        if line.len() == MAX_PROXY_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "vsock proxy reply line too long",
            ));
        }
        line.push(byte);
    }
}

async fn handshake<R, W>(
    reader: &mut R,
    writer: &mut W,
    pipelined: Option<&ClientMessage>,
) -> Result<String, ClientError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut frames = Vec::new();
    encode_frame(
        &ClientMessage::Hello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
        },
        &mut frames,
    )
    .map_err(|e| ClientError::Protocol(e.to_string()))?;
    if let Some(request) = pipelined {
        encode_frame(request, &mut frames).map_err(|e| match e {
            FrameError::TooLarge(bytes) => ClientError::RequestTooLarge { bytes },
            e => ClientError::Protocol(e.to_string()),
        })?;
    }
    writer.write_all(&frames).await.map_err(handshake_io)?;
    match read_handshake_frame(reader).await? {
        AgentMessage::Hello {
            magic,
            version,
            agent_version,
        } if magic == MAGIC => {
            if version != PROTOCOL_VERSION {
                return Err(ClientError::VersionMismatch {
                    client: PROTOCOL_VERSION,
                    agent: version,
                });
            }
            Ok(agent_version)
        }
        AgentMessage::Fatal(e) if e.kind == ErrorKind::VersionMismatch => {
            Err(ClientError::Remote(e))
        }
        other => Err(ClientError::Protocol(format!(
            "expected Hello, got {other:?}"
        ))),
    }
}

/// Waits for the answer to the request sent with the handshake (`what`): done, or the
/// agent's error.
async fn handshake_request_done<R: AsyncRead + Unpin>(
    reader: &mut R,
    what: &str,
) -> Result<(), ClientError> {
    match read_handshake_frame(reader).await? {
        AgentMessage::Reply { id, reply } if id == HANDSHAKE_REQUEST_ID => match reply {
            Reply::Done => Ok(()),
            other => Err(unexpected(other, what)),
        },
        AgentMessage::Failed { id, error } if id == HANDSHAKE_REQUEST_ID => {
            Err(ClientError::Remote(error))
        }
        AgentMessage::Fatal(e) => Err(ClientError::Remote(e)),
        other => Err(ClientError::Protocol(format!(
            "expected the answer to {what} (request {HANDSHAKE_REQUEST_ID}), got {}",
            message_name(&other)
        ))),
    }
}

/// The next frame during the handshake.
async fn read_handshake_frame<R: AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<AgentMessage, ClientError> {
    let mut buf = Vec::new();
    match read_frame(reader, &mut buf).await {
        Ok(true) => {}
        Ok(false) => {
            return Err(ClientError::Disconnected(
                "agent closed the connection during the handshake".to_owned(),
            ))
        }
        Err(FrameError::Io(e)) => return Err(handshake_io(e)),
        Err(e) => return Err(ClientError::Protocol(e.to_string())),
    }
    decode_payload(&buf).map_err(|e| ClientError::Protocol(e.to_string()))
}

fn handshake_io(e: io::Error) -> ClientError {
    ClientError::Disconnected(format!("during handshake: {e}"))
}

/// Writes queued messages until the queue closes or the reader hangs up (dropping the
/// write half then closes the connection).
async fn write_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    mut rx: mpsc::UnboundedReceiver<ClientMessage>,
    state: Arc<Mutex<State>>,
    hang_up: Arc<Notify>,
) {
    let mut buf = Vec::with_capacity(WRITE_BATCH + MAX_CHUNK);
    loop {
        let first = tokio::select! {
            msg = rx.recv() => match msg {
                Some(msg) => msg,
                None => return,
            },
            () = hang_up.notified() => return,
        };
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            if let Err(e) = encode_frame(&msg, &mut buf) {
                close(&state, format!("encoding a request: {e}"));
                return;
            }
            if buf.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if let Err(e) = writer.write_all(&buf).await {
            close(&state, format!("writing to the agent: {e}"));
            return;
        }
        buf.clear();
    }
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut reader: R,
    state: Arc<Mutex<State>>,
    out: mpsc::UnboundedSender<ClientMessage>,
    hang_up: Arc<Notify>,
) {
    let mut buf = Vec::new();
    let reason = loop {
        match read_frame(&mut reader, &mut buf).await {
            Ok(true) => {}
            Ok(false) => break "agent closed the connection".to_owned(),
            Err(e) => break e.to_string(),
        }
        let msg: AgentMessage = match decode_payload(&buf) {
            Ok(msg) => msg,
            Err(e) => break format!("agent sent a bad frame: {e}"),
        };
        if let Err(reason) = deliver(&state, &out, msg, buf.len()) {
            break reason;
        }
    };
    close(&state, reason);
    hang_up.notify_one();
}
