//! 1. Route lookup: ECAM decode + owner lookup, multiplexer against Xen-style selection, over
//!    a grid of server and function counts (see `route_setup.rs` for the workload).

use super::route_setup::RouteSetup;
use super::util::{calibrate, median};
use super::{Effort, progress};
use serde::Serialize;
use std::time::Instant;

/// Servers and mapped functions of the grid.
pub const SERVERS: [usize; 4] = [1, 8, 64, 256];
pub const BDFS: [usize; 3] = [256, 4096, 65536];
/// Xen's real maximum: 8 servers with 256 single-function ranges each.
pub const XEN_MAX: (usize, usize) = (8, 2048);

/// Accesses in the pseudo-random sequence (a power of two) and its seed.
const ACCESSES: usize = 16384;
const SEED: u64 = 0x005e_ed0f_1053;

/// One cell of the grid.
#[derive(Debug, Clone, Serialize)]
pub struct RouteCell {
    pub servers: usize,
    pub bdfs: usize,
    pub ranges_per_server: usize,
    /// Within Xen 4.17's limits (8 servers, 256 ranges per server)? Measured either way.
    pub within_xen_limits: bool,
    /// The grid row (false: the extra 8 x 2048 configuration, Xen's maximum).
    pub grid: bool,
    /// Median over the passes.
    pub mux_ns: f64,
    pub xen_style_ns: f64,
    /// xen_style_ns / mux_ns.
    pub speedup: f64,
    /// Best pass (the cost with nothing else on the machine in the way; flatness uses it, so
    /// a busy neighbour during one cell does not look like growth).
    pub mux_best_ns: f64,
    pub xen_style_best_ns: f64,
}

pub fn run(e: &Effort) -> Result<Vec<RouteCell>, String> {
    let mut configs: Vec<(usize, usize, bool)> = SERVERS
        .iter()
        .flat_map(|&s| BDFS.iter().map(move |&b| (s, b, true)))
        .collect();
    configs.push((XEN_MAX.0, XEN_MAX.1, false));
    let setups = configs
        .iter()
        .map(|&(s, b, _)| RouteSetup::new(s, b, ACCESSES, SEED))
        .collect::<Result<Vec<_>, _>>()?;
    // Iterations for one round of each cell, both ways.
    let iters: Vec<(u64, u64)> = setups
        .iter()
        .map(|s| {
            (
                calibrate(e.route_round, &mut |n| {
                    s.run_mux(n);
                }),
                calibrate(e.route_round, &mut |n| {
                    s.run_xen(n);
                }),
            )
        })
        .collect();
    // Passes over the whole grid: a noisy moment of the machine lands on one pass of every
    // cell, not on every round of one cell; each cell's figure is its median over passes.
    let mut mux: Vec<Vec<f64>> = vec![vec![]; setups.len()];
    let mut xen: Vec<Vec<f64>> = vec![vec![]; setups.len()];
    for _ in 0..e.route_passes {
        for (i, s) in setups.iter().enumerate() {
            let (nm, nx) = iters[i];
            let t = Instant::now();
            s.run_mux(nm);
            mux[i].push(t.elapsed().as_nanos() as f64 / nm as f64);
            let t = Instant::now();
            s.run_xen(nx);
            xen[i].push(t.elapsed().as_nanos() as f64 / nx as f64);
        }
    }
    let mut out = vec![];
    for (i, (setup, &(servers, bdfs, grid))) in setups.iter().zip(&configs).enumerate() {
        let best = |v: &[f64]| v.iter().copied().fold(f64::MAX, f64::min);
        let (mux_best_ns, xen_style_best_ns) = (best(&mux[i]), best(&xen[i]));
        let mux_ns = median(&mut mux[i]);
        let xen_style_ns = median(&mut xen[i]);
        let cell = RouteCell {
            servers,
            bdfs,
            ranges_per_server: setup.ranges_per_server(),
            within_xen_limits: setup.within_xen_limits(),
            grid,
            mux_ns,
            xen_style_ns,
            speedup: xen_style_ns / mux_ns.max(1e-3),
            mux_best_ns,
            xen_style_best_ns,
        };
        progress(&format!(
            "route lookup {servers:>3} servers x {bdfs:>5} functions: mux {mux_ns:6.2} ns, Xen-style {xen_style_ns:10.1} ns ({:.0}x)",
            cell.speedup
        ));
        out.push(cell);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::route_setup::*;

    #[test]
    fn both_lookups_find_every_owner_and_nothing_merges() {
        // Xen's maximum: 8 servers with 256 single-function ranges each.
        let s = RouteSetup::new(8, 2048, 1024, 7).unwrap();
        assert!(s.within_xen_limits());
        for x in s.xen.iter().flatten() {
            assert_eq!(x.pci.len(), 256, "round-robin claims must not merge");
        }
        assert_eq!(s.run_mux(4096), s.run_xen(4096));
        // Past Xen's limits (and into segment 1).
        let s = RouteSetup::new(3, 65536, 512, 7).unwrap();
        assert!(!s.within_xen_limits());
        assert!(s.gpas.iter().any(|&g| g >= ECAM_BASES[1]));
        s.verify().unwrap();
        // Outside every window nothing is found.
        assert_eq!(mux_lookup(&s.router, 0x1000), None);
        assert_eq!(xen_lookup(&s.router, &s.xen, 0x1000), None);
    }
}
