//! Saving and restoring what KVM holds for the VM as a whole: the in-kernel irqchip (both
//! PICs and the IOAPIC), the PIT when the VM has one, and the KVM clock.
//!
//! Like the vCPU's, reading this state is a series of ioctls that can fail: a fallible
//! [`Vm::save_state`], and [`Vm::restore_state`] on a VM built up to its irqchip (the
//! [`fnode_snapshot::Persist`] shape, with the new VM as the live resource).

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use serde::{Deserialize, Serialize};

use super::vm::{Vm, VmError};

/// The VM-wide state a snapshot keeps.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// The slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC (redirection table, pending lines).
    pub ioapic: kvm_irqchip,
    /// The i8254 PIT, if the VM has one.
    pub pit: Option<kvm_pit_state2>,
    /// The KVM clock (`kvmclock`'s time base).
    pub clock: kvm_clock_data,
}

/// Errors saving or restoring the VM-wide state.
#[derive(Debug, thiserror::Error)]
pub enum VmPersistError {
    /// An ioctl failed.
    #[error("{0} failed")]
    Ioctl(&'static str, #[source] kvm_ioctls::Error),
    /// The PIT could not be created.
    #[error("cannot create the PIT the snapshot has")]
    CreatePit(#[source] VmError),
}

/// The irqchip ids, in the order [`VmState`] keeps them.
const CHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl Vm {
    /// Reads the irqchip, PIT and clock state out of KVM.
    pub fn save_state(&self) -> Result<VmState, VmPersistError> {
        let fd = self.fd();
        let mut chips = CHIPS.map(|chip_id| kvm_irqchip {
            chip_id,
            ..Default::default()
        });
        for chip in &mut chips {
            fd.get_irqchip(chip)
                .map_err(|e| VmPersistError::Ioctl("KVM_GET_IRQCHIP", e))?;
        }
        let pit = match fd.get_pit2() {
            Ok(pit) => Some(pit),
            // ENXIO: the VM has no PIT (fnode's builder creates none).
            Err(e) if e.errno() == libc::ENXIO => None,
            Err(e) => return Err(VmPersistError::Ioctl("KVM_GET_PIT2", e)),
        };
        let clock = fd
            .get_clock()
            .map_err(|e| VmPersistError::Ioctl("KVM_GET_CLOCK", e))?;
        let [pic_master, pic_slave, ioapic] = chips;
        Ok(VmState {
            pic_master,
            pic_slave,
            ioapic,
            pit,
            clock,
        })
    }

    /// Sets `state` on this VM, whose irqchip exists ([`Vm::setup_irqchip`]) and whose vCPUs
    /// do not exist yet.
    pub fn restore_state(&self, state: &VmState) -> Result<(), VmPersistError> {
        let fd = self.fd();
        // The chip ids come from the position, not from the (untrusted) saved structs.
        for (chip_id, saved) in
            CHIPS
                .into_iter()
                .zip([&state.pic_master, &state.pic_slave, &state.ioapic])
        {
            let chip = kvm_irqchip { chip_id, ..*saved };
            fd.set_irqchip(&chip)
                .map_err(|e| VmPersistError::Ioctl("KVM_SET_IRQCHIP", e))?;
        }
        if let Some(pit) = &state.pit {
            match self.create_pit() {
                // A VM that has its PIT already (restoring into a used VM) keeps it.
                Err(VmError::CreatePit(e)) if e.errno() == libc::EEXIST => {}
                other => other.map_err(VmPersistError::CreatePit)?,
            }
            fd.set_pit2(pit)
                .map_err(|e| VmPersistError::Ioctl("KVM_SET_PIT2", e))?;
        }
        // Only the clock value goes back: the flags KVM_GET_CLOCK reports (TSC stable,
        // realtime) describe the host it was read on and are refused by KVM_SET_CLOCK.
        let clock = kvm_clock_data {
            clock: state.clock.clock,
            ..Default::default()
        };
        fd.set_clock(&clock)
            .map_err(|e| VmPersistError::Ioctl("KVM_SET_CLOCK", e))
    }
}

#[cfg(test)]
mod tests {
    use fnode_snapshot::state_file;

    use super::*;
    use crate::kvm::{test_support::require_kvm, KvmContext};

    fn vm(kvm: &KvmContext) -> Vm {
        let vm = Vm::create(kvm.kvm()).unwrap();
        vm.setup_irqchip().unwrap();
        vm
    }

    #[test]
    fn save_restore_round_trip() {
        if !require_kvm() {
            return;
        }
        let kvm = KvmContext::new().unwrap();
        let a = vm(&kvm);
        a.create_pit().unwrap();
        // Mask an IOAPIC pin so the state is not the reset state.
        let mut saved = a.save_state().unwrap();
        // SAFETY: reading the IOAPIC member of the union KVM filled for KVM_IRQCHIP_IOAPIC;
        // it is plain integers.
        let ioapic = unsafe { &mut saved.ioapic.chip.ioapic };
        ioapic.id = 0x0300_0000;
        a.restore_state(&saved).unwrap();
        let saved = a.save_state().unwrap();
        assert!(saved.pit.is_some());

        let path = std::path::Path::new("state");
        let bytes = state_file::encode(crate::persist::FORMAT, &saved).unwrap();
        let decoded: VmState = state_file::decode(path, &bytes, crate::persist::FORMAT).unwrap();
        let b = vm(&kvm);
        b.restore_state(&decoded).unwrap();
        let again = b.save_state().unwrap();
        // SAFETY: as above, the IOAPIC member of an IOAPIC chip.
        let (x, y) = unsafe { (again.ioapic.chip.ioapic, saved.ioapic.chip.ioapic) };
        assert_eq!(x.id, 0x0300_0000);
        assert_eq!(x.id, y.id);
        // SAFETY: the PIC member of the master PIC chip.
        let (p, q) = unsafe { (again.pic_master.chip.pic, saved.pic_master.chip.pic) };
        assert_eq!(p.imr, q.imr);
        assert!(again.pit.is_some());
        // The clock goes on from the saved value.
        assert!(again.clock.clock >= saved.clock.clock);
    }

    #[test]
    fn a_vm_without_pit_saves_none() {
        if !require_kvm() {
            return;
        }
        let kvm = KvmContext::new().unwrap();
        let saved = vm(&kvm).save_state().unwrap();
        assert!(saved.pit.is_none());
        vm(&kvm).restore_state(&saved).unwrap();
    }
}
