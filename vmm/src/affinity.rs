//! Which CPUs build VMs and which run them.
//!
//! Building a VM waits for KVM's SRCU grace periods: one per memory slot, several for the
//! in-kernel irqchip. A new VM's SRCU structures start in their small form, which queues
//! every grace period's callbacks on the boot CPU (Linux's `get_boot_cpu_id()`, CPU 0 on
//! x86). A thread building on another CPU therefore waits for a worker on the boot CPU and
//! for a cross-CPU wake-up per grace period: on the machines fnode is developed on (a VM
//! whose idle cores halt) that is 50–60 µs more for the memory slot and 60 µs more for the
//! irqchip, measured with a small kvm-ioctls program pinned to each CPU in turn (slot 54 vs
//! 110 µs, irqchip 9 vs 65–71 µs). Moving a thread there and back around those calls costs
//! as much as it saves; living there does not.
//!
//! [`build_on_boot_cpu`] keeps the calling thread (the one that restores or builds VMs) on
//! the boot CPU. Threads fnode starts afterwards (vCPU threads, the device loop) call
//! [`run_anywhere`] first, so they do not inherit that pin: guests still run on every CPU
//! the process may use.

use std::sync::OnceLock;

/// The boot CPU, where small SRCU structures run their callbacks (x86 Linux boots on CPU 0).
pub const BOOT_CPU: usize = 0;

/// Errors of [`build_on_boot_cpu`].
#[derive(Debug, thiserror::Error)]
pub enum AffinityError {
    /// `sched_getaffinity` or `sched_setaffinity` failed.
    #[error("cannot read or set the thread's CPU affinity")]
    Syscall(#[source] std::io::Error),
}

/// What [`build_on_boot_cpu`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildCpu {
    /// The calling thread now runs on the boot CPU only.
    Pinned,
    /// Left as it was: the process may not use the boot CPU, or it has a single CPU.
    Unchanged,
}

/// The CPUs the process could use before a thread was pinned, restored by [`run_anywhere`].
static PROCESS_CPUS: OnceLock<libc::cpu_set_t> = OnceLock::new();

/// Pins the calling thread to the boot CPU when the process may use it and at least one
/// other CPU (see the module docs for why VMs are built there). Calling it again, after
/// [`run_anywhere`], pins again (moving the thread if it left the boot CPU).
pub fn build_on_boot_cpu() -> Result<BuildCpu, AffinityError> {
    let current = match PROCESS_CPUS.get() {
        Some(cpus) => *cpus,
        None => get()?,
    };
    // SAFETY: CPU_ISSET and CPU_COUNT only read the set, which is initialised.
    let (has_boot, count) = unsafe {
        (
            libc::CPU_ISSET(BOOT_CPU, &current),
            libc::CPU_COUNT(&current),
        )
    };
    if !has_boot || count < 2 {
        return Ok(BuildCpu::Unchanged);
    }
    let _ = PROCESS_CPUS.set(current);
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut boot: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: BOOT_CPU is below CPU_SETSIZE.
    unsafe { libc::CPU_SET(BOOT_CPU, &mut boot) };
    set(&boot)?;
    Ok(BuildCpu::Pinned)
}

/// Undoes, for the calling thread, a pin it inherited from a thread that called
/// [`build_on_boot_cpu`] (or that pin itself); does nothing when no thread pinned. Best
/// effort: a thread that keeps the pin still works, only on fewer CPUs.
pub fn run_anywhere() {
    if let Some(cpus) = PROCESS_CPUS.get() {
        let _ = set(cpus);
    }
}

/// Keeps the calling thread, background work fnode starts itself, off the CPU a thread
/// pinned with [`build_on_boot_cpu`] builds on: it would otherwise be woken there and
/// hold the builder up. Runs anywhere when no thread pinned. Best effort, as
/// [`run_anywhere`].
pub fn stay_off_build_cpu() {
    if let Some(cpus) = PROCESS_CPUS.get() {
        let mut others = *cpus;
        // SAFETY: BOOT_CPU is below CPU_SETSIZE; `others` is initialised.
        unsafe { libc::CPU_CLR(BOOT_CPU, &mut others) };
        let _ = set(&others);
    }
}

fn get() -> Result<libc::cpu_set_t, AffinityError> {
    // SAFETY: an all-zero cpu_set_t is a valid (empty) set for the kernel to fill.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a writable cpu_set_t of the size passed; 0 is the calling thread.
    let r = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if r != 0 {
        return Err(AffinityError::Syscall(std::io::Error::last_os_error()));
    }
    Ok(set)
}

fn set(cpus: &libc::cpu_set_t) -> Result<(), AffinityError> {
    // SAFETY: `cpus` is a valid cpu_set_t of the size passed; 0 is the calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), cpus) };
    if r != 0 {
        return Err(AffinityError::Syscall(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_thread_runs_on_the_boot_cpu_and_its_children_do_not_stay_pinned() {
        std::thread::spawn(|| {
            let before = get().unwrap();
            let what = build_on_boot_cpu().unwrap();
            let now = get().unwrap();
            // SAFETY: CPU_COUNT and CPU_ISSET only read initialised sets.
            unsafe {
                match what {
                    BuildCpu::Pinned => {
                        assert_eq!(libc::CPU_COUNT(&now), 1);
                        assert!(libc::CPU_ISSET(BOOT_CPU, &now));
                        let child = std::thread::spawn(|| {
                            run_anywhere();
                            get().unwrap()
                        })
                        .join()
                        .unwrap();
                        assert_eq!(libc::CPU_COUNT(&child), libc::CPU_COUNT(&before));
                    }
                    BuildCpu::Unchanged => {
                        assert_eq!(libc::CPU_COUNT(&now), libc::CPU_COUNT(&before))
                    }
                }
            }
        })
        .join()
        .unwrap();
    }
}
