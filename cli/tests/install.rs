//! `scripts/install.sh` and the mvm it installs: the files land in the prefix's standard places
//! (or under DESTDIR), the installed `mvm` builds a base image with the installed builders and
//! runs a jail-tier sandbox with the installed helpers from outside the checkout, a missing
//! helper or builder is an error naming where mvm looked, the systemd unit verifies, and
//! `--uninstall` removes it all.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;

use common::Env;
use mvm_testkit::{bin_dir, root_or_skip, skip_or_fail_in_ci, text, workspace_root};

/// Every binary install.sh installs.
const BINARIES: [&str; 8] = [
    "mvm",
    "mvmd",
    "containerd-shim-mvm-v2",
    "mvm-jailer",
    "mvm-agent",
    "mvm-vmm",
    "mvm-dns",
    "mvm-egress",
];

/// The installed files, relative to the prefix.
const INSTALLED: [&str; 12] = [
    "bin/mvm",
    "bin/mvmd",
    "bin/containerd-shim-mvm-v2",
    "libexec/mvm/mvm-jailer",
    "libexec/mvm/mvm-agent",
    "libexec/mvm/mvm-vmm",
    "libexec/mvm/mvm-dns",
    "libexec/mvm/mvm-egress",
    "share/mvm/rootfs/build.sh",
    "share/mvm/guest-kernel/build.sh",
    "share/mvm/guest-kernel/mvm.config",
    "lib/systemd/system/mvmd.service",
];

/// Builds the binaries install.sh takes with `--bin-dir` (cargo builds only the package under
/// test's own), once per test process.
fn build_binaries() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let ok = Command::new(cargo)
            .args(["build", "-p", "cli", "-p", "api", "-p", "shim"])
            .args(["-p", "jailer", "-p", "agent", "-p", "vmm"])
            .args(["-p", "mvm-sandbox", "--bins"])
            .current_dir(workspace_root())
            .status()
            .expect("running cargo build")
            .success();
        assert!(ok, "building mvm's binaries failed");
    });
}

/// Runs scripts/install.sh with `args` (and DESTDIR when given).
fn install_sh(args: &[&Path], destdir: Option<&Path>) -> Output {
    let mut c = Command::new(workspace_root().join("scripts/install.sh"));
    c.args(args).env_remove("DESTDIR");
    if let Some(d) = destdir {
        c.env("DESTDIR", d);
    }
    c.output().expect("running scripts/install.sh")
}

/// `<prefix>/bin/mvm` as a user runs it after an install: from a directory outside the
/// checkout, with a plain PATH and no variable naming the checkout, on `env`'s state.
fn installed_mvm(env: &Env, prefix: &Path, artifacts: &Path) -> Command {
    let cwd = env.dir.path().join("elsewhere");
    std::fs::create_dir_all(&cwd).unwrap();
    let mut c = Command::new(prefix.join("bin/mvm"));
    c.env_clear()
        .env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        )
        .env("MVM_STATE_DIR", env.dir.path().join("state"))
        .env("MVM_RUN_DIR", env.dir.path().join("run"))
        .env("MVM_ARTIFACTS", artifacts)
        .env("MVM_CGROUP_PARENT", &env.cgroup_parent)
        .current_dir(cwd);
    c
}

/// `systemd-analyze verify UNIT` passes (the unit's syntax, and that ExecStart exists).
fn verify_unit(unit: &Path) {
    let out = match Command::new("systemd-analyze")
        .arg("verify")
        .arg(unit)
        .output()
    {
        Ok(out) => out,
        Err(e) => {
            return skip_or_fail_in_ci(
                "verify_unit",
                &format!("systemd-analyze cannot run ({e}); scripts/deps.sh installs systemd"),
            )
        }
    };
    assert!(
        out.status.success() && !text(&out.stderr).contains("mvmd.service"),
        "systemd-analyze verify {}: {}{}",
        unit.display(),
        text(&out.stdout),
        text(&out.stderr)
    );
}

#[test]
fn an_installed_mvm_runs_a_sandbox_without_the_checkout() {
    if !root_or_skip("an_installed_mvm_runs_a_sandbox_without_the_checkout") {
        return;
    }
    build_binaries();
    let env = Env::new();
    let prefix = env.dir.path().join("prefix");
    let artifacts = env.dir.path().join("artifacts");
    let out = install_sh(
        &[
            Path::new("--prefix"),
            &prefix,
            Path::new("--bin-dir"),
            &bin_dir(),
        ],
        None,
    );
    assert!(out.status.success(), "install.sh: {}", text(&out.stderr));
    for f in INSTALLED {
        assert!(prefix.join(f).is_file(), "{f} is not installed");
    }
    let unit = prefix.join("lib/systemd/system/mvmd.service");
    let unit_text = std::fs::read_to_string(&unit).unwrap();
    assert!(
        unit_text.contains(&format!(
            "\nExecStart={}\n",
            prefix.join("bin/mvmd").display()
        )),
        "{unit_text}"
    );
    verify_unit(&unit);

    // No base image yet: the run says how to make one.
    let mvm = |args: &[&str]| {
        installed_mvm(&env, &prefix, &artifacts)
            .args(args)
            .output()
            .expect("running the installed mvm")
    };
    let run = ["run", "--rm", "--isolation", "jail", "--", "echo", "hi"];
    let out = mvm(&run);
    assert_eq!(out.status.code(), Some(125), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("mvm build"),
        "{}",
        text(&out.stderr)
    );

    // The installed builders make it, with the installed agent, where the installed mvm reads it.
    let out = mvm(&["build", "--skip-kernel", "--no-warm"]);
    assert!(out.status.success(), "mvm build: {}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout),
        format!(
            "template default registered: kernel {} (not built: jail tier only), rootfs {}\n",
            artifacts.join("vmlinux").display(),
            artifacts.join("rootfs.ext4").display()
        )
    );
    let out = mvm(&run);
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "hi\n".into()),
        "{}",
        text(&out.stderr)
    );
    env.assert_empty();

    // A missing helper: the create fails before the sandbox runs, naming where mvm looked,
    // and leaves nothing behind.
    let agent = prefix.join("libexec/mvm/mvm-agent");
    let aside = env.dir.path().join("mvm-agent.aside");
    std::fs::rename(&agent, &aside).unwrap();
    // Only mvm-agent is missing, so mvm still picks libexec/mvm (it holds mvm-jailer).
    let out = mvm(&run);
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{said}");
    assert!(
        said.contains(&format!("{} does not exist", agent.display()))
            && said.contains(&prefix.join("bin").display().to_string())
            && said.contains("scripts/install.sh")
            && said.contains("MVM_BIN_DIR"),
        "{said}"
    );
    std::fs::rename(&aside, &agent).unwrap();
    env.assert_empty();

    // Missing builders: `mvm build` names where it looked.
    let share = prefix.join("share/mvm");
    std::fs::rename(&share, env.dir.path().join("share.aside")).unwrap();
    let out = mvm(&["build", "--skip-kernel", "--no-warm"]);
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{said}");
    assert!(
        said.contains("cannot find mvm's image builders")
            && said.contains(&share.display().to_string()),
        "{said}"
    );
    std::fs::rename(env.dir.path().join("share.aside"), &share).unwrap();

    let out = install_sh(
        &[Path::new("--uninstall"), Path::new("--prefix"), &prefix],
        None,
    );
    assert!(
        out.status.success(),
        "install.sh --uninstall: {}",
        text(&out.stderr)
    );
    let left: Vec<PathBuf> = INSTALLED
        .iter()
        .map(|f| prefix.join(f))
        .filter(|p| p.exists())
        .collect();
    assert!(left.is_empty(), "left after --uninstall: {left:?}");
    assert!(!prefix.join("libexec/mvm").exists() && !share.exists());
}

#[test]
fn destdir_stages_an_install_for_packagers() {
    build_binaries();
    let dir = tempfile::tempdir().unwrap();
    let stage = dir.path().join("stage");
    // A private copy of the binaries: another test's cargo build may replace those of the
    // target directory (with other features) while this one compares.
    let built = dir.path().join("built");
    std::fs::create_dir(&built).unwrap();
    for b in BINARIES {
        std::fs::copy(bin_dir().join(b), built.join(b)).unwrap();
    }
    let out = install_sh(
        &[
            Path::new("--prefix"),
            Path::new("/usr"),
            Path::new("--bin-dir"),
            &built,
        ],
        Some(&stage),
    );
    assert!(out.status.success(), "install.sh: {}", text(&out.stderr));
    for f in INSTALLED {
        assert!(stage.join("usr").join(f).is_file(), "{f} is not staged");
    }
    // The staged files name the final paths, not the staging directory.
    let unit = std::fs::read_to_string(stage.join("usr/lib/systemd/system/mvmd.service")).unwrap();
    assert!(unit.contains("\nExecStart=/usr/bin/mvmd\n"), "{unit}");
    for b in BINARIES {
        let staged = stage.join(if b.starts_with("mvm-") {
            format!("usr/libexec/mvm/{b}")
        } else {
            format!("usr/bin/{b}")
        });
        assert_eq!(
            std::fs::read(&staged).unwrap(),
            std::fs::read(built.join(b)).unwrap(),
            "{b}"
        );
    }

    // A --bin-dir missing a binary: refused, naming it, with nothing written.
    let partial = dir.path().join("partial");
    std::fs::create_dir(&partial).unwrap();
    std::fs::copy(bin_dir().join("mvm"), partial.join("mvm")).unwrap();
    let other = dir.path().join("other");
    let out = install_sh(
        &[
            Path::new("--prefix"),
            Path::new("/usr"),
            Path::new("--bin-dir"),
            &partial,
        ],
        Some(&other),
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!("{}/mvmd is missing", partial.display())),
        "{}",
        text(&out.stderr)
    );
    assert!(!other.exists(), "a failed install wrote into DESTDIR");
}
