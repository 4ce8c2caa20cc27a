//! Guest CPUID: KVM's supported set, filtered per vCPU with topology, APIC ids and the
//! hypervisor bit. Every leaf that describes the topology (Intel 0x1, 0x4, 0xB, 0x1F; AMD
//! 0x8000_0008, 0x8000_001D, 0x8000_001E) tells the same story as Firecracker's normalization:
//! one package of `vcpu_count` logical processors, paired into cores with SMT, APIC id = vCPU
//! index, never the host's counts.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_FEATURES: u32 = 0x7;
const LEAF_PERFMON: u32 = 0xa;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_HYPERVISOR: u32 = 0x4000_0000;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

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

/// Fills one subleaf of leaf 0xB or 0x1F: SMT level, core level (the package), then invalid.
fn extended_topology(entry: &mut kvm_cpuid_entry2, apic_id: u32, vcpus: u32, threads: u32) {
    entry.flags |= KVM_CPUID_FLAG_SIGNIFCANT_INDEX;
    entry.edx = apic_id;
    entry.ecx = entry.index & 0xff;
    match entry.index {
        0 => {
            entry.eax = id_bits(threads);
            entry.ebx = threads;
            entry.ecx |= 1 << 8; // SMT level
        }
        1 => {
            entry.eax = id_bits(vcpus);
            entry.ebx = vcpus;
            entry.ecx |= 2 << 8; // core level
        }
        _ => {
            // Level type 0: no die, module or tile levels above the cores.
            entry.eax = 0;
            entry.ebx = 0;
        }
    }
}

/// Adjusts KVM's supported CPUID for vCPU `vcpu_id`.
pub fn filter_cpuid(cpuid: &mut CpuId, vcpu_id: u8, topology: Topology, hide_xsave: bool) {
    let vcpus = u32::from(topology.vcpu_count);
    let threads_per_core: u32 = if topology.smt && vcpus > 1 { 2 } else { 1 };
    // Logical processors sharing a cache described by leaf 0x4 / 0x8000_001D EAX: the core's
    // threads for L1 and L2, the whole package for L3.
    let cache_sharing = |eax: u32| {
        if (eax >> 5) & 0x7 >= 3 {
            vcpus.max(1)
        } else {
            threads_per_core
        }
    };
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
                let cores = (vcpus / threads_per_core).max(1);
                entry.eax &= 0x3fff;
                entry.eax |= ((cores - 1) << 26) | ((cache_sharing(entry.eax) - 1) << 14);
            }
            LEAF_AMD_CACHE_TOPOLOGY => {
                // Same layout as leaf 0x4 for EAX[25:14]; EAX[31:26] is reserved.
                entry.eax &= 0x3fff;
                entry.eax |= (cache_sharing(entry.eax) - 1) << 14;
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
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                extended_topology(entry, apic_id, vcpus, threads_per_core)
            }
            LEAF_AMD_SIZES => {
                // ECX[7:0]: logical processors - 1; ECX[15:12]: APIC id bits for them.
                entry.ecx &= !0xf0ff;
                entry.ecx |= (vcpus.max(1) - 1) | (id_bits(vcpus) << 12);
            }
            LEAF_AMD_EXT_APIC_ID => {
                // EAX: extended APIC id; EBX: core id and threads per core - 1; ECX: node 0 of
                // one node.
                entry.eax = apic_id;
                entry.ebx = ((threads_per_core - 1) << 8) | (apic_id / threads_per_core);
                entry.ecx = 0;
                entry.edx = 0;
            }
            _ => {}
        }
    }
    *cpuid = CpuId::from_entries(&entries).expect("filtering never grows the CPUID list");
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// An entry with the host's (here: a 64-core, 2-socket host's) values in every register.
    fn host_entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx: 0xdead,
            ..Default::default()
        }
    }

    #[test]
    fn every_topology_leaf_describes_the_vms_vcpus() {
        let l1 = (1 << 5) | 1;
        let l3 = (3 << 5) | 3;
        let mut cpuid = CpuId::from_entries(&[
            host_entry(LEAF_TOPOLOGY_V2, 0, 1, 2, 0x100),
            host_entry(LEAF_TOPOLOGY_V2, 1, 7, 128, 0x201),
            host_entry(LEAF_TOPOLOGY_V2, 2, 8, 256, 0x502),
            host_entry(LEAF_AMD_SIZES, 0, 0x3030, 0, 0x0003_707f),
            host_entry(LEAF_AMD_CACHE_TOPOLOGY, 0, l1 | (1 << 14), 0x3f, 0x3f),
            host_entry(LEAF_AMD_CACHE_TOPOLOGY, 3, l3 | (15 << 14), 0x3f, 0x3f),
            host_entry(LEAF_AMD_EXT_APIC_ID, 0, 0x41, 0x120, 0x101),
        ])
        .unwrap();
        filter_cpuid(
            &mut cpuid,
            3,
            Topology {
                vcpu_count: 4,
                smt: true,
            },
            false,
        );
        let regs: Vec<_> = cpuid
            .as_slice()
            .iter()
            .map(|e| (e.function, e.index, e.eax, e.ebx, e.ecx, e.edx))
            .collect();
        assert_eq!(
            regs,
            [
                // 0x1F like 0xB: 2 threads per core (1 id bit), 4 per package (2 bits), then
                // no further level; EDX is the x2APIC id.
                (LEAF_TOPOLOGY_V2, 0, 1, 2, 0x100, 3),
                (LEAF_TOPOLOGY_V2, 1, 2, 4, 0x201, 3),
                (LEAF_TOPOLOGY_V2, 2, 0, 0, 0x2, 3),
                // 4 logical processors (NC 3), 2 APIC id bits; PerfTscSize kept.
                (LEAF_AMD_SIZES, 0, 0x3030, 0, 0x0003_2003, 0xdead),
                // L1 shared by the core's 2 threads, L3 by all 4.
                (
                    LEAF_AMD_CACHE_TOPOLOGY,
                    0,
                    l1 | (1 << 14),
                    0x3f,
                    0x3f,
                    0xdead
                ),
                (
                    LEAF_AMD_CACHE_TOPOLOGY,
                    3,
                    l3 | (3 << 14),
                    0x3f,
                    0x3f,
                    0xdead
                ),
                // APIC id 3 is thread 1 of core 1; one node.
                (LEAF_AMD_EXT_APIC_ID, 0, 3, (1 << 8) | 1, 0, 0),
            ]
        );
        let flags = cpuid.as_slice()[0].flags;
        assert_ne!(flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX, 0);
    }

    #[test]
    fn without_smt_every_vcpu_is_a_core() {
        let mut cpuid = CpuId::from_entries(&[
            host_entry(LEAF_AMD_SIZES, 0, 0, 0, 0x707f),
            host_entry(LEAF_AMD_EXT_APIC_ID, 0, 0x41, 0x120, 0x101),
        ])
        .unwrap();
        filter_cpuid(
            &mut cpuid,
            2,
            Topology {
                vcpu_count: 3,
                smt: false,
            },
            false,
        );
        let e = cpuid.as_slice();
        assert_eq!(e[0].ecx, 0x2002);
        assert_eq!((e[1].eax, e[1].ebx), (2, 2));
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!(
            [id_bits(1), id_bits(2), id_bits(3), id_bits(32)],
            [0, 1, 2, 5]
        );
    }
}
