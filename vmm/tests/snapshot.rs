//! Snapshots of the real guest kernel on /dev/kvm: save at READY, restore, and the guest
//! finishes knowing what it knew; bad snapshots are refused with an error that names the
//! file and the problem.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{guest_image, BOOT_TIMEOUT};
use fnode_guest::abi::{self, cmdline};
use fnode_snapshot::memory_file::{self, PAGE_SIZE};
use fnode_snapshot::state_file::{self, StateFileError};
use fnode_snapshot::{FormatVersion, MemoryFileError, SnapshotDir};
use fnode_vmm::builder::{build, VmConfig};
use fnode_vmm::devices::serial::SharedBuffer;
use fnode_vmm::kvm::test_support::require_kvm;
use fnode_vmm::microvm::{UntilReady, VmState};
use fnode_vmm::persist::cpu::{self, CpuCompatError};
use fnode_vmm::persist::{self, MicroVmState, SnapshotReport, FORMAT};
use fnode_vmm::restore::{restore, RestoreError};
use fnode_vmm::{KvmContext, MicroVm, Outcome};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

fn snapshot_test_cmdline() -> String {
    format!("{}=1", cmdline::SNAPSHOT_TEST_KEY)
}

/// The value after `prefix` on the console's line that starts with it.
fn value_after<'a>(console: &'a str, prefix: &str) -> Option<&'a str> {
    console.lines().find_map(|l| l.strip_prefix(prefix))
}

/// A VM of the snapshot-test guest, run until READY.
fn ready_vm(kvm: &KvmContext) -> (MicroVm, SharedBuffer, String) {
    let console = SharedBuffer::new();
    let config = VmConfig {
        cmdline: snapshot_test_cmdline(),
        ..VmConfig::new(guest_image())
    };
    let mut vm = build(kvm, &config, Box::new(console.clone())).unwrap();
    match vm.run_until_ready(BOOT_TIMEOUT).unwrap() {
        UntilReady::Ready => {}
        UntilReady::Ended(outcome) => {
            panic!("guest ended before READY: {outcome}\n{}", console.text())
        }
    }
    assert_eq!(vm.state(), VmState::Paused);
    vm.flush_console();
    let text = console.text();
    let value = value_after(&text, cmdline::SNAPSHOT_TEST_READY)
        .unwrap_or_else(|| panic!("no READY line on the console:\n{text}"))
        .to_string();
    (vm, console, value)
}

/// Takes a snapshot of the snapshot-test guest at READY into `dir`; returns the value the
/// guest printed and the report.
fn take_snapshot(kvm: &KvmContext, dir: &Path) -> (String, SnapshotReport) {
    let (mut vm, _console, value) = ready_vm(kvm);
    let report = persist::snapshot(kvm, &mut vm, dir).unwrap();
    (value, report)
}

/// Restores `dir`, runs the guest to its end, and returns the outcome and the console.
fn restore_and_run(kvm: &KvmContext, dir: &Path) -> (Outcome, String, MicroVm) {
    let console = SharedBuffer::new();
    let mut vm = restore(kvm, dir, Box::new(console.clone())).unwrap();
    assert_eq!(vm.state(), VmState::Paused);
    let report = vm.run(BOOT_TIMEOUT).unwrap();
    (report.outcome, console.text(), vm)
}

fn assert_resumed_with(outcome: &Outcome, console: &str, value: &str) {
    assert!(outcome.is_success(), "{outcome} / console:\n{console}");
    let resumed = value_after(console, cmdline::SNAPSHOT_TEST_RESUMED)
        .unwrap_or_else(|| panic!("no RESUMED line on the console:\n{console}"));
    assert_eq!(resumed, format!("{value} {value}"), "console:\n{console}");
    // The restored guest went on after READY; it did not boot again.
    assert!(
        value_after(console, cmdline::SNAPSHOT_TEST_READY).is_none(),
        "{console}"
    );
    assert!(!console.contains(abi::BANNER_PREFIX), "{console}");
}

#[test]
fn restored_guest_finishes_with_what_it_knew() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let tmp = TempDir::new().unwrap();
    let dir = tmp.as_path().join("snap");
    let (value, report) = take_snapshot(&kvm, &dir);
    eprintln!("{report}");
    // Sparse: far less on disk than guest memory.
    assert_eq!(report.memory_usage.apparent, 64 << 20);
    assert!(
        report.memory_usage.on_disk < report.memory_usage.apparent / 4,
        "{report}"
    );
    assert!(report.memory.data_pages > 0);

    let (outcome, console, vm) = restore_and_run(&kvm, &dir);
    assert_resumed_with(&outcome, &console, &value);
    let timings = vm.restore_timings().unwrap();
    assert!(timings.total >= timings.validate);
    assert!(vm.restore_to_first_run().is_some());
}

#[test]
fn two_restores_of_one_snapshot_both_finish() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let tmp = TempDir::new().unwrap();
    let dir = tmp.as_path().join("snap");
    let (value, _) = take_snapshot(&kvm, &dir);
    // Both alive at once, sharing the memory file.
    let a_console = SharedBuffer::new();
    let b_console = SharedBuffer::new();
    let mut a = restore(&kvm, &dir, Box::new(a_console.clone())).unwrap();
    let mut b = restore(&kvm, &dir, Box::new(b_console.clone())).unwrap();
    let a_outcome = a.run(BOOT_TIMEOUT).unwrap().outcome;
    let b_outcome = b.run(BOOT_TIMEOUT).unwrap().outcome;
    assert_resumed_with(&a_outcome, &a_console.text(), &value);
    assert_resumed_with(&b_outcome, &b_console.text(), &value);
}

#[test]
fn the_snapshotted_vm_goes_on() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let tmp = TempDir::new().unwrap();
    let (mut vm, console, value) = ready_vm(&kvm);
    persist::snapshot(&kvm, &mut vm, &tmp.as_path().join("snap")).unwrap();
    let outcome = vm.run(BOOT_TIMEOUT).unwrap().outcome;
    assert!(outcome.is_success(), "{outcome}\n{}", console.text());
    let text = console.text();
    assert_eq!(
        value_after(&text, cmdline::SNAPSHOT_TEST_RESUMED),
        Some(format!("{value} {value}").as_str())
    );
}

#[test]
fn a_guest_that_never_gets_ready_ends_normally() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let mut vm = build(
        &kvm,
        &VmConfig::new(guest_image()),
        Box::new(std::io::sink()),
    )
    .unwrap();
    match vm.run_until_ready(BOOT_TIMEOUT).unwrap() {
        UntilReady::Ended(outcome) => assert!(outcome.is_success(), "{outcome}"),
        UntilReady::Ready => panic!("the plain guest does not signal READY"),
    }
}

#[test]
fn a_guest_that_signals_ready_unasked_goes_on() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let console = SharedBuffer::new();
    let config = VmConfig {
        cmdline: snapshot_test_cmdline(),
        ..VmConfig::new(guest_image())
    };
    let mut vm = build(&kvm, &config, Box::new(console.clone())).unwrap();
    let outcome = vm.run(BOOT_TIMEOUT).unwrap().outcome;
    assert!(outcome.is_success(), "{outcome}\n{}", console.text());
    assert_eq!(vm.control().ready_count(), 1);
}

#[test]
fn restored_memory_is_private() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let tmp = TempDir::new().unwrap();
    let dir = tmp.as_path().join("snap");
    take_snapshot(&kvm, &dir);
    let snap = SnapshotDir::new(&dir);
    let state: MicroVmState = state_file::read(&snap.state_path(), FORMAT).unwrap();
    let before = fs::read(snap.memory_path()).unwrap();

    let (outcome, console, vm) = restore_and_run(&kvm, &dir);
    assert!(outcome.is_success(), "{outcome}\n{console}");
    // The VMM writes to the restored memory too: a page with data and a hole.
    let addr = GuestAddress(abi::layout::KERNEL_START);
    vm.memory().write_obj(0xdead_beef_u64, addr).unwrap();
    vm.memory()
        .write_obj(0x5a5a_u64, GuestAddress(32 << 20))
        .unwrap();
    assert_eq!(vm.memory().read_obj::<u64>(addr).unwrap(), 0xdead_beef);
    drop(vm);
    // Nothing the guest or the VMM wrote reached the file.
    assert!(fs::read(snap.memory_path()).unwrap() == before);
    memory_file::verify(&snap.memory_path(), &state.memory).unwrap();
}

/// A copy of snapshot `src` at `dst`; the memory file is hard-linked unless `copy_memory`.
fn copy_snapshot(src: &Path, dst: &Path, copy_memory: bool) -> SnapshotDir {
    let (from, to) = (SnapshotDir::new(src), SnapshotDir::new(dst));
    to.create().unwrap();
    fs::copy(from.state_path(), to.state_path()).unwrap();
    if copy_memory {
        fs::copy(from.memory_path(), to.memory_path()).unwrap();
    } else {
        fs::hard_link(from.memory_path(), to.memory_path()).unwrap();
    }
    to
}

fn restore_err(kvm: &KvmContext, dir: &Path) -> RestoreError {
    match restore(kvm, dir, Box::new(std::io::sink())) {
        Ok(_) => panic!("restoring {} should fail", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn bad_snapshots_are_refused_by_name() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let tmp = TempDir::new().unwrap();
    let good = tmp.as_path().join("good");
    let (value, _) = take_snapshot(&kvm, &good);
    let case = |name: &str, copy_memory: bool| -> (PathBuf, SnapshotDir) {
        let dir = tmp.as_path().join(name);
        let snap = copy_snapshot(&good, &dir, copy_memory);
        (dir, snap)
    };

    // The directory is not there at all.
    let err = restore_err(&kvm, &tmp.as_path().join("nothing"));
    assert!(
        matches!(err, RestoreError::State(StateFileError::Missing { .. })),
        "{err:?}"
    );

    // No state file.
    let (dir, snap) = case("no-state", false);
    fs::remove_file(snap.state_path()).unwrap();
    let err = restore_err(&kvm, &dir);
    assert!(
        matches!(err, RestoreError::State(StateFileError::Missing { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(&snap.state_path().display().to_string()),
        "{err}"
    );

    // No memory file.
    let (dir, snap) = case("no-memory", false);
    fs::remove_file(snap.memory_path()).unwrap();
    let err = restore_err(&kvm, &dir);
    assert!(
        matches!(err, RestoreError::Memory(MemoryFileError::Missing { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(&snap.memory_path().display().to_string()),
        "{err}"
    );

    // A truncated state file.
    let (dir, snap) = case("truncated", false);
    let bytes = fs::read(snap.state_path()).unwrap();
    fs::write(snap.state_path(), &bytes[..bytes.len() / 2]).unwrap();
    let err = restore_err(&kvm, &dir);
    assert!(
        matches!(err, RestoreError::State(StateFileError::Length { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("truncated"), "{err}");

    // One flipped bit in the state file.
    let (dir, snap) = case("bitflip", false);
    let mut bytes = fs::read(snap.state_path()).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    fs::write(snap.state_path(), &bytes).unwrap();
    let err = restore_err(&kvm, &dir);
    assert!(
        matches!(err, RestoreError::State(StateFileError::Checksum { .. })),
        "{err:?}"
    );
    assert!(err.to_string().contains("corrupt"), "{err}");

    // A memory file of the wrong size.
    let (dir, snap) = case("short-memory", true);
    let f = memory_file::open_rw(&snap.memory_path()).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - PAGE_SIZE).unwrap();
    let err = restore_err(&kvm, &dir);
    assert!(
        matches!(err, RestoreError::Memory(MemoryFileError::WrongSize { .. })),
        "{err:?}"
    );

    // One flipped bit in a data page of the memory file: refused at load, before any guest
    // runs on it.
    let (dir, snap) = case("memory-bitflip", true);
    let f = memory_file::open_rw(&snap.memory_path()).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    let data_at = (0..f.metadata().unwrap().len())
        .step_by(chunk.len())
        .find_map(|off| {
            let n = f.read_at(&mut chunk, off).unwrap();
            chunk[..n]
                .iter()
                .position(|&b| b != 0)
                .map(|i| off + i as u64)
        })
        .expect("the memory file holds data");
    let mut byte = [0u8];
    f.read_exact_at(&mut byte, data_at).unwrap();
    f.write_all_at(&[byte[0] ^ 0x10], data_at).unwrap();
    let err = restore_err(&kvm, &dir);
    assert!(
        matches!(err, RestoreError::Memory(MemoryFileError::Checksum { .. })),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(&snap.memory_path().display().to_string()),
        "{err}"
    );

    // Another format version.
    let (dir, snap) = case("version", false);
    let state: MicroVmState = state_file::read(&snap.state_path(), FORMAT).unwrap();
    let next = FormatVersion {
        major: FORMAT.major + 1,
        minor: 0,
    };
    state_file::write(&snap.state_path(), next, &state).unwrap();
    let err = restore_err(&kvm, &dir);
    assert_eq!(
        err.to_string(),
        format!(
            "snapshot {} was written by format {}, this fnode reads format {}: \
             re-run 'fnode snapshot'",
            snap.state_path().display(),
            FORMAT.major + 1,
            FORMAT.major
        )
    );

    // A CPU feature this host lacks: avx512f on a host without it, or else a feature bit
    // no CPU has (CPUID.7.0:EBX bit 22 is reserved).
    let (dir, snap) = case("cpu", false);
    let mut state: MicroVmState = state_file::read(&snap.state_path(), FORMAT).unwrap();
    let host_has_avx512f = cpu::host_features(kvm.supported_cpuid())
        .iter()
        .any(|e| e.function == 7 && e.index == 0 && e.ebx & (1 << 16) != 0);
    let bit = if host_has_avx512f { 22 } else { 16 };
    for e in state.vcpus[0].cpuid.iter_mut() {
        if e.function == 7 && e.index == 0 {
            e.ebx |= 1 << bit;
        }
    }
    state_file::write(&snap.state_path(), FORMAT, &state).unwrap();
    let err = restore_err(&kvm, &dir);
    match &err {
        RestoreError::Cpu(CpuCompatError::MissingFeatures { missing, .. }) => {
            let expected = if bit == 16 {
                "avx512f"
            } else {
                "cpuid.0x7.0.ebx[22]"
            };
            assert_eq!(missing, &[expected.to_string()], "{err}");
        }
        other => panic!("expected a CPU feature error, got {other:?}"),
    }
    assert!(
        err.to_string().starts_with(&format!(
            "snapshot {} was taken on a CPU with",
            dir.display()
        )),
        "{err}"
    );

    // After all that, the good snapshot still restores.
    let (outcome, console, _vm) = restore_and_run(&kvm, &good);
    assert_resumed_with(&outcome, &console, &value);
}
