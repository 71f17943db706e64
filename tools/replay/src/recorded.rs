//! What a trace showed of the configuration space of the functions one trace server stands
//! for, so that after the replay the server can answer configuration reads as the recorded
//! machine would have (`ioreq-mux inspect --trace` reads every function through its owner).
//!
//! Per function and byte: the last value the guest read or wrote there. A written byte may
//! differ from what the device would return (read-only bits); firmware reads back most of
//! what it programs, and both bundled firmwares re-read every bridge's windows at the end.
//!
//! Sizing a BAR (PCI Local Bus spec 3.0, 6.2.5.1) writes all ones and reads back which bits
//! the register keeps. A read that follows such a write to the same register of the same
//! function is remembered as that register's answer to a probe, and given again when the
//! guest (or `inspect`) probes it after the replay. A probe is a 4-byte write that sets
//! every bit from 11 up: all ones for a BAR, `0xfffff800` (SeaBIOS) or `0xfffffffe` (EDK2,
//! Linux) for an expansion ROM BAR, whose address is 2 KiB-aligned at least (6.2.5.2).
//!
//! Functions are keyed by the BDF they had when accessed: a function whose bus was renumbered
//! after firmware read it keeps its earlier bytes under its earlier BDF.

use bdf_router::Sbdf;
use ioreq_server::{Dir, Ioreq, IoreqType, abi, size_mask};
use std::collections::HashMap;

/// Bits a probe write must set (31:11).
const PROBE_BITS: u32 = 0xffff_f800;

/// One function's recorded configuration space.
#[derive(Debug, Clone)]
struct RecordedFunction {
    /// Last value seen per byte; `None`: never accessed.
    bytes: Vec<Option<u8>>,
    /// Register (offset, size) -> what it answered right after a probe write.
    probes: HashMap<(u16, u8), u64>,
    /// The function's last access was a probe write to (offset, size).
    probing: Option<(u16, u8)>,
}

impl RecordedFunction {
    fn new() -> Self {
        RecordedFunction {
            bytes: vec![None; usize::from(bdf_router::address::CONFIG_SPACE_SIZE)],
            probes: HashMap::new(),
            probing: None,
        }
    }

    fn store(&mut self, reg: u16, size: u8, value: u64) {
        for i in 0..usize::from(size) {
            if let Some(b) = self.bytes.get_mut(usize::from(reg) + i) {
                *b = Some((value >> (8 * i)) as u8);
            }
        }
    }

    /// The register's bytes as last seen (0 for a byte never accessed), and whether every
    /// one of them was seen.
    fn load(&self, reg: u16, size: u8) -> Answer {
        (0..usize::from(size)).fold(Answer::recorded(0), |a, i| {
            let b = self.bytes.get(usize::from(reg) + i).copied().flatten();
            Answer {
                value: a.value | u64::from(b.unwrap_or(0)) << (8 * i),
                recorded: a.recorded && b.is_some(),
            }
        })
    }
}

/// A configuration access answered after the replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The data read (0 for a write).
    pub value: u64,
    /// Every byte read was seen in the trace (or the answer is a recorded probe's); `false`:
    /// the guest never accessed some of them, which read 0 and say nothing of the device.
    pub recorded: bool,
}

impl Answer {
    fn recorded(value: u64) -> Self {
        Answer {
            value,
            recorded: true,
        }
    }
}

/// The function, register and size of a configuration request.
fn config_target(req: &Ioreq) -> Option<(Sbdf, u16, u8)> {
    (req.ty == IoreqType::PciConfig).then(|| {
        let (sbdf, reg) = abi::split_pci_config_addr(req.addr);
        (Sbdf::from_xen(sbdf), reg as u16, req.size as u8)
    })
}

fn is_probe(size: u8, data: u64) -> bool {
    size == 4 && (data as u32) & PROBE_BITS == PROBE_BITS
}

/// The recorded configuration space of every function a trace server answered for.
#[derive(Debug, Clone, Default)]
pub struct RecordedConfig {
    functions: HashMap<Sbdf, RecordedFunction>,
}

impl RecordedConfig {
    /// Learns from one recorded access: `value` is the data read or written.
    pub fn learn(&mut self, sbdf: Sbdf, reg: u16, size: u8, dir: Dir, value: u64) {
        let value = value & size_mask(size.into());
        let f = self
            .functions
            .entry(sbdf)
            .or_insert_with(RecordedFunction::new);
        match dir {
            Dir::Write => {
                f.store(reg, size, value);
                f.probing = is_probe(size, value).then_some((reg, size));
            }
            Dir::Read => {
                if f.probing.take() == Some((reg, size)) {
                    f.probes.insert((reg, size), value);
                }
                f.store(reg, size, value);
            }
        }
    }

    /// Learns from a recorded request the server answered (`value`: the data read or
    /// written); only configuration requests teach anything.
    pub fn learn_request(&mut self, req: &Ioreq, value: u64) {
        if let Some((f, reg, size)) = config_target(req) {
            self.learn(f, reg, size, req.dir, value);
        }
    }

    /// A request after the replay: a configuration access to a function the trace showed is
    /// answered from the recording (`Some`, 0 for a write); anything else is not (`None`).
    pub fn after_replay(&mut self, req: &Ioreq) -> Option<Answer> {
        let (f, reg, size) = config_target(req)?;
        match req.dir {
            Dir::Read => self.read(f, reg, size),
            Dir::Write => self.knows(f).then(|| {
                self.write(f, reg, size, req.data);
                Answer::recorded(0)
            }),
        }
    }

    /// Does the trace show anything of this function?
    pub fn knows(&self, sbdf: Sbdf) -> bool {
        self.functions.contains_key(&sbdf)
    }

    /// A read after the replay: the recorded answer to a probe that just happened, else the
    /// last value seen (bytes never accessed read 0, and the answer says it is not
    /// recorded). `None` for a function never accessed.
    pub fn read(&mut self, sbdf: Sbdf, reg: u16, size: u8) -> Option<Answer> {
        let f = self.functions.get_mut(&sbdf)?;
        let probed = f.probing.take() == Some((reg, size));
        match f.probes.get(&(reg, size)) {
            Some(&answer) if probed => Some(Answer::recorded(answer)),
            _ => Some(f.load(reg, size)),
        }
    }

    /// A write after the replay (a probe, or restoring a register): kept like a recorded one.
    pub fn write(&mut self, sbdf: Sbdf, reg: u16, size: u8, data: u64) {
        if self.knows(sbdf) {
            self.learn(sbdf, reg, size, Dir::Write, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: &str) -> Sbdf {
        t.parse().unwrap_or_else(|e| panic!("{t}: {e}"))
    }

    /// The value of a read the recording answers in full.
    fn value(r: &mut RecordedConfig, f: Sbdf, reg: u16, size: u8) -> Option<u64> {
        r.read(f, reg, size).map(|a| {
            assert!(a.recorded, "{f} @{reg:#x}: {a:?}");
            a.value
        })
    }

    #[test]
    fn bytes_follow_reads_and_writes() {
        let mut r = RecordedConfig::default();
        let f = s("00:02.0");
        assert_eq!(r.read(f, 0, 4), None, "never accessed");
        r.learn(f, 0, 4, Dir::Read, 0x000c_1b36);
        r.learn(f, 0x1c, 2, Dir::Read, 0xd0d0);
        r.learn(f, 0x1d, 1, Dir::Write, 0xdf);
        assert_eq!(value(&mut r, f, 0, 2), Some(0x1b36));
        assert_eq!(value(&mut r, f, 0x1c, 2), Some(0xdfd0));
        let unseen = Answer {
            value: 0,
            recorded: false,
        };
        assert_eq!(
            r.read(f, 0x1e, 2),
            Some(unseen),
            "bytes never accessed read 0"
        );
        // Two bytes of four seen (0x1c-0x1d): the answer says it is not all recorded.
        let partly = r.read(f, 0x1c, 4);
        assert_eq!(partly.map(|a| (a.value, a.recorded)), Some((0xdfd0, false)));
    }

    #[test]
    fn a_probe_is_answered_as_recorded_and_restoring_undoes_it() {
        let mut r = RecordedConfig::default();
        let f = s("01:00.0");
        // Firmware sizes BAR0 and the ROM (SeaBIOS's pattern), then places BAR0.
        r.learn(f, 0x10, 4, Dir::Read, 0);
        r.learn(f, 0x10, 4, Dir::Write, 0xffff_ffff);
        r.learn(f, 0x10, 4, Dir::Read, 0xfffe_0000);
        r.learn(f, 0x10, 4, Dir::Write, 0);
        r.learn(f, 0x30, 4, Dir::Write, 0xffff_f800);
        r.learn(f, 0x30, 4, Dir::Read, 0xfffc_0000);
        r.learn(f, 0x30, 4, Dir::Write, 0);
        r.learn(f, 0x10, 4, Dir::Write, 0xfda4_0000);
        assert_eq!(value(&mut r, f, 0x10, 4), Some(0xfda4_0000));
        // A probe after the replay (another pattern) gets the recorded answer ...
        r.write(f, 0x10, 4, 0xffff_ffff);
        assert_eq!(value(&mut r, f, 0x10, 4), Some(0xfffe_0000));
        r.write(f, 0x10, 4, 0xfda4_0000);
        assert_eq!(value(&mut r, f, 0x10, 4), Some(0xfda4_0000));
        r.write(f, 0x30, 4, 0xffff_fffe);
        assert_eq!(value(&mut r, f, 0x30, 4), Some(0xfffc_0000));
        // ... once: the next read is the register again.
        assert_eq!(value(&mut r, f, 0x30, 4), Some(0xffff_fffe));
        // A register never probed reads what was written.
        r.write(f, 0x14, 4, 0xffff_ffff);
        assert_eq!(value(&mut r, f, 0x14, 4), Some(0xffff_ffff));
    }
}
