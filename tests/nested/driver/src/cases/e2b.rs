//! The official `e2b` Python SDK against an mvmd of the vm tier. L1 has no Python, so the SDK
//! runs on L0: this case starts mvmd (default tier `vm`, a TCP listener), prints
//! `nested: E2B-READY <api port> <verdict port> <token>`, and run.sh, which watches the console,
//! runs `tests/nested/e2b_smoke.py` against it (create, commands.run with a stdout callback,
//! CommandExitException, files write/read/list, pause — mvmd saves the VM to disk — and
//! connect, a snapshot taken and a sandbox made from it, a sandbox whose lifecycle saves it at
//! its timeout resumed by a command, kill) and sends the smoke's verdict back to the verdict
//! port. In nested mode both
//! ports are on L1's user-mode NIC (10.0.2.15), forwarded by QEMU from the same ports of L0's
//! 127.0.0.1 (`--l0-ports`); in direct mode they are free ports of 127.0.0.1. The case fails
//! when the smoke fails, when no verdict comes (run.sh did not run it), when the sandbox was
//! not a micro-VM (its `uname -r` is not the guest kernel's), when the sandbox paused at its
//! timeout was not saved (mvmd's log), or when anything is left behind (sandboxes, the
//! deleted snapshot's files).

use std::io::{ErrorKind, Read};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use mvm_testkit::ports::free_local_port;

use super::{ip, load_on_demand_modules, Ctx, ManagerDirs, Mode, MvmdSession, Outcome, Verdict};

/// L1's address on QEMU's user-mode network (QEMU forwards L0's ports to it).
const L1_NIC_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
/// From the ready line to the smoke's verdict: Python start-up on a busy L0, two vm-tier
/// creates, a 30 s sandbox timeout and a handful of calls, each slow under QEMU TCG.
const VERDICT_TIMEOUT: Duration = Duration::from_secs(420);
/// Most bytes of a verdict read (a few lines).
const VERDICT_LIMIT: u64 = 64 << 10;
/// Reading the verdict once the smoke has connected.
const VERDICT_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// The SDK smoke through mvmd's `/e2b` in the vm tier, judged by its verdict.
pub fn e2b_sdk_vm_tier(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let nic = match ctx.mode {
        Mode::Nested => Some(L1Nic::up()?),
        Mode::Direct => None,
    };
    let (addr, api_port, verdict_port) = match (&nic, ctx.l0_ports.as_slice()) {
        (Some(_), &[api, verdict]) => (L1_NIC_ADDR, api, verdict),
        (Some(_), ports) => {
            return Err(format!(
                "--l0-ports should name the two ports QEMU forwards to L1 (run.sh passes them), \
                 got {ports:?}"
            ))
        }
        (None, _) => (Ipv4Addr::LOCALHOST, 0, 0),
    };
    let verdict = TcpListener::bind((addr, verdict_port))
        .map_err(|e| format!("listening for the verdict on {addr}:{verdict_port}: {e}"))?;
    let verdict_port = verdict.local_addr().map_err(|e| e.to_string())?.port();
    let api_port = if api_port == 0 {
        free_local_port()
    } else {
        api_port
    };
    let mut dirs = ManagerDirs::new(ctx, "e2b")?;
    let api = SocketAddr::from((addr, api_port));
    dirs.mvmd_args = vec![
        "--tcp".into(),
        api.to_string(),
        "--isolation".into(),
        "vm".into(),
    ];
    let session = MvmdSession::start_in(ctx, dirs)?;
    let checked = (|| {
        let token = session.token()?;
        println!("nested: E2B-READY {api_port} {verdict_port} {token}");
        let report = await_verdict(&verdict)?;
        let figure = judge(&report, &ctx.release)?;
        // Its lifecycle's pause at the timeout is a save in the vm tier.
        let auto = reported(&report, "auto-saved").unwrap_or_default();
        let log = session.log();
        if auto.is_empty()
            || !log
                .lines()
                .any(|l| l.contains("sandbox saved") && l.contains(auto))
        {
            return Err(format!(
                "the sandbox paused at its timeout ({auto:?}) was not saved to disk (no \
                 \"sandbox saved\" line for it in mvmd's log)"
            ));
        }
        let figure = (
            figure,
            ["auto-resume-ms", "snapshot-create-ms", "from-snapshot-ms"]
                .map(|fact| reported(&report, fact).unwrap_or_default().to_owned()),
        );
        let left = session.list(ctx)?;
        if !left.is_empty() {
            return Err(format!(
                "the SDK's kill left sandboxes listed: {}",
                serde_json::Value::Array(left)
            ));
        }
        // The deleted snapshot's files, and the links its create restored.
        let state = session.dirs.root.join("state");
        let kept = dir_names(&state.join("sandbox-snapshots"));
        let links: Vec<String> = dir_names(&state.join("saves"))
            .into_iter()
            .filter(|n| n.ends_with(".use"))
            .collect();
        if !kept.is_empty() || !links.is_empty() {
            return Err(format!(
                "the deleted snapshot left files: {kept:?} in sandbox-snapshots, {links:?} \
                 in saves"
            ));
        }
        Ok(figure)
    })();
    let (checked, figure) = match checked {
        Ok(figure) => (Ok(()), Some(figure)),
        Err(why) => (Err(why), None),
    };
    let outcome = session.finish(ctx, checked);
    drop(nic);
    if let (Ok(_), Some((ms, [resumed, snapshot, from_snapshot]))) = (&outcome, figure) {
        ctx.record(
            "vm tier via the e2b Python SDK on L0: Sandbox.create -> first commands.run stdout",
            format!("{ms} ms"),
        );
        ctx.record(
            "vm tier via the e2b Python SDK on L0: commands.run on a sandbox saved at its \
             timeout (lifecycle pause, auto_resume) -> its output",
            format!("{resumed} ms"),
        );
        ctx.record(
            "vm tier via the e2b Python SDK on L0: create_snapshot of a running sandbox",
            format!("{snapshot} ms"),
        );
        ctx.record(
            "vm tier via the e2b Python SDK on L0: Sandbox.create(snapshot) -> first \
             commands.run output",
            format!("{from_snapshot} ms"),
        );
    }
    outcome
}

/// The names in directory `dir` (none if it is missing).
fn dir_names(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits for the smoke to connect to `listener` and returns what it sent.
fn await_verdict(listener: &TcpListener) -> Result<String, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("verdict listener: {e}"))?;
    let deadline = Instant::now() + VERDICT_TIMEOUT;
    let stream: TcpStream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                return Err(format!(
                    "no verdict from the e2b SDK smoke within {} s of E2B-READY: it runs on L0, \
                     started by tests/nested/run.sh when it sees that line (see \
                     target/nested/e2b-smoke.log)",
                    VERDICT_TIMEOUT.as_secs()
                ))
            }
            Err(e) => return Err(format!("accepting the verdict: {e}")),
        }
    };
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(VERDICT_READ_TIMEOUT)))
        .map_err(|e| format!("verdict stream: {e}"))?;
    let mut report = String::new();
    stream
        .take(VERDICT_LIMIT)
        .read_to_string(&mut report)
        .map_err(|e| format!("reading the verdict: {e} (got {report:?})"))?;
    Ok(report)
}

/// The value of the smoke's report line `key value`.
fn reported<'a>(report: &'a str, key: &str) -> Option<&'a str> {
    report
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
}

/// Checks the smoke's report; returns its create → first output figure (ms).
fn judge(report: &str, guest_release: &str) -> Result<String, String> {
    let value = |key: &str| reported(report, key);
    let steps: Vec<&str> = report
        .lines()
        .filter_map(|l| l.strip_prefix("step "))
        .collect();
    if value("verdict") != Some("pass") {
        let why = if steps.is_empty() {
            report.trim().to_owned()
        } else {
            steps.join("; ")
        };
        return Err(format!("the e2b SDK smoke failed: {why}"));
    }
    let kernel = value("guest-kernel").unwrap_or_default();
    if kernel != guest_release {
        return Err(format!(
            "the SDK's sandbox ran kernel {kernel:?}, not the micro-VM kernel {guest_release:?}: \
             not the vm tier"
        ));
    }
    value("first-output-ms")
        .filter(|ms| ms.parse::<u64>().is_ok())
        .map(str::to_owned)
        .ok_or_else(|| format!("the smoke's report has no first-output-ms: {report:?}"))
}

/// L1's virtio-net interface on QEMU's user-mode network, up as 10.0.2.15/24 while it lives
/// (run.sh only unpacks its driver: the other cases run without it); down and without its
/// address again on drop.
struct L1Nic(String);

impl L1Nic {
    fn up() -> Result<Self, String> {
        load_on_demand_modules("net")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let name = loop {
            if let Some(name) = virtio_net_interface() {
                break name;
            }
            if Instant::now() > deadline {
                return Err(
                    "no virtio_net interface in L1 10 s after loading virtio-net: \
                            does run.sh give QEMU `-device virtio-net-pci`?"
                        .into(),
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let nic = L1Nic(name);
        ip(&format!("addr add {L1_NIC_ADDR}/24 dev {}", nic.0))?;
        ip(&format!("link set {} up", nic.0))?;
        Ok(nic)
    }
}

impl Drop for L1Nic {
    fn drop(&mut self) {
        for args in [
            format!("addr flush dev {}", self.0),
            format!("link set {} down", self.0),
        ] {
            if let Err(why) = ip(&args) {
                println!("nested: INFO restoring L1's NIC: {why}");
            }
        }
    }
}

/// The name of the network interface whose driver is virtio_net.
fn virtio_net_interface() -> Option<String> {
    std::fs::read_dir("/sys/class/net")
        .ok()?
        .flatten()
        .find(|e| {
            std::fs::read_link(e.path().join("device/driver"))
                .ok()
                .and_then(|d| d.file_name().map(|n| n == "virtio_net"))
                .unwrap_or(false)
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
}
