//! `fnode-guest`: what fnode guests and hosts agree on, and what functions are written against.
//!
//! - [`abi`] is the guest↔host contract: ports, memory layout, exit codes, report and frame
//!   formats. The guest kernel and every host crate import it; no number in it is written twice.
//! - With the `runtime` feature, the function SDK: the `Function` trait, the `entry!`
//!   macro, the heap allocator (`heap`), the system calls (`sys`) and `println!`.
//!
//! This crate is `no_std` so that the guest kernel and functions can use it. It owns no
//! device driver and no host code.
//!
//! # Writing a function
//! A function is a `no_std`, `no_main` binary crate that depends on `fnode-guest` with the
//! `runtime` feature, built into a bootable image with `fnode build CRATE_DIR`:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! extern crate alloc;
//! use fnode_guest::{Function, Response};
//!
//! struct Upper;
//!
//! impl Function for Upper {
//!     fn init() -> Self {
//!         Upper
//!     }
//!     fn handle(&mut self, request: &[u8]) -> Response<'_> {
//!         let text = core::str::from_utf8(request)?; // any `Display` error becomes an error frame
//!         Ok(text.to_uppercase().into())
//!     }
//! }
//!
//! fnode_guest::entry!(Upper);
//! ```
//!
//! `init` runs once, before the VM is snapshotted; every invocation then runs `handle` on a
//! VM restored from that snapshot. The function runs in guest user mode: it reaches the
//! outside world only through the kernel's system calls (`sys`).
#![no_std]

pub mod abi;

#[cfg(feature = "runtime")]
extern crate alloc;

#[cfg(feature = "runtime")]
mod function;
#[cfg(feature = "runtime")]
pub mod heap;
#[cfg(all(feature = "runtime", target_os = "none"))]
mod print;
#[cfg(all(feature = "runtime", target_os = "none"))]
mod rt;
#[cfg(all(feature = "runtime", target_os = "none"))]
pub mod sys;

#[cfg(feature = "runtime")]
pub use function::{Error, Function, Output, Response};

/// What [`entry!`] and [`println!`] expand to; not a stable API.
#[cfg(all(feature = "runtime", target_os = "none"))]
#[doc(hidden)]
pub mod __private {
    pub use crate::{print::print_fmt, rt::panic, rt::run};
}

/// Makes `$ty` (a [`Function`]) this image's function.
///
/// It emits the [`UserHeader`](abi::user::UserHeader) in the
/// [`HEADER_SECTION`](abi::user::HEADER_SECTION) (which the linker script puts at
/// [`IMAGE_START`](abi::user::IMAGE_START)), the user-mode entry point, the global allocator
/// over the heap the kernel hands over, and the panic handler (a panic reaches the host as an
/// error frame and ends the VM). Use it once, in the crate's `main.rs`.
#[cfg(feature = "runtime")]
#[macro_export]
macro_rules! entry {
    ($ty:ty) => {
        /// The function's entry point; the kernel enters it in user mode.
        #[unsafe(no_mangle)]
        extern "C" fn __fnode_entry(start: *const $crate::abi::user::UserStart) -> ! {
            // SAFETY: only the kernel enters here, with `start` as `abi::user` says.
            unsafe { $crate::__private::run::<$ty>(start) }
        }

        // The header, in the section name `abi::user::HEADER_SECTION` holds (checked by
        // `fnode build`, which reads the header back).
        ::core::arch::global_asm!(
            ".pushsection .fnode_header, \"a\", @progbits",
            ".balign 8",
            ".quad {magic}",
            ".quad {entry}",
            ".quad __fnode_image_end",
            ".popsection",
            magic = const $crate::abi::user::HEADER_MAGIC,
            entry = sym __fnode_entry,
        );

        #[global_allocator]
        static __FNODE_ALLOCATOR: $crate::heap::Allocator = $crate::heap::Allocator;

        #[panic_handler]
        fn __fnode_panic(info: &::core::panic::PanicInfo<'_>) -> ! {
            $crate::__private::panic(info)
        }
    };
}

/// Prints to the serial console (the VM's log), like `std::print!`.
#[cfg(feature = "runtime")]
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::__private::print_fmt(::core::format_args!($($arg)*))
    };
}

/// Prints a line to the serial console (the VM's log), like `std::println!`. One system call
/// per line (up to 256 bytes); on some hosts that costs tens of microseconds.
#[cfg(feature = "runtime")]
#[macro_export]
macro_rules! println {
    () => {
        $crate::__private::print_fmt(::core::format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::__private::print_fmt(::core::format_args!("{}\n", ::core::format_args!($($arg)*)))
    };
}
