//! A built microVM and its control: resume, pause, wait for an [`Outcome`], stop.
//!
//! [`MicroVm`] owns the VM, its memory, its devices and one thread per vCPU. It talks to the
//! vCPU threads only over channels: commands out, events back.

use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::builder::BuildTimings;
use crate::devices::bus::Buses;
use crate::devices::exit::ExitSignal;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::setup::VirtioDevices;
use crate::devices::virtio::DeviceFault;
use crate::outcome::Outcome;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::{VcpuCommand, VcpuEvent, VcpuHandle, VcpuState, VcpuStop};
use crate::vstate::vm::Vm;

/// Errors controlling a microVM.
#[derive(Debug, thiserror::Error)]
pub enum MicroVmError {
    /// A vCPU thread is gone (it panicked).
    #[error("the thread of vCPU {id} is gone")]
    VcpuThreadGone {
        /// vCPU index.
        id: u8,
    },
    /// Every vCPU thread is gone.
    #[error("all vCPU threads are gone")]
    AllVcpuThreadsGone,
    /// The VM already finished; it cannot run again.
    #[error("the VM already finished")]
    Finished,
    /// `wait` on a VM that is not running.
    #[error("the VM is not running: resume it first")]
    NotRunning,
}

/// The state of the whole VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    /// Built or paused: no vCPU is in the guest.
    Paused,
    /// The vCPUs run the guest.
    Running,
    /// The guest exited, failed or was stopped for good.
    Finished,
}

/// What one [`MicroVm::run`] measured.
#[derive(Debug)]
pub struct RunReport {
    /// How the run ended.
    pub outcome: Outcome,
    /// From the resume command to the vCPU's report (or the timeout).
    pub run_time: Duration,
}

/// A microVM: built paused by [`crate::builder::build`], then run.
#[derive(Debug)]
pub struct MicroVm {
    // Field order is drop order: vCPU threads end (and their fds close) first, then the
    // devices, then the VM fd, then guest memory.
    vcpus: Vec<VcpuHandle>,
    events: Receiver<VcpuEvent>,
    /// The virtio devices and their event loop thread (stopped on drop).
    virtio: VirtioDevices,
    /// A device fault that arrived and still has to stop the VM.
    device_fault: Option<DeviceFault>,
    serial: Arc<Mutex<SerialDevice>>,
    buses: Arc<Buses>,
    exit: ExitSignal,
    vm: Vm,
    memory: GuestMemory,
    state: VmState,
    build_timings: BuildTimings,
}

impl MicroVm {
    /// Assembles a built VM (used by the builder; the vCPU threads are started and paused).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vm: Vm,
        memory: GuestMemory,
        vcpus: Vec<VcpuHandle>,
        events: Receiver<VcpuEvent>,
        serial: Arc<Mutex<SerialDevice>>,
        buses: Arc<Buses>,
        exit: ExitSignal,
        virtio: VirtioDevices,
        build_timings: BuildTimings,
    ) -> Self {
        MicroVm {
            vcpus,
            events,
            virtio,
            device_fault: None,
            serial,
            buses,
            exit,
            vm,
            memory,
            state: VmState::Paused,
            build_timings,
        }
    }

    /// Resumes every paused vCPU.
    pub fn resume(&mut self) -> Result<(), MicroVmError> {
        match self.state {
            VmState::Finished => return Err(MicroVmError::Finished),
            VmState::Running => return Ok(()),
            VmState::Paused => {}
        }
        for vcpu in &mut self.vcpus {
            if vcpu.state() == VcpuState::Paused {
                if !vcpu.send(VcpuCommand::Resume) {
                    return Err(MicroVmError::VcpuThreadGone { id: vcpu.id() });
                }
                vcpu.set_state(VcpuState::Running);
            }
        }
        self.state = VmState::Running;
        Ok(())
    }

    /// Pauses every running vCPU and waits until each is out of the guest. If a vCPU
    /// finished meanwhile, its stop is returned (the VM is then finished).
    pub fn pause(&mut self) -> Result<Option<VcpuStop>, MicroVmError> {
        if self.state != VmState::Running {
            return Ok(None);
        }
        for vcpu in &self.vcpus {
            if vcpu.state() == VcpuState::Running {
                // Command first, then the kick: the thread sees the command when the kick
                // takes it out of KVM_RUN (see vstate::vcpu).
                if !vcpu.send(VcpuCommand::Pause) {
                    return Err(MicroVmError::VcpuThreadGone { id: vcpu.id() });
                }
                vcpu.kick();
            }
        }
        let mut first_stop = None;
        while self.vcpus.iter().any(|v| v.state() == VcpuState::Running) {
            let event = self
                .events
                .recv()
                .map_err(|_| MicroVmError::AllVcpuThreadsGone)?;
            if let Some(stop) = self.record(event) {
                first_stop.get_or_insert(stop);
            }
        }
        self.state = if first_stop.is_some() {
            VmState::Finished
        } else {
            VmState::Paused
        };
        Ok(first_stop)
    }

    /// Waits until a vCPU finishes or `timeout` passes. On a finish the other vCPUs are
    /// paused and the VM is finished; on a timeout every vCPU is paused and the outcome is
    /// [`Outcome::TimedOut`] (the VM stays paused and could be inspected or resumed).
    pub fn wait(&mut self, timeout: Duration) -> Result<Outcome, MicroVmError> {
        match self.state {
            VmState::Running => {}
            VmState::Paused => return Err(MicroVmError::NotRunning),
            VmState::Finished => return Err(MicroVmError::Finished),
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(event) => {
                    if let Some(stop) = self.record(event) {
                        // Stop the other vCPUs; the first stop decides the outcome.
                        self.pause()?;
                        self.state = VmState::Finished;
                        return Ok(self.outcome_of(stop));
                    }
                    if let Some(fault) = self.device_fault.take() {
                        self.pause()?;
                        self.state = VmState::Finished;
                        return Ok(Outcome::DeviceFault(fault));
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Ok(match self.pause()? {
                        // The guest finished just as time ran out: report what it did.
                        Some(stop) => self.outcome_of(stop),
                        None => Outcome::TimedOut { timeout },
                    });
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MicroVmError::AllVcpuThreadsGone)
                }
            }
        }
    }

    /// Resumes the VM and waits for its outcome (see [`MicroVm::wait`]), timing the run.
    pub fn run(&mut self, timeout: Duration) -> Result<RunReport, MicroVmError> {
        let start = Instant::now();
        self.resume()?;
        let outcome = self.wait(timeout)?;
        let run_time = start.elapsed();
        self.flush_console();
        Ok(RunReport { outcome, run_time })
    }

    /// Writes out console output still buffered (a partial last line).
    pub fn flush_console(&self) {
        self.serial
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .flush();
    }

    /// The state of the VM.
    pub fn state(&self) -> VmState {
        self.state
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The KVM VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The PIO and MMIO buses.
    pub fn buses(&self) -> &Arc<Buses> {
        &self.buses
    }

    /// The exit status the guest wrote, if it did.
    pub fn exit_status(&self) -> Option<u32> {
        self.exit.requested()
    }

    /// The virtio devices (the vsock device, when the VM has one).
    pub fn virtio(&self) -> &VirtioDevices {
        &self.virtio
    }

    /// Time spent building the VM, by phase.
    pub fn build_timings(&self) -> &BuildTimings {
        &self.build_timings
    }

    /// Applies a vCPU event to the vCPU's state; returns the stop of a finished vCPU.
    fn record(&mut self, event: VcpuEvent) -> Option<VcpuStop> {
        let (id, state, stop) = match event {
            VcpuEvent::Paused { id } => (id, VcpuState::Paused, None),
            VcpuEvent::Finished { id, stop } => (id, VcpuState::Finished, Some(stop)),
            VcpuEvent::DeviceFault(fault) => {
                self.device_fault.get_or_insert(fault);
                return None;
            }
        };
        if let Some(vcpu) = self.vcpus.iter_mut().find(|v| v.id() == id) {
            vcpu.set_state(state);
        }
        stop
    }

    fn outcome_of(&self, stop: VcpuStop) -> Outcome {
        match stop {
            VcpuStop::Exited(status) => Outcome::from_exit_status(status, &self.memory),
            VcpuStop::Error(e) => Outcome::Crashed(e),
        }
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        for vcpu in &mut self.vcpus {
            vcpu.stop();
        }
        self.flush_console();
    }
}
