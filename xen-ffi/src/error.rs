//! The one error type of the crate.

/// Why a Xen operation failed.
///
/// Every variant's `Display` is a complete sentence fragment meant for an operator: it says
/// what failed and, where there is one, what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum XenError {
    /// The crate was compiled without the `bindgen` feature, so it has no Xen bindings.
    #[error("built without Xen support (xen-ffi feature `bindgen` off)")]
    NotBuilt,

    /// `/dev/xen/privcmd` does not exist: this is not a Xen dom0 (or the driver is not loaded).
    #[error("/dev/xen/privcmd not found: not running in a Xen dom0 (load xen-privcmd?)")]
    NoPrivcmd,

    /// A Xen tools library could not be loaded.
    #[error(
        "cannot load {soname}: {reason} (is this a Xen host? install libxendevicemodel1 \
         libxenforeignmemory1 libxenevtchn1)"
    )]
    LibraryLoad {
        /// The versioned soname that was opened, e.g. `libxendevicemodel.so.1`.
        soname: &'static str,
        /// The dynamic loader's message.
        reason: String,
    },

    /// A library was loaded but lacks a function this crate needs (an older Xen release).
    #[error("{soname} has no function {symbol} (Xen tools libraries too old?)")]
    MissingSymbol {
        /// The library's soname.
        soname: &'static str,
        /// The missing function.
        symbol: &'static str,
    },

    /// A library function returned failure; `errno` is the value it left.
    #[error("{func} failed: {}", errno_text(*errno))]
    Call {
        /// The C function that failed, e.g. `xendevicemodel_create_ioreq_server`.
        func: &'static str,
        /// `errno` right after the call.
        errno: i32,
    },
}

impl XenError {
    /// The `errno` of a [`XenError::Call`], else `None`.
    pub fn errno(&self) -> Option<i32> {
        match self {
            XenError::Call { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// `strerror`-style text for an errno value, e.g. "No such file or directory (os error 2)".
fn errno_text(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_error_names_function_and_strerror() {
        let e = XenError::Call {
            func: "xendevicemodel_create_ioreq_server",
            errno: libc::ENOENT,
        };
        let s = e.to_string();
        assert!(
            s.starts_with("xendevicemodel_create_ioreq_server failed: "),
            "{s}"
        );
        assert!(s.contains("No such file or directory"), "{s}");
        assert_eq!(e.errno(), Some(libc::ENOENT));
        assert_eq!(XenError::NoPrivcmd.errno(), None);
    }

    #[test]
    fn fixed_messages() {
        assert_eq!(
            XenError::NotBuilt.to_string(),
            "built without Xen support (xen-ffi feature `bindgen` off)"
        );
        assert_eq!(
            XenError::NoPrivcmd.to_string(),
            "/dev/xen/privcmd not found: not running in a Xen dom0 (load xen-privcmd?)"
        );
        let e = XenError::LibraryLoad {
            soname: "libxenevtchn.so.1",
            reason: "not found".into(),
        };
        let s = e.to_string();
        assert!(s.contains("libxenevtchn.so.1"), "{s}");
        assert!(
            s.contains(
                "is this a Xen host? install libxendevicemodel1 libxenforeignmemory1 libxenevtchn1"
            ),
            "{s}"
        );
    }
}
