//! The containerd shim's vm tier: Debian's containerd, started inside L1 with its own
//! directories, runs containers of an OCI image through `containerd-shim-mvm-v2`, each in a
//! micro-VM whose root file system is the container's own; a pod's containers in one, and a
//! container in its pod's network namespace.

use std::path::Path;
use std::time::Instant;

pub(super) use mvm_testkit::containerd::tail;
use mvm_testkit::containerd::{Containerd, ContainerdOptions, PodNetwork};
use mvm_testkit::cri::{run_pod, Cri};
use mvm_testkit::text;

use super::{load_on_demand_modules, ms, Ctx, Outcome, Verdict};

/// A file L1 binds into a container, as Kubernetes does /etc/hosts.
const HOSTS: &str = "10.0.0.1 pod\n";
/// What the test image's /etc/passwd holds (the template's rootfs has another).
const IMAGE_PASSWD: &str = "root:x:0:0:root:/root:/bin/sh";

/// A containerd of the test's own (`name`) whose shims run the assets' binaries and template.
pub(super) fn start(ctx: &Ctx, name: &str) -> Result<Containerd, String> {
    let bin_dir = ctx.vmm.parent().unwrap_or(Path::new("/"));
    let artifacts = ctx.vmlinux.parent().unwrap_or(Path::new("/"));
    Containerd::start(ContainerdOptions {
        name,
        bin_dir,
        busybox: Path::new("/bin/busybox"),
        // Copies instead of overlay mounts: L1 has no overlay module, the vm tier copies the
        // root into the guest's disk anyway, and the jail tier binds the snapshot's directory.
        snapshotter: Some("native"),
        env: vec![("MVM_ARTIFACTS".into(), artifacts.display().to_string())],
        cri_subnet: None,
    })
}

/// `ctr run --rm` in the vm tier (the default): the command runs in the guest kernel, on the
/// container's file system, and its exit status comes back; `ctr task exec` into a running
/// container, `ctr task kill`, then nothing is left.
pub fn shim_vm_tier(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("containerd needs root".into()));
    }
    let started = Instant::now();
    let cd = start(ctx, "vm")?;
    ctx.record("containerd start + image import", ms(started.elapsed()));

    // A bind mount of the spec (as Kubernetes' /etc/hosts is) is copied into the guest.
    let hosts = Path::new("/tmp/mvm-pod-hosts");
    std::fs::write(hosts, HOSTS).map_err(|e| format!("writing {}: {e}", hosts.display()))?;
    let mount = format!(
        "type=bind,src={},dst=/etc/pod-hosts,options=rbind:ro",
        hosts.display()
    );
    let started = Instant::now();
    let out = cd.run(
        "vm-run",
        &["--mount", &mount],
        &[
            "sh",
            "-c",
            "uname -r; cat /etc/passwd /etc/pod-hosts; exit 7",
        ],
    );
    ctx.record(
        "ctr run --rm (vm tier, default): start -> exit",
        ms(started.elapsed()),
    );
    let expected = format!("{}\n{IMAGE_PASSWD}\n{HOSTS}", ctx.release);
    if out.status.code() != Some(7) || text(&out.stdout) != expected {
        return Err(format!(
            "ctr run --rm ... sh -c 'uname -r; cat /etc/passwd /etc/pod-hosts; exit 7': {}, stdout {:?} \
             (expected exit 7 and {expected:?}), stderr: {}; containerd's log ends: {}",
            out.status,
            text(&out.stdout),
            text(&out.stderr).trim(),
            tail(&cd.log(), 3000)
        ));
    }

    let out = cd.run_detached("vm-exec", &[], &["sleep", "600"]);
    if !out.status.success() {
        return Err(format!(
            "ctr run -d ... sleep 600: {}: {}; containerd's log ends: {}",
            out.status,
            text(&out.stderr).trim(),
            tail(&cd.log(), 3000)
        ));
    }
    cd.wait_status("vm-exec", "RUNNING")?;
    let out = cd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "e1",
        "vm-exec",
        "sh",
        "-c",
        "echo exec-ok; exit 3",
    ]);
    if out.status.code() != Some(3) || text(&out.stdout) != "exec-ok\n" {
        return Err(format!(
            "ctr task exec: {}, stdout {:?} (expected exit 3 and \"exec-ok\\n\"), stderr: {}",
            out.status,
            text(&out.stdout),
            text(&out.stderr).trim()
        ));
    }
    cd.stop_and_remove("vm-exec", None)?;

    // A pod: both containers in one micro-VM (one kernel boot id, not L1's), each on its own
    // root, one shim.
    let started = Instant::now();
    let pod = cd.run_pod("vm-pod", &[])?;
    ctx.record(
        "two-container pod (vm tier): run, exec, remove",
        ms(started.elapsed()),
    );
    let l1_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_err(|e| format!("L1's boot id: {e}"))?;
    let (first, second) = &pod.boot_ids;
    if first != second || first == "none" || first == l1_boot.trim() {
        return Err(format!(
            "the pod's containers should share one guest kernel other than L1's: boot ids \
             {first:?} and {second:?}, L1 {:?}",
            l1_boot.trim()
        ));
    }
    // The pod's network namespace as CNI leaves it: the guest takes over its eth0 (address
    // and MAC, frames redirected through the VM's tap) and reaches the host side; after, the
    // namespace holds only its own interfaces again.
    load_on_demand_modules("tc")?;
    let net = PodNetwork::create("vm", 42)?;
    let started = Instant::now();
    cd.run_in_pod_network("vm-podnet", &[], &net)?;
    ctx.record(
        "ctr run --rm in a pod network (vm tier)",
        ms(started.elapsed()),
    );
    drop(net);
    let left = cd.leftovers(&["vm-run", "vm-exec", "vm-pod", "vm-pod-c1", "vm-podnet"]);
    if !left.is_empty() {
        return Err(format!(
            "left behind: {}; containerd's log ends: {}",
            left.join(", "),
            tail(&cd.log(), 2000)
        ));
    }
    Ok(Verdict::Pass)
}

/// Kubernetes' path in the vm tier: containerd's CRI plugin (runtime handler `mvm`, a CNI ptp
/// pod network) runs a pod as kubelet does, through the CRI gRPC API
/// (`mvm_testkit::cri::run_pod`): both containers in one micro-VM (one guest kernel boot id,
/// not L1's) with the pod's address, ExecSync, the CRI log file, ContainerStats, kubelet's
/// teardown, and nothing left.
pub fn cri_vm_tier(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("containerd needs root".into()));
    }
    load_on_demand_modules("tc")?;
    let bin_dir = ctx.vmm.parent().unwrap_or(Path::new("/"));
    let artifacts = ctx.vmlinux.parent().unwrap_or(Path::new("/"));
    let started = Instant::now();
    let cd = Containerd::start(ContainerdOptions {
        name: "cri",
        bin_dir,
        busybox: Path::new("/bin/busybox"),
        snapshotter: Some("native"),
        env: vec![("MVM_ARTIFACTS".into(), artifacts.display().to_string())],
        cri_subnet: Some(42),
    })?;
    let cri = Cri::connect(&cd.socket())?;
    cri.wait_ready()
        .map_err(|e| format!("{e}; containerd's log ends: {}", tail(&cd.log(), 3000)))?;
    ctx.record(
        "containerd (CRI) start + image import",
        ms(started.elapsed()),
    );
    let run = run_pod(&cd, &cri, "cri-vm", "vm")?;
    ctx.record(
        "CRI pod (vm tier): RunPodSandbox -> 2 containers running",
        ms(run.start),
    );
    ctx.record(
        "CRI pod (vm tier): StopContainer x2 ... RemovePodSandbox",
        ms(run.teardown),
    );
    let l1_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_err(|e| format!("L1's boot id: {e}"))?;
    let (first, second) = &run.boot_ids;
    if first != second || first == l1_boot.trim() {
        return Err(format!(
            "the CRI pod's containers should share one guest kernel other than L1's: boot ids \
             {first:?} and {second:?}, L1 {:?}",
            l1_boot.trim()
        ));
    }
    Ok(Verdict::Pass)
}
