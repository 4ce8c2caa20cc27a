//! Pods: the containers of a Kubernetes pod in one vm-tier sandbox. The sandbox boots with
//! the pod's first container as its root and [`vm::POD_SLOTS`] empty drives
//! ([`super::ContainerSandbox::pod`]); each further
//! container gets a drive: the host copies its root file system into an ext4 image, swaps
//! the image in (Firecracker's drive `PATCH`), and the guest agent mounts it where the
//! container's processes are chrooted (`ExecRequest::root`).

use std::collections::BTreeMap;
use std::path::Path;

use agent::MountRequest;

use super::{blocking, vm, Manager};
use crate::error::{Error, Result};
use crate::model::{Isolation, SandboxState};

/// Where the guest mounts the root of container `name`.
fn guest_root(name: &str) -> String {
    format!("/run/mvm/containers/{name}")
}

/// File systems every container root gets, as (source, mount point in the root, type).
const CONTAINER_MOUNTS: [(&str, &str, Option<&str>); 3] = [
    ("proc", "proc", Some("proc")),
    ("sysfs", "sys", Some("sysfs")),
    ("/dev", "dev", None),
];

/// The drive slots of a pod sandbox and the containers in them.
#[derive(Debug, Default)]
pub(super) struct Slots {
    /// How many slots the VM was booted with.
    pub capacity: u8,
    /// The occupied slots, by container name.
    pub used: BTreeMap<String, vm::Slot>,
}

impl Slots {
    fn free(&self) -> Option<vm::Slot> {
        (0..self.capacity)
            .map(vm::Slot)
            .find(|s| !self.used.values().any(|u| u == s))
    }
}

/// Container names become guest paths: a plain file name, as container ids are.
fn check_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if valid {
        Ok(())
    } else {
        Err(Error::Invalid(format!(
            "container name {name:?} must be 1-128 letters, digits, '_', '.' or '-'"
        )))
    }
}

impl Manager {
    /// Adds container `name` to pod sandbox `id`: a copy of the host directory `rootfs`
    /// becomes its root in the guest, with /proc, /sys and /dev. Returns that root, for
    /// [`agent::ExecRequest::root`].
    pub async fn add_container(
        &self,
        tenant: &str,
        id: &str,
        name: &str,
        rootfs: &Path,
    ) -> Result<String> {
        check_name(name)?;
        let row = self.row(tenant, id)?;
        if row.sandbox.isolation != Isolation::Vm || row.sandbox.state != SandboxState::Running {
            return Err(Error::Conflict(format!(
                "sandbox {id} is a {} {}-tier sandbox; containers join running vm-tier pods",
                row.sandbox.state.as_str(),
                row.sandbox.isolation.as_str()
            )));
        }
        let live = self.live(id);
        // Held throughout, so two containers never race for one slot.
        let mut slots = live.pod.lock().await;
        if slots.used.contains_key(name) {
            return Err(Error::Conflict(format!(
                "sandbox {id} already has a container {name}"
            )));
        }
        let slot = slots.free().ok_or_else(|| {
            Error::Conflict(format!(
                "pod sandbox {id} is full: it holds {} containers besides its first",
                slots.capacity
            ))
        })?;
        let dir = self.inner.cfg.sandbox_dir(id).join("ctr");
        let uid = self.inner.cfg.uid(&row);
        let content = rootfs.to_owned();
        let images = dir.clone();
        blocking(move || vm::put_image(&images, slot, uid, Some(&content))).await?;
        let root = guest_root(name);
        if let Err(e) = self.attach(tenant, id, slot, &root).await {
            if let Err(undo) = self.detach(tenant, id, &dir, uid, slot, &root).await {
                tracing::error!(%id, name, "rolling back a container: {undo}");
            }
            return Err(e);
        }
        slots.used.insert(name.to_owned(), slot);
        Ok(root)
    }

    /// Removes container `name` from pod sandbox `id`: unmounts its root in the guest and
    /// empties its drive slot. Its processes should have ended: whatever still uses the root
    /// keeps it until it exits.
    pub async fn remove_container(&self, tenant: &str, id: &str, name: &str) -> Result<()> {
        let row = self.row(tenant, id)?;
        let live = self.live(id);
        let mut slots = live.pod.lock().await;
        let slot = *slots
            .used
            .get(name)
            .ok_or_else(|| Error::NotFound(format!("sandbox {id} has no container {name:?}")))?;
        let dir = self.inner.cfg.sandbox_dir(id).join("ctr");
        let uid = self.inner.cfg.uid(&row);
        self.detach(tenant, id, &dir, uid, slot, &guest_root(name))
            .await?;
        slots.used.remove(name);
        Ok(())
    }

    /// Shows the image now in `slot` to the guest and mounts it at `root`.
    async fn attach(&self, tenant: &str, id: &str, slot: vm::Slot, root: &str) -> Result<()> {
        let api = self.vmm_api(&self.row(tenant, id)?)?;
        vm::reopen_slot(&api.path(), slot).await?;
        let agent = self.agent(tenant, id).await?;
        agent
            .mount(MountRequest {
                source: slot.guest_device(),
                target: root.to_owned(),
                fstype: Some("ext4".into()),
                read_only: false,
            })
            .await?;
        for (source, at, fstype) in CONTAINER_MOUNTS {
            agent
                .mount(MountRequest {
                    source: source.into(),
                    target: format!("{root}/{at}"),
                    fstype: fstype.map(Into::into),
                    read_only: false,
                })
                .await?;
        }
        Ok(())
    }

    /// Unmounts `root` (if mounted) and empties `slot`.
    async fn detach(
        &self,
        tenant: &str,
        id: &str,
        dir: &Path,
        uid: u32,
        slot: vm::Slot,
        root: &str,
    ) -> Result<()> {
        let agent = self.agent(tenant, id).await?;
        if let Err(e) = agent.unmount(root).await {
            // Not mounted (a failed attach): nothing to undo in the guest.
            tracing::debug!(%id, root, "unmounting a container root: {e}");
        }
        let images = dir.to_owned();
        blocking(move || vm::put_image(&images, slot, uid, None)).await?;
        let api = self.vmm_api(&self.row(tenant, id)?)?;
        vm::reopen_slot(&api.path(), slot).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_and_names() {
        let mut slots = Slots {
            capacity: 2,
            ..Slots::default()
        };
        assert_eq!(slots.free(), Some(vm::Slot(0)));
        slots.used.insert("a".into(), vm::Slot(0));
        assert_eq!(slots.free(), Some(vm::Slot(1)));
        slots.used.insert("b".into(), vm::Slot(1));
        assert_eq!(slots.free(), None);
        assert_eq!(vm::Slot(1).guest_device(), "/dev/vdd");
        assert_eq!(vm::Slot(1).image(), "/ctr/1.ext4");
        check_name("abc-1.2_x").unwrap();
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
