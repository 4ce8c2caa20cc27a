//! Snapshots through mvmd: a warm template (`mvm templates warm default`) and vm-tier
//! sandboxes restored from it, each its own machine; a live fork (`mvm fork`) whose children
//! go on from the source's instant.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::{ms, sandbox_id, vmm_pss_kib, Ctx, ManagerDirs, MvmdSession, Outcome, Verdict};

/// Sandboxes restored from the one snapshot.
const RESTORED: usize = 8;
/// Cold creates timed for the ratio.
const COLD: usize = 3;

/// Every timed create here has a network (an address, a veth, nftables rules).
/// A network whose one allowed address is the "internet"'s greeter
/// ([`super::dns_egress::ALLOWED`]).
pub(super) const NET: [&str; 4] = ["--egress", "allow", "--allow", "198.51.100.9"];
/// The first output every timed create waits for (one process in the guest, as the cold
/// creates': the report's dozen processes are run afterwards, untimed).
const FIRST_OUTPUT: &str = "cat /proc/sys/kernel/random/uuid";

/// What a guest says of itself: host name, MAC, IPv4 address, a kernel UUID, 16 random bytes,
/// machine id, wall clock, its resolv.conf's nameservers and the file systems of the identity
/// files (resolv.conf, machine-id), one per line.
pub(super) const SELF_REPORT: &str = "hostname; cat /sys/class/net/eth0/address; \
     ip -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1; \
     cat /proc/sys/kernel/random/uuid; head -c16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
     cat /etc/machine-id 2>/dev/null || echo none; date +%s; \
     grep nameserver /etc/resolv.conf | paste -sd,; \
     awk '$2==\"/etc/resolv.conf\"||$2==\"/etc/machine-id\"{print $3}' /proc/mounts | paste -sd,";

/// Runs `check` against an mvmd on `dirs` with the "internet" beyond L1 up (what the guests
/// reach through their network: [`NET`] allows it): the case's outcome, which includes the
/// session's check that nothing is left, and what `check` measured when it passed.
pub(super) fn checked_with_internet<F: Clone>(
    ctx: &Ctx,
    dirs: ManagerDirs,
    check: impl FnOnce(&Ctx, &mut MvmdSession) -> Result<F, String>,
) -> Result<(Outcome, Option<F>), String> {
    let mut session = MvmdSession::start_in(ctx, dirs)?;
    let internet = super::dns_egress::Internet::start();
    let checked = internet.and_then(|_internet| check(ctx, &mut session));
    let figures = checked.as_ref().ok().cloned();
    Ok((session.finish(ctx, checked.map(drop)), figures))
}

/// One restored guest's report.
pub(super) struct Report {
    pub(super) lines: Vec<String>,
}

impl Report {
    /// The report `stdout` printed, a field per line.
    pub(super) fn of(stdout: &str) -> Report {
        Report {
            lines: stdout.lines().map(str::to_string).collect(),
        }
    }

    pub(super) fn field(&self, i: usize) -> &str {
        self.lines.get(i).map_or("", String::as_str)
    }
}

/// Warms the default template through mvmd (`mvm templates warm`, whose answer and `mvm
/// templates -o json` show the snapshot), then creates 8 vm-tier sandboxes with a network from
/// it: each restored (mvmd's "snapshot loaded" for it), each with its own host name (its
/// id), MAC, address (the one mvmd reports), kernel UUID, /dev/urandom bytes and machine id,
/// a wall clock within 1 s of L1's and its own resolver in resolv.conf (egress `allow`), and
/// each reaches a listener beyond L1 through its new address and route; one more without a
/// network has eth0 down. A warm at another size keeps that size's snapshot beside the
/// defaults' one, and a create of that size restores it. Records
/// create → first output of a cold boot and of a restore, their ratio, and the PSS of idle
/// restored sandboxes' VMMs against cold-booted ones'.
pub fn warm_template_restore(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let mut dirs = ManagerDirs::new(ctx, "warm")?;
    // The manager's debug lines time each step of a create (see [`Steps`]).
    dirs.env
        .push(("RUST_LOG".into(), "info,mvm_sandbox::manager=debug".into()));
    let (outcome, figures) = checked_with_internet(ctx, dirs, |ctx, session| check(ctx, session))?;
    if let (Ok(Verdict::Pass), Some(f)) = (&outcome, figures) {
        ctx.record(
            "vm tier via mvmd: mvm templates warm default",
            ms(f.warming),
        );
        ctx.record(
            "vm tier via mvmd: cold create -> first exec output, p50 of 3",
            ms(f.cold),
        );
        ctx.record(
            "vm tier via mvmd: create from a warm template -> first exec output, p50 of 8",
            ms(f.warm),
        );
        ctx.record(
            "vm tier via mvmd: cold create's steps in mvmd, p50 of 3",
            f.cold_steps.to_string(),
        );
        ctx.record(
            "vm tier via mvmd: warm create's steps in mvmd, p50 of 8",
            f.warm_steps.to_string(),
        );
        ctx.record(
            "vm tier via mvmd: warm creates -> first exec output, in order",
            f.warm_each.clone(),
        );
        ctx.record(
            "vm tier via mvmd: warm create / cold create (goal <= 0.15)",
            format!("{:.3}", f.warm.as_secs_f64() / f.cold.as_secs_f64()),
        );
        ctx.record(
            "vm tier via mvmd: PSS of an idle mvm-vmm, cold-booted (mean of 3) / restored (mean of 8)",
            format!("{:.1} MiB / {:.1} MiB", f.cold_pss / 1024.0, f.warm_pss / 1024.0),
        );
        ctx.record(
            "vm tier via mvmd: PSS restored / cold (goal <= 0.4)",
            format!("{:.3}", f.warm_pss / f.cold_pss),
        );
    }
    outcome
}

/// What the warm test measured.
#[derive(Clone)]
struct Figures {
    /// Each warm create → first output, in order (ms).
    warm_each: String,
    /// Cold create → first output, p50.
    cold: Duration,
    /// Warm create → first output, p50.
    warm: Duration,
    /// `mvm templates warm`.
    warming: Duration,
    /// Mean PSS of an idle cold-booted sandbox's VMM, KiB.
    cold_pss: f64,
    /// Mean PSS of an idle restored sandbox's VMM, KiB.
    warm_pss: f64,
    /// Where a cold create's time went in mvmd.
    cold_steps: Steps,
    /// Where a warm create's time went in mvmd.
    warm_steps: Steps,
}

/// The steps of one create in mvmd, from the manager's debug lines ("sandbox built",
/// "snapshot loaded", "restored guest reidentified"); a cold boot has no load step (zero).
#[derive(Clone, Copy, Default)]
struct Steps {
    /// The network namespace (with the vm tier's tap), which the jail needs to start.
    namespace: Duration,
    /// Until the namespace was connected (veth, rules, host guard, resolver), from the
    /// create's start: alongside the steps below where the host has more than one CPU, else
    /// before them (mvmd's choice, made the same way: [`side_by_side`]).
    network: Duration,
    /// The jail's files (the writable layer, the VM's config) and the jailer's spawn.
    jail: Duration,
    /// The restoring VMM's API socket up.
    api: Duration,
    /// `PUT /snapshot/load`.
    load: Duration,
    /// The agent answering (a cold boot: the whole kernel boot), a restored guest's with its
    /// new identity (given in the handshake).
    agent: Duration,
    /// All of it, as mvmd timed it.
    total: Duration,
}

impl Steps {
    /// The steps of sandbox `id`'s create in mvmd's `log`.
    fn of(log: &str, id: &str) -> Result<Steps, String> {
        let built = logged_durations(log, "sandbox built", id);
        let loaded = logged_durations(log, "snapshot loaded", id);
        let identified = logged_durations(log, "restored guest reidentified", id);
        let field = |fields: &HashMap<String, Duration>, name: &str| {
            fields.get(name).copied().unwrap_or_default()
        };
        let (spawn, total) = (field(&built, "spawned"), field(&built, "ready"));
        if total.is_zero() {
            return Err(format!(
                "mvmd's log has no \"sandbox built\" line with its times for sandbox {id}"
            ));
        }
        let (api, loaded) = (field(&loaded, "api_up"), field(&loaded, "loaded"));
        let identified = field(&identified, "reidentified");
        let (namespace, network) = (field(&built, "namespace"), field(&built, "networked"));
        Ok(Steps {
            namespace,
            network,
            jail: spawn.saturating_sub(if side_by_side() { namespace } else { network }),
            api,
            load: loaded.saturating_sub(api),
            agent: match identified.is_zero() {
                true => total.saturating_sub(spawn),
                false => identified.saturating_sub(loaded),
            },
            total,
        })
    }

    /// The median of each step over `all`.
    fn median(all: &[Steps]) -> Steps {
        let p50 = |step: fn(&Steps) -> Duration| {
            let mut v: Vec<Duration> = all.iter().map(step).collect();
            v.sort();
            v.get(v.len() / 2).copied().unwrap_or_default()
        };
        Steps {
            namespace: p50(|s| s.namespace),
            network: p50(|s| s.network),
            jail: p50(|s| s.jail),
            api: p50(|s| s.api),
            load: p50(|s| s.load),
            agent: p50(|s| s.agent),
            total: p50(|s| s.total),
        }
    }
}

/// Whether mvmd connects a create's network alongside the jail's start: where this host (the
/// one mvmd runs on) has more than one CPU, as mvmd decides.
fn side_by_side() -> bool {
    std::thread::available_parallelism().is_ok_and(|n| n.get() > 1)
}

impl std::fmt::Display for Steps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let network = match side_by_side() {
            true => format!(
                "then, alongside the network (done at {:.0} ms),",
                ms(self.network)
            ),
            false => format!(
                "then (one CPU) the network until {:.0} ms,",
                ms(self.network)
            ),
        };
        write!(
            f,
            "namespace {:.0} ms, {network} the jail {:.0} ms, VMM API up {:.0} ms, snapshot \
             load {:.0} ms, agent (with a restored guest's new identity) {:.0} ms; total {:.0} ms",
            ms(self.namespace),
            ms(self.jail),
            ms(self.api),
            ms(self.load),
            ms(self.agent),
            ms(self.total)
        )
    }
}

/// The durations (`name=1.5ms`, Rust's `Debug` of a `Duration`) on mvmd's log line with
/// `message` about sandbox `id`.
pub(super) fn logged_durations(log: &str, message: &str, id: &str) -> HashMap<String, Duration> {
    logged_fields(log, message, id)
        .into_iter()
        .filter_map(|(name, value)| Some((name, parse_duration(&value)?)))
        .collect()
}

/// The fields (`name=value`, a string's quotes removed) on mvmd's last log line with
/// `message` about sandbox `id`.
fn logged_fields(log: &str, message: &str, id: &str) -> HashMap<String, String> {
    let id_field = format!("id={id}");
    log.lines()
        .rev()
        .map(strip_ansi)
        .find(|line| line.contains(message) && line.split_whitespace().any(|w| w == id_field))
        .map(|line| {
            line.split_whitespace()
                .filter_map(|word| word.split_once('='))
                .map(|(name, value)| (name.to_owned(), value.trim_matches('"').to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// `line` without its terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|&c| c == 'm');
        } else {
            out.push(c);
        }
    }
    out
}

/// A `Duration`'s `Debug` form (`1.5s`, `12.3ms`, `40µs`, `7ns`).
fn parse_duration(text: &str) -> Option<Duration> {
    let (number, scale) = [("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9), ("s", 1.0)]
        .into_iter()
        .find_map(|(unit, scale)| Some((text.strip_suffix(unit)?, scale)))?;
    let value: f64 = number.parse().ok()?;
    Some(Duration::from_secs_f64(value * scale))
}

/// Mean PSS (KiB) of the VMMs of sandboxes `ids`, after a second of rest.
pub(super) fn mean_pss(ids: &[String]) -> Result<f64, String> {
    std::thread::sleep(Duration::from_secs(1));
    let pss: Vec<u64> = ids.iter().map(|id| vmm_pss_kib(id)).collect();
    if pss.contains(&0) {
        return Err(format!(
            "an idle sandbox's mvm-vmm was not found (PSS {pss:?} KiB)"
        ));
    }
    Ok(pss.iter().sum::<u64>() as f64 / pss.len() as f64)
}

/// `mvm -o json run --isolation vm EXTRA -- sh -c SCRIPT`: its answer and how long it took.
fn run_timed(
    ctx: &Ctx,
    session: &MvmdSession,
    extra: &[&str],
    script: &str,
) -> Result<(serde_json::Value, Duration), String> {
    let mut args = vec!["-o", "json", "run", "--isolation", "vm"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["--", "sh", "-c", script]);
    let started = Instant::now();
    let out = session.mvm(ctx, &args, None)?;
    let took = started.elapsed();
    let answer: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| format!("mvm {} printed no JSON ({e}): {out:?}", args.join(" ")))?;
    Ok((answer, took))
}

/// Times `COLD` cold creates with a network to their first output; returns the times and
/// the sandboxes' ids (left running).
fn cold_creates(ctx: &Ctx, session: &MvmdSession) -> Result<(Vec<Duration>, Vec<String>), String> {
    let mut cold = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..COLD {
        let (answer, took) = run_timed(ctx, session, &NET, FIRST_OUTPUT)?;
        cold.push(took);
        ids.push(sandbox_id(&answer["sandbox"]));
    }
    Ok((cold, ids))
}

/// `mvm templates warm default`, checked; returns how long it took.
pub(super) fn warm_default(ctx: &Ctx, session: &MvmdSession) -> Result<Duration, String> {
    let started = Instant::now();
    let warmed: serde_json::Value = serde_json::from_str(&session.mvm(
        ctx,
        &["-o", "json", "templates", "warm", "default"],
        None,
    )?)
    .map_err(|e| format!("mvm templates warm printed no JSON: {e}"))?;
    let warming = started.elapsed();
    if warmed["snapshot"]["memory_mib"] != 256 {
        return Err(format!(
            "mvm templates warm default answered {warmed}, no snapshot"
        ));
    }
    Ok(warming)
}

/// The self-report of the restored sandbox mvmd answered `answer` about (with egress `allow`),
/// checked as [`checked_self_report`] and: its resolv.conf names the sandbox's resolver and
/// mvmd loaded the snapshot for it. Returns the sandbox's id and the report.
fn checked_report(
    ctx: &Ctx,
    session: &MvmdSession,
    answer: &serde_json::Value,
) -> Result<(String, Report), String> {
    let id = sandbox_id(&answer["sandbox"]);
    let address = answer["sandbox"]["network"]["address"]
        .as_str()
        .unwrap_or_default();
    let report = checked_self_report(ctx, session, &id, address)?;
    // The snapshot was taken without egress `allow`: the restore must name the resolver.
    let resolver = "nameserver 169.254.53.53";
    if report.field(7) != resolver {
        return Err(format!(
            "sandbox {id} (egress allow): its resolv.conf names {:?}, not only {resolver:?}; \
             it said {:?}",
            report.field(7),
            report.lines
        ));
    }
    // Guests boot with `quiet`: the console cannot tell a boot from a restore, mvmd's log can.
    if logged_durations(&session.log(), "snapshot loaded", &id).is_empty() {
        return Err(format!(
            "sandbox {id} was not restored from the snapshot (no \"snapshot loaded\" line for \
             it in mvmd's log): it booted a kernel"
        ));
    }
    Ok((id, report))
}

/// Sandbox `id`'s [`SELF_REPORT`], checked: its host name is its id, eth0 has `address` (the
/// one mvmd gave it), its identity files are in memory, its clock is within 1 s of L1's, and
/// it reaches the allowed greeter beyond L1 (so its address, MAC and default route work).
pub(super) fn checked_self_report(
    ctx: &Ctx,
    session: &MvmdSession,
    id: &str,
    address: &str,
) -> Result<Report, String> {
    let before = unix_now();
    let stdout = session.mvm(ctx, &["exec", id, "--", "sh", "-c", SELF_REPORT], None)?;
    let after = unix_now();
    let report = Report::of(&stdout);
    if report.field(0) != id {
        return Err(format!(
            "sandbox {id}: hostname {:?}; it said {stdout:?}",
            report.field(0)
        ));
    }
    if report.field(2) != address {
        return Err(format!(
            "sandbox {id}: eth0 has {:?}, mvmd gave it {address:?}; it said {stdout:?}",
            report.field(2)
        ));
    }
    // A new identity is written to memory, not to the disk a busy guest keeps its journal full of.
    if report.field(8) != "tmpfs,tmpfs" {
        return Err(format!(
            "sandbox {id}: its /etc/resolv.conf and /etc/machine-id should be files on a tmpfs \
             bound over them, their mounts say {:?}; it said {stdout:?}",
            report.field(8)
        ));
    }
    let clock: u64 = report.field(6).parse().unwrap_or(0);
    if clock + 1 < before || clock > after + 1 {
        return Err(format!(
            "sandbox {id}: wall clock {clock}, L1's {before}..{after}; it said {stdout:?}"
        ));
    }
    let (greeter, port) = (super::dns_egress::ALLOWED, super::dns_egress::PORT);
    let reach = format!("nc -w 5 {greeter} {port} </dev/null 2>&1; echo rc=$?");
    let reached = session.mvm(ctx, &["exec", id, "--", "sh", "-c", &reach], None)?;
    if !reached.contains(super::dns_egress::GREETING) {
        return Err(format!(
            "sandbox {id}: with its identity, it does not reach {greeter}:{port} (allowed): \
             {reached:?}"
        ));
    }
    Ok(report)
}

/// Times `n` creates with a network to their first output, each after `before` (left
/// running), and checks each as restored ([`checked_report`]) and all as distinct machines
/// ([`all_unique`]); returns the times and the sandboxes' ids.
fn restored_creates(
    ctx: &Ctx,
    session: &MvmdSession,
    n: usize,
    before: impl Fn() -> Result<(), String>,
) -> Result<(Vec<Duration>, Vec<String>), String> {
    let (mut times, mut ids, mut reports) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..n {
        before()?;
        let (answer, took) = run_timed(ctx, session, &NET, FIRST_OUTPUT)?;
        times.push(took);
        let (id, report) = checked_report(ctx, session, &answer)?;
        ids.push(id);
        reports.push(report);
    }
    all_unique(&reports, n)?;
    Ok((times, ids))
}

/// Checks that `reports` (of `n` sandboxes restored from one snapshot) each have their own
/// MAC, kernel UUID, /dev/urandom bytes and machine id.
fn all_unique(reports: &[Report], n: usize) -> Result<(), String> {
    for (field, what) in [
        (1, "MAC"),
        (3, "kernel UUID"),
        (4, "/dev/urandom bytes"),
        (5, "machine id"),
    ] {
        let distinct: HashSet<&str> = reports.iter().map(|r| r.field(field)).collect();
        if distinct.len() != n || distinct.contains("") {
            let all: Vec<&str> = reports.iter().map(|r| r.field(field)).collect();
            return Err(format!(
                "{n} restored sandboxes do not each have their own {what}: {all:?}"
            ));
        }
    }
    Ok(())
}

/// The checks; returns what they measured.
fn check(ctx: &Ctx, session: &MvmdSession) -> Result<Figures, String> {
    let (mut cold, cold_ids) = cold_creates(ctx, session)?;
    let cold_pss = mean_pss(&cold_ids)?;
    for id in &cold_ids {
        session.mvm(ctx, &["rm", id], None)?;
    }
    let warming = warm_default(ctx, session)?;
    let listed = session.mvm(ctx, &["-o", "json", "templates"], None)?;
    if !listed.contains("\"snapshot\"") {
        return Err(format!(
            "mvm templates does not show the snapshot: {listed}"
        ));
    }

    let (mut warm, warm_ids) = restored_creates(ctx, session, RESTORED, || Ok(()))?;

    let warm_pss = mean_pss(&warm_ids)?;
    let (offline, _) = run_timed(
        ctx,
        session,
        &[],
        "cat /sys/class/net/eth0/operstate; ip -4 -o addr show dev eth0 | wc -l",
    )?;
    let said = offline["exec"]["stdout"].as_str().unwrap_or_default();
    if said.split_whitespace().collect::<Vec<_>>() != ["down", "0"] {
        return Err(format!(
            "a restored sandbox without a network should have eth0 down and address-less: {said:?}"
        ));
    }
    for sandbox in session.list(ctx)? {
        session.mvm(ctx, &["rm", &sandbox_id(&sandbox)], None)?;
    }
    warm_at_another_size(ctx, session)?;
    let log = session.log();
    let steps = |ids: &[String]| -> Result<Steps, String> {
        let all = ids
            .iter()
            .map(|id| Steps::of(&log, id))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Steps::median(&all))
    };
    let (cold_steps, warm_steps) = (steps(&cold_ids)?, steps(&warm_ids)?);
    let warm_each = warm.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ");
    cold.sort();
    warm.sort();
    Ok(Figures {
        warm_each,
        cold_steps,
        warm_steps,
        cold: cold[COLD / 2],
        warm: warm[RESTORED / 2],
        warming,
        cold_pss,
        warm_pss,
    })
}

/// `mvm templates warm default --cpus 2 --memory 320` keeps a snapshot of that size beside
/// the defaults' one (both in its answer), and a create of that size restores it (mvmd's
/// "snapshot loaded" line for it) as a VM with 2 vCPUs and 320 MiB.
fn warm_at_another_size(ctx: &Ctx, session: &MvmdSession) -> Result<(), String> {
    warm_other_size(ctx, session)?;
    let id = create_of_other_size(ctx, session)?;
    session.mvm(ctx, &["rm", &id], None)?;
    Ok(())
}

/// The other size the warm and pool cases warm the default template at.
const OTHER_SIZE: [&str; 4] = ["--cpus", "2", "--memory", "320"];

/// Warms the default template at [`OTHER_SIZE`]; checks that it then has snapshots at both
/// sizes.
fn warm_other_size(ctx: &Ctx, session: &MvmdSession) -> Result<(), String> {
    let mut args = vec!["-o", "json", "templates", "warm", "default"];
    args.extend_from_slice(&OTHER_SIZE);
    let warmed = session.mvm(ctx, &args, None)?;
    let warmed: serde_json::Value = serde_json::from_str(&warmed)
        .map_err(|e| format!("mvm templates warm printed no JSON ({e}): {warmed}"))?;
    let sized = warmed["other_snapshots"]
        .as_array()
        .is_some_and(|s| s.iter().any(|s| s["vcpus"] == 2 && s["memory_mib"] == 320));
    if warmed["snapshot"]["memory_mib"] != 256 || !sized {
        return Err(format!(
            "after a warm at 2 vCPUs, 320 MiB the default template should have snapshots at \
             both sizes: {warmed}"
        ));
    }
    Ok(())
}

/// Creates a sandbox of [`OTHER_SIZE`] (left running) and checks that it restored that
/// size's snapshot and sees 2 CPUs and at most 320 MiB; returns its id.
fn create_of_other_size(ctx: &Ctx, session: &MvmdSession) -> Result<String, String> {
    let (answer, _) = run_timed(
        ctx,
        session,
        &OTHER_SIZE,
        "grep -c ^processor /proc/cpuinfo; sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo",
    )?;
    let id = sandbox_id(&answer["sandbox"]);
    let said = answer["exec"]["stdout"].as_str().unwrap_or_default();
    let numbers: Vec<u64> = said
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let restored = !logged_durations(&session.log(), "snapshot loaded", &id).is_empty();
    match numbers[..] {
        [2, kib] if restored && (200 << 10..=320 << 10).contains(&kib) => Ok(id),
        _ => Err(format!(
            "a create at 2 vCPUs, 320 MiB should restore that size's snapshot (restored: \
             {restored}) and see 2 CPUs and at most 320 MiB: it said {said:?}"
        )),
    }
}

pub(super) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Children of the fork.
const CHILDREN: usize = 3;

/// A shell in the source sandbox that holds a variable and counts into /tmp/state five times
/// a second (each value written whole: a reader never finds the file emptied), and one that keeps writing 256 KiB files to the guest's disk and syncing them
/// (so that disk requests are in flight when the VM is saved) unless /tmp/quiet exists, both
/// detached from the exec that starts them.
const COUNTER: &str = "echo base > /tmp/base-file; mkdir -p /disk; \
     setsid sh -c 'X=forty-two; i=0; while true; do i=$((i+1)); echo \"$X $i\" > /tmp/state.new; \
     mv /tmp/state.new /tmp/state; sleep 0.2; done' </dev/null >/dev/null 2>&1 & \
     setsid sh -c 'i=0; while true; do if [ -e /tmp/quiet ]; then sleep 0.5; continue; fi; \
     i=$((i+1)); head -c 262144 /dev/urandom > /disk/f.new \
     && mv /disk/f.new /disk/f.$((i % 4)) && sync; done' </dev/null >/dev/null 2>&1 & \
     echo started";

/// What a child (or the source) says a second apart: the counter's line twice, the file made
/// before the fork, host name, MAC, a kernel UUID, then how many disk errors its kernel
/// logged and whether a file written and synced now reads back.
pub(super) const CHILD_REPORT: &str =
    "cat /tmp/state; sleep 1; cat /tmp/state; cat /tmp/base-file; \
     hostname; cat /sys/class/net/eth0/address; cat /proc/sys/kernel/random/uuid; \
     dmesg | grep -ciE 'ext4-fs (error|warning)|i/o error|buffer i/o'; \
     echo synced > /disk/probe && sync && cat /disk/probe";

/// A vm-tier sandbox with a network in which a detached shell counts with a variable set,
/// forked into 3 children (`mvm fork -n 3`): each child's counter goes on from past the
/// source's value at the fork with the same variable, the file written before the fork is
/// there, and each child has its own host name, MAC and kernel UUID (none the source's); the
/// source goes on counting. A second shell keeps writing and syncing files on the guest's
/// disk through the fork: no child's kernel logs a disk error, and each writes and reads back
/// a synced file (between forks the writer is quiet: on one emulated CPU the fork pool fills
/// only with what the sandboxes leave idle). The same source is forked three times, checked
/// alike: first each child
/// restores in a jail of its own; then, the template warmed, mvmd (`MVM_FORK_POOL=3`) keeps 3
/// VMMs started without a VM, and the children load into them (mvmd's "fork pool entry
/// taken"): the first fork's reconnected (the pool starts without a network), the second's
/// connected for them already (the pool refills with the children's network); last it is
/// forked into one child, from the pool too. Records the forks' durations against a cold
/// create.
pub fn fork_live_sandbox(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let mut dirs = ManagerDirs::new(ctx, "fork")?;
    dirs.env
        .push(("MVM_FORK_POOL".into(), CHILDREN.to_string()));
    // The manager's debug lines time the save and each child's create (see [`Steps`]).
    dirs.env
        .push(("RUST_LOG".into(), "info,mvm_sandbox::manager=debug".into()));
    let session = MvmdSession::start_in(ctx, dirs)?;
    let checked = check_fork(ctx, &session);
    let figures = checked.as_ref().ok().cloned();
    let outcome = session.finish(ctx, checked.map(drop));
    if let (Ok(Verdict::Pass), Some(f)) = (&outcome, figures) {
        ctx.record(
            "vm tier via mvmd: cold create of the fork's source",
            ms(f.cold),
        );
        ctx.record(
            "vm tier via mvmd: mvm fork -n 3 (until the 3 children answer)",
            ms(f.forked),
        );
        ctx.record(
            "vm tier via mvmd: the fork's source paused, saved and resumed in mvmd",
            format!("{} (its memory written in {})", ms(f.saved), ms(f.dumped)),
        );
        ctx.record(
            "vm tier via mvmd: a fork child's steps in mvmd, p50 of 3",
            f.children.to_string(),
        );
        ctx.record(
            "vm tier via mvmd: fork of 3 / cold create (goal per child <= 0.2)",
            format!("{:.3}", f.forked.as_secs_f64() / f.cold.as_secs_f64()),
        );
        ctx.record(
            "vm tier via mvmd: mvm fork -n 3 into the fork pool, reconnected / connected already",
            format!("{} / {}", ms(f.reconnected), ms(f.pooled)),
        );
        ctx.record(
            "vm tier via mvmd: a fork pool entry taken in mvmd (connected already), each, with when its VM was handed over and loaded",
            f.taking,
        );
        ctx.record(
            "vm tier via mvmd: fork of 3 into the fork pool (connected already) / cold create (goal per child <= 0.2)",
            format!("{:.3}", f.pooled.as_secs_f64() / f.cold.as_secs_f64()),
        );
        ctx.record(
            "vm tier via mvmd: mvm fork -n 1 into the fork pool (connected already), and its steps in mvmd",
            format!("{} ({})", ms(f.single), f.single_taking),
        );
        ctx.record(
            "vm tier via mvmd: fork of 1 into the fork pool (connected already) / cold create (goal <= 0.2)",
            format!("{:.3}", f.single.as_secs_f64() / f.cold.as_secs_f64()),
        );
    }
    outcome
}

/// The counter's value in a line `forty-two N`, if the line is that.
pub(super) fn counted(line: &str) -> Option<u64> {
    line.strip_prefix("forty-two ")?.trim().parse().ok()
}

/// What the fork case measured.
#[derive(Clone)]
struct ForkFigures {
    /// The source's cold create.
    cold: Duration,
    /// The fork whose children restore in jails of their own.
    forked: Duration,
    /// Its source's save.
    saved: Duration,
    /// Of that, the VMM's writing of the memory.
    dumped: Duration,
    /// Where its children's time went in mvmd (p50).
    children: Steps,
    /// The fork whose children load into the fork pool's VMMs, reconnected.
    reconnected: Duration,
    /// The fork whose children load into the fork pool's VMMs connected for them.
    pooled: Duration,
    /// Each take of that fork in mvmd (ms).
    taking: String,
    /// The fork of one child into the fork pool, connected for it.
    single: Duration,
    /// Its steps in mvmd.
    single_taking: String,
}

/// The checks; returns what they measured.
fn check_fork(ctx: &Ctx, session: &MvmdSession) -> Result<ForkFigures, String> {
    // No timeout: the case's forks take minutes in a slow L1, the default's 300 s could pass.
    let (cold, answer) = busy_sandbox(
        ctx,
        session,
        &["--egress", "allow", "--allow", "10.9.9.9", "--timeout", "0"],
    )?;
    let source = answer["sandbox"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    std::thread::sleep(Duration::from_secs(1));
    let (forked, ids) = fork_checked(ctx, session, &source, CHILDREN)?;
    let log = session.log();
    let save = logged_durations(&log, "fork source saved", &source);
    let (Some(&saved), Some(&dumped)) = (save.get("saved"), save.get("dumped")) else {
        return Err(format!(
            "mvmd's log has no \"fork source saved\" line for {source}"
        ));
    };
    let children = ids
        .iter()
        .map(|id| Steps::of(&log, id))
        .collect::<Result<Vec<_>, _>>()?;
    remove_all(ctx, session, &ids)?;

    // The template warmed, the fork pool fills (without a network at first).
    warm_default(ctx, session)?;
    await_pooled(ctx, session, "fork_pooled", CHILDREN as u32)?;
    let (reconnected, ids) = fork_checked(ctx, session, &source, CHILDREN)?;
    fork_pool_takes(&session.log(), &ids, "reconnected")?;
    remove_all(ctx, session, &ids)?;
    // Filled again with the children's network.
    await_pooled(ctx, session, "fork_pooled", CHILDREN as u32)?;
    let (pooled, ids) = fork_checked(ctx, session, &source, CHILDREN)?;
    let taking = fork_pool_takes(&session.log(), &ids, "ready")?;
    remove_all(ctx, session, &ids)?;
    // One child (the goal's fork: one sandbox, as a cold create makes one).
    await_pooled(ctx, session, "fork_pooled", CHILDREN as u32)?;
    // What the busy source's VMM holds of its 256 MiB (the guest gives back what it frees).
    let held = super::vmm_kib(&source, "status", "RssAnon:");
    let (single, ids) = fork_checked(ctx, session, &source, 1)?;
    let log = session.log();
    let in_mvmd = |message: &str, field: &str| {
        ms(logged_durations(&log, message, &source)
            .get(field)
            .copied()
            .unwrap_or_default())
    };
    let single_taking = format!(
        "in mvmd {}: the source (its VMM holding {} MiB of anonymous memory) saved in {} (paused \
         at {}, its memory written at {}, its layer copied at {}), then the child's take {}",
        in_mvmd("sandbox forked", "took"),
        held / 1024,
        in_mvmd("fork source saved", "saved"),
        in_mvmd("fork source saved", "paused"),
        in_mvmd("fork source saved", "dumped"),
        in_mvmd("fork source saved", "copied"),
        fork_pool_takes(&log, &ids, "ready")?
    );
    remove_all(ctx, session, &ids)?;
    Ok(ForkFigures {
        cold,
        forked,
        saved,
        dumped,
        children: Steps::median(&children),
        reconnected,
        pooled,
        taking,
        single,
        single_taking,
    })
}

/// Creates a vm-tier sandbox with `mvm run`'s `options` (its network, and others) whose
/// shells run [`COUNTER`]; returns how long the create took and mvm's answer.
pub(super) fn busy_sandbox(
    ctx: &Ctx,
    session: &MvmdSession,
    options: &[&str],
) -> Result<(Duration, serde_json::Value), String> {
    let mut args = vec!["-o", "json", "run", "--isolation", "vm"];
    args.extend_from_slice(options);
    args.extend_from_slice(&["--", "sh", "-c", COUNTER]);
    let started = Instant::now();
    let out = session.mvm(ctx, &args, None)?;
    let cold = started.elapsed();
    let answer = serde_json::from_str(&out)
        .map_err(|e| format!("mvm run printed no JSON ({e}): {out:?}"))?;
    Ok((cold, answer))
}

/// Removes sandboxes `ids`.
fn remove_all(ctx: &Ctx, session: &MvmdSession, ids: &[String]) -> Result<(), String> {
    for id in ids {
        session.mvm(ctx, &["rm", id], None)?;
    }
    Ok(())
}

/// Checks that each of `ids` was a fork pool's entry whose network was `expected` when
/// taken (mvmd's "fork pool entry taken"); returns each take's time in mvmd.
fn fork_pool_takes(log: &str, ids: &[String], expected: &str) -> Result<String, String> {
    let mut taking = Vec::new();
    for id in ids {
        let taken = logged_fields(log, "fork pool entry taken", id);
        let (Some(network), Some(ready)) = (
            taken.get("network"),
            taken.get("ready").and_then(|d| parse_duration(d)),
        ) else {
            return Err(format!(
                "fork child {id} was not loaded into a fork pool's VMM (no \"fork pool entry \
                 taken\" line with its network and time in mvmd's log)"
            ));
        };
        if network != expected {
            return Err(format!(
                "fork child {id} took a fork pool entry whose network was {network:?}, expected \
                 {expected:?} (the pool starts without a network and refills with the one its \
                 takes ask for)"
            ));
        }
        let steps = logged_durations(log, "fork pool entry loaded", id);
        let step = |name: &str| ms(steps.get(name).copied().unwrap_or_default());
        taking.push(format!(
            "{} (handed at {}, loaded at {}, its agent answering with its new identity at {})",
            ms(ready),
            step("handed"),
            step("loaded"),
            step("reidentified")
        ));
    }
    Ok(taking.join(", "))
}

/// Forks `source` (whose shells run [`COUNTER`]) into `count` children and checks each
/// child and the source (see [`fork_live_sandbox`]); returns how long `mvm fork` took and
/// the children's ids.
fn fork_checked(
    ctx: &Ctx,
    session: &MvmdSession,
    source: &str,
    count: usize,
) -> Result<(Duration, Vec<String>), String> {
    let exec =
        |id: &str, script: &str| session.mvm(ctx, &["exec", id, "--", "sh", "-c", script], None);
    // The source's disk writer runs through the fork (it is quiet between forks, while the
    // fork pool fills on the CPU the sandboxes leave idle).
    let before = exec(source, "rm -f /tmp/quiet; cat /tmp/state")?;
    let at_fork = counted(before.trim())
        .ok_or_else(|| format!("the source's counter wrote {before:?}, not 'forty-two N'"))?;

    // Read through the fork: the source yields the CPU to its children, then has it back.
    let weight = Path::new("/sys/fs/cgroup")
        .join(&session.dirs.cgroup_parent)
        .join(source)
        .join("cpu.weight");
    let forking = Arc::new(AtomicBool::new(true));
    let watcher = {
        let (weight, forking) = (weight.clone(), Arc::clone(&forking));
        std::thread::spawn(move || {
            let mut seen = BTreeSet::new();
            while forking.load(Ordering::Relaxed) {
                if let Ok(w) = std::fs::read_to_string(&weight) {
                    seen.insert(w.trim().to_owned());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            seen
        })
    };
    let started = Instant::now();
    let out = session.mvm(
        ctx,
        &["-o", "json", "fork", source, "-n", &count.to_string()],
        None,
    );
    let forked = started.elapsed();
    forking.store(false, Ordering::Relaxed);
    let seen = watcher
        .join()
        .map_err(|_| "the cpu.weight watcher panicked".to_string())?;
    let out = out?;
    let after = std::fs::read_to_string(&weight).unwrap_or_default();
    if !seen.contains("1") || after.trim() != "100" {
        return Err(format!(
            "the fork's source should yield the CPU to its children (cpu.weight 1) and have it \
             back after (100): {} read {seen:?} during the fork and {after:?} after",
            weight.display()
        ));
    }
    let children: Vec<serde_json::Value> = serde_json::from_str(&out)
        .map_err(|e| format!("mvm fork printed no JSON list ({e}): {out:?}"))?;
    if children.len() != count {
        return Err(format!(
            "mvm fork -n {count} made {} children: {out}",
            children.len()
        ));
    }
    let mut ids: Vec<String> = children.iter().map(sandbox_id).collect();
    ids.push(source.to_owned());
    let mut seen: Vec<(String, String, String)> = Vec::new();
    for id in &ids {
        let said = exec(id, CHILD_REPORT)?;
        let lines: Vec<&str> = said.lines().collect();
        let (Some(first), Some(second)) = (
            lines.first().and_then(|l| counted(l)),
            lines.get(1).and_then(|l| counted(l)),
        ) else {
            return Err(format!(
                "sandbox {id}: the counter's state is gone: {said:?}"
            ));
        };
        if first < at_fork || second <= first {
            return Err(format!(
                "sandbox {id}: the counter read {first} then {second}, the source had {at_fork} \
                 before the fork: it did not go on from there"
            ));
        }
        if lines.get(2) != Some(&"base") || lines.get(3) != Some(&id.as_str()) {
            return Err(format!(
                "sandbox {id}: the file from before the fork or the host name is wrong: {said:?}"
            ));
        }
        if lines.get(6) != Some(&"0") || lines.get(7) != Some(&"synced") {
            return Err(format!(
                "sandbox {id}: its disk is not consistent after the fork (disk errors in its \
                 kernel log, or a synced write did not read back): {said:?}"
            ));
        }
        let field = |i: usize| lines.get(i).map_or(String::new(), |l| l.to_string());
        seen.push((field(3), field(4), field(5)));
    }
    for (what, values) in [
        (
            "host name",
            seen.iter().map(|s| &s.0).collect::<HashSet<_>>(),
        ),
        ("MAC", seen.iter().map(|s| &s.1).collect()),
        ("kernel UUID", seen.iter().map(|s| &s.2).collect()),
    ] {
        if values.len() != ids.len() {
            return Err(format!(
                "the source and its {count} children do not each have their own {what}: {seen:?}"
            ));
        }
    }
    exec(source, "touch /tmp/quiet")?;
    ids.pop();
    Ok((forked, ids))
}

/// Sandboxes of the warm pool in the pool case.
const POOL: u32 = 2;
/// Creates timed from the warm pool: the first finds no entry connected for its network
/// (the pool starts with none), the others do.
const TAKEN: usize = 4;

/// mvmd with a warm pool (`MVM_WARM_POOL=2`): after `mvm templates warm default` it keeps two
/// sandboxes restored from the snapshot (`mvm templates` shows them as `pooled`); each of 4
/// creates with a network takes one (mvmd logs "warm pool entry taken" for it): the first's
/// entry, made without a network, is reconnected; the pool is filled again with that network,
/// so the other three take entries connected for it already. Each is its own machine as a
/// restored one is (host name, address, clock, resolver, MAC, kernel UUID, /dev/urandom bytes,
/// machine id; restored, not booted); the admin's /metrics, which shows every tenant's sandboxes,
/// shows those 4 and none of the pool's; and the pool fills again. Warmed at 2 vCPUs and 320
/// MiB too, the template's snapshot of that size gets a pool of its own (two entries), from
/// which a create of that size takes one (and sees 2 CPUs); it fills again. mvmd's stop
/// destroys the pools (nothing is left). Records create → first output from the pool against
/// a cold create.
pub fn warm_pool_take(ctx: &mut Ctx) -> Outcome {
    if !mvm_testkit::is_root() {
        return Ok(Verdict::Skip("mvmd's vm tier needs root".into()));
    }
    let mut dirs = ManagerDirs::new(ctx, "pool")?;
    dirs.env.push(("MVM_WARM_POOL".into(), POOL.to_string()));
    dirs.env
        .push(("RUST_LOG".into(), "info,mvm_sandbox::manager=debug".into()));
    let (outcome, figures) =
        checked_with_internet(ctx, dirs, |ctx, session| check_pool(ctx, session))?;
    if let (Ok(Verdict::Pass), Some(f)) = (&outcome, figures) {
        ctx.record(
            "vm tier via mvmd: create from the warm pool -> first exec output, each in order (the first reconnected)",
            f.each,
        );
        ctx.record(
            "vm tier via mvmd: create from the warm pool, entry connected already -> first exec output, p50 of 3",
            ms(f.pooled),
        );
        ctx.record(
            "vm tier via mvmd: a warm pool entry taken in mvmd, each in order",
            f.taking,
        );
        ctx.record(
            "vm tier via mvmd: a warm pool entry made after a take (background), steps in mvmd, p50",
            f.refill.to_string(),
        );
        ctx.record(
            "vm tier via mvmd: create from the warm pool / cold create (goal <= 0.15)",
            format!("{:.3}", f.pooled.as_secs_f64() / f.cold.as_secs_f64()),
        );
    }
    outcome
}

/// The `cpu.weight` of each sandbox's cgroup (L1's hierarchy is cgroup v2), by id.
fn cpu_weights(session: &MvmdSession) -> Result<HashMap<String, String>, String> {
    let parent = Path::new("/sys/fs/cgroup").join(&session.dirs.cgroup_parent);
    let dirs =
        std::fs::read_dir(&parent).map_err(|e| format!("cannot list {}: {e}", parent.display()))?;
    let mut weights = HashMap::new();
    for dir in dirs.flatten().filter(|d| d.path().is_dir()) {
        let file = dir.path().join("cpu.weight");
        let weight = std::fs::read_to_string(&file)
            .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        weights.insert(
            dir.file_name().to_string_lossy().into_owned(),
            weight.trim().to_owned(),
        );
    }
    Ok(weights)
}

/// Waits until `mvm templates` shows the default template's snapshot with `POOL` sandboxes
/// pooled.
fn await_pool_full(ctx: &Ctx, session: &MvmdSession) -> Result<(), String> {
    await_pool(ctx, session, POOL)
}

/// Waits until `mvm templates` shows the default template's snapshot with `n` sandboxes
/// pooled (at most a minute per sandbox).
pub(super) fn await_pool(ctx: &Ctx, session: &MvmdSession, n: u32) -> Result<(), String> {
    await_pooled(ctx, session, "pooled", n)
}

/// Waits until `mvm templates` shows the default template's snapshot with `n` entries in
/// its field `field` (`pooled`, `fork_pooled`), at most a minute per entry.
pub(super) fn await_pooled(
    ctx: &Ctx,
    session: &MvmdSession,
    field: &str,
    n: u32,
) -> Result<(), String> {
    await_pooled_at(ctx, session, (1, 256), field, n)
}

/// Waits until `mvm templates` shows the default template's snapshot of `size` (vCPUs, MiB)
/// with `n` entries in its field `field`, at most a minute per entry.
fn await_pooled_at(
    ctx: &Ctx,
    session: &MvmdSession,
    size: (u32, u64),
    field: &str,
    n: u32,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60 * u64::from(n));
    let of_size = |s: &serde_json::Value| s["vcpus"] == size.0 && s["memory_mib"] == size.1;
    loop {
        let listed = session.mvm(ctx, &["-o", "json", "templates"], None)?;
        let templates: serde_json::Value = serde_json::from_str(&listed)
            .map_err(|e| format!("mvm templates printed no JSON ({e}): {listed}"))?;
        let pooled = templates
            .as_array()
            .and_then(|all| all.iter().find(|t| t["name"] == "default"))
            .and_then(|t| {
                let others = t["other_snapshots"].as_array().into_iter().flatten();
                std::iter::once(&t["snapshot"])
                    .chain(others)
                    .find(|s| of_size(s))
            })
            .map(|s| s[field].clone());
        if pooled == Some(serde_json::json!(n)) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "template default's {field} at {size:?} did not reach {n} within {} s: {listed}",
                60 * n
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What the pool case measured.
#[derive(Clone)]
struct PoolFigures {
    /// A cold create → first output, p50.
    cold: Duration,
    /// A create from the pool whose entry was connected for it → first output, p50.
    pooled: Duration,
    /// Each create from the pool → first output, in order (ms).
    each: String,
    /// Each take in mvmd, in order, with how its network was made and how long it took (ms).
    taking: String,
    /// Where the time of the entries made after a take (the refills, in the background)
    /// went in mvmd.
    refill: Steps,
}

/// The pool case's checks; returns what they measured.
fn check_pool(ctx: &Ctx, session: &MvmdSession) -> Result<PoolFigures, String> {
    let (mut cold, cold_ids) = cold_creates(ctx, session)?;
    for id in &cold_ids {
        session.mvm(ctx, &["rm", id], None)?;
    }
    warm_default(ctx, session)?;
    let (pooled, ids) = restored_creates(ctx, session, TAKEN, || await_pool_full(ctx, session))?;
    // The admin's metrics show every tenant's sandboxes: the 4 taken, none of the pool's.
    let metrics = session.get("/metrics")?;
    let mut shown: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("mvm_sandbox_memory_bytes{id=\""))
        .filter_map(|l| l.split('"').next())
        .collect();
    shown.sort();
    let mut mine: Vec<&str> = ids.iter().map(String::as_str).collect();
    mine.sort();
    if shown != mine {
        return Err(format!(
            "the admin's /metrics should show the {TAKEN} sandboxes taken from the pool and \
             none of the pool's own (nobody's), it shows {shown:?}"
        ));
    }
    let log = session.log();
    let mut taking = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let taken = logged_fields(&log, "warm pool entry taken", id);
        let (Some(network), Some(ready)) = (
            taken.get("network"),
            taken.get("ready").and_then(|d| parse_duration(d)),
        ) else {
            return Err(format!(
                "sandbox {id} did not come from the warm pool (no \"warm pool entry taken\" \
                 line with its network and time in mvmd's log)"
            ));
        };
        // The pool starts without a network; it is filled again with the network taken.
        let expected = if i == 0 { "reconnected" } else { "ready" };
        if network != expected {
            return Err(format!(
                "take {} from the warm pool (sandbox {id}): its network was {network:?}, \
                 expected {expected:?} (the pool refills with the network its takes ask for)",
                i + 1
            ));
        }
        let networked = taken.get("networked").and_then(|d| parse_duration(d));
        taking.push(format!(
            "{} ({network}, its network {})",
            ms(ready),
            ms(networked.unwrap_or_default())
        ));
    }
    // The pool's entries are made and wait with the least share of a contended CPU; a
    // taken one has the default share.
    await_pool_full(ctx, session)?;
    let weights = cpu_weights(session)?;
    let (taken, entries): (Vec<_>, Vec<_>) = weights.iter().partition(|(id, _)| ids.contains(id));
    if taken.len() != TAKEN
        || taken.iter().any(|(_, w)| w.as_str() != "100")
        || entries.len() != POOL as usize
        || entries.iter().any(|(_, w)| w.as_str() != "1")
    {
        return Err(format!(
            "cpu.weight of the sandboxes' cgroups: the {TAKEN} taken ({ids:?}) should have 100, \
             the pool's {POOL} entries 1; they have {weights:?}"
        ));
    }
    for id in &ids {
        session.mvm(ctx, &["rm", id], None)?;
    }
    // No fill runs while mvmd stops (its stop destroys the pool).
    await_pool_full(ctx, session)?;
    // A snapshot of another size gets a pool of its own, which a create of that size takes.
    warm_other_size(ctx, session)?;
    await_pooled_at(ctx, session, (2, 320), "pooled", POOL)?;
    let sized = create_of_other_size(ctx, session)?;
    if logged_fields(&session.log(), "warm pool entry taken", &sized).is_empty() {
        return Err(format!(
            "sandbox {sized} of 2 vCPUs, 320 MiB did not come from the pool of that size's \
             snapshot (no \"warm pool entry taken\" line for it)"
        ));
    }
    session.mvm(ctx, &["rm", &sized], None)?;
    await_pooled_at(ctx, session, (2, 320), "pooled", POOL)?;
    // The entries made after the first take (the first two filled the pool at the warm-up).
    let refills = log
        .lines()
        .map(strip_ansi)
        .filter(|line| line.contains("warm pool entry ready"))
        .filter_map(|line| {
            let word = line.split_whitespace().find(|w| w.starts_with("id="))?;
            Some(word.trim_start_matches("id=").to_owned())
        })
        .skip(POOL as usize)
        .map(|id| Steps::of(&log, &id))
        .collect::<Result<Vec<_>, _>>()?;
    let each = pooled.iter().map(|d| ms(*d)).collect::<Vec<_>>().join(", ");
    let mut connected = pooled[1..].to_vec();
    connected.sort();
    cold.sort();
    Ok(PoolFigures {
        cold: cold[COLD / 2],
        pooled: connected[connected.len() / 2],
        each,
        taking: taking.join(", "),
        refill: Steps::median(&refills),
    })
}
