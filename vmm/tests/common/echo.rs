//! Talking to the plain kernel's echo guest (`fnode.echo=1`) over hybrid vsock: the
//! handshake, frames, and a snapshot taken at its READY with the connection established.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fnode_guest::abi::{cmdline, frame, vsock};
use fnode_vmm::builder::{build, VmConfig};
use fnode_vmm::microvm::UntilReady;
use fnode_vmm::{persist, KvmContext};

use super::{guest_image, BOOT_TIMEOUT};

/// Connects to `path`, writes `CONNECT <invoke port>` and reads the answer line: the
/// stream after `OK`, `None` if the device closed the connection (nothing listens yet).
pub fn try_connect(path: &Path) -> Option<UnixStream> {
    let mut s = UnixStream::connect(path).ok()?;
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

/// [`try_connect`] until the guest accepts (a client that comes before the guest's driver
/// is up is closed: the driver resets the device when it starts).
pub fn connect(path: &Path) -> UnixStream {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if let Some(s) = try_connect(path) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "the echo guest never accepted a connection"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// One REQUEST frame's bytes.
pub fn request_frame(id: u64, payload: &[u8]) -> Vec<u8> {
    let hdr = frame::Header {
        kind: frame::KIND_REQUEST,
        id,
        len: payload.len() as u32,
    };
    let mut bytes = hdr.encode().to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

/// Writes one REQUEST frame.
pub fn send_request(s: &mut UnixStream, id: u64, payload: &[u8]) {
    s.write_all(&request_frame(id, payload)).unwrap();
}

/// Reads one frame.
pub fn read_frame(s: &mut UnixStream) -> (frame::Header, Vec<u8>) {
    let mut hdr = [0u8; frame::HEADER_LEN];
    s.read_exact(&mut hdr).unwrap();
    let hdr = frame::Header::decode(&hdr).unwrap();
    let mut payload = vec![0u8; hdr.len as usize];
    s.read_exact(&mut payload).unwrap();
    (hdr, payload)
}

/// Sends a request and reads its RESPONSE.
pub fn call(s: &mut UnixStream, id: u64, payload: &[u8]) -> Vec<u8> {
    send_request(s, id, payload);
    let (hdr, body) = read_frame(s);
    assert_eq!((hdr.kind, hdr.id), (frame::KIND_RESPONSE, id));
    body
}

/// Boots the echo kernel with its socket at `sock`, connects while it boots, stops at
/// READY and snapshots it into `dir`.
pub fn snapshot_echo_guest(kvm: &KvmContext, sock: PathBuf, dir: &Path) {
    let config = VmConfig {
        cmdline: format!("{}=1", cmdline::ECHO_KEY),
        vsock_uds: Some(sock.clone()),
        ..VmConfig::new(guest_image())
    };
    let mut vm = build(kvm, &config, Box::new(std::io::sink())).unwrap();
    let connector = std::thread::spawn(move || connect(&sock));
    match vm.run_until_ready(BOOT_TIMEOUT).unwrap() {
        UntilReady::Ready => {}
        UntilReady::Ended(o) => panic!("the echo guest ended before READY: {o}"),
    }
    let client = connector.join().unwrap();
    persist::snapshot(kvm, &mut vm, dir).unwrap();
    drop(vm);
    drop(client);
}
