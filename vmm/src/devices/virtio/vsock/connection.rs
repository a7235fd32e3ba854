//! One vsock STREAM connection's protocol state: phase, ports, credit counters and the
//! control packets it owes the guest. Plain data (serde-ready, no fds, no buffers): the device
//! keeps the host socket and the byte buffers next to it.
//!
//! Credit (virtio 1.x, 5.10.6.3): each side advertises `buf_alloc` (its receive buffer) and
//! `fwd_cnt` (bytes it consumed). A sender may have at most `buf_alloc - (tx_cnt - fwd_cnt)`
//! bytes outstanding. The host never sends the guest more than [`ConnectionState::peer_credit`]
//! and refuses a guest that sends more than the host's free buffer ([`BUF_ALLOC`] minus what
//! it holds unforwarded).

use serde::{Deserialize, Serialize};

use fnode_guest::abi;

use super::packet::{PacketHeader, TYPE_STREAM};

/// The host's receive buffer per connection (what it advertises as `buf_alloc`): the most
/// guest bytes it holds for a host client that reads slowly. One whole frame, so a response
/// of the largest size flows without waiting for a credit update; the bytes are only held
/// while the host client has not read them yet.
pub const BUF_ALLOC: u32 = (abi::frame::HEADER_LEN + abi::frame::MAX_PAYLOAD) as u32;

/// A connection's phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// A host client connected; its `CONNECT <port>` line is being read (no ports yet).
    AwaitingConnect,
    /// OP_REQUEST is queued or sent; waiting for the guest's OP_RESPONSE or OP_RST.
    Connecting,
    /// Bytes flow both ways.
    Established,
}

/// Protocol violations on an established connection (the device is then broken).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The guest sent more than the host's free buffer.
    #[error("connection {peer_port}->{local_port}: the guest sent {len} bytes, beyond the {free} bytes of credit the host gave")]
    CreditOverrun {
        /// Guest port.
        peer_port: u32,
        /// Host port.
        local_port: u32,
        /// Payload length.
        len: u32,
        /// Host free buffer.
        free: u32,
    },
    /// The guest's fwd_cnt acknowledges bytes the host never sent.
    #[error("connection {peer_port}->{local_port}: fwd_cnt {fwd_cnt} acknowledges bytes the host never sent (sent {tx_cnt}, acknowledged before {prev})")]
    FwdCntAhead {
        /// Guest port.
        peer_port: u32,
        /// Host port.
        local_port: u32,
        /// The guest's fwd_cnt.
        fwd_cnt: u32,
        /// Bytes the host sent.
        tx_cnt: u32,
        /// The previous fwd_cnt.
        prev: u32,
    },
}

/// A connection's protocol state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionState {
    /// Phase.
    pub phase: Phase,
    /// Host-side port (chosen by the device, reported to the client as `OK <port>`).
    pub local_port: u32,
    /// Guest-side port.
    pub peer_port: u32,
    /// The guest's last `buf_alloc`.
    pub peer_buf_alloc: u32,
    /// The guest's last `fwd_cnt`.
    pub peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    pub tx_cnt: u32,
    /// Payload bytes received from the guest.
    pub rx_cnt: u32,
    /// Payload bytes received from the guest and written to the host client.
    pub fwd_cnt: u32,
    /// The `fwd_cnt` in the last header sent to the guest.
    pub last_fwd_cnt_sent: u32,
    /// SHUTDOWN flags the guest sent.
    pub peer_shutdown: u32,
    /// SHUTDOWN flags still to send to the guest.
    pub shutdown_to_send: u32,
    /// OP_REQUEST was sent.
    pub request_sent: bool,
    /// A CREDIT_UPDATE is owed (the guest asked, or its view of the host's buffer is low).
    pub credit_update_pending: bool,
    /// A CREDIT_REQUEST was sent since the guest's credit last changed.
    pub credit_request_sent: bool,
}

impl ConnectionState {
    /// A host client's connection before its CONNECT line arrived.
    pub fn awaiting_connect() -> Self {
        ConnectionState {
            phase: Phase::AwaitingConnect,
            local_port: 0,
            peer_port: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            peer_shutdown: 0,
            shutdown_to_send: 0,
            request_sent: false,
            credit_update_pending: false,
            credit_request_sent: false,
        }
    }

    /// Bytes the host may still send the guest.
    pub fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }

    /// Takes the guest's `buf_alloc`/`fwd_cnt` from a header, checking `fwd_cnt` only moves
    /// over bytes the host sent.
    pub fn update_peer_credit(&mut self, h: &PacketHeader) -> Result<(), ProtoError> {
        let advance = h.fwd_cnt.wrapping_sub(self.peer_fwd_cnt);
        let outstanding = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        if advance > outstanding {
            return Err(ProtoError::FwdCntAhead {
                peer_port: self.peer_port,
                local_port: self.local_port,
                fwd_cnt: h.fwd_cnt,
                tx_cnt: self.tx_cnt,
                prev: self.peer_fwd_cnt,
            });
        }
        if h.buf_alloc != self.peer_buf_alloc || h.fwd_cnt != self.peer_fwd_cnt {
            self.credit_request_sent = false;
        }
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
        Ok(())
    }

    /// The host's free receive buffer.
    pub fn host_free(&self) -> u32 {
        BUF_ALLOC.saturating_sub(self.rx_cnt.wrapping_sub(self.fwd_cnt))
    }

    /// The guest sent `len` payload bytes.
    pub fn received(&mut self, len: u32) -> Result<(), ProtoError> {
        let free = self.host_free();
        if len > free {
            return Err(ProtoError::CreditOverrun {
                peer_port: self.peer_port,
                local_port: self.local_port,
                len,
                free,
            });
        }
        self.rx_cnt = self.rx_cnt.wrapping_add(len);
        Ok(())
    }

    /// `n` guest bytes reached the host client. Owes the guest a CREDIT_UPDATE when its view
    /// of the host's free buffer fell under half (it may be waiting for credit).
    pub fn forwarded(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
        let guest_view_free =
            BUF_ALLOC.saturating_sub(self.rx_cnt.wrapping_sub(self.last_fwd_cnt_sent));
        if n > 0 && guest_view_free < BUF_ALLOC / 2 {
            self.credit_update_pending = true;
        }
    }

    /// A header from the host to the guest on this connection; stamps the host's credit.
    pub fn header(&mut self, op: u16, len: u32, flags: u32) -> PacketHeader {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.credit_update_pending = false;
        PacketHeader {
            src_cid: abi::vsock::HOST_CID,
            dst_cid: abi::vsock::GUEST_CID,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }
}

/// An RST for a packet that matches no connection (or a connection being dropped).
pub fn rst_reply(local_port: u32, peer_port: u32) -> PacketHeader {
    PacketHeader {
        src_cid: abi::vsock::HOST_CID,
        dst_cid: abi::vsock::GUEST_CID,
        src_port: local_port,
        dst_port: peer_port,
        len: 0,
        type_: TYPE_STREAM,
        op: super::packet::op::RST,
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn established() -> ConnectionState {
        ConnectionState {
            phase: Phase::Established,
            local_port: 1 << 30,
            peer_port: 1024,
            peer_buf_alloc: 1000,
            ..ConnectionState::awaiting_connect()
        }
    }

    fn hdr(buf_alloc: u32, fwd_cnt: u32) -> PacketHeader {
        PacketHeader {
            buf_alloc,
            fwd_cnt,
            ..PacketHeader::default()
        }
    }

    #[test]
    fn peer_credit_follows_the_guests_counters() {
        let mut c = established();
        assert_eq!(c.peer_credit(), 1000);
        c.tx_cnt = 800;
        assert_eq!(c.peer_credit(), 200);
        c.update_peer_credit(&hdr(1000, 500)).unwrap();
        assert_eq!(c.peer_credit(), 700);
        // A guest that shrinks its buffer below what is in flight has no credit, not a wrap.
        c.update_peer_credit(&hdr(100, 500)).unwrap();
        assert_eq!(c.peer_credit(), 0);
        // fwd_cnt beyond what was sent is refused.
        let e = c.update_peer_credit(&hdr(1000, 801)).unwrap_err();
        assert!(matches!(
            e,
            ProtoError::FwdCntAhead {
                fwd_cnt: 801,
                tx_cnt: 800,
                ..
            }
        ));
        // Counters wrap.
        c.tx_cnt = 5;
        c.peer_fwd_cnt = u32::MAX - 4;
        c.update_peer_credit(&hdr(1000, 3)).unwrap();
        assert_eq!(c.peer_credit(), 998);
    }

    #[test]
    fn host_credit_is_enforced_and_refreshed() {
        let mut c = established();
        c.received(BUF_ALLOC - 10).unwrap();
        assert_eq!(c.host_free(), 10);
        assert!(matches!(
            c.received(11),
            Err(ProtoError::CreditOverrun {
                len: 11,
                free: 10,
                ..
            })
        ));
        c.forwarded(BUF_ALLOC / 4);
        // The guest's view (last fwd_cnt sent: 0) is nearly empty: an update is owed.
        assert!(c.credit_update_pending);
        let h = c.header(super::super::packet::op::CREDIT_UPDATE, 0, 0);
        assert_eq!((h.buf_alloc, h.fwd_cnt), (BUF_ALLOC, BUF_ALLOC / 4));
        assert!(!c.credit_update_pending);
        c.received(BUF_ALLOC / 4 + 10).unwrap();
    }

    #[test]
    fn small_exchanges_owe_no_credit_update() {
        let mut c = established();
        c.received(100).unwrap();
        c.forwarded(100);
        assert!(!c.credit_update_pending);
    }
}
