//! The `mvm.*` parameters of the kernel command line (`/proc/cmdline`):
//! - `mvm.overlay=tmpfs` or `mvm.overlay=/dev/vdb`: the read-only root becomes the lower
//!   layer of an overlay whose upper layer is a tmpfs or that ext4 disk.
//! - `mvm.root=/dev/vdb`: the writable ext4 disk becomes the root instead (a container's
//!   own file system); excludes `mvm.overlay`.
//! - `mvm.hostname=NAME`
//! - `mvm.ip=ADDR/PREFIX[,GATEWAY]`: IPv4 configuration of `eth0`.
//! - `mvm.dns=ADDR`: the nameserver written to `/etc/resolv.conf` (the sandbox's resolver).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use super::error::InitError;
use super::net::IpConfig;
use super::root::OverlayUpper;

/// The `mvm.*` parameters of the kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelParams {
    /// `mvm.overlay`.
    pub overlay: Option<OverlayUpper>,
    /// `mvm.root`.
    pub root: Option<PathBuf>,
    /// `mvm.hostname`.
    pub hostname: Option<String>,
    /// `mvm.ip`.
    pub ip: Option<IpConfig>,
    /// `mvm.dns`.
    pub dns: Option<Ipv4Addr>,
}

/// Splits a kernel command line into parameters; double quotes group words (the kernel's
/// own rule), and are removed.
fn split_cmdline(cmdline: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    let mut started = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    params.push(std::mem::take(&mut current));
                    started = false;
                }
            }
            c => {
                current.push(c);
                started = true;
            }
        }
    }
    if started {
        params.push(current);
    }
    params
}

fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn parse_ip(value: &str) -> Result<IpConfig, String> {
    let (cidr, gateway) = match value.split_once(',') {
        Some((cidr, gw)) => (cidr, Some(gw)),
        None => (value, None),
    };
    let (addr, prefix) = cidr
        .split_once('/')
        .ok_or("expected ADDR/PREFIX[,GATEWAY]")?;
    let address: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
    let prefix_len: u8 = prefix
        .parse()
        .ok()
        .filter(|p| *p <= 32)
        .ok_or_else(|| format!("{prefix:?} is not a prefix length (0-32)"))?;
    let gateway = gateway
        .map(|gw| {
            gw.parse::<Ipv4Addr>()
                .map_err(|_| format!("{gw:?} is not an IPv4 gateway"))
        })
        .transpose()?;
    Ok(IpConfig {
        address,
        prefix_len,
        gateway,
    })
}

impl KernelParams {
    /// Parses the `mvm.*` parameters of `cmdline`; other parameters are ignored.
    pub fn parse(cmdline: &str) -> Result<Self, InitError> {
        let mut params = Self::default();
        for param in split_cmdline(cmdline) {
            let Some((key, value)) = param.split_once('=') else {
                continue;
            };
            let bad = |reason: String| InitError::BadParam {
                param: param.clone(),
                reason,
            };
            match key {
                "mvm.overlay" => {
                    params.overlay = Some(match value {
                        "tmpfs" => OverlayUpper::Tmpfs,
                        dev => OverlayUpper::Device(
                            device_path(dev)
                                .ok_or_else(|| bad("expected tmpfs or /dev/DEVICE".to_owned()))?,
                        ),
                    });
                }
                "mvm.root" => {
                    params.root = Some(
                        device_path(value).ok_or_else(|| bad("expected /dev/DEVICE".to_owned()))?,
                    );
                }
                "mvm.hostname" => {
                    if !valid_hostname(value) {
                        return Err(bad("not a valid host name".to_owned()));
                    }
                    params.hostname = Some(value.to_owned());
                }
                "mvm.ip" => params.ip = Some(parse_ip(value).map_err(bad)?),
                "mvm.dns" => {
                    params.dns = Some(
                        value
                            .parse()
                            .map_err(|_| bad("not an IPv4 address".to_owned()))?,
                    )
                }
                _ => {}
            }
        }
        if params.root.is_some() && params.overlay.is_some() {
            return Err(InitError::BadParam {
                param: "mvm.root".to_owned(),
                reason: "mvm.root and mvm.overlay exclude each other".to_owned(),
            });
        }
        Ok(params)
    }
}

/// `value` as a device path, when it names one under /dev.
fn device_path(value: &str) -> Option<PathBuf> {
    (value.starts_with("/dev/") && value.len() > 5).then(|| PathBuf::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mvm_parameters() {
        let params = KernelParams::parse(
            "console=ttyS0 reboot=k panic=1 root=/dev/vda ro mvm.overlay=/dev/vdb \
             mvm.hostname=sbx-1.local mvm.ip=10.0.0.2/30,10.0.0.1 mvm.dns=169.254.53.53 \
             init=/sbin/mvm-agent\n",
        )
        .unwrap();
        assert_eq!(
            params.overlay,
            Some(OverlayUpper::Device("/dev/vdb".into()))
        );
        assert_eq!(params.hostname.as_deref(), Some("sbx-1.local"));
        assert_eq!(params.dns, Some(Ipv4Addr::new(169, 254, 53, 53)));
        let ip = params.ip.unwrap();
        assert_eq!(ip.address, Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(ip.prefix_len, 30);
        assert_eq!(ip.netmask(), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(ip.gateway, Some(Ipv4Addr::new(10, 0, 0, 1)));
    }

    #[test]
    fn defaults_and_quotes() {
        assert_eq!(KernelParams::parse("").unwrap(), KernelParams::default());
        let params =
            KernelParams::parse("a=\"x y\" mvm.overlay=tmpfs \"mvm.ip=192.168.1.5/24\"").unwrap();
        assert_eq!(params.overlay, Some(OverlayUpper::Tmpfs));
        assert_eq!(params.root, None);
        assert_eq!(
            KernelParams::parse("mvm.root=/dev/vdb").unwrap().root,
            Some(PathBuf::from("/dev/vdb"))
        );
        let ip = params.ip.unwrap();
        assert_eq!(ip.gateway, None);
        assert_eq!(ip.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(split_cmdline(" a=\"x y\"  b "), ["a=x y", "b"]);
        let zero = IpConfig {
            address: Ipv4Addr::LOCALHOST,
            prefix_len: 0,
            gateway: None,
        };
        assert_eq!(zero.netmask(), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn rejects_malformed_parameters() {
        for bad in [
            "mvm.overlay=disk",
            "mvm.overlay=/dev/",
            "mvm.root=vdb",
            "mvm.root=/dev/vdb mvm.overlay=tmpfs",
            "mvm.hostname=",
            "mvm.hostname=-bad",
            "mvm.dns=x",
            "mvm.hostname=a_b",
            "mvm.ip=10.0.0.2",
            "mvm.ip=10.0.0.2/33",
            "mvm.ip=10.0.0/24",
            "mvm.ip=10.0.0.2/24,gw",
        ] {
            assert!(
                matches!(KernelParams::parse(bad), Err(InitError::BadParam { .. })),
                "{bad}"
            );
        }
    }
}
