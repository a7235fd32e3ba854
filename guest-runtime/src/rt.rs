//! The function's user-mode runtime: the entry point's body (heap, `init`, the invocation
//! loop) and the panic handler, which [`entry!`](crate::entry) wires up.

use alloc::{format, string::String};
use core::{
    fmt::{self, Write},
    panic::PanicInfo,
    sync::atomic::{AtomicBool, Ordering},
};

use crate::{
    abi::{
        frame::{KIND_ERROR, KIND_RESPONSE, MAX_PAYLOAD},
        user::{sys::RESULT_NONE, UserStart},
    },
    heap, sys, Function, Output,
};

/// Runs function `F`: sets up the heap, calls `init`, then serves requests forever, one
/// `NEXT` system call per invocation.
///
/// # Safety
/// `start` points to the [`UserStart`] the kernel wrote, whose regions are the function's.
pub unsafe fn run<F: Function>(start: *const UserStart) -> ! {
    // SAFETY: the kernel wrote a UserStart there (the entry contract).
    let start = unsafe { start.read() };
    // SAFETY: the kernel hands the heap region to the function alone; this is the only init.
    unsafe { heap::init(start.heap_start as usize, start.heap_len as usize) };
    let request_buf = start.request_buf as *const u8;
    let request_cap = start.request_buf_len as usize;

    let mut function = F::init();
    let mut len = sys::next(RESULT_NONE, &[]);
    loop {
        // SAFETY: the kernel wrote `len` bytes into the request buffer, which nothing else
        // reads or writes until the next `NEXT`, after this slice is gone.
        let request = unsafe { core::slice::from_raw_parts(request_buf, len.min(request_cap)) };
        let error: String;
        let result = function.handle(request);
        let (kind, bytes) = match &result {
            Ok(out) if out.as_bytes().len() <= MAX_PAYLOAD => (KIND_RESPONSE, out.as_bytes()),
            Ok(out) => {
                error = too_long(out);
                (KIND_ERROR, error.as_bytes())
            }
            Err(e) => (KIND_ERROR, e.message().as_bytes()),
        };
        len = sys::next(u64::from(kind), bytes);
    }
}

fn too_long(out: &Output<'_>) -> String {
    format!(
        "the function's response of {} bytes exceeds the {MAX_PAYLOAD}-byte limit",
        out.as_bytes().len()
    )
}

/// A message buffer on the stack: the panic may come from the allocator.
struct PanicMessage {
    buf: [u8; 1024],
    len: usize,
}

impl Write for PanicMessage {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        if n < s.len() {
            return Err(fmt::Error);
        }
        Ok(())
    }
}

static PANICKING: AtomicBool = AtomicBool::new(false);

/// The panic handler's body: sends `function panicked at <file:line:col>: <message>` to the
/// kernel, which reports it to the host and ends the VM.
pub fn panic(info: &PanicInfo<'_>) -> ! {
    if PANICKING.swap(true, Ordering::Relaxed) {
        sys::panic(b"function panicked while formatting a panic message");
    }
    let mut m = PanicMessage {
        buf: [0; 1024],
        len: 0,
    };
    let _ = match info.location() {
        Some(l) => write!(
            m,
            "function panicked at {}:{}:{}: {}",
            l.file(),
            l.line(),
            l.column(),
            info.message()
        ),
        None => write!(m, "function panicked: {}", info.message()),
    };
    // A message cut short may end inside a UTF-8 sequence: cut back to a boundary.
    let len = match core::str::from_utf8(&m.buf[..m.len]) {
        Ok(_) => m.len,
        Err(e) => e.valid_up_to(),
    };
    sys::panic(&m.buf[..len])
}
