//! The function's heap allocator, over the memory the kernel hands over in
//! [`UserStart`](crate::abi::user::UserStart).
//!
//! Power-of-two size classes (16 bytes and up), each with a LIFO free list, carved from the
//! heap by a bump pointer. Why this shape: it is a few instructions per call, it reuses the
//! most recently freed (still cached, already touched) memory first, which keeps the pages a
//! restored VM dirties few, and a `Vec` that grows at the end of the heap grows in place.
//! The cost is up to half of a block unused; address space is plentiful (the heap is the
//! rest of RAM) and untouched memory costs nothing.
//!
//! Blocks are aligned to their size, up to a page. Freed blocks are never merged or split.
//! Function code is single-threaded and never interrupted, so there is no locking.

use core::{
    alloc::{GlobalAlloc, Layout},
    cell::UnsafeCell,
    ptr,
};

/// Smallest block: 16 bytes (room for the free-list link, and `max_align_t`).
const MIN_SHIFT: u32 = 4;
/// One free list per power of two from `1 << MIN_SHIFT` to `1 << 63`.
const CLASSES: usize = (usize::BITS - MIN_SHIFT) as usize;
/// Blocks are aligned to their size up to this; larger alignments are served by the bump
/// pointer only.
const MAX_NATURAL_ALIGN: usize = 4096;

/// A size-class heap over one region of memory.
#[derive(Debug)]
pub struct Heap {
    next: usize,
    end: usize,
    free: [usize; CLASSES],
}

impl Heap {
    /// A heap with no memory: every allocation fails until [`Heap::init`].
    pub const fn empty() -> Self {
        Heap {
            next: 0,
            end: 0,
            free: [0; CLASSES],
        }
    }

    /// Hands the heap the region `[start, start + len)`.
    ///
    /// # Safety
    /// The region is valid, writable memory that nothing else uses for as long as the heap
    /// lives; `init` is called once.
    pub unsafe fn init(&mut self, start: usize, len: usize) {
        self.next = start;
        self.end = start.saturating_add(len);
    }

    /// Bytes never handed out yet (the bump pointer's remainder).
    pub fn untouched(&self) -> usize {
        self.end - self.next
    }

    /// The block size and class for `layout`, or `None` if no block can be that large.
    fn class(layout: Layout) -> Option<(usize, usize)> {
        let size = layout
            .size()
            .max(layout.align())
            .max(1 << MIN_SHIFT)
            .checked_next_power_of_two()?;
        Some((size, (size.trailing_zeros() - MIN_SHIFT) as usize))
    }

    /// Allocates a block for `layout`; null if the heap is exhausted.
    ///
    /// # Safety
    /// The heap was initialised (or is empty); the caller follows `GlobalAlloc::alloc`'s rules.
    pub unsafe fn alloc(&mut self, layout: Layout) -> *mut u8 {
        let Some((size, class)) = Self::class(layout) else {
            return ptr::null_mut();
        };
        let head = self.free[class];
        if head != 0 && layout.align() <= MAX_NATURAL_ALIGN {
            // SAFETY: `head` is a freed block of this class, which holds the next link.
            self.free[class] = unsafe { (head as *const usize).read() };
            return head as *mut u8;
        }
        self.bump(size, layout.align())
    }

    /// Carves a new block of `size` bytes from the untouched part of the heap.
    fn bump(&mut self, size: usize, align: usize) -> *mut u8 {
        let align = align.max(size.min(MAX_NATURAL_ALIGN));
        let Some(start) = self.next.checked_next_multiple_of(align) else {
            return ptr::null_mut();
        };
        match start.checked_add(size) {
            Some(end) if end <= self.end => {
                self.next = end;
                start as *mut u8
            }
            _ => ptr::null_mut(),
        }
    }

    /// Returns a block to its class's free list.
    ///
    /// # Safety
    /// `ptr` came from this heap with this `layout` and is not used again.
    pub unsafe fn dealloc(&mut self, ptr: *mut u8, layout: Layout) {
        let Some((_, class)) = Self::class(layout) else {
            return;
        };
        // SAFETY: the block is at least 16 bytes, aligned to 16, and ours again.
        unsafe { (ptr as *mut usize).write(self.free[class]) };
        self.free[class] = ptr as usize;
    }

    /// Resizes a block: in place if the size class stays or the block is the last one carved,
    /// else by copying.
    ///
    /// # Safety
    /// As `GlobalAlloc::realloc`.
    pub unsafe fn realloc(&mut self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return ptr::null_mut();
        };
        let (Some((old, old_class)), Some((new, new_class))) =
            (Self::class(layout), Self::class(new_layout))
        else {
            return ptr::null_mut();
        };
        if old_class == new_class {
            return ptr;
        }
        let addr = ptr as usize;
        let last = addr + old == self.next;
        if last && addr.is_multiple_of(new.min(MAX_NATURAL_ALIGN)) && new <= self.end - addr {
            self.next = addr + new;
            return ptr;
        }
        // SAFETY: as `alloc`.
        let moved = unsafe { self.alloc(new_layout) };
        if !moved.is_null() {
            // SAFETY: both blocks are live, distinct, and at least this long.
            unsafe { ptr::copy_nonoverlapping(ptr, moved, layout.size().min(new_size)) };
            // SAFETY: the caller gave up `ptr` by calling realloc.
            unsafe { self.dealloc(ptr, layout) };
        }
        moved
    }
}

/// The function's global allocator; [`entry!`](crate::entry) installs it.
#[derive(Debug)]
pub struct Allocator;

struct HeapCell(UnsafeCell<Heap>);

// SAFETY: function code runs on one CPU, in user mode with interrupts off, and no allocator
// call re-enters another: there is never concurrent access.
unsafe impl Sync for HeapCell {}

static HEAP: HeapCell = HeapCell(UnsafeCell::new(Heap::empty()));

/// Hands the global allocator its memory.
///
/// # Safety
/// As [`Heap::init`]; called once, before the first allocation.
pub unsafe fn init(start: usize, len: usize) {
    // SAFETY: single-threaded (see HeapCell); the caller guarantees the region.
    unsafe { (*HEAP.0.get()).init(start, len) }
}

// SAFETY: the methods forward to `Heap`, which hands out disjoint blocks of its region.
unsafe impl GlobalAlloc for Allocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: single-threaded (see HeapCell); GlobalAlloc's contract is the caller's.
        unsafe { (*HEAP.0.get()).alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as alloc.
        unsafe { (*HEAP.0.get()).dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as alloc.
        unsafe { (*HEAP.0.get()).realloc(ptr, layout, new_size) }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    /// A heap over a leaked, page-aligned buffer.
    fn heap(len: usize) -> (Heap, usize) {
        let buf = vec![0u8; len + 4096].leak();
        let start = (buf.as_mut_ptr() as usize).next_multiple_of(4096);
        let mut h = Heap::empty();
        // SAFETY: the leaked buffer is ours forever.
        unsafe { h.init(start, len) };
        (h, start)
    }

    fn lay(size: usize, align: usize) -> Layout {
        Layout::from_size_align(size, align).unwrap()
    }

    #[test]
    fn blocks_are_aligned_disjoint_and_reused() {
        let (mut h, start) = heap(1 << 20);
        let mut blocks = Vec::new();
        for (size, align) in [(1, 1), (24, 8), (100, 4), (4096, 4096), (5000, 8), (64, 64)] {
            // SAFETY: the heap is initialised; each block is written within its size.
            let p = unsafe { h.alloc(lay(size, align)) };
            assert!(!p.is_null());
            assert_eq!(p as usize % align, 0);
            assert!(p as usize >= start && p as usize + size <= start + (1 << 20));
            // SAFETY: the block is `size` bytes long.
            unsafe { ptr::write_bytes(p, 0xa5, size) };
            blocks.push((p as usize, size));
        }
        blocks.sort();
        for w in blocks.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0, "blocks overlap: {w:?}");
        }
        // SAFETY: allocated above with this layout.
        let a = unsafe { h.alloc(lay(24, 8)) };
        // SAFETY: a came from this heap with this layout.
        unsafe { h.dealloc(a, lay(24, 8)) };
        // Same class (32 bytes): the freed block comes back first.
        // SAFETY: the heap is initialised.
        assert_eq!(unsafe { h.alloc(lay(30, 2)) }, a);
    }

    #[test]
    fn exhaustion_returns_null() {
        let (mut h, _) = heap(4096);
        // SAFETY: the heap is initialised.
        unsafe {
            assert!(!h.alloc(lay(4096, 1)).is_null());
            assert!(h.alloc(lay(16, 1)).is_null());
            assert!(h.alloc(lay(isize::MAX as usize - 8, 1)).is_null());
        }
        assert_eq!(h.untouched(), 0);
        let mut empty = Heap::empty();
        // SAFETY: an empty heap only returns null.
        assert!(unsafe { empty.alloc(lay(8, 8)) }.is_null());
    }

    #[test]
    fn realloc_grows_the_last_block_in_place_and_moves_others() {
        let (mut h, _) = heap(1 << 20);
        // SAFETY: the heap is initialised; blocks are used within their sizes.
        unsafe {
            let a = h.alloc(lay(4096, 8));
            ptr::write_bytes(a, 7, 4096);
            let grown = h.realloc(a, lay(4096, 8), 16384);
            assert_eq!(grown, a, "the last block grows in place");
            let b = h.alloc(lay(16, 8));
            let moved = h.realloc(grown, lay(16384, 8), 40000);
            assert_ne!(moved, grown);
            assert_eq!(*moved, 7);
            assert_eq!(*moved.add(4095), 7);
            // Shrinking within a class keeps the block.
            assert_eq!(h.realloc(b, lay(16, 8), 10), b);
        }
    }

    #[test]
    fn large_alignments_come_from_the_bump_pointer() {
        let (mut h, _) = heap(1 << 20);
        // SAFETY: the heap is initialised.
        unsafe {
            let p = h.alloc(lay(8192, 8192));
            assert_eq!(p as usize % 8192, 0);
            h.dealloc(p, lay(8192, 8192));
            let q = h.alloc(lay(8192, 16384));
            assert_eq!(q as usize % 16384, 0);
            // The freed 8 KiB block serves a page-aligned request of its class.
            assert_eq!(h.alloc(lay(8000, 4096)), p);
        }
    }
}
