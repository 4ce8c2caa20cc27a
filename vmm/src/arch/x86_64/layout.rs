//! Guest physical memory layout, after Firecracker's x86_64 layout.
//!
//! ```text
//! 0x0000_0500  GDT                    0x0000_0520  IDT
//! 0x0000_7000  zero page (boot_params) 0x0000_6000  PVH start info + memory map
//! 0x0000_8ff0  boot stack top          0x0000_9000  PML4, then PDPT and 4 page directories
//! 0x0002_0000  kernel command line     0x0009_fc00  EBDA: MP table
//! 0x0010_0000  kernel (HIMEM_START)    0xc000_0000  MMIO gap (1 GiB) up to 4 GiB
//! ```

/// Global descriptor table used for the boot vCPU state.
pub const BOOT_GDT_START: u64 = 0x500;
/// Interrupt descriptor table (empty) used for the boot vCPU state.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` structure.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH memory map entries, right after the start info.
pub const PVH_MEMMAP_START: u64 = 0x6040;
/// Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Top-level page table.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// First of four page directories that identity-map the low 4 GiB with 2 MiB pages.
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line accepted (Linux's COMMAND_LINE_SIZE on x86_64).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// Where the kernel may be loaded, and where RAM above the legacy hole starts.
pub const HIMEM_START: u64 = 0x10_0000;
/// First address past the 32-bit address space.
pub const FIRST_ADDR_PAST_32BITS: u64 = 1 << 32;
/// Size of the MMIO gap below 4 GiB.
pub const MMIO_GAP_SIZE: u64 = 1 << 30;
/// Start of the MMIO gap below 4 GiB: device windows live here, never RAM.
pub const MMIO_GAP_START: u64 = FIRST_ADDR_PAST_32BITS - MMIO_GAP_SIZE;
/// First virtio-mmio device window (Firecracker places its first device here too).
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START + 0x1000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First legacy IRQ line handed to virtio devices.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last IRQ line usable for virtio devices on the in-kernel IOAPIC.
pub const VIRTIO_IRQ_MAX: u32 = 23;
/// Local APIC MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The one-page identity map KVM needs on Intel hosts, placed just under the IOAPIC.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfeff_c000;
/// KVM's three-page TSS region, right after the identity map page.
pub const KVM_TSS_START: u64 = KVM_IDENTITY_MAP_START + 0x1000;
