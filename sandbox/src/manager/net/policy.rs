//! The entries of a sandbox's `network.allow` list: IPv4 addresses or CIDRs, DNS names and
//! wildcards (`*.pypi.org`), each optionally restricted to one port (`10.0.0.0/8:443`,
//! `api.example.com:443`). Addresses go into the nftables rules as they are; names are opened
//! by the sandbox's resolver ([`super::resolver`]), which puts the addresses it answers for them
//! into the namespace's sets for as long as their TTL.

use std::fmt;
use std::net::Ipv4Addr;

use crate::error::{Error, Result};

/// Most entries in one allow list.
pub const MAX_ALLOW: usize = 64;

/// What an allow entry names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An IPv4 network, normalized (`10.0.0.0/8`, `1.2.3.4/32`).
    Cidr(String),
    /// A DNS name, lowercase without the final dot.
    Name(String),
    /// Every name below this suffix (`*.pypi.org` → `pypi.org`; not `pypi.org` itself).
    Wildcard(String),
}

/// One parsed allow entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowEntry {
    /// The destination.
    pub target: Target,
    /// The only port (TCP and UDP) it is open on; every port when none.
    pub port: Option<u16>,
}

impl fmt::Display for AllowEntry {
    /// The normalized form, which [`AllowEntry::parse`] reads back.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            Target::Cidr(c) => f.write_str(c)?,
            Target::Name(n) => f.write_str(n)?,
            Target::Wildcard(s) => write!(f, "*.{s}")?,
        }
        match self.port {
            Some(p) => write!(f, ":{p}"),
            None => Ok(()),
        }
    }
}

fn invalid(s: &str, why: &str) -> Error {
    Error::Invalid(format!(
        "network.allow entry {s:?}: {why} (entries are an IPv4 address or CIDR like \
         10.0.0.0/8, a DNS name like api.example.com or a wildcard like *.pypi.org, each \
         optionally followed by :PORT)"
    ))
}

/// Whether `name` (lowercase, no final dot) is a valid DNS name for an allow entry: labels of
/// 1-63 letters, digits, `-` or `_`, not starting or ending with `-`, at most 253 bytes, and
/// a last label that is not all digits (that would be a mistyped address).
pub(super) fn valid_name(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|l| {
            (1..=63).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
        && name
            .rsplit('.')
            .next()
            .is_some_and(|tld| !tld.bytes().all(|b| b.is_ascii_digit()))
}

/// Normalizes an IPv4 address or CIDR (`10.1.2.3/8` → `10.0.0.0/8`, `1.2.3.4` → `1.2.3.4/32`).
fn parse_cidr(s: &str) -> Option<String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, p.parse::<u8>().ok().filter(|p| *p <= 32)?),
        None => (s, 32),
    };
    let addr: Ipv4Addr = addr.parse().ok()?;
    let mask = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - prefix)
    };
    Some(format!(
        "{}/{prefix}",
        Ipv4Addr::from(u32::from(addr) & mask)
    ))
}

impl AllowEntry {
    /// Parses and normalizes one entry.
    pub fn parse(s: &str) -> Result<AllowEntry> {
        let (dest, port) = match s.rsplit_once(':') {
            Some((d, p)) => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| invalid(s, "the port must be 1 to 65535"))?;
                (d, Some(port))
            }
            None => (s, None),
        };
        let looks_numeric = dest
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/');
        let target = if looks_numeric || dest.contains('/') {
            Target::Cidr(
                parse_cidr(dest).ok_or_else(|| invalid(s, "not a valid IPv4 address or CIDR"))?,
            )
        } else {
            let name = dest.trim_end_matches('.').to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(suffix) if valid_name(suffix) => Target::Wildcard(suffix.to_owned()),
                None if valid_name(&name) => Target::Name(name),
                _ => return Err(invalid(s, "not a valid DNS name")),
            }
        };
        Ok(AllowEntry { target, port })
    }

    /// Whether this entry opens the DNS name `qname` (lowercase, no final dot).
    pub fn matches_name(&self, qname: &str) -> bool {
        match &self.target {
            Target::Cidr(_) => false,
            Target::Name(n) => n == qname,
            Target::Wildcard(suffix) => qname
                .strip_suffix(suffix.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
        }
    }

    /// Whether this entry is opened by name (through the resolver).
    pub fn is_name(&self) -> bool {
        !matches!(self.target, Target::Cidr(_))
    }
}

/// Parses a whole allow list (at most [`MAX_ALLOW`] entries).
pub fn parse_list(entries: &[String]) -> Result<Vec<AllowEntry>> {
    if entries.len() > MAX_ALLOW {
        return Err(Error::Invalid(format!(
            "network.allow has {} entries; at most {MAX_ALLOW} are allowed",
            entries.len()
        )));
    }
    entries.iter().map(|e| AllowEntry::parse(e)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        AllowEntry::parse(s).unwrap().to_string()
    }

    #[test]
    fn entries_are_normalized() {
        assert_eq!(norm("10.1.2.3"), "10.1.2.3/32");
        assert_eq!(norm("10.1.2.3/8"), "10.0.0.0/8");
        assert_eq!(norm("10.1.2.3/8:443"), "10.0.0.0/8:443");
        assert_eq!(norm("API.Example.com."), "api.example.com");
        assert_eq!(norm("*.PyPI.org:443"), "*.pypi.org:443");
        assert_eq!(norm("_srv.x-y.example"), "_srv.x-y.example");
        for bad in [
            "10.1.2",
            "10.1.2.3/33",
            "10.1.2.3/",
            "::1",
            "",
            "*",
            "*.",
            "a..b",
            "-a.com",
            "a-.com",
            "a.com:0",
            "a.com:65536",
            "a.com:",
            "*.*.com",
            "a b.com",
            "x.*.com",
            "1.2.3.4:x",
            "a.123",
        ] {
            AllowEntry::parse(bad).expect_err(&format!("{bad:?} accepted"));
        }
        let long = format!("{}.com", "a".repeat(64));
        AllowEntry::parse(&long).unwrap_err();
        let too_many: Vec<String> = (0..=MAX_ALLOW).map(|i| format!("10.0.0.{i}")).collect();
        parse_list(&too_many).unwrap_err();
    }

    #[test]
    fn names_and_wildcards_match() {
        let name = AllowEntry::parse("api.example.com").unwrap();
        assert!(name.matches_name("api.example.com"));
        assert!(!name.matches_name("x.api.example.com"));
        assert!(!name.matches_name("example.com"));
        let wild = AllowEntry::parse("*.pypi.org").unwrap();
        assert!(wild.matches_name("files.pypi.org"));
        assert!(wild.matches_name("a.b.pypi.org"));
        assert!(!wild.matches_name("pypi.org"));
        assert!(!wild.matches_name("evilpypi.org"));
        assert!(!wild.matches_name(".pypi.org"));
        assert!(!AllowEntry::parse("1.2.3.4")
            .unwrap()
            .matches_name("1.2.3.4"));
    }
}
