//! `--density N`: N VMs restored from one snapshot, all alive and idle at once (each vCPU
//! halted in the guest, waiting for a request), spread over worker processes
//! (`fnode density-worker`: see `worker` for why and how), timed from the start of the
//! first worker to the last VM running, with the host memory they cost.
//!
//! Host memory per VM is the growth of the workers' PSS (`/proc/<pid>/smaps_rollup`: pages
//! the VMs share through the snapshot's page cache count once, divided among the mappers)
//! from before their first VM to all VMs idle, over N. Both readings are taken with every
//! worker alive, so the pages the workers share (the binary, libraries) are divided alike
//! both times and cancel out. The kernel's own memory per VM (KVM's structures, page
//! tables, thread stacks) is not in any process's PSS; the drop of `MemAvailable` over the
//! same span, over N, is reported next to it as the system's view (noisier: anything else
//! on the host moves it too).

use std::{
    ffi::OsString,
    fmt,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde_json::{json, Map, Value};

use super::pool::{Pool, PoolError};
use super::probe::{self, MemoryUse, ProbeError};
use super::worker::{Report, Share, Tenth, GO};
use super::WorkDir;

/// VMs per worker process when `--density-workers` is not given. Bringing up a VM costs
/// more CPU the more VMs its process has (see `worker`): measured for 1,000 VMs on a 2-core
/// host, 1.75 ms per VM with 500 VMs per worker, 1.15 ms with 125, 1.0 ms with 63, no less
/// with 40; each process costs start-up time (~2 ms) and memory of its own.
pub const VMS_PER_WORKER: u32 = 64;
/// Time a worker may take per VM of its share, on top of `--timeout-ms`, before the run
/// gives up on it.
const PER_VM_BUDGET: Duration = Duration::from_millis(50);
/// `MemAvailable` holds still once it moves less than this (KiB) in a [`QUIET_STEP`].
const QUIET_KIB: u64 = 512;
/// How often `MemAvailable` is read while waiting for it to hold still.
const QUIET_STEP: Duration = Duration::from_millis(100);
/// The longest wait for `MemAvailable` to hold still.
const QUIET_MAX: Duration = Duration::from_secs(3);

/// Errors of a density run.
#[derive(Debug, thiserror::Error)]
pub enum DensityError {
    /// The worker processes failed.
    #[error("density run failed")]
    Pool(#[source] PoolError),
    /// A worker's memory could not be read.
    #[error("cannot read a worker's memory use")]
    Probe(#[source] ProbeError),
    /// A worker broke off or said something unexpected.
    #[error("density worker {worker} {what}")]
    Worker {
        /// Which.
        worker: usize,
        /// What happened.
        what: String,
    },
    /// The folder for the VMs' sockets could not be made.
    #[error("cannot create a folder for the VMs' sockets")]
    Folder(#[source] anyhow::Error),
}

/// What a density run is asked to do.
#[derive(Clone, Copy, Debug)]
pub struct DensityPlan<'a> {
    /// The snapshot directory to restore.
    pub snapshot: &'a Path,
    /// VMs in all.
    pub vms: u32,
    /// Worker processes; `None`: one per [`VMS_PER_WORKER`] VMs.
    pub workers: Option<u32>,
    /// The longest a restore may take (also the start-up allowance of the workers).
    pub timeout: Duration,
}

/// What a density run found.
#[derive(Debug, Default)]
pub struct DensityReport {
    /// VMs asked for.
    pub wanted: u32,
    /// VMs alive at once.
    pub vms: u32,
    /// Worker processes.
    pub workers: u32,
    /// From the first worker's start to the last VM in the guest.
    pub elapsed: Duration,
    /// From the first worker's start to every worker ready to restore (each has loaded the
    /// snapshot by then).
    pub startup: Duration,
    /// Loading the snapshot (state and memory file read and checked), once per worker: the mean
    /// over the workers, microseconds. Not in any VM's bring-up time.
    pub load_us: f64,
    /// PSS growth of the workers per VM, KiB.
    pub pss_kib_per_vm: f64,
    /// RSS growth of the workers per VM, KiB.
    pub rss_kib_per_vm: f64,
    /// Drop of the host's `MemAvailable` per VM, KiB (kernel memory included).
    pub system_kib_per_vm: Option<f64>,
    /// Growth of the kernel's own counted memory per VM, KiB (see [`MemInfo::kernel`]).
    pub kernel_kib_per_vm: Option<f64>,
    /// A worker's own PSS before its first VM (mean), KiB.
    pub worker_base_kib: f64,
    /// Open file descriptors per VM.
    pub fds_per_vm: f64,
    /// Threads per VM.
    pub threads_per_vm: f64,
    /// CPU time (user + system, all workers) per VM restored, microseconds.
    pub cpu_us_per_vm: f64,
    /// One VM's bring-up among the first tenth of each worker's VMs (at most 100 each).
    pub first: Option<Tenth>,
    /// The same among the last tenth: how it grows with the VMs already in the process.
    pub last: Option<Tenth>,
    /// The open-file limit of a worker (the lowest).
    pub fd_limit: u64,
    /// From "stop" to every worker gone (its VMs torn down by the kernel).
    pub teardown: Option<Duration>,
    /// Why fewer than `wanted` VMs came up.
    pub stopped_by: Option<String>,
}

fn r1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// `{"phase": us, ..}` of a tenth.
fn phases_json(t: &Tenth) -> Value {
    let m: Map<String, Value> = t
        .phases_us
        .iter()
        .map(|(name, us)| (name.clone(), json!(r1(*us))))
        .collect();
    Value::Object(m)
}

impl DensityReport {
    /// The JSON object: `vms`, `seconds`, `host_kib_per_vm` (PSS), and the rest.
    pub fn to_json(&self) -> Value {
        let secs = |d: Duration| (d.as_secs_f64() * 1e4).round() / 1e4;
        let mut v = json!({
            "vms": self.vms,
            "wanted": self.wanted,
            "workers": self.workers,
            "seconds": secs(self.elapsed),
            "startup_seconds": secs(self.startup),
            "snapshot_load_us_per_worker": r1(self.load_us),
            "host_kib_per_vm": r1(self.pss_kib_per_vm),
            "rss_kib_per_vm": r1(self.rss_kib_per_vm),
            "worker_base_kib": r1(self.worker_base_kib),
            "fds_per_vm": r1(self.fds_per_vm),
            "threads_per_vm": r1(self.threads_per_vm),
            "cpu_us_per_vm": r1(self.cpu_us_per_vm),
            "fd_limit": self.fd_limit,
        });
        if let Some(s) = self.system_kib_per_vm {
            v["system_kib_per_vm"] = json!(r1(s));
        }
        if let Some(s) = self.kernel_kib_per_vm {
            v["kernel_kib_per_vm"] = json!(r1(s));
        }
        if let Some(t) = &self.first {
            v["first_tenth_us_per_vm"] = json!(r1(t.us_per_vm));
            v["first_tenth_cpu_us_per_vm"] = json!(r1(t.cpu_us_per_vm));
            v["first_tenth_phases_us"] = phases_json(t);
        }
        if let Some(t) = &self.last {
            v["last_tenth_us_per_vm"] = json!(r1(t.us_per_vm));
            v["last_tenth_cpu_us_per_vm"] = json!(r1(t.cpu_us_per_vm));
            v["last_tenth_phases_us"] = phases_json(t);
        }
        if let Some(t) = self.teardown {
            v["teardown_seconds"] = json!(secs(t));
        }
        if let Some(why) = &self.stopped_by {
            v["stopped_by"] = json!(why);
        }
        v
    }
}

impl fmt::Display for DensityReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "density: {} VMs alive and idle in {:.3} s ({:.1} us/VM; {} worker processes, up \
             in {:.3} s, each loads the snapshot once: {:.0} us); host memory per VM: {:.1} KiB \
             PSS, {:.1} KiB RSS",
            self.vms,
            self.elapsed.as_secs_f64(),
            self.elapsed.as_secs_f64() * 1e6 / f64::from(self.vms.max(1)),
            self.workers,
            self.startup.as_secs_f64(),
            self.load_us,
            self.pss_kib_per_vm,
            self.rss_kib_per_vm
        )?;
        if let Some(s) = self.system_kib_per_vm {
            write!(f, ", {s:.1} KiB of MemAvailable")?;
        }
        if let Some(s) = self.kernel_kib_per_vm {
            write!(f, " ({s:.1} KiB in counted kernel memory)")?;
        }
        write!(
            f,
            "; {:.1} fds, {:.1} threads (its vCPU's, KVM's own worker, and its share of each \
             worker's device loop and vCPU pool threads), {:.0} us of CPU per VM",
            self.fds_per_vm, self.threads_per_vm, self.cpu_us_per_vm
        )?;
        if let (Some(first), Some(last)) = (&self.first, &self.last) {
            write!(
                f,
                "\ndensity: one VM takes {:.0} us ({:.0} us CPU of the restoring thread) among \
                 the first tenth of a worker's VMs, {:.0} us ({:.0} us CPU) among the last (wall \
                 time: workers share the CPUs)",
                first.us_per_vm, first.cpu_us_per_vm, last.us_per_vm, last.cpu_us_per_vm
            )?;
            if !first.phases_us.is_empty() {
                write!(f, "\ndensity: phases, first -> last tenth (us):")?;
                for ((name, a), (_, b)) in first.phases_us.iter().zip(&last.phases_us) {
                    write!(f, " {name} {a:.0}->{b:.0}")?;
                }
            }
        }
        if let Some(t) = self.teardown {
            write!(
                f,
                "\ndensity: workers and VMs gone {:.3} s after the stop",
                t.as_secs_f64()
            )?;
        }
        if let Some(why) = &self.stopped_by {
            write!(
                f,
                "\ndensity: stopped at {} of {} VMs (open-file limit {} per worker): {why}",
                self.vms, self.wanted, self.fd_limit
            )?;
        }
        Ok(())
    }
}

/// The host's memory as `/proc/meminfo` counts it, KiB.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct MemInfo {
    /// `MemAvailable`.
    available: u64,
    /// The kernel's own memory that VMs grow: `SUnreclaim` (KVM's and the devices' slab
    /// objects), `KernelStack` (their threads), `PageTables` + `SecPageTables` (the host's
    /// and KVM's page tables), `VmallocUsed` and `Percpu`. Pages the kernel allocates
    /// without a counter are missing from it.
    kernel: u64,
}

/// Reads [`MemInfo`].
fn meminfo() -> Option<MemInfo> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(':')?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
    };
    let kernel = [
        "SUnreclaim",
        "KernelStack",
        "PageTables",
        "SecPageTables",
        "VmallocUsed",
        "Percpu",
    ]
    .iter()
    .filter_map(|f| field(f))
    .sum();
    Some(MemInfo {
        available: field("MemAvailable")?,
        kernel,
    })
}

/// `TMPFS_MAGIC` of statfs(2).
const TMPFS_MAGIC: libc::c_long = 0x0102_1994;

/// Whether `path` is on a tmpfs.
fn is_tmpfs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: all-zero is a valid statfs for statfs to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid statfs.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == TMPFS_MAGIC }
}

/// Where the VMs' sockets go (each VM makes a folder and a socket there): a tmpfs if there
/// is one (`$XDG_RUNTIME_DIR`, then `/dev/shm`), else the temporary folder. On a disk file
/// system every folder and socket costs an inode allocation, which on ext4 took about a
/// sixth of the CPU time of bringing up a VM.
fn socket_base() -> PathBuf {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    runtime
        .into_iter()
        .chain([PathBuf::from("/dev/shm")])
        .find(|p| p.is_dir() && is_tmpfs(p))
        .unwrap_or_else(std::env::temp_dir)
}

/// Waits (at most [`QUIET_MAX`]) until `MemAvailable` holds still: VMs torn down just
/// before (the benchmark's other modes) go on returning memory for a while, which would
/// count against the system's view of the density run.
fn wait_for_quiet_memory() {
    let deadline = Instant::now() + QUIET_MAX;
    let mut last = meminfo();
    while Instant::now() < deadline {
        std::thread::sleep(QUIET_STEP);
        let now = meminfo();
        match (last, now) {
            (Some(a), Some(b)) if a.available.abs_diff(b.available) < QUIET_KIB => return,
            (None, _) | (_, None) => return,
            _ => last = now,
        }
    }
}

/// `n` VMs over `k` workers, as evenly as they go.
fn split(n: u32, k: u32) -> Vec<u32> {
    let k = k.clamp(1, n.max(1));
    (0..k).map(|i| n / k + u32::from(i < n % k)).collect()
}

/// The mean of tenths, weighted by their VMs.
fn merge(tenths: &[&Tenth]) -> Option<Tenth> {
    let vms: u32 = tenths.iter().map(|t| t.vms).sum();
    if vms == 0 {
        return None;
    }
    let w = |t: &Tenth, v: f64| v * f64::from(t.vms) / f64::from(vms);
    let mut out = Tenth {
        vms,
        us_per_vm: tenths.iter().map(|t| w(t, t.us_per_vm)).sum(),
        cpu_us_per_vm: tenths.iter().map(|t| w(t, t.cpu_us_per_vm)).sum(),
        phases_us: Vec::new(),
    };
    for t in tenths {
        for (i, (name, us)) in t.phases_us.iter().enumerate() {
            match out.phases_us.get_mut(i) {
                Some(p) => p.1 += w(t, *us),
                None => out.phases_us.push((name.clone(), w(t, *us))),
            }
        }
    }
    Some(out)
}

fn parse(worker: usize, line: &str) -> Result<Report, DensityError> {
    serde_json::from_str(line).map_err(|e| DensityError::Worker {
        worker,
        what: format!("wrote a line fnode bench does not understand ({e}): {line}"),
    })
}

/// Runs a density run: starts the workers, waits until all are ready, reads their baseline
/// memory, starts the restores, waits until every VM is idle, reads the memory again, then
/// stops the workers (their VMs go with them) and waits for them.
pub fn run(plan: &DensityPlan<'_>) -> Result<DensityReport, DensityError> {
    let shares = split(
        plan.vms,
        plan.workers.unwrap_or(plan.vms.div_ceil(VMS_PER_WORKER)),
    );
    let k = shares.len();
    let sockets = WorkDir::create_in(&socket_base()).map_err(DensityError::Folder)?;
    eprintln!(
        "fnode bench: density: {} VMs over {k} worker processes",
        plan.vms
    );
    wait_for_quiet_memory();
    let mut pool = Pool::new();
    let start = Instant::now();
    for &m in &shares {
        let args: Vec<OsString> = vec![
            "density-worker".into(),
            plan.snapshot.into(),
            "--vms".into(),
            m.to_string().into(),
            "--timeout-ms".into(),
            plan.timeout.as_millis().to_string().into(),
        ];
        pool.spawn(&args, sockets.path())
            .map_err(DensityError::Pool)?;
    }

    // Every worker ready: the baseline.
    let deadline = start + plan.timeout;
    let mut fd_limits: Vec<Option<u64>> = vec![None; k];
    let mut load_us_sum = 0u64;
    while fd_limits.iter().any(Option::is_none) {
        let (i, line) = pool.next(deadline).map_err(DensityError::Pool)?;
        match line.as_deref().map(|l| parse(i, l)).transpose()? {
            Some(Report::Ready {
                fd_limit, load_us, ..
            }) => {
                fd_limits[i] = Some(fd_limit);
                load_us_sum += load_us;
            }
            Some(Report::Done(_)) => {
                return Err(DensityError::Worker {
                    worker: i,
                    what: "reported VMs before it was told to restore them".into(),
                })
            }
            None => {
                return Err(DensityError::Worker {
                    worker: i,
                    what: "ended before it was ready (its errors are above)".into(),
                })
            }
        }
    }
    let startup = start.elapsed();
    let pids: Vec<u32> = (0..k).map(|i| pool.pid(i).unwrap_or(0)).collect();
    let base = (0..k)
        .map(|i| probe::memory_use_of(pids[i]))
        .collect::<Result<Vec<_>, _>>()
        .map_err(DensityError::Probe)?;
    let host_before = meminfo();
    for i in 0..k {
        pool.send(i, GO).map_err(DensityError::Pool)?;
    }

    // Every worker done (or gone).
    let most = shares.iter().copied().max().unwrap_or(0);
    let deadline = Instant::now() + plan.timeout + PER_VM_BUDGET * most;
    let mut done: Vec<Option<Share>> = vec![None; k];
    let mut alive = vec![true; k];
    while done.iter().any(Option::is_none) {
        let (i, line) = match pool.next(deadline) {
            Ok(l) => l,
            Err(PoolError::TimedOut(t)) => {
                for (j, d) in done.iter_mut().enumerate().filter(|(_, d)| d.is_none()) {
                    pool.kill(j);
                    alive[j] = false;
                    *d = Some(Share {
                        wanted: shares[j],
                        stopped_by: Some(format!("did not report within {t:?}")),
                        ..Share::default()
                    });
                }
                break;
            }
            Err(e) => return Err(DensityError::Pool(e)),
        };
        match line.as_deref().map(|l| parse(i, l)).transpose()? {
            Some(Report::Done(s)) => done[i] = Some(s),
            Some(Report::Ready { .. }) => {}
            None if done[i].is_none() => {
                alive[i] = false;
                done[i] = Some(Share {
                    wanted: shares[i],
                    stopped_by: Some("ended before its VMs were up (its errors are above)".into()),
                    ..Share::default()
                });
            }
            None => {}
        }
    }
    let elapsed = start.elapsed();
    let done: Vec<Share> = done.into_iter().flatten().collect();
    let mut grown = MemoryUse::default();
    let mut unread = None;
    for i in (0..k).filter(|&i| alive[i]) {
        match probe::memory_use_of(pids[i]) {
            Ok(end) => {
                grown.pss_kib += end.pss_kib.saturating_sub(base[i].pss_kib);
                grown.rss_kib += end.rss_kib.saturating_sub(base[i].rss_kib);
            }
            // It ended after its report: its VMs count, its memory cannot.
            Err(e) => {
                unread.get_or_insert(format!("worker {i}'s memory is not counted: {e}"));
            }
        }
    }
    let host_after = meminfo();
    eprintln!("fnode bench: density: stopping {k} workers");
    let teardown = pool.stop();

    let vms: u32 = done.iter().map(|s| s.vms).sum();
    let per_vm = |v: u64| v as f64 / f64::from(vms.max(1));
    let firsts: Vec<&Tenth> = done.iter().filter_map(|s| s.first.as_ref()).collect();
    let lasts: Vec<&Tenth> = done.iter().filter_map(|s| s.last.as_ref()).collect();
    Ok(DensityReport {
        wanted: plan.vms,
        vms,
        workers: k as u32,
        elapsed,
        startup,
        load_us: load_us_sum as f64 / k.max(1) as f64,
        pss_kib_per_vm: per_vm(grown.pss_kib),
        rss_kib_per_vm: per_vm(grown.rss_kib),
        system_kib_per_vm: host_before
            .zip(host_after)
            .map(|(b, a)| per_vm(b.available.saturating_sub(a.available))),
        kernel_kib_per_vm: host_before
            .zip(host_after)
            .map(|(b, a)| per_vm(a.kernel.saturating_sub(b.kernel))),
        worker_base_kib: base.iter().map(|m| m.pss_kib as f64).sum::<f64>() / k.max(1) as f64,
        fds_per_vm: per_vm(done.iter().map(|s| s.fds).sum()),
        threads_per_vm: per_vm(done.iter().map(|s| s.threads).sum()),
        cpu_us_per_vm: per_vm(done.iter().map(|s| s.cpu_us).sum()),
        first: merge(&firsts),
        last: merge(&lasts),
        fd_limit: fd_limits.iter().flatten().copied().min().unwrap_or(0),
        teardown: Some(teardown),
        stopped_by: done
            .iter()
            .enumerate()
            .find_map(|(i, s)| Some(format!("worker {i}: {}", s.stopped_by.as_ref()?)))
            .or(unread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vms_split_evenly_over_workers() {
        assert_eq!(split(1000, 8), vec![125; 8]);
        assert_eq!(split(10, 4), vec![3, 3, 2, 2]);
        assert_eq!(split(3, 8), vec![1, 1, 1]);
        assert_eq!(split(5, 0), vec![5]);
        assert_eq!(split(1000, 1000u32.div_ceil(VMS_PER_WORKER)).len(), 16);
    }

    fn tenth(vms: u32, us: f64) -> Tenth {
        Tenth {
            vms,
            us_per_vm: us,
            cpu_us_per_vm: us / 2.0,
            phases_us: vec![("create_vm".into(), us / 2.0), ("other".into(), us / 2.0)],
        }
    }

    #[test]
    fn tenths_merge_weighted_by_vms() {
        let (a, b) = (tenth(1, 100.0), tenth(3, 200.0));
        let m = merge(&[&a, &b]).unwrap();
        assert_eq!(m.vms, 4);
        assert!((m.us_per_vm - 175.0).abs() < 1e-9, "{m:?}");
        assert_eq!(m.phases_us[0].0, "create_vm");
        assert!((m.phases_us[0].1 - 87.5).abs() < 1e-9, "{m:?}");
        assert!(merge(&[]).is_none());
    }

    #[test]
    fn the_report_has_the_json_fields_and_the_table_line() {
        let r = DensityReport {
            wanted: 10,
            vms: 7,
            workers: 2,
            elapsed: Duration::from_millis(70),
            first: Some(tenth(2, 100.0)),
            last: Some(tenth(2, 300.0)),
            fd_limit: 1024,
            load_us: 120.0,
            stopped_by: Some("worker 1: no more VMs".into()),
            ..DensityReport::default()
        };
        let j = r.to_json();
        assert_eq!(j["snapshot_load_us_per_worker"].as_f64(), Some(120.0));
        assert_eq!(j["vms"].as_u64(), Some(7));
        assert_eq!(j["workers"].as_u64(), Some(2));
        assert_eq!(j["seconds"].as_f64(), Some(0.07));
        assert!(j["host_kib_per_vm"].as_f64().is_some());
        assert_eq!(j["last_tenth_phases_us"]["create_vm"].as_f64(), Some(150.0));
        let text = r.to_string();
        assert!(text.starts_with("density: 7 VMs alive and idle"), "{text}");
        assert!(text.contains("stopped at 7 of 10"), "{text}");
        assert!(text.contains("loads the snapshot once: 120 us"), "{text}");
        assert!(text.contains("create_vm 50->150"), "{text}");
    }

    #[test]
    fn meminfo_sums_the_kernel_fields() {
        let text = "MemTotal: 100 kB\nMemAvailable:  50 kB\nSUnreclaim: 3 kB\nKernelStack: 4 kB\n\
                    PageTables: 5 kB\nVmallocUsed: 6 kB\n";
        let m = parse_meminfo(text).unwrap();
        assert_eq!(
            m,
            MemInfo {
                available: 50,
                kernel: 18
            }
        );
        assert!(parse_meminfo("MemTotal: 1 kB\n").is_none());
        assert!(meminfo().is_some());
    }

    #[test]
    fn sockets_go_to_a_folder_that_exists() {
        assert!(socket_base().is_dir());
        assert!(!is_tmpfs(Path::new("/proc")));
    }

    #[test]
    fn a_line_that_is_no_report_is_an_error() {
        let err = parse(3, "hello").unwrap_err();
        assert!(err.to_string().contains("worker 3"), "{err}");
    }
}
