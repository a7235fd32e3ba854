//! In-place reset: putting a restored VM back to its snapshot state after an invocation,
//! instead of building a new one ([`MicroVm::reset`]).
//!
//! A VM restored with [`crate::restore::RestoreOptions::reset`] keeps the decoded snapshot
//! (`ResetState`) and has KVM log the pages the guest writes (`KVM_MEM_LOG_DIRTY_PAGES`).
//! A reset takes the vCPUs out of the guest, holds the virtio devices still, lets them send
//! everything the guest queued for the host (the last response: it is never cut), and then:
//! 1. memory: the pages the guest dirtied (`KVM_GET_DIRTY_LOG`) and the pages the devices
//!    wrote (which the dirty log does not see: packets in receive buffers, the used rings)
//!    go back to the snapshot's bytes, by [`ResetMode`];
//! 2. the irqchip and clock, then the devices (transport registers, vsock queues and the
//!    connection's counters: the host client stays connected, the guest is back at the same
//!    point of the same connection, so no new handshake is needed) and every vCPU (in its
//!    thread) take their saved state back;
//! 3. a fresh seed is written for the guest's random source (`abi::entropy`), and the VM
//!    resumes.
//!
//! **At DONE, off the request path.** A VM with one vCPU (fnode's functions) is reset by its
//! vCPU thread. The guest writes `abi::control::DONE` once its response is with the device;
//! the vCPU thread that takes that exit runs the whole reset right there, while the host
//! reads the response, and then *parks*: out of the guest, at the snapshot state, waiting
//! for a command. [`MicroVm::reset`] then only tells it to go (no kick, no work): its host
//! time is the vCPU thread's wake-up. Nothing runs in the guest between the reset and that
//! go, so the guest cannot skip a reset by writing DONE early or twice: a DONE only ever
//! ends the run it is in (a guest that writes it before answering loses its own invocation,
//! which then times out as one that stops answering does), and any other way back into the
//! guest (`MicroVm::resume`) forgets the parked reset, so the next `reset` does it in full.
//! The host may read the response before the guest got to its DONE: [`MicroVm::run_stats`],
//! which the host calls once it has the response, waits for the DONE (briefly, and only for
//! a guest that writes it) and for its reset, and a `reset` called while that reset is
//! under way waits for it too.
//!
//! **On the request path (fallback).** If `reset` is called while no reset at DONE is parked
//! (a guest kernel that does not write DONE, a function that failed, a VM resumed since),
//! the host sends the vCPU thread a [`ResetJob`] and kicks it out of `KVM_RUN`; the thread
//! does all of the above and enters the guest again at once. If the reset at DONE is still
//! running, `reset` waits for it (no kick needed). A VM with several vCPUs pauses them all
//! first (no vCPU may run while memory is put back), then has each reload its state in its
//! thread.
//!
//! [`OpStats`] counts what the run before the reset cost (userspace exits, pages dirtied),
//! the reset's host time up to the guest running again, and where the reset's work went
//! ([`ResetPhases`], which says whether it ran at DONE).

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use fnode_guest::abi;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MmapRegion};

use crate::devices::bus::Buses;
use crate::devices::virtio::setup::{SetupError, VirtioDevices, VirtioState};
use crate::microvm::{MicroVm, MicroVmError, VmState as RunState};
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::{SharedReset, SharedVcpuState, Vcpu, VcpuCommand, VcpuEvent, VcpuState};
use crate::vstate::vcpu_persist::{VcpuPersistError, VcpuState as SavedVcpu, MAX_IO_STEPS};
use crate::vstate::vm::{Vm, VmError};
use crate::vstate::vm_persist::{VmPersistError, VmState};

/// Longest wait for the host I/O of the last exchange to finish before a reset (a send to
/// the client whose completion the device has not seen yet; normally microseconds).
const SETTLE_LIMIT: Duration = Duration::from_millis(100);

/// Longest wait of [`MicroVm::run_stats`] for the DONE of a guest that writes it: the host
/// has the response by then, and the guest writes DONE a few instructions after handing it
/// over.
const DONE_GRACE: Duration = Duration::from_millis(1);

/// Guest page size.
const PAGE: usize = abi::layout::PAGE_SIZE as usize;

/// Most exits completing the guest's DONE write may take: one for the plain `out` the
/// guest kernel uses; a guest that made it a long `rep outs` fails its reset instead (the
/// VM is then dropped) rather than holding the vCPU thread, and the host waiting on it.
const DONE_IO_STEPS: u32 = 16;

/// How a reset puts guest memory back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResetMode {
    /// Copy the snapshot's bytes over each dirtied page from a read-only shared mapping of
    /// the memory file: the VM keeps its private copies (no new faults next time).
    #[default]
    CopyBack,
    /// `MADV_DONTNEED` each dirtied page of the `MAP_PRIVATE` mapping: the private copy is
    /// dropped and the next access maps the file's page again (a fault per page).
    DropPages,
}

impl std::str::FromStr for ResetMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "copy" => Ok(ResetMode::CopyBack),
            "dontneed" => Ok(ResetMode::DropPages),
            other => Err(format!(
                "unknown reset mode {other:?}: expected copy or dontneed"
            )),
        }
    }
}

/// Errors of an in-place reset. After one, the VM is in no known state: drop it.
#[derive(Debug, thiserror::Error)]
pub enum ResetError {
    /// The VM was not restored with reset enabled.
    #[error("the VM keeps no snapshot state to reset to: restore it with reset enabled")]
    NotResettable,
    /// The VM finished (its guest exited or failed): it is not reset.
    #[error("the VM finished; a finished VM is dropped, not reset")]
    Finished,
    /// Pausing or reaching the vCPU threads failed.
    #[error("cannot pause the VM")]
    Control(#[source] MicroVmError),
    /// The dirty log could not be read.
    #[error("cannot read the guest's dirty pages")]
    DirtyLog(#[source] VmError),
    /// Guest memory could not be put back.
    #[error("cannot put guest memory back ({what})")]
    Memory {
        /// What failed.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The irqchip or clock could not be set.
    #[error("cannot reset the irqchip and clock")]
    Vm(#[source] VmPersistError),
    /// A device could not take its state back.
    #[error("cannot reset the virtio devices")]
    Devices(#[source] SetupError),
    /// A vCPU could not take its state back.
    #[error("cannot reset vCPU {id}")]
    Vcpu {
        /// vCPU index.
        id: u8,
        /// Why.
        #[source]
        source: VcpuPersistError,
    },
}

/// What a resettable VM keeps of its snapshot.
#[derive(Debug)]
pub(crate) struct ResetState {
    /// The snapshot's state and handles on what a reset puts back (shared with the vCPU
    /// thread that runs it).
    job: Arc<ResetJob>,
    /// Exit count at the last restore or reset.
    exits_at_start: u64,
    /// When the last reset was asked for.
    requested_at: Option<Instant>,
    /// The guest's DONE count when a wait for it last ran out ([`MicroVm::run_stats`]): a
    /// guest that does not write DONE is not waited for again until it does.
    done_wait_gave_up_at: Option<u64>,
}

/// An in-place reset, as whichever thread runs it needs it: the snapshot's vCPU, VM and
/// device state, and handles on the VM, its memory and its devices.
#[derive(Debug)]
pub struct ResetJob {
    vcpus: Vec<Arc<SavedVcpu>>,
    vm_state: VmState,
    virtio_state: VirtioState,
    mode: ResetMode,
    /// The memory file mapped shared and read-only (copy-back's source).
    original: Option<MmapRegion>,
    vm: Arc<Vm>,
    memory: GuestMemory,
    /// The VM's devices (handles only: the VM owns their event loop).
    devices: VirtioDevices,
    /// The dirty pages read so far and the reset done at DONE. Every reset and every read
    /// of the dirty log holds it, so none misses a page another took; the vCPU thread holds
    /// it through a whole reset at DONE, so the host thread's `reset` and `run_stats` wait
    /// for one that is under way.
    account: Mutex<Account>,
    /// Signalled when the vCPU thread parks after a reset at DONE.
    parked_cv: Condvar,
}

/// What [`ResetJob::account`] guards.
#[derive(Debug, Default)]
struct Account {
    /// Guest pages read from the dirty log (by [`MicroVm::run_stats`]) since the last reset,
    /// not yet put back.
    pending: Vec<u64>,
    /// The reset the vCPU thread ran at the guest's DONE, while it waits parked for the go.
    /// Taken by the next [`MicroVm::reset`] (which then only lets the vCPU go) or dropped by
    /// anything else that lets it run (then the next reset is done in full).
    parked: Option<AtDone>,
}

/// A reset run at the guest's DONE.
#[derive(Debug)]
struct AtDone {
    /// The vCPU's exit count at DONE.
    exits: u64,
    /// What the run before it cost and the reset's phases, or why it failed (the VM is then
    /// in no known state).
    result: Result<OpStats, ResetError>,
}

impl ResetState {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        vcpus: Vec<Arc<SavedVcpu>>,
        vm_state: VmState,
        virtio_state: VirtioState,
        mode: ResetMode,
        original: Option<MmapRegion>,
        vm: Arc<Vm>,
        memory: GuestMemory,
        devices: VirtioDevices,
    ) -> Self {
        ResetState {
            job: Arc::new(ResetJob {
                vcpus,
                vm_state,
                virtio_state,
                mode,
                original,
                vm,
                memory,
                devices,
                account: Mutex::new(Account::default()),
                parked_cv: Condvar::new(),
            }),
            exits_at_start: 0,
            requested_at: None,
            done_wait_gave_up_at: None,
        }
    }
}

impl ResetJob {
    fn account(&self) -> MutexGuard<'_, Account> {
        // A panic while holding it left at worst a page list longer than needed.
        self.account.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The snapshot's state of vCPU `id`.
    fn saved_vcpu(&self, id: u8) -> Result<&SavedVcpu, ResetError> {
        self.vcpus
            .iter()
            .find(|s| s.id == id)
            .map(|s| &**s)
            .ok_or(ResetError::Vcpu {
                id,
                source: VcpuPersistError::WrongVcpu {
                    expected: id,
                    found: self.vcpus.first().map_or(id, |s| s.id),
                },
            })
    }

    /// The whole reset on the VM's only vCPU, from its thread, out of the guest: the I/O
    /// exit the guest may still be in (`io_pending`), memory and devices, then the vCPU's
    /// own state. What [`VcpuCommand::Reset`] runs when no reset at DONE is parked.
    pub(crate) fn run_on_vcpu(
        &self,
        vcpu: &mut Vcpu,
        buses: &Buses,
        io_pending: bool,
    ) -> Result<OpStats, ResetError> {
        let mut account = self.account();
        // A reset at DONE that failed after the host found nothing parked is superseded by
        // this full one: its result must not reach the next run's stats or reset.
        account.parked = None;
        let io = io_pending.then_some(MAX_IO_STEPS);
        self.reset_vcpu_thread(vcpu, buses, io, &mut account)
    }

    /// The reset at the guest's DONE, on the VM's only vCPU (out of the guest, in the I/O
    /// exit of the DONE write): [`run_on_vcpu`](Self::run_on_vcpu)'s work, its result
    /// parked for the next [`MicroVm::reset`]. `exits`: the vCPU's exit count at DONE;
    /// `done_at`: when the exit came back. Returns whether the VM is back at its snapshot
    /// state (the vCPU then waits for the go).
    pub(crate) fn run_at_done(
        &self,
        vcpu: &mut Vcpu,
        buses: &Buses,
        exits: u64,
        done_at: Instant,
    ) -> bool {
        let mut account = self.account();
        let result = self
            .reset_vcpu_thread(vcpu, buses, Some(DONE_IO_STEPS), &mut account)
            .map(|mut stats| {
                stats.phases.at_done = true;
                stats.phases.done_to_parked = done_at.elapsed();
                stats
            });
        let reset = result.is_ok();
        account.parked = Some(AtDone { exits, result });
        drop(account);
        self.parked_cv.notify_all();
        reset
    }

    /// Takes the reset parked at DONE, if there is one (waiting for one under way).
    fn take_parked(&self) -> Option<AtDone> {
        self.account().parked.take()
    }

    /// [`take_parked`](Self::take_parked) for the vCPU thread: the exit count at DONE and
    /// the reset's result.
    pub(crate) fn take_parked_result(&self) -> Option<(u64, Result<OpStats, ResetError>)> {
        self.take_parked().map(|p| (p.exits, p.result))
    }

    /// The reset parked at DONE, if any, is forgotten: the vCPU is about to run the guest
    /// for another reason, so the next reset must be done in full.
    pub(crate) fn forget_parked(&self) {
        self.account().parked = None;
    }

    /// The reset on the vCPU's thread. `pending_io`: the vCPU's last exit was an I/O access
    /// (KVM completes it at the next `KVM_RUN`), to complete within at most this many exits.
    fn reset_vcpu_thread(
        &self,
        vcpu: &mut Vcpu,
        buses: &Buses,
        pending_io: Option<u32>,
        account: &mut Account,
    ) -> Result<OpStats, ResetError> {
        let id = vcpu.id();
        let saved = self.saved_vcpu(id)?;
        let start = Instant::now();
        // KVM completes an I/O exit (moves rip past the instruction) at the next KVM_RUN,
        // after it took the registers the reload hands it: complete it first.
        if let Some(steps) = pending_io {
            vcpu.complete_pending_io_within(buses, steps)
                .map_err(|source| ResetError::Vcpu { id, source })?;
        }
        let mut stats = self.put_back(account, start)?;
        let last = Instant::now();
        vcpu.load_state(saved)
            .map_err(|source| ResetError::Vcpu { id, source })?;
        stats.phases.vcpus = last.elapsed();
        Ok(stats)
    }

    /// Memory, irqchip, clock and devices back to the snapshot; the vCPUs must be out of the
    /// guest. `start`: when the reset's work began (the settle phase runs from there).
    /// Returns the pages put back and the phases' times (all but the vCPUs').
    fn put_back(&self, account: &mut Account, start: Instant) -> Result<OpStats, ResetError> {
        // Everything the guest queued goes out to the host clients first: a response the
        // guest handed over right before DONE is never cut by the reset. The devices are
        // let go between looks (their event loop carries the host I/O out), then held
        // still for the reset, with a last look that waits for nothing.
        self.devices.settle_host_io(Instant::now() + SETTLE_LIMIT);
        let mut quiesced = self.devices.quiesce();
        quiesced.settle_host_io(Instant::now());
        let mut phases = ResetPhases {
            settle: start.elapsed(),
            ..ResetPhases::default()
        };
        let mut last = Instant::now();
        let mut lap = move || {
            let now = Instant::now();
            let d = now - last;
            last = now;
            d
        };
        let memory = &self.memory;
        let region = memory.iter().next().ok_or(ResetError::Memory {
            what: "no guest memory region",
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        let size = region.len() as usize;
        let bitmap = self
            .vm
            .take_dirty_log(0, size)
            .map_err(ResetError::DirtyLog)?;
        let pending = std::mem::take(&mut account.pending);
        let guest_pages = merge(&pending, &dirty_pages(&bitmap));
        let device_pages = quiesced.take_written_pages();
        let pages = merge(&guest_pages, &device_pages);
        let total_pages = (size / PAGE) as u64;
        for (first, count) in runs(&pages) {
            if first >= total_pages {
                break;
            }
            let count = count.min(total_pages - first) as usize;
            let offset = first as usize * PAGE;
            let len = count * PAGE;
            match (self.mode, &self.original) {
                (ResetMode::CopyBack, Some(original)) if original.size() >= offset + len => {
                    // SAFETY: both mappings are live for the call (the region is borrowed
                    // from the job's memory, the original from the job) and `offset + len`
                    // lies inside both (checked against the region's size and the
                    // original's length). They are distinct mappings. Nothing else writes
                    // the guest's pages now: the vCPUs are out of the guest and the devices
                    // are held by `quiesced`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            original.as_ptr().add(offset),
                            region.as_ptr().add(offset),
                            len,
                        )
                    };
                }
                _ => {
                    // SAFETY: `offset + len` lies inside the guest's MAP_PRIVATE file
                    // mapping; MADV_DONTNEED drops the private copies, and the next access
                    // maps the snapshot's page again. No Rust reference into these pages
                    // is live (the vCPUs are out of the guest, the devices are held).
                    let r = unsafe {
                        libc::madvise(region.as_ptr().add(offset).cast(), len, libc::MADV_DONTNEED)
                    };
                    if r != 0 {
                        return Err(ResetError::Memory {
                            what: "madvise(MADV_DONTNEED)",
                            source: std::io::Error::last_os_error(),
                        });
                    }
                }
            }
        }
        write_seed(memory);
        phases.memory = lap();
        self.vm
            .restore_state(&self.vm_state)
            .map_err(ResetError::Vm)?;
        quiesced
            .reset_to(&self.virtio_state)
            .map_err(ResetError::Devices)?;
        drop(quiesced);
        phases.vm_and_devices = lap();
        Ok(OpStats {
            phases,
            exits: 0,
            dirtied_pages: guest_pages.len() as u64,
            device_pages: device_pages.len() as u64,
            reset_time: Duration::ZERO,
            mode: self.mode,
        })
    }
}

/// What one invocation (the run between a restore or reset and the next reset) cost, and
/// what the reset after it took. For benchmarks: read it after each operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpStats {
    /// Userspace exits (`KVM_RUN` returns other than kicks) during the run.
    pub exits: u64,
    /// Guest pages the guest wrote during the run (KVM's dirty log).
    pub dirtied_pages: u64,
    /// Guest pages the devices wrote (packets, used rings; counted conservatively).
    pub device_pages: u64,
    /// The reset's host time from [`MicroVm::reset`] being called to the VM resumed
    /// (the time to the guest's first `KVM_RUN` is [`MicroVm::reset_to_first_run`]).
    pub reset_time: Duration,
    /// How memory was put back.
    pub mode: ResetMode,
    /// Where the reset's host time went.
    pub phases: ResetPhases,
}

/// The host time of each phase of a reset.
///
/// `pause` and `wait` are on the request path (from [`MicroVm::reset`] being called). The
/// work (`settle` to `vcpus`) is too when the reset ran there; a reset run at the guest's
/// DONE (`at_done`) did it before `reset` was called, while the host read the response.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResetPhases {
    /// Getting the vCPUs out of the guest (the kick) for a reset run on the request path.
    pub pause: Duration,
    /// Waiting for a reset at DONE that was still under way when the reset was called.
    pub wait: Duration,
    /// Completing the guest's last I/O exit and letting the devices send everything the
    /// guest queued to the host clients (and the host I/O of the last exchange finish).
    pub settle: Duration,
    /// Reading the dirty log and putting the pages back.
    pub memory: Duration,
    /// Irqchip, clock and devices.
    pub vm_and_devices: Duration,
    /// Every vCPU's state, set in its thread.
    pub vcpus: Duration,
    /// The work ran at the guest's DONE, off the request path.
    pub at_done: bool,
    /// For a reset at DONE: from the DONE exit back on the vCPU thread to the vCPU parked
    /// at the snapshot state (the whole reset, as the vCPU thread spent it).
    pub done_to_parked: Duration,
}

impl ResetPhases {
    /// The phases on the request path, each name and time, in order (what benchmarks
    /// print): the reset's work among them unless it ran at DONE.
    pub fn phases(&self) -> Vec<(&'static str, Duration)> {
        let mut out = vec![("pause", self.pause), ("wait", self.wait)];
        if !self.at_done {
            out.extend(self.work(["settle", "memory", "vm_and_devices", "vcpus"]));
        }
        out
    }

    /// For a reset at DONE, its work, named `at_done.*`, and `at_done.total` (DONE to
    /// parked): off the request path, so not part of the reset's host time. Empty for a
    /// reset on the request path.
    pub fn at_done_phases(&self) -> Vec<(&'static str, Duration)> {
        if !self.at_done {
            return Vec::new();
        }
        let mut out = self.work([
            "at_done.settle",
            "at_done.memory",
            "at_done.vm_and_devices",
            "at_done.vcpus",
        ]);
        out.push(("at_done.total", self.done_to_parked));
        out
    }

    fn work(&self, names: [&'static str; 4]) -> Vec<(&'static str, Duration)> {
        let times = [self.settle, self.memory, self.vm_and_devices, self.vcpus];
        names.into_iter().zip(times).collect()
    }
}

/// A fresh seed for the guest's random source.
pub(crate) fn fresh_seed() -> abi::entropy::Seed {
    let mut words = [0u64; 5];
    let mut bytes = [0u8; 40];
    fill_random(&mut bytes);
    for (i, w) in words.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
        *w = u64::from_le_bytes(b);
    }
    abi::entropy::Seed {
        magic: abi::entropy::MAGIC,
        generation: words[0],
        seed: [words[1], words[2], words[3], words[4]],
    }
}

/// Fills `buf` from the kernel's generator (`getrandom(2)`, which blocks only before the
/// host's pool is initialised, long past at any VM's start).
fn fill_random(buf: &mut [u8]) {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, writable memory we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n > 0 {
            done += n as usize;
        } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            // getrandom cannot fail on Linux >= 3.17 with a valid buffer; if it does, the
            // time and the address of this frame are what is left (restores still differ).
            let t = Instant::now().elapsed().as_nanos() as u64 ^ (rest.as_ptr() as u64);
            for (i, b) in rest.iter_mut().enumerate() {
                *b = (t >> ((i % 8) * 8)) as u8 ^ i as u8;
            }
            return;
        }
    }
}

/// Writes a fresh seed into guest memory at `abi::entropy::ADDR`.
pub(crate) fn write_seed(memory: &crate::vstate::memory::GuestMemory) {
    // The address is inside the smallest guest memory fnode builds (the abi's layout).
    let _ = memory.write_slice(&fresh_seed().encode(), GuestAddress(abi::entropy::ADDR));
}

/// Runs of consecutive page frames in `pages` (sorted): (first, count).
fn runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some((start, n)) if *start + *n == p => *n += 1,
            _ => out.push((p, 1)),
        }
    }
    out
}

/// The page frames whose bits are set in a dirty bitmap.
fn dirty_pages(bitmap: &[u64]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (i, &word) in bitmap.iter().enumerate() {
        let mut w = word;
        while w != 0 {
            let bit = w.trailing_zeros();
            pages.push(i as u64 * 64 + u64::from(bit));
            w &= w - 1;
        }
    }
    pages
}

/// Merges two sorted page lists without duplicates.
fn merge(a: &[u64], b: &[u64]) -> Vec<u64> {
    let mut out = Vec::with_capacity(a.len() + b.len());
    out.extend_from_slice(a);
    out.extend_from_slice(b);
    out.sort_unstable();
    out.dedup();
    out
}

impl MicroVm {
    /// Whether the VM can be reset in place.
    pub fn is_resettable(&self) -> bool {
        self.reset.is_some()
    }

    /// For a resettable VM with one vCPU: has the vCPU run the reset at the guest's DONE
    /// (see the module doc). Restore calls it once the reset state is in place.
    pub(crate) fn arm_reset_at_done(&self) {
        if let (Some(rs), 1) = (&self.reset, self.vcpus.len()) {
            self.control().arm_reset_at_done(rs.job.clone());
        }
    }

    /// Whatever lets the vCPU run the guest other than [`MicroVm::reset`] calls this first:
    /// a reset parked at DONE no longer holds once the guest ran (the next reset is done in
    /// full).
    pub(crate) fn forget_reset_at_done(&self) {
        if let Some(rs) = &self.reset {
            rs.job.forget_parked();
        }
    }

    /// Puts the VM back to its snapshot state (see the module doc) and resumes it: the
    /// guest serves its next request as if freshly restored. Call it once the host has read
    /// the response (the guest then waits for the next request). Returns what the run
    /// before it cost. When the guest already got its reset at DONE, this only lets the
    /// vCPU go and returns at once (it does not wait for the guest to run).
    pub fn reset(&mut self) -> Result<OpStats, ResetError> {
        let requested_at = Instant::now();
        if self.reset.is_none() {
            return Err(ResetError::NotResettable);
        }
        if self.state == RunState::Finished {
            return Err(ResetError::Finished);
        }
        let Some(mut rs) = self.reset.take() else {
            return Err(ResetError::NotResettable);
        };
        let result = if self.vcpus.len() == 1 {
            self.reset_on_vcpu_thread(&rs, requested_at)
        } else {
            self.reset_paused(&rs, requested_at)
        };
        if let Ok((_, exits)) = &result {
            rs.exits_at_start = *exits;
            rs.requested_at = Some(requested_at);
        }
        self.reset = Some(rs);
        let (mut stats, _) = result?;
        stats.reset_time = requested_at.elapsed();
        Ok(stats)
    }

    /// The reset of a VM with one vCPU, run by its thread (see the module doc): at DONE
    /// already, or now. Returns the stats and the exit count at the reset.
    fn reset_on_vcpu_thread(
        &mut self,
        rs: &ResetState,
        requested_at: Instant,
    ) -> Result<(OpStats, u64), ResetError> {
        self.first_run.arm_next();
        // A reset at DONE under way holds the account: this waits for it.
        let parked = rs.job.take_parked();
        let waited = requested_at.elapsed();
        let vcpu = &mut self.vcpus[0];
        let id = vcpu.id();
        if let Some(at_done) = parked {
            // The vCPU waits for a command, out of the guest: no kick, just the go.
            let mut stats = match at_done.result {
                Ok(stats) => stats,
                Err(e) => {
                    vcpu.set_state(VcpuState::Paused);
                    self.state = RunState::Paused;
                    return Err(e);
                }
            };
            if !vcpu.send(VcpuCommand::Resume) {
                return Err(ResetError::Control(MicroVmError::VcpuThreadGone { id }));
            }
            vcpu.set_state(VcpuState::Running);
            self.state = RunState::Running;
            stats.phases.wait = waited;
            stats.exits = at_done.exits.saturating_sub(rs.exits_at_start);
            return Ok((stats, at_done.exits));
        }
        if !vcpu.send(VcpuCommand::Reset(SharedReset(rs.job.clone()))) {
            return Err(ResetError::Control(MicroVmError::VcpuThreadGone { id }));
        }
        // A paused vCPU waits for commands outside KVM_RUN; a running one needs the kick.
        // (One that is just taking a DONE exit is kicked for nothing: it resets at DONE,
        // parks, and then takes this command as the go.)
        if vcpu.state() == VcpuState::Running {
            vcpu.kick();
        }
        loop {
            match self.events.recv() {
                Ok(VcpuEvent::ResetDone {
                    id,
                    exits,
                    started,
                    result,
                }) => {
                    let state = match &result {
                        Ok(_) => VcpuState::Running,
                        Err(ResetError::Finished) => VcpuState::Finished,
                        Err(_) => VcpuState::Paused,
                    };
                    if let Some(v) = self.vcpus.iter_mut().find(|v| v.id() == id) {
                        v.set_state(state);
                    }
                    self.state = match state {
                        VcpuState::Running => RunState::Running,
                        VcpuState::Finished => RunState::Finished,
                        VcpuState::Paused => RunState::Paused,
                    };
                    let mut stats = result?;
                    let took = started.saturating_duration_since(requested_at);
                    if stats.phases.at_done {
                        stats.phases.wait = took;
                    } else {
                        stats.phases.pause = took;
                    }
                    stats.exits = exits.saturating_sub(rs.exits_at_start);
                    return Ok((stats, exits));
                }
                Ok(other) => {
                    self.record(other);
                }
                Err(_) => return Err(ResetError::Control(MicroVmError::AllVcpuThreadsGone)),
            }
        }
    }

    /// The reset of a VM with several vCPUs: all paused, memory and devices put back on
    /// this thread, then each vCPU reloads its state in its thread and runs again.
    fn reset_paused(
        &mut self,
        rs: &ResetState,
        requested_at: Instant,
    ) -> Result<(OpStats, u64), ResetError> {
        if self.pause().map_err(ResetError::Control)?.is_some() {
            return Err(ResetError::Finished);
        }
        let exits = self.exit_count();
        let paused = requested_at.elapsed();
        let mut stats = rs.job.put_back(&mut rs.job.account(), Instant::now())?;
        let last = Instant::now();
        // Each vCPU takes its state back and runs the guest at once.
        self.first_run.arm_next();
        self.restore_vcpus(&rs.job.vcpus)?;
        stats.phases.vcpus = last.elapsed();
        stats.phases.pause = paused;
        stats.exits = exits.saturating_sub(rs.exits_at_start);
        Ok((stats, exits))
    }

    /// Has every (paused) vCPU take its saved state back, in its thread, and run the guest
    /// again right after (the VM is running when this returns `Ok`).
    fn restore_vcpus(&mut self, saved: &[Arc<SavedVcpu>]) -> Result<(), ResetError> {
        for (vcpu, state) in self.vcpus.iter().zip(saved) {
            let command = VcpuCommand::Restore(SharedVcpuState(state.clone()), true);
            if !vcpu.send(command) {
                return Err(ResetError::Control(MicroVmError::VcpuThreadGone {
                    id: vcpu.id(),
                }));
            }
        }
        let mut left = self.vcpus.len().min(saved.len());
        let mut first_error = None;
        while left > 0 {
            match self.events.recv() {
                Ok(VcpuEvent::Restored { id, result }) => {
                    left -= 1;
                    match result {
                        Ok(()) => {
                            if let Some(v) = self.vcpus.iter_mut().find(|v| v.id() == id) {
                                v.set_state(VcpuState::Running);
                            }
                        }
                        Err(source) => {
                            first_error.get_or_insert(ResetError::Vcpu { id, source });
                        }
                    }
                }
                Ok(other) => {
                    self.record(other);
                }
                Err(_) => return Err(ResetError::Control(MicroVmError::AllVcpuThreadsGone)),
            }
        }
        // Running, or partly: after an error the caller drops the VM.
        self.state = RunState::Running;
        first_error.map_or(Ok(()), Err)
    }

    /// For a VM that was reset and has run since: the host time from [`MicroVm::reset`]
    /// being called to the guest's first `KVM_RUN` after it.
    pub fn reset_to_first_run(&self) -> Option<Duration> {
        let requested = self.reset.as_ref()?.requested_at?;
        Some(self.first_run.next()?.saturating_duration_since(requested))
    }

    /// What the run since the restore (or the last reset) has cost so far: exits, and the
    /// pages the guest dirtied (from KVM's dirty log; the pages read are kept for the next
    /// reset, which puts them back too). Call it once the host has the response. A run ends
    /// at the guest's DONE, which it writes a few instructions after handing the response
    /// over: for a VM reset at DONE this waits for it (at most a millisecond for the DONE,
    /// then for the reset), so that the next [`MicroVm::reset`] finds the work done, and
    /// reports the run as that reset counted it (with the pages the devices wrote). A guest
    /// that let a wait run out without a DONE is not waited for again until it writes one.
    /// `None` for a VM without reset.
    pub fn run_stats(&mut self) -> Option<OpStats> {
        let control = self.control().clone();
        let rs = self.reset.as_ref()?;
        let job = rs.job.clone();
        let expect_done = control.reset_at_done().is_some()
            && rs
                .done_wait_gave_up_at
                .is_none_or(|at| control.done_count() > at);
        let mut account = job.account();
        let mut gave_up = false;
        if account.parked.is_none() && expect_done {
            let deadline = Instant::now() + DONE_GRACE;
            while account.parked.is_none() {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    gave_up = true;
                    break;
                }
                account = job
                    .parked_cv
                    .wait_timeout(account, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        let exits = self.exit_count();
        let rs = self.reset.as_mut()?;
        if gave_up {
            rs.done_wait_gave_up_at = Some(control.done_count());
        }
        if let Some(at_done) = &account.parked {
            let mut stats = match &at_done.result {
                Ok(stats) => *stats,
                Err(_) => OpStats {
                    mode: job.mode,
                    ..OpStats::default()
                },
            };
            stats.exits = at_done.exits.saturating_sub(rs.exits_at_start);
            return Some(stats);
        }
        let size = job.memory.iter().next()?.len() as usize;
        let bitmap = self.vm.take_dirty_log(0, size).ok()?;
        account.pending = merge(&account.pending, &dirty_pages(&bitmap));
        Some(OpStats {
            exits: exits.saturating_sub(rs.exits_at_start),
            dirtied_pages: account.pending.len() as u64,
            device_pages: 0,
            reset_time: Duration::ZERO,
            mode: job.mode,
            phases: ResetPhases::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_runs_and_bitmaps() {
        assert_eq!(runs(&[1, 2, 3, 7, 9, 10]), vec![(1, 3), (7, 1), (9, 2)]);
        assert_eq!(runs(&[]), vec![]);
        assert_eq!(dirty_pages(&[0b1011, 1 << 63]), vec![0, 1, 3, 127]);
        assert_eq!(merge(&[1, 5], &[2, 5, 9]), vec![1, 2, 5, 9]);
    }

    #[test]
    fn phases_say_where_the_work_ran() {
        let us = Duration::from_micros;
        let on_call = ResetPhases {
            pause: us(40),
            settle: us(2),
            memory: us(5),
            vm_and_devices: us(3),
            vcpus: us(50),
            ..ResetPhases::default()
        };
        let names = |p: Vec<(&'static str, Duration)>| p.into_iter().map(|(n, _)| n).collect();
        let v: Vec<&str> = names(on_call.phases());
        assert_eq!(
            v,
            [
                "pause",
                "wait",
                "settle",
                "memory",
                "vm_and_devices",
                "vcpus"
            ]
        );
        assert!(on_call.at_done_phases().is_empty());
        let at_done = ResetPhases {
            at_done: true,
            done_to_parked: us(70),
            ..on_call
        };
        let v: Vec<&str> = names(at_done.phases());
        assert_eq!(v, ["pause", "wait"], "the work is not on the request path");
        let off = at_done.at_done_phases();
        assert_eq!(off.len(), 5);
        assert!(off.iter().all(|(n, _)| n.starts_with("at_done.")));
        assert_eq!(off[3], ("at_done.vcpus", us(50)));
        assert_eq!(off[4], ("at_done.total", us(70)));
    }

    #[test]
    fn seeds_differ() {
        let (a, b) = (fresh_seed(), fresh_seed());
        assert_eq!(a.magic, abi::entropy::MAGIC);
        assert_ne!(a, b);
        assert_eq!("dontneed".parse::<ResetMode>(), Ok(ResetMode::DropPages));
        assert_eq!("copy".parse::<ResetMode>(), Ok(ResetMode::CopyBack));
        let err = "x".parse::<ResetMode>().unwrap_err();
        assert!(err.contains("copy or dontneed"), "{err}");
    }
}
