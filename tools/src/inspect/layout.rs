//! The router's and the intercepts' side of the layout: ECAM windows, claims by BDF, by
//! position, of ports and MMIO, intercepted registers, the MMIO hole.

use super::{
    ClaimsView, EcamWindowView, FunctionRun, InterceptView, MmioHoleView, PositionView, RangeView,
};
use crate::engine::Engine;
use bdf_router::{Sbdf, ServerIdx};
use ioreq_server::Backend;

pub(super) fn windows<B: Backend>(e: &Engine<B>) -> Vec<EcamWindowView> {
    e.router()
        .windows()
        .iter()
        .map(|w| EcamWindowView {
            segment: w.segment,
            base: w.base,
            size: w.size(),
            start_bus: w.start_bus,
            end_bus: w.end_bus,
        })
        .collect()
}

/// Consecutive functions of one bus with one owner, as runs: a run never crosses a bus (nor a
/// segment), so `0000:00:1f.7` and `0000:01:00.0` are never one range.
pub fn owner_runs(list: &[(Sbdf, ServerIdx)]) -> Vec<(Sbdf, Sbdf, ServerIdx)> {
    let mut out: Vec<(Sbdf, Sbdf, ServerIdx)> = vec![];
    for &(s, o) in list {
        match out.last_mut() {
            Some((_, end, owner))
                if *owner == o
                    && end.segment == s.segment
                    && end.bus == s.bus
                    && u16::from(end.devfn()) + 1 == u16::from(s.devfn()) =>
            {
                *end = s
            }
            _ => out.push((s, s, o)),
        }
    }
    out
}

pub(super) fn claims<B: Backend>(e: &Engine<B>) -> ClaimsView {
    let r = e.router();
    let name = |i: ServerIdx| r.server_name(i).to_string();
    let ranges = |list: Vec<(u64, u64, ServerIdx)>| {
        list.into_iter()
            .map(|(first, last, o)| RangeView {
                first,
                last,
                owner: name(o),
            })
            .collect()
    };
    ClaimsView {
        functions: owner_runs(&r.functions())
            .into_iter()
            .map(|(a, b, o)| FunctionRun {
                first: a.to_string(),
                last: b.to_string(),
                owner: name(o),
            })
            .collect(),
        positions: r
            .positions()
            .iter()
            .map(|p| PositionView {
                position: p.position.to_string(),
                resolved: p.resolved.map(|s| s.to_string()),
                owner: name(p.owner),
            })
            .collect(),
        ports: ranges(r.port_ranges()),
        mmio: ranges(r.mmio_ranges()),
    }
}

pub(super) fn intercepts<B: Backend>(e: &Engine<B>) -> Vec<InterceptView> {
    e.intercepts()
        .snapshot()
        .into_iter()
        .map(|(it, spec, value)| InterceptView {
            intercept: it.to_string(),
            register: spec.name.to_string(),
            function: spec.sbdf.to_string(),
            offset: spec.offset,
            width: spec.width,
            phase: spec.phase,
            value,
        })
        .collect()
}

pub(super) fn mmio_hole<B: Backend>(e: &Engine<B>) -> MmioHoleView {
    let p = e.intercepts().platform;
    MmioHoleView {
        tolud: p.tolud,
        touud: p.touud,
        low_ram_top: p.low_ram_top,
        high_ram_top: p.high_ram_top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: &str) -> Sbdf {
        t.parse().unwrap_or_else(|e| panic!("{t}: {e}"))
    }

    /// The example: `0000:00:08.0-0000:01:00.0 qemu` was one range.
    #[test]
    fn a_run_never_crosses_a_bus() {
        let o = ServerIdx::from(1u16);
        let mut list: Vec<(Sbdf, ServerIdx)> = (0x40..=0xff)
            .map(|devfn| (Sbdf::from_devfn(0, 0, devfn), o))
            .collect();
        list.push((s("01:00.0"), o));
        list.push((s("01:00.1"), o));
        list.push((s("0001:01:00.2"), o));
        let runs = owner_runs(&list);
        assert_eq!(
            runs,
            vec![
                (s("00:08.0"), s("00:1f.7"), o),
                (s("01:00.0"), s("01:00.1"), o),
                (s("0001:01:00.2"), s("0001:01:00.2"), o),
            ]
        );
    }

    #[test]
    fn a_run_breaks_at_a_gap_or_another_owner() {
        let (a, b) = (ServerIdx::from(1u16), ServerIdx::from(2u16));
        let list = [
            (s("00:01.0"), a),
            (s("00:01.1"), a),
            (s("00:01.3"), a),
            (s("00:01.4"), b),
        ];
        assert_eq!(owner_runs(&list).len(), 3);
    }
}
