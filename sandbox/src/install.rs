//! Where mvm finds the files it runs besides its own executable: the helper binaries a manager
//! starts (`mvm-jailer`, `mvm-agent`, `mvm-vmm`, the resolver `mvm-dns`, the egress proxy
//! `mvm-egress`) and the image
//! builders `mvm build` runs. They lie next to the executable in a cargo target directory; in
//! an installation (`scripts/install.sh`) the executable is `<prefix>/bin/mvm` (or `mvmd`, or
//! the shim), the helpers are in `<prefix>/libexec/mvm` and the builders in `<prefix>/share/mvm`.

use std::path::{Path, PathBuf};

/// Environment variable naming the helper binaries' directory, overriding the search.
pub const BIN_DIR_ENV: &str = "MVM_BIN_DIR";

/// The helper binaries a manager starts, looked for together.
pub const HELPERS: [&str; 5] = [
    "mvm-jailer",
    "mvm-agent",
    "mvm-vmm",
    "mvm-dns",
    "mvm-egress",
];

/// The directory of the running executable (symlinks resolved).
pub fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()?
        .parent()
        .map(Path::to_path_buf)
}

/// Where the helper binaries are looked for, in order, for an executable in `exe_dir`: that
/// directory itself, then its prefix's `libexec/mvm`.
pub fn helper_dirs(exe_dir: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![exe_dir.to_path_buf()];
    dirs.extend(exe_dir.parent().map(|prefix| prefix.join("libexec/mvm")));
    dirs
}

/// The installed builders' directory (`rootfs/build.sh`, `guest-kernel/build.sh`) of the
/// prefix an executable in `exe_dir` belongs to.
pub fn share_dir(exe_dir: &Path) -> Option<PathBuf> {
    exe_dir.parent().map(|prefix| prefix.join("share/mvm"))
}

/// The helper binaries' directory: `MVM_BIN_DIR` when set, else the first of [`helper_dirs`]
/// holding `mvm-jailer`, else the executable's own directory (a create then fails with
/// [`helper_missing`]).
pub fn helper_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(BIN_DIR_ENV).filter(|v| !v.is_empty()) {
        return dir.into();
    }
    let Some(exe_dir) = exe_dir() else {
        return "/usr/local/libexec/mvm".into();
    };
    helper_dirs(&exe_dir)
        .into_iter()
        .find(|d| d.join(HELPERS[0]).is_file())
        .unwrap_or(exe_dir)
}

/// What to tell a user when helper `name` is not in `dir`: where mvm looked and how to fix
/// it.
pub fn helper_missing(dir: &Path, name: &str) -> String {
    let looked = match std::env::var_os(BIN_DIR_ENV).filter(|v| !v.is_empty()) {
        Some(v) => format!("{BIN_DIR_ENV} is {}", Path::new(&v).display()),
        None => format!(
            "{BIN_DIR_ENV} is unset, so mvm looked next to its executable, then in its \
             prefix's libexec/mvm: {}",
            exe_dir()
                .map(|d| helper_dirs(&d))
                .unwrap_or_default()
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    format!(
        "{} does not exist ({looked}); install mvm with scripts/install.sh, or set \
         {BIN_DIR_ENV} to the directory of {}",
        dir.join(name).display(),
        HELPERS.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_installed_executable_looks_in_its_prefix() {
        assert_eq!(
            helper_dirs(Path::new("/opt/mvm/bin")),
            [Path::new("/opt/mvm/bin"), Path::new("/opt/mvm/libexec/mvm")]
        );
        assert_eq!(
            share_dir(Path::new("/usr/local/bin")).as_deref(),
            Some(Path::new("/usr/local/share/mvm"))
        );
    }
}
