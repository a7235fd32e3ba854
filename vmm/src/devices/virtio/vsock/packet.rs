//! The virtio-vsock packet header (virtio 1.x, 5.10.6; its layout and values are in
//! `abi::vsock::packet`, shared with the guest driver). Headers the guest sends are untrusted: [`PacketHeader::check_from_guest`] validates every
//! field that has a fixed meaning before the device acts on it.

use fnode_guest::abi;
pub use fnode_guest::abi::vsock::packet::{op, HDR_LEN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// Largest payload fnode accepts in one packet from the guest (Linux's default rx buffer is
/// 4 KiB, its largest 64 KiB; fnode's guest driver sends at most 64 KiB too).
pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
/// Largest payload fnode sends in one packet to the guest: one whole frame, so a driver that
/// posts a frame-sized buffer gets a large request in as few packets as the host socket
/// allows. Each packet is further bounded by the buffer the driver posted and its credit.
pub const MAX_RX_PAYLOAD: u32 = (abi::frame::HEADER_LEN + abi::frame::MAX_PAYLOAD) as u32;

/// Both shutdown flags.
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// What is wrong with a header the guest sent.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// The chain holds fewer bytes than a header.
    #[error("packet of {0} bytes is shorter than the 44-byte header")]
    Short(u32),
    /// `src_cid` is not the guest's.
    #[error("src_cid {0} is not the guest's cid {guest}", guest = abi::vsock::GUEST_CID)]
    SrcCid(u64),
    /// `dst_cid` is not the host's.
    #[error("dst_cid {0} is not the host's cid {host}", host = abi::vsock::HOST_CID)]
    DstCid(u64),
    /// `type` is not STREAM (SEQPACKET was not negotiated).
    #[error("socket type {0} is not STREAM (1)")]
    Type(u16),
    /// Unknown `op`.
    #[error("unknown op {0}")]
    Op(u16),
    /// `len` above the cap.
    #[error("payload length {0} exceeds the {MAX_PKT_PAYLOAD}-byte limit")]
    TooLong(u32),
    /// `len` beyond what the chain holds.
    #[error("payload length {len} exceeds the {avail} bytes the descriptor chain holds after the header")]
    BeyondChain {
        /// `len`.
        len: u32,
        /// Bytes after the header.
        avail: u32,
    },
    /// A non-RW packet with a payload.
    #[error("op {op} carries a {len}-byte payload; only RW does")]
    PayloadOnControl {
        /// `op`.
        op: u16,
        /// `len`.
        len: u32,
    },
    /// Flags that the op does not define.
    #[error("op {op} carries flags {flags:#x}")]
    Flags {
        /// `op`.
        op: u16,
        /// `flags`.
        flags: u32,
    },
}

/// A decoded header.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Op-specific flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl PacketHeader {
    /// Decodes the raw fields (no validation).
    pub fn decode(b: &[u8; HDR_LEN]) -> Self {
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_le_bytes(w)
        };
        let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        PacketHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Validates a header the guest sent in a chain with `chain_len` readable bytes. Port
    /// numbers, `buf_alloc` and `fwd_cnt` are checked against the connection by the device.
    pub fn check_from_guest(&self, chain_len: u32) -> Result<(), PacketError> {
        if self.src_cid != abi::vsock::GUEST_CID {
            return Err(PacketError::SrcCid(self.src_cid));
        }
        if self.dst_cid != abi::vsock::HOST_CID {
            return Err(PacketError::DstCid(self.dst_cid));
        }
        if self.type_ != TYPE_STREAM {
            return Err(PacketError::Type(self.type_));
        }
        if !(op::REQUEST..=op::CREDIT_REQUEST).contains(&self.op) {
            return Err(PacketError::Op(self.op));
        }
        if self.len > MAX_PKT_PAYLOAD {
            return Err(PacketError::TooLong(self.len));
        }
        let avail = chain_len.saturating_sub(HDR_LEN as u32);
        if self.len > avail {
            return Err(PacketError::BeyondChain {
                len: self.len,
                avail,
            });
        }
        if self.op != op::RW && self.len != 0 {
            return Err(PacketError::PayloadOnControl {
                op: self.op,
                len: self.len,
            });
        }
        let allowed = if self.op == op::SHUTDOWN {
            SHUTDOWN_BOTH
        } else {
            0
        };
        if self.flags & !allowed != 0 {
            return Err(PacketError::Flags {
                op: self.op,
                flags: self.flags,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> PacketHeader {
        PacketHeader {
            src_cid: abi::vsock::GUEST_CID,
            dst_cid: abi::vsock::HOST_CID,
            src_port: abi::vsock::INVOKE_PORT,
            dst_port: 1 << 30,
            len: 10,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn encode_decode_round_trip() {
        let h = good();
        let b = h.encode();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &5u16.to_le_bytes());
        assert_eq!(PacketHeader::decode(&b), h);
    }

    #[test]
    fn every_field_is_checked() {
        let chain = HDR_LEN as u32 + 10;
        good().check_from_guest(chain).unwrap();
        let bad = |h: PacketHeader| h.check_from_guest(chain).unwrap_err();
        assert_eq!(
            bad(PacketHeader {
                src_cid: 2,
                ..good()
            }),
            PacketError::SrcCid(2)
        );
        assert_eq!(
            bad(PacketHeader {
                dst_cid: 3,
                ..good()
            }),
            PacketError::DstCid(3)
        );
        assert_eq!(
            bad(PacketHeader { type_: 2, ..good() }),
            PacketError::Type(2)
        );
        assert_eq!(bad(PacketHeader { op: 0, ..good() }), PacketError::Op(0));
        assert_eq!(bad(PacketHeader { op: 8, ..good() }), PacketError::Op(8));
        assert_eq!(
            bad(PacketHeader {
                len: u32::MAX,
                ..good()
            }),
            PacketError::TooLong(u32::MAX)
        );
        assert_eq!(
            bad(PacketHeader { len: 11, ..good() }),
            PacketError::BeyondChain { len: 11, avail: 10 }
        );
        assert_eq!(
            bad(PacketHeader {
                op: op::CREDIT_UPDATE,
                ..good()
            }),
            PacketError::PayloadOnControl { op: 6, len: 10 }
        );
        assert_eq!(
            bad(PacketHeader { flags: 1, ..good() }),
            PacketError::Flags { op: 5, flags: 1 }
        );
        let shut = PacketHeader {
            op: op::SHUTDOWN,
            len: 0,
            flags: SHUTDOWN_BOTH,
            ..good()
        };
        shut.check_from_guest(chain).unwrap();
        assert!(matches!(
            bad(PacketHeader { flags: 4, ..shut }),
            PacketError::Flags { .. }
        ));
        assert_eq!(
            PacketError::BeyondChain { len: 11, avail: 10 }.to_string(),
            "payload length 11 exceeds the 10 bytes the descriptor chain holds after the header"
        );
    }
}
