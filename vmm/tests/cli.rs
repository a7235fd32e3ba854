//! The `fnode-vmm` binary: exit codes and the one-line messages.

mod common;

use std::path::Path;
use std::process::Output;

use common::{code, fnode_vmm, guest_image, mini_guest};
use fnode_guest::abi::{cmdline, BANNER_PREFIX};
use fnode_vmm::kvm::test_support::require_kvm;
use fnode_vmm::outcome::exit_code;

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn image() -> &'static str {
    guest_image().to_str().unwrap()
}

#[test]
fn success_streams_the_console_and_prints_a_summary() {
    if !require_kvm() {
        return;
    }
    let out = fnode_vmm(&["boot", image()]);
    let err = stderr(&out);
    assert_eq!(code(&out), exit_code::SUCCESS, "{err}");
    let console = String::from_utf8_lossy(&out.stdout);
    assert!(console.starts_with(BANNER_PREFIX), "{console}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("fnode-vmm: guest exited with success in ")
            && err.contains("VM build ")
            && err.contains("guest run "),
        "{err}"
    );
}

#[test]
fn guest_fault_is_one_line_with_mnemonic_vector_and_rip() {
    if !require_kvm() {
        return;
    }
    for (kind, prefix) in [
        (
            cmdline::FAULT_UD2,
            "error: guest fault: #UD (vector 6) at rip 0x",
        ),
        (
            cmdline::FAULT_PAGEFAULT,
            "error: guest fault: #PF (vector 14) at rip 0x",
        ),
    ] {
        let arg = format!("{}={kind}", cmdline::FAULT_KEY);
        let out = fnode_vmm(&["boot", image(), "--cmdline", &arg]);
        let err = stderr(&out);
        assert_eq!(code(&out), exit_code::GUEST_FAULT, "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with(prefix), "{err}");
    }
}

#[test]
fn page_fault_line_names_the_address() {
    if !require_kvm() {
        return;
    }
    let arg = format!("{}={}", cmdline::FAULT_KEY, cmdline::FAULT_PAGEFAULT);
    let out = fnode_vmm(&["boot", image(), "--cmdline", &arg]);
    let want = format!("cr2 {:#x}", cmdline::PAGEFAULT_ADDR);
    assert!(stderr(&out).contains(&want), "{}", stderr(&out));
}

#[test]
fn timeout_stops_the_guest() {
    if !require_kvm() {
        return;
    }
    let arg = format!("{}={}", cmdline::FAULT_KEY, cmdline::FAULT_LOOP);
    let out = fnode_vmm(&["boot", image(), "--cmdline", &arg, "--timeout-ms", "300"]);
    assert_eq!(code(&out), exit_code::TIMEOUT, "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "error: guest did not exit within 300 ms; stopped it\n"
    );
}

#[test]
fn guest_failure_status_has_its_own_code() {
    if !require_kvm() {
        return;
    }
    // The kernel rejects an unknown fault switch and exits with abi::exit::FAILURE.
    let arg = format!("{}=no-such-fault", cmdline::FAULT_KEY);
    let out = fnode_vmm(&["boot", image(), "--cmdline", &arg]);
    assert_eq!(code(&out), exit_code::GUEST_FAILURE, "{}", stderr(&out));
    assert!(
        stderr(&out).starts_with("error: guest exited with failure"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn triple_fault_is_a_vm_error() {
    if !require_kvm() {
        return;
    }
    let out = fnode_vmm(&["boot", mini_guest().to_str().unwrap(), "--cmdline", "t"]);
    assert_eq!(code(&out), exit_code::VM_ERROR, "{}", stderr(&out));
    assert_eq!(
        stderr(&out),
        "error: VM failed: guest triple fault (KVM_EXIT_SHUTDOWN)\n"
    );
}

#[test]
fn serial_out_writes_the_console_to_a_file() {
    if !require_kvm() {
        return;
    }
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join("cli-serial-out.txt");
    let out = fnode_vmm(&["boot", image(), "--serial-out", file.to_str().unwrap()]);
    assert_eq!(code(&out), exit_code::SUCCESS, "{}", stderr(&out));
    assert!(out.stdout.is_empty());
    let console = std::fs::read_to_string(&file).unwrap();
    assert!(console.starts_with(BANNER_PREFIX), "{console}");
}

#[test]
fn non_elf_image_is_named_with_the_fix() {
    if !require_kvm() {
        return;
    }
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");
    let out = fnode_vmm(&["boot", manifest]);
    assert_eq!(code(&out), exit_code::SETUP);
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains(&format!(
            "{manifest} is not an ELF file; fnode boots PVH ELF kernels"
        )),
        "{err}"
    );
}

#[test]
fn elf_without_pvh_note_is_named_with_the_fix() {
    if !require_kvm() {
        return;
    }
    let out = fnode_vmm(&["boot", "/bin/true"]);
    assert_eq!(code(&out), exit_code::SETUP);
    assert!(
        stderr(&out).contains(
            "/bin/true has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); \
             fnode boots PVH ELF kernels"
        ),
        "{}",
        stderr(&out)
    );
}

#[test]
fn missing_image_is_named() {
    if !require_kvm() {
        return;
    }
    let out = fnode_vmm(&["boot", "/nonexistent/fnode.elf"]);
    assert_eq!(code(&out), exit_code::SETUP);
    let err = stderr(&out);
    assert!(
        err.starts_with(
            "error: cannot load the kernel: cannot open kernel image /nonexistent/fnode.elf"
        ),
        "{err}"
    );
    assert!(err.contains("No such file or directory"), "{err}");
}

#[test]
fn memory_size_out_of_range_is_a_setup_error() {
    if !require_kvm() {
        return;
    }
    let out = fnode_vmm(&["boot", image(), "--mem", "4"]);
    assert_eq!(code(&out), exit_code::SETUP);
    assert!(
        stderr(&out).contains("guest memory of 4 MiB is outside"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn usage_errors_and_help() {
    let out = fnode_vmm(&["boot"]);
    assert_eq!(code(&out), exit_code::USAGE);
    let out = fnode_vmm(&["boot", "x", "--timeout-ms", "0"]);
    assert_eq!(code(&out), exit_code::USAGE);
    let out = fnode_vmm(&["boot", "--help"]);
    assert_eq!(code(&out), 0);
    let help = String::from_utf8_lossy(&out.stdout);
    for word in [
        "--mem",
        "--cmdline",
        "--timeout-ms",
        "--serial-out",
        "Exit codes:",
    ] {
        assert!(help.contains(word), "help lacks {word}:\n{help}");
    }
}
