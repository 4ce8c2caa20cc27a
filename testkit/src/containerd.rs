//! A real containerd (Debian's) of a test's own — own config, root, state, socket and cgroup
//! parent, never the system's — with an OCI image built from busybox-static imported, for
//! driving `containerd-shim-mvm-v2` through `ctr`. Used by the shim's tests on the host and by
//! the nested harness (vm tier) inside its QEMU guest.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::{text, ScratchDir};

/// The mvm shim's runtime name.
pub const RUNTIME: &str = "io.containerd.mvm.v2";
/// The test image's reference.
pub const IMAGE: &str = "docker.io/mvm-test/busybox:latest";
/// The containerd namespace the `ctr` tests use.
pub const NAMESPACE: &str = "mvm-test";
/// The containerd namespace of the CRI plugin (Kubernetes' containers and images).
pub const CRI_NAMESPACE: &str = "k8s.io";
/// The pod sandbox ("pause") image of the CRI plugin: the test image's busybox, waiting until
/// it is told to stop, as Kubernetes' pause does.
pub const PAUSE_IMAGE: &str = "docker.io/mvm-test/pause:latest";
/// The CRI runtime handler (kubelet's RuntimeClass handler) of the mvm shim.
pub const CRI_HANDLER: &str = "mvm";
/// cgroup v1 controllers whose hierarchy the sandboxes use.
const CGROUP_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];
/// busybox applets the image links in /bin.
const APPLETS: [&str; 15] = [
    "sh", "echo", "cat", "sleep", "dd", "true", "id", "ls", "head", "uname", "stty", "touch",
    "test", "ip", "nc",
];
/// The pause image's command: like Kubernetes' pause, it does nothing until SIGTERM or
/// SIGINT, and then exits 0.
const PAUSE_CMD: [&str; 3] = [
    "sh",
    "-c",
    "trap 'exit 0' TERM INT; while :; do sleep 3600 & wait $!; done",
];
/// What a pod's containers print of their kernel: its boot id, one per booted kernel.
const BOOT_ID: &str = "cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo none";

/// A pod network namespace as CNI's bridge plugins leave it: pinned under /var/run/netns,
/// with `eth0` (an address, a default route) paired to a veth on the host. Removed when
/// dropped.
pub struct PodNetwork {
    name: String,
    host_if: String,
    /// The host side's address (the pod's gateway).
    pub host_ip: std::net::Ipv4Addr,
    /// The pod's address on its `eth0`.
    pub pod_ip: std::net::Ipv4Addr,
}

impl PodNetwork {
    /// Makes namespace `mvm-test-<tag>` in 10.252.`subnet`.0/24 (host .1, pod .2).
    pub fn create(tag: &str, subnet: u8) -> Result<PodNetwork, String> {
        let name = format!("mvm-test-{tag}");
        let host_if = format!("mvt{}", &tag[..tag.len().min(10)]);
        let net = PodNetwork {
            host_ip: std::net::Ipv4Addr::new(10, 252, subnet, 1),
            pod_ip: std::net::Ipv4Addr::new(10, 252, subnet, 2),
            name,
            host_if,
        };
        let (n, h) = (&net.name, &net.host_if);
        // `net` removes whatever of it exists if a step fails.
        ip_batch(
            &[],
            &format!(
                "netns add {n}\nlink add {h} type veth peer name eth0 netns {n}\n\
                 addr add {}/24 dev {h}\nlink set {h} up\n",
                net.host_ip
            ),
        )?;
        ip_batch(
            &["-n", n],
            &format!(
                "link set lo up\naddr add {}/24 dev eth0\nlink set eth0 up\n\
                 route add default via {}\n",
                net.pod_ip, net.host_ip
            ),
        )?;
        Ok(net)
    }

    /// The pinned namespace, as an OCI spec names it.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

/// Runs `ip [args] -batch -` on `script`; its stderr when it fails.
fn ip_batch(args: &[&str], script: &str) -> Result<(), String> {
    use std::io::Write;
    let out = Command::new("ip")
        .args(args)
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(script.as_bytes())?;
            child.wait_with_output()
        })
        .map_err(|e| format!("ip -batch: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} -batch: {}",
            args.join(" "),
            text(&out.stderr).trim()
        ))
    }
}

impl Drop for PodNetwork {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// What [`Containerd::run_pod`] saw.
#[derive(Debug)]
pub struct PodReport {
    /// The kernel boot id in the pod's first container, and in its second.
    pub boot_ids: (String, String),
}

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
    /// containerd's CRI plugin as a Kubernetes node runs it (else it is disabled): runtime
    /// handler [`CRI_HANDLER`], sandbox image [`PAUSE_IMAGE`], namespace [`CRI_NAMESPACE`], and
    /// CNI's `ptp` plugin giving pods addresses in 10.253.`cri_subnet`.0/24.
    pub cri_subnet: Option<u8>,
}

/// A running containerd with the test image; stopped, and its leftovers removed, on drop.
pub struct Containerd {
    dir: ScratchDir,
    /// The shims' state (`MVM_SHIM_STATE_DIR`): short, since sandbox sockets live below it.
    shim_dir: PathBuf,
    child: Child,
    cgroup_parent: String,
    snapshotter: Option<String>,
    namespace: &'static str,
}

/// The last `max` bytes of `s` (from a character boundary), for error messages that quote
/// a log.
pub fn tail(s: &str, max: usize) -> &str {
    let mut start = s.len().saturating_sub(max);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
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

/// Writes an OCI image layout tarball to `dir` with two images of one uncompressed layer
/// (`busybox` and its applets, /tmp, /etc/passwd and /root): [`IMAGE`], default command `sh`,
/// and [`PAUSE_IMAGE`], whose command waits for SIGTERM or SIGINT and exits 0 on it.
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
    let mut manifests = Vec::new();
    for (name, cmd) in [(IMAGE, vec!["sh"]), (PAUSE_IMAGE, PAUSE_CMD.to_vec())] {
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": { "Env": ["PATH=/bin"], "Cmd": cmd, "WorkingDir": "/" },
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
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest, "size": manifest_size,
            "platform": { "architecture": "amd64", "os": "linux" },
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": "latest",
            },
        }));
    }
    let index = serde_json::json!({ "schemaVersion": 2, "manifests": manifests });
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

/// Where Debian's containernetworking-plugins puts the CNI plugins.
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// The CRI plugin's section of containerd's config, as a Kubernetes node with mvm has it (the
/// README's node set-up), and the CNI network config it names, written under `dir`: CNI's
/// `ptp` (a veth per pod, a host route to it, nothing else left on the host) with `host-local`
/// addresses in 10.253.`subnet`.0/24.
fn cri_config(dir: &Path, snapshotter: Option<&str>, subnet: u8) -> Result<String, String> {
    let conf_dir = dir.join("cni").join("net.d");
    std::fs::create_dir_all(&conf_dir).map_err(|e| format!("CNI config dir: {e}"))?;
    let network = serde_json::json!({
        "cniVersion": "1.0.0",
        "name": format!("mvm-cri-test-{subnet}"),
        "plugins": [{
            "type": "ptp",
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": format!("10.253.{subnet}.0/24") }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": dir.join("cni").join("ipam"),
            },
        }],
    });
    std::fs::write(conf_dir.join("10-mvm-test.conflist"), network.to_string())
        .map_err(|e| format!("CNI config: {e}"))?;
    let snapshotter = snapshotter
        .map(|s| format!("  snapshotter = \"{s}\"\n"))
        .unwrap_or_default();
    Ok(format!(
        "[plugins.\"io.containerd.grpc.v1.cri\"]\n\
         \x20 sandbox_image = \"{PAUSE_IMAGE}\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd]\n\
         {snapshotter}\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n\
         \x20 runtime_type = \"io.containerd.runc.v2\"\n\
         [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.{CRI_HANDLER}]\n\
         \x20 runtime_type = \"{RUNTIME}\"\n\
         \x20 pod_annotations = [\"io.mvm.isolation\"]\n\
         [plugins.\"io.containerd.grpc.v1.cri\".cni]\n\
         \x20 bin_dir = \"{CNI_BIN_DIR}\"\n\
         \x20 conf_dir = \"{}\"\n",
        conf_dir.display()
    ))
}

impl Containerd {
    /// Starts containerd with its own directories under a scratch directory, waits until it
    /// answers and imports the test image.
    pub fn start(opts: ContainerdOptions<'_>) -> Result<Containerd, String> {
        let dir = ScratchDir::new(&format!("containerd-{}", opts.name));
        let d = dir.path();
        let mut config = format!(
            "version = 2\n\
             root = \"{root}\"\n\
             state = \"{state}\"\n\
             {disabled}\
             [grpc]\n  address = \"{sock}\"\n\
             [ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  level = \"debug\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
            disabled = match opts.cri_subnet {
                Some(_) => "",
                None => "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n",
            },
        );
        if let Some(subnet) = opts.cri_subnet {
            config.push_str(&cri_config(d, opts.snapshotter, subnet)?);
        }
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
            namespace: if opts.cri_subnet.is_some() {
                CRI_NAMESPACE
            } else {
                NAMESPACE
            },
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

    /// The scratch directory holding containerd's config, root, state and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// containerd's socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// `ctr --address <ours> --namespace <ours> ARGS` (namespace [`NAMESPACE`], or
    /// [`CRI_NAMESPACE`] with the CRI plugin), stdin from /dev/null.
    pub fn ctr_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ctr");
        cmd.arg("--address")
            .arg(self.socket())
            .arg("--namespace")
            .arg(self.namespace)
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

    /// Runs a two-container pod as the CRI plugin would ask for it (CRI's annotations,
    /// `flags` added to both `ctr run -d`): a first ("sandbox") container `pod` and a second
    /// one, then checks that one shim serves both, that each container has a root of its own
    /// (a file made in one is not in the other), that the second can go while the first keeps
    /// running, and removes both.
    pub fn run_pod(&self, pod: &str, flags: &[&str]) -> Result<PodReport, String> {
        let member = format!("{pod}-c1");
        let first = [
            "--annotation",
            "io.kubernetes.cri.container-type=sandbox",
            "--annotation",
        ];
        let second = [
            "--annotation",
            "io.kubernetes.cri.container-type=container",
            "--annotation",
        ];
        let sandbox_id = format!("io.kubernetes.cri.sandbox-id={pod}");
        for (id, annotations) in [(pod, &first), (member.as_str(), &second)] {
            let mut all: Vec<&str> = flags.to_vec();
            all.extend_from_slice(annotations);
            all.push(&sandbox_id);
            let out = self.run_detached(id, &all, &["sleep", "600"]);
            if !out.status.success() {
                return Err(format!(
                    "ctr run -d {} {id} sleep 600: {}: {}; containerd's log ends: {}",
                    all.join(" "),
                    out.status,
                    text(&out.stderr).trim(),
                    tail(&self.log(), 3000)
                ));
            }
            self.wait_status(id, "RUNNING")?;
        }
        let shims = self.shims();
        if shims.len() != 1 {
            return Err(format!(
                "the pod's two containers should share one shim, found {}: {shims:?}",
                shims.len()
            ));
        }
        let first_boot = self.exec_ok(pod, "p1", &format!("touch /pod-only && {BOOT_ID}"))?;
        let second_boot = self.exec_ok(
            &member,
            "c1",
            &format!("test ! -e /pod-only && touch /member-only && {BOOT_ID}"),
        )?;
        self.exec_ok(pod, "p2", "test ! -e /member-only")?;
        self.stop_and_remove(&member, Some("KILL"))?;
        let still = self.exec_ok(pod, "p3", "echo still running")?;
        if still != "still running" {
            return Err(format!(
                "the pod's first container after its second left: {still:?}"
            ));
        }
        self.stop_and_remove(pod, Some("KILL"))?;
        Ok(PodReport {
            boot_ids: (first_boot, second_boot),
        })
    }

    /// `ctr run --rm` of container `id` in the pod network `net` (`flags` added): the
    /// container has the pod's address and reaches a listener on the host side, and the
    /// namespace holds just its own interfaces after. Returns the container's output.
    pub fn run_in_pod_network(
        &self,
        id: &str,
        flags: &[&str],
        net: &PodNetwork,
    ) -> Result<String, String> {
        let listener = std::net::TcpListener::bind((net.host_ip, 0))
            .map_err(|e| format!("listening on {}: {e}", net.host_ip))?;
        let port = listener.local_addr().map_err(|e| e.to_string())?.port();
        // Waits 60 s at most for the container's connection, then reads it to its end.
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("listener: {e}"))?;
        let received = std::thread::spawn(move || -> std::io::Result<String> {
            use std::io::Read;
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut conn = loop {
                match listener.accept() {
                    Ok((conn, _)) => break conn,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            return Ok(String::new());
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(e),
                }
            };
            conn.set_nonblocking(false)?;
            conn.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut got = String::new();
            conn.read_to_string(&mut got)?;
            Ok(got)
        });
        let with_ns = format!("network:{}", net.path().display());
        let mut all = vec!["--with-ns", with_ns.as_str()];
        all.extend_from_slice(flags);
        let script = format!(
            "ip -4 addr show eth0; echo hello-from-the-pod | nc -w 10 {} {port}",
            net.host_ip
        );
        let out = self.run(id, &all, &["sh", "-c", &script]);
        let stdout = text(&out.stdout);
        if !out.status.success() || !stdout.contains(&format!("inet {}/24", net.pod_ip)) {
            return Err(format!(
                "ctr run {} {id} sh -c {script:?}: {}, stdout {stdout:?} (expected the pod's \
                 address {}), stderr {:?}; containerd's log ends: {}",
                all.join(" "),
                out.status,
                net.pod_ip,
                text(&out.stderr).trim(),
                tail(&self.log(), 3000)
            ));
        }
        let got = received
            .join()
            .map_err(|_| "the listener thread panicked".to_owned())?
            .map_err(|e| format!("the host-side listener: {e}"))?;
        if got != "hello-from-the-pod\n" {
            return Err(format!(
                "the host side of the pod network got {got:?} instead of the container's greeting"
            ));
        }
        // The namespace is the pod's: the sandbox leaves it as it found it.
        let links = Command::new("ip")
            .args(["-n", &net.name, "-o", "link"])
            .output()
            .map_err(|e| format!("ip -n {} link: {e}", net.name))?;
        let links = text(&links.stdout);
        if !links.contains("eth0") || links.contains("tap0") {
            return Err(format!(
                "the pod network namespace should hold just its own interfaces again: {links}"
            ));
        }
        Ok(stdout)
    }

    /// `ctr task exec` of `sh -c script` in container `id`; its trimmed stdout when it exits 0.
    fn exec_ok(&self, id: &str, exec_id: &str, script: &str) -> Result<String, String> {
        let out = self.ctr(&["task", "exec", "--exec-id", exec_id, id, "sh", "-c", script]);
        if !out.status.success() {
            return Err(format!(
                "ctr task exec {id} sh -c {script:?}: {}, stdout {:?}, stderr {:?}",
                out.status,
                text(&out.stdout),
                text(&out.stderr).trim()
            ));
        }
        Ok(text(&out.stdout).trim().to_owned())
    }

    /// The shim processes of this containerd.
    pub fn shims(&self) -> Vec<String> {
        self.our_processes()
            .into_iter()
            .filter(|p| p.contains("containerd-shim-mvm-v2"))
            .collect()
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
        let key = self.socket().join(self.namespace).join(id);
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
        [self.dir.path(), &self.shim_dir]
            .into_iter()
            .flat_map(crate::mount_points_under)
            .map(|m| m.display().to_string())
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
