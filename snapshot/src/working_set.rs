//! The working-set file: the guest pages a restored VM touched while it served one
//! invocation, recorded once, so that later restores of the snapshot can have the host map
//! those pages before the guest asks for them (prefetch).
//!
//! It is optional: a snapshot without one restores without a prefetch. It only ever changes
//! how fast a restore is, never what the guest sees (the pages come from the same memory
//! file either way). A file that is present but unreadable (truncated, corrupt, of another
//! format version, or naming pages beyond guest memory) is an error that names it and the
//! fix: a damaged file in a snapshot directory means the directory is not what was written.
//!
//! # Format (all integers little-endian)
//! ```text
//! offset  size  field
//!      0     8  magic        b"FNWSET\0\0"
//!      8     4  version      VERSION; a reader rejects any other
//!     12     4  run count    at most MAX_RUNS
//!     16   8*n  runs         (first page u32, page count u32), sorted, disjoint, non-empty
//!  16+8n     8  checksum     CRC-64/XZ of every byte before it
//! ```
//! Pages are guest page frame numbers (guest physical address / [`PAGE_SIZE`]).

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::checksum::crc64;
use crate::memory_file::PAGE_SIZE;

/// First bytes of every working-set file.
pub const MAGIC: [u8; 8] = *b"FNWSET\0\0";
/// The format version this fnode writes and reads.
pub const VERSION: u32 = 1;
/// Most runs a file may hold (checked before allocating): a restored function VM touches a
/// few hundred pages at most in a handful of runs.
pub const MAX_RUNS: u32 = 1 << 16;
const HEADER_LEN: usize = 16;
const RUN_LEN: usize = 8;
const CHECKSUM_LEN: usize = 8;

/// What a user does about a working-set file that cannot be used.
const FIX: &str = "delete it (restores then skip the prefetch) or re-record it";

/// Errors reading or writing a working-set file. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// The file could not be read or written.
    #[error("cannot {op} the working-set file {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is not a working-set file, is damaged, or is of another version.
    #[error("the working-set file {} is unusable ({what}): {FIX}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// Guest pages as sorted, disjoint runs `(first page, page count)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkingSet {
    runs: Vec<(u32, u32)>,
}

impl WorkingSet {
    /// The set of `pages` (guest page frame numbers, in any order, duplicates allowed);
    /// pages beyond `u32::MAX` are left out (no fnode guest has that much memory), and so are
    /// the runs past the first [`MAX_RUNS`]: a guest that touched scattered pages must not
    /// make a file that [`read`] refuses (the set is only a prefetch hint, so fewer pages is
    /// never wrong).
    pub fn from_pages(pages: &[u64]) -> Self {
        let mut sorted: Vec<u32> = pages
            .iter()
            .filter_map(|&p| u32::try_from(p).ok())
            .collect();
        sorted.sort_unstable();
        sorted.dedup();
        let mut runs: Vec<(u32, u32)> = Vec::new();
        for p in sorted {
            let full = runs.len() >= MAX_RUNS as usize;
            match runs.last_mut() {
                Some((first, count)) if u64::from(*first) + u64::from(*count) == u64::from(p) => {
                    *count += 1;
                }
                _ if full => break,
                _ => runs.push((p, 1)),
            }
        }
        WorkingSet { runs }
    }

    /// The runs, sorted and disjoint.
    pub fn runs(&self) -> &[(u32, u32)] {
        &self.runs
    }

    /// Pages in the set.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|&(_, n)| u64::from(n)).sum()
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + self.runs.len() * RUN_LEN + CHECKSUM_LEN);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(self.runs.len() as u32).to_le_bytes());
        for &(first, count) in &self.runs {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        let crc = crc64(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes and checks `bytes` (from `path`, for errors): every page must lie below
    /// `memory_pages`.
    pub fn decode(path: &Path, bytes: &[u8], memory_pages: u64) -> Result<Self, WorkingSetError> {
        let bad = |what: String| WorkingSetError::Corrupt {
            path: path.to_path_buf(),
            what,
        };
        let u32_at = |at: usize| {
            let mut w = [0u8; 4];
            w.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(w)
        };
        if bytes.len() < HEADER_LEN + CHECKSUM_LEN || bytes[..8] != MAGIC {
            return Err(bad("not a working-set file".into()));
        }
        let version = u32_at(8);
        if version != VERSION {
            return Err(bad(format!(
                "format version {version}, this fnode reads version {VERSION}"
            )));
        }
        let count = u32_at(12);
        if count > MAX_RUNS {
            return Err(bad(format!("{count} runs, at most {MAX_RUNS}")));
        }
        let expected = HEADER_LEN + count as usize * RUN_LEN + CHECKSUM_LEN;
        if bytes.len() != expected {
            return Err(bad(format!(
                "{} bytes, {count} runs make {expected}",
                bytes.len()
            )));
        }
        let body = expected - CHECKSUM_LEN;
        let mut stored = [0u8; 8];
        stored.copy_from_slice(&bytes[body..]);
        if u64::from_le_bytes(stored) != crc64(&bytes[..body]) {
            return Err(bad("checksum mismatch".into()));
        }
        let mut runs = Vec::with_capacity(count as usize);
        let mut end = 0u64;
        for i in 0..count as usize {
            let first = u32_at(HEADER_LEN + i * RUN_LEN);
            let n = u32_at(HEADER_LEN + i * RUN_LEN + 4);
            let (start, stop) = (u64::from(first), u64::from(first) + u64::from(n));
            if n == 0 || start < end || stop > memory_pages {
                return Err(bad(format!(
                    "run {i} (pages {start}..{stop}) is empty, out of order or beyond the \
                     {memory_pages} pages of guest memory"
                )));
            }
            end = stop;
            runs.push((first, n));
        }
        Ok(WorkingSet { runs })
    }
}

/// Writes `set` to `path` (under a temporary name, then renamed into place).
pub fn write(path: &Path, set: &WorkingSet) -> Result<(), WorkingSetError> {
    let io = |op, source| WorkingSetError::Io {
        op,
        path: path.to_path_buf(),
        source,
    };
    let tmp = crate::state_file::tmp_path(path);
    let mut f = File::create(&tmp).map_err(|e| io("create", e))?;
    f.write_all(&set.encode()).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("sync", e))?;
    fs::rename(&tmp, path).map_err(|e| io("rename", e))
}

/// Reads the working-set file at `path` for a guest of `memory_bytes`: `None` if there is
/// none.
pub fn read(path: &Path, memory_bytes: u64) -> Result<Option<WorkingSet>, WorkingSetError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(WorkingSetError::Io {
                op: "read",
                path: path.to_path_buf(),
                source,
            })
        }
    };
    WorkingSet::decode(path, &bytes, memory_bytes / PAGE_SIZE).map(Some)
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    #[test]
    fn pages_become_sorted_runs_and_round_trip() {
        let set = WorkingSet::from_pages(&[9, 3, 4, 5, 4, 100, 10, 1 << 40]);
        assert_eq!(set.runs(), &[(3, 3), (9, 2), (100, 1)]);
        assert_eq!(set.pages(), 6);
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("working-set");
        assert_eq!(read(&path, 1 << 20).unwrap(), None);
        write(&path, &set).unwrap();
        assert_eq!(read(&path, 1 << 20).unwrap(), Some(set));
    }

    #[test]
    fn scattered_pages_still_make_a_readable_file() {
        // Every other page: one run each, more than a file may hold.
        let pages: Vec<u64> = (0..u64::from(MAX_RUNS) + 10).map(|i| 2 * i).collect();
        let set = WorkingSet::from_pages(&pages);
        assert_eq!(set.runs().len(), MAX_RUNS as usize);
        assert_eq!(set.runs()[0], (0, 1));
        let path = Path::new("/snap/working-set");
        let back = WorkingSet::decode(path, &set.encode(), 4 * u64::from(MAX_RUNS)).unwrap();
        assert_eq!(back, set);
    }

    #[test]
    fn damaged_files_are_refused_with_the_fix() {
        let path = Path::new("/snap/working-set");
        let good = WorkingSet::from_pages(&[1, 2, 7]).encode();
        let check = |bytes: &[u8], memory_pages: u64, expect: &str| {
            let err = WorkingSet::decode(path, bytes, memory_pages).unwrap_err();
            let msg = err.to_string();
            assert!(msg.contains(expect), "{msg}");
            assert!(
                msg.contains("/snap/working-set") && msg.contains("delete it"),
                "{msg}"
            );
        };
        WorkingSet::decode(path, &good, 8).unwrap();
        check(&good[..10], 8, "not a working-set file");
        check(
            b"FNSTATE\0 and more bytes than a header",
            8,
            "not a working-set",
        );
        let mut flipped = good.clone();
        flipped[17] ^= 1;
        check(&flipped, 8, "checksum");
        check(&good[..good.len() - 1], 8, "bytes");
        // A page beyond guest memory.
        check(&good, 7, "beyond");
        let mut version = good.clone();
        version[8] = 2;
        check(&version, 8, "version 2");
        let mut many = good.clone();
        many[12..16].copy_from_slice(&(MAX_RUNS + 1).to_le_bytes());
        check(&many, 8, "runs, at most");
        // Runs out of order (re-checksummed, so only the order is wrong).
        let mut bytes = good[..HEADER_LEN].to_vec();
        bytes[12..16].copy_from_slice(&2u32.to_le_bytes());
        for (first, n) in [(5u32, 1u32), (1, 1)] {
            bytes.extend_from_slice(&first.to_le_bytes());
            bytes.extend_from_slice(&n.to_le_bytes());
        }
        let crc = crc64(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        check(&bytes, 8, "out of order");
    }
}
