#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
//! A scripted firmware on a Q35 topology served by two device models: it programs PCIEXBAR
//! and PMBASE, numbers bridges, enumerates root ports, a switch and a PCIe-to-PCI bridge,
//! moves PCIEXBAR and renumbers a bus. Every access is checked to reach the right model with
//! the right (BDF, register, size, data).

use bdf_router::Sbdf;
use ioreq_mux_engine::EngineConfig;
use ioreq_mux_models::{DeliveryLog, EmulatedModel, FunctionSpec};
use ioreq_mux_tests::{Guest, Path, bdf, pos, topology};
use ioreq_server::{Claim, Dir, IoRange, IoreqType, abi};
use std::sync::{Arc, Mutex};

/// Asserts the last delivery went to `model` as a config access to `sbdf`/`reg`/`size`/`data`.
#[track_caller]
fn assert_delivered(
    log: &DeliveryLog,
    model: &str,
    sbdf: Sbdf,
    reg: u16,
    size: u32,
    dir: Dir,
    data: Option<u64>,
) {
    let l = log.lock().unwrap();
    let d = l.last().expect("something was delivered");
    assert_eq!(d.model, model, "wrong model for {sbdf} @{reg:#x}: {d:?}");
    assert_eq!(d.req.ty, IoreqType::PciConfig);
    assert_eq!(
        abi::split_pci_config_addr(d.req.addr),
        (sbdf.to_xen(), u32::from(reg)),
        "{d:?}"
    );
    assert_eq!(d.req.size, size);
    assert_eq!(d.req.dir, dir);
    if let Some(v) = data {
        assert_eq!(d.req.data, v, "{d:?}");
    }
}

fn deliveries(log: &DeliveryLog) -> usize {
    log.lock().unwrap().len()
}

/// Reads vendor/device through `path`, asserts which model answered (or none).
#[track_caller]
fn probe(g: &mut Guest, log: &DeliveryLog, path: Path, sbdf: Sbdf, want: Option<(&str, u32)>) {
    let before = deliveries(log);
    let v = g.cfg_read(path, sbdf, 0, 4) as u32;
    match want {
        Some((model, id)) => {
            assert_eq!(v, id, "{sbdf} via {path:?}");
            assert_delivered(log, model, sbdf, 0, 4, Dir::Read, None);
        }
        None => {
            assert_eq!(v, 0xffff_ffff, "{sbdf} via {path:?} should master-abort");
            assert_eq!(deliveries(log), before, "a master abort reaches no model");
        }
    }
}

/// Numbers a bridge like SeaBIOS: read header type, secondary, subordinate 0xff.
fn number(
    g: &mut Guest,
    log: &DeliveryLog,
    path: Path,
    sbdf: Sbdf,
    owner: &str,
    primary: u8,
    secondary: u8,
) {
    assert_eq!(
        g.cfg_read(path, sbdf, 0x0e, 1) & 0x7f,
        1,
        "{sbdf} is a bridge"
    );
    let v = u64::from(primary) | u64::from(secondary) << 8 | 0xff << 16;
    g.cfg_write(path, sbdf, 0x18, 4, v);
    assert_delivered(log, owner, sbdf, 0x18, 4, Dir::Write, Some(v));
}

fn set_subordinate(g: &mut Guest, log: &DeliveryLog, path: Path, sbdf: Sbdf, owner: &str, sub: u8) {
    g.cfg_write(path, sbdf, 0x1a, 1, sub.into());
    assert_delivered(log, owner, sbdf, 0x1a, 1, Dir::Write, Some(sub.into()));
}

#[test]
fn scripted_firmware_routes_every_access() {
    let log: DeliveryLog = Arc::new(Mutex::new(vec![]));
    let cfg = EngineConfig {
        intercepts: chipset_intercept::InterceptConfig {
            low_ram_top: Some(0x8000_0000),
            ..Default::default()
        },
        chipset: None,
        ..Default::default()
    };
    let mut g = Guest::new(topology(&log), &cfg);
    assert_eq!(
        g.engine.chipset(),
        chipset_intercept::Chipset::Q35,
        "detected by probing IDs"
    );
    log.lock().unwrap().clear();

    // 1. The host bridge through CF8.
    probe(
        &mut g,
        &log,
        Path::Cf8,
        bdf("00:00.0"),
        Some(("chipset", 0x29c0_8086)),
    );

    // 2. PCIEXBAR through CF8, as both firmwares do: the MCH model never sees it.
    let n = deliveries(&log);
    g.cfg_write(Path::Cf8, bdf("00:00.0"), 0x60, 4, 0);
    g.cfg_write(Path::Cf8, bdf("00:00.0"), 0x64, 4, 0);
    g.cfg_write(Path::Cf8, bdf("00:00.0"), 0x60, 4, 0xb000_0001);
    assert_eq!(
        deliveries(&log),
        n,
        "PCIEXBAR is handled instead of the model"
    );
    assert_eq!(g.cfg_read(Path::Cf8, bdf("00:00.0"), 0x60, 4), 0xb000_0001);
    assert_eq!(g.engine.router().windows().len(), 1);
    g.ecam = g.engine.router().windows().first().copied();
    assert_eq!(
        g.ecam.map(|w| (w.base, w.end_bus)),
        Some((0xb000_0000, 0xff))
    );

    // 3. PMBASE and ACPI_CNTL through ECAM: the LPC model sees them, and the PM block's
    //    ports are claimed for the chipset model.
    g.cfg_write(Path::Ecam, bdf("00:1f.0"), 0x40, 4, 0x601);
    assert_delivered(
        &log,
        "chipset",
        bdf("00:1f.0"),
        0x40,
        4,
        Dir::Write,
        Some(0x601),
    );
    assert_eq!(
        g.inb(0x608, 4),
        0xffff_ffff,
        "PM block not decoded before ACPI_EN"
    );
    g.cfg_write(Path::Ecam, bdf("00:1f.0"), 0x44, 1, 0x80);
    assert_delivered(
        &log,
        "chipset",
        bdf("00:1f.0"),
        0x44,
        1,
        Dir::Write,
        Some(0x80),
    );
    assert_eq!(
        g.inb(0x608, 4),
        0xcafe_0608,
        "PM timer port reaches the chipset model"
    );
    {
        let l = log.lock().unwrap();
        let d = l.last().unwrap();
        assert_eq!(
            (d.model.as_str(), d.req.ty, d.req.addr),
            ("chipset", IoreqType::Pio, 0x608)
        );
    }

    // 4. Enumerate bus 0 through ECAM.
    for dev in 0..32u8 {
        let s = Sbdf::new(0, 0, dev, 0).unwrap();
        let want = match dev {
            0 => Some(("chipset", 0x29c0_8086)),
            2 => Some(("chipset", 0x000c_1b36)),
            0x1f => Some(("chipset", 0x2918_8086)),
            _ => None,
        };
        probe(&mut g, &log, Path::Ecam, s, want);
    }
    probe(
        &mut g,
        &log,
        Path::Ecam,
        bdf("00:02.1"),
        Some(("chipset", 0x000c_1b36)),
    );
    probe(&mut g, &log, Path::Cf8, bdf("00:02.2"), None);

    // 5. Number bridges, depth first, mixing both paths.
    number(&mut g, &log, Path::Ecam, bdf("00:02.0"), "chipset", 0, 1);
    probe(
        &mut g,
        &log,
        Path::Ecam,
        bdf("01:00.0"),
        Some(("chipset", 0x8232_104c)),
    );
    number(&mut g, &log, Path::Ecam, bdf("01:00.0"), "chipset", 1, 2);
    probe(
        &mut g,
        &log,
        Path::Cf8,
        bdf("02:00.0"),
        Some(("chipset", 0x8233_104c)),
    );
    probe(
        &mut g,
        &log,
        Path::Cf8,
        bdf("02:01.0"),
        Some(("chipset", 0x8233_104c)),
    );
    number(&mut g, &log, Path::Cf8, bdf("02:00.0"), "chipset", 2, 3);
    // Behind the first downstream port: the vgpu's function, served by the second model.
    probe(
        &mut g,
        &log,
        Path::Ecam,
        bdf("03:00.0"),
        Some(("vgpu", 0x1eb8_10de)),
    );
    probe(
        &mut g,
        &log,
        Path::Cf8,
        bdf("03:00.0"),
        Some(("vgpu", 0x1eb8_10de)),
    );
    set_subordinate(&mut g, &log, Path::Ecam, bdf("02:00.0"), "chipset", 3);
    number(&mut g, &log, Path::Ecam, bdf("02:01.0"), "chipset", 2, 4);
    probe(
        &mut g,
        &log,
        Path::Ecam,
        bdf("04:00.0"),
        Some(("chipset", 0x1044_1af4)),
    );
    set_subordinate(&mut g, &log, Path::Ecam, bdf("02:01.0"), "chipset", 4);
    set_subordinate(&mut g, &log, Path::Ecam, bdf("01:00.0"), "chipset", 4);
    set_subordinate(&mut g, &log, Path::Ecam, bdf("00:02.0"), "chipset", 4);
    number(&mut g, &log, Path::Cf8, bdf("00:02.1"), "chipset", 0, 5);
    number(&mut g, &log, Path::Ecam, bdf("05:00.0"), "chipset", 5, 6);
    probe(&mut g, &log, Path::Ecam, bdf("06:00.0"), None);
    probe(
        &mut g,
        &log,
        Path::Ecam,
        bdf("06:01.0"),
        Some(("chipset", 0x100e_8086)),
    );
    set_subordinate(&mut g, &log, Path::Ecam, bdf("05:00.0"), "chipset", 6);
    set_subordinate(&mut g, &log, Path::Ecam, bdf("00:02.1"), "chipset", 6);
    // A bus nobody numbered.
    probe(&mut g, &log, Path::Ecam, bdf("07:00.0"), None);

    // 6. Extended config space of the vgpu function through ECAM only (CF8 stops at 0xff).
    assert_eq!(
        g.cfg_read(Path::Ecam, bdf("03:00.0"), 0x100, 4),
        0x1401_0003,
        "DSN, next: AER at 0x140"
    );
    assert_delivered(&log, "vgpu", bdf("03:00.0"), 0x100, 4, Dir::Read, None);
    let w = g.ecam.unwrap();
    assert_eq!(
        g.mmio_read(w.address_of(bdf("03:00.0"), 0x108).unwrap(), 8),
        0x0000_0000_1122_3344,
        "8-byte ECAM read = two dwords"
    );
    assert_eq!(
        g.mmio_read(w.address_of(bdf("03:00.0"), 0x100).unwrap(), 8),
        0x5566_7788_1401_0003
    );
    let rejects = g.engine.stats().ecam_rejects;
    assert_eq!(
        g.mmio_read(w.address_of(bdf("03:00.0"), 0x104).unwrap(), 8),
        u64::MAX,
        "8-byte ECAM access not 8-aligned: master abort"
    );
    assert_eq!(g.engine.stats().ecam_rejects, rejects + 1);
    // Sub-dword accesses keep their register and size.
    assert_eq!(g.cfg_read(Path::Cf8, bdf("03:00.0"), 0x02, 2), 0x1eb8);
    assert_delivered(&log, "vgpu", bdf("03:00.0"), 0x02, 2, Dir::Read, None);
    assert_eq!(g.cfg_read(Path::Ecam, bdf("03:00.0"), 0x0b, 1), 0x03);
    assert_delivered(&log, "vgpu", bdf("03:00.0"), 0x0b, 1, Dir::Read, None);

    // 7. The vgpu BAR: sized, placed, enabled; its MMIO then reaches the vgpu model.
    g.cfg_write(Path::Ecam, bdf("03:00.0"), 0x10, 4, 0xffff_ffff);
    g.cfg_write(Path::Ecam, bdf("03:00.0"), 0x14, 4, 0xffff_ffff);
    assert_eq!(g.cfg_read(Path::Ecam, bdf("03:00.0"), 0x10, 4), 0xfff0_0004);
    g.cfg_write(Path::Ecam, bdf("03:00.0"), 0x10, 4, 0xc000_0000);
    g.cfg_write(Path::Ecam, bdf("03:00.0"), 0x14, 4, 0);
    g.cfg_write(Path::Cf8, bdf("03:00.0"), 0x04, 2, 0x2);
    assert_delivered(&log, "vgpu", bdf("03:00.0"), 0x04, 2, Dir::Write, Some(2));
    assert_eq!(g.mmio_read(0xc000_0010, 4), 0xcafe_0010);
    g.mmio_write(0xc000_0010, 4, 0x1234_5678);
    assert_eq!(g.mmio_read(0xc000_0010, 4), 0x1234_5678);
    {
        let l = log.lock().unwrap();
        let d = l.last().unwrap();
        assert_eq!(
            (d.model.as_str(), d.req.ty, d.req.addr),
            ("vgpu", IoreqType::Copy, 0xc000_0010)
        );
    }

    // 8. Move PCIEXBAR to 64 MiB at 0xe0000000 with a 1-byte write to 0x60 first (disable)
    //    and then the dword: the old window stops decoding at once.
    g.cfg_write(Path::Cf8, bdf("00:00.0"), 0x60, 1, 0x00);
    assert!(g.engine.router().windows().is_empty());
    assert_eq!(
        g.mmio_read(0xb000_0000, 4),
        0xffff_ffff,
        "disabled window: nobody claims it"
    );
    g.cfg_write(Path::Cf8, bdf("00:00.0"), 0x60, 4, 0xe000_0005);
    let w = g.engine.router().windows()[0];
    assert_eq!((w.base, w.end_bus), (0xe000_0000, 0x3f));
    let old = g.ecam.replace(w).unwrap();
    let n = deliveries(&log);
    assert_eq!(
        g.mmio_read(old.address_of(bdf("03:00.0"), 0).unwrap(), 4),
        0xffff_ffff
    );
    assert_eq!(deliveries(&log), n, "the old window decodes nothing");
    probe(
        &mut g,
        &log,
        Path::Ecam,
        bdf("03:00.0"),
        Some(("vgpu", 0x1eb8_10de)),
    );

    // 9. Renumber: the first downstream port's secondary bus 3 -> 7. The vgpu function moves
    //    with it; its registration by position follows.
    g.cfg_write(Path::Ecam, bdf("02:00.0"), 0x19, 1, 7);
    assert_delivered(
        &log,
        "chipset",
        bdf("02:00.0"),
        0x19,
        1,
        Dir::Write,
        Some(7),
    );
    g.cfg_write(Path::Ecam, bdf("02:00.0"), 0x1a, 1, 7);
    // ...but bus 7 is outside the upstream port's subordinate range (4): unreachable.
    probe(&mut g, &log, Path::Ecam, bdf("07:00.0"), None);
    for s in ["01:00.0", "00:02.0"] {
        set_subordinate(&mut g, &log, Path::Ecam, bdf(s), "chipset", 7);
    }
    probe(
        &mut g,
        &log,
        Path::Ecam,
        bdf("07:00.0"),
        Some(("vgpu", 0x1eb8_10de)),
    );
    probe(
        &mut g,
        &log,
        Path::Cf8,
        bdf("07:00.0"),
        Some(("vgpu", 0x1eb8_10de)),
    );
    probe(&mut g, &log, Path::Ecam, bdf("03:00.0"), None);
    // The BAR claim did not move: it is an address, not a BDF.
    assert_eq!(g.mmio_read(0xc000_0010, 4), 0x1234_5678);

    // 10. Disable ECAM entirely; CF8 still works.
    g.cfg_write(Path::Cf8, bdf("00:00.0"), 0x60, 4, 0xe000_0004);
    assert!(g.engine.router().windows().is_empty());
    assert_eq!(g.mmio_read(0xe000_0000, 4), 0xffff_ffff);
    probe(
        &mut g,
        &log,
        Path::Cf8,
        bdf("06:01.0"),
        Some(("chipset", 0x100e_8086)),
    );

    // Every ioreq was completed exactly once; nobody is left waiting.
    let stats = g.hv.check().expect("simulation invariants hold");
    assert_eq!(stats.sent, stats.completed);
    let es = g.engine.stats();
    assert!(es.master_aborts > 30, "{es:?}");
    assert_eq!(
        es.malformed + es.dm_errors + es.completion_errors,
        0,
        "{es:?}"
    );
    let history: Vec<String> = g
        .engine
        .layout_history()
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(
        history,
        [
            "ECAM window none -> segment 0000 buses 00-ff at 0xb0000000-0xbfffffff (256 MiB)",
            "PM block of 0000:00:1f.0: none -> ports 0x600-0x67f",
            "ECAM window segment 0000 buses 00-ff at 0xb0000000-0xbfffffff (256 MiB) -> none",
            "ECAM window none -> segment 0000 buses 00-3f at 0xe0000000-0xe3ffffff (64 MiB)",
            "ECAM window segment 0000 buses 00-3f at 0xe0000000-0xe3ffffff (64 MiB) -> none",
        ]
    );
}

#[test]
fn a_second_claim_on_the_same_function_names_both_models() {
    let log: DeliveryLog = Arc::new(Mutex::new(vec![]));
    let mut models = topology(&log);
    models.push(Box::new(EmulatedModel::new("storage").with_function(
        pos(&[(2, 0), (0, 0), (0, 0), (0, 0)]),
        &FunctionSpec::endpoint(0x1b36, 0x0010, 0x010802),
    )));
    let hv = ioreq_server::sim::SimHypervisor::new(1, std::time::Duration::from_secs(1));
    let backend = hv
        .create_server(ioreq_server::bufioreq::BufioreqMode::Off)
        .unwrap();
    let err = ioreq_mux_engine::Engine::new(backend, models, &EngineConfig::default()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("storage") && msg.contains("vgpu"), "{msg}");
}

#[test]
fn claims_of_the_mux_own_ports_and_window_are_refused() {
    let log: DeliveryLog = Arc::new(Mutex::new(vec![]));
    let mut models = topology(&log);
    models.push(Box::new(
        EmulatedModel::new("greedy").with_range(IoRange::ports(0xcf8, 0xcff)),
    ));
    let hv = ioreq_server::sim::SimHypervisor::new(1, std::time::Duration::from_secs(1));
    let backend = hv
        .create_server(ioreq_server::bufioreq::BufioreqMode::Off)
        .unwrap();
    let err = ioreq_mux_engine::Engine::new(backend, models, &EngineConfig::default()).unwrap_err();
    assert!(err.to_string().contains("ioreq-mux"), "{err}");
    let _ = Claim::Range(IoRange::ports(0, 0));
}

/// Beside another ioreq server (QEMU, created first): with `PciClaims::Functions` the engine
/// claims only what its models own, and everything else keeps reaching the other server.
#[test]
fn beside_qemu_only_owned_functions_are_claimed() {
    use ioreq_mux_engine::{Engine, PciClaims};
    use ioreq_server::bufioreq::BufioreqMode;
    use ioreq_server::sim::{Issued, SimHypervisor};
    use ioreq_server::{Backend, BackendEvent, Ioreq, RangeKind};
    use std::time::Duration;

    let hv = SimHypervisor::new(1, Duration::from_secs(1));
    // "QEMU": owns all of bus 0 and the config ports, answers 0x12345678.
    let mut qemu = hv.create_server(BufioreqMode::Off).unwrap();
    qemu.map_range(IoRange::new(RangeKind::Pci, 0, 0xff))
        .unwrap();
    qemu.map_range(IoRange::ports(0xcf8, 0xcff)).unwrap();
    qemu.set_enabled(true).unwrap();
    let log: DeliveryLog = Arc::new(Mutex::new(vec![]));
    let vgpu = EmulatedModel::new("vgpu")
        .with_function(
            ioreq_mux_tests::at("00:05.0"),
            &FunctionSpec::endpoint(0x1af4, 0x1337, 0xff0000),
        )
        .with_log(log.clone());
    let cfg = EngineConfig {
        pci_claims: PciClaims::Functions,
        chipset: Some(chipset_intercept::Chipset::Unknown),
        ..Default::default()
    };
    let backend = hv.create_server(BufioreqMode::Off).unwrap();
    let mut engine = Engine::new(backend, vec![Box::new(vgpu)], &cfg).unwrap();
    engine.backend().set_enabled(true).unwrap();
    assert_eq!(
        hv.server_ranges(1, RangeKind::Pci),
        vec![(0x28, 0x28)],
        "only 00:05.0"
    );
    assert!(
        hv.server_ranges(1, RangeKind::Port).is_empty(),
        "CF8/CFC stay with QEMU"
    );

    let mut read = |sbdf: &str| {
        let s = bdf(sbdf);
        let cf8 = 0x8000_0000 | (u64::from(s.bdf()) << 8);
        let w = Ioreq::new(IoreqType::Pio, Dir::Write, 0xcf8, 4, cf8);
        let r = Ioreq::new(IoreqType::Pio, Dir::Read, 0xcfc, 4, 0);
        for req in [w, r] {
            if hv.issue(0, &req, false).unwrap() == Issued::Pending {
                // Serve it from whichever server got it.
                let mut ev = vec![];
                qemu.wait(Some(Duration::ZERO), &mut ev).unwrap();
                for e in ev {
                    if let BackendEvent::Request { vcpu, .. } = e {
                        qemu.complete(vcpu, 0x1234_5678).unwrap();
                    }
                }
                engine.poll(Some(Duration::ZERO)).unwrap();
            }
            let v = hv.collect(0).unwrap().unwrap();
            if req.dir == Dir::Read {
                return v;
            }
        }
        unreachable!()
    };
    assert_eq!(
        read("00:05.0"),
        0x1337_1af4,
        "the newer server wins its function"
    );
    assert_eq!(read("00:00.0"), 0x1234_5678, "QEMU keeps the rest");
    assert_eq!(read("00:1f.0"), 0x1234_5678);
    assert_eq!(log.lock().unwrap().len(), 1);
    assert!(hv.check().is_ok());
}
