//! Project-made traces: a scripted firmware runs against emulated device models while a
//! recorder writes every access and its answer to a trace; the trace is then replayed with
//! trace-backed servers. The script moves and disables PCIEXBAR, relocates PMBASE and
//! renumbers buses mid-run. A wrong topology must be caught.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use ioreq_mux_engine::EngineConfig;
use ioreq_mux_models::DeliveryLog;
use ioreq_mux_replay::replay;
use ioreq_mux_tests::{Guest, Path, Recorder, bdf, topology};
use ioreq_server::{Dir, Ioreq, IoreqType};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

const TOPOLOGY: &str = r#"
[engine.intercepts]
low_ram_top = 0x80000000

[[server]]
name = "chipset"
kind = "trace"
qemu_devices = ["*"]
ids = { "00:00.0" = 0x29c08086, "00:1f.0" = 0x29188086 }
owns.bdf = ["00:00.0", "00:1f.0", "00:02.0", "00:02.1"]
owns.position = [
    "00:02.0/00.0", "00:02.0/00.0/00.0", "00:02.0/00.0/01.0", "00:02.0/00.0/01.0/00.0",
    "00:02.1/00.0", "00:02.1/00.0/01.0",
]

[[server]]
name = "vgpu"
kind = "trace"
qemu_devices = ["vgpu"]
owns.position = ["00:02.0/00.0/00.0/00.0"]
"#;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ioreq-mux-proj-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// Runs the script and returns the trace it recorded.
fn record(name: &str) -> PathBuf {
    let log: DeliveryLog = Arc::new(Mutex::new(vec![]));
    let cfg = EngineConfig {
        intercepts: chipset_intercept::InterceptConfig {
            low_ram_top: Some(0x8000_0000),
            ..Default::default()
        },
        chipset: None,
        ..Default::default()
    };
    let path = tmp(name);
    let mut r = Recorder::new(Guest::new(topology(&log), &cfg), log, &path);
    let number = |r: &mut Recorder, p: Path, s: &str, pri: u8, sec: u8, sub: u8| {
        r.cfg_read(p, bdf(s), 0x0a, 2);
        r.cfg_write(
            p,
            bdf(s),
            0x18,
            4,
            u64::from(pri) | u64::from(sec) << 8 | u64::from(sub) << 16,
        );
    };
    // PCIEXBAR as both firmwares do, then PMBASE/ACPI_CNTL through ECAM.
    r.cfg_read(Path::Cf8, bdf("00:00.0"), 0, 4);
    r.cfg_write(Path::Cf8, bdf("00:00.0"), 0x60, 4, 0);
    r.cfg_write(Path::Cf8, bdf("00:00.0"), 0x64, 4, 0);
    r.cfg_write(Path::Cf8, bdf("00:00.0"), 0x60, 4, 0xb000_0001);
    r.cfg_write(Path::Ecam, bdf("00:1f.0"), 0x40, 4, 0x601);
    r.cfg_write(Path::Ecam, bdf("00:1f.0"), 0x44, 1, 0x80);
    for _ in 0..3 {
        r.access(Ioreq::new(IoreqType::Pio, Dir::Read, 0x608, 4, 0));
    }
    // Enumerate and number.
    for dev in 0..32 {
        r.cfg_read(
            Path::Ecam,
            ioreq_mux_tests::bdf(&format!("00:{dev:02x}.0")),
            0,
            4,
        );
    }
    number(&mut r, Path::Ecam, "00:02.0", 0, 1, 4);
    number(&mut r, Path::Ecam, "01:00.0", 1, 2, 4);
    number(&mut r, Path::Cf8, "02:00.0", 2, 3, 3);
    number(&mut r, Path::Ecam, "02:01.0", 2, 4, 4);
    number(&mut r, Path::Ecam, "00:02.1", 0, 5, 6);
    number(&mut r, Path::Ecam, "05:00.0", 5, 6, 6);
    for s in ["03:00.0", "04:00.0", "06:01.0", "06:00.0", "07:00.0"] {
        r.cfg_read(Path::Ecam, bdf(s), 0, 4);
        r.cfg_read(Path::Cf8, bdf(s), 0x08, 4);
    }
    r.cfg_read(Path::Ecam, bdf("03:00.0"), 0x100, 4);
    // The vgpu BAR: sized, placed, enabled, used.
    r.cfg_write(Path::Ecam, bdf("03:00.0"), 0x10, 4, 0xffff_ffff);
    r.cfg_read(Path::Ecam, bdf("03:00.0"), 0x10, 4);
    r.cfg_write(Path::Ecam, bdf("03:00.0"), 0x10, 4, 0xc000_0000);
    r.cfg_write(Path::Ecam, bdf("03:00.0"), 0x14, 4, 0);
    r.cfg_write(Path::Ecam, bdf("03:00.0"), 0x04, 2, 2);
    r.access(Ioreq::new(
        IoreqType::Copy,
        Dir::Write,
        0xc000_0010,
        4,
        0x1234_5678,
    ));
    r.access(Ioreq::new(IoreqType::Copy, Dir::Read, 0xc000_0010, 4, 0));
    // Relocate PMBASE mid-run; the timer follows.
    r.cfg_write(Path::Ecam, bdf("00:1f.0"), 0x40, 4, 0xb001);
    r.access(Ioreq::new(IoreqType::Pio, Dir::Read, 0x608, 4, 0));
    r.access(Ioreq::new(IoreqType::Pio, Dir::Read, 0xb008, 4, 0));
    // Move PCIEXBAR (64 MiB at 0xe0000000), renumber the first downstream port, disable ECAM.
    r.cfg_write(Path::Cf8, bdf("00:00.0"), 0x60, 4, 0xe000_0005);
    r.cfg_read(Path::Ecam, bdf("03:00.0"), 0, 4);
    r.cfg_write(Path::Ecam, bdf("02:00.0"), 0x19, 1, 7);
    r.cfg_write(Path::Ecam, bdf("02:00.0"), 0x1a, 1, 7);
    for s in ["01:00.0", "00:02.0"] {
        r.cfg_write(Path::Ecam, bdf(s), 0x1a, 1, 7);
    }
    r.cfg_read(Path::Ecam, bdf("07:00.0"), 0, 4);
    r.cfg_read(Path::Cf8, bdf("07:00.0"), 0, 4);
    r.cfg_read(Path::Ecam, bdf("03:00.0"), 0, 4);
    r.cfg_write(Path::Cf8, bdf("00:00.0"), 0x60, 4, 0xe000_0004);
    r.access(Ioreq::new(IoreqType::Copy, Dir::Read, 0xe000_0000, 4, 0));
    r.cfg_read(Path::Cf8, bdf("07:00.0"), 0, 4);
    let g = r.finish();
    assert!(g.hv.check().is_ok());
    path
}

fn write_topology(name: &str, text: &str) -> PathBuf {
    let p = tmp(name);
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn recorded_script_replays_without_divergence() {
    let trace = record("script.trace.zst");
    let topo = write_topology("script.toml", TOPOLOGY);
    let r = replay(&trace, &topo, 20, None).unwrap();
    assert_eq!(r.divergences, 0, "{:#?}", r.first_divergences);
    assert!(r.per_server["vgpu"] >= 8, "{:?}", r.per_server);
    let ev = r
        .layout_events
        .iter()
        .map(|e| e.description.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    for want in [
        "ECAM window none -> segment 0000 buses 00-ff at 0xb0000000",
        "PM block of 0000:00:1f.0: none -> ports 0x600-0x67f",
        "PM block of 0000:00:1f.0: ports 0x600-0x67f -> ports 0xb000-0xb07f",
        "-> segment 0000 buses 00-3f at 0xe0000000-0xe3ffffff (64 MiB)",
        "(64 MiB) -> none",
    ] {
        assert!(ev.contains(want), "missing '{want}' in:\n{ev}");
    }
}

#[test]
fn a_wrong_topology_is_caught() {
    let trace = record("script2.trace.zst");
    // The vgpu's function given to the chipset server instead.
    let wrong = TOPOLOGY
        .replace(
            "\"00:02.0/00.0/01.0/00.0\",",
            "\"00:02.0/00.0/01.0/00.0\", \"00:02.0/00.0/00.0/00.0\",",
        )
        .replace(
            "owns.position = [\"00:02.0/00.0/00.0/00.0\"]",
            "owns.position = []",
        );
    let topo = write_topology("wrong.toml", &wrong);
    let r = replay(&trace, &topo, 5, None).unwrap();
    assert!(r.divergences >= 8, "{}", r.divergences);
    let d = &r.first_divergences[0];
    assert!(
        d.what.contains("answered by chipset, expected vgpu"),
        "{d:?}"
    );
}

#[test]
fn a_damaged_trace_is_a_clear_error() {
    let trace = record("script3.trace.zst");
    let mut bytes = std::fs::read(&trace).unwrap();
    let cut = bytes.len() - 40;
    bytes.truncate(cut);
    let damaged = tmp("damaged.trace.zst");
    std::fs::write(&damaged, &bytes).unwrap();
    let topo = write_topology("script3.toml", TOPOLOGY);
    let e = replay(&damaged, &topo, 5, None).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("damaged.trace.zst"), "{msg}");
    let not_a_trace = tmp("not-a-trace");
    std::fs::write(&not_a_trace, b"memory_region_ops_read cpu 0\n").unwrap();
    let e = replay(&not_a_trace, &topo, 5, None).unwrap_err();
    assert!(e.to_string().contains("not-a-trace"), "{e}");
}
