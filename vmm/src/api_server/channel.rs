//! The request channel between the API thread and the VMM thread. The API thread sends each
//! routed [`VmmAction`] with a reply sender and wakes the VMM thread's event loop through an
//! eventfd; the event loop answers on the reply sender. Answers the API thread has taken but not
//! yet written are counted ([`InFlight`]), so the VMM does not exit under a waiting client.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex};

use vmm_sys_util::eventfd::EventFd;

use crate::controller::{VmmAction, VmmActionError, VmmResponse};

/// One API request and where its answer goes.
pub type ApiRequest = (VmmAction, Sender<Result<VmmResponse, VmmActionError>>);

/// The VMM side of the API channel: requests, and the eventfd the API thread writes per request.
pub struct ApiChannel {
    /// Incoming requests.
    pub requests: Receiver<ApiRequest>,
    /// Readable when requests are waiting.
    pub evt: EventFd,
    /// Responses taken but not yet written by the API thread.
    pub in_flight: InFlight,
}

/// Requests taken by the VMM thread whose responses are not written yet, so that the VMM
/// does not exit between answering a request (e.g. InstanceStart of a guest that resets at
/// once) and the client receiving the answer.
#[derive(Clone, Default)]
pub struct InFlight(Arc<(Mutex<usize>, Condvar)>);

impl InFlight {
    fn change(&self, up: bool) {
        let (count, changed) = &*self.0;
        let mut count = count.lock().unwrap_or_else(|p| p.into_inner());
        if up {
            *count += 1;
        } else {
            *count = count.saturating_sub(1);
        }
        changed.notify_all();
    }

    /// Waits until every response taken has been written, up to `timeout`.
    pub fn wait_idle(&self, timeout: std::time::Duration) {
        let (count, changed) = &*self.0;
        let count = count.lock().unwrap_or_else(|p| p.into_inner());
        let _ = changed.wait_timeout_while(count, timeout, |n| *n > 0);
    }
}

/// The API thread's handle on the VMM thread.
#[derive(Clone)]
pub struct VmmClient {
    requests: Sender<ApiRequest>,
    evt: Arc<EventFd>,
    in_flight: InFlight,
}

impl VmmClient {
    /// Hands `action` to the VMM thread and waits for its answer; None when the VMM thread is
    /// shutting down. Counted in flight until the caller calls [`Self::response_written`].
    pub fn call(&self, action: VmmAction) -> Option<Result<VmmResponse, VmmActionError>> {
        self.in_flight.change(true);
        let (reply, answer) = channel();
        if self.requests.send((action, reply)).is_err() || self.evt.write(1).is_err() {
            return None;
        }
        answer.recv().ok()
    }

    /// The answer to a [`Self::call`] has been written to the client.
    pub fn response_written(&self) {
        self.in_flight.change(false);
    }
}

/// Both ends of a new API channel: the API thread's client and the VMM thread's receiver.
pub fn open() -> std::io::Result<(VmmClient, ApiChannel)> {
    let (requests_tx, requests) = channel();
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    let in_flight = InFlight::default();
    let client = VmmClient {
        requests: requests_tx,
        evt: Arc::new(evt.try_clone()?),
        in_flight: in_flight.clone(),
    };
    Ok((
        client,
        ApiChannel {
            requests,
            evt,
            in_flight,
        },
    ))
}
