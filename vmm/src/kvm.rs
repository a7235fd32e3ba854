//! Access to `/dev/kvm`: open it once, check the API version and the capabilities every fnode
//! VM needs, and cache what is the same for every VM (the supported CPUID).
//!
//! One [`KvmContext`] serves any number of VMs: a node opens `/dev/kvm` once, not per boot.

use std::ffi::CString;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};

/// Where KVM lives.
pub const KVM_PATH: &str = "/dev/kvm";

/// The only stable KVM API version (`KVM_GET_API_VERSION`).
const KVM_API_VERSION: i32 = 12;

/// Capabilities fnode relies on, with their KVM names for error messages.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    // In-kernel PIC/IOAPIC/LAPIC: interrupts are delivered without a trip to the VMM.
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    // Guest memory is ordinary process memory (anonymous or a MAP_PRIVATE snapshot file).
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    // Virtio notifications and interrupts bypass the vCPU thread.
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    // Intel hosts need the TSS address set before the first KVM_RUN.
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    // Kicking a vCPU out of KVM_RUN with a signal relies on `kvm_run.immediate_exit`.
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    // KVM_GET_SUPPORTED_CPUID / KVM_SET_CPUID2.
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

/// Errors opening and checking KVM.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// The device node does not exist.
    #[error(
        "{} does not exist: is KVM enabled? load kvm_intel or kvm_amd \
         (modprobe kvm_intel / modprobe kvm_amd) and enable virtualization in the firmware",
        path.display()
    )]
    NotFound {
        /// The device path.
        path: PathBuf,
    },
    /// The device node exists but this user may not open it.
    #[error(
        "permission denied opening {}: add yourself to group kvm \
         (usermod -aG kvm $USER, then log in again) or run as root",
        path.display()
    )]
    PermissionDenied {
        /// The device path.
        path: PathBuf,
    },
    /// Opening failed for another reason.
    #[error("cannot open {}", path.display())]
    Open {
        /// The device path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The path contains a NUL byte.
    #[error("KVM device path {} contains a NUL byte", path.display())]
    BadPath {
        /// The device path.
        path: PathBuf,
    },
    /// The device does not answer `KVM_GET_API_VERSION`.
    #[error("{} is not a KVM device (KVM_GET_API_VERSION failed)", path.display())]
    NotKvm {
        /// The device path.
        path: PathBuf,
    },
    /// `KVM_GET_API_VERSION` returned something other than 12.
    #[error("KVM reports API version {found}, fnode needs version {KVM_API_VERSION}")]
    ApiVersion {
        /// The version the kernel reported.
        found: i32,
    },
    /// A capability fnode needs is missing.
    #[error("KVM lacks {0}, which fnode needs: use a host kernel whose KVM supports it")]
    MissingCapability(&'static str),
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
}

/// An open, checked `/dev/kvm`, plus what every VM on this host shares.
pub struct KvmContext {
    kvm: Kvm,
    supported_cpuid: CpuId,
    /// What this host offers a guest ([`crate::persist::cpu::host_features`]), worked out
    /// at the first restore: it runs `cpuid`, which exits to the hypervisor when this host
    /// is itself a VM, and it does not change while the process lives.
    host_features: OnceLock<Vec<kvm_cpuid_entry2>>,
    /// Whether KVM has every capability saving and restoring vCPUs needs (checked at the
    /// first snapshot or restore: six ioctls that would otherwise run on every restore).
    snapshot_capable: OnceLock<bool>,
}

impl fmt::Debug for KvmContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KvmContext")
            .field("kvm", &self.kvm)
            .field("cpuid_entries", &self.supported_cpuid.as_slice().len())
            .finish()
    }
}

impl KvmContext {
    /// Opens and checks [`KVM_PATH`].
    pub fn new() -> Result<Self, KvmError> {
        Self::open(Path::new(KVM_PATH))
    }

    /// Opens and checks the KVM device at `path`.
    pub fn open(path: &Path) -> Result<Self, KvmError> {
        let kvm = open_kvm(path)?;
        check_kvm(&kvm, path)?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(KvmError::SupportedCpuid)?;
        Ok(KvmContext {
            kvm,
            supported_cpuid,
            host_features: OnceLock::new(),
            snapshot_capable: OnceLock::new(),
        })
    }

    /// What this host offers a guest ([`crate::persist::cpu::host_features`]), computed
    /// once per context.
    pub fn host_features(&self) -> &[kvm_cpuid_entry2] {
        self.host_features
            .get_or_init(|| crate::persist::cpu::host_features(&self.supported_cpuid))
    }

    /// [`crate::vstate::vcpu_persist::check_capabilities`], run once per context while it
    /// succeeds (a failure is checked again, so its error names what is missing).
    pub fn check_snapshot_capabilities(
        &self,
    ) -> Result<(), crate::vstate::vcpu_persist::VcpuPersistError> {
        if self.snapshot_capable.get() == Some(&true) {
            return Ok(());
        }
        crate::vstate::vcpu_persist::check_capabilities(&self.kvm)?;
        let _ = self.snapshot_capable.set(true);
        Ok(())
    }

    /// The KVM system handle.
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    /// `KVM_GET_SUPPORTED_CPUID`, read once when the context was opened.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }
}

/// Opens the device with a message that names the fix for the two common failures.
fn open_kvm(path: &Path) -> Result<Kvm, KvmError> {
    let cpath = CString::new(path.as_os_str().as_bytes()).map_err(|_| KvmError::BadPath {
        path: path.to_path_buf(),
    })?;
    Kvm::new_with_path(&cpath).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => KvmError::NotFound {
            path: path.to_path_buf(),
        },
        libc::EACCES | libc::EPERM => KvmError::PermissionDenied {
            path: path.to_path_buf(),
        },
        _ => KvmError::Open {
            path: path.to_path_buf(),
            source: e,
        },
    })
}

/// Checks the API version and [`REQUIRED_CAPS`].
fn check_kvm(kvm: &Kvm, path: &Path) -> Result<(), KvmError> {
    let found = kvm.get_api_version();
    if found < 0 {
        return Err(KvmError::NotKvm {
            path: path.to_path_buf(),
        });
    }
    if found != KVM_API_VERSION {
        return Err(KvmError::ApiVersion { found });
    }
    for &(cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(KvmError::MissingCapability(name));
        }
    }
    Ok(())
}

/// Helpers for tests that need `/dev/kvm`.
pub mod test_support {
    use std::io::Write;

    /// Environment variable that turns a skipped KVM test into a failure (CI sets it on hosts
    /// that have KVM, so a broken `/dev/kvm` cannot pass as a skip).
    pub const REQUIRE_KVM_ENV: &str = "FNODE_REQUIRE_KVM";

    /// Whether KVM tests can run here. If `/dev/kvm` is not usable this prints a loud
    /// `SKIPPED:` line to stderr and returns `false` (the test should return early), unless
    /// `FNODE_REQUIRE_KVM=1` is set, in which case it panics.
    ///
    /// ```no_run
    /// if !fnode_vmm::kvm::test_support::require_kvm() {
    ///     return;
    /// }
    /// ```
    pub fn require_kvm() -> bool {
        match super::KvmContext::new() {
            Ok(_) => true,
            Err(e) => {
                let required = std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1");
                assert!(
                    !required,
                    "{REQUIRE_KVM_ENV}=1 but /dev/kvm is not usable: {e}"
                );
                // Straight to fd 2, not eprintln!: the test harness captures eprintln! of
                // passing tests, and a skip must be seen.
                let _ = writeln!(
                    std::io::stderr(),
                    "\n*** SKIPPED: /dev/kvm not usable ({e}) ***\n"
                );
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_names_the_fix() {
        let err = KvmContext::open(Path::new("/nonexistent/kvm")).unwrap_err();
        assert!(matches!(err, KvmError::NotFound { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("/nonexistent/kvm"), "{msg}");
        assert!(msg.contains("kvm_intel"), "{msg}");
    }

    #[test]
    fn not_a_kvm_device_is_rejected() {
        // /dev/null opens fine but answers no KVM ioctl.
        let err = KvmContext::open(Path::new("/dev/null")).unwrap_err();
        assert!(
            matches!(err, KvmError::NotKvm { .. }),
            "unexpected error {err:?}"
        );
    }

    #[test]
    fn opens_dev_kvm() {
        if !test_support::require_kvm() {
            return;
        }
        let ctx = KvmContext::new().unwrap();
        assert!(!ctx.supported_cpuid().as_slice().is_empty());
    }
}
