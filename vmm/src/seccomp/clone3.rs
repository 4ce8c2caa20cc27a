// clone3(2) → ENOSYS, merged into a thread's BPF program. Shared by build.rs (which merges the
// built-in filters at build time) and the seccomp module (which merges `--seccomp-filter` files
// when the VMM starts); plain `//` comments, since build.rs `include!`s this file.
//
// clone3 passes its flags in memory, out of seccomp's reach, so it must fail with ENOSYS (glibc
// then falls back to clone(2), whose flags the filters can check). This used to be a second
// filter stacked under every thread filter, which cost each thread a second seccomp(2) install.
// The merged program gives every syscall the verdict the two stacked filters gave: the kernel
// keeps the strictest action of the stacked filters, so clone3 gets ENOSYS where the thread's
// filter allows it and the thread's own verdict where that is stricter (a trap).

/// AUDIT_ARCH_X86_64, the architecture the filters are compiled for.
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
/// Offsets in `struct seccomp_data`: syscall number, architecture, first argument.
const NR_OFFSET: u32 = 0;
const ARCH_OFFSET: u32 = 4;
const ARGS_OFFSET: u32 = 16;
/// `struct seccomp_data` is 64 bytes.
const SECCOMP_DATA_LEN: u32 = 64;
/// `SECCOMP_RET_*` values used here (linux/seccomp.h).
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_ACTION_FULL: u32 = 0xffff_0000;
/// clone3(2)'s number on x86_64.
const SYS_CLONE3: u32 = 435;
/// ENOSYS.
const ENOSYS: u32 = 38;

/// Why a thread's program cannot take the clone3 rule in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clone3MergeError {
    /// The thread's verdict on clone3 depends on its arguments (clone3's first argument is a
    /// pointer: conditions on it mean nothing).
    ArgumentDependent,
    /// The program uses an instruction this evaluator does not know.
    UnsupportedInstruction(u16),
    /// The program jumps or reads out of bounds, or ends without a verdict.
    Malformed,
}

impl std::fmt::Display for Clone3MergeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Clone3MergeError::ArgumentDependent => f.write_str(
                "its verdict on clone3 depends on clone3's arguments; clone3 passes its flags \
                 in memory where seccomp cannot see them: list clone3 without argument conditions",
            ),
            Clone3MergeError::UnsupportedInstruction(code) => {
                write!(
                    f,
                    "it uses BPF instruction {code:#06x}, which is not supported"
                )
            }
            Clone3MergeError::Malformed => {
                f.write_str("it jumps or reads out of bounds or ends without a verdict")
            }
        }
    }
}

/// The verdict of the stacked filters, as the kernel combines them: the strictest action
/// (lowest as a signed value) wins, the newest filter (`newer`) on a tie.
fn strictest_verdict(newer: u32, older: u32) -> u32 {
    let action = |verdict: u32| (verdict & SECCOMP_RET_ACTION_FULL) as i32;
    if action(older) < action(newer) {
        older
    } else {
        newer
    }
}

/// A `struct seccomp_data` for syscall `nr` on `arch` with `args`.
fn seccomp_data(nr: u32, arch: u32, args: [u64; 6]) -> [u8; SECCOMP_DATA_LEN as usize] {
    let mut data = [0u8; SECCOMP_DATA_LEN as usize];
    data[0..4].copy_from_slice(&nr.to_ne_bytes());
    data[4..8].copy_from_slice(&arch.to_ne_bytes());
    for (i, arg) in args.iter().enumerate() {
        let at = ARGS_OFFSET as usize + 8 * i;
        data[at..at + 8].copy_from_slice(&arg.to_ne_bytes());
    }
    data
}

/// Runs a classic-BPF seccomp program (the instructions seccompiler emits: absolute word loads,
/// AND, conditional and unconditional jumps, returns) on `data`. Returns the verdict and whether
/// the path read anything beyond the syscall number and architecture.
fn run_seccomp_bpf(
    program: &[seccompiler::sock_filter],
    data: &[u8; SECCOMP_DATA_LEN as usize],
) -> Result<(u32, bool), Clone3MergeError> {
    const LD_W_ABS: u16 = 0x20;
    const ALU_AND_K: u16 = 0x54;
    const JMP_JA: u16 = 0x05;
    const JMP_JEQ_K: u16 = 0x15;
    const JMP_JGT_K: u16 = 0x25;
    const JMP_JGE_K: u16 = 0x35;
    const JMP_JSET_K: u16 = 0x45;
    const RET_K: u16 = 0x06;
    let (mut pc, mut acc, mut read_more) = (0usize, 0u32, false);
    loop {
        let insn = program.get(pc).ok_or(Clone3MergeError::Malformed)?;
        pc += 1;
        let condition = match insn.code {
            LD_W_ABS => {
                if insn.k % 4 != 0 || insn.k + 4 > SECCOMP_DATA_LEN {
                    return Err(Clone3MergeError::Malformed);
                }
                read_more |= insn.k != NR_OFFSET && insn.k != ARCH_OFFSET;
                let at = insn.k as usize;
                acc = u32::from_ne_bytes(data[at..at + 4].try_into().expect("4 bytes"));
                continue;
            }
            ALU_AND_K => {
                acc &= insn.k;
                continue;
            }
            JMP_JA => {
                pc = pc
                    .checked_add(insn.k as usize)
                    .ok_or(Clone3MergeError::Malformed)?;
                continue;
            }
            RET_K => return Ok((insn.k, read_more)),
            JMP_JEQ_K => acc == insn.k,
            JMP_JGT_K => acc > insn.k,
            JMP_JGE_K => acc >= insn.k,
            JMP_JSET_K => acc & insn.k != 0,
            code => return Err(Clone3MergeError::UnsupportedInstruction(code)),
        };
        pc += usize::from(if condition { insn.jt } else { insn.jf });
    }
}

/// `thread` with the clone3 → ENOSYS rule in front: one program that gives every syscall the
/// verdict the clone3 filter stacked under `thread` gave.
fn merge_clone3_enosys(
    thread: &[seccompiler::sock_filter],
) -> Result<Vec<seccompiler::sock_filter>, Clone3MergeError> {
    let insn = |code: u16, jt: u8, jf: u8, k: u32| seccompiler::sock_filter { code, jt, jf, k };
    let clone3 = seccomp_data(SYS_CLONE3, AUDIT_ARCH_X86_64, [0; 6]);
    let (thread_verdict, read_arguments) = run_seccomp_bpf(thread, &clone3)?;
    if read_arguments {
        return Err(Clone3MergeError::ArgumentDependent);
    }
    let clone3_verdict = strictest_verdict(thread_verdict, SECCOMP_RET_ERRNO | ENOSYS);
    let mut merged = vec![
        insn(0x20, 0, 0, ARCH_OFFSET),
        insn(0x15, 1, 0, AUDIT_ARCH_X86_64),
        // Another architecture: the clone3 filter killed the process, and nothing is stricter.
        insn(0x06, 0, 0, SECCOMP_RET_KILL_PROCESS),
        insn(0x20, 0, 0, NR_OFFSET),
        insn(0x15, 0, 1, SYS_CLONE3),
        insn(0x06, 0, 0, clone3_verdict),
    ];
    merged.extend_from_slice(thread);
    Ok(merged)
}
