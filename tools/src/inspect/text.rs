//! `inspect` as text: the bus tree in the style of `lspci -tv` with `info pci`'s details, then
//! where a new function can go, then the claims and intercepts.
//!
//! One format per kind of number, all hexadecimal: addresses, sizes and register values as
//! `0x` and lowercase digits without padding (`0xfdc00000`); PCI notation without `0x` and
//! zero-padded: functions `ssss:bb:dd.f`, buses `ssss:bb` or `bb`, device numbers `dd`, IDs
//! `vvvv:dddd`, class codes `cccccc`. Counts (accesses, divergences, functions, buses) are
//! decimal with thousands separators, as every command prints counts ([`Thousands`]).

use super::{
    BarKind, BarView, BridgeView, BusRange, BusView, ConnectPoint, FunctionView, HotplugReason,
    HotplugView, Inspection, LinkKind, PcieType, PortType, WindowView,
};
use crate::out::Thousands;
use std::fmt::Write as _;

/// The whole view as text.
pub fn render(v: &Inspection) -> String {
    let mut t = String::new();
    header(&mut t, v);
    tree(&mut t, v);
    connect(&mut t, &v.connect);
    hosted_ports(&mut t, &v.hosted_ports);
    claims(&mut t, v);
    intercepts(&mut t, v);
    t
}

fn header(t: &mut String, v: &Inspection) {
    if let (Some(trace), Some(r)) = (&v.trace, &v.replay) {
        let _ = writeln!(
            t,
            "after replaying {}: {}, {}{}",
            trace,
            counted(r.accesses, "access", "accesses"),
            counted(r.divergences, "divergence", "divergences"),
            if r.divergences == 0 {
                ""
            } else {
                " (the layout may not be the recorded one: `ioreq-mux replay` says why)"
            }
        );
    }
    let _ = writeln!(t, "chipset: {}", v.chipset);
    let _ = writeln!(t, "ECAM windows:");
    if v.ecam_windows.is_empty() {
        let _ = writeln!(t, "  none (PCIEXBAR disabled)");
    }
    for w in &v.ecam_windows {
        let _ = writeln!(
            t,
            "  segment {:04x} buses {:02x}-{:02x} at {:#x}-{:#x} (size {:#x})",
            w.segment,
            w.start_bus,
            w.end_bus,
            w.base,
            w.base + (w.size - 1),
            w.size
        );
    }
}

fn tree(t: &mut String, v: &Inspection) {
    let _ = writeln!(
        t,
        "PCI tree: {} on {} (each function read through its owner, as the guest reads it):",
        counted(v.functions.len(), "function", "functions"),
        counted(v.buses.len(), "bus", "buses")
    );
    for b in v.buses.iter().filter(|b| b.port.is_none()) {
        bus(t, v, b, 1);
    }
}

/// `n` things, with thousands separators: `1 bus`, `13,768,544 accesses`.
fn counted(n: impl TryInto<u64>, one: &str, many: &str) -> String {
    let n = n.try_into().unwrap_or(u64::MAX);
    format!("{} {}", Thousands(n), if n == 1 { one } else { many })
}

fn indent(depth: usize) -> String {
    " ".repeat(2 * depth)
}

fn bus(t: &mut String, v: &Inspection, b: &BusView, depth: usize) {
    let pad = indent(depth);
    let _ = writeln!(
        t,
        "{pad}bus {:04x}:{:02x} ({}): free devices {}, free buses {}, hot-plug {}",
        b.segment,
        b.bus,
        bus_kind(b),
        free_devices(b),
        bus_ranges(&b.free_buses),
        hotplug(&b.hotplug)
    );
    let here = v
        .functions
        .iter()
        .filter(|f| f.segment == b.segment && f.bus == b.bus);
    for f in here {
        function(t, f, depth + 1);
        let below = v.buses.iter().find(|c| c.port.as_deref() == Some(&f.bdf));
        if let Some(c) = below {
            bus(t, v, c, depth + 2);
        }
    }
}

fn bus_kind(b: &BusView) -> String {
    let port = b.port.as_deref().unwrap_or("");
    match b.port_type {
        PortType::RootBus => "root bus".into(),
        PortType::RootPort => format!("behind root port {port}"),
        PortType::DownstreamPort => format!("behind downstream port {port}"),
        PortType::UpstreamPort => format!("switch internal bus behind upstream port {port}"),
        PortType::PcieToPciBridge => format!("conventional bus behind PCIe-to-PCI bridge {port}"),
        PortType::PciBridge => format!("conventional bus behind PCI bridge {port}"),
        PortType::OtherBridge => format!("behind bridge {port}"),
    }
}

/// Device numbers as `dd` and `dd-dd` runs.
fn device_list(devs: &[u8]) -> String {
    let mut runs: Vec<(u8, u8)> = vec![];
    for &d in devs {
        match runs.last_mut() {
            Some((_, e)) if *e + 1 == d => *e = d,
            _ => runs.push((d, d)),
        }
    }
    let parts: Vec<String> = runs
        .iter()
        .map(|&(a, b)| {
            if a == b {
                format!("{a:02x}")
            } else {
                format!("{a:02x}-{b:02x}")
            }
        })
        .collect();
    parts.join(" ")
}

fn free_devices(b: &BusView) -> String {
    let list = if b.free_devices.is_empty() {
        "none".to_string()
    } else {
        device_list(&b.free_devices)
    };
    match b.link {
        LinkKind::PcieLink if b.free_devices.is_empty() => {
            format!("{list} (PCIe link: device 00 only, in use)")
        }
        LinkKind::PcieLink => format!("{list} (PCIe link: device 00 only)"),
        LinkKind::SwitchInternal => format!("{list} (switch internal bus: downstream ports only)"),
        LinkKind::RootComplex | LinkKind::Conventional => list,
    }
}

fn bus_ranges(r: &[BusRange]) -> String {
    if r.is_empty() {
        return "none".into();
    }
    let parts: Vec<String> = r
        .iter()
        .map(|r| {
            if r.first == r.last {
                format!("{:02x}", r.first)
            } else {
                format!("{:02x}-{:02x}", r.first, r.last)
            }
        })
        .collect();
    parts.join(" ")
}

fn hotplug(h: &HotplugView) -> String {
    let why = match (h.reason, h.capable) {
        (HotplugReason::PcieSlot, _) => "PCIe slot, Hot-Plug Capable",
        (HotplugReason::PcieSlotNotCapable, _) => "PCIe slot not Hot-Plug Capable",
        (HotplugReason::PcieSlotNotRecorded, _) => {
            "PCIe slot, Slot Capabilities not recorded by the trace"
        }
        (HotplugReason::NoSlot, _) => "PCIe port without a slot",
        (HotplugReason::ConventionalBus, Some(true)) => {
            "conventional bus with a free device number"
        }
        (HotplugReason::ConventionalBus, _) => "conventional bus, no free device number",
        (HotplugReason::RootBus, _) => "root bus",
        (HotplugReason::SwitchInternal, _) => "switch internal bus",
    };
    let answer = match h.capable {
        Some(true) => "yes",
        Some(false) => "no",
        None => "unknown",
    };
    format!("{answer} ({why})")
}

fn function(t: &mut String, f: &FunctionView, depth: usize) {
    let pad = indent(depth);
    let pcie = f
        .pcie_type
        .map(|p| format!(", {}", pcie_name(p)))
        .unwrap_or_default();
    let owner = f.owner.as_deref().unwrap_or("nobody");
    let _ = writeln!(
        t,
        "{pad}{} {:04x}:{:04x} {} [{:06x}]{pcie}, owner {owner}",
        f.bdf, f.vendor_id, f.device_id, f.class_name, f.class
    );
    let detail = indent(depth + 2);
    for b in &f.bars {
        let _ = writeln!(t, "{detail}{}", bar(b));
    }
    if let Some(b) = &f.bridge {
        let _ = writeln!(t, "{detail}{}", bridge(b));
    }
}

fn pcie_name(p: PcieType) -> &'static str {
    match p {
        PcieType::Endpoint => "PCIe endpoint",
        PcieType::LegacyEndpoint => "PCIe legacy endpoint",
        PcieType::RootPort => "PCIe root port",
        PcieType::UpstreamPort => "PCIe switch upstream port",
        PcieType::DownstreamPort => "PCIe switch downstream port",
        PcieType::PcieToPciBridge => "PCIe-to-PCI bridge",
        PcieType::PciToPcieBridge => "PCI-to-PCIe bridge",
        PcieType::RootComplexIntegratedEndpoint => "root complex integrated endpoint",
        PcieType::RootComplexEventCollector => "root complex event collector",
        PcieType::Reserved => "reserved PCIe device/port type",
    }
}

fn bar(b: &BarView) -> String {
    let kind = match b.kind {
        BarKind::Io => "io",
        BarKind::Mem32 => "mem32",
        BarKind::Mem64 => "mem64",
        BarKind::Rom => "rom",
    };
    let pf = if b.prefetchable { " prefetchable" } else { "" };
    let state = match (&b.owner, b.decoding) {
        (Some(o), true) => format!("owner {o}"),
        (None, true) => "decoding, claimed by nobody".into(),
        (_, false) => "not decoding".into(),
    };
    format!(
        "BAR{} {kind}{pf} {:#x} size {:#x}, {state}",
        b.index, b.address, b.size
    )
}

fn window(name: &str, w: &WindowView) -> String {
    let off = if w.enabled { "" } else { " (off)" };
    format!("{name} {:#x}-{:#x}{off}", w.base, w.limit)
}

fn bridge(b: &BridgeView) -> String {
    format!(
        "buses: primary {:02x}, secondary {:02x}, subordinate {:02x}; {}; {}; {}",
        b.primary_bus,
        b.secondary_bus,
        b.subordinate_bus,
        window("I/O", &b.io_window),
        window("memory", &b.memory_window),
        window("prefetchable", &b.prefetchable_window)
    )
}

fn connect(t: &mut String, points: &[ConnectPoint]) {
    let _ = writeln!(
        t,
        "connect: {} (where a new function can go: the BDF it gets, the position to claim):",
        counted(points.len(), "point", "points")
    );
    if points.is_empty() {
        let _ = writeln!(t, "  nowhere: no bus has a free device number");
    }
    for p in points {
        let on = match &p.port {
            Some(port) => format!("below {port}"),
            None => format!("on root bus {:04x}:{:02x}", p.segment, p.bus),
        };
        let claimed = p
            .claimed_by
            .as_deref()
            .map(|o| format!("; already claimed by {o}"))
            .unwrap_or_default();
        let _ = writeln!(
            t,
            "  {} {on}, position {}, hot-plug {}{claimed}",
            p.bdf,
            p.position,
            hotplug(&p.hotplug)
        );
    }
}

/// A value as its JSON name (`root-port`, `8GT/s`): one spelling for text and JSON.
fn named<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

fn hosted_ports(t: &mut String, ports: &[crate::engine::HostedPortView]) {
    if ports.is_empty() {
        return;
    }
    let _ = writeln!(t, "hosted PCIe ports:");
    for p in ports {
        let bdf = p.bdf.as_deref().unwrap_or("not reachable yet");
        let buses = p.buses.map_or("buses not numbered".to_string(), |(s, e)| {
            format!("buses {s:02x}-{e:02x}")
        });
        let link = if p.link_active { "up" } else { "down" };
        let _ = writeln!(
            t,
            "  {} at {} ({bdf}): {}, {buses}, link {} {} {link}",
            p.name,
            p.at,
            named(&p.kind),
            named(&p.link.speed),
            named(&p.link.width)
        );
        if let (Some(s), Some(n)) = (&p.slot, p.slot_number) {
            let card = if s.present { "occupied" } else { "empty" };
            let _ = writeln!(
                t,
                "    slot {n}: {card}, power indicator {}, attention indicator {}, removal {}",
                named(&s.power_indicator),
                named(&s.attention_indicator),
                named(&s.removal)
            );
        }
    }
}

fn claims(t: &mut String, v: &Inspection) {
    let c = &v.claims;
    let _ = writeln!(t, "functions claimed by BDF:");
    for r in &c.functions {
        if r.first == r.last {
            let _ = writeln!(t, "  {} {}", r.first, r.owner);
        } else {
            let _ = writeln!(t, "  {}-{} {}", r.first, r.last, r.owner);
        }
    }
    let _ = writeln!(t, "claims by position:");
    for p in &c.positions {
        let at = p.resolved.as_deref().unwrap_or("not reachable yet");
        let _ = writeln!(t, "  {} -> {at} ({})", p.position, p.owner);
    }
    let _ = writeln!(t, "ports:");
    for r in &c.ports {
        let _ = writeln!(t, "  {:#x}-{:#x} {}", r.first, r.last, r.owner);
    }
    let _ = writeln!(t, "mmio:");
    for r in &c.mmio {
        let _ = writeln!(t, "  {:#x}-{:#x} {}", r.first, r.last, r.owner);
    }
}

fn intercepts(t: &mut String, v: &Inspection) {
    let _ = writeln!(t, "intercepted registers:");
    for i in &v.intercepts {
        let _ = writeln!(
            t,
            "  {:10} {:10} {} @{:#x} width {:#x} {:?}: {:#x}",
            i.intercept, i.register, i.function, i.offset, i.width, i.phase, i.value
        );
    }
    let h = &v.mmio_hole;
    let show = |v: Option<u64>| v.map_or("unknown".into(), |v| format!("{v:#x}"));
    let _ = writeln!(
        t,
        "MMIO hole: TOLUD {} (fallback {}), TOUUD {} (fallback {})",
        show(h.tolud),
        show(h.low_ram_top),
        show(h.touud),
        show(h.high_ram_top)
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_have_thousands_separators_and_agree_in_number() {
        assert_eq!(
            counted(13_768_544u64, "access", "accesses"),
            "13,768,544 accesses"
        );
        assert_eq!(counted(1usize, "bus", "buses"), "1 bus");
        assert_eq!(counted(0usize, "point", "points"), "0 points");
        assert_eq!(
            counted(1_000usize, "function", "functions"),
            "1,000 functions"
        );
    }

    #[test]
    fn device_lists_are_runs() {
        assert_eq!(device_list(&[1, 4, 5, 6, 0x1e]), "01 04-06 1e");
        assert_eq!(device_list(&[]), "");
    }
}
