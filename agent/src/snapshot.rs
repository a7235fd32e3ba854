//! `fnode snapshot IMAGE -o DIR`: boots a function image, waits until its `init` is done and
//! the invocation connection is open (the guest's READY), and saves the VM into a snapshot
//! directory that `fnode invoke DIR` serves from.
//!
//! The host connects to `abi::vsock::INVOKE_PORT` while the guest boots; the guest accepts
//! once its `init` has run, then signals READY, where the VMM pauses it. The snapshot thus
//! holds the established connection: a restored VM finds it parked on its new socket and
//! answers its first request without a handshake ([`crate::restored`]).

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use fnode_guest::abi::vsock::INVOKE_PORT;
use fnode_vmm::{
    builder::{self, VmConfig, DEFAULT_MEM_MIB},
    microvm::UntilReady,
    persist::{self, SnapshotReport},
    KvmContext,
};

use crate::client::Connection;
use crate::restored::PrivateDir;

/// `fnode snapshot` options.
#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// The function image (`fnode build` writes it).
    pub image: PathBuf,
    /// The snapshot directory to write (created; a snapshot already there is replaced).
    #[arg(short, long, value_name = "DIR")]
    pub output: PathBuf,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MEM_MIB)]
    pub mem: u64,
    /// Give up if the function is not ready after this many milliseconds (boot and init).
    #[arg(long, value_name = "N", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
    /// Stream the guest's serial console to stderr.
    #[arg(long)]
    pub console: bool,
    /// Kernel command line words to add (test switches such as `fnode.hostile=done`); the
    /// snapshot keeps them.
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,
}

/// What [`take`] did.
#[derive(Debug)]
pub struct Taken {
    /// Building the VM.
    pub build: Duration,
    /// From the VM's start to READY (boot, `init`, the connection accepted).
    pub init: Duration,
    /// What the VMM reported about the snapshot (phase times, file sizes).
    pub report: SnapshotReport,
}

/// A console that keeps what the guest printed (shown when it fails) and optionally
/// streams it to stderr.
#[derive(Clone, Debug, Default)]
pub struct ConsoleBuf {
    bytes: Arc<Mutex<Vec<u8>>>,
    stream: bool,
}

impl ConsoleBuf {
    /// A console; `stream`: copy the guest's output to stderr as it comes.
    pub fn new(stream: bool) -> Self {
        ConsoleBuf {
            bytes: Arc::default(),
            stream,
        }
    }

    /// The last `n` bytes the guest printed, as text.
    pub fn tail(&self, n: usize) -> String {
        let b = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        String::from_utf8_lossy(&b[b.len().saturating_sub(n)..]).into_owned()
    }
}

impl Write for ConsoleBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.stream {
            let _ = std::io::stderr().write_all(buf);
        }
        let mut b = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        // Keep the last 64 KiB.
        if b.len() + buf.len() > 64 << 10 {
            let cut = (b.len() + buf.len()).saturating_sub(64 << 10).min(b.len());
            b.drain(..cut);
        }
        b.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Boots `image` with `mem_mib` of memory, waits for READY with the invocation connection
/// open, and snapshots it into `dir`.
pub fn take(
    kvm: &KvmContext,
    image: &Path,
    dir: &Path,
    mem_mib: u64,
    timeout: Duration,
    console: ConsoleBuf,
) -> anyhow::Result<Taken> {
    take_with(kvm, image, dir, mem_mib, "", timeout, console)
}

/// [`take`], with `cmdline` added to the kernel command line.
pub fn take_with(
    kvm: &KvmContext,
    image: &Path,
    dir: &Path,
    mem_mib: u64,
    cmdline: &str,
    timeout: Duration,
    console: ConsoleBuf,
) -> anyhow::Result<Taken> {
    let start = Instant::now();
    let deadline = start + timeout;
    let tmp = PrivateDir::create()?;
    let socket = tmp.path().join("vsock.sock");
    let config = VmConfig {
        mem_mib,
        cmdline: cmdline.to_owned(),
        vsock_uds: Some(socket.clone()),
        ..VmConfig::new(image)
    };
    let mut vm = builder::build(kvm, &config, Box::new(console.clone()))
        .with_context(|| format!("cannot build a VM for {}", image.display()))?;
    let build = start.elapsed();
    let resumed = Instant::now();
    // The host connects while the guest boots; the guest accepts once `init` has run and
    // then signals READY.
    let connector = {
        let socket = socket.clone();
        thread::spawn(move || {
            let mut watch = || Instant::now() < deadline;
            Connection::connect_retrying(&socket, INVOKE_PORT, deadline, &mut watch)
        })
    };
    let until = vm
        .run_until_ready(deadline.saturating_duration_since(Instant::now()))
        .context("cannot run the VM")?;
    let ready_at = Instant::now();
    match until {
        UntilReady::Ready => {}
        UntilReady::Ended(outcome) => {
            vm.flush_console();
            bail!(
                "the function did not become ready: {outcome}\nconsole:\n{}",
                console.tail(4096)
            );
        }
    }
    // READY comes after the guest accepted; the host has its `OK` at about the same time
    // (the device answers it on its own thread, while the vCPU is paused).
    let conn = connector
        .join()
        .map_err(|_| anyhow::anyhow!("the connecting thread panicked"))?
        .context("the guest signalled READY but the host's connection failed")?;
    let report = persist::snapshot(kvm, &mut vm, dir)
        .with_context(|| format!("cannot snapshot the VM into {}", dir.display()))?;
    // The VM goes first, then the client: closing the client earlier would reach the
    // guest's connection.
    drop(vm);
    drop(conn);
    drop(tmp);
    Ok(Taken {
        build,
        init: ready_at - resumed,
        report,
    })
}

/// Runs `fnode snapshot`.
pub fn run(args: SnapshotArgs) -> anyhow::Result<()> {
    let kvm = KvmContext::new().context("cannot use KVM")?;
    let console = ConsoleBuf::new(args.console);
    let t = take_with(
        &kvm,
        &args.image,
        &args.output,
        args.mem,
        &args.cmdline,
        Duration::from_millis(args.timeout_ms),
        console,
    )?;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let usage = &t.report.memory_usage;
    println!(
        "snapshot {}: init {:.3} ms (build {:.3} ms), snapshot {:.3} ms; memory file {} MiB \
         apparent, {} KiB on disk ({} data pages); state {} bytes",
        args.output.display(),
        ms(t.init),
        ms(t.build),
        ms(t.report.timings.total),
        usage.apparent >> 20,
        usage.on_disk >> 10,
        t.report.memory.data_pages,
        t.report.state_bytes
    );
    Ok(())
}
