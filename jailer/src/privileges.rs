//! Step 5: resource limits, the drop to the jail's uid/gid with no capabilities and
//! `no_new_privs`, and the optional Landlock ruleset.

use std::path::{Path, PathBuf};

use landlock::{
    Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    ABI,
};

use crate::config::{ResourceLimit, DEFAULT_NO_FILE};

/// The jail's device directory.
const DEV_DIR: &str = "/dev";
use crate::error::{check, Error, Result};

/// Applies the limits (soft = hard, so the jailed process cannot raise them), adding the default
/// open-file limit when none is given.
pub(crate) fn apply_rlimits(limits: &[ResourceLimit]) -> Result<()> {
    let mut all = limits.to_vec();
    if !all.iter().any(|l| matches!(l, ResourceLimit::NoFile(_))) {
        all.push(ResourceLimit::NoFile(DEFAULT_NO_FILE));
    }
    for limit in all {
        let resource = match limit {
            ResourceLimit::Fsize(_) => libc::RLIMIT_FSIZE,
            ResourceLimit::NoFile(_) => libc::RLIMIT_NOFILE,
            ResourceLimit::Nproc(_) => libc::RLIMIT_NPROC,
        };
        let rlim = libc::rlimit {
            rlim_cur: limit.value(),
            rlim_max: limit.value(),
        };
        // SAFETY: `rlim` is a valid rlimit struct for the duration of the call.
        let ret = unsafe { libc::setrlimit(resource, &rlim) };
        check(ret, || {
            format!("setrlimit {}={}", limit.name(), limit.value())
        })?;
    }
    Ok(())
}

const CAP_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

fn prctl(option: libc::c_int, arg: libc::c_ulong, what: &str) -> Result<libc::c_int> {
    // SAFETY: the prctl options used here take integer arguments only.
    let ret = unsafe {
        libc::prctl(
            option,
            arg,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    check(ret, || what.to_string())
}

/// Becomes `uid`/`gid` with no supplementary groups, drops every capability (bounding, ambient,
/// effective, permitted, inheritable), sets `no_new_privs`, and verifies the result.
pub(crate) fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    // The bounding set can only be shrunk while CAP_SETPCAP is held, i.e. before setuid.
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_DROP takes an integer capability number.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if ret == -1 {
            match std::io::Error::last_os_error().raw_os_error() {
                // Past the kernel's last capability.
                Some(libc::EINVAL) => break,
                _ => {
                    return Err(Error::last_os(format!(
                        "drop capability {cap} from the bounding set"
                    )))
                }
            }
        }
    }
    prctl(
        libc::PR_CAP_AMBIENT,
        libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
        "clear the ambient capabilities",
    )?;

    // SAFETY: an empty group list: size 0 and a null pointer are valid.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }, || {
        "setgroups([])".into()
    })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresgid(gid, gid, gid) }, || {
        format!("setresgid({gid})")
    })?;
    // SAFETY: plain integer arguments.
    check(unsafe { libc::setresuid(uid, uid, uid) }, || {
        format!("setresuid({uid})")
    })?;

    verify_ids(uid, gid)?;

    // setuid away from 0 clears effective and permitted, but not inheritable; and uid 0 keeps
    // them all: clear the three sets explicitly.
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: header and a two-element data array are what capset expects for version 3.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    check(ret as libc::c_int, || {
        "capset: clear all capabilities".into()
    })?;
    prctl(libc::PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")?;

    // Fail closed: verify rather than trust.
    // SAFETY: as above; capget writes two CapData entries.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    check(ret as libc::c_int, || "capget".into())?;
    let (eff, prm) = data
        .iter()
        .enumerate()
        .fold((0u64, 0u64), |(e, p), (i, d)| {
            (
                e | (d.effective as u64) << (32 * i),
                p | (d.permitted as u64) << (32 * i),
            )
        });
    if eff != 0 || prm != 0 || data.iter().any(|d| d.inheritable != 0) {
        return Err(Error::CapabilitiesLeft {
            effective: eff,
            permitted: prm,
        });
    }
    Ok(())
}

/// Fails unless the real, effective and saved uid and gid are `uid` and `gid` and there are no
/// supplementary groups: the set calls succeeding is not proof (an id of -1 means "unchanged").
fn verify_ids(uid: u32, gid: u32) -> Result<()> {
    let (mut uids, mut gids) = ([0; 3], [0; 3]);
    let [ru, eu, su] = &mut uids;
    // SAFETY: three valid out-pointers to uid_t.
    check(unsafe { libc::getresuid(ru, eu, su) }, || {
        "getresuid".into()
    })?;
    let [rg, eg, sg] = &mut gids;
    // SAFETY: three valid out-pointers to gid_t.
    check(unsafe { libc::getresgid(rg, eg, sg) }, || {
        "getresgid".into()
    })?;
    // SAFETY: size 0 with a null list only counts the groups.
    let groups = check(unsafe { libc::getgroups(0, std::ptr::null_mut()) }, || {
        "getgroups".into()
    })?;
    if uids != [uid; 3] || gids != [gid; 3] || groups != 0 {
        return Err(Error::IdsNotDropped {
            uid,
            gid,
            uids,
            gids,
            groups,
        });
    }
    Ok(())
}

/// How the Landlock ruleset ended up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LandlockOutcome {
    /// Every requested restriction is enforced.
    Enforced,
    /// The kernel enforces part of the rules (older Landlock ABI).
    Partial,
    /// The kernel has no Landlock: nothing is enforced.
    Unsupported,
}

/// Restricts the calling process (already in the jail): read and execute anywhere in the jail,
/// full access beneath `write_dirs`, read/write/ioctl on the files beneath the jail's `/dev`
/// (the device nodes its maker put there, and the ptys of its own devpts), nothing else: no
/// file, device node or socket can be made outside `write_dirs`, and no file outside the jail
/// reached through a `/proc/<pid>/fd` link is writable.
pub(crate) fn apply_landlock(write_dirs: &[PathBuf]) -> Result<LandlockOutcome> {
    let abi = ABI::V5;
    let err = |e: &dyn std::fmt::Display| Error::Landlock(e.to_string());
    let open =
        |p: &Path| PathFd::new(p).map_err(|e| Error::Landlock(format!("{}: {e}", p.display())));
    let mut ruleset = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| err(&e))?
        .create()
        .map_err(|e| err(&e))?
        .add_rule(PathBeneath::new(
            open(Path::new("/"))?,
            AccessFs::from_read(abi),
        ))
        .map_err(|e| err(&e))?;
    for dir in write_dirs {
        ruleset = ruleset
            .add_rule(PathBeneath::new(open(dir)?, AccessFs::from_all(abi)))
            .map_err(|e| err(&e))?;
    }
    // Not only the jailer's own nodes: a manager may add more once the target runs (the jail
    // tier's /dev/null, /dev/tty...).
    ruleset = ruleset
        .add_rule(PathBeneath::new(
            open(Path::new(DEV_DIR))?,
            AccessFs::from_file(abi),
        ))
        .map_err(|e| err(&e))?;
    let status = ruleset.restrict_self().map_err(|e| err(&e))?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => LandlockOutcome::Enforced,
        RulesetStatus::PartiallyEnforced => LandlockOutcome::Partial,
        RulesetStatus::NotEnforced => LandlockOutcome::Unsupported,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `drop_privileges(uid, gid)` in a forked child (the drop is irreversible) and returns
    /// its outcome as the child's exit code: 0 for Ok, 1 for IdsNotDropped, 2 for another error.
    fn drop_in_child(uid: u32, gid: u32) -> i32 {
        // SAFETY: the child only runs drop_privileges (syscalls and, on error, an allocation,
        // which glibc keeps usable across fork) and then _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            let code = match drop_privileges(uid, gid) {
                Ok(()) => 0,
                Err(Error::IdsNotDropped { .. }) => 1,
                Err(_) => 2,
            };
            // SAFETY: leaves the forked child without running the test harness's destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child with a valid out-pointer.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    #[test]
    fn the_drop_verifies_the_ids_it_set() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED the_drop_verifies_the_ids_it_set: needs root (setresuid)"
            );
            return;
        }
        assert_eq!(drop_in_child(40_999, 40_998), 0, "a real drop must pass");
        // -1 makes setresuid/setresgid succeed without changing anything: still root.
        assert_eq!(
            drop_in_child(u32::MAX, u32::MAX),
            1,
            "uid -1 must be caught"
        );
        assert_eq!(drop_in_child(40_999, u32::MAX), 1, "gid -1 must be caught");
    }
}
