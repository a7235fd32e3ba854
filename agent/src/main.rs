//! `fnode`: the user CLI and (later) the node agent.
use std::process::ExitCode;

use clap::Parser;

mod build;
mod client;
mod image;
mod invoke;

/// fnode: a function node that boots, snapshots and restores no_std microVMs on KVM.
#[derive(Parser, Debug)]
#[command(version, about)]
enum Cli {
    /// Build a function crate into a bootable image (guest kernel + function); prints the
    /// image's path last.
    Build(build::BuildArgs),
    /// Boot a function image, invoke the function once with a payload and write its response
    /// to stdout.
    #[command(after_help = invoke::EXIT_CODES_HELP)]
    Invoke(invoke::InvokeArgs),
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse() {
        Cli::Build(args) => build::run(args).map(|()| ExitCode::SUCCESS),
        Cli::Invoke(args) => Ok(invoke::run(args)),
    }
}
