//! The engine's own tests: chipset detection, PM blocks, guest buffers, extended registers
//! and the control channel, through the simulated hypervisor.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test
use super::*;
use chipset_intercept::Phase;
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::sim::{Issued, SimBackend, SimHypervisor};
use ioreq_server::{
    Dir, DmControl, DmError, Ioreq, IoreqType, MsiError, Position, RangeKind, abi, size_mask,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a [`Chip`] saw: every request, and whether its own PM-block claim succeeded.
#[derive(Default)]
struct Seen {
    requests: Vec<Ioreq>,
    pm_claims: Vec<Result<(), ClaimError>>,
}

/// An i440FX + PIIX3 + PIIX4 as QEMU is in Xen: owns bus 0's chipset functions, answers
/// their IDs, and while the guest enables PIIX4's PM I/O space maps the PM block's
/// registers itself, one range each, moving them with PMBA (QEMU's memory listener does,
/// during the config write).
struct Chip {
    name: &'static str,
    claims: Vec<Claim>,
    pmba: u64,
    pm_enabled: bool,
    /// Answer IDs no chipset has.
    unknown_ids: bool,
    seen: Arc<Mutex<Seen>>,
}

fn chip(name: &'static str, claims: Vec<Claim>) -> (Chip, Arc<Mutex<Seen>>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let c = Chip {
        name,
        claims,
        pmba: 1,
        pm_enabled: false,
        unknown_ids: false,
        seen: seen.clone(),
    };
    (c, seen)
}

const PIIX4_PM: &str = "00:01.3";
/// QEMU's PIIX4 PM registers inside the block: PM1a event, control, timer.
const PM_PIECES: [(u16, u16); 3] = [(0, 3), (4, 5), (8, 0xb)];

impl Chip {
    /// Maps or unmaps the PM registers at the current base; records each result.
    fn pm_regions(&mut self, map: bool, ctl: &mut dyn DmControl) {
        let base = (self.pmba & 0xffc0) as u16;
        for (a, b) in PM_PIECES {
            let c = Claim::Range(IoRange::ports(base + a, base + b));
            let r = if map { ctl.map(c) } else { ctl.unmap(c) };
            self.seen.lock().unwrap().pm_claims.push(r);
        }
    }
}

impl DeviceModel for Chip {
    fn name(&self) -> &str {
        self.name
    }
    fn attach(&mut self, ctl: &mut dyn DmControl) -> Result<(), ClaimError> {
        ctl.map_all(&self.claims)
    }
    fn handle(&mut self, _: u32, req: &Ioreq, ctl: &mut dyn DmControl) -> Result<u64, DmError> {
        self.seen.lock().unwrap().requests.push(*req);
        if req.ty != IoreqType::PciConfig {
            return Ok(0x5a);
        }
        let (sbdf, reg) = abi::split_pci_config_addr(req.addr);
        let f = Sbdf::from_xen(sbdf).to_string();
        let pm = f == format!("0000:{PIIX4_PM}");
        match (req.dir, f.as_str(), reg) {
            (Dir::Read, _, 0) if self.unknown_ids => Ok(0x1234_1af4),
            (Dir::Read, "0000:00:00.0", 0) => Ok(0x1237_8086),
            (Dir::Read, "0000:00:01.0", 0) => Ok(0x7000_8086),
            (Dir::Read, _, 0) if pm => Ok(0x7113_8086),
            (Dir::Read, _, 0x40) if pm => Ok(self.pmba),
            (Dir::Write, _, 0x40) if pm => {
                if self.pm_enabled {
                    self.pm_regions(false, ctl);
                }
                self.pmba = req.data;
                if self.pm_enabled {
                    self.pm_regions(true, ctl);
                }
                Ok(0)
            }
            (Dir::Write, _, 0x80) if pm => {
                let on = req.data & 1 != 0;
                if on != self.pm_enabled {
                    self.pm_enabled = on;
                    self.pm_regions(on, ctl);
                }
                Ok(0)
            }
            _ => Ok(0),
        }
    }
}

fn engine(pm: Phase) -> (SimHypervisor, Engine<SimBackend>) {
    let hv = SimHypervisor::new(2, Duration::from_secs(5));
    let backend = hv.create_server(BufioreqMode::Off).unwrap();
    let cfg = EngineConfig {
        intercepts: InterceptConfig {
            pm: Some(pm),
            ..InterceptConfig::default()
        },
        ..EngineConfig::default()
    };
    let e = Engine::new(backend, vec![], &cfg).unwrap();
    hv.set_server_enabled(e.backend().id(), true).unwrap();
    (hv, e)
}

/// One guest access through the simulated hypervisor and the engine.
fn access(hv: &SimHypervisor, e: &mut Engine<SimBackend>, req: Ioreq) -> u64 {
    match hv.issue(0, &req, false).unwrap() {
        Issued::Done(v) => v,
        Issued::Pending => {
            e.poll(Some(Duration::ZERO)).unwrap();
            hv.collect(0)
                .unwrap()
                .expect("the engine completed the access")
        }
    }
}

fn cfg_write(hv: &SimHypervisor, e: &mut Engine<SimBackend>, f: &str, reg: u8, size: u32, v: u64) {
    let s: Sbdf = f.parse().unwrap();
    let cf8 = 0x8000_0000 | s.to_xen() << 8 | u32::from(reg & 0xfc);
    access(
        hv,
        e,
        Ioreq::new(IoreqType::Pio, Dir::Write, 0xcf8, 4, cf8.into()),
    );
    let port = 0xcfc + u64::from(reg & 3);
    access(hv, e, Ioreq::new(IoreqType::Pio, Dir::Write, port, size, v));
}

/// A read of the CF8 latch: an access that reaches the engine and no model.
fn cf8_read() -> Ioreq {
    Ioreq::new(IoreqType::Pio, Dir::Read, 0xcf8, 4, 0)
}

fn segment0() -> Claim {
    Claim::Range(IoRange::new(RangeKind::Pci, 0, 0xffff))
}

/// QEMU joins after the engine started (through the device-model socket): nothing knew the
/// chipset then. It is detected at the first guest access after QEMU claimed functions,
/// not while QEMU is still setting up (it serves nothing until its main loop runs).
#[test]
fn a_chipset_that_joins_later_is_detected_at_the_next_guest_access() {
    let (hv, mut e) = engine(Phase::Before);
    assert_eq!(e.chipset(), Chipset::Unknown);
    let (qemu, seen) = chip("qemu", vec![segment0()]);
    e.add_model_granted(Box::new(qemu), None).unwrap();
    assert_eq!(e.chipset(), Chipset::Unknown);
    assert!(
        seen.lock().unwrap().requests.is_empty(),
        "probed during attach"
    );
    access(&hv, &mut e, cf8_read());
    assert_eq!(e.chipset(), Chipset::I440fx);
    assert!(
        !e.intercepts().snapshot().is_empty(),
        "PIIX4 PM intercept installed"
    );
    // Once known, nothing probes again.
    let n = seen.lock().unwrap().requests.len();
    access(&hv, &mut e, cf8_read());
    assert_eq!(seen.lock().unwrap().requests.len(), n);
    assert!(hv.check().is_ok());
}

/// Nobody owns a known chipset: detection runs once per change of PCI claims, not at every
/// access.
#[test]
fn detection_waits_for_new_claims() {
    let (hv, mut e) = engine(Phase::Before);
    let (mut other, seen) = chip("other", vec![segment0()]);
    other.unknown_ids = true;
    e.add_model_granted(Box::new(other), None).unwrap();
    access(&hv, &mut e, cf8_read());
    let probes = seen.lock().unwrap().requests.len();
    assert!(probes > 0);
    assert_eq!(e.chipset(), Chipset::Unknown);
    for _ in 0..3 {
        access(&hv, &mut e, cf8_read());
    }
    assert_eq!(
        seen.lock().unwrap().requests.len(),
        probes,
        "probed again without new claims"
    );
    let (late, _) = chip("late", vec![Claim::Range(IoRange::pci(0x1_0000))]);
    e.add_model_granted(Box::new(late), None).unwrap();
    access(&hv, &mut e, cf8_read());
    assert_eq!(
        seen.lock().unwrap().requests.len(),
        2 * probes,
        "a new claim: probed again"
    );
}

/// hvmloader's PM base (PMBA 0xb001, then PMREGMISC enable) with a `before` intercept: the
/// block is claimed for QEMU before QEMU sees the enabling write, and QEMU's own maps of
/// its registers inside it during that write find them in place instead of failing.
#[test]
fn pm_block_before_the_model_then_the_model_maps_it_too() {
    let (hv, mut e) = engine(Phase::Before);
    let (qemu, seen) = chip("qemu", vec![segment0()]);
    let q = e.add_model_granted(Box::new(qemu), None).unwrap();
    cfg_write(&hv, &mut e, PIIX4_PM, 0x40, 4, 0xb001);
    cfg_write(&hv, &mut e, PIIX4_PM, 0x80, 1, 1);
    assert_eq!(e.chipset(), Chipset::I440fx);
    let block = IoRange::ports(0xb000, 0xb03f);
    assert_eq!(seen.lock().unwrap().pm_claims, vec![Ok(()); 3]);
    assert!(e.router().holds_exactly(q, &block));
    let claimed = hv.server_ranges(e.backend().id(), RangeKind::Port);
    assert!(claimed.contains(&(0xb000, 0xb03f)), "{claimed:x?}");
    assert!(
        e.layout_history()
            .iter()
            .any(|ev| matches!(ev, LayoutEvent::PmBlock { new: Some(r), .. } if *r == block))
    );
    // A port access there reaches QEMU.
    assert_eq!(
        access(
            &hv,
            &mut e,
            Ioreq::new(IoreqType::Pio, Dir::Read, 0xb004, 2, 0)
        ),
        0x5a
    );
    // The guest moves the block: the engine's claim moves with it (before QEMU moves its
    // registers: its unmaps of the old ones are refused, its maps of the new ones are in
    // place).
    cfg_write(&hv, &mut e, PIIX4_PM, 0x40, 4, 0xc001);
    assert!(e.router().holds_exactly(q, &IoRange::ports(0xc000, 0xc03f)));
    assert!(e.router().port_owner(0xb000, 0xb000).is_none());
    assert_eq!(
        hv.server_ranges(e.backend().id(), RangeKind::Port)
            .iter()
            .filter(|r| r.0 >= 0xb000)
            .count(),
        1
    );
    let claims = seen.lock().unwrap().pm_claims.clone();
    assert_eq!(
        claims[6..].iter().filter(|r| r.is_ok()).count(),
        3,
        "{claims:?}"
    );
    assert!(hv.check().is_ok());
}

/// With an `after` intercept the model maps the block first; the intercept finds it in
/// place and neither claims nor later releases it.
#[test]
fn pm_block_after_a_model_that_mapped_it_itself() {
    let (hv, mut e) = engine(Phase::After);
    let (qemu, seen) = chip("qemu", vec![segment0()]);
    let q = e.add_model_granted(Box::new(qemu), None).unwrap();
    cfg_write(&hv, &mut e, PIIX4_PM, 0x40, 4, 0xb001);
    cfg_write(&hv, &mut e, PIIX4_PM, 0x80, 1, 1);
    assert_eq!(seen.lock().unwrap().pm_claims, vec![Ok(()); 3]);
    assert!(e.router().holds_exactly(q, &IoRange::ports(0xb004, 0xb005)));
    assert!(!e.router().holds_exactly(q, &IoRange::ports(0xb000, 0xb03f)));
    assert!(
        !e.layout_history()
            .iter()
            .any(|ev| ev.to_string().starts_with("refused"))
    );
    // Disabling: the model's own claims stay the model's business (it unmaps them).
    cfg_write(&hv, &mut e, PIIX4_PM, 0x80, 1, 0);
    assert_eq!(seen.lock().unwrap().pm_claims, vec![Ok(()); 6]);
    assert!(e.router().port_owner(0xb004, 0xb005).is_none());
    assert!(hv.check().is_ok());
}

/// A rep string access through a guest buffer reaches a model that maps guest memory,
/// unchanged (the pointer in `data`); any other model never sees it.
#[test]
fn guest_buffers_reach_only_models_that_map_guest_memory() {
    let (_hv, mut e) = engine(Phase::After);
    let (qemu, qseen) = chip("qemu", vec![Claim::Range(IoRange::ports(0x1f0, 0x1f7))]);
    let grant = Grant {
        ranges: vec![IoRange::ports(0, 0xffff)],
        guest_memory: true,
        ..Grant::default()
    };
    e.add_model_granted(Box::new(qemu), Some(grant)).unwrap();
    let (other, oseen) = chip("other", vec![Claim::Range(IoRange::ports(0x170, 0x177))]);
    e.add_model_granted(Box::new(other), None).unwrap();
    let mut insw = Ioreq::new(IoreqType::Pio, Dir::Read, 0x1f0, 2, 0x0012_3000);
    insw.count = 256;
    insw.data_is_ptr = true;
    e.handle(0, &insw);
    let got = qseen.lock().unwrap().requests.clone();
    assert_eq!(got, vec![insw], "QEMU gets the request as Xen sent it");
    let mut other_insw = insw;
    other_insw.addr = 0x170;
    e.handle(0, &other_insw);
    assert!(oseen.lock().unwrap().requests.is_empty());
    assert_eq!(e.stats().data_ptr_unsupported, 1);
}

/// A model with conventional PCI's 256 bytes (QEMU) is never asked past them: extended
/// registers read all ones and writes are dropped, counted apart from master aborts.
#[test]
fn extended_registers_of_a_256_byte_model_never_reach_it() {
    let (_hv, mut e) = engine(Phase::After);
    let (qemu, seen) = chip("qemu", vec![Claim::Range(IoRange::pci(0x08))]);
    let grant = Grant {
        ranges: vec![IoRange::new(RangeKind::Pci, 0, 0xffff)],
        config_space: Some(0x100),
        ..Grant::default()
    };
    e.add_model_granted(Box::new(qemu), Some(grant)).unwrap();
    let (pcie, pseen) = chip("pcie", vec![Claim::Range(IoRange::pci(0x10))]);
    e.add_model_granted(Box::new(pcie), None).unwrap();
    let read = |sbdf: u32, reg: u32| Ioreq::pci_config(sbdf, reg, Dir::Read, 4, 0);
    assert_eq!(e.handle(0, &read(0x08, 0x100)), 0xffff_ffff);
    e.handle(0, &Ioreq::pci_config(0x08, 0x148, Dir::Write, 4, 0x1234));
    assert!(seen.lock().unwrap().requests.is_empty());
    assert_eq!(e.stats().beyond_config_space, 2);
    assert_eq!(e.stats().master_aborts, 0);
    e.handle(0, &read(0x08, 0xfc));
    assert_eq!(seen.lock().unwrap().requests.len(), 1, "0xfc is inside");
    // A model with 4 KiB (the default) gets its extended registers.
    e.handle(0, &read(0x10, 0x100));
    assert_eq!(pseen.lock().unwrap().requests.len(), 1);
}

/// A control message rings the engine's wake fd; applying it clears the fd.
#[test]
fn control_messages_wake_a_sleeping_backend() {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    let (_hv, mut e) = engine(Phase::After);
    let readable = |e: &Engine<SimBackend>| {
        let mut fds = [PollFd::new(e.control_wake_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).unwrap() == 1
    };
    let tx = e.control();
    assert!(!readable(&e));
    tx.send(Control::Remove { model: 7 }).unwrap();
    assert!(readable(&e));
    e.poll(Some(Duration::ZERO)).unwrap();
    assert!(!readable(&e));
}

// --- claims.rs ---------------------------------------------------------------------------

/// A grant admits a range claim inside one granted range of its kind, and a position claim
/// only as granted.
#[test]
fn a_grant_admits_only_what_it_lists() {
    let at = |last: u8| Position {
        segment: 0,
        root_bus: 0,
        path: vec![6 << 3, last],
    };
    let pos = at(1 << 3); // 00:06.0/01.0
    let g = Grant {
        ranges: vec![IoRange::ports(0x100, 0x1ff), IoRange::pci(0x28)],
        positions: vec![pos.clone()],
        ..Grant::default()
    };
    assert!(g.allows(&Claim::Range(IoRange::ports(0x100, 0x1ff))));
    assert!(g.allows(&Claim::Range(IoRange::ports(0x180, 0x181))));
    assert!(
        !g.allows(&Claim::Range(IoRange::ports(0x1ff, 0x200))),
        "crosses the end"
    );
    assert!(
        !g.allows(&Claim::Range(IoRange::mmio(0x100, 0x1ff))),
        "another kind"
    );
    assert!(g.allows(&Claim::Range(IoRange::pci(0x28))));
    assert!(!g.allows(&Claim::Range(IoRange::pci(0x30))));
    assert!(g.allows(&Claim::Position(pos)));
    assert!(!g.allows(&Claim::Position(at(2 << 3))));
}

/// A model whose initial claims overlap another's is refused with the conflict, and the
/// claims it made before the conflicting one are not left behind.
#[test]
fn a_conflicting_model_is_refused_whole() {
    let (hv, mut e) = engine(Phase::After);
    let (first, _) = chip("first", vec![Claim::Range(IoRange::ports(0x500, 0x50f))]);
    let a = e.add_model(Box::new(first)).unwrap();
    let (second, _) = chip(
        "second",
        vec![
            Claim::Range(IoRange::ports(0x600, 0x60f)),
            Claim::Range(IoRange::ports(0x508, 0x508)),
        ],
    );
    let err = e.add_model(Box::new(second)).unwrap_err();
    let EngineError::Attach { model, source } = err else {
        panic!("not an attach error: {err}")
    };
    assert_eq!(model, "second");
    assert!(matches!(source, ClaimError::Conflict { .. }), "{source}");
    assert_eq!(e.router().port_owner(0x500, 0x50f), Some(a));
    assert_eq!(
        e.router().port_owner(0x600, 0x60f),
        None,
        "first claim rolled back"
    );
    let ports = hv.server_ranges(e.backend().id(), RangeKind::Port);
    assert!(!ports.contains(&(0x600, 0x60f)), "{ports:x?}");
}

/// A model that leaves releases its claims with the router and the hypervisor; its ports
/// then master-abort.
#[test]
fn a_removed_model_releases_its_claims() {
    let (hv, mut e) = engine(Phase::After);
    let (m, seen) = chip("m", vec![Claim::Range(IoRange::ports(0x700, 0x703))]);
    let idx = e.add_model(Box::new(m)).unwrap();
    let read = Ioreq::new(IoreqType::Pio, Dir::Read, 0x700, 1, 0);
    assert_eq!(access(&hv, &mut e, read), 0x5a);
    let gone = e.remove_model(idx);
    assert_eq!(gone, vec![Claim::Range(IoRange::ports(0x700, 0x703))]);
    assert_eq!(e.router().port_owner(0x700, 0x703), None);
    let ports = hv.server_ranges(e.backend().id(), RangeKind::Port);
    assert!(!ports.contains(&(0x700, 0x703)), "{ports:x?}");
    assert_eq!(seen.lock().unwrap().requests.len(), 1);
    assert!(
        e.remove_model(idx).is_empty(),
        "removing twice does nothing"
    );
}

/// A device that raises an MSI when the guest writes its 32-bit register at `port`: the value
/// is the Message Data, sent to a fixed Message Address; what `inject_msi` answered is kept.
struct MsiDevice {
    port: u16,
    sent: Sent,
}

/// The Message Address Linux programs for vector delivery to APIC 1 (0xfee0_100c).
const MSI_ADDR: u64 = 0xfee0_100c;

impl DeviceModel for MsiDevice {
    fn name(&self) -> &str {
        "doorbell"
    }
    fn attach(&mut self, ctl: &mut dyn DmControl) -> Result<(), ClaimError> {
        ctl.map(Claim::Range(IoRange::ports(self.port, self.port + 3)))
    }
    fn handle(&mut self, _: u32, req: &Ioreq, ctl: &mut dyn DmControl) -> Result<u64, DmError> {
        if req.dir == Dir::Write {
            let r = ctl.inject_msi(MSI_ADDR, req.data as u32);
            self.sent.lock().unwrap().push(r);
        }
        Ok(0)
    }
}

type Sent = Arc<Mutex<Vec<Result<(), MsiError>>>>;

fn msi_device(port: u16) -> (Box<dyn DeviceModel>, Sent) {
    let sent = Arc::new(Mutex::new(vec![]));
    let d = MsiDevice {
        port,
        sent: sent.clone(),
    };
    (Box::new(d), sent)
}

/// An MSI a model injects while it serves a request reaches the hypervisor as the engine's
/// server's (not another server of the domain), is counted, and so is one sent outside a
/// request through the control channel; a model that left cannot send one.
#[test]
fn a_model_injects_msis_through_the_engine_server() {
    let (hv, mut e) = engine(Phase::After);
    let _other = hv.create_server(BufioreqMode::Off).unwrap();
    let (m, sent) = msi_device(0x710);
    let idx = e.add_model(m).unwrap();
    let ring = |v| Ioreq::new(IoreqType::Pio, Dir::Write, 0x710, 4, v);
    access(&hv, &mut e, ring(0x4071));
    access(&hv, &mut e, ring(0x4072));
    assert_eq!(*sent.lock().unwrap(), vec![Ok(()), Ok(())]);
    let tx = e.control();
    let (reply, answer) = crossbeam_channel::bounded(2);
    let msg = |model, data| Control::InjectMsi {
        model,
        addr: MSI_ADDR,
        data,
        reply: reply.clone(),
    };
    tx.send(msg(idx, 0x4073)).unwrap();
    tx.send(msg(99, 0x4074)).unwrap();
    e.poll(Some(Duration::ZERO)).unwrap();
    assert_eq!(answer.try_recv().unwrap(), Ok(()));
    assert_eq!(
        answer.try_recv().unwrap(),
        Err(MsiError::NoModel { index: 99 })
    );
    let server = e.backend().id();
    let got: Vec<(u16, u64, u32)> = hv
        .injected_msis()
        .iter()
        .map(|m| (m.server, m.addr, m.data))
        .collect();
    assert_eq!(
        got,
        vec![
            (server, MSI_ADDR, 0x4071),
            (server, MSI_ADDR, 0x4072),
            (server, MSI_ADDR, 0x4073)
        ]
    );
    assert_eq!((e.stats().msis_injected, e.stats().msi_errors), (3, 0));
    assert!(hv.check().is_ok());
}

/// The hypervisor's refusal reaches the model typed: a backend that cannot interrupt the
/// guest is "not supported", a server that is gone is the backend's error; both counted.
#[test]
fn a_refused_msi_tells_the_model_why() {
    /// The simulated backend without MSIs: `Backend::inject_msi`'s default.
    struct NoMsi(SimBackend);
    impl Backend for NoMsi {
        fn nr_vcpus(&self) -> u32 {
            self.0.nr_vcpus()
        }
        fn map_range(&mut self, r: IoRange) -> Result<(), BackendError> {
            self.0.map_range(r)
        }
        fn unmap_range(&mut self, r: IoRange) -> Result<(), BackendError> {
            self.0.unmap_range(r)
        }
        fn wait(
            &mut self,
            t: Option<Duration>,
            out: &mut Vec<BackendEvent>,
        ) -> Result<(), BackendError> {
            self.0.wait(t, out)
        }
        fn complete(&mut self, vcpu: u32, data: u64) -> Result<(), BackendError> {
            self.0.complete(vcpu, data)
        }
    }
    let hv = SimHypervisor::new(1, Duration::from_secs(5));
    let backend = NoMsi(hv.create_server(BufioreqMode::Off).unwrap());
    let (m, sent) = msi_device(0x720);
    let mut e = Engine::new(backend, vec![m], &EngineConfig::default()).unwrap();
    e.handle(0, &Ioreq::new(IoreqType::Pio, Dir::Write, 0x720, 4, 1));
    let r = sent.lock().unwrap().pop().unwrap();
    assert!(matches!(r, Err(MsiError::Unsupported { .. })), "{r:?}");
    assert!(hv.injected_msis().is_empty());
    assert_eq!(e.stats().msi_errors, 1);

    let (hv, mut e) = engine(Phase::After);
    let (m, sent) = msi_device(0x730);
    e.add_model(m).unwrap();
    hv.destroy_server(e.backend().id()).unwrap();
    e.handle(0, &Ioreq::new(IoreqType::Pio, Dir::Write, 0x730, 4, 2));
    let r = sent.lock().unwrap().pop().unwrap();
    assert_eq!(
        r,
        Err(MsiError::Backend {
            addr: MSI_ADDR,
            data: 2,
            source: BackendError::Disconnected
        })
    );
    assert_eq!((e.stats().msis_injected, e.stats().msi_errors), (0, 1));
}

// --- dispatch.rs -------------------------------------------------------------------------

/// Configuration space nobody owns master-aborts: reads all ones at the access size,
/// writes dropped, each counted; CF8 and ECAM both.
#[test]
fn unowned_functions_master_abort() {
    let (hv, mut e) = engine(Phase::After);
    let (qemu, seen) = chip("qemu", vec![Claim::Range(IoRange::pci(0x00))]);
    e.add_model(Box::new(qemu)).unwrap();
    let missing = 0x0000_0100; // 00:01.0
    for size in [1, 2, 4] {
        let r = Ioreq::pci_config(missing, 0, Dir::Read, size, 0);
        assert_eq!(e.handle(0, &r), size_mask(size), "size {size}");
    }
    e.handle(0, &Ioreq::pci_config(missing, 4, Dir::Write, 2, 6));
    assert_eq!(e.stats().master_aborts, 4);
    // Through the CF8 latch as a guest does it.
    cfg_write(&hv, &mut e, "00:01.0", 0x04, 2, 6);
    assert_eq!(e.stats().master_aborts, 5);
    // QEMU was asked about its own function only (chipset detection reads 00:00.0's IDs).
    let asked: Vec<u32> = seen
        .lock()
        .unwrap()
        .requests
        .iter()
        .map(|r| abi::split_pci_config_addr(r.addr).0)
        .collect();
    assert!(asked.iter().all(|&s| s == 0), "{asked:x?}");
}

/// An ioreq that does not validate (a size Xen never sends) is answered once, as a master
/// abort, and counted as malformed; the vCPU is not left waiting.
#[test]
fn a_malformed_request_is_answered_once() {
    let (hv, mut e) = engine(Phase::After);
    let (m, seen) = chip("m", vec![Claim::Range(IoRange::ports(0x700, 0x703))]);
    e.add_model(Box::new(m)).unwrap();
    let bad = Ioreq::new(IoreqType::Pio, Dir::Read, 0x700, 3, 0);
    let v = e.handle(0, &bad);
    assert_eq!(v & 0xff_ffff, 0xff_ffff);
    assert_eq!(e.stats().malformed, 1);
    assert!(seen.lock().unwrap().requests.is_empty());
    assert!(hv.check().is_ok());
}

// --- layout.rs ---------------------------------------------------------------------------

/// A window from the configuration is routed by the engine and claimed from the hypervisor
/// as MMIO; a second window over the same addresses stops the engine from starting.
#[test]
fn configured_ecam_windows_are_claimed_and_checked() {
    let hv = SimHypervisor::new(1, Duration::from_secs(5));
    let w = EcamWindow::new(1, 0xe000_0000, 0, 0x3f).unwrap();
    let cfg = EngineConfig {
        ecam: vec![w],
        chipset: Some(Chipset::Unknown),
        ..EngineConfig::default()
    };
    let e = Engine::new(hv.create_server(BufioreqMode::Off).unwrap(), vec![], &cfg).unwrap();
    assert_eq!(e.router().windows(), &[w]);
    let mmio = hv.server_ranges(e.backend().id(), RangeKind::Mmio);
    assert!(
        mmio.contains(&(0xe000_0000, 0xe000_0000 + 0x40 * (1 << 20) - 1)),
        "{mmio:x?}"
    );
    let clash = EcamWindow::new(2, 0xe010_0000, 0, 0x0f).unwrap();
    let cfg = EngineConfig {
        ecam: vec![w, clash],
        ..cfg
    };
    let err = Engine::new(hv.create_server(BufioreqMode::Off).unwrap(), vec![], &cfg).unwrap_err();
    assert!(
        matches!(
            err,
            EngineError::Window {
                hypervisor: false,
                ..
            }
        ),
        "{err}"
    );
}
