//! The virtio socket device (virtio 1.x, 5.10; device id 19): fnode's invocation channel.
//!
//! # Guest side
//! Three queues (rx, tx, event), config space `le64 guest_cid` =
//! [`abi::vsock::GUEST_CID`](fnode_guest::abi::vsock::GUEST_CID), STREAM sockets only,
//! features `VIRTIO_F_VERSION_1` and `VIRTIO_RING_F_EVENT_IDX`. Every tx packet's 44-byte
//! header is validated ([`packet`]); connections follow the spec's state machine
//! ([`connection`]) with credit-based flow control both ways: the host never sends more than
//! the guest's `buf_alloc - (tx_cnt - fwd_cnt)`, and a guest that sends more than the host's
//! free buffer breaks the device.
//!
//! # Host side: Firecracker's hybrid vsock
//! A Unix listener per VM at a path. A host client connects and writes `CONNECT <port>\n`;
//! the device sends OP_REQUEST to that guest port; on OP_RESPONSE it writes
//! `OK <hostport>\n` to the client and bytes flow both ways; an RST from the guest (nobody
//! listening, or a reset) closes the client's socket. Guest-initiated connections to the
//! host are refused with RST. A client EOF becomes SHUTDOWN(SEND) to the guest; a guest
//! SHUTDOWN(SEND) half-closes the client's socket once its bytes are written; a guest
//! SHUTDOWN of both directions is answered with RST and closes the client after the last
//! byte.
//!
//! # I/O design
//! Everything runs on the process's shared device loop thread
//! ([`SharedLoop`](crate::devices::virtio::event_loop::SharedLoop), one for every VM of the
//! process); the device is an `event-manager` subscriber ([`event_handler`]) woken by the
//! queue ioeventfds and by its handle on the process's io_uring ([`uring`]), whose
//! completions for this device signal the device's own eventfd. The device has one `accept`
//! on the listener in flight and, per connection, at most one `recv` and one `send`. An op
//! owns its buffer and its fd until its completion is reaped, which is what makes
//! cancellation and teardown sound.
//!
//! Data path, host -> guest: `recv` (io_uring; the kernel copies socket -> a per-connection
//! host buffer, at most min(guest credit, 64 KiB)). A receive of 16 KiB or more marks a bulk
//! transfer: before each delivery the device tops the buffer up with non-blocking `recv`s
//! of whatever the client has already written (up to the guest's credit and one frame,
//! `abi::frame::HEADER_LEN + MAX_PAYLOAD`). The device then copies header + bytes into the
//! guest's rx buffer (one memcpy), one packet as large as the posted buffer, the guest's
//! credit and that frame cap allow (a driver that posts a whole request buffer gets a large
//! request in a few packets, not one per 64 KiB), publishes it in the used ring and signals
//! the irqfd (one `write` to an eventfd, only if the driver wants an interrupt). Guest -> host: the ioeventfd wakes the loop; the device copies each packet's
//! payload from guest memory into the connection's host buffer (one memcpy), returns the
//! descriptor at once, and a `send` (io_uring) hands the buffer to the socket. The host
//! advertises one whole frame as its `buf_alloc`, so a response of the largest size flows
//! without waiting for credit updates. Syscalls
//! per wake-up: one `epoll_wait`, one eventfd `read`, one `io_uring_enter` for all new
//! submissions, one irqfd `write`.
//!
//! # Hostile guests
//! Chains are walked with every step checked ([`crate::devices::virtio::queue`]); headers,
//! lengths (64 KiB payload cap on guest packets; a `len` beyond the chain is an error),
//! credit and counters are validated; rx and tx loops handle at most 256 chains per
//! wake-up; connections are capped at 64.
//! A violation marks the device broken and reports the fault.
//!
//! Host memory per connection: towards the guest, 64 KiB while the client idles (the
//! buffer its `recv` waits on), at most one frame (6 MiB + 24 bytes) during a bulk transfer,
//! and never more than the guest's credit; towards the client, at most the host's
//! `buf_alloc` (one frame) of guest bytes the client has not read yet (credit enforces it;
//! vector growth may reserve up to twice that, of which only written pages are resident).
//! Buffers go back to 64 KiB after each transfer. Worst case per VM (64 connections whose
//! clients stream and never read) is bounded by those numbers; an fnode VM serves one.
//!
//! # Snapshots
//! [`VsockState`] holds the negotiated features, the live queue positions and each
//! ESTABLISHED connection's [`ConnectionState`] (ports, credit counters, shutdown flags):
//! plain data, no fds. A restored device re-binds its listener and *parks* those
//! connections ([`VsockDevice::park_connection`]); the first client that sends
//! `CONNECT <port>` for a parked guest port is attached and answered `OK` at once, so the
//! restored guest serves its next request on the connection it already had.

pub mod connection;
pub mod device;
pub mod event_handler;
pub mod packet;
pub mod uring;

pub use connection::{ConnectionState, Phase};
pub use device::{VsockDevice, VsockError, VsockState};

#[cfg(test)]
mod tests;
