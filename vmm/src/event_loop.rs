//! The VMM thread's event loop (event-manager): exit requests (guest resets among them), terminating
//! signals, API requests and host input for the serial console.

use std::io::IsTerminal;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;
use vmm_sys_util::terminal::Terminal;
use vmm_sys_util::timerfd::TimerFd;

use crate::api_server::channel::ApiChannel;
use crate::controller::Controller;
use crate::exit::{ExitReason, VmExit};
use crate::metrics::{inc, METRICS};

const TAG_EXIT: u32 = 1;
const TAG_SIGNAL: u32 = 2;
const TAG_API: u32 = 3;
const TAG_STDIN: u32 = 4;
const TAG_STDIN_RETRY: u32 = 6;

/// How long to wait before offering more input when the guest's receive FIFO is full.
const STDIN_RETRY: Duration = Duration::from_millis(5);

/// Write end of the terminating-signal eventfd, for the async-signal-safe handler.
static SIGNAL_FD: AtomicI32 = AtomicI32::new(-1);
/// The last terminating signal received.
static LAST_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn handle_terminate(signum: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    LAST_SIGNAL.store(signum, Ordering::SeqCst);
    let fd = SIGNAL_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live u64 on this stack.
        unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// Puts stdin in raw mode while the guest owns the console, and restores it on drop.
struct RawStdin {
    stdin: std::io::Stdin,
    was_tty: bool,
}

impl RawStdin {
    fn new() -> Self {
        let stdin = std::io::stdin();
        let was_tty = stdin.is_terminal() && stdin.lock().set_raw_mode().is_ok();
        RawStdin { stdin, was_tty }
    }

    /// Reads what fd 0 has, unbuffered: std's `Stdin` would keep bytes beyond `buf` in its own
    /// buffer, where epoll cannot see them, and they would never reach the guest.
    fn read(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            // SAFETY: read(2) into a live buffer of buf.len() bytes.
            let n =
                unsafe { libc::read(self.stdin.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            match n {
                n if n >= 0 => return Ok(n as usize),
                _ => {
                    let err = std::io::Error::last_os_error();
                    if err.kind() != std::io::ErrorKind::Interrupted {
                        return Err(err);
                    }
                }
            }
        }
    }
}

impl Drop for RawStdin {
    fn drop(&mut self) {
        if self.was_tty {
            // Best effort: nothing more can be done about a terminal we cannot reset.
            let _ = self.stdin.lock().set_canon_mode();
        }
    }
}

/// The VMM as one event subscriber.
pub struct Vmm {
    controller: Controller,
    exit: Arc<VmExit>,
    signal_evt: EventFd,
    api: Option<ApiChannel>,
    stdin: Option<RawStdin>,
    stdin_retry: TimerFd,
}

/// Errors of the event loop itself.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// The epoll-based manager failed.
    #[error("event manager: {0:?}")]
    EventManager(event_manager::Error),
    /// A host resource could not be created.
    #[error("cannot set up the event loop: {0}")]
    Io(#[from] std::io::Error),
    /// The signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

impl Vmm {
    /// Wraps `controller` and installs the terminating-signal handlers, so create it before
    /// anything (such as the API socket) tells the world this process is up. `console_input`
    /// feeds stdin to the guest.
    pub fn new(
        controller: Controller,
        exit: Arc<VmExit>,
        console_input: bool,
    ) -> Result<Self, EventLoopError> {
        let signal_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        SIGNAL_FD.store(signal_evt.as_raw_fd(), Ordering::SeqCst);
        for signum in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            register_signal_handler(signum, handle_terminate).map_err(EventLoopError::Signal)?;
        }
        Ok(Vmm {
            controller,
            exit,
            signal_evt,
            api: None,
            stdin: console_input.then(RawStdin::new),
            stdin_retry: TimerFd::new()
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?,
        })
    }

    /// Serves API requests arriving on `api`.
    pub fn attach_api(&mut self, api: ApiChannel) {
        self.api = Some(api);
    }

    /// Waits (up to `timeout`) until the API thread has written every response the VMM
    /// thread answered, so that exiting does not cut one off.
    pub fn wait_for_api_responses(&self, timeout: std::time::Duration) {
        if let Some(api) = &self.api {
            api.in_flight.wait_idle(timeout);
        }
    }

    /// The controller, for applying a config file before the loop starts.
    pub fn controller(&mut self) -> &mut Controller {
        &mut self.controller
    }

    fn serve_api(&mut self) {
        let Some(api) = &self.api else { return };
        // The counter tells nothing the channel does not; drain it.
        let _ = api.evt.read();
        while let Ok((action, reply)) = api.requests.try_recv() {
            inc(&METRICS.api_requests);
            let result = self.controller.handle(action);
            if result.is_err() {
                inc(&METRICS.api_errors);
            }
            // A client that hung up does not need its answer.
            let _ = reply.send(result);
        }
    }

    fn feed_stdin(&mut self, ops: &mut EventOps) {
        let (Some(stdin), Some(vm)) = (&self.stdin, self.controller.running()) else {
            // Before boot there is no console: keep the input for later.
            if self.controller.running().is_none() {
                self.pause_stdin(ops);
            }
            return;
        };
        let mut serial = vm.serial.lock().unwrap_or_else(|p| p.into_inner());
        let room = serial.input_capacity();
        if room == 0 {
            drop(serial);
            self.pause_stdin(ops);
            return;
        }
        let mut buf = vec![0u8; room];
        match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                // End of input: stop watching stdin.
                drop(serial);
                let _ = ops.remove(Events::with_data(
                    &std::io::stdin(),
                    TAG_STDIN,
                    EventSet::IN,
                ));
                self.stdin = None;
            }
            Ok(n) => {
                let queued = serial.enqueue_input(&buf[..n]);
                METRICS
                    .serial_bytes_in
                    .fetch_add(queued as u64, Ordering::Relaxed);
            }
        }
    }

    /// Stops reading stdin for a moment, until the guest drains its FIFO or boots.
    fn pause_stdin(&mut self, ops: &mut EventOps) {
        let _ = ops.remove(Events::with_data(
            &std::io::stdin(),
            TAG_STDIN,
            EventSet::IN,
        ));
        if self.stdin_retry.reset(STDIN_RETRY, None).is_err() {
            self.stdin = None;
        }
    }

    fn resume_stdin(&mut self, ops: &mut EventOps) {
        let _ = self.stdin_retry.wait();
        if self.stdin.is_some()
            && ops
                .add(Events::with_data(
                    &std::io::stdin(),
                    TAG_STDIN,
                    EventSet::IN,
                ))
                .is_err()
        {
            self.stdin = None;
        }
    }
}

impl MutEventSubscriber for Vmm {
    fn init(&mut self, ops: &mut EventOps) {
        let mut events = vec![
            Events::with_data(self.exit.eventfd(), TAG_EXIT, EventSet::IN),
            Events::with_data(&self.signal_evt, TAG_SIGNAL, EventSet::IN),
            Events::with_data(&self.stdin_retry, TAG_STDIN_RETRY, EventSet::IN),
        ];
        if let Some(api) = &self.api {
            events.push(Events::with_data(&api.evt, TAG_API, EventSet::IN));
        }
        for event in events {
            if let Err(e) = ops.add(event) {
                self.exit.request(ExitReason::VmmError(format!(
                    "cannot register an event: {e:?}"
                )));
            }
        }
        // Stdin may be a file or /dev/null, which epoll cannot watch: then there is no input.
        if self.stdin.is_some()
            && ops
                .add(Events::with_data(
                    &std::io::stdin(),
                    TAG_STDIN,
                    EventSet::IN,
                ))
                .is_err()
        {
            self.stdin = None;
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            TAG_EXIT => {}
            TAG_SIGNAL => {
                let _ = self.signal_evt.read();
                self.exit
                    .request(ExitReason::Signal(LAST_SIGNAL.load(Ordering::SeqCst)));
            }
            TAG_API => self.serve_api(),
            TAG_STDIN => self.feed_stdin(ops),
            TAG_STDIN_RETRY => self.resume_stdin(ops),
            _ => {}
        }
    }
}

/// Runs the VMM until something requests an exit, and returns why.
pub fn run(vmm: Vmm) -> Result<(ExitReason, Vmm), EventLoopError> {
    let exit = vmm.exit.clone();
    let mut manager: EventManager<Vmm> =
        EventManager::new().map_err(EventLoopError::EventManager)?;
    let id = manager.add_subscriber(vmm);
    let reason = loop {
        if let Some(reason) = exit.reason() {
            break reason;
        }
        match manager.run() {
            Ok(_) => {}
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EINTR => {}
            Err(e) => break ExitReason::VmmError(format!("event loop failed: {e:?}")),
        }
    };
    let vmm = manager
        .remove_subscriber(id)
        .map_err(EventLoopError::EventManager)?;
    Ok((reason, vmm))
}

impl Vmm {
    /// Final bookkeeping: one last metrics flush.
    pub fn shutdown(mut self) {
        if let Err(e) = self.controller.flush_metrics() {
            log::warn!("{e}");
        }
    }
}
