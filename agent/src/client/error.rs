//! The errors of the client.

use std::io;
use std::time::Duration;

use crate::protocol::{AgentMessage, ErrorKind, RemoteError, Reply, MAX_FRAME_LEN};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached.
    #[error("connecting to {target}: {source}")]
    Connect {
        /// What was being connected to.
        target: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The VMM's hybrid vsock socket did not accept `CONNECT <port>` (is the agent up?).
    #[error("vsock proxy {path} refused CONNECT {port}: {reply:?}")]
    VsockRefused {
        /// The VMM's unix socket.
        path: String,
        /// Guest port.
        port: u32,
        /// What the proxy answered.
        reply: String,
    },
    /// The agent did not answer the handshake in time.
    #[error("agent did not complete the handshake within {0:?}")]
    HandshakeTimeout(Duration),
    /// The agent speaks another protocol version.
    #[error("protocol version mismatch: client speaks {client}, agent speaks {agent}")]
    VersionMismatch {
        /// Our version.
        client: u32,
        /// The agent's.
        agent: u32,
    },
    /// The agent reported an error for the request.
    #[error("agent: {0}")]
    Remote(#[from] RemoteError),
    /// The connection is gone; no further request can succeed on this client.
    #[error("connection to the agent lost: {0}")]
    Disconnected(String),
    /// The agent sent something the protocol does not allow.
    #[error("agent broke the protocol: {0}")]
    Protocol(String),
    /// Writing stdin after the exec finished.
    #[error("the exec has finished; its stdin is closed")]
    StdinClosed,
    /// A local reader or writer (the source of `put_file`, the sink of `get_file`) failed.
    #[error("local I/O: {0}")]
    Io(#[from] io::Error),
    /// A request does not fit in one protocol frame; it was not sent and the connection is
    /// still usable.
    #[error(
        "the request takes {bytes} bytes encoded, more than the agent protocol's \
         {MAX_FRAME_LEN}-byte frame: make its argv and environment smaller"
    )]
    RequestTooLarge {
        /// Encoded size of the request.
        bytes: u64,
    },
    /// The agent's answer is larger than the client accepts (the request was cancelled).
    #[error("{0}")]
    AnswerTooLarge(String),
}

impl ClientError {
    /// The kind of the agent's error, when the agent reported one.
    pub fn remote_kind(&self) -> Option<ErrorKind> {
        match self {
            Self::Remote(e) => Some(e.kind),
            _ => None,
        }
    }
}

/// The variant of `reply`, for messages that must not print what an agent stuffed into it.
pub(super) fn reply_name(reply: &Reply) -> &'static str {
    match reply {
        Reply::ExecStarted { .. } => "ExecStarted",
        Reply::Done => "Done",
        Reply::PutReady => "PutReady",
        Reply::PutDone { .. } => "PutDone",
        Reply::GetStarted { .. } => "GetStarted",
        Reply::Stat(_) => "Stat",
        Reply::Entries(_) => "Entries",
        Reply::Health(_) => "Health",
    }
}

/// The variant of `message`, for the same reason as [`reply_name`].
pub(super) fn message_name(message: &AgentMessage) -> &'static str {
    match message {
        AgentMessage::Hello { .. } => "Hello",
        AgentMessage::Reply { reply, .. } => reply_name(reply),
        AgentMessage::Failed { .. } => "Failed",
        AgentMessage::Data { .. } => "Data",
        AgentMessage::Eof { .. } => "Eof",
        AgentMessage::Credit { .. } => "Credit",
        AgentMessage::Exited { .. } => "Exited",
        AgentMessage::Fatal(_) => "Fatal",
    }
}

pub(super) fn unexpected(reply: Reply, what: &str) -> ClientError {
    ClientError::Protocol(format!("unexpected reply {} to {what}", reply_name(&reply)))
}
