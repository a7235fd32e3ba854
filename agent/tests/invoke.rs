//! `fnode invoke` end to end on KVM: `fnode build` makes each example function's image once,
//! `fnode invoke` boots it, sends one request over the vsock channel and prints the response.
//! Hostile functions and a hostile guest kernel end their VM with a named error; the host and
//! the other VMs go on.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use fnode_guest::abi::{self, cmdline, frame};
use fnode_vmm::{
    builder::{build, VmConfig},
    kvm::test_support::require_kvm,
    outcome::exit_code,
    KvmContext, Outcome,
};
use sha2::{Digest, Sha256};

/// Limit for invocations expected to answer; hitting it is a failure, not a measurement.
const TIMEOUT_MS: &str = "30000";

mod common;
use common::{function_image as image, tmp};

/// Runs `fnode invoke <image of name> <args>` with `stdin` as its standard input.
fn invoke_with_stdin(name: &str, args: &[&str], stdin: &[u8]) -> Output {
    let image = image(name);
    let mut child = Command::new(env!("CARGO_BIN_EXE_fnode"))
        .arg("invoke")
        .arg(&image)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let stdin = stdin.to_vec();
    let feeder = thread::spawn(move || {
        // The child may exit without reading (a bad option): a broken pipe is fine.
        let _ = input.write_all(&stdin);
    });
    let out = child.wait_with_output().unwrap();
    feeder.join().unwrap();
    out
}

fn invoke(name: &str, args: &[&str]) -> Output {
    invoke_with_stdin(name, args, b"")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The response of an invocation that must succeed.
fn answer(name: &str, args: &[&str]) -> Vec<u8> {
    let mut all = vec!["--timeout-ms", TIMEOUT_MS];
    all.extend_from_slice(args);
    let out = invoke(name, &all);
    assert_eq!(
        out.status.code(),
        Some(0),
        "fnode invoke {name} {args:?} failed:\n{}",
        stderr(&out)
    );
    out.stdout
}

/// A payload file under the test's temporary folder.
fn payload_file(name: &str, bytes: &[u8]) -> String {
    let dir = tmp().join("invoke-payloads");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    format!("@{}", path.display())
}

#[test]
fn echo_is_byte_exact() {
    if !require_kvm() {
        return;
    }
    assert_eq!(
        answer("echo", &["--payload", "hello fnode"]),
        b"hello fnode"
    );
    // No payload, and an empty stdin: an empty request and an empty response.
    assert_eq!(answer("echo", &[]), b"");
    assert_eq!(answer("echo", &["--payload", "-"]), b"");
    // Every byte value, from a file and from stdin.
    let binary: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    let arg = payload_file("binary.bin", &binary);
    assert_eq!(answer("echo", &["--payload", &arg]), binary);
    let out = invoke_with_stdin(
        "echo",
        &["--timeout-ms", TIMEOUT_MS, "--payload", "-"],
        &binary,
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(out.stdout, binary);
}

#[test]
fn sha256_of_a_mebibyte_matches_the_host() {
    if !require_kvm() {
        return;
    }
    // Not a repeating pattern: a 64-bit LCG.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let data: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x >> 56) as u8
        })
        .collect();
    let arg = payload_file("mebibyte.bin", &data);
    let expected: String = Sha256::digest(&data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let got = answer("sha256", &["--payload", &arg]);
    assert_eq!(String::from_utf8(got).unwrap(), expected);
}

#[test]
fn wordcount_answers_json() {
    if !require_kvm() {
        return;
    }
    let got = answer(
        "wordcount",
        &["--payload", r#"{"text": "The cat and the hat; the END"}"#],
    );
    assert_eq!(
        String::from_utf8(got).unwrap(),
        r#"{"words":7,"unique":5,"frequencies":{"and":1,"cat":1,"end":1,"hat":1,"the":3}}"#
    );
}

#[test]
fn primes_look_up_their_table() {
    if !require_kvm() {
        return;
    }
    assert_eq!(
        answer("primes", &["--payload", "97"]),
        br#"{"n":97,"prime":true,"pi":25}"#
    );
    // pi(10^6) = 78498.
    assert_eq!(
        answer("primes", &["--payload", "1000000"]),
        br#"{"n":1000000,"prime":false,"pi":78498}"#
    );
}

#[test]
fn random_gives_32_fresh_bytes() {
    if !require_kvm() {
        return;
    }
    let decode = |hex: Vec<u8>| -> Vec<u8> {
        assert_eq!(hex.len(), 64, "{:?}", String::from_utf8_lossy(&hex));
        hex.chunks(2)
            .map(|d| u8::from_str_radix(std::str::from_utf8(d).unwrap(), 16).unwrap())
            .collect()
    };
    let a = decode(answer("random", &[]));
    let b = decode(answer("random", &[]));
    assert_eq!(a.len(), 32);
    assert!(a.iter().filter(|&&x| x != 0).count() > 16, "{a:?}");
    assert_ne!(a, b, "two VMs drew the same random bytes");
}

#[test]
fn timings_name_the_phases_and_counts() {
    if !require_kvm() {
        return;
    }
    let out = invoke(
        "echo",
        &["--timeout-ms", TIMEOUT_MS, "--payload", "x", "--timings"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(
        out.stdout, b"x",
        "timings go to stderr, not into the response"
    );
    let err = stderr(&out);
    for phase in ["build ", "boot ", "init ", "invoke ", "exits", "pages"] {
        assert!(err.contains(phase), "no {phase:?} in:\n{err}");
    }
    // Boot ends at the guest's BOOTED, init at its READY: two phases.
    assert!(!err.contains("boot + init "), "{err}");
    // One line of phases, one of counts.
    for line in ["fnode: timings: ", "fnode: counts: "] {
        let n = err.lines().filter(|l| l.starts_with(line)).count();
        assert_eq!(n, 1, "{line:?} in:\n{err}");
    }
}

#[test]
fn an_oversized_payload_is_refused_before_booting() {
    // No KVM needed: nothing boots.
    let arg = payload_file("oversized.bin", &vec![0u8; frame::MAX_PAYLOAD + 1]);
    let out = Command::new(env!("CARGO_BIN_EXE_fnode"))
        .args(["invoke", "/nonexistent/image.elf", "--payload", &arg])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(i32::from(exit_code::USAGE)),
        "{err}"
    );
    assert!(
        err.contains(&format!("{} bytes", frame::MAX_PAYLOAD + 1)) && err.contains("limit"),
        "{err}"
    );
    // The image was never opened: the payload is checked first.
    assert!(!err.contains("nonexistent"), "{err}");
    assert!(out.stdout.is_empty());
}

#[test]
fn a_panic_answers_with_its_message() {
    if !require_kvm() {
        return;
    }
    let out = invoke("panic", &["--timeout-ms", TIMEOUT_MS, "--payload", "x"]);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(i32::from(exit_code::GUEST_FAILURE)),
        "{err}"
    );
    assert!(
        err.contains("the function failed: function panicked at ")
            && err.contains("fnode test panic: the handler panicked on purpose"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn a_spinning_function_is_stopped_at_the_timeout() {
    if !require_kvm() {
        return;
    }
    let out = invoke("spin", &["--timeout-ms", "1000", "--payload", "x"]);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(i32::from(exit_code::TIMEOUT)),
        "{err}"
    );
    assert!(
        err.contains("function did not answer within 1000 ms; stopped it"),
        "{err}"
    );
}

#[test]
fn a_bad_memory_access_is_a_named_fault() {
    if !require_kvm() {
        return;
    }
    let out = invoke("badmem", &["--timeout-ms", TIMEOUT_MS, "--payload", "null"]);
    let err = stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(i32::from(exit_code::GUEST_FAULT)),
        "{err}"
    );
    // The function's error frame and the VMM's outcome both name the fault.
    assert!(
        err.contains("function fault: #PF (vector 14)") && err.contains("address=0x0"),
        "{err}"
    );
    assert!(err.contains("guest fault: #PF (vector 14)"), "{err}");
    assert!(err.contains("cpl 3"), "{err}");
}

#[test]
fn a_hostile_guest_breaks_only_its_own_vm() {
    if !require_kvm() {
        return;
    }
    let hostile_switch = format!("{}={}", cmdline::HOSTILE_KEY, cmdline::HOSTILE_VSOCK);
    let image = image("echo");
    let healthy_payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let healthy_arg = payload_file("healthy.bin", &healthy_payload);
    // Two fnode processes at once: the hostile one must not disturb the healthy one.
    let spawn = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fnode"))
            .arg("invoke")
            .arg(&image)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let hostile = spawn(&["--timeout-ms", TIMEOUT_MS, "--cmdline", &hostile_switch]);
    let healthy = spawn(&["--timeout-ms", TIMEOUT_MS, "--payload", &healthy_arg]);
    let hostile = hostile.wait_with_output().unwrap();
    let healthy = healthy.wait_with_output().unwrap();
    let err = stderr(&hostile);
    assert_eq!(
        hostile.status.code(),
        Some(i32::from(exit_code::GUEST_FAULT)),
        "{err}"
    );
    assert!(
        err.contains("guest broke a device; stopped the VM: virtio-vsock")
            && err.contains("descriptor chain at head 0 loops"),
        "{err}"
    );
    assert_eq!(healthy.status.code(), Some(0), "{}", stderr(&healthy));
    assert!(
        healthy.stdout == healthy_payload,
        "the healthy echo differs"
    );
}

/// A minimal hybrid-vsock client for the in-process test (the CLI's own client lives in the
/// `fnode` binary).
fn call(sock: &Path, id: u64, payload: &[u8]) -> Vec<u8> {
    let start = Instant::now();
    let mut stream = loop {
        let attempt = UnixStream::connect(sock).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            writeln!(s, "CONNECT {}", abi::vsock::INVOKE_PORT)?;
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while s.read(&mut b)? == 1 && b[0] != b'\n' {
                line.push(b[0]);
            }
            Ok((s, line))
        });
        match attempt {
            Ok((s, line)) if line.starts_with(b"OK ") => break s,
            other => {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "cannot connect to {sock:?}: {other:?}"
                );
                thread::sleep(Duration::from_millis(2));
            }
        }
    };
    let header = frame::Header {
        kind: frame::KIND_REQUEST,
        id,
        len: payload.len() as u32,
    };
    stream.write_all(&header.encode()).unwrap();
    stream.write_all(payload).unwrap();
    let mut raw = [0u8; frame::HEADER_LEN];
    stream.read_exact(&mut raw).unwrap();
    let reply = frame::Header::decode(&raw).unwrap();
    assert_eq!((reply.kind, reply.id), (frame::KIND_RESPONSE, id));
    let mut body = vec![0u8; reply.len as usize];
    stream.read_exact(&mut body).unwrap();
    body
}

#[test]
fn a_hostile_guest_stops_only_its_vm_in_a_shared_process() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let image = image("echo");
    let dir = tmp().join(format!("invoke-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let healthy_sock = dir.join("healthy.sock");
    let hostile_sock = dir.join("hostile.sock");
    let _ = std::fs::remove_file(&healthy_sock);
    let _ = std::fs::remove_file(&hostile_sock);

    let mut healthy = build(
        &kvm,
        &VmConfig {
            vsock_uds: Some(healthy_sock.clone()),
            ..VmConfig::new(&image)
        },
        Box::new(std::io::sink()),
    )
    .unwrap();
    healthy.resume().unwrap();
    assert_eq!(call(&healthy_sock, 1, b"before"), b"before");
    // Booting and serving took exits (the console, the device's registers).
    assert!(healthy.exit_count() > 0);

    let mut hostile = build(
        &kvm,
        &VmConfig {
            cmdline: format!("{}={}", cmdline::HOSTILE_KEY, cmdline::HOSTILE_VSOCK),
            vsock_uds: Some(hostile_sock),
            ..VmConfig::new(&image)
        },
        Box::new(std::io::sink()),
    )
    .unwrap();
    let report = hostile.run(Duration::from_secs(30)).unwrap();
    match &report.outcome {
        Outcome::DeviceFault(f) => assert!(
            f.to_string().contains("descriptor chain at head 0 loops"),
            "{f}"
        ),
        other => panic!("expected a device fault, got {other}"),
    }
    drop(hostile);

    // The healthy VM, in the same process, still serves.
    let big: Vec<u8> = (0..500_000u32).map(|i| (i % 253) as u8).collect();
    assert!(
        call(&healthy_sock, 2, &big) == big,
        "the healthy echo differs"
    );
    assert_eq!(healthy.poll().unwrap().map(|o| o.to_string()), None);
    drop(healthy);
    std::fs::remove_dir_all(&dir).unwrap();
}
