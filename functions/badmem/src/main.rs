//! `badmem` (a test function): its handler touches memory a function does not own. The
//! kernel reports the page fault to the host (an error frame naming `#PF` and the address)
//! and ends the VM.
//!
//! The request picks the access: `kernel` (default: read the kernel's first page),
//! `write-kernel` (write it), `unmapped` (read above guest RAM), `null` (read address 0).
#![no_std]
#![no_main]

use fnode_guest::{abi, Function, Response};

struct BadMem;

impl Function for BadMem {
    fn init() -> Self {
        BadMem
    }

    fn handle(&mut self, request: &[u8]) -> Response<'_> {
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
