//! `panic` (a test function): panics in its handler with [`MESSAGE`]. The host gets an error
//! frame `function panicked at functions/panic/src/main.rs:<line>:<col>: <MESSAGE>` and the
//! VM ends.
#![no_std]
#![no_main]

use fnode_guest::{Function, Response};

/// The panic message.
const MESSAGE: &str = "fnode test panic: the handler panicked on purpose";

struct Panic;

impl Function for Panic {
    fn init() -> Self {
        Panic
    }

    fn handle(&mut self, _request: &[u8]) -> Response<'_> {
        panic!("{MESSAGE}");
    }
}

fnode_guest::entry!(Panic);
