//! The raw-KVM floor: the least work any VMM does to run guest code, timed by phase.
//!
//! [`raw_floor`]: `KVM_CREATE_VM`, the TSS address, guest memory (mapped and registered),
//! `KVM_CREATE_VCPU`, the entry registers, then `KVM_RUN` of three instructions ending in
//! `hlt`. No irqchip, no devices, no CPUID. Benchmarks run it next to fnode's real paths in the
//! same run and report ratios, so host noise cancels out: [`boot_vs_floor`] interleaves floor
//! runs with cold boots (and whole `fnode-vmm` and QEMU microvm processes), [`restore_vs_floor`]
//! with restores; both report percentiles of every phase in a [`PhaseReport`].

use std::fmt;
use std::io;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use fnode_guest::abi::exit;
use fnode_guest::abi::layout::KERNEL_START;
use kvm_ioctls::VcpuExit;
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::builder::{self, BuildError, BuildTimings, VmConfig};
use crate::kvm::KvmContext;
use crate::microvm::MicroVmError;
use crate::vstate::memory::{self, MemoryBacking, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::{Vm, VmError};

/// The floor's guest, 32-bit protected mode: `mov eax, 0x1234; add eax, 1; hlt`.
const FLOOR_CODE: [u8; 9] = [0xb8, 0x34, 0x12, 0x00, 0x00, 0x83, 0xc0, 0x01, 0xf4];
/// What `eax` holds when the floor guest halts.
const FLOOR_RESULT: u64 = 0x1235;

/// Errors of the floor benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// VM setup failed.
    #[error("floor VM setup failed")]
    Vm(#[source] VmError),
    /// Guest memory could not be created.
    #[error("floor guest memory failed")]
    Memory(#[source] MemoryError),
    /// vCPU setup or run failed.
    #[error("floor vCPU failed")]
    Vcpu(#[source] VcpuError),
    /// The guest code could not be written.
    #[error("cannot write the floor guest code")]
    Code(#[source] GuestMemoryError),
    /// The guest stopped for something other than `hlt`.
    #[error("floor guest stopped with an unexpected exit: {0}")]
    UnexpectedExit(String),
    /// The VM of a boot sample could not be built.
    #[error("benchmark boot: cannot build the VM")]
    Build(#[source] BuildError),
    /// The VM of a boot sample could not be run.
    #[error("benchmark boot: cannot run the VM")]
    Run(#[source] MicroVmError),
    /// The guest of a boot sample did not exit with success.
    #[error("benchmark boot did not succeed: {0}")]
    BootFailed(String),
    /// A whole-process boot (fnode-vmm or a peer VMM) could not be started.
    #[error("benchmark: cannot start {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A whole-process boot ended with the wrong exit code.
    #[error("benchmark: {program} exited with {code:?}, expected {expected}")]
    ProcessFailed {
        /// The program.
        program: String,
        /// Its exit code (`None`: killed by a signal).
        code: Option<i32>,
        /// The code a good boot gives.
        expected: i32,
    },
    /// A snapshot could not be restored.
    #[error("benchmark restore failed")]
    Restore(#[source] crate::restore::RestoreError),
    /// The snapshot's memory file could not be opened for the floor.
    #[error("cannot open {} for the floor", path.display())]
    SnapshotMemory {
        /// The memory file.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The guest halted with the wrong result (it did not run the code).
    #[error("floor guest halted with eax {rax:#x}, expected {FLOOR_RESULT:#x}")]
    WrongResult {
        /// `rax` at the halt.
        rax: u64,
    },
}

/// Time of each phase of [`raw_floor`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloorTimings {
    /// `KVM_CREATE_VM`.
    pub create_vm: Duration,
    /// `KVM_SET_TSS_ADDR`.
    pub set_tss: Duration,
    /// mmap of guest memory.
    pub map_memory: Duration,
    /// `KVM_SET_USER_MEMORY_REGION`.
    pub register_memory: Duration,
    /// `KVM_CREATE_VCPU`.
    pub create_vcpu: Duration,
    /// Writing the code page and the entry registers (`KVM_GET/SET_SREGS`, `KVM_SET_REGS`).
    pub set_registers: Duration,
    /// `KVM_RUN` until `hlt`.
    pub run_to_hlt: Duration,
    /// Everything above.
    pub total: Duration,
}

/// The floor's series names, in [`FloorTimings::phases`] order.
const FLOOR_SERIES: [&str; 9] = [
    "floor.create_vm",
    "floor.set_tss",
    "floor.map_memory",
    "floor.register_memory",
    "floor.create_vcpu",
    "floor.set_registers",
    "floor.to_run",
    "floor.run_to_hlt",
    "floor.total",
];

impl FloorTimings {
    /// Every phase in [`FLOOR_SERIES`] order; `to_run` is everything before `KVM_RUN`.
    fn phases(&self) -> [Duration; 9] {
        [
            self.create_vm,
            self.set_tss,
            self.map_memory,
            self.register_memory,
            self.create_vcpu,
            self.set_registers,
            self.total.saturating_sub(self.run_to_hlt),
            self.run_to_hlt,
            self.total,
        ]
    }
}

impl FloorTimings {
    /// The phases before `KVM_RUN` (the floor's host share), named as a restore's are.
    pub fn host_phases(&self) -> [(&'static str, Duration); 6] {
        [
            ("create_vm", self.create_vm),
            ("set_tss", self.set_tss),
            ("map_memory", self.map_memory),
            ("register_memory", self.register_memory),
            ("create_vcpu", self.create_vcpu),
            ("set_registers", self.set_registers),
        ]
    }
}

/// Empty series for the floor's phases.
fn floor_series() -> Vec<Series> {
    FLOOR_SERIES.iter().map(|n| Series::new(n)).collect()
}

/// Records one floor run in `series` (made by [`floor_series`]).
fn record_floor(series: &mut [Series], t: &FloorTimings) {
    for (s, d) in series.iter_mut().zip(t.phases()) {
        s.record(d);
    }
}

/// Runs the floor once with `mem_size` bytes of guest memory backed by `backing`.
pub fn raw_floor(
    kvm: &KvmContext,
    mem_size: usize,
    backing: MemoryBacking,
) -> Result<FloorTimings, BenchError> {
    let mut t = FloorTimings::default();
    let start = Instant::now();
    let mut last = start;
    let mut lap = || {
        let now = Instant::now();
        let d = now - last;
        last = now;
        d
    };

    let mut vm = Vm::create(kvm.kvm()).map_err(BenchError::Vm)?;
    t.create_vm = lap();
    vm.set_tss_address().map_err(BenchError::Vm)?;
    t.set_tss = lap();
    let mem = memory::create(mem_size, backing).map_err(BenchError::Memory)?;
    t.map_memory = lap();
    vm.register_memory(&mem).map_err(BenchError::Vm)?;
    t.register_memory = lap();
    let mut vcpu = Vcpu::create(&vm, 0).map_err(BenchError::Vcpu)?;
    t.create_vcpu = lap();
    let entry = GuestAddress(KERNEL_START);
    mem.write_slice(&FLOOR_CODE, entry)
        .map_err(BenchError::Code)?;
    vcpu.setup_pvh_regs(entry, GuestAddress(0))
        .map_err(BenchError::Vcpu)?;
    t.set_registers = lap();
    loop {
        match vcpu.fd_mut().run() {
            Ok(VcpuExit::Hlt) => break,
            Ok(other) => return Err(BenchError::UnexpectedExit(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return Err(BenchError::Vcpu(VcpuError::Run(e))),
        }
    }
    t.run_to_hlt = lap();
    t.total = start.elapsed();

    let rax = vcpu
        .fd()
        .get_regs()
        .map_err(|e| BenchError::Vcpu(VcpuError::GetRegs(e)))?
        .rax;
    if rax != FLOOR_RESULT {
        return Err(BenchError::WrongResult { rax });
    }
    Ok(t)
}

/// One timed cold boot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootSample {
    /// The build phases.
    pub build: BuildTimings,
    /// From resume to the guest's exit.
    pub run: Duration,
}

/// Builds and runs `config` once, discarding the console; the guest must exit with success.
pub fn boot_sample(
    kvm: &KvmContext,
    config: &VmConfig,
    timeout: Duration,
) -> Result<BootSample, BenchError> {
    let mut vm = builder::build(kvm, config, Box::new(io::sink())).map_err(BenchError::Build)?;
    let report = vm.run(timeout).map_err(BenchError::Run)?;
    if !report.outcome.is_success() {
        return Err(BenchError::BootFailed(report.outcome.to_string()));
    }
    Ok(BootSample {
        build: *vm.build_timings(),
        run: report.run_time,
    })
}

/// Runs `cmd` to completion with its output discarded and times it, from spawn to exit.
/// It must exit with `expected` (a boot that fails is not a sample).
pub fn process_sample(cmd: &mut Command, expected: i32) -> Result<Duration, BenchError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = Instant::now();
    let status = cmd.status().map_err(|source| BenchError::Spawn {
        program: program.clone(),
        source,
    })?;
    let elapsed = start.elapsed();
    if status.code() != Some(expected) {
        return Err(BenchError::ProcessFailed {
            program,
            code: status.code(),
            expected,
        });
    }
    Ok(elapsed)
}

/// The QEMU peer: `image` under `qemu-system-x86_64 -M microvm` with KVM, COM1 and the exit
/// port, the same machine `scripts/qemu-boot.sh` checks images with. A good boot exits with
/// [`QEMU_SUCCESS`].
pub fn qemu_microvm_command(image: &Path, mem_mib: u64, cmdline: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,isa-serial=on,rtc=off,pic=off,pit=off"])
        .args(["-accel", "kvm", "-cpu", "host", "-smp", "1"])
        .args(["-m", &format!("{mem_mib}M")])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "null"])
        .args([
            "-device",
            &format!("isa-debug-exit,iobase={:#x},iosize=4", exit::PORT),
        ])
        .arg("-kernel")
        .arg(image)
        .args(["-append", cmdline]);
    cmd
}

/// QEMU's process exit code when the guest exits with [`exit::SUCCESS`].
pub const QEMU_SUCCESS: i32 = exit::qemu_exit_code(exit::SUCCESS);

/// Percentiles of one timed quantity, in nanoseconds.
#[derive(Debug)]
pub struct Series {
    /// What was timed.
    pub name: &'static str,
    hist: Histogram<u64>,
}

impl Series {
    /// An empty series.
    pub fn new(name: &'static str) -> Self {
        Series {
            name,
            // 1 ns .. 100 s at three significant digits; creation cannot fail for these bounds.
            hist: Histogram::new_with_bounds(1, 100_000_000_000, 3)
                .unwrap_or_else(|_| unreachable!("valid histogram bounds")),
        }
    }

    /// Adds one sample.
    pub fn record(&mut self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.hist.saturating_record(ns.max(1));
    }

    /// The `q` quantile (0.0..=1.0).
    pub fn quantile(&self, q: f64) -> Duration {
        Duration::from_nanos(self.hist.value_at_quantile(q))
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        self.hist.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.hist.is_empty()
    }
}

/// The result of [`boot_vs_floor`] and [`restore_vs_floor`]: percentiles of every timed
/// phase (floor phases first), and the p50 ratios that compare them, all from one run.
#[derive(Debug)]
pub struct PhaseReport {
    /// Every series, in the order printed.
    pub series: Vec<Series>,
    /// Pairs `(a, b)` whose `p50(a) / p50(b)` the report prints.
    pub ratios: &'static [(&'static str, &'static str)],
}

impl PhaseReport {
    /// p50 of series `a` over p50 of series `b`.
    pub fn p50_ratio(&self, a: &str, b: &str) -> Option<f64> {
        let p50 = |name: &str| Some(self.series.iter().find(|s| s.name == name)?.quantile(0.5));
        let (a, b) = (p50(a)?, p50(b)?);
        (!b.is_zero()).then(|| a.as_secs_f64() / b.as_secs_f64())
    }
}

impl fmt::Display for PhaseReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<24} {:>6} {:>10} {:>10} {:>10} {:>10}",
            "phase", "n", "p50 us", "p90 us", "p99 us", "max us"
        )?;
        for s in &self.series {
            let us = |q: f64| s.quantile(q).as_secs_f64() * 1e6;
            writeln!(
                f,
                "{:<24} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
                s.name,
                s.len(),
                us(0.5),
                us(0.9),
                us(0.99),
                us(1.0)
            )?;
        }
        for &(a, b) in self.ratios {
            if let Some(r) = self.p50_ratio(a, b) {
                writeln!(f, "{a} p50 / {b} p50 = {r:.3}")?;
            }
        }
        Ok(())
    }
}

/// A whole-process boot to time next to the in-process ones: a command, the exit code a good
/// boot gives, and the series name (`process.<name>`).
#[derive(Debug)]
pub struct ProcessBoot {
    /// The series name, e.g. `process.qemu-microvm`.
    pub name: &'static str,
    /// The command that boots the image once.
    pub command: Command,
    /// Its exit code on a good boot.
    pub expected: i32,
}

/// Runs `runs` floor runs, `runs` cold boots of `config` and `runs` of each whole-process
/// boot in `processes`, interleaved so that host noise hits all alike, and reports the
/// percentiles of every phase. The floor uses the same memory size as the boots.
pub fn boot_vs_floor(
    kvm: &KvmContext,
    config: &VmConfig,
    runs: u32,
    timeout: Duration,
    mut processes: Vec<ProcessBoot>,
) -> Result<PhaseReport, BenchError> {
    const BOOT: [&str; 12] = [
        "build.create_vm",
        "build.map_memory",
        "build.register_memory",
        "build.irqchip",
        "build.load_kernel",
        "build.devices",
        "build.create_vcpus",
        "build.setup_vcpus",
        "build.start_threads",
        "build.total",
        "boot.guest_run",
        "boot.total",
    ];
    let mut floor = floor_series();
    let mut boot: Vec<Series> = BOOT.iter().map(|n| Series::new(n)).collect();
    let mut process: Vec<Series> = processes.iter().map(|p| Series::new(p.name)).collect();
    let mem_size = usize::try_from(config.mem_mib << 20).unwrap_or(usize::MAX);
    for _ in 0..runs {
        let t = raw_floor(kvm, mem_size, MemoryBacking::Anonymous)?;
        record_floor(&mut floor, &t);
        let b = boot_sample(kvm, config, timeout)?;
        let p = b.build;
        let phases = [
            p.create_vm,
            p.map_memory,
            p.register_memory,
            p.irqchip,
            p.load_kernel,
            p.devices,
            p.create_vcpus,
            p.setup_vcpus,
            p.start_threads,
            p.total,
            b.run,
            p.total + b.run,
        ];
        for (s, d) in boot.iter_mut().zip(phases) {
            s.record(d);
        }
        for (s, p) in process.iter_mut().zip(&mut processes) {
            s.record(process_sample(&mut p.command, p.expected)?);
        }
    }
    Ok(PhaseReport {
        series: floor.into_iter().chain(boot).chain(process).collect(),
        ratios: &[
            ("build.total", "floor.total"),
            ("boot.total", "floor.total"),
            ("process.fnode-vmm", "process.qemu-microvm"),
            ("boot.total", "process.qemu-microvm"),
        ],
    })
}

/// Runs `runs` floor runs over the memory file of the snapshot in `dir` (mapped
/// `MAP_PRIVATE`, as a restore maps it) and `runs` restores of the snapshot, each run to the
/// guest's exit (which must be a success), interleaved so that host noise hits both alike.
pub fn restore_vs_floor(
    kvm: &KvmContext,
    dir: &Path,
    runs: u32,
    timeout: Duration,
) -> Result<PhaseReport, BenchError> {
    const RESTORE: [&str; 14] = [
        "restore.validate",
        "restore.create_vm",
        "restore.map_memory",
        "restore.register_memory",
        "restore.irqchip",
        "restore.vm_state",
        "restore.devices",
        "restore.vcpus",
        "restore.start_threads",
        "restore.total",
        "restore.to_first_run",
        "restore.guest_run",
        "restore.to_exit",
        "restore.teardown",
    ];
    let mut floor = floor_series();
    let mut restore: Vec<Series> = RESTORE.iter().map(|n| Series::new(n)).collect();
    let memory_path = fnode_snapshot::SnapshotDir::new(dir).memory_path();
    for _ in 0..runs {
        let file =
            std::fs::File::open(&memory_path).map_err(|source| BenchError::SnapshotMemory {
                path: memory_path.clone(),
                source,
            })?;
        let mem_size = file
            .metadata()
            .map_err(|source| BenchError::SnapshotMemory {
                path: memory_path.clone(),
                source,
            })?
            .len();
        let t = raw_floor(
            kvm,
            usize::try_from(mem_size).unwrap_or(usize::MAX),
            MemoryBacking::PrivateFile(file),
        )?;
        record_floor(&mut floor, &t);

        let mut vm =
            crate::restore::restore(kvm, dir, Box::new(io::sink())).map_err(BenchError::Restore)?;
        let report = vm.run(timeout).map_err(BenchError::Run)?;
        let exited = Instant::now();
        if !report.outcome.is_success() {
            return Err(BenchError::BootFailed(report.outcome.to_string()));
        }
        let (Some(r), Some(to_first_run)) =
            (vm.restore_timings().copied(), vm.restore_to_first_run())
        else {
            return Err(BenchError::BootFailed("the restored VM never ran".into()));
        };
        let teardown = Instant::now();
        drop(vm);
        let phases = [
            r.validate,
            r.create_vm,
            r.map_memory,
            r.register_memory,
            r.irqchip,
            r.vm_state,
            r.devices,
            r.vcpus,
            r.start_threads,
            r.total,
            to_first_run,
            report.run_time,
            exited.saturating_duration_since(r.requested_at),
            teardown.elapsed(),
        ];
        for (s, d) in restore.iter_mut().zip(phases) {
            s.record(d);
        }
    }
    Ok(PhaseReport {
        series: floor.into_iter().chain(restore).collect(),
        ratios: &[
            ("restore.to_first_run", "floor.to_run"),
            ("restore.total", "floor.to_run"),
            ("restore.to_exit", "floor.total"),
        ],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_runs_to_hlt() {
        if !crate::kvm::test_support::require_kvm() {
            return;
        }
        let kvm = KvmContext::new().unwrap();
        let t = raw_floor(&kvm, 16 << 20, MemoryBacking::Anonymous).unwrap();
        assert!(t.total >= t.run_to_hlt);
    }

    #[test]
    fn series_quantiles() {
        let mut s = Series::new("x");
        assert!(s.is_empty());
        for us in 1..=100u64 {
            s.record(Duration::from_micros(us));
        }
        assert_eq!(s.len(), 100);
        let p50 = s.quantile(0.5).as_micros();
        assert!((49..=51).contains(&p50), "{p50}");
        assert!(s.quantile(1.0) >= Duration::from_micros(100));
    }
}
