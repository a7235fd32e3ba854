//! A console line built on the stack, with cheap decimal and hex formatting.
//!
//! `core::fmt` costs thousands of instructions per line, and kernel instructions may be
//! emulated one by one: the boot path formats with these helpers instead. [`Line`] also
//! implements [`core::fmt::Write`] for the rare paths (panics, errors) that need `Display`.
//! A line that outgrows [`LINE_MAX`] is cut, never overflowed.

use core::{fmt, mem::MaybeUninit};

/// The prefix of every line the kernel prints (the banner aside).
pub const LOG_PREFIX: &str = "fnode guest-kernel: ";

/// The longest line, newline included.
pub const LINE_MAX: usize = 192;

/// A line of console output.
pub struct Line {
    /// Left uninitialised past `len`: clearing it would cost more than the line itself.
    buf: [MaybeUninit<u8>; LINE_MAX],
    /// Bytes written; always `< LINE_MAX`, which keeps room for the newline.
    len: usize,
}

impl fmt::Debug for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Line").field(&self.text()).finish()
    }
}

impl Default for Line {
    fn default() -> Self {
        Self::new()
    }
}

impl Line {
    /// An empty line.
    pub const fn new() -> Self {
        Line {
            buf: [MaybeUninit::uninit(); LINE_MAX],
            len: 0,
        }
    }

    /// A line starting with [`LOG_PREFIX`].
    pub fn log() -> Self {
        let mut line = Self::new();
        line.str(LOG_PREFIX);
        line
    }

    /// Appends bytes, cutting what does not fit.
    pub fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        let room = LINE_MAX - 1 - self.len;
        for (slot, &b) in self.buf[self.len..]
            .iter_mut()
            .zip(&bytes[..bytes.len().min(room)])
        {
            slot.write(b);
        }
        self.len += bytes.len().min(room);
        self
    }

    /// Appends a string.
    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    /// Appends `v` in decimal.
    pub fn dec(&mut self, v: u64) -> &mut Self {
        self.bytes(Decimal::new(v).as_bytes())
    }

    /// Appends `v` as `0x` and lower-case hex digits, without leading zeros.
    pub fn hex(&mut self, v: u64) -> &mut Self {
        let mut digits = [0u8; 18];
        let mut i = digits.len();
        let mut rest = v;
        loop {
            i -= 1;
            digits[i] = b"0123456789abcdef"[(rest & 0xf) as usize];
            rest >>= 4;
            if rest == 0 {
                break;
            }
        }
        i -= 2;
        digits[i] = b'0';
        digits[i + 1] = b'x';
        self.bytes(&digits[i..])
    }

    /// The first `len` bytes of the buffer.
    fn written(&self, len: usize) -> &[u8] {
        assert!(len <= LINE_MAX);
        // SAFETY: callers ask only for bytes written (`len <= self.len`, or the newline
        // `finish` writes at `self.len`); `MaybeUninit<u8>` has `u8`'s layout.
        unsafe { core::slice::from_raw_parts(self.buf.as_ptr().cast::<u8>(), len) }
    }

    /// The line's text, without the newline.
    pub fn text(&self) -> &str {
        let bytes = self.written(self.len);
        // Only whole `&str`s and ASCII are appended, but a cut can split a character.
        match core::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => {
                // SAFETY: the bytes up to `valid_up_to` are valid UTF-8, as checked.
                unsafe { core::str::from_utf8_unchecked(&bytes[..e.valid_up_to()]) }
            }
        }
    }

    /// The line's bytes with a terminating newline.
    pub fn finish(&mut self) -> &[u8] {
        self.buf[self.len].write(b'\n');
        self.written(self.len + 1)
    }
}

impl fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.str(s);
        Ok(())
    }
}

/// A number's decimal digits, formatted on the stack.
#[derive(Clone, Copy, Debug)]
pub struct Decimal {
    digits: [u8; 20],
    start: usize,
}

impl Decimal {
    /// The digits of `v`.
    pub fn new(mut v: u64) -> Self {
        let mut d = Decimal {
            digits: [0; 20],
            start: 20,
        };
        loop {
            d.start -= 1;
            d.digits[d.start] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                return d;
            }
        }
    }

    /// The digits.
    pub fn as_bytes(&self) -> &[u8] {
        &self.digits[self.start..]
    }
}

/// `a` and `b` joined at compile time, with a newline: lines that never change (the banner)
/// cost no formatting at boot. `N` must be `a.len() + b.len() + 1`.
pub const fn concat_line<const N: usize>(a: &str, b: &str) -> [u8; N] {
    assert!(
        N == a.len() + b.len() + 1,
        "concat_line: N must be a.len() + b.len() + 1"
    );
    let mut out = [0u8; N];
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let mut i = 0;
    while i < a.len() {
        out[i] = a[i];
        i += 1;
    }
    while i - a.len() < b.len() {
        out[i] = b[i - a.len()];
        i += 1;
    }
    out[i] = b'\n';
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn formats_numbers() {
        let mut l = Line::new();
        l.dec(0).str(" ").dec(1234567890).str(" ").dec(u64::MAX);
        assert_eq!(l.text(), "0 1234567890 18446744073709551615");
        let mut l = Line::new();
        l.hex(0).str(" ").hex(0xdead_beef).str(" ").hex(u64::MAX);
        assert_eq!(l.text(), "0x0 0xdeadbeef 0xffffffffffffffff");
    }

    #[test]
    fn cuts_long_lines_and_keeps_room_for_the_newline() {
        let mut l = Line::log();
        for _ in 0..LINE_MAX {
            l.str("ab");
        }
        write!(l, "{}", 42).unwrap();
        assert_eq!(l.text().len(), LINE_MAX - 1);
        let out = l.finish();
        assert_eq!(out.len(), LINE_MAX);
        assert_eq!(out[LINE_MAX - 1], b'\n');
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        let mut l = Line::new();
        l.bytes(&[b'a'; LINE_MAX - 2]).str("é");
        assert_eq!(l.text().len(), LINE_MAX - 2);
    }

    #[test]
    fn decimal_digits() {
        assert_eq!(Decimal::new(0).as_bytes(), b"0");
        assert_eq!(Decimal::new(63).as_bytes(), b"63");
        assert_eq!(Decimal::new(u64::MAX).as_bytes(), b"18446744073709551615");
    }

    #[test]
    fn concat_line_joins_at_compile_time() {
        const L: [u8; 6] = concat_line::<6>("ab", "cde");
        assert_eq!(&L, b"abcde\n");
    }
}
