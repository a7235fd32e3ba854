//! The virtio-mmio transport (virtio 1.x, section 4.2), modern interface only.
//!
//! One [`MmioTransport`] per device window ([`abi::virtio::MMIO_SIZE`] bytes). It shows the
//! registers of the spec's MMIO layout (Version = 2), negotiates features (a driver that does not
//! accept `VIRTIO_F_VERSION_1` never gets FEATURES_OK), holds each queue's configuration in
//! virtio-queue's `Queue` until DRIVER_OK, checks each value the driver writes (sizes, ring
//! alignment, rings inside guest memory via `Queue::is_valid`) and then activates the device.
//!
//! Notifications: the VMM registers one ioeventfd per queue on the QueueNotify register
//! (datamatch = queue index, [`MmioTransport::register_with_vm`]) so a notify is handled in
//! the kernel and only wakes the event loop; a notify that does trap here (no ioeventfd) is
//! forwarded to the same eventfd. Interrupts: the device sets InterruptStatus bits and signals
//! the irqfd the VMM registered on the window's GSI.
//!
//! Accesses are untrusted. Registers take aligned 4-byte accesses; config space (from 0x100)
//! any width. A driver that breaks the protocol (a wrong width, a write to an unknown or
//! legacy register, queue changes after DRIVER_OK, bad sizes or addresses, status bits cleared
//! without a reset) marks the device broken and the fault goes to the VMM.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use fnode_guest::abi;
use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use virtio_bindings::bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    error_chain, features, new_queue, status, ActivateContext, ActivateError, DeviceFault,
    FaultSink, Interrupt, InterruptKind, QueueStateData, VirtioDevice,
};
use crate::devices::bus::BusDevice;

/// "virt" in little-endian.
const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern virtio-mmio interface.
const MMIO_VERSION: u32 = 2;
/// Vendor id shown to the guest ("FNOD").
const VENDOR_ID: u32 = u32::from_le_bytes(*b"FNOD");
/// Config space starts here.
const CONFIG_OFFSET: u64 = reg::VIRTIO_MMIO_CONFIG as u64;
/// Status bits a driver may set.
const DRIVER_STATUS_BITS: u32 =
    status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK | status::FAILED;

/// Errors of the transport: setting it up, and what a driver can do wrong.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// An eventfd could not be created.
    #[error("creating an eventfd failed")]
    EventFd(#[source] io::Error),
    /// KVM_IRQFD failed.
    #[error("registering the irqfd on GSI {gsi} with KVM failed")]
    RegisterIrqfd {
        /// The GSI.
        gsi: u32,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_IOEVENTFD failed.
    #[error("registering the ioeventfd of queue {queue} at {addr:#x} with KVM failed")]
    RegisterIoevent {
        /// Queue index.
        queue: usize,
        /// Guest physical address of QueueNotify.
        addr: u64,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A register access of the wrong width or alignment.
    #[error(
        "{len}-byte {dir} at register offset {offset:#x}: registers take aligned 4-byte accesses"
    )]
    BadAccess {
        /// "read" or "write".
        dir: &'static str,
        /// Access length.
        len: usize,
        /// Offset in the window.
        offset: u64,
    },
    /// A write to a read-only, legacy or unknown register.
    #[error(
        "write of {value:#x} to register offset {offset:#x}, which is read-only, legacy or unknown"
    )]
    BadRegister {
        /// Offset in the window.
        offset: u64,
        /// The value.
        value: u32,
    },
    /// Driver features written outside DRIVER..FEATURES_OK.
    #[error("driver features written while the status is {status:#x} (write them after DRIVER, before FEATURES_OK)")]
    FeaturesInWrongState {
        /// Device status.
        status: u32,
    },
    /// A queue register written for a queue that does not exist.
    #[error("queue register {offset:#x} written for queue {queue}; the device has {count} queues")]
    NoSuchQueue {
        /// Register offset.
        offset: u64,
        /// QueueSel.
        queue: u32,
        /// Number of queues.
        count: usize,
    },
    /// A queue register written outside FEATURES_OK..DRIVER_OK.
    #[error("queue {queue} register {offset:#x} written while the status is {status:#x} (configure queues after FEATURES_OK, before DRIVER_OK)")]
    QueueInWrongState {
        /// Queue index.
        queue: u32,
        /// Register offset.
        offset: u64,
        /// Device status.
        status: u32,
    },
    /// QueueNum is not a power of two within QueueNumMax.
    #[error("queue {queue} size {size} is not a power of two in 1..={max}")]
    QueueSize {
        /// Queue index.
        queue: u32,
        /// The size written.
        size: u32,
        /// QueueNumMax.
        max: u16,
    },
    /// A ring address breaks its alignment.
    #[error("queue {queue} {ring} address {addr:#x} is misaligned")]
    QueueAlign {
        /// Queue index.
        queue: u32,
        /// "descriptor table", "avail ring" or "used ring".
        ring: &'static str,
        /// The address.
        addr: u64,
    },
    /// QueueReady = 1 with rings outside guest memory.
    #[error("queue {queue} (size {size}, descriptors {desc:#x}, avail {avail:#x}, used {used:#x}) is not inside guest memory")]
    QueueInvalid {
        /// Queue index.
        queue: u32,
        /// Size.
        size: u16,
        /// Descriptor table.
        desc: u64,
        /// Avail ring.
        avail: u64,
        /// Used ring.
        used: u64,
    },
    /// QueueReady written with something other than 0 or 1.
    #[error("queue {queue} QueueReady written with {value}, expected 0 or 1")]
    QueueReadyValue {
        /// Queue index.
        queue: u32,
        /// The value.
        value: u32,
    },
    /// DRIVER_OK while a queue is not ready.
    #[error("DRIVER_OK set while queue {queue} is not ready")]
    QueueNotReady {
        /// Queue index.
        queue: usize,
    },
    /// A status write that is not the spec's sequence.
    #[error("status written {new:#x} after {old:#x}: {why}")]
    StatusSequence {
        /// Status before.
        old: u32,
        /// Status written.
        new: u32,
        /// What rule it breaks.
        why: &'static str,
    },
    /// The driver set FAILED.
    #[error("the guest's driver gave up on the device (status FAILED){reason}")]
    DriverFailed {
        /// Why the transport refused it something, if it did (", after ...").
        reason: String,
    },
    /// The device rejected a config space write.
    #[error(
        "config space write of {len} bytes at {offset:#x} rejected (the config space is read-only)"
    )]
    ConfigWrite {
        /// Offset in config space.
        offset: u64,
        /// Length.
        len: usize,
    },
    /// QueueNotify named a queue that does not exist.
    #[error("QueueNotify for queue {queue}; the device has {count} queues")]
    NotifyNoSuchQueue {
        /// The value written.
        queue: u32,
        /// Number of queues.
        count: usize,
    },
    /// Signalling a queue eventfd failed.
    #[error("signalling queue {queue}'s eventfd failed")]
    Notify {
        /// Queue index.
        queue: u32,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The device's activation failed.
    #[error("activating the device failed")]
    Activate(#[source] ActivateError),
    /// A saved transport state (from a snapshot: untrusted) is not one this device can be in.
    #[error("the saved virtio-mmio transport state is invalid: {0}")]
    BadState(String),
}

/// Where a device window lives: its base address and GSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioSlot {
    /// Guest physical base of the window.
    pub base: u64,
    /// GSI of its interrupt.
    pub irq: u32,
}

impl MmioSlot {
    /// The `i`-th window of the layout in `abi::virtio`, or `None` past `MAX_DEVICES`.
    pub fn nth(i: usize) -> Option<Self> {
        if i >= abi::virtio::MAX_DEVICES {
            return None;
        }
        Some(MmioSlot {
            base: abi::virtio::MMIO_BASE + i as u64 * abi::virtio::MMIO_SIZE,
            irq: abi::virtio::FIRST_IRQ + i as u32,
        })
    }

    /// The kernel command-line word announcing this window:
    /// `virtio_mmio.device=4K@0xd0000000:5`.
    pub fn cmdline_word(&self) -> String {
        cmdline_word(self.base, abi::virtio::MMIO_SIZE, self.irq)
    }
}

/// The `virtio_mmio.device=<size>@<base>:<irq>` word for a window.
pub fn cmdline_word(base: u64, size: u64, irq: u32) -> String {
    let size = if size & ((1 << 20) - 1) == 0 {
        format!("{}M", size >> 20)
    } else if size & ((1 << 10) - 1) == 0 {
        format!("{}K", size >> 10)
    } else {
        size.to_string()
    };
    format!("{}={size}@{base:#x}:{irq}", abi::virtio::CMDLINE_KEY)
}

/// The transport's registers as plain data (for snapshots).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver wrote.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// Device status as the driver set it.
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The device is broken (stays so until the VM stops).
    pub broken: bool,
    /// Each queue's configuration as the driver wrote it (the device owns the live position
    /// after activation; see the device's own state).
    pub queues: Vec<QueueStateData>,
}

/// The virtio-mmio transport of one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    label: String,
    slot: MmioSlot,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    /// How many queue notification eventfds the device has (the transport uses the
    /// device's own: KVM holds them once registered, and a copy here would cost an fd each
    /// per VM).
    queue_evt_count: usize,
    queues: Vec<Queue>,
    max_sizes: Vec<u16>,
    device_type: u32,
    avail_features: u64,
    state: TransportState,
    /// Why FEATURES_OK was refused, for the fault message if the driver then gives up.
    refused: Option<String>,
    faults: FaultSink,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("label", &self.label)
            .field("slot", &self.slot)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

fn lock<'a>(
    device: &'a Mutex<dyn VirtioDevice + 'static>,
) -> MutexGuard<'a, dyn VirtioDevice + 'static> {
    // A poisoned lock means the event loop panicked; the device data is still usable and the
    // VMM learns of the panic from the event loop thread.
    device.lock().unwrap_or_else(|p| p.into_inner())
}

impl MmioTransport {
    /// A transport for `device` at `slot`, its buffers in `mem`; faults go to `faults`.
    pub fn new(
        mem: GuestMemoryMmap,
        device: Arc<Mutex<dyn VirtioDevice>>,
        slot: MmioSlot,
        faults: FaultSink,
    ) -> Result<Self, MmioError> {
        let (device_type, avail_features, max_sizes, name, queue_evt_count) = {
            let d = lock(&device);
            let count = d.queue_events().len();
            (
                d.device_type(),
                d.avail_features(),
                d.queue_max_sizes().to_vec(),
                d.name(),
                count,
            )
        };
        let irqfd = EventFd::new(EFD_NONBLOCK).map_err(MmioError::EventFd)?;
        let queues: Vec<Queue> = max_sizes.iter().map(|&m| new_queue(m)).collect();
        Ok(MmioTransport {
            device,
            label: format!("{name}@{:#x}", slot.base),
            slot,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            queue_evt_count,
            queues,
            max_sizes,
            device_type,
            avail_features,
            state: TransportState::default(),
            refused: None,
            faults,
        })
    }

    /// The window this transport serves.
    pub fn slot(&self) -> MmioSlot {
        self.slot
    }

    /// The irqfd (for `VmFd::register_irqfd` on `slot().irq`).
    pub fn irqfd(&self) -> &EventFd {
        self.interrupt.irqfd()
    }

    /// Registers the irqfd and the device's per-queue ioeventfds (queue `i`'s at
    /// `slot().base + 0x50`, datamatch `i`) with KVM.
    pub fn register_with_vm(&self, vm: &VmFd) -> Result<(), MmioError> {
        vm.register_irqfd(self.irqfd(), self.slot.irq)
            .map_err(|source| MmioError::RegisterIrqfd {
                gsi: self.slot.irq,
                source,
            })?;
        let addr = self.slot.base + u64::from(reg::VIRTIO_MMIO_QUEUE_NOTIFY);
        let device = lock(&self.device);
        for (i, evt) in device.queue_events().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(addr), i as u32)
                .map_err(|source| MmioError::RegisterIoevent {
                    queue: i,
                    addr,
                    source,
                })?;
        }
        Ok(())
    }

    /// The kernel command-line word announcing this device.
    pub fn cmdline_word(&self) -> String {
        self.slot.cmdline_word()
    }

    /// The registers as plain data.
    pub fn state(&self) -> TransportState {
        TransportState {
            interrupt_status: self.interrupt.status(),
            queues: self.queues.iter().map(QueueStateData::from).collect(),
            ..self.state.clone()
        }
    }

    /// Whether the device is broken (by the transport or by the device itself).
    pub fn is_broken(&self) -> bool {
        self.state.broken || lock(&self.device).is_broken()
    }

    fn fail(&mut self, err: MmioError) {
        if self.state.broken {
            return;
        }
        self.state.broken = true;
        lock(&self.device).set_broken();
        self.faults.report(DeviceFault {
            device: self.label.clone(),
            message: error_chain(&err),
        });
        // Tell the driver too (virtio 1.x, 2.1.2: DEVICE_NEEDS_RESET + config interrupt).
        let _ = self.interrupt.trigger(InterruptKind::Config);
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let sel = self.state.queue_sel as usize;
        let q = self.queues.get(sel);
        match offset as u32 {
            reg::VIRTIO_MMIO_MAGIC_VALUE => MAGIC_VALUE,
            reg::VIRTIO_MMIO_VERSION => MMIO_VERSION,
            reg::VIRTIO_MMIO_DEVICE_ID => self.device_type,
            reg::VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            reg::VIRTIO_MMIO_DEVICE_FEATURES => match self.state.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            reg::VIRTIO_MMIO_QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::VIRTIO_MMIO_QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            reg::VIRTIO_MMIO_STATUS => {
                let mut s = self.state.status;
                if self.is_broken() {
                    s |= status::DEVICE_NEEDS_RESET;
                }
                s
            }
            reg::VIRTIO_MMIO_CONFIG_GENERATION => 0,
            // Write-only and reserved registers read as zero.
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) -> Result<(), MmioError> {
        let st = self.state.status;
        match offset as u32 {
            reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.state.device_features_sel = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.state.driver_features_sel = v,
            reg::VIRTIO_MMIO_DRIVER_FEATURES => {
                if st & status::DRIVER == 0 || st & status::FEATURES_OK != 0 {
                    return Err(MmioError::FeaturesInWrongState { status: st });
                }
                let a = &mut self.state.acked_features;
                match self.state.driver_features_sel {
                    0 => *a = (*a & !0xffff_ffff) | u64::from(v),
                    1 => *a = (*a & 0xffff_ffff) | (u64::from(v) << 32),
                    // Features above bit 63 do not exist; accepting none of them is fine.
                    _ if v == 0 => {}
                    _ => {
                        self.refused = Some(format!(
                            ", after it accepted features {v:#x} in word {} the device does not offer",
                            self.state.driver_features_sel
                        ));
                    }
                }
            }
            reg::VIRTIO_MMIO_QUEUE_SEL => self.state.queue_sel = v,
            reg::VIRTIO_MMIO_QUEUE_NUM
            | reg::VIRTIO_MMIO_QUEUE_READY
            | reg::VIRTIO_MMIO_QUEUE_DESC_LOW
            | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | reg::VIRTIO_MMIO_QUEUE_USED_LOW
            | reg::VIRTIO_MMIO_QUEUE_USED_HIGH => self.write_queue_reg(offset, v)?,
            reg::VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Only without the ioeventfd (KVM takes these writes itself otherwise).
                let count = self.queue_evt_count;
                let device = lock(&self.device);
                let evt = device
                    .queue_events()
                    .get(v as usize)
                    .ok_or(MmioError::NotifyNoSuchQueue { queue: v, count })?;
                evt.write(1)
                    .map_err(|source| MmioError::Notify { queue: v, source })?;
            }
            reg::VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            reg::VIRTIO_MMIO_STATUS => self.write_status(v)?,
            _ => return Err(MmioError::BadRegister { offset, value: v }),
        }
        Ok(())
    }

    fn write_queue_reg(&mut self, offset: u64, v: u32) -> Result<(), MmioError> {
        let st = self.state.status;
        let sel = self.state.queue_sel;
        let count = self.queues.len();
        let queue = self
            .queues
            .get_mut(sel as usize)
            .ok_or(MmioError::NoSuchQueue {
                offset,
                queue: sel,
                count,
            })?;
        // Linux disables queues (QueueReady = 0) after a reset; anything else needs
        // FEATURES_OK and must come before DRIVER_OK.
        let disabling = offset == u64::from(reg::VIRTIO_MMIO_QUEUE_READY) && v == 0;
        let configuring = st & status::FEATURES_OK != 0;
        if st & status::DRIVER_OK != 0 || !(configuring || disabling) {
            return Err(MmioError::QueueInWrongState {
                queue: sel,
                offset,
                status: st,
            });
        }
        let low = |old: u64| (old & !0xffff_ffff) | u64::from(v);
        let high = |old: u64| (old & 0xffff_ffff) | (u64::from(v) << 32);
        let align = |ring| {
            move |_| MmioError::QueueAlign {
                queue: sel,
                ring,
                addr: 0,
            }
        };
        match offset as u32 {
            reg::VIRTIO_MMIO_QUEUE_NUM => {
                let max = queue.max_size();
                let size = u16::try_from(v).map_err(|_| MmioError::QueueSize {
                    queue: sel,
                    size: v,
                    max,
                })?;
                queue.try_set_size(size).map_err(|_| MmioError::QueueSize {
                    queue: sel,
                    size: v,
                    max,
                })?;
            }
            reg::VIRTIO_MMIO_QUEUE_READY => match v {
                0 => queue.set_ready(false),
                1 => {
                    // `is_valid` also requires the ready flag.
                    queue.set_ready(true);
                    if !queue.is_valid(&self.mem) {
                        queue.set_ready(false);
                        return Err(MmioError::QueueInvalid {
                            queue: sel,
                            size: queue.size(),
                            desc: queue.desc_table(),
                            avail: queue.avail_ring(),
                            used: queue.used_ring(),
                        });
                    }
                }
                _ => {
                    return Err(MmioError::QueueReadyValue {
                        queue: sel,
                        value: v,
                    })
                }
            },
            reg::VIRTIO_MMIO_QUEUE_DESC_LOW | reg::VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                let addr = if offset as u32 == reg::VIRTIO_MMIO_QUEUE_DESC_LOW {
                    low(queue.desc_table())
                } else {
                    high(queue.desc_table())
                };
                queue
                    .try_set_desc_table_address(GuestAddress(addr))
                    .map_err(align("descriptor table"))
                    .map_err(|e| with_addr(e, addr))?;
            }
            reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW | reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                let addr = if offset as u32 == reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW {
                    low(queue.avail_ring())
                } else {
                    high(queue.avail_ring())
                };
                queue
                    .try_set_avail_ring_address(GuestAddress(addr))
                    .map_err(align("avail ring"))
                    .map_err(|e| with_addr(e, addr))?;
            }
            _ => {
                let addr = if offset as u32 == reg::VIRTIO_MMIO_QUEUE_USED_LOW {
                    low(queue.used_ring())
                } else {
                    high(queue.used_ring())
                };
                queue
                    .try_set_used_ring_address(GuestAddress(addr))
                    .map_err(align("used ring"))
                    .map_err(|e| with_addr(e, addr))?;
            }
        }
        Ok(())
    }

    fn write_status(&mut self, new: u32) -> Result<(), MmioError> {
        if new == 0 {
            self.reset();
            return Ok(());
        }
        let old = self.state.status;
        let seq = |why| MmioError::StatusSequence { old, new, why };
        if new & !DRIVER_STATUS_BITS != 0 {
            return Err(seq(
                "only ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK and FAILED are driver bits",
            ));
        }
        if new & status::FAILED != 0 {
            // Drivers write FAILED alone or ORed with what they had: either way they gave up.
            self.state.status = new;
            let reason = self.refused.take().unwrap_or_default();
            return Err(MmioError::DriverFailed { reason });
        }
        if new & old != old {
            return Err(seq(
                "status bits can only be cleared by a reset (writing 0)",
            ));
        }
        let added = new & !old;
        let has = |bit| new & bit != 0;
        if has(status::DRIVER) && !has(status::ACKNOWLEDGE) {
            return Err(seq("DRIVER needs ACKNOWLEDGE"));
        }
        if has(status::FEATURES_OK) && !has(status::DRIVER) {
            return Err(seq("FEATURES_OK needs DRIVER"));
        }
        if has(status::DRIVER_OK) && !has(status::FEATURES_OK) {
            return Err(seq("DRIVER_OK needs FEATURES_OK"));
        }
        let mut new = new;
        if added & status::FEATURES_OK != 0 {
            let acked = self.state.acked_features;
            if acked & features::VERSION_1 == 0 {
                self.refused =
                    Some(", after it did not accept VIRTIO_F_VERSION_1 (fnode serves modern virtio only)".into());
                new &= !status::FEATURES_OK;
            } else if acked & !self.avail_features != 0 {
                self.refused = Some(format!(
                    ", after it accepted features {:#x} the device does not offer",
                    acked & !self.avail_features
                ));
                new &= !status::FEATURES_OK;
            } else if self.refused.is_some() {
                new &= !status::FEATURES_OK;
            }
        }
        if added & status::DRIVER_OK != 0 {
            self.activate()?;
        }
        self.state.status = new;
        Ok(())
    }

    fn activate(&mut self) -> Result<(), MmioError> {
        if let Some(i) = self.queues.iter().position(|q| !q.ready()) {
            return Err(MmioError::QueueNotReady { queue: i });
        }
        let event_idx = self.state.acked_features & features::RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            // Copy through the validated state conversion (`Queue` is not `Clone`).
            let mut q = Queue::try_from(q.state()).map_err(|_| MmioError::QueueNotReady {
                queue: queues.len(),
            })?;
            q.set_event_idx(event_idx);
            queues.push(q);
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            acked_features: self.state.acked_features,
            queues,
            interrupt: self.interrupt.clone(),
        };
        lock(&self.device)
            .activate(ctx)
            .map_err(MmioError::Activate)
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        self.queues = self.max_sizes.iter().map(|&m| new_queue(m)).collect();
        let broken = self.state.broken;
        self.state = TransportState {
            broken,
            ..TransportState::default()
        };
        self.refused = None;
        self.interrupt.clear();
    }
}

/// The live resources a transport restored from a snapshot is built with.
#[derive(Clone)]
pub struct TransportArgs {
    /// Guest memory (the restored VM's).
    pub mem: GuestMemoryMmap,
    /// The device behind the transport, restored first.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// The window.
    pub slot: MmioSlot,
    /// Where faults go.
    pub faults: FaultSink,
}

impl std::fmt::Debug for TransportArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransportArgs")
            .field("slot", &self.slot)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Puts the registers back to `saved`, checking it first (it comes from a file). The
    /// device is left alone.
    fn load_state(&mut self, saved: &TransportState) -> Result<(), MmioError> {
        let bad = |what: String| MmioError::BadState(what);
        if saved.broken {
            return Err(bad("the device was broken when it was saved".into()));
        }
        if saved.status & !DRIVER_STATUS_BITS != 0 || saved.status & status::FAILED != 0 {
            return Err(bad(format!("device status {:#x}", saved.status)));
        }
        if saved.acked_features & !self.avail_features != 0 {
            return Err(bad(format!(
                "features {:#x} the device does not offer",
                saved.acked_features & !self.avail_features
            )));
        }
        if saved.interrupt_status & !3 != 0 {
            return Err(bad(format!(
                "interrupt status {:#x}",
                saved.interrupt_status
            )));
        }
        if saved.queues.len() != self.max_sizes.len() {
            return Err(bad(format!(
                "{} queues, the device has {}",
                saved.queues.len(),
                self.max_sizes.len()
            )));
        }
        let mut queues = Vec::with_capacity(saved.queues.len());
        for (i, (q, &max)) in saved.queues.iter().zip(&self.max_sizes).enumerate() {
            if q.max_size != max {
                return Err(bad(format!(
                    "queue {i} max size {}, the device's is {max}",
                    q.max_size
                )));
            }
            let queue = Queue::try_from(*q).map_err(|e| bad(format!("queue {i}: {e}")))?;
            if queue.ready() && !queue.is_valid(&self.mem) {
                return Err(bad(format!("queue {i} is not inside guest memory")));
            }
            queues.push(queue);
        }
        self.queues = queues;
        self.state = TransportState {
            queues: Vec::new(),
            ..saved.clone()
        };
        self.refused = None;
        self.interrupt.set_status(saved.interrupt_status);
        Ok(())
    }

    /// In-place reset: the registers go back to `saved` (a state this transport saved
    /// earlier). The device is reset separately; it is not activated again.
    pub fn reset_to(&mut self, saved: &TransportState) -> Result<(), MmioError> {
        self.load_state(saved)
    }
}

impl<'a> fnode_snapshot::Persist<'a> for MmioTransport {
    type State = TransportState;
    type ConstructorArgs = TransportArgs;
    type Error = MmioError;

    fn save(&self) -> TransportState {
        self.state()
    }

    /// A transport for `args.device` with the registers of `state`; a device the driver had
    /// set up (DRIVER_OK) is activated with the restored queues. The device's own state is
    /// restored first, by the caller.
    fn restore(args: TransportArgs, state: &TransportState) -> Result<Self, MmioError> {
        let mut t = MmioTransport::new(args.mem, args.device, args.slot, args.faults)?;
        t.load_state(state)?;
        if state.status & status::DRIVER_OK != 0 {
            t.activate()?;
        }
        Ok(t)
    }
}

/// Puts the offending address into an alignment error.
fn with_addr(e: MmioError, addr: u64) -> MmioError {
    match e {
        MmioError::QueueAlign { queue, ring, .. } => MmioError::QueueAlign { queue, ring, addr },
        e => e,
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            self.fail(MmioError::BadAccess {
                dir: "read",
                len: data.len(),
                offset,
            });
            return;
        }
        let v = self.read_reg(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if self.state.broken {
            return;
        }
        if offset >= CONFIG_OFFSET {
            let ok = lock(&self.device).write_config(offset - CONFIG_OFFSET, data);
            if !ok {
                self.fail(MmioError::ConfigWrite {
                    offset: offset - CONFIG_OFFSET,
                    len: data.len(),
                });
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.fail(MmioError::BadAccess {
                dir: "write",
                len: data.len(),
                offset,
            });
            return;
        };
        if offset & 3 != 0 {
            self.fail(MmioError::BadAccess {
                dir: "write",
                len: 4,
                offset,
            });
            return;
        }
        if let Err(e) = self.write_reg(offset, u32::from_le_bytes(bytes)) {
            self.fail(e);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::queue::tests::{test_mem, TestQueue};
    use crate::devices::virtio::{fault_channel, FaultReceiver};

    /// A device with two queues and an 8-byte config space, recording what happens to it.
    #[derive(Debug)]
    pub(crate) struct DummyDevice {
        pub activated: Option<ActivateContext>,
        pub resets: u32,
        pub broken: bool,
        pub evts: Vec<EventFd>,
    }

    impl Default for DummyDevice {
        fn default() -> Self {
            let evts = (0..2)
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect();
            DummyDevice {
                activated: None,
                resets: 0,
                broken: false,
                evts,
            }
        }
    }

    impl VirtioDevice for DummyDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn name(&self) -> &'static str {
            "virtio-dummy"
        }
        fn avail_features(&self) -> u64 {
            features::VERSION_1 | features::RING_EVENT_IDX
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let cfg = 0x1122_3344_5566_7788u64.to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = cfg.get(offset as usize + i).copied().unwrap_or(0);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) -> bool {
            false
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            self.activated = Some(ctx);
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.activated.is_some()
        }
        fn reset(&mut self) {
            self.activated = None;
            self.resets += 1;
        }
        fn set_broken(&mut self) {
            self.broken = true;
        }
        fn is_broken(&self) -> bool {
            self.broken
        }
    }

    /// A transport plus the guest-side helpers to program it.
    pub(crate) struct Harness {
        pub t: MmioTransport,
        pub dev: Arc<Mutex<DummyDevice>>,
        pub faults: FaultReceiver,
    }

    pub(crate) fn w(t: &mut MmioTransport, off: u32, v: u32) {
        t.write(u64::from(off), &v.to_le_bytes());
    }

    pub(crate) fn r(t: &mut MmioTransport, off: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    /// Programs queue `i` from `tq` the way Linux does.
    pub(crate) fn setup_queue(t: &mut MmioTransport, i: u32, tq: &TestQueue) {
        w(t, reg::VIRTIO_MMIO_QUEUE_SEL, i);
        assert_eq!(r(t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
        w(t, reg::VIRTIO_MMIO_QUEUE_NUM, u32::from(tq.size));
        w(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, tq.desc as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, (tq.desc >> 32) as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, tq.avail as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0);
        w(t, reg::VIRTIO_MMIO_QUEUE_USED_LOW, tq.used as u32);
        w(t, reg::VIRTIO_MMIO_QUEUE_USED_HIGH, 0);
        w(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns whether FEATURES_OK stuck.
    pub(crate) fn negotiate(t: &mut MmioTransport, driver_features: u64) -> bool {
        w(t, reg::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
        w(
            t,
            reg::VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        w(t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let hi = r(t, reg::VIRTIO_MMIO_DEVICE_FEATURES);
        w(t, reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let lo = r(t, reg::VIRTIO_MMIO_DEVICE_FEATURES);
        let offered = (u64::from(hi) << 32) | u64::from(lo);
        let f = driver_features & offered;
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, f as u32);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, (f >> 32) as u32);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        w(t, reg::VIRTIO_MMIO_STATUS, s);
        r(t, reg::VIRTIO_MMIO_STATUS) & status::FEATURES_OK != 0
    }

    fn harness() -> Harness {
        let dev = Arc::new(Mutex::new(DummyDevice::default()));
        let (sink, faults) = fault_channel().unwrap();
        let slot = MmioSlot::nth(0).unwrap();
        let t = MmioTransport::new(test_mem(), dev.clone(), slot, sink).unwrap();
        Harness { t, dev, faults }
    }

    fn queues() -> (TestQueue, TestQueue) {
        (TestQueue::new(0x1000, 16), TestQueue::new(0x2000, 16))
    }

    #[test]
    fn identification_registers() {
        let mut h = harness();
        let t = &mut h.t;
        assert_eq!(r(t, reg::VIRTIO_MMIO_MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(r(t, reg::VIRTIO_MMIO_VERSION), 2);
        assert_eq!(r(t, reg::VIRTIO_MMIO_DEVICE_ID), 42);
        w(t, reg::VIRTIO_MMIO_QUEUE_SEL, 1);
        assert_eq!(r(t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
        w(t, reg::VIRTIO_MMIO_QUEUE_SEL, 2);
        assert_eq!(r(t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        let mut b = [0u8; 2];
        t.read(0x102, &mut b);
        assert_eq!(b, [0x66, 0x55]);
        let mut b = [0u8; 8];
        t.read(0x100, &mut b);
        assert_eq!(u64::from_le_bytes(b), 0x1122_3344_5566_7788);
        assert!(h.faults.try_recv().is_none());
    }

    #[test]
    fn full_negotiation_activates_with_event_idx() {
        let mut h = harness();
        let (q0, q1) = queues();
        assert!(negotiate(
            &mut h.t,
            features::VERSION_1 | features::RING_EVENT_IDX
        ));
        setup_queue(&mut h.t, 0, &q0);
        setup_queue(&mut h.t, 1, &q1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        w(&mut h.t, reg::VIRTIO_MMIO_STATUS, s);
        assert_eq!(r(&mut h.t, reg::VIRTIO_MMIO_STATUS), s);
        {
            let d = h.dev.lock().unwrap();
            let ctx = d.activated.as_ref().unwrap();
            assert_eq!(
                ctx.acked_features,
                features::VERSION_1 | features::RING_EVENT_IDX
            );
            assert_eq!(ctx.queues.len(), 2);
            assert!(ctx.queues[1].event_idx_enabled());
            assert_eq!(ctx.queues[1].desc_table(), q1.desc);
            ctx.interrupt.trigger(InterruptKind::Vring).unwrap();
        }
        // A notify that traps (no ioeventfd) reaches the device's eventfd (the transport
        // takes the device's lock for it, as on a vCPU thread).
        w(&mut h.t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 1);
        assert_eq!(h.dev.lock().unwrap().evts[1].read().unwrap(), 1);
        assert_eq!(r(&mut h.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        w(&mut h.t, reg::VIRTIO_MMIO_INTERRUPT_ACK, 1);
        assert_eq!(r(&mut h.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
        // Reset.
        w(&mut h.t, reg::VIRTIO_MMIO_STATUS, 0);
        assert_eq!(r(&mut h.t, reg::VIRTIO_MMIO_STATUS), 0);
        assert_eq!(h.dev.lock().unwrap().resets, 1);
        assert!(!h.dev.lock().unwrap().is_activated());
        w(&mut h.t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(r(&mut h.t, reg::VIRTIO_MMIO_QUEUE_READY), 0);
        assert!(h.faults.try_recv().is_none());
        assert!(!h.t.is_broken());
    }

    #[test]
    fn transport_state_round_trip() {
        use fnode_snapshot::Persist;
        let mut h = harness();
        let (q0, q1) = queues();
        assert!(negotiate(
            &mut h.t,
            features::VERSION_1 | features::RING_EVENT_IDX
        ));
        setup_queue(&mut h.t, 0, &q0);
        setup_queue(&mut h.t, 1, &q1);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        w(&mut h.t, reg::VIRTIO_MMIO_STATUS, s);
        h.dev
            .lock()
            .unwrap()
            .activated
            .as_ref()
            .unwrap()
            .interrupt
            .trigger(InterruptKind::Vring)
            .unwrap();
        let saved = h.t.save();
        assert_eq!(saved.status, s);
        assert_eq!(saved.interrupt_status, 1);

        // Restored onto a new device: same registers, and the device is activated.
        let dev = Arc::new(Mutex::new(DummyDevice::default()));
        let (sink, faults) = fault_channel().unwrap();
        let args = TransportArgs {
            mem: test_mem(),
            device: dev.clone(),
            slot: MmioSlot::nth(0).unwrap(),
            faults: sink,
        };
        let mut t = MmioTransport::restore(args.clone(), &saved).unwrap();
        assert_eq!(t.save(), saved);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_STATUS), s);
        assert_eq!(r(&mut t, reg::VIRTIO_MMIO_INTERRUPT_STATUS), 1);
        {
            let d = dev.lock().unwrap();
            let ctx = d.activated.as_ref().unwrap();
            assert_eq!(ctx.queues[1].desc_table(), q1.desc);
            assert!(ctx.queues[0].event_idx_enabled());
        }
        // In-place reset back to the saved registers.
        w(&mut t, reg::VIRTIO_MMIO_INTERRUPT_ACK, 1);
        t.reset_to(&saved).unwrap();
        assert_eq!(t.save(), saved);
        assert!(faults.try_recv().is_none());

        // Garbage is refused, not trusted.
        let cases: Vec<TransportState> = vec![
            TransportState {
                broken: true,
                ..saved.clone()
            },
            TransportState {
                status: 0x80,
                ..saved.clone()
            },
            TransportState {
                acked_features: 1 << 40,
                ..saved.clone()
            },
            TransportState {
                queues: saved.queues[..1].to_vec(),
                ..saved.clone()
            },
            TransportState {
                queues: vec![
                    QueueStateData {
                        size: 3,
                        ..saved.queues[0]
                    },
                    saved.queues[1],
                ],
                ..saved.clone()
            },
            TransportState {
                queues: vec![
                    QueueStateData {
                        used_ring: 1 << 40,
                        ..saved.queues[0]
                    },
                    saved.queues[1],
                ],
                ..saved.clone()
            },
        ];
        for bad in cases {
            let err = MmioTransport::restore(args.clone(), &bad).unwrap_err();
            assert!(matches!(err, MmioError::BadState(_)), "{err:?}");
        }
    }

    #[test]
    fn legacy_driver_is_refused_features_ok() {
        let mut h = harness();
        assert!(!negotiate(&mut h.t, features::RING_EVENT_IDX));
        assert!(h.faults.try_recv().is_none());
        // The driver gives up (writing FAILED alone, as fnode's guest driver does): the
        // fault says why.
        w(&mut h.t, reg::VIRTIO_MMIO_STATUS, status::FAILED);
        let f = h.faults.try_recv().unwrap();
        assert_eq!(f.device, "virtio-dummy@0xd0000000");
        assert!(f.message.contains("VIRTIO_F_VERSION_1"), "{f}");
    }

    /// Runs `bad` after a good negotiation and returns the fault it caused.
    fn fault_after(bad: impl FnOnce(&mut MmioTransport)) -> String {
        let mut h = harness();
        assert!(negotiate(&mut h.t, features::VERSION_1));
        bad(&mut h.t);
        let f = h.faults.try_recv().expect("no fault");
        assert!(h.t.is_broken());
        assert!(h.dev.lock().unwrap().broken);
        assert_ne!(
            r(&mut h.t, reg::VIRTIO_MMIO_STATUS) & status::DEVICE_NEEDS_RESET,
            0
        );
        // Later writes are ignored and cause no second fault.
        w(&mut h.t, reg::VIRTIO_MMIO_STATUS, 0xff);
        assert!(h.faults.try_recv().is_none());
        f.message
    }

    #[test]
    fn queue_setup_garbage_breaks_the_device() {
        let m = fault_after(|t| {
            w(t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
            w(t, reg::VIRTIO_MMIO_QUEUE_NUM, 12);
        });
        assert_eq!(m, "queue 0 size 12 is not a power of two in 1..=16");
        let m = fault_after(|t| w(t, reg::VIRTIO_MMIO_QUEUE_NUM, 32));
        assert!(m.contains("size 32"), "{m}");
        let m = fault_after(|t| w(t, reg::VIRTIO_MMIO_QUEUE_NUM, 0x1_0000));
        assert!(m.contains("size 65536"), "{m}");
        let m = fault_after(|t| w(t, reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1004));
        assert_eq!(m, "queue 0 descriptor table address 0x1004 is misaligned");
        let m = fault_after(|t| {
            w(t, reg::VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x10);
            w(t, reg::VIRTIO_MMIO_QUEUE_READY, 1);
        });
        assert!(m.contains("not inside guest memory"), "{m}");
        let m = fault_after(|t| {
            w(t, reg::VIRTIO_MMIO_QUEUE_SEL, 7);
            w(t, reg::VIRTIO_MMIO_QUEUE_NUM, 8);
        });
        assert!(m.contains("queue 7"), "{m}");
        let m = fault_after(|t| {
            let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
            w(t, reg::VIRTIO_MMIO_STATUS, s);
        });
        assert_eq!(m, "DRIVER_OK set while queue 0 is not ready");
        let m = fault_after(|t| {
            let (q0, q1) = queues();
            setup_queue(t, 0, &q0);
            setup_queue(t, 1, &q1);
            let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
            w(t, reg::VIRTIO_MMIO_STATUS, s);
            w(t, reg::VIRTIO_MMIO_QUEUE_NUM, 8);
        });
        assert!(
            m.contains("configure queues after FEATURES_OK, before DRIVER_OK"),
            "{m}"
        );
    }

    #[test]
    fn register_garbage_breaks_the_device() {
        let m = fault_after(|t| t.write(0x70, &[1, 2]));
        assert_eq!(
            m,
            "2-byte write at register offset 0x70: registers take aligned 4-byte accesses"
        );
        let m = fault_after(|t| t.read(0x71, &mut [0u8; 4]));
        assert!(m.contains("read at register offset 0x71"), "{m}");
        let m = fault_after(|t| w(t, reg::VIRTIO_MMIO_QUEUE_PFN, 1));
        assert!(m.contains("legacy or unknown"), "{m}");
        let m = fault_after(|t| w(t, reg::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE));
        assert!(m.contains("only be cleared by a reset"), "{m}");
        let m = fault_after(|t| w(t, reg::VIRTIO_MMIO_DRIVER_FEATURES, 1));
        assert!(m.contains("before FEATURES_OK"), "{m}");
        let m = fault_after(|t| w(t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, 9));
        assert_eq!(m, "QueueNotify for queue 9; the device has 2 queues");
        let m = fault_after(|t| t.write(0x100, &[1]));
        assert!(m.contains("config space write"), "{m}");
        let m = fault_after(|t| w(t, reg::VIRTIO_MMIO_STATUS, 0xf | 0x40));
        assert!(m.contains("driver bits"), "{m}");
    }

    #[test]
    fn cmdline_words() {
        let slot = MmioSlot::nth(1).unwrap();
        assert_eq!(slot.cmdline_word(), "virtio_mmio.device=4K@0xd0001000:6");
        assert_eq!(
            cmdline_word(0x1000, 0x10_0000, 9),
            "virtio_mmio.device=1M@0x1000:9"
        );
        assert_eq!(MmioSlot::nth(abi::virtio::MAX_DEVICES), None);
    }
}
