//! The device event loops: `event-manager` on a thread next to the vCPU threads.
//!
//! * [`SharedLoop`]: one thread per process (`fnode-devices`), started at the first VM that
//!   needs it and kept for the life of the process, serving the virtio devices of every VM
//!   of the process. A VM's devices join it with [`SharedLoop::register`] and leave it when
//!   the returned [`Registration`] drops (the VM's teardown): their fds are out of its epoll
//!   and the loop holds nothing of them once the drop returns. A device's handler that
//!   panics (an fnode bug) is removed from the loop alone, and its VM is told through its
//!   [`FaultSink`]; a device a guest broke stops processing by itself (see the devices). The
//!   loop processes one subscriber's events at a time: a device yields after a bounded batch
//!   of work (see the vsock device), so a busy guest delays the others by one batch.
//! * [`EventLoop`]: a thread of its own for the given subscribers, until
//!   [`EventLoop::stop`] (or the handle is dropped). Tests use it.
//!
//! Why shared: starting a thread, its epoll and its allocator arena cost tens of
//! microseconds per VM, on the restore path; one loop costs them once per process, and a
//! density run keeps one thread per process instead of one per VM.

use std::cell::Cell;
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{
    EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberId, SubscriberOps,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{DeviceFault, FaultSink};

/// A subscriber shared between the event loop and the rest of the VMM (a device is also
/// reached by its MMIO transport on the vCPU thread).
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Errors of the event loop thread.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    /// The stop eventfd could not be created or signalled.
    #[error("event loop stop eventfd failed")]
    EventFd(#[source] io::Error),
    /// The thread could not be spawned.
    #[error("spawning the event loop thread failed")]
    Spawn(#[source] io::Error),
    /// epoll failed.
    #[error("the event loop's epoll failed")]
    EventManager(#[source] event_manager::Error),
    /// A subscriber panicked.
    #[error("the event loop thread panicked (a device bug): {0}")]
    Panicked(String),
}

/// Token of the stop eventfd.
const STOP: u32 = 0;

struct Stopper {
    evt: Arc<EventFd>,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn init(&mut self, ops: &mut EventOps) {
        if ops
            .add(Events::with_data(&self.evt, STOP, EventSet::IN))
            .is_err()
        {
            self.stopped.store(true, Ordering::SeqCst);
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::SeqCst);
    }
}

/// The running event loop thread.
#[derive(Debug)]
pub struct EventLoop {
    /// Shared with the thread (one fd, not a duplicate per side).
    stop: Arc<EventFd>,
    thread: Option<JoinHandle<Result<(), EventLoopError>>>,
}

impl EventLoop {
    /// Starts a thread named `fnode-devices` running `subscribers`.
    pub fn spawn(subscribers: Vec<Subscriber>) -> Result<Self, EventLoopError> {
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::EventFd)?);
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("fnode-devices".into())
            .spawn(move || {
                crate::affinity::run_anywhere();
                run(subscribers, thread_stop)
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(EventLoop {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the loop and waits for the thread.
    pub fn stop(mut self) -> Result<(), EventLoopError> {
        self.stop_and_join()
    }

    /// Whether the thread has ended (an epoll error or a panic; see [`stop`](Self::stop)).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    fn stop_and_join(&mut self) -> Result<(), EventLoopError> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stop.write(1).map_err(EventLoopError::EventFd)?;
        match thread.join() {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(EventLoopError::Panicked(msg))
            }
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        let _ = self.stop_and_join();
    }
}

fn run(subscribers: Vec<Subscriber>, stop: Arc<EventFd>) -> Result<(), EventLoopError> {
    let mut em: EventManager<Subscriber> =
        EventManager::new().map_err(EventLoopError::EventManager)?;
    let stopped = Arc::new(AtomicBool::new(false));
    em.add_subscriber(Arc::new(Mutex::new(Stopper {
        evt: stop,
        stopped: stopped.clone(),
    })));
    for s in subscribers {
        em.add_subscriber(s);
    }
    while !stopped.load(Ordering::SeqCst) {
        em.run().map_err(EventLoopError::EventManager)?;
    }
    Ok(())
}

thread_local! {
    /// Set on the shared loop's thread.
    static ON_SHARED_LOOP: Cell<bool> = const { Cell::new(false) };
}

/// Whether the calling thread is the [`SharedLoop`]'s.
pub fn on_shared_loop() -> bool {
    ON_SHARED_LOOP.with(Cell::get)
}

/// What other threads ask of the shared loop.
enum Command {
    /// Add a subscriber under `key`; a panic in it is reported to `faults` as `name`'s.
    Add {
        key: u64,
        sub: Subscriber,
        name: String,
        faults: Option<FaultSink>,
    },
    /// Remove the subscriber of `key` (if it is still there), then signal `done`.
    Remove {
        key: u64,
        done: Option<mpsc::SyncSender<()>>,
    },
}

/// The part of the shared loop other threads reach.
struct Shared {
    /// Readable when `commands` holds something.
    wake: EventFd,
    commands: Mutex<Vec<Command>>,
    next_key: AtomicU64,
}

impl Shared {
    fn send(&self, command: Command) {
        self.commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(command);
        // An eventfd write fails only when its counter would overflow: it is readable then.
        let _ = self.wake.write(1);
    }
}

/// The process's device loop (see the module doc): one thread, one epoll, for the devices
/// of every VM in the process.
#[derive(Clone, Copy)]
pub struct SharedLoop {
    shared: &'static Shared,
}

impl std::fmt::Debug for SharedLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedLoop").finish_non_exhaustive()
    }
}

impl SharedLoop {
    /// The process's loop, started at the first call (a failed start is tried again at the
    /// next call).
    pub fn get() -> Result<SharedLoop, EventLoopError> {
        static LOOP: OnceLock<SharedLoop> = OnceLock::new();
        static STARTING: Mutex<()> = Mutex::new(());
        if let Some(l) = LOOP.get() {
            return Ok(*l);
        }
        let _one = STARTING.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(l) = LOOP.get() {
            return Ok(*l);
        }
        let l = Self::start()?;
        Ok(*LOOP.get_or_init(|| l))
    }

    fn start() -> Result<SharedLoop, EventLoopError> {
        let shared: &'static Shared = Box::leak(Box::new(Shared {
            wake: EventFd::new(EFD_NONBLOCK).map_err(EventLoopError::EventFd)?,
            commands: Mutex::new(Vec::new()),
            next_key: AtomicU64::new(1),
        }));
        let (ready_tx, ready) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("fnode-devices".into())
            .spawn(move || {
                crate::affinity::run_anywhere();
                run_shared(shared, &ready_tx)
            })
            .map_err(EventLoopError::Spawn)?;
        match ready.recv() {
            Ok(Ok(())) => Ok(SharedLoop { shared }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(EventLoopError::Panicked(
                "the shared device loop ended while starting".into(),
            )),
        }
    }

    /// Adds `sub` to the loop (its `init` runs on the loop's thread, soon after: the call
    /// does not wait for it). A panic in its handlers removes it and is reported to `faults`
    /// as a fault of the device `name`. Dropping the [`Registration`] removes it.
    pub fn register(&self, sub: Subscriber, name: &str, faults: Option<FaultSink>) -> Registration {
        let key = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
        self.shared.send(Command::Add {
            key,
            sub,
            name: name.to_string(),
            faults,
        });
        Registration {
            key,
            shared: self.shared,
        }
    }
}

/// A subscriber's place on the [`SharedLoop`]; dropping it removes the subscriber and waits
/// until the loop has let go of it (at most [`REMOVE_WAIT`]).
pub struct Registration {
    key: u64,
    shared: &'static Shared,
}

/// The longest a [`Registration`]'s drop waits for the loop (which only waits for it if
/// a device handler is stuck).
const REMOVE_WAIT: Duration = Duration::from_secs(5);

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.key)
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if on_shared_loop() {
            // The loop cannot wait for itself; it removes the subscriber after this event.
            self.shared.send(Command::Remove {
                key: self.key,
                done: None,
            });
            return;
        }
        let (done, removed) = mpsc::sync_channel(1);
        self.shared.send(Command::Remove {
            key: self.key,
            done: Some(done),
        });
        let _ = removed.recv_timeout(REMOVE_WAIT);
    }
}

/// Reads the shared loop's command eventfd.
struct Control {
    shared: &'static Shared,
    pending: Arc<AtomicBool>,
}

impl MutEventSubscriber for Control {
    fn init(&mut self, ops: &mut EventOps) {
        // Checked by run_shared before the first wait.
        let _ = ops.add(Events::with_data(&self.shared.wake, STOP, EventSet::IN));
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.shared.wake.read();
        self.pending.store(true, Ordering::Relaxed);
    }
}

/// A subscriber on the shared loop, with its handlers' panics caught: a panicking device
/// is removed from the loop (after the current round) and its VM told, the other devices
/// go on. Its events are not handled while another thread holds it (a vCPU thread resetting
/// its VM, say): the loop does not wait for one VM's device while the others have work; the
/// device's fds stay readable, so the loop comes back to it ([`Guarded::busy`]).
struct Guarded {
    key: u64,
    inner: Subscriber,
    name: String,
    faults: Option<FaultSink>,
    dead: bool,
    /// Keys of subscribers to remove after the current round.
    panicked: Arc<Mutex<Vec<u64>>>,
    /// Set when an event was left for later because another thread held the subscriber.
    busy: Arc<AtomicBool>,
}

impl Guarded {
    /// Runs `f` on the subscriber; with `wait`, even if another thread holds it (for its
    /// `init`, which must run once), else only if it is free.
    fn call(&mut self, wait: bool, f: impl FnOnce(&mut (dyn MutEventSubscriber + Send))) {
        if self.dead {
            return;
        }
        let inner = &self.inner;
        let busy = &self.busy;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut sub = match inner.try_lock() {
                Ok(sub) => sub,
                Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) if wait => {
                    inner.lock().unwrap_or_else(PoisonError::into_inner)
                }
                Err(std::sync::TryLockError::WouldBlock) => {
                    busy.store(true, Ordering::Relaxed);
                    return;
                }
            };
            f(&mut *sub);
        }));
        if r.is_err() {
            self.dead = true;
            self.panicked
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(self.key);
            if let Some(faults) = &self.faults {
                faults.report(DeviceFault {
                    device: self.name.clone(),
                    message: "the device's event handler panicked (an fnode bug); the device \
                              is stopped"
                        .into(),
                });
            }
        }
    }
}

impl MutEventSubscriber for Guarded {
    fn init(&mut self, ops: &mut EventOps) {
        self.call(true, |s| s.init(ops));
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        self.call(false, |s| s.process(events, ops));
    }
}

/// The shared loop's thread: reports on `ready` whether it started, then serves forever.
fn run_shared(shared: &'static Shared, ready: &mpsc::SyncSender<Result<(), EventLoopError>>) {
    ON_SHARED_LOOP.with(|c| c.set(true));
    let mut em: EventManager<Box<dyn MutEventSubscriber>> = match EventManager::new() {
        Ok(em) => em,
        Err(e) => {
            let _ = ready.send(Err(EventLoopError::EventManager(e)));
            return;
        }
    };
    let pending = Arc::new(AtomicBool::new(false));
    em.add_subscriber(Box::new(Control {
        shared,
        pending: pending.clone(),
    }));
    let _ = ready.send(Ok(()));
    let panicked = Arc::new(Mutex::new(Vec::new()));
    let busy = Arc::new(AtomicBool::new(false));
    let mut ids: HashMap<u64, SubscriberId> = HashMap::new();
    loop {
        if em.run().is_err() {
            // epoll_wait fails only on a bad epoll fd or buffer; do not spin if it does.
            std::thread::sleep(Duration::from_millis(1));
        }
        if busy.swap(false, Ordering::Relaxed) {
            // A device held elsewhere (for microseconds: an exit, a reset) still has events;
            // let its holder run before looking again.
            std::thread::yield_now();
        }
        let dead: Vec<u64> =
            std::mem::take(&mut *panicked.lock().unwrap_or_else(PoisonError::into_inner));
        for key in dead {
            if let Some(id) = ids.remove(&key) {
                let _ = em.remove_subscriber(id);
            }
        }
        if !pending.swap(false, Ordering::Relaxed) {
            continue;
        }
        let commands = std::mem::take(
            &mut *shared
                .commands
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        for command in commands {
            match command {
                Command::Add {
                    key,
                    sub,
                    name,
                    faults,
                } => {
                    let id = em.add_subscriber(Box::new(Guarded {
                        key,
                        inner: sub,
                        name,
                        faults,
                        dead: false,
                        panicked: panicked.clone(),
                        busy: busy.clone(),
                    }));
                    ids.insert(key, id);
                }
                Command::Remove { key, done } => {
                    if let Some(id) = ids.remove(&key) {
                        let _ = em.remove_subscriber(id);
                    }
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
            }
        }
        // A panic in an init above is handled at the next round, after the wait: wake it.
        if !panicked
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
        {
            let _ = shared.wake.write(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter {
        evt: EventFd,
        hits: Arc<Mutex<u32>>,
    }

    impl MutEventSubscriber for Counter {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::with_data(&self.evt, 1, EventSet::IN))
                .unwrap();
        }
        fn process(&mut self, _e: Events, _ops: &mut EventOps) {
            let _ = self.evt.read();
            *self.hits.lock().unwrap() += 1;
        }
    }

    /// Panics at its first event.
    struct Panicker {
        evt: EventFd,
    }

    impl MutEventSubscriber for Panicker {
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::with_data(&self.evt, 1, EventSet::IN))
                .unwrap();
        }
        fn process(&mut self, _e: Events, _ops: &mut EventOps) {
            panic!("a device bug");
        }
    }

    fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
        for _ in 0..1000 {
            if cond() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        panic!("timed out waiting for {what}");
    }

    #[test]
    fn the_shared_loop_serves_many_and_survives_a_panicking_one() {
        let shared = SharedLoop::get().unwrap();
        // Two healthy subscribers and one that panics.
        let mut kicks = Vec::new();
        let mut hits = Vec::new();
        let mut regs = Vec::new();
        for _ in 0..2 {
            let evt = EventFd::new(EFD_NONBLOCK).unwrap();
            kicks.push(evt.try_clone().unwrap());
            let h = Arc::new(Mutex::new(0));
            hits.push(h.clone());
            let sub: Subscriber = Arc::new(Mutex::new(Counter { evt, hits: h }));
            regs.push(shared.register(sub, "counter", None));
        }
        let (sink, faults) = crate::devices::virtio::fault_channel().unwrap();
        let bad_evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let bad_kick = bad_evt.try_clone().unwrap();
        let bad: Subscriber = Arc::new(Mutex::new(Panicker { evt: bad_evt }));
        let bad_reg = shared.register(bad, "virtio-bad@0x0", Some(sink));
        bad_kick.write(1).unwrap();
        let fault = faults
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("the panic was not reported");
        assert_eq!(fault.device, "virtio-bad@0x0");
        assert!(fault.message.contains("panicked"), "{fault}");
        // The loop goes on for the others.
        for round in 1..=3u32 {
            for k in &kicks {
                k.write(1).unwrap();
            }
            wait_for("both subscribers", || {
                hits.iter().all(|h| *h.lock().unwrap() >= round)
            });
        }
        drop(bad_reg);
        // A removed subscriber is not called again, and its drop waited for the loop.
        drop(regs.pop());
        let before = *hits[1].lock().unwrap();
        kicks[1].write(1).unwrap();
        kicks[0].write(1).unwrap();
        wait_for("the remaining subscriber", || *hits[0].lock().unwrap() >= 4);
        assert_eq!(*hits[1].lock().unwrap(), before);
        assert!(!on_shared_loop());
    }

    #[test]
    fn runs_subscribers_until_stopped() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let kick = evt.try_clone().unwrap();
        let hits = Arc::new(Mutex::new(0));
        let sub: Subscriber = Arc::new(Mutex::new(Counter {
            evt,
            hits: hits.clone(),
        }));
        let el = EventLoop::spawn(vec![sub]).unwrap();
        kick.write(1).unwrap();
        for _ in 0..500 {
            if *hits.lock().unwrap() > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert_eq!(*hits.lock().unwrap(), 1);
        assert!(!el.is_finished());
        el.stop().unwrap();
    }
}
