//! The vsock backend's io_uring: accepts, receives and sends on host Unix sockets.
//!
//! Ownership rule that makes it sound: an operation *owns* everything the kernel touches
//! until its completion arrives: the socket (an `Arc<OwnedFd>`, so the fd number cannot be
//! closed and reused under it) and the buffer (a `Vec<u8>` whose heap block does not move
//! while it sits in the op table). The device gets both back in the [`Completion`]. A
//! connection that goes away cancels its ops; their completions come back (with
//! `-ECANCELED`) and only then are the buffer and the fd freed. On drop, the ring cancels
//! everything and waits (bounded) for the completions; a buffer whose op never completed
//! is leaked rather than freed under the kernel.
//!
//! Completions signal an eventfd registered with the ring; the event loop watches it.
//! Sends use `MSG_NOSIGNAL` so a client that went away yields `EPIPE`, not a SIGPIPE.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;

use io_uring::{opcode, squeue, types, IoUring};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Submission queue entries; in-flight ops are bounded well below this by the device
/// (one accept, and at most one recv and one send per connection).
const RING_ENTRIES: u32 = 256;
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

/// The ring and the table of in-flight operations.
pub struct Uring {
    ring: IoUring,
    evt: EventFd,
    slots: Vec<Slot>,
    free: Vec<u32>,
    in_flight: usize,
    unsubmitted: bool,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl Uring {
    /// A ring whose completions signal [`eventfd`](Self::eventfd).
    pub fn new() -> io::Result<Self> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let evt = EventFd::new(EFD_NONBLOCK)?;
        ring.submitter().register_eventfd(evt.as_raw_fd())?;
        Ok(Uring {
            ring,
            evt,
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            unsubmitted: false,
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
    pub fn cancel(&mut self, id: OpId) {
        let sqe = opcode::AsyncCancel::new(id.0)
            .build()
            .user_data(CANCEL_USER_DATA);
        // SAFETY: a cancel request references no memory.
        if unsafe { self.ring.submission().push(&sqe) }.is_err() {
            let _ = self.ring.submit();
            // SAFETY: as above.
            let _ = unsafe { self.ring.submission().push(&sqe) };
        }
        self.unsubmitted = true;
    }

    fn push(&mut self, sqe: squeue::Entry, op: InFlight) -> io::Result<OpId> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot { gen: 0, op: None });
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.gen = slot.gen.wrapping_add(1);
        let user_data = (u64::from(slot.gen) << 32) | u64::from(index);
        let sqe = sqe.user_data(user_data);
        slot.op = Some(op);
        // SAFETY: the entry points into `slot.op`'s buffer and fd, which the slot owns
        // until the completion for `user_data` is reaped in `drain` (see the module doc).
        let mut pushed = unsafe { self.ring.submission().push(&sqe) }.is_ok();
        if !pushed {
            self.ring.submit()?;
            // SAFETY: as above.
            pushed = unsafe { self.ring.submission().push(&sqe) }.is_ok();
        }
        if !pushed {
            self.slots[index as usize].op = None;
            self.free.push(index);
            return Err(io::Error::other("io_uring submission queue is full"));
        }
        self.in_flight += 1;
        self.unsubmitted = true;
        Ok(OpId(user_data))
    }

    /// Hands queued entries to the kernel (one `io_uring_enter`).
    pub fn submit(&mut self) -> io::Result<()> {
        if self.unsubmitted {
            self.ring.submit()?;
            self.unsubmitted = false;
        }
        Ok(())
    }

    /// Clears the eventfd and moves every completion into `out`.
    pub fn drain(&mut self, out: &mut Vec<Completion>) {
        let _ = self.evt.read();
        for cqe in self.ring.completion() {
            let ud = cqe.user_data();
            if ud == CANCEL_USER_DATA {
                continue;
            }
            let index = (ud & 0xffff_ffff) as usize;
            let gen = (ud >> 32) as u32;
            let Some(slot) = self.slots.get_mut(index) else {
                continue;
            };
            if slot.gen != gen {
                continue;
            }
            let Some(mut op) = slot.op.take() else {
                continue;
            };
            self.free.push(index as u32);
            self.in_flight -= 1;
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
            out.push(Completion {
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
}

impl Drop for Uring {
    fn drop(&mut self) {
        if self.in_flight == 0 {
            return;
        }
        let ids: Vec<u64> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.op.is_some())
            .map(|(i, s)| (u64::from(s.gen) << 32) | i as u64)
            .collect();
        for id in ids {
            self.cancel(OpId(id));
        }
        let mut done = Vec::new();
        let ts = types::Timespec::new().nsec(100_000_000);
        for _ in 0..10 {
            if self.in_flight == 0 {
                break;
            }
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = self.ring.submitter().submit_with_args(1, &args);
            self.drain(&mut done);
        }
        // Whatever is still in flight may still be written by the kernel: leak it.
        for slot in &mut self.slots {
            if let Some(op) = slot.op.take() {
                std::mem::forget(op.buf);
                std::mem::forget(op.fd);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
