//! `fnode bench` end to end on KVM: the echo function's image is benchmarked with a few
//! iterations; the JSON has every mode with consistent numbers, the SVG is a plot of them,
//! and `--density` brings VMs up in worker processes. Nothing here looks at how long
//! anything took.

use std::{path::PathBuf, process::Command};

use fnode_vmm::kvm::test_support::require_kvm;
use serde_json::Value;

const ITERATIONS: u64 = 4;

mod common;
use common::{function_image, tmp};

fn echo_image() -> PathBuf {
    function_image("echo")
}

/// Runs `fnode bench <args>`; returns stdout, failing the test with stderr if it failed.
fn bench(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_fnode"))
        .arg("bench")
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fnode bench failed:\n{stderr}");
    String::from_utf8(out.stdout).unwrap()
}

fn num(mode: &Value, key: &str) -> f64 {
    mode[key]
        .as_f64()
        .unwrap_or_else(|| panic!("no number {key} in {mode}"))
}

/// The percentiles of a mode are present and ordered, and `n` is the iteration count.
fn check_latencies(doc: &Value, name: &str) {
    let m = &doc[name];
    assert!(m.is_object(), "no {name} in {doc}");
    assert_eq!(m["n"].as_u64(), Some(ITERATIONS), "{name}: {m}");
    let (p50, p90, p99, max) = (
        num(m, "p50_us"),
        num(m, "p90_us"),
        num(m, "p99_us"),
        num(m, "max_us"),
    );
    assert!(p50 > 0.0, "{name}: {m}");
    assert!(p50 <= p90 && p90 <= p99 && p99 <= max, "{name}: {m}");
}

#[test]
fn bench_echo_writes_json_svg_and_density() {
    if !require_kvm() {
        return;
    }
    let image = echo_image();
    let dir = tmp().join("bench-out");
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("bench.json");
    let svg = dir.join("bench.svg");
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&svg);
    let n = ITERATIONS.to_string();
    let table = bench(&[
        image.as_os_str(),
        "--iterations".as_ref(),
        n.as_ref(),
        "--warmup".as_ref(),
        "1".as_ref(),
        "--json".as_ref(),
        json.as_os_str(),
        "--plot".as_ref(),
        svg.as_os_str(),
        "--density".as_ref(),
        "8".as_ref(),
        "--density-workers".as_ref(),
        "2".as_ref(),
    ]);

    let doc: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    for mode in ["cold", "restore", "reset", "floor"] {
        check_latencies(&doc, mode);
        assert!(
            table.contains(mode),
            "{mode} missing from the table:\n{table}"
        );
    }
    for mode in ["restore", "reset"] {
        let m = &doc[mode];
        assert!(num(m, "host_p50_us") > 0.0, "{mode}: {m}");
        assert!(num(m, "host_p50_us") <= num(m, "max_us"), "{mode}: {m}");
        // Counts, not times: present. (Queue notifications go to ioeventfds in KVM, so an
        // invocation may cost no userspace exit at all.)
        assert!(num(m, "exits_per_op") >= 0.0, "{mode}: {m}");
        assert!(num(m, "pages_touched_per_op") >= 0.0, "{mode}: {m}");
    }
    // A restore maps the snapshot afresh: its first response touches pages.
    assert!(num(&doc["restore"], "pages_touched_per_op") >= 1.0);
    let floor = &doc["floor"];
    assert!(num(floor, "host_p50_us") > 0.0, "{floor}");
    assert!(num(floor, "host_p50_us") <= num(floor, "max_us"), "{floor}");

    let d = &doc["density"];
    assert_eq!(d["vms"].as_u64(), Some(8), "{d}");
    assert_eq!(d["workers"].as_u64(), Some(2), "{d}");
    assert!(num(d, "seconds") > 0.0, "{d}");
    assert!(num(d, "startup_seconds") <= num(d, "seconds"), "{d}");
    for key in [
        "host_kib_per_vm",
        "rss_kib_per_vm",
        "cpu_us_per_vm",
        "teardown_seconds",
    ] {
        assert!(num(d, key) >= 0.0, "{key}: {d}");
    }
    // Every VM holds its own files and at least its vCPU thread.
    assert!(num(d, "fds_per_vm") >= 1.0, "{d}");
    assert!(num(d, "threads_per_vm") >= 1.0, "{d}");
    assert!(d["first_tenth_phases_us"]["create_vm"].is_number(), "{d}");
    assert!(d.get("stopped_by").is_none(), "{d}");
    assert!(table.contains("density: 8 VMs"), "{table}");
    assert!(table.contains("2 worker processes"), "{table}");

    let plot = std::fs::read_to_string(&svg).unwrap();
    assert!(plot.starts_with("<svg"), "{plot}");
    assert!(plot.trim_end().ends_with("</svg>"));
    assert_eq!(plot.matches("<polyline").count(), 4, "one line per mode");
    for mode in ["cold", "restore", "reset", "floor"] {
        assert!(
            plot.contains(&format!(">{mode} (p50")),
            "no legend for {mode}"
        );
    }
    assert!(plot.contains("latency (µs, log scale)"));
}

#[test]
fn bench_refuses_an_unknown_mode_and_a_missing_target() {
    let out = Command::new(env!("CARGO_BIN_EXE_fnode"))
        .args(["bench", "/nonexistent/image.elf", "--skip", "warm"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warm") && stderr.contains("modes are"),
        "{stderr}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_fnode"))
        .args(["bench", "/nonexistent/image.elf"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("/nonexistent/image.elf"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_fnode"))
        .args(["bench", "/nonexistent/image.elf", "--density-workers", "2"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--density"), "{stderr}");
}
