//! What the VM builder calls to give a VM its virtio devices.
//!
//! Slots are fixed so the command line can be composed before the devices exist: the vsock
//! device, when there is one, takes window 0 ([`abi::virtio::MMIO_BASE`], GSI
//! [`abi::virtio::FIRST_IRQ`]).
//!
//! [`attach`] creates each device and its transport, registers the irqfd and ioeventfds with
//! KVM, inserts the transport on the MMIO bus and adds the device to the process's shared
//! device loop ([`SharedLoop`]: one thread for the devices of every VM of the process). The
//! returned [`VirtioDevices`] holds the devices' place on the loop; dropping it takes them off
//! (their fds leave the loop's epoll before the drop returns).

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use fnode_snapshot::Persist;

use super::VirtioDevice as _;
use serde::{Deserialize, Serialize};

use fnode_guest::abi;
use kvm_ioctls::VmFd;
use vm_memory::GuestMemoryMmap;

use super::event_loop::{EventLoopError, Registration, SharedLoop};
use super::mmio::{MmioError, MmioSlot, MmioTransport, TransportArgs, TransportState};
use super::vsock::device::VsockArgs;
use super::vsock::{VsockDevice, VsockError, VsockState};
use super::FaultSink;
use crate::devices::bus::{Bus, BusError, SharedDevice};

/// Window index of the vsock device.
const VSOCK_SLOT: usize = 0;

/// Errors giving a VM its virtio devices.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The vsock device could not be created.
    #[error("cannot create the vsock device")]
    Vsock(#[source] VsockError),
    /// The transport could not be created or registered with KVM.
    #[error("cannot set up the virtio-mmio transport")]
    Transport(#[source] MmioError),
    /// The MMIO window overlaps another device.
    #[error("cannot place the virtio-mmio window on the MMIO bus")]
    Bus(#[source] BusError),
    /// The shared device loop could not start.
    #[error("cannot start the device event loop")]
    EventLoop(#[source] EventLoopError),
    /// A snapshot with a vsock device restored without a socket path for it.
    #[error("the snapshot has a vsock device: give the restored VM a Unix socket path for it")]
    NoVsockPath,
    /// The saved devices are not the ones the VM has.
    #[error("the saved virtio devices do not match the VM's")]
    Mismatch,
}

/// Which virtio devices a VM gets.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceSet<'a> {
    /// Give the guest a vsock device whose host end is this Unix socket path.
    pub vsock_uds: Option<&'a Path>,
}

impl DeviceSet<'_> {
    /// The slots the set occupies, in order.
    fn slots(&self) -> Vec<MmioSlot> {
        let mut slots = Vec::new();
        if self.vsock_uds.is_some() {
            slots.extend(MmioSlot::nth(VSOCK_SLOT));
        }
        slots
    }

    /// `cmdline` with one `virtio_mmio.device=...` word appended per device.
    pub fn cmdline(&self, cmdline: &str) -> String {
        let slots = self.slots();
        if slots.is_empty() {
            return cmdline.to_string();
        }
        let mut out = cmdline.trim_end().to_string();
        for slot in slots {
            if !out.is_empty() {
                out.push(' ');
            }
            out.push_str(&slot.cmdline_word());
        }
        out
    }
}

/// A VM's virtio devices while it lives: their place on the shared device loop and handles
/// on the devices.
#[derive(Debug, Default)]
pub struct VirtioDevices {
    registration: Option<Registration>,
    vsock: Option<Arc<Mutex<VsockDevice>>>,
    vsock_transport: Option<Arc<Mutex<MmioTransport>>>,
}

/// The virtio devices' saved state (a snapshot's part of `DevicesState`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioState {
    /// The vsock device and its transport, if the VM has one.
    pub vsock: Option<VsockSnapshot>,
}

/// The vsock device's two halves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockSnapshot {
    /// The virtio-mmio transport's registers.
    pub transport: TransportState,
    /// The device: live queues, established connections.
    pub device: VsockState,
}

/// The virtio devices held still: while it lives, no device processes a queue or writes
/// guest memory (the event loop waits for the device locks). Taken with the vCPUs paused.
#[derive(Debug)]
pub struct Quiesced<'a> {
    // Lock order: transport, then device (a vCPU's MMIO exit holds the transport and takes
    // the device).
    vsock: Option<(MutexGuard<'a, MmioTransport>, MutexGuard<'a, VsockDevice>)>,
}

impl Quiesced<'_> {
    /// The devices' state.
    pub fn save(&self) -> VirtioState {
        VirtioState {
            vsock: self.vsock.as_ref().map(|(t, d)| VsockSnapshot {
                transport: t.save(),
                device: d.save(),
            }),
        }
    }

    /// Whether a device is broken (a broken device is not saved).
    pub fn any_broken(&self) -> bool {
        // Not `MmioTransport::is_broken`: it locks the device, which this guard holds.
        self.vsock
            .as_ref()
            .is_some_and(|(t, d)| t.save().broken || d.is_broken())
    }

    /// A last look at the devices' host I/O of the last exchange, under the locks (see
    /// [`VsockDevice::settle_host_io`]; wait with [`VirtioDevices::settle_host_io`] first);
    /// call it before [`reset_to`](Self::reset_to).
    pub fn settle_host_io(&mut self, deadline: std::time::Instant) {
        if let Some((_t, d)) = &mut self.vsock {
            d.settle_host_io(deadline);
        }
    }

    /// In-place reset: every device back to `saved` (which they saved earlier).
    pub fn reset_to(&mut self, saved: &VirtioState) -> Result<(), SetupError> {
        match (&mut self.vsock, &saved.vsock) {
            (Some((t, d)), Some(s)) => {
                d.reset_to(&s.device).map_err(SetupError::Vsock)?;
                t.reset_to(&s.transport).map_err(SetupError::Transport)
            }
            (None, None) => Ok(()),
            _ => Err(SetupError::Mismatch),
        }
    }

    /// The guest page frames the devices wrote since the last call (packets and used
    /// rings), sorted, without duplicates.
    pub fn take_written_pages(&mut self) -> Vec<u64> {
        let Some((_t, d)) = &mut self.vsock else {
            return Vec::new();
        };
        let mut pages = d.take_written_pages();
        pages.extend(d.ring_pages());
        pages.sort_unstable();
        pages.dedup();
        pages
    }
}

impl VirtioDevices {
    /// The vsock device, if the VM has one.
    pub fn vsock(&self) -> Option<&Arc<Mutex<VsockDevice>>> {
        self.vsock.as_ref()
    }

    /// Handles on the same devices, without their place on the loop (dropping them stops
    /// nothing): for a thread that must reach the devices while the VM owns them.
    pub fn handles(&self) -> VirtioDevices {
        VirtioDevices {
            registration: None,
            vsock: self.vsock.clone(),
            vsock_transport: self.vsock_transport.clone(),
        }
    }

    /// Before a reset, with the vCPUs out of the guest: lets the devices send everything the
    /// guest queued for the host and the host I/O of the last exchange finish
    /// ([`VsockDevice::settle_step`]), or `deadline`. Each look takes the device's lock
    /// briefly: the event loop, which carries out the host I/O, runs in between.
    pub fn settle_host_io(&self, deadline: std::time::Instant) {
        let Some(d) = &self.vsock else {
            return;
        };
        loop {
            // A poisoned lock means the event loop panicked; the device is still there.
            if d.lock().unwrap_or_else(|p| p.into_inner()).settle_step() {
                return;
            }
            if std::time::Instant::now() >= deadline {
                return;
            }
            std::thread::yield_now();
        }
    }

    /// Attaches a client to the vsock device's parked connection of guest port `port`, with
    /// `first` handed to the guest at once ([`VsockDevice::attach_client`]); `Ok(None)`
    /// without a vsock device or such a connection.
    pub fn attach_vsock_client(
        &self,
        port: u32,
        first: &[u8],
    ) -> Result<Option<std::os::unix::net::UnixStream>, SetupError> {
        let Some(d) = &self.vsock else {
            return Ok(None);
        };
        // A poisoned lock means the event loop panicked; the device is still there.
        d.lock()
            .unwrap_or_else(|p| p.into_inner())
            .attach_client(port, first)
            .map_err(SetupError::Vsock)
    }

    /// Holds every device still (see [`Quiesced`]).
    pub fn quiesce(&self) -> Quiesced<'_> {
        // A poisoned lock means the event loop panicked; the state is still readable.
        let vsock = match (&self.vsock_transport, &self.vsock) {
            (Some(t), Some(d)) => Some((
                t.lock().unwrap_or_else(|p| p.into_inner()),
                d.lock().unwrap_or_else(|p| p.into_inner()),
            )),
            _ => None,
        };
        Quiesced { vsock }
    }

    /// Takes the devices off the shared loop and waits until the loop has let go of them
    /// (dropping does the same). No device handler runs after it returns.
    pub fn stop(&mut self) -> Result<(), EventLoopError> {
        drop(self.registration.take());
        Ok(())
    }

    /// Adds the devices (if there are any, and not yet) to the process's shared device loop,
    /// which then serves their queues and host I/O; a handler that panics there is reported
    /// to `faults`. Until then the guest's notifications wait in the devices' ioeventfds,
    /// and host clients wait in the listener's backlog.
    pub fn serve(&mut self, faults: FaultSink) -> Result<(), SetupError> {
        if self.registration.is_some() {
            return Ok(());
        }
        if let (Some(dev), Some(slot)) = (&self.vsock, MmioSlot::nth(VSOCK_SLOT)) {
            let shared = SharedLoop::get().map_err(SetupError::EventLoop)?;
            let name = format!("virtio-vsock@{:#x}", slot.base);
            self.registration = Some(shared.register(dev.clone(), &name, Some(faults)));
        }
        Ok(())
    }
}

/// Creates the devices in `set` for a VM: transports on `mmio`, irqfds and ioeventfds
/// registered with `vm`, the event loop started. Faults go to `faults`.
pub fn attach(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    set: DeviceSet<'_>,
    faults: FaultSink,
) -> Result<VirtioDevices, SetupError> {
    let mut devices = VirtioDevices::default();
    if let (Some(uds), Some(slot)) = (set.vsock_uds, MmioSlot::nth(VSOCK_SLOT)) {
        let dev = Arc::new(Mutex::new(
            VsockDevice::new(uds, faults.clone()).map_err(SetupError::Vsock)?,
        ));
        let transport = MmioTransport::new(mem.clone(), dev.clone(), slot, faults.clone())
            .map_err(SetupError::Transport)?;
        plug_vsock(&mut devices, vm, mmio, dev, transport, slot)?;
    }
    start(devices, faults)
}

/// Registers the vsock `transport`'s irqfd and ioeventfds with `vm`, puts it on the MMIO bus
/// at `slot` and keeps it and its device in `devices` — for a new VM and a restored one alike.
fn plug_vsock(
    devices: &mut VirtioDevices,
    vm: &VmFd,
    mmio: &mut Bus,
    dev: Arc<Mutex<VsockDevice>>,
    transport: MmioTransport,
    slot: MmioSlot,
) -> Result<(), SetupError> {
    transport
        .register_with_vm(vm)
        .map_err(SetupError::Transport)?;
    let transport = Arc::new(Mutex::new(transport));
    let shared: SharedDevice = transport.clone();
    mmio.insert(shared, slot.base, abi::virtio::MMIO_SIZE)
        .map_err(SetupError::Bus)?;
    devices.vsock = Some(dev);
    devices.vsock_transport = Some(transport);
    Ok(())
}

/// Adds `devices` (if there are any) to the process's shared device loop; a handler that
/// panics there is reported to `faults`.
fn start(mut devices: VirtioDevices, faults: FaultSink) -> Result<VirtioDevices, SetupError> {
    devices.serve(faults)?;
    Ok(devices)
}

/// Builds a restored VM's virtio devices from `saved`, the way [`attach`] builds new ones:
/// the vsock device listens at `vsock_uds` (the caller's fresh path) with its established
/// connection parked, its transport has the saved registers and fresh irqfd/ioeventfds
/// registered with `vm`. They are not served yet: the caller calls
/// [`VirtioDevices::serve`] (a restore does it once the vCPUs are started: joining the loop
/// wakes its thread, which then works alongside the guest rather than before it).
pub fn restore(
    vm: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    saved: &VirtioState,
    vsock_uds: Option<&Path>,
    faults: FaultSink,
) -> Result<VirtioDevices, SetupError> {
    let mut devices = VirtioDevices::default();
    if let Some(vs) = &saved.vsock {
        let uds = vsock_uds.ok_or(SetupError::NoVsockPath)?;
        let slot = MmioSlot::nth(VSOCK_SLOT).ok_or(SetupError::Mismatch)?;
        let args = VsockArgs {
            uds_path: uds.to_path_buf(),
            faults: faults.clone(),
        };
        let dev = Arc::new(Mutex::new(
            VsockDevice::restore(args, &vs.device).map_err(SetupError::Vsock)?,
        ));
        let targs = TransportArgs {
            mem: mem.clone(),
            device: dev.clone(),
            slot,
            faults: faults.clone(),
        };
        let transport =
            MmioTransport::restore(targs, &vs.transport).map_err(SetupError::Transport)?;
        plug_vsock(&mut devices, vm, mmio, dev, transport, slot)?;
    }
    Ok(devices)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::fault_channel;
    use vm_memory::GuestAddress;

    #[test]
    fn cmdline_gets_one_word_per_device() {
        let none = DeviceSet::default();
        assert_eq!(none.cmdline("console=x "), "console=x ");
        let path = Path::new("/tmp/v.sock");
        let set = DeviceSet {
            vsock_uds: Some(path),
        };
        assert_eq!(set.cmdline(""), "virtio_mmio.device=4K@0xd0000000:5");
        assert_eq!(
            set.cmdline("fault=ud2"),
            "fault=ud2 virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn attach_registers_with_kvm_and_answers_on_the_bus() {
        if !crate::kvm::test_support::require_kvm() {
            return;
        }
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut bus = Bus::new();
        let path =
            std::env::temp_dir().join(format!("fnode-vsock-{}-attach.sock", std::process::id()));
        let (sink, faults) = fault_channel().unwrap();
        let mut devices = attach(
            &vm,
            &mem,
            &mut bus,
            DeviceSet {
                vsock_uds: Some(&path),
            },
            sink,
        )
        .unwrap();
        assert!(devices.vsock().is_some());
        assert!(path.exists());
        let mut magic = [0u8; 4];
        assert!(bus.read(abi::virtio::MMIO_BASE, &mut magic));
        assert_eq!(&magic, b"virt");
        let mut id = [0u8; 4];
        assert!(bus.read(abi::virtio::MMIO_BASE + 8, &mut id));
        assert_eq!(u32::from_le_bytes(id), abi::virtio::DEVICE_ID_VSOCK);
        // A second vsock at the same window is refused by the bus.
        let (sink2, _f2) = fault_channel().unwrap();
        let path2 = path.with_extension("2.sock");
        let err = attach(
            &vm,
            &mem,
            &mut bus,
            DeviceSet {
                vsock_uds: Some(&path2),
            },
            sink2,
        )
        .unwrap_err();
        assert!(
            matches!(err, SetupError::Transport(_) | SetupError::Bus(_)),
            "{err:?}"
        );
        devices.stop().unwrap();
        assert!(faults.try_recv().is_none());
    }
}
