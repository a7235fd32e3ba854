//! `fnode-guest-kernel`: the `no_std` kernel every fnode guest image is built on.
//!
//! It owns the way from the PVH entry to an image's code: the PVH note, 32-bit entry, boot
//! page tables and long mode (`boot.rs`), GDT and TSS ([`gdt`]), exceptions and the fault
//! report ([`idt`]), the serial console (`serial`), the PVH boot data ([`pvh`]), the heap
//! ([`heap`]), the exit port (`exit`), panics (`panic.rs`) and the `fault=` test switches
//! ([`cmdline`]). It does not own the guest↔host contract (that is `fnode_guest::abi`, which
//! it imports) nor what an image does once booted.
//!
//! Most of the crate builds only for `x86_64-unknown-none`; on the host it is the pure logic
//! (boot data checks, formatting, descriptor values), which the unit tests cover. The kernel
//! itself is tested by booting it (`scripts/qemu-boot.sh`, fnode-vmm's integration tests).
//!
//! # Boot sequence
//! PVH entry (32-bit) → page tables, long mode → `kernel_entry` (Rust): load the TSS and IDT,
//! print the banner (`abi::BANNER_PREFIX` + version), read `hvm_start_info`, set up the heap,
//! print the memory size, act on `fault=` ([`cmdline`]), then call the image's main function.
//!
//! Guest kernel code may be emulated one instruction at a time (and every byte written to the
//! UART is a VM exit), so the boot path is kept short: descriptor and page tables are built
//! at link time, nothing is formatted with `core::fmt`, and the boot prints two short lines.
//! Measured with the plain image: about 430 kernel instructions from the PVH entry to the
//! exit, and 40 port exits (39 console bytes and the exit port).
//!
//! # Building an image on the kernel
//! The plain boot image is this crate's binary (`src/main.rs`). Another image (a function
//! image) is a `no_std`, `no_main` binary crate for `x86_64-unknown-none` that:
//! 1. depends on `fnode-guest-kernel` (and uses `alloc` freely: the kernel provides the global
//!    allocator and the panic handler);
//! 2. names its main function with [`kernel_main!`]:
//!    ```ignore
//!    #![no_std]
//!    #![no_main]
//!    fnode_guest_kernel::kernel_main!(run);
//!    fn run(boot: &fnode_guest_kernel::BootInfo) -> ! {
//!        // ... serve ...
//!        fnode_guest_kernel::exit::exit(fnode_guest::abi::exit::SUCCESS)
//!    }
//!    ```
//! 3. links with the kernel's linker script, which this crate's build script generates and
//!    puts on the link search path of its dependents: a `build.rs` with
//!    `println!("cargo:rustc-link-arg-bins=-Tfnode-guest-kernel.ld");`;
//! 4. builds with `-C relocation-model=static` (the workspace's `.cargo/config.toml` sets it
//!    for `x86_64-unknown-none`).
//!
//! The script's `ENTRY(fnode_pvh_entry)` pulls the entry code, the PVH note and through them
//! the rest of the kernel into the image, although the image references none of it.

#![cfg_attr(not(test), no_std)]

extern crate alloc;

#[cfg(target_os = "none")]
mod boot;
pub mod channel;
pub mod cmdline;
#[cfg(target_os = "none")]
pub mod control;
#[cfg(target_os = "none")]
pub mod exit;
pub mod gdt;
pub mod heap;
pub mod hostile;
pub mod idt;
pub mod line;
#[cfg(target_os = "none")]
mod panic;
pub mod pic;
pub mod pvh;
pub mod runloop;
#[cfg(target_os = "none")]
pub mod serial;
#[cfg(target_os = "none")]
pub mod snapshot_test;
pub mod syscall;
pub mod user;
pub mod virtio;
pub mod x86;

use core::ops::Range;

use fnode_guest::abi;

/// What the kernel found at boot, handed to the image's main function.
#[derive(Clone, Debug)]
pub struct BootInfo {
    /// The kernel command line ("" if the loader gave none).
    pub cmdline: &'static str,
    /// The memory map the loader passed.
    pub memory: pvh::MemoryMap,
    /// The heap's physical (= virtual) range.
    pub heap: Range<u64>,
}

/// Names the image's main function, which the kernel calls once booted:
/// `kernel_main!(run)` with `fn run(boot: &BootInfo) -> !`.
#[macro_export]
macro_rules! kernel_main {
    ($main:path) => {
        #[unsafe(no_mangle)]
        fn fnode_kernel_main(boot: &$crate::BootInfo) -> ! {
            let main: fn(&$crate::BootInfo) -> ! = $main;
            main(boot)
        }
    };
}

const BANNER_LEN: usize = abi::BANNER_PREFIX.len() + env!("CARGO_PKG_VERSION").len() + 1;
/// The first line the kernel prints.
pub static BANNER: [u8; BANNER_LEN] =
    line::concat_line(abi::BANNER_PREFIX, env!("CARGO_PKG_VERSION"));

#[cfg(target_os = "none")]
pub use entry::kernel_entry;

#[cfg(target_os = "none")]
mod entry {
    use core::arch::asm;

    use fnode_guest::abi;

    use crate::{
        cmdline::{self, FaultSwitch},
        exit, gdt, heap, idt,
        line::Decimal,
        pvh, serial, BootInfo, BANNER,
    };

    unsafe extern "Rust" {
        /// The image's main function, defined with [`kernel_main!`](crate::kernel_main).
        fn fnode_kernel_main(boot: &BootInfo) -> !;
    }

    unsafe extern "C" {
        /// End of the kernel image, stacks included (linker script).
        static fnode_image_end: u8;
    }

    /// The Rust entry, called by the boot code in long mode on the kernel stack.
    pub extern "C" fn kernel_entry(start_info_paddr: u32) -> ! {
        gdt::load_tss();
        idt::load();
        serial::write(&BANNER);

        // SAFETY: the boot code passes %ebx as the loader set it, the identity map is live,
        // and the kernel never reuses the memory the boot data lies in.
        let pvh =
            unsafe { pvh::read(u64::from(start_info_paddr)) }.unwrap_or_else(|e| exit::fail(&e));
        let image_end = &raw const fnode_image_end as u64;
        let heap = heap::region(&pvh.memory, image_end).unwrap_or_else(|e| exit::fail(&e));
        // SAFETY: the region is RAM after the image that nothing else uses; this is the only call.
        unsafe { heap::init(heap.clone()) };

        // Short, and without building a line: every byte to the UART is a VM exit anyway.
        serial::write(b"memory ");
        serial::write(Decimal::new(pvh.memory.ram_bytes() >> 20).as_bytes());
        serial::write(b" MiB\n");

        match cmdline::fault_switch(pvh.cmdline) {
            Ok(None) => {}
            Ok(Some(fault)) => raise(fault),
            Err(e) => exit::fail(&e),
        }

        let boot = BootInfo {
            cmdline: pvh.cmdline,
            memory: pvh.memory,
            heap,
        };
        // SAFETY: every image defines the function with `kernel_main!`, which checks its type.
        unsafe { fnode_kernel_main(&boot) }
    }

    /// Raises the fault `fault=` asked for; the exception handler ends the guest.
    fn raise(fault: FaultSwitch) -> ! {
        match fault {
            // SAFETY: #UD on purpose; the handler reports it and never returns.
            FaultSwitch::Ud2 => unsafe { asm!("ud2", options(noreturn, nomem, nostack)) },
            FaultSwitch::PageFault => {
                // SAFETY: a read of an unmapped address on purpose (#PF); the handler reports
                // it and never returns. The access is asm, outside Rust's memory model.
                unsafe {
                    asm!("mov {0}, qword ptr [{0}]",
                         inout(reg) abi::cmdline::PAGEFAULT_ADDR => _,
                         options(nostack, readonly))
                };
                exit::fail(&"fault=pagefault: the read did not fault")
            }
            FaultSwitch::Loop => loop {
                core::hint::spin_loop();
            },
        }
    }
}
