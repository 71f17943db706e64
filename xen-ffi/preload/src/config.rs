//! The preload's configuration: three environment variables, read once, at the first
//! interposed call.

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

/// How much the preload logs to stderr (QEMU's log file under libxl).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Off,
    Info,
    Debug,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `IOREQ_MUX_SOCKET`: the multiplexer's device-model socket. `None`: inert.
    pub socket: Option<PathBuf>,
    /// `IOREQ_MUX_SERVER`: the server name sent in CREATE.
    pub server: String,
    /// `IOREQ_MUX_PRELOAD_LOG`.
    pub level: Level,
    /// A value of `IOREQ_MUX_PRELOAD_LOG` that was not understood (reported once).
    pub bad_level: Option<String>,
}

pub const DEFAULT_SERVER: &str = "qemu";

impl Config {
    /// From the three variables' values (`None`: unset).
    pub fn from_vars(
        socket: Option<OsString>,
        server: Option<OsString>,
        log: Option<OsString>,
    ) -> Config {
        let (level, bad_level) = match log.as_ref().map(|l| l.to_string_lossy().to_lowercase()) {
            None => (Level::Info, None),
            Some(l) => match l.trim() {
                "" | "info" => (Level::Info, None),
                "debug" => (Level::Debug, None),
                "off" | "none" => (Level::Off, None),
                other => (Level::Info, Some(other.to_string())),
            },
        };
        Config {
            socket: socket.filter(|s| !s.is_empty()).map(PathBuf::from),
            server: server.filter(|s| !s.is_empty()).map_or_else(
                || DEFAULT_SERVER.to_string(),
                |s| s.to_string_lossy().into_owned(),
            ),
            level,
            bad_level,
        }
    }

    fn from_env() -> Config {
        Config::from_vars(
            std::env::var_os("IOREQ_MUX_SOCKET"),
            std::env::var_os("IOREQ_MUX_SERVER"),
            std::env::var_os("IOREQ_MUX_PRELOAD_LOG"),
        )
    }
}

static CONFIG: OnceLock<Config> = OnceLock::new();

/// The configuration, read from the environment on first use.
pub fn get() -> &'static Config {
    CONFIG.get_or_init(|| {
        let c = Config::from_env();
        if let Some(bad) = &c.bad_level {
            emit(&format!(
                "IOREQ_MUX_PRELOAD_LOG={bad:?} is not one of off, info, debug; logging at info"
            ));
        }
        if c.level >= Level::Debug {
            match &c.socket {
                None => emit("IOREQ_MUX_SOCKET is not set: inert, every Xen call passes through"),
                Some(p) => emit(&format!(
                    "active: multiplexer socket {}, server name {:?}",
                    p.display(),
                    c.server
                )),
            }
        }
        c
    })
}

/// Is the preload active (`IOREQ_MUX_SOCKET` set)?
pub fn active() -> bool {
    get().socket.is_some()
}

/// Writes one line to stderr with the preload's prefix, ignoring write errors (stderr may
/// be closed; a log line is never worth failing a call).
pub fn emit(msg: &str) {
    let _ = writeln!(std::io::stderr().lock(), "ioreq-mux-preload: {msg}");
}

/// Whether lines at `level` are written.
pub fn enabled(level: Level) -> bool {
    level != Level::Off && get().level >= level
}

/// Logs at info level.
macro_rules! info {
    ($($t:tt)*) => {
        if $crate::config::enabled($crate::config::Level::Info) {
            $crate::config::emit(&format!($($t)*));
        }
    };
}

/// Logs at debug level.
macro_rules! debug {
    ($($t:tt)*) => {
        if $crate::config::enabled($crate::config::Level::Debug) {
            $crate::config::emit(&format!($($t)*));
        }
    };
}

pub(crate) use {debug, info};

#[cfg(test)]
mod tests {
    use super::*;

    fn os(s: &str) -> Option<OsString> {
        Some(OsString::from(s))
    }

    #[test]
    fn defaults_and_inert_when_the_socket_is_unset() {
        let c = Config::from_vars(None, None, None);
        assert_eq!(c.socket, None);
        assert_eq!(c.server, "qemu");
        assert_eq!(c.level, Level::Info);
        // An empty socket variable is unset too.
        assert_eq!(Config::from_vars(os(""), None, None).socket, None);
    }

    #[test]
    fn variables_are_read() {
        let c = Config::from_vars(os("/run/mux/dm.sock"), os("vga"), os("DEBUG"));
        assert_eq!(c.socket, Some(PathBuf::from("/run/mux/dm.sock")));
        assert_eq!(c.server, "vga");
        assert_eq!(c.level, Level::Debug);
        assert_eq!(Config::from_vars(None, None, os("off")).level, Level::Off);
        let bad = Config::from_vars(None, None, os("loud"));
        assert_eq!(
            (bad.level, bad.bad_level.as_deref()),
            (Level::Info, Some("loud"))
        );
    }
}
