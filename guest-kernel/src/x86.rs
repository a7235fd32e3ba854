//! Architectural x86-64 constants the kernel uses: page-table entry bits, control-register
//! bits, MSR numbers and CPUID feature bits. Named once here; fnode's own values (selectors,
//! layout) live in `gdt` and in `abi`.

/// Page-table entry: present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Page-table entry: writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// Page-table entry: user-accessible (CPL3).
pub const PTE_USER: u64 = 1 << 2;
/// Page-table entry: write-through caching.
pub const PTE_WRITE_THROUGH: u64 = 1 << 3;
/// Page-table entry: caching disabled.
pub const PTE_CACHE_DISABLE: u64 = 1 << 4;
/// Page-directory entry: a 2 MiB page, not a pointer to a page table.
pub const PTE_HUGE: u64 = 1 << 7;
/// The physical-address bits of a page-table entry.
pub const PTE_ADDR: u64 = 0x000f_ffff_ffff_f000;
/// Size of a huge (2 MiB) page.
pub const HUGE_PAGE: u64 = 2 << 20;

/// CR0.MP: `wait`/`fwait` honour TS.
pub const CR0_MP: u64 = 1 << 1;
/// CR0.EM: x87 emulation (must be clear for SSE).
pub const CR0_EM: u64 = 1 << 2;
/// CR0.TS: task switched (lazy FPU); kept clear.
pub const CR0_TS: u64 = 1 << 3;
/// CR0.PG: paging.
pub const CR0_PG: u32 = 1 << 31;
/// CR4.PAE: physical address extension (needed for long mode).
pub const CR4_PAE: u32 = 1 << 5;
/// CR4.OSFXSR: the OS saves SSE state with `fxsave` (enables SSE).
pub const CR4_OSFXSR: u64 = 1 << 9;
/// CR4.OSXMMEXCPT: the OS handles SIMD floating-point exceptions.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;
/// CR4.SMEP: the kernel cannot execute user pages.
pub const CR4_SMEP: u64 = 1 << 20;

/// IA32_EFER.
pub const MSR_EFER: u32 = 0xc000_0080;
/// EFER.SCE: `syscall` enabled.
pub const EFER_SCE: u32 = 1 << 0;
/// EFER.LME: long mode enabled.
pub const EFER_LME: u32 = 1 << 8;
/// IA32_STAR: `syscall`/`sysret` segment selectors.
pub const MSR_STAR: u32 = 0xc000_0081;
/// IA32_LSTAR: the 64-bit `syscall` entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// IA32_FMASK: rflags bits `syscall` clears.
pub const MSR_SFMASK: u32 = 0xc000_0084;

/// CPUID.1:ECX bit 30: `rdrand`.
pub const CPUID1_ECX_RDRAND: u32 = 1 << 30;
/// CPUID.(EAX=7,ECX=0):EBX bit 7: SMEP.
pub const CPUID7_EBX_SMEP: u32 = 1 << 7;
