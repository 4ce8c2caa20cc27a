//! The files of the guest's identity in /etc (its resolver, its machine id), kept in memory:
//! each is a file on the /run tmpfs bound over its /etc path, as container runtimes bind
//! theirs. A restored guest takes a new identity by writing them
//! ([`crate::server`]'s identity); written on the root's disk, each write waited for its
//! journal, which a workload busy with that disk keeps full (tens of milliseconds of every
//! restore and fork of a busy guest).

use std::io::Read;
use std::path::Path;

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
    keep_in_memory(
        Path::new(RESOLV_CONF),
        |image| Ok(image.unwrap_or_default()),
    )?;
    keep_in_memory(Path::new(MACHINE_ID), |image| match image {
        Some(id) if !id.trim_ascii().is_empty() => Ok(id),
        _ => new_machine_id(),
    })
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

/// Binds a copy on the /run tmpfs over `path`, holding `contents` of what the image has there
/// (a regular file's bytes, else none).
fn keep_in_memory(
    path: &Path,
    contents: impl FnOnce(Option<Vec<u8>>) -> Result<Vec<u8>, InitError>,
) -> Result<(), InitError> {
    let copy = Path::new(IN_MEMORY).join(path.file_name().expect("a file in /etc"));
    let regular = std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file());
    let image = match regular {
        true => Some(std::fs::read(path).map_err(sys_io(format!("reading {}", path.display())))?),
        false => None,
    };
    std::fs::write(&copy, contents(image)?)
        .map_err(sys_io(format!("writing {}", copy.display())))?;
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
    )))
}
