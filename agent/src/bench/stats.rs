//! The numbers of one benchmark mode: latencies (percentiles from `fnode_vmm::bench::Series`,
//! an hdrhistogram, plus the raw samples for the CDF plot), the host's own share, and the
//! counts per operation; the table and the JSON made of them.

use std::time::Duration;

use fnode_vmm::bench::Series;
use serde_json::{json, Map, Value};

/// One measured operation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpSample {
    /// From the start of the operation to the response (the floor: to its `hlt`).
    pub total: Duration,
    /// The VMM's own work before the guest runs, when the mode defines it.
    pub host: Option<Duration>,
    /// Exits to the VMM during the operation.
    pub exits: Option<u64>,
    /// Guest pages the host had to back during the operation (first touched).
    pub pages: Option<u64>,
    /// Guest pages written during the operation (by the guest or a device).
    pub dirtied: Option<u64>,
    /// Where the host's share went, phase by phase.
    pub phases: Phases,
}

/// The most phases an operation reports.
const MAX_PHASES: usize = 12;

/// Named phases of one operation, in order (a fixed array: samples stay `Copy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Phases {
    names: [&'static str; MAX_PHASES],
    times: [Duration; MAX_PHASES],
    len: usize,
}

impl Phases {
    /// Appends a phase (past [`MAX_PHASES`] it is dropped).
    pub fn push(&mut self, name: &'static str, time: Duration) {
        if self.len < MAX_PHASES {
            self.names[self.len] = name;
            self.times[self.len] = time;
            self.len += 1;
        }
    }

    /// Appends each of `phases`.
    pub fn extend(&mut self, phases: &[(&'static str, Duration)]) {
        for &(name, time) in phases {
            self.push(name, time);
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&'static str, Duration)> + '_ {
        self.names[..self.len]
            .iter()
            .copied()
            .zip(self.times[..self.len].iter().copied())
    }
}

/// A benchmark mode's name and what it measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeKind {
    /// Build + boot + init + first response.
    Cold,
    /// A fresh VM from the snapshot + first response.
    Restore,
    /// In-place reset of a used VM + response.
    Reset,
    /// The raw-KVM floor.
    Floor,
}

impl ModeKind {
    /// All modes, in table order.
    pub const ALL: [ModeKind; 4] = [
        ModeKind::Cold,
        ModeKind::Restore,
        ModeKind::Reset,
        ModeKind::Floor,
    ];

    /// The mode's name (table row and JSON key).
    pub fn name(self) -> &'static str {
        match self {
            ModeKind::Cold => "cold",
            ModeKind::Restore => "restore",
            ModeKind::Reset => "reset",
            ModeKind::Floor => "floor",
        }
    }

    /// The colour of the mode's line in the plot.
    pub fn colour(self) -> &'static str {
        match self {
            ModeKind::Cold => "#d62728",
            ModeKind::Restore => "#1f77b4",
            ModeKind::Reset => "#2ca02c",
            ModeKind::Floor => "#7f7f7f",
        }
    }
}

/// Everything measured for one mode.
#[derive(Debug)]
pub struct ModeStats {
    /// Which mode.
    pub kind: ModeKind,
    latency: Series,
    host: Series,
    /// Every latency sample, in the order taken (for the CDF).
    samples: Vec<Duration>,
    exits: Counter,
    pages: Counter,
    dirtied: Counter,
    /// Each phase's name and times, in the order first seen.
    phases: Vec<(&'static str, Series)>,
}

/// Sum and number of a per-operation count.
#[derive(Clone, Copy, Debug, Default)]
struct Counter {
    sum: u64,
    n: u64,
}

impl Counter {
    fn add(&mut self, v: Option<u64>) {
        if let Some(v) = v {
            self.sum += v;
            self.n += 1;
        }
    }

    fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum as f64 / self.n as f64)
    }
}

/// Microseconds with one decimal (what the table and the JSON show).
fn us(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e7).round() / 10.0
}

/// One decimal.
fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

impl ModeStats {
    /// No samples yet.
    pub fn new(kind: ModeKind) -> Self {
        ModeStats {
            kind,
            latency: Series::new(kind.name()),
            host: Series::new(kind.name()),
            samples: Vec::new(),
            exits: Counter::default(),
            pages: Counter::default(),
            dirtied: Counter::default(),
            phases: Vec::new(),
        }
    }

    /// Adds one operation.
    pub fn record(&mut self, s: &OpSample) {
        self.latency.record(s.total);
        self.samples.push(s.total);
        if let Some(h) = s.host {
            self.host.record(h);
        }
        self.exits.add(s.exits);
        self.pages.add(s.pages);
        self.dirtied.add(s.dirtied);
        for (name, time) in s.phases.iter() {
            match self.phases.iter_mut().find(|(n, _)| *n == name) {
                Some((_, series)) => series.record(time),
                None => {
                    let mut series = Series::new(name);
                    series.record(time);
                    self.phases.push((name, series));
                }
            }
        }
    }

    /// Each phase's p50, in order.
    pub fn phase_p50s(&self) -> Vec<(&'static str, Duration)> {
        self.phases
            .iter()
            .map(|(name, series)| (*name, series.quantile(0.5)))
            .collect()
    }

    /// Number of operations.
    pub fn len(&self) -> u64 {
        self.latency.len()
    }

    /// The `q` quantile of the latency.
    pub fn quantile(&self, q: f64) -> Duration {
        self.latency.quantile(q)
    }

    /// p50 of the host's share, if the mode measured it.
    pub fn host_p50(&self) -> Option<Duration> {
        (!self.host.is_empty()).then(|| self.host.quantile(0.5))
    }

    /// Mean userspace exits per operation.
    pub fn exits_per_op(&self) -> Option<f64> {
        self.exits.mean()
    }

    /// Mean guest pages first touched per operation.
    pub fn pages_per_op(&self) -> Option<f64> {
        self.pages.mean()
    }

    /// The latency samples.
    pub fn samples(&self) -> &[Duration] {
        &self.samples
    }

    /// The mode's JSON object: `p50_us`, `p90_us`, `p99_us`, `max_us`, `n`, and the host
    /// share and counts where measured; `ratio_to_floor_p50` given the floor's p50.
    pub fn to_json(&self, floor_p50: Option<Duration>) -> Value {
        let mut m = Map::new();
        m.insert("p50_us".into(), json!(us(self.quantile(0.5))));
        m.insert("p90_us".into(), json!(us(self.quantile(0.9))));
        m.insert("p99_us".into(), json!(us(self.quantile(0.99))));
        m.insert("max_us".into(), json!(us(self.quantile(1.0))));
        m.insert("n".into(), json!(self.len()));
        if let Some(r) = self.ratio_to(floor_p50) {
            m.insert("ratio_to_floor_p50".into(), json!(r));
        }
        if let Some(h) = self.host_p50() {
            m.insert("host_p50_us".into(), json!(us(h)));
        }
        if let Some(e) = self.exits_per_op() {
            m.insert("exits_per_op".into(), json!(round1(e)));
        }
        if let Some(p) = self.pages_per_op() {
            m.insert("pages_touched_per_op".into(), json!(round1(p)));
        }
        if let Some(p) = self.dirtied.mean() {
            m.insert("pages_dirtied_per_op".into(), json!(round1(p)));
        }
        if !self.phases.is_empty() {
            let phases: Map<String, Value> = self
                .phase_p50s()
                .into_iter()
                .map(|(name, d)| (name.to_owned(), json!(us(d))))
                .collect();
            m.insert("host_phases_p50_us".into(), Value::Object(phases));
        }
        Value::Object(m)
    }

    /// p50 over `floor_p50`.
    fn ratio_to(&self, floor_p50: Option<Duration>) -> Option<f64> {
        let f = floor_p50.filter(|f| !f.is_zero())?;
        (self.len() > 0).then(|| {
            let r = self.quantile(0.5).as_secs_f64() / f.as_secs_f64();
            (r * 100.0).round() / 100.0
        })
    }
}

/// The results table: one row per mode with samples.
pub fn table(modes: &[&ModeStats]) -> String {
    let floor_p50 = modes
        .iter()
        .find(|m| m.kind == ModeKind::Floor && m.len() > 0)
        .map(|m| m.quantile(0.5));
    let mut out = format!(
        "{:<8} {:>6} {:>10} {:>10} {:>10} {:>10} {:>9} {:>12} {:>9} {:>9} {:>9}\n",
        "mode",
        "n",
        "p50 us",
        "p90 us",
        "p99 us",
        "max us",
        "x floor",
        "host p50 us",
        "exits/op",
        "pages/op",
        "dirty/op"
    );
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".to_owned(), |v| format!("{v:.prec$}"));
    for m in modes.iter().filter(|m| m.len() > 0) {
        out += &format!(
            "{:<8} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>9} {:>12} {:>9} {:>9} {:>9}\n",
            m.kind.name(),
            m.len(),
            us(m.quantile(0.5)),
            us(m.quantile(0.9)),
            us(m.quantile(0.99)),
            us(m.quantile(1.0)),
            opt(m.ratio_to(floor_p50), 2),
            opt(m.host_p50().map(us), 1),
            opt(m.exits_per_op(), 1),
            opt(m.pages_per_op(), 1),
            opt(m.dirtied.mean(), 1),
        );
    }
    for m in modes.iter().filter(|m| !m.phases.is_empty()) {
        out += &format!("{} host phases, p50 us:", m.kind.name());
        for (name, d) in m.phase_p50s() {
            out += &format!(" {name} {:.1}", us(d));
        }
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(total_us: u64, host_us: u64) -> OpSample {
        OpSample {
            total: Duration::from_micros(total_us),
            host: Some(Duration::from_micros(host_us)),
            exits: Some(3),
            pages: Some(10),
            dirtied: Some(2),
            phases: Phases::default(),
        }
    }

    #[test]
    fn json_has_the_fields_and_ordered_percentiles() {
        let mut m = ModeStats::new(ModeKind::Restore);
        for i in 1..=100 {
            m.record(&sample(100 + i, 50));
        }
        let v = m.to_json(Some(Duration::from_micros(100)));
        let f = |k: &str| v[k].as_f64().unwrap();
        assert_eq!(v["n"].as_u64(), Some(100));
        assert!(f("p50_us") <= f("p90_us") && f("p90_us") <= f("p99_us"));
        assert!(f("p99_us") <= f("max_us"));
        assert_eq!(f("exits_per_op"), 3.0);
        assert_eq!(f("pages_touched_per_op"), 10.0);
        assert_eq!(f("pages_dirtied_per_op"), 2.0);
        assert!((f("host_p50_us") - 50.0).abs() < 0.1);
        assert!((f("ratio_to_floor_p50") - 1.5).abs() < 0.02);
    }

    #[test]
    fn missing_counts_are_left_out() {
        let mut m = ModeStats::new(ModeKind::Cold);
        m.record(&OpSample {
            total: Duration::from_millis(5),
            ..OpSample::default()
        });
        let v = m.to_json(None);
        assert!(v.get("host_p50_us").is_none());
        assert!(v.get("exits_per_op").is_none());
        assert!(v.get("ratio_to_floor_p50").is_none());
        let t = table(&[&m]);
        assert!(t.lines().nth(1).unwrap().starts_with("cold"), "{t}");
    }
}
