//! The VMM's side of the boot contract, checked with a minimal PVH guest
//! (`tests/guests/mini.S`) that does one thing per command line.

mod common;

use common::{boot, mini_guest, BOOT_TIMEOUT, HANG_TIMEOUT};
use fnode_guest::abi::exit;
use fnode_vmm::builder::{build, VmConfig};
use fnode_vmm::kvm::test_support::require_kvm;
use fnode_vmm::microvm::VmState;
use fnode_vmm::vstate::vcpu::VcpuError;
use fnode_vmm::{KvmContext, Outcome};

fn exited(cmdline: &str) -> u32 {
    let b = boot(mini_guest(), cmdline, BOOT_TIMEOUT);
    assert_eq!(b.console, "mini\n");
    match b.outcome {
        Outcome::Exited { status } => status,
        other => panic!("{cmdline}: expected an exit, got {other}"),
    }
}

#[test]
fn one_byte_exit_status() {
    if !require_kvm() {
        return;
    }
    assert_eq!(exited("s"), exit::SUCCESS);
    assert_eq!(exited("x"), exit::FAILURE);
}

#[test]
fn two_byte_exit_status() {
    if !require_kvm() {
        return;
    }
    assert_eq!(exited("w"), 0x1234);
}

#[test]
fn rbx_points_at_the_start_info() {
    if !require_kvm() {
        return;
    }
    // The guest exits with the first word at %ebx: hvm_start_info's magic.
    assert_eq!(exited("c"), 0x336e_c578);
}

#[test]
fn unmapped_mmio_reads_as_all_ones() {
    if !require_kvm() {
        return;
    }
    assert_eq!(exited("m"), 0xffff_ffff);
}

#[test]
fn fault_report_is_read_from_guest_memory() {
    if !require_kvm() {
        return;
    }
    let b = boot(mini_guest(), "f", BOOT_TIMEOUT);
    match b.outcome {
        Outcome::Faulted { report: Some(r) } => {
            assert_eq!((r.vector, r.rip, r.cs), (6, 0x10_1234, 8));
        }
        other => panic!("expected a fault report, got {other}"),
    }
}

#[test]
fn bad_report_magic_means_no_report() {
    if !require_kvm() {
        return;
    }
    let b = boot(mini_guest(), "g", BOOT_TIMEOUT);
    assert!(
        matches!(b.outcome, Outcome::Faulted { report: None }),
        "{}",
        b.outcome
    );
}

#[test]
fn triple_fault_is_a_named_vm_error() {
    if !require_kvm() {
        return;
    }
    let b = boot(mini_guest(), "t", BOOT_TIMEOUT);
    assert!(
        matches!(b.outcome, Outcome::Crashed(VcpuError::Shutdown)),
        "{}",
        b.outcome
    );
}

#[test]
fn halted_guest_times_out() {
    if !require_kvm() {
        return;
    }
    let b = boot(mini_guest(), "h", HANG_TIMEOUT);
    assert!(
        matches!(b.outcome, Outcome::TimedOut { .. }),
        "{}",
        b.outcome
    );
}

#[test]
fn timed_out_guest_is_paused_and_can_resume() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let config = VmConfig {
        cmdline: "l".into(),
        ..VmConfig::new(mini_guest())
    };
    let mut vm = build(&kvm, &config, Box::new(std::io::sink())).unwrap();
    let first = vm.run(HANG_TIMEOUT).unwrap().outcome;
    assert!(matches!(first, Outcome::TimedOut { .. }), "{first}");
    assert_eq!(vm.state(), VmState::Paused);
    // Pausing left the vCPU runnable: it spins again, and is stopped again.
    let second = vm.run(HANG_TIMEOUT).unwrap().outcome;
    assert!(matches!(second, Outcome::TimedOut { .. }), "{second}");
}

#[test]
fn finished_vm_does_not_run_again() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let config = VmConfig {
        cmdline: "s".into(),
        ..VmConfig::new(mini_guest())
    };
    let mut vm = build(&kvm, &config, Box::new(std::io::sink())).unwrap();
    assert!(vm.run(BOOT_TIMEOUT).unwrap().outcome.is_success());
    assert_eq!(vm.state(), VmState::Finished);
    assert_eq!(vm.exit_status(), Some(exit::SUCCESS));
    vm.run(BOOT_TIMEOUT).unwrap_err();
}

#[test]
fn several_vms_run_side_by_side() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let mut vms: Vec<_> = ["s", "w", "l"]
        .iter()
        .map(|c| {
            let config = VmConfig {
                cmdline: (*c).into(),
                ..VmConfig::new(mini_guest())
            };
            build(&kvm, &config, Box::new(std::io::sink())).unwrap()
        })
        .collect();
    for vm in &mut vms {
        vm.resume().unwrap();
    }
    let outcomes: Vec<_> = vms
        .iter_mut()
        .zip([BOOT_TIMEOUT, BOOT_TIMEOUT, HANG_TIMEOUT])
        .map(|(vm, t)| vm.wait(t).unwrap())
        .collect();
    assert!(outcomes[0].is_success(), "{}", outcomes[0]);
    assert!(matches!(outcomes[1], Outcome::Exited { status: 0x1234 }));
    assert!(matches!(outcomes[2], Outcome::TimedOut { .. }));
}
