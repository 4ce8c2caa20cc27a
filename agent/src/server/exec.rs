//! Running processes for `Exec` requests: spawning on pipes or a pty, streaming their
//! output and input, timeouts and exit statuses.

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::fdio::AsyncFile;
use super::{pump, AbortOnDrop, ChunkSource, Conn, ExecEntry, InboundItem, InboundStream};
use crate::flow::SendWindow;
use crate::protocol::{
    AgentMessage, Channel, ErrorKind, ExecRequest, ExitStatus, PtySize, RemoteError, Termination,
};

/// `PATH` of processes whose request does not set one.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How long output may stay open after a timeout's SIGKILL before it is abandoned
/// (a process that left the process group can hold the pipes).
const KILL_GRACE: Duration = Duration::from_secs(1);
/// Byte a pty receives when the host closes stdin (the default VEOF, ^D).
const PTY_EOF: u8 = 0x04;

/// Sends `signal` to process group `pgid`, ignoring a group that is already gone.
pub(super) fn kill_group(pgid: i32, signal: i32) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(-pgid, signal) };
}

/// Sets the window size of the pty whose master is `fd`.
pub(super) fn set_window_size(fd: i32, size: PtySize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a `winsize` from the pointer, which refers to a live local.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a pty pair of `size`; both descriptors are close-on-exec.
fn open_pty(size: PtySize) -> io::Result<(OwnedFd, OwnedFd)> {
    let master = posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC)?;
    grantpt(&master)?;
    unlockpt(&master)?;
    let slave_path = ptsname_r(&master)?;
    let slave: OwnedFd = nix::fcntl::open(
        slave_path.as_str(),
        OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )?;
    let master = OwnedFd::from(master);
    set_window_size(std::os::fd::AsRawFd::as_raw_fd(&master), size)?;
    Ok((master, slave))
}

/// The host-facing ends of a spawned process.
struct Spawned {
    pid: i32,
    exit: oneshot::Receiver<Termination>,
    stdin: Option<Arc<AsyncFile>>,
    stdout: Arc<AsyncFile>,
    /// `None` with a pty (the terminal carries both streams).
    stderr: Option<Arc<AsyncFile>>,
    pty: Option<Arc<AsyncFile>>,
}

fn invalid(message: String) -> RemoteError {
    RemoteError::new(ErrorKind::InvalidInput, message)
}

fn build_command(req: &ExecRequest) -> Result<Command, RemoteError> {
    let program = req
        .argv
        .first()
        .ok_or_else(|| invalid("exec needs a non-empty argv".to_owned()))?;
    let cwd = req.cwd.as_deref().unwrap_or("/");
    let root = match req.root.as_deref() {
        Some(root) if !root.starts_with('/') => {
            return Err(invalid(format!("root {root:?} must be an absolute path")))
        }
        Some(root) => {
            check_dir("root", Path::new(root))?;
            Some(root)
        }
        None => None,
    };
    // Checked here for a clear error; the chdir itself happens in the child.
    let cwd_seen = match root {
        Some(root) => Path::new(root).join(cwd.trim_start_matches('/')),
        None => Path::new(cwd).to_owned(),
    };
    check_dir("working directory", &cwd_seen)?;
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..]).env_clear();
    // SAFETY: the hook runs between fork and exec and only calls sigaction, getpriority and
    // setpriority, which are async-signal-safe, on stack memory.
    unsafe { cmd.pre_exec(default_process_state) };
    let home = if req.uid.unwrap_or(0) == 0 {
        "/root"
    } else {
        "/"
    };
    cmd.env("PATH", DEFAULT_PATH).env("HOME", home);
    if req.pty.is_some() {
        cmd.env("TERM", "xterm-256color");
    }
    for (key, value) in &req.env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(invalid(format!("invalid environment variable {key:?}")));
        }
        cmd.env(key, value);
    }
    match root {
        Some(root) => enter_root(&mut cmd, root, cwd, req.uid, req.gid)?,
        None => {
            cmd.current_dir(cwd);
            if let Some(uid) = req.uid {
                cmd.uid(uid);
            }
            if let Some(gid) = req.gid {
                cmd.gid(gid);
            }
        }
    }
    Ok(cmd)
}

/// Gives every signal its default action in an exec's process, as a fresh login would
/// have it: a signal ignored where the agent was started (a daemon started with `nohup` or
/// `&` ignores SIGHUP, SIGINT and SIGQUIT) stays ignored across exec, and ^C on the exec's
/// terminal would not interrupt it. Runs between fork and exec.
fn default_process_state() -> io::Result<()> {
    // The guest's agent runs at a negative nice value (init's AGENT_NICE): not its children.
    // SAFETY: getpriority and setpriority take plain integers.
    unsafe {
        if libc::getpriority(libc::PRIO_PROCESS, 0) < 0
            && libc::setpriority(libc::PRIO_PROCESS, 0, 0) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    for signal in (1..=31).chain(libc::SIGRTMIN()..=libc::SIGRTMAX()) {
        if signal == libc::SIGKILL || signal == libc::SIGSTOP {
            continue;
        }
        // SAFETY: a zeroed sigaction is SIG_DFL with no flags and an empty mask; the kernel
        // reads it during the call.
        unsafe {
            let default: libc::sigaction = std::mem::zeroed();
            libc::sigaction(signal, &default, std::ptr::null_mut());
        }
    }
    Ok(())
}

fn check_dir(what: &str, path: &Path) -> Result<(), RemoteError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(invalid(format!(
            "{what} {} is not a directory",
            path.display()
        ))),
        Err(e) => Err(RemoteError::from_io(
            format!("{what} {}", path.display()),
            &e,
        )),
    }
}

/// Makes the child chroot into `root`, change to `cwd` inside it and only then take `uid`
/// and `gid`: std's own uid/gid/cwd settings apply before `pre_exec` hooks, when the chroot
/// would no longer be allowed or the directory not yet visible.
fn enter_root(
    cmd: &mut Command,
    root: &str,
    cwd: &str,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<(), RemoteError> {
    let c = |what: &str, s: &str| {
        CString::new(s).map_err(|_| invalid(format!("{what} {s:?} contains a NUL byte")))
    };
    let root = c("root", root)?;
    let cwd = c("working directory", cwd)?;
    // SAFETY: the hook runs between fork and exec and only makes async-signal-safe system
    // calls on strings allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let check = |rc: libc::c_int| {
                if rc < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            };
            check(libc::chroot(root.as_ptr()))?;
            check(libc::chdir(cwd.as_ptr()))?;
            if (uid.is_some() || gid.is_some()) && libc::getuid() == 0 {
                // No supplementary groups of the agent's carry over.
                check(libc::setgroups(0, std::ptr::null()))?;
            }
            if let Some(gid) = gid {
                check(libc::setgid(gid))?;
            }
            if let Some(uid) = uid {
                check(libc::setuid(uid))?;
            }
            Ok(())
        });
    }
    Ok(())
}

fn spawn(conn: &Conn, req: &ExecRequest) -> Result<Spawned, RemoteError> {
    let mut cmd = build_command(req)?;
    let program = &req.argv[0];
    let spawn_error = |e: io::Error| RemoteError::from_io(format!("starting {program}"), &e);
    let setup_error = |e: io::Error| RemoteError::from_io("setting up the exec's stdio", &e);
    let pty = match req.pty {
        Some(size) => {
            let (master, slave) = open_pty(size).map_err(setup_error)?;
            let stdin = slave.try_clone().map_err(setup_error)?;
            let stdout = slave.try_clone().map_err(setup_error)?;
            cmd.stdin(stdin).stdout(stdout).stderr(slave);
            // SAFETY: the hook runs between fork and exec and only makes async-signal-safe
            // system calls (setsid, ioctl) without allocating.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Some(master)
        }
        None => {
            let stdin = if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            };
            cmd.stdin(stdin)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
            None
        }
    };
    let (mut child, exit) = conn.agent.reaper.spawn(&mut cmd).map_err(spawn_error)?;
    // The pid fits: Reaper::spawn checked it.
    let pid = child.id() as i32;
    // From here on the process runs: wrap its pipes; on failure kill it (the reaper reaps).
    let wrap = |fd: OwnedFd| AsyncFile::new(fd).map(Arc::new);
    let wrapped = (|| -> io::Result<Spawned> {
        Ok(match pty {
            Some(master) => {
                let master = wrap(master)?;
                Spawned {
                    pid,
                    exit,
                    stdin: req.stdin.then(|| Arc::clone(&master)),
                    stdout: Arc::clone(&master),
                    stderr: None,
                    pty: Some(master),
                }
            }
            None => Spawned {
                pid,
                exit,
                stdin: child.stdin.take().map(|s| wrap(s.into())).transpose()?,
                stdout: wrap(child.stdout.take().ok_or_else(missing_pipe)?.into())?,
                stderr: Some(wrap(child.stderr.take().ok_or_else(missing_pipe)?.into())?),
                pty: None,
            },
        })
    })();
    wrapped.map_err(|e| {
        kill_group(pid, libc::SIGKILL);
        setup_error(e)
    })
}

fn missing_pipe() -> io::Error {
    io::Error::other("child pipe missing")
}

/// Starts exec `id`. The exec's task replies `ExecStarted`, streams its output and
/// reports `Exited`.
pub(super) fn start(conn: &Conn, id: u64, req: ExecRequest) -> Result<(), RemoteError> {
    let spawned = spawn(conn, &req)?;
    let stdout_window = conn.open_outbound(id, Channel::Stdout);
    let stderr_window = conn.open_outbound(id, Channel::Stderr);
    let stdin = spawned
        .stdin
        .as_ref()
        .map(|_| conn.open_inbound(id, Channel::Stdin));
    let pgid = spawned.pid;
    let pty = spawned.pty.clone();
    let timeout = req.timeout_ms.map(Duration::from_millis);
    let exec = Exec {
        conn: conn.clone(),
        id,
        spawned,
        stdin,
        stdout_window,
        stderr_window,
        timeout,
    };
    let mut tables = conn.tables();
    let task = tokio::spawn(exec.run());
    tables.execs.insert(
        id,
        ExecEntry {
            pgid,
            pty,
            task: task.abort_handle(),
        },
    );
    Ok(())
}

impl ChunkSource for Arc<AsyncFile> {
    async fn read_chunk(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read(buf).await
    }
}

/// A started exec, driven by its own task.
struct Exec {
    conn: Conn,
    id: u64,
    spawned: Spawned,
    stdin: Option<InboundStream>,
    stdout_window: Arc<SendWindow>,
    stderr_window: Arc<SendWindow>,
    timeout: Option<Duration>,
}

impl Exec {
    async fn run(self) {
        let Exec {
            conn,
            id,
            spawned,
            stdin,
            stdout_window,
            stderr_window,
            timeout,
        } = self;
        let out = &conn.out;
        let pid = spawned.pid;
        out.reply(
            id,
            crate::protocol::Reply::ExecStarted {
                // A pid is positive.
                pid: pid as u32,
            },
        )
        .await;

        let output_task =
            |channel: Channel, window: Arc<SendWindow>, file: Option<Arc<AsyncFile>>| {
                let out = out.clone();
                AbortOnDrop(tokio::spawn(async move {
                    match file {
                        Some(file) => {
                            if let Err(e) = pump(&out, id, channel, &window, file).await {
                                crate::log!("exec {id}: reading {channel:?} failed: {e}");
                                out.send(AgentMessage::Eof { id, channel }).await;
                            }
                        }
                        None => {
                            out.send(AgentMessage::Eof { id, channel }).await;
                        }
                    }
                }))
            };
        let mut stdout = output_task(Channel::Stdout, stdout_window, Some(spawned.stdout));
        let mut stderr = output_task(Channel::Stderr, stderr_window, spawned.stderr);
        let _stdin = match (stdin, spawned.stdin) {
            (Some(stream), Some(file)) => Some(AbortOnDrop(tokio::spawn(feed_stdin(
                stream,
                file,
                spawned.pty.is_some(),
            )))),
            _ => None,
        };

        let mut exit = spawned.exit;
        let mut termination = None;
        let mut outputs_done = false;
        let mut timed_out = false;
        let sleep = tokio::time::sleep(timeout.unwrap_or(Duration::MAX / 4));
        tokio::pin!(sleep);
        let outputs = async {
            let _ = (&mut stdout.0).await;
            let _ = (&mut stderr.0).await;
        };
        tokio::pin!(outputs);
        loop {
            tokio::select! {
                t = &mut exit, if termination.is_none() => {
                    termination = Some(t.unwrap_or_else(|_| {
                        crate::log!("exec {id}: exit status lost");
                        Termination::Signaled(libc::SIGKILL)
                    }));
                }
                () = &mut outputs, if !outputs_done => outputs_done = true,
                () = &mut sleep, if timeout.is_some() => {
                    if timed_out {
                        // Grace expired: something outside the process group holds the output.
                        break;
                    }
                    timed_out = true;
                    kill_group(pid, libc::SIGKILL);
                    sleep.as_mut().reset(Instant::now() + KILL_GRACE);
                }
            }
            if termination.is_some() && outputs_done {
                break;
            }
        }
        if !outputs_done {
            for (task, channel) in [(&stdout, Channel::Stdout), (&stderr, Channel::Stderr)] {
                if !task.0.is_finished() {
                    task.0.abort();
                    out.send(AgentMessage::Eof { id, channel }).await;
                }
            }
        }
        let termination = match termination {
            Some(t) => t,
            None => (&mut exit)
                .await
                .unwrap_or(Termination::Signaled(libc::SIGKILL)),
        };
        let status = ExitStatus {
            termination,
            timed_out,
        };
        {
            let mut tables = conn.tables();
            tables.execs.remove(&id);
            tables.inbound.remove(&(id, Channel::Stdin));
            tables.outbound.remove(&(id, Channel::Stdout));
            tables.outbound.remove(&(id, Channel::Stderr));
        }
        out.send(AgentMessage::Exited { id, status }).await;
    }
}

/// Writes the host's stdin chunks to the process, returning credit as they are written.
/// After the process stops reading, further chunks are discarded (still credited).
async fn feed_stdin(mut stream: InboundStream, file: Arc<AsyncFile>, pty: bool) {
    let mut broken = false;
    while let Some(item) = stream.next().await {
        match item {
            InboundItem::Data(data) => {
                if !broken {
                    broken = file.write_all(&data).await.is_err();
                }
                stream.consumed(data.len()).await;
            }
            InboundItem::Eof => {
                if pty && !broken {
                    // Closing the master would hang the terminal up; send end-of-file instead.
                    let _ = file.write_all(&[PTY_EOF]).await;
                }
                return;
            }
        }
    }
}
