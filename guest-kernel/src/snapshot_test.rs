//! `snapshot-test=1` ([`abi::cmdline::SNAPSHOT_TEST_KEY`]): a guest that proves a snapshot
//! restored it correctly.
//!
//! It computes a value from the TSC (different on every boot), keeps it in memory and in a
//! callee-saved register, prints it, signals READY (where the VMM snapshots it), and then
//! prints the value as it finds it in memory and in the register. Only a guest whose memory
//! and registers were restored prints, after READY, the value its snapshotted self printed
//! before it.

use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use fnode_guest::abi;

use crate::{exit, line::Line, serial};

/// The value, in guest memory.
static VALUE: AtomicU64 = AtomicU64::new(0);

/// Runs the test; never returns (exits with `SUCCESS` or `FAILURE`).
pub fn run() -> ! {
    // SAFETY: rdtsc reads the time-stamp counter into edx:eax; nothing else.
    let tsc = unsafe {
        let (lo, hi): (u32, u32);
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
        (u64::from(hi) << 32) | u64::from(lo)
    };
    // Never zero, so a page of zeros cannot pass for it.
    let value = tsc.rotate_left(17) | 1;
    VALUE.store(value, Ordering::SeqCst);

    let mut line = Line::new();
    line.str(abi::cmdline::SNAPSHOT_TEST_READY).hex(value);
    serial::write_line(&mut line);

    // READY, with the value in r12 across the write (and the snapshot taken there).
    let in_register: u64;
    // SAFETY: a 32-bit write to the control port (see `control::ready`); r12 is only carried
    // through. Not `nomem`: the compiler must read VALUE from memory again afterwards.
    unsafe {
        asm!("out dx, eax", in("dx") abi::control::PORT, in("eax") abi::control::READY,
             inout("r12") value => in_register, options(nostack, preserves_flags))
    };
    let in_memory = VALUE.load(Ordering::SeqCst);

    let mut line = Line::new();
    line.str(abi::cmdline::SNAPSHOT_TEST_RESUMED)
        .hex(in_memory)
        .str(" ")
        .hex(in_register);
    serial::write_line(&mut line);
    if in_memory == value && in_register == value {
        exit::exit(abi::exit::SUCCESS)
    }
    exit::exit(abi::exit::FAILURE)
}
