//! The multiplexer: takes each ioreq from the hypervisor, runs the chipset intercepts, routes
//! the access and hands it to the device model that owns it, then completes the ioreq.
//!
//! One engine serves all vCPUs of a guest from one thread (like QEMU's ioreq loop), so a
//! layout change an intercept makes is applied to the router and the hypervisor before the
//! next request of any vCPU is looked at.

use bdf_router::{EcamWindow, Router, Sbdf, ServerIdx};
use chipset_intercept::{Chipset, InterceptConfig, InterceptTable, LayoutEvent};
use ioreq_server::abi::{PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_DATA_PORT};
use ioreq_server::oop::sys::Doorbell;
use ioreq_server::{Backend, BackendError, BackendEvent, Claim, ClaimError, DeviceModel, IoRange};
use serde::Serialize;
use thiserror::Error;
use tracing::info;

mod claims;
mod control;
mod dispatch;
mod layout;
pub mod ports;
#[cfg(test)]
mod tests;

pub use claims::Grant;
use claims::ensure_segment;
pub use control::{Control, ControlSender};
pub use ports::{HostedPortSpec, HostedPortView, PORTS_NAME, PortError};

/// Index of the multiplexer itself in the router's server list: it owns the CF8/CFC ports
/// and the ECAM windows.
pub const MUX: ServerIdx = 0;
/// Name the multiplexer has in claims and errors.
pub const MUX_NAME: &str = "ioreq-mux";
/// A PCI Express function's configuration space: 4 KiB (PCIe Base 4.0, 7.2.2).
pub const PCIE_CONFIG_SPACE_SIZE: u16 = 0x1000;

/// The ports the multiplexer keeps for itself, before any model claims: CF8/CFC.
pub fn config_ports() -> IoRange {
    IoRange::ports(PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_DATA_PORT + 3)
}

/// What the engine claims from the hypervisor for PCI configuration space.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PciClaims {
    /// Whole segments, plus the CF8/CFC ports: every configuration access reaches the engine
    /// (unowned ones master-abort here, exactly as Xen would), and bus renumbering never needs
    /// a hypervisor claim. For an engine in front of every device model.
    #[default]
    Segments,
    /// Only the functions the models own (positions as they resolve, following renumbering),
    /// and not the CF8/CFC ports: for an engine beside a device model Xen still serves
    /// directly (QEMU), which keeps the rest of configuration space.
    Functions,
}

/// How the engine is set up.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    pub intercepts: InterceptConfig,
    /// Skip detection and use this chipset.
    pub chipset: Option<Chipset>,
    pub pci_claims: PciClaims,
    /// ECAM windows the toolstack sets up (any segment, as an MCFG table would list them),
    /// installed before any model attaches and never moved by the guest. The Q35 PCIEXBAR
    /// window comes on top of these, from the guest's own writes.
    pub ecam: Vec<EcamWindow>,
    /// PCI Express ports the multiplexer hosts (module [`ports`]). From the topology's
    /// `[[port]]` entries, not from `[engine]`.
    #[serde(skip)]
    pub ports: Vec<HostedPortSpec>,
}

/// The engine could not start.
#[derive(Debug, Error)]
pub enum EngineError {
    #[error("device model {model}: {source}")]
    Attach {
        model: String,
        #[source]
        source: ClaimError,
    },
    #[error("hypervisor: {0}")]
    Backend(#[from] BackendError),
    #[error("cannot create the engine's control doorbell: {0}")]
    Doorbell(#[from] std::io::Error),
    #[error(transparent)]
    Port(#[from] PortError),
    /// A configured window overlaps another (`hypervisor` false: a configuration error) or
    /// the hypervisor refused it.
    #[error("ECAM window {window}: {why}")]
    Window {
        window: String,
        why: String,
        hypervisor: bool,
    },
}

/// Counters the engine keeps.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    /// Synchronous requests completed.
    pub requests: u64,
    /// Buffered writes handled.
    pub buffered: u64,
    pub pio: u64,
    pub mmio: u64,
    pub config_cf8: u64,
    pub config_ecam: u64,
    /// Accesses nobody owns: reads all ones, writes dropped.
    pub master_aborts: u64,
    /// ECAM accesses that are not configuration accesses (see `EcamReject`).
    pub ecam_rejects: u64,
    /// Ioreqs that failed validation.
    pub malformed: u64,
    /// Device-model calls that failed (answered as a master abort).
    pub dm_errors: u64,
    /// Configuration accesses that touched an intercepted register.
    pub intercepted: u64,
    /// Configuration accesses past the end of their function's configuration space (an
    /// extended register of a model with 256 bytes): reads all ones, writes dropped.
    pub beyond_config_space: u64,
    /// TIMEOFFSET and INVALIDATE broadcasts.
    pub broadcasts: u64,
    /// Completions the hypervisor refused.
    pub completion_errors: u64,
    /// Hypervisor claims that failed.
    pub backend_claim_errors: u64,
    /// Rep string accesses through a guest buffer (`data_is_ptr`) to a model that does not
    /// map guest memory: they complete without data (a read leaves the buffer unwritten).
    pub data_ptr_unsupported: u64,
    /// Rep string accesses through a guest buffer handed to a model that maps guest memory
    /// ([`Grant::guest_memory`]).
    pub data_ptr_forwarded: u64,
    /// MSIs sent through the hypervisor: by models (`DmControl::inject_msi`) and by the
    /// hosted ports.
    pub msis_injected: u64,
    /// MSIs the hypervisor refused (or cannot send).
    pub msi_errors: u64,
}

struct Slot {
    name: String,
    model: Box<dyn DeviceModel>,
    served: u64,
    grant: Option<Grant>,
}

/// What the engine has mapped with the hypervisor on its own account.
#[derive(Debug, Default)]
struct Mapped {
    mode: PciClaims,
    windows: Vec<EcamWindow>,
    pci_segments: Vec<u16>,
    /// PM blocks the intercepts placed.
    pm: Vec<PmClaim>,
    /// Counts the PCI claims models made (chipset detection looks again when it moves).
    pci_generation: u64,
}

/// A PM block placed by an intercept, claimed for the model that owns the PM function.
#[derive(Debug, Clone, Copy)]
struct PmClaim {
    function: Sbdf,
    owner: ServerIdx,
    ports: IoRange,
    /// The engine made the claim. False when the model had mapped the block itself (it
    /// emulates it; QEMU does): the engine then neither claims nor releases it.
    by_engine: bool,
}

/// The multiplexer engine over a backend `B`.
pub struct Engine<B: Backend> {
    backend: B,
    router: Router,
    intercepts: InterceptTable,
    chipset: Chipset,
    models: Vec<Option<Slot>>,
    mapped: Mapped,
    stats: EngineStats,
    events: Vec<BackendEvent>,
    layout: Vec<LayoutEvent>,
    history: Vec<LayoutEvent>,
    control: Option<(ControlSender, crossbeam_channel::Receiver<Control>)>,
    /// Rung with every control message, so a backend sleeping on it wakes to apply it.
    control_bell: std::sync::Arc<Doorbell>,
    /// No chipset was found when the engine started and none is configured: look again once
    /// a model that joined later (QEMU through the device-model socket) claims functions.
    detect_pending: bool,
    /// `Mapped::pci_generation` when detection last ran.
    detected_at: u64,
    intercept_cfg: InterceptConfig,
    /// The first model called since [`Engine::mark`].
    first_call: Option<ServerIdx>,
    /// The PCI Express ports the multiplexer hosts.
    ports: ports::PortHost,
}

impl<B: Backend> std::fmt::Debug for Engine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("chipset", &self.chipset)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Engine<B> {
    /// Attaches the models (each makes its claims), detects the chipset through them and
    /// installs the intercepts.
    pub fn new(
        mut backend: B,
        models: Vec<Box<dyn DeviceModel>>,
        cfg: &EngineConfig,
    ) -> Result<Self, EngineError> {
        let mut router = Router::new();
        let mux = router.add_server(MUX_NAME);
        debug_assert_eq!(mux, MUX);
        let cf8 = config_ports();
        router
            .claim(MUX, &Claim::Range(cf8))
            .map_err(|source| EngineError::Attach {
                model: MUX_NAME.into(),
                source,
            })?;
        if cfg.pci_claims == PciClaims::Segments {
            backend.map_range(cf8)?;
        }
        let mut e = Engine {
            backend,
            router,
            intercepts: InterceptTable::default(),
            chipset: Chipset::Unknown,
            models: vec![None],
            mapped: Mapped {
                mode: cfg.pci_claims,
                ..Mapped::default()
            },
            stats: EngineStats::default(),
            events: Vec::with_capacity(64),
            layout: vec![],
            history: vec![],
            control: None,
            control_bell: std::sync::Arc::new(Doorbell::new()?),
            detect_pending: false,
            detected_at: 0,
            intercept_cfg: cfg.intercepts,
            first_call: None,
            ports: ports::PortHost::default(),
        };
        ensure_segment(&mut e.backend, &mut e.mapped, 0)?;
        for w in &cfg.ecam {
            e.add_static_window(*w)?;
        }
        e.install_ports(&cfg.ports)?;
        for m in models {
            e.add_model(m)?;
        }
        match cfg.chipset {
            Some(c) => e.install_chipset(c),
            None => {
                e.detect_pending = true;
                e.detect();
                if e.detect_pending {
                    info!(
                        "no known chipset yet: running as a plain router; detection runs again \
                         once a device model that joins later claims functions"
                    );
                }
            }
        }
        Ok(e)
    }

    pub fn chipset(&self) -> Chipset {
        self.chipset
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    pub fn intercepts(&self) -> &InterceptTable {
        &self.intercepts
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Every layout change so far, in order.
    pub fn layout_history(&self) -> &[LayoutEvent] {
        &self.history
    }

    /// (name, requests served) per device model.
    pub fn served(&self) -> Vec<(String, u64)> {
        self.models
            .iter()
            .flatten()
            .map(|s| (s.name.clone(), s.served))
            .collect()
    }
}
