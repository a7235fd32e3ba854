//! The invocation channel: [`fnode_guest::abi::frame`] frames over the vsock connection the
//! host opens on [`fnode_guest::abi::vsock::INVOKE_PORT`].
//!
//! The kernel's run loop calls [`Channel::wait_request`], which halts the CPU until a whole
//! REQUEST frame has arrived and its payload lies in the request buffer, then
//! [`Channel::send_response`] with the function's RESPONSE (or an ERROR message).
//!
//! The request buffer is registered once ([`Channel::new`]) rather than passed per call: the
//! device writes large payloads straight into it (no copy, see [`crate::virtio::vsock`]), and
//! if the connection ends while a payload is half received, the device still holds a window
//! into the buffer until its next packet, which may come after `wait_request` has returned.
//! The buffer must therefore outlive every call, which a per-call `&mut [u8]` cannot promise.
//!
//! A frame the guest cannot take (bad magic or version, not a REQUEST, longer than the
//! buffer) is answered with an ERROR frame naming the problem, the connection is closed, and
//! `wait_request` reports it ([`ChannelError::Rejected`]); the caller logs it and waits
//! again. When the host closes the connection, `wait_request` returns
//! [`ChannelError::Closed`] and the next call waits for the next connection.

use core::{fmt, ptr::NonNull};

use fnode_guest::abi::frame::{self, Header, HeaderError, HEADER_LEN, KIND_REQUEST, MAX_PAYLOAD};

use crate::virtio::{
    copy_bytes, dma_addr, dma_reachable,
    vsock::{Event, Vsock, VsockError},
    Transport,
};

/// Most bytes the channel holds that arrived ahead of the request being received (a host
/// sends the next request only after reading the response, so normally none).
pub const CARRY_MAX: usize = 4096;

/// Why a frame from the host was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The header does not decode.
    Header(HeaderError),
    /// The frame is not a REQUEST.
    NotRequest(u16),
    /// The payload does not fit the request buffer.
    TooLong {
        /// The header's length.
        len: u32,
        /// The request buffer's size.
        cap: usize,
    },
    /// The host sent more than [`CARRY_MAX`] bytes ahead of the request being served.
    Overrun,
    /// Data arrived in a receive window the channel was not expecting data in.
    Unexpected,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::Header(e) => write!(f, "{e}"),
            Rejection::NotRequest(kind) => {
                write!(
                    f,
                    "frame kind {kind} where a REQUEST (kind {KIND_REQUEST}) was expected"
                )
            }
            Rejection::TooLong { len, cap } => {
                write!(
                    f,
                    "payload of {len} bytes exceeds the guest's {cap}-byte request buffer"
                )
            }
            Rejection::Overrun => write!(
                f,
                "the host sent more than {CARRY_MAX} bytes ahead of the request being served: \
                 send the next request after reading the response"
            ),
            Rejection::Unexpected => write!(f, "stream data arrived where none was expected"),
        }
    }
}

/// Errors of the channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The host closed the connection (or never opened one); call `wait_request` again to
    /// wait for the next.
    #[error("the host closed the invocation connection")]
    Closed,
    /// A frame was refused: an ERROR frame went back and the connection was closed.
    #[error("refused a frame from the host (sent an ERROR frame, closed the connection): {0}")]
    Rejected(Rejection),
    /// The response is longer than a frame may be.
    #[error("response of {0} bytes exceeds the {max}-byte frame limit", max = MAX_PAYLOAD)]
    ResponseTooLong(usize),
    /// The response lies where the device cannot read it.
    #[error(
        "response buffer at {0:#x} is outside the identity map, where the device cannot read it"
    )]
    Unreachable(u64),
    /// The device broke the virtio protocol; the channel is unusable.
    #[error("the invocation channel's device failed")]
    Device(#[source] VsockError),
    /// The heap has no room for the channel's buffer.
    #[error("out of memory for the invocation channel's {CARRY_MAX}-byte buffer")]
    NoMemory,
}

impl From<VsockError> for ChannelError {
    fn from(e: VsockError) -> Self {
        ChannelError::Device(e)
    }
}

/// The receive side of the frame protocol: the header being assembled, then the payload.
#[derive(Debug)]
struct FrameRx {
    hdr: [u8; HEADER_LEN],
    hdr_len: usize,
    /// Once the header is accepted: id, payload length, payload bytes received.
    payload: Option<(u64, usize, usize)>,
}

impl FrameRx {
    const fn new() -> Self {
        FrameRx {
            hdr: [0; HEADER_LEN],
            hdr_len: 0,
            payload: None,
        }
    }

    fn reset(&mut self) {
        self.hdr_len = 0;
        self.payload = None;
    }

    /// The id in the header bytes received so far (for an ERROR answer to a bad header).
    fn raw_id(&self) -> u64 {
        Header::raw_id(&self.hdr)
    }

    /// Takes stream bytes up to the end of the current frame: header bytes into the header,
    /// payload bytes into `buf`. Returns how many bytes were taken and, when the frame is
    /// complete, its id and payload length.
    // Always inlined: the usual small request is settled here in a straight line, without a
    // call and its register saves (kernel code may be emulated one instruction at a time).
    #[inline(always)]
    fn feed(
        &mut self,
        bytes: &[u8],
        buf: &mut [u8],
    ) -> Result<(usize, Option<(u64, usize)>), Rejection> {
        // The usual small request: a whole frame at the start of one packet, its header
        // checked as words (what `Header::decode` accepts for a REQUEST; anything else goes
        // the long way, which decodes and refuses it properly).
        if self.payload.is_none() && self.hdr_len == 0 && bytes.len() >= HEADER_LEN {
            let p = bytes.as_ptr();
            // SAFETY: `bytes` holds at least HEADER_LEN bytes; unaligned reads.
            let (w0, len) = unsafe {
                (
                    u64::from_le(p.cast::<u64>().read_unaligned()),
                    u32::from_le(p.add(8).cast::<u32>().read_unaligned()) as usize,
                )
            };
            let end = HEADER_LEN + len;
            if w0 == REQUEST_WORD0 && len <= buf.len() && len <= MAX_PAYLOAD && end <= bytes.len() {
                // SAFETY: as above; `len <= buf.len()`, `HEADER_LEN + len <= bytes.len()`;
                // distinct memory (the driver's buffer, the request buffer).
                let id = unsafe {
                    copy_bytes(buf.as_mut_ptr(), p.add(HEADER_LEN), len);
                    u64::from_le(p.add(16).cast::<u64>().read_unaligned())
                };
                return Ok((end, Some((id, len))));
            }
        }
        self.feed_pieces(bytes, buf)
    }

    /// [`feed`](Self::feed) for everything but a whole small frame at the start of `bytes`:
    /// a header in pieces, a payload over several packets, or a frame to refuse.
    #[inline(never)]
    fn feed_pieces(
        &mut self,
        bytes: &[u8],
        buf: &mut [u8],
    ) -> Result<(usize, Option<(u64, usize)>), Rejection> {
        let mut taken = 0;
        let (id, len, mut have) = match self.payload {
            Some(p) => p,
            None => {
                let (decoded, in_place) = match bytes.first_chunk::<HEADER_LEN>() {
                    // The whole header in one piece (the usual case): decode it in place.
                    Some(whole) if self.hdr_len == 0 => {
                        taken = HEADER_LEN;
                        (Header::decode(whole), Some(whole))
                    }
                    _ => {
                        taken = (HEADER_LEN - self.hdr_len).min(bytes.len());
                        self.hdr[self.hdr_len..self.hdr_len + taken]
                            .copy_from_slice(&bytes[..taken]);
                        self.hdr_len += taken;
                        if self.hdr_len < HEADER_LEN {
                            return Ok((taken, None));
                        }
                        (Header::decode(&self.hdr), None)
                    }
                };
                let checked = decoded.map_err(Rejection::Header).and_then(|h| {
                    if h.kind != KIND_REQUEST {
                        Err(Rejection::NotRequest(h.kind))
                    } else if h.len as usize > buf.len() {
                        Err(Rejection::TooLong {
                            len: h.len,
                            cap: buf.len(),
                        })
                    } else {
                        Ok(h)
                    }
                });
                let h = match checked {
                    Ok(h) => h,
                    Err(r) => {
                        if let Some(whole) = in_place {
                            // Kept for the id of the ERROR answer.
                            self.hdr = *whole;
                        }
                        return Err(r);
                    }
                };
                self.hdr_len = 0;
                (h.id, h.len as usize, 0)
            }
        };
        let n = (len - have).min(bytes.len() - taken);
        // SAFETY: `have + n <= len <= buf.len()` and `taken + n <= bytes.len()`; the two
        // slices are distinct memory (the driver's buffer, the request buffer).
        unsafe { copy_bytes(buf.as_mut_ptr().add(have), bytes.as_ptr().add(taken), n) };
        have += n;
        taken += n;
        if have == len {
            self.payload = None;
            return Ok((taken, Some((id, len))));
        }
        self.payload = Some((id, len, have));
        Ok((taken, None))
    }
}

/// Bytes that arrived ahead of the frame being received: a heap buffer of [`CARRY_MAX`]
/// bytes, allocated once and never cleared (only the first `len` bytes are ever read), so
/// that building and moving a [`Channel`] copies no large array (kernel code may be
/// emulated one instruction at a time).
#[derive(Debug)]
struct Carry {
    buf: NonNull<u8>,
    len: usize,
}

impl Carry {
    fn new() -> Result<Self, ChannelError> {
        // SAFETY: the layout has a non-zero size; `Drop` frees it with the same layout.
        let buf = NonNull::new(unsafe { alloc::alloc::alloc(Self::LAYOUT) })
            .ok_or(ChannelError::NoMemory)?;
        Ok(Carry { buf, len: 0 })
    }

    const LAYOUT: core::alloc::Layout = match core::alloc::Layout::from_size_align(CARRY_MAX, 8) {
        Ok(l) => l,
        Err(_) => panic!("CARRY_MAX is a valid size"),
    };

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The bytes held.
    fn bytes(&self) -> &[u8] {
        // SAFETY: the first `len <= CARRY_MAX` bytes were written by `push`.
        unsafe { core::slice::from_raw_parts(self.buf.as_ptr(), self.len) }
    }

    /// Appends `bytes`; false (nothing appended) if they do not fit.
    fn push(&mut self, bytes: &[u8]) -> bool {
        if bytes.len() > CARRY_MAX - self.len {
            return false;
        }
        // SAFETY: `len + bytes.len() <= CARRY_MAX`: inside the buffer, which `bytes` (the
        // driver's memory) does not overlap.
        unsafe { copy_bytes(self.buf.as_ptr().add(self.len), bytes.as_ptr(), bytes.len()) };
        self.len += bytes.len();
        true
    }

    /// Drops the first `n` bytes.
    fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        // SAFETY: both ranges lie in the first `len` bytes; `copy` allows the overlap.
        unsafe { core::ptr::copy(self.buf.as_ptr().add(n), self.buf.as_ptr(), self.len - n) };
        self.len -= n;
    }

    fn clear(&mut self) {
        self.len = 0;
    }
}

impl Drop for Carry {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { alloc::alloc::dealloc(self.buf.as_ptr(), Self::LAYOUT) };
    }
}

/// The invocation channel over a vsock driver.
#[derive(Debug)]
pub struct Channel<T: Transport> {
    vsock: Vsock<T>,
    buf: NonNull<u8>,
    cap: usize,
    rx: FrameRx,
    carry: Carry,
}

impl<T: Transport> Channel<T> {
    /// A channel whose request payloads land in `buf[..cap]`.
    ///
    /// # Safety
    /// `buf` must be valid for reads and writes of `cap` bytes for as long as the channel
    /// lives, and nothing else may access it while a `Channel` method runs (the device writes
    /// it during `wait_request`, and may still hold a window into it after a connection
    /// ended mid-payload).
    pub unsafe fn new(vsock: Vsock<T>, buf: NonNull<u8>, cap: usize) -> Result<Self, ChannelError> {
        if !dma_reachable(dma_addr(buf.as_ptr()), cap) {
            return Err(ChannelError::Unreachable(dma_addr(buf.as_ptr())));
        }
        Ok(Channel {
            vsock,
            buf,
            cap,
            rx: FrameRx::new(),
            carry: Carry::new()?,
        })
    }

    /// The first `len` bytes of the request buffer (a request's payload after
    /// [`wait_request`](Self::wait_request) returned `len`).
    pub fn request(&self, len: usize) -> &[u8] {
        // SAFETY: as in `buf`; `len` is capped at the buffer size.
        unsafe { core::slice::from_raw_parts(self.buf.as_ptr(), len.min(self.cap)) }
    }

    /// The driver (for its counters and state).
    pub fn vsock(&self) -> &Vsock<T> {
        &self.vsock
    }

    #[cfg(test)]
    pub(crate) fn vsock_mut(&mut self) -> &mut Vsock<T> {
        &mut self.vsock
    }

    /// Waits (halting the CPU) until the host has opened a connection (returns at once if
    /// one is open). The run loop signals READY only then: a snapshot taken at READY holds
    /// the open connection, and a restored guest serves its first request on it without a
    /// new handshake.
    pub fn wait_connected(&mut self) -> Result<(), ChannelError> {
        while !self.vsock.is_open() {
            self.vsock.arm_rx(None);
            match self.vsock.poll()? {
                Event::None => self.vsock.wait()?,
                Event::Connected => self.forget(),
                Event::Control | Event::Closed => {}
                Event::Data { len, inline: true } => {
                    // Bytes that came with the connection: kept for wait_request.
                    if !self.carry.push(self.vsock.inline_data(len)) {
                        return Err(self.reject(Rejection::Overrun));
                    }
                }
                Event::Data { inline: false, .. } => {}
            }
        }
        // A receive buffer with the device before READY: a snapshot taken then holds it, and
        // the restored guest's first request needs no notification.
        self.vsock.arm_rx(None);
        // Every transmit slot back from the device: the snapshot's first send uses the
        // first one.
        self.vsock.complete_tx()?;
        // No interrupt left pending or unacknowledged either: a guest restored from a
        // snapshot taken at READY would otherwise wake at once for one its snapshotted self
        // handled (an acknowledgement exit and a useless round) before it halts for the first
        // request. What such an interrupt announced is polled by the next wait_request.
        self.vsock.settle();
        Ok(())
    }

    /// Calls `signal` (READY), then, if nothing but a packet can end a wait and none has
    /// come, waits for one: a guest restored from a snapshot taken at the signal resumes
    /// here, a few checks away from the wait for its first request (kernel code may be
    /// emulated one instruction at a time). The caller then receives as usual.
    #[inline(always)]
    pub fn signal_then_wait(&mut self, signal: impl FnOnce()) {
        // Only the driver changes these, and it does not run between here and the wait.
        let idle = self.carry.is_empty()
            && self.rx.hdr_len == 0
            && self.rx.payload.is_none()
            && self.vsock.idle();
        signal();
        if idle && self.vsock.rings_quiet() {
            self.vsock.wait_idle();
        }
    }

    /// Waits (halting the CPU) until a whole REQUEST frame has arrived on the open
    /// connection, accepting a connection first if none is open. Returns the request id and
    /// the payload length; the payload is in the request buffer ([`request`](Self::request)).
    // Always inlined into the run loop's `NEXT`: one call frame less per invocation.
    #[inline(always)]
    pub fn wait_request(&mut self) -> Result<(u64, usize), ChannelError> {
        let request = self.receive_frame()?;
        // Hand the device a buffer again now, not when the next wait starts: a host that
        // sends the next request (or a control packet) early finds one and needs no
        // notification.
        self.vsock.arm_rx(None);
        Ok(request)
    }

    /// [`wait_request`](Self::wait_request) for the usual request, in a straight line: a whole
    /// REQUEST frame alone in one packet in the driver's inline buffer, with nothing held
    /// back from earlier packets. Waits (halting the CPU) while nothing at all happens.
    /// `None`, nothing taken, when anything else happened: `wait_request` then handles it.
    // Always inlined into the run loop's `NEXT`.
    #[inline(always)]
    pub fn next_request(&mut self) -> Option<(u64, usize)> {
        if !self.carry.is_empty() || self.rx.hdr_len != 0 || self.rx.payload.is_some() {
            return None;
        }
        let (buf, cap) = (self.buf.as_ptr(), self.cap);
        loop {
            if let Some(p) = self.vsock.peek_small() {
                // The frame header, read before anything is taken (the copy below makes the
                // compiler read memory again after it).
                let [w0, w1, id] = p.prefix();
                // What `Header::decode` accepts for a REQUEST that fits the buffer (anything
                // else goes the long way, which refuses it properly), ending the packet.
                let len = w1 as u32 as usize;
                if w0 != REQUEST_WORD0 || HEADER_LEN + len != p.len() || len > cap {
                    return None;
                }
                self.vsock.take_small(p, |bytes| {
                    // SAFETY: `len <= cap`: inside the request buffer (`new`'s contract), which
                    // the driver's inline buffer does not overlap; `bytes` holds
                    // `HEADER_LEN + len` bytes.
                    unsafe { copy_bytes(buf, bytes.as_ptr().add(HEADER_LEN), len) }
                });
                return Some((id, len));
            }
            if !self.vsock.wait_quietly() {
                return None;
            }
        }
    }

    /// [`send_response`](Self::send_response) for the usual small response, in a straight
    /// line: the frame header as three words and the payload copied into a free transmit
    /// slot, sent as one packet. Returns false, nothing sent, when it cannot go so now.
    // Always inlined into the run loop's `NEXT`.
    #[inline(always)]
    pub fn try_send_small(&mut self, id: u64, kind: u16, payload: &[u8]) -> bool {
        let [w0, w1, w2] = header_words(kind, id, payload.len() as u32);
        let (src, n) = (payload.as_ptr(), payload.len());
        self.vsock.try_send_small_with(HEADER_LEN + n, |d| {
            // SAFETY: `d` holds `HEADER_LEN + n` bytes of driver memory: the header's 24,
            // then the payload's, copied from the caller's slice (distinct memory).
            unsafe {
                let w = d.cast::<u64>();
                w.write_unaligned(w0);
                w.add(1).write_unaligned(w1);
                w.add(2).write_unaligned(w2);
                copy_bytes(d.add(HEADER_LEN), src, n);
            }
        })
    }

    /// The body of [`wait_request`](Self::wait_request).
    #[inline]
    fn receive_frame(&mut self) -> Result<(u64, usize), ChannelError> {
        if !self.carry.is_empty() {
            if let Some(done) = self.feed_carry()? {
                return Ok(done);
            }
        }
        loop {
            let window = match self.rx.payload {
                Some((_, len, have)) if have < len => {
                    // SAFETY: `have < len <= cap`: inside the request buffer.
                    let at = unsafe { self.buf.as_ptr().add(have) };
                    Some((dma_addr(at), (len - have) as u32))
                }
                _ => None,
            };
            self.vsock.arm_rx(window);
            match self.vsock.poll()? {
                Event::None => {
                    if self.vsock.peer_done_sending() && self.carry.is_empty() {
                        self.vsock.close()?;
                        self.forget();
                        return Err(ChannelError::Closed);
                    }
                    self.vsock.update_credit_if_low()?;
                    self.vsock.wait()?;
                }
                Event::Control => {}
                Event::Connected => self.forget(),
                Event::Closed => {
                    self.forget();
                    return Err(ChannelError::Closed);
                }
                Event::Data { len, inline: true } => {
                    let (buf, cap) = (self.buf, self.cap);
                    // SAFETY: `new`'s contract; disjoint from the driver's inline buffer.
                    let dst = unsafe { core::slice::from_raw_parts_mut(buf.as_ptr(), cap) };
                    let bytes = self.vsock.inline_data(len);
                    match self.rx.feed(bytes, dst) {
                        Ok((taken, done)) => {
                            if taken < bytes.len() && !self.carry.push(&bytes[taken..]) {
                                return Err(self.reject(Rejection::Overrun));
                            }
                            if let Some(done) = done {
                                return Ok(done);
                            }
                        }
                        Err(r) => return Err(self.reject(r)),
                    }
                }
                Event::Data { len, inline: false } => match (window, self.rx.payload) {
                    (Some(_), Some((id, plen, have))) => {
                        // The device wrote `len <= plen - have` bytes where they belong.
                        let have = have + len as usize;
                        if have == plen {
                            self.rx.reset();
                            return Ok((id, plen));
                        }
                        self.rx.payload = Some((id, plen, have));
                    }
                    _ => return Err(self.reject(Rejection::Unexpected)),
                },
            }
        }
    }

    /// Feeds bytes that arrived ahead into the frame being received.
    fn feed_carry(&mut self) -> Result<Option<(u64, usize)>, ChannelError> {
        // SAFETY: `new`'s contract.
        let dst = unsafe { core::slice::from_raw_parts_mut(self.buf.as_ptr(), self.cap) };
        match self.rx.feed(self.carry.bytes(), dst) {
            Ok((taken, done)) => {
                self.carry.consume(taken);
                Ok(done)
            }
            Err(r) => Err(self.reject(r)),
        }
    }

    /// Drops any partial frame and bytes held ahead.
    fn forget(&mut self) {
        self.rx.reset();
        self.carry.clear();
    }

    /// Answers a refused frame with an ERROR frame, closes the connection, and returns the
    /// error for `wait_request` to report.
    fn reject(&mut self, why: Rejection) -> ChannelError {
        let id = self.rx.raw_id();
        let mut msg = MessageBuf::new();
        // A `MessageBuf` never fails; it cuts what does not fit.
        let _ = fmt::Write::write_fmt(
            &mut msg,
            format_args!("fnode guest refused the frame: {why}"),
        );
        let hdr = Header {
            kind: frame::KIND_ERROR,
            id,
            len: msg.len as u32,
        }
        .encode();
        let sent = self.send_stream(&hdr, &msg.buf[..msg.len]);
        let closed = self.vsock.close();
        self.forget();
        match (sent, closed) {
            (Err(ChannelError::Device(e)), _) | (_, Err(e)) => ChannelError::Device(e),
            _ => ChannelError::Rejected(why),
        }
    }

    /// Sends a RESPONSE ([`frame::KIND_RESPONSE`]) or ERROR ([`frame::KIND_ERROR`]) frame for
    /// request `id`. Returns once the device no longer needs `payload` (small payloads are
    /// copied; large ones are read by the device where they lie).
    // Always inlined into the run loop's `NEXT`, like `wait_request`.
    #[inline(always)]
    pub fn send_response(
        &mut self,
        id: u64,
        kind: u16,
        payload: &[u8],
    ) -> Result<(), ChannelError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(ChannelError::ResponseTooLong(payload.len()));
        }
        let at = dma_addr(payload.as_ptr());
        if !dma_reachable(at, payload.len()) {
            return Err(ChannelError::Unreachable(at));
        }
        // The usual small response: the frame header as three words and the payload straight
        // into a transmit slot, sent as one packet.
        let len = HEADER_LEN + payload.len();
        if let Some(p) = self.vsock.reserve_small(len)? {
            let [w0, w1, w2] = header_words(kind, id, payload.len() as u32);
            // SAFETY: `p` holds `len` bytes of driver memory: the header's 24, then the
            // payload's, copied from the caller's slice (distinct memory).
            unsafe {
                let d = p.data().cast::<u64>();
                d.write_unaligned(w0);
                d.add(1).write_unaligned(w1);
                d.add(2).write_unaligned(w2);
                copy_bytes(p.data().add(HEADER_LEN), payload.as_ptr(), payload.len());
            }
            self.vsock.commit_small(p);
            return Ok(());
        }
        let hdr = Header {
            kind,
            id,
            len: payload.len() as u32,
        }
        .encode();
        self.send_stream(&hdr, payload)
    }

    /// Sends the first `len` bytes of the request buffer back as the RESPONSE to `id` (the
    /// echo service).
    pub fn echo(&mut self, id: u64, len: usize) -> Result<(), ChannelError> {
        let len = len.min(self.cap);
        let hdr = Header {
            kind: frame::KIND_RESPONSE,
            id,
            len: len as u32,
        }
        .encode();
        // SAFETY: `new`'s contract; the device only reads the buffer while sending, and no
        // receive window is armed into it outside `wait_request`'s payload phase.
        let payload = unsafe { core::slice::from_raw_parts(self.buf.as_ptr(), len) };
        self.send_stream(&hdr, payload)
    }

    /// Sends `head ++ body` on the open connection and waits until the device no longer
    /// needs `body`.
    // Always inlined: the usual small response is one `send_small`; the rest is out of line.
    #[inline(always)]
    fn send_stream(&mut self, head: &[u8], body: &[u8]) -> Result<(), ChannelError> {
        if !self.vsock.is_open() {
            return Err(ChannelError::Closed);
        }
        if self.vsock.send_small(head, body)? {
            return Ok(());
        }
        self.send_stream_large(head, body)
    }

    /// [`send_stream`](Self::send_stream) for what `send_small` cannot send now: large
    /// payloads, or no credit or free slot yet.
    #[inline(never)]
    fn send_stream_large(&mut self, head: &[u8], body: &[u8]) -> Result<(), ChannelError> {
        let total = head.len() + body.len();
        let mut offset = 0;
        loop {
            if offset < total {
                offset = self.vsock.send(head, body, offset)?;
            }
            if offset == total && !self.vsock.tx_zero_copy_pending()? {
                return Ok(());
            }
            // Waiting for credit, a transmit slot, or the device to finish reading `body`.
            self.vsock.arm_rx(None);
            match self.vsock.poll()? {
                Event::None => self.vsock.wait()?,
                Event::Control | Event::Connected => {}
                Event::Closed => {
                    self.forget();
                    return Err(ChannelError::Closed);
                }
                Event::Data { len, inline: true } => {
                    // The host sent ahead; keep it for the next wait_request.
                    if !self.carry.push(self.vsock.inline_data(len)) {
                        self.vsock.close()?;
                        self.forget();
                        return Err(ChannelError::Rejected(Rejection::Overrun));
                    }
                }
                // A window armed by an interrupted receive: nothing to keep.
                Event::Data { inline: false, .. } => {}
            }
        }
    }
}

/// The first header word of a REQUEST frame ([`header_words`]).
const REQUEST_WORD0: u64 =
    frame::MAGIC as u64 | (frame::VERSION as u64) << 32 | (KIND_REQUEST as u64) << 48;

/// A frame header as the three little-endian words it is on the wire: magic, version and
/// kind; length (and the reserved field, zero); id. Written, or checked, in three
/// instructions.
fn header_words(kind: u16, id: u64, len: u32) -> [u64; 3] {
    [
        u64::from(frame::MAGIC) | u64::from(frame::VERSION) << 32 | u64::from(kind) << 48,
        u64::from(len),
        id,
    ]
}

/// A fixed buffer for an ERROR message.
struct MessageBuf {
    buf: [u8; 160],
    len: usize,
}

impl MessageBuf {
    const fn new() -> Self {
        MessageBuf {
            buf: [0; 160],
            len: 0,
        }
    }
}

impl fmt::Write for MessageBuf {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

/// The `fnode.echo=1` mode: brings up the virtio-vsock device the command line announces
/// and serves [`serve_echo`] on it. Never returns; fails the guest if there is no device or
/// it breaks.
#[cfg(target_os = "none")]
pub fn echo_main(cmdline: &str) -> ! {
    let Some(vsock) = crate::virtio::find_vsock(cmdline) else {
        crate::exit::fail(&"fnode.echo=1 needs a virtio-vsock device: announce one with virtio_mmio.device= (fnode-vmm boot --vsock)")
    };
    let e = serve_echo(vsock);
    crate::exit::fail(&format_args!("echo service stopped: {e}: {}", SourceOf(&e)))
}

/// Displays an error's source, or nothing.
#[cfg(target_os = "none")]
struct SourceOf<'a>(&'a ChannelError);

#[cfg(target_os = "none")]
impl fmt::Display for SourceOf<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut source = core::error::Error::source(self.0);
        while let Some(e) = source {
            write!(f, "{e}; ")?;
            source = e.source();
        }
        Ok(())
    }
}

/// The echo service (`fnode.echo=1`): answers every REQUEST with its own payload, for
/// testing the channel end to end. Runs until the device fails.
#[cfg(target_os = "none")]
pub fn serve_echo(vsock: Vsock<crate::virtio::mmio::MmioTransport>) -> ChannelError {
    use core::alloc::Layout;

    use crate::{line::Line, serial};

    let Ok(layout) = Layout::from_size_align(MAX_PAYLOAD, 4096) else {
        return ChannelError::ResponseTooLong(MAX_PAYLOAD);
    };
    // SAFETY: non-zero size. Never freed. Not zeroed on purpose: the device writes every
    // byte the channel hands out (zeroing 6 MiB of emulated kernel code costs ~0.4 s).
    let Some(buf) = NonNull::new(unsafe { alloc::alloc::alloc(layout) }) else {
        return ChannelError::ResponseTooLong(MAX_PAYLOAD);
    };
    // SAFETY: the buffer is MAX_PAYLOAD bytes, never freed, and only the channel uses it.
    let mut ch = match unsafe { Channel::new(vsock, buf, MAX_PAYLOAD) } {
        Ok(ch) => ch,
        Err(e) => return e,
    };
    let mut line = Line::log();
    line.str("echo service on vsock port ")
        .dec(u64::from(fnode_guest::abi::vsock::INVOKE_PORT));
    serial::write_line(&mut line);
    // READY once the host's connection is open, as the run loop does: a snapshot taken
    // there serves requests on that connection at once.
    loop {
        match ch.wait_connected() {
            Ok(()) => break,
            Err(ChannelError::Closed) => {}
            Err(e) => return e,
        }
    }
    crate::control::ready();
    loop {
        let result = match ch.wait_request() {
            Ok((id, len)) => ch.echo(id, len),
            Err(e) => Err(e),
        };
        match result {
            Ok(()) | Err(ChannelError::Closed) => {}
            Err(e @ ChannelError::Device(_)) => return e,
            Err(e) => {
                use core::fmt::Write;
                let mut line = Line::log();
                // A `Line` never fails to take text; it cuts what does not fit.
                let _ = write!(line, "{e}");
                serial::write_line(&mut line);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::vec::Vec;

    use super::*;
    use crate::virtio::vsock::{
        op,
        tests::{driver_with, FakeHost},
        RX_INLINE,
    };

    const PORT: u32 = 4321;

    struct Harness {
        ch: Channel<FakeHost>,
        _buf: Vec<u8>,
    }

    fn channel(cap: usize) -> Harness {
        channel_with(cap, false)
    }

    fn channel_with(cap: usize, event_idx: bool) -> Harness {
        let mut buf = std::vec![0u8; cap.max(1)];
        let ptr = NonNull::new(buf.as_mut_ptr()).unwrap();
        // SAFETY: the vector lives in the harness, as long as the channel.
        let ch = unsafe { Channel::new(driver_with(32, event_idx), ptr, cap) }.unwrap();
        Harness { ch, _buf: buf }
    }

    fn host(h: &mut Harness) -> &mut FakeHost {
        h.ch.vsock_mut().transport_mut()
    }

    fn request(id: u64, payload: &[u8]) -> Vec<u8> {
        let mut f = Header {
            kind: KIND_REQUEST,
            id,
            len: payload.len() as u32,
        }
        .encode()
        .to_vec();
        f.extend_from_slice(payload);
        f
    }

    /// Splits `frame` into packets of `sizes` (cycled) from the host.
    fn send_split(h: &mut Harness, frame: &[u8], sizes: &[usize]) {
        let mut at = 0;
        for &n in sizes.iter().cycle() {
            if at >= frame.len() {
                break;
            }
            let end = (at + n).min(frame.len());
            host(h).send(op::RW, PORT, &frame[at..end]);
            at = end;
        }
    }

    fn connect(h: &mut Harness) {
        host(h).send(op::REQUEST, PORT, &[]);
    }

    /// The frames the guest sent: (kind, id, payload).
    fn responses(h: &mut Harness) -> Vec<(u16, u64, Vec<u8>)> {
        host(h).run();
        let stream = host(h).stream_from_guest(PORT);
        let mut out = Vec::new();
        let mut at = 0;
        while at + HEADER_LEN <= stream.len() {
            let hdr = Header::decode(stream[at..at + HEADER_LEN].try_into().unwrap()).unwrap();
            let end = at + HEADER_LEN + hdr.len as usize;
            out.push((hdr.kind, hdr.id, stream[at + HEADER_LEN..end].to_vec()));
            at = end;
        }
        out
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 251) as u8).collect()
    }

    #[test]
    fn a_connection_is_settled_before_ready() {
        let mut h = channel(1024);
        connect(&mut h);
        h.ch.wait_connected().unwrap();
        assert!(h.ch.vsock().is_open());
        // Interrupts forgotten once the connection is up: a snapshot taken at READY does not
        // wake for them again.
        assert_eq!(host(&mut h).settles, 1);
        // Every transmit slot back (the connection's response went out through one): a
        // snapshot taken at READY sends its first response from the first slot.
        assert!(h.ch.vsock().tx_all_free());
        send_split(&mut h, &request(4, b"after"), &[usize::MAX]);
        assert_eq!(h.ch.wait_request().unwrap(), (4, 5));
    }

    #[test]
    fn header_words_are_the_wire_header() {
        let h = Header {
            kind: frame::KIND_ERROR,
            id: 0x0102_0304_0506_0708,
            len: 0x00a0_b0c0,
        };
        let words = header_words(h.kind, h.id, h.len);
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(bytes, h.encode());
        let request = header_words(KIND_REQUEST, 7, 3)[0];
        assert_eq!(request, REQUEST_WORD0);
    }

    #[test]
    fn echoes_small_and_large_payloads() {
        let mut h = channel(MAX_PAYLOAD);
        connect(&mut h);
        let inline = RX_INLINE - HEADER_LEN;
        for (i, n) in [0usize, 1, 200, inline, inline + 1, 5000, 64 * 1024, 300_000]
            .into_iter()
            .enumerate()
        {
            let payload = pattern(n);
            send_split(&mut h, &request(i as u64, &payload), &[usize::MAX]);
            let (id, len) = h.ch.wait_request().unwrap();
            assert_eq!((id, len), (i as u64, n));
            assert_eq!(h.ch.request(len), &payload[..]);
            h.ch.echo(id, len).unwrap();
        }
        let got = responses(&mut h);
        assert_eq!(got.len(), 8);
        for (i, (kind, id, data)) in got.iter().enumerate() {
            assert_eq!((*kind, *id), (frame::KIND_RESPONSE, i as u64));
            assert_eq!(data, &pattern(data.len()));
        }
        assert_eq!(got[7].2.len(), 300_000);
    }

    #[test]
    fn event_indices_spare_the_receive_notifications() {
        for event_idx in [false, true] {
            let mut h = channel_with(MAX_PAYLOAD, event_idx);
            connect(&mut h);
            for i in 0..20u64 {
                send_split(&mut h, &request(i, b"ping"), &[usize::MAX]);
                let (id, len) = h.ch.wait_request().unwrap();
                h.ch.echo(id, len).unwrap();
            }
            // A payload larger than the inline buffer still arrives (windows, notified).
            let big = pattern(200_000);
            send_split(&mut h, &request(99, &big), &[usize::MAX]);
            let (id, len) = h.ch.wait_request().unwrap();
            assert_eq!(h.ch.request(len), &big[..]);
            h.ch.send_response(id, frame::KIND_RESPONSE, &big).unwrap();
            let got = responses(&mut h);
            assert_eq!(got.len(), 21);
            assert!(got[20].2 == big);
            let [rx, tx, _] = host(&mut h).notifies;
            if event_idx {
                // The device never ran out of receive buffers between small requests.
                assert!(rx < 10, "{rx} receive notifications");
            } else {
                assert!(rx >= 21, "{rx} receive notifications");
            }
            assert!(tx >= 21, "{tx} transmit notifications");
        }
    }

    #[test]
    fn large_payloads_go_straight_into_the_buffer() {
        let mut h = channel(MAX_PAYLOAD);
        connect(&mut h);
        host(&mut h).max_rx_packet = 64 * 1024;
        let payload = pattern(MAX_PAYLOAD);
        send_split(&mut h, &request(9, &payload), &[usize::MAX]);
        let (id, len) = h.ch.wait_request().unwrap();
        assert_eq!((id, len), (9, MAX_PAYLOAD));
        assert!(h.ch.request(len) == &payload[..]);
        // One inline packet (header and the first bytes), then 64 KiB windows (no copies
        // beyond that), then the inline buffer again for the next request.
        let rx_notifies = host(&mut h).notifies[0];
        assert!(
            rx_notifies <= 3 + MAX_PAYLOAD.div_ceil(64 * 1024) as u32,
            "{rx_notifies}"
        );
        h.ch.send_response(id, frame::KIND_RESPONSE, &payload)
            .unwrap();
        let got = responses(&mut h);
        assert!(got[0].2 == payload);
    }

    #[test]
    fn the_straight_ways_serve_small_frames_and_leave_the_rest() {
        for event_idx in [false, true] {
            let mut h = channel_with(MAX_PAYLOAD, event_idx);
            // No connection: nothing to take, no wait.
            assert_eq!(h.ch.next_request(), None);
            connect(&mut h);
            h.ch.wait_connected().unwrap();
            // Every few requests a send finds no free slot (they are reaped the long way,
            // eight at a time) and the next wait goes the long way too.
            let (mut fast_in, mut fast_out) = (0, 0);
            for i in 0..40u64 {
                let payload = pattern(i as usize * 20);
                send_split(&mut h, &request(i, &payload), &[usize::MAX]);
                let got = match h.ch.next_request() {
                    Some(r) => {
                        fast_in += 1;
                        r
                    }
                    None => h.ch.wait_request().unwrap(),
                };
                assert_eq!(got, (i, payload.len()));
                assert_eq!(h.ch.request(payload.len()), &payload[..]);
                if h.ch.try_send_small(i, frame::KIND_RESPONSE, &payload) {
                    fast_out += 1;
                } else {
                    h.ch.send_response(i, frame::KIND_RESPONSE, &payload)
                        .unwrap();
                }
            }
            assert!(fast_in >= 30 && fast_out >= 30, "{fast_in} {fast_out}");
            let got = responses(&mut h);
            assert_eq!(got.len(), 40);
            for (i, (kind, id, data)) in got.iter().enumerate() {
                assert_eq!((*kind, *id), (frame::KIND_RESPONSE, i as u64));
                assert_eq!(data, &pattern(i * 20));
            }
            // A frame in two packets, two frames in one, a large one, a bad one: the long
            // way, nothing taken.
            let frame = request(50, b"split");
            send_split(&mut h, &frame, &[10]);
            assert_eq!(h.ch.next_request(), None);
            assert_eq!(h.ch.wait_request().unwrap(), (50, 5));
            let mut two = request(51, b"a");
            two.extend(request(52, b"b"));
            send_split(&mut h, &two, &[usize::MAX]);
            assert_eq!(h.ch.next_request(), None);
            assert_eq!(h.ch.wait_request().unwrap(), (51, 1));
            // The second frame is held back: the straight way leaves it to the long one.
            assert_eq!(h.ch.next_request(), None);
            assert_eq!(h.ch.wait_request().unwrap(), (52, 1));
            let big = pattern(RX_INLINE + 10);
            send_split(&mut h, &request(53, &big), &[usize::MAX]);
            assert_eq!(h.ch.next_request(), None);
            assert_eq!(h.ch.wait_request().unwrap(), (53, big.len()));
            assert!(!h.ch.try_send_small(53, frame::KIND_RESPONSE, &big));
            h.ch.send_response(53, frame::KIND_RESPONSE, &big).unwrap();
            let bad = Header {
                kind: frame::KIND_RESPONSE,
                id: 54,
                len: 0,
            }
            .encode();
            host(&mut h).send(op::RW, PORT, &bad);
            assert_eq!(h.ch.next_request(), None);
            assert!(matches!(
                h.ch.wait_request(),
                Err(ChannelError::Rejected(Rejection::NotRequest(_)))
            ));
            // Closed: no straight-line send.
            assert!(!h.ch.try_send_small(55, frame::KIND_RESPONSE, b"x"));
        }
    }

    #[test]
    fn frames_split_anywhere_and_back_to_back() {
        let mut h = channel(4096);
        connect(&mut h);
        let mut stream = Vec::new();
        for i in 0..6u64 {
            stream.extend(request(i, &pattern(i as usize * 300)));
        }
        send_split(&mut h, &stream, &[1, 5, 23, 24, 100, 3000, 7]);
        for i in 0..6u64 {
            let (id, len) = h.ch.wait_request().unwrap();
            assert_eq!((id, len), (i, i as usize * 300));
            assert_eq!(h.ch.request(len), &pattern(len)[..]);
            h.ch.send_response(id, frame::KIND_RESPONSE, b"ok").unwrap();
        }
        assert_eq!(responses(&mut h).len(), 6);
    }

    #[test]
    fn oversized_header_is_answered_with_an_error_and_a_close() {
        let mut h = channel(1024);
        connect(&mut h);
        let bad = Header {
            kind: KIND_REQUEST,
            id: 77,
            len: 1025,
        }
        .encode();
        host(&mut h).send(op::RW, PORT, &bad);
        let err = h.ch.wait_request().unwrap_err();
        assert!(
            matches!(
                err,
                ChannelError::Rejected(Rejection::TooLong {
                    len: 1025,
                    cap: 1024
                })
            ),
            "{err}"
        );
        let got = responses(&mut h);
        assert_eq!(got.len(), 1);
        let (kind, id, msg) = &got[0];
        assert_eq!((*kind, *id), (frame::KIND_ERROR, 77));
        let msg = std::str::from_utf8(msg).unwrap();
        assert!(
            msg.contains("payload of 1025 bytes exceeds the guest's 1024-byte request buffer"),
            "{msg}"
        );
        assert_eq!(*host(&mut h).ops().last().unwrap(), op::SHUTDOWN);
        assert!(!h.ch.vsock().is_open());

        // Beyond the frame limit, and garbage: both refused the same way.
        for (port, bad) in [
            (
                PORT + 1,
                Header {
                    kind: KIND_REQUEST,
                    id: 1,
                    len: MAX_PAYLOAD as u32 + 1,
                }
                .encode(),
            ),
            (PORT + 2, [0x55; HEADER_LEN]),
        ] {
            host(&mut h).send(op::REQUEST, port, &[]);
            host(&mut h).send(op::RW, port, &bad);
            let err = h.ch.wait_request().unwrap_err();
            assert!(
                matches!(err, ChannelError::Rejected(Rejection::Header(_))),
                "{err}"
            );
        }
    }

    #[test]
    fn a_response_frame_from_the_host_is_refused() {
        let mut h = channel(1024);
        connect(&mut h);
        let f = Header {
            kind: frame::KIND_RESPONSE,
            id: 3,
            len: 0,
        }
        .encode();
        host(&mut h).send(op::RW, PORT, &f);
        let err = h.ch.wait_request().unwrap_err();
        assert!(
            matches!(err, ChannelError::Rejected(Rejection::NotRequest(2))),
            "{err}"
        );
    }

    #[test]
    fn host_close_mid_payload_is_reported_and_the_next_connection_served() {
        let mut h = channel(MAX_PAYLOAD);
        connect(&mut h);
        host(&mut h).max_rx_packet = 1000;
        let frame = request(5, &pattern(10_000));
        host(&mut h).send(op::RW, PORT, &frame[..5000]);
        host(&mut h).send(op::RST, PORT, &[]);
        assert!(matches!(h.ch.wait_request(), Err(ChannelError::Closed)));
        // A window into the buffer may still be armed; the next connection still works.
        host(&mut h).send(op::REQUEST, PORT + 1, &[]);
        let frame = request(6, &pattern(3000));
        host(&mut h).send(op::RW, PORT + 1, &frame);
        assert_eq!(h.ch.wait_request().unwrap(), (6, 3000));
        assert_eq!(h.ch.request(3000), &pattern(3000)[..]);
    }

    #[test]
    fn host_half_close_still_gets_its_response() {
        let mut h = channel(1024);
        connect(&mut h);
        host(&mut h).send(op::RW, PORT, &request(1, b"x"));
        assert_eq!(h.ch.wait_request().unwrap(), (1, 1));
        host(&mut h).send(op::SHUTDOWN, PORT, &[]);
        let last = host(&mut h).to_guest.len() - 1;
        host(&mut h).to_guest[last].0.flags = 2; // SEND: no more requests
        h.ch.send_response(1, frame::KIND_RESPONSE, b"y").unwrap();
        assert!(matches!(h.ch.wait_request(), Err(ChannelError::Closed)));
        assert_eq!(responses(&mut h)[0].2, b"y");
        assert_eq!(*host(&mut h).ops().last().unwrap(), op::SHUTDOWN);
    }

    #[test]
    fn send_without_connection_and_too_long_responses_fail() {
        let mut h = channel(16);
        assert!(matches!(
            h.ch.send_response(1, frame::KIND_RESPONSE, b"x"),
            Err(ChannelError::Closed)
        ));
        let big = std::vec![0u8; MAX_PAYLOAD + 1];
        assert!(matches!(
            h.ch.send_response(1, frame::KIND_RESPONSE, &big),
            Err(ChannelError::ResponseTooLong(_))
        ));
    }
}
