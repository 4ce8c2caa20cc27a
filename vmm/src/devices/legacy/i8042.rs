//! i8042 PS/2 controller, just enough for Linux: a guest reset (0xFE to port 0x64) ends the VM,
//! and the host can inject Ctrl+Alt+Del so the guest shuts itself down.

use std::collections::VecDeque;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::devices::IrqLine;
use crate::exit::{ExitReason, VmExit};
use crate::vstate::bus::BusDevice;

/// Ports 0x60 (data) to 0x64 (status/command).
pub const I8042_PORT: u64 = 0x60;
/// The window covers 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;
/// Keyboard interrupt line.
pub const I8042_KBD_IRQ: u32 = 1;

const OFFSET_DATA: u64 = 0;
const OFFSET_COMMAND: u64 = 4;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_PULSE_RESET: u8 = 0xfe;

const STATUS_OUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_CMD_DATA: u8 = 0x08;
const STATUS_KBD_ENABLED: u8 = 0x10;

const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;

const KBD_ACK: u8 = 0xfa;
/// Scancode set 2 make and break codes for Ctrl, Alt and Del.
const CTRL_ALT_DEL: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14,
];
const BUFFER_SIZE: usize = 16;

/// The controller's registers and output buffer, as a snapshot keeps them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct I8042State {
    status: u8,
    control: u8,
    outp: u8,
    pending_cmd: Option<u8>,
    buffer: VecDeque<u8>,
}

impl Default for I8042State {
    fn default() -> Self {
        I8042State {
            status: STATUS_SYSTEM_FLAG | STATUS_KBD_ENABLED,
            control: CTR_KBD_INT | CTR_SYSTEM_FLAG,
            outp: 0,
            pending_cmd: None,
            buffer: VecDeque::with_capacity(BUFFER_SIZE),
        }
    }
}

/// The emulated controller on the port-I/O bus.
pub struct I8042 {
    exit: Arc<VmExit>,
    kbd_irq: IrqLine,
    state: I8042State,
}

impl I8042 {
    /// A controller that ends the VM (a guest reset, exit status 0) when the guest pulses the
    /// reset line; the vCPU that pulsed it does not enter the guest again.
    pub fn new(exit: Arc<VmExit>, kbd_irq: IrqLine) -> Self {
        Self::from_state(exit, kbd_irq, I8042State::default())
    }

    /// A controller continuing from a snapshot's `state` (an over-long buffer is cut).
    pub fn from_state(exit: Arc<VmExit>, kbd_irq: IrqLine, mut state: I8042State) -> Self {
        state.buffer.truncate(BUFFER_SIZE);
        I8042 {
            exit,
            kbd_irq,
            state,
        }
    }

    /// The registers and buffer, for a snapshot.
    pub fn state(&self) -> I8042State {
        self.state.clone()
    }

    fn push(&mut self, byte: u8) {
        if self.state.buffer.len() < BUFFER_SIZE {
            self.state.buffer.push_back(byte);
            self.state.status |= STATUS_OUT_FULL;
        }
    }

    fn raise_kbd_irq(&self) {
        if self.state.control & CTR_KBD_INT != 0 {
            // The guest simply misses the key press if the eventfd is full.
            let _ = self.kbd_irq.trigger();
        }
    }

    /// Presses Ctrl+Alt+Del on the guest's keyboard (Firecracker's SendCtrlAltDel).
    pub fn send_ctrl_alt_del(&mut self) {
        for byte in CTRL_ALT_DEL {
            self.push(byte);
        }
        self.raise_kbd_irq();
    }

    fn command(&mut self, cmd: u8) {
        self.state.status |= STATUS_CMD_DATA;
        match cmd {
            CMD_READ_CTR => self.push(self.state.control),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.state.pending_cmd = Some(cmd),
            CMD_READ_OUTP => self.push(self.state.outp),
            CMD_PULSE_RESET => self.exit.request(ExitReason::GuestReset),
            _ => {}
        }
    }

    fn data(&mut self, value: u8) {
        self.state.status &= !STATUS_CMD_DATA;
        match self.state.pending_cmd.take() {
            Some(CMD_WRITE_CTR) => self.state.control = value,
            Some(CMD_WRITE_OUTP) => self.state.outp = value,
            _ => {
                // A keyboard command: acknowledge it.
                self.push(KBD_ACK);
                self.raise_kbd_irq();
            }
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(byte) = data.first_mut() else { return };
        *byte = match offset {
            OFFSET_DATA => {
                let value = self.state.buffer.pop_front().unwrap_or(0);
                if self.state.buffer.is_empty() {
                    self.state.status &= !STATUS_OUT_FULL;
                } else {
                    self.raise_kbd_irq();
                }
                value
            }
            OFFSET_COMMAND => self.state.status,
            _ => 0xff,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data.first()) {
            (OFFSET_COMMAND, Some(cmd)) => self.command(*cmd),
            (OFFSET_DATA, Some(value)) => self.data(*value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device() -> (I8042, Arc<VmExit>) {
        let exit = Arc::new(VmExit::new().unwrap());
        let dev = I8042::new(exit.clone(), IrqLine::new(I8042_KBD_IRQ).unwrap());
        (dev, exit)
    }

    #[test]
    fn reset_pulse_ends_the_vm() {
        let (mut dev, exit) = device();
        assert!(!exit.is_requested(), "nothing yet");
        dev.write(OFFSET_COMMAND, &[CMD_PULSE_RESET]);
        assert!(exit.is_requested());
        assert!(matches!(exit.reason(), Some(ExitReason::GuestReset)));
        assert_eq!(exit.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn control_register_round_trip_and_ctrl_alt_del() {
        let (mut dev, _reset) = device();
        dev.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        dev.write(OFFSET_DATA, &[0x45]);
        dev.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        let mut b = [0u8];
        dev.read(OFFSET_COMMAND, &mut b);
        assert_ne!(b[0] & STATUS_OUT_FULL, 0);
        dev.read(OFFSET_DATA, &mut b);
        assert_eq!(b[0], 0x45);
        dev.send_ctrl_alt_del();
        let mut codes = Vec::new();
        loop {
            dev.read(OFFSET_COMMAND, &mut b);
            if b[0] & STATUS_OUT_FULL == 0 {
                break;
            }
            dev.read(OFFSET_DATA, &mut b);
            codes.push(b[0]);
        }
        assert_eq!(codes, CTRL_ALT_DEL);
    }
}
