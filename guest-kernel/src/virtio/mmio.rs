//! The virtio-mmio transport, virtio 1.x (register layout version 2) only.
//!
//! Every register access is a VM exit, so the driver touches registers only at
//! initialisation, to notify a queue, and to acknowledge an interrupt. Device windows must
//! lie in the guest's fourth GiB, which `map_device_windows` maps uncached (the boot
//! identity map covers RAM only).

use core::ptr::{read_volatile, write_volatile};

use fnode_guest::abi::virtio::MmioDevice;

use super::queue::SplitQueue;

/// `MagicValue`: "virt".
const MAGIC: u32 = 0x7472_6976;
/// The register layout of virtio 1.x devices (legacy devices report 1).
const VERSION_MODERN: u32 = 2;

// Register offsets (virtio 1.x, section 4.2.2).
const REG_MAGIC: usize = 0x000;
const REG_VERSION: usize = 0x004;
const REG_DEVICE_ID: usize = 0x008;
const REG_DEVICE_FEATURES: usize = 0x010;
const REG_DEVICE_FEATURES_SEL: usize = 0x014;
const REG_DRIVER_FEATURES: usize = 0x020;
const REG_DRIVER_FEATURES_SEL: usize = 0x024;
const REG_QUEUE_SEL: usize = 0x030;
const REG_QUEUE_NUM_MAX: usize = 0x034;
const REG_QUEUE_NUM: usize = 0x038;
const REG_QUEUE_READY: usize = 0x044;
const REG_QUEUE_NOTIFY: usize = 0x050;
const REG_INTERRUPT_ACK: usize = 0x064;
const REG_STATUS: usize = 0x070;
const REG_QUEUE_DESC_LOW: usize = 0x080;
const REG_QUEUE_DESC_HIGH: usize = 0x084;
const REG_QUEUE_DRIVER_LOW: usize = 0x090;
const REG_QUEUE_DRIVER_HIGH: usize = 0x094;
const REG_QUEUE_DEVICE_LOW: usize = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: usize = 0x0a4;
/// Start of the device-specific configuration space.
pub const REG_CONFIG: usize = 0x100;

// Device status bits (virtio 1.x, section 2.1).
const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 128;

/// `InterruptStatus` bits: a used buffer, a configuration change.
const INTERRUPT_ALL: u32 = 0b11;

/// Feature bit 32: the device follows virtio 1.x (not the legacy interface).
pub const F_VERSION_1: u64 = 1 << 32;
/// Feature bit 29: notifications and interrupts are asked for with event indices
/// (`avail_event`, `used_event`), which lets either side skip the ones the other does not
/// need.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// Errors of the transport. Each names the device window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MmioError {
    /// The window is not where the kernel maps device memory.
    #[error(
        "virtio-mmio window {addr:#x} (+{size:#x}) is outside [{start:#x}, {end:#x}), where \
         the kernel maps devices: fix the virtio_mmio.device command line",
        start = WINDOWS_START,
        end = WINDOWS_END
    )]
    Unmapped {
        /// The window's address.
        addr: u64,
        /// The window's size.
        size: u64,
    },
    /// No virtio-mmio device answers at the address.
    #[error("no virtio-mmio device at {addr:#x} (magic {magic:#010x}): check the virtio_mmio.device command line")]
    BadMagic {
        /// The window's address.
        addr: u64,
        /// What the magic register read.
        magic: u32,
    },
    /// A legacy (virtio 0.9) device.
    #[error("virtio-mmio device at {addr:#x} uses register layout {version}; fnode drives only virtio 1.x devices (version 2): configure the VMM for modern virtio-mmio")]
    Legacy {
        /// The window's address.
        addr: u64,
        /// What the version register read.
        version: u32,
    },
    /// The device does not offer a feature the driver needs.
    #[error("virtio-mmio device at {addr:#x} lacks features {missing:#x} fnode needs (VIRTIO_F_VERSION_1 is bit 32)")]
    MissingFeatures {
        /// The window's address.
        addr: u64,
        /// The needed feature bits the device did not offer.
        missing: u64,
    },
    /// The device did not accept the negotiated features.
    #[error("virtio-mmio device at {addr:#x} refused the features fnode selected (FEATURES_OK was cleared)")]
    FeaturesRefused {
        /// The window's address.
        addr: u64,
    },
    /// A queue the driver needs does not exist or is already live.
    #[error("virtio-mmio device at {addr:#x}: queue {queue} is missing or already in use")]
    QueueUnavailable {
        /// The window's address.
        addr: u64,
        /// The queue index.
        queue: u16,
    },
    /// The fourth GiB of the address space is mapped to something other than devices.
    #[error(
        "the page tables already map [{start:#x}, {end:#x}) to something else: virtio-mmio \
         windows cannot be mapped there",
        start = WINDOWS_START,
        end = WINDOWS_END
    )]
    WindowsTaken,
    /// A queue is smaller than the driver needs.
    #[error(
        "virtio-mmio device at {addr:#x}: queue {queue} holds {max} entries, fnode needs {need}"
    )]
    QueueTooSmall {
        /// The window's address.
        addr: u64,
        /// The queue index.
        queue: u16,
        /// The device's `QueueNumMax`.
        max: u32,
        /// What the driver needs.
        need: u16,
    },
}

/// Start of the range `map_device_windows` maps: the fourth GiB.
pub const WINDOWS_START: u64 = 3 << 30;
/// End of the mapped range.
pub const WINDOWS_END: u64 = 4 << 30;

/// One virtio-mmio device's register window.
#[derive(Debug)]
pub struct MmioTransport {
    base: u64,
    /// An interrupt woke the last wait and has not been acknowledged at the device yet
    /// (acknowledging is a VM exit, deferred until the next wait: see `Transport::wait`).
    #[cfg_attr(not(target_os = "none"), allow(dead_code))]
    pub(crate) unacked: bool,
}

impl MmioTransport {
    /// The transport for `dev`, after checking the window is mapped (see
    /// `map_device_windows`) and big enough for the registers and a small config space.
    pub fn new(dev: &MmioDevice) -> Result<Self, MmioError> {
        let end = dev.addr.checked_add(dev.size);
        let min = (REG_CONFIG + 0x100) as u64;
        if dev.addr < WINDOWS_START || end.is_none_or(|e| e > WINDOWS_END) || dev.size < min {
            return Err(MmioError::Unmapped {
                addr: dev.addr,
                size: dev.size,
            });
        }
        Ok(MmioTransport {
            base: dev.addr,
            unacked: false,
        })
    }

    /// The window's address.
    pub fn addr(&self) -> u64 {
        self.base
    }

    fn read(&self, reg: usize) -> u32 {
        // SAFETY: `new` checked the register lies in a mapped device window; a 32-bit
        // aligned read is how virtio-mmio registers are accessed.
        unsafe { read_volatile((self.base as usize + reg) as *const u32) }
    }

    fn write(&self, reg: usize, value: u32) {
        // SAFETY: as in `read`.
        unsafe { write_volatile((self.base as usize + reg) as *mut u32, value) }
    }

    /// Checks the magic and version and returns the device id (0: no device behind the
    /// window).
    pub fn probe(&self) -> Result<u32, MmioError> {
        let magic = self.read(REG_MAGIC);
        if magic != MAGIC {
            return Err(MmioError::BadMagic {
                addr: self.base,
                magic,
            });
        }
        let version = self.read(REG_VERSION);
        if version != VERSION_MODERN {
            return Err(MmioError::Legacy {
                addr: self.base,
                version,
            });
        }
        Ok(self.read(REG_DEVICE_ID))
    }

    /// Resets the device and negotiates features (virtio 1.x, section 3.1.1 steps 1-6): the
    /// driver accepts `needed | (wanted & offered)`. Returns the accepted features.
    pub fn negotiate(&self, needed: u64, wanted: u64) -> Result<u64, MmioError> {
        self.write(REG_STATUS, 0);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE);
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let offered = self.features();
        let missing = needed & !offered;
        if missing != 0 {
            self.write(REG_STATUS, STATUS_FAILED);
            return Err(MmioError::MissingFeatures {
                addr: self.base,
                missing,
            });
        }
        let accepted = needed | (wanted & offered);
        self.write(REG_DRIVER_FEATURES_SEL, 0);
        self.write(REG_DRIVER_FEATURES, accepted as u32);
        self.write(REG_DRIVER_FEATURES_SEL, 1);
        self.write(REG_DRIVER_FEATURES, (accepted >> 32) as u32);
        let status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        self.write(REG_STATUS, status);
        if self.read(REG_STATUS) & STATUS_FEATURES_OK == 0 {
            self.write(REG_STATUS, STATUS_FAILED);
            return Err(MmioError::FeaturesRefused { addr: self.base });
        }
        Ok(accepted)
    }

    fn features(&self) -> u64 {
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let low = self.read(REG_DEVICE_FEATURES);
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        let high = self.read(REG_DEVICE_FEATURES);
        u64::from(high) << 32 | u64::from(low)
    }

    /// Creates queue `index` with up to `want` entries (at least `need`) and hands it to the
    /// device (section 4.2.3.2).
    pub fn setup_queue(&self, index: u16, want: u16, need: u16) -> Result<SplitQueue, MmioError> {
        self.write(REG_QUEUE_SEL, u32::from(index));
        if self.read(REG_QUEUE_READY) != 0 {
            return Err(MmioError::QueueUnavailable {
                addr: self.base,
                queue: index,
            });
        }
        let max = self.read(REG_QUEUE_NUM_MAX);
        if max == 0 {
            return Err(MmioError::QueueUnavailable {
                addr: self.base,
                queue: index,
            });
        }
        let size = u16::try_from(max).unwrap_or(u16::MAX).min(want);
        let queue = SplitQueue::new(index, size).map_err(|_| MmioError::QueueUnavailable {
            addr: self.base,
            queue: index,
        })?;
        if queue.size() < need {
            return Err(MmioError::QueueTooSmall {
                addr: self.base,
                queue: index,
                max,
                need,
            });
        }
        let (desc, avail, used) = queue.addresses();
        self.write(REG_QUEUE_NUM, u32::from(queue.size()));
        self.write(REG_QUEUE_DESC_LOW, desc as u32);
        self.write(REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
        self.write(REG_QUEUE_DRIVER_LOW, avail as u32);
        self.write(REG_QUEUE_DRIVER_HIGH, (avail >> 32) as u32);
        self.write(REG_QUEUE_DEVICE_LOW, used as u32);
        self.write(REG_QUEUE_DEVICE_HIGH, (used >> 32) as u32);
        self.write(REG_QUEUE_READY, 1);
        Ok(queue)
    }

    /// Tells the device the driver is ready (section 3.1.1 step 8).
    pub fn driver_ok(&self) {
        self.write(
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    /// Marks the device failed (the driver gave up on it).
    pub fn fail(&self) {
        self.write(REG_STATUS, STATUS_FAILED);
    }

    /// Reads a little-endian `u64` from the configuration space (two 32-bit reads; virtio-mmio
    /// allows narrower accesses only).
    pub fn config_u64(&self, offset: usize) -> u64 {
        let low = self.read(REG_CONFIG + offset);
        let high = self.read(REG_CONFIG + offset + 4);
        u64::from(high) << 32 | u64::from(low)
    }

    /// Notifies the device that queue `index` has new buffers: one exit (an ioeventfd on
    /// fnode-vmm).
    pub fn notify(&self, index: u16) {
        self.write(REG_QUEUE_NOTIFY, u32::from(index));
    }

    /// Acknowledges every interrupt cause at once: one exit. The status register is not
    /// read (that would be a second exit): the driver polls all its queues after each
    /// acknowledgement anyway, and acknowledging a cause that is not pending is harmless.
    pub fn ack_interrupts(&self) {
        self.write(REG_INTERRUPT_ACK, INTERRUPT_ALL);
    }
}

/// Maps the device windows ([`WINDOWS_START`], [`WINDOWS_END`]) uncached, with 2 MiB pages.
///
/// The page directory is initialised data (no loop at boot): this function only links it
/// into the boot page tables' PDPT, one store. Calling it again is harmless; it fails if the
/// fourth GiB is already mapped to something else.
#[cfg(target_os = "none")]
pub fn map_device_windows() -> Result<(), MmioError> {
    use core::arch::asm;

    let entry = (&raw const DEVICE_PD as u64) | PTE_PRESENT | PTE_WRITABLE;
    let cr3: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags)) };
    let pml4 = (cr3 & ADDR_MASK) as *const u64;
    // SAFETY: the boot page tables are identity-mapped static data; PML4[0] maps the low
    // 512 GiB through the boot PDPT, which the kernel never frees or moves.
    let pdpt = (unsafe { pml4.read_volatile() } & ADDR_MASK) as *mut u64;
    // SAFETY: `slot` < 512: an entry of the boot PDPT.
    let slot = unsafe { pdpt.add((WINDOWS_START >> 30) as usize) };
    // SAFETY: as above.
    let old = unsafe { slot.read_volatile() };
    if old & PTE_PRESENT != 0 && old & ADDR_MASK != entry & ADDR_MASK {
        return Err(MmioError::WindowsTaken);
    }
    // SAFETY: the entry is empty (or already ours): the boot tables map RAM below
    // IDENTITY_MAP_END only. A not-present entry is never cached, so no TLB flush is needed.
    unsafe { slot.write_volatile(entry) };
    Ok(())
}

#[cfg(target_os = "none")]
use crate::x86::PTE_ADDR as ADDR_MASK;
use crate::x86::{
    HUGE_PAGE, PTE_CACHE_DISABLE, PTE_HUGE, PTE_PRESENT, PTE_WRITABLE, PTE_WRITE_THROUGH,
};

/// A page directory: 512 entries, page-aligned.
#[repr(C, align(4096))]
struct PageDirectory([u64; 512]);

/// The fourth GiB, identity-mapped uncached with 2 MiB pages. Mutable (so it lands in
/// `.data`, not `.rodata`) because the CPU sets accessed bits in it.
#[cfg_attr(not(target_os = "none"), allow(dead_code))]
static mut DEVICE_PD: PageDirectory = PageDirectory(device_pd());

const fn device_pd() -> [u64; 512] {
    let mut pd = [0u64; 512];
    let mut i = 0;
    while i < 512 {
        pd[i] = (WINDOWS_START + i as u64 * HUGE_PAGE)
            | PTE_PRESENT
            | PTE_WRITABLE
            | PTE_WRITE_THROUGH
            | PTE_CACHE_DISABLE
            | PTE_HUGE;
        i += 1;
    }
    pd
}

#[cfg(test)]
mod tests {
    use fnode_guest::abi::virtio::{MMIO_BASE, MMIO_SIZE};

    use super::*;

    #[test]
    fn accepts_only_mapped_windows() {
        let dev = |addr, size| MmioDevice { addr, size, irq: 5 };
        MmioTransport::new(&dev(MMIO_BASE, MMIO_SIZE)).unwrap();
        MmioTransport::new(&dev(0xfeb0_0000, 0x200)).unwrap();
        for (addr, size) in [
            (0x1000_0000, 0x1000),
            (0xffff_f000, 0x2000),
            (MMIO_BASE, 0x100),
        ] {
            assert_eq!(
                MmioTransport::new(&dev(addr, size)).unwrap_err(),
                MmioError::Unmapped { addr, size }
            );
        }
    }

    #[test]
    fn device_pd_maps_the_fourth_gib_uncached() {
        let pd = device_pd();
        let slot = ((MMIO_BASE - WINDOWS_START) / HUGE_PAGE) as usize;
        assert_eq!(pd[slot] & !0xfff, MMIO_BASE);
        assert_eq!(pd[slot] & 0xfff, 0x9b);
        assert_eq!(pd[511] & !0xfff, WINDOWS_END - HUGE_PAGE);
        const { assert!(WINDOWS_START <= MMIO_BASE && MMIO_BASE < WINDOWS_END) };
    }
}
