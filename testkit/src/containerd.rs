//! A real containerd (Debian's) of a test's own — own config, root, state, socket and cgroup
//! parent, never the system's — with an OCI image built from busybox-static imported, for
//! driving `containerd-shim-mvm-v2` through `ctr`. Used by the shim's tests on the host and by
//! the nested harness (vm tier) inside its QEMU guest.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::ScratchDir;

/// The mvm shim's runtime name.
pub const RUNTIME: &str = "io.containerd.mvm.v2";
/// The test image's reference.
pub const IMAGE: &str = "docker.io/mvm-test/busybox:latest";
/// The containerd namespace the tests use.
pub const NAMESPACE: &str = "mvm-test";
/// cgroup v1 controllers whose hierarchy the sandboxes use.
const CGROUP_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];
/// busybox applets the image links in /bin.
const APPLETS: [&str; 11] = [
    "sh", "echo", "cat", "sleep", "dd", "true", "id", "ls", "head", "uname", "stty",
];

/// How to start a test containerd.
pub struct ContainerdOptions<'a> {
    /// Names the scratch directory and the cgroup parent.
    pub name: &'a str,
    /// Directory of `containerd-shim-mvm-v2`, `mvm-jailer`, `mvm-agent` and `mvm-vmm`.
    pub bin_dir: &'a Path,
    /// busybox-static, copied into the image.
    pub busybox: &'a Path,
    /// Snapshotter for `ctr images import` and `ctr run` (`None`: containerd's default,
    /// overlayfs).
    pub snapshotter: Option<&'a str>,
    /// Extra environment for containerd and so the shims (e.g. `MVM_ARTIFACTS`).
    pub env: Vec<(String, String)>,
}

/// A running containerd with the test image; stopped, and its leftovers removed, on drop.
pub struct Containerd {
    dir: ScratchDir,
    /// The shims' state (`MVM_SHIM_STATE_DIR`): short, since sandbox sockets live below it.
    shim_dir: PathBuf,
    child: Child,
    cgroup_parent: String,
    snapshotter: Option<String>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Appends a file or directory entry to an image layer.
fn append(
    tar: &mut tar::Builder<Vec<u8>>,
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    data: &[u8],
    link: Option<&str>,
) -> std::io::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(data.len() as u64);
    if let Some(target) = link {
        header.set_link_name(target)?;
    }
    header.set_path(path)?;
    header.set_cksum();
    tar.append(&header, data)
}

/// Describes a failure to build the test image while writing `what`.
fn image_error(what: &str) -> impl FnOnce(std::io::Error) -> String + '_ {
    move |e| format!("building the test image ({what}): {e}")
}

/// Writes an OCI image layout tarball named [`IMAGE`] to `dir`: one uncompressed layer with
/// `busybox` and its applets, /tmp, /etc/passwd and /root; default command `sh`.
pub fn busybox_image(dir: &Path, busybox: &Path) -> Result<PathBuf, String> {
    let busybox_bytes =
        std::fs::read(busybox).map_err(|e| format!("reading {}: {e}", busybox.display()))?;
    let mut layer = tar::Builder::new(Vec::new());
    let dir_entry = tar::EntryType::Directory;
    for (path, mode) in [
        ("bin/", 0o755),
        ("etc/", 0o755),
        ("root/", 0o700),
        ("tmp/", 0o1777),
    ] {
        append(&mut layer, path, dir_entry, mode, &[], None).map_err(image_error(path))?;
    }
    append(
        &mut layer,
        "bin/busybox",
        tar::EntryType::Regular,
        0o755,
        &busybox_bytes,
        None,
    )
    .map_err(image_error("bin/busybox"))?;
    for applet in APPLETS {
        let path = format!("bin/{applet}");
        append(
            &mut layer,
            &path,
            tar::EntryType::Symlink,
            0o777,
            &[],
            Some("busybox"),
        )
        .map_err(image_error(&path))?;
    }
    let passwd = b"root:x:0:0:root:/root:/bin/sh\n";
    append(
        &mut layer,
        "etc/passwd",
        tar::EntryType::Regular,
        0o644,
        passwd,
        None,
    )
    .map_err(image_error("etc/passwd"))?;
    let layer = layer.into_inner().map_err(image_error("layer"))?;

    let mut layout = tar::Builder::new(Vec::new());
    let mut blob = |data: &[u8]| -> Result<(String, usize), String> {
        let hex = sha256_hex(data);
        append(
            &mut layout,
            &format!("blobs/sha256/{hex}"),
            tar::EntryType::Regular,
            0o644,
            data,
            None,
        )
        .map_err(image_error("blob"))?;
        Ok((format!("sha256:{hex}"), data.len()))
    };
    let (layer_digest, layer_size) = blob(&layer)?;
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Env": ["PATH=/bin"], "Cmd": ["sh"], "WorkingDir": "/" },
        "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
    });
    let (config_digest, config_size) = blob(config.to_string().as_bytes())?;
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
    let (manifest_digest, manifest_size) = blob(manifest.to_string().as_bytes())?;
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
    let regular = tar::EntryType::Regular;
    append(
        &mut layout,
        "index.json",
        regular,
        0o644,
        index.to_string().as_bytes(),
        None,
    )
    .map_err(image_error("index.json"))?;
    append(
        &mut layout,
        "oci-layout",
        regular,
        0o644,
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        None,
    )
    .map_err(image_error("oci-layout"))?;
    let tarball = dir.join("image.tar");
    std::fs::write(
        &tarball,
        layout.into_inner().map_err(image_error("layout"))?,
    )
    .map_err(|e| format!("writing {}: {e}", tarball.display()))?;
    Ok(tarball)
}

impl Containerd {
    /// Starts containerd with its own directories under a scratch directory, waits until it
    /// answers and imports the test image.
    pub fn start(opts: ContainerdOptions<'_>) -> Result<Containerd, String> {
        let dir = ScratchDir::new(&format!("containerd-{}", opts.name));
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
        std::fs::write(d.join("config.toml"), config)
            .map_err(|e| format!("containerd config: {e}"))?;
        let log = std::fs::File::create(d.join("containerd.log"))
            .map_err(|e| format!("containerd log: {e}"))?;
        let log_err = log
            .try_clone()
            .map_err(|e| format!("containerd log: {e}"))?;
        let path = format!(
            "{}:{}",
            opts.bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let cgroup_parent = format!("mvm-containerd-{}-{}", std::process::id(), opts.name);
        let shim_dir =
            Path::new("/run").join(format!("mvm-shim-{}-{}", std::process::id(), opts.name));
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .env("PATH", path)
            .env("MVM_SHIM_STATE_DIR", &shim_dir)
            .env("MVM_CGROUP_PARENT", &cgroup_parent)
            .env("MVM_BIN_DIR", opts.bin_dir)
            .env_remove("MVM_ISOLATION")
            .env_remove("MVM_VM_TIER")
            .envs(opts.env)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|e| format!("starting containerd: {e} (apt-get install containerd)"))?;
        let c = Containerd {
            dir,
            shim_dir,
            child,
            cgroup_parent,
            snapshotter: opts.snapshotter.map(str::to_owned),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !c.ctr(&["version"]).status.success() {
            if Instant::now() > deadline {
                return Err(format!("containerd did not come up; its log:\n{}", c.log()));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let image = busybox_image(c.dir.path(), opts.busybox)?;
        let image = image.to_string_lossy();
        let mut import = vec!["images", "import"];
        import.extend(c.snapshotter_flag());
        import.push(&image);
        let out = c.ctr(&import);
        if !out.status.success() {
            return Err(format!("ctr images import: {}", text(&out.stderr)));
        }
        Ok(c)
    }

    fn snapshotter_flag(&self) -> Vec<&str> {
        match &self.snapshotter {
            Some(s) => vec!["--snapshotter", s],
            None => Vec::new(),
        }
    }

    /// The parent cgroup of this containerd's sandboxes (its shims' `MVM_CGROUP_PARENT`).
    pub fn cgroup_parent(&self) -> &str {
        &self.cgroup_parent
    }

    /// containerd's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// `ctr --address <ours> --namespace <NAMESPACE> ARGS`, stdin from /dev/null.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(NAMESPACE)
            .args(args)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `ctr ARGS` to completion.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_command(args).output().expect("running ctr")
    }

    /// `ctr run --rm` of `cmd` in container `id` of the test image with extra `flags`.
    pub fn run(&self, id: &str, flags: &[&str], cmd: &[&str]) -> Output {
        self.ctr(&self.run_args("--rm", id, flags, cmd))
    }

    /// `ctr run -d`: starts `cmd` in container `id` and returns once it runs.
    pub fn run_detached(&self, id: &str, flags: &[&str], cmd: &[&str]) -> Output {
        self.ctr(&self.run_args("-d", id, flags, cmd))
    }

    fn run_args<'a>(
        &'a self,
        mode: &'a str,
        id: &'a str,
        flags: &[&'a str],
        cmd: &[&'a str],
    ) -> Vec<&'a str> {
        let mut args = vec!["run", mode, "--runtime", RUNTIME];
        args.extend(self.snapshotter_flag());
        args.extend_from_slice(flags);
        args.extend_from_slice(&[IMAGE, id]);
        args.extend_from_slice(cmd);
        args
    }

    /// containerd's log so far (its shims log into it too).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Polls `ctr task ls` until `id` has `status`.
    pub fn wait_status(&self, id: &str, status: &str) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = text(&self.ctr(&["task", "ls"]).stdout);
            if out
                .lines()
                .any(|l| l.split_whitespace().next() == Some(id) && l.contains(status))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!("task {id} never became {status}: {out}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `ctr task kill [-s signal]` on container `id`, waits until its task is stopped, then
    /// removes the task and the container; the first step that fails says why.
    pub fn stop_and_remove(&self, id: &str, signal: Option<&str>) -> Result<(), String> {
        let mut kill = vec!["task", "kill"];
        if let Some(signal) = signal {
            kill.extend(["-s", signal]);
        }
        kill.push(id);
        self.ctr_ok(&kill)?;
        self.wait_status(id, "STOPPED")?;
        self.ctr_ok(&["task", "rm", id])?;
        self.ctr_ok(&["containers", "rm", id])
    }

    /// Runs `ctr ARGS`; its stderr when it fails.
    fn ctr_ok(&self, args: &[&str]) -> Result<(), String> {
        let out = self.ctr(args);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ctr {}: {}",
                args.join(" "),
                text(&out.stderr).trim()
            ))
        }
    }

    /// Processes started for this containerd: shims (they get its socket as -address) and
    /// sandboxes (their paths are under the shims' state directory).
    pub fn our_processes(&self) -> Vec<String> {
        let marks = [
            self.dir.path().to_string_lossy().into_owned(),
            self.shim_dir.to_string_lossy().into_owned(),
        ];
        let mut found = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if pid == self.child.id() as i32 {
                continue;
            }
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            let environ = String::from_utf8_lossy(&environ);
            if marks
                .iter()
                .any(|m| cmdline.contains(m) || environ.contains(m))
            {
                found.push(format!("{pid}: {cmdline}"));
            }
        }
        found
    }

    /// The socket of the shim of container `id` (as containerd-shim names it).
    pub fn shim_socket(&self, id: &str) -> PathBuf {
        let key = self.socket().join(NAMESPACE).join(id);
        let hash = sha256_hex(key.as_os_str().as_encoded_bytes());
        Path::new("/run/containerd/s").join(hash)
    }

    /// What is left once containers `ids` are gone: shim or sandbox processes (waited for up
    /// to 10 s), shim sockets, tasks, containers, shim state, mounts and cgroups. Empty when
    /// clean.
    pub fn leftovers(&self, ids: &[&str]) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.our_processes().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let mut left: Vec<String> = self
            .our_processes()
            .into_iter()
            .map(|p| format!("process {p}"))
            .collect();
        for id in ids {
            let socket = self.shim_socket(id);
            if socket.exists() {
                left.push(format!("the shim socket of {id}: {}", socket.display()));
            }
        }
        for (what, args) in [
            ("task", ["task", "ls", "-q"]),
            ("container", ["containers", "ls", "-q"]),
        ] {
            let out = text(&self.ctr(&args).stdout);
            left.extend(out.split_whitespace().map(|id| format!("{what} {id}")));
        }
        let shim_state = std::fs::read_dir(&self.shim_dir)
            .into_iter()
            .flatten()
            .flatten();
        left.extend(shim_state.map(|e| format!("shim state {}", e.path().display())));
        // containerd's own snapshotter keeps no mounts once tasks are gone.
        left.extend(self.mounts().into_iter().map(|m| format!("mount {m}")));
        for c in CGROUP_CONTROLLERS {
            let parent = Path::new("/sys/fs/cgroup")
                .join(c)
                .join(&self.cgroup_parent);
            let children = std::fs::read_dir(&parent).into_iter().flatten().flatten();
            left.extend(
                children
                    .filter(|e| e.path().is_dir())
                    .map(|e| format!("cgroup {}", e.path().display())),
            );
        }
        left
    }

    /// Mount points under this containerd's directory or the shims' state.
    fn mounts(&self) -> Vec<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
            .filter(|m| {
                Path::new(m).starts_with(self.dir.path())
                    || Path::new(m).starts_with(&self.shim_dir)
            })
            .collect()
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
        // whatever a crash left so the scratch directory can go.
        for m in self.mounts().iter().rev() {
            let _ = Command::new("umount").args(["-l", m]).status();
        }
        for c in CGROUP_CONTROLLERS {
            let _ = std::fs::remove_dir(
                Path::new("/sys/fs/cgroup")
                    .join(c)
                    .join(&self.cgroup_parent),
            );
        }
        let _ = std::fs::remove_dir_all(&self.shim_dir);
    }
}
