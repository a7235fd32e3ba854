//! The latency CDFs of the benchmark's modes in one SVG: log-x in microseconds, fraction of
//! operations on y, one coloured step line per mode and a legend with each mode's p50.

use std::fmt::Write as _;
use std::time::Duration;

use super::stats::ModeStats;

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 520.0;
const LEFT: f64 = 72.0;
/// Room for the legend, right of the plot.
const RIGHT: f64 = 250.0;
const TOP: f64 = 48.0;
const BOTTOM: f64 = 64.0;

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// `1000` as `1 000`, the way the axis labels read.
fn grouped(v: u64) -> String {
    let s = v.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push('\u{2009}');
        }
        out.push(c);
    }
    out
}

/// The SVG document for `modes` (modes without samples are left out); `title` heads it.
pub fn cdf_svg(title: &str, modes: &[&ModeStats]) -> String {
    let modes: Vec<&&ModeStats> = modes.iter().filter(|m| !m.samples().is_empty()).collect();
    let all_us = || {
        modes
            .iter()
            .flat_map(|m| m.samples().iter())
            .map(|d: &Duration| (d.as_secs_f64() * 1e6).max(0.1))
    };
    let lo = all_us().fold(f64::INFINITY, f64::min);
    let hi = all_us().fold(0.0f64, f64::max);
    let (lo_dec, hi_dec) = if lo.is_finite() && hi > 0.0 {
        let lo_dec = lo.log10().floor() as i32;
        (lo_dec, (hi.log10().ceil() as i32).max(lo_dec + 1))
    } else {
        (0, 3)
    };
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x_of = |v_us: f64| {
        let t = (v_us.max(0.1).log10() - f64::from(lo_dec)) / f64::from(hi_dec - lo_dec);
        LEFT + t.clamp(0.0, 1.0) * plot_w
    };
    let y_of = |frac: f64| TOP + (1.0 - frac) * plot_h;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(
        s,
        r#"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="28" text-anchor="middle" font-size="16">{}</text>"#,
        WIDTH / 2.0,
        esc(title)
    );

    // Grid and ticks: decades labelled, 2..9 as minor lines; y every 10 %.
    for dec in lo_dec..=hi_dec {
        let base = 10f64.powi(dec);
        let x = x_of(base);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ccc"/>"##,
            TOP + plot_h
        );
        let label = if dec >= 0 {
            grouped(base as u64)
        } else {
            format!("{base}")
        };
        let _ = writeln!(
            s,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
            TOP + plot_h + 18.0
        );
        if dec < hi_dec {
            for k in 2..=9 {
                let x = x_of(base * f64::from(k));
                let _ = writeln!(
                    s,
                    r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#eee"/>"##,
                    TOP + plot_h
                );
            }
        }
    }
    for i in 0..=10 {
        let frac = f64::from(i) / 10.0;
        let y = y_of(frac);
        let colour = if i % 5 == 0 { "#ccc" } else { "#eee" };
        let _ = writeln!(
            s,
            r#"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{colour}"/>"#,
            LEFT + plot_w
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            frac
        );
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">latency (µs, log scale)</text>"#,
        LEFT + plot_w / 2.0,
        HEIGHT - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(20 {:.1}) rotate(-90)" text-anchor="middle">fraction of operations ≤ latency</text>"#,
        TOP + plot_h / 2.0
    );

    // One step line per mode.
    for m in &modes {
        let mut v: Vec<f64> = m.samples().iter().map(|d| d.as_secs_f64() * 1e6).collect();
        v.sort_by(f64::total_cmp);
        let n = v.len() as f64;
        let mut points = format!("{:.1},{:.1}", x_of(v[0]), y_of(0.0));
        for (i, &us) in v.iter().enumerate() {
            let x = x_of(us);
            let _ = write!(
                points,
                " {x:.1},{:.1} {x:.1},{:.1}",
                y_of(i as f64 / n),
                y_of((i + 1) as f64 / n)
            );
        }
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{points}"/>"#,
            m.kind.colour()
        );
    }

    // Legend, right of the plot: inside it, some line always runs under it.
    let lx = LEFT + plot_w + 16.0;
    let ly = TOP;
    let _ = writeln!(
        s,
        r##"<rect x="{lx}" y="{ly}" width="{:.1}" height="{}" fill="white" stroke="#999"/>"##,
        RIGHT - 24.0,
        12.0 + 20.0 * modes.len() as f64
    );
    for (i, m) in modes.iter().enumerate() {
        let y = ly + 18.0 + 20.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<line x1="{:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{}" stroke-width="3"/>"#,
            lx + 8.0,
            y - 4.0,
            lx + 36.0,
            y - 4.0,
            m.kind.colour()
        );
        let p50 = m.quantile(0.5).as_secs_f64() * 1e6;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{y:.1}">{} (p50 {p50:.0} µs, n {})</text>"#,
            lx + 44.0,
            m.kind.name(),
            m.len()
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::super::stats::{ModeKind, OpSample};
    use super::*;

    #[test]
    fn svg_has_a_line_and_a_legend_entry_per_mode() {
        let mut a = ModeStats::new(ModeKind::Restore);
        let mut b = ModeStats::new(ModeKind::Floor);
        let empty = ModeStats::new(ModeKind::Reset);
        for i in 1..=20 {
            let s = |us| OpSample {
                total: Duration::from_micros(us),
                ..OpSample::default()
            };
            a.record(&s(500 + i * 10));
            b.record(&s(200 + i));
        }
        let svg = cdf_svg("t <echo>", &[&a, &b, &empty]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("restore (p50"));
        assert!(svg.contains("floor (p50"));
        assert!(!svg.contains("reset (p50"));
        assert!(svg.contains("t &lt;echo&gt;"));
        assert!(
            svg.contains(">100<") && svg.contains(">1\u{2009}000<"),
            "{svg}"
        );
    }

    #[test]
    fn empty_plot_is_still_a_document() {
        let svg = cdf_svg("none", &[]);
        assert!(svg.contains("</svg>"));
        assert_eq!(grouped(1_000_000), "1\u{2009}000\u{2009}000");
        assert_eq!(grouped(100), "100");
    }
}
