//! Snapshot and restore through the Firecracker API on a unix socket, with the real /dev/kvm:
//! a counting guest is paused and snapshotted, then restored twice from the same files in two
//! fresh VMM processes (seccomp on), and both go on counting with their memory intact. Damaged
//! or mismatched snapshots are refused with a 400 that says why, and the VMM stays up. Guests
//! with virtio devices go on after a restore: a virtio-blk guest keeps doing I/O on its queue
//! and disk, a virtio-vsock guest is told its connections are gone, a virtio-net guest gets
//! frames through the tap its restored VMM reopened. Firecracker's `network_overrides` and
//! `vsock_override` put a restored guest on another tap and socket, and are refused for
//! devices the snapshot lacks. With the `Uffd` backend a page server thread of the test
//! (Firecracker's protocol) fills the restored guest's memory page by page. A `Diff` snapshot
//! (dirty page tracking) merged over the `Full` one before it restores the guest. A restored
//! guest saved again restores and goes on.

mod virtio_support;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mvm_testkit::page_server::PageServer;
use mvm_testkit::{binary, guest, http_unix, require_kvm, wait_for_socket, ScratchDir};
use serde_json::{json, Value};
use virtio_support::{PacketSocket, TestTap};

/// An mvm-vmm serving its API, its console collected by a thread.
struct Vmm {
    child: Child,
    console: Arc<Mutex<String>>,
    socket: PathBuf,
}

impl Vmm {
    fn start(dir: &Path, name: &str) -> Self {
        let socket = dir.join(format!("{name}.sock"));
        let mut child = Command::new(binary("mvm-vmm"))
            .arg("--api-sock")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn mvm-vmm");
        let console = Arc::new(Mutex::new(String::new()));
        let sink = console.clone();
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        assert!(
            wait_for_socket(&socket, Duration::from_secs(10)),
            "API socket never came up"
        );
        Vmm {
            child,
            console,
            socket,
        }
    }

    fn call(&self, method: &str, path: &str, body: Value) -> (u16, Value) {
        let body = body.to_string();
        let (status, body) = http_unix(&self.socket, method, path, Some(&body)).expect("API call");
        let json = serde_json::from_str(&body).unwrap_or(Value::Null);
        (status, json)
    }

    fn ok(&self, method: &str, path: &str, body: Value) {
        let (status, answer) = self.call(method, path, body);
        assert_eq!(status, 204, "{method} {path}: {answer}");
    }

    fn console(&self) -> String {
        self.console.lock().unwrap().clone()
    }

    /// Waits until the console has `lines` complete "count" lines; returns the console.
    fn wait_for_lines(&self, lines: usize) -> String {
        self.wait_for_stamps("count", lines)
    }

    /// Waits until the console has `lines` complete "`word` N ok" lines; returns the console.
    fn wait_for_stamps(&self, word: &str, lines: usize) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let console = self.console();
            if stamps(&console, word).len() >= lines {
                return console;
            }
            assert!(
                Instant::now() < deadline,
                "fewer than {lines} {word} lines in 60 s: {console:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The complete `count N ok` lines of a console, as N; panics on a `BAD` line.
fn counts(console: &str) -> Vec<u64> {
    stamps(console, "count")
}

/// The complete `<word> N ok` lines of a console, as N; panics on a `BAD` line or a guest
/// that gave up.
fn stamps(console: &str, word: &str) -> Vec<u64> {
    assert!(
        !console.contains("BAD") && !console.contains("TIMEOUT"),
        "guest state damaged: {console:?}"
    );
    console
        .split_inclusive('\n')
        .filter(|l| l.ends_with(" ok\n"))
        .filter_map(|l| {
            l.strip_prefix(word)?
                .strip_prefix(' ')?
                .strip_suffix(" ok\n")?
                .parse()
                .ok()
        })
        .collect()
}

/// Boots the counting guest (32 MiB, with dirty page tracking when `track_dirty_pages`) in a
/// new VMM and waits until it has counted three lines.
fn boot_counting_guest(dir: &Path, track_dirty_pages: bool) -> Vmm {
    let vmm = Vmm::start(dir, "source");
    vmm.ok(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 32, "track_dirty_pages": track_dirty_pages}),
    );
    vmm.ok(
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": guest("counter"), "boot_args": "console=ttyS0"}),
    );
    vmm.ok("PUT", "/actions", json!({"action_type": "InstanceStart"}));
    vmm.wait_for_lines(3);
    vmm
}

/// Boots the counting guest, lets it count, pauses it and snapshots it into `dir`. Returns
/// (snapshot, memory file, the last complete count before the pause, the console then).
fn snapshot_counting_guest(dir: &Path) -> (PathBuf, PathBuf, u64, String) {
    let vmm = boot_counting_guest(dir, false);
    let (snapshot, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
    let (status, answer) = vmm.call(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": snapshot, "mem_file_path": mem}),
    );
    assert_eq!(status, 400, "a running VM cannot be snapshotted");
    assert!(
        answer["fault_message"]
            .as_str()
            .unwrap()
            .contains("not paused"),
        "{answer}"
    );
    vmm.ok("PATCH", "/vm", json!({"state": "Paused"}));
    let (status, answer) = vmm.call(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Diff", "snapshot_path": snapshot, "mem_file_path": mem}),
    );
    assert_eq!(status, 400);
    assert!(answer["fault_message"]
        .as_str()
        .unwrap()
        .contains("dirty page tracking"));
    vmm.ok(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Full", "snapshot_path": snapshot, "mem_file_path": mem}),
    );
    let console = vmm.console();
    let last = *counts(&console).last().unwrap();
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 32 << 20);
    (snapshot, mem, last, console)
}

/// The body of a `PUT /snapshot/load` that resumes `snapshot`, with the fields of `extra`
/// (an object: overrides) added.
fn load_request(snapshot: &Path, mem: &Path, extra: Value) -> Value {
    let mut body = json!({
        "snapshot_path": snapshot,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true,
    });
    let (Value::Object(body_fields), Value::Object(extra)) = (&mut body, extra) else {
        panic!("load request fields must be a JSON object");
    };
    body_fields.extend(extra);
    body
}

/// Loads `snapshot` into a fresh VMM and resumes it.
fn restore(dir: &Path, name: &str, snapshot: &Path, mem: &Path) -> Vmm {
    restore_with(dir, name, snapshot, mem, json!({}))
}

/// Loads `snapshot` into a fresh VMM with the load request's `overrides` and resumes it.
fn restore_with(dir: &Path, name: &str, snapshot: &Path, mem: &Path, overrides: Value) -> Vmm {
    let vmm = Vmm::start(dir, name);
    vmm.ok(
        "PUT",
        "/snapshot/load",
        load_request(snapshot, mem, overrides),
    );
    vmm
}

/// Asserts that `vmm` answers `PUT /snapshot/load` with `request` with a 400 whose message
/// contains `expected`, and is still up.
fn assert_load_refused(vmm: &mut Vmm, request: Value, expected: &str) {
    let (status, answer) = vmm.call("PUT", "/snapshot/load", request.clone());
    let message = answer["fault_message"].as_str().unwrap_or_default();
    assert_eq!(status, 400, "{request}: {answer}");
    assert!(message.contains(expected), "{request}: {message}");
    assert!(vmm.is_running(), "the VMM survives {request}");
}

/// Asserts that the restored counting guest of `vmm` prints the three counts after `last`,
/// the count of the snapshot's `source_console` (whose last line the restored guest may
/// finish).
fn assert_goes_on_counting(vmm: &Vmm, source_console: &str, last: u64) {
    let partial = source_console.rsplit('\n').next().unwrap();
    let restored = format!("{partial}{}", vmm.wait_for_lines(3));
    let counted = counts(&restored);
    assert_eq!(
        counted[..3],
        [last + 1, last + 2, last + 3],
        "the restored guest goes on from the snapshot: {restored:?}"
    );
}

/// The body of a `PUT /snapshot/load` that resumes `snapshot` with its memory from the page
/// server listening on `socket`.
fn uffd_load_request(snapshot: &Path, socket: &Path) -> Value {
    json!({
        "snapshot_path": snapshot,
        "mem_backend": {"backend_type": "Uffd", "backend_path": socket},
        "resume_vm": true,
    })
}

#[test]
fn a_snapshot_restores_twice_and_both_go_on_counting() {
    if !require_kvm("a_snapshot_restores_twice_and_both_go_on_counting") {
        return;
    }
    let dir = ScratchDir::new("snapshot");
    let (snapshot, mem, last, source_console) = snapshot_counting_guest(dir.path());
    let mem_before = std::fs::read(&mem).unwrap();
    let first = restore(dir.path(), "first", &snapshot, &mem);
    let second = restore(dir.path(), "second", &snapshot, &mem);
    for vmm in [&first, &second] {
        let (status, info) = vmm.call("GET", "/", Value::Null);
        assert_eq!((status, info["state"].as_str()), (200, Some("Running")));
        let (_, config) = vmm.call("GET", "/vm/config", Value::Null);
        assert_eq!(config["machine-config"]["mem_size_mib"], 32);
    }
    for vmm in [&first, &second] {
        assert_goes_on_counting(vmm, &source_console, last);
    }
    assert!(
        std::fs::read(&mem).unwrap() == mem_before,
        "restored guests write to private copies, never to the memory file"
    );
}

/// A restored guest saved again (as a fork of a restored sandbox is: the save copies the
/// pages that are still its memory file's from that file, under the VMM's seccomp filter)
/// restores in a third VMM and goes on counting from its own save; the first memory file is
/// untouched, and a save over it is refused. Once with the memory file beside the save
/// (copied file to file in the kernel) and once on /dev/shm (another file system here:
/// copied through a buffer).
#[test]
fn a_restored_guest_saved_again_restores_and_goes_on_counting() {
    if !require_kvm("a_restored_guest_saved_again_restores_and_goes_on_counting") {
        return;
    }
    let dir = ScratchDir::new("snapshot-again");
    let (snapshot, mem, last, source_console) = snapshot_counting_guest(dir.path());
    let mem_before = std::fs::read(&mem).unwrap();
    let on_shm = PathBuf::from(format!(
        "/dev/shm/mvm-snapshot-again-{}.mem",
        std::process::id()
    ));
    std::fs::copy(&mem, &on_shm).unwrap();
    for (name, mem) in [("beside", &mem), ("shm", &on_shm)] {
        let first = restore(dir.path(), &format!("{name}-first"), &snapshot, mem);
        assert_goes_on_counting(&first, &source_console, last);
        first.ok("PATCH", "/vm", json!({"state": "Paused"}));
        // Its own memory file is refused: creating it would truncate the guest's memory.
        let (status, answer) = first.call(
            "PUT",
            "/snapshot/create",
            json!({"snapshot_path": dir.path().join("own.snap"), "mem_file_path": mem}),
        );
        let message = answer["fault_message"].as_str().unwrap_or_default();
        assert_eq!(status, 400, "{answer}");
        assert!(
            message.contains("restored from and still maps"),
            "{message}"
        );
        let (again, again_mem) = (
            dir.path().join(format!("{name}-again.snap")),
            dir.path().join(format!("{name}-again.mem")),
        );
        first.ok(
            "PUT",
            "/snapshot/create",
            json!({"snapshot_type": "Full", "snapshot_path": again, "mem_file_path": again_mem}),
        );
        let console = first.console();
        let counted = *counts(&console).last().unwrap();
        assert!(counted > last + 2, "{console:?}");
        let second = restore(dir.path(), &format!("{name}-second"), &again, &again_mem);
        assert_goes_on_counting(&second, &console, counted);
        assert!(
            std::fs::read(mem).unwrap() == mem_before,
            "a save of a restored guest leaves the memory file it maps alone"
        );
    }
    std::fs::remove_file(&on_shm).unwrap();
}

#[test]
fn a_snapshot_restored_through_a_uffd_page_server_goes_on_counting() {
    if !require_kvm("a_snapshot_restored_through_a_uffd_page_server_goes_on_counting") {
        return;
    }
    let dir = ScratchDir::new("snapshot-uffd");
    let (snapshot, mem, last, source_console) = snapshot_counting_guest(dir.path());
    let socket = dir.path().join("pages.sock");
    let server = PageServer::start(&socket, &mem);
    let vmm = Vmm::start(dir.path(), "uffd");
    vmm.ok(
        "PUT",
        "/snapshot/load",
        uffd_load_request(&snapshot, &socket),
    );
    assert_goes_on_counting(&vmm, &source_console, last);
    let mappings = server.mappings().expect("the VMM sent its mappings");
    let [region] = mappings.as_array().unwrap().as_slice() else {
        panic!("one region for a 32 MiB guest: {mappings}");
    };
    let mut fields: Vec<_> = region.as_object().unwrap().keys().cloned().collect();
    fields.sort();
    assert_eq!(
        fields,
        ["base_host_virt_addr", "offset", "page_size", "size"],
        "Firecracker's GuestRegionUffdMapping: {region}"
    );
    assert_eq!(
        (&region["size"], &region["offset"], &region["page_size"]),
        (&json!(32 << 20), &json!(0), &json!(4096))
    );
    let faults = server.faults();
    assert!(
        faults > 0 && faults < (32 << 20) / 4096 / 8,
        "the guest's memory came from the page server, page by page as it was touched: \
         {faults} faults"
    );
    drop(vmm);
    let served = server.join().expect("the page server served every fault");
    assert!(served >= faults);
}

#[test]
fn a_uffd_load_without_a_page_server_is_refused_and_the_vmm_can_load_again() {
    if !require_kvm("a_uffd_load_without_a_page_server_is_refused_and_the_vmm_can_load_again") {
        return;
    }
    let dir = ScratchDir::new("snapshot-uffd-refused");
    let (snapshot, mem, last, source_console) = snapshot_counting_guest(dir.path());
    let mut vmm = Vmm::start(dir.path(), "no-server");
    let missing = dir.path().join("nobody.sock");
    assert_load_refused(
        &mut vmm,
        uffd_load_request(&snapshot, &missing),
        &format!(
            "cannot connect to the page server's socket {} (mem_backend.backend_path): \
             No such file or directory",
            missing.display()
        ),
    );
    // A socket whose server has gone.
    let gone = dir.path().join("gone.sock");
    drop(std::os::unix::net::UnixListener::bind(&gone).unwrap());
    assert_load_refused(
        &mut vmm,
        uffd_load_request(&snapshot, &gone),
        "Connection refused",
    );
    let (_, info) = vmm.call("GET", "/", Value::Null);
    assert_eq!(info["state"], "Not started");
    vmm.ok(
        "PUT",
        "/snapshot/load",
        load_request(&snapshot, &mem, json!({})),
    );
    assert_goes_on_counting(&vmm, &source_console, last);
}

/// Writes every data range of the sparse `diff` (found with SEEK_DATA/SEEK_HOLE) into
/// `base` at the same offset: a Diff memory file merged over the memory file it follows.
fn merge_diff(diff: &Path, base: &Path) {
    use std::os::unix::fs::FileExt;
    let diff = std::fs::File::open(diff).unwrap();
    let base = std::fs::OpenOptions::new().write(true).open(base).unwrap();
    let len = diff.metadata().unwrap().len();
    for data in mvm_sys::sparse::data_ranges(&diff, 0, len).unwrap() {
        let mut bytes = vec![0u8; (data.end - data.start) as usize];
        diff.read_exact_at(&mut bytes, data.start).unwrap();
        base.write_all_at(&bytes, data.start).unwrap();
    }
}

#[test]
fn a_diff_snapshot_merged_over_its_full_snapshot_restores_the_guest() {
    if !require_kvm("a_diff_snapshot_merged_over_its_full_snapshot_restores_the_guest") {
        return;
    }
    let dir = ScratchDir::new("snapshot-diff");
    let path = |name: &str| dir.path().join(name);
    let vmm = boot_counting_guest(dir.path(), true);
    vmm.ok("PATCH", "/vm", json!({"state": "Paused"}));
    let create = |kind: &str, snapshot: &str, mem: &str| {
        vmm.ok(
            "PUT",
            "/snapshot/create",
            json!({"snapshot_type": kind, "snapshot_path": path(snapshot), "mem_file_path": path(mem)}),
        )
    };
    create("Full", "full.snap", "full.mem");
    let at_full = counts(&vmm.console()).len();
    vmm.ok("PATCH", "/vm", json!({"state": "Resumed"}));
    vmm.wait_for_lines(at_full + 3);
    vmm.ok("PATCH", "/vm", json!({"state": "Paused"}));
    create("Diff", "diff.snap", "diff.mem");
    let console = vmm.console();
    let last = *counts(&console).last().unwrap();

    use std::os::unix::fs::MetadataExt;
    let diff = std::fs::metadata(path("diff.mem")).unwrap();
    assert_eq!(
        diff.len(),
        32 << 20,
        "a Diff memory file has the full layout"
    );
    assert!(
        diff.blocks() * 512 <= 64 << 10,
        "only the pages the guest wrote since the Full snapshot: {} bytes",
        diff.blocks() * 512
    );
    std::fs::copy(path("full.mem"), path("merged.mem")).unwrap();
    merge_diff(&path("diff.mem"), &path("merged.mem"));
    // Loaded with track_dirty_pages, the restored VM takes Diffs of its own.
    let restored = restore_with(
        dir.path(),
        "merged",
        &path("diff.snap"),
        &path("merged.mem"),
        json!({"track_dirty_pages": true}),
    );
    assert_goes_on_counting(&restored, &console, last);
    restored.ok("PATCH", "/vm", json!({"state": "Paused"}));
    restored.ok(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_type": "Diff", "snapshot_path": path("again.snap"), "mem_file_path": path("again.mem")}),
    );
    let again = std::fs::metadata(path("again.mem")).unwrap();
    assert!(again.blocks() > 0 && again.blocks() * 512 <= 64 << 10);
}

#[test]
fn a_snapshot_loaded_without_resume_stays_paused_until_resumed() {
    if !require_kvm("a_snapshot_loaded_without_resume_stays_paused_until_resumed") {
        return;
    }
    let dir = ScratchDir::new("snapshot-paused");
    let (snapshot, mem, last, _) = snapshot_counting_guest(dir.path());
    let vmm = Vmm::start(dir.path(), "paused");
    vmm.ok(
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": snapshot, "mem_file_path": mem}),
    );
    let (_, info) = vmm.call("GET", "/", Value::Null);
    assert_eq!(info["state"], "Paused");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        counts(&vmm.console()).is_empty(),
        "a paused guest prints nothing"
    );
    vmm.ok("PATCH", "/vm", json!({"state": "Resumed"}));
    let console = vmm.wait_for_lines(2);
    assert!(counts(&console).iter().all(|n| *n > last), "{console:?}");
    // A loaded VM is booted: a second load is refused.
    let (status, answer) = vmm.call(
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": snapshot, "mem_file_path": mem}),
    );
    assert_eq!(status, 400, "{answer}");
}

#[test]
fn damaged_or_mismatched_snapshots_are_refused_and_the_vmm_stays_up() {
    if !require_kvm("damaged_or_mismatched_snapshots_are_refused_and_the_vmm_stays_up") {
        return;
    }
    let dir = ScratchDir::new("snapshot-bad");
    let (snapshot, mem, _, _) = snapshot_counting_guest(dir.path());
    let good = std::fs::read(&snapshot).unwrap();
    let variant = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let mut flipped = good.clone();
    let middle = good.len() / 2;
    flipped[middle] ^= 0x01;
    let mut version = good.clone();
    version[8] = 99;
    let small_mem = variant("small.mem", &vec![0u8; 16 << 20]);
    let cases: Vec<(PathBuf, &Path, &str)> = vec![
        (
            variant("truncated", &good[..good.len() - 100]),
            &mem,
            "truncated",
        ),
        (variant("short", &good[..10]), &mem, "truncated"),
        (variant("flipped", &flipped), &mem, "corrupt"),
        (
            variant("version", &version),
            &mem,
            "version 99 is not supported",
        ),
        (
            variant("magic", b"not a snapshot at all, just text"),
            &mem,
            "bad magic",
        ),
        (snapshot.clone(), &small_mem, "belongs to another snapshot"),
        (dir.path().join("missing"), &mem, "cannot read"),
    ];
    let mut vmm = Vmm::start(dir.path(), "refuser");
    for (snapshot, mem, expected) in cases {
        let request = json!({"snapshot_path": snapshot, "mem_file_path": mem});
        assert_load_refused(&mut vmm, request, expected);
    }
    // After all those refusals the same VMM still loads the good snapshot.
    vmm.ok(
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": snapshot, "mem_file_path": mem, "resume_vm": true}),
    );
    vmm.wait_for_lines(1);

    // A VMM that was configured for boot refuses to load.
    let configured = Vmm::start(dir.path(), "configured");
    configured.ok(
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 32}),
    );
    let (status, answer) = configured.call(
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": snapshot, "mem_file_path": mem}),
    );
    assert_eq!(status, 400);
    assert!(answer["fault_message"]
        .as_str()
        .unwrap()
        .contains("boot-specific resources"));
}

#[test]
fn overrides_of_devices_the_snapshot_lacks_are_refused() {
    if !require_kvm("overrides_of_devices_the_snapshot_lacks_are_refused") {
        return;
    }
    let dir = ScratchDir::new("snapshot-overrides");
    let (snapshot, mem, last, _) = snapshot_counting_guest(dir.path());
    let mut vmm = Vmm::start(dir.path(), "refuser");
    assert_load_refused(
        &mut vmm,
        load_request(
            &snapshot,
            &mem,
            json!({"network_overrides": [{"iface_id": "eth0", "host_dev_name": "tap9"}]}),
        ),
        "no network interface \"eth0\"",
    );
    let unused = dir.path().join("unused.sock");
    assert_load_refused(
        &mut vmm,
        load_request(
            &snapshot,
            &mem,
            json!({"vsock_override": {"uds_path": unused}}),
        ),
        "the snapshot has no vsock device",
    );
    assert!(!unused.exists());
    // Nothing of the refused loads stays behind: the same VMM loads the snapshot as it is.
    vmm.ok(
        "PUT",
        "/snapshot/load",
        load_request(&snapshot, &mem, json!({})),
    );
    assert!(counts(&vmm.wait_for_lines(1))[0] > last);
}

/// Boots test guest `name` with one virtio device (`PUT device.0` with body `device.1`), waits
/// for three "`word` N ok" lines, pauses it, snapshots it into `dir` and stops that VMM.
/// Returns (snapshot, memory file, the last N before the pause, the console then).
fn snapshot_device_guest(
    dir: &Path,
    name: &str,
    device: (&str, Value),
    word: &str,
) -> (PathBuf, PathBuf, u64, String) {
    let (snapshot, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
    let source = Vmm::start(dir, "source");
    source.ok(
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": guest(name), "boot_args": "console=ttyS0"}),
    );
    source.ok("PUT", device.0, device.1);
    source.ok("PUT", "/actions", json!({"action_type": "InstanceStart"}));
    source.wait_for_stamps(word, 3);
    source.ok("PATCH", "/vm", json!({"state": "Paused"}));
    source.ok(
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": snapshot, "mem_file_path": mem}),
    );
    let console = source.console();
    let last = *stamps(&console, word).last().unwrap();
    (snapshot, mem, last, console)
}

#[test]
fn a_virtio_blk_guest_goes_on_with_its_disk_after_a_restore() {
    if !require_kvm("a_virtio_blk_guest_goes_on_with_its_disk_after_a_restore") {
        return;
    }
    let dir = ScratchDir::new("snapshot-blk");
    let image = dir.path().join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let drive = json!({"drive_id": "scratch", "path_on_host": image, "is_root_device": false});
    // The source VMM is gone once this returns: the restored one alone owns the disk.
    let (snapshot, mem, last, _) = snapshot_device_guest(
        dir.path(),
        "virtio_blk_snap",
        ("/drives/scratch", drive),
        "round",
    );
    let disk = std::fs::read(&image).unwrap();
    assert!(disk[512..].starts_with(b"marker written before the snapshot"));
    let at_snapshot = u64::from_le_bytes(disk[1024..1032].try_into().unwrap());
    assert!(
        at_snapshot == last || at_snapshot == last + 1,
        "sector 2 holds the last round written: {at_snapshot}, last printed {last}"
    );

    let restored = restore(dir.path(), "restored", &snapshot, &mem);
    let console = restored.wait_for_stamps("round", 3);
    let rounds = stamps(&console, "round");
    assert!(
        rounds[0] == last + 1 && rounds.windows(2).all(|w| w[1] == w[0] + 1),
        "the restored guest goes on after round {last} with its queue and disk: {console:?}"
    );
    let disk = std::fs::read(&image).unwrap();
    assert!(u64::from_le_bytes(disk[1024..1032].try_into().unwrap()) >= rounds[2]);
}

/// Snapshots the virtio-vsock guest with its device on `uds_path`, in `dir`. Returns
/// (snapshot, memory file, the last tick before the pause).
fn snapshot_vsock_guest(dir: &Path, uds_path: &Path) -> (PathBuf, PathBuf, u64) {
    let vsock = json!({"guest_cid": 3, "uds_path": uds_path});
    let (snapshot, mem, last, console) =
        snapshot_device_guest(dir, "virtio_vsock_snap", ("/vsock", vsock), "tick");
    assert!(!console.contains("transport reset"), "{console:?}");
    (snapshot, mem, last)
}

/// Waits for the restored vsock guest to report the transport reset and to tick on after
/// tick `last`.
fn assert_vsock_guest_goes_on(restored: &Vmm, last: u64) {
    let console = restored.wait_for_stamps("tick", 3);
    assert!(
        console.contains("transport reset: id=0 len=4\n"),
        "the driver gets VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on its event queue: {console:?}"
    );
    assert!(stamps(&console, "tick")[0] > last, "{console:?}");
}

#[test]
fn a_restored_vsock_guest_is_told_its_connections_are_gone() {
    if !require_kvm("a_restored_vsock_guest_is_told_its_connections_are_gone") {
        return;
    }
    let dir = ScratchDir::new("snapshot-vsock");
    let (snapshot, mem, last) = snapshot_vsock_guest(dir.path(), &dir.path().join("v.sock"));
    let restored = restore(dir.path(), "restored", &snapshot, &mem);
    assert_vsock_guest_goes_on(&restored, last);
}

/// A restored guest that waits for its vsock device's interrupt, as a kernel's driver does,
/// gets the transport reset's: the device raises it as it is restored, which is after the
/// VM's irqchips and the vCPUs' APICs are (raised before, it was lost, and the guest heard of
/// the reset only at the device's next interrupt).
#[test]
fn a_restored_vsock_guest_gets_the_transport_resets_interrupt() {
    if !require_kvm("a_restored_vsock_guest_gets_the_transport_resets_interrupt") {
        return;
    }
    let dir = ScratchDir::new("snapshot-vsock-irq");
    let vsock = json!({"guest_cid": 3, "uds_path": dir.path().join("v.sock")});
    let (snapshot, mem, _, console) =
        snapshot_device_guest(dir.path(), "virtio_vsock_irq", ("/vsock", vsock), "tick");
    assert!(!console.contains("transport reset"), "{console:?}");
    let restored = restore(dir.path(), "restored", &snapshot, &mem);
    let console = restored.wait_for_stamps("tick", 5);
    assert!(
        console.contains("transport reset by interrupt: id=0\n"),
        "the guest gets the reset's interrupt: {console:?}"
    );
}

/// A host connection made as soon as the load answers reaches the restored guest only once
/// it has taken the transport reset (handed the event buffer back, a tick after it saw the
/// reset): reaching it before, the connection would be reset with the ones the snapshot held.
#[test]
fn a_host_connection_reaches_a_restored_vsock_guest_after_it_took_the_transport_reset() {
    if !require_kvm(
        "a_host_connection_reaches_a_restored_vsock_guest_after_it_took_the_transport_reset",
    ) {
        return;
    }
    let dir = ScratchDir::new("snapshot-vsock-held");
    let socket = dir.path().join("v.sock");
    let (snapshot, mem, _) = snapshot_vsock_guest(dir.path(), &socket);
    let restored = restore(dir.path(), "restored", &snapshot, &mem);
    let mut host = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let console = loop {
        let console = restored.console();
        if console.contains("rx: op=1 port=52\n") {
            break console;
        }
        assert!(
            Instant::now() < deadline,
            "the host's REQUEST never reached the guest: {console:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let taken = console
        .find("reset taken\n")
        .expect("the guest took the reset");
    assert!(
        console.find("rx: ").unwrap() > taken,
        "no packet reaches the guest before it took the transport reset: {console:?}"
    );
}

#[test]
fn a_vsock_guest_restored_with_vsock_override_listens_on_the_new_path() {
    if !require_kvm("a_vsock_guest_restored_with_vsock_override_listens_on_the_new_path") {
        return;
    }
    let dir = ScratchDir::new("snapshot-vsock-override");
    let (saved, new) = (dir.path().join("saved.sock"), dir.path().join("new.sock"));
    let (snapshot, mem, last) = snapshot_vsock_guest(dir.path(), &saved);
    // The source VMM was killed with its socket file left behind: remove it, so a restore
    // that bound the saved path again would show.
    std::fs::remove_file(&saved).unwrap();

    let restored = restore_with(
        dir.path(),
        "restored",
        &snapshot,
        &mem,
        json!({"vsock_override": {"uds_path": new}}),
    );
    assert_vsock_guest_goes_on(&restored, last);
    std::os::unix::net::UnixStream::connect(&new)
        .expect("the restored VMM listens on the new path");
    assert!(!saved.exists(), "the saved path is not bound again");
    let (_, config) = restored.call("GET", "/vm/config", Value::Null);
    assert_eq!(config["vsock"]["uds_path"], json!(new));
}

/// Snapshots the virtio-net guest with interface eth0 on `tap`, in `dir`. Returns
/// (snapshot, memory file, the last tick before the pause).
fn snapshot_net_guest(dir: &Path, tap: &TestTap) -> (PathBuf, PathBuf, u64) {
    let iface =
        json!({"iface_id": "eth0", "host_dev_name": tap.name, "guest_mac": "06:00:AC:10:00:02"});
    let (snapshot, mem, last, _) = snapshot_device_guest(
        dir,
        "virtio_net_snap",
        ("/network-interfaces/eth0", iface),
        "tick",
    );
    (snapshot, mem, last)
}

/// Writes a frame for the guest into tap `tap_name` until the restored guest prints it, then
/// checks that it ticks on after tick `last`.
fn assert_net_guest_receives_through(restored: &Vmm, tap_name: &str, last: u64) {
    let packets = PacketSocket::open(tap_name);
    let mut frame = vec![6, 0, 0xac, 0x10, 0, 2, 2, 0, 0, 0, 0, 1];
    frame.extend_from_slice(&0x88b5u16.to_be_bytes());
    frame.extend_from_slice(b"hello after the restore");
    let deadline = Instant::now() + Duration::from_secs(60);
    // Sent until seen: frames written before the restored VMM opened the tap are dropped.
    while !restored.console().contains("rx: hello after the restore\n") {
        assert!(
            Instant::now() < deadline,
            "the frame never reached the restored guest through {tap_name}: {:?}",
            restored.console()
        );
        packets.send(&frame);
        std::thread::sleep(Duration::from_millis(200));
    }
    let console = restored.wait_for_stamps("tick", 1);
    assert!(stamps(&console, "tick")[0] > last, "{console:?}");
}

#[test]
fn a_restored_net_guest_receives_through_the_reopened_tap() {
    let test = "a_restored_net_guest_receives_through_the_reopened_tap";
    if !require_kvm(test) {
        return;
    }
    let Some(tap) = TestTap::create(test, "s") else {
        return;
    };
    let dir = ScratchDir::new("snapshot-net");
    let (snapshot, mem, last) = snapshot_net_guest(dir.path(), &tap);
    let restored = restore(dir.path(), "restored", &snapshot, &mem);
    assert_net_guest_receives_through(&restored, &tap.name, last);
}

#[test]
fn a_net_guest_restored_with_network_overrides_receives_through_the_new_tap() {
    let test = "a_net_guest_restored_with_network_overrides_receives_through_the_new_tap";
    if !require_kvm(test) {
        return;
    }
    let (Some(saved), Some(new)) = (TestTap::create(test, "a"), TestTap::create(test, "b")) else {
        return;
    };
    let dir = ScratchDir::new("snapshot-net-override");
    let (snapshot, mem, last) = snapshot_net_guest(dir.path(), &saved);
    let saved_name = saved.name.clone();
    // Opening a missing tap as root creates it: with the saved one gone, a restore that
    // reopened it would show.
    drop(saved);

    let mut refuser = Vmm::start(dir.path(), "refuser");
    assert_load_refused(
        &mut refuser,
        load_request(
            &snapshot,
            &mem,
            json!({"network_overrides": [{"iface_id": "eth1", "host_dev_name": new.name}]}),
        ),
        "no network interface \"eth1\" (its interfaces: [eth0])",
    );
    let restored = restore_with(
        dir.path(),
        "restored",
        &snapshot,
        &mem,
        json!({"network_overrides": [{"iface_id": "eth0", "host_dev_name": new.name}]}),
    );
    assert_net_guest_receives_through(&restored, &new.name, last);
    assert!(
        !Path::new("/sys/class/net").join(&saved_name).exists(),
        "the saved tap {saved_name} is not opened again"
    );
    let (_, config) = restored.call("GET", "/vm/config", Value::Null);
    assert_eq!(
        config["network-interfaces"][0]["host_dev_name"],
        json!(new.name)
    );
}
