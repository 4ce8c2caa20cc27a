//! A persistent tap device with an IPv4 address, for micro-VM network tests. Busybox `ip` has
//! no `tuntap`, so the device is made with the tun driver's ioctls (`mvm_sys::tap`); the VMM
//! then opens it by name. Dropping the [`Tap`] removes the device.

use std::process::Command;

/// Why a tap could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// A tun ioctl or open failed.
    #[error("{0} (needs root or CAP_NET_ADMIN and the tun module)")]
    Tun(#[from] mvm_sys::Error),
    /// `ip` failed to configure the device.
    #[error("`ip {args}` failed: {detail}")]
    Ip {
        /// The arguments.
        args: String,
        /// Exit status and stderr, or the spawn error.
        detail: String,
    },
}

/// A persistent tap, up, with an address; removed on drop.
pub struct Tap {
    name: String,
}

fn ip(args: &[&str]) -> Result<(), TapError> {
    let joined = args.join(" ");
    match Command::new("ip").args(args).output() {
        Ok(out) if out.status.success() => Ok(()),
        Ok(out) => Err(TapError::Ip {
            args: joined,
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        }),
        Err(e) => Err(TapError::Ip {
            args: joined,
            detail: e.to_string(),
        }),
    }
}

impl Tap {
    /// Creates tap `name` with address `cidr` (e.g. `10.0.0.1/30`) and brings it up.
    /// A leftover persistent tap of the same name (from an aborted run) is removed first.
    pub fn create(name: &str, cidr: &str) -> Result<Self, TapError> {
        if Self::exists(name) {
            mvm_sys::tap::remove_persistent(name)?;
        }
        mvm_sys::tap::create_persistent(name, None)?;
        let tap = Tap {
            name: name.to_string(),
        };
        ip(&["addr", "add", cidr, "dev", name])?;
        ip(&["link", "set", name, "up"])?;
        Ok(tap)
    }

    /// Whether a network interface of this name exists.
    pub fn exists(name: &str) -> bool {
        std::path::Path::new("/sys/class/net").join(name).exists()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        if let Err(e) = mvm_sys::tap::remove_persistent(&self.name) {
            eprintln!("nested: cannot remove tap {}: {e}", self.name);
        }
    }
}
