//! The KVM virtual machine: capabilities, guest memory slots, in-kernel irqchip and PIT.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::memory::GuestMemory;
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};

/// Errors while creating or setting up the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error(
        "cannot open /dev/kvm: {0} (is the kvm module loaded, and may this user open /dev/kvm?)"
    )]
    OpenKvm(kvm_ioctls::Error),
    /// The KVM API version is not the stable one.
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    /// A capability mvm relies on is missing.
    #[error("this host's KVM lacks {0:?}, which mvm needs")]
    MissingCap(Cap),
    /// A KVM ioctl failed.
    #[error("KVM {0} failed: {1}")]
    Ioctl(&'static str, kvm_ioctls::Error),
}

/// Capabilities a snapshot uses where this host's KVM has them (each has a fallback).
#[derive(Clone, Copy, Debug, Default)]
pub struct OptionalCaps {
    /// KVM_GET/SET_XSAVE (else the legacy FPU area).
    pub xsave: bool,
    /// KVM_GET/SET_XCRS.
    pub xcrs: bool,
    /// KVM_GET/SET_DEBUGREGS.
    pub debugregs: bool,
    /// KVM_GET/SET_VCPU_EVENTS.
    pub vcpu_events: bool,
}

/// A KVM VM with its guest memory registered.
pub struct Vm {
    fd: VmFd,
    supported_cpuid: CpuId,
    caps: OptionalCaps,
    saveable_msrs: Vec<u32>,
}

/// The in-kernel devices of a VM: PIC pair, IOAPIC, PIT and the kvmclock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// PIC master, PIC slave and IOAPIC (KVM_GET_IRQCHIP for each).
    pub irqchips: Vec<kvm_irqchip>,
    /// The i8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock, so guest time continues from the snapshot's.
    pub clock: kvm_clock_data,
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

const REQUIRED_CAPS: &[Cap] = &[
    Cap::Irqchip,
    Cap::Ioeventfd,
    Cap::Irqfd,
    Cap::UserMemory,
    Cap::SetTssAddr,
    Cap::Pit2,
    Cap::ExtCpuid,
    Cap::MpState,
];

impl Vm {
    /// Opens KVM and creates a VM, checking every capability mvm uses up front.
    pub fn new() -> Result<Self, VmError> {
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != kvm_bindings::KVM_API_VERSION as i32 {
            return Err(VmError::ApiVersion(version));
        }
        if let Some(cap) = REQUIRED_CAPS.iter().find(|c| !kvm.check_extension(**c)) {
            return Err(VmError::MissingCap(*cap));
        }
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| VmError::Ioctl("KVM_GET_SUPPORTED_CPUID", e))?;
        let caps = OptionalCaps {
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            debugregs: kvm.check_extension(Cap::Debugregs),
            vcpu_events: kvm.check_extension(Cap::VcpuEvents),
        };
        let saveable_msrs = kvm
            .get_msr_index_list()
            .map_err(|e| VmError::Ioctl("KVM_GET_MSR_INDEX_LIST", e))?
            .as_slice()
            .to_vec();
        let fd = kvm
            .create_vm()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_VM", e))?;
        Ok(Vm {
            fd,
            supported_cpuid,
            caps,
            saveable_msrs,
        })
    }

    /// The optional capabilities this host's KVM has.
    pub fn caps(&self) -> &OptionalCaps {
        &self.caps
    }

    /// The MSRs KVM lists as saveable (KVM_GET_MSR_INDEX_LIST).
    pub fn saveable_msrs(&self) -> &[u32] {
        &self.saveable_msrs
    }

    /// Reads the in-kernel irqchips, PIT and clock (the vCPUs must be paused).
    pub fn save_state(&self) -> Result<VmState, VmError> {
        let irqchips = IRQCHIPS
            .iter()
            .map(|&chip_id| {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                self.fd
                    .get_irqchip(&mut chip)
                    .map(|()| chip)
                    .map_err(|e| VmError::Ioctl("KVM_GET_IRQCHIP", e))
            })
            .collect::<Result<_, _>>()?;
        Ok(VmState {
            irqchips,
            pit: self
                .fd
                .get_pit2()
                .map_err(|e| VmError::Ioctl("KVM_GET_PIT2", e))?,
            clock: self
                .fd
                .get_clock()
                .map_err(|e| VmError::Ioctl("KVM_GET_CLOCK", e))?,
        })
    }

    /// Loads saved irqchips, PIT and clock into this VM (after [`Vm::setup_irqchip`]).
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmError> {
        self.fd
            .set_pit2(&state.pit)
            .map_err(|e| VmError::Ioctl("KVM_SET_PIT2", e))?;
        // Only the clock value is set: the flags KVM_GET_CLOCK reports are not for KVM_SET_CLOCK.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        self.fd
            .set_clock(&clock)
            .map_err(|e| VmError::Ioctl("KVM_SET_CLOCK", e))?;
        for chip in &state.irqchips {
            self.fd
                .set_irqchip(chip)
                .map_err(|e| VmError::Ioctl("KVM_SET_IRQCHIP", e))?;
        }
        Ok(())
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The CPUID entries KVM can give a guest on this host.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// Registers every guest memory region as a KVM memory slot (slot = region index), with
    /// KVM's dirty page log when `track_dirty_pages`.
    pub fn register_memory(
        &self,
        mem: &GuestMemory,
        track_dirty_pages: bool,
    ) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| {
                    VmError::Ioctl(
                        "KVM_SET_USER_MEMORY_REGION (host address)",
                        kvm_ioctls::Error::new(libc::EFAULT),
                    )
                })?;
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host as u64,
                flags: if track_dirty_pages {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
            };
            // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM (the
            // builder keeps both together), and slots do not overlap.
            unsafe { self.fd.set_user_memory_region(mem_region) }
                .map_err(|e| VmError::Ioctl("KVM_SET_USER_MEMORY_REGION", e))?;
        }
        Ok(())
    }

    /// KVM's dirty page log of every slot of `mem` (registered with `track_dirty_pages`):
    /// per region, one bit per 4 KiB page that the guest wrote since the last call (which
    /// clears it).
    pub fn dirty_log(&self, mem: &GuestMemory) -> Result<Vec<Vec<u64>>, VmError> {
        mem.iter()
            .enumerate()
            .map(|(slot, region)| {
                self.fd
                    .get_dirty_log(slot as u32, region.len() as usize)
                    .map_err(|e| VmError::Ioctl("KVM_GET_DIRTY_LOG", e))
            })
            .collect()
    }

    /// Creates the in-kernel PIC/IOAPIC/LAPICs and the PIT.
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(|e| VmError::Ioctl("KVM_SET_IDENTITY_MAP_ADDR", e))?;
        self.fd
            .set_tss_address(KVM_TSS_START as usize)
            .map_err(|e| VmError::Ioctl("KVM_SET_TSS_ADDR", e))?;
        self.fd
            .create_irq_chip()
            .map_err(|e| VmError::Ioctl("KVM_CREATE_IRQCHIP", e))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd
            .create_pit2(pit)
            .map_err(|e| VmError::Ioctl("KVM_CREATE_PIT2", e))
    }
}
