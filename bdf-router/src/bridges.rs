//! Bridge tracking: learns the PCI tree from the guest's own configuration accesses and says
//! where each function is now.
//!
//! A type-1 (bridge) header keeps its bus numbers at 0x18 (primary), 0x19 (secondary) and
//! 0x1a (subordinate) (PCI-to-PCI Bridge Architecture spec 1.2, 3.2.5.2-3.2.5.4). The header
//! type is bits 6:0 of register 0x0e (PCI Local Bus spec 3.0, 6.2.1). Firmware reads the
//! header type before it programs bus numbers, so watching reads of 0x0e and writes of
//! 0x18-0x1a is enough to follow numbering and renumbering.
//!
//! Bridges are remembered by their place in the tree (parent bridge + devfn), not by BDF: when
//! an upstream bridge is renumbered, everything below it moves with it.
//!
//! Reachability follows how a configuration cycle travels: bus N is reached through a bridge
//! when N is its secondary bus, or when N lies in (secondary, subordinate] and N is reached
//! through one of the bridges on its secondary bus. A bridge whose secondary bus is 0 or not
//! above its own bus forwards nothing (reset state).

use crate::address::Sbdf;
use serde::Serialize;
use std::collections::HashMap;

pub use ioreq_server::pci::{
    PCI_CLASS_BRIDGE_PCI, PCI_CLASS_REVISION, PCI_HEADER_TYPE, PCI_HEADER_TYPE_BRIDGE,
    PCI_HEADER_TYPE_MASK, PCI_PRIMARY_BUS, PCI_SECONDARY_BUS, PCI_SUBORDINATE_BUS,
};

/// A bridge's three bus numbers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct BusNumbers {
    pub primary: u8,
    pub secondary: u8,
    pub subordinate: u8,
}

/// A bridge as the tracker knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BridgeInfo {
    /// Where it is now (`None` when no configuration cycle can reach it).
    pub sbdf: Option<Sbdf>,
    pub segment: u16,
    pub devfn: u8,
    /// Index of the parent bridge, `None` when it sits on a root bus.
    pub parent: Option<usize>,
    pub numbers: BusNumbers,
}

#[derive(Debug, Clone)]
struct Bridge {
    segment: u16,
    parent: Option<usize>,
    /// Bus it sits on when `parent` is `None`.
    root_bus: u8,
    devfn: u8,
    nums: BusNumbers,
}

/// The tree of bridges of every segment.
#[derive(Debug, Clone, Default)]
pub struct BridgeTracker {
    bridges: Vec<Bridge>,
    /// Where each bridge is now, when reachable (recomputed on every change).
    at: Vec<Option<Sbdf>>,
    by_sbdf: HashMap<Sbdf, usize>,
    /// Header layout learnt from reads of 0x0e, by the function's BDF when read.
    header_types: HashMap<Sbdf, u8>,
    /// Per segment: its root bus (the first bus of its ECAM window; 0 for CF8).
    root_bus: HashMap<u16, u8>,
}

impl BridgeTracker {
    /// Sets the root bus of a segment (default 0).
    pub fn set_root_bus(&mut self, segment: u16, bus: u8) {
        self.root_bus.insert(segment, bus);
    }

    pub fn root_bus(&self, segment: u16) -> u8 {
        self.root_bus.get(&segment).copied().unwrap_or(0)
    }

    /// The header layout of a function, if known.
    pub fn header_type(&self, sbdf: Sbdf) -> Option<u8> {
        self.header_types.get(&sbdf).copied()
    }

    /// Records a function's header layout (from a read of 0x0e, or a probe).
    pub fn learn_header_type(&mut self, sbdf: Sbdf, header: u8) {
        self.header_types
            .insert(sbdf, header & PCI_HEADER_TYPE_MASK);
    }

    /// Is the function at `sbdf` a bridge we follow?
    pub fn bridge_at(&self, sbdf: Sbdf) -> Option<usize> {
        self.by_sbdf.get(&sbdf).copied()
    }

    /// Applies a write of `size` bytes at `reg` to a function known to be a bridge (or
    /// learnt to be one). Returns true if any bus number changed.
    pub fn write(&mut self, sbdf: Sbdf, reg: u16, size: u8, data: u64) -> bool {
        let end = reg + u16::from(size);
        if end <= PCI_PRIMARY_BUS || reg > PCI_SUBORDINATE_BUS {
            return false;
        }
        let idx = match self.by_sbdf.get(&sbdf) {
            Some(&i) => i,
            None => {
                if self.header_type(sbdf) != Some(PCI_HEADER_TYPE_BRIDGE) {
                    return false;
                }
                self.add_bridge(sbdf)
            }
        };
        let mut nums = self.bridges[idx].nums;
        for b in reg.max(PCI_PRIMARY_BUS)..end.min(PCI_SUBORDINATE_BUS + 1) {
            let byte = (data >> (8 * u32::from(b - reg))) as u8;
            match b {
                PCI_PRIMARY_BUS => nums.primary = byte,
                PCI_SECONDARY_BUS => nums.secondary = byte,
                _ => nums.subordinate = byte,
            }
        }
        let changed = nums.secondary != self.bridges[idx].nums.secondary
            || nums.subordinate != self.bridges[idx].nums.subordinate;
        self.bridges[idx].nums = nums;
        if changed {
            self.recompute();
        }
        changed
    }

    fn add_bridge(&mut self, sbdf: Sbdf) -> usize {
        let root = self.root_bus(sbdf.segment);
        // Its parent is the reachable bridge whose secondary bus it sits on.
        let parent = if sbdf.bus == root {
            None
        } else {
            self.at.iter().enumerate().find_map(|(i, at)| {
                let at = (*at)?;
                (at.segment == sbdf.segment && self.bridges[i].nums.secondary == sbdf.bus)
                    .then_some(i)
            })
        };
        self.bridges.push(Bridge {
            segment: sbdf.segment,
            parent,
            // A bridge whose parent we never saw (the multiplexer attached late) is pinned to
            // the bus it was found on.
            root_bus: sbdf.bus,
            devfn: sbdf.devfn(),
            nums: BusNumbers::default(),
        });
        self.recompute();
        self.bridges.len() - 1
    }

    /// Is bus `n` reachable below the chain of bridges `chain` (top first), given that it is
    /// the secondary bus of the last one?
    fn reaches(&self, chain: &[usize], n: u8) -> bool {
        let Some((&last, above)) = chain.split_last() else {
            return true;
        };
        let l = &self.bridges[last].nums;
        if l.secondary != n || n == 0 {
            return false;
        }
        above.iter().all(|&i| {
            let b = &self.bridges[i].nums;
            b.secondary < n && n <= b.subordinate
        })
    }

    fn chain_of(&self, mut i: usize) -> Vec<usize> {
        let mut c = vec![i];
        while let Some(p) = self.bridges[i].parent {
            c.push(p);
            i = p;
        }
        c.reverse();
        c
    }

    fn recompute(&mut self) {
        self.by_sbdf.clear();
        self.at = vec![None; self.bridges.len()];
        // Parents always come before their children (a parent must exist to be found).
        for i in 0..self.bridges.len() {
            let b = &self.bridges[i];
            let here = match b.parent {
                None => Some(Sbdf::from_devfn(b.segment, b.root_bus, b.devfn)),
                Some(p) => self.at[p].and_then(|pat| {
                    let bus = self.bridges[p].nums.secondary;
                    let chain = self.chain_of(p);
                    (bus > pat.bus && self.reaches(&chain, bus))
                        .then(|| Sbdf::from_devfn(b.segment, bus, b.devfn))
                }),
            };
            self.at[i] = here;
            if let Some(s) = here {
                self.by_sbdf.entry(s).or_insert(i);
            }
        }
    }

    /// Where the function at `path` (devfn per hop from the root bus of `segment`, starting at
    /// `root_bus`) is now, if a configuration cycle can reach it.
    pub fn resolve(&self, segment: u16, root_bus: u8, path: &[u8]) -> Option<Sbdf> {
        let (&last, hops) = path.split_last()?;
        let mut bus = root_bus;
        let mut chain: Vec<usize> = Vec::with_capacity(hops.len());
        for &devfn in hops {
            let i = self.bridge_at(Sbdf::from_devfn(segment, bus, devfn))?;
            let next = self.bridges[i].nums.secondary;
            chain.push(i);
            if next <= bus || !self.reaches(&chain, next) {
                return None;
            }
            bus = next;
        }
        Some(Sbdf::from_devfn(segment, bus, last))
    }

    /// Every bridge, in discovery order.
    pub fn bridges(&self) -> Vec<BridgeInfo> {
        self.bridges
            .iter()
            .enumerate()
            .map(|(i, b)| BridgeInfo {
                sbdf: self.at.get(i).copied().flatten(),
                segment: b.segment,
                devfn: b.devfn,
                parent: b.parent,
                numbers: b.nums,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: &str) -> Sbdf {
        t.parse().unwrap()
    }

    /// Numbers a bridge the way SeaBIOS does: secondary, subordinate 0xff, then the final
    /// subordinate later.
    fn number(t: &mut BridgeTracker, at: &str, sec: u8, sub: u8) {
        t.learn_header_type(s(at), 0x81);
        t.write(s(at), PCI_SECONDARY_BUS, 1, sec.into());
        t.write(s(at), PCI_SUBORDINATE_BUS, 1, sub.into());
    }

    #[test]
    fn type0_writes_to_0x18_are_not_bus_numbers() {
        let mut t = BridgeTracker::default();
        t.learn_header_type(s("00:03.0"), 0x00);
        assert!(!t.write(s("00:03.0"), 0x18, 4, 0x00ff_0100));
        assert!(t.bridges().is_empty());
        // Unknown header type: ignored too.
        assert!(!t.write(s("00:04.0"), 0x18, 4, 0x00ff_0100));
    }

    #[test]
    fn switch_behind_root_port() {
        let mut t = BridgeTracker::default();
        number(&mut t, "00:02.2", 3, 0xff);
        number(&mut t, "03:00.0", 4, 0xff);
        number(&mut t, "04:00.0", 5, 5);
        number(&mut t, "04:01.0", 6, 6);
        t.write(s("03:00.0"), PCI_SUBORDINATE_BUS, 1, 6);
        t.write(s("00:02.2"), PCI_SUBORDINATE_BUS, 1, 6);
        let path = [2 << 3 | 2, 0, 1 << 3, 0];
        assert_eq!(t.resolve(0, 0, &path), Some(s("06:00.0")));
        assert_eq!(t.resolve(0, 0, &[2 << 3 | 2, 0, 0, 0]), Some(s("05:00.0")));
        // A bus outside the upstream bridge's range is not reachable.
        t.write(s("00:02.2"), PCI_SUBORDINATE_BUS, 1, 5);
        assert_eq!(t.resolve(0, 0, &path), None);
        t.write(s("00:02.2"), PCI_SUBORDINATE_BUS, 1, 6);
        // Renumber the root port: everything below moves with it.
        t.write(s("00:02.2"), 0x18, 4, 0x0020_1000);
        // Secondary 0x10, subordinate 0x20: the upstream port is now at 10:00.0 and still
        // says secondary 4, which is below 0x10, so its children are unreachable ...
        assert_eq!(t.bridges()[1].sbdf, Some(s("10:00.0")));
        assert_eq!(t.resolve(0, 0, &path), None);
        // ... until firmware renumbers them too.
        t.write(s("10:00.0"), PCI_SECONDARY_BUS, 1, 0x11);
        t.write(s("10:00.0"), PCI_SUBORDINATE_BUS, 1, 0x13);
        t.write(s("11:01.0"), PCI_SECONDARY_BUS, 1, 0x13);
        t.write(s("11:01.0"), PCI_SUBORDINATE_BUS, 1, 0x13);
        assert_eq!(t.resolve(0, 0, &path), Some(s("13:00.0")));
    }

    #[test]
    fn reset_bridges_forward_nothing_and_loops_terminate() {
        let mut t = BridgeTracker::default();
        t.learn_header_type(s("00:01.0"), 0x01);
        t.write(s("00:01.0"), PCI_PRIMARY_BUS, 1, 0);
        assert_eq!(t.resolve(0, 0, &[1 << 3, 0]), None, "secondary 0");
        // A bridge below that claims its own bus as secondary: a loop, never followed.
        number(&mut t, "00:01.0", 1, 1);
        number(&mut t, "01:00.0", 1, 1);
        assert_eq!(t.resolve(0, 0, &[1 << 3, 0, 0]), None);
        assert_eq!(t.resolve(0, 0, &[1 << 3, 0]), Some(s("01:00.0")));
    }

    #[test]
    fn segments_are_separate_trees() {
        let mut t = BridgeTracker::default();
        t.set_root_bus(1, 0x40);
        number(&mut t, "0001:40:01.0", 0x41, 0x41);
        assert_eq!(t.resolve(1, 0x40, &[1 << 3, 0]), Some(s("0001:41:00.0")));
        assert_eq!(t.resolve(0, 0, &[1 << 3, 0]), None);
    }
}
