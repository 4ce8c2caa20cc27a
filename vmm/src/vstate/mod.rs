//! KVM state of one micro-VM: guest memory, the VM file descriptor and its vCPUs.

pub mod memory;
pub mod vcpu;
pub mod vm;
