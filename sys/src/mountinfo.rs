//! The mount table of this mount namespace, `/proc/self/mountinfo` (proc(5)).
//!
//! A line is `ID PARENT MAJOR:MINOR ROOT MOUNT-POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
//! SUPER-OPTIONS`; the kernel writes a space, tab, newline or backslash inside a field as an
//! octal escape (`\040`, `\011`, `\012`, `\134`), which [`MountInfo`] decodes.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Where the kernel lists the mounts of the reading process's mount namespace.
pub const PATH: &str = "/proc/self/mountinfo";

/// One mount, as a line of mountinfo describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Unique id of the mount.
    pub mount_id: u32,
    /// Id of the mount this one is mounted on (itself for the root of the namespace).
    pub parent_id: u32,
    /// Major number of the device of the file system.
    pub major: u32,
    /// Minor number of the device of the file system.
    pub minor: u32,
    /// The directory of the file system that is the root of this mount.
    pub root: PathBuf,
    /// Where it is mounted, relative to the process's root.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`, `nosuid`, `relatime`...).
    pub mount_options: Vec<String>,
    /// Optional fields (`shared:N`, `master:N`, `propagate_from:N`, `unbindable`).
    pub optional_fields: Vec<String>,
    /// File system type, with its subtype if any (`fuse.sshfs`).
    pub fs_type: String,
    /// File-system-specific source (a device, `tmpfs`, `none`...).
    pub source: String,
    /// Per-super-block options (for cgroup v1: the controllers of the hierarchy).
    pub super_options: Vec<String>,
}

impl MountInfo {
    /// Parses one line of mountinfo; `None` for a line that does not have its fields.
    pub fn parse_line(line: &str) -> Option<Self> {
        let mut fields = line.split(' ');
        let mount_id = fields.next()?.parse().ok()?;
        let parent_id = fields.next()?.parse().ok()?;
        let (major, minor) = fields.next()?.split_once(':')?;
        let root = unescape(fields.next()?);
        let mount_point = unescape(fields.next()?);
        let mount_options = options(fields.next()?);
        let optional_fields = fields
            .by_ref()
            .take_while(|f| *f != "-")
            .map(str::to_owned)
            .collect();
        let fs_type = unescape_lossy(fields.next()?);
        let source = unescape_lossy(fields.next()?);
        let super_options = options(fields.next()?);
        Some(MountInfo {
            mount_id,
            parent_id,
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
            root: root.into(),
            mount_point: mount_point.into(),
            mount_options,
            optional_fields,
            fs_type,
            source,
            super_options,
        })
    }
}

/// The mounts listed in `text` (mountinfo's format), in its order: a mount comes after the one
/// it is mounted on. Lines without the fields are skipped.
pub fn parse(text: &str) -> Vec<MountInfo> {
    text.lines().filter_map(MountInfo::parse_line).collect()
}

/// The mounts of this mount namespace ([`PATH`]), in the kernel's order.
pub fn read() -> Result<Vec<MountInfo>> {
    let text =
        std::fs::read_to_string(PATH).map_err(|e| Error::new(format!("reading {PATH}"), e))?;
    Ok(parse(&text))
}

/// Mount points at or below `dir` in this mount namespace, in the kernel's order (none when the
/// mount table cannot be read).
pub fn mount_points_under(dir: &Path) -> Vec<PathBuf> {
    read()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(dir))
        .collect()
}

/// A comma-separated option list; each option is split off before decoding (a file system may
/// escape a comma inside a value).
fn options(field: &str) -> Vec<String> {
    field.split(',').map(unescape_lossy).collect()
}

fn unescape_lossy(field: &str) -> String {
    unescape(field).to_string_lossy().into_owned()
}

/// Undoes the `\NNN` octal escapes (three octal digits, value at most `\377`) of a field;
/// a backslash not starting one is kept as it is.
fn unescape(field: &str) -> OsString {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|d| {
            bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)) && d[0] <= b'3'
        });
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn escapes_are_decoded() {
        assert_eq!(unescape("/a\\040b\\011c\\134d"), "/a b\tc\\d");
        assert_eq!(unescape("/n\\012l"), "/n\nl");
        // Not an escape: left as is.
        assert_eq!(unescape("/x\\9y\\04"), "/x\\9y\\04");
        assert_eq!(unescape("/big\\400"), "/big\\400");
        assert_eq!(unescape("/"), "/");
        // Bytes that are not UTF-8 stay what they are.
        assert_eq!(unescape("/\\377").into_vec(), b"/\xff");
    }

    #[test]
    fn every_field_of_a_line() {
        let line = "36 35 98:0 /mnt\\0401 /my\\040mnt\\011tab\\012nl\\134bs rw,noatime \
                    master:1 shared:7 - ext3 /dev/root\\040x rw,errors=continue";
        let m = MountInfo::parse_line(line).unwrap();
        assert_eq!(
            m,
            MountInfo {
                mount_id: 36,
                parent_id: 35,
                major: 98,
                minor: 0,
                root: "/mnt 1".into(),
                mount_point: "/my mnt\ttab\nnl\\bs".into(),
                mount_options: vec!["rw".into(), "noatime".into()],
                optional_fields: vec!["master:1".into(), "shared:7".into()],
                fs_type: "ext3".into(),
                source: "/dev/root x".into(),
                super_options: vec!["rw".into(), "errors=continue".into()],
            }
        );
    }

    #[test]
    fn lines_without_optional_fields_or_malformed() {
        let text = "\
22 1 0:21 / /proc rw,nosuid - proc proc rw
garbage
23 1 0:5 / /dev rw - devtmpfs
24 22 0:40 / /tmp/over rw - overlay overlay rw,lowerdir=/l\\054x,upperdir=/u
";
        let mounts = parse(text);
        assert_eq!(mounts.len(), 2);
        assert_eq!(mounts[0].mount_point, Path::new("/proc"));
        assert!(mounts[0].optional_fields.is_empty());
        assert_eq!(mounts[0].fs_type, "proc");
        // An escaped comma stays inside its option.
        assert_eq!(
            mounts[1].super_options,
            ["rw", "lowerdir=/l,x", "upperdir=/u"]
        );
    }

    #[test]
    fn this_namespace_has_a_root() {
        let mounts = read().unwrap();
        assert!(mounts.iter().any(|m| m.mount_point == Path::new("/")));
    }
}
