//! mount(2), umount2(2), the switch to a new root with pivot_root(2), and statvfs(2) of a
//! mounted file system.

use std::ffi::CString;
use std::io::ErrorKind;
use std::path::Path;
use std::ptr;

use crate::{cstr, Error, Result};

/// mount(2) of `source` (or none) on `target`; the error names both, the type and the flags.
pub fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<()> {
    let what = || {
        format!(
            "mounting {} on {} (type {}, flags {flags:#x})",
            source.map_or("none".into(), |s| s.display().to_string()),
            target.display(),
            fstype.unwrap_or("none")
        )
    };
    let string =
        |s: &str| CString::new(s).map_err(|_| Error::new(what(), ErrorKind::InvalidInput.into()));
    let source_c = source.map(cstr::from_path).transpose()?;
    let target_c = cstr::from_path(target)?;
    let fstype_c = fstype.map(string).transpose()?;
    let data_c = data.map(string).transpose()?;
    let p = |c: &Option<CString>| c.as_ref().map_or(ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is either null or a NUL-terminated string that outlives the call.
    let ret = unsafe {
        libc::mount(
            p(&source_c),
            target_c.as_ptr(),
            p(&fstype_c),
            flags,
            p(&data_c).cast(),
        )
    };
    if ret == -1 {
        return Err(Error::last_os_error(what()));
    }
    Ok(())
}

/// umount2(2) of `target` with `flags` (`MNT_DETACH`, `UMOUNT_NOFOLLOW`...). The errno of a
/// failure is in the error's `source` (`EINVAL`: nothing is mounted there).
pub fn umount(target: &Path, flags: libc::c_int) -> Result<()> {
    let target_c = cstr::from_path(target)?;
    // SAFETY: `target_c` is a NUL-terminated path, valid for the call.
    if unsafe { libc::umount2(target_c.as_ptr(), flags) } == -1 {
        return Err(Error::last_os_error(format!(
            "unmounting {}",
            target.display()
        )));
    }
    Ok(())
}

/// statvfs(2): the flags, size and free space of the file system holding `path`.
pub fn statvfs(path: &Path) -> Result<libc::statvfs> {
    let path_c = cstr::from_path(path)?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a statvfs buffer for the call to fill.
    if unsafe { libc::statvfs(path_c.as_ptr(), stat.as_mut_ptr()) } == -1 {
        return Err(Error::last_os_error(format!("statvfs {}", path.display())));
    }
    // SAFETY: statvfs returned 0, so it filled the buffer.
    Ok(unsafe { stat.assume_init() })
}

/// Makes the file system mounted on `new_root` the root of this mount namespace and detaches
/// the old root with all that is mounted below it; the working directory ends at the new `/`.
/// `new_root` must be a mount point and the mounts involved must not be shared.
pub fn pivot_root(new_root: &Path) -> Result<()> {
    std::env::set_current_dir(new_root)
        .map_err(|e| Error::new(format!("entering {}", new_root.display()), e))?;
    // pivot_root(".", ".") stacks the old root on top of the new one; unmounting "." then
    // removes it without needing a directory for it in the new root.
    let dot = c".";
    // SAFETY: pivot_root takes two NUL-terminated paths, valid for the call.
    if unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } == -1 {
        return Err(Error::last_os_error(format!(
            "pivot_root into {}",
            new_root.display()
        )));
    }
    umount(Path::new("."), libc::MNT_DETACH)
        .map_err(|e| Error::new("detaching the old root after pivot_root", e.source))?;
    std::env::set_current_dir("/").map_err(|e| Error::new("entering the new /", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_mount() {
        let e = mount(
            Some(Path::new("none")),
            Path::new("/nonexistent/mvm-sys-test"),
            Some("tmpfs"),
            libc::MS_NOSUID,
            Some("size=1\0"),
        )
        .unwrap_err();
        assert_eq!(e.source.kind(), ErrorKind::InvalidInput);
        assert_eq!(
            e.what,
            "mounting none on /nonexistent/mvm-sys-test (type tmpfs, flags 0x2)"
        );
        let e = umount(Path::new("/nonexistent/mvm-sys-test"), 0).unwrap_err();
        assert!(e.source.raw_os_error().is_some(), "{e}");
        assert_eq!(e.what, "unmounting /nonexistent/mvm-sys-test");
    }
}
