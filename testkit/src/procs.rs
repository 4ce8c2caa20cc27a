//! What a process holds, for tests that prove something never reached it: the processes of a
//! network namespace, and a search of their environment and memory.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Pids of the processes in the network namespace pinned at `netns`.
pub fn pids_in_netns(netns: &Path) -> Vec<i32> {
    let Ok(ns) = std::fs::metadata(netns) else {
        return Vec::new();
    };
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .is_ok_and(|m| m.ino() == ns.ino() && m.dev() == ns.dev())
        })
        .collect()
}

/// Whether `needle` is in process `pid`'s environment (`/proc/PID/environ`).
pub fn environ_contains(pid: i32, needle: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/environ"))
        .is_ok_and(|env| env.windows(needle.len()).any(|w| w == needle))
}

/// Whether `needle` is anywhere in the readable memory of process `pid` (every readable
/// mapping of `/proc/PID/maps`, read through `/proc/PID/mem`; mappings the kernel refuses to
/// read, like `[vvar]`, are skipped).
pub fn memory_contains(pid: i32, needle: &[u8]) -> bool {
    use std::os::unix::fs::FileExt;
    let (Ok(maps), Ok(mem)) = (
        std::fs::read_to_string(format!("/proc/{pid}/maps")),
        std::fs::File::open(format!("/proc/{pid}/mem")),
    ) else {
        return false;
    };
    const CHUNK: u64 = 1 << 20;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else {
            continue;
        };
        let Some((start, end)) = range.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        else {
            continue;
        };
        if !perms.starts_with('r') {
            continue;
        }
        // Chunks overlapping by the needle's length, so that nothing is missed at a border.
        let mut at = start;
        while at < end {
            let len = (end - at).min(CHUNK + needle.len() as u64);
            let mut buf = vec![0u8; len as usize];
            match mem.read_at(&mut buf, at) {
                Ok(n) if buf[..n].windows(needle.len()).any(|w| w == needle) => return true,
                Ok(_) => {}
                Err(_) => break,
            }
            at += CHUNK;
        }
    }
    false
}
