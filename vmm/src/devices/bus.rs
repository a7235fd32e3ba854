//! The PIO and MMIO buses the vCPU exit dispatch routes accesses through.
//!
//! A bus maps non-overlapping address ranges to devices. Lookups are a binary search over
//! the sorted ranges. Accesses to addresses no device claims are ignored (writes) or read as
//! all ones (reads), like an open bus on a PC: a guest probing for hardware never crashes
//! the VMM.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

/// A device on a bus. `offset` is relative to the base address the device was inserted at.
/// Guest accesses are untrusted: a device must accept any offset and any length (1..=8 bytes
/// for PIO/MMIO) without panicking.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset`; fill `data`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus (used by every vCPU thread) and its owner.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// A range of bus addresses: `[base, base + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BusRange {
    /// First address.
    pub base: u64,
    /// Number of addresses (non-zero).
    pub len: u64,
}

impl BusRange {
    /// Last address in the range (inclusive; cannot overflow for a range the bus accepted).
    pub fn last(&self) -> u64 {
        self.base + (self.len - 1)
    }

    /// Whether `addr` is in the range.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len
    }

    /// Whether the two ranges share an address.
    pub fn overlaps(&self, other: &BusRange) -> bool {
        self.base <= other.last() && other.base <= self.last()
    }
}

/// Errors inserting a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// A device must claim at least one address.
    #[error("bus range at {base:#x} has zero length")]
    ZeroLength {
        /// Requested base.
        base: u64,
    },
    /// `base + len` overflows the address space.
    #[error("bus range {base:#x}+{len:#x} overflows the address space")]
    Overflow {
        /// Requested base.
        base: u64,
        /// Requested length.
        len: u64,
    },
    /// The range overlaps a device already on the bus.
    #[error(
        "bus range {:#x}..={:#x} overlaps the device at {:#x}..={:#x}",
        new.base, new.last(), existing.base, existing.last()
    )]
    Overlap {
        /// The range asked for.
        new: BusRange,
        /// The range already taken.
        existing: BusRange,
    },
}

/// One bus: sorted, non-overlapping ranges, each with its device.
#[derive(Default)]
pub struct Bus {
    entries: Vec<(BusRange, SharedDevice)>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|(r, _)| r))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Bus::default()
    }

    /// Puts `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        if base.checked_add(len - 1).is_none() {
            return Err(BusError::Overflow { base, len });
        }
        let new = BusRange { base, len };
        let idx = self.entries.partition_point(|(r, _)| r.base < base);
        // Only the neighbours can overlap, since the existing ranges are disjoint and sorted.
        let neighbours = idx
            .checked_sub(1)
            .into_iter()
            .chain((idx < self.entries.len()).then_some(idx));
        for i in neighbours {
            let existing = self.entries[i].0;
            if existing.overlaps(&new) {
                return Err(BusError::Overlap { new, existing });
            }
        }
        self.entries.insert(idx, (new, device));
        Ok(())
    }

    /// The device whose range holds `addr`, with `addr`'s offset into that range.
    pub fn resolve(&self, addr: u64) -> Option<(&SharedDevice, u64)> {
        let idx = self.entries.partition_point(|(r, _)| r.base <= addr);
        let (range, device) = self.entries.get(idx.checked_sub(1)?)?;
        range.contains(addr).then(|| (device, addr - range.base))
    }

    /// Routes a guest read at `addr`. Unclaimed addresses read as all ones. Returns whether a
    /// device took the access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                lock(device).read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Routes a guest write at `addr`. Writes to unclaimed addresses are dropped. Returns
    /// whether a device took the access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr) {
            Some((device, offset)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }

    /// The ranges on this bus, in address order.
    pub fn ranges(&self) -> impl Iterator<Item = BusRange> + '_ {
        self.entries.iter().map(|(r, _)| *r)
    }
}

/// Locks a device. A device whose lock was poisoned (a panic in another vCPU thread) is still
/// used: device state is plain data and the guest is about to be stopped anyway.
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The two buses of a VM, shared by all its vCPU threads.
#[derive(Debug, Default)]
pub struct Buses {
    /// Port I/O (`in`/`out`).
    pub pio: Bus,
    /// Memory-mapped I/O (accesses to guest physical addresses outside guest memory).
    pub mmio: Bus,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the last access; reads return `offset` in every byte.
    #[derive(Default)]
    struct Probe {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    fn probe() -> (Arc<Mutex<Probe>>, SharedDevice) {
        let p = Arc::new(Mutex::new(Probe::default()));
        let shared: SharedDevice = p.clone();
        (p, shared)
    }

    #[test]
    fn lookup_finds_the_right_device_and_offset() {
        let mut bus = Bus::new();
        let (_, a) = probe();
        let (_, b) = probe();
        bus.insert(a, 0x3f8, 8).unwrap();
        bus.insert(b, 0x100, 0x10).unwrap();
        assert_eq!(bus.resolve(0x3f8).map(|(_, o)| o), Some(0));
        assert_eq!(bus.resolve(0x3ff).map(|(_, o)| o), Some(7));
        assert_eq!(bus.resolve(0x10f).map(|(_, o)| o), Some(0xf));
        assert!(bus.resolve(0x400).is_none());
        assert!(bus.resolve(0x3f7).is_none());
        assert!(bus.resolve(0).is_none());
        assert!(bus.resolve(u64::MAX).is_none());
        assert_eq!(
            bus.ranges().collect::<Vec<_>>(),
            vec![
                BusRange {
                    base: 0x100,
                    len: 0x10
                },
                BusRange {
                    base: 0x3f8,
                    len: 8
                }
            ]
        );
    }

    #[test]
    fn overlapping_ranges_are_rejected() {
        let mut bus = Bus::new();
        bus.insert(probe().1, 0x10, 0x10).unwrap();
        for (base, len) in [(0x10, 1), (0x1f, 1), (0x8, 0x9), (0x0, 0x100), (0x18, 0x10)] {
            let err = bus.insert(probe().1, base, len).unwrap_err();
            assert!(
                matches!(err, BusError::Overlap { .. }),
                "{base:#x}+{len:#x}"
            );
        }
        // Adjacent ranges are fine on both sides.
        bus.insert(probe().1, 0x20, 0x10).unwrap();
        bus.insert(probe().1, 0x0, 0x10).unwrap();
        assert_eq!(bus.ranges().count(), 3);
    }

    #[test]
    fn zero_length_and_overflowing_ranges_are_rejected() {
        let mut bus = Bus::new();
        assert_eq!(
            bus.insert(probe().1, 5, 0),
            Err(BusError::ZeroLength { base: 5 })
        );
        assert_eq!(
            bus.insert(probe().1, u64::MAX, 2),
            Err(BusError::Overflow {
                base: u64::MAX,
                len: 2
            })
        );
        // The very last address is usable.
        bus.insert(probe().1, u64::MAX, 1).unwrap();
        assert!(bus.resolve(u64::MAX).is_some());
    }

    #[test]
    fn dispatch_and_unmapped_accesses() {
        let mut bus = Bus::new();
        let (p, shared) = probe();
        bus.insert(shared, 0x1000, 0x100).unwrap();

        let mut data = [0u8; 4];
        assert!(bus.read(0x1004, &mut data));
        assert_eq!(data, [4; 4]);
        assert!(bus.write(0x1010, &[1, 2]));
        assert_eq!(p.lock().unwrap().last_write, Some((0x10, vec![1u8, 2])));

        let mut data = [0u8; 8];
        assert!(!bus.read(0x2000, &mut data));
        assert_eq!(data, [0xff; 8]);
        assert!(!bus.write(0x2000, &[1]));
        assert!(!bus.read(0, &mut []));
    }
}
