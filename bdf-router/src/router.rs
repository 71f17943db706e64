//! The router: who owns each function, port and MMIO range, and the MMCONFIG layout that
//! turns MMIO into configuration accesses.

use crate::address::{ConfigAccess, Sbdf};
use crate::bridges::{
    BridgeInfo, BridgeTracker, PCI_CLASS_BRIDGE_PCI, PCI_HEADER_TYPE, PCI_HEADER_TYPE_BRIDGE,
    PCI_PRIMARY_BUS, PCI_SUBORDINATE_BUS,
};
use crate::ecam::{Cf8Latch, EcamWindow};
use crate::tables::{BdfTable, McfgLayout, RangeMap, ServerIdx};
use ioreq_server::{Claim, ClaimError, IoRange, Position, RangeKind};
use serde::Serialize;
use tracing::debug;

/// Largest PCI range one claim may cover (16 segments' worth of functions).
pub const MAX_PCI_CLAIM: u64 = 16 << 16;

/// A claim by position and where it points now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PositionClaim {
    pub owner: ServerIdx,
    pub position: Position,
    pub resolved: Option<Sbdf>,
}

/// What a bridge write did to position claims.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Moved {
    pub owner: ServerIdx,
    pub position: Position,
    pub from: Option<Sbdf>,
    pub to: Option<Sbdf>,
}

/// Counters kept by the router.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RouterStats {
    /// Bridge writes that changed bus numbers.
    pub renumberings: u64,
    /// Position claims that resolved onto a function someone else owns (left unresolved).
    pub position_conflicts: u64,
}

/// Ownership of functions, ports and MMIO, plus the ECAM windows and the bridge tree.
#[derive(Debug, Clone, Default)]
pub struct Router {
    names: Vec<String>,
    layout: McfgLayout,
    /// Effective owner per function: raw claims, then resolved positions.
    table: BdfTable,
    raw: BdfTable,
    positions: Vec<PositionClaim>,
    ports: RangeMap,
    mmio: RangeMap,
    bridges: BridgeTracker,
    cf8: Cf8Latch,
    stats: RouterStats,
}

impl Router {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a server name; returns its index.
    pub fn add_server(&mut self, name: &str) -> ServerIdx {
        self.names.push(name.to_string());
        (self.names.len() - 1) as ServerIdx
    }

    pub fn server_name(&self, idx: ServerIdx) -> &str {
        self.names
            .get(usize::from(idx))
            .map(String::as_str)
            .unwrap_or("?")
    }

    pub fn server_names(&self) -> &[String] {
        &self.names
    }

    pub fn stats(&self) -> &RouterStats {
        &self.stats
    }

    // ---- lookups (the hot path) ----

    /// The ECAM window an address is in.
    #[inline]
    pub fn ecam_window(&self, gpa: u64) -> Option<&EcamWindow> {
        self.layout.find(gpa)
    }

    /// Owner of a function.
    #[inline]
    pub fn config_owner(&self, sbdf: Sbdf) -> Option<ServerIdx> {
        self.table.get(sbdf)
    }

    /// Owner of the port range containing all of `[s, e]`.
    #[inline]
    pub fn port_owner(&self, s: u64, e: u64) -> Option<ServerIdx> {
        self.ports.lookup(s, e)
    }

    /// Owner of the MMIO range containing all of `[s, e]`.
    #[inline]
    pub fn mmio_owner(&self, s: u64, e: u64) -> Option<ServerIdx> {
        self.mmio.lookup(s, e)
    }

    /// Whether `owner` holds exactly the port or MMIO range `r` (not a part of it, not more):
    /// a second claim of the same range by the same owner is then a repeat, not a conflict.
    pub fn holds_exactly(&self, owner: ServerIdx, r: &IoRange) -> bool {
        let map = match r.kind {
            RangeKind::Port => &self.ports,
            RangeKind::Mmio => &self.mmio,
            RangeKind::Pci => return false,
        };
        map.overlapping(r.start, r.end) == Some((r.start, r.end, owner))
    }

    /// The CF8 latch (for raw port accesses to 0xcf8..0xcff).
    pub fn cf8(&mut self) -> &mut Cf8Latch {
        &mut self.cf8
    }

    pub fn cf8_value(&self) -> u32 {
        self.cf8.value
    }

    // ---- layout ----

    pub fn windows(&self) -> &[EcamWindow] {
        self.layout.windows()
    }

    /// Replaces one window by another (either may be absent) in one step: the old one stops
    /// decoding at once. A new window that collides with another window or with a claimed
    /// MMIO range is refused and the old one stays.
    pub fn replace_window(
        &mut self,
        old: Option<EcamWindow>,
        new: Option<EcamWindow>,
    ) -> Result<(), ClaimError> {
        // Only a window that was there is put back if the new one is refused.
        let removed = old.filter(|o| self.layout.remove(o));
        if let Some(n) = new {
            let clash = self
                .layout
                .conflict(&n)
                .map(|w| format!("ECAM window {w}"))
                .or_else(|| {
                    self.mmio
                        .overlapping(n.base, n.last())
                        .map(|(s, e, o)| format!("mmio {s:#x}-{e:#x} of {}", self.server_name(o)))
                });
            if let Some(what) = clash {
                if let Some(o) = removed {
                    let _ = self.layout.insert(o);
                }
                return Err(ClaimError::Invalid {
                    claim: Claim::Range(IoRange::mmio(n.base, n.last())),
                    why: format!("ECAM window {n} overlaps {what}"),
                });
            }
            let _ = self.layout.insert(n);
            if n.start_bus != self.bridges.root_bus(n.segment) {
                self.bridges.set_root_bus(n.segment, n.start_bus);
            }
        }
        Ok(())
    }

    // ---- claims ----

    fn conflict(&self, claim: &Claim, requester: ServerIdx, owner: ServerIdx) -> ClaimError {
        ClaimError::Conflict {
            claim: claim.clone(),
            requester: self.server_name(requester).to_string(),
            owner: self.server_name(owner).to_string(),
        }
    }

    /// Adds a claim for `owner`. Two servers claiming the same thing is refused with an error
    /// naming both; claiming what you already own is refused too (Xen: EEXIST).
    pub fn claim(&mut self, owner: ServerIdx, claim: &Claim) -> Result<(), ClaimError> {
        match claim {
            Claim::Range(r) => self.claim_range(owner, claim, r),
            Claim::Position(p) => self.claim_position(owner, claim, p),
        }
    }

    fn check_range(&self, claim: &Claim, r: &IoRange) -> Result<(), ClaimError> {
        if !r.is_valid() {
            return Err(ClaimError::Invalid {
                claim: claim.clone(),
                why: "start after end or beyond the space".into(),
            });
        }
        if r.kind == RangeKind::Pci && r.end - r.start >= MAX_PCI_CLAIM {
            return Err(ClaimError::Invalid {
                claim: claim.clone(),
                why: format!("more than {MAX_PCI_CLAIM} functions in one claim"),
            });
        }
        Ok(())
    }

    fn claim_range(
        &mut self,
        owner: ServerIdx,
        claim: &Claim,
        r: &IoRange,
    ) -> Result<(), ClaimError> {
        self.check_range(claim, r)?;
        match r.kind {
            RangeKind::Port | RangeKind::Mmio => {
                if r.kind == RangeKind::Mmio {
                    if let Some(w) = self
                        .layout
                        .windows()
                        .iter()
                        .find(|w| w.overlaps(r.start, r.end))
                    {
                        return Err(ClaimError::Invalid {
                            claim: claim.clone(),
                            why: format!("overlaps ECAM window {w}, which the multiplexer decodes"),
                        });
                    }
                }
                let map = if r.kind == RangeKind::Port {
                    &mut self.ports
                } else {
                    &mut self.mmio
                };
                match map.insert(r.start, r.end, owner) {
                    Ok(()) => Ok(()),
                    Err((_, _, other)) => Err(self.conflict(claim, owner, other)),
                }
            }
            RangeKind::Pci => {
                for v in r.start..=r.end {
                    let s = Sbdf::from_xen(v as u32);
                    if let Some(other) = self.table.get(s) {
                        return Err(self.conflict(claim, owner, other));
                    }
                }
                for v in r.start..=r.end {
                    let s = Sbdf::from_xen(v as u32);
                    self.raw.set(s, Some(owner));
                    self.table.set(s, Some(owner));
                }
                Ok(())
            }
        }
    }

    fn claim_position(
        &mut self,
        owner: ServerIdx,
        claim: &Claim,
        p: &Position,
    ) -> Result<(), ClaimError> {
        if p.path.is_empty() {
            return Err(ClaimError::Invalid {
                claim: claim.clone(),
                why: "empty path".into(),
            });
        }
        if let Some(c) = self.positions.iter().find(|c| c.position == *p) {
            return Err(self.conflict(claim, owner, c.owner));
        }
        let resolved = self.bridges.resolve(p.segment, p.root_bus, &p.path);
        if let Some(s) = resolved {
            if let Some(other) = self.table.get(s) {
                return Err(self.conflict(claim, owner, other));
            }
            self.table.set(s, Some(owner));
        }
        self.positions.push(PositionClaim {
            owner,
            position: p.clone(),
            resolved,
        });
        Ok(())
    }

    /// Drops a claim `owner` made.
    pub fn release(&mut self, owner: ServerIdx, claim: &Claim) -> Result<(), ClaimError> {
        let requester = self.server_name(owner).to_string();
        let not_owned = || ClaimError::NotOwned {
            claim: claim.clone(),
            requester: requester.clone(),
        };
        match claim {
            Claim::Range(r) => match r.kind {
                RangeKind::Port => self
                    .ports
                    .remove(r.start, r.end, owner)
                    .then_some(())
                    .ok_or_else(not_owned),
                RangeKind::Mmio => self
                    .mmio
                    .remove(r.start, r.end, owner)
                    .then_some(())
                    .ok_or_else(not_owned),
                RangeKind::Pci => {
                    self.check_range(claim, r)?;
                    let all = (r.start..=r.end)
                        .all(|v| self.raw.get(Sbdf::from_xen(v as u32)) == Some(owner));
                    if !all {
                        return Err(not_owned());
                    }
                    for v in r.start..=r.end {
                        let s = Sbdf::from_xen(v as u32);
                        self.raw.set(s, None);
                        self.table.set(s, None);
                    }
                    self.reresolve();
                    Ok(())
                }
            },
            Claim::Position(p) => {
                let i = self
                    .positions
                    .iter()
                    .position(|c| c.owner == owner && c.position == *p)
                    .ok_or_else(not_owned)?;
                let c = self.positions.remove(i);
                if let Some(s) = c.resolved {
                    self.table.set(s, self.raw.get(s));
                }
                self.reresolve();
                Ok(())
            }
        }
    }

    /// Drops everything `owner` has (a device model went away). Returns what it had.
    pub fn release_all(&mut self, owner: ServerIdx) -> Vec<Claim> {
        let mut gone = vec![];
        for (s, e) in self.ports.remove_owner(owner) {
            gone.push(Claim::Range(IoRange::new(RangeKind::Port, s, e)));
        }
        for (s, e) in self.mmio.remove_owner(owner) {
            gone.push(Claim::Range(IoRange::new(RangeKind::Mmio, s, e)));
        }
        for s in self.raw.owned_by(owner) {
            self.raw.set(s, None);
            self.table.set(s, None);
            gone.push(Claim::Range(IoRange::pci(s.to_xen())));
        }
        let mut kept = Vec::with_capacity(self.positions.len());
        for c in std::mem::take(&mut self.positions) {
            if c.owner == owner {
                if let Some(s) = c.resolved {
                    self.table.set(s, self.raw.get(s));
                }
                gone.push(Claim::Position(c.position));
            } else {
                kept.push(c);
            }
        }
        self.positions = kept;
        self.reresolve();
        gone
    }

    /// Re-resolves every position claim against the current bridge tree. Claims are served
    /// in the order they were made: one that lands on a function owned by someone else stays
    /// unresolved (and is counted) until the tree changes again.
    fn reresolve(&mut self) -> Vec<Moved> {
        for c in &self.positions {
            if let Some(s) = c.resolved {
                self.table.set(s, self.raw.get(s));
            }
        }
        let mut moved = vec![];
        for i in 0..self.positions.len() {
            let c = &self.positions[i];
            let mut to =
                self.bridges
                    .resolve(c.position.segment, c.position.root_bus, &c.position.path);
            if let Some(s) = to {
                match self.table.get(s) {
                    Some(o) if o != c.owner => {
                        // Firmware does this transiently (SeaBIOS parks every root port at
                        // bus 0xff before numbering): counted, not an error.
                        debug!(
                            position = %c.position,
                            at = %s,
                            owner = self.server_name(o),
                            requester = self.server_name(c.owner),
                            "position claim lands on a function another server owns; left unresolved"
                        );
                        self.stats.position_conflicts += 1;
                        to = None;
                    }
                    _ => self.table.set(s, Some(c.owner)),
                }
            }
            let c = &mut self.positions[i];
            if c.resolved != to {
                moved.push(Moved {
                    owner: c.owner,
                    position: c.position.clone(),
                    from: c.resolved,
                    to,
                });
                c.resolved = to;
            }
        }
        moved
    }

    // ---- watching the guest ----

    /// Does a write need the function's header type before it can be interpreted? (It
    /// touches the bus-number registers of a function whose header type is not known.)
    pub fn needs_header_type(&self, acc: &ConfigAccess) -> bool {
        acc.overlaps(PCI_PRIMARY_BUS, PCI_SUBORDINATE_BUS - PCI_PRIMARY_BUS + 1)
            && self.bridges.bridge_at(acc.sbdf).is_none()
            && self.bridges.header_type(acc.sbdf).is_none()
    }

    /// Tells the router a function's header type (a probe's answer).
    pub fn learn_header_type(&mut self, sbdf: Sbdf, header: u8) {
        self.bridges.learn_header_type(sbdf, header);
    }

    /// Watches a completed read: learns header types, from the header type register or from
    /// a PCI-to-PCI bridge class code.
    pub fn observe_read(&mut self, acc: &ConfigAccess, value: u64) {
        // A function that did not answer reads all ones: that says nothing.
        if value == ioreq_server::size_mask(acc.size.into()) {
            return;
        }
        let byte_at = |reg: u16| (value >> (8 * u32::from(reg - acc.reg))) as u8;
        if acc.overlaps(PCI_HEADER_TYPE, 1) {
            self.bridges
                .learn_header_type(acc.sbdf, byte_at(PCI_HEADER_TYPE));
        } else if acc.overlaps(0x0a, 2)
            && acc.reg <= 0x0a
            && self.bridges.header_type(acc.sbdf).is_none()
        {
            let class = u16::from_le_bytes([byte_at(0x0a), byte_at(0x0b)]);
            if class == PCI_CLASS_BRIDGE_PCI {
                self.bridges
                    .learn_header_type(acc.sbdf, PCI_HEADER_TYPE_BRIDGE);
            }
        }
    }

    /// Watches a write: follows bridge bus numbers; returns the position claims that moved.
    pub fn observe_write(&mut self, acc: &ConfigAccess, data: u64) -> Vec<Moved> {
        if !acc.overlaps(PCI_PRIMARY_BUS, PCI_SUBORDINATE_BUS - PCI_PRIMARY_BUS + 1) {
            return vec![];
        }
        if !self.bridges.write(acc.sbdf, acc.reg, acc.size, data) {
            return vec![];
        }
        self.stats.renumberings += 1;
        let moved = self.reresolve();
        for m in &moved {
            debug!(position = %m.position, from = ?m.from, to = ?m.to, "position claim moved");
        }
        moved
    }

    // ---- inspection ----

    pub fn bridges(&self) -> Vec<BridgeInfo> {
        self.bridges.bridges()
    }

    pub fn positions(&self) -> &[PositionClaim] {
        &self.positions
    }

    /// Every function with an owner.
    pub fn functions(&self) -> Vec<(Sbdf, ServerIdx)> {
        self.table.iter().collect()
    }

    pub fn port_ranges(&self) -> Vec<(u64, u64, ServerIdx)> {
        self.ports.iter().collect()
    }

    pub fn mmio_ranges(&self) -> Vec<(u64, u64, ServerIdx)> {
        self.mmio.iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::address::ConfigPath;
    use crate::bridges::PCI_SECONDARY_BUS;
    use proptest::prelude::*;

    fn s(t: &str) -> Sbdf {
        t.parse().unwrap()
    }

    fn pos(path: &[u8]) -> Claim {
        Claim::Position(Position {
            segment: 0,
            root_bus: 0,
            path: path.to_vec(),
        })
    }

    fn acc(t: &str, reg: u16, size: u8) -> ConfigAccess {
        ConfigAccess {
            sbdf: s(t),
            reg,
            size,
            path: ConfigPath::Cf8,
        }
    }

    #[test]
    fn conflicting_claims_name_both_servers() {
        let mut r = Router::new();
        let q = r.add_server("qemu");
        let v = r.add_server("vgpu");
        r.claim(q, &Claim::Range(IoRange::new(RangeKind::Pci, 0, 0xff)))
            .unwrap();
        let e = r
            .claim(v, &Claim::Range(IoRange::pci(s("00:10.0").to_xen())))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "pci 0000:00:10.0 requested by vgpu is already owned by qemu"
        );
        r.claim(q, &Claim::Range(IoRange::ports(0x600, 0x67f)))
            .unwrap();
        let e = r
            .claim(v, &Claim::Range(IoRange::ports(0x67f, 0x680)))
            .unwrap_err();
        assert!(matches!(e, ClaimError::Conflict { ref owner, .. } if owner == "qemu"));
        assert_eq!(r.config_owner(s("00:1f.7")), Some(q));
        assert_eq!(r.config_owner(s("01:00.0")), None);
    }

    #[test]
    fn release_requires_ownership() {
        let mut r = Router::new();
        let a = r.add_server("a");
        let b = r.add_server("b");
        let c = Claim::Range(IoRange::mmio(0xfe00_0000, 0x1000));
        r.claim(a, &c).unwrap();
        assert!(matches!(r.release(b, &c), Err(ClaimError::NotOwned { .. })));
        r.release(a, &c).unwrap();
        assert_eq!(r.mmio_owner(0xfe00_0000, 0xfe00_0003), None);
    }

    #[test]
    fn position_claim_follows_numbering() {
        let mut r = Router::new();
        let q = r.add_server("qemu");
        let n = r.add_server("nvme");
        r.claim(q, &Claim::Range(IoRange::new(RangeKind::Pci, 0, 0xff)))
            .unwrap();
        // Registered before firmware numbered anything: unresolved, not lost.
        r.claim(n, &pos(&[2 << 3 | 1, 0])).unwrap();
        assert_eq!(r.positions()[0].resolved, None);
        // Firmware reads the header type, then numbers the root port.
        r.observe_read(&acc("00:02.1", 0x0c, 4), 0x0081_0000);
        let moved = r.observe_write(&acc("00:02.1", PCI_SECONDARY_BUS, 1), 2);
        assert_eq!(moved[0].to, Some(s("02:00.0")));
        assert_eq!(r.config_owner(s("02:00.0")), Some(n));
        // Renumber with one dword write at 0x18: primary 0, secondary 5, subordinate 5.
        r.observe_write(&acc("00:02.1", PCI_PRIMARY_BUS, 4), 0x0005_0500);
        assert_eq!(r.config_owner(s("02:00.0")), None);
        assert_eq!(r.config_owner(s("05:00.0")), Some(n));
        assert_eq!(r.stats().renumberings, 2);
        // The server goes away: its claims go with it.
        let gone = r.release_all(n);
        assert_eq!(gone.len(), 1);
        assert_eq!(r.config_owner(s("05:00.0")), None);
    }

    #[test]
    fn a_bridge_class_code_marks_a_type1_header() {
        let mut r = Router::new();
        r.observe_read(&acc("00:02.0", 0x0a, 2), 0x0604);
        assert!(!r.needs_header_type(&acc("00:02.0", 0x19, 1)));
        r.observe_read(&acc("00:03.0", 0x08, 4), 0x0200_0000);
        assert!(
            r.needs_header_type(&acc("00:03.0", 0x19, 1)),
            "a NIC teaches nothing"
        );
        r.observe_read(&acc("00:04.0", 0x08, 4), 0x0604_0001);
        assert!(!r.needs_header_type(&acc("00:04.0", 0x19, 1)));
    }

    #[test]
    fn header_probe_needed_only_for_unknown_functions() {
        let mut r = Router::new();
        assert!(r.needs_header_type(&acc("00:02.0", 0x18, 4)));
        assert!(!r.needs_header_type(&acc("00:02.0", 0x10, 4)));
        r.learn_header_type(s("00:02.0"), 0);
        assert!(!r.needs_header_type(&acc("00:02.0", 0x18, 4)));
        // An all-ones read (no function) teaches nothing.
        r.observe_read(&acc("00:03.0", 0x0e, 1), 0xff);
        assert!(r.needs_header_type(&acc("00:03.0", 0x19, 1)));
    }

    #[test]
    fn ecam_windows_cannot_cover_claimed_mmio_or_be_claimed() {
        let mut r = Router::new();
        let q = r.add_server("qemu");
        r.claim(q, &Claim::Range(IoRange::mmio(0xc000_0000, 0x1000)))
            .unwrap();
        let w = EcamWindow::new(0, 0xc000_0000, 0, 0x3f).unwrap();
        assert!(r.replace_window(None, Some(w)).is_err());
        let w = EcamWindow::new(0, 0xb000_0000, 0, 0xff).unwrap();
        r.replace_window(None, Some(w)).unwrap();
        assert!(
            r.claim(q, &Claim::Range(IoRange::mmio(0xbfff_f000, 0x1000)))
                .is_err()
        );
        // Move it; the old window stops decoding.
        let w2 = EcamWindow::new(0, 0xe000_0000, 0, 0x3f).unwrap();
        r.replace_window(Some(w), Some(w2)).unwrap();
        assert_eq!(r.ecam_window(0xb000_0000), None);
        assert_eq!(r.ecam_window(0xe000_0000), Some(&w2));
        // A refused move keeps the old window.
        let bad = EcamWindow::new(0, 0xc000_0000, 0, 0).unwrap();
        assert!(r.replace_window(Some(w2), Some(bad)).is_err());
        assert_eq!(r.ecam_window(0xe000_0000), Some(&w2));
    }

    proptest! {
        /// Whatever the claims, the BDF table agrees with the set of successful raw claims.
        #[test]
        fn bdf_table_matches_claims(ops in prop::collection::vec((0u16..3, 0u32..0x300, 0u32..8, any::<bool>()), 1..60)) {
            let mut r = Router::new();
            for i in 0..3 { r.add_server(&format!("s{i}")); }
            let mut model = std::collections::HashMap::new();
            for (owner, start, len, add) in ops {
                let c = Claim::Range(IoRange::new(RangeKind::Pci, start.into(), u64::from(start + len)));
                if add {
                    let free = (start..=start + len).all(|v| !model.contains_key(&v));
                    prop_assert_eq!(r.claim(owner, &c).is_ok(), free);
                    if free { for v in start..=start + len { model.insert(v, owner); } }
                } else {
                    let mine = (start..=start + len).all(|v| model.get(&v) == Some(&owner));
                    prop_assert_eq!(r.release(owner, &c).is_ok(), mine);
                    if mine { for v in start..=start + len { model.remove(&v); } }
                }
            }
            for v in 0u32..0x310 {
                prop_assert_eq!(r.config_owner(Sbdf::from_xen(v)), model.get(&v).copied());
            }
        }
    }
}
