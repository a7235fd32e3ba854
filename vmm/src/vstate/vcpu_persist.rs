//! Saving and restoring a vCPU: everything KVM holds for it.
//!
//! [`VcpuState`] is what a snapshot keeps of one vCPU: general and special registers, the
//! XSAVE area (x87, SSE, AVX...), XCR0, the MSRs KVM can save (TSC included), the local APIC,
//! pending events, the MP state, the debug registers, the CPUID the guest saw and the TSC
//! frequency. The KVM structures are kept as they are (kvm-bindings serialises them as their
//! bytes): they are plain C data, and copying them field by field would only add ways to
//! drop one.
//!
//! Reading a vCPU's state is a series of ioctls, any of which can fail, so it is a fallible
//! [`Vcpu::save_state`] (called by the vCPU's own thread, paused, see
//! [`crate::vstate::vcpu::VcpuCommand::Save`]); [`Vcpu::restore`] follows the
//! [`fnode_snapshot::Persist`] shape: it takes the live resources (the new VM) and the state
//! and gives a ready vCPU.
//!
//! The order of the `KVM_SET_*` calls matters (it is the order Firecracker and QEMU use):
//! CPUID first (it decides which MSRs and XSAVE features exist), the LAPIC before the MSRs
//! (`TSC_DEADLINE` is only accepted with the LAPIC in TSC-deadline mode), vCPU events last
//! (they may hold an exception to inject).

use std::sync::{Arc, OnceLock};

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, SyncReg, VcpuExit};
use serde::{Deserialize, Serialize};

use super::vcpu::{Vcpu, BOOT_MSRS};
use super::vm::Vm;
use crate::devices::bus::Buses;

/// Most MSRs read or written with one `KVM_GET_MSRS`/`KVM_SET_MSRS`.
const MSR_CHUNK: usize = 64;

/// Most elements of a `rep` string I/O instruction [`Vcpu::complete_pending_io`] moves.
pub const MAX_IO_STEPS: u32 = 1 << 20;

/// A vCPU as a snapshot keeps it.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (and APIC id).
    pub id: u8,
    /// The CPUID the guest saw (`KVM_GET_CPUID2`).
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR KVM could read, in the order read.
    pub msrs: Vec<kvm_msr_entry>,
    /// General-purpose registers, `rip`, `rflags`.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers, EFER, the APIC base.
    pub sregs: kvm_sregs,
    /// The XSAVE area: x87, SSE and every extended state the guest enabled.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The in-kernel local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs and the interrupt shadow.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for INIT/SIPI...
    pub mp_state: kvm_mp_state,
    /// The guest's TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// Errors saving or restoring a vCPU's state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuPersistError {
    /// A `KVM_GET_*`/`KVM_SET_*` ioctl failed.
    #[error("{ioctl} failed for vCPU {id}")]
    Ioctl {
        /// The ioctl.
        ioctl: &'static str,
        /// vCPU index.
        id: u8,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM lacks a capability saving or restoring needs.
    #[error("KVM lacks {0}, which fnode snapshots need: use a host kernel whose KVM supports it")]
    MissingCapability(&'static str),
    /// The XSAVE area is larger than `KVM_GET_XSAVE` returns (AMX tile state).
    #[error("this host's XSAVE area is {0} bytes; fnode snapshots support up to 4096")]
    XsaveTooLarge(i32),
    /// `KVM_GET_MSR_INDEX_LIST` failed.
    #[error("KVM_GET_MSR_INDEX_LIST failed")]
    MsrIndexList(#[source] kvm_ioctls::Error),
    /// A list of MSRs or CPUID entries does not fit KVM's structure.
    #[error("vCPU {id}: too many {what} ({len})")]
    TooMany {
        /// vCPU index.
        id: u8,
        /// "MSRs" or "CPUID entries".
        what: &'static str,
        /// How many.
        len: usize,
    },
    /// KVM did not accept a saved MSR.
    #[error("vCPU {id}: KVM refused to restore MSR {msr:#x}")]
    MsrRefused {
        /// vCPU index.
        id: u8,
        /// The MSR.
        msr: u32,
    },
    /// The state is for another vCPU.
    #[error("saved state of vCPU {found} given to vCPU {expected}")]
    WrongVcpu {
        /// The vCPU being restored.
        expected: u8,
        /// The id in the state.
        found: u8,
    },
    /// The state has no CPUID (a vCPU never configured).
    #[error("saved state of vCPU {id} has no CPUID")]
    NoCpuid {
        /// vCPU index.
        id: u8,
    },
    /// A vCPU was asked to save its state while not paused.
    #[error("vCPU {id} is not paused: pause the VM before saving it")]
    NotPaused {
        /// vCPU index.
        id: u8,
    },
    /// The vCPU's pending I/O instruction did not complete.
    #[error("vCPU {id} did not complete its I/O instruction: cannot save it now")]
    PendingIo {
        /// vCPU index.
        id: u8,
    },
    /// Completing the pending I/O ended in another kind of exit.
    #[error("vCPU {id} stopped with {exit} while completing its I/O: cannot save it now")]
    UnexpectedExit {
        /// vCPU index.
        id: u8,
        /// The exit KVM returned.
        exit: String,
    },
    /// `KVM_CREATE_VCPU` failed.
    #[error("cannot create vCPU {id}")]
    Create {
        /// vCPU index.
        id: u8,
        /// The error.
        #[source]
        source: super::vcpu::VcpuError,
    },
}

/// The capabilities saving and restoring a vCPU relies on.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Xsave, "KVM_CAP_XSAVE"),
    (Cap::Xcrs, "KVM_CAP_XCRS"),
    (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
];

/// Checks that KVM can save and restore every part of a vCPU fnode keeps.
pub fn check_capabilities(kvm: &Kvm) -> Result<(), VcpuPersistError> {
    for &(cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(VcpuPersistError::MissingCapability(name));
        }
    }
    // KVM_CAP_XSAVE2 (when present) is the size of the whole XSAVE area; KVM_GET_XSAVE returns
    // 4096 bytes, enough unless the guest may use AMX tiles.
    let xsave2 = kvm.check_extension_int(Cap::Xsave2);
    if xsave2 > std::mem::size_of::<kvm_xsave>() as i32 {
        return Err(VcpuPersistError::XsaveTooLarge(xsave2));
    }
    Ok(())
}

/// The MSRs a snapshot saves on this host: what `KVM_GET_MSR_INDEX_LIST` reports, plus the
/// MSRs fnode sets at boot (KVM may leave those out of the list, e.g. the MTRR default type).
/// The vCPU thread reads each of them; the ones KVM cannot read on this vCPU are skipped.
pub fn msrs_to_save(kvm: &Kvm) -> Result<Arc<[u32]>, VcpuPersistError> {
    let list = kvm
        .get_msr_index_list()
        .map_err(VcpuPersistError::MsrIndexList)?;
    let mut msrs: Vec<u32> = list.as_slice().to_vec();
    for msr in BOOT_MSRS {
        if !msrs.contains(&msr) {
            msrs.push(msr);
        }
    }
    Ok(msrs.into())
}

impl Vcpu {
    /// Reads the vCPU's whole state out of KVM. Call it only while the vCPU is out of the
    /// guest; it first completes an I/O exit the guest is still in (see
    /// [`Vcpu::complete_pending_io`]), so the saved `rip` is past the instruction.
    pub fn save_state(
        &mut self,
        msr_list: &[u32],
        buses: &Buses,
    ) -> Result<VcpuState, VcpuPersistError> {
        let id = self.id();
        self.complete_pending_io(buses)?;
        let err = |ioctl| move |source| VcpuPersistError::Ioctl { ioctl, id, source };
        let fd = self.fd();
        let mp_state = fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?;
        let debug_regs = fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        // Not every KVM reports the TSC frequency; the guest's clock then cannot be checked.
        let tsc_khz = fd.get_tsc_khz().ok();
        let cpuid = fd
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(err("KVM_GET_CPUID2"))?
            .as_slice()
            .to_vec();
        let msrs = self.read_msrs(msr_list)?;
        let events = self
            .fd()
            .get_vcpu_events()
            .map_err(err("KVM_GET_VCPU_EVENTS"))?;
        Ok(VcpuState {
            id,
            cpuid,
            msrs,
            regs,
            sregs,
            xsave,
            xcrs,
            debug_regs,
            lapic,
            events,
            mp_state,
            tsc_khz,
        })
    }

    /// Completes the I/O or MMIO exit the guest may still be in: KVM finishes an `in`/`out`
    /// (writes the value read, moves `rip` past the instruction) only at the next `KVM_RUN`.
    /// With `immediate_exit` set, that `KVM_RUN` completes it and returns at once, without
    /// running a guest instruction (the KVM API's advice before saving state). A string
    /// instruction part way (`rep outsb`) exits once per element until it is done: those
    /// accesses go to `buses` as usual.
    pub fn complete_pending_io(&mut self, buses: &Buses) -> Result<(), VcpuPersistError> {
        self.complete_pending_io_within(buses, MAX_IO_STEPS)
    }

    /// [`complete_pending_io`](Self::complete_pending_io), giving up (with
    /// [`VcpuPersistError::PendingIo`]) after `max_steps` exits: for an exit the guest chose
    /// the time of, where a plain `out` takes one step and a guest that made it a long `rep`
    /// string instruction must not hold the vCPU thread for a million exits.
    pub fn complete_pending_io_within(
        &mut self,
        buses: &Buses,
        max_steps: u32,
    ) -> Result<(), VcpuPersistError> {
        let id = self.id();
        let mut result = Err(VcpuPersistError::PendingIo { id });
        for _ in 0..max_steps {
            self.fd_mut().set_kvm_immediate_exit(1);
            match self.fd_mut().run() {
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    result = Ok(());
                    break;
                }
                Err(source) => {
                    result = Err(VcpuPersistError::Ioctl {
                        ioctl: "KVM_RUN (immediate exit)",
                        id,
                        source,
                    });
                    break;
                }
                Ok(VcpuExit::IoOut(port, data)) => {
                    buses.pio.write(u64::from(port), data);
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    buses.pio.read(u64::from(port), data);
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    buses.mmio.write(addr, data);
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    buses.mmio.read(addr, data);
                }
                Ok(other) => {
                    result = Err(VcpuPersistError::UnexpectedExit {
                        id,
                        exit: format!("{other:?}"),
                    });
                    break;
                }
            }
        }
        self.fd_mut().set_kvm_immediate_exit(0);
        result
    }

    /// Reads `list`, skipping the MSRs KVM cannot read on this vCPU. `KVM_GET_MSRS` stops at
    /// the first MSR it cannot read and returns how many it read before it.
    fn read_msrs(&self, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuPersistError> {
        let id = self.id();
        let mut saved = Vec::with_capacity(list.len());
        let mut pos = 0;
        while pos < list.len() {
            let chunk = &list[pos..(pos + MSR_CHUNK).min(list.len())];
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuPersistError::TooMany {
                id,
                what: "MSRs",
                len: entries.len(),
            })?;
            let read = self
                .fd()
                .get_msrs(&mut msrs)
                .map_err(|source| VcpuPersistError::Ioctl {
                    ioctl: "KVM_GET_MSRS",
                    id,
                    source,
                })?
                .min(chunk.len());
            saved.extend_from_slice(&msrs.as_slice()[..read]);
            // Skip the MSR KVM stopped at, if it stopped early.
            pos += if read < chunk.len() { read + 1 } else { read };
        }
        Ok(saved)
    }

    /// `KVM_CREATE_VCPU` for `state.id` in `vm`, then every part of `state` set back.
    /// The VM's irqchip must exist (the LAPIC is restored into it).
    pub fn restore(vm: &Vm, state: &VcpuState) -> Result<Vcpu, VcpuPersistError> {
        let mut vcpu = Vcpu::create(vm, state.id).map_err(|source| VcpuPersistError::Create {
            id: state.id,
            source,
        })?;
        vcpu.restore_state(state)?;
        Ok(vcpu)
    }

    /// Sets every part of `state` on this (new) vCPU.
    pub fn restore_state(&mut self, state: &VcpuState) -> Result<(), VcpuPersistError> {
        let id = self.id();
        if state.id != id {
            return Err(VcpuPersistError::WrongVcpu {
                expected: id,
                found: state.id,
            });
        }
        if state.cpuid.is_empty() {
            return Err(VcpuPersistError::NoCpuid { id });
        }
        let err = |ioctl| move |source| VcpuPersistError::Ioctl { ioctl, id, source };
        let fd = self.fd();
        let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| VcpuPersistError::TooMany {
            id,
            what: "CPUID entries",
            len: state.cpuid.len(),
        })?;
        fd.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        self.load(state, true)?;
        let fd = self.fd();
        // A host with another TSC frequency: scale the guest's TSC where KVM can (TSC
        // scaling). Where it cannot, the guest's clock runs at this host's rate; it still
        // reads monotonic time, which is all fnode guests need of it. (A vCPU that already
        // ran here, reset in place, has its frequency set: `load_state` leaves it alone.)
        // A new vCPU runs at the host's frequency, the same for every vCPU of the process:
        // asked once (each vCPU ioctl costs a `vcpu_load`).
        static HOST_TSC_KHZ: OnceLock<Option<u32>> = OnceLock::new();
        let here = *HOST_TSC_KHZ.get_or_init(|| fd.get_tsc_khz().ok());
        if let (Some(khz), Some(here)) = (state.tsc_khz, here) {
            if khz != here && khz != 0 {
                let _ = fd.set_tsc_khz(khz);
            }
        }
        Ok(())
    }

    /// Sets every part of `state` but the CPUID (which a vCPU that has run cannot change):
    /// [`Vcpu::restore_state`]'s second half, and an in-place reset's whole.
    ///
    /// Nothing is skipped, not even what guest user code cannot change (MSRs, control and
    /// debug registers, XCR0, the LAPIC): a guest kernel a function subverted could, and
    /// the next invocation must not inherit it. Each vCPU ioctl costs a `vcpu_load`, so the
    /// calls are as few as KVM allows: all MSRs in one `KVM_SET_MSRS`, and where KVM offers
    /// `KVM_CAP_SYNC_REGS` the general registers and the pending events go through
    /// `kvm_run` and take effect at the next `KVM_RUN` (before it runs a guest instruction,
    /// after every ioctl here, so the order stays the one above).
    ///
    /// What each call costs was measured on a paravirtual KVM host (`kvm_pvm`; p50 over 200
    /// resets): 6.3 to 6.8 µs for each of `KVM_SET_MP_STATE`, `KVM_SET_SREGS`,
    /// `KVM_SET_XSAVE`, `KVM_SET_XCRS` and `KVM_SET_DEBUGREGS`, 8.1 µs for `KVM_SET_LAPIC`,
    /// 8.8 µs for `KVM_SET_MSRS` with all 42 MSRs, and 6.4 to 6.7 µs for a `KVM_SET_MSRS` of
    /// any single one (the TSC's no dearer than the others). The cost is the call itself
    /// (entering and leaving the vCPU), not what it sets: nothing is worth skipping, and
    /// nothing could be skipped safely. The registers left out are still the ones a guest
    /// kernel can change: even the MP state carries KVM's PV-unhalt flag, which a guest can
    /// set on itself and `KVM_SET_MP_STATE` clears; and the TSC goes back with the memory
    /// that holds the guest's clock state. An in-place reset runs all this at the guest's
    /// DONE, off the request path (see `crate::reset`).
    pub fn load_state(&mut self, state: &VcpuState) -> Result<(), VcpuPersistError> {
        self.load(state, false)
    }

    /// [`load_state`](Self::load_state); on a `fresh` vCPU (just created, never run) the
    /// parts whose saved value is the one KVM gives a new vCPU are left as they are: the
    /// MP state of a runnable boot vCPU and debug registers nobody set. A used vCPU gets
    /// everything.
    fn load(&mut self, state: &VcpuState, fresh: bool) -> Result<(), VcpuPersistError> {
        let id = self.id();
        if state.id != id {
            return Err(VcpuPersistError::WrongVcpu {
                expected: id,
                found: state.id,
            });
        }
        let err = |ioctl| move |source| VcpuPersistError::Ioctl { ioctl, id, source };
        let sync = self.uses_sync_regs();
        let fd = self.fd();
        if !(fresh && is_fresh_mp_state(id, &state.mp_state)) {
            fd.set_mp_state(state.mp_state)
                .map_err(err("KVM_SET_MP_STATE"))?;
        }
        if !sync {
            fd.set_regs(&state.regs).map_err(err("KVM_SET_REGS"))?;
        }
        // Not through kvm_run: the APIC base in it must be set before the LAPIC state.
        fd.set_sregs(&state.sregs).map_err(err("KVM_SET_SREGS"))?;
        // SAFETY: `state.xsave` is a whole `kvm_xsave` (4096 bytes); check_capabilities made
        // sure KVM's XSAVE area (KVM_CAP_XSAVE2) is no larger, so KVM reads only this struct.
        unsafe { fd.set_xsave(&state.xsave) }.map_err(err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&state.xcrs).map_err(err("KVM_SET_XCRS"))?;
        if !(fresh && is_fresh_debug_regs(&state.debug_regs)) {
            fd.set_debug_regs(&state.debug_regs)
                .map_err(err("KVM_SET_DEBUGREGS"))?;
        }
        fd.set_lapic(&state.lapic).map_err(err("KVM_SET_LAPIC"))?;
        // One call for the lot: KVM takes up to KVM_MAX_MSR_ENTRIES at once.
        for chunk in state.msrs.chunks(KVM_MAX_MSR_ENTRIES) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuPersistError::TooMany {
                id,
                what: "MSRs",
                len: chunk.len(),
            })?;
            let set = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
            if let Some(refused) = chunk.get(set) {
                return Err(VcpuPersistError::MsrRefused {
                    id,
                    msr: refused.index,
                });
            }
        }
        if sync {
            let fd = self.fd_mut();
            let regs = fd.sync_regs_mut();
            regs.regs = state.regs;
            regs.events = state.events;
            fd.set_sync_dirty_reg(SyncReg::Register);
            fd.set_sync_dirty_reg(SyncReg::VcpuEvents);
        } else {
            fd.set_vcpu_events(&state.events)
                .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        }
        Ok(())
    }
}

/// DR6 as KVM resets it (its reserved bits read as 1).
const DR6_RESET: u64 = 0xffff_0ff0;
/// DR7 as KVM resets it (bit 10 reads as 1).
const DR7_RESET: u64 = 0x400;

/// Whether `mp` is the MP state KVM gives vCPU `id` when it creates it in a VM with an
/// in-kernel irqchip: runnable for the boot vCPU (0), no PV unhalt pending.
fn is_fresh_mp_state(id: u8, mp: &kvm_mp_state) -> bool {
    id == 0 && mp.mp_state == kvm_bindings::KVM_MP_STATE_RUNNABLE
}

/// Whether `regs` are the debug registers KVM gives a new vCPU.
fn is_fresh_debug_regs(regs: &kvm_debugregs) -> bool {
    regs.db == [0; 4] && regs.dr6 == DR6_RESET && regs.dr7 == DR7_RESET && regs.flags == 0
}

#[cfg(test)]
mod tests {
    use fnode_snapshot::state_file;

    use super::*;
    use crate::kvm::{test_support::require_kvm, KvmContext};
    use crate::vstate::memory::{self, MemoryBacking};
    use vm_memory::GuestAddress;

    fn vm_with_irqchip(kvm: &KvmContext) -> Vm {
        let mut vm = Vm::create(kvm.kvm()).unwrap();
        let mem = memory::create(16 << 20, MemoryBacking::Anonymous).unwrap();
        vm.register_memory(&mem).unwrap();
        vm.setup_irqchip().unwrap();
        vm
    }

    #[test]
    fn save_restore_round_trip() {
        if !require_kvm() {
            return;
        }
        let kvm = KvmContext::new().unwrap();
        check_capabilities(kvm.kvm()).unwrap();
        let msrs = msrs_to_save(kvm.kvm()).unwrap();
        let vm = vm_with_irqchip(&kvm);
        let mut vcpu = Vcpu::create(&vm, 0).unwrap();
        vcpu.configure_cpuid(kvm.supported_cpuid()).unwrap();
        vcpu.configure_msrs().unwrap();
        vcpu.setup_pvh_regs(GuestAddress(0x10_0000), GuestAddress(0x6000))
            .unwrap();
        let mut regs = vcpu.fd().get_regs().unwrap();
        regs.r12 = 0x1234_5678_9abc_def0;
        regs.rsp = 0x8000;
        vcpu.fd().set_regs(&regs).unwrap();
        let saved = vcpu.save_state(&msrs, &Buses::default()).unwrap();
        assert_eq!(saved.regs.r12, 0x1234_5678_9abc_def0);
        assert!(!saved.cpuid.is_empty());
        // The MTRR default type fnode sets at boot is saved even if KVM does not list it.
        assert!(saved.msrs.iter().any(|m| m.index == BOOT_MSRS[1]));

        // Through the serde encoding and into a vCPU of a new VM.
        let path = std::path::Path::new("state");
        let bytes = state_file::encode(crate::persist::FORMAT, &saved).unwrap();
        let decoded: VcpuState = state_file::decode(path, &bytes, crate::persist::FORMAT).unwrap();
        let vm2 = vm_with_irqchip(&kvm);
        let mut restored = Vcpu::restore(&vm2, &decoded).unwrap();
        let again = restored.save_state(&msrs, &Buses::default()).unwrap();
        assert_eq!(again.regs, saved.regs);
        assert_eq!(again.sregs, saved.sregs);
        assert_eq!(again.cpuid.len(), saved.cpuid.len());
        assert_eq!(again.lapic.regs, saved.lapic.regs);
        assert_eq!(again.xcrs, saved.xcrs);
        assert_eq!(again.mp_state, saved.mp_state);
        let msr = |s: &VcpuState, index| s.msrs.iter().find(|m| m.index == index).map(|m| m.data);
        for m in BOOT_MSRS {
            assert_eq!(msr(&again, m), msr(&saved, m), "MSR {m:#x}");
        }
    }

    #[test]
    fn a_new_vcpu_has_the_state_a_restore_leaves_alone() {
        if !require_kvm() {
            return;
        }
        let kvm = KvmContext::new().unwrap();
        let vm = vm_with_irqchip(&kvm);
        let vcpu = Vcpu::create(&vm, 0).unwrap();
        let fd = vcpu.fd();
        assert!(is_fresh_mp_state(0, &fd.get_mp_state().unwrap()));
        assert!(is_fresh_debug_regs(&fd.get_debug_regs().unwrap()));
        // Not for another vCPU, nor for state a guest set.
        assert!(!is_fresh_mp_state(1, &fd.get_mp_state().unwrap()));
        let mut set = fd.get_debug_regs().unwrap();
        set.dr7 |= 1;
        assert!(!is_fresh_debug_regs(&set));
    }

    #[test]
    fn state_for_another_vcpu_is_refused() {
        if !require_kvm() {
            return;
        }
        let kvm = KvmContext::new().unwrap();
        let msrs = msrs_to_save(kvm.kvm()).unwrap();
        let vm = vm_with_irqchip(&kvm);
        let mut vcpu = Vcpu::create(&vm, 0).unwrap();
        vcpu.configure_cpuid(kvm.supported_cpuid()).unwrap();
        let mut saved = vcpu.save_state(&msrs, &Buses::default()).unwrap();
        let mut other = Vcpu::create(&vm, 1).unwrap();
        let err = other.restore_state(&saved).unwrap_err();
        assert!(
            matches!(
                err,
                VcpuPersistError::WrongVcpu {
                    expected: 1,
                    found: 0
                }
            ),
            "{err:?}"
        );
        saved.cpuid.clear();
        let err = vcpu.restore_state(&saved).unwrap_err();
        assert!(
            matches!(err, VcpuPersistError::NoCpuid { id: 0 }),
            "{err:?}"
        );
    }
}
