//! The GDT and the TSS, both initialised data in the image.
//!
//! Layout (selector: descriptor):
//! - `0x00` null, `0x08` kernel code (64-bit), `0x10` kernel data,
//! - `0x18` user data, `0x20` user code (64-bit), both DPL 3,
//! - `0x28` the 64-bit TSS (16 bytes).
//!
//! The order is the one `syscall`/`sysret` need (see [`STAR`]): `syscall` loads CS from
//! `STAR[47:32]` and SS = CS + 8; `sysretq` loads SS from `STAR[63:48] + 8` and CS from
//! `STAR[63:48] + 16`. (fnode returns to user mode with `iretq`, which needs no particular
//! order, but the layout keeps `sysretq` possible.)
//!
//! The TSS gives the CPU the stack for traps from user mode (`RSP0`) and a separate stack for
//! double faults (`IST1`). Its I/O map base points past its limit: there is no I/O permission
//! bitmap, so user-mode `in`/`out` raise #GP.
//!
//! The boot code loads the GDT (`lgdt fnode_gdt_ptr`) before entering long mode; `load_tss`
//! loads the task register once in Rust.

// On the host (unit tests) the tables are not assembled and their values only tested.
#![cfg_attr(not(target_os = "none"), allow(dead_code))]

#[cfg(target_os = "none")]
use core::arch::{asm, global_asm};

/// Kernel code segment selector.
pub const KERNEL_CODE_SELECTOR: u16 = 1 << 3;
/// Kernel data (and stack) segment selector.
pub const KERNEL_DATA_SELECTOR: u16 = 2 << 3;
/// User data (and stack) segment selector, RPL 3.
pub const USER_DATA_SELECTOR: u16 = (3 << 3) | 3;
/// User code segment selector, RPL 3.
pub const USER_CODE_SELECTOR: u16 = (4 << 3) | 3;
/// The TSS selector.
pub const TSS_SELECTOR: u16 = 5 << 3;

/// The `IA32_STAR` value for this GDT: `syscall` enters at [`KERNEL_CODE_SELECTOR`],
/// `sysretq` would return to [`USER_CODE_SELECTOR`] / [`USER_DATA_SELECTOR`].
pub const STAR: u64 =
    ((KERNEL_DATA_SELECTOR as u64 | 3) << 48) | ((KERNEL_CODE_SELECTOR as u64) << 32);

/// The interrupt stack table slot (1-based, as in an IDT gate) of the double-fault stack.
pub const DOUBLE_FAULT_IST: u8 = 1;

/// Size of a 64-bit TSS.
const TSS_SIZE: u16 = 104;

// Access byte bits.
const PRESENT: u8 = 1 << 7;
const DPL3: u8 = 3 << 5;
const CODE_OR_DATA: u8 = 1 << 4;
const EXECUTABLE: u8 = 1 << 3;
const READ_WRITE: u8 = 1 << 1;
/// System descriptor type 9: available 64-bit TSS.
const TSS_AVAILABLE: u8 = 0x9;
// Flag nibble bits.
const GRANULARITY_4K: u8 = 1 << 3;
const SIZE_32: u8 = 1 << 2;
const LONG_MODE: u8 = 1 << 1;

/// A flat (base 0, limit 4 GiB) code or data descriptor.
const fn segment(access: u8, flags: u8) -> u64 {
    0x000f_0000_0000_ffff | (access as u64) << 40 | (flags as u64) << 52
}

const KERNEL_CODE: u64 = segment(
    PRESENT | CODE_OR_DATA | EXECUTABLE | READ_WRITE,
    GRANULARITY_4K | LONG_MODE,
);
const KERNEL_DATA: u64 = segment(
    PRESENT | CODE_OR_DATA | READ_WRITE,
    GRANULARITY_4K | SIZE_32,
);
const USER_DATA: u64 = segment(
    PRESENT | DPL3 | CODE_OR_DATA | READ_WRITE,
    GRANULARITY_4K | SIZE_32,
);
const USER_CODE: u64 = segment(
    PRESENT | DPL3 | CODE_OR_DATA | EXECUTABLE | READ_WRITE,
    GRANULARITY_4K | LONG_MODE,
);

// The entries below follow the selector order above; the TSS descriptor's base comes in
// pieces the linker script computes (`fnode_tss_lo16`, ...), since no relocation can scatter
// an address over a descriptor's fields. The GDT is writable data: the CPU sets the TSS busy
// bit and segment accessed bits in it.
#[cfg(target_os = "none")]
global_asm!(
    r#"
    .section .data.fnode_gdt, "aw"
    .balign 16
fnode_gdt:
    .quad 0
    .quad {kernel_code}
    .quad {kernel_data}
    .quad {user_data}
    .quad {user_code}
    .word {tss_size} - 1
    .word fnode_tss_lo16
    .byte fnode_tss_mid8
    .byte {tss_access}
    .byte 0
    .byte fnode_tss_high8
    .long 0                     /* base 63:32: the kernel lies below 4 GiB */
    .long 0
fnode_gdt_end:

    .balign 8
    .global fnode_gdt_ptr
fnode_gdt_ptr:
    .word fnode_gdt_end - fnode_gdt - 1
    .quad fnode_gdt

    .balign 16
    .global fnode_tss
fnode_tss:
    .long 0
    .quad fnode_trap_stack_top          /* RSP0 */
    .quad 0, 0                          /* RSP1, RSP2 */
    .quad 0
    .quad fnode_double_fault_stack_top  /* IST1 */
    .fill 6, 8, 0                       /* IST2..IST7 */
    .quad 0
    .word 0
    .word {tss_size}                    /* I/O map base past the limit: no bitmap */
    "#,
    kernel_code = const KERNEL_CODE,
    kernel_data = const KERNEL_DATA,
    user_data = const USER_DATA,
    user_code = const USER_CODE,
    tss_size = const TSS_SIZE,
    tss_access = const PRESENT | TSS_AVAILABLE,
    options(att_syntax)
);

/// Loads the task register with the TSS.
#[cfg(target_os = "none")]
pub fn load_tss() {
    // SAFETY: the boot code loaded this module's GDT, whose TSS_SELECTOR entry is a valid,
    // available 64-bit TSS descriptor; `ltr` runs once, at boot.
    unsafe { asm!("ltr {0:x}", in(reg) TSS_SELECTOR, options(nostack, preserves_flags)) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_well_known_values() {
        assert_eq!(KERNEL_CODE, 0x00af_9a00_0000_ffff);
        assert_eq!(KERNEL_DATA, 0x00cf_9200_0000_ffff);
        assert_eq!(USER_DATA, 0x00cf_f200_0000_ffff);
        assert_eq!(USER_CODE, 0x00af_fa00_0000_ffff);
    }

    #[test]
    fn star_gives_the_sysret_layout() {
        let sysret_base = (STAR >> 48) as u16 & !3;
        assert_eq!((STAR >> 32) as u16, KERNEL_CODE_SELECTOR);
        assert_eq!(KERNEL_CODE_SELECTOR + 8, KERNEL_DATA_SELECTOR);
        assert_eq!((sysret_base + 8) | 3, USER_DATA_SELECTOR);
        assert_eq!((sysret_base + 16) | 3, USER_CODE_SELECTOR);
    }
}
