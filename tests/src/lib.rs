//! Helpers for end-to-end tests: a guest that drives the simulated hypervisor through the
//! whole multiplexer, one access at a time, on one thread.

use bdf_router::{EcamWindow, Sbdf};
use ioreq_mux::engine::{Engine, EngineConfig};
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
        match self.hv.issue(self.vcpu, &req, false).expect("access issued") {
            Issued::Done(v) => v,
            Issued::Pending => {
                self.engine.poll(Some(Duration::ZERO)).expect("engine polls");
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

    fn cf8(sbdf: Sbdf, reg: u16) -> u64 {
        0x8000_0000 | (u64::from(sbdf.bdf()) << 8) | u64::from(reg & 0xfc)
    }

    /// Reads a configuration register the way firmware does.
    pub fn cfg_read(&mut self, path: Path, sbdf: Sbdf, reg: u16, size: u32) -> u64 {
        match path {
            Path::Cf8 => {
                self.outb(0xcf8, 4, Self::cf8(sbdf, reg));
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
                self.outb(0xcf8, 4, Self::cf8(sbdf, reg));
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
