//! One vCPU: its KVM fd, its setup (CPUID, MSRs, PVH entry registers) and its thread.
//!
//! Every vCPU runs on its own thread with an explicit [`VcpuState`]. The thread is controlled
//! over a channel of [`VcpuCommand`]s and reports [`VcpuEvent`]s on a channel shared by all
//! vCPUs of the VM. A vCPU inside `KVM_RUN` is kicked out by a signal whose handler sets
//! `kvm_run.immediate_exit`: whether the signal lands before or during `KVM_RUN`, the call
//! returns `EINTR` and the thread reads its commands again, so a kick is never lost.

use std::cell::Cell;
use std::io;
use std::sync::atomic::{compiler_fence, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_run, kvm_segment, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::GuestAddress;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use super::vcpu_persist::{VcpuPersistError, VcpuState as SavedVcpu};
use super::vm::Vm;
use crate::devices::bus::Buses;
use crate::devices::control::ControlSignal;
use crate::devices::exit::ExitSignal;

/// `IA32_MISC_ENABLE`: bit 0 enables fast string operations (what firmware leaves set).
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// `IA32_MTRR_DEF_TYPE`: MTRRs enabled (bit 11), default type write-back (6). With MTRRs
/// off, KVM hosts that honour guest MTRRs would map all guest memory uncached.
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// The MSRs [`Vcpu::configure_msrs`] sets (a snapshot saves them even where KVM does not
/// list them as saveable).
pub(crate) const BOOT_MSRS: [u32; 2] = [MSR_IA32_MISC_ENABLE, MSR_MTRR_DEF_TYPE];
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// CR0 bits of the PVH entry state: protected mode on, paging off.
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
/// Bit 1 of RFLAGS is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Selectors of the flat boot segments (the layout of a conventional boot GDT: null, code,
/// data, TSS). The guest loads its own GDT before it reloads a segment register.
const BOOT_CS: u16 = 0x08;
const BOOT_DS: u16 = 0x10;
const BOOT_TR: u16 = 0x18;
/// Segment types: execute/read accessed code, read/write accessed data, busy 32-bit TSS.
const SEG_TYPE_CODE: u8 = 0xb;
const SEG_TYPE_DATA: u8 = 0x3;
const SEG_TYPE_TSS_BUSY: u8 = 0xb;
/// Limit of a minimal 32-bit TSS.
const TSS_LIMIT: u32 = 0x67;

/// Errors setting up or running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_CREATE_VCPU` failed.
    #[error("KVM_CREATE_VCPU failed for vCPU {id}")]
    Create {
        /// vCPU index.
        id: u8,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_CPUID2` failed.
    #[error("KVM_SET_CPUID2 failed")]
    SetCpuid(#[source] kvm_ioctls::Error),
    /// The MSR list could not be built.
    #[error("cannot build the boot MSR list")]
    MsrList(#[source] vmm_sys_util::fam::Error),
    /// `KVM_SET_MSRS` failed.
    #[error("KVM_SET_MSRS failed")]
    SetMsrs(#[source] kvm_ioctls::Error),
    /// KVM accepted only some of the boot MSRs.
    #[error("KVM_SET_MSRS refused MSR {msr:#x}")]
    MsrRefused {
        /// The first MSR KVM did not set.
        msr: u32,
    },
    /// `KVM_GET_SREGS` failed.
    #[error("KVM_GET_SREGS failed")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_SREGS` failed.
    #[error("KVM_SET_SREGS failed")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// `KVM_GET_REGS` failed.
    #[error("KVM_GET_REGS failed")]
    GetRegs(#[source] kvm_ioctls::Error),
    /// `KVM_SET_REGS` failed.
    #[error("KVM_SET_REGS failed")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    /// The vCPU thread could not be started.
    #[error("cannot spawn the thread of vCPU {id}")]
    Spawn {
        /// vCPU index.
        id: u8,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `KVM_RUN` itself failed.
    #[error("KVM_RUN failed")]
    Run(#[source] kvm_ioctls::Error),
    /// The guest triple-faulted (or otherwise shut down the CPU).
    #[error("guest triple fault (KVM_EXIT_SHUTDOWN)")]
    Shutdown,
    /// KVM could not handle something the guest did.
    #[error("KVM internal error (KVM_EXIT_INTERNAL_ERROR, {})", internal_error_name(*.suberror))]
    InternalError {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
    },
    /// The hardware refused to enter the guest.
    #[error("VM entry failed (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x})")]
    FailEntry {
        /// `hardware_entry_failure_reason`.
        reason: u64,
    },
    /// The guest executed `hlt` and KVM handed it to the VMM (only without an in-kernel
    /// irqchip).
    #[error("guest halted (KVM_EXIT_HLT)")]
    Halted,
    /// The guest asked for a reset, shutdown or crash through a system event.
    #[error("guest requested a system event (KVM_EXIT_SYSTEM_EVENT type {kind})")]
    SystemEvent {
        /// `KVM_SYSTEM_EVENT_*`.
        kind: u32,
    },
    /// The vCPU thread panicked (a bug in fnode-vmm).
    #[error("the vCPU thread panicked")]
    ThreadPanicked,
    /// An exit fnode does not handle.
    #[error("unhandled vCPU exit: {0}")]
    UnhandledExit(String),
}

/// What `kvm_run.internal.suberror` means.
fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
        _ => "unknown suberror",
    }
}

/// A created vCPU, before its thread starts.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
    /// KVM takes the general registers and the pending events through `kvm_run` at the next
    /// `KVM_RUN` (`KVM_CAP_SYNC_REGS`), saving an ioctl each when a state is loaded.
    sync_regs: bool,
}

/// The `KVM_CAP_SYNC_REGS` parts [`Vcpu::load_state`] uses.
const SYNC_REGS_USED: i32 =
    (kvm_bindings::KVM_SYNC_X86_REGS | kvm_bindings::KVM_SYNC_X86_EVENTS) as i32;

/// Whether KVM syncs general registers and events through `kvm_run` (asked once per
/// process: it is a property of the host's KVM).
fn sync_regs_supported(vm: &Vm) -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(|| {
        vm.fd().check_extension_int(kvm_ioctls::Cap::SyncRegs) & SYNC_REGS_USED == SYNC_REGS_USED
    })
}

impl Vcpu {
    /// `KVM_CREATE_VCPU` with index `id` (also its APIC id).
    pub fn create(vm: &Vm, id: u8) -> Result<Self, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        Ok(Vcpu {
            fd,
            id,
            sync_regs: sync_regs_supported(vm),
        })
    }

    /// Whether [`Vcpu::load_state`] hands registers and events to KVM through `kvm_run`
    /// (they take effect at the next `KVM_RUN`).
    pub(crate) fn uses_sync_regs(&self) -> bool {
        self.sync_regs
    }

    /// The vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The KVM vCPU fd.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// The KVM vCPU fd, mutably (`KVM_RUN` needs it).
    pub fn fd_mut(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    /// Sets the CPUID the guest sees: what KVM supports, with this vCPU's APIC id.
    pub fn configure_cpuid(&self, supported: &CpuId) -> Result<(), VcpuError> {
        let cpuid = vcpu_cpuid(supported, self.id);
        self.fd.set_cpuid2(&cpuid).map_err(VcpuError::SetCpuid)
    }

    /// Sets the MSRs firmware would leave set (fast strings, write-back MTRR default).
    pub fn configure_msrs(&self) -> Result<(), VcpuError> {
        let entries = [
            kvm_msr_entry {
                index: MSR_IA32_MISC_ENABLE,
                data: MISC_ENABLE_FAST_STRING,
                ..Default::default()
            },
            kvm_msr_entry {
                index: MSR_MTRR_DEF_TYPE,
                data: MTRR_ENABLE_WRITEBACK,
                ..Default::default()
            },
        ];
        let msrs = Msrs::from_entries(&entries).map_err(VcpuError::MsrList)?;
        let set = self.fd.set_msrs(&msrs).map_err(VcpuError::SetMsrs)?;
        match entries.get(set) {
            None => Ok(()),
            Some(refused) => Err(VcpuError::MsrRefused { msr: refused.index }),
        }
    }

    /// Puts the vCPU in the PVH entry state: 32-bit protected mode with flat segments,
    /// paging off, interrupts off, `rip` = `entry`, `rbx` = the `hvm_start_info` address.
    pub fn setup_pvh_regs(
        &self,
        entry: GuestAddress,
        start_info: GuestAddress,
    ) -> Result<(), VcpuError> {
        // Start from KVM's reset state: it carries the APIC base and the LDT/GDT/IDT
        // registers the guest expects, which KVM_SET_SREGS would otherwise overwrite.
        let mut sregs = self.fd.get_sregs().map_err(VcpuError::GetSregs)?;
        let code = flat_segment(BOOT_CS, SEG_TYPE_CODE);
        let data = flat_segment(BOOT_DS, SEG_TYPE_DATA);
        sregs.cs = code;
        sregs.ds = data;
        sregs.es = data;
        sregs.fs = data;
        sregs.gs = data;
        sregs.ss = data;
        sregs.tr = kvm_segment {
            base: 0,
            limit: TSS_LIMIT,
            selector: BOOT_TR,
            type_: SEG_TYPE_TSS_BUSY,
            present: 1,
            ..Default::default()
        };
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
        sregs.cr3 = 0;
        sregs.cr4 = 0;
        sregs.efer = 0;
        self.fd.set_sregs(&sregs).map_err(VcpuError::SetSregs)?;

        let regs = kvm_regs {
            rflags: RFLAGS_RESERVED,
            rip: entry.0,
            rbx: start_info.0,
            ..Default::default()
        };
        self.fd.set_regs(&regs).map_err(VcpuError::SetRegs)
    }

    /// Runs the guest until the next exit and handles it.
    pub fn run_once(&mut self, io: &VcpuIo) -> Result<RunStep, VcpuError> {
        io.first_run.mark();
        let wrote = match self.fd.run() {
            Ok(exit) => match exit {
                VcpuExit::IoOut(port, data) => {
                    io.buses.pio.write(u64::from(port), data);
                    true
                }
                VcpuExit::IoIn(port, data) => {
                    io.buses.pio.read(u64::from(port), data);
                    false
                }
                VcpuExit::MmioWrite(addr, data) => {
                    io.buses.mmio.write(addr, data);
                    true
                }
                VcpuExit::MmioRead(addr, data) => {
                    io.buses.mmio.read(addr, data);
                    false
                }
                VcpuExit::Intr => false,
                VcpuExit::Hlt => return Err(VcpuError::Halted),
                VcpuExit::Shutdown => return Err(VcpuError::Shutdown),
                VcpuExit::FailEntry(reason, _) => return Err(VcpuError::FailEntry { reason }),
                VcpuExit::SystemEvent(kind, _) => return Err(VcpuError::SystemEvent { kind }),
                VcpuExit::InternalError => {
                    return Err(VcpuError::InternalError {
                        suberror: self.internal_suberror(),
                    })
                }
                other => return Err(VcpuError::UnhandledExit(format!("{other:?}"))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                // A kick: clear it so the next KVM_RUN enters the guest again.
                self.fd.set_kvm_immediate_exit(0);
                return Ok(RunStep::Interrupted);
            }
            Err(e) => return Err(VcpuError::Run(e)),
        };
        // The exit port is checked after every write: the guest does not run past its exit.
        match io.exit.requested() {
            Some(status) if wrote => Ok(RunStep::Exited(status)),
            // So is the control port: a READY the VMM waits for pauses this vCPU right here,
            // a DONE with a reset armed resets the VM right here.
            _ if wrote && io.control.take_ready() => Ok(RunStep::Ready),
            _ if wrote && io.control.take_done() => Ok(RunStep::Done),
            _ => Ok(RunStep::Continue),
        }
    }

    /// `kvm_run.internal.suberror` after a `KVM_EXIT_INTERNAL_ERROR`.
    fn internal_suberror(&mut self) -> u32 {
        let run = self.fd.get_kvm_run();
        // SAFETY: called right after KVM_RUN returned KVM_EXIT_INTERNAL_ERROR, for which KVM
        // fills the `internal` member of the exit union; it is plain integers.
        unsafe { run.__bindgen_anon_1.internal.suberror }
    }

    /// [`Vcpu::run_once`], counting the exits to the VMM (a kick is not one).
    fn run_counted(&mut self, io: &VcpuIo, exits: &AtomicU64) -> Result<RunStep, VcpuError> {
        let step = self.run_once(io);
        if !matches!(step, Ok(RunStep::Interrupted)) {
            exits.fetch_add(1, Ordering::Relaxed);
        }
        step
    }

    /// Starts the vCPU's thread, paused. It reports on `events`.
    pub fn start_thread(
        self,
        io: VcpuIo,
        events: Sender<VcpuEvent>,
    ) -> Result<VcpuHandle, VcpuError> {
        self.start_thread_with(false, io, events)
    }

    /// [`Vcpu::start_thread`], running the guest at once if `resume` (no command and no
    /// wake-up between the thread's start and the guest running).
    pub fn start_thread_with(
        self,
        resume: bool,
        io: VcpuIo,
        events: Sender<VcpuEvent>,
    ) -> Result<VcpuHandle, VcpuError> {
        let first = if resume {
            ThreadStart::Running
        } else {
            ThreadStart::Paused
        };
        self.start(first, 0, io, events)
    }

    /// Runs the guest on the calling thread, from `KVM_RUN` to `KVM_RUN`, while each exit
    /// is an ordinary one ([`RunStep::Continue`]) other than a DONE and `until` has not
    /// passed; a timer kicks this thread out of the guest at `until`. Then
    /// [`start_thread_after`](Self::start_thread_after) hands the vCPU to its thread, which
    /// takes over from the last exit.
    ///
    /// What this saves is the hand-off before the guest first runs: the thread that built
    /// the VM is already on a CPU, the vCPU thread would have to be woken on one (on hosts
    /// whose idle cores halt, a cross-CPU wake-up each way). For a restore whose first
    /// request is on the guest's queue, the guest's first exit is usually its DONE, after
    /// the response is with the device.
    ///
    /// Where the timer cannot be set (or the kick handler installed), the guest does not
    /// run here: without the kick, nothing would bound the run. The thread then runs it
    /// from the start.
    pub fn run_here(&mut self, until: Instant, io: &VcpuIo) -> RanHere {
        let not_run = RanHere {
            last: Ok(RunStep::Interrupted),
            exits: 0,
        };
        if install_kick_handler().is_err() {
            return not_run;
        }
        let _kick_target = KickTarget::set(self.fd.get_kvm_run());
        // Whatever the calling thread blocks, the kick must reach it in the guest.
        let _unblocked = KickUnblocked::new();
        let Ok(_kick_at) = KickTimer::arm(until) else {
            return not_run;
        };
        let exits = AtomicU64::new(0);
        let dones = io.control.done_count();
        loop {
            let step = self.run_counted(io, &exits);
            // A DONE ends it too: the response is with the device, and what the guest does
            // next (wait for another request) is for its thread.
            if !matches!(step, Ok(RunStep::Continue))
                || io.control.done_count() != dones
                || Instant::now() >= until
            {
                // A kick that fires after this leaves `immediate_exit` set: harmless, the
                // thread's first KVM_RUN returns at once and clears it.
                return RanHere {
                    last: step,
                    exits: exits.into_inner(),
                };
            }
        }
    }

    /// Starts the vCPU's thread after [`run_here`](Self::run_here): running, and handling
    /// the last exit there first (a DONE, READY, exit or error as if its own `KVM_RUN` had
    /// returned it).
    pub fn start_thread_after(
        self,
        ran: RanHere,
        io: VcpuIo,
        events: Sender<VcpuEvent>,
    ) -> Result<VcpuHandle, VcpuError> {
        self.start(ThreadStart::After(ran.last), ran.exits, io, events)
    }

    /// Starts the vCPU's thread in `first`, with `exits` already counted.
    fn start(
        self,
        first: ThreadStart,
        exits: u64,
        io: VcpuIo,
        events: Sender<VcpuEvent>,
    ) -> Result<VcpuHandle, VcpuError> {
        install_kick_handler()?;
        let id = self.id;
        let state = match first {
            ThreadStart::Paused => VcpuState::Paused,
            ThreadStart::Running | ThreadStart::After(_) => VcpuState::Running,
        };
        let (commands, receiver) = mpsc::channel();
        let exits = Arc::new(AtomicU64::new(exits));
        let thread_exits = exits.clone();
        // A thread of the process's pool (see `vcpu_pool`): a parked one when there is one.
        let thread = super::vcpu_pool::spawn(move || {
            // A panic must not leave the controller waiting for a report forever.
            let run = std::panic::AssertUnwindSafe(|| {
                self.thread_main(first, &io, &receiver, &events, &thread_exits)
            });
            std::panic::catch_unwind(run).map_err(|_| {
                let stop = VcpuStop::Error(VcpuError::ThreadPanicked);
                let _ = events.send(VcpuEvent::Finished { id, stop });
            })
        })
        .map_err(|source| VcpuError::Spawn { id, source })?;
        Ok(VcpuHandle {
            id,
            commands,
            thread: Some(thread),
            state,
            exits,
        })
    }

    /// The vCPU thread: a state machine driven by commands and guest exits, starting in
    /// `first`.
    fn thread_main(
        mut self,
        first: ThreadStart,
        io: &VcpuIo,
        commands: &Receiver<VcpuCommand>,
        events: &Sender<VcpuEvent>,
        exits: &AtomicU64,
    ) -> Vcpu {
        let _kick_target = KickTarget::set(self.fd.get_kvm_run());
        let id = self.id;
        // Whether the last KVM_RUN ended in an exit KVM completes only at the next KVM_RUN
        // (an I/O or MMIO access): a kick (EINTR) leaves none, nor does a vCPU that never ran.
        let mut io_may_be_pending = false;
        // Parked after a reset at DONE: the VM is at its snapshot state and the guest has not
        // run since (a Reset command is then only the go).
        let mut clean = false;
        let mut state = match first {
            ThreadStart::Paused => VcpuState::Paused,
            ThreadStart::Running => VcpuState::Running,
            // The guest ran on another thread first: its last exit is handled here.
            ThreadStart::After(step) => {
                self.after_run(step, io, events, exits, &mut io_may_be_pending, &mut clean)
            }
        };
        loop {
            state = match state {
                VcpuState::Paused => match commands.recv() {
                    Ok(VcpuCommand::Resume) => {
                        clean = false;
                        VcpuState::Running
                    }
                    Ok(VcpuCommand::Pause) => {
                        let _ = events.send(VcpuEvent::Paused { id });
                        VcpuState::Paused
                    }
                    Ok(VcpuCommand::Save(msrs)) => {
                        let result = self.save_state(&msrs, &io.buses).map(Box::new);
                        let _ = events.send(VcpuEvent::Saved { id, result });
                        VcpuState::Paused
                    }
                    Ok(VcpuCommand::Restore(saved, resume)) => {
                        clean = false;
                        // An exit the guest is still in completes first, or KVM would
                        // finish it on top of the restored registers.
                        let completed = if io_may_be_pending {
                            self.complete_pending_io(&io.buses)
                        } else {
                            Ok(())
                        };
                        io_may_be_pending = false;
                        let result = completed.and_then(|()| self.load_state(&saved.0));
                        let resume = resume && result.is_ok();
                        let _ = events.send(VcpuEvent::Restored { id, result });
                        if resume {
                            VcpuState::Running
                        } else {
                            VcpuState::Paused
                        }
                    }
                    Ok(VcpuCommand::Reset(job)) if std::mem::take(&mut clean) => {
                        self.go_after_reset_at_done(&job, io, events, exits)
                    }
                    Ok(VcpuCommand::Reset(job)) => {
                        let pending = std::mem::take(&mut io_may_be_pending);
                        self.reset_here(&job, pending, io, events, exits)
                    }
                    Ok(VcpuCommand::Exit) | Err(_) => break,
                },
                VcpuState::Running => match commands.try_recv() {
                    Ok(VcpuCommand::Pause) => {
                        let _ = events.send(VcpuEvent::Paused { id });
                        VcpuState::Paused
                    }
                    // Only a paused vCPU is saved or restored (the controller pauses first).
                    Ok(VcpuCommand::Save(_)) => {
                        let result = Err(VcpuPersistError::NotPaused { id });
                        let _ = events.send(VcpuEvent::Saved { id, result });
                        VcpuState::Running
                    }
                    Ok(VcpuCommand::Restore(..)) => {
                        let result = Err(VcpuPersistError::NotPaused { id });
                        let _ = events.send(VcpuEvent::Restored { id, result });
                        VcpuState::Running
                    }
                    // Out of the guest (the kick that came with the command took it out of
                    // KVM_RUN): reset the VM here and go back in, no round trip.
                    Ok(VcpuCommand::Reset(job)) => {
                        let pending = std::mem::take(&mut io_may_be_pending);
                        self.reset_here(&job, pending, io, events, exits)
                    }
                    Ok(VcpuCommand::Exit) | Err(TryRecvError::Disconnected) => break,
                    Ok(VcpuCommand::Resume) | Err(TryRecvError::Empty) => {
                        let step = self.run_counted(io, exits);
                        self.after_run(step, io, events, exits, &mut io_may_be_pending, &mut clean)
                    }
                },
                // A finished vCPU never enters the guest again; it waits to be told to go.
                VcpuState::Finished => match commands.recv() {
                    Ok(VcpuCommand::Exit) | Err(_) => break,
                    Ok(VcpuCommand::Resume | VcpuCommand::Pause) => VcpuState::Finished,
                    Ok(VcpuCommand::Save(_)) => {
                        let result = Err(VcpuPersistError::NotPaused { id });
                        let _ = events.send(VcpuEvent::Saved { id, result });
                        VcpuState::Finished
                    }
                    Ok(VcpuCommand::Restore(..)) => {
                        let result = Err(VcpuPersistError::NotPaused { id });
                        let _ = events.send(VcpuEvent::Restored { id, result });
                        VcpuState::Finished
                    }
                    Ok(VcpuCommand::Reset(_)) => {
                        let _ = events.send(VcpuEvent::ResetDone {
                            id,
                            exits: exits.load(Ordering::Relaxed),
                            started: Instant::now(),
                            result: Err(crate::reset::ResetError::Finished),
                        });
                        VcpuState::Finished
                    }
                },
            };
        }
        self
    }

    /// The vCPU thread's state after a `KVM_RUN` (its own, or the last one
    /// [`run_here`](Self::run_here) ran before) ended in `step`.
    fn after_run(
        &mut self,
        step: Result<RunStep, VcpuError>,
        io: &VcpuIo,
        events: &Sender<VcpuEvent>,
        exits: &AtomicU64,
        io_may_be_pending: &mut bool,
        clean: &mut bool,
    ) -> VcpuState {
        let id = self.id;
        match step {
            Ok(RunStep::Interrupted) => {
                *io_may_be_pending = false;
                VcpuState::Running
            }
            Ok(RunStep::Continue) => {
                *io_may_be_pending = true;
                VcpuState::Running
            }
            Ok(RunStep::Ready) => {
                *io_may_be_pending = true;
                let _ = events.send(VcpuEvent::Ready { id });
                VcpuState::Paused
            }
            // The guest's response is with the device: reset the VM here, off the request
            // path, and wait for the go (MicroVm::reset).
            Ok(RunStep::Done) => match io.control.reset_at_done_for_vcpu() {
                Some(job) => {
                    let done_at = Instant::now();
                    let at = exits.load(Ordering::Relaxed);
                    *clean = job.run_at_done(self, &io.buses, at, done_at);
                    // A failed reset may have left the exit incomplete.
                    *io_may_be_pending = !*clean;
                    // DONEs the guest wrote in the same string instruction are no later
                    // run's.
                    io.control.take_done();
                    VcpuState::Paused
                }
                None => {
                    *io_may_be_pending = true;
                    VcpuState::Running
                }
            },
            Ok(RunStep::Exited(status)) => {
                let stop = VcpuStop::Exited(status);
                let _ = events.send(VcpuEvent::Finished { id, stop });
                VcpuState::Finished
            }
            Err(e) => {
                let stop = VcpuStop::Error(e);
                let _ = events.send(VcpuEvent::Finished { id, stop });
                VcpuState::Finished
            }
        }
    }

    /// [`VcpuCommand::Reset`] on this (out of the guest) vCPU's thread: has `job` put the
    /// VM back (the I/O exit the guest may still be in, memory, devices, this vCPU),
    /// reports [`VcpuEvent::ResetDone`] and returns the state to go on in: running the
    /// guest at once, or paused after an error (the VM is then dropped).
    fn reset_here(
        &mut self,
        job: &SharedReset,
        io_pending: bool,
        io: &VcpuIo,
        events: &Sender<VcpuEvent>,
        exits: &AtomicU64,
    ) -> VcpuState {
        let started = Instant::now();
        let id = self.id;
        let result = job.0.run_on_vcpu(self, &io.buses, io_pending);
        // A DONE written before the reset (completing the guest's last exit) is no later
        // run's.
        io.control.take_done();
        let next = if result.is_ok() {
            VcpuState::Running
        } else {
            VcpuState::Paused
        };
        let _ = events.send(VcpuEvent::ResetDone {
            id,
            exits: exits.load(Ordering::Relaxed),
            started,
            result,
        });
        next
    }

    /// [`VcpuCommand::Reset`] to a vCPU parked after a reset at DONE: the VM is back at its
    /// snapshot state already, so this is the go. Reports that reset as this command's
    /// [`VcpuEvent::ResetDone`] and runs the guest (or, should the host have dropped that
    /// reset meanwhile, does the whole reset now).
    fn go_after_reset_at_done(
        &mut self,
        job: &SharedReset,
        io: &VcpuIo,
        events: &Sender<VcpuEvent>,
        exits: &AtomicU64,
    ) -> VcpuState {
        let started = Instant::now();
        let Some((at, result)) = job.0.take_parked_result() else {
            return self.reset_here(job, false, io, events, exits);
        };
        let next = if result.is_ok() {
            VcpuState::Running
        } else {
            VcpuState::Paused
        };
        let _ = events.send(VcpuEvent::ResetDone {
            id: self.id,
            exits: at,
            started,
            result,
        });
        next
    }
}

/// The CPUID for vCPU `id`: KVM's supported CPUID with the vCPU's APIC id and the
/// hypervisor bit.
pub fn vcpu_cpuid(supported: &CpuId, id: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                // EBX[31:24]: initial APIC id. ECX[31]: running under a hypervisor.
                entry.ebx = (entry.ebx & 0x00ff_ffff) | (u32::from(id) << 24);
                entry.ecx |= 1 << 31;
            }
            // Extended topology leaves: EDX is the x2APIC id.
            0xb | 0x1f => entry.edx = u32::from(id),
            _ => {}
        }
    }
    cpuid
}

/// A flat 4 GiB 32-bit segment.
fn flat_segment(selector: u16, type_: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// What one `KVM_RUN` ended with, when the guest may go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStep {
    /// An exit was handled; run again.
    Continue,
    /// A kick interrupted `KVM_RUN`; read the commands, then run again.
    Interrupted,
    /// The guest wrote `status` to the exit port.
    Exited(u32),
    /// The guest wrote READY to the control port and the VMM asked to pause there.
    Ready,
    /// The guest wrote DONE to the control port and the VMM armed a reset for it.
    Done,
}

/// What a vCPU thread needs to handle exits: the buses and the VM's exit and control
/// signals.
#[derive(Clone, Debug)]
pub struct VcpuIo {
    /// The VM's PIO and MMIO buses.
    pub buses: Arc<Buses>,
    /// Set by the exit device.
    pub exit: ExitSignal,
    /// Set by the control device.
    pub control: ControlSignal,
    /// When a vCPU of the VM first entered `KVM_RUN`.
    pub first_run: FirstRun,
}

/// When a vCPU of a VM first entered `KVM_RUN` (how long a restore took to reach the
/// guest is measured up to here), and when one next entered it after [`FirstRun::arm_next`]
/// (the same for an in-place reset). Shared by the VM's vCPU threads.
#[derive(Clone, Debug, Default)]
pub struct FirstRun(Arc<RunClocks>);

#[derive(Debug, Default)]
struct RunClocks {
    first: OnceLock<Instant>,
    next_armed: std::sync::atomic::AtomicBool,
    next: std::sync::Mutex<Option<Instant>>,
}

impl FirstRun {
    /// Records now, if nothing is recorded yet (two atomic loads once it is).
    pub fn mark(&self) {
        self.0.first.get_or_init(Instant::now);
        if self.0.next_armed.load(Ordering::Relaxed)
            && self.0.next_armed.swap(false, Ordering::AcqRel)
        {
            let now = Instant::now();
            *self
                .0
                .next
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(now);
        }
    }

    /// When the first `KVM_RUN` started, if one did.
    pub fn get(&self) -> Option<Instant> {
        self.0.first.get().copied()
    }

    /// Forgets the last "next run" and records the next `KVM_RUN` from now on.
    pub fn arm_next(&self) {
        *self
            .0
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.0.next_armed.store(true, Ordering::Release);
    }

    /// When the first `KVM_RUN` after the last [`arm_next`](Self::arm_next) started.
    pub fn next(&self) -> Option<Instant> {
        *self
            .0
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The state of a vCPU thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// Not in the guest; waiting for a command.
    Paused,
    /// Running the guest.
    Running,
    /// The guest exited or failed on this vCPU; it will not run again.
    Finished,
}

/// What [`Vcpu::run_here`] ran: how its last `KVM_RUN` ended and the exits counted.
#[derive(Debug)]
pub struct RanHere {
    last: Result<RunStep, VcpuError>,
    exits: u64,
}

/// Where a vCPU thread starts.
enum ThreadStart {
    /// Out of the guest, waiting for a command.
    Paused,
    /// Entering the guest.
    Running,
    /// Right after a `KVM_RUN` another thread ran, which ended in this.
    After(Result<RunStep, VcpuError>),
}

/// Commands to a vCPU thread.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuCommand {
    /// Run the guest.
    Resume,
    /// Leave the guest and report [`VcpuEvent::Paused`].
    Pause,
    /// A paused vCPU reads its state (with these MSRs) and reports [`VcpuEvent::Saved`].
    Save(Arc<[u32]>),
    /// A paused vCPU takes this saved state back (an in-place reset), reports
    /// [`VcpuEvent::Restored`] and, if the flag is set and the state took, runs the guest
    /// at once (saving the controller a round trip before the guest runs again).
    Restore(SharedVcpuState, bool),
    /// Put the whole VM back to its snapshot state from this vCPU's thread (the VM's only
    /// vCPU; see `MicroVm::reset`), report [`VcpuEvent::ResetDone`] and run the guest again.
    /// To a vCPU parked after a reset at DONE, only the go (that reset is reported).
    Reset(SharedReset),
    /// End the thread.
    Exit,
}

/// An in-place reset handed to a vCPU thread (equal when it is the same job).
#[derive(Clone, Debug)]
pub struct SharedReset(pub Arc<crate::reset::ResetJob>);

impl PartialEq for SharedReset {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedReset {}

/// A saved vCPU state shared with a vCPU thread (equal when it is the same state).
#[derive(Clone, Debug)]
pub struct SharedVcpuState(pub Arc<SavedVcpu>);

impl PartialEq for SharedVcpuState {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for SharedVcpuState {}

/// Why a vCPU finished.
#[derive(Debug)]
pub enum VcpuStop {
    /// The guest wrote this status to the exit port.
    Exited(u32),
    /// KVM or the guest failed.
    Error(VcpuError),
}

/// Reports from vCPU threads.
#[derive(Debug)]
pub enum VcpuEvent {
    /// vCPU `id` left the guest because it was told to pause.
    Paused {
        /// vCPU index.
        id: u8,
    },
    /// vCPU `id` finished.
    Finished {
        /// vCPU index.
        id: u8,
        /// Why.
        stop: VcpuStop,
    },
    /// vCPU `id` wrote READY to the control port while the VMM waited for it, and paused
    /// there (see `devices::control`).
    Ready {
        /// vCPU index.
        id: u8,
    },
    /// vCPU `id` read its state after [`VcpuCommand::Save`].
    Saved {
        /// vCPU index.
        id: u8,
        /// The state, or why it could not be read.
        result: Result<Box<SavedVcpu>, VcpuPersistError>,
    },
    /// vCPU `id` took a saved state back after [`VcpuCommand::Restore`].
    Restored {
        /// vCPU index.
        id: u8,
        /// Whether every part of the state was set.
        result: Result<(), VcpuPersistError>,
    },
    /// vCPU `id` ran a [`VcpuCommand::Reset`]: the VM is back to its snapshot state and
    /// the guest runs again, or the reset failed (the vCPU is then paused).
    ResetDone {
        /// vCPU index.
        id: u8,
        /// The vCPU's exit count when it took the reset.
        exits: u64,
        /// When the vCPU took the reset (out of the guest).
        started: Instant,
        /// What the run before the reset cost, or why the reset failed.
        result: Result<crate::reset::OpStats, crate::reset::ResetError>,
    },
    /// Not from a vCPU: a device found the guest breaking its contract and stopped working;
    /// it reports on this channel so the VM's control loop wakes up and stops the VM.
    DeviceFault(crate::devices::virtio::DeviceFault),
}

/// The controlling side of a vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    id: u8,
    commands: Sender<VcpuCommand>,
    thread: Option<super::vcpu_pool::PooledThread<Result<Vcpu, ()>>>,
    state: VcpuState,
    /// Exits to the VMM so far (`KVM_RUN` returns other than kicks), counted by the thread.
    exits: Arc<AtomicU64>,
}

impl VcpuHandle {
    /// vCPU index.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Exits to the VMM so far (`KVM_RUN` returns other than kicks): one relaxed atomic
    /// add per exit on the vCPU thread.
    pub fn exit_count(&self) -> u64 {
        self.exits.load(Ordering::Relaxed)
    }

    /// The state as last reported by (or commanded to) the thread.
    pub fn state(&self) -> VcpuState {
        self.state
    }

    /// Records a state the thread reported.
    pub fn set_state(&mut self, state: VcpuState) {
        self.state = state;
    }

    /// Sends a command. Returns false if the thread is gone.
    pub fn send(&self, command: VcpuCommand) -> bool {
        self.commands.send(command).is_ok()
    }

    /// Kicks the thread out of `KVM_RUN` so it reads its commands.
    pub fn kick(&self) {
        if let Some(thread) = &self.thread {
            // ESRCH (the thread already ended) is fine: it reads no more commands anyway.
            let _ = thread.kill(kick_signal());
        }
    }

    /// Tells the thread to end, kicks it and waits for it. Returns the vCPU (for saving its
    /// state), or `None` if the thread panicked or was already joined.
    pub fn stop(&mut self) -> Option<Vcpu> {
        let _ = self.commands.send(VcpuCommand::Exit);
        self.kick();
        let vcpu = self.thread.take()?.join().ok()?.ok();
        self.state = VcpuState::Finished;
        vcpu
    }
}

impl Drop for VcpuHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The signal that kicks a vCPU thread out of `KVM_RUN` (the first real-time signal).
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

thread_local! {
    /// This thread's `kvm_run`, if it is a vCPU thread; read by the kick signal handler.
    static THIS_VCPU_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Publishes a vCPU's `kvm_run` to this thread's kick handler; unpublishes it on drop
/// (before the vCPU fd, and with it the `kvm_run` mapping, can go away).
struct KickTarget;

impl KickTarget {
    fn set(run: &mut kvm_run) -> KickTarget {
        THIS_VCPU_RUN.with(|c| c.set(run));
        KickTarget
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        THIS_VCPU_RUN.with(|c| c.set(std::ptr::null_mut()));
    }
}

/// A kick of the calling thread at a set time: a POSIX timer that sends this thread the kick
/// signal, so a `KVM_RUN` the thread is in returns (`EINTR`). One timer per thread, made on
/// first use and re-armed each time; disarmed when the `KickTimer` drops.
struct KickTimer;

/// This thread's kick timer (deleted when the thread ends).
struct ThreadTimer(libc::timer_t);

impl Drop for ThreadTimer {
    fn drop(&mut self) {
        // SAFETY: the timer was made by timer_create on this thread and is deleted once.
        unsafe { libc::timer_delete(self.0) };
    }
}

thread_local! {
    static KICK_TIMER: std::cell::OnceCell<ThreadTimer> = const { std::cell::OnceCell::new() };
}

impl KickTimer {
    /// Arms this thread's timer to kick it at `at` (at once if `at` has passed).
    fn arm(at: Instant) -> std::io::Result<KickTimer> {
        let after = at
            .saturating_duration_since(Instant::now())
            .max(Duration::from_micros(1));
        KICK_TIMER.with(|cell| {
            let timer = match cell.get() {
                Some(t) => t.0,
                None => {
                    // SAFETY: a zeroed sigevent is a valid value; the fields set below are
                    // the ones SIGEV_THREAD_ID reads.
                    let mut event: libc::sigevent = unsafe { std::mem::zeroed() };
                    event.sigev_notify = libc::SIGEV_THREAD_ID;
                    event.sigev_signo = kick_signal();
                    // SAFETY: gettid has no preconditions.
                    event.sigev_notify_thread_id = unsafe { libc::gettid() };
                    let mut timer: libc::timer_t = std::ptr::null_mut();
                    // SAFETY: `event` and `timer` are valid for the call; the timer signals
                    // this thread, which stays alive as long as the thread-local holding it.
                    let r = unsafe {
                        libc::timer_create(libc::CLOCK_MONOTONIC, &mut event, &mut timer)
                    };
                    if r != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let _ = cell.set(ThreadTimer(timer));
                    timer
                }
            };
            set_timer(timer, after)
        })?;
        Ok(KickTimer)
    }
}

impl Drop for KickTimer {
    fn drop(&mut self) {
        KICK_TIMER.with(|cell| {
            if let Some(t) = cell.get() {
                let _ = set_timer(t.0, Duration::ZERO);
            }
        });
    }
}

/// The kick signal unblocked on the calling thread; its mask as it was on drop.
struct KickUnblocked(libc::sigset_t);

impl KickUnblocked {
    fn new() -> KickUnblocked {
        // SAFETY: sigemptyset/sigaddset initialise `set`; pthread_sigmask reads `set` and
        // writes the old mask to `old`, both valid for the call.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, kick_signal());
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, &mut old);
            KickUnblocked(old)
        }
    }
}

impl Drop for KickUnblocked {
    fn drop(&mut self) {
        // SAFETY: puts back the mask `new` read from this thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.0, std::ptr::null_mut()) };
    }
}

/// Arms `timer` to fire once after `after` (zero disarms it).
fn set_timer(timer: libc::timer_t, after: Duration) -> std::io::Result<()> {
    let spec = libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        },
        it_value: libc::timespec {
            tv_sec: after.as_secs() as libc::time_t,
            tv_nsec: after.subsec_nanos() as libc::c_long,
        },
    };
    // SAFETY: `timer` is a live timer of this process; `spec` is valid for the call.
    let r = unsafe { libc::timer_settime(timer, 0, &spec, std::ptr::null_mut()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The kick handler: async-signal-safe (a thread-local read and a volatile store).
extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = THIS_VCPU_RUN.try_with(|c| {
        let run = c.get();
        if !run.is_null() {
            // SAFETY: `run` was published by this thread's KickTarget, which unpublishes it
            // before the vCPU fd that owns the mapping is dropped; the handler runs on the
            // same thread, so the mapping is alive. A volatile store of a u8 field is sound
            // even if it interrupts the thread's own accesses to kvm_run.
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
        }
    });
    compiler_fence(Ordering::SeqCst);
}

/// Installs the kick handler once per process.
fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    (*INSTALLED.get_or_init(|| register_signal_handler(kick_signal(), handle_kick)))
        .map_err(VcpuError::SignalHandler)
}

#[cfg(test)]
mod tests {
    use kvm_bindings::{kvm_cpuid_entry2, KVM_MAX_CPUID_ENTRIES};

    use super::*;

    #[test]
    fn cpuid_gets_the_apic_id() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xab12_3456,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                edx: 7,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0,
                ebx: 0x756e_6547,
                ..Default::default()
            },
        ];
        let supported = CpuId::from_entries(&entries).unwrap();
        assert!(supported.as_slice().len() <= KVM_MAX_CPUID_ENTRIES);
        let c = vcpu_cpuid(&supported, 3);
        let s = c.as_slice();
        assert_eq!(s[0].ebx, 0x0312_3456);
        assert_eq!(s[0].ecx >> 31, 1);
        assert_eq!(s[1].edx, 3);
        assert_eq!(s[2].ebx, 0x756e_6547);
    }

    #[test]
    fn flat_segments_cover_4g() {
        let cs = flat_segment(BOOT_CS, SEG_TYPE_CODE);
        assert_eq!(
            (cs.base, cs.limit, cs.db, cs.l, cs.g),
            (0, 0xffff_ffff, 1, 0, 1)
        );
    }

    #[test]
    fn internal_error_names() {
        let e = VcpuError::InternalError { suberror: 1 };
        assert_eq!(
            e.to_string(),
            "KVM internal error (KVM_EXIT_INTERNAL_ERROR, instruction emulation failed)"
        );
    }
}
