//! Harnesses of the ioreq-mux fuzz targets. Each module has a `run(data)` that a target in
//! `fuzz_targets/` calls; every check is an `assert!`, so a broken invariant is a crash that
//! libFuzzer reports and minimises like a panic in the code under test.
//!
//! The structured targets (router, intercepts, engine) read their input as a sequence of
//! small operations with a hand-made byte encoding ([`Bytes`]) rather than `arbitrary`, so
//! meaningful seeds can be written by hand (`fuzz/gen_seeds.py`) and a crash input is
//! readable in a hex dump: one opcode byte, then the operation's fields, little endian.

#![allow(clippy::unwrap_used)]

pub mod chipset_intercept;
pub mod ecam_router;
pub mod engine;
pub mod ioreq_abi;
pub mod pcie_port;
pub mod qemu_import;
pub mod trace_reader;
pub mod wire;

/// A reader over the fuzz input that never fails: past the end every read is 0, and
/// [`Bytes::is_empty`] ends the operation loop.
#[derive(Debug, Clone)]
pub struct Bytes<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Bytes<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Bytes { data, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    pub fn bool(&mut self) -> bool {
        self.u8() & 1 != 0
    }

    /// `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = self.pos.saturating_add(n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        &self.data[start..end]
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        self.pos = self.data.len();
        &self.data[start..]
    }
}

/// Xen's access sizes from a selector byte (1, 2, 4, 8; other values rarely).
pub fn size_from(sel: u8) -> u32 {
    match sel & 0x0f {
        0..=3 => 1 << (sel & 3),
        4 => 1,
        5 => 2,
        6 => 4,
        7 => 8,
        8 => 0,
        9 => 3,
        10 => 16,
        _ => u32::from(sel >> 4),
    }
}

/// Merges the disjoint-or-touching inclusive ranges into a canonical list (sorted, adjacent
/// and overlapping ranges joined): two lists cover the same addresses iff their merges are
/// equal.
pub fn merge_ranges(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if last.1 == u64::MAX || s <= last.1 + 1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}
