//! The VMM's logger (Firecracker's `logger` section): lines to stderr, or to a file or FIFO.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;

use log::{LevelFilter, Log, Metadata, Record};

use crate::config::{LogLevel, LoggerConfig};

/// Errors while configuring the logger.
#[derive(Debug, thiserror::Error)]
pub enum LoggerError {
    /// The log file could not be opened.
    #[error("cannot open log_path {0}: {1}")]
    Open(String, std::io::Error),
}

struct Settings {
    /// Log file; stderr when None.
    out: Option<Box<dyn Write + Send>>,
    show_level: bool,
    show_origin: bool,
    module: Option<String>,
}

struct VmmLogger {
    settings: Mutex<Settings>,
}

static LOGGER: VmmLogger = VmmLogger {
    settings: Mutex::new(Settings {
        out: None,
        show_level: true,
        show_origin: false,
        module: None,
    }),
};

impl Log for VmmLogger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut settings = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(module) = &settings.module {
            if !record
                .module_path()
                .unwrap_or("")
                .starts_with(module.as_str())
            {
                return;
            }
        }
        let mut line = String::from("[mvm-vmm");
        if settings.show_level {
            line.push(':');
            line.push_str(record.level().as_str());
        }
        if settings.show_origin {
            line.push_str(&format!(
                ":{}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!("] {}\n", record.args()));
        // Logging must never take the VMM down.
        match &mut settings.out {
            Some(out) => {
                let _ = out.write_all(line.as_bytes());
                let _ = out.flush();
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {
        if let Some(out) = &mut self.settings.lock().unwrap_or_else(|p| p.into_inner()).out {
            let _ = out.flush();
        }
    }
}

fn level_filter(level: LogLevel) -> LevelFilter {
    match level {
        LogLevel::Off => LevelFilter::Off,
        LogLevel::Error => LevelFilter::Error,
        LogLevel::Warning => LevelFilter::Warn,
        LogLevel::Info => LevelFilter::Info,
        LogLevel::Debug => LevelFilter::Debug,
        LogLevel::Trace => LevelFilter::Trace,
    }
}

/// Installs the logger with defaults (warnings and errors to stderr).
pub fn init() {
    // Fails only if a logger is already installed, which is then kept.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(LevelFilter::Warn);
}

/// Applies a `logger` configuration.
pub fn configure(config: &LoggerConfig) -> Result<(), LoggerError> {
    let out: Option<Box<dyn Write + Send>> = match &config.log_path {
        Some(path) => Some(Box::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path)
                .map_err(|e| LoggerError::Open(path.clone(), e))?,
        )),
        None => None,
    };
    let mut settings = LOGGER.settings.lock().unwrap_or_else(|p| p.into_inner());
    settings.out = out;
    settings.show_level = config.show_level.unwrap_or(false);
    settings.show_origin = config.show_log_origin.unwrap_or(false);
    settings.module = config.module.clone();
    log::set_max_level(level_filter(config.level.unwrap_or_default()));
    Ok(())
}
