//! `random`: 32 bytes from the guest's hardware random source, as 64 lowercase hex digits.
//! Two VMs restored from one snapshot answer differently.
#![no_std]
#![no_main]

use fnode_guest::{sys, Function, Response};

struct Random {
    hex: [u8; 64],
}

impl Function for Random {
    fn init() -> Self {
        Random { hex: [0; 64] }
    }

    fn handle(&mut self, _request: &[u8]) -> Response<'_> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut bytes = [0u8; 32];
        sys::random(&mut bytes)?;
        for (i, b) in bytes.iter().enumerate() {
            self.hex[2 * i] = DIGITS[usize::from(b >> 4)];
            self.hex[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
        }
        Ok((&self.hex).into())
    }
}

fnode_guest::entry!(Random);
