//! Q35 handlers: PCIEXBAR drives the ECAM window, PMBASE + ACPI_CNTL place the PM block,
//! TOLUD/TOUUD bound the MMIO hole.

use crate::detect::bus0;
use crate::intercept::{Intercept, LayoutEvent, Phase, Platform, RegisterSpec};
use crate::registers::*;
use bdf_router::EcamWindow;
use bdf_router::WindowError;
use ioreq_server::IoRange;
use thiserror::Error;
use tracing::warn;

/// Why a PCIEXBAR value opens no ECAM window, or why the window it names may not be placed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PciexbarError {
    /// LENGTH (bits 2:1) = 11b, reserved (3 Series datasheet 5.1.14; QEMU aborts on it).
    #[error("reserved LENGTH 11b")]
    ReservedLength,
    #[error(transparent)]
    Window(#[from] WindowError),
    #[error("overlaps RAM below TOLUD ({0:#x})")]
    LowRam(u64),
    #[error("overlaps RAM above 4 GiB (TOUUD {0:#x})")]
    HighRam(u64),
    #[error("overlaps the local APIC / MSI range")]
    Lapic,
    #[error("overlaps the I/O APIC range")]
    Ioapic,
}

/// Where a PCIEXBAR value puts the ECAM window (`None`: PCIEXBAREN clear), or why it names
/// none. The one decoder of the register: the intercept and the QEMU trace importer use it.
pub fn pciexbar_window(value: u64, segment: u16) -> Result<Option<EcamWindow>, PciexbarError> {
    if value & PCIEXBAR_EN == 0 {
        return Ok(None);
    }
    let length = (value & PCIEXBAR_LENGTH_MASK) >> PCIEXBAR_LENGTH_SHIFT;
    let (mask, end_bus) = match length {
        PCIEXBAR_LENGTH_256M => (PCIEXBAR_BASE_256M_MASK, 0xff),
        PCIEXBAR_LENGTH_128M => (PCIEXBAR_BASE_256M_MASK | PCIEXBAR_128ADMSK, 0x7f),
        PCIEXBAR_LENGTH_64M => (
            PCIEXBAR_BASE_256M_MASK | PCIEXBAR_128ADMSK | PCIEXBAR_64ADMSK,
            0x3f,
        ),
        _ => return Err(PciexbarError::ReservedLength),
    };
    Ok(Some(EcamWindow::new(segment, value & mask, 0, end_bus)?))
}

/// Refuses a window over RAM or the interrupt controllers.
pub fn check_window(w: &EcamWindow, p: &Platform) -> Result<(), PciexbarError> {
    if let Some(top) = p.low_ram_top() {
        if w.base < top.min(1 << 32) {
            return Err(PciexbarError::LowRam(top));
        }
    }
    if let Some(top) = p.high_ram_top() {
        if w.last() >= 1 << 32 && w.base < top {
            return Err(PciexbarError::HighRam(top));
        }
    }
    if w.overlaps(LAPIC_BASE, LAPIC_LAST) {
        return Err(PciexbarError::Lapic);
    }
    if w.overlaps(IOAPIC_BASE, IOAPIC_LAST) {
        return Err(PciexbarError::Ioapic);
    }
    Ok(())
}

/// PCIEXBAR (MCH 00:00.0, 0x60, 64 bits).
#[derive(Debug)]
pub struct Pciexbar {
    regs: [RegisterSpec; 1],
    value: u64,
    segment: u16,
    active: Option<EcamWindow>,
}

impl Pciexbar {
    pub fn new(phase: Phase, segment: u16) -> Self {
        Pciexbar {
            regs: [RegisterSpec {
                name: "PCIEXBAR",
                sbdf: bus0(Q35_MCH_DEVFN),
                offset: MCH_PCIEXBAR,
                width: MCH_PCIEXBAR_SIZE,
                wmask: PCIEXBAR_WMASK,
                phase,
            }],
            value: PCIEXBAR_DEFAULT,
            segment,
            active: None,
        }
    }

    pub fn window(&self) -> Option<EcamWindow> {
        self.active
    }
}

impl Intercept for Pciexbar {
    fn name(&self) -> &'static str {
        "pciexbar"
    }

    fn registers(&self) -> &[RegisterSpec] {
        &self.regs
    }

    fn value(&self, _reg: usize) -> u64 {
        self.value
    }

    fn update(
        &mut self,
        _reg: usize,
        new: u64,
        p: &mut Platform,
        out: &mut Vec<LayoutEvent>,
    ) -> bool {
        self.value = new;
        let want = match pciexbar_window(new, self.segment).and_then(|w| match w {
            Some(w) => check_window(&w, p).map(|()| Some(w)),
            None => Ok(None),
        }) {
            Ok(w) => w,
            Err(why) => {
                warn!(value = format_args!("{new:#x}"), %why, "PCIEXBAR refused; ECAM window disabled");
                out.push(LayoutEvent::Refused {
                    register: "PCIEXBAR",
                    value: new,
                    why: why.to_string(),
                });
                None
            }
        };
        if want != self.active {
            out.push(LayoutEvent::Ecam {
                old: self.active,
                new: want,
            });
            self.active = want;
        }
        true
    }

    fn not_applied(&mut self, event: &LayoutEvent) {
        // The engine removes the old window before it installs the new one, so a refused
        // window leaves none.
        if let LayoutEvent::Ecam { new: Some(w), .. } = event {
            if self.active == Some(*w) {
                self.active = None;
            }
        }
    }
}

/// Why a PM block cannot be placed where its base register says.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PmBlockError {
    #[error("base 0")]
    BaseZero,
    #[error("beyond the port space")]
    BeyondPortSpace,
    #[error("overlaps the {0}")]
    Protected(&'static str),
}

/// Where a PM block is when it decodes, or why it cannot be placed there.
pub fn pm_block(base: u64, size: u64) -> Result<IoRange, PmBlockError> {
    if base == 0 {
        return Err(PmBlockError::BaseZero);
    }
    let last = base + size - 1;
    if last > 0xffff {
        return Err(PmBlockError::BeyondPortSpace);
    }
    if let Some((_, _, what)) = PROTECTED_PORTS
        .iter()
        .find(|(s, e, _)| *s <= last && base <= *e)
    {
        return Err(PmBlockError::Protected(what));
    }
    Ok(IoRange::ports(base as u16, last as u16))
}

/// Common logic of the ICH9 and PIIX4 PM blocks: a base register and an enable register.
#[derive(Debug)]
pub struct PmBlockIntercept {
    name: &'static str,
    regs: [RegisterSpec; 2],
    values: [u64; 2],
    base_mask: u64,
    enable_bit: u64,
    size: u64,
    active: Option<IoRange>,
}

impl PmBlockIntercept {
    /// ICH9 LPC: PMBASE (0x40, bits 15:7) and ACPI_CNTL (0x44, ACPI_EN).
    pub fn ich9(phase: Phase) -> Self {
        let f = bus0(ICH9_LPC_DEVFN);
        PmBlockIntercept {
            name: "ich9-pm",
            regs: [
                RegisterSpec {
                    name: "PMBASE",
                    sbdf: f,
                    offset: ICH9_PMBASE,
                    width: ICH9_PMBASE_SIZE,
                    wmask: ICH9_PMBASE_MASK,
                    phase,
                },
                RegisterSpec {
                    name: "ACPI_CNTL",
                    sbdf: f,
                    offset: ICH9_ACPI_CNTL,
                    width: ICH9_ACPI_CNTL_SIZE,
                    wmask: ICH9_ACPI_CNTL_WMASK,
                    phase,
                },
            ],
            values: [ICH9_PMBASE_DEFAULT, 0],
            base_mask: ICH9_PMBASE_MASK,
            enable_bit: ICH9_ACPI_CNTL_ACPI_EN,
            size: ICH9_PM_BLOCK_SIZE,
            active: None,
        }
    }

    /// PIIX4 PM (00:01.3): PMBA (0x40, bits 15:6) and PMREGMISC (0x80, PMIOSE).
    pub fn piix4(phase: Phase) -> Self {
        let f = bus0(PIIX4_PM_DEVFN);
        PmBlockIntercept {
            name: "piix4-pm",
            regs: [
                RegisterSpec {
                    name: "PMBA",
                    sbdf: f,
                    offset: PIIX4_PMBA,
                    width: PIIX4_PMBA_SIZE,
                    wmask: PIIX4_PMBA_MASK,
                    phase,
                },
                RegisterSpec {
                    name: "PMREGMISC",
                    sbdf: f,
                    offset: PIIX4_PMREGMISC,
                    width: PIIX4_PMREGMISC_SIZE,
                    wmask: PIIX4_PMIOSE,
                    phase,
                },
            ],
            values: [1, 0],
            base_mask: PIIX4_PMBA_MASK,
            enable_bit: PIIX4_PMIOSE,
            size: PIIX4_PM_BLOCK_SIZE,
            active: None,
        }
    }

    pub fn block(&self) -> Option<IoRange> {
        self.active
    }
}

impl Intercept for PmBlockIntercept {
    fn name(&self) -> &'static str {
        self.name
    }

    fn registers(&self) -> &[RegisterSpec] {
        &self.regs
    }

    fn value(&self, reg: usize) -> u64 {
        self.values.get(reg).copied().unwrap_or(0)
    }

    fn update(
        &mut self,
        reg: usize,
        new: u64,
        _p: &mut Platform,
        out: &mut Vec<LayoutEvent>,
    ) -> bool {
        if let Some(v) = self.values.get_mut(reg) {
            *v = new;
        }
        let enabled = self.values[1] & self.enable_bit != 0;
        let base = self.values[0] & self.base_mask;
        let want = if enabled {
            match pm_block(base, self.size) {
                Ok(r) => Some(r),
                Err(why) => {
                    warn!(block = self.name, base = format_args!("{base:#x}"), %why, "PM block refused");
                    out.push(LayoutEvent::Refused {
                        register: self.regs[0].name,
                        value: self.values[0],
                        why: why.to_string(),
                    });
                    None
                }
            }
        } else {
            None
        };
        if want != self.active {
            out.push(LayoutEvent::PmBlock {
                function: self.regs[0].sbdf,
                old: self.active,
                new: want,
            });
            self.active = want;
        }
        true
    }

    fn not_applied(&mut self, event: &LayoutEvent) {
        // As for PCIEXBAR: the old block was released before the new one was refused.
        if let LayoutEvent::PmBlock {
            function,
            new: Some(r),
            ..
        } = event
        {
            if *function == self.regs[0].sbdf && self.active == Some(*r) {
                self.active = None;
            }
        }
    }
}

/// TOLUD and TOUUD (MCH 0xb0 and 0xa2). QEMU 7.2 does not model them and reads 0: zero
/// means unknown, and the configured fallback applies.
#[derive(Debug)]
pub struct MmioHole {
    regs: [RegisterSpec; 2],
    values: [u64; 2],
}

impl MmioHole {
    pub fn new(phase: Phase) -> Self {
        let f = bus0(Q35_MCH_DEVFN);
        MmioHole {
            regs: [
                RegisterSpec {
                    name: "TOLUD",
                    sbdf: f,
                    offset: MCH_TOLUD,
                    width: MCH_TOLUD_SIZE,
                    wmask: MCH_TOLUD_MASK,
                    phase,
                },
                RegisterSpec {
                    name: "TOUUD",
                    sbdf: f,
                    offset: MCH_TOUUD,
                    width: MCH_TOUUD_SIZE,
                    wmask: 0xffff,
                    phase,
                },
            ],
            values: [0, 0],
        }
    }
}

impl Intercept for MmioHole {
    fn name(&self) -> &'static str {
        "mmio-hole"
    }

    fn registers(&self) -> &[RegisterSpec] {
        &self.regs
    }

    fn value(&self, reg: usize) -> u64 {
        self.values.get(reg).copied().unwrap_or(0)
    }

    fn update(
        &mut self,
        reg: usize,
        new: u64,
        p: &mut Platform,
        out: &mut Vec<LayoutEvent>,
    ) -> bool {
        if let Some(v) = self.values.get_mut(reg) {
            *v = new;
        }
        let tolud = (self.values[0] & MCH_TOLUD_MASK) << MCH_TOLUD_SHIFT;
        let touud = self.values[1] << MCH_TOUUD_SHIFT;
        let tolud = (tolud != 0).then_some(tolud);
        let touud = (touud != 0).then_some(touud);
        if (tolud, touud) != (p.tolud, p.touud) {
            p.tolud = tolud;
            p.touud = touud;
            out.push(LayoutEvent::MmioHole { tolud, touud });
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(it: &mut dyn Intercept, reg: usize, v: u64, p: &mut Platform) -> Vec<LayoutEvent> {
        let mut out = vec![];
        it.update(reg, v, p, &mut out);
        out
    }

    #[test]
    fn pciexbar_lengths_and_bases() {
        let w = pciexbar_window(0xb000_0001, 0).unwrap().unwrap();
        assert_eq!(
            (w.base, w.end_bus, w.size()),
            (0xb000_0000, 0xff, 256 << 20)
        );
        // 128 MiB: bit 27 is an address bit.
        let w = pciexbar_window(0xb800_0003, 0).unwrap().unwrap();
        assert_eq!((w.base, w.end_bus), (0xb800_0000, 0x7f));
        // 64 MiB: bits 27 and 26.
        let w = pciexbar_window(0xbc00_0005, 0).unwrap().unwrap();
        assert_eq!((w.base, w.end_bus), (0xbc00_0000, 0x3f));
        // 256 MiB ignores bits 27:26.
        let w = pciexbar_window(0xbc00_0001, 0).unwrap().unwrap();
        assert_eq!(w.base, 0xb000_0000);
        assert!(pciexbar_window(0xb000_0007, 0).is_err(), "reserved length");
        assert_eq!(pciexbar_window(0xb000_0000, 0).unwrap(), None);
        // Above 4 GiB (bits 35:32).
        let w = pciexbar_window(0x8_0000_0001, 0).unwrap().unwrap();
        assert_eq!(w.base, 0x8_0000_0000);
    }

    #[test]
    fn pciexbar_moves_resizes_disables() {
        let mut p = Platform {
            low_ram_top: Some(0x8000_0000),
            ..Default::default()
        };
        let mut x = Pciexbar::new(Phase::Instead, 0);
        assert!(run(&mut x, 0, 0xb000_0000, &mut p).is_empty());
        let e = run(&mut x, 0, 0xb000_0001, &mut p);
        let w1 = EcamWindow::new(0, 0xb000_0000, 0, 0xff).unwrap();
        assert_eq!(
            e,
            vec![LayoutEvent::Ecam {
                old: None,
                new: Some(w1)
            }]
        );
        let e = run(&mut x, 0, 0xe000_0005, &mut p);
        let w2 = EcamWindow::new(0, 0xe000_0000, 0, 0x3f).unwrap();
        assert_eq!(
            e,
            vec![LayoutEvent::Ecam {
                old: Some(w1),
                new: Some(w2)
            }]
        );
        let e = run(&mut x, 0, 0xe000_0004, &mut p);
        assert_eq!(
            e,
            vec![LayoutEvent::Ecam {
                old: Some(w2),
                new: None
            }]
        );
    }

    #[test]
    fn pciexbar_refusals_leave_the_window_disabled() {
        let mut p = Platform {
            low_ram_top: Some(0x8000_0000),
            ..Default::default()
        };
        let mut x = Pciexbar::new(Phase::Instead, 0);
        run(&mut x, 0, 0xb000_0001, &mut p);
        for (v, why) in [
            (0x4000_0001u64, "RAM below TOLUD"),
            (0xb000_0007, "reserved"),
            (0xfec0_0005, "APIC"),
            (0xfe00_0001, "APIC"),
        ] {
            let e = run(&mut x, 0, v, &mut p);
            assert!(
                matches!(&e[0], LayoutEvent::Refused { why: w, .. } if w.contains(why)),
                "{v:#x}: {e:?}"
            );
            assert_eq!(x.window(), None);
            run(&mut x, 0, 0xb000_0001, &mut p);
        }
        // A known TOLUD wins over the configured fallback.
        p.tolud = Some(0xa000_0000);
        let e = run(&mut x, 0, 0xb000_0001, &mut p);
        assert!(e.is_empty(), "same window, still valid: {e:?}");
        let e = run(&mut x, 0, 0x9000_0001, &mut p);
        assert!(matches!(&e[0], LayoutEvent::Refused { why, .. } if why.contains("0xa0000000")));
        // High RAM.
        p.touud = Some(0x2_0000_0000);
        let e = run(&mut x, 0, 0x1_0000_0001, &mut p);
        assert!(matches!(&e[0], LayoutEvent::Refused { why, .. } if why.contains("above 4 GiB")));
    }

    #[test]
    fn ich9_pm_block_follows_base_and_acpi_en() {
        let mut p = Platform::default();
        let mut pm = PmBlockIntercept::ich9(Phase::After);
        assert!(
            run(&mut pm, 0, 0x601 & ICH9_PMBASE_MASK | 1, &mut p).is_empty(),
            "not enabled"
        );
        let e = run(&mut pm, 1, 0x80, &mut p);
        let f = bus0(ICH9_LPC_DEVFN);
        assert_eq!(
            e,
            vec![LayoutEvent::PmBlock {
                function: f,
                old: None,
                new: Some(IoRange::ports(0x600, 0x67f))
            }]
        );
        let e = run(&mut pm, 0, 0xb001 & ICH9_PMBASE_MASK, &mut p);
        assert_eq!(
            e,
            vec![LayoutEvent::PmBlock {
                function: f,
                old: Some(IoRange::ports(0x600, 0x67f)),
                new: Some(IoRange::ports(0xb000, 0xb07f))
            }]
        );
        let e = run(&mut pm, 1, 0, &mut p);
        assert!(matches!(e[0], LayoutEvent::PmBlock { new: None, .. }));
    }

    #[test]
    fn events_the_engine_could_not_apply_are_retried() {
        let mut p = Platform {
            low_ram_top: Some(0x8000_0000),
            ..Default::default()
        };
        let mut x = Pciexbar::new(Phase::Before, 0);
        let e = run(&mut x, 0, 0xb000_0001, &mut p);
        assert_eq!(e.len(), 1);
        // Rewriting an applied value is no change...
        assert!(run(&mut x, 0, 0xb000_0001, &mut p).is_empty());
        // ...but after the engine reports it was not applied, the same value asks again.
        x.not_applied(&e[0]);
        assert_eq!(x.window(), None);
        assert_eq!(run(&mut x, 0, 0xb000_0001, &mut p), e);
        // An event about something else changes nothing.
        let other = LayoutEvent::PmBlock {
            function: bus0(ICH9_LPC_DEVFN),
            old: None,
            new: Some(IoRange::ports(0x600, 0x67f)),
        };
        x.not_applied(&other);
        assert!(x.window().is_some());

        let mut pm = PmBlockIntercept::ich9(Phase::After);
        run(&mut pm, 0, 0x600, &mut p);
        let e = run(&mut pm, 1, 0x80, &mut p);
        assert_eq!(e.len(), 1);
        pm.not_applied(&e[0]);
        assert_eq!(pm.block(), None);
        assert_eq!(
            run(&mut pm, 1, 0x80, &mut p),
            e,
            "ACPI_EN rewritten: retried"
        );
    }

    #[test]
    fn pm_block_refusals() {
        let mut p = Platform::default();
        let mut pm = PmBlockIntercept::ich9(Phase::After);
        run(&mut pm, 1, 0x80, &mut p);
        for base in [0u64, 0xc80, 0x0] {
            let e = run(&mut pm, 0, base, &mut p);
            assert!(
                e.iter().any(|e| matches!(e, LayoutEvent::Refused { .. })),
                "{base:#x}: {e:?}"
            );
            assert_eq!(pm.block(), None);
        }
        // The PIIX4 block is 64 bytes.
        let mut pm = PmBlockIntercept::piix4(Phase::After);
        run(&mut pm, 0, 0xb000, &mut p);
        run(&mut pm, 1, 1, &mut p);
        assert_eq!(pm.block(), Some(IoRange::ports(0xb000, 0xb03f)));
    }

    #[test]
    fn zero_tolud_is_unknown() {
        let mut p = Platform::default();
        let mut h = MmioHole::new(Phase::After);
        assert!(run(&mut h, 0, 0, &mut p).is_empty());
        assert_eq!(p.tolud, None);
        let e = run(&mut h, 0, 0x8000, &mut p);
        assert_eq!(
            e,
            vec![LayoutEvent::MmioHole {
                tolud: Some(0x8000_0000),
                touud: None
            }]
        );
        run(&mut h, 1, 0x1400, &mut p);
        assert_eq!(p.touud, Some(0x1_4000_0000));
    }
}
