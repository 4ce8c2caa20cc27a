//! Boot information handed to the guest: the Linux zero page with its e820 map, or the PVH
//! `hvm_start_info` with its memory map.

use crate::vstate::memory::GuestMemory;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_start_info};
use vm_memory::{Address, ByteValued, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::*;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Errors while writing boot information.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The e820 table has no room left.
    #[error("too many e820 entries for the zero page")]
    E820Full,
    /// The zero page could not be written.
    #[error("cannot write the zero page: {0}")]
    ZeroPage(linux_loader::configurator::Error),
    /// The PVH start info could not be written.
    #[error("cannot write the PVH start info: {0}")]
    StartInfo(linux_loader::configurator::Error),
}

/// Where an initrd was placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct InitrdPlacement {
    /// Guest physical address of the first byte.
    pub address: GuestAddress,
    /// Size in bytes.
    pub size: usize,
}

/// The guest's RAM map as (start, size, e820 type), shared by both boot protocols.
fn memory_map(mem: &GuestMemory) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, 0xa0000 - EBDA_START, E820_RESERVED),
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push((start, end - start, E820_RAM));
        }
    }
    map
}

/// Writes the Linux zero page. `loader_header` is the setup header of a bzImage, if that is
/// what was loaded.
pub fn write_zero_page(
    mem: &GuestMemory,
    cmdline_size: usize,
    initrd: Option<InitrdPlacement>,
    loader_header: Option<setup_header>,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = loader_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size as u32;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.address.raw_value() as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    for (start, size, kind) in memory_map(mem) {
        let index = params.e820_entries as usize;
        let entry = params
            .e820_table
            .get_mut(index)
            .ok_or(BootError::E820Full)?;
        entry.addr = start;
        entry.size = size;
        entry.r#type = kind;
        params.e820_entries += 1;
    }
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootError::ZeroPage)
}

/// `hvm_start_info` made writable to guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: hvm_start_info is a plain-old-data C struct of integers without implicit padding.
unsafe impl ByteValued for StartInfo {}

/// One PVH memory map entry made writable to guest memory.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: hvm_memmap_table_entry is a plain-old-data C struct of integers without padding.
unsafe impl ByteValued for MemmapEntry {}

/// Writes the PVH start info and memory map (the PVH boot protocol's zero page).
pub fn write_pvh_start_info(
    mem: &GuestMemory,
    initrd: Option<InitrdPlacement>,
) -> Result<(), BootError> {
    let memmap: Vec<MemmapEntry> = memory_map(mem)
        .into_iter()
        .map(|(addr, size, type_)| {
            MemmapEntry(hvm_memmap_table_entry {
                addr,
                size,
                type_,
                reserved: 0,
            })
        })
        .collect();
    // The module list (the initrd, if any) sits right after the memory map.
    let modlist =
        GuestAddress(PVH_MEMMAP_START + (memmap.len() * std::mem::size_of::<MemmapEntry>()) as u64);
    let info = StartInfo(hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() {
            modlist.raw_value()
        } else {
            0
        },
        ..Default::default()
    });
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
    if let Some(initrd) = initrd {
        // hvm_modlist_entry: paddr, size, cmdline_paddr, reserved.
        params.set_modules(
            &[initrd.address.raw_value(), initrd.size as u64, 0, 0],
            modlist,
        );
    }
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::StartInfo)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn zero_page_holds_cmdline_and_memory_map() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        write_zero_page(&mem, 42, None, None).unwrap();
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.cmdline_size }, 42);
        assert_eq!(params.e820_entries, 3);
        let high = params.e820_table[2];
        assert_eq!(
            ({ high.addr }, { high.size }),
            (HIMEM_START, (64 << 20) - HIMEM_START)
        );
    }

    #[test]
    fn pvh_start_info_has_magic_and_memmap() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        write_pvh_start_info(&mem, None).unwrap();
        let info: StartInfo = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.0.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.0.memmap_entries, 3);
        let last: MemmapEntry = mem
            .read_obj(GuestAddress(PVH_MEMMAP_START + 2 * 24))
            .unwrap();
        assert_eq!(last.0.addr, HIMEM_START);
    }
}
