//! `ioreq-mux inspect`: the layout the multiplexer holds, from a topology alone or after
//! replaying a trace: ECAM windows, the bus tree with owners, the PM block, the MMIO hole.

use crate::engine::Engine;
use crate::replay::{ReplayError, replay_engine, topology_engine};
use bdf_router::{Sbdf, ServerIdx};
use ioreq_server::Backend;
use std::fmt::Write as _;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct InspectArgs {
    /// The topology (TOML).
    #[arg(long)]
    pub topology: PathBuf,
    /// Replay this trace first and show the layout it left.
    #[arg(long)]
    pub trace: Option<PathBuf>,
}

pub fn run(a: &InspectArgs) -> Result<String, ReplayError> {
    let engine = match &a.trace {
        Some(t) => replay_engine(t, &a.topology, 0, None, false)?.1,
        None => topology_engine(&a.topology)?,
    };
    Ok(layout_text(&engine))
}

/// Consecutive functions with the same owner, as ranges.
fn runs(list: &[(Sbdf, ServerIdx)]) -> Vec<(Sbdf, Sbdf, ServerIdx)> {
    let mut out: Vec<(Sbdf, Sbdf, ServerIdx)> = vec![];
    for &(s, o) in list {
        match out.last_mut() {
            Some((_, end, owner)) if *owner == o && end.to_xen() + 1 == s.to_xen() => *end = s,
            _ => out.push((s, s, o)),
        }
    }
    out
}

/// The layout as text.
pub fn layout_text<B: Backend>(e: &Engine<B>) -> String {
    let r = e.router();
    let name = |i: ServerIdx| r.server_name(i).to_string();
    let mut t = String::new();
    let _ = writeln!(t, "chipset: {}", e.chipset());
    let _ = writeln!(t, "ECAM windows:");
    if r.windows().is_empty() {
        let _ = writeln!(t, "  none (PCIEXBAR disabled)");
    }
    for w in r.windows() {
        let _ = writeln!(t, "  {w}");
    }
    let _ = writeln!(t, "bus tree (bridges the guest numbered):");
    let bridges = r.bridges();
    fn walk(
        t: &mut String,
        all: &[bdf_router::BridgeInfo],
        parent: Option<usize>,
        depth: usize,
        owner: &dyn Fn(Sbdf) -> String,
    ) {
        for (i, b) in all.iter().enumerate().filter(|(_, b)| b.parent == parent) {
            let at = b.sbdf.map_or("unreachable".into(), |s| s.to_string());
            let who = b.sbdf.map_or(String::new(), owner);
            let _ = writeln!(
                t,
                "  {:indent$}{at} -> buses {:02x}-{:02x} ({who})",
                "",
                b.numbers.secondary,
                b.numbers.subordinate,
                indent = depth * 2
            );
            walk(t, all, Some(i), depth + 1, owner);
        }
    }
    let owner = |s: Sbdf| r.config_owner(s).map_or("unowned".into(), name);
    walk(&mut t, &bridges, None, 0, &owner);
    let _ = writeln!(t, "functions by owner:");
    for (a, b, o) in runs(&r.functions()) {
        if a == b {
            let _ = writeln!(t, "  {a}            {}", name(o));
        } else {
            let _ = writeln!(t, "  {a}-{b} {}", name(o));
        }
    }
    let _ = writeln!(t, "claims by position:");
    for p in r.positions() {
        let at = p
            .resolved
            .map_or("not reachable yet".into(), |s| s.to_string());
        let _ = writeln!(t, "  {} -> {at} ({})", p.position, name(p.owner));
    }
    let _ = writeln!(t, "ports:");
    for (s, en, o) in r.port_ranges() {
        let _ = writeln!(t, "  {s:#06x}-{en:#06x} {}", name(o));
    }
    let _ = writeln!(t, "mmio:");
    for (s, en, o) in r.mmio_ranges() {
        let _ = writeln!(t, "  {s:#x}-{en:#x} {}", name(o));
    }
    let _ = writeln!(t, "intercepted registers:");
    for (it, spec, v) in e.intercepts().snapshot() {
        let _ = writeln!(
            t,
            "  {it:10} {:10} {} @{:#04x} width {} {:?}: {v:#x}",
            spec.name, spec.sbdf, spec.offset, spec.width, spec.phase
        );
    }
    let p = e.intercepts().platform;
    let show = |v: Option<u64>| v.map_or("unknown".into(), |v| format!("{v:#x}"));
    let _ = writeln!(
        t,
        "MMIO hole: TOLUD {} (fallback {}), TOUUD {} (fallback {})",
        show(p.tolud),
        show(p.low_ram_top),
        show(p.touud),
        show(p.high_ram_top)
    );
    t
}
