//! More than one PCI segment: ECAM windows the toolstack configures (`[[engine.ecam]]`, one
//! per segment as an MCFG table lists them) next to the window the guest opens through Q35's
//! PCIEXBAR, each routing to the functions of its own segment.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use bdf_router::EcamWindow;
use ioreq_mux_config::{Config, ConfigError};
use ioreq_mux_engine::{Engine, EngineConfig, EngineError};
use ioreq_mux_models::{DeliveryLog, EmulatedModel, FunctionSpec, Placement};
use ioreq_mux_tests::{Guest, Path, bdf, topology};
use ioreq_server::abi::pack_sbdf;
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::sim::SimHypervisor;
use ioreq_server::{DeviceModel, IoRange};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SEG1_BASE: u64 = 0xe000_0000;

/// ECAM address of a function's register in a window that starts at bus 0.
fn ecam(base: u64, bus: u8, dev: u8, func: u8, reg: u64) -> u64 {
    base + (u64::from(bus) << 20) + (u64::from(dev) << 15) + (u64::from(func) << 12) + reg
}

/// The Q35 test machine on segment 0, and a second host bridge's functions on segment 1
/// (served by another model) behind a configured window for buses 00-3f.
fn two_segments() -> (Guest, EngineConfig) {
    let log: DeliveryLog = Arc::new(Mutex::new(vec![]));
    let mut models = topology(&log);
    let seg1 = EmulatedModel::new("segment1")
        .with_function(
            Placement::Bdf(pack_sbdf(1, 0, 3, 0)),
            &FunctionSpec::endpoint(0x1af4, 0x1041, 0x020000),
        )
        .with_function(
            Placement::Bdf(pack_sbdf(1, 0x20, 0, 0)),
            &FunctionSpec::endpoint(0x10de, 0x1eb8, 0x030000),
        );
    models.push(Box::new(seg1));
    let cfg = EngineConfig {
        intercepts: chipset_intercept::InterceptConfig {
            low_ram_top: Some(0x8000_0000),
            ..Default::default()
        },
        ecam: vec![EcamWindow::new(1, SEG1_BASE, 0, 0x3f).unwrap()],
        ..Default::default()
    };
    (Guest::new(models, &cfg), cfg)
}

#[test]
fn a_configured_window_routes_its_own_segment() {
    let (mut g, _) = two_segments();
    // Installed at start, before the guest did anything; the chipset is still detected.
    assert_eq!(g.engine.chipset(), chipset_intercept::Chipset::Q35);
    assert_eq!(g.engine.router().windows().len(), 1);
    assert_eq!(g.engine.router().windows()[0].segment, 1);
    // The guest opens segment 0's window through PCIEXBAR: both are in place.
    g.cfg_write(Path::Cf8, bdf("00:00.0"), 0x60, 4, 0xb000_0001);
    let windows = g.engine.router().windows().to_vec();
    assert_eq!(windows.len(), 2, "{windows:?}");

    // Segment 1, bus 0 and bus 0x20: the segment-1 model's functions.
    assert_eq!(g.mmio_read(ecam(SEG1_BASE, 0, 3, 0, 0), 4), 0x1041_1af4);
    assert_eq!(g.mmio_read(ecam(SEG1_BASE, 0x20, 0, 0, 0), 4), 0x1eb8_10de);
    assert_eq!(g.mmio_read(ecam(SEG1_BASE, 0x20, 0, 0, 0xa), 2), 0x0300);
    // Segment 1 has nothing at 00:00.0 (segment 0's MCH is not there): master abort.
    assert_eq!(g.mmio_read(ecam(SEG1_BASE, 0, 0, 0, 0), 4), 0xffff_ffff);
    // Segment 0 through its own window and through CF8: the MCH, and nothing at 00:03.0.
    assert_eq!(g.mmio_read(ecam(0xb000_0000, 0, 0, 0, 0), 4), 0x29c0_8086);
    assert_eq!(g.mmio_read(ecam(0xb000_0000, 0, 3, 0, 0), 4), 0xffff_ffff);
    assert_eq!(g.cfg_read(Path::Cf8, bdf("00:03.0"), 0, 4), 0xffff_ffff);
    // Past the configured window's last bus (0x3f) is plain MMIO nobody claims.
    assert_eq!(g.mmio_read(ecam(SEG1_BASE, 0x40, 0, 0, 0), 4), 0xffff_ffff);

    // Writes reach segment 1's functions: the interrupt line sticks.
    g.mmio_write(ecam(SEG1_BASE, 0x20, 0, 0, 0x3c), 1, 0x0b);
    assert_eq!(g.mmio_read(ecam(SEG1_BASE, 0x20, 0, 0, 0x3c), 1), 0x0b);
    assert_eq!(g.mmio_read(ecam(SEG1_BASE, 0, 3, 0, 0x3c), 1), 0x00);

    // The guest disabling PCIEXBAR closes segment 0's window only.
    g.cfg_write(Path::Cf8, bdf("00:00.0"), 0x60, 4, 0xb000_0000);
    assert_eq!(g.engine.router().windows().len(), 1);
    assert_eq!(g.mmio_read(ecam(SEG1_BASE, 0, 3, 0, 0), 4), 0x1041_1af4);
    assert!(g.hv.check().is_ok());
}

#[test]
fn a_guest_window_over_a_configured_one_is_refused() {
    let (mut g, _) = two_segments();
    // PCIEXBAR 64 MiB at 0xe0000000: over segment 1's window.
    g.cfg_write(Path::Cf8, bdf("00:00.0"), 0x60, 4, 0xe000_0005);
    assert_eq!(g.engine.router().windows().len(), 1);
    assert!(
        g.engine
            .layout_history()
            .iter()
            .any(|e| e.to_string().starts_with("refused ECAM window")),
        "{:?}",
        g.engine.layout_history()
    );
    assert_eq!(g.mmio_read(ecam(SEG1_BASE, 0, 3, 0, 0), 4), 0x1041_1af4);
    assert!(g.hv.check().is_ok());
}

#[test]
fn overlapping_configured_windows_stop_the_engine() {
    let hv = SimHypervisor::new(1, Duration::from_secs(5));
    let backend = hv.create_server(BufioreqMode::Atomic).unwrap();
    let cfg = EngineConfig {
        ecam: vec![
            EcamWindow::new(1, SEG1_BASE, 0, 0x3f).unwrap(),
            EcamWindow::new(2, SEG1_BASE + (0x20 << 20), 0, 0x0f).unwrap(),
        ],
        ..Default::default()
    };
    let models: Vec<Box<dyn DeviceModel>> = vec![];
    match Engine::new(backend, models, &cfg) {
        Err(EngineError::Window {
            hypervisor: false,
            window,
            ..
        }) => assert!(window.contains("segment 0002"), "{window}"),
        other => panic!("expected a window error, got {:?}", other.err()),
    }
    // A window over a model's fixed MMIO range is refused before the model attaches: the
    // model's claim is the one that fails.
    let hv = SimHypervisor::new(1, Duration::from_secs(5));
    let backend = hv.create_server(BufioreqMode::Atomic).unwrap();
    let cfg = EngineConfig {
        ecam: vec![EcamWindow::new(1, SEG1_BASE, 0, 0x3f).unwrap()],
        ..Default::default()
    };
    let squatter = EmulatedModel::new("squatter").with_range(IoRange::mmio(SEG1_BASE, 0x1000));
    let models: Vec<Box<dyn DeviceModel>> = vec![Box::new(squatter)];
    assert!(matches!(
        Engine::new(backend, models, &cfg),
        Err(EngineError::Attach { .. })
    ));
}

#[test]
fn configured_windows_are_read_and_checked_from_the_file() {
    let p = std::path::Path::new("segments.toml");
    let ok = "\
[[engine.ecam]]
segment = 1
base = 0xe0000000
end_bus = 0x3f

[[engine.ecam]]
segment = 2
base = 0xd0000000
start_bus = 0x10
end_bus = 0x1f
";
    let cfg = Config::parse(p, ok).unwrap();
    assert_eq!(
        cfg.engine.ecam,
        vec![
            EcamWindow::new(1, 0xe000_0000, 0, 0x3f).unwrap(),
            EcamWindow::new(2, 0xd000_0000, 0x10, 0x1f).unwrap(),
        ]
    );
    for (text, line, says) in [
        (
            "[[engine.ecam]]\nsegment = 1\nbase = 0xe0000800\nend_bus = 0x3f\n",
            1,
            "not 1 MiB aligned",
        ),
        (
            "\n[[engine.ecam]]\nbase = 0xe0000000\nstart_bus = 4\nend_bus = 3\n",
            2,
            "is empty",
        ),
        (
            "[[engine.ecam]]\nbase = 0xe0000000\nend_bus = 0x3f\nbuses = 4\n",
            4,
            "unknown field `buses`",
        ),
        (
            "[[engine.ecam]]\nend_bus = 0x3f\n",
            1,
            "missing field `base`",
        ),
    ] {
        match Config::parse(p, text) {
            Err(e @ ConfigError::At(_)) => {
                let m = e.to_string();
                assert!(m.contains(&format!("--> segments.toml:{line}:")), "{m}");
                assert!(m.contains(says), "{m}");
            }
            other => panic!("{text:?}: expected a field error, got {other:?}"),
        }
    }
}
