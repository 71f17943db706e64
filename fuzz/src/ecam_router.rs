//! Target `ecam_router`: the ECAM/CF8 decoders and the router under arbitrary sequences of
//! claims, releases, window changes and observed guest accesses, checked against a model
//! after every operation:
//!
//! - every claim/release succeeds or fails exactly as the rules say (no double ownership,
//!   claims refused when anyone owns a part, releases only by the owner, MMIO claims never
//!   over an ECAM window, windows never over each other nor over claimed MMIO);
//! - `config_owner` equals raw claims overlaid with position claims resolved in claim order
//!   against the bridge tree the router reports, and each position's `resolved` equals that;
//! - the bridge tree is consistent (parents first, positions computed from the parent's bus
//!   numbers) and `observe_write` reports exactly the positions that moved;
//! - windows, port and MMIO owners agree with brute-force lookups;
//! - `decode_ecam`, `EcamWindow::{new, decode, address_of}` and `Cf8Latch::decode` agree
//!   with models of the PCIe ECAM layout and Xen's CF8 conversion.
//!
//! Input: a sequence of operations, each an opcode byte and its fields (see `op`).

use crate::Bytes;
use bdf_router::bridges::BridgeInfo;
use bdf_router::router::MAX_PCI_CLAIM;
use bdf_router::{
    Cf8Latch, ConfigAccess, ConfigPath, EcamReject, EcamWindow, Router, Sbdf, ServerIdx,
    WindowError, decode_ecam,
};
use ioreq_server::{Claim, Dir, IoRange, Ioreq, IoreqType, Position, RangeKind, size_mask};
use std::collections::BTreeMap;

const SERVERS: u8 = 4;
const DEVFNS: [u8; 8] = [0x00, 0x08, 0x10, 0x11, 0x18, 0x19, 0xf8, 0x01];
const REGS: [u16; 16] = [
    0x00, 0x08, 0x0a, 0x0b, 0x0c, 0x0e, 0x18, 0x19, 0x1a, 0x1b, 0x17, 0x16, 0x0d, 0x04, 0x3c, 0x100,
];

fn pick_sbdf(b: &mut Bytes<'_>) -> Sbdf {
    let (s, bus, d) = (b.u8(), b.u8(), b.u8());
    let segment = match s {
        0xff => 0xffff,
        0xfe => 0x10,
        _ => u16::from(s & 1),
    };
    let bus = if bus < 0xe0 { bus % 8 } else { bus };
    let devfn = if d < 0xc0 {
        DEVFNS[usize::from(d) % DEVFNS.len()]
    } else {
        d
    };
    Sbdf::from_devfn(segment, bus, devfn)
}

fn pick_owner(b: &mut Bytes<'_>) -> ServerIdx {
    // One past the registered servers: an index the router never named.
    ServerIdx::from(b.u8() % (SERVERS + 1))
}

fn pick_window(b: &mut Bytes<'_>) -> Result<EcamWindow, WindowError> {
    let sel = b.u8();
    let segment = u16::from(sel & 1);
    let base = if sel & 0x80 == 0 {
        u64::from(b.u8() % 64) << 20
    } else {
        b.u64()
    };
    let (start, end) = match sel >> 1 & 7 {
        0 => (0, 0xff),
        1 => (0, 0x3f),
        2 => (0x40, 0x7f),
        3 => (0, 0),
        _ => (b.u8(), b.u8()),
    };
    let got = EcamWindow::new(segment, base, start, end);
    // The model of a window that can exist.
    let size = (u64::from(end) + 1).saturating_sub(u64::from(start)) << 20;
    let want = if end < start {
        Err("empty")
    } else if base % (1 << 20) != 0 {
        Err("unaligned")
    } else if base.checked_add(size).is_none() {
        Err("wraps")
    } else {
        Ok(())
    };
    match (&got, want) {
        (Ok(w), Ok(())) => {
            assert_eq!(
                (w.segment, w.base, w.start_bus, w.end_bus),
                (segment, base, start, end)
            );
            assert_eq!(w.size(), size);
            assert_eq!(w.last(), base + size - 1);
        }
        (Err(WindowError::EmptyBusRange { .. }), Err("empty"))
        | (Err(WindowError::Unaligned(_)), Err("unaligned"))
        | (Err(WindowError::Wraps { .. }), Err("wraps")) => {}
        (g, w) => {
            panic!("EcamWindow::new({segment}, {base:#x}, {start}, {end}) = {g:?}, model {w:?}")
        }
    }
    got
}

fn windows_collide(a: &EcamWindow, b: &EcamWindow) -> bool {
    (a.base <= b.last() && b.base <= a.last())
        || (a.segment == b.segment && a.start_bus <= b.end_bus && b.start_bus <= a.end_bus)
}

#[derive(Default)]
struct Model {
    raw: BTreeMap<u32, ServerIdx>,
    positions: Vec<(ServerIdx, Position)>,
    ports: Vec<(u64, u64, ServerIdx)>,
    mmio: Vec<(u64, u64, ServerIdx)>,
    windows: Vec<EcamWindow>,
}

/// Where a position resolves in the tree the router reports (`Router::bridges`): a hop is
/// the first bridge found at the current function; the next bus is its secondary bus, which
/// must be above the current one and reached through every bridge of the chain.
fn resolve(br: &[BridgeInfo], p: &Position) -> Option<Sbdf> {
    let (&last, hops) = p.path.split_last()?;
    let mut bus = p.root_bus;
    let mut chain = vec![];
    for &devfn in hops {
        let here = Sbdf::from_devfn(p.segment, bus, devfn);
        let i = br.iter().position(|b| b.sbdf == Some(here))?;
        let next = br[i].numbers.secondary;
        chain.push(i);
        if next <= bus || !reaches(br, &chain, next) {
            return None;
        }
        bus = next;
    }
    Some(Sbdf::from_devfn(p.segment, bus, last))
}

fn reaches(br: &[BridgeInfo], chain: &[usize], n: u8) -> bool {
    let Some((&last, above)) = chain.split_last() else {
        return true;
    };
    br[last].numbers.secondary == n
        && n != 0
        && above.iter().all(|&i| {
            let b = &br[i].numbers;
            b.secondary < n && n <= b.subordinate
        })
}

fn chain_of(br: &[BridgeInfo], mut i: usize) -> Vec<usize> {
    let mut c = vec![i];
    while let Some(p) = br[i].parent {
        c.push(p);
        i = p;
    }
    c.reverse();
    c
}

fn check_bridges(br: &[BridgeInfo]) {
    for (i, b) in br.iter().enumerate() {
        match b.parent {
            None => {
                let s = b.sbdf.expect("a bridge on a root bus is always reachable");
                assert_eq!((s.segment, s.devfn()), (b.segment, b.devfn));
            }
            Some(p) => {
                assert!(p < i, "parent {p} of bridge {i} comes first");
                assert_eq!(br[p].segment, b.segment);
                let want = br[p].sbdf.and_then(|pat| {
                    let bus = br[p].numbers.secondary;
                    (bus > pat.bus && reaches(br, &chain_of(br, p), bus))
                        .then(|| Sbdf::from_devfn(b.segment, bus, b.devfn))
                });
                assert_eq!(b.sbdf, want, "where bridge {i} is: {br:?}");
            }
        }
    }
}

impl Model {
    /// The owner table and each position's resolution, from scratch: raw claims, then
    /// positions in claim order, each taking its function unless someone else has it.
    fn expected(&self, br: &[BridgeInfo]) -> (BTreeMap<Sbdf, ServerIdx>, Vec<Option<Sbdf>>) {
        let mut t: BTreeMap<Sbdf, ServerIdx> = self
            .raw
            .iter()
            .map(|(&v, &o)| (Sbdf::from_xen(v), o))
            .collect();
        let mut res = vec![];
        for (owner, p) in &self.positions {
            let mut to = resolve(br, p);
            if let Some(s) = to {
                match t.get(&s) {
                    Some(o) if o != owner => to = None,
                    _ => {
                        t.insert(s, *owner);
                    }
                }
            }
            res.push(to);
        }
        (t, res)
    }
}

fn pci_range_valid(start: u64, end: u64) -> bool {
    start <= end && end <= u64::from(u32::MAX) && end - start < MAX_PCI_CLAIM
}

pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let mut r = Router::new();
    for i in 0..SERVERS {
        assert_eq!(r.add_server(&format!("s{i}")), ServerIdx::from(i));
    }
    let mut m = Model::default();
    let mut ops = 0u32;
    while !b.is_empty() && ops < 200 {
        ops += 1;
        let mut probes: Vec<Sbdf> = vec![];
        let mut gpas: Vec<u64> = vec![];
        let before: Vec<Option<Sbdf>> = r.positions().iter().map(|p| p.resolved).collect();
        let mut moved = None;
        let (table, _) = m.expected(&r.bridges());
        let owned = |s: Sbdf| table.get(&s).copied();
        match b.u8() % 17 {
            op @ (0 | 1 | 2) => {
                // PCI range claims: small ranges of the fuzzed functions, or any range.
                let owner = pick_owner(&mut b);
                let (start, end) = if op == 1 {
                    let s = b.u64();
                    let e = match b.u8() {
                        0..=0x7f => s.wrapping_add(u64::from(b.u16())),
                        _ => b.u64(),
                    };
                    (s, e)
                } else {
                    let s = u64::from(pick_sbdf(&mut b).to_xen());
                    (s, s + u64::from(b.u8() & 0x3f))
                };
                let valid = pci_range_valid(start, end);
                if valid && end - start > 0x2000 {
                    continue; // valid but slow: not worth the fuzzer's time
                }
                let claim = Claim::Range(IoRange::new(RangeKind::Pci, start, end));
                if valid {
                    probes.extend((start..=end).map(|v| Sbdf::from_xen(v as u32)));
                }
                if op == 2 {
                    let got = r.release(owner, &claim);
                    let want =
                        valid && (start..=end).all(|v| m.raw.get(&(v as u32)) == Some(&owner));
                    assert_eq!(got.is_ok(), want, "release {claim} by {owner}: {got:?}");
                    if want {
                        for v in start..=end {
                            m.raw.remove(&(v as u32));
                        }
                    }
                } else {
                    let got = r.claim(owner, &claim);
                    let want =
                        valid && (start..=end).all(|v| owned(Sbdf::from_xen(v as u32)).is_none());
                    assert_eq!(got.is_ok(), want, "claim {claim} by {owner}: {got:?}");
                    if want {
                        for v in start..=end {
                            m.raw.insert(v as u32, owner);
                        }
                    }
                }
            }
            op @ (3 | 4) => {
                let owner = pick_owner(&mut b);
                let sel = b.u8();
                let start = if sel & 1 == 0 {
                    u64::from(b.u8()) << 4
                } else {
                    u64::from(b.u16())
                };
                let end = if sel & 2 == 0 {
                    start + u64::from(b.u8())
                } else {
                    u64::from(b.u32())
                };
                let claim = Claim::Range(IoRange::new(RangeKind::Port, start, end));
                gpas.extend([start, end]);
                if op == 3 {
                    let got = r.claim(owner, &claim);
                    let want = start <= end
                        && end <= 0xffff
                        && !m.ports.iter().any(|&(s, e, _)| s <= end && start <= e);
                    assert_eq!(got.is_ok(), want, "claim {claim} by {owner}: {got:?}");
                    if want {
                        m.ports.push((start, end, owner));
                    }
                } else {
                    let got = r.release(owner, &claim);
                    let i = m.ports.iter().position(|&x| x == (start, end, owner));
                    assert_eq!(
                        got.is_ok(),
                        i.is_some(),
                        "release {claim} by {owner}: {got:?}"
                    );
                    if let Some(i) = i {
                        m.ports.remove(i);
                    }
                }
            }
            op @ (5 | 6) => {
                let owner = pick_owner(&mut b);
                let sel = b.u8();
                let start = if sel & 1 == 0 {
                    (u64::from(b.u8() % 64) << 20) + (u64::from(b.u8()) << 12)
                } else {
                    b.u64()
                };
                let end = if sel & 2 == 0 {
                    start.saturating_add(u64::from(b.u16()) << (b.u8() & 15))
                } else {
                    b.u64()
                };
                let claim = Claim::Range(IoRange::new(RangeKind::Mmio, start, end));
                gpas.extend([start, end]);
                if op == 5 {
                    let got = r.claim(owner, &claim);
                    let want = start <= end
                        && !m.windows.iter().any(|w| w.overlaps(start, end))
                        && !m.mmio.iter().any(|&(s, e, _)| s <= end && start <= e);
                    assert_eq!(got.is_ok(), want, "claim {claim} by {owner}: {got:?}");
                    if want {
                        m.mmio.push((start, end, owner));
                    }
                } else {
                    let got = r.release(owner, &claim);
                    let i = m.mmio.iter().position(|&x| x == (start, end, owner));
                    assert_eq!(
                        got.is_ok(),
                        i.is_some(),
                        "release {claim} by {owner}: {got:?}"
                    );
                    if let Some(i) = i {
                        m.mmio.remove(i);
                    }
                }
            }
            7 => {
                let owner = pick_owner(&mut b);
                let sel = b.u8();
                let p = if sel & 0x80 != 0 && !m.positions.is_empty() {
                    // Someone's existing position, claimed again.
                    m.positions[usize::from(b.u8()) % m.positions.len()]
                        .1
                        .clone()
                } else {
                    let hops = usize::from(sel % 5);
                    Position {
                        segment: u16::from(b.u8() & 1),
                        root_bus: if sel & 0x40 != 0 { b.u8() } else { 0 },
                        path: (0..hops)
                            .map(|_| {
                                let d = b.u8();
                                if d < 0xc0 {
                                    DEVFNS[usize::from(d) % DEVFNS.len()]
                                } else {
                                    d
                                }
                            })
                            .collect(),
                    }
                };
                let got = r.claim(owner, &Claim::Position(p.clone()));
                let res = resolve(&r.bridges(), &p);
                let want = !p.path.is_empty()
                    && !m.positions.iter().any(|(_, q)| *q == p)
                    && res.is_none_or(|s| owned(s).is_none());
                assert_eq!(got.is_ok(), want, "claim position {p} by {owner}: {got:?}");
                if want {
                    m.positions.push((owner, p));
                }
                probes.extend(res);
            }
            8 => {
                let owner = pick_owner(&mut b);
                let k = usize::from(b.u8());
                let p = match m.positions.get(k % m.positions.len().max(1)) {
                    Some((_, p)) if k & 0x80 == 0 => p.clone(),
                    _ => Position {
                        segment: 0,
                        root_bus: 0,
                        path: vec![b.u8()],
                    },
                };
                let got = r.release(owner, &Claim::Position(p.clone()));
                let i = m.positions.iter().position(|(o, q)| *o == owner && *q == p);
                assert_eq!(
                    got.is_ok(),
                    i.is_some(),
                    "release position {p} by {owner}: {got:?}"
                );
                if let Some(i) = i {
                    m.positions.remove(i);
                }
            }
            9 => {
                let owner = pick_owner(&mut b);
                let gone = r.release_all(owner);
                let n_raw = m.raw.values().filter(|&&o| o == owner).count();
                let n_pos = m.positions.iter().filter(|(o, _)| *o == owner).count();
                let n_ports = m.ports.iter().filter(|x| x.2 == owner).count();
                let n_mmio = m.mmio.iter().filter(|x| x.2 == owner).count();
                assert_eq!(
                    gone.len(),
                    n_raw + n_pos + n_ports + n_mmio,
                    "release_all({owner})"
                );
                m.raw.retain(|_, o| *o != owner);
                m.positions.retain(|(o, _)| *o != owner);
                m.ports.retain(|x| x.2 != owner);
                m.mmio.retain(|x| x.2 != owner);
            }
            10 => {
                let sel = b.u8();
                let old = match sel & 3 {
                    0 => None,
                    1 if !m.windows.is_empty() => {
                        Some(m.windows[usize::from(b.u8()) % m.windows.len()])
                    }
                    _ => pick_window(&mut b).ok(),
                };
                let new = if sel & 4 == 0 {
                    pick_window(&mut b).ok()
                } else {
                    None
                };
                let got = r.replace_window(old, new);
                // The old window goes (if it is there); a new one that collides with another
                // window or with claimed MMIO is refused and the old one stays.
                let removed = old.and_then(|o| m.windows.iter().position(|w| *w == o));
                let mut ws = m.windows.clone();
                if let Some(i) = removed {
                    ws.remove(i);
                }
                let want = match new {
                    Some(n) => {
                        let clash = ws.iter().any(|w| windows_collide(w, &n))
                            || m.mmio.iter().any(|&(s, e, _)| n.overlaps(s, e));
                        if !clash {
                            ws.push(n);
                            m.windows = ws;
                        }
                        !clash
                    }
                    None => {
                        m.windows = ws;
                        true
                    }
                };
                assert_eq!(
                    got.is_ok(),
                    want,
                    "replace_window({old:?}, {new:?}): {got:?}"
                );
                for w in old.iter().chain(new.iter()) {
                    gpas.extend([
                        w.base,
                        w.last(),
                        w.base.wrapping_sub(1),
                        w.last().wrapping_add(1),
                    ]);
                }
            }
            op @ (11 | 12) => {
                let s = pick_sbdf(&mut b);
                let k = b.u8();
                let reg = if k < 0xc0 {
                    REGS[usize::from(k) % REGS.len()]
                } else {
                    b.u16() & 0xfff
                };
                let size = [1u8, 2, 4, 4][usize::from(b.u8() & 3)];
                let path = if b.bool() {
                    ConfigPath::Ecam
                } else {
                    ConfigPath::Cf8
                };
                let value = u64::from(b.u32()) & size_mask(u32::from(size));
                let Ok(acc) = ConfigAccess::new(s, u32::from(reg), size, path) else {
                    assert!(u32::from(reg) + u32::from(size) > 0x1000);
                    continue;
                };
                let _ = r.needs_header_type(&acc);
                if op == 11 {
                    r.observe_read(&acc, value);
                } else {
                    moved = Some(r.observe_write(&acc, value));
                }
                probes.push(s);
            }
            13 => {
                let s = pick_sbdf(&mut b);
                let h = b.u8();
                r.learn_header_type(s, h);
            }
            14 => {
                // decode_ecam against a model, on a window of the router or any window.
                let w = if b.bool() && !m.windows.is_empty() {
                    m.windows[usize::from(b.u8()) % m.windows.len()]
                } else {
                    match pick_window(&mut b) {
                        Ok(w) => w,
                        Err(_) => continue,
                    }
                };
                let sel = b.u8();
                let addr = match sel & 3 {
                    0 => w.base.wrapping_add(u64::from(b.u32()) % w.size().max(1)),
                    1 => w.last().wrapping_sub(u64::from(b.u8())),
                    2 => w.base.wrapping_sub(u64::from(b.u8())),
                    _ => b.u64(),
                };
                let mut req = Ioreq::new(
                    IoreqType::Copy,
                    Dir::Read,
                    addr,
                    crate::size_from(b.u8()),
                    0,
                );
                if sel & 4 != 0 {
                    req.count = u32::from(b.u8());
                }
                req.data_is_ptr = sel & 8 != 0;
                req.dir = if sel & 16 != 0 { Dir::Write } else { Dir::Read };
                check_decode(&w, &req, b.u64());
                gpas.push(addr);
            }
            15 => {
                let mut l = Cf8Latch { value: b.u32() };
                let sel = b.u8();
                let port = if sel & 0x80 == 0 {
                    0xcf8 + u64::from(sel & 7)
                } else {
                    b.u64()
                };
                let size = match b.u8() {
                    k @ 0..=0x7f => crate::size_from(k),
                    k @ 0x80..=0x87 => u32::MAX - u32::from(k & 7),
                    _ => b.u32(),
                };
                let dir = if sel & 0x20 != 0 {
                    Dir::Write
                } else {
                    Dir::Read
                };
                check_cf8(&l, port, size, dir);
                if Cf8Latch::is_address_port(port, size) {
                    let v = b.u32();
                    l.write(u64::from(v) | (u64::from(b.u32()) << 32));
                    assert_eq!(l.value, v);
                    assert_eq!(l.enabled(), v & 0x8000_0000 != 0);
                }
                r.cf8().value = l.value;
                assert_eq!(r.cf8_value(), l.value);
            }
            _ => {
                // Probes only.
                probes.push(pick_sbdf(&mut b));
                gpas.push(b.u64());
                gpas.push((u64::from(b.u8() % 64) << 20) + u64::from(b.u16()));
            }
        }
        // Where positions pointed before: a stale owner would stay behind there.
        probes.extend(before.iter().flatten());
        check(&r, &m, &probes, &gpas, false);
        if let Some(moved) = moved {
            let after: Vec<Option<Sbdf>> = r.positions().iter().map(|p| p.resolved).collect();
            let mut changed: Vec<_> = r
                .positions()
                .iter()
                .zip(before.iter().zip(after.iter()))
                .filter(|(_, (a, b))| a != b)
                .map(|(p, (a, b))| (p.owner, p.position.clone(), *a, *b))
                .collect();
            let mut reported: Vec<_> = moved
                .into_iter()
                .map(|mv| (mv.owner, mv.position, mv.from, mv.to))
                .collect();
            changed.sort();
            reported.sort();
            assert_eq!(reported, changed, "observe_write reports exactly the moves");
        }
    }
    check(&r, &m, &[], &[], true);
    if std::env::var_os("FUZZ_DEBUG").is_some() {
        eprintln!("{ops} operations\nwindows {:?}", r.windows());
        eprintln!("bridges {:#?}\npositions {:#?}", r.bridges(), r.positions());
        eprintln!("functions {:?}", r.functions());
        eprintln!("ports {:x?}\nmmio {:x?}", r.port_ranges(), r.mmio_ranges());
    }
}

fn check(r: &Router, m: &Model, probes: &[Sbdf], gpas: &[u64], full: bool) {
    let br = r.bridges();
    check_bridges(&br);
    let (table, res) = m.expected(&br);
    // Positions, in claim order, resolved as the model says.
    let pos = r.positions();
    assert_eq!(pos.len(), m.positions.len());
    for ((p, (owner, want)), to) in pos.iter().zip(m.positions.iter()).zip(res.iter()) {
        assert_eq!((&p.owner, &p.position), (owner, want));
        assert_eq!(
            p.resolved, *to,
            "position {} of {owner}: {br:?}",
            p.position
        );
    }
    // The owner table.
    for s in probes
        .iter()
        .chain(table.keys())
        .chain(res.iter().flatten())
    {
        assert_eq!(r.config_owner(*s), table.get(s).copied(), "owner of {s}");
    }
    if full {
        let got: BTreeMap<Sbdf, ServerIdx> = r.functions().into_iter().collect();
        assert_eq!(got, table, "whole owner table");
    }
    // Windows: as the model has them, never colliding, never over claimed MMIO.
    let mut ws = m.windows.clone();
    ws.sort_by_key(|w| w.base);
    assert_eq!(r.windows(), &ws[..], "windows");
    for (i, a) in ws.iter().enumerate() {
        for c in &ws[i + 1..] {
            assert!(!windows_collide(a, c), "{a} collides with {c}");
        }
        for (s, e, _) in r.mmio_ranges() {
            assert!(!a.overlaps(s, e), "{a} over claimed MMIO {s:#x}-{e:#x}");
        }
    }
    // Ports and MMIO.
    let sorted = |v: &[(u64, u64, ServerIdx)]| {
        let mut v = v.to_vec();
        v.sort_unstable();
        v
    };
    assert_eq!(r.port_ranges(), sorted(&m.ports), "port ranges");
    assert_eq!(r.mmio_ranges(), sorted(&m.mmio), "MMIO ranges");
    for g in gpas
        .iter()
        .copied()
        .chain(ws.iter().flat_map(|w| [w.base, w.last()]))
    {
        let want = ws.iter().find(|w| w.contains(g));
        assert_eq!(r.ecam_window(g), want, "window at {g:#x}");
        for len in [0u64, 1, 3, 0xfff] {
            let e = g.saturating_add(len);
            let lookup = |v: &[(u64, u64, ServerIdx)]| {
                v.iter()
                    .find(|&&(s, end, _)| s <= g && e <= end)
                    .map(|x| x.2)
            };
            assert_eq!(
                r.mmio_owner(g, e),
                lookup(&m.mmio),
                "MMIO owner {g:#x}-{e:#x}"
            );
            if e <= 0xffff {
                assert_eq!(
                    r.port_owner(g, e),
                    lookup(&m.ports),
                    "port owner {g:#x}-{e:#x}"
                );
            }
        }
    }
}

/// The ECAM layout (PCIe base spec 4.0, 7.2.2) and the multiplexer's rules for MMIO in a
/// window: single, not through a pointer, 1/2/4/8 bytes naturally aligned; 8 bytes are two
/// dwords of one function.
fn check_decode(w: &EcamWindow, req: &Ioreq, data: u64) {
    let got = decode_ecam(w, req);
    let want: Result<Vec<(Sbdf, u16, u8)>, &str> = if req.count != 1 {
        Err("Rep")
    } else if req.data_is_ptr {
        Err("Pointer")
    } else if !matches!(req.size, 1 | 2 | 4 | 8) {
        Err("Size")
    } else if req.addr % u64::from(req.size) != 0 || !(w.base..=w.last()).contains(&req.addr) {
        Err("Unaligned")
    } else {
        let off = req.addr - w.base;
        let bus = u64::from(w.start_bus) + (off >> 20);
        assert!(bus <= u64::from(w.end_bus));
        let s = Sbdf::from_devfn(w.segment, bus as u8, (off >> 12) as u8);
        let reg = (off & 0xfff) as u16;
        Ok(if req.size == 8 {
            vec![(s, reg, 4), (s, reg + 4, 4)]
        } else {
            vec![(s, reg, req.size as u8)]
        })
    };
    match (&got, &want) {
        (Ok(d), Ok(v)) => {
            let mut parts = vec![d.first];
            parts.extend(d.second);
            let parts: Vec<(Sbdf, u16, u8)> =
                parts.iter().map(|a| (a.sbdf, a.reg, a.size)).collect();
            assert_eq!(&parts, v, "decode of {req:?} in {w}");
            for a in [Some(d.first), d.second].into_iter().flatten() {
                assert_eq!(a.path, ConfigPath::Ecam);
                assert!(u32::from(a.reg) + u32::from(a.size) <= 0x1000);
                assert!(ConfigAccess::new(a.sbdf, a.reg.into(), a.size, ConfigPath::Ecam).is_ok());
            }
            assert_eq!(w.address_of(d.first.sbdf, d.first.reg), Some(req.addr));
            assert_eq!(w.decode(req.addr), Some((d.first.sbdf, d.first.reg)));
            let (lo, hi) = d.split_data(data);
            let back = d.join_data(lo, hi);
            if d.second.is_some() {
                assert_eq!(back, data);
            } else {
                assert_eq!((lo, hi, back), (data, 0, data));
            }
        }
        (Err(e), Err(name)) => {
            let ok = matches!(
                (e, *name),
                (EcamReject::Rep(_), "Rep")
                    | (EcamReject::Pointer, "Pointer")
                    | (EcamReject::Size(_), "Size")
                    | (EcamReject::Unaligned { .. }, "Unaligned")
            );
            assert!(ok, "decode of {req:?} in {w}: {e:?}, model {name}");
            let _ = e.to_string();
        }
        _ => panic!("decode of {req:?} in {w}: {got:?}, model {want:?}"),
    }
}

/// Xen's CF8/CFC conversion: CFC..CFF with the enable bit set, the access inside the 4-byte
/// data window; function from CF8 23:8, register from CF8 7:2 and the port's low bits.
fn check_cf8(l: &Cf8Latch, port: u64, size: u32, dir: Dir) {
    let got = l.decode(port, size, dir);
    let want = (l.value & 0x8000_0000 != 0
        && (0xcfc..=0xcff).contains(&port)
        && (port - 0xcfc) + u64::from(size) <= 4)
        .then(|| {
            (
                Sbdf::from_xen((l.value >> 8) & 0xffff),
                (l.value & 0xfc) as u16 | (port & 3) as u16,
                size as u8,
            )
        });
    assert_eq!(
        got.map(|a| (a.sbdf, a.reg, a.size)),
        want,
        "CF8 {:#x} port {port:#x} size {size}",
        l.value
    );
    if let Some(a) = got {
        assert_eq!(a.path, ConfigPath::Cf8);
        assert_eq!(a.sbdf.segment, 0);
        assert!(a.reg < 0x100);
    }
}
