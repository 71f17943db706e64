//! `ioreq-mux acpi-tables`: the ACPI tables a guest needs to use the ECAM windows of a
//! configuration (`[[engine.ecam]]`), in the form xl's `acpi_firmware=` takes (binary tables,
//! concatenated; hvmloader appends each to the guest's XSDT):
//!
//! - an **MCFG** listing every window (PCI Firmware spec 3.0, 4.1.2), so the guest knows
//!   where each segment's configuration space is;
//! - an **SSDT** with one motherboard-resources device (`PNP0C02`) per window under `\_SB`,
//!   whose `_CRS` is a QWordMemory descriptor covering the window exactly. Linux uses an MCFG
//!   window only if it is reserved in E820 or in ACPI motherboard resources
//!   (arch/x86/pci/mmconfig-shared.c, `is_mmconf_reserved`); hvmloader does not put it in
//!   E820, so the SSDT is what makes the window usable.
//!
//! ```text
//! ioreq-mux acpi-tables --config /etc/ioreq-mux/guest.toml -o /etc/xen/guest-ecam.aml
//! ```
//!
//! The tables and AML come from rust-vmm's `acpi_tables` crate, except the QWordMemory
//! descriptor: the crate's `AddressSpace` marks every range as produced (general flags bit 0
//! clear, what a bridge's window says), and a motherboard resource consumes its range (this
//! is how Xen's own DSDT reserves low memory, `\_SB.MEM0`).

use crate::config::{Config, ConfigError};
use acpi_tables::aml::{Device, EISAName, Name, Path, ResourceTemplate, Scope};
use acpi_tables::mcfg::MCFG;
use acpi_tables::sdt::Sdt;
use acpi_tables::{Aml, AmlSink};
use bdf_router::EcamWindow;
use bdf_router::ecam::ECAM_BUS_SHIFT;
use std::path::{Path as FsPath, PathBuf};
use thiserror::Error;

/// OEM ID of both tables (ACPI 6.4, 5.2.6, table 5.4: 6 bytes, space padded).
pub const OEM_ID: [u8; 6] = *b"IOMUX ";
/// OEM table ID of both tables (8 bytes); the signature tells them apart.
pub const OEM_TABLE_ID: [u8; 8] = *b"IOMUXECM";
/// OEM revision of both tables.
pub const OEM_REVISION: u32 = 1;
/// SSDT revision 2: a DSDT/SSDT of revision 2 or more has 64-bit integers (ACPI 6.4,
/// 5.2.11.1). The window's addresses are in a buffer (the descriptor), so either would do.
pub const SSDT_REVISION: u8 = 2;
/// Length of the system description table header (ACPI 6.4, 5.2.6).
pub const HEADER_LEN: usize = 36;
/// Offset of the length field in that header (4 bytes, after the signature).
pub const HEADER_LENGTH_OFFSET: usize = 4;
/// MCFG: header, 8 reserved bytes, then one 16-byte allocation per window (PCI Firmware
/// spec 3.0, 4.1.2, tables 4-2 and 4-3).
pub const MCFG_ALLOCATIONS_OFFSET: usize = HEADER_LEN + 8;
pub const MCFG_ALLOCATION_LEN: usize = 16;
/// PNP ID of motherboard resources: ranges the firmware reserves (PNP0C01 is "system
/// board", PNP0C02 "motherboard resources"; Linux's check accepts either).
pub const MOTHERBOARD_RESOURCES_HID: &str = "PNP0C02";
/// `_UID` of the first window's device; the next ones count up. Xen's DSDT (4.17,
/// tools/libacpi/dsdt.asl, mk_dsdt.c) has PNP0C02 devices with no `_UID` and with `_UID` 1;
/// these start well above so none repeats a (`_HID`, `_UID`) pair, which Windows requires.
pub const UID_BASE: u32 = 0x100;
/// Device names are `MC00`..`MCFF` (two hex digits): at most this many windows.
pub const MAX_WINDOWS: usize = 0x100;

/// QWord Address Space Descriptor (ACPI 6.4, 6.4.3.5.1): large item 0x0A.
pub const QWORD_ADDRESS_SPACE_DESC: u8 = 0x8a;
/// Its length field: the bytes after the 3-byte item header.
pub const QWORD_ADDRESS_SPACE_LEN: u16 = 43;
/// Resource type 0: memory range.
pub const RESOURCE_TYPE_MEMORY: u8 = 0;
/// General flags (6.4.3.5.1, byte 4): bit 0 consumer, bit 1 _DEC (0: positive decode),
/// bit 2 _MIF (minimum fixed), bit 3 _MAF (maximum fixed).
pub const GENERAL_FLAG_CONSUMER: u8 = 1 << 0;
pub const GENERAL_FLAG_MIN_FIXED: u8 = 1 << 2;
pub const GENERAL_FLAG_MAX_FIXED: u8 = 1 << 3;
/// Memory type-specific flags (6.4.3.5.5): bit 0 _RW (1: read/write), bits 2:1 _MEM
/// (00: non-cacheable), bits 4:3 _MTP (00: AddressRangeMemory), bit 5 _TTP (0: static).
pub const MEMORY_FLAG_READ_WRITE: u8 = 1 << 0;

/// `acpi-tables` could not make the tables.
#[derive(Debug, Error)]
pub enum AcpiError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(
        "{file}: no [[engine.ecam]] window: the tables describe the ECAM windows the \
         toolstack sets up, and this configuration has none"
    )]
    NoWindows { file: PathBuf },
    #[error("{file}: {count} [[engine.ecam]] windows; the SSDT names at most {MAX_WINDOWS}")]
    TooManyWindows { file: PathBuf, count: usize },
    /// MCFG gives the address bus 0 would have (`base - start_bus * 1 MiB`); below 0 it
    /// cannot be written.
    #[error(
        "{file}: engine.ecam[{index}] ({window}): MCFG cannot describe it: the address of bus 0 \
         (base - start_bus MiB) would be below 0"
    )]
    BaseBelowZero {
        file: PathBuf,
        index: usize,
        window: EcamWindow,
    },
    #[error("{file}: cannot write the tables: {source}")]
    Write {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl AcpiError {
    /// The exit code: 2 for the configuration, 1 for the output file.
    pub fn exit_code(&self) -> u8 {
        match self {
            AcpiError::Write { .. } => 1,
            _ => 2,
        }
    }
}

/// Arguments of `ioreq-mux acpi-tables`.
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "Example (then `acpi_firmware = \"/etc/xen/guest-ecam.aml\"` in the xl \
                        configuration):\n  ioreq-mux acpi-tables --config /etc/ioreq-mux/guest.toml \
                        -o /etc/xen/guest-ecam.aml"
)]
pub struct AcpiTablesArgs {
    /// The multiplexer's configuration: its `[[engine.ecam]]` windows are described.
    #[arg(long)]
    pub config: PathBuf,
    /// Where to write the tables (MCFG, then SSDT; binary, concatenated).
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    pub output: PathBuf,
    /// Report the windows described as one JSON object (schema `ioreq-mux.acpi-tables/1`).
    #[arg(long)]
    pub json: bool,
}

/// What `acpi-tables` wrote: the file and, per window, what the MCFG says of it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AcpiReport {
    pub schema: &'static str,
    pub output: PathBuf,
    pub windows: Vec<WindowReport>,
}

/// One window of the MCFG: its segment, buses and where it is; `mcfg_base` is the address
/// the MCFG gives (where bus 0 would be).
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct WindowReport {
    pub segment: u16,
    pub start_bus: u8,
    pub end_bus: u8,
    pub base: u64,
    pub mcfg_base: Option<u64>,
}

impl std::fmt::Display for AcpiReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for w in &self.windows {
            let window = EcamWindow {
                segment: w.segment,
                base: w.base,
                start_bus: w.start_bus,
                end_bus: w.end_bus,
            };
            writeln!(f, "{window}")?;
        }
        write!(
            f,
            "wrote MCFG and SSDT for {} window(s) to {}",
            self.windows.len(),
            self.output.display()
        )
    }
}

/// The MCFG's base address of a window: where bus 0 would be.
fn mcfg_base(w: &EcamWindow) -> Option<u64> {
    w.base.checked_sub(u64::from(w.start_bus) << ECAM_BUS_SHIFT)
}

/// A QWordMemory descriptor for a range a device consumes: fixed location and size,
/// positive decode, non-cacheable, read/write, no translation (ACPI 6.4, 6.4.3.5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConsumedMemory {
    first: u64,
    last: u64,
}

impl Aml for ConsumedMemory {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.byte(QWORD_ADDRESS_SPACE_DESC);
        sink.word(QWORD_ADDRESS_SPACE_LEN);
        sink.byte(RESOURCE_TYPE_MEMORY);
        sink.byte(GENERAL_FLAG_CONSUMER | GENERAL_FLAG_MIN_FIXED | GENERAL_FLAG_MAX_FIXED);
        sink.byte(MEMORY_FLAG_READ_WRITE);
        // _GRA must be 0 for a fixed-size, fixed-location range (6.4.3.5, table 6.41).
        sink.qword(0);
        sink.qword(self.first);
        sink.qword(self.last);
        sink.qword(0); // _TRA
        sink.qword(self.last - self.first + 1); // _LEN
    }
}

/// The MCFG table listing `windows`.
pub fn mcfg(windows: &[EcamWindow]) -> Option<Vec<u8>> {
    let mut t = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for w in windows {
        t.add_ecam(mcfg_base(w)?, w.segment, w.start_bus, w.end_bus);
    }
    let mut out = vec![];
    t.to_aml_bytes(&mut out);
    Some(out)
}

/// The AML name of window `i`'s device (`MC00`..`MCFF`), for `i < MAX_WINDOWS`.
fn device_name(i: usize) -> String {
    format!("MC{:02X}", i & 0xff)
}

/// The SSDT reserving each window as a motherboard resource: `\_SB.MCxx`, `_HID`
/// `PNP0C02`, `_UID` `UID_BASE + i`, `_CRS` covering the window exactly.
pub fn ssdt(windows: &[EcamWindow]) -> Vec<u8> {
    let hid = Name::new(Path::new("_HID"), &EISAName::new(MOTHERBOARD_RESOURCES_HID));
    let parts: Vec<(Name, Name)> = windows
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let uid = UID_BASE + i as u32;
            let range = ConsumedMemory {
                first: w.base,
                last: w.last(),
            };
            let crs = Name::new(Path::new("_CRS"), &ResourceTemplate::new(vec![&range]));
            (Name::new(Path::new("_UID"), &uid), crs)
        })
        .collect();
    let devices: Vec<Device> = parts
        .iter()
        .enumerate()
        .map(|(i, (uid, crs))| {
            Device::new(Path::new(&device_name(i)), vec![&hid as &dyn Aml, uid, crs])
        })
        .collect();
    let scope = Scope::new(
        Path::new("\\_SB_"),
        devices.iter().map(|d| d as &dyn Aml).collect(),
    );
    let mut body = vec![];
    scope.to_aml_bytes(&mut body);
    let mut t = Sdt::new(
        *b"SSDT",
        HEADER_LEN as u32,
        SSDT_REVISION,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
    );
    t.append_slice(&body);
    t.as_slice().to_vec()
}

/// The tables for the windows of the configuration at `file` (already loaded as `cfg`):
/// MCFG then SSDT, concatenated.
pub fn tables_for(file: &FsPath, cfg: &Config) -> Result<Vec<u8>, AcpiError> {
    let windows = &cfg.engine.ecam;
    if windows.is_empty() {
        return Err(AcpiError::NoWindows {
            file: file.to_path_buf(),
        });
    }
    if windows.len() > MAX_WINDOWS {
        return Err(AcpiError::TooManyWindows {
            file: file.to_path_buf(),
            count: windows.len(),
        });
    }
    if let Some((index, w)) = windows
        .iter()
        .enumerate()
        .find(|(_, w)| mcfg_base(w).is_none())
    {
        return Err(AcpiError::BaseBelowZero {
            file: file.to_path_buf(),
            index,
            window: *w,
        });
    }
    let mut out = mcfg(windows).unwrap_or_default();
    out.extend_from_slice(&ssdt(windows));
    Ok(out)
}

/// Splits concatenated tables by their length fields (what hvmloader does,
/// tools/libacpi/build.c `construct_passthrough_tables`); `None` if a length is shorter than
/// a header or runs past the end.
pub fn split_tables(mut bytes: &[u8]) -> Option<Vec<&[u8]>> {
    let mut out = vec![];
    while !bytes.is_empty() {
        let len_field = bytes.get(HEADER_LENGTH_OFFSET..HEADER_LENGTH_OFFSET + 4)?;
        let len = u32::from_le_bytes(len_field.try_into().ok()?) as usize;
        if len < HEADER_LEN || len > bytes.len() {
            return None;
        }
        let (t, rest) = bytes.split_at(len);
        out.push(t);
        bytes = rest;
    }
    Some(out)
}

/// Runs `ioreq-mux acpi-tables`: loads the configuration, writes the tables.
pub fn run(a: &AcpiTablesArgs) -> Result<AcpiReport, AcpiError> {
    let cfg = Config::load(&a.config)?;
    let bytes = tables_for(&a.config, &cfg)?;
    std::fs::write(&a.output, bytes).map_err(|source| AcpiError::Write {
        file: a.output.clone(),
        source,
    })?;
    let windows = cfg
        .engine
        .ecam
        .iter()
        .map(|w| WindowReport {
            segment: w.segment,
            start_bus: w.start_bus,
            end_bus: w.end_bus,
            base: w.base,
            mcfg_base: mcfg_base(w),
        })
        .collect();
    Ok(AcpiReport {
        schema: "ioreq-mux.acpi-tables/1",
        output: a.output.clone(),
        windows,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::process::Command;

    fn win(segment: u16, base: u64, start_bus: u8, end_bus: u8) -> EcamWindow {
        EcamWindow::new(segment, base, start_bus, end_bus).unwrap()
    }

    fn cfg(windows: &[EcamWindow]) -> Config {
        Config {
            path: PathBuf::from("t.toml"),
            engine: crate::engine::EngineConfig {
                ecam: windows.to_vec(),
                ..Default::default()
            },
            servers: vec![],
            text: String::new(),
        }
    }

    /// Windows that exercise both halves of the address space, a start bus above 0 and more
    /// than one segment.
    fn sample() -> Vec<EcamWindow> {
        vec![
            win(1, 0xe000_0000, 0, 0x3f),
            win(2, 0xe400_0000 + (0x10 << 20), 0x10, 0x1f),
            win(3, 0x40_0000_0000, 0, 0xff),
        ]
    }

    fn sum(t: &[u8]) -> u8 {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Disassembles one table with acpica-tools' `iasl -d` (the independent decoder) and
    /// returns the .dsl text. Fails, never skips, when iasl is missing.
    fn iasl_d(name: &str, table: &[u8]) -> String {
        let dir =
            std::env::temp_dir().join(format!("ioreq-mux-acpi-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dat = dir.join(format!("{name}.dat"));
        std::fs::write(&dat, table).unwrap();
        let out = match Command::new("iasl")
            .arg("-d")
            .arg(&dat)
            .current_dir(&dir)
            .output()
        {
            Ok(o) => o,
            Err(e) => panic!(
                "cannot run iasl ({e}): install acpica-tools (apt-get install acpica-tools; \
                 scripts/deps.sh does, and CI runs it)"
            ),
        };
        let dsl = dir.join(format!("{name}.dsl"));
        let text = std::fs::read_to_string(&dsl).unwrap_or_else(|e| {
            panic!(
                "iasl -d {} wrote no {}: {e}\nstdout: {}\nstderr: {}",
                dat.display(),
                dsl.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        assert!(
            out.status.success(),
            "iasl -d failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_dir_all(&dir);
        text
    }

    /// The value iasl prints for a field of a data table (`Field Name : VALUE`).
    fn fields<'a>(dsl: &'a str, name: &str) -> Vec<&'a str> {
        dsl.lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(" : ")?;
                (k.trim_start_matches(|c| c != ']')
                    .trim_start_matches(']')
                    .trim()
                    == name)
                    .then(|| v.trim())
            })
            .collect()
    }

    #[test]
    fn tables_have_valid_headers_lengths_and_checksums() {
        let windows = sample();
        let bytes = tables_for(FsPath::new("t.toml"), &cfg(&windows)).unwrap();
        let tables = split_tables(&bytes).unwrap();
        assert_eq!(tables.len(), 2);
        assert_eq!(&tables[0][..4], b"MCFG");
        assert_eq!(&tables[1][..4], b"SSDT");
        for t in &tables {
            assert_eq!(sum(t), 0, "checksum of {:?}", &t[..4]);
            assert_eq!(&t[10..16], &OEM_ID);
            assert_eq!(&t[16..24], &OEM_TABLE_ID);
            assert_eq!(
                u32::from_le_bytes(t[24..28].try_into().unwrap()),
                OEM_REVISION
            );
        }
        // MCFG: header, 8 reserved bytes, 16 bytes per window, each as the spec lays it out.
        let m = tables[0];
        assert_eq!(
            m.len(),
            MCFG_ALLOCATIONS_OFFSET + MCFG_ALLOCATION_LEN * windows.len()
        );
        assert_eq!(&m[HEADER_LEN..MCFG_ALLOCATIONS_OFFSET], &[0; 8]);
        for (i, w) in windows.iter().enumerate() {
            let a = &m[MCFG_ALLOCATIONS_OFFSET + MCFG_ALLOCATION_LEN * i..][..MCFG_ALLOCATION_LEN];
            assert_eq!(
                u64::from_le_bytes(a[0..8].try_into().unwrap()),
                w.base - (u64::from(w.start_bus) << 20)
            );
            assert_eq!(u16::from_le_bytes([a[8], a[9]]), w.segment);
            assert_eq!((a[10], a[11]), (w.start_bus, w.end_bus));
            assert_eq!(&a[12..], &[0; 4]);
        }
        assert_eq!(tables[1][8], SSDT_REVISION);
        // A corrupted byte breaks the checksum; a bad length does not split.
        let mut bad = bytes.clone();
        bad[HEADER_LEN + 9] ^= 1;
        assert_ne!(sum(split_tables(&bad).unwrap()[0]), 0);
        bad[HEADER_LENGTH_OFFSET] = 3;
        assert!(split_tables(&bad).is_none());
    }

    #[test]
    fn iasl_decodes_the_mcfg_windows() {
        let windows = sample();
        let m = mcfg(&windows).unwrap();
        let dsl = iasl_d("mcfg", &m);
        assert!(
            fields(&dsl, "Signature")[0].starts_with("\"MCFG\""),
            "{dsl}"
        );
        assert_eq!(fields(&dsl, "Oem ID"), ["\"IOMUX \""], "{dsl}");
        assert_eq!(fields(&dsl, "Oem Table ID"), ["\"IOMUXECM\""], "{dsl}");
        let want_base: Vec<String> = windows
            .iter()
            .map(|w| format!("{:016X}", w.base - (u64::from(w.start_bus) << 20)))
            .collect();
        assert_eq!(fields(&dsl, "Base Address"), want_base, "{dsl}");
        let want_seg: Vec<String> = windows
            .iter()
            .map(|w| format!("{:04X}", w.segment))
            .collect();
        assert_eq!(fields(&dsl, "Segment Group Number"), want_seg, "{dsl}");
        let want_start: Vec<String> = windows
            .iter()
            .map(|w| format!("{:02X}", w.start_bus))
            .collect();
        assert_eq!(fields(&dsl, "Start Bus Number"), want_start, "{dsl}");
        let want_end: Vec<String> = windows
            .iter()
            .map(|w| format!("{:02X}", w.end_bus))
            .collect();
        assert_eq!(fields(&dsl, "End Bus Number"), want_end, "{dsl}");
        assert!(!dsl.contains("Invalid") && !dsl.contains("Error"), "{dsl}");
    }

    #[test]
    fn iasl_decodes_a_motherboard_resource_per_window() {
        let windows = sample();
        let dsl = iasl_d("ssdt", &ssdt(&windows));
        assert!(
            dsl.contains(
                "DefinitionBlock (\"\", \"SSDT\", 2, \"IOMUX \", \"IOMUXECM\", 0x00000001)"
            ),
            "{dsl}"
        );
        assert!(dsl.contains("Scope (\\_SB)"), "{dsl}");
        // One device per window, in order, each with its own _UID and exactly its range.
        let devices: Vec<&str> = dsl.split("Device (").skip(1).collect();
        assert_eq!(devices.len(), windows.len(), "{dsl}");
        for (i, (d, w)) in devices.iter().zip(&windows).enumerate() {
            assert!(d.starts_with(&format!("MC{i:02X})")), "{d}");
            assert!(d.contains("Name (_HID, EisaId (\"PNP0C02\")"), "{d}");
            assert!(
                d.contains(&format!("Name (_UID, 0x{:X})", UID_BASE + i as u32))
                    || d.contains(&format!("Name (_UID, 0x{:04X})", UID_BASE + i as u32)),
                "{d}"
            );
            assert!(d.contains("QWordMemory (ResourceConsumer, PosDecode, MinFixed, MaxFixed, NonCacheable, ReadWrite,"), "{d}");
            // Granularity, minimum, maximum, translation, length, in iasl's order.
            let numbers: Vec<u64> = d
                .lines()
                .filter_map(|l| l.trim().strip_prefix("0x"))
                .filter_map(|l| {
                    let hex: String = l.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
                    u64::from_str_radix(&hex, 16).ok()
                })
                .collect();
            assert_eq!(numbers, [0, w.base, w.last(), 0, w.size()], "{d}");
        }
        assert!(!dsl.contains("Error"), "{dsl}");
    }

    #[test]
    fn no_windows_or_an_undescribable_one_is_an_error_naming_the_file() {
        let e = tables_for(FsPath::new("g.toml"), &cfg(&[])).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string()
                .starts_with("g.toml: no [[engine.ecam]] window"),
            "{e}"
        );
        let e = tables_for(FsPath::new("g.toml"), &cfg(&[win(0, 0x10_0000, 2, 3)])).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("g.toml: engine.ecam[0] (segment 0000"),
            "{e}"
        );
        let many: Vec<EcamWindow> = (0..=MAX_WINDOWS as u16)
            .map(|s| win(s, 0x1_0000_0000 + (u64::from(s) << 20), 0, 0))
            .collect();
        let e = tables_for(FsPath::new("g.toml"), &cfg(&many)).unwrap_err();
        assert!(e.to_string().contains("at most 256"), "{e}");
        let most = &many[..MAX_WINDOWS];
        let t = tables_for(FsPath::new("g.toml"), &cfg(most)).unwrap();
        assert_eq!(split_tables(&t).unwrap().len(), 2);
    }

    #[test]
    fn write_errors_name_the_output_file() {
        let dir = std::env::temp_dir().join(format!("ioreq-mux-acpi-w-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let conf = dir.join("c.toml");
        std::fs::write(
            &conf,
            "[[engine.ecam]]\nsegment = 1\nbase = 0xe0000000\nend_bus = 0x3f\n",
        )
        .unwrap();
        let out = dir.join("no-such-dir").join("t.aml");
        let e = run(&AcpiTablesArgs {
            config: conf.clone(),
            output: out.clone(),
            json: false,
        })
        .unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert!(
            e.to_string()
                .starts_with(&format!("{}: cannot write", out.display())),
            "{e}"
        );
        let out = dir.join("t.aml");
        let r = run(&AcpiTablesArgs {
            config: conf,
            output: out.clone(),
            json: false,
        })
        .unwrap();
        assert_eq!(r.windows.len(), 1);
        // Segment 1, buses 0-0x3f at 0xe0000000: the MCFG's base is the window's own.
        assert_eq!(r.windows[0].mcfg_base, Some(0xe000_0000));
        let bytes = std::fs::read(&out).unwrap();
        assert_eq!(split_tables(&bytes).unwrap().len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
