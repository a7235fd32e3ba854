//! The host end of the invocation channel: one connection to a VM's hybrid-vsock socket
//! carrying `abi::frame` frames.
//!
//! A [`Connection`] connects to the Unix socket the VMM binds for a VM, writes
//! `CONNECT <port>\n`, reads `OK <hostport>\n` (Firecracker's hybrid-vsock handshake), and then
//! exchanges frames: [`Connection::send_request`] writes a REQUEST header and its payload in
//! one vectored write (the payload is not copied into a new buffer), and
//! [`Connection::read_reply`] reads the guest's RESPONSE or ERROR, validating the header on
//! the way in: the guest is untrusted, so its id must match, its kind must be a reply and its
//! length is bounded by `abi::frame::MAX_PAYLOAD` before anything is allocated.
//!
//! Everything is blocking `std` I/O with a deadline. While blocked, the caller's `watch`
//! closure is called every [`WATCH_INTERVAL`]: it returns `false` to stop waiting (the VM
//! behind the socket has died, say), which ends the call with [`ClientError::Cancelled`].
//!
//! What it does not own: booting the VM and deciding what a reply means ([`crate::invoke`]).

use std::{
    io::{self, IoSlice, Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use fnode_guest::abi::frame::{
    Header, HeaderError, HEADER_LEN, KIND_ERROR, KIND_REQUEST, KIND_RESPONSE, MAX_PAYLOAD,
};

/// How often a blocked call asks its `watch` whether to go on waiting.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(10);
/// Longest handshake reply line accepted (`OK <u32>\n` is at most 14 bytes).
const HANDSHAKE_MAX: usize = 64;
/// First pause between refused connection attempts; it doubles up to [`RETRY_MAX`]. The
/// device keeps a client that connects before the guest's driver is up, so a guest that
/// accepts needs one attempt; the retries are for a guest that refuses and listens later.
const RETRY_FIRST: Duration = Duration::from_micros(100);
const RETRY_MAX: Duration = Duration::from_millis(20);

/// Why a frame from the guest was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadFrame {
    /// The header does not decode (magic, version, kind or length).
    Header(HeaderError),
    /// A reply to another request.
    WrongId {
        /// The id of the request sent.
        sent: u64,
        /// The id the reply carried.
        got: u64,
    },
    /// A REQUEST frame where a reply was expected.
    NotAReply,
}

impl std::fmt::Display for BadFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BadFrame::Header(e) => write!(f, "{e}"),
            BadFrame::WrongId { sent, got } => {
                write!(f, "a reply to request {got} where request {sent} was sent")
            }
            BadFrame::NotAReply => write!(
                f,
                "a REQUEST frame (kind {KIND_REQUEST}) where a RESPONSE or ERROR was expected"
            ),
        }
    }
}

/// Errors of the invocation client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The Unix socket could not be reached.
    #[error("cannot connect to the VM's vsock socket {path}")]
    Connect {
        /// The socket's path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The connection closed before the guest accepted it: nothing listens on the port (yet).
    #[error("the guest refused the connection to vsock port {port} (nothing listens there yet)")]
    Refused {
        /// The guest port.
        port: u32,
    },
    /// The VMM answered the `CONNECT` line with something other than `OK <port>`.
    #[error("bad handshake reply from the VMM: {0:?} (expected \"OK <port>\")")]
    Handshake(String),
    /// The request payload is too long for a frame.
    #[error(
        "the payload is {0} bytes, over the {MAX_PAYLOAD}-byte limit of one invocation: \
         send at most {MAX_PAYLOAD} bytes"
    )]
    TooLong(usize),
    /// The guest closed the connection before its reply was complete.
    #[error("guest closed the connection")]
    Closed,
    /// The guest sent a frame that breaks the protocol.
    #[error("bad frame from guest: {0}")]
    BadFrame(BadFrame),
    /// The deadline passed.
    #[error("no answer before the deadline")]
    TimedOut,
    /// The caller's `watch` asked to stop waiting.
    #[error("stopped waiting for the guest")]
    Cancelled,
    /// A reply was asked for with no request waiting for one.
    #[error("no request waits for a reply: send one first")]
    NoRequest,
    /// The socket failed.
    #[error("I/O on the vsock socket failed")]
    Io(#[source] io::Error),
}

/// What the guest answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// A RESPONSE: the function's bytes.
    Response(Vec<u8>),
    /// An ERROR: the function failed; the payload is its message (UTF-8 by contract, but
    /// untrusted).
    Error(Vec<u8>),
}

/// One connection to a guest port over hybrid vsock.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    /// Bytes read past the handshake line (none from a well-behaved VMM).
    pending: Vec<u8>,
    next_id: u64,
    /// The guest port whose `OK` line is still to be read
    /// ([`connect_pipelined`](Self::connect_pipelined)).
    awaiting_ok: Option<u32>,
}

impl Connection {
    /// Connects to the hybrid-vsock socket at `path` and asks for guest `port`, once.
    /// [`ClientError::Refused`] if the guest closed the connection instead of accepting it.
    pub fn connect(
        path: &Path,
        port: u32,
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<Connection, ClientError> {
        Connection::handshake(open(path)?, port, deadline, watch)
    }

    /// [`Connection::connect`], retried while the guest refuses (it has not started
    /// listening yet), until `deadline`.
    pub fn connect_retrying(
        path: &Path,
        port: u32,
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<Connection, ClientError> {
        let mut pause = RETRY_FIRST;
        loop {
            match Connection::connect(path, port, deadline, watch) {
                Err(ClientError::Refused { .. }) => {}
                other => return other,
            }
            if !watch() {
                return Err(ClientError::Cancelled);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ClientError::TimedOut);
            }
            thread::sleep(pause.min(left));
            pause = (pause * 2).min(RETRY_MAX);
        }
    }

    /// A connection over `stream`, before its handshake.
    fn over(stream: UnixStream) -> Connection {
        Connection {
            stream,
            pending: Vec::new(),
            next_id: 1,
            awaiting_ok: None,
        }
    }

    /// A connection over `stream`, already attached to its guest port by the VMM (no
    /// handshake: see `fnode_vmm::restore::restore_loaded_attached`), whose requests
    /// up to `next_id` were sent already ([`request_frame`]).
    pub fn attached(stream: UnixStream, next_id: u64) -> Connection {
        Connection {
            next_id,
            ..Connection::over(stream)
        }
    }

    /// Connects to the hybrid-vsock socket at `path` and writes the `CONNECT <port>` line
    /// without waiting for the answer: the first request can follow at once, and its
    /// [`read_reply`](Self::read_reply) reads the `OK` line first. For a port the VMM holds
    /// an established connection for (a restored VM's), which it answers without the guest,
    /// this saves a round trip. A refusal then shows as that first call's error.
    pub fn connect_pipelined(
        path: &Path,
        port: u32,
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<Connection, ClientError> {
        Connection::pipelined(open(path)?, port, deadline, watch)
    }

    /// [`connect_pipelined`](Self::connect_pipelined) on a connected stream.
    pub fn pipelined(
        stream: UnixStream,
        port: u32,
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<Connection, ClientError> {
        let mut conn = Connection::over(stream);
        conn.send_connect(port, deadline, watch)?;
        conn.awaiting_ok = Some(port);
        Ok(conn)
    }

    /// Does the handshake on a connected stream.
    pub fn handshake(
        stream: UnixStream,
        port: u32,
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<Connection, ClientError> {
        let mut conn = Connection::over(stream);
        conn.send_connect(port, deadline, watch)?;
        conn.read_ok(port, deadline, watch)?;
        Ok(conn)
    }

    /// Writes the `CONNECT <port>` line.
    fn send_connect(
        &mut self,
        port: u32,
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<(), ClientError> {
        let line = format!("CONNECT {port}\n");
        // A socket closed this early is a refusal too (the line met a closed connection).
        self.write_all(&mut [IoSlice::new(line.as_bytes())], deadline, watch)
            .map_err(|e| match e {
                ClientError::Closed => ClientError::Refused { port },
                e => e,
            })
    }

    /// Reads the VMM's `OK <hostport>` line; bytes after it are kept for the first reply.
    fn read_ok(
        &mut self,
        port: u32,
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<(), ClientError> {
        let mut buf = [0u8; HANDSHAKE_MAX];
        let mut got = 0;
        let end = loop {
            if let Some(i) = buf[..got].iter().position(|&b| b == b'\n') {
                break i;
            }
            if got == buf.len() {
                return Err(ClientError::Handshake(
                    String::from_utf8_lossy(&buf).into_owned(),
                ));
            }
            // A reset (the VMM closed with our request unread) is a refusal too.
            let read = match self.read_some(&mut buf[got..], deadline, watch) {
                Err(ClientError::Closed) => Ok(0),
                other => other,
            };
            match read? {
                0 => {
                    return Err(if got == 0 {
                        ClientError::Refused { port }
                    } else {
                        ClientError::Handshake(String::from_utf8_lossy(&buf[..got]).into_owned())
                    })
                }
                n => got += n,
            }
        };
        let reply = &buf[..end];
        let ok = reply
            .strip_prefix(b"OK ")
            .is_some_and(|p| !p.is_empty() && p.iter().all(u8::is_ascii_digit));
        if !ok {
            return Err(ClientError::Handshake(
                String::from_utf8_lossy(reply).into_owned(),
            ));
        }
        self.pending.extend_from_slice(&buf[end + 1..got]);
        Ok(())
    }

    /// Sends one REQUEST frame carrying `payload`; returns its id.
    pub fn send_request(
        &mut self,
        payload: &[u8],
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<u64, ClientError> {
        let id = self.next_id;
        let header = request_header(id, payload)?;
        self.next_id += 1;
        let awaiting_ok = self.awaiting_ok;
        self.write_all(
            &mut [IoSlice::new(&header), IoSlice::new(payload)],
            deadline,
            watch,
        )
        .map_err(|e| match (e, awaiting_ok) {
            // Closed before its OK line: the VMM refused the pipelined connection.
            (ClientError::Closed, Some(port)) => ClientError::Refused { port },
            (e, _) => e,
        })?;
        Ok(id)
    }

    /// Reads the reply to request `id`.
    pub fn read_reply(
        &mut self,
        id: u64,
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<Reply, ClientError> {
        if let Some(port) = self.awaiting_ok.take() {
            self.read_ok(port, deadline, watch)?;
        }
        let mut raw = [0u8; HEADER_LEN];
        self.read_exact(&mut raw, deadline, watch)?;
        let header =
            Header::decode(&raw).map_err(|e| ClientError::BadFrame(BadFrame::Header(e)))?;
        if header.kind == KIND_REQUEST {
            return Err(ClientError::BadFrame(BadFrame::NotAReply));
        }
        if header.id != id {
            return Err(ClientError::BadFrame(BadFrame::WrongId {
                sent: id,
                got: header.id,
            }));
        }
        // `decode` capped the length at MAX_PAYLOAD: this allocation is bounded.
        let payload = self.read_payload(header.len as usize, deadline, watch)?;
        Ok(match header.kind {
            KIND_RESPONSE => Reply::Response(payload),
            KIND_ERROR => Reply::Error(payload),
            // `decode` accepts only the three kinds.
            other => {
                return Err(ClientError::BadFrame(BadFrame::Header(
                    HeaderError::BadKind(other),
                )))
            }
        })
    }

    /// Sends a request and reads its reply.
    pub fn call(
        &mut self,
        payload: &[u8],
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<Reply, ClientError> {
        let id = self.send_request(payload, deadline, watch)?;
        self.read_reply(id, deadline, watch)
    }

    /// Reads a payload of `len` bytes (no zero-filling first: `read_to_end` writes into the
    /// reserved capacity).
    fn read_payload(
        &mut self,
        len: usize,
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<Vec<u8>, ClientError> {
        let mut out = Vec::with_capacity(len);
        let carried = self.pending.len().min(len);
        out.extend(self.pending.drain(..carried));
        while out.len() < len {
            self.arm_read_timeout(deadline)?;
            let before = out.len();
            let want = (len - out.len()) as u64;
            match (&self.stream).take(want).read_to_end(&mut out) {
                Ok(_) if out.len() == len => break,
                Ok(_) => return Err(ClientError::Closed),
                // Bytes read before the error stay in `out`; only a wait without progress
                // asks the watch.
                Err(e) if out.len() == before => self.blocked(e, deadline, watch)?,
                Err(_) => {}
            }
        }
        Ok(out)
    }

    /// Fills `buf` or fails ([`ClientError::Closed`] on EOF).
    fn read_exact(
        &mut self,
        buf: &mut [u8],
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<(), ClientError> {
        let mut got = 0;
        while got < buf.len() {
            match self.read_some(&mut buf[got..], deadline, watch)? {
                0 => return Err(ClientError::Closed),
                n => got += n,
            }
        }
        Ok(())
    }

    /// One read of at least one byte (0 at EOF), from the bytes carried over first.
    fn read_some(
        &mut self,
        buf: &mut [u8],
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<usize, ClientError> {
        if !self.pending.is_empty() {
            let n = self.pending.len().min(buf.len());
            buf[..n].copy_from_slice(&self.pending[..n]);
            self.pending.drain(..n);
            return Ok(n);
        }
        loop {
            self.arm_read_timeout(deadline)?;
            match (&self.stream).read(buf) {
                Ok(n) => return Ok(n),
                Err(e) => self.blocked(e, deadline, watch)?,
            }
        }
    }

    /// Writes every byte of `bufs`, in as few `writev` calls as the socket allows.
    fn write_all(
        &mut self,
        mut bufs: &mut [IoSlice<'_>],
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<(), ClientError> {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            let left = remaining(deadline)?;
            self.stream
                .set_write_timeout(Some(left.min(WATCH_INTERVAL)))
                .map_err(ClientError::Io)?;
            match (&self.stream).write_vectored(bufs) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::BrokenPipe => return Err(ClientError::Closed),
                Err(e) => self.blocked(e, deadline, watch)?,
            }
        }
        Ok(())
    }

    /// Sets the read timeout to the next watch point (or the deadline, if sooner).
    fn arm_read_timeout(&self, deadline: Instant) -> Result<(), ClientError> {
        let left = remaining(deadline)?;
        self.stream
            .set_read_timeout(Some(left.min(WATCH_INTERVAL)))
            .map_err(ClientError::Io)
    }

    /// Handles a failed read or write: a timeout asks `watch` and checks the deadline, an
    /// interrupted call is retried, anything else fails.
    fn blocked(
        &self,
        e: io::Error,
        deadline: Instant,
        watch: &mut dyn FnMut() -> bool,
    ) -> Result<(), ClientError> {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                if !watch() {
                    return Err(ClientError::Cancelled);
                }
                remaining(deadline).map(drop)
            }
            io::ErrorKind::Interrupted => Ok(()),
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Err(ClientError::Closed),
            _ => Err(ClientError::Io(e)),
        }
    }
}

/// The header of a REQUEST frame `id` carrying `payload` ([`ClientError::TooLong`] if it
/// cannot be sent).
fn request_header(id: u64, payload: &[u8]) -> Result<[u8; HEADER_LEN], ClientError> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|&l| l as usize <= MAX_PAYLOAD)
        .ok_or(ClientError::TooLong(payload.len()))?;
    Ok(Header {
        kind: KIND_REQUEST,
        id,
        len,
    }
    .encode())
}

/// The bytes of REQUEST frame `id` carrying `payload`, for a VMM to hand to the guest
/// before the client's [`Connection::attached`] exists.
pub fn request_frame(id: u64, payload: &[u8]) -> Result<Vec<u8>, ClientError> {
    let header = request_header(id, payload)?;
    let mut frame = Vec::with_capacity(HEADER_LEN + payload.len());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(payload);
    Ok(frame)
}

/// Connects to the Unix socket at `path`.
fn open(path: &Path) -> Result<UnixStream, ClientError> {
    UnixStream::connect(path).map_err(|source| ClientError::Connect {
        path: path.to_owned(),
        source,
    })
}

/// Time left before `deadline`, or [`ClientError::TimedOut`]. Never zero: a zero socket
/// timeout would mean "wait forever".
fn remaining(deadline: Instant) -> Result<Duration, ClientError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(ClientError::TimedOut)
    } else {
        Ok(left)
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use super::*;

    fn encode_header(kind: u16, id: u64, len: u32) -> [u8; HEADER_LEN] {
        Header { kind, id, len }.encode()
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    fn go_on() -> impl FnMut() -> bool {
        || true
    }

    /// A connection whose other end plays the VMM and guest (handshake already done).
    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Connection::over(a), b)
    }

    /// Reads one request frame from the guest's end.
    fn read_request(guest: &mut UnixStream) -> (Header, Vec<u8>) {
        let mut raw = [0u8; HEADER_LEN];
        guest.read_exact(&mut raw).unwrap();
        let h = Header::decode(&raw).unwrap();
        let mut payload = vec![0; h.len as usize];
        guest.read_exact(&mut payload).unwrap();
        (h, payload)
    }

    #[test]
    fn handshake_then_echo_round_trip_is_byte_exact() {
        let (host, guest) = UnixStream::pair().unwrap();
        let payload: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        let expected = payload.clone();
        let guest = thread::spawn(move || {
            let mut guest = std::io::BufReader::new(guest);
            let mut line = String::new();
            guest.read_line(&mut line).unwrap();
            assert_eq!(line, "CONNECT 1024\n");
            let mut guest = guest.into_inner();
            guest.write_all(b"OK 1073741824\n").unwrap();
            let (h, body) = read_request(&mut guest);
            assert_eq!(h.kind, KIND_REQUEST);
            guest
                .write_all(&encode_header(KIND_RESPONSE, h.id, h.len))
                .unwrap();
            guest.write_all(&body).unwrap();
        });
        let mut conn = Connection::handshake(host, 1024, soon(), &mut go_on()).unwrap();
        let reply = conn.call(&payload, soon(), &mut go_on()).unwrap();
        guest.join().unwrap();
        assert_eq!(reply, Reply::Response(expected));
    }

    #[test]
    fn empty_payload_and_error_reply() {
        let (mut conn, mut guest) = pair();
        let id = conn.send_request(&[], soon(), &mut go_on()).unwrap();
        let (h, body) = read_request(&mut guest);
        assert_eq!((h.id, body.len()), (id, 0));
        guest
            .write_all(&encode_header(KIND_RESPONSE, id, 0))
            .unwrap();
        assert_eq!(
            conn.read_reply(id, soon(), &mut go_on()).unwrap(),
            Reply::Response(Vec::new())
        );
        let id = conn.send_request(b"x", soon(), &mut go_on()).unwrap();
        read_request(&mut guest);
        guest.write_all(&encode_header(KIND_ERROR, id, 4)).unwrap();
        guest.write_all(b"boom").unwrap();
        assert_eq!(
            conn.read_reply(id, soon(), &mut go_on()).unwrap(),
            Reply::Error(b"boom".to_vec())
        );
    }

    #[test]
    fn refused_and_bad_handshakes() {
        let (host, guest) = UnixStream::pair().unwrap();
        drop(guest);
        let err = Connection::handshake(host, 7, soon(), &mut go_on()).unwrap_err();
        assert!(matches!(err, ClientError::Refused { port: 7 }), "{err:?}");

        for reply in [&b"NO 12\n"[..], b"OK \n", b"OK 12x\n", &[b'O'; 100]] {
            let (host, mut guest) = UnixStream::pair().unwrap();
            guest.write_all(reply).unwrap();
            let err = Connection::handshake(host, 7, soon(), &mut go_on()).unwrap_err();
            assert!(
                matches!(err, ClientError::Handshake(_)),
                "{reply:?}: {err:?}"
            );
        }
    }

    #[test]
    fn a_pipelined_request_goes_out_before_the_ok_line() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let mut conn = Connection::pipelined(host, 5, soon(), &mut go_on()).unwrap();
        let id = conn.send_request(b"ping", soon(), &mut go_on()).unwrap();
        // The VMM's side sees the line and the request before it answered anything.
        let mut line = [0u8; 10];
        guest.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"CONNECT 5\n");
        let (h, payload) = read_request(&mut guest);
        assert_eq!((h.id, payload.as_slice()), (id, &b"ping"[..]));
        let mut answer = b"OK 9\n".to_vec();
        answer.extend_from_slice(&encode_header(KIND_RESPONSE, id, 4));
        answer.extend_from_slice(b"pong");
        guest.write_all(&answer).unwrap();
        assert_eq!(
            conn.read_reply(id, soon(), &mut go_on()).unwrap(),
            Reply::Response(b"pong".to_vec())
        );

        // A refusal (the socket closed instead of OK) is the first reply's error.
        let (host, mut guest) = UnixStream::pair().unwrap();
        let mut conn = Connection::pipelined(host, 6, soon(), &mut go_on()).unwrap();
        let id = conn.send_request(b"x", soon(), &mut go_on()).unwrap();
        let mut line = [0u8; 10];
        guest.read_exact(&mut line).unwrap();
        drop(guest);
        let err = conn.read_reply(id, soon(), &mut go_on()).unwrap_err();
        assert!(matches!(err, ClientError::Refused { port: 6 }), "{err:?}");
    }

    #[test]
    fn bytes_after_the_ok_line_are_kept() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let mut early = b"OK 5\n".to_vec();
        early.extend_from_slice(&encode_header(KIND_RESPONSE, 1, 3));
        early.extend_from_slice(b"abc");
        guest.write_all(&early).unwrap();
        let mut conn = Connection::handshake(host, 5, soon(), &mut go_on()).unwrap();
        assert_eq!(
            conn.read_reply(1, soon(), &mut go_on()).unwrap(),
            Reply::Response(b"abc".to_vec())
        );
    }

    #[test]
    fn bad_frames_are_named() {
        let cases: [(Vec<u8>, &str); 4] = [
            (
                encode_header(KIND_RESPONSE, 9, 0).to_vec(),
                "a reply to request 9",
            ),
            (
                encode_header(KIND_REQUEST, 1, 0).to_vec(),
                "a REQUEST frame",
            ),
            (b"HTTP/1.1 200 OK\r\n\r\nxxxxxx".to_vec(), "bad frame magic"),
            (
                {
                    let mut h = encode_header(KIND_RESPONSE, 1, 0);
                    h[8..12].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
                    h.to_vec()
                },
                "exceeds",
            ),
        ];
        for (bytes, what) in cases {
            let (mut conn, mut guest) = pair();
            guest.write_all(&bytes).unwrap();
            let err = conn.read_reply(1, soon(), &mut go_on()).unwrap_err();
            let msg = err.to_string();
            assert!(matches!(err, ClientError::BadFrame(_)), "{err:?}");
            assert!(msg.starts_with("bad frame from guest: "), "{msg}");
            assert!(msg.contains(what), "{msg} should say {what}");
        }
    }

    #[test]
    fn a_short_reply_means_the_guest_closed() {
        let (mut conn, mut guest) = pair();
        guest
            .write_all(&encode_header(KIND_RESPONSE, 1, 10))
            .unwrap();
        guest.write_all(b"abc").unwrap();
        drop(guest);
        let err = conn.read_reply(1, soon(), &mut go_on()).unwrap_err();
        assert!(matches!(err, ClientError::Closed), "{err:?}");
        assert_eq!(err.to_string(), "guest closed the connection");

        let (mut conn, guest) = pair();
        drop(guest);
        let err = conn.read_reply(1, soon(), &mut go_on()).unwrap_err();
        assert!(matches!(err, ClientError::Closed), "{err:?}");
    }

    #[test]
    fn oversized_payload_is_refused_before_sending() {
        let (mut conn, _guest) = pair();
        let big = vec![0u8; MAX_PAYLOAD + 1];
        let err = conn.send_request(&big, soon(), &mut go_on()).unwrap_err();
        assert!(
            matches!(err, ClientError::TooLong(n) if n == MAX_PAYLOAD + 1),
            "{err:?}"
        );
        assert_eq!(conn.next_id, 1, "no id used");
    }

    #[test]
    fn deadline_and_watch_stop_the_wait() {
        let (mut conn, _guest) = pair();
        let err = conn
            .read_reply(1, Instant::now() + Duration::from_millis(30), &mut go_on())
            .unwrap_err();
        assert!(matches!(err, ClientError::TimedOut), "{err:?}");

        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let setter = thread::spawn(move || {
            thread::sleep(Duration::from_millis(30));
            flag.store(true, Ordering::Release);
        });
        let mut watch = || !stop.load(Ordering::Acquire);
        let err = conn.read_reply(1, soon(), &mut watch).unwrap_err();
        setter.join().unwrap();
        assert!(matches!(err, ClientError::Cancelled), "{err:?}");
    }

    #[test]
    fn a_full_size_request_is_written_while_the_guest_reads() {
        let (mut conn, mut guest) = pair();
        let payload = vec![0xa5u8; MAX_PAYLOAD];
        let reader = thread::spawn(move || {
            let (h, body) = read_request(&mut guest);
            (h.len as usize, body.iter().all(|&b| b == 0xa5))
        });
        conn.send_request(&payload, soon(), &mut go_on()).unwrap();
        assert_eq!(reader.join().unwrap(), (MAX_PAYLOAD, true));
    }

    #[test]
    fn connect_retrying_gives_up_at_the_deadline() {
        let dir = std::env::temp_dir().join(format!("fnode-client-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // A VMM whose guest refuses every connection: accept and close.
        let refuser = thread::spawn(move || {
            let mut refused = 0;
            while let Ok((mut s, _)) = listener.accept() {
                let mut line = [0u8; 16];
                let n = s.read(&mut line).unwrap_or(0);
                if line[..n].starts_with(b"STOP") {
                    break;
                }
                refused += 1;
            }
            refused
        });
        let deadline = Instant::now() + Duration::from_millis(50);
        let err = Connection::connect_retrying(&path, 1024, deadline, &mut go_on()).unwrap_err();
        assert!(matches!(err, ClientError::TimedOut), "{err:?}");
        UnixStream::connect(&path)
            .unwrap()
            .write_all(b"STOP")
            .unwrap();
        assert!(refuser.join().unwrap() >= 2, "it retried");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
