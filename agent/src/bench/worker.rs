//! `fnode density-worker` (not listed in `fnode --help`): one worker process of a density
//! run (`fnode bench --density N`). It restores its share of the N VMs from the snapshot
//! (memory mapped `MAP_PRIVATE` from the same file as every other worker's VMs, so they all
//! share its page cache), keeps them alive and idle, and talks to the benchmark over its
//! stdin and stdout, one line per step:
//!
//! 1. worker: `{"ready":{..}}`: KVM is open, the snapshot is loaded (state and memory
//!    file read and checked: once per worker, its cost in the report), nothing is restored yet
//!    (the benchmark reads the worker's baseline memory now);
//! 2. benchmark: `go`;
//! 3. worker: `{"done":{..}}` ([`Share`]): every VM of its share runs in the guest, or it
//!    stopped early and says why;
//! 4. benchmark: closes stdin. The worker exits and the kernel tears its VMs down.
//!
//! Why processes: creating a KVM VM registers an MMU notifier on the process's address
//! space, which takes the lock of every mapping the process has, so each VM is slower to
//! create than the one before it; with VMs spread over processes every address space stays
//! small. Each process also has an open-file limit of its own (a VM holds about 12 files).
//!
//! Done once per worker, not per VM: loading the snapshot (its cost is in the `ready`
//! report), the device event loop thread and its io_uring (shared by the worker's VMs), and
//! the vCPU thread pool's helper thread. Each VM has its own vCPU thread.
//!
//! The benchmark spawns workers with `PR_SET_PDEATHSIG` (see `pool`): a worker dies with it.

use std::{
    io::{self, BufRead, Write},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Context;
use fnode_vmm::{KvmContext, LoadedSnapshot};
use serde::{Deserialize, Serialize};

use super::probe::{self, MemoryUse};
use crate::restored::RestoredFunction;
use crate::snapshot::ConsoleBuf;

/// File descriptors a VM may hold (VM, vCPU, eventfds, sockets: about 12 for a restored
/// function VM; the device loop's epoll and io_uring are the process's), with room to spare:
/// the limit is only a number.
pub const FDS_PER_VM: u64 = 64;
/// File descriptors a worker keeps besides its VMs.
const FDS_BASE: u64 = 256;
/// How long to wait for every VM to have entered the guest once all are restored.
const SETTLE: Duration = Duration::from_secs(10);
/// What the benchmark writes to start the restores.
pub const GO: &str = "go";

/// `fnode density-worker` options (the benchmark passes them).
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The snapshot directory.
    pub snapshot: PathBuf,
    /// VMs to restore and keep.
    #[arg(long, value_name = "M", value_parser = clap::value_parser!(u32).range(1..))]
    pub vms: u32,
    /// Give up on a restore after this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 30_000)]
    pub timeout_ms: u64,
}

/// A line a worker writes.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    /// KVM is open, nothing restored yet.
    Ready {
        /// The open-file limit the worker got.
        fd_limit: u64,
        /// The worker's own memory now.
        memory: MemoryUse,
        /// How long loading the snapshot took (once per worker, before its first VM),
        /// microseconds.
        #[serde(default)]
        load_us: u64,
    },
    /// The share is restored and idle (or the worker stopped early).
    Done(Share),
}

/// What a worker's share of a density run came to.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Share {
    /// VMs asked for.
    pub wanted: u32,
    /// VMs alive and in the guest.
    pub vms: u32,
    /// Why fewer than `wanted` came up.
    pub stopped_by: Option<String>,
    /// Open files the VMs added.
    pub fds: u64,
    /// Threads the VMs added.
    pub threads: u64,
    /// CPU time (user + system, every thread) the restores took, microseconds.
    pub cpu_us: u64,
    /// The first tenth of the VMs (at most 100): how long one took, by phase.
    pub first: Option<Tenth>,
    /// The last tenth of the VMs (at most 100).
    pub last: Option<Tenth>,
}

/// Mean times to bring up one VM among a tenth of a worker's VMs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Tenth {
    /// VMs averaged.
    pub vms: u32,
    /// Whole bring-up of one VM, microseconds (wall time).
    pub us_per_vm: f64,
    /// CPU time of the restoring thread per VM, microseconds (what time-sharing the CPUs
    /// with other workers does not stretch; the VM's own threads are not in it).
    pub cpu_us_per_vm: f64,
    /// Each phase, microseconds, in order; `other` is what no phase covers.
    pub phases_us: Vec<(String, f64)>,
}

/// One VM a worker keeps.
pub trait IdleVm {
    /// Whether the guest runs (its first `KVM_RUN` happened).
    fn running(&mut self) -> bool;
    /// How long each phase of its bring-up took, in order (the same names for every VM).
    fn phases(&self) -> Vec<(&'static str, Duration)>;
}

/// A restored function VM kept idle, with its restore's phases.
struct Idle(RestoredFunction, Vec<(&'static str, Duration)>);

impl Idle {
    fn new(mut f: RestoredFunction) -> Self {
        let phases = f
            .vm()
            .restore_timings()
            .map(|t| t.phases().to_vec())
            .unwrap_or_default();
        Idle(f, phases)
    }
}

impl IdleVm for Idle {
    fn running(&mut self) -> bool {
        self.0.vm().first_run().is_some()
    }

    fn phases(&self) -> Vec<(&'static str, Duration)> {
        self.1.clone()
    }
}

/// Writes one report line.
fn send(out: &mut impl Write, report: &Report) -> io::Result<()> {
    serde_json::to_writer(&mut *out, report)?;
    out.write_all(b"\n")?;
    out.flush()
}

/// Runs `fnode density-worker`.
pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    serve(args).context("fnode density-worker (of fnode bench --density) failed")
}

fn serve(args: WorkerArgs) -> anyhow::Result<()> {
    let fd_limit = probe::raise_open_files(FDS_BASE + FDS_PER_VM * u64::from(args.vms))?;
    let kvm = KvmContext::new().context("cannot use KVM")?;
    // Once per worker: every VM of the share is restored from the loaded snapshot.
    let snapshot = LoadedSnapshot::load(&kvm, &args.snapshot)
        .with_context(|| format!("cannot load the snapshot {}", args.snapshot.display()))?;
    let load_us = snapshot.load_time().as_micros() as u64;
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut out = io::stdout().lock();
    let mut input = io::stdin().lock();
    let memory = probe::memory_use()?;
    let ready = Report::Ready {
        fd_limit,
        memory,
        load_us,
    };
    send(&mut out, &ready).context("cannot report to fnode bench")?;
    let mut line = String::new();
    input.read_line(&mut line)?;
    if line.trim() != GO {
        // The benchmark stopped (or is gone) before the restores began.
        return Ok(());
    }
    let (vms, share) = restore_share(args.vms, |_| {
        let console = ConsoleBuf::new(false);
        let deadline = Instant::now() + timeout;
        RestoredFunction::restore_loaded(&kvm, &snapshot, None, console, deadline).map(Idle::new)
    });
    send(&mut out, &Report::Done(share)).context("cannot report to fnode bench")?;
    // Keep the VMs until stdin closes: the benchmark is done with them (or gone).
    line.clear();
    while input.read_line(&mut line).is_ok_and(|n| n > 0) {
        line.clear();
    }
    // The kernel tears every VM down as the process exits, all at once: faster than
    // dropping them one by one, and the benchmark waits for the exit. Only their socket
    // folders would outlive the process: those go first.
    for vm in &vms {
        let _ = std::fs::remove_dir_all(vm.0.socket_dir());
    }
    std::mem::forget(vms);
    Ok(())
}

/// Open file descriptors of this process, counted with one `poll` over every descriptor
/// the open-file limit allows (closed ones come back `POLLNVAL`): listing `/proc/self/fd`
/// instead costs an inode per descriptor, thousands in a worker.
fn open_fds() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    let n = lim.rlim_cur.min(1 << 20) as usize;
    let mut fds: Vec<libc::pollfd> = (0..n)
        .map(|fd| libc::pollfd {
            fd: fd as libc::c_int,
            events: 0,
            revents: 0,
        })
        .collect();
    // SAFETY: `fds` holds `n` valid pollfds; a zero timeout returns at once.
    if unsafe { libc::poll(fds.as_mut_ptr(), n as libc::nfds_t, 0) } < 0 {
        return 0;
    }
    fds.iter()
        .filter(|p| p.revents & libc::POLLNVAL == 0)
        .count() as u64
}

/// Threads of this process (`Threads:` of `/proc/self/status`).
fn threads() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time of the calling thread.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for clock_gettime to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// CPU time of the whole process (every thread), user + system.
fn cpu_time() -> Duration {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid rusage for getrusage to fill; RUSAGE_SELF is valid.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Brings up `n` VMs with `spawn(i)` and waits until each runs in the guest; returns them
/// (to keep) and what it took. A `spawn` failure stops the share with the VMs so far; the
/// share says why.
pub fn restore_share<V: IdleVm>(
    n: u32,
    mut spawn: impl FnMut(u32) -> anyhow::Result<V>,
) -> (Vec<V>, Share) {
    let fds_before = open_fds();
    let threads_before = threads();
    let cpu_before = cpu_time();
    let mut vms = Vec::with_capacity(n as usize);
    // (wall, CPU of this thread) per VM
    let mut times = Vec::with_capacity(n as usize);
    let mut stopped_by = None;
    for i in 0..n {
        let (t, c) = (Instant::now(), thread_cpu_time());
        match spawn(i) {
            Ok(vm) => {
                times.push((t.elapsed(), thread_cpu_time().saturating_sub(c)));
                vms.push(vm);
            }
            Err(e) => {
                stopped_by = Some(format!("{e:#}"));
                break;
            }
        }
    }
    let deadline = Instant::now() + SETTLE;
    while !vms.iter_mut().all(IdleVm::running) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    if let Some(k) = vms.iter_mut().position(|v| !v.running()) {
        stopped_by.get_or_insert(format!("VM {k} did not run within {SETTLE:?}"));
    }
    let cpu = cpu_time().saturating_sub(cpu_before);
    let k = (times.len() / 10).clamp(1, 100).min(times.len());
    let tenth = |range: std::ops::Range<usize>| tenth_of(&times[range.clone()], &vms[range]);
    let share = Share {
        wanted: n,
        vms: vms.len() as u32,
        stopped_by,
        fds: open_fds().saturating_sub(fds_before),
        threads: threads().saturating_sub(threads_before),
        cpu_us: cpu.as_micros() as u64,
        first: (k > 0).then(|| tenth(0..k)),
        last: (k > 0).then(|| tenth(times.len() - k..times.len())),
    };
    (vms, share)
}

/// Mean bring-up time and phases of `vms`, which took `times` (wall, CPU).
fn tenth_of<V: IdleVm>(times: &[(Duration, Duration)], vms: &[V]) -> Tenth {
    let n = times.len().max(1) as f64;
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    let total: Duration = times.iter().map(|t| t.0).sum();
    let cpu: Duration = times.iter().map(|t| t.1).sum();
    let mut phases: Vec<(String, f64)> = Vec::new();
    let mut covered = Duration::ZERO;
    for vm in vms {
        for (i, (name, d)) in vm.phases().into_iter().enumerate() {
            covered += d;
            match phases.get_mut(i) {
                Some(p) => p.1 += us(d),
                None => phases.push((name.to_owned(), us(d))),
            }
        }
    }
    if !phases.is_empty() {
        phases.push(("other".into(), us(total.saturating_sub(covered))));
    }
    for p in &mut phases {
        p.1 /= n;
    }
    Tenth {
        vms: times.len() as u32,
        us_per_vm: us(total) / n,
        cpu_us_per_vm: us(cpu) / n,
        phases_us: phases,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(Vec<u8>);

    impl IdleVm for Fake {
        fn running(&mut self) -> bool {
            !self.0.is_empty()
        }

        fn phases(&self) -> Vec<(&'static str, Duration)> {
            vec![("a", Duration::ZERO), ("b", Duration::ZERO)]
        }
    }

    #[test]
    fn a_share_stops_on_the_first_failure() {
        let (vms, share) = restore_share(10, |i| {
            if i == 7 {
                anyhow::bail!("no more VMs");
            }
            Ok(Fake(vec![1; 4096]))
        });
        assert_eq!(vms.len(), 7);
        assert_eq!((share.vms, share.wanted), (7, 10));
        assert_eq!(share.stopped_by.as_deref(), Some("no more VMs"));
        let first = share.first.unwrap();
        assert_eq!(first.vms, 1);
        let names: Vec<&str> = first.phases_us.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(names, ["a", "b", "other"]);
    }

    #[test]
    fn an_empty_share_has_no_tenths() {
        let (vms, share) =
            restore_share(3, |_| -> anyhow::Result<Fake> { anyhow::bail!("no KVM") });
        assert!(vms.is_empty());
        assert_eq!(share.vms, 0);
        assert!(share.first.is_none() && share.last.is_none());
    }

    #[test]
    fn open_files_and_threads_are_counted() {
        // Other tests open and close files meanwhile: only a floor holds.
        let f = std::fs::File::open("/proc/self/status").unwrap();
        assert!(open_fds() >= 1);
        drop(f);
        assert!(threads() >= 1);
    }

    #[test]
    fn reports_round_trip_as_one_line() {
        let mut buf = Vec::new();
        let share = Share {
            wanted: 2,
            vms: 2,
            first: Some(Tenth {
                vms: 1,
                us_per_vm: 5.0,
                cpu_us_per_vm: 4.0,
                phases_us: vec![("create_vm".into(), 3.0)],
            }),
            ..Share::default()
        };
        send(&mut buf, &Report::Done(share)).unwrap();
        assert_eq!(buf.iter().filter(|&&b| b == b'\n').count(), 1);
        match serde_json::from_slice::<Report>(&buf).unwrap() {
            Report::Done(s) => {
                assert_eq!(s.vms, 2);
                assert_eq!(s.first.unwrap().phases_us[0].1, 3.0);
            }
            r => panic!("{r:?}"),
        }
    }
}
