//! `fnode.hostile=<what>` ([`abi::cmdline::HOSTILE_KEY`]): a guest that breaks the contract
//! with its devices on purpose, for the host's isolation tests.
//!
//! `fnode.hostile=vsock` ([`abi::cmdline::HOSTILE_VSOCK`]): instead of serving invocations,
//! the kernel brings the virtio-vsock device up with queues of its own and hands the device
//! a transmit descriptor chain that links back to itself: garbage that a device walking the
//! chain without checks would loop on forever. A correct VMM refuses it, stops this VM with
//! a device fault naming the loop, and keeps serving its other VMs.
//!
//! `fnode.hostile=done` and `fnode.hostile=done-early` ([`abi::cmdline::HOSTILE_DONE`],
//! [`abi::cmdline::HOSTILE_DONE_EARLY`]): the kernel serves its function as usual, but its
//! run loop ([`crate::runloop`]) writes DONE (`abi::control::DONE`) at the wrong times:
//! repeatedly after each response, or in a loop before each request. A correct VMM neither
//! hangs nor skips a reset for it.
//!
//! The switch is the kernel's, not a function's: functions run in user mode and cannot reach
//! the virtqueues (that is the point of running them there).

use fnode_guest::abi::cmdline;

/// What `fnode.hostile=` asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hostile {
    /// Hand the vsock device a looping descriptor chain.
    Vsock,
    /// Serve, writing DONE three times after each response.
    Done,
    /// Serve, writing DONE in a loop before each request.
    DoneEarly,
}

impl Hostile {
    /// Whether the kernel still serves its function (the run loop does the hostile part),
    /// rather than [`run`] doing it instead.
    pub fn serves(self) -> bool {
        matches!(self, Hostile::Done | Hostile::DoneEarly)
    }
}

/// The `fnode.hostile=` switch of `line`: `Ok(None)` if absent, `Err(value)` for an unknown
/// value.
pub fn switch(line: &str) -> Result<Option<Hostile>, &str> {
    match cmdline::get(line, cmdline::HOSTILE_KEY) {
        None => Ok(None),
        Some(cmdline::HOSTILE_VSOCK) => Ok(Some(Hostile::Vsock)),
        Some(cmdline::HOSTILE_DONE) => Ok(Some(Hostile::Done)),
        Some(cmdline::HOSTILE_DONE_EARLY) => Ok(Some(Hostile::DoneEarly)),
        Some(other) => Err(other),
    }
}

#[cfg(target_os = "none")]
pub use imp::run;

#[cfg(target_os = "none")]
mod imp {
    use fnode_guest::abi::{self, virtio::DEVICE_ID_VSOCK};

    use super::Hostile;
    use crate::{
        exit,
        line::Line,
        serial,
        virtio::{
            announced_devices,
            mmio::{self, MmioTransport, F_VERSION_1},
            queue::{Descriptor, DESC_F_NEXT},
            vsock::{QUEUE_EVENT, QUEUE_RX, QUEUE_TX},
        },
    };

    /// Bytes of a vsock packet header (virtio 1.x, 5.10.6): the length of the bogus buffer.
    const PACKET_HEADER_LEN: u32 = 44;

    /// Does what `what` asks; ends only through the host stopping the VM. The switches that
    /// still serve ([`Hostile::serves`]) are the run loop's: not here.
    pub fn run(what: Hostile, cmdline: &str) -> ! {
        match what {
            Hostile::Vsock => vsock(cmdline),
            Hostile::Done | Hostile::DoneEarly => {
                exit::fail(&"this fnode.hostile= switch is acted on by the run loop")
            }
        }
    }

    fn vsock(cmdline: &str) -> ! {
        let mut line = Line::log();
        line.str("hostile: handing the vsock device a looping descriptor chain");
        serial::write_line(&mut line);
        let (devices, n) = announced_devices(cmdline, |_| {});
        if let Err(e) = mmio::map_device_windows() {
            exit::fail(&e);
        }
        let transport = devices[..n]
            .iter()
            .filter_map(|d| MmioTransport::new(d).ok())
            .find(|t| matches!(t.probe(), Ok(DEVICE_ID_VSOCK)));
        let Some(transport) = transport else {
            exit::fail(&"fnode.hostile=vsock needs a virtio-vsock device (fnode-vmm boot --vsock)")
        };
        if transport.negotiate(F_VERSION_1, 0).is_err() {
            exit::fail(&"fnode.hostile=vsock: the device refused VIRTIO_F_VERSION_1");
        }
        let (Ok(_rx), Ok(mut tx), Ok(_event)) = (
            transport.setup_queue(QUEUE_RX, 2, 1),
            transport.setup_queue(QUEUE_TX, 2, 1),
            transport.setup_queue(QUEUE_EVENT, 1, 1),
        ) else {
            exit::fail(&"fnode.hostile=vsock: the device refused a queue")
        };
        transport.driver_ok();
        // Descriptor 0 continues in descriptor 0: a chain without end. Its buffer is the
        // report page, which lies in guest memory, so only the loop is wrong.
        tx.set_desc(
            0,
            Descriptor {
                addr: abi::layout::REPORT_ADDR,
                len: PACKET_HEADER_LEN,
                flags: DESC_F_NEXT,
                next: 0,
            },
        );
        tx.push(0);
        tx.publish();
        transport.notify(QUEUE_TX);
        // The host stops the VM; if it does not, its timeout will.
        exit::halt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switch_values() {
        assert_eq!(switch("console=x"), Ok(None));
        assert_eq!(switch("fnode.hostile=vsock"), Ok(Some(Hostile::Vsock)));
        assert_eq!(switch("a=b fnode.hostile=disk"), Err("disk"));
        assert_eq!(switch("fnode.hostile=done"), Ok(Some(Hostile::Done)));
        assert_eq!(
            switch("fnode.hostile=done-early x"),
            Ok(Some(Hostile::DoneEarly))
        );
        assert!(Hostile::Done.serves() && Hostile::DoneEarly.serves());
        assert!(!Hostile::Vsock.serves());
    }
}
