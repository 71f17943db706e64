//! Target `chipset_intercept`: arbitrary sequences of configuration reads and writes to the
//! MCH, ICH9 LPC and PIIX4 registers through the intercept table (`hits`, `before_write`,
//! `after_write`, `read_needs_model`, `after_read`), with arbitrary phases, chipsets and
//! platform limits. A model keeps each register's value; after every access:
//!
//! - `hits` are exactly the registers of the function that the access touches;
//! - the bytes left to the model are the access minus the Instead registers; a read needs the
//!   model unless Instead registers cover every byte, and returns the model's value with the
//!   Instead registers' bytes put in;
//! - every register holds what the model says (writes through the write mask, reads learnt
//!   by Before/After handlers);
//! - the ECAM window the events describe equals what PCIEXBAR decodes to (refused when it
//!   cannot be placed), the PM block equals what PMBASE/ACPI_CNTL (PMBA/PMREGMISC) place,
//!   TOLUD/TOUUD reach the platform, and each event's `old` is the previous `new`.
//!
//! Input: set-up bytes (chipset, phases, platform), then accesses.

use crate::Bytes;
use bdf_router::{ConfigAccess, ConfigPath, EcamWindow, Sbdf};
use chipset_intercept::registers::*;
use chipset_intercept::{Chipset, InterceptConfig, LayoutEvent, Phase, RegisterSpec, build, q35};
use ioreq_server::{IoRange, size_mask};

const FUNCS: [Sbdf; 5] = [
    Sbdf::from_devfn(0, 0, 0),
    Sbdf::from_devfn(0, 0, ICH9_LPC_DEVFN),
    Sbdf::from_devfn(0, 0, PIIX4_PM_DEVFN),
    Sbdf::from_devfn(0, 0, PIIX_ISA_DEVFN),
    Sbdf::from_devfn(0, 1, 0),
];
const DWORDS: [u16; 12] = [
    0x60, 0x64, 0x40, 0x44, 0x80, 0xa0, 0xb0, 0x5c, 0x68, 0x3c, 0x48, 0xac,
];

fn phase(b: u8) -> Option<Phase> {
    match b % 4 {
        0 => None,
        1 => Some(Phase::Before),
        2 => Some(Phase::After),
        _ => Some(Phase::Instead),
    }
}

/// One register in the model.
struct Reg {
    spec: RegisterSpec,
    value: u64,
}

fn overlap(spec: &RegisterSpec, acc: &ConfigAccess) -> Option<(u16, u16)> {
    if spec.sbdf != acc.sbdf {
        return None;
    }
    let lo = acc.reg.max(spec.offset);
    let hi = (acc.reg + u16::from(acc.size)).min(spec.offset + spec.width);
    (lo < hi).then_some((lo, hi))
}

/// `old` with the bytes of `acc` inside the register replaced from `data`.
fn put_bytes(spec: &RegisterSpec, old: u64, acc: &ConfigAccess, data: u64) -> u64 {
    let Some((lo, hi)) = overlap(spec, acc) else {
        return old;
    };
    let mut v = old.to_le_bytes();
    let d = data.to_le_bytes();
    for r in lo..hi {
        v[usize::from(r - spec.offset)] = d[usize::from(r - acc.reg)];
    }
    u64::from_le_bytes(v)
}

fn byte_mask(spec: &RegisterSpec, acc: &ConfigAccess) -> u8 {
    overlap(spec, acc).map_or(0, |(lo, hi)| {
        (lo..hi).fold(0, |m, r| m | 1 << (r - acc.reg))
    })
}

/// PM block placement, from the ICH9/PIIX4 datasheets' rules as the intercept applies them.
fn pm_block_model(base: u64, size: u64) -> Option<IoRange> {
    let last = base + size - 1;
    if base == 0 || last > 0xffff {
        return None;
    }
    if PROTECTED_PORTS
        .iter()
        .any(|(s, e, _)| *s <= last && base <= *e)
    {
        return None;
    }
    Some(IoRange::ports(base as u16, last as u16))
}

/// The ECAM window a PCIEXBAR value decodes to (3 Series datasheet 5.1.14): enable bit 0,
/// length bits 2:1 (256/128/64 MiB, 11b reserved), base bits 35:28/27/26.
fn pciexbar_model(v: u64, segment: u16) -> Result<Option<EcamWindow>, ()> {
    if v & 1 == 0 {
        return Ok(None);
    }
    let (low_bit, end_bus) = match (v >> 1) & 3 {
        0 => (28, 0xff),
        1 => (27, 0x7f),
        2 => (26, 0x3f),
        _ => return Err(()),
    };
    let base = v & ((1u64 << 36) - 1) & !((1u64 << low_bit) - 1);
    Ok(Some(
        EcamWindow::new(segment, base, 0, end_bus).map_err(|_| ())?,
    ))
}

pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let chipset = match b.u8() % 3 {
        0 | 1 => Chipset::Q35,
        _ => Chipset::I440fx,
    };
    let cfg = InterceptConfig {
        pciexbar: phase(b.u8()),
        pm: phase(b.u8()),
        mmio_hole: phase(b.u8()),
        ecam_segment: u16::from(b.u8() & 1),
        low_ram_top: b.bool().then(|| u64::from(b.u16()) << 16),
        high_ram_top: b.bool().then(|| u64::from(b.u16()) << 20),
    };
    let mut t = build(chipset, &cfg);
    let offsets: Vec<usize> = t
        .intercepts()
        .iter()
        .scan(0, |n, it| {
            let o = *n;
            *n += it.registers().len();
            Some(o)
        })
        .collect();
    let mut regs: Vec<Reg> = t
        .snapshot()
        .into_iter()
        .map(|(_, spec, value)| Reg { spec, value })
        .collect();
    let mut window: Option<EcamWindow> = None;
    let mut pm: Option<IoRange> = None;
    let mut hole = (None, None);
    let mut ops = 0;
    while !b.is_empty() && ops < 300 {
        ops += 1;
        let sel = b.u8();
        let sbdf = FUNCS[usize::from(sel >> 1) % FUNCS.len()];
        let k = b.u8();
        let dword = if k < 0xf0 {
            DWORDS[usize::from(k) % DWORDS.len()]
        } else {
            u16::from(k & 0x3f) << 2
        };
        let s = b.u8();
        let off = u16::from(s & 3);
        let size: u8 = match (s >> 2) & 3 {
            0 => 1,
            1 if off % 2 == 0 => 2,
            2 if off == 0 => 4,
            _ => 1,
        };
        let acc = ConfigAccess {
            sbdf,
            reg: dword + off,
            size,
            path: if s & 0x80 != 0 {
                ConfigPath::Ecam
            } else {
                ConfigPath::Cf8
            },
        };
        let data = u64::from(b.u32()) & size_mask(size.into());
        let all: u8 = ((1u16 << size) - 1) as u8;

        // The registers the access touches, by brute force.
        let hits = t.hits(&acc);
        let mut got: Vec<usize> = hits.iter().map(|h| offsets[h.intercept] + h.reg).collect();
        got.sort_unstable();
        let want: Vec<usize> = (0..regs.len())
            .filter(|&i| overlap(&regs[i].spec, &acc).is_some())
            .collect();
        assert_eq!(got, want, "registers hit by {acc:?}");
        let instead: u8 = want
            .iter()
            .filter(|&&i| regs[i].spec.phase == Phase::Instead)
            .fold(0, |m, &i| m | byte_mask(&regs[i].spec, &acc));

        let mut ev = vec![];
        let mut updated: Vec<usize> = vec![];
        if sel & 1 == 0 {
            let part = t.before_write(&hits, &acc, data, &mut ev);
            assert_eq!(
                part.bytes,
                all & !instead,
                "bytes the model sees of {acc:?}"
            );
            for &i in &want {
                if matches!(regs[i].spec.phase, Phase::Before | Phase::Instead) {
                    let r = &mut regs[i];
                    let new = put_bytes(&r.spec, r.value, &acc, data);
                    r.value = (r.value & !r.spec.wmask) | (new & r.spec.wmask);
                    updated.push(i);
                }
            }
            t.after_write(&hits, &acc, data, &mut ev);
            for &i in &want {
                if regs[i].spec.phase == Phase::After {
                    let r = &mut regs[i];
                    let new = put_bytes(&r.spec, r.value, &acc, data);
                    r.value = (r.value & !r.spec.wmask) | (new & r.spec.wmask);
                    updated.push(i);
                }
            }
        } else {
            let model_value = data;
            assert_eq!(t.read_needs_model(&hits, &acc), instead != all);
            let v = t.after_read(&hits, &acc, model_value, &mut ev);
            let mut expect = model_value;
            for &i in &want {
                let r = &mut regs[i];
                match r.spec.phase {
                    Phase::Instead => {
                        let (lo, hi) = overlap(&r.spec, &acc).unwrap();
                        let mut e = expect.to_le_bytes();
                        let rv = r.value.to_le_bytes();
                        for g in lo..hi {
                            e[usize::from(g - acc.reg)] = rv[usize::from(g - r.spec.offset)];
                        }
                        expect = u64::from_le_bytes(e);
                    }
                    Phase::Before | Phase::After => {
                        let new = put_bytes(&r.spec, r.value, &acc, model_value);
                        if new != r.value {
                            r.value = new;
                            updated.push(i);
                        }
                    }
                }
            }
            assert_eq!(
                v, expect,
                "value read from {acc:?} (model {model_value:#x})"
            );
        }

        // Every register holds what the model says.
        for ((_, spec, value), r) in t.snapshot().iter().zip(regs.iter()) {
            assert_eq!(*spec, r.spec);
            assert_eq!(*value, r.value, "{} after {acc:?} {data:#x}", spec.name);
        }

        // What the handlers that ran must have emitted.
        let mut want_window = window;
        let mut want_pm = pm;
        let mut want_hole = hole;
        let mut refusals = 0;
        for &i in &updated {
            let name = regs[i].spec.name;
            match name {
                "PCIEXBAR" => {
                    let w = pciexbar_model(regs[i].value, cfg.ecam_segment).and_then(|w| match w {
                        Some(w) if q35::check_window(&w, &t.platform).is_err() => Err(()),
                        w => Ok(w),
                    });
                    if w.is_err() {
                        refusals += 1;
                    }
                    want_window = w.unwrap_or(None);
                }
                "PMBASE" | "ACPI_CNTL" | "PMBA" | "PMREGMISC" => {
                    let first = i - usize::from(matches!(name, "ACPI_CNTL" | "PMREGMISC"));
                    let (base_mask, enable, size) = if regs[first].spec.name == "PMBASE" {
                        (ICH9_PMBASE_MASK, ICH9_ACPI_CNTL_ACPI_EN, ICH9_PM_BLOCK_SIZE)
                    } else {
                        (PIIX4_PMBA_MASK, PIIX4_PMIOSE, PIIX4_PM_BLOCK_SIZE)
                    };
                    want_pm = if regs[first + 1].value & enable != 0 {
                        let r = pm_block_model(regs[first].value & base_mask, size);
                        if r.is_none() {
                            refusals += 1;
                        }
                        r
                    } else {
                        None
                    };
                }
                "TOLUD" | "TOUUD" => {
                    let first = i - usize::from(name == "TOUUD");
                    let tolud = (regs[first].value & MCH_TOLUD_MASK) << MCH_TOLUD_SHIFT;
                    let touud = regs[first + 1].value << MCH_TOUUD_SHIFT;
                    want_hole = ((tolud != 0).then_some(tolud), (touud != 0).then_some(touud));
                }
                other => panic!("unknown register {other}"),
            }
        }
        for e in &ev {
            let _ = e.to_string();
            match e {
                LayoutEvent::Ecam { old, new } => {
                    assert_eq!(*old, window, "ECAM event's old window");
                    assert_ne!(old, new);
                    window = *new;
                }
                LayoutEvent::PmBlock { function, old, new } => {
                    assert_eq!(*old, pm, "PM event's old block");
                    assert_ne!(old, new);
                    assert!(*function == FUNCS[1] || *function == FUNCS[2]);
                    pm = *new;
                }
                LayoutEvent::MmioHole { tolud, touud } => {
                    assert_ne!((*tolud, *touud), hole);
                    hole = (*tolud, *touud);
                }
                LayoutEvent::Refused { .. } => refusals -= 1,
            }
        }
        assert_eq!(
            refusals, 0,
            "one refusal per value that cannot be placed: {ev:?}"
        );
        assert_eq!(
            window, want_window,
            "ECAM window after {acc:?} {data:#x}: {ev:?}"
        );
        assert_eq!(pm, want_pm, "PM block after {acc:?} {data:#x}: {ev:?}");
        assert_eq!(hole, want_hole, "TOLUD/TOUUD after {acc:?} {data:#x}");
        assert_eq!((t.platform.tolud, t.platform.touud), hole);
    }
}
