//! Ending the guest through the exit port ([`abi::exit`]).

use core::arch::asm;

use fnode_guest::abi;

/// Ends the VM with `status` ([`abi::exit::SUCCESS`], [`abi::exit::FAILURE`] or
/// [`abi::exit::FAULT`]). Halts forever if no exit device answers.
pub fn exit(status: u32) -> ! {
    // SAFETY: a 32-bit write to the exit port has no effect on guest memory; the VMM (or
    // QEMU's isa-debug-exit) ends the VM.
    unsafe {
        asm!("out dx, eax", in("dx") abi::exit::PORT, in("eax") status,
             options(nomem, nostack, preserves_flags))
    };
    halt()
}

/// Stops the CPU for good: interrupts off, `hlt`.
pub fn halt() -> ! {
    loop {
        // SAFETY: disabling interrupts and halting touch no memory; nothing runs afterwards.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) };
    }
}

/// Prints `fnode guest-kernel: <what>` and exits with [`abi::exit::FAILURE`].
pub fn fail(what: &dyn core::fmt::Display) -> ! {
    use core::fmt::Write;

    let mut line = crate::line::Line::log();
    // A `Line` never fails to take text; it cuts what does not fit.
    let _ = write!(line, "{what}");
    crate::serial::write_line(&mut line);
    exit(abi::exit::FAILURE)
}
