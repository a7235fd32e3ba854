//! `fnode`: the user CLI. It builds function images, invokes them cold or from a snapshot,
//! snapshots them and benchmarks them, driving VMs through the `fnode-vmm` library.
use std::process::ExitCode;

use clap::Parser;

mod bench;
mod build;
mod client;
mod image;
mod invoke;
mod restored;
mod snapshot;

/// fnode: a function node that boots, snapshots and restores no_std microVMs on KVM.
#[derive(Parser, Debug)]
#[command(
    name = "fnode",
    version,
    about = "fnode: build, snapshot, restore and invoke no_std functions in KVM microVMs"
)]
enum Cli {
    /// Build a function crate into a bootable image (guest kernel + function); prints the
    /// image's path last.
    Build(build::BuildArgs),
    /// Invoke a function: boot its image (cold) or restore its snapshot directory, send a
    /// payload and write the response to stdout.
    #[command(after_help = invoke::EXIT_CODES_HELP)]
    Invoke(invoke::InvokeArgs),
    /// Boot a function image, run its init and snapshot it into a directory that
    /// `fnode invoke DIR` serves from.
    Snapshot(snapshot::SnapshotArgs),
    /// Benchmark a function: cold start, restore, in-place reset and the raw-KVM floor,
    /// interleaved in one run (table on stdout, --json, --plot, --density).
    Bench(bench::BenchArgs),
    /// A worker process of `fnode bench --density` (it starts them itself).
    #[command(hide = true)]
    DensityWorker(bench::WorkerArgs),
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse() {
        Cli::Build(args) => build::run(args).map(|()| ExitCode::SUCCESS),
        Cli::Invoke(args) => Ok(invoke::run(args)),
        Cli::Snapshot(args) => snapshot::run(args).map(|()| ExitCode::SUCCESS),
        Cli::Bench(args) => bench::run(args).map(|()| ExitCode::SUCCESS),
        Cli::DensityWorker(args) => bench::run_worker(args).map(|()| ExitCode::SUCCESS),
    }
}
