//! The data of sparse files: where a file holds data and where it has holes
//! (`lseek(SEEK_DATA)`, `lseek(SEEK_HOLE)`).

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;

/// The ranges of `file` between `start` and `end` that hold data, in order; the rest are
/// holes (read as zeros). A file system that does not track holes reports all as data.
pub fn data_ranges(file: &File, start: u64, end: u64) -> io::Result<Vec<Range<u64>>> {
    let seek = |from: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        // SAFETY: lseek takes a descriptor the caller owns and integers; it touches no memory.
        let at = unsafe { libc::lseek(file.as_raw_fd(), from as libc::off_t, whence) };
        match at {
            at if at >= 0 => Ok(Some(at as u64)),
            // No data at or after `from` (only a hole is left, or `from` is past the end).
            _ => match io::Error::last_os_error() {
                e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
                e => Err(e),
            },
        }
    };
    let mut ranges = Vec::new();
    let mut at = start;
    while at < end {
        let Some(data) = seek(at, libc::SEEK_DATA)?.filter(|&d| d < end) else {
            break;
        };
        let hole = seek(data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        ranges.push(data..hole);
        at = hole;
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// Data written at two places of a 64 MiB sparse file is found there (as the file system
    /// rounds it, within a few pages), clipped to the range asked, and nothing else.
    #[test]
    fn the_data_of_a_sparse_file_is_found_and_clipped() {
        let dir = std::env::temp_dir().join(format!("mvm-sparse-{}", std::process::id()));
        let file = File::options()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&dir)
            .unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(b"head", 0).unwrap();
        file.write_all_at(&[7u8; 5000], 40 << 20).unwrap();
        let all = data_ranges(&file, 0, 64 << 20).unwrap();
        assert_eq!(all.len(), 2, "{all:?}");
        assert!(
            all[0].start == 0 && all[0].end >= 4 && all[0].end <= 1 << 20,
            "{all:?}"
        );
        assert!(
            all[1].start <= 40 << 20 && all[1].end >= (40 << 20) + 5000,
            "{all:?}"
        );
        assert!(
            all[1].start >= 39 << 20 && all[1].end <= 41 << 20,
            "{all:?}"
        );
        let clipped = data_ranges(&file, 2, (40 << 20) + 100).unwrap();
        assert_eq!(clipped, [2..all[0].end, all[1].start..(40 << 20) + 100]);
        assert!(data_ranges(&file, 41 << 20, 64 << 20).unwrap().is_empty());
        std::fs::remove_file(&dir).unwrap();
    }
}
