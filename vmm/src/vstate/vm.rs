//! The KVM VM: `KVM_CREATE_VM`, the TSS address, the in-kernel irqchip, guest memory slots
//! and irqfds. Each step is its own call so the builder can time them separately.

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::memory::GuestMemory;

/// Where KVM puts the three-page TSS that Intel hosts need for real-mode emulation: just
/// below the 4 GiB boundary, far above the largest fnode guest memory
/// (`abi::layout::MAX_MEM_MIB`) and clear of the MMIO device window. Firecracker and Cloud
/// Hypervisor use the same address.
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;

/// Errors creating and configuring a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `KVM_CREATE_VM` failed.
    #[error("KVM_CREATE_VM failed")]
    Create(#[source] kvm_ioctls::Error),
    /// `KVM_SET_TSS_ADDR` failed.
    #[error("KVM_SET_TSS_ADDR failed")]
    SetTssAddress(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_IRQCHIP` failed.
    #[error("KVM_CREATE_IRQCHIP failed")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    /// `KVM_CREATE_PIT2` failed.
    #[error("KVM_CREATE_PIT2 failed")]
    CreatePit(#[source] kvm_ioctls::Error),
    /// `KVM_SET_USER_MEMORY_REGION` failed.
    #[error("KVM_SET_USER_MEMORY_REGION failed for slot {slot}")]
    SetMemory {
        /// The memory slot.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory was registered twice.
    /// `KVM_GET_DIRTY_LOG` failed.
    #[error("KVM_GET_DIRTY_LOG failed for slot {slot}")]
    DirtyLog {
        /// The slot.
        slot: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("guest memory is already registered with this VM")]
    MemoryAlreadyRegistered,
    /// `KVM_IRQFD` failed.
    #[error("KVM_IRQFD for IRQ {irq} failed")]
    Irqfd {
        /// The guest IRQ line.
        irq: u32,
        /// The ioctl error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A KVM VM and the guest memory registered with it.
#[derive(Debug)]
pub struct Vm {
    // Field order matters: the VM fd (and with it KVM's use of the memory slots) goes
    // before the memory mapping is released.
    fd: VmFd,
    memory: Option<GuestMemory>,
}

impl Vm {
    /// `KVM_CREATE_VM`, nothing else.
    pub fn create(kvm: &Kvm) -> Result<Self, VmError> {
        // KVM_CREATE_VM creates nothing when it fails, so an interrupted call is simply
        // made again (seen on hosts where another thread's VM teardown or io_uring work
        // leaves a notification pending on this one).
        const EINTR_RETRIES: u32 = 3;
        let mut tries = 0;
        let fd = loop {
            match kvm.create_vm() {
                Err(e) if e.errno() == libc::EINTR && tries < EINTR_RETRIES => tries += 1,
                other => break other.map_err(VmError::Create)?,
            }
        };
        Ok(Vm { fd, memory: None })
    }

    /// The x86 setup every fnode VM needs before its vCPUs are created: the TSS address and
    /// the in-kernel irqchip (PIC, IOAPIC and one LAPIC per vCPU).
    pub fn setup_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(VmError::SetTssAddress)?;
        self.fd.create_irq_chip().map_err(VmError::CreateIrqchip)
    }

    /// Sets only the TSS address (for a VM without an irqchip, like the floor benchmark).
    pub fn set_tss_address(&self) -> Result<(), VmError> {
        self.fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(VmError::SetTssAddress)
    }

    /// The in-kernel i8254 PIT. fnode guests keep time with the TSC and do not need it;
    /// it is here for guests that do.
    pub fn create_pit(&self) -> Result<(), VmError> {
        let config = kvm_pit_config {
            // The PC speaker port is a dummy: the guest's writes to it never exit.
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(config).map_err(VmError::CreatePit)
    }

    /// Registers every region of `memory` as a KVM memory slot (slot `i` for region `i`) and
    /// keeps a handle on the memory so it outlives the slots.
    pub fn register_memory(&mut self, memory: &GuestMemory) -> Result<(), VmError> {
        self.register_memory_logged(memory, false)
    }

    /// [`Vm::register_memory`], with KVM's dirty page logging on every slot if `log_dirty`
    /// (`KVM_MEM_LOG_DIRTY_PAGES`: [`Vm::take_dirty_log`] then says which pages the guest
    /// wrote; an in-place reset puts back only those).
    pub fn register_memory_logged(
        &mut self,
        memory: &GuestMemory,
        log_dirty: bool,
    ) -> Result<(), VmError> {
        if self.memory.is_some() {
            return Err(VmError::MemoryAlreadyRegistered);
        }
        for (slot, region) in (0u32..).zip(memory.iter()) {
            let slot_def = kvm_userspace_memory_region {
                slot,
                flags: if log_dirty {
                    KVM_MEM_LOG_DIRTY_PAGES
                } else {
                    0
                },
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping of `memory_size` bytes; `self` keeps a clone
            // of `memory` (which holds the mapping) and drops it only after the VM fd, so KVM
            // never sees the mapping go away while the slot exists. Regions of one
            // GuestMemory do not overlap, so neither do the slots.
            unsafe { self.fd.set_user_memory_region(slot_def) }
                .map_err(|source| VmError::SetMemory { slot, source })?;
        }
        self.memory = Some(memory.clone());
        Ok(())
    }

    /// Routes `evt` to guest IRQ line `irq` (`KVM_IRQFD`): writing the eventfd raises the IRQ
    /// without a trip through the VMM.
    /// The dirty page bitmap of memory slot `slot` (`size` bytes long) since the last call:
    /// bit `i` of word `i / 64` set if the guest wrote page `i` (`KVM_GET_DIRTY_LOG`, which
    /// clears the log). The slot must have been registered with dirty logging.
    pub fn take_dirty_log(&self, slot: u32, size: usize) -> Result<Vec<u64>, VmError> {
        self.fd
            .get_dirty_log(slot, size)
            .map_err(|source| VmError::DirtyLog { slot, source })
    }

    pub fn register_irqfd(&self, evt: &EventFd, irq: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(evt, irq)
            .map_err(|source| VmError::Irqfd { irq, source })
    }

    /// The KVM VM fd (for devices that register ioeventfds and irqfds).
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The guest memory registered with this VM, if any.
    pub fn memory(&self) -> Option<&GuestMemory> {
        self.memory.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kvm::{test_support::require_kvm, KvmContext};
    use crate::vstate::memory::{self, MemoryBacking};

    #[test]
    fn create_vm_with_irqchip_and_memory() {
        if !require_kvm() {
            return;
        }
        let ctx = KvmContext::new().unwrap();
        let mut vm = Vm::create(ctx.kvm()).unwrap();
        vm.setup_irqchip().unwrap();
        let mem = memory::create(16 << 20, MemoryBacking::Anonymous).unwrap();
        vm.register_memory(&mem).unwrap();
        assert!(matches!(
            vm.register_memory(&mem),
            Err(VmError::MemoryAlreadyRegistered)
        ));
        assert!(vm.memory().is_some());
    }
}
