//! The QEMU log importer on hand-written log snippets.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use ioreq_mux::qemu_import::{
    ImportArgs, ImportError, ImportOptions, ImportStats, import_file, import_reader,
};
use ioreq_mux::trace::{
    Access, BarEvent, BarEventKind, ConfigPath, Dir, Record, Sbdf, Space, TraceReader,
};
use std::path::PathBuf;

/// A small log covering the cases the importer must get right. Line numbers matter (errors).
const SNIPPET: &str = "\
memory_region_ops_write cpu -1 mr 0x1 addr 0xfee00000 value 0x0 size 4 name 'apic-msi'
memory_region_ops_write cpu 0 mr 0x2 addr 0xcf8 value 0x80000000 size 4 name 'pci-conf-idx'
pci_cfg_read mch 00:00.0 @0x0 -> 0x8086
memory_region_ops_read cpu 0 mr 0x3 addr 0xcfc value 0x8086 size 2 name 'pci-conf-data'
memory_region_ops_write cpu 0 mr 0x2 addr 0xcf8 value 0x80000860 size 4 name 'pci-conf-idx'
memory_region_ops_read cpu 0 mr 0x3 addr 0xcfe value 0xffffffff size 2 name 'pci-conf-data'
memory_region_ops_write cpu 0 mr 0x2 addr 0xcf8 value 0x80000060 size 4 name 'pci-conf-idx'
memory_region_ops_write cpu 0 mr 0x3 addr 0xcfc value 0xb0000001 size 4 name 'pci-conf-data'
pci_cfg_write mch 00:00.0 @0x60 <- 0xb0000001
memory_region_ops_read cpu 1 mr 0x4 addr 0x608 value 0x1234 size 4 name 'acpi-tmr'
memory_region_ops_read cpu 1 mr 0x4 addr 0x608 value 0x1234 size 4 name 'acpi-tmr'
memory_region_ops_read cpu 1 mr 0x4 addr 0x608 value 0x1234 size 4 name 'acpi-tmr'
memory_region_ops_read cpu 1 mr 0x4 addr 0x608 value 0x1235 size 4 name 'acpi-tmr'
pci_cfg_read e1000 08:01.0 @0x14 -> 0xc001
memory_region_ops_read cpu 0 mr 0x5 addr 0xb0808014 value 0xc001 size 4 name 'pcie-mmcfg-mmio'
memory_region_ops_write cpu 0 mr 0x5 addr 0xb0808004 value 0x7 size 2 name 'pcie-mmcfg-mmio'
pci_cfg_write e1000 08:01.0 @0x4 <- 0x7
pci_update_mappings_add e1000 08:01.0 1,0xc000+0x40
pci_update_mappings_add e1000 08:01.0 0,0xfce40000+0x20000
memory_region_ops_write cpu 0 mr 0x5 addr 0xb0f00000 value 0x0 size 4 name 'pcie-mmcfg-mmio'
memory_region_ops_read cpu 0 mr 0x6 addr 0xc008 value 0xffffffffffffffff size 1 name 'e1000-io'
memory_region_ops_write cpu 0 mr 0x2 addr 0xcf8 value 0x0 size 4 name 'pci-conf-idx'

memory_region_ops_read cpu 0 mr 0x3 addr 0xcfc value 0xffffffff size 4 name 'pci-conf-data'
pci_update_mappings_del e1000 08:01.0 1,0xc000+0x40
";

fn import(log: &str, lenient: bool) -> Result<(Vec<u8>, ImportStats), ImportError> {
    import_reader(
        log.as_bytes(),
        Vec::new(),
        "snippet",
        &ImportOptions {
            lenient,
            progress: None,
        },
    )
}

/// A config annotation with the device name resolved.
type Cfg = Option<(ConfigPath, Sbdf, u16, Option<String>)>;

/// A function in segment 0 (the only one a QEMU trace knows).
fn function(bus: u8, device: u8, function: u8) -> Sbdf {
    Sbdf::new(0, bus, device, function).unwrap()
}

/// Records with names resolved, for readable assertions.
#[derive(Debug, PartialEq)]
enum R {
    A(Access, u64, String, Cfg),
    B(BarEvent, String),
}

fn read(bytes: &[u8]) -> Vec<R> {
    let mut r = TraceReader::new(bytes).unwrap();
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        match rec {
            Record::Access { access, repeat } => {
                let region = r.string(access.region.unwrap()).unwrap().to_string();
                let cfg = access.config.map(|c| {
                    let dev = c.device.map(|d| r.string(d).unwrap().to_string());
                    (c.path, c.sbdf, c.reg, dev)
                });
                out.push(R::A(access, repeat, region, cfg));
            }
            Record::Bar(e) => {
                let dev = r.string(e.device.unwrap()).unwrap().to_string();
                out.push(R::B(e, dev));
            }
        }
    }
    out
}

fn acc(vcpu: u16, space: Space, dir: Dir, addr: u64, size: u8, data: u64) -> Access {
    Access {
        vcpu,
        space,
        dir,
        addr,
        size,
        rep: 1,
        data,
        region: None,
        config: None,
    }
}

#[test]
fn snippet_every_field() {
    let (bytes, stats) = import(SNIPPET, false).unwrap();
    let recs = read(&bytes);
    use Dir::{Read, Write};
    use Space::{Mmio, Port};
    let cfg = |path, b, d, f, reg, dev: Option<&str>| {
        Some((path, function(b, d, f), reg, dev.map(String::from)))
    };
    // (access fields, repeat, region, config)
    let want: Vec<(Access, u64, &str, Cfg)> = vec![
        // line 1 (cpu -1) is not written
        (
            acc(0, Port, Write, 0xcf8, 4, 0x8000_0000),
            1,
            "pci-conf-idx",
            None,
        ),
        // pci_cfg_read precedes its ops read
        (
            acc(0, Port, Read, 0xcfc, 2, 0x8086),
            1,
            "pci-conf-data",
            cfg(ConfigPath::Cf8, 0, 0, 0, 0, Some("mch")),
        ),
        (
            acc(0, Port, Write, 0xcf8, 4, 0x8000_0860),
            1,
            "pci-conf-idx",
            None,
        ),
        // unanswered (no pci_cfg line), register from the latch + port, value masked to 2 bytes
        (
            acc(0, Port, Read, 0xcfe, 2, 0xffff),
            1,
            "pci-conf-data",
            cfg(ConfigPath::Cf8, 0, 1, 0, 0x62, None),
        ),
        (
            acc(0, Port, Write, 0xcf8, 4, 0x8000_0060),
            1,
            "pci-conf-idx",
            None,
        ),
        // pci_cfg_write follows its ops write
        (
            acc(0, Port, Write, 0xcfc, 4, 0xb000_0001),
            1,
            "pci-conf-data",
            cfg(ConfigPath::Cf8, 0, 0, 0, 0x60, Some("mch")),
        ),
        // three identical reads fold
        (acc(1, Port, Read, 0x608, 4, 0x1234), 3, "acpi-tmr", None),
        (acc(1, Port, Read, 0x608, 4, 0x1235), 1, "acpi-tmr", None),
        // ECAM through the window PCIEXBAR opened: bus 8 dev 1 fn 0 reg 0x14
        (
            acc(0, Mmio, Read, 0xb080_8014, 4, 0xc001),
            1,
            "pcie-mmcfg-mmio",
            cfg(ConfigPath::Ecam, 8, 1, 0, 0x14, Some("e1000")),
        ),
        (
            acc(0, Mmio, Write, 0xb080_8004, 2, 0x7),
            1,
            "pcie-mmcfg-mmio",
            cfg(ConfigPath::Ecam, 8, 1, 0, 0x4, Some("e1000")),
        ),
    ];
    let mut it = recs.iter();
    for (i, (a, repeat, region, c)) in want.into_iter().enumerate() {
        match it.next() {
            Some(R::A(got, n, reg, gc)) => {
                let mut got_plain = *got;
                got_plain.region = None;
                got_plain.config = None;
                assert_eq!(
                    (got_plain, *n, reg.as_str(), gc),
                    (a, repeat, region, &c),
                    "#{i}"
                );
            }
            other => panic!("#{i}: expected an access, got {other:?}"),
        }
    }
    // BAR events after the command write: BAR1 is I/O (its register read 0xc001), BAR0 was never
    // read and lies above 64 KiB: memory.
    let bar = |bar, space, base, size| BarEvent {
        kind: BarEventKind::Map,
        device: None,
        sbdf: function(8, 1, 0),
        bar,
        space,
        base,
        size,
    };
    for want in [
        bar(1, Port, 0xc000, 0x40),
        bar(0, Mmio, 0xfce4_0000, 0x2_0000),
    ] {
        match it.next() {
            Some(R::B(e, dev)) => {
                assert_eq!(BarEvent { device: None, ..*e }, want);
                assert_eq!(dev, "e1000");
            }
            other => panic!("expected a BAR event, got {other:?}"),
        }
    }
    let rest: Vec<_> = it.collect();
    assert_eq!(rest.len(), 5, "{rest:?}");
    // Unanswered ECAM write (no pci_cfg_write follows): bus 0xf.
    let R::A(a, 1, region, Some((ConfigPath::Ecam, bdf, 0, None))) = rest[0] else {
        panic!("{:?}", rest[0]);
    };
    assert_eq!(
        (a.dir, a.addr, *bdf, region.as_str()),
        (Write, 0xb0f0_0000, function(15, 0, 0), "pcie-mmcfg-mmio")
    );
    // Port in an I/O BAR, 64-bit all-ones logged for a 1-byte read: masked.
    let R::A(a, 1, region, None) = rest[1] else {
        panic!("{:?}", rest[1]);
    };
    assert_eq!(
        (a.space, a.addr, a.size, a.data, region.as_str()),
        (Port, 0xc008, 1, 0xff, "e1000-io")
    );
    // CF8 latch cleared: the data port access is not a config access.
    let R::A(a, 1, _, None) = rest[3] else {
        panic!("{:?}", rest[3]);
    };
    assert_eq!((a.addr, a.data), (0xcfc, 0xffff_ffff));
    let R::B(e, _) = rest[4] else {
        panic!("{:?}", rest[4]);
    };
    assert_eq!((e.kind, e.bar, e.space), (BarEventKind::Unmap, 1, Port));

    // Statistics.
    assert_eq!(stats.lines, 25);
    assert_eq!(stats.blank_lines, 1);
    assert_eq!(stats.internal_accesses, 1);
    assert_eq!(stats.accesses.total, 16);
    assert_eq!(
        (
            stats.accesses.port_read,
            stats.accesses.port_write,
            stats.accesses.mmio_read,
            stats.accesses.mmio_write
        ),
        (8, 5, 1, 2)
    );
    let c = &stats.config;
    assert_eq!(
        (c.cf8.reads, c.cf8.writes, c.cf8.answered, c.cf8.unanswered),
        (2, 1, 2, 1)
    );
    assert_eq!(
        (
            c.ecam.reads,
            c.ecam.writes,
            c.ecam.answered,
            c.ecam.unanswered
        ),
        (1, 2, 2, 1)
    );
    assert_eq!((c.cf8_latch_writes, c.cf8_disabled_data_accesses), (4, 1));
    assert_eq!(c.ecam_window, "0xb0000000+0x10000000");
    assert_eq!(c.functions_seen, 2);
    let m = &stats.mapping_events;
    assert_eq!((m.map, m.unmap), (2, 1));
    assert_eq!(
        (m.space_from_bar_register, m.space_inferred_from_address),
        (2, 1)
    );
    assert_eq!((m.after_config_write, m.other), (2, 1));
    assert_eq!(stats.wide_values_masked, 2);
    assert_eq!(stats.malformed_lines, 0);
    assert_eq!(stats.anomalies.total, 0, "{:?}", stats.anomalies);
    assert_eq!(stats.trace.access_records, 14);
    assert_eq!(stats.trace.accesses, 16);
    assert_eq!(stats.trace.bar_records, 3);
    assert_eq!(stats.vcpus.get(&1), Some(&4));
    let tmr = &stats.regions["acpi-tmr"];
    assert_eq!((tmr.space.as_str(), tmr.reads, tmr.writes), ("port", 4, 0));
    assert_eq!(stats.regions["apic-msi"].space, "internal");
    assert_eq!(stats.regions["apic-msi"].internal, 1);
    assert_eq!(
        stats.regions["e1000-io"].bar.as_deref(),
        Some("e1000 08:01.0 BAR1 (port)")
    );
    assert_eq!(stats.regions["pcie-mmcfg-mmio"].config, 3);
    // The human summary mentions the key numbers.
    let text = stats.to_string();
    assert!(text.contains("anomalies: none"), "{text}");
    assert!(text.contains("'e1000-io'"), "{text}");
    // The stats are stored in the trace's trailer too.
    let mut r = TraceReader::new(&bytes[..]).unwrap();
    let trailer = r.read_to_end().unwrap().unwrap();
    assert_eq!(trailer.info["accesses"]["total"], 16);
    assert_eq!(trailer.accesses, 16);
}

const BAD_LINE_3: &str = "\
memory_region_ops_write cpu 0 mr 0x2 addr 0xcf8 value 0x80000000 size 4 name 'pci-conf-idx'
memory_region_ops_read cpu 0 mr 0x3 addr 0x61 value 0x20 size 1 name 'pcspk'
memory_region_ops_read cpu 0 mr 0x3 addr 0x61 value 0x20 siz 1 name 'pcspk'
memory_region_ops_read cpu 0 mr 0x3 addr 0x61 value 0x30 size 1 name 'pcspk'
garbage here
";

#[test]
fn malformed_line_is_an_error_naming_it() {
    let e = import(BAD_LINE_3, false).unwrap_err();
    let ImportError::Malformed {
        line,
        message,
        text,
    } = &e
    else {
        panic!("{e}");
    };
    assert_eq!(*line, 3);
    assert_eq!(message, "expected 'size N' in memory_region_ops_read line");
    assert!(text.starts_with("memory_region_ops_read cpu 0 mr 0x3 addr 0x61 value 0x20 siz 1"));
    assert!(
        e.to_string()
            .starts_with("line 3: expected 'size N' in memory_region_ops_read line: memory_")
    );
    let long = format!("memory_region_ops_read cpu 0 {}\n", "x".repeat(1000));
    let e = import(&long, false).unwrap_err().to_string();
    assert!(e.len() < 400 && e.ends_with("..."), "{e}");
}

#[test]
fn lenient_mode_counts_and_skips() {
    let (bytes, stats) = import(BAD_LINE_3, true).unwrap();
    assert_eq!(stats.malformed_lines, 2);
    assert_eq!(stats.malformed_examples.len(), 2);
    assert!(stats.malformed_examples[0].starts_with("line 3: expected 'size N'"));
    assert!(stats.malformed_examples[1].starts_with("line 5: unknown trace event 'garbage'"));
    assert!(stats.to_string().contains("MALFORMED LINES SKIPPED: 2"));
    assert_eq!(stats.accesses.total, 3);
    assert_eq!(read(&bytes).len(), 3);
}

#[test]
fn anomalies_are_counted_and_described() {
    let log = "\
memory_region_ops_write cpu 0 mr 0x2 addr 0xcf8 value 0x80000000 size 4 name 'pci-conf-idx'
pci_cfg_read mch 00:00.0 @0x4 -> 0x8086
memory_region_ops_read cpu 0 mr 0x3 addr 0xcfc value 0x8086 size 2 name 'pci-conf-data'
pci_cfg_write mch 00:00.0 @0x4 <- 0x6
memory_region_ops_read cpu 0 mr 0x4 addr 0xfed00608 value 0x1 size 4 name 'acpi-tmr'
memory_region_ops_read cpu 0 mr 0x4 addr 0x608 value 0x1 size 4 name 'acpi-tmr'
pci_cfg_read mch 00:00.0 @0x0 -> 0x8086
memory_region_ops_read cpu 0 mr 0x4 addr 0x61 value 0x1 size 1 name 'pcspk'
";
    let (_, stats) = import(log, false).unwrap();
    let a = &stats.anomalies;
    assert_eq!(a.pci_cfg_mismatch, 1, "{a:?}");
    assert_eq!(a.orphan_pci_cfg_write, 1, "{a:?}");
    assert_eq!(a.orphan_pci_cfg_read, 1, "{a:?}");
    // known port region at an MMIO address, then the same name in both spaces
    assert_eq!(a.space_conflict, 2, "{a:?}");
    assert_eq!(a.total, 5);
    assert!(
        a.examples[0].starts_with("line 3: pci_cfg_read 00:00.0 @0x4"),
        "{a:?}"
    );
    assert_eq!(stats.regions["acpi-tmr"].space, "port+mmio");
    assert!(stats.to_string().contains("WARNING: 5 anomalies"));
}

/// PCIEXBAR with the reserved LENGTH 11b opens no window, in the importer as in the
/// multiplexer's intercept (one decoder, `chipset_intercept::q35::pciexbar_window`): the
/// ECAM access after it is outside any window, not decoded against a guessed 256 MiB one.
#[test]
fn reserved_pciexbar_length_opens_no_window_as_in_the_intercept() {
    let log = "\
memory_region_ops_write cpu 0 mr 0x2 addr 0xcf8 value 0x80000060 size 4 name 'pci-conf-idx'
memory_region_ops_write cpu 0 mr 0x3 addr 0xcfc value 0xb0000007 size 4 name 'pci-conf-data'
pci_cfg_write mch 00:00.0 @0x60 <- 0xb0000007
memory_region_ops_read cpu 0 mr 0x5 addr 0xb0808014 value 0xc001 size 4 name 'pcie-mmcfg-mmio'
";
    assert_eq!(
        chipset_intercept::q35::pciexbar_window(0xb000_0007, 0),
        Err(chipset_intercept::q35::PciexbarError::ReservedLength)
    );
    let (_, stats) = import(log, false).unwrap();
    let a = &stats.anomalies;
    assert_eq!(a.pciexbar_refused, 1, "{a:?}");
    assert!(
        a.examples[0].contains("PCIEXBAR 0xb0000007 opens no ECAM window: reserved LENGTH 11b"),
        "{a:?}"
    );
    assert_eq!(stats.config.ecam_window, "disabled");
    assert_eq!(a.ecam_outside_window, 1, "{a:?}");
    // The same value with LENGTH 00b opens the 256 MiB window the access decodes in.
    let ok = log.replace("0xb0000007", "0xb0000001");
    let (_, stats) = import(&ok, false).unwrap();
    assert_eq!(stats.anomalies.total, 0, "{:?}", stats.anomalies);
    assert_eq!(stats.config.ecam_window, "0xb0000000+0x10000000");
}

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "ioreq-mux-import-test-{}-{name}",
        std::process::id()
    ))
}

#[test]
fn files_plain_and_zstd() {
    let plain = temp("plain.log");
    let zst = temp("log.zst");
    let out1 = temp("1.trace.zst");
    let out2 = temp("2.trace.zst");
    std::fs::write(&plain, SNIPPET).unwrap();
    std::fs::write(&zst, zstd::encode_all(SNIPPET.as_bytes(), 3).unwrap()).unwrap();
    let opts = ImportOptions::default();
    let s1 = import_file(&plain, &out1, &opts).unwrap();
    let s2 = import_file(&zst, &out2, &opts).unwrap();
    assert!(!s1.compressed_input && s2.compressed_input);
    assert_eq!(s1.accesses.total, s2.accesses.total);
    assert_eq!(s1.log_bytes, SNIPPET.len() as u64);
    assert_eq!(
        s2.output_bytes,
        Some(std::fs::metadata(&out2).unwrap().len())
    );
    let (b1, b2) = (std::fs::read(&out1).unwrap(), std::fs::read(&out2).unwrap());
    assert_eq!(read(&b1), read(&b2));
    let r = TraceReader::open(&out2).unwrap();
    assert!(r.meta().source.contains("log.zst"));

    // A trace is not a log.
    let e = import_file(&out1, &temp("3.trace.zst"), &opts).unwrap_err();
    assert!(e.to_string().contains("already an ioreq-mux trace"), "{e}");
    // A failed import leaves neither the output nor its temporary file.
    let bad = temp("bad.log");
    std::fs::write(&bad, BAD_LINE_3).unwrap();
    let out4 = temp("4.trace.zst");
    let e = import_file(&bad, &out4, &opts).unwrap_err();
    assert!(e.to_string().starts_with("line 3:"), "{e}");
    assert!(!out4.exists());
    assert!(!temp("4.trace.zst.tmp").exists());
    let e = import_file(&temp("missing.log"), &out4, &opts).unwrap_err();
    assert!(e.to_string().starts_with("cannot open"), "{e}");

    // The clap arguments parse as documented.
    use clap::{Parser, Subcommand};
    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Cmd,
    }
    #[derive(Subcommand)]
    enum Cmd {
        ImportQemuTrace(ImportArgs),
    }
    let cli = Cli::try_parse_from([
        "ioreq-mux",
        "import-qemu-trace",
        "x.log.zst",
        "-o",
        "x.trace.zst",
        "--lenient",
    ])
    .unwrap();
    let Cmd::ImportQemuTrace(args) = cli.cmd;
    assert_eq!(args.input, PathBuf::from("x.log.zst"));
    assert_eq!(args.output, PathBuf::from("x.trace.zst"));
    assert!(args.lenient && !args.json);

    for p in [plain, zst, out1, out2, bad] {
        let _ = std::fs::remove_file(p);
    }
}
