//! The Firecracker-compatible HTTP API on a unix socket, driven like a Firecracker client would:
//! configure, start, inspect, pause, resume, stop — through the real /dev/kvm.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mvm_testkit::{binary, guest, http_unix, require_kvm, wait_for_socket, ScratchDir};
use serde_json::Value;

/// An mvm-vmm serving its API, with a thread counting console bytes.
struct ApiVmm {
    child: Child,
    console_bytes: Arc<AtomicUsize>,
    console: std::thread::JoinHandle<String>,
    socket: std::path::PathBuf,
    _dir: ScratchDir,
}

impl ApiVmm {
    fn start() -> Self {
        let dir = ScratchDir::new("api");
        let socket = dir.path().join("api.sock");
        let mut child = Command::new(binary("mvm-vmm"))
            .arg("--api-sock")
            .arg(&socket)
            .arg("--id")
            .arg("api-test")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mvm-vmm");
        let console_bytes = Arc::new(AtomicUsize::new(0));
        let counter = console_bytes.clone();
        let mut stdout = child.stdout.take().unwrap();
        let console = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                all.extend_from_slice(&buf[..n]);
                counter.fetch_add(n, Ordering::SeqCst);
            }
            String::from_utf8_lossy(&all).into_owned()
        });
        assert!(
            wait_for_socket(&socket, Duration::from_secs(10)),
            "API socket never came up"
        );
        ApiVmm {
            child,
            console_bytes,
            console,
            socket,
            _dir: dir,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let (status, body) = http_unix(&self.socket, method, path, body).expect("API call");
        let json = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&body).expect("JSON body")
        };
        (status, json)
    }

    fn state(&self) -> String {
        self.call("GET", "/", None).1["state"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn put_boot_source(&self, kernel: &Path, args: &str) -> (u16, Value) {
        let body = serde_json::json!({"kernel_image_path": kernel, "boot_args": args}).to_string();
        self.call("PUT", "/boot-source", Some(&body))
    }

    fn start_instance(&self) -> (u16, Value) {
        self.call(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#),
        )
    }

    fn wait(mut self, timeout: Duration) -> (Option<i32>, String) {
        let console = std::mem::replace(&mut self.console, std::thread::spawn(String::new));
        let deadline = std::time::Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        (status, console.join().unwrap())
    }
}

impl Drop for ApiVmm {
    fn drop(&mut self) {
        // A failed assertion must not leave a spinning VMM behind.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn fault(body: &Value) -> &str {
    body["fault_message"].as_str().unwrap_or_default()
}

#[test]
fn configure_and_boot_through_the_api() {
    if !require_kvm("configure_and_boot_through_the_api") {
        return;
    }
    let vmm = ApiVmm::start();
    let (status, info) = vmm.call("GET", "/", None);
    assert_eq!(status, 200);
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "api-test");

    // Bad requests are 400s naming the problem, and change nothing.
    let (status, body) = vmm.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 0, "mem_size_mib": 64}"#),
    );
    assert_eq!(status, 400);
    assert!(fault(&body).contains("machine-config.vcpu_count"), "{body}");
    for (machine, expected) in [
        (
            r#"{"vcpu_count": 300, "mem_size_mib": 64}"#,
            "invalid `machine-config.vcpu_count`: 300 is out of range: use 1 to 32",
        ),
        (
            r#"{"vcpu_count": "2", "mem_size_mib": 64}"#,
            "invalid `machine-config.vcpu_count`: invalid type: string",
        ),
        (
            r#"{"vcpu_count": 1, "mem_size_mib": -1}"#,
            "invalid `machine-config.mem_size_mib`: -1 is negative",
        ),
    ] {
        for method in ["PUT", "PATCH"] {
            let (status, body) = vmm.call(method, "/machine-config", Some(machine));
            assert_eq!(status, 400, "{method} {machine}: {body}");
            assert!(
                fault(&body).starts_with(expected),
                "{method} {machine}: {body}"
            );
        }
    }
    let (status, body) = vmm.call("PUT", "/machine-config", Some("{not json"));
    assert_eq!(status, 400);
    assert!(
        fault(&body).contains("invalid configuration JSON"),
        "{body}"
    );
    let (status, body) = vmm.call("PUT", "/mmds", Some("{}"));
    assert_eq!(status, 400);
    assert!(
        fault(&body).contains("Invalid request method and/or path"),
        "{body}"
    );
    // The balloon only reports free pages: inflating is refused, naming the field.
    let (status, body) = vmm.call(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 8, "deflate_on_oom": false, "free_page_reporting": true}"#),
    );
    assert_eq!(status, 400);
    assert!(
        fault(&body).contains("`balloon.amount_mib` is not supported by mvm"),
        "{body}"
    );
    let (status, body) = vmm.call("GET", "/balloon", None);
    assert_eq!(status, 400, "{body}");
    let (status, body) = vmm.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(status, 400);
    assert!(fault(&body).contains("before starting"), "{body}");

    let (status, _) = vmm.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 64, "smt": false}"#),
    );
    assert_eq!(status, 204);
    let (status, _) = vmm.call("PATCH", "/machine-config", Some(r#"{"mem_size_mib": 48}"#));
    assert_eq!(status, 204);
    let (_, machine) = vmm.call("GET", "/machine-config", None);
    assert_eq!(
        (
            machine["vcpu_count"].as_u64(),
            machine["mem_size_mib"].as_u64()
        ),
        (Some(2), Some(48))
    );

    // A missing kernel fails InstanceStart with the path; the VM can still be started after.
    let (status, _) = vmm.put_boot_source(Path::new("/nonexistent/vmlinux"), "console=ttyS0");
    assert_eq!(status, 204);
    let (status, body) = vmm.start_instance();
    assert_eq!(status, 400);
    assert!(
        fault(&body).contains("cannot open kernel /nonexistent/vmlinux"),
        "{body}"
    );
    assert_eq!(vmm.state(), "Not started");

    let (status, _) = vmm.put_boot_source(&guest("bootinfo"), "console=ttyS0 via=api");
    assert_eq!(status, 204);
    let (_, full) = vmm.call("GET", "/vm/config", None);
    assert_eq!(full["boot-source"]["boot_args"], "console=ttyS0 via=api");
    let (status, body) = vmm.start_instance();
    assert_eq!(status, 204, "{body}");
    let (code, console) = vmm.wait(Duration::from_secs(60));
    assert_eq!(code, Some(0));
    assert_eq!(
        console,
        "cmdline: console=ttyS0 via=api\ne820 entries: 3\nram end MiB: 48\n"
    );
}

/// `PUT /balloon` configures the free-page-reporting balloon before boot (`GET /balloon`
/// shows it); a change of its size is refused, and so is a PUT after the start.
#[test]
fn the_balloon_is_configured_before_boot() {
    if !require_kvm("the_balloon_is_configured_before_boot") {
        return;
    }
    let vmm = ApiVmm::start();
    let balloon = r#"{"amount_mib": 0, "deflate_on_oom": false, "free_page_reporting": true}"#;
    assert_eq!(vmm.call("PUT", "/balloon", Some(balloon)).0, 204);
    let (status, body) = vmm.call("GET", "/balloon", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["amount_mib"], &body["free_page_reporting"]),
        (&Value::from(0), &Value::from(true)),
        "{body}"
    );
    let (status, body) = vmm.call("PATCH", "/balloon", Some(r#"{"amount_mib": 64}"#));
    assert_eq!(status, 400);
    assert!(fault(&body).contains("never inflates"), "{body}");
    let (status, _) = vmm.put_boot_source(&guest("spin"), "console=ttyS0");
    assert_eq!(status, 204);
    let (status, body) = vmm.start_instance();
    assert_eq!(status, 204, "{body}");
    let (status, body) = vmm.call("PUT", "/balloon", Some(balloon));
    assert_eq!(status, 400);
    assert!(fault(&body).contains("PUT /balloon"), "{body}");
}

/// A guest that resets at once ends the VMM right after InstanceStart was answered: the
/// answer must still reach the client (it was cut off now and then under load).
#[test]
fn instance_start_is_answered_when_the_guest_resets_at_once() {
    if !require_kvm("instance_start_is_answered_when_the_guest_resets_at_once") {
        return;
    }
    for round in 0..10 {
        let vmm = ApiVmm::start();
        let (status, _) = vmm.put_boot_source(&guest("hello"), "console=ttyS0");
        assert_eq!(status, 204);
        let (status, body) = vmm.start_instance();
        assert_eq!(status, 204, "round {round}: {body}");
        let (code, _) = vmm.wait(Duration::from_secs(60));
        assert_eq!(code, Some(0), "round {round}");
    }
}

#[test]
fn unusable_drives_and_reserved_vsock_cids_are_refused_at_put() {
    // Firecracker's checks at PUT time: no guest runs, so no KVM is needed.
    let vmm = ApiVmm::start();
    let dir = ScratchDir::new("api-put-checks");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 4096]).unwrap();
    let drive = |path: &Path, read_only: bool| {
        serde_json::json!({"drive_id": "data", "path_on_host": path, "is_root_device": false, "is_read_only": read_only})
            .to_string()
    };
    let missing = dir.path().join("missing.img");
    let (status, body) = vmm.call("PUT", "/drives/data", Some(&drive(&missing, true)));
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        fault(&body),
        format!(
            "drive data: cannot open path_on_host {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
    // A directory cannot be opened read-write, and read-only it is no disk image.
    let (status, body) = vmm.call("PUT", "/drives/data", Some(&drive(dir.path(), false)));
    assert_eq!(status, 400, "{body}");
    assert!(fault(&body).contains("Is a directory"), "{body}");
    let (status, body) = vmm.call("PUT", "/drives/data", Some(&drive(dir.path(), true)));
    assert_eq!(status, 400, "{body}");
    assert!(
        fault(&body).contains("not a regular file or block device"),
        "{body}"
    );
    // Refused requests changed nothing; a usable image is taken.
    let (_, full) = vmm.call("GET", "/vm/config", None);
    assert_eq!(full["drives"], serde_json::json!([]));
    for read_only in [true, false] {
        let (status, body) = vmm.call("PUT", "/drives/data", Some(&drive(&image, read_only)));
        assert_eq!(status, 204, "{body}");
    }

    let sock = dir.path().join("v.sock");
    for cid in [0, 1, 2] {
        let vsock = serde_json::json!({"guest_cid": cid, "uds_path": sock}).to_string();
        let (status, body) = vmm.call("PUT", "/vsock", Some(&vsock));
        assert_eq!(status, 400, "{body}");
        assert!(
            fault(&body).starts_with(&format!("invalid `vsock.guest_cid`: {cid} is reserved")),
            "{body}"
        );
    }
    let vsock = serde_json::json!({"guest_cid": 3, "uds_path": sock}).to_string();
    let (status, body) = vmm.call("PUT", "/vsock", Some(&vsock));
    assert_eq!(status, 204, "{body}");
    let (_, full) = vmm.call("GET", "/vm/config", None);
    assert_eq!(full["vsock"]["guest_cid"], 3);
}

#[test]
fn pause_stops_the_guest_and_resume_continues_it() {
    if !require_kvm("pause_stops_the_guest_and_resume_continues_it") {
        return;
    }
    let vmm = ApiVmm::start();
    let metrics = vmm._dir.path().join("metrics.json");
    let body = serde_json::json!({"metrics_path": metrics}).to_string();
    assert_eq!(vmm.call("PUT", "/metrics", Some(&body)).0, 204);
    vmm.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#),
    );
    vmm.put_boot_source(&guest("spin"), "console=ttyS0");
    assert_eq!(vmm.start_instance().0, 204);
    assert_eq!(vmm.state(), "Running");
    // Whether console output arrives within `window` (a loaded host may starve the vCPU for a
    // while, so the positive checks allow seconds).
    let grows = |vmm: &ApiVmm, window: Duration| {
        let before = vmm.console_bytes.load(Ordering::SeqCst);
        let deadline = std::time::Instant::now() + window;
        while std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            if vmm.console_bytes.load(Ordering::SeqCst) > before {
                return true;
            }
        }
        false
    };
    assert!(
        grows(&vmm, Duration::from_secs(10)),
        "the spinning guest prints"
    );
    let (status, _) = vmm.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(status, 204);
    assert_eq!(vmm.state(), "Paused");
    // Let output already in flight drain, then nothing more may arrive.
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        !grows(&vmm, Duration::from_millis(300)),
        "a paused guest prints nothing"
    );
    let (status, body) = vmm.call(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/x"}"#),
    );
    assert_eq!(status, 400);
    assert!(fault(&body).contains("after starting"), "{body}");
    let (status, _) = vmm.call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#));
    assert_eq!(status, 204);
    assert_eq!(vmm.state(), "Running");
    assert!(
        grows(&vmm, Duration::from_secs(10)),
        "a resumed guest prints again"
    );

    // Metrics: one JSON line per flush, counting API requests and vCPU exits.
    let (status, _) = vmm.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
    );
    assert_eq!(status, 204);
    let flushed = std::fs::read_to_string(&metrics).unwrap();
    let line: Value = serde_json::from_str(flushed.lines().last().unwrap()).unwrap();
    assert!(
        line["api_server"]["requests"].as_u64().unwrap() >= 8,
        "{line}"
    );
    assert!(line["vcpu"]["exits_io"].as_u64().unwrap() > 0, "{line}");
    assert!(line["virtio"]["block"].is_object(), "{line}");

    // SIGTERM ends the VMM cleanly and removes its socket.
    let socket = vmm.socket.clone();
    // SAFETY: kill() on our own child's pid.
    unsafe { libc::kill(vmm.child.id() as i32, libc::SIGTERM) };
    let (code, _) = vmm.wait(Duration::from_secs(10));
    assert_eq!(code, Some(0));
    assert!(!socket.exists(), "API socket removed on exit");
}

#[test]
fn a_second_vmm_on_a_live_socket_is_refused() {
    if !require_kvm("a_second_vmm_on_a_live_socket_is_refused") {
        return;
    }
    let vmm = ApiVmm::start();
    let out = Command::new(binary("mvm-vmm"))
        .arg("--api-sock")
        .arg(&vmm.socket)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is in use by another process"));
    // SAFETY: kill() on our own child's pid.
    unsafe { libc::kill(vmm.child.id() as i32, libc::SIGTERM) };
    assert_eq!(vmm.wait(Duration::from_secs(10)).0, Some(0));
}

#[test]
fn send_ctrl_alt_del_presses_the_keys_on_the_guests_keyboard() {
    if !require_kvm("send_ctrl_alt_del_presses_the_keys_on_the_guests_keyboard") {
        return;
    }
    let vmm = ApiVmm::start();
    let (status, body) = vmm.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(status, 400);
    assert!(fault(&body).contains("before starting"), "{body}");
    vmm.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#),
    );
    // The guest prints the scancodes it reads from the i8042, then resets after 11 bytes.
    vmm.put_boot_source(&guest("keyboard"), "console=ttyS0");
    assert_eq!(vmm.start_instance().0, 204);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while vmm.console_bytes.load(Ordering::SeqCst) < "keyboard guest ready\n".len() {
        assert!(
            std::time::Instant::now() < deadline,
            "the guest never got ready"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let (status, body) = vmm.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
    );
    assert_eq!(status, 204, "{body}");
    let (code, console) = vmm.wait(Duration::from_secs(30));
    // Scancode set 2: Ctrl, Alt, Del (E0 71) pressed, then released (F0 ...) in reverse.
    assert_eq!(
        console,
        "keyboard guest ready\n14 11 e0 71 e0 f0 71 f0 11 f0 14 \n"
    );
    assert_eq!(code, Some(0), "the guest reset the VM");
}

/// Clients that stall hold up neither other clients nor the VMM: one sent half a request, one
/// sends requests without reading the answers (the server stops reading it once an answer is
/// pending, so its own writes end up blocked), and idle connections fill the cap, beyond which
/// a client waits until one of them closes.
#[test]
fn stalled_clients_block_neither_other_clients_nor_the_vmm() {
    use std::io::{ErrorKind, Write};
    use std::os::unix::net::UnixStream;
    use vmm::api_server::MAX_CONNECTIONS;

    if !require_kvm("stalled_clients_block_neither_other_clients_nor_the_vmm") {
        return;
    }
    let vmm = ApiVmm::start();
    let connect = || UnixStream::connect(&vmm.socket).expect("connect");
    let mut half = connect();
    half.write_all(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"kern")
        .unwrap();
    let mut deaf = connect();
    deaf.set_nonblocking(true).unwrap();
    let request = b"GET / HTTP/1.1\r\n\r\n";
    let mut sent = 0usize;
    let blocked = loop {
        match deaf.write(request) {
            Ok(n) => sent += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
            Err(e) => panic!("writing to the API: {e}"),
        }
        if sent > 64 << 20 {
            break false;
        }
    };
    assert!(
        blocked,
        "the server read {sent} bytes of a client that reads nothing"
    );
    assert_eq!(vmm.state(), "Not started");

    // Fill the cap: a connection held open is still served, the next one waits for a slot.
    let mut idle: Vec<UnixStream> = (2..MAX_CONNECTIONS).map(|_| connect()).collect();
    let served = idle.last_mut().unwrap();
    served.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = [0u8; 12];
    served.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"HTTP/1.1 200");
    let socket = vmm.socket.clone();
    let waiting = std::thread::spawn(move || http_unix(&socket, "GET", "/", None));
    idle.clear();
    let (status, body) = waiting
        .join()
        .unwrap()
        .expect("an answer once a slot is free");
    assert_eq!(status, 200, "{body}");
    assert_eq!(vmm.state(), "Not started");

    // SAFETY: kill() on our own child's pid.
    unsafe { libc::kill(vmm.child.id() as i32, libc::SIGTERM) };
    assert_eq!(vmm.wait(Duration::from_secs(10)).0, Some(0));
    drop((half, deaf));
}
