//! Converts a QEMU trace log (the `log` trace backend with the `memory_region_ops_read/write`,
//! `pci_cfg_read/write` and `pci_update_mappings_add/del` events enabled) into the project's
//! trace format ([`ioreq_mux_trace`]).
//!
//! The log is streamed line by line (plain text or zstd, detected by its magic bytes) in
//! bounded memory. What the importer decides, and how (see also `docs/trace-format.md`):
//!
//! - **Port or MMIO.** QEMU's log does not say. x86 port space is 64 KiB and nothing but RAM
//!   lives in the first 64 KiB of guest-physical memory on a PC (and RAM accesses are never
//!   logged), so an address below 0x10000 is a port and anything else MMIO. The rule is
//!   cross-checked: per region name against lists of known port / MMIO regions, per region
//!   against the BARs mapped over its first access, regions seen in both spaces, and BAR
//!   events placing an I/O BAR above 64 KiB or a memory BAR below it. Every conflict is an
//!   anomaly in [`ImportStats`], and the per-region table shows each region's space.
//! - **Config accesses.** Ports 0xcfc-0xcff with the CF8 latch's enable bit set (the latch is
//!   the last 4-byte write to port 0xcf8) are CF8 config accesses: BDF and register from the
//!   latch and the port. MMIO accesses inside the ECAM window are ECAM accesses: the window is
//!   what the MCH's PCIEXBAR (00:00.0 register 0x60) was last written to; BDF and register
//!   from the offset in the window. Region names (`pci-conf-data`, `pcie-mmcfg-mmio`) are
//!   cross-checked.
//! - **Who answered.** QEMU logs `pci_cfg_read` *before* the `memory_region_ops_read` of the
//!   same access (the ops line is written when the read returns) and `pci_cfg_write` *after*
//!   the `memory_region_ops_write`. The importer pairs them that way and cross-checks BDF,
//!   register and value; a config access without its pci_cfg line was not answered by any
//!   function (or was past the function's config space size).
//! - **cpu -1** lines are QEMU's own accesses (device MSI writes): counted, not written.
//! - **Values** wider than the access (QEMU logs a 1-byte read of an unassigned port as
//!   0xffffffffffffffff) are masked to the access size and counted.

mod parse;
mod stats;

pub use stats::{
    AccessCounts, Anomalies, ConfigCounts, ImportStats, MappingCounts, PathCounts, RegionStats,
};

use bdf_router::ecam::ECAM_BUS_SIZE;
use bdf_router::{Cf8Latch, EcamWindow};
use chipset_intercept::q35::pciexbar_window;
use chipset_intercept::registers::{MCH_PCIEXBAR, MCH_PCIEXBAR_SIZE, Q35_MCH_DEVFN};
use ioreq_mux_trace::{
    Access, BarEvent, BarEventKind, ConfigAnnotation, ConfigPath, Dir, ProgressHandle, Record,
    Sbdf, Space, StrId, Thousands, TraceError, TraceMeta, TraceWriter,
};
use ioreq_server::abi::PCI_CONFIG_DATA_PORT;
use parse::Event;
use stats::MAX_EXAMPLES;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Version of the importer's semantics, stored in the trace metadata. Bump it when the same
/// log would import differently.
pub const IMPORTER_VERSION: u32 = 1;

/// First port above x86 port space.
const PORT_SPACE_END: u64 = 0x1_0000;

/// Largest ECAM window (256 buses); used to guess the window base when PCIEXBAR was not seen.
const ECAM_MAX_SIZE: u64 = 256 * ECAM_BUS_SIZE;

/// Options of [`import_file`] / [`import_reader`].
#[derive(Debug, Clone, Default)]
pub struct ImportOptions {
    /// Count and skip malformed lines (the first few are kept in
    /// [`ImportStats::malformed_examples`]) instead of failing.
    pub lenient: bool,
    /// Where to report progress (bytes of log text read, against the text's size when known;
    /// [`import_file`] only). The command-line tool passes a bar when stderr is a terminal.
    pub progress: Option<ProgressHandle>,
}

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("{}: {reason}", path.display())]
    NotALog { path: PathBuf, reason: String },
    /// Reading or decompressing the log failed.
    #[error("reading the log failed after line {line}: {source}")]
    Read { line: u64, source: io::Error },
    /// A line the importer cannot parse (not in lenient mode). `line` is 1-based.
    #[error("line {line}: {message}: {text}")]
    Malformed {
        line: u64,
        message: String,
        text: String,
    },
    #[error("writing the trace failed: {0}")]
    Trace(#[from] TraceError),
}

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Opens a log file, decompressing it when it starts with a zstd frame (or skippable frame).
/// Returns the line source and whether it was compressed.
/// An opened log: its lines, whether it was compressed, and how many bytes of text it holds
/// when that is known (the file's size, or the zstd frame's content size when written).
struct OpenLog {
    lines: Box<dyn BufRead>,
    compressed: bool,
    text_bytes: Option<u64>,
}

fn open_log(path: &Path) -> Result<OpenLog, ImportError> {
    let f = File::open(path).map_err(|source| ImportError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let file_bytes = f.metadata().ok().map(|m| m.len());
    let mut br = BufReader::with_capacity(1 << 20, f);
    let head = br.fill_buf().map_err(|source| ImportError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let mut magic = [0u8; 4];
    let n = head.len().min(4);
    magic[..n].copy_from_slice(&head[..n]);
    let skippable = u32::from_le_bytes(magic) & 0xffff_fff0 == 0x184d_2a50;
    if u32::from_le_bytes(magic) == ioreq_mux_trace::HEADER_FRAME_MAGIC
        && head.get(8..16) == Some(&ioreq_mux_trace::MAGIC[..])
    {
        return Err(ImportError::NotALog {
            path: path.to_path_buf(),
            reason: "this is already an ioreq-mux trace, not a QEMU log".into(),
        });
    }
    if magic == ZSTD_MAGIC || skippable {
        let text_bytes = zstd::zstd_safe::get_frame_content_size(head).ok().flatten();
        let mut dec =
            zstd::stream::read::Decoder::with_buffer(br).map_err(|source| ImportError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        dec.window_log_max(31).map_err(|source| ImportError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(OpenLog {
            lines: Box::new(BufReader::with_capacity(1 << 20, dec)),
            compressed: true,
            text_bytes,
        })
    } else {
        Ok(OpenLog {
            lines: Box::new(br),
            compressed: false,
            text_bytes: file_bytes,
        })
    }
}

/// The file name with `.tmp` appended.
fn tmp_path(out: &Path) -> PathBuf {
    let mut s = out.as_os_str().to_owned();
    s.push(".tmp");
    PathBuf::from(s)
}

/// Imports the log at `input` into a trace at `output` (written to `OUTPUT.tmp` first and
/// renamed when complete, so a failed import leaves no partial trace).
pub fn import_file(
    input: &Path,
    output: &Path,
    opts: &ImportOptions,
) -> Result<ImportStats, ImportError> {
    let start = Instant::now();
    let input_bytes = std::fs::metadata(input)
        .map_err(|source| ImportError::Open {
            path: input.to_path_buf(),
            source,
        })?
        .len();
    let same_file = matches!(
        (input.canonicalize(), output.canonicalize()),
        (Ok(a), Ok(b)) if a == b
    );
    if same_file {
        return Err(ImportError::NotALog {
            path: output.to_path_buf(),
            reason: "the output would overwrite the input".into(),
        });
    }
    let OpenLog {
        lines: reader,
        compressed,
        text_bytes,
    } = open_log(input)?;
    let progress = opts.progress.clone();
    if let Some(p) = &progress {
        p.begin(text_bytes);
    }
    let tmp = tmp_path(output);
    let file = File::create(&tmp).map_err(|source| ImportError::Create {
        path: tmp.clone(),
        source,
    })?;
    let meta = TraceMeta {
        source: format!("QEMU trace log {}", input.display()),
        producer: format!(
            "ioreq-mux {} qemu_import v{IMPORTER_VERSION}",
            env!("CARGO_PKG_VERSION")
        ),
        extra: serde_json::json!({
            "importer": "qemu_import",
            "importer_version": IMPORTER_VERSION,
            "input_file": input.display().to_string(),
            "input_bytes": input_bytes,
            "input_compressed": compressed,
        }),
    };
    let result = (|| {
        let mut stats = ImportStats {
            input: input.display().to_string(),
            output: output.display().to_string(),
            compressed_input: compressed,
            input_bytes,
            ..Default::default()
        };
        let w = BufWriter::with_capacity(1 << 20, file);
        let w = import_inner(reader, w, &meta, opts, progress.as_ref(), &mut stats)?;
        if stats.accesses.total == 0 {
            // A capture whose trace events were off (or that stopped before the guest ran)
            // would otherwise import, and replay, as a clean run of nothing.
            return Err(ImportError::NotALog {
                path: input.to_path_buf(),
                reason: "it has no guest access (no memory_region_ops_read/write lines: were \
                         QEMU's trace events enabled? traces/README.md says how the bundled \
                         logs were recorded)"
                    .into(),
            });
        }
        let file = w.into_inner().map_err(|e| ImportError::Create {
            path: tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(|source| ImportError::Create {
            path: tmp.clone(),
            source,
        })?;
        drop(file);
        std::fs::rename(&tmp, output).map_err(|source| ImportError::Create {
            path: output.to_path_buf(),
            source,
        })?;
        stats.output_bytes = std::fs::metadata(output).ok().map(|m| m.len());
        stats.elapsed_s = Some(start.elapsed().as_secs_f64());
        Ok(stats)
    })();
    if let Some(p) = &progress {
        p.finish();
    }
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Imports a log from `input` (already decompressed text) into a trace written to `output`.
/// `source` describes the input in the trace metadata and the statistics.
pub fn import_reader<R: BufRead, W: Write>(
    input: R,
    output: W,
    source: &str,
    opts: &ImportOptions,
) -> Result<(W, ImportStats), ImportError> {
    let start = Instant::now();
    let meta = TraceMeta {
        source: format!("QEMU trace log {source}"),
        producer: format!(
            "ioreq-mux {} qemu_import v{IMPORTER_VERSION}",
            env!("CARGO_PKG_VERSION")
        ),
        extra: serde_json::json!({
            "importer": "qemu_import",
            "importer_version": IMPORTER_VERSION,
        }),
    };
    let mut stats = ImportStats {
        input: source.to_string(),
        ..Default::default()
    };
    let w = import_inner(input, output, &meta, opts, None, &mut stats)?;
    stats.elapsed_s = Some(start.elapsed().as_secs_f64());
    Ok((w, stats))
}

/// The import's progress: bytes of log text read (after decompression), and lines.
fn report_progress(p: &ProgressHandle, text_bytes: u64, lines: u64) {
    p.advance(text_bytes, &format!("{} lines", Thousands(lines)));
}

fn truncate_line(line: &[u8]) -> String {
    const MAX: usize = 160;
    let s = String::from_utf8_lossy(&line[..line.len().min(MAX)]).into_owned();
    if line.len() > MAX { s + "..." } else { s }
}

fn import_inner<R: BufRead, W: Write>(
    mut input: R,
    output: W,
    meta: &TraceMeta,
    opts: &ImportOptions,
    progress: Option<&ProgressHandle>,
    stats: &mut ImportStats,
) -> Result<W, ImportError> {
    let mut imp = Importer::new(TraceWriter::new(output, meta)?, std::mem::take(stats));
    let mut line: Vec<u8> = Vec::with_capacity(256);
    loop {
        line.clear();
        let n = input
            .read_until(b'\n', &mut line)
            .map_err(|source| ImportError::Read {
                line: imp.line,
                source,
            })?;
        if n == 0 {
            break;
        }
        imp.line += 1;
        imp.stats.log_bytes += n as u64;
        match progress {
            Some(p) if imp.line & 0xffff == 0 => report_progress(p, imp.stats.log_bytes, imp.line),
            _ => {}
        }
        let text = match line.last() {
            Some(b'\n') => &line[..line.len() - 1],
            _ => &line[..],
        };
        let result = match parse::parse_line(text) {
            Ok(ev) => imp.on_event(ev),
            Err(message) => Err(message),
        };
        if let Err(message) = result {
            if opts.lenient {
                imp.stats.malformed_lines += 1;
                if imp.stats.malformed_examples.len() < MAX_EXAMPLES {
                    imp.stats.malformed_examples.push(format!(
                        "line {}: {message}: {}",
                        imp.line,
                        truncate_line(text)
                    ));
                }
            } else {
                return Err(ImportError::Malformed {
                    line: imp.line,
                    message,
                    text: truncate_line(text),
                });
            }
        }
    }
    let (w, s) = imp.finish()?;
    *stats = s;
    Ok(w)
}

/// What a region name says about the region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RegionKind {
    /// 'pci-conf-data': CF8 data ports.
    Cf8Data,
    /// 'pci-conf-idx': CF8 address latch.
    Cf8Index,
    /// 'pcie-mmcfg-mmio': the ECAM window.
    Ecam,
    Other,
}

/// Region names of QEMU's PC/Q35 machine whose address space is known (checked against the
/// address rule, never used to decide). From `info mtree -f` of the recorded machines.
fn known_space(name: &str) -> Option<Space> {
    const PORT: &[&str] = &[
        "pci-conf-idx",
        "pci-conf-data",
        "rtc",
        "rtc-index",
        "pit",
        "pic",
        "elcr",
        "isa-debugcon",
        "acpi-evt",
        "acpi-cnt",
        "acpi-tmr",
        "acpi-gpe0",
        "acpi-smi",
        "acpi-pci-hotplug",
        "acpi-cpu-hotplug",
        "apm-io",
        "fwcfg",
        "fwcfg.dma",
        "i8042-data",
        "i8042-cmd",
        "port92",
        "pcspk",
        "dma-chan",
        "dma-cont",
        "dma-page",
        "serial",
        "kvmvapic",
        "ioport80",
        "ioportF0",
        "lpc-reset-control",
        "sm-tco",
        "pm-smbus",
        "vmport",
        "ahci-idp",
        // The I/O address space's own container: accesses to unassigned ports.
        "io",
        // Legacy virtio I/O BAR.
        "virtio-pci",
    ];
    const MMIO: &[&str] = &[
        "pcie-mmcfg-mmio",
        "apic-msi",
        "ioapic",
        "hpet",
        "lpc-rcrb-mmio",
        "msix-table",
        "msix-pba",
        "shpc-mmio",
        "ahci",
        "nvme",
        "pc.bios",
        "system.flash0",
        "system.flash1",
    ];
    if PORT.contains(&name) || name.ends_with("-io") {
        Some(Space::Port)
    } else if MMIO.contains(&name) || name.ends_with("-mmio") || name.starts_with("virtio-pci-") {
        Some(Space::Mmio)
    } else {
        None
    }
}

struct Region {
    name: String,
    id: StrId,
    kind: RegionKind,
    known: Option<Space>,
    checked_port: bool,
    checked_mmio: bool,
    stats: RegionStats,
}

/// A `pci_cfg_read` line waiting for its ops line.
struct PendingCfgRead {
    device: StrId,
    bdf: Sbdf,
    reg: u16,
    value: u64,
    line: u64,
}

/// A config write waiting for its `pci_cfg_write` line.
struct PendingWrite {
    access: Access,
    region: usize,
}

/// What a BAR register's type bits said when last read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BarKind {
    Unknown,
    Io,
    Mem,
    /// Upper half of a 64-bit memory BAR.
    Upper,
}

/// The ECAM window the MCH's PCIEXBAR opens, as far as the trace has shown it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pciexbar {
    /// No PCIEXBAR write seen.
    Unknown,
    /// PCIEXBAREN clear (or a value that opens no window: an anomaly).
    Disabled,
    Enabled(EcamWindow),
}

struct ActiveBar {
    device: String,
    bdf: Sbdf,
    bar: u8,
    space: Space,
    base: u64,
    size: u64,
}

struct Importer<W: Write> {
    w: TraceWriter<W>,
    stats: ImportStats,
    line: u64,
    regions: Vec<Region>,
    region_index: HashMap<Vec<u8>, usize>,
    last_region: usize,
    devices: HashMap<Vec<u8>, StrId>,
    cf8: Cf8Latch,
    pciexbar: u64,
    ecam: Pciexbar,
    pending_read: Option<PendingCfgRead>,
    pending_write: Option<PendingWrite>,
    bar_kinds: HashMap<Sbdf, [BarKind; 6]>,
    active_bars: Vec<ActiveBar>,
    present: HashSet<Sbdf>,
    after_cfg_write: bool,
}

impl<W: Write> Importer<W> {
    fn new(w: TraceWriter<W>, stats: ImportStats) -> Self {
        Importer {
            w,
            stats,
            line: 0,
            regions: Vec::new(),
            region_index: HashMap::new(),
            last_region: usize::MAX,
            devices: HashMap::new(),
            cf8: Cf8Latch::default(),
            pciexbar: 0,
            ecam: Pciexbar::Unknown,
            pending_read: None,
            pending_write: None,
            bar_kinds: HashMap::new(),
            active_bars: Vec::new(),
            present: HashSet::new(),
            after_cfg_write: false,
        }
    }

    fn anomaly(&mut self, counter: fn(&mut Anomalies) -> &mut u64, what: String) {
        let line = self.line;
        self.stats
            .anomalies
            .note(counter, format!("line {line}: {what}"));
    }

    /// Handles one parsed line; `Err` is a message for a malformed line.
    fn on_event(&mut self, ev: Event<'_>) -> Result<(), String> {
        let after_cfg_write = std::mem::take(&mut self.after_cfg_write);
        match ev {
            Event::Blank => {
                self.stats.blank_lines += 1;
                self.after_cfg_write = after_cfg_write;
            }
            Event::Ops {
                vcpu: None, region, ..
            } => {
                // QEMU's own access: count it, leave the pairing state alone.
                let ri = self.region(region)?;
                self.regions[ri].stats.internal += 1;
                self.stats.internal_accesses += 1;
                self.after_cfg_write = after_cfg_write;
            }
            Event::Ops {
                dir,
                vcpu: Some(vcpu),
                addr,
                value,
                size,
                region,
            } => self.on_access(dir, vcpu, addr, value, size, region)?,
            Event::Cfg {
                dir: Dir::Read,
                device,
                bdf,
                reg,
                value,
            } => {
                self.flush_pending_write().map_err(|e| e.to_string())?;
                let device = self.device(device)?;
                if let Some(old) = self.pending_read.take() {
                    self.orphan_read(&old);
                }
                self.pending_read = Some(PendingCfgRead {
                    device,
                    bdf,
                    reg,
                    value,
                    line: self.line,
                });
            }
            Event::Cfg {
                dir: Dir::Write,
                device,
                bdf,
                reg,
                value,
            } => {
                let device = self.device(device)?;
                if let Some(old) = self.pending_read.take() {
                    self.orphan_read(&old);
                }
                match self.pending_write.take() {
                    Some(mut pw) => {
                        if let Some(c) = &mut pw.access.config {
                            if c.sbdf != bdf || c.reg != reg || pw.access.data != value {
                                let msg = format!(
                                    "pci_cfg_write {} @{reg:#x} <- {value:#x} pairs with a \
                                     {} write of {:#x} to {} @{:#x}",
                                    bdf.short(),
                                    c.path,
                                    pw.access.data,
                                    c.sbdf.short(),
                                    c.reg
                                );
                                self.anomaly(|a| &mut a.pci_cfg_mismatch, msg);
                            }
                            c.device = Some(device);
                        }
                        self.present.insert(bdf);
                        self.emit(pw.access, pw.region).map_err(|e| e.to_string())?;
                        self.after_cfg_write = true;
                    }
                    None => {
                        let msg = format!(
                            "pci_cfg_write {} @{reg:#x} <- {value:#x} does not follow a \
                             config write",
                            bdf.short()
                        );
                        self.anomaly(|a| &mut a.orphan_pci_cfg_write, msg);
                    }
                }
            }
            Event::Mapping {
                kind,
                device,
                bdf,
                bar,
                base,
                size,
            } => {
                self.flush_pending_write().map_err(|e| e.to_string())?;
                if let Some(old) = self.pending_read.take() {
                    self.orphan_read(&old);
                }
                let name = std::str::from_utf8(device)
                    .map_err(|_| "device name is not valid UTF-8".to_string())?
                    .to_string();
                let device = self.device(device)?;
                self.on_mapping(kind, device, name, bdf, bar, base, size, after_cfg_write)
                    .map_err(|e| e.to_string())?;
                self.after_cfg_write = true;
            }
        }
        Ok(())
    }

    fn orphan_read(&mut self, p: &PendingCfgRead) {
        let msg = format!(
            "pci_cfg_read {} @{:#x} -> {:#x} (line {}) is not followed by a config read",
            p.bdf.short(),
            p.reg,
            p.value,
            p.line
        );
        self.anomaly(|a| &mut a.orphan_pci_cfg_read, msg);
    }

    fn region(&mut self, name: &[u8]) -> Result<usize, String> {
        let last = self.regions.get(self.last_region);
        if last.is_some_and(|r| r.name.as_bytes() == name) {
            return Ok(self.last_region);
        }
        let i = match self.region_index.get(name) {
            Some(&i) => i,
            None => {
                let s = std::str::from_utf8(name)
                    .map_err(|_| "region name is not valid UTF-8".to_string())?;
                let id = self.w.intern(s).map_err(|e| e.to_string())?;
                let kind = match s {
                    "pci-conf-data" => RegionKind::Cf8Data,
                    "pci-conf-idx" => RegionKind::Cf8Index,
                    "pcie-mmcfg-mmio" => RegionKind::Ecam,
                    _ => RegionKind::Other,
                };
                self.regions.push(Region {
                    name: s.to_string(),
                    id,
                    kind,
                    known: known_space(s),
                    checked_port: false,
                    checked_mmio: false,
                    stats: RegionStats::new(),
                });
                let i = self.regions.len() - 1;
                self.region_index.insert(name.to_vec(), i);
                i
            }
        };
        self.last_region = i;
        Ok(i)
    }

    fn device(&mut self, name: &[u8]) -> Result<StrId, String> {
        if let Some(&id) = self.devices.get(name) {
            return Ok(id);
        }
        let s =
            std::str::from_utf8(name).map_err(|_| "device name is not valid UTF-8".to_string())?;
        let id = self.w.intern(s).map_err(|e| e.to_string())?;
        self.devices.insert(name.to_vec(), id);
        Ok(id)
    }

    fn on_access(
        &mut self,
        dir: Dir,
        vcpu: u16,
        addr: u64,
        value: u64,
        size: u8,
        region: &[u8],
    ) -> Result<(), String> {
        self.flush_pending_write().map_err(|e| e.to_string())?;
        let ri = self.region(region)?;
        let space = if addr < PORT_SPACE_END {
            Space::Port
        } else {
            Space::Mmio
        };
        let mask = if size >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * u32::from(size))) - 1
        };
        let data = value & mask;
        if data != value {
            self.stats.wide_values_masked += 1;
            self.regions[ri].stats.wide_values += 1;
        }
        let checked = match space {
            Space::Port => &mut self.regions[ri].checked_port,
            Space::Mmio => &mut self.regions[ri].checked_mmio,
        };
        if !*checked {
            *checked = true;
            self.check_region_space(ri, space, addr);
        }
        let mut access = Access {
            vcpu,
            space,
            dir,
            addr,
            size,
            rep: 1,
            data,
            region: Some(self.regions[ri].id),
            config: None,
        };
        let target = self.config_target(ri, space, dir, addr, size, data);
        match (dir, target) {
            (Dir::Read, Some((path, bdf, reg))) => {
                let device = match self.pending_read.take() {
                    Some(p) => {
                        if p.bdf != bdf || p.reg != reg || p.value != data {
                            let msg = format!(
                                "pci_cfg_read {} @{:#x} -> {:#x} (line {}) pairs with a {path} \
                                 read of {data:#x} from {} @{reg:#x}",
                                p.bdf.short(),
                                p.reg,
                                p.value,
                                p.line,
                                bdf.short()
                            );
                            self.anomaly(|a| &mut a.pci_cfg_mismatch, msg);
                        }
                        self.present.insert(p.bdf);
                        self.note_bar_read(p.bdf, p.reg, data);
                        Some(p.device)
                    }
                    None => None,
                };
                access.config = Some(ConfigAnnotation {
                    path,
                    sbdf: bdf,
                    reg,
                    device,
                });
                self.emit(access, ri).map_err(|e| e.to_string())?;
            }
            (Dir::Write, Some((path, bdf, reg))) => {
                if let Some(old) = self.pending_read.take() {
                    self.orphan_read(&old);
                }
                access.config = Some(ConfigAnnotation {
                    path,
                    sbdf: bdf,
                    reg,
                    device: None,
                });
                self.pending_write = Some(PendingWrite { access, region: ri });
            }
            (_, None) => {
                if let Some(old) = self.pending_read.take() {
                    self.orphan_read(&old);
                }
                self.emit(access, ri).map_err(|e| e.to_string())?;
            }
        }
        Ok(())
    }

    /// Cross-checks the address rule for the first access of a region in a space.
    fn check_region_space(&mut self, ri: usize, space: Space, addr: u64) {
        let r = &self.regions[ri];
        let (name, known, both) = (r.name.clone(), r.known, r.checked_port && r.checked_mmio);
        match known {
            Some(k) if k != space => {
                let msg = format!(
                    "region '{name}' is a known {k} region but address {addr:#x} makes the \
                     access a {space} access"
                );
                self.anomaly(|a| &mut a.space_conflict, msg);
            }
            _ => {}
        }
        if both {
            let msg = format!("region '{name}' answers both port and MMIO accesses ({addr:#x})");
            self.anomaly(|a| &mut a.space_conflict, msg);
        }
        let same = self
            .active_bars
            .iter()
            .find(|b| b.space == space && addr >= b.base && addr - b.base < b.size);
        match same {
            Some(b) => {
                if self.regions[ri].stats.bar.is_none() {
                    let desc = format!("{} {} BAR{} ({})", b.device, b.bdf.short(), b.bar, b.space);
                    self.regions[ri].stats.bar = Some(desc);
                }
            }
            None => {
                let other = self
                    .active_bars
                    .iter()
                    .find(|b| b.space != space && addr >= b.base && addr - b.base < b.size);
                if let Some(b) = other {
                    let msg = format!(
                        "{space} access to {addr:#x} (region '{name}') lies in {} BAR{} of {} \
                         {} mapped as {}",
                        b.space,
                        b.bar,
                        b.device,
                        b.bdf.short(),
                        b.space
                    );
                    self.anomaly(|a| &mut a.space_conflict, msg);
                }
            }
        }
    }

    /// Whether this access is a config access, and what it addresses. Also tracks the CF8
    /// latch.
    fn config_target(
        &mut self,
        ri: usize,
        space: Space,
        dir: Dir,
        addr: u64,
        size: u8,
        data: u64,
    ) -> Option<(ConfigPath, Sbdf, u16)> {
        let kind = self.regions[ri].kind;
        match space {
            Space::Port => {
                if addr & !3 == u64::from(PCI_CONFIG_DATA_PORT) {
                    if kind != RegionKind::Cf8Data {
                        let msg = format!(
                            "port {addr:#x} answered by region '{}', not 'pci-conf-data'",
                            self.regions[ri].name
                        );
                        self.anomaly(|a| &mut a.config_region_mismatch, msg);
                    }
                    if !self.cf8.enabled() {
                        self.stats.config.cf8_disabled_data_accesses += 1;
                        return None;
                    }
                    let Some(c) = self.cf8.decode(addr, u32::from(size), dir) else {
                        let msg = format!("{size}-byte access at port {addr:#x} crosses 0xcff");
                        self.anomaly(|a| &mut a.config_region_mismatch, msg);
                        return None;
                    };
                    return Some((ConfigPath::Cf8, c.sbdf, c.reg));
                }
                if kind == RegionKind::Cf8Data {
                    let msg = format!("region 'pci-conf-data' answered port {addr:#x}");
                    self.anomaly(|a| &mut a.config_region_mismatch, msg);
                }
                if Cf8Latch::is_address_port(addr, u32::from(size)) {
                    if kind != RegionKind::Cf8Index {
                        let msg = format!(
                            "port 0xcf8 answered by region '{}', not 'pci-conf-idx'",
                            self.regions[ri].name
                        );
                        self.anomaly(|a| &mut a.config_region_mismatch, msg);
                    }
                    match dir {
                        Dir::Write => {
                            self.cf8.write(data);
                            self.stats.config.cf8_latch_writes += 1;
                        }
                        Dir::Read => self.stats.config.cf8_latch_reads += 1,
                    }
                }
                None
            }
            Space::Mmio => {
                if let Some((sbdf, reg)) = self.window().and_then(|w| w.decode(addr)) {
                    if kind != RegionKind::Ecam {
                        let msg = format!(
                            "ECAM window address {addr:#x} answered by region '{}', not \
                             'pcie-mmcfg-mmio'",
                            self.regions[ri].name
                        );
                        self.anomaly(|a| &mut a.config_region_mismatch, msg);
                    }
                    return Some((ConfigPath::Ecam, sbdf, reg));
                }
                if kind != RegionKind::Ecam {
                    return None;
                }
                if self.ecam == Pciexbar::Unknown {
                    self.stats.config.ecam_window_guessed += 1;
                } else {
                    let msg = format!(
                        "'pcie-mmcfg-mmio' access at {addr:#x} outside the PCIEXBAR window ({})",
                        self.window_string()
                    );
                    self.anomaly(|a| &mut a.ecam_outside_window, msg);
                }
                let guess = EcamWindow::new(0, addr & !(ECAM_MAX_SIZE - 1), 0, 0xff).ok()?;
                let (sbdf, reg) = guess.decode(addr)?;
                Some((ConfigPath::Ecam, sbdf, reg))
            }
        }
    }

    fn window(&self) -> Option<EcamWindow> {
        match self.ecam {
            Pciexbar::Enabled(w) => Some(w),
            Pciexbar::Unknown | Pciexbar::Disabled => None,
        }
    }

    fn window_string(&self) -> String {
        match self.ecam {
            Pciexbar::Unknown => "unknown".into(),
            Pciexbar::Disabled => "disabled".into(),
            Pciexbar::Enabled(w) => format!("{:#x}+{:#x}", w.base, w.size()),
        }
    }

    /// Remembers the I/O-vs-memory bit of BAR registers read through config space.
    fn note_bar_read(&mut self, bdf: Sbdf, reg: u16, data: u64) {
        if !(0x10..0x28).contains(&reg) || reg & 3 != 0 {
            return;
        }
        let i = usize::from((reg - 0x10) / 4);
        let kinds = self.bar_kinds.entry(bdf).or_insert([BarKind::Unknown; 6]);
        if kinds[i] == BarKind::Upper {
            return;
        }
        if data & 1 != 0 {
            kinds[i] = BarKind::Io;
        } else {
            kinds[i] = BarKind::Mem;
            if (data >> 1) & 3 == 2 && i < 5 {
                kinds[i + 1] = BarKind::Upper;
            }
        }
    }

    /// Tracks writes to PCIEXBAR (MCH 00:00.0, [`MCH_PCIEXBAR`], 8 bytes); the window it
    /// opens comes from the intercept's own decoder, [`pciexbar_window`].
    fn note_config_write(&mut self, c: &ConfigAnnotation, size: u8, data: u64) {
        if c.sbdf != Sbdf::from_devfn(0, 0, Q35_MCH_DEVFN) {
            return;
        }
        let mut changed = false;
        for i in 0..u16::from(size) {
            let r = c.reg + i;
            if (MCH_PCIEXBAR..MCH_PCIEXBAR + MCH_PCIEXBAR_SIZE).contains(&r) {
                let shift = 8 * u32::from(r - MCH_PCIEXBAR);
                let byte = (data >> (8 * u32::from(i))) & 0xff;
                self.pciexbar = (self.pciexbar & !(0xff << shift)) | (byte << shift);
                changed = true;
            }
        }
        if !changed {
            return;
        }
        let v = self.pciexbar;
        let new = match pciexbar_window(v, 0) {
            Ok(Some(w)) => Pciexbar::Enabled(w),
            Ok(None) => Pciexbar::Disabled,
            Err(why) => {
                let msg = format!("PCIEXBAR {v:#x} opens no ECAM window: {why}");
                self.anomaly(|a| &mut a.pciexbar_refused, msg);
                Pciexbar::Disabled
            }
        };
        if new != self.ecam {
            self.ecam = new;
            self.stats.config.ecam_window_changes += 1;
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_mapping(
        &mut self,
        kind: BarEventKind,
        device: StrId,
        name: String,
        bdf: Sbdf,
        bar: u8,
        base: u64,
        size: u64,
        after_cfg_write: bool,
    ) -> Result<(), TraceError> {
        let m = &mut self.stats.mapping_events;
        match kind {
            BarEventKind::Map => m.map += 1,
            BarEventKind::Unmap => m.unmap += 1,
        }
        if after_cfg_write {
            m.after_config_write += 1;
        } else {
            m.other += 1;
        }
        let from_register = if bar == 6 {
            Some(Space::Mmio)
        } else {
            match self.bar_kinds.get(&bdf).map(|k| k[usize::from(bar)]) {
                Some(BarKind::Io) => Some(Space::Port),
                Some(BarKind::Mem) => Some(Space::Mmio),
                _ => None,
            }
        };
        let end = base.saturating_add(size);
        let space = match from_register {
            Some(s) => {
                self.stats.mapping_events.space_from_bar_register += 1;
                s
            }
            None => {
                self.stats.mapping_events.space_inferred_from_address += 1;
                if end <= PORT_SPACE_END {
                    Space::Port
                } else {
                    Space::Mmio
                }
            }
        };
        if (space == Space::Port && end > PORT_SPACE_END)
            || (space == Space::Mmio && base < PORT_SPACE_END)
        {
            let msg = format!(
                "{name} {} BAR{bar} is a {space} BAR at {base:#x}+{size:#x}: accesses there \
                 would be classified as {}",
                bdf.short(),
                if space == Space::Port {
                    "MMIO"
                } else {
                    "ports"
                }
            );
            self.anomaly(|a| &mut a.bar_space_conflict, msg);
        }
        match kind {
            BarEventKind::Map => self.active_bars.push(ActiveBar {
                device: name,
                bdf,
                bar,
                space,
                base,
                size,
            }),
            BarEventKind::Unmap => self
                .active_bars
                .retain(|b| !(b.bdf == bdf && b.bar == bar && b.base == base)),
        }
        self.w.write(&Record::Bar(BarEvent {
            kind,
            device: Some(device),
            sbdf: bdf,
            bar,
            space,
            base,
            size,
        }))
    }

    fn flush_pending_write(&mut self) -> Result<(), TraceError> {
        match self.pending_write.take() {
            Some(pw) => self.emit(pw.access, pw.region),
            None => Ok(()),
        }
    }

    /// Counts and writes a guest access.
    fn emit(&mut self, a: Access, ri: usize) -> Result<(), TraceError> {
        let s = &mut self.stats;
        s.accesses.total += 1;
        match (a.space, a.dir) {
            (Space::Port, Dir::Read) => s.accesses.port_read += 1,
            (Space::Port, Dir::Write) => s.accesses.port_write += 1,
            (Space::Mmio, Dir::Read) => s.accesses.mmio_read += 1,
            (Space::Mmio, Dir::Write) => s.accesses.mmio_write += 1,
        }
        *s.vcpus.entry(a.vcpu).or_insert(0) += 1;
        *s.sizes.entry(a.size).or_insert(0) += 1;
        let r = &mut self.regions[ri].stats;
        match a.dir {
            Dir::Read => r.reads += 1,
            Dir::Write => r.writes += 1,
        }
        match a.space {
            Space::Port => r.port += 1,
            Space::Mmio => r.mmio += 1,
        }
        r.min_addr = r.min_addr.min(a.addr);
        r.max_addr = r.max_addr.max(a.addr);
        if let Some(c) = &a.config {
            r.config += 1;
            let p = match c.path {
                ConfigPath::Cf8 => &mut s.config.cf8,
                ConfigPath::Ecam => &mut s.config.ecam,
            };
            match a.dir {
                Dir::Read => p.reads += 1,
                Dir::Write => p.writes += 1,
            }
            if c.device.is_some() {
                p.answered += 1;
            } else {
                p.unanswered += 1;
                if self.present.contains(&c.sbdf) {
                    s.config.unanswered_on_present_function += 1;
                }
            }
            if a.dir == Dir::Write {
                let c = *c;
                self.note_config_write(&c, a.size, a.data);
            }
        }
        self.w.write(&Record::access(a))
    }

    fn finish(mut self) -> Result<(W, ImportStats), ImportError> {
        self.flush_pending_write()?;
        if let Some(old) = self.pending_read.take() {
            self.orphan_read(&old);
        }
        let window = self.window_string();
        let mut stats = self.stats;
        stats.lines = self.line;
        for r in &mut self.regions {
            r.stats.finalize();
            stats.regions.insert(r.name.clone(), r.stats.clone());
        }
        stats.config.functions_seen = self.present.len() as u64;
        stats.config.ecam_window = window;
        stats.trace = self.w.summary();
        let (w, summary) = self.w.finish_with_trailer(&stats)?;
        stats.trace = summary;
        Ok((w, stats))
    }
}
