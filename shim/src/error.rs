//! Errors of the shim, and their ttrpc status codes.

use containerd_shim::protos::ttrpc::{self, Code};

/// What went wrong in a Task service call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request or the OCI spec is wrong.
    #[error("{0}")]
    Invalid(String),
    /// No such container or process.
    #[error("{0}")]
    NotFound(String),
    /// The container or process is in the wrong state for the call.
    #[error("{0}")]
    State(String),
    /// From the sandbox manager (e.g. the vm tier on a host that cannot run VMs).
    #[error("mvm: {0}")]
    Manager(#[from] mvm_sandbox::Error),
    /// From the sandbox's agent.
    #[error("mvm sandbox agent: {0}")]
    Agent(#[from] agent::ClientError),
    /// Host file, FIFO or mount operations.
    #[error("{0}")]
    Host(String),
}

/// Result of the shim.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A host error with what was being done.
    pub fn host(what: impl std::fmt::Display, e: impl std::fmt::Display) -> Self {
        Error::Host(format!("{what}: {e}"))
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        let code = match &e {
            Error::Invalid(_) => Code::INVALID_ARGUMENT,
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::State(_) => Code::FAILED_PRECONDITION,
            Error::Manager(m) => match m {
                mvm_sandbox::Error::TierUnavailable(_) | mvm_sandbox::Error::Conflict(_) => {
                    Code::FAILED_PRECONDITION
                }
                mvm_sandbox::Error::Invalid(_)
                | mvm_sandbox::Error::BadRequest(_)
                | mvm_sandbox::Error::TooLarge(_) => Code::INVALID_ARGUMENT,
                mvm_sandbox::Error::NotFound(_) => Code::NOT_FOUND,
                mvm_sandbox::Error::PortUnreachable(_) => Code::UNAVAILABLE,
                mvm_sandbox::Error::Quota(_) => Code::RESOURCE_EXHAUSTED,
                mvm_sandbox::Error::Unauthorized | mvm_sandbox::Error::Forbidden(_) => {
                    Code::PERMISSION_DENIED
                }
                mvm_sandbox::Error::Agent(_) | mvm_sandbox::Error::Host(_) => Code::INTERNAL,
            },
            Error::Agent(_) | Error::Host(_) => Code::INTERNAL,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(e: Error) -> Code {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(status) => status.code(),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn manager_errors_keep_their_meaning() {
        let m = |e: mvm_sandbox::Error| code(Error::Manager(e));
        assert_eq!(
            m(mvm_sandbox::Error::Quota("q".into())),
            Code::RESOURCE_EXHAUSTED
        );
        assert_eq!(
            m(mvm_sandbox::Error::Conflict("c".into())),
            Code::FAILED_PRECONDITION
        );
        assert_eq!(
            m(mvm_sandbox::Error::TierUnavailable("t".into())),
            Code::FAILED_PRECONDITION
        );
        assert_eq!(
            m(mvm_sandbox::Error::Invalid("i".into())),
            Code::INVALID_ARGUMENT
        );
        assert_eq!(m(mvm_sandbox::Error::NotFound("n".into())), Code::NOT_FOUND);
        assert_eq!(m(mvm_sandbox::Error::Host("h".into())), Code::INTERNAL);
        assert_eq!(code(Error::State("s".into())), Code::FAILED_PRECONDITION);
    }
}
