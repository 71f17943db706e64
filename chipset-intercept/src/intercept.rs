//! The intercept table: handlers for chipset registers, run before, after or instead of the
//! model that owns the function, and the layout events they emit.

use bdf_router::{ConfigAccess, EcamWindow, Sbdf};
use ioreq_server::IoRange;
use serde::Serialize;
use std::fmt;

/// When a handler runs relative to the owning model, and whether the model sees the access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// The handler sees a write first and may keep it from the model; reads go to the model
    /// and the handler learns the value.
    Before,
    /// The model handles the access; the handler learns the written or read value.
    After,
    /// The handler owns the register: the model never sees its bytes.
    Instead,
}

/// One intercepted register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RegisterSpec {
    pub name: &'static str,
    pub sbdf: Sbdf,
    pub offset: u16,
    /// Bytes (1..=8).
    pub width: u16,
    /// Bits a write can change; the others keep their value.
    pub wmask: u64,
    pub phase: Phase,
}

impl RegisterSpec {
    fn overlap(&self, acc: &ConfigAccess) -> Option<(u16, u16)> {
        if acc.sbdf != self.sbdf {
            return None;
        }
        let lo = acc.reg.max(self.offset);
        let hi = (acc.reg + u16::from(acc.size)).min(self.offset + self.width);
        (lo < hi).then_some((lo, hi))
    }

    /// The register's value after `acc` wrote `data` over `old`, keeping read-only bits.
    pub fn merge_write(&self, old: u64, acc: &ConfigAccess, data: u64) -> u64 {
        let Some((lo, hi)) = self.overlap(acc) else {
            return old;
        };
        let mut new = old;
        for b in lo..hi {
            let byte = (data >> (8 * u32::from(b - acc.reg))) & 0xff;
            let sh = 8 * u32::from(b - self.offset);
            new = (new & !(0xff << sh)) | (byte << sh);
        }
        (old & !self.wmask) | (new & self.wmask)
    }

    /// The register's value with the bytes `acc` read (`value`) put in.
    pub fn merge_read(&self, old: u64, acc: &ConfigAccess, value: u64) -> u64 {
        let Some((lo, hi)) = self.overlap(acc) else {
            return old;
        };
        let mut new = old;
        for b in lo..hi {
            let byte = (value >> (8 * u32::from(b - acc.reg))) & 0xff;
            let sh = 8 * u32::from(b - self.offset);
            new = (new & !(0xff << sh)) | (byte << sh);
        }
        new
    }

    /// `value` (a read result) with this register's bytes replaced from `reg_value`.
    pub fn overlay(&self, value: u64, acc: &ConfigAccess, reg_value: u64) -> u64 {
        let Some((lo, hi)) = self.overlap(acc) else {
            return value;
        };
        let mut v = value;
        for b in lo..hi {
            let byte = (reg_value >> (8 * u32::from(b - self.offset))) & 0xff;
            let sh = 8 * u32::from(b - acc.reg);
            v = (v & !(0xff << sh)) | (byte << sh);
        }
        v
    }

    /// Byte mask (bit i = byte acc.reg + i) of the bytes of `acc` in this register.
    pub fn byte_mask(&self, acc: &ConfigAccess) -> u8 {
        let Some((lo, hi)) = self.overlap(acc) else {
            return 0;
        };
        (lo..hi).fold(0, |m, b| m | (1 << (b - acc.reg)))
    }
}

/// What the chipset knows about the address map, from TOLUD/TOUUD or configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Platform {
    /// First byte above RAM below 4 GiB (TOLUD), when known.
    pub tolud: Option<u64>,
    /// First byte above RAM above 4 GiB (TOUUD), when known.
    pub touud: Option<u64>,
    /// Fallbacks from configuration, for a model that does not implement TOLUD/TOUUD.
    pub low_ram_top: Option<u64>,
    pub high_ram_top: Option<u64>,
}

impl Platform {
    pub fn low_ram_top(&self) -> Option<u64> {
        self.tolud.or(self.low_ram_top)
    }

    pub fn high_ram_top(&self) -> Option<u64> {
        self.touud.or(self.high_ram_top)
    }
}

/// A change to the guest's address map, applied by the engine to the router and the
/// hypervisor in one step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum LayoutEvent {
    /// The ECAM window moved, resized, appeared or went away.
    Ecam {
        old: Option<EcamWindow>,
        new: Option<EcamWindow>,
    },
    /// The PM I/O block of `function` moved or was enabled/disabled; its ports belong to
    /// whoever owns `function`.
    PmBlock {
        function: Sbdf,
        old: Option<IoRange>,
        new: Option<IoRange>,
    },
    /// TOLUD/TOUUD became known or changed.
    MmioHole {
        tolud: Option<u64>,
        touud: Option<u64>,
    },
    /// A value the guest wrote was refused; the thing it controls stays disabled.
    Refused {
        register: &'static str,
        value: u64,
        why: String,
    },
}

impl fmt::Display for LayoutEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let w = |w: &Option<EcamWindow>| w.map_or("none".to_string(), |w| w.to_string());
        let r = |r: &Option<IoRange>| r.map_or("none".to_string(), |r| r.to_string());
        match self {
            LayoutEvent::Ecam { old, new } => write!(f, "ECAM window {} -> {}", w(old), w(new)),
            LayoutEvent::PmBlock { function, old, new } => {
                write!(f, "PM block of {function}: {} -> {}", r(old), r(new))
            }
            LayoutEvent::MmioHole { tolud, touud } => write!(
                f,
                "MMIO hole: TOLUD {} TOUUD {}",
                tolud.map_or("unknown".into(), |v| format!("{v:#x}")),
                touud.map_or("unknown".into(), |v| format!("{v:#x}"))
            ),
            LayoutEvent::Refused {
                register,
                value,
                why,
            } => write!(f, "refused {register} = {value:#x}: {why}"),
        }
    }
}

/// A handler for one or more related registers.
pub trait Intercept: Send + fmt::Debug {
    fn name(&self) -> &'static str;
    fn registers(&self) -> &[RegisterSpec];
    /// The value the handler holds for register `reg` (an index into `registers()`).
    fn value(&self, reg: usize) -> u64;
    /// Register `reg` now holds `new` (a write merged through the write mask, or the value
    /// the model returned). Emits layout events. For a Before-phase write, returning false
    /// keeps the write from the model.
    fn update(
        &mut self,
        reg: usize,
        new: u64,
        platform: &mut Platform,
        out: &mut Vec<LayoutEvent>,
    ) -> bool;

    /// The engine could not apply `event` (the router or the hypervisor refused what it
    /// asked for). A handler that emitted it goes back to holding nothing active, so the
    /// guest writing the register again is a retry, not "no change". Others ignore it.
    fn not_applied(&mut self, _event: &LayoutEvent) {}
}

/// One (intercept, register) pair hit by an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub intercept: usize,
    pub reg: usize,
}

/// The registers one access touches: at most one per byte of a dword.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HitList {
    n: u8,
    items: [Option<Hit>; 4],
}

impl HitList {
    fn push(&mut self, h: Hit) {
        if let Some(slot) = self.items.get_mut(usize::from(self.n)) {
            *slot = Some(h);
            self.n += 1;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn iter(&self) -> impl Iterator<Item = Hit> + '_ {
        self.items.iter().flatten().copied()
    }
}

/// What the engine must do with the owning model for an intercepted access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPart {
    /// Bytes of the access (bit i = byte reg + i) the model must see; 0 = none.
    pub bytes: u8,
}

/// The intercepted dwords of one function, sorted by offset (a chipset function has a
/// handful, so a short scan beats hashing on the per-access path).
#[derive(Debug, Default)]
struct FunctionHits {
    sbdf: Sbdf,
    dwords: Vec<(u16, Vec<Hit>)>,
}

/// Every intercept, indexed by function and dword for a quick "anything here?" test.
#[derive(Debug, Default)]
pub struct InterceptTable {
    items: Vec<Box<dyn Intercept>>,
    /// Functions with any intercept; an access to any other function costs one short scan.
    functions: Vec<FunctionHits>,
    pub platform: Platform,
}

impl InterceptTable {
    pub fn new(platform: Platform) -> Self {
        InterceptTable {
            platform,
            ..Default::default()
        }
    }

    pub fn add(&mut self, it: Box<dyn Intercept>) {
        let i = self.items.len();
        for (r, spec) in it.registers().iter().enumerate() {
            let first = spec.offset & !3;
            let last = (spec.offset + spec.width - 1) & !3;
            let f = match self.functions.iter().position(|f| f.sbdf == spec.sbdf) {
                Some(k) => &mut self.functions[k],
                None => {
                    self.functions.push(FunctionHits {
                        sbdf: spec.sbdf,
                        dwords: vec![],
                    });
                    let last = self.functions.len() - 1;
                    &mut self.functions[last]
                }
            };
            for dw in (first..=last).step_by(4) {
                let hit = Hit {
                    intercept: i,
                    reg: r,
                };
                match f.dwords.binary_search_by_key(&dw, |(d, _)| *d) {
                    Ok(k) => f.dwords[k].1.push(hit),
                    Err(k) => f.dwords.insert(k, (dw, vec![hit])),
                }
            }
        }
        self.items.push(it);
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Tells the handlers that `event` could not be applied (see [`Intercept::not_applied`]).
    pub fn not_applied(&mut self, event: &LayoutEvent) {
        for it in &mut self.items {
            it.not_applied(event);
        }
    }

    pub fn intercepts(&self) -> &[Box<dyn Intercept>] {
        &self.items
    }

    /// The registers an access touches (empty on the fast path).
    #[inline]
    pub fn hits(&self, acc: &ConfigAccess) -> HitList {
        let mut list = HitList::default();
        let Some(f) = self.functions.iter().find(|f| f.sbdf == acc.sbdf) else {
            return list;
        };
        // Accesses never cross a dword, so the dword's registers are the candidates.
        let dw = acc.reg & !3;
        if let Some((_, hits)) = f.dwords.iter().find(|(d, _)| *d == dw) {
            for h in hits {
                if self.spec(*h).overlap(acc).is_some() {
                    list.push(*h);
                }
            }
        }
        list
    }

    fn spec(&self, h: Hit) -> &RegisterSpec {
        &self.items[h.intercept].registers()[h.reg]
    }

    /// Before the model, for a write: Before and Instead handlers take their bytes. Returns
    /// the bytes the model still sees.
    pub fn before_write(
        &mut self,
        hits: &HitList,
        acc: &ConfigAccess,
        data: u64,
        out: &mut Vec<LayoutEvent>,
    ) -> ModelPart {
        let mut bytes: u8 = ((1u16 << acc.size) - 1) as u8;
        for h in hits.iter() {
            let spec = *self.spec(h);
            match spec.phase {
                Phase::After => {}
                Phase::Before | Phase::Instead => {
                    let old = self.items[h.intercept].value(h.reg);
                    let new = spec.merge_write(old, acc, data);
                    let pass = self.items[h.intercept].update(h.reg, new, &mut self.platform, out);
                    if spec.phase == Phase::Instead || !pass {
                        bytes &= !spec.byte_mask(acc);
                    }
                }
            }
        }
        ModelPart { bytes }
    }

    /// After the model handled a write: After handlers learn it.
    pub fn after_write(
        &mut self,
        hits: &HitList,
        acc: &ConfigAccess,
        data: u64,
        out: &mut Vec<LayoutEvent>,
    ) {
        for h in hits.iter() {
            let spec = *self.spec(h);
            if spec.phase == Phase::After {
                let old = self.items[h.intercept].value(h.reg);
                let new = spec.merge_write(old, acc, data);
                self.items[h.intercept].update(h.reg, new, &mut self.platform, out);
            }
        }
    }

    /// Does the model see any byte of this read? (False only when Instead registers cover
    /// every byte.)
    pub fn read_needs_model(&self, hits: &HitList, acc: &ConfigAccess) -> bool {
        let all: u8 = ((1u16 << acc.size) - 1) as u8;
        let hidden = hits
            .iter()
            .filter(|h| self.spec(*h).phase == Phase::Instead)
            .fold(0u8, |m, h| m | self.spec(h).byte_mask(acc));
        hidden != all
    }

    /// After a read: Before/After handlers learn the model's value; Instead handlers put
    /// their bytes in. Returns the value for the guest.
    pub fn after_read(
        &mut self,
        hits: &HitList,
        acc: &ConfigAccess,
        model_value: u64,
        out: &mut Vec<LayoutEvent>,
    ) -> u64 {
        let mut v = model_value;
        for h in hits.iter() {
            let spec = *self.spec(h);
            let cur = self.items[h.intercept].value(h.reg);
            match spec.phase {
                Phase::Instead => v = spec.overlay(v, acc, cur),
                Phase::Before | Phase::After => {
                    let new = spec.merge_read(cur, acc, model_value);
                    if new != cur {
                        self.items[h.intercept].update(h.reg, new, &mut self.platform, out);
                    }
                }
            }
        }
        v
    }

    /// Every register with its current value, for reports.
    pub fn snapshot(&self) -> Vec<(&'static str, RegisterSpec, u64)> {
        self.items
            .iter()
            .flat_map(|it| {
                it.registers()
                    .iter()
                    .enumerate()
                    .map(move |(i, s)| (it.name(), *s, it.value(i)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdf_router::ConfigPath;

    fn spec(offset: u16, width: u16, wmask: u64) -> RegisterSpec {
        RegisterSpec {
            name: "t",
            sbdf: Sbdf::default(),
            offset,
            width,
            wmask,
            phase: Phase::Instead,
        }
    }

    fn acc(reg: u16, size: u8) -> ConfigAccess {
        ConfigAccess {
            sbdf: Sbdf::default(),
            reg,
            size,
            path: ConfigPath::Cf8,
        }
    }

    #[test]
    fn partial_writes_merge_through_the_mask() {
        let s = spec(0x60, 8, 0xf_fc00_0007);
        // A 1-byte write to 0x61 changes bits 15:8 only, which are read-only here.
        assert_eq!(s.merge_write(0xb000_0000, &acc(0x61, 1), 0xff), 0xb000_0000);
        // A 1-byte write to 0x63 sets bits 31:26 (base and the two address-mask bits).
        assert_eq!(
            s.merge_write(0xb000_0000, &acc(0x63, 1), 0xe1),
            0xe000_0000,
            "bit 24 is reserved"
        );
        // A dword to 0x64 sets bits 35:32, ignoring 63:36.
        assert_eq!(s.merge_write(0, &acc(0x64, 4), 0xffff_ffff), 0xf_0000_0000);
        // The byte at 0x60 (enable, length).
        assert_eq!(s.merge_write(0xb000_0000, &acc(0x60, 1), 0xff), 0xb000_0007);
        // An access elsewhere changes nothing.
        assert_eq!(s.merge_write(5, &acc(0x5c, 4), 0xffff_ffff), 5);
    }

    #[test]
    fn overlay_and_byte_masks() {
        let s = spec(0x44, 1, 0x87);
        let a = acc(0x44, 4);
        assert_eq!(s.byte_mask(&a), 0b0001);
        assert_eq!(s.overlay(0xaabb_ccdd, &a, 0x80), 0xaabb_cc80);
        let s = spec(0xb0, 2, 0xfff0);
        let a = acc(0xb0, 4);
        assert_eq!(s.byte_mask(&a), 0b0011);
        assert_eq!(s.merge_read(0, &a, 0x1234_8000), 0x8000);
        assert_eq!(s.byte_mask(&acc(0xb2, 2)), 0);
    }
}
