//! `ioreq-mux inspect` as a connectivity view, checked against the machine the bundled traces
//! were recorded on: after replaying each trace, `inspect --json` must list the functions,
//! bridge bus numbers and windows and BARs (address and size) QEMU's own `info pci` printed at
//! the end of the run (traces/q35/*.info.txt). Also: an emulated model's BARs are sized
//! without disturbing its claims, a range of functions never spans two buses, every JSON key
//! is snake_case.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::{bin, repo};
use ioreq_mux::engine::{Engine, EngineConfig};
use ioreq_mux::inspect::{BarKind, Inspection, LinkKind, PortType, inspect};
use ioreq_mux::models::{BarKind as SpecBar, EmulatedModel, FunctionKind, FunctionSpec, Placement};
use ioreq_server::abi::pack_sbdf;
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::sim::{SimBackend, SimHypervisor};
use ioreq_server::{DeviceModel, Dir, Ioreq, Position};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

/// Runs the binary; its standard output, or a failure with its standard error.
fn run(args: &[&str]) -> String {
    let out = bin().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ioreq-mux {args:?}: {err}");
    String::from_utf8(out.stdout).unwrap()
}

/// `traces/q35/<name>.log.zst` imported with `ioreq-mux import-qemu-trace`, once.
fn trace(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    static SEABIOS: OnceLock<PathBuf> = OnceLock::new();
    static OVMF: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("ioreq-mux-inspect-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    });
    let cell = if name == "seabios" { &SEABIOS } else { &OVMF };
    cell.get_or_init(|| {
        let out = dir.join(format!("{name}.trace.zst"));
        let log = repo(&format!("traces/q35/{name}.log.zst"));
        run(&[
            "import-qemu-trace",
            log.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        out
    })
    .clone()
}

fn inspect_cli(name: &str, json: bool) -> String {
    let topology = repo("configs/qemu-q35-trace.toml");
    let t = trace(name);
    let mut args = vec![
        "inspect",
        "--topology",
        topology.to_str().unwrap(),
        "--trace",
        t.to_str().unwrap(),
    ];
    if json {
        args.push("--json");
    }
    run(&args)
}

// ---- QEMU's `info pci` ----

/// A BAR as `info pci` prints it: `None` address = not mapped.
#[derive(Debug, Clone, PartialEq, Eq)]
struct QemuBar {
    io: bool,
    address: Option<u64>,
    size: u64,
}

/// One function of `info pci`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct QemuFunction {
    ids: (u16, u16),
    secondary: Option<u8>,
    subordinate: Option<u8>,
    /// "IO", "memory", "prefetchable memory" -> [base, limit].
    windows: BTreeMap<String, (u64, u64)>,
    bars: BTreeMap<u8, QemuBar>,
}

fn hex(s: &str) -> u64 {
    let s = s.trim().trim_end_matches(['.', ']', ',']);
    u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap_or_else(|e| panic!("{s}: {e}"))
}

/// `Bus  0, device   2, function 0:` -> (bus, device, function), decimal as QEMU prints them.
fn function_header(line: &str) -> Option<(u8, u8, u8)> {
    let rest = line.strip_prefix("Bus ")?.strip_suffix(':')?;
    let mut nums = rest.split(',').map(|p| {
        p.split_whitespace()
            .last()
            .and_then(|n| n.parse::<u8>().ok())
    });
    Some((nums.next()??, nums.next()??, nums.next()??))
}

/// `BAR4: 64 bit prefetchable memory at 0xfe000000 [0xfe003fff].` -> (4, bar). QEMU prints
/// `addr + size - 1` as the end, also for an unmapped BAR (address all ones), so the size is
/// `end - address + 1` in wrapping arithmetic either way.
fn bar_line(line: &str) -> Option<(u8, QemuBar)> {
    let rest = line.strip_prefix("BAR")?;
    let (index, rest) = rest.split_once(':')?;
    let (kind, at) = rest.split_once(" at ")?;
    let (addr, end) = at.split_once(" [")?;
    let (addr, end) = (hex(addr), hex(end));
    let bar = QemuBar {
        io: kind.contains("I/O"),
        address: (addr != u64::MAX).then_some(addr),
        size: end.wrapping_sub(addr).wrapping_add(1),
    };
    Some((index.parse().ok()?, bar))
}

/// `memory range [0xfda00000, 0xfdbfffff]` -> ("memory", base, limit).
fn window_line(line: &str) -> Option<(String, u64, u64)> {
    let (name, range) = line.split_once(" range [")?;
    let (base, limit) = range.split_once(',')?;
    Some((name.to_string(), hex(base), hex(limit)))
}

/// The `info pci` section of an info.txt: from the `=== info pci` line to the next `===`
/// line. The monitor echoed the command with terminal escapes and carriage returns; lines that
/// match nothing below (that echo, `id "..."`, `IRQ ...`, the prompt) are skipped.
fn parse_info_pci(text: &str) -> BTreeMap<(u8, u8, u8), QemuFunction> {
    let mut out = BTreeMap::new();
    let mut current: Option<(u8, u8, u8)> = None;
    let section = text
        .lines()
        .skip_while(|l| !l.starts_with("=== info pci"))
        .skip(1)
        .take_while(|l| !l.starts_with("=== "));
    for raw in section {
        let line = raw.trim_matches(|c: char| c.is_whitespace() || c == '\r');
        if let Some(at) = function_header(line) {
            current = Some(at);
            out.insert(at, QemuFunction::default());
            continue;
        }
        let Some(f) = current.and_then(|at| out.get_mut(&at)) else {
            continue;
        };
        if let Some((_, ids)) = line.split_once("PCI device ") {
            let (v, d) = ids.split_once(':').unwrap();
            f.ids = (hex(v) as u16, hex(d) as u16);
        } else if let Some(n) = line.strip_prefix("secondary bus ") {
            f.secondary = Some(n.trim_end_matches('.').parse().unwrap());
        } else if let Some(n) = line.strip_prefix("subordinate bus ") {
            f.subordinate = Some(n.trim_end_matches('.').parse().unwrap());
        } else if let Some((i, b)) = bar_line(line) {
            f.bars.insert(i, b);
        } else if let Some((name, base, limit)) = window_line(line) {
            f.windows.insert(name, (base, limit));
        }
    }
    out
}

#[test]
fn the_info_pci_parser_reads_the_recorded_files() {
    let text = std::fs::read_to_string(repo("traces/q35/seabios.info.txt")).unwrap();
    let qemu = parse_info_pci(&text);
    assert_eq!(qemu.len(), 21, "the machine has 21 functions");
    let nic = &qemu[&(1, 0, 0)];
    assert_eq!(nic.ids, (0x8086, 0x10d3));
    assert_eq!(
        nic.bars[&2],
        QemuBar {
            io: true,
            address: Some(0xd000),
            size: 0x20
        }
    );
    assert_eq!(
        nic.bars[&6],
        QemuBar {
            io: false,
            address: None,
            size: 0x40000
        }
    );
    let rp3 = &qemu[&(0, 2, 2)];
    assert_eq!((rp3.secondary, rp3.subordinate), (Some(3), Some(6)));
    assert_eq!(rp3.windows["IO"], (0xe000, 0xdfff));
}

// ---- the comparison ----

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Our functions by (bus, device, function).
fn ours(j: &Value) -> BTreeMap<(u8, u8, u8), &Value> {
    j["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let at = (
                u(&f["bus"]) as u8,
                u(&f["device"]) as u8,
                u(&f["function"]) as u8,
            );
            (at, f)
        })
        .collect()
}

fn check_bridge(at: (u8, u8, u8), q: &QemuFunction, f: &Value) {
    let b = &f["bridge"];
    if q.secondary.is_none() {
        assert!(b.is_null(), "{at:?}: QEMU shows no bridge, we do");
        return;
    }
    assert_eq!(
        Some(u(&b["secondary_bus"]) as u8),
        q.secondary,
        "{at:?} secondary"
    );
    assert_eq!(
        Some(u(&b["subordinate_bus"]) as u8),
        q.subordinate,
        "{at:?} subordinate"
    );
    for (name, key) in [
        ("IO", "io_window"),
        ("memory", "memory_window"),
        ("prefetchable memory", "prefetchable_window"),
    ] {
        let w = &b[key];
        let got = (u(&w["base"]), u(&w["limit"]));
        assert_eq!(Some(&got), q.windows.get(name), "{at:?} {name} window");
    }
}

fn check_bars(at: (u8, u8, u8), q: &QemuFunction, f: &Value) {
    let bars: BTreeMap<u8, &Value> = f["bars"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (u(&b["index"]) as u8, b))
        .collect();
    let indices: Vec<u8> = bars.keys().copied().collect();
    let expected: Vec<u8> = q.bars.keys().copied().collect();
    assert_eq!(indices, expected, "{at:?}: BARs");
    for (i, qb) in &q.bars {
        let b = bars[i];
        assert_eq!(u(&b["size"]), qb.size, "{at:?} BAR{i} size");
        assert_eq!(b["kind"] == "io", qb.io, "{at:?} BAR{i} kind {}", b["kind"]);
        let decoding = b["decoding"].as_bool().unwrap();
        match qb.address {
            Some(a) => {
                assert!(
                    decoding,
                    "{at:?} BAR{i}: QEMU maps it at {a:#x}, we say not decoding"
                );
                assert_eq!(u(&b["address"]), a, "{at:?} BAR{i} address");
                assert!(!b["owner"].is_null(), "{at:?} BAR{i}: decoding but unowned");
            }
            None => assert!(!decoding, "{at:?} BAR{i}: QEMU has it unmapped, we decode"),
        }
    }
}

/// Every function, bridge bus number and window, and BAR of `info pci` agrees with `inspect
/// --json` after the replay, and nothing is listed that QEMU does not have.
fn compare_with_info_pci(name: &str) {
    let j: Value = serde_json::from_str(&inspect_cli(name, true)).unwrap();
    assert_eq!(j["schema"], "ioreq-mux.inspect/2");
    let text = std::fs::read_to_string(repo(&format!("traces/q35/{name}.info.txt"))).unwrap();
    let qemu = parse_info_pci(&text);
    let mine = ours(&j);
    let (qk, mk): (Vec<_>, Vec<_>) = (qemu.keys().collect(), mine.keys().collect());
    assert_eq!(mk, qk, "{name}: functions");
    for (at, q) in &qemu {
        let f = mine[at];
        let ids = (u(&f["vendor_id"]) as u16, u(&f["device_id"]) as u16);
        assert_eq!(ids, q.ids, "{name} {at:?} IDs");
        assert!(!f["owner"].is_null(), "{name} {at:?}: no owner");
        check_bridge(*at, q, f);
        check_bars(*at, q, f);
    }
}

#[test]
fn seabios_layout_matches_info_pci() {
    compare_with_info_pci("seabios");
}

#[test]
fn ovmf_layout_matches_info_pci() {
    compare_with_info_pci("ovmf");
}

/// The question `inspect` answers: where can a new function go, and at which BDF.
#[test]
fn seabios_connect_points() {
    let j: Value = serde_json::from_str(&inspect_cli("seabios", true)).unwrap();
    let points = j["connect"].as_array().unwrap();
    let behind_bridge = points.iter().find(|p| p["port"] == "0000:07:00.0").unwrap();
    assert_eq!(behind_bridge["bdf"], "0000:08:00.0");
    assert_eq!(behind_bridge["position"], "0000:00:02.3/00.0/00.0");
    assert_eq!(behind_bridge["port_type"], "pcie_to_pci_bridge");
    assert_eq!(behind_bridge["hotplug"]["capable"], true);
    assert_eq!(behind_bridge["hotplug"]["reason"], "conventional_bus");
    assert!(behind_bridge["claimed_by"].is_null());
    let root = points.iter().find(|p| p["port"].is_null()).unwrap();
    assert_eq!(root["bdf"], "0000:00:01.0");
    assert_eq!(root["claimed_by"], "qemu", "qemu claims 00:00.0-00:1f.7");
    // Every PCIe link is taken: no connection point below a root or downstream port.
    assert!(points.iter().all(|p| p["link"] != "pcie_link"));
    let buses = j["buses"].as_array().unwrap();
    let root_bus = &buses[0];
    assert_eq!(root_bus["free_buses"][0]["first"], 0x0a);
    assert_eq!(root_bus["free_buses"][0]["last"], 0xff);
}

/// (bus, port, hot-plug capable) of every bus below a root or downstream port.
fn pcie_slots(j: &Value) -> Vec<(u64, String, Value, String)> {
    j["buses"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["link"] == "pcie_link")
        .map(|b| {
            let h = &b["hotplug"];
            let port = b["port"].as_str().unwrap().to_string();
            let reason = h["reason"].as_str().unwrap().to_string();
            (u(&b["bus"]), port, h["capable"].clone(), reason)
        })
        .collect()
}

/// Before: after SeaBIOS, every slot said "hot-plug no (PCIe slot not Hot-Plug Capable)":
/// SeaBIOS never reads Slot Capabilities, so the trace server answered 0 for bytes nobody
/// saw. Now: unknown (JSON null, `pcie_slot_not_recorded`). OVMF reads them: yes, as QEMU's
/// ports are.
#[test]
fn hotplug_of_a_slot_the_trace_never_showed_is_unknown() {
    let seabios: Value = serde_json::from_str(&inspect_cli("seabios", true)).unwrap();
    let slots = pcie_slots(&seabios);
    let ports: Vec<&str> = slots.iter().map(|s| s.1.as_str()).collect();
    assert_eq!(
        ports,
        [
            "0000:00:02.0",
            "0000:00:02.1",
            "0000:00:02.2",
            "0000:04:00.0",
            "0000:04:01.0",
            "0000:00:02.3",
            "0000:00:02.4"
        ]
    );
    for (bus, port, capable, reason) in &slots {
        assert!(capable.is_null(), "bus {bus:#x} below {port}: {capable}");
        assert_eq!(reason, "pcie_slot_not_recorded", "bus {bus:#x}");
    }
    let ovmf: Value = serde_json::from_str(&inspect_cli("ovmf", true)).unwrap();
    let slots = pcie_slots(&ovmf);
    assert_eq!(slots.len(), 7);
    for (bus, port, capable, reason) in &slots {
        assert_eq!(*capable, Value::Bool(true), "bus {bus:#x} below {port}");
        assert_eq!(reason, "pcie_slot", "bus {bus:#x}");
    }
    let text = inspect_cli("seabios", false);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("bus 0000:01 "))
        .unwrap();
    assert!(
        line.ends_with("hot-plug unknown (PCIe slot, Slot Capabilities not recorded by the trace)"),
        "{line}"
    );
}

/// Before: no count at all, and nothing said how the replay behind the layout went. Counts
/// are written as every command writes them (`13,768,544`).
#[test]
fn text_counts_have_thousands_separators() {
    let text = inspect_cli("seabios", false);
    let mut lines = text.lines();
    let first = lines.next().unwrap();
    assert!(first.starts_with("after replaying "), "{first}");
    assert!(
        first.ends_with("seabios.trace.zst: 13,768,544 accesses, 0 divergences"),
        "{first}"
    );
    assert!(
        text.contains("\nPCI tree: 21 functions on 10 buses (each function read through"),
        "{text}"
    );
    assert!(text.contains("\nconnect: 2 points (where"), "{text}");
    let j: Value = serde_json::from_str(&inspect_cli("ovmf", true)).unwrap();
    assert_eq!(j["replay"]["accesses"], 3_568_127);
    assert_eq!(j["replay"]["divergences"], 0);
}

/// What a bridge of the recorded machine is, from its IDs (QEMU's models): does its
/// secondary bus take one device (a PCIe link), none (a switch's internal bus) or 32?
fn devices_below(ids: (u16, u16)) -> u8 {
    match ids {
        // pcie-root-port, ioh3420 (root ports), xio3130-downstream: a PCIe link.
        (0x1b36, 0x000c) | (0x8086, 0x3420) | (0x104c, 0x8233) => 1,
        // x3130-upstream: the switch's internal bus, its downstream ports only.
        (0x104c, 0x8232) => 0,
        // pcie-pci-bridge: a conventional bus.
        (0x1b36, 0x000e) => 32,
        other => panic!("a bridge the test does not know: {other:x?}"),
    }
}

/// Every bus of QEMU's `info pci` where a function could still be connected: the root bus
/// and each bridge's secondary bus, with the first device number free there.
fn free_slots_in_info_pci(name: &str) -> Vec<(u8, u8)> {
    let text = std::fs::read_to_string(repo(&format!("traces/q35/{name}.info.txt"))).unwrap();
    let qemu = parse_info_pci(&text);
    let mut buses: Vec<(u8, u8)> = vec![(0, 32)];
    for q in qemu.values() {
        if let Some(sec) = q.secondary {
            buses.push((sec, devices_below(q.ids)));
        }
    }
    buses.sort_unstable();
    buses
        .into_iter()
        .filter_map(|(bus, possible)| {
            let used = |d: &u8| qemu.keys().any(|&(b, dev, _)| b == bus && dev == *d);
            let free = (0..possible).find(|d| !used(d))?;
            Some((bus, free))
        })
        .collect()
}

/// Before: only checked in part. The connect list names every bus where a function can
/// still go (the root bus and each bridge's secondary bus with a free device number, as
/// QEMU's own `info pci` shows the machine), with the BDF and position it gets.
#[test]
fn connect_lists_every_bus_with_a_free_device_number() {
    for name in ["seabios", "ovmf"] {
        let j: Value = serde_json::from_str(&inspect_cli(name, true)).unwrap();
        let points = j["connect"].as_array().unwrap();
        let ours: Vec<(u8, u8)> = points
            .iter()
            .map(|p| {
                let bdf = p["bdf"].as_str().unwrap();
                (u(&p["bus"]) as u8, hex(&bdf[8..10]) as u8)
            })
            .collect();
        assert_eq!(ours, free_slots_in_info_pci(name), "{name}");
        let rows: Vec<(&str, &str, &Value, &Value)> = points
            .iter()
            .map(|p| {
                (
                    p["bdf"].as_str().unwrap(),
                    p["position"].as_str().unwrap(),
                    &p["hotplug"]["capable"],
                    &p["claimed_by"],
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (
                    "0000:00:01.0",
                    "0000:00:01.0",
                    &Value::Bool(false),
                    &Value::from("qemu")
                ),
                (
                    "0000:08:00.0",
                    "0000:00:02.3/00.0/00.0",
                    &Value::Bool(true),
                    &Value::Null
                ),
            ],
            "{name}"
        );
    }
}

fn keys_are_snake_case(v: &Value, at: &str) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                let ok = k.starts_with(|c: char| c.is_ascii_lowercase())
                    && k.chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
                assert!(ok, "key {at}.{k} is not snake_case");
                keys_are_snake_case(v, &format!("{at}.{k}"));
            }
        }
        Value::Array(a) => a.iter().for_each(|v| keys_are_snake_case(v, at)),
        _ => {}
    }
}

#[test]
fn json_keys_are_snake_case_and_the_schema_is_named() {
    let j: Value = serde_json::from_str(&inspect_cli("ovmf", true)).unwrap();
    keys_are_snake_case(&j, "");
    for key in [
        "schema",
        "chipset",
        "ecam_windows",
        "buses",
        "functions",
        "connect",
        "claims",
        "intercepts",
        "mmio_hole",
    ] {
        assert!(j.get(key).is_some(), "missing {key}");
    }
}

/// The issue's example: `0000:00:08.0-0000:01:00.0 qemu` was printed as one range. After
/// SeaBIOS, qemu owns 00:00.0-00:1f.7 by BDF and 01:00.0 by position, which were merged.
#[test]
fn a_range_of_functions_is_never_merged_across_buses() {
    let text = inspect_cli("seabios", false);
    let section: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "functions claimed by BDF:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect();
    assert!(
        section.contains(&"  0000:00:00.0-0000:00:1f.7 qemu"),
        "{section:?}"
    );
    assert!(section.contains(&"  0000:01:00.0 qemu"), "{section:?}");
    for line in &section {
        let range = line.split_whitespace().next().unwrap();
        if let Some((a, b)) = range.split_once('-') {
            assert_eq!(a[..7], b[..7], "{line}: a range across buses");
        }
    }
}

// ---- an emulated model ----

fn cfg(e: &mut Engine<SimBackend>, bdf: (u8, u8, u8), reg: u32, size: u32, data: u64) {
    let sbdf = pack_sbdf(0, bdf.0, bdf.1, bdf.2);
    e.handle(0, &Ioreq::pci_config(sbdf, reg, Dir::Write, size, data));
}

/// A root port with an endpoint behind it (claimed by position), both from the built-in
/// emulated model, programmed the way firmware would.
fn emulated() -> Engine<SimBackend> {
    let hv = SimHypervisor::new(1, Duration::from_secs(5));
    let backend = hv.create_server(BufioreqMode::Atomic).unwrap();
    let ep = FunctionSpec::endpoint(0x1af4, 0x1337, 0xff0000)
        .with_bar(SpecBar::Mem32, 0x1000)
        .with_bar(SpecBar::Io, 0x20)
        .with_bar(SpecBar::Mem64, 0x4000);
    let behind = Position {
        segment: 0,
        root_bus: 0,
        path: vec![1 << 3, 0],
    };
    let model = EmulatedModel::new("emu")
        .with_function(
            Placement::Bdf(pack_sbdf(0, 0, 1, 0)),
            &FunctionSpec::bridge(0x1b36, 0x000c, FunctionKind::RootPort),
        )
        .with_function(Placement::Position(behind), &ep);
    let models: Vec<Box<dyn DeviceModel>> = vec![Box::new(model)];
    let mut e = Engine::new(backend, models, &EngineConfig::default()).unwrap();
    let rp = (0, 1, 0);
    // Firmware reads the header type first: the router follows the bridge from then on.
    e.handle(
        0,
        &Ioreq::pci_config(pack_sbdf(0, 0, 1, 0), 0x0e, Dir::Read, 1, 0),
    );
    cfg(&mut e, rp, 0x18, 4, 0x0002_0100); // primary 0, secondary 1, subordinate 2
    cfg(&mut e, rp, 0x20, 4, 0xfe10_fe00); // memory window 0xfe000000-0xfe1fffff
    cfg(&mut e, rp, 0x04, 2, 0x3);
    let ep_at = (1, 0, 0);
    cfg(&mut e, ep_at, 0x10, 4, 0xfe00_0000);
    cfg(&mut e, ep_at, 0x14, 4, 0xc000);
    cfg(&mut e, ep_at, 0x18, 4, 0xfe10_0000);
    cfg(&mut e, ep_at, 0x1c, 4, 0);
    cfg(&mut e, ep_at, 0x04, 2, 0x3);
    e
}

/// index, kind, address, size, decoding, owner
type BarRow<'a> = (u8, BarKind, u64, u64, bool, Option<&'a str>);

#[test]
fn an_emulated_models_bars_are_sized_without_disturbing_its_claims() {
    let mut e = emulated();
    let before = (e.router().mmio_ranges(), e.router().port_ranges());
    let v: Inspection = inspect(&mut e, None, "test".into(), None);
    assert_eq!(
        (e.router().mmio_ranges(), e.router().port_ranges()),
        before,
        "inspect left the claims as they were"
    );
    let ep = v
        .functions
        .iter()
        .find(|f| f.bdf == "0000:01:00.0")
        .unwrap();
    assert_eq!(ep.parent.as_deref(), Some("0000:00:01.0"));
    let got: Vec<BarRow<'_>> = ep
        .bars
        .iter()
        .map(|b| {
            (
                b.index,
                b.kind,
                b.address,
                b.size,
                b.decoding,
                b.owner.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (0, BarKind::Mem32, 0xfe00_0000, 0x1000, true, Some("emu")),
            (1, BarKind::Io, 0xc000, 0x20, true, Some("emu")),
            (2, BarKind::Mem64, 0xfe10_0000, 0x4000, true, Some("emu")),
        ]
    );
    let rp = v
        .functions
        .iter()
        .find(|f| f.bdf == "0000:00:01.0")
        .unwrap();
    let b = rp.bridge.as_ref().unwrap();
    assert_eq!((b.secondary_bus, b.subordinate_bus), (1, 2));
    assert_eq!(
        (b.memory_window.base, b.memory_window.limit),
        (0xfe00_0000, 0xfe1f_ffff)
    );
    let bus1 = v.buses.iter().find(|b| b.bus == 1).unwrap();
    assert_eq!(bus1.port_type, PortType::RootPort);
    assert_eq!(bus1.link, LinkKind::PcieLink);
    assert!(bus1.free_devices.is_empty());
    assert_eq!(
        bus1.free_buses.len(),
        1,
        "bus 02 is free below the root port"
    );
    // The built-in root port implements no slot: not hot-plug capable.
    assert_eq!(bus1.hotplug.capable, Some(false));
}

/// A topology with a hosted root port and a model below it: `inspect` lists the port with
/// its link and an occupied slot (text and JSON), and the port's function is the ports'.
#[test]
fn hosted_ports_are_shown_with_link_and_slot() {
    let topo = common::scratch("inspect-ports", "ports.toml");
    std::fs::write(
        &topo,
        r#"
[[port]]
name = "slot7"
at = "00:07.0"
kind = "root-port"
vendor = 0x1b36
device = 0x000c
link = { speed = "8GT/s", width = "x8" }
slot = { number = 7 }

[[server]]
name = "vgpu"
kind = "emulated"
[server.function."00:07.0/00.0"]
vendor = 0x1af4
device = 0x1337
class = 0xff0000
"#,
    )
    .unwrap();
    let out = bin()
        .args(["inspect", "--json", "--topology"])
        .arg(&topo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let p = &v["hosted_ports"][0];
    assert_eq!(p["name"], "slot7");
    assert_eq!(p["kind"], "root-port");
    assert_eq!(p["link"]["speed"], "8GT/s");
    assert_eq!(p["link"]["width"], "x8");
    assert_eq!(p["slot"]["present"], true, "vgpu's function is below it");
    assert_eq!(p["slot_number"], 7);
    let port_fn = v["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["bdf"] == "0000:00:07.0")
        .unwrap();
    assert_eq!(port_fn["owner"], "ioreq-mux ports");
    let text = bin()
        .args(["inspect", "--topology"])
        .arg(&topo)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains(
            "slot7 at 0000:00:07.0 (0000:00:07.0): root-port, buses not numbered, link 8GT/s x8 up"
        ),
        "{text}"
    );
    assert!(text.contains("slot 7: occupied"), "{text}");
}
