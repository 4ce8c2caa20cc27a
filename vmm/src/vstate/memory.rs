//! Guest RAM: anonymous host memory laid out around the MMIO gap below 4 GiB. Each region
//! carries a bitmap of the pages the VMM itself wrote (virtio devices), which with KVM's
//! dirty log makes the dirty pages of a `Diff` snapshot.

use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::{AtomicBitmap, Bitmap, BitmapSlice, NewBitmap, BS};
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
use vm_memory::volatile_memory::VolatileSlice;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap,
};

use crate::arch::x86_64::layout::{FIRST_ADDR_PAST_32BITS, MMIO_GAP_START};

/// Guest memory type used throughout the VMM: writes through it mark their pages in the
/// region's bitmap.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// The smallest guest accepted: room for the boot structures and a tiny kernel.
pub const MIN_MEM_SIZE_MIB: u64 = 2;

/// Errors while sizing or mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Zero or too little memory was asked for.
    #[error("mem_size_mib {0} is too small: a guest needs at least {MIN_MEM_SIZE_MIB} MiB")]
    TooSmall(u64),
    /// More memory than this host has was asked for.
    #[error(
        "mem_size_mib {requested} is larger than this host's {host} MiB of RAM; ask for less memory"
    )]
    LargerThanHost {
        /// Requested size in MiB.
        requested: u64,
        /// Host RAM in MiB.
        host: u64,
    },
    /// The host refused to map the memory.
    #[error("cannot map {0} MiB of guest memory: {1}")]
    Map(u64, String),
}

/// Splits `size` bytes of guest RAM into the regions of the x86_64 layout: RAM below the MMIO
/// gap, and whatever does not fit there from 4 GiB upwards.
pub fn arch_memory_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (
                GuestAddress(FIRST_ADDR_PAST_32BITS),
                (size - MMIO_GAP_START) as usize,
            ),
        ]
    }
}

/// Total RAM of this host in MiB, from /proc/meminfo.
pub fn host_memory_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Checks a requested guest size against the layout's minimum and the host's RAM.
pub fn validate_mem_size(mem_size_mib: u64) -> Result<(), MemoryError> {
    if mem_size_mib < MIN_MEM_SIZE_MIB {
        return Err(MemoryError::TooSmall(mem_size_mib));
    }
    if let Some(host) = host_memory_mib() {
        if mem_size_mib > host {
            return Err(MemoryError::LargerThanHost {
                requested: mem_size_mib,
                host,
            });
        }
    }
    Ok(())
}

/// Maps guest RAM of `mem_size_mib` MiB (anonymous, private, not reserved up front).
pub fn create_guest_memory(mem_size_mib: u64) -> Result<GuestMemory, MemoryError> {
    validate_mem_size(mem_size_mib)?;
    map_anonymous(&arch_memory_regions(mem_size_mib << 20))
}

/// Maps `regions` anonymous and private (not reserved up front): guest RAM that starts as
/// zeros, or that a page server fills on first touch (the `Uffd` snapshot backend).
pub fn map_anonymous(regions: &[(GuestAddress, usize)]) -> Result<GuestMemory, MemoryError> {
    GuestMemoryMmap::from_ranges(regions).map_err(|e| {
        let total: usize = regions.iter().map(|(_, len)| len).sum();
        MemoryError::Map((total >> 20) as u64, e.to_string())
    })
}

/// The `(start, length)` of every region, in layout order.
pub fn memory_layout(mem: &GuestMemory) -> Vec<(u64, u64)> {
    mem.iter()
        .map(|r| (r.start_addr().raw_value(), r.len()))
        .collect()
}

/// The unit a saved memory file skips when it holds only zeros.
const PAGE: usize = 4096;
/// Guest memory whose pages a save picks at once (a window of a region).
const DUMP_WINDOW: usize = 2 << 20;

/// Writes every region of `mem` to the new, empty `file`, one after the other in layout
/// order. Pages of zeros (what the guest never touched) are left as holes: the file takes
/// only what the guest used, and a private mapping of it reads zeros there. With this
/// process's `page_map`, pages never touched are skipped without being read, and the pages
/// of a restored VM that are still its memory file's are copied from that file in the
/// kernel (see [`PageMap`]); without it every page is read. The last page is always
/// written, so that the file has its full length (with the `pwrite64` the VMM
/// thread's seccomp filter allows).
pub fn dump_memory(
    mem: &GuestMemory,
    file: &mut File,
    mut page_map: Option<&mut PageMap>,
) -> std::io::Result<()> {
    let out: &File = file;
    let in_memory = |region: &GuestRegionMmap<AtomicBitmap>, at: usize, pages: Range<usize>| {
        let Some(map) = page_map.as_deref_mut() else {
            return Ok(vec![true; pages.len()]);
        };
        let held = map.held_pages(region, pages.clone())?;
        if let Some(backing) = region.file_offset() {
            for run in page_runs(0..held.len(), |page| held[page] == Held::File) {
                let offset = ((pages.start + run.start) * PAGE) as u64;
                let len = ((run.len() * PAGE) as u64).min(region.len() - offset);
                let from = backing.start() + offset;
                mvm_sys::sparse::copy_range(backing.file(), from, out, at as u64 + offset, len)?;
            }
        }
        Ok(held.iter().map(|&h| h == Held::Memory).collect())
    };
    write_runs(mem, in_memory, |run, at, last| {
        write_used_pages(out, &run, at, last)
    })
    .map(drop)
}

/// Hands to `put` the runs of pages of `mem` that `picked` selects (asked a window of a
/// region's pages at a time, [`DUMP_WINDOW`] worth, with the region's offset in a full
/// memory file, it answers a flag per page), and the last page of all, each as guest memory
/// with its offset in a full memory file (regions one after the other in layout order) and
/// whether it ends the file. Returns the pages handed.
fn write_runs(
    mem: &GuestMemory,
    mut picked: impl FnMut(
        &GuestRegionMmap<AtomicBitmap>,
        usize,
        Range<usize>,
    ) -> std::io::Result<Vec<bool>>,
    mut put: impl FnMut(GuestSlice<'_>, usize, bool) -> std::io::Result<()>,
) -> std::io::Result<usize> {
    let total: usize = mem.iter().map(|r| r.len() as usize).sum();
    let mut file_offset = 0usize;
    let mut handed = 0;
    for region in mem.iter() {
        let slice = region
            .as_volatile_slice()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let pages = slice.len().div_ceil(PAGE);
        let last_region = file_offset + slice.len() == total;
        for first in (0..pages).step_by(DUMP_WINDOW / PAGE) {
            let window = first..(first + DUMP_WINDOW / PAGE).min(pages);
            let picked = picked(region, file_offset, window.clone())?;
            let selected = |page: usize| picked[page - first] || (last_region && page + 1 == pages);
            for run in page_runs(window, selected) {
                let len = (run.end * PAGE).min(slice.len()) - run.start * PAGE;
                let run_slice = slice
                    .subslice(run.start * PAGE, len)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let at = file_offset + run.start * PAGE;
                put(run_slice, at, at + len == total)?;
                handed += run.len();
            }
        }
        file_offset += slice.len();
    }
    Ok(handed)
}

/// Where a saved page's bytes are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    /// Nowhere: never touched, and no data of a file behind it (zeros, left as a hole).
    Nowhere,
    /// In memory (or swapped out): anonymous memory the guest touched, or the guest's own
    /// copy of a page of the file behind it.
    Memory,
    /// In the file mapped behind it, which holds data there: never changed by the guest.
    File,
}

/// This process's page map (`/proc/self/pagemap`): which pages of guest memory were ever
/// touched, in memory or swapped out, and, in a restored VM's private mapping of its memory
/// file, which are still the file's (a page the guest wrote is a copy of its own). A save
/// skips the untouched pages without reading them: reading one would fault it in, a zero
/// page of anonymous memory, or a page of the file mapped into the VMM for nothing; it
/// copies the file's pages from the file, in the kernel. Not for memory a page server fills
/// (`Uffd`): its untouched pages are the server's.
pub struct PageMap(File);

/// A page map entry's bits: the page is in memory, swapped out, a page of a file's page
/// cache (not a private copy).
const PAGE_PRESENT: u64 = 1 << 63;
const PAGE_SWAPPED: u64 = 1 << 62;
const PAGE_FILE: u64 = 1 << 61;

impl PageMap {
    /// This process's page map; `None` where it cannot be read (a jail without /proc).
    pub fn open() -> Option<PageMap> {
        File::open("/proc/self/pagemap").ok().map(PageMap)
    }

    /// The page map's entries of the `pages` of `region`.
    fn entries(
        &mut self,
        region: &GuestRegionMmap<AtomicBitmap>,
        pages: Range<usize>,
    ) -> std::io::Result<Vec<u64>> {
        let mut entries = vec![0u8; pages.len() * 8];
        let first = region.as_ptr() as usize / PAGE + pages.start;
        self.0.read_exact_at(&mut entries, (first * 8) as u64)?;
        Ok(entries
            .chunks_exact(8)
            .map(|e| u64::from_ne_bytes(e.try_into().expect("chunks of 8")))
            .collect())
    }

    /// Where each of the `pages` of `region` is held (see [`Held`]).
    fn held_pages(
        &mut self,
        region: &GuestRegionMmap<AtomicBitmap>,
        pages: Range<usize>,
    ) -> std::io::Result<Vec<Held>> {
        let entries = self.entries(region, pages.clone())?;
        let Some(backing) = region.file_offset() else {
            return Ok(entries
                .iter()
                .map(|e| match e & (PAGE_PRESENT | PAGE_SWAPPED) {
                    0 => Held::Nowhere,
                    _ => Held::Memory,
                })
                .collect());
        };
        // A private mapping of a file: untouched or only read, a page is the file's.
        let mut held: Vec<Held> = entries
            .iter()
            .map(|e| {
                match (
                    e & PAGE_SWAPPED != 0,
                    e & PAGE_PRESENT != 0,
                    e & PAGE_FILE != 0,
                ) {
                    (true, _, _) | (false, true, false) => Held::Memory,
                    _ => Held::Nowhere,
                }
            })
            .collect();
        let start = backing.start() + (pages.start * PAGE) as u64;
        let end = (start + (pages.len() * PAGE) as u64).min(backing.start() + region.len());
        for data in mvm_sys::sparse::data_ranges(backing.file(), start, end)? {
            let from = ((data.start - start) as usize) / PAGE;
            let to = ((data.end - start) as usize)
                .div_ceil(PAGE)
                .min(pages.len());
            held[from..to]
                .iter_mut()
                .filter(|h| **h == Held::Nowhere)
                .for_each(|h| *h = Held::File);
        }
        Ok(held)
    }
}

/// Marks in the regions' bitmaps the pages that `kvm_log` (KVM's dirty log, one `Vec` per
/// region, a bit per page) says the guest wrote: the bitmaps then hold every dirty page, and
/// keep them if writing a snapshot fails (reading KVM's log cleared it).
pub fn mark_dirty(mem: &GuestMemory, kvm_log: &[Vec<u64>]) {
    for (region, log) in mem.iter().zip(kvm_log) {
        for (index, word) in log.iter().enumerate() {
            let mut bits = *word;
            while bits != 0 {
                let page = index * 64 + bits.trailing_zeros() as usize;
                region.bitmap().mark_dirty(page * PAGE, PAGE);
                bits &= bits - 1;
            }
        }
    }
}

/// Writes the dirty pages of `mem` (marked in its regions' bitmaps: the VMM's own writes and
/// what [`mark_dirty`] added) to the new, empty `file` at their offsets in a full memory
/// file (regions one after the other in layout order, as [`dump_memory`]), leaving holes
/// elsewhere: merged over the snapshot it follows, it makes a full memory file. The last
/// page is always written, so the file has its full length. Returns the pages written.
pub fn dump_dirty(mem: &GuestMemory, file: &mut File) -> std::io::Result<usize> {
    let dirty = |region: &GuestRegionMmap<AtomicBitmap>, _: usize, pages: Range<usize>| {
        Ok(pages
            .map(|page| region.bitmap().dirty_at(page * PAGE))
            .collect())
    };
    write_runs(mem, dirty, |run, at, _| write_guest_at(file, &run, at))
}

/// Forgets the VMM's own writes to `mem` (after a snapshot: the next `Diff` starts here).
pub fn reset_dirty(mem: &GuestMemory) {
    for region in mem.iter() {
        MmapRegion::bitmap(region).reset();
    }
}

/// A run of guest memory a save writes.
type GuestSlice<'a> = VolatileSlice<'a, BS<'a, AtomicBitmap>>;

/// A page of zeros, which a saved page is compared with.
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// Whether `bytes` (at most a page) are all zero: compared with [`ZERO_PAGE`] by libc's
/// `memcmp`, which tells a used page (nearly always nonzero near its start) by its first
/// bytes, and scans a page of zeros a vector at a time (a byte loop took ≈ 15 k
/// instructions a page: most of a save's own work where a guest holds pages of zeros).
fn is_zero<B: BitmapSlice>(bytes: &VolatileSlice<'_, B>) -> bool {
    assert!(bytes.len() <= PAGE, "is_zero compares at most a page");
    let guard = bytes.ptr_guard();
    // SAFETY: the guard keeps `bytes.len()` bytes mapped at its pointer and `ZERO_PAGE` has
    // at least as many; `memcmp` only reads both, and no Rust reference into guest memory is
    // made.
    unsafe {
        libc::memcmp(
            guard.as_ptr().cast(),
            ZERO_PAGE.as_ptr().cast(),
            bytes.len(),
        ) == 0
    }
}

/// Writes `bytes` at `offset` in `file` straight from guest memory (no copy in the VMM: a
/// save's cost is the kernel's copy into the file).
fn write_guest_at<B: BitmapSlice>(
    file: &File,
    bytes: &VolatileSlice<'_, B>,
    offset: usize,
) -> std::io::Result<()> {
    let guard = bytes.ptr_guard();
    let mut done = 0;
    while done < bytes.len() {
        // SAFETY: the guard keeps `bytes.len()` bytes of guest memory mapped at its pointer;
        // `pwrite64` only reads `bytes.len() - done` of them past `done`, and no Rust
        // reference into guest memory is made.
        let written = unsafe {
            libc::pwrite64(
                file.as_raw_fd(),
                guard.as_ptr().add(done).cast(),
                bytes.len() - done,
                (offset + done) as libc::off64_t,
            )
        };
        match written {
            0 => return Err(std::io::ErrorKind::WriteZero.into()),
            n if n > 0 => done += n as usize,
            _ => match std::io::Error::last_os_error() {
                e if e.kind() == std::io::ErrorKind::Interrupted => {}
                e => return Err(e),
            },
        }
    }
    Ok(())
}

/// Writes the runs of pages of `data` (guest memory) that are not all zeros at `offset` in
/// `file` (and the last page when `last`).
fn write_used_pages<B: BitmapSlice>(
    file: &File,
    data: &VolatileSlice<'_, B>,
    offset: usize,
    last: bool,
) -> std::io::Result<()> {
    let pages = data.len().div_ceil(PAGE);
    let page_of = |first: usize, end: usize| {
        let len = data.len().min(end * PAGE) - first * PAGE;
        data.subslice(first * PAGE, len)
            .map_err(|e| std::io::Error::other(e.to_string()))
    };
    // A page that cannot be read fails the save: it is never left out as if it were zeros.
    let used = (0..pages)
        .map(|page| Ok((last && page + 1 == pages) || !is_zero(&page_of(page, page + 1)?)))
        .collect::<std::io::Result<Vec<bool>>>()?;
    for run in page_runs(0..pages, |page| used[page]) {
        // One system call a run: a busy guest's memory is many short runs.
        write_guest_at(
            file,
            &page_of(run.start, run.end)?,
            offset + run.start * PAGE,
        )?;
    }
    Ok(())
}

/// The runs of consecutive pages of `pages` that `selected` picks.
fn page_runs(pages: Range<usize>, selected: impl Fn(usize) -> bool) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut page = pages.start;
    while page < pages.end {
        if !selected(page) {
            page += 1;
            continue;
        }
        let start = page;
        while page < pages.end && selected(page) {
            page += 1;
        }
        runs.push(start..page);
    }
    runs
}

/// Gives the host pages of guest range `addr..addr + len` back (`MADV_DONTNEED`): the next
/// touch finds a zero page, or, for a restored VM's copy-on-write mapping, its memory file's
/// page again (with the `Uffd` backend, the page server's). Only for memory whose contents the
/// guest no longer needs (reported free); the range must be whole host pages in one region.
pub fn discard(mem: &GuestMemory, addr: GuestAddress, len: usize) -> std::io::Result<()> {
    if addr.raw_value() % PAGE as u64 != 0 || len % PAGE != 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not whole host pages",
        ));
    }
    let slice = mem
        .get_slice(addr, len)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    // SAFETY: the range is whole pages of a guest memory mapping this VMM owns and keeps
    // mapped; MADV_DONTNEED only drops their contents (which the guest gave up), never the
    // mapping, and no Rust reference into guest memory exists (it is accessed volatile).
    if unsafe {
        libc::madvise(
            slice.ptr_guard_mut().as_ptr().cast(),
            len,
            libc::MADV_DONTNEED,
        )
    } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the file at `path` is one `mem` maps (a restored VM's memory file).
pub fn maps_file(mem: &GuestMemory, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(target) = std::fs::metadata(path) else {
        return false;
    };
    mem.iter()
        .filter_map(|region| region.file_offset()?.file().metadata().ok())
        .any(|mapped| (mapped.dev(), mapped.ino()) == (target.dev(), target.ino()))
}

/// Maps `file` (as [`dump_memory`] wrote it) as guest memory laid out as `layout`, private
/// and copy-on-write: VMs mapping one file share its page cache until they write a page.
pub fn map_memory_file(file: &File, layout: &[(u64, u64)]) -> Result<GuestMemory, MemoryError> {
    let total_mib = layout.iter().map(|(_, len)| len).sum::<u64>() >> 20;
    let map_err = |e: String| MemoryError::Map(total_mib, e);
    let mut offset = 0;
    let mut regions = Vec::with_capacity(layout.len());
    for &(start, len) in layout {
        let file = file.try_clone().map_err(|e| map_err(e.to_string()))?;
        let mapping =
            MmapRegionBuilder::new_with_bitmap(len as usize, AtomicBitmap::with_len(len as usize))
                .with_file_offset(FileOffset::new(file, offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build()
                .map_err(|e| map_err(e.to_string()))?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(start))
            .ok_or_else(|| map_err(format!("region at {start:#x} overflows")))?;
        regions.push(region);
        offset += len;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| map_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A single nonzero byte anywhere, in whole blocks or in a short tail, makes a page used.
    #[test]
    fn a_page_is_zero_only_without_any_nonzero_byte() {
        for len in [PAGE, 100, 7] {
            let mut page = vec![0u8; len];
            assert!(
                is_zero(&VolatileSlice::from(&mut page[..])),
                "{len} zero bytes"
            );
            for at in [0, len / 2, len - 1] {
                page[at] = 1;
                let set = VolatileSlice::from(&mut page[..]);
                assert!(!is_zero(&set), "{len} bytes, byte {at} set");
                page[at] = 0;
            }
        }
    }

    #[test]
    fn small_guest_is_one_region() {
        let regions = arch_memory_regions(128 << 20);
        assert_eq!(regions, vec![(GuestAddress(0), 128 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let regions = arch_memory_regions(4 << 30);
        assert_eq!(regions[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(regions[1].0, GuestAddress(FIRST_ADDR_PAST_32BITS));
        assert_eq!(regions[1].1 as u64 + MMIO_GAP_START, 4 << 30);
    }

    #[test]
    fn a_dumped_memory_file_maps_back_privately() {
        use vm_memory::Bytes;
        let mem =
            map_anonymous(&[(GuestAddress(0), 0x2000), (GuestAddress(0x10_0000), 0x1000)]).unwrap();
        mem.write_obj(0x1234_5678u32, GuestAddress(0x1ff0)).unwrap();
        mem.write_obj(0xabcdu16, GuestAddress(0x10_0010)).unwrap();
        let (path, mut file) = dump_file("mem-test");
        dump_memory(&mem, &mut file, None).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 0x3000);
        // The one page of zeros between the written words and the last page is a hole.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(file.metadata().unwrap().blocks() * 512, 0x2000, "sparse");
        let restored = map_memory_file(&file, &memory_layout(&mem)).unwrap();
        assert_eq!(
            restored.read_obj::<u32>(GuestAddress(0x1ff0)).unwrap(),
            0x1234_5678
        );
        assert_eq!(
            restored.read_obj::<u16>(GuestAddress(0x10_0010)).unwrap(),
            0xabcd
        );
        restored.write_obj(7u32, GuestAddress(0x1ff0)).unwrap();
        let mut on_disk = [0u8; 4];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut on_disk, 0x1ff0).unwrap();
        assert_eq!(
            u32::from_le_bytes(on_disk),
            0x1234_5678,
            "writes stay private"
        );
        std::fs::remove_file(&path).unwrap();
    }

    /// A new file for a memory dump in the temp directory.
    fn dump_file(name: &str) -> (std::path::PathBuf, File) {
        let path = std::env::temp_dir().join(format!("mvm-{name}-{}", std::process::id()));
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    /// The pages of `mem`'s first region (of `pages`) that are in memory, mapped into this
    /// process.
    fn present(map: &mut PageMap, mem: &GuestMemory, pages: usize) -> Vec<usize> {
        let entries = map.entries(mem.iter().next().unwrap(), 0..pages).unwrap();
        (0..pages)
            .filter(|&p| entries[p] & PAGE_PRESENT != 0)
            .collect()
    }

    /// The whole file at `path`.
    fn contents(path: &std::path::Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    /// A save with the page map skips the pages never touched without reading them (they
    /// stay absent from the page map but the last one), and writes the same file as a save that reads every
    /// page: of anonymous memory (a booted VM) and of a restored VM's private mapping of its
    /// memory file, whose untouched pages are the file's where it has data.
    #[test]
    fn a_save_skips_untouched_pages_unread() {
        use std::os::unix::fs::MetadataExt;
        use vm_memory::Bytes;
        let pages = 512;
        let mem = map_anonymous(&[(GuestAddress(0), pages * PAGE)]).unwrap();
        mem.write_obj(0xfeedu16, GuestAddress(3 * PAGE as u64 + 8))
            .unwrap();
        mem.write_obj(0u8, GuestAddress(10 * PAGE as u64)).unwrap();
        let _: u8 = mem.read_obj(GuestAddress(20 * PAGE as u64)).unwrap();
        let mut map = PageMap::open().expect("this test reads /proc/self/pagemap");
        let region = mem.iter().next().unwrap();
        let held = map.held_pages(region, 0..pages).unwrap();
        let in_memory: Vec<usize> = (0..pages).filter(|&p| held[p] == Held::Memory).collect();
        assert_eq!(in_memory, [3, 10, 20]);
        assert!(!held.contains(&Held::File), "anonymous memory has no file");
        let (skipping_path, mut skipping) = dump_file("skipping");
        let (reading_path, mut reading) = dump_file("reading");
        dump_memory(&mem, &mut skipping, Some(&mut map)).unwrap();
        // Nothing else was read but the last page (always written: the file's length).
        assert_eq!(present(&mut map, &mem, pages), [3, 10, 20, pages - 1]);
        dump_memory(&mem, &mut reading, None).unwrap();
        assert_eq!(contents(&skipping_path), contents(&reading_path));
        // The word's page and the last page.
        assert_eq!(skipping.metadata().unwrap().blocks() * 512, 2 * PAGE as u64);
        for path in [skipping_path, reading_path] {
            std::fs::remove_file(path).unwrap();
        }
    }

    /// A restored VM's private mapping of its memory file: the pages the guest never changed
    /// are the file's where it has data (as the file system reports it: in blocks of a few
    /// pages, maybe), whether read or not, and a save copies them from the file without
    /// mapping them; a page the guest wrote (in a hole or over data) is its own, copied out
    /// of memory; holes stay holes. The saved file is what a save reading every page writes.
    #[test]
    fn a_restored_vms_save_copies_its_unchanged_pages_from_its_memory_file() {
        use vm_memory::Bytes;
        let pages = 512;
        let mem = map_anonymous(&[(GuestAddress(0), pages * PAGE)]).unwrap();
        for page in [3u64, 40, 41, 42] {
            mem.write_obj(
                0xfeed_0000u32 + page as u32,
                GuestAddress(page * PAGE as u64 + 8),
            )
            .unwrap();
        }
        let (source_path, mut source) = dump_file("source");
        dump_memory(&mem, &mut source, None).unwrap();

        let restored = map_memory_file(&source, &memory_layout(&mem)).unwrap();
        let read = |page: u64| {
            restored
                .read_obj::<u32>(GuestAddress(page * PAGE as u64 + 8))
                .unwrap()
        };
        assert_eq!(read(40), 0xfeed_0000 + 40, "a page only read is the file's");
        restored
            .write_obj(0x77u8, GuestAddress(100 * PAGE as u64))
            .unwrap();
        restored
            .write_obj(0x55u8, GuestAddress(41 * PAGE as u64))
            .unwrap();
        let mut map = PageMap::open().expect("this test reads /proc/self/pagemap");
        let held = map
            .held_pages(restored.iter().next().unwrap(), 0..pages)
            .unwrap();
        let (file, memory) = (
            (0..pages)
                .filter(|&p| held[p] == Held::File)
                .collect::<Vec<_>>(),
            (0..pages)
                .filter(|&p| held[p] == Held::Memory)
                .collect::<Vec<_>>(),
        );
        assert_eq!(memory, [41, 100]);
        assert!(
            [3, 40, 42, pages - 1].iter().all(|p| file.contains(p)) && !file.contains(&200),
            "{file:?}"
        );
        let mapped_before = present(&mut map, &restored, pages);

        let (again_path, mut again) = dump_file("again");
        dump_memory(&restored, &mut again, Some(&mut map)).unwrap();
        // Only the last page (always written from memory: the file's length) was mapped by
        // the save, with the neighbours the kernel maps along with a page read from the page
        // cache (up to 64 KiB around it); the file's pages were copied from the file.
        let after = present(&mut map, &restored, pages);
        assert!(
            !mapped_before.contains(&3) && !after.contains(&3),
            "a page of the file was mapped: {after:?}"
        );
        assert!(
            after
                .iter()
                .all(|p| mapped_before.contains(p) || *p >= pages - 16),
            "{mapped_before:?} -> {after:?}"
        );
        assert!(after.contains(&(pages - 1)));

        let (reading_path, mut reading) = dump_file("reading-restored");
        dump_memory(&restored, &mut reading, None).unwrap();
        let saved = contents(&again_path);
        assert_eq!(saved, contents(&reading_path));
        assert_eq!(
            saved[3 * PAGE + 8..3 * PAGE + 12],
            0xfeed_0003u32.to_ne_bytes()
        );
        assert_eq!(saved[41 * PAGE], 0x55);
        assert_eq!(saved[100 * PAGE], 0x77);
        // The holes far from data stay holes.
        let data = mvm_sys::sparse::data_ranges(&again, 0, (pages * PAGE) as u64).unwrap();
        assert!(
            !data
                .iter()
                .any(|d| d.start < 200 * PAGE as u64 && d.end > 150 * PAGE as u64),
            "{data:?}"
        );
        for path in [source_path, again_path, reading_path] {
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn a_diff_holds_the_pages_kvm_or_the_vmm_dirtied_at_their_offsets() {
        use std::os::unix::fs::FileExt;
        use vm_memory::Bytes;
        let mem =
            map_anonymous(&[(GuestAddress(0), 0x4000), (GuestAddress(0x10_0000), 0x4000)]).unwrap();
        mem.write_obj(0xaaaa_u16, GuestAddress(0x10)).unwrap(); // boot: not in the next diff
        reset_dirty(&mem);
        mem.write_obj(0x1234_u16, GuestAddress(0x1008)).unwrap(); // a device write: page 1
                                                                  // The guest wrote page 2 of region 0 and page 0 of region 1 (KVM's log).
                                                                  // SAFETY: addresses inside the regions, written through the host mapping as a vCPU
                                                                  // would, behind the bitmap's back.
        unsafe {
            *mem.get_host_address(GuestAddress(0x2000)).unwrap() = 7;
            *mem.get_host_address(GuestAddress(0x10_0000)).unwrap() = 9;
        }
        mark_dirty(&mem, &[vec![0b100], vec![0b1]]);
        let path = std::env::temp_dir().join(format!("mvm-diff-test-{}", std::process::id()));
        let mut file = File::create(&path).unwrap();
        // Pages 1 and 2 of region 0, page 0 of region 1, and the last page.
        assert_eq!(dump_dirty(&mem, &mut file).unwrap(), 4);
        let file = File::open(&path).unwrap();
        assert_eq!(file.metadata().unwrap().len(), 0x8000);
        let byte = |offset: u64| {
            let mut b = [0u8; 2];
            file.read_exact_at(&mut b, offset).unwrap();
            u16::from_le_bytes(b)
        };
        assert_eq!(byte(0x10), 0, "page 0 was not dirty: a hole");
        assert_eq!(byte(0x1008), 0x1234);
        assert_eq!(byte(0x2000), 7);
        assert_eq!(byte(0x4000), 9, "region 1 starts at 0x4000 in the file");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(file.metadata().unwrap().blocks() * 512, 0x4000, "sparse");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn sizes_outside_the_host_are_refused() {
        assert!(matches!(
            validate_mem_size(0),
            Err(MemoryError::TooSmall(0))
        ));
        let too_big = host_memory_mib().unwrap() + 1;
        let err = validate_mem_size(too_big).unwrap_err();
        assert!(err.to_string().contains("larger than this host"), "{err}");
    }
}
