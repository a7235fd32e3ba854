//! The PVH boot data: `hvm_start_info`, the memory map and the command line.
//!
//! The loader passes the physical address of `hvm_start_info` in `%ebx`. Everything in it is
//! checked before use: the magic, that each structure lies inside the boot identity map, and
//! the sizes (at most [`PVH_MEMMAP_MAX`] memory map entries are read, a command line is at most
//! [`CMDLINE_MAX`] bytes with its NUL). The command line stays where the loader put it: the
//! kernel never reuses low memory.

use core::mem::size_of;

use fnode_guest::abi::layout::{CMDLINE_MAX, IDENTITY_MAP_END, PVH_MEMMAP_MAX};

/// `hvm_start_info.magic`.
pub const START_INFO_MAGIC: u32 = 0x336e_c578;
/// Memory map entry type of usable RAM (the E820 numbering).
pub const E820_RAM: u32 = 1;

/// `struct hvm_start_info` (version 1) from Xen's `arch-x86/hvm/start_info.h`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct StartInfo {
    /// [`START_INFO_MAGIC`].
    pub magic: u32,
    /// 0 or 1; version 1 added the memory map.
    pub version: u32,
    /// `SIF_*` flags.
    pub flags: u32,
    /// Number of boot modules.
    pub nr_modules: u32,
    /// Physical address of the module list.
    pub modlist_paddr: u64,
    /// Physical address of the NUL-terminated command line, 0 for none.
    pub cmdline_paddr: u64,
    /// Physical address of the ACPI RSDP, 0 for none.
    pub rsdp_paddr: u64,
    /// Physical address of the memory map (version 1).
    pub memmap_paddr: u64,
    /// Number of memory map entries (version 1).
    pub memmap_entries: u32,
    /// Must be 0.
    pub reserved: u32,
}

/// `struct hvm_memmap_table_entry`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemmapEntry {
    /// Start of the range.
    pub addr: u64,
    /// Length of the range in bytes.
    pub size: u64,
    /// E820 type ([`E820_RAM`] is usable RAM).
    pub kind: u32,
    /// Must be 0.
    pub reserved: u32,
}

impl MemmapEntry {
    /// The end of the range (saturating: a hostile entry cannot wrap).
    pub fn end(&self) -> u64 {
        self.addr.saturating_add(self.size)
    }
}

/// Errors in the boot data.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PvhError {
    /// `%ebx` points outside the memory the kernel maps.
    #[error("hvm_start_info at {0:#x} is outside the boot identity map: boot with a PVH loader")]
    StartInfoUnmapped(u64),
    /// Not a PVH start info.
    #[error("hvm_start_info magic is {0:#x}, expected 0x336ec578: boot with a PVH loader")]
    BadMagic(u32),
    /// A version 0 start info has no memory map.
    #[error("hvm_start_info version 0 has no memory map: boot with a loader that passes one")]
    NoMemoryMap,
    /// The memory map is empty or lies outside the identity map.
    #[error(
        "memory map at {addr:#x} ({entries} entries) is empty or outside the boot identity map"
    )]
    BadMemoryMap {
        /// `memmap_paddr`.
        addr: u64,
        /// `memmap_entries`.
        entries: u32,
    },
    /// The command line lies outside the identity map.
    #[error("command line at {0:#x} is outside the boot identity map")]
    CmdlineUnmapped(u64),
    /// No NUL within [`CMDLINE_MAX`] bytes.
    #[error("command line is longer than {CMDLINE_MAX} bytes (or lacks its NUL)")]
    CmdlineTooLong,
    /// Not UTF-8.
    #[error("command line is not UTF-8")]
    CmdlineNotUtf8,
}

/// Whether `[addr, addr + len)` lies inside the boot identity map (and is not at 0).
fn mapped(addr: u64, len: u64) -> bool {
    addr != 0
        && addr
            .checked_add(len)
            .is_some_and(|end| end <= IDENTITY_MAP_END)
}

impl StartInfo {
    /// Checks the magic, the version and where the memory map and command line lie.
    pub fn validate(&self) -> Result<(), PvhError> {
        if self.magic != START_INFO_MAGIC {
            return Err(PvhError::BadMagic(self.magic));
        }
        if self.version < 1 {
            return Err(PvhError::NoMemoryMap);
        }
        let entries = self.memmap_entries_to_read();
        if entries == 0
            || !mapped(
                self.memmap_paddr,
                (entries * size_of::<MemmapEntry>()) as u64,
            )
        {
            return Err(PvhError::BadMemoryMap {
                addr: self.memmap_paddr,
                entries: self.memmap_entries,
            });
        }
        if self.cmdline_paddr != 0 && !mapped(self.cmdline_paddr, 1) {
            return Err(PvhError::CmdlineUnmapped(self.cmdline_paddr));
        }
        Ok(())
    }

    /// How many memory map entries the kernel reads: at most [`PVH_MEMMAP_MAX`].
    pub fn memmap_entries_to_read(&self) -> usize {
        (self.memmap_entries as usize).min(PVH_MEMMAP_MAX)
    }

    /// How many bytes of command line may be scanned for its NUL.
    pub fn cmdline_window(&self) -> usize {
        let to_map_end = IDENTITY_MAP_END.saturating_sub(self.cmdline_paddr);
        (CMDLINE_MAX as u64).min(to_map_end) as usize
    }
}

/// The memory map, read in place from the loader's table (nothing is copied at boot).
#[derive(Clone, Copy, Debug)]
pub struct MemoryMap {
    table: *const MemmapEntry,
    len: usize,
}

impl MemoryMap {
    /// The map in `entries` (at most [`PVH_MEMMAP_MAX`] of them are used).
    pub fn new(entries: &'static [MemmapEntry]) -> Self {
        MemoryMap {
            table: entries.as_ptr(),
            len: entries.len().min(PVH_MEMMAP_MAX),
        }
    }

    /// The map in the loader's table at `table`.
    ///
    /// # Safety
    /// `len` entries at `table` (any alignment) must be readable and unchanged for the rest
    /// of the kernel's life.
    pub unsafe fn from_raw(table: *const MemmapEntry, len: usize) -> Self {
        MemoryMap {
            table,
            len: len.min(PVH_MEMMAP_MAX),
        }
    }

    /// The entries.
    pub fn entries(&self) -> impl Iterator<Item = MemmapEntry> + '_ {
        // SAFETY: the constructors guarantee `len` readable entries at `table`.
        (0..self.len).map(|i| unsafe { self.table.add(i).read_unaligned() })
    }

    /// Total usable RAM (saturating).
    pub fn ram_bytes(&self) -> u64 {
        self.ram().fold(0u64, |sum, e| sum.saturating_add(e.size))
    }

    /// The RAM range that contains `addr`.
    pub fn ram_containing(&self, addr: u64) -> Option<MemmapEntry> {
        self.ram().find(|e| e.addr <= addr && addr < e.end())
    }

    fn ram(&self) -> impl Iterator<Item = MemmapEntry> + '_ {
        self.entries().filter(|e| e.kind == E820_RAM)
    }
}

/// The command line from its bytes (up to, not including, the NUL).
pub fn cmdline_str(bytes: &[u8]) -> Result<&str, PvhError> {
    core::str::from_utf8(bytes).map_err(|_| PvhError::CmdlineNotUtf8)
}

/// The position of the first NUL in `window`, if any.
pub fn nul_position(window: impl IntoIterator<Item = u8>) -> Option<usize> {
    window.into_iter().position(|b| b == 0)
}

/// The boot data the kernel keeps.
#[derive(Clone, Copy, Debug)]
pub struct PvhBoot {
    /// The kernel command line ("" if the loader gave none).
    pub cmdline: &'static str,
    /// The memory map.
    pub memory: MemoryMap,
}

/// Reads and checks the boot data at `start_info_paddr`.
///
/// # Safety
/// `start_info_paddr` must be the address the PVH loader passed in `%ebx`, the boot identity
/// map must be active, and the loader's boot data must stay unchanged for the kernel's life.
#[cfg(target_os = "none")]
pub unsafe fn read(start_info_paddr: u64) -> Result<PvhBoot, PvhError> {
    use core::ptr::read_unaligned;

    if !mapped(start_info_paddr, size_of::<StartInfo>() as u64) {
        return Err(PvhError::StartInfoUnmapped(start_info_paddr));
    }
    // SAFETY: the range is identity-mapped RAM the loader filled (caller's contract);
    // unaligned reads make no assumption about where the loader put it.
    let info = unsafe { read_unaligned(start_info_paddr as *const StartInfo) };
    info.validate()?;

    // SAFETY: `validate` checked that the entries lie inside the identity map; the loader's
    // data stays unchanged (caller's contract).
    let memory = unsafe {
        MemoryMap::from_raw(
            info.memmap_paddr as *const MemmapEntry,
            info.memmap_entries_to_read(),
        )
    };

    let cmdline = if info.cmdline_paddr == 0 {
        ""
    } else {
        let start = info.cmdline_paddr as *const u8;
        let window = info.cmdline_window();
        // SAFETY: `[start, start + window)` lies inside the identity map (`validate`,
        // `cmdline_window`); the scan stops at the first NUL.
        let len = nul_position((0..window).map(|i| unsafe { start.add(i).read() }))
            .ok_or(PvhError::CmdlineTooLong)?;
        // SAFETY: the `len` bytes before the NUL were just read and stay unchanged (caller's
        // contract).
        cmdline_str(unsafe { core::slice::from_raw_parts(start, len) })?
    };
    Ok(PvhBoot { cmdline, memory })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> StartInfo {
        StartInfo {
            magic: START_INFO_MAGIC,
            version: 1,
            cmdline_paddr: 0x2_0000,
            memmap_paddr: 0x6100,
            memmap_entries: 2,
            ..Default::default()
        }
    }

    fn leak(entries: &[MemmapEntry]) -> &'static [MemmapEntry] {
        Vec::leak(entries.to_vec())
    }

    fn ram(addr: u64, size: u64) -> MemmapEntry {
        MemmapEntry {
            addr,
            size,
            kind: E820_RAM,
            reserved: 0,
        }
    }

    #[test]
    fn validates_a_good_start_info() {
        assert_eq!(info().validate(), Ok(()));
        assert_eq!(
            StartInfo {
                cmdline_paddr: 0,
                ..info()
            }
            .validate(),
            Ok(())
        );
    }

    #[test]
    fn rejects_bad_start_infos() {
        assert_eq!(
            StartInfo { magic: 0, ..info() }.validate(),
            Err(PvhError::BadMagic(0))
        );
        assert_eq!(
            StartInfo {
                version: 0,
                ..info()
            }
            .validate(),
            Err(PvhError::NoMemoryMap)
        );
        let empty = StartInfo {
            memmap_entries: 0,
            ..info()
        };
        assert_eq!(
            empty.validate(),
            Err(PvhError::BadMemoryMap {
                addr: 0x6100,
                entries: 0
            })
        );
        let high = StartInfo {
            memmap_paddr: IDENTITY_MAP_END - 8,
            ..info()
        };
        assert!(matches!(
            high.validate(),
            Err(PvhError::BadMemoryMap { .. })
        ));
        let wrap = StartInfo {
            memmap_paddr: u64::MAX - 8,
            ..info()
        };
        assert!(matches!(
            wrap.validate(),
            Err(PvhError::BadMemoryMap { .. })
        ));
        let cmd = StartInfo {
            cmdline_paddr: IDENTITY_MAP_END,
            ..info()
        };
        assert_eq!(
            cmd.validate(),
            Err(PvhError::CmdlineUnmapped(IDENTITY_MAP_END))
        );
    }

    #[test]
    fn bounds_what_it_reads() {
        let many = StartInfo {
            memmap_entries: u32::MAX,
            ..info()
        };
        assert_eq!(many.memmap_entries_to_read(), PVH_MEMMAP_MAX);
        assert_eq!(info().cmdline_window(), CMDLINE_MAX);
        let near_end = StartInfo {
            cmdline_paddr: IDENTITY_MAP_END - 10,
            ..info()
        };
        assert_eq!(near_end.cmdline_window(), 10);
    }

    #[test]
    fn finds_the_command_line() {
        assert_eq!(nul_position(*b"fault=ud2\0junk"), Some(9));
        assert_eq!(nul_position([b'x'; CMDLINE_MAX]), None);
        assert_eq!(cmdline_str(b"fault=ud2"), Ok("fault=ud2"));
        assert_eq!(cmdline_str(&[0xff, 0xfe]), Err(PvhError::CmdlineNotUtf8));
    }

    #[test]
    fn sums_ram_and_finds_regions() {
        let reserved = MemmapEntry {
            addr: 0x9_fc00,
            size: 0x400,
            kind: 2,
            reserved: 0,
        };
        let map = MemoryMap::new(leak(&[
            ram(0, 0x9_fc00),
            reserved,
            ram(0x10_0000, 0x3f0_0000),
        ]));
        assert_eq!(map.ram_bytes(), 0x9_fc00 + 0x3f0_0000);
        assert_eq!(
            map.ram_containing(0x20_0000),
            Some(ram(0x10_0000, 0x3f0_0000))
        );
        assert_eq!(map.ram_containing(0x9_fc00), None);
        assert_eq!(map.ram_containing(0x400_0000), None);
    }

    #[test]
    fn keeps_at_most_the_abi_maximum_of_entries() {
        let entries = [ram(0, 1); PVH_MEMMAP_MAX + 3];
        assert_eq!(
            MemoryMap::new(leak(&entries)).entries().count(),
            PVH_MEMMAP_MAX
        );
        let hostile = MemoryMap::new(leak(&[ram(u64::MAX, u64::MAX), ram(1, u64::MAX)]));
        assert_eq!(hostile.ram_bytes(), u64::MAX);
    }
}
