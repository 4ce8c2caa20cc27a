//! One vCPU's architectural state as KVM exposes it, saved into and restored from a snapshot.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::vm::OptionalCaps;

/// The x87/SSE state of `KVM_GET_FPU`, for hosts without XSAVE (kvm-bindings has no serde for
/// `kvm_fpu`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FpuState {
    fpr: [[u8; 16]; 8],
    fcw: u16,
    fsw: u16,
    ftwx: u8,
    last_opcode: u16,
    last_ip: u64,
    last_dp: u64,
    xmm: [[u8; 16]; 16],
    mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// The floating-point and vector state: XSAVE where KVM has it, else the legacy FPU area.
#[derive(Debug, Serialize, Deserialize)]
pub enum FloatState {
    /// `KVM_GET_XSAVE` (the 4 KiB area) and the extended control registers.
    Xsave {
        /// The XSAVE area.
        xsave: Box<kvm_xsave>,
        /// XCR0 and friends, where KVM has `KVM_CAP_XCRS`.
        xcrs: Option<kvm_xcrs>,
    },
    /// `KVM_GET_FPU`.
    Fpu(FpuState),
}

/// Everything KVM holds about one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (and APIC id).
    pub id: u8,
    /// CPUID as set at boot.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Run state (running, halted, waiting for SIPI...).
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// FPU / XSAVE.
    pub float: FloatState,
    /// Debug registers, where KVM has `KVM_CAP_DEBUGREGS`.
    pub debug_regs: Option<kvm_debugregs>,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// MSRs (see [`crate::arch::x86_64::msr::msrs_to_save`]).
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts and NMIs, where KVM has `KVM_CAP_VCPU_EVENTS`.
    pub events: Option<kvm_vcpu_events>,
}

/// Why a vCPU's state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: KVM {what} failed: {err}")]
    Ioctl {
        /// vCPU index.
        id: u8,
        /// The ioctl.
        what: &'static str,
        /// What KVM said.
        err: kvm_ioctls::Error,
    },
    /// This host's KVM does not take an MSR the snapshot has.
    #[error(
        "vCPU {id}: this host's KVM refuses MSR {index:#x} of the snapshot (another CPU model?)"
    )]
    MsrRefused {
        /// vCPU index.
        id: u8,
        /// The MSR.
        index: u32,
    },
}

/// Reads every MSR of `indices` that KVM can read: KVM_GET_MSRS stops at the first MSR it
/// refuses, which is then left out and the rest read on.
fn get_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, kvm_ioctls::Error> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))?;
        let read = fd.get_msrs(&mut msrs)?;
        saved.extend_from_slice(&msrs.as_slice()[..read]);
        if read < rest.len() {
            log::debug!("KVM cannot read MSR {:#x}; it is not saved", rest[read]);
        }
        rest = rest.get(read + 1..).unwrap_or(&[]);
    }
    Ok(saved)
}

impl VcpuState {
    /// Reads the state of vCPU `id` (which must not be running), saving the MSRs of
    /// `msr_indices`.
    pub fn save(
        fd: &VcpuFd,
        id: u8,
        caps: &OptionalCaps,
        msr_indices: &[u32],
    ) -> Result<Self, VcpuStateError> {
        let err = |what| move |err| VcpuStateError::Ioctl { id, what, err };
        let float = if caps.xsave {
            FloatState::Xsave {
                xsave: Box::new(fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?),
                xcrs: caps
                    .xcrs
                    .then(|| fd.get_xcrs())
                    .transpose()
                    .map_err(err("KVM_GET_XCRS"))?,
            }
        } else {
            FloatState::Fpu(FpuState::from(&fd.get_fpu().map_err(err("KVM_GET_FPU"))?))
        };
        Ok(VcpuState {
            id,
            cpuid: fd
                .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
                .map_err(err("KVM_GET_CPUID2"))?
                .as_slice()
                .to_vec(),
            mp_state: fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?,
            regs: fd.get_regs().map_err(err("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(err("KVM_GET_SREGS"))?,
            float,
            debug_regs: caps
                .debugregs
                .then(|| fd.get_debug_regs())
                .transpose()
                .map_err(err("KVM_GET_DEBUGREGS"))?,
            lapic: fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?,
            msrs: get_msrs(fd, msr_indices).map_err(err("KVM_GET_MSRS"))?,
            events: caps
                .vcpu_events
                .then(|| fd.get_vcpu_events())
                .transpose()
                .map_err(err("KVM_GET_VCPU_EVENTS"))?,
        })
    }

    /// Loads this state into a freshly created vCPU, in the order KVM needs: CPUID first,
    /// then registers, the LAPIC, MSRs (after the LAPIC: the TSC deadline needs it) and the
    /// pending events last.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        let id = self.id;
        let err = |what| move |err| VcpuStateError::Ioctl { id, what, err };
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))
            .map_err(err("KVM_SET_CPUID2"))?;
        fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        fd.set_mp_state(self.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(err("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(err("KVM_SET_SREGS"))?;
        match &self.float {
            FloatState::Xsave { xsave, xcrs } => {
                // SAFETY: `xsave` is a whole kvm_xsave read by KVM_GET_XSAVE, the legacy
                // 4 KiB layout that KVM_SET_XSAVE reads.
                unsafe { fd.set_xsave(xsave) }.map_err(err("KVM_SET_XSAVE"))?;
                if let Some(xcrs) = xcrs {
                    fd.set_xcrs(xcrs).map_err(err("KVM_SET_XCRS"))?;
                }
            }
            FloatState::Fpu(fpu) => fd.set_fpu(&fpu.into()).map_err(err("KVM_SET_FPU"))?,
        }
        if let Some(debug_regs) = &self.debug_regs {
            fd.set_debug_regs(debug_regs)
                .map_err(err("KVM_SET_DEBUGREGS"))?;
        }
        fd.set_lapic(&self.lapic).map_err(err("KVM_SET_LAPIC"))?;
        let msrs = Msrs::from_entries(&self.msrs)
            .map_err(|_| kvm_ioctls::Error::new(libc::E2BIG))
            .map_err(err("KVM_SET_MSRS"))?;
        let written = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
        if let Some(refused) = self.msrs.get(written) {
            return Err(VcpuStateError::MsrRefused {
                id,
                index: refused.index,
            });
        }
        if let Some(events) = &self.events {
            fd.set_vcpu_events(events)
                .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }
}
