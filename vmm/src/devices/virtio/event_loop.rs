//! The device event loop: an `event-manager` on its own thread, next to the vCPU threads.
//!
//! [`EventLoop::spawn`] takes the devices' subscribers and runs until [`EventLoop::stop`]
//! signals its stop eventfd (or the handle is dropped).

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
            .spawn(move || run(subscribers, thread_stop))
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
