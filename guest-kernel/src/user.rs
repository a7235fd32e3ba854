//! User mode: finding the function in the image, opening user memory to it, and entering it
//! at CPL3.
//!
//! A function image carries the function's ELF at [`IMAGE_START`], starting with a
//! [`UserHeader`] (`fnode build` puts it there). [`find`] reads and checks the header against
//! the RAM that holds user memory and lays the function out ([`Layout`]); [`prepare`] sets
//! the U bit on the 2 MiB pages of `[USER_START, user_end)` (kernel memory below stays
//! supervisor-only; RAM's end rounds down, so no user page reaches past RAM), enables SSE for
//! user code and SMEP, and points `syscall` at [`crate::syscall`]'s entry; [`enter`] writes
//! the [`UserStart`](abi::user::UserStart) and `iretq`s to the entry point. The kernel never
//! comes back to the caller: from then on it runs only on system calls and exceptions.

use fnode_guest::abi::user::{
    Layout, LayoutError, UserHeader, HEADER_LEN, IMAGE_START, USER_START,
};

use crate::pvh::MemoryMap;

/// Why a function image cannot run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    /// The header is there, its layout is not valid for this VM.
    #[error("the function image cannot run: {0}")]
    Layout(LayoutError),
    /// The boot page tables are not the 2 MiB identity map the kernel builds.
    #[error("the page table entry for {0:#x} is not a present 2 MiB page")]
    PageTables(u64),
}

/// The function in this image, if there is one: its layout in a RAM region `ram_end` long,
/// from the header bytes at [`IMAGE_START`] (`None`: not a function, no magic there).
pub fn layout(header: &[u8; HEADER_LEN], ram_end: u64) -> Result<Option<Layout>, UserError> {
    let Some(header) = UserHeader::decode(header) else {
        return Ok(None);
    };
    Layout::new(&header, ram_end)
        .map(Some)
        .map_err(UserError::Layout)
}

/// The end of the RAM region holding user memory, if RAM reaches past the header.
pub fn user_ram_end(memory: &MemoryMap) -> Option<u64> {
    let ram = memory.ram_containing(USER_START)?;
    (ram.end() >= IMAGE_START + HEADER_LEN as u64).then(|| ram.end())
}

#[cfg(target_os = "none")]
pub use imp::{enter, find, prepare};

/// `rflags` in user mode, on entry and on every return from a system call: interrupts off
/// (nothing preempts the function), IOPL 0.
pub const USER_RFLAGS: u64 = 0x2;

#[cfg(target_os = "none")]
mod imp {
    use core::arch::{asm, global_asm};

    use fnode_guest::abi::{self, user::USER_PAGE_SIZE};

    use super::*;
    use crate::gdt;

    use crate::x86::{
        CPUID7_EBX_SMEP, CR0_EM, CR0_MP, CR0_TS, CR4_OSFXSR, CR4_OSXMMEXCPT, CR4_SMEP, PTE_ADDR,
        PTE_HUGE, PTE_PRESENT, PTE_USER,
    };

    /// Reads the function's header from the image and lays it out (see [`super::layout`]).
    pub fn find(memory: &MemoryMap) -> Result<Option<Layout>, UserError> {
        let Some(ram_end) = user_ram_end(memory) else {
            return Ok(None);
        };
        let mut header = [0u8; HEADER_LEN];
        // SAFETY: [IMAGE_START, +HEADER_LEN) is RAM (checked above) inside the identity map;
        // the function has not run yet, so nothing writes it concurrently.
        unsafe {
            core::ptr::copy_nonoverlapping(
                IMAGE_START as *const u8,
                header.as_mut_ptr(),
                HEADER_LEN,
            )
        };
        layout(&header, ram_end)
    }

    /// Opens `[USER_START, layout.user_end)` to user mode and sets up the CPU for it.
    pub fn prepare(layout: &Layout) -> Result<(), UserError> {
        // SAFETY: the boot page tables are the live identity map; setting U on the PML4 and
        // PDPT entries of the first GiB grants nothing by itself, and on the PD entries only
        // for user memory, which the kernel does not use (its image, heap and stacks lie below
        // USER_START). CR3 is reloaded afterwards.
        unsafe { open_user_pages(USER_START, layout.user_end) }?;
        // SAFETY: enabling SSE (the kernel itself never uses it), and SMEP where the CPU has
        // it (the kernel never executes user pages) change nothing the kernel relies on.
        unsafe { enable_cpu_features() };
        crate::syscall::init(layout.user_end);
        Ok(())
    }

    /// Sets the U bit on the 2 MiB pages of `[start, end)` and all the tables above them.
    ///
    /// # Safety
    /// `[start, end)` is memory the kernel does not use; CR3 holds the boot page tables.
    unsafe fn open_user_pages(start: u64, end: u64) -> Result<(), UserError> {
        let cr3: u64;
        // SAFETY: reading CR3 has no side effects.
        unsafe { asm!("mov {}, cr3", out(reg) cr3, options(nomem, nostack, preserves_flags)) };
        let pml4 = (cr3 & PTE_ADDR) as *mut u64;
        let mut page = start;
        while page < end {
            let (l4, l3, l2) = ((page >> 39) & 511, (page >> 30) & 511, (page >> 21) & 511);
            // SAFETY: the tables are the kernel's own, identity-mapped, 512 entries each; the
            // indices are 9-bit.
            unsafe {
                let l4e = pml4.add(l4 as usize);
                if *l4e & PTE_PRESENT == 0 {
                    return Err(UserError::PageTables(page));
                }
                *l4e |= PTE_USER;
                let l3e = ((*l4e & PTE_ADDR) as *mut u64).add(l3 as usize);
                if *l3e & (PTE_PRESENT | PTE_HUGE) != PTE_PRESENT {
                    return Err(UserError::PageTables(page));
                }
                *l3e |= PTE_USER;
                let pd = (*l3e & PTE_ADDR) as *mut u64;
                // The rest of this GiB in one tight loop: boot-time kernel code is emulated
                // instruction by instruction on some hosts.
                let last = if (end - 1) >> 30 == page >> 30 {
                    ((end - 1) >> 21) & 511
                } else {
                    511
                };
                for i in l2..=last {
                    let e = pd.add(i as usize);
                    if *e & (PTE_PRESENT | PTE_HUGE) != PTE_PRESENT | PTE_HUGE {
                        return Err(UserError::PageTables(page + (i - l2) * USER_PAGE_SIZE));
                    }
                    *e |= PTE_USER;
                }
                page += (last - l2 + 1) * USER_PAGE_SIZE;
            }
        }
        // SAFETY: reloading CR3 with its own value flushes the TLB; the tables stay valid.
        unsafe { asm!("mov cr3, {}", in(reg) cr3, options(nostack, preserves_flags)) };
        Ok(())
    }

    /// SSE for user code (CR0.EM off, CR0.MP on, CR4.OSFXSR/OSXMMEXCPT), SMEP if present.
    ///
    /// # Safety
    /// The kernel never uses SSE and never executes user pages.
    unsafe fn enable_cpu_features() {
        let max_leaf = core::arch::x86_64::__cpuid(0).eax;
        let smep =
            max_leaf >= 7 && core::arch::x86_64::__cpuid_count(7, 0).ebx & CPUID7_EBX_SMEP != 0;
        // SAFETY: the caller's contract; the bits are architectural and the CPU has them.
        unsafe {
            asm!(
                "mov {t}, cr0",
                "and {t}, {cr0_clear}",
                "or {t}, {cr0_set}",
                "mov cr0, {t}",
                "mov {t}, cr4",
                "or {t}, {cr4_set}",
                "mov cr4, {t}",
                t = out(reg) _,
                cr0_clear = in(reg) !(CR0_EM | CR0_TS),
                cr0_set = in(reg) CR0_MP,
                cr4_set = in(reg) CR4_OSFXSR | CR4_OSXMMEXCPT | if smep { CR4_SMEP } else { 0 },
                options(nostack, preserves_flags),
            )
        };
    }

    // Enters the function: an interrupt frame for CPL3 (user SS:RSP, rflags, user CS:RIP),
    // every register but rdi (&UserStart) cleared, `iretq`. rdi = entry, rsi = &UserStart.
    global_asm!(
        r#"
        .section .text.fnode_enter_user, "ax"
    fnode_enter_user:
        push {user_ss}
        push {entry_rsp}
        push {rflags}
        push {user_cs}
        push rdi
        mov rdi, rsi
        xor eax, eax
        xor ebx, ebx
        xor ecx, ecx
        xor edx, edx
        xor esi, esi
        xor ebp, ebp
        xor r8d, r8d
        xor r9d, r9d
        xor r10d, r10d
        xor r11d, r11d
        xor r12d, r12d
        xor r13d, r13d
        xor r14d, r14d
        xor r15d, r15d
        iretq
        "#,
        user_ss = const gdt::USER_DATA_SELECTOR,
        user_cs = const gdt::USER_CODE_SELECTOR,
        entry_rsp = const abi::user::ENTRY_RSP,
        rflags = const USER_RFLAGS,
    );

    unsafe extern "C" {
        fn fnode_enter_user(entry: u64, start: u64) -> !;
    }

    /// Writes the [`UserStart`](abi::user::UserStart) and enters the function in user mode.
    pub fn enter(layout: &Layout) -> ! {
        // SAFETY: START_ADDR lies in user memory (the top of the user stack), RAM the kernel
        // does not use, 16-byte aligned.
        unsafe {
            core::ptr::write_volatile(
                abi::user::START_ADDR as *mut abi::user::UserStart,
                layout.start(),
            )
        };
        // SAFETY: `prepare` opened user memory and set up `syscall`; the entry point lies in
        // the function's image (Layout checked it); the function runs at CPL3 and can reach
        // the kernel only through `syscall` and exceptions.
        unsafe { fnode_enter_user(layout.entry, abi::user::START_ADDR) }
    }
}

#[cfg(test)]
mod tests {
    use fnode_guest::abi;

    use super::*;

    fn header(entry: u64, image_end: u64) -> [u8; HEADER_LEN] {
        UserHeader {
            magic: abi::user::HEADER_MAGIC,
            entry,
            image_end,
        }
        .encode()
    }

    #[test]
    fn no_magic_is_no_function() {
        assert_eq!(layout(&[0; HEADER_LEN], 64 << 20), Ok(None));
        assert_eq!(layout(&[0xff; HEADER_LEN], 64 << 20), Ok(None));
    }

    #[test]
    fn valid_headers_lay_out_and_bad_ones_are_rejected() {
        let l = layout(
            &header(IMAGE_START + 0x1000, IMAGE_START + 0x4000),
            64 << 20,
        )
        .unwrap()
        .unwrap();
        assert_eq!(l.user_end, 64 << 20);
        assert_eq!(l.entry, IMAGE_START + 0x1000);
        assert!(matches!(
            layout(
                &header(IMAGE_START + 0x9000, IMAGE_START + 0x4000),
                64 << 20
            ),
            Err(UserError::Layout(LayoutError::BadEntry(_)))
        ));
        assert!(matches!(
            layout(
                &header(IMAGE_START + 0x1000, IMAGE_START + 0x4000),
                16 << 20
            ),
            Err(UserError::Layout(LayoutError::MemoryTooSmall { .. }))
        ));
    }
}
