//! The host-wide state of `egress: all` and of ports published on addresses other hosts
//! reach: IPv4 forwarding (the setting from before the first such sandbox is kept and restored
//! by the last) and a table per sandbox (a masquerade chain for `egress: all`).

use std::net::Ipv4Addr;

use mvm_sys::flock;

use super::{tables, Addresses};
use crate::error::{Error, Result};
use crate::manager::host;

/// The host-wide nftables table that exists while any manager has a sandbox that needs the
/// host to forward (`egress: all`, or a port published on a non-loopback address): its
/// comment keeps the host's IPv4 forwarding setting from before the first one, and it drops
/// forwarding between sandbox veths. Each such sandbox has its own table named after it (see
/// [`egress_table`]), whose existence counts it.
const EGRESS_TABLE: &str = "mvm-egress";
/// The host's IPv4 forwarding switch.
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// The table of sandbox `id` while the host forwards for it (the masquerade of `egress: all`).
fn egress_table(id: &str) -> String {
    format!("{EGRESS_TABLE}-{id}")
}

/// An exclusive flock on the host's ip_forward sysctl file, held while the egress tables and
/// forwarding are changed: it serializes every mvm manager on the host (threads and
/// processes alike), as they share both. Released on drop.
struct ForwardingLock {
    _file: std::fs::File,
}

impl ForwardingLock {
    fn acquire() -> Result<Self> {
        let file = std::fs::File::open(IP_FORWARD)
            .map_err(|e| Error::host(format!("opening {IP_FORWARD}"), e))?;
        flock::lock(&file, flock::Kind::Exclusive)
            .map_err(|e| Error::host(format!("locking {IP_FORWARD}"), e))?;
        Ok(ForwardingLock { _file: file })
    }
}

fn read_ip_forward() -> Result<String> {
    let v = std::fs::read_to_string(IP_FORWARD)
        .map_err(|e| Error::host(format!("reading {IP_FORWARD}"), e))?;
    Ok(v.trim().to_owned())
}

fn write_ip_forward(value: &str) -> Result<()> {
    std::fs::write(IP_FORWARD, value)
        .map_err(|e| Error::host(format!("setting {IP_FORWARD} to {value}"), e))
}

/// The forwarding setting saved in the comment of [`EGRESS_TABLE`] (`nft list table` text).
pub(super) fn saved_ip_forward(listing: &str) -> Option<&str> {
    listing
        .lines()
        .find_map(|l| l.trim().strip_prefix("comment \"ip_forward="))
        .and_then(|v| v.strip_suffix('"'))
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
}

/// The nft batch that makes the host forward for sandbox `id`, with `chains` in its table.
/// Adding [`EGRESS_TABLE`] again keeps the comment it got first, i.e. the setting from before
/// any sandbox needed forwarding.
fn forwarding_rules(id: &str, chains: &str, ip_forward: &str) -> String {
    let table = egress_table(id);
    format!(
        "add table ip {EGRESS_TABLE} {{ comment \"ip_forward={ip_forward}\"; }}
add chain ip {EGRESS_TABLE} forward {{ type filter hook forward priority 0; }}
flush chain ip {EGRESS_TABLE} forward
add rule ip {EGRESS_TABLE} forward iifname \"mv*\" oifname \"mv*\" drop
table ip {table} {{
{chains}}}
"
    )
}

/// The nft batch that turns `egress: all` on for sandbox `id` with addresses `a`.
pub(super) fn masquerade_rules(id: &str, a: &Addresses, ip_forward: &str) -> String {
    let slot = Ipv4Addr::from(u32::from(a.host) - 1);
    let chain = format!(
        "  chain postrouting {{ type nat hook postrouting priority 100;
    ip saddr {slot}/29 oifname != \"mv*\" masquerade
  }}
"
    );
    forwarding_rules(id, &chain, ip_forward)
}

/// Loads `batch` (made with the forwarding setting it finds) and turns forwarding on.
fn forward_with(batch: impl FnOnce(&str) -> String) -> Result<()> {
    let _lock = ForwardingLock::acquire()?;
    let before = read_ip_forward()?;
    host::run("nft", &["-f", "-"], Some(&batch(&before)))?;
    write_ip_forward("1")
}

/// Host forwarding plus a masquerade rule for sandbox `id`'s /29 (`egress: all`, or `allow`
/// to what it allows), loaded in one nft run after `first` (the sandbox's host guard): one
/// nft process less per create.
pub(super) fn enable_host_masquerade(id: &str, a: &Addresses, first: &str) -> Result<()> {
    forward_with(|before| format!("{first}{}", masquerade_rules(id, a, before)))
}

/// Host forwarding for the connections to sandbox `id`'s ports published on non-loopback
/// addresses (its table holds no chain of its own: its existence counts the sandbox).
pub(super) fn enable_inbound_forwarding(id: &str) -> Result<()> {
    forward_with(|before| forwarding_rules(id, "", before))
}

/// Undoes [`enable_host_masquerade`] and [`enable_inbound_forwarding`] for sandbox `id`
/// (nothing if it had neither); when no sandbox that needs forwarding is left on the host,
/// restores the forwarding setting from before the first one and removes [`EGRESS_TABLE`].
pub(super) fn disable_forwarding(id: &str) -> Result<()> {
    let ours = |tables: &[String]| {
        tables
            .iter()
            .any(|t| t == EGRESS_TABLE || t.starts_with(&format!("{EGRESS_TABLE}-")))
    };
    if !ours(&tables("ip")?) {
        return Ok(());
    }
    let _lock = ForwardingLock::acquire()?;
    let tables = tables("ip")?;
    let mine = egress_table(id);
    let mut batch = String::new();
    if tables.contains(&mine) {
        batch.push_str(&format!("delete table ip {mine}\n"));
    }
    let others = tables
        .iter()
        .any(|t| *t != mine && t.starts_with(&format!("{EGRESS_TABLE}-")));
    if !others && tables.iter().any(|t| t == EGRESS_TABLE) {
        let listing = host::run("nft", &["list", "table", "ip", EGRESS_TABLE], None)?;
        match saved_ip_forward(&listing) {
            Some(v) => write_ip_forward(v)?,
            None => tracing::warn!(
                "nft table {EGRESS_TABLE} has no saved ip_forward setting (made by an older \
                 mvm); leaving net.ipv4.ip_forward as it is"
            ),
        }
        batch.push_str(&format!("delete table ip {EGRESS_TABLE}\n"));
    }
    if !batch.is_empty() {
        host::run("nft", &["-f", "-"], Some(&batch))?;
    }
    Ok(())
}
