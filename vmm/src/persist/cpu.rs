//! Can this host run a snapshot's vCPUs? The CPU features the guest saw (its CPUID, as
//! `KVM_GET_CPUID2` reported it when the snapshot was taken) must all be features this host
//! offers: a guest that checked for AVX-512 at boot and uses it would otherwise die of #UD
//! after the restore.
//!
//! What this host offers ([`host_features`]) is what its KVM supports
//! (`KVM_GET_SUPPORTED_CPUID`) together with what its CPU reports (the `cpuid` instruction).
//! On standard KVM the guest's CPUID is what the VMM set, a subset of the former. Some KVM
//! implementations (the paravirtual `kvm_pvm`) show the guest the CPU's own features on top
//! of what the VMM set, because guest user code runs on the CPU as it is; there the CPU is
//! what bounds the guest's CPUID.
//!
//! Compared: the vendor, and the feature-flag registers (leaf 1 ECX/EDX, leaf 7 subleaves 0
//! and 1, leaf 0xD subleaf 1, leaf 0x80000001 ECX/EDX) plus the XSAVE components of leaf 0xD
//! (which the saved XSAVE area may hold). Bits that reflect the guest's own settings
//! (OSXSAVE, OSPKE) or that the VMM sets (the hypervisor bit) are left out.

use std::sync::OnceLock;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Errors of the CPU check.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuCompatError {
    /// The host's CPU vendor differs from the snapshot's.
    #[error(
        "snapshot {dir} was taken on a {snapshot} CPU, this host has a {host} CPU: \
             take the snapshot on this host (re-run 'fnode snapshot')"
    )]
    Vendor {
        /// The snapshot directory.
        dir: String,
        /// The snapshot's vendor string.
        snapshot: String,
        /// This host's vendor string.
        host: String,
    },
    /// The guest saw features this host lacks.
    #[error("snapshot {dir} was taken on a CPU with {}, which this host lacks: \
             take the snapshot on this host (re-run 'fnode snapshot')", missing.join(", "))]
    MissingFeatures {
        /// The snapshot directory.
        dir: String,
        /// The features' names (`avx512f`, or `cpuid.7.0.ebx[16]` for unnamed bits).
        missing: Vec<String>,
    },
}

/// A feature-flag register: CPUID leaf, subleaf, register, bits to ignore, bit names.
struct FeatureReg {
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    ignore: u32,
    names: &'static [(u8, &'static str)],
}

#[derive(Clone, Copy)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn get(self, e: &kvm_cpuid_entry2) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Reg::Eax => "eax",
            Reg::Ebx => "ebx",
            Reg::Ecx => "ecx",
            Reg::Edx => "edx",
        }
    }
}

/// CPUID.1:ECX bit 27 (OSXSAVE) mirrors the guest's CR4; bit 31 is set by the VMM.
const LEAF1_ECX_IGNORE: u32 = (1 << 27) | (1 << 31);
/// CPUID.7.0:ECX bit 4 (OSPKE) mirrors the guest's CR4.
const LEAF7_ECX_IGNORE: u32 = 1 << 4;

const FEATURE_REGS: &[FeatureReg] = &[
    FeatureReg {
        leaf: 1,
        subleaf: 0,
        reg: Reg::Ecx,
        ignore: LEAF1_ECX_IGNORE,
        names: &[
            (0, "sse3"),
            (1, "pclmulqdq"),
            (9, "ssse3"),
            (12, "fma"),
            (13, "cx16"),
            (19, "sse4_1"),
            (20, "sse4_2"),
            (21, "x2apic"),
            (22, "movbe"),
            (23, "popcnt"),
            (24, "tsc_deadline"),
            (25, "aes"),
            (26, "xsave"),
            (28, "avx"),
            (29, "f16c"),
            (30, "rdrand"),
        ],
    },
    FeatureReg {
        leaf: 1,
        subleaf: 0,
        reg: Reg::Edx,
        ignore: 0,
        names: &[
            (0, "fpu"),
            (4, "tsc"),
            (5, "msr"),
            (6, "pae"),
            (8, "cx8"),
            (9, "apic"),
            (11, "sep"),
            (12, "mtrr"),
            (13, "pge"),
            (15, "cmov"),
            (16, "pat"),
            (19, "clflush"),
            (23, "mmx"),
            (24, "fxsr"),
            (25, "sse"),
            (26, "sse2"),
        ],
    },
    FeatureReg {
        leaf: 7,
        subleaf: 0,
        reg: Reg::Ebx,
        ignore: 0,
        names: &[
            (0, "fsgsbase"),
            (3, "bmi1"),
            (4, "hle"),
            (5, "avx2"),
            (7, "smep"),
            (8, "bmi2"),
            (9, "erms"),
            (10, "invpcid"),
            (11, "rtm"),
            (16, "avx512f"),
            (17, "avx512dq"),
            (18, "rdseed"),
            (19, "adx"),
            (20, "smap"),
            (21, "avx512ifma"),
            (23, "clflushopt"),
            (24, "clwb"),
            (28, "avx512cd"),
            (29, "sha_ni"),
            (30, "avx512bw"),
            (31, "avx512vl"),
        ],
    },
    FeatureReg {
        leaf: 7,
        subleaf: 0,
        reg: Reg::Ecx,
        ignore: LEAF7_ECX_IGNORE,
        names: &[
            (1, "avx512vbmi"),
            (2, "umip"),
            (3, "pku"),
            (5, "waitpkg"),
            (6, "avx512_vbmi2"),
            (8, "gfni"),
            (9, "vaes"),
            (10, "vpclmulqdq"),
            (11, "avx512_vnni"),
            (12, "avx512_bitalg"),
            (14, "avx512_vpopcntdq"),
            (16, "la57"),
            (22, "rdpid"),
            (27, "movdiri"),
            (28, "movdir64b"),
        ],
    },
    FeatureReg {
        leaf: 7,
        subleaf: 0,
        reg: Reg::Edx,
        ignore: 0,
        names: &[
            (4, "fsrm"),
            (8, "avx512_vp2intersect"),
            (14, "serialize"),
            (22, "amx_bf16"),
            (23, "avx512_fp16"),
            (24, "amx_tile"),
            (25, "amx_int8"),
        ],
    },
    FeatureReg {
        leaf: 7,
        subleaf: 1,
        reg: Reg::Eax,
        ignore: 0,
        names: &[(4, "avx_vnni"), (5, "avx512_bf16")],
    },
    FeatureReg {
        leaf: 0xd,
        subleaf: 1,
        reg: Reg::Eax,
        ignore: 0,
        names: &[
            (0, "xsaveopt"),
            (1, "xsavec"),
            (2, "xgetbv1"),
            (3, "xsaves"),
        ],
    },
    FeatureReg {
        leaf: 0xd,
        subleaf: 0,
        reg: Reg::Eax,
        ignore: 0,
        names: &[
            (0, "xsave_x87"),
            (1, "xsave_sse"),
            (2, "xsave_avx"),
            (5, "xsave_avx512_opmask"),
            (6, "xsave_avx512_zmm_hi256"),
            (7, "xsave_avx512_hi16_zmm"),
            (9, "xsave_pkru"),
        ],
    },
    FeatureReg {
        leaf: 0x8000_0001,
        subleaf: 0,
        reg: Reg::Ecx,
        ignore: 0,
        names: &[
            (0, "lahf_lm"),
            (5, "abm"),
            (6, "sse4a"),
            (8, "3dnowprefetch"),
            (16, "fma4"),
        ],
    },
    FeatureReg {
        leaf: 0x8000_0001,
        subleaf: 0,
        reg: Reg::Edx,
        ignore: 0,
        names: &[
            (11, "syscall"),
            (20, "nx"),
            (26, "pdpe1gb"),
            (27, "rdtscp"),
            (29, "lm"),
        ],
    },
];

fn find(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
        .or_else(|| {
            // Leaves whose subleaf does not matter are listed with index 0.
            (subleaf == 0)
                .then(|| entries.iter().find(|e| e.function == leaf))
                .flatten()
        })
}

/// The vendor string of CPUID leaf 0 (`GenuineIntel`, `AuthenticAMD`, ...).
fn vendor(entries: &[kvm_cpuid_entry2]) -> Option<String> {
    let e = find(entries, 0, 0)?;
    let mut b = Vec::with_capacity(12);
    for r in [e.ebx, e.edx, e.ecx] {
        b.extend_from_slice(&r.to_le_bytes());
    }
    Some(String::from_utf8_lossy(&b).into_owned())
}

/// What this host offers a guest: KVM's supported CPUID with the CPU's own feature
/// registers OR-ed in (see the module docs).
pub fn host_features(supported: &CpuId) -> Vec<kvm_cpuid_entry2> {
    let mut entries = supported.as_slice().to_vec();
    for raw in host_cpu() {
        match entries
            .iter_mut()
            .find(|e| e.function == raw.function && e.index == raw.index)
        {
            Some(e) => {
                e.eax |= raw.eax;
                e.ebx |= raw.ebx;
                e.ecx |= raw.ecx;
                e.edx |= raw.edx;
            }
            None => entries.push(*raw),
        }
    }
    entries
}

/// The CPU's own feature leaves (those [`check`] compares), read once per process: `cpuid`
/// is an exit to the hypervisor when the host is itself a VM.
fn host_cpu() -> &'static [kvm_cpuid_entry2] {
    use std::arch::x86_64::__cpuid_count;
    static HOST: OnceLock<Vec<kvm_cpuid_entry2>> = OnceLock::new();
    HOST.get_or_init(|| {
        let max_basic = __cpuid_count(0, 0).eax;
        let max_extended = __cpuid_count(0x8000_0000, 0).eax;
        FEATURE_REGS
            .iter()
            .map(|fr| (fr.leaf, fr.subleaf))
            .filter(|&(leaf, _)| {
                if leaf >= 0x8000_0000 {
                    leaf <= max_extended
                } else {
                    leaf <= max_basic
                }
            })
            .fold(
                Vec::new(),
                |mut v: Vec<kvm_cpuid_entry2>, (leaf, subleaf)| {
                    if !v.iter().any(|e| e.function == leaf && e.index == subleaf) {
                        let r = __cpuid_count(leaf, subleaf);
                        v.push(kvm_cpuid_entry2 {
                            function: leaf,
                            index: subleaf,
                            eax: r.eax,
                            ebx: r.ebx,
                            ecx: r.ecx,
                            edx: r.edx,
                            ..Default::default()
                        });
                    }
                    v
                },
            )
    })
}

/// Checks that `host` (what this host offers, [`host_features`]) has every feature of
/// `snapshot` (the CPUID a snapshot's vCPU saw). `dir` names the snapshot in the error.
pub fn check(
    dir: &str,
    snapshot: &[kvm_cpuid_entry2],
    host: &[kvm_cpuid_entry2],
) -> Result<(), CpuCompatError> {
    if let (Some(s), Some(h)) = (vendor(snapshot), vendor(host)) {
        if s != h {
            return Err(CpuCompatError::Vendor {
                dir: dir.to_string(),
                snapshot: s,
                host: h,
            });
        }
    }
    let mut missing = Vec::new();
    for fr in FEATURE_REGS {
        let Some(saw) = find(snapshot, fr.leaf, fr.subleaf) else {
            continue;
        };
        let offered = find(host, fr.leaf, fr.subleaf).map_or(0, |e| fr.reg.get(e));
        let lacking = fr.reg.get(saw) & !offered & !fr.ignore;
        for bit in (0..32u8).filter(|b| lacking & (1 << b) != 0) {
            missing.push(match fr.names.iter().find(|(b, _)| *b == bit) {
                Some((_, name)) => (*name).to_string(),
                None => format!(
                    "cpuid.{:#x}.{}.{}[{bit}]",
                    fr.leaf,
                    fr.subleaf,
                    fr.reg.name()
                ),
            });
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(CpuCompatError::MissingFeatures {
            dir: dir.to_string(),
            missing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    const INTEL: (u32, u32, u32) = (0x756e_6547, 0x6c65_746e, 0x4965_6e69);

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0xd, INTEL.0, INTEL.1, INTEL.2),
            entry(1, 0, 0, 0, 1 | (1 << 28), 1 << 25),
            entry(7, 0, 0, 1 << 5, 0, 0),
        ]
    }

    #[test]
    fn the_same_cpu_passes() {
        let h = host();
        check("s", &host(), &h).unwrap();
    }

    #[test]
    fn host_features_cover_kvm_and_the_cpu() {
        let supported = CpuId::from_entries(&host()).unwrap();
        let h = host_features(&supported);
        check("s", &host(), &h).unwrap();
        // The CPU's own SSE2 (every x86-64 CPU has it), which `host()` leaves out.
        assert_ne!(find(&h, 1, 0).unwrap().edx & (1 << 26), 0);
    }

    #[test]
    fn missing_features_are_named() {
        let h = host();
        let mut snap = host();
        // avx512f (7.0 EBX 16), an unnamed bit (7.0 EBX 1), and OSXSAVE (ignored).
        snap[2].ebx |= (1 << 16) | (1 << 1);
        snap[1].ecx |= 1 << 27;
        let err = check("/snap/s1", &snap, &h).unwrap_err();
        assert_eq!(
            err,
            CpuCompatError::MissingFeatures {
                dir: "/snap/s1".into(),
                missing: vec!["cpuid.0x7.0.ebx[1]".into(), "avx512f".into()],
            }
        );
        assert!(err
            .to_string()
            .starts_with("snapshot /snap/s1 was taken on a CPU with cpuid.0x7.0.ebx[1], avx512f, which this host lacks"));
    }

    #[test]
    fn a_leaf_the_host_lacks_counts_as_missing() {
        let h = host();
        let mut snap = host();
        snap.push(entry(0x8000_0001, 0, 0, 0, 0, 1 << 29));
        let err = check("s", &snap, &h).unwrap_err();
        assert!(
            matches!(err, CpuCompatError::MissingFeatures { ref missing, .. } if missing == &["lm"])
        );
    }

    #[test]
    fn another_vendor_is_refused() {
        let h = host();
        let mut snap = host();
        // "AuthenticAMD"
        snap[0] = entry(0, 0, 0xd, 0x6874_7541, 0x444d_4163, 0x6974_6e65);
        let err = check("s", &snap, &h).unwrap_err();
        assert!(
            matches!(err, CpuCompatError::Vendor { ref snapshot, ref host, .. }
            if snapshot == "AuthenticAMD" && host == "GenuineIntel"),
            "{err:?}"
        );
    }
}
