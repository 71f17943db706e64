//! The route-lookup workload, shared by `ioreq-mux bench` and bdf-router's criterion bench
//! (`bdf-router/benches/route_lookup.rs` includes this file with `#[path]`, so it may use
//! nothing but `bdf_router`, `ioreq_server` and `std`).
//!
//! One lookup is what the engine does for an MMIO access inside an ECAM window: find the
//! window, decode the access into a configuration access, find the owner of the function.
//! The multiplexer finds the owner in its flat per-segment table ([`Router::config_owner`]).
//! The baseline decodes the same way and then selects the server the way Xen 4.17's
//! `ioreq_server_select` does for a PCI_CONFIG request: servers from the highest id down,
//! skipping disabled ones, the first whose PCI range set contains the SBDF, each range set
//! searched with `rangeset_contains_singleton`'s linear walk ([`XenRangeSet::contains_linear`]).
//! (Xen's walk follows a linked list; the baseline walks a vector, which is kinder to it.)
//!
//! Mapped functions are `2 * k` in Xen's packed SBDF form (`k < bdfs`), owned round-robin
//! (`k % servers`): no two functions of one server are adjacent, so Xen merges nothing and
//! every claim is one range. 65536 functions need segments 0 and 1: both have an ECAM window
//! in every configuration, so the decode is the same everywhere.

use bdf_router::{EcamWindow, Router, Sbdf, ServerIdx, decode_ecam};
use ioreq_server::sim::{MAX_NR_IO_RANGES, MAX_NR_IOREQ_SERVERS, XenRangeSet};
use ioreq_server::{Claim, Dir, IoRange, Ioreq, IoreqType};
use std::hint::black_box;

/// ECAM window bases of segments 0 and 1 (256 buses each).
pub const ECAM_BASES: [u64; 2] = [0xb000_0000, 0xc000_0000];

/// A small, fast, fixed-seed pseudo-random generator (SplitMix64).
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform-enough in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }
}

/// One server as Xen 4.17 keeps it, for selection: enabled flag and PCI range set.
#[derive(Debug, Clone, Default)]
pub struct XenServer {
    pub enabled: bool,
    pub pci: XenRangeSet,
}

/// A configuration of the grid: the router, the Xen-style server array and the accesses.
#[derive(Debug)]
pub struct RouteSetup {
    pub servers: usize,
    pub bdfs: usize,
    pub router: Router,
    /// Indexed by server id; selection walks it from the end.
    pub xen: Vec<Option<XenServer>>,
    /// Guest-physical addresses of the accesses (a power-of-two count).
    pub gpas: Vec<u64>,
    /// The owner each access must find.
    pub expected: Vec<usize>,
}

/// Packed SBDF of the `k`-th mapped function.
pub fn mapped_sbdf(k: usize) -> u32 {
    (2 * k) as u32
}

/// The access the engine sees: a 4-byte MMIO read.
#[inline(always)]
pub fn access(gpa: u64) -> Ioreq {
    Ioreq::new(IoreqType::Copy, Dir::Read, gpa, 4, 0)
}

impl RouteSetup {
    /// `accesses` is rounded up to a power of two; `seed` fixes the access sequence.
    pub fn new(servers: usize, bdfs: usize, accesses: usize, seed: u64) -> Result<Self, String> {
        if servers == 0 || bdfs == 0 || bdfs > 1 << 16 || servers > usize::from(u16::MAX) {
            return Err(format!("bad configuration {servers} x {bdfs}"));
        }
        let mut router = Router::new();
        for i in 0..servers {
            router.add_server(&format!("s{i}"));
        }
        let windows: Vec<EcamWindow> = ECAM_BASES
            .iter()
            .enumerate()
            .map(|(seg, &base)| EcamWindow::new(seg as u16, base, 0, 0xff))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        for w in &windows {
            router
                .replace_window(None, Some(*w))
                .map_err(|e| e.to_string())?;
        }
        let mut xen: Vec<Option<XenServer>> = (0..servers)
            .map(|_| {
                Some(XenServer {
                    enabled: true,
                    pci: XenRangeSet::default(),
                })
            })
            .collect();
        for k in 0..bdfs {
            let owner = k % servers;
            let sbdf = mapped_sbdf(k);
            router
                .claim(owner as ServerIdx, &Claim::Range(IoRange::pci(sbdf)))
                .map_err(|e| e.to_string())?;
            if let Some(x) = xen[owner].as_mut() {
                // No limit: configurations past Xen's are measured anyway (and marked).
                x.pci
                    .add(u64::from(sbdf), u64::from(sbdf), usize::MAX)
                    .map_err(|_| "range limit".to_string())?;
            }
        }
        let n = accesses.max(1).next_power_of_two();
        let mut rng = SplitMix64(seed);
        let mut gpas = Vec::with_capacity(n);
        let mut expected = Vec::with_capacity(n);
        for _ in 0..n {
            let k = rng.below(bdfs as u64) as usize;
            let s = Sbdf::from_xen(mapped_sbdf(k));
            let reg = (rng.below(0x400) * 4) as u16;
            let w = windows
                .get(usize::from(s.segment))
                .ok_or("segment without a window")?;
            gpas.push(w.address_of(s, reg).ok_or("bus outside the window")?);
            expected.push(k % servers);
        }
        let me = RouteSetup {
            servers,
            bdfs,
            router,
            xen,
            gpas,
            expected,
        };
        me.verify()?;
        Ok(me)
    }

    /// Ranges each server has (Xen merges none of them).
    pub fn ranges_per_server(&self) -> usize {
        self.bdfs.div_ceil(self.servers)
    }

    /// Inside Xen 4.17's limits (8 servers, 256 ranges per range set)?
    pub fn within_xen_limits(&self) -> bool {
        self.servers <= MAX_NR_IOREQ_SERVERS && self.ranges_per_server() <= MAX_NR_IO_RANGES
    }

    /// Both lookups find the expected owner for every access.
    pub fn verify(&self) -> Result<(), String> {
        for (g, want) in self.gpas.iter().zip(&self.expected) {
            let m = mux_lookup(&self.router, *g).map(usize::from);
            let x = xen_lookup(&self.router, &self.xen, *g);
            if m != Some(*want) || x != Some(*want) {
                return Err(format!(
                    "access {g:#x}: mux found {m:?}, Xen-style {x:?}, expected {want}"
                ));
            }
        }
        Ok(())
    }

    /// `iters` multiplexer lookups over the access sequence; returns a checksum.
    pub fn run_mux(&self, iters: u64) -> u64 {
        let mask = self.gpas.len() - 1;
        let mut acc = 0u64;
        for i in 0..iters {
            let g = self.gpas[i as usize & mask];
            let o = mux_lookup(black_box(&self.router), black_box(g));
            acc = acc.wrapping_add(o.map_or(0, u64::from));
        }
        black_box(acc)
    }

    /// `iters` Xen-style lookups over the same sequence; returns a checksum.
    pub fn run_xen(&self, iters: u64) -> u64 {
        let mask = self.gpas.len() - 1;
        let mut acc = 0u64;
        for i in 0..iters {
            let g = self.gpas[i as usize & mask];
            let o = xen_lookup(black_box(&self.router), black_box(&self.xen), black_box(g));
            acc = acc.wrapping_add(o.map_or(0, |v| v as u64));
        }
        black_box(acc)
    }
}

/// The multiplexer: ECAM window, decode, flat-table owner (what `Engine::mmio` and
/// `Engine::config` do to find the target).
#[inline]
pub fn mux_lookup(r: &Router, gpa: u64) -> Option<ServerIdx> {
    let req = access(gpa);
    let w = r.ecam_window(req.addr)?;
    let d = decode_ecam(w, &req).ok()?;
    r.config_owner(d.first.sbdf)
}

/// The same decode, then Xen 4.17's selection for a PCI_CONFIG request.
#[inline]
pub fn xen_lookup(r: &Router, servers: &[Option<XenServer>], gpa: u64) -> Option<usize> {
    let req = access(gpa);
    let w = r.ecam_window(req.addr)?;
    let d = decode_ecam(w, &req).ok()?;
    let s = u64::from(d.first.sbdf.to_xen());
    servers
        .iter()
        .enumerate()
        .rev()
        .find_map(|(id, srv)| match srv {
            Some(x) if x.enabled && x.pci.contains_linear(s, s) => Some(id),
            _ => None,
        })
}
