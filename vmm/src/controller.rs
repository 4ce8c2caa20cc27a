//! The one narrow door to the VMM: every API request and every config-file section becomes a
//! [`VmmAction`] handled here, before boot (configuring) or after (running, paused).

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::builder::snapshot::{build_microvm_from_snapshot, save_state};
use crate::builder::{build_microvm, BuildError, DeviceFactory, RunningVm};
use crate::config::{
    BalloonConfig, BootSource, ConfigError, DriveConfig, LoggerConfig, MachineConfig,
    MetricsConfig, NetworkInterfaceConfig, SerialConfig, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType, VmConfig, VsockConfig,
};
use crate::devices::legacy::console::{CappedConsole, ConsoleLimit};
use crate::devices::legacy::serial::SerialOut;
use crate::exit::VmExit;
use crate::metrics::{MetricsError, MetricsSink};
use crate::seccomp::{Filters, SeccompError};
use crate::snapshot::{read_snapshot, write_snapshot, LoadedSnapshot, SnapshotError};
use crate::vstate::memory::{mark_dirty, reset_dirty, PageMap};

/// Version reported by `GET /` and `GET /version`.
pub const VMM_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A request to the VMM.
#[derive(Debug)]
pub enum VmmAction {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /vm/config`.
    GetFullConfig,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfig),
    /// `PATCH /machine-config`: fields present in the JSON object replace the current ones.
    PatchMachineConfig(Value),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`.
    PutDrive(DriveConfig),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterfaceConfig),
    /// `PATCH /drives/{id}`: new image or rate limiter, before or after boot.
    PatchDrive(crate::devices::virtio::update::DrivePatch),
    /// `PATCH /network-interfaces/{id}`: new rate limiters, before or after boot.
    PatchNetworkInterface(crate::devices::virtio::update::NetworkInterfacePatch),
    /// `PUT /vsock`.
    PutVsock(VsockConfig),
    /// `GET /balloon`.
    GetBalloon,
    /// `PUT /balloon`.
    PutBalloon(BalloonConfig),
    /// `PUT /logger`.
    PutLogger(LoggerConfig),
    /// `PUT /metrics`.
    PutMetrics(MetricsConfig),
    /// `PUT /actions` InstanceStart.
    InstanceStart,
    /// `PUT /actions` SendCtrlAltDel.
    SendCtrlAltDel,
    /// `PUT /actions` FlushMetrics.
    FlushMetrics,
    /// `PATCH /vm` Paused.
    Pause,
    /// `PATCH /vm` Resumed.
    Resume,
    /// `PUT /snapshot/create`: the paused VM's state and memory to two files.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`: a fresh VMM becomes the VM of a snapshot.
    LoadSnapshot(SnapshotLoadParams),
}

/// A successful answer: nothing (HTTP 204) or a JSON body (HTTP 200).
#[derive(Debug, PartialEq)]
pub enum VmmResponse {
    /// No content.
    Empty,
    /// A JSON document.
    Json(Value),
}

/// A failed request; every variant is the client's to fix (HTTP 400).
#[derive(Debug, thiserror::Error)]
pub enum VmmActionError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A drive cannot be used (Firecracker's checks at `PUT /drives`).
    #[error(transparent)]
    Drive(#[from] crate::devices::virtio::block::BlockError),
    /// The VM could not be built.
    #[error("cannot start the microVM: {0}")]
    Start(#[from] BuildError),
    /// The request is only valid before boot.
    #[error("{0} is not supported after starting the microVM")]
    AfterBoot(&'static str),
    /// The request is only valid after boot.
    #[error("{0} is not supported before starting the microVM")]
    BeforeBoot(&'static str),
    /// The logger could not be configured.
    #[error(transparent)]
    Logger(#[from] crate::logger::LoggerError),
    /// Metrics could not be configured or flushed.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// The console file could not be opened.
    #[error("cannot open the guest console {0}: {1}")]
    SerialOut(String, std::io::Error),
    /// The main thread's seccomp filter could not be installed.
    #[error(transparent)]
    Seccomp(#[from] SeccompError),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// A snapshot could not be created or loaded.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// `PUT /snapshot/create` on a VM that is not paused.
    #[error("Cannot create a snapshot: the microVM is not paused; pause it first with PATCH /vm {{\"state\": \"Paused\"}}")]
    NotPaused,
    /// `PUT /snapshot/load` on a VMM that was already configured.
    #[error("Loading a microVM snapshot is not allowed after configuring boot-specific resources: load it in a fresh VMM")]
    LoadAfterConfig,
}

/// The VM's externally visible state (Firecracker's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum InstanceState {
    /// Configuring.
    #[serde(rename = "Not started")]
    NotStarted,
    /// vCPUs running.
    Running,
    /// vCPUs paused.
    Paused,
}

/// Owns the configuration and, once started, the running VM.
pub struct Controller {
    id: String,
    config: VmConfig,
    running: Option<RunningVm>,
    exit: Arc<VmExit>,
    make_devices: Box<DeviceFactory<'static>>,
    metrics: Option<MetricsSink>,
    started: Instant,
    seccomp: Filters,
    console_limit: Option<ConsoleLimit>,
    /// With the `Uffd` backend, the userfaultfd the page server serves: held while the VM
    /// lives, so that guest memory never silently reads zeros if the page server dies.
    page_server_uffd: Option<OwnedFd>,
}

/// The guest console sink: the configured file, or the VMM's stdout; capped at `limit`.
fn open_serial_out(
    config: Option<&SerialConfig>,
    limit: Option<ConsoleLimit>,
) -> Result<SerialOut, VmmActionError> {
    let (file, name) = match config {
        Some(SerialConfig { serial_out_path }) => (
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(serial_out_path)
                .map_err(|e| VmmActionError::SerialOut(serial_out_path.clone(), e))?,
            serial_out_path.as_str(),
        ),
        None => match limit {
            None => return Ok(Box::new(std::io::stdout())),
            Some(_) => (
                std::io::stdout()
                    .as_fd()
                    .try_clone_to_owned()
                    .map(std::fs::File::from)
                    .map_err(|e| VmmActionError::SerialOut("stdout".into(), e))?,
                "stdout",
            ),
        },
    };
    match limit {
        None => Ok(Box::new(file)),
        Some(limit) => CappedConsole::new(file, limit)
            .map(|console| Box::new(console) as SerialOut)
            .map_err(|e| VmmActionError::SerialOut(name.into(), e)),
    }
}

/// Replaces the entry with the same id, or appends it.
fn upsert<T>(list: &mut Vec<T>, item: T, same: impl Fn(&T, &T) -> bool) {
    match list.iter_mut().find(|existing| same(existing, &item)) {
        Some(existing) => *existing = item,
        None => list.push(item),
    }
}

impl Controller {
    /// A controller for VM `id`, whose virtio devices `make_devices` creates at boot, and whose
    /// threads confine themselves with `seccomp` once the VM is built.
    pub fn new(
        id: String,
        make_devices: Box<DeviceFactory<'static>>,
        exit: Arc<VmExit>,
        seccomp: Filters,
    ) -> Self {
        Controller {
            id,
            config: VmConfig::default(),
            running: None,
            exit,
            make_devices,
            metrics: None,
            started: Instant::now(),
            seccomp,
            console_limit: None,
            page_server_uffd: None,
        }
    }

    /// Keeps the guest console within `limit` bytes when it is a regular file.
    pub fn with_console_limit(mut self, limit: Option<ConsoleLimit>) -> Self {
        self.console_limit = limit;
        self
    }

    /// The running VM, once booted.
    pub fn running(&self) -> Option<&RunningVm> {
        self.running.as_ref()
    }

    /// The state reported by `GET /`.
    pub fn state(&self) -> InstanceState {
        match &self.running {
            None => InstanceState::NotStarted,
            Some(vm) if vm.vcpus.is_paused() => InstanceState::Paused,
            Some(_) => InstanceState::Running,
        }
    }

    /// Applies a whole configuration document, section by section, as the API would.
    pub fn apply_config(&mut self, config: VmConfig) -> Result<(), VmmActionError> {
        config.validate_sections()?;
        if let Some(logger) = &config.logger {
            crate::logger::configure(logger)?;
        }
        if let Some(metrics) = &config.metrics {
            self.metrics = Some(MetricsSink::open(&metrics.metrics_path, self.started)?);
        }
        self.config = config;
        Ok(())
    }

    fn before_boot(&self, what: &'static str) -> Result<(), VmmActionError> {
        match self.running {
            Some(_) => Err(VmmActionError::AfterBoot(what)),
            None => Ok(()),
        }
    }

    fn vm(&self, what: &'static str) -> Result<&RunningVm, VmmActionError> {
        self.running
            .as_ref()
            .ok_or(VmmActionError::BeforeBoot(what))
    }

    /// Handles one request.
    pub fn handle(&mut self, action: VmmAction) -> Result<VmmResponse, VmmActionError> {
        use VmmAction::*;
        match action {
            GetInstanceInfo => Ok(VmmResponse::Json(json!({
                "app_name": "mvm",
                "id": self.id,
                "state": self.state(),
                "vmm_version": VMM_VERSION,
            }))),
            GetVersion => Ok(VmmResponse::Json(
                json!({ "firecracker_version": VMM_VERSION }),
            )),
            GetFullConfig => Ok(VmmResponse::Json(
                serde_json::to_value(&self.config).expect("the config always serializes"),
            )),
            GetMachineConfig => Ok(VmmResponse::Json(
                serde_json::to_value(&self.config.machine_config).expect("plain struct"),
            )),
            PutMachineConfig(machine) => {
                self.before_boot("PUT /machine-config")?;
                machine.validate()?;
                self.config.machine_config = machine;
                Ok(VmmResponse::Empty)
            }
            PatchMachineConfig(patch) => {
                self.before_boot("PATCH /machine-config")?;
                let mut current =
                    serde_json::to_value(&self.config.machine_config).expect("plain struct");
                let (Value::Object(current_map), Value::Object(patch_map)) = (&mut current, patch)
                else {
                    return Err(VmmActionError::BadRequest(
                        "the PATCH body must be a JSON object".into(),
                    ));
                };
                current_map.extend(patch_map);
                let machine: MachineConfig =
                    crate::config::from_json_value(Some("machine-config"), current)?;
                machine.validate()?;
                self.config.machine_config = machine;
                Ok(VmmResponse::Empty)
            }
            PutBootSource(boot) => {
                self.before_boot("PUT /boot-source")?;
                boot.validate()?;
                self.config.boot_source = Some(boot);
                Ok(VmmResponse::Empty)
            }
            PutDrive(drive) => {
                self.before_boot("PUT /drives")?;
                // Like Firecracker, open the image now so a bad path fails this request.
                crate::devices::virtio::block::Block::open_image(&drive)?;
                if drive.is_root_device {
                    if let Some(other) = self
                        .config
                        .drives
                        .iter()
                        .find(|d| d.is_root_device && d.drive_id != drive.drive_id)
                    {
                        return Err(VmmActionError::BadRequest(format!(
                            "drive {} is already the root device; only one drive may have is_root_device",
                            other.drive_id
                        )));
                    }
                }
                upsert(&mut self.config.drives, drive, |a, b| {
                    a.drive_id == b.drive_id
                });
                // The root drive goes first so it is /dev/vda.
                self.config.drives.sort_by_key(|d| !d.is_root_device);
                Ok(VmmResponse::Empty)
            }
            PutNetworkInterface(iface) => {
                self.before_boot("PUT /network-interfaces")?;
                upsert(&mut self.config.network_interfaces, iface, |a, b| {
                    a.iface_id == b.iface_id
                });
                Ok(VmmResponse::Empty)
            }
            PatchDrive(patch) => {
                let devices = self.running.as_ref().map(|vm| vm.virtio.as_slice());
                crate::devices::virtio::update::patch_drive(&mut self.config, devices, patch)
                    .map_err(|e| VmmActionError::BadRequest(e.to_string()))?;
                Ok(VmmResponse::Empty)
            }
            PatchNetworkInterface(patch) => {
                let devices = self.running.as_ref().map(|vm| vm.virtio.as_slice());
                crate::devices::virtio::update::patch_network_interface(
                    &mut self.config,
                    devices,
                    patch,
                )
                .map_err(|e| VmmActionError::BadRequest(e.to_string()))?;
                Ok(VmmResponse::Empty)
            }
            PutVsock(vsock) => {
                self.before_boot("PUT /vsock")?;
                vsock.validate()?;
                self.config.vsock = Some(vsock);
                Ok(VmmResponse::Empty)
            }
            GetBalloon => match &self.config.balloon {
                Some(balloon) => Ok(VmmResponse::Json(
                    serde_json::to_value(balloon).expect("plain struct"),
                )),
                None => Err(VmmActionError::BadRequest(
                    "no balloon is configured (PUT /balloon before InstanceStart)".into(),
                )),
            },
            PutBalloon(balloon) => {
                self.before_boot("PUT /balloon")?;
                balloon.validate()?;
                self.config.balloon = Some(balloon);
                Ok(VmmResponse::Empty)
            }
            PutLogger(logger) => {
                self.before_boot("PUT /logger")?;
                crate::logger::configure(&logger)?;
                self.config.logger = Some(logger);
                Ok(VmmResponse::Empty)
            }
            PutMetrics(metrics) => {
                self.before_boot("PUT /metrics")?;
                self.metrics = Some(MetricsSink::open(&metrics.metrics_path, self.started)?);
                self.config.metrics = Some(metrics);
                Ok(VmmResponse::Empty)
            }
            InstanceStart => {
                self.before_boot("InstanceStart")?;
                self.start()?;
                Ok(VmmResponse::Empty)
            }
            SendCtrlAltDel => {
                let vm = self.vm("SendCtrlAltDel")?;
                vm.i8042
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .send_ctrl_alt_del();
                Ok(VmmResponse::Empty)
            }
            FlushMetrics => {
                self.flush_metrics()?;
                Ok(VmmResponse::Empty)
            }
            Pause => {
                self.vm("Pausing")?.vcpus.pause();
                Ok(VmmResponse::Empty)
            }
            Resume => {
                self.vm("Resuming")?.vcpus.resume();
                Ok(VmmResponse::Empty)
            }
            CreateSnapshot(params) => {
                let tracking = self.config.machine_config.track_dirty_pages;
                params.validate(tracking)?;
                // Only a Full save reads memory it may skip; memory a page server fills
                // holds what it has not served yet, so it is read whole.
                let mut page_map = match (&self.page_server_uffd, params.snapshot_type) {
                    (None, SnapshotType::Full) => PageMap::open(),
                    _ => None,
                };
                let vm = self.vm("PUT /snapshot/create")?;
                if !vm.vcpus.is_paused() {
                    return Err(VmmActionError::NotPaused);
                }
                let started = std::time::Instant::now();
                // The device threads stay frozen until `_frozen` goes, after memory is written.
                let (state, _frozen) = save_state(vm, &self.config)?;
                let frozen = started.elapsed();
                if tracking {
                    let log = vm
                        .vm
                        .dirty_log(&vm.mem)
                        .map_err(|e| SnapshotError::Save("the dirty page log", e.to_string()))?;
                    mark_dirty(&vm.mem, &log);
                }
                write_snapshot(
                    &state,
                    &params.snapshot_path,
                    &vm.mem,
                    &params.mem_file_path,
                    params.snapshot_type,
                    page_map.as_mut(),
                )?;
                // The next Diff holds what is written from now on.
                reset_dirty(&vm.mem);
                log::info!(
                    "snapshot of microVM {} written to {} in {:?} (its devices frozen and its \
                     state taken in {frozen:?}, then its memory written)",
                    self.id,
                    params.snapshot_path,
                    started.elapsed()
                );
                Ok(VmmResponse::Empty)
            }
            LoadSnapshot(params) => {
                self.load_snapshot(&params)?;
                Ok(VmmResponse::Empty)
            }
        }
    }

    /// Whether any section a boot or a snapshot load would define was configured (logger and
    /// metrics are not: they belong to this process).
    fn boot_configured(&self) -> bool {
        let c = &self.config;
        c.boot_source.is_some()
            || c.machine_config != MachineConfig::default()
            || !c.drives.is_empty()
            || !c.network_interfaces.is_empty()
            || c.vsock.is_some()
            || c.balloon.is_some()
            || c.serial.is_some()
    }

    /// Becomes the VM of a snapshot: rebuilt from its state, memory mapped from its file, then
    /// (once the main thread is confined) resumed or left paused.
    fn load_snapshot(&mut self, params: &SnapshotLoadParams) -> Result<(), VmmActionError> {
        self.before_boot("PUT /snapshot/load")?;
        if self.boot_configured() {
            return Err(VmmActionError::LoadAfterConfig);
        }
        let LoadedSnapshot { state, mem, uffd } =
            read_snapshot(&params.snapshot_path, params.memory_source()?)?;
        // The VM's own sections come from the snapshot, its taps and vsock socket possibly
        // overridden; the console, logger and metrics stay this process's.
        let mut config = state.config(&params.snapshot_path)?;
        params.apply_overrides(&mut config)?;
        // As with Firecracker, the load request (not the snapshot) says whether the loaded
        // VM tracks dirty pages.
        config.machine_config.track_dirty_pages =
            params.track_dirty_pages || params.enable_diff_snapshots;
        config.logger = self.config.logger.take();
        config.metrics = self.config.metrics.take();
        config.serial = None;
        let serial_out = open_serial_out(None, self.console_limit)?;
        let vm = build_microvm_from_snapshot(
            &state,
            &config,
            mem,
            serial_out,
            &*self.make_devices,
            self.exit.clone(),
            &self.seccomp,
        )?;
        self.config = config;
        self.run_built(vm, params.resume_vm)?;
        self.page_server_uffd = uffd;
        log::info!("microVM {} loaded from {}", self.id, params.snapshot_path);
        Ok(())
    }

    /// Builds the VM from the current configuration, confines the main thread, then lets the
    /// vCPUs run: no guest code runs while the main thread is unfiltered.
    fn start(&mut self) -> Result<(), VmmActionError> {
        let serial_out = open_serial_out(self.config.serial.as_ref(), self.console_limit)?;
        let vm = build_microvm(
            &self.config,
            serial_out,
            &*self.make_devices,
            self.exit.clone(),
            &self.seccomp,
        )?;
        self.run_built(vm, true)?;
        log::info!("microVM {} started", self.id);
        Ok(())
    }

    /// Confines the main thread, which from here on only serves events, then lets the vCPUs
    /// of the built `vm` run (`resume`) or leaves them paused: no guest code runs while the
    /// main thread is unfiltered.
    fn run_built(&mut self, vm: RunningVm, resume: bool) -> Result<(), VmmActionError> {
        if let Err(e) = self.seccomp.apply("vmm") {
            vm.vcpus.discard();
            return Err(e.into());
        }
        if resume {
            vm.vcpus.resume();
        } else {
            vm.vcpus.hold_paused();
        }
        self.running = Some(vm);
        Ok(())
    }

    /// Writes one metrics line, when metrics are configured.
    pub fn flush_metrics(&mut self) -> Result<(), VmmActionError> {
        if let Some(sink) = &mut self.metrics {
            sink.flush()?;
        }
        Ok(())
    }
}
