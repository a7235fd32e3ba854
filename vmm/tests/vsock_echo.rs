//! The invocation channel end to end: the real guest kernel in echo mode (`fnode.echo=1`)
//! behind fnode-vmm's virtio-vsock device, driven through the hybrid vsock Unix socket the
//! way a host client drives it (`CONNECT <port>\n`, `OK <port>\n`, then frames).

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;

use common::echo::{connect, read_frame, send_request};
use common::guest_image;
use fnode_guest::abi::{cmdline, frame};
use fnode_vmm::builder::{build, VmConfig};
use fnode_vmm::kvm::test_support::require_kvm;
use fnode_vmm::KvmContext;

fn sock_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "fnode-vsock-echo-{}-{name}.sock",
        std::process::id()
    ))
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 11) as u8)
        .collect()
}

#[test]
fn echo_guest_answers_frames_of_every_size_and_refuses_oversized_ones() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let path = sock_path("sizes");
    let config = VmConfig {
        cmdline: format!("{}=1", cmdline::ECHO_KEY),
        vsock_uds: Some(path.clone()),
        ..VmConfig::new(guest_image())
    };
    let mut vm = build(&kvm, &config, Box::new(std::io::sink())).unwrap();
    vm.resume().unwrap();

    let mut s = connect(&path);
    for (id, len) in [
        (1u64, 1usize),
        (2, 64 * 1024),
        (3, 1 << 20),
        (4, frame::MAX_PAYLOAD),
    ] {
        let payload = pattern(len, id as u8);
        send_request(&mut s, id, &payload);
        let (hdr, echoed) = read_frame(&mut s);
        assert_eq!(
            (hdr.kind, hdr.id, hdr.len as usize),
            (frame::KIND_RESPONSE, id, len)
        );
        assert!(echoed == payload, "the {len}-byte echo differs");
    }

    // Small requests: the guest's exits per request, for the record (not asserted).
    let before = vm.exit_count();
    for id in 0..100u64 {
        send_request(&mut s, id, b"x");
        assert_eq!(read_frame(&mut s).1, b"x");
    }
    eprintln!(
        "userspace exits per 1-byte echo: {:.2}",
        (vm.exit_count() - before) as f64 / 100.0
    );

    // A header announcing more than a frame may carry: an ERROR frame, then the close.
    let hdr = frame::Header {
        kind: frame::KIND_REQUEST,
        id: 77,
        len: frame::MAX_PAYLOAD as u32 + 1,
    };
    s.write_all(&hdr.encode()).unwrap();
    let (err, msg) = read_frame(&mut s);
    assert_eq!((err.kind, err.id), (frame::KIND_ERROR, 77));
    let msg = String::from_utf8(msg).unwrap();
    assert!(msg.contains("exceeds the 6291456-byte limit"), "{msg}");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "nothing follows the ERROR frame");

    // The next connection is served.
    let mut s = connect(&path);
    send_request(&mut s, 8, b"again");
    let (hdr, echoed) = read_frame(&mut s);
    assert_eq!(
        (hdr.kind, hdr.id, echoed.as_slice()),
        (frame::KIND_RESPONSE, 8, &b"again"[..])
    );
    assert!(vm.poll().unwrap().is_none(), "the echo guest keeps serving");
}
