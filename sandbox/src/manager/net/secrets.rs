//! The manager's side of a sandbox's secrets (egress `allow`): it checks them, gives each a
//! random placeholder for the sandbox's env, makes the sandbox's CA, writes the CA into the
//! sandbox's trust store, and starts and stops the sandbox's egress proxy (`mvm-egress`, see
//! [`super::proxy`]), which puts the values in place of the placeholders in the HTTPS request
//! headers sent to the secrets' hosts. The values go to the proxy through a pipe and are
//! stored nowhere.
//!
//! The sandbox's resolver answers a secret host's name with [`super::rules::PROXY_ADDR`],
//! which the namespace maps (port 443) to the proxy's port on the sandbox's gateway.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use socket2::{Protocol, Socket, Type};

use super::dns::{bound, stop_helper};
use super::policy::valid_name;
use crate::bounds::CappedBuffer;
use crate::error::{Error, Result};
use crate::manager::beneath::{Regular, TreeDir};
use crate::manager::host;
use crate::model::{Egress, SecretInfo, SecretSpec};

/// The proxy's program name in the manager's binary directory.
pub const PROXY_BIN: &str = "mvm-egress";
/// The descriptor of the listening socket the manager passes to the proxy.
pub const PROXY_FD: i32 = 3;
/// Most secrets of one sandbox.
pub const MAX_SECRETS: usize = 16;
/// Most hosts of one secret.
pub const MAX_HOSTS: usize = 8;
/// Longest value, bytes.
pub const MAX_VALUE: usize = 4096;
/// Longest name, bytes.
const MAX_NAME: usize = 64;
/// The sandbox's trust store: the image's bundle (when it has one) with the sandbox's CA.
pub const TRUST_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The sandbox's CA alone (for `NODE_EXTRA_CA_CERTS`).
pub const CA_FILE: &str = "/etc/ssl/certs/mvm-egress-ca.pem";
/// The audit log of the secrets' uses, in the manager's state directory (root's alone).
pub const AUDIT_LOG: &str = "egress-audit.log";

/// A secret as the proxy uses it.
#[derive(Clone, Serialize, Deserialize)]
pub struct Secret {
    /// The environment variable holding the placeholder.
    pub name: String,
    /// What the sandbox sees instead of the value.
    pub placeholder: String,
    /// The value.
    pub value: String,
    /// The hosts whose requests get the value (lowercase, no final dot).
    pub hosts: Vec<String>,
}

impl std::fmt::Debug for Secret {
    /// Never the value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("placeholder", &self.placeholder)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl Secret {
    /// What answers show of it.
    pub fn info(&self) -> SecretInfo {
        SecretInfo {
            name: self.name.clone(),
            hosts: self.hosts.clone(),
        }
    }
}

fn invalid(name: &str, why: &str) -> Error {
    Error::Invalid(format!("secrets.{name}: {why}"))
}

/// Checks the secrets of a create request for a sandbox with `egress` and env `env`, and
/// gives each its placeholder (`mvm-secret-<name>-<32 random hex digits>`).
pub fn plan(
    secrets: &BTreeMap<String, SecretSpec>,
    egress: Egress,
    env: &BTreeMap<String, String>,
) -> Result<Vec<Secret>> {
    if secrets.is_empty() {
        return Ok(Vec::new());
    }
    if egress != Egress::Allow {
        return Err(Error::Invalid(
            "secrets need network.egress \"allow\" (the sandbox's resolver sends their hosts \
             to its egress proxy)"
                .into(),
        ));
    }
    if secrets.len() > MAX_SECRETS {
        return Err(Error::Invalid(format!(
            "{} secrets; at most {MAX_SECRETS} are allowed",
            secrets.len()
        )));
    }
    secrets
        .iter()
        .map(|(name, spec)| {
            let name_ok = (1..=MAX_NAME).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                && !name.starts_with(|c: char| c.is_ascii_digit());
            if !name_ok {
                return Err(invalid(
                    name,
                    &format!(
                        "the name must be an environment variable name (letters, digits, _; \
                         not starting with a digit; at most {MAX_NAME} bytes)"
                    ),
                ));
            }
            if env.contains_key(name) {
                return Err(invalid(name, "env sets the same variable"));
            }
            if spec.value.is_empty() || spec.value.len() > MAX_VALUE {
                return Err(invalid(
                    name,
                    &format!("the value must be 1 to {MAX_VALUE} bytes"),
                ));
            }
            if !spec.value.bytes().all(|b| (b' '..=b'~').contains(&b)) {
                return Err(invalid(
                    name,
                    "the value must be visible ASCII or spaces (it goes into HTTP headers)",
                ));
            }
            if spec.hosts.is_empty() || spec.hosts.len() > MAX_HOSTS {
                return Err(invalid(
                    name,
                    &format!("a secret needs 1 to {MAX_HOSTS} hosts"),
                ));
            }
            let hosts = spec
                .hosts
                .iter()
                .map(|h| {
                    let host = h.trim_end_matches('.').to_ascii_lowercase();
                    if valid_name(&host) {
                        Ok(host)
                    } else {
                        Err(invalid(
                            name,
                            &format!(
                                "host {h:?} is not a DNS name (like api.example.com; no \
                                 wildcards, addresses or ports)"
                            ),
                        ))
                    }
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(Secret {
                name: name.clone(),
                placeholder: format!(
                    "mvm-secret-{}-{}",
                    name.to_ascii_lowercase(),
                    crate::db::random_hex(16)?
                ),
                value: spec.value.clone(),
                hosts,
            })
        })
        .collect()
}

/// The environment variables that point TLS clients at the sandbox's trust store.
pub fn trust_env() -> [(&'static str, &'static str); 4] {
    [
        ("SSL_CERT_FILE", TRUST_BUNDLE),
        ("REQUESTS_CA_BUNDLE", TRUST_BUNDLE),
        ("CURL_CA_BUNDLE", TRUST_BUNDLE),
        ("NODE_EXTRA_CA_CERTS", CA_FILE),
    ]
}

/// The parameters of sandbox `id`'s CA: the manager signs its certificate with them, the
/// proxy its leaves (rcgen's issuer needs only these and the key).
pub fn ca_params(id: &str) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("mvm egress CA {id}"));
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params
}

/// A sandbox's CA: its certificate (for the sandbox's trust store) and key (for the proxy).
pub struct Ca {
    /// PEM certificate.
    pub cert_pem: String,
    /// PEM PKCS#8 key.
    pub key_pem: String,
}

impl Ca {
    /// A new CA for sandbox `id`.
    pub fn new(id: &str) -> Result<Ca> {
        let err = |e: rcgen::Error| Error::Host(format!("making the sandbox's CA: {e}"));
        let key = rcgen::KeyPair::generate().map_err(err)?;
        let cert = ca_params(id).self_signed(&key).map_err(err)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// The trust bundle of an image (`image_bundle`, when it has one) with the sandbox's CA
/// after it.
fn bundle_with_ca(image_bundle: Option<Vec<u8>>, ca_pem: &str) -> Vec<u8> {
    let mut bundle = image_bundle.unwrap_or_default();
    bundle.push(b'\n');
    bundle.extend_from_slice(ca_pem.as_bytes());
    bundle
}

/// The trust store's directory and the names of its two files.
fn trust_store_paths() -> (&'static str, &'static str, &'static str) {
    let (dir, bundle) = TRUST_BUNDLE.rsplit_once('/').expect("an absolute path");
    let ca = CA_FILE.rsplit('/').next().expect("a name");
    (dir, bundle, ca)
}

/// Adds `ca_pem` to the trust store of the sandbox tree `root` (before anything runs in it):
/// [`CA_FILE`] alone, and [`TRUST_BUNDLE`] as the image's bundle (a regular file; a link is
/// not followed and replaced) followed by the CA.
pub fn write_trust_store(root: &Path, ca_pem: &str) -> Result<()> {
    let (dir, bundle, ca) = trust_store_paths();
    let dir = TreeDir::open_or_make(root, dir.trim_start_matches('/'))?;
    let image_bundle = match dir.read_regular(bundle, MAX_BUNDLE)? {
        Regular::Contents(data) => Some(data),
        Regular::Missing => None,
        Regular::TooLarge(size) => return Err(bundle_too_large(size)),
    };
    dir.replace_file(bundle, 0o644, &bundle_with_ca(image_bundle, ca_pem))?;
    dir.replace_file(ca, 0o644, ca_pem.as_bytes())
}

/// Largest trust bundle of an image that is read to add the CA to.
const MAX_BUNDLE: u64 = 16 << 20;

/// The error for an image's trust bundle of more than [`MAX_BUNDLE`] bytes.
fn bundle_too_large(size: u64) -> Error {
    Error::Invalid(format!(
        "the sandbox's image has a {TRUST_BUNDLE} of {size} bytes or more; at most \
         {MAX_BUNDLE} are read to add the secrets' proxy CA to it"
    ))
}

/// [`write_trust_store`] for a vm-tier guest, through its agent, before anything of the
/// tenant's runs in it (links inside the guest are the guest's own business). A guest image
/// without the directory gets it from its own `mkdir -p`.
pub async fn install_trust_store(guest: &agent::AgentClient, ca_pem: &str) -> Result<()> {
    let (dir, _, _) = trust_store_paths();
    if guest.stat(dir).await.is_err() {
        let made = guest
            .exec(agent::ExecRequest::new(["mkdir", "-p", dir]))
            .await?
            .wait_with_output_limited(4096)
            .await?;
        if made.status.code() != Some(0) {
            return Err(Error::Invalid(format!(
                "the sandbox's image has no {dir} and `mkdir -p {dir}` failed in it ({}); \
                 its trust store for the secrets' proxy cannot be written",
                String::from_utf8_lossy(&made.stderr).trim()
            )));
        }
    }
    // Bounded as it arrives: a link to a /proc file stats as empty and reads without end.
    let mut read = CappedBuffer::new(MAX_BUNDLE);
    let image_bundle = match guest.get_file(TRUST_BUNDLE, &mut read).await {
        Ok(_) => Some(read.data),
        Err(_) if read.overflowed => return Err(bundle_too_large(read.received)),
        Err(e) if e.remote_kind() == Some(agent::ErrorKind::NotFound) => None,
        Err(e) => return Err(e.into()),
    };
    let bundle = bundle_with_ca(image_bundle, ca_pem);
    guest.put_file(TRUST_BUNDLE, 0o644, &bundle[..]).await?;
    guest.put_file(CA_FILE, 0o644, ca_pem.as_bytes()).await?;
    Ok(())
}

/// The proxy's listening socket, bound on the sandbox's gateway before the gateway's address
/// exists (IP_FREEBIND) on a port the host picks.
pub(super) struct ProxyListener {
    tcp: Socket,
    /// Its port.
    pub port: u16,
}

impl ProxyListener {
    /// Binds on `gateway`.
    pub(super) fn bind(gateway: Ipv4Addr) -> Result<Self> {
        let err = |e| {
            Error::host(
                format!("binding the sandbox's egress proxy on {gateway}"),
                e,
            )
        };
        let tcp = bound(Type::STREAM, Protocol::TCP, (gateway, 0).into()).map_err(err)?;
        tcp.listen(64).map_err(err)?;
        let port = tcp
            .local_addr()
            .map_err(err)?
            .as_socket()
            .map_or(0, |a| a.port());
        Ok(ProxyListener { tcp, port })
    }
}

/// What the proxy is given on its standard input (the values included: a pipe, no file). Its
/// `Debug` shows neither the CA key nor the values.
#[derive(Clone, Serialize, Deserialize)]
pub struct ProxyConfig {
    /// Sandbox id (audit lines, messages).
    pub sandbox: String,
    /// The sandbox's address: connections from anyone else are closed.
    pub client: Ipv4Addr,
    /// Upstream DNS servers, to find the secret hosts.
    pub upstream: Vec<SocketAddr>,
    /// The audit log, one line per use of a secret.
    pub audit: PathBuf,
    /// Another CA file the hosts' certificates may chain to (besides the host's roots).
    pub extra_ca: Option<PathBuf>,
    /// The sandbox's CA key (PEM); its parameters are [`ca_params`].
    pub ca_key_pem: String,
    /// The secrets.
    pub secrets: Vec<Secret>,
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("sandbox", &self.sandbox)
            .field("client", &self.client)
            .field("upstream", &self.upstream)
            .field("audit", &self.audit)
            .field("extra_ca", &self.extra_ca)
            .field("secrets", &self.secrets)
            .finish_non_exhaustive()
    }
}

/// Starts sandbox `id`'s proxy from `bin_dir` on `listener` with `cfg`, in a session of its
/// own.
pub(super) fn start(bin_dir: &Path, listener: ProxyListener, cfg: &ProxyConfig) -> Result<()> {
    let bin = bin_dir.join(PROXY_BIN);
    if !bin.is_file() {
        return Err(Error::Host(crate::install::helper_missing(
            bin_dir, PROXY_BIN,
        )));
    }
    let mut cmd = std::process::Command::new(&bin);
    cmd.arg("--sandbox")
        .arg(&cfg.sandbox)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null());
    let fd = listener.tcp.as_raw_fd();
    // SAFETY: between fork and exec only async-signal-safe calls (setsid, dup2,
    // sched_setscheduler) on a descriptor this process owns; dup2 clears close-on-exec on
    // the copy.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            if libc::setsid() == -1 || libc::dup2(fd, PROXY_FD) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            host::normal_priority()
        });
    }
    let spawn_err = |e: std::io::Error| {
        Error::host(
            format!("starting the sandbox's egress proxy {}", bin.display()),
            format!("{e} (set MVM_BIN_DIR to the directory of mvm-jailer and mvm-egress)"),
        )
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let config = serde_json::to_vec(cfg).expect("plain data serializes");
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(&config).map_err(spawn_err)?;
    // Closed: the proxy reads to the end. The handle is dropped like the resolver's.
    Ok(())
}

/// Pids of sandbox `id`'s proxy processes.
pub fn proxy_pids(id: &str) -> Vec<i32> {
    host::pids_of(PROXY_BIN, "--sandbox", id)
}

/// Stops sandbox `id`'s proxy (it may be gone already).
pub(super) fn stop(id: &str) -> Result<()> {
    stop_helper("egress proxy", id, proxy_pids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(value: &str, hosts: &[&str]) -> SecretSpec {
        SecretSpec {
            value: value.into(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        }
    }

    #[test]
    fn secrets_are_checked_and_get_random_placeholders() {
        let env = BTreeMap::from([("TAKEN".to_string(), "x".to_string())]);
        let one = |name: &str, s: SecretSpec| BTreeMap::from([(name.to_string(), s)]);
        let ok = plan(
            &one("API_KEY", spec("sk-1", &["API.Example.com."])),
            Egress::Allow,
            &env,
        )
        .unwrap();
        assert_eq!(ok[0].hosts, ["api.example.com"]);
        assert!(ok[0].placeholder.starts_with("mvm-secret-api_key-"));
        assert!(!ok[0].placeholder.contains("sk-1"));
        let again = plan(
            &one("API_KEY", spec("sk-1", &["api.example.com"])),
            Egress::Allow,
            &env,
        )
        .unwrap();
        assert_ne!(ok[0].placeholder, again[0].placeholder);
        assert!(!format!("{ok:?}").contains("sk-1"));
        for (name, s, egress, why) in [
            ("K", spec("v", &["a.com"]), Egress::All, "egress"),
            ("1K", spec("v", &["a.com"]), Egress::Allow, "environment"),
            ("K-1", spec("v", &["a.com"]), Egress::Allow, "environment"),
            ("TAKEN", spec("v", &["a.com"]), Egress::Allow, "env sets"),
            ("K", spec("", &["a.com"]), Egress::Allow, "1 to"),
            ("K", spec("a\r\nX: y", &["a.com"]), Egress::Allow, "visible"),
            ("K", spec("v", &[]), Egress::Allow, "1 to 8 hosts"),
            (
                "K",
                spec("v", &["*.a.com"]),
                Egress::Allow,
                "not a DNS name",
            ),
            (
                "K",
                spec("v", &["1.2.3.4"]),
                Egress::Allow,
                "not a DNS name",
            ),
            (
                "K",
                spec("v", &["a.com:443"]),
                Egress::Allow,
                "not a DNS name",
            ),
        ] {
            let e = plan(&one(name, s), egress, &env).unwrap_err().to_string();
            assert!(e.contains(why), "{name}: {e}");
        }
        let many: BTreeMap<_, _> = (0..=MAX_SECRETS)
            .map(|i| (format!("K{i}"), spec("v", &["a.com"])))
            .collect();
        plan(&many, Egress::Allow, &env).unwrap_err();
        plan(
            &one("K", spec(&"v".repeat(MAX_VALUE + 1), &["a.com"])),
            Egress::Allow,
            &env,
        )
        .unwrap_err();
    }

    #[test]
    fn the_trust_store_keeps_the_images_bundle_and_follows_no_link() {
        let root = tempfile::tempdir().unwrap();
        let certs = root.path().join("etc/ssl/certs");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::write(certs.join("ca-certificates.crt"), "IMAGE CAS\n").unwrap();
        write_trust_store(root.path(), "OUR CA\n").unwrap();
        let bundle = std::fs::read_to_string(certs.join("ca-certificates.crt")).unwrap();
        assert!(
            bundle.starts_with("IMAGE CAS\n") && bundle.ends_with("OUR CA\n"),
            "{bundle}"
        );
        assert_eq!(
            std::fs::read_to_string(certs.join("mvm-egress-ca.pem")).unwrap(),
            "OUR CA\n"
        );
        // A link planted by the image is replaced, its target neither read nor written.
        let outside = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(outside.path(), "HOST FILE").unwrap();
        std::fs::remove_file(certs.join("ca-certificates.crt")).unwrap();
        std::os::unix::fs::symlink(outside.path(), certs.join("ca-certificates.crt")).unwrap();
        write_trust_store(root.path(), "OUR CA\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(outside.path()).unwrap(),
            "HOST FILE"
        );
        let bundle = std::fs::read_to_string(certs.join("ca-certificates.crt")).unwrap();
        assert!(!bundle.contains("HOST FILE"), "{bundle}");
        // A bundle over the limit is refused, not read whole.
        let huge = std::fs::File::create(certs.join("ca-certificates.crt")).unwrap();
        huge.set_len(MAX_BUNDLE + 1).unwrap();
        let e = write_trust_store(root.path(), "OUR CA\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bytes or more"), "{e}");
        // A linked directory is refused.
        let root2 = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/", root2.path().join("etc")).unwrap();
        write_trust_store(root2.path(), "OUR CA\n").unwrap_err();
    }
}
