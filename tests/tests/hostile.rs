//! Hostile guests and hostile device models, through the whole stack on the simulated
//! hypervisor. The simulation's invariant checker (no ioreq lost, none completed twice, no
//! vCPU waiting past the deadline) is checked at the end of every test.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use ioreq_mux_engine::{EngineConfig, Grant};
use ioreq_mux_models::{DeliveryLog, EmulatedModel, FunctionSpec};
use ioreq_mux_tests::{Guest, Path, bdf, pos, topology};
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::sim::{SimError, SimHypervisor};
use ioreq_server::{
    Backend, BackendEvent, Claim, ClaimError, DeviceModel, Dir, DmControl, DmError, IoRange, Ioreq,
    IoreqType, RangeKind,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn guest() -> (Guest, DeliveryLog) {
    guest_with(|_| {})
}

/// The test topology (plus whatever `extra` adds), 2 GiB of RAM below 4G.
fn guest_with(extra: impl FnOnce(&mut Vec<Box<dyn DeviceModel>>)) -> (Guest, DeliveryLog) {
    let log: DeliveryLog = Arc::new(Mutex::new(vec![]));
    let cfg = EngineConfig {
        intercepts: chipset_intercept::InterceptConfig {
            low_ram_top: Some(0x8000_0000),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut models = topology(&log);
    extra(&mut models);
    (Guest::new(models, &cfg), log)
}

fn pciexbar(g: &mut Guest, v: u64) {
    g.cfg_write(Path::Cf8, bdf("00:00.0"), 0x60, 4, v);
    g.ecam = g.engine.router().windows().first().copied();
}

#[test]
fn pciexbar_values_a_chipset_must_refuse() {
    let (mut g, _) = guest();
    pciexbar(&mut g, 0xb000_0001);
    assert!(g.ecam.is_some());
    for (v, why) in [
        (0xb000_0007u64, "reserved length"),
        (0x4000_0001, "over RAM below TOLUD"),
        (0xf000_0001, "over the APICs"),
        (0xfc00_0005, "64 MiB over the APICs"),
    ] {
        pciexbar(&mut g, v);
        assert!(
            g.engine.router().windows().is_empty(),
            "{why}: {v:#x} accepted"
        );
        // The refused window decodes nothing: an access there is unclaimed MMIO.
        assert_eq!(g.mmio_read(v & 0xffff_fff0_0000, 4), 0xffff_ffff, "{why}");
        pciexbar(&mut g, 0xb000_0001);
        assert!(!g.engine.router().windows().is_empty());
    }
    // A window over a range a model claimed (the vgpu's BAR) is refused as well.
    let refused = g
        .engine
        .layout_history()
        .iter()
        .filter(|e| e.to_string().starts_with("refused"))
        .count();
    assert_eq!(refused, 4);
    assert!(g.hv.check().is_ok());
}

/// A window the router refuses (a model's MMIO is under it) is not "in place": once the
/// obstacle is gone, the guest writing the same PCIEXBAR value again opens it. The same holds
/// for a PM block nobody could claim.
#[test]
fn a_refused_window_is_retried_when_the_guest_writes_it_again() {
    // Something already decodes 4 KiB inside 0xb0000000..0xbfffffff.
    let (mut g, _) = guest_with(|models| {
        models.push(Box::new(
            EmulatedModel::new("squatter").with_range(IoRange::mmio(0xb010_0000, 0x1000)),
        ));
    });
    pciexbar(&mut g, 0xb000_0001);
    assert!(
        g.ecam.is_none(),
        "a window over claimed MMIO must be refused"
    );
    let refusals = |g: &Guest| {
        g.engine
            .layout_history()
            .iter()
            .filter(|e| e.to_string().starts_with("refused ECAM window"))
            .count()
    };
    assert_eq!(refusals(&g), 1);
    // The same value again while the squatter is still there: retried, refused again.
    pciexbar(&mut g, 0xb000_0001);
    assert!(g.ecam.is_none());
    assert_eq!(refusals(&g), 2, "the rewrite must be retried, not ignored");
    // The squatter goes; the same value now opens the window, and ECAM works.
    let squatter = g
        .engine
        .router()
        .server_names()
        .iter()
        .position(|n| n == "squatter")
        .unwrap();
    let released = g.engine.remove_model(u16::try_from(squatter).unwrap());
    assert_eq!(released.len(), 1, "{released:?}");
    pciexbar(&mut g, 0xb000_0001);
    assert!(g.ecam.is_some(), "the same PCIEXBAR value must be retried");
    assert_eq!(g.cfg_read(Path::Ecam, bdf("00:00.0"), 0, 4), 0x29c0_8086);
    assert!(g.hv.check().is_ok());
}

/// A rep 4-byte write to CF8 (count > 1, data in the ioreq) latches in Xen's CF8 handler;
/// the multiplexer's latch, which answers CF8 reads, must agree with it.
#[test]
fn a_rep_cf8_write_latches_like_xen() {
    let (mut g, _) = guest();
    pciexbar(&mut g, 0xb000_0001); // leaves CF8 at 00:00.0 register 0x60
    let mut w = Ioreq::new(IoreqType::Pio, Dir::Write, 0xcf8, 4, 0x8000_0000);
    w.count = 2;
    g.access(w);
    assert_eq!(g.hv.cf8(), 0x8000_0000);
    assert_eq!(g.engine.router().cf8_value(), 0x8000_0000);
    assert_eq!(g.inb(0xcf8, 4), 0x8000_0000);
    // CFC now reads 00:00.0 register 0 (the MCH's IDs), as ECAM does.
    assert_eq!(g.inb(0xcfc, 4), 0x29c0_8086);
    assert_eq!(g.cfg_read(Path::Ecam, bdf("00:00.0"), 0, 4), 0x29c0_8086);
    assert!(g.hv.check().is_ok());
}

#[test]
fn pmbase_over_legacy_ports_or_zero_is_refused() {
    let (mut g, log) = guest();
    pciexbar(&mut g, 0xb000_0001);
    g.cfg_write(Path::Ecam, bdf("00:1f.0"), 0x44, 1, 0x80);
    for (base, what) in [
        (0u64, "zero"),
        (0xc81, "PCI config ports"),
        (0x01, "PIC/PIT"),
        (0x0001_0001, "above 64K: masked to 0"),
    ] {
        g.cfg_write(Path::Ecam, bdf("00:1f.0"), 0x40, 4, base);
        let n = log.lock().unwrap().len();
        // CF8 still works: the PM block never took 0xcf8.
        assert_eq!(
            g.cfg_read(Path::Cf8, bdf("00:00.0"), 0, 4),
            0x29c0_8086,
            "{what}"
        );
        assert!(log.lock().unwrap().len() > n);
        let ports = g.engine.router().port_ranges();
        assert!(
            !ports
                .iter()
                .any(|&(s, e, o)| o != 0 && s <= 0xcff && 0xcf8 <= e),
            "{what}: {ports:x?}"
        );
    }
    g.cfg_write(Path::Ecam, bdf("00:1f.0"), 0x40, 4, 0x601);
    assert_eq!(g.inb(0x608, 4), 0xcafe_0608);
    assert!(g.hv.check().is_ok());
}

#[test]
fn odd_ecam_accesses_master_abort_and_are_counted() {
    let (mut g, log) = guest();
    pciexbar(&mut g, 0xb000_0001);
    let base = 0xb000_0000u64;
    let n = log.lock().unwrap().len();
    // 3 bytes: Xen never sends one (the simulation refuses it like Xen's emulator would not
    // produce it), so hand it to the engine directly, as a broken backend would.
    let three = Ioreq::new(IoreqType::Copy, Dir::Read, base + 1, 3, 0);
    assert_eq!(g.engine.handle(0, &three), 0xff_ffff);
    assert!(matches!(
        g.hv.issue(0, &three, false),
        Err(SimError::Malformed(_))
    ));
    // Misaligned 2 and 4 bytes, 8 bytes at a 4-byte boundary.
    assert_eq!(g.mmio_read(base + 1, 2), 0xffff);
    assert_eq!(g.mmio_read(base + 2, 4), 0xffff_ffff);
    assert_eq!(g.mmio_read(base + 4, 8), u64::MAX);
    g.mmio_write(base + 0x61, 4, 0);
    // rep and data_is_ptr.
    let mut rep = Ioreq::new(IoreqType::Copy, Dir::Read, base, 4, 0);
    rep.count = 4;
    assert_eq!(g.access(rep), 0xffff_ffff);
    let mut ptr = Ioreq::new(IoreqType::Copy, Dir::Write, base + 0x10, 4, 0x1000);
    ptr.data_is_ptr = true;
    g.access(ptr);
    assert_eq!(log.lock().unwrap().len(), n, "no model saw any of them");
    let s = g.engine.stats();
    assert_eq!(
        s.ecam_rejects + s.data_ptr_unsupported + s.malformed,
        7,
        "{s:?}"
    );
    // An 8-byte naturally aligned access is fine: two dwords.
    assert_eq!(
        g.mmio_read(base, 8),
        0x29c0_8086,
        "vendor/device, then command/status (0)"
    );
    assert!(g.hv.check().is_ok());
}

#[test]
fn bus_number_loops_and_overlaps_do_not_wedge_routing() {
    let (mut g, _) = guest();
    pciexbar(&mut g, 0xb000_0001);
    let w = |g: &mut Guest, s: &str, v: u64| g.cfg_write(Path::Ecam, bdf(s), 0x18, 4, v);
    g.cfg_read(Path::Ecam, bdf("00:02.0"), 0x0e, 1);
    g.cfg_read(Path::Ecam, bdf("00:02.1"), 0x0e, 1);
    // Both root ports claim bus 1: the first one found wins, the other forwards nothing.
    w(&mut g, "00:02.0", 0x0001_0100);
    w(&mut g, "00:02.1", 0x0001_0100);
    assert_eq!(
        g.cfg_read(Path::Ecam, bdf("01:00.0"), 0, 4),
        0x8232_104c,
        "the switch behind 00:02.0"
    );
    // The switch's upstream port says its secondary bus is its own bus: a loop.
    g.cfg_read(Path::Ecam, bdf("01:00.0"), 0x0e, 1);
    w(&mut g, "01:00.0", 0x0001_0101);
    assert_eq!(g.cfg_read(Path::Ecam, bdf("01:00.0"), 0, 4), 0x8232_104c);
    // Secondary 0 and subordinate below secondary.
    w(&mut g, "01:00.0", 0x0000_0001);
    w(&mut g, "00:02.0", 0x0000_0500);
    for b in 0..8 {
        g.cfg_read(Path::Ecam, bdf(&format!("{b:02x}:00.0")), 0, 4);
    }
    // Sane numbering afterwards works again.
    w(&mut g, "00:02.0", 0x00ff_0100);
    w(&mut g, "01:00.0", 0x00ff_0201);
    g.cfg_read(Path::Ecam, bdf("02:00.0"), 0x0e, 1);
    w(&mut g, "02:00.0", 0x0003_0302);
    assert_eq!(
        g.cfg_read(Path::Ecam, bdf("03:00.0"), 0, 4),
        0x1eb8_10de,
        "the vgpu is found again"
    );
    assert!(g.hv.check().is_ok());
}

/// A model that claims whatever it is told to, and can misbehave.
struct Rogue {
    name: String,
    claims: Vec<Claim>,
}

impl DeviceModel for Rogue {
    fn name(&self) -> &str {
        &self.name
    }
    fn attach(&mut self, ctl: &mut dyn DmControl) -> Result<(), ClaimError> {
        ctl.map_all(&self.claims)
    }
    fn handle(&mut self, _: u32, req: &Ioreq, ctl: &mut dyn DmControl) -> Result<u64, DmError> {
        // A flood of claims and releases on every request.
        for i in 0..100u64 {
            let r = Claim::Range(IoRange::new(
                RangeKind::Mmio,
                0xd000_0000 + i * 0x1000,
                0xd000_0fff + i * 0x1000,
            ));
            ctl.map(r.clone()).map_err(|e| DmError::Failed {
                name: self.name.clone(),
                msg: e.to_string(),
            })?;
            ctl.unmap(r).map_err(|e| DmError::Failed {
                name: self.name.clone(),
                msg: e.to_string(),
            })?;
        }
        // And one claim of somebody else's ports, which must fail.
        let stolen = ctl.map(Claim::Range(IoRange::ports(0xcf8, 0xcff)));
        assert!(
            matches!(stolen, Err(ClaimError::Conflict { .. })),
            "{stolen:?}"
        );
        Ok(req.addr)
    }
}

#[test]
fn a_flood_of_claims_leaves_the_tables_consistent() {
    let log: DeliveryLog = Arc::new(Mutex::new(vec![]));
    let mut models = topology(&log);
    models.push(Box::new(Rogue {
        name: "rogue".into(),
        claims: vec![Claim::Range(IoRange::ports(0x7000, 0x70ff))],
    }));
    let mut g = Guest::new(models, &EngineConfig::default());
    for i in 0..50 {
        assert_eq!(g.inb(0x7000 + i, 1), u64::from(0x7000 + i) & 0xff);
    }
    let r = g.engine.router();
    let rogue: Vec<_> = r
        .mmio_ranges()
        .into_iter()
        .filter(|(_, _, o)| r.server_name(*o) == "rogue")
        .collect();
    assert!(rogue.is_empty(), "every claim was released: {rogue:x?}");
    assert_eq!(
        g.hv.server_ranges(0, RangeKind::Mmio),
        vec![],
        "and unclaimed from the hypervisor"
    );
    assert!(g.hv.check().is_ok());
}

#[test]
fn claims_outside_a_grant_are_refused() {
    let hv = SimHypervisor::new(1, Duration::from_secs(1));
    let backend = hv.create_server(BufioreqMode::Off).unwrap();
    let mut e = ioreq_mux_engine::Engine::new(backend, vec![], &EngineConfig::default()).unwrap();
    let grant = Grant {
        ranges: vec![IoRange::ports(0x7000, 0x70ff)],
        positions: vec![],
        ..Grant::default()
    };
    let ok = Rogue {
        name: "ok".into(),
        claims: vec![Claim::Range(IoRange::ports(0x7000, 0x700f))],
    };
    e.add_model_granted(Box::new(ok), Some(grant.clone()))
        .unwrap();
    let bad = Rogue {
        name: "greedy".into(),
        claims: vec![Claim::Range(IoRange::ports(0x6ff0, 0x7010))],
    };
    let err = e
        .add_model_granted(Box::new(bad), Some(grant.clone()))
        .unwrap_err();
    assert!(err.to_string().contains("outside its grant"), "{err}");
    let p = Rogue {
        name: "sneaky".into(),
        claims: vec![Claim::Position(match pos(&[(2, 0), (0, 0)]) {
            ioreq_mux_models::Placement::Position(p) => p,
            ioreq_mux_models::Placement::Bdf(_) => unreachable!(),
        })],
    };
    assert!(e.add_model_granted(Box::new(p), Some(grant)).is_err());
    assert_eq!(
        e.router()
            .port_ranges()
            .iter()
            .filter(|r| r.0 == 0x6ff0)
            .count(),
        0
    );
}

#[test]
fn a_server_that_breaks_the_slot_protocol_is_reported_not_trusted() {
    let hv = SimHypervisor::new(2, Duration::from_millis(200));
    let mut s = hv.create_server(BufioreqMode::Off).unwrap();
    s.map_range(IoRange::ports(0x80, 0x8f)).unwrap();
    s.set_enabled(true).unwrap();
    // Completing a request that was never taken.
    assert!(s.complete(0, 1).is_err());
    // A changed event channel: the next request to that vCPU fails like Xen's "bad event
    // channel" instead of being delivered.
    hv.issue(1, &Ioreq::new(IoreqType::Pio, Dir::Read, 0x80, 1, 0), false)
        .unwrap();
    let mut ev = vec![];
    s.wait(Some(Duration::ZERO), &mut ev).unwrap();
    assert!(matches!(ev[0], BackendEvent::Request { vcpu: 1, .. }));
    s.write_vp_eport(1, 4242);
    s.complete(1, 7).unwrap();
    assert_eq!(hv.collect(1).unwrap(), Some(7));
    let r = hv.issue(1, &Ioreq::new(IoreqType::Pio, Dir::Read, 0x80, 1, 0), false);
    assert!(
        matches!(r, Err(SimError::BadEventChannel { server: 0, vcpu: 1 })),
        "{r:?}"
    );
    let v = hv.check().unwrap_err();
    assert!(
        v.iter().any(|m| m.contains("vp_eport"))
            && v.iter().any(|m| m.contains("completed vCPU 0")),
        "{v:?}"
    );
}

#[test]
fn config_and_cli_errors_name_the_file_line_and_field() {
    let dir = std::env::temp_dir().join(format!("ioreq-mux-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("bad.toml");
    std::fs::write(
        &f,
        "[[server]]\nname = \"x\"\nowns.mmio = [\"0xfee00000+0x0\"]\n",
    )
    .unwrap();
    let e = ioreq_mux_config::Config::load(&f).unwrap_err().to_string();
    assert!(
        e.contains("bad.toml:3:") && e.contains("owns.mmio[0]") && e.contains("zero length"),
        "{e}"
    );
    let e = ioreq_mux_config::Config::load(&dir.join("missing.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.toml"), "{e}");
    let _ = FunctionSpec::endpoint(0, 0, 0);
    let _ = EmulatedModel::new("x");
}
