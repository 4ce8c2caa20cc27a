//! Address-range buses: one for port I/O, one for MMIO.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reachable through a bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    /// Guest reads `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Guest writes `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors while placing a device on a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The range is empty or overlaps an existing device.
    #[error("bus range {base:#x}+{len:#x} is empty or overlaps another device")]
    Overlap {
        /// Base address.
        base: u64,
        /// Length in bytes.
        len: u64,
    },
}

/// A shared, lockable bus device.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Routes addresses to devices. Built before the vCPUs start, then shared read-only.
#[derive(Default)]
pub struct Bus {
    /// Devices keyed by base address, with their length.
    devices: BTreeMap<u64, (u64, SharedDevice)>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0);
        let overlaps = |end: u64| {
            self.devices
                .range(..end)
                .next_back()
                .is_some_and(|(b, (l, _))| b + l > base)
        };
        match end {
            Some(end) if !overlaps(end) => {
                self.devices.insert(base, (len, device));
                Ok(())
            }
            _ => Err(BusError::Overlap { base, len }),
        }
    }

    fn resolve(&self, addr: u64, size: usize) -> Option<(u64, &SharedDevice)> {
        let (base, (len, device)) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset + size as u64 <= *len).then_some((offset, device))
    }

    /// Dispatches a guest read; false when nothing is mapped there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                lock(device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write; false when nothing is mapped there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, device)) => {
                lock(device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering it if a thread panicked while holding it (the device state is
/// still the best there is; the VMM must survive).
fn lock(device: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_refuses_overlaps() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Echo(10))), 0x100, 0x10)
            .unwrap();
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(0))), 0x108, 0x10)
            .is_err());
        assert!(bus
            .insert(Arc::new(Mutex::new(Echo(0))), 0xf8, 0x10)
            .is_err());
        assert!(bus.insert(Arc::new(Mutex::new(Echo(0))), 0x200, 0).is_err());
        bus.insert(Arc::new(Mutex::new(Echo(0))), 0x110, 0x10)
            .unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x102, &mut b));
        assert_eq!(b[0], 12);
        assert!(bus.write(0x100, &[50]));
        assert!(bus.read(0x100, &mut b));
        assert_eq!(b[0], 50);
        assert!(!bus.read(0x120, &mut b));
        let mut wide = [0u8; 4];
        assert!(
            !bus.read(0x10e, &mut wide),
            "access crossing the end is refused"
        );
    }
}
