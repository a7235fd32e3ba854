//! `fnode invoke IMAGE`: boots a function image, invokes its function once over the vsock
//! invocation channel and writes the response to stdout, byte for byte.
//!
//! The VM gets a hybrid-vsock device whose Unix socket lives in a private temporary folder
//! (removed afterwards). The host connects to `abi::vsock::INVOKE_PORT` while the guest boots
//! (the device holds the connection until the guest's driver is up); the guest accepts it
//! once the function's `init` is done and then signals READY (`abi::control::READY`), where
//! the VMM pauses it. The host notes the time and its counts there, resumes the guest and
//! sends one REQUEST frame; one RESPONSE or ERROR comes back ([`crate::client`]).
//!
//! Everything, boot and init included, must finish within `--timeout-ms`; a guest that takes
//! longer (a function that loops forever) is stopped. While the host waits it keeps an eye on
//! the VM, so a guest that faults, exits or breaks its device is reported at once with the
//! VMM's one-line outcome.
//!
//! `--timings` prints the phases on stderr (VM build; boot, up to the guest's BOOTED; init, up
//! to its READY; invoke) and what the invocation cost the host in userspace exits and guest
//! pages first touched.
//!
//! Given a snapshot directory (`fnode snapshot` writes it) instead of an image, the VM is
//! restored from it rather than booted ([`crate::restored`]); `--repeat` then invokes
//! several times, resetting the VM to its snapshot state in place in between (`--reset`).

use std::{
    fmt,
    io::{self, Read, Write},
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, PoisonError,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::Context;
use fnode_guest::abi::{frame::MAX_PAYLOAD, vsock::INVOKE_PORT};
use fnode_vmm::{
    builder::{self, VmConfig, DEFAULT_MEM_MIB},
    microvm::UntilReady,
    outcome::exit_code,
    KvmContext, MicroVm, Outcome,
};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};

use crate::client::{ClientError, Connection, Reply};

/// Exit codes of `fnode invoke`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  the function answered; its response is on stdout
  1  the function answered with an error (on stderr), or the guest ended without answering
  2  bad command-line usage (a payload over the limit included)
  3  the guest faulted (a CPU exception), broke its device or sent a bad frame
  4  the function did not answer within --timeout-ms and was stopped
  5  KVM or emulation failed (triple fault, internal error, unhandled exit)
  6  the VM could not be built (missing or invalid image, /dev/kvm unusable)";

/// How long the host keeps reading after the VM ended: a guest that answers with an error
/// and then ends (a panic, a fault) has its last frame on the way.
const LAST_WORDS_GRACE: Duration = Duration::from_millis(200);
/// How long the host waits for the VM to end after an error reply (a panicking or faulting
/// function ends its VM right after its error; one that returned an error goes on serving).
const END_AFTER_ERROR_GRACE: Duration = Duration::from_millis(50);
/// Console bytes kept to show when an invocation fails.
const CONSOLE_TAIL: usize = 16 * 1024;

/// `fnode invoke` options.
#[derive(Debug, clap::Args)]
pub struct InvokeArgs {
    /// The function image (`fnode build` writes it), or a snapshot directory
    /// (`fnode snapshot` writes it) to restore the function from.
    pub image: PathBuf,
    /// The request: `@FILE` (a file's bytes), `-` (stdin) or the text itself. Empty if not
    /// given. At most 6 MiB.
    #[arg(long, value_name = "@FILE|-|TEXT")]
    pub payload: Option<String>,
    /// Stop the VM if the function has not answered after this many milliseconds (boot and
    /// init included).
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
    /// Print the time of each phase and the host-side counts on stderr. The phases: VM
    /// build, boot (to the kernel's BOOTED signal), init (to the function's READY) and
    /// invoke.
    #[arg(long)]
    pub timings: bool,
    /// Guest memory in MiB, for an image [default: 64]. A snapshot keeps its own.
    #[arg(long, value_name = "MIB")]
    pub mem: Option<u64>,
    /// Stream the guest's serial console to stderr (otherwise it is shown only when the
    /// invocation fails).
    #[arg(long)]
    pub console: bool,
    /// Kernel command line words to add, for an image (test switches such as
    /// `fnode.hostile=vsock`). A snapshot keeps its own.
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,
    /// With a snapshot directory: invoke this many times (responses one per line).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub repeat: u64,
    /// With a snapshot directory: between invocations, reset the VM to its snapshot state by
    /// copying the snapshot's bytes back over the pages it dirtied (`copy`) or by dropping
    /// them (`dontneed`); `none` serves them on the same VM.
    #[arg(long, value_name = "copy|dontneed|none", default_value = "copy")]
    pub reset: String,
}

/// Runs `fnode invoke`; every failure is reported on stderr and becomes the exit code.
pub fn run(args: InvokeArgs) -> ExitCode {
    match invoke(&args) {
        Ok(code) => ExitCode::from(code),
        Err(Failure::Usage(e)) => {
            eprintln!("fnode: {e:#}");
            ExitCode::from(exit_code::USAGE)
        }
        Err(Failure::Setup(e)) => {
            eprintln!("fnode: {e:#}");
            ExitCode::from(exit_code::SETUP)
        }
    }
}

/// Failures before the VM runs.
enum Failure {
    Usage(anyhow::Error),
    Setup(anyhow::Error),
}

fn invoke(args: &InvokeArgs) -> Result<u8, Failure> {
    let payload = read_payload(args.payload.as_deref()).map_err(Failure::Usage)?;
    let timeout = Duration::from_millis(args.timeout_ms);
    if args.image.is_dir() {
        if args.mem.is_some() || !args.cmdline.is_empty() {
            return Err(Failure::Usage(anyhow::anyhow!(
                "--mem and --cmdline apply to images: the snapshot {} keeps the memory size and \
                 command line it was taken with (pass them to `fnode snapshot` instead)",
                args.image.display()
            )));
        }
        let reset = match args.reset.as_str() {
            "none" => None,
            mode => Some(
                mode.parse()
                    .map_err(|e: String| Failure::Usage(anyhow::anyhow!(e)))?,
            ),
        };
        let (repeat, timings, console) = (args.repeat, args.timings, args.console);
        return Ok(crate::restored::run(
            &args.image,
            &payload,
            timeout,
            repeat,
            reset,
            timings,
            console,
        ));
    }
    if args.repeat != 1 {
        return Err(Failure::Usage(anyhow::anyhow!(
            "--repeat needs a snapshot directory (`fnode snapshot` writes one), not an image"
        )));
    }
    let start = Instant::now();
    let deadline = start + timeout;

    let dir = PrivateDir::create().map_err(Failure::Setup)?;
    let socket = dir.path().join("vsock.sock");
    let console = Console::new(args.console);
    let kvm = KvmContext::new()
        .context("cannot use KVM")
        .map_err(Failure::Setup)?;
    let config = VmConfig {
        mem_mib: args.mem.unwrap_or(DEFAULT_MEM_MIB),
        cmdline: args.cmdline.clone(),
        vsock_uds: Some(socket.clone()),
        ..VmConfig::new(&args.image)
    };
    let mut vm = builder::build(&kvm, &config, Box::new(console.clone()))
        .with_context(|| format!("cannot build a VM for {}", args.image.display()))
        .map_err(Failure::Setup)?;
    let mut t = Timeline::new(start, vm.build_timings().total);

    // Connect while the guest boots: the device holds the connection until the guest's
    // driver is up, and the guest accepts it once `init` is done, just before READY.
    let connector = Connector::start(socket, deadline);
    t.resumed = Some(Instant::now());
    let until = vm.run_until_ready(deadline.saturating_duration_since(Instant::now()));
    match until {
        Ok(UntilReady::Ready) => {
            t.ready = Some(Instant::now());
            t.booted = vm.booted_at();
            if args.timings {
                // The VM is paused at READY: these are the counts of boot and init exactly.
                t.at_ready = Some(Counts::of(&vm));
            }
        }
        Ok(UntilReady::Ended(outcome)) => {
            let connected = connector.cancel();
            vm.flush_console();
            // A connection that failed on its own (not stopped here) is why the guest
            // waited in vain.
            if let Err(e) = &connected {
                if !matches!(e, ClientError::Cancelled | ClientError::TimedOut) {
                    eprintln!("fnode: {}", chain(e));
                }
            }
            let code = match outcome {
                Outcome::TimedOut { .. } => {
                    eprintln!(
                        "fnode: function did not finish booting and its init within {} ms; \
                         stopped it",
                        args.timeout_ms
                    );
                    exit_code::TIMEOUT
                }
                o => report_failure(&ClientError::Closed, Some(o), None, args.timeout_ms),
            };
            console.show_tail();
            if args.timings {
                t.print();
            }
            return Ok(code);
        }
        Err(e) => {
            let _ = connector.cancel();
            eprintln!("fnode: lost control of the VM: {e}");
            return Ok(exit_code::VM_ERROR);
        }
    }
    if let Err(e) = vm.resume() {
        let _ = connector.cancel();
        eprintln!("fnode: cannot resume the VM after READY: {e}");
        return Ok(exit_code::VM_ERROR);
    }
    // READY comes after the guest accepted; the host has its `OK` at about the same time
    // (the device answers it on its own thread).
    let connected = connector.finish();
    let mut watcher = Watcher::new(&mut vm);
    let result = exchange(
        connected,
        &payload,
        deadline,
        &mut watcher,
        &mut t,
        args.timings,
    );
    let ended = watcher.ended.take().map(|(o, _)| o);
    let vm_error = watcher.error.take();

    let code = match result {
        Ok(Reply::Response(bytes)) => {
            let mut out = io::stdout().lock();
            if let Err(e) = out.write_all(&bytes).and_then(|()| out.flush()) {
                eprintln!("fnode: cannot write the response to stdout: {e}");
                return Ok(exit_code::GUEST_FAILURE);
            }
            exit_code::SUCCESS
        }
        Ok(Reply::Error(message)) => {
            eprintln!(
                "fnode: the function failed: {}",
                String::from_utf8_lossy(&message)
            );
            // A function that panicked or faulted ends its VM right after its error; one
            // that returned an error goes on serving. Neither the frame nor the VM can say
            // which yet: the frame has no such field (and its text is the function's), and
            // the kernel sends the error before it ends the VM, so the end may still be on
            // its way. Wait briefly: the wait returns as soon as an ending VM ends, so only
            // a function that returned an error costs the whole grace.
            let ended = ended.or_else(|| settle(&mut vm, END_AFTER_ERROR_GRACE));
            match ended {
                Some(o) if !o.is_success() => {
                    eprintln!("fnode: {o}");
                    console.show_tail();
                    o.exit_code().max(exit_code::GUEST_FAILURE)
                }
                _ => exit_code::GUEST_FAILURE,
            }
        }
        Err(e) => {
            // The connection broke: the VM's end, if it comes, says why.
            let ended = match (&e, ended) {
                (ClientError::TimedOut, ended) => ended,
                (_, None) if vm_error.is_none() => settle(&mut vm, LAST_WORDS_GRACE),
                (_, ended) => ended,
            };
            let code = report_failure(&e, ended, vm_error, args.timeout_ms);
            console.show_tail();
            code
        }
    };
    if args.timings {
        t.print();
    }
    // The VM stops here (its vCPU threads are told to end); the folder goes after it.
    drop(vm);
    drop(dir);
    Ok(code)
}

/// The host's side of the invocation connection, opened on its own thread while the VM runs
/// to READY.
struct Connector {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Connection, ClientError>>,
}

impl Connector {
    /// Starts connecting to guest port `INVOKE_PORT` behind `socket`. One attempt is enough:
    /// the device keeps a client that connects before the guest's driver is up and answers
    /// `OK` once the guest accepts.
    fn start(socket: PathBuf, deadline: Instant) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            thread::spawn(move || {
                let mut watch = || !stop.load(Ordering::Acquire);
                Connection::connect(&socket, INVOKE_PORT, deadline, &mut watch)
            })
        };
        Connector { stop, thread }
    }

    /// The connection, once the handshake is done.
    fn finish(self) -> Result<Connection, ClientError> {
        self.thread.join().unwrap_or(Err(ClientError::Cancelled))
    }

    /// Stops waiting for the handshake (within `client::WATCH_INTERVAL`); what the
    /// connection came to.
    fn cancel(self) -> Result<Connection, ClientError> {
        self.stop.store(true, Ordering::Release);
        self.finish()
    }
}

/// Sends the request on the open connection and reads the reply; records the phases in `t`.
fn exchange(
    connected: Result<Connection, ClientError>,
    payload: &[u8],
    deadline: Instant,
    watcher: &mut Watcher<'_>,
    t: &mut Timeline,
    count: bool,
) -> Result<Reply, ClientError> {
    let mut conn = connected?;
    let mut watch = || watcher.keep_waiting();
    t.sent = Some(Instant::now());
    let reply = conn.call(payload, deadline, &mut watch)?;
    t.answered = Some(Instant::now());
    if count {
        t.at_answer = Some(Counts::of(watcher.vm));
    }
    Ok(reply)
}

/// Waits up to `grace` for a running VM to end; its outcome if it did.
fn settle(vm: &mut MicroVm, grace: Duration) -> Option<Outcome> {
    match vm.wait(grace) {
        Ok(Outcome::TimedOut { .. }) | Err(_) => None,
        Ok(o) => Some(o),
    }
}

/// Prints why the invocation failed; returns the exit code.
fn report_failure(
    e: &ClientError,
    ended: Option<Outcome>,
    vm_error: Option<fnode_vmm::MicroVmError>,
    timeout_ms: u64,
) -> u8 {
    if let Some(e) = vm_error {
        eprintln!("fnode: lost control of the VM: {e}");
        return exit_code::VM_ERROR;
    }
    match ended {
        None | Some(Outcome::TimedOut { .. }) if matches!(e, ClientError::TimedOut) => {
            eprintln!("fnode: function did not answer within {timeout_ms} ms; stopped it");
            exit_code::TIMEOUT
        }
        // A bad frame is the guest's doing whatever happened next.
        None | Some(Outcome::TimedOut { .. }) => {
            eprintln!("fnode: {}", chain(e));
            match e {
                ClientError::BadFrame(_) => exit_code::GUEST_FAULT,
                _ => exit_code::GUEST_FAILURE,
            }
        }
        Some(o) => {
            if let ClientError::BadFrame(_) = e {
                eprintln!("fnode: {e}");
            }
            if o.is_success() {
                eprintln!("fnode: the guest exited without answering");
                exit_code::GUEST_FAILURE
            } else {
                eprintln!("fnode: {o}");
                o.exit_code()
            }
        }
    }
}

/// An error and its causes on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

/// Reads the request named by `--payload`, refusing one over the frame limit before
/// anything is booted.
fn read_payload(arg: Option<&str>) -> anyhow::Result<Vec<u8>> {
    let too_long = |what: &str, len: u64| {
        anyhow::anyhow!(
            "{what} is {len} bytes, over the {MAX_PAYLOAD}-byte limit of one invocation \
             ({} MiB): send a smaller payload",
            MAX_PAYLOAD >> 20
        )
    };
    let (what, reader): (String, Box<dyn Read>) = match arg {
        None => return Ok(Vec::new()),
        Some("-") => ("the payload on stdin".into(), Box::new(io::stdin().lock())),
        Some(a) => match a.strip_prefix('@') {
            Some(path) => {
                let file = std::fs::File::open(path)
                    .with_context(|| format!("cannot open the payload file {path}"))?;
                let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                if len > MAX_PAYLOAD as u64 {
                    return Err(too_long(&format!("the payload file {path}"), len));
                }
                (format!("the payload file {path}"), Box::new(file))
            }
            None if a.len() > MAX_PAYLOAD => return Err(too_long("the payload", a.len() as u64)),
            None => return Ok(a.as_bytes().to_vec()),
        },
    };
    let mut payload = Vec::new();
    reader
        .take(MAX_PAYLOAD as u64 + 1)
        .read_to_end(&mut payload)
        .with_context(|| format!("cannot read {what}"))?;
    if payload.len() > MAX_PAYLOAD {
        // Count the rest, for a message that says how much was offered.
        return Err(too_long(&what, payload.len() as u64));
    }
    Ok(payload)
}

/// Watches the VM while the host waits on its socket.
struct Watcher<'a> {
    vm: &'a mut MicroVm,
    /// How and when the VM ended, once it did.
    ended: Option<(Outcome, Instant)>,
    /// The VM could not be watched.
    error: Option<fnode_vmm::MicroVmError>,
}

impl<'a> Watcher<'a> {
    fn new(vm: &'a mut MicroVm) -> Self {
        Watcher {
            vm,
            ended: None,
            error: None,
        }
    }

    /// Whether to keep waiting: yes while the VM runs, and for a short grace after it ended
    /// (its last frame may still be on the way).
    fn keep_waiting(&mut self) -> bool {
        if let Some((_, at)) = &self.ended {
            return at.elapsed() < LAST_WORDS_GRACE;
        }
        if self.error.is_some() {
            return false;
        }
        match self.vm.poll() {
            Ok(None) => true,
            Ok(Some(outcome)) => {
                self.ended = Some((outcome, Instant::now()));
                true
            }
            Err(e) => {
                self.error = Some(e);
                false
            }
        }
    }
}

/// Host-side counts at one point of an invocation.
#[derive(Clone, Copy, Debug, Default)]
struct Counts {
    /// Userspace exits of all vCPUs so far.
    exits: u64,
    /// Guest pages the host has backed so far (touched by the guest or a device), if the
    /// kernel could say.
    resident_pages: Option<u64>,
}

impl Counts {
    /// The host-side counts of `vm` so far.
    fn of(vm: &MicroVm) -> Self {
        Counts {
            exits: vm.exit_count(),
            resident_pages: resident_pages(vm),
        }
    }
}

/// Guest memory pages backed by host memory (`mincore`): guest memory is anonymous and
/// mapped without populating it, so a resident page is one the guest (or a device, or the
/// loader) touched.
fn resident_pages(vm: &MicroVm) -> Option<u64> {
    // SAFETY: `_SC_PAGESIZE` is a valid sysconf name.
    let host_page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
    let mut total = 0u64;
    for region in vm.memory().iter() {
        let len = usize::try_from(region.len()).ok()?;
        let mut vec = vec![0u8; len.div_ceil(host_page)];
        // SAFETY: the region is one mapping of `len` bytes that lives as long as the VM
        // (borrowed here); `vec` has one byte per host page of it, as mincore writes.
        let rc = unsafe { libc::mincore(region.as_ptr().cast(), len, vec.as_mut_ptr()) };
        if rc != 0 {
            return None;
        }
        total += vec.iter().filter(|&&b| b & 1 != 0).count() as u64;
    }
    Some(total)
}

/// When each phase of an invocation ended.
#[derive(Debug)]
struct Timeline {
    start: Instant,
    built: Instant,
    /// The VM build alone (`fnode_vmm::build`), without opening `/dev/kvm` before it.
    vm_build: Duration,
    resumed: Option<Instant>,
    /// The guest signalled BOOTED: its kernel is up and the function's init starts.
    booted: Option<Instant>,
    /// The guest signalled READY: init is done and the connection is open.
    ready: Option<Instant>,
    sent: Option<Instant>,
    answered: Option<Instant>,
    at_ready: Option<Counts>,
    at_answer: Option<Counts>,
}

impl Timeline {
    /// A timeline that started at `start` and whose VM was just built, in `vm_build`.
    fn new(start: Instant, vm_build: Duration) -> Self {
        Timeline {
            start,
            built: Instant::now(),
            vm_build,
            resumed: None,
            booted: None,
            ready: None,
            sent: None,
            answered: None,
            at_ready: None,
            at_answer: None,
        }
    }

    fn print(&self) {
        let ms = |d: Duration| format!("{:.3} ms", d.as_secs_f64() * 1e3);
        let span = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) if b >= a => Some(b - a),
            _ => None,
        };
        let setup = (self.built - self.start).saturating_sub(self.vm_build);
        let mut line = format!(
            "fnode: timings: build {} (after {} opening /dev/kvm)",
            ms(self.vm_build),
            ms(setup)
        );
        // The guest signals BOOTED when its kernel is up and init starts, READY when init is
        // done; without BOOTED (an older image) the two are one phase.
        match (
            span(self.resumed, self.booted),
            span(self.booted, self.ready),
        ) {
            (Some(boot), Some(init)) => line += &format!(", boot {}, init {}", ms(boot), ms(init)),
            _ => {
                if let Some(d) = span(self.resumed, self.ready) {
                    line += &format!(", boot + init {}", ms(d));
                }
            }
        }
        if let Some(d) = span(self.sent, self.answered) {
            line += &format!(", invoke {}", ms(d));
        }
        let end = self.answered.unwrap_or_else(Instant::now);
        line += &format!(" (total {})", ms(end - self.start));
        eprintln!("{line}");
        if let (Some(r), Some(a)) = (self.at_ready, self.at_answer) {
            let pages = |c: Counts| c.resident_pages.map_or("?".into(), |p| p.to_string());
            let touched = match (r.resident_pages, a.resident_pages) {
                (Some(r), Some(a)) => a.saturating_sub(r).to_string(),
                _ => "?".into(),
            };
            eprintln!(
                "fnode: counts: to ready {} exits, {} guest pages resident; invoke {} exits, \
                 {} pages newly touched",
                r.exits,
                pages(r),
                a.exits.saturating_sub(r.exits),
                touched
            );
        }
    }
}

/// A folder only this user can enter, removed with everything in it on drop.
struct PrivateDir(PathBuf);

impl PrivateDir {
    fn create() -> anyhow::Result<Self> {
        let base = std::env::temp_dir();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = base.join(format!("fnode-invoke-{}-{nanos:08x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create a private folder in {}", base.display()))?;
        Ok(PrivateDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The guest's serial console: kept (its tail) to show on failure, or streamed to stderr.
#[derive(Clone)]
struct Console(Arc<Mutex<ConsoleInner>>);

struct ConsoleInner {
    stream: bool,
    tail: Vec<u8>,
}

impl fmt::Debug for Console {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Console")
    }
}

impl Console {
    fn new(stream: bool) -> Self {
        Console(Arc::new(Mutex::new(ConsoleInner {
            stream,
            tail: Vec::new(),
        })))
    }

    /// Prints the console's last lines on stderr (unless it was streamed there already).
    fn show_tail(&self) {
        let inner = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.stream || inner.tail.is_empty() {
            return;
        }
        eprintln!("fnode: the guest's console:");
        let _ = io::stderr().write_all(&inner.tail);
    }
}

impl Write for Console {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut inner = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.stream {
            let _ = io::stderr().write_all(data);
        }
        inner.tail.extend_from_slice(data);
        if inner.tail.len() > CONSOLE_TAIL {
            let cut = inner.tail.len() - CONSOLE_TAIL;
            inner.tail.drain(..cut);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_forms() {
        assert_eq!(read_payload(None).unwrap(), b"");
        assert_eq!(read_payload(Some("hello")).unwrap(), b"hello");
        let dir = PrivateDir::create().unwrap();
        let file = dir.path().join("p.bin");
        std::fs::write(&file, [0u8, 1, 2, 255]).unwrap();
        let arg = format!("@{}", file.display());
        assert_eq!(read_payload(Some(&arg)).unwrap(), [0u8, 1, 2, 255]);
        let err = read_payload(Some("@/nonexistent/payload")).unwrap_err();
        assert!(
            format!("{err:#}").contains("/nonexistent/payload"),
            "{err:#}"
        );
    }

    #[test]
    fn oversized_payloads_are_refused() {
        let dir = PrivateDir::create().unwrap();
        let file = dir.path().join("big.bin");
        std::fs::write(&file, vec![0u8; MAX_PAYLOAD + 1]).unwrap();
        let err = read_payload(Some(&format!("@{}", file.display()))).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(&format!("{} bytes", MAX_PAYLOAD + 1)), "{msg}");
        assert!(msg.contains("limit"), "{msg}");
        std::fs::write(&file, vec![0u8; MAX_PAYLOAD]).unwrap();
        assert_eq!(
            read_payload(Some(&format!("@{}", file.display())))
                .unwrap()
                .len(),
            MAX_PAYLOAD
        );
    }

    #[test]
    fn private_dir_is_private_and_removed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = PrivateDir::create().unwrap();
        let path = dir.path().to_owned();
        std::fs::write(path.join("x"), b"x").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn console_keeps_its_tail() {
        let mut c = Console::new(false);
        c.write_all(b"fnode guest-kernel 0.1.0\n").unwrap();
        assert_eq!(c.0.lock().unwrap().tail, b"fnode guest-kernel 0.1.0\n");
        c.write_all(&vec![b'x'; CONSOLE_TAIL * 2]).unwrap();
        assert_eq!(c.0.lock().unwrap().tail.len(), CONSOLE_TAIL);
    }
}
