//! The console as init's standard streams.

use std::io;

use super::error::{sys_io, InitError};

/// Points stdin, stdout and stderr at /dev/console.
pub(super) fn reopen_console() -> Result<(), InitError> {
    use std::os::fd::AsRawFd;
    let console = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
        .map_err(sys_io("opening /dev/console"))?;
    for fd in 0..3 {
        // SAFETY: dup2 onto the standard descriptors; `console` stays open during the call.
        if unsafe { libc::dup2(console.as_raw_fd(), fd) } < 0 {
            return Err(sys_io("redirecting stdio to /dev/console")(
                io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}
