//! The [`Function`] trait and the types its handler returns.

use alloc::{boxed::Box, format, string::String, vec::Vec};
use core::fmt;

/// A function: state built once by [`init`](Function::init), then one
/// [`handle`](Function::handle) call per invocation.
///
/// `init` runs before the VM is snapshotted, so expensive set-up (tables, parsed
/// configuration, warmed caches) belongs there: every invocation starts from a VM restored
/// with that state already built. Each invocation sees a fresh copy of the state as `init`
/// left it; what `handle` changes is not seen by later invocations.
///
/// A panic in either ends the VM: the host gets an error frame with the panic message.
pub trait Function: Sized {
    /// Builds the function's state.
    fn init() -> Self;

    /// Handles one request. The response may borrow from `self` or from `request`
    /// ([`Output::Borrowed`]): it is sent to the host straight from the function's memory.
    /// An `Err` reaches the host as an error frame carrying the message.
    fn handle<'a>(&'a mut self, request: &'a [u8]) -> Response<'a>;
}

/// What [`Function::handle`] returns.
pub type Response<'a> = Result<Output<'a>, Error>;

/// The bytes of a successful response, owned or borrowed. Build one with `.into()` from a
/// `Vec<u8>`, `String`, `Box<[u8]>`, `&[u8]`, `&str` or `&[u8; N]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output<'a> {
    /// Bytes the handler allocated.
    Owned(Vec<u8>),
    /// Bytes that live in the function's state or in the request.
    Borrowed(&'a [u8]),
}

impl Output<'_> {
    /// The response bytes.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Output::Owned(v) => v,
            Output::Borrowed(b) => b,
        }
    }
}

impl From<Vec<u8>> for Output<'_> {
    fn from(v: Vec<u8>) -> Self {
        Output::Owned(v)
    }
}

impl From<String> for Output<'_> {
    fn from(s: String) -> Self {
        Output::Owned(s.into_bytes())
    }
}

impl From<Box<[u8]>> for Output<'_> {
    fn from(b: Box<[u8]>) -> Self {
        Output::Owned(b.into_vec())
    }
}

impl<'a> From<&'a [u8]> for Output<'a> {
    fn from(b: &'a [u8]) -> Self {
        Output::Borrowed(b)
    }
}

impl<'a, const N: usize> From<&'a [u8; N]> for Output<'a> {
    fn from(b: &'a [u8; N]) -> Self {
        Output::Borrowed(b)
    }
}

impl<'a> From<&'a str> for Output<'a> {
    fn from(s: &'a str) -> Self {
        Output::Borrowed(s.as_bytes())
    }
}

/// A handler's error: a message for the host.
///
/// Any [`Display`](fmt::Display) value converts into it, so `?` works on most errors and
/// `Err("bad input".into())` on plain text. (Like `anyhow::Error`, it does not implement
/// `Display` itself: that would conflict with the conversion. Read it with
/// [`message`](Error::message).)
pub struct Error {
    message: String,
}

impl Error {
    /// An error with this message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Error {
            message: format!("{message}"),
        }
    }

    /// The message the host receives.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message, consumed.
    pub fn into_message(self) -> String {
        self.message
    }
}

impl<E: fmt::Display> From<E> for Error {
    fn from(e: E) -> Self {
        Error::msg(e)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Error").field(&self.message).finish()
    }
}

#[cfg(test)]
mod tests {
    use alloc::{string::ToString, vec};

    use super::*;

    struct Echo;

    impl Function for Echo {
        fn init() -> Self {
            Echo
        }
        fn handle<'a>(&'a mut self, request: &'a [u8]) -> Response<'a> {
            Ok(request.into())
        }
    }

    struct Parse(Vec<u8>);

    impl Function for Parse {
        fn init() -> Self {
            Parse(b"state".to_vec())
        }
        // The elided form: the output borrows from `self`.
        fn handle(&mut self, request: &[u8]) -> Response<'_> {
            if request.is_empty() {
                return Err("empty request".into());
            }
            let n: u32 = core::str::from_utf8(request)?.parse()?;
            if n == 0 {
                return Ok(self.0.as_slice().into());
            }
            Ok(n.to_string().into())
        }
    }

    #[test]
    fn outputs_borrow_or_own() {
        let mut echo = Echo::init();
        assert_eq!(echo.handle(b"hi").unwrap(), Output::Borrowed(b"hi"));
        let mut p = Parse::init();
        assert_eq!(p.handle(b"0").unwrap().as_bytes(), b"state");
        assert_eq!(p.handle(b"42").unwrap(), Output::Owned(b"42".to_vec()));
        assert_eq!(Output::from(vec![1u8, 2]).as_bytes(), &[1, 2]);
        assert_eq!(Output::from(b"ab").as_bytes(), b"ab");
        assert_eq!(Output::from("s".to_string()).as_bytes(), b"s");
    }

    #[test]
    fn errors_carry_the_display_text() {
        let mut p = Parse::init();
        assert_eq!(p.handle(b"").unwrap_err().message(), "empty request");
        assert_eq!(
            p.handle(b"x").unwrap_err().message(),
            "invalid digit found in string"
        );
        assert_eq!(
            p.handle(&[0xff]).unwrap_err().message().split(' ').next(),
            Some("invalid")
        );
        assert_eq!(Error::msg(format_args!("n={}", 3)).into_message(), "n=3");
    }
}
