//! Guest memory: one region of guest physical memory starting at address 0.
//!
//! A cold boot backs it with anonymous memory; a snapshot restore maps the snapshot's memory
//! file `MAP_PRIVATE`, so every VM of a function shares the page cache and pays only for the
//! pages it writes. Both go through [`create`], the only place guest memory is mapped.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionError;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

/// Guest memory as the rest of the VMM sees it.
pub type GuestMemory = GuestMemoryMmap<()>;

/// Guest physical address (re-exported so callers need not name `vm_memory`).
pub use vm_memory::GuestAddress as GuestAddr;

/// What backs guest memory.
#[derive(Debug)]
pub enum MemoryBacking {
    /// Fresh zeroed anonymous memory (a cold boot).
    Anonymous,
    /// A file mapped copy-on-write from offset 0; the guest's writes never reach the file.
    PrivateFile(File),
    /// The same, from a file shared with other mappings (a loaded snapshot's memory file,
    /// opened once and mapped by every VM restored from it).
    SharedFile(Arc<File>),
}

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The size is zero or not a multiple of the page size.
    #[error("guest memory size {0:#x} is not a non-zero multiple of the 4 KiB page size")]
    BadSize(usize),
    /// mmap failed (or the file is shorter than the memory).
    #[error("cannot map {size:#x} bytes of guest memory")]
    Map {
        /// Requested size.
        size: usize,
        /// What went wrong.
        #[source]
        source: MmapRegionError,
    },
    /// The backing file is shorter than guest memory (touching the missing part would SIGBUS).
    #[error("memory file holds {file_len:#x} bytes, guest memory needs {size:#x}")]
    FileTooSmall {
        /// Length of the file.
        file_len: u64,
        /// Requested size.
        size: usize,
    },
    /// The backing file's length cannot be read.
    #[error("cannot read the memory file's length")]
    FileLen(#[source] std::io::Error),
    /// The region could not be placed in guest physical address space.
    #[error("guest memory region does not fit in the guest physical address space")]
    Region,
    /// `/proc/self/pagemap` could not be read.
    #[error("cannot read /proc/self/pagemap (is /proc mounted?)")]
    PageMap(#[source] io::Error),
    /// Pages to populate lie outside guest memory.
    #[error("guest pages {first}..{end} lie outside guest memory")]
    OutOfRange {
        /// First page.
        first: u64,
        /// One past the last page.
        end: u64,
    },
    /// `madvise(MADV_POPULATE_READ)` failed.
    #[error("cannot populate guest memory (MADV_POPULATE_READ, Linux 5.14 or later)")]
    Populate(#[source] io::Error),
}

/// Guest page size (the host's on x86-64).
const PAGE: u64 = fnode_guest::abi::layout::PAGE_SIZE;
/// A `/proc/self/pagemap` entry: the page is in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// A `/proc/self/pagemap` entry: the page is swapped out.
const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap entries read at once (64 KiB of entries, 32 MiB of guest memory).
const PAGEMAP_CHUNK: u64 = 8192;

/// The guest page frames of `mem` that this process has mapped (`/proc/self/pagemap`):
/// those the guest or the VMM touched since the mapping was made, read or written.
pub fn touched_pages(mem: &GuestMemory) -> Result<Vec<u64>, MemoryError> {
    let pagemap = File::open("/proc/self/pagemap").map_err(MemoryError::PageMap)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; (PAGEMAP_CHUNK * 8) as usize];
    for region in mem.iter() {
        let host_first = region.as_ptr() as u64 / PAGE;
        let guest_first = region.start_addr().raw_value() / PAGE;
        let pages = region.len() / PAGE;
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(PAGEMAP_CHUNK);
            let chunk = &mut buf[..(n * 8) as usize];
            pagemap
                .read_exact_at(chunk, (host_first + done) * 8)
                .map_err(MemoryError::PageMap)?;
            for (i, e) in chunk.chunks_exact(8).enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(e);
                if u64::from_le_bytes(w) & (PM_PRESENT | PM_SWAPPED) != 0 {
                    out.push(guest_first + done + i as u64);
                }
            }
            done += n;
        }
    }
    Ok(out)
}

/// Has the host map the guest pages of `runs` (`(first page, count)`) now
/// (`MADV_POPULATE_READ`): the guest's first access to one then finds it mapped in the
/// process (for a snapshot's `MAP_PRIVATE` file mapping, the page cache page, shared with
/// every VM of the snapshot; a write still makes the VM's private copy).
pub fn populate(mem: &GuestMemory, runs: &[(u32, u32)]) -> Result<(), MemoryError> {
    for &(first, count) in runs {
        let (first, end) = (u64::from(first), u64::from(first) + u64::from(count));
        let out = MemoryError::OutOfRange { first, end };
        let addr = GuestAddress(first * PAGE);
        let len = (end - first) * PAGE;
        let host = mem
            .get_host_address(addr)
            .map_err(|_| MemoryError::OutOfRange { first, end })?;
        // The whole run must lie in the one region that holds its start.
        let region = mem.find_region(addr).ok_or(out)?;
        if region
            .start_addr()
            .raw_value()
            .checked_add(region.len())
            .is_none_or(|r_end| addr.raw_value() + len > r_end)
        {
            return Err(MemoryError::OutOfRange { first, end });
        }
        // SAFETY: [host, host + len) lies inside one live mapping of guest memory (checked
        // above), which `mem` keeps mapped during the call; MADV_POPULATE_READ only faults
        // pages in and changes no byte of them.
        let r = unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_POPULATE_READ) };
        if r != 0 {
            return Err(MemoryError::Populate(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Maps `size` bytes of guest memory at guest physical address 0.
pub fn create(size: usize, backing: MemoryBacking) -> Result<GuestMemory, MemoryError> {
    // Page size is fixed by x86-64 and the abi; checked here so KVM never sees a bad slot.
    const PAGE: usize = fnode_guest::abi::layout::PAGE_SIZE as usize;
    if size == 0 || size & (PAGE - 1) != 0 {
        return Err(MemoryError::BadSize(size));
    }
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    // MAP_NORESERVE: the host commits only the pages the guest touches.
    let (file_offset, flags) = match backing {
        MemoryBacking::Anonymous => (
            None,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        ),
        MemoryBacking::PrivateFile(file) => (
            Some(file_offset(Arc::new(file), size)?),
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        ),
        MemoryBacking::SharedFile(file) => (
            Some(file_offset(file, size)?),
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        ),
    };
    let mapping = MmapRegion::build(file_offset, size, prot, flags)
        .map_err(|source| MemoryError::Map { size, source })?;
    let region = GuestRegionMmap::new(mapping, GuestAddress(0)).ok_or(MemoryError::Region)?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|_| MemoryError::Region)
}

/// Offset 0 of `file`, which must hold at least `size` bytes (touching a page past its end
/// would raise SIGBUS; the length is read at every mapping, as the file may have changed).
fn file_offset(file: Arc<File>, size: usize) -> Result<FileOffset, MemoryError> {
    let file_len = file.metadata().map_err(MemoryError::FileLen)?.len();
    if file_len < size as u64 {
        return Err(MemoryError::FileTooSmall { file_len, size });
    }
    Ok(FileOffset::from_arc(file, 0))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use vm_memory::{Bytes, GuestMemoryBackend};
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    #[test]
    fn anonymous_memory_is_zeroed_and_writable() {
        let mem = create(1 << 20, MemoryBacking::Anonymous).unwrap();
        assert_eq!(mem.last_addr(), GuestAddress((1 << 20) - 1));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(), 0);
        mem.write_obj(0xdead_beef_u64, GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(
            create(0, MemoryBacking::Anonymous),
            Err(MemoryError::BadSize(0))
        ));
        assert!(matches!(
            create(4097, MemoryBacking::Anonymous),
            Err(MemoryError::BadSize(4097))
        ));
    }

    #[test]
    fn private_file_is_copy_on_write() {
        let tmp = TempFile::new().unwrap();
        let mut file = tmp.as_file().try_clone().unwrap();
        let mut page = vec![0u8; 8192];
        page[0x1000] = 0x5a;
        file.write_all(&page).unwrap();
        let mem = create(8192, MemoryBacking::PrivateFile(file)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0x5a);
        mem.write_obj(0xa5u8, GuestAddress(0x1000)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0xa5);
        // The file still holds the original byte.
        let on_disk = std::fs::read(tmp.as_path()).unwrap();
        assert_eq!(on_disk[0x1000], 0x5a);
    }

    #[test]
    fn a_shared_file_backs_independent_copies() {
        let tmp = TempFile::new().unwrap();
        let mut file = tmp.as_file().try_clone().unwrap();
        file.write_all(&[7u8; 8192]).unwrap();
        let shared = Arc::new(file);
        let a = create(8192, MemoryBacking::SharedFile(shared.clone())).unwrap();
        let b = create(8192, MemoryBacking::SharedFile(shared)).unwrap();
        a.write_obj(1u8, GuestAddress(0)).unwrap();
        assert_eq!(a.read_obj::<u8>(GuestAddress(0)).unwrap(), 1);
        assert_eq!(b.read_obj::<u8>(GuestAddress(0)).unwrap(), 7);
    }

    #[test]
    fn touched_pages_and_populate() {
        const PAGES: u64 = 256;
        let tmp = TempFile::new().unwrap();
        let mut file = tmp.as_file().try_clone().unwrap();
        file.write_all(&vec![1u8; (PAGES * 4096) as usize]).unwrap();
        let mem = create((PAGES * 4096) as usize, MemoryBacking::PrivateFile(file)).unwrap();
        assert_eq!(touched_pages(&mem).unwrap(), Vec::<u64>::new());
        mem.write_obj(5u8, GuestAddress(3 * 4096)).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(200 * 4096 + 7)).unwrap(), 1);
        // A read fault maps the cached pages around it too (the kernel's fault-around):
        // the pages touched are in, pages far from them are not.
        let touched = touched_pages(&mem).unwrap();
        assert!(
            touched.contains(&3) && touched.contains(&200),
            "{touched:?}"
        );
        assert!(!touched.contains(&100), "{touched:?}");
        populate(&mem, &[(100, 2)]).unwrap();
        let touched = touched_pages(&mem).unwrap();
        assert!(
            touched.contains(&100) && touched.contains(&101),
            "{touched:?}"
        );
        // Bytes are as they were.
        assert_eq!(mem.read_obj::<u8>(GuestAddress(100 * 4096)).unwrap(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(3 * 4096)).unwrap(), 5);
        assert!(matches!(
            populate(&mem, &[(255, 2)]),
            Err(MemoryError::OutOfRange {
                first: 255,
                end: 257
            })
        ));
    }

    #[test]
    fn private_file_shorter_than_memory_is_an_error() {
        let tmp = TempFile::new().unwrap();
        let file = tmp.as_file().try_clone().unwrap();
        let err = create(8192, MemoryBacking::PrivateFile(file)).unwrap_err();
        assert!(
            matches!(err, MemoryError::FileTooSmall { file_len: 0, .. }),
            "{err:?}"
        );
    }
}
