//! Descriptor chains checked once, before a device touches the buffers they describe.
//!
//! virtio-queue's `DescriptorChain` iterator stops silently on a loop (its TTL runs out), on a
//! `next` index past the queue, or on a descriptor it cannot read. [`Chain::parse`] turns those
//! cases into errors, checks that every buffer lies inside guest memory, that device-readable
//! buffers come before device-writable ones (virtio 1.x, 2.7.4.2) and that the chain is not
//! longer than the device accepts.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::vstate::memory::GuestMemory;

/// One guest buffer, known to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// Why a chain was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The head index is past the queue or names an unusable indirect table.
    #[error("the chain has no usable descriptor")]
    Empty,
    /// A loop, a `next` index past the queue, or an unreadable descriptor cut the chain short.
    #[error("the chain is cut short by a loop, a bad next index or an unreadable descriptor")]
    Truncated,
    /// A device-readable descriptor follows a device-writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// A buffer lies (partly) outside guest memory.
    #[error("buffer {addr:#x}+{len:#x} lies outside guest memory")]
    OutOfMemory {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The buffers add up to more bytes than the device accepts.
    #[error("the chain's buffers total {0} bytes, more than the device accepts")]
    TooLong(u64),
}

/// A validated chain: its head index and its buffers, split by direction.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Chain {
    /// Head descriptor index, returned in the used ring.
    pub head: u16,
    /// Buffers the device reads (driver → device), in order.
    pub readable: Vec<Segment>,
    /// Buffers the device writes (device → driver), in order.
    pub writable: Vec<Segment>,
}

/// A chain that failed validation. `head` still has to be returned to the driver; `valid` holds
/// the buffers that passed the checks, so a device can still report the failure into the last
/// writable one (block devices write their status byte there).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadChain {
    /// Head descriptor index.
    pub head: u16,
    /// The first thing found wrong.
    pub error: ChainError,
    /// The buffers that lie inside guest memory, by direction.
    pub valid: Chain,
}

impl Chain {
    /// Walks `chain` (popped from a queue over `mem`), accepting at most `max_bytes` in total.
    /// Zero-length buffers are skipped. The walk goes on after an error so that
    /// [`BadChain::valid`] holds every usable buffer.
    pub fn parse<M>(
        chain: DescriptorChain<M>,
        mem: &GuestMemory,
        max_bytes: u64,
    ) -> Result<Chain, BadChain>
    where
        M: Deref,
        M::Target: vm_memory::GuestMemory,
    {
        let head = chain.head_index();
        let mut parsed = Chain {
            head,
            ..Default::default()
        };
        let mut error = None;
        let mut total = 0u64;
        let mut last_has_next = false;
        let mut seen = 0usize;
        for desc in chain {
            seen += 1;
            last_has_next = desc.has_next();
            let len = desc.len();
            total += u64::from(len);
            if total > max_bytes {
                error.get_or_insert(ChainError::TooLong(total));
            }
            if !mem.check_range(desc.addr(), len as usize) {
                error.get_or_insert(ChainError::OutOfMemory {
                    addr: desc.addr().raw_value(),
                    len,
                });
                continue;
            }
            if len == 0 {
                continue;
            }
            let segment = Segment {
                addr: desc.addr(),
                len,
            };
            if desc.is_write_only() {
                parsed.writable.push(segment);
            } else if parsed.writable.is_empty() {
                parsed.readable.push(segment);
            } else {
                error.get_or_insert(ChainError::ReadableAfterWritable);
            }
        }
        if seen == 0 {
            error.get_or_insert(ChainError::Empty);
        }
        if last_has_next {
            error.get_or_insert(ChainError::Truncated);
        }
        match error {
            None => Ok(parsed),
            Some(error) => Err(BadChain {
                head,
                error,
                valid: parsed,
            }),
        }
    }
}

/// Total length of `segments`.
pub fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

/// Pieces of `segments` covering bytes `[offset, offset + len)` of their concatenation (clipped
/// to what exists).
pub fn sub_segments(segments: &[Segment], mut offset: u64, mut len: u64) -> Vec<Segment> {
    let mut out = Vec::new();
    for seg in segments {
        if len == 0 {
            break;
        }
        let seg_len = u64::from(seg.len);
        if offset >= seg_len {
            offset -= seg_len;
            continue;
        }
        let take = (seg_len - offset).min(len);
        out.push(Segment {
            // Inside a segment that was checked against guest memory: cannot overflow.
            addr: seg.addr.unchecked_add(offset),
            len: take as u32,
        });
        len -= take;
        offset = 0;
    }
    out
}

/// Copies bytes `[offset, offset + buf.len())` of `segments` into `buf`; returns how many were
/// available.
pub fn read_segments(
    mem: &GuestMemory,
    segments: &[Segment],
    offset: u64,
    buf: &mut [u8],
) -> usize {
    let mut done = 0;
    for seg in sub_segments(segments, offset, buf.len() as u64) {
        let end = done + seg.len as usize;
        if mem.read_slice(&mut buf[done..end], seg.addr).is_err() {
            break;
        }
        done = end;
    }
    done
}

/// Copies `data` into `segments` from byte `offset`; returns how many bytes fit.
pub fn write_segments(mem: &GuestMemory, segments: &[Segment], offset: u64, data: &[u8]) -> usize {
    let mut done = 0;
    for seg in sub_segments(segments, offset, data.len() as u64) {
        let end = done + seg.len as usize;
        if mem.write_slice(&data[done..end], seg.addr).is_err() {
            break;
        }
        done = end;
    }
    done
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};

    /// 1 MiB of guest memory for mock queues (queue structures at 0, buffers from 64 KiB).
    pub(crate) fn test_memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// A descriptor: `w` marks it device-writable, `next` chains it.
    pub(crate) fn desc(addr: u64, len: u32, w: bool, next: Option<u16>) -> RawDescriptor {
        let mut flags = 0;
        if w {
            flags |= VRING_DESC_F_WRITE as u16;
        }
        if next.is_some() {
            flags |= VRING_DESC_F_NEXT as u16;
        }
        RawDescriptor::from(Descriptor::new(addr, len, flags, next.unwrap_or(0)))
    }

    fn parse(descs: &[RawDescriptor]) -> Result<Chain, BadChain> {
        let mem = test_memory();
        let vq = MockSplitQueue::new(&mem, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let chain = q.pop_descriptor_chain(&mem).unwrap();
        Chain::parse(chain, &mem, 1 << 20)
    }

    #[test]
    fn good_chain_splits_by_direction() {
        let c = parse(&[
            desc(0x10000, 16, false, Some(1)),
            desc(0x11000, 512, true, Some(2)),
            desc(0x12000, 1, true, None),
        ])
        .unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(
            c.readable,
            vec![Segment {
                addr: GuestAddress(0x10000),
                len: 16
            }]
        );
        assert_eq!(c.writable.len(), 2);
        assert_eq!(total_len(&c.writable), 513);
    }

    #[test]
    fn loops_and_bad_next_indexes_are_truncated_chains() {
        let looped = parse(&[
            desc(0x10000, 16, false, Some(1)),
            desc(0x11000, 16, false, Some(0)),
        ]);
        assert_eq!(looped.unwrap_err().error, ChainError::Truncated);
        let self_loop = parse(&[desc(0x10000, 16, false, Some(0))]);
        assert_eq!(self_loop.unwrap_err().error, ChainError::Truncated);
        let past_queue = parse(&[desc(0x10000, 16, false, Some(200))]);
        assert_eq!(past_queue.unwrap_err().error, ChainError::Truncated);
    }

    #[test]
    fn out_of_memory_wrong_direction_and_oversized_chains_are_refused() {
        let oom = parse(&[desc(0xff000, 0x2000, false, None)]).unwrap_err();
        assert_eq!(
            oom.error,
            ChainError::OutOfMemory {
                addr: 0xff000,
                len: 0x2000
            }
        );
        let wrap = parse(&[desc(u64::MAX - 4, 16, true, None)]).unwrap_err();
        assert!(matches!(wrap.error, ChainError::OutOfMemory { .. }));
        let order = parse(&[
            desc(0x10000, 16, true, Some(1)),
            desc(0x11000, 16, false, None),
        ])
        .unwrap_err();
        assert_eq!(order.error, ChainError::ReadableAfterWritable);
        let big = parse(&[
            desc(0x10000, 0x80000, true, Some(1)),
            desc(0x10000, 0x80001, true, None),
        ])
        .unwrap_err();
        assert!(matches!(big.error, ChainError::TooLong(_)));
    }

    #[test]
    fn zero_length_buffers_are_skipped() {
        let c = parse(&[
            desc(0x10000, 0, false, Some(1)),
            desc(0x11000, 4, true, None),
        ])
        .unwrap();
        assert!(c.readable.is_empty());
        assert_eq!(c.writable.len(), 1);
    }

    #[test]
    fn segment_copies_span_buffers() {
        let mem = test_memory();
        let segs = [
            Segment {
                addr: GuestAddress(0x10000),
                len: 3,
            },
            Segment {
                addr: GuestAddress(0x20000),
                len: 5,
            },
        ];
        assert_eq!(write_segments(&mem, &segs, 1, b"abcdefghij"), 7);
        let mut buf = [0u8; 8];
        assert_eq!(read_segments(&mem, &segs, 0, &mut buf), 8);
        assert_eq!(&buf, b"\0abcdefg");
        assert_eq!(
            sub_segments(&segs, 2, 2),
            vec![
                Segment {
                    addr: GuestAddress(0x10002),
                    len: 1
                },
                Segment {
                    addr: GuestAddress(0x20000),
                    len: 1
                },
            ]
        );
    }
}
