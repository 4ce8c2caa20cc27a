//! Per-thread seccomp filters, kept as data (`x86_64.json`, seccompiler's JSON format, one filter
//! per thread kind) and installed by each thread before it touches guest-controlled input.
//!
//! | filter | thread | installed |
//! |---|---|---|
//! | `vmm`  | main thread: event loop, API requests, device control | after the VM is built, before any vCPU enters the guest |
//! | `api`  | `fc_api`, which serves every API connection | when the API thread starts |
//! | `vcpu` | `fc_vcpu N` | before the first KVM_RUN |
//! | `device` | `fc_blk N`, `fc_net N`, `fc_vsock` | when the device thread starts (at build) |
//!
//! A forbidden syscall traps: the SIGSYS handler reports the syscall number and the thread, and
//! the VMM exits with status 148, as Firecracker does.
//!
//! Every thread is started before its filter and the main thread's are installed, so no
//! built-in filter allows clone(2) or clone3(2). For a `--seccomp-filter` that lets a thread
//! start others: clone3(2) passes its flags in memory, out of seccomp's reach, so every
//! thread's program starts with a rule that makes it fail with ENOSYS where the filter lists
//! it; glibc then falls back to clone(2), whose flags a filter can check (a thread, never a
//! process or a namespace). A thread filter that does not list clone3 still traps it: the merged rule keeps the stricter verdict of the
//! two, as the kernel did when the rule was a second filter stacked under each thread filter
//! (`clone3.rs`; one seccomp(2) install per thread instead of two).
//!
//! The built-in filters are compiled to BPF and merged with the clone3 rule at build time
//! (`build.rs`, with seccompiler, as Firecracker does): parsing and compiling the JSON took 80%
//! of a VMM's start. Tests check that the embedded programs equal the JSON compiled and merged
//! afresh, and that each merged program gives every syscall the verdict of the two stacked
//! filters. `--seccomp-filter FILE` is compiled and merged when the VMM starts.

use std::borrow::Cow;
use std::sync::Arc;

use seccompiler::{sock_filter, TargetArch};

// `BUILTIN`: the filters of `x86_64.json`, compiled to BPF and merged with the clone3 rule by
// build.rs.
include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
// `merge_clone3_enosys`, shared with build.rs.
include!("clone3.rs");

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
    /// A `--seccomp-filter` program cannot take the clone3 → ENOSYS rule in.
    #[error("the `{0}` seccomp filter cannot be used: {1}")]
    Clone3(&'static str, Clone3MergeError),
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
    /// The built-in filters, compiled from `x86_64.json` (with the clone3 rule merged in) when
    /// the VMM was built.
    pub fn builtin() -> Result<Self, SeccompError> {
        Self::by_thread_kind(|kind| {
            BUILTIN
                .iter()
                .find(|(name, _)| *name == kind)
                .map(|(_, program)| Cow::Borrowed(*program))
                .ok_or(SeccompError::MissingFilter(kind))
        })
    }

    /// Filters from a seccompiler JSON file (`--seccomp-filter`), compiled and merged with the
    /// clone3 rule now.
    pub fn from_file(path: &str) -> Result<Self, SeccompError> {
        let json = std::fs::read(path).map_err(|e| SeccompError::Read(path.into(), e))?;
        let mut map = seccompiler::compile_from_json(json.as_slice(), TargetArch::x86_64)
            .map_err(SeccompError::Compile)?;
        Self::by_thread_kind(|kind| {
            let program = map.remove(kind).ok_or(SeccompError::MissingFilter(kind))?;
            merge_clone3_enosys(&program)
                .map(Cow::<[sock_filter]>::Owned)
                .map_err(|e| SeccompError::Clone3(kind, e))
        })
    }

    /// Picks the program of every thread kind with `program_for` and installs the SIGSYS
    /// handler that reports violations.
    fn by_thread_kind(
        mut program_for: impl FnMut(&'static str) -> Result<Program, SeccompError>,
    ) -> Result<Self, SeccompError> {
        let programs = THREAD_KINDS
            .iter()
            .map(|kind| program_for(kind))
            .collect::<Result<Arc<[Program]>, _>>()?;
        install_sigsys_handler()?;
        Ok(Filters(Some(programs)))
    }

    /// No filtering at all (debugging only).
    pub fn disabled() -> Self {
        Filters(None)
    }

    /// Installs the filter for `kind` (clone3 rule included) on the calling thread and the
    /// threads it spawns later.
    pub fn apply(&self, kind: &'static str) -> Result<(), SeccompError> {
        let Some(programs) = &self.0 else {
            return Ok(());
        };
        let program = THREAD_KINDS
            .iter()
            .position(|k| *k == kind)
            .map(|index| &programs[index])
            .ok_or(SeccompError::MissingFilter(kind))?;
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
    use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule};

    const SECCOMP_RET_TRAP: u32 = 0x0003_0000;
    const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
    const AUDIT_ARCH_I386: u32 = 0x4000_0003;

    /// The filter that used to be stacked under every thread filter: clone3(2) → ENOSYS, every
    /// other syscall allowed. The reference the merged programs are checked against.
    fn clone3_enosys_filter() -> BpfProgram {
        SeccompFilter::new(
            [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
            TargetArch::x86_64,
        )
        .and_then(TryInto::try_into)
        .expect("the clone3 filter compiles")
    }

    fn compiled_json() -> std::collections::HashMap<String, BpfProgram> {
        seccompiler::compile_from_json(include_str!("x86_64.json").as_bytes(), TargetArch::x86_64)
            .expect("x86_64.json compiles")
    }

    fn verdict(program: &[sock_filter], nr: u32, arch: u32, args: [u64; 6]) -> u32 {
        run_seccomp_bpf(program, &seccomp_data(nr, arch, args))
            .expect("the program runs")
            .0
    }

    #[test]
    fn the_merge_uses_the_kernels_numbers() {
        assert_eq!(i64::from(SYS_CLONE3), libc::SYS_clone3);
        assert_eq!(ENOSYS as i32, libc::ENOSYS);
    }

    /// The filters compiled into the binary are exactly what `x86_64.json` says today, each
    /// merged with the clone3 rule.
    #[test]
    fn the_built_in_filters_are_the_json_compiled_and_merged() {
        let compiled = compiled_json();
        let merged = |kind: &str| merge_clone3_enosys(&compiled[kind]).expect("merges");
        let mut built_in: Vec<&str> = BUILTIN.iter().map(|(kind, _)| *kind).collect();
        let mut in_json: Vec<&str> = compiled.keys().map(String::as_str).collect();
        built_in.sort_unstable();
        in_json.sort_unstable();
        assert_eq!(built_in, in_json);
        for (kind, program) in BUILTIN {
            assert_eq!(*program, merged(kind).as_slice(), "the `{kind}` filter");
        }
        let filters = Filters::builtin().expect("every thread kind has a built-in filter");
        let programs = filters.0.expect("filters on");
        for (kind, program) in THREAD_KINDS.iter().zip(programs.iter()) {
            assert_eq!(**program, merged(kind)[..], "the `{kind}` filter");
        }
    }

    /// Each merged program gives every syscall number, on x86_64 and other architectures, with
    /// assorted arguments, the verdict the kernel gave the clone3 filter stacked under the
    /// thread's own: the policy is exactly as strict as before the merge.
    #[test]
    fn each_merged_program_gives_the_verdicts_of_the_two_stacked_filters() {
        let clone3 = clone3_enosys_filter();
        let args = [
            [0; 6],
            [u64::MAX; 6],
            [1, 2, 3, 4, 5, 6],
            // The thread flags the `api` filter allows for clone(2), and a process fork's.
            [0x3d_0f00, 0, 0, 0, 0, 0],
            [u64::from(libc::SIGCHLD as u32), 0, 0, 0, 0, 0],
            // KVM_RUN, KVM_CREATE_VCPU and a socket's TIOCOUTQ-like ioctl on fd 3.
            [3, 0xae80, 0, 0, 0, 0],
            [3, 0xae41, 0, 0, 0, 0],
        ];
        for (kind, thread) in compiled_json() {
            let merged = merge_clone3_enosys(&thread).expect("merges");
            for nr in 0..600 {
                for arch in [AUDIT_ARCH_X86_64, AUDIT_ARCH_I386, 0] {
                    for args in args {
                        let stacked = strictest_verdict(
                            verdict(&thread, nr, arch, args),
                            verdict(&clone3, nr, arch, args),
                        );
                        assert_eq!(
                            verdict(&merged, nr, arch, args),
                            stacked,
                            "`{kind}`: syscall {nr}, arch {arch:#x}, args {args:x?}"
                        );
                    }
                }
            }
            // No built-in thread starts threads once filtered: clone3 traps everywhere.
            let clone3_verdict = verdict(&merged, SYS_CLONE3, AUDIT_ARCH_X86_64, [0; 6]);
            assert_eq!(clone3_verdict, SECCOMP_RET_TRAP, "`{kind}`: clone3");
        }
        // The kernel's rule as the merge applies it: the stricter action wins, the newer
        // filter's on a tie.
        assert_eq!(
            strictest_verdict(SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO | ENOSYS),
            0x50026
        );
        assert_eq!(
            strictest_verdict(SECCOMP_RET_TRAP, SECCOMP_RET_ERRNO | ENOSYS),
            0x30000
        );
        assert_eq!(
            strictest_verdict(SECCOMP_RET_ERRNO | 1, SECCOMP_RET_ERRNO | 2),
            0x50001
        );
        assert_eq!(
            strictest_verdict(SECCOMP_RET_ALLOW, SECCOMP_RET_KILL_PROCESS),
            SECCOMP_RET_KILL_PROCESS
        );
    }

    /// A filter file whose clone3 verdict depends on clone3's arguments (a pointer) is refused
    /// with a message that says so, instead of being merged into something weaker or stricter.
    #[test]
    fn a_filter_conditioning_clone3_on_its_arguments_is_refused() {
        let condition = seccompiler::SeccompCondition::new(
            0,
            seccompiler::SeccompCmpArgLen::Qword,
            seccompiler::SeccompCmpOp::Eq,
            0,
        )
        .expect("a condition");
        let program: BpfProgram = SeccompFilter::new(
            [(
                libc::SYS_clone3,
                vec![SeccompRule::new(vec![condition]).expect("a rule")],
            )]
            .into_iter()
            .collect(),
            SeccompAction::Trap,
            SeccompAction::Allow,
            TargetArch::x86_64,
        )
        .and_then(TryInto::try_into)
        .expect("the filter compiles");
        let error = merge_clone3_enosys(&program).expect_err("refused");
        assert_eq!(error, Clone3MergeError::ArgumentDependent);
        assert!(
            error.to_string().contains("without argument conditions"),
            "{error}"
        );
    }
}
