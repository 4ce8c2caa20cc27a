//! A real mvmd on a temporary socket, SQLite file and run directory, with its own cgroup
//! parent and /16, plus a snapshot of everything a sandbox can leave on the host.

#![allow(dead_code)] // Each test binary uses its own subset.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mvm_client::{Client, ClientError};
use mvm_sandbox::http::Endpoint;
use mvm_sandbox::model::{
    CreateSandbox, ExecRequest, Isolation, Lifecycle, OnTimeout, Sandbox, SandboxState,
};

/// A create request for the jail tier, defaults otherwise.
pub fn jail() -> CreateSandbox {
    CreateSandbox {
        isolation: Some(Isolation::Jail),
        ..CreateSandbox::default()
    }
}

/// A jail-tier create whose 2 s timeout does `on_timeout`, resuming it on demand with
/// `auto_resume`.
pub fn jail_timing_out(on_timeout: OnTimeout, auto_resume: bool) -> CreateSandbox {
    CreateSandbox {
        timeout_s: Some(2),
        lifecycle: Lifecycle {
            on_timeout,
            auto_resume,
        },
        ..jail()
    }
}

/// Sandbox `id` once its timeout has paused it (10 s at most).
pub async fn paused_at_timeout(client: &Client, id: &str) -> Sandbox {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = client.get(id).await.expect("a paused sandbox is kept");
        if s.state == SandboxState::Paused {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "not paused at its timeout: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// An exec of `sh -c script`.
pub fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        cmd: vec!["sh".into(), "-c".into(), script.into()],
        ..ExecRequest::default()
    }
}

/// Starts `command` in sandbox `id` in its own session, its output discarded, and returns
/// once it started (e.g. a server the test then talks to).
pub fn detach(client: &Client, id: &str, command: &str) {
    let detached = format!("setsid sh -c '{command}' </dev/null >/dev/null 2>&1 & echo started");
    let out = block_on(client.exec(id, &sh(&detached))).expect("a detached command");
    assert_eq!(out.exit.exit_code, Some(0), "{out:?}");
}

/// The status, code and message of an API error answer; panics on any other error.
pub fn api_error(e: &ClientError) -> (u16, String, String) {
    match e {
        ClientError::Api { status, body } => (*status, body.code.clone(), body.message.clone()),
        other => panic!("expected an API error, got {other}"),
    }
}

/// Whether a run-dir entry name is a sandbox id (12 hex digits; the lock dir also holds lock
/// files being made).
pub fn is_sandbox_id(name: &str) -> bool {
    name.len() == 12 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// This host's cgroup mode, as the manager detects it.
pub fn cgroup_mode() -> &'static mvm_sandbox::manager::cgroups::CgroupMode {
    mvm_sandbox::manager::cgroups::CgroupMode::host()
        .expect("this host's cgroups cannot hold sandboxes")
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One mvmd process and its private directories.
pub struct Daemon {
    /// Temporary root of its state and run dirs.
    pub dir: tempfile::TempDir,
    /// Its unix socket.
    pub socket: PathBuf,
    /// Its cgroup parent.
    pub cgroup_parent: String,
    /// Third octet-pair base of its /16, e.g. "10.231.".
    pub subnet_prefix: String,
    /// Extra mvmd arguments.
    extra: Vec<String>,
    /// Extra mvmd environment, after the defaults.
    env: Vec<(String, PathBuf)>,
    child: Option<Child>,
    /// Every sandbox id seen in its run dir or named by a test: their host veths count as its
    /// interfaces even without an address.
    ids: Mutex<BTreeSet<String>>,
}

impl Daemon {
    /// Starts mvmd and waits until it answers.
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    /// Starts mvmd with extra arguments and waits until it answers.
    pub fn start_with(extra: &[&str]) -> Daemon {
        Self::start_with_env(extra, &[])
    }

    /// Starts mvmd with extra arguments and environment (e.g. another `MVM_BIN_DIR`) and
    /// waits until it answers.
    pub fn start_with_env(extra: &[&str], env: &[(&str, &Path)]) -> Daemon {
        mvm_testkit::build_sandbox_prerequisites();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = tempfile::Builder::new()
            .prefix("mvmd-test")
            .tempdir()
            .expect("tempdir");
        let second = 200 + n % 50;
        let mut d = Daemon {
            socket: dir.path().join("mvmd.sock"),
            cgroup_parent: format!("mvmtest-{}-{n}", std::process::id()),
            subnet_prefix: format!("10.{second}."),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_path_buf()))
                .collect(),
            child: None,
            ids: Mutex::new(BTreeSet::new()),
        };
        d.spawn();
        d
    }

    /// State directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Run directory.
    pub fn run_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    /// (Re)starts the mvmd process on the same directories.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("mvmd.log"))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_mvmd"))
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--run-dir")
            .arg(self.run_dir())
            .arg("--socket")
            .arg(&self.socket)
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .arg("--subnet")
            .arg(format!("{}0.0", self.subnet_prefix))
            .args(&self.extra)
            .env("MVM_BIN_DIR", mvm_testkit::bin_dir())
            .env("MVM_ARTIFACTS", mvm_testkit::artifacts_dir())
            .env_remove("MVM_VM_TIER")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("starting mvmd");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "mvmd did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// mvmd's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("mvmd is running").id()
    }

    /// mvmd's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mvmd.log")).unwrap_or_default()
    }

    /// SIGKILLs mvmd (its sandboxes stay, as after a crash).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill -9 mvmd");
            c.wait().expect("reap mvmd");
        }
    }

    /// The token of tenant `default`.
    pub fn token(&self) -> String {
        std::fs::read_to_string(self.state_dir().join("token"))
            .expect("token file")
            .trim()
            .to_owned()
    }

    /// A client authenticated as `default`.
    pub fn client(&self) -> Client {
        Client::new(Endpoint::Unix(self.socket.clone()), Some(self.token()))
    }

    /// A client with `token` (or none).
    pub fn client_with(&self, token: Option<&str>) -> Client {
        Client::new(
            Endpoint::Unix(self.socket.clone()),
            token.map(str::to_owned),
        )
    }

    /// Creates a tenant with `mvmd tenant create` and returns its token.
    pub fn tenant(&self, name: &str, extra: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_mvmd"))
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["tenant", "create", name])
            .args(extra)
            .output()
            .expect("mvmd tenant create");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .expect("utf-8")
            .trim()
            .to_owned()
    }

    /// Counts sandbox `id`'s host veth in [`Daemon::host_state`] from now on (ids found in the
    /// run dir are counted without this).
    pub fn track(&self, id: &str) {
        self.ids.lock().expect("ids").insert(id.to_owned());
    }

    /// Runs `f` while tracking (see [`Daemon::track`]) every sandbox that shows up in the run
    /// dir meanwhile, e.g. one whose create fails and is rolled back; returns what `f` returned
    /// and the ids seen.
    pub fn watching_ids<T>(&self, f: impl FnOnce() -> T) -> (T, BTreeSet<String>) {
        let run = self.run_dir();
        let done = std::sync::atomic::AtomicBool::new(false);
        let (out, seen) = std::thread::scope(|scope| {
            let watcher = scope.spawn(|| {
                let mut seen = BTreeSet::new();
                while !done.load(Ordering::Relaxed) {
                    for sub in ["locks", "netns", "sandboxes"] {
                        for e in std::fs::read_dir(run.join(sub))
                            .into_iter()
                            .flatten()
                            .flatten()
                        {
                            let name = e.file_name().to_string_lossy().into_owned();
                            if is_sandbox_id(&name) {
                                seen.insert(name);
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_micros(50));
                }
                seen
            });
            let out = f();
            done.store(true, Ordering::Relaxed);
            (out, watcher.join().expect("id watcher"))
        });
        for id in &seen {
            self.track(id);
        }
        (out, seen)
    }

    /// Everything of this daemon's sandboxes on the host: mounts, directories, cgroups,
    /// interfaces with an address in its /16 or named after one of its sandboxes (`mv` + id,
    /// with or without an address), their nftables tables, processes.
    pub fn host_state(&self) -> BTreeSet<String> {
        let mut s = BTreeSet::new();
        let root = self.dir.path().to_string_lossy().into_owned();
        for mp in mvm_testkit::mount_points_under(self.dir.path()) {
            s.insert(format!("mount {}", mp.display()));
        }
        let run = self.run_dir();
        for sub in [
            "sandboxes",
            "netns",
            "locks",
            "jail/mvm-agent",
            "jail/mvm-vmm",
        ] {
            for e in std::fs::read_dir(run.join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                let name = e.file_name().to_string_lossy().into_owned();
                s.insert(format!("dir {sub}/{name}"));
                self.track(&name);
            }
        }
        for dir in cgroup_mode().parent_dirs(&self.cgroup_parent) {
            for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    s.insert(format!("cgroup {}", e.path().display()));
                }
            }
        }
        let addrs = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .expect("ip addr");
        for line in String::from_utf8_lossy(&addrs.stdout).lines() {
            if line.contains(&format!("inet {}", self.subnet_prefix)) {
                s.insert(format!(
                    "interface {}",
                    line.split_whitespace().nth(1).unwrap_or("?")
                ));
            }
        }
        let ids = self.ids.lock().expect("ids").clone();
        let veths: BTreeSet<String> = ids
            .iter()
            .map(|id| mvm_sandbox::manager::net::host_veth(id))
            .collect();
        // The host guard of a sandbox with a veth, the masquerade table of an `egress: all`
        // one, the published ports of one with ports.
        let tables = Command::new("nft")
            .args(["list", "tables"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for line in tables.lines() {
            for prefix in [
                "table ip mvm-egress-",
                "table inet mvm-guard-",
                "table ip mvm-ports-",
            ] {
                if let Some(id) = line.trim().strip_prefix(prefix) {
                    if ids.contains(id) {
                        s.insert(format!("nft {prefix}{id}"));
                    }
                }
            }
        }
        for e in std::fs::read_dir("/sys/class/net")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if veths.contains(&name) {
                s.insert(format!("interface {name}"));
            }
        }
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.parse::<u32>().is_err() {
                continue;
            }
            let cmdline = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
            let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let ours = cgroup.contains(&format!("/{}/", self.cgroup_parent))
                || (cmd.contains("mvm-jailer") && cmd.contains(&root));
            if ours {
                s.insert(format!("process {name} {cmd}"));
            }
        }
        s
    }

    /// Polls `host_state` until it equals `before` (teardown of the veth pair and the
    /// namespace is asynchronous in the kernel), failing with the difference after 10 s.
    pub fn assert_no_leaks(&self, before: &BTreeSet<String>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = self.host_state();
            if &now == before {
                return;
            }
            if Instant::now() > deadline {
                let leaked: Vec<_> = now.difference(before).collect();
                let gone: Vec<_> = before.difference(&now).collect();
                panic!(
                    "host state differs: leaked {leaked:#?}, vanished {gone:#?}\nmvmd log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Graceful stop, then remove what the daemon's sandboxes left (a failed test may leave
        // sandboxes behind; mvmd's reconciliation on a fresh start would clean them too).
        if let Some(mut c) = self.child.take() {
            // SAFETY: plain kill of our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let _ = c.wait();
        }
        // Every sandbox it knew: its processes, then its network (veth, namespace, host guard
        // and masquerade tables; the last `egress: all` one restores ip_forward), by the
        // manager's own teardown.
        let mut ids = self.ids.lock().map(|i| i.clone()).unwrap_or_default();
        for sub in ["sandboxes", "netns"] {
            for e in std::fs::read_dir(self.run_dir().join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                ids.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
        for id in &ids {
            for pid in cgroup_mode().pids(&self.cgroup_parent, id) {
                // SAFETY: plain kill of a sandbox process this test made.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        for id in ids.iter().filter(|id| is_sandbox_id(id)) {
            let _ = mvm_sandbox::manager::net::destroy(&self.run_dir().join("netns").join(id), id);
        }
        let mut mounts = mvm_testkit::mount_points_under(self.dir.path());
        mounts.sort_by_key(|m| std::cmp::Reverse(m.as_os_str().len()));
        for m in mounts {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        std::thread::sleep(Duration::from_millis(50));
        for parent in cgroup_mode().parent_dirs(&self.cgroup_parent) {
            for e in std::fs::read_dir(&parent).into_iter().flatten().flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
            let _ = std::fs::remove_dir(&parent);
        }
    }
}

/// Runs a future on a fresh runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// A websocket exec session on mvmd's socket, after its request was sent.
pub async fn ws_exec(
    d: &Daemon,
    id: &str,
    req: &ExecRequest,
) -> tokio_tungstenite::WebSocketStream<tokio::net::UnixStream> {
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
            "ws://mvmd/v1/sandboxes/{id}/exec/ws"
        ))
        .expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", d.token()).parse().expect("header"),
    );
    let stream = tokio::net::UnixStream::connect(&d.socket)
        .await
        .expect("connect to mvmd");
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream)
        .await
        .expect("websocket upgrade");
    use futures_util::SinkExt;
    ws.send(tokio_tungstenite::tungstenite::Message::Text(
        serde_json::to_string(req).unwrap().into(),
    ))
    .await
    .expect("send the exec request");
    ws
}
