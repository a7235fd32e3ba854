//! Guest memory: one region of guest physical memory starting at address 0.
//!
//! A cold boot backs it with anonymous memory; a snapshot restore maps the snapshot's memory
//! file `MAP_PRIVATE`, so every VM of a function shares the page cache and pays only for the
//! pages it writes. Both go through [`create`], the only place guest memory is mapped.

use std::fs::File;

use vm_memory::mmap::MmapRegionError;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

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
        MemoryBacking::PrivateFile(file) => {
            let file_len = file.metadata().map_err(MemoryError::FileLen)?.len();
            if file_len < size as u64 {
                return Err(MemoryError::FileTooSmall { file_len, size });
            }
            (
                Some(FileOffset::new(file, 0)),
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
        }
    };
    let mapping = MmapRegion::build(file_offset, size, prot, flags)
        .map_err(|source| MemoryError::Map { size, source })?;
    let region = GuestRegionMmap::new(mapping, GuestAddress(0)).ok_or(MemoryError::Region)?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|_| MemoryError::Region)
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
