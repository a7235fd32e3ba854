//! The vsock device end to end, without KVM: a small in-test guest driver programs the MMIO
//! transport and split queues in a real `GuestMemoryMmap`, the device runs on the real
//! event loop thread with its io_uring, and host clients are real Unix sockets.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fnode_guest::abi;
use virtio_bindings::bindings::virtio_mmio as reg;
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::connection::{ConnectionState, Phase, BUF_ALLOC};
use super::device::{VsockDevice, VsockError, VsockState};
use super::packet::{
    op, PacketHeader, HDR_LEN, MAX_PKT_PAYLOAD, MAX_RX_PAYLOAD, SHUTDOWN_BOTH, SHUTDOWN_SEND,
    TYPE_STREAM,
};
use crate::devices::bus::BusDevice;
use crate::devices::virtio::event_loop::{EventLoop, Subscriber};
use crate::devices::virtio::mmio::tests::{negotiate, r, setup_queue, w};
use crate::devices::virtio::mmio::{MmioSlot, MmioTransport};
use crate::devices::virtio::queue::tests::TestQueue;
use crate::devices::virtio::{
    fault_channel, features, status, DeviceFault, FaultReceiver, VirtioDevice,
};

const TIMEOUT: Duration = Duration::from_secs(10);
const RXQ: u32 = 0;
const TXQ: u32 = 1;
const RX_BUF_BASE: u64 = 0x10_0000;
const TX_BUF_BASE: u64 = 0x20_0000;
const TX_SLOT: u64 = 0x1_1000;
const TX_SLOTS: u16 = 16;
const LOCAL_PORT: u32 = 1 << 30;

fn sock_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("fnode-vsock-{}-{name}.sock", std::process::id()))
}

/// The guest: memory, the transport (as the vCPU sees it) and the three queues.
struct Guest {
    mem: GuestMemoryMmap,
    t: MmioTransport,
    rx: TestQueue,
    tx: TestQueue,
    ev: TestQueue,
    rx_buf: u32,
    tx_sent: u16,
    faults: FaultReceiver,
    el: Option<EventLoop>,
    path: PathBuf,
    dev: Arc<Mutex<VsockDevice>>,
    /// Guest-side credit bookkeeping of the connection under test.
    rx_total: u32,
    fwd_cnt: u32,
    buf_alloc: u32,
}

impl Guest {
    /// A running device with `rx_count` rx buffers of `rx_buf` bytes.
    fn new(name: &str, rx_buf: u32, rx_count: u16) -> Guest {
        Self::with(name, rx_buf, rx_count, |_| {})
    }

    fn with(
        name: &str,
        rx_buf: u32,
        rx_count: u16,
        before_start: impl FnOnce(&mut VsockDevice),
    ) -> Guest {
        Self::with_features(
            name,
            rx_buf,
            rx_count,
            features::VERSION_1 | features::RING_EVENT_IDX,
            before_start,
        )
    }

    fn with_features(
        name: &str,
        rx_buf: u32,
        rx_count: u16,
        driver_features: u64,
        before_start: impl FnOnce(&mut VsockDevice),
    ) -> Guest {
        let mut g = Self::build(name, rx_buf, before_start);
        g.start(rx_count, driver_features);
        g
    }

    /// A device on a running event loop whose driver has not started yet.
    fn unstarted(name: &str, rx_buf: u32) -> Guest {
        Self::build(name, rx_buf, |_| {})
    }

    fn build(name: &str, rx_buf: u32, before_start: impl FnOnce(&mut VsockDevice)) -> Guest {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let path = sock_path(name);
        let (sink, faults) = fault_channel().unwrap();
        let mut device = VsockDevice::new(&path, sink.clone()).unwrap();
        before_start(&mut device);
        let dev = Arc::new(Mutex::new(device));
        let slot = MmioSlot::nth(0).unwrap();
        let t = MmioTransport::new(mem.clone(), dev.clone(), slot, sink).unwrap();
        let el = EventLoop::spawn(vec![dev.clone() as Subscriber]).unwrap();
        Guest {
            mem,
            t,
            rx: TestQueue::new(0x1000, 64),
            tx: TestQueue::new(0x3000, 64),
            ev: TestQueue::new(0x5000, 8),
            rx_buf,
            tx_sent: 0,
            faults,
            el: Some(el),
            path,
            dev,
            rx_total: 0,
            fwd_cnt: 0,
            buf_alloc: 1 << 20,
        }
    }

    /// The driver starts: features, queues, DRIVER_OK, then `rx_count` rx buffers of
    /// `rx_buf` bytes.
    fn start(&mut self, rx_count: u16, driver_features: u64) {
        let g = self;
        assert_eq!(
            r(&mut g.t, reg::VIRTIO_MMIO_DEVICE_ID),
            abi::virtio::DEVICE_ID_VSOCK
        );
        let mut cid = [0u8; 8];
        g.t.read(0x100, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), abi::vsock::GUEST_CID);
        assert!(negotiate(&mut g.t, driver_features));
        setup_queue(&mut g.t, 0, &g.rx);
        setup_queue(&mut g.t, 1, &g.tx);
        setup_queue(&mut g.t, 2, &g.ev);
        let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK;
        w(&mut g.t, reg::VIRTIO_MMIO_STATUS, s);
        assert_eq!(r(&mut g.t, reg::VIRTIO_MMIO_STATUS), s);
        // With EVENT_IDX the device reads `used_event` (after the avail ring): keep asking for
        // every interrupt.
        let rx_buf = g.rx_buf;
        for i in 0..rx_count {
            g.rx.set_desc(
                &g.mem,
                i,
                RX_BUF_BASE + u64::from(i) * u64::from(rx_buf),
                rx_buf,
                2,
                0,
            );
            g.rx.publish(&g.mem, i);
        }
        g.notify(RXQ);
    }

    /// The driver resets the device and starts again on fresh rings.
    fn restart(&mut self, rx_count: u16) {
        w(&mut self.t, reg::VIRTIO_MMIO_STATUS, 0);
        self.rx = TestQueue::new(0x7000, 64);
        self.tx = TestQueue::new(0x9000, 64);
        self.ev = TestQueue::new(0xb000, 8);
        self.tx_sent = 0;
        self.rx_total = 0;
        self.fwd_cnt = 0;
        self.start(rx_count, features::VERSION_1 | features::RING_EVENT_IDX);
    }

    fn notify(&mut self, q: u32) {
        w(&mut self.t, reg::VIRTIO_MMIO_QUEUE_NOTIFY, q);
    }

    fn hdr(&self, op: u16, local_port: u32, len: u32, flags: u32) -> PacketHeader {
        PacketHeader {
            src_cid: abi::vsock::GUEST_CID,
            dst_cid: abi::vsock::HOST_CID,
            src_port: abi::vsock::INVOKE_PORT,
            dst_port: local_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: self.buf_alloc,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Writes a packet (header and payload in two descriptors) into a tx slot and publishes
    /// it, without notifying.
    fn queue_tx(&mut self, h: &PacketHeader, payload: &[u8]) {
        let slot = self.tx_sent % TX_SLOTS;
        self.tx_sent = self.tx_sent.wrapping_add(1);
        let base = TX_BUF_BASE + u64::from(slot) * TX_SLOT;
        self.mem
            .write_slice(&h.encode(), GuestAddress(base))
            .unwrap();
        let (d0, d1) = (slot * 2, slot * 2 + 1);
        if payload.is_empty() {
            self.tx.set_desc(&self.mem, d0, base, HDR_LEN as u32, 0, 0);
        } else {
            self.mem
                .write_slice(payload, GuestAddress(base + 0x100))
                .unwrap();
            self.tx.set_desc(
                &self.mem,
                d0,
                base,
                HDR_LEN as u32,
                VRING_DESC_F_NEXT as u16,
                d1,
            );
            self.tx
                .set_desc(&self.mem, d1, base + 0x100, payload.len() as u32, 0, 0);
        }
        self.tx.publish(&self.mem, d0);
    }

    /// Sends one packet and waits until the device consumed it.
    fn send(&mut self, h: PacketHeader, payload: &[u8]) {
        self.queue_tx(&h, payload);
        self.notify(TXQ);
        self.wait_tx_used();
    }

    fn wait_tx_used(&mut self) {
        let deadline = Instant::now() + TIMEOUT;
        while self.tx.used_seen != self.tx.avail_idx {
            if self.tx.take_used(&self.mem).is_none() {
                assert!(
                    Instant::now() < deadline,
                    "device did not consume tx packets"
                );
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// The next packet the device put in the rx queue (the buffer goes back to the device).
    fn recv(&mut self) -> Option<(PacketHeader, Vec<u8>)> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some((id, len)) = self.rx.take_used(&self.mem) {
                let addr = RX_BUF_BASE + u64::from(id) * u64::from(self.rx_buf);
                let mut b = vec![0u8; len as usize];
                self.mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                let hb: [u8; HDR_LEN] = b[..HDR_LEN].try_into().unwrap();
                let h = PacketHeader::decode(&hb);
                assert_eq!(
                    h.len as usize,
                    b.len() - HDR_LEN,
                    "used length matches the header"
                );
                self.rx.publish(&self.mem, id as u16);
                // used_event (after the avail ring): interrupt me for the next buffer too.
                let used_event = self.rx.avail + 4 + 2 * u64::from(self.rx.size);
                self.mem
                    .write_obj(self.rx.used_seen, GuestAddress(used_event))
                    .unwrap();
                self.notify(RXQ);
                return Some((h, b.split_off(HDR_LEN)));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn expect(&mut self, op: u16) -> (PacketHeader, Vec<u8>) {
        let (h, d) = self
            .recv()
            .unwrap_or_else(|| panic!("no packet (expected op {op})"));
        assert_eq!(h.op, op, "unexpected packet {h:?}");
        assert_eq!(
            (h.src_cid, h.dst_cid, h.type_),
            (abi::vsock::HOST_CID, abi::vsock::GUEST_CID, TYPE_STREAM)
        );
        (h, d)
    }

    /// Receives RW packets until `n` bytes arrived, checking the device never exceeds the
    /// credit this guest advertised.
    fn read_bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < n {
            let (h, d) = self.expect(op::RW);
            self.rx_total = self.rx_total.wrapping_add(h.len);
            let outstanding = self.rx_total.wrapping_sub(self.fwd_cnt);
            assert!(
                outstanding <= self.buf_alloc,
                "device sent {outstanding} > buf_alloc {}",
                self.buf_alloc
            );
            out.extend_from_slice(&d);
        }
        out
    }

    /// A client that connected and got `OK`, with the guest side established.
    fn connect(&mut self, port: u32) -> UnixStream {
        self.connect_as(port, LOCAL_PORT)
    }

    /// Like [`connect`](Self::connect), expecting host port `local`.
    fn connect_as(&mut self, port: u32, local: u32) -> UnixStream {
        let mut c = UnixStream::connect(&self.path).unwrap();
        c.set_read_timeout(Some(TIMEOUT)).unwrap();
        c.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
        let (req, _) = self.expect(op::REQUEST);
        assert_eq!((req.dst_port, req.src_port), (port, local));
        assert_eq!(req.buf_alloc, BUF_ALLOC);
        let mut resp = self.hdr(op::RESPONSE, req.src_port, 0, 0);
        resp.src_port = port;
        self.send(resp, &[]);
        let line = read_line(&mut c);
        assert_eq!(line, format!("OK {local}\n"));
        c
    }

    fn fault(&self) -> DeviceFault {
        self.faults
            .recv_timeout(TIMEOUT)
            .expect("the device reported no fault")
    }

    fn quiet(&mut self) {
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            self.rx.take_used(&self.mem),
            None,
            "the device sent a packet it should not have"
        );
    }

    /// Stops the event loop: it must end cleanly (no panic, no epoll error).
    fn finish(mut self) {
        self.el.take().unwrap().stop().unwrap();
    }
}

fn read_line(c: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        c.read_exact(&mut b).unwrap();
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn hybrid_exchange_with_credit_both_ways() {
    let mut g = Guest::new("exchange", 4096, 32);
    g.buf_alloc = 8192;
    let mut c = g.connect(abi::vsock::INVOKE_PORT);

    // Host -> guest: 20000 bytes through 4 KiB buffers and an 8 KiB guest window.
    let a = pattern(20000, 1);
    c.write_all(&a).unwrap();
    let mut got = g.read_bytes(8192);
    assert_eq!(got.len(), 8192, "exactly the credit, no more");
    g.quiet();
    while got.len() < a.len() {
        // The guest consumed what it has: a credit update reopens the window.
        g.fwd_cnt = g.rx_total;
        g.send(g.hdr(op::CREDIT_UPDATE, LOCAL_PORT, 0, 0), &[]);
        let want = (a.len() - got.len()).min(8192);
        got.extend(g.read_bytes(want));
    }
    assert_eq!(got, a);
    g.fwd_cnt = g.rx_total;

    // Guest -> host: 150000 bytes in packets of up to 64 KiB, within the host's credit.
    let b = pattern(150_000, 7);
    let reader = {
        let mut c2 = c.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 150_000];
            c2.read_exact(&mut buf).unwrap();
            buf
        })
    };
    for chunk in b.chunks(65536) {
        g.send(g.hdr(op::RW, LOCAL_PORT, chunk.len() as u32, 0), chunk);
    }
    assert_eq!(reader.join().unwrap(), b);

    // More than the host's window in total: the guest waits for the host's credit updates,
    // as a driver must.
    let big = pattern(BUF_ALLOC as usize + 100_000, 3);
    let reader = {
        let mut c2 = c.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; BUF_ALLOC as usize + 100_000];
            c2.read_exact(&mut buf).unwrap();
            buf
        })
    };
    let (mut host_buf_alloc, mut host_fwd) = (BUF_ALLOC, 150_000u32);
    let mut sent = 150_000u32;
    let mut off = 0;
    while off < big.len() {
        let credit = host_buf_alloc.saturating_sub(sent - host_fwd);
        if credit == 0 {
            let (h, _) = g.recv().expect("no credit update from the host");
            assert_eq!(h.op, op::CREDIT_UPDATE);
            host_buf_alloc = h.buf_alloc;
            host_fwd = host_fwd.max(h.fwd_cnt);
            continue;
        }
        let n = (credit as usize).min(65536).min(big.len() - off);
        g.send(g.hdr(op::RW, LOCAL_PORT, n as u32, 0), &big[off..off + n]);
        sent += n as u32;
        off += n;
    }
    assert_eq!(reader.join().unwrap(), big);

    // The guest closes: the host answers RST after the last byte and the client sees EOF.
    g.send(g.hdr(op::SHUTDOWN, LOCAL_PORT, 0, SHUTDOWN_BOTH), &[]);
    loop {
        let (h, _) = g.recv().expect("no RST after SHUTDOWN");
        if h.op == op::RST {
            break;
        }
        assert_eq!(h.op, op::CREDIT_UPDATE);
    }
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert!(g.faults.try_recv().is_none());
    g.finish();
}

#[test]
fn client_eof_is_shutdown_send_and_guest_can_still_answer() {
    let mut g = Guest::new("halfclose", 4096, 8);
    let mut c = g.connect(abi::vsock::INVOKE_PORT);
    c.write_all(b"request").unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(g.read_bytes(7), b"request");
    let (h, _) = g.expect(op::SHUTDOWN);
    assert_eq!(h.flags, SHUTDOWN_SEND);
    g.send(g.hdr(op::RW, LOCAL_PORT, 8, 0), b"response");
    let mut buf = [0u8; 8];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"response");
    g.finish();
}

#[test]
fn two_connections_without_event_idx_and_interrupts() {
    let mut g = Guest::with_features("two", 4096, 16, features::VERSION_1, |_| {});
    let mut a = g.connect_as(1024, LOCAL_PORT);
    let mut b = g.connect_as(1025, LOCAL_PORT + 1);
    assert_ne!(
        g.t.irqfd().read().unwrap(),
        0,
        "packets to the guest raise the irqfd"
    );
    assert_eq!(r(&mut g.t, reg::VIRTIO_MMIO_INTERRUPT_STATUS) & 1, 1);
    w(&mut g.t, reg::VIRTIO_MMIO_INTERRUPT_ACK, 1);
    a.write_all(b"to-a").unwrap();
    b.write_all(b"to-b").unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        let (h, d) = g.expect(op::RW);
        seen.push((h.src_port, h.dst_port, d));
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            (LOCAL_PORT, 1024, b"to-a".to_vec()),
            (LOCAL_PORT + 1, 1025, b"to-b".to_vec())
        ]
    );
    let mut h = g.hdr(op::RW, LOCAL_PORT + 1, 4, 0);
    h.src_port = 1025;
    g.send(h, b"from");
    let mut buf = [0u8; 4];
    b.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from");
    // The same guest port on the other connection reaches the other client.
    let mut h = g.hdr(op::RW, LOCAL_PORT, 2, 0);
    h.src_port = 1024;
    g.send(h, b"ok");
    let mut buf = [0u8; 2];
    a.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ok");
    assert_eq!(g.dev.lock().unwrap().connection_count(), 2);
    g.finish();
}

#[test]
fn bytes_sent_with_connect_are_delivered_after_the_handshake() {
    let mut g = Guest::new("pipelined", 4096, 8);
    let mut c = UnixStream::connect(&g.path).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    c.write_all(b"CONNECT 1024\nhello").unwrap();
    let (req, _) = g.expect(op::REQUEST);
    g.send(g.hdr(op::RESPONSE, req.src_port, 0, 0), &[]);
    assert_eq!(read_line(&mut c), format!("OK {LOCAL_PORT}\n"));
    assert_eq!(g.read_bytes(5), b"hello");
    g.finish();
}

#[test]
fn rst_from_guest_closes_the_client() {
    let mut g = Guest::new("refused", 4096, 8);
    let mut c = UnixStream::connect(&g.path).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    c.write_all(b"CONNECT 5555\n").unwrap();
    let (req, _) = g.expect(op::REQUEST);
    assert_eq!(req.dst_port, 5555);
    // Nobody listens on 5555 in the guest.
    let mut h = g.hdr(op::RST, req.src_port, 0, 0);
    h.src_port = 5555;
    g.send(h, &[]);
    let mut buf = [0u8; 16];
    match c.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("client got {n} bytes instead of EOF"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
    }
    // Packets for the dead connection get an RST back, not a fault.
    let mut h = g.hdr(op::RW, req.src_port, 0, 0);
    h.src_port = 5555;
    g.send(h, &[]);
    let (rst, _) = g.expect(op::RST);
    assert_eq!((rst.src_port, rst.dst_port), (req.src_port, 5555));
    assert!(g.faults.try_recv().is_none());
    g.finish();
}

#[test]
fn bad_connect_lines_close_the_client() {
    let g = Guest::new("badline", 4096, 8);
    for line in ["HELLO 1\n", "CONNECT x\n", "CONNECT 99999999999\n"] {
        let mut c = UnixStream::connect(&g.path).unwrap();
        c.set_read_timeout(Some(TIMEOUT)).unwrap();
        c.write_all(line.as_bytes()).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(c.read(&mut buf).unwrap(), 0, "{line:?}");
    }
    let mut c = UnixStream::connect(&g.path).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    c.write_all(&[b'A'; 100]).unwrap();
    let mut buf = [0u8; 4];
    assert_eq!(c.read(&mut buf).unwrap_or(0), 0);
    g.finish();
}

/// The state of an established connection from the host's `local_port` to the guest's
/// invocation port, as a snapshot holds it.
fn established_invoke_connection(local_port: u32) -> ConnectionState {
    ConnectionState {
        phase: Phase::Established,
        local_port,
        peer_port: abi::vsock::INVOKE_PORT,
        peer_buf_alloc: 1 << 20,
        ..ConnectionState::awaiting_connect()
    }
}

#[test]
fn parked_connection_attaches_without_a_handshake() {
    let st = established_invoke_connection(LOCAL_PORT + 7);
    let mut g = Guest::with(
        "parked",
        4096,
        8,
        |d| assert!(d.park_connection(st.clone())),
    );
    assert_eq!(g.dev.lock().unwrap().state().connections, vec![st]);
    let mut c = UnixStream::connect(&g.path).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    c.write_all(b"CONNECT 1024\nreq").unwrap();
    assert_eq!(read_line(&mut c), format!("OK {}\n", LOCAL_PORT + 7));
    // No OP_REQUEST: the bytes arrive on the existing connection.
    let (h, d) = g.expect(op::RW);
    assert_eq!((h.src_port, &d[..]), (LOCAL_PORT + 7, &b"req"[..]));
    g.send(g.hdr(op::RW, LOCAL_PORT + 7, 4, 0), b"resp");
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"resp");
    g.finish();
}

#[test]
fn a_client_attached_at_restore_has_its_first_bytes_delivered_at_once() {
    let st = established_invoke_connection(LOCAL_PORT + 9);
    let mut g = Guest::with("attached", 4096, 8, |d| {
        assert!(d.park_connection(st.clone()))
    });
    let too_long = vec![0u8; MAX_RX_PAYLOAD as usize + 1];
    let err = g
        .dev
        .lock()
        .unwrap()
        .attach_client(abi::vsock::INVOKE_PORT, &too_long)
        .unwrap_err();
    assert!(matches!(err, VsockError::FirstBytesTooLong(_)), "{err}");
    // No parked connection on another port.
    let none = g.dev.lock().unwrap().attach_client(5, b"x").unwrap();
    assert!(none.is_none());
    let mut c = g
        .dev
        .lock()
        .unwrap()
        .attach_client(abi::vsock::INVOKE_PORT, b"req")
        .unwrap()
        .expect("the parked connection was not attached");
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    // Taken: a second client does not get it.
    let again = g
        .dev
        .lock()
        .unwrap()
        .attach_client(abi::vsock::INVOKE_PORT, b"x")
        .unwrap();
    assert!(again.is_none());
    // The first bytes are on the guest's queue, no OP_REQUEST, no OK line for the client.
    let (h, d) = g.expect(op::RW);
    assert_eq!((h.src_port, &d[..]), (LOCAL_PORT + 9, &b"req"[..]));
    g.send(g.hdr(op::RW, LOCAL_PORT + 9, 4, 0), b"resp");
    let mut buf = [0u8; 4];
    c.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"resp");
    // Later bytes go through the device's host I/O as for any client.
    c.write_all(b"more").unwrap();
    let (_, d) = g.expect(op::RW);
    assert_eq!(&d[..], b"more");
    g.finish();
}

#[test]
fn large_rx_buffers_get_packets_beyond_64_kib() {
    let mut g = Guest::new("large", 256 * 1024, 2);
    let mut c = UnixStream::connect(&g.path).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    // The whole request waits in the socket before the handshake ends.
    let data = pattern(100 * 1024, 9);
    let mut first = b"CONNECT 1024\n".to_vec();
    first.extend_from_slice(&data);
    c.write_all(&first).unwrap();
    let (req, _) = g.expect(op::REQUEST);
    g.send(g.hdr(op::RESPONSE, req.src_port, 0, 0), &[]);
    assert_eq!(read_line(&mut c), format!("OK {LOCAL_PORT}\n"));
    let mut got = Vec::new();
    let mut largest = 0;
    while got.len() < data.len() {
        let (h, d) = g.expect(op::RW);
        largest = largest.max(h.len);
        got.extend(d);
    }
    assert_eq!(got, data);
    assert!(largest > MAX_PKT_PAYLOAD, "largest packet {largest} bytes");
    // Packets still respect the guest's credit.
    g.buf_alloc = 1000;
    g.rx_total = got.len() as u32;
    g.fwd_cnt = g.rx_total;
    g.send(g.hdr(op::CREDIT_UPDATE, LOCAL_PORT, 0, 0), &[]);
    c.write_all(&data).unwrap();
    let (h, _) = g.expect(op::RW);
    assert_eq!(h.len, 1000);
    assert!(g.faults.try_recv().is_none());
    g.finish();
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + TIMEOUT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_client_that_connects_before_the_driver_starts_gets_ok() {
    let mut g = Guest::unstarted("early", 4096);
    let mut c = UnixStream::connect(&g.path).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    c.write_all(b"CONNECT 1024\nearly").unwrap();
    let dev = g.dev.clone();
    wait_until("the CONNECT line", || {
        dev.lock().unwrap().connection_phases() == [Phase::Connecting]
    });
    // The driver's mandatory start-up reset keeps the client; the request reaches the
    // driver once it is active.
    w(&mut g.t, reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(dev.lock().unwrap().connection_phases(), [Phase::Connecting]);
    g.start(8, features::VERSION_1 | features::RING_EVENT_IDX);
    let (req, _) = g.expect(op::REQUEST);
    assert_eq!((req.src_port, req.dst_port), (LOCAL_PORT, 1024));
    g.send(g.hdr(op::RESPONSE, req.src_port, 0, 0), &[]);
    assert_eq!(read_line(&mut c), format!("OK {LOCAL_PORT}\n"));
    assert_eq!(g.read_bytes(5), b"early");
    assert!(g.faults.try_recv().is_none());
    g.finish();
}

#[test]
fn a_driver_reset_closes_established_connections_and_keeps_pending_ones() {
    let mut g = Guest::new("reset", 4096, 8);
    let mut old = g.connect(1024);
    let mut pending = UnixStream::connect(&g.path).unwrap();
    pending.set_read_timeout(Some(TIMEOUT)).unwrap();
    pending.write_all(b"CONNECT 1025\n").unwrap();
    let (req, _) = g.expect(op::REQUEST);
    assert_eq!((req.src_port, req.dst_port), (LOCAL_PORT + 1, 1025));
    // A client that has not even sent its line yet.
    let mut quiet = UnixStream::connect(&g.path).unwrap();
    quiet.set_read_timeout(Some(TIMEOUT)).unwrap();
    let dev = g.dev.clone();
    wait_until("the third client", || {
        dev.lock().unwrap().connection_count() == 3
    });
    // The driver resets before answering: the established client sees EOF; the other
    // request reaches the new driver.
    g.restart(8);
    let mut buf = [0u8; 1];
    match old.read(&mut buf) {
        Ok(0) => {}
        Ok(n) => panic!("client got {n} bytes instead of EOF"),
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
    }
    let (req2, _) = g.expect(op::REQUEST);
    assert_eq!((req2.src_port, req2.dst_port), (LOCAL_PORT + 1, 1025));
    let mut resp = g.hdr(op::RESPONSE, req2.src_port, 0, 0);
    resp.src_port = 1025;
    g.send(resp, &[]);
    assert_eq!(read_line(&mut pending), format!("OK {}\n", LOCAL_PORT + 1));
    quiet.write_all(b"CONNECT 1026\n").unwrap();
    let (req3, _) = g.expect(op::REQUEST);
    assert_eq!(req3.dst_port, 1026);
    let mut phases = g.dev.lock().unwrap().connection_phases();
    phases.sort_by_key(|p| *p as u8);
    assert_eq!(phases, vec![Phase::Connecting, Phase::Established]);
    assert!(g.faults.try_recv().is_none());
    g.finish();
}

// ----- hostile guests -----

/// Checks the fault, then that the device stopped processing and the host side is fine.
fn assert_broken(g: Guest, expect: &str) {
    let f = g.fault();
    check_broken(g, f, expect);
}

fn check_broken(mut g: Guest, f: DeviceFault, expect: &str) {
    assert_eq!(f.device, "virtio-vsock");
    assert!(
        f.message.contains(expect),
        "fault {f:?} does not mention {expect:?}"
    );
    assert!(g.dev.lock().unwrap().is_broken());
    assert_ne!(
        r(&mut g.t, reg::VIRTIO_MMIO_STATUS) & status::DEVICE_NEEDS_RESET,
        0
    );
    // A broken device ignores further packets and reports nothing more.
    g.queue_tx(&g.hdr(op::RW, LOCAL_PORT, 0, 0), &[]);
    g.notify(TXQ);
    std::thread::sleep(Duration::from_millis(20));
    assert!(g.faults.try_recv().is_none());
    g.finish();
}

#[test]
fn tx_descriptor_loop_breaks_the_device() {
    let mut g = Guest::new("loop", 4096, 8);
    g.tx.set_desc(&g.mem, 3, TX_BUF_BASE, 44, VRING_DESC_F_NEXT as u16, 4);
    g.tx.set_desc(&g.mem, 4, TX_BUF_BASE, 44, VRING_DESC_F_NEXT as u16, 3);
    g.tx.publish(&g.mem, 3);
    g.notify(TXQ);
    let f = g.fault();
    assert_eq!(
        f.to_string(),
        "virtio-vsock: tx queue: descriptor chain at head 3 loops (descriptor 4 links back to 3)"
    );
    check_broken(g, f, "loops");
}

#[test]
fn buffer_outside_memory_breaks_the_device() {
    let mut g = Guest::new("oob", 4096, 8);
    g.tx.set_desc(&g.mem, 0, 0x4000_0000, 44, 0, 0);
    g.tx.publish(&g.mem, 0);
    g.notify(TXQ);
    assert_broken(g, "tx queue: descriptor chain at head 0: descriptor 0 buffer [0x40000000, +0x2c) is outside guest memory");
}

#[test]
fn absurd_length_breaks_the_device() {
    let mut g = Guest::new("len", 4096, 8);
    let h = g.hdr(op::RW, LOCAL_PORT, 1_000_000, 0);
    g.queue_tx(&h, &[0u8; 16]);
    g.notify(TXQ);
    assert_broken(
        g,
        "tx queue: bad packet at head 0: payload length 1000000 exceeds the 65536-byte limit",
    );
}

#[test]
fn bad_header_field_breaks_the_device() {
    let mut g = Guest::new("cid", 4096, 8);
    let mut h = g.hdr(op::REQUEST, LOCAL_PORT, 0, 0);
    h.src_cid = 7;
    g.queue_tx(&h, &[]);
    g.notify(TXQ);
    assert_broken(g, "src_cid 7 is not the guest's cid 3");
}

#[test]
fn short_packet_breaks_the_device() {
    let mut g = Guest::new("short", 4096, 8);
    g.tx.set_desc(&g.mem, 0, TX_BUF_BASE, 20, 0, 0);
    g.tx.publish(&g.mem, 0);
    g.notify(TXQ);
    assert_broken(g, "packet of 20 bytes is shorter than the 44-byte header");
}

#[test]
fn avail_index_jump_breaks_the_device() {
    let mut g = Guest::new("avail", 4096, 8);
    g.mem
        .write_obj(1000u16, GuestAddress(g.tx.avail + 2))
        .unwrap();
    g.notify(TXQ);
    assert_broken(
        g,
        "avail ring index 1000 is 1000 entries ahead of the device, more than the queue size 64",
    );
}

#[test]
fn readable_rx_buffer_breaks_the_device() {
    // The rx buffers are device-readable: the first packet the device tries to deliver
    // (a client's OP_REQUEST) finds out.
    let mut g = Guest::new("rxdir", 4096, 0);
    g.rx.set_desc(&g.mem, 0, RX_BUF_BASE, 4096, 0, 0);
    g.rx.publish(&g.mem, 0);
    g.notify(RXQ);
    let mut c = UnixStream::connect(&g.path).unwrap();
    c.write_all(b"CONNECT 1024\n").unwrap();
    let f = g.fault();
    assert_eq!(
        f.message,
        "rx queue: descriptor chain at head 0 has device-readable buffers"
    );
    check_broken(g, f, "device-readable");
    // The client's socket is still open (the VMM stops the VM and with it the device).
    drop(c);
}

#[test]
fn credit_overrun_breaks_the_device() {
    let mut g = Guest::new("overrun", 4096, 8);
    let _c = g.connect(abi::vsock::INVOKE_PORT);
    // 64 KiB packets, batch after batch, to a client that does not read: once the host's
    // window (and what the client's socket absorbed) is full, the next one overruns.
    let chunk = vec![0u8; 65536];
    let batches = (BUF_ALLOC as usize + (8 << 20)) / (8 * chunk.len());
    let dev = g.dev.clone();
    for _ in 0..batches {
        for _ in 0..8 {
            let h = g.hdr(op::RW, LOCAL_PORT, 65536, 0);
            g.queue_tx(&h, &chunk);
        }
        g.notify(TXQ);
        wait_until("the tx batch", || {
            dev.lock().unwrap().is_broken()
                || (g.tx.take_used(&g.mem).is_none() && g.tx.used_seen == g.tx.avail_idx)
        });
        if dev.lock().unwrap().is_broken() {
            break;
        }
    }
    assert_broken(g, "bytes of credit the host gave");
}

#[test]
fn fwd_cnt_beyond_sent_breaks_the_device() {
    let mut g = Guest::new("fwdcnt", 4096, 8);
    let _c = g.connect(abi::vsock::INVOKE_PORT);
    g.fwd_cnt = 10;
    let h = g.hdr(op::CREDIT_UPDATE, LOCAL_PORT, 0, 0);
    g.queue_tx(&h, &[]);
    g.notify(TXQ);
    assert_broken(g, "fwd_cnt 10 acknowledges bytes the host never sent");
}

#[test]
fn wrong_queue_size_breaks_the_device() {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let (sink, faults) = fault_channel().unwrap();
    let dev = Arc::new(Mutex::new(
        VsockDevice::new(&sock_path("qsize"), sink.clone()).unwrap(),
    ));
    let mut t = MmioTransport::new(mem, dev.clone(), MmioSlot::nth(0).unwrap(), sink).unwrap();
    assert!(negotiate(&mut t, features::VERSION_1));
    w(&mut t, reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    assert_eq!(r(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    w(&mut t, reg::VIRTIO_MMIO_QUEUE_NUM, 512);
    let f = faults.try_recv().unwrap();
    assert_eq!(
        f.to_string(),
        "virtio-vsock@0xd0000000: queue 0 size 512 is not a power of two in 1..=256"
    );
    assert!(dev.lock().unwrap().is_broken());
}

// ----- snapshots -----

#[test]
fn vsock_state_round_trip_parks_the_connection_and_resumes_the_rings() {
    use crate::devices::virtio::mmio::TransportArgs;
    use crate::devices::virtio::vsock::device::VsockArgs;
    use fnode_snapshot::Persist;

    let mut g = Guest::new("persist-a", 4096, 8);
    let mut c = g.connect(abi::vsock::INVOKE_PORT);
    c.write_all(b"one").unwrap();
    assert_eq!(g.read_bytes(3), b"one");
    g.fwd_cnt = g.rx_total;
    g.send(g.hdr(op::RW, LOCAL_PORT, 3, 0), b"two");
    let mut buf = [0u8; 3];
    c.read_exact(&mut buf).unwrap();
    // The client can read the bytes before the loop has seen its send complete (and counted
    // them forwarded): wait for that, as a VMM waits for quiet host I/O before saving.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while g.dev.lock().unwrap().save().connections[0].fwd_cnt != 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "the send never completed"
        );
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    // Quiescent (as at READY): save both halves, the device under its lock.
    let (saved_dev, saved_t) = {
        let d = g.dev.lock().unwrap();
        (d.save(), g.t.save())
    };
    assert_eq!(saved_dev.connections.len(), 1);
    assert_eq!(saved_dev.connections[0].rx_cnt, 3);
    assert_eq!(saved_dev.connections[0].tx_cnt, 3);
    let pages = g.dev.lock().unwrap().take_written_pages();
    assert!(pages.contains(&(RX_BUF_BASE / 4096)), "{pages:?}");
    assert!(!g.dev.lock().unwrap().ring_pages().is_empty());

    drop(c);
    g.el.take().unwrap().stop().unwrap();

    // Restore on a new device and transport over the same memory (the guest's rings).
    let path = sock_path("persist-b");
    let (sink, faults) = fault_channel().unwrap();
    let args = VsockArgs {
        uds_path: path.clone(),
        faults: sink.clone(),
    };
    let dev = Arc::new(Mutex::new(VsockDevice::restore(args, &saved_dev).unwrap()));
    let targs = TransportArgs {
        mem: g.mem.clone(),
        device: dev.clone(),
        slot: MmioSlot::nth(0).unwrap(),
        faults: sink,
    };
    let t = MmioTransport::restore(targs, &saved_t).unwrap();
    assert_eq!(t.save(), saved_t);
    assert_eq!(dev.lock().unwrap().save(), saved_dev);
    let el = EventLoop::spawn(vec![dev.clone() as Subscriber]).unwrap();
    // The parked connection: OK at once, no OP_REQUEST; data goes on from the saved rings.
    let mut c = UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    c.write_all(b"CONNECT 1024\nfour").unwrap();
    assert_eq!(read_line(&mut c), format!("OK {LOCAL_PORT}\n"));
    let (h, d) = g.expect(op::RW);
    assert_eq!((h.src_port, &d[..]), (LOCAL_PORT, &b"four"[..]));
    assert_eq!(h.fwd_cnt, 3, "the saved counters go on");

    // In-place reset: back to the saved state, the client stays attached.
    assert_ne!(dev.lock().unwrap().save(), saved_dev);
    {
        let mut d = dev.lock().unwrap();
        d.reset_to(&saved_dev).unwrap();
        assert_eq!(d.save(), saved_dev);
        assert_eq!(d.connection_count(), 1);
    }
    let mut t = t;
    t.reset_to(&saved_t).unwrap();
    assert_eq!(t.save(), saved_t);
    assert!(faults.try_recv().is_none());
    el.stop().unwrap();

    // Garbage is refused.
    let bad_states = [
        VsockState {
            broken: true,
            ..saved_dev.clone()
        },
        VsockState {
            cid: 9,
            ..saved_dev.clone()
        },
        VsockState {
            queues: Some(vec![]),
            ..saved_dev.clone()
        },
        VsockState {
            connections: vec![ConnectionState {
                phase: Phase::Connecting,
                ..saved_dev.connections[0].clone()
            }],
            ..saved_dev.clone()
        },
        VsockState {
            connections: vec![saved_dev.connections[0].clone(); 2],
            ..saved_dev.clone()
        },
    ];
    for bad in bad_states {
        let (sink, _f) = fault_channel().unwrap();
        let args = VsockArgs {
            uds_path: sock_path("persist-c"),
            faults: sink,
        };
        let err = VsockDevice::restore(args, &bad).unwrap_err();
        assert!(
            matches!(err, super::device::VsockError::BadState(_)),
            "{err:?}"
        );
    }
}
