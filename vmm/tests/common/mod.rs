//! Helpers shared by the integration tests: guest images and a boot helper.
#![allow(dead_code)] // each test binary uses a different part

pub mod echo;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Duration;

use fnode_vmm::builder::{build, VmConfig};
use fnode_vmm::devices::serial::SharedBuffer;
use fnode_vmm::{KvmContext, Outcome};

/// Generous limit for guests that are expected to exit by themselves; hitting it is a
/// failure, never a measurement.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(20);

/// Short limit for guests that are expected to hang.
pub const HANG_TIMEOUT: Duration = Duration::from_millis(300);

/// The repository root.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("vmm/ lives in the repository root")
}

/// The real guest kernel, built once per test binary by `scripts/build-guest.sh` (whose last
/// line of stdout is the image path).
pub fn guest_image() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let script = repo_root().join("scripts/build-guest.sh");
        let out = Command::new("bash")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "{} failed ({}):\n{}",
            script.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let image = PathBuf::from(
            stdout
                .lines()
                .last()
                .unwrap_or_else(|| panic!("{} printed no image path", script.display()))
                .trim(),
        );
        assert!(
            image.is_file(),
            "build-guest.sh printed {}, which is no file",
            image.display()
        );
        image
    })
}

/// The minimal PVH test guest (`tests/guests/mini.S`), assembled once per test binary.
pub fn mini_guest() -> &'static Path {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/guests");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("mini-guest");
        std::fs::create_dir_all(&out).unwrap();
        let object = out.join("mini.o");
        let image = out.join("mini.elf");
        run(Command::new("as")
            .arg("--64")
            .arg("-o")
            .arg(&object)
            .arg(src.join("mini.S")));
        run(Command::new("ld")
            .args(["-m", "elf_x86_64", "-T"])
            .arg(src.join("mini.ld"))
            .arg("-o")
            .arg(&image)
            .arg(&object));
        image
    })
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (install binutils): {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// What a boot produced.
#[derive(Debug)]
pub struct Booted {
    pub outcome: Outcome,
    pub console: String,
}

/// Boots `image` with `cmdline` in a fresh VM (64 MiB, one vCPU) and runs it to its outcome.
pub fn boot(image: &Path, cmdline: &str, timeout: Duration) -> Booted {
    let kvm = KvmContext::new().unwrap();
    let console = SharedBuffer::new();
    let config = VmConfig {
        cmdline: cmdline.to_string(),
        ..VmConfig::new(image)
    };
    let mut vm = build(&kvm, &config, Box::new(console.clone())).unwrap();
    let report = vm.run(timeout).unwrap();
    drop(vm);
    Booted {
        outcome: report.outcome,
        console: console.text(),
    }
}

/// Runs the `fnode-vmm` binary with `args`.
pub fn fnode_vmm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fnode-vmm"))
        .args(args)
        .output()
        .expect("cannot run fnode-vmm")
}

/// The process exit code of `out` (a test failure if a signal killed it).
pub fn code(out: &Output) -> u8 {
    out.status.code().expect("fnode-vmm was killed by a signal") as u8
}
