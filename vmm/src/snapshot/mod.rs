//! Snapshots of a paused micro-VM: the state file (vCPUs, in-kernel devices, legacy devices and
//! the configuration that booted the VM, in the versioned [`format`]) and the guest memory
//! file (every region in layout order), restored by mapping that file copy-on-write or, with
//! the [`uffd`] backend, by a page server filling anonymous memory on demand.
//! Virtio devices keep their transport and queue state ([`MmioState`]); their backends come
//! back from the configuration.

pub mod format;
pub mod uffd;

use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{SnapshotType, VmConfig};
use crate::devices::legacy::i8042::I8042State;
use crate::devices::legacy::serial::UartState;
use crate::devices::virtio::mmio::MmioState;
use crate::vstate::memory::{
    dump_dirty, dump_memory, map_anonymous, map_memory_file, maps_file, GuestMemory, MemoryError,
    PageMap,
};
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;
use format::FormatError;
use uffd::UffdError;
use vm_memory::GuestAddress;

/// Everything a snapshot holds besides guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// The configuration the VM was booted with, as Firecracker JSON (postcard cannot carry
    /// its free-form JSON fields).
    pub config_json: String,
    /// Guest memory regions `(guest address, length)` in the order of the memory file.
    pub memory: Vec<(u64, u64)>,
    /// Irqchips, PIT and clock.
    pub vm: VmState,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The UART.
    pub serial: UartState,
    /// The i8042.
    pub i8042: I8042State,
    /// Each virtio-mmio window, in the order the configuration makes the devices.
    pub virtio: Vec<MmioState>,
}

/// Why a snapshot cannot be written or read.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A snapshot or memory file could not be opened, read or written.
    #[error("cannot {0} {1}: {2}")]
    File(&'static str, String, std::io::Error),
    /// The state file is damaged or foreign.
    #[error("snapshot {0}: {1}")]
    Format(String, FormatError),
    /// The memory file does not fit the snapshot.
    #[error(
        "memory file {path} has {found} bytes but the snapshot's guest memory is {expected} \
         bytes: it belongs to another snapshot"
    )]
    MemorySize {
        /// The memory file.
        path: String,
        /// Its size.
        found: u64,
        /// The size the snapshot's layout needs.
        expected: u64,
    },
    /// The state does not describe a VM this VMM can rebuild.
    #[error("snapshot {0} is inconsistent: {1}")]
    Inconsistent(String, String),
    /// Guest memory could not be mapped.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Guest memory could not be handed to the page server (`Uffd` backend).
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// KVM could not give the state of part of the VM.
    #[error("cannot save the state of {0}: {1}")]
    Save(&'static str, String),
    /// A save asked to write the memory file the VM maps.
    #[error(
        "mem_file_path {0} is the memory file this microVM was restored from and still maps: \
         writing it would destroy the guest's memory; save to another path"
    )]
    OwnMemoryFile(String),
}

fn file_error(what: &'static str, path: &str) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_string();
    move |e| SnapshotError::File(what, path, e)
}

impl MicrovmState {
    /// The configuration the VM was booted with.
    pub fn config(&self, path: &str) -> Result<VmConfig, SnapshotError> {
        serde_json::from_str(&self.config_json).map_err(|e| {
            SnapshotError::Inconsistent(path.into(), format!("its configuration: {e}"))
        })
    }

    /// Checks the parts that must agree with each other before a VM is built from them.
    fn check(&self, path: &str) -> Result<(), SnapshotError> {
        let config = self.config(path)?;
        let inconsistent = |why: String| Err(SnapshotError::Inconsistent(path.into(), why));
        let vcpus = usize::from(config.machine_config.vcpu_count);
        if self.vcpus.len() != vcpus
            || self
                .vcpus
                .iter()
                .enumerate()
                .any(|(i, v)| usize::from(v.id) != i)
        {
            return inconsistent(format!(
                "{} vCPU states for machine-config.vcpu_count {vcpus}",
                self.vcpus.len()
            ));
        }
        let total: u64 = self.memory.iter().map(|(_, len)| len).sum();
        if total != config.machine_config.mem_size_mib << 20 {
            return inconsistent(format!(
                "{total} bytes of memory regions for machine-config.mem_size_mib {}",
                config.machine_config.mem_size_mib
            ));
        }
        Ok(())
    }

    /// The guest memory size in bytes.
    pub fn memory_size(&self) -> u64 {
        self.memory.iter().map(|(_, len)| len).sum()
    }
}

/// Writes the state file at `snapshot_path` and guest memory at `mem_file_path` (both
/// replaced if they exist): all of it (`Full`; with this process's `page_map`, the pages
/// never touched are skipped unread), or only its dirty pages at their offsets (`Diff`, see
/// [`dump_dirty`]).
pub fn write_snapshot(
    state: &MicrovmState,
    snapshot_path: &str,
    mem: &GuestMemory,
    mem_file_path: &str,
    snapshot_type: SnapshotType,
    page_map: Option<&mut PageMap>,
) -> Result<(), SnapshotError> {
    let bytes =
        format::encode(state).map_err(|e| SnapshotError::Format(snapshot_path.to_string(), e))?;
    if maps_file(mem, Path::new(mem_file_path)) {
        return Err(SnapshotError::OwnMemoryFile(mem_file_path.to_string()));
    }
    let mut mem_file = File::create(mem_file_path).map_err(file_error("create", mem_file_path))?;
    match snapshot_type {
        SnapshotType::Full => dump_memory(mem, &mut mem_file, page_map),
        SnapshotType::Diff => dump_dirty(mem, &mut mem_file).map(drop),
    }
    .map_err(file_error("write", mem_file_path))?;
    let mut file = File::create(snapshot_path).map_err(file_error("create", snapshot_path))?;
    file.write_all(&bytes)
        .map_err(file_error("write", snapshot_path))
}

/// Where a loaded snapshot's guest memory comes from (`mem_backend` of the load).
#[derive(Debug, Clone, Copy)]
pub enum MemorySource<'a> {
    /// The memory file at this path, mapped private and copy-on-write.
    File(&'a str),
    /// The page server listening on this unix socket, given a userfaultfd for anonymous
    /// memory.
    Uffd(&'a str),
}

/// A snapshot read back: its state, its guest memory and, with the `Uffd` backend, the
/// userfaultfd the page server serves (to keep while the VM lives).
pub struct LoadedSnapshot {
    /// The state file's contents.
    pub state: MicrovmState,
    /// Guest memory laid out as the state says.
    pub mem: GuestMemory,
    /// The VMM's copy of the page server's userfaultfd.
    pub uffd: Option<OwnedFd>,
}

/// Reads and checks the state file at `snapshot_path` and maps its guest memory from
/// `source`.
pub fn read_snapshot(
    snapshot_path: &str,
    source: MemorySource<'_>,
) -> Result<LoadedSnapshot, SnapshotError> {
    let bytes = std::fs::read(snapshot_path).map_err(file_error("read", snapshot_path))?;
    let state: MicrovmState =
        format::decode(&bytes).map_err(|e| SnapshotError::Format(snapshot_path.to_string(), e))?;
    state.check(snapshot_path)?;
    let (mem, uffd) = match source {
        MemorySource::File(path) => (map_file(&state, path)?, None),
        MemorySource::Uffd(socket) => {
            let regions: Vec<_> = state
                .memory
                .iter()
                .map(|&(start, len)| (GuestAddress(start), len as usize))
                .collect();
            let mem = map_anonymous(&regions)?;
            let uffd = uffd::hand_to_page_server(&mem, socket)?;
            (mem, Some(uffd))
        }
    };
    Ok(LoadedSnapshot { state, mem, uffd })
}

/// Maps the memory file at `path` after checking that it fits `state`.
fn map_file(state: &MicrovmState, path: &str) -> Result<GuestMemory, SnapshotError> {
    let mem_file = File::open(path).map_err(file_error("open", path))?;
    let found = mem_file.metadata().map_err(file_error("stat", path))?.len();
    if found != state.memory_size() {
        return Err(SnapshotError::MemorySize {
            path: path.to_string(),
            found,
            expected: state.memory_size(),
        });
    }
    Ok(map_memory_file(&mem_file, &state.memory)?)
}
