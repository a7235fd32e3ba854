//! Tearing VMs down off the measured path.
//!
//! Dropping a VM costs milliseconds (its threads end, KVM frees the VM, the kernel unmaps
//! its memory), and some of that work the kernel finishes later, after the drop returned.
//! [`Teardown`] decides where that happens, so it can be chosen and compared:
//! right after each operation (`inline`), in batches between iterations (`batch`), or on a
//! thread of its own while the next operations run (`background`).

use std::{
    sync::mpsc::{self, Sender},
    thread::{self, JoinHandle},
};

/// Where VMs are torn down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TeardownMode {
    /// Right after the operation's timer stopped.
    Inline,
    /// Kept until [`BATCH`] have gathered, then all dropped between two iterations.
    #[default]
    Batch,
    /// Handed to a thread that drops them while the benchmark goes on.
    Background,
}

/// VMs gathered before a batch teardown.
pub const BATCH: usize = 32;

/// Something to tear down.
pub type Corpse = Box<dyn Send>;

/// Tears VMs down per its [`TeardownMode`].
pub struct Teardown {
    mode: TeardownMode,
    held: Vec<Corpse>,
    reaper: Option<(Sender<Corpse>, JoinHandle<()>)>,
}

impl std::fmt::Debug for Teardown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Teardown")
            .field("mode", &self.mode)
            .field("held", &self.held.len())
            .finish()
    }
}

impl Teardown {
    /// A teardown of `mode`; `background` starts its thread (falling back to `batch` if
    /// the thread cannot start).
    pub fn new(mode: TeardownMode) -> Self {
        let mut t = Teardown {
            mode,
            held: Vec::new(),
            reaper: None,
        };
        if mode == TeardownMode::Background {
            let (tx, rx) = mpsc::channel::<Corpse>();
            match thread::Builder::new()
                .name("fnode-bench-reaper".into())
                .spawn(move || rx.into_iter().for_each(drop))
            {
                Ok(handle) => t.reaper = Some((tx, handle)),
                Err(_) => t.mode = TeardownMode::Batch,
            }
        }
        t
    }

    /// Takes a VM to tear down (an operation's timer has stopped).
    pub fn bury(&mut self, corpse: Corpse) {
        match (&self.mode, &self.reaper) {
            (TeardownMode::Inline, _) => drop(corpse),
            (TeardownMode::Background, Some((tx, _))) => {
                if let Err(back) = tx.send(corpse) {
                    drop(back.0);
                }
            }
            _ => self.held.push(corpse),
        }
    }

    /// Between iterations: drops a full batch.
    pub fn between_iterations(&mut self) {
        if self.held.len() >= BATCH {
            self.held.clear();
        }
    }

    /// Drops everything held and waits for the background thread.
    pub fn finish(&mut self) {
        self.held.clear();
        if let Some((tx, handle)) = self.reaper.take() {
            drop(tx);
            let _ = handle.join();
        }
    }
}

impl Drop for Teardown {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    };

    use super::*;

    struct Counted(Arc<AtomicUsize>);

    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn every_mode_drops_everything_by_the_end() {
        for mode in [
            TeardownMode::Inline,
            TeardownMode::Batch,
            TeardownMode::Background,
        ] {
            let dropped = Arc::new(AtomicUsize::new(0));
            let mut t = Teardown::new(mode);
            for _ in 0..BATCH + 3 {
                t.bury(Box::new(Counted(dropped.clone())));
                t.between_iterations();
            }
            if mode == TeardownMode::Batch {
                assert_eq!(dropped.load(Ordering::SeqCst), BATCH);
            }
            t.finish();
            assert_eq!(dropped.load(Ordering::SeqCst), BATCH + 3, "{mode:?}");
        }
    }
}
