//! Device interrupts through the legacy 8259 PIC pair, and waiting for them with `hlt`.
//!
//! Why the PIC: KVM's in-kernel irqchip routes GSIs 0-15 to its PIC (and its I/O APIC) by
//! default, the PIC needs no MMIO mapping, and it is programmed with ten port writes once at
//! boot. Both PICs run in **auto-EOI** mode: the interrupt acknowledge cycle itself ends the
//! interrupt, so the handler writes no end-of-interrupt command, one exit less per
//! interrupt. The local APIC is left as KVM resets it (LINT0 in ExtINT mode on the boot CPU),
//! which passes PIC interrupts through.
//!
//! The PIC's IRQs 0-15 arrive on vectors [`VECTOR_BASE`]`..+16`. All sixteen share one
//! handler that only returns: work is done by the code that waits (`wait_for_interrupt`),
//! not in interrupt context. The kernel runs with interrupts off everywhere but in that
//! wait (`sti; hlt`), so an interrupt is taken only there, and one that arrived earlier waits
//! in the PIC until then: the wait needs no flag to remember it. Every IRQ line starts
//! masked; drivers unmask theirs (`unmask`).

// On the host (unit tests) the port writes are not compiled and their values only tested.
#![cfg_attr(not(target_os = "none"), allow(dead_code))]

/// The vector of IRQ 0; IRQ `n` arrives on `VECTOR_BASE + n`. Right after the 32 exception
/// vectors.
pub const VECTOR_BASE: u8 = 32;
/// Number of PIC IRQ lines (master and slave).
pub const IRQ_LINES: u8 = 16;

const MASTER_CMD: u16 = 0x20;
const MASTER_DATA: u16 = 0x21;
const SLAVE_CMD: u16 = 0xa0;
const SLAVE_DATA: u16 = 0xa1;
/// ICW1: edge-triggered, cascaded, ICW4 follows.
const ICW1_INIT: u8 = 0x11;
/// OCW3: the next read of the command port returns the interrupt request register.
const OCW3_READ_IRR: u8 = 0x0a;
/// ICW4: 8086 mode, automatic end of interrupt.
const ICW4_8086_AEOI: u8 = 0x03;
/// The master's input the slave is wired to.
const CASCADE_IRQ: u8 = 2;

/// The masks (master, slave) that leave exactly the lines in `enabled` (bit `n` = IRQ `n`)
/// unmasked, plus the cascade line when a slave line is enabled.
pub const fn masks(enabled: u16) -> (u8, u8) {
    let mut enabled = enabled;
    if enabled & 0xff00 != 0 {
        enabled |= 1 << CASCADE_IRQ;
    }
    (!(enabled as u8), !((enabled >> 8) as u8))
}

/// The port writes that initialise the PIC pair with every line masked: (port, value).
const INIT_SEQUENCE: [(u16, u8); 10] = [
    (MASTER_CMD, ICW1_INIT),
    (SLAVE_CMD, ICW1_INIT),
    (MASTER_DATA, VECTOR_BASE),
    (SLAVE_DATA, VECTOR_BASE + 8),
    (MASTER_DATA, 1 << CASCADE_IRQ),
    (SLAVE_DATA, CASCADE_IRQ),
    (MASTER_DATA, ICW4_8086_AEOI),
    (SLAVE_DATA, ICW4_8086_AEOI),
    (MASTER_DATA, 0xff),
    (SLAVE_DATA, 0xff),
];

#[cfg(target_os = "none")]
pub use imp::{forget_pending, init, unmask, wait_for_interrupt};

#[cfg(target_os = "none")]
mod imp {
    use core::{
        arch::{asm, global_asm},
        sync::atomic::{AtomicU16, Ordering},
    };

    use super::*;

    /// IRQ lines unmasked so far (bit `n` = IRQ `n`).
    static ENABLED: AtomicU16 = AtomicU16::new(0);

    // The handler of all 16 PIC vectors (the IDT's gates 32-47 point here). Auto-EOI mode
    // needs no end-of-interrupt write; taking the interrupt is all the waiting code needs
    // (its `hlt` returns).
    global_asm!(
        r#"
        .section .text.fnode_pic, "ax"
        .balign 16
        .global fnode_pic_irq
    fnode_pic_irq:
        iretq
        "#,
        options(att_syntax)
    );

    fn outb(port: u16, value: u8) {
        // SAFETY: the callers write only the PIC's command and data ports.
        unsafe {
            asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
        };
    }

    /// Programs both PICs (vectors from [`VECTOR_BASE`], auto-EOI, every line masked).
    /// Ten port writes; call once at boot, before any [`unmask`].
    pub fn init() {
        for (port, value) in INIT_SEQUENCE {
            outb(port, value);
        }
        ENABLED.store(0, Ordering::Relaxed);
    }

    /// Unmasks IRQ line `irq` (and the cascade line for a slave line). Returns false for a
    /// line the PIC does not have.
    pub fn unmask(irq: u32) -> bool {
        if irq >= u32::from(IRQ_LINES) {
            return false;
        }
        let enabled = ENABLED.load(Ordering::Relaxed) | 1 << irq;
        ENABLED.store(enabled, Ordering::Relaxed);
        let (master, slave) = masks(enabled);
        if irq >= 8 {
            outb(SLAVE_DATA, slave);
        }
        outb(MASTER_DATA, master);
        true
    }

    fn inb(port: u16) -> u8 {
        let value: u8;
        // SAFETY: the callers read only the PIC's command ports.
        unsafe {
            asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
        };
        value
    }

    /// The interrupt request register of both PICs (bit `n` = IRQ `n` waits to be taken).
    /// Two or four port accesses: not for a hot path.
    fn pending_lines() -> u16 {
        let enabled = ENABLED.load(Ordering::Relaxed);
        outb(MASTER_CMD, OCW3_READ_IRR);
        let mut irr = u16::from(inb(MASTER_CMD));
        if enabled & 0xff00 != 0 {
            outb(SLAVE_CMD, OCW3_READ_IRR);
            irr |= u16::from(inb(SLAVE_CMD)) << 8;
        }
        irr & enabled
    }

    /// Takes the interrupts waiting for the CPU, so that the next [`wait_for_interrupt`]
    /// halts until a new one arrives: for a state about to be snapshotted (a restored guest
    /// would otherwise wake at once for one its snapshotted self handled).
    ///
    /// An interrupt the host has already taken from the PIC for the CPU is delivered when
    /// the host next enters the guest with interrupts on: interrupts go on for one
    /// instruction that exits to the host (a port write to the PIC, harmless: it selects the
    /// request register for reading), which a host that emulates kernel code needs (it may
    /// not deliver interrupts between emulated instructions). One still in the PIC shows in
    /// its request register, and `hlt` takes it and returns at once. Three or four exits:
    /// not for a hot path. The caller's interrupt flag is restored.
    pub fn forget_pending() {
        // SAFETY: interrupts are on for the port write only (the instruction after `sti`
        // runs before any is taken, and one that is taken is taken right after it); the
        // handler only returns. The write selects the PIC's IRR for reads, which nothing
        // else reads. RFLAGS goes through the stack, balanced.
        unsafe {
            asm!("pushfq", "sti", "out dx, al", "popfq",
                 in("dx") MASTER_CMD, in("al") OCW3_READ_IRR, options(nomem))
        };
        if pending_lines() != 0 {
            wait_for_interrupt();
        }
    }

    /// Returns once an interrupt has arrived since the previous call: at once if one is
    /// waiting in the PIC (it arrived while interrupts were off), otherwise after halting
    /// the CPU until one does. Race-free: `sti; hlt` enables interrupts only for the `hlt`
    /// (the instruction after `sti` runs before any interrupt is taken). The caller's
    /// interrupt flag is restored. Four instructions: kernel code may be emulated one at a
    /// time, and this is on every request's path.
    #[inline(always)]
    pub fn wait_for_interrupt() {
        // SAFETY: halts until an interrupt, whose handler only returns; RFLAGS (the caller's
        // interrupt flag) goes through the stack, balanced.
        unsafe { asm!("pushfq", "sti", "hlt", "popfq", options(nomem)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_open_only_the_enabled_lines() {
        assert_eq!(masks(0), (0xff, 0xff));
        assert_eq!(masks(1 << 5), (0xdf, 0xff));
        assert_eq!(masks(1 << 5 | 1 << 6), (0x9f, 0xff));
        // A slave line needs the cascade line too.
        assert_eq!(masks(1 << 10), (0xfb, 0xfb));
    }

    #[test]
    fn init_sequence_programs_vectors_and_auto_eoi() {
        assert_eq!(INIT_SEQUENCE[2], (MASTER_DATA, 32));
        assert_eq!(INIT_SEQUENCE[3], (SLAVE_DATA, 40));
        assert!(INIT_SEQUENCE[6].1 & 0x02 != 0 && INIT_SEQUENCE[7].1 & 0x02 != 0);
    }
}
