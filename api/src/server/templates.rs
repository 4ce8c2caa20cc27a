//! Where a template's files may lie. Templates are shared by every tenant and their base
//! image is unpacked into sandboxes, so registering one is an admin's call (see
//! [`super::Admin`]) and its kernel and base image must lie in the operator's template
//! directory or the build artifacts directory: a template cannot name any other host file.

use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use mvm_sandbox::db;

use mvm_sandbox::manager::{Manager, ManagerConfig};
use mvm_sandbox::model::Template;
use mvm_sandbox::{Error, Result};

/// Environment variable naming the template directory.
pub const TEMPLATE_DIR_ENV: &str = "MVM_TEMPLATE_DIR";

/// The directories a template's files must lie in. Only the operator should be able to write
/// to them: what lies there at registration is what sandboxes get.
#[derive(Debug, Clone)]
pub struct TemplateDirs {
    dirs: Vec<PathBuf>,
}

impl TemplateDirs {
    /// The template directory `template_dir` (created if missing) and, when configured, the
    /// manager's artifacts directory (`mvm build`'s output, which the `default` template
    /// comes from).
    pub fn new(template_dir: &Path, cfg: &ManagerConfig) -> Result<TemplateDirs> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(template_dir)
            .map_err(|e| Error::host(format!("creating {}", template_dir.display()), e))?;
        let mut dirs = vec![template_dir.to_path_buf()];
        dirs.extend(cfg.artifacts_dir.clone());
        Ok(TemplateDirs { dirs })
    }

    /// `$MVM_TEMPLATE_DIR`, else `<state dir>/templates`.
    pub fn default_dir(cfg: &ManagerConfig) -> PathBuf {
        std::env::var_os(TEMPLATE_DIR_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| cfg.state_dir.join("templates"))
    }

    /// The directories, as configured.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Checks `t`'s name and files and returns it with its paths canonical (no symlink, no
    /// `..`). The base image must be a regular file; the kernel may be missing (a template
    /// for the jail tier only: vm creates then say so) but, like the image, must resolve to a
    /// path in one of the directories. Neither the files nor their directories may be
    /// writable by group or others.
    pub fn confine(&self, t: Template) -> Result<Template> {
        db::validate_name("template", &t.name)?;
        if t.snapshot.is_some() || !t.other_snapshots.is_empty() {
            return Err(Error::Invalid(format!(
                "template {}: a snapshot is made by mvm, not registered: leave it out and warm the \
                 template with POST /v1/templates/{}/warm (`mvm templates warm`)",
                t.name, t.name
            )));
        }
        let kernel = self.confine_file("kernel", &t.kernel, true)?;
        let rootfs = self.confine_file("rootfs", &t.rootfs, false)?;
        Ok(Template {
            name: t.name,
            kernel: kernel.display().to_string(),
            rootfs: rootfs.display().to_string(),
            snapshot: None,
            other_snapshots: Vec::new(),
        })
    }

    fn confine_file(&self, what: &str, path: &str, may_be_missing: bool) -> Result<PathBuf> {
        let p = Path::new(path);
        if !p.is_absolute() {
            return Err(Error::Invalid(format!(
                "{what} {path:?} must be an absolute path"
            )));
        }
        let real = match std::fs::canonicalize(p) {
            Ok(real) => {
                if !real.is_file() {
                    return Err(Error::Invalid(format!(
                        "{what} {path:?} is not a regular file"
                    )));
                }
                real
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && may_be_missing => {
                // Its directory must exist; the file itself may come later (`mvm build`).
                let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
                    return Err(Error::Invalid(format!("{what} {path:?} names no file")));
                };
                let parent = std::fs::canonicalize(parent).map_err(|e| {
                    Error::Invalid(format!(
                        "{what} {path:?}: directory {}: {e}",
                        parent.display()
                    ))
                })?;
                parent.join(name)
            }
            Err(e) => {
                return Err(Error::Invalid(format!(
                    "{what} {path:?} must be an existing file: {e}"
                )))
            }
        };
        let inside = self
            .dirs
            .iter()
            .filter_map(|d| std::fs::canonicalize(d).ok())
            .any(|d| real.starts_with(&d) && real != d);
        if !inside {
            let dirs: Vec<String> = self.dirs.iter().map(|d| d.display().to_string()).collect();
            let resolved = if real == p {
                String::new()
            } else {
                format!(" (resolved: {})", real.display())
            };
            return Err(Error::Invalid(format!(
                "{what} {path:?}{resolved} lies outside the template directories {}; \
                 put the file there (set {TEMPLATE_DIR_ENV} or `mvmd --template-dir` to choose one)",
                dirs.join(", ")
            )));
        }
        // Whoever can write the file, or replace it in its directory, changes every sandbox
        // made from the template later.
        for (p, kind) in [
            (real.as_path(), "file"),
            (real.parent().unwrap_or(&real), "directory"),
        ] {
            let mode = match std::fs::metadata(p) {
                Ok(m) => m.permissions().mode(),
                Err(_) if kind == "file" && may_be_missing => continue,
                Err(e) => return Err(Error::host(format!("reading {}", p.display()), e)),
            };
            if mode & 0o022 != 0 {
                return Err(Error::Invalid(format!(
                    "{what} {path:?}: {kind} {} is writable by group or others (mode {:o}); \
                     make it writable by its owner only (chmod go-w)",
                    p.display(),
                    mode & 0o7777
                )));
            }
        }
        Ok(real)
    }

    /// Registers `t` (or replaces the template of its name) after [`TemplateDirs::confine`].
    /// Whether the caller may is for the caller to check.
    pub fn register(&self, manager: &Manager, t: Template) -> Result<Template> {
        let t = self.confine(t)?;
        manager.db().put_template(&t)?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(root: &Path) -> TemplateDirs {
        let cfg = ManagerConfig {
            state_dir: root.join("state"),
            artifacts_dir: Some(root.join("artifacts")),
            ..ManagerConfig::from_env()
        };
        TemplateDirs::new(&cfg.state_dir.join("templates"), &cfg).unwrap()
    }

    fn template(kernel: &Path, rootfs: &Path) -> Template {
        Template {
            name: "t".into(),
            kernel: kernel.display().to_string(),
            rootfs: rootfs.display().to_string(),
            snapshot: None,
            other_snapshots: Vec::new(),
        }
    }

    #[test]
    fn files_must_resolve_inside_the_directories() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let d = dirs(&root);
        let tpl = root.join("state/templates");
        std::fs::create_dir_all(root.join("artifacts")).unwrap();
        std::fs::write(tpl.join("rootfs.ext4"), b"image").unwrap();
        std::fs::write(tpl.join("vmlinux"), b"kernel").unwrap();
        std::fs::write(root.join("artifacts/rootfs.ext4"), b"image").unwrap();
        // Whatever the umask: writable by the owner only.
        for p in [
            tpl.clone(),
            tpl.join("rootfs.ext4"),
            tpl.join("vmlinux"),
            root.join("artifacts"),
            root.join("artifacts/rootfs.ext4"),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        std::fs::write(root.join("secret"), b"host file").unwrap();
        std::os::unix::fs::symlink(root.join("secret"), tpl.join("link")).unwrap();
        std::os::unix::fs::symlink(&tpl, root.join("tpl-link")).unwrap();

        let ok = d
            .confine(template(&tpl.join("vmlinux"), &tpl.join("rootfs.ext4")))
            .unwrap();
        assert_eq!(ok.rootfs, tpl.join("rootfs.ext4").display().to_string());
        // Reached through a symlink to the directory: stored as the real path.
        let ok = d
            .confine(template(
                &tpl.join("vmlinux"),
                &root.join("tpl-link/rootfs.ext4"),
            ))
            .unwrap();
        assert_eq!(ok.rootfs, tpl.join("rootfs.ext4").display().to_string());
        // The artifacts directory, and a kernel not built yet.
        let ok = d
            .confine(template(
                &root.join("artifacts/vmlinux"),
                &root.join("artifacts/rootfs.ext4"),
            ))
            .unwrap();
        assert_eq!(
            ok.kernel,
            root.join("artifacts/vmlinux").display().to_string()
        );

        let kernel = tpl.join("vmlinux");
        for bad in [
            root.join("secret"),
            tpl.join("../../secret"),
            tpl.join("link"),
            tpl.clone(),
            PathBuf::from("/etc/passwd"),
            PathBuf::from("relative/rootfs.ext4"),
            tpl.join("missing.ext4"),
        ] {
            let e = d.confine(template(&kernel, &bad)).unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{}: {e}", bad.display());
        }
        // A kernel outside, or missing in a directory outside.
        for bad in [root.join("secret"), root.join("nowhere"), tpl.join("link")] {
            let e = d
                .confine(template(&bad, &tpl.join("rootfs.ext4")))
                .unwrap_err();
            assert!(matches!(e, Error::Invalid(_)), "{}: {e}", bad.display());
        }
        // Files others may change later, or replace in their directory.
        std::fs::write(tpl.join("shared.ext4"), b"image").unwrap();
        let chmod = |p: &Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap()
        };
        chmod(&tpl.join("shared.ext4"), 0o664);
        let e = d
            .confine(template(&kernel, &tpl.join("shared.ext4")))
            .unwrap_err();
        assert!(e.to_string().contains("writable by group or others"), "{e}");
        chmod(&tpl.join("shared.ext4"), 0o644);
        chmod(&tpl, 0o777);
        let e = d
            .confine(template(&kernel, &tpl.join("shared.ext4")))
            .unwrap_err();
        assert!(e.to_string().contains("directory"), "{e}");
        chmod(&tpl, 0o755);
        d.confine(template(&kernel, &tpl.join("shared.ext4")))
            .unwrap();
        let mut t = template(&kernel, &tpl.join("rootfs.ext4"));
        t.name = "../x".into();
        assert!(matches!(d.confine(t), Err(Error::Invalid(_))));
    }
}
