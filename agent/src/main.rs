//! `fnode`: the user CLI and (later) the node agent.
use clap::Parser;

mod build;
mod image;

/// fnode: a function node that boots, snapshots and restores no_std microVMs on KVM.
#[derive(Parser, Debug)]
#[command(version, about)]
enum Cli {
    /// Build a function crate into a bootable image (guest kernel + function); prints the
    /// image's path last.
    Build(build::BuildArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse() {
        Cli::Build(args) => build::run(args),
    }
}
