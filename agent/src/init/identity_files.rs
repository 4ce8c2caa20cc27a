//! The files of the guest's identity in /etc (its resolver, its machine id), kept in memory:
//! each is a file on the /run tmpfs bound over its /etc path, as container runtimes bind
//! theirs. A restored guest takes a new identity by writing them
//! ([`crate::server`]'s identity); written on the root's disk, each write waited for its
//! journal, which a workload busy with that disk keeps full (tens of milliseconds of every
//! restore and fork of a busy guest).

use std::path::Path;

use nix::mount::{mount, MsFlags};

use super::error::{sys, sys_io, InitError};

/// The identity files, in /etc.
const IDENTITY_FILES: [&str; 2] = ["/etc/resolv.conf", "/etc/machine-id"];

/// Where their copies in memory are.
const IN_MEMORY: &str = "/run/mvm";

/// Binds a copy on the /run tmpfs over each of [`IDENTITY_FILES`], holding what the image
/// has there (a regular file's contents; nothing for a link, which a resolver the image
/// would run may be, or a missing file). A path that is not a regular file becomes an empty
/// one first (the bind's mount point). Needs /run mounted ([`super::mount_base`]).
pub fn keep_identity_files_in_memory() -> Result<(), InitError> {
    std::fs::create_dir_all(IN_MEMORY).map_err(sys_io(format!("creating {IN_MEMORY}")))?;
    for path in IDENTITY_FILES.map(Path::new) {
        keep_in_memory(
            path,
            &Path::new(IN_MEMORY).join(path.file_name().expect("a file")),
        )?;
    }
    Ok(())
}

/// Binds `copy` (made from `path`'s contents) over `path`.
fn keep_in_memory(path: &Path, copy: &Path) -> Result<(), InitError> {
    let regular = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());
    let contents = match regular {
        true => std::fs::read(path).map_err(sys_io(format!("reading {}", path.display())))?,
        false => Vec::new(),
    };
    std::fs::write(copy, contents).map_err(sys_io(format!("writing {}", copy.display())))?;
    if !regular {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(sys_io(format!("removing {}", path.display()))(e))
            }
            _ => {}
        }
        std::fs::write(path, b"").map_err(sys_io(format!("creating {}", path.display())))?;
    }
    mount(
        Some(copy),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys(format!(
        "binding {} over {}",
        copy.display(),
        path.display()
    )))
}
