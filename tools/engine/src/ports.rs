//! PCI Express ports the multiplexer hosts itself (Root Ports, Switch Upstream and Downstream
//! Ports: [`PciePort`]), for functions that other device models serve below them.
//!
//! The ports are part of the multiplexer, not a device model: the engine answers their
//! configuration space, sends their interrupts through [`Backend::inject_msi`] and keeps their
//! slots in step with the claims of every model:
//!
//! - **Slots follow claims.** A slot is occupied while a model other than the ports holds a
//!   function at device 0 directly below the port: a position claim one hop below the port's
//!   position, or a function the router routes on the port's secondary bus. When that changes
//!   (a model joins or leaves, a claim is made or released, the guest numbers the port's bus)
//!   the slot is plugged or unplugged ([`PciePort::plug`], [`PciePort::unplug`]): Presence
//!   Detect Changed, Data Link Layer State Changed and, if the guest enabled them, an MSI
//!   (PCIe Base 4.0, 6.7). A model that leaves is removed first, so the guest's accesses
//!   after the removal master-abort, and none of its requests is answered twice.
//! - **Master aborts below a port.** A configuration access that finds no function on a bus
//!   behind a hosted port sets that port's Received Master Abort (Secondary Status, PCI-to-PCI
//!   Bridge 1.2, 3.2.5.7): the port whose secondary bus it is, or the deepest hosted port whose
//!   bus range holds it.
//! - **Bus numbers** are learnt by the router from the guest's writes, as for any bridge: the
//!   engine routes the port's configuration accesses through the router like any other.

use crate::{Engine, Mapped};
use bdf_router::{ConfigAccess, Router, Sbdf, ServerIdx};
use ioreq_mux_models::port::{
    Interrupt, LinkConfig, PciePort, PortConfig, PortConfigError, PortKind, SlotState,
};
use ioreq_server::pci::idx;
use ioreq_server::{Backend, Claim, ClaimError, DmControl, IoRange, Position};
use serde::Serialize;
use tracing::{debug, info, warn};

#[cfg(test)]
mod tests;

/// Name the hosted ports have in claims, logs and `inspect`.
pub const PORTS_NAME: &str = "ioreq-mux ports";

/// A port the multiplexer hosts, as the topology configures it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostedPortSpec {
    /// A name for logs and `inspect`.
    pub name: String,
    /// Where it is: one hop (a function on the root bus) or a path through bridges.
    pub at: Position,
    pub config: PortConfig,
}

/// A hosted port as `inspect` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct HostedPortView {
    pub name: String,
    /// Where it was configured (BDF or position).
    pub at: String,
    /// Where it is now (`None`: the buses above it are not numbered yet).
    pub bdf: Option<String>,
    pub kind: PortKind,
    pub link: LinkConfig,
    /// Data Link Layer Link Active.
    pub link_active: bool,
    /// Secondary and subordinate bus, once numbered.
    pub buses: Option<(u8, u8)>,
    /// The slot (ports without one: `None`).
    pub slot: Option<SlotState>,
    pub slot_number: Option<u16>,
}

/// Why a hosted port could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error("port {name}: {source}")]
    Config {
        name: String,
        #[source]
        source: PortConfigError,
    },
    #[error("port {name}: {source}")]
    Claim {
        name: String,
        #[source]
        source: ClaimError,
    },
}

/// One hosted port.
#[derive(Debug)]
struct Hosted {
    name: String,
    at: Position,
    port: PciePort,
}

/// The hosted ports and their place in the router.
#[derive(Debug, Default)]
pub(crate) struct PortHost {
    /// The ports' server in the router (`None`: no port configured).
    idx: Option<ServerIdx>,
    ports: Vec<Hosted>,
    /// `Mapped::pci_generation` when the slots were last brought in step with the claims.
    synced_at: Option<u64>,
}

impl PortHost {
    /// Whether `owner` is the hosted ports' server.
    pub(crate) fn owns(&self, owner: ServerIdx) -> bool {
        self.idx == Some(owner)
    }
}

impl HostedPortSpec {
    /// The claim that places the port: its BDF on the root bus, or its position.
    pub fn claim(&self) -> Claim {
        claim_of(&self.at)
    }
}

fn claim_of(at: &Position) -> Claim {
    match at.path.as_slice() {
        [devfn] => Claim::Range(IoRange::pci(root_function(at, *devfn).to_xen())),
        _ => Claim::Position(at.clone()),
    }
}

fn root_function(at: &Position, devfn: u8) -> Sbdf {
    Sbdf::from_devfn(at.segment, at.root_bus, devfn)
}

/// Where the port at `at` is now (`None`: firmware has not numbered the buses above it).
fn located(router: &Router, owner: ServerIdx, at: &Position) -> Option<Sbdf> {
    match at.path.as_slice() {
        [devfn] => Some(root_function(at, *devfn)),
        _ => crate::claims::resolved(router, owner, at),
    }
}

/// A position claim at device 0, one hop below `port`.
fn directly_below(port: &Position, p: &Position) -> bool {
    p.segment == port.segment
        && p.root_bus == port.root_bus
        && p.path.len() == port.path.len() + 1
        && p.path.starts_with(&port.path)
        && p.path.last().is_some_and(|devfn| devfn >> 3 == 0)
}

impl Hosted {
    fn bus_register(&self, reg: usize) -> u8 {
        self.port.read(reg, 1) as u8
    }

    /// Secondary and subordinate bus, once the guest set them (secondary 0: not yet).
    fn buses(&self) -> Option<(u8, u8)> {
        let secondary = self.bus_register(idx::PCI_SECONDARY_BUS);
        let subordinate = self.bus_register(idx::PCI_SUBORDINATE_BUS);
        (secondary != 0).then_some((secondary, subordinate.max(secondary)))
    }

    /// Whether a model other than the ports serves a function at device 0 below the port.
    fn occupied_in(&self, router: &Router, ports: ServerIdx, segment: u16) -> bool {
        let by_position = router
            .positions()
            .iter()
            .any(|c| c.owner != ports && directly_below(&self.at, &c.position));
        let on_bus = self.buses().is_some_and(|(secondary, _)| {
            (0..8).any(|f| {
                let s = Sbdf::from_devfn(segment, secondary, f);
                router.config_owner(s).is_some_and(|o| o != ports)
            })
        });
        by_position || on_bus
    }
}

impl<B: Backend> Engine<B> {
    /// Installs the configured ports: the ports' server in the router, and one claim each.
    pub(crate) fn install_ports(&mut self, specs: &[HostedPortSpec]) -> Result<(), PortError> {
        if specs.is_empty() {
            return Ok(());
        }
        let idx = self.router.add_server(PORTS_NAME);
        self.models.push(None);
        self.ports.idx = Some(idx);
        for spec in specs {
            let port = PciePort::new(&spec.config).map_err(|source| PortError::Config {
                name: spec.name.clone(),
                source,
            })?;
            self.port_ctl(idx)
                .map(claim_of(&spec.at))
                .map_err(|source| PortError::Claim {
                    name: spec.name.clone(),
                    source,
                })?;
            info!(port = %spec.name, at = %spec.at, kind = ?spec.config.kind, "hosted PCIe port");
            self.ports.ports.push(Hosted {
                name: spec.name.clone(),
                at: spec.at.clone(),
                port,
            });
        }
        Ok(())
    }

    fn port_ctl(&mut self, idx: ServerIdx) -> crate::claims::Ctl<'_, B> {
        crate::claims::Ctl {
            owner: idx,
            grant: None,
            router: &mut self.router,
            backend: &mut self.backend,
            mapped: &mut self.mapped,
            stats: &mut self.stats,
        }
    }

    /// The ports the multiplexer hosts, their links and slots.
    pub fn hosted_ports(&self) -> Vec<HostedPortView> {
        let Some(idx) = self.ports.idx else {
            return vec![];
        };
        self.ports
            .ports
            .iter()
            .map(|h| HostedPortView {
                name: h.name.clone(),
                at: h.at.to_string(),
                bdf: located(&self.router, idx, &h.at).map(|s| s.to_string()),
                kind: h.port.kind(),
                link: h.port.config().link,
                link_active: h.port.link_active(),
                buses: h.buses(),
                slot: h.port.slot_state(),
                slot_number: h.port.config().slot.map(|s| s.number),
            })
            .collect()
    }

    /// The hosted port at `sbdf`.
    fn port_at(&self, sbdf: Sbdf) -> Option<usize> {
        let idx = self.ports.idx?;
        self.ports
            .ports
            .iter()
            .position(|h| located(&self.router, idx, &h.at) == Some(sbdf))
    }

    /// A configuration read of a hosted port (all ones if none is at that function).
    pub(crate) fn port_read(&self, sbdf: Sbdf, reg: u16, size: u8) -> u64 {
        match self.port_at(sbdf) {
            Some(i) => self.ports.ports[i]
                .port
                .read(usize::from(reg), usize::from(size)),
            None => ioreq_server::size_mask(size.into()),
        }
    }

    /// A configuration write to a hosted port, and the interrupt it releases. A write to its
    /// bus numbers may put a model's function below it: the slots are looked at again.
    pub(crate) fn port_write(&mut self, acc: &ConfigAccess, data: u64) {
        let Some(i) = self.port_at(acc.sbdf) else {
            return;
        };
        let irq = self.ports.ports[i]
            .port
            .write(usize::from(acc.reg), usize::from(acc.size), data);
        self.send(i, irq);
        let buses = usize::from(acc.reg)..usize::from(acc.reg) + usize::from(acc.size);
        if buses.contains(&idx::PCI_SECONDARY_BUS) || buses.contains(&idx::PCI_SUBORDINATE_BUS) {
            self.ports.synced_at = None;
            self.sync_slots();
        }
    }

    /// Sends a port's interrupt through the hypervisor.
    fn send(&mut self, i: usize, irq: Interrupt) {
        let name = &self.ports.ports[i].name;
        match irq {
            Interrupt::None => {}
            Interrupt::Held => debug!(port = %name, "interrupt pending; MSI not enabled or masked"),
            Interrupt::Msi(m) => match self.backend.inject_msi(m.addr, m.data) {
                Ok(()) => {
                    self.stats.msis_injected += 1;
                    debug!(port = %name, addr = m.addr, data = m.data, "MSI sent");
                }
                Err(e) => {
                    self.stats.msi_errors += 1;
                    warn!(port = %name, error = %e, "the hypervisor refused the port's MSI");
                }
            },
        }
    }

    /// Brings every slot in step with the claims, if a PCI claim changed since last time.
    pub(crate) fn sync_slots(&mut self) {
        let Some(ports) = self.ports.idx else {
            return;
        };
        if self.ports.synced_at == Some(self.mapped.pci_generation) {
            return;
        }
        self.ports.synced_at = Some(self.mapped.pci_generation);
        for i in 0..self.ports.ports.len() {
            let h = &self.ports.ports[i];
            if h.port.config().slot.is_none() && !h.port.kind().faces_down() {
                continue;
            }
            let segment = h.at.segment;
            let occupied = h.occupied_in(&self.router, ports, segment);
            if occupied == h.port.is_occupied() {
                continue;
            }
            let h = &mut self.ports.ports[i];
            let r = if occupied {
                h.port.plug()
            } else {
                h.port.unplug()
            };
            info!(port = %h.name, occupied, "slot follows the claims");
            match r {
                Ok(irq) => self.send(i, irq),
                Err(e) => {
                    warn!(port = %self.ports.ports[i].name, error = %e, "slot change refused")
                }
            }
        }
    }

    /// A configuration access to `sbdf` found no function: the hosted port that mastered it
    /// on its secondary side records a Received Master Abort.
    pub(crate) fn note_master_abort(&mut self, sbdf: Sbdf) {
        let deepest = self
            .ports
            .ports
            .iter()
            .enumerate()
            .filter(|(_, h)| h.at.segment == sbdf.segment)
            .filter_map(|(i, h)| h.buses().map(|b| (i, b)))
            .filter(|(_, (secondary, subordinate))| (*secondary..=*subordinate).contains(&sbdf.bus))
            .max_by_key(|(_, (secondary, _))| *secondary);
        if let Some((i, _)) = deepest {
            self.ports.ports[i].port.note_master_abort();
        }
    }
}

impl Mapped {
    /// A PCI claim changed (models joined, left, claimed or released functions).
    pub(crate) fn pci_changed(&mut self) {
        self.pci_generation += 1;
    }
}
