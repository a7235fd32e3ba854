//! PVH boot: load a PVH ELF kernel into guest memory and write the boot data it reads.
//!
//! The kernel's `PT_LOAD` segments go to their physical addresses (linux-loader's
//! [`Elf::load`]); its `XEN_ELFNOTE_PHYS32_ENTRY` note gives the 32-bit entry point. The boot
//! data follows `abi::layout`: `hvm_start_info` at `PVH_INFO_ADDR`, the memory map at
//! `PVH_MEMMAP_ADDR`, the NUL-terminated command line at `CMDLINE_ADDR`. The guest gets the
//! start info's address in `%ebx` (see [`crate::vstate::vcpu`]).

use std::fs::File;
use std::path::{Path, PathBuf};

use fnode_guest::abi::layout::{
    CMDLINE_ADDR, CMDLINE_MAX, KERNEL_START, PVH_INFO_ADDR, PVH_MEMMAP_ADDR, PVH_MEMMAP_MAX,
    REPORT_ADDR,
};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_start_info, XEN_HVM_START_MAGIC_VALUE,
};
use linux_loader::loader::elf::{Elf, Error as ElfError, PvhBootCapability};
use linux_loader::loader::{Error as KernelLoaderError, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError};

use crate::vstate::memory::GuestMemory;

/// `hvm_start_info.version` 1 is the first with the memory map fields.
const START_INFO_VERSION: u32 = 1;
/// E820 / PVH memory map type of usable RAM.
const E820_RAM: u32 = 1;
/// End of conventional low memory (640 KiB): the legacy VGA/BIOS hole starts here and the
/// memory map leaves `[LOW_RAM_END, KERNEL_START)` out, as a PC firmware would.
const LOW_RAM_END: u64 = 0xa_0000;

const START_INFO_LEN: u64 = std::mem::size_of::<hvm_start_info>() as u64;
const MEMMAP_ENTRY_LEN: u64 = std::mem::size_of::<hvm_memmap_table_entry>() as u64;

// The boot data must not overlap: start info, then the memory map, then the report page,
// then the command line, all below the kernel.
const _: () = assert!(PVH_INFO_ADDR + START_INFO_LEN <= PVH_MEMMAP_ADDR);
const _: () = assert!(PVH_MEMMAP_ADDR + PVH_MEMMAP_MAX as u64 * MEMMAP_ENTRY_LEN <= REPORT_ADDR);
const _: () = assert!(CMDLINE_ADDR + CMDLINE_MAX as u64 <= KERNEL_START);
const _: () = assert!(CMDLINE_ADDR + (CMDLINE_MAX as u64) <= LOW_RAM_END);

/// Errors loading a kernel or writing the boot data.
#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    /// The image cannot be opened.
    #[error(
        "cannot open kernel image {}: pass the path of a PVH ELF kernel \
         (scripts/build-guest.sh prints one)",
        path.display()
    )]
    Open {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file does not start with an ELF header.
    #[error("{} is not an ELF file; fnode boots PVH ELF kernels", path.display())]
    NotElf {
        /// The image path.
        path: PathBuf,
    },
    /// The ELF has no `XEN_ELFNOTE_PHYS32_ENTRY` note.
    #[error(
        "{} has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); fnode boots PVH ELF kernels",
        path.display()
    )]
    NoPvhEntry {
        /// The image path.
        path: PathBuf,
    },
    /// The ELF is malformed, not x86-64 little-endian, or its segments do not fit.
    #[error(
        "cannot load {} into {mem_mib} MiB of guest memory (a malformed or truncated ELF, \
         or segments outside guest memory)",
        path.display()
    )]
    Load {
        /// The image path.
        path: PathBuf,
        /// Guest memory size in MiB.
        mem_mib: u64,
        /// linux-loader's error.
        #[source]
        source: KernelLoaderError,
    },
    /// The ELF's segments end beyond guest memory.
    #[error(
        "{} does not fit in {mem_mib} MiB of guest memory: its segments end at {end:#x}, \
         so it needs at least {needed_mib} MiB (give the VM more memory: --mem {needed_mib} \
         or more)",
        path.display()
    )]
    TooBigForMemory {
        /// The image path.
        path: PathBuf,
        /// Guest memory size in MiB.
        mem_mib: u64,
        /// First byte past the highest loadable segment (physical address).
        end: u64,
        /// The smallest memory in MiB that holds every segment.
        needed_mib: u64,
    },
    /// The kernel ends beyond guest memory or starts below `KERNEL_START`.
    #[error(
        "{}: PVH entry {entry:#x} must lie in [{KERNEL_START:#x}, {kernel_end:#x}) \
         (the kernel is linked at abi::layout::KERNEL_START)",
        path.display()
    )]
    BadEntry {
        /// The image path.
        path: PathBuf,
        /// The PVH entry address.
        entry: u64,
        /// End of the loaded kernel.
        kernel_end: u64,
    },
    /// The command line (plus its NUL) is longer than `CMDLINE_MAX`.
    #[error(
        "kernel command line is {len} bytes; the limit is {} bytes (CMDLINE_MAX, \
         including the terminating NUL)",
        CMDLINE_MAX
    )]
    CmdlineTooLong {
        /// Length without the NUL.
        len: usize,
    },
    /// The command line contains a NUL byte, which would cut it short.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Guest memory is too small for the boot data.
    #[error("cannot write boot data at {addr:#x} (guest memory too small?)")]
    WriteBootData {
        /// Where the write went.
        addr: u64,
        /// vm-memory's error.
        #[source]
        source: GuestMemoryError,
    },
    /// Guest memory ends below the kernel.
    #[error("guest memory of {mem_size:#x} bytes ends below the kernel at {KERNEL_START:#x}")]
    MemoryTooSmall {
        /// Guest memory size.
        mem_size: u64,
    },
}

/// Where the loaded kernel starts running and what it occupies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadedKernel {
    /// The PVH 32-bit entry point.
    pub entry: GuestAddress,
    /// First byte past the highest loaded segment.
    pub kernel_end: u64,
}

/// Loads the PVH ELF `image` (opened from `path`, named in errors) into `mem`.
pub fn load_kernel(
    mem: &GuestMemory,
    image: &mut File,
    path: &Path,
) -> Result<LoadedKernel, LoaderError> {
    let mem_size = mem_size(mem);
    let result = Elf::load(mem, None, image, None).map_err(|source| match source {
        KernelLoaderError::Elf(ElfError::InvalidElfMagicNumber | ElfError::ReadElfHeader) => {
            LoaderError::NotElf {
                path: path.to_path_buf(),
            }
        }
        // A well-formed image that is only too big gets the size it needs.
        source => match segments_end(image) {
            Some(end) if end > mem_size => too_big(path, mem_size, end),
            _ => LoaderError::Load {
                path: path.to_path_buf(),
                mem_mib: mem_size >> 20,
                source,
            },
        },
    })?;
    // Segments the loader had nothing to copy into (bss) are not checked against memory.
    let kernel_end = result.kernel_end;
    if kernel_end > mem_size {
        return Err(too_big(path, mem_size, kernel_end));
    }
    let entry = match result.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => entry,
        PvhBootCapability::PvhEntryNotPresent | PvhBootCapability::PvhEntryIgnored => {
            return Err(LoaderError::NoPvhEntry {
                path: path.to_path_buf(),
            })
        }
    };
    if entry.0 < KERNEL_START || entry.0 >= kernel_end {
        return Err(LoaderError::BadEntry {
            path: path.to_path_buf(),
            entry: entry.0,
            kernel_end,
        });
    }
    Ok(LoadedKernel { entry, kernel_end })
}

/// Checks that `cmdline` fits at `CMDLINE_ADDR` with its NUL and has no NUL inside.
pub fn validate_cmdline(cmdline: &str) -> Result<(), LoaderError> {
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(LoaderError::CmdlineTooLong { len: cmdline.len() });
    }
    if cmdline.as_bytes().contains(&0) {
        return Err(LoaderError::CmdlineNul);
    }
    Ok(())
}

/// The PVH memory map for `mem_size` bytes of guest memory: conventional low memory and
/// everything from `KERNEL_START` up. Returns the entries and how many are used.
pub fn memory_map(mem_size: u64) -> ([hvm_memmap_table_entry; 2], u32) {
    let ram = |addr: u64, size: u64| hvm_memmap_table_entry {
        addr,
        size,
        type_: E820_RAM,
        reserved: 0,
    };
    let low = ram(0, LOW_RAM_END.min(mem_size));
    if mem_size <= KERNEL_START {
        return ([low, hvm_memmap_table_entry::default()], 1);
    }
    ([low, ram(KERNEL_START, mem_size - KERNEL_START)], 2)
}

/// The `hvm_start_info` fnode writes: command line and memory map at their abi addresses.
pub fn start_info(memmap_entries: u32) -> hvm_start_info {
    hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: 0,
        modlist_paddr: 0,
        cmdline_paddr: CMDLINE_ADDR,
        rsdp_paddr: 0,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries,
        reserved: 0,
    }
}

/// Writes the PVH boot data (start info, memory map, command line) into `mem`. The guest
/// must not assume the rest of low memory is zero.
pub fn write_boot_data(mem: &GuestMemory, cmdline: &str) -> Result<(), LoaderError> {
    validate_cmdline(cmdline)?;
    let mem_size = mem_size(mem);
    if mem_size <= KERNEL_START {
        return Err(LoaderError::MemoryTooSmall { mem_size });
    }
    let write_err = |addr: u64| move |source| LoaderError::WriteBootData { addr, source };

    let (entries, count) = memory_map(mem_size);
    for (i, entry) in entries.iter().take(count as usize).enumerate() {
        let addr = PVH_MEMMAP_ADDR + i as u64 * MEMMAP_ENTRY_LEN;
        mem.write_obj(*entry, GuestAddress(addr))
            .map_err(write_err(addr))?;
    }
    mem.write_obj(start_info(count), GuestAddress(PVH_INFO_ADDR))
        .map_err(write_err(PVH_INFO_ADDR))?;
    mem.write_slice(cmdline.as_bytes(), GuestAddress(CMDLINE_ADDR))
        .map_err(write_err(CMDLINE_ADDR))?;
    let nul = CMDLINE_ADDR + cmdline.len() as u64;
    mem.write_obj(0u8, GuestAddress(nul))
        .map_err(write_err(nul))?;
    Ok(())
}

/// Opens a kernel image, naming the file and the fix if it cannot be opened.
pub fn open_image(path: &Path) -> Result<File, LoaderError> {
    File::open(path).map_err(|source| LoaderError::Open {
        path: path.to_path_buf(),
        source,
    })
}

/// The image at `path`, whose segments end at `end`, does not fit in `mem_size` bytes.
fn too_big(path: &Path, mem_size: u64, end: u64) -> LoaderError {
    LoaderError::TooBigForMemory {
        path: path.to_path_buf(),
        mem_mib: mem_size >> 20,
        end,
        needed_mib: end.div_ceil(1 << 20),
    }
}

/// The first physical address past the image's highest loadable segment, read from its
/// ELF64 program headers; `None` if they cannot be read (the load's own error then stands).
/// Every field is bounded: the image is untrusted.
fn segments_end(image: &File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    /// ELF64 header: e_phoff at 32, e_phentsize at 54, e_phnum at 56.
    const EHDR_LEN: usize = 64;
    /// One ELF64 program header: p_type at 0, p_paddr at 24, p_memsz at 40.
    const PHDR_LEN: usize = 56;
    const PT_LOAD: u32 = 1;
    /// More program headers than any kernel has: a bound on what is read.
    const MAX_PHDRS: usize = 64;
    let u16_at =
        |b: &[u8], at: usize| Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?));
    let u32_at =
        |b: &[u8], at: usize| Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?));
    let u64_at =
        |b: &[u8], at: usize| Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?));

    let mut ehdr = [0u8; EHDR_LEN];
    image.read_exact_at(&mut ehdr, 0).ok()?;
    if ehdr[..4] != *b"\x7fELF" || ehdr[4] != 2 || ehdr[5] != 1 {
        return None;
    }
    let phoff = u64_at(&ehdr, 32)?;
    let phnum = usize::from(u16_at(&ehdr, 56)?);
    if usize::from(u16_at(&ehdr, 54)?) != PHDR_LEN || phnum > MAX_PHDRS {
        return None;
    }
    let mut phdrs = vec![0u8; phnum * PHDR_LEN];
    image.read_exact_at(&mut phdrs, phoff).ok()?;
    phdrs
        .chunks_exact(PHDR_LEN)
        .filter(|ph| u32_at(ph, 0) == Some(PT_LOAD))
        .map(|ph| u64_at(ph, 24)?.checked_add(u64_at(ph, 40)?))
        .try_fold(0u64, |end, seg| Some(end.max(seg?)))
}

fn mem_size(mem: &GuestMemory) -> u64 {
    mem.last_addr().0 + 1
}

#[cfg(test)]
mod tests {
    use vm_memory::ByteValued;

    use super::*;
    use crate::vstate::memory::{self, MemoryBacking};

    fn mem(mib: usize) -> GuestMemory {
        memory::create(mib << 20, MemoryBacking::Anonymous).unwrap()
    }

    #[test]
    fn cmdline_length_limit_counts_the_nul() {
        validate_cmdline("").unwrap();
        validate_cmdline(&"x".repeat(CMDLINE_MAX - 1)).unwrap();
        let err = validate_cmdline(&"x".repeat(CMDLINE_MAX)).unwrap_err();
        assert!(
            matches!(err, LoaderError::CmdlineTooLong { len } if len == CMDLINE_MAX),
            "{err:?}"
        );
        assert!(err.to_string().contains("CMDLINE_MAX"));
        assert!(matches!(
            validate_cmdline("a\0b"),
            Err(LoaderError::CmdlineNul)
        ));
    }

    #[test]
    fn start_info_encoding_is_the_pvh_abi() {
        let info = start_info(2);
        let bytes = info.as_slice();
        assert_eq!(bytes.len(), 56);
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        assert_eq!(u32_at(0), 0x336e_c578); // "xEn3" with the top bit flipped
        assert_eq!(u32_at(4), 1); // version
        assert_eq!(u32_at(12), 0); // nr_modules
        assert_eq!(u64_at(24), CMDLINE_ADDR);
        assert_eq!(u64_at(32), 0); // rsdp
        assert_eq!(u64_at(40), PVH_MEMMAP_ADDR);
        assert_eq!(u32_at(48), 2);
    }

    #[test]
    fn memory_map_covers_low_and_high_ram() {
        let (e, n) = memory_map(64 << 20);
        assert_eq!(n, 2);
        assert_eq!(
            (e[0].addr, e[0].size, e[0].type_),
            (0, LOW_RAM_END, E820_RAM)
        );
        assert_eq!(
            (e[1].addr, e[1].size, e[1].type_),
            (KERNEL_START, (64 << 20) - KERNEL_START, E820_RAM)
        );
        assert_eq!(std::mem::size_of::<hvm_memmap_table_entry>(), 24);
    }

    #[test]
    fn boot_data_lands_at_abi_addresses() {
        let m = mem(8);
        // Low memory is not assumed zero: put garbage where the NUL goes.
        m.write_obj(0xffu8, GuestAddress(CMDLINE_ADDR + 5)).unwrap();
        write_boot_data(&m, "hello").unwrap();
        let info: hvm_start_info = m.read_obj(GuestAddress(PVH_INFO_ADDR)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.memmap_entries, 2);
        let high: hvm_memmap_table_entry = m
            .read_obj(GuestAddress(PVH_MEMMAP_ADDR + MEMMAP_ENTRY_LEN))
            .unwrap();
        assert_eq!(high.addr + high.size, 8 << 20);
        let mut cmd = [0u8; 6];
        m.read_slice(&mut cmd, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cmd, b"hello\0");
    }

    #[test]
    fn too_long_cmdline_is_rejected_before_writing() {
        let m = mem(8);
        let err = write_boot_data(&m, &"y".repeat(CMDLINE_MAX)).unwrap_err();
        assert!(matches!(err, LoaderError::CmdlineTooLong { .. }), "{err:?}");
    }

    #[test]
    fn non_elf_file_is_named() {
        let tmp = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(tmp.as_path(), b"#!/bin/sh\necho not a kernel\n").unwrap();
        let mut f = open_image(tmp.as_path()).unwrap();
        let err = load_kernel(&mem(8), &mut f, tmp.as_path()).unwrap_err();
        assert!(matches!(err, LoaderError::NotElf { .. }), "{err:?}");
        assert!(err
            .to_string()
            .contains(&tmp.as_path().display().to_string()));
    }

    #[test]
    fn empty_file_is_not_an_elf() {
        let tmp = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let mut f = open_image(tmp.as_path()).unwrap();
        let err = load_kernel(&mem(8), &mut f, tmp.as_path()).unwrap_err();
        assert!(matches!(err, LoaderError::NotElf { .. }), "{err:?}");
    }

    #[test]
    fn elf_without_pvh_note_is_named() {
        let path = Path::new("/bin/true");
        let mut f = open_image(path).unwrap();
        let err = load_kernel(&mem(8), &mut f, path).unwrap_err();
        assert!(matches!(err, LoaderError::NoPvhEntry { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "/bin/true has no PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); \
             fnode boots PVH ELF kernels"
        );
    }

    /// An ELF64 header and one PT_LOAD program header for `memsz` bytes at `paddr`, the
    /// first 64 of them from the file (what follows the headers), the rest bss.
    fn elf_with_segment(paddr: u64, memsz: u64) -> Vec<u8> {
        let mut elf = vec![0u8; 64 + 56 + 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // 64-bit
        elf[5] = 1; // little-endian
        elf[6] = 1; // version
        elf[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        elf[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        elf[20..24].copy_from_slice(&1u32.to_le_bytes());
        elf[24..32].copy_from_slice(&paddr.to_le_bytes()); // e_entry
        elf[32..40].copy_from_slice(&64u64.to_le_bytes()); // e_phoff
        elf[52..54].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        elf[54..56].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        elf[56..58].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = &mut elf[64..];
        ph[..4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        ph[4..8].copy_from_slice(&7u32.to_le_bytes()); // RWX
        ph[8..16].copy_from_slice(&120u64.to_le_bytes()); // p_offset
        ph[32..40].copy_from_slice(&64u64.to_le_bytes()); // p_filesz
        ph[16..24].copy_from_slice(&paddr.to_le_bytes()); // p_vaddr
        ph[24..32].copy_from_slice(&paddr.to_le_bytes()); // p_paddr
        ph[40..48].copy_from_slice(&memsz.to_le_bytes()); // p_memsz
        ph[48..56].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
        elf
    }

    #[test]
    fn an_image_too_big_for_memory_says_how_much_it_needs() {
        let tmp = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(tmp.as_path(), elf_with_segment(KERNEL_START, 20 << 20)).unwrap();
        let mut f = open_image(tmp.as_path()).unwrap();
        let err = load_kernel(&mem(8), &mut f, tmp.as_path()).unwrap_err();
        let needed = (KERNEL_START + (20 << 20)).div_ceil(1 << 20);
        assert!(
            matches!(err, LoaderError::TooBigForMemory { mem_mib: 8, needed_mib, .. }
                if needed_mib == needed),
            "{err:?}"
        );
        assert!(
            err.to_string().contains(&format!("--mem {needed}")),
            "{err}"
        );
    }

    #[test]
    fn an_image_whose_data_overruns_memory_says_how_much_it_needs() {
        // File data 9 MiB above the kernel's start: the loader's copy fails, and the error
        // still names the size.
        let elf = elf_with_segment(KERNEL_START + (9 << 20), 0x1000);
        let tmp = vmm_sys_util::tempfile::TempFile::new().unwrap();
        std::fs::write(tmp.as_path(), elf).unwrap();
        let mut f = open_image(tmp.as_path()).unwrap();
        let err = load_kernel(&mem(8), &mut f, tmp.as_path()).unwrap_err();
        assert!(
            matches!(
                err,
                LoaderError::TooBigForMemory {
                    mem_mib: 8,
                    needed_mib: 11,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn segment_ends_are_read_with_bounds() {
        let read = |bytes: &[u8]| {
            let tmp = vmm_sys_util::tempfile::TempFile::new().unwrap();
            std::fs::write(tmp.as_path(), bytes).unwrap();
            segments_end(&open_image(tmp.as_path()).unwrap())
        };
        assert_eq!(read(&elf_with_segment(0x10_0000, 0x2000)), Some(0x10_2000));
        // A segment whose end overflows, a truncated header table, too many headers.
        assert_eq!(read(&elf_with_segment(u64::MAX - 1, 2)), None);
        let elf = elf_with_segment(0x10_0000, 0x2000);
        assert_eq!(read(&elf[..100]), None);
        let mut many = elf.clone();
        many[56..58].copy_from_slice(&1000u16.to_le_bytes());
        assert_eq!(read(&many), None);
        assert_eq!(
            read(b"not an elf at all, but long enough for a header........................"),
            None
        );
    }

    #[test]
    fn missing_file_is_named() {
        let err = open_image(Path::new("/nonexistent/kernel.elf")).unwrap_err();
        assert!(matches!(err, LoaderError::Open { .. }));
        assert!(err.to_string().contains("/nonexistent/kernel.elf"));
    }
}
