//! A process's resident memory, and how far it rose during a stretch of work (its peak,
//! `VmHWM`, reset to the current RSS first through `clear_refs`; needs root or the owner).

/// A `kB` field of `/proc/<pid>/status` (e.g. `VmRSS`), in bytes.
pub fn status_bytes(pid: u32, field: &str) -> u64 {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no {field} in {path}"))
        * 1024
}

/// Growth of a process's resident memory from now on.
#[derive(Debug)]
pub struct PeakGrowth {
    pid: u32,
    before: u64,
}

impl PeakGrowth {
    /// Resets `pid`'s peak to its current RSS and remembers that.
    pub fn start(pid: u32) -> Self {
        let path = format!("/proc/{pid}/clear_refs");
        std::fs::write(&path, "5").unwrap_or_else(|e| panic!("resetting VmHWM ({path}): {e}"));
        Self {
            pid,
            before: status_bytes(pid, "VmRSS"),
        }
    }

    /// How far the peak RSS rose above the start, bytes.
    pub fn bytes(&self) -> u64 {
        status_bytes(self.pid, "VmHWM").saturating_sub(self.before)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touching_memory_raises_the_peak() {
        let me = std::process::id();
        let growth = PeakGrowth::start(me);
        let block = vec![1u8; 32 << 20];
        std::hint::black_box(&block);
        assert!(growth.bytes() >= 30 << 20, "{}", growth.bytes());
        assert!(status_bytes(me, "VmRSS") > 0);
    }
}
