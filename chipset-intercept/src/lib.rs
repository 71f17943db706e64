//! Chipset detection and the intercepts of the registers that shape the guest's address map.
//!
//! Each intercept names its registers (function, offset, width), when it runs relative to
//! the model that owns the function (before, after, instead) and so whether that model sees
//! the access; every change it sees becomes a [`LayoutEvent`] the engine applies to the
//! router and the hypervisor at once.

pub mod detect;
pub mod intercept;
pub mod q35;
pub mod registers;

pub use detect::{Chipset, detect};
pub use intercept::{
    HitList, Intercept, InterceptTable, LayoutEvent, ModelPart, Phase, Platform, RegisterSpec,
};

use serde::{Deserialize, Serialize};

/// Which intercepts to install, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InterceptConfig {
    /// PCIEXBAR (Q35): `None` leaves it to the model (no ECAM decode).
    pub pciexbar: Option<Phase>,
    /// PMBASE/ACPI_CNTL (Q35) or PMBA/PMREGMISC (PIIX4).
    pub pm: Option<Phase>,
    /// TOLUD/TOUUD (Q35).
    pub mmio_hole: Option<Phase>,
    /// Segment the Q35 ECAM window decodes.
    pub ecam_segment: u16,
    /// Top of RAM below 4 GiB when the model does not implement TOLUD.
    pub low_ram_top: Option<u64>,
    /// Top of RAM above 4 GiB when the model does not implement TOUUD.
    pub high_ram_top: Option<u64>,
}

impl Default for InterceptConfig {
    fn default() -> Self {
        InterceptConfig {
            // The multiplexer owns PCIEXBAR: the model must not map an ECAM window of its own.
            pciexbar: Some(Phase::Instead),
            pm: Some(Phase::After),
            mmio_hole: Some(Phase::After),
            ecam_segment: 0,
            low_ram_top: None,
            high_ram_top: None,
        }
    }
}

/// The intercepts for a chipset.
pub fn build(chipset: Chipset, cfg: &InterceptConfig) -> InterceptTable {
    let mut t = InterceptTable::new(Platform {
        low_ram_top: cfg.low_ram_top,
        high_ram_top: cfg.high_ram_top,
        ..Default::default()
    });
    match chipset {
        Chipset::Q35 => {
            if let Some(p) = cfg.pciexbar {
                t.add(Box::new(q35::Pciexbar::new(p, cfg.ecam_segment)));
            }
            if let Some(p) = cfg.pm {
                t.add(Box::new(q35::PmBlockIntercept::ich9(p)));
            }
            if let Some(p) = cfg.mmio_hole {
                t.add(Box::new(q35::MmioHole::new(p)));
            }
        }
        Chipset::I440fx => {
            if let Some(p) = cfg.pm {
                t.add(Box::new(q35::PmBlockIntercept::piix4(p)));
            }
        }
        Chipset::Unknown => {}
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use bdf_router::{ConfigAccess, ConfigPath, Sbdf};

    fn acc(t: &str, reg: u16, size: u8) -> ConfigAccess {
        ConfigAccess {
            sbdf: t.parse::<Sbdf>().unwrap(),
            reg,
            size,
            path: ConfigPath::Cf8,
        }
    }

    #[test]
    fn q35_table_routes_partial_accesses() {
        let mut t = build(Chipset::Q35, &InterceptConfig::default());
        let mut ev = vec![];
        // A 1-byte write to 0x60 (enable) is taken instead of the model.
        let a = acc("00:00.0", 0x60, 1);
        let hits = t.hits(&a);
        assert!(!hits.is_empty());
        let part = t.before_write(&hits, &a, 0x01, &mut ev);
        assert_eq!(part.bytes, 0, "model sees none of PCIEXBAR");
        assert!(matches!(ev[0], LayoutEvent::Ecam { new: Some(_), .. }));
        // A 1-byte write to 0x61 is inside PCIEXBAR but read-only bits: no event.
        ev.clear();
        let a = acc("00:00.0", 0x61, 1);
        t.before_write(&t.hits(&a), &a, 0xff, &mut ev);
        assert!(ev.is_empty());
        // A dword read at 0x60 never reaches the model.
        let a = acc("00:00.0", 0x60, 4);
        let hits = t.hits(&a);
        assert!(!t.read_needs_model(&hits, &a));
        assert_eq!(t.after_read(&hits, &a, 0xffff_ffff, &mut ev), 0xb000_0001);
        // PMBASE is After: the model sees it; the read teaches the handler.
        let a = acc("00:1f.0", 0x40, 4);
        let hits = t.hits(&a);
        assert_eq!(t.before_write(&hits, &a, 0x601, &mut ev).bytes, 0b1111);
        t.after_write(&hits, &a, 0x601, &mut ev);
        let a = acc("00:1f.0", 0x44, 1);
        let hits = t.hits(&a);
        t.after_write(&hits, &a, 0x80, &mut ev);
        assert!(
            ev.iter()
                .any(|e| matches!(e, LayoutEvent::PmBlock { new: Some(_), .. }))
        );
        // Unrelated accesses have no hits.
        assert!(t.hits(&acc("00:00.0", 0x5c, 4)).is_empty());
        assert!(t.hits(&acc("00:02.0", 0x60, 4)).is_empty());
        // A dword at 0xb0 covers TOLUD only in its low half.
        let a = acc("00:00.0", 0xb0, 4);
        assert_eq!(t.hits(&a).iter().count(), 1);
    }

    proptest::proptest! {
        /// Any sequence of 1/2/4-byte writes to 0x60..0x67 leaves PCIEXBAR equal to the bytes
        /// written through the write mask, and the ECAM window equal to what that value
        /// decodes to; the model never sees a byte of it.
        #[test]
        fn pciexbar_follows_any_partial_writes(writes in proptest::collection::vec((0u16..8, 0u32..3, proptest::prelude::any::<u32>()), 1..40)) {
            let mut t = build(Chipset::Q35, &InterceptConfig::default());
            let mut model = registers::PCIEXBAR_DEFAULT;
            let mut window = None;
            for (off, size_log, data) in writes {
                let size = 1u8 << size_log;
                let reg = 0x60 + (off & !(u16::from(size) - 1));
                let a = acc("00:00.0", reg, size);
                let mut ev = vec![];
                let hits = t.hits(&a);
                proptest::prop_assert_eq!(t.before_write(&hits, &a, data.into(), &mut ev).bytes, 0);
                for i in 0..u64::from(size) {
                    let sh = 8 * (u64::from(reg - 0x60) + i);
                    let byte = (u64::from(data) >> (8 * i)) & 0xff;
                    model = (model & !(0xff << sh)) | (byte << sh);
                }
                model &= registers::PCIEXBAR_WMASK;
                for e in ev {
                    if let LayoutEvent::Ecam { new, .. } = e {
                        window = new;
                    }
                }
                let want = q35::pciexbar_window(model, 0)
                    .ok()
                    .flatten()
                    .filter(|w| q35::check_window(w, &t.platform).is_ok());
                proptest::prop_assert_eq!(window, want, "value {:#x}", model);
                let r = acc("00:00.0", 0x60, 4);
                let hits = t.hits(&r);
                proptest::prop_assert_eq!(t.after_read(&hits, &r, 0, &mut vec![]), model & 0xffff_ffff);
            }
        }
    }

    #[test]
    fn unknown_chipset_has_no_intercepts() {
        assert!(build(Chipset::Unknown, &InterceptConfig::default()).is_empty());
        assert_eq!(
            build(Chipset::I440fx, &InterceptConfig::default())
                .intercepts()
                .len(),
            1
        );
    }
}
