//! The vsock device: its virtio side (queues, config space, activation) and its hybrid
//! host end (a Unix listener, one host stream per connection, io_uring for the I/O).
//! See the parent module's doc for the design.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fnode_guest::abi;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::connection::{rst_reply, ConnectionState, Phase, ProtoError};
use super::packet::{
    op, PacketError, PacketHeader, HDR_LEN, MAX_RX_PAYLOAD, SHUTDOWN_BOTH, SHUTDOWN_RCV,
    SHUTDOWN_SEND,
};
use super::uring::{Completion, OpId, OpKind, Uring};
use crate::devices::virtio::queue::{needs_interrupt, pop_head, walk_chain, Chain, ChainError};
use crate::devices::virtio::{
    error_chain, features, ActivateContext, ActivateError, DeviceFault, FaultSink, Interrupt,
    InterruptKind, QueueStateData, VirtioDevice,
};

/// Queue indices.
pub const RXQ: usize = 0;
/// Guest -> host packets.
pub const TXQ: usize = 1;
/// Device -> driver events (transport reset).
pub const EVQ: usize = 2;
/// Largest size of each queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// Most host connections at once (including clients still sending their CONNECT line).
pub const MAX_CONNECTIONS: usize = 64;
/// Longest `CONNECT <port>\n` line accepted.
const CONNECT_LINE_MAX: usize = 64;
/// Size of the buffer an idle connection waits on with its io_uring `recv` (further bounded
/// by the guest's credit): what a connection holds towards the guest between transfers.
const RX_CHUNK: usize = 64 * 1024;
/// Most host bytes a connection holds for the guest ([`MAX_RX_PAYLOAD`]: one frame). During a
/// bulk transfer the buffer grows towards it (bounded by the guest's credit) as
/// non-blocking reads find more bytes waiting; the next `recv` starts from [`RX_CHUNK`] again.
const RX_MAX: usize = MAX_RX_PAYLOAD as usize;
/// A read that returns at least this many bytes marks a bulk transfer: the device then
/// tops the buffer up with non-blocking reads before each delivery, so one packet fills as
/// much of the guest's posted buffer as the client has written.
const RX_BULK: usize = 16 * 1024;
/// First host-side port handed out (Firecracker's convention: far from well-known ports).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// RSTs queued for the guest at most; answers to guest packets stop at a quarter of it.
const MAX_PENDING_RST: usize = 1024;
/// Most chains handled per queue per wake-up before yielding to other events.
const BATCH: usize = 256;
/// io_uring tag of the listener's accept.
const ACCEPT_TAG: u64 = u64::MAX;

/// Errors of the vsock device: setting it up, and what a guest can do wrong.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The bytes given to [`VsockDevice::attach_client`] exceed one frame.
    #[error("{0} bytes for a client attached at restore, at most {MAX_RX_PAYLOAD}")]
    FirstBytesTooLong(usize),
    /// The socket path exists and is not a socket.
    #[error("vsock socket path {} exists and is not a socket: remove it or choose another path", .0.display())]
    PathInUse(PathBuf),
    /// Binding the listener failed.
    #[error("binding the vsock socket {} failed: choose a path in a writable directory", .path.display())]
    Bind {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// io_uring or an eventfd could not be set up.
    #[error("setting up the vsock host I/O (io_uring, eventfd) failed")]
    HostIo(#[source] io::Error),
    /// A queue or descriptor chain is malformed.
    #[error("{queue} queue")]
    Queue {
        /// "rx", "tx" or "event".
        queue: &'static str,
        /// What is wrong.
        #[source]
        source: ChainError,
    },
    /// Ring bookkeeping failed (used ring or notification area).
    #[error("{queue} queue: ring update failed: {reason}")]
    Ring {
        /// Queue name.
        queue: &'static str,
        /// virtio-queue's error.
        reason: String,
    },
    /// A tx chain with device-writable buffers.
    #[error("tx queue: descriptor chain at head {head} has device-writable buffers")]
    TxWritable {
        /// Head index.
        head: u16,
    },
    /// An rx chain with device-readable buffers.
    #[error("rx queue: descriptor chain at head {head} has device-readable buffers")]
    RxReadable {
        /// Head index.
        head: u16,
    },
    /// An rx chain too short for a header.
    #[error("rx queue: descriptor chain at head {head} has {len} writable bytes, less than the 44-byte packet header")]
    RxShort {
        /// Head index.
        head: u16,
        /// Writable bytes.
        len: u32,
    },
    /// A bad packet header.
    #[error("tx queue: bad packet at head {head}")]
    TxPacket {
        /// Head index.
        head: u16,
        /// What is wrong.
        #[source]
        source: PacketError,
    },
    /// A flow-control violation.
    #[error("tx queue: flow control violated")]
    Proto(#[source] ProtoError),
    /// The event loop refused an fd.
    #[error("registering with the event loop failed")]
    EventLoop(#[source] event_manager::Error),
    /// A saved device state (from a snapshot: untrusted) is not one this device can be in.
    #[error("the saved vsock device state is invalid: {0}")]
    BadState(String),
}

fn ring_err(queue: &'static str) -> impl Fn(virtio_queue::Error) -> VsockError {
    move |e| VsockError::Ring {
        queue,
        reason: e.to_string(),
    }
}

fn chain_err(queue: &'static str) -> impl Fn(ChainError) -> VsockError {
    move |source| VsockError::Queue { queue, source }
}

/// The head of the next available chain on queue `q` (`name` in errors), or `None` when the
/// ring is empty. An empty ring turns the driver's notifications back on and is looked at once
/// more, so that a chain added in between is not missed.
///
/// A driver only moves the avail index forward, so the second look finds the chain the ring
/// announced; a ring that announces work and then has none again moved its index back, and
/// the device stops rather than spin on it.
fn next_head(a: &mut Active, q: usize, name: &'static str) -> Result<Option<u16>, VsockError> {
    for _ in 0..2 {
        if let Some(head) = pop_head(&mut a.queues[q], &a.mem).map_err(chain_err(name))? {
            return Ok(Some(head));
        }
        if !a.queues[q]
            .enable_notification(&a.mem)
            .map_err(ring_err(name))?
        {
            return Ok(None);
        }
    }
    Err(VsockError::Ring {
        queue: name,
        reason: "the avail index announced a chain and then moved back".into(),
    })
}

/// The device's state as plain data (for snapshots; see the module doc).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// The guest's cid.
    pub cid: u64,
    /// Negotiated features.
    pub acked_features: u64,
    /// Live queue state (positions included) if the device is active.
    pub queues: Option<Vec<QueueStateData>>,
    /// Established connections (a restored device parks them until a client attaches).
    pub connections: Vec<ConnectionState>,
    /// Next host port to hand out.
    pub next_local_port: u32,
    /// The device is broken.
    pub broken: bool,
}

#[derive(Debug)]
struct Active {
    mem: GuestMemoryMmap,
    queues: Vec<Queue>,
    interrupt: Arc<Interrupt>,
}

/// One connection: protocol state plus its host socket and buffers.
#[derive(Debug)]
struct Conn {
    st: ConnectionState,
    gen: u32,
    /// The host client's socket; `None` for a restored connection no client attached to yet.
    host: Option<Arc<OwnedFd>>,
    /// Host bytes not yet delivered to the guest: `to_guest[to_guest_off..]`. Empty while a
    /// recv owns the buffer.
    to_guest: Vec<u8>,
    to_guest_off: usize,
    recv_op: Option<OpId>,
    /// The client is streaming (its last read was large): top up before delivering.
    bulk: bool,
    host_eof: bool,
    /// Bytes waiting to be sent to the host client (the `OK` line, then guest data).
    to_host: Vec<u8>,
    /// An empty buffer to swap in for `to_host` when a send takes it.
    spare: Vec<u8>,
    send_op: Option<OpId>,
    /// Leading bytes of the outgoing stream that are not guest data (the `OK` line): they do
    /// not count towards `fwd_cnt`.
    ctl_bytes: usize,
    host_write_shut: bool,
}

impl Conn {
    fn new(gen: u32, host: Option<Arc<OwnedFd>>, st: ConnectionState) -> Self {
        Conn {
            st,
            gen,
            host,
            to_guest: Vec::new(),
            to_guest_off: 0,
            recv_op: None,
            bulk: false,
            host_eof: false,
            to_host: Vec::new(),
            spare: Vec::new(),
            send_op: None,
            ctl_bytes: 0,
            host_write_shut: false,
        }
    }

    fn tag(&self, slot: usize) -> u64 {
        ((slot as u64) << 32) | u64::from(self.gen)
    }

    fn pending_to_guest(&self) -> usize {
        self.to_guest.len().saturating_sub(self.to_guest_off)
    }

    /// Queues the `OK <port>` reply ahead of anything else for the host client.
    fn queue_ok(&mut self) {
        let ok = format!("OK {}\n", self.st.local_port);
        self.ctl_bytes += ok.len();
        self.to_host.splice(0..0, ok.into_bytes());
    }
}

/// What the next rx packet carries besides its header: `(connection slot, bytes)` taken
/// from that connection's `to_guest` at `start`.
type RxData = Option<(usize, usize, usize)>;

/// The virtio-vsock device with a hybrid (Unix socket) host end.
#[derive(Debug)]
pub struct VsockDevice {
    cid: u64,
    uds_path: PathBuf,
    listener: Arc<OwnedFd>,
    pub(super) uring: Uring,
    conns: Vec<Option<Conn>>,
    next_gen: u32,
    next_local_port: u32,
    rst_queue: VecDeque<PacketHeader>,
    accept_op: Option<OpId>,
    accept_failed: Option<i32>,
    pub(super) queue_evts: Vec<EventFd>,
    pub(super) activate_evt: EventFd,
    active: Option<Active>,
    acked_features: u64,
    broken: bool,
    faults: FaultSink,
    rr: usize,
    completions: Vec<Completion>,
    /// Queues restored from a snapshot, used by the next activation instead of the
    /// transport's (they carry the live ring positions).
    restored_queues: Option<Vec<Queue>>,
    /// Guest page frames the device wrote packets into since the last
    /// [`take_written_pages`](Self::take_written_pages) (KVM's dirty log does not see the
    /// VMM's writes). The used rings are not in it: [`ring_pages`](Self::ring_pages).
    written_pages: Vec<u64>,
}

/// Most page frames [`VsockDevice::take_written_pages`] collects before it dedups them.
const WRITTEN_PAGES_COMPACT: usize = 1 << 16;
/// Guest page size.
const PAGE_SIZE: u64 = abi::layout::PAGE_SIZE;

impl VsockDevice {
    /// A device for a guest with cid [`abi::vsock::GUEST_CID`], listening for host clients at
    /// `uds_path`. A stale socket file at the path is replaced.
    pub fn new(uds_path: &Path, faults: FaultSink) -> Result<Self, VsockError> {
        if let Ok(meta) = std::fs::symlink_metadata(uds_path) {
            if !meta.file_type().is_socket() {
                return Err(VsockError::PathInUse(uds_path.to_path_buf()));
            }
            let _ = std::fs::remove_file(uds_path);
        }
        let listener = UnixListener::bind(uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.to_path_buf(),
            source,
        })?;
        let mut queue_evts = Vec::with_capacity(QUEUE_SIZES.len());
        for _ in QUEUE_SIZES {
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(VsockError::HostIo)?);
        }
        Ok(VsockDevice {
            cid: abi::vsock::GUEST_CID,
            uds_path: uds_path.to_path_buf(),
            listener: Arc::new(OwnedFd::from(listener)),
            uring: Uring::new().map_err(VsockError::HostIo)?,
            conns: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            next_gen: 0,
            next_local_port: FIRST_LOCAL_PORT,
            rst_queue: VecDeque::new(),
            accept_op: None,
            accept_failed: None,
            queue_evts,
            activate_evt: EventFd::new(EFD_NONBLOCK).map_err(VsockError::HostIo)?,
            active: None,
            acked_features: 0,
            broken: false,
            faults,
            rr: 0,
            completions: Vec::new(),
            restored_queues: None,
            written_pages: Vec::new(),
        })
    }

    /// Puts the saved device-level state back on a new device (before activation) and parks
    /// the saved connections. `saved` comes from a file: checked first.
    fn load_state(&mut self, saved: &VsockState) -> Result<(), VsockError> {
        let bad = VsockError::BadState;
        if saved.broken {
            return Err(bad("the device was broken when it was saved".into()));
        }
        if saved.cid != abi::vsock::GUEST_CID {
            return Err(bad(format!(
                "guest cid {}, fnode guests have {}",
                saved.cid,
                abi::vsock::GUEST_CID
            )));
        }
        if saved.acked_features & !self.avail_features() != 0 {
            return Err(bad(format!(
                "features {:#x} the device does not offer",
                saved.acked_features
            )));
        }
        self.restored_queues = match &saved.queues {
            None => None,
            Some(qs) => Some(restored_queues(qs)?),
        };
        check_connections(&saved.connections)?;
        for c in &saved.connections {
            self.park_connection(c.clone());
        }
        self.acked_features = saved.acked_features;
        self.next_local_port = saved.next_local_port.max(FIRST_LOCAL_PORT);
        Ok(())
    }

    /// Lets the host I/O of the last exchange finish before a reset (see
    /// [`settle_step`](Self::settle_step)), or `deadline`, holding the device throughout:
    /// only for a last look (a deadline now), since the host I/O it waits for may need the
    /// event loop, which waits for the device meanwhile. `VirtioDevices::settle_host_io`
    /// waits with the device let go between looks.
    pub fn settle_host_io(&mut self, deadline: std::time::Instant) {
        while !self.settle_step() {
            if std::time::Instant::now() >= deadline {
                return;
            }
            std::thread::yield_now();
        }
    }

    /// One look at the host I/O of the last exchange before a reset, delivering nothing to
    /// the guest: takes what the guest queued on the transmit queue (a response it handed
    /// over right before asking for the reset, which the event loop may not have seen yet),
    /// handles the io_uring completions that arrived and starts a send of every byte queued
    /// for a host client. Returns whether none is left or in flight (or the device broke).
    /// A client can read a response before the device has seen its send complete; that
    /// completion still moves the connection's counters, so it must land before the
    /// counters are put back.
    pub fn settle_step(&mut self) -> bool {
        if self.broken {
            return true;
        }
        // No interrupt: the guest is out and about to be reset, and one injected after
        // its interrupt controller was put back would wake it for nothing.
        self.process_tx(false);
        let mut done = std::mem::take(&mut self.completions);
        self.uring.drain(&mut done);
        for c in done.drain(..) {
            if !self.broken {
                self.on_completion(c);
            }
        }
        self.completions = done;
        if self.broken {
            return true;
        }
        self.start_sends();
        if !self.conns.iter().flatten().any(|c| c.send_op.is_some()) {
            return true;
        }
        if let Err(e) = self.uring.submit() {
            self.fail(VsockError::HostIo(e));
            return true;
        }
        false
    }

    /// In-place reset: the device goes back to `saved` (a state it saved earlier) while the
    /// vCPUs are paused and guest memory is being put back. The live queues take the saved
    /// positions; a saved connection that is still live keeps its host client and takes the
    /// saved counters (the client's stream goes on: the guest is back at the same point of
    /// the same connection); live connections the snapshot does not know are closed, saved
    /// ones that are gone are parked again.
    pub fn reset_to(&mut self, saved: &VsockState) -> Result<(), VsockError> {
        let queues = match &saved.queues {
            Some(qs) => Some(restored_queues(qs)?),
            None => None,
        };
        check_connections(&saved.connections)?;
        match (self.active.as_mut(), queues) {
            (Some(a), Some(queues)) => {
                if let Some(i) = queues.iter().position(|q| !q.is_valid(&a.mem)) {
                    return Err(VsockError::BadState(format!(
                        "queue {i} is not inside guest memory"
                    )));
                }
                a.queues = queues;
            }
            (None, None) => {}
            _ => {
                return Err(VsockError::BadState(
                    "the device's activation differs from the saved one".into(),
                ))
            }
        }
        for i in 0..self.conns.len() {
            let Some(c) = self.conns[i].as_mut() else {
                continue;
            };
            let same = saved
                .connections
                .iter()
                .find(|s| s.local_port == c.st.local_port && s.peer_port == c.st.peer_port);
            match same {
                Some(s) if c.st.phase == Phase::Established => {
                    c.st = s.clone();
                    c.to_guest_off = c.to_guest.len();
                    c.host_eof = false;
                    c.host_write_shut = false;
                }
                _ => self.drop_conn(i, false),
            }
        }
        for s in &saved.connections {
            let live = self
                .conns
                .iter()
                .flatten()
                .any(|c| c.st.local_port == s.local_port && c.st.peer_port == s.peer_port);
            if !live {
                self.park_connection(s.clone());
            }
        }
        self.rst_queue.clear();
        self.next_local_port = saved.next_local_port.max(FIRST_LOCAL_PORT);
        self.written_pages.clear();
        Ok(())
    }

    /// The guest page frames the device wrote packets into since the last call, sorted and
    /// without duplicates (then forgotten).
    pub fn take_written_pages(&mut self) -> Vec<u64> {
        let mut pages = std::mem::take(&mut self.written_pages);
        pages.sort_unstable();
        pages.dedup();
        pages
    }

    /// The guest page frames of the active queues' used rings (which the device writes).
    pub fn ring_pages(&self) -> Vec<u64> {
        let Some(a) = &self.active else {
            return Vec::new();
        };
        let mut pages = Vec::new();
        for q in &a.queues {
            // flags, idx, ring[size] (8 bytes each), avail_event.
            let len = 6 + 8 * u64::from(q.size());
            let start = q.used_ring();
            pages.extend(start / PAGE_SIZE..=(start.saturating_add(len) - 1) / PAGE_SIZE);
        }
        pages
    }

    fn note_written(&mut self, chain: &Chain, len: usize) {
        let mut left = len as u64;
        for seg in &chain.writable {
            if left == 0 {
                break;
            }
            let n = u64::from(seg.len).min(left);
            left -= n;
            let start = seg.addr.0;
            if n > 0 {
                self.written_pages
                    .extend(start / PAGE_SIZE..=(start.saturating_add(n) - 1) / PAGE_SIZE);
            }
        }
        if self.written_pages.len() > WRITTEN_PAGES_COMPACT {
            self.written_pages.sort_unstable();
            self.written_pages.dedup();
        }
    }

    /// The Unix socket host clients connect to.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// The device's state as plain data. Meaningful when the device is quiescent (vCPUs
    /// paused, no host I/O in flight): bytes inside io_uring operations are not in it.
    pub fn state(&self) -> VsockState {
        VsockState {
            cid: self.cid,
            acked_features: self.acked_features,
            queues: self
                .active
                .as_ref()
                .map(|a| a.queues.iter().map(QueueStateData::from).collect()),
            connections: self
                .conns
                .iter()
                .flatten()
                .filter(|c| c.st.phase == Phase::Established)
                .map(|c| c.st.clone())
                .collect(),
            next_local_port: self.next_local_port,
            broken: self.broken,
        }
    }

    /// Adds an established connection with no host client (a restored one). The first client
    /// whose `CONNECT` names its guest port attaches to it and gets `OK` at once, without a
    /// new handshake with the guest.
    pub fn park_connection(&mut self, st: ConnectionState) -> bool {
        let Some(slot) = self.conns.iter().position(Option::is_none) else {
            return false;
        };
        if st.phase != Phase::Established {
            return false;
        }
        let gen = self.bump_gen();
        self.conns[slot] = Some(Conn::new(gen, None, st));
        true
    }

    /// Attaches a host client to the parked connection of guest port `port` (see
    /// [`park_connection`](Self::park_connection)) without a `CONNECT` line or an `OK`: the
    /// device keeps one end of a new connected stream pair and returns the other. `first`:
    /// bytes the client sends first (at most [`MAX_RX_PAYLOAD`]), handed to the guest right
    /// away (packets on its receive queue, its interrupt raised) as far as its buffers and
    /// credit allow, the rest as the guest makes room. `Ok(None)`: no parked connection has
    /// that port, or the device is broken; nothing changed.
    ///
    /// Called on another thread (a restore's, before the device joins the event loop), this
    /// only writes guest memory and raises the interrupt: the connection's host I/O starts
    /// when the event loop next handles the device (its first look, for a restore).
    pub fn attach_client(
        &mut self,
        port: u32,
        first: &[u8],
    ) -> Result<Option<UnixStream>, VsockError> {
        if first.len() > RX_MAX {
            return Err(VsockError::FirstBytesTooLong(first.len()));
        }
        if self.broken {
            return Ok(None);
        }
        let Some(c) = self.conns.iter_mut().flatten().find(|c| {
            c.host.is_none() && c.st.phase == Phase::Established && c.st.peer_port == port
        }) else {
            return Ok(None);
        };
        let (ours, theirs) = UnixStream::pair().map_err(VsockError::HostIo)?;
        c.host = Some(Arc::new(OwnedFd::from(ours)));
        if c.pending_to_guest() == 0 {
            c.to_guest.clear();
            c.to_guest_off = 0;
        }
        c.to_guest.extend_from_slice(first);
        self.process_rx();
        Ok(Some(theirs))
    }

    fn bump_gen(&mut self) -> u32 {
        self.next_gen = self.next_gen.wrapping_add(1);
        self.next_gen
    }

    /// The phase of each live connection.
    pub fn connection_phases(&self) -> Vec<Phase> {
        self.conns.iter().flatten().map(|c| c.st.phase).collect()
    }

    /// Number of live connections (all phases).
    pub fn connection_count(&self) -> usize {
        self.conns.iter().flatten().count()
    }

    pub(super) fn fail(&mut self, err: VsockError) {
        if self.broken {
            return;
        }
        self.broken = true;
        self.faults.report(DeviceFault {
            device: self.name().to_string(),
            message: error_chain(&err),
        });
        if let Some(a) = &self.active {
            let _ = a.interrupt.trigger(InterruptKind::Config);
        }
    }

    /// Everything that may have become possible: deliver to the guest, start host I/O.
    pub(super) fn kick(&mut self) {
        if self.broken {
            return;
        }
        // Pump first (it may queue RSTs for closed connections), deliver, then pump again
        // (delivery may have drained a connection's buffer, making room for the next recv).
        self.pump();
        self.top_up();
        self.process_rx();
        self.pump();
        if let Err(e) = self.uring.submit() {
            self.fail(VsockError::HostIo(e));
        }
    }

    pub(super) fn on_txq(&mut self) {
        let _ = self.queue_evts[TXQ].read();
        if !self.broken {
            self.process_tx(true);
        }
        self.kick();
    }

    pub(super) fn on_rxq(&mut self) {
        let _ = self.queue_evts[RXQ].read();
        self.kick();
    }

    pub(super) fn on_evq(&mut self) {
        // The event queue only carries TRANSPORT_RESET, sent after a restore; the driver's
        // buffers stay available until then.
        let _ = self.queue_evts[EVQ].read();
    }

    pub(super) fn on_activate(&mut self) {
        let _ = self.activate_evt.read();
        self.kick();
    }

    pub(super) fn on_uring(&mut self) {
        let mut done = std::mem::take(&mut self.completions);
        self.uring.drain(&mut done);
        for c in done.drain(..) {
            if !self.broken {
                self.on_completion(c);
            }
        }
        self.completions = done;
        self.kick();
    }

    // ----- guest -> host -----

    /// Handles the guest's packets on the transmit queue; `interrupt`: tell the guest when
    /// it asked to be told.
    fn process_tx(&mut self, interrupt: bool) {
        let Some(mut a) = self.active.take() else {
            return;
        };
        let r = self.tx_loop(&mut a, interrupt);
        self.active = Some(a);
        if let Err(e) = r {
            self.fail(e);
        }
    }

    fn tx_loop(&mut self, a: &mut Active, interrupt: bool) -> Result<(), VsockError> {
        let mut used = false;
        let mut n = 0;
        loop {
            if n == BATCH {
                // Yield to other events; come back through our own eventfd.
                let _ = self.queue_evts[TXQ].write(1);
                break;
            }
            let Some(head) = next_head(a, TXQ, "tx")? else {
                break;
            };
            n += 1;
            let chain = walk_chain(&a.mem, &a.queues[TXQ], head).map_err(chain_err("tx"))?;
            if !chain.writable.is_empty() {
                return Err(VsockError::TxWritable { head });
            }
            if (chain.readable_len as usize) < HDR_LEN {
                return Err(VsockError::TxPacket {
                    head,
                    source: PacketError::Short(chain.readable_len),
                });
            }
            let mut hb = [0u8; HDR_LEN];
            chain.read_at(&a.mem, 0, &mut hb).map_err(chain_err("tx"))?;
            let hdr = PacketHeader::decode(&hb);
            hdr.check_from_guest(chain.readable_len)
                .map_err(|source| VsockError::TxPacket { head, source })?;
            self.on_guest_packet(&a.mem, &chain, &hdr)?;
            a.queues[TXQ]
                .add_used(&a.mem, head, 0)
                .map_err(ring_err("tx"))?;
            used = true;
        }
        if used
            && interrupt
            && needs_interrupt(&mut a.queues[TXQ], &a.mem).map_err(ring_err("tx"))?
        {
            let _ = a.interrupt.trigger(InterruptKind::Vring);
        }
        Ok(())
    }

    fn find_conn(&self, local_port: u32, peer_port: u32) -> Option<usize> {
        self.conns.iter().position(|c| {
            c.as_ref().is_some_and(|c| {
                c.st.phase != Phase::AwaitingConnect
                    && c.st.local_port == local_port
                    && c.st.peer_port == peer_port
            })
        })
    }

    fn on_guest_packet(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: &Chain,
        h: &PacketHeader,
    ) -> Result<(), VsockError> {
        let Some(i) = self.find_conn(h.dst_port, h.src_port) else {
            // No such connection (or a guest-initiated connect, which fnode does not serve).
            if h.op != op::RST {
                self.queue_rst(h.dst_port, h.src_port, true);
            }
            return Ok(());
        };
        let Some(c) = self.conns[i].as_mut() else {
            return Ok(());
        };
        c.st.update_peer_credit(h).map_err(VsockError::Proto)?;
        match (c.st.phase, h.op) {
            (_, op::RST) => self.drop_conn(i, false),
            (Phase::Connecting, op::RESPONSE) => {
                c.st.phase = Phase::Established;
                c.queue_ok();
            }
            (Phase::Established, op::RW) => {
                if c.st.peer_shutdown & SHUTDOWN_SEND != 0 {
                    // Data after the guest said it sends no more.
                    self.drop_conn(i, true);
                    return Ok(());
                }
                c.st.received(h.len).map_err(VsockError::Proto)?;
                let start = c.to_host.len();
                c.to_host.resize(start + h.len as usize, 0);
                chain
                    .read_at(mem, HDR_LEN as u32, &mut c.to_host[start..])
                    .map_err(chain_err("tx"))?;
            }
            (Phase::Established, op::CREDIT_UPDATE) => {}
            (Phase::Established, op::CREDIT_REQUEST) => c.st.credit_update_pending = true,
            (Phase::Established, op::SHUTDOWN) => c.st.peer_shutdown |= h.flags,
            // REQUEST or RESPONSE on an established connection, anything but RESPONSE or RST
            // while connecting: the connection is confused; reset it.
            _ => self.drop_conn(i, true),
        }
        Ok(())
    }

    fn queue_rst(&mut self, local_port: u32, peer_port: u32, guest_triggered: bool) {
        let cap = if guest_triggered {
            MAX_PENDING_RST / 4
        } else {
            MAX_PENDING_RST
        };
        if self.rst_queue.len() < cap {
            self.rst_queue.push_back(rst_reply(local_port, peer_port));
        }
    }

    /// Removes connection `i`, cancelling its host I/O (the host socket closes when the
    /// last op completes) and optionally telling the guest with an RST.
    fn drop_conn(&mut self, i: usize, send_rst: bool) {
        let Some(c) = self.conns[i].take() else {
            return;
        };
        if send_rst && c.st.phase != Phase::AwaitingConnect {
            self.queue_rst(c.st.local_port, c.st.peer_port, false);
        }
        for id in [c.recv_op, c.send_op].into_iter().flatten() {
            self.uring.cancel(id);
        }
    }

    // ----- host -> guest -----

    fn process_rx(&mut self) {
        let Some(mut a) = self.active.take() else {
            return;
        };
        let r = self.rx_loop(&mut a);
        self.active = Some(a);
        if let Err(e) = r {
            self.fail(e);
        }
    }

    fn rx_loop(&mut self, a: &mut Active) -> Result<(), VsockError> {
        let mut used = false;
        let mut n = 0;
        loop {
            if n == BATCH {
                let _ = self.queue_evts[RXQ].write(1);
                break;
            }
            if !self.has_rx_work() {
                break;
            }
            // Out of guest buffers: `next_head` asks to be notified when the driver adds some.
            let Some(head) = next_head(a, RXQ, "rx")? else {
                break;
            };
            n += 1;
            let chain = walk_chain(&a.mem, &a.queues[RXQ], head).map_err(chain_err("rx"))?;
            if !chain.readable.is_empty() {
                return Err(VsockError::RxReadable { head });
            }
            if (chain.writable_len as usize) < HDR_LEN {
                return Err(VsockError::RxShort {
                    head,
                    len: chain.writable_len,
                });
            }
            let room = (chain.writable_len as usize - HDR_LEN).min(RX_MAX);
            let Some((hdr, data)) = self.next_rx_packet(room) else {
                // Nothing fits after all: give the buffer back.
                a.queues[RXQ].go_to_previous_position();
                break;
            };
            chain
                .write_at(&a.mem, 0, &hdr.encode())
                .map_err(chain_err("rx"))?;
            let mut len = HDR_LEN;
            if let Some((slot, start, count)) = data {
                if let Some(c) = self.conns[slot].as_ref() {
                    let bytes = c.to_guest.get(start..start + count).unwrap_or(&[]);
                    chain
                        .write_at(&a.mem, HDR_LEN as u32, bytes)
                        .map_err(chain_err("rx"))?;
                    len += bytes.len();
                }
            }
            self.note_written(&chain, len);
            a.queues[RXQ]
                .add_used(&a.mem, head, len as u32)
                .map_err(ring_err("rx"))?;
            used = true;
        }
        if used && needs_interrupt(&mut a.queues[RXQ], &a.mem).map_err(ring_err("rx"))? {
            let _ = a.interrupt.trigger(InterruptKind::Vring);
        }
        Ok(())
    }

    fn has_rx_work(&self) -> bool {
        if !self.rst_queue.is_empty() {
            return true;
        }
        self.conns.iter().flatten().any(|c| match c.st.phase {
            Phase::Connecting => !c.st.request_sent,
            Phase::Established => {
                let pending = c.pending_to_guest();
                let data = pending > 0
                    && c.st.peer_shutdown & SHUTDOWN_RCV == 0
                    && (c.st.peer_credit() > 0 || !c.st.credit_request_sent);
                data || (pending == 0 && c.st.shutdown_to_send != 0) || c.st.credit_update_pending
            }
            Phase::AwaitingConnect => false,
        })
    }

    /// Builds the next packet for the guest (at most `room` payload bytes), updating the
    /// connection's counters as if it were delivered. Round-robin over connections.
    fn next_rx_packet(&mut self, room: usize) -> Option<(PacketHeader, RxData)> {
        if let Some(h) = self.rst_queue.pop_front() {
            return Some((h, None));
        }
        let n = self.conns.len();
        for k in 0..n {
            let i = (self.rr + k) % n;
            let Some(c) = self.conns[i].as_mut() else {
                continue;
            };
            let pkt = match c.st.phase {
                Phase::Connecting if !c.st.request_sent => {
                    c.st.request_sent = true;
                    Some((c.st.header(op::REQUEST, 0, 0), None))
                }
                Phase::Established => {
                    let pending = c.pending_to_guest();
                    let credit = c.st.peer_credit() as usize;
                    if pending > 0
                        && c.st.peer_shutdown & SHUTDOWN_RCV == 0
                        && credit > 0
                        && room > 0
                    {
                        let count = pending.min(credit).min(room);
                        let start = c.to_guest_off;
                        c.to_guest_off += count;
                        c.st.tx_cnt = c.st.tx_cnt.wrapping_add(count as u32);
                        Some((
                            c.st.header(op::RW, count as u32, 0),
                            Some((i, start, count)),
                        ))
                    } else if pending > 0
                        && c.st.peer_shutdown & SHUTDOWN_RCV == 0
                        && credit == 0
                        && !c.st.credit_request_sent
                    {
                        c.st.credit_request_sent = true;
                        Some((c.st.header(op::CREDIT_REQUEST, 0, 0), None))
                    } else if pending == 0 && c.st.shutdown_to_send != 0 {
                        let flags = std::mem::take(&mut c.st.shutdown_to_send);
                        Some((c.st.header(op::SHUTDOWN, 0, flags), None))
                    } else if c.st.credit_update_pending {
                        Some((c.st.header(op::CREDIT_UPDATE, 0, 0), None))
                    } else {
                        None
                    }
                }
                _ => None,
            };
            if pkt.is_some() {
                self.rr = (i + 1) % n;
                return pkt;
            }
        }
        None
    }

    // ----- host I/O -----

    /// Starts the host I/O each connection is ready for, and handles graceful closes.
    fn pump(&mut self) {
        if self.accept_op.is_none() && self.accept_failed.is_none() {
            match self.uring.accept(ACCEPT_TAG, self.listener.clone()) {
                Ok(id) => self.accept_op = Some(id),
                Err(e) => self.accept_failed = Some(e.raw_os_error().unwrap_or(0)),
            }
        }
        for i in 0..self.conns.len() {
            if self.pump_conn(i).is_err() {
                // The ring refused the op (full or broken): a host-side failure, not the
                // guest's; drop this connection and tell the guest with an RST.
                self.drop_conn(i, true);
            }
        }
    }

    fn pump_conn(&mut self, i: usize) -> io::Result<()> {
        let Some(c) = self.conns[i].as_mut() else {
            return Ok(());
        };
        let tag = c.tag(i);
        let drained = c.to_host.is_empty() && c.send_op.is_none();
        if c.st.phase == Phase::Established && drained && c.st.peer_shutdown == SHUTDOWN_BOTH {
            // The guest closed and every byte reached the client: RST completes the close
            // (virtio 1.x, 5.10.6.6) and the client sees EOF.
            self.drop_conn(i, true);
            return Ok(());
        }
        let Some(fd) = c.host.clone() else {
            return Ok(());
        };
        if c.st.phase == Phase::Established
            && drained
            && c.st.peer_shutdown & SHUTDOWN_SEND != 0
            && !c.host_write_shut
        {
            // SAFETY: shutdown(2) on a socket this connection owns; no memory is involved.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_WR) };
            c.host_write_shut = true;
        }
        if c.send_op.is_none() && !c.to_host.is_empty() {
            let buf = std::mem::replace(&mut c.to_host, std::mem::take(&mut c.spare));
            c.send_op = Some(self.uring.send(tag, fd.clone(), buf, 0)?);
        }
        if c.recv_op.is_some() {
            return Ok(());
        }
        match c.st.phase {
            Phase::AwaitingConnect => {
                let mut buf = std::mem::take(&mut c.to_guest);
                buf.reserve_exact(CONNECT_LINE_MAX.saturating_sub(buf.len()));
                let max = CONNECT_LINE_MAX.saturating_sub(buf.len());
                if max > 0 {
                    c.recv_op = Some(self.uring.recv(tag, fd, buf, max)?);
                } else {
                    c.to_guest = buf;
                }
            }
            Phase::Established => {
                let credit = c.st.peer_credit() as usize;
                if !c.host_eof
                    && c.st.peer_shutdown & SHUTDOWN_RCV == 0
                    && c.pending_to_guest() == 0
                    && credit > 0
                {
                    let mut buf = std::mem::take(&mut c.to_guest);
                    buf.clear();
                    // A large buffer from a bulk transfer is not kept while the client idles.
                    buf.shrink_to(RX_CHUNK);
                    c.to_guest_off = 0;
                    let max = credit.min(RX_CHUNK);
                    buf.reserve_exact(max);
                    c.recv_op = Some(self.uring.recv(tag, fd, buf, max)?);
                }
            }
            Phase::Connecting => {}
        }
        Ok(())
    }

    /// Starts a send for every connection with bytes for its host client and none in
    /// flight (only that: no accept, no receive).
    fn start_sends(&mut self) {
        for i in 0..self.conns.len() {
            let Some(c) = self.conns[i].as_mut() else {
                continue;
            };
            if c.send_op.is_some() || c.to_host.is_empty() {
                continue;
            }
            let Some(fd) = c.host.clone() else {
                continue;
            };
            let tag = c.tag(i);
            let buf = std::mem::replace(&mut c.to_host, std::mem::take(&mut c.spare));
            match self.uring.send(tag, fd, buf, 0) {
                Ok(id) => c.send_op = Some(id),
                // As in `pump`: a host-side failure, the connection goes.
                Err(_) => self.drop_conn(i, true),
            }
        }
    }

    /// Tops up what bulk-streaming connections hold for the guest with non-blocking reads of
    /// the bytes their clients already wrote (a plain `recv`, no io_uring round trip), up to
    /// the guest's credit and [`RX_MAX`], so the next packet fills more of the guest's
    /// buffer. Only between io_uring receives: a connection whose `recv` is in flight has
    /// lent its buffer to the kernel.
    fn top_up(&mut self) {
        for i in 0..self.conns.len() {
            if self.top_up_conn(i).is_err() {
                // The client's socket failed: reset the guest's side, as a failed recv does.
                self.drop_conn(i, true);
            }
        }
    }

    fn top_up_conn(&mut self, i: usize) -> io::Result<()> {
        let Some(c) = self.conns[i].as_mut() else {
            return Ok(());
        };
        if !c.bulk || c.recv_op.is_some() || c.host_eof || c.st.phase != Phase::Established {
            return Ok(());
        }
        if c.st.peer_shutdown & SHUTDOWN_RCV != 0 {
            return Ok(());
        }
        let Some(fd) = c.host.clone() else {
            return Ok(());
        };
        let limit = (c.st.peer_credit() as usize).min(RX_MAX);
        if c.pending_to_guest() >= limit {
            return Ok(());
        }
        if c.to_guest_off > 0 {
            c.to_guest.drain(..c.to_guest_off);
            c.to_guest_off = 0;
        }
        while c.to_guest.len() < limit {
            let want = limit - c.to_guest.len();
            if c.to_guest.capacity() == c.to_guest.len() {
                // Grow by doubling (at least RX_CHUNK), never past the limit.
                c.to_guest
                    .reserve_exact(c.to_guest.len().max(RX_CHUNK).min(want));
            }
            let spare = c.to_guest.spare_capacity_mut();
            let n = spare.len().min(want);
            // SAFETY: recv(2) writes at most `n` bytes at `spare`, which has room for at least
            // `n` bytes and is not otherwise borrowed; the fd is this connection's socket,
            // kept open by the Arc.
            let r = unsafe {
                libc::recv(
                    fd.as_raw_fd(),
                    spare.as_mut_ptr().cast(),
                    n,
                    libc::MSG_DONTWAIT,
                )
            };
            if r > 0 {
                let len = c.to_guest.len() + r as usize;
                // SAFETY: recv initialised the first `r` (<= n) bytes of the spare capacity.
                unsafe { c.to_guest.set_len(len) };
            } else if r == 0 {
                // The client will send no more: tell the guest once its data is delivered.
                c.host_eof = true;
                c.st.shutdown_to_send |= SHUTDOWN_SEND;
                break;
            } else {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
        }
        Ok(())
    }

    fn on_completion(&mut self, comp: Completion) {
        if comp.tag == ACCEPT_TAG {
            self.accept_op = None;
            self.on_accept(comp.result, comp.accepted);
            return;
        }
        let slot = (comp.tag >> 32) as usize;
        let gen = comp.tag as u32;
        let Some(c) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if c.gen != gen {
            return;
        }
        match comp.kind {
            OpKind::Recv => {
                c.recv_op = None;
                if c.st.phase == Phase::AwaitingConnect {
                    c.to_guest = comp.buf;
                    if comp.result <= 0 {
                        self.drop_conn(slot, false);
                    } else {
                        self.on_connect_line(slot);
                    }
                } else if comp.result > 0 {
                    c.to_guest = comp.buf;
                    c.to_guest_off = 0;
                    c.bulk = comp.result as usize >= RX_BULK;
                } else if comp.result == 0 {
                    // The client will send no more: tell the guest once its data is delivered.
                    c.to_guest = comp.buf;
                    c.host_eof = true;
                    c.st.shutdown_to_send |= SHUTDOWN_SEND;
                } else if comp.result != -libc::ECANCELED {
                    self.drop_conn(slot, true);
                }
            }
            OpKind::Send => {
                c.send_op = None;
                if comp.result > 0 {
                    let n = comp.result as usize;
                    let ctl = n.min(c.ctl_bytes);
                    c.ctl_bytes -= ctl;
                    c.st.forwarded((n - ctl) as u32);
                    let end = comp.offset + n;
                    if end < comp.buf.len() {
                        let fd = comp.fd.clone();
                        let tag = c.tag(slot);
                        match self.uring.send(tag, fd, comp.buf, end) {
                            Ok(id) => {
                                if let Some(c) = self.conns[slot].as_mut() {
                                    c.send_op = Some(id);
                                }
                            }
                            Err(_) => self.drop_conn(slot, true),
                        }
                    } else {
                        let mut buf = comp.buf;
                        buf.clear();
                        // Keep a small buffer for the next send, not a large response's.
                        buf.shrink_to(RX_CHUNK);
                        c.spare = buf;
                    }
                } else if comp.result != -libc::ECANCELED {
                    // The client went away (EPIPE, ECONNRESET): reset the guest's side.
                    self.drop_conn(slot, true);
                }
            }
            OpKind::Accept => {}
        }
    }

    fn on_accept(&mut self, result: i32, accepted: Option<OwnedFd>) {
        let Some(fd) = accepted else {
            if ![
                libc::EINTR,
                libc::EAGAIN,
                libc::ECONNABORTED,
                libc::ECANCELED,
            ]
            .contains(&-result)
            {
                // Out of fds or the listener is gone: stop accepting rather than spin.
                self.accept_failed = Some(-result);
            }
            return;
        };
        let Some(slot) = self.conns.iter().position(Option::is_none) else {
            // Too many connections: the client sees its socket closed.
            return;
        };
        let gen = self.bump_gen();
        self.conns[slot] = Some(Conn::new(
            gen,
            Some(Arc::new(fd)),
            ConnectionState::awaiting_connect(),
        ));
    }

    /// Parses a client's `CONNECT <port>\n` once the line is complete.
    fn on_connect_line(&mut self, slot: usize) {
        let Some(c) = self.conns[slot].as_mut() else {
            return;
        };
        let Some(nl) = c.to_guest.iter().position(|&b| b == b'\n') else {
            if c.to_guest.len() >= CONNECT_LINE_MAX {
                self.drop_conn(slot, false);
            }
            return;
        };
        let port = std::str::from_utf8(&c.to_guest[..nl])
            .ok()
            .and_then(|l| l.trim_end_matches('\r').strip_prefix("CONNECT "))
            .and_then(|p| p.trim().parse::<u32>().ok());
        let Some(port) = port else {
            self.drop_conn(slot, false);
            return;
        };
        let leftover = c.to_guest.split_off(nl + 1);
        // A restored connection to that guest port waiting for a client?
        let parked = self.conns.iter().position(|o| {
            o.as_ref().is_some_and(|p| {
                p.host.is_none() && p.st.phase == Phase::Established && p.st.peer_port == port
            })
        });
        if let Some(p) = parked {
            let Some(mut client) = self.conns[slot].take() else {
                return;
            };
            if let Some(pc) = self.conns[p].as_mut() {
                pc.host = client.host.take();
                pc.queue_ok();
                if pc.pending_to_guest() == 0 {
                    pc.to_guest = leftover;
                    pc.to_guest_off = 0;
                } else {
                    pc.to_guest.extend_from_slice(&leftover);
                }
            }
            return;
        }
        let local_port = self.alloc_port();
        if let Some(c) = self.conns[slot].as_mut() {
            c.st.phase = Phase::Connecting;
            c.st.local_port = local_port;
            c.st.peer_port = port;
            c.to_guest = leftover;
            c.to_guest_off = 0;
        }
    }

    fn alloc_port(&mut self) -> u32 {
        loop {
            let p = self.next_local_port;
            self.next_local_port = p.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            // At most MAX_CONNECTIONS ports are in use, so this ends quickly.
            if !self.conns.iter().flatten().any(|c| c.st.local_port == p) {
                return p;
            }
        }
    }
}

impl VirtioDevice for VsockDevice {
    fn device_type(&self) -> u32 {
        abi::virtio::DEVICE_ID_VSOCK
    }

    fn name(&self) -> &'static str {
        "virtio-vsock"
    }

    fn avail_features(&self) -> u64 {
        features::VERSION_1 | features::RING_EVENT_IDX
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        let cfg = self.cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(usize::try_from(o).ok()?))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
        false
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if self.broken {
            return Err(ActivateError::Broken);
        }
        if ctx.queues.len() != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got: ctx.queues.len(),
            });
        }
        self.acked_features = ctx.acked_features;
        // A restored device continues from its saved ring positions.
        let queues = match self.restored_queues.take() {
            Some(queues) => {
                if let Some(i) = queues.iter().position(|q| !q.is_valid(&ctx.mem)) {
                    return Err(ActivateError::RestoredQueue(i));
                }
                queues
            }
            None => ctx.queues,
        };
        self.active = Some(Active {
            mem: ctx.mem,
            queues,
            interrupt: ctx.interrupt,
        });
        // The event loop thread does the work.
        self.activate_evt.write(1).map_err(ActivateError::EventFd)
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.rst_queue.clear();
        // The guest's sockets are gone: close the clients of connections the guest knew
        // (established ones, parked ones). Clients whose CONNECT has not reached the guest
        // (line still being read, or OP_REQUEST not delivered) stay, and so do those whose
        // OP_REQUEST the driver may have dropped unanswered with its queues: the next driver
        // gets their OP_REQUEST once it is active. A client that connects before the guest
        // driver's start-up reset thus gets `OK`, not EOF.
        for i in 0..self.conns.len() {
            match self.conns[i].as_mut() {
                Some(c) if c.st.phase == Phase::AwaitingConnect => {}
                Some(c) if c.st.phase == Phase::Connecting => c.st.request_sent = false,
                _ => self.drop_conn(i, false),
            }
        }
        // Reset runs on the vCPU thread: let the event loop submit the cancellations.
        let _ = self.activate_evt.write(1);
    }

    fn set_broken(&mut self) {
        self.broken = true;
    }

    fn is_broken(&self) -> bool {
        self.broken
    }
}

/// Queues from a saved state, checked (`Queue::try_from` validates each).
fn restored_queues(saved: &[QueueStateData]) -> Result<Vec<Queue>, VsockError> {
    if saved.len() != QUEUE_SIZES.len() {
        return Err(VsockError::BadState(format!(
            "{} queues, the device has {}",
            saved.len(),
            QUEUE_SIZES.len()
        )));
    }
    saved
        .iter()
        .enumerate()
        .map(|(i, q)| {
            if q.max_size != QUEUE_SIZE {
                return Err(VsockError::BadState(format!(
                    "queue {i} max size {}",
                    q.max_size
                )));
            }
            Queue::try_from(*q).map_err(|e| VsockError::BadState(format!("queue {i}: {e}")))
        })
        .collect()
}

/// Saved connections: established, within the connection cap, no two with the same ports.
fn check_connections(saved: &[ConnectionState]) -> Result<(), VsockError> {
    if saved.len() > MAX_CONNECTIONS {
        return Err(VsockError::BadState(format!(
            "{} connections, at most {MAX_CONNECTIONS}",
            saved.len()
        )));
    }
    for (i, c) in saved.iter().enumerate() {
        if c.phase != Phase::Established {
            return Err(VsockError::BadState(format!(
                "connection {i} is {:?}, not established",
                c.phase
            )));
        }
        if saved[..i]
            .iter()
            .any(|o| o.local_port == c.local_port || o.peer_port == c.peer_port)
        {
            return Err(VsockError::BadState(format!(
                "connection {i} shares a port with another"
            )));
        }
    }
    Ok(())
}

/// What a vsock device restored from a snapshot is built with.
#[derive(Clone, Debug)]
pub struct VsockArgs {
    /// The Unix socket host clients connect to (a fresh path: the restored VM's own).
    pub uds_path: PathBuf,
    /// Where faults go.
    pub faults: FaultSink,
}

impl<'a> fnode_snapshot::Persist<'a> for VsockDevice {
    type State = VsockState;
    type ConstructorArgs = VsockArgs;
    type Error = VsockError;

    fn save(&self) -> VsockState {
        self.state()
    }

    /// A device listening at `args.uds_path` with the saved features and queues (used at its
    /// activation, which the restored transport does) and the saved connections parked.
    fn restore(args: VsockArgs, state: &VsockState) -> Result<Self, VsockError> {
        let mut dev = VsockDevice::new(&args.uds_path, args.faults)?;
        dev.load_state(state)?;
        Ok(dev)
    }
}

impl Drop for VsockDevice {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
