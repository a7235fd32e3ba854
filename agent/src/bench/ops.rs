//! One timed operation of each benchmark mode, and the invocation they share.
//!
//! Each operation returns its [`OpSample`] and hands back whatever must be torn down, so the
//! caller drops VMs after the timer stopped (tearing a VM down costs milliseconds and is no
//! part of any mode's latency).

use std::{
    fs::File,
    io,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use fnode_guest::abi::vsock::INVOKE_PORT;
use fnode_vmm::{
    bench::{raw_floor, BenchError},
    builder::{self, VmConfig},
    devices::serial::SharedBuffer,
    vstate::memory::MemoryBacking,
    BuildError, KvmContext, LoadedSnapshot, MicroVm, MicroVmError, Outcome, ResetMode,
};

use super::probe::{PageMap, ProbeError};
use super::stats::{OpSample, Phases};
use crate::client::{ClientError, Connection, Reply};
use crate::restored::RestoredFunction;
use crate::snapshot::ConsoleBuf;

/// Console bytes shown when an operation fails.
const CONSOLE_TAIL: usize = 2048;

/// Errors of one benchmark operation.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// The VM could not be built.
    #[error("cannot build a VM for {}", image.display())]
    Build {
        /// The image.
        image: PathBuf,
        /// Why.
        #[source]
        source: BuildError,
    },
    /// The VM could not be controlled.
    #[error("cannot run the VM")]
    Control(#[source] MicroVmError),
    /// The invocation failed on the host's side or the guest broke the protocol.
    #[error("invocation failed{}", console_note(.console))]
    Invoke {
        /// Why.
        #[source]
        source: ClientError,
        /// The end of the guest's console.
        console: String,
    },
    /// The VM ended while the host waited for its answer.
    #[error("the guest ended before it answered: {outcome}{}", console_note(.console))]
    Ended {
        /// How it ended.
        outcome: Outcome,
        /// The end of the guest's console.
        console: String,
    },
    /// The function answered with an error.
    #[error(
        "the function answered with an error: {0}; benchmark a function that answers the payload"
    )]
    FunctionError(String),
    /// The raw-KVM floor failed.
    #[error("the raw-KVM floor failed")]
    Floor(#[source] BenchError),
    /// The floor's memory file could not be opened.
    #[error("cannot open the memory file {} for the floor", path.display())]
    FloorMemory {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The page count could not be read.
    #[error("cannot count the guest's pages")]
    Probe(#[source] ProbeError),
    /// The snapshot could not be restored.
    #[error("cannot restore a VM to benchmark")]
    Restore(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The restored VM's invocation failed.
    #[error("the restored VM's invocation failed; its console ended with:\n{console}")]
    RestoredInvoke {
        /// Why.
        #[source]
        source: ClientError,
        /// The end of the guest's console.
        console: String,
    },
    /// The in-place reset failed.
    #[error("the in-place reset failed")]
    Reset(#[source] fnode_vmm::ResetError),
    /// The VM did not report the host time asked for.
    #[error("the VM did not record when it {0}")]
    NoHostTime(&'static str),
}

fn console_note(console: &str) -> String {
    if console.is_empty() {
        String::new()
    } else {
        format!("; the guest's console ended with:\n{console}")
    }
}

/// The last [`CONSOLE_TAIL`] bytes of a console.
fn tail(console: &SharedBuffer) -> String {
    let bytes = console.contents();
    let start = bytes.len().saturating_sub(CONSOLE_TAIL);
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// Keeps an eye on a running VM while the host waits on its socket: `false` (stop waiting)
/// once it ended, with the outcome kept.
struct Watch<'a> {
    vm: &'a mut MicroVm,
    ended: Option<Outcome>,
    error: Option<MicroVmError>,
}

impl Watch<'_> {
    fn keep_waiting(&mut self) -> bool {
        if self.ended.is_some() || self.error.is_some() {
            return false;
        }
        match self.vm.poll() {
            Ok(None) => true,
            Ok(Some(o)) => {
                self.ended = Some(o);
                false
            }
            Err(e) => {
                self.error = Some(e);
                false
            }
        }
    }

    /// The error for a failed client call: the VM's end if it ended, else the client's.
    fn fail(self, source: ClientError, console: &SharedBuffer) -> OpError {
        if let Some(e) = self.error {
            return OpError::Control(e);
        }
        match self.ended {
            Some(outcome) => OpError::Ended {
                outcome,
                console: tail(console),
            },
            None => OpError::Invoke {
                source,
                console: tail(console),
            },
        }
    }
}

/// Sends `payload` on `conn` and reads the reply, watching `vm`; an ERROR reply is an error.
pub fn call(
    vm: &mut MicroVm,
    conn: &mut Connection,
    payload: &[u8],
    deadline: Instant,
    console: &SharedBuffer,
) -> Result<(), OpError> {
    let mut watch = Watch {
        vm,
        ended: None,
        error: None,
    };
    match conn.call(payload, deadline, &mut || watch.keep_waiting()) {
        Ok(Reply::Response(_)) => Ok(()),
        Ok(Reply::Error(m)) => Err(OpError::FunctionError(
            String::from_utf8_lossy(&m).into_owned(),
        )),
        Err(e) => Err(watch.fail(e, console)),
    }
}

/// Connects to the invocation port of the running `vm` through `socket`, retrying while
/// the guest does not listen yet (it listens once its init is done).
pub fn connect(
    vm: &mut MicroVm,
    socket: &Path,
    deadline: Instant,
    console: &SharedBuffer,
) -> Result<Connection, OpError> {
    let mut watch = Watch {
        vm,
        ended: None,
        error: None,
    };
    Connection::connect_retrying(socket, INVOKE_PORT, deadline, &mut || watch.keep_waiting())
        .map_err(|e| watch.fail(e, console))
}

/// A cold start, timed from "build the VM" to the first response.
pub struct Cold<'a> {
    /// KVM.
    pub kvm: &'a KvmContext,
    /// The function image.
    pub image: &'a Path,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// The request.
    pub payload: &'a [u8],
    /// The longest an operation may take.
    pub timeout: Duration,
}

impl Cold<'_> {
    /// Builds and boots a VM whose vsock socket is `socket`, waits for its init and invokes
    /// it once. Returns the sample and the VM (still running, idle) to tear down.
    pub fn sample(
        &self,
        socket: &Path,
        pages: &mut PageMap,
    ) -> Result<(OpSample, MicroVm), OpError> {
        let console = SharedBuffer::new();
        let config = VmConfig {
            mem_mib: self.mem_mib,
            vsock_uds: Some(socket.to_owned()),
            ..VmConfig::new(self.image)
        };
        let start = Instant::now();
        let deadline = start + self.timeout;
        let mut vm =
            builder::build(self.kvm, &config, Box::new(console.clone())).map_err(|source| {
                OpError::Build {
                    image: self.image.to_owned(),
                    source,
                }
            })?;
        vm.resume().map_err(OpError::Control)?;
        let mut conn = connect(&mut vm, socket, deadline, &console)?;
        call(&mut vm, &mut conn, self.payload, deadline, &console)?;
        let total = start.elapsed();
        let sample = OpSample {
            total,
            host: None,
            exits: Some(vm.exit_count()),
            pages: Some(pages.guest_pages(&vm).map_err(OpError::Probe)?),
            dirtied: None,
            phases: Phases::default(),
        };
        drop(conn);
        Ok((sample, vm))
    }
}

/// The floor's guest memory: a snapshot's memory file, mapped `MAP_PRIVATE` as a restore
/// maps it.
#[derive(Clone, Debug)]
pub struct FloorMemory {
    /// The memory file.
    pub path: PathBuf,
    /// Its length.
    pub size: usize,
}

/// One run of the raw-KVM floor: fresh VM + vCPU + memory + registers, then `KVM_RUN` of a
/// few instructions to `hlt`. The host share is everything before `KVM_RUN`.
pub fn floor_sample(kvm: &KvmContext, memory: &FloorMemory) -> Result<OpSample, OpError> {
    let file = File::open(&memory.path).map_err(|source| OpError::FloorMemory {
        path: memory.path.clone(),
        source,
    })?;
    let t =
        raw_floor(kvm, memory.size, MemoryBacking::PrivateFile(file)).map_err(OpError::Floor)?;
    Ok(OpSample {
        total: t.total,
        host: Some(t.total.saturating_sub(t.run_to_hlt)),
        // The floor's one exit is its `hlt`.
        exits: Some(1),
        pages: None,
        dirtied: None,
        phases: {
            let mut phases = Phases::default();
            phases.extend(&t.host_phases());
            phases
        },
    })
}

/// Guest pages of `f`'s VM the host has backed, and of those the private copies (pages the
/// guest or a device wrote).
fn restored_pages(f: &mut RestoredFunction, pages: &mut PageMap) -> Result<(u64, u64), OpError> {
    pages.guest_pages_split(f.vm()).map_err(OpError::Probe)
}

/// Invokes `f` once; an ERROR reply is an error.
fn call_restored(
    f: &mut RestoredFunction,
    payload: &[u8],
    deadline: Instant,
) -> Result<(), OpError> {
    reply_ok(f, |f| f.call(payload, deadline))
}

/// `read(f)`'s reply; an ERROR reply is an error.
fn reply_ok(
    f: &mut RestoredFunction,
    read: impl FnOnce(&mut RestoredFunction) -> Result<Reply, ClientError>,
) -> Result<(), OpError> {
    match read(f) {
        Ok(Reply::Response(_)) => Ok(()),
        Ok(Reply::Error(m)) => Err(OpError::FunctionError(
            String::from_utf8_lossy(&m).into_owned(),
        )),
        Err(source) => Err(OpError::RestoredInvoke {
            source,
            console: f.console_tail(),
        }),
    }
}

/// Restores of one snapshot, loaded once ([`LoadedSnapshot::load`]: state and memory file
/// read and checked) before the first; each restore's time starts after the load.
pub struct Restore<'a> {
    /// KVM.
    pub kvm: &'a KvmContext,
    /// The snapshot, loaded.
    pub snapshot: &'a LoadedSnapshot,
    /// The request.
    pub payload: &'a [u8],
    /// The longest an operation may take.
    pub timeout: Duration,
}

impl Restore<'_> {
    /// A fresh VM from the snapshot (resumed, attached to its invocation connection), with
    /// `reset` kept for in-place resets; not timed.
    pub fn vm(&self, reset: Option<ResetMode>) -> Result<RestoredFunction, OpError> {
        RestoredFunction::restore_loaded(
            self.kvm,
            self.snapshot,
            reset,
            ConsoleBuf::new(false),
            Instant::now() + self.timeout,
        )
        .map_err(|e| OpError::Restore(e.into()))
    }

    /// Restores a fresh VM and invokes it once (the request handed to the guest by the
    /// restore: [`RestoredFunction::restore_invoking`]), timed from "restore" to the
    /// response. Returns the sample and the VM to tear down.
    pub fn sample(&self, pages: &mut PageMap) -> Result<(OpSample, RestoredFunction), OpError> {
        let start = Instant::now();
        let deadline = start + self.timeout;
        let mut f = RestoredFunction::restore_invoking(
            self.kvm,
            self.snapshot,
            None,
            ConsoleBuf::new(false),
            deadline,
            self.payload,
        )
        .map_err(|e| OpError::Restore(e.into()))?;
        reply_ok(&mut f, |f| f.first_reply(deadline))?;
        let total = start.elapsed();
        let host = f
            .stats()
            .restore_to_first_run
            .ok_or(OpError::NoHostTime("first ran after its restore"))?;
        let exits = f.vm().exit_count();
        let mut phases = Phases::default();
        if let Some(t) = f.vm().restore_timings() {
            phases.extend(&t.phases());
            // From the threads started to the guest's first KVM_RUN, when the guest first
            // ran on its thread (when it ran on this one, the host share ended where the
            // `first_run` phase began).
            if t.first_run.is_none() {
                phases.push("to_first_run", host.saturating_sub(t.total));
            }
        }
        let (touched, written) = restored_pages(&mut f, pages)?;
        Ok((
            OpSample {
                total,
                host: Some(host),
                exits: Some(exits),
                pages: Some(touched),
                dirtied: Some(written),
                phases,
            },
            f,
        ))
    }

    /// Resets `f` (a VM restored with reset that has answered a request) in place and
    /// invokes it again, timed from the reset to the response.
    pub fn reset_sample(
        &self,
        f: &mut RestoredFunction,
        pages: &mut PageMap,
    ) -> Result<OpSample, OpError> {
        let (before, _) = restored_pages(f, pages)?;
        let start = Instant::now();
        let put_back = f.reset().map_err(OpError::Reset)?;
        call_restored(f, self.payload, start + self.timeout)?;
        let stats = f.stats();
        // Up to the response read: the run's stats taken after it are bookkeeping (for a
        // reset at DONE they wait for that reset, the next operation's work).
        let total = stats
            .replied_at
            .map_or_else(|| start.elapsed(), |t| t.saturating_duration_since(start));
        let host = stats
            .reset_to_first_run
            .ok_or(OpError::NoHostTime("first ran after its reset"))?;
        let (after, _) = restored_pages(f, pages)?;
        // A reset at the guest's DONE dropped its pages before `before` was counted.
        let dropped = match put_back.mode {
            ResetMode::DropPages if !put_back.phases.at_done => {
                put_back.dirtied_pages + put_back.device_pages
            }
            ResetMode::DropPages | ResetMode::CopyBack => 0,
        };
        let run = stats.run.unwrap_or_default();
        let mut phases = Phases::default();
        // The request path's phases (the reset's work among them if it ran there), then
        // the work a reset at DONE did before it was called, as `at_done.*`.
        phases.extend(&put_back.phases.phases());
        // From the reset's return to the guest's first KVM_RUN.
        phases.push("to_first_run", host.saturating_sub(put_back.reset_time));
        phases.extend(&put_back.phases.at_done_phases());
        Ok(OpSample {
            total,
            host: Some(host),
            exits: stats.run.map(|r| r.exits),
            // Pages first touched in this operation: those mapped now and not before the
            // reset, where the reset unmapped the ones it dropped (they fault in again).
            pages: Some((after + dropped).saturating_sub(before)),
            dirtied: stats.run.map(|_| run.dirtied_pages + run.device_pages),
            phases,
        })
    }
}
