//! The thread that serves a device: started with the device (while the VMM is still being
//! built, before any seccomp filter is in force), idle until the driver sets DRIVER_OK, then an
//! epoll loop over the queue eventfds, the backend's fds and a control eventfd; a driver reset
//! sends it back to idle with its backend, ready for the next activation.
//!
//! The vCPU thread that activates or resets a device only sends a message, writes an eventfd and
//! waits for the answer: it never creates threads, epoll sets or eventfds.

use std::os::fd::RawFd;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use virtio_queue::QueueState;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Token of the control eventfd.
const CONTROL_TOKEN: u64 = u64::MAX;
/// Events handled per epoll_wait.
const EVENT_BATCH: usize = 32;

/// The epoll set of a device thread, for handlers to (de)register their fds.
pub struct EpollSet {
    epoll: Epoll,
}

impl EpollSet {
    /// A new, empty epoll set.
    pub fn new() -> std::io::Result<Self> {
        Ok(EpollSet {
            epoll: Epoll::new()?,
        })
    }

    /// Watches `fd` for `events`, reporting them with `token`.
    pub fn add(&self, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
    }

    /// Changes the events watched on `fd`.
    pub fn modify(&self, fd: RawFd, events: EventSet, token: u64) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Modify, fd, EpollEvent::new(events, token))
    }

    /// Waits up to `timeout_ms` for events (used by the device thread and by tests).
    pub fn wait(&self, timeout_ms: i32, events: &mut [EpollEvent]) -> std::io::Result<usize> {
        self.epoll.wait(timeout_ms, events)
    }

    /// Stops watching `fd`.
    pub fn remove(&self, fd: RawFd) -> std::io::Result<()> {
        self.epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default())
    }
}

/// What a device thread runs while its device is active.
pub trait EventHandler: Send + 'static {
    /// Runtime changes (rate limiters, backend swaps).
    type Update: Send + 'static;
    /// What the device keeps between activations (disk, tap, rate limiters).
    type Backend: Send + 'static;

    /// Gives the backend back when the driver resets the device.
    fn into_backend(self) -> Self::Backend;
    /// Applies an update while the device is not active.
    fn update_backend(backend: &mut Self::Backend, update: Self::Update);
    /// Registers the handler's fds; token `u64::MAX` is reserved.
    fn register(&mut self, epoll: &EpollSet) -> std::io::Result<()>;
    /// Handles `events` on the fd registered with `token`.
    fn handle_event(&mut self, epoll: &EpollSet, token: u64, events: EventSet);
    /// Applies an update while the device is active.
    fn handle_update(&mut self, epoll: &EpollSet, update: Self::Update);
    /// The state of the queues the handler serves, in queue order, for a snapshot.
    fn queue_states(&self) -> Vec<QueueState>;
}

/// Builds a handler around the backend at activation.
type MakeHandler<H> = Box<dyn FnOnce(<H as EventHandler>::Backend) -> H + Send>;

enum Control<H: EventHandler> {
    Activate(MakeHandler<H>, Sender<std::io::Result<()>>),
    Deactivate(Sender<()>),
    Update(H::Update),
    Freeze(Sender<Vec<QueueState>>, Receiver<()>),
    Exit,
}

/// A device thread held still for a snapshot: it serves nothing (no queue, no backend fd)
/// until this is dropped, so guest memory and [`Frozen::queues`] stay consistent.
///
/// A handler completes every request it takes off a ring within the event that took it (block
/// I/O is synchronous; net and vsock put back a chain they cannot fill), and the thread only
/// freezes between events, so no request is in flight while it is frozen.
pub struct Frozen {
    /// The state of the queues an active device serves, in queue order; empty when idle.
    pub queues: Vec<QueueState>,
    _release: Option<Sender<()>>,
}

impl Frozen {
    /// The answer of a device with no active queues: nothing to hold.
    pub fn idle() -> Self {
        Frozen {
            queues: Vec::new(),
            _release: None,
        }
    }
}

/// The device thread died; the device stays offline.
#[derive(Debug, thiserror::Error)]
#[error("the device thread has failed; restart the microVM")]
pub struct DeviceBroken;

/// A device's thread and the channel to it.
pub struct DeviceThread<H: EventHandler> {
    control: Sender<Control<H>>,
    wake: EventFd,
    active: bool,
    thread: Option<JoinHandle<()>>,
}

impl<H: EventHandler> DeviceThread<H> {
    /// Starts thread `name`, idle, owning `backend`.
    pub fn spawn(
        name: String,
        backend: H::Backend,
        seccomp: &crate::seccomp::Filters,
    ) -> std::io::Result<Self> {
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let thread_wake = wake.try_clone()?;
        let (control, requests) = channel();
        let seccomp = seccomp.clone();
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            match seccomp.apply("device") {
                Ok(()) => serve::<H>(backend, requests, thread_wake),
                // Dropping `requests` makes every later activation fail with DeviceBroken.
                Err(e) => log::error!("device thread not started: {e}"),
            }
        })?;
        Ok(DeviceThread {
            control,
            wake,
            active: false,
            thread: Some(thread),
        })
    }

    fn send(&self, message: Control<H>) -> Result<(), DeviceBroken> {
        self.control.send(message).map_err(|_| DeviceBroken)?;
        // A full counter still wakes the thread.
        let _ = self.wake.write(1);
        Ok(())
    }

    /// Activates the device with the handler `make` builds around the backend; returns once the
    /// thread serves the queues.
    pub fn start(
        &mut self,
        make: impl FnOnce(H::Backend) -> H + Send + 'static,
    ) -> Result<(), super::ActivateError> {
        if self.active {
            return Err(super::ActivateError::BadConfig(
                "the device is already active".into(),
            ));
        }
        let (tx, rx) = channel();
        let broken = || super::ActivateError::Io(std::io::Error::other(DeviceBroken));
        self.send(Control::Activate(Box::new(make), tx))
            .map_err(|_| broken())?;
        rx.recv().map_err(|_| broken())??;
        self.active = true;
        Ok(())
    }

    /// Deactivates the device (driver reset); returns once the thread is idle again.
    pub fn stop(&mut self) {
        if !self.active {
            return;
        }
        self.active = false;
        let (tx, rx) = channel();
        if self.send(Control::Deactivate(tx)).is_err() || rx.recv().is_err() {
            log::error!("a virtio device thread has died; the device stays offline");
        }
    }

    /// Holds the thread still between two events and reads its queues' state (see [`Frozen`]).
    pub fn freeze(&self) -> Result<Frozen, DeviceBroken> {
        if !self.active {
            return Ok(Frozen::idle());
        }
        let (answer, states) = channel();
        let (release, held) = channel();
        self.send(Control::Freeze(answer, held))?;
        let queues = states.recv().map_err(|_| DeviceBroken)?;
        Ok(Frozen {
            queues,
            _release: Some(release),
        })
    }

    /// Sends a runtime change to the backend, active or not.
    pub fn update(&self, update: H::Update) -> Result<(), DeviceBroken> {
        self.send(Control::Update(update))
    }
}

impl<H: EventHandler> Drop for DeviceThread<H> {
    fn drop(&mut self) {
        // A dead thread needs no stopping.
        let _ = self.send(Control::Exit);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The device thread: idle on the channel, or serving a handler.
fn serve<H: EventHandler>(backend: H::Backend, requests: Receiver<Control<H>>, wake: EventFd) {
    let mut backend = Some(backend);
    while let Ok(message) = requests.recv() {
        match message {
            Control::Activate(make, answer) => {
                let Some(idle) = backend.take() else { return };
                // Wake-ups sent while idle were for messages already received.
                let _ = wake.read();
                let mut handler = make(idle);
                let epoll = match EpollSet::new().and_then(|epoll| {
                    epoll.add(
                        std::os::fd::AsRawFd::as_raw_fd(&wake),
                        EventSet::IN,
                        CONTROL_TOKEN,
                    )?;
                    handler.register(&epoll)?;
                    Ok(epoll)
                }) {
                    Ok(epoll) => epoll,
                    Err(e) => {
                        backend = Some(handler.into_backend());
                        // The activating side may have gone; nothing to tell then.
                        let _ = answer.send(Err(e));
                        continue;
                    }
                };
                let _ = answer.send(Ok(()));
                match run(handler, &epoll, &requests, &wake) {
                    Some(idle) => backend = Some(idle),
                    None => return,
                }
            }
            Control::Deactivate(answer) => {
                let _ = answer.send(());
            }
            Control::Update(update) => {
                if let Some(idle) = backend.as_mut() {
                    H::update_backend(idle, update);
                }
            }
            Control::Freeze(answer, _) => {
                // An idle device has no queues to report or hold.
                let _ = answer.send(Vec::new());
            }
            Control::Exit => return,
        }
    }
}

/// Serves `handler` until deactivated (returns the backend) or told to exit (None).
fn run<H: EventHandler>(
    mut handler: H,
    epoll: &EpollSet,
    requests: &Receiver<Control<H>>,
    wake: &EventFd,
) -> Option<H::Backend> {
    let mut events = [EpollEvent::default(); EVENT_BATCH];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("device thread stops: epoll_wait failed: {e}");
                return None;
            }
        };
        for event in &events[..n] {
            if event.data() != CONTROL_TOKEN {
                handler.handle_event(epoll, event.data(), event.event_set());
                continue;
            }
            // Reading resets the counter; every queued message is drained below.
            let _ = wake.read();
            while let Ok(message) = requests.try_recv() {
                match message {
                    Control::Update(update) => handler.handle_update(epoll, update),
                    Control::Freeze(answer, held) => {
                        let _ = answer.send(handler.queue_states());
                        // Returns when the snapshot drops its `Frozen`.
                        let _ = held.recv();
                    }
                    Control::Deactivate(answer) => {
                        let backend = handler.into_backend();
                        let _ = answer.send(());
                        return Some(backend);
                    }
                    Control::Exit => return None,
                    // Activation of an active device is refused before it is sent.
                    Control::Activate(_, answer) => {
                        let _ =
                            answer.send(Err(std::io::Error::other("the device is already active")));
                    }
                }
            }
        }
    }
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
