//! One `mvm-vmm` process under test: spawned from a config file or configured through its API
//! socket, its console read line by line with arrival times, stopped with SIGTERM (SIGKILL as a
//! last resort) and always reaped, its scratch directory always removed.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a VMM gets to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(10);

/// Why a micro-VM could not be started or did not behave.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The scratch directory or the config file could not be written.
    #[error("cannot prepare {path}: {source}")]
    Scratch {
        /// What could not be written.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// `mvm-vmm` could not be executed.
    #[error("cannot start {vmm}: {source}")]
    Spawn {
        /// The binary.
        vmm: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The API socket did not accept connections in time.
    #[error("the API socket {0} did not come up within 10 s")]
    ApiSocket(PathBuf),
    /// An API request failed or was refused.
    #[error("API {method} {path} failed: {detail}")]
    Api {
        /// HTTP method.
        method: &'static str,
        /// Request path.
        path: &'static str,
        /// Status and body, or the I/O error.
        detail: String,
    },
}

/// How a VMM ended when asked to stop.
#[derive(Debug)]
pub enum Stopped {
    /// It exited on SIGTERM within the grace period.
    Terminated(ExitStatus),
    /// It ignored SIGTERM and was killed.
    Killed,
    /// It had already exited on its own.
    AlreadyExited(ExitStatus),
}

/// A running (or finished) `mvm-vmm` with its console.
pub struct MicroVm {
    child: Child,
    started: Instant,
    lines: Receiver<(Instant, String)>,
    console: Vec<String>,
    stderr: Arc<Mutex<String>>,
    status: Option<ExitStatus>,
    dir: PathBuf,
    echo: Option<String>,
}

impl MicroVm {
    /// Starts `mvm-vmm --no-api --config-file` with `config` in a fresh directory under
    /// `scratch`; `echo` prefixes console lines copied to stdout (None: keep them quiet).
    pub fn from_config(
        vmm: &Path,
        scratch: &Path,
        name: &str,
        config: &serde_json::Value,
        echo: bool,
    ) -> Result<Self, VmError> {
        Self::from_command(scratch, name, config, echo, |config_path| {
            let mut cmd = Command::new(vmm);
            cmd.arg("--no-api").arg("--config-file").arg(config_path);
            cmd
        })
    }

    /// Writes `config` to `vm.json` in a fresh directory under `scratch` and runs the command
    /// `make` builds from that file's path (e.g. mvm-vmm wrapped by mvm-jailer).
    pub fn from_command(
        scratch: &Path,
        name: &str,
        config: &serde_json::Value,
        echo: bool,
        make: impl FnOnce(&Path) -> Command,
    ) -> Result<Self, VmError> {
        let dir = make_dir(scratch, name)?;
        let config_path = dir.join("vm.json");
        std::fs::write(&config_path, config.to_string()).map_err(|source| VmError::Scratch {
            path: config_path.clone(),
            source,
        })?;
        let cmd = make(&config_path);
        let program = PathBuf::from(cmd.get_program());
        Self::spawn(cmd, &program, dir, name, echo)
    }

    /// Starts `mvm-vmm --api-sock <dir>/api.sock` and boots it through the API: boot source,
    /// machine config, then InstanceStart — the path the sandbox manager takes.
    pub fn from_api(
        vmm: &Path,
        scratch: &Path,
        name: &str,
        boot_source: &serde_json::Value,
        machine: &serde_json::Value,
        echo: bool,
    ) -> Result<Self, VmError> {
        let dir = make_dir(scratch, name)?;
        let socket = dir.join("api.sock");
        let mut cmd = Command::new(vmm);
        cmd.arg("--api-sock").arg(&socket).arg("--id").arg(name);
        let vm = Self::spawn(cmd, vmm, dir, name, echo)?;
        if !mvm_testkit::wait_for_socket(&socket, Duration::from_secs(10)) {
            return Err(VmError::ApiSocket(socket));
        }
        let requests: [(&'static str, String); 3] = [
            ("/boot-source", boot_source.to_string()),
            ("/machine-config", machine.to_string()),
            (
                "/actions",
                r#"{"action_type": "InstanceStart"}"#.to_string(),
            ),
        ];
        for (path, body) in requests {
            match mvm_testkit::http_unix(&socket, "PUT", path, Some(&body)) {
                Ok((status, _)) if (200..300).contains(&status) => {}
                Ok((status, reply)) => {
                    return Err(VmError::Api {
                        method: "PUT",
                        path,
                        detail: format!("HTTP {status}: {reply}"),
                    })
                }
                Err(e) => {
                    return Err(VmError::Api {
                        method: "PUT",
                        path,
                        detail: e.to_string(),
                    })
                }
            }
        }
        Ok(vm)
    }

    fn spawn(
        mut cmd: Command,
        vmm: &Path,
        dir: PathBuf,
        name: &str,
        echo: bool,
    ) -> Result<Self, VmError> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(child) => child,
            Err(source) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(VmError::Spawn {
                    vmm: vmm.to_path_buf(),
                    source,
                });
            }
        };
        let (tx, lines) = mpsc::channel();
        if let Some(mut out) = child.stdout.take() {
            std::thread::spawn(move || {
                let mut pending = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = out.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.iter().position(|&b| b == b'\n') {
                        let line: Vec<u8> = pending.drain(..=end).collect();
                        let text = String::from_utf8_lossy(&line)
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        if tx.send((Instant::now(), text)).is_err() {
                            return;
                        }
                    }
                }
                if !pending.is_empty() {
                    let _ = tx.send((
                        Instant::now(),
                        String::from_utf8_lossy(&pending).into_owned(),
                    ));
                }
            });
        }
        let stderr = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Ok(MicroVm {
            child,
            started,
            lines,
            console: Vec::new(),
            stderr,
            status: None,
            dir,
            echo: echo.then(|| format!("  [{name}] ")),
        })
    }

    /// The VMM's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The API socket path (only meaningful for VMs from [`MicroVm::from_api`]).
    pub fn api_socket(&self) -> PathBuf {
        self.dir.join("api.sock")
    }

    /// The scratch directory holding the config and the API socket.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn take_line(&mut self, timeout: Duration) -> Result<(Instant, String), RecvTimeoutError> {
        let (at, line) = self.lines.recv_timeout(timeout)?;
        if let Some(prefix) = &self.echo {
            println!("{prefix}{line}");
        }
        self.console.push(line.clone());
        Ok((at, line))
    }

    /// Waits for a console line containing `needle`; returns the line and the time from VMM
    /// start to its arrival, or None at the timeout or when the console closed first.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Option<(String, Duration)> {
        if let Some(line) = self.console.iter().find(|l| l.contains(needle)) {
            return Some((line.clone(), Duration::ZERO));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.take_line(left) {
                Ok((at, line)) if line.contains(needle) => return Some((line, at - self.started)),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Drains the console and waits for the VMM to exit on its own, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.status.is_none() {
            match self.child.try_wait() {
                Ok(Some(status)) => self.status = Some(status),
                Ok(None) if Instant::now() < deadline => {
                    if let Err(RecvTimeoutError::Disconnected) =
                        self.take_line(Duration::from_millis(20))
                    {
                        // The guest console closed before the process exited.
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Ok(None) => return None,
                Err(e) => {
                    eprintln!("nested: waitpid({}) failed: {e}", self.child.id());
                    return None;
                }
            }
        }
        // The pipe may still hold the last lines the guest wrote.
        while self.take_line(Duration::from_millis(200)).is_ok() {}
        self.status
    }

    /// Time since the VMM was spawned.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops the VMM: SIGTERM, then SIGKILL after the grace period. The process is reaped.
    pub fn stop(&mut self) -> Stopped {
        if let Some(status) = self.wait_exit(Duration::ZERO) {
            return Stopped::AlreadyExited(status);
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill(2) on our own unreaped child; the pid cannot have been reused.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        match self.wait_exit(TERM_GRACE) {
            Some(status) => Stopped::Terminated(status),
            None => {
                let _ = self.child.kill();
                if let Ok(status) = self.child.wait() {
                    self.status = Some(status);
                }
                Stopped::Killed
            }
        }
    }

    /// The last `n` console lines and the VMM's stderr, indented, for a failure report.
    pub fn diagnostics(&self, n: usize) -> String {
        let mut out = String::new();
        let skip = self.console.len().saturating_sub(n);
        out.push_str(&format!(
            "    console (last {} of {} lines):\n",
            self.console.len() - skip,
            self.console.len()
        ));
        for line in &self.console[skip..] {
            out.push_str(&format!("    | {line}\n"));
        }
        let stderr = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        if !stderr.trim().is_empty() {
            out.push_str("    mvm-vmm stderr:\n");
            for line in stderr
                .lines()
                .rev()
                .take(n)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                out.push_str(&format!("    ! {line}\n"));
            }
        }
        out
    }

    /// What the VMM wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// (VmRSS, VmHWM) of the VMM process in KiB, while it runs.
    pub fn memory_kib(&self) -> Option<(u64, u64)> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn make_dir(scratch: &Path, name: &str) -> Result<PathBuf, VmError> {
    let dir = scratch.join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|source| VmError::Scratch {
        path: dir.clone(),
        source,
    })?;
    Ok(dir)
}
