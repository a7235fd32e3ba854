//! The control port ([`abi::control`]): telling the VMM where the guest is in its life.

use core::arch::asm;

use fnode_guest::abi;

/// Tells the VMM that init is done and the guest waits for work
/// ([`abi::control::READY`]). A VMM taking a snapshot pauses the guest on this write and a
/// restored guest continues right after it; otherwise (or under QEMU) it costs one exit.
#[inline]
pub fn ready() {
    write(abi::control::READY);
}

/// Tells the VMM that the kernel is up and the function's `init` starts now
/// ([`abi::control::BOOTED`]); one exit, on cold starts only.
pub fn booted() {
    write(abi::control::BOOTED);
}

/// Tells the VMM that this invocation is over: its response is with the device in full
/// ([`abi::control::DONE`]). A VMM that resets the VM between invocations resets it right
/// here and the guest does not run past this write; otherwise it costs one exit.
#[inline(always)]
pub fn done() {
    // SAFETY: a 32-bit write to the control port. Not `nomem`: the VMM reads what the
    // driver put in the transmit ring at this exit, so every store before it must be
    // emitted before it (a compiler barrier). The VMM may reset the whole VM here (the
    // guest then never runs past the write) or let it go on.
    unsafe {
        asm!("out dx, eax", in("dx") abi::control::PORT, in("eax") abi::control::DONE,
             options(nostack, preserves_flags))
    };
}

fn write(message: u32) {
    // SAFETY: a 32-bit write to the control port touches no guest memory; the VMM at most
    // pauses the vCPU, which resumes here.
    unsafe {
        asm!("out dx, eax", in("dx") abi::control::PORT, in("eax") message,
             options(nomem, nostack, preserves_flags))
    };
}
