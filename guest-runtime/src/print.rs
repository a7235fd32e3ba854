//! [`print!`](crate::print) and [`println!`](crate::println): formatted text to the serial
//! console through [`sys::log`](crate::sys::log), buffered so that a line is one system call.

use core::fmt::{self, Write};

use crate::sys;

/// Text longer than this goes out in more than one call.
const CAP: usize = 256;

struct LogWriter {
    buf: [u8; CAP],
    len: usize,
}

impl LogWriter {
    fn flush(&mut self) {
        if self.len > 0 {
            // The buffer only ever holds whole `&str`s.
            sys::log(core::str::from_utf8(&self.buf[..self.len]).unwrap_or("?"));
            self.len = 0;
        }
    }
}

impl Write for LogWriter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        if self.len + s.len() > CAP {
            self.flush();
        }
        if s.len() > CAP {
            sys::log(s);
        } else {
            self.buf[self.len..self.len + s.len()].copy_from_slice(s.as_bytes());
            self.len += s.len();
        }
        Ok(())
    }
}

/// Formats `args` to the console (what the macros expand to).
pub fn print_fmt(args: fmt::Arguments<'_>) {
    let mut w = LogWriter {
        buf: [0; CAP],
        len: 0,
    };
    // LogWriter never fails; a failing Display impl just cuts the text short.
    let _ = w.write_fmt(args);
    w.flush();
}
