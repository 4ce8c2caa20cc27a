//! Per-thread seccomp filters, kept as data (`x86_64.json`, seccompiler's JSON format, one filter
//! per thread kind) and installed by each thread before it touches guest-controlled input.
//!
//! | filter | thread | installed |
//! |---|---|---|
//! | `vmm`  | main thread: event loop, API requests, device control | after the VM is built, before any vCPU enters the guest |
//! | `api`  | `fc_api` and its connection threads | when the API thread starts |
//! | `vcpu` | `fc_vcpu N` | before the first KVM_RUN |
//! | `device` | `fc_blk N`, `fc_net N`, `fc_vsock` | when the device thread starts (at build) |
//!
//! A forbidden syscall traps: the SIGSYS handler reports the syscall number and the thread, and
//! the VMM exits with status 148, as Firecracker does.
//!
//! clone3(2) passes its flags in memory, out of seccomp's reach, so under every thread filter
//! a second filter makes it fail with ENOSYS: glibc then falls back to clone(2), whose flags
//! the `api` filter checks (a thread, never a process or a namespace). A thread filter that
//! does not list clone3 still traps it: the kernel takes the strictest verdict of the two.
//!
//! The built-in filters are compiled to BPF at build time (`build.rs`, with seccompiler, as
//! Firecracker does): parsing and compiling the JSON took 80% of a VMM's start. A test checks
//! that the embedded programs equal the JSON compiled afresh. `--seccomp-filter FILE` is
//! compiled when the VMM starts.

use std::borrow::Cow;
use std::sync::Arc;

use seccompiler::{sock_filter, TargetArch};

// `BUILTIN` (the filters of `x86_64.json`, compiled to BPF by build.rs) and `CLONE3_ENOSYS`.
include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));

/// The thread kinds every filter file must define.
pub const THREAD_KINDS: [&str; 4] = ["vmm", "api", "vcpu", "device"];
/// Exit status after a seccomp violation (128 + SIGSYS).
pub const SECCOMP_EXIT_CODE: i32 = 148;

/// Errors while loading or installing filters.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter file could not be read.
    #[error("cannot read seccomp filter file {0}: {1}")]
    Read(String, std::io::Error),
    /// The filter JSON is invalid.
    #[error("invalid seccomp filters: {0}")]
    Compile(seccompiler::Error),
    /// A thread kind has no filter.
    #[error("the seccomp filters define no `{0}` filter")]
    MissingFilter(&'static str),
    /// The kernel refused the filter.
    #[error("cannot install the `{0}` seccomp filter: {1}")]
    Install(&'static str, seccompiler::Error),
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(vmm_sys_util::errno::Error),
}

/// A BPF program: built in (compiled at build time) or from a `--seccomp-filter` file.
type Program = Cow<'static, [sock_filter]>;

/// Filters by thread kind, in [`THREAD_KINDS`] order; `None` means seccomp is off
/// (`--no-seccomp`).
#[derive(Clone, Default)]
pub struct Filters(Option<Arc<[Program]>>);

impl Filters {
    /// The built-in filters, compiled from `x86_64.json` when the VMM was built.
    pub fn builtin() -> Result<Self, SeccompError> {
        Self::by_thread_kind(|kind| {
            BUILTIN
                .iter()
                .find(|(name, _)| *name == kind)
                .map(|(_, program)| Cow::Borrowed(*program))
        })
    }

    /// Filters from a seccompiler JSON file (`--seccomp-filter`), compiled now.
    pub fn from_file(path: &str) -> Result<Self, SeccompError> {
        let json = std::fs::read(path).map_err(|e| SeccompError::Read(path.into(), e))?;
        let mut map = seccompiler::compile_from_json(json.as_slice(), TargetArch::x86_64)
            .map_err(SeccompError::Compile)?;
        Self::by_thread_kind(|kind| map.remove(kind).map(Cow::<[sock_filter]>::Owned))
    }

    /// Picks the program of every thread kind with `program_for` and installs the SIGSYS
    /// handler that reports violations.
    fn by_thread_kind(
        mut program_for: impl FnMut(&str) -> Option<Program>,
    ) -> Result<Self, SeccompError> {
        let programs = THREAD_KINDS
            .iter()
            .map(|kind| program_for(kind).ok_or(SeccompError::MissingFilter(kind)))
            .collect::<Result<Arc<[Program]>, _>>()?;
        install_sigsys_handler()?;
        Ok(Filters(Some(programs)))
    }

    /// No filtering at all (debugging only).
    pub fn disabled() -> Self {
        Filters(None)
    }

    /// Installs the filter for `kind` on the calling thread (and threads it spawns later),
    /// over the clone3 filter.
    pub fn apply(&self, kind: &'static str) -> Result<(), SeccompError> {
        let Some(programs) = &self.0 else {
            return Ok(());
        };
        let program = THREAD_KINDS
            .iter()
            .position(|k| *k == kind)
            .map(|index| &programs[index])
            .ok_or(SeccompError::MissingFilter(kind))?;
        // The clone3 filter goes first: once the thread filter is in, seccomp(2) is refused.
        seccompiler::apply_filter(CLONE3_ENOSYS).map_err(|e| SeccompError::Install(kind, e))?;
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install(kind, e))?;
        THREAD_FILTER.with(|k| k.set(kind));
        Ok(())
    }
}

thread_local! {
    /// The filter this thread installed, for the violation report (constant-initialized so the
    /// signal handler can read it without allocating).
    static THREAD_FILTER: std::cell::Cell<&'static str> = const { std::cell::Cell::new("none") };
}

extern "C" fn handle_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SIGSYS; for SYS_SECCOMP the syscall number
    // sits at byte offset 24 (after si_signo, si_errno, si_code, padding and si_call_addr),
    // inside the struct and 4-byte aligned since siginfo_t is pointer-aligned.
    let syscall = unsafe { *info.cast::<u8>().add(24).cast::<i32>() };
    let kind = THREAD_FILTER.with(|k| k.get());
    let mut msg = [0u8; 128];
    let mut len = 0;
    let mut push = |bytes: &[u8]| {
        for b in bytes {
            if len < msg.len() {
                msg[len] = *b;
                len += 1;
            }
        }
    };
    push(b"mvm-vmm: seccomp violation: syscall ");
    let mut digits = [0u8; 10];
    let mut n = syscall.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    push(&digits[i..]);
    push(b" in a thread under the `");
    push(kind.as_bytes());
    push(b"` filter\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe; msg is a live stack buffer.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), len);
        libc::_exit(SECCOMP_EXIT_CODE);
    }
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, handle_sigsys)
        .map_err(SeccompError::Handler)
}

#[cfg(test)]
mod tests {
    use super::*;
    use seccompiler::BpfProgram;

    include!("clone3.rs");

    /// The filters compiled into the binary are exactly what `x86_64.json` says today.
    #[test]
    fn the_built_in_filters_are_the_json_compiled() {
        let json = include_str!("x86_64.json");
        let compiled = seccompiler::compile_from_json(json.as_bytes(), TargetArch::x86_64)
            .expect("x86_64.json compiles");
        let mut built_in: Vec<&str> = BUILTIN.iter().map(|(kind, _)| *kind).collect();
        let mut in_json: Vec<&str> = compiled.keys().map(String::as_str).collect();
        built_in.sort_unstable();
        in_json.sort_unstable();
        assert_eq!(built_in, in_json);
        for (kind, program) in BUILTIN {
            assert_eq!(*program, compiled[*kind].as_slice(), "the `{kind}` filter");
        }
        let filters = Filters::builtin().expect("every thread kind has a built-in filter");
        let programs = filters.0.expect("filters on");
        for (kind, program) in THREAD_KINDS.iter().zip(programs.iter()) {
            assert_eq!(**program, compiled[*kind][..], "the `{kind}` filter");
        }
    }

    #[test]
    fn the_built_in_clone3_filter_is_the_compiled_one() {
        let compiled: BpfProgram = clone3_enosys_filter()
            .and_then(TryInto::try_into)
            .expect("the clone3 filter compiles");
        assert_eq!(CLONE3_ENOSYS, compiled.as_slice());
    }
}
