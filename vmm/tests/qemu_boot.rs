//! The same guest image boots under QEMU's microvm machine (`scripts/qemu-boot.sh`): fnode
//! images stay standard PVH kernels, not images only fnode-vmm can start.

mod common;

use std::process::Command;

use common::{guest_image, repo_root};
use fnode_vmm::kvm::test_support::require_kvm;

#[test]
fn guest_boots_under_qemu_microvm() {
    if !require_kvm() {
        return;
    }
    let script = repo_root().join("scripts/qemu-boot.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(guest_image())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
