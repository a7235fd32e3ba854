//! The process's pool of vCPU threads: a vCPU runs on a thread taken from the pool, which
//! goes back to the pool when the vCPU's VM lets it go.
//!
//! Starting a thread costs the restore path tens of microseconds (its stack mapped, the
//! `clone`, then on the new thread its allocator arena, its signal stack, its name) before
//! the thread can reach `KVM_RUN`. A parked thread of the pool only has to be woken. Threads
//! are started lazily: the first job of the process starts one itself, and when a job takes
//! the last parked thread a helper thread (`fnode-vcpu-spawner`) starts [`SPARE`] more in the
//! background, so the next VM finds one ready. A thread whose job ended parks again, or ends
//! if [`MAX_PARKED`] threads are parked already.
//!
//! Per-thread state a job leaves behind must not reach the next job: the vCPU thread
//! unpublishes its `kvm_run` from the kick handler when its vCPU goes, and blocks no signal
//! it did not find blocked.

use std::io;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

/// Parked threads kept at most; a thread whose job ends with this many parked ends too.
/// Enough for the VMs a burst of teardowns lets go of: a restore that finds the pool empty
/// has the spawner start a thread while it runs, and on a small host that thread's start
/// competes with the new guest for the CPUs (measured: ~50 us later responses). A parked
/// thread holds only its stack's touched pages.
pub const MAX_PARKED: usize = 64;
/// Parked threads the spawner keeps ready once jobs have started taking them.
pub const SPARE: usize = 1;
/// Name of the pool's threads.
const THREAD_NAME: &str = "fnode-vcpu";

type Job = Box<dyn FnOnce() + Send>;

/// A parked thread, waiting on its own channel.
struct Parked {
    jobs: SyncSender<Job>,
    pthread: libc::pthread_t,
}

struct Pool {
    parked: Mutex<Vec<Parked>>,
    /// Asks the spawner for [`SPARE`] parked threads (started lazily, with its thread).
    spawner: OnceLock<Sender<()>>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        parked: Mutex::new(Vec::new()),
        spawner: OnceLock::new(),
    })
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Parked>> {
        self.parked.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks the spawner to top the parked threads up to [`SPARE`].
    fn want_spares(&'static self) {
        let tx = self.spawner.get_or_init(|| {
            let (tx, rx) = mpsc::channel::<()>();
            // Without a spawner, jobs start their threads themselves: slower, not wrong.
            let _ = std::thread::Builder::new()
                .name("fnode-vcpu-spawner".into())
                .stack_size(64 * 1024)
                .spawn(move || {
                    crate::affinity::stay_off_build_cpu();
                    self.spawn_spares(&rx)
                });
            tx
        });
        let _ = tx.send(());
    }

    fn spawn_spares(&'static self, requests: &Receiver<()>) {
        while requests.recv().is_ok() {
            while self.lock().len() < SPARE {
                if start_thread(None).is_err() {
                    break;
                }
            }
        }
    }
}

/// A job running on a pooled thread: the thread can be signalled while the job runs, and
/// the job's result is waited for with [`join`](Self::join).
#[derive(Debug)]
pub struct PooledThread<T> {
    pthread: libc::pthread_t,
    /// Whether the job still runs; held while the thread is signalled, so the thread
    /// cannot end meanwhile.
    running: Arc<Mutex<bool>>,
    result: Receiver<std::thread::Result<T>>,
}

impl<T> PooledThread<T> {
    /// Sends `signal` to the thread if the job still runs (a job that ended is not
    /// signalled: its thread may be parked, serving another job, or gone).
    pub fn kill(&self, signal: libc::c_int) -> io::Result<()> {
        let running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if !*running {
            return Ok(());
        }
        // SAFETY: the thread is alive: it ends or takes another job only after clearing
        // `running`, which this lock holds off until the call returns.
        let r = unsafe { libc::pthread_kill(self.pthread, signal) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(r))
        }
    }

    /// Waits for the job's result (`Err` with the panic if it panicked).
    pub fn join(self) -> std::thread::Result<T> {
        self.result
            .recv()
            .unwrap_or_else(|_| Err(Box::new("the pooled thread went away")))
    }
}

/// Runs `job` on a thread of the pool (a parked one, or one started for it).
pub fn spawn<T: Send + 'static>(
    job: impl FnOnce() -> T + Send + 'static,
) -> io::Result<PooledThread<T>> {
    let running = Arc::new(Mutex::new(true));
    let (result_tx, result) = mpsc::sync_channel(1);
    let flag = running.clone();
    let job: Job = Box::new(move || {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
        *flag.lock().unwrap_or_else(PoisonError::into_inner) = false;
        let _ = result_tx.send(r);
    });
    let p = pool();
    let taken = p.lock().pop();
    let pthread = match taken {
        Some(parked) => match parked.jobs.send(job) {
            Ok(()) => {
                if p.lock().len() < SPARE {
                    p.want_spares();
                }
                parked.pthread
            }
            // The parked thread is gone (it cannot be: it parks until it gets a job).
            Err(mpsc::SendError(job)) => start_thread(Some(job))?,
        },
        None => {
            let pthread = start_thread(Some(job))?;
            p.want_spares();
            pthread
        }
    };
    Ok(PooledThread {
        pthread,
        running,
        result,
    })
}

/// Starts a pool thread running `first` (then parking), or parking at once; returns its
/// pthread once it is known.
fn start_thread(first: Option<Job>) -> io::Result<libc::pthread_t> {
    let parks_at_once = first.is_none();
    let (started_tx, started) = mpsc::sync_channel::<()>(1);
    let handle = std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || {
            crate::affinity::run_anywhere();
            if parks_at_once {
                // Parked (and so findable) before the spawner looks again.
                serve(None, Some(started_tx));
            } else {
                serve(first, None);
            }
        })?;
    if parks_at_once {
        let _ = started.recv();
    }
    let pthread = std::os::unix::thread::JoinHandleExt::as_pthread_t(&handle);
    // Detached: the pool, not a JoinHandle, decides when the thread ends.
    drop(handle);
    Ok(pthread)
}

/// A pool thread: runs `first`, then parks and runs what it is given until the pool is
/// full when a job ends.
fn serve(first: Option<Job>, parked_signal: Option<SyncSender<()>>) {
    let (jobs_tx, jobs) = mpsc::sync_channel::<Job>(1);
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() };
    let mut next = first;
    let mut signal = parked_signal;
    loop {
        let job = match next.take() {
            Some(job) => job,
            None => {
                {
                    let mut parked = pool().lock();
                    if parked.len() >= MAX_PARKED {
                        return;
                    }
                    parked.push(Parked {
                        jobs: jobs_tx.clone(),
                        pthread: me,
                    });
                }
                if let Some(s) = signal.take() {
                    let _ = s.send(());
                }
                match jobs.recv() {
                    Ok(job) => job,
                    Err(_) => return,
                }
            }
        };
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_and_threads_are_reused() {
        let a = spawn(|| std::thread::current().id()).unwrap();
        let first = a.join().unwrap();
        // The thread parks again; some later job runs on a parked thread.
        let mut reused = false;
        for _ in 0..50 {
            let b = spawn(|| std::thread::current().id()).unwrap();
            let id = b.join().unwrap();
            if id == first || !pool().lock().is_empty() {
                reused = true;
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        assert!(reused);
    }

    #[test]
    fn a_panicking_job_reports_and_its_thread_goes_on() {
        let r = spawn(|| -> u32 { panic!("job panics") }).unwrap().join();
        let panic = r.unwrap_err();
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"job panics"));
        assert_eq!(spawn(|| 7u32).unwrap().join().unwrap(), 7);
    }

    #[test]
    fn an_ended_job_is_not_signalled() {
        let t = spawn(|| 1u8).unwrap();
        // Wait for the job to end.
        for _ in 0..500 {
            if !*t.running.lock().unwrap() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        // Signal 0 only checks: a job that ended is not signalled at all.
        t.kill(0).unwrap();
        assert_eq!(t.join().unwrap(), 1);
    }
}
