//! Console output on COM1, the 16550 UART every fnode VMM (and QEMU) emulates.
//!
//! Every port access is a VM exit, so this driver does the least it can:
//! - No initialisation: an emulated 16550 comes out of reset with the divisor latch off (so
//!   writes to port 0 go to the transmitter) and its interrupts disabled, and the baud rate
//!   means nothing to it.
//! - No polling of the line status register: an emulated transmitter is always ready.
//!   vm-superio reports THR empty at all times; QEMU hands each byte to its chardev at once
//!   (only a chardev that would block, such as a full pipe, can make it drop bytes).
//! - Text goes out with one `rep outsb` per write: the fewest guest instructions. KVM still
//!   exits to the VMM once per byte (its emulator does string port output one element at a
//!   time), so every byte printed on a hot path costs an exit: print little.
//!
//! This is not a driver for a physical UART, which needs all three.

use core::arch::asm;

use fnode_guest::abi::serial::COM1_PORT;

use crate::line::Line;

/// Writes `bytes` to the console.
pub fn write(bytes: &[u8]) {
    // SAFETY: `rep outsb` reads `bytes.len()` bytes from `bytes` (DF is clear, as the ABI
    // guarantees) and writes them to the UART's transmit register; it touches no other memory.
    unsafe {
        asm!(
            "rep outsb",
            in("dx") COM1_PORT,
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            options(nostack, preserves_flags, readonly)
        )
    };
}

/// Writes `line` and a newline to the console.
pub fn write_line(line: &mut Line) {
    write(line.finish());
}
