//! The sandbox manager on a cgroup v2 host (L1 mounts only cgroup2, as a fresh Debian 12
//! does): a vm-tier sandbox made through mvmd gets its limits in the v2 files and its usage
//! read from them; a jail-tier container's pause and resume (containerd, the shim) freeze and
//! thaw its cgroup through `cgroup.freeze`; teardown leaves no cgroup behind.

use std::path::{Path, PathBuf};

use super::containerd::{self, tail};
use super::{sandbox_id, Ctx, MvmdSession, Outcome, Verdict};

/// Mount point of cgroup2 in L1 (tests/nested/l1-init.sh).
const ROOT: &str = "/sys/fs/cgroup";
/// The manager's pids limit of every sandbox.
const PIDS_MAX: &str = "4096";
/// CFS period the manager gives new sandboxes, µs.
const PERIOD_US: u64 = 100_000;
/// What the manager adds to a vm-tier sandbox's memory for the VMM itself, MiB.
const VMM_OVERHEAD_MIB: u64 = 128;

/// One cgroup file's contents, trimmed.
fn read(dir: &Path, file: &str) -> Result<String, String> {
    std::fs::read_to_string(dir.join(file))
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("cannot read {}: {e}", dir.join(file).display()))
}

/// Fails unless `dir/file` holds `want`.
fn expect_file(dir: &Path, file: &str, want: &str) -> Result<(), String> {
    match read(dir, file)? {
        got if got == want => Ok(()),
        got => Err(format!(
            "{} holds {got:?}, expected {want:?}",
            dir.join(file).display()
        )),
    }
}

/// Fails unless the value of `key` in the flat-keyed file `dir/file` is `want`.
fn expect_key(dir: &Path, file: &str, key: &str, want: &str) -> Result<(), String> {
    let text = read(dir, file)?;
    let got = text
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '));
    if got == Some(want) {
        Ok(())
    } else {
        Err(format!(
            "{} says {key} {got:?}, expected {want:?}: {text:?}",
            dir.join(file).display()
        ))
    }
}

/// The sandbox cgroups below `parent`.
fn children(parent: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect()
}

/// mvmd makes a vm-tier sandbox (`--cpus 2 --memory 96`) on cgroup v2: its cgroup
/// `<root>/<parent>/<id>` holds the VMM, `memory.max` = guest memory + the VMM's 128 MiB,
/// `memory.swap.max` 0, `cpu.max` two periods per period, `pids.max` 4096, the parent chain
/// has the controllers enabled; `mvm stats` reads the usage from the v2 files; `mvm rm`
/// removes the cgroup. Then a jail-tier container of containerd (the mvm shim): its cgroup
/// has the OCI memory limit, `ctr task pause` freezes it (`cgroup.freeze` 1, `cgroup.events`
/// frozen 1), `ctr task resume` thaws it, and nothing is left after it is removed.
pub fn cgroup_v2_limits(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("the sandbox manager needs root".into()));
    }
    let root = Path::new(ROOT);
    if !root.join("cgroup.controllers").is_file() {
        return Ok(Verdict::Skip(format!(
            "{ROOT} is not a cgroup2 mount (this host has cgroup v1; the nested L1 runs this \
             test on v2)"
        )));
    }
    vm_tier_sandbox(ctx, root)?;
    jail_tier_freezer(ctx, root)?;
    Ok(Verdict::Pass)
}

fn vm_tier_sandbox(ctx: &Ctx, root: &Path) -> Result<(), String> {
    const VCPUS: u64 = 2;
    const MEMORY_MIB: u64 = 96;
    let session = MvmdSession::start(ctx, "cgv2")?;
    let parent = root.join(&session.dirs.cgroup_parent);
    let checked = (|| {
        let sandbox = session.create_vm(
            ctx,
            &[
                "--cpus",
                &VCPUS.to_string(),
                "--memory",
                &MEMORY_MIB.to_string(),
            ],
        )?;
        let id = sandbox_id(&sandbox);
        let dir = parent.join(&id);
        expect_file(
            &dir,
            "memory.max",
            &((MEMORY_MIB + VMM_OVERHEAD_MIB) << 20).to_string(),
        )?;
        if dir.join("memory.swap.max").exists() {
            expect_file(&dir, "memory.swap.max", "0")?;
        }
        expect_file(
            &dir,
            "cpu.max",
            &format!("{} {PERIOD_US}", VCPUS * PERIOD_US),
        )?;
        expect_file(&dir, "pids.max", PIDS_MAX)?;
        for enabled in [root, parent.as_path()] {
            let control = read(enabled, "cgroup.subtree_control")?;
            for c in ["cpu", "memory", "pids"] {
                if !control.split_whitespace().any(|e| e == c) {
                    return Err(format!(
                        "{}/cgroup.subtree_control is {control:?}, without {c}",
                        enabled.display()
                    ));
                }
            }
        }
        let procs = read(&dir, "cgroup.procs")?;
        let vmm = procs.lines().find(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "mvm-vmm")
        });
        let Some(vmm) = vmm else {
            return Err(format!(
                "{}/cgroup.procs ({procs:?}) holds no mvm-vmm process",
                dir.display()
            ));
        };
        let membership = std::fs::read_to_string(format!("/proc/{vmm}/cgroup"))
            .map_err(|e| format!("cannot read /proc/{vmm}/cgroup: {e}"))?;
        let want = format!("0::/{}/{id}", session.dirs.cgroup_parent);
        if membership.trim() != want {
            return Err(format!(
                "mvm-vmm ({vmm}) is in {:?}, expected {want:?}",
                membership.trim()
            ));
        }
        let out = session.mvm(ctx, &["-o", "json", "stats", &id], None)?;
        let stats: serde_json::Value = serde_json::from_str(&out)
            .map_err(|e| format!("mvm -o json stats printed no JSON ({e}): {out:?}"))?;
        let stat = |key: &str| stats[0][key].as_u64().unwrap_or(0);
        if stat("cpu_ns") == 0 || stat("memory_bytes") < 1 << 20 || stat("pids") == 0 {
            return Err(format!(
                "mvm stats of a running vm sandbox shows no usage from cpu.stat, \
                 memory.current and pids.current: {out}"
            ));
        }
        println!(
            "nested: INFO cgroup v2 vm sandbox {id}: memory.max {}, cpu.max {:?}, usage {}",
            read(&dir, "memory.max")?,
            read(&dir, "cpu.max")?,
            out.trim()
        );
        session.mvm(ctx, &["rm", &id], None)?;
        if dir.exists() {
            return Err(format!("{} is left after mvm rm", dir.display()));
        }
        Ok(())
    })();
    match session.finish(ctx, checked)? {
        Verdict::Pass => Ok(()),
        Verdict::Skip(why) => Err(format!("unexpected skip: {why}")),
    }
}

fn jail_tier_freezer(ctx: &Ctx, root: &Path) -> Result<(), String> {
    const MEMORY: u64 = 64 << 20;
    let cd = containerd::start(ctx, "cgv2")?;
    let parent = root.join(cd.cgroup_parent());
    let memory = MEMORY.to_string();
    let out = cd.run_detached(
        "cgv2-jail",
        &[
            "--annotation",
            "io.mvm.isolation=jail",
            "--memory-limit",
            &memory,
        ],
        &["sleep", "600"],
    );
    if !out.status.success() {
        return Err(format!(
            "ctr run -d (jail tier) ... sleep 600: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let checked = (|| {
        cd.wait_status("cgv2-jail", "RUNNING")?;
        let dir = match children(&parent).as_slice() {
            [one] => one.clone(),
            other => {
                return Err(format!(
                    "{} holds {other:?}, expected the cgroup of one sandbox",
                    parent.display()
                ))
            }
        };
        expect_file(&dir, "memory.max", &memory)?;
        expect_file(&dir, "pids.max", PIDS_MAX)?;
        if read(&dir, "cgroup.procs")?.is_empty() {
            return Err(format!("{}/cgroup.procs is empty", dir.display()));
        }
        for (verb, status, freeze) in [("pause", "PAUSED", "1"), ("resume", "RUNNING", "0")] {
            let out = cd.ctr(&["task", verb, "cgv2-jail"]);
            if !out.status.success() {
                return Err(format!(
                    "ctr task {verb}: {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            cd.wait_status("cgv2-jail", status)?;
            expect_file(&dir, "cgroup.freeze", freeze)?;
            expect_key(&dir, "cgroup.events", "frozen", freeze)?;
        }
        cd.stop_and_remove("cgv2-jail", None)?;
        if dir.exists() {
            return Err(format!(
                "{} is left after the container's removal",
                dir.display()
            ));
        }
        Ok(())
    })();
    let mut left = cd.leftovers(&["cgv2-jail"]);
    left.extend(
        children(&parent)
            .iter()
            .map(|c| format!("cgroup {}", c.display())),
    );
    match (checked, left.is_empty()) {
        (Ok(()), true) => Ok(()),
        (Ok(()), false) => Err(format!("left behind: {}", left.join(", "))),
        (Err(why), true) => Err(format!(
            "{why}; containerd's log ends: {}",
            tail(&cd.log(), 2000)
        )),
        (Err(why), false) => Err(format!("{why}; and left behind: {}", left.join(", "))),
    }
}
