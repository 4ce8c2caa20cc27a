//! Non-blocking reads and writes on pipes and pty masters through the tokio reactor.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use tokio::io::unix::AsyncFd;

/// A pipe end or pty master registered with the reactor.
#[derive(Debug)]
pub(crate) struct AsyncFile(AsyncFd<OwnedFd>);

impl AsyncFile {
    /// Switches `fd` to non-blocking mode and registers it.
    pub(crate) fn new(fd: OwnedFd) -> io::Result<Self> {
        let flags = OFlag::from_bits_retain(fcntl(&fd, FcntlArg::F_GETFL)?);
        fcntl(&fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
        // SAFETY: the OwnedFd keeps the descriptor open, and pointing to the same file
        // description, until the AsyncFd owning it is dropped.
        let registered = unsafe { AsyncFd::register(fd) };
        registered.map(Self).map_err(|e| e.into_parts().1)
    }

    /// Raw descriptor, for ioctls.
    pub(crate) fn raw_fd(&self) -> i32 {
        self.0.get_ref().as_raw_fd()
    }

    /// Reads into `buf`; `Ok(0)` at end of file. A pty master whose slave side is closed
    /// everywhere reports EIO, which is mapped to end of file.
    pub(crate) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.0.readable().await?;
            match guard.try_io(|fd| match nix::unistd::read(fd.get_ref().as_fd(), buf) {
                Ok(n) => Ok(n),
                Err(Errno::EIO) => Ok(0),
                Err(e) => Err(io::Error::from(e)),
            }) {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }

    /// Writes all of `buf`.
    pub(crate) async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let mut guard = self.0.writable().await?;
            match guard
                .try_io(|fd| nix::unistd::write(fd.get_ref().as_fd(), buf).map_err(io::Error::from))
            {
                Ok(Ok(n)) => buf = &buf[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }
}
