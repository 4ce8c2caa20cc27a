//! Guest memory and a split queue built from fuzz input.
//!
//! Layout of the 64 KiB guest: descriptor table at 0x0, available ring at 0x1000, used ring at
//! 0x2000, and the input copied over the whole memory from address 0 (so the input writes the
//! descriptors, the available ring, buffers and headers). The first input byte picks the queue
//! size (a power of two up to 256).

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm::vstate::memory::GuestMemory;

/// Guest memory size.
pub const MEM_SIZE: usize = 64 * 1024;

/// Guest memory with `data` copied to address 0, and a ready queue over it.
pub fn setup(data: &[u8]) -> Option<(GuestMemory, Queue)> {
    let (&first, rest) = data.split_first()?;
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).ok()?;
    let n = rest.len().min(MEM_SIZE);
    mem.write_slice(&rest[..n], GuestAddress(0)).ok()?;
    let mut queue = Queue::new(256).ok()?;
    queue.set_size(1u16 << (first % 9));
    queue.set_desc_table_address(Some(0), Some(0));
    queue.set_avail_ring_address(Some(0x1000), Some(0));
    queue.set_used_ring_address(Some(0x2000), Some(0));
    queue.set_ready(true);
    queue.is_valid(&mem).then_some((mem, queue))
}
