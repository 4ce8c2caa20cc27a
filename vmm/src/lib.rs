//! mvm-vmm library.
