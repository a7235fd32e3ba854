//! `--density N`: N VMs restored from one snapshot, all alive and idle at once (each vCPU
//! halted in the guest, waiting for a request), timed from the first restore to the last
//! VM running, with the host memory they cost.
//!
//! Host memory per VM is the growth of the process's PSS (`/proc/self/smaps_rollup`: pages
//! the VMs share through the snapshot's page cache count once, divided among the mappers)
//! over N. The kernel's own memory per VM (KVM's structures, page tables) is not in any
//! process's PSS; the drop of `MemAvailable` over N is reported next to it as the system's
//! view (noisier: anything else on the host moves it too).

use std::{fmt, time::Duration, time::Instant};

use serde_json::{json, Value};

use super::probe::{self, ProbeError};

/// File descriptors a VM may hold (VM, vCPU, eventfds, sockets, io_uring, epoll: about 20
/// for a restored function VM), with room to spare: the limit is only a number.
pub const FDS_PER_VM: u64 = 64;
/// File descriptors the process keeps besides its VMs.
const FDS_BASE: u64 = 256;
/// How long to wait for every VM to have entered the guest.
const SETTLE: Duration = Duration::from_secs(10);

/// What a density run found.
#[derive(Debug)]
pub struct DensityReport {
    /// VMs asked for.
    pub wanted: u32,
    /// VMs alive at once.
    pub vms: u32,
    /// From the first restore to the last VM in the guest.
    pub elapsed: Duration,
    /// PSS growth of the process per VM, KiB.
    pub pss_kib_per_vm: f64,
    /// RSS growth of the process per VM, KiB.
    pub rss_kib_per_vm: f64,
    /// Drop of the host's `MemAvailable` per VM, KiB (kernel memory included).
    pub system_kib_per_vm: Option<f64>,
    /// Open file descriptors per VM.
    pub fds_per_vm: Option<f64>,
    /// Threads per VM.
    pub threads_per_vm: Option<f64>,
    /// Mean time to bring up one VM, among the first and the last tenth of the VMs (at most
    /// 100 each): how bringing up one more VM grows with the VMs already there.
    pub spawn_first_last: Option<(Duration, Duration)>,
    /// The open-file limit in force (raised as far as the hard limit allows).
    pub fd_limit: u64,
    /// Why fewer than `wanted` VMs came up.
    pub stopped_by: Option<String>,
}

impl DensityReport {
    /// The JSON object: `vms`, `seconds`, `host_kib_per_vm` (PSS), and the rest.
    pub fn to_json(&self) -> Value {
        let r1 = |v: f64| (v * 10.0).round() / 10.0;
        let mut v = json!({
            "vms": self.vms,
            "wanted": self.wanted,
            "seconds": (self.elapsed.as_secs_f64() * 1e4).round() / 1e4,
            "host_kib_per_vm": r1(self.pss_kib_per_vm),
            "rss_kib_per_vm": r1(self.rss_kib_per_vm),
        });
        if let Some(s) = self.system_kib_per_vm {
            v["system_kib_per_vm"] = json!(r1(s));
        }
        if let Some(n) = self.fds_per_vm {
            v["fds_per_vm"] = json!(r1(n));
        }
        if let Some(n) = self.threads_per_vm {
            v["threads_per_vm"] = json!(r1(n));
        }
        v["fd_limit"] = json!(self.fd_limit);
        if let Some((first, last)) = self.spawn_first_last {
            v["first_tenth_us_per_vm"] = json!(r1(first.as_secs_f64() * 1e6));
            v["last_tenth_us_per_vm"] = json!(r1(last.as_secs_f64() * 1e6));
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
            "density: {} VMs alive and idle in {:.3} s ({:.1} us/VM); host memory per VM: \
             {:.1} KiB PSS, {:.1} KiB RSS",
            self.vms,
            self.elapsed.as_secs_f64(),
            self.elapsed.as_secs_f64() * 1e6 / f64::from(self.vms.max(1)),
            self.pss_kib_per_vm,
            self.rss_kib_per_vm
        )?;
        if let Some(s) = self.system_kib_per_vm {
            write!(f, ", {s:.1} KiB of MemAvailable")?;
        }
        if let (Some(fds), Some(threads)) = (self.fds_per_vm, self.threads_per_vm) {
            write!(f, "; {fds:.1} fds and {threads:.1} threads per VM")?;
        }
        if let Some((first, last)) = self.spawn_first_last {
            write!(
                f,
                "\ndensity: one VM takes {:.0} us among the first tenth, {:.0} us among the last",
                first.as_secs_f64() * 1e6,
                last.as_secs_f64() * 1e6
            )?;
        }
        if let Some(why) = &self.stopped_by {
            write!(
                f,
                "\ndensity: stopped at {} of {} VMs (open-file limit {}): {why}",
                self.vms, self.wanted, self.fd_limit
            )?;
        }
        Ok(())
    }
}

/// `MemAvailable` of `/proc/meminfo`, KiB.
fn mem_available_kib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix("MemAvailable:")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Entries of a `/proc/self` folder (open files, threads).
fn entries(path: &str) -> Option<u64> {
    Some(std::fs::read_dir(path).ok()?.count() as u64)
}

/// One VM brought up by [`run`]'s `spawn`: something that keeps it alive until dropped and
/// says whether its vCPU has entered the guest.
pub trait IdleVm: Send {
    /// Whether the guest runs (its first `KVM_RUN` happened).
    fn running(&mut self) -> bool;
}

/// Brings up `n` VMs with `spawn(i)`, keeps them all, measures, then drops them (after the
/// measurement, on a background thread that the call waits for). A `spawn` failure stops
/// the run with the VMs so far; the report says why.
pub fn run<V: IdleVm + 'static>(
    n: u32,
    mut spawn: impl FnMut(u32) -> anyhow::Result<V>,
) -> Result<DensityReport, ProbeError> {
    let fd_limit = probe::raise_open_files(FDS_BASE + FDS_PER_VM * u64::from(n))?;
    let before = probe::memory_use()?;
    let avail_before = mem_available_kib();
    let fds_before = entries("/proc/self/fd");
    let threads_before = entries("/proc/self/task");
    let mut vms = Vec::with_capacity(n as usize);
    let mut stopped_by = None;
    let start = Instant::now();
    let mut last_report = start;
    let mut spawn_times = Vec::with_capacity(n as usize);
    for i in 0..n {
        let t = Instant::now();
        match spawn(i) {
            Ok(vm) => {
                spawn_times.push(t.elapsed());
                vms.push(vm);
            }
            Err(e) => {
                stopped_by = Some(format!("{e:#}"));
                break;
            }
        }
        if last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!("fnode bench: density {}/{n}", i + 1);
        }
    }
    let deadline = Instant::now() + SETTLE;
    while !vms.iter_mut().all(IdleVm::running) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = start.elapsed();
    if let Some(k) = vms.iter_mut().position(|v| !v.running()) {
        stopped_by.get_or_insert(format!("VM {k} did not run within {SETTLE:?}"));
    }
    let after = probe::memory_use()?;
    let avail_after = mem_available_kib();
    let fds_after = entries("/proc/self/fd");
    let threads_after = entries("/proc/self/task");
    let count = vms.len() as u32;
    let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / f64::from(count.max(1));
    let report = DensityReport {
        wanted: n,
        vms: count,
        elapsed,
        pss_kib_per_vm: per(after.pss_kib, before.pss_kib),
        rss_kib_per_vm: per(after.rss_kib, before.rss_kib),
        system_kib_per_vm: avail_before.zip(avail_after).map(|(b, a)| per(b, a)),
        fds_per_vm: fds_before.zip(fds_after).map(|(b, a)| per(a, b)),
        threads_per_vm: threads_before.zip(threads_after).map(|(b, a)| per(a, b)),
        spawn_first_last: first_and_last_tenth(&spawn_times),
        fd_limit,
        stopped_by,
    };
    eprintln!("fnode bench: density: tearing down {count} VMs");
    let _ = std::thread::spawn(move || drop(vms)).join();
    Ok(report)
}

/// Mean of the first and of the last tenth of `times` (at most 100 each; `None` for fewer
/// than 10).
fn first_and_last_tenth(times: &[Duration]) -> Option<(Duration, Duration)> {
    let k = (times.len() / 10).min(100);
    if k == 0 {
        return None;
    }
    let mean = |s: &[Duration]| s.iter().sum::<Duration>() / s.len() as u32;
    Some((mean(&times[..k]), mean(&times[times.len() - k..])))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(Vec<u8>);

    impl IdleVm for Fake {
        fn running(&mut self) -> bool {
            !self.0.is_empty()
        }
    }

    #[test]
    fn counts_and_stops_on_the_first_failure() {
        let r = run(10, |i| {
            if i == 7 {
                anyhow::bail!("no more VMs");
            }
            Ok(Fake(vec![1; 4096]))
        })
        .unwrap();
        assert_eq!(r.vms, 7);
        assert_eq!(r.wanted, 10);
        assert_eq!(r.stopped_by.as_deref(), Some("no more VMs"));
        let j = r.to_json();
        assert_eq!(j["vms"].as_u64(), Some(7));
        assert!(j["seconds"].as_f64().is_some());
        assert!(j["host_kib_per_vm"].as_f64().is_some());
        assert!(r.to_string().contains("stopped at 7 of 10"), "{r}");
        assert!(r.spawn_first_last.is_none());
    }

    #[test]
    fn tenths() {
        let t: Vec<Duration> = (1..=20).map(Duration::from_micros).collect();
        assert_eq!(
            first_and_last_tenth(&t),
            Some((Duration::from_nanos(1500), Duration::from_nanos(19500)))
        );
        assert_eq!(first_and_last_tenth(&t[..9]), None);
    }
}
