//! Boot vCPU register state: GDT, identity-mapped page tables, long mode (Linux boot protocol) or
//! 32-bit protected mode (PVH), general registers and FPU.

use crate::vstate::memory::GuestMemory;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Address, Bytes, GuestAddress};

use super::layout::*;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Present + writable page-table entry.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page-size bit: a 2 MiB page in a page directory entry.
const PDE_PAGE_SIZE: u64 = 0x80;

/// Errors while writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Guest memory does not cover a boot structure.
    #[error("guest memory is too small for the {0} at {1:#x}")]
    Write(&'static str, u64),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// 64-bit Linux boot protocol: long mode, paging on, RSI = zero page.
    LinuxBoot,
    /// PVH: 32-bit protected mode, paging off, RBX = `hvm_start_info`.
    PvhBoot,
}

/// Builds a GDT entry from flags, base and limit (Intel SDM vol. 3, 3.4.5).
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

/// Decodes a GDT entry into the segment KVM expects.
fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let flags = (entry >> 40) as u16;
    kvm_segment {
        base: ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: {
            let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
            // With 4 KiB granularity the limit counts pages.
            if flags & 0x8000 != 0 {
                (limit << 12) | 0xfff
            } else {
                limit
            }
        },
        selector: u16::from(table_index) * 8,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: if (flags >> 7) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

fn write_u64(
    mem: &GuestMemory,
    value: u64,
    addr: u64,
    what: &'static str,
) -> Result<(), RegsError> {
    mem.write_obj(value, GuestAddress(addr))
        .map_err(|_| RegsError::Write(what, addr))
}

/// Identity-maps the low 4 GiB with 2 MiB pages (the kernel builds its own tables; test guests
/// and early boot code reach RAM, the MMIO gap and the APICs through this map).
fn setup_page_tables(mem: &GuestMemory, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    write_u64(mem, PDPTE_START | PTE_PRESENT_RW, PML4_START, "PML4")?;
    for gib in 0..4u64 {
        let pd = PDE_START + gib * 0x1000;
        write_u64(mem, pd | PTE_PRESENT_RW, PDPTE_START + gib * 8, "PDPT")?;
        for entry in 0..512u64 {
            let phys = (gib << 30) | (entry << 21);
            write_u64(
                mem,
                phys | PTE_PRESENT_RW | PDE_PAGE_SIZE,
                pd + entry * 8,
                "page directory",
            )?;
        }
    }
    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PG;
    Ok(())
}

/// Writes the GDT and an empty IDT and loads flat segments for `protocol`.
fn setup_segments(
    mem: &GuestMemory,
    sregs: &mut kvm_sregs,
    protocol: BootProtocol,
) -> Result<(), RegsError> {
    let gdt: [u64; 4] = match protocol {
        BootProtocol::LinuxBoot => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS
        ],
        BootProtocol::PvhBoot => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xc09b, 0, 0xffff_ffff), // 32-bit code
            gdt_entry(0xc093, 0, 0xffff_ffff), // data
            gdt_entry(0x008b, 0, 0x67),        // TSS
        ],
    };
    for (index, entry) in gdt.iter().enumerate() {
        write_u64(mem, *entry, BOOT_GDT_START + index as u64 * 8, "GDT")?;
    }
    write_u64(mem, 0, BOOT_IDT_START, "IDT")?;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (std::mem::size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 |= X86_CR0_PE;
    match protocol {
        BootProtocol::LinuxBoot => sregs.efer |= EFER_LME | EFER_LMA,
        BootProtocol::PvhBoot => {
            sregs.cr0 |= X86_CR0_ET;
            sregs.cr4 = 0;
        }
    }
    Ok(())
}

/// Fills `sregs` (read from the vCPU) with the boot state for `protocol`.
pub fn setup_sregs(
    mem: &GuestMemory,
    sregs: &mut kvm_sregs,
    protocol: BootProtocol,
) -> Result<(), RegsError> {
    setup_segments(mem, sregs, protocol)?;
    if protocol == BootProtocol::LinuxBoot {
        setup_page_tables(mem, sregs)?;
    }
    Ok(())
}

/// General registers at the kernel entry point.
pub fn boot_regs(entry: GuestAddress, protocol: BootProtocol) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry.raw_value(),
        ..Default::default()
    };
    match protocol {
        BootProtocol::LinuxBoot => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootProtocol::PvhBoot => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// FPU state after reset (x87 control word 0x37f, MXCSR 0x1f80).
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn long_mode_segments_and_paging() {
        let mem = mem();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, &mut sregs, BootProtocol::LinuxBoot).unwrap();
        assert_eq!(sregs.cs.selector, 8);
        assert_eq!(sregs.cs.l, 1);
        assert_eq!(sregs.ds.selector, 0x10);
        assert_eq!(sregs.tr.selector, 0x18);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(
            sregs.cr0 & (X86_CR0_PE | X86_CR0_PG),
            X86_CR0_PE | X86_CR0_PG
        );
        assert_eq!(sregs.cr3, PML4_START);
        // The last 2 MiB page below 4 GiB maps the APIC window onto itself.
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START + 3 * 0x1000 + 511 * 8))
            .unwrap();
        assert_eq!(last & !0xfff, 0xffe0_0000);
    }

    #[test]
    fn pvh_is_flat_protected_mode_without_paging() {
        let mem = mem();
        let mut sregs = kvm_sregs::default();
        setup_sregs(&mem, &mut sregs, BootProtocol::PvhBoot).unwrap();
        assert_eq!(sregs.cs.db, 1);
        assert_eq!(sregs.cs.l, 0);
        assert_eq!(sregs.cs.limit, 0xffff_ffff);
        assert_eq!(sregs.cr0 & X86_CR0_PG, 0);
        assert_eq!(sregs.efer & EFER_LME, 0);
        assert_eq!(
            boot_regs(GuestAddress(0x1000), BootProtocol::PvhBoot).rbx,
            PVH_INFO_START
        );
    }
}
