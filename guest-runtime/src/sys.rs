//! The function's system calls into the guest kernel (`abi::user::sys`).
//!
//! Each is one `syscall` instruction; the kernel runs emulated on some hosts, so a call
//! costs tens of microseconds there: log sparingly.

use core::{arch::asm, fmt};

use crate::abi::user::sys as nr;

/// One system call with up to three arguments (`abi::user::sys` has the register contract).
///
/// # Safety
/// The arguments satisfy the call `number`'s rules (pointers into the function's memory).
#[inline(always)]
unsafe fn syscall(number: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    let ret;
    // SAFETY: the kernel preserves every register but the ones marked clobbered here and
    // does not touch the user stack (it switches to its own); memory it writes (the request
    // buffer, `random`'s target) is covered by the default memory clobber.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") number => ret,
            inlateout("rdi") a0 => _,
            inlateout("rsi") a1 => _,
            inlateout("rdx") a2 => _,
            lateout("rcx") _,
            lateout("r8") _,
            lateout("r9") _,
            lateout("r10") _,
            lateout("r11") _,
            options(nostack),
        )
    };
    ret
}

/// Writes `text` to the guest's serial console (the host's log of the VM).
pub fn log(text: &str) {
    // SAFETY: the kernel only reads `text`, which is valid for its length.
    unsafe { syscall(nr::LOG, text.as_ptr() as u64, text.len() as u64, 0) };
}

/// The kernel has no random source (the CPU lacks `rdrand`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RandomError;

impl fmt::Display for RandomError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the guest has no hardware random source (rdrand)")
    }
}

impl core::error::Error for RandomError {}

/// Fills `buf` with random bytes from the CPU's hardware generator, fresh in every VM (two
/// VMs restored from one snapshot never see the same bytes).
pub fn random(buf: &mut [u8]) -> Result<(), RandomError> {
    for chunk in buf.chunks_mut(nr::RANDOM_MAX as usize) {
        // SAFETY: the kernel writes at most `chunk.len()` bytes into `chunk`.
        let n = unsafe { syscall(nr::RANDOM, chunk.as_mut_ptr() as u64, chunk.len() as u64, 0) };
        if n != chunk.len() as u64 {
            return Err(RandomError);
        }
    }
    Ok(())
}

/// Delivers the previous result (`kind`, `bytes`) and waits for the next request; returns
/// its length (in the request buffer).
pub(crate) fn next(kind: u64, bytes: &[u8]) -> usize {
    // SAFETY: the kernel reads `bytes` (valid for its length), then writes the request buffer,
    // which no Rust reference covers across this call (the run loop makes the slice after).
    unsafe { syscall(nr::NEXT, kind, bytes.as_ptr() as u64, bytes.len() as u64) as usize }
}

/// Reports a panic with `message`; the kernel never returns.
pub(crate) fn panic(message: &[u8]) -> ! {
    // SAFETY: the kernel only reads `message`.
    unsafe { syscall(nr::PANIC, message.as_ptr() as u64, message.len() as u64, 0) };
    // The kernel does not return from PANIC; if it ever did, stop here for good.
    loop {
        core::hint::spin_loop();
    }
}
