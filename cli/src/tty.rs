//! The local terminal of a `-t` exec, as `docker exec -it` treats it: the exec's pty gets the
//! terminal's size and follows its changes (SIGWINCH), and the terminal is raw while the exec
//! runs (keys such as ^C and ^D go to the sandbox's process, which does the echo and the line
//! editing). The terminal is restored however the exec ends: a return, an error, a panic, or a
//! signal that ends the CLI (SIGHUP, SIGINT, SIGQUIT, SIGTERM: the exec is killed and the CLI
//! exits with 128 + the signal). Only SIGKILL leaves it raw (`stty sane` repairs it).

use std::io::IsTerminal;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Mutex, Once};
use std::task::Poll;

use mvm_sandbox::model::{TtySize, WsControl};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::backend::CliError;

/// Signals that end the CLI during a raw exec.
const TERMINATING: [libc::c_int; 4] = [libc::SIGHUP, libc::SIGINT, libc::SIGQUIT, libc::SIGTERM];

/// The terminal settings to restore, while the terminal is raw (for the panic hook).
static SAVED: Mutex<Option<(RawFd, libc::termios)>> = Mutex::new(None);

/// Puts back the saved terminal settings, once.
fn restore() {
    let saved = SAVED.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some((fd, termios)) = saved {
        // SAFETY: tcsetattr reads one termios, which lives across the call. TCSANOW: output
        // already written was processed when written, and waiting for it to drain could hang
        // a panic hook on a terminal nobody reads.
        unsafe { libc::tcsetattr(fd, libc::TCSANOW, &termios) };
    }
}

/// The rows and columns of the terminal `fd`, when it knows them.
fn window_size(fd: RawFd) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which outlives the call.
    let r = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
}

/// Makes `fd` raw and records its settings for [`restore`].
fn make_raw(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: an all-zero termios is a valid value of this plain C struct; tcgetattr fills it.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: tcgetattr writes one termios into `saved`, which outlives the call.
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut raw = saved;
    // SAFETY: cfmakeraw only edits the termios it is given.
    unsafe { libc::cfmakeraw(&mut raw) };
    *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some((fd, saved));
    // SAFETY: tcsetattr reads one termios, which lives across the call.
    if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
        let err = std::io::Error::last_os_error();
        restore();
        return Err(err);
    }
    Ok(())
}

/// Restores the terminal before a panic's message is printed (and before an abort, which
/// skips destructors).
fn install_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            restore();
            previous(info);
        }));
    });
}

/// The local terminal, raw while this lives.
pub struct Terminal {
    /// Its size when attached, for the exec's pty from the start.
    pub size: Option<TtySize>,
    terminated: oneshot::Receiver<libc::c_int>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Terminal {
    /// For a `-t` exec: when stdin is a terminal, makes it raw and returns it (with its size)
    /// and the controls for the exec: one resize per window change, and a SIGKILL when a
    /// terminating signal arrives. `None` when stdin is not a terminal: the exec
    /// keeps the default 24x80 pty and nothing local changes (as `docker exec -t` does).
    pub fn attach() -> Result<Option<(Terminal, mpsc::UnboundedReceiver<WsControl>)>, CliError> {
        let stdin = std::io::stdin();
        if !stdin.is_terminal() {
            return Ok(None);
        }
        let fd = stdin.as_raw_fd();
        let signal_err = |e| CliError::Local(format!("watching signals for the terminal: {e}"));
        // The handlers stay installed for the process's life (tokio cannot remove them):
        // after the exec these signals are ignored, and the CLI is about to exit anyway.
        let mut winch = signal(SignalKind::window_change()).map_err(signal_err)?;
        let mut ends = TERMINATING
            .iter()
            .map(|&s| Ok((s, signal(SignalKind::from_raw(s))?)))
            .collect::<std::io::Result<Vec<(libc::c_int, Signal)>>>()
            .map_err(signal_err)?;
        let (controls, rx) = mpsc::unbounded_channel();
        let size = window_size(fd).map(|(rows, cols)| TtySize { rows, cols });
        install_panic_hook();
        make_raw(fd).map_err(|e| CliError::Local(format!("making the terminal raw: {e}")))?;
        let (ended, terminated) = oneshot::channel();
        let watcher = tokio::spawn(async move {
            let ending = std::future::poll_fn(|cx| {
                for (signo, s) in &mut ends {
                    if s.poll_recv(cx).is_ready() {
                        return Poll::Ready(*signo);
                    }
                }
                Poll::Pending
            });
            tokio::pin!(ending);
            loop {
                tokio::select! {
                    Some(()) = winch.recv() => {
                        if let Some((rows, cols)) = window_size(fd) {
                            let _ = controls.send(WsControl::Resize { rows, cols });
                        }
                    }
                    signo = &mut ending => {
                        // Told first, so the CLI knows why the exec then ends.
                        let _ = ended.send(signo);
                        let _ = controls.send(WsControl::Signal { signal: libc::SIGKILL });
                        return;
                    }
                }
            }
        });
        Ok(Some((
            Terminal {
                size,
                terminated,
                watcher,
            },
            rx,
        )))
    }

    /// Resolves with the signal that ended the CLI (the exec has been told to die by then).
    pub async fn terminated(&mut self) -> libc::c_int {
        match (&mut self.terminated).await {
            Ok(signo) => signo,
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.watcher.abort();
        restore();
    }
}
