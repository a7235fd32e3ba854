//! Split virtqueues (virtio 1.x, section 2.7) owned by the driver.
//!
//! A [`SplitQueue`] is the driver's half of one queue: it owns the descriptor table and the
//! available ring, reads the used ring the device writes, and validates everything it reads
//! there (the device is not trusted: an index or id out of range is an error, never an
//! out-of-bounds access). Which descriptors form which chain is the device driver's business
//! (see [`super::vsock`]); this module only moves chain heads between the rings.
//!
//! The memory comes from the heap, which the kernel identity-maps: a pointer is the guest
//! physical address the device uses. Nothing here assumes the memory starts zeroed; the queue
//! writes every field the device reads before it enables the queue.

use core::{
    alloc::Layout,
    ptr::{addr_of, addr_of_mut, NonNull},
    sync::atomic::{fence, AtomicU16, Ordering},
};

/// Entries in every queue's memory; a queue may run with a smaller power of two.
pub const MAX_SIZE: u16 = 32;

/// Descriptor flag: the chain continues in `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer (otherwise it reads it).
pub const DESC_F_WRITE: u16 = 2;
/// Available ring flag: the driver does not want interrupts for this queue.
const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used ring flag: the device does not want notifications for this queue.
const USED_F_NO_NOTIFY: u16 = 1;

const N: usize = MAX_SIZE as usize;

/// One descriptor-table entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Descriptor {
    /// Guest physical address of the buffer.
    pub addr: u64,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// `DESC_F_*` flags.
    pub flags: u16,
    /// Next descriptor of the chain, if `flags` has [`DESC_F_NEXT`].
    pub next: u16,
}

/// One used-ring entry: the chain head the device returns and the bytes it wrote.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UsedElem {
    /// The head of the returned chain.
    pub id: u32,
    /// Bytes the device wrote into the chain's writable buffers.
    pub len: u32,
}

#[repr(C)]
struct Avail {
    flags: u16,
    idx: u16,
    ring: [u16; N],
    used_event: u16,
}

#[repr(C, align(4))]
struct Used {
    flags: u16,
    idx: u16,
    ring: [UsedElem; N],
    avail_event: u16,
}

/// A queue's memory, laid out with the alignment virtio 1.x asks for (descriptor table 16,
/// available ring 2, used ring 4). Cache-line aligned, not page-aligned: the three queues of
/// a device then share one page, and a restored guest's first request touches (and
/// copies) fewer pages.
#[repr(C, align(64))]
struct QueueMemory {
    desc: [Descriptor; N],
    avail: Avail,
    used: Used,
}

const _: () = assert!(core::mem::size_of::<QueueMemory>() <= 4096);
const _: () = assert!(MAX_SIZE.is_power_of_two());

/// Errors of a queue: the device broke the used-ring protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// The used index moved past what the driver made available.
    #[error("virtqueue {queue}: the device returned {returned} chains, but only {in_flight} were in flight")]
    Overrun {
        /// The queue index.
        queue: u16,
        /// How many entries the device's used index claims.
        returned: u16,
        /// How many chains the driver had handed over.
        in_flight: u16,
    },
    /// The heap has no page for the queue.
    #[error("virtqueue {0}: out of memory for its rings")]
    NoMemory(u16),
}

/// The driver's half of one split virtqueue.
#[derive(Debug)]
pub struct SplitQueue {
    mem: NonNull<QueueMemory>,
    /// The queue's index on its device (for messages and notifications).
    index: u16,
    /// Entries in use: a power of two, at most [`MAX_SIZE`].
    size: u16,
    /// The driver's available index: the next ring slot to fill.
    avail_idx: u16,
    /// The used index up to which the driver has consumed the used ring.
    last_used: u16,
    /// Chains made available and not yet returned.
    in_flight: u16,
    /// The available index as last published.
    published: u16,
    /// `VIRTIO_F_EVENT_IDX` was negotiated: notifications and interrupts are asked for with
    /// `avail_event`/`used_event` instead of the rings' flags.
    event_idx: bool,
    /// What says whether the device wants a notification after a publish: `avail_event`
    /// with event indices, else the used ring's flags (inside the queue memory).
    notify_check: *const u16,
}

impl SplitQueue {
    /// Allocates the memory of queue `index` and initialises the rings (empty, interrupts
    /// on). `size` is rounded down to a power of two and capped at [`MAX_SIZE`].
    pub fn new(index: u16, size: u16) -> Result<Self, QueueError> {
        let layout = Layout::new::<QueueMemory>();
        // SAFETY: the layout has a non-zero size. The memory is never freed: a device may
        // keep using a queue until it is reset, and fnode never resets its devices.
        let raw = unsafe { alloc::alloc::alloc(layout) }.cast::<QueueMemory>();
        let mem = NonNull::new(raw).ok_or(QueueError::NoMemory(index))?;
        let size = prev_power_of_two(size.min(MAX_SIZE));
        let q = SplitQueue {
            mem,
            index,
            size,
            avail_idx: 0,
            last_used: 0,
            in_flight: 0,
            published: 0,
            event_idx: false,
            // SAFETY: only the address is computed.
            notify_check: unsafe { addr_of!((*mem.as_ptr()).used.flags) },
        };
        // SAFETY: `mem` is a fresh allocation of the right layout, which nothing else uses
        // yet; the event fields lie inside it (`size <= N`).
        unsafe {
            let m = q.mem.as_ptr();
            addr_of_mut!((*m).avail.flags).write(0);
            addr_of_mut!((*m).avail.idx).write(0);
            addr_of_mut!((*m).used.flags).write(0);
            addr_of_mut!((*m).used.idx).write(0);
            q.used_event_ptr().write(0);
            q.avail_event_ptr().write(0);
        }
        Ok(q)
    }

    /// Switches to `VIRTIO_F_EVENT_IDX` notification suppression (after negotiating it).
    pub fn set_event_idx(&mut self, on: bool) {
        self.event_idx = on;
        self.notify_check = if on {
            self.avail_event_ptr().cast_const()
        } else {
            // SAFETY: only the address is computed.
            unsafe { addr_of!((*self.mem.as_ptr()).used.flags) }
        };
    }

    /// `used_event`: the avail ring's trailing field (after `size` entries).
    fn used_event_ptr(&self) -> *mut u16 {
        let m = self.mem.as_ptr();
        // SAFETY: `size <= N`, so the field lies inside the ring (in `ring` or `used_event`);
        // only the address is computed.
        unsafe {
            addr_of_mut!((*m).avail.ring)
                .cast::<u16>()
                .add(usize::from(self.size))
        }
    }

    /// `avail_event`: the used ring's trailing field (after `size` entries).
    fn avail_event_ptr(&self) -> *mut u16 {
        let m = self.mem.as_ptr();
        // SAFETY: as in `used_event_ptr`.
        unsafe {
            addr_of_mut!((*m).used.ring)
                .cast::<UsedElem>()
                .add(usize::from(self.size))
                .cast::<u16>()
        }
    }

    /// The number of entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest physical addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        let m = self.mem.as_ptr();
        // SAFETY: only addresses are taken, nothing is read.
        unsafe {
            (
                super::dma_addr(addr_of!((*m).desc)),
                super::dma_addr(addr_of!((*m).avail)),
                super::dma_addr(addr_of!((*m).used)),
            )
        }
    }

    /// Writes descriptor `i` (taken modulo the size): two 8-byte stores.
    #[inline(always)]
    pub fn set_desc(&mut self, i: u16, desc: Descriptor) {
        let i = usize::from(i & (self.size - 1));
        let meta = u64::from(desc.len) | u64::from(desc.flags) << 32 | u64::from(desc.next) << 48;
        // SAFETY: `i < size <= N`: inside the table (8-aligned, 16 bytes per entry, laid out
        // addr, then len/flags/next little-endian). The device reads descriptors only after a
        // later `publish`, whose release store orders these writes before it.
        unsafe {
            let d = addr_of_mut!((*self.mem.as_ptr()).desc)
                .cast::<Descriptor>()
                .add(i)
                .cast::<u64>();
            d.write_volatile(desc.addr);
            d.add(1).write_volatile(meta);
        }
    }

    /// Puts chain `head` in the next available-ring slot. The device sees it after
    /// [`publish`](Self::publish).
    #[inline]
    pub fn push(&mut self, head: u16) {
        let slot = usize::from(self.avail_idx & (self.size - 1));
        // SAFETY: `slot < size <= N`: inside the ring; the device reads it only after
        // `publish`.
        unsafe {
            addr_of_mut!((*self.mem.as_ptr()).avail.ring)
                .cast::<u16>()
                .add(slot)
                .write_volatile(head)
        };
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.in_flight += 1;
    }

    /// Makes every pushed chain visible to the device. Returns whether the device wants a
    /// notification: with `VIRTIO_F_EVENT_IDX`, whether the new chains pass the device's
    /// `avail_event`; otherwise, unless it set `VIRTQ_USED_F_NO_NOTIFY`.
    // Always inlined: it is on every request's path twice (a call costs instructions, which
    // may be emulated one at a time).
    #[inline(always)]
    pub fn publish(&mut self) -> bool {
        let (old, new) = (self.published, self.avail_idx);
        self.published = new;
        self.avail_idx_atomic().store(new, Ordering::Release);
        // The device's side must be read after the index is published (store, then load).
        fence(Ordering::SeqCst);
        if self.event_idx {
            // SAFETY: the field is inside the queue memory; the device writes it with
            // single 16-bit stores.
            let event = unsafe { self.avail_event_ptr().read_volatile() };
            return needs_event(event, new, old);
        }
        // SAFETY: the used ring's flags field is inside the queue memory.
        let flags = unsafe { addr_of!((*self.mem.as_ptr()).used.flags).read_volatile() };
        flags & USED_F_NO_NOTIFY == 0
    }

    /// Asks the device for an interrupt when it returns its next chain (`on`), or for none.
    /// The device may ignore the request (and with `VIRTIO_F_EVENT_IDX`, "on" holds for one
    /// chain: call again before each wait); poll the used ring after turning them on.
    #[inline]
    pub fn set_interrupts(&mut self, on: bool) {
        if self.event_idx {
            // The device interrupts when its used index moves past `used_event`: just behind
            // the driver's position means "not for 65536 chains".
            let event = if on {
                self.last_used
            } else {
                self.last_used.wrapping_sub(1)
            };
            // SAFETY: the field is inside the queue memory; 16-bit stores are atomic.
            unsafe { self.used_event_ptr().write_volatile(event) };
        } else {
            let flags = if on { 0 } else { AVAIL_F_NO_INTERRUPT };
            // SAFETY: the flags field is inside the queue memory; 16-bit stores are atomic.
            unsafe { addr_of_mut!((*self.mem.as_ptr()).avail.flags).write_volatile(flags) };
        }
        fence(Ordering::SeqCst);
    }

    /// Whether `VIRTIO_F_EVENT_IDX` is in use.
    pub fn event_idx(&self) -> bool {
        self.event_idx
    }

    /// Asks for an interrupt for the next chain the device returns (event-index mode only;
    /// with flags, interrupts stay on until turned off). Cheaper than `set_interrupts`: the
    /// fence comes from the next `publish`.
    #[inline]
    pub fn interrupt_next(&mut self) {
        if self.event_idx {
            // SAFETY: the field is inside the queue memory; 16-bit stores are atomic.
            unsafe { self.used_event_ptr().write_volatile(self.last_used) };
        }
    }

    /// Whether the device returned a chain not yet popped (one load).
    #[inline]
    pub fn has_used(&self) -> bool {
        self.used_idx_atomic().load(Ordering::Acquire) != self.last_used
    }

    /// For a queue that keeps one chain in flight: the element the device returned for it,
    /// if it did, without consuming it ([`repost_begin`](Self::repost_begin) does). `None` also when the
    /// used index moved by anything but one: [`pop_used`](Self::pop_used) then reports it.
    /// The id and length are the device's word, as for `pop_used`.
    #[inline(always)]
    pub fn peek_single(&self) -> Option<UsedElem> {
        let last = self.last_used;
        if self.in_flight != 1
            || self.used_idx_atomic().load(Ordering::Acquire) != last.wrapping_add(1)
        {
            return None;
        }
        let slot = usize::from(last & (self.size - 1));
        // SAFETY: `slot < size <= N`: inside the ring; the acquire load above orders this
        // read after the device's write of the entry.
        Some(unsafe {
            addr_of!((*self.mem.as_ptr()).used.ring)
                .cast::<UsedElem>()
                .add(slot)
                .read_volatile()
        })
    }

    /// For a queue that keeps one chain in flight and whose chain the device returned
    /// ([`peek_single`](Self::peek_single) saw it): consumes it and puts chain `head` back in
    /// the available ring, asking for an interrupt when the device returns it, all but the
    /// index store, which [`Published::publish`] makes. Everything is read here, before the
    /// caller works on the returned buffer (copying it: kernel code may be emulated one
    /// instruction at a time, and a copy makes the compiler read memory again after it); the
    /// device sees nothing until `publish`.
    #[inline(always)]
    pub fn repost_begin(&mut self, head: u16) -> Published {
        let mem = self.mem.as_ptr();
        let (size, idx, old) = (self.size, self.avail_idx, self.published);
        let event_idx = self.event_idx;
        let last = self.last_used.wrapping_add(1);
        let new = idx.wrapping_add(1);
        self.last_used = last;
        self.avail_idx = new;
        self.published = new;
        // SAFETY: the slot (`idx & (size - 1) < size <= N`) and `used_event` (after `size`
        // entries) lie inside the ring; the device reads them only after the index store.
        unsafe {
            let ring = addr_of_mut!((*mem).avail.ring).cast::<u16>();
            ring.add(usize::from(idx & (size - 1))).write_volatile(head);
            if event_idx {
                ring.add(usize::from(size)).write_volatile(last);
            }
        }
        Published {
            // SAFETY: only the address is computed.
            idx: unsafe { addr_of_mut!((*mem).avail.idx) },
            check: self.notify_check,
            new,
            old,
            event_idx,
        }
    }

    /// Writes descriptor `head` and publishes it as a one-descriptor chain: `set_desc`,
    /// `push` and `publish` in one straight line, the queue's fields read once. Returns
    /// whether the device wants a notification.
    #[inline(always)]
    pub fn push_desc_publish(&mut self, head: u16, desc: Descriptor) -> bool {
        let mem = self.mem.as_ptr();
        let (mask, idx, old, event_idx, check) = (
            self.size - 1,
            self.avail_idx,
            self.published,
            self.event_idx,
            self.notify_check,
        );
        let new = idx.wrapping_add(1);
        self.avail_idx = new;
        self.published = new;
        self.in_flight += 1;
        let meta = u64::from(desc.len) | u64::from(desc.flags) << 32 | u64::from(desc.next) << 48;
        // SAFETY: `head & mask < size <= N` and `idx & mask < N`: inside the table and the
        // ring; the device reads them only after the index store.
        let idx_ptr = unsafe {
            let d = addr_of_mut!((*mem).desc)
                .cast::<Descriptor>()
                .add(usize::from(head & mask))
                .cast::<u64>();
            d.write_volatile(desc.addr);
            d.add(1).write_volatile(meta);
            addr_of_mut!((*mem).avail.ring)
                .cast::<u16>()
                .add(usize::from(idx & mask))
                .write_volatile(head);
            addr_of_mut!((*mem).avail.idx)
        };
        Published {
            idx: idx_ptr,
            check,
            new,
            old,
            event_idx,
        }
        .publish()
    }

    /// Chains handed to the device and not yet returned.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// The next chain the device returned, if any. Only the count is checked here (no more
    /// chains than are in flight); the id and length are the device's word: whether the id
    /// is a chain the driver handed over, and the length within it, are the caller's checks.
    #[inline]
    pub fn pop_used(&mut self) -> Result<Option<UsedElem>, QueueError> {
        let used_idx = self.used_idx_atomic().load(Ordering::Acquire);
        if used_idx == self.last_used {
            return Ok(None);
        }
        let returned = used_idx.wrapping_sub(self.last_used);
        if returned > self.in_flight {
            return Err(QueueError::Overrun {
                queue: self.index,
                returned,
                in_flight: self.in_flight,
            });
        }
        let slot = usize::from(self.last_used & (self.size - 1));
        // SAFETY: `slot < size <= N`: inside the ring; the acquire load above orders this
        // read after the device's write of the entry.
        let elem = unsafe {
            addr_of!((*self.mem.as_ptr()).used.ring)
                .cast::<UsedElem>()
                .add(slot)
                .read_volatile()
        };
        self.last_used = self.last_used.wrapping_add(1);
        self.in_flight -= 1;
        Ok(Some(elem))
    }

    fn avail_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: the field is a 2-aligned u16 inside the queue memory, which lives as long
        // as `self`; the device only reads it.
        unsafe { AtomicU16::from_ptr(addr_of_mut!((*self.mem.as_ptr()).avail.idx)) }
    }

    fn used_idx_atomic(&self) -> &AtomicU16 {
        // SAFETY: the field is a 2-aligned u16 inside the queue memory, which lives as long
        // as `self`; the device writes it with single 16-bit stores.
        unsafe { AtomicU16::from_ptr(addr_of_mut!((*self.mem.as_ptr()).used.idx)) }
    }

    /// Test support: the device's view of the rings.
    #[cfg(test)]
    pub(crate) fn device(&self) -> DeviceView {
        DeviceView {
            mem: self.mem,
            size: self.size,
            next_avail: 0,
            used_idx: 0,
        }
    }
}

/// Chains put in the available ring ([`SplitQueue::repost_begin`]) that the device does
/// not see yet: [`publish`](Self::publish) stores the index.
#[derive(Debug)]
#[must_use = "the device sees nothing until it is published"]
pub struct Published {
    /// The available index (inside queue memory, which is never freed).
    idx: *mut u16,
    /// `avail_event` with event indices, else the used ring's flags.
    check: *const u16,
    new: u16,
    old: u16,
    event_idx: bool,
}

impl Published {
    /// Makes the chains visible to the device. Returns whether the device wants a
    /// notification (as [`SplitQueue::publish`]).
    #[inline(always)]
    pub fn publish(self) -> bool {
        // SAFETY: the index is a 2-aligned u16 inside queue memory, which is never freed
        // (`SplitQueue::new`); the device only reads it.
        unsafe { AtomicU16::from_ptr(self.idx) }.store(self.new, Ordering::Release);
        // The device's side must be read after the index is published (store, then load).
        fence(Ordering::SeqCst);
        // SAFETY: a u16 inside queue memory, which is never freed; the device writes it with
        // single 16-bit stores.
        let v = unsafe { self.check.read_volatile() };
        if self.event_idx {
            needs_event(v, self.new, self.old)
        } else {
            v & USED_F_NO_NOTIFY == 0
        }
    }
}

/// The event-index test (virtio 1.x, 2.7.10): whether moving an index from `old` to `new`
/// passes `event`, i.e. `event` is in `[old, new)`.
pub fn needs_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The largest power of two `<= n`, or 1 for 0.
fn prev_power_of_two(n: u16) -> u16 {
    if n == 0 {
        1
    } else {
        1 << (15 - n.leading_zeros())
    }
}

/// The device's side of a queue, for tests that play the device.
#[cfg(test)]
#[derive(Debug)]
pub(crate) struct DeviceView {
    mem: NonNull<QueueMemory>,
    size: u16,
    next_avail: u16,
    used_idx: u16,
}

#[cfg(test)]
impl DeviceView {
    /// The next available chain head, if any.
    pub fn pop_avail(&mut self) -> Option<u16> {
        // SAFETY: test memory owned by the queue, read as the device would.
        let idx = unsafe { addr_of!((*self.mem.as_ptr()).avail.idx).read_volatile() };
        if idx == self.next_avail {
            return None;
        }
        let slot = usize::from(self.next_avail & (self.size - 1));
        self.next_avail = self.next_avail.wrapping_add(1);
        // SAFETY: as above.
        Some(unsafe { addr_of!((*self.mem.as_ptr()).avail.ring[slot]).read_volatile() })
    }

    /// Descriptor `i`.
    pub fn desc(&self, i: u16) -> Descriptor {
        // SAFETY: as above.
        unsafe {
            addr_of!((*self.mem.as_ptr()).desc[usize::from(i & (self.size - 1))]).read_volatile()
        }
    }

    /// The chain starting at `head`.
    pub fn chain(&self, head: u16) -> std::vec::Vec<Descriptor> {
        let mut out = std::vec::Vec::new();
        let mut d = self.desc(head);
        loop {
            out.push(d);
            if d.flags & DESC_F_NEXT == 0 || out.len() > usize::from(self.size) {
                return out;
            }
            d = self.desc(d.next);
        }
    }

    /// Returns chain `id` with `len` bytes written.
    pub fn push_used(&mut self, id: u32, len: u32) {
        let slot = usize::from(self.used_idx & (self.size - 1));
        self.used_idx = self.used_idx.wrapping_add(1);
        // SAFETY: as above.
        unsafe {
            addr_of_mut!((*self.mem.as_ptr()).used.ring[slot]).write_volatile(UsedElem { id, len });
            addr_of_mut!((*self.mem.as_ptr()).used.idx).write_volatile(self.used_idx);
        }
    }

    /// Sets the used index directly (to play a broken device).
    pub fn set_used_idx(&mut self, idx: u16) {
        self.used_idx = idx;
        // SAFETY: as above.
        unsafe { addr_of_mut!((*self.mem.as_ptr()).used.idx).write_volatile(idx) };
    }

    /// The driver's interrupt-suppression flag.
    pub fn no_interrupt(&self) -> bool {
        // SAFETY: as above.
        unsafe {
            addr_of!((*self.mem.as_ptr()).avail.flags).read_volatile() & AVAIL_F_NO_INTERRUPT != 0
        }
    }

    /// The driver's `used_event`.
    pub fn used_event(&self) -> u16 {
        // SAFETY: as above; the field follows `size` ring entries.
        unsafe {
            addr_of!((*self.mem.as_ptr()).avail.ring)
                .cast::<u16>()
                .add(usize::from(self.size))
                .read_volatile()
        }
    }

    /// Writes the device's `avail_event`.
    pub fn set_avail_event(&mut self, v: u16) {
        // SAFETY: as above; the field follows `size` used entries.
        unsafe {
            addr_of_mut!((*self.mem.as_ptr()).used.ring)
                .cast::<UsedElem>()
                .add(usize::from(self.size))
                .cast::<u16>()
                .write_volatile(v)
        }
    }

    /// Whether the driver made chains available that the device has not taken.
    pub fn has_avail(&self) -> bool {
        // SAFETY: as above.
        unsafe { addr_of!((*self.mem.as_ptr()).avail.idx).read_volatile() != self.next_avail }
    }

    /// The next avail index the device will read.
    pub fn next_avail(&self) -> u16 {
        self.next_avail
    }

    /// Sets the device's notification-suppression flag.
    pub fn set_no_notify(&mut self, on: bool) {
        // SAFETY: as above.
        unsafe { addr_of_mut!((*self.mem.as_ptr()).used.flags).write_volatile(u16::from(on)) };
    }
}

/// Copies `len` bytes at guest physical `addr` into a vector (test devices read buffers so).
#[cfg(test)]
pub(crate) fn read_guest(addr: u64, len: u32) -> std::vec::Vec<u8> {
    // SAFETY: in tests, "guest physical" addresses are pointers into live test memory.
    unsafe { core::slice::from_raw_parts(addr as *const u8, len as usize) }.to_vec()
}

/// Writes `bytes` at guest physical `addr` (test devices fill buffers so).
#[cfg(test)]
pub(crate) fn write_guest(addr: u64, bytes: &[u8]) {
    // SAFETY: as in `read_guest`; the caller stays inside the buffer.
    unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_round_down_to_powers_of_two() {
        assert_eq!(prev_power_of_two(0), 1);
        assert_eq!(prev_power_of_two(1), 1);
        assert_eq!(prev_power_of_two(31), 16);
        assert_eq!(prev_power_of_two(32), 32);
        let q = SplitQueue::new(0, 256).unwrap();
        assert_eq!(q.size(), MAX_SIZE);
        let q = SplitQueue::new(0, 12).unwrap();
        assert_eq!(q.size(), 8);
    }

    #[test]
    fn chains_go_round_the_rings() {
        let mut q = SplitQueue::new(1, 4).unwrap();
        let mut dev = q.device();
        for round in 0..10u32 {
            q.set_desc(
                0,
                Descriptor {
                    addr: 0x1000,
                    len: 8,
                    flags: DESC_F_NEXT,
                    next: 1,
                },
            );
            q.set_desc(
                1,
                Descriptor {
                    addr: 0x2000,
                    len: 16,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
            );
            q.push(0);
            assert!(q.publish());
            assert_eq!(dev.pop_avail(), Some(0));
            assert_eq!(dev.pop_avail(), None);
            assert_eq!(dev.chain(0).len(), 2);
            assert_eq!(q.pop_used(), Ok(None));
            dev.push_used(0, round);
            assert_eq!(q.pop_used(), Ok(Some(UsedElem { id: 0, len: round })));
            assert_eq!(q.in_flight(), 0);
        }
    }

    #[test]
    fn honours_the_device_flags() {
        let mut q = SplitQueue::new(1, 4).unwrap();
        let mut dev = q.device();
        q.push(0);
        dev.set_no_notify(true);
        assert!(!q.publish());
        q.set_interrupts(false);
        assert!(dev.no_interrupt());
        q.set_interrupts(true);
        assert!(!dev.no_interrupt());
    }

    #[test]
    fn event_index_notifications_and_interrupts() {
        assert!(needs_event(0, 1, 0));
        assert!(!needs_event(5, 3, 2));
        assert!(needs_event(0xffff, 1, 0xfffe));
        let mut q = SplitQueue::new(1, 8).unwrap();
        q.set_event_idx(true);
        let mut dev = q.device();
        // The device asked to hear of index 0 (initial avail_event): the first chain notifies.
        q.push(0);
        assert!(q.publish());
        // The device has not asked again (avail_event still 0): no notification.
        q.push(1);
        assert!(!q.publish());
        // The device ran out after consuming two chains and asks for index 2.
        dev.pop_avail();
        dev.pop_avail();
        dev.set_avail_event(dev.next_avail());
        q.push(2);
        assert!(q.publish());
        // Interrupts: on means used_event = the next used index; off means just behind it.
        q.set_interrupts(true);
        assert_eq!(dev.used_event(), 0);
        dev.push_used(0, 0);
        assert!(q.pop_used().unwrap().is_some());
        q.set_interrupts(false);
        assert_eq!(dev.used_event(), 0);
        q.interrupt_next();
        assert_eq!(dev.used_event(), 1);
    }

    #[test]
    fn repost_and_push_desc_publish_match_the_long_way() {
        for event_idx in [false, true] {
            let mut q = SplitQueue::new(0, 2).unwrap();
            q.set_event_idx(event_idx);
            let mut dev = q.device();
            q.push(0);
            q.interrupt_next();
            assert!(q.publish());
            assert_eq!(q.peek_single(), None);
            for round in 0..5u32 {
                assert_eq!(dev.pop_avail(), Some(0));
                dev.set_avail_event(dev.next_avail());
                dev.push_used(0, 100 + round);
                assert_eq!(
                    q.peek_single(),
                    Some(UsedElem {
                        id: 0,
                        len: 100 + round
                    })
                );
                // The device asked to hear of the next chain: notified.
                assert!(q.repost_begin(0).publish());
                assert_eq!(q.in_flight(), 1);
                assert_eq!(q.peek_single(), None);
                if event_idx {
                    assert_eq!(dev.used_event(), round as u16 + 1);
                }
            }
            // Two elements at once is not the straight case.
            assert_eq!(dev.pop_avail(), Some(0));
            dev.push_used(0, 1);
            dev.push_used(0, 1);
            assert_eq!(q.peek_single(), None);

            let mut t = SplitQueue::new(1, 4).unwrap();
            t.set_event_idx(event_idx);
            let mut dev = t.device();
            let desc = |len| Descriptor {
                addr: 0x1000,
                len,
                flags: 0,
                next: 0,
            };
            assert!(t.push_desc_publish(0, desc(10)));
            assert_eq!(dev.pop_avail(), Some(0));
            // Not asked again (event index mode) or asked (flags mode).
            assert_eq!(t.push_desc_publish(3, desc(30)), !event_idx);
            assert_eq!(dev.pop_avail(), Some(3));
            assert_eq!(dev.desc(3), desc(30));
            assert_eq!(t.in_flight(), 2);
        }
    }

    #[test]
    fn rejects_a_used_index_past_the_chains_in_flight() {
        let mut q = SplitQueue::new(2, 4).unwrap();
        let mut dev = q.device();
        q.push(0);
        q.publish();
        dev.set_used_idx(3);
        assert_eq!(
            q.pop_used(),
            Err(QueueError::Overrun {
                queue: 2,
                returned: 3,
                in_flight: 1
            })
        );
    }
}
