//! Emulated devices and the buses that route guest accesses to them.
//!
//! - [`bus`]: the PIO and MMIO buses and the [`bus::BusDevice`] trait every device implements.
//! - [`serial`]: the COM1 16550A console.
//! - [`exit`]: the exit port the guest ends the VM through.
//! - [`virtio`]: the virtio-mmio transport, the vsock device (the invocation channel) and
//!   the event loop thread that runs them.

pub mod bus;
pub mod control;
pub mod exit;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex};

use fnode_guest::abi;

use self::bus::{Bus, BusError, SharedDevice};
use self::control::ControlDevice;
use self::exit::ExitDevice;
use self::serial::SerialDevice;

/// Puts the legacy devices every fnode VM has — the COM1 console, the exit port and the
/// control port — on the PIO bus at their `abi` ports. A fresh VM and a restored one differ
/// only in how the devices were made.
pub fn insert_legacy(
    pio: &mut Bus,
    serial: Arc<Mutex<SerialDevice>>,
    exit: ExitDevice,
    control: ControlDevice,
) -> Result<(), BusError> {
    let serial: SharedDevice = serial;
    let com1 = (
        u64::from(abi::serial::COM1_PORT),
        u64::from(abi::serial::COM1_LEN),
    );
    pio.insert(serial, com1.0, com1.1)?;
    // The status is 1, 2 or 4 bytes wide at the port: the device claims 4 ports.
    pio.insert(Arc::new(Mutex::new(exit)), u64::from(abi::exit::PORT), 4)?;
    pio.insert(
        Arc::new(Mutex::new(control)),
        u64::from(abi::control::PORT),
        u64::from(abi::control::LEN),
    )
}
