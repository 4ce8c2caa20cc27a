//! Step 6: the seccomp filters the jailed program and every process it starts run under,
//! kept as data (seccompiler JSON) and installed right before the exec.
//!
//! The built-in `sandbox` policy (`sandbox.json`) is for untrusted code running on the host
//! kernel (the `jail` tier): an allow list after Docker's default profile for a container
//! without capabilities, stricter where that profile is loose — no io_uring, ptrace,
//! process_vm_readv/writev, name_to_handle_at, modify_ldt or clock adjustment. Denied calls fail
//! with EPERM, so programs see an ordinary refusal rather than being killed. `clone` is allowed
//! only without namespace flags; `clone3` passes its flags in memory, out of seccomp's reach,
//! so a second filter, `clone3`, fails it with ENOSYS and glibc falls back to `clone`.
//!
//! Every filter of a policy file is installed, in name order. The kernel runs all of them on
//! every syscall and takes the strictest verdict, so the order does not matter as long as no two
//! filters fail the same call with different errnos.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;

use seccompiler::{BpfProgram, TargetArch};

use crate::error::{Error, Result};

/// The built-in `sandbox` policy.
const SANDBOX_POLICY: &str = include_str!("sandbox.json");

/// Which seccomp filters the jailer installs before it execs the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeccompPolicy {
    /// The built-in policy for untrusted programs (`--seccomp-policy sandbox`).
    Sandbox,
    /// Every filter of a seccompiler JSON file (`--seccomp-filter FILE`).
    File(PathBuf),
}

impl FromStr for SeccompPolicy {
    type Err = Error;
    /// Parses a built-in policy name (`--seccomp-policy`).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sandbox" => Ok(SeccompPolicy::Sandbox),
            _ => Err(Error::InvalidArgument {
                flag: "--seccomp-policy",
                value: s.to_string(),
                reason: "the built-in policy is `sandbox`; give a file with --seccomp-filter"
                    .into(),
            }),
        }
    }
}

impl SeccompPolicy {
    /// The flag and value that select this policy on the `mvm-jailer` command line.
    pub fn flag(&self) -> (&'static str, std::ffi::OsString) {
        match self {
            SeccompPolicy::Sandbox => ("--seccomp-policy", "sandbox".into()),
            SeccompPolicy::File(path) => ("--seccomp-filter", path.clone().into()),
        }
    }

    /// Compiles the policy into BPF programs, in install order.
    pub(crate) fn compile(&self) -> Result<Vec<BpfProgram>> {
        let (flag, value) = self.flag();
        let invalid = |reason: String| Error::InvalidArgument {
            flag,
            value: value.to_string_lossy().into_owned(),
            reason,
        };
        let json = match self {
            SeccompPolicy::Sandbox => SANDBOX_POLICY.as_bytes().to_vec(),
            SeccompPolicy::File(path) => {
                std::fs::read(path).map_err(|e| invalid(format!("cannot read it: {e}")))?
            }
        };
        let filters: BTreeMap<String, BpfProgram> =
            seccompiler::compile_from_json(json.as_slice(), TargetArch::x86_64)
                .map_err(|e| invalid(format!("not a valid seccompiler JSON policy: {e}")))?
                .into_iter()
                .collect();
        if filters.is_empty() {
            return Err(invalid("the policy defines no filter".into()));
        }
        Ok(filters.into_values().collect())
    }
}

/// Installs `filters` on the calling thread, inherited by everything it execs and forks.
/// Needs `no_new_privs` (set by the privilege drop).
pub(crate) fn install(filters: &[BpfProgram]) -> Result<()> {
    for filter in filters {
        seccompiler::apply_filter(filter).map_err(|e| Error::Seccomp(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_builtin_policy_compiles_to_two_filters() {
        assert_eq!(SeccompPolicy::Sandbox.compile().unwrap().len(), 2);
    }

    #[test]
    fn bad_policies_are_refused_naming_the_flag() {
        let e = "strict".parse::<SeccompPolicy>().unwrap_err().to_string();
        assert!(e.starts_with("invalid --seccomp-policy 'strict'"), "{e}");
        let dir = std::env::temp_dir().join(format!("jailer-seccomp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, text, why) in [
            ("empty.json", "{}", "defines no filter"),
            (
                "garbage.json",
                "allow everything",
                "not a valid seccompiler",
            ),
            (
                "unknown.json",
                r#"{"a": {"default_action": "allow", "filter_action": "trap",
                    "filter": [{"syscall": "no_such_call"}]}}"#,
                "no_such_call",
            ),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            let e = SeccompPolicy::File(path).compile().unwrap_err().to_string();
            assert!(e.starts_with("invalid --seccomp-filter"), "{e}");
            assert!(e.contains(why), "{e}");
        }
        let e = SeccompPolicy::File(dir.join("missing.json"))
            .compile()
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read it"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
