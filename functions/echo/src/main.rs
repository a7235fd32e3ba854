//! `echo`: returns the request unchanged, straight from the request buffer (no copy).
#![no_std]
#![no_main]

use fnode_guest::{Function, Response};

struct Echo;

impl Function for Echo {
    fn init() -> Self {
        Echo
    }

    fn handle<'a>(&'a mut self, request: &'a [u8]) -> Response<'a> {
        Ok(request.into())
    }
}

fnode_guest::entry!(Echo);
