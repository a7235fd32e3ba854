//! The virtio socket device driver (virtio 1.x, section 5.10): one listening port
//! ([`fnode_guest::abi::vsock::INVOKE_PORT`]), one stream connection at a time, accepted
//! from the host.
//!
//! # Receiving without copies
//! Kernel code may be emulated one instruction at a time: copying 1 MiB costs ~60 ms there.
//! So the receive queue holds **one** chain at a time, and the caller picks where its data
//! goes each time it arms it ([`Vsock::arm_rx`]): either the driver's small inline buffer
//! ([`RX_INLINE`] bytes: control packets, frame headers, small requests) or a *window* in the
//! caller's memory, sized to exactly the bytes the caller expects, so the device writes a
//! large payload where it belongs and nothing past it. One chain in flight costs a
//! notification per packet, which is cheap next to copying.
//!
//! # Sending
//! Transmit chains are `[packet header][copied bytes][caller's bytes]`: small data is copied
//! into the slot (the caller may reuse its memory at once), large data is sent from where it
//! lies and the caller waits for the device to finish with it
//! ([`Vsock::tx_zero_copy_pending`]). A small packet, the usual response, is one descriptor
//! over its slot's header and data, which lie back to back (a virtio 1.x device reads a
//! chain as one byte stream, however it is split); the caller can write its data into the
//! slot directly ([`Vsock::reserve_small`], [`Vsock::commit_small`]), so a response is
//! copied once. Transmit interrupts stay off unless the driver waits
//! for a transmit slot or a zero-copy send; the used ring is polled instead.
//!
//! # Notifications and interrupts
//! Each one is a VM exit, so the driver asks only for those it needs. With
//! `VIRTIO_F_EVENT_IDX` (negotiated when offered) it notifies a queue only when the device
//! asked (`avail_event`): re-arming the receive chain after a request costs no exit unless
//! the device ran out of buffers with data waiting. Receive interrupts are always wanted;
//! transmit interrupts only while the driver waits for a slot or a zero-copy send (otherwise
//! completed chains are reaped when a slot is needed, eight at a time).
//!
//! # Flow control
//! Every packet carries the driver's `buf_alloc` ([`BUF_ALLOC`]: room for a whole frame) and
//! `fwd_cnt` (every byte is handed to the caller as it arrives). Data is sent within the
//! host's advertised credit, in packets of at most [`MAX_PACKET`] bytes; when the credit is
//! exhausted the driver asks for an update (`OP_CREDIT_REQUEST`), once per stall.
//!
//! Everything the device writes is untrusted: used lengths are checked against the buffers
//! posted, chain ids against the chains in flight, packet addresses against the connection.

use core::{
    alloc::Layout,
    ptr::{self, addr_of, addr_of_mut, NonNull},
};

use fnode_guest::abi::{frame, vsock as addr};

use super::{
    dma_addr,
    queue::{Descriptor, QueueError, SplitQueue, DESC_F_NEXT, DESC_F_WRITE},
    Transport,
};

/// Receive queue index.
pub const QUEUE_RX: u16 = 0;
/// Transmit queue index.
pub const QUEUE_TX: u16 = 1;
/// Event queue index.
pub const QUEUE_EVENT: u16 = 2;

pub use fnode_guest::abi::vsock::packet::{op, HDR_LEN};
use fnode_guest::abi::vsock::packet::{
    EVENT_TRANSPORT_RESET, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
/// Bytes of the driver's inline receive buffer: a frame header and a small payload. Data
/// here is copied once more (by `rep movsq`, ~0.5 us per 8 bytes where kernel code is
/// emulated); 1 KiB costs about what one more packet round trip into a window costs.
pub const RX_INLINE: usize = 1024;
/// Bytes a transmit slot holds besides the packet header: data up to this size is copied
/// (and the caller need not wait for the device), larger data is sent where it lies.
pub const TX_INLINE: usize = 1024;
/// Transmit slots: chains the driver can have in flight.
pub const TX_SLOTS: usize = 8;
/// Descriptors per transmit chain: header, copied bytes, caller's bytes.
const TX_CHAIN: u16 = 3;
/// Largest data payload of one packet the driver sends (Linux and Firecracker use 64 KiB).
pub const MAX_PACKET: usize = 64 * 1024;
/// The receive buffer space the driver advertises: one whole frame.
pub const BUF_ALLOC: u32 = (frame::HEADER_LEN + frame::MAX_PAYLOAD) as u32;

/// Offset of `guest_cid` in the configuration space.
#[cfg(target_os = "none")]
const CONFIG_GUEST_CID: usize = 0;

/// The receive chain's head descriptor (the packet header); descriptor 1 is its data.
const RX_HEAD: u16 = 0;

/// A packet header (`struct virtio_vsock_hdr`, little-endian, packed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Data bytes after the header.
    pub len: u32,
    /// Socket type (1: stream).
    pub kind: u16,
    /// One of [`op`].
    pub op: u16,
    /// Operation flags (shutdown flags).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed.
    pub fwd_cnt: u32,
}

/// The wire layout; x86 is little-endian, and `to_le`/`from_le` say so.
#[repr(C, packed)]
#[derive(Clone, Copy, Debug)]
struct RawHeader {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    kind: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

const _: () = assert!(core::mem::size_of::<RawHeader>() == HDR_LEN);

/// The per-packet fields of a header as little-endian words, for the paths that write or
/// check a whole header in a few instructions (kernel code may be emulated one instruction
/// at a time): `src_cid`, `dst_cid` (each a word), `src_port | dst_port << 32`,
/// `len | type << 32 | op << 48`, `flags | buf_alloc << 32`, then `fwd_cnt` (32 bits).
mod word {
    use core::mem::offset_of;

    use super::RawHeader;

    pub const SRC_CID: usize = offset_of!(RawHeader, src_cid);
    pub const DST_CID: usize = offset_of!(RawHeader, dst_cid);
    pub const PORTS: usize = offset_of!(RawHeader, src_port);
    pub const LEN_TYPE_OP: usize = offset_of!(RawHeader, len);
    pub const FLAGS_BUF_ALLOC: usize = offset_of!(RawHeader, flags);
    pub const FWD_CNT: usize = offset_of!(RawHeader, fwd_cnt);

    const _: () = {
        assert!(SRC_CID == 0 && DST_CID == 8);
        assert!(offset_of!(RawHeader, dst_port) == PORTS + 4);
        assert!(offset_of!(RawHeader, kind) == LEN_TYPE_OP + 4);
        assert!(offset_of!(RawHeader, op) == LEN_TYPE_OP + 6);
        assert!(offset_of!(RawHeader, buf_alloc) == FLAGS_BUF_ALLOC + 4);
        assert!(FWD_CNT == FLAGS_BUF_ALLOC + 8);
    };

    /// `src_port | dst_port << 32`.
    pub const fn ports(src: u32, dst: u32) -> u64 {
        src as u64 | (dst as u64) << 32
    }

    /// `type | op << 16`: the upper half of the `LEN_TYPE_OP` word.
    pub const fn type_op(kind: u16, op: u16) -> u64 {
        kind as u64 | (op as u64) << 16
    }
}

impl PacketHeader {
    /// Writes the header at `dst`.
    ///
    /// # Safety
    /// `dst` must be valid for writing [`HDR_LEN`] bytes.
    unsafe fn write_to(&self, dst: *mut u8) {
        let raw = RawHeader {
            src_cid: self.src_cid.to_le(),
            dst_cid: self.dst_cid.to_le(),
            src_port: self.src_port.to_le(),
            dst_port: self.dst_port.to_le(),
            len: self.len.to_le(),
            kind: self.kind.to_le(),
            op: self.op.to_le(),
            flags: self.flags.to_le(),
            buf_alloc: self.buf_alloc.to_le(),
            fwd_cnt: self.fwd_cnt.to_le(),
        };
        // SAFETY: the caller guarantees HDR_LEN writable bytes; the write is unaligned-safe.
        unsafe { ptr::write_unaligned(dst.cast::<RawHeader>(), raw) };
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        // SAFETY: `b` has HDR_LEN bytes.
        unsafe { self.write_to(b.as_mut_ptr()) };
        b
    }

    /// Decodes a header.
    pub fn decode(b: &[u8; HDR_LEN]) -> Self {
        // SAFETY: `b` has HDR_LEN bytes and every bit pattern is a valid RawHeader.
        let raw = unsafe { ptr::read_unaligned(b.as_ptr().cast::<RawHeader>()) };
        Self::from_raw(&raw)
    }

    /// Decodes the wire layout.
    fn from_raw(raw: &RawHeader) -> Self {
        PacketHeader {
            src_cid: u64::from_le(raw.src_cid),
            dst_cid: u64::from_le(raw.dst_cid),
            src_port: u32::from_le(raw.src_port),
            dst_port: u32::from_le(raw.dst_port),
            len: u32::from_le(raw.len),
            kind: u16::from_le(raw.kind),
            op: u16::from_le(raw.op),
            flags: u32::from_le(raw.flags),
            buf_alloc: u32::from_le(raw.buf_alloc),
            fwd_cnt: u32::from_le(raw.fwd_cnt),
        }
    }
}

/// Errors of the driver: the device broke the virtio protocol, or memory ran out. The
/// caller should give up on the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VsockError {
    /// Setting up the transport failed.
    #[error("virtio-vsock device setup failed")]
    Transport(#[source] super::mmio::MmioError),
    /// A queue's used ring is inconsistent.
    #[error("virtio-vsock device broke its queue protocol")]
    Queue(#[source] QueueError),
    /// The device returned a receive chain it was not given.
    #[error("virtio-vsock device returned receive chain {0}, which it was not given")]
    BadRxChain(u32),
    /// The device returned a transmit chain that is not in flight.
    #[error("virtio-vsock device returned transmit chain {0}, which is not in flight")]
    BadTxChain(u32),
    /// A received packet claims more bytes than the device wrote or than fit the buffer.
    #[error("virtio-vsock device wrote a packet of {len} data bytes into a {cap}-byte buffer ({used} bytes used)")]
    RxOverflow {
        /// The header's `len`.
        len: u32,
        /// The data buffer posted.
        cap: u32,
        /// The used length the device reported (header included).
        used: u32,
    },
    /// The heap has no room for the driver's buffers.
    #[error("virtio-vsock: out of memory for the packet buffers")]
    NoMemory,
    /// Sending needs an open connection.
    #[error("virtio-vsock: no connection is open")]
    NotConnected,
}

impl From<QueueError> for VsockError {
    fn from(e: QueueError) -> Self {
        VsockError::Queue(e)
    }
}

/// What [`Vsock::poll`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Nothing new from the device.
    None,
    /// A packet was handled inside the driver (a refused connection, a credit update, ...).
    Control,
    /// The host opened a connection; it is the open one now.
    Connected,
    /// The open connection ended (the host reset or shut it down, or the transport was
    /// reset).
    Closed,
    /// `len` stream bytes arrived: in the inline buffer ([`Vsock::inline_data`]) if
    /// `inline`, else at the start of the window the receive chain was armed with. The
    /// receive chain must be re-armed ([`Vsock::arm_rx`]) to receive more.
    Data {
        /// Bytes received.
        len: u32,
        /// Whether they are in the inline buffer.
        inline: bool,
    },
}

/// The open connection's state.
#[derive(Clone, Copy, Debug)]
struct Conn {
    /// The host's port.
    peer_port: u32,
    /// The host's advertised receive buffer.
    peer_buf_alloc: u32,
    /// Bytes the host has consumed, as it last said.
    peer_fwd_cnt: u32,
    /// Stream bytes sent.
    tx_cnt: u32,
    /// Stream bytes received (all handed on to the caller, so also consumed).
    fwd_cnt: u32,
    /// `fwd_cnt` as last told to the host.
    adv_fwd_cnt: u32,
    /// The `PORTS` word of the guest's packets on the connection.
    tx_ports: u64,
    /// A credit request is outstanding.
    credit_requested: bool,
    /// The host said it will send no more.
    peer_send_done: bool,
}

impl Conn {
    /// Takes the host's credit from a packet header. A change answers an outstanding credit
    /// request (a host may answer with any packet, not only OP_CREDIT_UPDATE), so the next
    /// stall may ask again.
    // The usual case, no request outstanding, tests one flag.
    #[inline(always)]
    fn update_credit(&mut self, buf_alloc: u32, fwd_cnt: u32) {
        if self.credit_requested && (buf_alloc, fwd_cnt) != (self.peer_buf_alloc, self.peer_fwd_cnt)
        {
            self.credit_requested = false;
        }
        self.peer_buf_alloc = buf_alloc;
        self.peer_fwd_cnt = fwd_cnt;
    }

    /// Bytes the host can take now.
    fn credit(&self) -> usize {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight) as usize
    }
}

/// Receive memory: the packet header and the inline data buffer.
#[repr(C, align(64))]
struct RxArea {
    hdr: RawHeader,
    inline: [u8; RX_INLINE],
}

/// One transmit slot: the packet header and copied data.
#[repr(C, align(64))]
struct TxSlot {
    hdr: RawHeader,
    data: [u8; TX_INLINE],
}

// `commit_small` sends a slot's header and data with one descriptor.
const _: () = assert!(core::mem::offset_of!(TxSlot, data) == HDR_LEN);

/// All memory the device reads or writes besides the rings.
#[repr(C)]
struct Buffers {
    rx: RxArea,
    event: [u8; 8],
    tx: [TxSlot; TX_SLOTS],
}

/// A transmit slot held for one small data packet on the open connection
/// ([`Vsock::reserve_small`]): the caller writes the packet's data at [`data`](Self::data),
/// then [`Vsock::commit_small`] sends it. Dropping it instead sends nothing.
#[derive(Debug)]
pub struct SmallPacket {
    slot: usize,
    len: usize,
    data: *mut u8,
}

impl SmallPacket {
    /// Where the packet's data goes: [`len`](Self::len) writable bytes of driver memory
    /// that no device reads before [`Vsock::commit_small`].
    pub fn data(&self) -> *mut u8 {
        self.data
    }

    /// The packet's data length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the packet carries no data (never: `reserve_small` refuses empty packets).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A small packet the device returned into the inline buffer, looked at by
/// [`Vsock::peek_small`]: where its bytes are and what its header said.
#[derive(Clone, Copy, Debug)]
pub struct SmallRx {
    data: *const u8,
    len: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

impl SmallRx {
    /// The packet's data length.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the packet carries no data.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first 24 bytes of the inline buffer as three little-endian words (a caller's
    /// header, read before it takes the packet). Bytes past [`len`](Self::len) are stale,
    /// never outside the buffer: the caller checks the length.
    #[inline(always)]
    pub fn prefix(&self) -> [u64; 3] {
        // SAFETY: the inline buffer holds RX_INLINE >= 24 bytes of driver memory, which the
        // device does not write while the packet is with the driver; unaligned reads.
        unsafe {
            let w = self.data.cast::<u64>();
            [
                w.read_unaligned(),
                w.add(1).read_unaligned(),
                w.add(2).read_unaligned(),
            ]
        }
    }
}

const _: () = assert!(RX_INLINE >= 24);

// `peek_small` finds the inline buffer right after the header.
const _: () = assert!(core::mem::offset_of!(RxArea, inline) == HDR_LEN);

/// The driver.
#[derive(Debug)]
pub struct Vsock<T: Transport> {
    transport: T,
    rx: SplitQueue,
    tx: SplitQueue,
    event: SplitQueue,
    bufs: NonNull<Buffers>,
    guest_cid: u64,
    /// The receive chain is with the device.
    rx_armed: bool,
    /// Where the armed chain's data goes: address and length.
    rx_window: (u64, u32),
    /// While a connection is open and the receive chain is with the device, into the inline
    /// buffer: the `PORTS` word the connection's packets carry (never 0: the destination
    /// port is the listening one). 0 otherwise. [`peek_small`](Self::peek_small) checks all
    /// that with one compare.
    rx_fast: u64,
    /// Transmit slots usable (bit per slot).
    tx_slots: u16,
    /// Free transmit slots.
    tx_free: u16,
    /// Slots whose chain points at caller memory.
    tx_zero_copy: u16,
    /// Transmit interrupts are on.
    tx_interrupts: bool,
    conn: Option<Conn>,
}

impl<T: Transport> Vsock<T> {
    /// Builds the driver on queues the device has accepted and posts the event buffer.
    pub fn new(
        transport: T,
        rx: SplitQueue,
        tx: SplitQueue,
        event: SplitQueue,
        guest_cid: u64,
    ) -> Result<Self, VsockError> {
        let layout = Layout::new::<Buffers>();
        // SAFETY: non-zero size. Never freed: the device holds addresses into it for the
        // kernel's lifetime.
        let raw = unsafe { alloc::alloc::alloc(layout) }.cast::<Buffers>();
        let bufs = NonNull::new(raw).ok_or(VsockError::NoMemory)?;
        let slots = (usize::from(tx.size() / TX_CHAIN)).min(TX_SLOTS);
        let tx_slots = ((1u32 << slots) - 1) as u16;
        let mut v = Vsock {
            transport,
            rx,
            tx,
            event,
            bufs,
            guest_cid,
            rx_armed: false,
            rx_window: (0, 0),
            rx_fast: 0,
            tx_slots,
            tx_free: tx_slots,
            tx_zero_copy: 0,
            tx_interrupts: true,
            conn: None,
        };
        // The fields every packet from the guest shares are written once.
        let fixed = PacketHeader {
            src_cid: guest_cid,
            dst_cid: addr::HOST_CID,
            src_port: addr::INVOKE_PORT,
            kind: TYPE_STREAM,
            buf_alloc: BUF_ALLOC,
            ..PacketHeader::default()
        };
        for slot in 0..slots {
            // SAFETY: the slot's header is HDR_LEN bytes of driver memory no device has yet.
            unsafe { fixed.write_to(addr_of_mut!((*v.slot_ptr(slot)).hdr).cast()) };
        }
        let b = v.bufs.as_ptr();
        // SAFETY: only addresses are taken.
        let (rx_hdr, event_buf) = unsafe { (addr_of!((*b).rx.hdr), addr_of!((*b).event)) };
        v.rx.set_desc(
            0,
            Descriptor {
                addr: dma_addr(rx_hdr),
                len: HDR_LEN as u32,
                flags: DESC_F_WRITE | DESC_F_NEXT,
                next: 1,
            },
        );
        v.event.set_desc(
            0,
            Descriptor {
                addr: dma_addr(event_buf),
                len: 4,
                flags: DESC_F_WRITE,
                next: 0,
            },
        );
        v.event.push(0);
        v.event.interrupt_next();
        if v.event.publish() {
            v.transport.notify(QUEUE_EVENT);
        }
        v.set_tx_interrupts(false);
        Ok(v)
    }

    /// The guest's context id.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Forgets the interrupts that arrived so far ([`Transport::settle`]): call before a
    /// snapshot may be taken, then poll.
    pub fn settle(&mut self) {
        self.transport.settle();
    }

    /// Whether a connection is open.
    pub fn is_open(&self) -> bool {
        self.conn.is_some()
    }

    /// Whether the host said it will send no more on the open connection.
    pub fn peer_done_sending(&self) -> bool {
        self.conn.is_some_and(|c| c.peer_send_done)
    }

    /// Whether every transmit slot is back from the device (for tests).
    #[cfg(test)]
    pub(crate) fn tx_all_free(&self) -> bool {
        self.tx_free == self.tx_slots
    }

    /// The transport (for tests that play the device).
    #[cfg(test)]
    pub(crate) fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Hands the receive chain to the device if it is not already there: its data goes to
    /// the inline buffer (`None`) or to `window` (address, length) in the caller's memory,
    /// which must stay valid and unused until the chain comes back. Notifies the device only
    /// if it asked (with `VIRTIO_F_EVENT_IDX`, only when it ran out of buffers with data
    /// waiting).
    #[inline]
    pub fn arm_rx(&mut self, window: Option<(u64, u32)>) {
        if self.rx_armed {
            return;
        }
        let (addr, len) = match window {
            Some(w) => w,
            None => (self.inline_addr(), RX_INLINE as u32),
        };
        // The device only reads descriptors: the data descriptor is rewritten only when the
        // window changes (it is the inline buffer for nearly every packet).
        if self.rx_window != (addr, len) {
            self.rx_window = (addr, len);
            self.rx.set_desc(
                1,
                Descriptor {
                    addr,
                    len,
                    flags: DESC_F_WRITE,
                    next: 0,
                },
            );
        }
        self.rx.push(RX_HEAD);
        self.rx.interrupt_next();
        self.rx_armed = true;
        self.rx_fast = match (window, &self.conn) {
            (None, Some(c)) => word::ports(c.peer_port, addr::INVOKE_PORT),
            _ => 0,
        };
        if self.rx.publish() {
            self.transport.notify(QUEUE_RX);
        }
    }

    /// The bytes of the last [`Event::Data`] with `inline` set.
    #[inline]
    pub fn inline_data(&self, len: u32) -> &[u8] {
        let len = (len as usize).min(RX_INLINE);
        // SAFETY: the inline buffer is RX_INLINE bytes of driver memory; the device does not
        // write it while the receive chain is not armed, which is the case after a Data event
        // until the caller re-arms it (which needs `&mut self`, ending this borrow).
        unsafe {
            core::slice::from_raw_parts(addr_of!((*self.bufs.as_ptr()).rx.inline).cast::<u8>(), len)
        }
    }

    /// Blocks until the device interrupts. Transmit interrupts are turned on first if the
    /// driver is waiting for a transmit slot or a zero-copy send, off otherwise.
    #[inline]
    pub fn wait(&mut self) -> Result<(), VsockError> {
        let need_tx = self.tx_free == 0 || self.tx_zero_copy != 0;
        if need_tx || self.tx_interrupts {
            // With event indices "on" holds for one chain: renew it before every wait.
            self.set_tx_interrupts(need_tx);
            if need_tx && self.reap_tx()? {
                // Completions arrived before the interrupts were on: no interrupt will come.
                return Ok(());
            }
        }
        self.transport.wait();
        Ok(())
    }

    fn set_tx_interrupts(&mut self, on: bool) {
        self.tx.set_interrupts(on);
        self.tx_interrupts = on;
    }

    /// Processes at most one received packet (and the event queue). Transmit completions
    /// are reaped when a slot is needed, not here.
    // Always inlined: the usual packet is settled in a few instructions, and the caller then
    // matches the event without it going through memory.
    #[inline(always)]
    pub fn poll(&mut self) -> Result<Event, VsockError> {
        if self.event.has_used() {
            return self.poll_event_queue();
        }
        if !self.rx_armed {
            return Ok(Event::None);
        }
        let Some(used) = self.rx.pop_used()? else {
            return Ok(Event::None);
        };
        if used.id != u32::from(RX_HEAD) {
            return Err(VsockError::BadRxChain(used.id));
        }
        self.rx_armed = false;
        self.rx_fast = 0;
        if (used.len as usize) < HDR_LEN {
            // Not even a header: nothing to act on.
            return Ok(Event::Control);
        }
        let h = self.rx_hdr_ptr();
        let b = h.cast::<u8>();
        // SAFETY: the header buffer is driver memory the device no longer writes (the chain
        // came back); the words lie inside it (`word`'s offsets are checked), each is read
        // once. x86 is little-endian, as the wire is.
        let (src_cid, dst_cid, ports, len_type_op) = unsafe {
            (
                b.add(word::SRC_CID).cast::<u64>().read_unaligned(),
                b.add(word::DST_CID).cast::<u64>().read_unaligned(),
                b.add(word::PORTS).cast::<u64>().read_unaligned(),
                b.add(word::LEN_TYPE_OP).cast::<u64>().read_unaligned(),
            )
        };
        let len = len_type_op as u32;
        if (len_type_op >> 48) as u16 == op::RW {
            let cap = self.rx_window.1;
            if len > cap || len > used.len - HDR_LEN as u32 {
                return Err(VsockError::RxOverflow {
                    len,
                    cap,
                    used: used.len,
                });
            }
            // The usual packet, data on the open connection, is settled here in a few
            // instructions; everything else goes through `handle_packet`.
            let guest_cid = self.guest_cid;
            if let Some(c) = self.conn.as_mut().filter(|c| {
                len != 0
                    && len_type_op >> 32 == word::type_op(TYPE_STREAM, op::RW)
                    && ports == word::ports(c.peer_port, addr::INVOKE_PORT)
                    && src_cid == addr::HOST_CID
                    && dst_cid == guest_cid
            }) {
                // SAFETY: as above.
                let (flags_buf_alloc, fwd_cnt) = unsafe {
                    (
                        b.add(word::FLAGS_BUF_ALLOC).cast::<u64>().read_unaligned(),
                        b.add(word::FWD_CNT).cast::<u32>().read_unaligned(),
                    )
                };
                c.update_credit((flags_buf_alloc >> 32) as u32, fwd_cnt);
                c.fwd_cnt = c.fwd_cnt.wrapping_add(len);
                let inline = self.rx_window.0 == self.inline_addr();
                return Ok(Event::Data { len, inline });
            }
        }
        // SAFETY: as above; one unaligned read takes a private copy.
        let hdr = PacketHeader::from_raw(&unsafe { ptr::read_unaligned(h) });
        self.handle_packet(&hdr)
    }

    /// The usual received packet, looked at without taking it: stream data on the open
    /// connection that the device wrote into the inline buffer, checked as [`poll`](Self::poll)
    /// checks it (but for its length, which may be 0: the caller checks it against what it
    /// expects). `None` for anything else, nothing changed (`poll` then handles it the long
    /// way). [`take_small`](Self::take_small) takes it. Every header word the driver needs
    /// is read here, once.
    // Always inlined: with `take_small`, the whole receive path of a small request.
    #[inline(always)]
    pub fn peek_small(&self) -> Option<SmallRx> {
        // Non-zero only while a connection is open and the receive chain is with the device,
        // into the inline buffer: one compare stands for those three tests.
        let ports_expected = self.rx_fast;
        if self.event.has_used() {
            return None;
        }
        let used = self.rx.peek_single()?;
        let b = self.rx_hdr_ptr().cast::<u8>();
        // SAFETY: the header buffer is driver memory the device no longer writes (the chain
        // came back: `peek_single`'s acquire load orders these reads after its writes); the
        // words lie inside it (`word`'s offsets are checked).
        let (src_cid, dst_cid, ports, len_type_op, flags_buf_alloc, fwd_cnt) = unsafe {
            (
                b.add(word::SRC_CID).cast::<u64>().read_unaligned(),
                b.add(word::DST_CID).cast::<u64>().read_unaligned(),
                b.add(word::PORTS).cast::<u64>().read_unaligned(),
                b.add(word::LEN_TYPE_OP).cast::<u64>().read_unaligned(),
                b.add(word::FLAGS_BUF_ALLOC).cast::<u64>().read_unaligned(),
                b.add(word::FWD_CNT).cast::<u32>().read_unaligned(),
            )
        };
        let len = len_type_op as u32;
        if ports != ports_expected
            || used.id != u32::from(RX_HEAD)
            || len as usize > RX_INLINE
            || len + HDR_LEN as u32 > used.len
            || len_type_op >> 32 != word::type_op(TYPE_STREAM, op::RW)
            || src_cid != addr::HOST_CID
            || dst_cid != self.guest_cid
        {
            return None;
        }
        Some(SmallRx {
            // SAFETY: the inline buffer follows the header in `RxArea` (checked below `RxArea`);
            // only the address is computed.
            data: unsafe { b.add(HDR_LEN) },
            len,
            buf_alloc: (flags_buf_alloc >> 32) as u32,
            fwd_cnt,
        })
    }

    /// Takes the packet [`peek_small`](Self::peek_small) returned (counts its bytes, takes
    /// the host's credit), calls `read` with its bytes, and hands the receive chain straight
    /// back to the device, into the inline buffer again, once `read` returned.
    #[inline(always)]
    pub fn take_small<R>(&mut self, p: SmallRx, read: impl FnOnce(&[u8]) -> R) -> R {
        if let Some(c) = self.conn.as_mut() {
            c.update_credit(p.buf_alloc, p.fwd_cnt);
            c.fwd_cnt = c.fwd_cnt.wrapping_add(p.len);
        }
        // SAFETY: `p.len <= RX_INLINE` bytes of the inline buffer (`peek_small` checked),
        // which the device does not write until the chain is handed back below.
        let r = read(unsafe { core::slice::from_raw_parts(p.data, p.len as usize) });
        // The queue's fields are read after `read` (few values live across it: no registers
        // to save).
        if self.rx.repost_begin(RX_HEAD).publish() {
            self.transport.notify(QUEUE_RX);
        }
        r
    }

    /// Waits for the device (as [`wait`](Self::wait)) if nothing but a packet can end the
    /// wait: a connection is open, the receive chain is with the device and has not come
    /// back, the event queue is quiet, the host still sends, the host's credit needs no
    /// update and no transmit interrupt is wanted. Returns false, without waiting, otherwise
    /// (the caller then takes the long way).
    #[inline(always)]
    pub fn wait_quietly(&mut self) -> bool {
        if !self.idle() || !self.rings_quiet() {
            return false;
        }
        self.transport.wait();
        true
    }

    /// [`wait_quietly`](Self::wait_quietly)'s conditions but the rings': a connection is
    /// open, the receive chain is with the device, the host still sends, its credit needs no
    /// update and no transmit interrupt is wanted. Only the driver changes these.
    #[inline(always)]
    pub fn idle(&self) -> bool {
        let Some(c) = &self.conn else { return false };
        !(c.peer_send_done
            || c.fwd_cnt.wrapping_sub(c.adv_fwd_cnt) >= BUF_ALLOC / 2
            || !self.rx_armed
            || self.tx_free == 0
            || self.tx_zero_copy != 0
            || self.tx_interrupts)
    }

    /// Whether the device returned nothing on the receive and event queues.
    #[inline(always)]
    pub fn rings_quiet(&self) -> bool {
        !self.rx.has_used() && !self.event.has_used()
    }

    /// Blocks until the device interrupts ([`Transport::wait`]), for a caller that found the
    /// driver [`idle`](Self::idle) and the rings quiet.
    #[inline(always)]
    pub fn wait_idle(&mut self) {
        self.transport.wait();
    }

    /// Acts on one received packet header (out of line: `poll` settles the usual packet).
    #[inline(never)]
    fn handle_packet(&mut self, hdr: &PacketHeader) -> Result<Event, VsockError> {
        if hdr.src_cid != addr::HOST_CID || hdr.dst_cid != self.guest_cid {
            // Only the host talks to this device; anything else is noise.
            return Ok(Event::Control);
        }
        if hdr.kind != TYPE_STREAM || hdr.dst_port != addr::INVOKE_PORT {
            if hdr.op != op::RST {
                self.send_control(op::RST, hdr.dst_port, hdr.src_port, 0)?;
            }
            return Ok(Event::Control);
        }
        let conn = match &mut self.conn {
            Some(c) if c.peer_port == hdr.src_port => c,
            Some(_) | None => return self.handle_stranger(hdr),
        };
        conn.update_credit(hdr.buf_alloc, hdr.fwd_cnt);
        match hdr.op {
            op::RW => {
                conn.fwd_cnt = conn.fwd_cnt.wrapping_add(hdr.len);
                if hdr.len == 0 {
                    return Ok(Event::Control);
                }
                let inline = self.rx_window.0 == self.inline_addr();
                Ok(Event::Data {
                    len: hdr.len,
                    inline,
                })
            }
            op::CREDIT_UPDATE => Ok(Event::Control),
            op::CREDIT_REQUEST => {
                self.send_control(op::CREDIT_UPDATE, addr::INVOKE_PORT, hdr.src_port, 0)?;
                Ok(Event::Control)
            }
            op::SHUTDOWN if hdr.flags & SHUTDOWN_RCV == 0 => {
                // The host only stops sending: it may still read the response.
                conn.peer_send_done |= hdr.flags & SHUTDOWN_SEND != 0;
                Ok(Event::Control)
            }
            op::SHUTDOWN => {
                // The host will not read any more: the connection is over. (The RST still
                // carries the connection's counters: the host checks them.)
                self.send_control(op::RST, addr::INVOKE_PORT, hdr.src_port, 0)?;
                self.conn = None;
                Ok(Event::Closed)
            }
            op::RST => {
                self.conn = None;
                Ok(Event::Closed)
            }
            // REQUEST on the open connection, RESPONSE (the guest never connects), unknown.
            _ => {
                self.send_control(op::RST, addr::INVOKE_PORT, hdr.src_port, 0)?;
                self.conn = None;
                Ok(Event::Closed)
            }
        }
    }

    /// A packet for the listening port from a host port without an open connection.
    fn handle_stranger(&mut self, hdr: &PacketHeader) -> Result<Event, VsockError> {
        match hdr.op {
            op::REQUEST if self.conn.is_none() => {
                self.conn = Some(Conn {
                    peer_port: hdr.src_port,
                    peer_buf_alloc: hdr.buf_alloc,
                    peer_fwd_cnt: hdr.fwd_cnt,
                    tx_cnt: 0,
                    fwd_cnt: 0,
                    adv_fwd_cnt: 0,
                    tx_ports: word::ports(addr::INVOKE_PORT, hdr.src_port),
                    credit_requested: false,
                    peer_send_done: false,
                });
                self.send_control(op::RESPONSE, addr::INVOKE_PORT, hdr.src_port, 0)?;
                Ok(Event::Connected)
            }
            op::RST => Ok(Event::Control),
            // A second connection while one is open (one at a time), or data for a
            // connection that does not exist.
            _ => {
                self.send_control(op::RST, addr::INVOKE_PORT, hdr.src_port, 0)?;
                Ok(Event::Control)
            }
        }
    }

    fn rx_hdr_ptr(&self) -> *const RawHeader {
        // SAFETY: only the address is taken.
        unsafe { addr_of!((*self.bufs.as_ptr()).rx.hdr) }
    }

    #[inline]
    fn inline_addr(&self) -> u64 {
        // SAFETY: only the address is taken.
        dma_addr(unsafe { addr_of!((*self.bufs.as_ptr()).rx.inline) })
    }

    /// Handles a used event buffer.
    fn poll_event_queue(&mut self) -> Result<Event, VsockError> {
        let Some(used) = self.event.pop_used()? else {
            return Ok(Event::Control);
        };
        if used.id != 0 {
            return Err(VsockError::BadRxChain(used.id));
        }
        // SAFETY: the event buffer is driver memory the device no longer writes.
        let id = u32::from_le(unsafe {
            ptr::read_volatile(addr_of!((*self.bufs.as_ptr()).event).cast::<u32>())
        });
        self.event.push(0);
        self.event.interrupt_next();
        if self.event.publish() {
            self.transport.notify(QUEUE_EVENT);
        }
        if used.len >= 4 && id == EVENT_TRANSPORT_RESET && self.conn.take().is_some() {
            self.rx_fast = 0;
            return Ok(Event::Closed);
        }
        Ok(Event::Control)
    }

    /// Frees the slots of completed transmit chains. Returns whether any completed.
    fn reap_tx(&mut self) -> Result<bool, VsockError> {
        let mut any = false;
        while let Some(used) = self.tx.pop_used()? {
            let slot = used.id / u32::from(TX_CHAIN);
            let bit = 1u16.checked_shl(slot).unwrap_or(0);
            if used.id % u32::from(TX_CHAIN) != 0 || bit & self.tx_slots & !self.tx_free == 0 {
                return Err(VsockError::BadTxChain(used.id));
            }
            self.tx_free |= bit;
            self.tx_zero_copy &= !bit;
            any = true;
        }
        Ok(any)
    }

    /// Waits (halting the CPU) until the device has returned every transmit chain, then
    /// turns transmit interrupts off. Before READY: a snapshot taken there has every slot
    /// free, so a restored guest's first send takes the first slot, which lies in the page
    /// of the rings the host has already written by then (one copied page less per restore
    /// and per reset than a send into the next slot's page).
    pub fn complete_tx(&mut self) -> Result<(), VsockError> {
        loop {
            self.reap_tx()?;
            if self.tx_free == self.tx_slots {
                break;
            }
            self.set_tx_interrupts(true);
            // Completions that arrived before the interrupts were on raise none.
            if !self.reap_tx()? {
                self.transport.wait();
            }
        }
        if self.tx_interrupts {
            self.set_tx_interrupts(false);
        }
        Ok(())
    }

    /// Whether data sent from the caller's memory is still with the device.
    #[inline]
    pub fn tx_zero_copy_pending(&mut self) -> Result<bool, VsockError> {
        if self.tx_zero_copy != 0 {
            self.reap_tx()?;
        }
        Ok(self.tx_zero_copy != 0)
    }

    /// A free transmit slot, if any (reaping completions only when none is free: each
    /// reaped chain costs instructions, so they are reaped in batches).
    #[inline]
    fn free_slot(&mut self) -> Result<Option<usize>, VsockError> {
        if self.tx_free == 0 {
            self.reap_tx()?;
            if self.tx_free == 0 {
                return Ok(None);
            }
        }
        Ok(Some(self.tx_free.trailing_zeros() as usize))
    }

    /// A free transmit slot, waiting for the device to complete one if need be.
    fn slot_blocking(&mut self) -> Result<usize, VsockError> {
        loop {
            if let Some(slot) = self.free_slot()? {
                return Ok(slot);
            }
            self.wait()?;
        }
    }

    #[inline]
    fn slot_ptr(&self, slot: usize) -> *mut TxSlot {
        // SAFETY: `slot < TX_SLOTS` (slots come from the free mask); only the address is taken.
        unsafe { addr_of_mut!((*self.bufs.as_ptr()).tx[slot]) }
    }

    /// Fills the per-packet fields of slot `slot`'s header (the others were written once).
    #[inline]
    fn stamp(&mut self, slot: usize, op: u16, src_port: u32, dst_port: u32, len: u32, flags: u32) {
        // Only the connection's own packets carry its counter (a host checks it against what
        // it sent on that connection).
        let fwd_cnt = match &mut self.conn {
            Some(c) if c.peer_port == dst_port => {
                c.adv_fwd_cnt = c.fwd_cnt;
                c.fwd_cnt
            }
            _ => 0,
        };
        let h = self.slot_ptr(slot);
        // SAFETY: the slot is free (not with the device); the fields are inside its header.
        unsafe {
            addr_of_mut!((*h).hdr.src_port).write_unaligned(src_port.to_le());
            addr_of_mut!((*h).hdr.dst_port).write_unaligned(dst_port.to_le());
            addr_of_mut!((*h).hdr.len).write_unaligned(len.to_le());
            addr_of_mut!((*h).hdr.op).write_unaligned(op.to_le());
            addr_of_mut!((*h).hdr.flags).write_unaligned(flags.to_le());
            addr_of_mut!((*h).hdr.fwd_cnt).write_unaligned(fwd_cnt.to_le());
        }
    }

    /// Sends a packet without data and notifies the device.
    fn send_control(
        &mut self,
        op: u16,
        src_port: u32,
        dst_port: u32,
        flags: u32,
    ) -> Result<(), VsockError> {
        if self.tx_free == 0 && self.tx.publish() {
            // Chains queued but not yet published must reach the device before waiting on
            // one of their slots.
            self.transport.notify(QUEUE_TX);
        }
        let slot = self.slot_blocking()?;
        self.stamp(slot, op, src_port, dst_port, 0, flags);
        let h = self.slot_ptr(slot);
        let head = slot as u16 * TX_CHAIN;
        // SAFETY: only the address is taken.
        let hdr_addr = dma_addr(unsafe { addr_of!((*h).hdr) });
        self.tx.set_desc(
            head,
            Descriptor {
                addr: hdr_addr,
                len: HDR_LEN as u32,
                flags: 0,
                next: 0,
            },
        );
        self.queue_tx(slot, false);
        if self.tx.publish() {
            self.transport.notify(QUEUE_TX);
        }
        Ok(())
    }

    #[inline]
    fn queue_tx(&mut self, slot: usize, zero_copy: bool) {
        let bit = 1u16 << slot;
        self.tx_free &= !bit;
        if zero_copy {
            self.tx_zero_copy |= bit;
        }
        self.tx.push(slot as u16 * TX_CHAIN);
    }

    /// Sends the open connection's stream bytes `[offset, ..)` of `head ++ body`, as many as
    /// the host's credit and the free slots allow, and notifies the device once. `head` (at
    /// most [`TX_INLINE`] bytes) is copied; `body` is copied when a packet's share of it fits
    /// the slot, else the device reads it where it lies and the caller must keep it unchanged
    /// until [`tx_zero_copy_pending`](Self::tx_zero_copy_pending) is false. Returns the new
    /// offset; less than the total means "wait and call again".
    pub fn send(
        &mut self,
        head: &[u8],
        body: &[u8],
        mut offset: usize,
    ) -> Result<usize, VsockError> {
        let Some(peer_port) = self.conn.map(|c| c.peer_port) else {
            return Err(VsockError::NotConnected);
        };
        let head = &head[..head.len().min(TX_INLINE)];
        let total = head.len() + body.len();
        if offset == 0 && total <= TX_INLINE && self.send_small(head, body)? {
            return Ok(total);
        }
        let mut queued = false;
        while offset < total {
            let credit = self.conn.map_or(0, |c| c.credit());
            if credit == 0 {
                if let Some(c) = self.conn.as_mut().filter(|c| !c.credit_requested) {
                    c.credit_requested = true;
                    // Publishes the data queued so far too (it must not wait on a slot held
                    // by unpublished data).
                    self.send_control(op::CREDIT_REQUEST, addr::INVOKE_PORT, peer_port, 0)?;
                    queued = false;
                }
                break;
            }
            let Some(slot) = self.free_slot()? else {
                break;
            };
            let n = (total - offset).min(credit).min(MAX_PACKET);
            let slot_ptr = self.slot_ptr(slot);
            // SAFETY: only the address is taken.
            let data = unsafe { addr_of_mut!((*slot_ptr).data) }.cast::<u8>();
            // Copied part: the head's share, then the body's share if it fits.
            let mut copied = 0;
            if offset < head.len() {
                copied = (head.len() - offset).min(n);
                // SAFETY: `copied <= TX_INLINE` bytes into the free slot, from inside `head`.
                unsafe { super::copy_bytes(data, head.as_ptr().add(offset), copied) };
            }
            let body_start = (offset + copied).saturating_sub(head.len());
            let mut body_len = n - copied;
            if body_len > 0 && copied + body_len <= TX_INLINE {
                // SAFETY: the share fits the slot's data buffer after the copied head bytes;
                // `body_start + body_len <= body.len()` since `offset + n <= total`.
                unsafe {
                    super::copy_bytes(data.add(copied), body.as_ptr().add(body_start), body_len)
                };
                copied += body_len;
                body_len = 0;
            }
            self.stamp(slot, op::RW, addr::INVOKE_PORT, peer_port, n as u32, 0);
            let first = slot as u16 * TX_CHAIN;
            // SAFETY: only the address is taken.
            let hdr_addr = dma_addr(unsafe { addr_of!((*slot_ptr).hdr) });
            let mut d = first;
            let mut desc = Descriptor {
                addr: hdr_addr,
                len: HDR_LEN as u32,
                flags: DESC_F_NEXT,
                next: d + 1,
            };
            if copied > 0 {
                self.tx.set_desc(d, desc);
                d += 1;
                desc = Descriptor {
                    addr: dma_addr(data),
                    len: copied as u32,
                    flags: DESC_F_NEXT,
                    next: d + 1,
                };
            }
            if body_len > 0 {
                self.tx.set_desc(d, desc);
                d += 1;
                // SAFETY: in bounds, as above; only the address is taken.
                let at = unsafe { body.as_ptr().add(body_start) };
                desc = Descriptor {
                    addr: dma_addr(at),
                    len: body_len as u32,
                    flags: 0,
                    next: 0,
                };
            }
            desc.flags = 0;
            desc.next = 0;
            self.tx.set_desc(d, desc);
            self.queue_tx(slot, body_len > 0);
            if let Some(c) = self.conn.as_mut() {
                c.tx_cnt = c.tx_cnt.wrapping_add(n as u32);
            }
            offset += n;
            queued = true;
        }
        if queued && self.tx.publish() {
            self.transport.notify(QUEUE_TX);
        }
        Ok(offset)
    }

    /// The usual small response: all of `head ++ body` (at most [`TX_INLINE`] bytes, not
    /// empty) copied into one slot and sent as one packet, in a straight line; the caller may
    /// reuse its memory at once. Returns false, sending nothing, when the sizes, the credit
    /// or the free slots do not allow it now ([`send`](Self::send) handles every case).
    // Always inlined: it is the whole send path of a small response.
    #[inline(always)]
    pub fn send_small(&mut self, head: &[u8], body: &[u8]) -> Result<bool, VsockError> {
        if self.conn.is_none() {
            return Err(VsockError::NotConnected);
        }
        let Some(p) = self.reserve_small(head.len() + body.len())? else {
            return Ok(false);
        };
        // SAFETY: `head.len() + body.len() == p.len()` bytes into the reserved slot's data
        // buffer, from the caller's slices (driver memory does not overlap them).
        unsafe {
            super::copy_bytes(p.data(), head.as_ptr(), head.len());
            super::copy_bytes(p.data().add(head.len()), body.as_ptr(), body.len());
        }
        self.commit_small(p);
        Ok(true)
    }

    /// Holds a transmit slot for a data packet of `n` bytes on the open connection, if one
    /// can go now: `n` is 1 to [`TX_INLINE`], within the host's credit, and a slot is free.
    /// `None` otherwise (nothing changed; [`send`](Self::send) handles every case).
    // Always inlined: with `commit_small`, the whole send path of a small response.
    #[inline(always)]
    pub fn reserve_small(&mut self, n: usize) -> Result<Option<SmallPacket>, VsockError> {
        let Some(conn) = &self.conn else {
            return Ok(None);
        };
        if n == 0 || n > TX_INLINE || conn.credit() < n {
            return Ok(None);
        }
        if self.tx_free == 0 && !self.reap_tx()? {
            return Ok(None);
        }
        let slot = self.tx_free.trailing_zeros() as usize;
        // SAFETY: only the address is taken.
        let data = unsafe { addr_of_mut!((*self.slot_ptr(slot)).data) }.cast::<u8>();
        Ok(Some(SmallPacket { slot, len: n, data }))
    }

    /// The usual small data packet on the open connection, in one straight line: if `n`
    /// bytes (1 to [`TX_INLINE`]) can go now (within the host's credit, a slot free without
    /// reaping), calls `write` with the slot's `n` data bytes to fill, and sends them as one
    /// packet. Returns false, nothing done, otherwise (the caller then takes the long way,
    /// which reaps).
    #[inline(always)]
    pub fn try_send_small_with(&mut self, n: usize, write: impl FnOnce(*mut u8)) -> bool {
        let free = self.tx_free;
        let Some(c) = &self.conn else {
            return false;
        };
        if n == 0 || n > TX_INLINE || c.credit() < n || free == 0 {
            return false;
        }
        // `free` is a non-empty subset of the usable slots: `slot < TX_SLOTS`.
        let slot = free.trailing_zeros() as usize;
        // SAFETY: `slot < TX_SLOTS`: inside the slot array; only the address is computed.
        let data = unsafe {
            addr_of_mut!((*self.bufs.as_ptr()).tx)
                .cast::<TxSlot>()
                .add(slot)
                .cast::<u8>()
                .add(HDR_LEN)
        };
        write(data);
        self.commit_small(SmallPacket { slot, len: n, data });
        true
    }

    /// Sends the packet `p` holds (its data written by the caller): one descriptor over the
    /// slot's header and data, which lie back to back; the device reads a chain as one byte
    /// stream (virtio 1.x devices make no assumption about how it is split). The header's
    /// per-packet fields are written as four words.
    #[inline(always)]
    pub fn commit_small(&mut self, p: SmallPacket) {
        let Some(c) = self.conn.as_mut() else {
            // `reserve_small` found the connection open and nothing closed it since (that
            // needs `&mut self`); never taken.
            return;
        };
        let n = p.len as u32;
        let fwd_cnt = c.fwd_cnt;
        c.adv_fwd_cnt = fwd_cnt;
        c.tx_cnt = c.tx_cnt.wrapping_add(n);
        let ports = c.tx_ports;
        // SAFETY: `p.data` is the slot's data, which follows its header (`TxSlot`'s layout is
        // checked): the header's address is computed.
        let h = unsafe { p.data.sub(HDR_LEN) };
        // SAFETY: the slot is free (not with the device): its header is driver memory, and
        // the words lie inside it (`word`'s offsets are checked against `RawHeader`). x86
        // is little-endian, as the wire is.
        unsafe {
            h.add(word::PORTS).cast::<u64>().write_unaligned(ports);
            h.add(word::LEN_TYPE_OP)
                .cast::<u64>()
                .write_unaligned(u64::from(n) | word::type_op(TYPE_STREAM, op::RW) << 32);
            h.add(word::FLAGS_BUF_ALLOC)
                .cast::<u64>()
                .write_unaligned(u64::from(BUF_ALLOC) << 32);
            h.add(word::FWD_CNT).cast::<u32>().write_unaligned(fwd_cnt);
        }
        self.tx_free &= !(1u16 << p.slot);
        let desc = Descriptor {
            addr: dma_addr(h),
            len: HDR_LEN as u32 + n,
            flags: 0,
            next: 0,
        };
        if self.tx.push_desc_publish(p.slot as u16 * TX_CHAIN, desc) {
            self.transport.notify(QUEUE_TX);
        }
    }

    /// Tells the host how much it may send if it may be running short: when the bytes
    /// received since the last advertisement reach half of [`BUF_ALLOC`]. Call before
    /// waiting for data.
    pub fn update_credit_if_low(&mut self) -> Result<(), VsockError> {
        let Some(c) = self.conn else { return Ok(()) };
        if c.fwd_cnt.wrapping_sub(c.adv_fwd_cnt) >= BUF_ALLOC / 2 {
            self.send_control(op::CREDIT_UPDATE, addr::INVOKE_PORT, c.peer_port, 0)?;
        }
        Ok(())
    }

    /// Ends the open connection from the guest's side: a full shutdown, after which the host
    /// closes its end (data already queued is delivered first). Further packets from the
    /// old connection are refused.
    pub fn close(&mut self) -> Result<(), VsockError> {
        if let Some(c) = self.conn {
            // Sent while the connection is still known: the header carries its counters.
            self.send_control(
                op::SHUTDOWN,
                addr::INVOKE_PORT,
                c.peer_port,
                SHUTDOWN_RCV | SHUTDOWN_SEND,
            )?;
            self.conn = None;
            self.rx_fast = 0;
        }
        Ok(())
    }
}

/// Brings up a virtio socket device behind `transport` (virtio 1.x, section 3.1.1):
/// negotiates `VIRTIO_F_VERSION_1` (needed) and `VIRTIO_F_EVENT_IDX` (if offered: it spares
/// notifications), reads the guest CID, sets up the three queues, says DRIVER_OK.
#[cfg(target_os = "none")]
pub fn init(
    transport: super::mmio::MmioTransport,
) -> Result<Vsock<super::mmio::MmioTransport>, VsockError> {
    use super::{
        mmio::{F_EVENT_IDX, F_VERSION_1},
        queue::MAX_SIZE,
    };

    let features = transport
        .negotiate(F_VERSION_1, F_EVENT_IDX)
        .map_err(VsockError::Transport)?;
    let event_idx = features & F_EVENT_IDX != 0;
    let guest_cid = transport.config_u64(CONFIG_GUEST_CID);
    let setup = |index, want, need| {
        let mut q = transport.setup_queue(index, want, need).map_err(|e| {
            transport.fail();
            VsockError::Transport(e)
        })?;
        q.set_event_idx(event_idx);
        Ok::<_, VsockError>(q)
    };
    let rx = setup(QUEUE_RX, 2, 2)?;
    let tx = setup(QUEUE_TX, MAX_SIZE, 2 * TX_CHAIN)?;
    let event = setup(QUEUE_EVENT, 1, 1)?;
    let v = Vsock::new(transport, rx, tx, event, guest_cid)?;
    v.transport.driver_ok();
    Ok(v)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::{collections::VecDeque, vec::Vec};

    use super::*;
    use crate::virtio::queue::{read_guest, write_guest, DeviceView};

    /// A simulated host: the device side of the three queues, driven by `wait`/`notify`.
    #[derive(Debug, Default)]
    pub(crate) struct FakeHost {
        pub rx: Option<DeviceView>,
        pub tx: Option<DeviceView>,
        pub event: Option<DeviceView>,
        /// Packets waiting for a receive buffer: header and data.
        pub to_guest: VecDeque<(PacketHeader, Vec<u8>)>,
        /// Packets the guest sent: header and data.
        pub from_guest: Vec<(PacketHeader, Vec<u8>)>,
        pub notifies: [u32; 3],
        pub waits: u32,
        /// Largest data the host puts in one packet.
        pub max_rx_packet: usize,
        /// Packets in `from_guest` already looked at for credit requests.
        pub answered: usize,
        /// The driver notified the transmit queue since it was last drained.
        pub tx_kicked: bool,
        /// The device ran out of receive buffers and waits for a notification.
        pub rx_stalled: bool,
        /// Stream bytes delivered to the guest per host port.
        pub delivered: std::collections::HashMap<u32, usize>,
        /// The last fwd_cnt the guest sent per host port.
        pub fwd_seen: std::collections::HashMap<u32, u32>,
        /// Calls of `Transport::settle`.
        pub settles: u32,
        /// Descriptors in each transmit chain the guest sent, in order.
        pub tx_descriptors: Vec<usize>,
    }

    impl FakeHost {
        /// Moves packets both ways until nothing moves.
        pub fn run(&mut self) {
            loop {
                let mut moved = false;
                let tx = self.tx.as_mut().unwrap();
                // The transmit queue is processed only when notified (as a real device does).
                while self.tx_kicked {
                    let Some(head) = tx.pop_avail() else {
                        // Drained: ask for the next notification, then check once more.
                        tx.set_avail_event(tx.next_avail());
                        self.tx_kicked = tx.has_avail();
                        continue;
                    };
                    // The chain is one byte stream, however it is split (virtio 1.x).
                    let chain = tx.chain(head);
                    self.tx_descriptors.push(chain.len());
                    let mut bytes = Vec::new();
                    for d in &chain {
                        bytes.extend(read_guest(d.addr, d.len));
                    }
                    assert!(bytes.len() >= HDR_LEN, "a chain without a whole header");
                    let data = bytes.split_off(HDR_LEN);
                    let hdr = PacketHeader::decode(bytes[..].try_into().unwrap());
                    assert_eq!(data.len(), hdr.len as usize, "header len matches the chain");
                    // Like fnode-vmm: fwd_cnt only acknowledges bytes sent on that connection.
                    let sent = self.delivered.get(&hdr.dst_port).copied().unwrap_or(0);
                    assert!(
                        hdr.fwd_cnt as usize <= sent,
                        "fwd_cnt {} beyond the {sent} bytes sent to port {}: {hdr:?}",
                        hdr.fwd_cnt,
                        hdr.dst_port
                    );
                    let last = self.fwd_seen.insert(hdr.dst_port, hdr.fwd_cnt).unwrap_or(0);
                    assert!(
                        hdr.fwd_cnt >= last,
                        "fwd_cnt went back from {last}: {hdr:?}"
                    );
                    self.from_guest.push((hdr, data));
                    tx.push_used(u32::from(head), 0);
                    moved = true;
                }
                // Like a real host, answer credit requests (everything sent is consumed).
                let asked: Vec<u32> = self.from_guest[self.answered..]
                    .iter()
                    .filter(|(h, _)| h.op == op::CREDIT_REQUEST)
                    .map(|(h, _)| h.dst_port)
                    .collect();
                self.answered = self.from_guest.len();
                for port in asked {
                    self.send(op::CREDIT_UPDATE, port, &[]);
                }
                let rx = self.rx.as_mut().unwrap();
                while !self.to_guest.is_empty() && !self.rx_stalled {
                    let Some(head) = rx.pop_avail() else {
                        // Out of buffers with data waiting: ask to be notified.
                        rx.set_avail_event(rx.next_avail());
                        self.rx_stalled = !rx.has_avail();
                        continue;
                    };
                    let chain = rx.chain(head);
                    let (mut hdr, mut data) = self.to_guest.pop_front().unwrap();
                    let cap = (chain[1].len as usize).min(self.max_rx_packet.max(1));
                    if data.len() > cap {
                        let rest = data.split_off(cap);
                        let mut more = hdr;
                        more.len = rest.len() as u32;
                        self.to_guest.push_front((more, rest));
                        hdr.len = cap as u32;
                    }
                    write_guest(chain[0].addr, &hdr.encode());
                    write_guest(chain[1].addr, &data);
                    if hdr.op == op::RW {
                        *self.delivered.entry(hdr.src_port).or_default() += data.len();
                    }
                    rx.push_used(u32::from(head), (HDR_LEN + data.len()) as u32);
                    moved = true;
                }
                if !moved {
                    return;
                }
            }
        }

        /// A packet from host port `port` to the guest's listening port.
        pub fn send(&mut self, op: u16, port: u32, data: &[u8]) {
            if op == op::REQUEST {
                // A new connection on this port: its counters start again.
                self.delivered.remove(&port);
                self.fwd_seen.remove(&port);
            }
            let hdr = PacketHeader {
                src_cid: addr::HOST_CID,
                dst_cid: addr::GUEST_CID,
                src_port: port,
                dst_port: addr::INVOKE_PORT,
                len: data.len() as u32,
                kind: TYPE_STREAM,
                op,
                flags: 0,
                buf_alloc: 256 * 1024,
                fwd_cnt: self.stream_from_guest(port).len() as u32,
            };
            self.to_guest.push_back((hdr, data.to_vec()));
        }

        /// The ops the guest sent, in order.
        pub fn ops(&self) -> Vec<u16> {
            self.from_guest.iter().map(|(h, _)| h.op).collect()
        }

        /// All stream bytes the guest sent to `port`.
        pub fn stream_from_guest(&self, port: u32) -> Vec<u8> {
            self.from_guest
                .iter()
                .filter(|(h, _)| h.dst_port == port && h.op == op::RW)
                .flat_map(|(_, d)| d.iter().copied())
                .collect()
        }
    }

    impl Transport for FakeHost {
        fn notify(&mut self, queue: u16) {
            self.notifies[usize::from(queue)] += 1;
            match queue {
                QUEUE_RX => self.rx_stalled = false,
                QUEUE_TX => self.tx_kicked = true,
                _ => {}
            }
        }

        fn wait(&mut self) {
            self.waits += 1;
            assert!(self.waits < 100_000, "the driver waits forever");
            self.run();
        }

        fn settle(&mut self) {
            self.settles += 1;
        }
    }

    /// A driver on a fake host with queues of `tx_size` transmit entries.
    pub(crate) fn driver(tx_size: u16) -> Vsock<FakeHost> {
        driver_with(tx_size, false)
    }

    /// A driver on a fake host, with `VIRTIO_F_EVENT_IDX` if `event_idx`.
    pub(crate) fn driver_with(tx_size: u16, event_idx: bool) -> Vsock<FakeHost> {
        let mut rx = SplitQueue::new(QUEUE_RX, 2).unwrap();
        let mut tx = SplitQueue::new(QUEUE_TX, tx_size).unwrap();
        let mut event = SplitQueue::new(QUEUE_EVENT, 1).unwrap();
        for q in [&mut rx, &mut tx, &mut event] {
            q.set_event_idx(event_idx);
        }
        let host = FakeHost {
            rx: Some(rx.device()),
            tx: Some(tx.device()),
            event: Some(event.device()),
            max_rx_packet: usize::MAX,
            ..FakeHost::default()
        };
        Vsock::new(host, rx, tx, event, addr::GUEST_CID).unwrap()
    }

    /// Polls until something other than `None`/`Control` happens (waiting in between).
    fn next_event(v: &mut Vsock<FakeHost>) -> Event {
        loop {
            v.arm_rx(None);
            match v.poll().unwrap() {
                Event::None => v.wait().unwrap(),
                Event::Control => {}
                e => return e,
            }
        }
    }

    #[test]
    fn header_wire_layout() {
        let h = PacketHeader {
            src_cid: 2,
            dst_cid: 3,
            src_port: 0x1111_2222,
            dst_port: 1024,
            len: 5,
            kind: 1,
            op: op::RW,
            flags: 3,
            buf_alloc: 0x10000,
            fwd_cnt: 7,
        };
        let b = h.encode();
        assert_eq!(&b[0..8], &2u64.to_le_bytes());
        assert_eq!(&b[8..16], &3u64.to_le_bytes());
        assert_eq!(&b[16..20], &0x1111_2222u32.to_le_bytes());
        assert_eq!(&b[24..28], &5u32.to_le_bytes());
        assert_eq!(&b[28..30], &1u16.to_le_bytes());
        assert_eq!(&b[30..32], &op::RW.to_le_bytes());
        assert_eq!(&b[36..40], &0x10000u32.to_le_bytes());
        assert_eq!(&b[40..44], &7u32.to_le_bytes());
        assert_eq!(PacketHeader::decode(&b), h);
    }

    #[test]
    fn accepts_one_connection_and_refuses_a_second() {
        let mut v = driver(32);
        v.transport_mut().send(op::REQUEST, 5000, &[]);
        assert_eq!(next_event(&mut v), Event::Connected);
        v.transport_mut().send(op::REQUEST, 5001, &[]);
        v.transport_mut().send(op::RW, 5000, b"hi");
        assert_eq!(
            next_event(&mut v),
            Event::Data {
                len: 2,
                inline: true
            }
        );
        assert_eq!(v.inline_data(2), b"hi");
        let host = v.transport_mut();
        assert_eq!(host.ops(), [op::RESPONSE, op::RST]);
        assert_eq!(host.from_guest[1].0.dst_port, 5001);
        // The event buffer was posted at start.
        assert_eq!(host.notifies[usize::from(QUEUE_EVENT)], 1);
    }

    #[test]
    fn refuses_other_ports_and_data_without_a_connection() {
        let mut v = driver(32);
        let wrong = PacketHeader {
            src_cid: addr::HOST_CID,
            dst_cid: addr::GUEST_CID,
            src_port: 7,
            dst_port: 99,
            kind: TYPE_STREAM,
            op: op::REQUEST,
            ..PacketHeader::default()
        };
        v.transport_mut().to_guest.push_back((wrong, Vec::new()));
        v.transport_mut().send(op::RW, 8, b"data");
        v.transport_mut().send(op::REQUEST, 9, &[]);
        assert_eq!(next_event(&mut v), Event::Connected);
        v.transport_mut().run();
        assert_eq!(v.transport_mut().ops(), [op::RST, op::RST, op::RESPONSE]);
    }

    #[test]
    fn host_reset_and_shutdown_close_the_connection() {
        let mut v = driver(32);
        v.transport_mut().send(op::REQUEST, 1, &[]);
        assert_eq!(next_event(&mut v), Event::Connected);
        v.transport_mut().send(op::RST, 1, &[]);
        assert_eq!(next_event(&mut v), Event::Closed);
        assert!(!v.is_open());

        v.transport_mut().send(op::REQUEST, 2, &[]);
        assert_eq!(next_event(&mut v), Event::Connected);
        let mut shut = v.transport_mut().to_guest.len();
        v.transport_mut().send(op::SHUTDOWN, 2, &[]);
        v.transport_mut().to_guest[shut].0.flags = SHUTDOWN_SEND;
        v.transport_mut().send(op::SHUTDOWN, 2, &[]);
        shut += 1;
        v.transport_mut().to_guest[shut].0.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
        v.arm_rx(None);
        v.wait().unwrap();
        assert_eq!(v.poll().unwrap(), Event::Control);
        assert!(v.peer_done_sending());
        assert_eq!(next_event(&mut v), Event::Closed);
        v.transport_mut().run();
        assert_eq!(*v.transport_mut().ops().last().unwrap(), op::RST);
    }

    #[test]
    fn rejects_a_packet_larger_than_its_buffer() {
        let mut v = driver(32);
        v.transport_mut().send(op::REQUEST, 1, &[]);
        assert_eq!(next_event(&mut v), Event::Connected);
        v.arm_rx(None);
        // A device that claims more data than the buffer holds.
        let h = PacketHeader {
            src_cid: addr::HOST_CID,
            dst_cid: addr::GUEST_CID,
            src_port: 1,
            dst_port: addr::INVOKE_PORT,
            kind: TYPE_STREAM,
            op: op::RW,
            len: RX_INLINE as u32 + 1,
            ..PacketHeader::default()
        };
        let host = v.transport_mut();
        let rx = host.rx.as_mut().unwrap();
        let head = rx.pop_avail().unwrap();
        let chain = rx.chain(head);
        write_guest(chain[0].addr, &h.encode());
        rx.push_used(u32::from(head), (HDR_LEN + RX_INLINE) as u32);
        assert!(matches!(v.poll(), Err(VsockError::RxOverflow { .. })));
    }

    #[test]
    fn sends_within_credit_and_asks_for_more() {
        let mut v = driver(32);
        v.transport_mut().send(op::REQUEST, 1, &[]);
        assert_eq!(next_event(&mut v), Event::Connected);
        let body: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let head = [0xaau8; 24];
        // The host's buf_alloc is 256 KiB: the first call stops at the credit.
        let off = v.send(&head, &body, 0).unwrap();
        assert_eq!(off, 256 * 1024);
        assert!(v.tx_zero_copy_pending().unwrap());
        let again = v.send(&head, &body, off).unwrap();
        assert_eq!(again, off, "no credit, no data");
        v.transport_mut().run();
        assert_eq!(*v.transport_mut().ops().last().unwrap(), op::CREDIT_REQUEST);
        assert!(!v.tx_zero_copy_pending().unwrap());
        // The host consumed everything and says so.
        v.transport_mut().send(op::CREDIT_UPDATE, 1, &[]);
        v.arm_rx(None);
        v.transport_mut().run();
        assert_eq!(v.poll().unwrap(), Event::Control);
        let done = v.send(&head, &body, off).unwrap();
        assert_eq!(done, head.len() + body.len());
        v.transport_mut().run();
        let stream = v.transport_mut().stream_from_guest(1);
        assert_eq!(&stream[..24], &head);
        assert_eq!(&stream[24..], &body[..]);
        let rw: Vec<_> = v
            .transport_mut()
            .from_guest
            .iter()
            .filter(|(h, _)| h.op == op::RW)
            .map(|(h, _)| h.len)
            .collect();
        assert!(rw.iter().all(|&n| n as usize <= MAX_PACKET), "{rw:?}");
        assert!(!v.tx_zero_copy_pending().unwrap());
    }

    #[test]
    fn small_sends_are_copied_and_need_no_wait() {
        let mut v = driver(32);
        v.transport_mut().send(op::REQUEST, 1, &[]);
        assert_eq!(next_event(&mut v), Event::Connected);
        let off = v.send(b"head", b"body", 0).unwrap();
        assert_eq!(off, 8);
        assert!(!v.tx_zero_copy_pending().unwrap());
        let host = v.transport_mut();
        host.run();
        let last = host.from_guest.last().unwrap();
        assert_eq!(last.1, b"headbody");
        assert_eq!(last.0.buf_alloc, BUF_ALLOC);
        // Header and data in one descriptor: the slot holds them back to back.
        assert_eq!(host.tx_descriptors.last(), Some(&1));
    }

    #[test]
    fn runs_out_of_slots_and_recovers() {
        // 8 entries: two 3-descriptor slots.
        let mut v = driver(8);
        v.transport_mut().send(op::REQUEST, 1, &[]);
        assert_eq!(next_event(&mut v), Event::Connected);
        v.transport_mut().run();
        let body = std::vec![7u8; 5 * MAX_PACKET];
        let mut off = 0;
        let total = body.len();
        while off < total {
            off = v.send(&[], &body, off).unwrap();
            if off < total {
                v.wait().unwrap();
                v.poll().unwrap();
                v.arm_rx(None);
            }
        }
        while v.tx_zero_copy_pending().unwrap() {
            v.wait().unwrap();
        }
        assert_eq!(v.transport_mut().stream_from_guest(1), body);
    }

    #[test]
    fn transport_reset_event_closes_the_connection() {
        let mut v = driver(32);
        v.transport_mut().send(op::REQUEST, 1, &[]);
        assert_eq!(next_event(&mut v), Event::Connected);
        let host = v.transport_mut();
        let ev = host.event.as_mut().unwrap();
        let head = ev.pop_avail().unwrap();
        let d = ev.desc(head);
        write_guest(d.addr, &EVENT_TRANSPORT_RESET.to_le_bytes());
        ev.push_used(u32::from(head), 4);
        assert_eq!(v.poll().unwrap(), Event::Closed);
        assert!(!v.is_open());
        // The event buffer went back to the device.
        assert_eq!(v.transport_mut().notifies[usize::from(QUEUE_EVENT)], 2);
    }

    #[test]
    fn rejects_chains_the_device_was_not_given() {
        // Two slots: the RESPONSE takes slot 0 (head 0), a data packet slot 1; the device
        // returns "chain 4" for the first, which is no chain's head.
        let mut v = driver(8);
        v.transport_mut().send(op::REQUEST, 1, &[]);
        assert_eq!(next_event(&mut v), Event::Connected);
        let tx = v.transport_mut().tx.as_mut().unwrap();
        assert_eq!(tx.pop_avail(), Some(0));
        tx.push_used(4, 0);
        assert_eq!(v.send(b"a", b"", 0), Ok(1));
        // No slot is free: the driver reaps, and refuses the bogus chain.
        assert_eq!(v.send(b"b", b"", 0), Err(VsockError::BadTxChain(4)));
    }
}
