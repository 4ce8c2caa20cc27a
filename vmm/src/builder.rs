//! Configuration → running VM: guest memory, KVM VM, kernel and boot data, devices, vCPUs.
//! Everything is validated before the first KVM call that could leave the VM half-built.

pub mod devices;
pub mod snapshot;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::{Arc, Mutex};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{self, bzimage::BzImage, elf::Elf, KernelLoader, KernelLoaderResult};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile};

use crate::arch::x86_64::boot::{
    write_pvh_start_info, write_zero_page, BootError, InitrdPlacement,
};
use crate::arch::x86_64::cpuid::{host_is_qemu_tcg, Topology};
use crate::arch::x86_64::layout::*;
use crate::arch::x86_64::mptable::{setup_mptable, MptableError};
use crate::arch::x86_64::regs::BootProtocol;
use crate::config::{ConfigError, VmConfig, DEFAULT_BOOT_ARGS};
use crate::devices::legacy::i8042::{I8042_KBD_IRQ, I8042_PORT, I8042_PORT_LEN};
use crate::devices::legacy::serial::{SerialOut, COM1_IRQ, COM1_PORT, COM1_PORT_LEN};
use crate::devices::legacy::{SerialDevice, I8042};
use crate::devices::virtio::mmio::{MmioTransport, MMIO_QUEUE_NOTIFY};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::devices::IrqLine;
use crate::exit::VmExit;
use crate::seccomp::Filters;
use crate::vstate::bus::{Bus, BusError};
use crate::vstate::memory::{create_guest_memory, GuestMemory, MemoryError};
use crate::vstate::vcpu::{Vcpu, VcpuError, Vcpus};
use crate::vstate::vm::{Vm, VmError};

/// Errors while building a VM, each naming what to fix.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file named in the configuration cannot be opened.
    #[error("cannot open {what} {path}: {err}")]
    OpenFile {
        /// Which file (kernel, initrd).
        what: &'static str,
        /// Its path.
        path: String,
        /// The OS error.
        err: std::io::Error,
    },
    /// The kernel file is neither ELF nor bzImage.
    #[error("kernel {0} is neither an ELF vmlinux nor a bzImage")]
    NotAKernel(String),
    /// The kernel file has the right magic but could not be loaded.
    #[error("kernel {path} is corrupt or does not fit in guest memory: {err}")]
    KernelLoad {
        /// Its path.
        path: String,
        /// What the loader said.
        err: loader::Error,
    },
    /// The initrd does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below the kernel's limit")]
    InitrdTooBig {
        /// Its path.
        path: String,
        /// Its size.
        size: u64,
    },
    /// The initrd could not be read.
    #[error("cannot read initrd {path}: {err}")]
    InitrdRead {
        /// Its path.
        path: String,
        /// What failed.
        err: String,
    },
    /// The kernel command line is invalid.
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    /// Guest memory could not be set up.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// KVM refused something.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A vCPU could not be set up.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Boot information could not be written.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// A device could not be placed on a bus.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// Too many virtio devices for the IRQ lines available.
    #[error("too many virtio devices: at most {} fit", VIRTIO_IRQ_MAX - VIRTIO_IRQ_BASE + 1)]
    TooManyDevices,
    /// A device could not be created.
    #[error("cannot create {0}: {1}")]
    Device(String, String),
    /// A host resource (eventfd, thread) could not be created.
    #[error("host resource: {0}")]
    Io(#[from] std::io::Error),
    /// A KVM call on the VM failed while wiring devices.
    #[error("KVM {0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    /// A snapshot cannot be restored on this host.
    #[error("cannot restore the snapshot: {0}")]
    Restore(String),
}

/// Creates the virtio devices of a configuration ([`devices::create_virtio_devices`] in the
/// VMM); the builder places what it returns on the MMIO bus.
pub type DeviceFactory<'a> =
    dyn Fn(&VmConfig, &Filters) -> Result<Vec<Box<dyn VirtioDevice>>, BuildError> + 'a;

/// A booted VM and the handles the VMM needs to run, pause and stop it.
pub struct RunningVm {
    /// The KVM VM (kept alive for the vCPUs and irqfds).
    pub vm: Vm,
    /// Guest memory (kept alive while KVM maps it).
    pub mem: GuestMemory,
    /// vCPU threads.
    pub vcpus: Vcpus,
    /// The UART, for feeding host input.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The i8042, for Ctrl+Alt+Del.
    pub i8042: Arc<Mutex<I8042>>,
    /// Virtio-mmio transports, in window order.
    pub virtio: Vec<Arc<Mutex<MmioTransport>>>,
}

/// How the kernel was loaded: where to enter and with which protocol.
struct LoadedKernel {
    entry: GuestAddress,
    protocol: BootProtocol,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

fn open(what: &'static str, path: &str) -> Result<File, BuildError> {
    File::open(path).map_err(|err| BuildError::OpenFile {
        what,
        path: path.to_string(),
        err,
    })
}

/// Loads an ELF vmlinux (PVH entry when it has the note, 64-bit entry otherwise) or a bzImage.
fn load_kernel(mem: &GuestMemory, path: &str) -> Result<LoadedKernel, BuildError> {
    let mut file = open("kernel", path)?;
    let mut magic = [0u8; 4];
    let is_elf = file.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let load_err = |err| BuildError::KernelLoad {
        path: path.to_string(),
        err,
    };
    file.seek(SeekFrom::Start(0))
        .map_err(|e| BuildError::OpenFile {
            what: "kernel",
            path: path.to_string(),
            err: e,
        })?;
    if is_elf {
        let result: KernelLoaderResult =
            Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
        return Ok(match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(pvh_entry) => LoadedKernel {
                entry: pvh_entry,
                protocol: BootProtocol::PvhBoot,
                setup_header: None,
            },
            _ => LoadedKernel {
                entry: result.kernel_load,
                protocol: BootProtocol::LinuxBoot,
                setup_header: None,
            },
        });
    }
    match BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(result) => Ok(LoadedKernel {
            // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
            entry: result.kernel_load.unchecked_add(0x200),
            protocol: BootProtocol::LinuxBoot,
            setup_header: result.setup_header,
        }),
        Err(loader::Error::Bzimage(loader::bzimage::Error::InvalidBzImage)) => {
            Err(BuildError::NotAKernel(path.to_string()))
        }
        Err(err) => Err(load_err(err)),
    }
}

/// Places the initrd page-aligned at the top of low RAM (below the MMIO gap), like Firecracker.
fn load_initrd(mem: &GuestMemory, path: &str) -> Result<InitrdPlacement, BuildError> {
    let mut file = open("initrd", path)?;
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(|e| BuildError::InitrdRead {
            path: path.to_string(),
            err: e.to_string(),
        })?;
    file.seek(SeekFrom::Start(0))
        .map_err(|e| BuildError::InitrdRead {
            path: path.to_string(),
            err: e.to_string(),
        })?;
    let too_big = || BuildError::InitrdTooBig {
        path: path.to_string(),
        size,
    };
    let low_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().raw_value() + r.len())
        .ok_or_else(too_big)?;
    let start = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= HIMEM_START)
        .ok_or_else(too_big)?;
    let address = GuestAddress(start);
    let mut slice = mem
        .get_slice(address, size as usize)
        .map_err(|e| BuildError::InitrdRead {
            path: path.to_string(),
            err: e.to_string(),
        })?;
    file.read_exact_volatile(&mut slice)
        .map_err(|e| BuildError::InitrdRead {
            path: path.to_string(),
            err: e.to_string(),
        })?;
    Ok(InitrdPlacement {
        address,
        size: size as usize,
    })
}

/// The kernel command line: the configured (or default) arguments, `root=` for a root drive,
/// and one `virtio_mmio.device=` entry per virtio device.
fn build_cmdline(
    config: &VmConfig,
    boot_args: &str,
    virtio_count: usize,
) -> Result<Cmdline, BuildError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BuildError::Cmdline)?;
    cmdline.insert_str(boot_args).map_err(BuildError::Cmdline)?;
    if let Some(root) = config.drives.iter().find(|d| d.is_root_device) {
        if !boot_args.split_whitespace().any(|a| a.starts_with("root=")) {
            // Drives are attached in order, with the root drive first: /dev/vda.
            let root_arg = match &root.partuuid {
                Some(uuid) => format!("root=PARTUUID={uuid}"),
                None => "root=/dev/vda".to_string(),
            };
            cmdline.insert_str(root_arg).map_err(BuildError::Cmdline)?;
            let mode = if root.is_read_only.unwrap_or(false) {
                "ro"
            } else {
                "rw"
            };
            cmdline.insert_str(mode).map_err(BuildError::Cmdline)?;
        }
    }
    for index in 0..virtio_count {
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let irq = VIRTIO_IRQ_BASE + index as u32;
        cmdline
            .add_virtio_mmio_device(VIRTIO_MMIO_SIZE, GuestAddress(base), irq, None)
            .map_err(BuildError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Opens KVM, creates the VM with `mem` as its memory and its in-kernel irqchip and PIT.
fn create_vm(mem: &GuestMemory, track_dirty_pages: bool) -> Result<Vm, BuildError> {
    let vm = Vm::new()?;
    vm.register_memory(mem, track_dirty_pages)?;
    vm.setup_irqchip()?;
    Ok(vm)
}

fn register_irqfd(vm: &Vm, line: &IrqLine) -> Result<(), BuildError> {
    vm.fd()
        .register_irqfd(line.eventfd(), line.gsi())
        .map_err(|e| BuildError::Kvm("KVM_IRQFD", e))
}

/// The legacy devices a VM has: its UART and i8042.
type LegacyDevices = (Arc<Mutex<SerialDevice>>, Arc<Mutex<I8042>>);

/// Places the UART and the i8042 (made by the two closures from their interrupt lines) on
/// `pio`, their irqfds registered.
fn attach_legacy_devices(
    vm: &Vm,
    pio: &mut Bus,
    make_serial: impl FnOnce(IrqLine) -> Result<SerialDevice, BuildError>,
    make_i8042: impl FnOnce(IrqLine) -> I8042,
) -> Result<LegacyDevices, BuildError> {
    let serial_irq = IrqLine::new(COM1_IRQ)?;
    register_irqfd(vm, &serial_irq)?;
    let serial = Arc::new(Mutex::new(make_serial(serial_irq)?));
    pio.insert(serial.clone(), COM1_PORT, COM1_PORT_LEN)?;
    let kbd_irq = IrqLine::new(I8042_KBD_IRQ)?;
    register_irqfd(vm, &kbd_irq)?;
    let i8042 = Arc::new(Mutex::new(make_i8042(kbd_irq)));
    pio.insert(i8042.clone(), I8042_PORT, I8042_PORT_LEN)?;
    Ok((serial, i8042))
}

/// Places each of `devices` behind a virtio-mmio window on `mmio` (in order from
/// [`VIRTIO_MMIO_START`]), its irqfd and queue ioeventfds registered; `prepare` readies each
/// window (a restore puts its saved state back) before any vCPU can reach it.
fn attach_virtio_devices(
    vm: &Vm,
    mem: &GuestMemory,
    devices: Vec<Box<dyn VirtioDevice>>,
    mmio: &mut Bus,
    mut prepare: impl FnMut(usize, &mut MmioTransport) -> Result<(), BuildError>,
) -> Result<Vec<Arc<Mutex<MmioTransport>>>, BuildError> {
    let mut virtio = Vec::with_capacity(devices.len());
    for (index, device) in devices.into_iter().enumerate() {
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let line = IrqLine::new(VIRTIO_IRQ_BASE + index as u32)?;
        register_irqfd(vm, &line)?;
        let mut transport =
            MmioTransport::new(device, mem.clone(), Arc::new(VirtioInterrupt::new(line)))?;
        for (queue, evt) in transport.queue_evts().iter().enumerate() {
            let addr = kvm_ioctls::IoEventAddress::Mmio(base + MMIO_QUEUE_NOTIFY);
            vm.fd()
                .register_ioevent(evt, &addr, queue as u32)
                .map_err(|e| BuildError::Kvm("KVM_IOEVENTFD", e))?;
        }
        prepare(index, &mut transport)?;
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
        virtio.push(transport);
    }
    Ok(virtio)
}

/// Builds guest memory, the VM, boot data, devices and vCPUs from `config`. The vCPU threads
/// install their `seccomp` filter and then wait: the guest runs only once the caller has
/// confined its own thread and calls [`Vcpus::resume`] (or [`Vcpus::discard`] to give up).
/// `serial_out` receives the guest console; `make_devices` creates the virtio devices.
pub fn build_microvm(
    config: &VmConfig,
    serial_out: SerialOut,
    make_devices: &DeviceFactory<'_>,
    exit: Arc<VmExit>,
    seccomp: &Filters,
) -> Result<RunningVm, BuildError> {
    let boot = config.validate_for_boot()?;
    let machine = &config.machine_config;
    // Open the files first: a wrong path must not cost a VM.
    open("kernel", &boot.kernel_image_path)?;
    if let Some(initrd) = &boot.initrd_path {
        open("initrd", initrd)?;
    }
    let devices = make_devices(config, seccomp)?;
    if devices.len() > (VIRTIO_IRQ_MAX - VIRTIO_IRQ_BASE + 1) as usize {
        return Err(BuildError::TooManyDevices);
    }
    let boot_args = boot.boot_args.as_deref().unwrap_or(DEFAULT_BOOT_ARGS);
    let cmdline = build_cmdline(config, boot_args, devices.len())?;

    let mem = create_guest_memory(machine.mem_size_mib)?;
    let kernel = load_kernel(&mem, &boot.kernel_image_path)?;
    let initrd = boot
        .initrd_path
        .as_deref()
        .map(|path| load_initrd(&mem, path))
        .transpose()?;
    let cmdline_str = cmdline.as_cstring().map_err(BuildError::Cmdline)?;
    loader::load_cmdline(&mem, GuestAddress(CMDLINE_START), &cmdline).map_err(|err| {
        BuildError::KernelLoad {
            path: boot.kernel_image_path.clone(),
            err,
        }
    })?;
    match kernel.protocol {
        BootProtocol::LinuxBoot => write_zero_page(
            &mem,
            cmdline_str.as_bytes_with_nul().len(),
            initrd,
            kernel.setup_header,
        )?,
        BootProtocol::PvhBoot => write_pvh_start_info(&mem, initrd)?,
    }
    setup_mptable(&mem, machine.vcpu_count)?;

    let vm = create_vm(&mem, machine.track_dirty_pages)?;
    let mut pio = Bus::new();
    let (serial, i8042) = attach_legacy_devices(
        &vm,
        &mut pio,
        |irq| Ok(SerialDevice::new(irq, serial_out)),
        |irq| I8042::new(exit.clone(), irq),
    )?;
    let mut mmio = Bus::new();
    let virtio = attach_virtio_devices(&vm, &mem, devices, &mut mmio, |_, _| Ok(()))?;

    let topology = Topology {
        vcpu_count: machine.vcpu_count,
        smt: machine.smt,
    };
    let hide_xsave = host_is_qemu_tcg();
    let vcpus = (0..machine.vcpu_count)
        .map(|id| {
            Vcpu::new(
                &vm,
                id,
                topology,
                hide_xsave,
                &mem,
                kernel.entry,
                kernel.protocol,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let vcpus = Vcpus::start(vcpus, Arc::new(pio), Arc::new(mmio), exit, seccomp)?;
    Ok(RunningVm {
        vm,
        mem,
        vcpus,
        serial,
        i8042,
        virtio,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BootSource, DriveConfig};

    #[test]
    fn cmdline_gets_root_and_virtio_entries() {
        let mut config = VmConfig {
            boot_source: Some(BootSource {
                kernel_image_path: "k".into(),
                ..Default::default()
            }),
            ..Default::default()
        };
        config.drives.push(DriveConfig {
            drive_id: "root".into(),
            path_on_host: Some("r.img".into()),
            is_root_device: true,
            is_read_only: Some(true),
            partuuid: None,
            cache_type: Default::default(),
            io_engine: None,
            rate_limiter: None,
            socket: None,
        });
        let cmdline = build_cmdline(&config, "console=ttyS0", 2).unwrap();
        let s = cmdline.as_cstring().unwrap().into_string().unwrap();
        assert!(s.starts_with("console=ttyS0 root=/dev/vda ro"), "{s}");
        assert!(s.contains("virtio_mmio.device=4K@0xc0001000:5"), "{s}");
        assert!(s.contains("virtio_mmio.device=4K@0xc0002000:6"), "{s}");
    }
}
