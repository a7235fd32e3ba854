//! `fnode-snapshot`: fnode's snapshot format and the [`Persist`] trait.
//!
//! A snapshot is a directory ([`SnapshotDir`]) holding two files, and an optional third:
//!
//! - `state` ([`state_file`]): every saved state (vCPUs, VM, devices) as one serde value in a
//!   small file with a header: magic, format version, payload length and a CRC-64 over the
//!   whole file. It is read in full and checked before anything is built from it; its size is
//!   capped before anything is allocated.
//! - `memory` ([`memory_file`]): guest memory, byte for byte (file offset = guest physical
//!   address), written SPARSE: only pages that hold non-zero bytes are written, the rest are
//!   holes. Restore maps it `MAP_PRIVATE`, so all VMs of a function share its page cache and
//!   each pays only for the pages it writes.
//! - `working-set` ([`working_set`], optional): the guest pages a restored VM touched while
//!   serving one invocation, which later restores have the host map ahead of the guest.
//!
//! What it owns: the [`Persist`] trait, the file formats, writing and checking them.
//! What it does not own: what is saved. The VMM (`fnode-vmm`) defines the state types of its
//! vCPUs, VM and devices, reads them out of KVM and builds VMs back from them.

pub mod checksum;
pub mod dir;
pub mod memory_file;
pub mod persist;
pub mod state_file;
pub mod working_set;

pub use dir::SnapshotDir;
pub use memory_file::{MemoryFileError, MemoryFileInfo};
pub use persist::Persist;
pub use state_file::{FormatVersion, StateFileError};
pub use working_set::{WorkingSet, WorkingSetError};
