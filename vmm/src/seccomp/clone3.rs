// The filter stacked under every thread filter: clone3(2) fails with ENOSYS, everything else
// passes. Shared by build.rs, which compiles it into the binary, and the test that checks that.

/// clone3(2) → ENOSYS; every other syscall is allowed.
fn clone3_enosys_filter() -> Result<seccompiler::SeccompFilter, seccompiler::BackendError> {
    seccompiler::SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        seccompiler::SeccompAction::Allow,
        seccompiler::SeccompAction::Errno(libc::ENOSYS as u32),
        seccompiler::TargetArch::x86_64,
    )
}
