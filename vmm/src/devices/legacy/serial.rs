//! 8250 UART at COM1 (0x3f8, IRQ 4) on vm-superio, writing the guest console to stdout or a file
//! and feeding host input to the guest.

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::Serial;

use crate::devices::IrqLine;
use crate::vstate::bus::BusDevice;

/// COM1 base port.
pub const COM1_PORT: u64 = 0x3f8;
/// COM1 register window.
pub const COM1_PORT_LEN: u64 = 8;
/// COM1 interrupt line.
pub const COM1_IRQ: u32 = 4;

/// Where the guest console goes: every byte is written through at once so nothing is lost if
/// the VMM dies, and the console appears in real time.
pub type SerialOut = Box<dyn Write + Send>;

/// The emulated UART on the port-I/O bus.
pub struct SerialDevice {
    serial: Serial<IrqLine, NoEvents, SerialOut>,
}

/// The UART's registers and receive FIFO, as a snapshot keeps them (vm-superio's
/// `SerialState`, which has no serde).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UartState {
    registers: [u8; 9],
    in_buffer: Vec<u8>,
}

impl From<SerialState> for UartState {
    fn from(s: SerialState) -> Self {
        UartState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&UartState> for SerialState {
    fn from(s: &UartState) -> Self {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            s.registers;
        SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: s.in_buffer.clone(),
        }
    }
}

impl SerialDevice {
    /// A UART raising `irq` and writing to `out`.
    pub fn new(irq: IrqLine, out: SerialOut) -> Self {
        SerialDevice {
            serial: Serial::new(irq, out),
        }
    }

    /// A UART continuing from a snapshot's `state`; None when its FIFO holds more than fits.
    pub fn from_state(state: &UartState, irq: IrqLine, out: SerialOut) -> Option<Self> {
        Serial::from_state(&state.into(), irq, NoEvents, out)
            .ok()
            .map(|serial| SerialDevice { serial })
    }

    /// The registers and FIFO, for a snapshot.
    pub fn state(&self) -> UartState {
        self.serial.state().into()
    }

    /// Queues host input for the guest; returns how many bytes fitted in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.serial.fifo_capacity() == 0 {
            return 0;
        }
        self.serial.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    /// Free room in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            *byte = self.serial.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            // A failed host write (console closed) must not stop the guest.
            let _ = self.serial.write(offset, *byte);
            let _ = self.serial.writer_mut().flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guest_bytes_reach_the_host_and_input_reaches_the_guest() {
        let sink = Sink::default();
        let mut dev = SerialDevice::new(IrqLine::new(COM1_IRQ).unwrap(), Box::new(sink.clone()));
        for b in b"hi" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        assert_eq!(dev.enqueue_input(b"x"), 1);
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut rbr = [0u8];
        dev.read(0, &mut rbr);
        assert_eq!(rbr[0], b'x');
        // Accesses wider than a byte are ignored, not a crash.
        dev.write(0, &[1, 2]);
        dev.read(0, &mut [0u8; 4]);
    }

    #[test]
    fn state_carries_registers_and_pending_input() {
        let mut dev = SerialDevice::new(IrqLine::new(COM1_IRQ).unwrap(), Box::new(Sink::default()));
        dev.write(7, &[0x5a]); // scratch register
        dev.enqueue_input(b"ab");
        let state = dev.state();
        let mut copy = SerialDevice::from_state(
            &state,
            IrqLine::new(COM1_IRQ).unwrap(),
            Box::new(Sink::default()),
        )
        .unwrap();
        let mut b = [0u8];
        copy.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        copy.read(0, &mut b);
        assert_eq!(b[0], b'a');
        assert_eq!(copy.state().in_buffer, b"b");
    }
}
