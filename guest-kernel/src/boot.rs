//! PVH entry: from 32-bit protected mode to Rust in long mode.
//!
//! The loader (QEMU, fnode-vmm through linux-loader) finds the entry point in the image's
//! `XEN_ELFNOTE_PHYS32_ENTRY` note and starts the vCPU there in 32-bit protected mode, paging
//! off, flat segments, `%ebx` = physical address of `hvm_start_info`, no stack.
//!
//! Guest kernel code may be emulated one instruction at a time, so everything that can be
//! computed at build time is: the page tables identity-mapping `[0, IDENTITY_MAP_END)` with
//! 2 MiB pages are initialised data in the image, and so are the GDT, TSS and IDT (see
//! [`crate::gdt`], [`crate::idt`]). The entry path below is ~30 instructions: stack, PAE, CR3,
//! EFER, paging, GDT, far jump, data segments, clear `.bss`, call
//! [`crate::kernel_entry`].

use core::arch::global_asm;

use fnode_guest::abi::layout::{IDENTITY_MAP_END, KERNEL_START};

use crate::gdt::{KERNEL_CODE_SELECTOR, KERNEL_DATA_SELECTOR};

/// PVH ELF note type carrying the 32-bit physical entry address (Xen's `elfnote.h`).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// Size of the stack the boot path and the kernel run on.
pub const KERNEL_STACK_SIZE: usize = 64 * 1024;
/// Size of the stack the CPU switches to on a trap from user mode (TSS.RSP0). System calls
/// run on it too ([`crate::syscall`]), the invocation channel's send and receive included.
pub const TRAP_STACK_SIZE: usize = 64 * 1024;
/// Bytes above the trap stack's top, in the same page, that hold the run loop's state
/// ([`crate::runloop`]): every system call writes its frame into that page anyway, so the
/// state costs a restored guest no page of its own to touch (and the host none to copy).
pub const TRAP_PAGE_STATE_SIZE: usize = 1024;
/// Size of the double-fault stack (TSS.IST1): a #DF must not run on a broken stack.
pub const DOUBLE_FAULT_STACK_SIZE: usize = 4 * 1024;

// EFER.SCE (set below) enables `syscall`, which user-mode functions use to return to the kernel.
use crate::x86::{
    CR0_PG, CR4_PAE, EFER_LME, EFER_SCE, HUGE_PAGE, MSR_EFER, PTE_HUGE, PTE_PRESENT, PTE_WRITABLE,
};

const GIB: u64 = 1 << 30;
const _: () = assert!(IDENTITY_MAP_END.is_multiple_of(GIB) && IDENTITY_MAP_END / GIB <= 512);
const _: () = assert!(KERNEL_START < IDENTITY_MAP_END);
// The stacks start page-aligned and every stack size is whole pages: the trap stack's top
// then lies `TRAP_PAGE_STATE_SIZE` bytes below a page end, the state above it in that page.
const _: () = assert!(
    KERNEL_STACK_SIZE.is_multiple_of(4096)
        && TRAP_STACK_SIZE.is_multiple_of(4096)
        && TRAP_PAGE_STATE_SIZE.is_multiple_of(64)
        && TRAP_PAGE_STATE_SIZE <= 2048
);

// The PVH note, the 32-bit entry and the boot page tables. `ENTRY(fnode_pvh_entry)` in the
// linker script keeps this object in every image that links the kernel library.
global_asm!(
    r#"
    .section .note.Xen, "a", @note
    .balign 4
    .long 4                     /* namesz: "Xen\0" */
    .long 4                     /* descsz: a 32-bit physical address */
    .long {note_type}
    .asciz "Xen"
    .balign 4
    .long fnode_pvh_entry

    .section .text.fnode_boot, "ax"
    .code32
    .global fnode_pvh_entry
fnode_pvh_entry:
    cli
    cld
    movl $fnode_kernel_stack_top, %esp
    movl %cr4, %eax
    orl ${cr4_pae}, %eax
    movl %eax, %cr4
    movl $fnode_pml4, %eax
    movl %eax, %cr3
    movl ${msr_efer}, %ecx
    rdmsr
    orl ${efer_bits}, %eax
    wrmsr
    movl %cr0, %eax
    orl ${cr0_pg}, %eax
    movl %eax, %cr0
    lgdt fnode_gdt_ptr
    ljmp ${kernel_cs}, $fnode_entry64

    .code64
fnode_entry64:
    movl ${kernel_ds}, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    /* Clear .bss (16-byte aligned both ends): no loader is trusted to have done it. */
    movl $fnode_bss_start, %edi
    movl $fnode_bss_end, %ecx
    subl %edi, %ecx
    shrl $3, %ecx
    rep stosq
    movl %ebx, %edi             /* hvm_start_info's physical address */
    call {kernel_entry}
    ud2

    /* Boot page tables: PML4[0] -> PDPT, PDPT[i] -> PD i, PD entries are 2 MiB pages. */
    .section .data.fnode_page_tables, "aw"
    .balign 4096
fnode_pml4:
    .quad fnode_pdpt + {table_flags}
    .fill 511, 8, 0
fnode_pdpt:
    .set fnode_pd_index, 0
    .rept {pd_count}
    .quad fnode_pd + fnode_pd_index * 4096 + {table_flags}
    .set fnode_pd_index, fnode_pd_index + 1
    .endr
    .fill 512 - {pd_count}, 8, 0
fnode_pd:
    .set fnode_page_index, 0
    .rept {page_count}
    .quad (fnode_page_index * {huge_page}) + {page_flags}
    .set fnode_page_index, fnode_page_index + 1
    .endr

    .section .fnode_stacks, "aw", @nobits
    .balign 4096
    .space {kernel_stack_size}
    .global fnode_kernel_stack_top
fnode_kernel_stack_top:
    .space {trap_stack_size} - {trap_page_state_size}
    .global fnode_trap_stack_top
fnode_trap_stack_top:
    .global fnode_trap_page_state
fnode_trap_page_state:
    .space {trap_page_state_size}
    .space {df_stack_size}
    .global fnode_double_fault_stack_top
fnode_double_fault_stack_top:
    "#,
    note_type = const XEN_ELFNOTE_PHYS32_ENTRY,
    cr4_pae = const CR4_PAE,
    msr_efer = const MSR_EFER,
    efer_bits = const EFER_LME | EFER_SCE,
    cr0_pg = const CR0_PG,
    kernel_cs = const KERNEL_CODE_SELECTOR,
    kernel_ds = const KERNEL_DATA_SELECTOR,
    kernel_entry = sym crate::kernel_entry,
    table_flags = const PTE_PRESENT | PTE_WRITABLE,
    page_flags = const PTE_PRESENT | PTE_WRITABLE | PTE_HUGE,
    pd_count = const IDENTITY_MAP_END / GIB,
    page_count = const IDENTITY_MAP_END / HUGE_PAGE,
    huge_page = const HUGE_PAGE,
    kernel_stack_size = const KERNEL_STACK_SIZE,
    trap_stack_size = const TRAP_STACK_SIZE,
    trap_page_state_size = const TRAP_PAGE_STATE_SIZE,
    df_stack_size = const DOUBLE_FAULT_STACK_SIZE,
    options(att_syntax)
);
