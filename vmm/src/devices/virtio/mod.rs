//! Virtio devices on the virtio-mmio transport (virtio 1.x, modern only).
//!
//! * [`mmio`]: the transport, a [`BusDevice`](super::bus::BusDevice) the VMM inserts on the
//!   MMIO bus; it negotiates features, holds the queue configuration and activates the device.
//! * [`queue`]: the checked walk over a descriptor chain every device uses for guest buffers.
//! * [`vsock`]: the socket device (fnode's invocation channel) with Firecracker's hybrid
//!   vsock host end.
//! * [`event_loop`]: the thread that runs the devices' `event-manager` subscribers: one per
//!   process, shared by the devices of every VM in it.
//! * [`setup`]: what the VM builder calls: create the devices, put them on the MMIO bus,
//!   register their irqfds/ioeventfds, add them to the process's event loop.
//!
//! Threads: the transport runs on the vCPU thread (MMIO exits); a device's queues are
//! processed on the event loop thread. Both share the device behind an `Arc<Mutex<_>>`; the
//! transport only locks it for config space, activation and reset. Queue notifications reach
//! the event loop through ioeventfds (no exit to userspace), interrupts reach the guest through
//! an irqfd.
//!
//! Guests are untrusted. A guest that breaks the virtio contract (a descriptor loop, a buffer
//! outside guest memory, a bad packet header, a wrong queue size) makes the device *broken*:
//! it stops processing and sends one [`DeviceFault`] through its [`FaultSink`] (a callback
//! the VMM chooses; [`fault_channel`] gives a channel + eventfd) and the VMM stops the VM
//! with the fault's message.
//!
//! State kept for snapshots lives in plain data structs (`*State`, serde-ready, no fds):
//! [`mmio::TransportState`], [`QueueStateData`], [`vsock::VsockState`].

pub mod event_loop;
pub mod mmio;
pub mod queue;
pub mod setup;
pub mod vsock;

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Device-independent feature bits (virtio 1.x, section 6).
pub mod features {
    use virtio_bindings::bindings::{virtio_config, virtio_ring};

    /// `VIRTIO_F_VERSION_1`: the modern interface. fnode offers and requires it.
    pub const VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;
    /// `VIRTIO_RING_F_EVENT_IDX`: notification suppression through `used_event`/`avail_event`.
    pub const RING_EVENT_IDX: u64 = 1 << virtio_ring::VIRTIO_RING_F_EVENT_IDX;
}

/// Device status bits (virtio 1.x, section 2.1).
pub mod status {
    use virtio_bindings::bindings::virtio_config as c;

    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = c::VIRTIO_CONFIG_S_ACKNOWLEDGE;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = c::VIRTIO_CONFIG_S_DRIVER;
    /// The driver accepted the features it wrote.
    pub const FEATURES_OK: u32 = c::VIRTIO_CONFIG_S_FEATURES_OK;
    /// The driver is set up; the device may use its queues.
    pub const DRIVER_OK: u32 = c::VIRTIO_CONFIG_S_DRIVER_OK;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = c::VIRTIO_CONFIG_S_NEEDS_RESET;
    /// The driver gave up on the device.
    pub const FAILED: u32 = c::VIRTIO_CONFIG_S_FAILED;
}

/// Why the transport raises an interrupt (bits of the InterruptStatus register).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// The device used buffers in a queue.
    Vring,
    /// The configuration changed (or the device needs a reset).
    Config,
}

impl InterruptKind {
    fn bit(self) -> u32 {
        use virtio_bindings::bindings::virtio_mmio as m;
        match self {
            InterruptKind::Vring => m::VIRTIO_MMIO_INT_VRING,
            InterruptKind::Config => m::VIRTIO_MMIO_INT_CONFIG,
        }
    }
}

/// A device's interrupt line: the InterruptStatus bits the transport shows the guest and the
/// irqfd the VMM registered on the device's GSI.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    /// A line signalling `irqfd` (the VMM registers it with `VmFd::register_irqfd`).
    pub fn new(irqfd: EventFd) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets the status bit for `kind` and raises the interrupt.
    pub fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        self.status.fetch_or(kind.bit(), Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The guest acknowledges `bits` (InterruptACK register).
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The irqfd.
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Sets the InterruptStatus register (a restore or reset; the irqchip's own state says
    /// whether the line is pending, so the irqfd is not signalled).
    pub(crate) fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct ActivateContext {
    /// Guest memory the queues and buffers live in.
    pub mem: GuestMemoryMmap,
    /// Features both sides accepted.
    pub acked_features: u64,
    /// The configured queues, validated against `mem` (event index already set).
    pub queues: Vec<Queue>,
    /// The device's interrupt line.
    pub interrupt: Arc<Interrupt>,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured a different number of queues than the device has.
    #[error("the device has {expected} queues, the transport passed {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues it was given.
        got: usize,
    },
    /// An eventfd could not be created or signalled.
    #[error("eventfd operation failed")]
    EventFd(#[source] io::Error),
    /// The device is broken and cannot be activated.
    #[error("the device is broken")]
    Broken,
    /// A queue restored from a snapshot does not lie inside guest memory.
    #[error("restored queue {0} is not inside guest memory")]
    RestoredQueue(usize),
}

/// A virtio device behind the [`mmio::MmioTransport`].
pub trait VirtioDevice: Send {
    /// The virtio device id (19 for vsock).
    fn device_type(&self) -> u32;
    /// Short name used in fault messages (`virtio-vsock`).
    fn name(&self) -> &'static str;
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// The largest size of each queue; the number of queues is the length.
    fn queue_max_sizes(&self) -> &[u16];
    /// One notification eventfd per queue, owned by the device for its whole life (its event
    /// loop subscriber watches them; the transport registers duplicates as ioeventfds).
    fn queue_events(&self) -> &[EventFd];
    /// Reads device config space at `offset` (from 0x100 in the MMIO window).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// The driver writes device config space. Returns false if the device rejects the write
    /// (the transport then marks the device broken).
    fn write_config(&mut self, offset: u64, data: &[u8]) -> bool;
    /// The driver set DRIVER_OK: start using the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Whether [`activate`](Self::activate) ran and no reset happened since.
    fn is_activated(&self) -> bool;
    /// The driver wrote 0 to Status: drop the queues and return to the pre-activation state.
    fn reset(&mut self);
    /// Marks the device broken (the transport found the driver misbehaving): it stops
    /// processing its queues.
    fn set_broken(&mut self);
    /// Whether the device is broken (it stopped processing after a guest error).
    fn is_broken(&self) -> bool;
}

/// One device fault: the device is broken and the VM should stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFault {
    /// The device (`virtio-vsock@0xd0000000`).
    pub device: String,
    /// What the guest did (`tx queue: descriptor chain at head 3 loops`).
    pub message: String,
}

impl fmt::Display for DeviceFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.device, self.message)
    }
}

/// Formats `err` and its chain of causes as one line (`a: b: c`).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Where devices send their faults: a callback the VMM chooses (a channel send, a wake-up of
/// its control loop). Cheap to clone.
#[derive(Clone)]
pub struct FaultSink {
    notify: Arc<dyn Fn(DeviceFault) + Send + Sync>,
}

impl fmt::Debug for FaultSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultSink").finish_non_exhaustive()
    }
}

impl FaultSink {
    /// A sink calling `notify` for each fault (from the vCPU or the event loop thread).
    pub fn new(notify: impl Fn(DeviceFault) + Send + Sync + 'static) -> Self {
        FaultSink {
            notify: Arc::new(notify),
        }
    }

    /// Reports a fault.
    pub fn report(&self, fault: DeviceFault) {
        (self.notify)(fault);
    }
}

/// The VMM's end of the fault channel.
#[derive(Debug)]
pub struct FaultReceiver {
    rx: mpsc::Receiver<DeviceFault>,
    evt: Arc<EventFd>,
}

impl FaultReceiver {
    /// An eventfd that becomes readable when a fault arrives (for epoll).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// The next fault, if one arrived.
    pub fn try_recv(&self) -> Option<DeviceFault> {
        let _ = self.evt.read();
        self.rx.try_recv().ok()
    }

    /// Waits up to `timeout` for a fault.
    pub fn recv_timeout(&self, timeout: Duration) -> Option<DeviceFault> {
        self.rx.recv_timeout(timeout).ok()
    }
}

/// A sink that sends faults down a channel and signals an eventfd (for a VMM that waits
/// with epoll or polls), and the receiving end. A receiver that is gone is not an error.
pub fn fault_channel() -> io::Result<(FaultSink, FaultReceiver)> {
    let evt = Arc::new(EventFd::new(EFD_NONBLOCK)?);
    let (tx, rx) = mpsc::channel();
    let wake = evt.clone();
    let sink = FaultSink::new(move |fault| {
        let _ = tx.send(fault);
        let _ = wake.write(1);
    });
    Ok((sink, FaultReceiver { rx, evt }))
}

/// A queue's state as plain data (virtio-queue's `QueueState`, serde-ready). Restoring goes
/// through `Queue::try_from`, which validates it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueStateData {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring entry the device reads.
    pub next_avail: u16,
    /// Next used-ring entry the device writes.
    pub next_used: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` was negotiated.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// The driver marked the queue ready.
    pub ready: bool,
    /// Guest physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest physical address of the available ring.
    pub avail_ring: u64,
    /// Guest physical address of the used ring.
    pub used_ring: u64,
}

impl From<&Queue> for QueueStateData {
    fn from(q: &Queue) -> Self {
        let s = q.state();
        QueueStateData {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl TryFrom<QueueStateData> for Queue {
    type Error = virtio_queue::Error;

    fn try_from(s: QueueStateData) -> Result<Self, Self::Error> {
        Queue::try_from(QueueState {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        })
    }
}

/// A fresh queue of `max_size` (a power of two <= 32768; devices pass constants).
fn new_queue(max_size: u16) -> Queue {
    // Devices' max sizes are constants checked by their tests; fall back to an empty
    // configuration rather than panicking.
    Queue::new(max_size).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interrupt_sets_and_acks_bits() {
        let irq = Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap());
        irq.trigger(InterruptKind::Vring).unwrap();
        irq.trigger(InterruptKind::Config).unwrap();
        assert_eq!(irq.status(), 3);
        assert_eq!(irq.irqfd().read().unwrap(), 2);
        irq.ack(1);
        assert_eq!(irq.status(), 2);
    }

    #[test]
    fn fault_channel_delivers_and_wakes() {
        let (sink, rx) = fault_channel().unwrap();
        assert_eq!(rx.try_recv(), None);
        sink.report(DeviceFault {
            device: "d".into(),
            message: "m".into(),
        });
        assert_eq!(rx.eventfd().read().unwrap(), 1);
        assert_eq!(rx.try_recv().unwrap().to_string(), "d: m");
    }

    #[test]
    fn queue_state_round_trip() {
        let mut q = Queue::new(16).unwrap();
        q.set_size(8);
        q.set_next_avail(3);
        let s = QueueStateData::from(&q);
        let q2 = Queue::try_from(s).unwrap();
        assert_eq!(QueueStateData::from(&q2), s);
        let bad = QueueStateData { size: 3, ..s };
        assert!(matches!(
            Queue::try_from(bad),
            Err(virtio_queue::Error::InvalidSize)
        ));
    }
}
