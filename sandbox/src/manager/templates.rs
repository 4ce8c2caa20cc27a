//! Templates: the registered kernels and base images sandboxes are made from.

use std::path::Path;

use super::{Manager, DEFAULT_TEMPLATE};
use crate::db;
use crate::error::{Error, Result};
use crate::model::Template;

impl Manager {
    fn template(&self, name: &str) -> Result<Template> {
        self.inner
            .db
            .templates()?
            .into_iter()
            .find(|t| t.name == name)
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no template {name:?}; list them with `mvm templates`, build one with `mvm build`"
                ))
            })
    }

    /// The template `name` (default: [`DEFAULT_TEMPLATE`]).
    pub(super) fn requested_template(&self, name: Option<String>) -> Result<Template> {
        let name = name.unwrap_or_else(|| DEFAULT_TEMPLATE.into());
        db::validate_name("template", &name)?;
        self.template(&name)
    }

    /// Registered templates.
    pub fn templates(&self) -> Result<Vec<Template>> {
        self.inner.db.templates()
    }

    /// Registers a template after checking its files.
    pub fn add_template(&self, t: Template) -> Result<Template> {
        db::validate_name("template", &t.name)?;
        for (what, path) in [("kernel", &t.kernel), ("rootfs", &t.rootfs)] {
            let p = Path::new(path);
            if !p.is_absolute() || !p.is_file() {
                return Err(Error::Invalid(format!(
                    "{what} {path:?} must be an absolute path to an existing file"
                )));
            }
        }
        self.inner.db.put_template(&t)?;
        Ok(t)
    }
}
