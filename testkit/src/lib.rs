//! Test support shared by mvm's test suites and benchmarks: assembles the freestanding test
//! guests in `testkit/guests/`, locates workspace binaries and built artifacts (guest kernel,
//! rootfs), checks host prerequisites so tests can skip loudly (or fail, in CI), and runs
//! `mvm-vmm` with a timeout.

pub mod containerd;
#[cfg(feature = "cri")]
pub mod cri;
pub mod page_server;
pub mod ports;
pub mod procs;
#[cfg(feature = "registry")]
pub mod registry;
pub mod rss;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives one level below the workspace root")
        .to_path_buf()
}

/// Cargo's target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A binary of the workspace, built for the static host target.
pub fn binary(name: &str) -> PathBuf {
    let path = target_dir()
        .join("x86_64-unknown-linux-gnu/debug")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace` first",
        path.display()
    );
    path
}

/// Where the guest-kernel and rootfs scripts put their outputs.
pub fn artifacts_dir() -> PathBuf {
    std::env::var_os("MVM_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir().join("mvm-artifacts"))
}

/// Assembles and links test guest `name` (`testkit/guests/<name>.S`) into an ELF, once per
/// process, and returns its path.
pub fn guest(name: &str) -> PathBuf {
    static BUILD: Mutex<()> = Mutex::new(());
    let _serialized = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    let src_dir = workspace_root().join("testkit/guests");
    let out_dir = target_dir().join("test-guests");
    std::fs::create_dir_all(&out_dir).expect("create target/test-guests");
    let object = out_dir.join(format!("{name}.o"));
    let elf = out_dir.join(format!("{name}.elf"));
    let run = |cmd: &mut Command| {
        let out = cmd
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (install binutils)"));
        assert!(
            out.status.success(),
            "{cmd:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(Command::new("as")
        .arg("--64")
        .arg("-I")
        .arg(&src_dir)
        .arg("-o")
        .arg(&object)
        .arg(src_dir.join(format!("{name}.S"))));
    run(Command::new("ld")
        .args(["--no-warn-rwx-segments", "-nostdlib", "-static", "-T"])
        .arg(src_dir.join("guest.ld"))
        .arg("-o")
        .arg(&elf)
        .arg(&object));
    elf
}

/// What kind of KVM this host has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmKind {
    /// Hardware-assisted KVM (VT-x / SVM): Linux guests reach userspace.
    Hardware,
    /// The `kvm_pvm` module: raw KVM works, guest ring 0 is emulated, Linux stops early.
    Pvm,
}

/// The usable KVM of this host, or why there is none.
pub fn kvm() -> Result<KvmKind, String> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| format!("/dev/kvm is not usable: {e}"))?;
    drop(file);
    Ok(if Path::new("/sys/module/kvm_pvm").exists() {
        KvmKind::Pvm
    } else {
        KvmKind::Hardware
    })
}

/// Whether the suite runs in CI: `CI` is set to a non-empty value (`.ci/run` runs with
/// `CI=true`). There every prerequisite is installed first, so a missing one is a failure.
pub fn in_ci() -> bool {
    ci_is_set(std::env::var_os("CI").as_deref())
}

fn ci_is_set(value: Option<&std::ffi::OsStr>) -> bool {
    value.is_some_and(|v| !v.is_empty())
}

/// Reports that `test` cannot run because `why` (something it needs is missing): a loud SKIP
/// line on a developer's machine, a panic with the same reason in CI ([`in_ci`]), so CI can
/// never pass without running the test. Callers return right after it.
#[track_caller]
pub fn skip_or_fail_in_ci(test: &str, why: &str) {
    skip_or_fail(in_ci(), test, why);
}

#[track_caller]
fn skip_or_fail(ci: bool, test: &str, why: &str) {
    assert!(
        !ci,
        "{test}: {why} (CI is set: a missing prerequisite fails instead of skipping)"
    );
    eprintln!("SKIP {test}: {why}");
}

/// Returns true if the test may run; otherwise skips it loudly, or fails it in CI, saying why
/// (see [`skip_or_fail_in_ci`]).
#[track_caller]
pub fn require_kvm(test: &str) -> bool {
    match kvm() {
        Ok(_) => true,
        Err(why) => {
            skip_or_fail_in_ci(test, &why);
            false
        }
    }
}

/// Mount points at or below `dir` in this mount namespace (names fully unescaped), for leak
/// checks.
pub use mvm_sys::mountinfo::mount_points_under;

/// The size and free space of the file system holding a path (statvfs(2)).
pub use mvm_sys::mount::statvfs;

/// Moves the calling thread into the network namespace `ns` (an open `/run/netns/NAME` or
/// `/proc/PID/ns/net`): for a thread of a test's own, which ends there.
pub fn enter_netns(ns: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: setns with a descriptor the caller keeps open and a flag constant; it moves
    // only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the tests run as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// True when the tests run as root; otherwise skips `test` loudly, or fails it in CI (see
/// [`skip_or_fail_in_ci`]).
#[track_caller]
pub fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    skip_or_fail_in_ci(
        test,
        "needs root (namespaces, cgroups, mounts, mknod, setuid); run the tests as root",
    );
    false
}

/// The Python with the official MCP client (the `mcp` package): `MVM_TEST_PYTHON`, else
/// scripts/deps.sh's venv; `None` after skipping `test` loudly (or failing it in CI, see
/// [`skip_or_fail_in_ci`]) when it cannot import `mcp`.
#[track_caller]
pub fn mcp_python_or_skip(test: &str) -> Option<PathBuf> {
    let python = std::env::var_os("MVM_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/mvm-test-venv/bin/python"));
    let imports = Command::new(&python)
        .args(["-c", "import mcp"])
        .output()
        .is_ok_and(|o| o.status.success());
    if imports {
        return Some(python);
    }
    skip_or_fail_in_ci(
        test,
        &format!(
            "{} cannot import the Python `mcp` package: run scripts/deps.sh (or set \
             MVM_TEST_PYTHON)",
            python.display()
        ),
    );
    None
}

/// The step named `name` of a test client's JSON report (a list of `{"step": NAME, ...}`
/// objects, as the MCP and SDK clients of the tests print).
#[track_caller]
pub fn report_step<'a>(steps: &'a [serde_json::Value], name: &str) -> &'a serde_json::Value {
    steps
        .iter()
        .find(|s| s["step"] == name)
        .unwrap_or_else(|| panic!("the client reported no step {name}: {steps:#?}"))
}

/// The directory of the workspace binaries Cargo built for the running integration test, the
/// one its `CARGO_BIN_EXE_*` point into (the test executable lives in its `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    exe.parent()
        .and_then(Path::parent)
        .expect("an integration test runs from <target dir>/<profile>/deps")
        .to_path_buf()
}

/// Builds mvm-jailer, mvm-agent, mvm-dns and mvm-egress into [`bin_dir`] (Cargo builds only the binaries of the
/// package under test; this is a no-op when they are up to date), once per test process.
pub fn build_jailer_and_agent() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "-p", "jailer", "-p", "agent", "--bins"])
            .args([
                "-p",
                "mvm-sandbox",
                "--bin",
                "mvm-dns",
                "--bin",
                "mvm-egress",
            ])
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build for mvm-jailer and mvm-agent")
            .success();
        assert!(ok, "building mvm-jailer and mvm-agent failed");
    });
}

/// What a sandbox needs besides the package under test, once per test process: mvm-jailer
/// and mvm-agent ([`build_jailer_and_agent`]) and the base image (`rootfs/build.sh` with that
/// agent) in [`artifacts_dir`], made again when it is missing or older than the agent (an
/// image with an agent of another protocol version fails every create).
pub fn build_sandbox_prerequisites() {
    build_jailer_and_agent();
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let image = artifacts_dir().join("rootfs.ext4");
        let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if let (Some(made), Some(agent)) =
            (modified(&image), modified(&bin_dir().join("mvm-agent")))
        {
            if made >= agent {
                return;
            }
        }
        let ok = Command::new(workspace_root().join("rootfs/build.sh"))
            .arg("--agent")
            .arg(bin_dir().join("mvm-agent"))
            .arg("--output")
            .arg(&image)
            .status()
            .expect("running rootfs/build.sh")
            .success();
        assert!(ok, "rootfs/build.sh failed");
    });
}

/// `bytes` as text, invalid UTF-8 replaced (for output in assertion messages).
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A finished `mvm-vmm` run.
#[derive(Debug)]
pub struct VmmRun {
    /// Exit status (None when it was killed at the timeout).
    pub status: Option<ExitStatus>,
    /// Everything it wrote to stdout (the guest console).
    pub stdout: String,
    /// Everything it wrote to stderr.
    pub stderr: String,
}

impl VmmRun {
    /// The exit code, panicking with the output if the VMM timed out or died by a signal.
    pub fn code(&self) -> i32 {
        match self.status.and_then(|s| s.code()) {
            Some(code) => code,
            None => panic!("mvm-vmm did not exit by itself: {self:#?}"),
        }
    }
}

/// Reads a pipe to its end on a thread (so a full pipe never blocks the child).
fn read_in_background(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            // Output that is not UTF-8 or a broken pipe just ends what is collected.
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// Kills `child` at `timeout` and collects its output.
pub fn wait_with_timeout(mut child: Child, timeout: Duration) -> VmmRun {
    let out = read_in_background(child.stdout.take());
    let err = read_in_background(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    VmmRun {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// A fresh scratch directory under the target dir, removed on drop.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `/var/tmp/mvm-tests/<tag>-<pid>-<n>`: outside the checkout, so unix socket
    /// paths inside stay short wherever the repository lives.
    pub fn new(tag: &str) -> Self {
        static COUNTER: OnceLock<Mutex<u32>> = OnceLock::new();
        let mut n = COUNTER
            .get_or_init(|| Mutex::new(0))
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *n += 1;
        let dir =
            Path::new("/var/tmp/mvm-tests").join(format!("{tag}-{}-{}", std::process::id(), *n));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        ScratchDir(dir)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `mvm-vmm --no-api --config-file` with `config` (a Firecracker JSON document) and
/// returns when it exits or after `timeout`.
pub fn run_vmm_config(config: &serde_json::Value, timeout: Duration) -> VmmRun {
    let (child, _dir) = spawn_vmm_config(config);
    wait_with_timeout(child, timeout)
}

/// Starts `mvm-vmm --no-api --config-file` with `config`, stdout and stderr piped; the
/// returned directory holds the config file and must outlive the VMM's start.
pub fn spawn_vmm_config(config: &serde_json::Value) -> (Child, ScratchDir) {
    let dir = ScratchDir::new("vmm");
    let path = dir.path().join("vm.json");
    std::fs::write(&path, config.to_string()).expect("write config");
    let child = Command::new(binary("mvm-vmm"))
        .arg("--no-api")
        .arg("--config-file")
        .arg(&path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mvm-vmm");
    (child, dir)
}

/// A minimal configuration booting `kernel` with `vcpus` and `mem_mib`.
pub fn config_for(kernel: &Path, boot_args: &str, vcpus: u8, mem_mib: u64) -> serde_json::Value {
    serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": boot_args},
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": mem_mib},
    })
}

/// Sends one HTTP/1.1 request over a unix socket and returns (status, body).
pub fn http_unix(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::Write;
    let mut stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("malformed response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Waits until `path` accepts connections (a server finished starting), up to `timeout`.
pub fn wait_for_socket(path: &Path, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// Boots `config` with `mvm-vmm --no-api`, reads the console until `marker` appears (then kills
/// the VMM) or `timeout` passes. Returns whether the marker appeared and the console so far.
pub fn run_vmm_until(
    config: &serde_json::Value,
    marker: &str,
    timeout: Duration,
) -> (bool, String) {
    let (mut child, _dir) = spawn_vmm_config(config);
    let mut stdout = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + timeout;
    let mut console = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(chunk) => {
                console.extend_from_slice(&chunk);
                if String::from_utf8_lossy(&console).contains(marker) {
                    break true;
                }
            }
            Err(_) => break false,
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    (found, String::from_utf8_lossy(&console).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn ci_counts_as_set_only_when_non_empty() {
        assert!(!ci_is_set(None));
        assert!(!ci_is_set(Some(OsStr::new(""))));
        assert!(ci_is_set(Some(OsStr::new("true"))));
        assert!(ci_is_set(Some(OsStr::new("1"))));
    }

    #[test]
    fn outside_ci_a_missing_prerequisite_skips() {
        skip_or_fail(false, "some_test", "/dev/kvm is not usable");
    }

    #[test]
    #[should_panic(expected = "some_test: /dev/kvm is not usable (CI is set")]
    fn in_ci_a_missing_prerequisite_fails_with_the_reason() {
        skip_or_fail(true, "some_test", "/dev/kvm is not usable");
    }
}
