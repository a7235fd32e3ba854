//! System calls from the function (`abi::user::sys`): the `syscall` entry and the calls
//! other than `NEXT` (which is [`crate::runloop`]'s).
//!
//! The entry switches to the trap stack (the one the CPU uses for exceptions from user mode:
//! both never nest), keeps the user stack pointer and return address in the `iretq` frame it
//! builds there, calls `dispatch`, clears the caller-saved
//! registers (no kernel values leak to user mode) and returns with `iretq` (`sysretq`
//! triple-faults on some hosts). It saves nothing else: `dispatch` is a Rust function, which
//! preserves the callee-saved registers the contract promises. That is 22 instructions around
//! the call; the kernel's code may be emulated one instruction at a time.
//!
//! The return address is the function's to choose (a jump to the entry sets `rcx` at will),
//! so the entry checks it lies in the identity map, where user memory is, before anything
//! else: `iretq` to a non-canonical address would raise #GP in the kernel. A bad one is the
//! function's fault, reported as a user-mode #GP at that address (the request in flight gets
//! an error frame, the VM ends).
//!
//! Every pointer from user mode is checked against user memory
//! ([`abi::user::in_user_memory`]) before the kernel touches it. The function is suspended
//! while the kernel runs (one CPU, interrupts off in user mode), so what is checked cannot
//! change before it is used.

use core::sync::atomic::{AtomicU64, Ordering};

use fnode_guest::abi::user::in_user_memory;

/// End of user memory, for pointer checks (set once, before the function runs).
static USER_END: AtomicU64 = AtomicU64::new(0);

/// A user buffer `[ptr, ptr + len)`, if it lies in user memory.
pub fn user_bytes(ptr: u64, len: u64) -> Option<&'static [u8]> {
    if len == 0 {
        return Some(&[]);
    }
    if !in_user_memory(USER_END.load(Ordering::Relaxed), ptr, len) {
        return None;
    }
    // SAFETY: the range is user memory, RAM in the identity map that the kernel does not use;
    // the function is suspended while the kernel looks at it.
    Some(unsafe { core::slice::from_raw_parts(ptr as *const u8, len as usize) })
}

/// A writable user buffer `[ptr, ptr + len)`, if it lies in user memory.
pub fn user_bytes_mut(ptr: u64, len: u64) -> Option<&'static mut [u8]> {
    if len == 0 {
        return Some(&mut []);
    }
    if !in_user_memory(USER_END.load(Ordering::Relaxed), ptr, len) {
        return None;
    }
    // SAFETY: as `user_bytes`; the kernel holds no other reference into user memory while a
    // system call writes to it.
    Some(unsafe { core::slice::from_raw_parts_mut(ptr as *mut u8, len as usize) })
}

/// Fills `buf` from `next` (a source of 64-bit random words); false if the source fails.
pub fn fill_random(buf: &mut [u8], mut next: impl FnMut() -> Option<u64>) -> bool {
    for chunk in buf.chunks_mut(8) {
        let Some(word) = next() else { return false };
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
    }
    true
}

#[cfg(target_os = "none")]
pub use imp::init;

#[cfg(target_os = "none")]
mod imp {
    use core::{
        arch::{asm, global_asm},
        sync::atomic::AtomicBool,
    };

    use fnode_guest::abi::{entropy, user::sys};

    use super::*;
    use crate::{gdt, runloop, serial};

    use crate::user::USER_RFLAGS;
    use crate::x86::{CPUID1_ECX_RDRAND, MSR_LSTAR, MSR_SFMASK, MSR_STAR};

    /// Flags `syscall` clears: TF, IF, DF, NT, AC. The kernel runs with interrupts off and
    /// the direction flag clear, whatever user mode left.
    const SFMASK: u64 = 1 << 8 | 1 << 9 | 1 << 10 | 1 << 14 | 1 << 18;

    /// Return addresses from system calls must lie below this: the identity map, which holds
    /// all of user memory (checked at build time). A compare with a sign-extended 32-bit
    /// immediate, so the bound must fit one.
    const RETURN_END: u64 = fnode_guest::abi::layout::IDENTITY_MAP_END;
    const _: () = assert!(RETURN_END <= i32::MAX as u64);

    /// Whether the CPU has `rdrand` (set once, before the function runs).
    static HAS_RDRAND: AtomicBool = AtomicBool::new(false);

    // Two ways in, one way out. `fnode_syscall_entry` is LSTAR: a `syscall` lands there at
    // CPL0 with the user's rsp, and switches to the trap stack (TSS.RSP0) to build the frame
    // `iretq` needs. Some hosts (a paravirtual KVM that emulates the guest kernel) jump to
    // LSTAR without leaving CPL3: the fetch from the supervisor page faults, and the CPU
    // delivers a #PF from user mode with rip = LSTAR on the same trap stack, the registers
    // still as `syscall` left them. The page fault stub recognises that case and turns the
    // fault's frame into the same `iretq` frame (return to rcx). A user program jumping to
    // LSTAR itself gains nothing a `syscall` would not give it. The stub clears the direction
    // flag first, as every exception entry does: a fault does not clear it (SFMASK does, for
    // a real `syscall`), user mode may have set it, and the kernel's copies assume it clear.
    global_asm!(
        r#"
        .section .text.fnode_syscall, "ax"
        .global fnode_syscall_entry
    fnode_syscall_entry:
        mov r11, rsp                    /* user rsp (r11's rflags are not kept) */
        lea rsp, [rip + fnode_trap_stack_top]
        push {user_ss}
        push r11
        push {rflags}
        push {user_cs}
        push rcx                        /* user rip */
    fnode_syscall_framed:
        /* The return address (rcx, also at [rsp]) must lie in the identity map, where all
           user memory is. A jump to LSTAR can hand the kernel any rcx, and `iretq` to a
           non-canonical one raises #GP in the kernel: refuse it as the function's fault. */
        cmp rcx, {return_end}
        jae fnode_syscall_bad_return
        sub rsp, 8                      /* 16-byte alignment at the call */
        mov rcx, rax                    /* dispatch(a0 = rdi, a1 = rsi, a2 = rdx, number) */
        call {dispatch}
        add rsp, 8
        xor ecx, ecx
        xor edx, edx
        xor esi, esi
        xor edi, edi
        xor r8d, r8d
        xor r9d, r9d
        xor r10d, r10d
        xor r11d, r11d
        iretq

        /* A bad return address: report a #GP (error code 0) at it, from user mode. The frame
           already is the CPU's (rip, cs, rflags, rsp, ss); the exception handler answers the
           request in flight and ends the VM, as for any user fault. */
    fnode_syscall_bad_return:
        push 0
        push {gp_vector}
        jmp fnode_exception_common

        /* IDT vector 14. Stack: error code, rip, cs, rflags, rsp, ss. */
        .global fnode_page_fault_entry
    fnode_page_fault_entry:
        cld                             /* user mode may have set DF; Rust code assumes it clear */
        cmp qword ptr [rsp + 8], offset fnode_syscall_entry
        jne 1f
        add rsp, 8                      /* drop the error code */
        mov [rsp], rcx                  /* return after the `syscall` */
        mov qword ptr [rsp + 16], {rflags}
        jmp fnode_syscall_framed
    1:
        push {page_fault_vector}
        jmp fnode_exception_common
        "#,
        user_ss = const gdt::USER_DATA_SELECTOR,
        user_cs = const gdt::USER_CODE_SELECTOR,
        rflags = const USER_RFLAGS,
        page_fault_vector = const crate::idt::PAGE_FAULT_VECTOR,
        gp_vector = const crate::idt::GENERAL_PROTECTION_VECTOR,
        return_end = const RETURN_END,
        dispatch = sym dispatch,
    );

    unsafe extern "C" {
        fn fnode_syscall_entry();
    }

    /// Points `syscall` at the entry and records user memory's end for pointer checks.
    pub fn init(user_end: u64) {
        USER_END.store(user_end, Ordering::Relaxed);
        let ecx = core::arch::x86_64::__cpuid(1).ecx;
        HAS_RDRAND.store(ecx & CPUID1_ECX_RDRAND != 0, Ordering::Relaxed);
        // SAFETY: STAR holds this GDT's selectors, LSTAR the entry above (which switches to its
        // own stack before touching memory), SFMASK clears IF on entry. EFER.SCE is set at boot.
        unsafe {
            wrmsr(MSR_STAR, gdt::STAR);
            wrmsr(MSR_LSTAR, fnode_syscall_entry as *const () as u64);
            wrmsr(MSR_SFMASK, SFMASK);
        }
    }

    /// # Safety
    /// Writing `msr` with `value` must be valid and keep the kernel's invariants.
    unsafe fn wrmsr(msr: u32, value: u64) {
        // SAFETY: the caller's contract.
        unsafe {
            asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
                 options(nostack, preserves_flags))
        };
    }

    /// The system call `number` with arguments `a0..a2`; its result goes to user `rax`.
    /// `NEXT`, the one call on every invocation, goes straight through; the others are
    /// out of line so that this function needs no stack frame.
    extern "sysv64" fn dispatch(a0: u64, a1: u64, a2: u64, number: u64) -> u64 {
        if number == sys::NEXT {
            return runloop::next(a0, a1, a2);
        }
        other(a0, a1, number)
    }

    #[inline(never)]
    fn other(a0: u64, a1: u64, number: u64) -> u64 {
        match number {
            sys::LOG => match user_bytes(a0, a1) {
                Some(text) => {
                    serial::write(text);
                    0
                }
                None => sys::EINVAL,
            },
            sys::RANDOM => random(a0, a1),
            sys::PANIC => runloop::panic(a0, a1),
            _ => sys::EINVAL,
        }
    }

    /// Random calls so far. Kernel memory: a restored or reset VM goes back to the
    /// snapshot's count, and the host's fresh seed is what makes its stream differ.
    static RANDOM_CALLS: AtomicU64 = AtomicU64::new(0);

    /// `random(ptr, len)`: `rdrand` XOR the stream keyed by the host's seed
    /// (`abi::entropy`), straight into the user buffer. Either source alone will do.
    fn random(ptr: u64, len: u64) -> u64 {
        let has_rdrand = HAS_RDRAND.load(Ordering::Relaxed);
        let seed = host_seed();
        if len > sys::RANDOM_MAX || (!has_rdrand && seed.is_none()) {
            return sys::EINVAL;
        }
        let Some(buf) = user_bytes_mut(ptr, len) else {
            return sys::EINVAL;
        };
        let counter = RANDOM_CALLS.fetch_add(1, Ordering::Relaxed);
        let mut index = 0;
        let ok = fill_random(buf, || {
            let hw = if has_rdrand { rdrand()? } else { 0 };
            let host = seed.map_or(0, |s| s.word(counter, index));
            index += 1;
            Some(hw ^ host)
        });
        if ok {
            len
        } else {
            sys::EINVAL
        }
    }

    /// The seed the VMM wrote at `abi::entropy::ADDR`, if there is one.
    fn host_seed() -> Option<entropy::Seed> {
        // SAFETY: ADDR is VMM boot data in RAM below the kernel, inside the identity map,
        // which the kernel only reads; a volatile read because the VMM rewrites it between
        // runs of the guest.
        let bytes = unsafe { core::ptr::read_volatile(entropy::ADDR as *const [u8; entropy::LEN]) };
        entropy::Seed::decode(&bytes)
    }

    /// One `rdrand`, retried a few times as Intel advises for a transient underflow.
    fn rdrand() -> Option<u64> {
        for _ in 0..10 {
            let (value, ok): (u64, u8);
            // SAFETY: rdrand writes only its output register and the flags; the CPU has it.
            unsafe {
                asm!("rdrand {v}", "setc {ok}", v = out(reg) value, ok = out(reg_byte) ok,
                     options(nomem, nostack))
            };
            if ok != 0 {
                return Some(value);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_random_covers_partial_words_and_reports_failure() {
        let mut buf = [0u8; 13];
        let mut words = [0x0807_0605_0403_0201u64, 0x100f_0e0d_0c0b_0a09].into_iter();
        assert!(fill_random(&mut buf, || words.next()));
        assert_eq!(buf, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]);
        assert!(!fill_random(&mut buf, || None));
    }

    #[test]
    fn user_pointers_are_checked() {
        use fnode_guest::abi::user::USER_START;
        // Before init, user memory is empty: nothing but empty buffers passes.
        assert_eq!(user_bytes(USER_START, 0), Some(&[][..]));
        assert!(user_bytes(USER_START, 1).is_none());
        assert!(user_bytes_mut(USER_START, 1).is_none());
        assert!(user_bytes(0x1000, 8).is_none());
    }
}
