//! Parsing one line of QEMU's `log` trace backend output (hand-written for speed: the SeaBIOS
//! log is 13.8 M lines).

use ioreq_mux_trace::{BarEventKind, Dir, Sbdf};

/// One parsed line. Byte slices borrow from the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event<'a> {
    /// `memory_region_ops_read|write cpu C mr 0xPTR addr 0xADDR value 0xVAL size N name 'R'`.
    Ops {
        dir: Dir,
        /// `None` for `cpu -1` (an access QEMU made itself, e.g. a device's MSI write).
        vcpu: Option<u16>,
        addr: u64,
        value: u64,
        size: u8,
        region: &'a [u8],
    },
    /// `pci_cfg_read DEV BB:DD.F @0xREG -> 0xVAL` / `pci_cfg_write DEV BB:DD.F @0xREG <- 0xVAL`.
    Cfg {
        dir: Dir,
        device: &'a [u8],
        bdf: Sbdf,
        reg: u16,
        value: u64,
    },
    /// `pci_update_mappings_add|del DEV BB:DD.F BAR,0xBASE+0xSIZE`.
    Mapping {
        kind: BarEventKind,
        device: &'a [u8],
        bdf: Sbdf,
        bar: u8,
        base: u64,
        size: u64,
    },
    /// Empty (or whitespace-only) line.
    Blank,
}

/// A parse failure: what was expected, in which kind of line.
pub(crate) type ParseError = String;

const OPS_READ: &[u8] = b"memory_region_ops_read";
const OPS_WRITE: &[u8] = b"memory_region_ops_write";
const CFG_READ: &[u8] = b"pci_cfg_read";
const CFG_WRITE: &[u8] = b"pci_cfg_write";
const MAP_ADD: &[u8] = b"pci_update_mappings_add";
const MAP_DEL: &[u8] = b"pci_update_mappings_del";

/// Strips the optional `PID@SECONDS.MICROS:` prefix QEMU adds with `-msg timestamp=on`.
fn strip_timestamp(line: &[u8]) -> &[u8] {
    if !line.first().is_some_and(u8::is_ascii_digit) {
        return line;
    }
    let Some(colon) = line.iter().take(48).position(|&b| b == b':') else {
        return line;
    };
    let prefix = &line[..colon];
    let Some(at) = prefix.iter().position(|&b| b == b'@') else {
        return line;
    };
    let (pid, time) = (&prefix[..at], &prefix[at + 1..]);
    let digits = |s: &[u8]| !s.is_empty() && s.iter().all(u8::is_ascii_digit);
    let Some(dot) = time.iter().position(|&b| b == b'.') else {
        return line;
    };
    if digits(pid) && digits(&time[..dot]) && digits(&time[dot + 1..]) {
        &line[colon + 1..]
    } else {
        line
    }
}

/// Parses one line (without its line terminator).
pub(crate) fn parse_line(line: &[u8]) -> Result<Event<'_>, ParseError> {
    let line = strip_timestamp(line);
    let line = trim_end(line);
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(Event::Blank);
    }
    let sp = line.iter().position(|&b| b == b' ').unwrap_or(line.len());
    let (name, rest) = line.split_at(sp);
    match name {
        OPS_READ => parse_ops(rest, Dir::Read, "memory_region_ops_read"),
        OPS_WRITE => parse_ops(rest, Dir::Write, "memory_region_ops_write"),
        CFG_READ => parse_cfg(rest, Dir::Read, "pci_cfg_read"),
        CFG_WRITE => parse_cfg(rest, Dir::Write, "pci_cfg_write"),
        MAP_ADD => parse_mapping(rest, BarEventKind::Map, "pci_update_mappings_add"),
        MAP_DEL => parse_mapping(rest, BarEventKind::Unmap, "pci_update_mappings_del"),
        other => Err(format!(
            "unknown trace event '{}' (the importer reads memory_region_ops_read/write, \
             pci_cfg_read/write and pci_update_mappings_add/del lines of QEMU's log trace backend)",
            String::from_utf8_lossy(&other[..other.len().min(64)])
        )),
    }
}

fn trim_end(mut s: &[u8]) -> &[u8] {
    while let [rest @ .., b'\r' | b'\n' | b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// A reading position in a line, with the event name for error messages.
struct Fields<'a> {
    s: &'a [u8],
    event: &'static str,
}

impl<'a> Fields<'a> {
    fn err(&self, what: &str) -> ParseError {
        format!("expected {what} in {} line", self.event)
    }

    /// Consumes `lit` or fails with "expected `what`".
    fn lit(&mut self, lit: &[u8], what: &str) -> Result<(), ParseError> {
        match self.s.strip_prefix(lit) {
            Some(rest) => {
                self.s = rest;
                Ok(())
            }
            None => Err(self.err(what)),
        }
    }

    /// Consumes a token up to the next space (or the end).
    fn token(&mut self) -> &'a [u8] {
        let n = self
            .s
            .iter()
            .position(|&b| b == b' ')
            .unwrap_or(self.s.len());
        let (t, rest) = self.s.split_at(n);
        self.s = rest;
        t
    }

    fn hex(&mut self, what: &str) -> Result<u64, ParseError> {
        let t = self.token();
        parse_hex(t).ok_or_else(|| self.err(what))
    }

    fn dec(&mut self, what: &str) -> Result<u64, ParseError> {
        let t = self.token();
        parse_dec(t).ok_or_else(|| self.err(what))
    }
}

/// `0x` followed by 1..=16 hex digits.
#[inline]
pub(crate) fn parse_hex(t: &[u8]) -> Option<u64> {
    let digits = t.strip_prefix(b"0x").or_else(|| t.strip_prefix(b"0X"))?;
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    let mut v = 0u64;
    for &b in digits {
        let d = match b {
            b'0'..=b'9' => b - b'0',
            b'a'..=b'f' => b - b'a' + 10,
            b'A'..=b'F' => b - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | u64::from(d);
    }
    Some(v)
}

/// Plain hex digits (no prefix), at most 16.
fn parse_bare_hex(t: &[u8]) -> Option<u64> {
    if t.is_empty() || t.len() > 16 {
        return None;
    }
    let mut v = 0u64;
    for &b in t {
        let d = (b as char).to_digit(16)?;
        v = (v << 4) | u64::from(d);
    }
    Some(v)
}

#[inline]
fn parse_dec(t: &[u8]) -> Option<u64> {
    if t.is_empty() || t.len() > 19 {
        return None;
    }
    let mut v = 0u64;
    for &b in t {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(b - b'0');
    }
    Some(v)
}

/// `BB:DD.F` in hex (QEMU's `%02x:%02x.%x`): a function in segment 0.
fn parse_bdf(t: &[u8]) -> Option<Sbdf> {
    let colon = t.iter().position(|&b| b == b':')?;
    let dot = t.iter().rposition(|&b| b == b'.')?;
    if dot < colon {
        return None;
    }
    let bus = u8::try_from(parse_bare_hex(&t[..colon])?).ok()?;
    let dev = parse_bare_hex(&t[colon + 1..dot])?;
    let func = parse_bare_hex(&t[dot + 1..])?;
    Sbdf::new(0, bus, u8::try_from(dev).ok()?, u8::try_from(func).ok()?).ok()
}

fn parse_ops<'a>(rest: &'a [u8], dir: Dir, event: &'static str) -> Result<Event<'a>, ParseError> {
    let mut f = Fields { s: rest, event };
    f.lit(b" cpu ", "'cpu C'")?;
    let cpu = f.token();
    let vcpu = match cpu {
        b"-1" => None,
        t => Some(
            parse_dec(t)
                .and_then(|v| u16::try_from(v).ok())
                .ok_or_else(|| f.err("'cpu C' with C a vCPU number or -1"))?,
        ),
    };
    f.lit(b" mr ", "'mr 0xPTR'")?;
    f.token();
    f.lit(b" addr ", "'addr 0xADDR'")?;
    let addr = f.hex("'addr 0xADDR'")?;
    f.lit(b" value ", "'value 0xVAL'")?;
    let value = f.hex("'value 0xVAL'")?;
    f.lit(b" size ", "'size N'")?;
    let size = f.dec("'size N'")?;
    let size = match size {
        1 | 2 | 4 | 8 => size as u8,
        _ => return Err(format!("size {size} is not 1, 2, 4 or 8 in {event} line")),
    };
    f.lit(b" name '", "\"name 'REGION'\"")?;
    let region =
        f.s.strip_suffix(b"'")
            .ok_or_else(|| f.err("\"name 'REGION'\" ending the line with a quote"))?;
    Ok(Event::Ops {
        dir,
        vcpu,
        addr,
        value,
        size,
        region,
    })
}

/// Splits off the last `n` space-separated tokens; the remainder (device name, which could in
/// principle contain spaces) comes first.
fn split_last<const N: usize>(s: &[u8]) -> Option<(&[u8], [&[u8]; N])> {
    let mut out: [&[u8]; N] = [&[]; N];
    let mut s = s;
    for slot in out.iter_mut().rev() {
        let sp = s.iter().rposition(|&b| b == b' ')?;
        *slot = &s[sp + 1..];
        s = &s[..sp];
    }
    Some((s, out))
}

fn device_name<'a>(s: &'a [u8], f: &Fields<'_>) -> Result<&'a [u8], ParseError> {
    let d = s.strip_prefix(b" ").ok_or_else(|| f.err("a device name"))?;
    if d.is_empty() {
        return Err(f.err("a device name"));
    }
    Ok(d)
}

fn parse_cfg<'a>(rest: &'a [u8], dir: Dir, event: &'static str) -> Result<Event<'a>, ParseError> {
    let f = Fields { s: rest, event };
    let (dev, [bdf, reg, arrow, value]) =
        split_last::<4>(rest).ok_or_else(|| f.err("'DEV BB:DD.F @0xREG -> 0xVAL'"))?;
    let device = device_name(dev, &f)?;
    let bdf = parse_bdf(bdf).ok_or_else(|| f.err("a 'BB:DD.F' function address"))?;
    let reg = reg
        .strip_prefix(b"@")
        .and_then(parse_hex)
        .and_then(|r| u16::try_from(r).ok())
        .ok_or_else(|| f.err("'@0xREG'"))?;
    let want: &[u8] = if dir == Dir::Read { b"->" } else { b"<-" };
    if arrow != want {
        return Err(f.err(if dir == Dir::Read { "'->'" } else { "'<-'" }));
    }
    let value = parse_hex(value).ok_or_else(|| f.err("'0xVAL'"))?;
    Ok(Event::Cfg {
        dir,
        device,
        bdf,
        reg,
        value,
    })
}

fn parse_mapping<'a>(
    rest: &'a [u8],
    kind: BarEventKind,
    event: &'static str,
) -> Result<Event<'a>, ParseError> {
    let f = Fields { s: rest, event };
    let (dev, [bdf, spec]) =
        split_last::<2>(rest).ok_or_else(|| f.err("'DEV BB:DD.F BAR,0xBASE+0xSIZE'"))?;
    let device = device_name(dev, &f)?;
    let bdf = parse_bdf(bdf).ok_or_else(|| f.err("a 'BB:DD.F' function address"))?;
    let bad = || f.err("'BAR,0xBASE+0xSIZE'");
    let comma = spec.iter().position(|&b| b == b',').ok_or_else(bad)?;
    let plus = spec.iter().rposition(|&b| b == b'+').ok_or_else(bad)?;
    if plus < comma {
        return Err(bad());
    }
    let bar = parse_dec(&spec[..comma])
        .and_then(|b| u8::try_from(b).ok())
        .filter(|&b| b <= 6)
        .ok_or_else(|| f.err("a BAR index 0..=6"))?;
    let base = parse_hex(&spec[comma + 1..plus]).ok_or_else(bad)?;
    let size = parse_hex(&spec[plus + 1..]).ok_or_else(bad)?;
    Ok(Event::Mapping {
        kind,
        device,
        bdf,
        bar,
        base,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_lines() {
        let e = parse_line(
            b"memory_region_ops_write cpu 0 mr 0x55b08df0ce90 addr 0xcf8 value 0x80000000 size 4 \
              name 'pci-conf-idx'",
        )
        .unwrap();
        assert_eq!(
            e,
            Event::Ops {
                dir: Dir::Write,
                vcpu: Some(0),
                addr: 0xcf8,
                value: 0x8000_0000,
                size: 4,
                region: b"pci-conf-idx"
            }
        );
        let e = parse_line(
            b"memory_region_ops_read cpu -1 mr 0x1 addr 0xfee00000 value 0xffffffffffffffff \
              size 1 name 'vga ioports remapped'\r",
        )
        .unwrap();
        assert_eq!(
            e,
            Event::Ops {
                dir: Dir::Read,
                vcpu: None,
                addr: 0xfee0_0000,
                value: u64::MAX,
                size: 1,
                region: b"vga ioports remapped"
            }
        );
        // With QEMU's -msg timestamp=on prefix.
        let e = parse_line(
            b"1234@1700000000.123456:memory_region_ops_read cpu 1 mr 0x1 addr 0x608 value 0x5 \
              size 4 name 'acpi-tmr'",
        )
        .unwrap();
        assert!(matches!(
            e,
            Event::Ops {
                vcpu: Some(1),
                addr: 0x608,
                ..
            }
        ));
    }

    #[test]
    fn cfg_and_mapping_lines() {
        assert_eq!(
            parse_line(b"pci_cfg_read mch 00:00.0 @0x0 -> 0x29c08086").unwrap(),
            Event::Cfg {
                dir: Dir::Read,
                device: b"mch",
                bdf: Sbdf::new(0, 0, 0, 0).unwrap(),
                reg: 0,
                value: 0x29c0_8086
            }
        );
        assert_eq!(
            parse_line(b"pci_cfg_write ICH9-LPC 00:1f.0 @0x40 <- 0x601").unwrap(),
            Event::Cfg {
                dir: Dir::Write,
                device: b"ICH9-LPC",
                bdf: Sbdf::new(0, 0, 0x1f, 0).unwrap(),
                reg: 0x40,
                value: 0x601
            }
        );
        assert_eq!(
            parse_line(b"pci_update_mappings_del e1000e 01:00.0 2,0xb000+0x20").unwrap(),
            Event::Mapping {
                kind: BarEventKind::Unmap,
                device: b"e1000e",
                bdf: Sbdf::new(0, 1, 0, 0).unwrap(),
                bar: 2,
                base: 0xb000,
                size: 0x20
            }
        );
        assert_eq!(parse_line(b"").unwrap(), Event::Blank);
        assert_eq!(parse_line(b"  \r").unwrap(), Event::Blank);
    }

    #[test]
    fn errors_say_what_was_expected() {
        let cases: &[(&[u8], &str)] = &[
            (
                b"memory_region_ops_read cpu 0 mr 0x1 addr 0x70 value 0x0 sz 1 name 'rtc'",
                "expected 'size N' in memory_region_ops_read line",
            ),
            (
                b"memory_region_ops_read cpu 0 mr 0x1 addr 0x70 value 0x0 size 3 name 'rtc'",
                "size 3 is not 1, 2, 4 or 8",
            ),
            (
                b"memory_region_ops_write cpu x mr 0x1 addr 0x70 value 0x0 size 1 name 'rtc'",
                "expected 'cpu C' with C a vCPU number or -1",
            ),
            (
                b"memory_region_ops_write cpu 0 mr 0x1 addr 0x70 value 0x0 size 1 name 'rtc",
                "ending the line with a quote",
            ),
            (
                b"memory_region_ops_write cpu 0 mr 0x1 addr 70 value 0x0 size 1 name 'rtc'",
                "expected 'addr 0xADDR'",
            ),
            (b"pci_cfg_read mch 00:00.0 @0x0 <- 0x1", "expected '->'"),
            (b"pci_cfg_read mch 00:40.0 @0x0 -> 0x1", "'BB:DD.F'"),
            (b"pci_cfg_read 00:00.0 @0x0 -> 0x1", "a device name"),
            (
                b"pci_update_mappings_add e1000 08:01.0 1,0xc000",
                "'BAR,0xBASE+0xSIZE'",
            ),
            (
                b"pci_update_mappings_add e1000 08:01.0 7,0xc000+0x40",
                "BAR index",
            ),
            (
                b"qemu-system-x86_64: terminating",
                "unknown trace event 'qemu-system",
            ),
            (
                b"memory_region_ops_read cpu 0 mr 0x1 addr 0x11112222333344445 value 0x0 size 1 \
                  name 'x'",
                "'addr 0xADDR'",
            ),
        ];
        for (line, want) in cases {
            let e = parse_line(line).unwrap_err();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
    }
}
