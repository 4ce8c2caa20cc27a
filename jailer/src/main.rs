//! `mvm-jailer`: command-line front end of the [`jailer`] library, compatible with Firecracker's
//! jailer for the options they share.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use jailer::{
    BindMount, CgroupSetting, CgroupVersion, CleanupConfig, JailConfig, JailSymlink, ResourceLimit,
    SeccompPolicy, DEFAULT_CHROOT_BASE, DEFAULT_EXEC_FILE_NAME, DEFAULT_PARENT_CGROUP,
};

/// Runs a program (normally mvm-vmm) in a chroot with its own namespaces and cgroups, as an
/// unprivileged user without capabilities. `--cleanup` removes a jail's directory and cgroups.
#[derive(Debug, Parser)]
#[command(name = "mvm-jailer", version)]
struct Cli {
    /// Jail id: 1-64 letters, digits or '-'; also the hostname and cgroup name.
    #[arg(long)]
    id: String,
    /// Static binary copied into the jail and executed there.
    #[arg(long, required_unless_present = "cleanup")]
    exec_file: Option<PathBuf>,
    /// User id the program runs as: neither 0 (root) nor 4294967295 (-1, "unchanged").
    #[arg(long, required_unless_present = "cleanup")]
    uid: Option<u32>,
    /// Group id the program runs as: neither 0 (root) nor 4294967295 (-1, "unchanged").
    #[arg(long, required_unless_present = "cleanup")]
    gid: Option<u32>,
    /// Base of the jail tree: the jail root is DIR/EXEC_FILE_NAME/ID/root.
    #[arg(long, default_value = DEFAULT_CHROOT_BASE)]
    chroot_base_dir: PathBuf,
    /// Network namespace to join, e.g. /var/run/netns/NAME.
    #[arg(long)]
    netns: Option<PathBuf>,
    /// New session, stdio on /dev/null.
    #[arg(long)]
    daemonize: bool,
    /// Run the program in a new pid namespace (under a minimal reaping init).
    #[arg(long)]
    new_pid_ns: bool,
    /// Mount a procfs of the new pid namespace at /proc (pid entries only); needs --new-pid-ns.
    #[arg(long)]
    mount_proc: bool,
    /// Mount a new devpts instance at /dev/pts (only the jail's own ptys) with /dev/ptmx into it.
    #[arg(long)]
    mount_devpts: bool,
    /// Make /dev/userfaultfd (the host's, Linux 6.1+) in the jail for the jail user: a jailed
    /// VMM's Uffd snapshot backend.
    #[arg(long)]
    dev_userfaultfd: bool,
    /// Cgroup hierarchy: 1 (legacy, per controller) or 2 (unified).
    #[arg(long, default_value = "1", value_parser = parse::<CgroupVersion>)]
    cgroup_version: CgroupVersion,
    /// Cgroup value, e.g. memory.limit_in_bytes=268435456, cpu.max="50000 100000", pids.max=64.
    #[arg(long = "cgroup", value_name = "KEY=VALUE", value_parser = parse::<CgroupSetting>)]
    cgroups: Vec<CgroupSetting>,
    /// Parent cgroup under which the per-id cgroup is made.
    #[arg(long, default_value = DEFAULT_PARENT_CGROUP)]
    parent_cgroup: String,
    /// Resource limit: fsize=BYTES, no-file=N or nproc=N (soft = hard).
    #[arg(long = "resource-limit", value_name = "NAME=N", value_parser = parse::<ResourceLimit>)]
    resource_limits: Vec<ResourceLimit>,
    /// Bind mount HOSTPATH:JAILPATH[:ro|rw] (read-only by default), with the mounts below it; a
    /// directory may replace the jail's /run.
    #[arg(long = "mount", value_name = "HOSTPATH:JAILPATH[:ro|rw]", value_parser = parse::<BindMount>)]
    mounts: Vec<BindMount>,
    /// Symbolic link JAILPATH=TARGET directly under the jail's root (e.g. /bin=usr/bin);
    /// repeatable.
    #[arg(long = "symlink", value_name = "JAILPATH=TARGET", value_parser = parse::<JailSymlink>)]
    symlinks: Vec<JailSymlink>,
    /// Landlock: read/execute anywhere in the jail, write only beneath the --landlock-write dirs.
    #[arg(long)]
    landlock: bool,
    /// Jail directory left writable under --landlock (default /run); repeatable.
    #[arg(long = "landlock-write", value_name = "JAILDIR")]
    landlock_write: Vec<PathBuf>,
    /// Seccomp policy for the program and all it starts, installed right before the exec:
    /// `sandbox` (built in: for untrusted code; denied calls fail with EPERM).
    #[arg(long, value_name = "NAME", value_parser = parse::<SeccompPolicy>)]
    seccomp_policy: Option<SeccompPolicy>,
    /// Seccomp policy from a seccompiler JSON file: every filter in it is installed.
    #[arg(long, value_name = "FILE", conflicts_with = "seccomp_policy")]
    seccomp_filter: Option<PathBuf>,
    /// Remove the jail directory and cgroups of --id instead of starting anything.
    #[arg(long, conflicts_with_all = ["exec_file", "uid", "gid", "netns", "daemonize", "new_pid_ns", "mount_proc", "mount_devpts", "dev_userfaultfd", "cgroups", "resource_limits", "mounts", "landlock", "seccomp_policy", "seccomp_filter"])]
    cleanup: bool,
    /// With --cleanup: file name of the exec file the jail was made for.
    #[arg(long, requires = "cleanup", default_value = DEFAULT_EXEC_FILE_NAME)]
    exec_file_name: String,
    /// Arguments for the jailed program.
    #[arg(last = true, value_name = "ARGS")]
    args: Vec<OsString>,
}

fn parse<T: std::str::FromStr<Err = jailer::Error>>(s: &str) -> Result<T, String> {
    s.parse().map_err(|e: jailer::Error| e.to_string())
}

fn main() -> ExitCode {
    // Before anything else (see `hold_relayed_signals`); `jailer::run` checks it again.
    let _ = jailer::hold_relayed_signals();
    let cli = Cli::parse();
    let result = if cli.cleanup {
        jailer::cleanup(&CleanupConfig {
            id: cli.id,
            exec_file_name: cli.exec_file_name,
            chroot_base_dir: cli.chroot_base_dir,
            parent_cgroup: cli.parent_cgroup,
        })
        .map(|removed| {
            for path in removed {
                println!("removed {}", path.display());
            }
            0
        })
    } else {
        let mut config = JailConfig::new(
            cli.id,
            cli.exec_file.expect("required by clap"),
            cli.uid.expect("required by clap"),
            cli.gid.expect("required by clap"),
        );
        config.chroot_base_dir = cli.chroot_base_dir;
        config.netns = cli.netns;
        config.daemonize = cli.daemonize;
        config.new_pid_ns = cli.new_pid_ns;
        config.mount_proc = cli.mount_proc;
        config.mount_devpts = cli.mount_devpts;
        config.dev_userfaultfd = cli.dev_userfaultfd;
        config.cgroup_version = cli.cgroup_version;
        config.cgroups = cli.cgroups;
        config.parent_cgroup = cli.parent_cgroup;
        config.resource_limits = cli.resource_limits;
        config.mounts = cli.mounts;
        config.symlinks = cli.symlinks;
        config.landlock = cli.landlock;
        config.landlock_write = cli.landlock_write;
        config.seccomp = cli
            .seccomp_policy
            .or(cli.seccomp_filter.map(SeccompPolicy::File));
        config.args = cli.args;
        jailer::run(config)
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("mvm-jailer: error: {e}");
            ExitCode::FAILURE
        }
    }
}
