//! Builds a microVM back from a snapshot, paused, in one straight-line function:
//! [`restore_loaded`] (or [`restore`] / [`restore_with`], which load the snapshot first).
//!
//! A snapshot is *loaded* once ([`LoadedSnapshot::load`]) and then restored any number of
//! times: loading checks everything that can be wrong with it before the first KVM call (the
//! files exist, the state file is intact: checksum, length, format version; the memory file
//! has the size and the data pages (checksum) the state records; the vCPUs and memory size
//! are sane; this host's CPU offers every feature the guest saw) and keeps the memory file
//! open. Each restore then builds the VM the
//! way a cold boot builds it, except that guest memory maps the loaded memory file
//! `MAP_PRIVATE` (nothing is read or copied: the guest faults in what it touches) and every
//! part's state is set back instead of being initialised. Every phase is timed
//! ([`RestoreTimings`]); the VM records when its first `KVM_RUN` starts, so
//! [`crate::MicroVm::restore_to_first_run`] gives the host time from "restore requested" to
//! the guest running again. For [`restore_with`] "restore requested" is before the load (its
//! `validate` phase is the load); for [`restore_loaded`] it is after it, and the one-time load
//! is [`LoadedSnapshot::load_time`].
//!
//! A snapshot with a working-set file (optional: [`record_working_set`]) has each restore
//! populate those pages before the guest runs; see [`LoadedSnapshot::working_set`].

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fnode_guest::abi;
use fnode_snapshot::{
    memory_file, state_file, working_set, MemoryFileError, Persist, SnapshotDir, StateFileError,
    WorkingSet, WorkingSetError,
};
use vm_memory::{FileOffset, MmapRegion};

use crate::devices;
use crate::devices::bus::{BusError, Buses};
use crate::devices::control::{ControlDevice, ControlSignal};
use crate::devices::exit::{ExitDevice, ExitSignal};
use crate::devices::serial::{SerialDevice, SerialError};
use crate::devices::virtio::setup::{self as virtio_setup, SetupError};
use crate::kvm::KvmContext;
use crate::microvm::{MicroVm, VmState as RunState};
use crate::persist::cpu::{self, CpuCompatError};
use crate::persist::{MicroVmState, FORMAT};
use crate::reset::{ResetMode, ResetState};
use crate::vstate::memory::{self, MemoryBacking, MemoryError};
use crate::vstate::vcpu::{FirstRun, Vcpu, VcpuError, VcpuIo};
use crate::vstate::vcpu_persist::VcpuPersistError;
use crate::vstate::vm::{Vm, VmError};
use crate::vstate::vm_persist::VmPersistError;

/// Errors restoring a snapshot. The snapshot's own problems name the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The state file is missing, corrupt, truncated or of another format version.
    #[error(transparent)]
    State(StateFileError),
    /// The memory file is missing or of the wrong size.
    #[error(transparent)]
    Memory(MemoryFileError),
    /// The state file decodes but describes a VM fnode cannot build.
    #[error("snapshot {} describes an invalid VM ({what}): re-run 'fnode snapshot'", dir.display())]
    Invalid {
        /// The snapshot directory.
        dir: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// This host's CPU lacks features the guest saw.
    #[error(transparent)]
    Cpu(CpuCompatError),
    /// This host's KVM cannot restore what a snapshot holds.
    #[error("this host's KVM cannot restore snapshots")]
    Capabilities(#[source] VcpuPersistError),
    /// Mapping the memory file failed.
    #[error("cannot map the snapshot's memory file")]
    Map(#[source] MemoryError),
    /// VM setup failed.
    #[error("cannot set up the VM")]
    Vm(#[source] VmError),
    /// The irqchip, PIT or clock state could not be set.
    #[error("cannot restore the VM's irqchip and clock")]
    VmState(#[source] VmPersistError),
    /// A vCPU could not be created or its state set.
    #[error("cannot restore the vCPUs")]
    VcpuState(#[source] VcpuPersistError),
    /// A vCPU thread could not be started.
    #[error("cannot start the vCPU threads")]
    Vcpu(#[source] VcpuError),
    /// The serial device could not be restored.
    #[error("cannot restore the serial console")]
    Serial(#[source] SerialError),
    /// Two devices claim the same addresses.
    #[error("cannot place a device on its bus")]
    Bus(#[source] BusError),
    /// The virtio devices could not be restored.
    #[error("cannot restore the virtio devices")]
    Virtio(#[source] SetupError),
    /// The working-set file is present and unusable.
    #[error(transparent)]
    WorkingSet(WorkingSetError),
    /// The memory file could not be mapped a second time for in-place resets.
    #[error("cannot map the snapshot's memory file for in-place resets")]
    MapOriginal(#[source] std::io::Error),
}

/// Time spent in each phase of [`restore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreTimings {
    /// When the restore was requested (the start of [`restore_with`], or of
    /// [`restore_loaded`] for a snapshot loaded before).
    pub requested_at: Instant,
    /// [`restore_with`]: loading the snapshot (reading and checking the state file, opening
    /// and checking the memory file, the CPU check). [`restore_loaded`]: the per-VM checks
    /// left (the snapshot was loaded once before: [`LoadedSnapshot::load_time`]).
    pub validate: Duration,
    /// `KVM_CREATE_VM`.
    pub create_vm: Duration,
    /// Mapping the memory file `MAP_PRIVATE` (and, for a snapshot with a working-set file,
    /// having the host map those pages: [`LoadedSnapshot::working_set`]).
    pub map_memory: Duration,
    /// `KVM_SET_USER_MEMORY_REGION`.
    pub register_memory: Duration,
    /// TSS address and in-kernel irqchip.
    pub irqchip: Duration,
    /// Irqchip, PIT and clock state.
    pub vm_state: Duration,
    /// Devices restored, on their buses, irqfds and ioeventfds registered. (They join the
    /// process's device loop after [`start_threads`](Self::start_threads), while the guest
    /// starts: that is in [`total`](Self::total), not here; or in [`attach`](Self::attach)
    /// when the guest first runs on the restoring thread.)
    pub devices: Duration,
    /// `KVM_CREATE_VCPU` and every vCPU's state set.
    pub vcpus: Duration,
    /// [`restore_loaded_attached`]: the client attached to the parked connection and its
    /// first bytes handed to the guest (written to its receive queue, interrupt raised),
    /// and, with [`RestoreOptions::first_run_here`], the devices joining the device loop;
    /// zero otherwise.
    pub attach: Duration,
    /// [`RestoreOptions::first_run_here`]: the guest's first run on the restoring thread
    /// (the host's share of the restore, "restore requested" to the first `KVM_RUN`, ends
    /// where this starts); `None` when the vCPU thread ran it.
    pub first_run: Option<Duration>,
    /// Handing each vCPU to a thread of the process's vCPU thread pool (a parked one when
    /// there is one), which runs it: paused, or running with [`RestoreOptions::resume`].
    pub start_threads: Duration,
    /// The whole restore, up to a paused VM.
    pub total: Duration,
}

impl RestoreTimings {
    /// Each phase's name and time, in order (what benchmarks print).
    pub fn phases(&self) -> [(&'static str, Duration); 11] {
        [
            ("validate", self.validate),
            ("create_vm", self.create_vm),
            ("map_memory", self.map_memory),
            ("register_memory", self.register_memory),
            ("irqchip", self.irqchip),
            ("vm_state", self.vm_state),
            ("devices", self.devices),
            ("vcpus", self.vcpus),
            ("attach", self.attach),
            ("first_run", self.first_run.unwrap_or_default()),
            ("start_threads", self.start_threads),
        ]
    }
}

/// How to restore a snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// The Unix socket the restored vsock device listens at (a fresh path per VM; needed
    /// when the snapshot has a vsock device). Its established connection is parked there:
    /// the first client that writes `CONNECT <port>` for its guest port gets `OK` at once.
    pub vsock_uds: Option<PathBuf>,
    /// Keep what an in-place reset needs ([`MicroVm::reset`]) and have KVM log the pages
    /// the guest writes; `None`: the VM cannot be reset.
    pub reset: Option<ResetMode>,
    /// Return the VM running, not paused: its vCPU threads start in the guest, with no
    /// resume command (and no wake-up) between their start and the guest running.
    pub resume: bool,
    /// With `resume`, one vCPU and an attached first request ([`restore_loaded_attached`]):
    /// the restoring thread runs the guest itself first, for at most this long, before
    /// the vCPU's thread takes over (see [`crate::vstate::vcpu::Vcpu::run_here`]). The guest then
    /// usually answers before the restore returns, with no thread hand-off before it runs.
    /// A guest that needs more (a longer handler, a response the client must drain) goes
    /// on on its thread when the time is up. `None`: the vCPU thread runs it from the start.
    pub first_run_here: Option<Duration>,
}

/// A client attached by the restore itself ([`restore_loaded_attached`]): no socket
/// connection, no `CONNECT` line, no `OK`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttachClient<'a> {
    /// The guest port of the parked connection to attach to.
    pub port: u32,
    /// What the client sends first (its first request, at most one vsock frame): handed to
    /// the guest before its first `KVM_RUN`, so it runs with the request already there.
    pub first: &'a [u8],
}

/// A snapshot read and checked once, to restore any number of VMs from
/// ([`restore_loaded`]): its state, checked against this host, and its memory file, open
/// (every VM restored from it maps the same open file).
#[derive(Debug)]
pub struct LoadedSnapshot {
    dir: PathBuf,
    state: MicroVmState,
    /// The vCPU states, shared with the reset state of every resettable VM.
    vcpus: Vec<Arc<crate::vstate::vcpu_persist::VcpuState>>,
    memory_file: Arc<File>,
    /// The pages a restored VM touches first (the optional working-set file).
    working_set: Option<WorkingSet>,
    load_time: Duration,
}

impl LoadedSnapshot {
    /// Reads and checks the snapshot in `dir` (see the module doc) and opens its memory file.
    /// Nothing is built: errors name the snapshot and the fix.
    pub fn load(kvm: &KvmContext, dir: &Path) -> Result<Self, RestoreError> {
        let start = Instant::now();
        let snap = SnapshotDir::new(dir);
        let mut state: MicroVmState =
            state_file::read(&snap.state_path(), FORMAT).map_err(RestoreError::State)?;
        let memory_file = memory_file::open_verified(&snap.memory_path(), &state.memory)
            .map_err(RestoreError::Memory)?;
        validate(dir, &state)?;
        let dir_name = dir.display().to_string();
        // Both are the same for every restore on this host: worked out once per KvmContext.
        let offered = kvm.host_features();
        for vcpu in &state.vcpus {
            cpu::check(&dir_name, &vcpu.cpuid, offered).map_err(RestoreError::Cpu)?;
        }
        kvm.check_snapshot_capabilities()
            .map_err(RestoreError::Capabilities)?;
        let working_set = working_set::read(&snap.working_set_path(), state.memory.size)
            .map_err(RestoreError::WorkingSet)?;
        let vcpus = std::mem::take(&mut state.vcpus)
            .into_iter()
            .map(Arc::new)
            .collect();
        Ok(LoadedSnapshot {
            dir: dir.to_path_buf(),
            state,
            vcpus,
            memory_file: Arc::new(memory_file),
            working_set,
            load_time: start.elapsed(),
        })
    }

    /// The snapshot directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// How long [`load`](Self::load) took: paid once per snapshot, not per VM.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// The pages a restored VM touches first, if the snapshot has a working-set file
    /// ([`record_working_set`] writes one). Each restore then has the host map them
    /// (`MADV_POPULATE_READ`) before the guest runs, in its `map_memory` phase. Measured on
    /// a host whose KVM uses shadow paging, this did not pay: the guest's first touch of a
    /// page costs a KVM fault either way, and the restore's host time grows by the
    /// populate. Where a host-mapped page makes the guest's first touch cheap (EPT/NPT
    /// hosts), it may; `fnode bench --prefetch` measures it.
    pub fn working_set(&self) -> Option<&WorkingSet> {
        self.working_set.as_ref()
    }

    /// Guest memory size, bytes.
    pub fn memory_size(&self) -> u64 {
        self.state.memory.size
    }
}

/// Restores the snapshot in `dir` into a new VM, paused; its serial console writes to
/// `console`. Run it with [`MicroVm::run`] (or resume it): the guest goes on right after the
/// point where it was snapshotted.
pub fn restore(
    kvm: &KvmContext,
    dir: &Path,
    console: Box<dyn Write + Send>,
) -> Result<MicroVm, RestoreError> {
    restore_with(kvm, dir, console, &RestoreOptions::default())
}

/// [`restore`] with [`RestoreOptions`]: a snapshot with a vsock device, in-place reset.
/// Loads the snapshot and restores it once ([`LoadedSnapshot::load`], then
/// [`restore_loaded`]); the load is the `validate` phase of its timings. To restore a
/// snapshot many times, load it once and call [`restore_loaded`].
pub fn restore_with(
    kvm: &KvmContext,
    dir: &Path,
    console: Box<dyn Write + Send>,
    options: &RestoreOptions,
) -> Result<MicroVm, RestoreError> {
    let requested_at = Instant::now();
    let loaded = LoadedSnapshot::load(kvm, dir)?;
    restore_from(kvm, &loaded, console, options, None, requested_at)
}

/// Restores `loaded` into a new VM, paused unless [`RestoreOptions::resume`]; its serial
/// console writes to `console`. Before the guest runs, a fresh seed for its random source is
/// written into its memory (`abi::entropy`): two VMs restored from one snapshot draw
/// different random numbers. "Restore requested" (the start of the host time) is the call.
pub fn restore_loaded(
    kvm: &KvmContext,
    loaded: &LoadedSnapshot,
    console: Box<dyn Write + Send>,
    options: &RestoreOptions,
) -> Result<MicroVm, RestoreError> {
    restore_from(kvm, loaded, console, options, None, Instant::now())
}

/// [`restore_loaded`], and a client attached to the snapshot's parked connection of guest
/// port `attach.port` by the restore itself: the device keeps one end of a connected stream
/// pair, [`MicroVm::take_vsock_client`] gives the other, and `attach.first` is on the
/// guest's receive queue, its interrupt raised, before the guest's first `KVM_RUN` (its
/// `attach` phase). No socket connection, `CONNECT` line or `OK` line: the client writes
/// and reads frames on the stream from the start. The socket at
/// [`RestoreOptions::vsock_uds`] still takes other clients. Without such a parked connection
/// the VM is restored and nothing is attached.
pub fn restore_loaded_attached(
    kvm: &KvmContext,
    loaded: &LoadedSnapshot,
    console: Box<dyn Write + Send>,
    options: &RestoreOptions,
    attach: AttachClient<'_>,
) -> Result<MicroVm, RestoreError> {
    restore_from(kvm, loaded, console, options, Some(attach), Instant::now())
}

fn restore_from(
    kvm: &KvmContext,
    loaded: &LoadedSnapshot,
    console: Box<dyn Write + Send>,
    options: &RestoreOptions,
    attach: Option<AttachClient<'_>>,
    requested_at: Instant,
) -> Result<MicroVm, RestoreError> {
    let mut last = requested_at;
    let mut lap = || {
        let now = Instant::now();
        let d = now - last;
        last = now;
        d
    };
    let state = &loaded.state;
    // What is left to check per VM: cached per KvmContext after the first call.
    kvm.check_snapshot_capabilities()
        .map_err(RestoreError::Capabilities)?;
    let validate = lap();

    let mut vm = Vm::create(kvm.kvm()).map_err(RestoreError::Vm)?;
    let create_vm = lap();
    // validate() checked the size against the abi's maximum, which fits usize.
    let mem_size = state.memory.size as usize;
    // Copy-back resets read the snapshot's bytes from a shared read-only mapping.
    let original = match options.reset {
        Some(ResetMode::CopyBack) => {
            let region = MmapRegion::build(
                Some(FileOffset::from_arc(loaded.memory_file.clone(), 0)),
                mem_size,
                libc::PROT_READ,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
            )
            .map_err(|e| RestoreError::MapOriginal(std::io::Error::other(e)))?;
            Some(region)
        }
        _ => None,
    };
    let guest_memory = memory::create(
        mem_size,
        MemoryBacking::SharedFile(loaded.memory_file.clone()),
    )
    .map_err(RestoreError::Map)?;
    crate::reset::write_seed(&guest_memory);
    if let Some(ws) = &loaded.working_set {
        memory::populate(&guest_memory, ws.runs()).map_err(RestoreError::Map)?;
    }
    let map_memory = lap();
    // Memory before the irqchip, as in the builder (see there: an SRCU grace period).
    vm.register_memory_logged(&guest_memory, options.reset.is_some())
        .map_err(RestoreError::Vm)?;
    let register_memory = lap();
    vm.setup_irqchip().map_err(RestoreError::Vm)?;
    let irqchip = lap();
    vm.restore_state(&state.vm).map_err(RestoreError::VmState)?;
    let vm_state = lap();

    let devices = &state.devices;
    let serial = SerialDevice::restore(console, &devices.serial).map_err(RestoreError::Serial)?;
    vm.register_irqfd(serial.interrupt_evt(), abi::serial::COM1_IRQ)
        .map_err(RestoreError::Vm)?;
    let serial = Arc::new(Mutex::new(serial));
    let exit = ExitSignal::new();
    let exit_dev = match ExitDevice::restore(exit.clone(), &devices.exit) {
        Ok(dev) => dev,
        Err(never) => match never {},
    };
    let control = ControlSignal::new();
    if options.reset.is_some() && loaded.vcpus.len() == 1 {
        // Armed once the VM is assembled; a vCPU already running the guest by then waits
        // for it at a DONE (see `ControlSignal::expect_reset_at_done`).
        control.expect_reset_at_done();
    }
    let control_dev = match ControlDevice::restore(control.clone(), &devices.control) {
        Ok(dev) => dev,
        Err(never) => match never {},
    };
    let mut buses = Buses::default();
    devices::insert_legacy(&mut buses.pio, serial.clone(), exit_dev, control_dev)
        .map_err(RestoreError::Bus)?;
    let (events_tx, events, faults) = crate::builder::event_channel();
    let mut virtio = virtio_setup::restore(
        vm.fd(),
        &guest_memory,
        &mut buses.mmio,
        &devices.virtio,
        options.vsock_uds.as_deref(),
        faults.clone(),
    )
    .map_err(RestoreError::Virtio)?;
    let buses = Arc::new(buses);
    let devices = lap();

    let mut vcpus = Vec::with_capacity(loaded.vcpus.len());
    for vcpu_state in &loaded.vcpus {
        vcpus.push(Vcpu::restore(&vm, vcpu_state).map_err(RestoreError::VcpuState)?);
    }
    let vcpus_time = lap();
    // After the vCPUs' state (their local APICs) is set: an interrupt raised before would
    // be lost. Before they run: the guest's first KVM_RUN finds the request there.
    let has_first = attach.is_some_and(|a| !a.first.is_empty());
    let client = match attach {
        Some(a) => virtio
            .attach_vsock_client(a.port, a.first)
            .map_err(RestoreError::Virtio)?,
        None => None,
    };
    // The guest runs here first when it has its whole first request and one vCPU; its
    // devices must be served by then (the loop takes the response while it runs).
    let run_here = match options.first_run_here {
        Some(budget) if options.resume && vcpus.len() == 1 && has_first && client.is_some() => {
            virtio.serve(faults.clone()).map_err(RestoreError::Virtio)?;
            Some(budget)
        }
        _ => None,
    };
    let attach_time = lap();

    let io = VcpuIo {
        buses: buses.clone(),
        exit: exit.clone(),
        control: control.clone(),
        first_run: FirstRun::default(),
    };
    let mut handles = Vec::with_capacity(vcpus.len());
    let mut first_run = None;
    for mut vcpu in vcpus {
        // On a parked thread of the process's pool when there is one (`vcpu_pool`).
        let handle = match run_here {
            Some(budget) => {
                let ran = vcpu.run_here(Instant::now() + budget, &io);
                first_run = Some(lap());
                vcpu.start_thread_after(ran, io.clone(), events_tx.clone())
            }
            None => vcpu.start_thread_with(options.resume, io.clone(), events_tx.clone()),
        };
        handles.push(handle.map_err(RestoreError::Vcpu)?);
    }
    let start_threads = lap();
    // Served from now on, alongside the guest (already, if it ran here first; see
    // `VirtioDevices::serve`); the loop's
    // first look at the devices starts the attached connection's host I/O.
    virtio.serve(faults).map_err(RestoreError::Virtio)?;
    let timings = RestoreTimings {
        requested_at,
        validate,
        create_vm,
        map_memory,
        register_memory,
        irqchip,
        vm_state,
        devices,
        vcpus: vcpus_time,
        attach: attach_time,
        first_run,
        start_threads,
        total: requested_at.elapsed(),
    };

    let mut microvm = MicroVm::new(
        vm,
        guest_memory,
        handles,
        events,
        serial,
        buses,
        exit,
        virtio,
        Default::default(),
    );
    microvm.set_vcpu_io(&io);
    if let Some(client) = client {
        microvm.set_vsock_client(client);
    }
    if options.resume {
        microvm.state = RunState::Running;
    }
    microvm.set_restore_timings(timings);
    if let Some(mode) = options.reset {
        microvm.reset = Some(ResetState::new(
            loaded.vcpus.clone(),
            state.vm.clone(),
            state.devices.virtio.clone(),
            mode,
            original,
            microvm.vm.clone(),
            microvm.memory().clone(),
            microvm.virtio.handles(),
        ));
        microvm.arm_reset_at_done();
    }
    Ok(microvm)
}

/// Records the working set of `vm`, a VM restored from the snapshot in `dir` that has
/// served an invocation: the guest pages the host mapped for it (read or written), written to
/// `dir`'s working-set file (replacing one that is there). Later loads of the snapshot read it
/// and their restores have the host map those pages ahead of the guest.
pub fn record_working_set(vm: &MicroVm, dir: &Path) -> Result<WorkingSet, RestoreError> {
    let pages = memory::touched_pages(vm.memory()).map_err(RestoreError::Map)?;
    let set = WorkingSet::from_pages(&pages);
    working_set::write(&SnapshotDir::new(dir).working_set_path(), &set)
        .map_err(RestoreError::WorkingSet)?;
    Ok(set)
}

/// Checks what the state file says about the VM's shape.
fn validate(dir: &Path, state: &MicroVmState) -> Result<(), RestoreError> {
    let invalid = |what: String| RestoreError::Invalid {
        dir: dir.to_path_buf(),
        what,
    };
    let mib = state.memory.size >> 20;
    if !state.memory.size.is_multiple_of(1 << 20)
        || !(abi::layout::MIN_MEM_MIB..=abi::layout::MAX_MEM_MIB).contains(&mib)
    {
        return Err(invalid(format!(
            "{} bytes of guest memory",
            state.memory.size
        )));
    }
    let count = state.vcpus.len();
    if count == 0 || count > usize::from(crate::builder::MAX_VCPUS) {
        return Err(invalid(format!("{count} vCPUs")));
    }
    for (i, vcpu) in state.vcpus.iter().enumerate() {
        if usize::from(vcpu.id) != i {
            return Err(invalid(format!("vCPU {i} is saved as vCPU {}", vcpu.id)));
        }
    }
    Ok(())
}
