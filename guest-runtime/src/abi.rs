//! The guest↔host contract.
//!
//! Everything a guest and the VMM must agree on lives here, once: I/O ports, the guest
//! physical memory layout, exit codes, the fault report and the kernel command line switches.
//! Values the host reads back from the guest (the fault report) are untrusted on the host
//! side: the decoders here validate and never panic.

/// The exit port: the guest writes one status value (1, 2 or 4 bytes) and the VM ends.
///
/// This is QEMU's `isa-debug-exit` convention (`-device isa-debug-exit,iobase=0xf4,iosize=4`):
/// QEMU exits with `(status << 1) | 1`, fnode-vmm reports the status itself.
pub mod exit {
    /// I/O port of the exit device.
    pub const PORT: u16 = 0xf4;
    /// The guest finished what it was asked to do.
    pub const SUCCESS: u32 = 0x10;
    /// The guest kernel failed (a panic, a bad command line); details are on the serial console.
    pub const FAILURE: u32 = 0x11;
    /// A CPU exception: a [`super::fault::FaultReport`] was written at
    /// [`super::layout::REPORT_ADDR`] before this status.
    pub const FAULT: u32 = 0x12;

    /// The process exit code QEMU's `isa-debug-exit` gives for a guest `status`.
    pub const fn qemu_exit_code(status: u32) -> i32 {
        ((status << 1) | 1) as i32
    }
}

/// The control port: the guest tells the VMM where it is in its life, with 4-byte writes of
/// a message value. Other values are reserved (the VMM ignores them), and so are reads.
///
/// Under QEMU nothing decodes the port: the writes are dropped and the guest goes on, so an
/// image that signals READY boots under QEMU unchanged.
pub mod control {
    /// I/O port of the control device (distinct from [`super::exit::PORT`]'s four ports).
    pub const PORT: u16 = 0xf8;
    /// Number of ports the device decodes.
    pub const LEN: u16 = 4;
    /// "Init is done, I wait for work": written once, when the guest (the function's `init`
    /// included) is ready to serve. This is where a VMM takes the snapshot invocations are
    /// served from: it pauses the vCPU on this write, saves the VM, and a restored guest
    /// continues right after the write. A VMM that takes no snapshot lets the guest go on.
    pub const READY: u32 = u32::from_le_bytes(*b"REDY");
    /// "The kernel is up; the function's `init` starts now": written once, just before the
    /// kernel first enters the function. It splits a cold start's boot from its init (one
    /// exit, on cold starts only: a restored guest is past it). The VMM only notes the time.
    pub const BOOTED: u32 = u32::from_le_bytes(*b"BOOT");
    /// "This invocation is over": written once a response has been handed to the device in
    /// full (after the notify of its last packet; for a response that waited for credit,
    /// after its last chunk). One exit per invocation. A VMM that resets the VM in place
    /// between invocations does the reset right there, off the next request's path: it lets
    /// the device send everything the guest queued, puts the VM back to its snapshot state
    /// and holds the vCPU until the next invocation is due. The guest never runs past this
    /// write then; a VMM that does not reset lets it go on.
    pub const DONE: u32 = u32::from_le_bytes(*b"DONE");
}

/// Guest physical memory layout. Everything below [`KERNEL_START`](layout::KERNEL_START)
/// belongs to the VMM's boot data; the kernel is linked at `KERNEL_START`.
pub mod layout {
    /// Size of a guest page.
    pub const PAGE_SIZE: u64 = 0x1000;
    /// Where fnode-vmm writes the PVH `hvm_start_info` (QEMU chooses its own place; the guest
    /// always takes the address from `%ebx`).
    pub const PVH_INFO_ADDR: u64 = 0x6000;
    /// Where fnode-vmm writes the PVH memory map, right after `hvm_start_info`.
    pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
    /// Most memory map entries fnode-vmm writes (and the guest reads).
    pub const PVH_MEMMAP_MAX: usize = 16;
    /// The report page: the guest writes a [`super::fault::FaultReport`] here before exiting
    /// with [`super::exit::FAULT`].
    pub const REPORT_ADDR: u64 = 0x7000;
    /// Where fnode-vmm writes the kernel command line (NUL-terminated).
    pub const CMDLINE_ADDR: u64 = 0x20000;
    /// Longest command line, including the NUL.
    pub const CMDLINE_MAX: usize = 4096;
    /// Physical (and virtual: the kernel identity-maps) address the kernel is linked at.
    pub const KERNEL_START: u64 = 0x10_0000;
    /// Smallest guest memory fnode-vmm boots (the kernel, its stack and heap must fit).
    pub const MIN_MEM_MIB: u64 = 8;
    /// Largest guest memory; the kernel's boot page tables identity-map the first 1 GiB.
    pub const MAX_MEM_MIB: u64 = 1024;
    /// The kernel's identity map covers `[0, IDENTITY_MAP_END)`.
    pub const IDENTITY_MAP_END: u64 = 1 << 30;
}

/// The legacy 16550 serial console (COM1) the guest prints to.
pub mod serial {
    /// I/O base of COM1.
    pub const COM1_PORT: u16 = 0x3f8;
    /// Number of ports the UART decodes.
    pub const COM1_LEN: u16 = 8;
    /// COM1's legacy IRQ line.
    pub const COM1_IRQ: u32 = 4;
}

/// The fault report the guest kernel writes when a CPU exception ends it.
pub mod fault {
    /// `FaultReport::magic`: "FNFAULT1" little-endian.
    pub const MAGIC: u64 = u64::from_le_bytes(*b"FNFAULT1");

    /// Written by the guest at [`super::layout::REPORT_ADDR`], then [`super::exit::FAULT`].
    /// All fields little-endian `u64`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct FaultReport {
        /// [`MAGIC`]; anything else means the guest wrote no valid report.
        pub magic: u64,
        /// Exception vector (0..=31).
        pub vector: u64,
        /// The error code the CPU pushed, or 0 for vectors without one.
        pub error_code: u64,
        /// Faulting instruction pointer.
        pub rip: u64,
        /// CR2 (the faulting address for a page fault, vector 14).
        pub cr2: u64,
        /// Stack pointer at the fault.
        pub rsp: u64,
        /// Code segment at the fault (its low two bits are the privilege level).
        pub cs: u64,
    }

    /// Size of the encoded report.
    pub const REPORT_LEN: usize = core::mem::size_of::<FaultReport>();

    impl FaultReport {
        /// Decodes a report read from guest memory. `None` if the magic is wrong
        /// (the guest wrote no report, or garbage).
        pub fn decode(bytes: &[u8; REPORT_LEN]) -> Option<Self> {
            let mut f = [0u64; REPORT_LEN / 8];
            for (i, v) in f.iter_mut().enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
                *v = u64::from_le_bytes(w);
            }
            let r = FaultReport {
                magic: f[0],
                vector: f[1],
                error_code: f[2],
                rip: f[3],
                cr2: f[4],
                rsp: f[5],
                cs: f[6],
            };
            (r.magic == MAGIC).then_some(r)
        }

        /// The exception's mnemonic (`#PF`, `#UD`, ...), or `"#??"` for an unknown vector.
        pub fn mnemonic(&self) -> &'static str {
            vector_mnemonic(self.vector)
        }
    }

    /// The mnemonic of exception `vector`.
    pub const fn vector_mnemonic(vector: u64) -> &'static str {
        match vector {
            0 => "#DE",
            1 => "#DB",
            2 => "NMI",
            3 => "#BP",
            4 => "#OF",
            5 => "#BR",
            6 => "#UD",
            7 => "#NM",
            8 => "#DF",
            10 => "#TS",
            11 => "#NP",
            12 => "#SS",
            13 => "#GP",
            14 => "#PF",
            16 => "#MF",
            17 => "#AC",
            18 => "#MC",
            19 => "#XM",
            20 => "#VE",
            21 => "#CP",
            _ => "#??",
        }
    }
}

/// Kernel command line switches (space-separated `key=value` words).
pub mod cmdline {
    /// `fault=<kind>` makes the kernel fault on purpose after its banner (for tests).
    pub const FAULT_KEY: &str = "fault";
    /// `fault=ud2`: execute `ud2` (#UD, vector 6).
    pub const FAULT_UD2: &str = "ud2";
    /// `fault=pagefault`: read an unmapped address (#PF, vector 14).
    pub const FAULT_PAGEFAULT: &str = "pagefault";
    /// `fault=loop`: spin forever (the host's timeout must stop it).
    pub const FAULT_LOOP: &str = "loop";
    /// The unmapped address `fault=pagefault` reads (just above the 1 GiB identity map).
    pub const PAGEFAULT_ADDR: u64 = super::layout::IDENTITY_MAP_END + 0x1000;

    /// `invoke=<text>`: a test aid for function images. The kernel runs the function's
    /// `init`, hands it `<text>` as one request (no vsock needed), prints
    /// `fnode guest-kernel: invoke response <len> bytes: <bytes>` (or `invoke error ...`) on
    /// the serial console and exits with [`super::exit::SUCCESS`]. Without it, a function
    /// image serves the vsock device the command line announces; with neither, it runs
    /// `init` and exits with [`super::exit::SUCCESS`].
    pub const INVOKE_KEY: &str = "invoke";
    /// `invoke_repeat=<n>` (with `invoke=`): hand the function the request `n` times and print
    /// only the last response, a way to time the kernel's per-invocation path.
    pub const INVOKE_REPEAT_KEY: &str = "invoke_repeat";
    /// `fnode.echo=1`: instead of running a function, the kernel serves the invocation
    /// channel itself, answering every REQUEST with a RESPONSE carrying the same payload
    /// (a test of the vsock path end to end). Needs a virtio-vsock device.
    pub const ECHO_KEY: &str = "fnode.echo";

    /// `fnode.hostile=<what>`: the kernel breaks its contract with a device on purpose, for
    /// the host's isolation tests (the kernel's `hostile` module).
    pub const HOSTILE_KEY: &str = "fnode.hostile";
    /// `fnode.hostile=vsock`: instead of serving invocations, hand the virtio-vsock device a
    /// transmit descriptor chain that links back to itself. The VMM must stop the VM with a
    /// device fault and go on serving its other VMs.
    pub const HOSTILE_VSOCK: &str = "vsock";
    /// `fnode.hostile=done`: serve the function, but write [`super::control::DONE`] three
    /// times in a row after each response. A VMM that resets at DONE must do it once (the
    /// guest runs no further), one that does not must let the guest go on each time.
    pub const HOSTILE_DONE: &str = "done";
    /// `fnode.hostile=done-early`: serve the function, but write [`super::control::DONE`] in
    /// a loop before waiting for each request, when no request is in flight. A VMM that
    /// resets at DONE parks the guest at its snapshot state there (the invocation then gets
    /// no answer: the host's timeout must end it); one that does not lets it go on.
    pub const HOSTILE_DONE_EARLY: &str = "done-early";

    /// `snapshot-test=1`: a test aid for snapshots (the plain boot image). The kernel computes
    /// a value from the TSC, keeps it in memory and in a callee-saved register, prints
    /// [`SNAPSHOT_TEST_READY`] followed by the value in hex, writes
    /// [`super::control::READY`], then prints [`SNAPSHOT_TEST_RESUMED`] followed by the value
    /// as found in memory, a space and the value as found in the register, and exits with
    /// [`super::exit::SUCCESS`] if both equal the value it computed (else
    /// [`super::exit::FAILURE`]). A guest restored from a snapshot taken at the READY prints
    /// the value its snapshotted self computed.
    pub const SNAPSHOT_TEST_KEY: &str = "snapshot-test";
    /// The line `snapshot-test=1` prints before READY (then the value in hex, `0x...`).
    pub const SNAPSHOT_TEST_READY: &str = "snapshot-test: ready ";
    /// The line `snapshot-test=1` prints after READY (then memory and register values).
    pub const SNAPSHOT_TEST_RESUMED: &str = "snapshot-test: resumed ";

    /// The value of `key` in a command line, if present.
    pub fn get<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
        cmdline.split_ascii_whitespace().find_map(|w| {
            let (k, v) = w.split_once('=')?;
            (k == key).then_some(v)
        })
    }
}

/// Virtio-mmio devices, announced to the guest the Linux way on its command line:
/// `virtio_mmio.device=<size>@<addr>:<irq>` (one word per device).
pub mod virtio {
    /// Guest physical address of the first virtio-mmio device window.
    pub const MMIO_BASE: u64 = 0xd000_0000;
    /// Size of one device window (and the stride between devices).
    pub const MMIO_SIZE: u64 = 0x1000;
    /// GSI of the first device; device `i` uses `FIRST_IRQ + i`.
    pub const FIRST_IRQ: u32 = 5;
    /// Most virtio-mmio devices a guest accepts from its command line.
    pub const MAX_DEVICES: usize = 8;
    /// The command-line key announcing a device.
    pub const CMDLINE_KEY: &str = "virtio_mmio.device";
    /// Virtio device id of the socket device (virtio 1.x, section 5.10).
    pub const DEVICE_ID_VSOCK: u32 = 19;

    /// One device announced by a `virtio_mmio.device=<size>@<addr>:<irq>` word.
    ///
    /// `<size>` is a number with an optional `K`, `M` or `G` suffix (`4K`, `0x1000`, `4096`),
    /// `<addr>` a number (`0xd0000000`), `<irq>` a number (`5`); numbers are decimal or
    /// `0x`-prefixed hex, as Linux's `virtio_mmio` driver reads them. [`core::fmt::Display`]
    /// writes the form [`MmioDevice::parse`] reads back.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct MmioDevice {
        /// Size of the register window in bytes.
        pub size: u64,
        /// Guest physical address of the register window.
        pub addr: u64,
        /// The interrupt line (GSI) the device raises.
        pub irq: u32,
    }

    /// Why a `virtio_mmio.device=` value was rejected.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum DeviceParseError {
        /// No `@` between the size and the address.
        MissingAt,
        /// No `:` between the address and the interrupt line.
        MissingIrq,
        /// The size is not a number with an optional `K`/`M`/`G` suffix, or is zero.
        BadSize,
        /// The address is not a number.
        BadAddr,
        /// The interrupt line is not a number that fits 32 bits.
        BadIrq,
        /// `addr + size` does not fit 64 bits.
        Overflow,
    }

    impl core::fmt::Display for DeviceParseError {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            let what = match self {
                DeviceParseError::MissingAt => "no '@' after the size",
                DeviceParseError::MissingIrq => "no ':' after the address",
                DeviceParseError::BadSize => "the size is not a non-zero number (4K, 0x1000)",
                DeviceParseError::BadAddr => "the address is not a number (0xd0000000)",
                DeviceParseError::BadIrq => "the interrupt line is not a number (5)",
                DeviceParseError::Overflow => "the window runs past the end of the address space",
            };
            write!(
                f,
                "{what}; expected <size>@<addr>:<irq>, e.g. 4K@{MMIO_BASE:#x}:{FIRST_IRQ}"
            )
        }
    }

    impl MmioDevice {
        /// Parses the value of one `virtio_mmio.device=` word (untrusted: never panics).
        pub fn parse(value: &str) -> Result<Self, DeviceParseError> {
            let (size, rest) = value.split_once('@').ok_or(DeviceParseError::MissingAt)?;
            let (addr, irq) = rest.split_once(':').ok_or(DeviceParseError::MissingIrq)?;
            let size = parse_size(size).ok_or(DeviceParseError::BadSize)?;
            let addr = parse_number(addr).ok_or(DeviceParseError::BadAddr)?;
            let irq = parse_number(irq)
                .and_then(|n| u32::try_from(n).ok())
                .ok_or(DeviceParseError::BadIrq)?;
            addr.checked_add(size).ok_or(DeviceParseError::Overflow)?;
            Ok(MmioDevice { size, addr, irq })
        }
    }

    impl core::fmt::Display for MmioDevice {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            write!(f, "{:#x}@{:#x}:{}", self.size, self.addr, self.irq)
        }
    }

    /// The `virtio_mmio.device=` words of a command line, in order: each word's value and
    /// what it parses to. The caller decides what to do with bad words and with more than
    /// [`MAX_DEVICES`] devices.
    pub fn devices(
        cmdline: &str,
    ) -> impl Iterator<Item = (&str, Result<MmioDevice, DeviceParseError>)> {
        cmdline.split_ascii_whitespace().filter_map(|w| {
            let (k, v) = w.split_once('=')?;
            (k == CMDLINE_KEY).then(|| (v, MmioDevice::parse(v)))
        })
    }

    /// A decimal or `0x`-prefixed hexadecimal number.
    fn parse_number(s: &str) -> Option<u64> {
        match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
            Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
                u64::from_str_radix(hex, 16).ok()
            }
            Some(_) => None,
            None if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
            None => None,
        }
    }

    /// A non-zero number with an optional binary `K`, `M` or `G` suffix.
    fn parse_size(s: &str) -> Option<u64> {
        let (digits, shift) = match s.as_bytes().last()? {
            b'k' | b'K' => (&s[..s.len() - 1], 10),
            b'm' | b'M' => (&s[..s.len() - 1], 20),
            b'g' | b'G' => (&s[..s.len() - 1], 30),
            _ => (s, 0),
        };
        let n = parse_number(digits)?;
        let size = n.checked_mul(1 << shift)?;
        (size != 0).then_some(size)
    }
}

/// Fresh entropy for restored VMs.
///
/// VMs restored from one snapshot start with the same memory, random generator state
/// included. Before a restored (or reset) guest runs again, the VMM writes a
/// [`Seed`](entropy::Seed) at [`ADDR`](entropy::ADDR): a fresh 256-bit seed from the host's generator and a generation that differs
/// every time. The guest kernel keys its random source with it (mixed with `rdrand` where the
/// CPU has it), so two restores of one snapshot never hand out the same random bytes. A guest
/// that finds no valid seed (a cold boot, QEMU) uses `rdrand` alone.
pub mod entropy {
    /// Guest physical address of the [`Seed`]: VMM boot data (below the kernel), its own page.
    pub const ADDR: u64 = 0x8000;
    /// `Seed::magic`: "FNSEED01" little-endian.
    pub const MAGIC: u64 = u64::from_le_bytes(*b"FNSEED01");
    /// Encoded size of a [`Seed`].
    pub const LEN: usize = core::mem::size_of::<Seed>();

    /// What the VMM writes at [`ADDR`]. All fields little-endian `u64`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub struct Seed {
        /// [`MAGIC`]; anything else means there is no seed.
        pub magic: u64,
        /// Changes with every restore or reset (the VM's id for this run).
        pub generation: u64,
        /// 256 bits from the host's random generator.
        pub seed: [u64; 4],
    }

    impl Seed {
        /// The bytes the VMM writes.
        pub fn encode(&self) -> [u8; LEN] {
            let mut b = [0u8; LEN];
            let words = [
                self.magic,
                self.generation,
                self.seed[0],
                self.seed[1],
                self.seed[2],
                self.seed[3],
            ];
            for (i, w) in words.iter().enumerate() {
                b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            b
        }

        /// Reads a seed back; `None` without the magic.
        pub fn decode(b: &[u8; LEN]) -> Option<Self> {
            let word = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&b[i * 8..i * 8 + 8]);
                u64::from_le_bytes(w)
            };
            let s = Seed {
                magic: word(0),
                generation: word(1),
                seed: [word(2), word(3), word(4), word(5)],
            };
            (s.magic == MAGIC).then_some(s)
        }

        /// Word `index` of the random stream this seed keys for the guest's `counter`-th
        /// random call: SplitMix64 over one seed lane, the generation, the call and the word.
        /// Cheap (a dozen instructions per word: guest kernel code may be emulated); it makes
        /// restored VMs differ, the host's seed supplies the entropy.
        pub const fn word(&self, counter: u64, index: u64) -> u64 {
            let lane = self.seed[(index & 3) as usize];
            let mut z = lane
                ^ self.generation.rotate_left(32)
                ^ counter.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }
}

/// Virtio-vsock addressing.
pub mod vsock {
    /// The host's context id (virtio spec: 2 is always the host).
    pub const HOST_CID: u64 = 2;
    /// The context id fnode gives every guest (each VM has its own device, so all share it).
    pub const GUEST_CID: u64 = 3;
    /// The port the guest runtime listens on for invocations.
    pub const INVOKE_PORT: u32 = 1024;

    /// The socket device's packet format (virtio 1.x, 5.10.6), which the guest driver and the
    /// host device both speak: the header is 44 bytes, little-endian:
    ///
    /// ```text
    ///  0 src_cid  u64    8 dst_cid  u64   16 src_port u32   20 dst_port u32
    /// 24 len      u32   28 type     u16   30 op       u16   32 flags    u32
    /// 36 buf_alloc u32  40 fwd_cnt  u32
    /// ```
    pub mod packet {
        /// Encoded header size.
        pub const HDR_LEN: usize = 44;
        /// `type`: stream socket.
        pub const TYPE_STREAM: u16 = 1;
        /// SHUTDOWN `flags`: the sender will receive no more data.
        pub const SHUTDOWN_RCV: u32 = 1;
        /// SHUTDOWN `flags`: the sender will send no more data.
        pub const SHUTDOWN_SEND: u32 = 2;
        /// Event id on the event queue: the transport was reset (connections are gone).
        pub const EVENT_TRANSPORT_RESET: u32 = 0;

        /// `op` values.
        pub mod op {
            /// Connection request.
            pub const REQUEST: u16 = 1;
            /// Connection accepted.
            pub const RESPONSE: u16 = 2;
            /// Connection reset (refused, or closed for good).
            pub const RST: u16 = 3;
            /// The sender will not receive and/or send any more (see `flags`).
            pub const SHUTDOWN: u16 = 4;
            /// Data.
            pub const RW: u16 = 5;
            /// The sender's `buf_alloc`/`fwd_cnt` changed.
            pub const CREDIT_UPDATE: u16 = 6;
            /// Asks the peer for a CREDIT_UPDATE.
            pub const CREDIT_REQUEST: u16 = 7;
        }
    }
}

/// Invocation frames, carried over the vsock stream in both directions.
///
/// A frame is a [`Header`](frame::Header) of [`HEADER_LEN`](frame::HEADER_LEN) bytes
/// (little-endian) followed by `len` payload bytes. The host sends
/// [`KIND_REQUEST`](frame::KIND_REQUEST); the guest answers with a frame carrying the same `id`
/// and [`KIND_RESPONSE`](frame::KIND_RESPONSE) (the function's bytes) or
/// [`KIND_ERROR`](frame::KIND_ERROR) (a UTF-8 message).
pub mod frame {
    /// Largest request or response payload: 6 MiB, AWS Lambda's synchronous limit.
    pub const MAX_PAYLOAD: usize = 6 * 1024 * 1024;
    /// Encoded header size.
    pub const HEADER_LEN: usize = 24;
    /// `Header::magic`: "FNFR".
    pub const MAGIC: u32 = u32::from_le_bytes(*b"FNFR");
    /// Host -> guest: run the handler on the payload.
    pub const KIND_REQUEST: u16 = 1;
    /// Guest -> host: the handler's response bytes.
    pub const KIND_RESPONSE: u16 = 2;
    /// Guest -> host: the function failed; the payload is a UTF-8 message.
    pub const KIND_ERROR: u16 = 3;

    /// A frame header.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Header {
        /// One of the `KIND_*` values.
        pub kind: u16,
        /// Request id chosen by the host, echoed by the guest.
        pub id: u64,
        /// Payload length in bytes, at most [`MAX_PAYLOAD`].
        pub len: u32,
    }

    /// Why a header was rejected.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum HeaderError {
        /// The first four bytes are not [`MAGIC`]: the peer is not speaking fnode frames.
        BadMagic(u32),
        /// The version field is not [`VERSION`].
        BadVersion(u16),
        /// The kind is not one of the `KIND_*` values.
        BadKind(u16),
        /// The payload is longer than [`MAX_PAYLOAD`].
        TooLong(u32),
    }

    /// Frame format version.
    pub const VERSION: u16 = 1;

    impl Header {
        /// Encodes the header. Layout (little-endian): `magic: u32`, `version: u16`,
        /// `kind: u16`, `len: u32`, `reserved: u32` (zero), `id: u64`.
        #[inline]
        pub fn encode(&self) -> [u8; HEADER_LEN] {
            let mut b = [0u8; HEADER_LEN];
            b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
            b[4..6].copy_from_slice(&VERSION.to_le_bytes());
            b[6..8].copy_from_slice(&self.kind.to_le_bytes());
            b[8..12].copy_from_slice(&self.len.to_le_bytes());
            b[16..24].copy_from_slice(&self.id.to_le_bytes());
            b
        }

        /// The `id` field of header bytes that may not decode (to answer a refused frame
        /// with the id the peer sent, if any).
        pub fn raw_id(b: &[u8; HEADER_LEN]) -> u64 {
            let mut id = [0u8; 8];
            id.copy_from_slice(&b[16..24]);
            u64::from_le_bytes(id)
        }

        /// Decodes and validates a header received from the peer (untrusted).
        #[inline]
        pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, HeaderError> {
            let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
            let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
            let magic = u32_at(0);
            if magic != MAGIC {
                return Err(HeaderError::BadMagic(magic));
            }
            let version = u16_at(4);
            if version != VERSION {
                return Err(HeaderError::BadVersion(version));
            }
            let kind = u16_at(6);
            if !matches!(kind, KIND_REQUEST | KIND_RESPONSE | KIND_ERROR) {
                return Err(HeaderError::BadKind(kind));
            }
            let len = u32_at(8);
            if len as usize > MAX_PAYLOAD {
                return Err(HeaderError::TooLong(len));
            }
            let id = u64::from(u32_at(16)) | (u64::from(u32_at(20)) << 32);
            Ok(Header { kind, id, len })
        }
    }

    impl core::fmt::Display for HeaderError {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            match self {
                HeaderError::BadMagic(m) => write!(f, "bad frame magic {m:#010x}"),
                HeaderError::BadVersion(v) => write!(f, "frame version {v}, expected {VERSION}"),
                HeaderError::BadKind(k) => write!(f, "unknown frame kind {k}"),
                HeaderError::TooLong(n) => {
                    write!(
                        f,
                        "payload of {n} bytes exceeds the {MAX_PAYLOAD}-byte limit"
                    )
                }
            }
        }
    }
}

/// The function's user-mode (CPL3) world: where its image lives, how the kernel enters it,
/// and the system calls it makes back into the kernel.
///
/// A function image is the guest kernel's ELF plus the function's own ELF, linked at
/// [`USER_START`](user::USER_START) and starting with a [`UserHeader`](user::UserHeader).
/// Memory from `USER_START` to the end of guest RAM is user-accessible; everything below it
/// belongs to the kernel (its code, page tables, heap and virtqueues).
pub mod user {
    use super::{frame::MAX_PAYLOAD, layout::IDENTITY_MAP_END, layout::PAGE_SIZE};

    /// Start of user memory: `[USER_START, end of RAM)` is user-accessible; everything below
    /// belongs to the kernel (its code, page tables, heap and virtqueues) and is not.
    pub const USER_START: u64 = 0x0200_0000;
    /// User memory is mapped (and made user-accessible) in pages of this size, so the end
    /// of user memory is the end of RAM rounded down to it.
    pub const USER_PAGE_SIZE: u64 = 0x20_0000;
    /// The function's stack: `[USER_START, USER_START + STACK_SIZE)`, growing down from
    /// [`IMAGE_START`]. An overflow runs into kernel memory and faults instead of silently
    /// corrupting the function.
    pub const STACK_SIZE: u64 = USER_PAGE_SIZE;
    /// Where a function's ELF is linked (guest physical == virtual), starting with its
    /// [`UserHeader`].
    pub const IMAGE_START: u64 = USER_START + STACK_SIZE;
    /// Where the kernel writes the [`UserStart`] before entering the function: the top of the
    /// stack.
    pub const START_ADDR: u64 = IMAGE_START - core::mem::size_of::<UserStart>() as u64;
    /// `rsp` at the function's entry: as if `entry(START_ADDR)` had just been called
    /// (`rsp + 8` is 16-byte aligned).
    pub const ENTRY_RSP: u64 = START_ADDR - 8;
    const _: () = assert!(START_ADDR.is_multiple_of(16) && (ENTRY_RSP + 8).is_multiple_of(16));
    /// Smallest heap the kernel hands a function; less memory is a configuration error.
    pub const MIN_HEAP: u64 = 1 << 20;
    /// `UserHeader::magic`: "FNUSER01" (the digits are the version of this contract).
    pub const HEADER_MAGIC: u64 = u64::from_le_bytes(*b"FNUSER01");
    /// The ELF section the function's header goes in; the function's linker script puts it
    /// first, at [`IMAGE_START`].
    pub const HEADER_SECTION: &str = ".fnode_header";
    /// Encoded size of a [`UserHeader`].
    pub const HEADER_LEN: usize = core::mem::size_of::<UserHeader>();

    /// At [`IMAGE_START`] in a function image. Untrusted: the kernel (and `fnode build`)
    /// decode it with [`UserHeader::decode`] and check it with [`Layout::new`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct UserHeader {
        /// [`HEADER_MAGIC`].
        pub magic: u64,
        /// The function's user-mode entry point, `extern "C" fn(&UserStart) -> !`.
        pub entry: u64,
        /// First byte after the function's image (its `.bss` included).
        pub image_end: u64,
    }

    impl UserHeader {
        /// Decodes a header (little-endian `u64`s in field order). `None` if the magic is
        /// wrong: the image holds no function.
        pub fn decode(b: &[u8; HEADER_LEN]) -> Option<Self> {
            let word = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&b[i * 8..i * 8 + 8]);
                u64::from_le_bytes(w)
            };
            let h = UserHeader {
                magic: word(0),
                entry: word(1),
                image_end: word(2),
            };
            (h.magic == HEADER_MAGIC).then_some(h)
        }

        /// Encodes the header as [`UserHeader::decode`] reads it.
        pub fn encode(&self) -> [u8; HEADER_LEN] {
            let mut b = [0u8; HEADER_LEN];
            for (i, w) in [self.magic, self.entry, self.image_end].iter().enumerate() {
                b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            b
        }
    }

    /// What the kernel hands the function's entry point (pointer in `rdi`), at
    /// [`START_ADDR`].
    #[repr(C)]
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct UserStart {
        /// Start of the function's heap.
        pub heap_start: u64,
        /// Length of the function's heap in bytes.
        pub heap_len: u64,
        /// The buffer the kernel writes each request into ([`MAX_PAYLOAD`] bytes).
        pub request_buf: u64,
        /// Length of `request_buf`.
        pub request_buf_len: u64,
    }

    /// Where a function's pieces lie in user memory, computed from its (validated) header
    /// and the end of RAM:
    ///
    /// ```text
    /// USER_START   stack (STACK_SIZE, grows down; UserStart at its top)
    /// IMAGE_START  the function's ELF: header, code, data, bss ... image_end
    /// request_buf  MAX_PAYLOAD bytes (page-aligned after image_end)
    /// heap_start   the heap, up to user_end
    /// user_end     end of RAM rounded down to USER_PAGE_SIZE
    /// ```
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Layout {
        /// The function's entry point.
        pub entry: u64,
        /// First byte after the function's image.
        pub image_end: u64,
        /// The request buffer ([`MAX_PAYLOAD`] bytes).
        pub request_buf: u64,
        /// Start of the heap; it runs to `user_end`.
        pub heap_start: u64,
        /// End of user memory.
        pub user_end: u64,
    }

    /// Why a function image cannot run.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum LayoutError {
        /// The entry point is not inside the image.
        BadEntry(u64),
        /// `image_end` is not after the header, or beyond the memory the kernel can map.
        BadImageEnd(u64),
        /// RAM ends (at the given address) before the image, request buffer and
        /// [`MIN_HEAP`] fit; `needed` is the smallest RAM end that works.
        MemoryTooSmall {
            /// End of RAM (after rounding down to [`USER_PAGE_SIZE`]).
            user_end: u64,
            /// The smallest RAM end this function runs with.
            needed: u64,
        },
    }

    impl Layout {
        /// Checks `header` against user memory ending at `mem_end` (the end of the RAM
        /// region that holds [`USER_START`]) and lays the function out. Never panics.
        pub fn new(header: &UserHeader, mem_end: u64) -> Result<Self, LayoutError> {
            let image_end = header.image_end;
            if image_end < IMAGE_START + HEADER_LEN as u64 || image_end > IDENTITY_MAP_END {
                return Err(LayoutError::BadImageEnd(image_end));
            }
            if header.entry < IMAGE_START + HEADER_LEN as u64 || header.entry >= image_end {
                return Err(LayoutError::BadEntry(header.entry));
            }
            // No overflow: image_end <= IDENTITY_MAP_END, far below u64::MAX.
            let request_buf = image_end.next_multiple_of(PAGE_SIZE);
            let heap_start = request_buf + MAX_PAYLOAD as u64;
            let needed = (heap_start + MIN_HEAP).next_multiple_of(USER_PAGE_SIZE);
            let user_end = mem_end.min(IDENTITY_MAP_END) / USER_PAGE_SIZE * USER_PAGE_SIZE;
            if user_end < needed {
                return Err(LayoutError::MemoryTooSmall { user_end, needed });
            }
            Ok(Layout {
                entry: header.entry,
                image_end,
                request_buf,
                heap_start,
                user_end,
            })
        }

        /// The [`UserStart`] the kernel writes at [`START_ADDR`].
        pub fn start(&self) -> UserStart {
            UserStart {
                heap_start: self.heap_start,
                heap_len: self.user_end - self.heap_start,
                request_buf: self.request_buf,
                request_buf_len: MAX_PAYLOAD as u64,
            }
        }

        /// Whether `[ptr, ptr + len)` lies in user memory (a system call argument check).
        pub fn contains(&self, ptr: u64, len: u64) -> bool {
            in_user_memory(self.user_end, ptr, len)
        }
    }

    /// Whether `[ptr, ptr + len)` lies in `[USER_START, user_end)`, without overflow.
    pub const fn in_user_memory(user_end: u64, ptr: u64, len: u64) -> bool {
        ptr >= USER_START && ptr <= user_end && len <= user_end - ptr
    }

    impl core::fmt::Display for LayoutError {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            const MIB: u64 = 1 << 20;
            match self {
                LayoutError::BadEntry(e) => {
                    write!(f, "function entry point {e:#x} lies outside its image")
                }
                LayoutError::BadImageEnd(e) => write!(
                    f,
                    "function image end {e:#x} is outside [{:#x}, {IDENTITY_MAP_END:#x}]",
                    IMAGE_START + HEADER_LEN as u64
                ),
                LayoutError::MemoryTooSmall { user_end, needed } => write!(
                    f,
                    "guest memory ends at {} MiB but this function needs at least {} MiB \
                     (image, {} MiB request buffer and {} MiB heap): give the VM more memory",
                    user_end / MIB,
                    needed.div_ceil(MIB),
                    MAX_PAYLOAD as u64 / MIB,
                    MIN_HEAP / MIB
                ),
            }
        }
    }

    /// System call numbers and conventions.
    ///
    /// User code enters the kernel with `syscall`: number in `rax`, arguments in `rdi`,
    /// `rsi`, `rdx`, result in `rax`. The kernel returns with `iretq` (not `sysretq`, which
    /// some hosts cannot run) and preserves `rbx`, `rbp`, `rsp` and `r12`-`r15`; it zeroes
    /// `rcx`, `rdx`, `rsi`, `rdi` and `r8`-`r11` and leaves `rflags` at `0x2`. User code
    /// runs with interrupts off (nothing preempts it); the kernel never touches the x87/SSE
    /// state, so user code may use SSE freely.
    ///
    /// At the entry point: `rdi` = [`START_ADDR`], `rsp` =
    /// [`ENTRY_RSP`], `rflags` = `0x2`.
    pub mod sys {
        /// `next(kind, ptr, len) -> request_len`: deliver the previous invocation's result
        /// (`kind` = [`RESULT_NONE`] on the first call, after `init`; else
        /// `frame::KIND_RESPONSE` or `frame::KIND_ERROR` with the bytes at `ptr..ptr+len`),
        /// then wait for the next request, written to `UserStart::request_buf`. The one
        /// system call per invocation. It does not fail: a result outside user memory or
        /// longer than `frame::MAX_PAYLOAD` reaches the host as an error frame instead.
        pub const NEXT: u64 = 1;
        /// `log(ptr, len)`: write UTF-8 text to the serial console.
        pub const LOG: u64 = 2;
        /// `random(ptr, len)`: fill `ptr..ptr+len` with random bytes (at most
        /// [`RANDOM_MAX`] per call): the CPU's hardware generator (where it has one) mixed
        /// with a stream keyed by the seed the VMM writes before every restored or reset run
        /// ([`crate::abi::entropy`]), so that VMs restored from one snapshot never share
        /// random numbers. Returns `len`, or [`EINVAL`] (neither source available).
        pub const RANDOM: u64 = 3;
        /// `panic(ptr, len) -> !`: the function panicked with this message; the kernel sends
        /// it to the host as an error and the VM is not used again.
        pub const PANIC: u64 = 4;
        /// `kind` for the first `NEXT`: there is no result yet (init has just finished).
        pub const RESULT_NONE: u64 = 0;
        /// Largest `random` request.
        pub const RANDOM_MAX: u64 = 4096;
        /// Returned in `rax` for a bad call (unknown number, pointer outside user memory,
        /// no random source).
        pub const EINVAL: u64 = u64::MAX;
    }
}

/// The banner the guest kernel prints first: `fnode guest-kernel <version>`.
pub const BANNER_PREFIX: &str = "fnode guest-kernel ";

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{string::ToString, vec::Vec};

    use super::*;

    #[test]
    fn fault_report_decode_round_trip() {
        let r = fault::FaultReport {
            magic: fault::MAGIC,
            vector: 14,
            error_code: 2,
            rip: 0x10_2345,
            cr2: 0x4000_1000,
            rsp: 0x1f_0000,
            cs: 8,
        };
        let mut b = [0u8; fault::REPORT_LEN];
        let words = [r.magic, r.vector, r.error_code, r.rip, r.cr2, r.rsp, r.cs];
        for (i, w) in words.iter().enumerate() {
            b[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(fault::FaultReport::decode(&b), Some(r));
        assert_eq!(r.mnemonic(), "#PF");
        b[0] ^= 1;
        assert_eq!(fault::FaultReport::decode(&b), None);
    }

    #[test]
    fn cmdline_get() {
        assert_eq!(cmdline::get("console=x fault=ud2", "fault"), Some("ud2"));
        assert_eq!(cmdline::get("faulty=1", "fault"), None);
        assert_eq!(cmdline::get("", "fault"), None);
    }

    #[test]
    fn frame_header_round_trip_and_rejects() {
        let h = frame::Header {
            kind: frame::KIND_REQUEST,
            id: 0x1122_3344_5566_7788,
            len: 42,
        };
        let b = h.encode();
        assert_eq!(frame::Header::decode(&b), Ok(h));
        assert_eq!(frame::Header::raw_id(&b), h.id);
        let mut bad = b;
        bad[0] ^= 0xff;
        assert!(matches!(
            frame::Header::decode(&bad),
            Err(frame::HeaderError::BadMagic(_))
        ));
        let mut bad = b;
        bad[6] = 9;
        assert_eq!(
            frame::Header::decode(&bad),
            Err(frame::HeaderError::BadKind(9))
        );
        let long = frame::Header {
            len: frame::MAX_PAYLOAD as u32 + 1,
            ..h
        }
        .encode();
        assert!(matches!(
            frame::Header::decode(&long),
            Err(frame::HeaderError::TooLong(_))
        ));
    }

    #[test]
    fn virtio_device_words_parse() {
        use virtio::{DeviceParseError as E, MmioDevice};
        let d = |size, addr, irq| MmioDevice { size, addr, irq };
        assert_eq!(
            MmioDevice::parse("4K@0xd0000000:5"),
            Ok(d(0x1000, 0xd000_0000, 5))
        );
        assert_eq!(
            MmioDevice::parse("0x1000@0xD0001000:6"),
            Ok(d(0x1000, 0xd000_1000, 6))
        );
        assert_eq!(
            MmioDevice::parse("4096@3489660928:0x7"),
            Ok(d(4096, 0xd000_0000, 7))
        );
        assert_eq!(MmioDevice::parse("1m@0x0:12"), Ok(d(1 << 20, 0, 12)));
        assert_eq!(MmioDevice::parse("4K0xd0000000:5"), Err(E::MissingAt));
        assert_eq!(MmioDevice::parse("4K@0xd0000000"), Err(E::MissingIrq));
        assert_eq!(MmioDevice::parse("0@0xd0000000:5"), Err(E::BadSize));
        assert_eq!(MmioDevice::parse("K@0xd0000000:5"), Err(E::BadSize));
        assert_eq!(MmioDevice::parse("4X@0xd0000000:5"), Err(E::BadSize));
        assert_eq!(
            MmioDevice::parse("0xffffffffffffffffK@0:5"),
            Err(E::BadSize)
        );
        assert_eq!(MmioDevice::parse("4K@0x:5"), Err(E::BadAddr));
        assert_eq!(MmioDevice::parse("4K@-1:5"), Err(E::BadAddr));
        assert_eq!(MmioDevice::parse("4K@0xd0000000:5:0"), Err(E::BadIrq));
        assert_eq!(
            MmioDevice::parse("4K@0xd0000000:0x100000000"),
            Err(E::BadIrq)
        );
        assert_eq!(
            MmioDevice::parse("4K@0xfffffffffffff001:5"),
            Err(E::Overflow)
        );
        assert_eq!(MmioDevice::parse(""), Err(E::MissingAt));
    }

    #[test]
    fn virtio_devices_on_a_command_line() {
        let line = "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=x \
                    virtio_mmio.devicex=4K@0:1 virtio_mmio.device=0x1000@0xd0001000:6";
        let found: Vec<_> = virtio::devices(line).collect();
        assert_eq!(found.len(), 3);
        assert_eq!(found[0].0, "4K@0xd0000000:5");
        assert_eq!(found[1], ("x", Err(virtio::DeviceParseError::MissingAt)));
        let dev = found[2].1.unwrap();
        assert_eq!((dev.addr, dev.irq), (0xd000_1000, 6));
        // Display writes what parse reads back.
        let text = dev.to_string();
        assert_eq!(virtio::MmioDevice::parse(&text), Ok(dev));
        let msg = virtio::DeviceParseError::BadIrq.to_string();
        assert!(msg.contains("<size>@<addr>:<irq>"), "{msg}");
    }

    #[test]
    fn entropy_seed_round_trip_and_stream() {
        let s = entropy::Seed {
            magic: entropy::MAGIC,
            generation: 7,
            seed: [1, 2, 3, 4],
        };
        assert_eq!(entropy::Seed::decode(&s.encode()), Some(s));
        let mut bad = s.encode();
        bad[0] ^= 1;
        assert_eq!(entropy::Seed::decode(&bad), None);
        // Another generation, call or word gives another value.
        let other = entropy::Seed { generation: 8, ..s };
        assert_ne!(s.word(0, 0), other.word(0, 0));
        assert_ne!(s.word(0, 0), s.word(1, 0));
        assert_ne!(s.word(0, 0), s.word(0, 1));
        // The seed page is boot data below the kernel, clear of the other boot data.
        const {
            assert!(entropy::ADDR >= layout::REPORT_ADDR + layout::PAGE_SIZE);
            assert!(entropy::ADDR + entropy::LEN as u64 <= layout::CMDLINE_ADDR);
        }
    }

    #[test]
    fn qemu_exit_codes() {
        assert_eq!(exit::qemu_exit_code(exit::SUCCESS), 33);
        assert_eq!(exit::qemu_exit_code(exit::FAULT), 37);
    }

    #[test]
    fn control_port_is_clear_of_the_exit_port() {
        let exit_ports = exit::PORT..exit::PORT + 4;
        let control_ports = control::PORT..control::PORT + control::LEN;
        assert!(control_ports.start >= exit_ports.end || control_ports.end <= exit_ports.start);
        assert_eq!(&control::READY.to_le_bytes(), b"REDY");
        assert_eq!(&control::DONE.to_le_bytes(), b"DONE");
        let messages = [control::READY, control::BOOTED, control::DONE];
        for (i, a) in messages.iter().enumerate() {
            assert!(messages[i + 1..].iter().all(|b| a != b), "{a:#x} twice");
            // None of them is an exit status a guest could mean on the exit port.
            assert!(![exit::SUCCESS, exit::FAILURE, exit::FAULT].contains(a));
        }
    }

    mod user_layout {
        use crate::abi::frame::MAX_PAYLOAD;
        use crate::abi::layout::IDENTITY_MAP_END;
        use crate::abi::user::*;

        const MIB: u64 = 1 << 20;

        fn header(entry: u64, image_end: u64) -> UserHeader {
            UserHeader {
                magic: HEADER_MAGIC,
                entry,
                image_end,
            }
        }

        #[test]
        fn header_round_trip_and_magic() {
            let h = header(IMAGE_START + 0x1000, IMAGE_START + 0x5123);
            assert_eq!(UserHeader::decode(&h.encode()), Some(h));
            let mut b = h.encode();
            b[7] ^= 1;
            assert_eq!(UserHeader::decode(&b), None);
            assert_eq!(UserHeader::decode(&[0; HEADER_LEN]), None);
        }

        #[test]
        fn layout_of_a_small_function() {
            let l =
                Layout::new(&header(IMAGE_START + 0x100, IMAGE_START + 0x5123), 64 * MIB).unwrap();
            assert_eq!(l.request_buf, IMAGE_START + 0x6000);
            assert_eq!(l.heap_start, l.request_buf + MAX_PAYLOAD as u64);
            assert_eq!(l.user_end, 64 * MIB);
            let s = l.start();
            assert_eq!(s.heap_start + s.heap_len, 64 * MIB);
            assert_eq!(s.request_buf_len, MAX_PAYLOAD as u64);
        }

        #[test]
        fn layout_rejects_bad_headers() {
            assert_eq!(
                Layout::new(&header(IMAGE_START, IMAGE_START + 0x1000), 64 * MIB),
                Err(LayoutError::BadEntry(IMAGE_START))
            );
            assert_eq!(
                Layout::new(
                    &header(IMAGE_START + 0x1000, IMAGE_START + 0x1000),
                    64 * MIB
                ),
                Err(LayoutError::BadEntry(IMAGE_START + 0x1000))
            );
            assert_eq!(
                Layout::new(&header(IMAGE_START + 0x100, 8), 64 * MIB),
                Err(LayoutError::BadImageEnd(8))
            );
            assert_eq!(
                Layout::new(&header(IMAGE_START + 0x100, u64::MAX), 64 * MIB),
                Err(LayoutError::BadImageEnd(u64::MAX))
            );
            assert_eq!(
                Layout::new(&header(0, IMAGE_START + 0x1000), 64 * MIB),
                Err(LayoutError::BadEntry(0))
            );
        }

        #[test]
        fn layout_needs_memory() {
            let h = header(IMAGE_START + 0x100, IMAGE_START + 0x1000);
            let needed = (IMAGE_START + 0x1000 + MAX_PAYLOAD as u64 + MIN_HEAP)
                .next_multiple_of(USER_PAGE_SIZE);
            assert_eq!(
                Layout::new(&h, needed - 1),
                Err(LayoutError::MemoryTooSmall {
                    user_end: needed - USER_PAGE_SIZE,
                    needed
                })
            );
            let l = Layout::new(&h, needed).unwrap();
            assert_eq!(l.user_end, needed);
            // An unaligned RAM end is rounded down; more than the identity map is capped.
            assert_eq!(Layout::new(&h, 65 * MIB).unwrap().user_end, 64 * MIB);
            assert_eq!(
                Layout::new(&h, u64::MAX).unwrap().user_end,
                IDENTITY_MAP_END
            );
        }

        #[test]
        fn contains_checks_bounds_without_overflow() {
            let h = header(IMAGE_START + 0x100, IMAGE_START + 0x1000);
            let l = Layout::new(&h, 64 * MIB).unwrap();
            assert!(l.contains(USER_START, 0));
            assert!(l.contains(USER_START, 64 * MIB - USER_START));
            assert!(!l.contains(USER_START, 64 * MIB - USER_START + 1));
            assert!(!l.contains(USER_START - 1, 1));
            assert!(l.contains(64 * MIB, 0));
            assert!(!l.contains(64 * MIB, 1));
            assert!(!l.contains(u64::MAX, 2));
            assert!(!l.contains(USER_START + 8, u64::MAX));
        }
    }
}
