//! `fnode build` end to end: builds `functions/echo` into an image and checks that the image
//! is a PVH ELF holding the function's segments and header.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use fnode_guest::abi::user::{UserHeader, HEADER_LEN, IMAGE_START, USER_START};

const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn fnode() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fnode"));
    // A target dir of the test's own: the outer cargo may hold the workspace's lock.
    cmd.env(
        "CARGO_TARGET_DIR",
        Path::new(env!("CARGO_TARGET_TMPDIR")).join("fnode-build"),
    );
    cmd
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

/// (type, offset, vaddr, filesz, memsz) of every program header.
fn segments(elf: &[u8]) -> Vec<(u32, usize, u64, usize, u64)> {
    let phoff = u64_at(elf, 32) as usize;
    let phnum = u16_at(elf, 56) as usize;
    (0..phnum)
        .map(|i| {
            let p = phoff + i * 56;
            (
                u32_at(elf, p),
                u64_at(elf, p + 8) as usize,
                u64_at(elf, p + 16),
                u64_at(elf, p + 32) as usize,
                u64_at(elf, p + 40),
            )
        })
        .collect()
}

#[test]
fn builds_echo_into_a_pvh_image() {
    let out_dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("build-test");
    std::fs::create_dir_all(&out_dir).unwrap();
    let image_path = out_dir.join("echo.elf");
    let _ = std::fs::remove_file(&image_path);
    let out = fnode()
        .arg("build")
        .arg(repo().join("functions/echo"))
        .arg("-o")
        .arg(&image_path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fnode build failed: {stderr}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap();
    assert_eq!(Path::new(last), image_path.canonicalize().unwrap());

    let elf = std::fs::read(&image_path).unwrap();
    assert_eq!(&elf[..4], b"\x7fELF");
    assert_eq!(u16_at(&elf, 18), 62, "x86-64");
    let segs = segments(&elf);

    // The kernel's PVH note survives the merge.
    let note = segs
        .iter()
        .find(|s| s.0 == PT_NOTE)
        .expect("a PT_NOTE segment");
    let notes = &elf[note.1..note.1 + note.3];
    let mut off = 0;
    let mut pvh = None;
    while off + 12 <= notes.len() {
        let (namesz, descsz) = (u32_at(notes, off) as usize, u32_at(notes, off + 4) as usize);
        let desc = off + 12 + namesz.next_multiple_of(4);
        if u32_at(notes, off + 8) == XEN_ELFNOTE_PHYS32_ENTRY {
            pvh = Some(u32_at(notes, desc));
        }
        off = desc + descsz.next_multiple_of(4);
    }
    assert!(pvh.is_some(), "no PVH entry note");

    // Kernel loads lie below user memory; the function's at IMAGE_START and above, starting
    // with its header.
    let loads: Vec<_> = segs.iter().filter(|s| s.0 == PT_LOAD && s.4 > 0).collect();
    assert!(
        loads.iter().any(|s| s.2 + s.4 <= USER_START),
        "no kernel segment"
    );
    let user: Vec<_> = loads.iter().filter(|s| s.2 >= USER_START).collect();
    assert!(
        user.len() >= 2,
        "expected the function's segments, got {user:?}"
    );
    assert!(user.iter().all(|s| s.2 >= IMAGE_START));
    let first = user
        .iter()
        .find(|s| s.2 == IMAGE_START)
        .expect("a segment at IMAGE_START");
    let header = UserHeader::decode(elf[first.1..first.1 + HEADER_LEN].try_into().unwrap())
        .expect("a function header at IMAGE_START");
    assert!(user.iter().all(|s| s.2 + s.4 <= header.image_end));
    assert!(
        stderr.contains("needs at least"),
        "no layout report: {stderr}"
    );
}

#[test]
fn rejects_folders_that_are_not_function_crates() {
    let out = fnode()
        .arg("build")
        .arg(repo().join("scripts"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a Rust crate"), "{stderr}");

    let out = fnode()
        .arg("build")
        .arg(repo().join("functions"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is a workspace, not a crate"), "{stderr}");
}
