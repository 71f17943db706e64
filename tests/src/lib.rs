//! Helpers for end-to-end tests: a guest that drives the simulated hypervisor through the
//! whole multiplexer, one access at a time, on one thread.

use bdf_router::{EcamWindow, Sbdf};
use ioreq_mux_engine::{Engine, EngineConfig};
use ioreq_mux_models::{
    BarKind, DeliveryLog, EmulatedModel, FunctionKind, FunctionSpec, Placement,
};
use ioreq_server::Position;
use ioreq_server::bufioreq::BufioreqMode;
use ioreq_server::sim::{Issued, SimBackend, SimHypervisor};
use ioreq_server::{DeviceModel, Dir, Ioreq, IoreqType};
use std::time::Duration;

/// How a configuration access is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    Cf8,
    Ecam,
}

/// A scripted guest: the simulated hypervisor, the engine serving it, and the current ECAM
/// base as the guest believes it to be.
#[derive(Debug)]
pub struct Guest {
    pub hv: SimHypervisor,
    pub engine: Engine<SimBackend>,
    pub ecam: Option<EcamWindow>,
    pub vcpu: u32,
}

impl Guest {
    /// One vCPU, the engine as the only ioreq server, enabled.
    pub fn new(models: Vec<Box<dyn DeviceModel>>, cfg: &EngineConfig) -> Self {
        let hv = SimHypervisor::new(2, Duration::from_secs(5));
        let backend = hv
            .create_server(BufioreqMode::Atomic)
            .expect("a server slot is free");
        let engine = Engine::new(backend, models, cfg).expect("engine starts");
        engine.backend().set_enabled(true).expect("enable");
        Guest {
            hv,
            engine,
            ecam: None,
            vcpu: 0,
        }
    }

    /// One guest access through hypervisor -> engine -> model -> back.
    pub fn access(&mut self, req: Ioreq) -> u64 {
        match self
            .hv
            .issue(self.vcpu, &req, false)
            .expect("access issued")
        {
            Issued::Done(v) => v,
            Issued::Pending => {
                self.engine
                    .poll(Some(Duration::ZERO))
                    .expect("engine polls");
                self.hv
                    .collect(self.vcpu)
                    .expect("collect")
                    .expect("the engine completed the access")
            }
        }
    }

    pub fn outb(&mut self, port: u16, size: u32, v: u64) {
        self.access(Ioreq::new(IoreqType::Pio, Dir::Write, port.into(), size, v));
    }

    pub fn inb(&mut self, port: u16, size: u32) -> u64 {
        self.access(Ioreq::new(IoreqType::Pio, Dir::Read, port.into(), size, 0))
    }

    pub fn mmio_read(&mut self, addr: u64, size: u32) -> u64 {
        self.access(Ioreq::new(IoreqType::Copy, Dir::Read, addr, size, 0))
    }

    pub fn mmio_write(&mut self, addr: u64, size: u32, v: u64) {
        self.access(Ioreq::new(IoreqType::Copy, Dir::Write, addr, size, v));
    }

    /// Reads a configuration register the way firmware does.
    pub fn cfg_read(&mut self, path: Path, sbdf: Sbdf, reg: u16, size: u32) -> u64 {
        match path {
            Path::Cf8 => {
                self.outb(0xcf8, 4, cf8_value(sbdf, reg));
                self.inb(0xcfc + (reg & 3), size)
            }
            Path::Ecam => {
                let w = self.ecam.expect("ECAM window programmed");
                let a = w.address_of(sbdf, reg).expect("bus inside the window");
                self.mmio_read(a, size)
            }
        }
    }

    pub fn cfg_write(&mut self, path: Path, sbdf: Sbdf, reg: u16, size: u32, v: u64) {
        match path {
            Path::Cf8 => {
                self.outb(0xcf8, 4, cf8_value(sbdf, reg));
                self.outb(0xcfc + (reg & 3), size, v);
            }
            Path::Ecam => {
                let w = self.ecam.expect("ECAM window programmed");
                let a = w.address_of(sbdf, reg).expect("bus inside the window");
                self.mmio_write(a, size, v);
            }
        }
    }
}

/// Parses a BDF in tests.
pub fn bdf(t: &str) -> Sbdf {
    t.parse().unwrap_or_else(|e| panic!("bad BDF {t}: {e}"))
}

const MCH: (u16, u16) = (0x8086, 0x29c0);
const LPC: (u16, u16) = (0x8086, 0x2918);

pub fn pos(path: &[(u8, u8)]) -> Placement {
    Placement::Position(Position {
        segment: 0,
        root_bus: 0,
        path: path.iter().map(|(d, f)| d << 3 | f).collect(),
    })
}

pub fn at(t: &str) -> Placement {
    Placement::Bdf(bdf(t).to_xen())
}

/// The chipset model (MCH, LPC, two root ports, a switch, a PCIe-to-PCI bridge and two
/// endpoints) and a "vgpu" model owning one endpoint behind the switch.
pub fn topology(log: &DeliveryLog) -> Vec<Box<dyn ioreq_server::DeviceModel>> {
    let rp = FunctionSpec::bridge(0x1b36, 0x000c, FunctionKind::RootPort);
    let mut rp_multi = rp.clone();
    rp_multi.multifunction = true;
    let chipset = EmulatedModel::new("chipset")
        .with_function(
            at("00:00.0"),
            &FunctionSpec {
                pcie: false,
                ..FunctionSpec::endpoint(MCH.0, MCH.1, 0x060000)
            },
        )
        .with_function(
            at("00:1f.0"),
            &FunctionSpec {
                pcie: false,
                multifunction: true,
                ..FunctionSpec::endpoint(LPC.0, LPC.1, 0x060100)
            },
        )
        .with_function(at("00:02.0"), &rp_multi)
        .with_function(at("00:02.1"), &rp)
        // switch: upstream port behind 00:02.0, two downstream ports
        .with_function(
            pos(&[(2, 0), (0, 0)]),
            &FunctionSpec::bridge(0x104c, 0x8232, FunctionKind::UpstreamPort),
        )
        .with_function(
            pos(&[(2, 0), (0, 0), (0, 0)]),
            &FunctionSpec::bridge(0x104c, 0x8233, FunctionKind::DownstreamPort),
        )
        .with_function(
            pos(&[(2, 0), (0, 0), (1, 0)]),
            &FunctionSpec::bridge(0x104c, 0x8233, FunctionKind::DownstreamPort),
        )
        // an endpoint behind the second downstream port stays with the chipset model
        .with_function(
            pos(&[(2, 0), (0, 0), (1, 0), (0, 0)]),
            &FunctionSpec::endpoint(0x1af4, 0x1044, 0x00ff00).with_bar(BarKind::Mem32, 0x1000),
        )
        // PCIe-to-PCI bridge behind 00:02.1 and a conventional PCI endpoint at slot 1
        .with_function(
            pos(&[(2, 1), (0, 0)]),
            &FunctionSpec::bridge(0x1b36, 0x000e, FunctionKind::PciBridge),
        )
        .with_function(
            pos(&[(2, 1), (0, 0), (1, 0)]),
            &FunctionSpec {
                pcie: false,
                ..FunctionSpec::endpoint(0x8086, 0x100e, 0x020000).with_bar(BarKind::Io, 0x40)
            },
        )
        .with_log(log.clone());
    let vgpu = EmulatedModel::new("vgpu")
        .with_function(
            pos(&[(2, 0), (0, 0), (0, 0), (0, 0)]),
            &FunctionSpec {
                serial: 0x1122_3344_5566_7788,
                ..FunctionSpec::endpoint(0x10de, 0x1eb8, 0x030000)
                    .with_bar(BarKind::Mem64, 0x10_0000)
            },
        )
        .with_log(log.clone());
    vec![Box::new(chipset), Box::new(vgpu)]
}

/// Records every access a [`Guest`] makes, with what answered it, into a trace in the
/// project's format: a project-made trace of a scripted firmware, replayable like a QEMU one.
/// Config accesses carry the name of the model that received them as their "device"; claims
/// models make while the script runs (BARs) become BAR events.
pub struct Recorder {
    pub guest: Guest,
    log: DeliveryLog,
    writer: ioreq_mux_trace::TraceWriter<std::fs::File>,
    cf8: u32,
    ranges: Vec<(String, ioreq_server::IoRange)>,
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder").finish_non_exhaustive()
    }
}

impl Recorder {
    pub fn new(guest: Guest, log: DeliveryLog, path: &std::path::Path) -> Self {
        let meta = ioreq_mux_trace::TraceMeta {
            source: "scripted firmware (ioreq-mux tests)".into(),
            producer: "ioreq-mux-tests recorder".into(),
            extra: serde_json::Value::Null,
        };
        let file = std::fs::File::create(path).expect("create trace");
        let writer = ioreq_mux_trace::TraceWriter::new(file, &meta).expect("trace writer");
        let mut r = Recorder {
            guest,
            log,
            writer,
            cf8: 0,
            ranges: vec![],
        };
        r.ranges = r.claimed();
        r
    }

    fn claimed(&self) -> Vec<(String, ioreq_server::IoRange)> {
        use ioreq_server::{IoRange, RangeKind};
        let r = self.guest.engine.router();
        let mut v: Vec<_> = r
            .port_ranges()
            .into_iter()
            .map(|(s, e, o)| {
                (
                    r.server_name(o).to_string(),
                    IoRange::new(RangeKind::Port, s, e),
                )
            })
            .chain(r.mmio_ranges().into_iter().map(|(s, e, o)| {
                (
                    r.server_name(o).to_string(),
                    IoRange::new(RangeKind::Mmio, s, e),
                )
            }))
            .collect();
        v.sort();
        v
    }

    /// One access through the guest, recorded.
    pub fn access(&mut self, req: Ioreq) -> u64 {
        use ioreq_mux_trace::{Access, ConfigAnnotation, ConfigPath, Space};
        let before = self.log.lock().map(|l| l.len()).unwrap_or(0);
        let v = self.guest.access(req);
        let delivered = self
            .log
            .lock()
            .ok()
            .and_then(|l| l.get(before).map(|d| d.model.clone()));
        let space = if req.ty == IoreqType::Pio {
            Space::Port
        } else {
            Space::Mmio
        };
        let mut config = None;
        if req.ty == IoreqType::Pio
            && (0xcfc..0xd00).contains(&req.addr)
            && self.cf8 & 0x8000_0000 != 0
        {
            let bdf = Sbdf::from_devfn(0, (self.cf8 >> 16) as u8, (self.cf8 >> 8) as u8);
            config = Some((
                ConfigPath::Cf8,
                bdf,
                (self.cf8 & 0xfc) as u16 | (req.addr & 3) as u16,
            ));
        }
        if req.ty == IoreqType::Copy {
            if let Some((s, reg)) = self.guest.ecam.and_then(|w| w.decode(req.addr)) {
                config = Some((ConfigPath::Ecam, s, reg));
            }
        }
        if req.ty == IoreqType::Pio && req.addr == 0xcf8 && req.size == 4 && req.dir == Dir::Write {
            self.cf8 = req.data as u32;
        }
        let intern = |w: &mut ioreq_mux_trace::TraceWriter<std::fs::File>, s: &str| {
            w.intern(s).expect("intern")
        };
        let device = delivered.as_deref().map(|d| intern(&mut self.writer, d));
        let access = Access {
            vcpu: 0,
            space,
            dir: if req.dir == Dir::Read {
                ioreq_mux_trace::Dir::Read
            } else {
                ioreq_mux_trace::Dir::Write
            },
            addr: req.addr,
            size: req.size as u8,
            rep: 1,
            data: if req.dir == Dir::Read { v } else { req.data },
            region: if config.is_none() { device } else { None },
            config: config.map(|(path, sbdf, reg)| ConfigAnnotation {
                path,
                sbdf,
                reg,
                device,
            }),
        };
        self.writer.write_access(&access).expect("write access");
        // Claims the models made (BARs) become BAR events, as QEMU's pci_update_mappings.
        let now = self.claimed();
        for (kind, list, other) in [
            (ioreq_mux_trace::BarEventKind::Unmap, &self.ranges, &now),
            (ioreq_mux_trace::BarEventKind::Map, &now, &self.ranges),
        ] {
            for (owner, r) in list.iter().filter(|x| !other.contains(x)) {
                if owner == "ioreq-mux" {
                    continue;
                }
                let dev = self.writer.intern(owner).expect("intern");
                let ev = ioreq_mux_trace::BarEvent {
                    kind,
                    device: Some(dev),
                    sbdf: Sbdf::default(),
                    bar: 0,
                    space: if r.kind == ioreq_server::RangeKind::Port {
                        Space::Port
                    } else {
                        Space::Mmio
                    },
                    base: r.start,
                    size: r.end - r.start + 1,
                };
                self.writer
                    .write(&ioreq_mux_trace::Record::Bar(ev))
                    .expect("write bar");
            }
        }
        self.ranges = now;
        v
    }

    pub fn cfg_read(&mut self, path: Path, sbdf: Sbdf, reg: u16, size: u32) -> u64 {
        match path {
            Path::Cf8 => {
                self.access(Ioreq::new(
                    IoreqType::Pio,
                    Dir::Write,
                    0xcf8,
                    4,
                    cf8_value(sbdf, reg),
                ));
                self.access(Ioreq::new(
                    IoreqType::Pio,
                    Dir::Read,
                    0xcfc + u64::from(reg & 3),
                    size,
                    0,
                ))
            }
            Path::Ecam => {
                let a = self.ecam_addr(sbdf, reg);
                self.access(Ioreq::new(IoreqType::Copy, Dir::Read, a, size, 0))
            }
        }
    }

    pub fn cfg_write(&mut self, path: Path, sbdf: Sbdf, reg: u16, size: u32, v: u64) {
        match path {
            Path::Cf8 => {
                self.access(Ioreq::new(
                    IoreqType::Pio,
                    Dir::Write,
                    0xcf8,
                    4,
                    cf8_value(sbdf, reg),
                ));
                self.access(Ioreq::new(
                    IoreqType::Pio,
                    Dir::Write,
                    0xcfc + u64::from(reg & 3),
                    size,
                    v,
                ));
            }
            Path::Ecam => {
                let a = self.ecam_addr(sbdf, reg);
                self.access(Ioreq::new(IoreqType::Copy, Dir::Write, a, size, v));
            }
        }
        // Follow PCIEXBAR like firmware does.
        self.guest.ecam = self.guest.engine.router().windows().first().copied();
    }

    fn ecam_addr(&self, sbdf: Sbdf, reg: u16) -> u64 {
        self.guest
            .ecam
            .and_then(|w| w.address_of(sbdf, reg))
            .expect("ECAM window programmed and bus inside it")
    }

    /// Finishes the trace file.
    pub fn finish(self) -> Guest {
        self.writer.finish().expect("finish trace");
        self.guest
    }
}

/// The CF8 value that selects `reg` of `sbdf` (configuration mechanism #1, enable bit set).
fn cf8_value(sbdf: Sbdf, reg: u16) -> u64 {
    0x8000_0000 | (u64::from(sbdf.bdf()) << 8) | u64::from(reg & 0xfc)
}
