//! A function served from its snapshot: [`RestoredFunction`] restores a snapshot directory
//! (`fnode snapshot` writes it) into a new VM, attaches to the invocation connection the
//! snapshot holds (parked on the VM's fresh socket: `CONNECT` gets `OK` at once, no
//! handshake with the guest), invokes, and optionally puts the VM back to its snapshot
//! state in place between invocations ([`RestoredFunction::reset`]).
//!
//! `fnode invoke DIR` ([`run`]) uses it; so can benchmarks: every operation's host time and
//! counts are in [`RestoredFunction::stats`] after it.

use std::{
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context;
use fnode_guest::abi::vsock::INVOKE_PORT;
use fnode_vmm::{
    outcome::exit_code,
    restore::{restore_loaded_attached, AttachClient},
    KvmContext, LoadedSnapshot, MicroVm, OpStats, Outcome, ResetError, ResetMode, RestoreOptions,
};

use crate::client::{request_frame, ClientError, Connection, Reply};
use crate::snapshot::ConsoleBuf;

/// A folder only this user can enter, removed with what it holds when dropped (the VM's
/// Unix socket lives there).
#[derive(Debug)]
pub struct PrivateDir(PathBuf);

impl PrivateDir {
    /// Creates `fnode-<pid>-<n>` in the runtime directory (`$XDG_RUNTIME_DIR`, else
    /// `/dev/shm`), or the temporary directory when neither exists. The VM's socket is bound
    /// there at every restore: on a memory filesystem that costs a few microseconds, on a
    /// disk filesystem (`/tmp` on many hosts) tens of microseconds of journal work per VM.
    pub fn create() -> anyhow::Result<Self> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .or_else(|| Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
            .unwrap_or_else(std::env::temp_dir);
        // A name taken already (left by a process that had this id and was killed, or
        // another user's) is skipped: never reused, never removed.
        let mut attempts = 0;
        loop {
            let path = base.join(format!(
                "fnode-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir(path)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && attempts < 1000 => {
                    attempts += 1;
                }
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot create the private folder {}", path.display())
                    })
                }
            }
        }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Host-side cost of the last operation (a restore or a reset, and the invocation after
/// it), for benchmarks.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    /// Restore requested -> the guest's first `KVM_RUN` (a restored VM that has run).
    pub restore_to_first_run: Option<Duration>,
    /// [`RestoredFunction::reset`] called -> the guest's first `KVM_RUN` after it (after a
    /// reset, once the guest has run).
    pub reset_to_first_run: Option<Duration>,
    /// The last invocation: request sent -> response read.
    pub invoke: Option<Duration>,
    /// When the last invocation's response was read (before the run's stats were taken,
    /// which for a VM reset at the guest's DONE wait for that reset).
    pub replied_at: Option<Instant>,
    /// Userspace exits and pages dirtied by the last invocation (guest pages from KVM's
    /// dirty log, and for a run that ended at the guest's DONE the pages devices wrote;
    /// `None` for a VM restored without reset, which logs no dirty pages).
    pub run: Option<OpStats>,
}

/// A restored function VM with its invocation connection.
#[derive(Debug)]
pub struct RestoredFunction {
    // Drop order: the VM first, then the client (closing the client earlier would reach
    // the guest), then the socket's folder.
    vm: MicroVm,
    conn: Connection,
    dir: PrivateDir,
    console: ConsoleBuf,
    stats: Stats,
    /// How and when the VM ended, if it did while the host waited on it.
    ended: Option<(Outcome, Instant)>,
    /// The id of the request sent with the restore ([`RestoredFunction::restore_invoking`])
    /// while its reply is unread.
    first: Option<u64>,
}

/// How long the host keeps reading after the VM ended: a guest that answers with an error
/// and then ends (a panic, a fault) has its last frame on the way.
const LAST_WORDS_GRACE: Duration = Duration::from_millis(200);
/// How long the host waits for the VM to end after an error reply.
const END_AFTER_ERROR_GRACE: Duration = Duration::from_millis(50);

/// Whether to keep waiting on a VM's socket: yes while it runs, and for a short grace after
/// it ended (recorded in `ended`).
fn keep_waiting(vm: &mut MicroVm, ended: &mut Option<(Outcome, Instant)>) -> bool {
    if let Some((_, at)) = ended {
        return at.elapsed() < LAST_WORDS_GRACE;
    }
    match vm.poll() {
        Ok(None) => true,
        Ok(Some(outcome)) => {
            *ended = Some((outcome, Instant::now()));
            true
        }
        Err(_) => false,
    }
}

/// How long the restoring thread runs the guest itself when the first request goes with
/// the restore ([`fnode_vmm::RestoreOptions::first_run_here`]). A restored echo answers in
/// ~0.4 ms on a host that emulates guest kernel code; a handler that needs longer, or a
/// response larger than the connection's buffer (which this thread drains only after the
/// restore), goes on on the vCPU's thread after this, at the cost of the hand-off the run
/// here saved.
const FIRST_RUN_HERE: Duration = Duration::from_millis(2);

impl RestoredFunction {
    /// Restores `snapshot` (loaded once before with [`LoadedSnapshot::load`]; its memory
    /// file mapped `MAP_PRIVATE`), resumes it and attaches to its parked invocation
    /// connection. `reset`: keep what [`reset`](Self::reset) needs.
    pub fn restore_loaded(
        kvm: &KvmContext,
        snapshot: &LoadedSnapshot,
        reset: Option<ResetMode>,
        console: ConsoleBuf,
        deadline: Instant,
    ) -> anyhow::Result<Self> {
        Self::restore_by(kvm, snapshot, reset, console, deadline, None)
    }

    /// [`restore_loaded`](Self::restore_loaded) with the first invocation's request
    /// `payload` handed to the guest by the restore itself, before the guest first runs (no
    /// wake-up between the restore and the guest seeing the request); read its reply with
    /// [`first_reply`](Self::first_reply).
    pub fn restore_invoking(
        kvm: &KvmContext,
        snapshot: &LoadedSnapshot,
        reset: Option<ResetMode>,
        console: ConsoleBuf,
        deadline: Instant,
        payload: &[u8],
    ) -> anyhow::Result<Self> {
        Self::restore_by(kvm, snapshot, reset, console, deadline, Some(payload))
    }

    fn restore_by(
        kvm: &KvmContext,
        snapshot: &LoadedSnapshot,
        reset: Option<ResetMode>,
        console: ConsoleBuf,
        deadline: Instant,
        payload: Option<&[u8]>,
    ) -> anyhow::Result<Self> {
        const FIRST_ID: u64 = 1;
        let dir = snapshot.dir();
        let tmp = PrivateDir::create()?;
        let socket = tmp.path().join("vsock.sock");
        // Running at once: the vCPU thread enters the guest as soon as its vCPU is set. With
        // a first request, this thread runs the guest itself first (see FIRST_RUN_HERE).
        let options = RestoreOptions {
            vsock_uds: Some(socket.clone()),
            reset,
            resume: true,
            first_run_here: payload
                .map(|_| FIRST_RUN_HERE.min(deadline.saturating_duration_since(Instant::now()))),
        };
        let frame = payload
            .map(|p| request_frame(FIRST_ID, p))
            .transpose()
            .context("cannot send the first request")?;
        // The VMM attaches this process to the parked connection itself (no socket
        // connection, no CONNECT line) and hands the guest the first request.
        let attach = AttachClient {
            port: INVOKE_PORT,
            first: frame.as_deref().unwrap_or_default(),
        };
        let mut vm =
            restore_loaded_attached(kvm, snapshot, Box::new(console.clone()), &options, attach)
                .with_context(|| format!("cannot restore the snapshot {}", dir.display()))?;
        let mut first = frame.as_ref().map(|_| FIRST_ID);
        let conn = match vm.take_vsock_client() {
            Some(stream) => Connection::attached(stream, FIRST_ID + u64::from(first.is_some())),
            None => {
                // Not attached (a snapshot without that parked connection): through the
                // socket, where a refusal shows.
                let mut ended = None;
                let mut watch = || keep_waiting(&mut vm, &mut ended);
                let mut conn =
                    Connection::connect_pipelined(&socket, INVOKE_PORT, deadline, &mut watch)
                        .context("cannot attach to the restored VM's invocation connection")?;
                if let Some(p) = payload {
                    first = Some(
                        conn.send_request(p, deadline, &mut watch)
                            .context("cannot send the first request")?,
                    );
                }
                conn
            }
        };
        Ok(RestoredFunction {
            vm,
            conn,
            dir: tmp,
            console,
            stats: Stats::default(),
            ended: None,
            first,
        })
    }

    /// The private folder the VM's socket is bound in (removed when this is dropped).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The reply to the request sent with the restore ([`restore_invoking`](Self::restore_invoking));
    /// [`ClientError::NoRequest`] if there is none (or it was read).
    pub fn first_reply(&mut self, deadline: Instant) -> Result<Reply, ClientError> {
        let Some(id) = self.first.take() else {
            return Err(ClientError::NoRequest);
        };
        let (vm, ended) = (&mut self.vm, &mut self.ended);
        let mut watch = || keep_waiting(vm, ended);
        let sent = Instant::now();
        let reply = self.conn.read_reply(id, deadline, &mut watch);
        self.record(sent);
        reply
    }

    /// Invokes the function once (after reading the reply to a request sent with the
    /// restore, if it is unread).
    pub fn call(&mut self, payload: &[u8], deadline: Instant) -> Result<Reply, ClientError> {
        let (vm, ended) = (&mut self.vm, &mut self.ended);
        let mut watch = || keep_waiting(vm, ended);
        if let Some(id) = self.first.take() {
            self.conn.read_reply(id, deadline, &mut watch)?;
        }
        let sent = Instant::now();
        let reply = self.conn.call(payload, deadline, &mut watch);
        self.record(sent);
        reply
    }

    /// Records the stats of an invocation sent at `sent` whose reply was just read.
    fn record(&mut self, sent: Instant) {
        let replied_at = Instant::now();
        self.stats.replied_at = Some(replied_at);
        self.stats.invoke = Some(replied_at - sent);
        self.stats.restore_to_first_run = self.vm.restore_to_first_run();
        self.stats.reset_to_first_run = self.vm.reset_to_first_run();
        self.stats.run = self.vm.run_stats();
    }

    /// Puts the VM back to its snapshot state (it must have been restored with reset).
    /// Returns what the invocation before it cost.
    pub fn reset(&mut self) -> Result<OpStats, ResetError> {
        self.vm.reset()
    }

    /// How the VM ended, if it did: recorded while the host waited, or within `grace` now.
    pub fn outcome(&mut self, grace: Duration) -> Option<Outcome> {
        if let Some((o, _)) = self.ended.take() {
            return Some(o);
        }
        match self.vm.wait(grace) {
            Ok(Outcome::TimedOut { .. }) | Err(_) => {
                // wait() pauses a VM that did not end: let it go on serving.
                let _ = self.vm.resume();
                None
            }
            Ok(o) => Some(o),
        }
    }

    /// The last operation's host-side cost.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The VM.
    pub fn vm(&mut self) -> &mut MicroVm {
        &mut self.vm
    }

    /// The last bytes the guest printed.
    pub fn console_tail(&self) -> String {
        self.vm.flush_console();
        self.console.tail(4096)
    }
}

/// `fnode invoke DIR`: restores the snapshot, invokes `repeat` times (resetting the VM in
/// place between invocations with `reset`, else serving them on the same VM), writes the
/// responses to stdout (one per line when there are several) and returns the exit code.
pub fn run(
    dir: &Path,
    payload: &[u8],
    timeout: Duration,
    repeat: u64,
    reset: Option<ResetMode>,
    timings: bool,
    console: bool,
) -> u8 {
    use std::io::Write;

    let start = Instant::now();
    let deadline = start + timeout;
    let kvm = match KvmContext::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("fnode: cannot use KVM: {e}");
            return exit_code::SETUP;
        }
    };
    let console = ConsoleBuf::new(console);
    // Loaded once (state and memory file read and checked); the restore's host time starts after.
    let snapshot = match LoadedSnapshot::load(&kvm, dir) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "fnode: {:#}",
                anyhow::Error::new(e)
                    .context(format!("cannot load the snapshot {}", dir.display()))
            );
            return exit_code::SETUP;
        }
    };
    let ms = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    if timings {
        eprintln!(
            "fnode: timings: snapshot loaded once in {:.3} ms (state and memory file read and \
             checked; not part of the restore below)",
            ms(Some(snapshot.load_time()))
        );
    }
    // The first request goes with the restore: the guest finds it when it first runs.
    let restored =
        RestoredFunction::restore_invoking(&kvm, &snapshot, reset, console, deadline, payload);
    let mut f = match restored {
        Ok(f) => f,
        Err(e) => {
            eprintln!("fnode: {e:#}");
            return exit_code::SETUP;
        }
    };
    let mut out = std::io::stdout().lock();
    for i in 0..repeat.max(1) {
        // Where the last reset did its work: at the guest's DONE (off the request path) or
        // when it was called.
        let mut reset_where = "";
        if i > 0 {
            if let Some(mode) = reset {
                match f.reset() {
                    Ok(put_back) if put_back.phases.at_done => reset_where = " (reset at DONE)",
                    Ok(_) => reset_where = " (reset on call)",
                    Err(e) => {
                        eprintln!("fnode: cannot reset the VM ({mode:?}): {e}");
                        return exit_code::VM_ERROR;
                    }
                }
            }
        }
        let reply = if i == 0 {
            f.first_reply(deadline)
        } else {
            f.call(payload, deadline)
        };
        let s = f.stats();
        if timings {
            let run = s.run.unwrap_or_default();
            let (op, host) = match (i, reset) {
                (0, _) => ("restore", s.restore_to_first_run),
                (_, Some(_)) => ("reset", s.reset_to_first_run),
                (_, None) => ("same VM", None),
            };
            eprintln!(
                "fnode: timings: {op} {:.3} ms to first KVM_RUN{reset_where}, invoke {:.3} ms, \
                 total {:.3} ms; {} exits, {} pages dirtied",
                ms(host),
                ms(s.invoke),
                start.elapsed().as_secs_f64() * 1e3,
                run.exits,
                run.dirtied_pages
            );
        }
        match reply {
            Ok(Reply::Response(bytes)) => {
                let r = out.write_all(&bytes).and_then(|()| {
                    if repeat > 1 {
                        out.write_all(b"\n")?;
                    }
                    out.flush()
                });
                if let Err(e) = r {
                    eprintln!("fnode: cannot write the response to stdout: {e}");
                    return exit_code::GUEST_FAILURE;
                }
            }
            Ok(Reply::Error(message)) => {
                eprintln!(
                    "fnode: the function failed: {}",
                    String::from_utf8_lossy(&message)
                );
                // A function that panicked or faulted ends its VM right after its error.
                return match f.outcome(END_AFTER_ERROR_GRACE) {
                    Some(o) if !o.is_success() => {
                        eprintln!(
                            "fnode: {o}\nfnode: the guest's console:\n{}",
                            f.console_tail()
                        );
                        o.exit_code().max(exit_code::GUEST_FAILURE)
                    }
                    _ => exit_code::GUEST_FAILURE,
                };
            }
            Err(e) => {
                let ended = match e {
                    ClientError::TimedOut => None,
                    _ => f.outcome(LAST_WORDS_GRACE),
                };
                let code = match (&e, ended) {
                    (ClientError::TimedOut, _) => {
                        let ms = timeout.as_millis();
                        eprintln!("fnode: function did not answer within {ms} ms; stopped it");
                        exit_code::TIMEOUT
                    }
                    (_, Some(o)) if !o.is_success() => {
                        eprintln!("fnode: {o}");
                        o.exit_code()
                    }
                    (ClientError::BadFrame(_), _) => {
                        eprintln!("fnode: {e}");
                        exit_code::GUEST_FAULT
                    }
                    _ => {
                        eprintln!("fnode: {e}");
                        exit_code::GUEST_FAILURE
                    }
                };
                eprintln!("fnode: the guest's console:\n{}", f.console_tail());
                return code;
            }
        }
    }
    exit_code::SUCCESS
}
