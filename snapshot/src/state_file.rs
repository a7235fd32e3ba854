//! The state file: one serde value (all saved state of a VM) behind a checked header.
//!
//! # Format (all integers little-endian)
//! ```text
//! offset  size  field
//!      0     8  magic            b"FNSTATE\0"
//!      8     2  format major     a reader rejects any other major version
//!     10     2  format minor     compatible revisions of one major version
//!     12     4  reserved         zero
//!     16     8  payload length   at most MAX_PAYLOAD_LEN; the file is exactly 32 + length bytes
//!     24     8  checksum         CRC-64/XZ of bytes 0..24 followed by the payload
//!     32     n  payload          the state, encoded with postcard 1.x
//! ```
//!
//! The payload is [postcard](https://docs.rs/postcard)'s stable wire format (v1): compact,
//! not self-describing (integers as varints, structs as their fields in order). Any change to
//! a saved state type therefore changes the format: the writer bumps the major version and
//! old snapshots are rejected with a message that says to re-take them. Snapshots are cheap to
//! re-take, and a reader that only ever decodes its own format cannot misread a field.
//!
//! Reading checks, in order and before it builds anything: the magic, the major version, the
//! length cap (before allocating), the file's length, the checksum, then the decoding (which
//! must use every payload byte). Every error names the file.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::checksum::Crc64;

/// First bytes of every state file.
pub const MAGIC: [u8; 8] = *b"FNSTATE\0";
/// Size of the header before the payload.
pub const HEADER_LEN: usize = 32;
/// Largest payload a reader accepts (checked before allocating): far above what a VM saves
/// (about 10 KiB per vCPU, a few KiB of devices), far below what a bad length could make
/// the reader allocate.
pub const MAX_PAYLOAD_LEN: u64 = 16 << 20;

/// What a user re-runs to replace a snapshot that cannot be used.
const FIX: &str = "re-run 'fnode snapshot'";

/// A state file's format version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FormatVersion {
    /// Incompatible revisions: a reader reads only its own major version.
    pub major: u16,
    /// Compatible revisions within one major version.
    pub minor: u16,
}

impl std::fmt::Display for FormatVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.major)
    }
}

/// Errors writing or reading a state file. Each names the file and, for a bad file, the fix.
#[derive(Debug, thiserror::Error)]
pub enum StateFileError {
    /// The file does not exist.
    #[error("snapshot state file {} is missing: {FIX}", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The file could not be opened, read or written.
    #[error("cannot {op} snapshot state file {}", path.display())]
    Io {
        /// What was being done ("read", "write", ...).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file does not start with [`MAGIC`].
    #[error("{} is not an fnode snapshot state file (bad magic): {FIX}", path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
    },
    /// Another major format version.
    #[error("snapshot {} was written by format {found}, this fnode reads format {supported}: {FIX}",
            path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: FormatVersion,
        /// The version this reader reads.
        supported: FormatVersion,
    },
    /// The header claims a payload larger than [`MAX_PAYLOAD_LEN`].
    #[error("snapshot state file {} claims {len} bytes of state, more than the {MAX_PAYLOAD_LEN} \
             allowed: the file is corrupt, {FIX}", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The claimed payload length.
        len: u64,
    },
    /// The file's length does not match its header (cut short, or with bytes appended).
    #[error("snapshot state file {} is {actual} bytes long, its header says {expected}: \
             the file is truncated or corrupt, {FIX}", path.display())]
    Length {
        /// The file.
        path: PathBuf,
        /// Header + payload length from the header.
        expected: u64,
        /// The file's length.
        actual: u64,
    },
    /// The checksum does not match: bits changed since the file was written.
    #[error("snapshot state file {} is corrupt (checksum {actual:#018x}, expected \
             {expected:#018x}): {FIX}", path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
        /// The checksum in the header.
        expected: u64,
        /// The checksum of the contents.
        actual: u64,
    },
    /// The payload does not decode as the expected state (or leaves bytes over).
    #[error("snapshot state file {} does not hold a state this fnode can read: {FIX}",
            path.display())]
    Decode {
        /// The file.
        path: PathBuf,
        /// postcard's error (`None`: bytes left over after the state).
        #[source]
        source: Option<postcard::Error>,
    },
    /// The state could not be encoded (a bug: state types are plain data).
    #[error("cannot encode the snapshot state")]
    Encode(#[source] postcard::Error),
}

impl StateFileError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::NotFound && op == "open" {
            StateFileError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            StateFileError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// The header of a payload.
fn header(version: FormatVersion, payload: &[u8]) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&version.major.to_le_bytes());
    h[10..12].copy_from_slice(&version.minor.to_le_bytes());
    h[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut crc = Crc64::new();
    crc.update(&h[0..24]);
    crc.update(payload);
    h[24..32].copy_from_slice(&crc.finish().to_le_bytes());
    h
}

/// Encodes `state` into the bytes of a state file.
pub fn encode<T: Serialize>(version: FormatVersion, state: &T) -> Result<Vec<u8>, StateFileError> {
    let payload = postcard::to_allocvec(state).map_err(StateFileError::Encode)?;
    let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
    bytes.extend_from_slice(&header(version, &payload));
    bytes.extend_from_slice(&payload);
    Ok(bytes)
}

/// Writes `state` to `path` atomically: into `path` + `.tmp`, synced, then renamed over
/// `path`. Returns the file's length.
pub fn write<T: Serialize>(
    path: &Path,
    version: FormatVersion,
    state: &T,
) -> Result<u64, StateFileError> {
    let bytes = encode(version, state)?;
    let tmp = tmp_path(path);
    let mut file = File::create(&tmp).map_err(|e| StateFileError::io("create", &tmp, e))?;
    file.write_all(&bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| StateFileError::io("write", &tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| StateFileError::io("rename", path, e))?;
    Ok(bytes.len() as u64)
}

/// `path` with `.tmp` appended (where a file is written before it is renamed into place).
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Reads and checks the state file at `path`, which must have `version`'s major version.
pub fn read<T: DeserializeOwned>(path: &Path, version: FormatVersion) -> Result<T, StateFileError> {
    let mut file = File::open(path).map_err(|e| StateFileError::io("open", path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| StateFileError::io("stat", path, e))?
        .len();
    let mut h = [0u8; HEADER_LEN];
    if file_len < HEADER_LEN as u64 {
        // Too short for a header: say "bad magic" if even the magic is wrong, else truncated.
        let mut head = Vec::new();
        file.read_to_end(&mut head)
            .map_err(|e| StateFileError::io("read", path, e))?;
        let n = head.len().min(MAGIC.len());
        if head[..n] != MAGIC[..n] {
            return Err(StateFileError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        return Err(StateFileError::Length {
            path: path.to_path_buf(),
            expected: HEADER_LEN as u64,
            actual: file_len,
        });
    }
    file.read_exact(&mut h)
        .map_err(|e| StateFileError::io("read", path, e))?;
    let payload_len = check_header(path, &h, version, file_len)?;
    // Safe to allocate: check_header capped the length and matched it against the file.
    let mut payload = vec![0u8; payload_len];
    file.read_exact(&mut payload)
        .map_err(|e| StateFileError::io("read", path, e))?;
    decode_payload(path, &h, &payload)
}

/// Decodes a whole state file held in memory (what [`read`] does, for callers that have
/// the bytes).
pub fn decode<T: DeserializeOwned>(
    path: &Path,
    bytes: &[u8],
    version: FormatVersion,
) -> Result<T, StateFileError> {
    let Some((h, payload)) = bytes.split_first_chunk::<HEADER_LEN>() else {
        let n = bytes.len().min(MAGIC.len());
        if bytes[..n] != MAGIC[..n] {
            return Err(StateFileError::BadMagic {
                path: path.to_path_buf(),
            });
        }
        return Err(StateFileError::Length {
            path: path.to_path_buf(),
            expected: HEADER_LEN as u64,
            actual: bytes.len() as u64,
        });
    };
    check_header(path, h, version, bytes.len() as u64)?;
    decode_payload(path, h, payload)
}

/// Checks magic, version, length cap and file length; returns the payload length.
fn check_header(
    path: &Path,
    h: &[u8; HEADER_LEN],
    version: FormatVersion,
    file_len: u64,
) -> Result<usize, StateFileError> {
    let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    let u64_at = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&h[i..i + 8]);
        u64::from_le_bytes(w)
    };
    if h[0..8] != MAGIC {
        return Err(StateFileError::BadMagic {
            path: path.to_path_buf(),
        });
    }
    let found = FormatVersion {
        major: u16_at(8),
        minor: u16_at(10),
    };
    if found.major != version.major {
        return Err(StateFileError::Version {
            path: path.to_path_buf(),
            found,
            supported: version,
        });
    }
    let len = u64_at(16);
    if len > MAX_PAYLOAD_LEN {
        return Err(StateFileError::TooLarge {
            path: path.to_path_buf(),
            len,
        });
    }
    let expected = HEADER_LEN as u64 + len;
    if file_len != expected {
        return Err(StateFileError::Length {
            path: path.to_path_buf(),
            expected,
            actual: file_len,
        });
    }
    // len <= MAX_PAYLOAD_LEN, which fits usize.
    Ok(len as usize)
}

/// Checks the checksum and decodes the payload, which must be used up.
fn decode_payload<T: DeserializeOwned>(
    path: &Path,
    h: &[u8; HEADER_LEN],
    payload: &[u8],
) -> Result<T, StateFileError> {
    let mut w = [0u8; 8];
    w.copy_from_slice(&h[24..32]);
    let expected = u64::from_le_bytes(w);
    let mut crc = Crc64::new();
    crc.update(&h[0..24]);
    crc.update(payload);
    let actual = crc.finish();
    if actual != expected {
        return Err(StateFileError::Checksum {
            path: path.to_path_buf(),
            expected,
            actual,
        });
    }
    let (state, rest) =
        postcard::take_from_bytes(payload).map_err(|source| StateFileError::Decode {
            path: path.to_path_buf(),
            source: Some(source),
        })?;
    if !rest.is_empty() {
        return Err(StateFileError::Decode {
            path: path.to_path_buf(),
            source: None,
        });
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    const V1: FormatVersion = FormatVersion { major: 1, minor: 0 };

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Sample {
        name: String,
        regs: Vec<u64>,
        flag: Option<u32>,
    }

    fn sample() -> Sample {
        Sample {
            name: "vcpu0".into(),
            regs: vec![1, u64::MAX, 0x1234_5678_9abc],
            flag: Some(7),
        }
    }

    fn written(dir: &TempDir) -> (PathBuf, Vec<u8>) {
        let path = dir.as_path().join("state");
        let len = write(&path, V1, &sample()).unwrap();
        let bytes = fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len);
        (path, bytes)
    }

    #[test]
    fn round_trip() {
        let dir = TempDir::new().unwrap();
        let (path, bytes) = written(&dir);
        assert_eq!(&bytes[0..8], b"FNSTATE\0");
        assert_eq!(read::<Sample>(&path, V1).unwrap(), sample());
        // A newer minor version of the same major is read.
        let v1_3 = FormatVersion { major: 1, minor: 3 };
        assert_eq!(read::<Sample>(&path, v1_3).unwrap(), sample());
        assert_eq!(decode::<Sample>(&path, &bytes, V1).unwrap(), sample());
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn missing_file_is_named() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        let err = read::<Sample>(&path, V1).unwrap_err();
        assert!(matches!(err, StateFileError::Missing { .. }), "{err:?}");
        assert!(err.to_string().contains(&path.display().to_string()));
    }

    #[test]
    fn other_major_version_is_rejected_with_the_fix() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        write(&path, FormatVersion { major: 2, minor: 0 }, &sample()).unwrap();
        let err = read::<Sample>(&path, V1).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "snapshot {} was written by format 2, this fnode reads format 1: \
                 re-run 'fnode snapshot'",
                path.display()
            )
        );
    }

    #[test]
    fn every_flipped_bit_is_caught() {
        let dir = TempDir::new().unwrap();
        let (path, bytes) = written(&dir);
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                if let Ok(s) = decode::<Sample>(&path, &b, V1) {
                    panic!("flipping bit {bit} of byte {i} went unnoticed: {s:?}");
                }
            }
        }
        let mut b = bytes.clone();
        *b.last_mut().unwrap() ^= 0x40;
        fs::write(&path, &b).unwrap();
        let err = read::<Sample>(&path, V1).unwrap_err();
        assert!(matches!(err, StateFileError::Checksum { .. }), "{err:?}");
        assert!(err.to_string().contains("corrupt"), "{err}");
    }

    #[test]
    fn truncated_and_extended_files_are_rejected() {
        let dir = TempDir::new().unwrap();
        let (path, bytes) = written(&dir);
        for cut in [0, 5, HEADER_LEN - 1, HEADER_LEN, bytes.len() - 1] {
            fs::write(&path, &bytes[..cut]).unwrap();
            let err = read::<Sample>(&path, V1).unwrap_err();
            assert!(
                matches!(err, StateFileError::Length { .. }),
                "cut at {cut}: {err:?}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        fs::write(&path, &longer).unwrap();
        let err = read::<Sample>(&path, V1).unwrap_err();
        assert!(matches!(err, StateFileError::Length { .. }), "{err:?}");
    }

    #[test]
    fn huge_length_is_refused_before_allocating() {
        let dir = TempDir::new().unwrap();
        let (path, mut bytes) = written(&dir);
        bytes[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        let err = read::<Sample>(&path, V1).unwrap_err();
        assert!(
            matches!(err, StateFileError::TooLarge { len: u64::MAX, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn other_files_are_not_state_files() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        fs::write(&path, b"\x7fELF and more bytes than a header holds, surely").unwrap();
        let err = read::<Sample>(&path, V1).unwrap_err();
        assert!(matches!(err, StateFileError::BadMagic { .. }), "{err:?}");
        fs::write(&path, b"xy").unwrap();
        let err = read::<Sample>(&path, V1).unwrap_err();
        assert!(matches!(err, StateFileError::BadMagic { .. }), "{err:?}");
    }

    #[test]
    fn a_state_of_another_shape_does_not_decode() {
        #[derive(Debug, Serialize, Deserialize)]
        struct Other {
            a: u8,
        }
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("state");
        write(&path, V1, &Other { a: 1 }).unwrap();
        let err = read::<Sample>(&path, V1).unwrap_err();
        assert!(matches!(err, StateFileError::Decode { .. }), "{err:?}");
        // Bytes left over are an error too.
        write(&path, V1, &sample()).unwrap();
        let err = read::<Other>(&path, V1).unwrap_err();
        assert!(matches!(err, StateFileError::Decode { .. }), "{err:?}");
    }
}
