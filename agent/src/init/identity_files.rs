//! The files of the guest's identity in /etc (its resolver, its machine id), kept in memory:
//! each is a file on the /run tmpfs bound over its /etc path, as container runtimes bind
//! theirs. A restored guest takes a new identity by writing them
//! ([`crate::server`]'s identity); written on the root's disk, each write waited for its
//! journal, which a workload busy with that disk keeps full (tens of milliseconds of every
//! restore and fork of a busy guest).

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{mount, MsFlags};

use super::error::{sys, sys_io, InitError};
use super::net::RESOLV_CONF;

/// The machine id file (systemd's format: 32 lowercase hex digits and a newline).
pub const MACHINE_ID: &str = "/etc/machine-id";

/// Where the copies in memory are.
const IN_MEMORY: &str = "/run/mvm";

/// Binds a copy on the /run tmpfs over /etc/resolv.conf and /etc/machine-id, holding what the
/// image has there: a regular file's contents; for a link (which a resolver the image would
/// run may be) or a missing file, an empty resolver, and a new machine id where the image has
/// none (empty or missing, as systemd makes one at a first boot). A path that is not a regular
/// file becomes an empty one first (the bind's mount point). Needs /run mounted
/// ([`super::mount_base`]).
pub fn keep_identity_files_in_memory() -> Result<(), InitError> {
    std::fs::create_dir_all(IN_MEMORY).map_err(sys_io(format!("creating {IN_MEMORY}")))?;
    keep_in_memory(Path::new(RESOLV_CONF))?;
    let machine_id = keep_in_memory(Path::new(MACHINE_ID))?;
    if is_blank(&machine_id)? {
        std::fs::write(&machine_id, new_machine_id()?)
            .map_err(sys_io(format!("writing {}", machine_id.display())))?;
    }
    Ok(())
}

/// A machine id's line: `id` (16 bytes) in lower-case hex.
pub fn machine_id_line(id: &[u8]) -> String {
    let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}\n")
}

/// A new machine id's line, from the kernel's RNG (/dev/urandom: it does not wait for the
/// RNG's initialization, which a guest at boot may not have).
fn new_machine_id() -> Result<Vec<u8>, InitError> {
    let mut id = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut rng| rng.read_exact(&mut id))
        .map_err(sys_io("reading /dev/urandom for a machine id"))?;
    Ok(machine_id_line(&id).into_bytes())
}

/// Binds a copy on the /run tmpfs over `path`, holding what the image has there (a regular
/// file's bytes, else nothing), and returns the copy's path.
fn keep_in_memory(path: &Path) -> Result<PathBuf, InitError> {
    let copy = Path::new(IN_MEMORY).join(path.file_name().expect("a file in /etc"));
    // The image's file is copied by the kernel, not read into the agent: its size is the image's.
    let copied = match make_regular_file(path)? {
        true => std::fs::copy(path, &copy).map(drop),
        false => std::fs::write(&copy, b""),
    };
    copied.map_err(sys_io(format!(
        "copying {} to {}",
        path.display(),
        copy.display()
    )))?;
    mount(
        Some(&copy),
        path,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(sys(format!(
        "binding {} over {}",
        copy.display(),
        path.display()
    )))?;
    Ok(copy)
}

/// Makes `path` a regular file: anything else there (a link, e.g. to a resolver the image
/// would run) is removed and, like a missing file, replaced by an empty one. Returns whether a
/// regular file was there already.
pub(super) fn make_regular_file(path: &Path) -> Result<bool, InitError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => return Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        _ => std::fs::remove_file(path).map_err(sys_io(format!("removing {}", path.display())))?,
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(sys_io(format!("creating {}", path.display())))?;
    Ok(false)
}

/// Whether the file at `path` holds no machine id: nothing but white space in its first bytes
/// (a machine id's line is 33).
fn is_blank(path: &Path) -> Result<bool, InitError> {
    let mut head = Vec::with_capacity(64);
    std::fs::File::open(path)
        .and_then(|file| file.take(64).read_to_end(&mut head))
        .map_err(sys_io(format!("reading {}", path.display())))?;
    Ok(head.trim_ascii().is_empty())
}
