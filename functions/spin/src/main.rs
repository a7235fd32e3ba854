//! `spin` (a test function): never returns from its handler. Only the host's timeout ends
//! the invocation.
#![no_std]
#![no_main]

use fnode_guest::{Function, Response};

struct Spin;

impl Function for Spin {
    fn init() -> Self {
        Spin
    }

    fn handle(&mut self, _request: &[u8]) -> Response<'_> {
        loop {
            core::hint::spin_loop();
        }
    }
}

fnode_guest::entry!(Spin);
