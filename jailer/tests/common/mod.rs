//! Shared helpers: run `mvm-jailer` around `jail-probe` and look at what is left on the host.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

pub const JAILER: &str = env!("CARGO_BIN_EXE_mvm-jailer");
pub const PROBE: &str = env!("CARGO_BIN_EXE_jail-probe");
pub const PARENT_CGROUP: &str = "mvm-test";

/// Reports a skipped test or check on the real stderr (libtest's capture would hide `eprintln!`).
pub fn skip(what: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {what}");
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One jail of one test: unique id, chroot base, uid/gid, parent cgroup.
pub struct TestJail {
    pub id: String,
    pub base: PathBuf,
    pub uid: u32,
    pub parent: String,
}

impl TestJail {
    pub fn new(name: &str) -> Self {
        Self::in_parent(name, PARENT_CGROUP)
    }

    /// A jail whose cgroups go below `parent` instead of [`PARENT_CGROUP`].
    pub fn in_parent(name: &str, parent: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let id = format!("{name}-{pid}-{n}");
        let base = PathBuf::from(format!("/tmp/mvm-jailer-tests/{pid}-{n}"));
        std::fs::create_dir_all(&base).unwrap();
        TestJail {
            id,
            base,
            uid: 40000 + (pid % 1000) * 20 + n,
            parent: parent.to_string(),
        }
    }

    /// The jailer's arguments for this jail, before `extra` and `-- probe_args`; an `--id`,
    /// `--exec-file`, `--uid` or `--gid` in `extra` stands in for the jail's own.
    pub fn command(&self, extra: &[&str], probe_args: &[&str]) -> Command {
        let mut c = Command::new(JAILER);
        let uid = self.uid.to_string();
        for (flag, own) in [
            ("--id", self.id.as_str()),
            ("--exec-file", PROBE),
            ("--uid", &uid),
            ("--gid", &uid),
        ] {
            if !extra.contains(&flag) {
                c.args([flag, own]);
            }
        }
        c.arg("--chroot-base-dir").arg(&self.base);
        c.args(["--parent-cgroup", &self.parent]);
        c.args(extra).arg("--").args(probe_args);
        c
    }

    pub fn run(&self, extra: &[&str], probe_args: &[&str]) -> Output {
        self.command(extra, probe_args)
            .output()
            .expect("spawn mvm-jailer")
    }

    pub fn jail_dir(&self) -> PathBuf {
        self.base.join("jail-probe").join(&self.id)
    }

    /// The per-jail cgroup directories that exist now, across all hierarchies.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        cgroup_mounts()
            .into_iter()
            .map(|m| m.join(&self.parent).join(&self.id))
            .filter(|p| p.exists())
            .collect()
    }

    pub fn cgroup_file(&self, hierarchy: &str, file: &str) -> String {
        std::fs::read_to_string(
            Path::new("/sys/fs/cgroup")
                .join(hierarchy)
                .join(&self.parent)
                .join(&self.id)
                .join(file),
        )
        .unwrap_or_else(|e| panic!("read {hierarchy}/{file}: {e}"))
    }

    /// Asserts nothing of this jail remains on the host.
    pub fn assert_nothing_left(&self) {
        assert!(
            !self.jail_dir().exists(),
            "jail dir {} left behind",
            self.jail_dir().display()
        );
        assert_eq!(self.cgroups(), Vec::<PathBuf>::new(), "cgroups left behind");
    }

    /// Runs `mvm-jailer --cleanup` and asserts it left nothing.
    pub fn cleanup(&self) {
        let out = Command::new(JAILER)
            .args([
                "--cleanup",
                "--id",
                &self.id,
                "--exec-file-name",
                "jail-probe",
                "--parent-cgroup",
                &self.parent,
            ])
            .arg("--chroot-base-dir")
            .arg(&self.base)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.assert_nothing_left();
    }
}

impl Drop for TestJail {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// Mount points of every cgroup hierarchy (v1 and v2).
pub fn cgroup_mounts() -> Vec<PathBuf> {
    mvm_sys::cgroup::Hierarchies::read()
        .expect("reading /proc/self/mountinfo")
        .all()
        .iter()
        .map(|h| h.mount_point.clone())
        .collect()
}

/// The probe's `key=value` lines.
pub fn report(out: &Output) -> HashMap<String, String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Waits until the probe `pause` of the jail spawned as `child` (stdout piped) is running.
pub fn await_paused(child: &mut std::process::Child) {
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().expect("a piped stdout")),
        &mut line,
    )
    .expect("the probe's line");
    assert_eq!(line.trim(), "paused=1");
}

/// Asserts success and returns the report.
pub fn ok_report(out: &Output) -> HashMap<String, String> {
    assert!(
        out.status.success(),
        "jailer failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    report(out)
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

pub fn signal_of(out: &Output) -> Option<i32> {
    out.status.signal()
}
