//! The shim under a real containerd (Debian's), started by the test with its own config, root,
//! state, socket and cgroup parent, on an OCI image the test builds from busybox-static.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const RUNTIME: &str = "io.containerd.mvm.v2";
const IMAGE: &str = "docker.io/mvm-test/busybox:latest";
const NAMESPACE: &str = "mvm-test";
const CGROUP_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];

fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-mvm-v2"))
        .parent()
        .expect("bin dir")
        .to_path_buf()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Root and containerd, ctr and busybox-static present; else says why and returns false.
fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED {test}: needs root (containerd, mounts, cgroups); run the tests as root"
        );
        return false;
    }
    for tool in ["containerd", "ctr"] {
        if which(tool).is_none() {
            eprintln!("SKIPPED {test}: `{tool}` is not installed (apt-get install containerd)");
            return false;
        }
    }
    if !Path::new("/bin/busybox").is_file() {
        eprintln!("SKIPPED {test}: /bin/busybox is missing (apt-get install busybox-static)");
        return false;
    }
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if !bin_dir().join("mvm-jailer").is_file() || !bin_dir().join("mvm-agent").is_file() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let ok = Command::new(cargo)
                .args(["build", "-p", "jailer", "-p", "agent", "--bins"])
                .current_dir(workspace())
                .status()
                .expect("cargo build")
                .success();
            assert!(ok, "building mvm-jailer and mvm-agent failed");
        }
    });
    true
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An OCI image layout tarball: one uncompressed layer with busybox-static and its applets.
fn build_image(dir: &Path) -> PathBuf {
    let tree = dir.join("image-tree");
    for d in ["bin", "tmp", "etc", "root"] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::set_permissions(
        tree.join("tmp"),
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .unwrap();
    std::fs::copy("/bin/busybox", tree.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "echo", "cat", "sleep", "dd", "true", "id", "ls", "head",
    ] {
        std::os::unix::fs::symlink("busybox", tree.join("bin").join(applet)).unwrap();
    }
    std::fs::write(tree.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    let layer_tar = dir.join("layer.tar");
    let ok = Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "-C",
        ])
        .arg(&tree)
        .arg("-cf")
        .arg(&layer_tar)
        .arg(".")
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar of the image layer failed");
    let layout = dir.join("layout");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let blob = |data: &[u8]| -> (String, usize) {
        let hex = sha256_hex(data);
        std::fs::write(blobs.join(&hex), data).unwrap();
        (format!("sha256:{hex}"), data.len())
    };
    let (layer_digest, layer_size) = blob(&std::fs::read(&layer_tar).unwrap());
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    });
    let (config_digest, config_size) = blob(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest, "size": config_size,
        },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest, "size": layer_size,
        }],
    });
    let (manifest_digest, manifest_size) = blob(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": IMAGE,
                "org.opencontainers.image.ref.name": "latest",
            },
        }],
    });
    std::fs::write(layout.join("index.json"), index.to_string()).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let tarball = dir.join("image.tar");
    let ok = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tarball)
        .arg(".")
        .status()
        .unwrap()
        .success();
    assert!(ok, "tar of the image layout failed");
    tarball
}

/// A containerd of the test's own, with the image imported.
struct Containerd {
    dir: tempfile::TempDir,
    child: Child,
    cgroup_parent: String,
}

impl Containerd {
    fn start(name: &str) -> Containerd {
        let dir = tempfile::Builder::new()
            .prefix(&format!("mvm-shim-{name}-"))
            .tempdir()
            .unwrap();
        let d = dir.path();
        let config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  level = \"debug\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let path = format!(
            "{}:{}",
            bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let cgroup_parent = format!("mvm-shim-test-{}-{name}", std::process::id());
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .env("MVM_SHIM_STATE_DIR", d.join("shim"))
            .env("MVM_CGROUP_PARENT", &cgroup_parent)
            .env("MVM_BIN_DIR", bin_dir())
            .env_remove("MVM_ISOLATION")
            .env_remove("MVM_VM_TIER")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let c = Containerd {
            dir,
            child,
            cgroup_parent,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"]).status.success() {
            assert!(
                Instant::now() < deadline,
                "containerd did not come up; its log:\n{}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let image = build_image(c.dir.path());
        let out = c.ctr(&["images", "import", &image.to_string_lossy()]);
        assert!(
            out.status.success(),
            "ctr images import: {}",
            text(&out.stderr)
        );
        c
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(NAMESPACE)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args).output().expect("running ctr")
    }

    /// `ctr run --rm` of `cmd` in container `id` with extra `flags` (jail tier unless the
    /// flags pick otherwise).
    fn run(&self, id: &str, flags: &[&str], cmd: &[&str]) -> Output {
        let mut args = vec!["run", "--rm", "--runtime", RUNTIME];
        args.extend_from_slice(flags);
        args.extend_from_slice(&[IMAGE, id]);
        args.extend_from_slice(cmd);
        self.ctr(&args)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Polls `ctr task ls` until `id` has `status`.
    fn wait_status(&self, id: &str, status: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = text(&self.ctr(&["task", "ls"]).stdout);
            if out
                .lines()
                .any(|l| l.split_whitespace().next() == Some(id) && l.contains(status))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "task {id} never became {status}: {out}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Processes started for this containerd: shims (they get its socket as -address) and
    /// sandboxes (their paths are under its directory).
    fn our_processes(&self) -> Vec<String> {
        let mark = self.dir.path().to_string_lossy().into_owned();
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == self.child.id() as i32 {
                continue;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            if cmdline.contains(&mark) || String::from_utf8_lossy(&environ).contains(&mark) {
                found.push(format!("{pid}: {cmdline}"));
            }
        }
        found
    }

    /// The socket of the shim of container `id` (as containerd-shim names it).
    fn shim_socket(&self, id: &str) -> PathBuf {
        let key = self.socket().join(NAMESPACE).join(id);
        let hash = sha256_hex(key.as_os_str().as_encoded_bytes());
        Path::new("/run/containerd/s").join(hash)
    }

    /// Nothing left: no shim or sandbox process, shim socket of `ids`, task, container,
    /// state, mount or cgroup.
    fn assert_clean(&self, ids: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.our_processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(self.our_processes(), Vec::<String>::new(), "processes left");
        for id in ids {
            let socket = self.shim_socket(id);
            assert!(
                !socket.exists(),
                "the shim socket of {id} is left: {}; containerd's log:\n{}",
                socket.display(),
                self.log()
            );
        }
        let tasks = text(&self.ctr(&["task", "ls", "-q"]).stdout);
        assert_eq!(tasks.trim(), "", "tasks left");
        let containers = text(&self.ctr(&["containers", "ls", "-q"]).stdout);
        assert_eq!(containers.trim(), "", "containers left");
        let shim_state: Vec<_> = std::fs::read_dir(self.dir.path().join("shim"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(shim_state.is_empty(), "shim state left: {shim_state:?}");
        let mark = self.dir.path().to_string_lossy().into_owned();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&mark))
            .map(str::to_owned)
            .collect();
        // containerd's own snapshotter keeps no mounts once tasks are gone.
        assert!(mounts.is_empty(), "mounts left: {mounts:#?}");
        for c in CGROUP_CONTROLLERS {
            let parent = Path::new("/sys/fs/cgroup")
                .join(c)
                .join(&self.cgroup_parent);
            let children: Vec<_> = std::fs::read_dir(&parent)
                .into_iter()
                .flatten()
                .flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name())
                .collect();
            assert!(
                children.is_empty(),
                "cgroups left under {}: {children:?}",
                parent.display()
            );
        }
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Containers a failed test left: their shims clean up on kill + delete.
        let ids = text(&self.ctr(&["containers", "ls", "-q"]).stdout);
        for id in ids.split_whitespace() {
            let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            std::thread::sleep(Duration::from_millis(200));
            let _ = self.ctr(&["task", "rm", "-f", id]);
            let _ = self.ctr(&["containers", "rm", id]);
        }
        // SAFETY: kill has no memory effects; the pid is our own child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        // containerd's snapshots stay mounted under its root only while it runs; unmount
        // whatever a crash left so the temporary directory can go.
        let mark = self.dir.path().to_string_lossy().into_owned();
        let mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
            .filter(|m| m.starts_with(&mark))
            .collect();
        for m in mounts.iter().rev() {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        for c in CGROUP_CONTROLLERS {
            let _ = std::fs::remove_dir(
                Path::new("/sys/fs/cgroup")
                    .join(c)
                    .join(&self.cgroup_parent),
            );
        }
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const JAIL: &[&str] = &["--annotation", "io.mvm.isolation=jail"];

#[test]
fn ctr_runs_containers_in_jail_sandboxes() {
    if !can_run("ctr_runs_containers_in_jail_sandboxes") {
        return;
    }
    let cd = Containerd::start("jail");

    // Output and exit codes. The figure is a whole `ctr run --rm`: shim start, sandbox
    // create, exec, teardown, shim exit.
    let mut times = Vec::new();
    for i in 0..5 {
        let started = Instant::now();
        let out = cd.run(&format!("hello{i}"), JAIL, &["echo", "hello"]);
        times.push(started.elapsed());
        assert!(
            out.status.success(),
            "ctr run: {}\n{}",
            text(&out.stderr),
            cd.log()
        );
        assert_eq!(text(&out.stdout), "hello\n");
    }
    times.sort();
    eprintln!(
        "ctr run --rm (jail tier) echo hello: min {:?}, median {:?}, max {:?} of 5",
        times[0], times[2], times[4]
    );
    let out = cd.run("seven", JAIL, &["sh", "-c", "echo to-stderr >&2; exit 7"]);
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("to-stderr"),
        "{}",
        text(&out.stderr)
    );

    // The spec's env and cwd reach the process.
    let out = cd.run(
        "envcwd",
        &[
            "--annotation",
            "io.mvm.isolation=jail",
            "--env",
            "GREETING=hi there",
            "--cwd",
            "/tmp",
        ],
        &["sh", "-c", "echo \"$GREETING\" $(pwd)"],
    );
    assert_eq!(
        text(&out.stdout),
        "hi there /tmp\n",
        "{}",
        text(&out.stderr)
    );

    // Stdin through the FIFO, closed by CloseIO.
    let mut child = cd
        .ctr_command(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            "--annotation",
            "io.mvm.isolation=jail",
            IMAGE,
            "stdin",
            "cat",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"through the fifo\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        text(&out.stdout),
        "through the fifo\n",
        "{}",
        text(&out.stderr)
    );

    // A terminal: ctr needs one itself, so it runs under script(1)'s pty. ctr sends its own
    // terminal's size (ResizePty) only after the task started: the process waits for it (up
    // to 5 s) before it prints the size.
    if which("script").is_some() {
        let ctr = format!(
            "stty cols 91 rows 17; ctr --address {} --namespace {NAMESPACE} run --rm -t \
             --runtime {RUNTIME} --annotation io.mvm.isolation=jail {IMAGE} tty \
             sh -c 'test -t 0 && echo on-a-tty; i=0; \
             while [ \"$(stty size)\" != \"17 91\" ] && [ $i -lt 100 ]; do sleep 0.05; i=$((i+1)); done; \
             stty size'",
            cd.socket().display()
        );
        let out = Command::new("script")
            .args(["-qec", &ctr, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let shown = text(&out.stdout);
        assert!(
            out.status.success(),
            "ctr run -t: {shown} {}",
            text(&out.stderr)
        );
        assert!(shown.contains("on-a-tty"), "no terminal: {shown:?}");
        // The size of ctr's terminal, passed on through ResizePty.
        assert!(
            shown.contains("17 91"),
            "terminal size not passed on: {shown:?}"
        );
    } else {
        eprintln!(
            "SKIPPED the terminal case: script(1) is not installed (apt-get install bsdutils)"
        );
    }

    // A detached container: exec into it, then kill it.
    let out = cd.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.mvm.isolation=jail",
        IMAGE,
        "long",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "ctr run -d: {}", text(&out.stderr));
    cd.wait_status("long", "RUNNING");
    let out = cd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "long",
        "sh",
        "-c",
        "echo in-exec; ls /bin/busybox; exit 3",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "in-exec\n/bin/busybox\n");
    let out = cd.ctr(&["task", "ps", "long"]);
    assert!(out.status.success(), "ctr task ps: {}", text(&out.stderr));
    assert!(
        text(&out.stdout).lines().count() >= 2,
        "no pids: {}",
        text(&out.stdout)
    );
    let out = cd.ctr(&["task", "metrics", "long"]);
    assert!(
        out.status.success(),
        "ctr task metrics: {}",
        text(&out.stderr)
    );
    // Pause freezes the sandbox, resume thaws it.
    let out = cd.ctr(&["task", "pause", "long"]);
    assert!(
        out.status.success(),
        "ctr task pause: {}",
        text(&out.stderr)
    );
    cd.wait_status("long", "PAUSED");
    let out = cd.ctr(&["task", "resume", "long"]);
    assert!(
        out.status.success(),
        "ctr task resume: {}",
        text(&out.stderr)
    );
    cd.wait_status("long", "RUNNING");
    let out = cd.ctr(&["task", "kill", "long"]);
    assert!(out.status.success(), "ctr task kill: {}", text(&out.stderr));
    cd.wait_status("long", "STOPPED");
    let out = cd.ctr(&["task", "rm", "long"]);
    assert!(out.status.success(), "ctr task rm: {}", text(&out.stderr));
    let out = cd.ctr(&["containers", "rm", "long"]);
    assert!(
        out.status.success(),
        "ctr containers rm: {}",
        text(&out.stderr)
    );

    // --memory-limit holds: a 64 MiB buffer in a 32 MiB container is OOM-killed, 8 MiB is fine.
    let limit = [
        "--annotation",
        "io.mvm.isolation=jail",
        "--memory-limit",
        "33554432",
    ];
    let out = cd.run(
        "small",
        &limit,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=8M", "count=1"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = cd.run(
        "hog",
        &limit,
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
    );
    assert_eq!(
        out.status.code(),
        Some(137),
        "the hog was not killed: {}",
        text(&out.stderr)
    );

    let mut ids = vec!["seven", "envcwd", "stdin", "tty", "long", "small", "hog"];
    let hellos: Vec<String> = (0..5).map(|i| format!("hello{i}")).collect();
    ids.extend(hellos.iter().map(String::as_str));
    cd.assert_clean(&ids);
}

/// Pids of the shim serving container `id`.
fn shim_pids(id: &str) -> Vec<i32> {
    let shim = PathBuf::from(env!("CARGO_BIN_EXE_containerd-shim-mvm-v2"));
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<i32>().ok()?;
            let exe = std::fs::read_link(e.path().join("exe")).ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let serves = args.windows(2).any(|w| w[0] == "-id" && w[1] == id);
            (exe == shim && serves).then_some(pid)
        })
        .collect()
}

#[test]
fn a_killed_shim_leaves_nothing_behind() {
    if !can_run("a_killed_shim_leaves_nothing_behind") {
        return;
    }
    let cd = Containerd::start("crash");
    let out = cd.ctr(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--annotation",
        "io.mvm.isolation=jail",
        IMAGE,
        "crash",
        "sleep",
        "1000",
    ]);
    assert!(out.status.success(), "ctr run -d: {}", text(&out.stderr));
    cd.wait_status("crash", "RUNNING");
    let pids = shim_pids("crash");
    assert_eq!(
        pids.len(),
        1,
        "expected one shim for the container: {pids:?}"
    );
    // SAFETY: kill has no memory effects; the pid is the shim's.
    assert_eq!(unsafe { libc::kill(pids[0], libc::SIGKILL) }, 0);
    // containerd sees the shim go, runs `containerd-shim-mvm-v2 delete`, which destroys the
    // orphaned sandbox, and reports the task as exited.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let tasks = text(&cd.ctr(&["task", "ls", "-q"]).stdout);
        if !tasks.contains("crash") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dead shim's task stays: {tasks}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = cd.ctr(&["containers", "rm", "crash"]);
    assert!(
        out.status.success(),
        "ctr containers rm: {}",
        text(&out.stderr)
    );
    cd.assert_clean(&["crash"]);
}

#[test]
fn vm_tier_fails_clearly_without_hardware_kvm() {
    if !can_run("vm_tier_fails_clearly_without_hardware_kvm") {
        return;
    }
    if api::manager::host::vm_tier_unavailable(false).is_none() {
        eprintln!(
            "SKIPPED vm_tier_fails_clearly_without_hardware_kvm: this host can run VMs; the vm \
             tier under containerd is exercised by the nested harness (tests/nested)"
        );
        return;
    }
    let cd = Containerd::start("vm");
    // No annotation: the vm tier is the default.
    let out = cd.run("vm", &[], &["echo", "hello"]);
    assert!(
        !out.status.success(),
        "a vm-tier container ran on a host without usable KVM"
    );
    let err = text(&out.stderr);
    eprintln!("vm tier refused as expected: {}", err.trim());
    assert!(
        err.contains("jail tier") && err.contains("io.mvm.isolation=jail"),
        "the error does not point to the jail tier: {err}"
    );
    let log = cd.log();
    assert!(
        log.contains("vm tier") || log.contains("KVM"),
        "containerd's log does not say why: {log}"
    );
    // A failed create leaves nothing behind either.
    let _ = cd.ctr(&["containers", "rm", "vm"]);
    cd.assert_clean(&["vm"]);
}
