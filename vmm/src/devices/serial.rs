//! The guest's serial console: a 16550A UART (vm-superio) at `abi::serial::COM1_PORT`.
//!
//! Output goes to any [`Write`] (stdout, a file, a [`SharedBuffer`] in tests) through a
//! [`ConsoleWriter`] that hands complete lines to it: the UART flushes after every byte,
//! and one `write(2)` per byte would cost more than the guest's exit for it. Interrupts go to
//! `abi::serial::COM1_IRQ` through an eventfd the VM registers as an irqfd.

use std::io::{self, Write};
use std::sync::{Arc, Mutex, PoisonError};

use fnode_snapshot::Persist;
use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState as UartState};
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bus::BusDevice;

/// Most bytes the console holds before writing them out without a newline.
const CONSOLE_BUFFER: usize = 4096;

/// Errors creating the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The interrupt eventfd could not be created.
    #[error("cannot create the serial interrupt eventfd")]
    EventFd(#[source] io::Error),
    /// A saved state holds more received bytes than the UART's FIFO.
    #[error(
        "saved serial state holds {len} received bytes, more than the UART's {UART_FIFO}-byte FIFO"
    )]
    FifoOverflow {
        /// Bytes in the saved FIFO.
        len: usize,
    },
    /// The restored UART could not raise its pending interrupt.
    #[error("cannot raise the restored UART's interrupt")]
    Restore(#[source] vm_superio::serial::Error<io::Error>),
}

/// The 16550A receive FIFO's size (vm-superio refuses a restored state holding more).
const UART_FIFO: usize = 64;

/// Raises the UART's interrupt by writing its eventfd (an irqfd in the VM).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Buffers console output and writes it out a line at a time.
pub struct ConsoleWriter {
    out: Box<dyn Write + Send>,
    buf: Vec<u8>,
    /// Bytes the output refused (a closed pipe, a full disk); the guest never blocks on them.
    lost: u64,
}

impl std::fmt::Debug for ConsoleWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleWriter")
            .field("buffered", &self.buf.len())
            .field("lost", &self.lost)
            .finish()
    }
}

impl ConsoleWriter {
    /// A console writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        ConsoleWriter {
            out,
            buf: Vec::with_capacity(256),
            lost: 0,
        }
    }

    /// Writes out everything buffered, newline or not.
    pub fn flush_all(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if self
            .out
            .write_all(&self.buf)
            .and_then(|_| self.out.flush())
            .is_err()
        {
            self.lost += self.buf.len() as u64;
        }
        self.buf.clear();
    }

    /// Bytes lost because the output failed.
    pub fn lost(&self) -> u64 {
        self.lost
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    /// Called by the UART after every byte: writes out only at a line end or a full buffer.
    fn flush(&mut self) -> io::Result<()> {
        if self.buf.last() == Some(&b'\n') || self.buf.len() >= CONSOLE_BUFFER {
            self.flush_all();
        }
        Ok(())
    }
}

/// The COM1 UART on the PIO bus.
pub struct SerialDevice {
    uart: Serial<EventFdTrigger, NoEvents, ConsoleWriter>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("console", self.uart.writer())
            .finish()
    }
}

impl SerialDevice {
    /// A UART whose output goes to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Result<Self, SerialError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        Ok(SerialDevice {
            uart: Serial::new(EventFdTrigger(evt), ConsoleWriter::new(out)),
        })
    }

    /// The eventfd that raises the UART's interrupt (register it as an irqfd).
    pub fn interrupt_evt(&self) -> &EventFd {
        &self.uart.interrupt_evt().0
    }

    /// Writes out any buffered console output.
    pub fn flush(&mut self) {
        self.uart.writer_mut().flush_all();
    }

    /// Console bytes lost because the output failed.
    pub fn lost_bytes(&self) -> u64 {
        self.uart.writer().lost()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(offset), [byte]) if u16::from(offset) < fnode_guest::abi::serial::COM1_LEN => {
                *byte = self.uart.read(offset);
            }
            (_, data) => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [byte]) = (u8::try_from(offset), data) {
            if u16::from(offset) < fnode_guest::abi::serial::COM1_LEN {
                // An output error is counted by the console writer; an interrupt eventfd
                // error (its counter overflowing) is not something the guest can act on.
                let _ = self.uart.write(offset, *byte);
            }
        }
    }
}

/// The UART's registers and receive FIFO as a snapshot keeps them (vm-superio's
/// `SerialState`, which is not serde data). Console output still buffered is not state: it
/// is written out before the snapshot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable register.
    pub interrupt_enable: u8,
    /// Interrupt identification register.
    pub interrupt_identification: u8,
    /// Line control register.
    pub line_control: u8,
    /// Line status register.
    pub line_status: u8,
    /// Modem control register.
    pub modem_control: u8,
    /// Modem status register.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

impl Persist<'_> for SerialDevice {
    type State = SerialState;
    type ConstructorArgs = Box<dyn Write + Send>;
    type Error = SerialError;

    fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in `state` whose output goes to `out`, with a new interrupt eventfd (register
    /// it as an irqfd). A pending interrupt is raised on the eventfd again.
    fn restore(out: Box<dyn Write + Send>, state: &SerialState) -> Result<Self, SerialError> {
        if state.in_buffer.len() > UART_FIFO {
            return Err(SerialError::FifoOverflow {
                len: state.in_buffer.len(),
            });
        }
        let evt = EventFd::new(EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let uart_state = UartState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(
            &uart_state,
            EventFdTrigger(evt),
            NoEvents,
            ConsoleWriter::new(out),
        )
        .map_err(SerialError::Restore)?;
        Ok(SerialDevice { uart })
    }
}

/// A cloneable in-memory console output, for tests and callers that capture the console.
#[derive(Clone, Debug, Default)]
pub struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl SharedBuffer {
    /// An empty buffer.
    pub fn new() -> Self {
        SharedBuffer::default()
    }

    /// A copy of everything written so far.
    pub fn contents(&self) -> Vec<u8> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Everything written so far, as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.contents()).into_owned()
    }
}

impl Write for SharedBuffer {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Offsets of the 16550 registers used here.
    const DATA: u64 = 0;
    const LSR: u64 = 5;

    #[test]
    fn output_is_written_a_line_at_a_time() {
        let buf = SharedBuffer::new();
        let mut dev = SerialDevice::new(Box::new(buf.clone())).unwrap();
        for &b in b"hi" {
            dev.write(DATA, &[b]);
        }
        assert_eq!(buf.contents(), b"");
        dev.write(DATA, b"\n");
        assert_eq!(buf.text(), "hi\n");
        dev.write(DATA, b"x");
        dev.flush();
        assert_eq!(buf.text(), "hi\nx");
    }

    #[test]
    fn transmitter_reports_empty() {
        let mut dev = SerialDevice::new(Box::new(io::sink())).unwrap();
        let mut lsr = [0u8];
        dev.read(LSR, &mut lsr);
        // THR empty (bit 5) and transmitter empty (bit 6): the guest may send at once.
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn odd_accesses_are_harmless() {
        let buf = SharedBuffer::new();
        let mut dev = SerialDevice::new(Box::new(buf.clone())).unwrap();
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        let mut b = [0u8];
        dev.read(8, &mut b);
        assert_eq!(b, [0xff]);
        dev.read(u64::MAX, &mut b);
        dev.write(DATA, b"ab");
        dev.write(300, b"a");
        dev.write(u64::MAX, b"a");
        dev.flush();
        assert_eq!(buf.contents(), b"");
    }

    #[test]
    fn persist_round_trip() {
        let mut dev = SerialDevice::new(Box::new(io::sink())).unwrap();
        // Line control, scratch and interrupt enable: state a guest driver sets.
        dev.write(3, &[0x03]);
        dev.write(7, &[0x5a]);
        dev.write(1, &[0x01]);
        let state = dev.save();
        assert_eq!((state.line_control, state.scratch), (0x03, 0x5a));
        let buf = SharedBuffer::new();
        let mut restored = SerialDevice::restore(Box::new(buf.clone()), &state).unwrap();
        assert_eq!(restored.save(), state);
        let mut scratch = [0u8];
        restored.read(7, &mut scratch);
        assert_eq!(scratch, [0x5a]);
        restored.write(DATA, b"\n");
        assert_eq!(buf.text(), "\n");
    }

    #[test]
    fn a_restored_fifo_is_capped() {
        let state = SerialState {
            in_buffer: vec![0; UART_FIFO + 1],
            ..SerialDevice::new(Box::new(io::sink())).unwrap().save()
        };
        let err = SerialDevice::restore(Box::new(io::sink()), &state).unwrap_err();
        assert!(
            matches!(err, SerialError::FifoOverflow { len: 65 }),
            "{err:?}"
        );
    }

    #[test]
    fn a_failing_output_loses_bytes_without_blocking() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut dev = SerialDevice::new(Box::new(Broken)).unwrap();
        dev.write(DATA, b"a");
        dev.write(DATA, b"\n");
        assert_eq!(dev.lost_bytes(), 2);
    }
}
