//! Ownership tables: a flat per-segment table for BDFs (O(1)), an ordered map for port and
//! MMIO ranges (O(log n)), and the MMCONFIG layout (ECAM windows by address).

use crate::address::Sbdf;
use crate::ecam::EcamWindow;
use std::collections::BTreeMap;

/// Index of a backing server in the multiplexer.
pub type ServerIdx = u16;

const NONE: u16 = u16::MAX;
const FUNCTIONS_PER_SEGMENT: usize = 1 << 16;

/// Owner per BDF: one flat `[u16; 65536]` per segment in use (128 KiB), indexed by
/// `bus << 8 | devfn`; segments are indexed directly, so a lookup is two loads.
/// It also counts the functions each owner holds, so finding an owner's functions (a model
/// going away) costs nothing for an owner with none and stops at its last one otherwise.
#[derive(Debug, Clone, Default)]
pub struct BdfTable {
    segs: Vec<Option<Box<[u16]>>>,
    /// Functions held, by owner.
    held: Vec<usize>,
}

impl BdfTable {
    #[inline]
    pub fn get(&self, sbdf: Sbdf) -> Option<ServerIdx> {
        let seg = self.segs.get(usize::from(sbdf.segment))?.as_ref()?;
        let v = seg[usize::from(sbdf.bdf())];
        (v != NONE).then_some(v)
    }

    pub fn set(&mut self, sbdf: Sbdf, owner: Option<ServerIdx>) {
        // u16::MAX is the table's "nobody": it cannot be an owner.
        let owner = owner.filter(|o| *o != NONE);
        let s = usize::from(sbdf.segment);
        if owner.is_none() && self.segs.get(s).is_none_or(Option::is_none) {
            return;
        }
        if self.segs.len() <= s {
            self.segs.resize_with(s + 1, || None);
        }
        let seg = self.segs[s]
            .get_or_insert_with(|| vec![NONE; FUNCTIONS_PER_SEGMENT].into_boxed_slice());
        let slot = &mut seg[usize::from(sbdf.bdf())];
        let old = std::mem::replace(slot, owner.unwrap_or(NONE));
        if old != NONE {
            self.held[usize::from(old)] -= 1;
        }
        if let Some(o) = owner {
            let o = usize::from(o);
            if self.held.len() <= o {
                self.held.resize(o + 1, 0);
            }
            self.held[o] += 1;
        }
    }

    /// How many functions `owner` holds.
    pub fn held_by(&self, owner: ServerIdx) -> usize {
        self.held.get(usize::from(owner)).copied().unwrap_or(0)
    }

    /// The functions `owner` holds, in order.
    pub fn owned_by(&self, owner: ServerIdx) -> Vec<Sbdf> {
        let n = self.held_by(owner);
        if n == 0 {
            return vec![];
        }
        self.iter()
            .filter(|(_, o)| *o == owner)
            .map(|(s, _)| s)
            .take(n)
            .collect()
    }

    /// Every (function, owner) pair, in order.
    pub fn iter(&self) -> impl Iterator<Item = (Sbdf, ServerIdx)> + '_ {
        self.segs.iter().enumerate().flat_map(|(s, t)| {
            t.iter().flat_map(move |t| {
                t.iter()
                    .enumerate()
                    .filter(|(_, o)| **o != NONE)
                    .map(move |(i, o)| (Sbdf::from_devfn(s as u16, (i >> 8) as u8, i as u8), *o))
            })
        })
    }
}

/// Non-overlapping inclusive ranges with an owner each, ordered by start.
#[derive(Debug, Clone, Default)]
pub struct RangeMap {
    map: BTreeMap<u64, (u64, ServerIdx)>,
}

impl RangeMap {
    /// The range that overlaps `[s, e]`, if any (the first one).
    pub fn overlapping(&self, s: u64, e: u64) -> Option<(u64, u64, ServerIdx)> {
        if let Some((&rs, &(re, o))) = self.map.range(..=s).next_back() {
            if re >= s {
                return Some((rs, re, o));
            }
        }
        self.map
            .range(s..=e)
            .next()
            .map(|(&rs, &(re, o))| (rs, re, o))
    }

    /// Adds `[s, e]` for `owner`, or returns the range in the way.
    pub fn insert(
        &mut self,
        s: u64,
        e: u64,
        owner: ServerIdx,
    ) -> Result<(), (u64, u64, ServerIdx)> {
        if let Some(c) = self.overlapping(s, e) {
            return Err(c);
        }
        self.map.insert(s, (e, owner));
        Ok(())
    }

    /// Removes exactly `[s, e]` if `owner` has it.
    pub fn remove(&mut self, s: u64, e: u64, owner: ServerIdx) -> bool {
        if self.map.get(&s) == Some(&(e, owner)) {
            self.map.remove(&s);
            true
        } else {
            false
        }
    }

    /// Removes every range of `owner`, returning them.
    pub fn remove_owner(&mut self, owner: ServerIdx) -> Vec<(u64, u64)> {
        let gone: Vec<(u64, u64)> = self
            .map
            .iter()
            .filter(|(_, (_, o))| *o == owner)
            .map(|(&s, &(e, _))| (s, e))
            .collect();
        for (s, _) in &gone {
            self.map.remove(s);
        }
        gone
    }

    /// The owner of the range that contains all of `[s, e]` (Xen's rule: a claim must
    /// contain the whole access).
    #[inline]
    pub fn lookup(&self, s: u64, e: u64) -> Option<ServerIdx> {
        let (_, &(re, o)) = self.map.range(..=s).next_back()?;
        (e <= re).then_some(o)
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, ServerIdx)> + '_ {
        self.map.iter().map(|(&s, &(e, o))| (s, e, o))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// The MMCONFIG layout: the enabled ECAM windows of every segment, ordered by address.
/// Windows never overlap in address, nor in (segment, bus).
#[derive(Debug, Clone, Default)]
pub struct McfgLayout {
    windows: Vec<EcamWindow>,
}

impl McfgLayout {
    pub fn windows(&self) -> &[EcamWindow] {
        &self.windows
    }

    /// The window an address falls in.
    #[inline]
    pub fn find(&self, gpa: u64) -> Option<&EcamWindow> {
        // Few windows: a binary search over the sorted vector.
        let i = self.windows.partition_point(|w| w.last() < gpa);
        self.windows.get(i).filter(|w| w.contains(gpa))
    }

    /// A window already there that `w` would collide with.
    pub fn conflict(&self, w: &EcamWindow) -> Option<&EcamWindow> {
        self.windows.iter().find(|o| {
            o.overlaps(w.base, w.last())
                || (o.segment == w.segment && o.start_bus <= w.end_bus && w.start_bus <= o.end_bus)
        })
    }

    /// Adds a window; refuses (returning the other) if it collides.
    pub fn insert(&mut self, w: EcamWindow) -> Result<(), EcamWindow> {
        if let Some(o) = self.conflict(&w) {
            return Err(*o);
        }
        let i = self.windows.partition_point(|o| o.base < w.base);
        self.windows.insert(i, w);
        Ok(())
    }

    pub fn remove(&mut self, w: &EcamWindow) -> bool {
        let before = self.windows.len();
        self.windows.retain(|o| o != w);
        before != self.windows.len()
    }

    /// The window holding a bus of a segment.
    pub fn window_for_bus(&self, segment: u16, bus: u8) -> Option<&EcamWindow> {
        self.windows
            .iter()
            .find(|w| w.segment == segment && w.start_bus <= bus && bus <= w.end_bus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bdf_table_basics() {
        let mut t = BdfTable::default();
        let a = Sbdf::new(0, 2, 0, 0).unwrap();
        let b = Sbdf::new(7, 0xff, 0x1f, 7).unwrap();
        assert_eq!(t.get(a), None);
        t.set(a, Some(3));
        t.set(b, Some(4));
        assert_eq!(t.get(a), Some(3));
        assert_eq!(t.get(b), Some(4));
        assert_eq!(t.get(Sbdf::new(1, 2, 0, 0).unwrap()), None);
        assert_eq!(t.iter().collect::<Vec<_>>(), vec![(a, 3), (b, 4)]);
        t.set(a, None);
        assert_eq!(t.get(a), None);
    }

    #[test]
    fn range_map_rules() {
        let mut m = RangeMap::default();
        m.insert(0x600, 0x67f, 1).unwrap();
        assert_eq!(m.insert(0x670, 0x6ff, 2), Err((0x600, 0x67f, 1)));
        assert_eq!(m.insert(0x500, 0x600, 2), Err((0x600, 0x67f, 1)));
        m.insert(0x680, 0x6ff, 2).unwrap();
        assert_eq!(m.lookup(0x67e, 0x67f), Some(1));
        assert_eq!(m.lookup(0x67f, 0x680), None, "straddles two ranges");
        assert_eq!(m.lookup(0x5ff, 0x5ff), None);
        assert!(!m.remove(0x680, 0x6ff, 1));
        assert!(m.remove(0x680, 0x6ff, 2));
        assert_eq!(m.remove_owner(1), vec![(0x600, 0x67f)]);
        assert!(m.is_empty());
    }

    #[test]
    fn layout_refuses_collisions() {
        let mut l = McfgLayout::default();
        let a = EcamWindow::new(0, 0xb000_0000, 0, 0xff).unwrap();
        l.insert(a).unwrap();
        let b = EcamWindow::new(1, 0xb800_0000, 0, 0x3f).unwrap();
        assert_eq!(l.insert(b), Err(a), "address overlap");
        let c = EcamWindow::new(0, 0xe000_0000, 0x80, 0x80).unwrap();
        assert_eq!(l.insert(c), Err(a), "bus overlap in the same segment");
        let d = EcamWindow::new(1, 0xe000_0000, 0, 0x3f).unwrap();
        l.insert(d).unwrap();
        assert_eq!(l.find(0xe000_1000), Some(&d));
        assert_eq!(l.find(0xbfff_ffff), Some(&a));
        assert_eq!(l.find(0xc000_0000), None);
        assert_eq!(l.window_for_bus(1, 0x3f), Some(&d));
        assert!(l.remove(&a));
        assert_eq!(l.find(0xb000_0000), None);
    }

    proptest! {
        /// The per-owner counts and `owned_by` agree with a walk of the whole table, across
        /// segments, overwrites and releases.
        #[test]
        fn owner_counts_match_the_table(ops in prop::collection::vec((0u16..3, any::<u16>(), prop::option::of(0u16..5)), 1..200)) {
            let mut t = BdfTable::default();
            for (seg, bdf, owner) in ops {
                t.set(Sbdf::from_devfn(seg, (bdf >> 8) as u8, bdf as u8), owner);
            }
            for o in 0u16..6 {
                let walked: Vec<Sbdf> = t.iter().filter(|(_, x)| *x == o).map(|(s, _)| s).collect();
                prop_assert_eq!(t.held_by(o), walked.len());
                prop_assert_eq!(t.owned_by(o), walked);
            }
        }

        /// The range map agrees with a brute-force model on every lookup.
        #[test]
        fn range_map_matches_model(ops in prop::collection::vec((0u64..200, 0u64..20, 0u16..4, any::<bool>()), 1..100), probes in prop::collection::vec((0u64..220, 0u64..8), 50)) {
            let mut m = RangeMap::default();
            let mut model: Vec<(u64, u64, u16)> = vec![];
            for (s, len, o, add) in ops {
                let e = s + len;
                if add {
                    let clash = model.iter().any(|&(ms, me, _)| ms <= e && s <= me);
                    prop_assert_eq!(m.insert(s, e, o).is_err(), clash);
                    if !clash { model.push((s, e, o)); }
                } else {
                    let had = model.iter().position(|&r| r == (s, e, o));
                    prop_assert_eq!(m.remove(s, e, o), had.is_some());
                    if let Some(i) = had { model.remove(i); }
                }
            }
            for (s, len) in probes {
                let e = s + len;
                let want = model.iter().find(|&&(ms, me, _)| ms <= s && e <= me).map(|r| r.2);
                prop_assert_eq!(m.lookup(s, e), want);
            }
        }
    }
}
