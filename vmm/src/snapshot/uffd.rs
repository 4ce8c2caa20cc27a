//! The `Uffd` memory backend of `PUT /snapshot/load`, with Firecracker's protocol: guest
//! memory is mapped anonymous and registered with a new userfaultfd for missing pages, then
//! the VMM connects to the page server's unix socket (`backend_path`) and sends it, in one
//! message, the JSON array of [`GuestRegionUffdMapping`]s with the userfaultfd as
//! `SCM_RIGHTS`. Nothing else is said on that socket. From then on each first touch of a
//! guest page (by a vCPU through KVM, or by a device thread) waits until the page server
//! fills it (`UFFDIO_COPY`), so a load costs the same whatever the memory size.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

use serde::Serialize;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::vstate::memory::GuestMemory;

/// Where one guest memory region lives in this VMM and in the memory file (Firecracker's
/// `GuestRegionUffdMapping`, field for field): the page server copies the file's bytes at
/// `offset..offset + size` to `base_host_virt_addr..` as they are faulted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GuestRegionUffdMapping {
    /// The region's first byte in the VMM's address space.
    pub base_host_virt_addr: u64,
    /// Its length in bytes.
    pub size: usize,
    /// Where its contents start in the memory file.
    pub offset: u64,
    /// The page size backing it, in bytes.
    pub page_size: usize,
}

/// The host page size of anonymous guest memory (mvm has no huge pages).
const PAGE_SIZE: usize = 4096;

/// Why guest memory could not be handed to a page server.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// No userfaultfd could be created.
    #[error("cannot create a userfaultfd for the Uffd backend: {0}")]
    Create(std::io::Error),
    /// A region could not be registered.
    #[error("cannot register guest memory at {0:#x} with the userfaultfd: {1}")]
    Register(u64, std::io::Error),
    /// The page server's socket is missing or nobody listens on it.
    #[error(
        "cannot connect to the page server's socket {0} (mem_backend.backend_path): {1}; \
         start the page server listening there first"
    )]
    Connect(String, std::io::Error),
    /// The mappings and the userfaultfd could not be sent.
    #[error("cannot send the guest memory mappings to the page server at {0}: {1}")]
    Send(String, std::io::Error),
}

/// The mappings of `mem`, whose regions lie in the memory file one after the other.
pub fn mappings(mem: &GuestMemory) -> Vec<GuestRegionUffdMapping> {
    let mut offset = 0;
    mem.iter()
        .map(|region| {
            let mapping = GuestRegionUffdMapping {
                base_host_virt_addr: region.as_ptr() as u64,
                size: region.len() as usize,
                offset,
                page_size: PAGE_SIZE,
            };
            offset += region.len();
            mapping
        })
        .collect()
}

/// Registers every region of `mem` (anonymous, untouched) with a new userfaultfd and hands
/// it to the page server listening on `socket`. Returns the VMM's copy of the userfaultfd:
/// keep it for the VM's life, so that if the page server dies, faulting threads wait
/// instead of reading zeros (the kernel resolves faults with zero pages once no copy is
/// left).
pub fn hand_to_page_server(mem: &GuestMemory, socket: &str) -> Result<OwnedFd, UffdError> {
    let uffd = mvm_sys::uffd::create().map_err(UffdError::Create)?;
    let mappings = mappings(mem);
    for m in &mappings {
        mvm_sys::uffd::register_missing(&uffd, m.base_host_virt_addr, m.size as u64)
            .map_err(|e| UffdError::Register(m.base_host_virt_addr, e))?;
    }
    let stream = UnixStream::connect(socket).map_err(|e| UffdError::Connect(socket.into(), e))?;
    let body = serde_json::to_vec(&mappings).expect("the mappings always serialize");
    stream
        .send_with_fd(&body[..], uffd.as_raw_fd())
        .map_err(|e| UffdError::Send(socket.into(), std::io::Error::from(e)))?;
    Ok(uffd)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn mappings_carry_firecrackers_fields_and_file_offsets() {
        let mem = crate::vstate::memory::map_anonymous(&[
            (GuestAddress(0), 0x4000),
            (GuestAddress(0x1_0000_0000), 0x2000),
        ])
        .unwrap();
        let mappings = mappings(&mem);
        assert_eq!(
            mappings
                .iter()
                .map(|m| (m.size, m.offset))
                .collect::<Vec<_>>(),
            [(0x4000, 0), (0x2000, 0x4000)]
        );
        let json = serde_json::to_value(&mappings).unwrap();
        let mut keys: Vec<_> = json[0].as_object().unwrap().keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            ["base_host_virt_addr", "offset", "page_size", "size"],
            "Firecracker's GuestRegionUffdMapping"
        );
        assert_eq!(json[1]["page_size"], 4096);
    }
}
