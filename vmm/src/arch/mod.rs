//! Architecture-specific guest setup. mvm supports x86_64 only. The bottom layer: it writes
//! into vm-memory's `GuestMemoryMmap` (what `vstate::memory` calls `GuestMemory`)
//! and uses nothing else of the crate.

pub mod x86_64;
