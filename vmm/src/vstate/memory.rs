//! Guest RAM: anonymous host memory laid out around the MMIO gap below 4 GiB. Each region
//! carries a bitmap of the pages the VMM itself wrote (virtio devices), which with KVM's
//! dirty log makes the dirty pages of a `Diff` snapshot.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::ops::Range;

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap};
use vm_memory::mmap::{MmapRegion, MmapRegionBuilder};
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
/// Guest memory copied out at once while it is saved.
const DUMP_CHUNK: usize = 2 << 20;

/// Writes every region of `mem` to the new, empty `file`, one after the other in layout
/// order. Pages of zeros (what the guest never touched) are left as holes: the file takes
/// only what the guest used, and a private mapping of it reads zeros there. With this
/// process's `page_map`, pages never touched are skipped without being read (see
/// [`PageMap`]); without it every page is read. The last page is always written, so that
/// the file has its full length (with the `write` and `lseek` the VMM thread's seccomp
/// filter allows).
pub fn dump_memory(
    mem: &GuestMemory,
    file: &mut File,
    mut page_map: Option<&mut PageMap>,
) -> std::io::Result<()> {
    let used = |region: &GuestRegionMmap<AtomicBitmap>, pages: Range<usize>| match page_map
        .as_deref_mut()
    {
        Some(map) => map.used_pages(region, pages),
        None => Ok(vec![true; pages.len()]),
    };
    copy_runs(mem, used, |bytes, at, last| {
        write_used_pages(file, bytes, at, last)
    })
    .map(drop)
}

/// Copies out of `mem` the runs of pages `picked` selects (asked a window of a region's pages
/// at a time, [`DUMP_CHUNK`] worth, it answers a flag per page), and the last page of all,
/// and hands each run to `put` with its offset in a full memory file (regions one after the
/// other in layout order) and whether it ends the file. Returns the pages copied.
fn copy_runs(
    mem: &GuestMemory,
    mut picked: impl FnMut(&GuestRegionMmap<AtomicBitmap>, Range<usize>) -> std::io::Result<Vec<bool>>,
    mut put: impl FnMut(&[u8], usize, bool) -> std::io::Result<()>,
) -> std::io::Result<usize> {
    let total: usize = mem.iter().map(|r| r.len() as usize).sum();
    let mut buf = vec![0u8; DUMP_CHUNK];
    let mut file_offset = 0usize;
    let mut copied = 0;
    for region in mem.iter() {
        let slice = region
            .as_volatile_slice()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let pages = slice.len().div_ceil(PAGE);
        let last_region = file_offset + slice.len() == total;
        for first in (0..pages).step_by(DUMP_CHUNK / PAGE) {
            let window = first..(first + DUMP_CHUNK / PAGE).min(pages);
            let picked = picked(region, window.clone())?;
            let selected = |page: usize| picked[page - first] || (last_region && page + 1 == pages);
            for run in page_runs(window, selected) {
                let len = (run.end * PAGE).min(slice.len()) - run.start * PAGE;
                slice
                    .subslice(run.start * PAGE, len)
                    .map_err(|e| std::io::Error::other(e.to_string()))?
                    .copy_to(&mut buf[..len]);
                let at = file_offset + run.start * PAGE;
                put(&buf[..len], at, at + len == total)?;
                copied += run.len();
            }
        }
        file_offset += slice.len();
    }
    Ok(copied)
}

/// This process's page map (`/proc/self/pagemap`): which pages of guest memory were ever
/// touched, in memory or swapped out. A save skips the others without reading them: reading
/// one would fault it in, a zero page of anonymous memory, and in a restored VM's private
/// mapping of its memory file a new page-cache page of zeros for every hole of the file.
/// Not for memory a page server fills (`Uffd`): its untouched pages are the server's.
pub struct PageMap(File);

/// A page map entry's bits: the page is in memory, or swapped out.
const PAGE_PRESENT: u64 = 1 << 63;
const PAGE_SWAPPED: u64 = 1 << 62;

impl PageMap {
    /// This process's page map; `None` where it cannot be read (a jail without /proc).
    pub fn open() -> Option<PageMap> {
        File::open("/proc/self/pagemap").ok().map(PageMap)
    }

    /// Whether each of the `pages` of `region` may hold data: touched, or, untouched in a
    /// mapping of a file, where the file has data (an untouched page reads the file).
    fn used_pages(
        &mut self,
        region: &GuestRegionMmap<AtomicBitmap>,
        pages: Range<usize>,
    ) -> std::io::Result<Vec<bool>> {
        use std::io::Read;
        let mut entries = vec![0u8; pages.len() * 8];
        let first = region.as_ptr() as usize / PAGE + pages.start;
        self.0.seek(SeekFrom::Start((first * 8) as u64))?;
        self.0.read_exact(&mut entries)?;
        let mut used: Vec<bool> = entries
            .chunks_exact(8)
            .map(|e| u64::from_ne_bytes(e.try_into().expect("chunks of 8")))
            .map(|e| e & (PAGE_PRESENT | PAGE_SWAPPED) != 0)
            .collect();
        if let Some(backing) = region.file_offset() {
            let start = backing.start() + (pages.start * PAGE) as u64;
            let end = (start + (pages.len() * PAGE) as u64).min(backing.start() + region.len());
            for data in mvm_sys::sparse::data_ranges(backing.file(), start, end)? {
                let from = ((data.start - start) as usize) / PAGE;
                let to = ((data.end - start) as usize)
                    .div_ceil(PAGE)
                    .min(pages.len());
                used[from..to].iter_mut().for_each(|u| *u = true);
            }
        }
        Ok(used)
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
    let dirty = |region: &GuestRegionMmap<AtomicBitmap>, pages: Range<usize>| {
        Ok(pages
            .map(|page| region.bitmap().dirty_at(page * PAGE))
            .collect())
    };
    copy_runs(mem, dirty, |bytes, at, _| {
        file.seek(SeekFrom::Start(at as u64))?;
        file.write_all(bytes)
    })
}

/// Forgets the VMM's own writes to `mem` (after a snapshot: the next `Diff` starts here).
pub fn reset_dirty(mem: &GuestMemory) {
    for region in mem.iter() {
        MmapRegion::bitmap(region).reset();
    }
}

/// Whether `bytes` are all zero (compared a word at a time).
fn is_zero(bytes: &[u8]) -> bool {
    let words = bytes.chunks_exact(8);
    let rest = words.remainder();
    words
        .map(|w| u64::from_ne_bytes(w.try_into().expect("chunks of 8")))
        .fold(0, |acc, w| acc | w)
        == 0
        && rest.iter().all(|&b| b == 0)
}

/// Writes the runs of pages of `data` that are not all zeros at `offset` in `file` (and the
/// last page when `last`).
fn write_used_pages(
    file: &mut File,
    data: &[u8],
    offset: usize,
    last: bool,
) -> std::io::Result<()> {
    let pages = data.len().div_ceil(PAGE);
    let used = |page: usize| {
        (last && page + 1 == pages)
            || !is_zero(&data[page * PAGE..data.len().min((page + 1) * PAGE)])
    };
    for run in page_runs(0..pages, used) {
        let bytes = &data[run.start * PAGE..data.len().min(run.end * PAGE)];
        file.seek(SeekFrom::Start((offset + run.start * PAGE) as u64))?;
        file.write_all(bytes)?;
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

    /// A save with the page map skips the pages never touched without reading them (they
    /// stay absent from the page map but the last one), and writes the same file as a save that reads every
    /// page: of anonymous memory (a booted VM) and of a restored VM's private mapping of its
    /// memory file, whose untouched pages are the file's where it has data.
    #[test]
    fn a_save_skips_untouched_pages_unread() {
        use std::io::Read;
        use std::os::unix::fs::MetadataExt;
        use vm_memory::Bytes;
        let pages = 512;
        let mem = map_anonymous(&[(GuestAddress(0), pages * PAGE)]).unwrap();
        mem.write_obj(0xfeedu16, GuestAddress(3 * PAGE as u64 + 8))
            .unwrap();
        mem.write_obj(0u8, GuestAddress(10 * PAGE as u64)).unwrap();
        let _: u8 = mem.read_obj(GuestAddress(20 * PAGE as u64)).unwrap();
        let mut map = PageMap::open().expect("this test reads /proc/self/pagemap");
        let touched = |map: &mut PageMap, mem: &GuestMemory| {
            let used = map
                .used_pages(mem.iter().next().unwrap(), 0..pages)
                .unwrap();
            (0..pages).filter(|&p| used[p]).collect::<Vec<_>>()
        };
        assert_eq!(touched(&mut map, &mem), [3, 10, 20]);
        let (skipping_path, mut skipping) = dump_file("skipping");
        let (reading_path, mut reading) = dump_file("reading");
        dump_memory(&mem, &mut skipping, Some(&mut map)).unwrap();
        // Nothing else was read but the last page (always written: the file's length).
        assert_eq!(touched(&mut map, &mem), [3, 10, 20, pages - 1]);
        dump_memory(&mem, &mut reading, None).unwrap();
        let contents = |path: &std::path::Path| {
            let mut bytes = Vec::new();
            File::open(path).unwrap().read_to_end(&mut bytes).unwrap();
            bytes
        };
        assert_eq!(contents(&skipping_path), contents(&reading_path));
        // The word's page and the last page.
        assert_eq!(skipping.metadata().unwrap().blocks() * 512, 2 * PAGE as u64);

        // Restored from the file: its pages of data are used untouched (as the file system
        // reports its data: in blocks of a few pages, maybe), its holes are not, and a page
        // the guest writes in a hole is.
        let restored = map_memory_file(&skipping, &memory_layout(&mem)).unwrap();
        restored
            .write_obj(0x77u8, GuestAddress(100 * PAGE as u64))
            .unwrap();
        let used = touched(&mut map, &restored);
        assert!(
            [3, 100, pages - 1].iter().all(|p| used.contains(p)) && !used.contains(&200),
            "{used:?}"
        );
        let (again_path, mut again) = dump_file("again");
        dump_memory(&restored, &mut again, Some(&mut map)).unwrap();
        // The holes far from data were not read (the kernel maps a few neighbours of a page
        // read from the page cache along with it).
        let after = touched(&mut map, &restored);
        assert!(
            !after
                .iter()
                .any(|p| (20..90).contains(p) || (110..480).contains(p)),
            "holes were read: {after:?}"
        );
        let saved = contents(&again_path);
        assert_eq!(saved[3 * PAGE + 8..3 * PAGE + 10], 0xfeedu16.to_ne_bytes());
        assert_eq!(saved[100 * PAGE], 0x77);
        assert_eq!(saved.iter().filter(|&&b| b != 0).count(), 3);
        for path in [skipping_path, reading_path, again_path] {
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
