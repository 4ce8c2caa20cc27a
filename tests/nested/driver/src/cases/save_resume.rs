//! A vm-tier sandbox saved to disk and resumed (`mvm pause --save`, `mvm resume`; E2B's
//! pause), across a restart of mvmd and what a restart of the host takes.

use std::time::{Duration, Instant};

use super::snapshots::{
    busy_sandbox, checked_self_report, checked_with_internet, counted, Report, CHILD_REPORT, NET,
    SELF_REPORT,
};
use super::{ms, sandbox_id, vmm_kib, Ctx, ManagerDirs, MvmdSession, Outcome, Verdict};

/// The guest's machine id, or that it has none (a cold-booted guest has none; a restored
/// copy is given one).
const MACHINE_ID: &str = "cat /etc/machine-id 2>/dev/null || echo none";

/// A busy vm-tier sandbox with a network (a shell counting into /tmp/state with a variable
/// set, another writing and syncing files on its disk) is saved with `mvm pause --save`: its
/// state is `saved`, its VMM is gone (its memory the host's again), its memory file on disk
/// holds only what the guest used, its writable layer lies with it (not in the run
/// directory), `mvm logs` still shows its console, and an exec in it is refused with what to
/// do. mvmd is
/// restarted and keeps it saved. `mvm resume` 2 s later brings the same machine back: the
/// counter goes on from past its value before the save with the same variable, the file
/// written before is there, its host name, MAC, machine id and address are its own as before,
/// its clock is L1's (within 1 s), its kernel logged no disk error and a file written and
/// synced now reads back, it reaches a listener beyond L1 through its network, and its
/// console goes on from what it held. While it is saved, its tenant's memory quota, lowered to
/// its size, takes another sandbox and refuses its resume; it forks, saved, and again paused,
/// and stays so, its child going on from it; a snapshot of it, saved (`mvm snapshot`), outlives
/// a restart of mvmd and makes a sandbox that goes on from it (`mvm run --snapshot`), then is
/// deleted with its files (`mvm snapshots rm`). Saved a second time, it loses what a restart of the
/// host takes (mvmd, its network namespace, its run directory): resumed, it has its files,
/// its host name, MAC and address, the clock, and reaches the listener through a network
/// made again. Records the save's and the resume's times against the cold create.
pub fn save_and_resume(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let mut dirs = ManagerDirs::new(ctx, "save")?;
    dirs.env
        .push(("RUST_LOG".into(), "info,mvm_sandbox::manager=debug".into()));
    let (outcome, figures) = checked_with_internet(ctx, dirs, check)?;
    if let (Ok(Verdict::Pass), Some(f)) = (&outcome, figures) {
        ctx.record(
            "vm tier via mvmd: cold create of the saved sandbox",
            ms(f.cold),
        );
        ctx.record(
            "vm tier via mvmd: mvm pause --save of the busy sandbox (its VMM holding), its memory file on disk",
            format!(
                "{} ({} MiB), {} MiB",
                ms(f.saved),
                f.held_kib / 1024,
                f.memory_file_kib / 1024
            ),
        );
        ctx.record(
            "vm tier via mvmd: mvm resume of the saved sandbox, and / cold create",
            format!(
                "{} ({:.3}); the second save {}, resume {}",
                ms(f.resumed),
                f.resumed.as_secs_f64() / f.cold.as_secs_f64(),
                ms(f.saved_again),
                ms(f.resumed_again)
            ),
        );
        ctx.record(
            "vm tier via mvmd: mvm fork of the saved sandbox (1 child, no save), and / cold create",
            format!(
                "{} ({:.3}); of it paused (saved first) {} ({:.3})",
                ms(f.forked_saved),
                f.forked_saved.as_secs_f64() / f.cold.as_secs_f64(),
                ms(f.forked_paused),
                f.forked_paused.as_secs_f64() / f.cold.as_secs_f64()
            ),
        );
        ctx.record(
            "vm tier via mvmd: mvm run -d --snapshot (a snapshot of the saved sandbox, after a \
             restart of mvmd), and / cold create",
            format!(
                "{} ({:.3})",
                ms(f.from_snapshot),
                f.from_snapshot.as_secs_f64() / f.cold.as_secs_f64()
            ),
        );
    }
    outcome
}

/// What the case measured.
#[derive(Clone)]
struct Figures {
    cold: Duration,
    saved: Duration,
    held_kib: u64,
    memory_file_kib: u64,
    resumed: Duration,
    saved_again: Duration,
    resumed_again: Duration,
    forked_saved: Duration,
    forked_paused: Duration,
    from_snapshot: Duration,
}

fn check(ctx: &Ctx, session: &mut MvmdSession) -> Result<Figures, String> {
    let (cold, answer) = busy_sandbox(ctx, session, &NET)?;
    let id = sandbox_id(&answer["sandbox"]);
    let address = answer["sandbox"]["network"]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    std::thread::sleep(Duration::from_secs(1));
    let before = session.mvm(ctx, &["exec", &id, "--", "sh", "-c", SELF_REPORT], None)?;
    let before = Report::of(&before);
    let machine_id = session.mvm(ctx, &["exec", &id, "--", "sh", "-c", MACHINE_ID], None)?;
    let state = session.mvm(ctx, &["exec", &id, "--", "cat", "/tmp/state"], None)?;
    let at_save = counted(state.trim())
        .ok_or_else(|| format!("sandbox {id}'s counter wrote {state:?}, not 'forty-two N'"))?;

    let logs_before = session.mvm(ctx, &["logs", &id], None)?;
    let (saved, held_kib) = save(ctx, session, &id)?;
    let memory_file = session
        .dirs
        .root
        .join(format!("state/saves/{id}.saved/vm.mem"));
    let memory_file_kib = std::fs::metadata(&memory_file)
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) / 2)
        .map_err(|e| format!("the saved VM's memory file {}: {e}", memory_file.display()))?;
    // Its layer lies with the saved VM, not in the run directory; its console still shows.
    let saves = session.dirs.root.join(format!("state/saves/{id}.saved"));
    let run = session.dirs.root.join(format!("run/sandboxes/{id}"));
    if !saves.join("layer.ext4").is_file() || run.join("layer.ext4").exists() {
        return Err(format!(
            "saved sandbox {id}'s writable layer should lie in {} and not in {}",
            saves.display(),
            run.display()
        ));
    }
    let logs_saved = session.mvm(ctx, &["logs", &id], None)?;
    if !logs_saved.starts_with(&logs_before) {
        return Err(format!(
            "mvm logs of saved sandbox {id} does not show its console ({} bytes, {} before)",
            logs_saved.len(),
            logs_before.len()
        ));
    }
    let refused = session.mvm(ctx, &["exec", &id, "--", "true"], None);
    match refused {
        Err(why) if why.contains("resume it first") => {}
        other => {
            return Err(format!(
                "an exec in saved sandbox {id} must be refused (resume it first): {other:?}"
            ))
        }
    }
    let memory_mib = answer["sandbox"]["memory_mib"].as_u64().unwrap_or_default();
    check_quota_while_saved(ctx, session, &id, memory_mib)?;
    let forked_saved = fork_one(ctx, session, &id, at_save, "saved")?;
    let snapshot = format!("kept-{id}");
    session.mvm(ctx, &["snapshot", &id, "--name", &snapshot], None)?;
    session.restart(ctx)?;
    let from_snapshot = run_from_snapshot(ctx, session, &snapshot, at_save)?;
    let state = session
        .list(ctx)?
        .iter()
        .find(|s| sandbox_id(s) == id)
        .map(|s| s["state"].as_str().unwrap_or_default().to_string());
    if state.as_deref() != Some("saved") {
        return Err(format!(
            "after mvmd's restart, sandbox {id} is {state:?}, not saved"
        ));
    }
    std::thread::sleep(Duration::from_secs(2));
    let resumed = resume(ctx, session, &id)?;
    check_resumed(ctx, session, &id, &before, at_save, &address, &logs_before)?;
    let kept = session.mvm(ctx, &["exec", &id, "--", "sh", "-c", MACHINE_ID], None)?;
    if kept != machine_id {
        return Err(format!(
            "sandbox {id}: its machine id changed across the save: {machine_id:?}, then {kept:?}"
        ));
    }
    // Paused (frozen), it forks and stays paused.
    let state = session.mvm(ctx, &["exec", &id, "--", "cat", "/tmp/state"], None)?;
    let at_pause = counted(state.trim())
        .ok_or_else(|| format!("sandbox {id}'s counter wrote {state:?}, not 'forty-two N'"))?;
    session.mvm(ctx, &["pause", &id], None)?;
    let forked_paused = fork_one(ctx, session, &id, at_pause, "paused")?;
    session.mvm(ctx, &["resume", &id], None)?;

    // Saved again, then what a restart of the host takes from it: mvmd, its network
    // namespace and its run directory (a tmpfs /run); the resume makes the network again.
    let (saved_again, _) = save(ctx, session, &id)?;
    let root = session.dirs.root.clone();
    session.restart_after(ctx, || lose_run_state(&root, &id))?;
    let resumed_again = resume(ctx, session, &id)?;
    let said = session.mvm(ctx, &["exec", &id, "--", "cat", "/tmp/base-file"], None)?;
    if said.trim() != "base" {
        return Err(format!(
            "sandbox {id} after its second save and resume: /tmp/base-file says {said:?}"
        ));
    }
    let report = checked_self_report(ctx, session, &id, &address)?;
    if report.field(1) != before.field(1) {
        return Err(format!(
            "sandbox {id}'s MAC changed across the host's restart: {:?}, then {:?}",
            before.field(1),
            report.field(1)
        ));
    }
    session.mvm(ctx, &["rm", &id], None)?;
    Ok(Figures {
        cold,
        saved,
        held_kib,
        memory_file_kib,
        resumed,
        saved_again,
        resumed_again,
        forked_saved,
        forked_paused,
        from_snapshot,
    })
}

/// While sandbox `id` (`memory_mib` MiB) is saved, its tenant's memory quota, lowered to what
/// it alone takes, does not count it: another sandbox of its size is made; but on the host's
/// disk, where saved sandboxes and snapshots hold at most that quota together, `id` holds it
/// all: the other's save and a snapshot of it are refused, naming the disk, and it goes on
/// running. Then `id`'s resume is refused, naming the memory and what to do, and leaves it
/// saved. The quota is the default again afterwards.
fn check_quota_while_saved(
    ctx: &Ctx,
    session: &MvmdSession,
    id: &str,
    memory_mib: u64,
) -> Result<(), String> {
    set_memory_quota(ctx, session, Some(memory_mib))?;
    let checked = (|| {
        let memory = memory_mib.to_string();
        let other = session.mvm(
            ctx,
            &[
                "run",
                "-d",
                "--isolation",
                "vm",
                "--memory",
                &memory,
                "--",
                "sleep",
                "600",
            ],
            None,
        )?;
        let other = other.trim();
        let save_refused = session.mvm(ctx, &["pause", "--save", other], None);
        let snapshot_refused = session.mvm(ctx, &["snapshot", other], None);
        let running = session.mvm(ctx, &["exec", other, "--", "echo", "running"], None);
        let refused = session.mvm(ctx, &["resume", id], None);
        let state = session
            .list(ctx)?
            .iter()
            .find(|s| sandbox_id(s) == id)
            .map(|s| s["state"].as_str().unwrap_or_default().to_string());
        session.mvm(ctx, &["rm", other], None)?;
        for (what, refused) in [("save", save_refused), ("snapshot", snapshot_refused)] {
            match refused {
                Err(why) if why.contains("on the host's disk") => {}
                answer => {
                    return Err(format!(
                        "with saved sandbox {id} holding its tenant's whole memory quota on the \
                         host's disk, another's {what} must be refused, naming the disk: \
                         {answer:?}"
                    ))
                }
            }
        }
        if running.as_deref().map(str::trim) != Ok("running") {
            return Err(format!(
                "sandbox {other}, whose save was refused, should go on running: {running:?}"
            ));
        }
        match refused {
            Err(why) if why.contains("cannot be resumed") && why.contains("MiB of memory") => {}
            other => {
                return Err(format!(
                    "the resume of saved sandbox {id} beyond its tenant's memory quota must be \
                     refused, naming it: {other:?}"
                ))
            }
        }
        if state.as_deref() != Some("saved") {
            return Err(format!(
                "sandbox {id} is {state:?} after a resume refused by its quota, not saved"
            ));
        }
        Ok(())
    })();
    set_memory_quota(ctx, session, None)?;
    checked
}

/// `mvm run -d --snapshot NAME` of snapshot `name` (of a sandbox whose counter was at
/// `at_least`, taken before a restart of mvmd): the new sandbox goes on from it as a fork's
/// child does; then `mvm snapshots` lists it, and `mvm snapshots rm` deletes it and its
/// files, the sandbox made from it still answering. Returns how long `mvm run -d` took.
fn run_from_snapshot(
    ctx: &Ctx,
    session: &MvmdSession,
    name: &str,
    at_least: u64,
) -> Result<Duration, String> {
    let started = Instant::now();
    let made = session.mvm(ctx, &["run", "-d", "--snapshot", name], None)?;
    let took = started.elapsed();
    let made = made.trim();
    let said = session.mvm(ctx, &["exec", made, "--", "sh", "-c", CHILD_REPORT], None)?;
    goes_on(&said, at_least, made).map_err(|why| {
        format!(
            "sandbox {made}, made from snapshot {name}, does not go on from it: {why}: {said:?}"
        )
    })?;
    let listed = session.mvm(ctx, &["-o", "json", "snapshots"], None)?;
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed)
        .map_err(|e| format!("mvm snapshots printed no JSON list ({e}): {listed:?}"))?;
    let [snapshot] = listed.as_slice() else {
        return Err(format!("mvm snapshots lists not one snapshot: {listed:?}"));
    };
    let id = snapshot["id"].as_str().unwrap_or_default().to_owned();
    if snapshot["name"].as_str() != Some(name) {
        return Err(format!(
            "mvm snapshots lists {snapshot}, not snapshot {name}"
        ));
    }
    session.mvm(ctx, &["snapshots", "rm", name], None)?;
    let files = session.dirs.root.join("state/sandbox-snapshots").join(&id);
    if files.exists() {
        return Err(format!("deleted snapshot {name} left {}", files.display()));
    }
    let still = session.mvm(ctx, &["exec", made, "--", "cat", "/tmp/base-file"], None)?;
    session.mvm(ctx, &["rm", made], None)?;
    match still.trim() {
        "base" => Ok(took),
        other => Err(format!(
            "sandbox {made} after its snapshot's deletion: /tmp/base-file says {other:?}"
        )),
    }
}

/// `mvm fork ID` of sandbox `id`, which is `state` (saved or paused) and stays so: its
/// child's counter goes on from `at_least` with the same variable, its file written before
/// is there, the child has its own host name, its disk reads back a synced write and its
/// kernel logged no disk error. The child is removed. Returns how long `mvm fork` took.
fn fork_one(
    ctx: &Ctx,
    session: &MvmdSession,
    id: &str,
    at_least: u64,
    state: &str,
) -> Result<Duration, String> {
    let started = Instant::now();
    let out = session.mvm(ctx, &["-o", "json", "fork", id], None)?;
    let took = started.elapsed();
    let children: Vec<serde_json::Value> = serde_json::from_str(&out)
        .map_err(|e| format!("mvm fork printed no JSON list ({e}): {out:?}"))?;
    let [child] = children.as_slice() else {
        return Err(format!("mvm fork {id} made not one child: {out}"));
    };
    let child = sandbox_id(child);
    let said = session.mvm(ctx, &["exec", &child, "--", "sh", "-c", CHILD_REPORT], None);
    let source_state = session
        .list(ctx)?
        .iter()
        .find(|s| sandbox_id(s) == id)
        .map(|s| s["state"].as_str().unwrap_or_default().to_string());
    session.mvm(ctx, &["rm", &child], None)?;
    let said = said?;
    if source_state.as_deref() != Some(state) {
        return Err(format!(
            "sandbox {id} is {source_state:?} after its fork, not {state} as before"
        ));
    }
    goes_on(&said, at_least, &child)
        .map(|()| took)
        .map_err(|why| {
            format!(
                "the child {child} of {state} sandbox {id} does not go on from it: {why}: {said:?}"
            )
        })
}

/// Checks `said`, the [`CHILD_REPORT`] of a sandbox named `host` that goes on from a counter
/// of at least `at_least`: its counter past that and still counting, the file written before,
/// its host name, no disk error in its kernel's log, a synced write read back. Says what is
/// not so.
fn goes_on(said: &str, at_least: u64, host: &str) -> Result<(), String> {
    let lines: Vec<&str> = said.lines().collect();
    match (
        lines.first().copied().and_then(counted),
        lines.get(1).copied().and_then(counted),
    ) {
        (Some(a), Some(b)) if a >= at_least && b > a => {}
        _ => {
            return Err(format!(
                "its counter does not go on from at least {at_least}"
            ))
        }
    }
    for (line, want) in [(2, "base"), (3, host), (6, "0"), (7, "synced")] {
        if lines.get(line).copied() != Some(want) {
            return Err(format!("line {line} of its report is not {want:?}"));
        }
    }
    Ok(())
}

/// Sets the memory quota of mvmd's default tenant (`None`: the default quota) with
/// `mvmd tenant create`, beside the running mvmd.
fn set_memory_quota(ctx: &Ctx, session: &MvmdSession, mib: Option<u64>) -> Result<(), String> {
    let mut cmd = std::process::Command::new(&ctx.mvmd);
    session.dirs.apply(ctx, &mut cmd);
    cmd.args(["tenant", "create", "default"]);
    if let Some(mib) = mib {
        cmd.arg("--max-memory-mib").arg(mib.to_string());
    }
    let out = cmd
        .output()
        .map_err(|e| format!("starting mvmd tenant create: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "mvmd tenant create default: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// What a restart of the host takes of saved sandbox `id` of the mvmd in `root` (stopped):
/// its network namespace (unmounted and removed: the processes still in it, its resolver,
/// are what a restart would have ended too, and its resume removes them) and its directory
/// in the run directory.
fn lose_run_state(root: &std::path::Path, id: &str) -> Result<(), String> {
    let netns = root.join(format!("run/netns/{id}"));
    let c_path =
        std::ffi::CString::new(netns.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: umount2 reads the NUL-terminated path, alive for the call.
    if unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(format!(
            "unmounting {}: {}",
            netns.display(),
            std::io::Error::last_os_error()
        ));
    }
    std::fs::remove_file(&netns).map_err(|e| format!("removing {}: {e}", netns.display()))?;
    let dir = root.join(format!("run/sandboxes/{id}"));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| format!("removing {}: {e}", dir.display()))?;
    }
    Ok(())
}

/// `mvm pause --save ID`, checked: the answer's state is `saved` and no VMM of it runs.
/// Returns how long it took and what its VMM held just before (KiB).
fn save(ctx: &Ctx, session: &MvmdSession, id: &str) -> Result<(Duration, u64), String> {
    let held = vmm_kib(id, "status", "VmRSS:");
    if held == 0 {
        return Err(format!("no mvm-vmm of sandbox {id} runs before its save"));
    }
    let started = Instant::now();
    let out = session.mvm(ctx, &["-o", "json", "pause", "--save", id], None)?;
    let took = started.elapsed();
    let answer: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| format!("mvm pause --save printed no JSON ({e}): {out:?}"))?;
    if answer["state"] != "saved" {
        return Err(format!("mvm pause --save {id} answered {out}"));
    }
    if vmm_kib(id, "status", "VmRSS:") != 0 {
        return Err(format!("the VMM of saved sandbox {id} still runs"));
    }
    Ok((took, held))
}

/// `mvm resume ID`, checked: running again with a VMM. Returns how long it took.
fn resume(ctx: &Ctx, session: &MvmdSession, id: &str) -> Result<Duration, String> {
    let started = Instant::now();
    let out = session.mvm(ctx, &["-o", "json", "resume", id], None)?;
    let took = started.elapsed();
    let answer: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| format!("mvm resume printed no JSON ({e}): {out:?}"))?;
    if answer["state"] != "running" || vmm_kib(id, "status", "VmRSS:") == 0 {
        return Err(format!(
            "mvm resume {id} answered {out}, and its VMM runs: {}",
            vmm_kib(id, "status", "VmRSS:") != 0
        ));
    }
    Ok(took)
}

/// The resumed sandbox `id` is the machine it was (`before`: its report before the save,
/// when its counter was past `at_save` and its console held `logs_before`).
fn check_resumed(
    ctx: &Ctx,
    session: &MvmdSession,
    id: &str,
    before: &Report,
    at_save: u64,
    address: &str,
    logs_before: &str,
) -> Result<(), String> {
    let exec = |script: &str| session.mvm(ctx, &["exec", id, "--", "sh", "-c", script], None);
    let said = exec(CHILD_REPORT)?;
    goes_on(&said, at_save, id)
        .map_err(|why| format!("sandbox {id} after the resume: {why}: {said:?}"))?;
    let report = checked_self_report(ctx, session, id, address)?;
    // Host name, MAC and address as before the save.
    for field in [0, 1, 2] {
        if report.field(field) != before.field(field) {
            return Err(format!(
                "sandbox {id}: field {field} of its report changed across the save: {:?} \
                 before, {:?} after",
                before.lines, report.lines
            ));
        }
    }
    let logs = session.mvm(ctx, &["logs", id], None)?;
    if !logs.starts_with(logs_before) {
        return Err(format!(
            "sandbox {id}'s console does not go on from what it held before the save \
             ({} bytes then, {} now)",
            logs_before.len(),
            logs.len()
        ));
    }
    Ok(())
}
