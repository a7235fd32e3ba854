//! How a guest run ended, and the process exit codes the `fnode-vmm` binary maps it to.

use std::fmt;
use std::time::Duration;

use fnode_guest::abi::exit::{FAILURE, FAULT, SUCCESS};
use fnode_guest::abi::fault::{FaultReport, REPORT_LEN};
use fnode_guest::abi::layout::REPORT_ADDR;
use vm_memory::{Bytes, GuestAddress};

use crate::devices::virtio::DeviceFault;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu::VcpuError;

/// Exception vectors are 0..=31; a report naming another vector is garbage.
const MAX_EXCEPTION_VECTOR: u64 = 31;

/// How a guest run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The guest wrote `status` to the exit port (anything but `abi::exit::FAULT`).
    Exited {
        /// The status the guest wrote.
        status: u32,
    },
    /// The guest exited with `abi::exit::FAULT`. `report` is `None` when the report page did
    /// not hold a valid report (the guest's word is untrusted).
    Faulted {
        /// The guest's fault report, if valid.
        report: Option<FaultReport>,
    },
    /// The guest did not exit in time; its vCPUs were stopped.
    TimedOut {
        /// The time limit.
        timeout: Duration,
    },
    /// KVM or the emulation failed: a triple fault, an internal error, an unhandled exit.
    Crashed(VcpuError),
    /// A device found the guest breaking its contract (a malformed virtqueue, a bad packet
    /// header); the VM was stopped.
    DeviceFault(DeviceFault),
}

impl Outcome {
    /// Whether the guest exited with `abi::exit::SUCCESS`.
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Exited { status } if *status == SUCCESS)
    }

    /// The `fnode-vmm` process exit code for this outcome.
    pub fn exit_code(&self) -> u8 {
        match self {
            Outcome::Exited { status } if *status == SUCCESS => exit_code::SUCCESS,
            Outcome::Exited { .. } => exit_code::GUEST_FAILURE,
            Outcome::Faulted { .. } => exit_code::GUEST_FAULT,
            Outcome::TimedOut { .. } => exit_code::TIMEOUT,
            Outcome::Crashed(_) => exit_code::VM_ERROR,
            Outcome::DeviceFault(_) => exit_code::GUEST_FAULT,
        }
    }

    /// The outcome of a guest that wrote `status` to the exit port: for `FAULT`, the report
    /// is read from guest memory and validated.
    pub fn from_exit_status(status: u32, memory: &GuestMemory) -> Outcome {
        if status == FAULT {
            Outcome::Faulted {
                report: read_fault_report(memory),
            }
        } else {
            Outcome::Exited { status }
        }
    }
}

/// One line for a person: `guest exited with success`, `guest fault: #UD (vector 6) at rip
/// 0x101234`, `guest did not exit within 500 ms; stopped it`, ...
impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exited { status } if *status == SUCCESS => {
                write!(f, "guest exited with success")
            }
            Outcome::Exited { status } if *status == FAILURE => write!(
                f,
                "guest exited with failure (status {status:#x}); its console says why"
            ),
            Outcome::Exited { status } => write!(f, "guest exited with status {status:#x}"),
            Outcome::Faulted { report: Some(r) } => {
                write!(
                    f,
                    "guest fault: {} (vector {}) at rip {:#x}",
                    r.mnemonic(),
                    r.vector,
                    r.rip
                )?;
                if r.vector == PAGE_FAULT_VECTOR {
                    write!(f, ", cr2 {:#x}", r.cr2)?;
                }
                write!(f, ", error code {:#x}, cpl {}", r.error_code, r.cs & 3)
            }
            Outcome::Faulted { report: None } => write!(
                f,
                "guest fault without a valid fault report at {REPORT_ADDR:#x}"
            ),
            Outcome::TimedOut { timeout } => write!(
                f,
                "guest did not exit within {} ms; stopped it",
                timeout.as_millis()
            ),
            Outcome::DeviceFault(d) => write!(f, "guest broke a device; stopped the VM: {d}"),
            Outcome::Crashed(e) => {
                write!(f, "VM failed: {e}")?;
                let mut source = std::error::Error::source(e);
                while let Some(cause) = source {
                    write!(f, ": {cause}")?;
                    source = cause.source();
                }
                Ok(())
            }
        }
    }
}

/// The page fault vector (#PF): its report carries the faulting address in CR2.
const PAGE_FAULT_VECTOR: u64 = 14;

/// Reads and validates the fault report at `abi::layout::REPORT_ADDR`. `None` when memory is
/// too small, the magic is wrong or the vector is not an exception vector.
pub fn read_fault_report(memory: &GuestMemory) -> Option<FaultReport> {
    let mut bytes = [0u8; REPORT_LEN];
    memory
        .read_slice(&mut bytes, GuestAddress(REPORT_ADDR))
        .ok()?;
    FaultReport::decode(&bytes).filter(|r| r.vector <= MAX_EXCEPTION_VECTOR)
}

/// Exit codes of the `fnode-vmm` process.
pub mod exit_code {
    /// The guest exited with `abi::exit::SUCCESS`.
    pub const SUCCESS: u8 = 0;
    /// The guest exited with any other status (`abi::exit::FAILURE`, or an unknown one).
    pub const GUEST_FAILURE: u8 = 1;
    /// Bad command-line usage (clap's own code).
    pub const USAGE: u8 = 2;
    /// The guest faulted (a CPU exception it reported, or a device it broke).
    pub const GUEST_FAULT: u8 = 3;
    /// The guest did not exit within the timeout.
    pub const TIMEOUT: u8 = 4;
    /// KVM or emulation failed (triple fault, internal error, unhandled exit).
    pub const VM_ERROR: u8 = 5;
    /// The VM could not be built: a bad image, an unusable `/dev/kvm`, a bad option.
    pub const SETUP: u8 = 6;
}

#[cfg(test)]
mod tests {
    use fnode_guest::abi::fault::MAGIC;

    use super::*;
    use crate::vstate::memory::{self, MemoryBacking};

    fn report(vector: u64) -> FaultReport {
        FaultReport {
            magic: MAGIC,
            vector,
            error_code: 0,
            rip: 0x10_1234,
            cr2: 0,
            rsp: 0x20_0000,
            cs: 0x8,
        }
    }

    fn write_report(mem: &GuestMemory, r: &FaultReport) {
        let words = [r.magic, r.vector, r.error_code, r.rip, r.cr2, r.rsp, r.cs];
        for (i, w) in words.iter().enumerate() {
            mem.write_obj(*w, GuestAddress(REPORT_ADDR + 8 * i as u64))
                .unwrap();
        }
    }

    fn mem() -> GuestMemory {
        memory::create(1 << 20, MemoryBacking::Anonymous).unwrap()
    }

    #[test]
    fn valid_report_is_read() {
        let m = mem();
        write_report(&m, &report(6));
        let o = Outcome::from_exit_status(FAULT, &m);
        assert!(matches!(o, Outcome::Faulted { report: Some(r) } if r == report(6)));
        assert_eq!(
            o.to_string(),
            "guest fault: #UD (vector 6) at rip 0x101234, error code 0x0, cpl 0"
        );
        assert_eq!(o.exit_code(), exit_code::GUEST_FAULT);
    }

    #[test]
    fn page_fault_names_cr2() {
        let m = mem();
        let mut r = report(14);
        r.cr2 = 0x4000_1000;
        r.error_code = 4;
        r.cs = 0x23;
        write_report(&m, &r);
        assert_eq!(
            Outcome::from_exit_status(FAULT, &m).to_string(),
            "guest fault: #PF (vector 14) at rip 0x101234, cr2 0x40001000, error code 0x4, cpl 3"
        );
    }

    #[test]
    fn bad_magic_or_vector_means_no_report() {
        let m = mem();
        let mut r = report(6);
        r.magic ^= 1;
        write_report(&m, &r);
        assert!(read_fault_report(&m).is_none());
        write_report(&m, &report(32));
        assert!(read_fault_report(&m).is_none());
        let o = Outcome::from_exit_status(FAULT, &m);
        assert_eq!(
            o.to_string(),
            "guest fault without a valid fault report at 0x7000"
        );
    }

    #[test]
    fn tiny_memory_has_no_report() {
        let m = memory::create(0x1000, MemoryBacking::Anonymous).unwrap();
        assert!(read_fault_report(&m).is_none());
    }

    #[test]
    fn exit_statuses_map_to_codes() {
        let m = mem();
        let ok = Outcome::from_exit_status(SUCCESS, &m);
        assert!(ok.is_success());
        assert_eq!(ok.exit_code(), exit_code::SUCCESS);
        assert_eq!(ok.to_string(), "guest exited with success");
        let failed = Outcome::from_exit_status(FAILURE, &m);
        assert_eq!(failed.exit_code(), exit_code::GUEST_FAILURE);
        assert_eq!(
            Outcome::from_exit_status(0x42, &m).to_string(),
            "guest exited with status 0x42"
        );
        let t = Outcome::TimedOut {
            timeout: Duration::from_millis(500),
        };
        assert_eq!(
            t.to_string(),
            "guest did not exit within 500 ms; stopped it"
        );
        assert_eq!(t.exit_code(), exit_code::TIMEOUT);
        let c = Outcome::Crashed(VcpuError::Shutdown);
        assert_eq!(
            c.to_string(),
            "VM failed: guest triple fault (KVM_EXIT_SHUTDOWN)"
        );
        assert_eq!(c.exit_code(), exit_code::VM_ERROR);
    }
}
