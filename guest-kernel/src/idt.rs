//! The IDT for the 32 exception vectors, and the fault report.
//!
//! Gates 32-47 take the legacy PIC's interrupts, all to one handler in [`crate::pic`].
//!
//! Any exception ends the guest: the handler writes an [`abi::fault::FaultReport`] at
//! [`abi::layout::REPORT_ADDR`], prints one line on the serial console and exits with
//! [`abi::exit::FAULT`]. Exceptions are never resumed.
//!
//! Like the page tables, the IDT is initialised data: vector `v`'s stub sits at
//! `fnode_vectors + v * VECTOR_SLOT`, every stub in one 64 KiB window below 4 GiB, so a gate's
//! offset is `fnode_vectors_lo16 + v * VECTOR_SLOT` (low 16 bits), `fnode_vectors_hi16`
//! (bits 31:16) and 0 (bits 63:32). The linker script computes the two halves and checks the
//! window. At boot, `load` is one `lidt`.
//!
//! A stub pushes a zero error code for vectors where the CPU pushes none, then the vector
//! number, so the handler always sees a [`TrapFrame`]. #DF runs on its own stack (IST1).

// On the host (unit tests) the tables are not assembled and their values only tested.
#![cfg_attr(not(target_os = "none"), allow(dead_code))]

use fnode_guest::abi::{self, fault::FaultReport};

use crate::line::Line;

/// Number of exception vectors.
pub const EXCEPTION_VECTORS: u64 = 32;
/// Bytes between two exception stubs.
const VECTOR_SLOT: u64 = 16;
/// The double-fault vector (it gets its own stack).
const DOUBLE_FAULT_VECTOR: u64 = 8;
/// The general-protection vector (also what a system call with a bad return address is
/// reported as, see [`crate::syscall`]).
pub const GENERAL_PROTECTION_VECTOR: u64 = 13;
/// The page-fault vector (its stub goes through [`crate::syscall`]'s check first).
pub const PAGE_FAULT_VECTOR: u64 = 14;
/// Vectors for which the CPU pushes an error code: #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP,
/// #VC, #SX.
const ERROR_CODE_VECTORS: u32 = 1 << 8
    | 1 << 10
    | 1 << 11
    | 1 << 12
    | 1 << 13
    | 1 << 14
    | 1 << 17
    | 1 << 21
    | 1 << 29
    | 1 << 30;
/// Gate attributes: present, DPL 0, 64-bit interrupt gate (interrupts stay disabled).
const INTERRUPT_GATE: u8 = 0x8e;

/// What the stub and the CPU leave on the stack.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TrapFrame {
    /// Pushed by the stub.
    pub vector: u64,
    /// Pushed by the CPU, or 0 by the stub.
    pub error_code: u64,
    /// The interrupted context, pushed by the CPU.
    pub rip: u64,
    /// Code segment of the interrupted context.
    pub cs: u64,
    /// RFLAGS of the interrupted context.
    pub rflags: u64,
    /// Stack pointer of the interrupted context.
    pub rsp: u64,
    /// Stack segment of the interrupted context.
    pub ss: u64,
}

impl TrapFrame {
    /// The report for this exception, with `cr2` read at the fault.
    pub fn report(&self, cr2: u64) -> FaultReport {
        FaultReport {
            magic: abi::fault::MAGIC,
            vector: self.vector,
            error_code: self.error_code,
            rip: self.rip,
            cr2,
            rsp: self.rsp,
            cs: self.cs,
        }
    }
}

/// The console line for a fault:
/// `fnode guest-kernel: fault #PF (vector 14) at rip=0x... error=0x... cr2=0x...`.
pub fn fault_line(report: &FaultReport) -> Line {
    let mut line = Line::log();
    line.str("fault ")
        .str(report.mnemonic())
        .str(" (vector ")
        .dec(report.vector)
        .str(") at rip=")
        .hex(report.rip)
        .str(" error=")
        .hex(report.error_code)
        .str(" cr2=")
        .hex(report.cr2)
        .str(" rsp=")
        .hex(report.rsp)
        .str(" cs=")
        .hex(report.cs);
    line
}

#[cfg(target_os = "none")]
pub use imp::load;

#[cfg(target_os = "none")]
mod imp {
    use core::{
        arch::{asm, global_asm},
        sync::atomic::{AtomicBool, Ordering},
    };

    use fnode_guest::abi;

    use super::*;
    use crate::{exit, gdt, serial};

    global_asm!(
        r#"
        .section .text.fnode_vectors, "ax"
        /* Aligned to its own size: the stubs never straddle a 64 KiB boundary. */
        .balign {slot} * {vectors}
        .global fnode_vectors
    fnode_vectors:
        .set fnode_vector, 0
        .rept {vectors}
        .if (({error_code_vectors} >> fnode_vector) & 1) == 0
        pushq $0
        .endif
        .if fnode_vector == {page_fault_vector}
        /* A user-mode `syscall` may arrive as a page fault: see crate::syscall. */
        jmp fnode_page_fault_entry
        .else
        pushq $fnode_vector
        jmp fnode_exception_common
        .endif
        /* Pad to the next slot; fails to assemble if a stub outgrows its slot. */
        .org fnode_vectors + (fnode_vector + 1) * {slot}, 0xcc
        .set fnode_vector, fnode_vector + 1
        .endr
        .global fnode_vectors_end
    fnode_vectors_end:

        .global fnode_exception_common
    fnode_exception_common:
        cld                         /* user mode may have set DF; Rust code assumes it clear */
        movq %rsp, %rdi             /* &TrapFrame */
        andq $-16, %rsp             /* the call's ABI alignment; the handler never returns */
        call {handler}
        ud2

        .section .rodata.fnode_idt, "a"
        .balign 16
    fnode_idt:
        .set fnode_vector, 0
        .rept {vectors}
        .word fnode_vectors_lo16 + fnode_vector * {slot}
        .word {kernel_cs}
        .if fnode_vector == {df_vector}
        .byte {df_ist}
        .else
        .byte 0
        .endif
        .byte {gate}
        .word fnode_vectors_hi16
        .long 0                     /* offset 63:32: the kernel lies below 4 GiB */
        .long 0
        .set fnode_vector, fnode_vector + 1
        .endr
        /* Vectors 32-47: the PIC's IRQ 0-15, all to one handler (crate::pic). */
        .rept {pic_lines}
        .word fnode_pic_irq_lo16
        .word {kernel_cs}
        .byte 0
        .byte {gate}
        .word fnode_pic_irq_hi16
        .long 0
        .long 0
        .endr
    fnode_idt_end:

        .balign 8
        .global fnode_idt_ptr
    fnode_idt_ptr:
        .word fnode_idt_end - fnode_idt - 1
        .quad fnode_idt
        "#,
        slot = const VECTOR_SLOT,
        vectors = const EXCEPTION_VECTORS,
        error_code_vectors = const ERROR_CODE_VECTORS,
        handler = sym exception,
        page_fault_vector = const PAGE_FAULT_VECTOR,
        kernel_cs = const gdt::KERNEL_CODE_SELECTOR,
        df_vector = const DOUBLE_FAULT_VECTOR,
        df_ist = const gdt::DOUBLE_FAULT_IST,
        gate = const INTERRUPT_GATE,
        pic_lines = const crate::pic::IRQ_LINES,
        options(att_syntax)
    );

    // The PIC's gates follow the exception gates directly.
    const _: () = assert!(crate::pic::VECTOR_BASE as u64 == EXCEPTION_VECTORS);

    /// Loads the IDT.
    pub fn load() {
        // SAFETY: fnode_idt_ptr describes the IDT above, static data whose gates point at
        // the stubs above with the kernel code selector.
        unsafe {
            asm!(
                "lidt [rip + fnode_idt_ptr]",
                options(nostack, preserves_flags)
            )
        };
    }

    /// Set by the first exception: an exception inside the handler exits at once.
    static IN_FAULT: AtomicBool = AtomicBool::new(false);

    /// The common exception handler: report, print, exit.
    extern "C" fn exception(frame: &TrapFrame) -> ! {
        if IN_FAULT.swap(true, Ordering::Relaxed) {
            exit::exit(abi::exit::FAULT);
        }
        let report = frame.report(read_cr2());
        if frame.cs & 3 == 3 {
            // The function faulted: its request in flight gets an error frame first.
            crate::runloop::user_fault(&report);
        }
        // SAFETY: REPORT_ADDR is guest RAM the abi reserves for this report, inside the
        // identity map, and suitably aligned; nothing else in the guest uses it.
        unsafe {
            core::ptr::write_volatile(
                abi::layout::REPORT_ADDR as *mut abi::fault::FaultReport,
                report,
            )
        };
        serial::write_line(&mut fault_line(&report));
        exit::exit(abi::exit::FAULT)
    }

    fn read_cr2() -> u64 {
        let cr2: u64;
        // SAFETY: reading CR2 has no side effects.
        unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack, preserves_flags)) };
        cr2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_line_names_the_fault() {
        let frame = TrapFrame {
            vector: 14,
            error_code: 0,
            rip: 0x10_2abc,
            cs: 8,
            rflags: 0x2,
            rsp: 0x11_fff0,
            ss: 0x10,
        };
        let report = frame.report(0x4000_1000);
        assert_eq!(report.magic, abi::fault::MAGIC);
        assert_eq!(
            fault_line(&report).text(),
            "fnode guest-kernel: fault #PF (vector 14) at rip=0x102abc error=0x0 cr2=0x40001000 \
             rsp=0x11fff0 cs=0x8"
        );
    }

    #[test]
    fn error_code_vectors_are_the_architectural_ones() {
        let with_code: [u64; 10] = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];
        for v in 0..EXCEPTION_VECTORS {
            assert_eq!(
                ERROR_CODE_VECTORS >> v & 1 == 1,
                with_code.contains(&v),
                "vector {v}"
            );
        }
    }
}
