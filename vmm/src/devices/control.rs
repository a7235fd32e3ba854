//! The control device at `abi::control::PORT`: the guest tells the VMM where it is in its
//! life: [`abi::control::BOOTED`] when the kernel is up and init starts (the device notes the
//! time), [`abi::control::READY`], written once the guest's init is done, and
//! [`abi::control::DONE`], written once each response is with the device.
//!
//! Like the exit device, the device only records the message in a [`ControlSignal`]; the vCPU
//! thread that made the write checks the signal after every write exit. When the VMM asked
//! for it ([`ControlSignal::arm_ready`], before taking a snapshot), that vCPU pauses right
//! there and reports `VcpuEvent::Ready`; otherwise the guest just goes on. For DONE, the VMM
//! arms an in-place reset (`ControlSignal::arm_reset_at_done`, a VM restored with reset):
//! the vCPU that wrote it runs that reset right there and waits for the next invocation
//! (see [`crate::reset`]); otherwise the guest just goes on.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::reset::ResetJob;

use fnode_guest::abi;
use fnode_snapshot::Persist;
use serde::{Deserialize, Serialize};

use super::bus::BusDevice;
use super::exit::decode_status;

#[derive(Debug, Default)]
struct Inner {
    /// Pause the vCPU that writes READY.
    armed: AtomicBool,
    /// A READY was written while armed and no vCPU has paused for it yet.
    pending: AtomicBool,
    /// READY messages seen.
    ready_count: AtomicU32,
    /// When the guest first wrote BOOTED.
    booted_at: OnceLock<Instant>,
    /// The in-place reset the vCPU that writes DONE runs (set once, for a resettable VM).
    reset_at_done: OnceLock<Arc<ResetJob>>,
    /// `reset_at_done` is about to be set (the vCPUs may run the guest before).
    reset_at_done_expected: AtomicBool,
    /// A DONE was written with a reset armed and no vCPU has taken it yet.
    done_pending: AtomicBool,
    /// DONE messages seen.
    done_count: AtomicU64,
}

/// A VM's control messages, shared by the control device, the vCPU threads and the VMM.
#[derive(Clone, Debug, Default)]
pub struct ControlSignal(Arc<Inner>);

impl ControlSignal {
    /// A signal with nothing armed or pending.
    pub fn new() -> Self {
        ControlSignal::default()
    }

    /// Whether the vCPU that writes READY should pause (to take a snapshot).
    pub fn arm_ready(&self, on: bool) {
        self.0.armed.store(on, Ordering::Release);
    }

    /// Records a READY message.
    fn ready(&self) {
        self.0.ready_count.fetch_add(1, Ordering::AcqRel);
        if self.0.armed.load(Ordering::Acquire) {
            self.0.pending.store(true, Ordering::Release);
        }
    }

    /// When the guest wrote BOOTED (its kernel was up and its init started), if it did.
    pub fn booted_at(&self) -> Option<Instant> {
        self.0.booted_at.get().copied()
    }

    /// Whether a READY the vCPU should pause for arrived; clears it.
    pub fn take_ready(&self) -> bool {
        self.0.pending.swap(false, Ordering::AcqRel)
    }

    /// READY messages the guest wrote (across snapshots: a restored VM goes on counting).
    pub fn ready_count(&self) -> u32 {
        self.0.ready_count.load(Ordering::Acquire)
    }

    /// Has the vCPU that writes DONE run `job` (a VM with one vCPU, restored with reset).
    /// Set once; a second call is ignored.
    pub(crate) fn arm_reset_at_done(&self, job: Arc<ResetJob>) {
        let _ = self.0.reset_at_done.set(job);
    }

    /// The reset armed for DONE, if any.
    pub(crate) fn reset_at_done(&self) -> Option<&Arc<ResetJob>> {
        self.0.reset_at_done.get()
    }

    /// A reset at DONE will be armed as soon as the VM is assembled, which a restore that
    /// runs the guest at once does after the vCPU threads started: a vCPU that takes a DONE
    /// before waits for it ([`ControlSignal::reset_at_done_for_vcpu`]), so that every DONE
    /// of a resettable VM resets it.
    pub(crate) fn expect_reset_at_done(&self) {
        self.0.reset_at_done_expected.store(true, Ordering::Release);
    }

    /// For the vCPU that took a DONE: the reset armed for it, waiting (a bounded spin) for
    /// one expected and not armed yet. `None`: the guest just goes on.
    pub(crate) fn reset_at_done_for_vcpu(&self) -> Option<&Arc<ResetJob>> {
        // Arming follows the threads' start within microseconds; a restore that failed in
        // between never arms, and its vCPU only waits this long before it is stopped.
        const ARMING_WAIT: std::time::Duration = std::time::Duration::from_millis(100);
        if let Some(job) = self.0.reset_at_done.get() {
            return Some(job);
        }
        if !self.0.reset_at_done_expected.load(Ordering::Acquire) {
            return None;
        }
        let deadline = Instant::now() + ARMING_WAIT;
        while Instant::now() < deadline {
            std::thread::yield_now();
            if let Some(job) = self.0.reset_at_done.get() {
                return Some(job);
            }
        }
        None
    }

    /// Records a DONE message.
    fn done(&self) {
        self.0.done_count.fetch_add(1, Ordering::Relaxed);
        if self.0.reset_at_done.get().is_some()
            || self.0.reset_at_done_expected.load(Ordering::Acquire)
        {
            self.0.done_pending.store(true, Ordering::Release);
        }
    }

    /// Whether a DONE the vCPU should reset at arrived; clears it.
    pub fn take_done(&self) -> bool {
        // A load first: the swap's cache-line write only when a DONE is there.
        self.0.done_pending.load(Ordering::Acquire)
            && self.0.done_pending.swap(false, Ordering::AcqRel)
    }

    /// DONE messages the guest wrote since this VM was built or restored.
    pub fn done_count(&self) -> u64 {
        self.0.done_count.load(Ordering::Relaxed)
    }
}

/// The device on the control port.
#[derive(Debug)]
pub struct ControlDevice {
    signal: ControlSignal,
}

impl ControlDevice {
    /// A device that records messages in `signal`.
    pub fn new(signal: ControlSignal) -> Self {
        ControlDevice { signal }
    }
}

impl BusDevice for ControlDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // A message is a 4-byte write at the port; anything else is reserved and ignored.
        if offset != 0 || data.len() != 4 {
            return;
        }
        match decode_status(data) {
            Some(abi::control::READY) => self.signal.ready(),
            Some(abi::control::BOOTED) => {
                let _ = self.signal.0.booted_at.set(Instant::now());
            }
            Some(abi::control::DONE) => self.signal.done(),
            _ => {}
        }
    }
}

/// The control device as a snapshot keeps it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControlState {
    /// READY messages seen.
    pub ready_count: u32,
}

impl Persist<'_> for ControlDevice {
    type State = ControlState;
    type ConstructorArgs = ControlSignal;
    type Error = std::convert::Infallible;

    fn save(&self) -> ControlState {
        ControlState {
            ready_count: self.signal.ready_count(),
        }
    }

    fn restore(signal: ControlSignal, state: &ControlState) -> Result<Self, Self::Error> {
        // Whether READY pauses is the new VM's choice, not the snapshot's.
        signal
            .0
            .ready_count
            .store(state.ready_count, Ordering::Release);
        Ok(ControlDevice::new(signal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READY: [u8; 4] = abi::control::READY.to_le_bytes();

    #[test]
    fn ready_pauses_only_when_armed() {
        let signal = ControlSignal::new();
        let mut dev = ControlDevice::new(signal.clone());
        dev.write(0, &READY);
        assert!(!signal.take_ready());
        assert_eq!(signal.ready_count(), 1);
        signal.arm_ready(true);
        dev.write(0, &READY);
        assert!(signal.take_ready());
        assert!(!signal.take_ready());
        assert_eq!(signal.ready_count(), 2);
    }

    #[test]
    fn booted_notes_the_first_time_and_never_pauses() {
        let signal = ControlSignal::new();
        signal.arm_ready(true);
        let mut dev = ControlDevice::new(signal.clone());
        assert_eq!(signal.booted_at(), None);
        dev.write(0, &abi::control::BOOTED.to_le_bytes());
        let first = signal.booted_at().unwrap();
        dev.write(0, &abi::control::BOOTED.to_le_bytes());
        assert_eq!(signal.booted_at(), Some(first));
        assert!(!signal.take_ready());
        assert_eq!(signal.ready_count(), 0);
    }

    #[test]
    fn done_is_counted_and_pending_only_with_a_reset_armed() {
        let signal = ControlSignal::new();
        signal.arm_ready(true);
        let mut dev = ControlDevice::new(signal.clone());
        let done = abi::control::DONE.to_le_bytes();
        dev.write(0, &done);
        assert!(!signal.take_done(), "no reset armed: the guest goes on");
        assert!(!signal.take_ready());
        assert_eq!(signal.done_count(), 1);
        assert_eq!(signal.ready_count(), 0);
        assert!(signal.reset_at_done().is_none());
        // A short write is no message.
        dev.write(0, &done[..2]);
        dev.write(0, &done);
        assert_eq!(signal.done_count(), 2);
        assert!(!signal.take_done());
    }

    #[test]
    fn other_writes_are_ignored() {
        let signal = ControlSignal::new();
        signal.arm_ready(true);
        let mut dev = ControlDevice::new(signal.clone());
        dev.write(1, &READY);
        dev.write(0, &READY[..2]);
        dev.write(0, &[0, 0, 0, 0]);
        assert!(!signal.take_ready());
        assert_eq!(signal.ready_count(), 0);
        let mut b = [0u8; 4];
        dev.read(0, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn persist_round_trip() {
        let signal = ControlSignal::new();
        let mut dev = ControlDevice::new(signal);
        dev.write(0, &READY);
        let state = dev.save();
        let restored_signal = ControlSignal::new();
        restored_signal.arm_ready(true);
        let restored = ControlDevice::restore(restored_signal.clone(), &state).unwrap();
        assert_eq!(restored.save(), state);
        assert_eq!(restored_signal.ready_count(), 1);
        // Restoring sets no pending READY.
        assert!(!restored_signal.take_ready());
    }
}
