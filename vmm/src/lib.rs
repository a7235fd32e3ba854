//! `fnode-vmm`: fnode's lean virtual machine monitor on KVM.
//!
//! This crate builds a microVM from a PVH ELF kernel image and runs it: it opens `/dev/kvm`
//! ([`kvm`]), creates guest memory, the VM and its vCPUs ([`vstate`]), loads the kernel and
//! the PVH boot data ([`loader`]), wires the legacy devices onto the PIO/MMIO buses
//! ([`devices`]) and runs one thread per vCPU, controlled over channels ([`microvm`]). A VM
//! is built paused by one straight-line function ([`builder::build`]); running it ends in an
//! [`Outcome`]: the guest's exit status, a guest fault with its report, a timeout, or a
//! KVM/emulation error.
//!
//! Snapshots: a guest signals READY once its init is done ([`MicroVm::run_until_ready`]
//! pauses it there); [`persist::snapshot`] saves its vCPUs, VM, devices and memory into a
//! snapshot directory, and [`restore::restore`] builds a new VM from one, paused, with guest
//! memory mapped `MAP_PRIVATE` from the snapshot's memory file ([`restore::restore_with`]:
//! a VM with a vsock device gets a fresh socket with the snapshot's connection parked on
//! it, and every restored VM a fresh seed for its random source). [`MicroVm::reset`]
//! ([`mod@reset`]) puts a restored VM back to its snapshot state in place after an
//! invocation.
//!
//! It also holds the raw-KVM floor benchmark ([`mod@bench`]) that boot and restore timings are
//! compared with.
//!
//! What it does not own: the guest↔host contract (ports, layout, exit codes, fault report)
//! lives in `fnode-guest`'s `abi` module and is only imported here; snapshot file formats
//! live in `fnode-snapshot`; pools, HTTP and scheduling live in the agent.

pub mod affinity;
pub mod bench;
pub mod builder;
pub mod devices;
pub mod kvm;
pub mod loader;
pub mod microvm;
pub mod outcome;
pub mod persist;
pub mod reset;
pub mod restore;
pub mod vstate;

pub use builder::{build, BuildError, BuildTimings, VmConfig};
pub use kvm::{KvmContext, KvmError};
pub use microvm::{MicroVm, MicroVmError};
pub use outcome::Outcome;
pub use persist::snapshot;
pub use reset::{OpStats, ResetError, ResetMode, ResetPhases};
pub use restore::{
    record_working_set, restore, restore_loaded, restore_with, LoadedSnapshot, RestoreError,
    RestoreOptions,
};
