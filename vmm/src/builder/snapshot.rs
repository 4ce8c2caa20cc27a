//! A paused VM → the state a snapshot keeps, and a snapshot → a VM ready to run on.
//!
//! Virtio devices are rebuilt from the configuration in the snapshot (drives reopen their
//! image, network interfaces their tap by name, vsock binds its socket again), then their
//! transport and queues get their saved state and a device that was live is re-activated.
//! Host-side state that cannot come back is dropped: vsock connections (the driver gets a
//! transport reset), frames a net device held, rate limiter buckets (full again).

use std::sync::Arc;

use kvm_bindings::kvm_cpuid_entry2;

use super::{
    attach_legacy_devices, attach_virtio_devices, create_vm, BuildError, DeviceFactory, RunningVm,
};
use crate::config::VmConfig;
use crate::devices::legacy::serial::SerialOut;
use crate::devices::legacy::{SerialDevice, I8042};
use crate::devices::virtio::worker::Frozen;
use crate::exit::VmExit;
use crate::seccomp::Filters;
use crate::snapshot::{MicrovmState, SnapshotError};
use crate::vstate::bus::Bus;
use crate::vstate::memory::{memory_layout, GuestMemory};
use crate::vstate::vcpu::{Vcpu, Vcpus};

/// Reads the state of `vm` (booted from `config`, paused) for a snapshot. The virtio device
/// threads stay frozen (see [`Frozen`]) until the returned guards are dropped: write guest
/// memory before that.
pub fn save_state(
    vm: &RunningVm,
    config: &VmConfig,
) -> Result<(MicrovmState, Vec<Frozen>), SnapshotError> {
    let (virtio, frozen) = vm
        .virtio
        .iter()
        .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).save_state())
        .collect::<Result<(Vec<_>, Vec<_>), _>>()
        .map_err(|e| SnapshotError::Save("a virtio device", e.to_string()))?;
    let state = MicrovmState {
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
        virtio,
    };
    Ok((state, frozen))
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
/// vCPUs and irqchips with their saved state, then legacy and virtio devices (`make_devices`
/// creates them from `config`). Like [`super::build_microvm`], the vCPU threads start held,
/// waiting for [`Vcpus::resume`].
pub fn build_microvm_from_snapshot(
    state: &MicrovmState,
    config: &VmConfig,
    mem: GuestMemory,
    serial_out: SerialOut,
    make_devices: &DeviceFactory<'_>,
    exit: Arc<VmExit>,
    seccomp: &Filters,
) -> Result<RunningVm, BuildError> {
    let devices = make_devices(config, seccomp)?;
    if devices.len() != state.virtio.len() {
        return Err(BuildError::Restore(format!(
            "it has {} virtio devices and its configuration makes {}",
            state.virtio.len(),
            devices.len()
        )));
    }
    let vm = create_vm(&mem, config.machine_config.track_dirty_pages)?;
    let saved = state.vcpus.first().and_then(|v| vendor(&v.cpuid));
    let host = vendor(vm.supported_cpuid().as_slice());
    if saved != host {
        return Err(BuildError::Restore(format!(
            "it was taken on a {} CPU and this host has a {} CPU",
            saved.as_deref().unwrap_or("unknown"),
            host.as_deref().unwrap_or("unknown")
        )));
    }
    // The vCPUs (their local APICs) and the irqchips first: a device raises interrupts as
    // soon as it is restored (a vsock's transport reset, a request that completed), and one
    // raised before would be lost with the irqchips' state loaded over it, or find no APIC
    // to go to: the guest would wait for it until the device's next interrupt.
    let vcpus = state
        .vcpus
        .iter()
        .map(|v| Vcpu::restore(&vm, v))
        .collect::<Result<Vec<_>, _>>()?;
    vm.restore_state(&state.vm)?;
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
    let mut mmio = Bus::new();
    let virtio = attach_virtio_devices(&vm, &mem, devices, &mut mmio, |index, transport| {
        transport
            .restore_state(&state.virtio[index])
            .map_err(|e| BuildError::Restore(format!("virtio device {index}: {e}")))
    })?;
    let vcpus = Vcpus::start(vcpus, Arc::new(pio), Arc::new(mmio), exit, seccomp)?;
    Ok(RunningVm {
        vm,
        mem,
        vcpus,
        serial,
        i8042,
        virtio,
    })
}
