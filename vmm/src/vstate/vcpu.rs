//! vCPUs: boot state, one thread each, the KVM_RUN loop dispatching exits to the buses, and
//! pause/resume by kicking threads out of KVM_RUN. A vCPU thread starts held: it installs its
//! seccomp filter and waits for [`Vcpus::resume`] before its first KVM_RUN, so the VMM can
//! confine its own threads before any guest code runs.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestAddress;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::bus::Bus;
use super::memory::GuestMemory;
use super::vcpu_state::{VcpuState, VcpuStateError};
use super::vm::Vm;
use crate::arch::x86_64::cpuid::{filter_cpuid, Topology};
use crate::arch::x86_64::msr::{boot_msrs, msrs_to_save};
use crate::arch::x86_64::regs::{boot_fpu, boot_regs, setup_sregs, BootProtocol, RegsError};
use crate::exit::{ExitReason, VmExit};
use crate::metrics::{inc, METRICS};
use crate::seccomp::Filters;

/// Signal used to kick a vCPU thread out of KVM_RUN.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// LAPIC local vector table registers and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;
const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// Errors while creating or configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {0}: KVM {1} failed: {2}")]
    Ioctl(u8, &'static str, kvm_ioctls::Error),
    /// KVM did not accept one of the boot MSRs.
    #[error("vCPU {0}: KVM refused to set MSR {1:#x}")]
    MsrRefused(u8, u32),
    /// Boot structures could not be written.
    #[error("vCPU {0}: {1}")]
    Regs(u8, RegsError),
    /// The vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {0}: {1}")]
    Spawn(u8, std::io::Error),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
    /// A snapshot's state could not be loaded.
    #[error(transparent)]
    State(#[from] VcpuStateError),
}

/// The run state the VMM asks its vCPUs to be in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RunState {
    /// Built but not released yet: the guest has not run.
    Held,
    Running,
    Paused,
    /// Never to run (again): the threads end.
    Discarded,
}

/// Shared pause/resume control of all vCPUs of a VM.
pub struct RunControl {
    state: Mutex<(RunState, usize)>,
    changed: Condvar,
}

impl RunControl {
    fn new() -> Self {
        RunControl {
            state: Mutex::new((RunState::Held, 0)),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (RunState, usize)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called by a vCPU thread out of KVM_RUN: parks while the VM is held or paused. Returns
    /// whether the vCPU may enter the guest (false once the vCPUs are discarded).
    fn park_unless_running(&self) -> bool {
        let mut guard = self.lock();
        if matches!(guard.0, RunState::Held | RunState::Paused) {
            guard.1 += 1;
            self.changed.notify_all();
            while matches!(guard.0, RunState::Held | RunState::Paused) {
                guard = self.changed.wait(guard).unwrap_or_else(|p| p.into_inner());
            }
            guard.1 -= 1;
        }
        guard.0 == RunState::Running
    }

    /// Moves every vCPU to `state` and wakes the parked ones.
    fn set(&self, state: RunState) {
        let mut guard = self.lock();
        guard.0 = state;
        self.changed.notify_all();
    }
}

thread_local! {
    /// This thread's kvm_run page, so the kick signal handler can set `immediate_exit`.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's own kvm_run mapping, set by the vCPU thread
            // before it enters KVM_RUN and valid for the thread's life; a u8 store is atomic.
            unsafe { (*run).immediate_exit = 1 };
        }
    });
}

/// Installs the process-wide kick handler (idempotent).
fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
        std::sync::OnceLock::new();
    (*INSTALLED.get_or_init(|| register_signal_handler(kick_signal(), handle_kick)))
        .map_err(VcpuError::SignalHandler)
}

/// What the run loop does after one KVM_RUN.
enum Step {
    /// The exit was handled; enter the guest again.
    Continue,
    /// The thread was kicked out of KVM_RUN: look at the run control.
    Kicked,
    /// The VM ends.
    Exit(ExitReason),
}

/// A vCPU file descriptor, held by its thread while in KVM_RUN and by the VMM thread while
/// the paused vCPU's state is read for a snapshot.
type SharedVcpuFd = Arc<Mutex<VcpuFd>>;

fn lock_fd(fd: &SharedVcpuFd) -> MutexGuard<'_, VcpuFd> {
    fd.lock().unwrap_or_else(|p| p.into_inner())
}

/// A configured vCPU, not yet running.
pub struct Vcpu {
    id: u8,
    fd: SharedVcpuFd,
}

impl Vcpu {
    /// Creates vCPU `id` and loads its CPUID, MSRs, FPU, LAPIC and (for every vCPU, as
    /// Firecracker does; application processors are reset by INIT/SIPI) boot registers.
    pub fn new(
        vm: &Vm,
        id: u8,
        topology: Topology,
        hide_xsave: bool,
        mem: &GuestMemory,
        entry: GuestAddress,
        protocol: BootProtocol,
    ) -> Result<Self, VcpuError> {
        let ioctl = |what, e| VcpuError::Ioctl(id, what, e);
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|e| ioctl("KVM_CREATE_VCPU", e))?;
        let mut cpuid: CpuId = vm.supported_cpuid().clone();
        filter_cpuid(&mut cpuid, id, topology, hide_xsave);
        fd.set_cpuid2(&cpuid)
            .map_err(|e| ioctl("KVM_SET_CPUID2", e))?;
        let msrs = boot_msrs();
        let written = fd.set_msrs(&msrs).map_err(|e| ioctl("KVM_SET_MSRS", e))?;
        if let Some(refused) = msrs.as_slice().get(written) {
            return Err(VcpuError::MsrRefused(id, refused.index));
        }
        fd.set_fpu(&boot_fpu())
            .map_err(|e| ioctl("KVM_SET_FPU", e))?;
        let mut sregs = fd.get_sregs().map_err(|e| ioctl("KVM_GET_SREGS", e))?;
        setup_sregs(mem, &mut sregs, protocol).map_err(|e| VcpuError::Regs(id, e))?;
        fd.set_sregs(&sregs)
            .map_err(|e| ioctl("KVM_SET_SREGS", e))?;
        fd.set_regs(&boot_regs(entry, protocol))
            .map_err(|e| ioctl("KVM_SET_REGS", e))?;
        set_lint(&fd).map_err(|e| ioctl("KVM_SET_LAPIC", e))?;
        Ok(Vcpu {
            id,
            fd: Arc::new(Mutex::new(fd)),
        })
    }

    /// Creates vCPU `state.id` with the state a snapshot saved.
    pub fn restore(vm: &Vm, state: &VcpuState) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(state.id))
            .map_err(|e| VcpuError::Ioctl(state.id, "KVM_CREATE_VCPU", e))?;
        state.restore(&fd)?;
        Ok(Vcpu {
            id: state.id,
            fd: Arc::new(Mutex::new(fd)),
        })
    }

    /// Starts the vCPU's thread: it installs its seccomp filter and waits for `control` to
    /// let it run.
    fn start(
        self,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        control: Arc<RunControl>,
        exit: Arc<VmExit>,
        seccomp: Filters,
    ) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let id = self.id;
        let fd = self.fd.clone();
        let thread = std::thread::Builder::new()
            .name(format!("fc_vcpu {id}"))
            .spawn(move || match seccomp.apply("vcpu") {
                Ok(()) => self.run(&pio, &mmio, &control, &exit),
                Err(e) => exit.request(ExitReason::VcpuError {
                    vcpu: id,
                    message: e.to_string(),
                }),
            })
            .map_err(|e| VcpuError::Spawn(id, e))?;
        Ok(VcpuHandle { id, fd, thread })
    }

    fn run(self, pio: &Bus, mmio: &Bus, control: &RunControl, exit: &VmExit) {
        KVM_RUN.with(|run| run.set(lock_fd(&self.fd).get_kvm_run() as *mut kvm_run));
        if !control.park_unless_running() || exit.is_requested() {
            return;
        }
        loop {
            let step = run_once(self.id, &mut lock_fd(&self.fd), pio, mmio);
            match step {
                // Once the VM is ending (a reset pulse, another vCPU's error, a signal) the
                // guest must not run on: a guest whose reset did not stop it goes on to other
                // reset methods, such as a triple fault.
                Step::Continue if exit.is_requested() => return,
                Step::Continue => {}
                Step::Kicked => {
                    lock_fd(&self.fd).set_kvm_immediate_exit(0);
                    if !control.park_unless_running() {
                        return;
                    }
                }
                Step::Exit(reason) => {
                    exit.request(reason);
                    return;
                }
            }
        }
    }
}

/// One KVM_RUN of vCPU `id` and the handling of its exit.
fn run_once(id: u8, fd: &mut VcpuFd, pio: &Bus, mmio: &Bus) -> Step {
    let error = |message: String| Step::Exit(ExitReason::VcpuError { vcpu: id, message });
    match fd.run() {
        Ok(VcpuExit::IoIn(port, data)) => {
            inc(&METRICS.vcpu_exits_io);
            if !pio.read(u64::from(port), data) {
                data.fill(0xff);
            }
            Step::Continue
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            inc(&METRICS.vcpu_exits_io);
            pio.write(u64::from(port), data);
            Step::Continue
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            inc(&METRICS.vcpu_exits_mmio);
            if !mmio.read(addr, data) {
                data.fill(0);
            }
            Step::Continue
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            inc(&METRICS.vcpu_exits_mmio);
            mmio.write(addr, data);
            Step::Continue
        }
        Ok(VcpuExit::Hlt) => Step::Exit(ExitReason::GuestHalted),
        Ok(VcpuExit::Shutdown) => Step::Exit(ExitReason::GuestTripleFault),
        Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => Step::Exit(ExitReason::GuestReset),
        Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => {
            Step::Exit(ExitReason::GuestPowerOff)
        }
        Ok(VcpuExit::Intr) => Step::Kicked,
        Ok(VcpuExit::FailEntry(reason, cpu)) => error(format!(
            "KVM could not enter the guest (hardware entry failure {reason:#x} on host CPU {cpu})"
        )),
        Ok(VcpuExit::InternalError) => {
            let regs = fd.get_regs().ok();
            error(format!(
                "KVM internal error (an instruction KVM cannot emulate?) at rip {:#x}",
                regs.map_or(0, |r| r.rip)
            ))
        }
        Ok(other) => error(format!("unexpected KVM exit {other:?}")),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Kicked,
        Err(e) => error(format!("KVM_RUN failed: {e}")),
    }
}

/// Sets LINT0 to ExtINT and LINT1 to NMI, so the legacy PIC and NMIs reach the vCPU.
fn set_lint(fd: &VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut lapic = fd.get_lapic()?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let bytes: &mut [i8] = &mut lapic.regs[reg..reg + 4];
        let mut raw = [0u8; 4];
        for (d, s) in raw.iter_mut().zip(bytes.iter()) {
            *d = *s as u8;
        }
        let value = (u32::from_le_bytes(raw) & !0x700) | (mode << 8);
        for (d, s) in bytes.iter_mut().zip(value.to_le_bytes()) {
            *d = s as i8;
        }
    }
    fd.set_lapic(&lapic)
}

/// A running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    fd: SharedVcpuFd,
    thread: JoinHandle<()>,
}

impl VcpuHandle {
    /// Interrupts the thread's KVM_RUN so it looks at the run control.
    pub fn kick(&self) {
        // A failed kill means the thread already ended, which is what a kick wants anyway.
        let _ = self.thread.kill(kick_signal());
    }
}

/// All vCPUs of a VM, with pause/resume.
pub struct Vcpus {
    handles: Vec<VcpuHandle>,
    control: Arc<RunControl>,
}

impl Vcpus {
    /// Starts every vCPU's thread, held: none enters the guest before [`Vcpus::resume`].
    pub fn start(
        vcpus: Vec<Vcpu>,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<VmExit>,
        seccomp: &Filters,
    ) -> Result<Self, VcpuError> {
        let control = Arc::new(RunControl::new());
        let handles = vcpus
            .into_iter()
            .map(|v| {
                v.start(
                    pio.clone(),
                    mmio.clone(),
                    control.clone(),
                    exit.clone(),
                    seccomp.clone(),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Vcpus { handles, control })
    }

    /// Stops every vCPU at its next exit and waits until all are parked.
    pub fn pause(&self) {
        let mut guard = self.control.lock();
        if guard.0 != RunState::Running {
            return;
        }
        guard.0 = RunState::Paused;
        drop(guard);
        loop {
            for handle in &self.handles {
                handle.kick();
            }
            let guard = self.control.lock();
            let (guard, _) = self
                .control
                .changed
                .wait_timeout_while(guard, std::time::Duration::from_millis(10), |s| {
                    s.1 < self.handles.len()
                })
                .unwrap_or_else(|p| p.into_inner());
            if guard.1 >= self.handles.len() {
                return;
            }
        }
    }

    /// Lets every vCPU run: the first time after [`Vcpus::start`], or again after a pause.
    pub fn resume(&self) {
        self.control.set(RunState::Running);
    }

    /// Reports vCPUs that were never resumed as paused (a snapshot loaded without
    /// `resume_vm`): they stay out of the guest until [`Vcpus::resume`].
    pub fn hold_paused(&self) {
        self.control.set(RunState::Paused);
    }

    /// Ends the threads of vCPUs that were never resumed (a VM whose start failed after the
    /// build), without running the guest, and waits for them.
    pub fn discard(self) {
        self.control.set(RunState::Discarded);
        for handle in self.handles {
            // A vCPU thread that panicked has nothing left to clean up.
            let _ = handle.thread.join();
        }
    }

    /// Reads every vCPU's state for a snapshot; the vCPUs must be paused (each thread is out
    /// of KVM_RUN, so the VMM thread can take its vCPU file descriptor).
    pub fn save_state(&self, vm: &Vm) -> Result<Vec<VcpuState>, VcpuStateError> {
        let msrs = msrs_to_save(vm.saveable_msrs());
        self.handles
            .iter()
            .map(|h| VcpuState::save(&lock_fd(&h.fd), h.id, vm.caps(), &msrs))
            .collect()
    }

    /// The number of vCPUs.
    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.control.lock().0 == RunState::Paused
    }
}
