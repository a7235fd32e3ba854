//! `fnode bench TARGET`: cold start, restore, in-place reset and the raw-KVM floor of one
//! function, measured in one run, with a table, JSON and an SVG of the CDFs; and
//! with `--density N`, N restored VMs kept alive at once, spread over worker processes
//! (`density`, `worker`).
//!
//! TARGET is a function image (the benchmark then takes a snapshot of it into a temporary
//! folder itself, as `fnode snapshot` does) or a snapshot directory (cold starts then need
//! `--image`). Cold boots run first, in a pass of their own: the benchmark's thread idles
//! ~5 ms through each one, and on this host the operation after such an idle stretch runs
//! slower, which interleaving would charge to the other modes. Then every iteration runs one
//! operation of each other mode, in an order that rotates, so host noise hits them alike. VMs
//! are torn down after the timer stopped (`--teardown`). Progress goes to stderr, the table
//! to stdout.
//!
//! What each mode times, and its host share (the VMM's own work before the guest runs):
//! - `cold`: build the VM, boot, init, connect, first response.
//! - `restore`: a fresh VM from the snapshot (memory mapped `MAP_PRIVATE`), attached to the
//!   invocation connection the snapshot holds, first response. Host share: restore
//!   requested to the first `KVM_RUN`.
//! - `reset`: in-place reset of a used VM (`fnode_vmm::MicroVm::reset`), then a response.
//!   Host share: the reset called (right after the previous response was read) to the next
//!   `KVM_RUN`. The guest's DONE after each response has the vCPU thread do the reset's work
//!   there, before the reset is called: that work is shown as the `at_done.*` phases, off
//!   the request path and not in the host share (a reset that ran when called shows its
//!   work as `settle`, `memory`, `vm_and_devices` and `vcpus` instead).
//! - `floor`: `fnode_vmm::bench::raw_floor` over the snapshot's memory file mapped
//!   `MAP_PRIVATE`: a fresh VM and vCPU, registers set, a few instructions to `hlt`. Host
//!   share: everything up to `KVM_RUN`.
//!
//! Counts per operation: userspace exits (`KVM_RUN` returns other than kicks); guest pages
//! first touched (pages the host had to back during the operation, from
//! `/proc/self/pagemap`: for a restore, all it mapped; for a reset, those not mapped before
//! it, the ones the reset dropped included); pages dirtied (restore: private copies made of
//! the snapshot's pages; reset: KVM's dirty log plus the pages devices wrote).

mod density;
mod ops;
mod plot;
mod pool;
mod probe;
mod stats;
mod teardown;
mod worker;

pub use worker::{run as run_worker, WorkerArgs};

use std::{
    io::Write as _,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::Context;
use fnode_guest::abi::frame::MAX_PAYLOAD;
use fnode_vmm::{builder::DEFAULT_MEM_MIB, KvmContext};
use serde_json::{json, Map, Value};

use fnode_vmm::{affinity::BuildCpu, ResetMode};
use ops::{Cold, FloorMemory};
use probe::PageMap;
use stats::{ModeKind, ModeStats};
use teardown::{Teardown, TeardownMode};

/// `fnode bench` options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A function image (`fnode build` writes it) or a snapshot directory (`fnode snapshot`
    /// writes it).
    pub target: PathBuf,
    /// Measured operations per mode.
    #[arg(long, short = 'n', value_name = "N", default_value_t = 100,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub iterations: u32,
    /// Unmeasured operations per mode first (page cache, lazy host setup).
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub warmup: u32,
    /// Write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write the latency CDFs as an SVG to FILE.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Also restore N VMs of the snapshot, keep them all alive and idle, and report the time
    /// and the host memory per VM.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub density: Option<u32>,
    /// Worker processes the density run spreads its VMs over (default: one per 64 VMs).
    #[arg(long, value_name = "K", requires = "density",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub density_workers: Option<u32>,
    /// Guest memory in MiB (cold starts and the snapshot taken of an image).
    #[arg(long, value_name = "MIB", default_value_t = DEFAULT_MEM_MIB)]
    pub mem: u64,
    /// The request every invocation sends (text).
    #[arg(long, value_name = "TEXT", default_value = "ping")]
    pub payload: String,
    /// The function image, when TARGET is a snapshot directory (for cold starts).
    #[arg(long, value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    /// Give up on an operation after this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout_ms: u64,
    /// How the reset mode puts guest memory back: `copy` (copy the snapshot's bytes over
    /// the dirtied pages) or `dontneed` (drop them; the next access faults them in again).
    #[arg(long, value_name = "copy|dontneed", default_value = "copy")]
    pub reset_mode: ResetMode,
    /// Where used VMs are torn down (never inside a timed operation): `inline` right after
    /// each operation, `batch` every 32 VMs between iterations, `background` on a thread
    /// of its own while the benchmark goes on.
    #[arg(long, value_enum, default_value_t = TeardownMode::Batch)]
    pub teardown: TeardownMode,
    /// Have restores map the snapshot's working set before the guest runs: records it
    /// first (one restored VM serving one request) into the snapshot directory's
    /// `working-set` file if the snapshot has none. A snapshot that has one is always
    /// restored with it.
    #[arg(long)]
    pub prefetch: bool,
    /// Leave modes out (comma-separated: cold,restore,reset,floor).
    #[arg(long, value_name = "MODES", value_delimiter = ',')]
    pub skip: Vec<String>,
    /// The CPU the benchmark builds VMs on (cold, restore and floor; resets, vCPU and
    /// device threads run anywhere): `boot`, where KVM completes a new VM's grace periods
    /// (see `fnode_vmm::affinity`), or `any`.
    #[arg(long, value_enum, default_value_t = BuildCpuChoice::Boot)]
    pub build_cpu: BuildCpuChoice,
}

/// `--build-cpu`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BuildCpuChoice {
    /// The boot CPU (`fnode_vmm::affinity`), when the process may use it and another.
    Boot,
    /// Wherever the scheduler puts the benchmark's thread.
    Any,
}

/// A folder only this user can enter, removed with everything in it on drop.
#[derive(Debug)]
struct WorkDir(PathBuf);

impl WorkDir {
    fn create() -> anyhow::Result<Self> {
        Self::create_in(&std::env::temp_dir())
    }

    /// A new folder in `base`.
    fn create_in(base: &Path) -> anyhow::Result<Self> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = base.join(format!("fnode-bench-{}-{nanos:08x}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .with_context(|| format!("cannot create a private folder in {}", base.display()))?;
        Ok(WorkDir(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Progress on stderr, at most about once a second.
struct Progress {
    last: Instant,
    start: Instant,
}

impl Progress {
    fn new() -> Self {
        let now = Instant::now();
        Progress {
            last: now,
            start: now,
        }
    }

    fn tick(&mut self, what: &str, done: u64, of: u64) {
        if self.last.elapsed() >= Duration::from_secs(1) || done == of {
            self.last = Instant::now();
            eprintln!(
                "fnode bench: {what} {done}/{of} ({:.1} s)",
                self.start.elapsed().as_secs_f64()
            );
        }
    }
}

/// Why a mode was left out.
#[derive(Debug, Default)]
struct Notes(Vec<(String, String)>);

impl Notes {
    fn add(&mut self, mode: &str, why: impl Into<String>) {
        let why = why.into();
        eprintln!("fnode bench: no {mode}: {why}");
        self.0.push((mode.to_owned(), why));
    }
}

/// Runs `fnode bench`.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.payload.len() > MAX_PAYLOAD {
        anyhow::bail!(
            "the payload is {} bytes, over the {MAX_PAYLOAD}-byte limit: send a smaller one",
            args.payload.len()
        );
    }
    let skip = |m: ModeKind| args.skip.iter().any(|s| s == m.name());
    for s in &args.skip {
        if !ModeKind::ALL.iter().any(|m| m.name() == s) {
            anyhow::bail!("--skip {s}: no such mode; modes are cold, restore, reset, floor");
        }
    }
    let kvm = KvmContext::new().context("cannot use KVM")?;
    let build_cpu = match args.build_cpu {
        BuildCpuChoice::Boot => fnode_vmm::affinity::build_on_boot_cpu()
            .context("cannot pin the benchmark's thread to the boot CPU (try --build-cpu any)")?,
        BuildCpuChoice::Any => BuildCpu::Unchanged,
    };
    let work = WorkDir::create()?;
    let timeout = Duration::from_millis(args.timeout_ms);
    let payload = args.payload.as_bytes();
    let mut notes = Notes::default();

    let meta = std::fs::metadata(&args.target)
        .with_context(|| format!("cannot read {}", args.target.display()))?;
    let (image, snapshot) = if meta.is_dir() {
        if args.image.is_none() && !skip(ModeKind::Cold) {
            notes.add(
                "cold",
                "TARGET is a snapshot directory: pass --image IMAGE to time cold starts",
            );
        }
        (args.image.clone(), args.target.clone())
    } else {
        let snap = snapshot_of(&kvm, &args.target, args.mem, work.path(), timeout)?;
        (Some(args.target.clone()), snap)
    };

    let floor_memory = {
        let path = fnode_snapshot::SnapshotDir::new(&snapshot).memory_path();
        let size = std::fs::metadata(&path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len();
        FloorMemory {
            path,
            size: usize::try_from(size).context("memory file too large")?,
        }
    };

    // Loaded once for every restore of the run (and the reset mode's VM): the restore times
    // start after it, and the table says what it cost.
    let mut loaded = fnode_vmm::LoadedSnapshot::load(&kvm, &snapshot)
        .with_context(|| format!("cannot load the snapshot {}", snapshot.display()))?;
    let mut prefetch_note = None;
    if args.prefetch && loaded.working_set().is_none() {
        let set = record_working_set(&kvm, &loaded, payload, timeout)?;
        prefetch_note = Some(format!(
            "restore: working set recorded ({} pages in {} runs: what one restored VM touched \
             serving one request) into {}",
            set.pages(),
            set.runs().len(),
            fnode_snapshot::SnapshotDir::new(&snapshot)
                .working_set_path()
                .display()
        ));
        loaded = fnode_vmm::LoadedSnapshot::load(&kvm, &snapshot)
            .with_context(|| format!("cannot load the snapshot {}", snapshot.display()))?;
    }
    let restore = ops::Restore {
        kvm: &kvm,
        snapshot: &loaded,
        payload,
        timeout,
    };
    // The VM the reset mode resets: restored with reset, and used once.
    let mut used = match skip(ModeKind::Reset) {
        false => {
            let mut f = restore.vm(Some(args.reset_mode))?;
            match f.call(payload, Instant::now() + timeout) {
                Ok(crate::client::Reply::Response(_)) => Some(f),
                Ok(crate::client::Reply::Error(m)) => anyhow::bail!(
                    "the function answered with an error: {}",
                    String::from_utf8_lossy(&m)
                ),
                Err(e) => return Err(e).context("the first invocation of the VM to reset failed"),
            }
        }
        true => None,
    };

    let cold = image
        .as_deref()
        .filter(|_| !skip(ModeKind::Cold))
        .map(|image| Cold {
            kvm: &kvm,
            image,
            mem_mib: args.mem,
            payload,
            timeout,
        });

    let mut pages = PageMap::open()?;
    let mut stats: Vec<ModeStats> = ModeKind::ALL.iter().map(|&k| ModeStats::new(k)).collect();
    let mut progress = Progress::new();
    let mut graves = Teardown::new(args.teardown);
    let rounds = args.warmup + args.iterations;
    // Cold boots first, in a pass of their own (see the module doc; measured here: a 5 ms
    // sleep before each restore added ~300 us to its p50 and ~200 us to its host share).
    let runs = |pass: Pass| {
        ModeKind::ALL
            .iter()
            .any(|&k| !skip(k) && Pass::of(k) == pass)
    };
    let passes: Vec<Pass> = [Pass::Cold, Pass::Others]
        .into_iter()
        .filter(|&p| runs(p))
        .collect();
    for (pass, i) in passes
        .into_iter()
        .flat_map(|pass| (0..rounds).map(move |i| (pass, i)))
    {
        let measured = i >= args.warmup;
        for j in 0..ModeKind::ALL.len() {
            // Rotate the order: no mode always runs right after another's teardown.
            let kind = ModeKind::ALL[(i as usize + j) % ModeKind::ALL.len()];
            if skip(kind) || pass != Pass::of(kind) {
                continue;
            }
            if build_cpu == BuildCpu::Pinned {
                // A reset builds nothing (no grace periods to wait for): the pin would only
                // keep the scheduler from placing this thread next to the VM's vCPU thread.
                // Re-pinning after a reset moves the thread here, outside any timed window.
                match kind {
                    ModeKind::Reset => fnode_vmm::affinity::run_anywhere(),
                    _ => {
                        fnode_vmm::affinity::build_on_boot_cpu()
                            .context("cannot pin the benchmark's thread to the boot CPU")?;
                    }
                }
            }
            let sample = match kind {
                ModeKind::Cold => match &cold {
                    Some(c) => {
                        let socket = work.path().join(format!("cold-{i}.sock"));
                        let (s, vm) = c
                            .sample(&socket, &mut pages)
                            .with_context(|| format!("cold start {i} failed"))?;
                        graves.bury(Box::new(vm));
                        Some(s)
                    }
                    None => None,
                },
                ModeKind::Restore => {
                    let (s, vm) = restore
                        .sample(&mut pages)
                        .with_context(|| format!("restore {i} failed"))?;
                    graves.bury(Box::new(vm));
                    Some(s)
                }
                ModeKind::Reset => match &mut used {
                    Some(f) => Some(
                        restore
                            .reset_sample(f, &mut pages)
                            .with_context(|| format!("reset {i} failed"))?,
                    ),
                    None => None,
                },
                ModeKind::Floor => Some(
                    ops::floor_sample(&kvm, &floor_memory)
                        .with_context(|| format!("floor run {i} failed"))?,
                ),
            };
            if let (true, Some(s)) = (measured, sample) {
                if let Some(m) = stats.iter_mut().find(|m| m.kind == kind) {
                    m.record(&s);
                }
            }
        }
        graves.between_iterations();
        if measured {
            progress.tick(
                pass.progress_label(),
                u64::from(i - args.warmup + 1),
                u64::from(args.iterations),
            );
        }
    }

    graves.finish();
    drop(used);
    let refs: Vec<&ModeStats> = stats.iter().collect();
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "fnode bench {} ({} iterations, payload {} bytes, floor over the snapshot's memory \
         file mapped MAP_PRIVATE)",
        args.target.display(),
        args.iterations,
        payload.len(),
    )?;
    write!(out, "{}", stats::table(&refs))?;
    writeln!(
        out,
        "{}",
        match build_cpu {
            BuildCpu::Pinned => format!(
                "cold, restore and floor built VMs from CPU {} (the boot CPU, --build-cpu boot); \
                 resets, vCPU and device threads ran on any CPU",
                fnode_vmm::affinity::BOOT_CPU
            ),
            BuildCpu::Unchanged => {
                "VMs built and reset from whichever CPU the scheduler chose".into()
            }
        }
    )?;
    if cold.is_some() {
        writeln!(
            out,
            "cold: measured in a pass of its own, before the other modes (which rotate): the \
             benchmark's thread idles through each boot, and the operation after an idle \
             stretch runs slower on some hosts"
        )?;
    }
    if !skip(ModeKind::Restore) || !skip(ModeKind::Reset) {
        writeln!(
            out,
            "restore: snapshot loaded once per process in {:.1} us (state and memory file \
             read and checked), not in the restore times",
            loaded.load_time().as_secs_f64() * 1e6
        )?;
        writeln!(
            out,
            "restore: once per process, not per VM: the device event loop thread and its \
             io_uring (started by the first VM, shared by all); per VM: a vCPU thread from the \
             process's pool (a parked one when a torn-down VM left one; the warm-up fills it)"
        )?;
        if let Some(note) = &prefetch_note {
            writeln!(out, "{note}")?;
        }
        if let Some(set) = loaded.working_set() {
            writeln!(
                out,
                "restore: each restore maps the snapshot's working set ({} pages) before the \
                 guest runs (in map_memory)",
                set.pages()
            )?;
        }
    }
    for (mode, why) in &notes.0 {
        writeln!(out, "no {mode}: {why}")?;
    }

    let density = match args.density {
        None => None,
        Some(n) => {
            // The workers restore on every CPU, each as it is scheduled: they must not
            // inherit this thread's pin.
            fnode_vmm::affinity::run_anywhere();
            let plan = density::DensityPlan {
                snapshot: &snapshot,
                vms: n,
                workers: args.density_workers,
                timeout,
            };
            let d = density::run(&plan)?;
            writeln!(out, "{d}")?;
            Some(d)
        }
    };
    drop(out);

    if let Some(path) = &args.json {
        let floor_p50 = stats
            .iter()
            .find(|m| m.kind == ModeKind::Floor && m.len() > 0)
            .map(|m| m.quantile(0.5));
        let mut doc = Map::new();
        for m in stats.iter().filter(|m| m.len() > 0) {
            doc.insert(m.kind.name().into(), m.to_json(floor_p50));
        }
        if let Some(d) = &density {
            doc.insert("density".into(), d.to_json());
        }
        if !notes.0.is_empty() {
            let skipped: Map<String, Value> = notes
                .0
                .iter()
                .map(|(m, why)| (m.clone(), json!(why)))
                .collect();
            doc.insert("notes".into(), Value::Object(skipped));
        }
        doc.insert("iterations".into(), json!(args.iterations));
        doc.insert(
            "build_cpu".into(),
            json!(match build_cpu {
                BuildCpu::Pinned => "boot",
                BuildCpu::Unchanged => "any",
            }),
        );
        doc.insert("payload_bytes".into(), json!(payload.len()));
        let text = serde_json::to_string_pretty(&Value::Object(doc))?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        let title = format!(
            "fnode bench {}: latency CDF ({} iterations)",
            args.target.file_name().map_or_else(
                || args.target.display().to_string(),
                |n| n.to_string_lossy().into_owned()
            ),
            args.iterations
        );
        std::fs::write(path, plot::cdf_svg(&title, &refs))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Restores one VM of `loaded`, has it serve one request and records the pages it touched
/// as the snapshot's working set.
fn record_working_set(
    kvm: &KvmContext,
    loaded: &fnode_vmm::LoadedSnapshot,
    payload: &[u8],
    timeout: Duration,
) -> anyhow::Result<fnode_snapshot::WorkingSet> {
    let probe = ops::Restore {
        kvm,
        snapshot: loaded,
        payload,
        timeout,
    };
    let mut f = probe.vm(None)?;
    match f.call(payload, Instant::now() + timeout) {
        Ok(crate::client::Reply::Response(_)) => {}
        Ok(crate::client::Reply::Error(m)) => anyhow::bail!(
            "the function answered with an error: {}",
            String::from_utf8_lossy(&m)
        ),
        Err(e) => return Err(e).context("the invocation to record the working set failed"),
    }
    fnode_vmm::record_working_set(f.vm(), loaded.dir()).with_context(|| {
        format!(
            "cannot record the working set of {}",
            loaded.dir().display()
        )
    })
}

/// The benchmark's two passes over its iterations: cold boots, then the other modes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pass {
    Cold,
    Others,
}

impl Pass {
    fn of(kind: ModeKind) -> Pass {
        match kind {
            ModeKind::Cold => Pass::Cold,
            _ => Pass::Others,
        }
    }

    fn progress_label(self) -> &'static str {
        match self {
            Pass::Cold => "cold boot",
            Pass::Others => "iteration",
        }
    }
}

/// Takes a snapshot of `image` into `work/snapshot` for the restore and reset modes (and
/// the floor's memory file).
fn snapshot_of(
    kvm: &KvmContext,
    image: &Path,
    mem_mib: u64,
    work: &Path,
    timeout: Duration,
) -> anyhow::Result<PathBuf> {
    let dir = work.join("snapshot");
    let console = crate::snapshot::ConsoleBuf::new(false);
    let t = crate::snapshot::take(kvm, image, &dir, mem_mib, timeout, console)
        .with_context(|| format!("cannot snapshot {} to benchmark it", image.display()))?;
    eprintln!(
        "fnode bench: snapshot of {} taken (init {:.1} ms, {} data pages)",
        image.display(),
        t.init.as_secs_f64() * 1e3,
        t.report.memory.data_pages
    );
    Ok(dir)
}
