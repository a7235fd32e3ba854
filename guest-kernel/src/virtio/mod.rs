//! Virtio drivers: the virtio-mmio transport ([`mmio`], virtio 1.x only), split virtqueues
//! ([`queue`]) and the socket device ([`vsock`]) that carries invocations.
//!
//! Devices are announced on the command line (`virtio_mmio.device=<size>@<addr>:<irq>`,
//! parsed by [`fnode_guest::abi::virtio::devices`]); `find_vsock` brings up the first
//! socket device it finds. Memory shared with devices comes from the heap, which the kernel
//! identity-maps, so a pointer is the guest physical address a device uses.

pub mod mmio;
pub mod queue;
pub mod vsock;

use fnode_guest::abi::virtio::{self as abi_virtio, DeviceParseError, MmioDevice, MAX_DEVICES};

/// What a driver needs from its transport besides the queues: notifications and waiting for
/// interrupts. [`mmio::MmioTransport`] is the real one; tests plug in a simulated device.
pub trait Transport {
    /// Tells the device that queue `queue` has new buffers.
    fn notify(&mut self, queue: u16);
    /// Blocks until the device has (probably) made progress: an interrupt arrived since the
    /// previous call. Spurious returns are allowed; the caller polls its queues after each.
    fn wait(&mut self);
    /// Forgets the interrupts that arrived so far (acknowledging them at the device), so
    /// that the next [`wait`](Self::wait) blocks until a new one. For a state that is
    /// snapshotted: a guest restored from it should not wake for an interrupt its snapshotted
    /// self already handled. The caller polls its queues afterwards (what a forgotten
    /// interrupt announced may not have been looked at yet).
    fn settle(&mut self);
}

/// The guest physical address of `ptr`: the kernel identity-maps RAM.
pub fn dma_addr<T: ?Sized>(ptr: *const T) -> u64 {
    ptr.cast::<u8>() as u64
}

/// Copies `n` bytes from `src` to `dst`.
///
/// On the guest this is `rep movsq` then `rep movsb`: a handful of instructions plus one per
/// 8 bytes, where a call to `memcpy` costs ~20 more, and kernel instructions may be emulated
/// one by one.
///
/// # Safety
/// As [`core::ptr::copy_nonoverlapping`]: `src` readable and `dst` writable for `n` bytes,
/// not overlapping.
#[inline(always)]
pub unsafe fn copy_bytes(dst: *mut u8, src: *const u8, n: usize) {
    #[cfg(target_os = "none")]
    // SAFETY: the caller's contract; the direction flag is clear (the ABI guarantees it).
    unsafe {
        core::arch::asm!(
            "rep movsq",
            "mov ecx, {tail:e}",
            "rep movsb",
            tail = in(reg) n & 7,
            inout("rcx") n >> 3 => _,
            inout("rsi") src => _,
            inout("rdi") dst => _,
            options(nostack, preserves_flags)
        );
    }
    #[cfg(not(target_os = "none"))]
    // SAFETY: the caller's contract.
    unsafe {
        core::ptr::copy_nonoverlapping(src, dst, n)
    };
}

/// Whether a device can reach `[addr, addr + len)` by the identity map.
pub fn dma_reachable(addr: u64, len: usize) -> bool {
    if cfg!(target_os = "none") {
        addr.checked_add(len as u64)
            .is_some_and(|end| end <= fnode_guest::abi::layout::IDENTITY_MAP_END)
    } else {
        // Host tests: "guest physical" addresses are the test's own pointers.
        true
    }
}

/// A `virtio_mmio.device=` word the kernel ignores, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored<'a> {
    /// The word does not parse.
    Bad(&'a str, DeviceParseError),
    /// More than [`MAX_DEVICES`] devices were announced.
    TooMany(&'a str),
}

impl core::fmt::Display for Ignored<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Ignored::Bad(word, e) => {
                write!(f, "ignoring {}={word}: {e}", abi_virtio::CMDLINE_KEY)
            }
            Ignored::TooMany(word) => write!(
                f,
                "ignoring {}={word}: at most {MAX_DEVICES} virtio-mmio devices are supported",
                abi_virtio::CMDLINE_KEY
            ),
        }
    }
}

/// The devices a command line announces, at most [`MAX_DEVICES`], in order; `ignored` hears
/// of every word left out.
pub fn announced_devices<'a>(
    cmdline: &'a str,
    mut ignored: impl FnMut(Ignored<'a>),
) -> ([MmioDevice; MAX_DEVICES], usize) {
    let mut found = [MmioDevice {
        size: 0,
        addr: 0,
        irq: 0,
    }; MAX_DEVICES];
    let mut n = 0;
    for (word, parsed) in abi_virtio::devices(cmdline) {
        match parsed {
            Err(e) => ignored(Ignored::Bad(word, e)),
            Ok(_) if n == MAX_DEVICES => ignored(Ignored::TooMany(word)),
            Ok(dev) => {
                found[n] = dev;
                n += 1;
            }
        }
    }
    (found, n)
}

#[cfg(target_os = "none")]
pub use imp::find_vsock;

#[cfg(target_os = "none")]
mod imp {
    use core::fmt::Write;

    use fnode_guest::abi::virtio::DEVICE_ID_VSOCK;

    use super::{
        announced_devices,
        mmio::{self, MmioTransport},
        vsock::{self, Vsock, VsockError},
        Transport,
    };
    use crate::{line::Line, pic, serial};

    impl Transport for MmioTransport {
        fn notify(&mut self, queue: u16) {
            MmioTransport::notify(self, queue);
        }

        /// Acknowledging an interrupt at the device is a VM exit, so it is not done when the
        /// interrupt wakes the CPU (that would put the exit between a request's arrival and
        /// its handling) but at the next wait, typically after the response went out: that
        /// wait acknowledges and returns at once (a spurious return, so the caller polls
        /// once more and misses nothing the acknowledgement cleared), the one after halts.
        /// A device that keeps its line raised until acknowledged (level-triggered) gets the
        /// acknowledgement before the CPU halts again, so its next event is a new edge.
        fn wait(&mut self) {
            if self.unacked {
                self.ack_interrupts();
                self.unacked = false;
                return;
            }
            pic::wait_for_interrupt();
            self.unacked = true;
        }

        fn settle(&mut self) {
            pic::forget_pending();
            self.ack_interrupts();
            self.unacked = false;
        }
    }

    fn log(what: &dyn core::fmt::Display) {
        let mut line = Line::log();
        // A `Line` never fails to take text; it cuts what does not fit.
        let _ = write!(line, "{what}");
        serial::write_line(&mut line);
    }

    /// Brings up the first virtio socket device the command line announces: maps the device
    /// windows, initialises the PIC, negotiates, sets up the queues and unmasks the device's
    /// IRQ. `Ok(None)` if no socket device is announced. Bad command-line words and devices
    /// that fail to come up are reported on the console and skipped.
    pub fn find_vsock(cmdline: &str) -> Option<Vsock<MmioTransport>> {
        let (devices, n) = announced_devices(cmdline, |ignored| log(&ignored));
        if n == 0 {
            return None;
        }
        if let Err(e) = mmio::map_device_windows() {
            log(&e);
            return None;
        }
        pic::init();
        for dev in &devices[..n] {
            let transport = match MmioTransport::new(dev) {
                Ok(t) => t,
                Err(e) => {
                    log(&e);
                    continue;
                }
            };
            match transport.probe() {
                Ok(DEVICE_ID_VSOCK) => {}
                Ok(_) => continue,
                Err(e) => {
                    log(&e);
                    continue;
                }
            }
            if !pic::unmask(dev.irq) {
                log(&format_args!(
                    "virtio-mmio device at {:#x}: IRQ {} is not a PIC line (0-15): fix the virtio_mmio.device command line",
                    dev.addr, dev.irq
                ));
                continue;
            }
            match vsock::init(transport) {
                Ok(v) => return Some(v),
                Err(e) => log(&ErrorChain(&e)),
            }
        }
        None
    }

    /// Displays an error with its sources: `outer: inner: ...`.
    struct ErrorChain<'a>(&'a VsockError);

    impl core::fmt::Display for ErrorChain<'_> {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            write!(f, "{}", self.0)?;
            let mut source = core::error::Error::source(self.0);
            while let Some(e) = source {
                write!(f, ": {e}")?;
                source = e.source();
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announced_devices_are_bounded_and_bad_words_reported() {
        let mut line =
            std::string::String::from("console=ttyS0 virtio_mmio.device=4K@0xd000000x:5");
        for i in 0..MAX_DEVICES + 2 {
            line.push_str(&std::format!(
                " virtio_mmio.device=4K@{:#x}:{}",
                0xd000_0000 + i * 0x1000,
                5 + i
            ));
        }
        let mut ignored = std::vec::Vec::new();
        let (devs, n) = announced_devices(&line, |i| ignored.push(i.to_string()));
        assert_eq!(n, MAX_DEVICES);
        assert_eq!(
            devs[0],
            MmioDevice {
                size: 0x1000,
                addr: 0xd000_0000,
                irq: 5
            }
        );
        assert_eq!(devs[MAX_DEVICES - 1].irq, 5 + MAX_DEVICES as u32 - 1);
        assert_eq!(ignored.len(), 3, "{ignored:?}");
        assert!(
            ignored[0].contains("virtio_mmio.device=4K@0xd000000x:5"),
            "{}",
            ignored[0]
        );
        assert!(
            ignored[0].contains("the address is not a number"),
            "{}",
            ignored[0]
        );
        assert!(
            ignored[1].contains("at most 8 virtio-mmio devices"),
            "{}",
            ignored[1]
        );
    }

    #[test]
    fn no_devices_on_a_plain_command_line() {
        let (_, n) = announced_devices("console=ttyS0 fault=ud2", |_| panic!("nothing to ignore"));
        assert_eq!(n, 0);
    }
}
