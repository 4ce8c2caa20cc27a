//! `mvm build`: runs the guest-kernel and rootfs builders (of a source checkout, or installed
//! in `<prefix>/share/mvm`) with a progress display and returns the template made of their
//! artifacts.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use mvm_sandbox::install;
use mvm_sandbox::model::Template;
use mvm_sandbox::ManagerConfig;

use crate::backend::CliError;

/// `mvm build` options.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Template name to register.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// Directory holding the builders guest-kernel/ and rootfs/: a source checkout or an
    /// installation's share/mvm [default: the checkout this binary was built in, else its
    /// installation's share/mvm, else a checkout around the current directory].
    #[arg(long)]
    pub repo: Option<PathBuf>,
    /// Skip the kernel (only the base image, e.g. for the jail tier): a kernel built before is
    /// kept in the template; without one the template serves the jail tier only.
    #[arg(long)]
    pub skip_kernel: bool,
    /// Extra arguments for rootfs/build.sh, e.g. "--from-oci layout:tag".
    #[arg(long, allow_hyphen_values = true)]
    pub rootfs_args: Option<String>,
    /// Do not warm the template (by default a template with a kernel is warmed where the host
    /// runs the vm tier: see `mvm templates warm`).
    #[arg(long)]
    pub no_warm: bool,
}

/// Whether `dir` holds mvm's image builders.
fn has_builders(dir: &Path) -> bool {
    dir.join("rootfs/build.sh").is_file() && dir.join("guest-kernel/build.sh").is_file()
}

/// The directory holding `rootfs/` and `guest-kernel/`: `explicit`, else a source checkout this
/// binary was built in, else its installation's `share/mvm`, else a checkout around the
/// current directory. The error names every place looked at.
fn find_builders(explicit: Option<&Path>) -> Result<PathBuf, CliError> {
    if let Some(p) = explicit {
        return if has_builders(p) {
            Ok(p.to_path_buf())
        } else {
            Err(CliError::Local(format!(
                "{} has no rootfs/build.sh and guest-kernel/build.sh",
                p.display()
            )))
        };
    }
    let exe_dir = install::exe_dir();
    let cwd = std::env::current_dir().ok();
    let checkout = |start: &Option<PathBuf>| {
        start
            .iter()
            .flat_map(|s| s.ancestors())
            .find(|a| has_builders(a))
            .map(Path::to_path_buf)
    };
    let share = exe_dir.as_deref().and_then(install::share_dir);
    checkout(&exe_dir)
        .or_else(|| share.clone().filter(|s| has_builders(s)))
        .or_else(|| checkout(&cwd))
        .ok_or_else(|| {
            let mut looked = Vec::new();
            looked.extend(exe_dir.map(|d| format!("above {}", d.display())));
            looked.extend(share.map(|d| d.display().to_string()));
            looked.extend(cwd.map(|d| format!("above {}", d.display())));
            CliError::Local(format!(
                "cannot find mvm's image builders (rootfs/build.sh, guest-kernel/build.sh); \
                 looked {}; install mvm with scripts/install.sh, or pass --repo CHECKOUT",
                looked.join(", ")
            ))
        })
}

/// Runs one build step with a spinner showing its latest output line.
fn step(title: &str, mut cmd: Command) -> Result<(), CliError> {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {prefix}: {wide_msg}")
            .expect("static template is valid"),
    );
    bar.set_prefix(title.to_owned());
    bar.enable_steady_tick(Duration::from_millis(120));
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| CliError::Local(format!("{title}: starting {cmd:?}: {e}")))?;
    let stderr = child.stderr.take().expect("piped");
    let err_lines = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            bar.set_message(line);
        }
    }
    let status = child
        .wait()
        .map_err(|e| CliError::Local(format!("{title}: {e}")))?;
    let errs = err_lines.join().unwrap_or_default();
    if !status.success() {
        bar.abandon_with_message(format!("failed ({status})"));
        let tail: Vec<&String> = errs.iter().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().map(String::as_str).collect();
        return Err(CliError::Local(format!(
            "{title} failed:\n{}",
            tail.join("\n")
        )));
    }
    bar.finish_with_message(errs.last().cloned().unwrap_or_else(|| "done".into()));
    Ok(())
}

/// Builds the artifacts and returns the template describing them.
pub fn build(args: &BuildArgs) -> Result<Template, CliError> {
    let builders = find_builders(args.repo.as_deref())?;
    let cfg = ManagerConfig::from_env();
    // Where the manager reads them: a checkout's target/mvm-artifacts, else the manager's
    // default (MVM_ARTIFACTS, or /var/lib/mvm/artifacts for an installed mvm).
    let artifacts = match std::env::var_os("MVM_ARTIFACTS").filter(|v| !v.is_empty()) {
        Some(dir) => PathBuf::from(dir),
        None if builders.join("Cargo.toml").is_file() => builders.join("target/mvm-artifacts"),
        None => cfg
            .artifacts_dir
            .clone()
            .unwrap_or_else(|| "/var/lib/mvm/artifacts".into()),
    };
    let builder = |script: &str| {
        let mut c = Command::new(builders.join(script));
        c.current_dir(&builders).env("MVM_ARTIFACTS", &artifacts);
        c
    };
    if !args.skip_kernel {
        step("guest kernel", builder("guest-kernel/build.sh"))?;
    }
    let mut c = builder("rootfs/build.sh");
    let extra: Vec<&str> = args
        .rootfs_args
        .as_deref()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    // The image gets this mvm's agent, unless the caller names one; a checkout without a
    // built agent leaves it to rootfs/build.sh, which builds it.
    if !extra.contains(&"--agent") {
        let agent = cfg.bin_dir.join("mvm-agent");
        if agent.is_file() {
            c.arg("--agent").arg(agent);
        } else if !builders.join("Cargo.toml").is_file() {
            return Err(CliError::Local(install::helper_missing(
                &cfg.bin_dir,
                "mvm-agent",
            )));
        }
    }
    c.args(extra);
    step("base image", c)?;
    let built = ["vmlinux", "bzImage"]
        .iter()
        .map(|k| artifacts.join(k))
        .find(|p| p.is_file());
    let kernel = match built {
        Some(kernel) => kernel,
        // The jail tier needs only the base image: the template names where the kernel will
        // be, and vm-tier creates say that it is missing until it is built.
        None if args.skip_kernel => artifacts.join("vmlinux"),
        None => {
            return Err(CliError::Local(format!(
                "guest-kernel/build.sh left no vmlinux or bzImage in {}",
                artifacts.display()
            )))
        }
    };
    Ok(Template {
        name: args.name.clone(),
        kernel: kernel.display().to_string(),
        rootfs: artifacts.join("rootfs.ext4").display().to_string(),
        snapshot: None,
        other_snapshots: Vec::new(),
    })
}
