//! x86_64 guest setup: memory layout, boot protocols, CPUID, MSRs, registers and MP table.

pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
