//! The plain fnode boot image: boots the kernel, which prints its banner and memory and acts
//! on `fault=`, then exits with [`abi::exit::SUCCESS`](fnode_guest::abi::exit::SUCCESS).
//! The VMM's and QEMU's boot tests run it.
//!
//! It is a guest: it builds for `x86_64-unknown-none` only (`scripts/build-guest.sh`). A host
//! build gives a stub that says so, which keeps `cargo build --workspace` working.

#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
fnode_guest_kernel::kernel_main!(run);

#[cfg(target_os = "none")]
fn run(boot: &fnode_guest_kernel::BootInfo) -> ! {
    use fnode_guest::abi::cmdline;
    if cmdline::get(boot.cmdline, cmdline::SNAPSHOT_TEST_KEY) == Some("1") {
        fnode_guest_kernel::snapshot_test::run();
    }
    if cmdline::get(boot.cmdline, cmdline::ECHO_KEY) == Some("1") {
        fnode_guest_kernel::channel::echo_main(boot.cmdline);
    }
    match fnode_guest_kernel::hostile::switch(boot.cmdline) {
        // The switches that still serve are the run loop's.
        Ok(Some(what)) if !what.serves() => fnode_guest_kernel::hostile::run(what, boot.cmdline),
        Ok(_) => {}
        Err(other) => fnode_guest_kernel::exit::fail(&format_args!(
            "unknown {}={other}: expected {}, {} or {}",
            cmdline::HOSTILE_KEY,
            cmdline::HOSTILE_VSOCK,
            cmdline::HOSTILE_DONE,
            cmdline::HOSTILE_DONE_EARLY
        )),
    }
    // A function image enters its function here and never comes back.
    if let Err(e) = fnode_guest_kernel::runloop::start(boot) {
        fnode_guest_kernel::exit::fail(&e);
    }
    fnode_guest_kernel::exit::exit(fnode_guest::abi::exit::SUCCESS)
}

#[cfg(not(target_os = "none"))]
fn main() {
    eprintln!(
        "fnode-guest-kernel is a guest image: build it with scripts/build-guest.sh \
         (--target x86_64-unknown-none) and boot it with fnode-vmm or scripts/qemu-boot.sh"
    );
    std::process::exit(2);
}
