//! `fnode-vmm`: boot a PVH ELF kernel in a fresh microVM and report how it ended.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use fnode_vmm::bench;
use fnode_vmm::builder::{self, VmConfig, DEFAULT_MEM_MIB};
use fnode_vmm::microvm::UntilReady;
use fnode_vmm::outcome::exit_code;
use fnode_vmm::persist;
use fnode_vmm::KvmContext;

const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  the guest exited with success (abi::exit::SUCCESS)
  1  the guest exited with another status (failure; its console says why)
  2  bad command-line usage
  3  the guest faulted (a CPU exception; one line names it)
  4  the guest did not exit within --timeout-ms and was stopped
  5  KVM or emulation failed (triple fault, internal error, unhandled exit)
  6  the VM could not be built (missing or invalid image, /dev/kvm unusable, bad option)";

/// Limit for one benchmark boot: a guest that needs longer is broken, not slow.
const BENCH_BOOT_TIMEOUT: Duration = Duration::from_secs(10);

/// fnode's microVM monitor: boots PVH ELF kernels on KVM.
#[derive(Debug, Parser)]
#[command(name = "fnode-vmm", version, after_help = EXIT_CODES_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot IMAGE, stream its serial console to stdout, and exit with the guest's outcome.
    #[command(after_help = EXIT_CODES_HELP)]
    Boot(BootArgs),
    /// Time cold boots of IMAGE against the raw-KVM floor (interleaved, same run) and print
    /// percentiles of every phase. The guest must exit with success.
    Bench(BenchArgs),
    /// Boot IMAGE until the guest signals READY (init done), save the VM into the snapshot
    /// directory DIR, and stop it. Prints what was saved and how long it took.
    Snapshot(SnapshotArgs),
    /// Restore the snapshot in DIR into a new VM, stream its serial console to stdout, and exit
    /// with the guest's outcome.
    #[command(after_help = EXIT_CODES_HELP)]
    Restore(RestoreArgs),
}

#[derive(Debug, clap::Args)]
struct GuestArgs {
    /// The PVH ELF kernel image (scripts/build-guest.sh prints the path of fnode's).
    image: PathBuf,
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MEM_MIB)]
    mem: u64,
    /// Kernel command line (e.g. "fault=ud2", "snapshot-test=1").
    #[arg(long, value_name = "STR", default_value = "")]
    cmdline: String,
}

impl GuestArgs {
    /// The VM these options describe (one vCPU, no virtio devices).
    fn config(self) -> VmConfig {
        VmConfig {
            mem_mib: self.mem,
            cmdline: self.cmdline,
            ..VmConfig::new(self.image)
        }
    }
}

#[derive(Debug, clap::Args)]
struct SnapshotArgs {
    #[command(flatten)]
    guest: GuestArgs,
    /// The snapshot directory to write (created if needed; a snapshot there is replaced).
    dir: PathBuf,
    /// Give up if the guest has not signalled READY after this many milliseconds.
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
}

#[derive(Debug, clap::Args)]
struct RestoreArgs {
    /// The snapshot directory.
    dir: PathBuf,
    #[command(flatten)]
    run: RunArgs,
    /// Also print the time of each restore phase on stderr.
    #[arg(long)]
    timings: bool,
    /// The Unix socket PATH the restored vsock device listens at (required when the
    /// snapshot has a vsock device, as `fnode snapshot`'s do; a fresh path per VM). The
    /// snapshot's connection is parked there: write "CONNECT <port>\n" and read "OK <port>\n".
    #[arg(long, value_name = "PATH")]
    vsock: Option<PathBuf>,
}

/// How a VM runs: how long it may take and where its console goes.
#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Stop the guest if it has not exited after this many milliseconds.
    #[arg(long, value_name = "N", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    timeout_ms: u64,
    /// Write the serial console to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    serial_out: Option<PathBuf>,
}

impl RunArgs {
    fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The console: the `--serial-out` file, or stdout.
    fn console(&self) -> anyhow::Result<Box<dyn Write + Send>> {
        Ok(match &self.serial_out {
            Some(path) => Box::new(
                File::create(path)
                    .with_context(|| format!("cannot create serial output {}", path.display()))?,
            ),
            None => Box::new(std::io::stdout()),
        })
    }
}

#[derive(Debug, clap::Args)]
struct BenchArgs {
    /// The guest (the floor maps as much memory).
    #[command(flatten)]
    guest: GuestArgs,
    /// Number of boots (and as many floor runs).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..))]
    runs: u32,
    /// Do not boot the image under QEMU microvm (the peer) in the same run.
    #[arg(long)]
    no_qemu: bool,
    /// Also time restores of the snapshot in DIR (each run to the guest's exit) against a
    /// floor over its memory file mapped MAP_PRIVATE, and print that report after the boot's.
    #[arg(long, value_name = "DIR")]
    snapshot: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct BootArgs {
    #[command(flatten)]
    guest: GuestArgs,
    #[command(flatten)]
    run: RunArgs,
    /// Also print the time of each VM build phase on stderr.
    #[arg(long)]
    timings: bool,
    /// Give the guest a virtio-vsock device whose host end is the Unix socket PATH
    /// (Firecracker's hybrid vsock: connect, write "CONNECT <port>\n", read "OK <port>\n").
    #[arg(long, value_name = "PATH")]
    vsock: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Boot(args) => boot(args),
        Command::Bench(args) => bench(args),
        Command::Snapshot(args) => snapshot(args),
        Command::Restore(args) => restore(args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit_code::SETUP)
        }
    }
}

fn boot(args: BootArgs) -> anyhow::Result<u8> {
    let start = Instant::now();
    let console = args.run.console()?;
    let kvm = KvmContext::new()?;
    let config = VmConfig {
        vsock_uds: args.vsock,
        ..args.guest.config()
    };
    let mut vm = builder::build(&kvm, &config, console)?;
    let report = match vm.run(args.run.timeout()) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: VM failed: {e}");
            return Ok(exit_code::VM_ERROR);
        }
    };
    let total = start.elapsed();
    let timings = *vm.build_timings();

    let outcome = &report.outcome;
    if outcome.is_success() {
        eprintln!(
            "fnode-vmm: {outcome} in {} (VM build {}, guest run {})",
            ms(total),
            ms(timings.total),
            ms(report.run_time)
        );
    } else {
        eprintln!("error: {outcome}");
    }
    // Tearing the VM down (KVM destroys it when its fds close) is not part of the boot.
    let teardown = Instant::now();
    drop(vm);
    if args.timings {
        eprintln!("fnode-vmm: build phases: {timings:?}");
        eprintln!("fnode-vmm: teardown {}", ms(teardown.elapsed()));
    }
    Ok(outcome.exit_code())
}

fn bench(args: BenchArgs) -> anyhow::Result<u8> {
    let kvm = KvmContext::new()?;
    let config = args.guest.config();
    // Whole processes, spawn to exit: fnode-vmm itself next to the QEMU peer.
    let mut fnode_vmm = std::process::Command::new(
        std::env::current_exe().context("cannot find the fnode-vmm executable")?,
    );
    fnode_vmm.arg("boot").arg(&config.kernel).args([
        "--mem",
        &config.mem_mib.to_string(),
        "--cmdline",
        &config.cmdline,
    ]);
    let mut processes = vec![bench::ProcessBoot {
        name: "process.fnode-vmm",
        command: fnode_vmm,
        expected: i32::from(exit_code::SUCCESS),
    }];
    if !args.no_qemu {
        processes.push(bench::ProcessBoot {
            name: "process.qemu-microvm",
            command: bench::qemu_microvm_command(&config.kernel, config.mem_mib, &config.cmdline),
            expected: bench::QEMU_SUCCESS,
        });
    }
    eprintln!(
        "fnode-vmm bench: {} rounds of floor, in-process boot{} ...",
        args.runs,
        if args.no_qemu {
            ", fnode-vmm process"
        } else {
            ", fnode-vmm process, QEMU microvm process"
        }
    );
    let report = bench::boot_vs_floor(&kvm, &config, args.runs, BENCH_BOOT_TIMEOUT, processes)?;
    print!("{report}");
    if let Some(dir) = &args.snapshot {
        eprintln!(
            "fnode-vmm bench: {} rounds of floor over {}'s memory file, restore ...",
            args.runs,
            dir.display()
        );
        let report = bench::restore_vs_floor(&kvm, dir, args.runs, BENCH_BOOT_TIMEOUT)?;
        println!();
        print!("{report}");
    }
    Ok(exit_code::SUCCESS)
}

fn snapshot(args: SnapshotArgs) -> anyhow::Result<u8> {
    let kvm = KvmContext::new()?;
    let config = args.guest.config();
    let mut vm = builder::build(&kvm, &config, Box::new(std::io::stdout()))?;
    match vm.run_until_ready(Duration::from_millis(args.timeout_ms))? {
        UntilReady::Ready => {}
        UntilReady::Ended(outcome) => {
            eprintln!(
                "error: the guest never signalled READY (abi::control::READY): {outcome}; \
                 only an image whose init signals READY can be snapshotted"
            );
            return Ok(outcome.exit_code().max(exit_code::GUEST_FAILURE));
        }
    }
    let report = persist::snapshot(&kvm, &mut vm, &args.dir)
        .with_context(|| format!("cannot snapshot into {}", args.dir.display()))?;
    eprintln!("fnode-vmm: {report}");
    Ok(exit_code::SUCCESS)
}

fn restore(args: RestoreArgs) -> anyhow::Result<u8> {
    let console = args.run.console()?;
    let kvm = KvmContext::new()?;
    let options = fnode_vmm::RestoreOptions {
        vsock_uds: args.vsock.clone(),
        ..Default::default()
    };
    let mut vm = fnode_vmm::restore_with(&kvm, &args.dir, console, &options)?;
    let report = match vm.run(args.run.timeout()) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("error: VM failed: {e}");
            return Ok(exit_code::VM_ERROR);
        }
    };
    let outcome = &report.outcome;
    let timings = vm.restore_timings().copied();
    let to_first_run = vm.restore_to_first_run();
    if outcome.is_success() {
        eprintln!(
            "fnode-vmm: {outcome} (restore {}, to first KVM_RUN {}, guest run {})",
            timings.map_or_else(|| "?".into(), |t| ms(t.total)),
            to_first_run.map_or_else(|| "?".into(), ms),
            ms(report.run_time)
        );
    } else {
        eprintln!("error: {outcome}");
    }
    if args.timings {
        if let Some(t) = timings {
            let phases: Vec<String> = t
                .phases()
                .iter()
                .map(|(name, d)| format!("{name} {:.1} us", d.as_secs_f64() * 1e6))
                .collect();
            eprintln!("fnode-vmm: restore phases: {}", phases.join(", "));
        }
    }
    Ok(outcome.exit_code())
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}
