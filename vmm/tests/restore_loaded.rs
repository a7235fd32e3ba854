//! A snapshot loaded once and restored many times: VMs alive at once share the process's
//! device loop and io_uring (a hostile guest among them stops only its own VM), restoring
//! and dropping VMs over and over leaks no file descriptor and no thread, and the optional
//! working-set file is recorded, used, and refused when damaged.

mod common;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::echo::{call, read_frame, request_frame, snapshot_echo_guest, try_connect};
use common::{guest_image, BOOT_TIMEOUT};
use fnode_guest::abi::{cmdline, frame, vsock};
use fnode_vmm::builder::{build, VmConfig};
use fnode_vmm::kvm::test_support::require_kvm;
use fnode_vmm::restore::{restore_loaded_attached, AttachClient};
use fnode_vmm::vstate::vcpu_pool::MAX_PARKED;
use fnode_vmm::{
    record_working_set, restore_loaded, KvmContext, LoadedSnapshot, MicroVm, Outcome, RestoreError,
    RestoreOptions,
};

/// The tests of this file count the process's fds and threads: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("restore-loaded-{}-{name}", std::process::id()))
}

/// A VM of `loaded`, running, with its parked invocation connection attached.
fn restore_one(kvm: &KvmContext, loaded: &LoadedSnapshot, name: &str) -> (MicroVm, UnixStream) {
    let sock = tmp(&format!("{name}.sock"));
    let options = RestoreOptions {
        vsock_uds: Some(sock.clone()),
        reset: None,
        resume: true,
        first_run_here: None,
    };
    let vm = restore_loaded(kvm, loaded, Box::new(std::io::sink()), &options).unwrap();
    let s = try_connect(&sock).expect("the restored device refused the parked connection");
    (vm, s)
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task").unwrap().count()
}

/// Waits (bounded) for `cond`: a gone device's sockets close when the cancellations of its
/// last operations complete on the device loop, just after the drop.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

#[test]
fn a_loaded_snapshot_serves_many_vms_on_one_device_loop_without_leaks() {
    if !require_kvm() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let kvm = KvmContext::new().unwrap();
    let dir = tmp("snap");
    snapshot_echo_guest(&kvm, tmp("snap-boot.sock"), &dir);
    let loaded = LoadedSnapshot::load(&kvm, &dir).unwrap();
    assert!(loaded.working_set().is_none());
    assert_eq!(loaded.dir(), dir.as_path());

    // The first restore starts the process's device loop, its io_uring and a vCPU thread.
    let (vm, mut s) = restore_one(&kvm, &loaded, "warm");
    assert_eq!(call(&mut s, 1, b"warm"), b"warm");
    drop(vm);
    drop(s);
    assert!(eventually(|| threads() > 0));
    let (fds_before, threads_before) = (open_fds(), threads());

    // Several VMs alive at once, all served by the one device loop.
    let mut vms: Vec<(MicroVm, UnixStream)> = (0..3)
        .map(|i| restore_one(&kvm, &loaded, &format!("alive-{i}")))
        .collect();
    for (i, (_, s)) in vms.iter_mut().enumerate() {
        let payload = vec![i as u8; 1000];
        assert_eq!(call(s, 2, &payload), payload);
    }

    // A hostile guest joins the same loop: its device breaks and only its VM stops.
    let hostile_sock = tmp("hostile.sock");
    let mut hostile = build(
        &kvm,
        &VmConfig {
            cmdline: format!("{}={}", cmdline::HOSTILE_KEY, cmdline::HOSTILE_VSOCK),
            vsock_uds: Some(hostile_sock),
            ..VmConfig::new(guest_image())
        },
        Box::new(std::io::sink()),
    )
    .unwrap();
    match hostile.run(BOOT_TIMEOUT).unwrap().outcome {
        Outcome::DeviceFault(f) => assert!(f.to_string().contains("loops"), "{f}"),
        other => panic!("expected a device fault, got {other}"),
    }
    drop(hostile);
    for (i, (vm, s)) in vms.iter_mut().enumerate() {
        let payload: Vec<u8> = (0..200_000u32).map(|b| (b as u8) ^ (i as u8)).collect();
        assert_eq!(
            call(s, 3, &payload),
            payload,
            "VM {i} after the hostile one"
        );
        assert!(vm.poll().unwrap().is_none(), "VM {i} keeps serving");
    }
    drop(vms);

    // Restore and drop, over and over: nothing stays behind.
    for i in 0..30u64 {
        let (vm, mut s) = restore_one(&kvm, &loaded, &format!("cycle-{i}"));
        assert_eq!(call(&mut s, 10 + i, b"cycle"), b"cycle");
        drop(vm);
        drop(s);
    }
    assert!(
        eventually(|| open_fds() <= fds_before),
        "{} fds open after the cycles, {fds_before} before",
        open_fds()
    );
    // Threads: the VMs' vCPU threads park in the pool, up to its limit.
    let now = threads();
    assert!(
        now <= threads_before + MAX_PARKED,
        "{now} threads after the cycles, {threads_before} before"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_working_set_is_recorded_used_and_refused_when_damaged() {
    if !require_kvm() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let kvm = KvmContext::new().unwrap();
    let dir = tmp("ws-snap");
    snapshot_echo_guest(&kvm, tmp("ws-snap-boot.sock"), &dir);
    let ws_path = fnode_snapshot::SnapshotDir::new(&dir).working_set_path();

    // Absent: no prefetch.
    let loaded = LoadedSnapshot::load(&kvm, &dir).unwrap();
    assert!(loaded.working_set().is_none());
    let (vm, mut s) = restore_one(&kvm, &loaded, "ws-record");
    assert_eq!(call(&mut s, 1, b"record"), b"record");
    let set = record_working_set(&vm, &dir).unwrap();
    drop(vm);
    drop(s);
    assert!(set.pages() > 0, "{set:?}");

    // Present: loaded, and restores populate it (and still serve).
    let loaded = LoadedSnapshot::load(&kvm, &dir).unwrap();
    assert_eq!(loaded.working_set(), Some(&set));
    let (vm, mut s) = restore_one(&kvm, &loaded, "ws-use");
    assert_eq!(call(&mut s, 2, b"prefetched"), b"prefetched");
    drop(vm);
    drop(s);

    // Damaged: the load says which file and what to do.
    let mut bytes = std::fs::read(&ws_path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&ws_path, &bytes).unwrap();
    let err = LoadedSnapshot::load(&kvm, &dir).unwrap_err();
    assert!(matches!(err, RestoreError::WorkingSet(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&ws_path.display().to_string()) && msg.contains("delete it"),
        "{msg}"
    );
    std::fs::write(&ws_path, b"not a working set").unwrap();
    let err = LoadedSnapshot::load(&kvm, &dir).unwrap_err();
    assert!(err.to_string().contains("not a working-set file"), "{err}");

    // Removed again: the snapshot restores as before.
    std::fs::remove_file(&ws_path).unwrap();
    let loaded = LoadedSnapshot::load(&kvm, &dir).unwrap();
    assert!(loaded.working_set().is_none());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_restoring_thread_runs_the_first_request_itself_then_hands_over() {
    if !require_kvm() {
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let kvm = KvmContext::new().unwrap();
    let dir = tmp("here-snap");
    snapshot_echo_guest(&kvm, tmp("here-boot.sock"), &dir);
    let loaded = LoadedSnapshot::load(&kvm, &dir).unwrap();
    let first = request_frame(1, b"ping");
    let restore = |name: &str, first_run_here: Option<Duration>| {
        let options = RestoreOptions {
            vsock_uds: Some(tmp(&format!("{name}.sock"))),
            reset: None,
            resume: true,
            first_run_here,
        };
        let attach = AttachClient {
            port: vsock::INVOKE_PORT,
            first: &first,
        };
        restore_loaded_attached(&kvm, &loaded, Box::new(std::io::sink()), &options, attach).unwrap()
    };
    let answer = |vm: &mut MicroVm| {
        let mut s = vm
            .take_vsock_client()
            .expect("the restore attached a client");
        s.set_read_timeout(Some(BOOT_TIMEOUT)).unwrap();
        let (hdr, body) = read_frame(&mut s);
        assert_eq!(
            (hdr.kind, hdr.id, body.as_slice()),
            (frame::KIND_RESPONSE, 1, &b"ping"[..])
        );
        // The guest goes on on its own thread: a second request is answered there.
        assert_eq!(call(&mut s, 2, b"pong"), b"pong");
    };

    // With time enough, the restore returns after the guest's DONE: its first exit was
    // taken on this thread, and the response is with the device.
    let mut vm = restore("here", Some(BOOT_TIMEOUT));
    let t = *vm.restore_timings().unwrap();
    assert!(t.first_run.is_some(), "{t:?}");
    assert!(
        vm.exit_count() >= 1,
        "the guest did not exit before the restore returned"
    );
    answer(&mut vm);

    // With no time at all, the kick ends the run here at once and the vCPU's thread does
    // everything: still one answer per request.
    let mut vm = restore("here-zero", Some(Duration::ZERO));
    assert!(vm.restore_timings().unwrap().first_run.is_some());
    answer(&mut vm);

    // Without it, the vCPU's thread runs the guest from the start.
    let mut vm = restore("thread", None);
    assert!(vm.restore_timings().unwrap().first_run.is_none());
    answer(&mut vm);
}
