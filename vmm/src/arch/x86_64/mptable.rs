//! Intel MultiProcessor Specification 1.4 table, so the guest finds every vCPU, the IOAPIC and
//! the ISA interrupt routing without ACPI.

use crate::vstate::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, EBDA_START, IOAPIC_START};

/// Most vCPUs a guest may have (the MP table and xAPIC ids are 8-bit; mvm caps at 32).
pub const MAX_VCPUS: u8 = 32;
/// IOAPIC pins routed 1:1 from ISA IRQs.
const IOAPIC_PINS: u8 = 24;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 in the CPU signature, FPU and APIC in the feature flags.
const CPU_SIGNATURE: u32 = 6 << 8;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;

/// Errors while writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// Zero or too many vCPUs.
    #[error("the MP table describes 1 to {MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(u8),
    /// Guest memory does not reach the EBDA.
    #[error("guest memory does not cover the MP table at {EBDA_START:#x}")]
    Write,
}

/// Two's-complement byte sum so the whole structure adds up to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |sum, b| sum.wrapping_add(*b)))
}

/// Builds the MP configuration table (header + entries) for a table placed at `table_addr`.
fn config_table(vcpu_count: u8) -> Vec<u8> {
    let ioapic_id = vcpu_count + 1;
    let mut entries = Vec::new();
    let mut entry_count: u16 = 0;
    for cpu in 0..vcpu_count {
        entries.extend_from_slice(&[0, cpu, APIC_VERSION]);
        entries.push(CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 });
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        entry_count += 1;
    }
    entries.extend_from_slice(&[1, 0]); // bus 0
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entry_count += 2;
    for irq in 0..IOAPIC_PINS {
        // type, interrupt type, flags (conforming), source bus, source IRQ, IOAPIC, pin
        entries.extend_from_slice(&[3, INT_VECTORED, 0, 0, 0, irq, ioapic_id, irq]);
        entry_count += 1;
    }
    // Local interrupts: LINT0 is ExtINT on the BSP, LINT1 is NMI on every CPU.
    entries.extend_from_slice(&[4, INT_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[4, INT_NMI, 0, 0, 0, 0, 0xff, 1]);
    entry_count += 2;

    let length = (44 + entries.len()) as u16;
    let mut table = Vec::with_capacity(length as usize);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&length.to_le_bytes());
    table.extend_from_slice(&[4, 0]); // spec revision 1.4, checksum (patched below)
    table.extend_from_slice(b"MVM     ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// Writes the MP floating pointer and configuration table into the EBDA.
pub fn setup_mptable(mem: &GuestMemory, vcpu_count: u8) -> Result<(), MptableError> {
    if vcpu_count == 0 || vcpu_count > MAX_VCPUS {
        return Err(MptableError::VcpuCount(vcpu_count));
    }
    let table_addr = EBDA_START + 16;
    let mut pointer = Vec::with_capacity(16);
    pointer.extend_from_slice(b"_MP_");
    pointer.extend_from_slice(&(table_addr as u32).to_le_bytes());
    pointer.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]); // length in paragraphs, revision 1.4
    pointer[10] = checksum(&pointer);
    mem.write_slice(&pointer, GuestAddress(EBDA_START))
        .and_then(|()| mem.write_slice(&config_table(vcpu_count), GuestAddress(table_addr)))
        .map_err(|_| MptableError::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    #[test]
    fn tables_checksum_to_zero_and_list_every_cpu() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        setup_mptable(&mem, 32).unwrap();
        let mut pointer = [0u8; 16];
        mem.read_slice(&mut pointer, GuestAddress(EBDA_START))
            .unwrap();
        assert_eq!(&pointer[..4], b"_MP_");
        assert_eq!(sum(&pointer), 0);
        let table = config_table(32);
        let mut written = vec![0u8; table.len()];
        mem.read_slice(&mut written, GuestAddress(EBDA_START + 16))
            .unwrap();
        assert_eq!(written, table);
        assert_eq!(sum(&table), 0);
        let processors = table[44..].chunks(20).take_while(|e| e[0] == 0).count();
        assert_eq!(processors, 32);
        assert!(
            EBDA_START + 16 + table.len() as u64 <= 0xa0000,
            "fits in the EBDA"
        );
    }

    #[test]
    fn vcpu_count_is_checked() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        assert!(setup_mptable(&mem, 0).is_err());
        assert!(setup_mptable(&mem, 33).is_err());
    }
}
