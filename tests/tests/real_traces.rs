//! The bundled real traces (QEMU 7.2 Q35, SeaBIOS and OVMF): imported from QEMU's log and
//! replayed through the whole multiplexer with the shipped topology; every access must match.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use ioreq_mux_qemu_import::{ImportOptions, import_file};
use ioreq_mux_replay::{ReplayReport, replay};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn import_and_replay(name: &str) -> ReplayReport {
    let dir = std::env::temp_dir().join(format!("ioreq-mux-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let trace = dir.join(format!("{name}.trace.zst"));
    let log = repo().join("traces/q35").join(format!("{name}.log.zst"));
    let stats = import_file(&log, &trace, &ImportOptions::default()).unwrap();
    assert_eq!(stats.malformed_lines, 0);
    let r = replay(
        &trace,
        &repo().join("configs/qemu-q35-trace.toml"),
        20,
        None,
    )
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        r.divergences, 0,
        "{name}: divergences:\n{:#?}\nviolations: {:?}",
        r.first_divergences, r.invariant_violations
    );
    assert_eq!(
        r.chipset, "Q35 (MCH + ICH9)",
        "detected by probing through the qemu model"
    );
    assert_eq!(
        r.sim.sent, r.sim.completed,
        "every ioreq completed exactly once"
    );
    assert_eq!(r.engine.requests, r.accesses);
    // The three non-chipset servers each answered their device's accesses.
    for s in ["nvme", "virtio-net", "e1000"] {
        assert!(
            r.per_server[s] > 0,
            "{name}: {s} served nothing: {:?}",
            r.per_server
        );
    }
    // PCIEXBAR became the 256 MiB window at 0xb0000000 and the PM block went to 0x600.
    assert!(
        r.layout_events.iter().any(|e| e
            .description
            .contains("none -> segment 0000 buses 00-ff at 0xb0000000-0xbfffffff")),
        "{:?}",
        r.layout_events
    );
    assert!(
        r.layout_events
            .iter()
            .any(|e| e.description.contains("none -> ports 0x600-0x67f")),
        "{:?}",
        r.layout_events
    );
    r
}

#[test]
fn seabios_trace_replays_without_divergence() {
    let r = import_and_replay("seabios");
    assert_eq!(r.accesses, 13_768_544, "folded repeats count one by one");
    // iPXE scans every bus through CF8; SeaBIOS enumerates through ECAM once it is on.
    assert_eq!(r.by_kind["config-cf8"], 16_147);
    assert_eq!(r.by_kind["config-ecam"], 904);
    assert!(r.per_server["e1000"] > 4_900_000, "{:?}", r.per_server);
    assert!(r.per_server["virtio-net"] > 4_600_000, "{:?}", r.per_server);
}

#[test]
fn ovmf_trace_replays_without_divergence() {
    let r = import_and_replay("ovmf");
    assert_eq!(r.accesses, 3_568_127);
    assert_eq!(
        r.by_kind["config-ecam"], 12_784,
        "OVMF configures almost only through ECAM"
    );
    assert_eq!(r.by_kind["config-cf8"], 33);
    // OVMF programs PMBASE/ACPI_CNTL through CF8 before it enables ECAM.
    let pm = r
        .layout_events
        .iter()
        .position(|e| e.description.contains("PM block"))
        .unwrap();
    let ecam = r
        .layout_events
        .iter()
        .position(|e| e.description.contains("ECAM window none"))
        .unwrap();
    assert!(pm < ecam, "{:?}", r.layout_events);
}
