//! Emulated devices and the buses that route guest accesses to them.
//!
//! - [`bus`]: the PIO and MMIO buses and the [`bus::BusDevice`] trait every device implements.
//! - [`serial`]: the COM1 16550A console.
//! - [`exit`]: the exit port the guest ends the VM through.
//!
//! The virtio-mmio transport and its devices live in `virtio` (declared here by that module).

pub mod bus;
pub mod exit;
pub mod serial;
