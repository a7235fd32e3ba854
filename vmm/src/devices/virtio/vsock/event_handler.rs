//! The vsock device as an `event-manager` subscriber.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{VsockDevice, VsockError, EVQ, RXQ, TXQ};

/// The transport activated the device.
pub const PROCESS_ACTIVATE: u32 = 0;
/// The driver added rx buffers.
pub const PROCESS_RX: u32 = 1;
/// The driver queued tx packets.
pub const PROCESS_TX: u32 = 2;
/// The driver added event buffers.
pub const PROCESS_EVENT: u32 = 3;
/// io_uring completions arrived (host sockets).
pub const PROCESS_HOST_IO: u32 = 4;

impl MutEventSubscriber for VsockDevice {
    fn init(&mut self, ops: &mut EventOps) {
        let fds = [
            (&self.activate_evt, PROCESS_ACTIVATE),
            (&self.queue_evts[RXQ], PROCESS_RX),
            (&self.queue_evts[TXQ], PROCESS_TX),
            (&self.queue_evts[EVQ], PROCESS_EVENT),
            (self.uring.eventfd(), PROCESS_HOST_IO),
        ];
        let mut err = None;
        for (fd, token) in fds {
            if let Err(e) = ops.add(Events::with_data(fd, token, EventSet::IN)) {
                err.get_or_insert(e);
            }
        }
        if let Some(e) = err {
            self.fail(VsockError::EventLoop(e));
        }
        // Start accepting host clients (io_uring requests belong to the thread that
        // submits them, so the first submission happens here, on the event loop thread).
        self.kick();
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            PROCESS_ACTIVATE => self.on_activate(),
            PROCESS_RX => self.on_rxq(),
            PROCESS_TX => self.on_txq(),
            PROCESS_EVENT => self.on_evq(),
            PROCESS_HOST_IO => self.on_uring(),
            _ => {}
        }
    }
}
