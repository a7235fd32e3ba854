//! Boots the real fnode guest kernel on /dev/kvm.

mod common;

use common::{boot, guest_image, BOOT_TIMEOUT, HANG_TIMEOUT};
use fnode_guest::abi::{cmdline, BANNER_PREFIX};
use fnode_vmm::builder::{build, BuildError, VmConfig};
use fnode_vmm::kvm::test_support::require_kvm;
use fnode_vmm::loader::LoaderError;
use fnode_vmm::microvm::VmState;
use fnode_vmm::{KvmContext, Outcome};

fn fault_cmdline(kind: &str) -> String {
    format!("{}={kind}", cmdline::FAULT_KEY)
}

#[test]
fn boots_prints_banner_and_exits_with_success() {
    if !require_kvm() {
        return;
    }
    let b = boot(guest_image(), "", BOOT_TIMEOUT);
    assert!(
        b.outcome.is_success(),
        "{} / console:\n{}",
        b.outcome,
        b.console
    );
    assert!(
        b.console.lines().any(|l| l.starts_with(BANNER_PREFIX)),
        "no banner on the console:\n{}",
        b.console
    );
}

#[test]
fn ud2_is_reported_as_vector_6() {
    if !require_kvm() {
        return;
    }
    let b = boot(
        guest_image(),
        &fault_cmdline(cmdline::FAULT_UD2),
        BOOT_TIMEOUT,
    );
    match b.outcome {
        Outcome::Faulted { report: Some(r) } => {
            assert_eq!(r.vector, 6, "{r:?}");
            assert_eq!(r.mnemonic(), "#UD");
        }
        other => panic!(
            "expected a #UD report, got {other} / console:\n{}",
            b.console
        ),
    }
}

#[test]
fn page_fault_is_reported_with_its_address() {
    if !require_kvm() {
        return;
    }
    let b = boot(
        guest_image(),
        &fault_cmdline(cmdline::FAULT_PAGEFAULT),
        BOOT_TIMEOUT,
    );
    match b.outcome {
        Outcome::Faulted { report: Some(r) } => {
            assert_eq!(r.vector, 14, "{r:?}");
            assert_eq!(r.cr2, cmdline::PAGEFAULT_ADDR, "{r:?}");
        }
        other => panic!(
            "expected a #PF report, got {other} / console:\n{}",
            b.console
        ),
    }
}

#[test]
fn spinning_guest_is_stopped_by_the_timeout() {
    if !require_kvm() {
        return;
    }
    let b = boot(
        guest_image(),
        &fault_cmdline(cmdline::FAULT_LOOP),
        HANG_TIMEOUT,
    );
    assert!(
        matches!(b.outcome, Outcome::TimedOut { timeout } if timeout == HANG_TIMEOUT),
        "{} / console:\n{}",
        b.outcome,
        b.console
    );
    // It got as far as its banner before spinning.
    assert!(b.console.contains(BANNER_PREFIX), "{}", b.console);
}

#[test]
fn vm_is_built_paused() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let console = fnode_vmm::devices::serial::SharedBuffer::new();
    let vm = build(
        &kvm,
        &VmConfig::new(guest_image()),
        Box::new(console.clone()),
    )
    .unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    assert_eq!(vm.exit_status(), None);
    drop(vm);
    // Dropped without running: the guest never printed anything.
    assert_eq!(console.text(), "");
}

#[test]
fn smallest_memory_boots() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let config = VmConfig {
        mem_mib: fnode_guest::abi::layout::MIN_MEM_MIB,
        ..VmConfig::new(guest_image())
    };
    let mut vm = build(&kvm, &config, Box::new(std::io::sink())).unwrap();
    let outcome = vm.run(BOOT_TIMEOUT).unwrap().outcome;
    assert!(outcome.is_success(), "{outcome}");
}

#[test]
fn non_elf_and_non_pvh_images_are_rejected() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let not_elf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let err = build(&kvm, &VmConfig::new(&not_elf), Box::new(std::io::sink())).unwrap_err();
    assert!(
        matches!(err, BuildError::Load(LoaderError::NotElf { .. })),
        "{err:?}"
    );
    let err = build(&kvm, &VmConfig::new("/bin/true"), Box::new(std::io::sink())).unwrap_err();
    assert!(
        matches!(err, BuildError::Load(LoaderError::NoPvhEntry { .. })),
        "{err:?}"
    );
}
