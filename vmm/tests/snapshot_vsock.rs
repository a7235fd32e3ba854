//! Snapshots of a VM with a virtio-vsock device and an open invocation connection: the real
//! guest kernel in echo mode (`fnode.echo=1`) signals READY once the host's connection is
//! open; the snapshot holds that connection, a restored VM answers on its fresh socket
//! without a handshake with the guest, and an in-place reset puts the VM back so that the
//! same host connection serves the next request.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{guest_image, BOOT_TIMEOUT};
use fnode_guest::abi::{cmdline, frame, vsock};
use fnode_vmm::builder::{build, VmConfig};
use fnode_vmm::kvm::test_support::require_kvm;
use fnode_vmm::microvm::UntilReady;
use fnode_vmm::{persist, restore_with, KvmContext, ResetMode, RestoreOptions};

fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("snapshot-vsock-{}-{name}", std::process::id()))
}

/// `CONNECT <port>` and the `OK` line; `None` if the device closed the connection.
fn try_connect(path: &Path) -> Option<UnixStream> {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
    s.write_all(format!("CONNECT {}\n", vsock::INVOKE_PORT).as_bytes())
        .unwrap();
    let mut line = Vec::new();
    // Byte by byte: nothing past the line may be consumed.
    BufReader::with_capacity(1, &mut s)
        .read_until(b'\n', &mut line)
        .unwrap();
    if line.is_empty() {
        return None;
    }
    assert!(
        line.starts_with(b"OK "),
        "the device answered {:?}",
        String::from_utf8_lossy(&line)
    );
    Some(s)
}

fn call(s: &mut UnixStream, id: u64, payload: &[u8]) -> Vec<u8> {
    let hdr = frame::Header {
        kind: frame::KIND_REQUEST,
        id,
        len: payload.len() as u32,
    };
    s.write_all(&hdr.encode()).unwrap();
    s.write_all(payload).unwrap();
    let mut raw = [0u8; frame::HEADER_LEN];
    s.read_exact(&mut raw).unwrap();
    let hdr = frame::Header::decode(&raw).unwrap();
    assert_eq!((hdr.kind, hdr.id), (frame::KIND_RESPONSE, id));
    let mut body = vec![0u8; hdr.len as usize];
    s.read_exact(&mut body).unwrap();
    body
}

/// Boots the echo kernel, connects while it boots, stops at READY and snapshots it.
fn snapshot_echo_guest(kvm: &KvmContext, dir: &Path) {
    let sock = tmp("boot.sock");
    let config = VmConfig {
        cmdline: format!("{}=1", cmdline::ECHO_KEY),
        vsock_uds: Some(sock.clone()),
        ..VmConfig::new(guest_image())
    };
    let mut vm = build(kvm, &config, Box::new(std::io::sink())).unwrap();
    let connector = std::thread::spawn(move || {
        // The guest's driver resets the device when it starts: retry until it accepts.
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(s) = try_connect(&sock) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the echo guest never accepted a connection"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    });
    match vm.run_until_ready(BOOT_TIMEOUT).unwrap() {
        UntilReady::Ready => {}
        UntilReady::Ended(o) => panic!("the echo guest ended before READY: {o}"),
    }
    let client = connector.join().unwrap();
    persist::snapshot(kvm, &mut vm, dir).unwrap();
    drop(vm);
    drop(client);
}

#[test]
fn restored_vm_answers_on_the_parked_connection_and_resets_in_place() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let dir = tmp("snap");
    snapshot_echo_guest(&kvm, &dir);

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
