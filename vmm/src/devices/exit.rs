//! The exit device at `abi::exit::PORT`: a 1-, 2- or 4-byte write ends the VM with that
//! value as its status (QEMU's `isa-debug-exit`, without QEMU's `(status << 1) | 1`).
//!
//! The device only records the request in an [`ExitSignal`]; the vCPU thread that made the
//! write checks the signal after every write exit and stops at once, so the guest runs not
//! one instruction past its exit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use fnode_snapshot::Persist;
use serde::{Deserialize, Serialize};

use super::bus::BusDevice;

/// Set in the signal's word once an exit was requested; the low 32 bits hold the status.
const REQUESTED: u64 = 1 << 32;

/// A VM's exit request, shared by the exit device and the vCPU threads. The first request
/// wins; later writes to the port change nothing.
#[derive(Clone, Debug, Default)]
pub struct ExitSignal(Arc<AtomicU64>);

impl ExitSignal {
    /// A signal with no request.
    pub fn new() -> Self {
        ExitSignal::default()
    }

    /// Records an exit with `status` unless one is already recorded.
    pub fn request(&self, status: u32) {
        let _ = self.0.compare_exchange(
            0,
            REQUESTED | u64::from(status),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The requested status, if the guest asked to exit.
    pub fn requested(&self) -> Option<u32> {
        let word = self.0.load(Ordering::Acquire);
        (word & REQUESTED != 0).then_some(word as u32)
    }
}

/// The device on the exit port.
#[derive(Debug)]
pub struct ExitDevice {
    signal: ExitSignal,
}

impl ExitDevice {
    /// A device that records exits in `signal`.
    pub fn new(signal: ExitSignal) -> Self {
        ExitDevice { signal }
    }
}

/// Decodes a status from a 1-, 2- or 4-byte little-endian port write.
pub fn decode_status(data: &[u8]) -> Option<u32> {
    match *data {
        [a] => Some(u32::from(a)),
        [a, b] => Some(u32::from(u16::from_le_bytes([a, b]))),
        [a, b, c, d] => Some(u32::from_le_bytes([a, b, c, d])),
        _ => None,
    }
}

impl BusDevice for ExitDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The status is written at the port itself; other offsets and sizes are not exits.
        if offset != 0 {
            return;
        }
        if let Some(status) = decode_status(data) {
            self.signal.request(status);
        }
    }
}

/// The exit device as a snapshot keeps it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitState {
    /// The status the guest wrote, if it wrote one (a snapshot is normally taken before).
    pub requested: Option<u32>,
}

impl Persist<'_> for ExitDevice {
    type State = ExitState;
    type ConstructorArgs = ExitSignal;
    type Error = std::convert::Infallible;

    fn save(&self) -> ExitState {
        ExitState {
            requested: self.signal.requested(),
        }
    }

    fn restore(signal: ExitSignal, state: &ExitState) -> Result<Self, Self::Error> {
        if let Some(status) = state.requested {
            signal.request(status);
        }
        Ok(ExitDevice::new(signal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_1_2_and_4_byte_writes() {
        assert_eq!(decode_status(&[0x10]), Some(0x10));
        assert_eq!(decode_status(&[0x34, 0x12]), Some(0x1234));
        assert_eq!(decode_status(&[0x78, 0x56, 0x34, 0x12]), Some(0x1234_5678));
        assert_eq!(decode_status(&[]), None);
        assert_eq!(decode_status(&[1, 2, 3]), None);
        assert_eq!(decode_status(&[0; 8]), None);
    }

    #[test]
    fn first_exit_wins() {
        let signal = ExitSignal::new();
        let mut dev = ExitDevice::new(signal.clone());
        assert_eq!(signal.requested(), None);
        dev.write(1, &[0x10]);
        assert_eq!(signal.requested(), None);
        dev.write(0, &[0x12, 0, 0, 0]);
        dev.write(0, &[0x10]);
        assert_eq!(signal.requested(), Some(0x12));
        let mut b = [0u8; 2];
        dev.read(0, &mut b);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn persist_round_trip() {
        for requested in [None, Some(0x10)] {
            let signal = ExitSignal::new();
            if let Some(s) = requested {
                signal.request(s);
            }
            let state = ExitDevice::new(signal).save();
            assert_eq!(state, ExitState { requested });
            let fresh = ExitSignal::new();
            let restored = match ExitDevice::restore(fresh.clone(), &state) {
                Ok(dev) => dev,
                Err(never) => match never {},
            };
            assert_eq!(restored.save(), state);
            assert_eq!(fresh.requested(), requested);
        }
    }

    #[test]
    fn status_zero_is_an_exit() {
        let signal = ExitSignal::new();
        ExitDevice::new(signal.clone()).write(0, &[0]);
        assert_eq!(signal.requested(), Some(0));
    }
}
