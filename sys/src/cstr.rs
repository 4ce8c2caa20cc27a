//! Paths as the NUL-terminated strings system calls take.

use std::ffi::CString;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::{Error, Result};

/// `path` as a C string; a path with a NUL byte (which no system call can name) is an error.
pub fn from_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        Error::new(
            format!("path {} contains a NUL byte", path.display()),
            ErrorKind::InvalidInput.into(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_bytes_are_refused() {
        assert_eq!(from_path(Path::new("/a b")).unwrap().as_bytes(), b"/a b");
        let e = from_path(Path::new("/a\0b")).unwrap_err();
        assert_eq!(e.source.kind(), ErrorKind::InvalidInput);
        assert!(
            e.to_string().starts_with("path /a\0b contains a NUL byte"),
            "{e}"
        );
    }
}
