//! Saved VMs: what warm templates and live forks restore.
//!
//! Every vm-tier sandbox's jail has a save directory bound at `/snapshot`
//! (`<state dir>/saves/<id>`, the sandbox uid's, on the state directory's disk so that a
//! saved guest memory is reclaimable page cache, never charged to a tmpfs), where its VMM writes
//! a snapshot when asked (`PUT /snapshot/create`). The manager then *adopts* the two files:
//! renames them into a directory of root's, and only then checks them (a regular file with one
//! link each: the VMM's uid cannot swap in a link or a special file once they are out of its
//! reach), hands them to root, read-only. With a copy of the sandbox's writable layer taken
//! while the VM was paused, that is a [`SavedVm`]:
//! - a warm template's snapshot (`<state dir>/snapshots/<template>/`, plus `meta.json`: the
//!   files and size it was made with; used only while they match), made through [`Staging`];
//! - a fork's (`<state dir>/saves/<id>.fork/`), removed once the children run (their jails
//!   hold the files) and with the sandbox's teardown;
//! - a sandbox's snapshot (`<state dir>/sandbox-snapshots/<snapshot id>/`, plus `base.json`),
//!   kept until it is deleted; each create from it restores a set of links to its files
//!   (`<state dir>/saves/<snapshot id>.<random>.use/`), so a deletion meanwhile takes
//!   nothing from under it.

use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::{host, ManagerConfig};
use crate::error::{Error, Result};
use crate::model::{Template, TemplateSnapshot};

/// The VMM's state file in a snapshot directory.
pub const STATE: &str = "vm.state";
/// Guest memory in a snapshot directory.
pub const MEMORY: &str = "vm.mem";
/// The identity of the base image a sandbox's own saved VM ran on.
const BASE: &str = "base.json";
/// The writable layer (the guest's upper or root disk) at the snapshot's instant.
const LAYER: &str = "layer.ext4";
/// What a warm template's snapshot was made from.
const META: &str = "meta.json";

/// The size of a warm template's snapshot: a vm-tier create of this size restores it (a
/// template has at most one snapshot per size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WarmSize {
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory, MiB.
    pub memory_mib: u64,
}

impl WarmSize {
    /// A create's defaults: the size `mvm build` and a warm without a size warm at, and the
    /// one warm pools restore.
    pub const DEFAULT: WarmSize = WarmSize {
        vcpus: super::DEFAULT_VCPUS,
        memory_mib: super::DEFAULT_MEMORY_MIB,
    };

    /// The name of a snapshot directory of this size for template `name`: the template's
    /// own name at the defaults' size (where snapshots were before there were sizes),
    /// `NAME@<vcpus>x<memory_mib>` at others ('@' is never in a template's name).
    fn dir_name(self, name: &str) -> String {
        match self == WarmSize::DEFAULT {
            true => name.to_string(),
            false => format!("{name}@{}x{}", self.vcpus, self.memory_mib),
        }
    }

    /// The size in a snapshot directory's name of template `name` made by
    /// [`dir_name`](Self::dir_name), if it is one.
    fn of_dir_name(name: &str, dir: &str) -> Option<WarmSize> {
        if dir == name {
            return Some(WarmSize::DEFAULT);
        }
        let (vcpus, memory_mib) = dir.strip_prefix(name)?.strip_prefix('@')?.split_once('x')?;
        let size = WarmSize {
            vcpus: vcpus.parse().ok()?,
            memory_mib: memory_mib.parse().ok()?,
        };
        (size.dir_name(name) == dir).then_some(size)
    }
}

/// A saved VM that new sandboxes restore: its state, memory and writable layer.
#[derive(Debug, Clone)]
pub struct SavedVm {
    dir: PathBuf,
}

impl SavedVm {
    /// The VMM's state file.
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    /// Guest memory.
    pub fn memory(&self) -> PathBuf {
        self.dir.join(MEMORY)
    }

    /// Copies the layer of the snapshot's instant to `to`, owned by `uid` (holes kept).
    pub fn copy_layer(&self, to: &Path, uid: u32) -> Result<()> {
        clone_or_copy(&self.dir.join(LAYER), to)?;
        fs::set_permissions(to, fs::Permissions::from_mode(0o600))
            .and_then(|()| std::os::unix::fs::chown(to, Some(uid), Some(uid)))
            .map_err(|e| Error::host(format!("handing {} to the sandbox", to.display()), e))
    }

    /// Hands it to the started VMM of sandbox `id` (a fork pool's, see [`make_restore_dir`]):
    /// links the state and memory files into the sandbox's restore directory and makes its
    /// writable layer `layer` (bound into its jail already, so written in place: a link
    /// there is not followed) the layer of the snapshot's instant.
    pub fn hand_to(&self, cfg: &ManagerConfig, id: &str, layer: &Path) -> Result<()> {
        let restore = cfg.restore_dir(id);
        for file in [STATE, MEMORY] {
            let (from, to) = (self.dir.join(file), restore.join(file));
            fs::hard_link(&from, &to).map_err(|e| {
                Error::host(format!("linking {} to {}", from.display(), to.display()), e)
            })?;
        }
        let dst = fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(layer)
            .map_err(|e| Error::host(format!("opening {}", layer.display()), e))?;
        copy_into(&self.dir.join(LAYER), &dst, layer)
    }

    /// Checks that the template's base image at `base` is the one a sandbox's own saved VM
    /// ran on ([`take_for_resume`]): its guest's file system lies on it.
    pub fn check_base(&self, base: &Path) -> Result<()> {
        let path = self.dir.join(BASE);
        let recorded: Option<SavedBase> = fs::read(&path)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok());
        match recorded {
            Some(was) if was == SavedBase::of(base)? => Ok(()),
            _ => Err(Error::Conflict(format!(
                "the base image {} is not the one the saved VM ran on (replaced or rewritten \
                 since, or {} is unreadable): its guest's file system lies on it, so it is \
                 not resumed on another; put the base image back, or destroy the sandbox",
                base.display(),
                path.display()
            ))),
        }
    }

    /// Moves the sandbox's file `from` into it as `name`, onto the state directory's disk (a
    /// run directory on a tmpfs then holds none of it while the sandbox is saved). A missing
    /// file is skipped.
    pub fn keep_file(&self, from: &Path, name: &str) -> Result<()> {
        match from.exists() {
            true => move_file(from, &self.dir.join(name)),
            false => Ok(()),
        }
    }

    /// The path of its file `name` (see [`keep_file`](Self::keep_file)).
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Moves its file `name` back to `to`, if it has it.
    pub fn return_file(&self, name: &str, to: &Path) -> Result<()> {
        let kept = self.dir.join(name);
        match kept.exists() {
            true => move_file(&kept, to),
            false => Ok(()),
        }
    }

    /// Records beside it the identity of the template's base image at `base`, which its
    /// guest's file system lies on (see [`check_base`](Self::check_base)).
    pub fn record_base(&self, base: &Path) -> Result<()> {
        let path = self.dir.join(BASE);
        let json = serde_json::to_vec(&SavedBase::of(base)?).expect("a base serializes");
        fs::write(&path, json).map_err(|e| Error::host(format!("writing {}", path.display()), e))
    }

    /// Copies a sandbox's own saved VM (see [`take_for_resume`]) into the new directory `dir`
    /// (a sandbox snapshot's, see [`sandbox_snapshot_dir`]): its state and memory linked
    /// (neither is ever written again: a resume maps the memory privately, a new save writes
    /// new files), its layer and base copied.
    pub fn copy_as_snapshot(&self, dir: PathBuf) -> Result<SavedVm> {
        make_root_dir(&dir)?;
        let copy = SavedVm { dir };
        let copied = self
            .link_into(&copy.dir, &[STATE, MEMORY])
            .and_then(|()| clone_or_copy(&self.dir.join(LAYER), &copy.dir.join(LAYER)))
            .and_then(|()| clone_or_copy(&self.dir.join(BASE), &copy.dir.join(BASE)));
        match copied {
            Ok(()) => Ok(copy),
            Err(e) => {
                let _ = copy.remove();
                Err(e)
            }
        }
    }

    /// Links its files into the new directory `<name>.use` of root's in the saves directory,
    /// for one create to restore (removed after it): a deletion of the snapshot meanwhile
    /// removes its directory, not the files the create uses.
    pub fn link_for_create(&self, cfg: &ManagerConfig, name: &str) -> Result<SavedVm> {
        let dir = cfg
            .state_dir
            .join("saves")
            .join(format!("{name}{USE_SUFFIX}"));
        make_saves_dir(&dir, 0o700, None)?;
        let links = SavedVm { dir };
        match self.link_into(&links.dir, &[STATE, MEMORY, LAYER, BASE]) {
            Ok(()) => Ok(links),
            Err(e) => {
                let _ = links.remove();
                Err(e)
            }
        }
    }

    /// Hard-links its files `names` into the directory `to`.
    fn link_into(&self, to: &Path, names: &[&str]) -> Result<()> {
        names.iter().try_for_each(|name| {
            let (from, link) = (self.dir.join(name), to.join(name));
            fs::hard_link(&from, &link).map_err(|e| {
                Error::host(
                    format!("linking {} to {}", from.display(), link.display()),
                    e,
                )
            })
        })
    }

    /// Removes it (sandboxes restored from it keep their files open through their jails).
    pub fn remove(self) -> Result<()> {
        host::remove_tree(&self.dir)
    }
}

impl ManagerConfig {
    /// The directory sandbox `id`'s VMM saves snapshots into.
    fn save_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("saves").join(id)
    }

    /// Where sandbox `id` keeps its own VM while it is saved (state `saved`).
    fn saved_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("saves").join(format!("{id}.saved"))
    }

    /// Where a fork of sandbox `id` keeps its saved VM while the children start.
    pub(super) fn fork_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("saves").join(format!("{id}.fork"))
    }

    /// The directory a fork pool's VMM (sandbox `id`'s) finds the saved VM to load in
    /// (bound read-only at `/restore` in its jail; on the state directory's disk, so that a
    /// fork's files are linked in, not copied).
    fn restore_dir(&self, id: &str) -> PathBuf {
        self.state_dir.join("saves").join(format!("{id}.restore"))
    }

    /// Where sandbox snapshots live.
    fn sandbox_snapshots_dir(&self) -> PathBuf {
        self.state_dir.join("sandbox-snapshots")
    }

    /// Where sandbox snapshot `id` keeps its VM.
    fn sandbox_snapshot_dir(&self, id: &str) -> PathBuf {
        self.sandbox_snapshots_dir().join(id)
    }

    /// Where template snapshots live.
    fn snapshots_dir(&self) -> PathBuf {
        self.state_dir.join("snapshots")
    }

    /// Where template `name`'s snapshot of `size` lives.
    fn snapshot_dir(&self, name: &str, size: WarmSize) -> PathBuf {
        self.snapshots_dir().join(size.dir_name(name))
    }
}

/// Makes sandbox `id`'s empty save directory, its `uid`'s alone (bound into its jail).
pub fn make_save_dir(cfg: &ManagerConfig, id: &str, uid: u32) -> Result<PathBuf> {
    let dir = cfg.save_dir(id);
    make_saves_dir(&dir, 0o700, Some(uid))?;
    Ok(dir)
}

/// Makes the new directory `dir` in the saves directory (root's alone, made if missing) with
/// `mode`, handed to `owner` if given.
fn make_saves_dir(dir: &Path, mode: u32, owner: Option<u32>) -> Result<()> {
    let parent = dir.parent().expect("a saves dir has a parent");
    let made = fs::create_dir_all(parent)
        .and_then(|()| fs::set_permissions(parent, fs::Permissions::from_mode(0o700)))
        .and_then(|()| fs::create_dir(dir))
        .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(mode)))
        .and_then(|()| match owner {
            Some(uid) => std::os::unix::fs::chown(dir, Some(uid), Some(uid)),
            None => Ok(()),
        });
    made.map_err(|e| Error::host(format!("creating {}", dir.display()), e))
}

/// Makes sandbox `id`'s empty restore directory (root's, readable by its VMM), where a saved
/// VM is handed to it later ([`SavedVm::hand_to`]).
pub fn make_restore_dir(cfg: &ManagerConfig, id: &str) -> Result<PathBuf> {
    let dir = cfg.restore_dir(id);
    make_saves_dir(&dir, 0o755, None)?;
    Ok(dir)
}

/// Removes sandbox `id`'s save directory (after its VMM stopped: a new one is made, empty,
/// for the next). Idempotent.
pub fn remove_save_dir(cfg: &ManagerConfig, id: &str) -> Result<()> {
    remove_if_present(&cfg.save_dir(id))
}

/// Removes what sandbox `id` saved: its save directory, a fork's saved VM, its own saved VM,
/// and the restore directory of a fork pool's VMM. Idempotent.
pub fn remove_saves(cfg: &ManagerConfig, id: &str) -> Result<()> {
    let dirs = [
        cfg.save_dir(id),
        cfg.fork_dir(id),
        cfg.saved_dir(id),
        cfg.restore_dir(id),
    ];
    dirs.iter().try_for_each(|dir| remove_if_present(dir))
}

/// Removes the directory tree `dir` if there is one.
fn remove_if_present(dir: &Path) -> Result<()> {
    match dir.exists() {
        true => host::remove_tree(dir),
        false => Ok(()),
    }
}

/// Makes a directory of root's (0700) for a saved VM; an earlier one there goes.
fn make_root_dir(dir: &Path) -> Result<()> {
    remove_if_present(dir)?;
    fs::create_dir(dir)
        .and_then(|()| fs::set_permissions(dir, fs::Permissions::from_mode(0o700)))
        .map_err(|e| Error::host(format!("creating {}", dir.display()), e))
}

/// Moves the state and memory files sandbox `id`'s VMM just saved into `to` (root's), then
/// checks and hands them to root, read-only.
fn adopt(cfg: &ManagerConfig, id: &str, to: &Path) -> Result<()> {
    let from = cfg.save_dir(id);
    for file in [STATE, MEMORY] {
        let (src, dst) = (from.join(file), to.join(file));
        fs::rename(&src, &dst).map_err(|e| Error::host(format!("moving {}", src.display()), e))?;
        // Out of the VMM's reach now: what is checked is what is used.
        let meta = fs::symlink_metadata(&dst)
            .map_err(|e| Error::host(format!("stat {}", dst.display()), e))?;
        if !meta.file_type().is_file() || meta.nlink() != 1 {
            let _ = fs::remove_file(&dst);
            return Err(Error::Host(format!(
                "{} is not a plain file the VMM wrote (a link or a special file); not using it \
                 as a snapshot",
                src.display()
            )));
        }
        std::os::unix::fs::lchown(&dst, Some(0), Some(0))
            .and_then(|()| fs::set_permissions(&dst, fs::Permissions::from_mode(0o444)))
            .map_err(|e| Error::host(format!("handing {} to root", dst.display()), e))?;
    }
    Ok(())
}

/// Takes the VM sandbox `id`'s VMM has just saved, and a copy of its writable `layer`
/// (the VM still paused), as a saved VM in the new directory `dir` (a fork's, a snapshot's).
pub fn take_copy(cfg: &ManagerConfig, id: &str, dir: PathBuf, layer: &Path) -> Result<SavedVm> {
    take_into(cfg, id, dir, Some(layer))
}

/// Takes the VM sandbox `id`'s VMM has just saved as the sandbox's own (state `saved`): its
/// writable layer stays where it is, the sandbox's, for the VMM that resumes it; the identity
/// of the template's base image `base` it runs on is kept beside it (see
/// [`SavedVm::check_base`]).
pub fn take_for_resume(cfg: &ManagerConfig, id: &str, base: &Path) -> Result<SavedVm> {
    let saved = take_into(cfg, id, cfg.saved_dir(id), None)?;
    match saved.record_base(base) {
        Ok(()) => Ok(saved),
        Err(e) => {
            let _ = saved.remove();
            Err(e)
        }
    }
}

/// Where sandbox snapshot `id`'s VM is to be kept (not made yet; the directory of sandbox
/// snapshots, root's alone, is made if missing).
pub fn sandbox_snapshot_dir(cfg: &ManagerConfig, id: &str) -> Result<PathBuf> {
    let parent = cfg.sandbox_snapshots_dir();
    fs::create_dir_all(&parent)
        .and_then(|()| fs::set_permissions(&parent, fs::Permissions::from_mode(0o700)))
        .map_err(|e| Error::host(format!("creating {}", parent.display()), e))?;
    Ok(parent.join(id))
}

/// Sandbox snapshot `id`'s saved VM, if it has one whole.
pub fn sandbox_snapshot(cfg: &ManagerConfig, id: &str) -> Option<SavedVm> {
    let saved = SavedVm {
        dir: cfg.sandbox_snapshot_dir(id),
    };
    (saved.state().is_file() && saved.memory().is_file() && saved.dir.join(LAYER).is_file())
        .then_some(saved)
}

/// Removes sandbox snapshot `id`'s files. Idempotent.
pub fn remove_sandbox_snapshot(cfg: &ManagerConfig, id: &str) -> Result<()> {
    remove_if_present(&cfg.sandbox_snapshot_dir(id))
}

/// Removes what a stopped mvmd left of sandbox snapshots: the directory of every snapshot
/// `keep` does not name (one being taken, or deleted halfway), and the links of every create
/// (`<name>.use`, see [`SavedVm::link_for_create`]) whose `name` is not `in_use`.
pub fn sweep_sandbox_snapshots(
    cfg: &ManagerConfig,
    keep: &[String],
    in_use: impl Fn(&str) -> bool,
) -> Result<()> {
    let names = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let snapshots = cfg.sandbox_snapshots_dir();
    for name in names(&snapshots) {
        if !keep.contains(&name) {
            remove_if_present(&snapshots.join(name))?;
        }
    }
    let saves = cfg.state_dir.join("saves");
    for name in names(&saves) {
        let used = name
            .strip_suffix(USE_SUFFIX)
            .filter(|n| n.starts_with(SNAPSHOT_ID_PREFIX));
        if used.is_some_and(|n| !in_use(n)) {
            remove_if_present(&saves.join(&name))?;
        }
    }
    Ok(())
}

/// The start of every sandbox snapshot's id.
pub const SNAPSHOT_ID_PREFIX: &str = "snap-";
/// The end of a create's links to a sandbox snapshot's files.
const USE_SUFFIX: &str = ".use";

/// Sandbox `id`'s own saved VM (see [`take_for_resume`]), if it has one whole.
pub fn saved_of(cfg: &ManagerConfig, id: &str) -> Option<SavedVm> {
    let saved = SavedVm {
        dir: cfg.saved_dir(id),
    };
    (saved.state().is_file() && saved.memory().is_file()).then_some(saved)
}

/// Adopts the VM sandbox `id`'s VMM has just saved into the new directory `dir`, with a copy
/// of `layer` when given.
fn take_into(cfg: &ManagerConfig, id: &str, dir: PathBuf, layer: Option<&Path>) -> Result<SavedVm> {
    make_root_dir(&dir)?;
    let taken = adopt(cfg, id, &dir).and_then(|()| match layer {
        Some(layer) => clone_or_copy(layer, &dir.join(LAYER)),
        None => Ok(()),
    });
    match taken {
        Ok(()) => Ok(SavedVm { dir }),
        Err(e) => {
            let _ = host::remove_tree(&dir);
            Err(e)
        }
    }
}

/// A file's identity as far as a snapshot cares: replaced or rewritten means another file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct FileId {
    len: u64,
    modified_ns: u128,
}

impl FileId {
    fn of(path: &Path) -> Result<FileId> {
        let meta =
            fs::metadata(path).map_err(|e| Error::host(format!("stat {}", path.display()), e))?;
        Ok(FileId {
            len: meta.len(),
            modified_ns: meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos()),
        })
    }
}

/// `base.json` of a sandbox's own saved VM: the base image it ran on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SavedBase {
    path: PathBuf,
    file: FileId,
}

impl SavedBase {
    fn of(path: &Path) -> Result<SavedBase> {
        Ok(SavedBase {
            path: path.to_owned(),
            file: FileId::of(path)?,
        })
    }
}

/// `meta.json`: the files and size a template's snapshot was made with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    kernel: FileId,
    rootfs: FileId,
    vmm: FileId,
    vcpus: u32,
    memory_mib: u64,
    created_at: i64,
}

impl Meta {
    fn current(cfg: &ManagerConfig, t: &Template, size: WarmSize) -> Result<Meta> {
        Ok(Meta {
            kernel: FileId::of(Path::new(&t.kernel))?,
            rootfs: FileId::of(Path::new(&t.rootfs))?,
            vmm: FileId::of(&cfg.bin_dir.join("mvm-vmm"))?,
            vcpus: size.vcpus,
            memory_mib: size.memory_mib,
            created_at: crate::db::now(),
        })
    }

    fn size(&self) -> WarmSize {
        WarmSize {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
        }
    }

    /// Whether this snapshot was made from the files `now` describes.
    fn same_files(&self, now: &Meta) -> bool {
        (self.kernel, self.rootfs, self.vmm) == (now.kernel, now.rootfs, now.vmm)
    }

    fn describe(&self) -> TemplateSnapshot {
        TemplateSnapshot {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            created_at: self.created_at,
            pooled: 0,
            fork_pooled: 0,
        }
    }
}

/// A template's usable snapshot.
#[derive(Debug, Clone)]
pub struct WarmSnapshot {
    vm: SavedVm,
    meta: Meta,
}

impl WarmSnapshot {
    /// The saved VM.
    pub fn vm(self) -> SavedVm {
        self.vm
    }

    /// What the API says of it.
    pub fn describe(&self) -> TemplateSnapshot {
        self.meta.describe()
    }

    /// Its size.
    pub fn size(&self) -> WarmSize {
        self.meta.size()
    }
}

/// Template `t`'s snapshot of `size`, if it has one made from its current files.
pub fn find(cfg: &ManagerConfig, t: &Template, size: WarmSize) -> Option<WarmSnapshot> {
    let dir = cfg.snapshot_dir(&t.name, size);
    let meta: Meta = serde_json::from_slice(&fs::read(dir.join(META)).ok()?).ok()?;
    let now = Meta::current(cfg, t, size).ok()?;
    (meta.same_files(&now) && meta.size() == size).then_some(WarmSnapshot {
        vm: SavedVm { dir },
        meta,
    })
}

/// Template `t`'s usable snapshots at sizes other than the defaults, smallest first.
pub fn find_other_sizes(cfg: &ManagerConfig, t: &Template) -> Vec<WarmSnapshot> {
    let Ok(entries) = fs::read_dir(cfg.snapshots_dir()) else {
        return Vec::new();
    };
    let mut sizes: Vec<WarmSize> = entries
        .filter_map(|e| WarmSize::of_dir_name(&t.name, e.ok()?.file_name().to_str()?))
        .filter(|size| *size != WarmSize::DEFAULT)
        .collect();
    sizes.sort();
    sizes
        .into_iter()
        .filter_map(|size| find(cfg, t, size))
        .collect()
}

/// A template's snapshot being made, in a directory of root's beside the template snapshots;
/// removed unless committed.
pub struct Staging {
    dir: PathBuf,
    meta: Meta,
}

impl Staging {
    /// Starts the snapshot of template `t` at `size` made by the warming sandbox `id`.
    pub fn new(cfg: &ManagerConfig, t: &Template, id: &str, size: WarmSize) -> Result<Staging> {
        let parent = cfg.snapshots_dir();
        fs::create_dir_all(&parent)
            .and_then(|()| fs::set_permissions(&parent, fs::Permissions::from_mode(0o755)))
            .map_err(|e| Error::host(format!("creating {}", parent.display()), e))?;
        let dir = parent.join(format!(".staging.{}.{id}", t.name));
        make_root_dir(&dir)?;
        Ok(Staging {
            dir,
            meta: Meta::current(cfg, t, size)?,
        })
    }

    /// Takes the VM the warming sandbox `id`'s VMM has just saved and a copy of its writable
    /// `layer` (the VM still paused).
    pub fn take(&self, cfg: &ManagerConfig, id: &str, layer: &Path) -> Result<()> {
        adopt(cfg, id, &self.dir)?;
        clone_or_copy(layer, &self.dir.join(LAYER))
    }

    /// Makes the staged snapshot template `name`'s, replacing any earlier one of its size.
    pub fn commit(self, cfg: &ManagerConfig, name: &str) -> Result<()> {
        let at = |what: &str, path: &Path, e: std::io::Error| {
            Error::host(format!("{what} {}", path.display()), e)
        };
        let layer = self.dir.join(LAYER);
        fs::set_permissions(&layer, fs::Permissions::from_mode(0o444))
            .map_err(|e| at("chmod", &layer, e))?;
        let meta = serde_json::to_vec_pretty(&self.meta).expect("plain data serializes");
        let meta_path = self.dir.join(META);
        fs::write(&meta_path, meta).map_err(|e| at("writing", &meta_path, e))?;
        fs::set_permissions(&self.dir, fs::Permissions::from_mode(0o755))
            .map_err(|e| at("chmod", &self.dir, e))?;
        let dir_name = self.meta.size().dir_name(name);
        let target = cfg.snapshots_dir().join(&dir_name);
        let old = target.with_file_name(format!(".replaced.{dir_name}"));
        if old.exists() {
            host::remove_tree(&old)?;
        }
        if target.exists() {
            fs::rename(&target, &old).map_err(|e| at("moving aside", &target, e))?;
        }
        fs::rename(&self.dir, &target).map_err(|e| at("renaming", &self.dir, e))?;
        if old.exists() {
            host::remove_tree(&old)?;
        }
        Ok(())
    }
}

impl Drop for Staging {
    /// An uncommitted snapshot is removed (a failed warm leaves nothing).
    fn drop(&mut self) {
        if self.dir.exists() {
            let _ = host::remove_tree(&self.dir);
        }
    }
}

/// Copies `from` to a new file `to` (0600). Where the file system shares extents (XFS,
/// Btrfs: `FICLONE`) the copy is a clone, made at once whatever the size, whose blocks are
/// copied only when either side writes them; elsewhere the copy keeps holes: a layer is
/// mostly empty, and only its data is copied (`SEEK_DATA`/`SEEK_HOLE`), file to file in the
/// kernel.
fn clone_or_copy(from: &Path, to: &Path) -> Result<()> {
    let dst = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .map_err(|e| Error::host(format!("creating {}", to.display()), e))?;
    copy_into(from, &dst, to)
}

/// Moves the file `from` to `to`: renamed on one file system, else copied (holes kept) and
/// removed.
fn move_file(from: &Path, to: &Path) -> Result<()> {
    match fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
            clone_or_copy(from, to)?;
            fs::remove_file(from)
                .map_err(|e| Error::host(format!("removing {}", from.display()), e))
        }
        Err(e) => Err(Error::host(
            format!("moving {} to {}", from.display(), to.display()),
            e,
        )),
    }
}

/// [`clone_or_copy`] into `dst`, the empty file at `to`.
fn copy_into(from: &Path, dst: &fs::File, to: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let at = |what: &str, path: &Path, e: std::io::Error| {
        Error::host(format!("{what} {}", path.display()), e)
    };
    let src = fs::File::open(from).map_err(|e| at("opening", from, e))?;
    let len = src.metadata().map_err(|e| at("stat", from, e))?.len();
    // SAFETY: FICLONE takes two descriptors this function owns; it reads no memory of ours.
    if unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) } == 0 {
        return Ok(());
    }
    // Not shared (EOPNOTSUPP, EXDEV, EINVAL: ext4, tmpfs, two file systems): copied.
    dst.set_len(len).map_err(|e| at("sizing", to, e))?;
    let data = mvm_sys::sparse::data_ranges(&src, 0, len).map_err(|e| at("reading", from, e))?;
    for range in data {
        mvm_sys::sparse::copy_range(&src, range.start, dst, range.start, range.end - range.start)
            .map_err(|e| at(&format!("copying {} to", from.display()), to, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn config(root: &Path) -> ManagerConfig {
        ManagerConfig {
            state_dir: root.join("state"),
            ..ManagerConfig::from_env()
        }
    }

    /// A template's files and a VMM binary in `root`, as a warm snapshot's meta names them.
    fn template_in(root: &Path, name: &str) -> (ManagerConfig, Template) {
        let bin = root.join("bin");
        fs::create_dir_all(&bin).unwrap();
        for file in [
            bin.join("mvm-vmm"),
            root.join("vmlinux"),
            root.join("rootfs.ext4"),
        ] {
            fs::write(file, name).unwrap();
        }
        let cfg = ManagerConfig {
            bin_dir: bin,
            ..config(root)
        };
        let t = Template {
            name: name.into(),
            kernel: root.join("vmlinux").display().to_string(),
            rootfs: root.join("rootfs.ext4").display().to_string(),
            snapshot: None,
            other_snapshots: Vec::new(),
        };
        (cfg, t)
    }

    /// Commits a (fileless but for its layer) snapshot of `t` at `size`, as a warm does.
    fn warm(cfg: &ManagerConfig, t: &Template, size: WarmSize) {
        let staging = Staging::new(cfg, t, "0123456789ab", size).unwrap();
        fs::write(staging.dir.join(LAYER), b"layer").unwrap();
        staging.commit(cfg, &t.name).unwrap();
    }

    /// A template keeps one snapshot per size: the defaults' where snapshots always were,
    /// others beside it; each is found only at its own size, a warm replaces only its own
    /// size's, and another template's (even one whose name begins the same) is not its.
    #[test]
    fn a_template_keeps_a_snapshot_per_size() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, t) = template_in(dir.path(), "app");
        let (big, small) = (
            WarmSize {
                vcpus: 2,
                memory_mib: 512,
            },
            WarmSize {
                vcpus: 1,
                memory_mib: 128,
            },
        );
        assert!(find(&cfg, &t, WarmSize::DEFAULT).is_none());
        warm(&cfg, &t, big);
        assert!(find(&cfg, &t, WarmSize::DEFAULT).is_none());
        assert!(find(&cfg, &t, small).is_none());
        let first = find(&cfg, &t, big).unwrap().describe();
        assert_eq!((first.vcpus, first.memory_mib), (2, 512));
        warm(&cfg, &t, WarmSize::DEFAULT);
        warm(&cfg, &t, small);
        assert!(cfg.snapshots_dir().join("app").join(META).is_file());
        assert!(cfg.snapshots_dir().join("app@2x512").join(META).is_file());
        let others: Vec<(u32, u64)> = find_other_sizes(&cfg, &t)
            .iter()
            .map(|w| (w.describe().vcpus, w.describe().memory_mib))
            .collect();
        assert_eq!(others, [(1, 128), (2, 512)]);

        // Another template whose name begins the same has none of them.
        let other = Template {
            name: "app.v2".into(),
            ..t.clone()
        };
        assert!(find_other_sizes(&cfg, &other).is_empty());
        assert!(find(&cfg, &other, WarmSize::DEFAULT).is_none());

        // A directory whose name and meta disagree is no snapshot of either size.
        let renamed = cfg.snapshots_dir().join("app@4x1024");
        fs::rename(cfg.snapshots_dir().join("app@2x512"), &renamed).unwrap();
        let four = WarmSize {
            vcpus: 4,
            memory_mib: 1024,
        };
        assert!(find(&cfg, &t, four).is_none());
        assert!(find(&cfg, &t, big).is_none());
        assert_eq!(find_other_sizes(&cfg, &t).len(), 1);
        for odd in [
            "app@2x",
            "app@x512",
            "app@02x512",
            "app@2x512x1",
            "app2x512",
        ] {
            assert_eq!(WarmSize::of_dir_name("app", odd), None, "{odd}");
        }
    }

    #[test]
    fn a_sparse_copy_keeps_the_data_and_the_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from"), dir.path().join("to"));
        let file = fs::File::create(&from).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(b"head", 0).unwrap();
        file.write_all_at(&[7u8; 5000], 40 << 20).unwrap();
        clone_or_copy(&from, &to).unwrap();
        assert_eq!(fs::read(&from).unwrap(), fs::read(&to).unwrap());
        let meta = fs::metadata(&to).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert!(
            meta.blocks() * 512 < 1 << 20,
            "{} bytes allocated",
            meta.blocks() * 512
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    }

    /// On a file system that shares extents the copy is a clone: 64 MiB of layer data take
    /// no new space, and a write to either side stays on that side. An XFS image on a loop
    /// device (root and mkfs.xfs, from xfsprogs).
    #[test]
    fn a_copy_on_xfs_is_a_clone() {
        let test = "a_copy_on_xfs_is_a_clone";
        if !mvm_testkit::root_or_skip(test) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (image, mnt) = (dir.path().join("xfs.img"), dir.path().join("mnt"));
        fs::File::create(&image)
            .unwrap()
            .set_len(512 << 20)
            .unwrap();
        fs::create_dir(&mnt).unwrap();
        let run = |cmd: &str, args: &[&std::ffi::OsStr]| {
            std::process::Command::new(cmd)
                .args(args)
                .output()
                .map_err(|e| format!("{cmd}: {e}"))
                .and_then(|out| match out.status.success() {
                    true => Ok(()),
                    false => Err(format!(
                        "{cmd} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    )),
                })
        };
        if let Err(why) = run(
            "mkfs.xfs",
            &[
                "-q".as_ref(),
                "-m".as_ref(),
                "reflink=1".as_ref(),
                image.as_os_str(),
            ],
        ) {
            mvm_testkit::skip_or_fail_in_ci(test, &format!("{why} (apt install xfsprogs)"));
            return;
        }
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                image.as_os_str(),
                mnt.as_os_str(),
            ],
        )
        .unwrap();
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(self.0).status();
            }
        }
        let _mounted = Unmount(&mnt);
        let (from, to) = (mnt.join("layer"), mnt.join("copy"));
        let data: Vec<u8> = (0..64u32 << 20).map(|i| (i % 251) as u8).collect();
        let file = fs::File::create(&from).unwrap();
        file.write_all_at(&data, 0).unwrap();
        file.sync_all().unwrap();
        let free = || {
            let stat = mvm_sys::mount::statvfs(&mnt).unwrap();
            stat.f_frsize * stat.f_bfree
        };
        let before = free();
        clone_or_copy(&from, &to).unwrap();
        fs::File::open(&to).unwrap().sync_all().unwrap();
        let used = before.saturating_sub(free());
        assert!(used < 4 << 20, "the copy took {used} bytes: not a clone");
        assert!(fs::read(&to).unwrap() == data, "the clone's data differ");
        fs::OpenOptions::new()
            .write(true)
            .open(&to)
            .unwrap()
            .write_all_at(b"child", 0)
            .unwrap();
        assert_eq!(&fs::read(&from).unwrap()[..5], &data[..5]);
        assert_eq!(
            fs::metadata(&to).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    /// What the VMM's uid leaves in its save directory is used only if it is two plain files:
    /// a link planted instead (to a host file it cannot read, or a hard link to one) is
    /// refused, and the file it names is left alone.
    #[test]
    fn only_plain_files_of_the_vmm_are_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let secret = dir.path().join("secret");
        fs::write(&secret, b"host only").unwrap();
        let layer = dir.path().join("layer.ext4");
        fs::write(&layer, b"layer").unwrap();
        let plant: [&dyn Fn(&Path); 2] = [
            &|at: &Path| std::os::unix::fs::symlink(&secret, at).unwrap(),
            &|at: &Path| fs::hard_link(&secret, at).unwrap(),
        ];
        for (n, plant) in plant.iter().enumerate() {
            let id = format!("00000000000{n}");
            let save = make_save_dir(&cfg, &id, 0).unwrap();
            plant(&save.join(STATE));
            fs::write(save.join(MEMORY), b"memory").unwrap();
            let err = take_copy(&cfg, &id, cfg.fork_dir(&id), &layer).unwrap_err();
            assert!(err.to_string().contains("not a plain file"), "{err}");
            assert!(!cfg.fork_dir(&id).exists());
            assert_eq!(fs::read(&secret).unwrap(), b"host only");
            assert_eq!(
                fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
                0o644
            );
            remove_saves(&cfg, &id).unwrap();
            assert!(!cfg.save_dir(&id).exists());
        }
        // Plain files are taken, root's and read-only.
        let id = "0000000000ff";
        let save = make_save_dir(&cfg, id, 0).unwrap();
        fs::write(save.join(STATE), b"state").unwrap();
        fs::write(save.join(MEMORY), b"memory").unwrap();
        let saved = take_copy(&cfg, id, cfg.fork_dir(id), &layer).unwrap();
        let state = fs::metadata(saved.state()).unwrap();
        assert_eq!(
            (state.uid(), state.permissions().mode() & 0o777),
            (0, 0o444)
        );
        assert_eq!(fs::read(saved.memory()).unwrap(), b"memory");
        let copy = dir.path().join("copy.ext4");
        saved.copy_layer(&copy, 4242).unwrap();
        assert_eq!(fs::metadata(&copy).unwrap().uid(), 4242);
        saved.remove().unwrap();
        remove_saves(&cfg, id).unwrap();
    }

    /// A fork's saved VM handed to a fork pool's VMM: its files linked into the restore
    /// directory (root's, 0755, the files read-only), the layer bound already written in
    /// place with the fork's (a longer earlier content gone); a link planted at the layer's
    /// path is not followed; the directory goes with the sandbox's saves.
    #[test]
    fn a_saved_vm_is_handed_to_a_started_vmm_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let source = "0000000000aa";
        let save = make_save_dir(&cfg, source, 0).unwrap();
        fs::write(save.join(STATE), b"state").unwrap();
        fs::write(save.join(MEMORY), b"memory").unwrap();
        let layer = dir.path().join("source.ext4");
        fs::write(&layer, b"the fork's layer").unwrap();
        let saved = take_copy(&cfg, source, cfg.fork_dir(source), &layer).unwrap();

        let child = "0000000000bb";
        let restore = make_restore_dir(&cfg, child).unwrap();
        let meta = fs::metadata(&restore).unwrap();
        assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (0, 0o755));
        let bound = dir.path().join("child.ext4");
        fs::write(&bound, b"an earlier, longer content of the layer").unwrap();
        let inode = fs::metadata(&bound).unwrap().ino();
        saved.hand_to(&cfg, child, &bound).unwrap();
        assert_eq!(fs::read(&bound).unwrap(), b"the fork's layer");
        assert_eq!(fs::metadata(&bound).unwrap().ino(), inode);
        assert_eq!(fs::read(restore.join(STATE)).unwrap(), b"state");
        let memory = fs::metadata(restore.join(MEMORY)).unwrap();
        assert_eq!(memory.ino(), fs::metadata(saved.memory()).unwrap().ino());
        assert_eq!(memory.permissions().mode() & 0o777, 0o444);

        let other = "0000000000cc";
        make_restore_dir(&cfg, other).unwrap();
        let secret = dir.path().join("secret");
        fs::write(&secret, b"host only").unwrap();
        let planted = dir.path().join("planted.ext4");
        std::os::unix::fs::symlink(&secret, &planted).unwrap();
        let err = saved.hand_to(&cfg, other, &planted).unwrap_err();
        assert!(err.to_string().contains("opening"), "{err}");
        assert_eq!(fs::read(&secret).unwrap(), b"host only");

        saved.remove().unwrap();
        for id in [source, child, other] {
            remove_saves(&cfg, id).unwrap();
        }
        assert!(!restore.exists());
    }

    /// A sandbox snapshot's VM, taken from a running sandbox's save (its layer copied, its
    /// base recorded) or from a saved sandbox's own saved VM (state and memory linked, the
    /// layer copied: the saved sandbox's resume takes its layer away, not the snapshot's),
    /// is found whole only; a create's links to it outlive the snapshot's deletion; a start
    /// sweeps what no row keeps and the links no create holds.
    #[test]
    fn a_sandbox_snapshot_outlives_its_source_and_its_creates_outlive_it() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let base = dir.path().join("base.ext4");
        fs::write(&base, b"the base image").unwrap();
        let source = "0000000000dd";
        let save = make_save_dir(&cfg, source, 0).unwrap();
        fs::write(save.join(STATE), b"state").unwrap();
        fs::write(save.join(MEMORY), b"memory").unwrap();
        let layer = dir.path().join("layer.ext4");
        fs::write(&layer, b"the layer of its instant").unwrap();
        let running = "snap-00000000000000aa";
        let taken = take_copy(
            &cfg,
            source,
            sandbox_snapshot_dir(&cfg, running).unwrap(),
            &layer,
        )
        .unwrap();
        assert!(sandbox_snapshot(&cfg, running).is_some());
        taken.record_base(&base).unwrap();
        fs::write(&layer, b"written since").unwrap();
        let found = sandbox_snapshot(&cfg, running).expect("whole");
        found.check_base(&base).unwrap();
        assert_eq!(
            fs::read(found.dir.join(LAYER)).unwrap(),
            b"the layer of its instant"
        );

        // From a saved sandbox's own saved VM.
        remove_save_dir(&cfg, source).unwrap();
        let save = make_save_dir(&cfg, source, 0).unwrap();
        fs::write(save.join(STATE), b"state 2").unwrap();
        fs::write(save.join(MEMORY), b"memory 2").unwrap();
        let own = take_for_resume(&cfg, source, &base).unwrap();
        own.keep_file(&layer, LAYER).unwrap();
        let saved = "snap-00000000000000bb";
        let copy = own
            .copy_as_snapshot(sandbox_snapshot_dir(&cfg, saved).unwrap())
            .unwrap();
        assert_eq!(
            fs::metadata(copy.memory()).unwrap().ino(),
            fs::metadata(own.memory()).unwrap().ino()
        );
        own.return_file(LAYER, &layer).unwrap();
        own.remove().unwrap();
        let found = sandbox_snapshot(&cfg, saved).expect("whole after its source's resume");
        assert_eq!(fs::read(found.dir.join(LAYER)).unwrap(), b"written since");
        assert_eq!(fs::read(found.memory()).unwrap(), b"memory 2");
        found.check_base(&base).unwrap();

        // A create's links outlive the snapshot's deletion.
        let links = found
            .link_for_create(&cfg, &format!("{saved}.0011"))
            .unwrap();
        remove_sandbox_snapshot(&cfg, saved).unwrap();
        assert!(sandbox_snapshot(&cfg, saved).is_none());
        assert_eq!(fs::read(links.memory()).unwrap(), b"memory 2");
        links.check_base(&base).unwrap();
        let copied = dir.path().join("child.ext4");
        links.copy_layer(&copied, 4242).unwrap();
        assert_eq!(fs::read(&copied).unwrap(), b"written since");

        // A start keeps what rows keep and the links a create holds.
        fs::create_dir(cfg.sandbox_snapshot_dir("snap-00000000000000cc")).unwrap();
        let held = found.link_for_create(&cfg, "snap-00000000000000aa.0022");
        assert!(held.is_err(), "the deleted snapshot's files are gone");
        let held = sandbox_snapshot(&cfg, running)
            .unwrap()
            .link_for_create(&cfg, &format!("{running}.0022"))
            .unwrap();
        sweep_sandbox_snapshots(&cfg, &[running.to_owned()], |name| {
            name == format!("{running}.0022")
        })
        .unwrap();
        assert!(sandbox_snapshot(&cfg, running).is_some());
        assert!(!cfg.sandbox_snapshot_dir("snap-00000000000000cc").exists());
        assert!(held.memory().exists());
        assert!(!links.memory().exists(), "no create holds these links");
        remove_saves(&cfg, source).unwrap();
    }

    /// A sandbox's own saved VM: its files adopted (root's, read-only) with the identity of
    /// its base image, found whole only; a resume over another base image (rewritten, or
    /// another path) is refused; the save directory and the saved VM go with the sandbox's
    /// saves.
    #[test]
    fn a_saved_sandbox_keeps_its_vm_and_its_base() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path());
        let id = "0000000000cc";
        let base = dir.path().join("base.ext4");
        fs::write(&base, b"the base image").unwrap();
        assert!(saved_of(&cfg, id).is_none());
        let save = make_save_dir(&cfg, id, 0).unwrap();
        fs::write(save.join(STATE), b"state").unwrap();
        fs::write(save.join(MEMORY), b"memory").unwrap();
        let saved = take_for_resume(&cfg, id, &base).unwrap();
        assert!(save.exists());
        remove_save_dir(&cfg, id).unwrap();
        assert!(!save.exists());
        let found = saved_of(&cfg, id).expect("the saved VM is found");
        assert_eq!(found.memory(), saved.memory());
        let state = fs::metadata(found.state()).unwrap();
        assert_eq!(
            (state.uid(), state.permissions().mode() & 0o777),
            (0, 0o444)
        );
        found.check_base(&base).unwrap();

        let other = dir.path().join("other.ext4");
        fs::write(&other, b"the base image").unwrap();
        let err = found.check_base(&other).unwrap_err().to_string();
        assert!(err.contains("not the one the saved VM ran on"), "{err}");
        std::thread::sleep(std::time::Duration::from_millis(10));
        fs::write(&base, b"the base image, rewritten").unwrap();
        assert!(found.check_base(&base).is_err());

        // The sandbox's layer kept with it and given back, from and to a tmpfs (copied with
        // its holes across file systems, renamed on one).
        let run = tempfile::tempdir_in("/dev/shm").unwrap();
        let layer = run.path().join("layer.ext4");
        let mut data = vec![0u8; 1 << 20];
        data[..5].copy_from_slice(b"upper");
        fs::write(&layer, b"upper").unwrap();
        fs::OpenOptions::new()
            .write(true)
            .open(&layer)
            .and_then(|f| f.set_len(1 << 20))
            .unwrap();
        found.keep_file(&layer, "layer.ext4").unwrap();
        found.keep_file(&run.path().join("none"), "none").unwrap();
        assert!(!layer.exists() && !found.file("none").exists());
        assert_eq!(fs::read(found.file("layer.ext4")).unwrap(), data);
        let on_disk = fs::metadata(found.file("layer.ext4")).unwrap();
        assert!(on_disk.blocks() * 512 < 1 << 20, "the holes are kept");
        found.return_file("layer.ext4", &layer).unwrap();
        found.return_file("none", &run.path().join("none")).unwrap();
        assert_eq!(fs::read(&layer).unwrap(), data);
        assert!(!found.file("layer.ext4").exists());

        fs::remove_file(found.memory()).unwrap();
        assert!(
            saved_of(&cfg, id).is_none(),
            "a saved VM without its memory"
        );
        remove_saves(&cfg, id).unwrap();
        assert!(!saved.state().exists());
    }
}
