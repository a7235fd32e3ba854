//! A built microVM and its control: resume, pause, wait for an [`Outcome`], stop.
//!
//! [`MicroVm`] owns the VM, its memory, its devices and one thread per vCPU. It talks to the
//! vCPU threads only over channels: commands out, events back.

use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use fnode_snapshot::Persist;

use crate::builder::BuildTimings;
use crate::devices::bus::Buses;
use crate::devices::control::ControlSignal;
use crate::devices::exit::ExitSignal;
use crate::devices::serial::{SerialDevice, SerialState};
use crate::devices::virtio::setup::VirtioDevices;
use crate::devices::virtio::DeviceFault;
use crate::outcome::Outcome;
use crate::restore::RestoreTimings;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::{
    FirstRun, VcpuCommand, VcpuEvent, VcpuHandle, VcpuIo, VcpuState, VcpuStop,
};
use crate::vstate::vcpu_persist::{VcpuPersistError, VcpuState as SavedVcpu};
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
    /// Saving vCPUs of a VM that is not paused.
    #[error("the VM is not paused: pause it first")]
    NotPaused,
    /// A vCPU could not save its state.
    #[error("cannot save a vCPU's state")]
    SaveVcpu(#[source] VcpuPersistError),
}

/// How [`MicroVm::run_until_ready`] ended.
#[derive(Debug)]
pub enum UntilReady {
    /// The guest wrote `abi::control::READY`; the VM is paused right after that write.
    Ready,
    /// The guest ended (or timed out) before it was ready.
    Ended(Outcome),
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
    pub(crate) vcpus: Vec<VcpuHandle>,
    pub(crate) events: Receiver<VcpuEvent>,
    /// The virtio devices and their event loop thread (stopped on drop).
    pub(crate) virtio: VirtioDevices,
    /// A device fault that arrived and still has to stop the VM.
    device_fault: Option<DeviceFault>,
    serial: Arc<Mutex<SerialDevice>>,
    buses: Arc<Buses>,
    exit: ExitSignal,
    control: ControlSignal,
    pub(crate) first_run: FirstRun,
    /// What an in-place reset puts back (a VM restored with reset enabled).
    pub(crate) reset: Option<crate::reset::ResetState>,
    pub(crate) vm: Arc<Vm>,
    memory: GuestMemory,
    pub(crate) state: VmState,
    build_timings: BuildTimings,
    restore_timings: Option<RestoreTimings>,
    /// The client end of the invocation connection a restore attached
    /// ([`crate::restore::restore_loaded_attached`]), until taken.
    vsock_client: Option<std::os::unix::net::UnixStream>,
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
            control: ControlSignal::default(),
            first_run: FirstRun::default(),
            reset: None,
            vm: Arc::new(vm),
            memory,
            state: VmState::Paused,
            build_timings,
            restore_timings: None,
            vsock_client: None,
        }
    }

    /// Hands the VM the control signal and first-run clock its vCPU threads were given
    /// (the builder and restore call it with the `VcpuIo` of the threads).
    pub(crate) fn set_vcpu_io(&mut self, io: &VcpuIo) {
        self.control = io.control.clone();
        self.first_run = io.first_run.clone();
    }

    /// Records how the VM's restore went (restore calls it).
    pub(crate) fn set_restore_timings(&mut self, timings: RestoreTimings) {
        self.restore_timings = Some(timings);
    }

    /// Keeps the client end of the connection a restore attached.
    pub(crate) fn set_vsock_client(&mut self, client: std::os::unix::net::UnixStream) {
        self.vsock_client = Some(client);
    }

    /// The client end of the invocation connection the restore attached
    /// ([`crate::restore::restore_loaded_attached`]); `None` if there is none or it was
    /// taken. Not taken, it closes with the VM.
    pub fn take_vsock_client(&mut self) -> Option<std::os::unix::net::UnixStream> {
        self.vsock_client.take()
    }

    /// Resumes every paused vCPU.
    pub fn resume(&mut self) -> Result<(), MicroVmError> {
        match self.state {
            VmState::Finished => return Err(MicroVmError::Finished),
            VmState::Running => return Ok(()),
            VmState::Paused => {}
        }
        // The guest runs again: a reset parked at DONE no longer holds.
        self.forget_reset_at_done();
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
        match self.wait_until(timeout, false)? {
            UntilReady::Ended(outcome) => Ok(outcome),
            // wait_until reports READY only when asked to stop there.
            UntilReady::Ready => Err(MicroVmError::NotRunning),
        }
    }

    /// When the guest signalled BOOTED (`abi::control::BOOTED`: kernel up, init starting),
    /// if it did since this VM was built.
    pub fn booted_at(&self) -> Option<Instant> {
        self.control.booted_at()
    }

    /// Resumes the VM and waits until the guest signals READY (`abi::control::READY`), then
    /// pauses it there: the point to snapshot it (see [`crate::persist::snapshot`]). Resume
    /// it to let the guest go on. A guest that exits, fails or takes longer than `timeout`
    /// first gives [`UntilReady::Ended`].
    pub fn run_until_ready(&mut self, timeout: Duration) -> Result<UntilReady, MicroVmError> {
        self.control.arm_ready(true);
        let result = self.resume().and_then(|()| self.wait_until(timeout, true));
        self.control.arm_ready(false);
        result
    }

    /// [`MicroVm::wait`], and with `stop_at_ready` also a stop at the guest's READY. Without
    /// it, a vCPU that paused at a READY (armed by someone else) is resumed.
    fn wait_until(
        &mut self,
        timeout: Duration,
        stop_at_ready: bool,
    ) -> Result<UntilReady, MicroVmError> {
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
                    let ready = match event {
                        VcpuEvent::Ready { id } => Some(id),
                        _ => None,
                    };
                    if let Some(stop) = self.record(event) {
                        // Stop the other vCPUs; the first stop decides the outcome.
                        self.pause()?;
                        self.state = VmState::Finished;
                        return Ok(UntilReady::Ended(self.outcome_of(stop)));
                    }
                    if let Some(fault) = self.device_fault.take() {
                        self.pause()?;
                        self.state = VmState::Finished;
                        return Ok(UntilReady::Ended(Outcome::DeviceFault(fault)));
                    }
                    if let Some(id) = ready {
                        if !stop_at_ready {
                            self.resume_vcpu(id)?;
                            continue;
                        }
                        // Pause the other vCPUs too; one may have finished meanwhile.
                        return Ok(match self.pause()? {
                            Some(stop) => UntilReady::Ended(self.outcome_of(stop)),
                            None => UntilReady::Ready,
                        });
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Ok(UntilReady::Ended(match self.pause()? {
                        // The guest finished just as time ran out: report what it did.
                        Some(stop) => self.outcome_of(stop),
                        None => Outcome::TimedOut { timeout },
                    }));
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(MicroVmError::AllVcpuThreadsGone)
                }
            }
        }
    }

    /// Checks, without blocking and without pausing a running guest, whether the VM ended:
    /// handles the events that arrived (as [`MicroVm::wait`] does) and returns the outcome
    /// of a VM that finished or whose device faulted (the VM is then finished), `None` while
    /// it runs on. For a caller that waits on something else (the guest's socket) and
    /// checks on the VM now and then.
    pub fn poll(&mut self) -> Result<Option<Outcome>, MicroVmError> {
        match self.state {
            VmState::Running => {}
            VmState::Paused => return Err(MicroVmError::NotRunning),
            VmState::Finished => return Err(MicroVmError::Finished),
        }
        loop {
            let event = match self.events.try_recv() {
                Ok(event) => event,
                Err(TryRecvError::Empty) => return Ok(None),
                Err(TryRecvError::Disconnected) => return Err(MicroVmError::AllVcpuThreadsGone),
            };
            let ready = match event {
                VcpuEvent::Ready { id } => Some(id),
                _ => None,
            };
            if let Some(stop) = self.record(event) {
                self.pause()?;
                self.state = VmState::Finished;
                return Ok(Some(self.outcome_of(stop)));
            }
            if let Some(fault) = self.device_fault.take() {
                self.pause()?;
                self.state = VmState::Finished;
                return Ok(Some(Outcome::DeviceFault(fault)));
            }
            // A vCPU that paused at a READY someone else armed goes on.
            if let Some(id) = ready {
                self.resume_vcpu(id)?;
            }
        }
    }

    /// Exits to the VMM of all vCPUs so far (`KVM_RUN` returns other than kicks).
    pub fn exit_count(&self) -> u64 {
        self.vcpus.iter().map(VcpuHandle::exit_count).sum()
    }

    /// Resumes one vCPU that paused by itself (at a READY).
    fn resume_vcpu(&mut self, id: u8) -> Result<(), MicroVmError> {
        self.forget_reset_at_done();
        if let Some(vcpu) = self.vcpus.iter_mut().find(|v| v.id() == id) {
            if vcpu.state() == VcpuState::Paused {
                if !vcpu.send(VcpuCommand::Resume) {
                    return Err(MicroVmError::VcpuThreadGone { id });
                }
                vcpu.set_state(VcpuState::Running);
            }
        }
        Ok(())
    }

    /// Has every vCPU thread of the paused VM read its vCPU's state (with the MSRs in
    /// `msrs`); returns the states in vCPU order.
    pub(crate) fn save_vcpus(&mut self, msrs: Arc<[u32]>) -> Result<Vec<SavedVcpu>, MicroVmError> {
        if self.state != VmState::Paused {
            return Err(MicroVmError::NotPaused);
        }
        for vcpu in &self.vcpus {
            if !vcpu.send(VcpuCommand::Save(msrs.clone())) {
                return Err(MicroVmError::VcpuThreadGone { id: vcpu.id() });
            }
        }
        let mut saved: Vec<Option<SavedVcpu>> = self.vcpus.iter().map(|_| None).collect();
        let mut left = saved.len();
        let mut first_error = None;
        while left > 0 {
            match self.events.recv() {
                Ok(VcpuEvent::Saved { id, result }) => {
                    left -= 1;
                    match result {
                        Ok(state) => {
                            if let Some(i) = self.vcpus.iter().position(|v| v.id() == id) {
                                saved[i] = Some(*state);
                            }
                        }
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
                // A device fault, say: kept for the next wait.
                Ok(other) => {
                    self.record(other);
                }
                Err(_) => return Err(MicroVmError::AllVcpuThreadsGone),
            }
        }
        if let Some(e) = first_error {
            return Err(MicroVmError::SaveVcpu(e));
        }
        saved
            .into_iter()
            .zip(&self.vcpus)
            .map(|(s, v)| s.ok_or(MicroVmError::VcpuThreadGone { id: v.id() }))
            .collect()
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

    /// Time spent building the VM, by phase (zero for a restored VM).
    pub fn build_timings(&self) -> &BuildTimings {
        &self.build_timings
    }

    /// Time spent restoring the VM, by phase (`None` for a VM built by a cold boot).
    pub fn restore_timings(&self) -> Option<&RestoreTimings> {
        self.restore_timings.as_ref()
    }

    /// When a vCPU of this VM first entered `KVM_RUN`, if one did.
    pub fn first_run(&self) -> Option<Instant> {
        self.first_run.get()
    }

    /// For a restored VM that has run: the host time from "restore requested" to the first
    /// `KVM_RUN`.
    pub fn restore_to_first_run(&self) -> Option<Duration> {
        let requested = self.restore_timings.as_ref()?.requested_at;
        Some(self.first_run.get()?.saturating_duration_since(requested))
    }

    /// The VM's control messages (READY).
    pub fn control(&self) -> &ControlSignal {
        &self.control
    }

    /// The VM's exit request.
    pub fn exit_signal(&self) -> &ExitSignal {
        &self.exit
    }

    /// The serial console's saved state (its buffered output is written out first).
    pub fn serial_state(&self) -> SerialState {
        let mut serial = self.serial.lock().unwrap_or_else(PoisonError::into_inner);
        serial.flush();
        serial.save()
    }

    /// Applies a vCPU event to the vCPU's state; returns the stop of a finished vCPU.
    pub(crate) fn record(&mut self, event: VcpuEvent) -> Option<VcpuStop> {
        let (id, state, stop) = match event {
            VcpuEvent::Paused { id } => (id, VcpuState::Paused, None),
            VcpuEvent::Finished { id, stop } => (id, VcpuState::Finished, Some(stop)),
            VcpuEvent::Ready { id } => (id, VcpuState::Paused, None),
            // Only save_vcpus and reset wait for these; one arriving elsewhere has no one
            // to tell.
            VcpuEvent::Saved { .. } | VcpuEvent::Restored { .. } | VcpuEvent::ResetDone { .. } => {
                return None
            }
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
