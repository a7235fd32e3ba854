//! Snapshots of a VM with a virtio-vsock device and an open invocation connection: the real
//! guest kernel in echo mode (`fnode.echo=1`) signals READY once the host's connection is
//! open; the snapshot holds that connection, a restored VM answers on its fresh socket
//! without a handshake with the guest, and an in-place reset puts the VM back so that the
//! same host connection serves the next request.

mod common;

use std::path::{Path, PathBuf};

use common::echo::{call, snapshot_echo_guest, try_connect};
use fnode_vmm::kvm::test_support::require_kvm;
use fnode_vmm::{restore_with, KvmContext, ResetMode, RestoreOptions};

fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("snapshot-vsock-{}-{name}", std::process::id()))
}

#[test]
fn restored_vm_answers_on_the_parked_connection_and_resets_in_place() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let dir = tmp("snap");
    snapshot_echo_guest(&kvm, tmp("boot.sock"), &dir);

    // Without a socket path, a snapshot with a vsock device is refused.
    let err = restore_with(
        &kvm,
        &dir,
        Box::new(std::io::sink()),
        &RestoreOptions::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("virtio"), "{err}");

    for mode in [ResetMode::CopyBack, ResetMode::DropPages] {
        let sock = tmp(&format!("restored-{mode:?}.sock"));
        // One VM restored paused and resumed, the other returned running.
        let options = RestoreOptions {
            vsock_uds: Some(sock.clone()),
            reset: Some(mode),
            resume: mode == ResetMode::DropPages,
            first_run_here: None,
        };
        let mut vm = restore_with(&kvm, &dir, Box::new(std::io::sink()), &options).unwrap();
        vm.resume().unwrap();
        // The parked connection: OK at once.
        let mut s = try_connect(&sock).expect("the restored device refused the parked connection");
        assert_eq!(call(&mut s, 1, b"first"), b"first");
        assert!(vm.restore_to_first_run().is_some());
        let run = vm.run_stats().unwrap();
        assert!(run.dirtied_pages > 0, "{run:?}");
        for i in 2..6u64 {
            let stats = vm.reset().unwrap();
            assert!(
                stats.dirtied_pages > 0 && stats.device_pages > 0,
                "{stats:?}"
            );
            // The same host connection goes on after the reset.
            let payload = vec![i as u8; 1000 * i as usize];
            assert_eq!(call(&mut s, i, &payload), payload);
            assert!(vm.reset_to_first_run().is_some());
        }
        assert!(
            vm.poll().unwrap().is_none(),
            "the restored guest keeps serving"
        );
    }
}
