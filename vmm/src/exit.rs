//! Why a VM stops, and the one-shot signal that tells the VMM's event loop.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use vmm_sys_util::eventfd::EventFd;

/// The reason the VMM is ending the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine (i8042 reset line or KVM reset event).
    GuestReset,
    /// A vCPU triple-faulted: the guest crashed (or rebooted with `reboot=t`).
    GuestTripleFault,
    /// The guest powered the machine off.
    GuestPowerOff,
    /// A vCPU halted with nothing left to wake it.
    GuestHalted,
    /// The VMM received a terminating signal.
    Signal(i32),
    /// A vCPU failed; the message says how.
    VcpuError {
        /// The failing vCPU.
        vcpu: u8,
        /// What happened.
        message: String,
    },
    /// The VMM itself failed after boot.
    VmmError(String),
}

impl ExitReason {
    /// Process exit status: 0 for a guest- or operator-requested stop, 1 for VMM or vCPU
    /// failures, 2 for a guest crash.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestReset
            | ExitReason::GuestPowerOff
            | ExitReason::GuestHalted
            | ExitReason::Signal(_) => 0,
            ExitReason::VcpuError { .. } | ExitReason::VmmError(_) => 1,
            ExitReason::GuestTripleFault => 2,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "the guest reset the VM"),
            ExitReason::GuestTripleFault => write!(
                f,
                "the guest triple-faulted (it crashed, or rebooted with reboot=t; use reboot=k)"
            ),
            ExitReason::GuestPowerOff => write!(f, "the guest powered the VM off"),
            ExitReason::GuestHalted => write!(f, "the guest halted"),
            ExitReason::Signal(sig) => write!(f, "received signal {sig}"),
            ExitReason::VcpuError { vcpu, message } => write!(f, "vCPU {vcpu} failed: {message}"),
            ExitReason::VmmError(message) => write!(f, "VMM error: {message}"),
        }
    }
}

/// First-reason-wins exit request, readable by the event loop through an eventfd.
pub struct VmExit {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
    /// Set with the reason: lets vCPU threads check cheaply after every exit.
    requested: AtomicBool,
}

impl VmExit {
    /// A fresh, unsignalled exit request.
    pub fn new() -> std::io::Result<Self> {
        Ok(VmExit {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
            requested: AtomicBool::new(false),
        })
    }

    /// Asks the VMM to end the VM; later reasons do not replace the first.
    pub fn request(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(reason);
            self.requested.store(true, Ordering::Release);
        }
        // The eventfd counter cannot overflow from a handful of writes.
        let _ = self.evt.write(1);
    }

    /// Whether the VM is ending: no vCPU should enter the guest again.
    pub fn is_requested(&self) -> bool {
        self.requested.load(Ordering::Acquire)
    }

    /// The reason, once requested.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The eventfd the event loop watches.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}
