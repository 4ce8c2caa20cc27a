//! A paused VM → the state a snapshot keeps, and a snapshot → a VM ready to run on.

use std::sync::Arc;

use kvm_bindings::kvm_cpuid_entry2;

use super::{attach_legacy_devices, create_vm, BuildError, RunningVm};
use crate::config::VmConfig;
use crate::devices::legacy::serial::SerialOut;
use crate::devices::legacy::{SerialDevice, I8042};
use crate::exit::VmExit;
use crate::seccomp::Filters;
use crate::snapshot::{MicrovmState, SnapshotError};
use crate::vstate::bus::Bus;
use crate::vstate::memory::{memory_layout, GuestMemory};
use crate::vstate::vcpu::{Vcpu, Vcpus};

/// The devices of `config` that snapshots do not carry yet, by their API name.
fn unsupported_devices(config: &VmConfig) -> Vec<String> {
    let drives = config
        .drives
        .iter()
        .map(|d| format!("drive `{}`", d.drive_id));
    let ifaces = config
        .network_interfaces
        .iter()
        .map(|n| format!("network interface `{}`", n.iface_id));
    let vsock = config.vsock.iter().map(|_| "vsock".to_string());
    drives.chain(ifaces).chain(vsock).collect()
}

/// Reads the state of `vm` (booted from `config`, paused) for a snapshot.
pub fn save_state(vm: &RunningVm, config: &VmConfig) -> Result<MicrovmState, SnapshotError> {
    let unsupported = unsupported_devices(config);
    if !unsupported.is_empty() {
        return Err(SnapshotError::UnsupportedDevices(unsupported.join(", ")));
    }
    Ok(MicrovmState {
        config_json: serde_json::to_string(config).expect("the config always serializes"),
        memory: memory_layout(&vm.mem),
        vm: vm
            .vm
            .save_state()
            .map_err(|e| SnapshotError::Save("the VM", e.to_string()))?,
        vcpus: vm
            .vcpus
            .save_state(&vm.vm)
            .map_err(|e| SnapshotError::Save("a vCPU", e.to_string()))?,
        serial: vm.serial.lock().unwrap_or_else(|p| p.into_inner()).state(),
        i8042: vm.i8042.lock().unwrap_or_else(|p| p.into_inner()).state(),
    })
}

/// The CPU vendor of CPUID leaf 0 (EBX, EDX, ECX), if present.
fn vendor(cpuid: &[kvm_cpuid_entry2]) -> Option<String> {
    let leaf0 = cpuid.iter().find(|e| e.function == 0)?;
    let bytes: Vec<u8> = [leaf0.ebx, leaf0.edx, leaf0.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// Rebuilds the VM a snapshot describes on `mem` (mapped from its memory file): KVM VM,
/// legacy devices and vCPUs with their saved state. Like [`super::build_microvm`], the vCPU
/// threads start held, waiting for [`Vcpus::resume`].
pub fn build_microvm_from_snapshot(
    state: &MicrovmState,
    config: &VmConfig,
    mem: GuestMemory,
    serial_out: SerialOut,
    exit: Arc<VmExit>,
    seccomp: &Filters,
) -> Result<RunningVm, BuildError> {
    if let Some(device) = unsupported_devices(config).first() {
        return Err(BuildError::Restore(format!(
            "the snapshot has {device}, which snapshots do not carry yet"
        )));
    }
    let vm = create_vm(&mem)?;
    let saved = state.vcpus.first().and_then(|v| vendor(&v.cpuid));
    let host = vendor(vm.supported_cpuid().as_slice());
    if saved != host {
        return Err(BuildError::Restore(format!(
            "it was taken on a {} CPU and this host has a {} CPU",
            saved.as_deref().unwrap_or("unknown"),
            host.as_deref().unwrap_or("unknown")
        )));
    }
    let mut pio = Bus::new();
    let (serial, i8042) = attach_legacy_devices(
        &vm,
        &mut pio,
        |irq| {
            SerialDevice::from_state(&state.serial, irq, serial_out).ok_or_else(|| {
                BuildError::Restore("the serial port's receive FIFO is over-full".into())
            })
        },
        |irq| I8042::from_state(exit.clone(), irq, state.i8042.clone()),
    )?;
    let vcpus = state
        .vcpus
        .iter()
        .map(|v| Vcpu::restore(&vm, v))
        .collect::<Result<Vec<_>, _>>()?;
    vm.restore_state(&state.vm)?;
    let vcpus = Vcpus::start(vcpus, Arc::new(pio), Arc::new(Bus::new()), exit, seccomp)?;
    Ok(RunningVm {
        vm,
        mem,
        vcpus,
        serial,
        i8042,
        virtio: Vec::new(),
    })
}
