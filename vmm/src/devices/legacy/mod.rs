//! Legacy PC devices: the 8250 UART (with its size-capped console sink) and the i8042 keyboard
//! controller.

pub mod console;
pub mod i8042;
pub mod serial;

pub use i8042::I8042;
pub use serial::SerialDevice;
