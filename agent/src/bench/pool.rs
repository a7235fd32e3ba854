//! Worker processes of a density run: this binary run as `fnode density-worker`, tied to
//! this process's life, read line by line, and always reaped.
//!
//! A worker gets `PR_SET_PDEATHSIG` = `SIGKILL` between fork and exec, so it dies when the
//! benchmark dies, however that happens (and it exits when its stdin closes). Dropping a
//! [`Pool`] kills and waits for every worker it still has; [`Pool::stop`] is the orderly
//! end (stdin closed, exits awaited). While a [`Pool`] waits for lines, Ctrl-C (`SIGINT`)
//! or `SIGTERM` ends the wait with [`PoolError::Interrupted`], so the caller unwinds and the
//! drop reaps the workers.

use std::{
    ffi::OsString,
    io::{self, BufRead, BufReader, Write},
    os::unix::process::CommandExt,
    path::Path,
    process::{Child, ChildStdin, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        mpsc::{self, Receiver, RecvTimeoutError, Sender},
    },
    time::{Duration, Instant},
};

/// How often a wait looks at the interrupt flag.
const TICK: Duration = Duration::from_millis(50);
/// How long [`Pool::stop`] lets workers exit before killing them.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// Errors running worker processes.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The path of this binary is unknown.
    #[error("cannot find the fnode binary to start workers from")]
    Exe(#[source] io::Error),
    /// A worker could not be started.
    #[error("cannot start worker {worker}")]
    Spawn {
        /// Which.
        worker: usize,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A line could not be written to a worker.
    #[error("cannot write to worker {worker} (did it end? its errors are above)")]
    Write {
        /// Which.
        worker: usize,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No worker wrote a line in time.
    #[error("no word from the workers within {0:?}: pass a larger --timeout-ms")]
    TimedOut(Duration),
    /// Ctrl-C or `SIGTERM`.
    #[error("interrupted by a signal: the workers and their VMs are stopped")]
    Interrupted,
}

/// Set by the signal handler [`Interrupt`] installs.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// While alive, `SIGINT` and `SIGTERM` set a flag (that [`Pool::next`] reads) instead of
/// ending the process; dropped, the handlers before it are back.
struct Interrupt {
    old: Vec<(libc::c_int, libc::sigaction)>,
}

impl Interrupt {
    fn install() -> Self {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let mut old = Vec::new();
        for sig in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: all-zero is a valid sigaction (no flags, empty mask) to fill in.
            let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
            new.sa_sigaction = on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t;
            // SAFETY: as above; sigaction overwrites it.
            let mut prev: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: both structs are valid; the handler only stores to an atomic, which
            // is async-signal-safe.
            if unsafe { libc::sigaction(sig, &new, &mut prev) } == 0 {
                old.push((sig, prev));
            }
        }
        Interrupt { old }
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: `prev` is what sigaction returned for `sig`, so it is valid to put back.
            unsafe { libc::sigaction(*sig, prev, std::ptr::null_mut()) };
        }
    }
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupt").finish_non_exhaustive()
    }
}

/// One worker process.
#[derive(Debug)]
struct Worker {
    child: Child,
    stdin: Option<ChildStdin>,
    reaped: bool,
}

/// Worker processes and the lines they write, each tagged with the worker's index
/// (`None`: its stdout closed).
#[derive(Debug)]
pub struct Pool {
    workers: Vec<Worker>,
    lines: Receiver<(usize, Option<String>)>,
    tx: Sender<(usize, Option<String>)>,
    _interrupt: Interrupt,
}

impl Pool {
    /// An empty pool; Ctrl-C now ends its waits instead of the process.
    pub fn new() -> Self {
        let (tx, lines) = mpsc::channel();
        Pool {
            workers: Vec::new(),
            lines,
            tx,
            _interrupt: Interrupt::install(),
        }
    }

    /// Starts `fnode <args>` (this binary) as the next worker, with `tmp` as its temporary
    /// folder (its VMs' sockets go there) and its stderr on ours. Returns its index.
    pub fn spawn(&mut self, args: &[OsString], tmp: &Path) -> Result<usize, PoolError> {
        let worker = self.workers.len();
        let exe = std::env::current_exe().map_err(PoolError::Exe)?;
        let parent = std::process::id() as libc::pid_t;
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env_remove("XDG_RUNTIME_DIR")
            .env("TMPDIR", tmp)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (prctl, getppid); it allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                // The benchmark died before the line above: nothing would kill this worker.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            })
        };
        let mut child = cmd
            .spawn()
            .map_err(|source| PoolError::Spawn { worker, source })?;
        let stdin = child.stdin.take();
        if let Some(stdout) = child.stdout.take() {
            let tx = self.tx.clone();
            let reader = std::thread::Builder::new()
                .name(format!("fnode-worker-{worker}"))
                .spawn(move || {
                    for line in BufReader::new(stdout).lines() {
                        match line {
                            Ok(l) => {
                                if tx.send((worker, Some(l))).is_err() {
                                    return;
                                }
                            }
                            Err(_) => break,
                        }
                    }
                    let _ = tx.send((worker, None));
                });
            if let Err(source) = reader {
                let _ = child.kill();
                let _ = child.wait();
                return Err(PoolError::Spawn { worker, source });
            }
        }
        self.workers.push(Worker {
            child,
            stdin,
            reaped: false,
        });
        Ok(worker)
    }

    /// The process id of worker `i`.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.workers.get(i).map(|w| w.child.id())
    }

    /// Writes `line` and a newline to worker `i`'s stdin.
    pub fn send(&mut self, i: usize, line: &str) -> Result<(), PoolError> {
        let write = |w: &mut Worker| -> io::Result<()> {
            let stdin = w
                .stdin
                .as_mut()
                .ok_or_else(|| io::Error::from(io::ErrorKind::BrokenPipe))?;
            stdin.write_all(line.as_bytes())?;
            stdin.write_all(b"\n")?;
            stdin.flush()
        };
        match self.workers.get_mut(i) {
            Some(w) => write(w).map_err(|source| PoolError::Write { worker: i, source }),
            None => Err(PoolError::Write {
                worker: i,
                source: io::Error::from(io::ErrorKind::NotFound),
            }),
        }
    }

    /// The next line from any worker, waiting until `deadline`.
    pub fn next(&self, deadline: Instant) -> Result<(usize, Option<String>), PoolError> {
        let start = Instant::now();
        loop {
            if INTERRUPTED.load(Ordering::SeqCst) {
                return Err(PoolError::Interrupted);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(PoolError::TimedOut(start.elapsed()));
            }
            match self.lines.recv_timeout(left.min(TICK)) {
                Ok(l) => return Ok(l),
                Err(RecvTimeoutError::Timeout) => {}
                // `self.tx` keeps the channel open.
                Err(RecvTimeoutError::Disconnected) => return Err(PoolError::TimedOut(left)),
            }
        }
    }

    /// Kills worker `i` and waits for it (it did not keep to the protocol).
    pub fn kill(&mut self, i: usize) {
        if let Some(w) = self.workers.get_mut(i).filter(|w| !w.reaped) {
            let _ = w.child.kill();
            let _ = w.child.wait();
            w.reaped = true;
        }
    }

    /// Ends every worker in order: closes their stdin and waits for them to exit (killing
    /// any still there after a grace period). Returns how long that took.
    pub fn stop(mut self) -> Duration {
        let start = Instant::now();
        for w in &mut self.workers {
            w.stdin = None;
        }
        let deadline = start + EXIT_GRACE;
        for w in &mut self.workers {
            while Instant::now() < deadline {
                match w.child.try_wait() {
                    Ok(Some(_)) | Err(_) => {
                        w.reaped = true;
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        }
        let took = start.elapsed();
        drop(self);
        took
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        for i in 0..self.workers.len() {
            self.kill(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pool_is_empty_and_times_out_without_workers() {
        let pool = Pool::new();
        assert_eq!(pool.pid(0), None);
        let err = pool
            .next(Instant::now() + Duration::from_millis(10))
            .unwrap_err();
        assert!(matches!(err, PoolError::TimedOut(_)), "{err}");
    }
}
