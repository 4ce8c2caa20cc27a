//! Firecracker-compatible VM configuration: the JSON of `--config-file` and of the API's PUT
//! bodies, with validation that names the offending field.

use serde::de::{DeserializeOwned, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use crate::arch::x86_64::mptable::MAX_VCPUS;
use crate::snapshot::MemorySource;
use crate::vstate::memory::{validate_mem_size, MemoryError};

/// Kernel command line used when `boot_args` is absent: Firecracker's defaults, with the
/// serial console on so the guest's output is visible.
pub const DEFAULT_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

/// Errors in a configuration: what is wrong and which field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The JSON did not parse or has unknown fields.
    #[error("invalid configuration JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A field Firecracker has but mvm does not implement.
    #[error("`{field}` is not supported by mvm: {why}")]
    Unsupported {
        /// JSON path of the field.
        field: String,
        /// Why, and what to do instead.
        why: String,
    },
    /// A field with a value mvm cannot use.
    #[error("invalid `{field}`: {why}")]
    Invalid {
        /// JSON path of the field.
        field: String,
        /// What is wrong with it.
        why: String,
    },
    /// A required section is missing.
    #[error("`{0}` must be configured before the VM can start")]
    Missing(&'static str),
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

fn unsupported(field: impl Into<String>, why: impl Into<String>) -> ConfigError {
    ConfigError::Unsupported {
        field: field.into(),
        why: why.into(),
    }
}

/// Parses `json` as `T`: a whole `--config-file` document (`section` None) or the body of one
/// section's API request (e.g. `Some("machine-config")`). A value of the wrong type or range is
/// reported as [`ConfigError::Invalid`] naming the JSON path of its field; syntax errors as
/// [`ConfigError::Json`].
pub fn from_json_slice<T: DeserializeOwned>(
    section: Option<&str>,
    json: &[u8],
) -> Result<T, ConfigError> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let value = deserialize_naming_fields(section, &mut de)?;
    de.end()?;
    Ok(value)
}

/// Like [`from_json_slice`], from an already parsed JSON value.
pub fn from_json_value<T: DeserializeOwned>(
    section: Option<&str>,
    value: Value,
) -> Result<T, ConfigError> {
    deserialize_naming_fields(section, value)
}

fn deserialize_naming_fields<'de, T, D>(section: Option<&str>, de: D) -> Result<T, ConfigError>
where
    T: Deserialize<'de>,
    D: Deserializer<'de, Error = serde_json::Error>,
{
    serde_path_to_error::deserialize(de).map_err(|e| {
        // "." is the document itself (e.g. a missing field of a section's body).
        let path = Some(e.path().to_string()).filter(|p| p != ".");
        let error = e.into_inner();
        if error.classify() != serde_json::error::Category::Data {
            return ConfigError::Json(error);
        }
        let field = match (section, path) {
            (Some(section), Some(path)) => format!("{section}.{path}"),
            (Some(section), None) => section.to_string(),
            (None, Some(path)) => path,
            (None, None) => return ConfigError::Json(error),
        };
        invalid(field, error.to_string())
    })
}

/// Checks a vCPU count (any integer a client sent) against 1 to [`MAX_VCPUS`].
fn vcpu_count_in_range(count: i128) -> Result<u8, String> {
    match u8::try_from(count) {
        Ok(n) if (1..=MAX_VCPUS).contains(&n) => Ok(n),
        _ => Err(format!("{count} is out of range: use 1 to {MAX_VCPUS}")),
    }
}

/// `machine-config.vcpu_count`: any JSON integer, refused with the range when outside it.
fn deserialize_vcpu_count<'de, D: Deserializer<'de>>(de: D) -> Result<u8, D::Error> {
    struct VcpuCount;
    impl Visitor<'_> for VcpuCount {
        type Value = u8;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a vCPU count from 1 to {MAX_VCPUS}")
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u8, E> {
            vcpu_count_in_range(n.into()).map_err(E::custom)
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<u8, E> {
            vcpu_count_in_range(n.into()).map_err(E::custom)
        }
    }
    de.deserialize_u8(VcpuCount)
}

/// `machine-config.mem_size_mib`: a whole number of MiB; a negative one is refused as such.
fn deserialize_mem_size_mib<'de, D: Deserializer<'de>>(de: D) -> Result<u64, D::Error> {
    struct MemSizeMib;
    impl Visitor<'_> for MemSizeMib {
        type Value = u64;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a memory size in MiB (a whole number)")
        }
        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<u64, E> {
            Ok(n)
        }
        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<u64, E> {
            u64::try_from(n)
                .map_err(|_| E::custom(format!("{n} is negative: give the memory size in MiB")))
        }
    }
    de.deserialize_u64(MemSizeMib)
}

/// Fails when a Firecracker field mvm lacks is present and not null.
fn reject_present(value: &Option<Value>, field: &str, why: &str) -> Result<(), ConfigError> {
    match value {
        None | Some(Value::Null) => Ok(()),
        Some(_) => Err(unsupported(field, why)),
    }
}

/// `boot-source`: the guest kernel, its command line and an optional initrd.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of an ELF vmlinux or a bzImage.
    pub kernel_image_path: String,
    /// Kernel command line; [`DEFAULT_BOOT_ARGS`] when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Host path of an initrd/initramfs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

impl BootSource {
    /// Checks the command line fits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.kernel_image_path.is_empty() {
            return Err(invalid(
                "boot-source.kernel_image_path",
                "must not be empty",
            ));
        }
        if let Some(args) = &self.boot_args {
            // Room is left for the virtio-mmio device entries the VMM appends.
            if args.len() >= CMDLINE_MAX_SIZE - 256 {
                return Err(invalid(
                    "boot-source.boot_args",
                    format!(
                        "{} bytes is too long (at most {})",
                        args.len(),
                        CMDLINE_MAX_SIZE - 257
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// `machine-config`: vCPUs and memory.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to 32.
    #[serde(deserialize_with = "deserialize_vcpu_count")]
    pub vcpu_count: u8,
    /// Guest RAM in MiB.
    #[serde(deserialize_with = "deserialize_mem_size_mib")]
    pub mem_size_mib: u64,
    /// Present vCPUs as hyper-thread pairs.
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking (KVM's dirty log on every memory slot), which `Diff` snapshots
    /// need.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Firecracker CPU template; mvm supports none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<Value>,
    /// Huge pages backing; only "None" is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

impl MachineConfig {
    /// Checks vCPU count, memory size and unsupported options.
    pub fn validate(&self) -> Result<(), ConfigError> {
        vcpu_count_in_range(self.vcpu_count.into())
            .map_err(|why| invalid("machine-config.vcpu_count", why))?;
        if self.smt && self.vcpu_count > 1 && self.vcpu_count % 2 == 1 {
            return Err(invalid(
                "machine-config.vcpu_count",
                "with smt enabled the vCPU count must be 1 or even",
            ));
        }
        validate_mem_size(self.mem_size_mib).map_err(|e| match e {
            MemoryError::TooSmall(_) | MemoryError::LargerThanHost { .. } => {
                invalid("machine-config.mem_size_mib", e.to_string())
            }
            MemoryError::Map(..) => invalid("machine-config.mem_size_mib", e.to_string()),
        })?;
        reject_present(
            &self.cpu_template,
            "machine-config.cpu_template",
            "mvm passes the host CPU through (filtered); remove the template",
        )?;
        match self.huge_pages.as_deref() {
            None | Some("None") => Ok(()),
            Some(other) => Err(unsupported(
                "machine-config.huge_pages",
                format!("\"{other}\": only \"None\" is available"),
            )),
        }
    }
}

/// Token bucket of a rate limiter (Firecracker's `TokenBucket`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Bucket size in bytes or operations.
    pub size: u64,
    /// Extra tokens available once at start.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the whole bucket.
    pub refill_time: u64,
}

/// A rate limiter: bandwidth and operations buckets.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes per refill period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations per refill period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

/// Block device caching mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum CacheType {
    /// Flushes are not offered to the guest.
    #[default]
    Unsafe,
    /// The device offers FLUSH and honours it with fsync.
    Writeback,
}

/// An entry of `drives`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Unique id of the drive.
    pub drive_id: String,
    /// Host path of the raw disk image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Whether this drive is the root filesystem (`root=/dev/vda` is added).
    pub is_root_device: bool,
    /// Open the image read-only and refuse guest writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// Root partition UUID for `root=PARTUUID=`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Caching mode.
    #[serde(default)]
    pub cache_type: CacheType,
    /// I/O engine ("Sync" only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// vhost-user socket; not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<Value>,
}

/// An entry of `network-interfaces`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterfaceConfig {
    /// Unique id of the interface.
    pub iface_id: String,
    /// Host tap device name.
    pub host_dev_name: String,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `vsock`: hybrid virtio-vsock backed by a unix socket.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// Guest context id (≥ 3).
    pub guest_cid: u32,
    /// Host unix socket path.
    pub uds_path: String,
    /// Deprecated Firecracker id, accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

impl VsockConfig {
    /// Checks what Firecracker checks when the device is configured: a guest CID of 3 or more.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.guest_cid < 3 {
            return Err(invalid(
                "vsock.guest_cid",
                format!(
                    "{} is reserved (0 to 2 are the hypervisor, loopback and host): use 3 or more",
                    self.guest_cid
                ),
            ));
        }
        Ok(())
    }
}

/// `balloon`: Firecracker's memory balloon, which in mvm only reports free pages. Its target
/// stays 0 (it never takes memory from the guest); with `free_page_reporting` the guest gives
/// the host back the memory it frees (see [`crate::devices::virtio::balloon`]).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// The balloon's target size; must be 0.
    pub amount_mib: u32,
    /// Whether the guest deflates the balloon when short of memory; accepted (an empty
    /// balloon has nothing to deflate).
    pub deflate_on_oom: bool,
    /// Statistics polling; must be 0 (the device has no statistics queue).
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// The guest reports the memory it frees, and the host discards those pages.
    #[serde(default)]
    pub free_page_reporting: bool,
}

impl BalloonConfig {
    /// Refuses what mvm's balloon does not do: inflating and statistics, and a balloon without
    /// free page reporting (which would do nothing).
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.free_page_reporting {
            return Err(unsupported(
                "balloon.free_page_reporting",
                "false: mvm's balloon only gives freed guest memory back to the host (it never \
                 inflates); set it to true, or leave the balloon out",
            ));
        }
        if self.amount_mib != 0 {
            return Err(unsupported(
                "balloon.amount_mib",
                format!(
                    "{} MiB: mvm's balloon never inflates; size the VM with machine-config and \
                     set free_page_reporting to give freed guest memory back to the host",
                    self.amount_mib
                ),
            ));
        }
        if self.stats_polling_interval_s != 0 {
            return Err(unsupported(
                "balloon.stats_polling_interval_s",
                "the balloon has no statistics: use 0",
            ));
        }
        Ok(())
    }
}

/// Log verbosity (Firecracker's names). Like Firecracker, parsing ignores case and also takes
/// "Warn" for [`LogLevel::Warning`].
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Failures only.
    Error,
    /// Failures and warnings.
    #[default]
    Warning,
    /// Normal operation.
    Info,
    /// Debugging detail.
    Debug,
    /// Everything.
    Trace,
}

impl std::str::FromStr for LogLevel {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => {
                return Err(format!(
                    "unknown log level {s:?}: use Off, Error, Warning (or Warn), Info, Debug or \
                     Trace, in any case"
                ))
            }
        })
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// `logger`: where and what the VMM logs.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// File or FIFO to log to; stderr when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Verbosity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Prefix lines with their level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Prefix lines with their source file and line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log from this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `metrics`: where metrics are flushed as JSON lines.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// File or FIFO receiving one JSON object per flush.
    pub metrics_path: String,
}

/// `serial`: where the guest console goes (mvm extension; stdout when absent).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// File receiving the guest console.
    pub serial_out_path: String,
}

/// `snapshot_type` of `PUT /snapshot/create`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// Only the pages written since the last snapshot, boot or load (needs
    /// `machine-config.track_dirty_pages`).
    Diff,
}

/// `PUT /snapshot/create` (Firecracker's `SnapshotCreateParams`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Full or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Where the VM state goes.
    pub snapshot_path: String,
    /// Where guest memory goes.
    pub mem_file_path: String,
}

impl SnapshotCreateParams {
    /// Refuses empty paths, and a `Diff` snapshot of a VM without dirty page tracking
    /// (`track_dirty_pages`).
    pub fn validate(&self, track_dirty_pages: bool) -> Result<(), ConfigError> {
        if self.snapshot_type == SnapshotType::Diff && !track_dirty_pages {
            return Err(invalid(
                "snapshot/create.snapshot_type",
                "Diff snapshots need dirty page tracking: boot the VM with \
                 machine-config.track_dirty_pages true (or load it with track_dirty_pages), \
                 or take a Full snapshot",
            ));
        }
        for (field, path) in [
            ("snapshot_path", &self.snapshot_path),
            ("mem_file_path", &self.mem_file_path),
        ] {
            if path.is_empty() {
                return Err(invalid(
                    format!("snapshot/create.{field}"),
                    "must not be empty",
                ));
            }
        }
        Ok(())
    }
}

/// `backend_type` of a snapshot's memory backend.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum MemBackendType {
    /// `backend_path` is the memory file, mapped copy-on-write.
    File,
    /// `backend_path` is a page server's socket, which gets a userfaultfd.
    Uffd,
}

/// `mem_backend` of `PUT /snapshot/load`.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// File or Uffd.
    pub backend_type: MemBackendType,
    /// The memory file or the page server's socket.
    pub backend_path: String,
}

/// `PUT /snapshot/load` (Firecracker's `SnapshotLoadParams`).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The VM state file.
    pub snapshot_path: String,
    /// Where guest memory comes from.
    #[serde(default)]
    pub mem_backend: Option<MemBackend>,
    /// The memory file (Firecracker's older form of `mem_backend` File).
    #[serde(default)]
    pub mem_file_path: Option<String>,
    /// Resume the VM once loaded (else it stays paused).
    #[serde(default)]
    pub resume_vm: bool,
    /// Dirty page tracking in the loaded VM (Firecracker's older name).
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Dirty page tracking in the loaded VM, for `Diff` snapshots of it.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// New host taps for some of the snapshot's interfaces.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// A new host socket for the snapshot's vsock device.
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
}

/// One entry of `network_overrides` (Firecracker's `NetworkOverride`): the restored
/// interface `iface_id` uses tap `host_dev_name` instead of the one it was saved with.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// An interface of the snapshot.
    pub iface_id: String,
    /// The tap it opens.
    pub host_dev_name: String,
}

/// `vsock_override` (Firecracker's `VsockOverride`): the restored vsock device binds
/// `uds_path` instead of the path it was saved with.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The host unix socket path.
    pub uds_path: String,
}

impl SnapshotLoadParams {
    /// Where guest memory comes from: `mem_backend` (File or Uffd) or `mem_file_path`,
    /// exactly one of them.
    pub fn memory_source(&self) -> Result<MemorySource<'_>, ConfigError> {
        let source = match (&self.mem_backend, &self.mem_file_path) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "snapshot/load.mem_backend",
                    "give either mem_backend or mem_file_path, not both",
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "snapshot/load.mem_backend",
                    "missing: give mem_backend (or mem_file_path)",
                ))
            }
            (None, Some(path)) => MemorySource::File(path),
            (Some(backend), None) => {
                if backend.backend_path.is_empty() {
                    return Err(invalid(
                        "snapshot/load.mem_backend.backend_path",
                        "must not be empty",
                    ));
                }
                match backend.backend_type {
                    MemBackendType::File => MemorySource::File(&backend.backend_path),
                    MemBackendType::Uffd => MemorySource::Uffd(&backend.backend_path),
                }
            }
        };
        Ok(source)
    }

    /// Points the devices of `config` (a snapshot's configuration) at the overridden taps and
    /// vsock socket; an override naming a device the snapshot lacks is refused.
    pub fn apply_overrides(&self, config: &mut VmConfig) -> Result<(), ConfigError> {
        for entry in &self.network_overrides {
            match config
                .network_interfaces
                .iter_mut()
                .find(|i| i.iface_id == entry.iface_id)
            {
                Some(iface) => iface.host_dev_name.clone_from(&entry.host_dev_name),
                None => {
                    let ids: Vec<&str> = config
                        .network_interfaces
                        .iter()
                        .map(|i| i.iface_id.as_str())
                        .collect();
                    return Err(invalid(
                        "snapshot/load.network_overrides",
                        format!(
                            "the snapshot has no network interface {:?} (its interfaces: [{}])",
                            entry.iface_id,
                            ids.join(", ")
                        ),
                    ));
                }
            }
        }
        if let Some(vsock_override) = &self.vsock_override {
            let Some(vsock) = &mut config.vsock else {
                return Err(invalid(
                    "snapshot/load.vsock_override",
                    "the snapshot has no vsock device; leave vsock_override out",
                ));
            };
            vsock.uds_path.clone_from(&vsock_override.uds_path);
        }
        Ok(())
    }
}

/// A whole VM configuration: the `--config-file` document.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Kernel, command line, initrd.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// Block devices.
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// Network interfaces.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
    /// The vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<VsockConfig>,
    /// Logging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    /// Metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// Console destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    /// The balloon (free page reporting only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// Firecracker's MMDS; not supported.
    #[serde(rename = "mmds-config", default, skip_serializing)]
    pub mmds_config: Option<Value>,
    /// Firecracker's custom CPU templates; not supported.
    #[serde(rename = "cpu-config", default, skip_serializing)]
    pub cpu_config: Option<Value>,
    /// Firecracker's entropy device; not supported.
    #[serde(default, skip_serializing)]
    pub entropy: Option<Value>,
}

impl VmConfig {
    /// Parses a Firecracker JSON configuration document.
    pub fn from_json(json: &str) -> Result<Self, ConfigError> {
        let config: VmConfig = from_json_slice(None, json.as_bytes())?;
        config.validate_sections()?;
        Ok(config)
    }

    /// Validates every section that is present.
    pub fn validate_sections(&self) -> Result<(), ConfigError> {
        reject_present(
            &self.mmds_config,
            "mmds-config",
            "there is no metadata service; pass data through the agent or boot_args",
        )?;
        reject_present(
            &self.cpu_config,
            "cpu-config",
            "custom CPU templates are not available",
        )?;
        reject_present(&self.entropy, "entropy", "there is no virtio-rng device")?;
        if let Some(boot) = &self.boot_source {
            boot.validate()?;
        }
        if let Some(vsock) = &self.vsock {
            vsock.validate()?;
        }
        if let Some(balloon) = &self.balloon {
            balloon.validate()?;
        }
        self.machine_config.validate()
    }

    /// Full validation before boot: every section valid and a kernel configured.
    pub fn validate_for_boot(&self) -> Result<&BootSource, ConfigError> {
        self.validate_sections()?;
        self.boot_source
            .as_ref()
            .ok_or(ConfigError::Missing("boot-source"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn firecracker_document_parses() {
        let json = r#"{
          "boot-source": {"kernel_image_path": "vmlinux", "boot_args": "console=ttyS0 reboot=k", "initrd_path": null},
          "drives": [{"drive_id": "rootfs", "path_on_host": "rootfs.ext4", "is_root_device": true,
                      "is_read_only": false, "cache_type": "Writeback", "io_engine": "Sync",
                      "rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}],
          "machine-config": {"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": false, "huge_pages": "None"},
          "network-interfaces": [{"iface_id": "eth0", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}],
          "vsock": {"guest_cid": 3, "uds_path": "/tmp/v.sock", "vsock_id": "vsock0"},
          "logger": {"log_path": "/tmp/fc.log", "level": "Debug", "show_level": true, "show_log_origin": false},
          "metrics": {"metrics_path": "/tmp/metrics"},
          "balloon": null, "mmds-config": null, "cpu-config": null, "entropy": null
        }"#;
        let cfg = VmConfig::from_json(json).unwrap();
        assert_eq!(cfg.machine_config.vcpu_count, 2);
        assert_eq!(cfg.drives[0].cache_type, CacheType::Writeback);
        assert_eq!(cfg.vsock.as_ref().unwrap().guest_cid, 3);
        assert_eq!(cfg.logger.unwrap().level, Some(LogLevel::Debug));
    }

    #[test]
    fn bad_values_name_their_field() {
        let err = |json: &str| VmConfig::from_json(json).unwrap_err().to_string();
        assert!(
            err(r#"{"machine-config": {"vcpu_count": 0, "mem_size_mib": 128}}"#)
                .contains("machine-config.vcpu_count")
        );
        assert!(
            err(r#"{"machine-config": {"vcpu_count": 33, "mem_size_mib": 128}}"#)
                .contains("1 to 32")
        );
        assert!(
            err(r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 0}}"#)
                .contains("machine-config.mem_size_mib")
        );
        assert!(
            err(r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 99999999}}"#)
                .contains("larger than this host")
        );
        assert!(
            err(r#"{"balloon": {"amount_mib": 1, "deflate_on_oom": false, "free_page_reporting": true}}"#).contains(
                "`balloon.amount_mib` is not supported by mvm: 1 MiB: mvm's balloon never inflates"
            )
        );
        assert!(err(
            r#"{"balloon": {"amount_mib": 0, "deflate_on_oom": false, "free_page_reporting": true, "stats_polling_interval_s": 5}}"#
        )
        .contains("balloon.stats_polling_interval_s"));
        assert!(err(r#"{"balloon": {"amount_mib": 0}}"#).contains("deflate_on_oom"));
        assert!(
            err(r#"{"balloon": {"amount_mib": 0, "deflate_on_oom": true}}"#)
                .contains("balloon.free_page_reporting")
        );
        assert!(
            err(r#"{"boot-source": {"kernel_image_path": "k", "typo": 1}}"#)
                .contains("unknown field `typo`")
        );
        assert!(err(
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "huge_pages": "2M"}}"#
        )
        .contains("huge_pages"));
        assert!(err("{not json").contains("invalid configuration JSON"));
    }

    #[test]
    fn wrong_machine_config_values_name_the_field() {
        let err = |machine: &str| {
            let doc = format!(r#"{{"machine-config": {machine}}}"#);
            let from_file = VmConfig::from_json(&doc).unwrap_err().to_string();
            let from_api =
                from_json_slice::<MachineConfig>(Some("machine-config"), machine.as_bytes())
                    .unwrap_err()
                    .to_string();
            let patch = serde_json::from_str(machine).unwrap();
            let from_patch = from_json_value::<MachineConfig>(Some("machine-config"), patch)
                .unwrap_err()
                .to_string();
            for message in [&from_api, &from_patch] {
                assert!(
                    message.starts_with(from_file.split(" at line").next().unwrap()),
                    "{from_file} / {message}"
                );
            }
            from_file
        };
        let cases = [
            (r#"{"vcpu_count": 300, "mem_size_mib": 128}"#, "invalid `machine-config.vcpu_count`: 300 is out of range: use 1 to 32"),
            (r#"{"vcpu_count": -1, "mem_size_mib": 128}"#, "invalid `machine-config.vcpu_count`: -1 is out of range: use 1 to 32"),
            (r#"{"vcpu_count": "2", "mem_size_mib": 128}"#, "invalid `machine-config.vcpu_count`: invalid type: string \"2\", expected a vCPU count from 1 to 32"),
            (r#"{"vcpu_count": 1.5, "mem_size_mib": 128}"#, "invalid `machine-config.vcpu_count`: invalid type: floating point `1.5`, expected a vCPU count"),
            (r#"{"vcpu_count": 1, "mem_size_mib": -1}"#, "invalid `machine-config.mem_size_mib`: -1 is negative: give the memory size in MiB"),
            (r#"{"vcpu_count": 1, "mem_size_mib": "128"}"#, "invalid `machine-config.mem_size_mib`: invalid type: string \"128\", expected a memory size in MiB"),
            (r#"{"vcpu_count": 1, "mem_size_mib": 99999999999999999999}"#, "invalid `machine-config.mem_size_mib`: invalid type: floating point"),
            (r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": "yes"}"#, "invalid `machine-config.smt`: invalid type: string \"yes\", expected a boolean"),
            (r#"{"vcpu_count": 1}"#, "invalid `machine-config`: missing field `mem_size_mib`"),
        ];
        for (machine, want) in cases {
            let got = err(machine);
            assert!(got.starts_with(want), "{machine}: {got}");
        }
        // Other sections name their fields too, down to list entries.
        let got = VmConfig::from_json(r#"{"drives": [{"drive_id": "a", "is_root_device": "no"}]}"#)
            .unwrap_err()
            .to_string();
        assert!(
            got.starts_with("invalid `drives[0].is_root_device`: invalid type"),
            "{got}"
        );
        // Trailing garbage and syntax errors stay JSON errors.
        let got = from_json_slice::<MachineConfig>(
            Some("machine-config"),
            br#"{"vcpu_count": 1, "mem_size_mib": 64} x"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            got.starts_with("invalid configuration JSON: trailing characters"),
            "{got}"
        );
    }

    #[test]
    fn log_levels_parse_in_any_case_as_in_firecracker() {
        let level = |name: &str| {
            VmConfig::from_json(&format!(r#"{{"logger": {{"level": "{name}"}}}}"#))
                .map(|cfg| cfg.logger.unwrap().level.unwrap())
                .map_err(|e| e.to_string())
        };
        for (name, want) in [
            ("info", LogLevel::Info),
            ("Warning", LogLevel::Warning),
            ("warn", LogLevel::Warning),
            ("WARN", LogLevel::Warning),
            ("ERROR", LogLevel::Error),
            ("Trace", LogLevel::Trace),
            ("debug", LogLevel::Debug),
            ("Off", LogLevel::Off),
            ("oFF", LogLevel::Off),
        ] {
            assert_eq!(level(name), Ok(want), "{name}");
        }
        let err = level("loud").unwrap_err();
        assert!(err.contains("unknown log level \"loud\""), "{err}");
        // GET /vm/config reports the canonical names.
        assert_eq!(serde_json::to_value(LogLevel::Warning).unwrap(), "Warning");
    }

    #[test]
    fn snapshot_requests_parse_like_firecracker_and_refuse_what_mvm_lacks() {
        let create: SnapshotCreateParams = from_json_slice(
            Some("snapshot/create"),
            br#"{"snapshot_path": "s", "mem_file_path": "m"}"#,
        )
        .unwrap();
        assert_eq!(create.snapshot_type, SnapshotType::Full);
        create.validate(false).unwrap();
        let diff: SnapshotCreateParams = from_json_slice(
            Some("snapshot/create"),
            br#"{"snapshot_type": "Diff", "snapshot_path": "s", "mem_file_path": "m"}"#,
        )
        .unwrap();
        let err = diff.validate(false).unwrap_err().to_string();
        assert!(
            err.contains("snapshot_type") && err.contains("dirty page tracking"),
            "{err}"
        );
        diff.validate(true).unwrap();
        let err = from_json_slice::<SnapshotCreateParams>(
            Some("snapshot/create"),
            br#"{"snapshot_path": "s", "mem_file_path": "m", "extra": 1}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("extra"), "{err}");

        let load = |json: &str| {
            from_json_slice::<SnapshotLoadParams>(Some("snapshot/load"), json.as_bytes())
                .unwrap()
                .memory_source()
                .map(|source| format!("{source:?}"))
                .map_err(|e| e.to_string())
        };
        let file = r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "File", "backend_path": "m"}}"#;
        assert_eq!(load(file).unwrap(), r#"File("m")"#);
        assert_eq!(
            load(r#"{"snapshot_path": "s", "mem_file_path": "m2"}"#).unwrap(),
            r#"File("m2")"#
        );
        let uffd = r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": "u"}}"#;
        assert_eq!(load(uffd).unwrap(), r#"Uffd("u")"#);
        let empty = r#"{"snapshot_path": "s", "mem_backend": {"backend_type": "Uffd", "backend_path": ""}}"#;
        assert!(load(empty).unwrap_err().contains("backend_path"));
        assert!(load(r#"{"snapshot_path": "s"}"#)
            .unwrap_err()
            .contains("mem_backend"));
        let both = r#"{"snapshot_path": "s", "mem_file_path": "m", "mem_backend": {"backend_type": "File", "backend_path": "m"}}"#;
        assert!(load(both).unwrap_err().contains("not both"));
    }

    #[test]
    fn snapshot_overrides_replace_taps_and_the_vsock_socket_of_known_devices_only() {
        let saved: VmConfig = from_json_slice(
            None,
            br#"{"network-interfaces": [
                    {"iface_id": "eth0", "host_dev_name": "tap0"},
                    {"iface_id": "eth1", "host_dev_name": "tap1"}],
                 "vsock": {"guest_cid": 3, "uds_path": "/old.sock"}}"#,
        )
        .unwrap();
        let params = |overrides: &str| {
            from_json_slice::<SnapshotLoadParams>(
                Some("snapshot/load"),
                format!(r#"{{"snapshot_path": "s", "mem_file_path": "m", {overrides}}}"#)
                    .as_bytes(),
            )
            .unwrap()
        };
        let apply = |overrides: &str, mut config: VmConfig| {
            params(overrides)
                .apply_overrides(&mut config)
                .map(|()| config)
                .map_err(|e| e.to_string())
        };

        let restored = apply(
            r#""network_overrides": [{"iface_id": "eth1", "host_dev_name": "tap9"}],
               "vsock_override": {"uds_path": "/new.sock"}"#,
            saved.clone(),
        )
        .unwrap();
        let taps: Vec<&str> = restored
            .network_interfaces
            .iter()
            .map(|i| i.host_dev_name.as_str())
            .collect();
        assert_eq!(taps, ["tap0", "tap9"]);
        assert_eq!(restored.vsock.unwrap().uds_path, "/new.sock");

        let err = apply(
            r#""network_overrides": [{"iface_id": "eth7", "host_dev_name": "tap9"}]"#,
            saved.clone(),
        )
        .unwrap_err();
        assert!(
            err.contains("network_overrides")
                && err.contains("no network interface \"eth7\"")
                && err.contains("[eth0, eth1]"),
            "{err}"
        );
        let err = apply(
            r#""vsock_override": {"uds_path": "/new.sock"}"#,
            VmConfig::default(),
        )
        .unwrap_err();
        assert!(
            err.contains("vsock_override") && err.contains("no vsock device"),
            "{err}"
        );
        let err = from_json_slice::<SnapshotLoadParams>(
            Some("snapshot/load"),
            br#"{"snapshot_path": "s", "network_overrides": [{"iface_id": "eth0"}]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("host_dev_name"), "{err}");
    }

    #[test]
    fn boot_requires_a_kernel() {
        let cfg = VmConfig::default();
        assert!(matches!(
            cfg.validate_for_boot(),
            Err(ConfigError::Missing("boot-source"))
        ));
    }
}
