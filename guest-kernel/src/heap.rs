//! The kernel heap behind `alloc`.
//!
//! The heap is the RAM from the end of the kernel image to the end of the memory map range
//! that holds the image, and below [`USER_START`] (memory above it belongs to user-mode
//! functions). The allocator is
//! `linked_list_allocator`: first fit, frees coalesce, and `init` writes only a header at the
//! bottom, so pages the kernel never allocates are never touched (a snapshot stores only pages
//! the guest touched).

use core::ops::Range;

use fnode_guest::abi::{layout::PAGE_SIZE, user::USER_START};

use crate::pvh::MemoryMap;

const _: () = assert!(USER_START <= fnode_guest::abi::layout::IDENTITY_MAP_END);

/// The smallest heap the kernel boots with.
pub const HEAP_MIN: u64 = 1 << 20;

/// Errors in choosing the heap.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeapError {
    /// The memory map has no RAM where the image ends.
    #[error(
        "the memory map has no RAM at the kernel image's end ({0:#x}): check the VMM's memory map"
    )]
    NoRam(u64),
    /// Too little RAM after the image.
    #[error("only {0} KiB of RAM after the kernel image: give the guest more memory")]
    TooSmall(u64),
}

/// The heap's physical (= virtual) range, page-aligned, for an image ending at `image_end`.
pub fn region(map: &MemoryMap, image_end: u64) -> Result<Range<u64>, HeapError> {
    let ram = map
        .ram_containing(image_end)
        .ok_or(HeapError::NoRam(image_end))?;
    let start = image_end.next_multiple_of(PAGE_SIZE);
    let end = ram.end().min(USER_START) & !(PAGE_SIZE - 1);
    let size = end.saturating_sub(start);
    if size < HEAP_MIN {
        return Err(HeapError::TooSmall(size >> 10));
    }
    Ok(start..end)
}

#[cfg(target_os = "none")]
pub use imp::init;

#[cfg(target_os = "none")]
mod imp {
    use core::ops::Range;

    use linked_list_allocator::LockedHeap;

    #[global_allocator]
    static ALLOCATOR: LockedHeap = LockedHeap::empty();

    /// Hands `region` to the global allocator.
    ///
    /// # Safety
    /// `region` must be identity-mapped RAM that nothing else uses, and `init` must be called
    /// once, before the first allocation.
    pub unsafe fn init(region: Range<u64>) {
        let size = (region.end - region.start) as usize;
        // SAFETY: the caller hands over `region` for the allocator's sole use.
        unsafe { ALLOCATOR.lock().init(region.start as *mut u8, size) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pvh::{MemmapEntry, E820_RAM};

    fn map(entries: &[(u64, u64)]) -> MemoryMap {
        let e: Vec<MemmapEntry> = entries
            .iter()
            .map(|&(addr, size)| MemmapEntry {
                addr,
                size,
                kind: E820_RAM,
                reserved: 0,
            })
            .collect();
        MemoryMap::new(Vec::leak(e))
    }

    #[test]
    fn heap_runs_from_the_image_to_the_end_of_its_ram() {
        let m = map(&[(0, 0x9_fc00), (0x10_0000, 0xf0_0000)]);
        assert_eq!(region(&m, 0x12_3456), Ok(0x12_4000..0x100_0000));
    }

    #[test]
    fn heap_stays_below_user_memory() {
        let m = map(&[(0x10_0000, 1 << 40)]);
        assert_eq!(region(&m, 0x20_0000), Ok(0x20_0000..USER_START));
    }

    #[test]
    fn rejects_missing_or_small_ram() {
        let m = map(&[(0, 0x9_fc00)]);
        assert_eq!(region(&m, 0x20_0000), Err(HeapError::NoRam(0x20_0000)));
        let m = map(&[(0x10_0000, 0x18_0000)]);
        assert_eq!(region(&m, 0x20_0000), Err(HeapError::TooSmall(512)));
    }
}
