//! `counter`: counts its calls in a `static` and keeps the previous request on the heap.
//!
//! Response: `calls <n>, previous <bytes>` (`-` for none). A VM that serves requests one
//! after another answers `calls 1, previous -`, then `calls 2, previous <first request>`,
//! ...; a VM reset to its snapshot between requests answers `calls 1, previous -` every
//! time: nothing one invocation wrote, in static or heap memory, reaches the next.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use fnode_guest::{Function, Response};

/// Calls since `init` (the VM runs one function on one CPU; the atomic only avoids
/// `static mut`).
static CALLS: AtomicU64 = AtomicU64::new(0);

struct Counter {
    previous: Vec<u8>,
    response: Vec<u8>,
}

impl Function for Counter {
    fn init() -> Self {
        Counter {
            previous: Vec::new(),
            response: Vec::new(),
        }
    }

    fn handle(&mut self, request: &[u8]) -> Response<'_> {
        let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
        self.response.clear();
        self.response.extend_from_slice(b"calls ");
        push_decimal(&mut self.response, calls);
        self.response.extend_from_slice(b", previous ");
        if self.previous.is_empty() {
            self.response.push(b'-');
        } else {
            self.response.extend_from_slice(&self.previous);
        }
        self.previous.clear();
        self.previous.extend_from_slice(request);
        Ok((&self.response[..]).into())
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
}

fnode_guest::entry!(Counter);
