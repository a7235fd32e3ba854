//! Taking a snapshot of a running microVM: [`snapshot`] pauses it, saves the state of its
//! vCPUs, VM and devices into the snapshot directory's state file and its memory into the
//! sparse memory file (`fnode-snapshot` owns both formats). [`crate::restore::restore`] builds a VM
//! back from such a directory.
//!
//! [`MicroVmState`] is everything a snapshot keeps besides memory. A new device adds its
//! `Persist` state to [`DevicesState`] (and bumps [`FORMAT`]); save and restore then carry
//! it like the others.

pub mod cpu;

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fnode_snapshot::memory_file::{self, DiskUsage, Scan};
use fnode_snapshot::{
    state_file, FormatVersion, MemoryFileError, MemoryFileInfo, Persist, SnapshotDir,
    StateFileError,
};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::devices::control::{ControlDevice, ControlState};
use crate::devices::exit::{ExitDevice, ExitState};
use crate::devices::serial::SerialState;
use crate::devices::virtio::setup::VirtioState;
use crate::kvm::KvmContext;
use crate::microvm::{MicroVm, MicroVmError, VmState as RunState};
use crate::vstate::vcpu_persist::{self, VcpuPersistError, VcpuState};
use crate::vstate::vm_persist::{VmPersistError, VmState};

/// The snapshot format this fnode writes and reads. Bump `major` whenever a saved state type
/// changes (the state file's payload is not self-describing: see `fnode_snapshot::state_file`).
pub const FORMAT: FormatVersion = FormatVersion { major: 2, minor: 0 };

/// Everything a snapshot keeps besides guest memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MicroVmState {
    /// What describes the memory file.
    pub memory: MemoryFileInfo,
    /// Irqchip, PIT and clock.
    pub vm: VmState,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// The devices.
    pub devices: DevicesState,
}

/// The devices' saved states. Virtio devices (transport + vsock) add theirs here.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevicesState {
    /// The COM1 UART.
    pub serial: SerialState,
    /// The exit port.
    pub exit: ExitState,
    /// The control port.
    pub control: ControlState,
    /// The virtio devices (the vsock device with its established connection).
    pub virtio: VirtioState,
}

/// Errors taking a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The VM already finished: there is nothing left to snapshot.
    #[error("the VM already finished; snapshot a VM that is running or paused")]
    Finished,
    /// A device is broken (the guest broke its contract): its state is not worth keeping.
    #[error(
        "a virtio device of the VM is broken (the guest broke its contract): snapshot a healthy VM"
    )]
    BrokenDevice,
    /// Pausing or reaching the vCPU threads failed.
    #[error("cannot pause the VM")]
    Control(#[source] MicroVmError),
    /// KVM cannot save what a snapshot needs.
    #[error("this host's KVM cannot take snapshots")]
    Capabilities(#[source] VcpuPersistError),
    /// A vCPU's state could not be read.
    #[error("cannot save the vCPUs")]
    Vcpus(#[source] MicroVmError),
    /// The VM's state could not be read.
    #[error("cannot save the VM's irqchip and clock")]
    Vm(#[source] VmPersistError),
    /// The snapshot directory could not be created or synced.
    #[error("cannot create snapshot directory {}", path.display())]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The memory file could not be written or verified.
    #[error("cannot write the memory file")]
    Memory(#[source] MemoryFileError),
    /// The state file could not be written.
    #[error("cannot write the state file")]
    State(#[source] StateFileError),
    /// Guest memory is not the single region fnode builds.
    #[error("guest memory has {0} regions; fnode snapshots one region at address 0")]
    MemoryLayout(usize),
}

/// Time spent in each phase of [`snapshot`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotTimings {
    /// Pausing the vCPUs.
    pub pause: Duration,
    /// Reading every vCPU's state (in its thread).
    pub vcpus: Duration,
    /// Reading the irqchip and clock.
    pub vm: Duration,
    /// Saving the devices.
    pub devices: Duration,
    /// Writing the memory file (scan, write, sync).
    pub memory: Duration,
    /// Writing the state file.
    pub state: Duration,
    /// Reading the memory file back to check it.
    pub verify: Duration,
    /// The whole snapshot.
    pub total: Duration,
}

/// What [`snapshot`] did.
#[derive(Clone, Debug)]
pub struct SnapshotReport {
    /// The snapshot directory.
    pub dir: PathBuf,
    /// Phase timings.
    pub timings: SnapshotTimings,
    /// Length of the state file.
    pub state_bytes: u64,
    /// The memory file's description.
    pub memory: MemoryFileInfo,
    /// The memory file's apparent and on-disk size.
    pub memory_usage: DiskUsage,
}

impl std::fmt::Display for SnapshotReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = &self.timings;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        write!(
            f,
            "snapshot {}: state {} bytes, memory {} MiB apparent / {} KiB on disk ({} data pages); \
             {:.2} ms (pause {:.2}, vcpus {:.2}, vm {:.2}, devices {:.2}, memory {:.2}, \
             state {:.2}, verify {:.2})",
            self.dir.display(),
            self.state_bytes,
            self.memory_usage.apparent >> 20,
            self.memory_usage.on_disk >> 10,
            self.memory.data_pages,
            ms(t.total),
            ms(t.pause),
            ms(t.vcpus),
            ms(t.vm),
            ms(t.devices),
            ms(t.memory),
            ms(t.state),
            ms(t.verify)
        )
    }
}

/// Snapshots `vm` into the directory `dir` (created if needed; a snapshot already there is
/// replaced): pauses the VM if it runs, saves vCPUs, VM, devices and memory, and checks the
/// memory file it wrote. The VM stays paused and usable: resume it or drop it.
pub fn snapshot(
    kvm: &KvmContext,
    vm: &mut MicroVm,
    dir: &Path,
) -> Result<SnapshotReport, SnapshotError> {
    let start = Instant::now();
    let mut last = start;
    let mut lap = || {
        let now = Instant::now();
        let d = now - last;
        last = now;
        d
    };
    let mut t = SnapshotTimings::default();

    vcpu_persist::check_capabilities(kvm.kvm()).map_err(SnapshotError::Capabilities)?;
    let msrs = vcpu_persist::msrs_to_save(kvm.kvm()).map_err(SnapshotError::Capabilities)?;
    if vm.state() == RunState::Finished {
        return Err(SnapshotError::Finished);
    }
    if vm.pause().map_err(SnapshotError::Control)?.is_some() {
        // A vCPU finished while being paused.
        return Err(SnapshotError::Finished);
    }
    t.pause = lap();

    let vcpus = vm.save_vcpus(msrs).map_err(SnapshotError::Vcpus)?;
    t.vcpus = lap();
    let vm_state = vm.vm().save_state().map_err(SnapshotError::Vm)?;
    t.vm = lap();
    // From here until the memory file is written the virtio devices are held still: no
    // device writes guest memory or moves a ring while it is saved.
    let quiesced = vm.virtio().quiesce();
    if quiesced.any_broken() {
        return Err(SnapshotError::BrokenDevice);
    }
    let devices = DevicesState {
        serial: vm.serial_state(),
        exit: ExitDevice::new(vm.exit_signal().clone()).save(),
        control: ControlDevice::new(vm.control().clone()).save(),
        virtio: quiesced.save(),
    };
    t.devices = lap();

    let snap = SnapshotDir::new(dir);
    snap.create().map_err(|source| SnapshotError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let memory = vm.memory();
    let regions = memory.num_regions();
    let Some(region) = memory
        .iter()
        .next()
        .filter(|r| regions == 1 && r.start_addr().0 == 0)
    else {
        return Err(SnapshotError::MemoryLayout(regions));
    };
    // Anonymous memory: pages never touched are not resident and need not be looked at.
    // File-backed memory (a restored VM) may hold data in pages it never touched.
    let scan = if region.file_offset().is_some() {
        Scan::All
    } else {
        Scan::ResidentOnly
    };
    // SAFETY: the region is a live mapping of `len()` bytes that `vm` keeps mapped while the
    // slice is used (it is borrowed from `vm`). Nothing writes it meanwhile: every vCPU is
    // paused and the virtio devices, the only other writers, are held by `quiesced` until
    // the slice is dropped, so reading it as a `&[u8]` is sound.
    let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr(), region.len() as usize) };
    let memory_path = snap.memory_path();
    let memory_info =
        memory_file::write(&memory_path, bytes, scan).map_err(SnapshotError::Memory)?;
    drop(quiesced);
    t.memory = lap();

    let state = MicroVmState {
        memory: memory_info,
        vm: vm_state,
        vcpus,
        devices,
    };
    let state_bytes =
        state_file::write(&snap.state_path(), FORMAT, &state).map_err(SnapshotError::State)?;
    t.state = lap();
    memory_file::verify(&memory_path, &memory_info).map_err(SnapshotError::Memory)?;
    snap.sync().map_err(|source| SnapshotError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    t.verify = lap();
    t.total = start.elapsed();
    let memory_usage = memory_file::disk_usage(&memory_path).map_err(SnapshotError::Memory)?;
    Ok(SnapshotReport {
        dir: dir.to_path_buf(),
        timings: t,
        state_bytes,
        memory: memory_info,
        memory_usage,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_reads_well() {
        let r = SnapshotReport {
            dir: PathBuf::from("/s"),
            timings: SnapshotTimings::default(),
            state_bytes: 12_000,
            memory: MemoryFileInfo {
                size: 64 << 20,
                page_size: 4096,
                data_pages: 60,
                checksum: 0,
            },
            memory_usage: DiskUsage {
                apparent: 64 << 20,
                on_disk: 240 << 10,
            },
        };
        let s = r.to_string();
        assert!(s.starts_with("snapshot /s: state 12000 bytes, memory 64 MiB apparent / 240 KiB on disk (60 data pages)"), "{s}");
    }
}
