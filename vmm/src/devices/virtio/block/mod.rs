//! virtio-blk backed by a raw image file (virtio 1.x, 5.2): IN, OUT, FLUSH (only with
//! `cache_type: Writeback`) and GET_ID, one request queue served by thread `fc_blk<N>`.
//!
//! Unlike Firecracker, a request that crosses the end of the disk and a write to a read-only
//! drive get VIRTIO_BLK_S_IOERR written into their status byte, and the device offers
//! VIRTIO_BLK_F_RO for read-only drives.

mod request;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

pub use request::{RequestType, SECTOR_SIZE, VIRTIO_BLK_ID_BYTES};

use super::chain::Chain;
use super::worker::{signal_used, DeviceBroken, DeviceThread, EpollSet, EventHandler, Frozen};
use super::{
    read_config_window, ActivateContext, ActivateError, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};
use crate::config::{CacheType, DriveConfig};
use crate::metrics::virtio::{DeviceMetrics, BLOCK as METRICS};
use crate::rate_limiter::{RateLimiter, RateLimiterUpdate};
use crate::vstate::memory::GuestMemory;

/// Virtio device id of block devices.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Feature: the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// Feature: the device honours FLUSH.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;

/// Status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: the request failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: the request type is not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const QUEUE_TOKEN: u64 = 0;
const LIMITER_TOKEN: u64 = 1;

/// Errors setting up or changing a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The drive has no image path.
    #[error("drive {0}: path_on_host is required (vhost-user `socket` drives are not supported)")]
    NoPath(String),
    /// The image cannot be opened.
    #[error("drive {id}: cannot open path_on_host {path}: {err}")]
    Open {
        /// Drive id.
        id: String,
        /// Image path.
        path: String,
        /// OS error.
        err: std::io::Error,
    },
    /// An option is not supported.
    #[error("drive {0}: {1}")]
    Unsupported(String, String),
    /// A host resource could not be created.
    #[error("drive {0}: {1}")]
    Io(String, std::io::Error),
}

/// An open disk image.
#[derive(Debug)]
pub struct Disk {
    file: File,
    sectors: u64,
}

impl Disk {
    /// Opens the image at `path` (read-only when `read_only`); its size rounds down to sectors.
    pub fn open(id: &str, path: &str, read_only: bool) -> Result<Disk, BlockError> {
        let open_err = |err| BlockError::Open {
            id: id.to_string(),
            path: path.to_string(),
            err,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() && !is_block_device(&meta) {
            return Err(open_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file or block device",
            )));
        }
        Disk::from_file(file).map_err(open_err)
    }

    /// Wraps an open image file.
    pub fn from_file(mut file: File) -> std::io::Result<Disk> {
        use std::io::Seek;
        let size = file.seek(std::io::SeekFrom::End(0))?;
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "disk image size {size} is not a multiple of {SECTOR_SIZE}: the tail is ignored"
            );
        }
        Ok(Disk {
            file,
            sectors: size / SECTOR_SIZE,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }
}

fn is_block_device(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::FileTypeExt;
    meta.file_type().is_block_device()
}

/// Request processing for one drive, independent of threads and eventfds (the fuzz targets
/// drive it directly).
pub struct BlockEngine {
    disk: Disk,
    id: [u8; VIRTIO_BLK_ID_BYTES],
    read_only: bool,
    writeback: bool,
    limiter: RateLimiter,
}

impl BlockEngine {
    /// An engine serving `disk`, identified to the guest by `drive_id` (truncated to 20 bytes).
    pub fn new(
        disk: Disk,
        drive_id: &str,
        read_only: bool,
        writeback: bool,
        limiter: RateLimiter,
    ) -> Self {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES];
        let n = drive_id.len().min(VIRTIO_BLK_ID_BYTES);
        id[..n].copy_from_slice(&drive_id.as_bytes()[..n]);
        BlockEngine {
            disk,
            id,
            read_only,
            writeback,
            limiter,
        }
    }

    /// Serves every available request of `queue`; returns whether any buffer was used. Stops
    /// early when the rate limiter holds the queue back.
    pub fn process_queue(&mut self, mem: &GuestMemory, queue: &mut Queue) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let (head, len) = match Chain::parse(chain, mem, u64::from(u32::MAX)) {
                Ok(chain) => {
                    let cost = request::cost(mem, &chain);
                    if !self.limiter.consume(cost) {
                        DeviceMetrics::add(&METRICS.rate_limited, 1);
                        queue.go_to_previous_position();
                        break;
                    }
                    (chain.head, request::execute(self, mem, &chain))
                }
                Err(bad) => {
                    DeviceMetrics::add(&METRICS.bad_chains, 1);
                    (bad.head, request::fail_bad_chain(mem, &bad.valid))
                }
            };
            if queue.add_used(mem, head, len).is_err() {
                // The head index is past the queue: there is nothing to give back.
                DeviceMetrics::add(&METRICS.bad_chains, 1);
            }
            used = true;
        }
        used
    }
}

/// Changes applied to a running drive.
pub enum BlockUpdate {
    /// New rate limiter buckets.
    RateLimiter(RateLimiterUpdate),
    /// A new backing image (PATCH path_on_host).
    Disk(Disk),
}

/// The `fc_blk<N>` thread's state.
pub struct BlockHandler {
    engine: BlockEngine,
    mem: GuestMemory,
    queue: Queue,
    queue_evt: EventFd,
    interrupt: Arc<VirtioInterrupt>,
}

impl BlockHandler {
    fn process(&mut self) {
        if self.engine.process_queue(&self.mem, &mut self.queue) {
            signal_used(&mut self.queue, &self.mem, &self.interrupt);
        }
    }
}

impl EventHandler for BlockHandler {
    type Update = BlockUpdate;
    type Backend = BlockEngine;

    fn into_backend(self) -> BlockEngine {
        self.engine
    }

    fn update_backend(engine: &mut BlockEngine, update: BlockUpdate) {
        match update {
            BlockUpdate::RateLimiter(update) => engine.limiter.update(&update),
            BlockUpdate::Disk(disk) => engine.disk = disk,
        }
    }

    fn register(&mut self, epoll: &EpollSet) -> std::io::Result<()> {
        epoll.add(self.queue_evt.as_raw_fd(), EventSet::IN, QUEUE_TOKEN)?;
        epoll.add(self.engine.limiter.as_raw_fd(), EventSet::IN, LIMITER_TOKEN)
    }

    fn handle_event(&mut self, _epoll: &EpollSet, token: u64, _events: EventSet) {
        match token {
            QUEUE_TOKEN => {
                // Reading resets the counter; every available request is served below.
                let _ = self.queue_evt.read();
                if !self.engine.limiter.is_blocked() {
                    self.process();
                }
            }
            LIMITER_TOKEN => {
                self.engine.limiter.on_timer();
                self.process();
            }
            _ => {}
        }
    }

    fn handle_update(&mut self, _epoll: &EpollSet, update: BlockUpdate) {
        match update {
            BlockUpdate::RateLimiter(update) => {
                self.engine.limiter.update(&update);
                self.process();
            }
            BlockUpdate::Disk(disk) => {
                self.engine.disk = disk;
                if let Err(e) = self.interrupt.signal_config_change() {
                    log::warn!("cannot signal the new disk size: {e}");
                }
            }
        }
    }

    fn queue_states(&self) -> Vec<QueueState> {
        vec![self.queue.state()]
    }
}

/// A virtio-blk device.
pub struct Block {
    drive_id: String,
    read_only: bool,
    features: u64,
    /// Capacity in sectors, as shown in the config space.
    sectors: u64,
    thread: DeviceThread<BlockHandler>,
}

impl Block {
    /// Opens the drive's image; `index` numbers the device thread (`fc_blk<index>`).
    pub fn new(
        config: &DriveConfig,
        index: usize,
        seccomp: &crate::seccomp::Filters,
    ) -> Result<Block, BlockError> {
        let disk = Self::open_image(config)?;
        let id = &config.drive_id;
        let read_only = config.is_read_only.unwrap_or(false);
        let writeback = config.cache_type == CacheType::Writeback;
        let limiter = RateLimiter::new(config.rate_limiter.as_ref())
            .map_err(|e| BlockError::Io(id.clone(), e))?;
        let mut features = VIRTIO_F_VERSION_1;
        if read_only {
            features |= VIRTIO_BLK_F_RO;
        }
        if writeback {
            features |= VIRTIO_BLK_F_FLUSH;
        }
        Ok(Block {
            drive_id: id.clone(),
            read_only,
            features,
            sectors: disk.sectors(),
            thread: DeviceThread::spawn(
                format!("fc_blk{index}"),
                BlockEngine::new(disk, id, read_only, writeback, limiter),
                seccomp,
            )
            .map_err(|e| BlockError::Io(id.clone(), e))?,
        })
    }

    /// Checks a drive as Firecracker does when it is configured (`PUT /drives`) and opens its
    /// image: a `path_on_host` that opens (read-only when `is_read_only`, else read-write), no
    /// vhost-user `socket`, the "Sync" I/O engine.
    pub fn open_image(config: &DriveConfig) -> Result<Disk, BlockError> {
        let id = &config.drive_id;
        let path = config
            .path_on_host
            .as_deref()
            .ok_or_else(|| BlockError::NoPath(id.clone()))?;
        if config.socket.is_some() {
            return Err(BlockError::Unsupported(
                id.clone(),
                "vhost-user `socket` drives are not supported".into(),
            ));
        }
        match config.io_engine.as_deref() {
            None | Some("Sync") => {}
            Some(other) => {
                return Err(BlockError::Unsupported(
                    id.clone(),
                    format!("io_engine {other:?} is not available: use \"Sync\""),
                ))
            }
        }
        Disk::open(id, path, config.is_read_only.unwrap_or(false))
    }

    /// The drive id.
    pub fn drive_id(&self) -> &str {
        &self.drive_id
    }

    /// Applies PATCH /drives/{id}: a new image path and/or rate limiter, live if running.
    pub fn update(
        &mut self,
        path: Option<&str>,
        limiter: Option<RateLimiterUpdate>,
    ) -> Result<(), BlockError> {
        let disk = path
            .map(|p| Disk::open(&self.drive_id, p, self.read_only))
            .transpose()?;
        if let Some(disk) = &disk {
            self.sectors = disk.sectors();
        }
        let broken = |e| BlockError::Io(self.drive_id.clone(), std::io::Error::other(e));
        if let Some(disk) = disk {
            self.thread
                .update(BlockUpdate::Disk(disk))
                .map_err(broken)?;
        }
        if let Some(update) = limiter {
            self.thread
                .update(BlockUpdate::RateLimiter(update))
                .map_err(broken)?;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config starts with the capacity in sectors.
        read_config_window(&self.sectors.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The capacity is read-only and no writable field (writeback toggle) is offered.
    }

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        let [(queue, queue_evt)] = ctx.take_queues("virtio-blk")?;
        let ActivateContext { mem, interrupt, .. } = ctx;
        // Requests the driver queued before DRIVER_OK are served on the first notification.
        self.thread.start(move |engine| BlockHandler {
            engine,
            mem,
            queue,
            queue_evt,
            interrupt,
        })
    }

    fn reset(&mut self) {
        self.thread.stop();
    }

    fn freeze(&self) -> Result<Frozen, DeviceBroken> {
        self.thread.freeze()
    }

    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}
