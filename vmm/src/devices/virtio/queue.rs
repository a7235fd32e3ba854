//! Checked access to a guest's split virtqueue: the avail-ring pop and the descriptor-chain
//! walk every device uses.
//!
//! virtio-queue's `Queue` holds the queue configuration and does the ring bookkeeping
//! (`is_valid`, `add_used`, notification suppression). Its chain iterator, though, ends
//! *silently* on a malformed chain (a loop, an index out of range, a buffer outside memory).
//! fnode must name what the guest did wrong so the VMM can stop the VM with that message, so
//! chains are walked here, every step checked: head and next indices against the queue size,
//! loops, a cap on the number of descriptors, indirect descriptors (not negotiated), unknown
//! flags, readable-after-writable ordering, each buffer inside guest memory and the total
//! length within `u32`. Nothing is allocated in proportion to guest-supplied numbers.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use virtio_bindings::bindings::virtio_ring::{
    VRING_AVAIL_F_NO_INTERRUPT, VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Most descriptors fnode accepts in one chain (a 64 KiB packet in 4 KiB pages plus a header
/// needs 17).
pub const MAX_CHAIN_DESCS: usize = 64;

/// Size of one split-ring descriptor.
const DESC_SIZE: u64 = 16;

/// What is wrong with a queue or a descriptor chain. Messages name the chain by its head.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The avail ring index moved further than the queue size since the device last looked.
    #[error("avail ring index {avail} is {ahead} entries ahead of the device, more than the queue size {size}")]
    AvailIdxAhead {
        /// The avail index the driver published.
        avail: u16,
        /// How far ahead of the device's position it is.
        ahead: u16,
        /// Queue size.
        size: u16,
    },
    /// The avail ring or used ring could not be accessed.
    #[error("ring access failed: {0}")]
    Ring(String),
    /// The avail ring names a head descriptor outside the table.
    #[error("descriptor chain head {head} is outside the {size}-entry descriptor table")]
    HeadOutOfRange {
        /// Head index.
        head: u16,
        /// Queue size.
        size: u16,
    },
    /// A descriptor's `next` is outside the table.
    #[error("descriptor chain at head {head}: descriptor {index} links to {next}, outside the {size}-entry table")]
    NextOutOfRange {
        /// Head index.
        head: u16,
        /// The descriptor with the bad link.
        index: u16,
        /// Its `next`.
        next: u16,
        /// Queue size.
        size: u16,
    },
    /// The chain visits a descriptor twice.
    #[error("descriptor chain at head {head} loops (descriptor {index} links back to {next})")]
    Loop {
        /// Head index.
        head: u16,
        /// The descriptor whose `next` closes the loop.
        index: u16,
        /// The descriptor visited twice.
        next: u16,
    },
    /// The chain has more descriptors than fnode accepts.
    #[error("descriptor chain at head {head} has more than {max} descriptors")]
    TooLong {
        /// Head index.
        head: u16,
        /// The cap.
        max: usize,
    },
    /// An indirect descriptor (VIRTIO_RING_F_INDIRECT_DESC was not offered).
    #[error("descriptor chain at head {head}: descriptor {index} is indirect, a feature the device does not offer")]
    Indirect {
        /// Head index.
        head: u16,
        /// The indirect descriptor.
        index: u16,
    },
    /// Flags other than NEXT, WRITE and INDIRECT.
    #[error("descriptor chain at head {head}: descriptor {index} has unknown flags {flags:#x}")]
    UnknownFlags {
        /// Head index.
        head: u16,
        /// The descriptor.
        index: u16,
        /// Its flags.
        flags: u16,
    },
    /// A device-readable descriptor after a device-writable one (virtio 1.x, 2.7.4.2).
    #[error("descriptor chain at head {head}: readable descriptor {index} follows a writable one")]
    ReadableAfterWritable {
        /// Head index.
        head: u16,
        /// The readable descriptor.
        index: u16,
    },
    /// A buffer outside guest memory.
    #[error("descriptor chain at head {head}: descriptor {index} buffer [{addr:#x}, +{len:#x}) is outside guest memory")]
    OutsideMemory {
        /// Head index.
        head: u16,
        /// The descriptor.
        index: u16,
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// The lengths add up to more than 4 GiB.
    #[error("descriptor chain at head {head} is longer than 4 GiB")]
    LengthOverflow {
        /// Head index.
        head: u16,
    },
    /// The descriptor table entry could not be read.
    #[error("descriptor chain at head {head}: descriptor {index} cannot be read from the descriptor table")]
    TableUnreadable {
        /// Head index.
        head: u16,
        /// The descriptor.
        index: u16,
    },
    /// Copying to or from a buffer failed.
    #[error("descriptor chain at head {head}: buffer copy failed: {reason}")]
    Copy {
        /// Head index.
        head: u16,
        /// vm-memory's error.
        reason: String,
    },
}

/// One guest buffer of a chain, already checked to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// A walked descriptor chain: its device-readable buffers, then its device-writable ones.
#[derive(Debug, Default)]
pub struct Chain {
    /// Head descriptor index (what goes into the used ring).
    pub head: u16,
    /// Device-readable buffers in order.
    pub readable: Vec<Segment>,
    /// Device-writable buffers in order.
    pub writable: Vec<Segment>,
    /// Sum of the readable lengths.
    pub readable_len: u32,
    /// Sum of the writable lengths.
    pub writable_len: u32,
}

impl Chain {
    /// Copies `buf.len()` bytes starting `offset` bytes into the readable buffers into `buf`.
    /// The caller checks `offset + buf.len() <= readable_len`.
    pub fn read_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u32,
        buf: &mut [u8],
    ) -> Result<(), ChainError> {
        copy_segments(
            &self.readable,
            offset,
            buf.len(),
            self.head,
            |seg_addr, range| mem.read_slice(&mut buf[range], seg_addr),
        )
    }

    /// Copies `data` into the writable buffers starting `offset` bytes in. The caller checks
    /// `offset + data.len() <= writable_len`.
    pub fn write_at(
        &self,
        mem: &GuestMemoryMmap,
        offset: u32,
        data: &[u8],
    ) -> Result<(), ChainError> {
        copy_segments(
            &self.writable,
            offset,
            data.len(),
            self.head,
            |seg_addr, range| mem.write_slice(&data[range], seg_addr),
        )
    }
}

/// Walks `segs` from byte `offset` for `len` bytes, calling `f(guest address, range of the
/// caller's buffer)` per piece.
fn copy_segments<F>(
    segs: &[Segment],
    offset: u32,
    len: usize,
    head: u16,
    mut f: F,
) -> Result<(), ChainError>
where
    F: FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), vm_memory::GuestMemoryError>,
{
    let mut skip = offset as u64;
    let mut done = 0usize;
    for seg in segs {
        if done == len {
            break;
        }
        let seg_len = u64::from(seg.len);
        if skip >= seg_len {
            skip -= seg_len;
            continue;
        }
        let n = ((seg_len - skip) as usize).min(len - done);
        let addr = GuestAddress(seg.addr.0 + skip);
        f(addr, done..done + n).map_err(|e| ChainError::Copy {
            head,
            reason: e.to_string(),
        })?;
        done += n;
        skip = 0;
    }
    if done == len {
        Ok(())
    } else {
        Err(ChainError::Copy {
            head,
            reason: format!("chain holds {done} of {len} bytes"),
        })
    }
}

/// Pops the next available chain head, if any, after checking the avail index is sane.
pub fn pop_head(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<Option<u16>, ChainError> {
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(|e| ChainError::Ring(e.to_string()))?;
    let next = Wrapping(queue.next_avail());
    if avail == next {
        return Ok(None);
    }
    let ahead = (avail - next).0;
    if ahead > queue.size() {
        return Err(ChainError::AvailIdxAhead {
            avail: avail.0,
            ahead,
            size: queue.size(),
        });
    }
    match queue.pop_descriptor_chain(mem) {
        Some(chain) => Ok(Some(chain.head_index())),
        None => Err(ChainError::Ring("avail ring entry cannot be read".into())),
    }
}

/// Whether the driver wants an interrupt after the device used buffers of `queue`: the
/// `used_event` test with VIRTIO_RING_F_EVENT_IDX, else the avail ring's
/// VRING_AVAIL_F_NO_INTERRUPT flag (which virtio-queue's `needs_notification` ignores).
pub fn needs_interrupt(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
) -> Result<bool, virtio_queue::Error> {
    if queue.event_idx_enabled() {
        return queue.needs_notification(mem);
    }
    // Order the used-ring writes before reading the flag (as needs_notification does).
    std::sync::atomic::fence(Ordering::SeqCst);
    let flags: u16 = mem
        .load(GuestAddress(queue.avail_ring()), Ordering::Acquire)
        .map(u16::from_le)
        .map_err(virtio_queue::Error::GuestMemory)?;
    Ok(flags & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0)
}

/// Walks the chain starting at `head` of `queue`, checking every step (see the module doc).
pub fn walk_chain(mem: &GuestMemoryMmap, queue: &Queue, head: u16) -> Result<Chain, ChainError> {
    let size = queue.size();
    if head >= size {
        return Err(ChainError::HeadOutOfRange { head, size });
    }
    let table = GuestAddress(queue.desc_table());
    let mut chain = Chain {
        head,
        ..Chain::default()
    };
    let mut visited = [0u16; MAX_CHAIN_DESCS];
    let mut count = 0usize;
    let mut index = head;
    loop {
        visited[count] = index;
        count += 1;
        let desc: Descriptor = table
            .0
            .checked_add(u64::from(index) * DESC_SIZE)
            .and_then(|a| mem.read_obj(GuestAddress(a)).ok())
            .ok_or(ChainError::TableUnreadable { head, index })?;
        let flags = desc.flags();
        let known = (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT) as u16;
        if flags & !known != 0 {
            return Err(ChainError::UnknownFlags { head, index, flags });
        }
        if flags & VRING_DESC_F_INDIRECT as u16 != 0 {
            return Err(ChainError::Indirect { head, index });
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if seg.len > 0 && !GuestMemoryBackend::check_range(mem, seg.addr, seg.len as usize) {
            return Err(ChainError::OutsideMemory {
                head,
                index,
                addr: seg.addr.0,
                len: seg.len,
            });
        }
        if flags & VRING_DESC_F_WRITE as u16 != 0 {
            chain.writable_len = chain
                .writable_len
                .checked_add(seg.len)
                .ok_or(ChainError::LengthOverflow { head })?;
            chain.writable.push(seg);
        } else {
            if !chain.writable.is_empty() {
                return Err(ChainError::ReadableAfterWritable { head, index });
            }
            chain.readable_len = chain
                .readable_len
                .checked_add(seg.len)
                .ok_or(ChainError::LengthOverflow { head })?;
            chain.readable.push(seg);
        }
        if chain.readable_len.checked_add(chain.writable_len).is_none() {
            return Err(ChainError::LengthOverflow { head });
        }
        if flags & VRING_DESC_F_NEXT as u16 == 0 {
            return Ok(chain);
        }
        let next = desc.next();
        if next >= size {
            return Err(ChainError::NextOutOfRange {
                head,
                index,
                next,
                size,
            });
        }
        if visited[..count].contains(&next) {
            return Err(ChainError::Loop { head, index, next });
        }
        if count == MAX_CHAIN_DESCS {
            return Err(ChainError::TooLong {
                head,
                max: MAX_CHAIN_DESCS,
            });
        }
        index = next;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    /// A tiny split-queue driver for tests: rings at fixed addresses in `mem`.
    #[derive(Debug)]
    pub(crate) struct TestQueue {
        pub size: u16,
        pub desc: u64,
        pub avail: u64,
        pub used: u64,
        pub avail_idx: u16,
        pub used_seen: u16,
    }

    impl TestQueue {
        pub fn new(base: u64, size: u16) -> Self {
            let desc = base;
            let avail = desc + 16 * u64::from(size);
            let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
            TestQueue {
                size,
                desc,
                avail,
                used,
                avail_idx: 0,
                used_seen: 0,
            }
        }

        pub fn queue(&self) -> Queue {
            let mut q = Queue::new(self.size).unwrap();
            q.try_set_desc_table_address(GuestAddress(self.desc))
                .unwrap();
            q.try_set_avail_ring_address(GuestAddress(self.avail))
                .unwrap();
            q.try_set_used_ring_address(GuestAddress(self.used))
                .unwrap();
            q.set_ready(true);
            q
        }

        pub fn set_desc(
            &self,
            mem: &GuestMemoryMmap,
            i: u16,
            addr: u64,
            len: u32,
            flags: u16,
            next: u16,
        ) {
            let d = self.desc + 16 * u64::from(i);
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }

        /// Publishes `head` in the avail ring.
        pub fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
            let slot = self.avail + 4 + 2 * u64::from(self.avail_idx % self.size);
            mem.write_obj(head, GuestAddress(slot)).unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2))
                .unwrap();
        }

        /// Takes the next used element, if the device published one: (id, len).
        pub fn take_used(&mut self, mem: &GuestMemoryMmap) -> Option<(u32, u32)> {
            let idx: u16 = mem.read_obj(GuestAddress(self.used + 2)).unwrap();
            if idx == self.used_seen {
                return None;
            }
            let e = self.used + 4 + 8 * u64::from(self.used_seen % self.size);
            self.used_seen = self.used_seen.wrapping_add(1);
            Some((
                mem.read_obj(GuestAddress(e)).unwrap(),
                mem.read_obj(GuestAddress(e + 4)).unwrap(),
            ))
        }
    }

    pub(crate) fn test_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;

    #[test]
    fn walks_a_good_chain_and_copies_across_segments() {
        let mem = test_mem();
        let mut tq = TestQueue::new(0x1000, 16);
        tq.set_desc(&mem, 0, 0x8000, 3, F_NEXT, 1);
        tq.set_desc(&mem, 1, 0x9000, 5, F_NEXT, 2);
        tq.set_desc(&mem, 2, 0xa000, 8, F_WRITE, 0);
        tq.publish(&mem, 0);
        let mut q = tq.queue();
        let head = pop_head(&mut q, &mem).unwrap().unwrap();
        let c = walk_chain(&mem, &q, head).unwrap();
        assert_eq!(
            (c.readable.len(), c.readable_len, c.writable_len),
            (2, 8, 8)
        );
        mem.write_slice(b"abc", GuestAddress(0x8000)).unwrap();
        mem.write_slice(b"defgh", GuestAddress(0x9000)).unwrap();
        let mut buf = [0u8; 6];
        c.read_at(&mem, 1, &mut buf).unwrap();
        assert_eq!(&buf, b"bcdefg");
        c.write_at(&mem, 2, b"xyz").unwrap();
        let mut out = [0u8; 3];
        mem.read_slice(&mut out, GuestAddress(0xa002)).unwrap();
        assert_eq!(&out, b"xyz");
        c.read_at(&mem, 7, &mut buf).unwrap_err();
        assert_eq!(pop_head(&mut q, &mem).unwrap(), None);
        // No EVENT_IDX: the avail ring's NO_INTERRUPT flag decides.
        assert!(needs_interrupt(&mut q, &mem).unwrap());
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, GuestAddress(tq.avail))
            .unwrap();
        assert!(!needs_interrupt(&mut q, &mem).unwrap());
    }

    #[test]
    fn rejects_every_kind_of_garbage() {
        let mem = test_mem();
        let tq = TestQueue::new(0x1000, 16);
        let q = tq.queue();
        let walk = |setup: &dyn Fn()| {
            setup();
            walk_chain(&mem, &q, 0)
        };
        // A loop 0 -> 1 -> 0.
        let e = walk(&|| {
            tq.set_desc(&mem, 0, 0x8000, 4, F_NEXT, 1);
            tq.set_desc(&mem, 1, 0x8000, 4, F_NEXT, 0);
        });
        assert_eq!(
            e.unwrap_err(),
            ChainError::Loop {
                head: 0,
                index: 1,
                next: 0
            }
        );
        assert_eq!(
            e_str(walk(&|| tq.set_desc(&mem, 0, 0x8000, 4, F_NEXT, 0))),
            "descriptor chain at head 0 loops (descriptor 0 links back to 0)"
        );
        let e = walk(&|| tq.set_desc(&mem, 0, 0x8000, 4, F_NEXT, 16)).unwrap_err();
        assert!(matches!(e, ChainError::NextOutOfRange { next: 16, .. }));
        let e = walk(&|| tq.set_desc(&mem, 0, 0x20_0000, 4, 0, 0)).unwrap_err();
        assert!(matches!(
            e,
            ChainError::OutsideMemory {
                addr: 0x20_0000,
                ..
            }
        ));
        let e = walk(&|| tq.set_desc(&mem, 0, 0xf_ff00, 0x200, 0, 0)).unwrap_err();
        assert!(matches!(e, ChainError::OutsideMemory { .. }));
        let e = walk(&|| tq.set_desc(&mem, 0, u64::MAX - 2, 8, 0, 0)).unwrap_err();
        assert!(matches!(e, ChainError::OutsideMemory { .. }));
        let e = walk(&|| tq.set_desc(&mem, 0, 0x8000, 16, VRING_DESC_F_INDIRECT as u16, 0))
            .unwrap_err();
        assert!(matches!(e, ChainError::Indirect { .. }));
        let e = walk(&|| tq.set_desc(&mem, 0, 0x8000, 16, 0x80, 0)).unwrap_err();
        assert!(matches!(e, ChainError::UnknownFlags { flags: 0x80, .. }));
        let e = walk(&|| {
            tq.set_desc(&mem, 0, 0x8000, 4, F_NEXT | F_WRITE, 1);
            tq.set_desc(&mem, 1, 0x8000, 4, 0, 0);
        })
        .unwrap_err();
        assert!(matches!(
            e,
            ChainError::ReadableAfterWritable { index: 1, .. }
        ));
        let e = walk(&|| {
            tq.set_desc(&mem, 0, 0, 0x8000_0000, F_NEXT, 1);
            tq.set_desc(&mem, 1, 0, 0x8000_0000, 0, 0);
        });
        // 2 GiB buffers are outside the 1 MiB test memory before they overflow.
        assert!(matches!(e.unwrap_err(), ChainError::OutsideMemory { .. }));
        let e = walk_chain(&mem, &q, 16).unwrap_err();
        assert!(matches!(
            e,
            ChainError::HeadOutOfRange { head: 16, size: 16 }
        ));
    }

    #[test]
    fn caps_chain_length_and_avail_index() {
        let mem = test_mem();
        let mut tq = TestQueue::new(0x1000, 256);
        for i in 0..255u16 {
            tq.set_desc(&mem, i, 0x8_0000, 0, F_NEXT, i + 1);
        }
        let q = tq.queue();
        let e = walk_chain(&mem, &q, 0).unwrap_err();
        assert_eq!(
            e,
            ChainError::TooLong {
                head: 0,
                max: MAX_CHAIN_DESCS
            }
        );
        // The driver claims 300 new entries in a 256-entry ring.
        mem.write_obj(300u16, GuestAddress(tq.avail + 2)).unwrap();
        let mut q = tq.queue();
        let e = pop_head(&mut q, &mem).unwrap_err();
        assert!(matches!(e, ChainError::AvailIdxAhead { ahead: 300, .. }));
        tq.avail_idx = 0;
        tq.publish(&mem, 0);
        assert_eq!(pop_head(&mut q, &mem).unwrap(), Some(0));
    }

    fn e_str(r: Result<Chain, ChainError>) -> String {
        r.unwrap_err().to_string()
    }
}
