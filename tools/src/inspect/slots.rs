//! Where a new function can go: free device numbers, free bus numbers, hot-plug, and the BDF a
//! new function gets.
//!
//! - Device numbers: a PCIe link (below a root or downstream port) has device 0 only (PCIe base
//!   spec 4.0, 7.3.1: a downstream port forwards only Device 0 on its link; ARI aside); a root
//!   bus or a conventional bus has 0-31; a switch's internal bus takes only the switch's own
//!   downstream ports, so nothing can be connected there.
//! - Bus numbers: those in (bus, subordinate] that no bridge on the bus uses ([secondary,
//!   subordinate] of each): what a switch or bridge connected here could be given without
//!   renumbering.
//! - Hot-plug: a root or downstream port whose Slot Capabilities say Hot-Plug Capable
//!   (7.5.3.9; the slot must be implemented, 7.5.3.2); a conventional bus behind a bridge
//!   that has a free device number (the bridge's own hot-plug controller is not read); never
//!   a root bus or a switch's internal bus.

use super::{BusView, ConnectPoint, HotplugReason, HotplugView, LinkKind, PcieType, PortType};
use bdf_router::Sbdf;
use bdf_router::address::DEVICES_PER_BUS;
use serde::Serialize;

/// A port's slot, from its PCI Express capability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlotCaps {
    /// Slot Implemented (PCI Express Capabilities bit 8).
    pub implemented: bool,
    /// Hot-Plug Capable (Slot Capabilities bit 6); `None`: not known (a trace server after
    /// a trace whose guest never read Slot Capabilities).
    pub hotplug: Option<bool>,
}

/// Bus numbers `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BusRange {
    pub first: u8,
    pub last: u8,
}

/// What kind of port a bridge is, from its PCI Express device/port type.
pub fn port_type(pcie: Option<PcieType>) -> PortType {
    match pcie {
        None => PortType::PciBridge,
        Some(PcieType::RootPort) => PortType::RootPort,
        Some(PcieType::DownstreamPort) => PortType::DownstreamPort,
        Some(PcieType::UpstreamPort) => PortType::UpstreamPort,
        Some(PcieType::PcieToPciBridge) => PortType::PcieToPciBridge,
        Some(_) => PortType::OtherBridge,
    }
}

/// What can sit on the bus below a port of this type.
pub fn link_kind(port: PortType) -> LinkKind {
    match port {
        PortType::RootBus => LinkKind::RootComplex,
        PortType::RootPort | PortType::DownstreamPort => LinkKind::PcieLink,
        PortType::UpstreamPort => LinkKind::SwitchInternal,
        PortType::PcieToPciBridge | PortType::PciBridge | PortType::OtherBridge => {
            LinkKind::Conventional
        }
    }
}

/// Device numbers a new function may take on a bus of kind `link` where `present` are used.
pub fn free_devices(link: LinkKind, present: &[u8]) -> Vec<u8> {
    let possible = match link {
        LinkKind::PcieLink => 0..1,
        LinkKind::RootComplex | LinkKind::Conventional => 0..DEVICES_PER_BUS,
        LinkKind::SwitchInternal => 0..0,
    };
    possible.filter(|d| !present.contains(d)).collect()
}

/// Bus numbers in `(bus, subordinate]` outside every `[secondary, subordinate]` in `below`,
/// as ranges.
pub fn free_buses(bus: u8, subordinate: u8, below: &[(u8, u8)]) -> Vec<BusRange> {
    let used = |n: u8| below.iter().any(|&(s, e)| s <= n && n <= e);
    let mut out: Vec<BusRange> = vec![];
    for n in (u16::from(bus) + 1..=u16::from(subordinate)).map(|n| n as u8) {
        if used(n) {
            continue;
        }
        match out.last_mut() {
            Some(r) if u16::from(r.last) + 1 == u16::from(n) => r.last = n,
            _ => out.push(BusRange { first: n, last: n }),
        }
    }
    out
}

/// Whether a device can be hot-plugged on a bus below a port of type `port`, and why.
/// `capable` is `None` when the port's Slot Capabilities are not known.
pub fn hotplug(port: PortType, slot: Option<SlotCaps>, free: &[u8]) -> HotplugView {
    let (capable, reason) = match (link_kind(port), slot) {
        (LinkKind::RootComplex, _) => (Some(false), HotplugReason::RootBus),
        (LinkKind::SwitchInternal, _) => (Some(false), HotplugReason::SwitchInternal),
        (LinkKind::Conventional, _) => (Some(!free.is_empty()), HotplugReason::ConventionalBus),
        (LinkKind::PcieLink, Some(s)) if !s.implemented => (Some(false), HotplugReason::NoSlot),
        (LinkKind::PcieLink, Some(s)) => match s.hotplug {
            Some(true) => (Some(true), HotplugReason::PcieSlot),
            Some(false) => (Some(false), HotplugReason::PcieSlotNotCapable),
            None => (None, HotplugReason::PcieSlotNotRecorded),
        },
        (LinkKind::PcieLink, None) => (Some(false), HotplugReason::PcieSlotNotCapable),
    };
    HotplugView { capable, reason }
}

/// A bus as the walk first meets it (devices and what is free filled in by [`fill_bus`]).
pub(super) fn bus_view(
    segment: u16,
    bus: u8,
    port: Option<String>,
    port_type: PortType,
    subordinate_bus: u8,
    position: String,
) -> BusView {
    BusView {
        segment,
        bus,
        port,
        port_type,
        link: link_kind(port_type),
        subordinate_bus,
        devices: vec![],
        free_devices: vec![],
        free_buses: vec![],
        hotplug: hotplug(port_type, None, &[]),
        position,
    }
}

/// Completes a bus once its devices and the bridges on it are known.
pub(super) fn fill_bus(
    b: &mut BusView,
    devices: Vec<u8>,
    below: &[(u8, u8)],
    slot: Option<SlotCaps>,
) {
    b.free_devices = free_devices(b.link, &devices);
    b.free_buses = free_buses(b.bus, b.subordinate_bus, below);
    b.hotplug = hotplug(b.port_type, slot, &b.free_devices);
    b.devices = devices;
}

/// The position of a new function at device `dev` (function 0) of the bus at `bus_position`:
/// [`ioreq_server::Position`] writes the first hop after a colon, the others after a slash.
pub fn position_of(bus_position: &str, dev: u8) -> String {
    let sep = if bus_position.matches(':').count() == 1 {
        ':'
    } else {
        '/'
    };
    format!("{bus_position}{sep}{dev:02x}.0")
}

/// One connection point per bus with a free device number: the first free one, function 0.
/// `claimed_by` names the server whose claim covers a BDF now.
pub(super) fn connect_points(
    buses: &[BusView],
    claimed_by: &dyn Fn(Sbdf) -> Option<String>,
) -> Vec<ConnectPoint> {
    buses
        .iter()
        .filter_map(|b| {
            let dev = *b.free_devices.first()?;
            let s = Sbdf::from_devfn(b.segment, b.bus, dev << 3);
            Some(ConnectPoint {
                segment: b.segment,
                bus: b.bus,
                port: b.port.clone(),
                port_type: b.port_type,
                link: b.link,
                bdf: s.to_string(),
                position: position_of(&b.position, dev),
                hotplug: b.hotplug.clone(),
                claimed_by: claimed_by(s),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_pcie_link_has_device_0_only() {
        assert_eq!(free_devices(LinkKind::PcieLink, &[]), vec![0]);
        assert!(free_devices(LinkKind::PcieLink, &[0]).is_empty());
        assert!(free_devices(LinkKind::SwitchInternal, &[0]).is_empty());
        let conventional = free_devices(LinkKind::Conventional, &[1]);
        assert_eq!(conventional.len(), 31);
        assert_eq!(conventional[..3], [0, 2, 3]);
    }

    #[test]
    fn free_buses_skip_every_bridge_range_below() {
        // Root port 00:02.2 of the bundled topology: buses 03-06, the switch takes 04-06.
        assert!(free_buses(3, 6, &[(4, 6)]).is_empty());
        // Root bus 00 after SeaBIOS: buses 01-09 behind the root ports.
        let below = [(1, 1), (2, 2), (3, 6), (7, 8), (9, 9)];
        assert_eq!(
            free_buses(0, 0xff, &below),
            vec![BusRange {
                first: 0x0a,
                last: 0xff
            }]
        );
        assert_eq!(
            free_buses(0x10, 0x20, &[(0x12, 0x13), (0x15, 0x15)]),
            vec![
                BusRange {
                    first: 0x11,
                    last: 0x11
                },
                BusRange {
                    first: 0x14,
                    last: 0x14
                },
                BusRange {
                    first: 0x16,
                    last: 0x20
                },
            ]
        );
        assert!(free_buses(0xff, 0xff, &[]).is_empty());
    }

    #[test]
    fn hotplug_says_why() {
        let slot = |implemented, hotplug| {
            Some(SlotCaps {
                implemented,
                hotplug,
            })
        };
        let h = hotplug(PortType::RootPort, slot(true, Some(true)), &[0]);
        assert_eq!((h.capable, h.reason), (Some(true), HotplugReason::PcieSlot));
        let h = hotplug(PortType::DownstreamPort, slot(false, Some(true)), &[0]);
        assert_eq!((h.capable, h.reason), (Some(false), HotplugReason::NoSlot));
        let h = hotplug(PortType::DownstreamPort, slot(true, Some(false)), &[0]);
        assert_eq!(h.reason, HotplugReason::PcieSlotNotCapable);
        // A slot whose capabilities the trace never showed: not known, not "no".
        let h = hotplug(PortType::RootPort, slot(true, None), &[0]);
        assert_eq!(
            (h.capable, h.reason),
            (None, HotplugReason::PcieSlotNotRecorded)
        );
        // No slot implemented: Slot Capabilities do not matter.
        let h = hotplug(PortType::RootPort, slot(false, None), &[0]);
        assert_eq!((h.capable, h.reason), (Some(false), HotplugReason::NoSlot));
        let h = hotplug(PortType::PcieToPciBridge, None, &[2]);
        assert_eq!(
            (h.capable, h.reason),
            (Some(true), HotplugReason::ConventionalBus)
        );
        assert_eq!(
            hotplug(PortType::PcieToPciBridge, None, &[]).capable,
            Some(false)
        );
        assert_eq!(hotplug(PortType::RootBus, None, &[4]).capable, Some(false));
        assert_eq!(
            hotplug(PortType::UpstreamPort, None, &[]).capable,
            Some(false)
        );
    }

    #[test]
    fn positions_of_new_functions() {
        assert_eq!(position_of("0000:00", 4), "0000:00:04.0");
        assert_eq!(
            position_of("0000:00:02.3/00.0", 2),
            "0000:00:02.3/00.0/02.0"
        );
        assert_eq!(position_of("0000:00:02.1", 0), "0000:00:02.1/00.0");
    }

    proptest! {
        /// Every number in (bus, subordinate] is either free (in exactly one returned range)
        /// or inside a bridge's range, never both; ranges are ordered, disjoint and not
        /// adjacent.
        #[test]
        fn free_buses_partition_the_range(
            bus in 0u8..=255,
            span in 0u8..=255,
            below in proptest::collection::vec((0u8..=255, 0u8..=16), 0..6),
        ) {
            let sub = bus.saturating_add(span);
            let below: Vec<(u8, u8)> = below.iter().map(|&(s, n)| (s, s.saturating_add(n))).collect();
            let free = free_buses(bus, sub, &below);
            for w in free.windows(2) {
                prop_assert!(u16::from(w[0].last) + 1 < u16::from(w[1].first));
            }
            for n in (u16::from(bus) + 1..=u16::from(sub)).map(|n| n as u8) {
                let used = below.iter().any(|&(s, e)| s <= n && n <= e);
                let hits = free.iter().filter(|r| r.first <= n && n <= r.last).count();
                prop_assert_eq!(hits, usize::from(!used), "bus {:#x}", n);
            }
            prop_assert!(free.iter().all(|r| r.first > bus && r.last <= sub && r.first <= r.last));
        }

        /// Free device numbers are exactly the possible ones not present.
        #[test]
        fn free_devices_complement_the_present(present in proptest::collection::vec(0u8..32, 0..40)) {
            for link in [LinkKind::RootComplex, LinkKind::Conventional, LinkKind::PcieLink] {
                let free = free_devices(link, &present);
                let possible: u8 = if link == LinkKind::PcieLink { 1 } else { 32 };
                for d in 0..possible {
                    prop_assert_eq!(free.contains(&d), !present.contains(&d));
                }
                prop_assert!(free.iter().all(|&d| d < possible));
            }
        }
    }
}
