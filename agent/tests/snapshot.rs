//! `fnode snapshot` and `fnode invoke DIR` end to end on KVM: each example function is
//! snapshotted once its `init` is done, restored, and must answer exactly as after a cold
//! boot; restores and in-place resets draw fresh random bytes; a reset VM keeps nothing of
//! the invocation before, whether the reset ran at the guest's DONE (off the request path)
//! or when called; a large response is never cut by the reset that follows it; a guest
//! kernel writing DONE at the wrong times neither hangs the host nor skips a reset.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::{Command, Output},
    sync::{Mutex, OnceLock},
};

use fnode_guest::abi::cmdline;
use fnode_vmm::kvm::test_support::require_kvm;

/// Limit for invocations expected to answer; hitting it is a failure, not a measurement.
const TIMEOUT_MS: &str = "30000";

mod common;
use common::{function_image, tmp};

fn fnode(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fnode"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `functions/<name>` built with `fnode build`, and its snapshot, once per test binary run.
fn image_and_snapshot(name: &str) -> (PathBuf, PathBuf) {
    image_and_snapshot_with(name, "")
}

/// [`image_and_snapshot`] with kernel command line words added to the snapshot's.
fn image_and_snapshot_with(name: &str, cmdline: &str) -> (PathBuf, PathBuf) {
    static DONE: OnceLock<Mutex<HashMap<String, (PathBuf, PathBuf)>>> = OnceLock::new();
    // One build at a time: they share cargo's target dir.
    let mut done = DONE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let key = format!("{name} {cmdline}");
    if let Some(paths) = done.get(&key) {
        return paths.clone();
    }
    let image = function_image(name);
    let folder = match cmdline {
        "" => name.to_owned(),
        words => format!(
            "{name}-{}",
            words.replace(|c: char| !c.is_alphanumeric(), "-")
        ),
    };
    let dir = tmp().join("snapshots").join(folder);
    let printed = ok(
        fnode(&[
            "snapshot",
            image.to_str().unwrap(),
            "-o",
            dir.to_str().unwrap(),
            "--timeout-ms",
            TIMEOUT_MS,
            "--cmdline",
            cmdline,
        ]),
        &format!("fnode snapshot {name} --cmdline {cmdline:?}"),
    );
    // What `fnode snapshot` reports: init and snapshot times, the memory file's sizes.
    for word in ["init ", "snapshot ", "apparent", "on disk"] {
        assert!(printed.contains(word), "{printed}");
    }
    assert!(dir.join("state").is_file() && dir.join("memory").is_file());
    done.insert(key, (image.clone(), dir.clone()));
    (image, dir)
}

fn invoke(target: &Path, extra: &[&str]) -> String {
    let mut args = vec![
        "invoke",
        target.to_str().unwrap(),
        "--timeout-ms",
        TIMEOUT_MS,
    ];
    args.extend_from_slice(extra);
    ok(fnode(&args), &format!("fnode invoke {}", target.display()))
}

#[test]
fn restored_functions_answer_as_after_a_cold_boot() {
    if !require_kvm() {
        return;
    }
    let cases: [(&str, &str); 5] = [
        ("echo", "hello from a snapshot"),
        ("sha256", "abc"),
        ("wordcount", r#"{"text": "the cat and the hat"}"#),
        ("primes", "97"),
        ("counter", "x"),
    ];
    for (name, payload) in cases {
        let (image, dir) = image_and_snapshot(name);
        let cold = invoke(&image, &["--payload", payload]);
        let restored = invoke(&dir, &["--payload", payload]);
        assert_eq!(restored, cold, "{name}: restored and cold responses differ");
        // And after in-place resets, both ways of putting memory back.
        for mode in ["copy", "dontneed"] {
            let three = invoke(
                &dir,
                &["--payload", payload, "--repeat", "3", "--reset", mode],
            );
            let expected = format!("{cold}\n").repeat(3);
            assert_eq!(
                three, expected,
                "{name}: responses after {mode} resets differ"
            );
        }
    }
}

#[test]
fn restored_functions_fail_as_after_a_cold_boot() {
    if !require_kvm() {
        return;
    }
    // A panic, a fault and an endless loop: the same message and exit code either way.
    for name in ["panic", "badmem", "spin"] {
        let (image, dir) = image_and_snapshot(name);
        let run = |target: &Path| {
            let out = fnode(&[
                "invoke",
                target.to_str().unwrap(),
                "--payload",
                "x",
                "--timeout-ms",
                "2000",
            ]);
            let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
            let first = stderr.lines().next().unwrap_or_default().to_owned();
            (out.status.code(), first, stderr)
        };
        let (cold_code, cold_line, cold_err) = run(&image);
        let (code, line, err) = run(&dir);
        assert_ne!(cold_code, Some(0), "{name}: {cold_err}");
        assert_eq!(
            code, cold_code,
            "{name}: cold:\n{cold_err}\nrestored:\n{err}"
        );
        assert_eq!(line, cold_line, "{name}");
    }
}

#[test]
fn restores_and_resets_draw_fresh_random_bytes() {
    if !require_kvm() {
        return;
    }
    let (_, dir) = image_and_snapshot("random");
    let a = invoke(&dir, &[]);
    let b = invoke(&dir, &[]);
    assert_eq!(a.len(), 64, "{a}");
    assert_ne!(
        a, b,
        "two restores of one snapshot drew the same random bytes"
    );
    for mode in ["copy", "dontneed"] {
        let out = invoke(&dir, &["--repeat", "3", "--reset", mode]);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(
            lines[0] != lines[1] && lines[1] != lines[2] && lines[0] != lines[2],
            "{mode} resets drew the same random bytes:\n{out}"
        );
        assert!(!lines.contains(&a.as_str()) && !lines.contains(&b.as_str()));
    }
}

/// Three calls of the counter snapshot in `dir` on one VM without reset: each sees the
/// calls before it (static and heap memory).
fn assert_state_carries_over(dir: &Path) {
    let same = invoke(dir, &["--payload", "x", "--repeat", "3", "--reset", "none"]);
    assert_eq!(
        same,
        "calls 1, previous -\ncalls 2, previous x\ncalls 3, previous x\n"
    );
}

#[test]
fn a_reset_vm_keeps_nothing_of_the_invocation_before() {
    if !require_kvm() {
        return;
    }
    let (_, dir) = image_and_snapshot("counter");
    // Served on the same VM, the function sees its earlier calls (static and heap memory).
    assert_state_carries_over(&dir);
    // Reset between calls: every call is the first, nothing written before is visible.
    for mode in ["copy", "dontneed"] {
        let reset = invoke(&dir, &["--payload", "x", "--repeat", "4", "--reset", mode]);
        assert_eq!(reset, "calls 1, previous -\n".repeat(4), "{mode}");
    }
}

#[test]
fn snapshot_of_a_missing_image_names_it() {
    if !require_kvm() {
        return;
    }
    let out = fnode(&["snapshot", "/nonexistent/f.elf", "-o", "/nonexistent/dir"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/f.elf"), "{err}");
}

#[test]
fn image_options_on_a_snapshot_are_refused() {
    if !require_kvm() {
        return;
    }
    let (_, dir) = image_and_snapshot("echo");
    for extra in [["--mem", "128"], ["--cmdline", "fnode.echo=1"]] {
        let mut args = vec!["invoke", dir.to_str().unwrap()];
        args.extend_from_slice(&extra);
        let out = fnode(&args);
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("apply to images"), "{err}");
    }
}

/// `fnode invoke` of a snapshot with `--timings`: stdout, and how many of its resets ran at
/// the guest's DONE and on the call.
fn invoke_timed(target: &Path, extra: &[&str]) -> (String, usize, usize) {
    let mut args = vec![
        "invoke",
        target.to_str().unwrap(),
        "--timeout-ms",
        TIMEOUT_MS,
        "--timings",
    ];
    args.extend_from_slice(extra);
    let out = fnode(&args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let at_done = stderr.matches("(reset at DONE)").count();
    let on_call = stderr.matches("(reset on call)").count();
    let stdout = ok(out, &format!("fnode invoke {} {extra:?}", target.display()));
    (stdout, at_done, on_call)
}

#[test]
fn resets_at_done_keep_every_invocation_the_first() {
    if !require_kvm() {
        return;
    }
    let (_, dir) = image_and_snapshot("counter");
    for mode in ["copy", "dontneed"] {
        let n = 40;
        let (out, at_done, on_call) = invoke_timed(
            &dir,
            &[
                "--payload",
                "x",
                "--repeat",
                &n.to_string(),
                "--reset",
                mode,
            ],
        );
        assert_eq!(out, "calls 1, previous -\n".repeat(n), "{mode}");
        assert_eq!(at_done + on_call, n - 1, "{mode}: every reset is reported");
        // The guest kernel writes DONE after each response: the resets run there (one that
        // came too late for its DONE would run on the call, just as clean).
        assert!(at_done > 0, "{mode}: no reset ran at the guest's DONE");
    }
}

#[test]
fn a_large_response_is_intact_across_resets_at_done() {
    if !require_kvm() {
        return;
    }
    let (_, dir) = image_and_snapshot("echo");
    // 1 MiB: many packets, more than the host's credit at once; the reset at DONE comes
    // right after the last one is handed over and must let every byte out first.
    let payload: Vec<u8> = (0..1usize << 20)
        .map(|i| b'a' + ((i * 7 + i / 4093) % 26) as u8)
        .collect();
    let file = tmp().join(format!("large-payload-{}", std::process::id()));
    std::fs::write(&file, &payload).unwrap();
    let arg = format!("@{}", file.display());
    for mode in ["copy", "dontneed"] {
        let (out, at_done, _) =
            invoke_timed(&dir, &["--payload", &arg, "--repeat", "3", "--reset", mode]);
        let lines: Vec<&str> = out.split_terminator('\n').collect();
        assert_eq!(lines.len(), 3, "{mode}: {} bytes out", out.len());
        for (i, line) in lines.iter().enumerate() {
            assert!(
                line.as_bytes() == payload.as_slice(),
                "{mode}: response {i} differs ({} bytes, {} expected)",
                line.len(),
                payload.len()
            );
        }
        assert!(at_done > 0, "{mode}: no reset ran at the guest's DONE");
    }
    let _ = std::fs::remove_file(&file);
}

#[test]
fn a_guest_writing_done_repeatedly_gets_one_reset_each_time() {
    if !require_kvm() {
        return;
    }
    let switch = format!("{}={}", cmdline::HOSTILE_KEY, cmdline::HOSTILE_DONE);
    let (_, dir) = image_and_snapshot_with("counter", &switch);
    // Three DONEs after each response: the first resets the VM and the guest goes no
    // further; every invocation still finds the snapshot's state.
    for mode in ["copy", "dontneed"] {
        let (out, _, _) = invoke_timed(&dir, &["--payload", "x", "--repeat", "6", "--reset", mode]);
        assert_eq!(out, "calls 1, previous -\n".repeat(6), "{mode}");
    }
    // Without reset the DONEs are only messages: the guest goes on, and so does its state.
    assert_state_carries_over(&dir);
}

#[test]
fn a_guest_writing_done_before_any_request_only_loses_its_own_invocation() {
    if !require_kvm() {
        return;
    }
    let switch = format!("{}={}", cmdline::HOSTILE_KEY, cmdline::HOSTILE_DONE_EARLY);
    let (_, dir) = image_and_snapshot_with("counter", &switch);
    // DONE in a loop before each request: a VM reset at DONE is put back to its snapshot
    // state at the first one and held there; the host gets no answer and its timeout ends
    // the VM (no hang, no crash, no reset skipped: the guest never ran past its DONE).
    let out = fnode(&[
        "invoke",
        dir.to_str().unwrap(),
        "--payload",
        "x",
        "--repeat",
        "3",
        "--timeout-ms",
        "1500",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("did not answer within 1500 ms"), "{stderr}");
    assert!(out.stdout.is_empty());
    // Without reset, the DONEs are only messages and the function serves.
    assert_state_carries_over(&dir);
}
