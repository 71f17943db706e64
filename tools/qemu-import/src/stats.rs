//! What an import saw and wrote: [`ImportStats`] (JSON via serde, human summary via `Display`).

use ioreq_mux_trace::TraceSummary;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;

/// The `schema` value of `import-qemu-trace --json`. Bumped when a key changes meaning or
/// goes away.
pub const SCHEMA: &str = "ioreq-mux.import/1";

/// Serializes as [`SCHEMA`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Schema;

impl Serialize for Schema {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(SCHEMA)
    }
}

/// How many examples of each kind of problem are kept.
pub(crate) const MAX_EXAMPLES: usize = 8;

/// Counts of an import. Access counts are guest accesses (`cpu >= 0`) as written to the trace,
/// before folding.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportStats {
    /// [`SCHEMA`].
    pub schema: Schema,
    /// The input path as given.
    pub input: String,
    /// The output path as given (empty when importing to a writer).
    pub output: String,
    /// Whether the input was zstd-compressed.
    pub compressed_input: bool,
    /// Size of the input file (compressed size for a `.zst`).
    pub input_bytes: u64,
    /// Bytes of log text read (after decompression).
    pub log_bytes: u64,
    /// Lines read (including blank and malformed ones).
    pub lines: u64,
    pub blank_lines: u64,
    /// Guest accesses written (before folding), by space and direction.
    pub accesses: AccessCounts,
    /// PCI config accesses among them.
    pub config: ConfigCounts,
    /// `cpu -1` lines: accesses QEMU made itself (device MSI writes...), counted, not written.
    pub internal_accesses: u64,
    /// BAR placement events (`pci_update_mappings_add/del`).
    pub mapping_events: MappingCounts,
    /// Lines skipped in lenient mode.
    pub malformed_lines: u64,
    /// The first few skipped lines: `line N: what was wrong: the line`.
    pub malformed_examples: Vec<String>,
    /// Accesses whose logged value had bits above the access size (QEMU logs, e.g., a 1-byte
    /// read of an unassigned port as 0xffffffffffffffff); the trace stores the masked value.
    pub wide_values_masked: u64,
    /// Things that should not happen in a well-formed log of a PC machine; each is counted and
    /// the first few are described in `anomalies.examples`. Zero for both real Q35 traces.
    pub anomalies: Anomalies,
    /// What the trace writer wrote (records after folding, strings, bytes).
    pub trace: TraceSummary,
    /// Guest accesses per vCPU.
    pub vcpus: BTreeMap<u16, u64>,
    /// Guest accesses per access size in bytes.
    pub sizes: BTreeMap<u8, u64>,
    /// Per QEMU memory-region name: how it was classified and how often it answered.
    pub regions: BTreeMap<String, RegionStats>,
    /// Wall time of the import (not in the trailer stored inside the trace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    /// Size of the written trace file (not in the trailer stored inside the trace).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_bytes: Option<u64>,
}

/// Guest accesses by space and direction.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct AccessCounts {
    pub total: u64,
    pub port_read: u64,
    pub port_write: u64,
    pub mmio_read: u64,
    pub mmio_write: u64,
}

/// Config accesses through one path.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PathCounts {
    pub reads: u64,
    pub writes: u64,
    /// A `pci_cfg_read/write` line named the device that answered.
    pub answered: u64,
    /// No function answered (master abort: reads return all ones), or the register is past the
    /// function's config space size.
    pub unanswered: u64,
}

/// PCI config access counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConfigCounts {
    pub cf8: PathCounts,
    pub ecam: PathCounts,
    /// 4-byte writes to port 0xcf8 (the CF8 address latch).
    pub cf8_latch_writes: u64,
    /// 4-byte reads of port 0xcf8.
    pub cf8_latch_reads: u64,
    /// Accesses to ports 0xcfc-0xcff while the CF8 enable bit was clear: not config accesses
    /// (no annotation).
    pub cf8_disabled_data_accesses: u64,
    /// Unanswered config accesses to a function that answered other accesses: registers past
    /// its config space size (QEMU logs no pci_cfg line for them).
    pub unanswered_on_present_function: u64,
    /// Functions that answered at least one config access.
    pub functions_seen: u64,
    /// The ECAM window at the end (from the MCH's PCIEXBAR, 00:00.0 register 0x60), as
    /// `0xBASE+0xSIZE`, or `disabled` / `unknown`.
    pub ecam_window: String,
    /// Writes to PCIEXBAR that changed the window.
    pub ecam_window_changes: u64,
    /// ECAM accesses ('pcie-mmcfg-mmio') seen before any PCIEXBAR write: decoded assuming a
    /// window aligned to 256 MiB.
    pub ecam_window_guessed: u64,
}

/// BAR placement events.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MappingCounts {
    pub map: u64,
    pub unmap: u64,
    /// I/O vs memory taken from the BAR register's bit 0 as last read through config space
    /// (always memory for the ROM, index 6).
    pub space_from_bar_register: u64,
    /// BAR register never read: I/O when the range lies below 64 KiB, memory otherwise.
    pub space_inferred_from_address: u64,
    /// Events right after the config write that caused them.
    pub after_config_write: u64,
    /// Events with no config write just before (device reset, bus renumbering...).
    pub other: u64,
}

/// Semantic surprises. Each counter has a doc comment saying what it means.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Anomalies {
    pub total: u64,
    /// A pci_cfg line disagrees with the access it pairs with (function, register or value).
    pub pci_cfg_mismatch: u64,
    /// A pci_cfg_read line not followed by a config read (ports 0xcfc-0xcff or the ECAM window).
    pub orphan_pci_cfg_read: u64,
    /// A pci_cfg_write line not right after a config write.
    pub orphan_pci_cfg_write: u64,
    /// The CF8 ports or the ECAM window answered by an unexpected region name, or the config
    /// regions seen at unexpected addresses.
    pub config_region_mismatch: u64,
    /// A region classified into a space it cannot be in: a known port region at an address
    /// >= 0x10000 or a known MMIO region below it, a region name seen in both spaces, or an
    /// > address inside a BAR of the other space.
    pub space_conflict: u64,
    /// An I/O BAR placed above 64 KiB or a memory BAR below it (accesses there would be
    /// classified into the wrong space).
    pub bar_space_conflict: u64,
    /// ECAM accesses outside the PCIEXBAR window (or while it is disabled).
    pub ecam_outside_window: u64,
    /// PCIEXBAR written with PCIEXBAREN set and a value that opens no window (the reserved
    /// LENGTH 11b): the multiplexer's intercept refuses it the same way.
    pub pciexbar_refused: u64,
    /// First few, with line numbers.
    pub examples: Vec<String>,
}

/// One QEMU memory-region name.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RegionStats {
    /// `port`, `mmio`, `port+mmio` (an anomaly) or `internal` (only cpu -1 accesses).
    pub space: String,
    /// Guest reads and writes.
    pub reads: u64,
    pub writes: u64,
    /// `cpu -1` accesses (not written to the trace).
    pub internal: u64,
    /// Guest accesses that were PCI config accesses.
    pub config: u64,
    /// Accesses whose logged value was wider than the access (masked).
    pub wide_values: u64,
    /// Lowest and highest guest address seen.
    pub min_addr: u64,
    pub max_addr: u64,
    /// The BAR mapped over the first guest access, if any: `DEVICE BB:DD.F BARn (port|mmio)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bar: Option<String>,
    #[serde(skip)]
    pub(crate) port: u64,
    #[serde(skip)]
    pub(crate) mmio: u64,
}

impl RegionStats {
    pub(crate) fn new() -> Self {
        RegionStats {
            min_addr: u64::MAX,
            ..Default::default()
        }
    }

    pub(crate) fn finalize(&mut self) {
        self.space = match (self.port > 0, self.mmio > 0) {
            (true, true) => "port+mmio",
            (true, false) => "port",
            (false, true) => "mmio",
            (false, false) => "internal",
        }
        .to_string();
        if self.min_addr == u64::MAX {
            self.min_addr = 0;
        }
    }
}

impl Anomalies {
    pub(crate) fn note(&mut self, counter: fn(&mut Anomalies) -> &mut u64, example: String) {
        *counter(self) += 1;
        self.total += 1;
        if self.examples.len() < MAX_EXAMPLES * 2 {
            self.examples.push(example);
        }
    }
}

pub(crate) use ioreq_mux_trace::Thousands;

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl fmt::Display for PathCounts {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} reads, {} writes; {} answered, {} unanswered",
            Thousands(self.reads),
            Thousands(self.writes),
            Thousands(self.answered),
            Thousands(self.unanswered)
        )
    }
}

impl fmt::Display for ImportStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_header(f)?;
        self.fmt_accesses_and_config(f)?;
        self.fmt_events(f)?;
        self.fmt_trace_written(f)?;
        self.fmt_regions(f)?;
        self.fmt_problems(f)?;
        Ok(())
    }
}

/// The text report, a section per function.
impl ImportStats {
    /// The input, output and time; the log's size.
    fn fmt_header(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = Thousands;
        write!(f, "imported {}", self.input)?;
        if !self.output.is_empty() {
            write!(f, " -> {}", self.output)?;
        }
        if let Some(s) = self.elapsed_s {
            write!(f, " in {s:.1} s")?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "  log: {} lines, {:.1} MiB of text ({:.1} MiB on disk{})",
            t(self.lines),
            mib(self.log_bytes),
            mib(self.input_bytes),
            if self.compressed_input { ", zstd" } else { "" }
        )?;
        Ok(())
    }

    /// Guest accesses and how configuration space was reached.
    fn fmt_accesses_and_config(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = Thousands;
        let a = &self.accesses;
        writeln!(
            f,
            "  guest accesses: {} (port {} reads / {} writes, mmio {} reads / {} writes)",
            t(a.total),
            t(a.port_read),
            t(a.port_write),
            t(a.mmio_read),
            t(a.mmio_write)
        )?;
        let c = &self.config;
        writeln!(f, "  config via CF8:  {}", c.cf8)?;
        writeln!(f, "  config via ECAM: {}", c.ecam)?;
        writeln!(
            f,
            "    CF8 latch: {} writes, {} reads; data-port accesses with CF8 disabled: {}",
            t(c.cf8_latch_writes),
            t(c.cf8_latch_reads),
            t(c.cf8_disabled_data_accesses)
        )?;
        writeln!(
            f,
            "    functions answering: {}; unanswered on present functions (past config size): \
             {}",
            c.functions_seen,
            t(c.unanswered_on_present_function)
        )?;
        writeln!(
            f,
            "    ECAM window at end: {} ({} changes{})",
            c.ecam_window,
            c.ecam_window_changes,
            if c.ecam_window_guessed > 0 {
                format!(
                    ", {} accesses decoded with a guessed window",
                    c.ecam_window_guessed
                )
            } else {
                String::new()
            }
        )?;
        Ok(())
    }

    /// BAR events, internal accesses, masked values.
    fn fmt_events(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = Thousands;
        let m = &self.mapping_events;
        writeln!(
            f,
            "  BAR events: {} map, {} unmap (space from BAR register {}, inferred from address \
             {}; {} after a config write, {} other)",
            m.map,
            m.unmap,
            m.space_from_bar_register,
            m.space_inferred_from_address,
            m.after_config_write,
            m.other
        )?;
        writeln!(
            f,
            "  internal (cpu -1) accesses, not written: {}",
            t(self.internal_accesses)
        )?;
        writeln!(
            f,
            "  values wider than their access, masked: {}",
            t(self.wide_values_masked)
        )?;
        Ok(())
    }

    /// What the trace holds, per vCPU and per size.
    fn fmt_trace_written(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = Thousands;
        let tr = &self.trace;
        write!(
            f,
            "  trace: {} records ({} access records for {} accesses, {} BAR events), {} strings, \
             {:.1} MiB uncompressed",
            t(tr.records),
            t(tr.access_records),
            t(tr.accesses),
            t(tr.bar_records),
            tr.strings,
            mib(tr.uncompressed_bytes)
        )?;
        if let Some(b) = self.output_bytes {
            write!(f, ", {:.2} MiB written", mib(b))?;
        }
        writeln!(f)?;
        let join = |it: &mut dyn Iterator<Item = String>| it.collect::<Vec<_>>().join(", ");
        writeln!(
            f,
            "  per vCPU: {}; per size: {}",
            join(&mut self.vcpus.iter().map(|(k, v)| format!("{k}: {}", t(*v)))),
            join(&mut self.sizes.iter().map(|(k, v)| format!("{k}B: {}", t(*v))))
        )?;
        Ok(())
    }

    /// QEMU's memory regions, busiest first.
    fn fmt_regions(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = Thousands;
        writeln!(
            f,
            "  regions ({}): space, guest reads, writes, config, address range, BAR",
            self.regions.len()
        )?;
        let mut regions: Vec<_> = self.regions.iter().collect();
        regions.sort_by_key(|(_, r)| std::cmp::Reverse(r.reads + r.writes + r.internal));
        for (name, r) in regions {
            write!(
                f,
                "    {:<32} {:<9} {:>11} {:>9} {:>7}",
                format!("'{name}'"),
                r.space,
                t(r.reads),
                t(r.writes),
                t(r.config)
            )?;
            if r.reads + r.writes > 0 {
                write!(f, "  {:#x}-{:#x}", r.min_addr, r.max_addr)?;
            }
            if r.internal > 0 {
                write!(f, "  internal {}", t(r.internal))?;
            }
            if let Some(b) = &r.bar {
                write!(f, "  {b}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }

    /// Malformed lines and anomalies, with examples.
    fn fmt_problems(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = Thousands;
        if self.malformed_lines > 0 {
            writeln!(f, "  MALFORMED LINES SKIPPED: {}", t(self.malformed_lines))?;
            for e in &self.malformed_examples {
                writeln!(f, "    {e}")?;
            }
        }
        let an = &self.anomalies;
        if an.total == 0 {
            writeln!(f, "  anomalies: none")?;
        } else {
            writeln!(
                f,
                "  WARNING: {} anomalies (pci_cfg mismatch {}, orphan pci_cfg_read {}, orphan \
                 pci_cfg_write {}, config region mismatch {}, space conflict {}, BAR space \
                 conflict {}, ECAM outside window {}, PCIEXBAR refused {}):",
                an.total,
                an.pci_cfg_mismatch,
                an.orphan_pci_cfg_read,
                an.orphan_pci_cfg_write,
                an.config_region_mismatch,
                an.space_conflict,
                an.bar_space_conflict,
                an.ecam_outside_window,
                an.pciexbar_refused
            )?;
            for e in &an.examples {
                writeln!(f, "    {e}")?;
            }
        }
        Ok(())
    }
}
