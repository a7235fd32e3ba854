//! The virtio-vsock device in a real KVM VM: announced on the command line, its window on
//! the MMIO bus with irqfd/ioeventfds registered, and a device fault stops the VM with the
//! fault's message. (The device's protocol is tested without KVM in its unit tests.)

mod common;

use std::path::PathBuf;

use common::{guest_image, BOOT_TIMEOUT};
use fnode_guest::abi::{self, cmdline};
use fnode_vmm::builder::{build, VmConfig};
use fnode_vmm::kvm::test_support::require_kvm;
use fnode_vmm::outcome::exit_code;
use fnode_vmm::{KvmContext, Outcome};

fn sock_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fnode-vsock-it-{}-{name}.sock", std::process::id()))
}

#[test]
fn guest_boots_with_a_vsock_device() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let path = sock_path("boot");
    let config = VmConfig {
        vsock_uds: Some(path.clone()),
        ..VmConfig::new(guest_image())
    };
    let mut vm = build(&kvm, &config, Box::new(std::io::sink())).unwrap();
    assert!(
        path.exists(),
        "the hybrid vsock socket is bound at build time"
    );
    assert!(vm.virtio().vsock().is_some());
    let report = vm.run(BOOT_TIMEOUT).unwrap();
    assert!(report.outcome.is_success(), "{}", report.outcome);
    drop(vm);
    assert!(!path.exists(), "the socket is removed with the VM");
}

#[test]
fn device_fault_stops_the_vm_with_its_message() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let path = sock_path("fault");
    let config = VmConfig {
        // The guest spins; only the device fault can end the run.
        cmdline: format!("{}={}", cmdline::FAULT_KEY, cmdline::FAULT_LOOP),
        vsock_uds: Some(path),
        ..VmConfig::new(guest_image())
    };
    let mut vm = build(&kvm, &config, Box::new(std::io::sink())).unwrap();
    vm.resume().unwrap();
    // What a hostile guest's 2-byte store to the Status register looks like on the bus.
    assert!(vm
        .buses()
        .mmio
        .write(abi::virtio::MMIO_BASE + 0x70, &[1, 0]));
    let outcome = vm.wait(BOOT_TIMEOUT).unwrap();
    match &outcome {
        Outcome::DeviceFault(f) => assert_eq!(
            f.to_string(),
            "virtio-vsock@0xd0000000: 2-byte write at register offset 0x70: \
             registers take aligned 4-byte accesses"
        ),
        other => panic!("expected a device fault, got {other}"),
    }
    assert_eq!(outcome.exit_code(), exit_code::GUEST_FAULT);
}
