//! Snapshots of a paused micro-VM: the state file (vCPUs, in-kernel devices, legacy devices and
//! the configuration that booted the VM, in the versioned [`format`]) and the guest memory
//! file (every region in layout order), restored by mapping that file copy-on-write.
//! Virtio devices keep their transport and queue state ([`MmioState`]); their backends come
//! back from the configuration.

pub mod format;

use std::fs::File;
use std::io::Write;

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::devices::legacy::i8042::I8042State;
use crate::devices::legacy::serial::UartState;
use crate::devices::virtio::mmio::MmioState;
use crate::vstate::memory::{dump_memory, map_memory_file, GuestMemory, MemoryError};
use crate::vstate::vcpu_state::VcpuState;
use crate::vstate::vm::VmState;
use format::FormatError;

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
    /// KVM could not give the state of part of the VM.
    #[error("cannot save the state of {0}: {1}")]
    Save(&'static str, String),
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
/// replaced if they exist).
pub fn write_snapshot(
    state: &MicrovmState,
    snapshot_path: &str,
    mem: &GuestMemory,
    mem_file_path: &str,
) -> Result<(), SnapshotError> {
    let bytes =
        format::encode(state).map_err(|e| SnapshotError::Format(snapshot_path.to_string(), e))?;
    let mut mem_file = File::create(mem_file_path).map_err(file_error("create", mem_file_path))?;
    dump_memory(mem, &mut mem_file).map_err(file_error("write", mem_file_path))?;
    let mut file = File::create(snapshot_path).map_err(file_error("create", snapshot_path))?;
    file.write_all(&bytes)
        .map_err(file_error("write", snapshot_path))
}

/// Reads and checks the state file at `snapshot_path` and maps `mem_file_path` as its guest
/// memory (private, copy-on-write).
pub fn read_snapshot(
    snapshot_path: &str,
    mem_file_path: &str,
) -> Result<(MicrovmState, GuestMemory), SnapshotError> {
    let bytes = std::fs::read(snapshot_path).map_err(file_error("read", snapshot_path))?;
    let state: MicrovmState =
        format::decode(&bytes).map_err(|e| SnapshotError::Format(snapshot_path.to_string(), e))?;
    state.check(snapshot_path)?;
    let mem_file = File::open(mem_file_path).map_err(file_error("open", mem_file_path))?;
    let found = mem_file
        .metadata()
        .map_err(file_error("stat", mem_file_path))?
        .len();
    if found != state.memory_size() {
        return Err(SnapshotError::MemorySize {
            path: mem_file_path.to_string(),
            found,
            expected: state.memory_size(),
        });
    }
    let mem = map_memory_file(&mem_file, &state.memory)?;
    Ok((state, mem))
}
