//! What the cli test binaries share: an isolated mvm environment and its leak checks.
#![allow(dead_code)] // each test binary uses a part

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mvm_testkit::{artifacts_dir, bin_dir, text};

/// An isolated mvm environment: its own state, run dir and cgroup parent.
pub struct Env {
    pub dir: tempfile::TempDir,
    pub cgroup_parent: String,
}

impl Env {
    pub fn new() -> Env {
        mvm_testkit::build_sandbox_prerequisites();
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Env {
            dir: tempfile::Builder::new()
                .prefix("mvm-cli-test")
                .tempdir()
                .expect("tempdir"),
            cgroup_parent: format!("mvm-cli-test-{}-{n}", std::process::id()),
        }
    }

    pub fn mvm(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_mvm"));
        c.env("MVM_STATE_DIR", self.dir.path().join("state"))
            .env("MVM_RUN_DIR", self.dir.path().join("run"))
            .env("MVM_BIN_DIR", bin_dir())
            .env("MVM_ARTIFACTS", artifacts_dir())
            .env("MVM_CGROUP_PARENT", &self.cgroup_parent)
            .env_remove("MVM_HOST")
            .env_remove("MVM_TOKEN")
            .env_remove("MVM_ISOLATION")
            .env_remove("MVM_VM_TIER");
        c
    }

    /// `mvm` talking to the mvmd at `host`, or daemonless.
    pub fn mvm_at(&self, host: Option<&str>) -> Command {
        let mut c = self.mvm();
        if let Some(host) = host {
            c.env("MVM_HOST", host);
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.mvm().args(args).output().expect("running mvm")
    }

    /// The parent cgroups of this environment's sandboxes (one per hierarchy on cgroup v1).
    pub fn cgroup_parents(&self) -> Vec<PathBuf> {
        mvm_sandbox::manager::cgroups::CgroupMode::host()
            .expect("this host's cgroups cannot hold sandboxes")
            .parent_dirs(&self.cgroup_parent)
    }

    /// The sandbox cgroups under this environment's parent.
    pub fn sandbox_cgroups(&self) -> Vec<PathBuf> {
        self.cgroup_parents()
            .iter()
            .flat_map(|p| std::fs::read_dir(p).into_iter().flatten().flatten())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect()
    }

    /// Mount points under this environment's directory.
    pub fn mounts(&self) -> Vec<String> {
        mvm_testkit::mount_points_under(self.dir.path())
            .into_iter()
            .map(|mp| mp.display().to_string())
            .collect()
    }

    /// What this environment's sandboxes left on the host: run-dir entries, cgroups, mounts,
    /// processes (in its cgroups, or jailers of its run dir).
    pub fn leftovers(&self) -> Vec<String> {
        let mut left = Vec::new();
        for sub in ["sandboxes", "netns", "locks", "jail/mvm-agent"] {
            for e in std::fs::read_dir(self.dir.path().join("run").join(sub))
                .into_iter()
                .flatten()
                .flatten()
            {
                left.push(format!("{sub}/{}", e.file_name().to_string_lossy()));
            }
        }
        left.extend(
            self.sandbox_cgroups()
                .iter()
                .map(|c| format!("cgroup {}", c.display())),
        );
        left.extend(self.mounts().into_iter().map(|m| format!("mount {m}")));
        let root = self.dir.path().to_string_lossy().into_owned();
        let in_parent = format!("/{}/", self.cgroup_parent);
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let pid = e.file_name().to_string_lossy().into_owned();
            if pid.parse::<u32>().is_err() {
                continue;
            }
            let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
            let cmd = text(&std::fs::read(e.path().join("cmdline")).unwrap_or_default())
                .replace('\0', " ");
            if cgroup.contains(&in_parent) || (cmd.contains("mvm-jailer") && cmd.contains(&root)) {
                left.push(format!("process {pid} {cmd}"));
            }
        }
        left
    }

    /// Nothing of a sandbox left on the host. Polled for up to 10 s: the kernel tears
    /// processes and namespaces down asynchronously.
    pub fn assert_empty(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.leftovers();
            if left.is_empty() {
                return;
            }
            assert!(Instant::now() < deadline, "left on the host: {left:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Env {
    /// Removes what a failed test may have left (processes, mounts, cgroups), then the
    /// parent cgroups.
    fn drop(&mut self) {
        let mode = mvm_sandbox::manager::cgroups::CgroupMode::host().ok();
        for cgroup in self.sandbox_cgroups() {
            let id = cgroup.file_name().unwrap_or_default().to_string_lossy();
            for pid in mode
                .map(|m| m.pids(&self.cgroup_parent, &id))
                .unwrap_or_default()
            {
                // SAFETY: plain kill of a sandbox process this test made.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let mut mounts = self.mounts();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for cgroup in self.sandbox_cgroups() {
            // A killed process's cgroup stays busy until its last thread is gone.
            while std::fs::remove_dir(&cgroup).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for parent in self.cgroup_parents() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// A `mvm serve` (mvmd) of an environment, stopped when dropped.
pub struct Served {
    child: Child,
    /// Its unix socket.
    pub socket: PathBuf,
}

impl Drop for Served {
    fn drop(&mut self) {
        // SAFETY: plain kill of our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// Starts mvmd on the environment's state and waits for its socket.
pub fn serve(env: &Env) -> Served {
    let socket = env.dir.path().join("mvmd.sock");
    let child = env
        .mvm()
        .args(["serve", "--socket"])
        .arg(&socket)
        .stderr(Stdio::null())
        .spawn()
        .expect("mvm serve");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(&socket).is_err() {
        assert!(Instant::now() < deadline, "mvm serve did not come up");
        std::thread::sleep(Duration::from_millis(10));
    }
    Served { child, socket }
}
