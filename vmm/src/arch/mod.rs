//! Architecture-specific guest setup. mvm supports x86_64 only. The bottom layer: it writes
//! into `vstate::memory::GuestMemory` (vm-memory's `GuestMemoryMmap` with dirty bitmaps) and
//! uses nothing else of the crate.

pub mod x86_64;
