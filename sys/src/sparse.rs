//! The data of sparse files: where a file holds data and where it has holes
//! (`lseek(SEEK_DATA)`, `lseek(SEEK_HOLE)`), and copies of it file to file in the kernel
//! (`copy_file_range`).

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

/// Copies the `len` bytes of `src` at `src_at` to `dst` at `dst_at`, file to file in the
/// kernel (`copy_file_range`: nothing passes through this process's memory, and where the
/// file system shares extents, XFS and Btrfs, the blocks are shared instead of copied), or,
/// where the kernel cannot copy between these two files (two file systems, or one that does
/// not copy), through a buffer. Holes of `src` in the range are written as zeros: copy its
/// [`data_ranges`]. Fails if `src` ends before the range does.
pub fn copy_range(src: &File, src_at: u64, dst: &File, dst_at: u64, len: u64) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let (mut from, mut to) = (
            (src_at + done) as libc::loff_t,
            (dst_at + done) as libc::loff_t,
        );
        let chunk = (len - done).min(1 << 30) as usize;
        // SAFETY: two descriptors the caller owns and two offsets on this stack, which the
        // kernel reads and advances; no other memory is touched.
        let copied = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut from,
                dst.as_raw_fd(),
                &mut to,
                chunk,
                0,
            )
        };
        match copied {
            0 => return Err(ended_early(src_at + done)),
            n if n > 0 => done += n as u64,
            _ => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::Interrupted => {}
                e if matches!(
                    e.raw_os_error(),
                    Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
                ) =>
                {
                    return copy_through_buffer(src, src_at + done, dst, dst_at + done, len - done)
                }
                e => return Err(e),
            },
        }
    }
    Ok(())
}

/// [`copy_range`] by reads and writes through a buffer of this process.
fn copy_through_buffer(
    src: &File,
    src_at: u64,
    dst: &File,
    dst_at: u64,
    len: u64,
) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = buf.len().min((len - done) as usize);
        src.read_exact_at(&mut buf[..n], src_at + done)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => ended_early(src_at + done),
                _ => e,
            })?;
        dst.write_all_at(&buf[..n], dst_at + done)?;
        done += n as u64;
    }
    Ok(())
}

fn ended_early(at: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("the file to copy ends at {at}, before the range to copy does"),
    )
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

    /// A range is copied at its offsets, in the kernel between two files of one file system
    /// and through a buffer between two (tmpfs and this directory's, where they differ),
    /// and a source that ends early is an error.
    #[test]
    fn a_range_is_copied_file_to_file() {
        let dir = tempfile::tempdir().unwrap();
        let on_shm = tempfile::tempdir_in("/dev/shm").ok();
        let src = tempfile::tempfile_in(dir.path()).unwrap();
        let pattern: Vec<u8> = (0..3 << 20).map(|i: u32| (i % 251) as u8).collect();
        src.write_all_at(&pattern, 4096).unwrap();
        for target in std::iter::once(&dir).chain(on_shm.as_ref()) {
            let dst = tempfile::tempfile_in(target.path()).unwrap();
            copy_range(&src, 4096 + 10, &dst, 8192, (3 << 20) - 10).unwrap();
            let mut copied = vec![0u8; (3 << 20) - 10];
            dst.read_exact_at(&mut copied, 8192).unwrap();
            assert!(copied == pattern[10..], "{}", target.path().display());
            assert_eq!(dst.metadata().unwrap().len(), 8192 + (3 << 20) - 10);
            let err = copy_range(&src, 3 << 20, &dst, 0, 2 << 20).unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
        }
    }
}
