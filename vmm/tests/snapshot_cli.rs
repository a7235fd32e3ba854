//! `fnode-vmm snapshot` and `fnode-vmm restore`: exit codes and messages.

mod common;

use std::fs;

use common::{code, fnode_vmm, guest_image};
use fnode_guest::abi::cmdline;
use fnode_vmm::kvm::test_support::require_kvm;
use fnode_vmm::outcome::exit_code;
use vmm_sys_util::tempdir::TempDir;

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn snapshot_then_restore() {
    if !require_kvm() {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let dir = tmp.as_path().join("s1");
    let dir_arg = dir.to_str().unwrap();
    let switch = format!("{}=1", cmdline::SNAPSHOT_TEST_KEY);
    let image = guest_image().to_str().unwrap();

    let out = fnode_vmm(&["snapshot", image, dir_arg, "--cmdline", &switch]);
    let err = text(&out.stderr);
    assert_eq!(code(&out), exit_code::SUCCESS, "{err}");
    assert!(
        err.starts_with(&format!("fnode-vmm: snapshot {dir_arg}: state ")),
        "{err}"
    );
    let console = text(&out.stdout);
    let value = console
        .lines()
        .find_map(|l| l.strip_prefix(cmdline::SNAPSHOT_TEST_READY))
        .unwrap_or_else(|| panic!("no READY line:\n{console}"))
        .to_string();
    // The snapshotted VM was stopped at READY: it printed nothing after it.
    assert!(
        !console.contains(cmdline::SNAPSHOT_TEST_RESUMED),
        "{console}"
    );

    let out = fnode_vmm(&["restore", dir_arg]);
    let err = text(&out.stderr);
    assert_eq!(code(&out), exit_code::SUCCESS, "{err}");
    assert_eq!(
        text(&out.stdout),
        format!("{}{value} {value}\n", cmdline::SNAPSHOT_TEST_RESUMED)
    );
    assert!(
        err.starts_with("fnode-vmm: guest exited with success (restore "),
        "{err}"
    );

    // A corrupt state file: refused before anything runs, naming the file.
    let state = dir.join("state");
    let mut bytes = fs::read(&state).unwrap();
    bytes[40] ^= 1;
    fs::write(&state, bytes).unwrap();
    let out = fnode_vmm(&["restore", dir_arg]);
    let err = text(&out.stderr);
    assert_eq!(code(&out), exit_code::SETUP, "{err}");
    assert!(
        err.starts_with(&format!(
            "error: snapshot state file {} is corrupt",
            state.display()
        )) && err.contains("re-run 'fnode snapshot'"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn an_image_that_never_gets_ready_cannot_be_snapshotted() {
    if !require_kvm() {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let dir = tmp.as_path().join("s1");
    let image = guest_image().to_str().unwrap();
    let out = fnode_vmm(&["snapshot", image, dir.to_str().unwrap()]);
    let err = text(&out.stderr);
    assert_eq!(code(&out), exit_code::GUEST_FAILURE, "{err}");
    assert!(
        err.starts_with("error: the guest never signalled READY"),
        "{err}"
    );
    assert!(!dir.join("state").exists());
}
