//! Model-specific registers set on every vCPU before boot.

use kvm_bindings::{kvm_msr_entry, Msrs};

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;

const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The boot MSR values: syscall entry points cleared, fast strings on, write-back MTRRs.
pub fn boot_msrs() -> Msrs {
    let entry = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    Msrs::from_entries(&[
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ])
    .expect("a fixed list well under KVM_MAX_MSR_ENTRIES")
}

/// MSR ranges `(first, count)` that hold guest state worth a snapshot, after Firecracker's
/// list: time stamp counter and deadline, APIC base, feature control, speculation control,
/// SYSENTER, MTRRs and PAT, x2APIC, KVM's paravirtual MSRs, and the syscall/segment MSRs.
/// Performance counters, VMX capabilities, machine-check banks and Hyper-V MSRs are left out.
const SAVED_MSR_RANGES: &[(u32, u32)] = &[
    (MSR_IA32_TSC, 1),
    (0x1b, 1),  // IA32_APIC_BASE
    (0x3a, 2),  // IA32_FEATURE_CONTROL, IA32_TSC_ADJUST
    (0x48, 1),  // IA32_SPEC_CTRL
    (0x140, 1), // MISC_FEATURES_ENABLES
    (MSR_IA32_SYSENTER_CS, 3),
    (MSR_IA32_MISC_ENABLE, 1),
    (0x1d9, 1),       // IA32_DEBUGCTL
    (0x200, 0x100),   // MTRRs, PAT, MTRR_DEF_TYPE
    (0x6e0, 1),       // IA32_TSC_DEADLINE
    (0x800, 0x400),   // x2APIC
    (0x4b56_4d00, 7), // KVM wall clock, system time, async PF, steal time, PV EOI, poll, async PF int
    (0xc000_0080, 5), // EFER, STAR, LSTAR, CSTAR, SYSCALL_MASK
    (0xc000_0100, 4), // FS_BASE, GS_BASE, KERNEL_GS_BASE, TSC_AUX
    (0xc001_0015, 1), // AMD HWCR
];

/// Whether MSR `index` (one KVM lists as saveable) belongs in a snapshot.
pub fn msr_should_save(index: u32) -> bool {
    SAVED_MSR_RANGES
        .iter()
        .any(|&(first, count)| index >= first && index - first < count)
}

/// The MSRs a snapshot saves: those set at boot and those of `kvm_saveable` (KVM's MSR index
/// list) that [`msr_should_save`] keeps, ascending (so the TSC is restored before its
/// deadline).
pub fn msrs_to_save(kvm_saveable: &[u32]) -> Vec<u32> {
    let mut indices: Vec<u32> = boot_msrs().as_slice().iter().map(|e| e.index).collect();
    indices.extend(kvm_saveable.iter().copied().filter(|i| msr_should_save(*i)));
    indices.sort_unstable();
    indices.dedup();
    indices
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_msrs_are_the_boot_ones_plus_kvm_state_ones_in_order() {
        let kvm = [
            0x6e0,
            0x186, /* a perf event select */
            0xc000_0080,
            0x10,
        ];
        let saved = msrs_to_save(&kvm);
        assert!(saved.windows(2).all(|w| w[0] < w[1]), "{saved:x?}");
        assert!(saved.contains(&0x6e0) && saved.contains(&0xc000_0080));
        assert!(!saved.contains(&0x186));
        assert!(saved.contains(&MSR_LSTAR), "boot MSRs are always saved");
        assert_eq!(saved[0], MSR_IA32_TSC);
    }
}
