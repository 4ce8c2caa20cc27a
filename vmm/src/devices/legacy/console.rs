//! A size cap on the guest console: an untrusted guest writing to its serial port without end
//! must not fill the host's disk.
//!
//! When the console is a regular file, [`CappedConsole`] keeps it at most [`ConsoleLimit`]
//! bytes long: once full, it keeps the first half (the boot messages), one marker line, and
//! the newest output after it. Each time the file would grow past the limit, it is truncated
//! back to head and marker, the newest guest output (up to a quarter of the limit or 1 MiB,
//! from a line start, kept in memory because the console descriptor is usually write-only) is
//! written again, and writing goes on. So the file always ends with the latest output.
//!
//! A console that is not a regular file (a pipe, a tty, `/dev/null`) cannot be truncated: its
//! reader decides what to keep, and the bytes pass through unchanged.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Seek, SeekFrom, Write};
use std::str::FromStr;

use crate::metrics::{add, METRICS};

/// The smallest accepted limit: room for a head, the marker and a tail of a few lines.
pub const MIN_CONSOLE_LIMIT: u64 = 4096;
/// The most newest output written again after a cut (and held in memory for that).
const MAX_KEPT_TAIL: u64 = 1 << 20;

/// The maximum size of the guest console file, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsoleLimit(u64);

/// A console limit that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConsoleLimitError {
    /// Not a decimal number of bytes.
    #[error("`{0}` is not a number of bytes (give a decimal integer, e.g. 1048576)")]
    NotANumber(String),
    /// Below [`MIN_CONSOLE_LIMIT`].
    #[error("{0} bytes is too small for a console limit: use at least {MIN_CONSOLE_LIMIT}")]
    TooSmall(u64),
}

impl ConsoleLimit {
    /// A limit of `bytes`, at least [`MIN_CONSOLE_LIMIT`].
    pub fn new(bytes: u64) -> Result<Self, ConsoleLimitError> {
        if bytes < MIN_CONSOLE_LIMIT {
            return Err(ConsoleLimitError::TooSmall(bytes));
        }
        Ok(ConsoleLimit(bytes))
    }

    /// The limit in bytes.
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ConsoleLimit {
    type Err = ConsoleLimitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bytes = s
            .parse()
            .map_err(|_| ConsoleLimitError::NotANumber(s.to_string()))?;
        ConsoleLimit::new(bytes)
    }
}

/// The marker line between the kept head and the newest output of a capped console.
fn marker(limit: u64, after_newline: bool) -> String {
    let newline = if after_newline { "" } else { "\n" };
    format!("{newline}[mvm-vmm: console output over {limit} bytes; older output dropped]\n")
}

enum Mode {
    /// Not a regular file: bytes pass through.
    Stream,
    /// A regular file kept within the limit.
    File,
    /// The file could not be cut back: later output is dropped so that the limit holds.
    Dropping,
}

/// A console sink that keeps a regular file within a [`ConsoleLimit`] (see the module docs).
///
/// Only the writes through this sink are counted between two cuts; anything else writing to
/// the same file (the VMM's own log lines on a shared stderr) is accounted at the next cut,
/// and is not among the newest output written again after a cut.
pub struct CappedConsole {
    file: File,
    limit: u64,
    mode: Mode,
    /// File length as far as this sink knows.
    len: u64,
    /// Where the tail starts once the marker is in.
    base: Option<u64>,
    /// Whether the head (the first half) ends with a newline, once written through here.
    head_ends_line: bool,
    /// The newest guest output.
    recent: VecDeque<u8>,
    /// Bound of `recent`: a quarter of the limit, at most [`MAX_KEPT_TAIL`].
    recent_max: usize,
}

impl CappedConsole {
    /// Caps the console `file` at `limit`. Output is appended at the file's current end.
    pub fn new(mut file: File, limit: ConsoleLimit) -> io::Result<Self> {
        let limit = limit.bytes();
        let (mode, len) = if file.metadata()?.file_type().is_file() {
            (Mode::File, file.seek(SeekFrom::End(0))?)
        } else {
            log::warn!(
                "the guest console is not a regular file: --console-limit is not enforced, its reader decides what to keep"
            );
            (Mode::Stream, 0)
        };
        Ok(CappedConsole {
            file,
            limit,
            mode,
            len,
            base: None,
            head_ends_line: false,
            recent: VecDeque::new(),
            recent_max: (limit / 4).min(MAX_KEPT_TAIL) as usize,
        })
    }

    /// Cuts the file back to head and marker and writes the newest output again.
    fn cut(&mut self) -> io::Result<()> {
        // The real size: other writers (a shared stderr) may have added to it.
        let size = self.file.seek(SeekFrom::End(0))?;
        if size < self.limit {
            self.len = size;
            return Ok(());
        }
        let (cut, marker) = match self.base {
            Some(base) if base <= size => (base, None),
            _ => (
                self.limit / 2,
                Some(marker(self.limit, self.head_ends_line)),
            ),
        };
        let base = cut + marker.as_ref().map_or(0, |m| m.len() as u64);
        // The newest output, from its first line start on when there is one; at most half
        // the room behind the marker, so that many bytes come before the next cut.
        let most = ((self.limit - base) / 2) as usize;
        let recent = self.recent.make_contiguous();
        let recent = &recent[recent.len().saturating_sub(most)..];
        let from = recent
            .iter()
            .position(|&b| b == b'\n')
            .map_or(0, |nl| nl + 1);
        let tail = &recent[from..];
        // Truncate, then write at the new end: correct with and without O_APPEND.
        self.file.set_len(cut)?;
        self.file.seek(SeekFrom::End(0))?;
        if let Some(marker) = &marker {
            self.file.write_all(marker.as_bytes())?;
        }
        self.file.write_all(tail)?;
        add(
            &METRICS.serial_bytes_dropped,
            size - cut - tail.len() as u64,
        );
        self.len = base + tail.len() as u64;
        self.base = Some(base);
        Ok(())
    }

    /// Remembers what was just written at the file's end.
    fn record(&mut self, written: &[u8]) {
        let head = self.limit / 2;
        if let Some(at) = (head - 1).checked_sub(self.len) {
            if let Some(&b) = written.get(at as usize) {
                self.head_ends_line = b == b'\n';
            }
        }
        self.len += written.len() as u64;
        let newest = &written[written.len().saturating_sub(self.recent_max)..];
        let excess = (self.recent.len() + newest.len()).saturating_sub(self.recent_max);
        self.recent.drain(..excess);
        self.recent.extend(newest);
    }
}

impl Write for CappedConsole {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.mode {
            Mode::Stream => return self.file.write(buf),
            Mode::Dropping => {
                add(&METRICS.serial_bytes_dropped, buf.len() as u64);
                return Ok(buf.len());
            }
            Mode::File => {}
        }
        if buf.is_empty() {
            return Ok(0);
        }
        if self.len >= self.limit {
            if let Err(e) = self.cut() {
                log::error!(
                    "cannot cut the guest console back within {} bytes ({e}): dropping further guest output",
                    self.limit
                );
                self.mode = Mode::Dropping;
                add(&METRICS.serial_bytes_dropped, buf.len() as u64);
                return Ok(buf.len());
            }
        }
        let room = (self.limit - self.len).min(buf.len() as u64) as usize;
        let written = self.file.write(&buf[..room])?;
        self.record(&buf[..written]);
        Ok(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mvm_testkit::ScratchDir;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::sync::atomic::Ordering;

    const LIMIT: u64 = 8192;

    fn limit() -> ConsoleLimit {
        ConsoleLimit::new(LIMIT).unwrap()
    }

    /// The numbered lines a flooding guest prints.
    fn flood(lines: usize) -> Vec<u8> {
        (0..lines)
            .flat_map(|i| format!("guest line {i:06}\n").into_bytes())
            .collect()
    }

    /// Writes `bytes` one at a time, as the UART does, checking the size after every write.
    fn feed(console: &mut CappedConsole, file: &File, bytes: &[u8]) {
        for b in bytes {
            console.write_all(&[*b]).unwrap();
            console.flush().unwrap();
            let len = file.metadata().unwrap().len();
            assert!(len <= LIMIT, "console file grew to {len} bytes");
        }
    }

    /// Checks a capped console: head intact, one marker, then a suffix of `sent` starting at
    /// a line start; returns the tail.
    fn check_capped<'a>(content: &'a [u8], sent: &[u8]) -> &'a [u8] {
        let head = (LIMIT / 2) as usize;
        assert_eq!(
            &content[..head],
            &sent[..head],
            "the head is the first half"
        );
        let rest = &content[head..];
        let marker = marker(LIMIT, sent[head - 1] == b'\n');
        assert!(
            rest.starts_with(marker.as_bytes()),
            "marker after the head: {:?}",
            String::from_utf8_lossy(&rest[..100])
        );
        let tail = &rest[marker.len()..];
        assert!(sent.ends_with(tail), "the tail is the newest output");
        assert!(
            tail.is_empty() || sent[sent.len() - tail.len() - 1] == b'\n',
            "the tail starts at a line start"
        );
        assert!(
            !tail.windows(9).any(|w| w == b"[mvm-vmm:"),
            "one marker only"
        );
        tail
    }

    #[test]
    fn limits_parse_and_refuse_bad_values() {
        assert_eq!("65536".parse(), Ok(ConsoleLimit(65536)));
        assert_eq!(
            "64K".parse::<ConsoleLimit>(),
            Err(ConsoleLimitError::NotANumber("64K".into()))
        );
        assert_eq!(
            "4095".parse::<ConsoleLimit>(),
            Err(ConsoleLimitError::TooSmall(4095))
        );
        assert_eq!(ConsoleLimit::new(MIN_CONSOLE_LIMIT).unwrap().bytes(), 4096);
    }

    #[test]
    fn output_below_the_limit_is_kept_whole() {
        let dir = ScratchDir::new("console-below");
        let path = dir.path().join("console.log");
        let file = File::create(&path).unwrap();
        let mut console = CappedConsole::new(file.try_clone().unwrap(), limit()).unwrap();
        let sent = &flood(1000)[..LIMIT as usize];
        feed(&mut console, &file, sent);
        assert_eq!(std::fs::read(&path).unwrap(), sent);
    }

    #[test]
    fn a_flood_keeps_head_marker_and_newest_output_within_the_limit() {
        let before = METRICS.serial_bytes_dropped.load(Ordering::Relaxed);
        let dir = ScratchDir::new("console-flood");
        let path = dir.path().join("console.log");
        let file = File::create(&path).unwrap();
        let mut console = CappedConsole::new(file.try_clone().unwrap(), limit()).unwrap();
        let sent = flood(5000);
        feed(&mut console, &file, &sent);
        let content = std::fs::read(&path).unwrap();
        let tail = check_capped(&content, &sent);
        assert!(
            tail.len() as u64 >= LIMIT / 4 - 100,
            "at least the newest quarter is kept: {} bytes",
            tail.len()
        );
        let kept = (LIMIT / 2) as usize + tail.len();
        let dropped = METRICS.serial_bytes_dropped.load(Ordering::Relaxed) - before;
        // Other tests may drop bytes at the same time.
        assert!(dropped >= (sent.len() - kept) as u64, "dropped {dropped}");
    }

    #[test]
    fn an_append_only_descriptor_is_capped_too() {
        let dir = ScratchDir::new("console-append");
        let path = dir.path().join("console.log");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let mut console = CappedConsole::new(file.try_clone().unwrap(), limit()).unwrap();
        let sent = flood(3000);
        feed(&mut console, &file, &sent);
        check_capped(&std::fs::read(&path).unwrap(), &sent);
    }

    #[test]
    fn existing_content_counts_and_output_goes_after_it() {
        let dir = ScratchDir::new("console-existing");
        let path = dir.path().join("console.log");
        let jailer = b"jailer: starting mvm-vmm\n";
        std::fs::write(&path, jailer).unwrap();
        let mut file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        // A descriptor whose offset is not at the end, as a fresh open has.
        file.seek(SeekFrom::Start(0)).unwrap();
        let mut console = CappedConsole::new(file.try_clone().unwrap(), limit()).unwrap();
        let guest = flood(3000);
        feed(&mut console, &file, &guest);
        let sent = [&jailer[..], &guest].concat();
        check_capped(&std::fs::read(&path).unwrap(), &sent);
    }

    #[test]
    fn a_second_writer_on_the_file_is_accounted_at_the_next_cut() {
        let dir = ScratchDir::new("console-shared");
        let path = dir.path().join("console.log");
        let file = File::create(&path).unwrap();
        // The VMM's stderr shares the open file (and its offset) with the console.
        let mut stderr = file.try_clone().unwrap();
        let mut console = CappedConsole::new(file.try_clone().unwrap(), limit()).unwrap();
        let mut sent = Vec::new();
        for chunk in flood(3000).chunks(1000) {
            for b in chunk {
                console.write_all(&[*b]).unwrap();
            }
            let note = b"[mvm-vmm] a log line\n";
            stderr.write_all(note).unwrap();
            sent.extend_from_slice(chunk);
            sent.extend_from_slice(note);
            let len = file.metadata().unwrap().len();
            assert!(len <= LIMIT + note.len() as u64, "{len} bytes");
        }
        console.write_all(b"last\n").unwrap();
        let content = std::fs::read(&path).unwrap();
        assert!(content.len() as u64 <= LIMIT, "{} bytes", content.len());
        let head = (LIMIT / 2) as usize;
        assert_eq!(&content[..head], &sent[..head]);
        let marker = b"[mvm-vmm: console output over 8192 bytes; older output dropped]\n";
        let markers = content
            .windows(marker.len())
            .filter(|w| w == marker)
            .count();
        assert_eq!(markers, 1, "{}", String::from_utf8_lossy(&content));
        assert!(content.ends_with(b"[mvm-vmm] a log line\nlast\n"));
    }

    #[test]
    fn a_pipe_is_passed_through_uncapped() {
        let (mut reader, writer) = std::io::pipe().unwrap();
        let file = File::from(writer.as_fd().try_clone_to_owned().unwrap());
        drop(writer);
        let mut console = CappedConsole::new(file, limit()).unwrap();
        let sent = flood(1000);
        let reading = std::thread::spawn(move || {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).unwrap();
            got
        });
        console.write_all(&sent).unwrap();
        drop(console);
        assert_eq!(reading.join().unwrap(), sent);
    }
}
