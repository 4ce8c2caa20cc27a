//! The thread that serves an activated device: an epoll loop over the queue eventfds, the
//! device's backend fds, an update eventfd and a kill eventfd.
//!
//! The thread owns the device's [`EventHandler`] while it runs and hands it back when stopped,
//! so a device reset by its driver can be activated again with the same backend.

use std::os::fd::RawFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Token of the kill eventfd.
const KILL_TOKEN: u64 = u64::MAX;
/// Token of the update eventfd.
const UPDATE_TOKEN: u64 = u64::MAX - 1;
/// Events handled per epoll_wait.
const EVENT_BATCH: usize = 32;

/// The epoll set of a device thread, for handlers to (de)register their fds.
pub struct EpollSet {
    epoll: Epoll,
}

impl EpollSet {
    /// A new, empty epoll set.
    pub fn new() -> std::io::Result<Self> {
        Ok(EpollSet { epoll: Epoll::new()? })
    }

    /// Watches `fd` for `events`, reporting them with `token`.
    pub fn add(&self, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
        self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Changes the events watched on `fd`.
    pub fn modify(&self, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
        self.epoll.ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    /// Waits up to `timeout_ms` for events (used by the device thread and by tests).
    pub fn wait(&self, timeout_ms: i32, events: &mut [EpollEvent]) -> std::io::Result<usize> {
        self.epoll.wait(timeout_ms, events)
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// What a device thread runs.
pub trait EventHandler: Send + 'static {
    /// Updates sent to the running thread (rate limiters, backend swaps).
    type Update: Send + 'static;
    /// What the device keeps between activations (disk, tap, rate limiters).
    type Backend: Send + 'static;

    /// Gives the backend back when the thread stops.
    fn into_backend(self) -> Self::Backend;

    /// Registers the handler's fds; tokens `u64::MAX - 1` and up are reserved.
    fn register(&mut self, epoll: &EpollSet) -> std::io::Result<()>;
    /// Handles `events` on the fd registered with `token`.
    fn handle_event(&mut self, epoll: &EpollSet, token: u64, events: EventSet);
    /// Applies an update.
    fn handle_update(&mut self, epoll: &EpollSet, update: Self::Update);
}

/// A running device thread.
pub struct Worker<H: EventHandler> {
    kill: EventFd,
    update_evt: EventFd,
    updates: Sender<H::Update>,
    thread: Option<JoinHandle<H>>,
}

impl<H: EventHandler> Worker<H> {
    /// Starts thread `name` running `handler`.
    pub fn spawn(name: String, mut handler: H) -> std::io::Result<Self> {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let update_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        let epoll = EpollSet::new()?;
        epoll.add(std::os::fd::AsRawFd::as_raw_fd(&kill), EventSet::IN, KILL_TOKEN)?;
        epoll.add(std::os::fd::AsRawFd::as_raw_fd(&update_evt), EventSet::IN, UPDATE_TOKEN)?;
        handler.register(&epoll)?;
        let (updates, update_rx) = channel();
        let thread_update_evt = update_evt.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || run(handler, epoll, thread_update_evt, update_rx))?;
        Ok(Worker {
            kill,
            update_evt,
            updates,
            thread: Some(thread),
        })
    }

    /// Sends `update` to the thread.
    pub fn update(&self, update: H::Update) {
        // A dead thread has no device to update; the eventfd only fails when its counter is full,
        // and then a wake-up is pending anyway.
        if self.updates.send(update).is_ok() {
            let _ = self.update_evt.write(1);
        }
    }

    /// Stops the thread and returns its handler (None if the thread panicked).
    pub fn stop(mut self) -> Option<H> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Option<H> {
        let thread = self.thread.take()?;
        // A full counter still wakes the thread.
        let _ = self.kill.write(1);
        thread.join().ok()
    }
}

impl<H: EventHandler> Drop for Worker<H> {
    fn drop(&mut self) {
        self.stop_thread();
    }
}

fn run<H: EventHandler>(mut handler: H, epoll: EpollSet, update_evt: EventFd, updates: Receiver<H::Update>) -> H {
    let mut events = [EpollEvent::default(); EVENT_BATCH];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("device thread stops: epoll_wait failed: {e}");
                return handler;
            }
        };
        for event in &events[..n] {
            match event.data() {
                KILL_TOKEN => return handler,
                UPDATE_TOKEN => {
                    // Reading resets the counter; every queued update is drained below.
                    let _ = update_evt.read();
                    while let Ok(update) = updates.try_recv() {
                        handler.handle_update(&epoll, update);
                    }
                }
                token => handler.handle_event(&epoll, token, event.event_set()),
            }
        }
    }
}

/// Where a device's backend is: idle between activations, or owned by its running thread.
pub enum DeviceThread<H: EventHandler> {
    /// Not activated (or reset): the backend waits here.
    Idle(Box<H::Backend>),
    /// Activated: the thread owns the backend.
    Running(Worker<H>),
    /// The thread panicked and took the backend with it.
    Broken,
}

/// The device thread died earlier; the device stays offline.
#[derive(Debug, thiserror::Error)]
#[error("the device thread has failed; restart the microVM")]
pub struct DeviceBroken;

impl<H: EventHandler> DeviceThread<H> {
    /// An idle device with `backend`.
    pub fn new(backend: H::Backend) -> Self {
        DeviceThread::Idle(Box::new(backend))
    }

    /// Starts thread `name` with the handler `make` builds around the backend.
    pub fn start(&mut self, name: String, make: impl FnOnce(H::Backend) -> H) -> Result<(), super::ActivateError> {
        let DeviceThread::Idle(backend) = std::mem::replace(self, DeviceThread::Broken) else {
            let what = if matches!(self, DeviceThread::Broken) { "has failed" } else { "is already active" };
            return Err(super::ActivateError::BadConfig(format!("the device {what}")));
        };
        *self = DeviceThread::Running(Worker::spawn(name, make(*backend))?);
        Ok(())
    }

    /// Stops a running thread and takes its backend back.
    pub fn stop(&mut self) {
        if !matches!(self, DeviceThread::Running(_)) {
            return;
        }
        if let DeviceThread::Running(worker) = std::mem::replace(self, DeviceThread::Broken) {
            match worker.stop() {
                Some(handler) => *self = DeviceThread::Idle(Box::new(handler.into_backend())),
                None => log::error!("a virtio device thread panicked; the device stays offline"),
            }
        }
    }

    /// Applies a change: directly to an idle backend, or as updates to the running thread.
    pub fn apply(&mut self, change: impl FnOnce(Target<'_, H>)) -> Result<(), DeviceBroken> {
        match self {
            DeviceThread::Idle(backend) => change(Target::Idle(backend.as_mut())),
            DeviceThread::Running(worker) => change(Target::Running(worker)),
            DeviceThread::Broken => return Err(DeviceBroken),
        }
        Ok(())
    }
}

/// Where a runtime change goes.
pub enum Target<'a, H: EventHandler> {
    /// The backend of an idle device.
    Idle(&'a mut H::Backend),
    /// The running thread.
    Running(&'a Worker<H>),
}

/// Raises the device's used-buffer interrupt if `queue` wants one for the buffers just used.
pub fn signal_used(
    queue: &mut virtio_queue::Queue,
    mem: &crate::vstate::memory::GuestMemory,
    interrupt: &super::VirtioInterrupt,
) {
    use virtio_queue::QueueT;
    // A used ring the driver put outside memory cannot be read: notify anyway.
    if queue.needs_notification(mem).unwrap_or(true) {
        if let Err(e) = interrupt.signal_used_queue() {
            log::warn!("cannot raise the virtio interrupt: {e}");
        }
    }
}
