//! `badmem` (a test function): its handler touches memory a function does not own. The
//! kernel reports the page fault to the host (an error frame naming `#PF` and the address)
//! and ends the VM.
//!
//! The request picks the access: `kernel` (default: read the kernel's first page),
//! `write-kernel` (write it), `unmapped` (read above guest RAM), `null` (read address 0),
//! `df-fault` (set the direction flag, then fault: the kernel must clear the flag before its
//! own code runs, or its copies run backwards over its memory), `df-next:<hex>` (set the
//! direction flag and make the `NEXT` call by jumping to the kernel's system call entry at
//! `<hex>`, answering with [`DF_ANSWER`]: the kernel must send it intact), `bad-return:<hex>`
//! (make the `NEXT` call by jumping to the kernel's system call entry at `<hex>` with the
//! non-canonical return address [`BAD_RETURN`] in `rcx`: the kernel must refuse it as this
//! function's fault, not `iretq` to it).
#![no_std]
#![no_main]

use fnode_guest::{abi, Function, Response};

struct BadMem;

/// The response `df-next` sends.
pub const DF_ANSWER: &[u8] = b"the kernel copied this response intact";

/// The return address `bad-return` hands the kernel: not canonical.
pub const BAD_RETURN: u64 = 0x8000_0000_0000_0000;

/// `hex` (hex digits, no `0x`) as a number.
fn parse_hex(hex: &[u8]) -> Option<u64> {
    hex.iter().try_fold(0u64, |v, &c| {
        let d = (c as char).to_digit(16)?;
        v.checked_mul(16)?.checked_add(u64::from(d))
    })
}

impl Function for BadMem {
    fn init() -> Self {
        BadMem
    }

    fn handle(&mut self, request: &[u8]) -> Response<'_> {
        if request == b"df-fault" {
            // SAFETY: deliberately hostile: sets the direction flag and raises #UD, which ends
            // the function; the kernel must report the fault intact.
            unsafe { core::arch::asm!("std", "ud2", options(noreturn, nostack)) };
        }
        if let Some(hex) = request.strip_prefix(b"df-next:") {
            let Some(entry) = parse_hex(hex) else {
                return Err("df-next needs the kernel's system call entry in hex".into());
            };
            // SAFETY: deliberately hostile: a `NEXT` call made by jumping to the kernel's
            // entry with the direction flag set. It returns (to label 2, with the flag
            // cleared again) only if another request comes, which `invoke=` never sends.
            unsafe {
                core::arch::asm!(
                    "std",
                    "lea rcx, [rip + 2f]",
                    "jmp {entry}",
                    "2:",
                    "cld",
                    entry = in(reg) entry,
                    inout("rax") abi::user::sys::NEXT => _,
                    inout("rdi") u64::from(abi::frame::KIND_RESPONSE) => _,
                    inout("rsi") DF_ANSWER.as_ptr() => _,
                    inout("rdx") DF_ANSWER.len() => _,
                    out("rcx") _,
                    out("r8") _,
                    out("r9") _,
                    out("r10") _,
                    out("r11") _,
                )
            };
            return Err("NEXT returned after the last request".into());
        }
        if let Some(hex) = request.strip_prefix(b"bad-return:") {
            let Some(entry) = parse_hex(hex) else {
                return Err("bad-return needs the kernel's system call entry in hex".into());
            };
            // SAFETY: deliberately hostile: a `NEXT` call made by jumping to the kernel's
            // entry with a non-canonical return address. The kernel must end the function
            // there; if it ever returns, it returns to BAD_RETURN, which faults.
            unsafe {
                core::arch::asm!(
                    "jmp {entry}",
                    entry = in(reg) entry,
                    in("rcx") BAD_RETURN,
                    in("rax") abi::user::sys::NEXT,
                    in("rdi") u64::from(abi::frame::KIND_RESPONSE),
                    in("rsi") DF_ANSWER.as_ptr(),
                    in("rdx") DF_ANSWER.len(),
                    options(noreturn, nostack),
                )
            };
        }
        let addr = match request {
            b"unmapped" => abi::layout::IDENTITY_MAP_END + 0x1000,
            b"null" => 0,
            _ => abi::layout::KERNEL_START,
        };
        let p = addr as *mut u64;
        if request == b"write-kernel" {
            // SAFETY: deliberately not safe: the kernel must refuse this write with a fault.
            unsafe { p.write_volatile(0x0bad_0bad) };
        } else {
            // SAFETY: deliberately not safe: the kernel must refuse this read with a fault.
            let v = unsafe { p.read_volatile() };
            return Err(fnode_guest::Error::msg(format_args!(
                "read {addr:#x} = {v:#x}: memory isolation is broken"
            )));
        }
        Err("wrote to the kernel's memory: memory isolation is broken".into())
    }
}

fnode_guest::entry!(BadMem);
