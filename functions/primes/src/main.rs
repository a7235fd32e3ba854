//! `primes`: an expensive `init` and cheap requests.
//!
//! `init` sieves every number below [`LIMIT`] (about 2^25, tens of milliseconds of real
//! work) into a bit table of odd numbers plus a table of running prime counts. It runs once,
//! before the snapshot; every request then costs a few table lookups.
//!
//! Request: a decimal number `n` (below `LIMIT`). Response:
//! `{"n":97,"prime":true,"pi":25}` where `pi` is the number of primes `<= n`.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::{format, vec, vec::Vec};

use fnode_guest::{println, Function, Response};

/// Numbers below this are in the table.
const LIMIT: u64 = 1 << 25;

struct Primes {
    /// Bit `i` of word `w` set: `2 * (64 * w + i) + 1` is composite (or 1).
    composite: Vec<u64>,
    /// `counts[w]`: primes among the odd numbers of words `0..w`, plus one for 2.
    counts: Vec<u32>,
}

impl Primes {
    fn sieve() -> Self {
        let odds = (LIMIT / 2) as usize;
        let mut composite = vec![0u64; odds.div_ceil(64)];
        composite[0] |= 1; // 1 is not prime
        let mut i = 1; // odd number 2i+1
        while (2 * i + 1) * (2 * i + 1) < LIMIT as usize {
            if composite[i / 64] & (1 << (i % 64)) == 0 {
                let p = 2 * i + 1;
                let mut j = (p * p) / 2;
                while j < odds {
                    composite[j / 64] |= 1 << (j % 64);
                    j += p;
                }
            }
            i += 1;
        }
        let mut counts = Vec::with_capacity(composite.len() + 1);
        let mut total = 1u32; // the prime 2
        for w in &composite {
            counts.push(total);
            total += (!w).count_ones();
        }
        Primes { composite, counts }
    }

    fn is_prime(&self, n: u64) -> bool {
        match n {
            0 | 1 => false,
            2 => true,
            n if n % 2 == 0 => false,
            n => {
                let i = (n / 2) as usize;
                self.composite[i / 64] & (1 << (i % 64)) == 0
            }
        }
    }

    /// The number of primes `<= n`.
    fn pi(&self, n: u64) -> u32 {
        if n < 2 {
            return 0;
        }
        // Odd numbers 1, 3, ..., up to n: indices 0..=last.
        let last = ((n - 1) / 2) as usize;
        let (w, bit) = (last / 64, last % 64);
        let below = if bit == 63 {
            u64::MAX
        } else {
            (1u64 << (bit + 1)) - 1
        };
        self.counts[w] + (!self.composite[w] & below).count_ones()
    }
}

impl Function for Primes {
    fn init() -> Self {
        let primes = Primes::sieve();
        println!(
            "primes: sieved {} numbers, {} primes",
            LIMIT,
            primes.pi(LIMIT - 1)
        );
        primes
    }

    fn handle(&mut self, request: &[u8]) -> Response<'_> {
        let n: u64 = core::str::from_utf8(request)?.trim().parse()?;
        if n >= LIMIT {
            return Err(
                format!("{n} is out of range: the table holds numbers below {LIMIT}").into(),
            );
        }
        Ok(format!(
            "{{\"n\":{n},\"prime\":{},\"pi\":{}}}",
            self.is_prime(n),
            self.pi(n)
        )
        .into())
    }
}

fnode_guest::entry!(Primes);
