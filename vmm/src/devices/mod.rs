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
