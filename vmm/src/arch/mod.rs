//! Architecture-specific guest setup. mvm supports x86_64 only.

pub mod x86_64;
