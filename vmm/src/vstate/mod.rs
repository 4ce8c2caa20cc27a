//! KVM state of one micro-VM: guest memory, the VM file descriptor, its vCPUs and the buses
//! that route their port-I/O and MMIO exits to devices.

pub mod bus;
pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
