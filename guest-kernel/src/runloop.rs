//! The invocation loop's kernel side: `NEXT`, and what a function's panic or fault becomes.
//!
//! [`start`] finds the function in the image ([`crate::user`]), picks where requests come
//! from ([`Source`]) and enters the function, which runs its `init` and then makes one `NEXT`
//! system call per invocation: [`next`] sends the previous result (straight from user
//! memory, after checking it lies there) and waits for the next request, written straight
//! into the function's request buffer. A panic ([`panic`]) or a CPU exception in user mode
//! ([`user_fault`]) while a request is in flight answers it with an error frame; then the VM
//! ends (`abi::exit::FAILURE` / `abi::exit::FAULT`): a function that failed is not reused.
//!
//! The first `NEXT` (right after `init`) signals READY (`abi::control::READY`) once the
//! host's invocation connection is open: a VMM snapshots the guest there, connection
//! included, and a restored guest serves its first request without a handshake.
//!
//! Every later `NEXT` signals DONE (`abi::control::DONE`) once the result is with the device
//! in full: a VMM that resets the VM between invocations does it right there, while the
//! host reads the response, and the guest runs no further (it is back at READY).
//!
//! Per invocation the kernel runs the `syscall` entry and exit (20 instructions), the
//! dispatch, the checks here (a few dozen) and the channel's send and receive.

use fnode_guest::abi::{
    frame::{KIND_ERROR, KIND_RESPONSE, MAX_PAYLOAD},
    user::{in_user_memory, sys::RESULT_NONE, USER_START},
};

/// The message sent for a result the function did not deliver properly.
pub const BAD_RESULT: &str =
    "the function returned an invalid result (bad kind, too long, or outside its memory)";
/// The message sent when the function asks for the next request without answering this one.
pub const NO_RESULT: &str = "the function returned no result";

/// Checks a `NEXT` result: `(kind, ptr, len)` as a frame kind and a user buffer, or the
/// message to send instead.
pub fn check_result(
    kind: u64,
    ptr: u64,
    len: u64,
    user_end: u64,
) -> Result<(u16, u64, u64), &'static str> {
    match kind {
        RESULT_NONE => Err(NO_RESULT),
        k if (k == u64::from(KIND_RESPONSE) || k == u64::from(KIND_ERROR))
            && len <= MAX_PAYLOAD as u64
            && in_user_memory(user_end, ptr, len) =>
        {
            Ok((k as u16, ptr, len))
        }
        _ => Err(BAD_RESULT),
    }
}

/// Most result bytes [`check_small_result`] takes (the run loop's straight way sends no more
/// than that in one packet anyway).
pub const SMALL_RESULT_MAX: u64 = 4096;
const _: () = assert!(SMALL_RESULT_MAX <= MAX_PAYLOAD as u64);

/// [`check_result`] for a result of at most [`SMALL_RESULT_MAX`] bytes, in fewer steps
/// (kernel code may be emulated one instruction at a time): `(kind, ptr, len)` if it is a
/// RESPONSE or ERROR lying in user memory, else `None` (then `check_result` decides).
#[inline(always)]
pub fn check_small_result(kind: u64, ptr: u64, len: u64, user_end: u64) -> Option<(u16, u64, u64)> {
    // `ptr + len <= user_end` without overflow; a `user_end` below `len` leaves 0, below
    // any `ptr` that passes the first test.
    if (kind == u64::from(KIND_RESPONSE) || kind == u64::from(KIND_ERROR))
        && len <= SMALL_RESULT_MAX
        && ptr >= USER_START
        && ptr <= user_end.saturating_sub(len)
    {
        return Some((kind as u16, ptr, len));
    }
    None
}

/// The `invoke_repeat=` count: 1 if absent.
pub fn repeat_count(value: Option<&str>) -> Result<u64, RunError<'_>> {
    match value {
        None => Ok(1),
        Some(v) => match v.parse() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(RunError::BadRepeat(v)),
        },
    }
}

/// Whether a page fault at `cr2` with the stack pointer at `rsp` looks like the function's
/// stack running into the kernel memory below it.
pub fn is_stack_overflow(vector: u64, cr2: u64, rsp: u64) -> bool {
    const NEAR: u64 = 1 << 20;
    vector == 14 && (USER_START - NEAR..USER_START).contains(&cr2) && rsp < USER_START + NEAR
}

/// Why the function could not be started.
#[derive(Debug, thiserror::Error)]
pub enum RunError<'a> {
    /// The image's function header or the memory it needs.
    #[error(transparent)]
    User(#[from] crate::user::UserError),
    /// `invoke_repeat=` is not a positive number.
    #[error("invoke_repeat={0} is not a positive number")]
    BadRepeat(&'a str),
    /// The invocation channel cannot use the request buffer.
    #[error("cannot set up the invocation channel")]
    Channel(#[source] crate::channel::ChannelError),
}

#[cfg(target_os = "none")]
pub use imp::{next, panic, start, user_fault};

#[cfg(target_os = "none")]
mod imp {
    use core::{
        fmt::Write,
        ptr::NonNull,
        sync::atomic::{AtomicBool, Ordering},
    };

    use fnode_guest::abi::{self, cmdline, fault::FaultReport, user::Layout};

    use super::*;
    use crate::{
        channel::{Channel, ChannelError},
        control, exit,
        hostile::Hostile,
        line::Line,
        serial, syscall, user,
        virtio::{self, mmio::MmioTransport},
        BootInfo,
    };

    /// Where requests come from and where results go.
    // One instance, in a static: the channel's size costs nothing.
    #[allow(clippy::large_enum_variant)]
    enum Source {
        /// The invocation channel: frames over vsock, payloads straight into (and out of)
        /// the function's memory.
        Vsock(Channel<MmioTransport>),
        /// `invoke=<text>`: the same request `remaining` more times; the last result is
        /// printed on the console, then the VM exits.
        Invoke {
            request: &'static [u8],
            remaining: u64,
        },
        /// No channel: once `init` has run, the kernel says so and the VM exits.
        Idle,
    }

    impl Source {
        /// `invoke=` if given, else the vsock device the command line announces, else none.
        fn from_cmdline(line: &'static str, layout: &Layout) -> Result<Self, RunError<'static>> {
            if let Some(text) = cmdline::get(line, cmdline::INVOKE_KEY) {
                let remaining = repeat_count(cmdline::get(line, cmdline::INVOKE_REPEAT_KEY))?;
                return Ok(Source::Invoke {
                    request: text.as_bytes(),
                    remaining,
                });
            }
            let Some(vsock) = virtio::find_vsock(line) else {
                return Ok(Source::Idle);
            };
            let Some(buf) = NonNull::new(layout.request_buf as *mut u8) else {
                return Ok(Source::Idle);
            };
            // SAFETY: the request buffer is MAX_PAYLOAD bytes of user memory that lives as
            // long as the VM; the kernel touches it only inside the channel's calls, while the
            // function is suspended (the function reads it between NEXT calls, when the
            // channel does not run).
            let channel =
                unsafe { Channel::new(vsock, buf, MAX_PAYLOAD) }.map_err(RunError::Channel)?;
            Ok(Source::Vsock(channel))
        }

        /// Sends the result of request `id`. Returns whether it went to the host through
        /// the device (which then has all of it).
        // Always inlined into `next`: one call frame less on every invocation.
        #[inline(always)]
        fn send(&mut self, id: u64, kind: u16, payload: &[u8]) -> bool {
            match self {
                Source::Vsock(channel) => match channel.send_response(id, kind, payload) {
                    Ok(()) => true,
                    // The host went away: the next request comes on a new connection.
                    Err(ChannelError::Closed) => false,
                    Err(e) => channel_failed(&e),
                },
                Source::Invoke { remaining: 0, .. } => {
                    print_result(kind, payload);
                    false
                }
                Source::Invoke { .. } | Source::Idle => false,
            }
        }

        /// Signals READY (`abi::control::READY`): init is done and, with a vsock channel,
        /// the host's connection is open, so a snapshot taken here serves requests at once.
        #[cold]
        #[inline(never)]
        fn ready(&mut self) {
            if let Source::Vsock(channel) = self {
                loop {
                    match channel.wait_connected() {
                        Ok(()) => break,
                        Err(ChannelError::Closed) => {}
                        Err(e) => channel_failed(&e),
                    }
                }
                // A guest restored from the snapshot resumes right before the wait for its
                // first request.
                channel.signal_then_wait(control::ready);
                return;
            }
            control::ready();
        }

        /// Waits for the next request, written into `buf`; returns its id and length.
        fn wait(&mut self, buf: &mut [u8]) -> (u64, usize) {
            match self {
                Source::Vsock(channel) => loop {
                    match channel.wait_request() {
                        Ok(request) => return request,
                        Err(ChannelError::Closed) => {}
                        // The host got an error frame; the next connection may do better.
                        Err(e @ ChannelError::Rejected(_)) => log(&e),
                        Err(e) => channel_failed(&e),
                    }
                },
                Source::Invoke { request, remaining } if *remaining > 0 => {
                    *remaining -= 1;
                    let len = request.len().min(buf.len());
                    buf[..len].copy_from_slice(&request[..len]);
                    (*remaining, len)
                }
                Source::Invoke { .. } => exit::exit(abi::exit::SUCCESS),
                Source::Idle => idle_exit(),
            }
        }
    }

    /// Prints `fnode guest-kernel: <what>`.
    #[cold]
    #[inline(never)]
    fn log(what: &dyn core::fmt::Display) {
        let mut line = Line::log();
        // A `Line` never fails to take text; it cuts what does not fit.
        let _ = write!(line, "{what}");
        serial::write_line(&mut line);
    }

    /// The channel's device failed: nothing more can be served.
    #[cold]
    #[inline(never)]
    fn channel_failed(e: &ChannelError) -> ! {
        let mut line = Line::log();
        let _ = write!(line, "invocation channel failed: {e}");
        if let Some(source) = core::error::Error::source(e) {
            let _ = write!(line, ": {source}");
        }
        serial::write_line(&mut line);
        exit::exit(abi::exit::FAILURE)
    }

    /// Prints the last `invoke=` result on the console (out of line: `next` stays small).
    #[cold]
    #[inline(never)]
    fn print_result(kind: u16, payload: &[u8]) {
        let mut line = Line::log();
        line.str("invoke ")
            .str(if kind == KIND_RESPONSE {
                "response "
            } else {
                "error "
            })
            .dec(payload.len() as u64)
            .str(" bytes: ");
        serial::write(line.text().as_bytes());
        serial::write(payload);
        serial::write(b"\n");
    }

    /// The end of an image booted without a channel (out of line: `next` stays small).
    #[cold]
    #[inline(never)]
    fn idle_exit() -> ! {
        let mut line = Line::log();
        line.str("function ready: no invocation channel, exiting");
        serial::write_line(&mut line);
        exit::exit(abi::exit::SUCCESS)
    }

    struct RunLoop {
        layout: Layout,
        source: Source,
        /// The id of the request the function is handling.
        in_flight: Option<u64>,
        /// READY was signalled (on the first `NEXT`, after `init`).
        ready: bool,
        /// `fnode.hostile=done` or `done-early`: DONE at the wrong times too.
        hostile: Option<Hostile>,
        /// Nothing to do but wait for the request: READY was signalled and no hostile
        /// switch is on (one test per `NEXT` covers both).
        plain: bool,
    }

    impl RunLoop {
        /// What a `NEXT` that is not plain does before it waits for the request: READY
        /// (once), a hostile switch's early DONEs (out of line: `next` stays small).
        #[cold]
        #[inline(never)]
        fn before_wait(&mut self) {
            if !self.ready {
                self.ready = true;
                if self.hostile.is_none() {
                    // READY last: a snapshot taken there resumes with the request's check.
                    self.plain = true;
                    self.source.ready();
                    return;
                }
                self.source.ready();
            }
            hostile_done(self.hostile, false);
            self.plain = self.hostile.is_none();
        }
    }

    /// DONE as a `NEXT` that is not plain writes it (out of line: `next` stays small).
    /// `after_response`: in place of a response's DONE, else before waiting for a request.
    /// Without a hostile switch, that is the response's one DONE; `fnode.hostile=done` makes
    /// it three, in one `rep outsd` (the VMM gets the first as an exit and the other two
    /// while it completes the instruction); `fnode.hostile=done-early` writes a hundred
    /// before each request.
    #[cold]
    #[inline(never)]
    fn hostile_done(what: Option<Hostile>, after_response: bool) {
        match (what, after_response) {
            (None, true) => control::done(),
            (Some(Hostile::Done), true) => {
                static THREE: [u32; 3] = [abi::control::DONE; 3];
                // SAFETY: `rep outsd` reads `rcx` words from `rsi` (a static of that many,
                // with the direction flag clear, as the kernel keeps it) and writes them to
                // the control port; it writes no memory.
                unsafe {
                    core::arch::asm!(
                        "rep outsd",
                        in("dx") abi::control::PORT,
                        inout("rsi") THREE.as_ptr() => _,
                        inout("rcx") THREE.len() => _,
                        options(nostack, preserves_flags, readonly)
                    )
                };
            }
            (Some(Hostile::DoneEarly), false) => {
                for _ in 0..100 {
                    control::done();
                }
            }
            _ => {}
        }
    }

    // The run loop's state, touched only from system calls and user-mode exceptions. It lives
    // above the trap stack's top, in the page every system call writes its frame into
    // (`boot::TRAP_PAGE_STATE_SIZE`): a restored guest's first request touches one page less.
    // Uninitialised until `start` writes it, before user mode (the only source of system
    // calls and user-mode exceptions) begins.
    unsafe extern "C" {
        static mut fnode_trap_page_state: [u8; crate::boot::TRAP_PAGE_STATE_SIZE];
    }

    const _: () = assert!(
        core::mem::size_of::<RunLoop>() <= crate::boot::TRAP_PAGE_STATE_SIZE
            && core::mem::align_of::<RunLoop>() <= 64
    );

    /// `start` wrote the state (checked on the cold paths only: `NEXT` comes from user mode,
    /// which begins after `start` wrote it).
    static STARTED: AtomicBool = AtomicBool::new(false);

    fn slot() -> *mut RunLoop {
        (&raw mut fnode_trap_page_state).cast()
    }

    /// The state, for `NEXT`.
    #[inline(always)]
    fn state() -> &'static mut RunLoop {
        // SAFETY: one CPU; the state is used only in the kernel's system call and exception
        // paths, which never nest (user mode runs with interrupts off, and a user-mode
        // exception cannot happen while a system call runs), so no other reference to it is
        // live. `start` wrote it before user mode, the only source of system calls, began;
        // the slot is big and aligned enough (checked above; the trap stack's top is
        // 64-aligned).
        unsafe { &mut *slot() }
    }

    /// The state if `start` wrote it (for the paths that may run before: exceptions).
    fn state_checked() -> Option<&'static mut RunLoop> {
        if STARTED.load(Ordering::Relaxed) {
            Some(state())
        } else {
            None
        }
    }

    /// Runs the image's function, if it has one (returns if not): checks its header, opens
    /// user memory, and enters it. Never returns once the function starts.
    pub fn start(boot: &BootInfo) -> Result<(), RunError<'static>> {
        let Some(layout) = user::find(&boot.memory)? else {
            return Ok(());
        };
        let source = Source::from_cmdline(boot.cmdline, &layout)?;
        user::prepare(&layout)?;
        // SAFETY: user mode has not started: nothing else references the state; the slot is
        // big and aligned enough (checked above). A write, not an assignment: the slot holds
        // no value to drop.
        unsafe {
            slot().write(RunLoop {
                layout,
                source,
                in_flight: None,
                ready: false,
                hostile: crate::hostile::switch(boot.cmdline)
                    .ok()
                    .flatten()
                    .filter(|h| h.serves()),
                plain: false,
            })
        };
        STARTED.store(true, Ordering::Relaxed);
        let mut line = Line::log();
        line.str("function: entry ")
            .hex(layout.entry)
            .str(", heap ")
            .dec((layout.user_end - layout.heap_start) >> 20)
            .str(" MiB");
        serial::write_line(&mut line);
        crate::control::booted();
        user::enter(&layout)
    }

    /// `NEXT(kind, ptr, len)`: sends the previous result, waits for the next request.
    ///
    /// The usual invocation (no hostile switch, a small result, a small request that
    /// arrives whole) goes the channel's straight ways, `try_send_small` and
    /// `next_request`, in a function that calls nothing on its way (no registers to save,
    /// no frame: kernel code may be emulated one instruction at a time); anything else goes
    /// the general ways ([`next_general`], [`receive_general`]), which handle every case.
    pub fn next(kind: u64, ptr: u64, len: u64) -> u64 {
        let run = state();
        let Source::Vsock(channel) = &mut run.source else {
            return next_general(kind, ptr, len);
        };
        let Some(id) = run.in_flight else {
            return next_general(kind, ptr, len);
        };
        if !run.plain {
            return next_general(kind, ptr, len);
        }
        let Some((kind, ptr, len)) = check_small_result(kind, ptr, len, run.layout.user_end) else {
            return next_general(kind, ptr, len);
        };
        // SAFETY: check_small_result found the range inside user memory; the function is
        // suspended while the kernel sends it.
        let payload = unsafe { core::slice::from_raw_parts(ptr as *const u8, len as usize) };
        if !channel.try_send_small(id, kind, payload) {
            return next_general(u64::from(kind), ptr, len);
        }
        // The device has all of the response: a VMM that resets between invocations does it
        // here, and the guest goes no further.
        run.in_flight = None;
        control::done();
        receive_next()
    }

    /// [`next`] for everything but the usual invocation.
    #[inline(never)]
    fn next_general(kind: u64, ptr: u64, len: u64) -> u64 {
        let run = state();
        if !run.ready && run.hostile.is_none() && run.in_flight.is_none() {
            return ready_then_receive();
        }
        if let Some(id) = run.in_flight.take() {
            let sent = match check_result(kind, ptr, len, run.layout.user_end) {
                Ok((kind, ptr, len)) => {
                    // SAFETY: check_result found the range inside user memory; the function is
                    // suspended while the kernel sends it.
                    let payload =
                        unsafe { core::slice::from_raw_parts(ptr as *const u8, len as usize) };
                    run.source.send(id, kind, payload)
                }
                Err(message) => run.source.send(id, KIND_ERROR, message.as_bytes()),
            };
            if sent {
                // The device has all of the response: a VMM that resets between
                // invocations does it here, and the guest goes no further.
                if run.plain {
                    control::done();
                } else {
                    hostile_done(run.hostile, true);
                }
            }
        }
        if !run.plain {
            run.before_wait();
        }
        receive_next()
    }

    /// The first `NEXT` (after `init`) without a hostile switch: READY, then the wait for the
    /// first request and its straight way, in a small function of its own. A guest restored
    /// from the snapshot taken at READY resumes here: a few instructions from its request
    /// (kernel code may be emulated one instruction at a time).
    #[inline(never)]
    fn ready_then_receive() -> u64 {
        let run = state();
        run.ready = true;
        run.plain = true;
        run.source.ready();
        receive_next()
    }

    /// Waits for the next request, the straight way if it can ([`Channel::next_request`]),
    /// else the general way; returns its length. Out of line: the registers it needs are
    /// saved only when it runs (a VMM that resets at DONE never runs it after a response).
    #[inline(never)]
    fn receive_next() -> u64 {
        let run = state();
        let request = match &mut run.source {
            Source::Vsock(channel) => channel.next_request(),
            _ => None,
        };
        match request {
            Some((id, len)) => {
                run.in_flight = Some(id);
                len as u64
            }
            None => receive_general(),
        }
    }

    /// Waits for the next request the general way; returns its length.
    #[inline(never)]
    fn receive_general() -> u64 {
        let run = state();
        let (id, len) = run.source.wait(request_buf(&run.layout));
        run.in_flight = Some(id);
        len as u64
    }

    /// The function's request buffer.
    fn request_buf(layout: &Layout) -> &'static mut [u8] {
        // SAFETY: the request buffer is user memory (Layout placed it below user_end); the
        // function is suspended and no other kernel reference points into it.
        unsafe { core::slice::from_raw_parts_mut(layout.request_buf as *mut u8, MAX_PAYLOAD) }
    }

    /// `PANIC(ptr, len)`: answers the request in flight with the message, prints it, and
    /// ends the VM with `abi::exit::FAILURE`.
    pub fn panic(ptr: u64, len: u64) -> ! {
        const MAX_MESSAGE: u64 = 4096;
        let message = syscall::user_bytes(ptr, len.min(MAX_MESSAGE))
            .unwrap_or(b"function panicked (its message lies outside its memory)");
        if let Some(id) = state_checked().and_then(|run| run.in_flight.take()) {
            state().source.send(id, KIND_ERROR, message);
        }
        serial::write(crate::line::LOG_PREFIX.as_bytes());
        serial::write(message);
        serial::write(b"\n");
        exit::exit(abi::exit::FAILURE)
    }

    /// A CPU exception in user mode: answers the request in flight with an error naming it.
    /// The exception handler then writes the fault report and ends the VM.
    pub fn user_fault(report: &FaultReport) {
        let Some(run) = state_checked() else {
            return;
        };
        let Some(id) = run.in_flight.take() else {
            return;
        };
        let mut m = Line::new();
        m.str("function fault: ")
            .str(report.mnemonic())
            .str(" (vector ")
            .dec(report.vector)
            .str(") at rip=")
            .hex(report.rip);
        if report.vector == 14 {
            m.str(" address=").hex(report.cr2);
        }
        m.str(" error=").hex(report.error_code);
        if is_stack_overflow(report.vector, report.cr2, report.rsp) {
            m.str(" (stack overflow: the function's stack is ")
                .dec(abi::user::STACK_SIZE >> 20)
                .str(" MiB)");
        }
        run.source.send(id, KIND_ERROR, m.text().as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use fnode_guest::abi::user::{IMAGE_START, STACK_SIZE};

    use super::*;

    const END: u64 = 64 << 20;

    #[test]
    fn results_are_checked() {
        let ok = u64::from(KIND_RESPONSE);
        assert_eq!(
            check_result(ok, IMAGE_START, 5, END),
            Ok((KIND_RESPONSE, IMAGE_START, 5))
        );
        let err = u64::from(KIND_ERROR);
        assert_eq!(
            check_result(err, IMAGE_START, 0, END),
            Ok((KIND_ERROR, IMAGE_START, 0))
        );
        assert_eq!(check_result(RESULT_NONE, 0, 0, END), Err(NO_RESULT));
        assert_eq!(check_result(7, IMAGE_START, 5, END), Err(BAD_RESULT));
        assert_eq!(
            check_result(ok, 0x1000, 5, END),
            Err(BAD_RESULT),
            "kernel memory"
        );
        assert_eq!(
            check_result(ok, END - 4, 5, END),
            Err(BAD_RESULT),
            "past user memory"
        );
        assert_eq!(
            check_result(ok, IMAGE_START, u64::MAX, END),
            Err(BAD_RESULT)
        );
        let big = MAX_PAYLOAD as u64 + 1;
        assert_eq!(
            check_result(ok, USER_START, big, 1 << 30),
            Err(BAD_RESULT),
            "too long"
        );
    }

    #[test]
    fn small_results_are_checked_as_check_result_does() {
        let ends = [0, 100, USER_START, USER_START + 4, END, u64::MAX];
        let ptrs = [
            0,
            0x1000,
            USER_START - 1,
            USER_START,
            IMAGE_START,
            END - 5,
            END - 4,
            END,
            u64::MAX - 3,
            u64::MAX,
        ];
        let lens = [0, 1, 4, 5, SMALL_RESULT_MAX, SMALL_RESULT_MAX + 1, u64::MAX];
        let kinds = [
            RESULT_NONE,
            1,
            u64::from(KIND_RESPONSE),
            u64::from(KIND_ERROR),
            7,
        ];
        for end in ends {
            for ptr in ptrs {
                for len in lens {
                    for kind in kinds {
                        let small = check_small_result(kind, ptr, len, end);
                        if len <= SMALL_RESULT_MAX {
                            let full = check_result(kind, ptr, len, end).ok();
                            assert_eq!(
                                small, full,
                                "kind {kind} ptr {ptr:#x} len {len} end {end:#x}"
                            );
                        } else {
                            assert_eq!(small, None);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn repeat_counts() {
        assert_eq!(repeat_count(None).unwrap(), 1);
        assert_eq!(repeat_count(Some("1000")).unwrap(), 1000);
        assert!(matches!(
            repeat_count(Some("0")),
            Err(RunError::BadRepeat("0"))
        ));
        assert!(matches!(
            repeat_count(Some("x")),
            Err(RunError::BadRepeat("x"))
        ));
    }

    #[test]
    fn stack_overflows_are_recognised() {
        let top = USER_START + STACK_SIZE;
        assert!(is_stack_overflow(14, USER_START - 8, USER_START + 64));
        assert!(
            !is_stack_overflow(14, USER_START - 8, top - 64),
            "rsp far from the bottom"
        );
        assert!(
            !is_stack_overflow(14, 0x10_0000, USER_START + 64),
            "a wild pointer"
        );
        assert!(!is_stack_overflow(13, USER_START - 8, USER_START + 64));
    }
}
