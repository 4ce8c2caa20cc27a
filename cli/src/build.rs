//! `mvm build`: runs the repository's guest-kernel and rootfs builders with a progress display
//! and returns the template made of their artifacts.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use mvm_sandbox::model::Template;

use crate::backend::CliError;

/// `mvm build` options.
#[derive(Debug, clap::Args)]
pub struct BuildArgs {
    /// Template name to register.
    #[arg(long, default_value = "default")]
    pub name: String,
    /// mvm source checkout holding guest-kernel/ and rootfs/ [default: found from this binary
    /// or the current directory].
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

fn find_repo(explicit: Option<&Path>) -> Result<PathBuf, CliError> {
    let is_repo =
        |p: &Path| p.join("rootfs/build.sh").is_file() && p.join("guest-kernel/build.sh").is_file();
    if let Some(p) = explicit {
        return if is_repo(p) {
            Ok(p.to_path_buf())
        } else {
            Err(CliError::Local(format!(
                "{} has no rootfs/build.sh and guest-kernel/build.sh",
                p.display()
            )))
        };
    }
    let starts = [std::env::current_exe().ok(), std::env::current_dir().ok()];
    starts
        .iter()
        .flatten()
        .flat_map(|s| s.ancestors())
        .find(|a| is_repo(a))
        .map(Path::to_path_buf)
        .ok_or_else(|| CliError::Local("cannot find the mvm source checkout; pass --repo".into()))
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
    let repo = find_repo(args.repo.as_deref())?;
    let artifacts = std::env::var_os("MVM_ARTIFACTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join("target/mvm-artifacts"));
    if !args.skip_kernel {
        let mut c = Command::new(repo.join("guest-kernel/build.sh"));
        c.current_dir(&repo);
        step("guest kernel", c)?;
    }
    let mut c = Command::new(repo.join("rootfs/build.sh"));
    c.current_dir(&repo);
    if let Some(extra) = &args.rootfs_args {
        c.args(extra.split_whitespace());
    }
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
    })
}
