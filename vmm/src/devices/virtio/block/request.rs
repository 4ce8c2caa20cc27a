//! One virtio-blk request: header, data buffers and status byte of a validated chain.
//!
//! Layout (virtio 1.x, 5.2.6): a 16-byte device-readable header {type: u32, reserved: u32,
//! sector: u64}, data buffers (device-readable for OUT, device-writable for IN and GET_ID) and a
//! final device-writable status byte. The status byte is the last byte of the last writable
//! buffer; everything else is checked against it.

use std::io::{Seek, SeekFrom};

use vm_memory::Bytes;

use super::{BlockEngine, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use crate::devices::virtio::chain::{
    read_segments, sub_segments, total_len, write_segments, Chain, Segment,
};
use crate::metrics::virtio::{DeviceMetrics, BLOCK as METRICS};
use crate::vstate::memory::GuestMemory;

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the GET_ID answer.
pub const VIRTIO_BLK_ID_BYTES: usize = 20;
const HEADER_LEN: u64 = 16;

/// Request types (virtio 1.x, 5.2.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors.
    In,
    /// Write sectors.
    Out,
    /// Flush the write cache.
    Flush,
    /// Read the device id string.
    GetId,
    /// Anything else.
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            0 => RequestType::In,
            1 => RequestType::Out,
            4 => RequestType::Flush,
            8 => RequestType::GetId,
            other => RequestType::Unsupported(other),
        }
    }
}

/// A request's parts, cut out of a chain.
struct Request {
    kind: RequestType,
    sector: u64,
    /// Data the device reads (OUT).
    data_in: Vec<Segment>,
    /// Data the device writes (IN, GET_ID).
    data_out: Vec<Segment>,
    /// Where the status byte goes.
    status: Segment,
}

/// Why a request gets IOERR.
#[derive(Debug)]
enum Failure {
    Malformed,
    Backend,
}

fn parse(mem: &GuestMemory, chain: &Chain) -> Result<Request, Option<Segment>> {
    let writable_len = total_len(&chain.writable);
    let Some(status) = sub_segments(&chain.writable, writable_len.saturating_sub(1), 1).pop()
    else {
        return Err(None);
    };
    let mut header = [0u8; HEADER_LEN as usize];
    if read_segments(mem, &chain.readable, 0, &mut header) != header.len() {
        return Err(Some(status));
    }
    let kind = RequestType::from(u32::from_le_bytes(
        header[0..4].try_into().expect("4 bytes"),
    ));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let readable_len = total_len(&chain.readable);
    Ok(Request {
        kind,
        sector,
        data_in: sub_segments(&chain.readable, HEADER_LEN, readable_len - HEADER_LEN),
        data_out: sub_segments(&chain.writable, 0, writable_len - 1),
        status,
    })
}

/// The rate-limiter cost of a request: its data bytes (the operation counts as one op).
pub fn cost(mem: &GuestMemory, chain: &Chain) -> u64 {
    match parse(mem, chain) {
        Ok(req) => match req.kind {
            RequestType::In => total_len(&req.data_out),
            RequestType::Out => total_len(&req.data_in),
            _ => 0,
        },
        Err(_) => 0,
    }
}

/// Executes a valid chain's request; returns the used length (data written + status byte).
pub fn execute(engine: &mut BlockEngine, mem: &GuestMemory, chain: &Chain) -> u32 {
    let req = match parse(mem, chain) {
        Ok(req) => req,
        Err(status) => {
            DeviceMetrics::add(&METRICS.failed, 1);
            return status.map_or(0, |s| write_status(mem, s, VIRTIO_BLK_S_IOERR));
        }
    };
    let (status, written) = match run(engine, mem, &req) {
        Ok(written) => {
            DeviceMetrics::add(&METRICS.completed, 1);
            (VIRTIO_BLK_S_OK, written)
        }
        Err(Some(Failure::Backend)) => {
            DeviceMetrics::add(&METRICS.backend_errors, 1);
            (VIRTIO_BLK_S_IOERR, 0)
        }
        Err(Some(Failure::Malformed)) => {
            DeviceMetrics::add(&METRICS.failed, 1);
            (VIRTIO_BLK_S_IOERR, 0)
        }
        Err(None) => {
            DeviceMetrics::add(&METRICS.failed, 1);
            (VIRTIO_BLK_S_UNSUPP, 0)
        }
    };
    written + write_status(mem, req.status, status)
}

/// Answers a malformed chain with IOERR in the last writable byte it has, if any.
pub fn fail_bad_chain(mem: &GuestMemory, valid: &Chain) -> u32 {
    let len = total_len(&valid.writable);
    match sub_segments(&valid.writable, len.saturating_sub(1), 1).pop() {
        Some(status) => write_status(mem, status, VIRTIO_BLK_S_IOERR),
        None => 0,
    }
}

fn write_status(mem: &GuestMemory, status: Segment, value: u8) -> u32 {
    u32::from(mem.write_slice(&[value], status.addr).is_ok())
}

/// Byte range of `len` bytes at `sector`, if it lies inside the disk.
fn disk_range(engine: &BlockEngine, sector: u64, len: u64) -> Result<u64, Option<Failure>> {
    if len % SECTOR_SIZE != 0 {
        return Err(Some(Failure::Malformed));
    }
    let offset = sector
        .checked_mul(SECTOR_SIZE)
        .ok_or(Some(Failure::Malformed))?;
    let end = offset.checked_add(len).ok_or(Some(Failure::Malformed))?;
    if end > engine.disk.sectors * SECTOR_SIZE {
        return Err(Some(Failure::Malformed));
    }
    Ok(offset)
}

/// Runs a request; Ok(bytes written to the guest), Err(None) for UNSUPP.
fn run(engine: &mut BlockEngine, mem: &GuestMemory, req: &Request) -> Result<u32, Option<Failure>> {
    match req.kind {
        RequestType::In => {
            if !req.data_in.is_empty() {
                return Err(Some(Failure::Malformed));
            }
            let len = total_len(&req.data_out);
            let offset = disk_range(engine, req.sector, len)?;
            let file = &mut engine.disk.file;
            file.seek(SeekFrom::Start(offset))
                .map_err(|_| Some(Failure::Backend))?;
            for seg in &req.data_out {
                mem.read_exact_volatile_from(seg.addr, file, seg.len as usize)
                    .map_err(|_| Some(Failure::Backend))?;
            }
            DeviceMetrics::add(&METRICS.bytes_in, len);
            // At most the u32 total of a chain.
            Ok(len as u32)
        }
        RequestType::Out => {
            if engine.read_only || !req.data_out.is_empty() {
                return Err(Some(Failure::Malformed));
            }
            let len = total_len(&req.data_in);
            let offset = disk_range(engine, req.sector, len)?;
            let file = &mut engine.disk.file;
            file.seek(SeekFrom::Start(offset))
                .map_err(|_| Some(Failure::Backend))?;
            for seg in &req.data_in {
                mem.write_all_volatile_to(seg.addr, file, seg.len as usize)
                    .map_err(|_| Some(Failure::Backend))?;
            }
            DeviceMetrics::add(&METRICS.bytes_out, len);
            Ok(0)
        }
        RequestType::Flush if engine.writeback => {
            engine
                .disk
                .file
                .sync_all()
                .map_err(|_| Some(Failure::Backend))?;
            Ok(0)
        }
        RequestType::GetId => Ok(write_segments(mem, &req.data_out, 0, &engine.id) as u32),
        RequestType::Flush | RequestType::Unsupported(_) => Err(None),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BlockEngine, Disk};
    use super::*;
    use crate::devices::virtio::chain::tests::{desc, test_memory};
    use crate::rate_limiter::RateLimiter;
    use std::io::Write;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vm_memory::GuestAddress;

    const HDR: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STATUS: u64 = 0x30000;

    fn engine(read_only: bool, writeback: bool) -> BlockEngine {
        let mut file = tempfile();
        let mut image = vec![0u8; 8 * 512];
        image[..12].copy_from_slice(b"sector zero!");
        file.write_all(&image).unwrap();
        BlockEngine::new(
            Disk::from_file(file).unwrap(),
            "test-drive-id-that-is-long",
            read_only,
            writeback,
            RateLimiter::new(None).unwrap(),
        )
    }

    fn tempfile() -> std::fs::File {
        // An anonymous file: nothing to clean up.
        let name = std::ffi::CString::new("mvm-blk-test").unwrap();
        // SAFETY: memfd_create with a valid C string; the fd is owned by the File below.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), 0) };
        assert!(fd >= 0);
        // SAFETY: fd is a fresh descriptor nobody else owns.
        unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
    }

    fn header(mem: &GuestMemory, kind: u32, sector: u64) {
        mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Runs one chain; returns (used len, status byte).
    fn run_chain(e: &mut BlockEngine, mem: &GuestMemory, descs: &[RawDescriptor]) -> (u32, u8) {
        let vq = MockSplitQueue::new(mem, 16);
        vq.add_desc_chains(descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(e.process_queue(mem, &mut q));
        let used_len: u32 = mem.read_obj(vq.used_addr().unchecked_add(8)).unwrap();
        (used_len, mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn three(data_len: u32, data_writable: bool) -> Vec<RawDescriptor> {
        vec![
            desc(HDR, 16, false, Some(1)),
            desc(DATA, data_len, data_writable, Some(2)),
            desc(STATUS, 1, true, None),
        ]
    }

    use vm_memory::Address;

    #[test]
    fn read_write_get_id_flush() {
        let mem = test_memory();
        let mut e = engine(false, false);
        header(&mem, 0, 0);
        assert_eq!(
            run_chain(&mut e, &mem, &three(512, true)),
            (513, VIRTIO_BLK_S_OK)
        );
        let mut buf = [0u8; 12];
        mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert_eq!(&buf, b"sector zero!");

        mem.write_slice(b"new data", GuestAddress(DATA)).unwrap();
        header(&mem, 1, 3);
        assert_eq!(
            run_chain(&mut e, &mem, &three(512, false)),
            (1, VIRTIO_BLK_S_OK)
        );
        mem.write_slice(&[0u8; 8], GuestAddress(DATA)).unwrap();
        header(&mem, 0, 3);
        assert_eq!(
            run_chain(&mut e, &mem, &three(512, true)).1,
            VIRTIO_BLK_S_OK
        );
        let mut buf = [0u8; 8];
        mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert_eq!(&buf, b"new data");

        header(&mem, 8, 0);
        assert_eq!(
            run_chain(&mut e, &mem, &three(20, true)),
            (21, VIRTIO_BLK_S_OK)
        );
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"test-drive-id-that-i");

        header(&mem, 4, 0);
        let flush = [desc(HDR, 16, false, Some(1)), desc(STATUS, 1, true, None)];
        assert_eq!(run_chain(&mut e, &mem, &flush), (1, VIRTIO_BLK_S_UNSUPP));
        let mut wb = engine(false, true);
        assert_eq!(run_chain(&mut wb, &mem, &flush), (1, VIRTIO_BLK_S_OK));
        header(&mem, 99, 0);
        assert_eq!(run_chain(&mut e, &mem, &flush), (1, VIRTIO_BLK_S_UNSUPP));
    }

    #[test]
    fn out_of_range_unaligned_and_read_only_requests_get_ioerr() {
        let mem = test_memory();
        let mut e = engine(false, false);
        header(&mem, 0, 8);
        assert_eq!(
            run_chain(&mut e, &mem, &three(512, true)),
            (1, VIRTIO_BLK_S_IOERR)
        );
        header(&mem, 0, 7);
        assert_eq!(
            run_chain(&mut e, &mem, &three(1024, true)),
            (1, VIRTIO_BLK_S_IOERR)
        );
        header(&mem, 0, u64::MAX);
        assert_eq!(
            run_chain(&mut e, &mem, &three(512, true)),
            (1, VIRTIO_BLK_S_IOERR)
        );
        header(&mem, 0, 0);
        assert_eq!(
            run_chain(&mut e, &mem, &three(100, true)),
            (1, VIRTIO_BLK_S_IOERR)
        );
        let mut ro = engine(true, false);
        header(&mem, 1, 0);
        assert_eq!(
            run_chain(&mut ro, &mem, &three(512, false)),
            (1, VIRTIO_BLK_S_IOERR)
        );
        // IN with the data buffer device-readable: wrong direction.
        header(&mem, 0, 0);
        assert_eq!(
            run_chain(&mut e, &mem, &three(512, false)),
            (1, VIRTIO_BLK_S_IOERR)
        );
        // Short header.
        let short = [desc(HDR, 8, false, Some(1)), desc(STATUS, 1, true, None)];
        assert_eq!(run_chain(&mut e, &mem, &short), (1, VIRTIO_BLK_S_IOERR));
    }

    #[test]
    fn malformed_chains_get_ioerr_where_possible_and_never_stall() {
        let mem = test_memory();
        let mut e = engine(false, false);
        header(&mem, 0, 0);
        // Data buffer outside guest memory: the status byte still gets IOERR.
        let oom = [
            desc(HDR, 16, false, Some(1)),
            desc(0xfff00, 0x1000, true, Some(2)),
            desc(STATUS, 1, true, None),
        ];
        assert_eq!(run_chain(&mut e, &mem, &oom), (1, VIRTIO_BLK_S_IOERR));
        // A loop: status written into the last writable buffer walked.
        header(&mem, 0, 0);
        let looped = [
            desc(HDR, 16, false, Some(1)),
            desc(STATUS, 1, true, Some(0)),
        ];
        assert_eq!(run_chain(&mut e, &mem, &looped), (1, VIRTIO_BLK_S_IOERR));
        // No writable byte at all: the chain comes back with length 0.
        header(&mem, 0, 0);
        let no_status = [desc(HDR, 16, false, None)];
        assert_eq!(run_chain(&mut e, &mem, &no_status), (0, 0xff));
        // Zero-length status buffer.
        let zero = [desc(HDR, 16, false, Some(1)), desc(STATUS, 0, true, None)];
        assert_eq!(run_chain(&mut e, &mem, &zero), (0, 0xff));
        // Status byte device-readable (wrong direction): no writable byte.
        let ro_status = [desc(HDR, 16, false, Some(1)), desc(STATUS, 1, false, None)];
        assert_eq!(run_chain(&mut e, &mem, &ro_status), (0, 0xff));
    }

    #[test]
    fn rate_limited_requests_wait_in_the_queue() {
        use crate::config::{RateLimiterConfig, TokenBucketConfig};
        let mem = test_memory();
        let mut e = engine(false, false);
        e.limiter = RateLimiter::new(Some(&RateLimiterConfig {
            bandwidth: None,
            ops: Some(TokenBucketConfig {
                size: 1,
                one_time_burst: None,
                refill_time: 60_000,
            }),
        }))
        .unwrap();
        header(&mem, 0, 0);
        let vq = MockSplitQueue::new(&mem, 16);
        let mut chains = three(512, true);
        chains.extend(vec![
            desc(HDR, 16, false, Some(4)),
            desc(DATA, 512, true, Some(5)),
            desc(STATUS, 1, true, None),
        ]);
        vq.add_desc_chains(&chains, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        assert!(e.process_queue(&mem, &mut q));
        assert_eq!(q.next_used(), 1);
        assert_eq!(q.next_avail(), 1, "the second request stays available");
        assert!(e.limiter.is_blocked());
    }
}
