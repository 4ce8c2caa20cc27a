//! Guest CPUID: KVM's supported set, filtered per vCPU with topology, APIC ids and the
//! hypervisor bit.

use kvm_bindings::{CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;

const ECX_XSAVE: u32 = 1 << 26;
const ECX_OSXSAVE: u32 = 1 << 27;
const ECX_AVX: u32 = 1 << 28;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EBX7_AVX2: u32 = 1 << 5;
/// AVX-512 foundation and its extensions in leaf 7 EBX.
const EBX7_AVX512: u32 =
    (1 << 16) | (1 << 17) | (1 << 21) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 30) | (1 << 31);

/// The guest's CPU topology.
#[derive(Clone, Copy, Debug)]
pub struct Topology {
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// Whether vCPUs are presented as pairs of hyper-threads.
    pub smt: bool,
}

/// The processor's CPUID answer for `leaf` on this host.
fn host_cpuid(leaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid(leaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// True when this host is itself a guest of QEMU's TCG, whose emulated SVM leaves XCR0 stale
/// across nested entries: XSAVE must then be hidden from our guests (their kernels would die
/// restoring extended state).
pub fn host_is_qemu_tcg() -> bool {
    let [_, ebx, ecx, edx] = host_cpuid(LEAF_HYPERVISOR);
    let mut vendor = [0u8; 12];
    vendor[..4].copy_from_slice(&ebx.to_le_bytes());
    vendor[4..8].copy_from_slice(&ecx.to_le_bytes());
    vendor[8..].copy_from_slice(&edx.to_le_bytes());
    host_cpuid(LEAF_FEATURES)[2] & ECX_HYPERVISOR != 0 && &vendor == b"TCGTCGTCGTCG"
}

/// Number of bits needed to hold ids 0..count-1.
fn id_bits(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

/// Adjusts KVM's supported CPUID for vCPU `vcpu_id`.
pub fn filter_cpuid(cpuid: &mut CpuId, vcpu_id: u8, topology: Topology, hide_xsave: bool) {
    let vcpus = u32::from(topology.vcpu_count);
    let threads_per_core: u32 = if topology.smt && vcpus > 1 { 2 } else { 1 };
    let apic_id = u32::from(vcpu_id);
    let mut entries = cpuid.as_slice().to_vec();
    if hide_xsave {
        entries.retain(|e| e.function != LEAF_XSAVE);
    }
    for entry in entries.iter_mut() {
        match entry.function {
            LEAF_FEATURES => {
                // Initial APIC id, logical processor count, CLFLUSH line size (8 × 8 bytes).
                entry.ebx = (apic_id << 24) | (vcpus.max(1) << 16) | (8 << 8);
                entry.ecx |= ECX_HYPERVISOR;
                if hide_xsave {
                    entry.ecx &= !(ECX_XSAVE | ECX_OSXSAVE | ECX_AVX);
                }
                if vcpus > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing the cache - 1.
                let cache_level = (entry.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 {
                    vcpus
                } else {
                    threads_per_core
                };
                let cores = (vcpus / threads_per_core).max(1);
                entry.eax &= 0x3fff;
                entry.eax |= ((cores - 1) << 26) | ((sharing.max(1) - 1) << 14);
            }
            LEAF_EXT_FEATURES if entry.index == 0 && hide_xsave => {
                entry.ebx &= !(EBX7_AVX2 | EBX7_AVX512);
            }
            // No virtual PMU.
            LEAF_PERFMON => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            LEAF_TOPOLOGY => {
                entry.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
                entry.edx = apic_id;
                entry.ecx = entry.index & 0xff;
                match entry.index {
                    0 => {
                        entry.eax = id_bits(threads_per_core);
                        entry.ebx = threads_per_core;
                        entry.ecx |= 1 << 8; // SMT level
                    }
                    1 => {
                        entry.eax = id_bits(vcpus);
                        entry.ebx = vcpus;
                        entry.ecx |= 2 << 8; // core level
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                    }
                }
            }
            _ => {}
        }
    }
    *cpuid = CpuId::from_entries(&entries).expect("filtering never grows the CPUID list");
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn apic_id_topology_and_xsave() {
        let mut cpuid = CpuId::from_entries(&[
            entry(LEAF_FEATURES, 0),
            entry(LEAF_TOPOLOGY, 0),
            entry(LEAF_TOPOLOGY, 1),
            entry(LEAF_XSAVE, 0),
        ])
        .unwrap();
        cpuid.as_mut_slice()[0].ecx = ECX_XSAVE | ECX_AVX;
        filter_cpuid(
            &mut cpuid,
            3,
            Topology {
                vcpu_count: 4,
                smt: false,
            },
            true,
        );
        let e = cpuid.as_slice();
        assert_eq!(e.len(), 3, "the XSAVE leaf is gone");
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ecx & (ECX_XSAVE | ECX_AVX), 0);
        assert_ne!(e[0].ecx & ECX_HYPERVISOR, 0);
        assert_eq!((e[1].ebx, e[1].edx), (1, 3));
        assert_eq!((e[2].eax, e[2].ebx), (2, 4));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(
            [id_bits(1), id_bits(2), id_bits(3), id_bits(32)],
            [0, 1, 2, 5]
        );
    }
}
