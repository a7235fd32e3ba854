//! `sha256`: the lowercase hex SHA-256 of the request, as `sha256sum` prints it.
#![no_std]
#![no_main]

use fnode_guest::{Function, Response};
use sha2::{Digest, Sha256};

struct Sha256Hex {
    /// The hex digest of the last request; the response borrows it.
    hex: [u8; 64],
}

impl Function for Sha256Hex {
    fn init() -> Self {
        Sha256Hex { hex: [0; 64] }
    }

    fn handle(&mut self, request: &[u8]) -> Response<'_> {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let digest = Sha256::digest(request);
        for (i, b) in digest.iter().enumerate() {
            self.hex[2 * i] = DIGITS[usize::from(b >> 4)];
            self.hex[2 * i + 1] = DIGITS[usize::from(b & 0xf)];
        }
        Ok((&self.hex).into())
    }
}

fnode_guest::entry!(Sha256Hex);
