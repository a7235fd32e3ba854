//! The memory file: guest memory byte for byte, sparse.
//!
//! # Format
//! A raw image of guest physical memory: file offset `a` holds guest physical address `a`, and
//! the file is exactly as long as guest memory, so a restore maps it `MAP_PRIVATE` from offset
//! 0 with no header to skip and no copy. Only pages holding a non-zero byte are written; every
//! other page is a hole (the file's length is set first), reads back as zeros, and takes no
//! disk space or page cache until some VM reads it.
//!
//! There is no header in the file: what describes it ([`MemoryFileInfo`]: size, page size,
//! number of data pages and a checksum) lives in the state file, whose own checksum covers it.
//!
//! # Checksum and what is verified when
//! The checksum is CRC-64/XZ over, for each non-zero page in ascending order, the page's index
//! (u64 little-endian) followed by its bytes. Hole pages are not in it, so computing it costs
//! only the pages that hold data.
//! - When a snapshot is taken ([`write()`] then [`verify`]): the whole checksum, by reading the
//!   file back (from the page cache, walking only its data extents). This catches a short
//!   write or a filesystem that lost data before the snapshot is ever used.
//! - When a snapshot is loaded to restore VMs from ([`open_verified`], once per process and
//!   snapshot, not per VM): size, then the whole checksum, on the open file every restore then
//!   maps. A bit flipped on disk or a page lost is an error naming the file, before any guest
//!   runs on it. It reads only the data pages (through the page cache, which the restores'
//!   first touches then find filled).
//! - On every restore: nothing. Restore maps the file the load checked, and the guest faults
//!   in the pages it touches. A file another process changes or truncates after the load is
//!   not seen (and a truncated one makes the host's accesses to the lost pages fail with
//!   SIGBUS): the snapshot directory must stay as `fnode snapshot` left it while it is in use.
//! - On demand ([`verify`]): e.g. when a node receives a snapshot from elsewhere.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checksum::Crc64;
use crate::state_file::tmp_path;

/// The page size of the file: the x86-64 base page.
pub const PAGE_SIZE: u64 = 4096;
const PAGE: usize = PAGE_SIZE as usize;

/// What a user re-runs to replace a snapshot that cannot be used.
const FIX: &str = "re-run 'fnode snapshot'";

/// What describes a memory file; kept in the state file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFileInfo {
    /// Guest memory size in bytes (= the file's length).
    pub size: u64,
    /// The page size the file was written with ([`PAGE_SIZE`]).
    pub page_size: u64,
    /// Number of pages written (holding a non-zero byte).
    pub data_pages: u64,
    /// CRC-64/XZ of the data pages (see the module docs).
    pub checksum: u64,
}

/// Which pages of guest memory [`write()`] looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// Every page (memory backed by a file: its pages may hold data without being resident).
    All,
    /// Only pages resident in this process (`mincore`): right for anonymous memory, whose
    /// never-touched pages are zero. Saves faulting in every untouched page to look at it.
    ResidentOnly,
}

/// Errors writing, opening or verifying a memory file. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// The file does not exist.
    #[error("snapshot memory file {} is missing: {FIX}", path.display())]
    Missing {
        /// The file.
        path: PathBuf,
    },
    /// The file could not be created, read or written.
    #[error("cannot {op} snapshot memory file {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Guest memory is not a whole number of pages.
    #[error("guest memory of {size:#x} bytes is not a whole number of {PAGE_SIZE}-byte pages")]
    BadMemorySize {
        /// The size.
        size: u64,
    },
    /// The state file describes a memory file with another page size.
    #[error("snapshot memory file {} was written with {page_size}-byte pages, this fnode uses \
             {PAGE_SIZE}: {FIX}", path.display())]
    PageSize {
        /// The file.
        path: PathBuf,
        /// The page size in the state file.
        page_size: u64,
    },
    /// The file's length is not the guest memory size the state file records.
    #[error("snapshot memory file {} is {actual} bytes, the snapshot's state says {expected}: \
             the file is truncated or from another snapshot, {FIX}", path.display())]
    WrongSize {
        /// The file.
        path: PathBuf,
        /// The size the state records.
        expected: u64,
        /// The file's length.
        actual: u64,
    },
    /// The data pages do not match the checksum.
    #[error("snapshot memory file {} is corrupt ({found_pages} data pages with checksum \
             {actual:#018x}, expected {expected_pages} with {expected:#018x}): {FIX}",
            path.display())]
    Checksum {
        /// The file.
        path: PathBuf,
        /// Data pages recorded.
        expected_pages: u64,
        /// Data pages found.
        found_pages: u64,
        /// Checksum recorded.
        expected: u64,
        /// Checksum found.
        actual: u64,
    },
}

impl MemoryFileError {
    fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        if source.kind() == io::ErrorKind::NotFound && op == "open" {
            MemoryFileError::Missing {
                path: path.to_path_buf(),
            }
        } else {
            MemoryFileError::Io {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

/// Whether a page holds only zero bytes. An OR over the whole page, without an early exit,
/// so the compiler vectorises it.
fn is_zero(page: &[u8]) -> bool {
    page.iter().fold(0u8, |acc, &b| acc | b) == 0
}

/// Adds page `index` to a memory file checksum.
fn add_page(crc: &mut Crc64, index: u64, page: &[u8]) {
    crc.update(&index.to_le_bytes());
    crc.update(page);
}

/// Writes guest memory `mem` to a sparse memory file at `path` (through `path` + `.tmp`,
/// synced, then renamed) and returns what describes it. `mem` must not change meanwhile (the
/// VM is paused).
pub fn write(path: &Path, mem: &[u8], scan: Scan) -> Result<MemoryFileInfo, MemoryFileError> {
    let size = mem.len() as u64;
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryFileError::BadMemorySize { size });
    }
    let tmp = tmp_path(path);
    let file = File::create(&tmp).map_err(|e| MemoryFileError::io("create", &tmp, e))?;
    file.set_len(size)
        .map_err(|e| MemoryFileError::io("size", &tmp, e))?;

    let resident = match scan {
        Scan::All => None,
        Scan::ResidentOnly => residency(mem),
    };
    let mut crc = Crc64::new();
    let mut data_pages = 0u64;
    // A run of consecutive data pages is written with one pwrite.
    let mut run: Option<usize> = None;
    let flush = |start: usize, end: usize| {
        file.write_all_at(&mem[start * PAGE..end * PAGE], (start * PAGE) as u64)
            .map_err(|e| MemoryFileError::io("write", &tmp, e))
    };
    for (i, page) in mem.chunks_exact(PAGE).enumerate() {
        let untouched = resident.as_ref().is_some_and(|r| r[i] & 1 == 0);
        if untouched || is_zero(page) {
            if let Some(start) = run.take() {
                flush(start, i)?;
            }
            continue;
        }
        add_page(&mut crc, i as u64, page);
        data_pages += 1;
        run.get_or_insert(i);
    }
    if let Some(start) = run {
        flush(start, mem.len() / PAGE)?;
    }
    file.sync_all()
        .map_err(|e| MemoryFileError::io("sync", &tmp, e))?;
    drop(file);
    fs::rename(&tmp, path).map_err(|e| MemoryFileError::io("rename", path, e))?;
    Ok(MemoryFileInfo {
        size,
        page_size: PAGE_SIZE,
        data_pages,
        checksum: crc.finish(),
    })
}

/// One byte per page of `mem`, bit 0 set if the page is resident (`mincore`). `None` when
/// `mincore` cannot say (then every page is looked at).
fn residency(mem: &[u8]) -> Option<Vec<u8>> {
    let addr = mem.as_ptr();
    if mem.is_empty() || !(addr as usize).is_multiple_of(PAGE) {
        return None;
    }
    let mut vec = vec![0u8; mem.len().div_ceil(PAGE)];
    // SAFETY: `addr..addr + len` is the memory `mem` borrows (page-aligned, checked above);
    // mincore only reads the page tables of that range and writes one byte per page into
    // `vec`, which holds exactly that many.
    let r = unsafe { libc::mincore(addr as *mut libc::c_void, mem.len(), vec.as_mut_ptr()) };
    (r == 0).then_some(vec)
}

/// Opens the memory file at `path` for a restore: read-only, checked against `info`'s page
/// size and size (not its contents: see the module docs).
pub fn open(path: &Path, info: &MemoryFileInfo) -> Result<File, MemoryFileError> {
    if info.page_size != PAGE_SIZE {
        return Err(MemoryFileError::PageSize {
            path: path.to_path_buf(),
            page_size: info.page_size,
        });
    }
    let file = File::open(path).map_err(|e| MemoryFileError::io("open", path, e))?;
    let actual = file
        .metadata()
        .map_err(|e| MemoryFileError::io("stat", path, e))?
        .len();
    if actual != info.size {
        return Err(MemoryFileError::WrongSize {
            path: path.to_path_buf(),
            expected: info.size,
            actual,
        });
    }
    Ok(file)
}

/// Reads the memory file at `path` back and checks it against `info`: size, number of data
/// pages and checksum. Only the file's data extents are read.
pub fn verify(path: &Path, info: &MemoryFileInfo) -> Result<(), MemoryFileError> {
    open_verified(path, info).map(drop)
}

/// [`open`] the memory file at `path` for restores, then check its contents as [`verify`]
/// does, on the file returned: what restores map is what was checked.
pub fn open_verified(path: &Path, info: &MemoryFileInfo) -> Result<File, MemoryFileError> {
    let file = open(path, info)?;
    check_contents(&file, path, info)?;
    Ok(file)
}

/// The number of data pages and the checksum of `file` (of `info.size` bytes) against
/// `info`'s.
fn check_contents(file: &File, path: &Path, info: &MemoryFileInfo) -> Result<(), MemoryFileError> {
    let mut crc = Crc64::new();
    let mut found_pages = 0u64;
    // Small enough to come from the heap already mapped: a fresh 1 MiB buffer cost more in
    // page faults than reading a small snapshot's data pages.
    let mut buf = vec![0u8; 64 << 10];
    for (start, end) in
        data_extents(file, info.size).map_err(|e| MemoryFileError::io("seek", path, e))?
    {
        // Extents are page-aligned on every filesystem fnode supports; round outwards anyway.
        let mut off = start / PAGE_SIZE * PAGE_SIZE;
        let end = end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        while off < end {
            let n = (end - off).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], off)
                .map_err(|e| MemoryFileError::io("read", path, e))?;
            for (k, page) in buf[..n].chunks_exact(PAGE).enumerate() {
                if !is_zero(page) {
                    add_page(&mut crc, off / PAGE_SIZE + k as u64, page);
                    found_pages += 1;
                }
            }
            off += n as u64;
        }
    }
    let actual = crc.finish();
    if found_pages != info.data_pages || actual != info.checksum {
        return Err(MemoryFileError::Checksum {
            path: path.to_path_buf(),
            expected_pages: info.data_pages,
            found_pages,
            expected: info.checksum,
            actual,
        });
    }
    Ok(())
}

/// The `[start, end)` byte ranges of `file` (of length `len`) that may hold data, from
/// `SEEK_DATA`/`SEEK_HOLE`; the whole file if the filesystem cannot tell.
fn data_extents(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let seek = |off: u64, whence: libc::c_int| -> io::Result<Option<u64>> {
        let off =
            libc::off_t::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek on a file descriptor this function borrows; it moves only the file
        // offset, which nothing else here uses (reads are positional).
        let r = unsafe { libc::lseek(fd, off, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // No data at or after `off`.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    };
    let mut extents = Vec::new();
    let mut off = 0u64;
    while off < len {
        let start = match seek(off, libc::SEEK_DATA) {
            Ok(Some(s)) => s,
            Ok(None) => break,
            // The filesystem cannot tell holes from data: read everything.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(vec![(0, len)]),
            Err(e) => return Err(e),
        };
        let end = seek(start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        extents.push((start, end));
        off = end;
    }
    Ok(extents)
}

/// A file's apparent length and the bytes it occupies on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskUsage {
    /// `st_size`.
    pub apparent: u64,
    /// `st_blocks * 512`.
    pub on_disk: u64,
}

/// The apparent and on-disk size of the file at `path`.
pub fn disk_usage(path: &Path) -> Result<DiskUsage, MemoryFileError> {
    let m = fs::metadata(path).map_err(|e| MemoryFileError::io("stat", path, e))?;
    Ok(DiskUsage {
        apparent: m.len(),
        on_disk: m.blocks() * 512,
    })
}

/// Opens `path` for writing in place (tests corrupt files with it).
#[doc(hidden)]
pub fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempdir::TempDir;

    use super::*;

    /// 64 pages with data in pages 0, 1, 2, 10 and 63.
    fn memory() -> Vec<u8> {
        let mut m = vec![0u8; 64 * PAGE];
        for (page, byte) in [(0, 1u8), (1, 2), (2, 3), (10, 0xff), (63, 9)] {
            m[page * PAGE + 17] = byte;
        }
        m
    }

    #[test]
    fn writes_only_data_pages_and_verifies() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let mem = memory();
        let info = write(&path, &mem, Scan::All).unwrap();
        assert_eq!(info.size, mem.len() as u64);
        assert_eq!(info.data_pages, 5);
        assert_eq!(fs::read(&path).unwrap(), mem);
        verify(&path, &info).unwrap();
        let usage = disk_usage(&path).unwrap();
        assert_eq!(usage.apparent, mem.len() as u64);
        // Sparse where the filesystem supports holes (tmpfs and ext4 do); never larger.
        assert!(
            usage.on_disk <= usage.apparent + PAGE_SIZE * 16,
            "{usage:?}"
        );
    }

    #[test]
    fn resident_scan_of_anonymous_memory() {
        // A fresh anonymous mapping: only the pages written here are resident.
        let len = 256 * PAGE;
        // SAFETY: a new private anonymous mapping, unmapped at the end of the test.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        // SAFETY: the mapping is `len` bytes, readable and writable, and only used here.
        let mem = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) };
        mem[5 * PAGE] = 1;
        mem[200 * PAGE + 4095] = 2;
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let info = write(&path, mem, Scan::ResidentOnly).unwrap();
        assert_eq!(info.data_pages, 2);
        verify(&path, &info).unwrap();
        let all = write(&path, mem, Scan::All).unwrap();
        assert_eq!(all, info);
        // SAFETY: unmaps the mapping made above; `mem` is not used after this.
        unsafe { libc::munmap(ptr, len) };
    }

    #[test]
    fn open_checks_the_size() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let info = write(&path, &memory(), Scan::All).unwrap();
        open(&path, &info).unwrap();
        let f = open_rw(&path).unwrap();
        f.set_len(info.size - PAGE_SIZE).unwrap();
        let err = open(&path, &info).unwrap_err();
        assert!(
            matches!(err, MemoryFileError::WrongSize { expected, actual, .. }
                if expected == info.size && actual == info.size - PAGE_SIZE),
            "{err:?}"
        );
        assert!(err.to_string().contains(&path.display().to_string()));
        let err = open(&dir.as_path().join("nothing"), &info).unwrap_err();
        assert!(matches!(err, MemoryFileError::Missing { .. }), "{err:?}");
        let bad = MemoryFileInfo {
            page_size: 2 << 20,
            ..info
        };
        assert!(matches!(
            open(&path, &bad),
            Err(MemoryFileError::PageSize { .. })
        ));
    }

    #[test]
    fn verify_catches_changed_lost_and_added_pages() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let info = write(&path, &memory(), Scan::All).unwrap();
        let f = open_rw(&path).unwrap();
        // A changed byte in a data page.
        f.write_all_at(&[0x55], 10 * PAGE_SIZE + 100).unwrap();
        assert!(matches!(
            verify(&path, &info),
            Err(MemoryFileError::Checksum { .. })
        ));
        f.write_all_at(&[0], 10 * PAGE_SIZE + 100).unwrap();
        verify(&path, &info).unwrap();
        // A data page zeroed.
        f.write_all_at(&[0], 63 * PAGE_SIZE + 17).unwrap();
        let err = verify(&path, &info).unwrap_err();
        assert!(
            matches!(
                err,
                MemoryFileError::Checksum {
                    found_pages: 4,
                    expected_pages: 5,
                    ..
                }
            ),
            "{err:?}"
        );
        f.write_all_at(&[9], 63 * PAGE_SIZE + 17).unwrap();
        // Data where a hole was.
        f.write_all_at(&[7], 40 * PAGE_SIZE).unwrap();
        assert!(matches!(
            verify(&path, &info),
            Err(MemoryFileError::Checksum { .. })
        ));
    }

    #[test]
    fn open_verified_returns_the_checked_file_or_names_it() {
        let dir = TempDir::new().unwrap();
        let path = dir.as_path().join("memory");
        let mem = memory();
        let info = write(&path, &mem, Scan::All).unwrap();
        let f = open_verified(&path, &info).unwrap();
        let mut page = vec![0u8; PAGE];
        f.read_exact_at(&mut page, 10 * PAGE_SIZE).unwrap();
        assert_eq!(page, mem[10 * PAGE..11 * PAGE]);
        open_rw(&path)
            .unwrap()
            .write_all_at(&[0x55], 10 * PAGE_SIZE + 100)
            .unwrap();
        let err = open_verified(&path, &info).unwrap_err();
        assert!(matches!(err, MemoryFileError::Checksum { .. }), "{err:?}");
        assert!(
            err.to_string().contains(&path.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn memory_of_a_partial_page_is_refused() {
        let dir = TempDir::new().unwrap();
        let err = write(&dir.as_path().join("m"), &[0u8; 100], Scan::All).unwrap_err();
        assert!(matches!(err, MemoryFileError::BadMemorySize { size: 100 }));
    }
}
