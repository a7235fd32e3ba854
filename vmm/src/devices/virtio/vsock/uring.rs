//! The vsock backend's io_uring: accepts, receives and sends on host Unix sockets.
//!
//! One ring serves every vsock device of the process ([`RingCore`], started with the
//! process's [`SharedLoop`] at the first device); each device has a [`Uring`], its handle on
//! it: its own table of operations, its own completions and its own eventfd. Setting up a
//! ring (its memory, its mappings, its eventfd) cost tens of microseconds per VM when every
//! device had its own.
//!
//! Ownership rule that makes it sound: an operation *owns* everything the kernel touches
//! until its completion arrives: the socket (an `Arc<OwnedFd>`, so the fd number cannot be
//! closed and reused under it) and the buffer (a `Vec<u8>` whose heap block does not move
//! while it sits in the op table). The device gets both back in the [`Completion`]. A
//! connection that goes away cancels its ops; their completions come back (with
//! `-ECANCELED`) and only then are the buffer and the fd freed. A device that goes away
//! cancels every op it has in flight and leaves them to the ring, which frees each buffer
//! and fd when its completion arrives.
//!
//! Only the shared loop's thread calls `io_uring_enter`: an operation is carried out on
//! behalf of the thread that submitted it, and the loop's thread lives as long as the
//! process. A device on another thread (a vCPU thread resetting its device, a test's own
//! loop) queues its entries and wakes the loop, which submits them.
//!
//! Completions signal the ring's eventfd, which the shared loop watches: it moves each one
//! to its device and signals that device's eventfd ([`Uring::eventfd`]), which the device's
//! event loop subscriber watches. Sends use `MSG_NOSIGNAL` so a client that went away yields
//! `EPIPE`, not a SIGPIPE.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::virtio::event_loop::{on_shared_loop, Registration, SharedLoop};

/// Submission queue entries of the process's ring (the completion queue has twice as many;
/// the kernel keeps completions beyond that until they are reaped). In-flight ops are not
/// bounded by it: a device keeps one accept, and at most one recv and one send per
/// connection; entries only wait in the queue until the loop's next submission.
const RING_ENTRIES: u32 = 1024;
/// user_data of cancel requests (their completions are ignored).
const CANCEL_USER_DATA: u64 = u64::MAX;

/// What an operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    /// `accept4` on a listener; the result is the new fd.
    Accept,
    /// `recv` into the spare capacity of the buffer.
    Recv,
    /// `send` of `buf[offset..]`.
    Send,
}

/// An operation's handle, for cancelling it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OpId(u64);

/// A finished operation, with what it owned.
#[derive(Debug)]
pub struct Completion {
    /// The owner tag given at submission.
    pub tag: u64,
    /// What it was.
    pub kind: OpKind,
    /// The syscall result: bytes, a new fd, or `-errno`.
    pub result: i32,
    /// The buffer (for a recv, its length grew by the bytes received).
    pub buf: Vec<u8>,
    /// For a send: where the bytes it sent started.
    pub offset: usize,
    /// For a successful accept: the new connection (owned from the moment it is reaped, so
    /// a completion nobody handles still closes it).
    pub accepted: Option<OwnedFd>,
    /// The socket.
    pub fd: Arc<OwnedFd>,
}

#[derive(Debug)]
struct Slot {
    gen: u32,
    /// The [`Uring`] the op belongs to.
    owner: u64,
    op: Option<InFlight>,
}

#[derive(Debug)]
struct InFlight {
    tag: u64,
    kind: OpKind,
    buf: Vec<u8>,
    offset: usize,
    fd: Arc<OwnedFd>,
}

/// A device's completions, waiting for it to drain them.
#[derive(Debug)]
struct Owner {
    evt: Arc<EventFd>,
    done: Vec<Completion>,
}

/// The ring and the table of every device's in-flight operations.
struct CoreInner {
    ring: IoUring,
    slots: Vec<Slot>,
    free: Vec<u32>,
    owners: HashMap<u64, Owner>,
    unsubmitted: bool,
}

/// The process's ring (see the module doc).
pub struct RingCore {
    inner: Mutex<CoreInner>,
    /// Registered with the ring (completions signal it) and written to ask the loop to
    /// submit.
    evt: EventFd,
    next_owner: AtomicU64,
}

impl std::fmt::Debug for RingCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RingCore").finish_non_exhaustive()
    }
}

impl RingCore {
    /// The process's ring, set up (with the shared loop) at the first call.
    fn shared() -> io::Result<&'static RingCore> {
        static CORE: OnceLock<&'static RingCore> = OnceLock::new();
        // Why the ring could not join the loop: the process's vsock devices cannot work.
        static FAILED: OnceLock<String> = OnceLock::new();
        static STARTING: Mutex<()> = Mutex::new(());
        if let Some(c) = CORE.get() {
            return Ok(c);
        }
        let _one = STARTING.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = CORE.get() {
            return Ok(c);
        }
        if let Some(why) = FAILED.get() {
            return Err(io::Error::other(why.clone()));
        }
        let shared_loop = SharedLoop::get().map_err(io::Error::other)?;
        let core = RingCore::leaked()?;
        let (joined, join_result) = mpsc::channel();
        let service = RingService {
            core,
            joined: Some(joined),
        };
        let registration: Registration =
            shared_loop.register(Arc::new(Mutex::new(service)), "io_uring", None);
        // Without the ring's eventfd on the loop no completion is ever handed out: every
        // device's host I/O would hang. The first device finds out here, with the cause (the
        // loop's own thread cannot wait for itself; it never builds devices).
        if !on_shared_loop() {
            let why = match join_result.recv_timeout(JOIN_WAIT) {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(format!(
                    "the shared io_uring's eventfd cannot join the device loop: {e}"
                )),
                Err(_) => Some(format!(
                    "the device loop did not take the shared io_uring within {JOIN_WAIT:?}"
                )),
            };
            if let Some(why) = why {
                drop(registration);
                // The ring stays allocated: one per process, as on success.
                let why = FAILED.get_or_init(|| why);
                return Err(io::Error::other(why.clone()));
            }
        }
        // Serves the ring for the life of the process.
        std::mem::forget(registration);
        Ok(*CORE.get_or_init(|| core))
    }

    /// A new ring whose completions signal its eventfd, kept for the life of the process.
    fn leaked() -> io::Result<&'static RingCore> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let evt = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(evt.as_raw_fd())?;
        Ok(Box::leak(Box::new(RingCore {
            inner: Mutex::new(CoreInner {
                ring,
                slots: Vec::new(),
                free: Vec::new(),
                owners: HashMap::new(),
                unsubmitted: false,
            }),
            evt,
            next_owner: AtomicU64::new(1),
        })))
    }

    fn lock(&self) -> MutexGuard<'_, CoreInner> {
        // The table stays consistent across a panic in a device (it is only changed here).
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Submits the queued entries: on the loop's thread now, from elsewhere by waking it.
    fn submit(&self) -> io::Result<()> {
        if on_shared_loop() {
            let mut inner = self.lock();
            if inner.unsubmitted {
                inner.unsubmitted = false;
                // The queue is shared by every VM's devices: a failed submit (a full
                // completion queue, say) is no one device's fault. The entries stay queued
                // and the loop tries again after reaping, as `service` does.
                if inner.ring.submit().is_err() {
                    inner.unsubmitted = true;
                    drop(inner);
                    return self.evt.write(1);
                }
            }
            Ok(())
        } else {
            self.evt.write(1)
        }
    }

    /// What the loop does when the ring's eventfd fires: submit what waits, hand out the
    /// completions.
    fn service(&self) {
        let _ = self.evt.read();
        let mut inner = self.lock();
        if inner.unsubmitted {
            inner.unsubmitted = false;
            // A failed submit leaves the entries queued; the next one carries them.
            if inner.ring.submit().is_err() {
                inner.unsubmitted = true;
            }
        }
        inner.reap();
    }
}

impl CoreInner {
    /// Moves every completion to its device's list and signals the devices that got one.
    /// The completion of an op whose device is gone frees what the op owned.
    fn reap(&mut self) {
        let CoreInner {
            ring,
            slots,
            free,
            owners,
            ..
        } = self;
        for cqe in ring.completion() {
            let ud = cqe.user_data();
            if ud == CANCEL_USER_DATA {
                continue;
            }
            let index = (ud & 0xffff_ffff) as usize;
            let gen = (ud >> 32) as u32;
            let Some(slot) = slots.get_mut(index) else {
                continue;
            };
            if slot.gen != gen {
                continue;
            }
            let Some(mut op) = slot.op.take() else {
                continue;
            };
            free.push(index as u32);
            let result = cqe.result();
            if op.kind == OpKind::Recv && result > 0 {
                let n = (result as usize).min(op.buf.capacity() - op.buf.len());
                // SAFETY: the kernel wrote `result` bytes into the spare capacity the recv
                // was given (and never more than that).
                unsafe { op.buf.set_len(op.buf.len() + n) };
            }
            let accepted = (op.kind == OpKind::Accept && result >= 0).then(|| {
                // SAFETY: a successful accept returns a new fd that nothing else owns.
                unsafe { OwnedFd::from_raw_fd(result) }
            });
            // A device that is gone: the buffer, the socket and an accepted fd drop here.
            let Some(owner) = owners.get_mut(&slot.owner) else {
                continue;
            };
            if owner.done.is_empty() {
                let _ = owner.evt.write(1);
            }
            owner.done.push(Completion {
                tag: op.tag,
                kind: op.kind,
                result,
                buf: op.buf,
                offset: op.offset,
                fd: op.fd,
                accepted,
            });
        }
    }

    fn push_entry(&mut self, sqe: &squeue::Entry) -> bool {
        // SAFETY: the entry points into memory an op table slot owns until its completion
        // is reaped (see the module doc); a cancel entry references no memory.
        if unsafe { self.ring.submission().push(sqe) }.is_ok() {
            self.unsubmitted = true;
            return true;
        }
        // Full: only the loop's thread may submit to make room.
        if on_shared_loop() && self.ring.submit().is_ok() {
            // SAFETY: as above.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                self.unsubmitted = true;
                return true;
            }
        }
        false
    }
}

/// The longest [`RingCore::shared`] waits for the loop to take the ring's eventfd (it does
/// so as soon as it runs).
const JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The shared loop's subscriber for the ring's eventfd.
struct RingService {
    core: &'static RingCore,
    /// Told once whether the eventfd joined the loop ([`RingCore::shared`] waits for it).
    joined: Option<mpsc::Sender<io::Result<()>>>,
}

impl MutEventSubscriber for RingService {
    fn init(&mut self, ops: &mut EventOps) {
        let joined = ops
            .add(Events::new(&self.core.evt, EventSet::IN))
            .map_err(io::Error::other);
        if let Some(tx) = self.joined.take() {
            let _ = tx.send(joined);
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.core.service();
    }
}

/// A device's handle on the process's ring: its operations and completions.
pub struct Uring {
    core: &'static RingCore,
    owner: u64,
    evt: Arc<EventFd>,
    in_flight: usize,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("owner", &self.owner)
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl Uring {
    /// A handle whose completions signal [`eventfd`](Self::eventfd) (the process's ring and
    /// loop start at the first).
    pub fn new() -> io::Result<Self> {
        let core = RingCore::shared()?;
        let evt = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let owner = core.next_owner.fetch_add(1, Ordering::Relaxed);
        core.lock().owners.insert(
            owner,
            Owner {
                evt: evt.clone(),
                done: Vec::new(),
            },
        );
        Ok(Uring {
            core,
            owner,
            evt,
            in_flight: 0,
        })
    }

    /// Readable when completions are waiting.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Operations submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Accepts a connection on `listener`.
    pub fn accept(&mut self, tag: u64, listener: Arc<OwnedFd>) -> io::Result<OpId> {
        let sqe = opcode::Accept::new(
            types::Fd(listener.as_raw_fd()),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_CLOEXEC)
        .build();
        self.push(
            sqe,
            InFlight {
                tag,
                kind: OpKind::Accept,
                buf: Vec::new(),
                offset: 0,
                fd: listener,
            },
        )
    }

    /// Receives up to `max` bytes (at most the spare capacity) at the end of `buf`.
    pub fn recv(
        &mut self,
        tag: u64,
        fd: Arc<OwnedFd>,
        mut buf: Vec<u8>,
        max: usize,
    ) -> io::Result<OpId> {
        let spare = buf.spare_capacity_mut();
        let len = u32::try_from(spare.len().min(max)).unwrap_or(u32::MAX);
        let sqe =
            opcode::Recv::new(types::Fd(fd.as_raw_fd()), spare.as_mut_ptr().cast(), len).build();
        self.push(
            sqe,
            InFlight {
                tag,
                kind: OpKind::Recv,
                buf,
                offset: 0,
                fd,
            },
        )
    }

    /// Sends `buf[offset..]`.
    pub fn send(
        &mut self,
        tag: u64,
        fd: Arc<OwnedFd>,
        buf: Vec<u8>,
        offset: usize,
    ) -> io::Result<OpId> {
        let rest = buf.get(offset..).unwrap_or(&[]);
        let len = u32::try_from(rest.len()).unwrap_or(u32::MAX);
        let sqe = opcode::Send::new(types::Fd(fd.as_raw_fd()), rest.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build();
        self.push(
            sqe,
            InFlight {
                tag,
                kind: OpKind::Send,
                buf,
                offset,
                fd,
            },
        )
    }

    /// Asks the kernel to cancel `id`; its completion still arrives (usually `-ECANCELED`).
    /// Takes effect at the next [`submit`](Self::submit).
    pub fn cancel(&mut self, id: OpId) {
        let sqe = opcode::AsyncCancel::new(id.0)
            .build()
            .user_data(CANCEL_USER_DATA);
        // A cancel that finds the queue full is lost: the op then ends with its socket.
        let _ = self.core.lock().push_entry(&sqe);
    }

    fn push(&mut self, sqe: squeue::Entry, op: InFlight) -> io::Result<OpId> {
        let mut inner = self.core.lock();
        let index = match inner.free.pop() {
            Some(i) => i,
            None => {
                inner.slots.push(Slot {
                    gen: 0,
                    owner: 0,
                    op: None,
                });
                (inner.slots.len() - 1) as u32
            }
        };
        let slot = &mut inner.slots[index as usize];
        slot.gen = slot.gen.wrapping_add(1);
        slot.owner = self.owner;
        let user_data = (u64::from(slot.gen) << 32) | u64::from(index);
        let sqe = sqe.user_data(user_data);
        slot.op = Some(op);
        if !inner.push_entry(&sqe) {
            inner.slots[index as usize].op = None;
            inner.free.push(index);
            return Err(io::Error::other("io_uring submission queue is full"));
        }
        self.in_flight += 1;
        Ok(OpId(user_data))
    }

    /// Hands queued entries to the kernel: at once on the shared loop's thread, else by
    /// waking it.
    pub fn submit(&mut self) -> io::Result<()> {
        self.core.submit()
    }

    /// Clears the eventfd and moves this device's completions into `out`.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        let _ = self.evt.read();
        let mut inner = self.core.lock();
        inner.reap();
        if let Some(owner) = inner.owners.get_mut(&self.owner) {
            self.in_flight = self.in_flight.saturating_sub(owner.done.len());
            out.append(&mut owner.done);
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        let mut inner = self.core.lock();
        inner.owners.remove(&self.owner);
        let ids: Vec<u64> = inner
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.owner == self.owner && s.op.is_some())
            .map(|(i, s)| (u64::from(s.gen) << 32) | i as u64)
            .collect();
        for id in ids {
            let sqe = opcode::AsyncCancel::new(id)
                .build()
                .user_data(CANCEL_USER_DATA);
            // Not cancelled (queue full): the op ends when its socket does.
            let _ = inner.push_entry(&sqe);
        }
        let queued = inner.unsubmitted;
        drop(inner);
        // The ring frees each op's buffer and socket when its completion arrives.
        if queued {
            let _ = self.core.submit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::SubscriberOps;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    fn wait(u: &mut Uring, out: &mut Vec<Completion>) {
        for _ in 0..1000 {
            u.drain(out);
            if !out.is_empty() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        panic!("no completion");
    }

    #[test]
    fn a_ring_whose_eventfd_cannot_join_the_loop_says_so() {
        let core = RingCore::leaked().unwrap();
        let mut em = event_manager::EventManager::<Box<dyn MutEventSubscriber>>::new().unwrap();
        let mut join = |core| {
            let (tx, rx) = mpsc::channel();
            em.add_subscriber(Box::new(RingService {
                core,
                joined: Some(tx),
            }));
            rx.try_recv().unwrap()
        };
        join(core).unwrap();
        // The same eventfd a second time: epoll refuses it. Reported, not a panic.
        let err = join(core).unwrap_err();
        assert!(err.to_string().contains("already been registered"), "{err}");
    }

    #[test]
    fn recv_send_and_cancel() {
        let mut u = Uring::new().unwrap();
        let (mut a, b) = UnixStream::pair().unwrap();
        let b = Arc::new(OwnedFd::from(b));
        a.write_all(b"hello").unwrap();
        u.recv(7, b.clone(), Vec::with_capacity(16), 16).unwrap();
        u.submit().unwrap();
        let mut out = Vec::new();
        wait(&mut u, &mut out);
        let c = out.pop().unwrap();
        assert_eq!(
            (c.tag, c.kind, c.result, &c.buf[..]),
            (7, OpKind::Recv, 5, &b"hello"[..])
        );

        u.send(8, b.clone(), b"xxworld".to_vec(), 2).unwrap();
        u.submit().unwrap();
        wait(&mut u, &mut out);
        let c = out.pop().unwrap();
        assert_eq!((c.kind, c.result, c.offset), (OpKind::Send, 5, 2));
        let mut got = [0u8; 5];
        a.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"world");

        // A recv with nothing to read stays pending until cancelled.
        let id = u.recv(9, b.clone(), Vec::with_capacity(16), 16).unwrap();
        u.submit().unwrap();
        assert_eq!(u.in_flight(), 1);
        u.cancel(id);
        u.submit().unwrap();
        wait(&mut u, &mut out);
        let c = out.pop().unwrap();
        assert_eq!((c.tag, c.result), (9, -libc::ECANCELED));
        assert_eq!(u.in_flight(), 0);

        // Dropping with an op in flight cancels it first.
        u.recv(10, b, Vec::with_capacity(16), 16).unwrap();
        u.submit().unwrap();
        drop(u);
    }
}
