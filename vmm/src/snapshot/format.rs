//! The snapshot file: a small versioned container around a serde payload.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "MVMSNAP\0"
//!      8     4  format version (little endian)
//!     12     8  payload length in bytes (little endian)
//!     20     8  CRC-64/XZ of the payload (little endian)
//!     28     …  payload (postcard)
//! ```
//!
//! Reading checks every field before the payload is decoded, so a truncated, foreign or
//! corrupted file is refused with an error that says which, never a panic.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The first bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"MVMSNAP\0";
/// The format version this VMM writes and reads.
pub const FORMAT_VERSION: u32 = 2;
const HEADER_LEN: usize = 28;
const CRC64: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Why a snapshot file cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// Shorter than its header or its declared payload.
    #[error("the snapshot file is truncated: {0} bytes where {1} are needed")]
    Truncated(usize, u64),
    /// Not an mvm snapshot.
    #[error("not an mvm snapshot file (bad magic)")]
    BadMagic,
    /// Written by a VMM with another format.
    #[error(
        "snapshot format version {0} is not supported (this VMM reads version {FORMAT_VERSION})"
    )]
    Version(u32),
    /// Bytes after the declared payload.
    #[error("the snapshot file has {0} bytes after its payload")]
    TrailingBytes(u64),
    /// The payload does not match its checksum.
    #[error("the snapshot file is corrupt: CRC-64 {found:#018x}, expected {expected:#018x}")]
    Checksum {
        /// CRC of the payload read.
        found: u64,
        /// CRC in the header.
        expected: u64,
    },
    /// The payload could not be encoded or decoded.
    #[error("the snapshot payload cannot be {0}: {1}")]
    Payload(&'static str, postcard::Error),
}

/// Serializes `state` into a complete snapshot file image.
pub fn encode<T: Serialize>(state: &T) -> Result<Vec<u8>, FormatError> {
    let payload = postcard::to_stdvec(state).map_err(|e| FormatError::Payload("encoded", e))?;
    let mut file = Vec::with_capacity(HEADER_LEN + payload.len());
    file.extend_from_slice(&MAGIC);
    file.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    file.extend_from_slice(&CRC64.checksum(&payload).to_le_bytes());
    file.extend_from_slice(&payload);
    Ok(file)
}

/// Checks a snapshot file image and decodes its payload.
pub fn decode<T: DeserializeOwned>(file: &[u8]) -> Result<T, FormatError> {
    let Some((header, payload)) = file.split_at_checked(HEADER_LEN) else {
        return Err(FormatError::Truncated(file.len(), HEADER_LEN as u64));
    };
    let field = |at: usize, len: usize| &header[at..at + len];
    if field(0, 8) != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = u32::from_le_bytes(field(8, 4).try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(FormatError::Version(version));
    }
    let len = u64::from_le_bytes(field(12, 8).try_into().expect("8 bytes"));
    let expected = u64::from_le_bytes(field(20, 8).try_into().expect("8 bytes"));
    let have = payload.len() as u64;
    if have < len {
        return Err(FormatError::Truncated(file.len(), HEADER_LEN as u64 + len));
    }
    if have > len {
        return Err(FormatError::TrailingBytes(have - len));
    }
    let found = CRC64.checksum(payload);
    if found != expected {
        return Err(FormatError::Checksum { found, expected });
    }
    postcard::from_bytes(payload).map_err(|e| FormatError::Payload("decoded", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        encode(&("state", vec![1u64, 2, 3])).unwrap()
    }

    #[test]
    fn round_trips() {
        let (name, values): (String, Vec<u64>) = decode(&sample()).unwrap();
        assert_eq!((name.as_str(), values), ("state", vec![1, 2, 3]));
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let good = sample();
        let err = |bytes: &[u8]| decode::<(String, Vec<u64>)>(bytes).unwrap_err().to_string();
        assert!(
            err(&good[..10]).contains("truncated"),
            "{}",
            err(&good[..10])
        );
        assert!(err(&good[..good.len() - 1]).contains("truncated"));
        let mut magic = good.clone();
        magic[0] = b'X';
        assert!(err(&magic).contains("bad magic"));
        let mut version = good.clone();
        version[8] = 9;
        assert!(err(&version).contains("version 9 is not supported"));
        let mut flipped = good.clone();
        *flipped.last_mut().unwrap() ^= 0x40;
        assert!(err(&flipped).contains("corrupt"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(err(&longer).contains("after its payload"));
    }
}
