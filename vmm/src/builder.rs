//! Builds a microVM, paused, in one straight-line function: [`build`].
//!
//! Every phase is timed ([`BuildTimings`]) so boot latency can be compared with the raw-KVM
//! floor ([`crate::bench`]).

use std::io::Write;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fnode_guest::abi;
use vm_memory::GuestAddress;

use crate::devices;
use crate::devices::bus::{BusError, Buses};
use crate::devices::control::{ControlDevice, ControlSignal};
use crate::devices::exit::{ExitDevice, ExitSignal};
use crate::devices::serial::{SerialDevice, SerialError};
use crate::devices::virtio::setup::{self as virtio, DeviceSet, SetupError};
use crate::devices::virtio::FaultSink;
use crate::kvm::KvmContext;
use crate::loader::{self, LoaderError};
use crate::microvm::MicroVm;
use crate::vstate::memory::{self, MemoryBacking, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError, VcpuEvent, VcpuIo};
use crate::vstate::vm::{Vm, VmError};

/// Guest memory when none is asked for.
pub const DEFAULT_MEM_MIB: u64 = 64;

/// Most vCPUs a VM may have (APIC ids fit in 8 bits; fnode guests use one).
pub const MAX_VCPUS: u8 = 64;

/// What to build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// The PVH ELF kernel image.
    pub kernel: PathBuf,
    /// Guest memory in MiB, `abi::layout::MIN_MEM_MIB..=MAX_MEM_MIB`.
    pub mem_mib: u64,
    /// Number of vCPUs; vCPU 0 starts at the PVH entry, the others wait for a SIPI.
    pub vcpus: u8,
    /// The kernel command line.
    pub cmdline: String,
    /// Give the guest a virtio-vsock device whose host end is this Unix socket (hybrid
    /// vsock: a client connects and writes `CONNECT <port>\n`). `None`: no vsock device.
    pub vsock_uds: Option<PathBuf>,
}

impl VmConfig {
    /// One vCPU, [`DEFAULT_MEM_MIB`], an empty command line.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        VmConfig {
            kernel: kernel.into(),
            mem_mib: DEFAULT_MEM_MIB,
            vcpus: 1,
            cmdline: String::new(),
            vsock_uds: None,
        }
    }

    /// The virtio devices this configuration asks for.
    fn virtio_devices(&self) -> DeviceSet<'_> {
        DeviceSet {
            vsock_uds: self.vsock_uds.as_deref(),
        }
    }
}

/// Errors building a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Memory size out of range.
    #[error(
        "guest memory of {mib} MiB is outside {}..={} MiB: choose a size in that range",
        abi::layout::MIN_MEM_MIB,
        abi::layout::MAX_MEM_MIB
    )]
    MemSize {
        /// Requested size.
        mib: u64,
    },
    /// vCPU count out of range.
    #[error("{count} vCPUs asked for: choose 1..={MAX_VCPUS}")]
    VcpuCount {
        /// Requested count.
        count: u8,
    },
    /// The kernel image or the command line is unusable.
    #[error("cannot load the kernel")]
    Load(#[source] LoaderError),
    /// Guest memory could not be mapped.
    #[error("cannot create guest memory")]
    Memory(#[source] MemoryError),
    /// VM setup failed.
    #[error("cannot set up the VM")]
    Vm(#[source] VmError),
    /// vCPU setup failed.
    #[error("cannot set up the vCPUs")]
    Vcpu(#[source] VcpuError),
    /// The serial device could not be created.
    #[error("cannot create the serial console")]
    Serial(#[source] SerialError),
    /// Two devices claim the same addresses.
    #[error("cannot place a device on its bus")]
    Bus(#[source] BusError),
    /// The virtio devices could not be set up.
    #[error("cannot set up the virtio devices")]
    Virtio(#[source] SetupError),
}

/// Time spent in each phase of [`build`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BuildTimings {
    /// `KVM_CREATE_VM`.
    pub create_vm: Duration,
    /// Mapping guest memory.
    pub map_memory: Duration,
    /// `KVM_SET_USER_MEMORY_REGION`.
    pub register_memory: Duration,
    /// TSS address and in-kernel irqchip.
    pub irqchip: Duration,
    /// Loading the kernel and writing the boot data.
    pub load_kernel: Duration,
    /// Devices, buses and irqfds.
    pub devices: Duration,
    /// `KVM_CREATE_VCPU` for all vCPUs.
    pub create_vcpus: Duration,
    /// CPUID, MSRs and registers of all vCPUs.
    pub setup_vcpus: Duration,
    /// Starting the vCPU threads.
    pub start_threads: Duration,
    /// The whole build, including validation.
    pub total: Duration,
}

/// Measures phases back to back.
struct PhaseClock {
    start: Instant,
    last: Instant,
}

impl PhaseClock {
    fn start() -> Self {
        let now = Instant::now();
        PhaseClock {
            start: now,
            last: now,
        }
    }

    /// Time since the previous lap (or the start).
    fn lap(&mut self) -> Duration {
        let now = Instant::now();
        let d = now - self.last;
        self.last = now;
        d
    }

    fn total(&self) -> Duration {
        self.last - self.start
    }
}

/// Builds the VM `config` describes, paused: memory mapped and registered, kernel and boot
/// data loaded, devices on their buses, vCPUs set up with their threads waiting. The serial
/// console writes to `console`. Run it with [`MicroVm::run`].
pub fn build(
    kvm: &KvmContext,
    config: &VmConfig,
    console: Box<dyn Write + Send>,
) -> Result<MicroVm, BuildError> {
    let mut clock = PhaseClock::start();
    let mut t = BuildTimings::default();

    // Everything a user can get wrong is checked before the first syscall.
    if !(abi::layout::MIN_MEM_MIB..=abi::layout::MAX_MEM_MIB).contains(&config.mem_mib) {
        return Err(BuildError::MemSize {
            mib: config.mem_mib,
        });
    }
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(BuildError::VcpuCount {
            count: config.vcpus,
        });
    }
    // The command line announces the virtio devices (`virtio_mmio.device=...`).
    let cmdline = config.virtio_devices().cmdline(&config.cmdline);
    loader::validate_cmdline(&cmdline).map_err(BuildError::Load)?;
    let mut image = loader::open_image(&config.kernel).map_err(BuildError::Load)?;
    clock.lap();

    let mut vm = Vm::create(kvm.kvm()).map_err(BuildError::Vm)?;
    t.create_vm = clock.lap();

    // Memory is registered before the irqchip exists: creating the irqchip installs the
    // default IRQ routing, whose SRCU grace period a following memslot update waits out
    // (4-12 ms measured, against 0.1 ms in this order).
    let mem_size = (config.mem_mib << 20) as usize;
    let guest_memory =
        memory::create(mem_size, MemoryBacking::Anonymous).map_err(BuildError::Memory)?;
    t.map_memory = clock.lap();
    vm.register_memory(&guest_memory).map_err(BuildError::Vm)?;
    t.register_memory = clock.lap();
    vm.setup_irqchip().map_err(BuildError::Vm)?;
    t.irqchip = clock.lap();

    let kernel =
        loader::load_kernel(&guest_memory, &mut image, &config.kernel).map_err(BuildError::Load)?;
    loader::write_boot_data(&guest_memory, &cmdline).map_err(BuildError::Load)?;
    t.load_kernel = clock.lap();

    let serial = SerialDevice::new(console).map_err(BuildError::Serial)?;
    vm.register_irqfd(serial.interrupt_evt(), abi::serial::COM1_IRQ)
        .map_err(BuildError::Vm)?;
    let serial = Arc::new(Mutex::new(serial));
    let exit = ExitSignal::new();
    let control = ControlSignal::new();
    let mut buses = Buses::default();
    devices::insert_legacy(
        &mut buses.pio,
        serial.clone(),
        ExitDevice::new(exit.clone()),
        ControlDevice::new(control.clone()),
    )
    .map_err(BuildError::Bus)?;
    let (events_tx, events, faults) = event_channel();
    let virtio = virtio::attach(
        vm.fd(),
        &guest_memory,
        &mut buses.mmio,
        config.virtio_devices(),
        faults,
    )
    .map_err(BuildError::Virtio)?;
    let buses = Arc::new(buses);
    t.devices = clock.lap();

    let mut vcpus = Vec::with_capacity(usize::from(config.vcpus));
    for id in 0..config.vcpus {
        vcpus.push(Vcpu::create(&vm, id).map_err(BuildError::Vcpu)?);
    }
    t.create_vcpus = clock.lap();
    for vcpu in &vcpus {
        vcpu.configure_cpuid(kvm.supported_cpuid())
            .map_err(BuildError::Vcpu)?;
        vcpu.configure_msrs().map_err(BuildError::Vcpu)?;
    }
    // Only the boot vCPU starts at the PVH entry; with the in-kernel LAPIC the others wait
    // for the guest's INIT/SIPI.
    vcpus[0]
        .setup_pvh_regs(kernel.entry, GuestAddress(abi::layout::PVH_INFO_ADDR))
        .map_err(BuildError::Vcpu)?;
    t.setup_vcpus = clock.lap();

    let io = VcpuIo {
        buses: buses.clone(),
        exit: exit.clone(),
        control,
        first_run: Default::default(),
    };
    let mut handles = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        handles.push(
            vcpu.start_thread(io.clone(), events_tx.clone())
                .map_err(BuildError::Vcpu)?,
        );
    }
    t.start_threads = clock.lap();
    t.total = clock.total();

    let mut microvm = MicroVm::new(
        vm,
        guest_memory,
        handles,
        events,
        serial,
        buses,
        exit,
        virtio,
        t,
    );
    microvm.set_vcpu_io(&io);
    Ok(microvm)
}

/// The channel a VM's vCPU threads report on, and a device fault sink that reports on the same
/// channel, so that `MicroVm::wait` wakes up for either.
pub(crate) fn event_channel() -> (
    mpsc::Sender<VcpuEvent>,
    mpsc::Receiver<VcpuEvent>,
    FaultSink,
) {
    let (events_tx, events) = mpsc::channel();
    let fault_tx = events_tx.clone();
    let faults = FaultSink::new(move |f| {
        let _ = fault_tx.send(VcpuEvent::DeviceFault(f));
    });
    (events_tx, events, faults)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> Option<KvmContext> {
        crate::kvm::test_support::require_kvm().then(|| KvmContext::new().unwrap())
    }

    #[test]
    fn config_is_checked_first() {
        let Some(kvm) = ctx() else { return };
        let mut c = VmConfig::new("/nonexistent/kernel");
        c.mem_mib = 1;
        let err = build(&kvm, &c, Box::new(std::io::sink())).unwrap_err();
        assert!(matches!(err, BuildError::MemSize { mib: 1 }), "{err:?}");
        c.mem_mib = DEFAULT_MEM_MIB;
        c.vcpus = 0;
        let err = build(&kvm, &c, Box::new(std::io::sink())).unwrap_err();
        assert!(matches!(err, BuildError::VcpuCount { count: 0 }), "{err:?}");
        c.vcpus = 1;
        let err = build(&kvm, &c, Box::new(std::io::sink())).unwrap_err();
        assert!(
            matches!(err, BuildError::Load(LoaderError::Open { .. })),
            "{err:?}"
        );
    }
}
