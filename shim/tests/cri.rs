//! Kubernetes' own path to the shim: containerd's CRI plugin (Debian's containerd) with the
//! runtime handler `mvm`, driven over the CRI gRPC API as kubelet drives it, a pod network from
//! CNI's plugins. crictl is not used: building it needs Go's module proxy, and Debian's Go is
//! too old for it; the test is a CRI client itself (`mvm_testkit::cri`).

use std::path::Path;

use mvm_testkit::containerd::{Containerd, ContainerdOptions};
use mvm_testkit::cri::{run_pod, Cri};
use mvm_testkit::{bin_dir, root_or_skip};

/// Root, containerd, busybox-static and the CNI plugins present; else says why (failing in
/// CI) and returns false.
fn can_run(test: &str) -> bool {
    if !root_or_skip(test) {
        return false;
    }
    let missing = [
        ("/usr/bin/containerd", "containerd"),
        ("/usr/bin/ctr", "containerd"),
        ("/bin/busybox", "busybox-static"),
        ("/usr/lib/cni/ptp", "containernetworking-plugins"),
        ("/usr/lib/cni/host-local", "containernetworking-plugins"),
        ("/usr/lib/cni/loopback", "containernetworking-plugins"),
    ]
    .into_iter()
    .find(|(path, _)| !Path::new(path).is_file());
    if let Some((path, package)) = missing {
        mvm_testkit::skip_or_fail_in_ci(
            test,
            &format!("{path} is missing (apt-get install {package}; scripts/deps.sh)"),
        );
        return false;
    }
    mvm_testkit::build_jailer_and_agent();
    true
}

/// A jail-tier pod through CRI, as kubelet runs it (see `mvm_testkit::cri::run_pod`): two
/// containers in the pod's CNI network, ExecSync, the CRI log file, ContainerStats, kubelet's
/// teardown, and nothing left after.
#[test]
fn a_pod_through_cri_in_the_jail_tier() {
    if !can_run("a_pod_through_cri_in_the_jail_tier") {
        return;
    }
    let cd = Containerd::start(ContainerdOptions {
        name: "cri",
        bin_dir: &bin_dir(),
        busybox: Path::new("/bin/busybox"),
        snapshotter: None,
        env: Vec::new(),
        cri_subnet: Some(41),
    })
    .unwrap_or_else(|e| panic!("{e}"));
    let cri = Cri::connect(&cd.socket()).unwrap_or_else(|e| panic!("{e}"));
    cri.wait_ready()
        .unwrap_or_else(|e| panic!("{e}; containerd's log:\n{}", cd.log()));
    let run = run_pod(&cd, &cri, "cri-jail", "jail").unwrap_or_else(|e| panic!("{e}"));
    eprintln!(
        "CRI pod (jail tier): address {}, RunPodSandbox -> both containers running {:?}, \
         kubelet's teardown {:?}, stats {:?}; the first container's log:\n{}",
        run.ip, run.start, run.teardown, run.stats, run.log
    );
}
