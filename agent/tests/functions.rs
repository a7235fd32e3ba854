//! The example functions end to end on KVM: `fnode build` makes each image, fnode-vmm boots
//! it, and the function answers requests — from the `invoke=` command line, and over the
//! vsock invocation channel (hybrid vsock, `abi::frame` frames). Hostile functions end their
//! VM with an error frame.

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use fnode_guest::abi::{self, frame};
use fnode_vmm::{
    builder::{build, VmConfig},
    devices::serial::SharedBuffer,
    kvm::test_support::require_kvm,
    KvmContext, Outcome,
};

/// Limit for guests expected to exit by themselves; hitting it is a failure.
const TIMEOUT: Duration = Duration::from_secs(20);

mod common;
use common::{function_image as image, tmp};

/// Boots `image` with `cmdline` until it exits; returns the outcome and the console.
fn boot(image: &Path, cmdline: &str) -> (Outcome, String) {
    let kvm = KvmContext::new().unwrap();
    let console = SharedBuffer::new();
    let config = VmConfig {
        cmdline: cmdline.to_owned(),
        ..VmConfig::new(image)
    };
    let mut vm = build(&kvm, &config, Box::new(console.clone())).unwrap();
    let report = vm.run(TIMEOUT).unwrap();
    (
        report.outcome,
        String::from_utf8_lossy(&console.contents()).into_owned(),
    )
}

fn invoke_line(console: &str) -> &str {
    console
        .lines()
        .find(|l| l.contains(": invoke "))
        .unwrap_or_else(|| panic!("no invoke line in:\n{console}"))
}

#[test]
fn functions_answer_invoke_requests() {
    if !require_kvm() {
        return;
    }
    let (outcome, console) = boot(&image("echo"), "invoke=hello invoke_repeat=3");
    assert!(outcome.is_success(), "{outcome}\n{console}");
    assert!(
        invoke_line(&console).ends_with("invoke response 5 bytes: hello"),
        "{console}"
    );

    // `printf abc | sha256sum`
    let (outcome, console) = boot(&image("sha256"), "invoke=abc");
    assert!(outcome.is_success(), "{outcome}\n{console}");
    assert!(
        invoke_line(&console).ends_with(
            "response 64 bytes: ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        ),
        "{console}"
    );
}

#[test]
fn hostile_functions_end_their_vm_with_an_error() {
    if !require_kvm() {
        return;
    }
    let (outcome, console) = boot(&image("panic"), "invoke=x");
    assert!(
        matches!(outcome, Outcome::Exited { status } if status == abi::exit::FAILURE),
        "{outcome}"
    );
    let line = invoke_line(&console);
    assert!(line.contains("invoke error"), "{line}");
    assert!(
        line.contains("fnode test panic: the handler panicked on purpose"),
        "{line}"
    );

    for (request, address) in [("kernel", abi::layout::KERNEL_START), ("null", 0)] {
        let (outcome, console) = boot(&image("badmem"), &format!("invoke={request}"));
        match outcome {
            Outcome::Faulted { report: Some(r) } => {
                assert_eq!((r.vector, r.cr2, r.cs & 3), (14, address, 3), "{console}")
            }
            other => panic!("expected a user page fault, got {other}\n{console}"),
        }
        let line = invoke_line(&console);
        assert!(line.contains("function fault: #PF"), "{line}");
        assert!(line.contains(&format!("address={address:#x}")), "{line}");
    }
}

/// A function that faults with the direction flag set gets an intact fault report: the
/// kernel clears the flag on entry (its copies, `rep movs`, assume it clear).
#[test]
fn a_fault_with_the_direction_flag_set_is_reported_intact() {
    if !require_kvm() {
        return;
    }
    let (outcome, console) = boot(&image("badmem"), "invoke=df-fault");
    match outcome {
        Outcome::Faulted { report: Some(r) } => {
            assert_eq!((r.vector, r.cs & 3), (6, 3), "{console}")
        }
        other => panic!("expected a user #UD, got {other}\n{console}"),
    }
    let line = invoke_line(&console);
    assert!(line.contains("function fault: #UD (vector 6)"), "{line}");

    // A `NEXT` call made by jumping to the system call entry (which faults in user mode, and
    // the kernel serves as the call) with the flag set: the response arrives intact.
    let image = image("badmem");
    let entry = symbol(&image, "fnode_syscall_entry");
    let (outcome, console) = boot(&image, &format!("invoke=df-next:{entry:x}"));
    assert!(outcome.is_success(), "{outcome}\n{console}");
    let line = invoke_line(&console);
    assert!(
        line.contains("the kernel copied this response intact"),
        "{line}"
    );
}

/// A system call whose return address is not canonical (made by jumping to the entry with a
/// chosen `rcx`) is the function's fault: a user-mode #GP at that address, reported with an
/// error frame, not an `iretq` that faults inside the kernel.
#[test]
fn a_non_canonical_return_address_is_the_functions_fault() {
    if !require_kvm() {
        return;
    }
    let image = image("badmem");
    let entry = symbol(&image, "fnode_syscall_entry");
    // A kernel that took the call would send DF_ANSWER and end the VM with success.
    let (outcome, console) = boot(&image, &format!("invoke=bad-return:{entry:x}"));
    let bad = 0x8000_0000_0000_0000u64;
    match outcome {
        Outcome::Faulted { report: Some(r) } => {
            assert_eq!((r.vector, r.rip, r.cs & 3), (13, bad, 3), "{console}")
        }
        other => panic!("expected a user #GP, got {other}\n{console}"),
    }
    let line = invoke_line(&console);
    assert!(
        line.contains(&format!("function fault: #GP (vector 13) at rip={bad:#x}")),
        "{line}"
    );
}

/// The value of symbol `name` in the ELF file `image` (its `.symtab`).
fn symbol(image: &Path, name: &str) -> u64 {
    let b = std::fs::read(image).unwrap();
    let u16_at = |o: usize| usize::from(u16::from_le_bytes(b[o..o + 2].try_into().unwrap()));
    let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    // Elf64_Ehdr: e_shoff, e_shentsize, e_shnum; Elf64_Shdr: sh_type, sh_offset, sh_size,
    // sh_link, sh_entsize; Elf64_Sym: st_name, st_value.
    let (shoff, shentsize, shnum) = (u64_at(0x28) as usize, u16_at(0x3a), u16_at(0x3c));
    let section = |i: usize| shoff + i * shentsize;
    for s in (0..shnum).map(section).filter(|&s| u32_at(s + 4) == 2) {
        let (off, size, entsize) = (u64_at(s + 0x18), u64_at(s + 0x20), u64_at(s + 0x38));
        let strtab = u64_at(section(u32_at(s + 0x28)) + 0x18) as usize;
        for sym in (off..off + size)
            .step_by(entsize as usize)
            .map(|o| o as usize)
        {
            let start = strtab + u32_at(sym);
            let end = start + b[start..].iter().position(|&c| c == 0).unwrap();
            if &b[start..end] == name.as_bytes() {
                return u64_at(sym + 8);
            }
        }
    }
    panic!("no symbol {name} in {}", image.display());
}

/// A hybrid-vsock client of the invocation port.
struct Client(UnixStream);

impl Client {
    /// Connects to the invocation port; retries while the guest is not listening yet (or
    /// still closing the previous connection, which it serves one at a time).
    fn connect(path: &Path) -> Self {
        let start = Instant::now();
        loop {
            let answer = UnixStream::connect(path).and_then(|mut stream| {
                stream.set_read_timeout(Some(TIMEOUT))?;
                writeln!(stream, "CONNECT {}", abi::vsock::INVOKE_PORT)?;
                let mut line = String::new();
                BufReader::new(stream.try_clone()?).read_line(&mut line)?;
                Ok((stream, line))
            });
            match answer {
                Ok((stream, line)) if line.starts_with("OK ") => return Client(stream),
                other if start.elapsed() > TIMEOUT => {
                    panic!("cannot connect to {path:?}: {other:?}")
                }
                _ => thread::sleep(Duration::from_millis(5)),
            }
        }
    }

    fn invoke(&mut self, id: u64, payload: &[u8]) -> (u16, Vec<u8>) {
        let h = frame::Header {
            kind: frame::KIND_REQUEST,
            id,
            len: payload.len() as u32,
        };
        self.0.write_all(&h.encode()).unwrap();
        self.0.write_all(payload).unwrap();
        let mut hdr = [0u8; frame::HEADER_LEN];
        self.0.read_exact(&mut hdr).unwrap();
        let h = frame::Header::decode(&hdr).unwrap();
        assert_eq!(h.id, id);
        let mut body = vec![0u8; h.len as usize];
        self.0.read_exact(&mut body).unwrap();
        (h.kind, body)
    }
}

#[test]
fn functions_serve_the_vsock_channel() {
    if !require_kvm() {
        return;
    }
    let kvm = KvmContext::new().unwrap();
    let sock = tmp().join(format!("functions-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&sock);
    let config = VmConfig {
        vsock_uds: Some(sock.clone()),
        ..VmConfig::new(image("echo"))
    };
    let mut vm = build(&kvm, &config, Box::new(std::io::sink())).unwrap();
    vm.resume().unwrap();

    let mut client = Client::connect(&sock);
    assert_eq!(
        client.invoke(1, b"hello"),
        (frame::KIND_RESPONSE, b"hello".to_vec())
    );
    assert_eq!(client.invoke(2, b""), (frame::KIND_RESPONSE, Vec::new()));
    // Large payloads go straight into and out of the function's memory.
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (kind, body) = client.invoke(3, &big);
    assert_eq!(kind, frame::KIND_RESPONSE);
    assert!(body == big, "the 1 MB echo differs");
    drop(client);
    // A new connection is served by the same VM.
    let mut client = Client::connect(&sock);
    assert_eq!(
        client.invoke(4, b"again"),
        (frame::KIND_RESPONSE, b"again".to_vec())
    );
    drop(client);
    drop(vm);

    // A panic answers the request in flight with an error frame, then ends the VM.
    let config = VmConfig {
        vsock_uds: Some(sock.clone()),
        ..VmConfig::new(image("panic"))
    };
    let mut vm = build(&kvm, &config, Box::new(std::io::sink())).unwrap();
    vm.resume().unwrap();
    let mut client = Client::connect(&sock);
    let (kind, body) = client.invoke(7, b"x");
    assert_eq!(kind, frame::KIND_ERROR);
    let message = String::from_utf8(body).unwrap();
    assert!(
        message.contains("fnode test panic: the handler panicked on purpose"),
        "{message}"
    );
    let outcome = vm.wait(TIMEOUT).unwrap();
    assert!(
        matches!(outcome, Outcome::Exited { status } if status == abi::exit::FAILURE),
        "{outcome}"
    );
}
