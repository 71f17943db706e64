//! Generates the Xen bindings with bindgen (feature `bindgen`, on by default).
//!
//! Four outputs in `OUT_DIR`:
//! - `types.rs`: the structs, typedefs and constants, generated once;
//! - `devicemodel.rs`, `foreignmemory.rs`, `evtchn.rs`: one run-time-loaded library struct each
//!   (bindgen's `dynamic_library_name`), holding only that library's `<prefix>_*` functions and
//!   referring to the types in `types.rs`.
//!
//! Headers come from Debian's `libxen-dev` (`/usr/include`, or `XEN_FFI_INCLUDE_DIR`).
//! `__XEN_TOOLS__` is defined, as for any tools-side user of the public headers: it exposes
//! `HVM_IOREQSRV_BUFIOREQ_*`, the `HVM_PARAM_*` tools block and the XENMEM tools ops.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=XEN_FFI_INCLUDE_DIR");
    #[cfg(feature = "bindgen")]
    if let Err(msg) = generate::run() {
        eprintln!("xen-ffi: {msg}");
        eprintln!(
            "xen-ffi: the `bindgen` feature needs libclang (Debian: libclang-dev) and the Xen \
             headers (Debian: libxen-dev); build with `--no-default-features` to leave Xen out"
        );
        std::process::exit(1);
    }
}

#[cfg(feature = "bindgen")]
mod generate {
    use std::env;
    use std::path::{Path, PathBuf};

    /// The headers bound, all from Xen 4.17's public and tools headers.
    const HEADERS: &[&str] = &[
        "xendevicemodel.h",
        "xenforeignmemory.h",
        "xenevtchn.h",
        "xen/hvm/ioreq.h",
        "xen/hvm/dm_op.h",
        "xen/hvm/hvm_op.h",
        "xen/memory.h",
        "xen/hvm/params.h",
    ];

    /// Types shared by the three libraries and the shared-page layouts.
    const TYPES: &[&str] = &[
        // Opaque library handles and the types of the function signatures.
        "xendevicemodel_handle",
        "xenforeignmemory_handle",
        "xenforeignmemory_resource_handle",
        "xenevtchn_handle",
        "xenevtchn_port_or_error_t",
        "xentoollog_logger",
        "domid_t",
        "ioservid_t",
        "xen_pfn_t",
        "evtchn_port_t",
        "hvmmem_type_t",
        // public/hvm/ioreq.h
        "ioreq",
        "ioreq_t",
        "buf_ioreq",
        "buf_ioreq_t",
        "buffered_iopage",
        "buffered_iopage_t",
        "shared_iopage",
        "shared_iopage_t",
        // public/hvm/dm_op.h
        "xen_dm_op.*",
        // public/memory.h
        "xen_mem_acquire_resource.*",
    ];

    /// Object-like macros turned into constants.
    const VARS: &[&str] = &[
        "HVM_IOREQSRV_BUFIOREQ_.*",
        "XENMEM_resource_.*",
        "XENMEM_acquire_resource",
        "HVM_PARAM_.*",
        "IOREQ_.*",
        "STATE_IO.*",
        "XEN_DMOP_.*",
        "XENEVTCHN_.*",
    ];

    /// (output file, function prefix, struct name) of each run-time-loaded library.
    const LIBRARIES: &[(&str, &str, &str)] = &[
        ("devicemodel.rs", "xendevicemodel_.*", "XenDeviceModelLib"),
        (
            "foreignmemory.rs",
            "xenforeignmemory_.*",
            "XenForeignMemoryLib",
        ),
        ("evtchn.rs", "xenevtchn_.*", "XenEvtchnLib"),
    ];

    fn wrapper() -> String {
        HEADERS
            .iter()
            .map(|h| format!("#include <{h}>\n"))
            .collect()
    }

    fn base(include_dir: Option<&Path>) -> bindgen::Builder {
        let mut b = bindgen::Builder::default()
            .header_contents("xen_ffi_wrapper.h", &wrapper())
            .clang_arg("-D__XEN_TOOLS__=1")
            .use_core()
            .layout_tests(true)
            .derive_default(true)
            .generate_comments(false)
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()));
        if let Some(dir) = include_dir {
            b = b.clang_arg(format!("-I{}", dir.display()));
        }
        b
    }

    pub fn run() -> Result<(), String> {
        let out = PathBuf::from(env::var("OUT_DIR").map_err(|e| format!("OUT_DIR: {e}"))?);
        let include_dir = env::var_os("XEN_FFI_INCLUDE_DIR").map(PathBuf::from);
        let include_dir = include_dir.as_deref();

        let mut types = base(include_dir).allowlist_recursively(true);
        for t in TYPES {
            types = types.allowlist_type(t);
        }
        for v in VARS {
            types = types.allowlist_var(v);
        }
        // `buf_ioreq` starts with a plain `uint8_t type` followed by bitfields declared as
        // `uint8_t pad:1, dir:1, size:2` and `uint32_t addr:20`; C packs all of them into the
        // first 32-bit unit (addr in bits 31:12), but bindgen 0.70 starts a new 4-byte-aligned
        // bitfield unit after `type`, which makes the struct 12 bytes instead of 8. Keep it
        // opaque (clang's size and alignment, no fields); `sys.rs` adds accessors.
        types = types.opaque_type("buf_ioreq");
        write(types, &out.join("types.rs"), "types")?;

        for (file, prefix, name) in LIBRARIES {
            let lib = base(include_dir)
                .allowlist_function(prefix)
                // The types live in types.rs; each library file only holds its functions.
                .allowlist_recursively(false)
                .dynamic_library_name(*name)
                // Missing symbols stay `Err` fields instead of failing the whole load, so an
                // older library still serves the calls it has; the safe layer turns a missing
                // one into `XenError::MissingSymbol`.
                .dynamic_link_require_all(false);
            write(lib, &out.join(file), prefix)?;
        }
        Ok(())
    }

    fn write(b: bindgen::Builder, path: &Path, what: &str) -> Result<(), String> {
        let bindings = b
            .generate()
            .map_err(|e| format!("bindgen failed on the Xen headers ({what}): {e}"))?;
        bindings
            .write_to_file(path)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))
    }
}
