//! The panic handler: print the message on the console, exit with [`abi::exit::FAILURE`].

use core::{
    fmt::Write,
    panic::PanicInfo,
    sync::atomic::{AtomicBool, Ordering},
};

use fnode_guest::abi;

use crate::{exit, line::Line, serial};

/// Set by the first panic: a panic while reporting one exits at once.
static PANICKING: AtomicBool = AtomicBool::new(false);

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::Relaxed) {
        exit::exit(abi::exit::FAILURE);
    }
    let mut line = Line::log();
    // A `Line` never fails to take text; it cuts what does not fit.
    let _ = write!(line, "panic: {}", info.message());
    if let Some(at) = info.location() {
        let _ = write!(line, " at {}:{}", at.file(), at.line());
    }
    serial::write_line(&mut line);
    exit::exit(abi::exit::FAILURE)
}
