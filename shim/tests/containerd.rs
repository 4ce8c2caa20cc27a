//! The shim under a real containerd (Debian's), started by the test with its own config, root,
//! state, socket and cgroup parent, on an OCI image the test builds from busybox-static.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mvm_testkit::containerd::{
    Containerd, ContainerdOptions, PodNetwork, IMAGE, NAMESPACE, RUNTIME,
};
use mvm_testkit::{bin_dir, root_or_skip, text};

fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Root and containerd, ctr and busybox-static present; else says why (failing in CI) and
/// returns false.
#[track_caller]
fn can_run(test: &str) -> bool {
    if !root_or_skip(test) {
        return false;
    }
    let missing = if let Some(tool) = ["containerd", "ctr"]
        .into_iter()
        .find(|t| which(t).is_none())
    {
        Some(format!(
            "`{tool}` is not installed (apt-get install containerd)"
        ))
    } else if !Path::new("/bin/busybox").is_file() {
        Some("/bin/busybox is missing (apt-get install busybox-static)".to_owned())
    } else {
        None
    };
    if let Some(why) = missing {
        mvm_testkit::skip_or_fail_in_ci(test, &why);
        return false;
    }
    mvm_testkit::build_jailer_and_agent();
    true
}

/// A containerd of the test's own with the test image imported (see `mvm_testkit::containerd`).
fn start(name: &str) -> Containerd {
    start_with(name, Vec::new())
}

/// [`start`], with extra environment for containerd and its shims.
fn start_with(name: &str, env: Vec<(String, String)>) -> Containerd {
    Containerd::start(ContainerdOptions {
        name,
        bin_dir: &bin_dir(),
        busybox: Path::new("/bin/busybox"),
        snapshotter: None,
        env,
        cri_subnet: None,
    })
    .unwrap_or_else(|e| panic!("{e}"))
}

/// Nothing of `cd` is left once containers `ids` are gone.
fn assert_clean(cd: &Containerd, ids: &[&str]) {
    let left = cd.leftovers(ids);
    assert!(
        left.is_empty(),
        "left behind: {left:#?}; containerd's log:\n{}",
        cd.log()
    );
}

const JAIL: &[&str] = &["--annotation", "io.mvm.isolation=jail"];

#[test]
fn ctr_runs_containers_in_jail_sandboxes() {
    if !can_run("ctr_runs_containers_in_jail_sandboxes") {
        return;
    }
    let cd = start("jail");

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
        mvm_testkit::skip_or_fail_in_ci(
            "ctr_runs_containers_in_jail_sandboxes (terminal case)",
            "script(1) is not installed (apt-get install bsdutils)",
        );
    }

    // A detached container: exec into it, then kill it.
    let out = cd.run_detached("long", JAIL, &["sleep", "1000"]);
    assert!(out.status.success(), "ctr run -d: {}", text(&out.stderr));
    cd.wait_status("long", "RUNNING").unwrap();
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
    cd.wait_status("long", "PAUSED").unwrap();
    let out = cd.ctr(&["task", "resume", "long"]);
    assert!(
        out.status.success(),
        "ctr task resume: {}",
        text(&out.stderr)
    );
    cd.wait_status("long", "RUNNING").unwrap();
    cd.stop_and_remove("long", None).unwrap();

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
    assert_clean(&cd, &ids);
}

/// containerd's Update of container `id` with OCI `LinuxResources` JSON, sent to the shim's Task
/// service the way containerd sends it (Debian's ctr 1.6 has no `task update`).
fn update_task(cd: &Containerd, id: &str, resources: &str) -> Result<(), String> {
    use containerd_shim::protos::api::UpdateTaskRequest;
    use containerd_shim::protos::protobuf::well_known_types::any::Any;
    use containerd_shim::protos::protobuf::MessageField;
    use containerd_shim::protos::shim_async::TaskClient;
    use containerd_shim::protos::ttrpc::context;
    use containerd_shim::protos::ttrpc::r#async::Client;

    let socket = format!("unix://{}", cd.shim_socket(id).display());
    let req = UpdateTaskRequest {
        id: id.to_owned(),
        resources: MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: resources.as_bytes().to_vec(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = Client::connect(&socket).map_err(|e| format!("connecting {socket}: {e}"))?;
        TaskClient::new(client)
            .update(context::with_timeout(10_000_000_000), &req)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
}

/// `ctr events` in the background: the lines it printed so far.
struct Events {
    child: std::process::Child,
    lines: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl Events {
    fn start(cd: &Containerd) -> Events {
        let mut child = cd
            .ctr_command(&["events"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ctr events");
        let stdout = child.stdout.take().expect("stdout");
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = std::sync::Arc::clone(&lines);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                sink.lock().unwrap().push(line);
            }
        });
        Events { child, lines }
    }

    /// Waits up to 10 s for a line with `topic` and `container`: its index and text.
    fn wait_for(&self, topic: &str, container: &str) -> Result<(usize, String), Vec<String>> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let lines = self.lines.lock().unwrap().clone();
            let quoted = format!("\"{container}\"");
            if let Some(found) = lines
                .iter()
                .enumerate()
                .find(|(_, l)| l.contains(topic) && l.contains(&quoted))
            {
                return Ok((found.0, found.1.clone()));
            }
            if Instant::now() > deadline {
                return Err(lines);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn update_limits_and_oom_events() {
    if !can_run("update_limits_and_oom_events") {
        return;
    }
    let cd = start("update");
    let events = Events::start(&cd);
    let out = cd.run_detached(
        "limited",
        &[
            "--annotation",
            "io.mvm.isolation=jail",
            "--memory-limit",
            "67108864",
        ],
        &["sleep", "1000"],
    );
    assert!(out.status.success(), "ctr run -d: {}", text(&out.stderr));
    cd.wait_status("limited", "RUNNING").unwrap();
    // The container's sandbox is the only one of this containerd.
    let parent = Path::new("/sys/fs/cgroup/memory").join(cd.cgroup_parent());
    let sandboxes: Vec<String> = std::fs::read_dir(&parent)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(sandboxes.len(), 1, "{sandboxes:?}");
    let memory = parent.join(&sandboxes[0]);
    let cpu = Path::new("/sys/fs/cgroup/cpu")
        .join(cd.cgroup_parent())
        .join(&sandboxes[0]);
    let read = |dir: &Path, file: &str| {
        std::fs::read_to_string(dir.join(file))
            .unwrap()
            .trim()
            .to_owned()
    };
    assert_eq!(read(&memory, "memory.limit_in_bytes"), "67108864");
    let hog = |exec_id: &str, mib: u32| {
        cd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            exec_id,
            "limited",
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            &format!("bs={mib}M"),
            "count=1",
        ])
    };
    let out = hog("fits", 32);
    assert_eq!(
        out.status.code(),
        Some(0),
        "32 MiB in 64 MiB: {}",
        text(&out.stderr)
    );

    // Lowered while it runs: the cgroup files change, and a 32 MiB buffer no longer fits.
    update_task(
        &cd,
        "limited",
        r#"{"memory":{"limit":25165824},"cpu":{"shares":1024,"quota":50000,"period":200000}}"#,
    )
    .unwrap_or_else(|e| panic!("update: {e}\n{}", cd.log()));
    assert_eq!(read(&memory, "memory.limit_in_bytes"), "25165824");
    assert_eq!(read(&cpu, "cpu.cfs_quota_us"), "50000");
    assert_eq!(read(&cpu, "cpu.cfs_period_us"), "200000");
    let out = hog("hog", 32);
    assert_eq!(
        out.status.code(),
        Some(137),
        "the hog was not OOM-killed at the new limit: {}",
        text(&out.stderr)
    );
    // containerd heard of it.
    let (_, oom) = events
        .wait_for("/tasks/oom", "limited")
        .unwrap_or_else(|lines| panic!("no /tasks/oom event for limited in {lines:#?}"));
    eprintln!("ctr events: {oom}");

    // Refused with the reason, and nothing changes.
    let err = update_task(&cd, "limited", r#"{"memory":{"limit":1048576}}"#).unwrap_err();
    assert!(err.contains("16 MiB"), "{err}");
    let err = update_task(&cd, "limited", r#"{"memory":{"limit":-1}}"#).unwrap_err();
    assert!(err.contains("unlimited"), "{err}");
    assert_eq!(read(&memory, "memory.limit_in_bytes"), "25165824");

    cd.stop_and_remove("limited", Some("SIGKILL")).unwrap();

    // An OOM-killed init process: containerd hears of the OOM before the exit, even though
    // `--rm` deletes the container right after.
    let out = cd.run(
        "oomrun",
        &[
            "--annotation",
            "io.mvm.isolation=jail",
            "--memory-limit",
            "33554432",
        ],
        &["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
    );
    assert_eq!(out.status.code(), Some(137), "{}", text(&out.stderr));
    let (oom, _) = events
        .wait_for("/tasks/oom", "oomrun")
        .unwrap_or_else(|lines| panic!("no /tasks/oom event for oomrun in {lines:#?}"));
    let (exit, _) = events
        .wait_for("/tasks/exit", "oomrun")
        .unwrap_or_else(|lines| panic!("no /tasks/exit event for oomrun in {lines:#?}"));
    assert!(oom < exit, "the OOM event came after the exit");
    drop(events);
    assert_clean(&cd, &["limited", "oomrun"]);
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
    let cd = start("crash");
    let out = cd.run_detached("crash", JAIL, &["sleep", "1000"]);
    assert!(out.status.success(), "ctr run -d: {}", text(&out.stderr));
    cd.wait_status("crash", "RUNNING").unwrap();
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
    assert_clean(&cd, &["crash"]);
}

#[test]
fn vm_tier_fails_clearly_without_hardware_kvm() {
    if !can_run("vm_tier_fails_clearly_without_hardware_kvm") {
        return;
    }
    if mvm_sandbox::manager::vm_tier_unavailable(false).is_none() {
        eprintln!(
            "SKIPPED vm_tier_fails_clearly_without_hardware_kvm: this host can run VMs; the vm \
             tier under containerd is exercised by the nested harness (tests/nested)"
        );
        return;
    }
    let cd = start("vm");
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
    assert_clean(&cd, &["vm"]);
}

/// An operator who allows only the vm tier (`MVM_ALLOWED_ISOLATION=vm`, as for mvmd) is
/// obeyed by the shim: a container annotated for the jail tier is refused, saying who decides,
/// and nothing is left behind.
#[test]
fn the_shim_obeys_the_operators_allowed_tiers() {
    if !can_run("the_shim_obeys_the_operators_allowed_tiers") {
        return;
    }
    let cd = start_with(
        "allowed",
        vec![("MVM_ALLOWED_ISOLATION".into(), "vm".into())],
    );
    let out = cd.run("forbidden", JAIL, &["echo", "hello"]);
    assert!(
        !out.status.success(),
        "a jail-tier container ran although the operator allows only the vm tier"
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("jail tier is not allowed") && err.contains("MVM_ALLOWED_ISOLATION"),
        "the error does not say the operator forbids the jail tier: {err}"
    );
    let _ = cd.ctr(&["containers", "rm", "forbidden"]);
    assert_clean(&cd, &["forbidden"]);
}

/// A pod as the CRI plugin asks for it: one shim serves both containers, each with its own
/// root (jail tier: a jail each, in one shim), and nothing is left after.
#[test]
fn a_pod_shares_one_shim() {
    if !can_run("a_pod_shares_one_shim") {
        return;
    }
    let cd = start("pod");
    let report = cd
        .run_pod("pod-jail", JAIL)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("jail-tier pod: {report:?}");
    assert_clean(&cd, &["pod-jail", "pod-jail-c1"]);
}

/// A container in its pod's network namespace (as CNI leaves it): the sandbox joins it,
/// has the pod's address and reaches the host side; the namespace is left as it was
/// (checked by `run_in_pod_network`).
#[test]
fn a_container_joins_its_pods_network() {
    if !can_run("a_container_joins_its_pods_network") {
        return;
    }
    let cd = start("podnet");
    let net = PodNetwork::create(&format!("j{}", std::process::id()), 41)
        .unwrap_or_else(|e| panic!("{e}"));
    let out = cd
        .run_in_pod_network("podnet-jail", JAIL, &net)
        .unwrap_or_else(|e| panic!("{e}"));
    eprintln!("jail tier in the pod network: {out}");
    assert_clean(&cd, &["podnet-jail"]);
}

/// The OCI spec's bind mounts (Kubernetes' volumes, /etc/hosts, secrets) reach the container,
/// read-only ones read-only; nothing of them is left after.
#[test]
fn bind_mounts_of_the_spec_reach_the_container() {
    if !can_run("bind_mounts_of_the_spec_reach_the_container") {
        return;
    }
    let cd = start("mounts");
    let vol = tempfile::tempdir().unwrap();
    std::fs::write(vol.path().join("data"), "from the host\n").unwrap();
    // The jail tier runs everything as the jail's unprivileged user: let it write, so that a
    // refusal can only come from the read-only mount.
    use std::os::unix::fs::PermissionsExt;
    for (path, mode) in [
        (vol.path().to_owned(), 0o777),
        (vol.path().join("data"), 0o666),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    let ro = format!(
        "type=bind,src={},dst=/vol,options=rbind:ro",
        vol.path().display()
    );
    let hosts = vol.path().join("data");
    let rw = format!(
        "type=bind,src={},dst=/etc/pod-hosts,options=rbind:rw",
        hosts.display()
    );
    let mut flags = JAIL.to_vec();
    flags.extend(["--mount", &ro, "--mount", &rw]);
    let out = cd.run(
        "mounts-jail",
        &flags,
        &[
            "sh",
            "-c",
            "cat /vol/data /etc/pod-hosts; echo x > /vol/new || echo refused; \
             echo changed > /etc/pod-hosts",
        ],
    );
    assert_eq!(
        text(&out.stdout),
        "from the host\nfrom the host\nrefused\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("Read-only file system"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read_to_string(&hosts).unwrap(), "changed\n");
    assert!(!vol.path().join("new").exists());
    assert_clean(&cd, &["mounts-jail"]);
}
