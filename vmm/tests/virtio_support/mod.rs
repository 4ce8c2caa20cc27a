//! Helpers shared by the virtio device tests and the virtio benchmark.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};

/// Writes a raw disk image of `sectors` sectors: sector 0 starts with "MVM test disk, sector 0",
/// every other sector with "MVM filler <n>".
pub fn disk_image(dir: &Path, sectors: usize) -> PathBuf {
    let mut bytes = vec![0u8; sectors * 512];
    for (n, sector) in bytes.chunks_mut(512).enumerate() {
        let text = if n == 0 { "MVM test disk, sector 0".to_string() } else { format!("MVM filler {n}") };
        sector[..text.len()].copy_from_slice(text.as_bytes());
    }
    let path = dir.join("disk.img");
    std::fs::write(&path, bytes).expect("write disk image");
    path
}
